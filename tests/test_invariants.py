"""The billing invariants where the data changes under the exporter, end to end:
late usage by high-water mark, a pinned first hour, a marker that once seen is
required, conflicts never counted as delivered, and the per-record quantity limit."""

from __future__ import annotations

import json

import pytest
from clazar_standin import reset_after_landing, status
from conftest import SERVICE, cpu, fabricate_rejected
from datetime import timedelta

from export_data import GIB, MARKER_KEY, iso, record, service_key

KEY = service_key(SERVICE)
CARRY = {"LATE_USAGE": "carry"}


def rewrite(harness, hour, contract_values: dict[str, float]) -> None:
    """Hour ``hour`` now holds one file per contract with these cpu_core_hours."""
    harness.write_hour(hour, {f"sub-{contract}": [cpu(hour, contract, f"sub-{contract}", value)]
                              for contract, value in contract_values.items()})


def billed(harness, contract: str) -> int:
    return sum(quantity for (c, _, _), quantity in harness.clazar.accepted_quantities().items() if c == contract)


# --- late usage ----------------------------------------------------------------------------------


def test_usage_that_shrinks_and_grows_back_or_returns_to_an_earlier_content_is_billed_once(backend_harness, hours):
    harness = backend_harness
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 10, "c-2": 2})
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0
    # c-1: 10 -> 4 -> 10 (back to what was billed); c-2: 2 -> 5 -> 8 -> 5 -> 8 (a content that returns).
    for step, (c1, c2) in enumerate([(4, 5), (10, 8), (10, 5), (10, 8)], start=1):
        rewrite(harness, hours[0], {"c-1": c1, "c-2": c2})
        rewrite(harness, hours[step], {"c-3": 1})  # a later hour, so carried usage is billed with it
        harness.write_marker(hours.final(step + 1))
        result = harness.run(env=env)
        assert result.returncode == 0, result.output
    assert billed(harness, "c-1") == 10, "what shrank and grew back is not billed again"
    assert billed(harness, "c-2") == 8, "the largest usage ever seen, once"
    late = [(line["contract_id"], line["difference"], line["action"]) for line in harness.ledger_lines()
            if line["kind"] == "late"]
    assert sorted(late) == sorted([("c-1", "-6", "reported"), ("c-2", "3", "carried"), ("c-2", "3", "carried"),
                                   ("c-2", "-3", "reported")])
    check = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[4]), env=env)
    assert check.returncode == 0, check.output


@pytest.mark.parametrize("how", ["no files", "no payer yet"])
def test_usage_of_an_hour_billed_with_nothing_is_carried_when_it_arrives(harness, hours, how):
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    if how == "no payer yet":
        harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], None, "sub-AAAAAAAAAA", 6)]})
    harness.write_marker(hours.final(1))
    first = harness.run(env=env)
    assert first.returncode == 0, first.output
    assert harness.clazar.accepted_quantities() == {}
    # Omnistrate fills in the payer (or writes the hour's file) after the hour was billed.
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 6)]})
    harness.write_marker(hours.final(2))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert "now shows 6 more cpu_core_hours for contract c-1 (carried to the next hour)" in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[1])): 6}


def test_a_check_killed_before_its_commit_then_a_further_change_carries_each_unit_once(backend_harness, hours):
    harness = backend_harness
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0
    rewrite(harness, hours[0], {"c-1": 5})
    # Killed once the late lines are in the ledger, before the state records the carry.
    killed = harness.run(env=env, faults={"FAULT_KILL_BEFORE_STATE_WRITE": "1"})
    assert killed.returncode == -9
    rewrite(harness, hours[0], {"c-1": 8})
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    if harness.state_in_s3:
        harness.expire_lease()  # the killed run's lease lapses
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert billed(harness, "c-1") == 8
    late = [(line["difference"], line["check"]) for line in harness.ledger_lines() if line["kind"] == "late"]
    assert late == [("6", 1)], "the uncommitted check's line was replaced, not kept beside the new one"
    assert harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), env=env).returncode == 0


def test_an_hour_billed_under_other_formulas_is_not_compared(harness, hours):
    env = {"START_HOUR": iso(hours[0]), **CARRY, "DIMENSION1_NAME": "cpu", "DIMENSION1_FORMULA": "cpu_core_hours"}
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0
    env["DIMENSION1_FORMULA"] = "cpu_core_hours * 10"
    rewrite(harness, hours[0], {"c-1": 3})
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert result.output.count("billed with other dimension formulas") == 1
    assert "Late usage" not in result.output
    assert "billed with other dimension formulas" not in harness.run(env=env).output, "warned once"


