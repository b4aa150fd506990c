"""End to end: the real script against SeaweedFS and the Clazar stand-in (in this process
through main() unless a test kills it, then as a subprocess)."""

from __future__ import annotations

import gzip
import json
import shlex
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from clazar_standin import call, revoke_tokens, status
from conftest import CLIENT_SECRET, SERVICE, cpu, five_records_in_three_batches, ledger_waiting, metric_value
from export_data import GIB, current_hour, files_with_refusals, hour_prefix, iso, pod_records, record, service_key
from servers import LISTER

KEY = service_key(SERVICE)
ROOT = Path(__file__).resolve().parent.parent


def accepted(harness):
    return harness.clazar.accepted_quantities()


def expect(hour, *items):
    """{(contract, dimension, start): quantity} from (contract, dimension, quantity) items."""
    return {(contract, dimension, iso(hour)): quantity for contract, dimension, quantity in items}


def assert_clean(harness):
    assert harness.clazar.violations == []


def deployment(harness) -> dict:
    """The state's deployment entry (state format version 2)."""
    state = harness.state()
    assert state["version"] == 2, state
    return state["deployment"]


def record_lines(harness, hour=None) -> list[dict]:
    return [line for line in harness.ledger_lines()
            if line["kind"] == "record" and (hour is None or line["hour"] == iso(hour))]


# --- aggregation ---------------------------------------------------------------


def test_aggregates_files_pods_and_contracts_of_an_hour(harness, hours):
    h = hours[0]
    harness.write_hour(h, {
        "sub-AAAAAAAAAA": pod_records(SERVICE, h, contract="c-1", subscription="sub-AAAAAAAAAA", pod="db-0")
        + pod_records(SERVICE, h, contract="c-1", subscription="sub-AAAAAAAAAA", pod="db-1"),
        "sub-BBBBBBBBBB": pod_records(SERVICE, h, contract="c-1", subscription="sub-BBBBBBBBBB", cpu=4),
        "sub-CCCCCCCCCC": pod_records(SERVICE, h, contract="c-2", subscription="sub-CCCCCCCCCC", memory=8 * GIB),
    })
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 0, result.output
    assert accepted(harness) == expect(
        h,
        ("c-1", "cpu_core_hours", 2 + 2 + 4), ("c-1", "memory_byte_hours", 3 * 2 * GIB),
        ("c-1", "storage_allocated_byte_hours", 3 * 10 * GIB), ("c-1", "replica_hours", 3),
        ("c-2", "cpu_core_hours", 2), ("c-2", "memory_byte_hours", 8 * GIB),
        ("c-2", "storage_allocated_byte_hours", 10 * GIB), ("c-2", "replica_hours", 1),
    )
    assert harness.entry() == {"last_processed_hour": iso(h), "hours_by_marker": True}
    assert deployment(harness)["last_processed_hour"] == iso(h)
    assert "pending_hour" not in deployment(harness)
    for message in ("Starting processing for Acme Vector DB/PROD/pt-Q7rT2bX9kL",
                    f"Processing hour 1/1: {h:%Y-%m-%d %H}:00:00",
                    f"Found 3 subscription files in {hour_prefix(SERVICE, h)}",
                    "Aggregated 16 records into 8 entries", "Sending 8 metering records to Clazar",
                    "Successfully sent data to Clazar", f"Saved state to {harness.state_path}",
                    "Finished: 1 hour(s) processed, 8 record(s) sent, 0 already delivered, 0 rejected, "
                    f"0 unattributable; last processed hour {h:%Y-%m-%d %H}:00:00; 0 hour(s) behind"):
        assert result.output.count(message) == 1, message
    # The ledger: one line per (contract, dimension) of the hour, its amount in decimal text.
    lines = {(line["contract_id"], line["dimension"]): line for line in record_lines(harness, h)}
    assert len(lines) == 8 and {line["outcome"] for line in lines.values()} == {"delivered"}
    assert (lines["c-1", "cpu_core_hours"]["quantity"], lines["c-1", "cpu_core_hours"]["amount"]) == (8, "8")
    assert_clean(harness)


def test_payerless_rows_are_counted_not_sent_and_repeated_rows_count_once(harness, hours):
    h = hours[0]
    repeated = cpu(h, "c-1", "sub-RRRRRRRRRR", 4, pod="vectordb-2")
    harness.write_hour(h, {
        "sub-RRRRRRRRRR": [repeated, dict(repeated, timestamp=iso(h + timedelta(hours=1, minutes=17)))],
        "sub-NNNNNNNNNN": [cpu(h, None, "sub-NNNNNNNNNN", 3), cpu(h, "", "sub-NNNNNNNNNN", 5, pod="db-1")],
        "sub-DDDDDDDDDD": [dict(cpu(h, "c-2", "sub-DDDDDDDDDD", 7), dimension="")],
    })
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 0, result.output
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 4))
    assert "1 repeated row(s)" in result.output
    assert "3 record(s) from 2 subscription(s) have no externalPayerId or dimension" in result.output
    assert "sub-DDDDDDDDDD, sub-NNNNNNNNNN" in result.output
    assert "3 unattributable" in result.output


def test_zero_totals_are_not_sent(harness, hours):
    h = hours[0]
    harness.write_hour(h, {"sub-ZZZZZZZZZZ": [cpu(h, "c-zero", "sub-ZZZZZZZZZZ", 0),
                                              cpu(h, "c-1", "sub-ZZZZZZZZZZ", 3, pod="x")]})
    harness.write_marker(hours.final(1))
    assert harness.run(env={"START_HOUR": iso(h)}).returncode == 0
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 3))
    assert_clean(harness)


