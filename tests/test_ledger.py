"""The audit ledger, reconcile, late usage and history, end to end, with the ledger
on disk and in S3."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
from clazar_standin import status
from conftest import SERVICE, fabricate_waiting, ledger_waiting, metric_value, put_ledger_files
from export_data import GIB, iso, record, service_key

KEY = service_key(SERVICE)
GIB_HOURS = {"DIMENSION1_NAME": "memory_gib_hours", "DIMENSION1_FORMULA": "memory_byte_hours / 1073741824",
             "DIMENSION2_NAME": "cpu_core_hours", "DIMENSION2_FORMULA": "cpu_core_hours"}


def usage(hour, contract, subscription, dimension, value, **extra):
    return record(SERVICE, hour, contract=contract, subscription=subscription, dimension=dimension, value=value, **extra)


def ledger_lines(harness) -> list[dict]:
    return harness.ledger_lines()


def records(lines, kind="record"):
    return [line for line in lines if line["kind"] == kind]


def test_every_billed_record_is_in_the_ledger_once_with_its_carry(backend_harness, hours):
    harness = backend_harness
    for i in range(3):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [
            usage(hours[i], "c-1", "sub-AAAAAAAAAA", "memory_byte_hours", GIB // 2),
            usage(hours[i], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2, pod="db-1")]})
    harness.write_marker(hours.final(3))
    result = harness.run(env={"START_HOUR": iso(hours[0]), **GIB_HOURS})
    assert result.returncode == 0, result.output
    lines = records(ledger_lines(harness))
    by_key = {(line["dimension"], line["hour"]): line for line in lines}
    assert len(by_key) == len(lines) == 6
    accepted = harness.clazar.accepted
    for i in range(3):
        cpu = by_key["cpu_core_hours", iso(hours[i])]
        assert cpu["quantity"] == 2 and cpu["outcome"] == "delivered" and cpu["cloud"] == "aws"
        assert cpu["amount"] == "2" and cpu["carried_in"] == "0"
        assert cpu["record_id"] == accepted["c-1", "cpu_core_hours", iso(hours[i])]["id"]
        assert "service" not in cpu, "one deployment, one line per contract, dimension and hour"
    # Half a GiB-hour an hour: 0 (1/2 carried), 1 (using the 1/2 carried in), 0 (1/2 carried).
    memory = [by_key["memory_gib_hours", iso(hours[i])] for i in range(3)]
    assert [(m["quantity"], m["carried_in"], m["amount"], m["outcome"]) for m in memory] == [
        (0, "0", "0.5", "not sent: zero quantity"), (1, "0.5", "0.5", "delivered"), (0, "0", "0.5", "not sent: zero quantity")]
    assert harness.state()["deployment"]["remainders"] == {"c-1": {"memory_gib_hours": "0.5"}}
    # One file per hour of the deployment, in a folder per day: <ledger>/<day>/<day>THH.jsonl.
    names = [f"{hours[i]:%Y-%m-%d}/{hours[i]:%Y-%m-%dT%H}.jsonl" for i in range(3)]
    if harness.state_in_s3:
        prefix = harness.state_key.rpartition("/")[0] + "/metering_ledger/"
        listed = harness.s3.list_objects_v2(Bucket=harness.state_bucket, Prefix=prefix)["Contents"]
        assert sorted(item["Key"][len(prefix):] for item in listed) == sorted(names)
    else:
        folder = harness.state_path.parent / "metering_ledger"
        assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()) == sorted(names)


# Writes of the state: the pinned first hour, the pending hour, then the commit.
@pytest.mark.parametrize("fault", [{"FAULT_KILL_BEFORE_STATE_WRITE": "3"}, {"FAULT_KILL_AFTER_BATCH": "1"}],
                         ids=["between-ledger-and-commit", "after-a-batch"])
def test_a_crash_between_ledger_and_commit_leaves_no_duplicate_lines(backend_harness, hours, fault):
    harness = backend_harness
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [usage(hours[0], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 3),
                                                     usage(hours[0], "c-2", "sub-AAAAAAAAAA", "cpu_core_hours", 4, pod="x")]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "1"}
    assert harness.run(env=env, faults=fault).returncode == -9
    assert harness.state()["deployment"]["pending_hour"]["hour"] == iso(hours[0])
    if "FAULT_KILL_BEFORE_STATE_WRITE" in fault:
        assert len(records(ledger_lines(harness))) == 2, "the ledger is ahead of the state"
    if harness.state_in_s3:
        harness.expire_lease()
    calls = harness.clazar.metering_calls
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert "pending_hour" not in harness.state()["deployment"]
    lines = records(ledger_lines(harness))
    assert Counter((line["contract_id"], line["hour"]) for line in lines) == {("c-1", iso(hours[0])): 1,
                                                                              ("c-2", iso(hours[0])): 1}
    assert all(line["outcome"] in ("delivered", "already delivered") for line in lines)
    if "FAULT_KILL_BEFORE_STATE_WRITE" in fault:
        # Both records were answered before the crash: nothing is sent again, and the ids
        # Clazar gave the first time stay in the ledger.
        assert harness.clazar.metering_calls == calls
        ids = {line["contract_id"]: line["record_id"] for line in lines}
        assert ids == {contract: harness.clazar.accepted[contract, "cpu_core_hours", iso(hours[0])]["id"]
                       for contract in ("c-1", "c-2")}


def write_month(harness, hours, count):
    """``count`` hours of a 512 MiB pod and a 2-core pod for two contracts."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        harness.write_hour(hours[i], {
            "sub-AAAAAAAAAA": [usage(hours[i], "c-1", "sub-AAAAAAAAAA", "memory_byte_hours", 512 * 1024**2),
                               usage(hours[i], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2, pod="db-1")],
            "sub-BBBBBBBBBB": [usage(hours[i], "c-2", "sub-BBBBBBBBBB", "memory_byte_hours", 3 * GIB // 4)]})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))
    harness.write_marker(hours.final(count))


@pytest.mark.slow
def test_a_clean_month_reconciles_to_zero_differences(harness, hours_month):
    hours, count = hours_month
    write_month(harness, hours, count)
    env = {"START_HOUR": iso(hours[0]), "MAX_HOURS_PER_RUN": str(count), **GIB_HOURS}
    result = harness.run(env=env, timeout=600)
    assert result.returncode == 0, result.output[-2000:]
    check = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[count - 1]), "--json", env=env,
                           timeout=600)
    assert check.returncode == 0, check.output[-3000:]
    report = json.loads(check.output)
    assert report["differences"] == []
    rows = {(row["contract_id"], row["dimension"]): row for row in report["rows"]}
    assert rows["c-1", "memory_gib_hours"]["expected"] == rows["c-1", "memory_gib_hours"]["billed"] == count // 2
    assert rows["c-2", "memory_gib_hours"]["billed"] == (3 * count) // 4
    assert rows["c-1", "cpu_core_hours"]["billed"] == 2 * count
    text = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[count - 1]), env=env, timeout=600)
    assert text.returncode == 0 and "Everything matches." in text.output
    csv = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[count - 1]), "--csv", env=env, timeout=600)
    assert csv.output.splitlines()[0] == "contract_id,dimension,expected,billed,difference,rejected,conflict"
    assert f"c-1,cpu_core_hours,{2 * count},{2 * count},0,0,0" in csv.output.splitlines()


