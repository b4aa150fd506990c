"""Billing dimensions by formula: the parser's allow-list and bounds, exact arithmetic,
evaluation per service and contract then summed, and the whole path end to end through
SeaweedFS and the stand-in."""

from __future__ import annotations

from datetime import datetime, timezone
from fractions import Fraction

import metering_processor as mp
import pytest
from conftest import SERVICE
from export_data import GIB, iso, record, service_key

VALUES = {"cpu_core_hours": Fraction(3), "memory_byte_hours": Fraction(GIB // 2), "replica_hours": Fraction(2),
          "cpu_core_hours_total_price": Fraction(12, 100)}
# Omnistrate's four documented dimensions and their price totals: the only names a formula reads.
DOCUMENTED = ("cpu_core_hours", "memory_byte_hours", "storage_allocated_byte_hours", "replica_hours")
HOUR = datetime(2026, 2, 10, 14, tzinfo=timezone.utc)
A = mp.ServiceKey("Acme", "PROD", "pt-A", "aws")
B = mp.ServiceKey("Acme", "DEV", "pt-B", "aws")
CLOUDS = {A.key: "aws", B.key: "aws"}


def formula(text: str, name: str = "dim", variable: str = "DIMENSION1_FORMULA") -> mp.Formula:
    return mp.compile_formula(variable, name, text)


def usage_of(*files, with_prices=False) -> mp.HourUsage:
    """An hour's usage from (service, body) pairs, each body an export file."""
    usage = mp.HourUsage(HOUR, (A, B))
    for number, (service, body) in enumerate(files):
        usage.add(service.key, mp.parse_export_file(f"{service.hour_prefix(HOUR)}sub-{number}.json", body,
                                                    with_prices=with_prices))
    return usage


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
    ("round(cpu_core_hours / 7, 20)", Fraction(42857142857142857143, 10**20)),
    ("cpu_core_hours // 2 + cpu_core_hours % 2", Fraction(2)),
    ("2 ** -1 * replica_hours", Fraction(1)),
    ("cpu_core_hours ** 64 / 3 ** 64", Fraction(1)),
    ("+storage_allocated_byte_hours", Fraction(0)),  # absent names count 0
    ("replica_hours_total_price + memory_byte_hours_total_price", Fraction(0)),
    ("1e3", Fraction(1000)),
])
def test_accepted_formulas_evaluate_exactly(text, value):
    assert formula(text).evaluate(VALUES) == value


def test_formulas_name_the_four_documented_dimensions_and_their_price_totals_only():
    assert mp.FORMULA_NAMES == frozenset(DOCUMENTED) | {name + "_total_price" for name in DOCUMENTED}
    for name in mp.FORMULA_NAMES:
        assert formula(f"{name} * 2").evaluate({name: Fraction(3)}) == 6
    for name in ("gpu_hours", "gpu_hours_total_price", "cpu_core_hours_total", "CPU_CORE_HOURS"):
        with pytest.raises(mp.ConfigError, match=f"unknown name '{name}'") as error:
            formula(f"{name} * 4")
        assert error.value.variable == "DIMENSION1_FORMULA"
    # The setting that once added names is gone: it is named as such, and adds none.
    environ = {"S3_BUCKET_NAME": "b", "SERVICES": "a:b:c", "OMNISTRATE_DIMENSIONS": "gpu_hours",
               "DIMENSION1_NAME": "gpus", "DIMENSION1_FORMULA": "cpu_core_hours * 4"}
    config = mp.load_config(environ, dry_run=True)
    assert any(warning.startswith("OMNISTRATE_DIMENSIONS is no longer a setting") for warning in config.warnings)
    with pytest.raises(mp.ConfigError, match="unknown name 'gpu_hours'"):
        mp.load_config({**environ, "DIMENSION1_FORMULA": "gpu_hours * 4"}, dry_run=True)


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
    ("gpu_hours * 2", "unknown name 'gpu_hours'"),
    ("9 ** 9 ** 9", "literal exponent"),
    ("2 ** 10000", "literal exponent"),
    ("2 ** 65", "literal exponent from -64 to 64"),
    ("2 ** -65", "literal exponent from -64 to 64"),
    ("(2 ** 8) ** 8", "power of a power"),
    ("cpu_core_hours ** 0.5", "literal exponent"),
    ("cpu_core_hours ** replica_hours", "literal exponent"),
    ("min(cpu_core_hours)", "two or more"),
    ("abs(1, 2)", "one argument"),
    ("round(cpu_core_hours, replica_hours)", "second argument"),
    ("round(cpu_core_hours / 7, 1000000000)", "from -20 to 20"),
    ("round(cpu_core_hours / 7, 21)", "from -20 to 20"),
    ("cpu_core_hours * " + "9" * 400, "beyond 2**1024"),
    ("cpu_core_hours * 1e-320", "beyond 2**1024"),
    ("max(*[1, 2])", "two or more"),
    ("round(x=1)", "one or two"),
    ("cpu_core_hours; import os", "not a valid formula"),
    ("", "not a valid formula"),
    ("-" * 100 + "1", "nested too deeply"),
    ("1 + " * 600 + "1", "longer than 1000"),
])
def test_refused_formulas_name_the_variable(text, problem):
    with pytest.raises(mp.ConfigError) as error:
        formula(text)
    assert error.value.variable == "DIMENSION1_FORMULA"
    assert problem in str(error.value)


