"""Billing across the services of a deployment, end to end: what reconcile, the ledger and
Clazar say once the services, faults and settings change between runs."""

from __future__ import annotations

import json

import pytest
from test_deployment import A, B, BOTH, KEY_A, finals, row, services, write
from export_data import iso


def reconciled(harness, first, last, env) -> dict:
    check = harness.report("reconcile", "--from", iso(first), "--to", iso(last), "--json", env=env)
    return json.loads(check.output)


# With a lookback the hours' marks name their services; without, the state's service entries do.
LOOKBACKS = ["24", "0"]


@pytest.mark.parametrize("lookback", LOOKBACKS)
def test_reconcile_of_hours_billed_before_a_service_was_removed_counts_its_usage(harness, hours, lookback):
    for i in range(2):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 2)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-1", 5, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(1), B=hours.final(1))
    assert harness.run(env={**BOTH, "START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": lookback}).returncode == 0
    finals(harness, A=hours.final(2), B=hours.final(2))
    alone = {**services(KEY_A), "START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": lookback}
    assert harness.run(env=alone).returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 7,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 2}
    result = reconciled(harness, hours[0], hours[1], alone)
    assert result["differences"] == [], result
    assert [(r["contract_id"], r["expected"], r["billed"]) for r in result["rows"]] == [("c-1", 9, 9)]


@pytest.mark.parametrize("lookback", LOOKBACKS)
def test_reconcile_of_hours_before_a_service_was_added_leaves_its_usage_out(harness, hours, lookback):
    for i in range(2):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 2)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [row(B, hours[i], "c-1", 5, subscription="sub-BBBBBBBBBB")]})
    finals(harness, A=hours.final(1), B=hours.final(1))
    assert harness.run(env={**services(KEY_A), "START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": lookback}).returncode == 0
    finals(harness, A=hours.final(2), B=hours.final(2))
    env = {**BOTH, "START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": lookback}
    assert harness.run(env=env).returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 7}
    result = reconciled(harness, hours[0], hours[1], env)
    assert result["differences"] == [], result


def test_shared_fractions_kills_and_late_usage_bill_the_whole_units_used_once(harness, hours):
    """Oracle: over every hour, Clazar holds floor(used) per contract and dimension (carry mode),
    each record accepted once, none sent again after an answer, and reconcile agrees."""
    def hour_files(i, late=0):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 0.6)]})
        write(harness, B, hours[i], {"sub-BBBBBBBBBB": [
            row(B, hours[i], "c-1", 0.7 + late, subscription="sub-BBBBBBBBBB"),
            row(B, hours[i], "c-2", 1.5, subscription="sub-BBBBBBBBBB", pod="db-2")]})
    for i in range(4):
        hour_files(i)
    env = {**BOTH, "START_HOUR": iso(hours[0]), "LATE_USAGE": "carry", "CLAZAR_BATCH_SIZE": "1"}
    finals(harness, A=hours.final(2), B=hours.final(2))
    # Killed as the second answer of hour 0 arrives: one record has an answer, one may have landed.
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_BATCH": "2"})
    assert killed.returncode == -9, killed.output
    assert harness.run(env=env).returncode == 0
    # Hour 1 grows by 1.5 in B after it was billed; the run carrying it is killed while sending hour 2.
    hour_files(1, late=1.5)
    finals(harness, A=hours.final(4), B=hours.final(4))
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_BATCH": "1"})
    assert killed.returncode == -9, killed.output
    done = harness.run(env=env)
    assert done.returncode == 0, done.output
    assert "1.5 more cpu_core_hours for contract c-1" in killed.output + done.output
    billed = {}
    for (contract, _, _), quantity in harness.clazar.accepted_quantities().items():
        billed[contract] = billed.get(contract, 0) + quantity
    # c-1: 4 x 1.3 + 1.5 = 6.7; c-2: 4 x 1.5 = 6.
    assert billed == {"c-1": 6, "c-2": 6}, harness.clazar.accepted_quantities()
    successes = [(r["contract_id"], r["start_time"]) for r in harness.clazar.successes()]
    assert len(successes) == len(set(successes))
    sends = [(r["contract_id"], r["start_time"]) for r, _ in harness.clazar.received]
    assert all(sends.count(key) <= 2 for key in set(sends)), sends
    result = reconciled(harness, hours[0], hours[3], env)
    assert result["differences"] == [], result
    assert {(r["contract_id"], r["expected"], r["billed"]) for r in result["rows"]} == {("c-1", 6, 6), ("c-2", 6, 6)}


def test_reconcile_does_not_count_hours_before_the_deployment_started_as_unbilled(harness, hours):
    for i in range(3):
        write(harness, A, hours[i], {"sub-AAAAAAAAAA": [row(A, hours[i], "c-1", 2)]})
    finals(harness, A=hours.final(3))
    env = {**services(KEY_A), "START_HOUR": iso(hours[1])}
    assert harness.run(env=env).returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[1])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[2])): 2}
    result = reconciled(harness, hours[0], hours[2], env)
    assert result["differences"] == [], result
    assert (result["hours_before_first_hour"], result["hours_not_processed_yet"]) == (1, 0)
    text = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[2]), env=env).output
    assert "1 hour(s) of the range before the deployment's first hour, never its to bill, not compared" in text
