"""Fault injection: each scenario breaks one thing during a real run, then a clean
rerun follows. After both, every expected (contract, dimension, hour) must have been
accepted by the stand-in exactly once with the right quantity, every attempt at a
record must have carried the same quantity (nothing recomputed), every record the
stand-in answered "already exists" must be in the ledger as already delivered (never
a conflict), every record's latest ledger line must be an answer (none left "sent, no
answer yet" or "not sent yet"), no hour may be skipped, and no secret, token or e-mail
address may appear in the DEBUG output."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from datetime import timedelta

import metering_processor as mp
import pytest
from clazar_standin import (call, hang, no_results, reset_after_landing, revoke_tokens,
                            short_results, status)
from conftest import CLIENT_SECRET, SERVICE, answer_first_request_of, ledger_waiting
from export_data import GIB, iso, pod_records, record
from servers import TCPProxy, free_ports

HOURS = 3
# The outcomes of a record Clazar answered (or that had nothing to send).
ANSWERED = ("delivered", "already delivered", "delivered on retry", "rejected", "conflict",
            "not sent: zero quantity")


def deployment(harness) -> dict:
    """The state's deployment entry (state format version 2)."""
    state = harness.state()
    assert state["version"] == 2, state
    return state["deployment"]


def record_lines(harness, hour: str | None = None) -> dict:
    """{(contract, dimension, hour): the record's latest ledger line}, of one hour or all."""
    return {(line["contract_id"], line["dimension"], line["hour"]): line for line in harness.ledger_lines()
            if line["kind"] == "record" and hour in (None, line["hour"])}


def write_dataset(harness, hours) -> dict:
    """Three final hours, two contracts, five records an hour (three batches of two)."""
    expected = {}
    for i in range(HOURS):
        h = hours[i]
        harness.write_hour(h, {
            "sub-AAAAAAAAAA": pod_records(SERVICE, h, contract="c-1", subscription="sub-AAAAAAAAAA", cpu=2 + i),
            "sub-BBBBBBBBBB": [record(SERVICE, h, contract="c-2", subscription="sub-BBBBBBBBBB",
                                      dimension="cpu_core_hours", value=10 + i)],
        })
        for dimension, quantity in (("cpu_core_hours", 2 + i), ("memory_byte_hours", 2 * GIB),
                                    ("storage_allocated_byte_hours", 10 * GIB), ("replica_hours", 1)):
            expected["c-1", dimension, iso(h)] = quantity
        expected["c-2", "cpu_core_hours", iso(h)] = 10 + i
    harness.write_marker(hours.final(HOURS))
    return expected


def check(harness, hours, expected, outputs, secrets=()):
    clazar = harness.clazar
    assert clazar.accepted_quantities() == expected
    attempts = defaultdict(set)
    for sent, _ in clazar.received:
        attempts[sent["contract_id"], sent["dimension"], sent["start_time"]].add(sent["quantity"])
    assert {key: values for key, values in attempts.items() if len(values) > 1} == {}, "a record was recomputed"
    assert clazar.violations == []
    # What landed before its answer was lost was resent, answered "already exists", and
    # counted delivered: one ledger line for each such answer, and no conflict.
    already = [line for line in harness.ledger_lines() if line["kind"] == "record"
               and line["outcome"] == "already delivered"]
    assert len(already) == clazar.outcomes().count("duplicate")
    assert ledger_waiting(harness, "conflict") == []
    latest = record_lines(harness)
    assert {key: line["outcome"] for key, line in latest.items() if line["outcome"] not in ANSWERED} == {}, \
        "a record was left without an answer"
    assert {key for key, line in latest.items() if line["outcome"] != "rejected"} == set(expected)
    assert harness.entry()["last_processed_hour"] == iso(hours[HOURS - 1]), "an hour was skipped or left behind"
    assert deployment(harness)["last_processed_hour"] == iso(hours[HOURS - 1])
    assert "pending_hour" not in deployment(harness)
    output = "\n".join(outputs)
    assert CLIENT_SECRET not in output and "buyer.example" not in output
    for secret in secrets:
        assert secret not in output
    for token in clazar.issued_tokens:
        assert token not in output


