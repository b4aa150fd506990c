"""The operators' tools end to end: status, retry-failed, conflicts, history, reconcile,
metrics (a file and a Pushgateway), JSON logs, lateness warnings, settings that are not
settings, ledger retention, secrets that must appear nowhere, --help and --version, the
commands as the docs show them, and the demo."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape as xml_escape

import pytest
from clazar_standin import DUPLICATE_ERROR, call, status
from conftest import CLIENT_SECRET, SERVICE, cpu, put_ledger_files, run_in_process
from export_data import (MARKER_KEY, current_hour, files_with_refusals, hour_prefix, iso, pod_records, record,
                         service_key, write_marker)
from servers import Pushgateway

KEY = service_key(SERVICE)
# A second plan of the same deployment, sold on another marketplace.
OTHER = ("Postgres", "PROD", "pt-HJSv20iWX0")
OTHER_KEY = service_key(OTHER)
TWO_MARKETPLACES = {"SERVICES": f"{KEY}=aws,{OTHER_KEY}=azure"}
STOPPED = 5  # the exit code of a run stopped by SIGTERM or SIGINT
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
LEDGER_LINE_FIELDS = {"kind", "contract_id", "dimension", "hour", "cloud", "quantity", "outcome", "at", "record_id"}


def other_cpu(hour, contract, subscription, value, **extra):
    """One cpu_core_hours record of OTHER."""
    return record(OTHER, hour, contract=contract, subscription=subscription, dimension="cpu_core_hours",
                  value=value, **extra)


def deployment(harness) -> dict:
    """The state's deployment entry (version 2)."""
    return harness.state()["deployment"]


def waiting(harness, outcome: str = "rejected") -> list[dict]:
    """The ledger lines of the records waiting as ``outcome``, as the exporter reads them
    (each record's latest line), oldest hour first."""
    import metering_processor as mp

    by_hour: dict[str, list] = {}
    for line in harness.ledger_lines():
        by_hour.setdefault(line["hour"], []).append(mp.ledger_line(line))
    return [line.to_json() for hour in sorted(by_hour) for line in mp.waiting_records(by_hour[hour]).values()
            if mp.waiting_as(line) == outcome]


_SAMPLE = re.compile(r'([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.e+]+)')
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def label_value(text: str) -> str:
    """``text`` escaped as a Prometheus label value."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def parse_metrics(text: str, deployment_label: str) -> dict[tuple[str, str], float]:
    """{(name, labels other than deployment, as "name=value,..."): value} from the Prometheus
    text format, checking its shape line by line: every family helped and typed as a gauge,
    every series labelled with ``deployment_label`` first, and no series twice."""
    samples: dict[tuple[str, str], float] = {}
    helped, typed = set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[3] == "gauge"
            typed.add(line.split()[2])
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            assert name in helped and name in typed
            pairs = _LABEL.findall(labels)
            assert pairs[0] == ("deployment", label_value(deployment_label)), line
            key = (name, ",".join(f"{label}={value}" for label, value in pairs[1:]))
            assert key not in samples, f"the series {key} twice"
            samples[key] = float(value)
    return samples


def state_label(harness) -> str:
    """The deployment label of the harness's state: its absolute path (links resolved) or S3 URL."""
    return harness.state_display if harness.state_in_s3 else os.path.realpath(harness.state_path)


# --- status -----------------------------------------------------------------------------


def test_status_reports_the_deployment_then_each_service_without_the_lock_or_clazar(harness, hours):
    # One deployment of two plans on two marketplaces; OTHER's export lags an hour behind
    # SERVICE's, so OTHER holds the deployment's next hour.
    for i in range(4):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 2),
                                                         cpu(hours[i], "c-gone", "sub-AAAAAAAAAA", 1) | {"podName": "x"}]})
        harness.write_hour(hours[i], {"sub-CCCCCCCCCC": [other_cpu(hours[i], "c-3", "sub-CCCCCCCCCC", 4)]},
                           service=OTHER)
    write_marker(harness.s3, harness.bucket, {KEY: hours.final(4), OTHER_KEY: hours.final(3)})
    harness.clazar.known_contracts = {"c-1", "c-3"}
    env = {"START_HOUR": iso(hours[0]), "MAX_HOURS_PER_RUN": "1", **TWO_MARKETPLACES}
    assert harness.run(env=env).returncode == 1  # c-gone is rejected
    calls = (harness.clazar.auth_calls, harness.clazar.metering_calls)
    lock = harness.state_path.parent / (harness.state_path.name + ".lock")
    with open(lock, "w") as held:  # another run is working: status still answers
        fcntl.flock(held, fcntl.LOCK_EX)
        text = harness.report("status", env={**env, "CLAZAR_CLIENT_SECRET": None})
        asked = datetime.now(timezone.utc)
        as_json = harness.report("status", "--json", env={**env, "CLAZAR_CLIENT_SECRET": None})
        answered = datetime.now(timezone.utc)
    assert text.returncode == 0 and as_json.returncode == 0, text.output
    assert (harness.clazar.auth_calls, harness.clazar.metering_calls) == calls
    report = json.loads(as_json.output)
    services = report["services"]
    assert report == {
        "state": str(harness.state_path),
        "last_processed_hour": iso(hours[0]),
        "hours_behind": 2,  # hours 1 and 2 are final for both plans; hour 3 only for SERVICE
        "holding": OTHER_KEY,
        "services": [
            {"service": KEY, "cloud": "aws", "last_processed_hour": iso(hours[0]),
             "marker": f"final before {iso(hours.final(4))}", "export_age_hours": services[0]["export_age_hours"],
             "export_stale": True},
            {"service": OTHER_KEY, "cloud": "azure", "last_processed_hour": iso(hours[0]),
             "marker": f"final before {iso(hours.final(3))}", "export_age_hours": services[1]["export_age_hours"],
             "export_stale": True},
        ],
        "pending_hour": None,
        "pending_records": 0,
        "rejected_waiting": 1,
        "conflicts_waiting": 0,
        "last_run": report["last_run"],
        "last_success_at": None,
        "late_usage_found": 0,
        "last_late_usage": None,
    }
    run = report["last_run"]
    assert run["result"] == "rejected records" and run["sent"] == 2 and run["rejected"] == 1 and run["hours"] == 1
    assert run["holding"] == OTHER_KEY

    # The marker's data ends 26 (SERVICE) and 27 (OTHER) hours ago, and the minutes of this
    # hour: far past EXPORT_STALE_HOURS' default of 3. Rounded to a tenth, as the clock read
    # while status ran.
    def age(final_before, moment):
        return round((moment - final_before) / timedelta(hours=1), 1)

    assert 26 <= age(hours.final(4), asked) <= services[0]["export_age_hours"] <= age(hours.final(4), answered)
    assert 27 <= age(hours.final(3), asked) <= services[1]["export_age_hours"] <= age(hours.final(3), answered)

    # One block for the deployment, then one per service, in the order SERVICES lists them.
    stalled = "more than EXPORT_STALE_HOURS=3: Omnistrate's export may have stalled"
    assert text.output.splitlines() == [
        f"State {harness.state_path}",
        f"  last processed hour:   {iso(hours[0])}",
        f"  hours behind marker:   2 (waiting for {OTHER_KEY})",
        "  pending hour:          none",
        "  rejected records:      1 waiting (metering-processor retry-failed)",
        "  conflicts:             0 waiting",
        f"  last run:              {run['at']}, rejected records: 1 hour(s), 2 sent, 1 rejected",
        "  last success:          never",
        f"{KEY} (aws)",
        f"  last processed hour:   {iso(hours[0])}",
        f"  export marker:         final before {iso(hours.final(4))} ({services[0]['export_age_hours']:.1f} hours ago)",
        f"  WARNING: the export is {services[0]['export_age_hours']:.1f} hours behind, {stalled}",
        f"{OTHER_KEY} (azure)",
        f"  last processed hour:   {iso(hours[0])}",
        f"  export marker:         final before {iso(hours.final(3))} ({services[1]['export_age_hours']:.1f} hours ago)",
        f"  WARNING: the export is {services[1]['export_age_hours']:.1f} hours behind, {stalled}",
    ]
    relaxed = harness.run("status", env={**env, "EXPORT_STALE_HOURS": "48"})  # its log too
    assert relaxed.returncode == 0 and "WARNING" not in relaxed.output
    relaxed_json = json.loads(harness.report("status", "--json", env={**env, "EXPORT_STALE_HOURS": "48"}).output)
    assert [row["export_stale"] for row in relaxed_json["services"]] == [False, False]


