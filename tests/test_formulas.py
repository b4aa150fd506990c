"""Billing dimensions by formula: the parser's allow-list, exact arithmetic, and the
whole path end to end through SeaweedFS and the stand-in."""

from __future__ import annotations

from datetime import datetime, timezone
from fractions import Fraction

import metering_processor as mp
import pytest
from conftest import SERVICE
from export_data import GIB, iso, record
from servers import TCPProxy

NAMES = frozenset(mp.OMNISTRATE_DIMENSIONS) | {d + mp.PRICE_SUFFIX for d in mp.OMNISTRATE_DIMENSIONS}
VALUES = {"cpu_core_hours": Fraction(3), "memory_byte_hours": Fraction(GIB // 2), "replica_hours": Fraction(2),
          "cpu_core_hours_total_price": Fraction(12, 100)}


def formula(text: str) -> mp.Formula:
    return mp.compile_formula("DIMENSION1_FORMULA", "dim", text, NAMES)


# --- the parser ---------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("memory_byte_hours / 1073741824", Fraction(1, 2)),
    ("memory_byte_hours / 1024**3", Fraction(1, 2)),
    ("cpu_core_hours * 2 + memory_byte_hours / 1073741824", Fraction(13, 2)),
    ("cpu_core_hours_total_price / 0.01", Fraction(12)),
    ("cpu_core_hours * 0.1", Fraction(3, 10)),
    ("max(cpu_core_hours, 5)", Fraction(5)),
    ("min(cpu_core_hours, replica_hours, 10)", Fraction(2)),
    ("abs(-cpu_core_hours)", Fraction(3)),
    ("round(memory_byte_hours / 1073741824)", Fraction(0)),  # half to even
    ("round(cpu_core_hours / 2)", Fraction(2)),
    ("round(cpu_core_hours / 7, 2)", Fraction(43, 100)),
    ("cpu_core_hours // 2 + cpu_core_hours % 2", Fraction(2)),
    ("2 ** -1 * replica_hours", Fraction(1)),
    ("+storage_allocated_byte_hours", Fraction(0)),  # absent names count 0
    ("1e3", Fraction(1000)),
])
def test_accepted_formulas_evaluate_exactly(text, value):
    assert formula(text).evaluate(VALUES) == value


@pytest.mark.parametrize("text, problem", [
    ("__import__('os').system('id')", "__import__"),
    ("open('/etc/passwd').read()", "open"),
    ("().__class__.__bases__[0].__subclasses__()", "(Call)"),
    ("cpu_core_hours.real", "Attribute"),
    ("exec('1')", "exec"),
    ("eval('1')", "eval"),
    ("lambda: 1", "Lambda"),
    ("[x for x in (1, 2)]", "ListComp"),
    ("'abc'", "numbers"),
    ("f'{cpu_core_hours}'", "JoinedStr"),
    ("cpu_core_hours if 1 else 0", "IfExp"),
    ("cpu_core_hours == 1", "Compare"),
    ("cpu_core_hours and 1", "BoolOp"),
    ("not cpu_core_hours", "UnaryOp"),
    ("~cpu_core_hours", "UnaryOp"),
    ("cpu_core_hours << 2", "BinOp"),
    ("cpu_core_hours @ 2", "BinOp"),
    ("(x := 1)", "NamedExpr"),
    ("{1: 2}", "Dict"),
    ("cpu_core_hours[0]", "Subscript"),
    ("...", "numbers"),
    ("True", "numbers"),
    ("1j", "numbers"),
    ("unknown_hours * 2", "unknown name 'unknown_hours'"),
    ("9 ** 9 ** 9", "literal exponent"),
    ("2 ** 10000", "literal exponent"),
    ("(2 ** 8) ** 8", "power of a power"),
    ("cpu_core_hours ** 0.5", "literal exponent"),
    ("cpu_core_hours ** replica_hours", "literal exponent"),
    ("min(cpu_core_hours)", "two or more"),
    ("abs(1, 2)", "one argument"),
    ("round(cpu_core_hours, replica_hours)", "second argument"),
    ("round(cpu_core_hours / 7, 1000000000)", "from -20 to 20"),
    ("cpu_core_hours * " + "9" * 400, "beyond 2**1024"),
    ("cpu_core_hours * 1e-320", "beyond 2**1024"),
    ("max(*[1, 2])", "two or more"),
    ("round(x=1)", "one or two"),
    ("cpu_core_hours; import os", "not a valid formula"),
    ("", "not a valid formula"),
    ("-" * 100 + "1", "nested too deeply"),
    ("1 + " * 600 + "1", "longer than"),
])
def test_refused_formulas_name_the_variable(text, problem):
    with pytest.raises(mp.ConfigError) as error:
        formula(text)
    assert error.value.variable == "DIMENSION1_FORMULA"
    assert problem in str(error.value)