# --- which hours are due -----------------------------------------------------------------------


def test_a_failed_first_hour_stays_due_instead_of_the_start_moving_on(harness, hours):
    first = hours[6]  # 24 hours before the current hour: where a service without START_HOUR starts
    harness.write_hour(first, {"sub-AAAAAAAAAA": b'[{"value": "broken"'})
    harness.write_marker(hours.final(30))
    env = {"MAX_HOURS_PER_RUN": "2"}
    failed = harness.run(env=env)
    assert failed.returncode == 1 and "sub-AAAAAAAAAA.json" in failed.output
    assert harness.entry()["first_hour"] == iso(first) and "last_processed_hour" not in harness.entry()
    # An hour later the default start would have moved on; the pin does not. Move the
    # pin back an hour instead of the clock forward: the same thing to the exporter.
    state = harness.state()
    state[KEY]["first_hour"] = iso(hours[5])
    harness.write_state_bytes(json.dumps(state).encode())
    harness.write_hour(hours[5], {"sub-BBBBBBBBBB": [cpu(hours[5], "c-1", "sub-BBBBBBBBBB", 1)]})
    harness.write_hour(first, {"sub-AAAAAAAAAA": [cpu(first, "c-1", "sub-AAAAAAAAAA", 2)]})
    fixed = harness.run(env=env)
    assert fixed.returncode == 0, fixed.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[5])): 1,
                                                    ("c-1", "cpu_core_hours", iso(first)): 2}


def test_a_marker_once_seen_is_required_and_its_absence_fails_the_service(harness, hours):
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 0
    assert harness.entry()["hours_by_marker"] is True
    harness.s3.delete_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json")
    rewrite(harness, hours[1], {"c-1": 2})
    result = harness.run(env=env)
    assert result.returncode == 1
    assert f"the export marker s3://{harness.bucket}/omnistrate-metering/last_success_export.json is missing" in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert "missing" in json.loads(harness.run("status", "--json", env=env).output)[0]["marker"]


# --- conflicts ---------------------------------------------------------------------------------


def held_by_someone_else(harness, contract, hour, quantity=7, dimension="cpu_core_hours"):
    with harness.clazar.lock:
        harness.clazar.accepted[contract, dimension, iso(hour)] = {"quantity": str(quantity)}


def test_already_exists_on_a_first_send_is_a_loud_conflict_never_a_delivery(harness, hours, tmp_path):
    rewrite(harness, hours[0], {"c-1": 2, "c-2": 3})
    rewrite(harness, hours[1], {"c-1": 2})
    harness.write_marker(hours.final(2))
    held_by_someone_else(harness, "c-2", hours[0])
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    result = harness.run(env=env)
    assert result.returncode == 1
    assert (f"Conflict: Clazar already holds contract c-2 dimension cpu_core_hours hour {iso(hours[0])}, which this "
            "exporter had not sent") in result.output
    assert "; counted as delivered" not in result.output
    # The rest of the hour, and the next hour, went through.
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[1]))] == 2
    conflicts = harness.waiting("conflict")
    assert [(line["contract_id"], line["quantity"], line["outcome"]) for line in conflicts] == [("c-2", 3, "conflict")]
    assert "same contract_id" in json.dumps(conflicts[0]["answer"])
    text = metrics.read_text()
    assert f'metering_run_records_conflicting{{service="{KEY}"}} 1' in text
    assert f'metering_conflicting_records_waiting{{service="{KEY}"}} 1' in text
    assert f'metering_service_up{{service="{KEY}"}} 0' in text
    status = harness.run("status", env=env)
    assert "conflicts:             1 waiting" in status.output
    listed = harness.report("conflicts", "--json", env=env)
    assert listed.returncode == 0 and [line["contract_id"] for line in json.loads(listed.output)] == ["c-2"]
    reconcile = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), env=env)
    assert reconcile.returncode == 1 and "(3 in conflict, see conflicts)" in reconcile.output
    # Never resent, by a run or by retry-failed.
    calls = harness.clazar.metering_calls
    assert harness.run(env=env).returncode == 0
    assert harness.run("retry-failed", env=env).returncode == 0
    assert harness.clazar.metering_calls == calls
    cleared = harness.run("conflicts", "--clear", "--contract", "c-2", env=env)
    assert cleared.returncode == 0, cleared.output
    assert harness.waiting("conflict") == [] and "waiting" not in harness.entry()
    assert "conflicts:             0 waiting" in harness.run("status", env=env).output
    assert harness.clazar.accepted_quantities()[("c-2", "cpu_core_hours", iso(hours[0]))] == 7, "theirs, untouched"