def test_status_shows_a_pending_hour_and_a_marker_problem(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    harness.clazar.faults.extend([status(503)] * 2)
    assert harness.run(env={"START_HOUR": iso(hours[0]), "CLAZAR_MAX_RETRIES": "1"}).returncode == 1
    harness.write_marker(hours.final(1), services=[("Other", "DEV", "pt-x")])
    report = json.loads(harness.report("status", "--json").output)
    assert report["pending_hour"] == iso(hours[0]) and report["pending_records"] == 1
    # The service the marker has no entry for holds the deployment; how far behind is unknown.
    assert report["hours_behind"] is None and report["holding"] == KEY
    [row] = report["services"]
    assert row["marker"].startswith("error: export marker has no entry for 'Acme Vector DB:PROD:pt-Q7rT2bX9kL'")
    assert row["export_age_hours"] is None and row["last_processed_hour"] is None
    assert report["last_run"]["result"] == "failed" and "HTTP 503" in report["last_run"]["error"]
    text = harness.report("status").output
    assert f"  pending hour:          {iso(hours[0])} (1 records, resent by the next run)" in text.splitlines()
    assert f"  hours behind marker:   unknown (waiting for {KEY})" in text.splitlines()


# --- retry-failed ----------------------------------------------------------------------------


def test_retry_failed_resends_fixed_records_and_keeps_the_rest(harness, hours):
    harness.clazar.known_contracts = {"c-1"}
    harness.clazar.registered_dimensions = {"cpu_core_hours"}
    for i in range(2):
        harness.write_hour(hours[i], files_with_refusals(SERVICE, hours[i], unknown_contract="c-new"))
    harness.write_marker(hours.final(2))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 1
    assert len(waiting(harness)) == 4
    # The state only counts them per hour; the records themselves wait in the ledger.
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"rejected": 2}, iso(hours[1]): {"rejected": 2}}

    dry = harness.run("retry-failed", "--dry-run", "--contract", "c-new", env=env)
    assert dry.returncode == 0 and dry.output.count("Dry run record:") == 2
    assert len(waiting(harness)) == 4

    # The contract is registered in Clazar now; the listing still lacks replica_hours.
    harness.clazar.known_contracts = {"c-1", "c-new"}
    only_one = harness.run("retry-failed", "--contract", "c-new", "--hour", iso(hours[1]), env=env)
    assert only_one.returncode == 0, only_one.output
    assert harness.clazar.accepted_quantities()[("c-new", "cpu_core_hours", iso(hours[1]))] == 5
    assert ("c-new", "cpu_core_hours", iso(hours[0])) not in harness.clazar.accepted_quantities()

    everything = harness.run("retry-failed", env=env)
    assert everything.returncode == 1
    for hour in hours[0], hours[1]:
        assert f"Clazar rejected contract c-1 dimension replica_hours hour {iso(hour)} quantity 1" in everything.output
    assert f"Hour {hours[0]:%Y-%m-%d %H}:00:00: 1 delivered on retry, 1 still rejected, 0 in conflict" \
        in everything.output, everything.output
    rejected = waiting(harness)
    assert {(item["contract_id"], item["dimension"]) for item in rejected} == {("c-1", "replica_hours")}
    assert all(item["attempts"] == 2 and item["answer"] == {"status": "fail"} for item in rejected)
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"rejected": 1}, iso(hours[1]): {"rejected": 1}}
    assert harness.clazar.accepted_quantities()[("c-new", "cpu_core_hours", iso(hours[0]))] == 5

    harness.clazar.registered_dimensions = None
    final = harness.run("retry-failed", env=env)
    assert final.returncode == 0, final.output
    assert waiting(harness) == [] and deployment(harness)["waiting"] == {}
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
    assert waiting(harness) == [] and [line["quantity"] for line in waiting(harness, "conflict")] == [5]
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"conflict": 1}}
    # A conflict is never resent.
    calls = harness.clazar.metering_calls
    assert harness.run("retry-failed").returncode == 0 and harness.clazar.metering_calls == calls


def reject_then_accept(harness, hours, contracts: list[str]) -> None:
    """One hour with a record for each of ``contracts``, all rejected by a first run (Clazar
    knew none of them); Clazar accepts them from now on."""
    harness.write_hour(hours[0], {f"sub-{contract}": [cpu(hours[0], contract, f"sub-{contract}", 3)]
                                  for contract in contracts})
    harness.write_marker(hours.final(1))
    harness.clazar.known_contracts = set()
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 1
    assert len(waiting(harness)) == len(contracts)
    harness.clazar.known_contracts = None
    harness.clazar.metering_calls = 0


