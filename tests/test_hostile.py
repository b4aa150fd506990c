"""Hostile and malformed input, end to end against SeaweedFS and the Clazar stand-in.

A deployment is billed as one unit: a bad file in any of its services fails the hour
for every service. Each case checks the exit code and the message, that nothing of the
failed hour was sent (nor of any later hour, which waits), that the state is as it was,
that no traceback reached the output (every line is a log line), and that the metrics
file was written; where the cause is fixed, that the next run bills the hours in order."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import threading

import metering_processor as mp
import pytest
from clazar_standin import status
from conftest import SERVICE, cpu, one_hour, run_or_kill
from export_data import iso, record, service_key

KEY = service_key(SERVICE)
OTHER = ("Other DB", "PROD", "pt-Other12345")
OTHER_KEY = service_key(OTHER)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (DEBUG|INFO|WARNING|ERROR) - ")
CONFIG_ERROR = "metering_processor: configuration error: "


def two_services(harness, metrics=True):
    harness.env["SERVICES"] = f"{KEY},{OTHER_KEY}"
    if metrics:
        harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")


def metrics(harness) -> str:
    return (harness.folder / "metering.prom").read_text()


def metric_values(harness) -> dict[str, float]:
    """The metrics file as {'name{labels}': value}, the deployment label (which every series
    must carry, naming this state) left out; each series at most once."""
    deployment = harness.state_display if harness.state_in_s3 else os.path.realpath(harness.state_display)
    values: dict[str, float] = {}
    for line in metrics(harness).splitlines():
        if line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        first, _, rest = labels.rstrip("}").partition(",")
        assert first == f'deployment="{deployment}"', line
        key = name + (f"{{{rest}}}" if rest else "")
        assert key not in values, f"a series written twice: {line}"
        values[key] = float(value)
    return values


def deployment(harness) -> dict:
    return harness.state()["deployment"]


def billing_part(document: dict) -> dict:
    """A state document without the last run's summary, which every run records."""
    return {name: ({field: value for field, value in entry.items() if field != "last_run"}
                   if name == "deployment" else entry) for name, entry in document.items()}


def ledger_file(harness, hour):
    return harness.state_path.parent / "metering_ledger" / mp.Ledger.hour_file(hour)


def assert_no_traceback(result):
    assert "Traceback" not in result.output, result.output
    for line in result.output.splitlines():
        assert LOG_LINE.match(line), f"a line that is not a log line: {line!r}"


def other_hour(harness, hour, value=3):
    harness.write_hour(hour, {"sub-OOOOOOOOOO": [record(OTHER, hour, contract="c-other", subscription="sub-OOOOOOOOOO",
                                                        dimension="cpu_core_hours", value=value)]}, service=OTHER)


def bill_a_first_hour(harness, hours):
    """Hour 0 of both services, billed; returns (the state's billing part, what Clazar holds)."""
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    harness.env["START_HOUR"] = iso(hours[0])
    result = harness.run()
    assert result.returncode == 0, result.output
    return billing_part(harness.state()), harness.clazar.accepted_quantities()


def assert_the_hour_failed_for_every_service(harness, result, hours, before, sent):
    """After bill_a_first_hour, a run over hours 1 and 2 (both final, for both services)
    whose hour 1 failed: nothing of it or of hour 2 sent, the state as it was, the
    metrics saying so."""
    assert result.returncode == 1, result.output
    assert_no_traceback(result)
    assert harness.clazar.accepted_quantities() == sent, "nothing of the failed hour, nor of the next, was sent"
    assert billing_part(harness.state()) == before, "the state is as it was"
    assert deployment(harness)["last_run"]["result"] == "failed"
    summary = [line for line in result.lines("ERROR") if " - ERROR - Finished: " in line]
    assert len(summary) == 1 and "0 hour(s) processed" in summary[0] and \
        f"last processed hour {mp.display_hour(hours[0])}; 2 hour(s) behind; FAILED: " in summary[0], summary
    values = metric_values(harness)
    assert values["metering_run_exit_status"] == 1
    assert values["metering_run_hours_processed"] == 0 and values['metering_run_records_sent{cloud="aws"}'] == 0
    assert values["metering_hours_behind"] == 2 and values["metering_pending_hour"] == 0
    assert values["metering_last_processed_hour_timestamp_seconds"] == hours[0].timestamp()
    assert values[f'metering_service_holding{{service="{KEY}"}}'] == 0
    assert values[f'metering_service_holding{{service="{OTHER_KEY}"}}'] == 0