def test_a_conflict_found_before_a_kill_stays_a_conflict_when_the_hour_is_resent(harness, hours):
    rewrite(harness, hours[0], {"c-1": 2, "c-2": 3})
    harness.write_marker(hours.final(1))
    held_by_someone_else(harness, "c-2", hours[0])
    env = {"START_HOUR": iso(hours[0])}
    # Writes: the pinned first hour, the pending hour, then the commit: killed before the commit.
    killed = harness.run(env=env, faults={"FAULT_KILL_BEFORE_STATE_WRITE": "3"})
    assert killed.returncode == -9 and "Conflict" in killed.output
    rerun = harness.run(env=env)
    assert rerun.returncode == 1, rerun.output
    assert "Conflict: Clazar already holds contract c-2" in rerun.output
    assert [line["contract_id"] for line in harness.waiting("conflict")] == ["c-2"]
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-2", "cpu_core_hours", iso(hours[0])): 7}


def test_rejected_records_kept_in_the_state_by_an_earlier_version_move_to_the_ledger(harness, hours):
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 0
    state = harness.state()
    state[KEY]["rejected"] = [{"cloud": "aws", "contract_id": "c-9", "dimension": "replica_hours",
                               "start_time": iso(hours[0]), "end_time": iso(hours[1]), "quantity": "4",
                               "answer": {"status": "fail"}, "rejected_at": iso(hours[1])}]
    harness.write_state_bytes(json.dumps(state).encode())
    assert json.loads(harness.run("status", "--json", env=env).output)[0]["rejected_waiting"] == 1
    result = harness.run("retry-failed", env=env)
    assert result.returncode == 0, result.output
    assert "rejected" not in harness.entry() and harness.waiting() == []
    assert harness.clazar.accepted_quantities()[("c-9", "replica_hours", iso(hours[0]))] == 4


@pytest.mark.slow
def test_a_hundred_thousand_waiting_records_keep_the_state_small_and_the_commands_work(harness, hours):
    rejected_hours = [hours[0] - timedelta(hours=i) for i in range(100)]
    count = fabricate_rejected(harness.state_path, KEY, rejected_hours, [f"c-{i:05d}" for i in range(1000)])
    assert count == 100_000
    assert harness.state_path.stat().st_size < 20_000, "the state counts them per hour; the ledger holds them"
    env = {"START_HOUR": iso(hours[0])}
    assert json.loads(harness.run("status", "--json", env=env).output)[0]["rejected_waiting"] == 100_000
    dry = harness.run("retry-failed", "--dry-run", env=env, timeout=600)
    assert dry.returncode == 0 and dry.output.count("Dry run record:") == 100_000
    one_hour = harness.run("retry-failed", "--hour", iso(rejected_hours[7]), env=env, timeout=600)
    assert one_hour.returncode == 0, one_hour.output[-2000:]
    assert len(harness.clazar.accepted_quantities()) == 1000
    assert json.loads(harness.run("status", "--json", env=env).output)[0]["rejected_waiting"] == 99_000
    assert iso(rejected_hours[7]) not in harness.entry()["waiting"]


# --- the per-record quantity limit -------------------------------------------------------------


def test_a_quantity_above_the_marketplace_limit_fails_its_hour_before_anything_is_sent(harness, hours):
    pod = [record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension=dimension, value=value)
           for dimension, value in (("cpu_core_hours", 2), ("memory_byte_hours", 2 * GIB))]
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": pod})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0]), "MAX_RECORD_QUANTITY": None}  # AWS's limit, the default
    result = harness.run(env=env)
    assert result.returncode == 1
    assert ("contract c-1 dimension memory_byte_hours has quantity 2147483648, above the 2147483647 one record may "
            "carry") in result.output and "memory_byte_hours / 1073741824" in result.output
    assert harness.clazar.metering_calls == 0 and "last_processed_hour" not in harness.entry()
    # In GiB-hours it goes through, whole.
    gib = {**env, "DIMENSION1_NAME": "memory_gib_hours", "DIMENSION1_FORMULA": "memory_byte_hours / 1073741824",
           "DIMENSION2_NAME": "cpu_core_hours", "DIMENSION2_FORMULA": "cpu_core_hours"}
    assert harness.run(env=gib).returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "memory_gib_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[0])): 2}