def test_a_stop_during_retry_failed_then_a_retry_delivers_every_record_once(harness, hours):
    # Ten rejected records wait in one hour; Clazar now accepts them. One record a batch, and
    # four batches in flight at once (the exporter's fixed concurrency): the four first are
    # held by the stand-in while the run is told to stop, so the other six are never sent.
    contracts = [f"c-{i}" for i in range(10)]
    reject_then_accept(harness, hours, contracts)
    env = {"CLAZAR_BATCH_SIZE": "1"}
    process: list[subprocess.Popen] = []

    # The stop comes once all four batches have landed: on a loaded machine a sender thread
    # could otherwise still be before its stop check when SIGTERM arrives, and rightly not send.
    all_in_flight = threading.Barrier(4, timeout=60)

    def stop_while_in_flight(records):
        # This batch has landed; its answer is held while the run is told to stop.
        all_in_flight.wait()
        process[0].send_signal(signal.SIGTERM)
        time.sleep(1.5)

    def held(records):
        all_in_flight.wait()
        time.sleep(1.5)

    harness.clazar.faults.extend([call(stop_while_in_flight), call(held), call(held), call(held)])
    process.append(harness.popen("retry-failed", env=env))
    output, _ = process[0].communicate(timeout=120)
    assert process[0].returncode == STOPPED, output
    assert harness.clazar.metering_calls == 4, "no batch was sent after the stop"
    assert len(harness.clazar.accepted_keys()) == 4

    again = harness.run("retry-failed", env=env)
    assert len(harness.clazar.accepted_keys()) == 10
    assert harness.clazar.metering_calls == 10, "each record was sent once"
    assert waiting(harness, "conflict") == [], "records this exporter delivered are not conflicts"
    assert waiting(harness) == []
    assert again.returncode == 0, again.output
    assert deployment(harness)["waiting"] == {}


def test_a_retry_failed_with_one_batch_failing_then_a_retry_delivers_every_record_once(harness, hours):
    """The same loss without a signal: the second of five batches gets a 500 (no retries)."""
    contracts = [f"c-{i}" for i in range(5)]
    reject_then_accept(harness, hours, contracts)
    env = {"CLAZAR_BATCH_SIZE": "1", "CLAZAR_MAX_RETRIES": "0"}
    harness.clazar.faults.extend([call(lambda records: None), status(500)])
    first = harness.run("retry-failed", env=env)
    assert first.returncode == 1, first.output
    assert len(harness.clazar.accepted_keys()) == 4, "every batch but the failed one landed"

    again = harness.run("retry-failed", env=env)
    assert len(harness.clazar.accepted_keys()) == 5
    assert waiting(harness, "conflict") == [], "records this exporter delivered are not conflicts"
    assert again.returncode == 0, again.output
    assert waiting(harness) == [] and deployment(harness)["waiting"] == {}


# --- conflicts, history and reconcile --------------------------------------------------------


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
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"conflict": 1}}
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
    assert re.search(rf"{iso(hours[0])} +c-2 +cpu_core_hours +5 +aws / ", result.output), result.output
    assert files_under(harness.state_path.parent) == before, result.output
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"conflict": 1}}
    # Without the dry run, the same command clears it.
    assert harness.run("conflicts", "--clear", env=env).returncode == 0
    assert deployment(harness)["waiting"] == {}


def test_conflicts_history_and_reconcile_print_the_deployments_ledger_lines_and_rows(harness, hours):
    # Both plans bill contract c-1 in the same hour: one record of their sum. Clazar already
    # holds c-2's record from someone else: a conflict.
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)],
                                  "sub-BBBBBBBBBB": [cpu(hours[0], "c-2", "sub-BBBBBBBBBB", 5)]})
    harness.write_hour(hours[0], {"sub-CCCCCCCCCC": [other_cpu(hours[0], "c-1", "sub-CCCCCCCCCC", 3)]},
                       service=OTHER)
    write_marker(harness.s3, harness.bucket, {KEY: hours.final(1), OTHER_KEY: hours.final(1)})
    with harness.clazar.lock:
        harness.clazar.accepted["c-2", "cpu_core_hours", iso(hours[0])] = {"quantity": "4"}
    env = {"START_HOUR": iso(hours[0]), "SERVICES": f"{KEY},{OTHER_KEY}"}
    assert harness.run(env=env).returncode == 1
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[0]))] == 5

    conflicts = harness.report("conflicts", "--json", env=env)
    assert conflicts.returncode == 0, conflicts.output
    [line] = json.loads(conflicts.output)
    assert set(line) == LEDGER_LINE_FIELDS | {"amount", "carried_in", "answer"}
    assert line == {"kind": "record", "contract_id": "c-2", "dimension": "cpu_core_hours", "hour": iso(hours[0]),
                    "cloud": "aws", "quantity": 5, "outcome": "conflict", "at": line["at"], "record_id": None,
                    "amount": "5", "carried_in": "0", "answer": {"status": "fail", "errors": [DUPLICATE_ERROR]}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line["at"])

    history = harness.report("history", "--contract", "c-1", "--json", env=env)
    assert history.returncode == 0, history.output
    [line] = json.loads(history.output)
    assert set(line) == LEDGER_LINE_FIELDS | {"amount", "carried_in"}, "no service: the deployment bills"
    assert line == {"kind": "record", "contract_id": "c-1", "dimension": "cpu_core_hours", "hour": iso(hours[0]),
                    "cloud": "aws", "quantity": 5, "outcome": "delivered", "at": line["at"],
                    "record_id": line["record_id"], "amount": "5", "carried_in": "0"}
    assert line["record_id"] == harness.clazar.accepted["c-1", "cpu_core_hours", iso(hours[0])]["id"]
    text = harness.report("history", "--contract", "c-1", env=env).output
    assert re.search(rf"{iso(hours[0])} +cpu_core_hours +5  delivered +{line['record_id']}", text), text
    assert "1 line(s); 5 unit(s) billed in all dimensions" in text

    reconciled = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), "--json", env=env)
    assert reconciled.returncode == 1, "a difference: c-2 was never billed by this exporter"
    result = json.loads(reconciled.output)
    assert result["rows"] == [
        {"contract_id": "c-1", "dimension": "cpu_core_hours", "expected": 5, "billed": 5, "difference": 0,
         "rejected": 0, "conflict": 0},
        {"contract_id": "c-2", "dimension": "cpu_core_hours", "expected": 5, "billed": 0, "difference": 5,
         "rejected": 0, "conflict": 5},
    ]
    assert result["differences"] == [{"contract_id": "c-2", "dimension": "cpu_core_hours", "hour": iso(hours[0]),
                                      "expected": 5, "billed": 0, "difference": 5, "rejected": 0, "conflict": 5}]
    csv_text = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), "--csv", env=env).output
    assert csv_text.splitlines() == ["contract_id,dimension,expected,billed,difference,rejected,conflict",
                                     "c-1,cpu_core_hours,5,5,0,0,0", "c-2,cpu_core_hours,5,0,5,0,5"]


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_after_a_good_run_and_after_a_failed_one(harness, hours, tmp_path):
    metrics = tmp_path / "metering.prom"
    label = state_label(harness)
    for i in range(4):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 2),
                                                         record(SERVICE, hours[i], contract=None,
                                                                subscription="sub-AAAAAAAAAA", dimension="replica_hours",
                                                                value=1)]})
        harness.write_hour(hours[i], {"sub-CCCCCCCCCC": [other_cpu(hours[i], "c-9", "sub-CCCCCCCCCC", 3)]},
                           service=OTHER)
    write_marker(harness.s3, harness.bucket, {KEY: hours.final(4), OTHER_KEY: hours.final(3)})
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics), "MAX_HOURS_PER_RUN": "2", **TWO_MARKETPLACES}
    assert harness.run(env=env).returncode == 0
    good = parse_metrics(metrics.read_text(), label)
    assert oct(metrics.stat().st_mode & 0o777) == "0o644"
    import metering_processor as mp

    assert good["metering_build_info", f"version={mp.__version__}"] == 1
    assert good["metering_run_exit_status", ""] == 0
    assert good["metering_run_hours_processed", ""] == 2
    # Per marketplace: c-1 is SERVICE's (aws), c-9 OTHER's (azure).
    assert good["metering_run_records_sent", "cloud=aws"] == 2
    assert good["metering_run_records_sent", "cloud=azure"] == 2
    for name in ("already_delivered", "rejected", "conflicting"):
        assert good[f"metering_run_records_{name}", "cloud=aws"] == good[f"metering_run_records_{name}", "cloud=azure"] == 0
    assert good["metering_run_records_unattributable", ""] == 2
    assert good["metering_hours_behind", ""] == 1  # hour 2; hour 3 is not final for OTHER
    assert good["metering_rejected_records_waiting", ""] == 0
    assert good["metering_conflicting_records_waiting", ""] == 0
    assert good["metering_pending_hour", ""] == 0
    assert good["metering_run_late_hours", ""] == 2  # these hours ended over a day ago, past AWS's 6 hours
    assert good["metering_run_late_usage", ""] == 0
    # The plan whose export holds the deployment back, and what an alert on a stalled export
    # compares with time(): where each plan's final data ends, and the deployment's.
    assert good["metering_service_holding", f"service={OTHER_KEY}"] == 1
    assert good["metering_service_holding", f"service={KEY}"] == 0
    assert good["metering_export_final_before_timestamp_seconds", f"service={KEY}"] == hours.final(4).timestamp()
    assert good["metering_export_final_before_timestamp_seconds", f"service={OTHER_KEY}"] == hours.final(3).timestamp()
    assert good["metering_last_processed_hour_timestamp_seconds", ""] == hours[1].timestamp()
    success = good["metering_last_success_timestamp_seconds", ""]
    assert abs(success - good["metering_run_timestamp_seconds", ""]) < 60
    assert good["metering_run_duration_seconds", ""] >= 0
    # Removed in 2.0.0: the deployment is the unit, not the service.
    assert not {name for name, _ in good} & {"metering_service_up", "metering_last_run_timestamp_seconds"}

    harness.clazar.faults.extend([status(503)] * 2)
    assert harness.run(env={**env, "CLAZAR_MAX_RETRIES": "1"}).returncode == 1
    failed = parse_metrics(metrics.read_text(), label)
    assert failed["metering_run_exit_status", ""] == 1
    assert failed["metering_run_hours_processed", ""] == 0
    assert failed["metering_run_records_sent", "cloud=aws"] == failed["metering_run_records_sent", "cloud=azure"] == 0
    assert failed["metering_pending_hour", ""] == 1
    assert failed["metering_last_success_timestamp_seconds", ""] == success
    assert failed["metering_run_timestamp_seconds", ""] > success

    assert harness.run(env={**env, "MAX_HOURS_PER_RUN": "zero"}).returncode == 2
    refused = parse_metrics(metrics.read_text(), label)
    assert refused["metering_run_exit_status", ""] == 2
    # A refused configuration knows nothing of the deployment but its exit status.
    assert {name for name, _ in refused} == {"metering_build_info", "metering_run_timestamp_seconds",
                                             "metering_run_duration_seconds", "metering_run_exit_status"}

    harness.state_path.write_text("{broken")
    assert harness.run(env=env).returncode == 4
    broken = parse_metrics(metrics.read_text(), label)
    assert broken["metering_run_exit_status", ""] == 4
    # The state could not be read: nothing is claimed about it.
    assert not {name for name, _ in broken} & {"metering_pending_hour", "metering_rejected_records_waiting",
                                               "metering_last_success_timestamp_seconds", "metering_hours_behind"}


