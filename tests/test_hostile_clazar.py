"""Clazar as a hostile server would behave, end to end: a proxy on another host, an
answer too large or too slow to end, a Retry-After no parser expects, and secrets
or addresses in its answers, which must be masked whole wherever they are kept.

Every listener is on a loopback address (127.0.0.2 plays the "other host"):
nothing here can reach beyond this machine, even when the code under test is broken."""

from __future__ import annotations

import html
import json
import os
import socket
import signal
import subprocess
import threading
import time
from urllib.parse import quote, quote_plus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import metering_processor as mp
import pytest
from clazar_standin import status
from conftest import SERVICE, cpu, one_hour, run_or_kill
from export_data import iso, service_key

KEY = service_key(SERVICE)


def deployment(harness) -> dict:
    """The state's deployment entry: the pending hour and the last run's summary live there."""
    return harness.state()["deployment"]


def ledger_text(harness, hour) -> str:
    return (harness.state_path.parent / "metering_ledger" / mp.Ledger.hour_file(hour)).read_text()


class Recorder:
    """An HTTP server on a loopback address that records every request it gets
    (request line, headers, body) and answers ``answer`` (a callable taking the handler)."""

    def __init__(self, host: str = "127.0.0.2", answer=None):
        recorder = self
        self.requests: list[tuple[str, dict, bytes]] = []
        self.answer = answer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length", 0) or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((self.requestline, dict(self.headers), body))
                if recorder.answer is not None:
                    return recorder.answer(self)
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_GET = do_POST = do_PUT = _any

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def everything(self) -> str:
        return "\n".join(f"{line}\n{headers}\n{body!r}" for line, headers, body in self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- a secret over plain http to another host ---------------------------------------------------------


def test_the_client_secret_never_reaches_a_proxy_on_another_host_over_plain_http(harness, hours):
    proxy = Recorder("127.0.0.2")
    try:
        env = one_hour(harness, hours)
        # The harness's Clazar URL is http://127.0.0.1:<port>/metering/, allowed as loopback. S3 is
        # reached as localhost, which no_proxy exempts, so only Clazar's requests meet the proxy.
        seaweed = harness.env["AWS_ENDPOINT_URL_S3"].replace("127.0.0.1", "localhost")
        result = harness.run(env={**env, "http_proxy": proxy.url, "no_proxy": "localhost",
                                  "AWS_ENDPOINT_URL_S3": seaweed, "CLAZAR_MAX_RETRIES": "0"})
    finally:
        proxy.close()
    assert harness.clazar.client_secret not in proxy.everything(), result.output
    assert proxy.requests == [], proxy.everything()


# --- Clazar's answers: size and time --------------------------------------------------------------------

HUGE_ANSWER = 256 * 2**20


class Flood:
    """An endpoint on 127.0.0.1 answering every request with ``status`` and HUGE_ANSWER
    bytes of JSON whitespace (``headers`` added), or, with ``token``, a token to
    /authenticate/ and the flood to the rest; counts how much of the answers the client
    took before hanging up, and keeps each request line."""

    def __init__(self, status: bytes = b"200 OK", headers: bytes = b"", token: bool = False):
        self.sent = 0
        self.connections = 0
        self.request_lines: list[bytes] = []
        self.token = token
        self.head = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + headers + \
            b"Content-Length: %d\r\n\r\n" % HUGE_ANSWER
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(4)
        self.port = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection):
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            self.request_lines.append(request.split(b"\r\n", 1)[0])
            if self.token and request.startswith(b"POST /authenticate/ "):
                body = json.dumps({"access_token": "flood-token-0123456789", "expires_in": 3600}).encode()
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                return
            connection.sendall(self.head)
            chunk = b" " * 2**20
            sent = 0
            try:
                while sent < HUGE_ANSWER:
                    connection.sendall(chunk)
                    sent += len(chunk)
                    self.sent += len(chunk)
            except OSError:
                pass  # the client hung up

    def close(self):
        self.socket.close()


