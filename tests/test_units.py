"""Fast tests of the pure parts: configuration, hours, parsing, aggregation, carry,
Clazar's answers and the state document."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction

import metering_processor as mp
import pytest

UTC = timezone.utc
BASE = {
    "S3_BUCKET_NAME": "bucket",
    "SERVICE_NAME": "Postgres",
    "ENVIRONMENT_TYPE": "PROD",
    "PLAN_ID": "pt-HJSv20iWX0",
    "CLAZAR_CLIENT_ID": "id",
    "CLAZAR_CLIENT_SECRET": "secret-value",
}


def at(text: str) -> datetime:
    return mp.parse_utc(text)


# --- configuration -----------------------------------------------------------------


def test_defaults():
    config = mp.load_config(BASE)
    assert config.services == (mp.ServiceKey("Postgres", "PROD", "pt-HJSv20iWX0"),)
    assert config.cloud == "aws"
    assert config.api_url == "https://api.clazar.io/metering/"
    assert config.auth_url == "https://api.clazar.io/authenticate/"
    assert config.state_path == "./metering_state.json"
    assert config.max_hours_per_run == 24 and config.batch_size == 25 and config.max_retries == 5
    assert config.start_hour is None and config.dry_run is False and config.formulas == ()
    assert config.stop_timeout_seconds == 10
    assert "secret-value" not in repr(config)


def test_a_stop_takes_at_most_stop_timeout_seconds_half_for_answers_a_fifth_for_last_words():
    stop = mp.StopRequest()
    assert (stop.deadline_seconds, stop.grace_seconds, stop.last_words_seconds) == (10, 5, 2)
    stop.set_timeout(mp.load_config({**BASE, "STOP_TIMEOUT_SECONDS": "4"}).stop_timeout_seconds)
    assert (stop.deadline_seconds, stop.grace_seconds, stop.last_words_seconds) == (4, 2, 0.8)


def test_main_starts_as_a_new_process_would_and_leaves_this_process_as_found(tmp_path, monkeypatch,
                                                                            capsys):
    """What the module keeps globally is reset by main, and what it changes in the process is
    put back when main returns: the in-process runs of the end-to-end tests depend on it."""
    import logging
    import signal
    import threading

    monkeypatch.chdir(tmp_path)
    earlier = mp.StopRequest()
    earlier.request("SIGTERM")
    monkeypatch.setattr(mp, "STOP", earlier)
    monkeypatch.setattr(mp, "_SECRETS", {})
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


def test_services_split_on_the_last_two_colons():
    keys = mp.parse_service_keys("Acme Vector DB:PROD:pt-1, Weird: Name:DEV:pt-2,")
    assert [k.key for k in keys] == ["Acme Vector DB:PROD:pt-1", "Weird: Name:DEV:pt-2"]
    assert keys[0].label == "Acme Vector DB/PROD/pt-1"


@pytest.mark.parametrize("text", ["Postgres:PROD", "a:b:", ":b:c", "a/b:PROD:pt", "a:PROD:pt,a:PROD:pt", ","])
def test_bad_services(text):
    with pytest.raises(mp.ConfigError) as error:
        mp.parse_service_keys(text)
    assert error.value.variable == "SERVICES"


def test_services_replace_the_single_service_variables():
    config = mp.load_config({**BASE, "SERVICE_NAME": "", "SERVICES": "A:PROD:pt-1,B:DEV:pt-2"})
    assert [s.key for s in config.services] == ["A:PROD:pt-1", "B:DEV:pt-2"]


def test_dry_run_needs_no_credentials_and_the_flag_wins():
    environ = {k: v for k, v in BASE.items() if not k.startswith("CLAZAR")}
    assert mp.load_config(environ, dry_run=True).dry_run
    assert mp.load_config({**environ, "DRY_RUN": "yes"}).dry_run
    with pytest.raises(mp.ConfigError, match="CLAZAR_CLIENT_ID"):
        mp.load_config(environ)


def test_plain_http_is_allowed_only_to_loopback_when_credentials_travel():
    for host in ("127.0.0.1:8080", "localhost", "[::1]:9000"):
        assert mp.load_config({**BASE, "CLAZAR_API_URL": f"http://{host}/metering/"}).auth_url == f"http://{host}/authenticate/"
    with pytest.raises(mp.ConfigError, match="CLAZAR_API_URL.*unencrypted"):
        mp.load_config({**BASE, "CLAZAR_API_URL": "http://clazar.internal/metering/"})
    assert mp.load_config({**BASE, "CLAZAR_API_URL": "http://clazar.internal/metering/"}, dry_run=True)


def test_start_hour_accepts_utc_forms_and_offsets():
    for text in ("2025-07-23T16:00:00Z", "2025-07-23 16:00", "2025-07-23T18:00:00+02:00", "2025-07-23T16Z"):
        assert mp.load_config({**BASE, "START_HOUR": text}).start_hour == datetime(2025, 7, 23, 16, tzinfo=UTC)


def test_secret_never_appears_in_a_config_error():
    with pytest.raises(mp.ConfigError) as error:
        mp.load_config({**BASE, "CLAZAR_API_URL": "ftp://x/"})
    assert "secret-value" not in str(error.value)


def test_the_client_secret_may_come_from_a_file(tmp_path):
    secret_file = tmp_path / "clazar_client_secret"
    secret_file.write_text("secret-from-file\n")
    base = {name: value for name, value in BASE.items() if name != "CLAZAR_CLIENT_SECRET"}
    assert mp.load_config({**base, "CLAZAR_CLIENT_SECRET_FILE": str(secret_file)}).client_secret == "secret-from-file"
    # A dry run and a read-only command need no secret, so they do not read the file.
    missing = str(tmp_path / "absent")
    assert mp.load_config({**base, "CLAZAR_CLIENT_SECRET_FILE": missing}, dry_run=True).client_secret == ""
    assert mp.load_config({**base, "CLAZAR_CLIENT_SECRET_FILE": missing}, sends=False).client_secret == ""


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read"), ("", "holds nothing"), ("  \n", "holds nothing"), ("first-secret-line\nsecond\n", "several lines"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_a_bad_client_secret_file_is_a_configuration_error_naming_the_file(tmp_path, content, problem):
    secret_file = tmp_path / "clazar_client_secret"
    if isinstance(content, bytes):
        secret_file.write_bytes(content)
    elif content is not None:
        secret_file.write_text(content)
    base = {name: value for name, value in BASE.items() if name != "CLAZAR_CLIENT_SECRET"}
    with pytest.raises(mp.ConfigError) as error:
        mp.load_config({**base, "CLAZAR_CLIENT_SECRET_FILE": str(secret_file)})
    assert error.value.variable == "CLAZAR_CLIENT_SECRET_FILE"
    assert problem in str(error.value) and str(secret_file) in str(error.value)
    assert "secret-line" not in str(error.value)


def test_the_client_secret_and_its_file_together_are_refused(tmp_path):
    secret_file = tmp_path / "clazar_client_secret"
    secret_file.write_text("secret-from-file")
    with pytest.raises(mp.ConfigError) as error:
        mp.load_config({**BASE, "CLAZAR_CLIENT_SECRET_FILE": str(secret_file)})
    assert error.value.variable == "CLAZAR_CLIENT_SECRET_FILE" and "only one" in str(error.value)
    assert "secret-value" not in str(error.value) and "secret-from-file" not in str(error.value)


# --- hours ---------------------------------------------------------------------------------


def test_parse_utc():
    assert at("2026-02-10T15:29:59Z") == datetime(2026, 2, 10, 15, 29, 59, tzinfo=UTC)
    assert at("2026-02-10T15:29:59.123456+00:00") == datetime(2026, 2, 10, 15, 29, 59, tzinfo=UTC)
    assert at("2026-02-10T05:45:00+05:45") == datetime(2026, 2, 10, 0, 0, tzinfo=UTC)
    assert at("2026-02-10T00:00:00-0330") == datetime(2026, 2, 10, 3, 30, tzinfo=UTC)
    for bad in ("", "2026-02-10T25:00:00Z", "10/02/2026", "2026-02-10T15:29:59 PST"):
        with pytest.raises(ValueError):
            at(bad)


def test_an_hour_is_due_once_closed_and_final():
    now = at("2026-02-10T16:05:00Z")
    first = at("2026-02-10T12:00:00Z")
    # Marker sample C: last_processed_to 15:29:59, so 14:00 is final and 15:00 is not.
    marker = mp.ExportMarker.parse(json.dumps({"A:PROD:pt": {"last_processed_to": "2026-02-10T15:29:59Z"}}).encode(), "m")
    final_before = marker.final_before("A:PROD:pt")
    assert final_before == at("2026-02-10T15:30:00Z")
    assert mp.due_hours(first, now, final_before, 24) == [
        at("2026-02-10T12:00Z"), at("2026-02-10T13:00Z"), at("2026-02-10T14:00Z")]
    assert mp.due_hours(first, now, None, 24)[-1] == at("2026-02-10T15:00Z")
    assert mp.due_hours(first, now, final_before, 2) == [at("2026-02-10T12:00Z"), at("2026-02-10T13:00Z")]
    # A 45-minute lag moves the boundary back past 14:00's end.
    assert mp.due_hours(first, now, marker.final_before("A:PROD:pt", timedelta(minutes=45)), 24)[-1] == at("2026-02-10T13:00Z")
    # A marker ahead of the clock does not make an open hour due.
    assert mp.due_hours(first, at("2026-02-10T14:59:59Z"), final_before, 24)[-1] == at("2026-02-10T13:00Z")
    assert mp.due_hours(at("2026-02-10T16:00Z"), now, None, 24) == []


def test_exactly_on_the_boundary():
    final_before = at("2026-02-10T15:00:00Z")  # last_processed_to 14:59:59
    assert mp.due_hours(at("2026-02-10T14:00Z"), at("2026-02-11T00:00Z"), final_before, 24) == [at("2026-02-10T14:00Z")]


def test_first_due_hour():
    now = at("2026-02-10T16:05:00Z")
    assert mp.first_due_hour(at("2026-02-10T10:00Z"), None, None, now) == at("2026-02-10T11:00Z")
    assert mp.first_due_hour(None, at("2026-02-01T00:00Z"), None, now) == at("2026-02-01T00:00Z")
    assert mp.first_due_hour(None, None, None, now) == at("2026-02-09T16:00Z")


def test_a_pinned_first_hour_does_not_move_with_the_clock():
    pinned = at("2026-02-09T16:00Z")
    for now in (at("2026-02-10T16:05Z"), at("2026-02-11T09:00Z"), at("2026-03-01T00:00Z")):
        assert mp.first_due_hour(None, None, pinned, now) == pinned
    # START_HOUR, when set, wins over the pin of a service that has processed nothing.
    assert mp.first_due_hour(None, at("2026-02-01T00:00Z"), pinned, at("2026-02-11T00:00Z")) == at("2026-02-01T00:00Z")


def test_start_hour_is_a_floor_even_after_hours_were_processed():
    now = at("2026-02-10T16:05:00Z")
    assert mp.first_due_hour(at("2026-02-10T10:00Z"), at("2026-02-10T13:00Z"), None, now) == at("2026-02-10T13:00Z")
    assert mp.first_due_hour(at("2026-02-10T10:00Z"), at("2026-02-01T00:00Z"), None, now) == at("2026-02-10T11:00Z")


def test_marker_missing_key_names_the_keys_present():
    marker = mp.ExportMarker.parse(b'{"B:DEV:pt-2": {"last_processed_to": "2026-02-10T15:29:59Z"}}', "m")
    with pytest.raises(mp.MarkerError, match=r"no entry for 'A:PROD:pt'.*'B:DEV:pt-2'"):
        marker.final_before("A:PROD:pt")


@pytest.mark.parametrize("body", [b"[]", b"{", b"\xff", b'{"A": {"last_processed_to": "2026-02-10T15:29:59Z"}, "A": {}}'])
def test_malformed_markers(body):
    with pytest.raises(mp.MarkerError):
        mp.ExportMarker.parse(body, "s3://b/marker")


@pytest.mark.parametrize("entry", [{}, {"last_processed_to": "soon"}, {"last_processed_to": "9999-12-31T23:59:59Z"},
                                   {"last_processed_to": "0001-01-01T00:00:00+01:00"}, "x", {"last_processed_to": 5}])
def test_a_malformed_marker_entry_fails_only_its_own_service(entry):
    marker = mp.ExportMarker.parse(json.dumps({"A": entry, "B": {"last_processed_to": "2026-02-10T15:29:59Z"}}).encode(), "m")
    with pytest.raises(mp.MarkerError, match="export marker m: entry 'A'"):
        marker.final_before("A")
    assert marker.final_before("B") == at("2026-02-10T15:30:00Z")


# --- parsing export files --------------------------------------------------------------


def row(**fields):
    base = {"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 2, "subscriptionId": "sub-1",
            "instanceId": "i-1", "podName": "db-0", "hostName": "h-1"}
    return {**base, **fields}


def parse(records, **options):
    return mp.parse_export_file("k.json", json.dumps(records).encode(), **options)


def test_parse_reduces_records_to_rows():
    usage = parse([row(), row(externalPayerId=""), row(dimension=None), row(value=1.5, podName="db-1")])
    assert usage.records == 4 and usage.unattributable == 2 and usage.fractional == 1
    assert [(r[1], r[2], r[3]) for r in usage.rows] == [("c-1", "cpu_core_hours", 2), ("c-1", "cpu_core_hours", Fraction(3, 2))]


def test_decimal_values_are_exact():
    usage = mp.parse_export_file("k.json", b'[{"externalPayerId":"c","dimension":"d","value":0.1}]')
    assert usage.rows[0][3] == Fraction(1, 10)


@pytest.mark.parametrize("body, message", [
    (b"[", "not valid JSON"),
    (b"{}", "found a JSON dict"),
    (b"[[]]", "record 0 is a JSON list"),
    (b'[{"value": "3"}]', 'value "3"'),
    (b'[{"value": -1}]', "value -1"),
    (b'[{"value": Infinity}]', "not valid JSON"),
    (b'[{"value": 1e999}]', "value"),
    (b'[{"value": null}]', "value null"),
    (b'[{"dimension": "d"}]', "has no value"),
    (b'[{"value": 1, "externalPayerId": 7}]', "externalPayerId is a JSON int"),
    (b"\x1f\x8b\x08\x00", "gzip"),
    (b"\xff\xfe[]", "not UTF-8"),
])
def test_bad_files_name_the_key(body, message):
    with pytest.raises(mp.ExportFileError) as error:
        mp.parse_export_file("omnistrate-metering/x/2026/01/01/00/sub-1.json", body)
    assert str(error.value).startswith("omnistrate-metering/x/2026/01/01/00/sub-1.json")
    assert message in str(error.value)


def test_prices_are_read_only_when_asked_and_validated_then():
    assert parse([row(pricePerUnit="free")]).rows[0][4] == 0
    assert parse([row(pricePerUnit=0.05, value=4)], with_prices=True).rows[0][4] == Fraction(1, 5)
    assert parse([row(pricePerUnit=None)], with_prices=True).rows[0][4] == 0
    with pytest.raises(mp.ExportFileError, match="pricePerUnit"):
        parse([row(pricePerUnit="free")], with_prices=True)


# --- aggregation and carry -----------------------------------------------------------------


def test_repeated_rows_count_once_at_their_largest_value():
    usage = mp.HourUsage(at("2026-01-01T00:00Z"))
    usage.add(parse([row(value=4), row(value=4), row(value=3, podName="db-1")]))
    usage.add(parse([row(value=6), row(externalPayerId="c-2", subscriptionId="sub-2")]))
    assert usage.repeated == 2 and usage.files == 2 and usage.records == 5
    assert usage.totals() == {("c-1", "cpu_core_hours"): 9, ("c-2", "cpu_core_hours"): 2}


def test_rows_of_two_contracts_never_collapse_even_without_identity_fields():
    bare = {"dimension": "cpu_core_hours", "value": 5}
    usage = mp.HourUsage(at("2026-01-01T00:00Z"))
    usage.add(parse([{**bare, "externalPayerId": "c-1"}]))
    usage.add(parse([{**bare, "externalPayerId": "c-2"}]))
    assert usage.repeated == 0
    assert usage.totals() == {("c-1", "cpu_core_hours"): 5, ("c-2", "cpu_core_hours"): 5}


def test_carry_bills_whole_units_and_keeps_the_rest():
    quantities, remainders = mp.carry({("c", "d"): Fraction(1, 2)}, {("c", "d"): Fraction(3, 4)})
    assert quantities == {("c", "d"): 1} and remainders == {("c", "d"): Fraction(1, 4)}
    quantities, remainders = mp.carry({("c", "d"): Fraction(10**13)}, {})
    assert quantities == {("c", "d"): 10**13} and remainders == {}, "only remainders that change are returned"
    quantities, remainders = mp.carry({("c", "d"): Fraction(1, 2)}, {("c", "d"): Fraction(1, 2)})
    assert quantities == {("c", "d"): 1} and remainders == {("c", "d"): 0}


def test_records_are_grouped_by_contract_and_skip_zeros():
    hour = at("2026-02-10T14:00Z")
    records = mp.metering_records(hour, "azure", {("c-2", "b"): 3, ("c-1", "z"): 0, ("c-1", "a"): 12})
    assert records == [
        {"cloud": "azure", "contract_id": "c-1", "dimension": "a", "start_time": "2026-02-10T14:00:00Z",
         "end_time": "2026-02-10T15:00:00Z", "quantity": "12"},
        {"cloud": "azure", "contract_id": "c-2", "dimension": "b", "start_time": "2026-02-10T14:00:00Z",
         "end_time": "2026-02-10T15:00:00Z", "quantity": "3"},
    ]


# --- Clazar's answers ----------------------------------------------------------------------------


RECORD = {"contract_id": "c-1", "dimension": "d", "quantity": "3"}


@pytest.mark.parametrize("entry, outcome", [
    ({"status": "success", "id": "x", "contract_id": "c-1", "dimension": "d"}, mp.DELIVERED),
    ({"status": "fail", "errors": ["Metering record with same contract_id, dimension and same hour already exists"]},
     mp.ALREADY_DELIVERED),
    ({"status": "fail", "errors": [{"message": "Record already exists"}]}, mp.ALREADY_DELIVERED),
    ({"status": "failed", "message": "A record with the SAME CONTRACT_ID for the same hour exists"}, mp.ALREADY_DELIVERED),
    ({"status": "fail"}, mp.REJECTED),
    ({"status": "fail", "errors": ["Contract not found"]}, mp.REJECTED),
    ({"status": "pending"}, mp.REJECTED),
])
def test_classify_result(entry, outcome):
    assert mp.classify_result(RECORD, entry).outcome == outcome


def test_a_result_for_another_record_fails_the_batch():
    with pytest.raises(mp.ClazarError, match="echoes contract_id"):
        mp.classify_result(RECORD, {"status": "success", "contract_id": "c-2"})
    with pytest.raises(mp.ClazarError, match="2 results for 1 records"):
        mp.read_results([RECORD], {"results": [{"status": "success"}] * 2})
    with pytest.raises(mp.ClazarError, match="no results"):
        mp.read_results([RECORD], {"detail": "ok"})


def test_already_exists_is_ours_only_after_a_resend_or_a_retried_request():
    assert mp.duplicate_outcome(resent=True, retried=False) == mp.ALREADY_DELIVERED
    assert mp.duplicate_outcome(resent=False, retried=True) == mp.ALREADY_DELIVERED
    assert mp.duplicate_outcome(resent=False, retried=False) == mp.CONFLICT
    duplicate = {"status": "fail", "errors": ["Metering record with same contract_id, dimension and same hour already exists"]}
    assert mp.read_results([RECORD], {"results": [duplicate]}, retried=True)[0].retried is True


def test_a_quantity_above_the_limit_fails_the_hour_naming_everything():
    hour = at("2026-02-10T14:00Z")
    records = mp.metering_records(hour, "aws", {("c-1", "memory_byte_hours"): 2**31, ("c-1", "cpu"): 4})
    mp.check_record_quantities(records, None, hour)
    mp.check_record_quantities(records, 2**31, hour)
    with pytest.raises(mp.QuantityError) as error:
        mp.check_record_quantities(records, 2**31 - 1, hour)
    for part in ("c-1", "memory_byte_hours", "2147483648", "2147483647", "2026-02-10 14:00:00", "/ 1073741824"):
        assert part in str(error.value)


def test_record_quantity_limit_follows_the_cloud_unless_set():
    assert mp.load_config({**BASE, "CLAZAR_CLOUD": "aws"}).max_record_quantity == 2**31 - 1
    assert mp.load_config({**BASE, "CLAZAR_CLOUD": "gcp"}).max_record_quantity is None
    assert mp.load_config({**BASE, "CLAZAR_CLOUD": "azure", "MAX_RECORD_QUANTITY": "1000"}).max_record_quantity == 1000
    with pytest.raises(mp.ConfigError, match="MAX_RECORD_QUANTITY"):
        mp.load_config({**BASE, "MAX_RECORD_QUANTITY": "0"})


def test_batches():
    assert [len(b) for b in mp.batches(list(range(51)), 25)] == [25, 25, 1]


# --- state --------------------------------------------------------------------------------------


def test_service_state_round_trip_and_commit():
    hour = at("2026-01-01T05:00Z")
    pending = mp.PendingHour(hour, tuple(mp.metering_records(hour, "aws", {("c", "d"): 2})), {("c", "d"): Fraction(1, 3)}, 2)
    state = mp.ServiceState.from_json({"last_processed_hour": "2026-01-01T04:00:00Z", "custom": 1}, "e")
    pending_state = mp.ServiceState.from_json(state.with_pending(pending).to_json(), "e")
    assert pending_state.pending == pending
    done = pending_state.committed(pending, {"rejected": 1}, 24).to_json()
    assert done == {"last_processed_hour": "2026-01-01T05:00:00Z", "remainders": {"c": {"d": "1/3"}},
                    "waiting": {"2026-01-01T05:00:00Z": {"rejected": 1}}, "custom": 1,
                    "accounted": {"2026-01-01T05:00:00Z": {"sources": "", "formulas": "", "checks": 0, "amounts": {}}}}
    assert mp.ServiceState.from_json(done, "e").to_json() == done


def test_accounted_hours_older_than_the_lookback_are_dropped_at_commit():
    state = mp.ServiceState()
    for i in range(5):
        hour = at("2026-01-01T00:00Z") + timedelta(hours=i)
        state = state.committed(mp.PendingHour(hour, (), {}, amounts={("c", "d"): Fraction(i)}), {}, 3)
    assert sorted(state.accounted) == ["2026-01-01T02:00:00Z", "2026-01-01T03:00:00Z", "2026-01-01T04:00:00Z"]
    assert mp.ServiceState().committed(mp.PendingHour(at("2026-01-01T00:00Z"), (), {}), {}, 0).accounted == {}


def test_a_state_from_an_earlier_version_keeps_its_rejected_records_and_digests_until_moved():
    rejected = {**mp.metering_records(at("2026-01-01T03:00Z"), "aws", {("c", "d"): 2})[0], "answer": {"status": "fail"}}
    entry = {"last_processed_hour": "2026-01-01T04:00:00Z", "rejected": [rejected],
             "sources": {"2026-01-01T04:00:00Z": "abc"}}
    state = mp.ServiceState.from_json(entry, "e")
    assert state.waiting_count(mp.REJECTED) == 1 and state.legacy_sources == {"2026-01-01T04:00:00Z": "abc"}
    assert mp.ServiceState.from_json(state.to_json(), "e") == state


@pytest.mark.parametrize("entry", [
    [], {"last_processed_hour": "2026-01-01T04:30:00Z"}, {"remainders": {"c": {"d": "-1/2"}}},
    {"remainders": {"c": "1/2"}}, {"pending_hour": {"hour": "x", "records": []}},
    {"pending_hour": {"hour": "2026-01-01T04:00:00Z", "records": [{"contract_id": "c", "dimension": "d", "quantity": "1.5"}]}},
    {"rejected": {}}, {"first_hour": "2026-01-01T04:30:00Z"}, {"waiting": {"2026-01-01T04:00:00Z": {"rejected": -1}}},
    {"waiting": {"2026-01-01T04:00:00Z": {"delivered": 1}}}, {"waiting": {"not an hour": {"rejected": 1}}},
    {"accounted": {"2026-01-01T04:00:00Z": {"sources": "a"}}},
    {"accounted": {"2026-01-01T04:00:00Z": {"sources": "a", "formulas": "", "amounts": {"c": {"d": "x"}}}}},
])
def test_corrupt_entries_are_refused(entry):
    with pytest.raises(mp.StateError):
        mp.ServiceState.from_json(entry, "e")


def test_local_state_is_written_atomically_with_owner_only_mode(tmp_path):
    store = mp.LocalStateStore(str(tmp_path / "state.json"))
    assert store.load() == {}
    os.umask(0o022)
    store.save({"A:B:C": {"last_processed_hour": "2026-01-01T00:00:00Z"}})
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600
    assert store.load() == {"A:B:C": {"last_processed_hour": "2026-01-01T00:00:00Z"}}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_local_lock_is_exclusive_and_released(tmp_path):
    first, second = mp.LocalStateStore(str(tmp_path / "s.json")), mp.LocalStateStore(str(tmp_path / "s.json"))
    first.acquire()
    assert stat.S_IMODE((tmp_path / "s.json.lock").stat().st_mode) == 0o600
    with pytest.raises(mp.LockHeld, match="another run holds the lock"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_exact_number():
    assert mp._exact_number(True) is None and mp._exact_number("1") is None
    assert mp._exact_number(Decimal("NaN")) is None
    assert mp._exact_number(Decimal("2.50")) == Fraction(5, 2)


def test_retries_back_off_exponentially_with_jitter_and_cap_retry_after():
    from urllib3.exceptions import ProtocolError

    config = mp.load_config({**BASE, "CLAZAR_BACKOFF_SECONDS": "0.5", "CLAZAR_RETRY_AFTER_MAX_SECONDS": "7"})
    retry = mp._retry_policy(config)

    def failed(retry):
        return retry.increment(method="POST", url="/metering/", error=ProtocolError("connection reset"))

    retry = failed(retry)
    assert retry.get_backoff_time() == 0  # the first retry goes at once
    for errors in (2, 3, 4):
        retry = failed(retry)
        waits = {retry.get_backoff_time() for _ in range(50)}
        base = 0.5 * 2 ** (errors - 1)
        assert all(base <= wait <= base + 0.5 for wait in waits) and len(waits) > 1
    assert retry.parse_retry_after("3") == 3 and retry.parse_retry_after("3600") == 7


# --- hostile input: every variable, name, number and text is bounded ---------------------------------


@pytest.mark.parametrize("variable, value, allowed", [
    ("LEDGER_RETENTION_DAYS", "1000000", "from 1 to 36500"),
    ("CLAZAR_TIMEOUT_SECONDS", "1e308", "from 0.1 to 600"),
    ("CLAZAR_TIMEOUT_SECONDS", "nan", "from 0.1 to 600"),
    ("CLAZAR_BACKOFF_SECONDS", "inf", "from 0 to 60"),
    ("CLAZAR_RETRY_AFTER_MAX_SECONDS", "86400", "from 0 to 3600"),
    ("STATE_LOCK_TTL_SECONDS", "999999999999", "from 5 to 86400"),
    ("STOP_TIMEOUT_SECONDS", "1", "from 2 to 300"),
    ("STOP_TIMEOUT_SECONDS", "301", "from 2 to 300"),
    ("MAX_HOURS_PER_RUN", "9" * 5000, "from 1 to 8784"),
    ("LATE_USAGE_LOOKBACK_HOURS", "\u0663", "from 0 to 9600"),
    ("EXPORT_MARKER_LAG_MINUTES", "-1", "from 0 to 1440"),
    ("MAX_EXPORT_FILE_BYTES", "12", "from 1024 to 1073741824"),
    ("START_HOUR", "0001-01-01T00:00:00+01:00", "from 2000-01-01T00:00:00Z to 2999-12-31T23:00:00Z"),
    ("START_HOUR", "9999-12-31T23:00:00Z", "from 2000-01-01T00:00:00Z"),
])
def test_every_hour_seconds_and_days_variable_is_range_checked(variable, value, allowed):
    with pytest.raises(mp.ConfigError) as error:
        mp.load_config({**BASE, variable: value})
    assert error.value.variable == variable and allowed in str(error.value)
    assert len(str(error.value)) < 300


@pytest.mark.parametrize("url, problem", [
    ("http://OTHER-HOST:8080\\@127.0.0.1/metering/", "backslash"),
    ("http://127.0.0.2:8080\\@127.0.0.1/metering/", "backslash"),
    ("https://user:hunter2-password@api.clazar.io/metering/", "user name or password"),
    ("http://admin@127.0.0.1:8080/metering/", "user name or password"),
    ("http://127.0.0.1:99999/metering/", "port"),
    ("http://127.0.0.1:0/metering/", "port 0"),
    ("http://127.0.0.1:8080/metering/\n", None),  # the trailing newline is stripped like any value's
    ("http://127.0.0.1 :8080/metering/", "spaces or control characters"),
    ("http://evil.example/metering/", "unencrypted"),
    ("ftp://api.clazar.io/metering/", "http(s) URL"),
])
def test_clazar_urls_are_checked_with_urllib3s_parser(url, problem):
    for variable in ("CLAZAR_API_URL", "CLAZAR_AUTH_URL"):
        if problem is None:
            assert mp.load_config({**BASE, variable: url})
            continue
        with pytest.raises(mp.ConfigError) as error:
            mp.load_config({**BASE, variable: url})
        assert error.value.variable == variable and problem in str(error.value)
        assert "hunter2" not in str(error.value)


def test_the_loopback_check_reads_the_host_urllib3_connects_to():
    from urllib3.util import parse_url

    # urlsplit and urllib3 disagree on this URL: the check follows urllib3, which requests uses.
    assert parse_url("http://other.example:8080\\@127.0.0.1/").host == "other.example"
    assert mp._check_url("V", "http://[::1]:8080/metering/", True).host == "[::1]"
    with pytest.raises(mp.ConfigError, match="unencrypted"):
        mp._check_url("V", "http://127.0.0.1.evil.example/metering/", True)


def test_masking_covers_the_secret_tokens_url_passwords_and_e_mail_addresses():
    mp.redact("s3cr3t-value-for-masking")
    text = ('{"detail": "bad token", "access_token": "abc.def", "client_secret": "s3cr3t-value-for-masking", '
            '"by": "ops@buyer.example", "auth": "Bearer QWxhZGRpbjpvcGVu", "jwt": "eyJhbGciOi.eyJzdWIi.c2ln", '
            '"url": "https://admin:pa55@host.example/x"}')
    masked = mp.mask_secrets(text)
    for secret in ("abc.def", "s3cr3t-value-for-masking", "ops@buyer.example", "QWxhZGRpbjpvcGVu", "eyJhbGciOi", "pa55"):
        assert secret not in masked
    assert "bad token" in masked and "[email]" in masked
    value = mp.mask_value({"errors": [{"message": "x" * 5000, "who": "ops@buyer.example"}] * 80, "n": 3})
    assert value["n"] == 3 and len(value["errors"]) == 50
    assert len(value["errors"][0]["message"]) == mp.MASKED_TEXT_LIMIT and value["errors"][0]["who"] == "[email]"
    deep = [[[[[[[[[["ops@buyer.example"]]]]]]]]]]
    assert "ops@" not in json.dumps(mp.mask_value(deep))


def test_clazar_answers_are_masked_where_they_are_read():
    mp.redact("tok-0123456789abcdef")
    result = mp.classify_result({"contract_id": "c-1", "dimension": "d"},
                                {"status": "fail", "errors": [{"message": "token tok-0123456789abcdef of ops@buyer.example"}],
                                 "id": ["not", "a", "string"]})
    assert result.outcome == mp.REJECTED and result.record_id is None
    assert result.answer == {"status": "fail", "errors": [{"message": "token [redacted] of [email]"}]}


def test_text_logs_escape_control_characters_so_no_line_can_be_forged():
    stream = io.StringIO()
    mp.configure_logging("INFO", "text", stream)
    mp.log.info("contract %s", "c-1\n2026-01-01 00:00:00,000 - ERROR - forged\x1b]8;;x\x07\u2028")
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        mp.log.error("failed", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert " - ERROR - forged" not in "".join(line for line in lines if line.startswith("2026-01-01"))
    assert "c-1\\n2026-01-01 00:00:00,000 - ERROR - forged\\x1b]8;;x\\x07\\u2028" in lines[0]
    assert all(line.startswith("    ") for line in lines[2:]), "traceback lines are indented"
    assert not any(mp.CONTROL_CHARACTERS.search(line) for line in lines)


def test_reconcile_csv_neutralises_cells_a_spreadsheet_would_run():
    contracts = ('=HYPERLINK("http://127.0.0.1")', "+1", "-x", "@SUM(A1)", "\tx", "\rx", "c-1")
    rows = [{"service": "A:PROD:pt", "contract_id": contract, "dimension": "d", "expected": 1, "billed": 2,
             "difference": -1, "rejected": 0, "conflict": 0} for contract in contracts]
    table = list(csv.reader(io.StringIO(mp.format_reconciliation({"rows": rows}, "csv"), newline="")))
    assert [row[1] for row in table[1:]] == ["'=HYPERLINK(\"http://127.0.0.1\")", "'+1", "'-x", "'@SUM(A1)", "'\\tx", "'\\rx",
                                              "c-1"]
    assert all(row[3:] == ["1", "2", "-1", "0", "0"] for row in table[1:]), "numbers stay numbers"


@pytest.mark.parametrize("text, value", [("0", 0), ("3", 3), ("1/3", Fraction(1, 3)), ("10/4", Fraction(5, 2))])
def test_parse_fraction(text, value):
    assert mp.parse_fraction(text) == value


@pytest.mark.parametrize("text", ["1e999999999", "1/0", "-1/2", " 1", "1.5", "²", "1" * 310, 3, None, "1/" + "1" * 310])
def test_parse_fraction_refuses_what_the_exporter_never_writes(text):
    with pytest.raises(ValueError):
        mp.parse_fraction(text)
    assert mp.parse_fraction("-1/2", signed=True) == Fraction(-1, 2)


def pending_entry(**changes):
    hour = at("2026-01-01T21:00Z")
    records = mp.metering_records(hour, "aws", {("c-1", "d"): 2})
    pending = {"hour": "2026-01-01T21:00:00Z", "records": records, "remainders": {}}
    for name, value in changes.items():
        if name in records[0]:
            records[0][name] = value
        else:
            pending[name] = value
    return {"pending_hour": pending}


@pytest.mark.parametrize("entry, problem", [
    (pending_entry(quantity="\u00b2"), "quantity '²', not ASCII digits"),
    (pending_entry(quantity="9" * 400), "not ASCII digits"),
    (pending_entry(hour="2026-01-01T21:30:00Z"), "not a whole hour"),
    (pending_entry(start_time="2026-01-01T20:00:00Z"), "not for the hour"),
    (pending_entry(contract_id="c\n1"), "control characters"),
    (pending_entry(cloud="mars"), "cloud 'mars'"),
    (pending_entry(records="x"), "records is not a list"),
    (pending_entry(unattributable="5"), "not a count"),
    (pending_entry(remainders={"c-1": {"d": "1e999999999"}}), "not a non-negative fraction"),
    ({"last_processed_hour": "9999-12-31T23:00:00Z"}, "not a UTC hour"),
    ({"rejected": [{"contract_id": "c-1"}]}, "rejected item 0"),
    ({"late_usage": [{"hour": 1}]}, "late_usage item 0"),
    ({"sources": {"yesterday": "ab"}}, "hour 'yesterday' is not a UTC hour"),
    ({"sources": {"2026-01-01T04:00:00Z": 5}}, "sources item 0"),
])
def test_a_state_of_the_wrong_shape_is_refused_naming_the_entry(entry, problem):
    with pytest.raises(mp.StateError) as error:
        mp.parse_state(json.dumps({"A:PROD:pt": entry}).encode(), "s.json")
    assert "state s.json, entry 'A:PROD:pt'" in str(error.value) and problem in str(error.value)
    assert error.value.exit_code == mp.EXIT_STATE


@pytest.mark.parametrize("body, problem", [
    (b'{"A": {}, "A": {}}', "holds the field 'A' twice"),
    (b'{"A": ' + b"[" * 40 + b"]" * 40 + b"}", "nested more than 32 levels"),
    (b"[" * 100000 + b"]" * 100000, "nested more than 32 levels"),
    (b'{"A": NaN}', "not valid JSON"),
])
def test_state_documents_are_parsed_at_bounded_cost(body, problem):
    with pytest.raises(mp.StateError, match=problem):
        mp.parse_state(body, "s.json")


LINE = {"kind": "record", "service": "A:PROD:pt", "contract_id": "c-1", "dimension": "d", "hour": "2026-01-01T21:00:00Z",
        "quantity": 2, "amount": "5/2", "carried_in": "0", "record_id": None, "outcome": "delivered", "at": "x"}


@pytest.mark.parametrize("line, problem", [
    ("[1]", "line 2 is a JSON list"), ("{", "line 2 is not valid JSON"),
    ({**LINE, "quantity": "2"}, "quantity '2'"), ({**LINE, "amount": "1e999999999"}, "not a non-negative fraction"),
    ({**LINE, "kind": "other"}, "kind 'other'"), ({**LINE, "hour": "2026-01-01T21:30:00Z"}, "not a whole hour"),
    ({k: v for k, v in LINE.items() if k != "contract_id"}, "no contract_id"),
    ({**LINE, "kind": "late", "difference": "x"}, "not a fraction"),
])
def test_a_ledger_line_of_the_wrong_shape_is_refused_naming_file_and_line(tmp_path, line, problem):
    text = line if isinstance(line, str) else json.dumps(line)
    path = tmp_path / "2026-01-01" / "A_PROD_pt-x" / "2026-01-01T21.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(LINE) + "\n" + text + "\n")
    ledger = mp.Ledger(mp.LocalLedgerStorage(str(tmp_path)))
    with pytest.raises(mp.LedgerError) as error:
        list(ledger._parse("2026-01-01/A_PROD_pt-x/2026-01-01T21.jsonl", path.read_bytes()))
    assert "2026-01-01T21.jsonl is corrupt: " in str(error.value) and problem in str(error.value)
    assert error.value.exit_code == mp.EXIT_STATE


@pytest.mark.parametrize("body, problem", [
    (b'[{"value": 1e999999999}]', "value 1e999999999 is not a finite non-negative number"),
    (b'[{"value": 1e-99999}]', "value 1e-99999"),
    (b'[{"value": 1, "pricePerUnit": 1e-99999}]', "pricePerUnit 1e-99999"),
    (b'[{"value": 1e-99999999999999999999999999999}]', "value 1e-9999"),
    (b'[{"value": ' + b"9" * 5000 + b"}]", "value 99999"),
    (b'[{"value": 1, "value": 2}]', "holds the field 'value' twice"),
    (b"[" * 100000 + b"]" * 100000, "nested more than 32 levels"),
    (b'[{"value": 1, "externalPayerId": "' + b"c" * 257 + b'", "dimension": "d"}]', "externalPayerId is 257 characters"),
    (b'[{"value": 1, "externalPayerId": "c-1", "dimension": "d\\n- ERROR - x"}]', "dimension 'd\\n- ERROR - x' holds control"),
    (b'[{"value": 1, "externalPayerId": "c-1\\u001b[31m", "dimension": "d"}]', "holds control characters"),
])
def test_hostile_export_files_fail_at_bounded_cost_naming_the_key(body, problem):
    with pytest.raises(mp.ExportFileError) as error:
        mp.parse_export_file("omnistrate-metering/x/sub-1.json", body, with_prices=True)
    assert str(error.value).startswith("omnistrate-metering/x/sub-1.json") and problem in str(error.value)


def test_numbers_within_range_stay_exact():
    usage = mp.parse_export_file("k.json", b'[{"externalPayerId": "c", "dimension": "d", "value": 9223372036854775807, '
                                           b'"pricePerUnit": 1.25e-5}, {"externalPayerId": "c", "dimension": "e", '
                                           b'"value": 1.5E+3, "podName": 1e999999999}]', with_prices=True)
    assert [(row[3], row[4]) for row in usage.rows] == [(2**63 - 1, (2**63 - 1) * Fraction(125, 10**7)), (1500, 0)]


def test_the_lock_file_is_never_opened_through_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "s.json.lock").symlink_to(victim)
    with pytest.raises(mp.StateError, match="s.json.lock is a symbolic link; it was not opened through it"):
        mp.LocalStateStore(str(tmp_path / "s.json")).acquire()
    assert victim.read_text() == "keep me"


def test_a_symlinked_state_path_is_resolved_once_and_its_target_replaced(tmp_path):
    (tmp_path / "volume").mkdir()
    (tmp_path / "state.json").symlink_to(tmp_path / "volume" / "state.json")
    store = mp.LocalStateStore(str(tmp_path / "state.json"))
    document = {"A:B:C": {"last_processed_hour": "2026-01-01T00:00:00Z"}}
    store.acquire()
    store.save(document)
    store.release()
    assert (tmp_path / "state.json").is_symlink()
    assert json.loads((tmp_path / "volume" / "state.json").read_text()) == document
    assert (tmp_path / "volume" / "state.json.lock").exists() and not (tmp_path / "state.json.lock").exists()
    assert "->" in store.display


def test_folders_the_exporter_creates_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        mp.LocalLedgerStorage(str(tmp_path / "ledger")).write("2026-01-01/A_B_C-1234/2026-01-01T00.jsonl", [b"{}\n"])
    finally:
        os.umask(previous)
    for folder in ("ledger", "ledger/2026-01-01", "ledger/2026-01-01/A_B_C-1234"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder


def test_history_and_status_escape_what_came_from_data():
    line = {**LINE, "record_id": "r-1\n2026-01-01 00:00:00,000 - ERROR - forged\x1b[2J"}
    text = mp.format_history([line])
    assert "r-1\\n2026-01-01 00:00:00,000 - ERROR - forged\\x1b[2J" in text and len(text.splitlines()) == 3
    config = mp.load_config(BASE)
    state = mp.ServiceState.from_json({"last_run": {"at": "t", "result": "failed", "hours": 0, "sent": 0, "rejected": 0,
                                                    "error": "bad\rline"}}, "e")
    row = mp.service_status(config.services[0], state, None, mp.MarkerError("x\ny"), config, at("2026-01-01T00:00Z"))
    shown = mp.format_status([row])
    assert "x\\ny" in shown and "bad\\rline" in shown
    assert not any(mp.CONTROL_CHARACTERS.search(text_line) for text_line in shown.splitlines())


# --- late usage and waiting records ------------------------------------------------------------

K = ("c-1", "cpu_core_hours")


def test_late_usage_carries_only_above_the_high_water_mark():
    assert mp.late_usage({K: Fraction(10)}, {K: Fraction(12)}, True) == ({K: 2}, {K: 2}, {K: 12})
    # Less usage is reported, the mark stays; growing back to it carries nothing.
    assert mp.late_usage({K: Fraction(10)}, {K: Fraction(4)}, True) == ({}, {K: -6}, {K: 10})
    assert mp.late_usage({K: Fraction(10)}, {K: Fraction(10)}, True) == ({}, {}, {K: 10})
    # A contract that was not there at all (an hour billed with nothing) is carried whole.
    assert mp.late_usage({}, {K: Fraction(7, 2)}, True) == ({K: Fraction(7, 2)}, {K: Fraction(7, 2)}, {K: Fraction(7, 2)})
    # Reporting only: the mark still rises, so the same usage is reported once.
    assert mp.late_usage({K: Fraction(1)}, {K: Fraction(3)}, False) == ({}, {K: 2}, {K: 3})


def test_waiting_records_follow_the_latest_line_of_each_record():
    line = {"kind": "record", "contract_id": "c-1", "dimension": "d", "hour": "h", "quantity": 3}
    lines = [{**line, "outcome": "rejected"}, {**line, "contract_id": "c-2", "outcome": "conflict"},
             {**line, "contract_id": "c-3", "outcome": "delivered"}, {"kind": "late", "contract_id": "c-1", "dimension": "d"},
             {**line, "retry": True, "outcome": "rejected", "attempts": 2}]
    assert mp.waiting_counts(lines) == {"rejected": 1, "conflict": 1}
    lines.append({**line, "retry": True, "outcome": "delivered on retry"})
    lines.append({**line, "contract_id": "c-2", "retry": True, "outcome": "conflict cleared"})
    assert mp.waiting_counts(lines) == {}


def test_an_earlier_versions_ledger_gives_the_high_water_mark():
    lines = [{"kind": "record", "contract_id": "c-1", "dimension": "d", "amount": "10"},
             {"kind": "late", "contract_id": "c-1", "dimension": "d", "difference": "-6"},
             {"kind": "late", "contract_id": "c-1", "dimension": "d", "difference": "3"},
             {"kind": "late", "contract_id": "c-2", "dimension": "d", "difference": "5/2"}]
    assert mp.legacy_accounted(lines) == {("c-1", "d"): 10, ("c-2", "d"): Fraction(5, 2)}


def test_a_retry_line_tells_a_conflict_from_a_delivery():
    line = {"contract_id": "c-1", "dimension": "d", "hour": "2026-01-01T00:00:00Z", "quantity": 3, "attempts": 1}
    delivered = mp.retry_line("k", line, mp.RecordResult(mp.DELIVERED, "id-1"), at("2026-01-02T00:00Z"))
    assert delivered["outcome"] == "delivered on retry" and delivered["attempts"] == 2
    ours = mp.retry_line("k", line, mp.RecordResult(mp.ALREADY_DELIVERED, retried=True), at("2026-01-02T00:00Z"))
    assert ours["outcome"] == "delivered on retry"
    theirs = mp.retry_line("k", line, mp.RecordResult(mp.ALREADY_DELIVERED, answer={"e": "x"}), at("2026-01-02T00:00Z"))
    assert theirs["outcome"] == "conflict" and theirs["answer"] == {"e": "x"}


def test_answers_kept_are_masked():
    mp.redact("a-secret-kept-from-answers")
    answer = {"errors": [{"message": "buyer ops@example.com, key a-secret-kept-from-answers"}], "n": [[[[[[[[[1]]]]]]]]]}
    masked = json.dumps(mp.mask_value(answer))
    assert "ops@example.com" not in masked and "a-secret-kept-from-answers" not in masked and "[email]" in masked


def test_the_pushgateway_url_is_checked_like_clazars_but_may_carry_basic_auth_over_tls():
    def load(url):
        return mp.load_config({**BASE, "METRICS_PUSHGATEWAY_URL": url}).pushgateway_url

    assert load("http://pushgateway.monitoring:9091/") == "http://pushgateway.monitoring:9091"
    assert load("https://user:pw@pushgateway.example/") == "https://user:pw@pushgateway.example"
    assert load("http://user:pw@127.0.0.1:9091") == "http://user:pw@127.0.0.1:9091"
    for url, problem in (("http://user:pw@pushgateway.example/", "unencrypted"), ("http://a:1\\@127.0.0.1/", "backslash"),
                         ("http://127.0.0.1:70000/", "port")):
        with pytest.raises(mp.ConfigError, match=problem) as error:
            load(url)
        assert error.value.variable == "METRICS_PUSHGATEWAY_URL" and "pw" not in str(error.value)


def test_carried_usage_above_the_record_limit_is_billed_over_several_hours():
    key = ("c-1", "memory_byte_hours")
    quantities, remainders = mp.carry({}, {key: Fraction(2**31)}, 2**31 - 1)
    assert quantities == {key: 2**31 - 1} and remainders == {key: 1}
    quantities, remainders = mp.carry({}, remainders, 2**31 - 1)
    assert quantities == {key: 1} and remainders == {key: 0}
    # An hour above the limit on its own is left for check_record_quantities to refuse.
    assert mp.carry({key: Fraction(2**31)}, {}, 2**31 - 1)[0] == {key: 2**31}


def test_remainders_of_dimensions_no_formula_produces_are_not_billed():
    formula = mp.compile_formula("DIMENSION1_FORMULA", "memory_gib_hours", "memory_byte_hours / 1073741824",
                                 frozenset(mp.OMNISTRATE_DIMENSIONS))
    remainders = {("c", "memory_byte_hours"): Fraction(5), ("c", "memory_gib_hours"): Fraction(1, 2),
                  ("c", "cpu_core_hours"): Fraction(1, 3)}
    assert mp.billable_remainders(remainders, ()) == (remainders, {})
    assert mp.billable_remainders(remainders, (formula,)) == (
        {("c", "memory_gib_hours"): Fraction(1, 2)}, {("c", "memory_byte_hours"): 5})


def test_only_attempts_that_may_have_landed_excuse_already_exists():
    from types import SimpleNamespace

    from urllib3.util.retry import RequestHistory

    def response(*history):
        return SimpleNamespace(raw=SimpleNamespace(retries=SimpleNamespace(history=history)))

    assert not mp._was_retried(response())
    assert not mp._was_retried(response(RequestHistory("POST", "/", None, 429, None)))
    assert mp._was_retried(response(RequestHistory("POST", "/", None, 502, None)))
    assert mp._was_retried(response(RequestHistory("POST", "/", OSError("reset"), None, None)))


def test_a_traceback_holding_a_lone_surrogate_is_written_in_json_logs(capsys):
    import io
    import logging

    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    mp.configure_logging("DEBUG", "json", stream=stream)
    try:
        try:
            raise ValueError("sub-\ud800\x1b[31m")
        except ValueError as error:
            mp.log.debug("Where it happened", exc_info=error)
    finally:
        logging.getLogger().handlers[:] = []
    assert "Logging error" not in capsys.readouterr().err
    entry = json.loads(stream.buffer.getvalue().decode("utf-8"))
    assert "sub-\\ud800\\x1b[31m" in entry["exception"]