def test_metric_labels_are_escaped_and_every_series_names_its_deployment():
    import metering_processor as mp

    config = mp.load_config({"S3_BUCKET_NAME": "b", "SERVICES": 'Odd "Name" \\ DB:PROD:pt-1=gcp,Vault Secret:PROD:pt-2',
                             "DRY_RUN": "true"})
    report = mp.RunReport(hours=1, holding='Odd "Name" \\ DB:PROD:pt-1')
    report.count(mp.DELIVERED, "gcp")
    deployment_label = '/srv/odd "state"\\\nfolder/metering_state.json'
    text = mp.render_metrics(config, report, mp.DeploymentState(), 0, mp.utc_now(), 1.5, deployment_label)
    samples = parse_metrics(text, deployment_label)
    assert samples["metering_run_hours_processed", ""] == 1
    assert samples["metering_run_records_sent", "cloud=gcp"] == 1 and samples["metering_run_records_sent", "cloud=aws"] == 0
    assert samples["metering_service_holding", 'service=Odd \\"Name\\" \\\\ DB:PROD:pt-1'] == 1
    # A name that merely contains "Secret" is a name, not a secret: shown as it is.
    assert samples["metering_service_holding", "service=Vault Secret:PROD:pt-2"] == 0


def test_metrics_are_pushed_to_a_pushgateway_and_a_failed_push_only_warns(harness, hours, tmp_path, certificate):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    metrics = tmp_path / "metering.prom"
    label = state_label(harness)
    group = "/metrics/job/metering_exporter/deployment@base64/" + \
        base64.urlsafe_b64encode(label.encode()).decode().rstrip("=")
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    with Pushgateway() as gateway:
        # METRICS_PUSHGATEWAY_INSTANCE is gone: the group is the deployment, whatever it says.
        grouped = {**env, "METRICS_PUSHGATEWAY_URL": gateway.url + "/", "METRICS_PUSHGATEWAY_INSTANCE": "eu-west/prod 1"}
        result = harness.run(env=grouped)
        assert result.returncode == 0, result.output
        assert "WARNING - METRICS_PUSHGATEWAY_INSTANCE is no longer a setting (the push is grouped by deployment " \
               "(the state's location)); remove it" in result.output
        [(method, path, headers, body)] = gateway.requests
        assert method == "PUT" and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert path == group
        assert body.decode() == metrics.read_text(), "the same metrics as the textfile"
        pushed = parse_metrics(body.decode(), label)
        assert pushed["metering_run_records_sent", "cloud=aws"] == 1 and pushed["metering_run_exit_status", ""] == 0

        # A Pushgateway that refuses is a warning; the run's exit code stays its own.
        gateway.status = 500
        refused = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": gateway.url})
        assert refused.returncode == 0, refused.output
        assert gateway.requests[-1][1] == group
        assert f"WARNING - Could not push the metrics to {gateway.url}{group}: HTTP 500" in refused.output
        assert len(gateway.requests) == 2
        gone = gateway.url
    unreachable = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": gone})
    assert unreachable.returncode == 0, unreachable.output
    assert f"WARNING - Could not push the metrics to {gone}{group}: ConnectionError" in unreachable.output

    # TLS is verified: a certificate from an unknown CA is refused, the private CA goes in REQUESTS_CA_BUNDLE.
    with Pushgateway().use_tls(str(certificate / "server.pem"), str(certificate / "server.key")) as secure:
        untrusted = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": secure.url})
        assert untrusted.returncode == 0 and secure.requests == []
        assert "Could not push the metrics" in untrusted.output and "CERTIFICATE_VERIFY_FAILED" in untrusted.output
        trusted = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": secure.url,
                                   "REQUESTS_CA_BUNDLE": str(certificate / "ca.pem")})
        assert trusted.returncode == 0 and "Could not push" not in trusted.output
        assert [request[1] for request in secure.requests] == [group]
        assert parse_metrics(secure.requests[0][3].decode(), label)["metering_run_exit_status", ""] == 0

    wrong = harness.run(env={**env, "METRICS_PUSHGATEWAY_URL": "pushgateway:9091"})
    assert wrong.returncode == 2 and "METRICS_PUSHGATEWAY_URL" in wrong.output