def test_fractions_are_carried_so_billed_units_equal_the_whole_part_of_the_total(harness, hours):
    # 0.4 core-hours an hour for five hours is 2 units in total, billed as the carry crosses each whole unit.
    for i in range(5):
        harness.write_hour(hours[i], {"sub-FFFFFFFFFF": [cpu(hours[i], "c-1", "sub-FFFFFFFFFF", 0.4)]})
    harness.write_marker(hours.final(3))
    first = harness.run(env={"START_HOUR": iso(hours[0])})
    assert first.returncode == 0, first.output
    # 1.2 after three hours: 1 billed, 0.2 carried, kept as a decimal.
    assert deployment(harness)["remainders"] == {"c-1": {"cpu_core_hours": "0.2"}}
    harness.write_marker(hours.final(5))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 0, result.output
    assert accepted(harness) == {("c-1", "cpu_core_hours", iso(hours[2])): 1, ("c-1", "cpu_core_hours", iso(hours[4])): 1}
    assert deployment(harness)["remainders"] == {}
    assert "fractional value" in first.output and "fractional value" in result.output
    # Each hour's line in the ledger: its own amount, what it carried in, what it billed.
    assert [(line["amount"], line["carried_in"], line["quantity"], line["outcome"]) for line in record_lines(harness)] == [
        ("0.4", "0", 0, "not sent: zero quantity"), ("0.4", "0.4", 0, "not sent: zero quantity"),
        ("0.4", "0.8", 1, "delivered"), ("0.4", "0.2", 0, "not sent: zero quantity"), ("0.4", "0.6", 1, "delivered")]


@pytest.mark.slow
def test_more_than_a_thousand_files_in_an_hour(harness, hours):
    h = hours[0]
    harness.write_hour(h, {f"sub-{i:010d}": [cpu(h, "c-1", f"sub-{i:010d}", 1)] for i in range(1100)})
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 0, result.output
    assert "Found 1100 subscription files" in result.output
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 1100))


def test_objects_that_are_not_json_files_are_ignored_with_a_warning(harness, hours):
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 2)]})
    prefix = f"omnistrate-metering/{SERVICE[0]}/{SERVICE[1]}/{SERVICE[2]}/{h:%Y/%m/%d/%H}/"
    harness.s3.put_object(Bucket=harness.bucket, Key=prefix + "README.txt", Body=b"not usage")
    harness.s3.put_object(Bucket=harness.bucket, Key=prefix + "sub-BBBBBBBBBB.json.gz", Body=gzip.compress(b"[]"))
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 0, result.output
    assert "Ignored 2 object(s)" in result.output
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 2))


# --- which hours ---------------------------------------------------------------


def test_only_hours_the_marker_declares_final_are_sent(harness, hours):
    for i in range(5):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", i + 1)]})
    harness.write_marker(hours.final(3))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 0
    assert sorted(key[2] for key in accepted(harness)) == [iso(hours[i]) for i in range(3)]
    assert harness.entry()["last_processed_hour"] == deployment(harness)["last_processed_hour"] == iso(hours[2])

    harness.write_marker(hours.final(5))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 0
    assert accepted(harness) == {("c-1", "cpu_core_hours", iso(hours[i])): i + 1 for i in range(5)}


SECOND = ("Acme Vector DB", "PROD", "pt-Zr4Wq8Ny2M")
BOTH = {"SERVICES": f"{KEY},{service_key(SECOND)}", "SERVICE_NAME": None, "ENVIRONMENT_TYPE": None, "PLAN_ID": None}


@pytest.mark.parametrize("fault", ["no-entry", "bad-entry"])
def test_a_marker_problem_of_one_service_stops_the_whole_deployment_and_names_it(harness, hours, fault):
    """The deployment is one unit: SERVICE's hour is final, but SECOND's entry is missing or
    unreadable, so nothing is sent, for either service, and the run fails naming SECOND."""
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.write_hour(hours[0], {"sub-BBBBBBBBBB": [record(SECOND, hours[0], contract="c-2", subscription="sub-BBBBBBBBBB",
                                                            dimension="cpu_core_hours", value=1)]}, service=SECOND)
    marker = {KEY: {"last_processed_to": iso(hours.final(1) - timedelta(seconds=1))},
              "Other:DEV:pt-other": {"last_processed_to": iso(hours.final(1) - timedelta(seconds=1))}}
    if fault == "bad-entry":
        marker[service_key(SECOND)] = {"last_processed_to": "yesterday"}
    harness.s3.put_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json",
                          Body=json.dumps(marker).encode())
    result = harness.run(env={"START_HOUR": iso(hours[0]), **BOTH})
    assert result.returncode == 1
    errors = "\n".join(result.lines("ERROR"))
    if fault == "no-entry":
        assert f"export marker has no entry for '{service_key(SECOND)}'; it holds 2 key(s): " \
               f"'{KEY}', 'Other:DEV:pt-other'" in errors
    else:
        assert f"entry '{service_key(SECOND)}'" in errors and "yesterday" in errors
    assert "; waiting for " + service_key(SECOND) in errors, "the summary names the service holding the rest"
    assert accepted(harness) == {} and harness.clazar.metering_calls == 0
    state = harness.state()
    assert "last_processed_hour" not in state["deployment"] and "pending_hour" not in state["deployment"]
    assert "last_processed_hour" not in state.get(KEY, {}) and "last_processed_hour" not in state.get(service_key(SECOND), {})


