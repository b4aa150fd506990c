"""The billing invariants where the data changes under the exporter, end to end:
late usage by high-water mark, a pinned first hour, a marker that once seen is
required, conflicts never counted as delivered, rejected records waiting in the
ledger, the per-record quantity limit, and which states are read."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from clazar_standin import reset_after_landing, status
from conftest import SERVICE, answer_first_request_of, cpu, fabricate_waiting, ledger_waiting as waiting
from conftest import metric_value as metric
from export_data import GIB, MARKER_KEY, iso, record, service_key

KEY = service_key(SERVICE)
CARRY = {"LATE_USAGE": "carry"}


def rewrite(harness, hour, contract_values: dict[str, float]) -> None:
    """Hour ``hour`` now holds one file per contract with these cpu_core_hours."""
    harness.write_hour(hour, {f"sub-{contract}": [cpu(hour, contract, f"sub-{contract}", value)]
                              for contract, value in contract_values.items()})


def billed(harness, contract: str) -> int:
    return sum(quantity for (c, _, _), quantity in harness.clazar.accepted_quantities().items() if c == contract)


def deployment(harness) -> dict:
    """The state's deployment entry (remainders, pending hour, marks, waiting counts)."""
    return harness.state()["deployment"]


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
    assert deployment(harness)["accounted"][iso(hours[0])]["amounts"] == {"c-1": {"cpu_core_hours": "10"},
                                                                          "c-2": {"cpu_core_hours": "8"}}
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
    # Killed at the state write that would commit the check (its first write): its late
    # lines are written only after that write, so none is in the ledger.
    killed = harness.run(env=env, faults={"FAULT_KILL_BEFORE_STATE_WRITE": "1"})
    assert killed.returncode == -9 and "now shows 3 more" in killed.output
    assert [line for line in harness.ledger_lines() if line["kind"] == "late"] == []
    rewrite(harness, hours[0], {"c-1": 8})
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    if harness.state_in_s3:
        harness.expire_lease()  # the killed run's lease lapses
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert billed(harness, "c-1") == 8
    late = [(line["difference"], line["action"], line["check"]) for line in harness.ledger_lines()
            if line["kind"] == "late"]
    assert late == [("6", "carried", 1)], "one committed check, one line"
    assert harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), env=env).returncode == 0


def test_a_check_killed_before_its_commit_whose_file_then_reverts_leaves_no_trace(backend_harness, hours):
    """Issue 18: such a check used to leave a "carried 3" line for ever, and reconcile then
    reported an over-bill that never happened."""
    harness = backend_harness
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0
    ledger_before = harness.ledger_lines()
    rewrite(harness, hours[0], {"c-1": 5})
    killed = harness.run(env=env, faults={"FAULT_KILL_BEFORE_STATE_WRITE": "1"})
    assert killed.returncode == -9 and "now shows 3 more cpu_core_hours for contract c-1" in killed.output
    rewrite(harness, hours[0], {"c-1": 2})  # the file reverts to what was billed
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    if harness.state_in_s3:
        harness.expire_lease()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert "Late usage" not in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-3", "cpu_core_hours", iso(hours[1])): 1}
    lines = harness.ledger_lines()
    assert [line for line in lines if line["kind"] == "late"] == []
    assert [line for line in lines if line["hour"] == iso(hours[0])] == ledger_before
    assert deployment(harness)["remainders"] == {} and deployment(harness)["owed_ledger"] == []
    check = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), "--json", env=env)
    assert check.returncode == 0, check.output
    assert json.loads(check.output)["differences"] == []


def test_a_check_killed_after_its_commit_writes_its_lines_once_on_the_next_run(backend_harness, hours):
    harness = backend_harness
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0
    rewrite(harness, hours[0], {"c-1": 5})
    # Killed just after the state write committing the check, before its lines reach the ledger.
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_STATE_WRITE": "1"})
    assert killed.returncode == -9
    owed = deployment(harness)["owed_ledger"]
    assert [(line["contract_id"], line["difference"], line["action"]) for line in owed] == [("c-1", "3", "carried")]
    assert [line for line in harness.ledger_lines() if line["kind"] == "late"] == []
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    if harness.state_in_s3:
        harness.expire_lease()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert "Late usage" not in result.output, "the committed check is not repeated"
    late = [line for line in harness.ledger_lines() if line["kind"] == "late"]
    assert [(line["hour"], line["difference"], line["action"], line["check"]) for line in late] == [
        (iso(hours[0]), "3", "carried", 1)]
    assert deployment(harness)["owed_ledger"] == []
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 3,
                                                    ("c-3", "cpu_core_hours", iso(hours[1])): 1}
    check = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), env=env)
    assert check.returncode == 0 and "Everything matches." in check.output, check.output


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
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu", iso(hours[0])): 2}