@pytest.fixture
def hours_month(hours):
    """A month of hours, ending well in the past."""
    from export_data import current_hour

    count = 30 * 24
    start = current_hour() - timedelta(hours=count + 3)

    class Month:
        def __getitem__(self, index):
            return start + timedelta(hours=index)

        def final(self, n):
            return start + timedelta(hours=n)

    return Month(), count


def test_a_file_added_to_a_billed_hour_is_reported_and_reconcile_names_it(backend_harness, hours, tmp_path):
    harness = backend_harness
    for i in range(3):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [usage(hours[i], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2)]})
    harness.write_marker(hours.final(2))
    metrics = tmp_path / "metering.prom"
    env = {"START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    assert harness.run(env=env).returncode == 0
    # A late export adds a subscription's file to hour 1, after it was billed.
    harness.write_hour(hours[1], {"sub-LATELATE01": [usage(hours[1], "c-1", "sub-LATELATE01", "cpu_core_hours", 5)]})
    check = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[1]), env=env)
    assert check.returncode == 1
    assert f"DIFFERENCE contract c-1 cpu_core_hours hour {iso(hours[1])}: expected 7, billed 2" in check.output
    harness.write_marker(hours.final(3))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert "Late usage: hour" in result.output and "now shows 5 more cpu_core_hours for contract c-1" in result.output
    assert "reported only" in result.output
    assert metric_value(metrics.read_text(), "metering_run_late_usage") == 1
    # Nothing was sent again for the old hour, and hour 2 was billed as usual.
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[i])): 2 for i in range(3)}
    assert sum(1 for _ in harness.clazar.received) == 3
    late = records(ledger_lines(harness), "late")
    assert [(line["hour"], line["difference"], line["action"]) for line in late] == [(iso(hours[1]), "5", "reported")]
    status = json.loads(harness.report("status", "--json", env=env).output)
    assert status["late_usage_found"] == 1 and status["last_late_usage"]["difference"] == "5"
    # Found once, not again on every run.
    again = harness.run(env=env)
    assert "Late usage" not in again.output
    assert metric_value(metrics.read_text(), "metering_run_late_usage") == 0
    assert harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[2]), env=env).returncode == 1


