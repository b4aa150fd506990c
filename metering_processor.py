#!/usr/bin/env python3
"""Export Omnistrate usage-metering data from S3 to Clazar, one final hour at a time.

Run it hourly (cron, a systemd timer, a Kubernetes CronJob). For every configured
service key (``service:environment:plan``) it works out which hours Omnistrate has
finished exporting, reads that hour's files from S3, sums the usage per marketplace
contract and dimension, and sends one metering record for each to Clazar.

Clazar accepts one record per contract, dimension and hour and refuses any later
correction, so the run is built around three rules:

* an hour is read only once the export marker declares it final;
* an hour is sent whole or not at all: a bad file fails the hour before anything
  of it is sent;
* the outgoing records of an hour are written to the state before the first
  request, and a crashed hour is resent from the state, never recomputed.

Exit codes: 0 done, 1 an hour failed or a record was rejected, 2 configuration
error, 3 another run holds the lock, 4 the state could not be read or written,
5 stopped by SIGTERM or SIGINT (nothing partial committed; an hour whose records
were recorded as pending stays pending and the next run completes it).
"""

from __future__ import annotations

import argparse
import ast
import base64
import concurrent.futures
import contextlib
import contextvars
import csv
import dataclasses
import errno
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable
from urllib.parse import urlsplit
from collections.abc import Iterable, Iterator, Mapping, Sequence

__version__ = "1.0.0"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 3
EXIT_STATE = 4
EXIT_STOPPED = 5

log = logging.getLogger("metering")


class MeteringError(Exception):
    """Base of every error this module raises on purpose; carries the exit code."""

    exit_code = EXIT_FAILED


# Characters that could end a log line, move the cursor or restyle a terminal, or
# reorder what is shown: C0 and C1 controls, DEL, Unicode line and paragraph
# separators and bidirectional overrides; and lone surrogates, which JSON can
# carry (\\ud800) but no UTF-8 stream can write.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def escape_control(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``),
    so that text from data can never start a line of its own or drive a terminal."""
    if not CONTROL_CHARACTERS.search(text):
        return text
    return CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


def shown_text(value: Any, limit: int = 80) -> str:
    """A short, quoted, escaped rendering of a value from outside, for error messages."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (dict, list)):
        text = type(value).__name__
    else:
        try:
            text = str(value)
        except ValueError:  # an int beyond Python's 4,300-digit string limit
            text = f"a {type(value).__name__} of {value.bit_length()} bits"
    return repr(text[:limit]) + (f" (and {len(text) - limit} more characters)" if len(text) > limit else "")


# JSON from outside (export files, the marker, the state, the ledger, Clazar's
# answers) is read through parse_json: a repeated field, NaN or Infinity, or
# nesting deeper than MAX_JSON_DEPTH is refused, and every failure, the parser's
# own recursion limit included, is one ValueError saying what is wrong.
MAX_JSON_DEPTH = 32


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"holds the field {shown_text(name)} twice in one object")
            seen.add(name)
    return fields


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether ``document`` nests lists and objects more than ``limit`` levels deep.
    Iterative: a deep document must not exhaust the stack here either."""
    containers = {dict, list}
    stack = [(document, 1)] if type(document) in containers else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        # Most objects hold only scalars: isdisjoint over map() tells so without a Python loop.
        if not containers.isdisjoint(map(type, children)):
            stack.extend((child, depth + 1) for child in children if type(child) in containers)
    return False


def parse_json(body: bytes | str, **hooks: Callable[[str], Any]) -> Any:
    """Parse UTF-8 JSON text at a cost bounded by its size.

    ``hooks`` are json.loads's parse_float and parse_int. Raises ValueError, its
    message a phrase to follow the name of what was read ("is not valid JSON ..."),
    for text that is not UTF-8 or not JSON, NaN or Infinity, a field repeated in
    one object, or nesting deeper than MAX_JSON_DEPTH.
    """
    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
    except UnicodeDecodeError as error:
        raise ValueError(f"is not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_fields, parse_constant=_reject_constant, **hooks)
    except RecursionError:
        document = None
    except ValueError as error:
        problem = str(error)
        raise ValueError(problem if problem.startswith("holds the field") else f"is not valid JSON ({problem})") from None
    else:
        if not _deeper_than(document, MAX_JSON_DEPTH):
            return document
    raise ValueError(f"is nested more than {MAX_JSON_DEPTH} levels deep")


class RunStopped(BaseException):
    """SIGTERM or SIGINT asked the run to stop, and it stopped at a safe point.

    A BaseException, like KeyboardInterrupt, so that no handler meant for a bad
    file, a failed hour or an unreachable store takes it for one of those.
    """

    exit_code = EXIT_STOPPED
    # When raised while sending: each record's result, None where no answer came.
    answered: list = []


class StopRequest:
    """SIGTERM and SIGINT turned into a flag the run looks at where stopping is safe:
    between services and hours, before an hour's records are recorded as pending,
    before each batch is sent, between files read, before a retry; and, in the
    commands that only read, between hours and ledger files.

    Handlers are installed explicitly because Python's defaults do not fit: SIGINT
    raises KeyboardInterrupt wherever the run happens to be, and SIGTERM has no
    handler at all, so as PID 1 in a container (where the kernel drops signals
    without one) it is ignored until SIGKILL.

    A flag cannot interrupt a call that never returns (boto3 waits 60 s per attempt
    on an S3 that accepts connections and never answers, four attempts), so a
    watchdog bounds the stop: deadline_seconds (STOP_TIMEOUT_SECONDS) after the
    first signal, a process still running writes what it can (see ``when_overdue``)
    and ends with EXIT_STOPPED. Ending there is as safe as SIGKILL, which the
    state's design survives at every step: every state and ledger write replaces a
    whole file or object or nothing, and an S3 lease left behind lapses by itself.
    """

    POLL_SECONDS = 0.2
    # How long a stop may take in all, whatever S3 or Clazar do, unless
    # STOP_TIMEOUT_SECONDS says otherwise (see set_timeout).
    DEFAULT_TIMEOUT_SECONDS = 10.0

    def __init__(self) -> None:
        self._event = threading.Event()
        # Set by a stop request and by uninstall: what the watchdog waits for.
        self._wake = threading.Event()
        self.reason = ""
        self._last_words: Callable[[], None] | None = None
        self._watchdog: threading.Thread | None = None
        self._previous_handlers: dict[int, Any] = {}
        self.set_timeout(self.DEFAULT_TIMEOUT_SECONDS)

    def set_timeout(self, seconds: float) -> None:
        """How long a stop may take in all (deadline_seconds); of it, half for answers to
        batches already in flight (grace_seconds: an hour whose every batch is answered
        is committed whole instead of resent), and a fifth for the last words (the
        metrics) once the run has not stopped by itself (last_words_seconds)."""
        self.deadline_seconds = seconds
        self.grace_seconds = seconds / 2
        self.last_words_seconds = seconds / 5

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on, and start the watchdog (only the main thread can)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[number] = signal.signal(number, self._receive)
        if self._watchdog is None:
            # Started now, not from the handler: a handler may run while the main thread
            # holds a lock that starting a thread needs.
            self._watchdog = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
            self._watchdog.start()

    def uninstall(self) -> None:
        """Put back the signal handlers install found and end the watchdog, for a caller
        whose process goes on after main returns. Only when no stop was asked for: after
        one, main ends the process itself."""
        if self._event.is_set():
            return
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.join()

    def _receive(self, number: int, frame: Any) -> None:
        # Only set the flag: a handler runs between two bytecodes of the main thread,
        # possibly inside a state write or a log call.
        self.request(signal.Signals(number).name)

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()
        self._wake.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, where: str) -> None:
        """Raise RunStopped, saying ``where`` the run stopped, once a stop was asked for."""
        if self._event.is_set():
            raise RunStopped(f"{self.reason} received: stopped {where}")

    def result(self, future: concurrent.futures.Future, where: str) -> Any:
        """``future.result()``, or RunStopped as soon as a stop is asked for."""
        while True:
            try:
                return future.result(timeout=self.POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                self.check(where)

    def when_overdue(self, last_words: Callable[[], None] | None) -> None:
        """What the watchdog runs before ending an overdue stop: write the metrics. It runs
        on another thread while the main one may be anywhere, and gets last_words_seconds."""
        self._last_words = last_words

    def _watch(self) -> None:
        self._wake.wait()
        if not self._event.is_set():
            return  # uninstalled: main returned without a stop
        time.sleep(self.deadline_seconds - self.last_words_seconds)
        # Still here: the main thread is held by a call no flag reaches. Whatever the
        # last words do (log, write, push), they must not hold up the exit either.
        speaker = threading.Thread(target=self._say_last_words, name="stop-last-words", daemon=True)
        speaker.start()
        speaker.join(self.last_words_seconds)
        os._exit(EXIT_STOPPED)

    def _say_last_words(self) -> None:
        log.warning("%s received, but the run had not stopped %.0f s later: a call to S3 or Clazar is not answering. "
                    "Ending it now (exit %d): no hour is committed in part, a pending hour stays pending for the "
                    "next run, and an S3 lease left behind lapses by itself after STATE_LOCK_TTL_SECONDS",
                    self.reason, self.deadline_seconds - self.last_words_seconds, EXIT_STOPPED)
        if self._last_words is not None:
            try:
                self._last_words()
            except Exception as error:  # the exit comes regardless
                log.warning("Could not write the metrics before ending: %s: %s", type(error).__name__, error)
        flush_output()


def flush_output() -> None:
    """Flush the log handlers and the standard streams, before os._exit skips Python's own shutdown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


STOP = StopRequest()


# ---------------------------------------------------------------------------
# 1. Configuration: read and validate the environment once.
# ---------------------------------------------------------------------------


class ConfigError(MeteringError):
    """A missing or invalid setting. The message names the variable."""

    exit_code = EXIT_CONFIG

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


DEFAULT_API_URL = "https://api.clazar.io/metering/"
CLOUDS = ("aws", "azure", "gcp")
# How long after an hour each marketplace still accepts its usage: AWS refuses
# usage 6 hours or more after the fact, Azure takes the past 24 hours; GCP is
# the strictest commonly quoted.
LATENESS_WINDOWS = {"aws": 6, "azure": 24, "gcp": 1}
# The largest quantity one usage record may carry: AWS Marketplace's
# UsageRecord.Quantity is a 32-bit integer. No limit is known for Azure or GCP.
RECORD_QUANTITY_LIMITS = {"aws": 2**31 - 1, "azure": None, "gcp": None}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Omnistrate's documented dimensions. Formulas may name these (and any listed in
# OMNISTRATE_DIMENSIONS); a dimension outside the list still passes through when
# no formulas are configured.
OMNISTRATE_DIMENSIONS = (
    "cpu_core_hours",
    "memory_byte_hours",
    "storage_allocated_byte_hours",
    "replica_hours",
)

# Every variable the exporter reads, with its default, for --help and the README.
SETTINGS = (
    ("S3_BUCKET_NAME", "(required)", "bucket holding omnistrate-metering/"),
    ("SERVICE_NAME", "(required unless SERVICES)", "Omnistrate service name"),
    ("ENVIRONMENT_TYPE", "(required unless SERVICES)", "PROD, DEV, ..."),
    ("PLAN_ID", "(required unless SERVICES)", "product tier id, pt-..."),
    ("SERVICES", "(unset)", "comma-separated service:environment:plan keys"),
    ("CLAZAR_CLIENT_ID", "(required unless dry run)", "Clazar API client id"),
    ("CLAZAR_CLIENT_SECRET", "(required unless dry run)", "Clazar API client secret"),
    ("CLAZAR_CLIENT_SECRET_FILE", "(unset)", "a file holding the secret instead (a systemd credential, a mounted secret)"),
    ("CLAZAR_CLOUD", "aws", "aws, azure or gcp"),
    ("CLAZAR_API_URL", DEFAULT_API_URL, "metering endpoint"),
    ("CLAZAR_AUTH_URL", "origin of CLAZAR_API_URL + /authenticate/", "token endpoint"),
    ("CLAZAR_BATCH_SIZE", "25", "records per request"),
    ("CLAZAR_CONCURRENCY", "4", "requests in flight at once"),
    ("CLAZAR_MAX_RETRIES", "5", "retries per request on errors, 429 and 5xx"),
    ("CLAZAR_TIMEOUT_SECONDS", "20", "read timeout of one request"),
    ("CLAZAR_BACKOFF_SECONDS", "1", "backoff factor: waits 0, 2x, 4x, 8x ... this"),
    ("CLAZAR_RETRY_AFTER_MAX_SECONDS", "60", "longest Retry-After honoured"),
    ("STATE_FILE_PATH", "./metering_state.json", "state document: a path or s3://bucket/key"),
    ("STATE_LOCK_TTL_SECONDS", "900", "lease of an S3 state lock; renewed while running"),
    ("STOP_TIMEOUT_SECONDS", "10",
     "longest a stop may take; lower it where SIGKILL follows SIGTERM sooner (docker stop -t 5)"),
    ("S3_READ_CONCURRENCY", "32", "export files read at once"),
    ("READ_AHEAD_HOURS", "2", "hours read while the current one is sent (1 for hours of 1,000+ files)"),
    ("MAX_HOURS_PER_RUN", "24", "hours per service per run"),
    ("MAX_EXPORT_FILE_BYTES", "67108864 (64 MiB)", "an export file larger than this fails its hour"),
    ("START_HOUR", "current hour - 24 h", "first hour ever sent; no earlier hour is sent"),
    ("EXPORT_MARKER_LAG_MINUTES", "0", "extra wait after the marker declares an hour final"),
    ("EXPORT_STALE_HOURS", "3", "status warns when the marker's data is older than this"),
    ("LATENESS_WINDOW_HOURS", "aws 6, azure 24, gcp 1", "warn when an hour is sent later than this after it ended"),
    ("LEDGER_PATH", "metering_ledger/ beside the state", "audit ledger: a folder or s3://bucket/prefix"),
    ("LEDGER_RETENTION_DAYS", "400", "days of ledger kept"),
    ("LATE_USAGE", "report", "report, or carry: bill usage found late with the next hour"),
    ("LATE_USAGE_LOOKBACK_HOURS", "24", "processed hours checked each run for files added or rewritten since"),
    ("MAX_RECORD_QUANTITY", "aws 2147483647, azure and gcp none", "largest quantity of one record; a larger one fails its hour"),
    ("DRY_RUN", "false", "true: read and print, send and save nothing"),
    ("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("LOG_FORMAT", "text", "text, or json: one object per line"),
    ("METRICS_FILE", "(unset)", "Prometheus textfile written at the end of each run"),
    ("METRICS_PUSHGATEWAY_URL", "(unset)", "Pushgateway the same metrics are pushed to at the end of each run"),
    ("METRICS_PUSHGATEWAY_INSTANCE", "(unset)", "instance label of the push's grouping key"),
    ("OMNISTRATE_DIMENSIONS", ",".join(OMNISTRATE_DIMENSIONS), "names formulas may use"),
    ("DIMENSION<n>_NAME", "(unset)", "billing dimension n sent to Clazar"),
    ("DIMENSION<n>_FORMULA", "(unset)", "its formula over Omnistrate dimensions"),
)


@dataclass(frozen=True)
class ServiceKey:
    """One exported plan: the marker's key and the export's folder."""

    service: str
    environment: str
    plan: str

    @property
    def key(self) -> str:
        return f"{self.service}:{self.environment}:{self.plan}"

    @property
    def label(self) -> str:
        return f"{self.service}/{self.environment}/{self.plan}"


@dataclass(frozen=True)
class Config:
    """Every setting of one run, validated. Built only by ``load_config``."""

    bucket: str
    services: tuple[ServiceKey, ...]
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    cloud: str
    api_url: str
    auth_url: str
    batch_size: int
    send_concurrency: int
    max_retries: int
    timeout_seconds: float
    backoff_seconds: float
    retry_after_max_seconds: float
    state_path: str
    ledger_path: str
    ledger_retention_days: int
    late_usage: str
    late_lookback_hours: int
    max_record_quantity: int | None
    lock_ttl_seconds: int
    read_concurrency: int
    read_ahead_hours: int
    max_hours_per_run: int
    max_export_file_bytes: int
    start_hour: datetime | None
    marker_lag: timedelta
    lateness_window: timedelta
    dry_run: bool
    log_level: str
    log_format: str
    metrics_file: str | None
    source_dimensions: tuple[str, ...]
    formulas: tuple[Formula, ...]
    export_stale_hours: int
    pushgateway_url: str | None
    pushgateway_instance: str | None
    stop_timeout_seconds: int


class _Environment:
    """Typed access to environment variables; every failure names the variable."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.environ.get(name, "").strip()
        return value if value else default

    def required(self, name: str, why: str = "is required") -> str:
        value = self.text(name)
        if value is None:
            raise ConfigError(name, f"{why} (it is unset or empty)")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        """A whole number from ``minimum`` to ``maximum``; the error states that range."""
        raw = self.text(name)
        if raw is None:
            return default
        wanted = f"a whole number from {minimum} to {maximum}"
        # Only ASCII digits: int() also takes other scripts' digits, and a long text costs time.
        if len(raw) > 20 or not re.fullmatch(r"[+-]?[0-9]+", raw):
            raise ConfigError(name, f"must be {wanted}, got {shown_text(raw)}")
        value = int(raw)
        if not minimum <= value <= maximum:
            raise ConfigError(name, f"must be {wanted}, got {value}")
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        """A decimal number from ``minimum`` to ``maximum``; the error states that range."""
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw) if len(raw) <= 40 else math.nan
        except ValueError:
            value = math.nan
        if not minimum <= value <= maximum:  # NaN and infinities fail this too
            raise ConfigError(name, f"must be a number from {minimum:g} to {maximum:g}, got {shown_text(raw)}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, choices: Sequence[str], *, upper: bool = False) -> str:
        raw = self.text(name, default)
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}, got {raw!r}")
        return value


def parse_service_keys(text: str, variable: str = "SERVICES") -> tuple[ServiceKey, ...]:
    """Parse ``service:environment:plan[,...]``.

    The service name may contain spaces and colons (environment and plan never do),
    so each item is split on its last two colons. Raises ConfigError on an item that
    is not three non-empty parts, a part holding ``/``, or a repeated key.
    """
    keys: list[ServiceKey] = []
    for item in text.split(","):
        if not item.strip():
            continue
        parts = [part.strip() for part in item.rsplit(":", 2)]
        if len(parts) != 3 or not all(parts):
            raise ConfigError(variable, f"{item.strip()!r} is not of the form service:environment:plan")
        if any("/" in part for part in parts):
            raise ConfigError(variable, f"{item.strip()!r}: a part contains '/', which cannot appear in an S3 folder name here")
        key = ServiceKey(*parts)
        if key in keys:
            raise ConfigError(variable, f"{key.key!r} is listed twice")
        keys.append(key)
    if not keys:
        raise ConfigError(variable, "lists no service")
    return tuple(keys)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(variable: str, url: str, carries_credentials: bool, allow_userinfo: bool = False) -> Any:
    """Check a URL with urllib3's parser, the one requests connects by, and return its parts.

    Raises ConfigError naming ``variable`` for anything but an http(s) URL with a
    host: a backslash, a user name or password (userinfo) unless ``allow_userinfo``,
    whitespace or control characters, a port outside 1-65535, or plain http:// to a
    host that is not loopback when credentials travel (userinfo is credentials
    too). Parsers disagree on such URLs (urlsplit
    reads ``http://a:1\\@127.0.0.1/`` as loopback, urllib3 connects to ``a``), so
    they are refused rather than interpreted.
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    if "\\" in url:
        raise ConfigError(variable, "must not contain a backslash, which URL parsers read differently")
    if re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ConfigError(variable, f"must not contain spaces or control characters, got {shown_text(url)}")
    try:
        parts = parse_url(url)
    except LocationParseError:
        raise ConfigError(variable, f"is not a URL urllib3 can parse (is the port from 1 to 65535?): {shown_text(url)}") from None
    if parts.auth is not None or "@" in (parts.netloc or ""):
        if not allow_userinfo:
            # Never echo it: userinfo is where a password would be.
            raise ConfigError(variable, "must not carry a user name or password (user@ or user:password@ before the host)")
        carries_credentials = True
    if parts.scheme not in ("https", "http") or not parts.host:
        raise ConfigError(variable, f"must be an http(s) URL with a host, got {shown_text(url)}")
    if parts.port is not None and not 1 <= parts.port <= 65535:
        raise ConfigError(variable, f"has port {parts.port}; a port must be from 1 to 65535")
    if carries_credentials and parts.scheme == "http" and not _is_loopback(parts.host):
        raise ConfigError(
            variable,
            f"uses plain http:// to {parts.host}; credentials and tokens would travel unencrypted, use https://",
        )
    return parts


def split_s3_url(path: str) -> tuple[str, str] | None:
    """(bucket, key or prefix) of an ``s3://bucket/key`` path; None for a local path."""
    if not path.startswith("s3://"):
        return None
    bucket, _, key = path[len("s3://"):].partition("/")
    return bucket, key


def _state_path(path: str) -> str:
    s3 = split_s3_url(path)
    if s3:
        bucket, key = s3
        if not bucket or not key or key.endswith("/"):
            raise ConfigError("STATE_FILE_PATH", f"must be s3://bucket/key with a key that names an object, got {path!r}")
        if key.startswith(EXPORT_ROOT):
            raise ConfigError("STATE_FILE_PATH", f"must not lie under {EXPORT_ROOT}, which Omnistrate writes")
    return path


def _ledger_path(path: str | None, state_path: str) -> str:
    """LEDGER_PATH, or a folder named metering_ledger beside the state."""
    if path is None:
        s3 = split_s3_url(state_path)
        if s3:
            bucket, key = s3
            folder = key.rpartition("/")[0]
            return f"s3://{bucket}/{folder + '/' if folder else ''}metering_ledger"
        return os.path.join(os.path.dirname(state_path) or ".", "metering_ledger")
    s3 = split_s3_url(path)
    if s3:
        bucket, prefix = s3
        if not bucket:
            raise ConfigError("LEDGER_PATH", f"must be s3://bucket/prefix or a folder, got {path!r}")
        if prefix.startswith(EXPORT_ROOT):
            raise ConfigError("LEDGER_PATH", f"must not lie under {EXPORT_ROOT}, which Omnistrate writes")
    return path.rstrip("/")


def _client_secret(env: _Environment, required: bool) -> str:
    """The Clazar client secret: CLAZAR_CLIENT_SECRET, or the file CLAZAR_CLIENT_SECRET_FILE names
    (a systemd credential, a mounted Kubernetes or Docker secret), stripped of surrounding whitespace.

    When not ``required`` (a dry run, a read-only command) the file is not read. Raises
    ConfigError when both variables are set, or, when required, when neither is, or the
    file cannot be read, is empty or holds more than one line. No message quotes the secret.
    """
    path = env.text("CLAZAR_CLIENT_SECRET_FILE")
    if path is not None and env.text("CLAZAR_CLIENT_SECRET") is not None:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE", "is set together with CLAZAR_CLIENT_SECRET; set only one of them")
    if path is None:
        if required:
            return env.required("CLAZAR_CLIENT_SECRET", "is required to send (or use --dry-run)")
        return env.text("CLAZAR_CLIENT_SECRET", "")
    if not required:
        return ""
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().strip()
    except OSError as error:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE", f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE", f"{path} is not UTF-8 text") from None
    if not secret or "\n" in secret:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE", f"{path} must hold the secret on one line (it holds "
                          f"{'nothing' if not secret else 'several lines'})")
    return secret


def load_config(environ: Mapping[str, str], *, dry_run: bool | None = None, sends: bool = True) -> Config:
    """Read every setting from ``environ``. Raises ConfigError naming the first bad variable.

    ``dry_run`` from the command line overrides ``DRY_RUN``. A dry run needs no
    Clazar credentials, and sends none; nor does a command that never ``sends``.
    """
    env = _Environment(environ)
    bucket = env.required("S3_BUCKET_NAME")

    services_text = env.text("SERVICES")
    if services_text is not None:
        services = parse_service_keys(services_text)
    else:
        why = "is required when SERVICES is not set"
        services = (
            ServiceKey(env.required("SERVICE_NAME", why), env.required("ENVIRONMENT_TYPE", why), env.required("PLAN_ID", why)),
        )
        # Validate the three parts the same way SERVICES items are validated.
        parse_service_keys(services[0].key, "SERVICE_NAME/ENVIRONMENT_TYPE/PLAN_ID")

    is_dry_run = env.flag("DRY_RUN", False) if dry_run is None else dry_run
    if is_dry_run or not sends:
        client_id = env.text("CLAZAR_CLIENT_ID", "")
    else:
        client_id = env.required("CLAZAR_CLIENT_ID", "is required to send (or use --dry-run)")
    client_secret = _client_secret(env, required=sends and not is_dry_run)

    credentials_travel = sends and not is_dry_run
    api_url = env.text("CLAZAR_API_URL", DEFAULT_API_URL)
    origin = _check_url("CLAZAR_API_URL", api_url, credentials_travel)
    auth_url = env.text("CLAZAR_AUTH_URL", f"{origin.scheme}://{origin.netloc}/authenticate/")
    _check_url("CLAZAR_AUTH_URL", auth_url, credentials_travel)

    start_text = env.text("START_HOUR")
    start_hour = None
    if start_text is not None:
        try:
            start_hour = parse_utc(start_text)
        except ValueError:
            raise ConfigError("START_HOUR", f"must be a UTC hour from {format_time(EARLIEST_TIME)} to "
                              f"{format_time(LATEST_TIME - HOUR)}, like 2025-07-23T16:00:00Z, "
                              f"got {shown_text(start_text)}") from None
        if start_hour != floor_hour(start_hour):
            raise ConfigError("START_HOUR", f"must fall on a whole hour, got {shown_text(start_text)}")

    source_dimensions = tuple(
        name.strip() for name in env.text("OMNISTRATE_DIMENSIONS", ",".join(OMNISTRATE_DIMENSIONS)).split(",") if name.strip()
    )
    for name in source_dimensions:
        if not name.isidentifier():
            raise ConfigError("OMNISTRATE_DIMENSIONS", f"{name!r} is not a valid dimension name")

    cloud = env.choice("CLAZAR_CLOUD", "aws", CLOUDS)
    state_path = _state_path(env.text("STATE_FILE_PATH", "./metering_state.json"))
    return Config(
        bucket=bucket,
        services=services,
        client_id=client_id,
        client_secret=client_secret,
        cloud=cloud,
        api_url=api_url,
        auth_url=auth_url,
        batch_size=env.integer("CLAZAR_BATCH_SIZE", 25, 1, 1000),
        send_concurrency=env.integer("CLAZAR_CONCURRENCY", 4, 1, 64),
        max_retries=env.integer("CLAZAR_MAX_RETRIES", 5, 0, 20),
        timeout_seconds=env.number("CLAZAR_TIMEOUT_SECONDS", 20.0, 0.1, 600.0),
        backoff_seconds=env.number("CLAZAR_BACKOFF_SECONDS", 1.0, 0.0, 60.0),
        retry_after_max_seconds=env.number("CLAZAR_RETRY_AFTER_MAX_SECONDS", 60.0, 0.0, 3600.0),
        state_path=state_path,
        ledger_path=_ledger_path(env.text("LEDGER_PATH"), state_path),
        ledger_retention_days=env.integer("LEDGER_RETENTION_DAYS", 400, 1, 36500),
        late_usage=env.choice("LATE_USAGE", "report", ("report", "carry")),
        late_lookback_hours=env.integer("LATE_USAGE_LOOKBACK_HOURS", 24, 0, 24 * 400),
        max_record_quantity=(env.integer("MAX_RECORD_QUANTITY", 0, 1, MAX_VALUE) if env.text("MAX_RECORD_QUANTITY")
                             else RECORD_QUANTITY_LIMITS[cloud]),
        lock_ttl_seconds=env.integer("STATE_LOCK_TTL_SECONDS", 900, 5, 86400),
        read_concurrency=env.integer("S3_READ_CONCURRENCY", 32, 1, 256),
        read_ahead_hours=env.integer("READ_AHEAD_HOURS", 2, 0, 8),
        max_hours_per_run=env.integer("MAX_HOURS_PER_RUN", 24, 1, 24 * 366),
        max_export_file_bytes=env.integer("MAX_EXPORT_FILE_BYTES", DEFAULT_MAX_EXPORT_FILE_BYTES, 1024, 2**30),
        start_hour=start_hour,
        marker_lag=timedelta(minutes=env.integer("EXPORT_MARKER_LAG_MINUTES", 0, 0, 24 * 60)),
        lateness_window=timedelta(hours=env.integer("LATENESS_WINDOW_HOURS", LATENESS_WINDOWS[cloud], 1, 24 * 400)),
        dry_run=is_dry_run,
        log_level=env.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=env.choice("LOG_FORMAT", "text", ("text", "json")),
        metrics_file=env.text("METRICS_FILE"),
        source_dimensions=source_dimensions,
        formulas=load_formulas(environ, source_dimensions),
        export_stale_hours=env.integer("EXPORT_STALE_HOURS", 3, 1, 24 * 400),
        pushgateway_url=_pushgateway_url(env.text("METRICS_PUSHGATEWAY_URL")),
        pushgateway_instance=env.text("METRICS_PUSHGATEWAY_INSTANCE"),
        stop_timeout_seconds=env.integer("STOP_TIMEOUT_SECONDS",
                                         int(StopRequest.DEFAULT_TIMEOUT_SECONDS), 2, 300),
    )


def _pushgateway_url(url: str | None) -> str | None:
    """METRICS_PUSHGATEWAY_URL without its trailing slash. Raises ConfigError if it is
    not an http(s) URL with a host (see _check_url). Plain http is allowed, as metrics
    carry no secret, unless the URL carries a user and password for basic auth."""
    if url is None:
        return None
    _check_url("METRICS_PUSHGATEWAY_URL", url, carries_credentials=False, allow_userinfo=True)
    return url.rstrip("/")


def metrics_targets_despite_error(environ: Mapping[str, str], dry_run: bool | None
                                  ) -> tuple[str | None, str | None, str | None] | None:
    """Where a run whose configuration was refused still publishes its exit status:
    (METRICS_FILE, METRICS_PUSHGATEWAY_URL, METRICS_PUSHGATEWAY_INSTANCE), or None for nowhere.

    Nowhere when it may be a dry run (``dry_run`` from the command line, or DRY_RUN
    not unset or false): a one-off check must not replace what the hourly run
    published. The Pushgateway URL only when it passes the check it gets at start-up,
    so a refused one (plain http with a password, a backslash) is never contacted.
    Never raises.
    """
    env = _Environment(environ)
    try:
        if env.flag("DRY_RUN", False) if dry_run is None else dry_run:
            return None
    except ConfigError:  # neither true nor false: it may be a dry run
        return None
    try:
        pushgateway_url = _pushgateway_url(env.text("METRICS_PUSHGATEWAY_URL"))
    except ConfigError:
        pushgateway_url = None
    return env.text("METRICS_FILE"), pushgateway_url, env.text("METRICS_PUSHGATEWAY_INSTANCE")


# ---------------------------------------------------------------------------
# 2. Hours: which hours are due. Pure functions of the state, marker and clock.
# ---------------------------------------------------------------------------


class MarkerError(MeteringError):
    """The export marker cannot tell whether an hour is final."""


HOUR = timedelta(hours=1)
_TIME_PATTERN = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2})(?::(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE | re.ASCII,
)
# Every time the exporter accepts, from a variable, the marker, the state or the
# ledger, lies in this range: far from datetime's limits, so adding an hour or a
# day to it, or a retention of days, can never overflow.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(3000, 1, 1, tzinfo=timezone.utc)


def parse_utc(text: str) -> datetime:
    """Parse an ISO 8601 time into an aware UTC datetime; a time with no offset is UTC.

    Fractions of a second are dropped. Raises ValueError on anything else, and on a
    time before EARLIEST_TIME or from LATEST_TIME on.
    """
    match = _TIME_PATTERN.match(text.strip()) if isinstance(text, str) and len(text) <= 64 else None
    if not match:
        raise ValueError(f"not an ISO 8601 time: {shown_text(text)}")
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                          tzinfo=timezone.utc)
        if offset and offset.upper() != "Z":
            sign = 1 if offset[0] == "+" else -1
            digits = offset[1:].replace(":", "")
            moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    except (ValueError, OverflowError) as error:
        raise ValueError(f"not a valid time: {shown_text(text)} ({error})") from None
    if not EARLIEST_TIME <= moment < LATEST_TIME:
        raise ValueError(f"{shown_text(text)} is outside {format_time(EARLIEST_TIME)} .. {format_time(LATEST_TIME)}")
    return moment


