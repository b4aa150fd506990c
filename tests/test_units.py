"""Fast tests of the pure parts: configuration, hours, export files, an hour's usage across
services, carry, late usage, what "already exists" means, the state and ledger codecs."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from datetime import timezone
from fractions import Fraction

import metering_processor as mp
import pytest

UTC = timezone.utc
BASE = {"S3_BUCKET_NAME": "bucket", "SERVICE_NAME": "Postgres", "ENVIRONMENT_TYPE": "PROD",
        "PLAN_ID": "pt-HJSv20iWX0", "CLAZAR_CLIENT_ID": "id", "CLAZAR_CLIENT_SECRET": "secret-value"}
HOUR = mp.parse_hour("2026-02-10T14:00:00Z")
A = mp.ServiceKey("Acme", "PROD", "pt-A", "aws")
B = mp.ServiceKey("Acme", "PROD", "pt-B", "aws")
Z = mp.ServiceKey("Acme", "PROD", "pt-Z", "azure")


def at(text: str):
    return mp.parse_utc(text)


# --- configuration --------------------------------------------------------------------------


def test_defaults():
    config = mp.load_config(BASE)
    assert config.services == (mp.ServiceKey("Postgres", "PROD", "pt-HJSv20iWX0", "aws"),)
    assert config.api_url == "https://api.clazar.io/metering/"
    assert config.auth_url == "https://api.clazar.io/authenticate/"
    assert (config.state_path, config.max_hours_per_run, config.batch_size, config.max_retries) == \
        ("./metering_state.json", 24, 25, 5)
    assert (config.s3_timeout_seconds, config.run_timeout_minutes, config.stop_timeout_seconds) == (120, 50, 10)
    assert config.start_hour is None and config.dry_run is False and config.formulas == ()
    assert "secret-value" not in repr(config)
    assert config.record_limit("aws") == 2**31 - 1 and config.record_limit("azure") is None


def test_services_carry_their_marketplace():
    keys = mp.parse_service_keys("Acme Vector DB:PROD:pt-1=azure, Weird: Name:DEV:pt-2,A=B:PROD:pt-3", "aws")
    assert [(k.key, k.cloud) for k in keys] == [("Acme Vector DB:PROD:pt-1", "azure"),
                                                ("Weird: Name:DEV:pt-2", "aws"), ("A=B:PROD:pt-3", "aws")]
    assert keys[0].label == "Acme Vector DB/PROD/pt-1"
    assert keys[0].hour_prefix(HOUR) == "omnistrate-metering/Acme Vector DB/PROD/pt-1/2026/02/10/14/"
    config = mp.load_config({**BASE, "SERVICES": "a:PROD:pt-1=GCP,b:PROD:pt-2", "CLAZAR_CLOUD": "azure"})
    assert [s.cloud for s in config.services] == ["gcp", "azure"]
    assert config.record_limit("gcp") is None
    assert mp.load_config({**BASE, "MAX_RECORD_QUANTITY": "1000"}).record_limit("azure") == 1000


@pytest.mark.parametrize("text, problem", [
    ("Postgres:PROD", "not of the form"), ("a:b:", "not of the form"), (":b:c", "not of the form"),
    ("a/b:PROD:pt", "contains '/'"), ("a:PROD:pt,a:PROD:pt=azure", "listed twice"), (",", "lists no service"),
    ("a:PROD:pt=aws2", "must be one of aws, azure, gcp"),
])
def test_bad_services(text, problem):
    with pytest.raises(mp.ConfigError, match=problem) as error:
        mp.parse_service_keys(text, "aws")
    assert error.value.variable == "SERVICES"


def test_dry_run_needs_no_credentials_and_the_flag_wins():
    bare = {key: value for key, value in BASE.items() if not key.startswith("CLAZAR_CLIENT")}
    assert mp.load_config(bare, dry_run=True).dry_run is True
    assert mp.load_config({**bare, "DRY_RUN": "yes"}).dry_run is True
    with pytest.raises(mp.ConfigError, match="CLAZAR_CLIENT_ID"):
        mp.load_config(bare)
    assert mp.load_config(bare, sends=False).client_id == ""


def test_a_misspelt_variable_is_named_with_the_closest_setting():
    warnings = mp.load_config({**BASE, "CLAZAR_CLOUDS": "azure", "LOG_LEVL": "DEBUG", "PATH": "/bin",
                               "CLAZAR_THING": "1", "DIMENSION2_NAME": "x", "DIMENSION2_FORMULA": "cpu_core_hours",
                               "MAXIMUM_SPEED": "1", "HOME": "/root"}).warnings
    assert "CLAZAR_CLOUDS is not a setting; did you mean CLAZAR_CLOUD?" in warnings
    assert "LOG_LEVL is not a setting; did you mean LOG_LEVEL?" in warnings
    assert "CLAZAR_THING is not a setting of this exporter; it is ignored" in warnings
    assert len(warnings) == 3
    removed = mp.load_config({**BASE, "READ_AHEAD_HOURS": "2"}).warnings
    assert removed == ("READ_AHEAD_HOURS is no longer a setting (2 hours are read ahead (1 when an hour "
                       "holds 1,000 files or more)); remove it",)


def test_a_variable_that_is_not_utf8_is_a_configuration_error_naming_it():
    latin1 = "Caf\xe9".encode("latin-1").decode("utf-8", "surrogateescape")
    with pytest.raises(mp.ConfigError, match="not valid UTF-8") as error:
        mp.load_config({**BASE, "SERVICE_NAME": latin1})
    assert error.value.variable == "SERVICE_NAME"
    with pytest.raises(mp.ConfigError) as error:
        mp.load_config({**BASE, "DIMENSION1_NAME": "x", "DIMENSION1_FORMULA": "cpu_core_hours" + latin1})
    assert error.value.variable == "DIMENSION1_FORMULA"


@pytest.mark.parametrize("variable, value, allowed", [
    ("MAX_HOURS_PER_RUN", "0", "1 to 8784"), ("LATE_USAGE_LOOKBACK_HOURS", "721", "0 to 720"),
    ("LEDGER_RETENTION_DAYS", "x", "1 to 36500"), ("S3_TIMEOUT_SECONDS", "nan", "1 to 3600"),
    ("RUN_TIMEOUT_MINUTES", "1441", "1 to 1440"), ("STOP_TIMEOUT_SECONDS", "1", "2 to 300"),
    ("CLAZAR_TIMEOUT_SECONDS", "inf", "0.1 to 600"), ("MAX_RECORD_QUANTITY", "0", "1 to"),
    ("LATE_USAGE", "bill", "report, carry"), ("LOG_LEVEL", "loud", "DEBUG, INFO"),
])
def test_every_setting_is_range_checked_by_the_table(variable, value, allowed):
    with pytest.raises(mp.ConfigError, match=allowed) as error:
        mp.load_config({**BASE, variable: value})
    assert error.value.variable == variable


def test_the_settings_table_is_the_one_source_of_help():
    epilog = mp.help_epilog()
    for setting in mp.SETTINGS:
        assert setting.name in epilog
    assert "exit codes: 0 ok, 1 failed, 2 config, 3 locked, 4 state, 5 stopped" in epilog


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:8080\\@evil.example/", "backslash"), ("https://user:pw@api.example/", "user name"),
    ("http://api.example/", "plain http"), ("https://api.example:0/", "port"), ("ftp://api.example/", r"http\(s\) URL"),
    ("https://api .example/", "spaces"),
])
def test_clazar_urls_are_checked_with_urllib3s_parser(url, problem):
    with pytest.raises(mp.ConfigError, match=problem):
        mp.load_config({**BASE, "CLAZAR_API_URL": url})


def test_an_s3_endpoint_over_plain_http_must_be_loopback():
    mp.load_config({**BASE, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"})
    with pytest.raises(mp.ConfigError, match="plain http") as error:
        mp.load_config({**BASE, "AWS_ENDPOINT_URL_S3": "http://minio.internal:9000"})
    assert error.value.variable == "AWS_ENDPOINT_URL_S3"


def test_the_pushgateway_may_carry_basic_auth_only_over_tls_or_to_loopback():
    assert mp.load_config({**BASE, "METRICS_PUSHGATEWAY_URL": "https://u:p@push.example/"}).pushgateway_url == \
        "https://u:p@push.example"
    mp.load_config({**BASE, "METRICS_PUSHGATEWAY_URL": "http://u:p@127.0.0.1:9091"})
    mp.load_config({**BASE, "METRICS_PUSHGATEWAY_URL": "http://push.example:9091"})
    with pytest.raises(mp.ConfigError, match="plain http"):
        mp.load_config({**BASE, "METRICS_PUSHGATEWAY_URL": "http://u:p@push.example:9091"})


def test_the_client_secret_may_come_from_a_file_and_not_both(tmp_path):
    path = tmp_path / "secret"
    path.write_text("  from-a-file\n")
    environ = {key: value for key, value in BASE.items() if key != "CLAZAR_CLIENT_SECRET"}
    assert mp.load_config({**environ, "CLAZAR_CLIENT_SECRET_FILE": str(path)}).client_secret == "from-a-file"
    with pytest.raises(mp.ConfigError, match="together"):
        mp.load_config({**BASE, "CLAZAR_CLIENT_SECRET_FILE": str(path)})
    path.write_text("one\ntwo\n")
    with pytest.raises(mp.ConfigError, match="several lines"):
        mp.load_config({**environ, "CLAZAR_CLIENT_SECRET_FILE": str(path)})
    with pytest.raises(mp.ConfigError) as error:
        mp.load_config({**environ, "CLAZAR_CLIENT_SECRET_FILE": str(tmp_path / "bad\nname")})
    assert "\n" not in str(error.value)


def test_start_hour_must_be_a_whole_utc_hour():
    assert mp.load_config({**BASE, "START_HOUR": "2026-02-10T16:00:00+02:00"}).start_hour == HOUR
    for bad in ("2026-02-10T14:30:00Z", "yesterday", "1999-12-31T23:00:00Z"):
        with pytest.raises(mp.ConfigError, match="START_HOUR"):
            mp.load_config({**BASE, "START_HOUR": bad})


# --- formulas -------------------------------------------------------------------------------


def test_formulas_are_checked_at_start_and_exact():
    config = mp.load_config({**BASE, "DIMENSION1_NAME": "mem", "DIMENSION1_FORMULA": "memory_byte_hours / 3",
                             "DIMENSION2_NAME": "cost", "DIMENSION2_FORMULA": "cpu_core_hours_total_price * 100"})
    mem, cost = config.formulas
    assert mem.evaluate({"memory_byte_hours": 1}) == Fraction(1, 3)
    assert mem.inputs == {"memory_byte_hours"} and cost.inputs == {"cpu_core_hours_total_price"}
    for name, formula, problem in (("x", "__import__('os')", "may not contain"), ("x", "cpu ** 2", "unknown name"),
                                   ("x", "cpu_core_hours ** x", "literal exponent"),
                                   ("cpu_core_hours_total_price", "1", "ends in _total_price")):
        with pytest.raises(mp.ConfigError, match=problem):
            mp.load_config({**BASE, "DIMENSION1_NAME": name, "DIMENSION1_FORMULA": formula})


# --- hours and the marker -------------------------------------------------------------------


def test_an_hour_is_due_once_closed_and_final_for_every_service():
    now = at("2026-02-10T18:20:00Z")
    assert mp.due_end(now, None) == at("2026-02-10T18:00:00Z")
    assert mp.due_end(now, at("2026-02-10T16:30:00Z")) == at("2026-02-10T16:00:00Z")
    end, holding = mp.deployment_due_end(now, {"a": at("2026-02-10T18:00:00Z"), "b": at("2026-02-10T16:00:00Z")})
    assert (end, holding) == (at("2026-02-10T16:00:00Z"), "b")
    assert mp.deployment_due_end(now, {"a": None, "b": None}) == (at("2026-02-10T18:00:00Z"), None)
    assert mp.due_hours(at("2026-02-10T14:00Z"), at("2026-02-10T16:00Z"), 24) == [HOUR, HOUR + mp.HOUR]
    assert mp.due_hours(at("2026-02-10T14:00Z"), at("2026-02-10T16:00Z"), 1) == [HOUR]


def test_first_due_hour():
    now = at("2026-02-10T18:20:00Z")
    assert mp.first_due_hour(None, None, None, now) == at("2026-02-09T18:00:00Z")
    assert mp.first_due_hour(None, None, HOUR, now) == HOUR
    assert mp.first_due_hour(HOUR, None, None, now) == HOUR + mp.HOUR
    assert mp.first_due_hour(HOUR, HOUR + 5 * mp.HOUR, None, now) == HOUR + 5 * mp.HOUR


def test_marker_entries_fail_only_the_services_they_name():
    body = json.dumps({"a:b:c": {"last_processed_to": "2026-02-10T15:29:59Z"}, "x:y:z": {"nope": 1}}).encode()
    marker = mp.ExportMarker.parse(body, "s3://b/m")
    assert marker.final_before("a:b:c") == at("2026-02-10T15:30:00Z")
    with pytest.raises(mp.MarkerError, match="has no last_processed_to"):
        marker.final_before("x:y:z")
    with pytest.raises(mp.MarkerError, match="no entry for 'q:r:s'; it holds 1 key"):
        marker.final_before("q:r:s")
    with pytest.raises(mp.MarkerError, match="not valid JSON"):
        mp.ExportMarker.parse(b"{", "s3://b/m")


# --- export files and an hour's usage -----------------------------------------------------------


def row(contract, dimension, value, **extra):
    return {"externalPayerId": contract, "dimension": dimension, "value": value, "subscriptionId": "sub-1",
            "podName": "db-0", **extra}


def file_of(*rows):
    return json.dumps(list(rows)).encode()


def usage_of(*files, hour=HOUR, services=(A, B), with_prices=False):
    """An HourUsage from (service, key, body) triples, in that order."""
    usage = mp.HourUsage(hour, services)
    for service, key, body in files:
        usage.add(service.key, mp.parse_export_file(key, body, with_prices=with_prices))
    return usage


def test_rows_of_two_subscription_files_never_collapse():
    usage = usage_of((A, "a/sub-1.json", file_of(row("c-1", "cpu", 3, podName=None))),
                     (A, "a/sub-2.json", file_of(row("c-1", "cpu", 3, podName=None))))
    assert mp.billable_amounts(usage, (), {A.key: "aws", B.key: "aws"})[0] == {("c-1", "cpu"): 6}
    assert usage.repeated == 0
    assert usage_of((A, "k", file_of(row("c-1", "cpu", 3), row("c-1", "cpu", 4)))).repeated == 1


def test_services_of_one_deployment_are_summed_into_one_record():
    usage = usage_of((A, "a/s.json", file_of(row("c-1", "cpu", 2))), (B, "b/s.json", file_of(row("c-1", "cpu", 5))))
    amounts, clouds = mp.billable_amounts(usage, (), {A.key: "aws", B.key: "aws"})
    assert amounts == {("c-1", "cpu"): 7} and clouds == {"c-1": "aws"}


def test_a_contract_under_two_marketplaces_fails_the_hour_naming_it():
    usage = usage_of((A, "a/s.json", file_of(row("c-1", "cpu", 2))), (Z, "z/s.json", file_of(row("c-1", "cpu", 5))),
                     services=(A, Z))
    with pytest.raises(mp.ExportFileError, match="contract c-1 has usage under .*pt-A \\(aws\\) and .*pt-Z \\(azure\\)"):
        mp.billable_amounts(usage, (), {A.key: "aws", Z.key: "azure"})


def test_formulas_apply_per_service_then_sum():
    config = mp.load_config({**BASE, "DIMENSION1_NAME": "top", "DIMENSION1_FORMULA": "max(cpu_core_hours, 3)"})
    usage = usage_of((A, "a/s.json", file_of(row("c-1", "cpu_core_hours", 1))),
                     (B, "b/s.json", file_of(row("c-1", "cpu_core_hours", 1))))
    assert mp.billable_amounts(usage, config.formulas, {A.key: "aws", B.key: "aws"})[0] == {("c-1", "top"): 6}


def test_a_data_dimension_named_like_a_computed_one_fails_the_hour():
    config = mp.load_config({**BASE, "DIMENSION1_NAME": "cost", "DIMENSION1_FORMULA": "cpu_core_hours_total_price",
                             "DIMENSION2_NAME": "cpu_core_hours", "DIMENSION2_FORMULA": "cpu_core_hours"})
    price = usage_of((A, "a/s.json", file_of(row("c-1", "cpu_core_hours_total_price", 7))), with_prices=True)
    with pytest.raises(mp.ExportFileError, match="'cpu_core_hours_total_price'"):
        mp.billable_amounts(price, config.formulas, {A.key: "aws", B.key: "aws"})
    output = usage_of((A, "a/s.json", file_of(row("c-1", "cost", 7))))
    with pytest.raises(mp.ExportFileError, match="'cost'"):
        mp.billable_amounts(output, config.formulas, {A.key: "aws", B.key: "aws"})
    # An output that reads its own name passes its input through.
    passed = usage_of((A, "a/s.json", file_of(row("c-1", "cpu_core_hours", 7))))
    assert mp.billable_amounts(passed, config.formulas, {A.key: "aws", B.key: "aws"})[0] == {
        ("c-1", "cost"): 0, ("c-1", "cpu_core_hours"): 7}


def test_repeated_rows_keep_the_largest_value_then_price_whatever_the_order():
    first = file_of(row("c-1", "cpu_core_hours", 4, pricePerUnit=1))
    second = file_of(row("c-1", "cpu_core_hours", 4, pricePerUnit=3))
    config = mp.load_config({**BASE, "DIMENSION1_NAME": "cost", "DIMENSION1_FORMULA": "cpu_core_hours_total_price"})
    results = set()
    for order in ((first, second), (second, first)):
        usage = mp.HourUsage(HOUR, (A,))
        for body in order:
            usage.add(A.key, mp.parse_export_file("a/s.json", body, with_prices=True))
        results.add(tuple(mp.billable_amounts(usage, config.formulas, {A.key: "aws"})[0].items()))
    assert results == {((("c-1", "cost"), Fraction(12)),)}


def test_amounts_are_rounded_down_to_a_billionth():
    body = b'[{"externalPayerId": "c-1", "dimension": "cpu", "value": 0.1234567899}]'
    usage = usage_of((A, "a/s.json", body))
    assert mp.billable_amounts(usage, (), {A.key: "aws", B.key: "aws"})[0] == {("c-1", "cpu"): Fraction(123456789, 10**9)}
    assert mp.quantize(Fraction(2, 3)) == Fraction(666666666, 10**9)
    with pytest.raises(mp.QuantityError):
        mp.quantize(Fraction(mp.MAX_AMOUNT))


@pytest.mark.parametrize("body, problem", [
    (b"[1]", "record 0 is a JSON int"), (b'[{"value": -1}]', "not a finite non-negative"),
    (b'[{"value": 1e999999999}]', "not a finite"), (b'{"a": 1}', "expected a JSON array"),
    (b'[{"value": 1, "value": 2}]', "twice"), (b"\x1f\x8b", "gzip"), (b'[{"value": 1, "dimension": 3}]', "not a string"),
    (b'[{"value": 1, "externalPayerId": "c\\u001b[31m"}]', "control characters"),
])
def test_bad_files_name_the_key(body, problem):
    with pytest.raises(mp.ExportFileError, match=problem) as error:
        mp.parse_export_file("omnistrate-metering/x/sub.json", body)
    assert "omnistrate-metering/x/sub.json" in str(error.value)


def test_an_hours_digest_does_not_depend_on_order():
    assert mp.hour_digest([("a", "1"), ("b", "2")]) == mp.hour_digest([("b", "2"), ("a", "1")])
    assert mp.hour_digest([("a", "1")]) != mp.hour_digest([("a", "2")])


# --- carry, late usage, limits, "already exists" --------------------------------------------------


def test_carry_bills_whole_units_and_keeps_the_rest():
    quantities, remainders = mp.carry({("c", "d"): Fraction(5, 2)}, {("c", "d"): Fraction(3, 4)})
    assert quantities == {("c", "d"): 3} and remainders == {("c", "d"): Fraction(1, 4)}
    assert mp.carry({}, {("c", "e"): Fraction(3, 2)}) == ({("c", "e"): 1}, {("c", "e"): Fraction(1, 2)})


def test_carried_usage_above_a_contracts_limit_is_billed_over_several_hours():
    limit_of = {"c": 10, "free": None}.get
    quantities, remainders = mp.carry({("c", "d"): Fraction(4)}, {("c", "d"): Fraction(15)}, limit_of)
    assert quantities == {("c", "d"): 10} and remainders == {("c", "d"): Fraction(9)}
    assert mp.carry({("free", "d"): Fraction(4)}, {("free", "d"): Fraction(15)}, limit_of)[0] == {("free", "d"): 19}
    # An hour that is over the limit by itself is left for the limit check to refuse.
    assert mp.carry({("c", "d"): Fraction(12)}, {}, limit_of)[0] == {("c", "d"): 12}


def test_late_usage_carries_only_above_the_high_water_mark():
    carried, reported, after = mp.late_usage({("c", "d"): Fraction(5)}, {("c", "d"): Fraction(7), ("c", "e"): 1}, True)
    assert carried == {("c", "d"): 2, ("c", "e"): 1} and after == {("c", "d"): 7, ("c", "e"): 1}
    carried, reported, after = mp.late_usage({("c", "d"): Fraction(5)}, {("c", "d"): Fraction(3)}, True)
    assert carried == {} and reported == {("c", "d"): -2} and after == {("c", "d"): 5}
    assert mp.late_usage({("c", "d"): Fraction(5)}, {("c", "d"): Fraction(6)}, False)[0] == {}


def test_the_limit_is_named_with_a_formula_for_the_dimension_that_failed():
    record = mp.metering_records(HOUR, {("c-1", "storage_allocated_byte_hours"): 2**31}, {"c-1": "aws"})[0]
    assert mp.over_limit(record, None) is None and mp.over_limit(record, 2**31) is None
    problem = mp.over_limit(record, 2**31 - 1)
    for part in ("c-1", "storage_allocated_byte_hours", "2147483648", "2147483647", "aws",
                 "DIMENSION1_NAME=storage_allocated_gib_hours", "storage_allocated_byte_hours/1073741824"):
        assert part in problem


@pytest.mark.parametrize("earlier, landed, retried, outcome", [
    (None, False, False, mp.CONFLICT), (None, True, False, mp.ALREADY_DELIVERED),
    (None, False, True, mp.ALREADY_DELIVERED), (mp.CONFLICT, True, True, mp.CONFLICT),
    (mp.DELIVERED, False, False, mp.ALREADY_DELIVERED), (mp.UNSENT, False, False, mp.CONFLICT),
    (mp.REJECTED, False, False, mp.CONFLICT), (mp.RESENDING, True, False, mp.ALREADY_DELIVERED),
])
def test_already_exists_is_ours_only_if_one_of_our_attempts_may_have_stored_it(earlier, landed, retried, outcome):
    assert mp.duplicate_outcome(earlier, landed, retried) == outcome


RECORD = {"contract_id": "c-1", "dimension": "d", "quantity": "3", "cloud": "aws"}


@pytest.mark.parametrize("entry, outcome", [
    ({"status": "success", "id": "x", "contract_id": "c-1", "dimension": "d"}, mp.DELIVERED),
    ({"status": "fail", "errors": ["Metering record with same contract_id, dimension and same hour already exists"]},
     mp.ALREADY_DELIVERED),
    ({"status": "fail", "errors": [{"message": "Record already exists"}]}, mp.ALREADY_DELIVERED),
    ({"status": "fail"}, mp.REJECTED), ({"status": "fail", "errors": ["Contract not found"]}, mp.REJECTED),
])
def test_classify_result(entry, outcome):
    assert mp.classify_result(RECORD, entry).outcome == outcome


def test_a_result_for_another_record_fails_the_batch():
    with pytest.raises(mp.ClazarError, match="echoes contract_id"):
        mp.classify_result(RECORD, {"status": "success", "contract_id": "c-2"})
    with pytest.raises(mp.ClazarError, match="2 results for 1 records"):
        mp.read_results([RECORD], {"results": [{"status": "success"}] * 2})


def test_lateness_follows_each_records_marketplace():
    now = HOUR + 10 * mp.HOUR
    assert mp.lateness(HOUR, ["azure"], now) is None
    assert mp.lateness(HOUR, ["azure", "aws"], now) == ("aws", 9 * mp.HOUR)


# --- the state -------------------------------------------------------------------------------------


def pending_hour(hour=HOUR, quantity=2):
    records = tuple(mp.metering_records(hour, {("c-1", "d"): quantity}, {"c-1": "aws"}))
    return mp.PendingHour(hour, records, {("c-1", "d"): Fraction(5, 2)}, {}, {("c-1", "d"): Fraction(1, 2)},
                          {"c-1": "aws"}, {A.key: "aws", B.key: "aws"}, "digest", "", 1)


def test_the_state_round_trips_and_commits_every_service():
    state = mp.DeploymentState(services={A.key: mp.ServiceEntry(HOUR - mp.HOUR, True)})
    with_pending = mp.dataclasses.replace(state, pending=pending_hour())
    assert mp.parse_state(mp.dump_state(with_pending), "s") == with_pending
    done = with_pending.committed(pending_hour(), {"rejected": 1}, 24)
    assert done.last_processed_hour == HOUR and done.pending is None
    assert done.service(A.key).last_processed_hour == HOUR == done.service(B.key).last_processed_hour
    assert done.service(A.key).hours_by_marker is True
    assert done.remainders == {("c-1", "d"): Fraction(1, 2)} and done.clouds == {"c-1": "aws"}
    assert done.waiting == {HOUR: {"rejected": 1}} and done.accounted[HOUR].amounts == {("c-1", "d"): Fraction(5, 2)}
    document = json.loads(mp.dump_state(done))
    assert document["version"] == 2 and document[A.key] == {"last_processed_hour": "2026-02-10T14:00:00Z",
                                                            "hours_by_marker": True}
    assert document["deployment"]["remainders"] == {"c-1": {"d": "0.5"}}
    assert mp.parse_state(mp.dump_state(done), "s") == done


def test_marks_older_than_the_lookback_are_dropped_at_commit():
    state = mp.DeploymentState()
    for i in range(5):
        state = state.committed(pending_hour(HOUR + i * mp.HOUR), {}, 3)
    assert sorted(state.accounted) == [HOUR + i * mp.HOUR for i in (2, 3, 4)] and state.marks_hours == 3


def test_the_original_scripts_state_is_read_and_development_formats_are_refused():
    original = json.dumps({A.key: {"last_processed_hour": "2026-02-10T14:00:00Z", "last_updated": "x"},
                           B.key: {}}).encode()
    state = mp.parse_state(original, "s")
    assert state.service(A.key).last_processed_hour == HOUR and state.service(B.key).last_processed_hour is None
    assert state.last_processed_hour is None
    development = json.dumps({A.key: {"last_processed_hour": "2026-02-10T14:00:00Z", "remainders": {}}}).encode()
    with pytest.raises(mp.StateError, match="development version"):
        mp.parse_state(development, "s")
    with pytest.raises(mp.StateError, match="version '3'"):
        mp.parse_state(b'{"version": 3}', "s")


@pytest.mark.parametrize("deployment, problem", [
    ({"remainders": {"c": {"d": "1/2"}}}, "not a non-negative amount"),
    ({"remainders": {"c": {"d": "-0.5"}}}, "not a non-negative amount"),
    ({"remainders": {"c": {"d": "1" * 321}}}, "not a non-negative amount"),
    ({"waiting": {"2026-02-10T14:00:00Z": {"rejected": 10**400}}}, "not a count"),
    ({"waiting": {"2026-02-10T14:00:00Z": {"delivered": 1}}}, "rejected|conflict"),
    ({"last_processed_hour": "2026-02-10T14:30:00Z"}, "not a whole hour"),
    ({"pending_hour": {"hour": "2026-02-10T14:00:00Z"}}, "lacks"),
    ({"last_run": {"at": "2026-02-10T14:00:00Z", "result": "ok", "sent": 10**400}}, "not a count"),
    ({"surprise": 1}, "unknown field"), ({"marks_hours": -1}, "not a count"),
    ({"clouds": {"c": "ibm"}}, "aws|azure|gcp"),
])
def test_a_state_of_the_wrong_shape_is_refused_naming_the_field(deployment, problem):
    with pytest.raises(mp.StateError, match=problem) as error:
        mp.parse_state(json.dumps({"version": 2, "deployment": deployment}).encode(), "s3://b/state.json")
    assert "s3://b/state.json" in str(error.value) and "entry 'deployment'" in str(error.value)


def test_a_pending_record_of_the_wrong_shape_is_refused():
    data = pending_hour().to_json()
    data["records"][0]["quantity"] = "²"
    with pytest.raises(ValueError, match="not ASCII digits"):
        mp.PendingHour.from_json(data)
    data["records"][0] = {**data["records"][0], "quantity": "2", "start_time": "2026-02-10T15:00:00Z"}
    with pytest.raises(ValueError, match="is not for the hour"):
        mp.PendingHour.from_json(data)


@pytest.mark.parametrize("text, value", [("0", 0), ("12", 12), ("0.5", Fraction(1, 2)),
                                         ("0.000000001", Fraction(1, 10**9)), ("-3.25", Fraction(-13, 4))])
def test_amounts_are_written_as_decimals_and_read_back(text, value):
    assert mp.amount_text(value) == text
    assert mp.parse_amount(text, signed=True) == value


@pytest.mark.parametrize("text", ["1/2", "1e3", "0.1234567891", "+1", " 1", "1.", ".5", "١"])
def test_amounts_refuse_what_the_exporter_never_writes(text):
    with pytest.raises(ValueError):
        mp.parse_amount(text, signed=True)


# --- the ledger ------------------------------------------------------------------------------------


def test_ledger_lines_round_trip_and_refuse_other_shapes():
    line = mp.RecordLine("c-1", "d", HOUR, "azure", 3, mp.REJECTED, HOUR, Fraction(5, 2), Fraction(1, 2), "id-1",
                         {"status": "fail"})
    assert mp.ledger_line(json.loads(json.dumps(line.to_json()))) == line
    late = mp.LateLine("c-1", "d", HOUR, Fraction(2), Fraction(-1), "reported", 3, "digest", HOUR)
    assert mp.ledger_line(late.to_json()) == late
    for change, problem in (({"kind": "other"}, "not record or late"), ({"quantity": "3"}, "not a whole number"),
                            ({"outcome": "lost"}, "outcome"), ({"service": "x"}, "unknown field"),
                            ({"amount": "1/2"}, "non-negative amount"), ({"hour": "2026-02-10T14:30:00Z"}, "whole hour")):
        with pytest.raises(ValueError, match=problem):
            mp.ledger_line({**line.to_json(), **change})


def test_waiting_records_follow_the_latest_line_of_each_record():
    first = mp.RecordLine("c-1", "d", HOUR, "aws", 3, mp.REJECTED, HOUR)
    resending = mp.dataclasses.replace(first, outcome=mp.RESENDING, retry=True)
    delivered = mp.dataclasses.replace(first, outcome=mp.RETRY_DELIVERED, retry=True, attempts=2)
    assert mp.waiting_counts([first]) == {"rejected": 1}
    assert mp.waiting_counts([first, resending]) == {"rejected": 1}
    assert mp.waiting_counts([first, resending, delivered]) == {}
    assert mp.first_sends([first, delivered]) == {("c-1", "d"): first}


def test_a_resent_hour_keeps_the_lines_answered_before():
    pending = pending_hour()
    earlier = {("c-1", "d"): mp.RecordLine("c-1", "d", HOUR, "aws", 2, mp.CONFLICT, HOUR, record_id="old")}
    lines = mp.hour_lines(pending, {}, earlier, HOUR)
    assert lines == [earlier[("c-1", "d")]]
    lines = mp.hour_lines(pending, {("c-1", "d"): mp.RecordResult(mp.ALREADY_DELIVERED)}, {}, HOUR)
    assert (lines[0].outcome, lines[0].amount, lines[0].quantity) == (mp.ALREADY_DELIVERED, Fraction(5, 2), 2)


def test_reconcile_compares_todays_usage_with_what_was_billed():
    billed = mp.RecordLine("c-1", "d", HOUR, "aws", 2, mp.DELIVERED, HOUR, Fraction(5, 2), Fraction(0))
    compared, after = mp.reconcile_hour({("c-1", "d"): Fraction(5, 2)}, [billed], {}, lambda contract: None)
    assert compared == {("c-1", "d"): (2, 2, 0, 0)} and after == {("c-1", "d"): Fraction(1, 2)}
    late = mp.LateLine("c-1", "d", HOUR, Fraction(5, 2), Fraction(2), "carried", 1, "x", HOUR)
    # Carried late usage is billed with a later hour, not this one.
    assert mp.reconcile_hour({("c-1", "d"): Fraction(9, 2)}, [billed, late], {}, lambda c: None)[0] == \
        {("c-1", "d"): (2, 2, 0, 0)}
    assert mp.reconcile_hour({("c-1", "d"): Fraction(9, 2)}, [billed], {}, lambda c: None)[0] == \
        {("c-1", "d"): (4, 2, 0, 0)}


# --- masking, labels, text -------------------------------------------------------------------------


def test_registered_secrets_are_masked_in_every_escaped_form():
    mp.forget_secrets()
    secret = 'se"cr\x0bet/é\n'
    mp.redact(secret)
    for form in (secret, json.dumps(secret), repr(secret), repr(secret.encode()), secret.strip(),
                 "%22".join(["se", "cr%0Bet%2F%C3%A9"]), "se&quot;cr&#11;et&#x2F;&#233;"):
        assert "cr" not in mp.mask_secrets(f"before {form} after"), form
    mp.forget_secrets()


def test_names_that_merely_contain_secret_are_not_masked_in_labels_or_logs():
    mp.forget_secrets()
    names = ["Vault Secret:PROD:pt-1", "Vault Secret:DEV:pt-1"]
    assert [mp._label(name) for name in names] == names
    assert mp.mask_secrets("service Vault Secret:PROD:pt-1") == "service Vault Secret:PROD:pt-1"
    assert mp.mask_outside('{"client_secret": "abc"}') == '{"client_secret": "[redacted]"}'
    assert mp.mask_secrets("Bearer abc.def and ops@buyer.example") == "Bearer [redacted] and [email]"


def test_metrics_carry_the_deployment_and_the_cloud_and_escape_labels():
    config = mp.load_config({**BASE, "SERVICES": 'a"b:PROD:pt-1=azure,c:PROD:pt-2'})
    report = mp.RunReport(holding='a"b:PROD:pt-1')
    report.count(mp.DELIVERED, "azure")
    text = mp.render_metrics(config, report, mp.DeploymentState(), 0, HOUR, 1.5, "/var/lib/m/state.json")
    assert 'metering_run_records_sent{deployment="/var/lib/m/state.json",cloud="azure"} 1' in text
    assert 'metering_run_records_sent{deployment="/var/lib/m/state.json",cloud="aws"} 0' in text
    assert 'metering_service_holding{deployment="/var/lib/m/state.json",service="a\\"b:PROD:pt-1"} 1' in text
    assert f'metering_build_info{{deployment="/var/lib/m/state.json",version="{mp.__version__}"}} 1' in text
    assert mp.pushgateway_target("https://p/", "s3://b/k") == "https://p/metrics/job/metering_exporter/deployment@base64/czM6Ly9iL2s"


def test_text_logs_escape_control_characters_so_no_line_can_be_forged(capsys):
    mp.configure_logging("INFO", "text")
    mp.log.info("x\n2026-01-01 00:00:00,000 - ERROR - forged\x1b[31m")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\\n" in out and "\\x1b" in out


# --- files and the entry point -------------------------------------------------------------------------


def test_files_not_ours_are_refused(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{}")
    os.chmod(path, 0o666)  # noqa: S103 (planted by someone careless)
    with pytest.raises(mp.StateError, match="mode 0666"):
        mp.read_regular_file(str(path), "state")
    os.chmod(tmp_path, 0o777)  # noqa: S103
    mp.check_folder(str(tmp_path), "state")  # ours: allowed
    os.chmod(tmp_path, 0o700)


def test_the_lock_is_exclusive_and_never_opened_through_a_link(tmp_path):
    first, second = mp.LocalLock(str(tmp_path / "s.lock")), mp.LocalLock(str(tmp_path / "s.lock"))
    first.acquire()
    with pytest.raises(mp.LockHeld, match="another run holds the lock"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.lock")
    with pytest.raises(mp.StateError, match="symbolic link"):
        mp.LocalLock(str(tmp_path / "link.lock")).acquire()
    assert stat.S_IMODE((tmp_path / "s.lock").stat().st_mode) == 0o600


def test_a_stop_takes_at_most_stop_timeout_seconds_half_for_answers_a_fifth_for_last_words():
    stop = mp.StopRequest()
    assert (stop.deadline, stop.grace, stop.last_words_seconds) == (10, 5, 2)
    stop = mp.StopRequest(mp.load_config({**BASE, "STOP_TIMEOUT_SECONDS": "4"}).stop_timeout_seconds)
    assert (stop.deadline, stop.grace, stop.last_words_seconds) == (4, 2, 0.8)


def test_main_starts_as_a_new_process_would_and_leaves_this_process_as_found(tmp_path, monkeypatch,
                                                                            capsys):
    """What the module keeps globally is reset by main, and what it changes in the process is
    put back when main returns: the in-process runs of the end-to-end tests depend on it."""
    import logging

    monkeypatch.chdir(tmp_path)
    earlier = mp.StopRequest()
    earlier.request("SIGTERM received")
    monkeypatch.setattr(mp, "STOP", earlier)
    mp.redact("an-earlier-runs-secret")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    log_handlers = logging.getLogger().handlers[:]
    environ = {**BASE, "STATE_FILE_PATH": str(tmp_path / "state.json")}
    code = mp.main(["retry-failed", "--dry-run"], environ)
    assert code == 0, capsys.readouterr()
    assert mp.STOP is not earlier and not mp.STOP.is_set(), "an earlier stop is not this run's"
    assert list(mp._SECRETS) == ["secret-value"], "only this run's secret is registered"
    assert {number: signal.getsignal(number) for number in handlers} == handlers
    assert logging.getLogger().handlers == log_handlers
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("stop")] == []


def test_main_leaves_no_thread_and_the_signal_handlers_as_they_were(capsys):
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    threads = set(threading.enumerate())
    with pytest.raises(SystemExit):
        mp.main(["--version"], {})
    assert mp.main(["status"], {}) == mp.ExitCode.CONFIG
    assert set(threading.enumerate()) == threads
    assert {number: signal.getsignal(number) for number in handlers} == handlers
    assert "configuration error: S3_BUCKET_NAME" in capsys.readouterr().err


def test_the_configuration_page_lists_the_settings_table_row_for_row():
    """docs/configuration.md carries SETTINGS as it is: a setting added, removed or changed in
    the code without the page (or the reverse) fails here."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows == [f"| `{s.name}` | {s.shown_default()} | {s.shown_bounds()} | {s.meaning} |"
                    for s in mp.SETTINGS]


