"""Hostile and malformed input, end to end against SeaweedFS and the Clazar stand-in.

Each case checks the exit code and the message, that nothing of the failed part was
sent, that the state is as it was, that the other service went on, that no
traceback reached the output, and that the metrics file was written."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import threading
from datetime import timedelta

import metering_processor as mp
import pytest
from clazar_standin import status
from conftest import SERVICE, cpu, one_hour, run_or_kill
from export_data import iso, record, service_key

KEY = service_key(SERVICE)
OTHER = ("Other DB", "PROD", "pt-Other12345")
OTHER_KEY = service_key(OTHER)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (DEBUG|INFO|WARNING|ERROR) - ")


def two_services(harness, metrics=True):
    harness.env["SERVICES"] = f"{KEY},{OTHER_KEY}"
    if metrics:
        harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")


def metrics(harness) -> str:
    return (harness.folder / "metering.prom").read_text()


def billing_part(entry: dict) -> dict:
    """A state entry without this run's summary, which every run records."""
    return {name: value for name, value in entry.items() if name not in ("last_run", "last_success_at")}


def accepted_contracts(harness) -> set[str]:
    return {contract for contract, _, _ in harness.clazar.accepted_keys()}


def assert_no_traceback(result):
    assert "Traceback" not in result.output, result.output
    for line in result.output.splitlines():
        assert LOG_LINE.match(line), f"a line that is not a log line: {line!r}"


def assert_only_the_other_service_went_on(harness, result):
    """After a first run that failed only the first service's first hour."""
    assert_no_traceback(result)
    assert accepted_contracts(harness) == {"c-other"}
    assert "last_processed_hour" not in harness.entry()
    assert "metering_run_exit_status 1" in metrics(harness)


def other_hour(harness, hour):
    harness.write_hour(hour, {"sub-OOOOOOOOOO": [record(OTHER, hour, contract="c-other", subscription="sub-OOOOOOOOOO",
                                                        dimension="cpu_core_hours", value=3)]}, service=OTHER)


# --- export files ----------------------------------------------------------------------------------

HOSTILE_FILES = {
    # 90 bytes that once computed 10**999999999 while holding the lock.
    "huge-exponent": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1e999999999}]',
                      "value 1e999999999 is not a finite non-negative number"),
    "tiny-value": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1e-99999}]', "value 1e-99999"),
    "tiny-price": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1,"pricePerUnit":1e-99999}]',
                   "pricePerUnit 1e-99999"),
    "deep": (b"[" * 200_000 + b"]" * 200_000, "nested more than 32 levels"),
    "repeated-field": (b'[{"externalPayerId":"c-1","dimension":"cpu_core_hours","value":1,"value":1000}]',
                       "holds the field 'value' twice"),
    "long-contract": (json.dumps([{"externalPayerId": "c" * 200_000, "dimension": "cpu_core_hours", "value": 1}]).encode(),
                      "externalPayerId is 200000 characters long, more than 256"),
    "forged-line": (json.dumps([{"externalPayerId": "c-1", "dimension": "cpu_core_hours\n2026-01-01 00:00:00,000 - ERROR - "
                                 "forged\x1b]8;;http://127.0.0.1/\x07", "value": 1}]).encode(),
                    "holds control characters"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_a_hostile_export_file_fails_its_hour_and_nothing_else(harness, hours, case):
    body, message = HOSTILE_FILES[case]
    two_services(harness)
    # Price formulas make pricePerUnit count; the other service's data fits them too.
    harness.env.update(DIMENSION1_NAME="units", DIMENSION1_FORMULA="cpu_core_hours + cpu_core_hours_total_price")
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 0
    before = billing_part(harness.entry())
    sent = harness.clazar.accepted_quantities()

    bad_key = harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 2)],
                                            "sub-HHHHHHHHHH": body})[1]
    other_hour(harness, hours[1])
    harness.write_marker(hours.final(2), services=(SERVICE, OTHER))
    result = harness.run(timeout=120)

    assert result.returncode == 1, result.output
    errors = "\n".join(result.lines("ERROR"))
    assert bad_key in errors and message in errors, errors
    assert_no_traceback(result)
    assert billing_part(harness.entry()) == before, "the state is as it was"
    new = {key: quantity for key, quantity in harness.clazar.accepted_quantities().items() if key not in sent}
    assert new == {("c-other", "units", iso(hours[1])): 3}, "only the other service's hour was sent"
    assert harness.entry(OTHER)["last_processed_hour"] == iso(hours[1])
    assert "metering_run_exit_status 1" in metrics(harness)
    assert f'metering_service_up{{service="{KEY}"}} 0' in metrics(harness)
    assert f'metering_service_up{{service="{OTHER_KEY}"}} 1' in metrics(harness)


