"""The deployment as the billing unit, end to end against SeaweedFS and the stand-in: every
way issue 18 (and issue 20's two marketplaces) showed 1.0.0 billing wrong, tried as an
adversary would, each checked against what Clazar accepted and what the state, the ledger
and the log say."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import export_data
import pytest
from clazar_standin import call, status
from conftest import SERVICE, answer_first_request_of, ledger_waiting, metric_value
from export_data import GIB, current_hour, iso, service_key

A = SERVICE
B = ("Acme Vector DB", "PROD", "pt-Zr4Wq8Ny2M")
KEY_A, KEY_B = service_key(A), service_key(B)
LABEL_A, LABEL_B = "/".join(A), "/".join(B)
ONE_SERVICE_VARIABLES = {"SERVICE_NAME": None, "ENVIRONMENT_TYPE": None, "PLAN_ID": None}


def services(*items: str) -> dict:
    """The environment of a deployment of these SERVICES items."""
    return {**ONE_SERVICE_VARIABLES, "SERVICES": ",".join(items)}


BOTH = services(KEY_A, KEY_B)


def row(service, hour, contract, value, dimension="cpu_core_hours", subscription="sub-AAAAAAAAAA", **extra):
    return export_data.record(service, hour, contract=contract, subscription=subscription, dimension=dimension,
                              value=value, **extra)


def write(harness, service, hour, files: dict) -> None:
    harness.write_hour(hour, files, service=service)


def finals(harness, **by_key) -> None:
    """The export marker: each service key (A or B) final before its moment."""
    keys = {"A": KEY_A, "B": KEY_B}
    export_data.write_marker(harness.s3, harness.bucket, {keys[name]: moment for name, moment in by_key.items()})


def deployment(harness) -> dict:
    return harness.state()["deployment"]


def records(harness, hour=None) -> list[dict]:
    return [line for line in harness.ledger_lines()
            if line["kind"] == "record" and (hour is None or line["hour"] == iso(hour))]


def summary(result) -> str:
    [line] = [line for line in result.output.splitlines() if " - Finished: " in line]
    return line


def held_by_someone_else(harness, contract, hour, quantity, dimension="cpu_core_hours"):
    with harness.clazar.lock:
        harness.clazar.accepted[contract, dimension, iso(hour)] = {"quantity": str(quantity)}


# --- a contract shared by two services is one record ------------------------------------------------


def test_a_contract_shared_by_two_services_is_one_record_of_their_sum(harness, hours, tmp_path):
    write(harness, A, hours[0], {"sub-AAAAAAAAAA": [row(A, hours[0], "c-1", 2)]})
    write(harness, B, hours[0], {"sub-BBBBBBBBBB": [row(B, hours[0], "c-1", 5, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(1), B=hours.final(1))
    metrics = tmp_path / "metering.prom"
    result = harness.run(env={**BOTH, "START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)})
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 7}
    assert len(harness.clazar.received) == 1, "one record, sent once"
    assert "Conflict" not in result.output and "already holds" not in result.output
    assert result.output.count(f"Starting processing for {LABEL_A}, {LABEL_B}") == 1
    for service in (A, B):
        assert result.output.count(f"Found 1 subscription files in {export_data.hour_prefix(service, hours[0])}") == 1
    assert "1 hour(s) processed, 1 record(s) sent, 0 already delivered, 0 rejected, 0 unattributable" in summary(result)
    [line] = records(harness)
    assert (line["contract_id"], line["quantity"], line["amount"], line["outcome"], line["cloud"]) == (
        "c-1", 7, "7", "delivered", "aws")
    assert "service" not in line
    state = harness.state()
    assert state[KEY_A] == state[KEY_B] == {"last_processed_hour": iso(hours[0]), "hours_by_marker": True}
    assert state["deployment"]["last_processed_hour"] == iso(hours[0])
    mark = state["deployment"]["accounted"][iso(hours[0])]
    assert mark["services"] == sorted([KEY_A, KEY_B]) and mark["amounts"] == {"c-1": {"cpu_core_hours": "7"}}
    assert metric_value(metrics.read_text(), "metering_run_records_sent", cloud="aws") == 1
    assert metric_value(metrics.read_text(), "metering_run_records_conflicting", cloud="aws") == 0


FAULTS = {
    # (the HTTP status c-1's request meets first, whether its records landed before it, retries)
    "503 after landing, retried by urllib3": (503, True, "5"),
    "500 before landing, hour left pending": (500, False, "0"),
    "500 after landing, hour left pending": (500, True, "0"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_shared_contract_whose_request_met_a_5xx_is_neither_lost_nor_excuses_another_records_conflict(
        harness, hours, fault):
    code, landed, retries = FAULTS[fault]
    h = hours[0]
    # c-1 is shared (2 in A, 5 in B); c-2 (B) is someone else's already; c-3 (A) is plain.
    write(harness, A, h, {"sub-AAAAAAAAAA": [row(A, h, "c-1", 2), row(A, h, "c-3", 4, pod="db-3")]})
    write(harness, B, h, {"sub-BBBBBBBBBB": [row(B, h, "c-1", 5, subscription="sub-BBBBBBBBBB"),
                                             row(B, h, "c-2", 3, subscription="sub-BBBBBBBBBB", pod="db-2")]})
    finals(harness, A=hours.final(1), B=hours.final(1))
    held_by_someone_else(harness, "c-2", h, 9)
    answer_first_request_of(harness.clazar, "c-1", code, land=landed)
    env = {**BOTH, "START_HOUR": iso(h), "CLAZAR_BATCH_SIZE": "1", "CLAZAR_MAX_RETRIES": retries}
    first = harness.run(env=env)
    assert first.returncode == 1, first.output
    assert f"ERROR - Conflict: Clazar already holds contract c-2 dimension cpu_core_hours hour {iso(h)}" in first.output
    assert "contract c-2 dimension cpu_core_hours hour " + iso(h) + "; counted as delivered" not in first.output
    outcomes = {line["contract_id"]: line["outcome"] for line in records(harness)}
    if retries == "0":
        # The 500 excuses c-1's request alone: c-1 may have landed, c-2 is a conflict, c-3 went through.
        assert outcomes == {"c-1": "sent, no answer yet", "c-2": "conflict", "c-3": "delivered"}
        assert deployment(harness)["pending_hour"]["hour"] == iso(h)
        assert "last_processed_hour" not in deployment(harness)
        rerun = harness.run(env=env)
        # c-2's conflict, met by the first run, is counted again when the hour is committed.
        assert rerun.returncode == 1, rerun.output
        assert "committed with 1 record(s) an earlier attempt found rejected or in conflict, e.g. contract c-2" \
            in rerun.output
        assert "Resending pending hour" in rerun.output
        resent = [sent["contract_id"] for sent, _ in harness.clazar.received][-1]
        assert resent == "c-1", "only the record without an answer is resent"
        final = "already delivered" if landed else "delivered"
    else:
        # urllib3 retried c-1's request after the 503: its "already exists" is ours.
        assert ("Clazar already holds contract c-1 dimension cpu_core_hours hour " + iso(h)
                + "; counted as delivered: its request was retried after an answer was lost") in first.output
        final = "already delivered"
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(h)): 7,
                                                    ("c-2", "cpu_core_hours", iso(h)): 9,
                                                    ("c-3", "cpu_core_hours", iso(h)): 4}
    latest = {line["contract_id"]: line for line in records(harness)}
    assert {contract: line["outcome"] for contract, line in latest.items()} == {
        "c-1": final, "c-2": "conflict", "c-3": "delivered"}
    assert latest["c-1"]["quantity"] == 7 and latest["c-2"]["quantity"] == 3
    assert [line["contract_id"] for line in ledger_waiting(harness, "conflict")] == ["c-2"]
    assert deployment(harness)["waiting"] == {iso(h): {"conflict": 1}} and "pending_hour" not in deployment(harness)
    assert deployment(harness)["last_processed_hour"] == iso(h)
    check = harness.report("reconcile", "--from", iso(h), "--to", iso(h), "--json", env=env)
    assert [(d["contract_id"], d["expected"], d["billed"], d["conflict"]) for d in json.loads(check.output)[
        "differences"]] == [("c-2", 3, 0, 3)]


# --- a contract moving between plans keeps its fractions --------------------------------------------------


def test_a_contract_moving_between_plans_keeps_its_fractions(harness, hours):
    write(harness, A, hours[0], {"sub-AAAAAAAAAA": [row(A, hours[0], "c-1", 0.9)]})
    write(harness, B, hours[1], {"sub-BBBBBBBBBB": [row(B, hours[1], "c-1", 0.9, subscription="sub-BBBBBBBBBB")]})
    write(harness, A, hours[2], {"sub-AAAAAAAAAA": [row(A, hours[2], "c-1", 0.2)]})
    finals(harness, A=hours.final(3), B=hours.final(3))
    result = harness.run(env={**BOTH, "START_HOUR": iso(hours[0])})
    assert result.returncode == 0, result.output
    # Used 0.9 + 0.9 + 0.2 = 2.0: one unit with hour 1, one with hour 2.
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[1])): 1,
                                                    ("c-1", "cpu_core_hours", iso(hours[2])): 1}
    lines = [(line["hour"], line["quantity"], line["amount"], line["carried_in"], line["outcome"])
             for line in records(harness)]
    assert lines == [(iso(hours[0]), 0, "0.9", "0", "not sent: zero quantity"),
                     (iso(hours[1]), 1, "0.9", "0.9", "delivered"),
                     (iso(hours[2]), 1, "0.2", "0.8", "delivered")]
    assert deployment(harness)["remainders"] == {}


# --- a dividing formula over JSON doubles ---------------------------------------------------------------

PER_REPLICA = {"DIMENSION1_NAME": "memory_gib_per_replica",
               "DIMENSION1_FORMULA": "memory_byte_hours / replica_hours / 1073741824"}


def doubles(i: int, service: int) -> tuple[float, float]:
    """(memory_byte_hours, replica_hours) of hour ``i``: JSON doubles, none of them integers,
    whose exact fractions have large, different denominators hour after hour."""
    return 1.5e9 + i * 1234567.891 + service * 0.37, 0.7 + (i % 11) * 0.13 + service * 0.011


def exact(value: float) -> Fraction:
    """A JSON double as the exporter reads it: its shortest text, exactly."""
    return Fraction(Decimal(json.dumps(value)))


def test_a_dividing_formula_over_doubles_keeps_the_state_readable_and_billing_on(harness):
    count = 64
    start = current_hour() - timedelta(hours=count + 6)
    hour = [start + timedelta(hours=i) for i in range(count + 1)]

    def write_one(i):
        for index, service in enumerate((A, B)):
            memory, replicas = doubles(i, index)
            sub = f"sub-{'AB'[index] * 10}"
            write(harness, service, hour[i], {sub: [
                row(service, hour[i], "c-1", memory, "memory_byte_hours", subscription=sub),
                row(service, hour[i], "c-1", replicas, "replica_hours", subscription=sub)]})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write_one, range(count + 1)))
    finals(harness, A=hour[count], B=hour[count])
    env = {**BOTH, **PER_REPLICA, "START_HOUR": iso(start), "MAX_HOURS_PER_RUN": "100"}
    result = harness.run(env=env, timeout=600)
    assert result.returncode == 0, result.output[-3000:]
    # The oracle: per hour, the formula per service, summed, rounded down to 1e-9; then carry.
    expected, remainder, used = {}, Fraction(0), Fraction(0)
    for i in range(count + 1):
        amount = sum(exact(m) / exact(r) / GIB for m, r in (doubles(i, 0), doubles(i, 1)))
        used += amount if i < count else 0
        amount = Fraction(math.floor(amount * 10**9), 10**9)
        whole = math.floor(amount + remainder)
        remainder = amount + remainder - whole
        if whole:
            expected["c-1", "memory_gib_per_replica", iso(hour[i])] = whole
        if i == count - 1:
            through_run_1 = dict(expected)
    assert harness.clazar.accepted_quantities() == through_run_1
    billed = sum(through_run_1.values())
    assert billed <= used < billed + 1 + count * Fraction(1, 10**9)
    # The state reads back: every amount it keeps is a decimal of at most nine places.
    body = harness.state_bytes().decode()
    for text in re.findall(r'"(-?[0-9][0-9./]*)"', body):
        assert re.fullmatch(r"-?[0-9]{1,30}(\.[0-9]{1,9})?", text), text
    assert len(body) < 40_000
    status = harness.report("status", "--json", env=env)
    assert status.returncode == 0 and json.loads(status.output)["last_processed_hour"] == iso(hour[count - 1])
    # And billing goes on: the next hour, in the next run.
    finals(harness, A=hour[count] + timedelta(hours=1), B=hour[count] + timedelta(hours=1))
    again = harness.run(env=env)
    assert again.returncode == 0, again.output
    assert harness.clazar.accepted_quantities() == expected
    scaled = remainder * 10**9
    assert scaled.denominator == 1 and 0 < remainder < 1
    assert deployment(harness)["remainders"] == {
        "c-1": {"memory_gib_per_replica": "0." + f"{scaled.numerator:09d}".rstrip("0")}}


# --- a pending hour the configuration no longer accepts ---------------------------------------------------

CHANGES = {
    # (the environment the hour was computed under, the one it is resent under, what the error names)
    "CLAZAR_CLOUD azure to aws": ({"CLAZAR_CLOUD": "azure"}, {"CLAZAR_CLOUD": "aws"},
                                  f"computed with {KEY_A} on azure, which is now configured as aws (2 azure "
                                  "record(s), e.g. contract c-1 dimension memory_byte_hours quantity 2147483648, "
                                  "above the 2147483647 one aws record may carry)"),
    "=cloud in SERVICES azure to aws": (services(KEY_A + "=azure"), services(KEY_A + "=aws"),
                                        f"computed with {KEY_A} on azure, which is now configured as aws (2 "
                                        "azure record(s), e.g. contract c-1 dimension memory_byte_hours quantity "
                                        "2147483648, above the 2147483647 one aws record may carry)"),
    "MAX_RECORD_QUANTITY unset": ({}, {"MAX_RECORD_QUANTITY": None},
                                  "above the 2147483647 one aws record may carry (MAX_RECORD_QUANTITY)"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_pending_hour_that_todays_configuration_refuses_sends_nothing_and_names_the_record(harness, hours, change):
    computed, resent, named = CHANGES[change]
    h = hours[0]
    write(harness, A, h, {"sub-AAAAAAAAAA": [row(A, h, "c-1", 2 * GIB, "memory_byte_hours"),
                                             row(A, h, "c-2", 1, pod="db-2")]})
    finals(harness, A=hours.final(1))
    base = {"START_HOUR": iso(h), "CLAZAR_MAX_RETRIES": "0",
            "MAX_RECORD_QUANTITY": None if "CLAZAR_CLOUD" in computed or "SERVICES" in computed else str(2**63 - 1)}
    harness.clazar.faults.append(status(500))
    first = harness.run(env={**base, **computed})
    assert first.returncode == 1, first.output
    pending = deployment(harness)["pending_hour"]
    cloud = "azure" if "azure" in change else "aws"
    assert {(r["contract_id"], r["quantity"], r["cloud"]) for r in pending["records"]} == {
        ("c-1", "2147483648", cloud), ("c-2", "1", cloud)}
    state_before, calls = harness.state_bytes(), harness.clazar.metering_calls
    refused = harness.run(env={**base, **resent})
    assert refused.returncode == 1, refused.output
    [error] = [line for line in refused.lines("ERROR") if "nothing of" in line and "Finished" not in line]
    assert named in error and f"{h:%Y-%m-%d %H:%M:%S}" in error
    assert "contract c-1 dimension memory_byte_hours" in error and "2147483648" in error, error
    assert harness.clazar.metering_calls == calls, "nothing of the hour was sent"
    assert harness.clazar.accepted_quantities() == {}
    assert json.loads(harness.state_bytes())["deployment"]["pending_hour"] == json.loads(state_before)[
        "deployment"]["pending_hour"]
    # Back to the configuration it was computed under, it goes out as it was computed.
    sent = harness.run(env={**base, **computed})
    assert sent.returncode == 0, sent.output
    assert harness.clazar.accepted_quantities() == {("c-1", "memory_byte_hours", iso(h)): 2147483648,
                                                    ("c-2", "cpu_core_hours", iso(h)): 1}
    assert {sent_record["cloud"] for sent_record, _ in harness.clazar.received} == {cloud}


# --- raising the lookback --------------------------------------------------------------------------------


def test_raising_the_lookback_never_drops_an_hour_silently(harness, hours):
    env = {"START_HOUR": iso(hours[0]), "LATE_USAGE": "carry", "LATE_USAGE_LOOKBACK_HOURS": "1"}
    for i in range(5):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 2)]})
    finals(harness, A=hours.final(5))
    assert harness.run(env=env).returncode == 0
    assert deployment(harness)["marks_hours"] == 1 and list(deployment(harness)["accounted"]) == [iso(hours[4])]
    # The lookback goes up to 24; then hour 1 (3 back) grows from 2 to 9, and hour 4 from 2 to 3.
    env["LATE_USAGE_LOOKBACK_HOURS"] = "24"
    write(harness, A, hours[1], {"sub-AAAAAAAAAA": [row(A, hours[1], "c-1", 9)]})
    write(harness, A, hours[4], {"sub-AAAAAAAAAA": [row(A, hours[4], "c-1", 3)]})
    write(harness, A, hours[5], {"sub-AAAAAAAAAA": [row(A, hours[5], "c-1", 2)]})
    finals(harness, A=hours.final(6))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    [named] = [line for line in result.lines("WARNING") if "LATE_USAGE_LOOKBACK_HOURS is now 24" in line]
    assert (f"the marks of processed hours were kept for 1: hours {hours[0]:%Y-%m-%d %H:%M:%S} to "
            f"{hours[3]:%Y-%m-%d %H:%M:%S} are not checked for late usage") in named
    # Hour 4, whose mark was kept, is compared and its growth carried; hour 1, named, is not.
    assert "hour " + f"{hours[4]:%Y-%m-%d %H:%M:%S}" + ", already billed, now shows 1 more" in result.output
    late = [(line["hour"], line["difference"]) for line in harness.ledger_lines() if line["kind"] == "late"]
    assert late == [(iso(hours[4]), "1")]
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[5]))] == 3
    assert deployment(harness)["marks_hours"] == 24
    # Named once; and from now on the marks are kept for 24 hours: hour 5 grows 3 hours later, and is carried.
    for i in (6, 7, 8):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 2)]})
    finals(harness, A=hours.final(9))
    assert harness.run(env=env).returncode == 0
    write(harness, A, hours[5], {"sub-AAAAAAAAAA": [row(A, hours[5], "c-1", 6)]})
    write(harness, A, hours[9], {"sub-AAAAAAAAAA": [row(A, hours[9], "c-1", 2)]})
    finals(harness, A=hours.final(10))
    later = harness.run(env=env)
    assert later.returncode == 0 and "not checked for late usage" not in later.output, later.output
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[9]))] == 6


# --- a file rewritten between LIST and GET ----------------------------------------------------------------


def test_a_file_rewritten_between_list_and_get_then_restored_is_seen_by_the_late_check(harness, hours, monkeypatch):
    import botocore.client

    h = hours[0]
    listed = [row(A, h, "c-1", 10)]
    write(harness, A, h, {"sub-AAAAAAAAAA": listed})
    finals(harness, A=hours.final(1))
    prefix = export_data.hour_prefix(A, h)
    original, rewritten = botocore.client.BaseClient._make_api_call, []

    def make_api_call(client, operation, params):
        answer = original(client, operation, params)
        if operation == "ListObjectsV2" and params.get("Prefix") == prefix and not rewritten:
            # After the listing, before the body is read: Omnistrate rewrites the file.
            rewritten.append(answer["Contents"][0]["ETag"])
            write(harness, A, h, {"sub-AAAAAAAAAA": [row(A, h, "c-1", 4)]})
        return answer

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", make_api_call)
    env = {"START_HOUR": iso(h), "LATE_USAGE": "carry"}
    first = harness.run(env=env)
    assert first.returncode == 0, first.output
    assert len(rewritten) == 1, "the file was rewritten between the listing and the read"
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(h)): 4}
    monkeypatch.undo()
    # The file returns to the bytes that were listed (the same ETag as then).
    write(harness, A, h, {"sub-AAAAAAAAAA": listed})
    key = prefix + "sub-AAAAAAAAAA.json"
    assert harness.s3.head_object(Bucket=harness.bucket, Key=key)["ETag"] == rewritten[0]
    write(harness, A, hours[1], {"sub-AAAAAAAAAA": [row(A, hours[1], "c-3", 1)]})
    finals(harness, A=hours.final(2))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert "now shows 6 more cpu_core_hours for contract c-1 (carried to the next hour)" in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(h)): 4,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 6,
                                                    ("c-3", "cpu_core_hours", iso(hours[1])): 1}
    check = harness.run("reconcile", "--from", iso(h), "--to", iso(hours[1]), env=env)
    assert check.returncode == 0 and "Everything matches." in check.output, check.output


# --- rows of two subscriptions never collapse ------------------------------------------------------------


@pytest.mark.parametrize("missing", [("podName", "instanceId", "hostName"),
                                     ("podName", "instanceId", "hostName", "subscriptionId")],
                         ids=["no pod, instance or host", "no subscription either"])
def test_rows_of_two_subscription_files_are_summed_never_collapsed(harness, hours, missing):
    h = hours[0]

    def bare(contract, value, subscription):
        data = row(A, h, contract, value, subscription=subscription)
        for name in missing:
            data.pop(name)
        return data

    write(harness, A, h, {"sub-AAAAAAAAAA": [bare("c-1", 3, "sub-AAAAAAAAAA")],
                          "sub-BBBBBBBBBB": [bare("c-1", 3, "sub-BBBBBBBBBB")],
                          # Within one file, the same row twice is one row (Omnistrate's own rule).
                          "sub-CCCCCCCCCC": [bare("c-2", 3, "sub-CCCCCCCCCC")] * 2})
    finals(harness, A=hours.final(1))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(h)): 6,
                                                    ("c-2", "cpu_core_hours", iso(h)): 3}
    [warning] = [line for line in result.lines("WARNING") if "repeated row" in line]
    assert "1 repeated row(s)" in warning


# --- computed names never collide with data -------------------------------------------------------------

PRICES = {"DIMENSION1_NAME": "cpu_price", "DIMENSION1_FORMULA": "cpu_core_hours_total_price",
          "DIMENSION2_NAME": "cpu_core_hours", "DIMENSION2_FORMULA": "cpu_core_hours"}


@pytest.mark.parametrize("colliding_file", ["sub-0000000000", "sub-zzzzzzzzzz"], ids=["read first", "read last"])
def test_a_data_dimension_named_like_a_price_total_fails_the_hour_naming_it(harness, hours, colliding_file):
    h = hours[0]
    write(harness, A, h, {"sub-MMMMMMMMMM": [row(A, h, "c-1", 100, subscription="sub-MMMMMMMMMM", pricePerUnit=7000)],
                          colliding_file: [row(A, h, "c-1", 100, "cpu_core_hours_total_price",
                                               subscription=colliding_file)]})
    write(harness, A, hours[1], {"sub-MMMMMMMMMM": [row(A, hours[1], "c-1", 1, subscription="sub-MMMMMMMMMM",
                                                        pricePerUnit=3)]})
    finals(harness, A=hours.final(2))
    result = harness.run(env={"START_HOUR": iso(h), **PRICES})
    assert result.returncode == 1, result.output
    assert (f"hour {h:%Y-%m-%d %H:%M:%S}: the export holds a dimension 'cpu_core_hours_total_price' (contract c-1), "
            "which is also a name the formulas compute") in result.output
    assert harness.clazar.metering_calls == 0, "nothing of the hour, nor of the hours after it"
    assert "last_processed_hour" not in deployment(harness) and "pending_hour" not in deployment(harness)


def test_the_same_files_in_any_order_give_the_same_records(harness, hours):
    def rows(hour, first, second):
        # Two rows of one pod and dimension with equal values and different prices: the one
        # kept must not depend on which comes first.
        return [row(A, hour, "c-1", 5, subscription=first, pricePerUnit=2),
                row(A, hour, "c-1", 5, subscription=first, pricePerUnit=3)], \
            [row(A, hour, "c-1", 1, subscription=second, pod="db-9", pricePerUnit=4)]

    one, other = rows(hours[0], "sub-AAAAAAAAAA", "sub-BBBBBBBBBB")
    write(harness, A, hours[0], {"sub-AAAAAAAAAA": one, "sub-BBBBBBBBBB": other})
    one, other = rows(hours[1], "sub-BBBBBBBBBB", "sub-AAAAAAAAAA")  # names swapped, rows reversed
    write(harness, A, hours[1], {"sub-BBBBBBBBBB": one[::-1], "sub-AAAAAAAAAA": other})
    finals(harness, A=hours.final(2))
    result = harness.run(env={"START_HOUR": iso(hours[0]), **PRICES})
    assert result.returncode == 0, result.output
    accepted = harness.clazar.accepted_quantities()
    for hour in hours[0], hours[1]:
        assert {dimension: quantity for (_, dimension, at), quantity in accepted.items() if at == iso(hour)} == {
            "cpu_price": 5 * 3 + 4, "cpu_core_hours": 6}


# --- a run frozen past its S3 lease ----------------------------------------------------------------------


def test_a_run_frozen_past_its_lease_does_not_rewrite_the_ledger_of_the_run_that_took_over(harness, hours):
    harness.use_s3_state()
    h = hours[0]
    write(harness, A, h, {"sub-AAAAAAAAAA": [row(A, h, "c-1", 2)]})
    finals(harness, A=hours.final(1))
    env = {"START_HOUR": iso(h)}
    frozen, holder = threading.Event(), {}

    def freeze(_records):
        # Clazar has stored the records; the run is frozen before it reads the answer.
        os.kill(holder["pid"], signal.SIGSTOP)
        frozen.set()

    harness.clazar.faults.append(call(freeze))
    sleeper = harness.popen(env=env)
    holder["pid"] = sleeper.pid
    try:
        assert frozen.wait(120), "the frozen run never sent its hour"
        assert deployment(harness)["pending_hour"]["hour"] == iso(h)
        harness.expire_lease()  # its lease lapses while it sleeps
        taker = harness.run(env=env)
        assert taker.returncode == 0, taker.output
        assert "Took over the lease" in taker.output and "Resending pending hour" in taker.output
        state, ledger = harness.state_bytes(), records(harness)
        assert [(line["contract_id"], line["quantity"], line["outcome"]) for line in ledger] == [
            ("c-1", 2, "already delivered")]
    finally:
        os.kill(sleeper.pid, signal.SIGCONT)
    output, _ = sleeper.communicate(timeout=120)
    # It wakes with Clazar's answer ("delivered") and tries to write the hour's ledger file:
    # the write is conditional on the file not existing, and the other run wrote it.
    assert sleeper.returncode == 4, output
    assert "was changed by another run since this run read it; nothing was overwritten" in output
    assert records(harness) == ledger and harness.state_bytes() == state
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(h)): 2}
    check = harness.run("reconcile", "--from", iso(h), "--to", iso(h), env=env)
    assert check.returncode == 0 and "Everything matches." in check.output, check.output


# --- the lagging-service rule ----------------------------------------------------------------------------


def test_a_lagging_service_holds_the_deployments_later_hours_and_is_named(harness, hours, tmp_path):
    for i in range(5):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 1)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-2", 1, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(5), B=hours.final(2))
    metrics = tmp_path / "metering.prom"
    env = {**BOTH, "START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert sorted(harness.clazar.accepted_quantities()) == sorted(
        (contract, "cpu_core_hours", iso(hours[i])) for contract in ("c-1", "c-2") for i in (0, 1))
    assert (f"Hours from {hours[2]:%Y-%m-%d %H:%M:%S} wait for {KEY_B}, whose export is final only before "
            f"{iso(hours.final(2))}") in result.output
    assert summary(result).endswith(f"; waiting for {KEY_B}; 2 hour(s) sent past the marketplace's window")
    assert harness.state()[KEY_A]["last_processed_hour"] == harness.state()[KEY_B]["last_processed_hour"] == iso(
        hours[1])
    text = metrics.read_text()
    assert metric_value(text, "metering_service_holding", service=KEY_B) == 1
    assert metric_value(text, "metering_service_holding", service=KEY_A) == 0
    assert metric_value(text, "metering_export_final_before_timestamp_seconds", service=KEY_B) == \
        hours.final(2).timestamp()
    status = json.loads(harness.report("status", "--json", env=env).output)
    assert status["holding"] == KEY_B and status["hours_behind"] == 0
    assert [(row_["service"], row_["last_processed_hour"]) for row_ in status["services"]] == [
        (KEY_A, iso(hours[1])), (KEY_B, iso(hours[1]))]
    assert f"hours behind marker:   0 (waiting for {KEY_B})" in harness.report("status", env=env).output
    # B catches up: the held hours go out, with both services' usage.
    finals(harness, A=hours.final(5), B=hours.final(5))
    caught_up = harness.run(env=env)
    assert caught_up.returncode == 0, caught_up.output
    assert len(harness.clazar.accepted_quantities()) == 10 and "waiting for" not in summary(caught_up)
    assert metric_value(metrics.read_text(), "metering_service_holding", service=KEY_B) == 0
    assert json.loads(harness.report("status", "--json", env=env).output)["holding"] is None


@pytest.mark.parametrize("entry", ["missing", "malformed"])
def test_a_services_marker_entry_at_fault_stops_the_deployment_and_names_it(harness, hours, tmp_path, entry):
    for i in range(2):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 1)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-2", 1, subscription="sub-BBBBBBBBBB")]})
    marker = {KEY_A: {"last_processed_to": iso(hours.final(2) - timedelta(seconds=1))}}
    if entry == "malformed":
        marker[KEY_B] = {"last_processed_to": "yesterday"}
    harness.s3.put_object(Bucket=harness.bucket, Key=export_data.MARKER_KEY, Body=json.dumps(marker).encode())
    metrics = tmp_path / "metering.prom"
    env = {**BOTH, "START_HOUR": iso(hours[0]), "METRICS_FILE": str(metrics)}
    result = harness.run(env=env)
    assert result.returncode == 1, result.output
    problem = (f"export marker has no entry for {KEY_B!r}; it holds 1 key(s): {KEY_A!r}" if entry == "missing"
               else f"entry {KEY_B!r}")
    assert problem in result.output
    assert harness.clazar.metering_calls == 0, "A's final hours wait too: the deployment is one unit"
    assert f"; waiting for {KEY_B}; FAILED: " in summary(result)
    assert metric_value(metrics.read_text(), "metering_service_holding", service=KEY_B) == 1
    assert metric_value(metrics.read_text(), "metering_service_holding", service=KEY_A) == 0
    status = json.loads(harness.report("status", "--json", env=env).output)
    assert status["holding"] == KEY_B and status["hours_behind"] is None
    assert [row_["marker"].startswith("error: ") for row_ in status["services"]] == [False, True]


def test_a_bad_file_in_one_service_fails_the_hour_for_all(harness, hours):
    write(harness, A, hours[0], {"sub-AAAAAAAAAA": [row(A, hours[0], "c-1", 2)]})
    write(harness, B, hours[0], {"sub-BBBBBBBBBB": b'[{"value": "broken"'})
    broken = export_data.hour_prefix(B, hours[0]) + "sub-BBBBBBBBBB.json"
    write(harness, A, hours[1], {"sub-AAAAAAAAAA": [row(A, hours[1], "c-1", 2)]})
    write(harness, B, hours[1], {"sub-BBBBBBBBBB": [row(B, hours[1], "c-2", 3, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(2), B=hours.final(2))
    env = {**BOTH, "START_HOUR": iso(hours[0])}
    failed = harness.run(env=env)
    assert failed.returncode == 1, failed.output
    assert f"ERROR - {broken}" in failed.output
    assert harness.clazar.metering_calls == 0, "nothing of A's usage either, nor of the hour after"
    state = harness.state()
    assert "last_processed_hour" not in state["deployment"] and "pending_hour" not in state["deployment"]
    assert "last_processed_hour" not in state[KEY_A] and "last_processed_hour" not in state[KEY_B]
    write(harness, B, hours[0], {"sub-BBBBBBBBBB": [row(B, hours[0], "c-2", 3, subscription="sub-BBBBBBBBBB")]})
    fixed = harness.run(env=env)
    assert fixed.returncode == 0, fixed.output
    assert harness.clazar.accepted_quantities() == {
        (contract, "cpu_core_hours", iso(hours[i])): quantity
        for i in (0, 1) for contract, quantity in (("c-1", 2), ("c-2", 3))}


def test_a_service_added_to_services_starts_at_the_deployments_next_hour_with_one_warning(harness, hours):
    for i in range(4):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 1)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-2", 5, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(2), B=hours.final(2))
    assert harness.run(env={**services(KEY_A), "START_HOUR": iso(hours[0])}).returncode == 0
    finals(harness, A=hours.final(3), B=hours.final(3))
    env = {**BOTH, "START_HOUR": iso(hours[0])}
    added = harness.run(env=env)
    assert added.returncode == 0, added.output
    warnings = [line for line in added.lines("WARNING") if "new to this deployment" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"Service {KEY_B} is new to this deployment: it starts with hour {hours[2]:%Y-%m-%d %H:%M:%S}; its earlier "
        "hours are not billed")
    accepted = harness.clazar.accepted_quantities()
    assert [key for key in accepted if key[0] == "c-2"] == [("c-2", "cpu_core_hours", iso(hours[2]))], \
        "B's hours before the deployment's next hour are not billed"
    assert harness.state()[KEY_B]["last_processed_hour"] == iso(hours[2])
    finals(harness, A=hours.final(4), B=hours.final(4))
    later = harness.run(env=env)
    assert later.returncode == 0 and "new to this deployment" not in later.output, later.output
    assert harness.clazar.accepted_quantities()[("c-2", "cpu_core_hours", iso(hours[3]))] == 5


def test_a_service_added_while_an_hour_is_pending_starts_after_it_with_one_warning(harness, hours):
    for i in range(3):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 1)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-2", 5, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(2), B=hours.final(2))
    # Hour 0 is billed; hour 1 is left pending (its batch met a 500), computed from A alone.
    alone = {**services(KEY_A), "START_HOUR": iso(hours[0]), "CLAZAR_MAX_RETRIES": "0", "MAX_HOURS_PER_RUN": "1"}
    assert harness.run(env=alone).returncode == 0
    harness.clazar.faults.append(status(500))
    assert harness.run(env=alone).returncode == 1
    assert deployment(harness)["pending_hour"]["hour"] == iso(hours[1])
    # B joins while hour 1 is pending: hour 1 goes out as it was computed, so B starts with hour 2.
    finals(harness, A=hours.final(3), B=hours.final(3))
    env = {**BOTH, "START_HOUR": iso(hours[0])}
    added = harness.run(env=env)
    assert added.returncode == 0, added.output
    later = harness.run(env=env)
    assert later.returncode == 0, later.output
    warnings = [line for output in (added.output, later.output) for line in output.splitlines()
                if "new to this deployment" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"Service {KEY_B} is new to this deployment: it starts with hour {hours[2]:%Y-%m-%d %H:%M:%S}; its earlier "
        "hours are not billed"), warnings
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 1,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 1,
                                                    ("c-1", "cpu_core_hours", iso(hours[2])): 1,
                                                    ("c-2", "cpu_core_hours", iso(hours[2])): 5}
    state = harness.state()
    assert state[KEY_A]["last_processed_hour"] == state[KEY_B]["last_processed_hour"] == iso(hours[2])


def test_the_original_scripts_state_is_a_starting_point_and_keeps_each_services_hour_where_it_was(harness, hours):
    original = {KEY_A: {"last_processed_hour": iso(hours[1])}, KEY_B: {"last_processed_hour": iso(hours[3])}}
    harness.write_state_bytes(json.dumps(original).encode())
    for i in range(6):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 1)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-2", 10, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(4), B=hours.final(4))
    env = dict(BOTH)
    first = harness.run(env=env)
    assert first.returncode == 0, first.output
    assert "new to this deployment" not in first.output and "No previous processing found" not in first.output
    # The deployment starts after the service furthest behind (A); B, ahead, adds only to hours after its own.
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[2])): 1,
                                                    ("c-1", "cpu_core_hours", iso(hours[3])): 1}
    state = harness.state()
    assert state["version"] == 2 and state["deployment"]["last_processed_hour"] == iso(hours[3])
    # Where the original script kept each service's hour, and read it: state[key]["last_processed_hour"].
    assert state[KEY_A]["last_processed_hour"] == iso(hours[3]) and state[KEY_B]["last_processed_hour"] == iso(hours[3])
    finals(harness, A=hours.final(6), B=hours.final(6))
    second = harness.run(env=env)
    assert second.returncode == 0, second.output
    accepted = harness.clazar.accepted_quantities()
    assert {key: quantity for key, quantity in accepted.items() if key[2] in (iso(hours[4]), iso(hours[5]))} == {
        (contract, "cpu_core_hours", iso(hours[i])): quantity for i in (4, 5)
        for contract, quantity in (("c-1", 1), ("c-2", 10))}
    assert not [key for key in accepted if key[0] == "c-2" and key[2] <= iso(hours[3])], "never billed twice"
    state = harness.state()
    assert state[KEY_A]["last_processed_hour"] == state[KEY_B]["last_processed_hour"] == iso(hours[5])


# --- two marketplaces in one deployment (issue 20) ---------------------------------------------------------

MARKETPLACES = {**services(KEY_A + "=aws", KEY_B + "=azure"), "MAX_RECORD_QUANTITY": None}


def test_two_marketplaces_each_record_goes_out_with_its_services_cloud_limit_and_window(harness, hours, tmp_path):
    azure_hour, aws_hour = hours[20], hours[21]  # ended about 9 and 8 hours ago: past AWS's 6 hours, not Azure's 24
    write(harness, B, azure_hour, {"sub-BBBBBBBBBB": [
        row(B, azure_hour, "c-2", 2 * GIB, "memory_byte_hours", subscription="sub-BBBBBBBBBB")]})
    write(harness, A, aws_hour, {"sub-AAAAAAAAAA": [row(A, aws_hour, "c-1", 2)]})
    write(harness, B, aws_hour, {"sub-BBBBBBBBBB": [row(B, aws_hour, "c-2", 1, subscription="sub-BBBBBBBBBB")]})
    # The next hour, A's usage is above what one AWS record may carry.
    write(harness, A, hours[22], {"sub-AAAAAAAAAA": [row(A, hours[22], "c-1", 2 * GIB, "memory_byte_hours")]})
    finals(harness, A=hours.final(23), B=hours.final(23))
    metrics = tmp_path / "metering.prom"
    env = {**MARKETPLACES, "START_HOUR": iso(azure_hour), "METRICS_FILE": str(metrics)}
    result = harness.run(env=env)
    assert result.returncode == 1, result.output
    sent = {(record["contract_id"], record["start_time"]): (record["cloud"], record["quantity"])
            for record, _ in harness.clazar.received}
    assert sent == {("c-2", iso(azure_hour)): ("azure", "2147483648"),  # Azure has no per-record limit
                    ("c-1", iso(aws_hour)): ("aws", "2"), ("c-2", iso(aws_hour)): ("azure", "1")}
    assert {(line["contract_id"], line["hour"], line["cloud"]) for line in records(harness)} == {
        ("c-2", iso(azure_hour), "azure"), ("c-1", iso(aws_hour), "aws"), ("c-2", iso(aws_hour), "azure")}
    assert (f"contract c-1 dimension memory_byte_hours hour {iso(hours[22])} has quantity 2147483648, above the "
            "2147483647 one aws record may carry") in result.output
    assert deployment(harness)["last_processed_hour"] == iso(aws_hour)
    # The lateness window follows the cloud: only the hour with an AWS record was late.
    assert (f"1 hour(s) sent past the aws marketplace's 6-hour window, the oldest "
            f"{aws_hour:%Y-%m-%d %H:%M:%S}") in result.output
    text = metrics.read_text()
    assert metric_value(text, "metering_run_records_sent", cloud="aws") == 1
    assert metric_value(text, "metering_run_records_sent", cloud="azure") == 2
    assert metric_value(text, "metering_run_late_hours") == 1
    clouds = {row_["service"]: row_["cloud"] for row_ in json.loads(harness.report("status", "--json",
                                                                                   env=env).output)["services"]}
    assert clouds == {KEY_A: "aws", KEY_B: "azure"}


def test_a_contract_seen_under_two_marketplaces_fails_the_hour_naming_it(harness, hours):
    h = hours[0]
    write(harness, A, h, {"sub-AAAAAAAAAA": [row(A, h, "c-1", 2), row(A, h, "c-9", 1, pod="db-9")]})
    write(harness, B, h, {"sub-BBBBBBBBBB": [row(B, h, "c-1", 3, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(1), B=hours.final(1))
    result = harness.run(env={**MARKETPLACES, "START_HOUR": iso(h)})
    assert result.returncode == 1, result.output
    # Named whichever service's file was read first.
    assert re.search(re.escape(f"contract c-1 has usage under {KEY_A} (aws) and {KEY_B} (azure)") + "|"
                     + re.escape(f"contract c-1 has usage under {KEY_B} (azure) and {KEY_A} (aws)"), result.output)
    assert "one contract lives on one marketplace: fix the =cloud of one of them in SERVICES" in result.output
    assert harness.clazar.metering_calls == 0
    assert "last_processed_hour" not in deployment(harness) and "pending_hour" not in deployment(harness)


def test_retry_failed_resends_a_record_with_the_cloud_it_was_computed_for(harness, hours):
    h = hours[0]
    write(harness, A, h, {"sub-AAAAAAAAAA": [row(A, h, "c-1", 2)]})
    write(harness, B, h, {"sub-BBBBBBBBBB": [row(B, h, "c-2", 3, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(1), B=hours.final(1))
    harness.clazar.rejected_contracts = {"c-2": "Contract is not active yet"}
    env = {**MARKETPLACES, "START_HOUR": iso(h)}
    assert harness.run(env=env).returncode == 1
    assert [(line["contract_id"], line["cloud"]) for line in ledger_waiting(harness)] == [("c-2", "azure")]
    harness.clazar.rejected_contracts = {}
    # Meanwhile the configuration has B on another marketplace, and another default.
    moved = {**env, **services(KEY_A + "=aws", KEY_B + "=gcp"), "CLAZAR_CLOUD": "gcp"}
    retried = harness.run("retry-failed", env=moved)
    assert retried.returncode == 0, retried.output
    [(resent, outcome)] = [(record, outcome) for record, outcome in harness.clazar.received
                           if record["contract_id"] == "c-2" and outcome == "success"]
    assert resent["cloud"] == "azure"
    assert [(line["outcome"], line["cloud"]) for line in records(harness) if line["contract_id"] == "c-2"] == [
        ("rejected", "azure"), ("resending", "azure"), ("delivered on retry", "azure")]
    assert ledger_waiting(harness) == []


def test_a_contract_moving_to_a_plan_on_another_marketplace_takes_its_fraction_with_it(harness, hours):
    """0.5 cpu-hours under A (aws), then 0.75 under B (azure), then nothing: the contract used
    1.25, so one unit is billed, on azure, in the second hour (the fraction carried from the
    aws hour goes with the contract), and the 0.25 left stays carried under azure."""
    write(harness, A, hours[0], {"sub-AAAAAAAAAA": [row(A, hours[0], "c-1", 0.5)]})
    write(harness, B, hours[1], {"sub-BBBBBBBBBB": [row(B, hours[1], "c-1", 0.75, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(3), B=hours.final(3))
    result = harness.run(env={**MARKETPLACES, "START_HOUR": iso(hours[0])})
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[1])): 1}
    [(sent, _)] = harness.clazar.received
    assert sent["cloud"] == "azure"
    state = deployment(harness)
    assert state["last_processed_hour"] == iso(hours[2])
    assert state["remainders"] == {"c-1": {"cpu_core_hours": "0.25"}}
    assert state["clouds"] == {"c-1": "azure"}
    assert [(line["hour"], line["quantity"], line["amount"], line["carried_in"], line["cloud"])
            for line in records(harness)] == [(iso(hours[0]), 0, "0.5", "0", "aws"),
                                              (iso(hours[1]), 1, "0.75", "0.5", "azure")]