def assert_the_hours_then_go_in_order(harness, hours, sent):
    """The cause fixed, the next run bills hours 1 and 2 of both services, once each."""
    result = harness.run()
    assert result.returncode == 0, result.output
    dimension = harness.env.get("DIMENSION1_NAME", "cpu_core_hours")
    new = {key: quantity for key, quantity in harness.clazar.accepted_quantities().items() if key not in sent}
    assert new == {(contract, dimension, iso(hours[i])): quantity for i in (1, 2)
                   for contract, quantity in (("c-1", 2), ("c-other", 3))}
    assert deployment(harness)["last_processed_hour"] == iso(hours[2])
    assert {harness.entry(service)["last_processed_hour"] for service in (SERVICE, OTHER)} == {iso(hours[2])}


def two_good_hours_and(harness, hours, bad_files):
    """Hours 1 and 2 of both services, final; ``bad_files`` ({subscription: body}) added to
    the first service's hour 1. Returns the keys of the bad files."""
    keys = harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 2)], **bad_files})[1:]
    harness.write_hour(hours[2], {"sub-AAAAAAAAAA": [cpu(hours[2], "c-1", "sub-AAAAAAAAAA", 2)]})
    for hour in (hours[1], hours[2]):
        other_hour(harness, hour)
    harness.write_marker(hours.final(3), services=(SERVICE, OTHER))
    return keys


# --- export files ----------------------------------------------------------------------------------

HOSTILE_FILES = {
    # 90 bytes that once computed 10**999999999 while holding the lock.
    "huge-exponent": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1e999999999}]',
                      "value 1e999999999 is not a finite non-negative number"),
    "tiny-value": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1e-99999}]', "value 1e-99999"),
    "tiny-price": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1,"pricePerUnit":1e-99999}]',
                   "pricePerUnit 1e-99999"),
    "huge-integer": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":' + b"9" * 5000 + b"}]",
                     "value " + "9" * 40 + "... is not a finite non-negative number"),
    "negative": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":-1}]',
                 "value -1 is not a finite non-negative number"),
    "deep": (b"[" * 200_000 + b"]" * 200_000, "nested more than 32 levels"),
    "repeated-field": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1,"value":1000}]',
                       "holds the field 'value' twice"),
    "long-contract": (json.dumps([{"externalPayerId": "c" * 200_000, "dimension": "cpu_core_hours", "value": 1}]).encode(),
                      "externalPayerId is 200000 characters long, more than 256"),
    "forged-line": (json.dumps([{"externalPayerId": "c-1", "dimension": "cpu_core_hours\n2026-01-01 00:00:00,000 - ERROR - "
                                 "forged\x1b]8;;http://127.0.0.1/\x07", "value": 1}]).encode(),
                    "holds control characters"),
    # JSON can carry a lone surrogate, which no UTF-8 stream can write.
    "lone-surrogate": (b'[{"externalPayerId":"c-\\ud800","dimension":"cpu_core_hours","value":2}]',
                       "externalPayerId 'c-\\ud800' holds control characters or lone surrogates"),
    "not-utf8": (b'[{"externalPayerId":"c-\xe9","dimension":"cpu_core_hours","value":2}]', "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_a_hostile_export_file_fails_its_hour_for_every_service_and_later_hours_wait(harness, hours, case):
    body, message = HOSTILE_FILES[case]
    two_services(harness)
    # Price formulas make pricePerUnit count; the other service's data fits them too.
    harness.env.update(DIMENSION1_NAME="units", DIMENSION1_FORMULA="cpu_core_hours + cpu_core_hours_total_price")
    before, sent = bill_a_first_hour(harness, hours)
    [bad_key] = two_good_hours_and(harness, hours, {"sub-HHHHHHHHHH": body})
    result = harness.run(timeout=120)
    errors = "\n".join(result.lines("ERROR"))
    assert bad_key in errors and message in errors, errors
    assert_the_hour_failed_for_every_service(harness, result, hours, before, sent)
    assert harness.clazar.metering_calls == 1, "only the first run's batch reached Clazar"
    harness.s3.delete_object(Bucket=harness.bucket, Key=bad_key)
    assert_the_hours_then_go_in_order(harness, hours, sent)


def test_a_file_larger_than_the_limit_fails_its_hour_unread_naming_both_sizes(harness, hours):
    two_services(harness)
    harness.env["MAX_EXPORT_FILE_BYTES"] = "1024"
    before, sent = bill_a_first_hour(harness, hours)
    large = [cpu(hours[1], "c-1", "sub-LLLLLLLLLL", 1, podName=f"db-{i}") for i in range(10)]
    size = len(json.dumps(large, separators=(",", ":")))
    [key] = two_good_hours_and(harness, hours, {"sub-LLLLLLLLLL": large})
    result = harness.run()
    assert f"{key}: {size} bytes, more than MAX_EXPORT_FILE_BYTES (1024 bytes); the file was not read" in result.output
    assert_the_hour_failed_for_every_service(harness, result, hours, before, sent)
    harness.s3.delete_object(Bucket=harness.bucket, Key=key)
    assert_the_hours_then_go_in_order(harness, hours, sent)


def test_data_from_the_export_never_forges_a_log_line(harness, hours):
    prefix = f"omnistrate-metering/{SERVICE[0]}/{SERVICE[1]}/{SERVICE[2]}/{hours[0]:%Y/%m/%d/%H}/"
    forged = "\n2026-01-01 00:00:00,000 - ERROR - forged\x1b[2J"
    harness.s3.put_object(Bucket=harness.bucket, Key=prefix + f"notes{forged}.txt", Body=b"x")
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2),
                                                     cpu(hours[0], None, f"sub-{forged}", 1)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 0, result.output
    assert_no_traceback(result)
    assert "\\n2026-01-01 00:00:00,000 - ERROR - forged\\x1b[2J" in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}


