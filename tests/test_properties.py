"""Property-based tests of the billing rules and the codecs: however usage is split across
files, services and hours, and in whatever order the files are read, the units billed per
(contract, dimension) are the whole part of the total (to the billionth kept); late usage is
carried once at its largest; whatever the state and the ledger write, they read back."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import metering_processor as mp
from hypothesis import given, settings
from hypothesis import strategies as st

START = datetime(2026, 2, 10, 0, tzinfo=timezone.utc)
CONTRACTS = ["c-1", "c-2", "c-3"]
DIMENSIONS = ["cpu_core_hours", "memory_byte_hours", "replica_hours"]
SERVICES = (mp.ServiceKey("Acme", "PROD", "pt-A"), mp.ServiceKey("Acme", "PROD", "pt-B"))
CLOUDS = {service.key: "aws" for service in SERVICES}
RESOLUTION = Fraction(1, mp.RESOLUTION)

# Values as an export carries them: integers (up to byte-hour sizes), decimals, or the doubles
# a division leaves behind.
values = st.one_of(
    st.integers(min_value=0, max_value=2**50),
    st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False).filter(
        lambda x: x == 0 or x >= 1e-20),
)
usage = st.lists(
    st.tuples(st.sampled_from(CONTRACTS), st.sampled_from(DIMENSIONS), values,
              st.integers(0, 5),  # the hour
              st.integers(0, 3),  # the file within the hour
              st.integers(0, 1)),  # the service
    max_size=60,
)


def literal(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def export_files(rows):
    """{hour: [(service, key, body)]}: every row is its own pod, so no row repeats another."""
    files = defaultdict(lambda: defaultdict(list))
    for number, (contract, dimension, value, hour, file, service) in enumerate(rows):
        files[hour][service, file].append(f'{{"externalPayerId": "{contract}", "dimension": "{dimension}", '
                                          f'"value": {literal(value)}, "podName": "pod-{number}"}}')
    return {hour: [(SERVICES[service], f"{SERVICES[service].hour_prefix(START)}sub-{file}.json",
                    ("[" + ",".join(records) + "]").encode()) for (service, file), records in by_file.items()]
            for hour, by_file in files.items()}


def hour_usage(hour, files, formulas=()):
    usage = mp.HourUsage(START + timedelta(hours=hour), SERVICES)
    for service, key, body in files:
        usage.add(service.key, mp.parse_export_file(key, body, with_prices=True))
    return mp.billable_amounts(usage, formulas, CLOUDS)[0]


def bill(files_by_hour, hours=6, formulas=()):
    """Run the exporter's arithmetic over ``hours`` hours, as the run does, oldest first."""
    remainders, billed = {}, defaultdict(int)
    for hour in range(hours):
        amounts = hour_usage(hour, files_by_hour.get(hour, []), formulas)
        quantities, updates = mp.carry(amounts, remainders)
        for record in mp.metering_records(START, quantities, {contract: "aws" for contract in CONTRACTS}):
            assert int(record["quantity"]) > 0
            billed[record["contract_id"], record["dimension"]] += int(record["quantity"])
        remainders.update(updates)
        # Whatever the state writes of them, it reads back.
        assert mp.amounts_from_json(json.loads(json.dumps(mp.amounts_to_json(remainders)))) == remainders
    return dict(billed), remainders


def true_totals(rows):
    totals = defaultdict(Fraction)
    for contract, dimension, value, _, _, _ in rows:
        totals[contract, dimension] += Fraction(value)
    return totals


@settings(max_examples=300, deadline=None)
@given(usage)
def test_billed_units_never_exceed_usage_nor_fall_a_unit_short(rows):
    billed, remainders = bill(export_files(rows))
    for key, total in true_totals(rows).items():
        # Each hour's amount is rounded down to the billionth: at most 6 of them lost here.
        assert total - 1 - 6 * RESOLUTION < billed.get(key, 0) <= total
        assert 0 <= remainders.get(key, 0) < 1
        assert (remainders.get(key, 0) / RESOLUTION).denominator == 1


@settings(max_examples=200, deadline=None)
@given(usage, st.randoms(use_true_random=False))
def test_the_order_files_are_read_in_and_how_rows_are_split_do_not_matter(rows, chance):
    files = export_files(rows)
    shuffled = {hour: chance.sample(found, len(found)) for hour, found in files.items()}
    assert bill(files) == bill(shuffled)
    moved = [(c, d, v, h, chance.randint(0, 7), s) for c, d, v, h, _, s in rows]
    assert bill(export_files(rows)) == bill(export_files(moved))