def test_late_usage_of_an_hour_left_pending_by_a_killed_run_is_carried(harness, hours):
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    # Killed once hour 0 is pending (writes: the pinned first hour, then the pending hour).
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_STATE_WRITE": "2"})
    assert killed.returncode == -9
    assert deployment(harness)["pending_hour"]["hour"] == iso(hours[0])
    resent = harness.run(env=env)
    assert resent.returncode == 0 and "Resending pending hour" in resent.output, resent.output
    # The mark of the resent hour is what its pending record says it was billed on.
    assert deployment(harness)["accounted"][iso(hours[0])]["amounts"] == {"c-1": {"cpu_core_hours": "2"}}
    rewrite(harness, hours[0], {"c-1": 5})
    rewrite(harness, hours[1], {"c-3": 1})
    harness.write_marker(hours.final(2))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert billed(harness, "c-1") == 5, result.output
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[1]))] == 3


# --- which hours are due -----------------------------------------------------------------------


def test_a_failed_first_hour_stays_due_instead_of_the_start_moving_on(harness, hours):
    first = hours[6]  # 24 hours before the current hour: where a deployment without START_HOUR starts
    harness.write_hour(first, {"sub-AAAAAAAAAA": b'[{"value": "broken"'})
    harness.write_marker(hours.final(30))
    env = {"MAX_HOURS_PER_RUN": "2"}
    failed = harness.run(env=env)
    assert failed.returncode == 1 and "sub-AAAAAAAAAA.json" in failed.output
    assert deployment(harness)["first_hour"] == iso(first)
    assert "last_processed_hour" not in deployment(harness) and "last_processed_hour" not in harness.entry()
    # An hour later the default start would have moved on; the pin does not. Move the
    # pin back an hour instead of the clock forward: the same thing to the exporter.
    state = harness.state()
    state["deployment"]["first_hour"] = iso(hours[5])
    harness.write_state_bytes(json.dumps(state).encode())
    harness.write_hour(hours[5], {"sub-BBBBBBBBBB": [cpu(hours[5], "c-1", "sub-BBBBBBBBBB", 1)]})
    harness.write_hour(first, {"sub-AAAAAAAAAA": [cpu(first, "c-1", "sub-AAAAAAAAAA", 2)]})
    fixed = harness.run(env=env)
    assert fixed.returncode == 0, fixed.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[5])): 1,
                                                    ("c-1", "cpu_core_hours", iso(first)): 2}
    assert deployment(harness)["last_processed_hour"] == harness.entry()["last_processed_hour"] == iso(first)