# --- the marker ------------------------------------------------------------------------------------


@pytest.mark.parametrize("last_processed_to", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", 17, "soon"])
def test_a_bad_marker_entry_of_one_service_fails_the_run_and_nothing_is_sent(harness, hours, last_processed_to):
    two_services(harness)
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    final = iso(hours.final(1) - mp.HOUR / 3600)
    harness.s3.put_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json", Body=json.dumps({
        KEY: {"last_processed_to": last_processed_to}, OTHER_KEY: {"last_processed_to": final}}).encode())
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 1, result.output
    assert_no_traceback(result)
    entry = f"export marker s3://{harness.bucket}/omnistrate-metering/last_success_export.json: entry '{KEY}'"
    assert entry in "\n".join(result.lines("ERROR"))
    assert f"; waiting for {KEY}; FAILED: {entry}" in result.output, "the summary names the service holding the rest"
    assert harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0, "nothing of either service was sent"
    state = harness.state()
    assert "last_processed_hour" not in state["deployment"] and "pending_hour" not in state["deployment"]
    assert "last_processed_hour" not in state.get(OTHER_KEY, {}), "the other service did not go on"
    assert state["deployment"]["last_run"]["holding"] == KEY
    values = metric_values(harness)
    assert values["metering_run_exit_status"] == 1 and values["metering_run_hours_processed"] == 0
    assert values[f'metering_service_holding{{service="{KEY}"}}'] == 1
    assert values[f'metering_service_holding{{service="{OTHER_KEY}"}}'] == 0
    shown = harness.report("status")
    assert shown.returncode == 0 and f"(waiting for {KEY})" in shown.output and entry in shown.output, shown.output
    # Fixed, both services' hour goes out as one.
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    assert harness.run().returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-other", "cpu_core_hours", iso(hours[0])): 3}


# --- the state and the ledger ------------------------------------------------------------------------


def pending_state(hours) -> dict:
    """A version 2 state of both services whose first hour is pending, as a run leaves it."""
    record = {"cloud": "aws", "contract_id": "c-1", "dimension": "cpu_core_hours", "start_time": iso(hours[0]),
              "end_time": iso(hours[1]), "quantity": "2"}
    pending = {"hour": iso(hours[0]), "records": [record], "amounts": {"c-1": {"cpu_core_hours": "2"}}, "carried_in": {},
               "remainders": {}, "clouds": {"c-1": "aws"}, "services": {KEY: "aws", OTHER_KEY: "aws"}, "sources": "x",
               "formulas": "", "unattributable": 0}
    return {"version": 2, "deployment": {"first_hour": iso(hours[0]), "remainders": {}, "clouds": {}, "marks_hours": 24,
                                         "pending_hour": pending, "accounted": {}, "waiting": {}, "late_usage": [],
                                         "owed_ledger": []},
            KEY: {}, OTHER_KEY: {}}


