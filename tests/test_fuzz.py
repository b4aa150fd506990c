"""Fuzzing the parsers with Hypothesis: bytes, JSON texts with hostile numbers, strings
and nesting, mutated states and ledger lines, and formula texts, each fed on to what the
run, status, history and reconcile do with what was read. Every example must return or
raise a MeteringError, and do so within a time bound measured per example (an interval
timer that interrupts it), never hang or raise anything else."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import signal
from datetime import datetime, timezone
from fractions import Fraction

import metering_processor as mp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Far above what any example needs (milliseconds), far below a hang.
SECONDS_PER_EXAMPLE = 5.0
# FUZZ_EXAMPLES=5000 for a longer search than the suite's.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The strategies that mutate a whole state describe themselves at length; that is all this says.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
HOUR = datetime(2026, 2, 10, 14, tzinfo=timezone.utc)
NOW = datetime(2026, 2, 11, 0, 5, tzinfo=timezone.utc)
KEY = "Acme Vector DB:PROD:pt-1"
OTHER = "Other:DEV:pt-2"
CONFIG = mp.load_config({"S3_BUCKET_NAME": "b", "SERVICES": f"{KEY},{OTHER}=azure", "STATE_FILE_PATH": "s3://b/state.json",
                         "DRY_RUN": "true"})


class Overtime(BaseException):
    """An example ran past its time bound. Not an Exception, so no handler under test can swallow it."""


@contextlib.contextmanager
def time_bound(seconds: float = SECONDS_PER_EXAMPLE):
    """Interrupt the block after ``seconds``. The interval timer stops Python code; a
    computation inside one C call (10**999999999) cannot be interrupted, so the
    watchdog then ends the test process with a traceback instead of letting it hang."""
    def expire(signum, frame):
        raise Overtime(f"an example took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 6, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def returns_or_refuses(function, *arguments, **options):
    """Call ``function`` within the time bound: its result, or None if it raised a MeteringError."""
    with time_bound():
        try:
            return function(*arguments, **options)
        except mp.MeteringError as error:
            assert str(error), "an error must say what is wrong"
            return None


def test_the_time_bound_interrupts_an_endless_loop():
    with pytest.raises(Overtime), time_bound(0.2):
        while True:
            pass


# --- what hostile JSON is made of ------------------------------------------------------------------

HOSTILE_NUMBERS = ["1e999999999", "1e-99999", "-1e999999999", "1E+4000", "0E+999999", "0." + "0" * 42 + "1",
                   "9" * 5000, "1" + "0" * 4400, "1" + "0" * 400, "9223372036854775808", "9223372036854775807",
                   "999999999", "1000000000", "-0", "-1", "0.1", "1e308", "NaN", "Infinity", "-Infinity", "1e-400",
                   "1.5", "1234567890" * 5]
HOSTILE_STRINGS = ["", " ", "c-1", "cpu_core_hours", "\n2026-01-01 00:00:00,000 - ERROR - forged", "\x1b[31mred\x1b]8;;x\x07",
                   "a" * 300, "a\u2028b", "ops@buyer.example", "=HYPERLINK(\"http://127.0.0.1\")", "\ud7ff", "\ud800", "²",
                   "2026-02-10T15:29:59Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "2026-02-10T21:30:00Z",
                   "1/3", "-1/2", "1/0", "1e999999999", "0.5", "-0.5", "0.1234567891", "1" * 330, "3", "aws", "gcp", "ibm",
                   "rejected", "conflict", "delivered", "resending", "carried", "reported", KEY, OTHER]
FIELDS = ["value", "pricePerUnit", "externalPayerId", "dimension", "subscriptionId", "instanceId", "podName", "hostName",
          "last_processed_to", "last_updated_at", "kind", "contract_id", "hour", "quantity", "amount", "difference",
          "outcome", "cloud", "retry", "attempts", "check", "accounted_before", "version", "deployment", "rejected"]

numbers = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.from_regex(r"-?(0|[1-9][0-9]{0,45})(\.[0-9]{1,45})?([eE][+-]?[0-9]{1,12})?", fullmatch=True),
)
strings = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20)).map(json.dumps)
scalars = st.one_of(numbers, strings, st.sampled_from(["true", "false", "null"]))
names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))


def _array(items):
    return "[" + ",".join(items) + "]"


def _object(pairs):  # the same name may come twice: a repeated field
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in pairs) + "}"


json_texts = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5).map(_array),
                               st.lists(st.tuples(names, children), max_size=8).map(_object)),
    max_leaves=40,
)
deep_texts = st.tuples(st.integers(1, 100_000), st.sampled_from(["[", '{"a":'])).map(
    lambda nest: nest[1] * nest[0] + "1" + ("]" if nest[1] == "[" else "}") * nest[0])
records = st.lists(st.tuples(st.sampled_from(FIELDS[:8]), scalars), max_size=10).map(_object)
export_texts = st.one_of(json_texts, deep_texts, st.lists(records, max_size=6).map(_array))


def as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# --- export files ----------------------------------------------------------------------------------

SERVICE_A, SERVICE_B = CONFIG.services
PRICE_FORMULAS = (mp.compile_formula("DIMENSION1_FORMULA", "units", "cpu_core_hours * 2 + memory_byte_hours / 3"),
                  mp.compile_formula("DIMENSION2_FORMULA", "cost", "cpu_core_hours_total_price / 0.01"))


def bill_file(body: bytes, with_prices: bool):
    """What the run and reconcile do with one export file: its hour's usage, summed with a
    valid file of another service, then the amounts, carried into records."""
    usage = mp.parse_export_file("omnistrate-metering/x/sub-1.json", body, with_prices=with_prices)
    hour = mp.HourUsage(HOUR, CONFIG.services)
    hour.add(SERVICE_A.key, usage)
    hour.add(SERVICE_B.key, mp.parse_export_file("omnistrate-metering/y/sub-2.json",
                                                 b'[{"externalPayerId": "c-9", "dimension": "cpu_core_hours", "value": 2}]'))
    for by_key in hour.totals().values():
        for (contract, dimension), (amount, _) in by_key.items():
            assert 0 <= amount <= mp.MAX_VALUE * max(1, len(usage.rows))
            assert mp.billing_name_problem(contract) is None and mp.billing_name_problem(dimension) is None
    clouds = {service.key: service.cloud for service in CONFIG.services}
    for formulas in ((), PRICE_FORMULAS if with_prices else PRICE_FORMULAS[:1]):
        with contextlib.suppress(mp.MeteringError):  # the other formulas are still tried
            amounts, contract_clouds = mp.billable_amounts(hour, formulas, clouds)
            assert all(amount >= 0 and amount * mp.RESOLUTION == int(amount * mp.RESOLUTION) for amount in amounts.values())
            quantities, remainders = mp.carry(amounts, {})
            assert all(0 <= remainder < 1 for remainder in remainders.values())
            records = mp.metering_records(HOUR, quantities, contract_clouds)
            assert all(mp.record_problem(record, HOUR) is None for record in records)
    return usage


@FUZZ
@given(st.binary(max_size=3000), st.booleans())
def test_export_file_bytes(body, with_prices):
    returns_or_refuses(bill_file, body, with_prices)


@FUZZ
@given(export_texts, st.booleans())
def test_export_file_json(text, with_prices):
    returns_or_refuses(bill_file, as_bytes(text), with_prices)


# --- the marker ------------------------------------------------------------------------------------

TIME = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:?[0-9]{2})"
times = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.from_regex(TIME, fullmatch=True))
marker_entries = st.dictionaries(st.sampled_from(["last_processed_to", "last_updated_at", "other"]),
                                 st.one_of(times, st.integers(), st.none()), max_size=3)


def read_marker(body: bytes):
    """What the run and status do with a marker: each service's final hour, the deployment's."""
    marker = mp.ExportMarker.parse(body, "s3://b/marker")
    finals = {}
    for key in [*marker.processed_to, *marker.problems, KEY, OTHER]:
        finals[key] = returns_or_refuses(marker.final_before, key)
    end, holding = mp.deployment_due_end(NOW, finals)
    assert holding is None or holding in finals
    mp.due_hours(mp.first_due_hour(None, None, None, NOW), end, 24)
    status = mp.deployment_status(CONFIG, mp.DeploymentState(), marker, None, NOW)
    mp.format_status(status, 3)
    json.dumps(status)


@FUZZ
@given(st.one_of(st.binary(max_size=500), export_texts.map(as_bytes),
                 st.dictionaries(st.one_of(st.sampled_from([KEY, OTHER]), st.text(max_size=10)), marker_entries,
                                 max_size=4).map(lambda d: json.dumps(d).encode())))
def test_marker(body):
    returns_or_refuses(read_marker, body)


# --- the state -------------------------------------------------------------------------------------


def valid_state() -> dict:
    """A version 2 state using every field, as the module writes it."""
    hour = HOUR
    records = mp.metering_records(hour, {("c-1", "cpu_core_hours"): 3, ("c-2", "replica_hours"): 1},
                                  {"c-1": "aws", "c-2": "azure"})
    pending = mp.PendingHour(hour, tuple(records), {("c-1", "cpu_core_hours"): Fraction(10, 3) - Fraction(1, 3 * 10**9),
                                                    ("c-2", "replica_hours"): Fraction(1)},
                             {("c-1", "cpu_core_hours"): Fraction(1, 2)}, {("c-1", "cpu_core_hours"): Fraction(1, 4)},
                             {"c-1": "aws", "c-2": "azure"}, {KEY: "aws", OTHER: "azure"}, "ab", "", 1)
    late = mp.LateLine("c-1", "cpu_core_hours", hour - mp.HOUR, Fraction(7, 2), Fraction(1), "carried", 1, "cd", hour)
    state = mp.DeploymentState(
        services={KEY: mp.ServiceEntry(hour - mp.HOUR, True), OTHER: mp.ServiceEntry(hour - 2 * mp.HOUR, False)},
        first_hour=hour - 5 * mp.HOUR, last_processed_hour=hour - mp.HOUR,
        remainders={("c-1", "cpu_core_hours"): Fraction(1, 2), ("c-3", "memory_byte_hours"): Fraction(3, 2)},
        clouds={"c-1": "aws", "c-3": "azure"}, pending=pending,
        accounted={hour - mp.HOUR: mp.AccountedHour("cd", "", {("c-1", "cpu_core_hours"): Fraction(9, 2)}, (KEY, OTHER), 1)},
        marks_hours=24, waiting={hour - 2 * mp.HOUR: {"rejected": 2, "conflict": 1}},
        late_notes=({"hour": mp.format_time(hour - mp.HOUR), "contract_id": "c-1", "dimension": "cpu_core_hours",
                     "difference": "1", "action": "carried", "at": mp.format_time(hour)},),
        owed_ledger=(late,),
        last_run={"at": mp.format_time(hour), "result": "failed", "hours": 1, "sent": 2, "error": "x", "holding": None},
        last_success_at=hour - mp.HOUR)
    return mp.state_to_json(state)


def paths(document, prefix=()):
    """Every path to a value in ``document``."""
    yield prefix
    if isinstance(document, dict):
        for name, value in document.items():
            yield from paths(value, prefix + (name,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from paths(value, prefix + (index,))


def replaced(document, path, value):
    if not path:
        return value
    copy = list(document) if isinstance(document, list) else dict(document)
    copy[path[0]] = replaced(document[path[0]], path[1:], value)
    return copy


def without(document, path):
    """``document`` without the field or item at ``path``."""
    if len(path) == 1:
        return [item for index, item in enumerate(document) if index != path[0]] if isinstance(document, list) \
            else {name: value for name, value in document.items() if name != path[0]}
    return replaced(document, path[:1], without(document[path[0]], path[1:]))


def mutated(valid):
    """Texts of ``valid`` with one value, anywhere in it, replaced by a hostile JSON text, or by
    a value found elsewhere in it (most of those still read, and go on to what uses them), or
    with one field or item left out."""
    every_path = list(paths(valid))
    leaves = sorted({json.dumps(_at(valid, path)) for path in every_path[1:]})
    value = st.one_of(json_texts, st.sampled_from(leaves), scalars)

    def apply(change):
        path, text, drop = change
        if drop and path:
            return json.dumps(without(valid, path))
        return json.dumps(replaced(valid, path, "\x00HOSTILE\x00")).replace('"\\u0000HOSTILE\\u0000"', text)
    return st.tuples(st.sampled_from(every_path), value, st.booleans()).map(apply)


def _at(document, path):
    for part in path:
        document = document[part]
    return document


def dry_run_exporter(state):
    store = mp.StateStore(mp.LocalStorage("/nonexistent-state", "state"), "state.json",
                          mp.LocalLock("/nonexistent-state/state.json.lock"), "/nonexistent-state/state.json")
    return mp.Exporter(CONFIG, None, None, store, None, state, mp.RunReport(), clock=lambda: NOW)


def use_state(body: bytes):
    """What a run and the operators' commands do with a state they read: it is written back
    as it was read; the run admits its services, resends its pending hour (a dry run: the
    same path, nothing sent or written) and finds the due hours; status and the metrics
    show it; the ledger lines of its pending hour and its commit are written."""
    state = mp.parse_state(body, "s3://b/state.json")
    written = mp.dump_state(state)
    assert mp.dump_state(mp.parse_state(written, "s3://b/state.json")) == written, "the state does not read back"
    marker = mp.ExportMarker({KEY: HOUR + 3 * mp.HOUR, OTHER: HOUR + 2 * mp.HOUR}, {})
    for pinned in (state, dataclasses.replace(state, pending=None)):
        status = mp.deployment_status(CONFIG, pinned, marker, None, NOW)
        mp.format_status(status, 3)
        json.dumps(status)
        report = mp.RunReport()
        mp.render_metrics(CONFIG, report, pinned, 0, NOW, 1.0, "s3://b/state.json")
    exporter = dry_run_exporter(state)
    exporter.admit(NOW, {KEY})
    if exporter.state.pending is not None:
        pending = exporter.state.pending
        lines = mp.hour_lines(pending, {}, {}, NOW)
        for line in lines:
            assert mp.ledger_line(json.loads(json.dumps(line.to_json()))).to_json() == line.to_json()
        exporter.deliver(pending, resend=True)
        assert exporter.state.pending is None and exporter.state.last_processed_hour == pending.hour
    exporter.due(marker, None)
    mp.billable_remainders(exporter.state.remainders, PRICE_FORMULAS)
    mp.parse_state(mp.dump_state(exporter.state.with_run(exporter.report.to_json(NOW), NOW, exporter.report.ok)), "s")
    mp.summarise(exporter.report, CONFIG, NOW)


@FUZZ
@given(st.one_of(st.binary(max_size=500), export_texts.map(as_bytes), mutated(valid_state()).map(as_bytes)))
def test_state(body):
    returns_or_refuses(use_state, body)


def test_the_valid_state_used_for_mutations_is_valid_and_uses_every_field():
    document = valid_state()
    assert set(document["deployment"]) == set(mp._DEPLOYMENT_FIELDS)
    assert set(document[KEY]) == {"last_processed_hour", "hours_by_marker"}
    use_state(json.dumps(document).encode())


# --- the ledger ------------------------------------------------------------------------------------

LEDGER_LINES = [line.to_json() for line in (
    mp.RecordLine("c-1", "cpu_core_hours", HOUR, "aws", 3, mp.DELIVERED, HOUR, Fraction(10, 3) - Fraction(1, 3 * 10**9),
                  Fraction(1, 3) - Fraction(1, 3 * 10**9), "r-1"),
    mp.RecordLine("c-2", "replica_hours", HOUR, "azure", 1, mp.REJECTED, HOUR, Fraction(1), Fraction(0), None,
                  {"status": "fail", "errors": [{"message": "unknown contract"}]}),
    mp.RecordLine("c-2", "replica_hours", HOUR, "azure", 1, mp.RETRY_DELIVERED, NOW, record_id="r-2", retry=True,
                  attempts=2),
    mp.RecordLine("c-3", "replica_hours", HOUR, "gcp", 4, mp.CONFLICT, HOUR, Fraction(4), Fraction(0), None,
                  {"status": "fail", "message": "already exists"}),
    mp.LateLine("c-1", "cpu_core_hours", HOUR, Fraction(10, 3) - Fraction(1, 3 * 10**9), Fraction(-1, 2), "carried", 1,
                "ab", NOW),
)]


def use_ledger(body: bytes):
    """What the run, retry-failed, conflicts, reconcile and history do with an hour's ledger
    file: every line reads back as written; the waiting records are counted and resent;
    the hour is reconciled and shown."""
    ledger = mp.Ledger(mp.LocalStorage("/nonexistent-ledger", "ledger"))
    lines = list(ledger._parse("2026-02-10/2026-02-10T14.jsonl", body))
    for line in lines:
        assert mp.ledger_line(json.loads(json.dumps(line.to_json()))).to_json() == line.to_json()
    mp.accounted_from_ledger(lines)
    counts = mp.waiting_counts(lines)
    assert all(0 < count <= len(lines) for count in counts.values())
    mp.reconcile_hour({("c-1", "cpu_core_hours"): Fraction(7, 2)}, lines, {}, lambda contract: 2**31 - 1)
    mp.format_history(sorted(lines, key=lambda line: (line.hour, line.dimension, line.at)))
    json.dumps([line.to_json() for line in lines])
    waiting = list(mp.waiting_records(lines).values())
    mp.format_waiting(waiting)
    for line in waiting:
        resent = mp.retry_line(line, mp.RecordResult(mp.DELIVERED, "id-1"), NOW)
        assert mp.ledger_line(resent.to_json()) == resent
    pending = mp.PendingHour(HOUR, tuple(mp.metering_records(HOUR, {("c-1", "cpu_core_hours"): 3}, {"c-1": "aws"})),
                             {("c-1", "cpu_core_hours"): Fraction(3)}, {}, {}, {"c-1": "aws"}, {KEY: "aws"}, "ab", "", 0)
    earlier = mp.first_sends(line for line in lines if line.hour == HOUR)
    for line in mp.hour_lines(pending, {}, earlier, NOW):
        mp.ledger_line(line.to_json())


valid_lines = st.lists(st.sampled_from(LEDGER_LINES), max_size=3).map(lambda lines: [json.dumps(line) for line in lines])
# A line of one kind with a field of another (a late line with a record's quantity).
grafted = st.tuples(st.sampled_from(LEDGER_LINES), st.sampled_from(LEDGER_LINES)).map(
    lambda t: json.dumps({**t[0], **{name: t[1][name] for name in t[1] if name not in t[0]}}))
ledger_files = st.tuples(valid_lines, st.one_of(grafted, *(mutated(line) for line in LEDGER_LINES))).map(
    lambda parts: as_bytes("\n".join([*parts[0], parts[1]]) + "\n"))


@FUZZ
@given(st.one_of(st.binary(max_size=500), export_texts.map(as_bytes), ledger_files))
def test_ledger(body):
    returns_or_refuses(use_ledger, body)


@pytest.mark.parametrize("late", [{"quantity": "7", "outcome": "delivered"}, {"quantity": 7}, {"action": "billed"},
                                  {"accounted_before": "-1"}, {"check": "2"}, {"check": 10**400},
                                  {"service": "Acme Vector DB:PROD:pt-1"}, {"difference": "1/2"}])
def test_a_late_line_with_what_only_a_record_line_has_or_a_bad_field_is_refused(late):
    with pytest.raises(ValueError):
        mp.ledger_line({**LEDGER_LINES[-1], **late})
    assert mp.ledger_line(LEDGER_LINES[-1]).to_json() == LEDGER_LINES[-1]


def test_the_valid_ledger_lines_used_for_mutations_are_valid():
    use_ledger("\n".join(json.dumps(line) for line in LEDGER_LINES).encode())


# --- formulas ---------------------------------------------------------------------------------------

TOKENS = ["cpu_core_hours", "memory_byte_hours", "cpu_core_hours_total_price", "replica_hours_total_price", "1", "7",
          "0", "64", "-64", "1000000000", "0.5", "1e308", "1e-320", "(", ")", "+", "-", "*", "/", "//", "%", "**", "*1",
          "+(", "round(", "min(", "max(", "abs(", ",", " ", "x", "gpu_hours", "__import__", "'a'", "1" * 400]
atoms = st.sampled_from(["cpu_core_hours", "memory_byte_hours", "cpu_core_hours_total_price", "7", "0.5", "1073741824", "0"])
expressions = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, st.integers(-70, 70)).map(lambda t: f"({t[0]})**{t[1]}"),
        inner.map(lambda e: f"+({e})"), inner.map(lambda e: f"({e})*1"),
        st.tuples(inner, st.integers(-10**10, 10**10)).map(lambda t: f"round({t[0]}, {t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"max({t[0]}, {t[1]})"),
        inner.map(lambda e: f"abs(-{e})"),
    ),
    max_leaves=12,
)
formula_texts = st.one_of(expressions, st.lists(st.sampled_from(TOKENS), max_size=25).map("".join), st.text(max_size=40))
inputs = st.dictionaries(st.sampled_from(sorted(mp.FORMULA_NAMES)),
                         st.fractions(min_value=0, max_value=2**70, max_denominator=10**40), max_size=3)


def compile_and_evaluate(text, values):
    """A formula from the configuration, evaluated on one contract's values, then as the run
    bills it: per service, summed, rounded to a billionth, carried into a record."""
    formula = mp.compile_formula("DIMENSION1_FORMULA", "units", text)
    value = formula.evaluate(values)
    assert max(value.numerator.bit_length(), value.denominator.bit_length()) <= mp.MAX_FORMULA_BITS
    by_key = {("c-1", name): (amount, amount) for name, amount in values.items() if not name.endswith(mp.PRICE_SUFFIX)}
    amounts = {}
    for _ in CONFIG.services:  # the same usage under both services, summed
        for key, amount in mp._formula_amounts(HOUR, by_key, (formula,)).items():
            amounts[key] = amounts.get(key, 0) + amount
    amounts = {key: mp.quantize(Fraction(amount)) for key, amount in amounts.items()}
    quantities, _ = mp.carry(amounts, {})
    mp.metering_records(HOUR, quantities, {"c-1": "aws"})  # the quantity's text


@FUZZ
@given(formula_texts, inputs)
def test_formulas(text, values):
    returns_or_refuses(compile_and_evaluate, text, values)


@pytest.mark.parametrize("text", ["round(cpu_core_hours / 7, 1000000000)", "+(+(memory_byte_hours**64)**64)**64",
                                  "((memory_byte_hours**64*1)**64*1)**64", "(1e308 * 1e308)**64",
                                  "(memory_byte_hours**-64)**-64", "memory_byte_hours**64 * memory_byte_hours**64"])
def test_formulas_that_hide_powers_or_round_without_bound_are_bounded(text):
    returns_or_refuses(compile_and_evaluate, text, {"memory_byte_hours": Fraction(2**40 + 1)})


# --- parse_json itself -------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=1000), export_texts.map(as_bytes)))
def test_parse_json_raises_only_value_error(body):
    with time_bound():
        try:
            mp.parse_json(body)
        except ValueError as error:
            assert str(error).startswith(("is ", "holds the field"))


# --- the masker --------------------------------------------------------------------------------------------

# Texts built to make a backtracking pattern try every start: long runs of the
# characters a pattern's first part takes, with no ending it can match.
MASKER_TEXTS = ["a" * 400_000, "a" * 400_000 + "@", "-eyJ" * 100_000, "eyJ" + "a" * 400_000 + ".",
                "://" + "a" * 400_000, "a@" * 200_000, "x@" + "a." * 200_000 + "1", "token" + " " * 400_000,
                ("bearer " * 60_000), "secret=" * 60_000, "\\\\\\\\x" * 80_000]


@pytest.mark.parametrize("text", MASKER_TEXTS, ids=lambda text: repr(text[:8]) + f"*{len(text)}")
def test_masking_a_long_text_is_linear(text):
    # 400,000 characters: milliseconds when linear, hours when quadratic.
    mp.forget_secrets()
    mp.redact("x\\yz-secret")
    try:
        with time_bound():
            mp.mask_outside(text)
    finally:
        mp.forget_secrets()


@FUZZ
@given(st.text(alphabet=st.sampled_from("aZ09._%+-@:/ \"'=eyJ.\\"), max_size=2000),
       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=8, max_size=40))
def test_a_registered_secret_is_masked_in_any_form_a_body_may_hold_it(noise, secret):
    mp.forget_secrets()
    mp.redact(secret)
    try:
        for form in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
            with time_bound():
                masked = mp.mask_secrets(noise + form + noise)
            # mask_value masks, then cuts: the secret is not kept in part at any cut.
            cut = mp.mask_value(noise + form + noise)
            assert form not in masked and form not in cut
    finally:
        mp.forget_secrets()