def test_each_deployment_has_a_pushgateway_group_of_its_own():
    import metering_processor as mp

    def group(target: str) -> str:
        encoded = target.rsplit("/", 1)[1]
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()

    for state in ("/opt/metering/metering_state.json", "s3://state-bucket/exporter/metering_state.json",
                  "/srv/ünïcode +state?/a.json", "s"):
        for url in ("http://pg:9091", "http://pg:9091/", "https://pg/prefix/"):
            target = mp.pushgateway_target(url, state)
            assert target.startswith(url.rstrip("/") + "/metrics/job/metering_exporter/deployment@base64/")
            assert re.fullmatch(r"[A-Za-z0-9_-]+", target.rsplit("/", 1)[1]), "URL-safe base64, no padding"
            assert group(target) == state
    assert mp.pushgateway_target("http://pg", "/a/state.json") != mp.pushgateway_target("http://pg", "/b/state.json")
    assert mp.deployment_name("s3://bucket/key.json") == "s3://bucket/key.json"
    assert mp.deployment_name("./metering_state.json") == os.path.realpath("metering_state.json")


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
            assert "pushgateway-password" not in result.output
        # Refused at start-up: never contacted, with or without its password.
        assert gateway.requests == [] and elsewhere.requests == []
        # Another variable being the bad one: the checked URL still gets the exit status.
        result = harness.run(env={"START_HOUR": iso(hours[0]), "METRICS_PUSHGATEWAY_URL": gateway.url,
                                  "CLAZAR_BATCH_SIZE": "0"})
        assert result.returncode == 2
        [(method, _, _, body)] = gateway.requests
        assert method == "PUT" and parse_metrics(body.decode(), state_label(harness))["metering_run_exit_status", ""] == 2


class Listener:
    """A loopback TCP listener standing in for a proxy on another host: it accepts every
    connection, keeps whatever arrives, and closes it."""

    def __init__(self, host: str = "127.0.0.2"):
        self.socket = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.connections = 0
        self.received = b""
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                connection.settimeout(0.5)
                try:
                    self.received += connection.recv(65536)
                except OSError:
                    pass

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.socket.close()
        self.thread.join(5)


def test_a_pushgateway_with_credentials_over_plain_http_is_reached_directly_never_through_the_proxy(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    password = "pushgateway-password-7f3a9c"
    with Pushgateway() as gateway, Listener("127.0.0.2") as proxy:
        url = gateway.url.replace("http://", f"http://metrics:{password}@")
        proxies = {name: proxy.url for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                                                "ALL_PROXY")}
        result = harness.run(env={"START_HOUR": iso(hours[0]), "METRICS_PUSHGATEWAY_URL": url, "LOG_LEVEL": "DEBUG",
                                  **proxies})
        assert result.returncode == 0, result.output
        # Plain http carries credentials only straight to loopback: nothing went to the proxy
        # (neither the push, nor S3's signed requests, nor Clazar's secret).
        assert (proxy.connections, proxy.received) == (0, b"")
        [(method, path, headers, _)] = gateway.requests
        assert method == "PUT" and path.startswith("/metrics/job/metering_exporter/deployment@base64/")
        assert headers["Authorization"] == "Basic " + base64.b64encode(f"metrics:{password}".encode()).decode()
        assert len(harness.clazar.accepted_keys()) == 1
        assert password not in result.output
        assert f"Pushed the metrics to {gateway.url}/metrics/job/metering_exporter/deployment@base64/" in result.output


def test_where_a_refused_configuration_publishes_its_exit_status():
    import metering_processor as mp

    environ = {"METRICS_FILE": "/m/metering.prom", "METRICS_PUSHGATEWAY_URL": "https://pg:9091/"}
    assert mp.metrics_targets_despite_error(environ, None) == ("/m/metering.prom", "https://pg:9091")
    assert mp.metrics_targets_despite_error({}, None) == (None, None)
    for dry_run, value in ((True, "false"), (None, "true"), (None, "yes"), (None, "not a flag")):
        assert mp.metrics_targets_despite_error({**environ, "DRY_RUN": value}, dry_run) is None
    for refused in ("http://user:password@pushgateway.example:9091", "http://a:1\\@127.0.0.1/", "pushgateway:9091",
                    "https://pg:99999"):
        assert mp.metrics_targets_despite_error({**environ, "METRICS_PUSHGATEWAY_URL": refused}, None) == \
            ("/m/metering.prom", None)


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


# --- logs ----------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_with_the_hour(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    bad = harness.write_hour(hours[1], {"sub-AAAAAAAAAA": b"[not json"})
    harness.write_marker(hours.final(2))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"})
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.output.splitlines()]
    assert all(set(entry) <= {"time", "level", "message", "hour"} for entry in entries), entries
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]) for entry in entries)
    by_message = {entry["message"]: entry for entry in entries}
    sending = by_message["Sending 1 metering records to Clazar"]
    assert sending["hour"] == iso(hours[0]) and sending["level"] == "INFO"
    assert by_message[f"Processing hour 1/2: {hours[0]:%Y-%m-%d %H}:00:00"]["hour"] == iso(hours[0])
    assert {entry["hour"] for entry in entries if "hour" in entry} == {iso(hours[0])}
    # The bad file fails its hour before it is processed, naming the file (and so the
    # service and the hour).
    errors = [entry["message"] for entry in entries if entry["level"] == "ERROR"]
    assert len(errors) == 2 and errors[0].startswith(f"{bad[0]} is not valid JSON"), errors
    assert errors[1].startswith("Finished: 1 hour(s) processed") and errors[1].endswith(f"; FAILED: {errors[0]}")


