"""Review of issue 13 (the operator's first week): dry runs, a clean stop, recipes as deployed.

Each test here reproduces one defect found in review and is marked xfail(strict) until fixed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import SERVICE, cpu, fabricate_rejected
from export_data import iso, service_key
from servers import Pushgateway

KEY = service_key(SERVICE)
STOPPED = 5


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def make_a_conflict(harness, hours) -> dict:
    """One hour whose record Clazar already holds from someone else: the run records a conflict."""
    harness.write_hour(hours[0], {"sub-BBBBBBBBBB": [cpu(hours[0], "c-2", "sub-BBBBBBBBBB", 5)]})
    harness.write_marker(hours.final(1))
    with harness.clazar.lock:
        harness.clazar.accepted["c-2", "cpu_core_hours", iso(hours[0])] = {"quantity": "4"}
    env = {"START_HOUR": iso(hours[0])}
    result = harness.run(env=env)
    assert result.returncode == 1 and "Conflict:" in result.output, result.output
    assert harness.entry()["waiting"] == {iso(hours[0]): {"conflict": 1}}
    return env


# --- dry run ----------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="--dry-run / DRY_RUN=true is ignored by 'conflicts --clear', which writes "
                                       "the ledger and the state")
@pytest.mark.parametrize("way", ["flag", "variable"])
def test_a_dry_run_of_conflicts_clear_writes_nothing(harness, hours, way):
    env = make_a_conflict(harness, hours)
    before = files_under(harness.state_path.parent)
    arguments = ("--dry-run", "conflicts", "--clear") if way == "flag" else ("conflicts", "--clear")
    result = harness.run(*arguments, env={**env, **({"DRY_RUN": "true"} if way == "variable" else {})})
    # Either refused (a usage error) or honoured (nothing cleared): never written.
    assert files_under(harness.state_path.parent) == before, result.output
    assert harness.entry()["waiting"] == {iso(hours[0]): {"conflict": 1}}


@pytest.mark.xfail(strict=True, reason="a dry run with a bad setting still overwrites METRICS_FILE and pushes "
                                       "exit status 2 to the Pushgateway")
def test_a_dry_run_with_a_bad_setting_writes_and_pushes_no_metrics(harness, hours, tmp_path):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    metrics = tmp_path / "metering.prom"
    with Pushgateway() as gateway:
        env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics), "METRICS_PUSHGATEWAY_URL": gateway.url}
        assert harness.run(env=env).returncode == 0
        production = metrics.read_text()
        pushes = len(gateway.requests)
        # A one-off check with a typo in another setting.
        for arguments, extra in ((("--dry-run",), {}), (("run", "--dry-run"), {}), ((), {"DRY_RUN": "true"})):
            result = harness.run(*arguments, env={**env, **extra, "CLAZAR_BATCH_SIZE": "0"})
            assert result.returncode == 2, result.output
            assert metrics.read_text() == production, f"{arguments} {extra}: the production metrics were replaced"
            assert len(gateway.requests) == pushes, f"{arguments} {extra}: a dry run pushed metrics"


# --- a clean stop -------------------------------------------------------------------------------


class SilentServer:
    """A loopback TCP server that accepts connections and never answers: an S3 that hangs."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        for connection in self.accepted:
            connection.close()
        self.listener.close()


@pytest.mark.xfail(strict=True, reason="S3 calls on the main thread (marker, listing, state, lease) are not "
                                       "interrupted by a stop: with S3 hanging, SIGTERM waits out boto3's timeouts")
@pytest.mark.parametrize("state", ["local-state", "s3-state"])
def test_a_stop_while_s3_hangs_ends_the_run_within_seconds(harness, tmp_path, state):
    hanging = SilentServer()
    try:
        env = {"AWS_ENDPOINT_URL_S3": hanging.endpoint, "METRICS_FILE": str(tmp_path / "metering.prom")}
        if state == "s3-state":
            env["STATE_FILE_PATH"] = "s3://state-bucket/exporter/metering_state.json"
        process = harness.popen(env=env)
        deadline = time.monotonic() + 30
        while not hanging.accepted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hanging.accepted, "the run reached S3"
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        # The README: "stops the run within seconds"; the issue: within 10 s. Allow twice that;
        # boto3 alone would wait 60 s per attempt, four attempts.
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail("still running 20 s after SIGTERM:\n" + output)
        assert process.returncode == STOPPED, output
    finally:
        hanging.close()


@pytest.mark.xfail(strict=True, reason="SIGINT (Ctrl-C) is turned into a flag that retry-failed --dry-run never "
                                       "looks at: it runs to the end and exits 0")
