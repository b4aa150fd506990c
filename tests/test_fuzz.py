"""Fuzzing the parsers with Hypothesis: bytes, JSON texts with hostile numbers, strings
and nesting, mutated states and ledger lines, and formula texts. Every example must
return or raise a MeteringError, and do so within a time bound measured per example
(an interval timer that interrupts it), never hang or raise anything else."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
from datetime import datetime, timedelta, timezone
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
                   "9" * 5000, "1" + "0" * 4400, "9223372036854775808", "9223372036854775807", "-0", "-1", "0.1",
                   "1e308", "NaN", "Infinity", "-Infinity", "1e-400", "1.5", "1234567890" * 5]
HOSTILE_STRINGS = ["", " ", "c-1", "cpu_core_hours", "\n2026-01-01 00:00:00,000 - ERROR - forged", "\x1b[31mred\x1b]8;;x\x07",
                   "a" * 300, "a\u2028b", "ops@buyer.example", "=HYPERLINK(\"http://127.0.0.1\")", "\ud7ff", "²",
                   "2026-02-10T15:29:59Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "2026-02-10T21:30:00Z",
                   "1/3", "-1/2", "1/0", "1e999999999", "²", "3"]
FIELDS = ["value", "pricePerUnit", "externalPayerId", "dimension", "subscriptionId", "instanceId", "podName", "hostName",
          "last_processed_to", "last_updated_at", "kind", "contract_id", "hour", "quantity", "amount", "difference"]

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


@FUZZ
@given(st.binary(max_size=3000), st.booleans())
def test_export_file_bytes(body, with_prices):
    returns_or_refuses(mp.parse_export_file, "omnistrate-metering/x/sub-1.json", body, with_prices=with_prices)


@FUZZ
@given(export_texts, st.booleans())
def test_export_file_json(text, with_prices):
    usage = returns_or_refuses(mp.parse_export_file, "omnistrate-metering/x/sub-1.json", as_bytes(text), with_prices=with_prices)
    if usage is not None:
        hour = mp.HourUsage(HOUR)
        hour.add(usage)
        for (contract, dimension), amount in hour.totals().items():
            assert 0 <= amount <= mp.MAX_VALUE * len(usage.rows)
            assert mp.billing_name_problem(contract) is None and mp.billing_name_problem(dimension) is None


# --- the marker ------------------------------------------------------------------------------------

TIME = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:?[0-9]{2})"
times = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.from_regex(TIME, fullmatch=True))
marker_entries = st.dictionaries(st.sampled_from(["last_processed_to", "last_updated_at", "other"]),
                                 st.one_of(times, st.integers(), st.none()), max_size=3)


def final_before_every_key(body: bytes):
    marker = mp.ExportMarker.parse(body, "s3://b/marker")
    for key in [*marker.processed_to, *marker.problems, "A:PROD:pt-1"]:
        returns_or_refuses(marker.final_before, key, timedelta(minutes=30))


@FUZZ
@given(st.one_of(st.binary(max_size=500), export_texts.map(as_bytes),
                 st.dictionaries(st.text(max_size=10), marker_entries, max_size=4).map(lambda d: json.dumps(d).encode())))
def test_marker(body):
    returns_or_refuses(final_before_every_key, body)


# --- the state -------------------------------------------------------------------------------------

KEY = "Acme Vector DB:PROD:pt-1"


def valid_state() -> dict:
    hour = HOUR
    records = mp.metering_records(hour, "aws", {("c-1", "cpu_core_hours"): 3, ("c-2", "replica_hours"): 1})
    entry = {
        "last_processed_hour": mp.format_time(hour - mp.HOUR),
        "remainders": {"c-1": {"cpu_core_hours": "1/3"}},
        "pending_hour": {"hour": mp.format_time(hour), "records": records, "remainders": {"c-1": {"cpu_core_hours": "2/3"}},
                         "unattributable": 1, "amounts": {"c-1": {"cpu_core_hours": "10/3"}}, "carried": {}, "sources": "ab"},
        "rejected": [{**records[1], "answer": {"status": "fail"}, "rejected_at": mp.format_time(hour), "attempts": 2}],
        "last_run": {"at": mp.format_time(hour), "result": "ok", "error": None},
        "last_success_at": mp.format_time(hour),
        "sources": {mp.format_time(hour - mp.HOUR): "cd"},
        "first_hour": mp.format_time(hour - 5 * mp.HOUR),
        "waiting": {mp.format_time(hour - 2 * mp.HOUR): {"rejected": 2, "conflict": 1}},
        "accounted": {mp.format_time(hour - mp.HOUR): {"sources": "cd", "formulas": "", "checks": 1,
                                                     "amounts": {"c-1": {"cpu_core_hours": "7/2"}}}},
        "hours_by_marker": True,
        "late_usage": [{"hour": mp.format_time(hour - mp.HOUR), "contract_id": "c-1", "dimension": "cpu_core_hours",
                        "difference": "1", "action": "reported", "at": mp.format_time(hour)}],
    }
    return {KEY: entry}


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


def mutated(valid):
    """Texts of ``valid`` with one value, anywhere in it, replaced by a hostile JSON text."""
    every_path = list(paths(valid))
    return st.tuples(st.sampled_from(every_path), json_texts).map(
        lambda change: json.dumps(replaced(valid, change[0], "\x00HOSTILE\x00")).replace('"\\u0000HOSTILE\\u0000"', change[1]))


def use_state(body: bytes):
    """What a run and the operators' commands do with a state they read."""
    document = mp.parse_state(body, "s3://b/state.json")
    config = mp.load_config({"S3_BUCKET_NAME": "b", "SERVICES": f"{KEY},Other:DEV:pt-2", "CLAZAR_CLIENT_ID": "i",
                             "CLAZAR_CLIENT_SECRET": "secret-0123"})
    mp.dump_state(document)
    for service in config.services:
        state = mp.ServiceState.from_json(document.get(service.key, {}), "entry")
        mp.dump_state({service.key: state.to_json()})
        row = mp.mask_value(mp.service_status(service, state, None, None, config, NOW))
        mp.format_status([row])
        if state.pending is not None:
            list(mp.ledger_record_lines(service.key, state.pending, {}, {}, NOW))
            mp.dump_state({service.key: state.committed(state.pending, {}, 24).to_json()})
        mp.first_due_hour(state.last_processed_hour, None, state.first_hour, NOW)
        mp.render_metrics(config.services, {}, {service.key: state}, 0, NOW, 1.0)