def test_hours_sent_past_the_marketplace_window_are_warned_about(harness):
    # SERVICE sells on GCP (a 1-hour window), OTHER on AWS (6 hours). An hour is late when it
    # is past the window of one of the marketplaces its records go to, the strictest first.
    now = current_hour()
    early, aws_only, recent = now - timedelta(hours=5), now - timedelta(hours=4), now - timedelta(hours=1)
    for hour in (early, recent):
        harness.write_hour(hour, {"sub-AAAAAAAAAA": [cpu(hour, "c-1", "sub-AAAAAAAAAA", 2)]})
    for hour in (early, aws_only, recent):
        harness.write_hour(hour, {"sub-CCCCCCCCCC": [other_cpu(hour, "c-9", "sub-CCCCCCCCCC", 3)]}, service=OTHER)
    write_marker(harness.s3, harness.bucket, {KEY: now, OTHER_KEY: now})
    result = harness.run(env={"START_HOUR": iso(early), "SERVICES": f"{KEY}=gcp,{OTHER_KEY}=aws"})
    if current_hour() != now:
        pytest.skip("the hour turned during the run")
    assert result.returncode == 0, result.output
    warnings = [line for line in result.lines("WARNING") if "marketplace" in line]
    # One warning for the deployment's run, however many hours it concerns: how many, and the oldest.
    assert len(warnings) == 1, result.output
    assert (f"WARNING - 1 hour(s) sent past the gcp marketplace's 1-hour window, the oldest "
            f"{early:%Y-%m-%d %H}:00:00, which ended ") in warnings[0]
    assert re.search(r"which ended (4\.\d|5\.0) hours ago: the marketplace may refuse to bill them$", warnings[0])
    assert "; 1 hour(s) sent past the marketplace's window" in result.output
    assert len(harness.clazar.accepted_keys()) == 5, "late hours are still sent"
    assert {record["cloud"] for record in harness.clazar.successes() if record["contract_id"] == "c-1"} == {"gcp"}
    assert {record["cloud"] for record in harness.clazar.successes() if record["contract_id"] == "c-9"} == {"aws"}


# --- settings that are not settings ---------------------------------------------------------------


def test_a_misspelt_setting_and_a_removed_one_are_warned_about_by_name(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0]), "CLAZAR_CLOUDS": "azure", "READ_AHEAD_HOURS": "4"}
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    about_settings = [line.split(" - WARNING - ", 1)[1] for line in result.lines("WARNING")
                      if " a setting" in line]
    assert about_settings == [
        "CLAZAR_CLOUDS is not a setting; did you mean CLAZAR_CLOUD?",
        "READ_AHEAD_HOURS is no longer a setting (2 hours are read ahead (1 when an hour holds 1,000 files or "
        "more)); remove it",
    ], result.output
    # Ignored, as warned: the record went out to the default marketplace.
    assert [record["cloud"] for record in harness.clazar.successes()] == ["aws"]
    # A reading command warns the same, on stderr, away from its report.
    code, _, stderr = run_in_process(["status", "--json"], harness.environment(env), harness.folder, 60, merged=False)
    assert code == 0 and "CLAZAR_CLOUDS is not a setting; did you mean CLAZAR_CLOUD?" in stderr
    # The harness's own variables (AWS_*, PATH, HOME, PYTHONDONTWRITEBYTECODE) draw no warning.
    clean = harness.run(env={"START_HOUR": iso(hours[0])})
    assert clean.returncode == 0 and " a setting" not in clean.output, clean.output


# --- ledger retention -----------------------------------------------------------------------------