def test_a_huge_clazar_answer_is_not_read_without_bound(harness, hours):
    flood = Flood()
    try:
        env = one_hour(harness, hours)
        # Tokens come from the API's origin + /authenticate/: the flood answers that first request.
        result = harness.run(env={**env, "CLAZAR_API_URL": f"http://127.0.0.1:{flood.port}/metering/",
                                  "CLAZAR_MAX_RETRIES": "0"}, timeout=300)
    finally:
        flood.close()
    assert result.returncode == 1, result.output
    assert "cannot authenticate with Clazar" in result.output, result.output
    # No metering request followed the authentication that failed.
    assert flood.request_lines == [b"POST /authenticate/ HTTP/1.1"], flood.request_lines
    # A bounded reader hangs up long before the whole answer: the token answer is a few hundred bytes.
    assert flood.sent < 64 * 2**20, f"the client read {flood.sent} bytes of one answer"
    assert "pending_hour" in deployment(harness) and "last_processed_hour" not in deployment(harness)


def test_a_huge_answer_to_a_batch_is_refused_unread_and_the_hour_resent(harness, hours):
    flood = Flood(token=True)
    try:
        env = one_hour(harness, hours)
        result = harness.run(env={**env, "CLAZAR_API_URL": f"http://127.0.0.1:{flood.port}/metering/",
                                  "CLAZAR_MAX_RETRIES": "0"}, timeout=300)
    finally:
        flood.close()
    assert result.returncode == 1, result.output
    assert f"Clazar's answer from http://127.0.0.1:{flood.port}/metering/ is larger than 16777216 bytes; it was " \
           "not read" in result.output, result.output
    assert flood.request_lines == [b"POST /authenticate/ HTTP/1.1", b"POST /metering/ HTTP/1.1"], flood.request_lines
    assert flood.sent < 64 * 2**20, f"the client read {flood.sent} bytes of one answer"
    # Its records may have landed: kept as sent without an answer, and resent by the next run.
    assert deployment(harness)["pending_hour"]["hour"] == iso(hours[0])
    assert [line["outcome"] for line in harness.ledger_lines()] == [mp.NO_ANSWER]
    rerun = harness.run(env=env)
    assert rerun.returncode == 0, rerun.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert "pending_hour" not in deployment(harness)


def test_a_trickling_clazar_answer_does_not_hang_the_run(harness, hours):
    stop = threading.Event()
    auth = Recorder("127.0.0.1", answer=trickle_forever(stop))
    try:
        env = one_hour(harness, hours)
        # 45 s is twenty times the longest wait the settings allow (1 s timeout, no retry).
        ended, code, output = run_or_kill(harness, {**env, "CLAZAR_API_URL": auth.url + "/metering/",
                                                    "CLAZAR_TIMEOUT_SECONDS": "1", "CLAZAR_MAX_RETRIES": "0"}, 45)
    finally:
        stop.set()
        auth.close()
    assert ended, "the run was still waiting for Clazar's answer"
    assert code == 1, output
    assert "no complete answer from " + auth.url + "/authenticate/ within 3 s" in output, output
    assert [line for line, _, _ in auth.requests] == ["POST /authenticate/ HTTP/1.1"]
    assert "pending_hour" in deployment(harness)


def test_a_retry_after_too_long_to_read_is_waited_as_the_cap(harness, hours):
    # 5,000 digits are more than int() converts: the wait is the longest allowed (three
    # times CLAZAR_TIMEOUT_SECONDS: 4.5 s here), then the retry.
    env = one_hour(harness, hours)
    harness.clazar.faults.append(status(503, retry_after="9" * 5000))
    result = harness.run(env={**env, "CLAZAR_MAX_RETRIES": "1", "CLAZAR_TIMEOUT_SECONDS": "1.5"})
    assert result.returncode == 0, result.output
    assert "a defect" not in result.output and "unexpected" not in result.output.lower(), result.output
    assert harness.clazar.metering_calls == 2
    assert sum(harness.clazar.accepted_quantities().values()) == 2


# --- masking: cut, then masked --------------------------------------------------------------------------


def test_an_address_straddling_the_cut_of_an_error_body_is_not_kept_in_part(harness, hours):
    env = one_hour(harness, hours)
    # The stand-in sends {"detail": "<body>"}: 12 bytes, then the body. The address starts at byte 282.
    harness.clazar.faults.append(status(400, body="x" * 270 + "jane.doe.buyer@customer-domain.example"))
    result = harness.run(env={**env, "CLAZAR_MAX_RETRIES": "0"})
    assert result.returncode == 1, result.output
    error = deployment(harness)["last_run"]["error"]
    assert "HTTP 400" in error and "[email]" in error
    for text in (error, result.output, harness.run("status").output, harness.state_bytes().decode()):
        assert "jane.doe.buyer" not in text, text