def test_division_by_zero_and_negative_results_fail_the_hour_naming_contract_and_hour():
    usage = mp.HourUsage(datetime(2026, 2, 10, 14, tzinfo=timezone.utc))
    usage.add(mp.parse_export_file("k.json", b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 2}]'))
    with pytest.raises(mp.FormulaError, match=r"DIMENSION1_FORMULA .*divides by zero for contract c-1 in hour 2026-02-10 14"):
        mp.billable_amounts(usage, [formula("cpu_core_hours / replica_hours")])
    with pytest.raises(mp.FormulaError, match=r"negative \(-3\) for contract c-1 in hour 2026-02-10 14"):
        mp.billable_amounts(usage, [formula("cpu_core_hours - 5")])
    with pytest.raises(mp.FormulaError, match="divides by zero"):
        mp.billable_amounts(usage, [formula("replica_hours ** -1")])


@pytest.mark.parametrize("text", ["(+(memory_byte_hours ** 64)) ** 64", "(memory_byte_hours ** 64 * 1) ** 64",
                                  "((memory_byte_hours * 1) ** 64 + 1) ** 64", "memory_byte_hours ** 64 / 3 ** -64",
                                  "round(memory_byte_hours ** 64, 20) ** 2"])
def test_every_value_a_formula_computes_is_bounded_and_fails_the_hour_naming_contract_and_hour(text):
    usage = mp.HourUsage(datetime(2026, 2, 10, 14, tzinfo=timezone.utc))
    usage.add(mp.parse_export_file("k.json", b'[{"externalPayerId": "c-1", "dimension": "memory_byte_hours", '
                                             b'"value": 8589934592}]'))
    with pytest.raises(mp.FormulaError, match=r"DIMENSION1_FORMULA .*beyond 2\*\*1024.* for contract c-1 in hour 2026-02-10 14"):
        mp.billable_amounts(usage, [formula(text)])
    # Within the bound the same shapes compute exactly.
    assert mp.billable_amounts(usage, [formula("+(replica_hours + 2) ** 64 * 1")]) == {("c-1", "dim"): 2**64}


def test_formulas_replace_raw_dimensions_per_contract():
    usage = mp.HourUsage(datetime(2026, 2, 10, 14, tzinfo=timezone.utc))
    usage.add(mp.parse_export_file("k.json", b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 2,'
                                             b' "pricePerUnit": 0.04},'
                                             b'{"externalPayerId": "c-2", "dimension": "replica_hours", "value": 1}]',
                                   with_prices=True))
    amounts = mp.billable_amounts(usage, [
        mp.compile_formula("DIMENSION1_FORMULA", "units", "cpu_core_hours * 2 + replica_hours", NAMES),
        mp.compile_formula("DIMENSION2_FORMULA", "cents", "cpu_core_hours_total_price / 0.01", NAMES),
    ])
    assert amounts == {("c-1", "units"): 4, ("c-1", "cents"): 8, ("c-2", "units"): 1, ("c-2", "cents"): 0}


def test_load_formulas_reads_pairs_in_order_and_refuses_half_pairs():
    environ = {"DIMENSION10_NAME": "b", "DIMENSION10_FORMULA": "replica_hours",
               "DIMENSION2_NAME": "a", "DIMENSION2_FORMULA": "cpu_core_hours"}
    assert [f.name for f in mp.load_formulas(environ, mp.OMNISTRATE_DIMENSIONS)] == ["a", "b"]
    for broken, variable in (({"DIMENSION1_NAME": "a"}, "DIMENSION1_FORMULA"),
                             ({"DIMENSION3_FORMULA": "1"}, "DIMENSION3_NAME"),
                             ({**environ, "DIMENSION3_NAME": "a", "DIMENSION3_FORMULA": "1"}, "DIMENSION3_NAME"),
                             ({"DIMENSION1_NAME": "bad name", "DIMENSION1_FORMULA": "1"}, "DIMENSION1_NAME")):
        with pytest.raises(mp.ConfigError) as error:
            mp.load_formulas(broken, mp.OMNISTRATE_DIMENSIONS)
        assert error.value.variable == variable


def test_extra_source_dimensions_can_be_named():
    config = mp.load_config({"S3_BUCKET_NAME": "b", "SERVICES": "a:b:c", "OMNISTRATE_DIMENSIONS": "gpu_hours",
                             "DIMENSION1_NAME": "gpus", "DIMENSION1_FORMULA": "gpu_hours * 4"}, dry_run=True)
    assert config.formulas[0].evaluate({"gpu_hours": Fraction(2)}) == 8


# --- end to end ---------------------------------------------------------------------------

GIB_HOURS = {"DIMENSION1_NAME": "memory_gib_hours", "DIMENSION1_FORMULA": "memory_byte_hours / 1073741824"}