def run(harness, hours, monkeypatch=None, lease_clock: timedelta | None = None, **env):
    """One run in this process; with ``lease_clock``, its S3 lease reads the time that much ahead."""
    settings = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2", "LOG_LEVEL": "DEBUG", **env}
    if lease_clock is None:
        return harness.run(env=settings)
    with monkeypatch.context() as patch:
        patch.setattr(mp, "S3Lease", lease_seen_at(lease_clock))
        return harness.run(env=settings)


def closed_port() -> int:
    return free_ports(1)[0]


# Each scenario: what to break, the exit code and the messages of the faulty run; and,
# where set, how many metering and authentication calls it makes (``calls``,
# ``auth_calls``), whether nothing of it lands (``nothing_lands``), and whether the records
# of its failed batches had landed, so that they come back "already exists" when the hour is
# resent (``landed``). A faulty run that exits 0 has delivered everything by itself; one
# that exits 1 leaves the first hour pending, each record of a failed batch in the ledger
# with that batch's ``fate`` ("sent, no answer yet" when it may have landed, "not sent yet"
# when it cannot have), and the rerun resends those records and no other.
NO_ANSWER, UNSENT = "sent, no answer yet", "not sent yet"
CLAZAR_SCENARIOS = {
    "503-burst": dict(faults=[status(503)] * 3, code=0, message="Successfully sent data to Clazar"),
    # Each refusal that is retried, one after another: each costs one call more than the
    # nine batches of the three hours, no more.
    "5xx-and-429-in-turn": dict(faults=[status(503), status(500), status(429, retry_after="1"),
                                        status(429), status(502)],
                                code=0, message="Successfully sent", calls=9 + 5),
    # The first hour goes out in three batches at once: every attempt of each must fail.
    "500-beyond-retries": dict(faults=[status(500)] * 9, env={"CLAZAR_MAX_RETRIES": "2"}, code=1,
                               message="Clazar answered HTTP 500", nothing_lands=True, fate=NO_ANSWER, calls=9),
    "429-retry-after": dict(faults=[status(429, retry_after="1")] * 2, code=0, message="Successfully sent"),
    "429-no-retry-after": dict(faults=[status(429)] * 3, code=0, message="Successfully sent"),
    # A Retry-After of a day is waited as three times CLAZAR_TIMEOUT_SECONDS (1.5 s).
    "429-huge-retry-after-capped": dict(faults=[status(429, retry_after="86400")], code=0,
                                        env={"CLAZAR_TIMEOUT_SECONDS": "0.5"}, message="Successfully sent"),
    "hanging-answer": dict(faults=[hang(3)], env={"CLAZAR_TIMEOUT_SECONDS": "1"}, code=0, message="Successfully sent"),
    "hanging-beyond-retries": dict(faults=[hang(2)] * 6, env={"CLAZAR_TIMEOUT_SECONDS": "0.5", "CLAZAR_MAX_RETRIES": "1"},
                                   code=1, message="no answer from", nothing_lands=True, fate=NO_ANSWER),
    "reset-after-landing": dict(faults=[reset_after_landing()], code=0, message="already holds contract"),
    # One batch of the first hour landed without a usable answer: its records, and no
    # other, are resent, and come back "already exists".
    "200-without-results": dict(faults=[no_results(land=True)], code=1,
                                message="response has no results list", fate=NO_ANSWER, landed=True),
    "200-without-results-not-landed": dict(faults=[no_results(land=False)], code=1, message="no results list",
                                           fate=NO_ANSWER, landed=False),
    "200-short-results": dict(faults=[short_results()], code=1, message="results for", fate=NO_ANSWER,
                              landed=True),
    # The second metering call finds every token revoked: one new token, whatever is in flight.
    "tokens-revoked": dict(faults=[call(lambda records: None), revoke_tokens()], code=0,
                           message="Clazar answered 401; authenticating again", auth_calls=2),
    "bad-credentials": dict(env={"CLAZAR_CLIENT_SECRET": "not-the-secret"}, code=1,
                            message=("Clazar refused authentication", "HTTP 401"),
                            nothing_lands=True, fate=UNSENT, calls=0),
    "auth-server-errors": dict(auth_faults=[status(502), status(503)], code=0, message="Successfully sent"),
    "api-unreachable": dict(env={"CLAZAR_API_URL": "http://127.0.0.1:{port}/metering/", "CLAZAR_MAX_RETRIES": "1"},
                            code=1, message="cannot authenticate with Clazar: no answer from http://127.0.0.1:",
                            nothing_lands=True, fate=UNSENT, calls=0),
}


