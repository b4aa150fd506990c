# ruff: noqa: F811 - the fixtures of test_hostile_s3, imported, are parameters here
"""The export's read path: files read on a pool of threads whose deadline read_all watches."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import cpu, run_or_kill
from export_data import iso
from test_hostile_s3 import fake, harness  # noqa: F401 - fixtures

import metering_processor as mp


def test_reads_abandoned_past_their_deadline_do_not_starve_the_hours_read_after_them(harness, fake, hours):
    """A late-usage check whose files all trickle fails that check at S3_TIMEOUT_SECONDS and
    the run goes on: the reads it abandoned must not keep the pool's every thread, or the
    hours due after it are never read (nor timed out) and the run bills nothing."""
    env = {"START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": "24"}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    # Files added to the billed hour, as many as the pool has threads, each a trickle.
    late = {f"sub-T{n:09d}": [cpu(hours[0], "c-1", f"sub-T{n:09d}", 1)]
            for n in range(mp.S3_READ_CONCURRENCY)}
    for key in harness.write_hour(hours[0], late):
        fake.trickle(key, 0.5)
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(2))
    ended, code, output = run_or_kill(harness, {**env, "S3_TIMEOUT_SECONDS": "2"}, timeout=40)
    assert ended, "the run never read the hour due after the failed check:\n" + output
    assert "checking hour" in output and "S3_TIMEOUT_SECONDS" in output, output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 3}


def test_reads_left_running_by_a_failed_check_do_not_starve_the_hours_read_after_them(harness, fake, hours):
    """A late-usage check that fails on a malformed file while the hour's other files trickle
    leaves their reads running, far from S3_TIMEOUT_SECONDS: they must not keep the pool's
    every thread either, or the hour due after the check is never read."""
    env = {"START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": "24"}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    # The malformed file comes slowly, so that every other thread has its trickle by then.
    [malformed] = harness.write_hour(hours[0], {"sub-B000000000": b"not json"})
    fake.trickle(malformed, 0.3)
    late = {f"sub-T{n:09d}": [cpu(hours[0], "c-1", f"sub-T{n:09d}", 1)]
            for n in range(mp.S3_READ_CONCURRENCY + 1)}
    for key in harness.write_hour(hours[0], late):
        fake.trickle(key, 0.5)
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(2))
    ended, code, output = run_or_kill(harness, {**env, "S3_TIMEOUT_SECONDS": "600"}, timeout=40)
    assert ended, "the run never read the hour due after the failed check:\n" + output
    assert "checking hour" in output and "sub-B000000000.json" in output, output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 3}


# --- amounts written with integer arithmetic: the same text as the Fraction formula -----------


def amount_text_by_fractions(value) -> str:
    """amount_text as it was written with Fraction arithmetic, the reference."""
    scaled = Fraction(value) * mp.RESOLUTION
    if scaled.denominator != 1:
        raise ValueError("not a multiple")
    whole, part = divmod(abs(scaled.numerator), mp.RESOLUTION)
    return ("-" if value < 0 else "") + str(whole) + (f".{part:09d}".rstrip("0") if part else "")


multiples = st.integers(min_value=-(10**40), max_value=10**40).map(lambda n: Fraction(n, mp.RESOLUTION))
denominators = st.sampled_from([1, 2, 3, 7, 2**9, 5**9, 10**9, 2 * 10**9, 3 * 10**9, 10**10, 2**10, 5**10])
any_fraction = st.builds(Fraction, st.integers(min_value=-(10**30), max_value=10**30), denominators)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(multiples, any_fraction, st.integers(min_value=-(10**40), max_value=10**40), st.fractions()))
def test_amount_text_is_the_fraction_formula_and_refuses_what_it_refused(value):
    try:
        expected = amount_text_by_fractions(value)
    except ValueError:
        with pytest.raises(ValueError, match="is not a multiple of 1/1000000000"):
            mp.amount_text(value)
    else:
        assert mp.amount_text(value) == expected


# --- a stop while export reads hang in the pool and more are queued behind them ----------------


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_while_reads_trickle_and_others_wait_ends_the_run_by_itself_and_the_rerun_bills_once(
        harness, fake, hours, signal_name):
    """More files than the pool has threads, every one a trickle: the run, signalled while
    reads hang and others wait their turn, stops by itself (not by the watchdog) before
    anything is sent; the rerun, on a store that behaves, bills the hour exactly once."""
    files = {f"sub-S{n:09d}": [cpu(hours[0], "c-1", f"sub-S{n:09d}", 1)]
             for n in range(mp.S3_READ_CONCURRENCY + 8)}
    keys = harness.write_hour(hours[0], files)
    harness.write_marker(hours.final(1))
    for key in keys:
        fake.trickle(key, 0.5)
    env = {"START_HOUR": iso(hours[0]), "S3_TIMEOUT_SECONDS": "600", "STOP_TIMEOUT_SECONDS": "10"}
    process = harness.popen(env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(
            1 for method, path in list(fake.requests) if method == "GET" and "/sub-S" in path) < 8:
        time.sleep(0.1)
    process.send_signal(getattr(signal, signal_name))
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail("still running 30 s after the signal:\n" + output)
    assert process.returncode == mp.ExitCode.STOPPED, output
    assert f"{signal_name} received: stopped while reading the export" in output
    assert "had not stopped" not in output
    assert harness.clazar.metering_calls == 0
    fake.behave()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): len(files)}


# --- an accounted hour's JSON, made once ---------------------------------------------------------


def test_an_accounted_hour_changed_by_a_late_check_is_written_with_its_new_amounts():
    """The late check changes a mark with dataclasses.replace: the JSON made for the mark before
    must not be the one written for the mark after."""
    mark = mp.AccountedHour("a" * 64, "b" * 64, {("c-1", "cpu_core_hours"): Fraction(2)}, ("svc",))
    before = mark.to_json()
    after = dataclasses.replace(mark, sources="c" * 64, amounts={("c-1", "cpu_core_hours"): Fraction(5, 2)},
                                checks=1)
    assert after.to_json() == {"sources": "c" * 64, "formulas": "b" * 64, "checks": 1, "services": ["svc"],
                               "amounts": {"c-1": {"cpu_core_hours": "2.5"}}}
    assert mark.to_json() == before and before["amounts"] == {"c-1": {"cpu_core_hours": "2"}}
    assert mp.AccountedHour.from_json(after.to_json()) == after
