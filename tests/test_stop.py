"""A clean stop: SIGTERM or SIGINT at several moments of a run, then a rerun started at once.

After a stop the run must have sent nothing new, committed nothing in part, left a
pending hour pending, written its metrics, released its lock or deleted its S3
lease, and exited 5; the rerun must complete every hour with each (contract,
dimension, hour) accepted exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from clazar_standin import call
from conftest import SERVICE, five_records_in_three_batches
from export_data import iso, service_key
from test_operations import parse_metrics

KEY = service_key(SERVICE)
STOPPED = 5


def settings(harness, hours, metrics: Path) -> dict:
    # One request at a time, so "no further batch after the stop" can be seen.
    return {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2", "CLAZAR_CONCURRENCY": "1",
            "STATE_LOCK_TTL_SECONDS": "900", "METRICS_FILE": str(metrics)}


def ledger_files(harness) -> list[str]:
    if harness.state_in_s3:
        listing = harness.s3.list_objects_v2(Bucket=harness.state_bucket, Prefix="exporter/metering_ledger/")
        return [item["Key"] for item in listing.get("Contents", [])]
    folder = harness.state_path.parent / "metering_ledger"
    return [str(path) for path in folder.rglob("*.jsonl")] if folder.exists() else []


def lease_exists(harness) -> bool:
    if harness.state_in_s3:
        return harness.state_bytes(harness.state_key + ".lock") is not None
    return False


def assert_stopped_cleanly(harness, result, metrics: Path, pending_hour: str | None) -> None:
    assert result.returncode == STOPPED, result.output
    assert "SIGTERM received: stopped" in result.output or "SIGINT received: stopped" in result.output
    assert "the lock is released" in result.output
    assert not lease_exists(harness), "the S3 lease was deleted"
    entry = harness.state().get(KEY, {})
    assert "last_processed_hour" not in entry, "no hour was committed"
    assert (entry.get("pending_hour") or {}).get("hour") == pending_hour
    assert ledger_files(harness) == [], "the ledger is written only with a commit"
    written = parse_metrics(metrics.read_text())
    assert written["metering_run_exit_status", ""] == STOPPED
    assert written["metering_service_up", KEY] == 0
    assert written["metering_pending_hour", KEY] == (1 if pending_hour else 0)


def assert_rerun_completes_exactly_once(harness, env, expected, hours) -> None:
    rerun = harness.run(env=env)
    assert rerun.returncode == 0, rerun.output
    assert "Took over the lease" not in rerun.output
    assert harness.clazar.accepted_quantities() == expected
    assert len(harness.clazar.successes()) == len(expected), "each (contract, dimension, hour) accepted once"
    assert harness.clazar.violations == []
    assert harness.entry()["last_processed_hour"] == iso(hours[1])
    assert "pending_hour" not in harness.entry()
    assert not lease_exists(harness)


def test_a_stop_while_reading_sends_nothing_and_records_nothing(backend_harness, hours, tmp_path):
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    result = harness.run(env=env, faults={"FAULT_SIGNAL_ON_READ": "1"})
    assert_stopped_cleanly(harness, result, tmp_path / "metering.prom", pending_hour=None)
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert_rerun_completes_exactly_once(harness, env, expected, hours)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_once_the_hour_is_pending_sends_nothing_and_leaves_it_pending(backend_harness, hours, tmp_path,
                                                                             signal_name):
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    # State writes: 1 pins the service's first hour, 2 records hour 0 as pending.
    result = harness.run(env=env, faults={"FAULT_SIGNAL_AFTER_STATE_WRITE": "2", "FAULT_SIGNAL": signal_name})
    assert_stopped_cleanly(harness, result, tmp_path / "metering.prom", pending_hour=iso(hours[0]))
    assert f"{signal_name} received: stopped before sending" in result.output
    assert harness.clazar.metering_calls == 0
    assert_rerun_completes_exactly_once(harness, env, expected, hours)


@pytest.mark.parametrize("answer_after", [1.0, 8.0], ids=["answered-within-the-grace", "answered-too-late"])
def test_a_stop_while_a_batch_is_in_flight_sends_no_further_batch(backend_harness, hours, tmp_path, answer_after):
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    process: list[subprocess.Popen] = []
    answered = []

    def stop_while_in_flight(records):
        # The first batch has landed in Clazar; its answer is held while the run is told to stop.
        process[0].send_signal(signal.SIGTERM)
        time.sleep(answer_after)
        answered.append(records)

    harness.clazar.faults.append(call(stop_while_in_flight))
    process.append(harness.popen(env=env))
    output, _ = process[0].communicate(timeout=120)
    result = type("Result", (), {"returncode": process[0].returncode, "output": output})
    assert_stopped_cleanly(harness, result, tmp_path / "metering.prom", pending_hour=iso(hours[0]))
    assert harness.clazar.metering_calls == 1, "no batch was sent after the stop"
    assert len(harness.clazar.accepted_keys()) == 2
    if answer_after < 5:
        assert "stopped while sending" in output
    while not answered:  # the held answer goes out (to a run that is gone, when too late)
        time.sleep(0.1)
    assert_rerun_completes_exactly_once(harness, env, expected, hours)
    assert harness.clazar.outcomes().count("duplicate") == 2, "the landed batch came back as already there"


def test_a_stop_between_hours_keeps_the_hour_committed_and_the_next_untouched(harness, hours, tmp_path):
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    # The third state write commits hour 0 (after the first hour's pin and its pending record);
    # the stop comes before hour 1 is recorded.
    result = harness.run(env=env, faults={"FAULT_SIGNAL_AFTER_STATE_WRITE": "3"})
    assert result.returncode == STOPPED, result.output
    assert harness.entry()["last_processed_hour"] == iso(hours[0])
    assert "pending_hour" not in harness.entry()
    assert harness.clazar.metering_calls == 3
    assert parse_metrics((tmp_path / "metering.prom").read_text())["metering_run_hours_processed", KEY] == 1
    assert_rerun_completes_exactly_once(harness, env, expected, hours)


def test_a_stop_works_when_the_exporter_is_pid_1(harness, hours, tmp_path):
    """In a container the exporter is PID 1, and the kernel drops a signal PID 1 has no handler for."""
    wrapper = ("unshare", "--pid", "--fork")
    probe = subprocess.run([*wrapper, "/bin/sh", "-c", "echo $$"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot start a process as PID 1 of a new PID namespace here: {probe.stderr.strip()}")
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    result = harness.run(env=env, faults={"FAULT_SIGNAL_AFTER_STATE_WRITE": "2"}, wrapper=wrapper)
    assert_stopped_cleanly(harness, result, tmp_path / "metering.prom", pending_hour=iso(hours[0]))
    assert harness.clazar.metering_calls == 0
    assert_rerun_completes_exactly_once(harness, env, expected, hours)