@pytest.mark.parametrize("name", sorted(CLAZAR_SCENARIOS))
def test_clazar_faults(harness, hours, name):
    scenario = CLAZAR_SCENARIOS[name]
    expected = write_dataset(harness, hours)
    harness.clazar.faults.extend(scenario.get("faults", []))
    harness.clazar.auth_faults.extend(scenario.get("auth_faults", []))
    env = {key: value.format(port=closed_port()) for key, value in scenario.get("env", {}).items()}
    faulty = run(harness, hours, **env)
    assert faulty.returncode == scenario["code"], faulty.output
    messages = scenario["message"]
    for message in (messages,) if isinstance(messages, str) else messages:
        assert message in faulty.output
    if "calls" in scenario:
        assert harness.clazar.metering_calls == scenario["calls"], faulty.output
    if "auth_calls" in scenario:
        assert harness.clazar.auth_calls == scenario["auth_calls"], faulty.output
    unanswered: set = set()
    if scenario["code"] == 0:
        assert harness.clazar.accepted_quantities() == expected, "the faulty run delivered it all"
    else:
        assert deployment(harness)["pending_hour"]["hour"] == iso(hours[0])
        assert "last_processed_hour" not in deployment(harness) and "last_processed_hour" not in harness.entry()
        if scenario.get("nothing_lands"):
            assert harness.clazar.accepted_quantities() == {}
        # Each failed batch's fate is in the ledger; the batches answered keep their answer.
        fates = {key: line["outcome"] for key, line in record_lines(harness, iso(hours[0])).items()}
        assert set(fates) == {key for key in expected if key[2] == iso(hours[0])}
        unanswered = {key for key, outcome in fates.items() if outcome == scenario["fate"]}
        assert unanswered and set(fates.values()) <= {scenario["fate"], "delivered"}, fates
        if scenario.get("nothing_lands"):
            assert unanswered == set(fates)
    received = len(harness.clazar.received)
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    if scenario["code"] != 0:
        assert "Resending pending hour" in clean.output
        resent = [(sent["contract_id"], sent["dimension"], sent["start_time"])
                  for sent, _ in harness.clazar.received[received:] if sent["start_time"] == iso(hours[0])]
        assert sorted(resent) == sorted(unanswered), "the resend sends the records without an answer, once each"
    if "landed" in scenario:
        # What landed before its answer was lost comes back "already exists", as ours.
        assert harness.clazar.outcomes().count("duplicate") == (len(unanswered) if scenario["landed"] else 0)
        assert ("already holds contract" in clean.output) == scenario["landed"]
    check(harness, hours, expected, [faulty.output, clean.output],
          secrets=[env.get("CLAZAR_CLIENT_SECRET", CLIENT_SECRET)])


# --- "already exists": whose record is it? (issue 18) --------------------------------------------

EXCUSE_CASES = ["503-retried-by-urllib3", "500-left-the-hour-pending", "authentication-refused-nothing-sent"]