# --- when more goes wrong: conflicts, the first hour, late usage and upgrades ---------------------------


def test_a_conflict_answered_while_another_batch_of_the_hour_fails_stays_a_conflict(harness, hours):
    rewrite(harness, hours[0], {"c-1": 2, "c-2": 3})
    harness.write_marker(hours.final(1))
    held_by_someone_else(harness, "c-2", hours[0])
    # One record per batch, sent one after the other: c-1's batch gets a 500 (no retries), c-2's
    # batch is answered "already exists" on its first send: someone else holds it.
    env = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "1", "CLAZAR_CONCURRENCY": "1",
           "CLAZAR_MAX_RETRIES": "0"}
    harness.clazar.faults.append(status(500))
    first = harness.run(env=env)
    assert first.returncode == 1, first.output
    rerun = harness.run(env=env)
    # Clazar told the first run that c-2 was held by someone else; the resend must not turn
    # that into "already delivered".
    assert harness.clazar.accepted_quantities()[("c-2", "cpu_core_hours", iso(hours[0]))] == 7, "theirs"
    assert [line["contract_id"] for line in harness.waiting("conflict")] == ["c-2"], rerun.output
    assert rerun.returncode == 1, rerun.output


def test_already_exists_after_a_429_is_still_a_conflict(harness, hours):
    rewrite(harness, hours[0], {"c-2": 3})
    harness.write_marker(hours.final(1))
    held_by_someone_else(harness, "c-2", hours[0])
    # Clazar throttles the first attempt (429: nothing was processed), then answers the
    # retry: the record is someone else's.
    harness.clazar.faults.append(status(429, "0"))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert "; counted as delivered" not in result.output, result.output
    assert [line["contract_id"] for line in harness.waiting("conflict")] == ["c-2"], result.output
    assert result.returncode == 1


@pytest.mark.parametrize("how", ["answer lost", "killed"])
def test_a_retried_record_whose_answer_was_lost_is_not_a_conflict_on_the_next_retry(harness, hours, how):
    rewrite(harness, hours[0], {"c-1": 2, "c-9": 4})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    harness.clazar.rejected_contracts = {"c-9": "Contract is not active yet"}
    assert harness.run(env=env).returncode == 1
    assert [line["contract_id"] for line in harness.waiting()] == ["c-9"]
    harness.clazar.rejected_contracts = {}
    if how == "answer lost":
        # The records land, the connection drops before the answer, and no retry is left.
        harness.clazar.faults.append(reset_after_landing())
        lost = harness.run("retry-failed", env={**env, "CLAZAR_MAX_RETRIES": "0"})
        assert lost.returncode == 1, lost.output
    else:
        killed = harness.run("retry-failed", env=env, faults={"FAULT_KILL_AFTER_BATCH": "1"})
        assert killed.returncode == -9
    assert harness.clazar.accepted_quantities()[("c-9", "cpu_core_hours", iso(hours[0]))] == 4, "it landed"
    again = harness.run("retry-failed", env=env)
    assert harness.waiting("conflict") == [], again.output
    assert again.returncode == 0, again.output
    reconcile = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), env=env)
    assert reconcile.returncode == 0, reconcile.output


# --- the pinned first hour -----------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["unreadable", "without the service's key"])
def test_a_first_run_failing_on_the_marker_still_pins_the_first_hour(harness, hours, marker):
    first = hours[6]  # 24 hours before the current hour
    rewrite(harness, first, {"c-1": 2})
    if marker == "unreadable":
        harness.s3.put_object(Bucket=harness.bucket, Key=MARKER_KEY, Body=b'{"broken":')
    else:
        harness.write_marker(hours.final(30), services=(("Other", "PROD", "pt-other"),))
    result = harness.run()
    assert result.returncode == 1, result.output
    # The first run of the service fixes its first hour before it reads anything, so that
    # the hour stays due when the marker is fixed an hour (or a day) later.
    assert harness.state().get(KEY, {}).get("first_hour") == iso(first), harness.state()