def changed(document, path, value):
    if len(path) == 1:
        return {**document, path[0]: value} if isinstance(document, dict) else \
            [value if index == path[0] else item for index, item in enumerate(document)]
    return changed(document, path[:1], changed(document[path[0]], path[1:], value))


HOUR_0 = "<hour 0>"
STATE_CASES = {
    "quantity-not-ascii": (("deployment", "pending_hour", "records", 0, "quantity"), "\u00b2",
                           "entry 'deployment': pending_hour: record 0 has quantity '²', not ASCII digits"),
    "pending-hour-not-whole": (("deployment", "pending_hour", "hour"), "2026-01-01T21:30:00Z",
                               "entry 'deployment': pending_hour: '2026-01-01T21:30:00Z' is not a whole hour"),
    "remainder-exponent": (("deployment", "remainders"), {"c-1": {"cpu_core_hours": "1e999999999"}},
                           "entry 'deployment': remainders: 'c-1'/'cpu_core_hours': '1e999999999' is not a non-negative "
                           "amount"),
    "amount-fraction": (("deployment", "pending_hour", "amounts", "c-1", "cpu_core_hours"), "1/3",
                        "entry 'deployment': pending_hour: 'c-1'/'cpu_core_hours': '1/3' is not a non-negative amount"),
    "record-not-object": (("deployment", "pending_hour", "records"), [["c-1"]],
                          "entry 'deployment': pending_hour: record 0 does not hold exactly the fields"),
    # 10**400 reads as a Python int; it must be refused, not overflow a float later.
    "waiting-count-10**400": (("deployment", "waiting"), {HOUR_0: {"rejected": 10**400}},
                              f"entry 'deployment': waiting: {HOUR_0}: '1{'0' * 79}' (and 321 more characters) is not "
                              "a count"),
    "unknown-field": (("deployment", "surprise"), 1, "entry 'deployment': holds the unknown field 'surprise'"),
    "development-entry": ((KEY,), {"remainders": {}},
                          f"entry {KEY!r}: holds the unknown field 'remainders'"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_a_state_entry_of_the_wrong_shape_stops_the_run_before_anything_is_sent(backend_harness, hours, case):
    harness = backend_harness
    two_services(harness)
    path, value, message = STATE_CASES[case]
    message = message.replace(HOUR_0, iso(hours[0]))
    if isinstance(value, dict) and HOUR_0 in value:
        value = {iso(hours[0]): value[HOUR_0]}
    valid = pending_state(hours)
    mp.parse_state(json.dumps(valid).encode(), "valid")  # the change alone is what is wrong
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    body = json.dumps(changed(valid, path, value)).encode()
    harness.write_state_bytes(body)
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 4, result.output
    assert f"state {harness.state_display} {message}" in result.output, result.output
    assert "it was left untouched: fix or restore it" in result.output
    assert_no_traceback(result)
    assert harness.state_bytes() == body, "the state is byte for byte as it was"
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert metric_values(harness)["metering_run_exit_status"] == 4
    status_result = harness.run("status")
    assert status_result.returncode == 4 and message in status_result.output, status_result.output
    assert harness.state_bytes() == body
    # Restored, the pending hour is resent as it was recorded.
    harness.write_state_bytes(json.dumps(valid).encode())
    rerun = harness.run()
    assert rerun.returncode == 0, rerun.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}


def test_a_bad_ledger_line_stops_the_run_with_exit_4_naming_it_and_the_hour_completes_once_fixed(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_BATCH": "1"})
    assert killed.returncode == -9 and "pending_hour" in deployment(harness)
    path = ledger_file(harness, hours[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"kind": "record"}\n["not", "an", "object"]\n')
    pending = harness.state_bytes()
    for _ in range(2):  # the same clear error every time, never a traceback
        result = harness.run(env=env)
        assert result.returncode == 4, result.output
        assert f"{path.name} is corrupt: line 1 lacks contract_id, dimension, hour, cloud, quantity, outcome, at" \
            in result.output, result.output
        assert_no_traceback(result)
        assert billing_part(json.loads(harness.state_bytes())) == billing_part(json.loads(pending))
        assert "pending_hour" in deployment(harness)
    assert harness.clazar.metering_calls == 1, "nothing was resent while the ledger could not be read"
    path.unlink()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert "pending_hour" not in deployment(harness)
    assert [(line["outcome"], line["quantity"]) for line in harness.ledger_lines()] == [(mp.ALREADY_DELIVERED, 2)]


def test_history_names_a_bad_late_line_instead_of_failing_as_a_defect(harness, hours):
    env = one_hour(harness, hours)
    assert harness.run(env=env).returncode == 0
    path = ledger_file(harness, hours[0])
    # A late line with what only a record line has.
    late = {"kind": "late", "contract_id": "c-1", "dimension": "cpu_core_hours", "hour": iso(hours[0]),
            "accounted_before": "2", "difference": "1", "action": "reported", "check": 1, "sources": "x",
            "at": iso(hours[1]), "outcome": "delivered", "quantity": 7}
    with open(path, "a") as handle:
        handle.write(json.dumps(late) + "\n")
    result = harness.run("history", "--contract", "c-1", "--from", iso(hours[0]), "--to", iso(hours[0]))
    assert "Unexpected" not in result.output and "defect" not in result.output, result.output
    assert result.returncode == 4, result.output
    assert f"{path.name} is corrupt: line 2 holds the unknown field 'outcome'" in result.output, result.output
    assert_no_traceback(result)


# --- configuration -----------------------------------------------------------------------------------


class Listener:
    """A TCP listener on another loopback address, counting who connects to it."""

    def __init__(self, host: str):
        self.socket = socket.socket()
        self.socket.bind((host, 0))
        self.socket.listen(8)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self.stopped.set()
        self.thread.join()
        self.socket.close()


@pytest.mark.parametrize("url", ["http://127.0.0.2:{other}\\@127.0.0.1:{clazar}/metering/",
                                 "http://user:pw-in-the-url@127.0.0.1:{clazar}/metering/"])
def test_a_url_the_parsers_disagree_on_is_refused_at_start_up(harness, hours, url):
    other = Listener("127.0.0.2")
    try:
        harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
        harness.write_marker(hours.final(1))
        clazar_port = harness.clazar.server.server_address[1]
        result = harness.run(env={"START_HOUR": iso(hours[0]),
                                  "CLAZAR_API_URL": url.format(other=other.port, clazar=clazar_port)})
    finally:
        other.close()
    assert result.returncode == 2, result.output
    assert result.output.startswith(CONFIG_ERROR + "CLAZAR_API_URL: must not")
    assert result.output.count("\n") == 1
    assert "pw-in-the-url" not in result.output
    assert other.connections == 0 and harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0
    assert harness.state() == {}


@pytest.mark.parametrize("variable, value, message", [
    ("S3_TIMEOUT_SECONDS", "nan", "must be a number from 1 to 3600, got 'nan'"),
    ("STOP_TIMEOUT_SECONDS", "1e999", "must be a number from 2 to 300, got '1e999'"),
    ("RUN_TIMEOUT_MINUTES", "\uff11\uff10", "must be a whole number from 1 to 1440, got '\uff11\uff10'"),
    ("LATE_USAGE_LOOKBACK_HOURS", "721", "must be a whole number from 0 to 720, got 721"),
    ("MAX_RECORD_QUANTITY", "9223372036854775808", "must be a whole number from 1 to 9223372036854775807, got "
                                                   "9223372036854775808"),
    ("MAX_EXPORT_FILE_BYTES", "9" * 5000, "must be a whole number from 1024 to 1073741824, got '99999"),
])
def test_a_variable_out_of_range_is_exit_2_on_one_line_naming_it(harness, hours, variable, value, message):
    env = one_hour(harness, hours)
    harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")
    result = harness.run(env={**env, variable: value})
    assert result.returncode == 2, result.output
    assert result.output.startswith(f"{CONFIG_ERROR}{variable}: {message}") and result.output.count("\n") == 1, \
        result.output
    assert harness.clazar.auth_calls == 0 and harness.state() == {}
    assert metric_values(harness)["metering_run_exit_status"] == 2


def test_a_configuration_error_carrying_outside_text_is_printed_escaped_on_one_line(harness, hours):
    env = one_hour(harness, hours)
    forged = "\n2026-01-01 00:00:00,000 - ERROR - forged\x1b[2J"
    escaped = "\\n2026-01-01 00:00:00,000 - ERROR - forged\\x1b[2J"
    missing = harness.folder / f"no-secret{forged}"
    several = harness.folder / f"secret{forged}"
    several.write_text("first-line-of-the-secret\nsecond-line\n")
    for path, problem in ((missing, "No such file or directory"), (several, "must hold the secret on one line")):
        result = harness.run(env={**env, "CLAZAR_CLIENT_SECRET": None, "CLAZAR_CLIENT_SECRET_FILE": str(path)})
        assert result.returncode == 2, result.output
        assert result.output.count("\n") == 1 and result.output.endswith("\n"), result.output
        assert result.output.startswith(CONFIG_ERROR + "CLAZAR_CLIENT_SECRET_FILE: "), result.output
        assert escaped in result.output and problem in result.output, result.output
        assert "\x1b" not in result.output and "first-line-of-the-secret" not in result.output
    assert harness.clazar.auth_calls == 0 and harness.state() == {}


@pytest.mark.parametrize("variable", ["SERVICE_NAME", "SERVICES", "STATE_FILE_PATH"])
def test_a_variable_that_is_not_utf8_is_exit_2_naming_it(harness, hours, variable):
    env = one_hour(harness, hours)
    # A Latin-1 config.env: the byte 0xE9 reaches os.environ as the lone surrogate \udce9.
    latin1 = {"SERVICE_NAME": "Caf\udce9 DB", "SERVICES": f"{KEY},Caf\udce9 DB:PROD:pt-1",
              "STATE_FILE_PATH": str(harness.folder / "\udce9tat.json")}[variable]
    harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")
    result = harness.run(env={**env, variable: latin1}, separate_process=True)
    assert result.returncode == 2, result.output
    assert result.output == f"{CONFIG_ERROR}{variable}: is not valid UTF-8 text; save the file it comes from as UTF-8\n"
    assert harness.clazar.auth_calls == 0 and harness.state() == {}
    assert re.search(r"\nmetering_run_exit_status\{deployment=\"[^\"]+\"\} 2\n", metrics(harness)), metrics(harness)
    if variable == "STATE_FILE_PATH":  # labelled with the undecodable byte escaped
        assert f'deployment="{harness.folder}/\\\\xe9tat.json"' in metrics(harness), metrics(harness)


def test_services_named_like_secrets_keep_distinct_labels_and_status_lines(harness, hours):
    prod, dev = ("Vault Secret", "PROD", "pt-Vault00001"), ("Vault Secret", "DEV", "pt-Vault00002")
    harness.env["SERVICES"] = f"{service_key(prod)},{service_key(dev)}"
    harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")
    for service in (prod, dev):
        for hour in (hours[0], hours[1]):
            harness.write_hour(hour, {"sub-AAAAAAAAAA": [record(service, hour, contract="c-1", subscription="sub-AAAAAAAAAA",
                                                                dimension="cpu_core_hours", value=1)]}, service=service)
    # DEV's export is an hour behind: it holds the deployment's second hour.
    harness.write_marker(hours.final(2), services=(prod,))
    marker = json.loads(harness.s3.get_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json")
                        ["Body"].read())
    marker[service_key(dev)] = {"last_processed_to": iso(hours.final(1) - mp.HOUR / 3600)}
    harness.s3.put_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json",
                          Body=json.dumps(marker).encode())
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 0, result.output
    assert "Starting processing for Vault Secret/PROD/pt-Vault00001, Vault Secret/DEV/pt-Vault00002" in result.output
    assert f"; waiting for {service_key(dev)}" in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    text = metrics(harness)
    assert "[redacted]" not in text
    values = metric_values(harness)  # each series once
    assert values[f'metering_service_holding{{service="{service_key(prod)}"}}'] == 0
    assert values[f'metering_service_holding{{service="{service_key(dev)}"}}'] == 1
    assert values[f'metering_export_final_before_timestamp_seconds{{service="{service_key(prod)}"}}'] == \
        hours.final(2).timestamp()
    assert values[f'metering_export_final_before_timestamp_seconds{{service="{service_key(dev)}"}}'] == \
        hours.final(1).timestamp()
    shown = harness.report("status").output
    assert "[redacted]" not in shown
    assert f"(waiting for {service_key(dev)})" in shown
    for service in (prod, dev):
        assert shown.count(f"\n{service_key(service)} (aws)\n") == 1, shown
    rows = json.loads(harness.report("status", "--json").output)["services"]
    assert [row["service"] for row in rows] == [service_key(prod), service_key(dev)]


# --- what Clazar says is masked wherever it is kept -----------------------------------------------------


def test_secrets_in_clazars_answers_reach_neither_state_nor_status_nor_metrics(harness, hours):
    harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")
    secret = harness.clazar.client_secret
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2),
                                                     cpu(hours[0], "c-gone", "sub-AAAAAAAAAA", 1, podName="x")]})
    harness.write_marker(hours.final(1))
    harness.clazar.rejected_contracts["c-gone"] = f"contract of ops@buyer.example unknown; client_secret={secret}"
    env = {"START_HOUR": iso(hours[0]), "CLAZAR_MAX_RETRIES": "0"}
    assert harness.run(env=env).returncode == 1
    # Then a failing hour whose error body echoes the token and an address.
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(2))
    harness.clazar.faults.append(status(400, body="bad request from {authorization} for ops@buyer.example"))
    result = harness.run(env=env)
    assert result.returncode == 1
    stored = harness.state_bytes().decode()
    kept = ledger_file(harness, hours[0]).read_text() + ledger_file(harness, hours[1]).read_text()
    shown = "".join(harness.report(*command).output for command in (
        ("status",), ("status", "--json"), ("retry-failed", "--dry-run"),
        ("history", "--contract", "c-gone", "--from", iso(hours[0]), "--to", iso(hours[1]), "--json")))
    tokens = harness.clazar.issued_tokens
    assert tokens
    for text in (stored, kept, shown, result.output, metrics(harness)):
        assert secret not in text and "ops@buyer.example" not in text
        assert not any(token in text for token in tokens)
    rejected = next(json.loads(line) for line in kept.splitlines() if json.loads(line)["contract_id"] == "c-gone")
    assert rejected["answer"]["errors"][0]["message"] == "contract of [email] unknown; client_secret=[redacted]"
    error = deployment(harness)["last_run"]["error"]
    assert "HTTP 400" in error and "Bearer [redacted] for [email]" in error