def test_without_a_marker_closed_hours_are_processed_with_a_warning(harness):
    now = current_hour()
    start = now - timedelta(hours=2)
    for i in range(3):
        hour = start + timedelta(hours=i)
        harness.write_hour(hour, {"sub-AAAAAAAAAA": [cpu(hour, "c-1", "sub-AAAAAAAAAA", 1)]})
    result = harness.run(env={"START_HOUR": iso(start)})
    if current_hour() != now:
        pytest.skip("the hour turned during the run")
    assert result.returncode == 0, result.output
    assert "No export marker" in result.output
    # The current hour is not closed, so it waits even though its file exists.
    assert sorted(key[2] for key in accepted(harness)) == [iso(start), iso(start + timedelta(hours=1))]


def test_a_malformed_marker_is_an_error_not_a_fallback(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.s3.put_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json", Body=b"{not json")
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 1
    assert "export marker" in result.output and "is not valid JSON" in result.output
    assert accepted(harness) == {}


def test_a_denied_marker_is_an_error_not_a_fallback(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "AWS_ACCESS_KEY_ID": LISTER[0],
                              "AWS_SECRET_ACCESS_KEY": LISTER[1]})
    assert result.returncode == 1
    assert "cannot read export marker" in result.output and "AccessDenied" in result.output
    assert accepted(harness) == {}


def test_catch_up_is_capped_per_run_and_resumes(harness, hours):
    for i in range(5):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.write_marker(hours.final(5))
    env = {"START_HOUR": iso(hours[0]), "MAX_HOURS_PER_RUN": "2"}
    sent_after, outputs = [], []
    for _ in range(4):
        result = harness.run(env=env)
        assert result.returncode == 0, result.output
        sent_after.append(len(accepted(harness)))
        outputs.append(result.output)
    assert sent_after == [2, 4, 5, 5]
    assert "Processing hour 2/2" in outputs[0] and "3 hour(s) behind" in outputs[0]
    assert "0 hour(s) behind" in outputs[2]
    assert "is not final yet" in outputs[3]


def test_first_run_starts_a_day_before_the_current_hour(harness):
    now = current_hour()
    for offset in (25, 24):
        hour = now - timedelta(hours=offset)
        harness.write_hour(hour, {"sub-AAAAAAAAAA": [cpu(hour, "c-1", "sub-AAAAAAAAAA", offset)]})
    harness.write_marker(now - timedelta(hours=23))
    # A relative path, resolved against the folder the run starts in: every message gives it whole.
    result = harness.run(env={"STATE_FILE_PATH": "./metering_state.json"})
    if current_hour() != now:
        pytest.skip("the hour turned during the run")
    assert result.returncode == 0, result.output
    state = harness.folder / "metering_state.json"
    assert f" - INFO - State {state} (lock {state}.lock); ledger {harness.folder / 'metering_ledger'}" \
        in result.lines()[0]
    # The deployment, not a service, has no processed hour: the line names no service key.
    assert (f" - WARNING - No previous processing found, starting from {now - timedelta(hours=24):%Y-%m-%d %H}:00:00 "
            f"(24 hours before the current hour; START_HOUR is unset): the state {state} has no processed hour\n"
            in result.output)
    assert json.loads(state.read_text())["deployment"]["first_hour"] == iso(now - timedelta(hours=24))
    assert accepted(harness) == {("c-1", "cpu_core_hours", iso(now - timedelta(hours=24))): 24}


@pytest.mark.parametrize("zone", ["Asia/Kathmandu", "America/St_Johns", "Pacific/Chatham"])
def test_hours_are_utc_whatever_the_machine_time_zone(harness, hours, zone):
    for i in range(2):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.write_marker(hours.final(2))
    naive_start = hours[0].strftime("%Y-%m-%d %H:%M")  # no offset: read as UTC
    result = harness.run(env={"TZ": zone, "START_HOUR": naive_start})
    assert result.returncode == 0, result.output
    assert sorted(key[2] for key in accepted(harness)) == [iso(hours[0]), iso(hours[1])]
    assert harness.entry()["last_processed_hour"] == iso(hours[1])


# --- several services -------------------------------------------------------------


def test_several_services_are_billed_as_one_and_a_bad_file_in_one_holds_them_all(harness, hours):
    """Names with spaces, accents and a colon; the deployment is one unit: a bad file in one
    service fails the hour for every service (nothing sent, no hour committed, later hours
    wait), and once it is fixed the hour goes out with every service's usage, a contract
    shared by two services as one record of their sum."""
    good = ("Scalar DB Enterprise Édition", "DEV", "pt-Dd01Ee02Ff")
    broken = ("Broken: Service", "PROD", "pt-Broken0001")
    h = hours[0]
    for hour in (h, hours[1]):
        harness.write_hour(hour, {"sub-AAAAAAAAAA": [cpu(hour, "c-1", "sub-AAAAAAAAAA", 3)]})
        harness.write_hour(hour, {"sub-BBBBBBBBBB": [record(good, hour, contract="c-2", subscription="sub-BBBBBBBBBB",
                                                            dimension="replica_hours", value=2),
                                                     record(good, hour, contract="c-1", subscription="sub-BBBBBBBBBB",
                                                            dimension="cpu_core_hours", value=4)]}, service=good)
    keys = harness.write_hour(h, {"sub-XXXXXXXXXX": b"[{\"value\": 1"}, service=broken)
    harness.write_hour(hours[1], {"sub-XXXXXXXXXX": [record(broken, hours[1], contract="c-3", subscription="sub-XXXXXXXXXX",
                                                            dimension="cpu_core_hours", value=5)]}, service=broken)
    harness.write_marker(hours.final(2), services=[SERVICE, good, broken])
    services = ",".join(service_key(s) for s in (SERVICE, broken, good))
    env = {"START_HOUR": iso(h), "SERVICES": services, "SERVICE_NAME": None}
    result = harness.run(env=env)
    assert result.returncode == 1
    assert keys[0] in "\n".join(result.lines("ERROR"))
    assert result.output.count("Starting processing for Acme Vector DB/PROD/pt-Q7rT2bX9kL, Broken: Service/PROD/"
                               "pt-Broken0001, Scalar DB Enterprise Édition/DEV/pt-Dd01Ee02Ff") == 1
    assert accepted(harness) == {} and harness.clazar.metering_calls == 0
    state = harness.state()
    assert "last_processed_hour" not in state["deployment"] and "pending_hour" not in state["deployment"]
    for service in (SERVICE, good, broken):
        assert "last_processed_hour" not in state.get(service_key(service), {})
    harness.write_hour(h, {"sub-XXXXXXXXXX": [record(broken, h, contract="c-3", subscription="sub-XXXXXXXXXX",
                                                     dimension="cpu_core_hours", value=5)]}, service=broken)
    fixed = harness.run(env=env)
    assert fixed.returncode == 0, fixed.output
    assert accepted(harness) == {
        **expect(h, ("c-1", "cpu_core_hours", 3 + 4), ("c-2", "replica_hours", 2), ("c-3", "cpu_core_hours", 5)),
        **expect(hours[1], ("c-1", "cpu_core_hours", 3 + 4), ("c-2", "replica_hours", 2), ("c-3", "cpu_core_hours", 5))}
    assert len(harness.clazar.received) == 6, "one record per contract, dimension and hour, sent once"
    state = harness.state()
    for service in (SERVICE, good, broken):
        assert state[service_key(service)]["last_processed_hour"] == iso(hours[1])
    for hour in (h, hours[1]):
        for service in (SERVICE, good, broken):
            assert fixed.output.count(f"Found 1 subscription files in {hour_prefix(service, hour)}") == 1


# --- dry run ------------------------------------------------------------------------


def test_dry_run_prints_records_and_sends_and_saves_nothing(harness, hours):
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(h), "CLAZAR_CLIENT_ID": None, "CLAZAR_CLIENT_SECRET": None}
    for arguments, extra in ((("--dry-run",), {}), ((), {"DRY_RUN": "true"})):
        result = harness.run(*arguments, env={**env, **extra})
        assert result.returncode == 0, result.output
        assert '"contract_id": "c-1"' in result.output and '"quantity": "3"' in result.output
    assert harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0
    assert not harness.state_path.exists()