def format_time(moment: datetime) -> str:
    """The wire and state format of a time: ``YYYY-MM-DDTHH:MM:SSZ``, in UTC."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def display_hour(hour: datetime) -> str:
    """The log format of an hour, as the original script printed it."""
    return hour.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ExportMarker:
    """Omnistrate's ``last_success_export.json``: per service key, the end of final data."""

    processed_to: Mapping[str, datetime]
    updated_at: Mapping[str, datetime]
    # Entries that are not the documented shape, with what is wrong: each fails
    # only its own service.
    problems: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: bytes, where: str) -> ExportMarker:
        """Parse the marker. Raises MarkerError naming ``where`` if it is not a JSON object;
        an entry that is not the documented shape is kept as a problem of its key."""
        try:
            document = parse_json(body)
        except ValueError as error:
            raise MarkerError(f"export marker {where} is not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise MarkerError(f"export marker {where} is not a JSON object")
        processed_to, updated_at, problems = {}, {}, {}
        for key, entry in document.items():
            try:
                if not isinstance(entry, dict) or "last_processed_to" not in entry:
                    raise ValueError("has no last_processed_to")
                processed_to[key] = parse_utc(entry["last_processed_to"])
                if entry.get("last_updated_at"):
                    updated_at[key] = parse_utc(entry["last_updated_at"])
            except ValueError as error:
                processed_to.pop(key, None)
                problems[key] = f"export marker {where}: entry {shown_text(key)}: {error}"
        return cls(processed_to, updated_at, problems)

    def final_before(self, service_key: str, lag: timedelta = timedelta(0)) -> datetime:
        """The moment before which exported data of ``service_key`` is final.

        ``last_processed_to`` is the inclusive end of exported data (it ends in :59),
        so data is final strictly before it plus one second, less the configured lag.
        Raises MarkerError naming the key and the keys present if it is missing: that
        service must wait, not be treated as empty.
        """
        if service_key in self.problems:
            raise MarkerError(self.problems[service_key])
        if service_key not in self.processed_to:
            present = sorted(self.processed_to)
            shown = ", ".join(shown_text(key) for key in present[:20]) + (" ..." if len(present) > 20 else "")
            raise MarkerError(
                f"export marker has no entry for {service_key!r}; it holds {len(present)} key(s): {shown or 'none'}"
            )
        return self.processed_to[service_key] + timedelta(seconds=1) - lag


def first_due_hour(last_processed_hour: datetime | None, start_hour: datetime | None,
                   pinned_first_hour: datetime | None, now: datetime) -> datetime:
    """The next hour to process.

    After the last processed hour; for a service that has processed none, START_HOUR,
    else the first hour pinned in its state by its first run, else a day before
    ``now`` (which that first run pins: a start that moved with the clock would
    skip a first hour that failed). START_HOUR is also a floor: no earlier hour is
    ever sent, so moving it forward skips hours on purpose.
    """
    if last_processed_hour is not None:
        following = last_processed_hour + HOUR
        return max(following, start_hour) if start_hour is not None else following
    if start_hour is not None:
        return start_hour
    if pinned_first_hour is not None:
        return pinned_first_hour
    return floor_hour(now) - 24 * HOUR


def due_end(now: datetime, final_before: datetime | None) -> datetime:
    """The first hour that is not yet due: hour H is due when H+1h <= now and H+1h <= final_before."""
    end = floor_hour(now)
    if final_before is not None:
        end = min(end, floor_hour(final_before - HOUR) + HOUR)
    return end


def due_hours(first: datetime, now: datetime, final_before: datetime | None, limit: int) -> list[datetime]:
    """The hours to process this run, oldest first, at most ``limit``."""
    count = hours_between(first, due_end(now, final_before))
    return [first + i * HOUR for i in range(min(count, limit))]


def hours_between(first: datetime, end: datetime) -> int:
    """How many whole hours lie in [first, end); 0 when end is not after first."""
    return max(0, int((end - first) // HOUR))


# ---------------------------------------------------------------------------
# 3. Source: listing and reading an hour's export files in S3.
# ---------------------------------------------------------------------------


class SourceError(MeteringError):
    """An export object could not be listed or read."""


EXPORT_ROOT = "omnistrate-metering/"
MARKER_KEY = EXPORT_ROOT + "last_success_export.json"


def hour_prefix(service: ServiceKey, hour: datetime) -> str:
    """The folder of one hour; ends in '/' so hour 1 never matches hour 10."""
    return f"{EXPORT_ROOT}{service.service}/{service.environment}/{service.plan}/{hour:%Y/%m/%d/%H}/"


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True)
class HourListing:
    files: list[str]
    ignored: list[str]
    digest: str
    # Each export file's size as the listing gives it, to refuse a file too large
    # before reading it.
    sizes: Mapping[str, int] = field(default_factory=dict)


DEFAULT_MAX_EXPORT_FILE_BYTES = 64 * 2**20


def oversized_file(listing: HourListing, limit: int) -> str | None:
    """The problem with the first export file of ``listing`` larger than ``limit`` bytes, or None."""
    for key in listing.files:
        size = listing.sizes.get(key, 0)
        if size > limit:
            return f"{key}: {size} bytes, more than MAX_EXPORT_FILE_BYTES ({limit} bytes); the file was not read"
    return None


# The digest of an hour with no export file.
EMPTY_LISTING = hashlib.sha256().hexdigest()[:32]


class ExportSource:
    """Reads the Omnistrate export of one bucket. The only code that touches it.

    Reads share one pool of ``workers`` threads over one boto3 client whose
    connection pool is as large, however many hours are being read at once.
    """

    def __init__(self, client: Any, bucket: str, workers: int = 16, max_file_bytes: int = DEFAULT_MAX_EXPORT_FILE_BYTES):
        self.client = client
        self.bucket = bucket
        self.workers = workers
        self.max_file_bytes = max_file_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="s3-read")

    def close(self) -> None:
        # After a stop, reads still in flight are left to end with the process.
        self._pool.shutdown(wait=not STOP.is_set(), cancel_futures=True)

    def read_marker(self) -> ExportMarker | None:
        """The completion marker, or None if the bucket has none.

        Raises MarkerError if it exists but cannot be read or parsed: a denied or
        broken marker must stop the service, never count as absent.
        """
        where = f"s3://{self.bucket}/{MARKER_KEY}"
        try:
            body = self._get(MARKER_KEY)
        except SourceError as error:
            raise MarkerError(f"export marker {where}: {error}") from None
        except Exception as error:
            if _error_code(error) in ("NoSuchKey", "404"):
                return None
            raise MarkerError(f"cannot read export marker {where}: {error}") from None
        return ExportMarker.parse(body, where)

    def _get(self, key: str) -> bytes:
        """The body of ``key``, read no further than ``max_file_bytes``.

        Raises SourceError if the object is larger (it may have grown since it was
        listed), and boto3's own errors.
        """
        answer = self.client.get_object(Bucket=self.bucket, Key=key)
        with contextlib.closing(answer["Body"]) as stream:
            size = answer.get("ContentLength")
            if isinstance(size, int) and size > self.max_file_bytes:
                raise SourceError(f"{key}: {size} bytes, more than MAX_EXPORT_FILE_BYTES ({self.max_file_bytes} bytes)")
            body = stream.read(self.max_file_bytes + 1)
        if len(body) > self.max_file_bytes:
            raise SourceError(f"{key}: more than MAX_EXPORT_FILE_BYTES ({self.max_file_bytes} bytes)")
        return body

    def list_hour(self, prefix: str) -> HourListing:
        """Every key under ``prefix``, paginated, and a digest of the export files' keys and ETags.

        The digest changes when a file is added, removed or rewritten, which is how
        usage arriving after its hour was billed is noticed.
        """
        files, ignored, sizes, fingerprint = [], [], {}, hashlib.sha256()
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    name = key[len(prefix):]
                    if name.endswith(".json") and "/" not in name:
                        files.append(key)
                        sizes[key] = item.get("Size", 0)
                        # Listing order is by key, so the digest does not depend on paging.
                        fingerprint.update(f"{name}\t{item.get('ETag', '')}\n".encode())
                    else:
                        ignored.append(key)
        except Exception as error:
            raise SourceError(f"cannot list s3://{self.bucket}/{prefix}: {error}") from None
        return HourListing(files, ignored, fingerprint.hexdigest()[:32], sizes)

    def read(self, key: str) -> bytes:
        """The body of one export file. Raises SourceError if it cannot be read or is too large."""
        try:
            return self._get(key)
        except SourceError:
            raise
        except Exception as error:
            raise SourceError(f"cannot read s3://{self.bucket}/{key}: {error}") from None

    def read_all(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (key, body) for every key, read concurrently, in completion order.

        At most twice the pool size of reads are queued, in flight or waiting to be
        taken, so memory stays bounded however many files an hour holds. The first
        failure is raised and the reads still queued are cancelled. Raises
        RunStopped between two files once a stop is asked for.
        """
        window = 2 * self.workers
        pending: set[concurrent.futures.Future] = set()
        try:
            for key in keys:
                STOP.check("while reading the export")
                pending.add(self._pool.submit(lambda k=key: (k, self.read(k))))
                if len(pending) >= window:
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            for future in concurrent.futures.as_completed(pending):
                pending.discard(future)
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


# ---------------------------------------------------------------------------
# 4. Aggregation, formulas and the carried remainders: pure, exact arithmetic.
# ---------------------------------------------------------------------------


class ExportFileError(MeteringError):
    """An export file is not what Omnistrate documents. The message names its S3 key."""


class FormulaError(MeteringError):
    """A dimension formula cannot be computed for a contract and hour."""


class QuantityError(MeteringError):
    """A record's quantity is larger than its marketplace accepts."""


# Omnistrate's own query casts value to BIGINT; anything larger is corrupt data.
MAX_VALUE = 2**63 - 1
# An export number is converted exactly only when its text is at most this long,
# below 10**21 and with at most MAX_DECIMAL_PLACES decimal places: 1e999999999
# would otherwise take 10**999999999 to hold, and 1e-99999 a 100,000-digit
# denominator. Every double an export could hold as usage fits.
MAX_NUMBER_TEXT = 40
MAX_DECIMAL_PLACES = 40
# Contract ids and dimensions are sent to Clazar and written everywhere; longer
# ones, or ones holding control characters, are corrupt data.
MAX_NAME_LENGTH = 256


class NumberOutOfRange:
    """A JSON number too long, too large or too fine to convert exactly at a bounded cost."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


def _bounded_integer(text: str) -> int | NumberOutOfRange:
    return int(text) if len(text) <= MAX_NUMBER_TEXT else NumberOutOfRange(text)


def _bounded_decimal(text: str) -> Decimal | NumberOutOfRange:
    """The Decimal of a JSON number with a fraction or exponent, checked from its text first."""
    if len(text) > MAX_NUMBER_TEXT:
        return NumberOutOfRange(text)
    try:
        number = Decimal(text)
    except ArithmeticError:  # an exponent beyond what Decimal holds
        return NumberOutOfRange(text)
    exponent = number.as_tuple().exponent
    if number.adjusted() > 20 or exponent < -MAX_DECIMAL_PLACES:
        return NumberOutOfRange(text)
    return number


def _shown_json(value: Any) -> str:
    """A field's value as JSON, cut short, for error messages."""
    if isinstance(value, (dict, list)):
        return "a JSON " + ("object" if isinstance(value, dict) else "array")
    text = value.text if isinstance(value, NumberOutOfRange) else json.dumps(
        value[:41] if isinstance(value, str) else value, default=str)
    return text[:40] + ("..." if len(text) > 40 else "")


def _export_number(record: Mapping[str, Any], name: str, where: str) -> int | Fraction:
    """``record[name]`` exactly, or raise ExportFileError naming ``where``: it must be
    a JSON number from 0 to MAX_VALUE with at most MAX_DECIMAL_PLACES decimal places."""
    value = _exact_number(record.get(name))
    if value is None or not 0 <= value <= MAX_VALUE:
        raise ExportFileError(f"{where}: {name} {_shown_json(record.get(name))} is not a finite non-negative number "
                              f"within 64 bits (at most {MAX_DECIMAL_PLACES} decimal places)")
    return value


def billing_name_problem(text: str) -> str | None:
    """What is wrong with a contract id or dimension, or None: at most MAX_NAME_LENGTH
    characters, no control characters and no lone surrogates."""
    if len(text) > MAX_NAME_LENGTH:
        return f"is {len(text)} characters long, more than {MAX_NAME_LENGTH}"
    if CONTROL_CHARACTERS.search(text):
        return f"{escape_control(shown_text(text))} holds control characters or lone surrogates"
    return None


def _check_billing_name(where: str, name: str, text: str) -> None:
    """Raise ExportFileError naming ``where`` if billing_name_problem finds one in ``text``."""
    problem = billing_name_problem(text)
    if problem:
        raise ExportFileError(f"{where}: {name} {problem}")


def _exact_number(value: Any) -> int | Fraction | None:
    """The exact value of a JSON number (floats arrive as Decimal), or None if not a number.

    Whole numbers stay ints: an hour of 5,000 files holds 40,000 of them.
    """
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return None
    if isinstance(value, int):
        return value
    if not value.is_finite():
        return None
    exact = Fraction(value)
    return exact.numerator if exact.denominator == 1 else exact


def _identity_part(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int)) else json.dumps(value, sort_keys=True, default=str)


@dataclass
class FileUsage:
    """What one export file contributes to its hour, reduced to what billing needs."""

    rows: list[tuple[tuple, str, str, int | Fraction, int | Fraction]]
    records: int = 0
    unattributable: int = 0
    unattributed_subscriptions: set[str] = field(default_factory=set)
    fractional: int = 0


def parse_export_file(key: str, body: bytes, *, with_prices: bool = False) -> FileUsage:
    """Validate one export file and reduce it to billable rows.

    Each row is (identity, contract, dimension, value, price total) where identity is
    (contract, subscriptionId, instanceId, podName, hostName, dimension), for de-duplication.
    Records with no externalPayerId or dimension are counted as unattributable.

    Raises ExportFileError naming ``key`` if the body is not a UTF-8 JSON array of
    objects (see parse_json: no repeated field, at most MAX_JSON_DEPTH levels), a
    record's value is missing or not a finite non-negative number no larger than a
    64-bit integer with at most MAX_DECIMAL_PLACES decimal places (or, ``with_prices``,
    its pricePerUnit is not), or its externalPayerId or dimension is not a string,
    is longer than MAX_NAME_LENGTH or holds control characters. Numbers are checked
    from their text before any exact conversion, so every file costs time in
    proportion to its size.
    """
    if body[:2] == b"\x1f\x8b":
        raise ExportFileError(f"{key}: gzip-compressed bytes, expected plain UTF-8 JSON")
    try:
        records = parse_json(body, parse_float=_bounded_decimal, parse_int=_bounded_integer)
    except ValueError as error:
        raise ExportFileError(f"{key} {error}") from None
    if not isinstance(records, list):
        raise ExportFileError(f"{key}: expected a JSON array of records, found a JSON {type(records).__name__}")
    usage = FileUsage(rows=[], records=len(records))
    for index, record in enumerate(records):
        where = f"{key}: record {index}"
        if not isinstance(record, dict):
            raise ExportFileError(f"{where} is a JSON {type(record).__name__}, not an object")
        if "value" not in record:
            raise ExportFileError(f"{where} has no value")
        value = _export_number(record, "value", where)
        price: int | Fraction = 0
        if with_prices and record.get("pricePerUnit") is not None:
            price = value * _export_number(record, "pricePerUnit", where)
        contract = record.get("externalPayerId")
        dimension = record.get("dimension")
        for name, text in (("externalPayerId", contract), ("dimension", dimension)):
            if text is not None and not isinstance(text, str):
                raise ExportFileError(f"{where}: {name} is a JSON {type(text).__name__}, not a string")
        if value.denominator != 1:
            usage.fractional += 1
        contract = (contract or "").strip()
        dimension = (dimension or "").strip()
        _check_billing_name(where, "externalPayerId", contract)
        _check_billing_name(where, "dimension", dimension)
        if not contract or not dimension:
            usage.unattributable += 1
            usage.unattributed_subscriptions.add(str(record.get("subscriptionId") or key.rsplit("/", 1)[-1]))
            continue
        # The contract leads the identity: rows of two contracts never collapse into
        # one, even when both lack the subscription, instance, pod and host.
        identity = tuple(_identity_part(record.get(name)) for name in ("subscriptionId", "instanceId", "podName", "hostName"))
        usage.rows.append(((contract, *identity, dimension), contract, dimension, value, price))
    return usage


@dataclass
class HourUsage:
    """The usage of one service for one hour, folded in file by file.

    A row repeated for the same contract, subscription, instance, pod, host and
    dimension counts once, at its largest value, as Omnistrate's reference query does.
    """

    hour: datetime
    prefix: str = ""
    sources: str = ""
    files: int = 0
    records: int = 0
    ignored: list[str] = field(default_factory=list)
    unattributable: int = 0
    unattributed_subscriptions: set[str] = field(default_factory=set)
    repeated: int = 0
    fractional: int = 0
    rows: dict[tuple, tuple[str, str, int | Fraction, int | Fraction]] = field(default_factory=dict)
    # One copy of each distinct string: identities repeat their parts row after row.
    _shared: dict[Any, Any] = field(default_factory=dict, repr=False)

    def add(self, usage: FileUsage) -> None:
        share = self._shared.setdefault
        self.files += 1
        self.records += usage.records
        self.unattributable += usage.unattributable
        self.unattributed_subscriptions |= usage.unattributed_subscriptions
        self.fractional += usage.fractional
        for identity, contract, dimension, value, price in usage.rows:
            identity = tuple(share(part, part) for part in identity)
            seen = self.rows.get(identity)
            if seen is not None:
                self.repeated += 1
                if seen[2] >= value:
                    continue
            self.rows[identity] = (share(contract, contract), share(dimension, dimension), value, price)

    def release(self) -> None:
        """Drop the rows once they are summed: an hour of 5,000 files holds 40,000."""
        self.rows, self._shared = {}, {}

    def totals(self) -> dict[tuple[str, str], int | Fraction]:
        """Exact usage per (contract, dimension)."""
        totals: dict[tuple[str, str], int | Fraction] = {}
        for contract, dimension, value, _ in self.rows.values():
            totals[contract, dimension] = totals.get((contract, dimension), 0) + value
        return totals

    def price_totals(self) -> dict[tuple[str, str], int | Fraction]:
        """Exact sum of value x pricePerUnit per (contract, dimension)."""
        totals: dict[tuple[str, str], int | Fraction] = {}
        for contract, dimension, _, price in self.rows.values():
            totals[contract, dimension] = totals.get((contract, dimension), 0) + price
        return totals


# --- Formulas ---------------------------------------------------------------
#
# A formula is parsed once at start-up with Python's ``ast`` and checked node by
# node against an allow-list; it is then evaluated by walking that tree with
# Fractions. Nothing is ever compiled or executed, so a formula cannot run code.

PRICE_SUFFIX = "_total_price"
MAX_FORMULA_LENGTH = 1000
MAX_EXPONENT = 64
MAX_ROUND_DIGITS = 20
# Every value a formula computes, intermediate or final, has a numerator and a
# denominator below 2**MAX_FORMULA_BITS (about 308 digits), whatever the nesting:
# each step is checked before the next, and a power before it is computed, so no
# formula can take unbounded time or memory, and a quantity always fits in text.
MAX_FORMULA_BITS = 1024


class _ValueTooLarge(Exception):
    pass


def _bounded(value: Any) -> Any:
    """``value`` (an int or a Fraction) if it is within MAX_FORMULA_BITS; else raise _ValueTooLarge."""
    if isinstance(value, int):
        bits = value.bit_length()
    else:
        bits = max(value.numerator.bit_length(), value.denominator.bit_length())
    if bits > MAX_FORMULA_BITS:
        raise _ValueTooLarge
    return value


def _power(base: Any, exponent: int) -> Any:
    # |a**e| has at least e * (bits(a) - 1) + 1 bits: refuse before computing it.
    bits = max(Fraction(base).numerator.bit_length(), Fraction(base).denominator.bit_length())
    if abs(exponent) * (bits - 1) > MAX_FORMULA_BITS:
        raise _ValueTooLarge
    return Fraction(base) ** exponent


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: Fraction(a) / b,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: lambda a, b: Fraction(a) % b,
    ast.Pow: _power,
}
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None, str]] = {
    # name: (function, fewest arguments, most arguments or None, how that reads)
    "min": (min, 2, None, "two or more arguments"),
    "max": (max, 2, None, "two or more arguments"),
    "abs": (abs, 1, 1, "one argument"),
    "round": (round, 1, 2, "one or two arguments"),
}


