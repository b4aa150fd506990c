"""The operators' tools end to end: status, retry-failed, metrics, JSON logs,
lateness warnings, --help and --version."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from clazar_standin import call
from conftest import SERVICE, cpu, fabricate_rejected
from export_data import current_hour, files_with_refusals, iso, record, service_key
from servers import Pushgateway

KEY = service_key(SERVICE)
STOPPED = 5  # the exit code of a run stopped by SIGTERM or SIGINT
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(name, labels): value} from the Prometheus text format, checking its shape line by line."""
    samples, helped, typed = {}, set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[3] == "gauge"
            typed.add(line.split()[2])
        else:
            match = re.fullmatch(r'([a-z_]+)(\{service="((?:[^"\\]|\\.)*)"\})? (-?[0-9.e+]+)', line)
            assert match, f"not a sample line: {line!r}"
            name, _, service, value = match.groups()
            assert name in helped and name in typed
            samples[name, service or ""] = float(value)
    return samples


# --- status -----------------------------------------------------------------------------


def test_status_reports_where_each_service_stands_without_the_lock_or_clazar(harness, hours):
    for i in range(4):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 2),
                                                         cpu(hours[i], "c-gone", "sub-AAAAAAAAAA", 1) | {"podName": "x"}]})
    harness.write_marker(hours.final(4))
    harness.clazar.known_contracts = {"c-1"}
    env = {"START_HOUR": iso(hours[0]), "MAX_HOURS_PER_RUN": "1"}
    assert harness.run(env=env).returncode == 1  # c-gone is rejected
    calls = (harness.clazar.auth_calls, harness.clazar.metering_calls)
    lock = harness.state_path.parent / (harness.state_path.name + ".lock")
    import fcntl
    with open(lock, "w") as held:  # another run is working: status still answers
        fcntl.flock(held, fcntl.LOCK_EX)
        text = harness.run("status", env={**env, "CLAZAR_CLIENT_SECRET": None})
        asked = datetime.now(timezone.utc)
        as_json = harness.run("status", "--json", env={**env, "CLAZAR_CLIENT_SECRET": None})
        answered = datetime.now(timezone.utc)
    assert text.returncode == 0 and as_json.returncode == 0, text.output
    assert (harness.clazar.auth_calls, harness.clazar.metering_calls) == calls
    rows = json.loads(as_json.output)
    assert rows == [{
        "service": KEY,
        "last_processed_hour": iso(hours[0]),
        "hours_behind": 3,
        "marker": f"final before {iso(hours.final(4))}",
        "export_age_hours": rows[0]["export_age_hours"],
        "export_stale": True,
        "pending_hour": None,
        "pending_records": 0,
        "rejected_waiting": 1,
        "conflicts_waiting": 0,
        "last_run": rows[0]["last_run"],
        "last_success_at": None,
        "late_usage_found": 0,
        "last_late_usage": None,
    }]
    assert rows[0]["last_run"]["result"] == "rejected records" and rows[0]["last_run"]["sent"] == 1
    assert "hours behind marker:   3" in text.output and "rejected records:      1 waiting" in text.output
    assert f"last processed hour:   {iso(hours[0])}" in text.output
    # The marker's data ends 26 hours ago (and the minutes of this hour): far past
    # EXPORT_STALE_HOURS' default of 3. Rounded to a tenth, as the clock read while status ran.
    def age(moment):
        return round((moment - hours.final(4)) / timedelta(hours=1), 1)

    assert 26 <= age(asked) <= rows[0]["export_age_hours"] <= age(answered)
    assert f"(final before {iso(hours.final(4))}) ({rows[0]['export_age_hours']:.1f} hours ago)" not in text.output
    assert f"export marker:         final before {iso(hours.final(4))} ({rows[0]['export_age_hours']:.1f} hours ago)" \
        in text.output
    assert f"WARNING: the export is {rows[0]['export_age_hours']:.1f} hours behind, more than EXPORT_STALE_HOURS=3" \
        in text.output
    assert f"State {harness.state_path}" in text.output
    relaxed = harness.run("status", env={**env, "EXPORT_STALE_HOURS": "48"})
    assert relaxed.returncode == 0 and "WARNING" not in relaxed.output
    assert json.loads(harness.run("status", "--json", env={**env, "EXPORT_STALE_HOURS": "48"}).output)[0]["export_stale"] \
        is False