# Every way of asking for a dry run: the flag before and after each command that can send,
# the variable, and the flag winning over DRY_RUN=false.
DRY_RUN_WAYS = [
    (("--dry-run",), {}), (("--dry-run", "run"), {}), (("run", "--dry-run"), {}),
    (("--dry-run", "retry-failed"), {}), (("retry-failed", "--dry-run"), {}),
    ((), {"DRY_RUN": "true"}), (("run",), {"DRY_RUN": "true"}), (("retry-failed",), {"DRY_RUN": "true"}),
    (("run", "--dry-run"), {"DRY_RUN": "false"}), (("--dry-run", "retry-failed"), {"DRY_RUN": "false"}),
]


def test_no_way_of_asking_for_a_dry_run_sends_or_writes_anything(harness, hours, tmp_path):
    # A state with something to send either way: due hours, and a rejected record to retry.
    for i in range(3):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 2),
                                                         cpu(hours[i], "c-2", "sub-AAAAAAAAAA", 3, pod="x")]})
    harness.write_marker(hours.final(3))
    metrics = tmp_path / "metering.prom"
    settings = {"START_HOUR": iso(hours[0]), "MAX_HOURS_PER_RUN": "1", "METRICS_FILE": str(metrics)}
    harness.clazar.known_contracts = {"c-1"}
    assert harness.run(env=settings).returncode == 1
    harness.clazar.known_contracts = None  # from now on Clazar would accept anything it is sent

    def snapshot():
        files = sorted(path for path in harness.state_path.parent.rglob("*") if path.is_file()) + [metrics]
        return {str(path): path.read_bytes() for path in files}, harness.clazar.auth_calls, harness.clazar.metering_calls

    before = snapshot()
    assert json.loads(harness.report("status", "--json").output)["rejected_waiting"] == 1
    assert any("metering_ledger" in path for path in before[0])

    # config.env as an operator makes it from the example (this deployment's SERVICES, the
    # secret in the file the example names), loaded the way the cron recipe loads it, with
    # DRY_RUN=true exported by the shell beforehand.
    example = (ROOT / "config.env.example").read_text()
    overrides = {**harness.env, **settings, "SERVICES": KEY}
    secret_file = harness.folder / "clazar_client_secret"
    secret_file.write_text(overrides.pop("CLAZAR_CLIENT_SECRET") + "\n")
    secret_file.chmod(0o600)
    (harness.folder / "config.env").write_text(example + "".join(
        f"{name}={shlex.quote(value)}\n" for name, value in overrides.items() if name not in ("PATH", "HOME")))
    sourced = "set -a && . ./config.env && set +a && exec " + " ".join(harness.command())
    ways = [(arguments, {**settings, **variables}) for arguments, variables in DRY_RUN_WAYS]
    for arguments, variables in ways + [(command, None) for command in ((), ("run",), ("retry-failed",))]:
        if variables is None:
            process = subprocess.run(["/bin/sh", "-c", " ".join([sourced, *arguments])], cwd=harness.folder,
                                     env={"PATH": "/usr/bin:/bin", "DRY_RUN": "true"}, capture_output=True, text=True)
            returncode, output = process.returncode, process.stdout + process.stderr
        else:
            result = harness.run(*arguments, env=variables)
            returncode, output = result.returncode, result.output
        way = f"{arguments} {variables or 'DRY_RUN=true, then config.env sourced'}"
        assert returncode == 0, f"{way}: {output}"
        assert "Dry run: would" in output, way
        assert snapshot() == before, f"{way} sent or wrote something"

    # The dry runs had something to send: without them, both commands do send.
    assert harness.run("retry-failed", env=settings).returncode == 0
    assert harness.run(env=settings).returncode == 0
    assert len(accepted(harness)) == 4