def test_ctrl_c_stops_a_long_retry_failed_dry_run(harness, hours):
    many = [hours.start - i * (hours[1] - hours[0]) for i in range(1, 301)]
    fabricate_rejected(harness.state_path, KEY, many, [f"c-{j}" for j in range(100)])
    process = harness.popen("retry-failed", "--dry-run")
    output = []
    for line in process.stdout:
        output.append(line)
        if "Dry run: would resend" in line:
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=180)
    output.append(rest)
    text = "".join(output)
    assert process.returncode == STOPPED, text[-2000:]
    assert text.count("Dry run: would resend") < len(many), "it listed every hour after Ctrl-C"


# --- the cron recipe with config.env filled in as the example shows ------------------------------


@pytest.mark.xfail(strict=True, reason="config.env is read by /bin/sh but the example and README only say to "
                                       "double-quote values with spaces: a secret holding '$' is silently mangled")
def test_the_crontab_line_passes_a_secret_holding_a_dollar_sign_as_written(s3, seaweed, bucket, tmp_path, hours):
    import test_deploy
    from clazar_standin import ClazarStandIn
    from conftest import Harness

    secret = "Xk9$Lp2w-7hQ$1"
    with ClazarStandIn(client_secret=secret) as standin:
        harness = Harness(s3, seaweed, bucket, standin, tmp_path / "h")
        home, logs = tmp_path / "opt" / "metering", tmp_path / "var" / "log" / "metering"
        home.mkdir(parents=True)
        logs.mkdir(parents=True)
        (home / "metering_processor.py").symlink_to(test_deploy.ROOT / "metering_processor.py")
        test_deploy.link_test_venv(home / ".venv")
        # Filled in for this machine, the secret typed over the example's placeholder as it stands.
        filled = test_deploy.filled_in((test_deploy.ROOT / "config.env.example").read_text(), {
            name: value for name, value in harness.env.items()
            if name not in ("PATH", "HOME", "STATE_FILE_PATH", "PYTHONDONTWRITEBYTECODE", "CLAZAR_CLIENT_SECRET")}
            | {"START_HOUR": iso(hours[0])})
        assert "your-clazar-client-secret" in filled
        (home / "config.env").write_text(filled.replace("your-clazar-client-secret", secret))
        test_deploy.one_hour_of_usage(harness, hours)
        command = test_deploy.crontab_line().split(None, 5)[5]
        command = command.replace(test_deploy.HOME, str(home)).replace(test_deploy.LOG_FOLDER, str(logs))
        result = subprocess.run(["/bin/sh", "-c", command], cwd=home, capture_output=True, text=True, timeout=180,
                                env={"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh"})
        log = (logs / "metering.log").read_text()
        assert result.returncode == 0, log
        assert len(standin.accepted_keys()) == 4


# --- the Pushgateway ------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="on a configuration error the raw METRICS_PUSHGATEWAY_URL is pushed to "
                                       "unchecked, even the one refused for sending a password over plain http")
def test_a_pushgateway_url_refused_by_the_check_is_never_pushed_to(harness, tmp_path):
    with Pushgateway() as gateway:
        port = gateway.url.rsplit(":", 1)[1]
        # 127.1 is 127.0.0.1 to the resolver, and a host name, not a loopback address, to the check.
        refused = f"http://metrics:pushgateway-password@127.1:{port}"
        result = harness.run(env={"METRICS_PUSHGATEWAY_URL": refused})
        assert result.returncode == 2 and "METRICS_PUSHGATEWAY_URL" in result.output, result.output
        assert "unencrypted" in result.output
        sent = [headers.get("Authorization", "") for _, _, headers, _ in gateway.requests]
        assert sent == [], "the password went out over plain http to a host the check refused"


# --- where the state is -----------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="history, reconcile and conflicts never say which state and ledger they read: "
                                       "run from another folder they answer 'nothing' or 'Everything matches.'")
@pytest.mark.parametrize("command", [("history", "--contract", "c-1"), ("reconcile",), ("conflicts",)])
def test_the_read_only_commands_name_the_state_and_ledger_they_read(harness, hours, tmp_path, command):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0]), "STATE_FILE_PATH": "./metering_state.json"}
    assert harness.run(env=env).returncode == 0  # started in the harness folder, as cron does
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if command[0] == "reconcile":
        command = (*command, "--from", iso(hours[0]), "--to", iso(hours[0]))
    process = subprocess.run(harness.command(*command), cwd=elsewhere, capture_output=True, text=True, timeout=120,
                             env={**harness.env, **env})
    output = process.stdout + process.stderr
    assert str(elsewhere / "metering_state.json") in output or str(elsewhere / "metering_ledger") in output, output