def test_status_shows_a_pending_hour_and_a_marker_problem(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    harness.clazar.faults.extend([__import__("clazar_standin").status(503)] * 2)
    assert harness.run(env={"START_HOUR": iso(hours[0]), "CLAZAR_MAX_RETRIES": "1"}).returncode == 1
    harness.write_marker(hours.final(1), services=[("Other", "DEV", "pt-x")])
    rows = json.loads(harness.run("status", "--json").output)
    assert rows[0]["pending_hour"] == iso(hours[0]) and rows[0]["pending_records"] == 1
    assert rows[0]["hours_behind"] is None and rows[0]["marker"].startswith("error: export marker has no entry")
    assert rows[0]["last_run"]["result"] == "failed" and "HTTP 503" in rows[0]["last_run"]["error"]


# --- retry-failed ----------------------------------------------------------------------------


def test_retry_failed_resends_fixed_records_and_keeps_the_rest(harness, hours):
    harness.clazar.known_contracts = {"c-1"}
    harness.clazar.registered_dimensions = {"cpu_core_hours"}
    for i in range(2):
        harness.write_hour(hours[i], files_with_refusals(SERVICE, hours[i], unknown_contract="c-new"))
    harness.write_marker(hours.final(2))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 1
    assert len(harness.waiting()) == 4
    # The state only counts them per hour; the records themselves wait in the ledger.
    assert harness.entry()["waiting"] == {iso(hours[0]): {"rejected": 2}, iso(hours[1]): {"rejected": 2}}

    dry = harness.run("retry-failed", "--dry-run", "--contract", "c-new", env=env)
    assert dry.returncode == 0 and dry.output.count("Dry run record:") == 2
    assert len(harness.waiting()) == 4

    # The contract is registered in Clazar now; the listing still lacks replica_hours.
    harness.clazar.known_contracts = {"c-1", "c-new"}
    only_one = harness.run("retry-failed", "--contract", "c-new", "--hour", iso(hours[1]), env=env)
    assert only_one.returncode == 0, only_one.output
    assert harness.clazar.accepted_quantities()[("c-new", "cpu_core_hours", iso(hours[1]))] == 5
    assert ("c-new", "cpu_core_hours", iso(hours[0])) not in harness.clazar.accepted_quantities()

    everything = harness.run("retry-failed", env=env)
    assert everything.returncode == 1
    assert "rejected contract c-1 dimension replica_hours" in everything.output and "again" in everything.output
    rejected = harness.waiting()
    assert {(item["contract_id"], item["dimension"]) for item in rejected} == {("c-1", "replica_hours")}
    assert all(item["attempts"] == 2 and item["answer"] == {"status": "fail"} for item in rejected)
    assert harness.entry()["waiting"] == {iso(hours[0]): {"rejected": 1}, iso(hours[1]): {"rejected": 1}}
    assert harness.clazar.accepted_quantities()[("c-new", "cpu_core_hours", iso(hours[0]))] == 5

    harness.clazar.registered_dimensions = None
    final = harness.run("retry-failed", env=env)
    assert final.returncode == 0, final.output
    assert harness.waiting() == [] and "waiting" not in harness.entry()
    # Nothing is left to resend.
    calls = harness.clazar.metering_calls
    assert harness.run("retry-failed", env=env).returncode == 0
    assert harness.clazar.metering_calls == calls


def test_retry_failed_finds_a_conflict_when_someone_else_delivered_the_record(harness, hours):
    harness.clazar.known_contracts = {"c-1"}
    harness.write_hour(hours[0], {"sub-BBBBBBBBBB": [cpu(hours[0], "c-2", "sub-BBBBBBBBBB", 5)]})
    harness.write_marker(hours.final(1))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 1
    # Someone delivered it by hand in the meantime, at another quantity.
    harness.clazar.known_contracts = None
    with harness.clazar.lock:
        harness.clazar.accepted["c-2", "cpu_core_hours", iso(hours[0])] = {"quantity": "4"}
    result = harness.run("retry-failed")
    assert result.returncode == 1, result.output
    assert "Conflict: Clazar already holds contract c-2 dimension cpu_core_hours" in result.output
    assert harness.waiting() == [] and [line["quantity"] for line in harness.waiting("conflict")] == [5]
    assert harness.entry()["waiting"] == {iso(hours[0]): {"conflict": 1}}
    # A conflict is never resent.
    calls = harness.clazar.metering_calls
    assert harness.run("retry-failed").returncode == 0 and harness.clazar.metering_calls == calls


def test_a_stop_during_retry_failed_then_a_retry_delivers_every_record_once(harness, hours):
    # Five rejected records wait in one hour; Clazar now accepts them. Three batches of two, one at a time.
    count = fabricate_rejected(harness.state_path, KEY, [hours[0]], ["c-1", "c-2", "c-3", "c-4", "c-5"])
    assert count == 5
    env = {"CLAZAR_BATCH_SIZE": "2", "CLAZAR_CONCURRENCY": "1"}
    process: list[subprocess.Popen] = []

    def stop_while_in_flight(records):
        # The first batch has landed; its answer is held a second while the run is told to stop.
        process[0].send_signal(signal.SIGTERM)
        time.sleep(1.0)

    harness.clazar.faults.append(call(stop_while_in_flight))
    process.append(harness.popen("retry-failed", env=env))
    output, _ = process[0].communicate(timeout=120)
    assert process[0].returncode == STOPPED, output
    assert harness.clazar.metering_calls == 1, "no batch was sent after the stop"
    assert len(harness.clazar.accepted_keys()) == 2

    again = harness.run("retry-failed", env=env)
    assert len(harness.clazar.accepted_keys()) == 5
    assert harness.waiting("conflict") == [], "records this exporter delivered are not conflicts"
    assert harness.waiting() == []
    assert again.returncode == 0, again.output
    assert "waiting" not in harness.entry()


def test_a_retry_failed_with_one_batch_failing_then_a_retry_delivers_every_record_once(harness, hours):
    """The same loss without a signal: the second of three batches gets a 500 (no retries)."""
    from clazar_standin import status

    fabricate_rejected(harness.state_path, KEY, [hours[0]], ["c-1", "c-2", "c-3", "c-4", "c-5"])
    env = {"CLAZAR_BATCH_SIZE": "2", "CLAZAR_CONCURRENCY": "1", "CLAZAR_MAX_RETRIES": "0"}
    harness.clazar.faults.extend([call(lambda records: None), status(500)])
    first = harness.run("retry-failed", env=env)
    assert first.returncode == 1, first.output
    assert len(harness.clazar.accepted_keys()) == 3, "the first and third batches landed"

    again = harness.run("retry-failed", env=env)
    assert len(harness.clazar.accepted_keys()) == 5
    assert harness.waiting("conflict") == [], "records this exporter delivered are not conflicts"
    assert again.returncode == 0, again.output


# --- metrics -----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("way", ["flag before", "flag after", "variable"])
def test_a_dry_run_of_conflicts_clear_lists_what_it_would_clear_and_writes_nothing(harness, hours, way):
    env = make_a_conflict(harness, hours)
    before = files_under(harness.state_path.parent)
    arguments = {"flag before": ("--dry-run", "conflicts", "--clear"), "flag after": ("conflicts", "--clear", "--dry-run"),
                 "variable": ("conflicts", "--clear")}[way]
    result = harness.run(*arguments, env={**env, **({"DRY_RUN": "true"} if way == "variable" else {})})
    assert result.returncode == 0, result.output
    assert "Dry run: would clear the 1 conflict(s) listed; nothing is written" in result.output
    assert re.search(rf"{iso(hours[0])} +c-2 +cpu_core_hours +5 ", result.output), result.output
    assert files_under(harness.state_path.parent) == before, result.output
    assert harness.entry()["waiting"] == {iso(hours[0]): {"conflict": 1}}
    # Without the dry run, the same command clears it.
    assert harness.run("conflicts", "--clear", env=env).returncode == 0
    assert "waiting" not in harness.entry()


def test_metrics_after_a_good_run_and_after_a_failed_one(harness, hours, tmp_path):
    metrics = tmp_path / "metering.prom"
    for i in range(3):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 2),
                                                         record(SERVICE, hours[i], contract=None,
                                                                subscription="sub-AAAAAAAAAA", dimension="replica_hours",
                                                                value=1)]})
    harness.write_marker(hours.final(3))
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics), "MAX_HOURS_PER_RUN": "2"}
    assert harness.run(env=env).returncode == 0
    good = parse_metrics(metrics.read_text())
    assert oct(metrics.stat().st_mode & 0o777) == "0o644"
    assert good["metering_run_exit_status", ""] == 0
    assert good["metering_service_up", KEY] == 1
    assert good["metering_run_hours_processed", KEY] == 2
    assert good["metering_run_records_sent", KEY] == 2
    assert good["metering_run_records_unattributable", KEY] == 2
    assert good["metering_hours_behind", KEY] == 1
    assert good["metering_rejected_records_waiting", KEY] == 0
    assert good["metering_pending_hour", KEY] == 0
    assert good["metering_run_late_hours", KEY] == 2  # these hours ended over a day ago, past AWS's 6 hours
    # What an alert on a stalled export compares with time(): where the marker's data ends, and the state's.
    assert good["metering_export_final_before_timestamp_seconds", KEY] == hours.final(3).timestamp()
    assert good["metering_last_processed_hour_timestamp_seconds", KEY] == hours[1].timestamp()
    success = good["metering_last_success_timestamp_seconds", KEY]
    assert abs(success - good["metering_run_timestamp_seconds", ""]) < 60

    harness.clazar.faults.extend([__import__("clazar_standin").status(503)] * 2)
    assert harness.run(env={**env, "CLAZAR_MAX_RETRIES": "1"}).returncode == 1
    failed = parse_metrics(metrics.read_text())
    assert failed["metering_run_exit_status", ""] == 1
    assert failed["metering_service_up", KEY] == 0
    assert failed["metering_pending_hour", KEY] == 1
    assert failed["metering_last_success_timestamp_seconds", KEY] == success
    assert failed["metering_last_run_timestamp_seconds", KEY] > success

    assert harness.run(env={**env, "MAX_HOURS_PER_RUN": "zero"}).returncode == 2
    assert parse_metrics(metrics.read_text())["metering_run_exit_status", ""] == 2

    harness.state_path.write_text("{broken")
    assert harness.run(env=env).returncode == 4
    broken = parse_metrics(metrics.read_text())
    assert broken["metering_run_exit_status", ""] == 4 and ("metering_service_up", KEY) not in broken