def test_late_usage_carried_is_billed_once_in_a_later_hour_and_reconcile_is_then_clean(backend_harness, hours):
    harness = backend_harness
    for i in range(4):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [usage(hours[i], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2)]})
    harness.write_marker(hours.final(2))
    env = {"START_HOUR": iso(hours[0]), "LATE_USAGE": "carry"}
    assert harness.run(env=env).returncode == 0
    # Hour 0 is rewritten with more usage, and a second contract appears in hour 1.
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [usage(hours[0], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2.5)]})
    harness.write_hour(hours[1], {"sub-CCCCCCCCCC": [usage(hours[1], "c-3", "sub-CCCCCCCCCC", "cpu_core_hours", 4)]})
    harness.write_marker(hours.final(4))
    # The run is killed at the state write that commits its late check, before anything
    # of it reaches the ledger (late lines are written only after that write).
    killed = harness.run(env=env, faults={"FAULT_KILL_BEFORE_STATE_WRITE": "1"})
    assert killed.returncode == -9 and killed.output.count("carried to the next hour") == 2
    assert records(ledger_lines(harness), "late") == []
    if harness.state_in_s3:
        harness.expire_lease()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert result.output.count("carried to the next hour") == 2
    accepted = harness.clazar.accepted_quantities()
    # c-1: 2 + 0.5 late in hour 2, billed with it: 2 units then (the half waits); c-3's 4 units come in hour 2 too.
    assert accepted == {("c-1", "cpu_core_hours", iso(hours[0])): 2, ("c-1", "cpu_core_hours", iso(hours[1])): 2,
                        ("c-1", "cpu_core_hours", iso(hours[2])): 2, ("c-1", "cpu_core_hours", iso(hours[3])): 2,
                        ("c-3", "cpu_core_hours", iso(hours[2])): 4}
    assert harness.state()["deployment"]["remainders"] == {"c-1": {"cpu_core_hours": "0.5"}}
    late = records(ledger_lines(harness), "late")
    assert sorted((line["contract_id"], line["difference"], line["action"], line["check"]) for line in late) == [
        ("c-1", "0.5", "carried", 1), ("c-3", "4", "carried", 1)]
    check = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[3]), env=env)
    assert check.returncode == 0, check.output
    assert "Everything matches." in check.output
    assert harness.run(env=env).returncode == 0
    assert harness.clazar.accepted_quantities() == accepted, "nothing is billed twice"


def test_a_rejected_then_retried_record_reconciles(harness, hours):
    harness.clazar.known_contracts = {"c-1"}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [usage(hours[0], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2),
                                                     usage(hours[0], "c-2", "sub-AAAAAAAAAA", "cpu_core_hours", 3, pod="x")]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    assert harness.run(env=env).returncode == 1
    check = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), "--json", env=env)
    assert check.returncode == 1
    assert json.loads(check.output)["differences"] == [{
        "contract_id": "c-2", "dimension": "cpu_core_hours", "hour": iso(hours[0]),
        "expected": 3, "billed": 0, "difference": 3, "rejected": 3, "conflict": 0}]
    assert [line["contract_id"] for line in ledger_waiting(harness)] == ["c-2"]
    harness.clazar.known_contracts = None
    assert harness.run("retry-failed", env=env).returncode == 0
    assert harness.run("retry-failed", env=env).returncode == 0
    assert ledger_waiting(harness) == []
    check = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), env=env)
    assert check.returncode == 0, check.output
    history = json.loads(harness.report("history", "--contract", "c-2", "--json", env=env).output)
    assert [(line["outcome"], line["quantity"]) for line in history] == [
        ("rejected", 3), ("resending", 3), ("delivered on retry", 3)]


def test_history_of_one_contract(harness, hours):
    for i in range(3):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [usage(hours[i], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", i + 1),
                                                         usage(hours[i], "c-other", "sub-AAAAAAAAAA", "replica_hours", 1)]})
    harness.write_marker(hours.final(3))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 0
    text = harness.run("history", "--contract", "c-1", "--from", iso(hours[1]), "--to", iso(hours[2]))
    assert text.returncode == 0, text.output
    assert text.output.count("cpu_core_hours") == 2 and "c-other" not in text.output and "replica_hours" not in text.output
    assert "5 unit(s) billed" in text.output
    assert harness.report("history", "--contract", "c-unknown").output.startswith("Nothing in the ledger")


def old_ledger_file(hour: str) -> bytes:
    """A ledger file as an exporter wrote it, for an hour long past."""
    return (json.dumps({"kind": "record", "contract_id": "c-old", "dimension": "cpu_core_hours",
                        "hour": f"{hour}:00:00Z", "cloud": "aws", "quantity": 2, "outcome": "delivered",
                        "at": f"{hour}:05:00Z", "record_id": "r-1", "amount": "2", "carried_in": "0"})
            + "\n").encode()