def test_a_secret_straddling_the_cut_of_a_rejection_is_not_kept_in_part(harness, hours):
    secret = harness.clazar.client_secret
    env = one_hour(harness, hours)
    harness.clazar.rejected_contracts["c-1"] = "y" * 980 + "echo " + secret
    result = harness.run(env={**env, "CLAZAR_MAX_RETRIES": "0"})
    assert result.returncode == 1, result.output
    ledger = ledger_text(harness, hours[0])
    assert '"outcome": "rejected"' in ledger
    assert secret[:12] not in ledger, ledger
    assert "[redacted]" in ledger
    for text in (result.output, harness.state_bytes().decode(), harness.report("conflicts").output,
                 harness.report("history", "--contract", "c-1", "--from", iso(hours[0]), "--to", iso(hours[0]),
                                "--json").output):
        assert secret[:12] not in text, text


def test_a_token_in_a_record_id_does_not_reach_the_ledger(harness, hours):
    standin = harness.clazar
    original = standin._meter

    def meter(records):
        results = original(records)
        for entry in results:
            entry["id"] = f"{standin.issued_tokens[-1]} ops@buyer.example"
        return results

    standin._meter = meter
    env = one_hour(harness, hours)
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    lines = harness.ledger_lines()
    assert lines and lines[0]["outcome"] == "delivered"
    kept = json.dumps(lines)
    assert standin.issued_tokens[-1] not in kept and "ops@buyer.example" not in kept, kept


def test_a_json_escaped_secret_in_an_error_body_is_masked(harness, hours):
    secret = 'pa"ss\\word-0123456789'
    harness.clazar.client_secret = secret
    harness.env["CLAZAR_CLIENT_SECRET"] = secret
    env = one_hour(harness, hours)
    # The stand-in answers {"detail": "<body>"} as JSON: the echoed secret arrives as pa\"ss\\word-0123456789.
    harness.clazar.faults.append(status(400, body=f"credentials {secret} are not allowed here"))
    result = harness.run(env={**env, "CLAZAR_MAX_RETRIES": "0"})
    assert result.returncode == 1, result.output
    error = deployment(harness)["last_run"]["error"]
    assert "HTTP 400" in error and "[redacted]" in error
    escaped = json.dumps(secret)[1:-1]
    for text in (error, result.output, harness.run("status").output, harness.state_bytes().decode()):
        assert "word-0123456789" not in text, text
    assert escaped not in harness.state_bytes().decode()


def test_a_huge_refusal_is_not_read_before_it_is_retried(harness, hours):
    # urllib3 reads a 5xx answer before it retries: 1.26 into memory, whole; 2.x to its end.
    flood = Flood(b"503 Service Unavailable", b"Retry-After: 0\r\n")
    try:
        env = one_hour(harness, hours)
        # Retry-After: 0 leaves the waits to the backoff, a twentieth of CLAZAR_TIMEOUT_SECONDS, doubling.
        result = harness.run(env={**env, "CLAZAR_API_URL": f"http://127.0.0.1:{flood.port}/metering/",
                                  "CLAZAR_MAX_RETRIES": "2"}, timeout=300)
    finally:
        flood.close()
    assert result.returncode == 1 and "HTTP 503" in result.output, result.output
    assert flood.connections == 3
    assert flood.request_lines == [b"POST /authenticate/ HTTP/1.1"] * 3, flood.request_lines
    assert flood.sent < 96 * 2**20, f"the client read {flood.sent} bytes of three answers"


def trickle_forever(stop):
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        try:
            while not stop.is_set():
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass
    return answer


def many_records(harness, hours, count):
    harness.write_hour(hours[0], {f"sub-{i:010d}": [cpu(hours[0], f"c-{i}", f"sub-{i:010d}", 1)]
                                  for i in range(count)})
    harness.write_marker(hours.final(1))
    return {"START_HOUR": iso(hours[0])}