def test_metric_labels_are_escaped():
    import metering_processor as mp

    service = mp.ServiceKey('Odd "Name" \\ DB', "PROD", "pt-1")
    report = mp.ServiceReport(service, hours=1)
    text = mp.render_metrics([service], {service.key: report}, {}, 0, mp.utc_now(), 1.5)
    assert parse_metrics(text)["metering_run_hours_processed", 'Odd \\"Name\\" \\\\ DB:PROD:pt-1'] == 1


def test_metrics_are_pushed_to_a_pushgateway_and_a_failed_push_only_warns(harness, hours, tmp_path, certificate):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    with Pushgateway() as gateway:
        grouped = {**env, "METRICS_PUSHGATEWAY_URL": gateway.url + "/", "METRICS_PUSHGATEWAY_INSTANCE": "eu-west/prod 1"}
        result = harness.run(env=grouped)
        assert result.returncode == 0, result.output
        [(method, path, headers, body)] = gateway.requests
        assert method == "PUT" and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert path == "/metrics/job/metering_exporter/instance@base64/" + base64.urlsafe_b64encode(b"eu-west/prod 1").decode()
        assert body.decode() == metrics.read_text(), "the same metrics as the textfile"
        pushed = parse_metrics(body.decode())
        assert pushed["metering_run_records_sent", KEY] == 1 and pushed["metering_run_exit_status", ""] == 0

        # A Pushgateway that refuses is a warning; the run's exit code stays its own.
        gateway.status = 500
        refused = harness.run(env={**grouped, "METRICS_PUSHGATEWAY_INSTANCE": "worker-1"})
        assert refused.returncode == 0, refused.output
        assert gateway.requests[-1][1] == "/metrics/job/metering_exporter/instance/worker-1"
        assert f"WARNING - Could not push the metrics to {gateway.url}/metrics/job/metering_exporter/instance/worker-1: " \
               "HTTP 500" in refused.output
        assert len(gateway.requests) == 2
        gone = gateway.url
    unreachable = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": gone})
    assert unreachable.returncode == 0, unreachable.output
    assert f"WARNING - Could not push the metrics to {gone}/metrics/job/metering_exporter: ConnectionError" \
        in unreachable.output

    # TLS is verified: a certificate from an unknown CA is refused, the private CA goes in REQUESTS_CA_BUNDLE.
    with Pushgateway().use_tls(str(certificate / "server.pem"), str(certificate / "server.key")) as secure:
        untrusted = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": secure.url})
        assert untrusted.returncode == 0 and secure.requests == []
        assert "Could not push the metrics" in untrusted.output and "CERTIFICATE_VERIFY_FAILED" in untrusted.output
        trusted = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": secure.url,
                                   "REQUESTS_CA_BUNDLE": str(certificate / "ca.pem")})
        assert trusted.returncode == 0 and "Could not push" not in trusted.output
        assert [request[1] for request in secure.requests] == ["/metrics/job/metering_exporter"]
        assert parse_metrics(secure.requests[0][3].decode())["metering_run_exit_status", ""] == 0

    wrong = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": "pushgateway:9091"})
    assert wrong.returncode == 2 and "METRICS_PUSHGATEWAY_URL" in wrong.output