def test_a_file_larger_than_the_limit_fails_its_hour_unread_naming_both_sizes(harness, hours):
    two_services(harness)
    large = [cpu(hours[0], "c-1", "sub-LLLLLLLLLL", 1, podName=f"db-{i}") for i in range(10)]
    size = len(json.dumps(large, separators=(",", ":")))
    key = harness.write_hour(hours[0], {"sub-LLLLLLLLLL": large})[0]
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    result = harness.run(env={"START_HOUR": iso(hours[0]), "MAX_EXPORT_FILE_BYTES": "1024"})
    assert result.returncode == 1
    assert f"{key}: {size} bytes, more than MAX_EXPORT_FILE_BYTES (1024 bytes)" in result.output
    assert_only_the_other_service_went_on(harness, result)


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
def test_a_bad_marker_entry_fails_its_service_and_the_other_goes_on(harness, hours, last_processed_to):
    two_services(harness)
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    final = iso(hours.final(1) - timedelta(seconds=1))
    harness.s3.put_object(Bucket=harness.bucket, Key="omnistrate-metering/last_success_export.json", Body=json.dumps({
        KEY: {"last_processed_to": last_processed_to}, OTHER_KEY: {"last_processed_to": final}}).encode())
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 1
    assert f"export marker s3://{harness.bucket}/omnistrate-metering/last_success_export.json: entry '{KEY}'" in result.output
    assert_only_the_other_service_went_on(harness, result)


# --- the state and the ledger ------------------------------------------------------------------------


def pending_state(hours, **changes) -> dict:
    record = {"cloud": "aws", "contract_id": "c-1", "dimension": "cpu_core_hours", "start_time": iso(hours[0]),
              "end_time": iso(hours[1]), "quantity": "2"}
    pending = {"hour": iso(hours[0]), "records": [record], "remainders": {}}
    for name, value in changes.items():
        (record if name in record else pending)[name] = value
    return {KEY: {"pending_hour": pending, "remainders": {}, "rejected": []}}


@pytest.mark.parametrize("changes, message", [
    ({"quantity": "\u00b2"}, "pending_hour is malformed (record 0 has quantity '²', not ASCII digits)"),
    ({"hour": "2026-01-01T21:30:00Z"}, "pending_hour is malformed (hour 2026-01-01T21:30:00Z is not a whole hour)"),
    ({"remainders": {"c-1": {"cpu_core_hours": "1e999999999"}}},
     "remainders: 'c-1'/'cpu_core_hours': '1e999999999' is not a non-negative fraction"),
    ({"records": [["c-1"]]}, "pending_hour is malformed (record 0 does not hold exactly the fields"),
])
def test_a_state_entry_of_the_wrong_shape_stops_the_run_before_anything_is_sent(backend_harness, hours, changes, message):
    harness = backend_harness
    two_services(harness)
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    body = json.dumps(pending_state(hours, **changes)).encode()
    harness.write_state_bytes(body)
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 4, result.output
    assert f"entry '{KEY}': {message}" in result.output
    assert_no_traceback(result)
    assert harness.state_bytes() == body, "the state is as it was"
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert "metering_run_exit_status 4" in metrics(harness)
    status_result = harness.run("status")
    assert status_result.returncode == 4 and message in status_result.output