def test_reconcile_csv_neutralises_a_contract_id_a_spreadsheet_would_run(harness, hours):
    contract = '=HYPERLINK("http://127.0.0.1/","x")'
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], contract, "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 0
    assert harness.clazar.accepted_quantities() == {(contract, "cpu_core_hours", iso(hours[0])): 2}
    result = harness.report("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), "--csv")
    assert result.returncode == 0, result.output
    assert result.output == ("contract_id,dimension,expected,billed,difference,rejected,conflict\n"
                             "\"'=HYPERLINK(\"\"http://127.0.0.1/\"\",\"\"x\"\")\",cpu_core_hours,2,2,0,0,0\n")


# --- files ---------------------------------------------------------------------------------------------


def test_the_lock_file_is_not_opened_through_a_symbolic_link(harness, hours):
    env = one_hour(harness, hours)
    victim = harness.folder / "victim.txt"
    victim.write_text("precious")
    lock = harness.state_path.parent / (harness.state_path.name + ".lock")
    lock.symlink_to(victim)
    harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")
    result = harness.run(env=env)
    assert result.returncode == 4, result.output
    assert f"lock file {lock} is a symbolic link; it was not opened through it" in result.output
    assert_no_traceback(result)
    assert victim.read_text() == "precious" and lock.is_symlink()
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0 and harness.state() == {}
    assert metric_values(harness)["metering_run_exit_status"] == 4


def test_a_symlinked_state_is_written_through_to_its_target_and_files_are_private_under_umask_000(harness, hours):
    env = one_hour(harness, hours)
    volume = harness.folder / "volume"
    volume.mkdir()
    link = harness.folder / "state-link.json"
    link.symlink_to(volume / "state.json")
    environment = {**harness.env, **env, "STATE_FILE_PATH": str(link)}
    # umask 000: whatever the exporter creates must still be private.
    process = subprocess.run(["/bin/sh", "-c", 'umask 000 && exec "$@"', "sh", *harness.command()], env=environment,
                             cwd=harness.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    assert process.returncode == 0, process.stdout
    state = json.loads((volume / "state.json").read_text())
    assert link.is_symlink() and state[KEY]["last_processed_hour"] == iso(hours[0])
    assert state["deployment"]["last_processed_hour"] == iso(hours[0])
    assert stat.S_IMODE((volume / "state.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((volume / "state.json.lock").stat().st_mode) == 0o600
    assert not (harness.folder / "state-link.json.lock").exists(), "one lock, beside the target"
    ledger = harness.folder / "metering_ledger"
    folders = [ledger, *[path for path in ledger.rglob("*") if path.is_dir()]]
    assert [path.relative_to(harness.folder) for path in folders] == \
        [ledger.relative_to(harness.folder), ledger_file(harness, hours[0]).parent.relative_to(harness.state_path.parent)]
    assert all(stat.S_IMODE(folder.stat().st_mode) == 0o700 for folder in folders)
    files = list(ledger.rglob("*.jsonl"))
    assert len(files) == 1 and all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)


def test_a_hard_linked_lock_file_does_not_overwrite_its_other_name(harness, hours):
    env = one_hour(harness, hours)
    victim = harness.folder / "victim.txt"
    victim.write_text("precious")
    lock = harness.state_path.parent / (harness.state_path.name + ".lock")
    os.link(victim, lock)
    result = harness.run(env=env)
    assert victim.read_text() == "precious", result.output
    assert result.returncode == 4, result.output
    assert f"lock file {lock} has 2 names (hard links); it was not written" in result.output
    assert_no_traceback(result)
    assert harness.clazar.metering_calls == 0 and harness.state() == {}


def test_a_state_path_that_is_not_a_regular_file_stops_the_run(harness, hours):
    env = one_hour(harness, hours)
    os.mkfifo(harness.state_path)
    ended, code, output = run_or_kill(harness, env, timeout=30)
    assert ended, "the run was still waiting to open the state"
    assert code == 4, output
    assert f"state {harness.state_path} is not a regular file (a folder, FIFO, socket or device); it was not read" \
        in output, output
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert stat.S_ISFIFO(harness.state_path.stat().st_mode)


def test_a_long_subscription_id_does_not_hang_the_log_redactor(harness, hours):
    unattributed = {"subscriptionId": "a" * 2_000_000, "dimension": "cpu_core_hours", "value": 1}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2), unattributed]})
    harness.write_marker(hours.final(1))
    # A 2 MB file is read and parsed in well under a second; masking its one warning line
    # grows with the square of its length (40,000 characters take 2.5 s).
    ended, code, output = run_or_kill(harness, {"START_HOUR": iso(hours[0])}, timeout=60)
    assert ended, "the run was still masking the unattributed-usage warning"
    assert code == 0, output[-2000:]
    assert "1 record(s) from 1 subscription(s) have no externalPayerId or dimension and are not sent" in output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}