@dataclass(frozen=True)
class Formula:
    """One configured billing dimension: its name, its source text and its checked tree."""

    variable: str
    name: str
    text: str
    tree: ast.expr = field(repr=False, compare=False)

    def evaluate(self, values: Mapping[str, Fraction]) -> Fraction:
        """Evaluate with exact arithmetic. Raises FormulaError on division by zero, or when
        any value it computes (or is given) is beyond MAX_FORMULA_BITS."""
        try:
            return Fraction(_evaluate(self.tree, values))
        except ZeroDivisionError:
            raise FormulaError(f"{self.variable} ({self.name} = {self.text}) divides by zero") from None
        except _ValueTooLarge:
            raise FormulaError(f"{self.variable} ({self.name} = {self.text}) computes a value beyond "
                               f"2**{MAX_FORMULA_BITS} (numerator or denominator)") from None


def _evaluate(node: ast.expr, values: Mapping[str, Fraction]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _bounded(values.get(node.id, Fraction(0)))
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        return _bounded(_BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values)))
    function = _FUNCTIONS[node.func.id][0]  # after checking, the only node left is a Call
    return _bounded(function(*(_evaluate(argument, values) for argument in node.args)))


def _exponent(node: ast.expr) -> int | None:
    """The value of an integer literal, optionally negated; None for anything else."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    return None


def compile_formula(variable: str, name: str, text: str, names: frozenset[str]) -> Formula:
    """Parse and check one formula.

    The grammar: numbers, the given names, + - * / // % **, parentheses, unary
    minus, and the functions min, max, abs and round. Raises ConfigError naming
    ``variable`` for anything else, for ** with anything but a whole-number
    literal exponent of at most MAX_EXPONENT, for round digits other than a
    literal within MAX_ROUND_DIGITS, and for a literal beyond MAX_FORMULA_BITS.
    Evaluation bounds every value (see Formula.evaluate), so no formula can take
    unbounded time.
    """
    source = text.strip()
    if len(source) > MAX_FORMULA_LENGTH:
        raise ConfigError(variable, f"is longer than {MAX_FORMULA_LENGTH} characters")
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ConfigError(variable, f"is not a valid formula: {getattr(error, 'msg', error)}") from None
    return Formula(variable, name, source, _checked(tree, variable, source, names, 0))


def _checked(node: ast.AST, variable: str, source: str, names: frozenset[str], depth: int) -> ast.expr:
    """``node`` if every part of it is in the grammar, with literals made exact."""

    def refuse(problem: str) -> ConfigError:
        return ConfigError(variable, problem)

    def check(child: ast.AST) -> ast.expr:
        return _checked(child, variable, source, names, depth + 1)

    if depth > 50:
        raise refuse("is nested too deeply")
    if isinstance(node, ast.Constant):
        if type(node.value) is int:
            value: Any = node.value
        elif type(node.value) is float and math.isfinite(node.value):
            # repr is the shortest text that reads back as the literal: 0.01 becomes exactly 1/100.
            value = Fraction(repr(node.value))
        else:
            raise refuse(f"may only contain numbers, not {shown_text(node.value)}")
        try:
            return ast.copy_location(ast.Constant(_bounded(value)), node)
        except _ValueTooLarge:
            raise refuse(f"holds a number beyond 2**{MAX_FORMULA_BITS}") from None
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise refuse(f"uses unknown name {node.id!r}; known: {', '.join(sorted(names))}")
        return node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node.operand = check(node.operand)
        return node
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        if isinstance(node.op, ast.Pow):
            exponent = _exponent(node.right)
            if exponent is None or abs(exponent) > MAX_EXPONENT:
                raise refuse(f"** needs a whole-number literal exponent from -{MAX_EXPONENT} to {MAX_EXPONENT}")
            if isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Pow):
                raise refuse("a power of a power is not allowed; write the exponent out")
            node.right = ast.copy_location(ast.Constant(exponent), node.right)
        else:
            node.right = check(node.right)
        node.left = check(node.left)
        return node
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        _, fewest, most, arity = _FUNCTIONS[node.func.id]
        count = len(node.args)
        if node.keywords or count < fewest or (most is not None and count > most) or any(
            isinstance(argument, ast.Starred) for argument in node.args
        ):
            raise refuse(f"{node.func.id}() takes {arity}")
        if node.func.id == "round" and count == 2:
            digits = _exponent(node.args[1])
            if digits is None or abs(digits) > MAX_ROUND_DIGITS:
                raise refuse(f"round()'s second argument must be a whole-number literal from -{MAX_ROUND_DIGITS} "
                             f"to {MAX_ROUND_DIGITS}")
        node.args = [check(argument) for argument in node.args]
        return node
    shown = ast.get_source_segment(source, node) or type(node).__name__
    raise refuse(f"may not contain {shown!r} ({type(node).__name__}); see --help for the formula grammar")


_DIMENSION_VARIABLE = re.compile(r"^DIMENSION([1-9][0-9]*)_(NAME|FORMULA)$")
MAX_DIMENSION_NUMBER = 999
_DIMENSION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def load_formulas(environ: Mapping[str, str], source_dimensions: Sequence[str]) -> tuple[Formula, ...]:
    """Read every DIMENSION<n>_NAME / DIMENSION<n>_FORMULA pair, in order of n.

    Raises ConfigError for a name without a formula (or the reverse), a repeated or
    malformed name, or a formula outside the grammar.
    """
    pairs: dict[int, dict[str, str]] = {}
    for variable, value in environ.items():
        match = _DIMENSION_VARIABLE.match(variable)
        if match and value.strip():
            # Compared as text first: int() refuses numbers of more than 4,300 digits.
            if len(match.group(1)) > len(str(MAX_DIMENSION_NUMBER)) or int(match.group(1)) > MAX_DIMENSION_NUMBER:
                raise ConfigError(escape_control(variable[:40]) + ("..." if len(variable) > 40 else ""),
                                  f"numbers its dimension beyond {MAX_DIMENSION_NUMBER}; use DIMENSION1_ to "
                                  f"DIMENSION{MAX_DIMENSION_NUMBER}_")
            pairs.setdefault(int(match.group(1)), {})[match.group(2)] = value.strip()
    names = frozenset(source_dimensions) | {dimension + PRICE_SUFFIX for dimension in source_dimensions}
    formulas: list[Formula] = []
    for number in sorted(pairs):
        pair = pairs[number]
        for part, other in (("NAME", "FORMULA"), ("FORMULA", "NAME")):
            if part not in pair:
                raise ConfigError(f"DIMENSION{number}_{part}", f"is missing while DIMENSION{number}_{other} is set")
        name = pair["NAME"]
        if not _DIMENSION_NAME.match(name):
            raise ConfigError(f"DIMENSION{number}_NAME", f"{name!r} must be 1-100 letters, digits or _ . : -")
        if any(formula.name == name for formula in formulas):
            raise ConfigError(f"DIMENSION{number}_NAME", f"{name!r} is already used by another DIMENSION<n>_NAME")
        formulas.append(compile_formula(f"DIMENSION{number}_FORMULA", name, pair["FORMULA"], names))
    return tuple(formulas)


def billable_amounts(usage: HourUsage, formulas: Sequence[Formula]) -> dict[tuple[str, str], Fraction]:
    """The exact amount to bill per (contract, dimension) for one hour.

    With no formulas, the raw totals. With formulas, each formula per contract that
    has usage this hour, over its summed dimensions and price totals (absent = 0).
    Raises FormulaError on division by zero or a negative result.
    """
    totals = usage.totals()
    if not formulas:
        return totals
    prices = usage.price_totals()
    per_contract: dict[str, dict[str, Fraction]] = {}
    for (contract, dimension), amount in totals.items():
        names = per_contract.setdefault(contract, {})
        names[dimension] = amount
        names[dimension + PRICE_SUFFIX] = prices[contract, dimension]
    amounts = {}
    for contract in sorted(per_contract):
        for formula in formulas:
            try:
                value = formula.evaluate(per_contract[contract])
            except FormulaError as error:
                raise FormulaError(f"{error} for contract {contract} in hour {display_hour(usage.hour)}") from None
            if value < 0:
                raise FormulaError(
                    f"{formula.variable} ({formula.name}) is negative ({value}) for contract {contract} "
                    f"in hour {display_hour(usage.hour)}"
                )
            amounts[contract, formula.name] = value
    return amounts


def carry(
    amounts: Mapping[tuple[str, str], Fraction], remainders: Mapping[tuple[str, str], Fraction], limit: int | None = None
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], Fraction]]:
    """Whole units to bill now, and the fractions carried to the next hour.

    quantity = floor(amount + carried remainder); the new remainder is what is left
    (in [0, 1)). Over any run of hours the billed units are the whole part of the
    true total: never more than used, never a full unit short.
    With a per-record ``limit``, a quantity that exceeds it only because of what
    was carried in (late usage) is cut to the limit and the rest carried on, to
    later hours; one whose own hour exceeds it is left as it is, for
    check_record_quantities to refuse.
    Returns (quantities for the keys of ``amounts`` and for carried remainders of a
    whole unit or more, the remainders that changed).
    """
    quantities, updates = {}, {}
    # A remainder of a whole unit or more (usage found late, carried) is billed
    # with the next hour even if its contract has no usage in it.
    owed = {key: 0 for key, carried in remainders.items() if carried >= 1 and key not in amounts}
    for key, amount in itertools.chain(amounts.items(), owed.items()):
        carried = remainders.get(key, 0)
        total = amount + carried
        whole = math.floor(total)
        if limit is not None and whole > limit >= math.floor(amount):
            whole = limit
        quantities[key] = whole
        if total - whole != carried:
            updates[key] = total - whole
    return quantities, updates


def billable_remainders(remainders: Mapping[tuple[str, str], Fraction], formulas: Sequence[Formula]
                        ) -> tuple[dict[tuple[str, str], Fraction], dict[tuple[str, str], Fraction]]:
    """(the remainders the next hour may bill, the whole units owed to dimensions the
    configured formulas no longer produce). With no formulas every dimension is billed
    as it comes, so every remainder may be; with formulas, only their dimensions'."""
    if not formulas:
        return dict(remainders), {}
    names = {formula.name for formula in formulas}
    billable = {key: value for key, value in remainders.items() if key[1] in names}
    return billable, {key: value for key, value in remainders.items() if key[1] not in names and value >= 1}


def late_usage(accounted: Mapping[tuple[str, str], Fraction], now: Mapping[tuple[str, str], Fraction], carry_more: bool
               ) -> tuple[dict[tuple[str, str], Fraction], dict[tuple[str, str], Fraction], dict[tuple[str, str], Fraction]]:
    """Compare an already billed hour's usage as it reads now with what is accounted for it.

    ``accounted`` is the high-water mark of the hour: what it was billed on plus
    every increment carried for it since. Returns (carried, reported, accounted after):

    * reported: every non-zero difference ``now - accounted`` (negative: less usage
      than accounted, which cannot be taken back);
    * carried: the positive differences, when ``carry_more``, to add to the remainders;
    * accounted after: ``max(accounted, now)`` per key.

    Because the mark only rises, usage that shrinks and grows back, or a file that
    returns to an earlier content, is never carried twice: over any sequence of
    contents the increments carried add up to the largest content less the first.
    """
    carried, reported, after = {}, {}, dict(accounted)
    for key in sorted(set(accounted) | set(now)):
        before, current = accounted.get(key, Fraction(0)), now.get(key, Fraction(0))
        if current == before:
            continue
        reported[key] = current - before
        if current > before:
            after[key] = current
            if carry_more:
                carried[key] = current - before
    return carried, reported, after


def check_record_quantities(records: Sequence[Mapping[str, str]], limit: int | None, hour: datetime) -> None:
    """Raise QuantityError for the first record whose quantity exceeds ``limit`` (None: no limit).

    Checked before anything of the hour is sent: a marketplace refuses such a
    record, and the hour must go whole or not at all.
    """
    if limit is None:
        return
    for record in records:
        if int(record["quantity"]) > limit:
            raise QuantityError(
                f"hour {display_hour(hour)}: contract {record['contract_id']} dimension {record['dimension']} has "
                f"quantity {record['quantity']}, above the {limit} one record may carry (MAX_RECORD_QUANTITY); "
                "bill it in a larger unit with a formula, e.g. DIMENSION1_NAME=memory_gib_hours and "
                "DIMENSION1_FORMULA=memory_byte_hours / 1073741824"
            )


def metering_records(hour: datetime, cloud: str, quantities: Mapping[tuple[str, str], int]) -> list[dict[str, str]]:
    """Clazar records for one hour, grouped by contract; zero quantities are not sent."""
    start, end = format_time(hour), format_time(hour + HOUR)
    return [
        {"cloud": cloud, "contract_id": contract, "dimension": dimension,
         "start_time": start, "end_time": end, "quantity": str(quantity)}
        for (contract, dimension), quantity in sorted(quantities.items())
        if quantity > 0
    ]


# ---------------------------------------------------------------------------
# 5. Clazar: authentication, batches, retries, per-record results.
# ---------------------------------------------------------------------------


class ClazarError(MeteringError):
    """A batch could not be delivered; its outcome is unknown and it must be resent.

    Raised by ClazarClient.deliver, it carries ``answered``: each record's result,
    or None for those of batches without an answer.
    """

    answered: list[RecordResult | None] = []


class ClazarAuthError(ClazarError):
    """Clazar refused the credentials."""


DELIVERED = "delivered"
ALREADY_DELIVERED = "already delivered"
REJECTED = "rejected"
CONFLICT = "conflict"

# Clazar's answer to a second record for a contract, dimension and hour. Whether
# the record there is ours depends on how it was sent: see ``duplicate_outcome``.
_DUPLICATE_MARKERS = (("same contract_id", "same hour"), ("already exists",))


@dataclass(frozen=True)
class RecordResult:
    """Clazar's verdict on one record. ``retried``: its request was sent more than once,
    so an earlier attempt may have landed it."""

    outcome: str
    record_id: str | None = None
    answer: Any = None
    retried: bool = False


def duplicate_outcome(resent: bool, retried: bool) -> str:
    """What Clazar's "already exists" means for a record.

    After a resend of our own pending hour, or after a request that was retried
    (an earlier attempt may have landed before its answer was lost), the record
    there is ours: already delivered. On a record's first send in a request sent
    once, someone else holds that contract, dimension and hour (another exporter,
    an older script, a second service with the same contract and dimension): a
    conflict, never counted as delivered, since its usage may be unbilled.
    """
    return ALREADY_DELIVERED if resent or retried else CONFLICT


def _answer_texts(entry: Mapping[str, Any]) -> list[str]:
    texts = []
    errors = entry.get("errors")
    for error in errors if isinstance(errors, list) else [errors] if errors else []:
        texts.append(str(error.get("message", error)) if isinstance(error, dict) else str(error))
    texts += [str(entry[name]) for name in ("message", "code") if entry.get(name)]
    return texts


def classify_result(record: Mapping[str, str], entry: Any) -> RecordResult:
    """What Clazar's result entry says about one record it was sent.

    Raises ClazarError if the entry does not echo the record (the pairing by
    position cannot be trusted, so the batch must be resent).
    """
    if not isinstance(entry, dict):
        raise ClazarError(f"result entry is a JSON {type(entry).__name__}, not an object")
    for name in ("contract_id", "dimension"):
        if entry.get(name) not in (None, record[name]):
            raise ClazarError(f"result entry echoes {name} {shown_text(mask_value(entry.get(name)))} "
                              f"for a record with {shown_text(record[name])}")
    record_id = entry.get("id")
    # Kept in the state and the ledger: a string, masked, then cut to a sane length, or nothing.
    record_id = mask_secrets(record_id)[:200] if isinstance(record_id, str) else None
    if entry.get("status") == "success":
        return RecordResult(DELIVERED, record_id)
    text = " ".join(_answer_texts(entry)).lower()
    if any(all(marker in text for marker in markers) for markers in _DUPLICATE_MARKERS):
        return RecordResult(ALREADY_DELIVERED, record_id,
                            mask_value({"status": entry.get("status"), "errors": entry.get("errors")}))
    # Clazar's words are stored and shown: masked, and cut to a bounded size, here once for every use.
    answer = mask_value({name: entry[name] for name in ("status", "errors", "code", "message") if name in entry})
    return RecordResult(REJECTED, record_id, answer)


def read_results(records: Sequence[Mapping[str, str]], body: Any, retried: bool = False) -> list[RecordResult]:
    """Pair a 200 response's ``results`` with the records sent, by position.

    ``retried`` says the request was sent more than once, and is kept on each result.
    Raises ClazarError if there is no ``results`` list of the right length.
    """
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise ClazarError("response has no results list")
    if len(results) != len(records):
        raise ClazarError(f"response has {len(results)} results for {len(records)} records")
    return [dataclasses.replace(classify_result(record, entry), retried=retried) for record, entry in zip(records, results)]


def _was_retried(response: Any) -> bool:
    """Whether urllib3 sent this request more than once after an attempt that may have
    landed: one with no answer (a connection or read error) or a 5xx. A 429 was
    refused before anything was processed, so it excuses nothing."""
    retries = getattr(getattr(response, "raw", None), "retries", None)
    return any(entry.error is not None or (entry.status or 0) >= 500 for entry in getattr(retries, "history", ()))


def batches(records: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def _retry_policy(config: Config) -> Any:
    """urllib3's Retry: connection errors, timeouts, 429 and 5xx, exponential backoff
    with jitter, Retry-After honoured up to a cap. POST is included on purpose: a
    record that landed before the answer was lost comes back as a duplicate."""
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    class CappedRetry(Retry):
        # A server asking for a longer wait than the cap must not stall the run; one
        # whose Retry-After cannot be read (5,000 digits are too many for int())
        # gets the cap too, rather than an error urllib3 does not expect.
        def parse_retry_after(self, retry_after: str) -> float:
            try:
                return min(super().parse_retry_after(retry_after), config.retry_after_max_seconds)
            except (ValueError, OverflowError, InvalidHeader):
                return config.retry_after_max_seconds

        # Jitter keeps concurrent batches from retrying in step. It is added here
        # rather than with backoff_jitter, which urllib3 1.26 (the one botocore
        # allows on Python 3.9) does not have.
        def get_backoff_time(self) -> float:
            backoff = super().get_backoff_time()
            return backoff + random.uniform(0, config.backoff_seconds) if backoff else 0.0

        # urllib3 reads a refused answer whole before it retries (urllib3 1.26 into
        # memory, 2.x to the end, however long): closed instead, unread.
        def increment(self, *arguments: Any, **options: Any) -> Any:
            retry = super().increment(*arguments, **options)
            response = options.get("response")
            if response is not None:
                response.close()
            return retry

        # urllib3 sleeps before every retry: a stop asked for before or during
        # that wait sends the batch no more.
        def sleep(self, response: Any = None) -> None:
            STOP.check("before retrying a batch")
            super().sleep(response)
            STOP.check("before retrying a batch")

    return CappedRetry(
        total=config.max_retries,
        connect=config.max_retries,
        read=config.max_retries,
        status=config.max_retries,
        other=0,
        redirect=0,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"POST"}),
        backoff_factor=config.backoff_seconds,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )


class DeadlinePassed(Exception):
    """A call abandoned by within_deadline."""


def within_deadline(call: Callable[[], Any], seconds: float, where: str) -> Any:
    """``call()``'s result, or DeadlinePassed after ``seconds``, or RunStopped (naming
    ``where``) STOP.grace_seconds after a stop is asked for.

    The call runs on a daemon thread of its own so that it can be abandoned; it
    ends with the process. Whatever the call raises is raised here.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # handed over to the waiting thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name="bounded-call", daemon=True)
    worker.start()
    ends = time.monotonic() + seconds
    while worker.is_alive():
        now = time.monotonic()
        if STOP.is_set():
            ends = min(ends, now + STOP.grace_seconds)
        if now >= ends:
            STOP.check(where)
            raise DeadlinePassed(where)
        worker.join(min(StopRequest.POLL_SECONDS, ends - now))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class RequestFailed(OSError):
    """No answer to an HTTP request; the message starts with the failure's own type name."""


def http_session() -> Any:
    """A requests session that takes nothing from the environment by itself (see bounded_request)."""
    import requests

    session = requests.Session()
    # Left on, requests would let a ~/.netrc entry replace the bearer token (and send
    # the netrc password to Clazar), and would route by any *_proxy variable.
    session.trust_env = False
    return session


def bounded_request(session: Any, method: str, url: str, limit: int, direct: bool = False,
                    **arguments: Any) -> tuple[int, bytes, Any]:
    """(status, body, response) of one HTTP request on ``session`` (an http_session),
    reading at most ``limit`` + 1 bytes of the body: a longer one is cut there, for the
    caller to refuse.

    No redirect is followed and the answer is asked for uncompressed (a compressed one
    could expand far beyond ``limit``). What requests would take from the environment
    is given explicitly: the CA bundle (REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE) and the
    proxies (the *_proxy variables, no_proxy honoured), except for a ``direct`` plain-http
    request, which never goes through a proxy: Clazar's plain-http URLs are loopback
    ones, and a proxy would receive the client secret and the token in clear.
    Raises RequestFailed.
    """
    import requests
    from requests.utils import get_environ_proxies
    from urllib3.exceptions import HTTPError

    arguments["headers"] = {**arguments.get("headers", {}), "Accept-Encoding": "identity"}
    plain = url.lower().startswith("http://")
    proxies = {} if direct and plain else get_environ_proxies(url)
    verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    try:
        response = session.request(method, url, allow_redirects=False, stream=True, proxies=proxies, verify=verify,
                                    **arguments)
        try:
            body = response.raw.read(limit + 1, decode_content=False)
        finally:
            response.close()
    except (requests.RequestException, HTTPError, OSError) as error:
        raise RequestFailed(f"{type(error).__name__}: {error}") from None
    return response.status_code, body, response


# urllib3's own cap on the backoff between two retries.
BACKOFF_MAX_SECONDS = 120.0
# The largest answer read from Clazar: a batch's results take a few hundred bytes
# per record. A larger answer is refused, not read into memory whole.
MAX_ANSWER_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ClazarAnswer:
    status: int
    body: bytes
    retried: bool  # see _was_retried