def ledger_files(harness) -> dict[str, bytes]:
    """Every file under the ledger, by its name relative to the ledger's folder or prefix."""
    if harness.state_in_s3:
        prefix = harness.state_key.rpartition("/")[0] + "/metering_ledger/"
        found = {}
        for page in harness.s3.get_paginator("list_objects_v2").paginate(Bucket=harness.state_bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                found[item["Key"][len(prefix):]] = harness.s3.get_object(
                    Bucket=harness.state_bucket, Key=item["Key"])["Body"].read()
        return found
    root = harness.state_path.parent / "metering_ledger"
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_ledger_retention_deletes_only_the_ledgers_own_files(backend_harness, hours):
    harness = backend_harness
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 0
    current = ledger_files(harness)
    [(current_name, current_body)] = current.items()
    [line] = [json.loads(text) for text in current_body.decode().splitlines()]

    def old_ledger_file(hour: str) -> bytes:
        return (json.dumps({**line, "hour": hour}, sort_keys=True) + "\n").encode()

    old = {"2019-04-30/2019-04-30T05.jsonl": old_ledger_file("2019-04-30T05:00:00Z"),
           "2019-05-01/2019-05-01T00.jsonl": old_ledger_file("2019-05-01T00:00:00Z")}
    # LEDGER_PATH may be a folder shared with other data: none of this is the ledger's.
    foreign = {"2019-05-01/invoices/2019-05-01-0001.pdf": b"%PDF-1.4 an invoice",
               "2019-05-01/notes.txt": b"kept by someone else\n",
               # Named like a ledger file, but not ledger lines.
               "2019-05-01/2019-05-01T07.jsonl": b'{"invoice": 7}\n'}
    put_ledger_files(harness, {**old, **foreign})

    result = harness.run(env=env)  # nothing is due; retention runs at the end
    assert result.returncode == 0, result.output
    assert ledger_files(harness) == {current_name: current_body, **foreign}
    assert "INFO - Deleted 2 ledger file(s) older than 400 days" in result.output
    warnings = [warning for warning in result.lines("WARNING") if "ledger" in warning]
    assert len(warnings) == 1, result.output
    assert warnings[0].endswith("that this exporter did not write: '2019-05-01/2019-05-01T07.jsonl', "
                                "'2019-05-01/invoices', '2019-05-01/notes.txt'"), warnings[0]
    assert "Left 3 item(s) in old ledger day folders of " in warnings[0]
    if not harness.state_in_s3:
        root = harness.state_path.parent / "metering_ledger"
        assert not (root / "2019-04-30").exists(), "a day folder left empty is removed"
        assert (root / "2019-05-01" / "invoices").is_dir()


# --- secrets ---------------------------------------------------------------------------------------

# As AWS issues them (a '/' and '=' padding among letters and digits), and as a Kubernetes
# secret mounted into the environment often has them: with a trailing newline.
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEPz7a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0/uVwXyZ0123456789AbCdEf=="
SECRET_KEY = "wJalrXUtnFEMI/K7MDENGbPxRfiCYzq8Lm0Vt3Xs"


def leaks(text: str | bytes, *secrets: str) -> list[str]:
    """The fragments of ``secrets`` found in ``text``: every run of ten letters and digits
    they contain, so that a secret shown whole, in part, or in any escaped form (JSON,
    URL, Python repr) is found."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    found = []
    for secret in secrets:
        for run in re.findall(r"[A-Za-z0-9]{10,}", secret):
            found += [run[i:i + 10] for i in range(len(run) - 9) if run[i:i + 10] in text]
    return found


class S3StandIn:
    """A loopback S3 (path-style, as botocore addresses an IP endpoint) serving ``objects``
    of one bucket: GetObject and ListObjectsV2. A key in ``echoed`` is answered 403 with the
    request's headers in the error's message (the session token among them), and with
    ``known``, what such a store holds of the account (its secret key)."""

    def __init__(self, objects: dict[str, bytes], echoed: set[str], known: str = ""):
        self.objects, self.echoed, self.known = objects, echoed, known
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, code: int, body: bytes, content_type: str = "application/xml") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if code == 200 and content_type != "application/xml":
                    self.send_header("ETag", '"' + format(abs(hash(body)), "x") + '"')
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, code: int, name: str, message: str) -> None:
                self._answer(code, f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{name}</Code><Message>"
                                   f"{xml_escape(message)}</Message></Error>".encode())

            def do_GET(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urlsplit(self.path)
                _, _, key = unquote(parts.path).lstrip("/").partition("/")
                stand_in.requests.append(key)
                query = parse_qs(parts.query)
                if key in stand_in.echoed:
                    headers = "; ".join(f"{name}: {value}" for name, value in self.headers.items())
                    return self._error(403, "AccessDenied", f"Access Denied. Request headers: {headers}. "
                                                            f"Credentials on file: {stand_in.known}")
                if not key and "list-type" in query:
                    prefix = query.get("prefix", [""])[0]
                    contents = "".join(f"<Contents><Key>{xml_escape(name)}</Key><Size>{len(body)}</Size>"
                                       f"<ETag>\"{len(body)}\"</ETag></Contents>"
                                       for name, body in sorted(stand_in.objects.items()) if name.startswith(prefix))
                    return self._answer(200, ("<?xml version='1.0' encoding='UTF-8'?><ListBucketResult><Name>b</Name>"
                                              f"<Prefix>{xml_escape(prefix)}</Prefix><IsTruncated>false</IsTruncated>"
                                              f"{contents}</ListBucketResult>").encode())
                if key in stand_in.objects:
                    return self._answer(200, stand_in.objects[key], "application/octet-stream")
                self._error(404, "NoSuchKey", "The specified key does not exist.")

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> S3StandIn:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def everything_written(harness, result, env, metrics: Path) -> dict[str, str | bytes]:
    """Every place text leaves a run: its log, the state, the ledger, status (text and JSON)
    and the metrics."""
    places: dict[str, str | bytes] = {"log": result.output, "state": harness.state_bytes() or b"",
                                      "metrics": metrics.read_bytes()}
    places.update({f"ledger {name}": body for name, body in ledger_files(harness).items()})
    for arguments in (("status",), ("status", "--json")):
        shown = harness.run(*arguments, env=env)
        assert shown.returncode == 0, shown.output
        places[" ".join(arguments)] = shown.output
    return places


def test_aws_secrets_with_a_trailing_newline_appear_nowhere_even_when_an_error_carries_them(harness, hours, tmp_path):
    metrics = tmp_path / "metering.prom"
    export = {MARKER_KEY: json.dumps({KEY: {"last_processed_to": iso(hours.final(2) - timedelta(seconds=1))}}).encode()}
    first = hour_prefix(SERVICE, hours[0]) + "sub-AAAAAAAAAA.json"
    second = hour_prefix(SERVICE, hours[1]) + "sub-AAAAAAAAAA.json"
    export[first] = json.dumps([cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]).encode()
    export[second] = json.dumps([cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 2)]).encode()
    # Clazar turns the record down with a message that quotes the credentials back.
    harness.clazar.rejected_contracts["c-1"] = f"contract suspended; caller token {SESSION_TOKEN}, key {SECRET_KEY}"
    with S3StandIn(export, echoed={second}, known=SECRET_KEY) as s3:
        base = {"START_HOUR": iso(hours[0]), "AWS_ENDPOINT_URL_S3": s3.endpoint, "LOG_LEVEL": "DEBUG",
                "METRICS_FILE": str(metrics), "AWS_SECRET_ACCESS_KEY": SECRET_KEY + "\n"}

        # The token as a Kubernetes secret mounts it, newline and all, and without: either way
        # it is used trimmed and reaches S3, which echoes it back in a 403 for the second
        # hour's file (and the secret key it holds); Clazar's answer for the first hour quotes
        # both, and lands in the ledger.
        for token in (SESSION_TOKEN + "\n", SESSION_TOKEN):
            env = {**base, "AWS_SESSION_TOKEN": token}
            result = harness.run(env=env)
            assert result.returncode == 1, result.output
            assert second in s3.requests and f"cannot read s3://{harness.bucket}/{second}" in result.output
            assert harness.clazar.metering_calls == 1 and len(waiting(harness)) == 1
            places = everything_written(harness, result, env, metrics)
            assert any("[redacted]" in body.decode() for place, body in places.items() if place.startswith("ledger"))
            assert "[redacted]" in places["log"] and "[redacted]" in places["state"].decode()
            assert {place: leaks(text, SESSION_TOKEN, SECRET_KEY) for place, text in places.items()} == \
                {place: [] for place in places}


# --- help and version ----------------------------------------------------------------------------


def test_help_lists_every_setting_and_command_and_the_version(harness):
    import metering_processor as mp

    result = harness.run("--help")
    assert result.returncode == 0
    for setting in mp.SETTINGS:
        assert re.search(rf"^  {re.escape(setting.name)} .*\[{re.escape(setting.shown_default())}", result.output, re.M), \
            setting.name
    for removed in mp.REMOVED_SETTINGS:
        assert removed not in result.output
    for command in ("run", "status", "retry-failed", "reconcile", "conflicts", "history"):
        assert re.search(rf"^    {command}( |$)", result.output, re.M), command
    version = harness.run("--version")
    assert version.returncode == 0 and version.output == f"metering_processor.py {mp.__version__}\n"


# --- the operator commands as the docs show them, and the demo -------------------------------------

# How the docs start the program: from a clone's virtual environment, or installed (pipx).
PROGRAM = r"(?:\.venv/bin/python3? metering_processor\.py|python3 metering_processor\.py|(?:\.venv/bin/)?metering-processor)"


def documented_commands() -> list[str]:
    """Every command line of the README's and docs' code blocks that runs the program (a
    variable assignment before it allowed), its comment left out."""
    commands = []
    for text in (README, *DOCS.values()):
        language = None  # outside a code block
        for line in text.splitlines():
            fence = re.match(r" *```(\w*)", line)
            if fence:
                language = fence.group(1) if language is None else None
                continue
            line = line.split("  #")[0].strip()
            if language in ("bash", "sh", "shell", "") and re.match(rf"(?:[A-Z_]+=\S+ )*{PROGRAM}(?: |$)", line):
                commands.append(line)
    return list(dict.fromkeys(commands))


def filled_in_example(values: dict[str, str]) -> str:
    """config.env.example with each of ``values`` set (shell-quoted, as cron's shell reads
    it): on its own line, switched on if commented out, appended if not mentioned."""
    lines = (ROOT / "config.env.example").read_text().splitlines()
    for name, value in values.items():
        assignment = f"{name}={shlex.quote(value)}"
        index = next((i for i, line in enumerate(lines) if re.match(rf"#?{name}=", line)), None)
        if index is None:
            lines.append(assignment)
        else:
            lines[index] = assignment
    return "\n".join(lines) + "\n"


def test_the_documented_operator_commands_work_as_written_with_config_env_loaded(harness, hours, tmp_path):
    """Each command the README and the docs show an operator, run by /bin/sh in a folder laid
    out as the cron recipe's (config.env from the example, the secret in the file it names,
    .venv, the script), after the README's own line that loads the config."""
    section = README.split("## Operating it", 1)[1]
    load = re.search(r"^cd /opt/metering && set -a && \. \./config\.env && set \+a", section, re.M)
    assert load, "the README shows how to load config.env before the commands"
    commands = documented_commands()
    shown = {match.group(1) for command in commands
             for match in [re.search(rf"{PROGRAM} (?:--dry-run )?([a-z-]+)", command)] if match}
    assert shown >= {"status", "history", "reconcile", "retry-failed", "conflicts"}, commands
    assert any(re.search(rf"{PROGRAM} --dry-run$", command) for command in commands)

    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": pod_records(SERVICE, hours[0], contract="c-1",
                                                               subscription="sub-AAAAAAAAAA")})
    harness.write_marker(hours.final(1))
    checkout = tmp_path / "checkout"
    bin_folder = checkout / ".venv" / "bin"
    bin_folder.mkdir(parents=True)
    (bin_folder / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    # The console script, as pip writes it.
    (bin_folder / "metering-processor").write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from metering_processor import script\nscript()\n")
    for program in bin_folder.iterdir():
        program.chmod(0o755)
    (checkout / "metering_processor.py").symlink_to(ROOT / "metering_processor.py")
    # config.env.example as an operator fills it in: the example's own settings (its formulas,
    # CLAZAR_CLIENT_SECRET_FILE=./clazar_client_secret), and what reaches this machine's S3 and Clazar.
    connection = {name: harness.env[name] for name in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "S3_BUCKET_NAME", "CLAZAR_CLIENT_ID",
        "CLAZAR_API_URL", "CLAZAR_TIMEOUT_SECONDS")}
    config = filled_in_example({**connection, "SERVICES": f"{KEY}=aws", "START_HOUR": iso(hours[0])})
    assert "\nCLAZAR_CLIENT_SECRET_FILE=./clazar_client_secret\n" in config
    assert "\nCLAZAR_CLIENT_SECRET=" not in config, "the example never holds the secret"
    (checkout / "config.env").write_text(config)
    (checkout / "config.env").chmod(0o600)
    (checkout / "clazar_client_secret").write_text(CLIENT_SECRET + "\n")
    (checkout / "clazar_client_secret").chmod(0o600)
    prefix = load.group(0).replace("/opt/metering", shlex.quote(str(checkout)))

    def sh(command):
        # PATH as after `pipx install .`: the console script on it.
        return subprocess.run(["/bin/sh", "-c", f"{prefix} && {command}"], capture_output=True, text=True,
                              timeout=120, env={"PATH": f"{bin_folder}:/usr/bin:/bin", "HOME": str(checkout)})

    # The documented first run comes last; before it (reconcile then has no processed hour to
    # re-read, which keeps this quick), every other command.
    runs = [command for command in commands if re.match(rf"{PROGRAM}(?: &&|$)", command)]
    assert runs, "the README shows the first run"
    for command in [command for command in commands if command not in runs]:
        result = sh(command)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        assert "configuration error" not in result.stderr
        # The example, filled in, sets settings only.
        assert " a setting" not in result.stdout + result.stderr, f"{command}: {result.stdout}{result.stderr}"
    assert harness.clazar.accepted_keys() == set()
    assert not (checkout / "metering_state.json").exists(), "the commands before the first run wrote no state"
    for program in (".venv/bin/python metering_processor.py", ".venv/bin/metering-processor", "metering-processor"):
        version = sh(f"{program} --version")
        assert version.returncode == 0 and version.stdout.endswith(" 2.0.0\n"), version
    exported = sh(runs[0])
    assert exported.returncode == 0, exported.stdout + exported.stderr
    # The example's formulas bill one ordinary pod-hour within the AWS record limit.
    assert harness.clazar.accepted_quantities() == {("c-1", dimension, iso(hours[0])): quantity for dimension, quantity in (
        ("cpu_core_hours", 2), ("memory_gib_hours", 2), ("storage_allocated_gib_hours", 10), ("replica_hours", 1))}
    assert (checkout / "metering_state.json").exists()
    after = sh(".venv/bin/python metering_processor.py status")
    assert f"State {checkout / 'metering_state.json'}\n" in after.stdout
    assert f"last processed hour:   {iso(hours[0])}" in after.stdout
    assert CLIENT_SECRET not in exported.stdout + exported.stderr + after.stdout


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


