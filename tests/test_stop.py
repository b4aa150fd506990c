"""A clean stop: SIGTERM or SIGINT at several moments of a run, then a rerun started at once.

After a stop the run must have sent nothing new, committed nothing in part, left a
pending hour pending (with the answers its batches got in the ledger, and each other
record's fate), written its metrics, released its lock or deleted its S3 lease, and
exited 5; the rerun must complete every hour with each (contract, dimension, hour)
accepted exactly once. The runs that are signalled are subprocesses started as the
program is (``python3 metering_processor.py``: script(), which ends the process at
once after a stop); main() itself returns after a stop, which an in-process run checks.
A run's own deadline, RUN_TIMEOUT_MINUTES, stops it at a safe point too, as a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import metering_processor as mp
import pytest
from clazar_standin import call
from conftest import SERVICE, Result, cpu, fabricate_waiting, five_records_in_three_batches, metric_value
from export_data import iso, service_key
from servers import TCPProxy

KEY = service_key(SERVICE)
STOPPED = 5
# STOP_TIMEOUT_SECONDS of these runs, shorter than the default 10: batches in flight get half
# of it to be answered, and the watchdog ends a run still going after four fifths of it.
STOP_TIMEOUT = 4


def settings(harness, hours, metrics: Path, stop_timeout: float = STOP_TIMEOUT) -> dict:
    return {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2", "METRICS_FILE": str(metrics),
            "STOP_TIMEOUT_SECONDS": str(stop_timeout)}


def deployment(harness) -> dict:
    state = harness.state()
    return state["deployment"] if state else {}


def ledger_files(harness) -> list[str]:
    if harness.state_in_s3:
        listing = harness.s3.list_objects_v2(Bucket=harness.state_bucket, Prefix="exporter/metering_ledger/")
        return [item["Key"] for item in listing.get("Contents", [])]
    folder = harness.state_path.parent / "metering_ledger"
    return [str(path) for path in folder.rglob("*.jsonl")] if folder.exists() else []


def fates(harness) -> dict:
    """{contract and dimension: the latest outcome in the ledger}."""
    return {(line["contract_id"], line["dimension"]): line["outcome"] for line in harness.ledger_lines()
            if line["kind"] == "record"}


def lease_exists(harness) -> bool:
    if harness.state_in_s3:
        return harness.state_bytes(harness.state_key + ".lock") is not None
    return False


def assert_stopped_cleanly(harness, result, metrics: Path, pending_hour: str | None) -> None:
    assert result.returncode == STOPPED, result.output
    assert "SIGTERM received: stopped" in result.output or "SIGINT received: stopped" in result.output
    assert "the lock is released" in result.output
    assert "had not stopped" not in result.output, "the run stopped by itself, not by the watchdog"
    assert not lease_exists(harness), "the S3 lease was deleted"
    assert "last_processed_hour" not in harness.state().get(KEY, {}), "no hour was committed"
    assert "last_processed_hour" not in deployment(harness)
    assert (deployment(harness).get("pending_hour") or {}).get("hour") == pending_hour
    # Only a commit writes an hour's ledger file whole, but a stop while sending writes the
    # pending hour's lines: the answers its batches got, and each other record's fate.
    assert all(line["hour"] == pending_hour and line["kind"] == "record" for line in harness.ledger_lines()), \
        "the ledger holds nothing but the pending hour's lines"
    written = metrics.read_text()
    assert metric_value(written, "metering_run_exit_status") == STOPPED
    assert metric_value(written, "metering_run_hours_processed") == 0
    assert metric_value(written, "metering_pending_hour") == (1 if pending_hour else 0)


def assert_rerun_completes_exactly_once(harness, env, expected, hours) -> Result:
    rerun = harness.run(env=env)
    assert rerun.returncode == 0, rerun.output
    assert "Took over the lease" not in rerun.output
    assert harness.clazar.accepted_quantities() == expected
    assert len(harness.clazar.successes()) == len(expected), "each (contract, dimension, hour) accepted once"
    assert harness.clazar.violations == []
    assert harness.entry()["last_processed_hour"] == deployment(harness)["last_processed_hour"] == iso(hours[1])
    assert "pending_hour" not in deployment(harness)
    assert set(fates(harness).values()) <= {"delivered", "already delivered"}
    assert not lease_exists(harness)
    return rerun


def test_a_stop_while_reading_sends_nothing_and_records_nothing(backend_harness, hours, tmp_path):
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    result = harness.run(env=env, faults={"FAULT_SIGNAL_ON_READ": "1"})
    assert_stopped_cleanly(harness, result, tmp_path / "metering.prom", pending_hour=None)
    # Signalled as the hour's one file is read: the stop is seen there, or once it is read,
    # before the hour is recorded as pending.
    assert ("SIGTERM received: stopped while reading the export" in result.output
            or f"SIGTERM received: stopped before hour {hours[0]:%Y-%m-%d %H}:00:00;" in result.output)
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert ledger_files(harness) == []
    assert_rerun_completes_exactly_once(harness, env, expected, hours)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_once_the_hour_is_pending_sends_nothing_and_leaves_it_pending(backend_harness, hours, tmp_path,
                                                                             signal_name):
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    env = settings(harness, hours, tmp_path / "metering.prom")
    # State writes: 1 pins the deployment's first hour, 2 records hour 0 as pending.
    result = harness.run(env=env, faults={"FAULT_SIGNAL_AFTER_STATE_WRITE": "2", "FAULT_SIGNAL": signal_name})
    assert_stopped_cleanly(harness, result, tmp_path / "metering.prom", pending_hour=iso(hours[0]))
    assert f"{signal_name} received: stopped before sending" in result.output
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    # Stopped before the first batch left: each record is known never sent.
    assert set(fates(harness).values()) == {"not sent yet"} and len(fates(harness)) == 5
    rerun = assert_rerun_completes_exactly_once(harness, env, expected, hours)
    assert "Resending pending hour" in rerun.output
    assert harness.clazar.outcomes().count("duplicate") == 0


# Clazar holds the answers of the batches in flight this long after the stop: within the grace
# (half the stop timeout), or past the moment the watchdog would end the run (four fifths).
IN_FLIGHT_STOP_TIMEOUT = 6


def stop_with_four_in_flight(harness, stop, answer_after: float) -> list:
    """Clazar holds the first four requests (mp.SEND_CONCURRENCY, all in flight at once), their
    records landed; once it holds all four it calls ``stop()``, and answers each
    ``answer_after`` seconds later. Returns the list the answered batches are added to."""
    held, answered, lock, stopped = [], [], threading.Lock(), threading.Event()

    def hold(records):
        with lock:
            held.append(records)
            if len(held) == mp.SEND_CONCURRENCY:
                stop()
                stopped.set()
        stopped.wait(60)
        time.sleep(answer_after)
        answered.append(records)

    harness.clazar.faults.extend(call(hold) for _ in range(mp.SEND_CONCURRENCY))
    return answered


@pytest.mark.parametrize("answer_after", [1.0, 5.0 * IN_FLIGHT_STOP_TIMEOUT],
                         ids=["answered-within-the-grace", "answered-after-the-process-ended"])
def test_a_stop_while_batches_are_in_flight_sends_no_further_batch(backend_harness, hours, tmp_path, answer_after):
    """Five batches of one record, four in flight at once (mp.SEND_CONCURRENCY): the stop
    comes while Clazar holds all four answers, their records landed, so the fifth waits."""
    harness = backend_harness
    expected = five_records_in_three_batches(harness, hours)
    metrics = tmp_path / "metering.prom"
    env = {**settings(harness, hours, metrics, IN_FLIGHT_STOP_TIMEOUT), "CLAZAR_BATCH_SIZE": "1"}
    process: list[subprocess.Popen] = []
    answered = stop_with_four_in_flight(harness, lambda: process[0].send_signal(signal.SIGTERM), answer_after)
    process.append(harness.popen(env=env))
    output, _ = process[0].communicate(timeout=120)
    answered_before_the_end = len(answered)
    assert_stopped_cleanly(harness, Result(process[0].returncode, output), metrics, pending_hour=iso(hours[0]))
    assert "stopped while sending; the batches without an answer are resent by the next run" in output
    assert harness.clazar.metering_calls == mp.SEND_CONCURRENCY, "no batch was sent after the stop"
    assert len(harness.clazar.accepted_keys()) == mp.SEND_CONCURRENCY
    outcomes = sorted(fates(harness).values())
    if answer_after < IN_FLIGHT_STOP_TIMEOUT / 2:
        assert outcomes == ["delivered"] * 4 + ["not sent yet"]
        duplicates = 0  # only the batch never sent goes out again
    else:
        # The answers were still held when the process ended: script() did not wait for the
        # requests in flight (the watchdog did not have to end it either, see
        # assert_stopped_cleanly), and their records are known to have maybe landed.
        assert answered_before_the_end == 0
        assert outcomes == ["not sent yet"] + ["sent, no answer yet"] * 4
        duplicates = 4  # resent, they come back "already exists", as ours
    assert_rerun_completes_exactly_once(harness, {**env, "STOP_TIMEOUT_SECONDS": str(STOP_TIMEOUT)}, expected, hours)
    assert harness.clazar.outcomes().count("duplicate") == duplicates
    assert "Conflict" not in output


def test_main_returns_after_a_stop_and_the_process_goes_on(harness, hours, tmp_path):
    """main() in this process, told to stop by SIGTERM while four batches are in flight: it
    stops at a safe point and returns 5, ending no process (the immediate exit is script()'s);
    the harness checks that it gives back the signal handlers and leaves no thread behind.
    A long stop timeout keeps its watchdog from ever ending the test's own process."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("main() handles signals only on the main thread; SIGTERM would end this process")
    expected = five_records_in_three_batches(harness, hours)
    metrics = tmp_path / "metering.prom"
    env = {**settings(harness, hours, metrics, stop_timeout=60), "CLAZAR_BATCH_SIZE": "1"}
    answered = stop_with_four_in_flight(harness, lambda: os.kill(os.getpid(), signal.SIGTERM), 1.0)
    result = harness.run(env=env)
    assert_stopped_cleanly(harness, result, metrics, pending_hour=iso(hours[0]))
    assert len(answered) == mp.SEND_CONCURRENCY
    assert harness.clazar.metering_calls == mp.SEND_CONCURRENCY, "no batch was sent after the stop"
    assert sorted(fates(harness).values()) == ["delivered"] * 4 + ["not sent yet"]
    assert_rerun_completes_exactly_once(harness, env, expected, hours)
    assert harness.clazar.outcomes().count("duplicate") == 0


def test_a_stop_between_hours_keeps_the_hour_committed_and_the_next_untouched(harness, hours, tmp_path):
    expected = five_records_in_three_batches(harness, hours)
    metrics = tmp_path / "metering.prom"
    env = settings(harness, hours, metrics)
    # The third state write commits hour 0 (after the deployment's first hour is pinned and
    # hour 0 recorded as pending); the stop comes before hour 1 is recorded.
    result = harness.run(env=env, faults={"FAULT_SIGNAL_AFTER_STATE_WRITE": "3"})
    assert result.returncode == STOPPED, result.output
    assert "SIGTERM received: stopped before hour" in result.output
    assert harness.entry()["last_processed_hour"] == deployment(harness)["last_processed_hour"] == iso(hours[0])
    assert "pending_hour" not in deployment(harness)
    assert harness.clazar.metering_calls == 3
    assert {line["hour"] for line in harness.ledger_lines()} == {iso(hours[0])}
    assert metric_value(metrics.read_text(), "metering_run_hours_processed") == 1
    assert metric_value(metrics.read_text(), "metering_run_exit_status") == STOPPED
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
    assert metric_value(metrics.read_text(), "metering_run_exit_status") == STOPPED


@pytest.mark.parametrize("state", ["local-state", "s3-state"])
def test_a_stop_while_s3_hangs_ends_the_run_within_the_stop_timeout(harness, tmp_path, state):
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
        # The README: a stop ends within STOP_TIMEOUT_SECONDS. Allow twice that; boto3 alone
        # would wait 60 s per attempt, four attempts.
        try:
            output, _ = process.communicate(timeout=2 * STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"still running {2 * STOP_TIMEOUT} s after SIGTERM:\n" + output)
    if state == "local-state":
        # The marker is read under a deadline of its own, which a stop shortens to the grace:
        # the run stops by itself.
        assert process.returncode == STOPPED, output
        assert (f"SIGTERM received: stopped while reading s3://{harness.bucket}/omnistrate-metering/"
                "last_success_export.json; the lock is released") in output
        assert "had not stopped" not in output
        assert metric_value(metrics.read_text(), "metering_run_exit_status") == STOPPED
    else:
        # Taking the S3 lease is a call no flag reaches: the watchdog ends the run.
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
    # State writes: 1 pins the deployment's first hour, 2 records hour 0 as pending.
    result = harness.run(env=env, faults={f"FAULT_HANG_{moment.upper()}_STATE_WRITE": "2"}, timeout=60)
    assert_ended_by_the_watchdog(result.output, result.returncode, metrics)
    assert harness.clazar.metering_calls == 0
    assert "last_processed_hour" not in harness.state()[KEY] and "last_processed_hour" not in deployment(harness)
    assert deployment(harness)["first_hour"] == iso(hours[0])
    assert (deployment(harness).get("pending_hour") or {}).get("hour") == (iso(hours[0]) if moment == "after" else None)
    assert ledger_files(harness) == []
    if harness.state_in_s3:
        # The lease is left behind and lapses by itself, 900 s on; made to lapse now.
        harness.expire_lease()
    rerun = harness.run(env=env)
    assert rerun.returncode == 0, rerun.output
    assert harness.clazar.accepted_quantities() == expected
    assert len(harness.clazar.successes()) == len(expected), "each (contract, dimension, hour) accepted once"
    assert harness.clazar.violations == []
    assert harness.entry()["last_processed_hour"] == iso(hours[1])
    assert not lease_exists(harness)


# --- a run's own deadline: RUN_TIMEOUT_MINUTES ---------------------------------------------------


def slow_hours(harness, hours, count: int) -> dict:
    """``count`` final hours of one record each; returns what Clazar should accept."""
    for i in range(count):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", i + 1)]})
    harness.write_marker(hours.final(count))
    return {("c-1", "cpu_core_hours", iso(hours[i])): i + 1 for i in range(count)}


def assert_timed_out_at_a_safe_point(harness, result, metrics: Path, minutes: str, expected: dict, env) -> None:
    assert result.returncode == 1, result.output
    errors = "\n".join(result.lines("ERROR"))
    assert f"RUN_TIMEOUT_MINUTES ({minutes}) passed: stopped " in errors
    assert "; FAILED: RUN_TIMEOUT_MINUTES" in errors, "the summary says why the run failed"
    assert "the lock is released" in result.output
    assert " - WARNING - RUN_TIMEOUT_MINUTES" not in result.output, "a failure, not a routine stop"
    assert metric_value(metrics.read_text(), "metering_run_exit_status") == 1
    # Stopped at a safe point: the hours committed are whole and in order, nothing pending is
    # half-sent, and the next run takes the rest, each record once.
    done = [key for key in expected if key[2] <= deployment(harness).get("last_processed_hour", "")]
    assert 0 < len(done) < len(expected), "the run was stopped part way"
    assert harness.clazar.accepted_quantities() == {key: expected[key] for key in done}
    assert not lease_exists(harness)
    rerun = harness.run(env=env)
    assert rerun.returncode == 0, rerun.output
    assert harness.clazar.accepted_quantities() == expected
    assert len(harness.clazar.successes()) == len(expected)
    assert harness.clazar.violations == []


def test_run_timeout_minutes_stops_a_slow_run_at_a_safe_point_as_a_failure(harness, hours, tmp_path, monkeypatch):
    """A run as a whole has an upper bound (issue 19). Once the first hour is being sent, S3
    answers each request a second late, so each later hour takes two seconds or more; the
    run's deadline is shortened to three seconds by giving the configuration 0.05 minutes (the
    setting itself takes whole minutes, its smallest a minute:
    test_run_timeout_minutes_from_the_environment runs that, slow): from the timer on,
    everything is the run's own code."""
    expected = slow_hours(harness, hours, 24)
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    read_config = mp.load_config
    monkeypatch.setattr(mp, "load_config", lambda *arguments, **options: dataclasses.replace(
        read_config(*arguments, **options), run_timeout_minutes=0.05))
    proxy = TCPProxy(harness.seaweed.s3_port)
    harness.clazar.faults.append(call(lambda records: setattr(proxy, "delay", 1.0)))
    try:
        result = harness.run(env={**env, "AWS_ENDPOINT_URL_S3": proxy.endpoint})
    finally:
        proxy.close()
    assert_timed_out_at_a_safe_point(harness, result, metrics, "0.05", expected, env)


def test_run_timeout_minutes_stops_retry_failed_at_a_safe_point_as_a_failure(harness, hours, monkeypatch):
    """retry-failed, which sends too, has the same upper bound: rejected records of ten hours,
    a Clazar taking a second per request once the first is answered, the deadline shortened to
    three seconds as above."""
    many = [hours[i] for i in range(10)]
    fabricate_waiting(harness, many, ["c-1"])
    harness.clazar.faults.append(call(lambda records: setattr(harness.clazar, "delay", 1.0)))
    read_config = mp.load_config
    with monkeypatch.context() as patch:
        patch.setattr(mp, "load_config", lambda *arguments, **options: dataclasses.replace(
            read_config(*arguments, **options), run_timeout_minutes=0.05))
        result = harness.run("retry-failed")
    assert result.returncode == 1, result.output
    assert "RUN_TIMEOUT_MINUTES (0.05) passed: stopped before hour" in "\n".join(result.lines("ERROR"))
    assert " - WARNING - RUN_TIMEOUT_MINUTES" not in result.output, "a failure, not a routine stop"
    retried = harness.clazar.accepted_keys()
    assert 0 < len(retried) < len(many), "stopped part way"
    assert sum(deployment(harness)["waiting"][iso(hour)]["rejected"] for hour in many
               if iso(hour) in deployment(harness)["waiting"]) == len(many) - len(retried)
    harness.clazar.delay = 0.0
    rest = harness.run("retry-failed")
    assert rest.returncode == 0, rest.output
    assert len(harness.clazar.accepted_keys()) == len(many) and len(harness.clazar.successes()) == len(many)
    assert deployment(harness)["waiting"] == {}


@pytest.mark.slow
def test_run_timeout_minutes_from_the_environment(harness, hours, tmp_path):
    """RUN_TIMEOUT_MINUTES=1 as an operator sets it, on a run that needs far longer: S3 answers
    each request five seconds late."""
    expected = slow_hours(harness, hours, 24)
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics), "RUN_TIMEOUT_MINUTES": "1"}
    proxy = TCPProxy(harness.seaweed.s3_port, delay=5.0)
    try:
        result = harness.run(env={**env, "AWS_ENDPOINT_URL_S3": proxy.endpoint})
    finally:
        proxy.close()
    assert_timed_out_at_a_safe_point(harness, result, metrics, "1", expected, env)