def memory(hour, contract, subscription, value, **extra):
    return record(SERVICE, hour, contract=contract, subscription=subscription, dimension="memory_byte_hours",
                  value=value, **extra)


def test_a_512_mib_pod_over_six_hours_bills_exactly_three_gib_hours(harness, hours):
    for i in range(6):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [
            memory(hours[i], "c-1", "sub-AAAAAAAAAA", 512 * 1024**2),
            record(SERVICE, hours[i], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours", value=1),
        ]})
    harness.write_marker(hours.final(6))
    result = harness.run(env={"START_HOUR": iso(hours[0]), **GIB_HOURS})
    assert result.returncode == 0, result.output
    accepted = harness.clazar.accepted_quantities()
    assert {key[1] for key in accepted} == {"memory_gib_hours"}, "raw dimensions are not sent with formulas"
    assert sum(accepted.values()) == 3
    assert accepted == {("c-1", "memory_gib_hours", iso(hours[i])): 1 for i in (1, 3, 5)}
    assert harness.entry()["remainders"] == {}


def test_a_composite_and_a_price_formula_over_several_contracts(harness, hours):
    env = {"START_HOUR": iso(hours[0]),
           "DIMENSION1_NAME": "compute_units", "DIMENSION1_FORMULA": "cpu_core_hours * 2 + memory_byte_hours / 1024**3",
           "DIMENSION2_NAME": "usage_cents", "DIMENSION2_FORMULA": "cpu_core_hours_total_price / 0.01"}
    for i in range(2):
        h = hours[i]
        harness.write_hour(h, {
            "sub-AAAAAAAAAA": [record(SERVICE, h, contract="c-1", subscription="sub-AAAAAAAAAA",
                                      dimension="cpu_core_hours", value=2, price=0.04),
                               memory(h, "c-1", "sub-AAAAAAAAAA", 2 * GIB, price=0.005)],
            "sub-BBBBBBBBBB": [record(SERVICE, h, contract="c-2", subscription="sub-BBBBBBBBBB",
                                      dimension="cpu_core_hours", value=1, price=0.015),
                               memory(h, "c-2", "sub-BBBBBBBBBB", GIB // 4)],
        })
    harness.write_marker(hours.final(2))
    dry = harness.run("--dry-run", env=env)
    assert dry.returncode == 0, dry.output
    assert '"dimension": "compute_units"' in dry.output and '"quantity": "6"' in dry.output
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    # c-1: 2*2 + 2 = 6 units, 0.08/0.01 = 8 cents an hour.
    # c-2: 2*1 + 0.25 = 2.25 units an hour (2, then 2 + 0.5 carried), 0.015/0.01 = 1.5 cents (1, then 2).
    assert harness.clazar.accepted_quantities() == {
        ("c-1", "compute_units", iso(hours[0])): 6, ("c-1", "usage_cents", iso(hours[0])): 8,
        ("c-2", "compute_units", iso(hours[0])): 2, ("c-2", "usage_cents", iso(hours[0])): 1,
        ("c-1", "compute_units", iso(hours[1])): 6, ("c-1", "usage_cents", iso(hours[1])): 8,
        ("c-2", "compute_units", iso(hours[1])): 2, ("c-2", "usage_cents", iso(hours[1])): 2,
    }
    assert harness.entry()["remainders"] == {"c-2": {"compute_units": "1/2"}}


def test_a_malicious_formula_is_refused_before_anything_is_read_or_sent(harness, hours, tmp_path):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [memory(hours[0], "c-1", "sub-AAAAAAAAAA", GIB)]})
    harness.write_marker(hours.final(1))
    proxy = TCPProxy(harness.seaweed.s3_port)
    witness = tmp_path / "pwned"
    result = harness.run(env={
        "START_HOUR": iso(hours[0]), "AWS_ENDPOINT_URL_S3": proxy.endpoint,
        "DIMENSION1_NAME": "memory_gib_hours",
        "DIMENSION1_FORMULA": f"__import__('os').system('touch {witness}')",
    })
    proxy.close()
    assert result.returncode == 2
    assert result.output.strip().count("\n") == 0 and "DIMENSION1_FORMULA" in result.output
    assert not witness.exists()
    assert proxy.requests == 0, "S3 was read"
    assert harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0
    assert harness.state() == {}


def test_a_formula_that_divides_by_zero_fails_only_that_hour_and_it_is_retried(harness, hours):
    env = {"START_HOUR": iso(hours[0]), "DIMENSION1_NAME": "per_replica",
           "DIMENSION1_FORMULA": "cpu_core_hours / replica_hours"}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [
        record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours", value=4)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env=env)
    assert result.returncode == 1
    assert "divides by zero for contract c-1 in hour" in result.output
    assert harness.clazar.metering_calls == 0
    assert "last_processed_hour" not in harness.state().get(":".join(SERVICE), {})