def answer_deadline(config: Config) -> float:
    """How long one exchange with Clazar, its retries and waits included, may take in all.

    The read timeout bounds each wait for a byte, not the answer: a server sending
    one byte a second would hold the run (and its lock) forever. Each attempt gets
    its connect timeout and twice its read timeout, each wait between attempts
    the longest urllib3 may take.
    """
    attempt = min(10.0, config.timeout_seconds) + 2 * config.timeout_seconds
    wait = max(config.retry_after_max_seconds, BACKOFF_MAX_SECONDS) + config.backoff_seconds
    return (config.max_retries + 1) * attempt + config.max_retries * wait


class ClazarClient:
    """Talks to Clazar over one keep-alive session. Tokens never reach the log."""

    TOKEN_MARGIN = 300.0

    def __init__(self, config: Config, session: Any = None, clock: Callable[[], float] = time.monotonic):
        from requests.adapters import HTTPAdapter

        self.config = config
        self.clock = clock
        self.session = session or http_session()
        # Set once an exchange is abandoned: every later one would wait as long, one
        # batch after another, so the rest of the run fails at once instead.
        self._abandoned: str | None = None
        adapter = HTTPAdapter(max_retries=_retry_policy(config), pool_maxsize=config.send_concurrency)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._senders = concurrent.futures.ThreadPoolExecutor(config.send_concurrency, thread_name_prefix="clazar-send")
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = threading.Lock()

    def _post(self, url: str, payload: Any, token: str | None = None) -> ClazarAnswer:
        """POST ``payload`` to ``url`` and return the answer, read whole and bounded.

        The exchange runs on a thread of its own so that it can be abandoned: after
        answer_deadline(config), or STOP.grace_seconds after a stop. The
        abandoned thread is a daemon and ends with the process; whatever it still
        lands comes back "already exists" when the pending hour is resent.

        Raises ClazarError when no complete answer came, or RunStopped.
        """
        if self._abandoned:
            raise ClazarError(self._abandoned)
        deadline = answer_deadline(self.config)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            status, body, response = within_deadline(
                lambda: bounded_request(self.session, "POST", url, MAX_ANSWER_BYTES, direct=True,
                                        data=json.dumps(payload), headers=headers,
                                        timeout=(min(10.0, self.config.timeout_seconds), self.config.timeout_seconds)),
                deadline, "while waiting for Clazar's answer; the hour is resent by the next run")
        except DeadlinePassed:
            self._abandoned = (f"no complete answer from {url} within {deadline:.0f} s (see CLAZAR_TIMEOUT_SECONDS "
                               "and CLAZAR_MAX_RETRIES); the request was abandoned, and Clazar is not asked again "
                               "in this run")
            raise ClazarError(self._abandoned) from None
        except RequestFailed as error:
            raise ClazarError(f"no answer from {url} after {self.config.max_retries} retries: {error}") from None
        # A refusal is told by its status; only an answer to be read must be whole.
        if len(body) > MAX_ANSWER_BYTES and status == 200:
            raise ClazarError(f"Clazar's answer from {url} is larger than {MAX_ANSWER_BYTES} bytes; it was not read")
        return ClazarAnswer(status, body, _was_retried(response))

    def token(self) -> str:
        """A valid access token, authenticating when there is none or it is about to expire."""
        with self._lock:
            if self._token and self.clock() < self._token_expires:
                return self._token
            response = self._post(
                self.config.auth_url,
                {"client_id": self.config.client_id, "client_secret": self.config.client_secret},
            )
            if response.status != 200:
                raise ClazarAuthError(
                    f"Clazar refused authentication at {self.config.auth_url}: HTTP {response.status}; "
                    "check CLAZAR_CLIENT_ID and CLAZAR_CLIENT_SECRET"
                )
            try:
                body = parse_json(response.body)
                token = body["access_token"]
                # A lifetime beyond a day, or not finite, is taken as a day.
                lifetime = min(float(body.get("expires_in") or 3600), 86400.0)
                if not isinstance(token, str) or not token or not 0 <= lifetime:
                    raise ValueError("empty access_token or negative expires_in")
            except (ValueError, KeyError, TypeError, OverflowError) as error:
                raise ClazarAuthError(
                    f"Clazar's authentication answer has no usable access_token ({type(error).__name__})"
                ) from None
            redact(token)
            self._token = token
            # Refresh early: a token must not expire between the check and the request.
            self._token_expires = self.clock() + max(0.0, lifetime - min(self.TOKEN_MARGIN, lifetime / 10))
            log.debug("Authenticated with Clazar; token valid for %.0f s", lifetime)
            return token

    def forget_token(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def deliver(self, records: Sequence[Mapping[str, str]]) -> list[RecordResult]:
        """Send ``records`` in batches, several at once, and return each one's result in order.

        Every batch is tried even when another fails; then the first failure is
        raised (the hour stays pending and is resent whole, which is safe).

        Once a stop is asked for no further batch is sent; those in flight get
        STOP.grace_seconds to be answered. If every batch was answered the
        results are returned as usual, else RunStopped is raised: the hour stays
        pending, and what landed comes back "already exists" when it is resent.
        """
        STOP.check("before sending")
        parts = batches(records, self.config.batch_size)
        futures = [self._senders.submit(self.submit, batch) for batch in parts]

        def answered() -> list[RecordResult | None]:
            return [result for future, batch in zip(futures, parts)
                    for result in (future.result() if future.done() and not future.cancelled()
                                   and future.exception() is None else [None] * len(batch))]

        try:
            while concurrent.futures.wait(futures, timeout=STOP.POLL_SECONDS).not_done:
                if STOP.is_set():
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures, timeout=STOP.grace_seconds)
                    if not all(future.done() and not future.cancelled() for future in futures):
                        STOP.check("while sending; the batches sent so far are resent by the next run")
            for future in futures:
                if future.exception() is not None:
                    raise future.exception()
        except (ClazarError, RunStopped) as failure:
            # What the answered batches said still counts: a conflict among them must
            # not turn into "already delivered" when the hour is resent.
            failure.answered = answered()
            raise
        return [result for future in futures for result in future.result()]

    def close(self) -> None:
        # After a stop, a request still in flight is left to end with the process.
        self._senders.shutdown(wait=not STOP.is_set(), cancel_futures=True)
        self.session.close()

    def submit(self, records: Sequence[Mapping[str, str]]) -> list[RecordResult]:
        """Send one batch and read Clazar's verdict on each record.

        On a 401 the token is renewed once and the batch repeated. Raises ClazarError
        if the batch's fate is unknown (no answer after retries, a non-200 status, a
        response without a usable results list); resending it later is safe.
        """
        STOP.check("before sending a batch")
        token = self.token()
        response = self._post(self.config.api_url, {"request": list(records)}, token)
        retried = response.retried
        if response.status == 401:
            log.info("Clazar answered 401; authenticating again")
            self.forget_token(token)
            response = self._post(self.config.api_url, {"request": list(records)}, self.token())
            retried = retried or response.retried
        if response.status != 200:
            # Masked whole, then cut: a secret or an address straddling the cut is masked, not kept in part.
            body = escape_control(mask_secrets(response.body.decode("utf-8", "replace")))[:300]
            raise ClazarError(f"Clazar answered HTTP {response.status} to {len(records)} records: {body}")
        try:
            body = parse_json(response.body)
        except ValueError as error:
            raise ClazarError(f"Clazar answered 200 with a body that {error}") from None
        return read_results(records, body, retried)


# ---------------------------------------------------------------------------
# 6. State: the durable document, its lock, atomic writes.
# ---------------------------------------------------------------------------


class StateError(MeteringError):
    """The state cannot be read, is corrupt, or could not be written safely."""

    exit_code = EXIT_STATE


class LockHeld(MeteringError):
    """Another run holds the lock on this state."""

    exit_code = EXIT_LOCKED


def _fraction_text(value: Fraction) -> str:
    return str(value)


@dataclass(frozen=True)
class PendingHour:
    """An hour whose records are about to be, or are being, sent.

    Written to the state before the first request; a run that finds it resends
    exactly these records and then commits it, so a crash can neither lose the
    hour nor let it be recomputed into different records.
    """

    hour: datetime
    records: tuple[Mapping[str, str], ...]
    remainders: Mapping[tuple[str, str], Fraction]
    unattributable: int = 0
    # For the ledger: each key's exact amount this hour, the remainder it carried
    # in (when not zero), and the digest of the files it was read from.
    amounts: Mapping[tuple[str, str], Fraction] = field(default_factory=dict)
    carried: Mapping[tuple[str, str], Fraction] = field(default_factory=dict)
    sources: str = ""
    # The formulas the amounts were computed with: late usage is compared only
    # under the same formulas.
    formulas: str | None = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "hour": format_time(self.hour),
            "records": list(self.records),
            "remainders": _fractions_to_json(self.remainders),
            "unattributable": self.unattributable,
            "amounts": _fractions_to_json(self.amounts),
            "carried": _fractions_to_json(self.carried),
            "sources": self.sources,
            "formulas": self.formulas,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> PendingHour:
        """Read a pending hour back. Raises StateError naming ``where`` unless it is what
        this exporter writes: a whole hour, records of exactly that hour (see
        record_problem), a count, and fractions (see parse_fraction)."""
        if not isinstance(data, dict):
            raise StateError(f"{where}: pending_hour is not an object")
        try:
            hour = parse_utc(data.get("hour"))
            if hour != floor_hour(hour):
                raise ValueError(f"hour {format_time(hour)} is not a whole hour")
            records = data.get("records")
            if not isinstance(records, list):
                raise ValueError("records is not a list")
            for index, record in enumerate(records):
                problem = record_problem(record, hour)
                if problem:
                    raise ValueError(f"record {index} {problem}")
            records = tuple(records)
            unattributable = data.get("unattributable", 0)
            if type(unattributable) is not int or unattributable < 0:
                raise ValueError(f"unattributable {shown_text(unattributable)} is not a count")
            sources = data.get("sources", "")
            if not isinstance(sources, str):
                raise ValueError("sources is not a string")
            formulas = data.get("formulas")
        except ValueError as error:
            raise StateError(f"{where}: pending_hour is malformed ({error})") from None
        return cls(hour, records, _fractions_from_json(data.get("remainders", {}), f"{where}: remainders"),
                   unattributable, _fractions_from_json(data.get("amounts", {}), f"{where}: amounts"),
                   _fractions_from_json(data.get("carried", {}), f"{where}: carried"), sources,
                   # None: a pending hour of the release that did not record its formulas. It
                   # was computed moments ago, by the formulas configured now (see _deliver).
                   formulas if isinstance(formulas, str) else None)


def _fractions_to_json(values: Mapping[tuple[str, str], Fraction]) -> dict[str, dict[str, str]]:
    """{(contract, dimension): exact value} as {contract: {dimension: "p/q"}}."""
    document: dict[str, dict[str, str]] = {}
    for (contract, dimension), value in sorted(values.items()):
        document.setdefault(contract, {})[dimension] = _fraction_text(value)
    return document


# The largest amount, remainder or quantity the exporter computes is below 2**1024
# (MAX_FORMULA_BITS; raw sums stay far below it), so its text has at most this
# many digits. Read back from the state or the ledger, longer numbers are corrupt,
# and converting them could cost without bound.
MAX_AMOUNT_DIGITS = 309
_DIGITS = f"[0-9]{{1,{MAX_AMOUNT_DIGITS}}}"
_FRACTION_TEXT = re.compile(f"(-?)({_DIGITS})(?:/({_DIGITS}))?")
_QUANTITY_TEXT = re.compile(_DIGITS)


def parse_fraction(text: Any, *, signed: bool = False) -> Fraction:
    """An exact amount as the state and the ledger write it: ``"p"`` or ``"p/q"`` in ASCII
    digits, at most MAX_AMOUNT_DIGITS each, ``-`` first only if ``signed``.

    Raises ValueError for anything else: Fraction itself would also take ``"1e999999999"``
    and compute it.
    """
    match = _FRACTION_TEXT.fullmatch(text) if isinstance(text, str) else None
    if not match or (match.group(1) and not signed) or match.group(3) is not None and not int(match.group(3)):
        kind = "a fraction" if signed else "a non-negative fraction"
        raise ValueError(f"{shown_text(text)} is not {kind} like \"3/4\"")
    value = Fraction(int(match.group(2)), int(match.group(3) or 1))
    return -value if match.group(1) else value


def record_problem(record: Any, hour: datetime) -> str | None:
    """What is wrong with a Clazar record of ``hour`` kept in the state, or None.

    It must hold exactly RECORD_FIELDS, all strings: a known cloud, a contract id
    and dimension as billing_name_problem wants them, the hour's start and end,
    and a quantity of ASCII digits ("²" passes str.isdigit, and int() refuses it).
    """
    if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS):
        return f"does not hold exactly the fields {', '.join(RECORD_FIELDS)}"
    for name in RECORD_FIELDS:
        if not isinstance(record[name], str):
            return f"has a {name} that is not a string"
    if record["cloud"] not in CLOUDS:
        return f"has cloud {shown_text(record['cloud'])}"
    for name in ("contract_id", "dimension"):
        problem = billing_name_problem(record[name]) or (None if record[name] else "is empty")
        if problem:
            return f"has a {name} that {problem}"
    if record["start_time"] != format_time(hour) or record["end_time"] != format_time(hour + HOUR):
        return f"is not for the hour {format_time(hour)} .. {format_time(hour + HOUR)}"
    if not _QUANTITY_TEXT.fullmatch(record["quantity"]):
        return f"has quantity {shown_text(record['quantity'])}, not ASCII digits"
    return None


def _fractions_from_json(document: Any, where: str) -> dict[tuple[str, str], Fraction]:
    """The reverse of _fractions_to_json. Raises StateError naming ``where`` on anything
    but valid contract ids and dimensions mapped to non-negative fractions."""
    if not isinstance(document, dict):
        raise StateError(f"{where} is not an object")
    values = {}
    for contract, dimensions in document.items():
        if not isinstance(dimensions, dict):
            raise StateError(f"{where}: {shown_text(contract)} is not an object")
        for dimension, text in dimensions.items():
            try:
                problem = billing_name_problem(contract) or billing_name_problem(dimension)
                if problem:
                    raise ValueError(problem)
                values[contract, dimension] = parse_fraction(text)
            except ValueError as error:
                raise StateError(f"{where}: {shown_text(contract)}/{shown_text(dimension)}: {error}") from None
    return values


def _rejected_problem(item: Any) -> str | None:
    """What is wrong with a kept rejected record, or None: retry-failed resends its record fields."""
    if not isinstance(item, dict):
        return "is not an object"
    try:
        hour = parse_utc(item.get("start_time"))
    except ValueError as error:
        return f"has start_time {error}"
    problem = record_problem({name: item.get(name) for name in RECORD_FIELDS}, hour)
    if problem:
        return problem
    if "attempts" in item and (type(item["attempts"]) is not int or not 0 < item["attempts"] < 10**9):
        return f"has attempts {shown_text(item['attempts'])}, not a count"
    return None


def _late_usage_problem(item: Any) -> str | None:
    """What is wrong with a late-usage note kept for ``status``, or None."""
    if not isinstance(item, dict):
        return "is not an object"
    for name in ("hour", "contract_id", "dimension", "difference", "action"):
        if not isinstance(item.get(name), str):
            return f"has no {name} string"
    return None


def _source_problem(item: tuple[str, Any]) -> str | None:
    """What is wrong with a (processed hour, digest of its files) pair, or None."""
    hour_text, digest = item
    try:
        hour = parse_utc(hour_text)
    except ValueError as error:
        return f"names no hour: {error}"
    if hour != floor_hour(hour) or not isinstance(digest, str):
        return f"{shown_text(hour_text)} is not a whole hour with a digest string"
    return None


def _state_time(entry: Mapping[str, Any], name: str, where: str, kind: str) -> datetime | None:
    """``entry[name]`` as a UTC time, or None if absent. Raises StateError naming it."""
    text = entry.get(name)
    if text is None:
        return None
    try:
        return parse_utc(text)
    except ValueError:
        raise StateError(f"{where}: {name} {shown_text(text)} is not a UTC {kind} within "
                         f"{format_time(EARLIEST_TIME)} .. {format_time(LATEST_TIME)}") from None


def formulas_fingerprint(formulas: Sequence[Formula]) -> str:
    """A short digest of the configured formulas ("" with none), to tell when they changed."""
    if not formulas:
        return ""
    text = "\n".join(f"{formula.name}={formula.text}" for formula in formulas)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AccountedHour:
    """What is accounted for one processed hour, for the late-usage check.

    ``amounts`` is the high-water mark per (contract, dimension), in billing
    dimensions: what the hour was billed on plus every increment carried for it
    since. ``sources`` is the digest of the files last compared, ``formulas`` the
    fingerprint of the formulas the amounts were computed with, and ``checks``
    how many late checks were committed (their ledger lines carry their number,
    so lines of a check that crashed before its commit can be told apart).
    """

    sources: str
    formulas: str
    amounts: Mapping[tuple[str, str], Fraction]
    checks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "formulas": self.formulas, "checks": self.checks,
                "amounts": _fractions_to_json(self.amounts)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> AccountedHour:
        if not isinstance(data, dict) or not isinstance(data.get("sources"), str) \
                or not isinstance(data.get("formulas"), str) or type(data.get("checks", 0)) is not int:
            raise StateError(f"{where} is not an object with sources, formulas and checks")
        return cls(data["sources"], data["formulas"], _fractions_from_json(data.get("amounts", {}), f"{where}: amounts"),
                   data.get("checks", 0))


WAITING_OUTCOMES = (REJECTED, CONFLICT)