def test_a_bad_ledger_line_stops_the_run_with_exit_4_naming_it_and_the_hour_completes_once_fixed(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    killed = harness.run(env=env, faults={"FAULT_KILL_AFTER_BATCH": "1"})
    assert killed.returncode == -9 and "pending_hour" in harness.entry()
    ledger_file = harness.state_path.parent / "metering_ledger" / mp.Ledger.hour_file(KEY, hours[0])
    ledger_file.parent.mkdir(parents=True, exist_ok=True)
    ledger_file.write_text('{"kind": "record"}\n["not", "an", "object"]\n')
    for _ in range(2):  # the same clear error every time, never a traceback
        result = harness.run(env=env)
        assert result.returncode == 4, result.output
        assert f"{ledger_file.name} is corrupt: line 1 has no service string" in result.output
        assert_no_traceback(result)
        assert "pending_hour" in harness.entry()
    ledger_file.unlink()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert "pending_hour" not in harness.entry()


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
    assert result.output.startswith("metering_processor: configuration error: CLAZAR_API_URL: must not")
    assert "pw-in-the-url" not in result.output
    assert other.connections == 0 and harness.clazar.auth_calls == 0 and harness.clazar.metering_calls == 0


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
    ledger = harness.state_path.parent / "metering_ledger" / mp.Ledger.hour_file(KEY, hours[0])
    kept = ledger.read_text()
    shown = harness.run("status").output + harness.run("status", "--json").output
    tokens = harness.clazar.issued_tokens
    assert tokens
    for text in (stored, kept, shown, result.output, metrics(harness)):
        assert secret not in text and "ops@buyer.example" not in text
        assert not any(token in text for token in tokens)
    rejected = next(json.loads(line) for line in kept.splitlines() if json.loads(line)["contract_id"] == "c-gone")
    assert rejected["answer"]["errors"][0]["message"] == "contract of [email] unknown; client_secret=[redacted]"
    error = harness.entry()["last_run"]["error"]
    assert "HTTP 400" in error and "Bearer [redacted] for [email]" in error


def test_reconcile_csv_neutralises_a_contract_id_a_spreadsheet_would_run(harness, hours):
    contract = '=HYPERLINK("http://127.0.0.1/","x")'
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], contract, "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    assert harness.run(env={"START_HOUR": iso(hours[0])}).returncode == 0
    result = harness.run("reconcile", "--from", iso(hours[0]), "--to", iso(hours[0]), "--csv")
    assert result.returncode == 0, result.output
    assert f"{KEY},\"'=HYPERLINK(\"\"http://127.0.0.1/\"\",\"\"x\"\")\",cpu_core_hours,2,2,0,0" in result.output


# --- files ---------------------------------------------------------------------------------------------