@settings(max_examples=200, deadline=None)
@given(usage)
def test_a_file_read_twice_counts_once(rows):
    files = export_files(rows)
    doubled = {hour: found + found for hour, found in files.items()}
    assert bill(doubled) == bill(files)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CONTRACTS), st.floats(0, 2**36, allow_nan=False).filter(lambda x: x == 0 or x >= 1e-20), st.integers(0, 5),
                          st.integers(0, 3), st.integers(0, 1)), max_size=40))
def test_a_dividing_formula_over_doubles_keeps_the_remainders_bounded(rows):
    formula = mp.compile_formula("DIMENSION1_FORMULA", "memory_gib_hours",
                                 "memory_byte_hours / replica_hours / 1073741824 * 3")
    memory = [(contract, "memory_byte_hours", value, hour, file, service)
              for contract, value, hour, file, service in rows]
    memory += [(contract, "replica_hours", 3, hour, 9, service) for contract in CONTRACTS for hour in range(6)
               for service in (0, 1)]
    billed, remainders = bill(export_files(memory), formulas=(formula,))
    for contract in CONTRACTS:
        assert len(mp.amount_text(remainders.get((contract, "memory_gib_hours"), Fraction(0)))) <= 12


amounts = st.fractions(min_value=0, max_value=10**6, max_denominator=1000).map(mp.quantize)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(CONTRACTS), amounts, max_size=3), min_size=1, max_size=12),
       st.lists(st.booleans(), max_size=12))
def test_late_usage_carries_exactly_the_largest_content_less_the_first(contents, committed):
    """However an hour's content moves (shrinks, grows back, returns to an earlier version)
    and whichever late checks crash before their commit, the increments carried add up to
    the largest content seen less what was billed; nothing is carried twice, nothing lost."""
    accounted = {(contract, "d"): amount for contract, amount in contents[0].items()}
    carried_total = {}
    for index, content in enumerate(contents[1:] + contents[-1:]):
        now = {(contract, "d"): amount for contract, amount in content.items()}
        carried, reported, after = mp.late_usage(accounted, now, True)
        assert all(value > 0 for value in carried.values())
        assert all(reported[key] == value for key, value in carried.items())
        if index < len(contents) - 1 and index < len(committed) and not committed[index]:
            continue  # a check that crashed before its commit changes nothing
        for key, value in carried.items():
            carried_total[key] = carried_total.get(key, 0) + value
        accounted = after
    for contract in CONTRACTS:
        seen = [content.get(contract, 0) for content in contents]
        kept = [seen[0]] + [seen[i + 1] for i in range(len(seen) - 1) if i >= len(committed) or committed[i]]
        kept.append(seen[-1])
        assert carried_total.get((contract, "d"), 0) == max(kept) - seen[0]
        assert carried_total.get((contract, "d"), 0) <= max(seen) - seen[0]


# --- codecs: whatever is written reads back ---------------------------------------------------------

writable = st.integers(min_value=0, max_value=mp.MAX_AMOUNT * mp.RESOLUTION - 1).map(
    lambda n: Fraction(n, mp.RESOLUTION))


@settings(max_examples=500, deadline=None)
@given(writable, st.booleans())
def test_every_amount_the_writer_accepts_reads_back(value, negative):
    value = -value if negative else value
    assert mp.parse_amount(mp.amount_text(value), signed=True) == value


names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20).filter(
    lambda text: mp.billing_name_problem(text) is None and text.strip() == text)
fractions = st.integers(0, 10**30).map(lambda n: Fraction(n, mp.RESOLUTION))
keyed = st.dictionaries(st.tuples(names, names), fractions, max_size=4)
hours = st.integers(0, 24 * 365 * 50).map(lambda n: mp.EARLIEST_TIME + timedelta(hours=n))