# --- Ctrl-C in the commands that only read ------------------------------------------------------


def test_ctrl_c_stops_a_long_retry_failed_dry_run(harness, hours):
    many = [hours.start - i * (hours[1] - hours[0]) for i in range(1, 301)]
    fabricate_waiting(harness, many, [f"c-{j}" for j in range(100)])
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


@pytest.mark.parametrize("command", ["retry-failed --dry-run", "conflicts", "conflicts --clear", "history",
                                     "reconcile"])
def test_every_loop_of_the_operators_commands_stops_on_request(harness, hours, monkeypatch, command):
    """Each command's loop over hours or ledger files looks at the stop before each step."""
    fabricate_waiting(harness, [hours[0]], ["c-1"])
    fabricate_waiting(harness, [hours[1]], ["c-2"], outcome="conflict")
    config = mp.load_config(harness.environment({"DRY_RUN": "true"}))
    store, ledger = mp.open_state_store(config, harness.s3), mp.open_ledger(config, harness.s3)
    store.save(dataclasses.replace(store.load(), last_processed_hour=hours[1]))
    state = store.load()
    before = harness.state_path.read_bytes()
    stop = mp.StopRequest()
    stop.request("SIGINT received")
    monkeypatch.setattr(mp, "STOP", stop)  # as after Ctrl-C, in this process only
    with pytest.raises(mp.RunStopped, match="SIGINT received: stopped"):
        if command == "retry-failed --dry-run":
            mp.retry_failed(config, store, state, ledger, None, None, None)
        elif command == "conflicts":
            mp.list_waiting(state, ledger, mp.CONFLICT, None, None)
        elif command == "conflicts --clear":
            mp.clear_conflicts(store, state, ledger, None, None)
        elif command == "history":
            list(ledger.lines(hours[0], hours[1]))
        else:
            source = mp.ExportSource(harness.s3, harness.bucket, config.max_export_file_bytes,
                                     config.s3_timeout_seconds)
            try:
                mp.reconcile(config, mp.HourReader(source, config.formulas), ledger, state, hours[0], hours[1])
            finally:
                source.close()
    assert harness.state_path.read_bytes() == before