# --- Clazar's answers and faults --------------------------------------------------------


def test_other_client_errors_are_not_retried(harness, hours):
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(1))
    harness.clazar.faults.append(status(400))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 1
    assert harness.clazar.metering_calls == 1
    assert "Clazar answered HTTP 400" in result.output


def test_rejected_records_are_kept_reported_and_later_hours_go_on(harness, hours):
    harness.clazar.known_contracts = {"c-1"}
    harness.clazar.registered_dimensions = {"cpu_core_hours", "memory_byte_hours"}
    for i in range(2):
        harness.write_hour(hours[i], files_with_refusals(SERVICE, hours[i], unknown_contract="c-unknown"))
    harness.write_marker(hours.final(2))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 1
    assert accepted(harness) == {("c-1", "cpu_core_hours", iso(hours[i])): 2 for i in range(2)}
    assert harness.entry()["last_processed_hour"] == iso(hours[1])
    rejected = {(item["contract_id"], item["dimension"], item["hour"], item["quantity"]): item["answer"]
                for item in ledger_waiting(harness)}
    assert set(rejected) == {
        ("c-unknown", "cpu_core_hours", iso(hours[i]), 5) for i in range(2)
    } | {("c-1", "replica_hours", iso(hours[i]), 1) for i in range(2)}
    assert rejected["c-unknown", "cpu_core_hours", iso(hours[0]), 5]["errors"] == ["Contract c-unknown not found"]
    assert rejected["c-1", "replica_hours", iso(hours[0]), 1] == {"status": "fail"}
    assert deployment(harness)["waiting"] == {iso(hours[i]): {"rejected": 2} for i in range(2)}
    assert "Clazar rejected contract c-unknown dimension cpu_core_hours" in result.output
    assert "4 rejected" in result.output


# --- bad input ------------------------------------------------------------------------


BAD_FILES = {
    "truncated": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 1',
    "object": b'{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 1}',
    "empty-object": b"{}",
    "empty-file": b"",
    "not-an-object": b'[1, 2]',
    "string-value": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": "12"}]',
    "negative-value": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": -1}]',
    "nan-value": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": NaN}]',
    "huge-value": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 1e400}]',
    "too-big-int": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 99999999999999999999}]',
    "boolean-value": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": true}]',
    "missing-value": b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours"}]',
    "gzip": gzip.compress(b'[{"externalPayerId": "c-1", "dimension": "cpu_core_hours", "value": 1}]'),
    "latin-1": '[{"externalPayerId": "c-\xe9", "dimension": "cpu_core_hours", "value": 1}]'.encode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_fails_its_whole_hour_naming_the_key_and_sends_nothing_of_it(harness, hours, name):
    h = hours[0]
    harness.write_hour(h, {"sub-GOODGOOD01": [cpu(h, "c-1", "sub-GOODGOOD01", 2)]})
    bad_key = harness.write_hour(h, {"sub-BADBADBAD": BAD_FILES[name]})[0]
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 1
    errors = "\n".join(result.lines("ERROR"))
    assert bad_key in errors
    assert accepted(harness) == {} and harness.clazar.metering_calls == 0
    assert "last_processed_hour" not in harness.state().get(KEY, {})
    # Once the file is fixed the hour goes through whole.
    harness.write_hour(h, {"sub-BADBADBAD": [cpu(h, "c-1", "sub-BADBADBAD", 1)]})
    result = harness.run(env={"START_HOUR": iso(h)})
    assert result.returncode == 0, result.output
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 3))


def test_the_state_and_ledger_in_s3_are_named_at_the_start(harness, hours):
    url = harness.use_s3_state()
    harness.write_marker(hours.final(0))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 0, result.output
    ledger = f"s3://{harness.state_bucket}/exporter/metering_ledger"
    assert f" - INFO - State {url} (lock {url}.lock); ledger {ledger}" in result.lines()[0]
    assert [line for line in result.lines("WARNING") if "No previous processing found" in line][0].endswith(
        f"(START_HOUR): the state {url} has no processed hour")