def test_a_marker_once_seen_is_required_and_its_absence_fails_the_run(harness, hours):
    rewrite(harness, hours[0], {"c-1": 2})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 0
    assert harness.entry()["hours_by_marker"] is True
    harness.s3.delete_object(Bucket=harness.bucket, Key=MARKER_KEY)
    rewrite(harness, hours[1], {"c-1": 2})
    result = harness.run(env=env)
    assert result.returncode == 1
    assert f"the export marker s3://{harness.bucket}/{MARKER_KEY} is missing, but it decided the hours of {KEY}" \
        in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert deployment(harness)["last_processed_hour"] == iso(hours[0])
    status = json.loads(harness.report("status", "--json", env=env).output)
    assert "missing" in status["services"][0]["marker"]
    assert status["holding"] == KEY and status["hours_behind"] is None


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
    assert harness.clazar.metering_calls == 0
    # The first run of the deployment fixes its first hour before it reads anything, so
    # that the hour stays due when the marker is fixed an hour (or a day) later.
    assert deployment(harness)["first_hour"] == iso(first), harness.state()
    assert "last_processed_hour" not in deployment(harness)


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
    assert (f"ERROR - Conflict: Clazar already holds contract c-2 dimension cpu_core_hours hour {iso(hours[0])}, "
            "which this exporter had not sent") in result.output
    assert "; counted as delivered" not in result.output
    assert "1 in conflict" in result.output.splitlines()[-1]
    # The rest of the hour, and the next hour, went through.
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[0]))] == 2
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[1]))] == 2
    conflicts = waiting(harness, "conflict")
    assert [(line["contract_id"], line["quantity"], line["outcome"], line["cloud"]) for line in conflicts] == [
        ("c-2", 3, "conflict", "aws")]
    assert "same contract_id" in json.dumps(conflicts[0]["answer"])
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"conflict": 1}}
    text = metrics.read_text()
    assert metric(text, "metering_run_records_conflicting", cloud="aws") == 1
    assert metric(text, "metering_run_records_already_delivered", cloud="aws") == 0
    assert metric(text, "metering_conflicting_records_waiting") == 1
    assert metric(text, "metering_run_exit_status") == 1
    status = harness.report("status", env=env)
    assert "conflicts:             1 waiting" in status.output
    assert json.loads(harness.report("status", "--json", env=env).output)["conflicts_waiting"] == 1
    listed = harness.report("conflicts", "--json", env=env)
    assert listed.returncode == 0 and [line["contract_id"] for line in json.loads(listed.output)] == ["c-2"]
    reconcile = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), env=env)
    assert reconcile.returncode == 1 and "(3 in conflict, see conflicts)" in reconcile.output
    # Never resent, by a run or by retry-failed.
    calls = harness.clazar.metering_calls
    assert harness.run(env=env).returncode == 0
    assert metric(metrics.read_text(), "metering_conflicting_records_waiting") == 1, "still waiting"
    assert harness.run("retry-failed", env=env).returncode == 0
    assert harness.clazar.metering_calls == calls
    cleared = harness.run("conflicts", "--clear", "--contract", "c-2", env=env)
    assert cleared.returncode == 0, cleared.output
    assert waiting(harness, "conflict") == [] and deployment(harness)["waiting"] == {}
    assert [line["outcome"] for line in harness.ledger_lines() if line.get("contract_id") == "c-2"] == [
        "conflict", "conflict cleared"]
    assert "conflicts:             0 waiting" in harness.report("status", env=env).output
    assert harness.clazar.accepted_quantities()[("c-2", "cpu_core_hours", iso(hours[0]))] == 7, "theirs, untouched"


def test_a_conflict_found_before_a_kill_stays_a_conflict_when_the_hour_is_resent(harness, hours, tmp_path):
    rewrite(harness, hours[0], {"c-1": 2, "c-2": 3})
    harness.write_marker(hours.final(1))
    held_by_someone_else(harness, "c-2", hours[0])
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    # Writes: the pinned first hour, the pending hour, then the commit: killed before the
    # commit, once the hour's ledger lines are written.
    killed = harness.run(env=env, faults={"FAULT_KILL_BEFORE_STATE_WRITE": "3"})
    assert killed.returncode == -9 and "ERROR - Conflict: Clazar already holds contract c-2" in killed.output
    assert deployment(harness)["pending_hour"]["hour"] == iso(hours[0])
    calls = harness.clazar.metering_calls
    rerun = harness.run(env=env)
    # The resend finds both records answered in the ledger: nothing is sent again, and the
    # conflict is committed as one (never turned into "already delivered").
    assert harness.clazar.metering_calls == calls
    assert "; counted as delivered" not in rerun.output
    assert [line["contract_id"] for line in waiting(harness, "conflict")] == ["c-2"]
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"conflict": 1}}
    assert "pending_hour" not in deployment(harness)
    assert metric(metrics.read_text(), "metering_conflicting_records_waiting") == 1
    assert json.loads(harness.report("status", "--json", env=env).output)["conflicts_waiting"] == 1
    # The run that met the conflict was killed before it could end with exit 1; the rerun
    # commits it, and says so: an ERROR naming it, exit 1, the conflict counted.
    assert rerun.returncode == 1, rerun.output
    assert ("is committed with 1 record(s) an earlier attempt found rejected or in conflict, e.g. "
            "contract c-2 dimension cpu_core_hours (conflict)") in "\n".join(rerun.lines("ERROR"))
    assert metric(metrics.read_text(), "metering_run_records_conflicting", cloud="aws") == 1
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-2", "cpu_core_hours", iso(hours[0])): 7}


