"""Property-based tests of the arithmetic: however usage is split across files and
hours, the units billed per (contract, dimension) are the whole part of the true
total, no quantity is negative, and repeating a run changes nothing."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import metering_processor as mp
from hypothesis import given, settings
from hypothesis import strategies as st

START = datetime(2026, 2, 10, 0, tzinfo=timezone.utc)
CONTRACTS = ["c-1", "c-2", "c-3"]
DIMENSIONS = ["cpu_core_hours", "memory_byte_hours", "replica_hours"]

# Values as an export carries them: integers (up to byte-hour sizes) or decimals.
values = st.one_of(
    st.integers(min_value=0, max_value=2**50),
    st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False),
)
usage = st.lists(
    st.tuples(st.sampled_from(CONTRACTS), st.sampled_from(DIMENSIONS), values,
              st.integers(0, 5),   # the hour
              st.integers(0, 3)),  # the file within the hour
    max_size=60,
)


def export_files(rows):
    """{hour: {file: body}}: every row is its own pod, so no row repeats another."""
    files = defaultdict(lambda: defaultdict(list))
    for number, (contract, dimension, value, hour, file) in enumerate(rows):
        files[hour][file].append({"externalPayerId": contract, "dimension": dimension, "value": f"<{value}>",
                                  "subscriptionId": f"sub-{file}", "podName": f"pod-{number}"})
    # Decimals go into the JSON as the number literals an export holds, not as floats.
    return {hour: {f"sub-{file}": json.dumps(records).replace('"<', "").replace('>"', "").encode()
                   for file, records in by_file.items()}
            for hour, by_file in files.items()}


def bill(files_by_hour, hours=6, remainders=None, formulas=()):
    """Run the exporter's arithmetic over ``hours`` hours, as the run does, oldest first."""
    remainders = dict(remainders or {})
    billed = defaultdict(int)
    for hour in range(hours):
        hour_usage = mp.HourUsage(START + timedelta(hours=hour))
        for name, body in sorted(files_by_hour.get(hour, {}).items()):
            hour_usage.add(mp.parse_export_file(f"{hour}/{name}.json", body, with_prices=True))
        quantities, updates = mp.carry(mp.billable_amounts(hour_usage, formulas), remainders)
        for record in mp.metering_records(hour_usage.hour, "aws", quantities):
            quantity = int(record["quantity"])
            assert quantity > 0
            billed[record["contract_id"], record["dimension"]] += quantity
        remainders.update(updates)
    return dict(billed), remainders


def true_totals(rows):
    totals = defaultdict(Fraction)
    for contract, dimension, value, _, _ in rows:
        totals[contract, dimension] += Fraction(value)
    return totals


@settings(max_examples=300, deadline=None)
@given(usage)
def test_billed_units_are_the_whole_part_of_the_true_total(rows):
    billed, remainders = bill(export_files(rows))
    totals = true_totals(rows)
    for key, total in totals.items():
        assert billed.get(key, 0) == math.floor(total)
        assert remainders.get(key, 0) == total - math.floor(total)
        assert 0 <= remainders.get(key, 0) < 1


@settings(max_examples=200, deadline=None)
@given(usage, st.randoms(use_true_random=False))
def test_how_records_are_split_across_files_does_not_matter(rows, random):
    shuffled = [(c, d, v, h, random.randint(0, 7)) for c, d, v, h, _ in rows]
    assert bill(export_files(rows)) == bill(export_files(shuffled))


@settings(max_examples=200, deadline=None)
@given(usage)
def test_repeating_a_file_or_a_run_changes_nothing(rows):
    files = export_files(rows)
    once = bill(files)
    # The same file read twice (a repeated row per pod and dimension) counts once.
    doubled = {hour: {**by_file, **{f"{name}-again": body for name, body in by_file.items()}}
               for hour, by_file in files.items()}
    assert bill(doubled) == once
    # After a run has committed its last hour, no hour of it is due again.
    last = START + timedelta(hours=5)
    assert mp.due_hours(mp.first_due_hour(last, None, None, last + timedelta(days=1)), last + timedelta(hours=1),
                        None, 24) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CONTRACTS), st.integers(0, 2**36), st.integers(0, 5), st.integers(0, 3)),
                max_size=40))
def test_a_gib_formula_bills_the_whole_part_of_the_exact_gib_total(rows):
    formula = mp.compile_formula("DIMENSION1_FORMULA", "memory_gib_hours", "memory_byte_hours / 1073741824",
                                 frozenset(mp.OMNISTRATE_DIMENSIONS))
    memory = [(contract, "memory_byte_hours", value, hour, file) for contract, value, hour, file in rows]
    billed, _ = bill(export_files(memory), formulas=(formula,))
    for contract in CONTRACTS:
        total = sum(Fraction(value, 2**30) for c, value, _, _ in rows if c == contract)
        assert billed.get((contract, "memory_gib_hours"), 0) == math.floor(total)


amounts = st.fractions(min_value=0, max_value=10**6, max_denominator=1000)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(CONTRACTS), amounts, max_size=3), min_size=1, max_size=12),
       st.lists(st.booleans(), max_size=12))
def test_late_usage_carries_exactly_the_largest_content_less_the_first(contents, committed):
    """However an hour's content moves (shrinks, grows back, returns to an earlier
    version) and whichever late checks crash before their commit, the increments
    carried add up to the largest content seen less what was billed; nothing is
    carried twice and nothing seen is lost."""
    billed = {(contract, "d"): amount for contract, amount in contents[0].items()}
    accounted, carried_total = billed, {}
    for index, content in enumerate(contents[1:]):
        now = {(contract, "d"): amount for contract, amount in content.items()}
        carried, reported, after = mp.late_usage(accounted, now, True)
        assert all(value > 0 for value in carried.values()) and all(reported[key] == value for key, value in carried.items())
        # A check that crashed before its commit changes nothing: the next one starts from the same mark.
        if index < len(committed) and not committed[index]:
            continue
        for key, value in carried.items():
            carried_total[key] = carried_total.get(key, 0) + value
        accounted = after
    # A last check that commits: the content is what was last written.
    last = {(contract, "d"): amount for contract, amount in contents[-1].items()}
    carried, _, accounted = mp.late_usage(accounted, last, True)
    for key, value in carried.items():
        carried_total[key] = carried_total.get(key, 0) + value
    for contract in CONTRACTS:
        key = (contract, "d")
        seen = [content.get(contract, 0) for content in contents]
        committed_seen = [seen[0]] + [seen[i + 1] for i in range(len(seen) - 1)
                                      if i >= len(committed) or committed[i]] + [seen[-1]]
        assert carried_total.get(key, 0) == max(committed_seen) - seen[0]
        assert accounted.get(key, 0) == max(committed_seen)
        assert carried_total.get(key, 0) <= max(seen) - seen[0]