# --- a defect ------------------------------------------------------------------------------------------


def test_an_unexpected_error_fails_the_hour_for_every_service_and_the_metrics_are_written(harness, hours):
    two_services(harness)
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    env = {"START_HOUR": iso(hours[0])}
    result = harness.run(env=env, faults={"FAULT_DEFECT_ON_BATCH": "1"})
    assert result.returncode == 1, result.output
    assert "unexpected RuntimeError: 'injected defect' (a defect: please report it with the DEBUG log)" in result.output
    assert_no_traceback(result)
    assert harness.clazar.accepted_quantities() == {}, "nothing of the deployment's hour was sent"
    assert deployment(harness)["pending_hour"]["hour"] == iso(hours[0]), "the hour stays pending, to be resent"
    assert "last_processed_hour" not in harness.state().get(OTHER_KEY, {}), "the other service did not go on"
    values = metric_values(harness)
    assert values["metering_run_exit_status"] == 1 and values["metering_pending_hour"] == 1
    assert values["metering_run_hours_processed"] == 0
    (harness.folder / "metering.prom").unlink()
    assert harness.run(env=env).returncode == 0
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-other", "cpu_core_hours", iso(hours[0])): 3}
    assert "pending_hour" not in deployment(harness)
    values = metric_values(harness)
    assert values["metering_run_exit_status"] == 0 and values["metering_pending_hour"] == 0