def test_the_pushgateway_grouping_key():
    import metering_processor as mp

    assert mp.pushgateway_target("http://pg:9091/", None) == "http://pg:9091/metrics/job/metering_exporter"
    assert mp.pushgateway_target("http://pg:9091", "") == "http://pg:9091/metrics/job/metering_exporter"
    assert mp.pushgateway_target("https://pg", "prod-1.eu") == "https://pg/metrics/job/metering_exporter/instance/prod-1.eu"
    assert mp.pushgateway_target("https://pg", "a/b") == "https://pg/metrics/job/metering_exporter/instance@base64/YS9i"


def test_a_pushgateway_url_refused_by_the_check_is_never_pushed_to(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    with Pushgateway() as gateway, Pushgateway("127.0.0.2") as elsewhere:
        port = gateway.url.rsplit(":", 1)[1]
        refused = {
            # 127.1 is 127.0.0.1 to the resolver, and a host name, not a loopback address, to the check.
            f"http://metrics:pushgateway-password@127.1:{port}": "unencrypted",
            # urlsplit reads this as 127.0.0.1 with a password; urllib3 connects to 127.0.0.2.
            f"http://metrics:pushgateway-password-42@127.0.0.2:{elsewhere.url.rsplit(':', 1)[1]}\\@127.0.0.1:9/":
                "METRICS_PUSHGATEWAY_URL: must not contain a backslash",
        }
        for url, problem in refused.items():
            result = harness.run(env={"START_HOUR": iso(hours[0]), "METRICS_PUSHGATEWAY_URL": url})
            assert result.returncode == 2 and "METRICS_PUSHGATEWAY_URL" in result.output, result.output
            assert problem in result.output
        # Refused at start-up: never contacted, with or without its password.
        assert gateway.requests == [] and elsewhere.requests == []
        # Another variable being the bad one: the checked URL still gets the exit status.
        result = harness.run(env={"START_HOUR": iso(hours[0]), "METRICS_PUSHGATEWAY_URL": gateway.url,
                                  "CLAZAR_BATCH_SIZE": "0"})
        assert result.returncode == 2
        [(method, _, _, body)] = gateway.requests
        assert method == "PUT" and parse_metrics(body.decode())["metering_run_exit_status", ""] == 2


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
        for arguments, extra in ((("--dry-run",), {}), (("run", "--dry-run"), {}), ((), {"DRY_RUN": "true"}),
                                 ((), {"DRY_RUN": "ture"})):
            result = harness.run(*arguments, env={**env, **extra, "CLAZAR_BATCH_SIZE": "0"})
            assert result.returncode == 2, result.output
            assert metrics.read_text() == production, f"{arguments} {extra}: the production metrics were replaced"
            assert len(gateway.requests) == pushes, f"{arguments} {extra}: a dry run pushed metrics"


def test_where_a_refused_configuration_publishes_its_exit_status():
    import metering_processor as mp

    environ = {"METRICS_FILE": "/m/metering.prom", "METRICS_PUSHGATEWAY_URL": "https://pg:9091/",
               "METRICS_PUSHGATEWAY_INSTANCE": "prod"}
    assert mp.metrics_targets_despite_error(environ, None) == ("/m/metering.prom", "https://pg:9091", "prod")
    assert mp.metrics_targets_despite_error({}, None) == (None, None, None)
    for dry_run, value in ((True, "false"), (None, "true"), (None, "yes"), (None, "not a flag")):
        assert mp.metrics_targets_despite_error({**environ, "DRY_RUN": value}, dry_run) is None
    for refused in ("http://user:password@pushgateway.example:9091", "http://a:1\\@127.0.0.1/", "pushgateway:9091",
                    "https://pg:99999"):
        assert mp.metrics_targets_despite_error({**environ, "METRICS_PUSHGATEWAY_URL": refused}, None) == \
            ("/m/metering.prom", None, "prod")


# --- logs ----------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_with_service_and_hour(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": b"[not json"})
    harness.write_marker(hours.final(2))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"})
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.output.splitlines()]
    assert all(set(entry) <= {"time", "level", "message", "service", "hour"} for entry in entries)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]) for entry in entries)
    by_message = {entry["message"]: entry for entry in entries}
    sending = by_message["Sending 1 metering records to Clazar"]
    assert sending["service"] == KEY and sending["hour"] == iso(hours[0]) and sending["level"] == "INFO"
    error = next(entry for entry in entries if entry["level"] == "ERROR" and "not valid JSON" in entry["message"])
    assert error["service"] == KEY
    assert any(entry["message"].startswith("Finished") for entry in entries)