@pytest.mark.parametrize("case", EXCUSE_CASES)
def test_a_failed_request_excuses_already_exists_only_for_its_own_records(harness, hours, case):
    """As an adversary: c-2 is held by another sender, and the request carrying our c-2 is sent
    once. c-1's request meets a 503 after its record landed (urllib3 retries it), or a 500 that
    leaves the hour pending; or no request leaves at all. "Already exists" is then ours for c-1
    alone, whose own request may have landed; for c-2 it is a conflict, never counted
    delivered (which would lose its usage with exit 0). A record whose batch was never sent
    ("not sent yet") is not excused on its resend either."""
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [
        record(SERVICE, h, contract=contract, subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours",
               value=value, pod=pod) for contract, value, pod in (("c-1", 2, "db-1"), ("c-2", 3, "db-2"),
                                                                  ("c-3", 4, "db-3"))]})
    harness.write_marker(hours.final(1))
    with harness.clazar.lock:
        harness.clazar.accepted["c-2", "cpu_core_hours", iso(h)] = {"quantity": "9"}
    env = {"START_HOUR": iso(h), "CLAZAR_BATCH_SIZE": "1"}
    if case == "503-retried-by-urllib3":
        answer_first_request_of(harness.clazar, "c-1", 503, land=True)
    elif case == "500-left-the-hour-pending":
        answer_first_request_of(harness.clazar, "c-1", 500, land=True)
        env["CLAZAR_MAX_RETRIES"] = "0"
    first = harness.run(env={**env, "CLAZAR_CLIENT_SECRET": "not-the-secret"} if case.startswith("auth") else env)
    assert first.returncode == 1, first.output
    fates = {key[0]: line["outcome"] for key, line in record_lines(harness).items()}
    conflict = (f"ERROR - Conflict: Clazar already holds contract c-2 dimension cpu_core_hours hour {iso(h)}, "
                "which this exporter had not sent")
    outputs = [first.output]
    if case == "503-retried-by-urllib3":
        assert fates == {"c-1": "already delivered", "c-2": "conflict", "c-3": "delivered"}
        assert (f"WARNING - Clazar already holds contract c-1 dimension cpu_core_hours hour {iso(h)}; counted as "
                "delivered: its request was retried after an answer was lost") in first.output
        assert conflict in first.output and harness.clazar.metering_calls == 4
        assert "pending_hour" not in deployment(harness)
    else:
        if case == "500-left-the-hour-pending":
            assert fates == {"c-1": "sent, no answer yet", "c-2": "conflict", "c-3": "delivered"}
            assert conflict in first.output and "Clazar answered HTTP 500" in first.output
        else:
            assert fates == {"c-1": "not sent yet", "c-2": "not sent yet", "c-3": "not sent yet"}
            assert "Clazar refused authentication" in first.output and harness.clazar.metering_calls == 0
        assert deployment(harness)["pending_hour"]["hour"] == iso(h)
        received = len(harness.clazar.received)
        rerun = harness.run(env=env)
        outputs.append(rerun.output)
        assert "Resending pending hour" in rerun.output
        resent = sorted(sent["contract_id"] for sent, _ in harness.clazar.received[received:])
        if case == "500-left-the-hour-pending":
            assert resent == ["c-1"], "only the record without an answer is resent; c-2's conflict stays one"
            # The hour is committed with c-2's conflict, found by the first run: counted again,
            # since the run that met it might have been killed before it could report it.
            assert rerun.returncode == 1, rerun.output
            assert (f"ERROR - Hour {iso(h).replace('T', ' ').rstrip('Z')} is committed with 1 record(s) an earlier "
                    "attempt found rejected or in conflict, e.g. contract c-2") in rerun.output
            assert (f"INFO - Clazar already holds contract c-1 dimension cpu_core_hours hour {iso(h)}; counted as "
                    "delivered: this exporter sent it before") in rerun.output
        else:
            assert resent == ["c-1", "c-2", "c-3"]
            assert rerun.returncode == 1 and conflict in rerun.output
    final = "delivered" if case == "authentication-refused-nothing-sent" else "already delivered"
    assert {key[0]: line["outcome"] for key, line in record_lines(harness).items()} == {
        "c-1": final, "c-2": "conflict", "c-3": "delivered"}
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(h)): 2,
                                                    ("c-2", "cpu_core_hours", iso(h)): 9,
                                                    ("c-3", "cpu_core_hours", iso(h)): 4}
    assert [(line["contract_id"], line["quantity"]) for line in ledger_waiting(harness, "conflict")] == [("c-2", 3)]
    assert deployment(harness)["waiting"] == {iso(h): {"conflict": 1}}
    assert deployment(harness)["last_processed_hour"] == iso(h) and "pending_hour" not in deployment(harness)
    assert not any("contract c-2 dimension cpu_core_hours hour " + iso(h) + "; counted as delivered" in output
                   for output in outputs)
    assert any("1 in conflict" in output for output in outputs)