@FUZZ
@given(st.one_of(st.binary(max_size=500), export_texts.map(as_bytes), mutated(valid_state()).map(as_bytes)))
def test_state(body):
    returns_or_refuses(use_state, body)


def test_the_valid_state_used_for_mutations_is_valid():
    use_state(json.dumps(valid_state()).encode())


# --- the ledger ------------------------------------------------------------------------------------

LEDGER_LINES = [
    {"kind": "record", "service": KEY, "contract_id": "c-1", "dimension": "cpu_core_hours", "hour": mp.format_time(HOUR),
     "quantity": 3, "amount": "10/3", "carried_in": "1/3", "record_id": "r-1", "outcome": "delivered", "at": "x"},
    {"kind": "record", "retry": True, "service": KEY, "contract_id": "c-2", "dimension": "replica_hours",
     "hour": mp.format_time(HOUR), "quantity": 1, "record_id": None, "outcome": "delivered on retry", "at": "x"},
    {"kind": "late", "service": KEY, "contract_id": "c-1", "dimension": "cpu_core_hours", "hour": mp.format_time(HOUR),
     "difference": "-1/2", "sources": "ab", "action": "carried", "at": "x"},
]


def use_ledger(body: bytes):
    """What the run, reconcile and history do with an hour's ledger file."""
    ledger = mp.Ledger(mp.LocalLedgerStorage("/nonexistent-ledger"))
    lines = list(ledger._parse("2026-02-10/x/2026-02-10T14.jsonl", body))
    mp.legacy_accounted(lines)
    mp.waiting_counts(lines)
    mp.reconcile_hour({("c-1", "cpu_core_hours"): Fraction(7, 2)}, lines, {})
    mp.format_history(sorted(lines, key=lambda line: (line["hour"], line["service"], line["dimension"], line.get("at", ""))))
    for line in mp.waiting_records(lines).values():
        mp.retry_line(KEY, line, mp.RecordResult(mp.DELIVERED, "id-1"), NOW)


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
                                  {"accounted_before": "-1"}, {"check": "2"}])