def test_an_abandoned_exchange_is_not_waited_again_by_every_batch(harness, hours):
    # Eight batches, one sender: each would wait its own 3 s for the token, one after another.
    stop = threading.Event()
    auth = Recorder("127.0.0.1", answer=trickle_forever(stop))
    try:
        env = many_records(harness, hours, 8)
        # Four requests are in flight at once; the batches queue for the token behind the first.
        ended, code, output = run_or_kill(harness, {**env, "CLAZAR_API_URL": auth.url + "/metering/",
                                                    "CLAZAR_TIMEOUT_SECONDS": "1", "CLAZAR_MAX_RETRIES": "0",
                                                    "CLAZAR_BATCH_SIZE": "1"}, 60)
    finally:
        stop.set()
        auth.close()
    assert ended and code == 1, output
    assert len(auth.requests) == 1, output
    assert "Clazar is not asked again in this run" in output
    assert "pending_hour" in deployment(harness)
    # Nothing left: every record is one never sent, resent by the next run.
    assert [line["outcome"] for line in harness.ledger_lines()] == [mp.UNSENT] * 8


def test_a_stop_while_waiting_for_a_trickled_answer_ends_within_the_stop_timeout(harness, hours):
    stop = threading.Event()
    auth = Recorder("127.0.0.1", answer=trickle_forever(stop))
    timeout = 3  # STOP_TIMEOUT_SECONDS, shorter than the default 10
    try:
        env = many_records(harness, hours, 8)
        process = harness.popen(env={**env, "CLAZAR_API_URL": auth.url + "/metering/",
                                     "CLAZAR_TIMEOUT_SECONDS": "5", "CLAZAR_BATCH_SIZE": "1",
                                     "STOP_TIMEOUT_SECONDS": str(timeout)})
        waited = time.monotonic() + 30
        while not auth.requests and time.monotonic() < waited:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        try:
            output, _ = process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        took = time.monotonic() - asked
    finally:
        stop.set()
        auth.close()
    assert took < timeout + 2, f"ended {took:.0f} s after the stop\n{output}"
    assert process.returncode == mp.ExitCode.STOPPED, output
    assert [line for line, _, _ in auth.requests] == ["POST /authenticate/ HTTP/1.1"]
    assert "pending_hour" in deployment(harness)


@pytest.mark.parametrize("variable", ["http://127.0.0.1_proxy", "all://127.0.0.1_proxy", "HTTP_PROXY", "ALL_PROXY"])
def test_no_proxy_variable_routes_plain_http_through_a_proxy(harness, hours, variable):
    # requests turns every *_proxy variable into a proxy, "http://127.0.0.1_proxy" into one
    # for that host alone (such a name cannot be exported by a shell, but can be set).
    proxy = Recorder("127.0.0.2")
    try:
        env = one_hour(harness, hours)
        seaweed = harness.env["AWS_ENDPOINT_URL_S3"].replace("127.0.0.1", "localhost")
        result = harness.run(env={**env, variable: proxy.url, "no_proxy": "localhost", "AWS_ENDPOINT_URL_S3": seaweed,
                                  "CLAZAR_MAX_RETRIES": "0"})
    finally:
        proxy.close()
    assert proxy.requests == [], proxy.everything()
    assert result.returncode == 0, result.output


def test_a_netrc_entry_neither_replaces_the_token_nor_reaches_clazar(harness, hours, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login someone password netrc-password\n")
    os.chmod(home / ".netrc", 0o600)
    env = one_hour(harness, hours)
    result = harness.run(env={**env, "HOME": str(home), "CLAZAR_MAX_RETRIES": "0"})
    assert result.returncode == 0, result.output
    assert sum(harness.clazar.accepted_quantities().values()) == 2


@pytest.mark.parametrize("echo", [
    lambda text: json.dumps(text).replace("/", "\\/"),             # PHP's json_encode
    lambda text: json.dumps(text).replace("\\u00e9", "\\u00E9"),    # upper-case escapes
    lambda text: json.dumps(json.dumps(text)),                      # a JSON text inside another
    lambda text: quote(text),                                       # a URL, / kept
    lambda text: quote_plus(text),
    lambda text: html.escape(text),
])
def test_an_escaped_form_of_a_secret_is_masked(echo):
    secret = "Zq8/k+Lm9 \u00e9\"xYz0"
    mp.redact(secret)
    try:
        masked = mp.mask_secrets("unknown credentials " + echo(secret) + " here")
    finally:
        del mp._SECRETS[secret]
    assert "Zq8" not in masked and "Lm9" not in masked and "xYz0" not in masked, masked