def test_the_bounds_are_the_documented_ones():
    assert formula("1" + " " * 996 + "+ 1").evaluate({}) == 2  # 1,000 characters: the longest allowed
    with pytest.raises(mp.ConfigError, match="longer than 1000 characters"):
        formula("1" + " " * 997 + "+ 1")
    assert formula("-" * 50 + "1").evaluate({}) == 1  # 50 levels below the top: the deepest allowed
    assert formula("1 + " * 50 + "1").evaluate({}) == 51
    with pytest.raises(mp.ConfigError, match="nested too deeply"):
        formula("-" * 51 + "1")
    # A flat sum of 52 terms is 51 levels: the message says how to write it instead.
    with pytest.raises(mp.ConfigError, match="each term of a long sum or product is a level"):
        formula("1 + " * 51 + "1")
    terms = " + ".join(["1"] * 26)
    assert formula(f"({terms}) + ({terms})").evaluate({}) == 52
    assert formula("2 ** 64 + 2 ** -64").evaluate({}) == Fraction(2**128 + 1, 2**64)
    assert formula("round(cpu_core_hours / 7, -20)").evaluate(VALUES) == 0
    assert formula("2 ** 63 * 2 ** 63 * 2 ** 63").evaluate({}) == 2**189
    # Every value stays below 2**1024: the largest literal below is taken, 2**1024 is refused.
    assert formula(str(2**1024 - 1)).evaluate({}) == 2**1024 - 1
    with pytest.raises(mp.ConfigError, match="beyond 2\\*\\*1024"):
        formula(str(2**1024))
    with pytest.raises(mp.FormulaError, match="beyond 2\\*\\*1024"):
        formula(f"{2**1024 - 1} + 1").evaluate({})


def test_division_by_zero_and_negative_results_fail_the_hour_naming_contract_and_hour():
    usage = usage_of((A, b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 2}]'))
    with pytest.raises(mp.FormulaError, match=r"DIMENSION1_FORMULA .*divides by zero for contract c-1 in hour 2026-02-10 14"):
        mp.billable_amounts(usage, [formula("cpu_core_hours / replica_hours")], CLOUDS)
    with pytest.raises(mp.FormulaError, match=r"negative \(-3\) for contract c-1 in hour 2026-02-10 14"):
        mp.billable_amounts(usage, [formula("cpu_core_hours - 5")], CLOUDS)
    with pytest.raises(mp.FormulaError, match="divides by zero"):
        mp.billable_amounts(usage, [formula("replica_hours ** -1")], CLOUDS)


@pytest.mark.parametrize("text", ["(+(memory_byte_hours ** 64)) ** 64", "(memory_byte_hours ** 64 * 1) ** 64",
                                  "((memory_byte_hours * 1) ** 64 + 1) ** 64", "memory_byte_hours ** 64 / 3 ** -64",
                                  "round(memory_byte_hours ** 64, 20) ** 2"])