def test_a_late_line_with_what_only_a_record_line_has_or_a_bad_field_is_refused(late):
    assert mp.ledger_line_problem({**LEDGER_LINES[2], **late})
    assert mp.ledger_line_problem(LEDGER_LINES[2]) is None


def test_the_valid_ledger_lines_used_for_mutations_are_valid():
    use_ledger("\n".join(json.dumps(line) for line in LEDGER_LINES).encode())


# --- formulas ---------------------------------------------------------------------------------------

FORMULA_NAMES = frozenset({"cpu_core_hours", "memory_byte_hours", "cpu_core_hours_total_price"})
TOKENS = ["cpu_core_hours", "memory_byte_hours", "cpu_core_hours_total_price", "1", "7", "0", "64", "-64", "1000000000",
          "0.5", "1e308", "1e-320", "(", ")", "+", "-", "*", "/", "//", "%", "**", "*1", "+(", "round(", "min(", "max(",
          "abs(", ",", " ", "x", "__import__", "'a'", "1" * 400]
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
inputs = st.dictionaries(st.sampled_from(sorted(FORMULA_NAMES)),
                         st.fractions(min_value=0, max_value=2**70, max_denominator=10**40), max_size=3)


def compile_and_evaluate(text, values):
    formula = mp.compile_formula("DIMENSION1_FORMULA", "units", text, FORMULA_NAMES)
    value = formula.evaluate(values)
    assert max(value.numerator.bit_length(), value.denominator.bit_length()) <= mp.MAX_FORMULA_BITS
    quantities, _ = mp.carry({("c-1", "units"): abs(value)}, {})
    mp.metering_records(HOUR, "aws", quantities)  # the quantity's text


@FUZZ
@given(formula_texts, inputs)
def test_formulas(text, values):
    returns_or_refuses(compile_and_evaluate, text, values)


@pytest.mark.parametrize("text", ["round(cpu_core_hours / 7, 1000000000)", "+(+(memory_byte_hours**64)**64)**64",
                                  "((memory_byte_hours**64*1)**64*1)**64", "(1e308 * 1e308)**64",
                                  "(memory_byte_hours**-64)**-64"])
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
                ("bearer " * 60_000)]


@pytest.mark.parametrize("text", MASKER_TEXTS, ids=lambda text: repr(text[:8]) + f"*{len(text)}")
def test_masking_a_long_text_is_linear(text):
    # 400,000 characters: milliseconds when linear, hours when quadratic.
    with time_bound():
        mp.mask_secrets(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from("aZ09._%+-@:/ \"'=eyJ.\\"), max_size=2000),
       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=8, max_size=40))
def test_a_registered_secret_is_masked_in_any_form_a_body_may_hold_it(noise, secret):
    mp.redact(secret)
    try:
        for form in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
            with time_bound():
                masked = mp.mask_secrets(noise + form + noise)
            # mask_value masks, then cuts: the secret is not kept in part at any cut.
            cut = mp.mask_value(noise + form + noise)
            assert form not in masked and form not in cut
    finally:
        mp._SECRETS.clear()
