"""The ready-made deployments and the demo: each checked as far as this machine allows."""

from __future__ import annotations

import configparser
import os
import re
import shlex
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


def sourced(config_file: Path) -> dict[str, str]:
    """The variables a shell exports after `set -a; . ./file; set +a`, as cron does."""
    dump = subprocess.run(["/bin/sh", "-c", f"set -a && . {shlex.quote(str(config_file))} && set +a && env -0"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in dump.stdout.decode().split("\0") if "=" in item)


def test_the_crontab_line_runs_the_exporter_with_every_setting_exported(harness, hours, tmp_path):
    line = next(line for line in (DEPLOY / "cron" / "crontab").read_text().splitlines() if line and line[0].isdigit())
    assert line in README, "the README shows the same crontab line"
    schedule, command = line.split(None, 5)[:5], line.split(None, 5)[5]
    assert schedule == ["5", "*", "*", "*", "*"]
    command = command.split(" >> ")[0].replace("cd /opt/metering", f"cd {shlex.quote(str(tmp_path))}")
    command = command.replace(".venv/bin/python metering_processor.py", f"{sys.executable} {ROOT / 'metering_processor.py'}")
    harness.write_hour(hours[0], {
        "sub-AAAAAAAAAA": pod_records(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA")})
    harness.write_marker(hours.final(1))
    settings = {**harness.env, "START_HOUR": iso(hours[0])}
    (tmp_path / "config.env").write_text("".join(
        f"{name}={shlex.quote(value)}\n" for name, value in settings.items() if name not in ("PATH", "HOME")))
    result = subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(harness.clazar.accepted_keys()) == 4


def test_config_env_example_is_valid_for_the_shell_and_the_exporter(tmp_path):
    example = (ROOT / "config.env.example").read_text()
    assert set(name for name, _, _ in mp.SETTINGS if "<n>" not in name) <= set(re.findall(r"^#?([A-Z0-9_]+)=", example, re.M))
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


def test_the_kubernetes_cronjob_forbids_overlap_keeps_state_in_s3_and_runs_as_non_root():
    manifest = (DEPLOY / "kubernetes" / "cronjob.yaml").read_text()
    documents = {document["kind"]: document for document in yaml.safe_load_all(manifest)}
    assert set(documents) == {"ServiceAccount", "ConfigMap", "CronJob"}
    cronjob = documents["CronJob"]["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["serviceAccountName"] == documents["ServiceAccount"]["metadata"]["name"]
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    secrets = {item["name"]: item["valueFrom"]["secretKeyRef"]["name"] for item in container["env"]}
    assert secrets == {"CLAZAR_CLIENT_ID": "clazar-credentials", "CLAZAR_CLIENT_SECRET": "clazar-credentials"}
    assert f"image: {container['image']}" in manifest
    assert container["image"].split(":")[0] in README
    # The ConfigMap and the Secret together are a configuration the exporter accepts.
    config = mp.load_config({**documents["ConfigMap"]["data"], "CLAZAR_CLIENT_ID": "id", "CLAZAR_CLIENT_SECRET": "secret"})
    assert config.state_path.startswith("s3://") and len(config.services) == 2


def test_the_dockerfile_is_slim_non_root_and_built_as_the_readme_says():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    build = re.search(r"^#\s+(docker build .+)$", dockerfile, re.M).group(1)
    assert build in README
    assert re.search(r"^FROM python:3\.\d+-slim$", dockerfile, re.M)
    for source in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / source).exists()
    assert "RUN pip install --no-cache-dir -r requirements.txt" in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    tag = build.split(" -t ")[1].split()[0]
    assert f"image: {tag}" in (DEPLOY / "kubernetes" / "cronjob.yaml").read_text(), "the CronJob runs what is built"


def test_the_systemd_units_run_one_export_hourly():
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.optionxform = str
    service.read(DEPLOY / "systemd" / "metering-exporter.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].endswith("/metering_processor.py")
    assert service["Service"]["EnvironmentFile"] == "/etc/metering/config.env"
    assert service["Service"]["User"] != "root"
    timer = configparser.ConfigParser(interpolation=None)
    timer.optionxform = str
    timer.read(DEPLOY / "systemd" / "metering-exporter.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* *:05:00"
    for name in ("metering-exporter.service", "metering-exporter.timer"):
        assert name in README


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "ready").exists(), reason="make demo needs the project's .venv")
def test_make_demo_runs_the_export_end_to_end():
    result = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("=== exit code 0") == 2
    assert "288 records accepted" in result.stdout
    assert "No hour of Postgres/PROD/pt-HJSv20iWX0 is due" in result.stdout