@dataclass(frozen=True)
class ServiceState:
    """What the state remembers of one service key. Pure: each change returns a new one.

    Records waiting for an operator (rejected, or in conflict) live in the ledger;
    the state keeps only how many wait in each hour (``waiting``), so it stays small
    however many accumulate.
    """

    last_processed_hour: datetime | None = None
    # The first hour of a service that has processed none, fixed by its first run.
    first_hour: datetime | None = None
    remainders: Mapping[tuple[str, str], Fraction] = field(default_factory=dict)
    pending: PendingHour | None = None
    # {hour: {outcome: count}} of records waiting in the ledger.
    waiting: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    last_run: Mapping[str, Any] | None = None
    last_success_at: datetime | None = None
    # The recently processed hours, for the late-usage check.
    accounted: Mapping[str, AccountedHour] = field(default_factory=dict)
    late_usage: tuple[Mapping[str, Any], ...] = ()
    # Once the marker decided this service's hours, a missing marker is an error.
    hours_by_marker: bool = False
    # What earlier versions kept: rejected records in the state, file digests
    # without amounts. Moved to the ledger and the accounted hours by the next run.
    legacy_rejected: tuple[Mapping[str, Any], ...] = ()
    legacy_sources: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    KNOWN = ("last_processed_hour", "first_hour", "remainders", "pending_hour", "waiting", "last_run",
             "last_success_at", "accounted", "late_usage", "hours_by_marker", "rejected", "sources")
    LATE_USAGE_KEPT = 200

    @classmethod
    def from_json(cls, entry: Any, where: str) -> ServiceState:
        """Read one entry of the state document. Raises StateError naming what is wrong."""
        if not isinstance(entry, dict):
            raise StateError(f"{where} is not an object")
        hours = {}
        for name in ("last_processed_hour", "first_hour"):
            hours[name] = _state_time(entry, name, where, "hour")
            if hours[name] is not None and hours[name] != floor_hour(hours[name]):
                raise StateError(f"{where}: {name} {format_time(hours[name])} is not a whole hour")
        pending = entry.get("pending_hour")
        rejected = entry.get("rejected", [])
        if not isinstance(rejected, list) or not all(isinstance(item, dict) for item in rejected):
            raise StateError(f"{where}: rejected is not a list of objects")
        waiting = entry.get("waiting", {})
        if not isinstance(waiting, dict) or not all(
                isinstance(counts, dict) and all(name in WAITING_OUTCOMES and type(count) is int and count > 0
                                                 for name, count in counts.items())
                for counts in waiting.values()):
            raise StateError(f"{where}: waiting is not an object of {{hour: {{rejected|conflict: count}}}}")
        last_run = entry.get("last_run")
        if last_run is not None and not isinstance(last_run, dict):
            raise StateError(f"{where}: last_run is not an object")
        last_success = _state_time(entry, "last_success_at", where, "time")
        sources = entry.get("sources", {})
        accounted = entry.get("accounted", {})
        late_usage = entry.get("late_usage", [])
        if not isinstance(sources, dict) or not isinstance(accounted, dict) or not isinstance(late_usage, list):
            raise StateError(f"{where}: sources or accounted is not an object, or late_usage is not a list")
        for hour_text in [*waiting, *accounted, *sources]:
            _state_time({"hour": hour_text}, "hour", where, "hour")
        for name, items, problem_of in (("rejected", rejected, _rejected_problem),
                                        ("late_usage", late_usage, _late_usage_problem),
                                        ("sources", list(sources.items()), _source_problem)):
            for index, item in enumerate(items):
                problem = problem_of(item)
                if problem:
                    raise StateError(f"{where}: {name} item {index} {problem}")
        return cls(
            last_processed_hour=hours["last_processed_hour"],
            first_hour=hours["first_hour"],
            remainders=_fractions_from_json(entry.get("remainders", {}), f"{where}: remainders"),
            pending=PendingHour.from_json(pending, where) if pending is not None else None,
            waiting={hour: dict(counts) for hour, counts in waiting.items()},
            last_run=last_run,
            last_success_at=last_success,
            accounted={hour: AccountedHour.from_json(data, f"{where}: accounted {hour}") for hour, data in accounted.items()},
            late_usage=tuple(late_usage),
            hours_by_marker=entry.get("hours_by_marker") is True,
            legacy_rejected=tuple(rejected),
            legacy_sources={hour: str(digest) for hour, digest in sources.items() if hour not in accounted},
            extra={name: value for name, value in entry.items() if name not in cls.KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        entry = dict(self.extra)
        if self.last_processed_hour is not None:
            entry["last_processed_hour"] = format_time(self.last_processed_hour)
        if self.first_hour is not None:
            entry["first_hour"] = format_time(self.first_hour)
        entry["remainders"] = _fractions_to_json({k: v for k, v in self.remainders.items() if v})
        if self.pending is not None:
            entry["pending_hour"] = self.pending.to_json()
        if self.waiting:
            entry["waiting"] = {hour: dict(sorted(counts.items())) for hour, counts in sorted(self.waiting.items())}
        if self.legacy_rejected:
            entry["rejected"] = [dict(item) for item in self.legacy_rejected]
        if self.last_run is not None:
            entry["last_run"] = dict(self.last_run)
        if self.last_success_at is not None:
            entry["last_success_at"] = format_time(self.last_success_at)
        if self.accounted:
            entry["accounted"] = {hour: accounted.to_json() for hour, accounted in sorted(self.accounted.items())}
        if self.legacy_sources:
            entry["sources"] = dict(sorted(self.legacy_sources.items()))
        if self.late_usage:
            entry["late_usage"] = list(self.late_usage)
        if self.hours_by_marker:
            entry["hours_by_marker"] = True
        return entry

    def waiting_count(self, outcome: str) -> int:
        return sum(counts.get(outcome, 0) for counts in self.waiting.values()) + (
            len(self.legacy_rejected) if outcome == REJECTED else 0)

    def with_pending(self, pending: PendingHour) -> ServiceState:
        return dataclasses.replace(self, pending=pending)

    def with_first_hour(self, hour: datetime) -> ServiceState:
        return dataclasses.replace(self, first_hour=hour)

    def with_hours_by_marker(self) -> ServiceState:
        return dataclasses.replace(self, hours_by_marker=True)

    def committed(self, pending: PendingHour, waiting: Mapping[str, int], lookback_hours: int) -> ServiceState:
        """The state once ``pending`` is done: its hour processed, its remainders kept,
        its waiting records counted, and its amounts tracked for the late-usage check
        for ``lookback_hours`` (older hours are dropped)."""
        accounted = dict(self.accounted)
        accounted[format_time(pending.hour)] = AccountedHour(pending.sources, pending.formulas, dict(pending.amounts))
        return dataclasses.replace(
            self,
            last_processed_hour=pending.hour,
            remainders={**self.remainders, **pending.remainders},
            pending=None,
            waiting=_with_counts(self.waiting, pending.hour, waiting),
            accounted=_recent(accounted, pending.hour, lookback_hours),
            legacy_sources=_recent(self.legacy_sources, pending.hour, lookback_hours),
        )

    def with_late_usage(self, accounted: Mapping[str, AccountedHour], remainders: Mapping[tuple[str, str], Fraction],
                        found: Iterable[Mapping[str, Any]]) -> ServiceState:
        """The state after late usage was checked: the accounted hours, carried amounts, what was found."""
        return dataclasses.replace(self, accounted=dict(accounted), legacy_sources={},
                                   remainders={**self.remainders, **remainders},
                                   late_usage=(self.late_usage + tuple(found))[-self.LATE_USAGE_KEPT:])

    def with_run(self, run: Mapping[str, Any], at: datetime, succeeded: bool) -> ServiceState:
        """The state with this run's summary recorded, for ``status`` and the metrics."""
        return dataclasses.replace(self, last_run=dict(run),
                                   last_success_at=at if succeeded else self.last_success_at)

    def with_waiting(self, hour: datetime, counts: Mapping[str, int]) -> ServiceState:
        """The state with the waiting records of ``hour`` counted anew."""
        return dataclasses.replace(self, waiting=_with_counts(self.waiting, hour, counts))

    def without_legacy_rejected(self) -> ServiceState:
        return dataclasses.replace(self, legacy_rejected=())


def _with_counts(waiting: Mapping[str, Mapping[str, int]], hour: datetime,
                 counts: Mapping[str, int]) -> dict[str, dict[str, int]]:
    updated = {key: dict(value) for key, value in waiting.items()}
    kept = {outcome: count for outcome, count in counts.items() if count}
    if kept:
        updated[format_time(hour)] = kept
    else:
        updated.pop(format_time(hour), None)
    return updated


def _recent(by_hour: Mapping[str, Any], last: datetime, lookback_hours: int) -> dict[str, Any]:
    """The entries of the ``lookback_hours`` hours up to ``last``."""
    horizon = format_time(last - lookback_hours * HOUR)
    return {hour: value for hour, value in by_hour.items() if hour > horizon}


def parse_state(body: bytes, where: str) -> dict[str, Any]:
    """Parse a state document: a JSON object keyed by service key. Raises StateError."""
    try:
        document = parse_json(body)
    except ValueError as error:
        raise StateError(f"state {where} {error}; it was left untouched, fix or restore it") from None
    if not isinstance(document, dict):
        raise StateError(f"state {where} is not a JSON object; it was left untouched, fix or restore it")
    for key, entry in document.items():
        ServiceState.from_json(entry, f"state {where}, entry {key!r}")
    return document


def dump_state(document: Mapping[str, Any]) -> bytes:
    """One service entry per line: readable, and encoded by json's C encoder
    (indent would switch to the pure-Python one, several times slower and larger
    in memory for an hour of 20,000 pending records)."""
    lines = [f"{json.dumps(key)}: {json.dumps(document[key], sort_keys=True)}" for key in sorted(document)]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


def write_file_atomically(path: str, chunks: Iterable[bytes], mode: int = 0o600) -> None:
    """Replace ``path`` with ``chunks``: temporary file in the same folder, fsync,
    rename, fsync of the folder. Readers see the old file or the new one, never
    a part, and after a crash the rename is on disk before anything that follows.

    Raises OSError; the temporary file is removed on any failure, including one
    raised by ``chunks`` itself.
    """
    folder = os.path.dirname(os.path.abspath(path))
    # mkstemp creates the file with mode 0600: nothing exists readable by others
    # before ``mode`` is set.
    descriptor, temporary = tempfile.mkstemp(prefix=".metering.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.writelines(chunks)
            handle.flush()
            os.fsync(handle.fileno())
        if mode != 0o600:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    folder_descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_descriptor)
    finally:
        os.close(folder_descriptor)


def make_private_folders(path: str) -> None:
    """Create ``path`` and every missing folder above it with mode 0700.

    os.makedirs gives only the last folder its mode; the others follow the umask,
    0777 under umask 000. Raises OSError.
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.mkdir(folder, 0o700)


def read_regular_file(path: str) -> bytes:
    """The whole content of the regular file at ``path``.

    Opened without blocking and checked before it is read: a FIFO or a device put
    where a file belongs would otherwise hold the run (and its lock) forever.
    Raises FileNotFoundError if nothing is there, IsADirectoryError naming what is
    there instead of a file, or OSError.
    """
    # Checked before the open too: opening some devices does something by itself.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file (a folder, FIFO, socket or device)")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file (a folder, FIFO, socket or device)")
        return handle.read()


def _write_lock_owner(handle: io.TextIOBase) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": format_time(utc_now())}))
    handle.flush()


class LocalStateStore:
    """The state document in a local file, written atomically, locked with flock.

    The lock is an advisory flock on ``<path>.lock``: the kernel drops it when the
    process dies, so a crashed run never leaves a stale lock behind.
    """

    def __init__(self, path: str):
        # Absolute in every message: a relative STATE_FILE_PATH depends on the folder
        # the run was started from, which is what an operator needs to see. A symbolic
        # link is resolved once, here: the state is then written beside its target and
        # replaces the target (the link stays), and every run, by the link or by the
        # target's own path, takes the same lock, <target>.lock.
        self.path = os.path.realpath(path)
        absolute = os.path.abspath(path)
        self.display = absolute if self.path == absolute else f"{absolute} (-> {self.path})"
        self.lock_display = self.path + ".lock"
        self._lock_handle: Any = None

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming its holder.

        Raises StateError if the lock file cannot be opened, or is a symbolic link or
        not a regular file: opening it through a link would truncate the link's target.
        """
        lock_path = self.lock_display
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StateError(f"lock file {lock_path} is a symbolic link; it was not opened through it. "
                                 "Remove the link (no run uses it) and run again") from None
            raise StateError(f"cannot open lock file {lock_path}: {error.strerror}") from None
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            os.close(descriptor)
            raise StateError(f"lock file {lock_path} is not a regular file; remove it and run again")
        # A second name for the lock file (a hard link) would let the owner record
        # written into it overwrite whatever file that name stands for.
        if status.st_nlink != 1:
            os.close(descriptor)
            raise StateError(f"lock file {lock_path} has {status.st_nlink} names (hard links); it was not "
                             "written. Remove it (no run uses it) and run again")
        handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = escape_control(handle.read(300).strip()) or "unknown"
            handle.close()
            raise LockHeld(f"another run holds the lock {lock_path} ({holder}); this run did nothing") from None
        _write_lock_owner(handle)
        self._lock_handle = handle

    def release(self) -> None:
        if self._lock_handle is not None:
            # The file stays: removing it would let a third run lock a new inode
            # while the second still holds the old one.
            self._lock_handle.close()
            self._lock_handle = None

    def load(self) -> dict[str, Any]:
        """The document, or {} if there is no state file yet. Raises StateError."""
        try:
            body = read_regular_file(self.path)
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise StateError(f"cannot read state {self.display}: {error.strerror}") from None
        return parse_state(body, self.display)

    def save(self, document: Mapping[str, Any]) -> None:
        """Replace the document atomically, readable only by its owner."""
        try:
            write_file_atomically(self.path, [dump_state(document)])
        except OSError as error:
            raise StateError(f"cannot write state {self.display}: {error.strerror or error}") from None


def _is_condition_failure(error: Exception) -> bool:
    """True for S3's answers to a conditional write that lost: 412, or 409 when two raced."""
    status = (getattr(error, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(error) in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3StateStore:
    """The state document as one S3 object, for runs that move between machines.

    Every write is conditional: If-Match on the ETag last read or written, or
    If-None-Match: * when creating, so a run never overwrites another's state.
    One run at a time holds a lease, the object ``<key>.lock``, created with
    If-None-Match: *, renewed in the background and deleted at the end. A lease
    past its expiry (a crashed run) is taken over with If-Match on its ETag.
    """

    def __init__(self, client: Any, bucket: str, key: str, lease_seconds: int = 900,
                 clock: Callable[[], datetime] = utc_now):
        self.client = client
        self.bucket = bucket
        self.key = key
        self.lock_key = key + ".lock"
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.display = f"s3://{bucket}/{key}"
        self.lock_display = f"s3://{bucket}/{self.lock_key}"
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self._lease_etag: str | None = None
        self._lease_lost = threading.Event()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    # --- the lease -------------------------------------------------------------

    def _lease_body(self) -> bytes:
        expires = self.clock() + timedelta(seconds=self.lease_seconds)
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": format_time(expires)}).encode()

    def _put_lease(self, **condition: str) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=self.lock_key, Body=self._lease_body(),
                                      ContentType="application/json", **condition)["ETag"]

    def acquire(self) -> None:
        """Take the lease, or raise LockHeld naming its holder and expiry."""
        where = f"s3://{self.bucket}/{self.lock_key}"
        try:
            self._lease_etag = self._put_lease(IfNoneMatch="*")
        except Exception as error:
            if not _is_condition_failure(error):
                raise StateError(f"cannot create lease {where}: {error}") from None
            self._take_over_expired(where)
        self._renewer = threading.Thread(target=self._keep_renewing, name="lease-renewer", daemon=True)
        self._renewer.start()

    def _take_over_expired(self, where: str) -> None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.lock_key)
            holder = parse_json(answer["Body"].read(2**16))
            expires = parse_utc(holder.get("expires_at") if isinstance(holder, dict) else None)
        except Exception as error:
            if _error_code(error) in ("NoSuchKey", "404"):
                raise LockHeld(f"the lease {where} changed hands while this run looked at it; this run did nothing") from None
            raise LockHeld(f"the lease {where} exists but cannot be read ({error}); if no run is active, delete it") from None
        who = escape_control(f"owner {holder.get('owner')} on {holder.get('host')}, pid {holder.get('pid')}")[:300]
        if expires > self.clock():
            raise LockHeld(f"another run holds the lock {where} ({who}) until {format_time(expires)}; this run did nothing")
        try:
            self._lease_etag = self._put_lease(IfMatch=answer["ETag"])
        except Exception as error:
            if _is_condition_failure(error):
                raise LockHeld(f"another run took over the expired lease {where} first; this run did nothing") from None
            raise StateError(f"cannot take over lease {where}: {error}") from None
        log.warning("Took over the lease %s, which expired at %s (%s): that run ended without releasing it",
                    where, format_time(expires), who)

    def _keep_renewing(self) -> None:
        # Renew at a third of the lease so two renewals can fail before it lapses.
        while not self._stop_renewing.wait(self.lease_seconds / 3):
            try:
                self._lease_etag = self._put_lease(IfMatch=self._lease_etag)
            except Exception as error:
                if _is_condition_failure(error):
                    self._lease_lost.set()
                    log.error("Lost the lease s3://%s/%s to another run; no further state will be written",
                              self.bucket, self.lock_key)
                    return
                log.warning("Could not renew the lease s3://%s/%s (will retry): %s", self.bucket, self.lock_key, error)

    def release(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._lease_etag is None or self._lease_lost.is_set():
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.lock_key, IfMatch=self._lease_etag)
        except Exception as error:
            log.warning("Could not delete the lease s3://%s/%s; it lapses by itself after %d s: %s",
                        self.bucket, self.lock_key, self.lease_seconds, error)
        self._lease_etag = None

    # --- the document ------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """The document, or {} if the object does not exist yet. Raises StateError."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
            body = answer["Body"].read()
        except Exception as error:
            if _error_code(error) in ("NoSuchKey", "404"):
                self.etag = None
                return {}
            raise StateError(f"cannot read state {self.display}: {error}") from None
        document = parse_state(body, self.display)
        self.etag = answer["ETag"]
        return document

    def save(self, document: Mapping[str, Any]) -> None:
        """Write the document if nobody else has since it was read. Raises StateError otherwise."""
        if self._lease_lost.is_set():
            raise StateError(f"this run lost its lease on {self.display} to another run; the state was not written")
        condition = {"IfMatch": self.etag} if self.etag else {"IfNoneMatch": "*"}
        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=dump_state(document),
                                            ContentType="application/json", **condition)
        except Exception as error:
            if _is_condition_failure(error):
                raise StateError(
                    f"state {self.display} was changed by another writer since this run read it; "
                    "nothing was overwritten, the next run resumes from what is there"
                ) from None
            raise StateError(f"cannot write state {self.display}: {error}") from None
        self.etag = answer["ETag"]


class StateBook:
    """The state document of one run; every change goes through here and is saved at once."""

    def __init__(self, store: Any):
        self.store = store
        self.document = store.load()

    def service(self, key: str) -> ServiceState:
        return ServiceState.from_json(self.document.get(key, {}), f"state entry {key!r}")

    def save(self, key: str, state: ServiceState) -> None:
        document = dict(self.document)
        document[key] = state.to_json()
        self.store.save(document)
        self.document = document


# --- The ledger ----------------------------------------------------------------
#
# An audit trail of what was billed, kept beside the state: one JSON object per
# line, one file per service and hour, in a folder per day:
#   <LEDGER_PATH>/2026-02-10/Acme_Vector_DB_PROD_pt-Q7rT2bX9kL-27715285/2026-02-10T14.jsonl
# An hour's file is written whole (atomically) before the hour is committed, so a
# crash can leave the ledger ahead of the state but never behind, and a resent
# pending hour rewrites its file instead of adding to it.


class LedgerError(StateError):
    """The ledger could not be read or written."""


ACCEPTED_OUTCOMES = (DELIVERED, ALREADY_DELIVERED, "delivered on retry")  # the last is RETRY_DELIVERED
NOT_SENT = "not sent: zero quantity"
# A record of a pending hour whose batch had no answer; the resend replaces the line.
NO_ANSWER = "sent, no answer yet"


class LocalLedgerStorage:
    def __init__(self, root: str):
        self.root = root
        self.display = os.path.abspath(root)

    def read(self, name: str) -> bytes | None:
        try:
            return read_regular_file(os.path.join(self.root, name))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise LedgerError(f"cannot read ledger {os.path.join(self.root, name)}: {error.strerror}") from None

    def write(self, name: str, chunks: Iterable[bytes]) -> None:
        path = os.path.join(self.root, name)
        try:
            make_private_folders(os.path.dirname(path))
            write_file_atomically(path, chunks)
        except OSError as error:
            raise LedgerError(f"cannot write ledger {path}: {error.strerror or error}") from None

    def names(self, folder: str) -> list[str]:
        path = os.path.join(self.root, folder)
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise LedgerError(f"cannot list ledger {path}: {error.strerror or error}") from None

    def delete_folder(self, folder: str) -> None:
        path = os.path.join(self.root, folder)
        try:
            shutil.rmtree(path)
        except OSError as error:
            raise LedgerError(f"cannot delete ledger {path}: {error.strerror or error}") from None


class S3LedgerStorage:
    def __init__(self, client: Any, bucket: str, prefix: str):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.display = f"s3://{bucket}/{self.prefix}"

    def read(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except Exception as error:
            if _error_code(error) in ("NoSuchKey", "404"):
                return None
            raise LedgerError(f"cannot read ledger {self.display}{name}: {error}") from None

    def write(self, name: str, chunks: Iterable[bytes]) -> None:
        try:
            # Spooled to disk past 1 MiB: an hour of 20,000 lines need not sit in memory.
            with tempfile.SpooledTemporaryFile(max_size=2**20) as body:
                body.writelines(chunks)
                body.seek(0)
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body,
                                       ContentType="application/x-ndjson")
        except Exception as error:
            raise LedgerError(f"cannot write ledger {self.display}{name}: {error}") from None

    def names(self, folder: str) -> list[str]:
        """The names directly inside ``folder``: files and sub-folders alike."""
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=f"{self.prefix}{folder}/" if folder else self.prefix, Delimiter="/"):
                names += [item["Prefix"].rstrip("/").rsplit("/", 1)[-1] for item in page.get("CommonPrefixes", ())]
                names += [item["Key"].rsplit("/", 1)[-1] for item in page.get("Contents", ())]
        except Exception as error:
            raise LedgerError(f"cannot list ledger {self.display}{folder}: {error}") from None
        return sorted(names)

    def delete_folder(self, folder: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{folder}/"):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
                if not keys:
                    continue
                # A quiet DeleteObjects answers 200 even when some keys were not deleted.
                failed = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}).get("Errors")
                if failed:
                    raise LedgerError(f"cannot delete ledger {self.display}{failed[0].get('Key')}: "
                                      f"{failed[0].get('Code')} {failed[0].get('Message', '')}".rstrip())
        except LedgerError:
            raise
        except Exception as error:
            raise LedgerError(f"cannot delete ledger {self.display}{folder}/: {error}") from None


_DAY_FOLDER = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_HOUR_FILE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}\.jsonl")


def _day_folder(day: datetime) -> str:
    return day.strftime("%Y-%m-%d")


def _service_folder(service_key: str) -> str:
    """A folder name safe on every file system and in S3, readable, and unique per key."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", service_key).strip("_")
    return f"{readable}-{hashlib.sha256(service_key.encode()).hexdigest()[:8]}"


def ledger_record_lines(service_key: str, pending: PendingHour, results: Mapping[tuple[str, str], RecordResult],
                        earlier_ids: Mapping[tuple[str, str], str], at: datetime) -> Iterator[dict[str, Any]]:
    """The ledger lines of one sent hour: one per contract and dimension with usage.

    A record Clazar answers as already there on a resend keeps the id it was
    given the first time, when ``earlier_ids`` (from an interrupted attempt's
    lines) has it. A rejected or conflicting record keeps Clazar's answer, masked:
    the ledger is where it waits for an operator. Lines are made one at a time:
    an hour of 5,000 subscriptions has 20,000 of them.
    """
    quantities = {(record["contract_id"], record["dimension"]): int(record["quantity"]) for record in pending.records}
    for key in sorted(set(pending.amounts) | set(quantities)):
        result = results.get(key)
        line = {
            "kind": "record", "service": service_key, "contract_id": key[0], "dimension": key[1],
            "hour": format_time(pending.hour), "quantity": quantities.get(key, 0),
            "amount": _fraction_text(pending.amounts.get(key, Fraction(0))),
            "carried_in": _fraction_text(pending.carried.get(key, Fraction(0))),
            "record_id": (result.record_id if result else None) or earlier_ids.get(key),
            "outcome": result.outcome if result else NOT_SENT,
            "at": format_time(at),
        }
        if result is not None and result.outcome in WAITING_OUTCOMES:
            line["answer"] = mask_value(result.answer)
        yield line


def ledger_line_problem(line: Any) -> str | None:
    """What is wrong with one ledger line read back, or None.

    Every line is an object of kind ``record`` or ``late`` naming a service, a
    contract id and dimension (as billing_name_problem wants them) and a whole
    hour, and when it says when it was written (``at``), as a string. A
    ``record`` line has a whole quantity, an outcome, a record id string or null,
    and when present an amount and carried_in (non-negative fractions), a retry
    flag and a count of attempts; a ``late`` line a difference (a signed
    fraction) and an action.
    """
    if not isinstance(line, dict):
        return f"is a JSON {type(line).__name__}, not an object"
    for name in ("kind", "service", "contract_id", "dimension", "hour"):
        if not isinstance(line.get(name), str):
            return f"has no {name} string"
    if not isinstance(line.get("at", ""), str):
        return "has an at that is not a string"
    if line["kind"] not in ("record", "late"):
        return f"has kind {shown_text(line['kind'])}, not record or late"
    try:
        problem = billing_name_problem(line["contract_id"]) or billing_name_problem(line["dimension"])
        if problem:
            return f"has a contract_id or dimension that {problem}"
        hour = parse_utc(line["hour"])
        if hour != floor_hour(hour):
            return f"has hour {shown_text(line['hour'])}, not a whole hour"
        if line["kind"] == "record":
            quantity = line.get("quantity")
            if type(quantity) is not int or not 0 <= quantity < 10**MAX_AMOUNT_DIGITS:
                return f"has quantity {shown_text(quantity)}, not a whole number"
            if not isinstance(line.get("outcome"), str) or not isinstance(line.get("record_id"), (str, type(None))):
                return "has no outcome string, or a record_id that is not a string"
            if not isinstance(line.get("retry", False), bool):
                return "has a retry that is not true or false"
            attempts = line.get("attempts", 1)
            if type(attempts) is not int or not 0 < attempts < 10**9:
                return f"has attempts {shown_text(attempts)}, not a count"
            for name in ("amount", "carried_in"):
                if name in line:
                    parse_fraction(line[name])
        elif line["kind"] == "late":
            parse_fraction(line.get("difference"), signed=True)
            if line.get("action") not in ("carried", "reported"):
                return f"has action {shown_text(line.get('action'))}, not carried or reported"
            # What a late line says was billed lives in record lines only.
            if "quantity" in line or "outcome" in line:
                return "is a late line with a quantity or an outcome, which only record lines have"
            if "accounted_before" in line:
                parse_fraction(line["accounted_before"])
            check = line.get("check", 0)
            if type(check) is not int or not 0 <= check < 10**9:
                return f"has check {shown_text(check)}, not a count"
    except ValueError as error:
        return str(error)
    return None


def waiting_records(lines: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """The records of one hour's ledger lines that wait for an operator, by (contract, dimension).

    A record's fate is its latest line: the first send, then each retry, or an
    operator clearing a conflict. It waits when that line is rejected or a conflict.
    """
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for line in lines:
        if line.get("kind") == "record":
            latest[line["contract_id"], line["dimension"]] = line
    return {key: line for key, line in latest.items() if line.get("outcome") in (*WAITING_OUTCOMES, RESENDING)}


def waiting_as(line: Mapping[str, Any]) -> str:
    """What a waiting record waits as: a record being resent is still a rejected one."""
    return REJECTED if line["outcome"] == RESENDING else line["outcome"]


def waiting_counts(lines: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """{outcome: how many records wait} for one hour's ledger lines."""
    counts: dict[str, int] = {}
    for line in waiting_records(lines).values():
        counts[waiting_as(line)] = counts.get(waiting_as(line), 0) + 1
    return counts


def late_usage_ledger_lines(service_key: str, hour: datetime, accounted: Mapping[tuple[str, str], Fraction],
                            reported: Mapping[tuple[str, str], Fraction], carried: Mapping[tuple[str, str], Fraction],
                            check: int, sources: str, at: datetime) -> list[dict[str, Any]]:
    """The ledger lines of one late check of an already billed hour: one per difference found.

    Each says what was accounted before, the difference, whether it was carried or
    only reported, and the number of the check (see AccountedHour).
    """
    return [{"kind": "late", "service": service_key, "contract_id": key[0], "dimension": key[1],
             "hour": format_time(hour), "accounted_before": _fraction_text(accounted.get(key, Fraction(0))),
             "difference": _fraction_text(difference), "action": "carried" if key in carried else "reported",
             "check": check, "sources": sources, "at": format_time(at)}
            for key, difference in sorted(reported.items())]


def legacy_accounted(lines: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Fraction]:
    """The high-water mark of an hour processed by an earlier version, from its ledger lines:
    the amounts it was billed on, raised by each later difference in the order found."""
    billed: dict[tuple[str, str], Fraction] = {}
    seen: dict[tuple[str, str], Fraction] = {}
    for line in lines:
        key = (line["contract_id"], line["dimension"])
        if line.get("kind") == "record" and not line.get("retry"):
            billed[key] = billed.get(key, Fraction(0)) + parse_fraction(line.get("amount", "0"))
            seen[key] = max(seen.get(key, Fraction(0)), billed[key])
        elif line.get("kind") == "late":
            billed[key] = billed.get(key, Fraction(0)) + parse_fraction(line["difference"], signed=True)
            seen[key] = max(seen.get(key, Fraction(0)), billed[key])
    return seen


class Ledger:
    """Reads and writes the ledger through a storage (a folder, or an S3 prefix)."""

    def __init__(self, storage: LocalLedgerStorage | S3LedgerStorage):
        self.storage = storage

    @staticmethod
    def hour_file(service_key: str, hour: datetime) -> str:
        return f"{_day_folder(hour)}/{_service_folder(service_key)}/{hour:%Y-%m-%dT%H}.jsonl"

    def read_hour(self, service_key: str, hour: datetime) -> list[dict[str, Any]] | None:
        """The lines of one hour, or None if the ledger has no file for it. Raises LedgerError."""
        name = self.hour_file(service_key, hour)
        data = self.storage.read(name)
        return None if data is None else list(self._parse(name, data))

    def _parse(self, name: str, data: bytes) -> Iterator[dict[str, Any]]:
        """The lines of one ledger file. Raises LedgerError naming the file and the line
        (counted from 1) that is not JSON or not the shape ledger_line_problem wants."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise LedgerError(f"ledger {self.storage.display}{name} is corrupt: not UTF-8 text ({error.reason})") from None
        for number, text_line in enumerate(text.split("\n"), 1):
            if not text_line.strip():
                continue
            try:
                line = parse_json(text_line)
                problem = ledger_line_problem(line)
            except ValueError as error:
                problem = str(error)
            if problem:
                raise LedgerError(f"ledger {self.storage.display}{name} is corrupt: line {number} {problem}")
            yield line

    def write_hour(self, service_key: str, hour: datetime, lines: Iterable[Mapping[str, Any]]) -> None:
        self.storage.write(self.hour_file(service_key, hour),
                           ((json.dumps(line, sort_keys=True) + "\n").encode("utf-8") for line in lines))

    def earlier_attempt(self, service_key: str, hour: datetime) -> dict[tuple[str, str], dict[str, Any]]:
        """{(contract, dimension): {"record_id", "outcome"}} of the record lines an interrupted
        attempt at ``hour`` wrote. Only these two are kept, line by line: a resent hour
        of 20,000 records would otherwise hold all of its earlier lines at once."""
        name = self.hour_file(service_key, hour)
        data = self.storage.read(name)
        return {(line["contract_id"], line["dimension"]): {"record_id": line.get("record_id"), "outcome": line.get("outcome")}
                for line in (self._parse(name, data) if data is not None else ())
                if line.get("kind") == "record" and not line.get("retry")}

    def record_hour(self, service_key: str, pending: PendingHour, results: Mapping[tuple[str, str], RecordResult],
                    earlier: Mapping[tuple[str, str], Mapping[str, Any]], at: datetime) -> None:
        """Write a sent hour's lines, replacing what an interrupted attempt at it (``earlier``) wrote."""
        earlier_ids = {key: line["record_id"] for key, line in earlier.items() if line.get("record_id")}
        self.write_hour(service_key, pending.hour, ledger_record_lines(service_key, pending, results, earlier_ids, at))

    def append(self, service_key: str, hour: datetime, lines: Sequence[Mapping[str, Any]],
               replacing: Callable[[Mapping[str, Any]], bool] = lambda line: False) -> list[dict[str, Any]]:
        """Add lines to an hour's file, first dropping earlier lines ``replacing`` selects.
        Writes nothing when there is nothing to add or drop. Returns the hour's lines."""
        earlier = self.read_hour(service_key, hour) or []
        kept = [line for line in earlier if not replacing(line)]
        if lines or len(kept) != len(earlier):
            self.write_hour(service_key, hour, kept + list(lines))
        return kept + list(lines)

    def lines(self, service_key: str, first: datetime, last: datetime) -> Iterator[dict[str, Any]]:
        """Every line of the hours first..last (inclusive) of one service, hour by hour."""
        # The day folders that exist, listed once: a range of years costs no more than the ledger holds.
        days = [name for name in self.storage.names("")
                if _DAY_FOLDER.fullmatch(name) and _day_folder(first) <= name <= _day_folder(last)]
        for day in days:
            for name in self.storage.names(f"{day}/{_service_folder(service_key)}"):
                if not _HOUR_FILE.fullmatch(name):
                    continue  # not a file this exporter wrote
                try:
                    hour = parse_utc(name[:13] + ":00")
                except ValueError:
                    continue
                if first <= hour <= last:
                    STOP.check("while reading the ledger")
                    yield from self.read_hour(service_key, hour) or []

    def prune(self, keep_days: int, today: datetime, keep: Iterable[str] = ()) -> int:
        """Delete day folders older than ``keep_days`` days, except the days in ``keep``
        (records still wait there). Returns how many were deleted."""
        oldest = _day_folder(today - timedelta(days=keep_days))
        kept = set(keep)
        old = [name for name in self.storage.names("")
               if _DAY_FOLDER.fullmatch(name) and name < oldest and name not in kept]
        for name in old:
            self.storage.delete_folder(name)
        return len(old)


