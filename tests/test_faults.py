"""Fault injection: each scenario breaks one thing during a real run, then a clean
rerun follows. After both, every expected (contract, dimension, hour) must have been
accepted by the stand-in exactly once with the right quantity, every attempt at a
record must have carried the same quantity (nothing recomputed), every record the
stand-in answered "already exists" must be in the ledger as already delivered (never
a conflict), no hour may be skipped, and no secret, token or e-mail address may appear
in the DEBUG output."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import metering_processor as mp
import pytest
from clazar_standin import (call, hang, no_results, reset_after_landing, revoke_tokens,
                            short_results, status)
from conftest import CLIENT_SECRET, SERVICE
from export_data import GIB, iso, pod_records, record
from servers import TCPProxy, free_ports

HOURS = 3


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
    assert harness.waiting("conflict") == []
    entry = harness.entry()
    assert entry["last_processed_hour"] == iso(hours[HOURS - 1]), "an hour was skipped or left behind"
    assert "pending_hour" not in entry
    output = "\n".join(outputs)
    assert CLIENT_SECRET not in output and "buyer.example" not in output
    for secret in secrets:
        assert secret not in output
    for token in clazar.issued_tokens:
        assert token not in output


def run(harness, hours, **env):
    settings = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2", "LOG_LEVEL": "DEBUG",
                "STATE_LOCK_TTL_SECONDS": "5", **env}
    return harness.run(env=settings)


def closed_port() -> int:
    return free_ports(1)[0]


# Each scenario: what to break, the exit code and the messages of the faulty run; and,
# where set, how many metering and authentication calls it makes (``calls``,
# ``auth_calls``), whether nothing of it lands (``nothing_lands``), and how many records
# come back "already exists" when the first hour is resent (``duplicates``). A faulty run that
# exits 0 has delivered everything by itself; one that exits 1 leaves the first hour
# pending, and the rerun resends it.
CLAZAR_SCENARIOS = {
    "503-burst": dict(faults=[status(503)] * 3, code=0, message="Successfully sent data to Clazar"),
    # Each refusal that is retried, one after another: each costs one call more than the
    # nine batches of the three hours, no more.
    "5xx-and-429-in-turn": dict(faults=[status(503), status(500), status(429, retry_after="1"),
                                        status(429), status(502)],
                                code=0, message="Successfully sent", calls=9 + 5),
    # The first hour goes out in three batches at once: every attempt of each must fail.
    "500-beyond-retries": dict(faults=[status(500)] * 9, env={"CLAZAR_MAX_RETRIES": "2"}, code=1,
                               message="Clazar answered HTTP 500", nothing_lands=True),
    "429-retry-after": dict(faults=[status(429, retry_after="1")] * 2, code=0, message="Successfully sent"),
    "429-no-retry-after": dict(faults=[status(429)] * 3, code=0, message="Successfully sent"),
    "429-huge-retry-after-capped": dict(faults=[status(429, retry_after="86400")], code=0,
                                        env={"CLAZAR_RETRY_AFTER_MAX_SECONDS": "1"}, message="Successfully sent"),
    "hanging-answer": dict(faults=[hang(3)], env={"CLAZAR_TIMEOUT_SECONDS": "1"}, code=0, message="Successfully sent"),
    "hanging-beyond-retries": dict(faults=[hang(2)] * 6, env={"CLAZAR_TIMEOUT_SECONDS": "0.5", "CLAZAR_MAX_RETRIES": "1"},
                                   code=1, message="no answer from", nothing_lands=True),
    "reset-after-landing": dict(faults=[reset_after_landing()], code=0, message="already holds contract"),
    # Every batch of the first hour landed, one without a usable answer: the resent hour's
    # five records all come back "already exists".
    "200-without-results": dict(faults=[no_results(land=True)], code=1,
                                message="response has no results list", duplicates=5),
    "200-without-results-not-landed": dict(faults=[no_results(land=False)], code=1, message="no results list"),
    "200-short-results": dict(faults=[short_results()], code=1, message="results for",
                              duplicates=5),
    # The second metering call finds every token revoked: one new token, whatever is in flight.
    "tokens-revoked": dict(faults=[call(lambda records: None), revoke_tokens()], code=0,
                           message="Clazar answered 401; authenticating again", auth_calls=2),
    "bad-credentials": dict(env={"CLAZAR_CLIENT_SECRET": "not-the-secret"}, code=1,
                            message=("Clazar refused authentication", "HTTP 401"),
                            nothing_lands=True),
    "auth-server-errors": dict(auth_faults=[status(502), status(503)], code=0, message="Successfully sent"),
    "api-unreachable": dict(env={"CLAZAR_API_URL": "http://127.0.0.1:{port}/metering/", "CLAZAR_MAX_RETRIES": "1"},
                            code=1, message="no answer from http://127.0.0.1:", nothing_lands=True),
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
    if scenario["code"] == 0:
        assert harness.clazar.accepted_quantities() == expected, "the faulty run delivered it all"
    else:
        entry = harness.entry()
        assert entry["pending_hour"]["hour"] == iso(hours[0]) and "last_processed_hour" not in entry
        if scenario.get("nothing_lands"):
            assert harness.clazar.accepted_quantities() == {}
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    if scenario["code"] != 0:
        assert "Resending pending hour" in clean.output
    if "duplicates" in scenario:
        assert harness.clazar.outcomes().count("duplicate") == scenario["duplicates"]
        assert "already holds contract" in clean.output
    check(harness, hours, expected, [faulty.output, clean.output],
          secrets=[env.get("CLAZAR_CLIENT_SECRET", CLIENT_SECRET)])


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
    kept = {(item["contract_id"], item["dimension"], item["hour"]) for item in harness.waiting()}
    assert kept == lost
    assert sum(outcome == "rejected" for outcome in harness.clazar.outcomes()) == len(lost), "a rejected record was resent"


# --- S3 faults ---------------------------------------------------------------------------


def _through_proxy(harness, delay: float = 0.0):
    proxy = TCPProxy(harness.seaweed.s3_port, delay=delay)
    harness.env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
    return proxy


def test_s3_going_away_mid_run_fails_the_service_and_the_rerun_completes(harness, hours):
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
    assert harness.entry()["pending_hour"]["hour"] == iso(hours[0])
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
    assert "was changed by another writer since this run read it" in faulty.output
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


def test_a_killed_run_with_s3_state_is_taken_over_after_its_lease_lapses(harness, hours):
    """The lease that lapses in real time, STATE_LOCK_TTL_SECONDS after its last renewal (the
    other tests of a killed run's lease make it lapse at once: Harness.expire_lease)."""
    harness.use_s3_state()
    expected = write_dataset(harness, hours)
    process = harness.popen(env={"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2",
                                 "STATE_LOCK_TTL_SECONDS": "5"},
                            faults={"FAULT_KILL_AFTER_BATCH": "4"})
    output = process.communicate(timeout=120)[0]
    assert process.returncode == -9, output
    lease = harness.state_bytes(harness.state_key + ".lock")
    assert lease is not None and b"expires_at" in lease
    early = run(harness, hours)
    assert early.returncode == 3 and "another run holds the lock" in early.output, early.output
    expires = mp.parse_utc(json.loads(lease)["expires_at"])
    time.sleep(max(0.0, (expires - mp.utc_now()).total_seconds()) + 1.0)
    clean = run(harness, hours)
    assert clean.returncode == 0, clean.output
    assert "Took over the lease" in clean.output
    check(harness, hours, expected, [output, clean.output])
    assert harness.state_bytes(harness.state_key + ".lock") is None


def test_a_long_run_renews_its_lease(harness, hours):
    harness.use_s3_state()
    expected = write_dataset(harness, hours)
    leases = []

    def slow(records):
        leases.append(harness.state_bytes(harness.state_key + ".lock"))
        time.sleep(4)
        leases.append(harness.state_bytes(harness.state_key + ".lock"))

    harness.clazar.faults.append(call(slow))
    result = run(harness, hours, STATE_LOCK_TTL_SECONDS="6")
    assert result.returncode == 0, result.output
    assert leases[0] != leases[1], "the lease was not renewed while the run worked"
    check(harness, hours, expected, [result.output])


def test_rerunning_a_finished_export_sends_nothing(harness, hours):
    expected = write_dataset(harness, hours)
    def billing_state():
        return {key: {name: value for name, value in entry.items() if name not in ("last_run", "last_success_at")}
                for key, entry in harness.state().items()}

    first = run(harness, hours)
    calls = harness.clazar.metering_calls
    before = billing_state()
    again = run(harness, hours)
    assert first.returncode == again.returncode == 0
    assert harness.clazar.metering_calls == calls
    assert billing_state() == before
    assert harness.entry()["last_run"]["hours"] == 0
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