def test_corrupt_state_stops_the_run_and_is_left_untouched(backend_harness, hours):
    harness = backend_harness
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(1))
    remainder = b'{"version": 2, "deployment": {"remainders": {"c-1": {"cpu_core_hours": "%s"}}}}'
    corrupt_states = [b'{"Acme Vector DB:PROD:pt-Q7rT2bX9kL": {"last_processed_hour": "2025-', b"[]",
                      b'{"Acme Vector DB:PROD:pt-Q7rT2bX9kL": {"last_processed_hour": "yesterday"}}',
                      # A development format (an entry holding objects) is not read.
                      b'{"Acme Vector DB:PROD:pt-Q7rT2bX9kL": {"remainders": {"c-1": {"cpu_core_hours": "-1/2"}}}}']
    if not harness.state_in_s3:  # the same reader whatever the store: its cases once
        # Version 2: amounts are decimals of at most 9 places, never "p/q"; every field is known.
        corrupt_states += [remainder % b"1/2", remainder % b"0.1234567891", remainder % b"-0.5",
                           b'{"version": 2, "deployment": {"colour": "blue"}}',
                           b'{"version": 2, "deployment": {}, "Acme Vector DB:PROD:pt-Q7rT2bX9kL": {"remainders": {}}}',
                           b'{"version": 3, "deployment": {}}']
    for corrupt in corrupt_states:
        harness.write_state_bytes(corrupt)
        result = harness.run(env={"START_HOUR": iso(h)})
        assert result.returncode == 4, result.output
        assert harness.state_display in result.output
        assert harness.state_bytes() == corrupt
        assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    if harness.state_in_s3:
        assert harness.state_bytes(harness.state_key + ".lock") is None, "the lock was released"


def test_a_state_file_from_the_original_script_carries_over(harness, hours):
    harness.state_path.write_text(json.dumps({KEY: {"last_processed_hour": iso(hours[0])}}))
    for i in range(2):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.write_marker(hours.final(2))
    result = harness.run()
    assert result.returncode == 0, result.output
    assert accepted(harness) == expect(hours[1], ("c-1", "cpu_core_hours", 1))
    assert oct(harness.state_path.stat().st_mode & 0o777) == "0o600"
    # Rewritten as version 2, the service's last processed hour where the original kept it.
    assert harness.entry()["last_processed_hour"] == deployment(harness)["last_processed_hour"] == iso(hours[1])


# --- crashes and concurrency ---------------------------------------------------------------


KILL_POINTS = [
    {"FAULT_KILL_BEFORE_STATE_WRITE": "1"},   # before the deployment's first hour is pinned
    {"FAULT_KILL_AFTER_STATE_WRITE": "1"},    # pinned, nothing read
    {"FAULT_KILL_BEFORE_STATE_WRITE": "2"},   # before the pending hour is recorded
    {"FAULT_KILL_AFTER_STATE_WRITE": "2"},    # pending recorded, nothing sent
    {"FAULT_KILL_AFTER_BATCH": "1"},          # first answer arriving, unread; the others in flight
    {"FAULT_KILL_AFTER_BATCH": "2"},
    {"FAULT_KILL_AFTER_BATCH": "3"},          # every batch landed, no answer recorded
    {"FAULT_KILL_BEFORE_STATE_WRITE": "3"},   # the hour's ledger lines written, before the commit
    {"FAULT_KILL_AFTER_STATE_WRITE": "3"},    # right after the commit
    {"FAULT_KILL_AFTER_STATE_WRITE": "4"},    # second hour pending
]
# What each kill leaves: (the pending hour, the last processed hour, the hours in the ledger),
# hours by index, so that each point is known to fall where its comment says.
LEFT_BY_KILL = {
    "fault_kill_before_state_write-1": None,
    "fault_kill_after_state_write-1": (None, None, []),
    "fault_kill_before_state_write-2": (None, None, []),
    "fault_kill_after_state_write-2": (0, None, []),
    "fault_kill_after_batch-1": (0, None, []),
    "fault_kill_after_batch-2": (0, None, []),
    "fault_kill_after_batch-3": (0, None, []),
    "fault_kill_before_state_write-3": (0, None, [0]),
    "fault_kill_after_state_write-3": (None, 0, [0]),
    "fault_kill_after_state_write-4": (1, 0, [0]),
}
# With the state in S3 every kill leaves a lease behind, which the next run must respect and
# then take over. Where the kill falls differs from the local state file at three points: before
# the first write, which creates the state object; once the pending hour is in S3, read back
# from there; and before the commit, with the hour's ledger object in S3 ahead of the state.
# The other seven run in `make test-slow`.
S3_KILL_POINTS = [KILL_POINTS[0], KILL_POINTS[3], KILL_POINTS[7]]


def kill_point(fault: dict) -> str:
    return "-".join(next(iter(fault.items()))).lower()