@pytest.mark.parametrize("how", ["unknown-contract", "cancelled-contract", "unregistered-dimension"])
def test_rejected_records_are_kept_not_resent_and_the_rest_goes_through(harness, hours, how):
    expected = write_dataset(harness, hours)
    if how == "unknown-contract":
        harness.clazar.known_contracts = {"c-1"}
        lost = {key for key in expected if key[0] == "c-2"}
    elif how == "cancelled-contract":
        harness.clazar.rejected_contracts = {"c-2": "Contract is cancelled"}
        lost = {key for key in expected if key[0] == "c-2"}
    else:
        harness.clazar.registered_dimensions = {"cpu_core_hours", "memory_byte_hours"}
        lost = {key for key in expected if key[1] in ("replica_hours", "storage_allocated_byte_hours")}
    faulty = run(harness, hours)
    assert faulty.returncode == 1
    assert "Clazar rejected contract" in faulty.output
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    check(harness, hours, {key: value for key, value in expected.items() if key not in lost},
          [faulty.output, clean.output])
    kept = {(item["contract_id"], item["dimension"], item["hour"]) for item in ledger_waiting(harness)}
    assert kept == lost
    assert deployment(harness)["waiting"] == {iso(hours[i]): {"rejected": len(lost) // HOURS} for i in range(HOURS)}
    assert sum(outcome == "rejected" for outcome in harness.clazar.outcomes()) == len(lost), "a rejected record was resent"


@pytest.mark.parametrize("refusal", [429, 401])
def test_a_refusal_before_clazar_read_the_request_excuses_nothing(harness, hours, refusal):
    """c-2 is held by another sender; our request carrying c-2 is first refused unread (a 429
    that urllib3 retries, or a 401 repeated with a new token), then answered "already exists".
    A refusal cannot have stored anything, so the resent request excuses nothing: a conflict."""
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [
        record(SERVICE, h, contract=contract, subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours",
               value=value, pod=pod) for contract, value, pod in (("c-1", 2, "db-1"), ("c-2", 3, "db-2"))]})
    harness.write_marker(hours.final(1))
    with harness.clazar.lock:
        harness.clazar.accepted["c-2", "cpu_core_hours", iso(h)] = {"quantity": "9"}
    answer_first_request_of(harness.clazar, "c-2", refusal)
    result = harness.run(env={"START_HOUR": iso(h), "CLAZAR_BATCH_SIZE": "1"})
    assert result.returncode == 1, result.output
    assert harness.clazar.metering_calls == 3, "c-2's request was sent again after the refusal"
    if refusal == 401:
        assert "Clazar answered 401; authenticating again" in result.output and harness.clazar.auth_calls == 2
    assert {key[0]: line["outcome"] for key, line in record_lines(harness).items()} == {
        "c-1": "delivered", "c-2": "conflict"}
    assert (f"ERROR - Conflict: Clazar already holds contract c-2 dimension cpu_core_hours hour {iso(h)}, "
            "which this exporter had not sent") in result.output
    assert "; counted as delivered" not in result.output
    assert deployment(harness)["waiting"] == {iso(h): {"conflict": 1}}


# --- S3 faults ---------------------------------------------------------------------------


def _through_proxy(harness, delay: float = 0.0):
    proxy = TCPProxy(harness.seaweed.s3_port, delay=delay)
    harness.env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
    return proxy


def test_s3_going_away_mid_run_fails_the_run_and_the_rerun_completes(harness, hours):
    expected = write_dataset(harness, hours)
    # Each S3 request takes half a second, so the third hour's listing, sent when
    # the first hour is taken up, is still on its way when S3 goes away.
    proxy = _through_proxy(harness, delay=0.5)
    # S3 disappears while the first hour is being sent: the first hour is committed
    # locally (and the second too, read ahead in time); a later one cannot be listed.
    harness.clazar.faults.append(call(lambda records: proxy.cut()))
    faulty = run(harness, hours, CLAZAR_BATCH_SIZE="25")
    assert faulty.returncode == 1, faulty.output
    assert "cannot list s3://" in faulty.output
    assert harness.entry()["last_processed_hour"] in (iso(hours[0]), iso(hours[1]))
    proxy.restore()
    proxy.delay = 0
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    check(harness, hours, expected, [faulty.output, clean.output])
    proxy.close()