def test_status_names_the_state_by_its_absolute_path_from_any_folder(harness, hours, tmp_path):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0]), "STATE_FILE_PATH": "./metering_state.json"}
    assert harness.run(env=env).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for folder, last in ((harness.folder, iso(hours[0])), (elsewhere, "none")):
        text = subprocess.run(harness.command("status"), cwd=folder, capture_output=True, text=True, timeout=120,
                              env={**harness.env, **env})
        assert text.returncode == 0, text.stderr
        # Run from the wrong folder, it shows where it looked, and that nothing is there.
        assert text.stdout.splitlines()[:2] == [f"State {folder / 'metering_state.json'}",
                                                f"  last processed hour:   {last}"], text.stdout
        as_json = subprocess.run(harness.command("status", "--json"), cwd=folder, capture_output=True, text=True,
                                 timeout=120, env={**harness.env, **env})
        assert json.loads(as_json.stdout)["state"] == str(folder / "metering_state.json")


@pytest.mark.slow
def test_the_demo_fits_a_screen_and_warns_only_where_it_means_to():
    began = current_hour()
    result = subprocess.run([sys.executable, str(ROOT / "demo" / "run_demo.py")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    turned = current_hour() != began
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) <= 60, result.stdout
    assert " - ERROR - " not in result.stdout
    # What it means to show: the first run of a new deployment says it found no state and
    # where it looked (once, for the deployment), one subscription without a marketplace payer
    # is never billed, and a day caught up at once is partly past AWS's 6-hour window (hours
    # with Azure records too: the strictest marketplace of an hour decides).
    warnings = [line.split(" - WARNING - ")[1] for line in lines if " - WARNING - " in line]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("No previous processing found, starting from ")
    assert "have no externalPayerId or dimension" in warnings[1] and warnings[1].endswith(": sub-Vx00000002")
    late = re.match(r"(\d+) hour\(s\) sent past the aws marketplace's 6-hour window", warnings[2])
    assert late and int(late.group(1)) in ({18, 19} if turned else {18}), warnings[2]
    # One deployment on two marketplaces: status shows it, then each plan with its marketplace.
    assert "Postgres:PROD:pt-HJSv20iWX0 (aws)" in lines and "Acme Vector DB:PROD:pt-Q7rT2bX9kL (azure)" in lines
    assert "288 records accepted" in result.stdout