def test_a_request_that_never_connected_cannot_have_landed_and_one_cut_after_it_may_have():
    """The fate a failed batch leaves in the ledger ("not sent yet" or "sent, no answer yet")
    decides later whether Clazar's "already exists" is ours: a refused connection must not
    excuse it, a connection cut after the request was sent must."""
    import socket as sockets

    config = mp.load_config({**BASE, "CLAZAR_MAX_RETRIES": "2", "CLAZAR_TIMEOUT_SECONDS": "0.2"})
    from requests.adapters import HTTPAdapter

    def post(url):
        session = mp.http_session()
        session.mount("http://", HTTPAdapter(max_retries=mp.retry_policy(config)))
        with pytest.raises(mp.RequestFailed) as failed:
            mp.bounded_request(session, "POST", url, 100, data=b"{}", timeout=(0.5, 0.5))
        return failed.value.may_have_landed

    closed = sockets.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every attempt is refused
    assert post(f"http://127.0.0.1:{port}/metering/") is False

    listener = sockets.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def cut_after_reading():
        for _ in range(3):
            connection, _ = listener.accept()
            connection.recv(65536)  # the request arrived
            connection.close()  # and no answer comes

    server = threading.Thread(target=cut_after_reading, daemon=True)
    server.start()
    assert post(f"http://127.0.0.1:{listener.getsockname()[1]}/metering/") is True
    server.join(5)
    listener.close()
    assert mp.attempt_may_have_landed(None, 503) and not mp.attempt_may_have_landed(None, 429)