def test_every_value_a_formula_computes_is_bounded_and_fails_the_hour_naming_contract_and_hour(text):
    usage = usage_of((A, b'[{"externalPayerId": "c-1", "dimension": "memory_byte_hours", "value": 8589934592}]'))
    with pytest.raises(mp.FormulaError, match=r"DIMENSION1_FORMULA .*beyond 2\*\*1024.* for contract c-1 in hour 2026-02-10 14"):
        mp.billable_amounts(usage, [formula(text)], CLOUDS)
    # Within the bound the same shapes compute exactly.
    assert mp.billable_amounts(usage, [formula("+(replica_hours + 2) ** 64 * 1")], CLOUDS)[0] == {("c-1", "dim"): 2**64}


def test_formulas_replace_raw_dimensions_per_contract():
    usage = usage_of((A, b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 2, "pricePerUnit": 0.04},'
                         b'{"externalPayerId": "c-2", "dimension": "replica_hours", "value": 1}]'), with_prices=True)
    amounts, clouds = mp.billable_amounts(usage, [
        formula("cpu_core_hours * 2 + replica_hours", "units"),
        formula("cpu_core_hours_total_price / 0.01", "cents", "DIMENSION2_FORMULA"),
    ], CLOUDS)
    assert amounts == {("c-1", "units"): 4, ("c-1", "cents"): 8, ("c-2", "units"): 1, ("c-2", "cents"): 0}
    assert clouds == {"c-1": "aws", "c-2": "aws"}


def test_formulas_are_evaluated_per_service_and_contract_then_summed():
    # 1.4 GiB in each service: rounded per service, 1 + 1; rounded over the sum it would be 3.
    body = b'[{"externalPayerId": "c-1", "dimension": "memory_byte_hours", "value": %d}]' % (GIB * 14 // 10)
    usage = usage_of((A, body), (B, body))
    rounded = formula("round(memory_byte_hours / 1073741824)", "gib")
    assert mp.billable_amounts(usage, [rounded], CLOUDS)[0] == {("c-1", "gib"): 2}
    # A floor per service: max(1, 5) + max(3, 5), not max(4, 5).
    usage = usage_of((A, b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 1},'
                         b'{"externalPayerId": "c-2", "dimension": "cpu_core_hours", "value": 9}]'),
                     (B, b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 3}]'))
    floor = formula("max(cpu_core_hours, 5)", "at_least_five")
    assert mp.billable_amounts(usage, [floor], CLOUDS)[0] == {("c-1", "at_least_five"): 10, ("c-2", "at_least_five"): 9}
    # Summed exactly, then rounded down to a billionth once: 1/3 + 2/3 is 1, where thirds
    # rounded per service would have lost a billionth.
    usage = usage_of((A, b'[{"externalPayerId": "c-1", "dimension": "replica_hours", "value": 1}]'),
                     (B, b'[{"externalPayerId": "c-1", "dimension": "replica_hours", "value": 2}]'))
    assert mp.billable_amounts(usage, [formula("replica_hours / 3", "thirds")], CLOUDS)[0] == {("c-1", "thirds"): 1}
    usage = usage_of((A, b'[{"externalPayerId": "c-1", "dimension": "replica_hours", "value": 1}]'),
                     (B, b'[{"externalPayerId": "c-1", "dimension": "replica_hours", "value": 1}]'))
    assert mp.billable_amounts(usage, [formula("replica_hours / 3", "thirds")], CLOUDS)[0] == \
        {("c-1", "thirds"): Fraction(666666666, 10**9)}


@pytest.mark.parametrize("dimension, formulas", [
    ("cpu_core_hours_total_price", [("cost", "cpu_core_hours_total_price")]),
    ("replica_hours_total_price", [("units", "cpu_core_hours")]),  # a price total, read or not
    ("cost", [("cost", "cpu_core_hours_total_price")]),  # a formula's output no formula reads
])
def test_a_data_dimension_named_like_a_computed_name_fails_the_hour(dimension, formulas):
    compiled = [formula(text, name, f"DIMENSION{number}_FORMULA") for number, (name, text) in enumerate(formulas, 1)]
    body = b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 2, "pricePerUnit": 1},' \
           b'{"externalPayerId": "c-1", "dimension": "%s", "value": 7}]' % dimension.encode()
    usage = usage_of((A, b'[{"externalPayerId": "c-2", "dimension": "cpu_core_hours", "value": 1}]'), (B, body),
                     with_prices=True)
    with pytest.raises(mp.ExportFileError, match=f"holds a dimension '{dimension}' \\(contract c-1\\), which is also a "
                                                 "name the formulas compute") as error:
        mp.billable_amounts(usage, compiled, CLOUDS)
    assert "hour 2026-02-10 14:00:00" in str(error.value)
    # Without formulas a dimension is billed as it comes, whatever its name.
    assert mp.billable_amounts(usage, (), CLOUDS)[0][("c-1", dimension)] == 7


