"""Fast tests of the pure parts: configuration, hours, parsing, aggregation, carry,
Clazar's answers and the state document."""

from __future__ import annotations

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
    assert "secret-value" not in repr(config)


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


@pytest.mark.parametrize("body", [b"[]", b"{", b'{"A": {}}', b'{"A": {"last_processed_to": "soon"}}', b"\xff"])
def test_malformed_markers(body):
    with pytest.raises(mp.MarkerError):
        mp.ExportMarker.parse(body, "s3://b/marker")


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
    pending = mp.PendingHour(at("2026-01-01T05:00Z"), ({"contract_id": "c", "dimension": "d", "quantity": "2"},),
                             {("c", "d"): Fraction(1, 3)}, 2)
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
    entry = {"last_processed_hour": "2026-01-01T04:00:00Z", "rejected": [{"contract_id": "c", "start_time": "x"}],
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
    masked = json.dumps(mp.masked_answer(answer))
    assert "ops@example.com" not in masked and "a-secret-kept-from-answers" not in masked and "[email]" in masked
