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