def test_hours_sent_past_the_marketplace_window_are_warned_about(harness):
    now = current_hour()
    late = [now - timedelta(hours=5), now - timedelta(hours=4)]  # ended over 3 hours ago
    recent = now - timedelta(hours=2)  # ended just over an hour ago
    for hour in late + [recent]:
        harness.write_hour(hour, {"sub-AAAAAAAAAA": [cpu(hour, "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(now - timedelta(hours=1))
    result = harness.run(env={"START_HOUR": iso(late[0]), "CLAZAR_CLOUD": "gcp", "LATENESS_WINDOW_HOURS": "2"})
    if current_hour() != now:
        pytest.skip("the hour turned during the run")
    assert result.returncode == 0, result.output
    warnings = [line for line in result.lines("WARNING") if "marketplace" in line]
    # One warning for the service's run, however many hours it concerns: how many, and the oldest.
    assert len(warnings) == 1, result.output
    assert (f"Acme Vector DB/PROD/pt-Q7rT2bX9kL: 2 hour(s) sent past the gcp marketplace's 2-hour window, "
            f"the oldest {late[0]:%Y-%m-%d %H}:00:00, which ended ") in warnings[0]
    assert re.search(r"which ended (4\.\d|5\.0) hours ago: the marketplace may refuse to bill them", warnings[0])
    assert "2 hour(s) sent past the marketplace's window" in result.output
    assert len(harness.clazar.accepted_keys()) == 3, "late hours are still sent"


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
    # Run from another folder, it says where it looked: absolute paths, on stderr, away from the report.
    assert f"State {elsewhere / 'metering_state.json'} (lock " in process.stderr, process.stderr
    assert f"ledger {elsewhere / 'metering_ledger'}" in process.stderr
    assert str(elsewhere) not in process.stdout


# --- help and version ----------------------------------------------------------------------------


def test_help_lists_every_variable_and_version(harness):
    import metering_processor as mp

    result = harness.run("--help")
    assert result.returncode == 0
    for name, default, _ in mp.SETTINGS:
        assert name in result.output and default.split()[0] in result.output
    for command in ("status", "retry-failed", "run"):
        assert command in result.output
    version = harness.run("--version")
    assert version.returncode == 0 and version.output == f"metering_processor.py {mp.__version__}\n"


# --- the README's operator commands and the demo ------------------------------------------------


def test_the_readmes_operator_commands_work_as_written_with_the_config_loaded(harness, hours, tmp_path):
    """Each command the README shows an operator, run by /bin/sh in a checkout laid out as the cron
    recipe's (config.env, .venv, the script), after the README's own line that loads the config."""
    section = README.split("## Operating it", 1)[1]
    load = re.search(r"^cd /opt/metering && set -a && \. \./config\.env && set \+a", section, re.M)
    assert load, "the README shows how to load config.env before the commands"
    commands = [line.split("  #")[0].strip() for line in README.splitlines()
                if line.startswith(".venv/bin/python metering_processor.py ")]
    assert {command.split()[2] for command in commands} >= {"status", "history", "reconcile", "retry-failed"}

    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    python = checkout / ".venv" / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    (checkout / "metering_processor.py").symlink_to(ROOT / "metering_processor.py")
    settings = {**harness.env, "START_HOUR": iso(hours[0]), "STATE_FILE_PATH": "./metering_state.json"}
    (checkout / "config.env").write_text("".join(
        f"{name}={shlex.quote(value)}\n" for name, value in settings.items() if name not in ("PATH", "HOME")))
    prefix = load.group(0).replace("/opt/metering", shlex.quote(str(checkout)))

    def sh(command):
        return subprocess.run(["/bin/sh", "-c", f"{prefix} && {command}"], env={"PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=120)

    # Before any run (reconcile then has no processed hour to re-read, which keeps this quick).
    for command in commands:
        result = sh(command)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        assert "configuration error" not in result.stderr
    assert harness.clazar.accepted_keys() == set()
    exported = sh(".venv/bin/python metering_processor.py")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert len(harness.clazar.accepted_keys()) == 1 and (checkout / "metering_state.json").exists()
    status = sh(".venv/bin/python metering_processor.py status")
    assert f"last processed hour:   {iso(hours[0])}" in status.stdout


@pytest.mark.slow
def test_the_demo_fits_a_screen_and_warns_only_where_it_means_to():
    result = subprocess.run([sys.executable, str(ROOT / "demo" / "run_demo.py")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) <= 60, result.stdout
    assert " - ERROR - " not in result.stdout
    # What it means to show: a first run finds no state and says where it looked, and one
    # subscription without a marketplace payer is never billed.
    warnings = [line.split(" - WARNING - ")[1] for line in lines if " - WARNING - " in line]
    assert len(warnings) == 3, warnings
    assert [warning.split(",")[0] for warning in warnings[:2]] == ["No previous processing found"] * 2
    assert "have no externalPayerId or dimension" in warnings[2] and warnings[2].endswith(": sub-Vx00000002")
    assert "288 records accepted" in result.stdout