def test_the_lock_file_is_not_opened_through_a_symbolic_link(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    victim = harness.folder / "victim.txt"
    victim.write_text("precious")
    lock = harness.state_path.parent / (harness.state_path.name + ".lock")
    lock.symlink_to(victim)
    harness.env["METRICS_FILE"] = str(harness.folder / "metering.prom")
    result = harness.run(env={"START_HOUR": iso(hours[0])})
    assert result.returncode == 4
    assert f"lock file {lock} is a symbolic link; it was not opened through it" in result.output
    assert_no_traceback(result)
    assert victim.read_text() == "precious" and harness.clazar.metering_calls == 0
    assert "metering_run_exit_status 4" in metrics(harness)


def test_a_symlinked_state_is_written_through_to_its_target_and_folders_are_private(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    volume = harness.folder / "volume"
    volume.mkdir()
    link = harness.folder / "state-link.json"
    link.symlink_to(volume / "state.json")
    environment = {**harness.env, "STATE_FILE_PATH": str(link), "START_HOUR": iso(hours[0])}
    # umask 000: whatever the exporter creates must still be private.
    process = subprocess.run(["/bin/sh", "-c", 'umask 000 && exec "$@"', "sh", *harness.command()], env=environment,
                             cwd=harness.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    assert process.returncode == 0, process.stdout
    assert link.is_symlink() and json.loads((volume / "state.json").read_text())[KEY]["last_processed_hour"] == iso(hours[0])
    assert stat.S_IMODE((volume / "state.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((volume / "state.json.lock").stat().st_mode) == 0o600
    ledger = harness.folder / "metering_ledger"
    folders = [ledger, *[path for path in ledger.rglob("*") if path.is_dir()]]
    assert len(folders) == 3 and all(stat.S_IMODE(folder.stat().st_mode) == 0o700 for folder in folders)
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in ledger.rglob("*.jsonl"))


# --- a defect ------------------------------------------------------------------------------------------


def test_an_unexpected_error_fails_only_its_service_and_the_metrics_are_written(harness, hours):
    two_services(harness)
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    other_hour(harness, hours[0])
    harness.write_marker(hours.final(1), services=(SERVICE, OTHER))
    env = {"START_HOUR": iso(hours[0])}
    result = harness.run(env=env, faults={"FAULT_DEFECT_ON_BATCH": "1"})
    assert result.returncode == 1, result.output
    assert f"{SERVICE[0]}/{SERVICE[1]}/{SERVICE[2]}: unexpected RuntimeError: injected defect" in result.output
    assert_no_traceback(result)
    assert accepted_contracts(harness) == {"c-other"}
    assert "pending_hour" in harness.entry(), "the hour stays pending, to be resent"
    assert f'metering_service_up{{service="{KEY}"}} 0' in metrics(harness)
    assert f'metering_service_up{{service="{OTHER_KEY}"}} 1' in metrics(harness)
    assert harness.run(env=env).returncode == 0
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[0]))] == 2
    assert os.path.exists(harness.folder / "metering.prom")


# --- text that cannot be written, ledger lines and variables, files, hangs from data ------------------


def test_a_contract_id_with_a_lone_surrogate_fails_its_hour(harness, hours):
    contract = "c-\ud800"
    body = json.dumps([{"externalPayerId": contract, "dimension": "cpu_core_hours", "value": 2}]).encode()
    key = harness.write_hour(hours[0], {"sub-AAAAAAAAAA": body})[0]
    harness.write_marker(hours.final(1))
    harness.clazar.rejected_contracts[contract] = "unknown contract"
    result = harness.run(env={"START_HOUR": iso(hours[0]), "CLAZAR_MAX_RETRIES": "0"})
    assert "Traceback" not in result.output and "Logging error" not in result.output, result.output
    assert result.returncode == 1, result.output
    assert key in result.output and "externalPayerId" in result.output, result.output
    assert harness.clazar.metering_calls == 0




def test_history_names_a_bad_late_line_instead_of_failing_as_a_defect(harness, hours):
    env = one_hour(harness, hours)
    assert harness.run(env=env).returncode == 0
    ledger_file = harness.state_path.parent / "metering_ledger" / mp.Ledger.hour_file(KEY, hours[0])
    late = {"kind": "late", "service": KEY, "contract_id": "c-1", "dimension": "cpu_core_hours", "hour": iso(hours[0]),
            "difference": "1", "action": "reported", "outcome": "delivered", "quantity": "7", "at": iso(hours[1])}
    with open(ledger_file, "a") as handle:
        handle.write(json.dumps(late) + "\n")
    result = harness.run("history", "--contract", "c-1", "--from", iso(hours[0]), "--to", iso(hours[0]))
    assert "Unexpected" not in result.output, result.output
    assert result.returncode == 4, result.output
    assert ledger_file.name in result.output




def test_a_hard_linked_lock_file_does_not_overwrite_its_other_name(harness, hours):
    env = one_hour(harness, hours)
    victim = harness.folder / "victim.txt"
    victim.write_text("precious")
    lock = harness.state_path.parent / (harness.state_path.name + ".lock")
    os.link(victim, lock)
    result = harness.run(env=env)
    assert victim.read_text() == "precious", result.output




def test_a_long_subscription_id_does_not_hang_the_log_redactor(harness, hours):
    unattributed = {"subscriptionId": "a" * 2_000_000, "dimension": "cpu_core_hours", "value": 1}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2), unattributed]})
    harness.write_marker(hours.final(1))
    # A 2 MB file is read and parsed in well under a second; masking its one warning line
    # grows with the square of its length (40,000 characters take 2.5 s).
    ended, code, output = run_or_kill(harness, {"START_HOUR": iso(hours[0])}, timeout=60)
    assert ended, "the run was still masking the unattributed-usage warning"
    assert code == 0, output[-2000:]


def test_a_state_path_that_is_not_a_regular_file_stops_the_run(harness, hours):
    env = one_hour(harness, hours)
    os.mkfifo(harness.state_path)
    ended, code, output = run_or_kill(harness, env, timeout=30)
    assert ended, "the run was still waiting to open the state"
    assert code == 4 and "metering_state.json" in output, output
    assert harness.clazar.metering_calls == 0