@pytest.mark.parametrize("state, fault", [
    *[pytest.param("local-state", fault, id=f"local-state-{kill_point(fault)}")
      for fault in KILL_POINTS],
    *[pytest.param("s3-state", fault, id=f"s3-state-{kill_point(fault)}",
                   marks=() if fault in S3_KILL_POINTS else pytest.mark.slow)
      for fault in KILL_POINTS],
])
def test_a_run_killed_at_any_step_is_completed_exactly_once_by_the_next(harness, hours, state,
                                                                         fault):
    if state == "s3-state":
        harness.use_s3_state()
    expected = five_records_in_three_batches(harness, hours)
    env = {"START_HOUR": iso(hours[0]), "CLAZAR_BATCH_SIZE": "2"}
    killed = harness.run(env=env, faults=fault)
    assert killed.returncode == -9, killed.output
    left = LEFT_BY_KILL[kill_point(fault)]
    if left is None:
        assert harness.state_bytes() is None
    else:
        pending, last, ledger = left
        state = deployment(harness)
        assert state["first_hour"] == iso(hours[0])
        assert (state.get("pending_hour") or {}).get("hour") == (None if pending is None else iso(hours[pending]))
        assert state.get("last_processed_hour") == (None if last is None else iso(hours[last]))
        assert sorted({line["hour"] for line in record_lines(harness)}) == [iso(hours[i]) for i in ledger]
        if "batch" not in kill_point(fault) and pending is not None and pending not in ledger:
            assert harness.clazar.metering_calls == 3 * pending, "nothing of the pending hour was sent"
    if harness.state_in_s3:
        # The killed run's lease is still there: a run before it lapses must stand back.
        early = harness.run(env=env)
        assert early.returncode == 3 and "another run holds the lock" in early.output
        harness.expire_lease()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    if harness.state_in_s3:
        assert "Took over the lease" in result.output
    assert accepted(harness) == expected
    assert len(harness.clazar.successes()) == len(expected)
    assert harness.entry()["last_processed_hour"] == deployment(harness)["last_processed_hour"] == iso(hours[1])
    assert "pending_hour" not in deployment(harness)
    # A killed run left no ledger line for its pending hour (or every answer, before the
    # commit), so every record of it that had landed came back "already exists" as ours: each
    # (contract, dimension, hour) ends delivered or already delivered, with its quantity,
    # never a conflict or without an answer.
    latest = {(line["contract_id"], line["dimension"], line["hour"]): line for line in record_lines(harness)}
    assert {key: line["quantity"] for key, line in latest.items()} == expected
    duplicates = harness.clazar.outcomes().count("duplicate")
    assert sorted(line["outcome"] for line in latest.values()) == sorted(
        ["delivered"] * (len(expected) - duplicates) + ["already delivered"] * duplicates)
    assert "Conflict" not in result.output
    assert_clean(harness)


def test_a_pending_hour_is_resent_as_recorded_not_recomputed(backend_harness, hours):
    harness = backend_harness
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 3), cpu(h, "c-2", "sub-AAAAAAAAAA", 4, pod="x")]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(h), "CLAZAR_BATCH_SIZE": "1"}
    assert harness.run(env=env, faults={"FAULT_KILL_AFTER_BATCH": "1"}).returncode == -9
    if harness.state_in_s3:
        harness.expire_lease()
    # The export changes after part of the hour was sent: the rest must still match what was recorded.
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 30), cpu(h, "c-2", "sub-AAAAAAAAAA", 40, pod="x")]})
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 3), ("c-2", "cpu_core_hours", 4))


def test_a_second_run_while_one_is_working_exits_with_the_lock_code(backend_harness, hours):
    harness = backend_harness
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": [cpu(h, "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(1))
    inside, release = threading.Event(), threading.Event()

    def hold(records):
        inside.set()
        release.wait(60)

    harness.clazar.faults.append(call(hold, before_landing=True))
    first = harness.popen(env={"START_HOUR": iso(h)})
    assert inside.wait(60)
    second = harness.run(env={"START_HOUR": iso(h)})
    release.set()
    output, _ = first.communicate(timeout=60)
    assert second.returncode == 3, second.output
    assert "another run holds the lock" in "\n".join(second.lines("WARNING")), "a held lock is normal, not an error"
    assert second.lines("ERROR") == []
    assert first.returncode == 0, output
    assert accepted(harness) == expect(h, ("c-1", "cpu_core_hours", 3))
    assert harness.clazar.metering_calls == 1
    if harness.state_in_s3:
        assert harness.state_bytes(harness.state_key + ".lock") is None, "the lock was released"


# --- secrets and configuration -----------------------------------------------------------


def test_no_secret_token_or_email_reaches_the_log_even_at_debug(harness, hours):
    for i in range(2):
        harness.write_hour(hours[i], {
            "sub-AAAAAAAAAA": pod_records(SERVICE, hours[i], contract="c-1", subscription="sub-AAAAAAAAAA")})
    harness.write_hour(hours[0], {"sub-BADBADBAD": [dict(cpu(hours[0], "c-1", "sub-BADBADBAD", 1), value="ops@buyer.example")]})
    harness.write_marker(hours.final(2))
    harness.clazar.faults.extend([status(503), revoke_tokens()])
    result = harness.run(env={"START_HOUR": iso(hours[0]), "LOG_LEVEL": "DEBUG"})
    harness.write_hour(hours[0], {"sub-BADBADBAD": []})
    second = harness.run(env={"START_HOUR": iso(hours[0]), "LOG_LEVEL": "DEBUG"})
    assert second.returncode == 0, second.output
    output = result.output + second.output
    assert " - DEBUG - " in output
    assert CLIENT_SECRET not in output
    assert "buyer.example" not in output
    for token in harness.clazar.issued_tokens:
        assert token not in output
    assert harness.clazar.issued_tokens