def test_load_formulas_reads_pairs_in_order_and_refuses_half_pairs():
    environ = {"DIMENSION10_NAME": "b", "DIMENSION10_FORMULA": "replica_hours",
               "DIMENSION2_NAME": "a", "DIMENSION2_FORMULA": "cpu_core_hours"}
    assert [(f.variable, f.name) for f in mp.load_formulas(environ)] == [("DIMENSION2_FORMULA", "a"),
                                                                         ("DIMENSION10_FORMULA", "b")]
    for broken, variable, problem in (
            ({"DIMENSION1_NAME": "a"}, "DIMENSION1_FORMULA", "is missing while DIMENSION1_NAME is set"),
            ({"DIMENSION3_FORMULA": "1"}, "DIMENSION3_NAME", "is missing while DIMENSION3_FORMULA is set"),
            ({**environ, "DIMENSION3_NAME": "a", "DIMENSION3_FORMULA": "1"}, "DIMENSION3_NAME", "already used"),
            ({"DIMENSION1_NAME": "bad name", "DIMENSION1_FORMULA": "1"}, "DIMENSION1_NAME", "1-100 letters"),
            ({"DIMENSION1_NAME": "x" * 101, "DIMENSION1_FORMULA": "1"}, "DIMENSION1_NAME", "1-100 letters"),
            ({"DIMENSION1_NAME": "gpu_total_price", "DIMENSION1_FORMULA": "1"}, "DIMENSION1_NAME",
             "ends in _total_price"),
            ({"DIMENSION1000_NAME": "a", "DIMENSION1000_FORMULA": "1"}, "DIMENSION1000_NAME", "beyond 999"),
            ({"DIMENSION1_NAME": "a", "DIMENSION1_FORMULA": "gpu_hours"}, "DIMENSION1_FORMULA", "unknown name")):
        with pytest.raises(mp.ConfigError) as error:
            mp.load_formulas(broken)
        assert error.value.variable == variable and problem in str(error.value), (broken, str(error.value))
    # A pair set to nothing is no pair.
    assert mp.load_formulas({"DIMENSION1_NAME": " ", "DIMENSION1_FORMULA": ""}) == ()


# --- end to end ---------------------------------------------------------------------------

GIB_HOURS = {"DIMENSION1_NAME": "memory_gib_hours", "DIMENSION1_FORMULA": "memory_byte_hours / 1073741824"}
OTHER = ("Acme Vector DB", "DEV", "pt-Other12345")


def memory(hour, contract, subscription, value, service=SERVICE, **extra):
    return record(service, hour, contract=contract, subscription=subscription, dimension="memory_byte_hours",
                  value=value, **extra)


def deployment(harness) -> dict:
    return harness.state()["deployment"]


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
    assert deployment(harness)["remainders"] == {}


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
    assert harness.clazar.metering_calls == 0 and harness.state() == {}
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
    assert deployment(harness)["remainders"] == {"c-2": {"compute_units": "0.5"}}


def test_two_services_are_billed_by_formula_per_service_then_summed_into_one_record(harness, hours):
    services = (SERVICE, OTHER)
    harness.env["SERVICES"] = ",".join(service_key(service) for service in services)
    env = {"START_HOUR": iso(hours[0]), "DIMENSION1_NAME": "gib_hours",
           "DIMENSION1_FORMULA": "round(memory_byte_hours / 1073741824)"}
    for service in services:  # 1.4 GiB each: 1 + 1 GiB-hours, not round(2.8) = 3
        harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [memory(hours[0], "c-1", "sub-AAAAAAAAAA", GIB * 14 // 10,
                                                                service=service)]}, service=service)
    harness.write_marker(hours.final(1), services=services)
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "gib_hours", iso(hours[0])): 2}
    assert len(harness.clazar.outcomes()) == 1, "one record for the contract, dimension and hour"
    assert {key: harness.state()[key]["last_processed_hour"] for key in map(service_key, services)} == \
        {service_key(service): iso(hours[0]) for service in services}