def test_a_conflict_answered_while_another_batch_of_the_hour_fails_stays_a_conflict(harness, hours):
    rewrite(harness, hours[0], {"c-1": 2, "c-2": 3})
    harness.write_marker(hours.final(1))
    held_by_someone_else(harness, "c-2", hours[0])
    # One record per batch: c-1's batch gets a 500 (no retries), c-2's batch is answered
    # "already exists" on its first send: someone else holds it.
    env = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "1", "CLAZAR_MAX_RETRIES": "0"}
    answer_first_request_of(harness.clazar, "c-1", 500)
    first = harness.run(env=env)
    assert first.returncode == 1, first.output
    assert "Conflict: Clazar already holds contract c-2" in first.output
    outcomes = {line["contract_id"]: line["outcome"] for line in harness.ledger_lines()}
    assert outcomes == {"c-1": "sent, no answer yet", "c-2": "conflict"}
    rerun = harness.run(env=env)
    # Clazar told the first run that c-2 was held by someone else; the 500 met by c-1's
    # request excuses c-1 alone, and the resend (of c-1 only) must not turn c-2 into
    # "already delivered".
    assert [sent["contract_id"] for sent, _ in harness.clazar.received] == ["c-2", "c-1"]
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-2", "cpu_core_hours", iso(hours[0])): 7}
    assert [line["contract_id"] for line in waiting(harness, "conflict")] == ["c-2"], rerun.output
    assert "; counted as delivered" not in rerun.output
    assert rerun.returncode == 1, "the run committing a conflict ends with exit 1"
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"conflict": 1}}


def test_already_exists_after_a_429_is_still_a_conflict(harness, hours):
    rewrite(harness, hours[0], {"c-2": 3})
    harness.write_marker(hours.final(1))
    held_by_someone_else(harness, "c-2", hours[0])
    # Clazar throttles the first attempt (429: nothing was processed), then answers the
    # retry: the record is someone else's.
    harness.clazar.faults.append(status(429, "0"))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert harness.clazar.metering_calls == 2
    assert "; counted as delivered" not in result.output, result.output
    assert [line["contract_id"] for line in waiting(harness, "conflict")] == ["c-2"], result.output
    assert result.returncode == 1


@pytest.mark.parametrize("how", ["answer lost", "killed"])
def test_a_retried_record_whose_answer_was_lost_is_not_a_conflict_on_the_next_retry(harness, hours, how):
    rewrite(harness, hours[0], {"c-1": 2, "c-9": 4})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    harness.clazar.rejected_contracts = {"c-9": "Contract is not active yet"}
    assert harness.run(env=env).returncode == 1
    assert [line["contract_id"] for line in waiting(harness)] == ["c-9"]
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
    assert [line["outcome"] for line in waiting(harness)] == ["resending"], "still waiting, as a resend"
    again = harness.run("retry-failed", env=env)
    assert waiting(harness, "conflict") == [], again.output
    assert again.returncode == 0, again.output
    assert waiting(harness) == [] and deployment(harness)["waiting"] == {}
    reconcile = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), env=env)
    assert reconcile.returncode == 0, reconcile.output


# --- rejected records wait in the ledger -------------------------------------------------------


def test_rejected_records_wait_in_the_ledger_until_retry_failed_delivers_them(harness, hours, tmp_path):
    rewrite(harness, hours[0], {"c-1": 2, "c-9": 4})
    rewrite(harness, hours[1], {"c-1": 1})
    harness.write_marker(hours.final(2))
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    harness.clazar.rejected_contracts = {"c-9": "Contract is not active yet"}
    result = harness.run(env=env)
    assert result.returncode == 1
    assert f"ERROR - Clazar rejected contract c-9 dimension cpu_core_hours hour {iso(hours[0])} quantity 4" \
        in result.output
    # The hour and the next are committed: a rejected record waits, it does not hold the deployment.
    assert deployment(harness)["last_processed_hour"] == iso(hours[1])
    rejected = waiting(harness)
    assert [(line["contract_id"], line["quantity"], line["cloud"]) for line in rejected] == [("c-9", 4, "aws")]
    assert "Contract is not active yet" in json.dumps(rejected[0]["answer"])
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"rejected": 1}}
    assert metric(metrics.read_text(), "metering_rejected_records_waiting") == 1
    assert metric(metrics.read_text(), "metering_run_records_rejected", cloud="aws") == 1
    assert json.loads(harness.report("status", "--json", env=env).output)["rejected_waiting"] == 1
    calls = harness.clazar.metering_calls
    assert harness.run(env=env).returncode == 0, "a later run does not resend it"
    assert harness.clazar.metering_calls == calls
    harness.clazar.rejected_contracts = {}
    retried = harness.run("retry-failed", env=env)
    assert retried.returncode == 0, retried.output
    assert waiting(harness) == [] and deployment(harness)["waiting"] == {}
    assert harness.clazar.accepted_quantities()[("c-9", "cpu_core_hours", iso(hours[0]))] == 4
    assert [line["outcome"] for line in harness.ledger_lines() if line.get("contract_id") == "c-9"] == [
        "rejected", "resending", "delivered on retry"]
    assert json.loads(harness.report("status", "--json", env=env).output)["rejected_waiting"] == 0