@pytest.mark.parametrize("change, variable, message", [
    (*case, None) if len(case) == 2 else case for case in [
    ({"S3_BUCKET_NAME": None}, "S3_BUCKET_NAME"),
    ({"PLAN_ID": ""}, "PLAN_ID"),
    ({"CLAZAR_CLIENT_SECRET": None}, "CLAZAR_CLIENT_SECRET"),
    ({"CLAZAR_CLOUD": "ibm"}, "CLAZAR_CLOUD"),
    ({"MAX_HOURS_PER_RUN": "0"}, "MAX_HOURS_PER_RUN"),
    ({"MAX_HOURS_PER_RUN": "many"}, "MAX_HOURS_PER_RUN"),
    ({"START_HOUR": "2025-07-23T16:30:00Z"}, "START_HOUR"),
    ({"START_HOUR": "yesterday"}, "START_HOUR"),
    ({"SERVICES": "Postgres:PROD"}, "SERVICES"),
    ({"DRY_RUN": "maybe"}, "DRY_RUN"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"CLAZAR_API_URL": "http://api.clazar.example/metering/"}, "CLAZAR_API_URL"),
    ({"SERVICES": f"{KEY}=ibm"}, "SERVICES"),
    # Credentials over plain http only to loopback: the S3 endpoint as well as Clazar's.
    ({"AWS_ENDPOINT_URL_S3": "http://10.0.0.8:8333"}, "AWS_ENDPOINT_URL_S3"),
    ({"CLAZAR_BATCH_SIZE": "-3"}, "CLAZAR_BATCH_SIZE"),
    ({"EXPORT_STALE_HOURS": "0"}, "EXPORT_STALE_HOURS"),
    ({"EXPORT_STALE_HOURS": "soon"}, "EXPORT_STALE_HOURS"),
    ({"METRICS_PUSHGATEWAY_URL": "ftp://pushgateway/"}, "METRICS_PUSHGATEWAY_URL"),
    ({"LEDGER_RETENTION_DAYS": "1000000"}, "LEDGER_RETENTION_DAYS",
     "LEDGER_RETENTION_DAYS: must be a whole number from 1 to 36500, got 1000000"),
    ({"CLAZAR_TIMEOUT_SECONDS": "1e308"}, "CLAZAR_TIMEOUT_SECONDS",
     "CLAZAR_TIMEOUT_SECONDS: must be a number from 0.1 to 600, got '1e308'"),
    ({"START_HOUR": "0001-01-01T00:00:00+01:00"}, "START_HOUR",
     "START_HOUR: must be a whole UTC hour from 2000-01-01T00:00:00Z to"),
    ({"CLAZAR_API_URL": "http://127.0.0.1:99999/metering/"}, "CLAZAR_API_URL",
     "CLAZAR_API_URL: is not a URL urllib3 can parse"),
    ({f"DIMENSION{'1' * 5000}_NAME": "units"}, "DIMENSION1111111111"),
    ({"STOP_TIMEOUT_SECONDS": "1"}, "STOP_TIMEOUT_SECONDS",
     "STOP_TIMEOUT_SECONDS: must be a number from 2 to 300, got '1'"),
    ({"RUN_TIMEOUT_MINUTES": "0"}, "RUN_TIMEOUT_MINUTES",
     "RUN_TIMEOUT_MINUTES: must be a whole number from 1 to 1440, got 0"),
    ({"S3_TIMEOUT_SECONDS": "0.5"}, "S3_TIMEOUT_SECONDS",
     "S3_TIMEOUT_SECONDS: must be a number from 1 to 3600, got '0.5'"),
    ({"LATE_USAGE_LOOKBACK_HOURS": "721"}, "LATE_USAGE_LOOKBACK_HOURS",
     "LATE_USAGE_LOOKBACK_HOURS: must be a whole number from 0 to 720, got 721"),
]], ids=lambda value: value[:20] if isinstance(value, str) else None)
def test_a_bad_setting_exits_2_with_one_line_naming_it(harness, hours, change, variable, message):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    metrics = harness.folder / "metering.prom"
    result = harness.run(env={"METRICS_FILE": str(metrics), **change})
    assert result.returncode == 2
    # One plain line on stderr naming the variable, never a traceback.
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert variable in lines[0] and "Traceback" not in result.output
    prefix = f"metering_processor: configuration error: {message or ''}"
    assert result.output.startswith(prefix), result.output
    assert harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0
    assert harness.state_bytes() is None
    assert CLIENT_SECRET not in result.output
    if variable == "DRY_RUN":
        assert not metrics.exists(), "a run that may be a dry run writes no metrics"
    else:
        assert metric_value(metrics.read_text(), "metering_run_exit_status") == 2


def test_hours_read_ahead_are_committed_in_order_and_none_after_a_failed_one_is_sent(harness, hours):
    """Two hours are read ahead of the one being sent: a bad file in hour 3, read while hours
    1 and 2 are sent, fails hour 3 alone, after 0 to 2 are committed in order, and nothing
    after it is sent; the remainder carried is hour 2's."""
    for i in range(5):
        harness.write_hour(hours[i], {"sub-AAAAAAAAAA": [cpu(hours[i], "c-1", "sub-AAAAAAAAAA", 0.5)]})
    harness.write_hour(hours[3], {"sub-BADBADBAD": b"[1"})
    harness.write_marker(hours.final(5))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 1
    assert harness.entry()["last_processed_hour"] == deployment(harness)["last_processed_hour"] == iso(hours[2])
    assert accepted(harness) == {("c-1", "cpu_core_hours", iso(hours[1])): 1}
    assert deployment(harness)["remainders"] == {"c-1": {"cpu_core_hours": "0.5"}}
    assert [line["hour"] for line in record_lines(harness)] == [iso(hours[i]) for i in range(3)]
    assert "pending_hour" not in deployment(harness)