def test_s3_state_unreachable_at_commit_leaves_the_pending_hour_for_the_rerun(harness, hours):
    harness.use_s3_state()
    expected = write_dataset(harness, hours)
    proxy = _through_proxy(harness)
    harness.clazar.faults.append(call(lambda records: proxy.cut()))
    faulty = run(harness, hours)
    assert faulty.returncode == 4, faulty.output
    # The ledger, beside the state in S3, is written just before the commit: either may be the first to fail.
    assert "cannot write state s3://" in faulty.output or "ledger s3://" in faulty.output
    proxy.restore()
    assert deployment(harness)["pending_hour"]["hour"] == iso(hours[0])
    harness.expire_lease()  # the lease of the failed run could not be deleted; it lapses
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    assert "Resending pending hour" in clean.output and "Took over the lease" in clean.output
    check(harness, hours, expected, [faulty.output, clean.output])
    proxy.close()


def test_a_state_write_that_loses_its_condition_overwrites_nothing(harness, hours):
    harness.use_s3_state()
    expected = write_dataset(harness, hours)
    seen = {}

    def another_writer(records):
        seen["before"] = harness.state_bytes()
        harness.write_state_bytes(seen["before"].replace(b"{", b'{"Other Service:DEV:pt-other": '
                                                         b'{"last_processed_hour": "2026-01-01T00:00:00Z"},', 1))

    harness.clazar.faults.append(call(another_writer))
    faulty = run(harness, hours)
    assert faulty.returncode == 4, faulty.output
    assert "was changed by another run since this run read it; nothing was overwritten" in faulty.output
    assert harness.state()["Other Service:DEV:pt-other"] == {"last_processed_hour": "2026-01-01T00:00:00Z"}
    assert b'"Other Service' not in seen["before"]
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    check(harness, hours, expected, [faulty.output, clean.output])
    assert harness.state()["Other Service:DEV:pt-other"]["last_processed_hour"] == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize("state", ["local-state", "s3-state"])
def test_two_runs_started_together_only_one_works(harness, hours, state):
    if state == "s3-state":
        harness.use_s3_state()
    expected = write_dataset(harness, hours)
    loser_done = threading.Event()
    harness.clazar.faults.append(call(lambda records: loser_done.wait(60), before_landing=True))
    settings = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2", "LOG_LEVEL": "DEBUG"}
    runs = [harness.popen(env=settings) for _ in range(2)]
    outputs = {}

    def wait(process):
        outputs[process.pid] = process.communicate(timeout=120)[0]
        if process.returncode == 3:
            loser_done.set()

    waiters = [threading.Thread(target=wait, args=(process,)) for process in runs]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(150)
    loser_done.set()
    codes = sorted(process.returncode for process in runs)
    assert codes == [0, 3], outputs
    assert any("another run holds the lock" in output for output in outputs.values())
    check(harness, hours, expected, list(outputs.values()))


def lease_seen_at(offset: timedelta) -> type:
    """The exporter's S3 lease, read and written by a clock ``offset`` ahead of this one: a
    run started that much later."""
    class Later(mp.S3Lease):
        def __init__(self, *arguments, **options):
            super().__init__(*arguments, clock=lambda: mp.utc_now() + offset, **options)

    return Later