# ---------------------------------------------------------------------------
# 7. The run: for each service and due hour, read, aggregate, record the
#    pending hour, send, commit.
# ---------------------------------------------------------------------------


# What is masked wherever the exporter writes or prints text that came from
# elsewhere: the client secret and every access token it was given (registered
# with ``redact``), anything shaped like a token, a password in a URL, and e-mail
# addresses (export files carry customers' addresses).
#
# Every pattern runs in time linear in the text, whatever the text: a match can
# start only where a run of its characters starts (the lookbehinds), so a long run
# without an ending ("aaaa...", "-eyJ-eyJ...") is scanned once, not once from each
# of its characters.
_SECRETS: dict[str, re.Pattern] = {}
_MASKS = (
    (re.compile(r"(?<=://)[^/\s@]+@"), "[userinfo]@"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [redacted]"),
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[redacted]"),
    (re.compile(r"""(?i)((?:access_token|refresh_token|id_token|token|client_secret|secret|password)["']?\s*[:=]\s*["']?)"""
                r"""[^"'\s,;&}]+"""), r"\1[redacted]"),
    (re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
)
MASKED_TEXT_LIMIT = 1000


def _case_free(text: str) -> str:
    """A pattern matching ``text`` (hexadecimal digits) in either case."""
    return "".join(f"[{char.lower()}{char.upper()}]" if char.isalpha() else char for char in text)


_JSON_SHORT_ESCAPES = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}


def _secret_pattern(secret: str) -> re.Pattern:
    """A pattern matching ``secret`` as written or escaped, character by character, the
    way an error body may echo it: JSON (``\\"``, ``\\/``, ``\\u00e9`` in either case,
    escaped again when a JSON text is embedded in another), URL (``%2F``, ``+``) and
    HTML (``&#47;``, ``&quot;``) escapes, in any mix. Each character's forms are fixed
    alternatives with bounded repeats, so a search costs time linear in the text."""
    html = {'"': "quot", "&": "amp", "<": "lt", ">": "gt", "'": "apos"}
    parts = []
    for char in secret:
        code = ord(char)
        units = [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)]
        forms = [re.escape(char),
                 "".join(r"\\{1,8}u" + _case_free(f"{unit:04x}") for unit in units),
                 "".join("%" + _case_free(f"{byte:02x}") for byte in char.encode("utf-8", "surrogatepass")),
                 f"&#0*{code};", "&#[xX]0*" + _case_free(f"{code:x}") + ";"]
        if char in '"\\/':
            forms.append(r"\\{1,8}" + re.escape(char))
        if char in _JSON_SHORT_ESCAPES:
            forms.append(r"\\{1,8}" + _JSON_SHORT_ESCAPES[char])
        if char == " ":
            forms.append(r"\+")
        if char in html:
            forms.append(f"&{html[char]};")
        parts.append("(?:" + "|".join(forms) + ")")
    return re.compile("".join(parts))


def redact(secret: str | None) -> None:
    """Mask ``secret`` in everything written or printed from now on, as it is and in
    every escaped form _secret_pattern knows."""
    if secret and len(secret) >= 4 and secret not in _SECRETS:
        _SECRETS[secret] = _secret_pattern(secret)