@pytest.mark.slow
def test_a_hundred_thousand_waiting_records_keep_the_state_small_and_the_commands_work(harness, hours):
    rejected_hours = [hours[0] - timedelta(hours=i) for i in range(100)]
    count = fabricate_waiting(harness, rejected_hours, [f"c-{i:05d}" for i in range(1000)])
    assert count == 100_000
    assert harness.state_path.stat().st_size < 20_000, "the state counts them per hour; the ledger holds them"
    env = {"START_HOUR": iso(hours[0])}
    assert json.loads(harness.report("status", "--json", env=env).output)["rejected_waiting"] == 100_000
    dry = harness.run("retry-failed", "--dry-run", env=env, timeout=600)
    assert dry.returncode == 0 and dry.output.count("Dry run record:") == 100_000
    one_hour = harness.run("retry-failed", "--hour", iso(rejected_hours[7]), env=env, timeout=600)
    assert one_hour.returncode == 0, one_hour.output[-2000:]
    assert len(harness.clazar.accepted_quantities()) == 1000
    assert json.loads(harness.report("status", "--json", env=env).output)["rejected_waiting"] == 99_000
    assert iso(rejected_hours[7]) not in deployment(harness)["waiting"]


# --- the per-record quantity limit -------------------------------------------------------------


def test_a_quantity_above_the_marketplace_limit_fails_its_hour_before_anything_is_sent(harness, hours):
    pod = [record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension=dimension, value=value)
           for dimension, value in (("cpu_core_hours", 2), ("memory_byte_hours", 2 * GIB))]
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": pod})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0]), "MAX_RECORD_QUANTITY": None}  # AWS's limit, the default
    result = harness.run(env=env)
    assert result.returncode == 1
    assert (f"contract c-1 dimension memory_byte_hours hour {iso(hours[0])} has quantity 2147483648, above the "
            "2147483647 one aws record may carry (MAX_RECORD_QUANTITY)") in result.output
    assert "DIMENSION1_FORMULA=memory_byte_hours/1073741824; nothing of the hour was sent" in result.output
    assert harness.clazar.metering_calls == 0 and "last_processed_hour" not in deployment(harness)
    assert "pending_hour" not in deployment(harness)
    # In GiB-hours it goes through, whole.
    gib = {**env, "DIMENSION1_NAME": "memory_gib_hours", "DIMENSION1_FORMULA": "memory_byte_hours / 1073741824",
           "DIMENSION2_NAME": "cpu_core_hours", "DIMENSION2_FORMULA": "cpu_core_hours"}
    assert harness.run(env=gib).returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "memory_gib_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[0])): 2}


def test_retry_failed_checks_the_limit_as_every_send_does(harness, hours):
    rewrite(harness, hours[0], {"c-9": 5})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    harness.clazar.rejected_contracts = {"c-9": "Contract is not active yet"}
    assert harness.run(env=env).returncode == 1
    harness.clazar.rejected_contracts = {}
    calls = harness.clazar.metering_calls
    # Meanwhile the limit came down below the waiting record's quantity.
    refused = harness.run("retry-failed", env={**env, "MAX_RECORD_QUANTITY": "4"})
    assert refused.returncode == 1, refused.output
    assert (f"contract c-9 dimension cpu_core_hours hour {iso(hours[0])} has quantity 5, above the 4 one aws record "
            "may carry (MAX_RECORD_QUANTITY)") in refused.output
    assert harness.clazar.metering_calls == calls and harness.clazar.accepted_quantities() == {}
    assert [(line["contract_id"], line["outcome"]) for line in waiting(harness)] == [("c-9", "rejected")]
    assert deployment(harness)["waiting"] == {iso(hours[0]): {"rejected": 1}}
    retried = harness.run("retry-failed", env=env)
    assert retried.returncode == 0, retried.output
    assert harness.clazar.accepted_quantities() == {("c-9", "cpu_core_hours", iso(hours[0])): 5}


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
    assert deployment(harness)["remainders"] == {}