def test_a_malicious_formula_is_refused_before_anything_is_read_or_sent(harness, hours, tmp_path):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [memory(hours[0], "c-1", "sub-AAAAAAAAAA", GIB)]})
    harness.write_marker(hours.final(1))
    from servers import TCPProxy

    proxy = TCPProxy(harness.seaweed.s3_port)
    witness = tmp_path / "pwned"
    try:
        result = harness.run(env={
            "START_HOUR": iso(hours[0]), "AWS_ENDPOINT_URL_S3": proxy.endpoint,
            "DIMENSION1_NAME": "memory_gib_hours",
            "DIMENSION1_FORMULA": f"__import__('os').system('touch {witness}')",
        })
    finally:
        proxy.close()
    assert result.returncode == 2
    assert result.output.strip().count("\n") == 0 and "DIMENSION1_FORMULA" in result.output
    assert result.output.startswith("metering_processor: configuration error: DIMENSION1_FORMULA: may not contain")
    assert not witness.exists()
    assert proxy.requests == 0, "S3 was read"
    assert harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0
    assert harness.state() == {}


def test_a_formula_that_divides_by_zero_fails_that_hour_whole_the_later_wait_and_it_is_retried(harness, hours):
    env = {"START_HOUR": iso(hours[0]), "DIMENSION1_NAME": "per_replica",
           "DIMENSION1_FORMULA": "cpu_core_hours / replica_hours"}
    cpu = {"sub-AAAAAAAAAA": [record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA",
                                     dimension="cpu_core_hours", value=4)],
           "sub-BBBBBBBBBB": [record(SERVICE, hours[0], contract="c-2", subscription="sub-BBBBBBBBBB",
                                     dimension="cpu_core_hours", value=6),
                              record(SERVICE, hours[0], contract="c-2", subscription="sub-BBBBBBBBBB",
                                     dimension="replica_hours", value=2)]}
    harness.write_hour(hours[0], cpu)
    harness.write_hour(hours[1], {"sub-BBBBBBBBBB": [
        record(SERVICE, hours[1], contract="c-2", subscription="sub-BBBBBBBBBB", dimension="cpu_core_hours", value=8),
        record(SERVICE, hours[1], contract="c-2", subscription="sub-BBBBBBBBBB", dimension="replica_hours", value=2)]})
    harness.write_marker(hours.final(2))
    for _ in range(2):  # the same hour fails again: it is retried, never skipped
        result = harness.run(env=env)
        assert result.returncode == 1, result.output
        assert "divides by zero for contract c-1 in hour" in result.output
        assert harness.clazar.metering_calls == 0, "nothing of the hour, c-2 included, nor of the next"
        assert "last_processed_hour" not in deployment(harness)
        assert "last_processed_hour" not in harness.state().get(service_key(SERVICE), {})
        assert "pending_hour" not in deployment(harness)
    # Once the data allows it, the hour and the next are billed in order.
    cpu["sub-AAAAAAAAAA"].append(record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA",
                                        dimension="replica_hours", value=2))
    harness.write_hour(hours[0], cpu)
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "per_replica", iso(hours[0])): 2,
                                                    ("c-2", "per_replica", iso(hours[0])): 3,
                                                    ("c-2", "per_replica", iso(hours[1])): 4}


def test_a_data_dimension_named_like_a_formula_output_fails_the_hour_end_to_end(harness, hours):
    env = {"START_HOUR": iso(hours[0]), "DIMENSION1_NAME": "cost", "DIMENSION1_FORMULA": "cpu_core_hours_total_price"}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [
        record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours", value=2,
               price=3),
        record(SERVICE, hours[0], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="cost", value=100)]})
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [
        record(SERVICE, hours[1], contract="c-1", subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours", value=1,
               price=3)]})
    harness.write_marker(hours.final(2))
    result = harness.run(env=env)
    assert result.returncode == 1, result.output
    assert "the export holds a dimension 'cost' (contract c-1), which is also a name the formulas compute" in result.output
    assert harness.clazar.metering_calls == 0
    assert "last_processed_hour" not in deployment(harness), "the later hour waits"
