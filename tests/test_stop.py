"""A clean stop: SIGTERM or SIGINT at several moments of a run, then a rerun started at once.

After a stop the run must have sent nothing new, committed nothing in part, left a
pending hour pending, written its metrics, released its lock or deleted its S3
lease, and exited 5; the rerun must complete every hour with each (contract,
dimension, hour) accepted exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import subprocess
import time
from pathlib import Path

import metering_processor as mp
import pytest
from clazar_standin import call
from conftest import SERVICE, fabricate_rejected, five_records_in_three_batches
from export_data import iso, service_key
from servers import TCPProxy
from test_operations import parse_metrics

KEY = service_key(SERVICE)
STOPPED = 5
# STOP_TIMEOUT_SECONDS of these runs, shorter than the default 10: a batch in flight gets half
# of it to be answered, and the watchdog ends a run still going after four fifths of it.
STOP_TIMEOUT = 4


def settings(harness, hours, metrics: Path) -> dict:
    # One request at a time, so "no further batch after the stop" can be seen.
    return {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2", "CLAZAR_CONCURRENCY": "1",
            "STATE_LOCK_TTL_SECONDS": "900", "METRICS_FILE": str(metrics),
            "STOP_TIMEOUT_SECONDS": str(STOP_TIMEOUT)}


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
    # Only a commit writes an hour's ledger file, but for the batches of the pending hour
    # that were answered: their lines (record ids, conflicts) are kept for its resend.
    assert all(line["hour"] == pending_hour and line["kind"] == "record" for line in harness.ledger_lines()), \
        "the ledger holds nothing but the pending hour's answered batches"
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


# Clazar holds the first batch's answer this long after the stop: within the grace (half the
# stop timeout), or past it.
@pytest.mark.parametrize("answer_after", [1.0, 0.8 * STOP_TIMEOUT],
                         ids=["answered-within-the-grace", "answered-too-late"])
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
    if answer_after < STOP_TIMEOUT / 2:
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


# --- a stop that S3 or Clazar holds up ----------------------------------------------------------


@contextlib.contextmanager
def silent_s3():
    """An S3 endpoint that takes requests and never answers: a proxy to a socket that listens
    but never accepts (the kernel completes the connections; nobody reads them)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    proxy = TCPProxy(silent.getsockname()[1])
    try:
        yield proxy
    finally:
        proxy.close()
        silent.close()


def assert_ended_by_the_watchdog(output: str, returncode: int, metrics: Path) -> None:
    assert returncode == STOPPED, output
    # Four fifths of STOP_TIMEOUT_SECONDS, not of the default 10 s: the setting is followed.
    assert f"received, but the run had not stopped {0.8 * STOP_TIMEOUT:.0f} s later" in output
    assert "lapses by itself" in output
    assert parse_metrics(metrics.read_text())["metering_run_exit_status", ""] == STOPPED


@pytest.mark.parametrize("state", ["local-state", "s3-state"])
def test_a_stop_while_s3_hangs_ends_the_run_within_seconds(harness, tmp_path, state):
    metrics = tmp_path / "metering.prom"
    with silent_s3() as hanging:
        env = {"AWS_ENDPOINT_URL_S3": hanging.endpoint, "METRICS_FILE": str(metrics),
               "STOP_TIMEOUT_SECONDS": str(STOP_TIMEOUT)}
        if state == "s3-state":
            env["STATE_FILE_PATH"] = "s3://state-bucket/exporter/metering_state.json"
        process = harness.popen(env=env)
        deadline = time.monotonic() + 30
        while not hanging.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hanging.requests, "the run reached S3"
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        # The README: "stops the run within seconds", within STOP_TIMEOUT_SECONDS. Allow twice
        # that; boto3 alone would wait 60 s per attempt, four attempts.
        try:
            output, _ = process.communicate(timeout=2 * STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"still running {2 * STOP_TIMEOUT} s after SIGTERM:\n" + output)
    assert_ended_by_the_watchdog(output, process.returncode, metrics)


