"""A stand-in for the Clazar API, written from the project's Clazar reference.

It authenticates with client id and secret, issues bearer tokens, and accepts
metering records the way Clazar is known to: one record per contract, dimension
and hour, a second one answered with the "same contract_id ... same hour" error,
unregistered dimensions answered with a bare ``fail`` status, unknown contracts
with an error. It checks every request strictly against the documented format
and remembers what it accepted, so tests can ask whether every expected
(contract, dimension, hour) was accepted exactly once.

Faults can be scripted for the next metering calls: an HTTP status (with or
without Retry-After), a hang, the connection reset after the records landed, a
200 without results, tokens revoked, or a callback run while the request is held.
``chaos``, when set, picks a fault (or none) for every call nothing is scripted for.

Run it alone (for the demo and the benchmark):
    python tests/clazar_standin.py --port 8765 [--delay 0.03]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

RECORD_FIELDS = {"cloud", "contract_id", "dimension", "start_time", "end_time", "quantity"}
OPTIONAL_FIELDS = {"custom_properties"}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
DUPLICATE_ERROR = "Metering record with same contract_id, dimension and same hour already exists"


class Fault:
    """One scripted misbehaviour, used for the next metering call."""

    def __init__(self, kind: str, **options: Any):
        self.kind = kind
        self.options = options

    def __repr__(self) -> str:
        return f"Fault({self.kind!r}, {self.options!r})"


def status(code: int, retry_after: str | None = None, body: str | None = None) -> Fault:
    """Answer ``code``; ``body``, if given, is sent as the answer's text, with
    ``{authorization}`` replaced by the request's Authorization header (a server
    echoing the token back)."""
    return Fault("status", code=code, retry_after=retry_after, body=body)


def hang(seconds: float) -> Fault:
    return Fault("hang", seconds=seconds)


def reset_after_landing() -> Fault:
    return Fault("reset_after_landing")


def no_results(land: bool = True) -> Fault:
    return Fault("no_results", land=land)


def short_results() -> Fault:
    return Fault("short_results")


def revoke_tokens() -> Fault:
    return Fault("revoke_tokens")


def call(function: Callable[[list], None], before_landing: bool = False, respond: bool = True) -> Fault:
    """Run ``function(records)`` while the request is held, before or after the records land;
    with ``respond=False`` the connection is then dropped without an answer."""
    return Fault("call", function=function, before_landing=before_landing, respond=respond)


class ClazarStandIn:
    def __init__(
        self,
        *,
        client_id: str = "standin-client-id",
        client_secret: str = "standin-client-secret-0123456789",
        expires_in: int = 3600,
        registered_dimensions: set[str] | None = None,
        known_contracts: set[str] | None = None,
        delay: float = 0.0,
        max_batch: int | None = 25,
        port: int = 0,
    ):
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.registered_dimensions = registered_dimensions
        self.known_contracts = known_contracts
        self.rejected_contracts: dict[str, str] = {}
        self.delay = delay
        self.max_batch = max_batch
        self.lock = threading.Lock()
        self.tokens: set[str] = set()
        self.issued_tokens: list[str] = []
        self.accepted: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.received: list[tuple[dict, str]] = []
        self.violations: list[str] = []
        self.faults: deque[Fault] = deque()
        # When no fault is scripted: a function that may pick one for each metering call.
        self.chaos: Callable[[], Fault | None] | None = None
        self.auth_faults: deque[Fault] = deque()
        self.metering_calls = 0
        self.auth_calls = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None
        self.scheme = "http"

    def use_tls(self, certificate: str, key: str) -> ClazarStandIn:
        """Serve HTTPS with the given certificate (call before start)."""
        from servers import serve_tls

        self.scheme = serve_tls(self.server, certificate, key)
        return self

    # --- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    @property
    def metering_url(self) -> str:
        return self.url + "/metering/"

    @property
    def auth_url(self) -> str:
        return self.url + "/authenticate/"

    def start(self) -> ClazarStandIn:
        # A short poll: stop() waits for the next one.
        self.thread = threading.Thread(target=self.server.serve_forever, name="clazar-standin",
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ClazarStandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- what tests ask ----------------------------------------------------

    def accepted_keys(self) -> set[tuple[str, str, str]]:
        with self.lock:
            return set(self.accepted)

    def accepted_quantities(self) -> dict[tuple[str, str, str], int]:
        with self.lock:
            return {key: int(value["quantity"]) for key, value in self.accepted.items()}

    def successes(self) -> list[dict]:
        """Every record answered with success, in order. Each key appears at most once by construction."""
        with self.lock:
            return [record for record, outcome in self.received if outcome == "success"]

    def outcomes(self) -> list[str]:
        with self.lock:
            return [outcome for _, outcome in self.received]

    def revoke(self) -> None:
        with self.lock:
            self.tokens.clear()

    # --- the protocol ------------------------------------------------------

    def _authenticate(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or set(body) != {"client_id", "client_secret"}:
            self.violations.append(f"authenticate body has keys {sorted(body) if isinstance(body, dict) else body!r}")
            return 400, {"detail": "client_id and client_secret are required"}
        if body["client_id"] != self.client_id or body["client_secret"] != self.client_secret:
            return 401, {"detail": "Invalid client credentials"}
        token = secrets.token_urlsafe(32)
        self.tokens.add(token)
        self.issued_tokens.append(token)
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}

    def _check_record(self, record: Any) -> str | None:
        if not isinstance(record, dict):
            return f"record is not an object: {record!r}"
        keys = set(record)
        if not RECORD_FIELDS <= keys or keys - RECORD_FIELDS - OPTIONAL_FIELDS:
            return f"record has keys {sorted(keys)}"
        if record["cloud"] not in ("aws", "azure", "gcp"):
            return f"cloud {record['cloud']!r}"
        try:
            start = datetime.strptime(record["start_time"], TIME_FORMAT)
            end = datetime.strptime(record["end_time"], TIME_FORMAT)
        except (TypeError, ValueError):
            return f"times {record['start_time']!r}..{record['end_time']!r} are not YYYY-MM-DDTHH:MM:SSZ"
        if start.minute or start.second or end - start != timedelta(hours=1):
            return f"times {record['start_time']}..{record['end_time']} are not one aligned hour"
        quantity = record["quantity"]
        if not isinstance(quantity, str) or not re.fullmatch(r"[0-9]+", quantity):
            return f"quantity {quantity!r} is not a string of a non-negative integer"
        if int(quantity) == 0:
            return "quantity is zero"
        if not isinstance(record["contract_id"], str) or not record["contract_id"]:
            return "contract_id is empty"
        return None

    def _meter(self, records: list[dict]) -> list[dict]:
        """Decide each record's fate, as Clazar does, and remember what was accepted."""
        results = []
        for record in records:
            entry = {**record, "custom_properties": record.get("custom_properties", {})}
            key = (record["contract_id"], record["dimension"], record["start_time"])
            if self.known_contracts is not None and record["contract_id"] not in self.known_contracts:
                entry.update(status="fail", errors=[f"Contract {record['contract_id']} not found"])
            elif record["contract_id"] in self.rejected_contracts:
                message = self.rejected_contracts[record["contract_id"]]
                entry.update(status="fail", errors=[{"code": "invalid", "message": message}])
            elif self.registered_dimensions is not None and record["dimension"] not in self.registered_dimensions:
                entry.update(status="fail")
            elif key in self.accepted:
                entry.update(status="fail", errors=[DUPLICATE_ERROR])
            else:
                entry.update(status="success", id=str(uuid.uuid4()))
                self.accepted[key] = entry
            self.received.append((dict(record), "success" if entry["status"] == "success" else
                                  "duplicate" if key in self.accepted else "rejected"))
            results.append(entry)
        return results

    def _handler_class(self) -> type:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; without this, Nagle and delayed ACKs add 40 ms a call.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def do_GET(self) -> None:
                if self.path == "/_standin/accepted":
                    with standin.lock:
                        self._reply(200, list(standin.accepted.values()))
                else:
                    self._reply(404, {"detail": "Not found."})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if len(raw) < length:
                    return self._drop()  # the client died mid-request (a test killed it): nothing arrived
                if standin.delay:
                    time.sleep(standin.delay)
                try:
                    body = json.loads(raw)
                except ValueError:
                    standin.violations.append(f"{self.path}: body is not JSON")
                    return self._reply(400, {"detail": "JSON parse error"})
                if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                    standin.violations.append(f"{self.path}: Content-Type {self.headers.get('Content-Type')!r}")
                if self.path == "/authenticate/":
                    return self._authenticate_request(body)
                if self.path == "/metering/":
                    return self._metering_request(body)
                standin.violations.append(f"POST to unknown path {self.path}")
                self._reply(404, {"detail": "Not found."})

            def _authenticate_request(self, body: Any) -> None:
                with standin.lock:
                    standin.auth_calls += 1
                    fault = standin.auth_faults.popleft() if standin.auth_faults else None
                if fault is not None and fault.kind == "status":
                    return self._reply(fault.options["code"], {"detail": "scripted"})
                with standin.lock:
                    code, answer = standin._authenticate(body)
                self._reply(code, answer)

            def _metering_request(self, body: Any) -> None:
                with standin.lock:
                    standin.metering_calls += 1
                    fault = standin.faults.popleft() if standin.faults else standin.chaos() if standin.chaos else None
                if fault is not None and fault.kind == "revoke_tokens":
                    standin.revoke()
                    fault = None
                authorization = self.headers.get("Authorization", "")
                with standin.lock:
                    authorized = authorization.startswith("Bearer ") and authorization[7:] in standin.tokens
                if not authorized:
                    return self._reply(401, {"detail": "Authentication credentials were not provided or are invalid."})
                if fault is not None and fault.kind == "status":
                    headers = {"Retry-After": fault.options["retry_after"]} if fault.options["retry_after"] else {}
                    body = fault.options.get("body")
                    answer = body.replace("{authorization}", authorization) if body else "scripted failure"
                    return self._reply(fault.options["code"], {"detail": answer}, headers)
                if fault is not None and fault.kind == "hang":
                    time.sleep(fault.options["seconds"])
                    return self._drop()
                records = body.get("request") if isinstance(body, dict) else None
                if not isinstance(records, list) or not records:
                    standin.violations.append(f"metering body is not {{'request': [records]}}: {str(body)[:200]}")
                    return self._reply(400, {"detail": "request must be a non-empty list"})
                if standin.max_batch is not None and len(records) > standin.max_batch:
                    standin.violations.append(f"batch of {len(records)} records")
                    return self._reply(400, {"detail": "too many records"})
                for record in records:
                    problem = standin._check_record(record)
                    if problem:
                        standin.violations.append(problem)
                        return self._reply(400, {"detail": problem})
                calling = fault is not None and fault.kind == "call"
                if calling and fault.options["before_landing"]:
                    fault.options["function"](records)
                if fault is not None and fault.kind == "no_results" and not fault.options["land"]:
                    return self._reply(200, {"detail": "accepted"})
                with standin.lock:
                    results = standin._meter(records)
                if calling:
                    if not fault.options["before_landing"]:
                        fault.options["function"](records)
                    if not fault.options["respond"]:
                        return self._drop()
                if fault is not None and fault.kind == "reset_after_landing":
                    return self._drop()
                if fault is not None and fault.kind == "no_results":
                    return self._reply(200, {"detail": "accepted"})
                if fault is not None and fault.kind == "short_results":
                    return self._reply(200, {"results": results[:-1]})
                self._reply(200, {"results": results})

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every call")
    parser.add_argument("--client-id", default="standin-client-id")
    parser.add_argument("--client-secret", default="standin-client-secret-0123456789")
    arguments = parser.parse_args()
    standin = ClazarStandIn(client_id=arguments.client_id, client_secret=arguments.client_secret,
                            delay=arguments.delay, port=arguments.port)
    print(f"Clazar stand-in listening on {standin.url}", flush=True)
    try:
        standin.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