# --- late usage and the per-record limit ---------------------------------------------------------


def test_late_usage_carried_above_the_record_limit_is_billed_over_several_hours(harness, hours):
    env = {"START_HOUR": iso(hours[0]), **CARRY, "MAX_RECORD_QUANTITY": None}  # AWS's limit
    harness.write_marker(hours.final(1))
    first = harness.run(env=env)  # hour 0 has no file yet: billed with nothing
    assert first.returncode == 0, first.output
    # Hour 0's file arrives late: one 2 GiB pod-hour, 2**31 byte-hours, one more than a record may carry.
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [
        record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="memory_byte_hours",
               value=2 * GIB)]})
    rewrite(harness, hours[1], {"c-2": 1})
    harness.write_marker(hours.final(3))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    accepted = harness.clazar.accepted_quantities()
    assert accepted == {("c-1", "memory_byte_hours", iso(hours[1])): 2**31 - 1,
                        ("c-1", "memory_byte_hours", iso(hours[2])): 1,
                        ("c-2", "cpu_core_hours", iso(hours[1])): 1}


def test_remainders_of_a_dimension_the_formulas_no_longer_produce_block_nothing(harness, hours):
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0  # hour 0 billed with nothing
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [
        record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="memory_byte_hours",
               value=3 * GIB)]})
    # The late check carries 3 GiB of byte-hours; no hour is due yet to bill them.
    assert harness.run(env=env).returncode == 0
    assert harness.entry()["remainders"] == {"c-1": {"memory_byte_hours": str(3 * GIB)}}
    # Then the seller bills memory in GiB-hours, as the limit's error suggests.
    gib = {**env, "MAX_RECORD_QUANTITY": None, "DIMENSION1_NAME": "memory_gib_hours",
           "DIMENSION1_FORMULA": "memory_byte_hours / 1073741824",
           "DIMENSION2_NAME": "cpu_core_hours", "DIMENSION2_FORMULA": "cpu_core_hours"}
    rewrite(harness, hours[1], {"c-2": 1})
    harness.write_marker(hours.final(2))
    result = harness.run(env=gib)
    assert result.returncode == 0, result.output
    assert "belong to dimensions the formulas no longer produce and are not billed" in result.output
    assert harness.clazar.accepted_quantities() == {("c-2", "cpu_core_hours", iso(hours[1])): 1}
    assert harness.entry()["remainders"] == {"c-1": {"memory_byte_hours": str(3 * GIB)}}, "kept, not lost"


# --- upgrading from the previous release ---------------------------------------------------------


def as_previous_release(harness) -> None:
    """Turn the state into what the previous release kept: each processed hour's file digest
    in ``sources``, no ``accounted`` marks."""
    state = harness.state()
    entry = state[KEY]
    entry["sources"] = {hour: accounted["sources"] for hour, accounted in entry.pop("accounted").items()}
    entry.pop("first_hour", None)
    entry.pop("hours_by_marker", None)
    harness.write_state_bytes(json.dumps(state).encode())


def test_an_upgraded_hour_whose_ledger_is_gone_is_not_billed_again(harness, hours):
    import shutil

    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 10})
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0
    as_previous_release(harness)
    # The ledger is not where this release looks (deleted, or left behind when the state moved).
    shutil.rmtree(harness.state_path.parent / "metering_ledger")
    rewrite(harness, hours[0], {"c-1": 11})
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    result = harness.run(env=env)
    billed = sum(q for (c, _, _), q in harness.clazar.accepted_quantities().items() if c == "c-1")
    assert billed <= 11, (billed, result.output)


def test_late_usage_of_a_pending_hour_left_by_the_previous_release_is_carried(harness, hours):
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    # The previous release was killed once hour 0 was pending (writes: the pin, then the pending hour).
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_STATE_WRITE": "2"})
    assert killed.returncode == -9
    state = harness.state()
    del state[KEY]["pending_hour"]["formulas"]  # what that release wrote: amounts and sources, no formulas
    harness.write_state_bytes(json.dumps(state).encode())
    assert harness.run(env=env).returncode == 0  # this release resends it
    rewrite(harness, hours[0], {"c-1": 5})
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    billed = sum(q for (c, _, _), q in harness.clazar.accepted_quantities().items() if c == "c-1")
    assert billed == 5, (billed, result.output)