@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_stop_while_a_state_write_hangs_ends_the_run_and_the_rerun_completes_exactly_once(
        backend_harness, hours, tmp_path, moment):
    """The store stops answering the write that records hour 0 as pending, before it lands or
    after (the answer lost): the watchdog ends the run, and the state holds the document before
    that write or after it, whole, never a part."""
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    metrics = tmp_path / "metering.prom"
    env = settings(harness, hours, metrics)
    # State writes: 1 pins the service's first hour, 2 records hour 0 as pending.
    result = harness.run(env=env, faults={f"FAULT_HANG_{moment.upper()}_STATE_WRITE": "2"}, timeout=60)
    assert_ended_by_the_watchdog(result.output, result.returncode, metrics)
    assert harness.clazar.metering_calls == 0
    entry = harness.state()[KEY]
    assert "last_processed_hour" not in entry
    assert (entry.get("pending_hour") or {}).get("hour") == (iso(hours[0]) if moment == "after" else None)
    assert ledger_files(harness) == []
    if harness.state_in_s3:
        # The lease is left behind and lapses by itself (STATE_LOCK_TTL_SECONDS); made to lapse now.
        harness.expire_lease()
    rerun = harness.run(env=env)
    assert rerun.returncode == 0, rerun.output
    assert harness.clazar.accepted_quantities() == expected
    assert len(harness.clazar.successes()) == len(expected), "each (contract, dimension, hour) accepted once"
    assert harness.clazar.violations == []
    assert harness.entry()["last_processed_hour"] == iso(hours[1])
    assert not lease_exists(harness)


# --- Ctrl-C in the commands that only read ------------------------------------------------------


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
    assert "SIGINT received: stopped before hour" in text
    assert text.count("Dry run: would resend") < len(many), "it listed every hour after Ctrl-C"


@pytest.fixture
def stop_requested(monkeypatch):
    """A stop already asked for, as after Ctrl-C, in this process only."""
    stop = mp.StopRequest()
    stop.request("SIGINT")
    monkeypatch.setattr(mp, "STOP", stop)


@pytest.mark.parametrize("command", ["retry-failed --dry-run", "conflicts", "conflicts --clear", "history",
                                     "reconcile", "status"])
def test_every_loop_of_the_operators_commands_stops_on_request(s3, bucket, tmp_path, hours, stop_requested, command):
    """Each command's loop over services, hours or ledger files looks at the stop before each step."""
    state_path = tmp_path / "metering_state.json"
    fabricate_rejected(state_path, KEY, [hours[0]], ["c-1"])
    store = mp.LocalStateStore(str(state_path))
    book = mp.StateBook(store)
    state = dataclasses.replace(book.service(KEY), last_processed_hour=hours[0])
    book.save(KEY, state.with_waiting(hours[0], {mp.REJECTED: 1, mp.CONFLICT: 1}))
    config = mp.load_config({"S3_BUCKET_NAME": bucket, "SERVICE_NAME": SERVICE[0], "ENVIRONMENT_TYPE": SERVICE[1],
                             "PLAN_ID": SERVICE[2], "STATE_FILE_PATH": str(state_path), "DRY_RUN": "true"})
    ledger = mp.Ledger(mp.LocalLedgerStorage(config.ledger_path))
    before = state_path.read_bytes()
    with pytest.raises(mp.RunStopped, match="SIGINT received: stopped"):
        if command == "retry-failed --dry-run":
            mp.retry_failed(config, book, ledger, None, None, None)
        elif command == "conflicts":
            mp.list_waiting(config, book, ledger, mp.CONFLICT, None, None)
        elif command == "conflicts --clear":
            mp.clear_conflicts(config, book, ledger, None, None)
        elif command == "history":
            list(ledger.lines(KEY, hours[0], hours[0]))
        elif command == "reconcile":
            source = mp.ExportSource(s3, bucket, 1)
            try:
                mp.reconcile(config, mp.Exporter(config, source, None, book, ledger), hours[0], hours[0])
            finally:
                source.close()
        else:
            mp.show_status(config, s3, store, as_json=True)
    assert state_path.read_bytes() == before