def test_a_killed_run_with_s3_state_is_taken_over_once_its_lease_lapses(harness, hours, monkeypatch):
    """A lease lapses LEASE_SECONDS (900 s) after the killed run last wrote it, not before: a
    run whose clock is a second short of that stands back, one a second past it takes over.
    (The other tests of a killed run's lease rewrite its expiry: Harness.expire_lease.)"""
    harness.use_s3_state()
    expected = write_dataset(harness, hours)
    started = mp.utc_now().replace(microsecond=0)
    process = harness.popen(env={"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2"},
                            faults={"FAULT_KILL_AFTER_BATCH": "4"})
    output = process.communicate(timeout=120)[0]
    killed = mp.utc_now()
    assert process.returncode == -9, output
    lease = harness.state_bytes(harness.state_key + ".lock")
    assert lease is not None and b"expires_at" in lease
    expires = mp.parse_utc(json.loads(lease)["expires_at"])
    assert started + timedelta(seconds=mp.LEASE_SECONDS) <= expires <= killed + timedelta(seconds=mp.LEASE_SECONDS)
    early = run(harness, hours, monkeypatch=monkeypatch, lease_clock=expires - timedelta(seconds=1) - mp.utc_now())
    assert early.returncode == 3, early.output
    assert f"another run holds the lock {harness.state_display}.lock" in early.output
    assert f"until {iso(expires)}" in early.output
    clean = run(harness, hours, monkeypatch=monkeypatch, lease_clock=expires + timedelta(seconds=1) - mp.utc_now())
    assert clean.returncode == 0, clean.output
    assert "Took over the lease" in clean.output
    check(harness, hours, expected, [output, clean.output])
    assert harness.state_bytes(harness.state_key + ".lock") is None


def test_a_long_run_renews_its_lease(harness, hours, monkeypatch):
    """The lease is renewed every third of its life while the run works, each time further
    ahead. Its life is shortened here from 900 s to 3 s (the module's constant): the renewal
    is the same code."""
    monkeypatch.setattr(mp, "LEASE_SECONDS", 3)
    harness.use_s3_state()
    expected = write_dataset(harness, hours)
    leases = []

    def slow(records):
        lease = harness.state_bytes(harness.state_key + ".lock")
        leases.append(lease)
        waited = time.monotonic() + 30
        while lease == leases[0] and time.monotonic() < waited:
            time.sleep(0.1)
            lease = harness.state_bytes(harness.state_key + ".lock")
        leases.append(lease)

    harness.clazar.faults.append(call(slow))
    result = run(harness, hours)
    assert result.returncode == 0, result.output
    assert leases[0] != leases[1], "the lease was not renewed while the run worked"
    first, renewed = (json.loads(lease) for lease in leases)
    assert renewed["owner"] == first["owner"] and renewed["expires_at"] > first["expires_at"]
    check(harness, hours, expected, [result.output])


def test_rerunning_a_finished_export_sends_nothing(harness, hours):
    expected = write_dataset(harness, hours)

    def billing_state():
        state = harness.state()
        state["deployment"] = {name: value for name, value in state["deployment"].items()
                               if name not in ("last_run", "last_success_at")}
        return state

    first = run(harness, hours)
    calls = harness.clazar.metering_calls
    before = billing_state()
    ledger = harness.ledger_lines()
    again = run(harness, hours)
    assert first.returncode == again.returncode == 0
    assert harness.clazar.metering_calls == calls
    assert billing_state() == before
    assert harness.ledger_lines() == ledger
    assert deployment(harness)["last_run"]["hours"] == 0
    check(harness, hours, expected, [first.output, again.output])


# --- TLS ------------------------------------------------------------------------------------


def test_tls_is_verified_and_a_private_ca_goes_through_requests_ca_bundle(harness, hours, certificate):
    from clazar_standin import ClazarStandIn

    expected = write_dataset(harness, hours)
    secure = ClazarStandIn(client_secret=CLIENT_SECRET).use_tls(str(certificate / "server.pem"),
                                                                 str(certificate / "server.key")).start()
    harness.clazar = secure
    try:
        refused = run(harness, hours, CLAZAR_API_URL=secure.metering_url, CLAZAR_MAX_RETRIES="0")
        assert refused.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in refused.output or "certificate verify failed" in refused.output
        assert secure.auth_calls == 0
        trusted = run(harness, hours, CLAZAR_API_URL=secure.metering_url,
                      REQUESTS_CA_BUNDLE=str(certificate / "ca.pem"))
        assert trusted.returncode == 0, trusted.output
        check(harness, hours, expected, [refused.output, trusted.output])
    finally:
        secure.stop()