def test_remainders_of_a_dimension_the_formulas_no_longer_produce_block_nothing(harness, hours):
    env = {"START_HOUR": iso(hours[0]), **CARRY}
    harness.write_marker(hours.final(1))
    assert harness.run(env=env).returncode == 0  # hour 0 billed with nothing
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [
        record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="memory_byte_hours",
               value=3 * GIB)]})
    # The late check carries 3 GiB of byte-hours; no hour is due yet to bill them.
    assert harness.run(env=env).returncode == 0
    assert deployment(harness)["remainders"] == {"c-1": {"memory_byte_hours": str(3 * GIB)}}
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
    assert deployment(harness)["remainders"] == {"c-1": {"memory_byte_hours": str(3 * GIB)}}, "kept, not lost"


# --- which states are read ------------------------------------------------------------------------


DEVELOPMENT_STATES = {
    # What development versions wrote: rejected records kept in the state, an hour's file
    # digests under "sources" (no "accounted" marks), remainders as fractions.
    "rejected records in the state": lambda hour: {KEY: {
        "last_processed_hour": iso(hour), "rejected": [{"cloud": "aws", "contract_id": "c-9",
                                                        "dimension": "replica_hours", "quantity": "4"}]}},
    "sources without marks": lambda hour: {KEY: {"last_processed_hour": iso(hour), "sources": {iso(hour): "abc"}}},
    "fractions in version 2": lambda hour: {"version": 2, "deployment": {
        "last_processed_hour": iso(hour), "remainders": {"c-1": {"cpu_core_hours": "1/3"}}},
        KEY: {"last_processed_hour": iso(hour)}},
    "unknown field in version 2": lambda hour: {"version": 2, "deployment": {"last_processed_hour": iso(hour)},
                                                KEY: {"last_processed_hour": iso(hour), "rejected": []}},
}


@pytest.mark.parametrize("kind", list(DEVELOPMENT_STATES))
def test_a_state_of_a_development_version_is_refused_and_left_untouched(harness, hours, kind):
    rewrite(harness, hours[0], {"c-1": 2})
    rewrite(harness, hours[1], {"c-1": 2})
    harness.write_marker(hours.final(2))
    body = json.dumps(DEVELOPMENT_STATES[kind](hours[0])).encode()
    harness.write_state_bytes(body)
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 4, result.output
    assert f"state {harness.state_display} " in result.output
    assert "it was left untouched: fix or restore it" in result.output
    assert harness.state_bytes() == body
    assert harness.clazar.metering_calls == 0 and harness.ledger_lines() == []
    assert harness.report("status").returncode == 4


def test_hours_the_original_script_billed_are_never_billed_again_and_named_once_as_not_checked(harness, hours):
    # The original script's state: hours up to hour 1 billed, no marks of what they held.
    harness.write_state_bytes(json.dumps({KEY: {"last_processed_hour": iso(hours[1])}}).encode())
    for i in range(3):
        rewrite(harness, hours[i], {"c-1": 10})
    harness.write_marker(hours.final(3))
    env = CARRY
    first = harness.run(env=env)
    assert first.returncode == 0, first.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[2])): 10}
    warning = ("LATE_USAGE_LOOKBACK_HOURS is now 24, but the marks of processed hours were kept for 0: hours "
               f"{hours[1] - timedelta(hours=23):%Y-%m-%d %H:%M:%S} to {hours[1]:%Y-%m-%d %H:%M:%S} are not checked "
               "for late usage")
    assert first.output.count(warning) == 1, first.output
    # Hour 1 grows after the upgrade: it has no mark to compare with, so it is not billed
    # again; hour 2, billed by this exporter, is compared.
    rewrite(harness, hours[1], {"c-1": 11})
    rewrite(harness, hours[2], {"c-1": 12})
    rewrite(harness, hours[3], {"c-1": 1})
    harness.write_marker(hours.final(4))
    second = harness.run(env=env)
    assert second.returncode == 0, second.output
    assert "not checked for late usage" not in second.output, "named once"
    assert "now shows 2 more cpu_core_hours for contract c-1" in second.output
    assert f"hour {hours[1]:%Y-%m-%d %H:%M:%S}, already billed" not in second.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[2])): 10,
                                                    ("c-1", "cpu_core_hours", iso(hours[3])): 3}
    assert harness.state()["version"] == 2 and harness.entry() == {"last_processed_hour": iso(hours[3]),
                                                                   "hours_by_marker": True}