def ledger_file_names(harness) -> set[str]:
    if harness.state_in_s3:
        prefix = harness.state_key.rpartition("/")[0] + "/metering_ledger/"
        pages = harness.s3.get_paginator("list_objects_v2").paginate(Bucket=harness.state_bucket, Prefix=prefix)
        return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", ())}
    folder = harness.state_path.parent / "metering_ledger"
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_ledger_days_past_retention_are_deleted_and_nothing_else(backend_harness, hours):
    harness = backend_harness
    ours = {"2020-01-01/2020-01-01T00.jsonl": old_ledger_file("2020-01-01T00"),
            "2020-01-01/2020-01-01T01.jsonl": old_ledger_file("2020-01-01T01")}
    foreign = {
        "2020-01-01/2020-01-01T02.jsonl": b"{}\n",  # named like a ledger file, but not ledger lines
        "2020-01-01/notes.txt": b"keep me\n",
        "2019-05-01/invoices/0001.pdf": b"%PDF-1.7",  # a date-named folder of other data (issue 19)
        "archive/2019-06-01T00.jsonl": old_ledger_file("2019-06-01T00"),  # outside any day folder
    }
    put_ledger_files(harness, {**ours, **foreign})
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [usage(hours[0], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "LEDGER_RETENTION_DAYS": "30"})
    assert result.returncode == 0, result.output
    assert "Deleted 2 ledger file(s) older than 30 days" in result.output
    [warning] = [line for line in result.lines("WARNING") if "did not write" in line]
    display = (f"s3://{harness.state_bucket}/{harness.state_key.rpartition('/')[0]}/metering_ledger"
               if harness.state_in_s3 else str(harness.state_path.parent / "metering_ledger"))
    assert f"Left 3 item(s) in old ledger day folders of {display} that this exporter did not write" in warning
    for name in ("2019-05-01/invoices", "2020-01-01/2020-01-01T02.jsonl", "2020-01-01/notes.txt"):
        assert name in warning
    today = f"{hours[0]:%Y-%m-%d}/{hours[0]:%Y-%m-%dT%H}.jsonl"
    assert ledger_file_names(harness) == set(foreign) | {today}
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}


def test_ledger_days_where_records_still_wait_are_kept_past_retention(harness, hours):
    long_ago = hours[0] - timedelta(days=60)
    fabricate_waiting(harness, [long_ago], ["c-9"])
    put_ledger_files(harness, {"2020-01-01/2020-01-01T00.jsonl": old_ledger_file("2020-01-01T00")})
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "LEDGER_RETENTION_DAYS": "30"})
    assert result.returncode == 0, result.output
    assert "Deleted 1 ledger file(s) older than 30 days" in result.output
    assert ledger_file_names(harness) == {f"{long_ago:%Y-%m-%d}/{long_ago:%Y-%m-%dT%H}.jsonl"}
    assert [line["contract_id"] for line in ledger_waiting(harness)] == ["c-9"]
    assert json.loads(harness.report("status", "--json").output)["rejected_waiting"] == 1


def test_a_ledger_file_that_cannot_be_deleted_warns_and_fails_nothing(harness, hours, monkeypatch):
    import os

    put_ledger_files(harness, {"2020-01-01/2020-01-01T00.jsonl": old_ledger_file("2020-01-01T00")})
    old = str(harness.state_path.parent / "metering_ledger" / "2020-01-01")
    unlink = os.unlink

    def refuse(path, *arguments, **options):  # as a file of another user, or a read-only mount, would
        if str(path).startswith(old):
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *arguments, **options)

    monkeypatch.setattr(os, "unlink", refuse)
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [usage(hours[0], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "LEDGER_RETENTION_DAYS": "30"})
    assert result.returncode == 0, result.output
    [warning] = [line for line in result.lines("WARNING") if "Could not delete" in line]
    assert "Could not delete ledger days older than 30 days (tried again next run)" in warning
    assert "2020-01-01T00.jsonl" in warning and "Permission denied" in warning
    assert os.path.exists(old + "/2020-01-01T00.jsonl")
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert harness.state()["deployment"]["last_processed_hour"] == iso(hours[0])


def test_the_ledger_path_can_be_set_apart_from_the_state(harness, hours, tmp_path):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [usage(hours[0], "c-1", "sub-AAAAAAAAAA", "cpu_core_hours", 2)]})
    harness.write_marker(hours.final(1))
    harness.clazar.faults.append(status(503))
    assert harness.run(env={"START_HOUR": iso(hours[0]), "LEDGER_PATH": str(tmp_path / "books")}).returncode == 0
    assert list((tmp_path / "books").rglob("*.jsonl"))
    assert not (harness.state_path.parent / "metering_ledger").exists()