def mask_secrets(text: str) -> str:
    """``text`` with the registered secrets, tokens, URL passwords and e-mail addresses masked."""
    for pattern in _SECRETS.values():
        text = pattern.sub("[redacted]", text)
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def mask_value(value: Any, depth: int = 0) -> Any:
    """A JSON value from elsewhere (a Clazar answer, an error), fit to store and show:
    every string masked with mask_secrets, then cut to MASKED_TEXT_LIMIT characters
    (in that order: a secret straddling the cut is masked whole, not kept in part),
    at most 50 items per list or object and 8 levels, numbers kept."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= 8:
        return "[nested]"
    if isinstance(value, dict):
        return {mask_secrets(str(key))[:100]: mask_value(item, depth + 1)
                for key, item in itertools.islice(value.items(), 50)}
    if isinstance(value, (list, tuple)):
        return [mask_value(item, depth + 1) for item in value[:50]]
    return mask_secrets(str(value))[:MASKED_TEXT_LIMIT]


class _Redactor(logging.Filter):
    """Masks secrets and e-mail addresses in every log line, whoever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask_secrets(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
        return True


_REDACTOR = _Redactor()


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


class TextLogFormatter(logging.Formatter):
    """LOG_FORMAT, one line per message whatever the data in it: control characters
    are escaped, and a traceback's lines are indented so none can pass for a log line."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def formatException(self, exc_info: Any) -> str:
        lines = super().formatException(exc_info).splitlines()
        return "\n".join("    " + escape_control(line) for line in lines)

    def format(self, record: logging.LogRecord) -> str:
        masked = record.exc_text  # set by the redactor, unindented
        if masked:
            record.exc_text = "\n".join("    " + escape_control(line) for line in masked.splitlines())
        try:
            return super().format(record)
        finally:
            record.exc_text = masked
# The service and hour being worked on, for JSON log lines.
_SERVICE_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("metering_service", default=None)
_HOUR_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("metering_hour", default=None)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.service_key = _SERVICE_CONTEXT.get()
        record.hour = _HOUR_CONTEXT.get()
        return True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the service key and hour when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "message": escape_control(record.getMessage()),
        }
        for name in ("service_key", "hour"):
            if getattr(record, name, None):
                entry[name.replace("_key", "")] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = escape_control(record.exc_text or self.formatException(record.exc_info))
        # A lone surrogate left anywhere (a variable read from undecodable bytes) is
        # written as its JSON escape rather than failing the write.
        return json.dumps(entry, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def configure_logging(level: str, log_format: str = "text", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    handler.addFilter(_Context())
    handler.addFilter(_REDACTOR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Only the exporter's own messages follow LOG_LEVEL: botocore at DEBUG logs
    # whole response bodies, and export files carry customer e-mail addresses.
    log.setLevel(level)


@contextlib.contextmanager
def _working_on(variable: contextvars.ContextVar, value: str) -> Iterator[None]:
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


@dataclass
class ServiceReport:
    """What one run did for one service, for the summary line and the exit code."""

    service: ServiceKey
    hours: int = 0
    sent: int = 0
    already_delivered: int = 0
    rejected: int = 0
    conflicts: int = 0
    unattributable: int = 0
    late_hours: int = 0
    late_usage: int = 0
    failure: str | None = None
    last_processed_hour: datetime | None = None
    behind: int | None = None
    # When the marker says this service's data is final up to (before any lag).
    export_final_before: datetime | None = None
    # The oldest hour sent past the marketplace's lateness window, and how late.
    oldest_late_hour: tuple[datetime, timedelta] | None = None
    # Carried remainders of dimensions the formulas no longer produce, warned about once.
    unbilled_remainders: int = 0
    # Per hour read: (hour, records without payer or dimension, their subscriptions).
    unattributed: list[tuple[datetime, int, frozenset[str]]] = field(default_factory=list)
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.rejected == 0 and self.conflicts == 0 and self.stopped is None

    @property
    def result(self) -> str:
        return ("failed" if self.failure else "stopped" if self.stopped else "rejected records" if self.rejected else
                "conflicting records" if self.conflicts else "ok")

    def to_json(self, at: datetime) -> dict[str, Any]:
        return {"at": format_time(at), "result": self.result, "hours": self.hours, "sent": self.sent,
                "already_delivered": self.already_delivered, "rejected": self.rejected, "conflicts": self.conflicts,
                "unattributable": self.unattributable, "late_hours": self.late_hours, "late_usage": self.late_usage,
                "error": mask_value(self.failure)}


LARGE_HOUR_FILES = 1000


class Exporter:
    """One run over every configured service. The imperative shell around the pure parts."""

    def __init__(self, config: Config, source: ExportSource, clazar: ClazarClient | None, book: StateBook,
                 ledger: Ledger, clock: Callable[[], datetime] = utc_now):
        self.config = config
        self.source = source
        self.clazar = clazar
        self.book = book
        self.ledger = ledger
        self.clock = clock
        self.with_prices = any(PRICE_SUFFIX in formula.text for formula in config.formulas)
        self.reports: list[ServiceReport] = []

    def run(self) -> list[ServiceReport]:
        """Export every service; one service failing does not stop the others.

        Raises StateError (the run must stop: nothing may be sent that cannot be
        recorded), LockHeld and RunStopped; every other failure is reported per
        service. ``self.reports`` holds the services begun so far, also after a raise.
        """
        marker: ExportMarker | None = None
        marker_error: MarkerError | None = None
        try:
            marker = self.source.read_marker()
            if marker is None:
                log.warning("No export marker at s3://%s/%s; processing every closed hour instead",
                            self.config.bucket, MARKER_KEY)
        except MarkerError as error:
            marker_error = error
        self.reports = []
        for service in self.config.services:
            STOP.check(f"before {service.label}")
            report = ServiceReport(service)
            self.reports.append(report)
            with _working_on(_SERVICE_CONTEXT, service.key):
                try:
                    self.export_service(service, report, marker, marker_error)
                except (StateError, LockHeld):
                    raise
                except MeteringError as error:
                    report.failure = str(error)
                    log.error("%s: %s", service.label, error)
                except RunStopped as stop:
                    report.stopped = str(stop)
                    self._summarise(report)
                    raise
                except Exception as error:
                    # A defect, not bad input: reported as this service's failure, and the
                    # other services still run. Whatever was sent is pending in the state.
                    report.failure = f"unexpected {type(error).__name__}: {error}"
                    log.error("%s: %s (a defect: please report it with the DEBUG log)", service.label, report.failure)
                    log.debug("Where it happened", exc_info=error)
                self._summarise(report)
                if not self.config.dry_run:
                    now = self.clock()
                    self.book.save(service.key, self.book.service(service.key).with_run(report.to_json(now), now, report.ok))
        if not self.config.dry_run:
            self._prune_ledger()
        return self.reports

    def _prune_ledger(self) -> None:
        # Housekeeping after every hour is committed: failing it loses nothing, so
        # it warns instead of failing a run that billed correctly.
        # Days where rejected records or conflicts still wait are kept: the ledger is
        # where they wait, and retention must not resolve them silently.
        waiting = {_day_folder(parse_utc(hour)) for service in self.config.services
                   for hour in self.book.service(service.key).waiting}
        try:
            pruned = self.ledger.prune(self.config.ledger_retention_days, self.clock(), waiting)
        except LedgerError as error:
            log.warning("Could not delete ledger days older than %d days (tried again next run): %s",
                        self.config.ledger_retention_days, error)
            return
        if pruned:
            log.info("Deleted %d day(s) of ledger older than %d days", pruned, self.config.ledger_retention_days)

    def export_service(self, service: ServiceKey, report: ServiceReport,
                       marker: ExportMarker | None, marker_error: MarkerError | None) -> None:
        log.info("Starting processing for %s", service.label)
        state = self.book.service(service.key)
        if state.legacy_rejected and not self.config.dry_run:
            state = move_legacy_rejected(service.key, state, self.book, self.ledger)
        if state.pending is not None:
            log.warning("Resending pending hour %s of %s (%d records) left by an earlier run",
                        display_hour(state.pending.hour), service.label, len(state.pending.records))
            with _working_on(_HOUR_CONTEXT, format_time(state.pending.hour)):
                state = self._deliver(service, state, state.pending, report, replay=True)
        report.last_processed_hour = state.last_processed_hour
        if not self.config.dry_run:
            state = self._check_late_usage(service, state, report)
        now = self.clock()
        first = first_due_hour(state.last_processed_hour, self.config.start_hour, state.first_hour, now)
        # Pinned whatever the marker says: a first run that fails on it must not let
        # the start move on with the clock.
        decided = marker is not None and marker_error is None and service.key in marker.processed_to \
            and service.key not in marker.problems
        state = self._pin(service, state, first, decided)
        if marker_error is not None:
            raise marker_error
        if marker is None and state.hours_by_marker:
            raise MarkerError(
                f"the export marker s3://{self.config.bucket}/{MARKER_KEY} is missing, but it decided this service's "
                "hours before: without it no hour can be known final. Restore it (or, if Omnistrate no longer writes "
                "one, remove hours_by_marker from this service's state entry)")
        final_before = marker.final_before(service.key, self.config.marker_lag) if marker else None
        report.export_final_before = marker.final_before(service.key) if marker else None
        hours = due_hours(first, now, final_before, self.config.max_hours_per_run)
        report.behind = hours_between(first, due_end(now, final_before))
        if not hours:
            log.info("No hour of %s is due: the next, %s, is not final yet", service.label, display_hour(first))
        with contextlib.closing(self._read_ahead(service, hours)) as usages:
            for index, usage in enumerate(usages, 1):
                with _working_on(_HOUR_CONTEXT, format_time(usage.hour)):
                    log.info("Processing hour %d/%d: %s", index, len(hours), display_hour(usage.hour))
                    state = self._export_hour(service, state, usage, report)
                report.behind -= 1

    def _pin(self, service: ServiceKey, state: ServiceState, first: datetime, by_marker: bool) -> ServiceState:
        """Fix, before anything is read, what later runs must not decide differently: the
        first hour of a new service (so a failure there keeps it due instead of the start
        moving on with the clock), and that its hours are decided by the marker."""
        pinned = state
        if state.last_processed_hour is None and state.first_hour != first:
            # A WARNING naming the path: a relative STATE_FILE_PATH run from another folder
            # starts over here, and must say where it looked.
            log.warning("No previous processing found, starting from %s (%s): the state %s has no processed hour "
                        "for %s", display_hour(first), "START_HOUR" if self.config.start_hour else
                        "24 hours before the current hour; START_HOUR is unset", self.book.store.display, service.key)
            pinned = pinned.with_first_hour(first)
        elif state.last_processed_hour is not None and first > state.last_processed_hour + HOUR:
            log.warning("START_HOUR %s skips %d hour(s) after the last processed hour %s: they will never be sent",
                        format_time(first), hours_between(state.last_processed_hour + HOUR, first),
                        display_hour(state.last_processed_hour))
        if by_marker and not state.hours_by_marker:
            pinned = pinned.with_hours_by_marker()
        if pinned != state and not self.config.dry_run:
            self.book.save(service.key, pinned)
        return pinned

    def _check_late_usage(self, service: ServiceKey, state: ServiceState, report: ServiceReport) -> ServiceState:
        """Look again at the recently processed hours for files added or rewritten since.

        Usage found late cannot be sent for its own hour (Clazar refuses a second
        record). ``late_usage`` compares it with the hour's high-water mark: more is
        reported, and with LATE_USAGE=carry added to the carried remainder of its
        contract and dimension, to be billed with the next hour; less is reported.
        The ledger lines come first, then one state write with the new marks and
        remainders: a crash in between finds the same difference again, and its lines
        (numbered by check) replace the uncommitted ones, so nothing is carried twice.
        """
        if state.last_processed_hour is None:
            return state
        fingerprint = formulas_fingerprint(self.config.formulas)
        tracked = {**self._legacy_hours(service, state, fingerprint), **state.accounted}
        tracked = _recent(tracked, state.last_processed_hour, self.config.late_lookback_hours)
        carried: dict[tuple[str, str], Fraction] = {}
        found: list[dict[str, Any]] = []
        for hour_text, accounted in sorted(tracked.items()):
            hour = parse_utc(hour_text)
            if accounted.formulas != fingerprint:
                log.warning("Hour %s was billed with other dimension formulas than today's: it is no longer checked "
                            "for late usage", display_hour(hour))
                del tracked[hour_text]
                continue
            try:
                listing = self.source.list_hour(hour_prefix(service, hour))
                if listing.digest == accounted.sources:
                    continue
                now = billable_amounts(self._read_hour(service, hour, listing), self.config.formulas)
            except MeteringError as error:
                report.failure = f"checking hour {display_hour(hour)} for late usage: {error}"
                log.error("%s: %s", service.label, report.failure)
                continue
            more, reported, after = late_usage(accounted.amounts, now, self.config.late_usage == "carry")
            check = accounted.checks + 1 if reported else accounted.checks
            lines = late_usage_ledger_lines(service.key, hour, accounted.amounts, reported, more, check,
                                            listing.digest, self.clock())
            self.ledger.append(service.key, hour, lines,
                               replacing=lambda line, n=accounted.checks: line.get("kind") == "late" and line.get("check", 0) > n)
            for key, amount in more.items():
                carried[key] = carried.get(key, state.remainders.get(key, Fraction(0))) + amount
            for (contract, dimension), difference in reported.items():
                if difference > 0:
                    log.warning("Late usage: hour %s, already billed, now shows %s more %s for contract %s (%s)",
                                display_hour(hour), difference, dimension, contract,
                                "carried to the next hour" if (contract, dimension) in more else
                                "reported only; LATE_USAGE=carry would bill it with the next hour")
                else:
                    log.warning("Late usage: hour %s, already billed, now shows %s less %s for contract %s than "
                                "already accounted (reported only; nothing can be taken back)",
                                display_hour(hour), -difference, dimension, contract)
            report.late_usage += len(lines)
            found += [{name: line[name] for name in ("hour", "contract_id", "dimension", "difference", "action", "at")}
                      for line in lines]
            tracked[hour_text] = AccountedHour(listing.digest, fingerprint, after, check)
        if tracked == dict(state.accounted) and not state.legacy_sources and not carried and not found:
            return state
        state = state.with_late_usage(tracked, carried, found)
        self.book.save(service.key, state)
        return state

    def _legacy_hours(self, service: ServiceKey, state: ServiceState, fingerprint: str) -> dict[str, AccountedHour]:
        """The hours an earlier version tracked by file digest only, with their marks rebuilt
        from the ledger. Without a ledger file an hour counts as billed with nothing only if
        it had no export file either; otherwise its ledger is gone (deleted, or left behind
        when the state moved), nothing tells what it was billed, and it is not compared."""
        hours = {}
        for hour_text, digest in state.legacy_sources.items():
            lines = self.ledger.read_hour(service.key, parse_utc(hour_text))
            if lines is None and digest != EMPTY_LISTING:
                log.warning("Hour %s was billed by an earlier version and its ledger file is missing from %s: it is "
                            "no longer checked for late usage", hour_text, self.ledger.storage.display)
                continue
            hours[hour_text] = AccountedHour(digest, fingerprint, legacy_accounted(lines or ()))
        return hours

    def _read_ahead(self, service: ServiceKey, hours: Sequence[datetime]) -> Iterator[HourUsage]:
        """Each hour's usage, in order, while the next hour is already being read.

        Reading ahead only reads: the carry, the pending hour and the commit are
        applied by the caller strictly in order, so a failure at hour H leaves every
        hour after it untouched. Up to READ_AHEAD_HOURS small hours are read at once,
        so one hour's listing and last slow reads overlap another's (they share the
        one read pool); an hour of LARGE_HOUR_FILES files or more keeps the pool busy
        alone, and then only one is read ahead. Memory thus holds the rows of at
        most two large hours however many are due, or one with READ_AHEAD_HOURS=0.
        """
        upcoming = iter(hours)
        limit = self.config.read_ahead_hours
        ahead = concurrent.futures.ThreadPoolExecutor(max(1, limit), thread_name_prefix="read-ahead")
        queued = [ahead.submit(self._read_hour, service, hour) for hour in itertools.islice(upcoming, 1)]
        try:
            while queued:
                usage = STOP.result(queued.pop(0), "while reading the export")
                wanted = limit if usage.files < LARGE_HOUR_FILES else min(limit, 1)
                queued += [ahead.submit(self._read_hour, service, hour)
                           for hour in itertools.islice(upcoming, max(0, wanted - len(queued)))]
                yield usage
                if not queued:  # nothing read ahead: read the next hour now
                    queued += [ahead.submit(self._read_hour, service, hour) for hour in itertools.islice(upcoming, 1)]
        finally:
            # After a stop, a read still in flight is left to end with the process.
            ahead.shutdown(wait=not STOP.is_set(), cancel_futures=True)

    def _read_hour(self, service: ServiceKey, hour: datetime, listing: HourListing | None = None) -> HourUsage:
        usage = HourUsage(hour, prefix=hour_prefix(service, hour))
        listing = listing or self.source.list_hour(usage.prefix)
        problem = oversized_file(listing, self.source.max_file_bytes)
        if problem:
            raise ExportFileError(problem)
        usage.ignored, usage.sources = listing.ignored, listing.digest
        for key, body in self.source.read_all(listing.files):
            usage.add(parse_export_file(key, body, with_prices=self.with_prices))
        return usage

    def _export_hour(self, service: ServiceKey, state: ServiceState, usage: HourUsage, report: ServiceReport) -> ServiceState:
        hour = usage.hour
        log.info("Found %d subscription files in %s", usage.files, usage.prefix)
        if usage.ignored:
            log.warning("Ignored %d object(s) in %s that are not .json files, e.g. %s",
                        len(usage.ignored), usage.prefix, usage.ignored[0])
        amounts = billable_amounts(usage, self.config.formulas)
        # Drop the rows before the slow part, sending, while the next hours are read.
        usage.release()
        billable, unbilled = billable_remainders(state.remainders, self.config.formulas)
        if unbilled and not report.unbilled_remainders:
            report.unbilled_remainders = len(unbilled)
            log.warning("%d carried remainder(s) of a whole unit or more belong to dimensions the formulas no longer "
                        "produce and are not billed (kept in the state), e.g. contract %s dimension %s: %s",
                        len(unbilled), *min(unbilled), min(unbilled.items())[1])
        quantities, remainders = carry(amounts, billable, self.config.max_record_quantity)
        records = metering_records(hour, self.config.cloud, quantities)
        log.info("Aggregated %d records into %d entries", usage.records, len(amounts))
        if usage.repeated:
            log.warning("Hour %s: %d repeated row(s) for the same pod and dimension counted once, at their largest value",
                        display_hour(hour), usage.repeated)
        if usage.fractional:
            log.warning("Hour %s: %d record(s) have a fractional value; fractions are carried to later hours",
                        display_hour(hour), usage.fractional)
        if usage.unattributable:
            # Warned about once per service and run, in _summarise.
            report.unattributed.append((hour, usage.unattributable, frozenset(usage.unattributed_subscriptions)))
        check_record_quantities(records, self.config.max_record_quantity, hour)
        carried = {key: state.remainders[key] for key in quantities if state.remainders.get(key)}
        pending = PendingHour(hour, tuple(records), remainders, usage.unattributable, amounts, carried, usage.sources,
                              formulas_fingerprint(self.config.formulas))
        return self._deliver(service, state, pending, report)

    def _deliver(self, service: ServiceKey, state: ServiceState, pending: PendingHour, report: ServiceReport,
                 replay: bool = False) -> ServiceState:
        """Send ``pending`` and commit it. The pending hour is saved before the first
        request so that a crash anywhere after it resends exactly these records."""
        STOP.check(f"before hour {display_hour(pending.hour)}"
                   + ("; it stays pending and the next run resends it" if replay else ""))
        if pending.formulas is None:
            pending = dataclasses.replace(pending, formulas=formulas_fingerprint(self.config.formulas))
        records = list(pending.records)
        report.unattributable += pending.unattributable
        late_by = self.clock() - (pending.hour + HOUR)
        if records and late_by > self.config.lateness_window:
            # Warned about once per service and run, in _summarise.
            report.late_hours += 1
            if report.oldest_late_hour is None or pending.hour < report.oldest_late_hour[0]:
                report.oldest_late_hour = (pending.hour, late_by)
        if self.config.dry_run:
            log.info("Dry run: would send %d records for hour %s", len(records), display_hour(pending.hour))
            for record in records:
                log.info("Dry run record: %s", json.dumps(record, sort_keys=True))
            report.hours += 1
            return state.committed(pending, {}, self.config.late_lookback_hours)
        if records and not replay:
            state = state.with_pending(pending)
            self.book.save(service.key, state)
            log.debug("Recorded pending hour %s in %s", display_hour(pending.hour), self.book.store.display)
        # What an interrupted attempt at this hour wrote: the record ids Clazar gave,
        # and the conflicts it found, which a resend cannot tell from our own records.
        earlier = self.ledger.earlier_attempt(service.key, pending.hour) if replay else {}
        results: dict[tuple[str, str], RecordResult] = {}
        if records:
            log.info("Sending %d metering records to Clazar", len(records))
            try:
                answers = self.clazar.deliver(records)
            except (ClazarError, RunStopped) as failure:
                # The hour stays pending; what the answered batches said goes to the ledger
                # now, so that the resend keeps their record ids and their conflicts.
                if any(failure.answered):
                    for record, result in zip(records, failure.answered):
                        key = (record["contract_id"], record["dimension"])
                        results[key] = RecordResult(NO_ANSWER) if result is None else \
                            self._account(record, result, report, replay, earlier.get(key, {}).get("outcome"))
                    self.ledger.record_hour(service.key, pending, results, earlier, self.clock())
                raise
            for record, result in zip(records, answers):
                key = (record["contract_id"], record["dimension"])
                results[key] = self._account(record, result, report, replay, earlier.get(key, {}).get("outcome"))
            if all(result.outcome in (DELIVERED, ALREADY_DELIVERED) for result in results.values()):
                log.info("Successfully sent data to Clazar")
        if records or pending.amounts:
            # Before the commit: a crash here leaves the ledger ahead of the state, and
            # the resent pending hour rewrites this file rather than adding to it.
            self.ledger.record_hour(service.key, pending, results, earlier, self.clock())
        waiting: dict[str, int] = {}
        for result in results.values():
            if result.outcome in WAITING_OUTCOMES:
                waiting[result.outcome] = waiting.get(result.outcome, 0) + 1
        state = state.committed(pending, waiting, self.config.late_lookback_hours)
        self.book.save(service.key, state)
        log.info("Saved state to %s", self.book.store.display)
        report.hours += 1
        report.last_processed_hour = state.last_processed_hour
        return state

    def _account(self, record: Mapping[str, str], result: RecordResult, report: ServiceReport, replay: bool,
                 earlier_outcome: str | None) -> RecordResult:
        """Count one record's result, log what needs an operator, and return the result
        with an "already exists" answer resolved into delivered or a conflict."""
        if result.outcome == ALREADY_DELIVERED:
            outcome = CONFLICT if earlier_outcome == CONFLICT else duplicate_outcome(replay, result.retried)
            result = dataclasses.replace(result, outcome=outcome)
        where = f"contract {record['contract_id']} dimension {record['dimension']} hour {record['start_time']}"
        if result.outcome == DELIVERED:
            report.sent += 1
        elif result.outcome == ALREADY_DELIVERED:
            report.already_delivered += 1
            # Expected on a resend; after a retried request, worth a line in the log.
            (log.info if replay else log.warning)(
                "Clazar already holds %s; counted as delivered: %s", where,
                "this exporter sent it before" if replay else "its request was retried after an answer was lost")
        elif result.outcome == CONFLICT:
            report.conflicts += 1
            log.error("Conflict: Clazar already holds %s, which this exporter had not sent: another exporter, an "
                      "older script or a second service bills it. Not counted as delivered; our quantity %s is kept "
                      "in the ledger (see 'conflicts' and the README)", where, record["quantity"])
        else:
            report.rejected += 1
            log.error("Clazar rejected %s quantity %s: %s", where, record["quantity"],
                      json.dumps(mask_value(result.answer), sort_keys=True))
        return result

    def _summarise(self, report: ServiceReport) -> None:
        last = display_hour(report.last_processed_hour) if report.last_processed_hour else "none"
        behind = "unknown" if report.behind is None else str(report.behind)
        line = (f"Finished {report.service.label}: {report.hours} hour(s) processed, {report.sent} record(s) sent, "
                f"{report.already_delivered} already delivered, {report.rejected} rejected, "
                + (f"{report.conflicts} in conflict, " if report.conflicts else "") +
                f"{report.unattributable} unattributable; last processed hour {last}; {behind} hour(s) behind")
        if report.late_hours:
            line += f"; {report.late_hours} hour(s) sent past the marketplace's window"
        if report.late_usage:
            line += f"; late usage found for {report.late_usage} contract-dimension-hour(s)"
        for warning in service_warnings(report, self.config, self.clock()):
            log.warning("%s: %s", report.service.label, warning)
        if report.failure:
            log.error("%s; FAILED: %s", line, report.failure)
        elif report.stopped:
            log.warning("%s; STOPPED: %s", line, report.stopped)
        elif report.rejected or report.conflicts:
            log.error(line)
        else:
            log.info(line)


def service_warnings(report: ServiceReport, config: Config, now: datetime) -> list[str]:
    """What one service's run warns about, each once however many hours it concerns. Pure."""
    warnings = []
    if report.unattributed:
        subscriptions = sorted(set().union(*(found for _, _, found in report.unattributed)))
        hours = [hour for hour, _, _ in report.unattributed]
        warnings.append(
            f"{sum(count for _, count, _ in report.unattributed)} record(s) from {len(subscriptions)} subscription(s) "
            f"have no externalPayerId or dimension and are not sent, in {len(hours)} hour(s) from "
            f"{display_hour(min(hours))} to {display_hour(max(hours))}: "
            + ", ".join(subscriptions[:10]) + (" ..." if len(subscriptions) > 10 else ""))
    if report.oldest_late_hour is not None:
        hour, late_by = report.oldest_late_hour
        warnings.append(
            f"{report.late_hours} hour(s) sent past the {config.cloud} marketplace's "
            f"{config.lateness_window // HOUR}-hour window, the oldest {display_hour(hour)}, which ended "
            f"{late_by / HOUR:.1f} hours ago: the marketplace may refuse to bill them")
    if report.export_final_before is not None and is_export_stale(report.export_final_before, now, config):
        warnings.append(
            f"the export is final only before {format_time(report.export_final_before)}, "
            f"{export_age_hours(report.export_final_before, now):.1f} hours ago, more than EXPORT_STALE_HOURS="
            f"{config.export_stale_hours}: Omnistrate's export may have stalled")
    return warnings


def export_age_hours(final_before: datetime, now: datetime) -> float:
    """How many hours before ``now`` the export's final data ends (0 if not before)."""
    return max(0.0, (now - final_before) / HOUR)


def is_export_stale(final_before: datetime, now: datetime, config: Config) -> bool:
    """True when the export marker lags ``now`` by more than EXPORT_STALE_HOURS."""
    return now - final_before > config.export_stale_hours * HOUR


RECORD_FIELDS = ("cloud", "contract_id", "dimension", "start_time", "end_time", "quantity")


def move_legacy_rejected(service_key: str, state: ServiceState, book: StateBook, ledger: Ledger) -> ServiceState:
    """Move the rejected records an earlier version kept in the state to the ledger.

    Each becomes the latest line of its key in its hour's file (unless that line
    already says rejected, as after a crash half way), then one state write drops
    the list and counts them per hour.
    """
    by_hour: dict[str, list[Mapping[str, Any]]] = {}
    for entry in state.legacy_rejected:
        by_hour.setdefault(str(entry.get("start_time")), []).append(entry)
    for hour_text, entries in sorted(by_hour.items()):
        try:
            hour = parse_utc(hour_text)
        except ValueError:
            raise StateError(f"state entry {service_key!r}: a rejected record has no valid start_time") from None
        waiting = waiting_records(ledger.read_hour(service_key, hour) or [])
        lines = [{"kind": "record", "retry": True, "service": service_key, "contract_id": entry["contract_id"],
                  "dimension": entry["dimension"], "hour": hour_text, "quantity": int(entry["quantity"]),
                  "record_id": None, "outcome": REJECTED, "answer": mask_value(entry.get("answer")),
                  "attempts": int(entry.get("attempts", 1)), "at": str(entry.get("rejected_at") or hour_text)}
                 for entry in entries if waiting.get((entry["contract_id"], entry["dimension"]), {}).get("outcome") != REJECTED]
        state = state.with_waiting(hour, waiting_counts(ledger.append(service_key, hour, lines)))
    state = state.without_legacy_rejected()
    book.save(service_key, state)
    log.info("Moved %d rejected record(s) of %s from the state to the ledger", sum(map(len, by_hour.values())), service_key)
    return state


def record_of(line: Mapping[str, Any], cloud: str) -> dict[str, str]:
    """The metering record a ledger line stands for, as it was sent."""
    hour = parse_utc(line["hour"])
    return {"cloud": cloud, "contract_id": line["contract_id"], "dimension": line["dimension"],
            "start_time": format_time(hour), "end_time": format_time(hour + HOUR), "quantity": str(line["quantity"])}


def waiting_hours(state: ServiceState, outcome: str, hour: datetime | None) -> list[datetime]:
    """The hours with records of ``outcome`` waiting, oldest first (only ``hour`` if given)."""
    return [parse_utc(text) for text, counts in sorted(state.waiting.items())
            if counts.get(outcome) and (hour is None or text == format_time(hour))]


def retry_failed(config: Config, book: StateBook, ledger: Ledger, clazar: ClazarClient | None,
                 contract: str | None, hour: datetime | None, clock: Callable[[], datetime] = utc_now) -> int:
    """Resend the rejected records waiting in the ledger, hour by hour, per service.

    A record Clazar now accepts, or answers as already there after a retried request,
    is delivered on retry; one answered "already exists" on a request sent once is a
    conflict (someone else holds it); one rejected again stays waiting, with the new
    answer. Each outcome is a new ledger line, written before the state's count of
    the hour is updated (the ledger is the truth: a crash in between is corrected by
    the next retry-failed). A batch with no usable answer changes nothing (exit 1).
    Memory holds one hour's waiting records at a time. Returns the exit code.
    """
    code = EXIT_OK
    for service in config.services:
        state = book.service(service.key)
        with _working_on(_SERVICE_CONTEXT, service.key):
            if state.legacy_rejected and clazar is not None:
                state = move_legacy_rejected(service.key, state, book, ledger)
            for when in waiting_hours(state, REJECTED, hour):
                STOP.check(f"before hour {display_hour(when)} of {service.label}")
                lines = ledger.read_hour(service.key, when) or []
                waiting = waiting_records(lines)
                chosen = [line for line in waiting.values()
                          if waiting_as(line) == REJECTED and (contract is None or line["contract_id"] == contract)]
                records = [record_of(line, config.cloud) for line in chosen]
                if clazar is None:
                    log.info("Dry run: would resend %d rejected record(s) of %s for hour %s", len(records),
                             service.label, display_hour(when))
                    for record in records:
                        log.info("Dry run record: %s", json.dumps(record, sort_keys=True))
                    continue
                if records:
                    log.info("Resending %d rejected record(s) of %s for hour %s to Clazar", len(records),
                             service.label, display_hour(when))
                    # Noted before the send, as a pending hour is: after a crash, a lost answer
                    # or a stop, "already exists" for these is our own resend landing, not a conflict.
                    in_flight = [line["outcome"] == RESENDING for line in chosen]
                    ledger.append(service.key, when, [resending_line(line, clock()) for line in chosen
                                                      if line["outcome"] != RESENDING])
                    try:
                        results = clazar.deliver(records)
                    except (ClazarError, RunStopped) as failure:
                        answered = [(line, result, flag) for line, result, flag in zip(chosen, failure.answered, in_flight)
                                    if result is not None]
                        ledger.append(service.key, when, [retry_line(service.key, line, result, clock(), flag)
                                                          for line, result, flag in answered])
                        if isinstance(failure, RunStopped):
                            raise
                        log.error("%s: %s; the records without an answer stay waiting", service.label, failure)
                        code = EXIT_FAILED
                        continue
                    lines = ledger.append(service.key, when, [
                        retry_line(service.key, line, result, clock(), flag)
                        for line, result, flag in zip(chosen, results, in_flight)])
                    for line in lines[-len(records):]:
                        if line["outcome"] == REJECTED:
                            log.error("Clazar rejected contract %s dimension %s hour %s quantity %s again: %s",
                                      line["contract_id"], line["dimension"], line["hour"], line["quantity"],
                                      json.dumps(line["answer"], sort_keys=True))
                        elif line["outcome"] == CONFLICT:
                            log.error("Conflict: Clazar already holds contract %s dimension %s hour %s, resent once: "
                                      "someone else billed it; see 'conflicts'", line["contract_id"], line["dimension"],
                                      line["hour"])
                    outcomes = [line["outcome"] for line in lines[-len(records):]]
                    log.info("%s, hour %s: %d delivered, %d still rejected, %d in conflict", service.label,
                             display_hour(when), outcomes.count(RETRY_DELIVERED), outcomes.count(REJECTED),
                             outcomes.count(CONFLICT))
                    if outcomes.count(RETRY_DELIVERED) != len(outcomes):
                        code = EXIT_FAILED
                counts = waiting_counts(lines)
                if counts != dict(state.waiting.get(format_time(when), {})):
                    state = state.with_waiting(when, counts)
                    book.save(service.key, state)
    return code


RETRY_DELIVERED = "delivered on retry"


RESENDING = "resending"


def resending_line(line: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    """The ledger line that notes a waiting record is being resent (it still waits)."""
    return {**{name: line[name] for name in ("service", "contract_id", "dimension", "hour", "quantity")},
            "kind": "record", "retry": True, "record_id": None, "outcome": RESENDING,
            "attempts": line.get("attempts", 1), "at": format_time(at)}


def retry_line(service_key: str, line: Mapping[str, Any], result: RecordResult, at: datetime,
               in_flight: bool = False) -> dict[str, Any]:
    """The ledger line of one resent record. ``in_flight``: an earlier resend of it may have
    landed (its line said resending), so "already exists" is ours."""
    outcome = result.outcome
    if outcome in (DELIVERED, ALREADY_DELIVERED):
        outcome = RETRY_DELIVERED if result.outcome == DELIVERED or result.retried or in_flight else CONFLICT
    retried = {"kind": "record", "retry": True, "service": service_key, "contract_id": line["contract_id"],
               "dimension": line["dimension"], "hour": line["hour"], "quantity": int(line["quantity"]),
               "record_id": result.record_id, "outcome": outcome, "at": format_time(at),
               "attempts": int(line.get("attempts", 1)) + 1}
    if outcome in WAITING_OUTCOMES:
        retried["answer"] = mask_value(result.answer)
    return retried


def clear_conflicts(config: Config, book: StateBook, ledger: Ledger, contract: str | None, hour: datetime | None,
                    clock: Callable[[], datetime] = utc_now) -> int:
    """Mark the waiting conflicts (of ``contract`` and ``hour`` if given) as resolved by an
    operator: a "conflict cleared" ledger line each, then the state's counts. Nothing is
    sent. Returns the exit code."""
    for service in config.services:
        state = book.service(service.key)
        for when in waiting_hours(state, CONFLICT, hour):
            STOP.check(f"before hour {display_hour(when)} of {service.label}")
            lines = ledger.read_hour(service.key, when) or []
            chosen = [line for line in waiting_records(lines).values()
                      if line["outcome"] == CONFLICT and (contract is None or line["contract_id"] == contract)]
            cleared = [{**{name: line[name] for name in ("service", "contract_id", "dimension", "hour", "quantity")},
                        "kind": "record", "retry": True, "record_id": None, "outcome": CONFLICT_CLEARED,
                        "at": format_time(clock())} for line in chosen]
            lines = ledger.append(service.key, when, cleared)
            for line in cleared:
                log.info("Cleared the conflict of %s contract %s dimension %s hour %s (quantity %s, never billed by "
                         "this exporter)", service.label, line["contract_id"], line["dimension"], line["hour"],
                         line["quantity"])
            state = state.with_waiting(when, waiting_counts(lines))
            book.save(service.key, state)
    return EXIT_OK


CONFLICT_CLEARED = "conflict cleared"


def list_waiting(config: Config, book: StateBook, ledger: Ledger, outcome: str, contract: str | None,
                 hour: datetime | None) -> list[dict[str, Any]]:
    """The records of ``outcome`` waiting in the ledger, for the ``conflicts`` command."""
    found = []
    for service in config.services:
        for when in waiting_hours(book.service(service.key), outcome, hour):
            STOP.check(f"before hour {display_hour(when)} of {service.label}")
            found += [dict(line) for line in waiting_records(ledger.read_hour(service.key, when) or []).values()
                      if line["outcome"] == outcome and (contract is None or line["contract_id"] == contract)]
    return found


def format_waiting(lines: Sequence[Mapping[str, Any]]) -> str:
    if not lines:
        return "No conflict waiting."
    out = [f"{'hour':<21} {'contract':<38} {'dimension':<30} {'quantity':>14}  service / Clazar's answer"]
    out += [f"{line['hour']:<21} {line['contract_id']:<38} {line['dimension']:<30} {line['quantity']:>14}  "
            f"{line['service']} / {json.dumps(mask_value(line.get('answer')), sort_keys=True)}" for line in lines]
    out.append(f"{len(lines)} conflict(s) waiting; once resolved, clear them with: conflicts --clear")
    return "\n".join(escape_control(line) for line in out)


def reconcile_hour(now: Mapping[tuple[str, str], Fraction], lines: Sequence[Mapping[str, Any]] | None,
                   chain: Mapping[tuple[str, str], Fraction]
                   ) -> tuple[dict[tuple[str, str], tuple[int, int, int, int]], dict[tuple[str, str], Fraction]]:
    """Compare one hour's usage as the export shows it now with what the ledger says was billed.

    Returns ({(contract, dimension): (expected, billed, rejected, conflict)}, remainders
    after the hour). Expected is what the same rules bill for today's usage: the whole
    part of the usage, less late usage already carried to later hours, plus the
    remainder the ledger says was carried in (else the one computed for the hour
    before, in ``chain``). Billed counts records Clazar accepted or already held;
    rejected and conflict, the quantities of records still waiting as such.
    """
    billed: dict[tuple[str, str], int] = {}
    carried_in: dict[tuple[str, str], Fraction] = {}
    carried_late: dict[tuple[str, str], Fraction] = {}
    for line in lines or ():
        key = (line["contract_id"], line["dimension"])
        if line.get("kind") == "record":
            if line.get("outcome") in ACCEPTED_OUTCOMES:
                billed[key] = billed.get(key, 0) + int(line.get("quantity", 0))
            if not line.get("retry"):
                carried_in[key] = parse_fraction(line.get("carried_in", "0"))
        elif line.get("kind") == "late" and line.get("action") == "carried":
            carried_late[key] = carried_late.get(key, Fraction(0)) + parse_fraction(line["difference"], signed=True)
    waiting = {outcome: {key: int(line["quantity"]) for key, line in waiting_records(lines or ()).items()
                         if waiting_as(line) == outcome} for outcome in WAITING_OUTCOMES}
    compared, after = {}, {}
    for key in sorted(set(now) | set(billed) | set(carried_in) | set(waiting[REJECTED]) | set(waiting[CONFLICT])):
        total = now.get(key, Fraction(0)) - carried_late.get(key, Fraction(0)) + carried_in.get(key, chain.get(key, Fraction(0)))
        expected = max(0, math.floor(total))
        after[key] = total - expected
        compared[key] = (expected, billed.get(key, 0), waiting[REJECTED].get(key, 0), waiting[CONFLICT].get(key, 0))
    return compared, after


def reconcile(config: Config, exporter: Exporter, first: datetime, last: datetime) -> dict[str, Any]:
    """Re-read the export for first..last and compare it with the ledger, service by service."""
    rows: dict[tuple[str, str, str], list[int]] = {}
    differences, unattributable, not_processed = [], {}, {}
    for service in config.services:
        state = exporter.book.service(service.key)
        last_processed = state.last_processed_hour
        hours = [first + i * HOUR for i in range(hours_between(first, last + HOUR))]
        due = [hour for hour in hours if last_processed is not None and hour <= last_processed]
        not_processed[service.key] = len(hours) - len(due)
        unattributable[service.key] = 0
        chain: dict[tuple[str, str], Fraction] = {}
        with _working_on(_SERVICE_CONTEXT, service.key), contextlib.closing(exporter._read_ahead(service, due)) as usages:
            for usage in usages:
                STOP.check(f"before hour {display_hour(usage.hour)} of {service.label}")
                unattributable[service.key] += usage.unattributable
                now = billable_amounts(usage, config.formulas)
                compared, chain = reconcile_hour(now, exporter.ledger.read_hour(service.key, usage.hour), chain)
                for (contract, dimension), (expected, billed, rejected, conflict) in compared.items():
                    row = rows.setdefault((service.key, contract, dimension), [0, 0, 0, 0])
                    for index, value in enumerate((expected, billed, rejected, conflict)):
                        row[index] += value
                    if expected != billed:
                        differences.append({"service": service.key, "contract_id": contract, "dimension": dimension,
                                            "hour": format_time(usage.hour), "expected": expected, "billed": billed,
                                            "difference": expected - billed, "rejected": rejected, "conflict": conflict})
    return {
        "from": format_time(first), "to": format_time(last),
        "rows": [{"service": key[0], "contract_id": key[1], "dimension": key[2], "expected": value[0],
                  "billed": value[1], "difference": value[0] - value[1], "rejected": value[2], "conflict": value[3]}
                 for key, value in sorted(rows.items())],
        "differences": differences,
        "unattributable_records": unattributable,
        "hours_not_processed_yet": not_processed,
    }


def format_reconciliation(result: Mapping[str, Any], style: str) -> str:
    columns = ("service", "contract_id", "dimension", "expected", "billed", "difference", "rejected", "conflict")
    if style == "json":
        return json.dumps(result, indent=2)
    if style == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([spreadsheet_safe(row[name]) for name in columns] for row in result["rows"])
        return out.getvalue().rstrip("\n")
    widths = {name: max([len(name)] + [len(str(row[name])) for row in result["rows"]]) for name in columns}
    lines = [f"Reconciliation of {result['from']} .. {result['to']}", ""]
    lines.append("  ".join(f"{name:<{widths[name]}}" for name in columns))
    lines += ["  ".join(f"{row[name]!s:<{widths[name]}}" for name in columns) for row in result["rows"]]
    lines.append("")
    for service, count in result["unattributable_records"].items():
        lines.append(f"{service}: {count} unattributable usage record(s) (no externalPayerId or dimension)")
    for service, count in result["hours_not_processed_yet"].items():
        if count:
            lines.append(f"{service}: {count} hour(s) of the range not processed yet, not compared")
    for difference in result["differences"]:
        lines.append(f"DIFFERENCE {difference['service']} contract {difference['contract_id']} {difference['dimension']} "
                     f"hour {difference['hour']}: expected {difference['expected']}, billed {difference['billed']}"
                     + (f" ({difference['rejected']} rejected, see retry-failed)" if difference["rejected"] else "")
                     + (f" ({difference['conflict']} in conflict, see conflicts)" if difference["conflict"] else ""))
    lines.append(f"{len(result['differences'])} difference(s)" if result["differences"] else "Everything matches.")
    return "\n".join(escape_control(line) for line in lines)


def spreadsheet_safe(cell: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @, a tab
    or a carriage return (a formula, e.g. =HYPERLINK(...)) gets a leading ', and
    control characters are escaped (the csv module leaves a CR unquoted). Numbers stay."""
    if not isinstance(cell, str):
        return cell
    return ("'" if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else "") + escape_control(cell)


def contract_history(config: Config, ledger: Ledger, contract: str, first: datetime, last: datetime) -> list[dict]:
    """What the ledger says was billed to one contract, hour by hour."""
    lines = [line for service in config.services for line in ledger.lines(service.key, first, last)
             if line.get("contract_id") == contract]
    return sorted(lines, key=lambda line: (line["hour"], line["service"], line["dimension"], line.get("at", "")))


def format_history(lines: Sequence[Mapping[str, Any]]) -> str:
    if not lines:
        return "Nothing in the ledger for this contract in that range."
    out = [f"{'hour':<21} {'dimension':<30} {'quantity':>14}  {'outcome':<25} record id / service"]
    for line in lines:
        if line["kind"] == "late":
            out.append(f"{line['hour']:<21} {line['dimension']:<30} {line['difference']:>14}  "
                       f"{'late usage ' + line['action']:<25} {line['service']}")
        else:
            out.append(f"{line['hour']:<21} {line['dimension']:<30} {line['quantity']:>14}  {line['outcome']:<25} "
                       f"{line.get('record_id') or '-'} {line['service']}")
    total = sum(line.get("quantity", 0) for line in lines if line.get("outcome") in ACCEPTED_OUTCOMES)
    out.append(f"{len(lines)} line(s); {total} unit(s) billed in all dimensions")
    return "\n".join(escape_control(line) for line in out)


def service_status(service: ServiceKey, state: ServiceState, marker: ExportMarker | None,
                   marker_error: MarkerError | None, config: Config, now: datetime) -> dict[str, Any]:
    """Where one service stands, from its state and the export marker. Pure."""
    first = first_due_hour(state.last_processed_hour, config.start_hour, state.first_hour, now)
    behind, marker_note, export_age, stale = None, "absent: closed hours are due", None, None
    try:
        if marker_error is not None:
            raise marker_error
        if marker is None and state.hours_by_marker:
            raise MarkerError("missing, but it decided this service's hours before: no hour is sent until it is back")
        final_before = marker.final_before(service.key, config.marker_lag) if marker else None
        behind = hours_between(first, due_end(now, final_before))
        if marker is not None:
            marker_note = f"final before {format_time(final_before)}"
            exported_to = marker.final_before(service.key)
            export_age, stale = round(export_age_hours(exported_to, now), 1), is_export_stale(exported_to, now, config)
    except MarkerError as error:
        marker_note = f"error: {error}"
    return {
        "service": service.key,
        "last_processed_hour": format_time(state.last_processed_hour) if state.last_processed_hour else None,
        "hours_behind": behind,
        "marker": marker_note,
        "export_age_hours": export_age,
        "export_stale": stale,
        "pending_hour": format_time(state.pending.hour) if state.pending else None,
        "pending_records": len(state.pending.records) if state.pending else 0,
        "rejected_waiting": state.waiting_count(REJECTED),
        "conflicts_waiting": state.waiting_count(CONFLICT),
        "last_run": state.last_run,
        "last_success_at": format_time(state.last_success_at) if state.last_success_at else None,
        "late_usage_found": len(state.late_usage),
        "last_late_usage": state.late_usage[-1] if state.late_usage else None,
    }


def format_status(rows: Sequence[Mapping[str, Any]], stale_hours: int = 3) -> str:
    lines = []
    for row in rows:
        run = row["last_run"]
        last_run = (f"{run.get('at')}, {run.get('result')}: {run.get('hours')} hour(s), {run.get('sent')} sent, "
                    f"{run.get('rejected')} rejected" + (f"; {run['error']}" if run.get("error") else "")) if run else "never"
        pending = f"{row['pending_hour']} ({row['pending_records']} records, resent by the next run)" \
            if row["pending_hour"] else "none"
        lines += [
            row["service"],
            f"  last processed hour:   {row['last_processed_hour'] or 'none'}",
            f"  hours behind marker:   {'unknown' if row['hours_behind'] is None else row['hours_behind']}",
            f"  export marker:         {row['marker']}"
            + (f" ({row['export_age_hours']:.1f} hours ago)" if row["export_age_hours"] is not None else ""),
            f"  pending hour:          {pending}",
            f"  rejected records:      {row['rejected_waiting']} waiting"
            + (" (python3 metering_processor.py retry-failed)" if row["rejected_waiting"] else ""),
            f"  conflicts:             {row['conflicts_waiting']} waiting"
            + (" (python3 metering_processor.py conflicts; see the README)" if row["conflicts_waiting"] else ""),
            f"  last run:              {last_run}",
            f"  last success:          {row['last_success_at'] or 'never'}",
        ]
        if row["export_stale"]:
            lines.append(f"  WARNING: the export is {row['export_age_hours']:.1f} hours behind, more than "
                         f"EXPORT_STALE_HOURS={stale_hours}: Omnistrate's export may have stalled")
        if row["late_usage_found"]:
            late = row["last_late_usage"]
            lines.append(f"  late usage found:      {row['late_usage_found']}, the last for hour {late['hour']}, contract "
                         f"{late['contract_id']}, {late['difference']} {late['dimension']} ({late['action']})")
    return "\n".join(escape_control(line) for line in lines)


def _label(value: str) -> str:
    return mask_secrets(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(services: Sequence[ServiceKey], reports: Mapping[str, ServiceReport],
                   states: Mapping[str, ServiceState], exit_code: int, started: datetime, duration: float) -> str:
    """The Prometheus text exposition of one run, for node_exporter's textfile collector."""
    def family(name: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        return lines + [f"{name}{labels} {value:g}" if isinstance(value, int) else f"{name}{labels} {value:.3f}"
                        for labels, value in samples]

    per_service = [(f'{{service="{_label(service.key)}"}}', service.key) for service in services]

    def run_values(attribute: str) -> list[tuple[str, float]]:
        return [(labels, getattr(reports[key], attribute)) for labels, key in per_service if key in reports]

    lines = family("metering_run_timestamp_seconds", "When the last run started.", [("", started.timestamp())])
    lines += family("metering_run_duration_seconds", "How long the last run took.", [("", duration)])
    lines += family("metering_run_exit_status", "Exit code of the last run (0 ok, 1 failed hour or rejected "
                    "record, 2 configuration, 4 state, 5 stopped by a signal).", [("", exit_code)])
    lines += family("metering_service_up", "1 if the service's last run had no failed hour and no rejected record.",
                    [(labels, int(reports[key].ok)) for labels, key in per_service if key in reports])
    lines += family("metering_last_run_timestamp_seconds", "When the service was last run.",
                    [(labels, started.timestamp()) for labels, key in per_service if key in reports])
    lines += family("metering_last_success_timestamp_seconds", "When the service last ran without failure.",
                    [(labels, states[key].last_success_at.timestamp()) for labels, key in per_service
                     if key in states and states[key].last_success_at])
    for attribute, name, help_text in (
        ("hours", "metering_run_hours_processed", "Hours processed by the last run."),
        ("sent", "metering_run_records_sent", "Records Clazar accepted in the last run."),
        ("already_delivered", "metering_run_records_already_delivered", "Records Clazar already held."),
        ("rejected", "metering_run_records_rejected", "Records Clazar rejected in the last run."),
        ("conflicts", "metering_run_records_conflicting",
         "Records Clazar already held from another sender, found in the last run."),
        ("unattributable", "metering_run_records_unattributable", "Usage records without payer or dimension."),
        ("late_hours", "metering_run_late_hours", "Hours sent after the marketplace's lateness window."),
        ("late_usage", "metering_run_late_usage", "Usage found for already billed hours, per contract, dimension and hour."),
    ):
        lines += family(name, help_text, run_values(attribute))
    lines += family("metering_hours_behind", "Final hours not yet processed.",
                    [(labels, reports[key].behind) for labels, key in per_service
                     if key in reports and reports[key].behind is not None])
    lines += family("metering_export_final_before_timestamp_seconds",
                    "When the export marker says the service's data is final up to (last_processed_to + 1 s).",
                    [(labels, reports[key].export_final_before.timestamp()) for labels, key in per_service
                     if key in reports and reports[key].export_final_before is not None])
    lines += family("metering_last_processed_hour_timestamp_seconds", "Start of the last hour processed, from the state.",
                    [(labels, states[key].last_processed_hour.timestamp()) for labels, key in per_service
                     if key in states and states[key].last_processed_hour is not None])
    lines += family("metering_rejected_records_waiting", "Rejected records kept for retry-failed.",
                    [(labels, states[key].waiting_count(REJECTED)) for labels, key in per_service if key in states])
    lines += family("metering_conflicting_records_waiting", "Records in conflict, waiting for an operator.",
                    [(labels, states[key].waiting_count(CONFLICT)) for labels, key in per_service if key in states])
    lines += family("metering_pending_hour", "1 while an hour is recorded as pending (sent in part or not at all).",
                    [(labels, int(states[key].pending is not None)) for labels, key in per_service if key in states])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# 8. Command line.
# ---------------------------------------------------------------------------


def _help_epilog() -> str:
    width = max(len(name) for name, _, _ in SETTINGS)
    lines = ["environment variables (default in brackets):"]
    lines += [f"  {name:<{width}}  {meaning} [{default}]" for name, default, meaning in SETTINGS]
    lines += [
        "",
        "billing dimensions by formula (when any DIMENSION<n>_* is set, only these are sent):",
        "  names:    each Omnistrate dimension (summed per contract and hour, 0 when absent) and",
        "            <dimension>_total_price (sum of value x pricePerUnit, a missing price counts 0)",
        "  grammar:  numbers, names, + - * / // % **, parentheses, unary minus, min, max, abs, round;",
        "            ** takes a whole-number literal exponent from -64 to 64, round's digits -20 to 20;",
        "            arithmetic is exact; any value beyond 2**1024 fails the hour",
        "  examples: DIMENSION1_NAME=memory_gib_hours",
        "            DIMENSION1_FORMULA=memory_byte_hours / 1073741824",
        "            DIMENSION2_NAME=compute_units",
        "            DIMENSION2_FORMULA=cpu_core_hours * 2 + memory_byte_hours / 1024**3",
        "            DIMENSION3_NAME=usage_cents",
        "            DIMENSION3_FORMULA=(cpu_core_hours_total_price + memory_byte_hours_total_price) / 0.01",
        "",
        "exit codes: 0 done, 1 an hour failed or a record was rejected or in conflict, 2 configuration error,",
        "            3 another run holds the lock, 4 the state could not be read or written,",
        "            5 stopped by SIGTERM or SIGINT (a pending hour stays pending for the next run)",
        "",
        "--dry-run may stand before or after the command (run, retry-failed, conflicts --clear, or none);",
        "with it, or DRY_RUN=true, nothing is sent and nothing is written, whatever else is set.",
    ]
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    # prog is left to argparse: the name this was started by (metering_processor.py, or
    # metering-processor when installed), so --version and usage show what was typed.
    parser = argparse.ArgumentParser(
        description="Export Omnistrate usage from S3 to Clazar, one final hour at a time. "
                    "With no command, run the export (as cron does).",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dry_run_help = "read and aggregate due hours and print the records; send and save nothing"
    parser.add_argument("--dry-run", action="store_true", default=None, help=dry_run_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    run = commands.add_parser("run", help="export every due hour (the default)")
    # SUPPRESS: a sub-command's default would overwrite a --dry-run given before the
    # command (argparse copies every sub-command value over the main parser's).
    run.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help=dry_run_help)
    status = commands.add_parser("status", help="where each service stands; read-only, no lock, no Clazar call")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    retry = commands.add_parser("retry-failed", help="resend the rejected records waiting in the ledger")
    retry.add_argument("--contract", help="only this contract")
    retry.add_argument("--hour", type=_hour_argument, help="only this hour, e.g. 2026-02-10T14:00:00Z")
    retry.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help="show what would be resent")
    check = commands.add_parser("reconcile", help="re-read the export and compare it with the ledger; exit 1 on a difference")
    check.add_argument("--from", dest="first", type=_hour_argument, required=True, help="first hour, e.g. 2026-02-01T00:00:00Z")
    check.add_argument("--to", dest="last", type=_hour_argument, required=True, help="last hour (included)")
    output = check.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_const", dest="style", const="json", default="text")
    output.add_argument("--csv", action="store_const", dest="style", const="csv")
    conflicts = commands.add_parser("conflicts", help="list the records in conflict (another sender holds them), "
                                    "or clear them once resolved; never sends")
    conflicts.add_argument("--contract", help="only this contract")
    conflicts.add_argument("--hour", type=_hour_argument, help="only this hour, e.g. 2026-02-10T14:00:00Z")
    conflicts.add_argument("--clear", action="store_true", help="mark them resolved (takes the lock)")
    conflicts.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                           help="with --clear: list what would be cleared; write nothing")
    conflicts.add_argument("--json", action="store_true")
    history = commands.add_parser("history", help="what the ledger says was billed to one contract")
    history.add_argument("--contract", required=True)
    history.add_argument("--from", dest="first", type=_hour_argument, help="first hour (default: 31 days ago)")
    history.add_argument("--to", dest="last", type=_hour_argument, help="last hour (default: now)")
    history.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def _hour_argument(text: str) -> datetime:
    try:
        hour = parse_utc(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UTC hour: {text!r}") from None
    if hour != floor_hour(hour):
        raise argparse.ArgumentTypeError(f"not a whole hour: {text!r}")
    return hour


def s3_client(workers: int) -> Any:
    """One boto3 S3 client with a connection pool as large as the read pool.
    Endpoint, region and credentials follow boto3's own conventions."""
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig

    session = botocore.session.get_session()
    # Keep S3's timestamps as the strings they arrive as (the AWS CLI does the
    # same): nothing here reads LastModified, and parsing it was a third of the
    # CPU of a GET and two thirds of a 1,000-key listing page.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=session).client(
        "s3",
        config=BotoConfig(
            max_pool_connections=workers + 4,
            connect_timeout=10,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 4},
        ),
    )


def open_ledger(config: Config, client: Any) -> Ledger:
    s3 = split_s3_url(config.ledger_path)
    if s3:
        bucket, prefix = s3
        return Ledger(S3LedgerStorage(client, bucket, prefix.rstrip("/")))
    return Ledger(LocalLedgerStorage(config.ledger_path))


def open_state_store(config: Config, client: Any) -> LocalStateStore | S3StateStore:
    """The state store STATE_FILE_PATH names: ``s3://bucket/key`` or a local path."""
    s3 = split_s3_url(config.state_path)
    if s3:
        bucket, key = s3
        return S3StateStore(client, bucket, key, config.lock_ttl_seconds)
    return LocalStateStore(config.state_path)


def show_status(config: Config, client: Any, store: LocalStateStore | S3StateStore, as_json: bool) -> int:
    """Print where each service stands. Reads the state and the marker; takes no lock."""
    try:
        book = StateBook(store)
    except StateError as error:
        log.error("%s", error)
        return error.exit_code
    source = ExportSource(client, config.bucket, 1, config.max_export_file_bytes)
    marker, marker_error = None, None
    try:
        marker = source.read_marker()
    except MarkerError as error:
        marker_error = error
    finally:
        source.close()
    now = utc_now()
    # The state may hold text an older version stored unmasked, or a hand edit: masked again here.
    rows = []
    for service in config.services:
        STOP.check(f"before {service.label}")
        rows.append(mask_value(service_status(service, book.service(service.key), marker, marker_error, config, now)))
    print(json.dumps(rows, indent=2) if as_json else f"State {store.display}\n" + format_status(rows, config.export_stale_hours))
    return EXIT_OK


def announce_locations(store: LocalStateStore | S3StateStore, ledger: Ledger) -> None:
    """Say where this run keeps its state, lock and ledger, as absolute paths or S3 URLs."""
    log.info("State %s (lock %s); ledger %s", store.display, store.lock_display, ledger.storage.display)


def log_run_error(error: MeteringError) -> None:
    # A held lock is normal when runs overlap: the run holding it does the work.
    (log.warning if isinstance(error, LockHeld) else log.error)("%s", error)


def export(config: Config, client: Any, store: LocalStateStore | S3StateStore) -> int:
    """The hourly run: lock, export every service, release, write the metrics.

    A stop (RunStopped) ends it with EXIT_STOPPED after the lock is released, and
    the metrics are still written and pushed; a stop that S3 or Clazar holds up
    past STOP.deadline_seconds ends the process from the watchdog, which
    writes and pushes the metrics as far as they are known.
    """
    started, began = utc_now(), time.monotonic()
    ledger = open_ledger(config, client)
    announce_locations(store, ledger)
    exporter: Exporter | None = None
    book: StateBook | None = None

    def publish(code: int) -> None:
        # A run that found the lock held writes nothing: the run holding it will.
        if config.dry_run or code == EXIT_LOCKED:
            return
        states = {}
        if book is not None:
            with contextlib.suppress(StateError):  # already reported; the metrics still go out
                states = {service.key: book.service(service.key) for service in config.services}
        reports = exporter.reports if exporter is not None else []
        publish_metrics(config.metrics_file, config.pushgateway_url, config.pushgateway_instance, render_metrics(
            config.services, {report.service.key: report for report in reports}, states, code, started,
            time.monotonic() - began))

    STOP.when_overdue(lambda: publish(EXIT_STOPPED))
    try:
        if not config.dry_run:
            store.acquire()
        source = ExportSource(client, config.bucket, config.read_concurrency, config.max_export_file_bytes)
        clazar = None if config.dry_run else ClazarClient(config)
        try:
            book = StateBook(store)
            exporter = Exporter(config, source, clazar, book, ledger)
            exporter.run()
        finally:
            source.close()
            if clazar is not None:
                clazar.close()
            store.release()
        code = EXIT_OK if all(report.ok for report in exporter.reports) else EXIT_FAILED
    except (StateError, LockHeld) as error:
        log_run_error(error)
        code = error.exit_code
    except RunStopped as stop:
        log.warning("%s; the lock is released, no hour was committed in part, and the next run goes on from here",
                    stop)
        code = EXIT_STOPPED
    except Exception as error:
        code = EXIT_FAILED
        _report_defect(error)
    publish(code)
    return code


def _report_defect(error: Exception) -> None:
    """Log an exception no check foresaw: one ERROR line, the traceback only at DEBUG."""
    log.error("Unexpected %s: %s (a defect: please report it with the DEBUG log)",
              type(error).__name__, shown_text(str(error), 500))
    log.debug("Where it happened", exc_info=error)


PUSHGATEWAY_JOB = "metering_exporter"


def publish_metrics(metrics_file: str | None, pushgateway_url: str | None, instance: str | None, text: str) -> None:
    """Write the metrics to METRICS_FILE and push them to METRICS_PUSHGATEWAY_URL, each where set."""
    if metrics_file:
        write_metrics(metrics_file, text)
    if pushgateway_url:
        push_metrics(pushgateway_url, instance, text)


def write_metrics(path: str, text: str) -> None:
    try:
        write_file_atomically(path, [text.encode("utf-8")], mode=0o644)
    except OSError as error:
        log.error("Cannot write METRICS_FILE %s: %s", path, error.strerror or error)


def pushgateway_target(url: str, instance: str | None) -> str:
    """Where one run's metrics are PUT: ``<url>/metrics/job/metering_exporter``, and
    ``/instance/<instance>`` when an instance is set. A value with any character
    but letters, digits and ``._~-`` goes base64url-encoded (``instance@base64``),
    the Pushgateway's way of carrying '/' and anything else safely. Pure."""
    target = f"{url.rstrip('/')}/metrics/job/{PUSHGATEWAY_JOB}"
    if instance:
        if re.fullmatch(r"[A-Za-z0-9._~-]+", instance):
            target += "/instance/" + instance
        else:
            target += "/instance@base64/" + base64.urlsafe_b64encode(instance.encode("utf-8")).decode("ascii")
    return target


def push_metrics(url: str, instance: str | None, text: str) -> None:
    """PUT ``text`` to the Pushgateway, replacing what this job and instance pushed last.

    TLS is verified (a private CA goes in REQUESTS_CA_BUNDLE). A failure is a
    warning and never changes the exit code: the metrics must not fail a run that
    billed correctly, and the next run pushes again.
    """
    target = pushgateway_target(url, instance)
    parts = urlsplit(target)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never a password in the log
    # Shorter after a stop, which must end within seconds.
    timeout = (1.0, 2.0) if STOP.is_set() else (3.0, 5.0)
    try:
        with http_session() as session:
            status, body, _ = within_deadline(
                lambda: bounded_request(session, "PUT", target, 4096, data=text.encode("utf-8"), timeout=timeout,
                                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}),
                sum(timeout) * 2, "while pushing the metrics")
    except RequestFailed as error:
        log.warning("Could not push the metrics to %s: %s", shown, error)
        return
    except (DeadlinePassed, RunStopped):
        log.warning("Could not push the metrics to %s: no complete answer within %.0f s", shown, sum(timeout) * 2)
        return
    if not 200 <= status < 300:
        log.warning("Could not push the metrics to %s: HTTP %d: %s", shown, status,
                    escape_control(mask_secrets(body[:200].decode("utf-8", "replace"))))
        return
    log.debug("Pushed the metrics to %s", shown)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command and return its exit code.

    SIGTERM and SIGINT are handled from the start (see StopRequest): the run stops
    at the next safe point and ends with EXIT_STOPPED.

    Each call starts as a new process would: a new stop flag, no registered secret,
    no log handler; when it returns, the signal handlers and log handlers it found
    are back and its watchdog has ended, so a process may call it more than once.
    """
    global STOP
    STOP = StopRequest()
    _SECRETS.clear()
    root = logging.getLogger()
    found = (root.handlers[:], root.level, log.level)
    root.handlers[:] = []
    log.setLevel(logging.NOTSET)
    STOP.install()
    try:
        try:
            code = run_command(parse_arguments(argv), os.environ if environ is None else environ)
        except RunStopped as stop:
            log.warning("%s", stop)
            code = EXIT_STOPPED
        if STOP.is_set():
            # Everything worth keeping is written and the lock released. A request or
            # read left in flight must not hold up the exit, as the interpreter would
            # by joining its worker thread.
            flush_output()
            os._exit(code)
        return code
    finally:
        STOP.uninstall()
        handlers, level, own_level = found
        root.handlers[:] = handlers
        root.setLevel(level)
        log.setLevel(own_level)


def run_command(arguments: argparse.Namespace, environ: Mapping[str, str]) -> int:
    command = arguments.command or "run"
    try:
        config = load_config(environ, dry_run=arguments.dry_run, sends=command in ("run", "retry-failed"))
    except ConfigError as error:
        print(f"metering_processor: configuration error: {error}", file=sys.stderr)
        targets = metrics_targets_despite_error(environ, arguments.dry_run) if command == "run" else None
        if targets is not None:
            publish_metrics(*targets, render_metrics((), {}, {}, EXIT_CONFIG, utc_now(), 0.0))
        return EXIT_CONFIG
    STOP.set_timeout(config.stop_timeout_seconds)
    # Reports go to stdout, so the log of a reporting command goes to stderr.
    configure_logging(config.log_level, config.log_format, sys.stdout if command in ("run", "retry-failed") else sys.stderr)
    redact(config.client_secret)
    redact(urlsplit(config.pushgateway_url).password if config.pushgateway_url else None)
    try:
        return _run_command(command, config, arguments)
    except Exception as error:  # whatever happens, the user gets one line, never a traceback
        _report_defect(error)
        if command == "run" and not config.dry_run:
            publish_metrics(config.metrics_file, config.pushgateway_url, config.pushgateway_instance,
                            render_metrics(config.services, {}, {}, EXIT_FAILED, utc_now(), 0.0))
        return EXIT_FAILED


def _run_command(command: str, config: Config, arguments: argparse.Namespace) -> int:
    """Run one command with a valid configuration; returns its exit code. Expected
    failures are MeteringErrors, logged here; anything else propagates to run_command."""
    client = s3_client(config.read_concurrency)
    store = open_state_store(config, client)
    if command == "status":
        return show_status(config, client, store, arguments.json)
    if command == "retry-failed":
        ledger = open_ledger(config, client)
        announce_locations(store, ledger)
        try:
            if not config.dry_run:
                store.acquire()
            clazar = None if config.dry_run else ClazarClient(config)
            try:
                return retry_failed(config, StateBook(store), ledger, clazar, arguments.contract, arguments.hour)
            finally:
                if clazar is not None:
                    clazar.close()
                store.release()
        except (StateError, LockHeld) as error:
            log_run_error(error)
            return error.exit_code
    if command == "conflicts":
        return show_or_clear_conflicts(config, client, store, arguments)
    if command in ("reconcile", "history"):
        try:
            return report_on_ledger(config, client, store, arguments)
        except MeteringError as error:
            log.error("%s", error)
            return error.exit_code
    return export(config, client, store)


def show_or_clear_conflicts(config: Config, client: Any, store: LocalStateStore | S3StateStore,
                            arguments: argparse.Namespace) -> int:
    """conflicts: list them (read-only, no lock), or with --clear mark them resolved (with the lock).
    A dry run of --clear lists what it would clear and writes nothing."""
    ledger = open_ledger(config, client)
    announce_locations(store, ledger)
    try:
        if not arguments.clear or config.dry_run:
            found = list_waiting(config, StateBook(store), ledger, CONFLICT, arguments.contract, arguments.hour)
            if arguments.clear:
                log.info("Dry run: would clear the %d conflict(s) listed; nothing is written", len(found))
            print(json.dumps(found, indent=2) if arguments.json else format_waiting(found))
            return EXIT_OK
        store.acquire()
        try:
            return clear_conflicts(config, StateBook(store), ledger, arguments.contract, arguments.hour)
        finally:
            store.release()
    except MeteringError as error:
        log_run_error(error)
        return error.exit_code


def report_on_ledger(config: Config, client: Any, store: LocalStateStore | S3StateStore,
                     arguments: argparse.Namespace) -> int:
    """reconcile and history: read-only, no lock, no Clazar call."""
    ledger = open_ledger(config, client)
    announce_locations(store, ledger)
    if arguments.command == "history":
        last = arguments.last or floor_hour(utc_now())
        first = arguments.first or floor_hour(last - timedelta(days=31)).replace(hour=0)
        lines = contract_history(config, ledger, arguments.contract, first, last)
        print(json.dumps(lines, indent=2) if arguments.json else format_history(lines))
        return EXIT_OK
    if arguments.last < arguments.first:
        log.error("--to %s is before --from %s", format_time(arguments.last), format_time(arguments.first))
        return EXIT_CONFIG
    source = ExportSource(client, config.bucket, config.read_concurrency, config.max_export_file_bytes)
    try:
        result = reconcile(config, Exporter(config, source, None, StateBook(store), ledger),
                           arguments.first, arguments.last)
    finally:
        source.close()
    print(format_reconciliation(result, arguments.style))
    return EXIT_FAILED if result["differences"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