@st.composite
def states(draw):
    hour = draw(hours)
    records = mp.metering_records(hour, draw(st.dictionaries(st.tuples(names, names), st.integers(1, 10**40),
                                                             max_size=3)), defaultdict(lambda: "gcp"))
    pending = mp.PendingHour(hour, tuple(records), draw(keyed), draw(keyed), draw(keyed),
                             {record["contract_id"]: "gcp" for record in records},
                             {"a:b:c": draw(st.sampled_from(mp.CLOUDS))}, "digest", "", draw(st.integers(0, 10**6)))
    marks = {draw(hours): mp.AccountedHour("d", "f", draw(keyed), ("a:b:c",), draw(st.integers(0, 10**6)))}
    late = mp.LateLine("c", "d", hour, draw(fractions), -draw(fractions), "reported", 1, "s", hour)
    return mp.DeploymentState(
        services={"a:b:c": mp.ServiceEntry(draw(st.one_of(st.none(), hours)), draw(st.booleans()))},
        first_hour=draw(st.one_of(st.none(), hours)), last_processed_hour=draw(st.one_of(st.none(), hours)),
        remainders=draw(keyed), clouds={"c": "azure"}, pending=draw(st.one_of(st.none(), st.just(pending))),
        accounted=marks, marks_hours=draw(st.integers(0, 720)),
        waiting={hour: {"rejected": draw(st.integers(1, mp.MAX_COUNT - 1))}}, owed_ledger=(late,),
        last_run={"at": mp.format_time(hour), "result": "ok", "sent": draw(st.integers(0, mp.MAX_COUNT - 1))},
        last_success_at=draw(st.one_of(st.none(), hours)))


@settings(max_examples=200, deadline=None)
@given(states())
def test_every_state_the_writer_writes_reads_back(state):
    assert mp.parse_state(mp.dump_state(state), "s") == state


# --- masking ------------------------------------------------------------------------------------------

secrets = st.text(min_size=4, max_size=24).filter(lambda text: text.strip() and len(text.strip()) >= 4)


@settings(max_examples=300, deadline=None)
@given(secrets, st.sampled_from(["raw", "json", "json-twice", "repr", "repr-bytes", "url", "html", "trimmed"]))
def test_a_registered_secret_is_masked_in_every_form_a_library_prints(secret, form):
    import html
    from urllib.parse import quote, quote_plus

    shown = {"raw": secret, "json": json.dumps(secret), "json-twice": json.dumps(json.dumps(secret)),
             "repr": repr(secret), "repr-bytes": repr(secret.encode("utf-8", "surrogatepass")),
             "url": random.choice([quote, quote_plus])(secret.encode("utf-8", "surrogatepass"), safe=""),
             "html": html.escape(secret), "trimmed": secret.strip()}[form]
    mp.forget_secrets()
    mp.redact(secret)
    try:
        # What is left once the masks are taken out: a secret such as "[red" is in every mask.
        left = mp.mask_secrets(f"answer: {shown} end").replace("[redacted]", "\x00")
        assert shown not in left or shown in "answer:  end"
    finally:
        mp.forget_secrets()


# What register_secrets takes from the environment, as a mounted secret often has it: with a
# line ending, or whitespace, after it (issue 19: a session token ending in a newline leaked).
REGISTERED = ("CLAZAR_CLIENT_SECRET", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
ENDINGS = ("", "\n", "\r\n", " \n", "\t", "\n\n")


def printed(text: str, form: str) -> tuple[str, str]:
    """(how a library prints ``text`` in ``form``, the same without its quotes)."""
    from html import escape
    from urllib.parse import quote, quote_plus

    raw = text.encode("utf-8", "surrogatepass")
    shown, cut = {"raw": (text, (0, 0)), "json": (json.dumps(text), (1, 1)),
                  "json-twice": (json.dumps(json.dumps(text)), (3, 3)), "repr": (repr(text), (1, 1)),
                  "repr-bytes": (repr(raw), (2, 1)), "url": (quote(raw, safe=""), (0, 0)),
                  "url-plus": (quote_plus(raw, safe=""), (0, 0)), "html": (escape(text), (0, 0))}[form]
    return shown, shown[cut[0]:len(shown) - cut[1]]


@settings(max_examples=400, deadline=None)
@given(secrets, st.sampled_from(ENDINGS), st.sampled_from(REGISTERED),
       st.sampled_from(["raw", "json", "json-twice", "repr", "repr-bytes", "url", "url-plus", "html"]),
       st.booleans())
def test_every_secret_of_the_environment_is_masked_as_set_and_trimmed(secret, ending, variable, form, trimmed):
    """register_secrets, as the module calls it, masks each secret variable as it is set and
    trimmed, in every printed form: nothing of the trimmed secret is left, in either."""
    value = secret + ending
    mp.forget_secrets()
    mp.register_secrets({variable: value})
    try:
        shown, _ = printed(value.strip() if trimmed else value, form)
        _, core = printed(value.strip(), form)
        around = ("answer: ", " end")
        # What is left once the masks are taken out: a secret such as "[red" is in every mask.
        left = mp.mask_secrets(around[0] + shown + around[1]).replace("[redacted]", "\x00")
        assert shown not in left or shown in "".join(around), left
        assert core not in left or core in "".join(around), left
    finally:
        mp.forget_secrets()
