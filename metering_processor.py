#!/usr/bin/env python3
"""Export Omnistrate usage-metering data from S3 to Clazar, one final hour at a time.

Run it hourly (cron, a systemd timer, a Kubernetes CronJob). One state file is one
*deployment*: every service key it is configured with (``service:environment:plan``,
each with its marketplace) is billed together. For each hour that Omnistrate's
export marker declares final for every one of them, the run reads that hour's
files from S3, sums the usage per marketplace contract and dimension across the
services, and sends one metering record for each to Clazar.

Clazar accepts one record per contract, dimension and hour and refuses any later
correction, so the run is built around three rules:

* an hour is read only once the export marker declares it final for every service;
* an hour is sent whole or not at all: a bad file fails the hour before anything
  of it is sent;
* the outgoing records of an hour are written to the state before the first
  request, and a crashed hour is resent from the state, never recomputed.

Map of this file (each section uses only what comes before it):

 1. Exit codes, errors, outcomes and the stop flag
 2. Untrusted text: escaping, times, the JSON reader, masking, logging
 3. Configuration: the settings table, formulas, service keys, load_config
 4. Hours and the export marker
 5. Billing rules (pure): export files, an hour's usage, formulas, carry,
    late usage, record limits, what "already exists" means
 6. The durable model: pending hour, accounted hour, the state and its codec,
    ledger lines and their codec
 7. Adapters: S3 reads, Clazar, storage of the state and the ledger, locks
 8. The export run
 9. Operator commands: status, history, reconcile, conflicts, retry-failed
10. Metrics, signals and the command line
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
import difflib
import enum
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Union
from urllib.parse import urlsplit

__version__ = "2.0.0"

log = logging.getLogger("metering")

# A (contract, dimension) pair: the key of every amount, remainder and record.
Key = tuple[str, str]
Environ = Mapping[str, str]


# ===========================================================================
# 1. Exit codes, errors, outcomes and the stop flag
# ===========================================================================


class ExitCode(enum.IntEnum):
    """What a run ends with; alerts and the README's table follow these."""

    OK = 0  # everything due was done, or nothing was due
    FAILED = 1  # an hour failed, or a record was rejected or in conflict
    CONFIG = 2  # a setting is missing or invalid
    LOCKED = 3  # another run holds the lock
    STATE = 4  # the state or the ledger could not be read or written safely
    STOPPED = 5  # SIGTERM or SIGINT: stopped at a safe point


class MeteringError(Exception):
    """Base of every error this module raises on purpose; carries the exit code."""

    exit_code = ExitCode.FAILED


class ConfigError(MeteringError):
    """A missing or invalid setting. The message names the variable."""

    exit_code = ExitCode.CONFIG

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class MarkerError(MeteringError):
    """The export marker cannot tell whether an hour is final."""


class SourceError(MeteringError):
    """An export object could not be listed or read in time."""


class ExportFileError(MeteringError):
    """An export file is not what Omnistrate documents. The message names its S3 key."""


class FormulaError(MeteringError):
    """A dimension formula cannot be computed for a contract and hour."""


class QuantityError(MeteringError):
    """A record's quantity is more than its marketplace accepts, or no longer fits the settings."""


class ClazarError(MeteringError):
    """A batch had no usable answer. ``may_have_landed``: Clazar may have stored its records
    (no answer, a 5xx, a retried request, a 200 that could not be read). ``answered``: when
    raised by a whole delivery, each record's result, None where its batch had none."""

    may_have_landed = True
    answered: list = []


class ClazarAuthError(ClazarError):
    """Clazar refused the credentials; nothing was sent."""

    may_have_landed = False


class StateError(MeteringError):
    """The state cannot be read, is corrupt, or could not be written safely."""

    exit_code = ExitCode.STATE


class LedgerError(StateError):
    """The ledger could not be read or written, or a line of it is corrupt."""


class LockHeld(MeteringError):
    """Another run holds the lock on this state."""

    exit_code = ExitCode.LOCKED


# What happened to one record; the ledger keeps one of these per line. A record's
# latest line is its fate.
DELIVERED = "delivered"
ALREADY_DELIVERED = "already delivered"  # "already exists", and the record is ours
REJECTED = "rejected"
CONFLICT = "conflict"  # "already exists", and the record is someone else's
RETRY_DELIVERED = "delivered on retry"
NOT_SENT = "not sent: zero quantity"
NO_ANSWER = "sent, no answer yet"  # its request may have landed; the resend decides
UNSENT = "not sent yet"  # its request was never sent, or refused before Clazar read it
RESENDING = "resending"  # retry-failed sent it; an answer is awaited
CONFLICT_CLEARED = "conflict cleared"
ACCEPTED_OUTCOMES = (DELIVERED, ALREADY_DELIVERED, RETRY_DELIVERED)
WAITING_OUTCOMES = (REJECTED, CONFLICT)
ANSWERED_OUTCOMES = (*ACCEPTED_OUTCOMES, *WAITING_OUTCOMES)  # Clazar said what became of it
RECORD_OUTCOMES = (*ACCEPTED_OUTCOMES, *WAITING_OUTCOMES, NOT_SENT, NO_ANSWER, UNSENT, RESENDING,
                   CONFLICT_CLEARED)


class RunStopped(BaseException):
    """A stop was asked for (a signal, or the run's time ran out) and the run stopped at a
    safe point. A BaseException, like KeyboardInterrupt, so that no handler meant for a
    bad file, a failed hour or an unreachable store takes it for one of those."""

    exit_code = ExitCode.STOPPED
    answered: list = []
    may_have_landed = True  # when raised while a batch was being sent


class StopRequest:
    """SIGTERM, SIGINT or the run's deadline, turned into a flag the run looks at where
    stopping is safe: between hours, before an hour's records are recorded as pending,
    before each batch and each retry, between files read; and, in the commands that only
    read, between hours and ledger files.

    A flag cannot interrupt a call that never returns, so a watchdog bounds the stop:
    ``deadline`` seconds after the request, a process still running writes what it can
    (``when_overdue``) and ends at once. That is as safe as SIGKILL, which the state's
    design survives at every step. ``grace`` is how long a stop waits for answers to
    batches already in flight, so that an hour whose batches all answered is committed.
    """

    POLL_SECONDS = 0.2

    def __init__(self, deadline: float = 10.0):
        self._event = threading.Event()
        self._retired = threading.Event()
        self.reason = ""
        self.exit_code = ExitCode.STOPPED
        self.deadline = deadline
        self._last_words: Callable[[], None] | None = None
        self._watchdog: threading.Thread | None = None
        self._previous: dict[int, Any] = {}
        # Looked at by every check: may ask for a stop itself (a lease that lapsed).
        self.guard: Callable[[], None] | None = None

    @property
    def grace(self) -> float:
        return self.deadline / 2

    @property
    def last_words_seconds(self) -> float:
        return self.deadline / 5

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on and start the watchdog (main thread only).

        Python's defaults do not fit: SIGINT raises KeyboardInterrupt wherever the run
        happens to be, and SIGTERM has no handler, so as PID 1 in a container (where the
        kernel drops signals without one) it is ignored until SIGKILL. The watchdog starts
        now, not from a handler, which may run while the main thread holds a lock that
        starting a thread needs."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.getsignal(number)
            signal.signal(number, self._receive)
        self._watchdog = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
        self._watchdog.start()

    def _receive(self, number: int, frame: Any) -> None:
        self.request(f"{signal.Signals(number).name} received")

    def retire(self) -> None:
        """End the watchdog and give SIGTERM and SIGINT back their handlers from before
        install: the run is over (main may be called again in one process)."""
        self._retired.set()
        if self._watchdog is not None:
            self._watchdog.join()
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def request(self, reason: str, exit_code: ExitCode = ExitCode.STOPPED) -> None:
        """Ask the run to stop. Only sets the flag: a signal handler runs between two
        bytecodes of the main thread, possibly inside a state write or a log call."""
        if not self._event.is_set():
            self.reason, self.exit_code = reason, exit_code
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, where: str) -> None:
        """Raise RunStopped, saying ``where`` the run stopped, once a stop was asked for."""
        if self.guard is not None and not self._event.is_set():
            self.guard()
        if self._event.is_set():
            stopped = RunStopped(f"{self.reason}: stopped {where}")
            stopped.exit_code = self.exit_code
            raise stopped

    def result(self, future: concurrent.futures.Future, where: str) -> Any:
        """``future.result()``, or RunStopped as soon as a stop is asked for."""
        while True:
            try:
                return future.result(timeout=self.POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                self.check(where)

    def when_overdue(self, last_words: Callable[[], None] | None) -> None:
        """What the watchdog runs before ending an overdue stop (write the metrics). It runs
        on another thread while the main one may be anywhere, for at most a fifth of the
        deadline."""
        self._last_words = last_words

    def _watch(self) -> None:
        # Waits on the retirement, not on the stop flag: the run's end must not wait out a
        # poll (the flag is only set, never waited on, so a signal handler cannot block).
        while not self._retired.wait(self.POLL_SECONDS):
            if self._event.is_set():
                break
        else:
            return
        ends = time.monotonic() + self.deadline - self.last_words_seconds
        while time.monotonic() < ends:
            if self._retired.wait(min(self.POLL_SECONDS, max(0.0, ends - time.monotonic()))):
                return
        # Still here: the main thread is held by a call no flag reaches. Whatever the
        # last words do (log, write, push), they must not hold up the exit either.
        speaker = threading.Thread(target=self._say_last_words, name="stop-last-words", daemon=True)
        speaker.start()
        speaker.join(self.last_words_seconds)
        os._exit(self.exit_code)

    def _say_last_words(self) -> None:
        log.warning("%s, but the run had not stopped %.0f s later: a call to S3 or Clazar is not "
                    "answering. Ending it now (exit %d): no hour is committed in part, a pending "
                    "hour stays pending for the next run, and an S3 lease left behind lapses by "
                    "itself",
                    self.reason, self.deadline - self.last_words_seconds, self.exit_code)
        if self._last_words is not None:
            try:
                self._last_words()
            except Exception as error:  # the exit comes regardless
                log.warning("Could not write the metrics before ending: %s: %s",
                            type(error).__name__, error)
        flush_output()


def flush_output() -> None:
    """Flush the log handlers and the standard streams (os._exit skips Python's shutdown)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# Replaced by a fresh one at the start of every command (see main).
STOP = StopRequest()


# ===========================================================================
# 2. Untrusted text: escaping, times, the JSON reader, masking, logging
# ===========================================================================

# Characters that could end a log line, move the cursor or restyle a terminal, or
# reorder what is shown: C0 and C1 controls, DEL, Unicode line and paragraph
# separators and bidirectional overrides; and lone surrogates, which JSON can carry
# (\ud800) and undecodable environment bytes become, but no UTF-8 stream can write.
CONTROL_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


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
    more = f" (and {len(text) - limit} more characters)" if len(text) > limit else ""
    return escape_control(repr(text[:limit])) + more


# --- Times -------------------------------------------------------------------

HOUR = timedelta(hours=1)
_TIME_PATTERN = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2})(?::(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?)?)?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE | re.ASCII,
)
# Every time the exporter accepts, from a variable, the marker, the state or the
# ledger, lies in this range: far from datetime's limits, so adding an hour or a
# day to it, or a retention of days, can never overflow.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(3000, 1, 1, tzinfo=timezone.utc)


@functools.lru_cache(maxsize=4096)  # the same few hours, for thousands of lines an hour
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


def parse_utc(text: Any) -> datetime:
    """Parse an ISO 8601 time into an aware UTC datetime; a time with no offset is UTC.

    Fractions of a second are dropped. Raises ValueError on anything else, and on a
    time before EARLIEST_TIME or from LATEST_TIME on.
    """
    match = _TIME_PATTERN.match(text.strip()) if isinstance(text, str) and len(text) <= 64 else None
    if not match:
        raise ValueError(f"not an ISO 8601 time: {shown_text(text)}")
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), tzinfo=timezone.utc)
        if offset and offset.upper() != "Z":
            sign = 1 if offset[0] == "+" else -1
            digits = offset[1:].replace(":", "")
            moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    except (ValueError, OverflowError) as error:
        raise ValueError(f"not a valid time: {shown_text(text)} ({error})") from None
    if not EARLIEST_TIME <= moment < LATEST_TIME:
        raise ValueError(f"{shown_text(text)} is outside {format_time(EARLIEST_TIME)} .. "
                         f"{format_time(LATEST_TIME)}")
    return moment


def parse_hour(text: Any) -> datetime:
    """parse_utc for a whole hour. Raises ValueError for any other time."""
    hour = parse_utc(text)
    if hour != floor_hour(hour):
        raise ValueError(f"{shown_text(text)} is not a whole hour")
    return hour


def hours_between(first: datetime, end: datetime) -> int:
    """How many whole hours lie in [first, end); 0 when end is not after first."""
    return max(0, int((end - first) // HOUR))


# --- The JSON reader -------------------------------------------------------------
#
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
        document = json.loads(text, object_pairs_hook=_unique_fields,
                              parse_constant=_reject_constant, **hooks)
    except RecursionError:
        document = None
    except ValueError as error:
        problem = str(error)
        raise ValueError(problem if problem.startswith("holds the field")
                         else f"is not valid JSON ({problem})") from None
    else:
        if not _deeper_than(document, MAX_JSON_DEPTH):
            return document
    raise ValueError(f"is nested more than {MAX_JSON_DEPTH} levels deep")


# --- Masking ---------------------------------------------------------------------
#
# Every secret the run can see (the Clazar secret and each access token it is given,
# the Pushgateway password, the AWS secret key and session token) is registered with
# ``redact`` and masked wherever text leaves the process, in every escaped form a
# library may print it. Text from outside (Clazar's answers, error bodies) is also
# masked for anything shaped like a credential and for e-mail addresses (export
# files carry customers' addresses). Names from the configuration are not: a
# service called "Vault Secret" stays itself.
#
# Every pattern runs in time linear in the text: a match can start only where a run
# of its characters starts (the lookbehinds), so a long run without an ending
# ("aaaa...", "-eyJ-eyJ...") is scanned once, not once from each of its characters.

_SECRETS: dict[str, re.Pattern] = {}
_SHAPES = (
    (re.compile(r"(?<=://)[^/\s@]+@"), "[userinfo]@"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [redacted]"),
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
     "[redacted]"),
    (re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
)
# In outside text only: the value of a field named like a credential.
_CREDENTIAL_FIELD = re.compile(
    r"""(?i)((?:access_token|refresh_token|id_token|token|client_secret|secret|password)"""
    r"""["']?\s*[:=]\s*["']?)[^"'\s,;&}]+""")
MASKED_TEXT_LIMIT = 1000
_SHORT_ESCAPES = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t", "\x0b": "v", "\x07": "a"}
_HTML_NAMES = {'"': "quot", "&": "amp", "<": "lt", ">": "gt", "'": "apos"}


def _case_free(text: str) -> str:
    """A pattern matching ``text`` (hexadecimal digits) in either case."""
    return "".join(f"[{char.lower()}{char.upper()}]" if char.isalpha() else char for char in text)


def _character_forms(char: str) -> list[str]:
    """Patterns for one character of a secret, as written or as JSON (``\\u00e9``, ``\\"``,
    escaped again when JSON is embedded in JSON), URL (``%2F``, ``+``), HTML (``&#47;``,
    ``&quot;``) and Python ``repr`` of text or bytes (``\\x0b``, ``\\n``, ``\\U0001f600``)
    escapes them. Fixed alternatives with bounded repeats: linear to search."""
    code, encoded = ord(char), char.encode("utf-8", "surrogatepass")
    units = [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10),
                                           0xDC00 + ((code - 0x10000) & 0x3FF)]
    slashes = r"\\{1,8}"
    forms = [re.escape(char),
             "".join(slashes + "u" + _case_free(f"{unit:04x}") for unit in units),
             slashes + "U" + _case_free(f"{code:08x}"),
             "".join("%" + _case_free(f"{byte:02x}") for byte in encoded),
             "".join(slashes + "x" + _case_free(f"{byte:02x}") for byte in encoded),
             f"&#0*{code};", "&#[xX]0*" + _case_free(f"{code:x}") + ";"]
    if code < 0x100:
        forms.append(slashes + "x" + _case_free(f"{code:02x}"))
    if char in "\"'\\/":
        forms.append(slashes + re.escape(char))
    if char in _SHORT_ESCAPES:
        forms.append(slashes + _SHORT_ESCAPES[char])
    if char == " ":
        forms.append(r"\+")
    if char in _HTML_NAMES:
        forms.append(f"&{_HTML_NAMES[char]};")
    return forms


def _secret_pattern(secret: str) -> re.Pattern:
    return re.compile("".join("(?:" + "|".join(_character_forms(char)) + ")" for char in secret))


def redact(secret: str | None) -> None:
    """Mask ``secret`` in everything written or printed from now on, as it is, without the
    whitespace around it (a mounted secret often ends in a newline), and escaped."""
    for text in {secret or "", (secret or "").strip()}:
        if len(text) >= 4 and text not in _SECRETS:
            _SECRETS[text] = _secret_pattern(text)


def forget_secrets() -> None:
    """Forget every registered secret (each command registers its own)."""
    _SECRETS.clear()


def mask_known_secrets(text: str) -> str:
    """``text`` with every registered secret masked, and nothing else."""
    for pattern in _SECRETS.values():
        text = pattern.sub("[redacted]", text)
    return text


def mask_secrets(text: str) -> str:
    """``text`` with the registered secrets, tokens, URL passwords and e-mail addresses masked:
    what every log line goes through."""
    text = mask_known_secrets(text)
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def mask_outside(text: str) -> str:
    """mask_secrets, and the values of fields named like credentials: for text from outside."""
    return _CREDENTIAL_FIELD.sub(r"\1[redacted]", mask_secrets(text))


def mask_value(value: Any, depth: int = 0) -> Any:
    """A JSON value from elsewhere (a Clazar answer, an error), fit to store and show: every
    string masked with mask_outside, then cut to MASKED_TEXT_LIMIT characters (in that
    order: a secret straddling the cut is masked whole, not kept in part), at most 50
    items per list or object and 8 levels, numbers kept."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= 8:
        return "[nested]"
    if isinstance(value, dict):
        return {mask_outside(str(key))[:100]: mask_value(item, depth + 1)
                for key, item in itertools.islice(value.items(), 50)}
    if isinstance(value, (list, tuple)):
        return [mask_value(item, depth + 1) for item in value[:50]]
    return mask_outside(str(value))[:MASKED_TEXT_LIMIT]


# --- Logging ---------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
# The hour being worked on, for JSON log lines.
_HOUR_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "metering_hour", default=None)


class _Redactor(logging.Filter):
    """Masks secrets and e-mail addresses in every log line, whoever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask_secrets(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
        record.hour = _HOUR_CONTEXT.get()
        return True


class TextLogFormatter(logging.Formatter):
    """LOG_FORMAT, one line per message whatever the data in it: control characters are
    escaped, and a traceback's lines are indented so none can pass for a log line."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        masked = record.exc_text  # set by the redactor, unindented
        if masked:
            record.exc_text = "\n".join("    " + escape_control(line)
                                        for line in masked.splitlines())
        try:
            return super().format(record)
        finally:
            record.exc_text = masked


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the hour when known."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, timezone.utc)
        entry = {"time": moment.isoformat(timespec="milliseconds")[:-6] + "Z",
                 "level": record.levelname, "message": escape_control(record.getMessage())}
        if getattr(record, "hour", None):
            entry["hour"] = record.hour
        if record.exc_info:
            entry["exception"] = escape_control(record.exc_text
                                                or self.formatException(record.exc_info))
        # A lone surrogate left anywhere (a variable read from undecodable bytes) is
        # written as its JSON escape rather than failing the write.
        text = json.dumps(entry, ensure_ascii=False)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def configure_logging(level: str, log_format: str = "text", stream: Any = None) -> None:
    """Send the exporter's messages to ``stream`` (stdout), replacing any earlier handler.

    Only the exporter's own messages follow ``level``: botocore at DEBUG logs whole
    response bodies, and export files carry customer e-mail addresses."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    handler.addFilter(_Redactor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)


@contextlib.contextmanager
def working_on(hour: datetime) -> Iterator[None]:
    """Name ``hour`` in the JSON log lines written meanwhile."""
    token = _HOUR_CONTEXT.set(format_time(hour))
    try:
        yield
    finally:
        _HOUR_CONTEXT.reset(token)


# ===========================================================================
# 3. Configuration: the settings table, formulas, service keys, load_config
# ===========================================================================

DEFAULT_API_URL = "https://api.clazar.io/metering/"
EXPORT_ROOT = "omnistrate-metering/"
MARKER_KEY = EXPORT_ROOT + "last_success_export.json"
CLOUDS = ("aws", "azure", "gcp")
# How long after an hour each marketplace still accepts its usage: AWS refuses usage
# 6 hours or more after the fact, Azure takes the past 24 hours; GCP is the strictest
# commonly quoted.
LATENESS_WINDOWS = {"aws": 6, "azure": 24, "gcp": 1}
# The largest quantity one usage record may carry: AWS Marketplace's
# UsageRecord.Quantity is a 32-bit integer. No limit is known for Azure or GCP.
RECORD_QUANTITY_LIMITS: dict[str, int | None] = {"aws": 2**31 - 1, "azure": None, "gcp": None}
# Omnistrate's documented dimensions: the names formulas may use, with their price
# totals. A dimension outside the list still passes through when no formula is set.
OMNISTRATE_DIMENSIONS = ("cpu_core_hours", "memory_byte_hours", "storage_allocated_byte_hours",
                         "replica_hours")
PRICE_SUFFIX = "_total_price"
# Omnistrate's own query casts value to BIGINT; anything larger is corrupt data.
MAX_VALUE = 2**63 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


_SURROGATES = re.compile("[\ud800-\udfff]")


def check_utf8(variable: str, value: str) -> None:
    """Raise ConfigError naming ``variable`` if its value came from bytes that are not UTF-8
    (Python turns each such byte into a lone surrogate): a Latin-1 config file, say."""
    if _SURROGATES.search(value):
        raise ConfigError(variable, "is not valid UTF-8 text; save the file it comes from as UTF-8")


def check_unquoted(variable: str, value: str) -> None:
    """Raise ConfigError naming ``variable`` if its value is wrapped in quotes: the shell and
    systemd take them off, but `docker run --env-file` keeps them as part of the value."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        raise ConfigError(variable, "is wrapped in quotes, which are part of the value where "
                                    "docker run --env-file reads it; write it without them")


@dataclass(frozen=True)
class Setting:
    """One environment variable: the one place its name, kind, default, bounds and
    meaning are written. --help, the configuration page and config.env.example are
    made from (or checked against) the table below."""

    name: str
    meaning: str
    default: Any = None
    kind: str = "text"  # text, integer, number, flag or choice
    bounds: tuple = ()  # (minimum, maximum), or the choices
    shown: str | None = None  # the default as the table shows it, where it is computed
    group: str = "optional"

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "(unset)"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def shown_bounds(self) -> str:
        if self.kind in ("integer", "number"):
            return f"{self.bounds[0]:g} to {self.bounds[1]:g}" if self.kind == "number" \
                else f"{self.bounds[0]} to {self.bounds[1]}"
        return ", ".join(self.bounds) if self.kind == "choice" else ""


SETTINGS = (
    Setting("S3_BUCKET_NAME", "bucket holding omnistrate-metering/", shown="(required)",
            group="required"),
    Setting("SERVICE_NAME", "one service: Omnistrate's service name (may contain spaces)",
            shown="(required unless SERVICES)", group="required"),
    Setting("ENVIRONMENT_TYPE", "one service: its environment type (PROD, DEV)",
            shown="(required unless SERVICES)", group="required"),
    Setting("PLAN_ID", "one service: its plan (product tier) id, pt-...",
            shown="(required unless SERVICES)", group="required"),
    Setting("SERVICES", "several services billed together: service:environment:plan[=cloud], "
                        "comma-separated; replaces the three above", group="required"),
    Setting("CLAZAR_CLIENT_ID", "Clazar API client id", shown="(required to send)",
            group="required"),
    Setting("CLAZAR_CLIENT_SECRET", "Clazar API client secret", shown="(required to send)",
            group="required"),
    Setting("CLAZAR_CLIENT_SECRET_FILE",
            "a file holding the secret instead (a systemd credential, a mounted secret)"),
    Setting("CLAZAR_CLOUD", "marketplace of a service without =cloud in SERVICES", "aws", "choice",
            CLOUDS),
    Setting("CLAZAR_API_URL", "metering endpoint; tokens come from its origin + /authenticate/",
            DEFAULT_API_URL),
    Setting("CLAZAR_BATCH_SIZE", "records per request", 25, "integer", (1, 1000)),
    Setting("CLAZAR_MAX_RETRIES",
            "retries of one request after an error, a timeout, 429 or 5xx; fewer fail sooner and "
            "leave the hour to the next run", 5, "integer", (0, 20)),
    Setting("CLAZAR_TIMEOUT_SECONDS", "read timeout of one request, for a slow network; the waits "
                                      "between retries are a twentieth of it, doubling, and a "
                                      "Retry-After is honoured up to three times "
                                      "it", 20.0, "number", (0.1, 600.0)),
    Setting("MAX_RECORD_QUANTITY",
            "the largest quantity one record may carry, for every marketplace",
            kind="integer", bounds=(1, MAX_VALUE), shown="aws 2147483647, azure and gcp none"),
    Setting("STATE_FILE_PATH", "the state: a path or s3://bucket/key; one state is one deployment",
            "./metering_state.json"),
    Setting("LEDGER_PATH", "audit ledger: a folder or s3://bucket/prefix",
            shown="metering_ledger beside the state"),
    Setting("LEDGER_RETENTION_DAYS", "days of ledger kept, for your audit period", 400, "integer",
            (1, 36500)),
    Setting("START_HOUR",
            "first hour a new deployment sends, e.g. 2026-02-10T14:00:00Z; no earlier hour is ever "
            "sent", shown="24 hours before the first run"),
    Setting("MAX_HOURS_PER_RUN", "hours per run, oldest first; the rest wait for the next run", 24,
            "integer", (1, 24 * 366)),
    Setting("LATE_USAGE",
            "usage found for an hour already billed: report it, or carry it to the next "
            "hour", "report", "choice", ("report", "carry")),
    Setting("LATE_USAGE_LOOKBACK_HOURS", "processed hours checked each run for files added or "
                                         "rewritten since (0: none)", 24, "integer", (0, 720)),
    Setting("EXPORT_STALE_HOURS",
            "warn when the export marker's data ends longer ago than this, for an export that runs "
            "less often than hourly", 3, "integer", (1, 24 * 400)),
    Setting("MAX_EXPORT_FILE_BYTES",
            "an export file larger than this fails its hour unread; bounds "
            "memory", 64 * 2**20, "integer", (1024, 2**30)),
    Setting("S3_TIMEOUT_SECONDS",
            "longest time reading one S3 object or listing one hour's folder may "
            "take", 120.0, "number", (1.0, 3600.0)),
    Setting("RUN_TIMEOUT_MINUTES", "a run still going after this stops at a safe point (exit 1), "
                                   "before the next one is due", 50, "integer", (1, 24 * 60)),
    Setting("STOP_TIMEOUT_SECONDS",
            "a stop (SIGTERM, SIGINT) ends within this, for a runtime whose grace before SIGKILL "
            "is shorter (docker stop: 10)", 10.0, "number", (2.0, 300.0)),
    Setting("DRY_RUN", "true: read and print what would be sent; send and write nothing", False,
            "flag"),
    Setting("LOG_LEVEL", "the exporter's own messages", "INFO", "choice", LOG_LEVELS),
    Setting("LOG_FORMAT", "text, or json: one object per line", "text", "choice", ("text", "json")),
    Setting("METRICS_FILE", "Prometheus textfile written at the end of each run", group="metrics"),
    Setting("METRICS_PUSHGATEWAY_URL", "Prometheus Pushgateway the same metrics are pushed to",
            group="metrics"),
    Setting("DIMENSION<n>_NAME", "billing dimension n (1 to 999) sent to Clazar", group="formulas"),
    Setting("DIMENSION<n>_FORMULA", "its formula over Omnistrate's dimensions", group="formulas"),
)
SETTING_NAMES = {setting.name: setting for setting in SETTINGS}
_DIMENSION_VARIABLE = re.compile(r"^DIMENSION([1-9][0-9]*)_(NAME|FORMULA)$")
# Variables starting like these are meant for the exporter: one it does not know is a typo.
_OUR_PREFIXES = ("CLAZAR_", "S3_", "STATE_", "LEDGER_", "LATE_", "EXPORT_", "METRICS_", "DIMENSION",
                 "SERVICE", "START_", "STOP_", "RUN_", "DRY_")


# Settings of development versions, with what took their place: named when still set.
REMOVED_SETTINGS = {
    "CLAZAR_CONCURRENCY": "4 requests are in flight at once",
    "CLAZAR_BACKOFF_SECONDS": "the waits between retries follow CLAZAR_TIMEOUT_SECONDS",
    "CLAZAR_RETRY_AFTER_MAX_SECONDS": "a Retry-After is honoured up to 3 x CLAZAR_TIMEOUT_SECONDS",
    "CLAZAR_AUTH_URL": "tokens come from CLAZAR_API_URL's origin + /authenticate/",
    "STATE_LOCK_TTL_SECONDS": "an S3 lease lasts 15 minutes, renewed while the run works",
    "S3_READ_CONCURRENCY": "32 export files are read at once",
    "READ_AHEAD_HOURS": "2 hours are read ahead (1 when an hour holds 1,000 files or more)",
    "EXPORT_MARKER_LAG_MINUTES": "an hour is final once the marker says so",
    "LATENESS_WINDOW_HOURS": "each marketplace's own window applies (aws 6, azure 24, gcp 1)",
    "OMNISTRATE_DIMENSIONS": "formulas name Omnistrate's documented dimensions",
    "METRICS_PUSHGATEWAY_INSTANCE": "the push is grouped by deployment (the state's location)",
}


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """A warning for each variable that looks meant for the exporter but is not one of its
    settings, naming the closest setting ("CLAZAR_CLOUDS is not a setting; did you mean
    CLAZAR_CLOUD?") or what replaced a removed one. Pure."""
    known = [name for name in SETTING_NAMES if "<" not in name]
    warnings = []
    for name in sorted(environ):
        if name in SETTING_NAMES or _DIMENSION_VARIABLE.match(name):
            continue
        if name in REMOVED_SETTINGS:
            warnings.append(f"{name} is no longer a setting ({REMOVED_SETTINGS[name]}); remove it")
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close or name.startswith(_OUR_PREFIXES):
            why = f"; did you mean {close[0]}?" if close else " of this exporter; it is ignored"
            warnings.append(f"{escape_control(name[:60])} is not a setting{why}")
    return warnings


# --- Formulas --------------------------------------------------------------------
#
# A formula is parsed once at start-up with Python's ``ast`` and checked node by node
# against an allow-list; it is then evaluated by walking that tree with Fractions.
# Nothing is ever compiled or executed, so a formula cannot run code.

MAX_FORMULA_LENGTH = 1000
MAX_EXPONENT = 64
MAX_ROUND_DIGITS = 20
# Every value a formula computes, intermediate or final, has a numerator and a
# denominator below 2**MAX_FORMULA_BITS (about 308 digits), whatever the nesting: each
# step is checked before the next, and a power before it is computed, so no formula
# can take unbounded time or memory.
MAX_FORMULA_BITS = 1024
MAX_DIMENSION_NUMBER = 999
_DIMENSION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
FORMULA_NAMES = frozenset(OMNISTRATE_DIMENSIONS) | {name + PRICE_SUFFIX
                                                    for name in OMNISTRATE_DIMENSIONS}


class _ValueTooLarge(Exception):
    pass


def _bounded(value: Any) -> Any:
    """``value`` (an int or a Fraction) if within MAX_FORMULA_BITS; else raise _ValueTooLarge."""
    if isinstance(value, int):
        bits = value.bit_length()
    else:
        bits = max(value.numerator.bit_length(), value.denominator.bit_length())
    if bits > MAX_FORMULA_BITS:
        raise _ValueTooLarge
    return value


def _power(base: Any, exponent: int) -> Any:
    # |a**e| has at least e * (bits(a) - 1) + 1 bits: refuse before computing it.
    base = Fraction(base)
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if abs(exponent) * (bits - 1) > MAX_FORMULA_BITS:
        raise _ValueTooLarge
    return base**exponent


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


def _evaluate(node: ast.expr, values: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _bounded(values.get(node.id, 0))
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        return _bounded(_BINARY[type(node.op)](left, right))
    function = _FUNCTIONS[node.func.id][0]  # after checking, the only node left is a Call
    return _bounded(function(*(_evaluate(argument, values) for argument in node.args)))


@dataclass(frozen=True)
class Formula:
    """One configured billing dimension: its name, its source text and its checked tree."""

    variable: str
    name: str
    text: str
    tree: ast.expr = field(repr=False, compare=False)

    @property
    def inputs(self) -> frozenset[str]:
        """The names the formula reads."""
        return frozenset(node.id for node in ast.walk(self.tree) if isinstance(node, ast.Name)
                         and node.id not in _FUNCTIONS)

    def evaluate(self, values: Mapping[str, Any]) -> Fraction:
        """Evaluate with exact arithmetic (a name absent from ``values`` is 0). Raises
        FormulaError on division by zero, or when any value it computes or is given is
        beyond MAX_FORMULA_BITS."""
        try:
            return Fraction(_evaluate(self.tree, values))
        except ZeroDivisionError:
            raise FormulaError(f"{self.variable} ({self.name} = {self.text}) divides by "
                               "zero") from None
        except _ValueTooLarge:
            raise FormulaError(f"{self.variable} ({self.name} = {self.text}) computes a value "
                               f"beyond 2**{MAX_FORMULA_BITS} (numerator or denominator)") from None


def _literal_integer(node: ast.expr) -> int | None:
    """The value of an integer literal, optionally negated; None for anything else."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    return None


def compile_formula(variable: str, name: str, text: str) -> Formula:
    """Parse and check one formula.

    The grammar: numbers, FORMULA_NAMES, + - * / // % **, parentheses, unary minus,
    and min, max, abs and round. Raises ConfigError naming ``variable`` for anything
    else, for ** with anything but a whole-number literal exponent of at most
    MAX_EXPONENT, for round digits other than a literal within MAX_ROUND_DIGITS, and
    for a literal beyond MAX_FORMULA_BITS.
    """
    source = text.strip()
    if len(source) > MAX_FORMULA_LENGTH:
        raise ConfigError(variable, f"is longer than {MAX_FORMULA_LENGTH} characters")
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ConfigError(variable,
                          f"is not a valid formula: {getattr(error, 'msg', error)}") from None
    return Formula(variable, name, source, _FormulaChecker(variable, source).check(tree, 0))


class _FormulaChecker:
    """Checks a formula's tree node by node against the grammar, making literals exact."""

    def __init__(self, variable: str, source: str):
        self.variable = variable
        self.source = source

    def refuse(self, problem: str) -> ConfigError:
        return ConfigError(self.variable, problem)

    def check(self, node: ast.AST, depth: int) -> ast.expr:
        if depth > 50:
            raise self.refuse("is nested too deeply: more than 50 levels (each term of a long "
                              "sum or product is a level: split it with parentheses)")
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            if node.id not in FORMULA_NAMES:
                raise self.refuse(f"uses unknown name {node.id!r}; known: "
                                  f"{', '.join(sorted(FORMULA_NAMES))}")
            return node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            node.operand = self.check(node.operand, depth + 1)
            return node
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.binary(node, depth)
        if isinstance(node, ast.Call) and isinstance(node.func,
                                                     ast.Name) and node.func.id in _FUNCTIONS:
            return self.call(node, depth)
        shown = ast.get_source_segment(self.source, node) or type(node).__name__
        raise self.refuse(f"may not contain {shown!r} ({type(node).__name__}); see --help for the "
                          "formula grammar")

    def constant(self, node: ast.Constant) -> ast.expr:
        if type(node.value) is int:
            value: Any = node.value
        elif type(node.value) is float and math.isfinite(node.value):
            # repr is the shortest text that reads back as the literal: 0.01 becomes exactly 1/100.
            value = Fraction(repr(node.value))
        else:
            raise self.refuse(f"may only contain numbers, not {shown_text(node.value)}")
        try:
            return ast.copy_location(ast.Constant(_bounded(value)), node)
        except _ValueTooLarge:
            raise self.refuse(f"holds a number beyond 2**{MAX_FORMULA_BITS}") from None

    def binary(self, node: ast.BinOp, depth: int) -> ast.expr:
        if isinstance(node.op, ast.Pow):
            exponent = _literal_integer(node.right)
            if exponent is None or abs(exponent) > MAX_EXPONENT:
                raise self.refuse(f"** needs a whole-number literal exponent from -{MAX_EXPONENT} "
                                  f"to {MAX_EXPONENT}")
            if isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Pow):
                raise self.refuse("a power of a power is not allowed; write the exponent out")
            node.right = ast.copy_location(ast.Constant(exponent), node.right)
        else:
            node.right = self.check(node.right, depth + 1)
        node.left = self.check(node.left, depth + 1)
        return node

    def call(self, node: ast.Call, depth: int) -> ast.expr:
        _, fewest, most, arity = _FUNCTIONS[node.func.id]
        count = len(node.args)
        if node.keywords or count < fewest or (most is not None and count > most) or any(
                isinstance(argument, ast.Starred) for argument in node.args):
            raise self.refuse(f"{node.func.id}() takes {arity}")
        if node.func.id == "round" and count == 2:
            digits = _literal_integer(node.args[1])
            if digits is None or abs(digits) > MAX_ROUND_DIGITS:
                raise self.refuse("round()'s second argument must be a whole-number literal from "
                                  f"-{MAX_ROUND_DIGITS} to {MAX_ROUND_DIGITS}")
        node.args = [self.check(argument, depth + 1) for argument in node.args]
        return node


def load_formulas(environ: Mapping[str, str]) -> tuple[Formula, ...]:
    """Every DIMENSION<n>_NAME / DIMENSION<n>_FORMULA pair, in order of n.

    Raises ConfigError for a name without a formula (or the reverse), a repeated or
    malformed name, a name that is a price total's (which formulas read), or a formula
    outside the grammar.
    """
    pairs: dict[int, dict[str, str]] = {}
    for variable, value in environ.items():
        match = _DIMENSION_VARIABLE.match(variable)
        if match and value.strip():
            check_utf8(variable, value)
            check_unquoted(variable, value.strip())
            # Compared as text first: int() refuses numbers of more than 4,300 digits.
            number = match.group(1)
            if len(number) > len(str(MAX_DIMENSION_NUMBER)) or int(number) > MAX_DIMENSION_NUMBER:
                shown = escape_control(variable[:40]) + ("..." if len(variable) > 40 else "")
                raise ConfigError(shown,
                                  f"numbers its dimension beyond {MAX_DIMENSION_NUMBER}; use "
                                  f"DIMENSION1_ to DIMENSION{MAX_DIMENSION_NUMBER}_")
            pairs.setdefault(int(number), {})[match.group(2)] = value.strip()
    formulas: list[Formula] = []
    for number in sorted(pairs):
        pair = pairs[number]
        for part, other in (("NAME", "FORMULA"), ("FORMULA", "NAME")):
            if part not in pair:
                raise ConfigError(f"DIMENSION{number}_{part}",
                                  f"is missing while DIMENSION{number}_{other} is set")
        name = pair["NAME"]
        if not _DIMENSION_NAME.match(name):
            raise ConfigError(f"DIMENSION{number}_NAME",
                              f"{shown_text(name)} must be 1-100 letters, digits or _ . : -")
        if name.endswith(PRICE_SUFFIX):
            raise ConfigError(f"DIMENSION{number}_NAME",
                              f"{name!r} ends in {PRICE_SUFFIX}, the names of the price totals "
                              "formulas read; choose another")
        if any(formula.name == name for formula in formulas):
            raise ConfigError(f"DIMENSION{number}_NAME",
                              f"{name!r} is already used by another DIMENSION<n>_NAME")
        formulas.append(compile_formula(f"DIMENSION{number}_FORMULA", name, pair["FORMULA"]))
    return tuple(formulas)


def formulas_fingerprint(formulas: Sequence[Formula]) -> str:
    """A short digest of the configured formulas ("" with none), to tell when they changed."""
    if not formulas:
        return ""
    text = "\n".join(f"{formula.name}={formula.text}" for formula in formulas)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- Service keys ----------------------------------------------------------------


@dataclass(frozen=True)
class ServiceKey:
    """One exported plan: the marker's key, the export's folder, and its marketplace."""

    service: str
    environment: str
    plan: str
    cloud: str = "aws"

    @property
    def key(self) -> str:
        return f"{self.service}:{self.environment}:{self.plan}"

    @property
    def label(self) -> str:
        return f"{self.service}/{self.environment}/{self.plan}"

    def hour_prefix(self, hour: datetime) -> str:
        """The folder of one hour; ends in '/' so hour 1 never matches hour 10."""
        return f"{EXPORT_ROOT}{self.service}/{self.environment}/{self.plan}/{hour:%Y/%m/%d/%H}/"


def parse_service_keys(text: str, default_cloud: str,
                       variable: str = "SERVICES") -> tuple[ServiceKey, ...]:
    """Parse ``service:environment:plan[=cloud][,...]``.

    The service name may contain spaces and colons (environment and plan never do), so
    each item is split on its last two colons; a suffix ``=aws``, ``=azure`` or ``=gcp``
    names its marketplace (else ``default_cloud``). Raises ConfigError on an item that is
    not three non-empty parts, a part holding ``/``, an unknown cloud, or a repeated key.
    """
    keys: list[ServiceKey] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        body, cloud = item, default_cloud
        name, equals, suffix = item.rpartition("=")
        if equals and ":" not in suffix:  # an "=" inside the service name leaves colons after it
            body, cloud = name.strip(), suffix.strip().lower()
            if cloud not in CLOUDS:
                raise ConfigError(variable,
                                  f"{shown_text(item)}: the marketplace after '=' must be one of "
                                  f"{', '.join(CLOUDS)}")
        parts = [part.strip() for part in body.rsplit(":", 2)]
        if len(parts) != 3 or not all(parts):
            raise ConfigError(variable,
                              f"{shown_text(item)} is not of the form "
                              "service:environment:plan[=cloud]")
        if any("/" in part for part in parts):
            raise ConfigError(variable,
                              f"{shown_text(item)}: a part contains '/', which cannot appear in an "
                              "S3 folder name here")
        key = ServiceKey(*parts, cloud)
        if any(other.key == key.key for other in keys):
            raise ConfigError(variable, f"{key.key!r} is listed twice")
        keys.append(key)
    if not keys:
        raise ConfigError(variable, "lists no service")
    return tuple(keys)


# --- URLs and paths --------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _shown_url(url: str) -> str:
    """shown_text of a URL with everything before its last ``@`` after the scheme hidden: a
    URL refused for another reason may still carry a password (one with a space in it, a
    port mistyped), and an error message must not print it."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" in rest:
        url = f"{scheme}{separator}[userinfo]@{rest.rpartition('@')[2]}"
    return shown_text(url)


def check_url(variable: str, url: str, carries_credentials: bool,
              allow_userinfo: bool = False) -> Any:
    """Check a URL with urllib3's parser, the one requests connects by, and return its parts.

    Raises ConfigError naming ``variable`` for anything but an http(s) URL with a host:
    a backslash, userinfo (user:password@) unless ``allow_userinfo``, whitespace or
    control characters, a port outside 1-65535, or plain http:// to a host that is not
    loopback when credentials travel (userinfo is credentials too). Parsers disagree on
    such URLs (urlsplit reads ``http://a:1\\@127.0.0.1/`` as loopback, urllib3 connects
    to ``a``), so they are refused rather than interpreted.
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    if "\\" in url:
        raise ConfigError(variable,
                          "must not contain a backslash, which URL parsers read differently")
    if re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ConfigError(variable,
                          f"must not contain spaces or control characters, got {_shown_url(url)}")
    try:
        parts = parse_url(url)
    except LocationParseError:
        raise ConfigError(variable,
                          "is not a URL urllib3 can parse (is the port from 1 to 65535?): "
                          f"{_shown_url(url)}") from None
    if parts.auth is not None or "@" in (parts.netloc or ""):
        if not allow_userinfo:
            # Never echo it: userinfo is where a password would be.
            raise ConfigError(variable,
                              "must not carry a user name or password (user@ or user:password@ "
                              "before the host)")
        carries_credentials = True
    if parts.scheme not in ("https", "http") or not parts.host:
        raise ConfigError(variable, f"must be an http(s) URL with a host, got {_shown_url(url)}")
    if parts.port is not None and not 1 <= parts.port <= 65535:
        raise ConfigError(variable, f"has port {parts.port}; a port must be from 1 to 65535")
    if carries_credentials and parts.scheme == "http" and not is_loopback(parts.host):
        raise ConfigError(variable,
                          f"uses plain http:// to {shown_text(parts.host)}; credentials would "
                          "travel unencrypted, use https://")
    return parts


def split_s3_url(path: str) -> tuple[str, str] | None:
    """(bucket, key or prefix) of an ``s3://bucket/key`` path; None for a local path."""
    if not path.startswith("s3://"):
        return None
    bucket, _, key = path[len("s3://"):].partition("/")
    return bucket, key


# The bucket names boto3 accepts (it refuses others only when the first request is made), and
# access point ARNs.
BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}|arn:\S+")


def _bucket_name(variable: str, name: str) -> str:
    if not BUCKET_NAME.fullmatch(name):
        raise ConfigError(variable, "must be the bucket's name alone, without s3:// or a folder, "
                                    f"got {shown_text(name)}")
    return name


def _not_a_misspelt_s3_url(variable: str, path: str) -> None:
    """S3://..., s3:/... or s3:... would otherwise be a local path: a state or ledger started
    afresh on local disk, not the one in S3."""
    if path[:3].lower() == "s3:" and not path.startswith("s3://"):
        raise ConfigError(variable, f"must be s3://bucket/... (in lower case, two slashes) or a "
                                    f"local path, got {shown_text(path)}")


def _state_path(path: str) -> str:
    _not_a_misspelt_s3_url("STATE_FILE_PATH", path)
    s3 = split_s3_url(path)
    if s3:
        bucket, key = s3
        if not bucket or not key or key.endswith("/"):
            raise ConfigError("STATE_FILE_PATH",
                              "must be s3://bucket/key with a key that names an object, got "
                              f"{shown_text(path)}")
        if key.startswith(EXPORT_ROOT):
            raise ConfigError("STATE_FILE_PATH",
                              f"must not lie under {EXPORT_ROOT}, which Omnistrate writes")
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
    _not_a_misspelt_s3_url("LEDGER_PATH", path)
    s3 = split_s3_url(path)
    if s3:
        bucket, prefix = s3
        if not bucket:
            raise ConfigError("LEDGER_PATH",
                              f"must be s3://bucket/prefix or a folder, got {shown_text(path)}")
        if prefix.startswith(EXPORT_ROOT):
            raise ConfigError("LEDGER_PATH",
                              f"must not lie under {EXPORT_ROOT}, which Omnistrate writes")
    return path.rstrip("/")


def _s3_endpoint(environ: Mapping[str, str]) -> None:
    """Refuse an S3 endpoint over plain http to another host: a session token would travel
    unencrypted (and through any proxy). Raises ConfigError."""
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        url = (environ.get(variable) or "").strip()
        if url:
            check_url(variable, url, carries_credentials=True)


# --- The configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Every setting of one run, validated. Built only by ``load_config``."""

    bucket: str
    services: tuple[ServiceKey, ...]
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    api_url: str
    auth_url: str
    batch_size: int
    max_retries: int
    timeout_seconds: float
    max_record_quantity: int | None  # None: each marketplace's own limit
    state_path: str
    ledger_path: str
    ledger_retention_days: int
    start_hour: datetime | None
    max_hours_per_run: int
    late_usage: str
    late_lookback_hours: int
    export_stale_hours: int
    max_export_file_bytes: int
    s3_timeout_seconds: float
    run_timeout_minutes: int
    stop_timeout_seconds: float
    dry_run: bool
    log_level: str
    log_format: str
    metrics_file: str | None
    pushgateway_url: str | None
    formulas: tuple[Formula, ...]
    warnings: tuple[str, ...] = ()

    def record_limit(self, cloud: str) -> int | None:
        """The largest quantity one record of ``cloud`` may carry (None: no limit)."""
        return self.max_record_quantity if self.max_record_quantity is not None \
            else RECORD_QUANTITY_LIMITS[cloud]

    def service(self, key: str) -> ServiceKey | None:
        return next((service for service in self.services if service.key == key), None)


class _Environment:
    """Typed access to environment variables, by the settings table; every failure names
    the variable."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.environ.get(name, "").strip()
        check_utf8(name, value)
        if name != "CLAZAR_CLIENT_SECRET":  # a secret may begin and end with anything
            check_unquoted(name, value)
        return value if value else default

    def required(self, name: str, why: str = "is required") -> str:
        value = self.text(name)
        if value is None:
            raise ConfigError(name, f"{why} (it is unset or empty)")
        return value

    def get(self, name: str) -> Any:
        """The value of setting ``name``, of its kind, within its bounds, or its default."""
        setting = SETTING_NAMES[name]
        raw = self.text(name)
        if raw is None:
            return setting.default
        if setting.kind == "integer":
            return self._integer(setting, raw)
        if setting.kind == "number":
            return self._number(setting, raw)
        if setting.kind == "flag":
            return self._flag(name, raw)
        if setting.kind == "choice":
            value = raw.upper() if name == "LOG_LEVEL" else raw.lower()
            if value not in setting.bounds:
                raise ConfigError(name,
                                  f"must be one of {setting.shown_bounds()}, got {shown_text(raw)}")
            return value
        return raw

    @staticmethod
    def _integer(setting: Setting, raw: str) -> int:
        wanted = f"a whole number from {setting.shown_bounds()}"
        # Only ASCII digits: int() also takes other scripts' digits, and a long text costs time.
        if len(raw) > 20 or not re.fullmatch(r"[+-]?[0-9]+", raw):
            raise ConfigError(setting.name, f"must be {wanted}, got {shown_text(raw)}")
        value = int(raw)
        if not setting.bounds[0] <= value <= setting.bounds[1]:
            raise ConfigError(setting.name, f"must be {wanted}, got {value}")
        return value

    @staticmethod
    def _number(setting: Setting, raw: str) -> float:
        try:
            value = float(raw) if len(raw) <= 40 else math.nan
        except ValueError:
            value = math.nan
        if not setting.bounds[0] <= value <= setting.bounds[1]:  # NaN and infinities fail this too
            raise ConfigError(setting.name, f"must be a number from {setting.shown_bounds()}, got "
                                            f"{shown_text(raw)}")
        return value

    @staticmethod
    def _flag(name: str, raw: str) -> bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"must be true or false, got {shown_text(raw)}")


def _services(env: _Environment) -> tuple[ServiceKey, ...]:
    cloud = env.get("CLAZAR_CLOUD")
    if env.text("SERVICES") is not None:
        return parse_service_keys(env.text("SERVICES"), cloud)
    why = "is required when SERVICES is not set"
    parts = [env.required(name, why) for name in ("SERVICE_NAME", "ENVIRONMENT_TYPE", "PLAN_ID")]
    # Validated the way SERVICES items are.
    return parse_service_keys(":".join(parts), cloud, "SERVICE_NAME/ENVIRONMENT_TYPE/PLAN_ID")


def _client_secret(env: _Environment, required: bool) -> str:
    """The Clazar client secret: CLAZAR_CLIENT_SECRET, or the file CLAZAR_CLIENT_SECRET_FILE
    names (a systemd credential, a mounted Kubernetes or Docker secret), stripped of
    surrounding whitespace.

    When not ``required`` (a dry run, a read-only command) the file is not read. Raises
    ConfigError when both variables are set, or, when required, when neither is, or the
    file cannot be read, is empty or holds more than one line. No message quotes the secret.
    """
    path = env.text("CLAZAR_CLIENT_SECRET_FILE")
    if path is not None and env.text("CLAZAR_CLIENT_SECRET") is not None:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE",
                          "is set together with CLAZAR_CLIENT_SECRET; set only one of them")
    if path is None:
        if required:
            return env.required("CLAZAR_CLIENT_SECRET", "is required to send (or use --dry-run)")
        return env.text("CLAZAR_CLIENT_SECRET", "")
    if not required:
        return ""
    shown = shown_text(path, 200)
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().strip()
    except OSError as error:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE",
                          f"cannot read {shown}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE", f"{shown} is not UTF-8 text") from None
    if not secret or "\n" in secret:
        raise ConfigError("CLAZAR_CLIENT_SECRET_FILE",
                          f"{shown} must hold the secret on one line (it holds "
                          f"{'nothing' if not secret else 'several lines'})")
    return secret


def _start_hour(env: _Environment) -> datetime | None:
    text = env.text("START_HOUR")
    if text is None:
        return None
    try:
        return parse_hour(text)
    except ValueError:
        raise ConfigError("START_HOUR",
                          f"must be a whole UTC hour from {format_time(EARLIEST_TIME)} to "
                          f"{format_time(LATEST_TIME - HOUR)}, like 2025-07-23T16:00:00Z, got "
                          f"{shown_text(text)}") from None


def _pushgateway_url(url: str | None) -> str | None:
    """METRICS_PUSHGATEWAY_URL without its trailing slash. Raises ConfigError if it is not an
    http(s) URL with a host (see check_url). Plain http is allowed, as metrics carry no
    secret, unless the URL carries a user and password for basic auth."""
    if url is None:
        return None
    check_url("METRICS_PUSHGATEWAY_URL", url, carries_credentials=False, allow_userinfo=True)
    return url.rstrip("/")


def load_config(environ: Mapping[str, str], *, dry_run: bool | None = None,
                sends: bool = True) -> Config:
    """Read every setting from ``environ``. Raises ConfigError naming the first bad variable.

    ``dry_run`` from the command line overrides DRY_RUN. A dry run needs no Clazar
    credentials and sends none; nor does a command that never ``sends``.
    """
    env = _Environment(environ)
    bucket = _bucket_name("S3_BUCKET_NAME", env.required("S3_BUCKET_NAME"))
    services = _services(env)
    is_dry_run = env.get("DRY_RUN") if dry_run is None else dry_run
    credentials_travel = sends and not is_dry_run
    client_id = env.required("CLAZAR_CLIENT_ID", "is required to send (or use --dry-run)") \
        if credentials_travel else env.text("CLAZAR_CLIENT_ID", "")
    api_url = env.get("CLAZAR_API_URL")
    origin = check_url("CLAZAR_API_URL", api_url, credentials_travel)
    _s3_endpoint(environ)
    state_path = _state_path(env.get("STATE_FILE_PATH"))
    return Config(
        bucket=bucket, services=services, client_id=client_id,
        client_secret=_client_secret(env, required=credentials_travel),
        api_url=api_url, auth_url=f"{origin.scheme}://{origin.netloc}/authenticate/",
        batch_size=env.get("CLAZAR_BATCH_SIZE"), max_retries=env.get("CLAZAR_MAX_RETRIES"),
        timeout_seconds=env.get("CLAZAR_TIMEOUT_SECONDS"),
        max_record_quantity=env.get("MAX_RECORD_QUANTITY"),
        state_path=state_path, ledger_path=_ledger_path(env.text("LEDGER_PATH"), state_path),
        ledger_retention_days=env.get("LEDGER_RETENTION_DAYS"), start_hour=_start_hour(env),
        max_hours_per_run=env.get("MAX_HOURS_PER_RUN"), late_usage=env.get("LATE_USAGE"),
        late_lookback_hours=env.get("LATE_USAGE_LOOKBACK_HOURS"),
        export_stale_hours=env.get("EXPORT_STALE_HOURS"),
        max_export_file_bytes=env.get("MAX_EXPORT_FILE_BYTES"),
        s3_timeout_seconds=env.get("S3_TIMEOUT_SECONDS"),
        run_timeout_minutes=env.get("RUN_TIMEOUT_MINUTES"),
        stop_timeout_seconds=env.get("STOP_TIMEOUT_SECONDS"),
        dry_run=is_dry_run, log_level=env.get("LOG_LEVEL"), log_format=env.get("LOG_FORMAT"),
        metrics_file=env.text("METRICS_FILE"),
        pushgateway_url=_pushgateway_url(env.text("METRICS_PUSHGATEWAY_URL")),
        formulas=load_formulas(environ), warnings=tuple(unknown_settings(environ)),
    )


def metrics_targets_despite_error(environ: Mapping[str, str], dry_run: bool | None
                                  ) -> tuple[str | None, str | None] | None:
    """Where a run whose configuration was refused still publishes its exit status:
    (METRICS_FILE, METRICS_PUSHGATEWAY_URL), or None for nowhere.

    Nowhere when it may be a dry run (``dry_run`` from the command line, or DRY_RUN not
    unset or false): a one-off check must not replace what the hourly run published.
    The Pushgateway URL only when it passes its start-up check, so a refused one (plain
    http with a password, a backslash) is never contacted. Never raises.
    """
    env = _Environment(environ)
    try:
        if env.get("DRY_RUN") if dry_run is None else dry_run:
            return None
    except ConfigError:  # neither true nor false: it may be a dry run
        return None
    try:
        metrics_file = env.text("METRICS_FILE")
    except ConfigError:
        metrics_file = None
    try:
        pushgateway_url = _pushgateway_url(env.text("METRICS_PUSHGATEWAY_URL"))
    except ConfigError:
        pushgateway_url = None
    return metrics_file, pushgateway_url


# ===========================================================================
# 4. Hours and the export marker
# ===========================================================================


@dataclass(frozen=True)
class ExportMarker:
    """Omnistrate's ``last_success_export.json``: per service key, the end of final data."""

    processed_to: Mapping[str, datetime]
    updated_at: Mapping[str, datetime]
    # Entries that are not the documented shape, with what is wrong: each fails only
    # the services it names.
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

    def final_before(self, service_key: str) -> datetime:
        """The moment before which exported data of ``service_key`` is final.

        ``last_processed_to`` is the inclusive end of exported data (it ends in :59), so
        data is final strictly before it plus one second. Raises MarkerError naming the key
        and the keys present if it is missing: that service must wait, not count as empty.
        """
        if service_key in self.problems:
            raise MarkerError(self.problems[service_key])
        if service_key not in self.processed_to:
            present = sorted(self.processed_to)
            shown = ", ".join(shown_text(key) for key in present[:20])
            shown += " ..." if len(present) > 20 else ""
            raise MarkerError(f"export marker has no entry for {service_key!r}; it holds "
                              f"{len(present)} key(s): {shown or 'none'}")
        return self.processed_to[service_key] + timedelta(seconds=1)


def first_due_hour(last_processed_hour: datetime | None, start_hour: datetime | None,
                   pinned_first_hour: datetime | None, now: datetime) -> datetime:
    """The next hour to process.

    After the last processed hour; for a deployment that has processed none, START_HOUR,
    else the first hour pinned in its state by its first run, else a day before ``now``
    (which that first run pins: a start that moved with the clock would skip a first
    hour that failed). START_HOUR is also a floor: no earlier hour is ever sent, so
    moving it forward skips hours on purpose.
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
    """The first hour that is not yet due for one service: hour H is due when H+1h <= now
    and H+1h <= final_before (None: no marker, closed hours are due)."""
    end = floor_hour(now)
    if final_before is not None:
        end = min(end, floor_hour(final_before - HOUR) + HOUR)
    return end


def deployment_due_end(now: datetime, finals: Mapping[str, datetime | None]
                       ) -> tuple[datetime, str | None]:
    """(the first hour not yet due for every service, the service that holds it back, or
    None when none holds the others back). An hour goes out only once it is final for
    every service of the deployment. Pure."""
    ends = {key: due_end(now, final_before) for key, final_before in finals.items()}
    end = min(ends.values(), default=floor_hour(now))
    holding = min((key for key, value in ends.items() if value == end), default=None)
    return end, holding if holding is not None and end < max(ends.values()) else None


def due_hours(first: datetime, end: datetime, limit: int) -> list[datetime]:
    """The hours to process this run, oldest first, at most ``limit``."""
    return [first + i * HOUR for i in range(min(hours_between(first, end), limit))]


# ===========================================================================
# 5. Billing rules (pure): export files, an hour's usage, formulas, carry,
#    late usage, record limits, what "already exists" means
# ===========================================================================

# An export number is converted exactly only when its text is at most this long, below
# 10**21 and with at most MAX_DECIMAL_PLACES decimal places: 1e999999999 would otherwise
# take 10**999999999 to hold, and 1e-99999 a 100,000-digit denominator. Every double an
# export could hold as usage fits.
MAX_NUMBER_TEXT = 40
MAX_DECIMAL_PLACES = 40
# Contract ids and dimensions are sent to Clazar and written everywhere; longer ones,
# or ones holding control characters, are corrupt data.
MAX_NAME_LENGTH = 256
# Amounts are kept to a billionth of a unit, rounded down, so that carried remainders
# never grow without bound (a formula dividing by JSON doubles would otherwise make
# each hour's denominator a multiple of the last), and so that billing never exceeds
# usage: at most 10**-9 of a unit is lost per contract, dimension and hour.
RESOLUTION = 10**9
# No amount, remainder or quantity reaches this (formula values stay below 2**1024,
# about 1.8e308); the state's reader takes up to MAX_AMOUNT_DIGITS digits, more than
# any amount or quantity below it can have.
MAX_AMOUNT = 10**310
MAX_AMOUNT_DIGITS = 320


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
    if number.adjusted() > 20 or number.as_tuple().exponent < -MAX_DECIMAL_PLACES:
        return NumberOutOfRange(text)
    return number


def _shown_json(value: Any) -> str:
    """A field's value as JSON, cut short, for error messages."""
    if isinstance(value, (dict, list)):
        return "a JSON " + ("object" if isinstance(value, dict) else "array")
    text = value.text if isinstance(value, NumberOutOfRange) else json.dumps(
        value[:41] if isinstance(value, str) else value, default=str)
    return escape_control(text[:40] + ("..." if len(text) > 40 else ""))


def exact_number(value: Any) -> int | Fraction | None:
    """The exact value of a JSON number (floats arrive as Decimal), or None if not a number.
    Whole numbers stay ints: an hour of 5,000 files holds 40,000 of them."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return None
    if isinstance(value, int):
        return value
    if not value.is_finite():
        return None
    exact = Fraction(value)
    return exact.numerator if exact.denominator == 1 else exact


def _export_number(record: Mapping[str, Any], name: str, where: str) -> int | Fraction:
    """``record[name]`` exactly, or raise ExportFileError naming ``where``: it must be a
    JSON number from 0 to MAX_VALUE with at most MAX_DECIMAL_PLACES decimal places."""
    value = exact_number(record.get(name))
    if value is None or not 0 <= value <= MAX_VALUE:
        raise ExportFileError(f"{where}: {name} {_shown_json(record.get(name))} is not a finite "
                              f"non-negative number within 64 bits (at most {MAX_DECIMAL_PLACES} "
                              "decimal places)")
    return value


def billing_name_problem(text: str) -> str | None:
    """What is wrong with a contract id or dimension, or None: at most MAX_NAME_LENGTH
    characters, no control characters and no lone surrogates."""
    if len(text) > MAX_NAME_LENGTH:
        return f"is {len(text)} characters long, more than {MAX_NAME_LENGTH}"
    if CONTROL_CHARACTERS.search(text):
        return f"{shown_text(text)} holds control characters or lone surrogates"
    return None


def _identity_part(value: Any) -> Any:
    if value is None or isinstance(value, (str, int)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


# One usage row: (identity, contract, dimension, value, value x pricePerUnit).
Row = tuple[tuple, str, str, Union[int, Fraction], Union[int, Fraction]]


@dataclass
class FileUsage:
    """What one export file contributes to its hour, reduced to what billing needs."""

    rows: list[Row]
    records: int = 0
    unattributable: int = 0
    unattributed_subscriptions: set[str] = field(default_factory=set)
    fractional: int = 0


def _row(key: str, index: int, record: Any, with_prices: bool, usage: FileUsage) -> Row | None:
    """One record of file ``key`` as a row, or None if it has no payer or dimension (counted
    in ``usage``). Raises ExportFileError naming the key, the record and the field."""
    where = f"{key}: record {index}"
    if not isinstance(record, dict):
        raise ExportFileError(f"{where} is a JSON {type(record).__name__}, not an object")
    if "value" not in record:
        raise ExportFileError(f"{where} has no value")
    value = _export_number(record, "value", where)
    price: int | Fraction = 0
    if with_prices and record.get("pricePerUnit") is not None:
        price = value * _export_number(record, "pricePerUnit", where)
    names = []
    for name in ("externalPayerId", "dimension"):
        text = record.get(name)
        if text is not None and not isinstance(text, str):
            raise ExportFileError(f"{where}: {name} is a JSON {type(text).__name__}, not a string")
        text = (text or "").strip()
        problem = billing_name_problem(text)
        if problem:
            raise ExportFileError(f"{where}: {name} {problem}")
        names.append(text)
    if value.denominator != 1:
        usage.fractional += 1
    contract, dimension = names
    if not contract or not dimension:
        usage.unattributable += 1
        subscription = record.get("subscriptionId") or key.rsplit("/", 1)[-1]
        usage.unattributed_subscriptions.add(str(subscription))
        return None
    # The file leads the identity (rows of two subscriptions never collapse), then the
    # contract and dimension (rows of two contracts never collapse, even without the
    # subscription, instance, pod and host fields).
    identity = (key, contract, dimension) + tuple(
        _identity_part(record.get(name)) for name in ("subscriptionId", "instanceId", "podName",
                                                      "hostName"))
    return identity, contract, dimension, value, price


def parse_export_file(key: str, body: bytes, *, with_prices: bool = False) -> FileUsage:
    """Validate one export file and reduce it to billable rows.

    Records with no externalPayerId or dimension are counted as unattributable.
    Raises ExportFileError naming ``key`` if the body is not a UTF-8 JSON array of
    objects (see parse_json), a record's value is missing or not a finite non-negative
    number no larger than a 64-bit integer with at most MAX_DECIMAL_PLACES decimal places
    (or, ``with_prices``, its pricePerUnit is not), or its externalPayerId or dimension is
    not a string, is longer than MAX_NAME_LENGTH or holds control characters. Numbers are
    checked from their text before any exact conversion, so a file costs time in
    proportion to its size.
    """
    if body[:2] == b"\x1f\x8b":
        raise ExportFileError(f"{key}: gzip-compressed bytes, expected plain UTF-8 JSON")
    try:
        records = parse_json(body, parse_float=_bounded_decimal, parse_int=_bounded_integer)
    except ValueError as error:
        raise ExportFileError(f"{key} {error}") from None
    if not isinstance(records, list):
        raise ExportFileError(f"{key}: expected a JSON array of records, found a JSON "
                              f"{type(records).__name__}")
    usage = FileUsage(rows=[], records=len(records))
    for index, record in enumerate(records):
        row = _row(key, index, record, with_prices, usage)
        if row is not None:
            usage.rows.append(row)
    return usage


def hour_digest(files: Iterable[tuple[str, str]]) -> str:
    """The identity of what an hour holds: a digest of its files' keys and ETags, whatever
    order they come in. The same for a listing and for the bodies read, when unchanged."""
    fingerprint = hashlib.sha256()
    for key, etag in sorted(files):
        fingerprint.update(f"{key}\t{etag}\n".encode())
    return fingerprint.hexdigest()[:32]


@dataclass
class HourUsage:
    """The usage of one hour across the services of a deployment, folded in file by file.

    A row repeated within one file (same contract, subscription, instance, pod, host and
    dimension) counts once, at its largest value, as Omnistrate's reference query does;
    equal values keep the larger price, so the result never depends on reading order.
    """

    hour: datetime
    services: tuple[ServiceKey, ...] = ()
    files: int = 0
    records: int = 0
    ignored: list[str] = field(default_factory=list)
    unattributable: int = 0
    unattributed_subscriptions: set[str] = field(default_factory=set)
    repeated: int = 0
    fractional: int = 0
    folders: list[tuple[str,
                        int]] = field(default_factory=list)  # (hour folder, export files in it)
    sources: str = ""  # hour_digest of the files read
    # identity -> (service key, contract, dimension, value, price total)
    rows: dict[tuple, tuple[str, str, str, int | Fraction,
                            int | Fraction]] = field(default_factory=dict)
    # One copy of each distinct string: identities repeat their parts row after row.
    _shared: dict[Any, Any] = field(default_factory=dict, repr=False)

    def add(self, service_key: str, usage: FileUsage) -> None:
        share = self._shared.setdefault
        self.files += 1
        self.records += usage.records
        self.unattributable += usage.unattributable
        self.unattributed_subscriptions |= usage.unattributed_subscriptions
        self.fractional += usage.fractional
        service_key = share(service_key, service_key)
        for identity, contract, dimension, value, price in usage.rows:
            seen = self.rows.get(identity)
            if seen is not None:
                self.repeated += 1
                if (seen[3], seen[4]) >= (value, price):
                    continue
            identity = tuple(share(part, part) for part in identity)
            self.rows[identity] = (service_key, share(contract, contract),
                                   share(dimension, dimension), value, price)

    def release(self) -> None:
        """Drop the rows once they are summed: an hour of 5,000 files holds 40,000."""
        self.rows, self._shared = {}, {}

    def totals(self) -> dict[str, dict[Key, tuple[int | Fraction, int | Fraction]]]:
        """{service key: {(contract, dimension): (exact usage, exact price total)}}."""
        totals: dict[str, dict[Key, tuple[int | Fraction, int | Fraction]]] = {}
        for service_key, contract, dimension, value, price in self.rows.values():
            by_key = totals.setdefault(service_key, {})
            before = by_key.get((contract, dimension), (0, 0))
            by_key[contract, dimension] = (before[0] + value, before[1] + price)
        return totals


def quantize(value: Fraction) -> Fraction:
    """``value`` rounded down to RESOLUTION. Raises QuantityError from MAX_AMOUNT up."""
    if value >= MAX_AMOUNT:
        raise QuantityError(f"an amount of more than 10**{len(str(MAX_AMOUNT)) - 1} units")
    return Fraction(math.floor(value * RESOLUTION), RESOLUTION)


def _contract_clouds(usage: HourUsage, clouds: Mapping[str, str]) -> dict[str, str]:
    """{contract: its marketplace}, from the services its usage came from. Raises
    ExportFileError when one contract appears under services of different marketplaces:
    one contract lives on one marketplace, so the configuration is wrong."""
    found: dict[str, tuple[str, str]] = {}
    for service_key, contract, _, _, _ in usage.rows.values():
        cloud = clouds[service_key]
        seen = found.setdefault(contract, (cloud, service_key))
        if seen[0] != cloud:
            raise ExportFileError(
                f"hour {display_hour(usage.hour)}: contract {contract} has usage under {seen[1]} "
                f"({seen[0]}) and {service_key} ({cloud}); one contract lives on one marketplace: "
                "fix the =cloud of one of them in SERVICES")
    return {contract: cloud for contract, (cloud, _) in found.items()}


def _collisions(usage: HourUsage, formulas: Sequence[Formula]) -> None:
    """Raise ExportFileError for a data dimension named like a computed name (a price total,
    or a formula's output that no formula reads as input): which one a formula or a record
    means would otherwise depend on the order files were read."""
    computed = {name + PRICE_SUFFIX for name in OMNISTRATE_DIMENSIONS}
    inputs = set().union(*(formula.inputs for formula in formulas))
    computed |= {formula.name for formula in formulas} - inputs
    for _, contract, dimension, _, _ in usage.rows.values():
        if dimension in computed:
            raise ExportFileError(
                f"hour {display_hour(usage.hour)}: the export holds a dimension {dimension!r} "
                f"(contract {contract}), which is also a name the formulas compute; rename the "
                "DIMENSION<n>_NAME, or ask Omnistrate why")


def billable_amounts(usage: HourUsage, formulas: Sequence[Formula], clouds: Mapping[str, str]
                     ) -> tuple[dict[Key, Fraction], dict[str, str]]:
    """(the amount to bill per (contract, dimension) for one hour, each contract's marketplace).

    With no formulas, the raw totals. With formulas, each formula per service and contract
    with usage this hour, over its summed dimensions and price totals (absent = 0). Either
    way summed over the deployment's services, then rounded down to RESOLUTION. ``clouds``
    is each service's marketplace. Raises FormulaError (division by zero, a negative
    result), ExportFileError (a name collision, a contract on two marketplaces) or
    QuantityError (an amount beyond MAX_AMOUNT).
    """
    contract_clouds = _contract_clouds(usage, clouds)
    if formulas:
        _collisions(usage, formulas)
    amounts: dict[Key, Fraction] = {}
    for by_key in usage.totals().values():
        computed = _formula_amounts(usage.hour, by_key, formulas) if formulas else \
            {key: value for key, (value, _) in by_key.items()}
        for key, value in computed.items():
            amounts[key] = amounts.get(key, Fraction(0)) + value
    try:
        return {key: quantize(Fraction(value)) for key,
                value in sorted(amounts.items())}, contract_clouds
    except QuantityError as error:
        raise QuantityError(f"hour {display_hour(usage.hour)}: {error}; check the "
                            "formulas") from None


def _formula_amounts(hour: datetime, by_key: Mapping[Key, tuple[Any, Any]],
                     formulas: Sequence[Formula]
                     ) -> dict[Key, Fraction]:
    names: dict[str, dict[str, Any]] = {}
    for (contract, dimension), (value, price) in by_key.items():
        names.setdefault(contract, {})[dimension] = value
        names[contract][dimension + PRICE_SUFFIX] = price
    amounts = {}
    for contract in sorted(names):
        for formula in formulas:
            try:
                value = formula.evaluate(names[contract])
            except FormulaError as error:
                raise FormulaError(f"{error} for contract {contract} in hour "
                                   f"{display_hour(hour)}") from None
            if value < 0:
                raise FormulaError(f"{formula.variable} ({formula.name}) is negative ({value}) for "
                                   f"contract {contract} in hour {display_hour(hour)}")
            amounts[contract, formula.name] = value
    return amounts


def carry(amounts: Mapping[Key, Fraction], remainders: Mapping[Key, Fraction],
          limit_of: Callable[[str], int | None] = lambda contract: None
          ) -> tuple[dict[Key, int], dict[Key, Fraction]]:
    """Whole units to bill now, and the fractions carried to the next hour.

    quantity = floor(amount + carried remainder); the new remainder is what is left. Over
    any run of hours the billed units are the whole part of the total: never more than
    used, never a whole unit short (less the RESOLUTION amounts were rounded to). A
    remainder of a whole unit or more (late usage carried) is billed with the next hour
    even if its contract has no usage then. With a per-record limit (``limit_of`` the
    contract), a quantity above it only because of what was carried in is cut to the
    limit and the rest carried on; one whose own hour exceeds it is left as it is, for
    the limit check to refuse. Returns (quantities, the remainders that changed).
    """
    quantities, updates = {}, {}
    owed = {key: Fraction(0) for key,
            carried in remainders.items() if carried >= 1 and key not in amounts}
    for key, amount in itertools.chain(amounts.items(), owed.items()):
        carried = remainders.get(key, Fraction(0))
        total = amount + carried
        whole = math.floor(total)
        limit = limit_of(key[0])
        if limit is not None and whole > limit >= math.floor(amount):
            whole = limit
        quantities[key] = whole
        if total - whole != carried:
            updates[key] = total - whole
    return quantities, updates


def billable_remainders(remainders: Mapping[Key, Fraction], formulas: Sequence[Formula]
                        ) -> tuple[dict[Key, Fraction], dict[Key, Fraction]]:
    """(the remainders the next hour may bill, the whole units owed to dimensions the
    configured formulas no longer produce). With no formulas every dimension is billed as
    it comes, so every remainder may be; with formulas, only their dimensions'."""
    if not formulas:
        return dict(remainders), {}
    names = {formula.name for formula in formulas}
    billable = {key: value for key, value in remainders.items() if key[1] in names}
    return billable, {key: value for key,
                      value in remainders.items() if key[1] not in names and value >= 1}


def late_usage(accounted: Mapping[Key, Fraction], now: Mapping[Key, Fraction], carry_more: bool
               ) -> tuple[dict[Key, Fraction], dict[Key, Fraction], dict[Key, Fraction]]:
    """Compare an already billed hour's usage as it reads now with what is accounted for it.

    ``accounted`` is the high-water mark of the hour: what it was billed on plus every
    increment carried for it since. Returns (carried, reported, accounted after):

    * reported: every non-zero difference ``now - accounted`` (negative: less usage than
      accounted, which cannot be taken back);
    * carried: the positive differences, when ``carry_more``, to add to the remainders;
    * accounted after: ``max(accounted, now)`` per key.

    Because the mark only rises, usage that shrinks and grows back, or a file that
    returns to an earlier content, is never carried twice: over any sequence of contents
    the increments carried add up to the largest content less the first.
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


RECORD_FIELDS = ("cloud", "contract_id", "dimension", "start_time", "end_time", "quantity")
Record = Mapping[str, str]


def metering_records(hour: datetime, quantities: Mapping[Key, int], clouds: Mapping[str, str]
                     ) -> list[dict[str, str]]:
    """Clazar records for one hour, grouped by contract, each with its contract's
    marketplace; zero quantities are not sent."""
    start, end = format_time(hour), format_time(hour + HOUR)
    return [{"cloud": clouds[contract], "contract_id": contract, "dimension": dimension,
             "start_time": start, "end_time": end, "quantity": str(quantity)}
            for (contract, dimension), quantity in sorted(quantities.items()) if quantity > 0]


def record_key(record: Record) -> Key:
    return record["contract_id"], record["dimension"]


def suggested_formula(dimension: str) -> tuple[str, str]:
    """(a name, a formula) billing ``dimension`` in a larger unit: GiB for byte-hours."""
    if "byte_hours" in dimension:
        return dimension.replace("byte_hours", "gib_hours"), f"{dimension}/1073741824"
    return f"{dimension}_thousands", f"{dimension}/1000"


def over_limit(record: Record, limit: int | None) -> str | None:
    """What is wrong with sending ``record`` under a per-record ``limit`` (None: no limit),
    or None. Checked before anything of an hour is sent, on every send: a marketplace
    refuses such a record, and an hour goes whole or not at all."""
    if limit is None or int(record["quantity"]) <= limit:
        return None
    name, formula = suggested_formula(record["dimension"])
    return (f"contract {record['contract_id']} dimension {record['dimension']} hour "
            f"{record['start_time']} has quantity {record['quantity']}, above the {limit} one "
            f"{record['cloud']} record may carry (MAX_RECORD_QUANTITY); bill it in a larger unit "
            "with a formula, and give every other dimension you bill one too (once one is set, "
            "only the DIMENSION<n> dimensions are sent; config.env.example sets all four), e.g. "
            f"DIMENSION1_NAME={name} and DIMENSION1_FORMULA={formula}")


def duplicate_outcome(earlier: str | None, may_have_landed_before: bool, retried: bool) -> str:
    """What Clazar's "already exists" answer means for a record: ALREADY_DELIVERED (ours) or
    CONFLICT (someone else's). The one place this is decided.

    ``earlier``: the record's outcome in an earlier attempt at the same send (the ledger's
    line), None if none is known. ``may_have_landed_before``: an earlier attempt of ours may
    have stored it (its request met no answer, a 5xx, or a crash). ``retried``: the request
    that got this answer was sent more than once after an attempt that may have landed (no
    answer, or a 5xx; a 429 was refused unread and excuses nothing).

    A conflict found earlier stays one; a record already answered as delivered is ours;
    otherwise it is ours only if one of our own attempts may have stored it. On a first
    send in a request sent once, someone else holds that contract, dimension and hour
    (another exporter, an older script, another deployment): its usage may be unbilled.
    """
    if earlier == CONFLICT:
        return CONFLICT
    if earlier in ACCEPTED_OUTCOMES or may_have_landed_before or retried:
        return ALREADY_DELIVERED
    return CONFLICT


def lateness(hour: datetime, clouds: Iterable[str], now: datetime) -> tuple[str, timedelta] | None:
    """(the marketplace, how late) when ``hour`` is sent past the lateness window of one of the
    marketplaces its records go to, the strictest first; else None."""
    late_by = now - (hour + HOUR)
    for cloud in sorted(set(clouds), key=lambda cloud: LATENESS_WINDOWS[cloud]):
        if late_by > timedelta(hours=LATENESS_WINDOWS[cloud]):
            return cloud, late_by
    return None


def export_age_hours(final_before: datetime, now: datetime) -> float:
    """How many hours before ``now`` the export's final data ends (0 if not before)."""
    return max(0.0, (now - final_before) / HOUR)


# ===========================================================================
# 6. The durable model: pending hour, accounted hour, the state and its codec,
#    ledger lines and their codec
# ===========================================================================
#
# Each type below has one codec, to_json and from_json; from_json checks every field
# (type, shape, range) and raises ValueError saying what is wrong, so that what is
# read back is exactly what this module writes, or refused. Amounts are written as
# decimals with at most nine decimal places ("0.5"), which is all RESOLUTION keeps.

MAX_COUNT = 10**9
_AMOUNT_TEXT = re.compile(f"(-?)([0-9]{{1,{MAX_AMOUNT_DIGITS}}})(?:\\.([0-9]{{1,9}}))?")
_QUANTITY_TEXT = re.compile(f"[0-9]{{1,{MAX_AMOUNT_DIGITS}}}")


def amount_text(value: Fraction | int) -> str:
    """An amount as the state and the ledger keep it: ``"12"``, ``"0.5"``, ``"-0.333333333"``."""
    # Integer arithmetic: Fraction's own multiplication (a gcd each time) is several
    # times slower, and the state and the ledger write thousands of amounts an hour.
    numerator, denominator = Fraction(value).as_integer_ratio()
    if RESOLUTION % denominator:
        raise ValueError(f"{value} is not a multiple of 1/{RESOLUTION}")
    whole, part = divmod(abs(numerator) * (RESOLUTION // denominator), RESOLUTION)
    return ("-" if value < 0 else "") + str(whole) + (f".{part:09d}".rstrip("0") if part else "")


def parse_amount(text: Any, *, signed: bool = False) -> Fraction:
    """The reverse of amount_text. Raises ValueError for anything else (a sign unless
    ``signed``, more digits than MAX_AMOUNT_DIGITS, exponents, fractions like "1/3")."""
    match = _AMOUNT_TEXT.fullmatch(text) if isinstance(text, str) else None
    if not match or (match.group(1) and not signed):
        kind = "an amount" if signed else "a non-negative amount"
        raise ValueError(f"{shown_text(text)} is not {kind} like \"12.5\"")
    value = Fraction(int(match.group(2) + (match.group(3) or "").ljust(9, "0")), RESOLUTION)
    return -value if match.group(1) else value


def parse_count(value: Any) -> int:
    """A count kept in the state or the ledger: a JSON integer from 0 below MAX_COUNT."""
    if type(value) is not int or not 0 <= value < MAX_COUNT:
        raise ValueError(f"{shown_text(value)} is not a count")
    return value


def parse_name(value: Any) -> str:
    """A contract id or dimension read back: a non-empty string billing_name_problem accepts."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{shown_text(value)} is not a name")
    problem = billing_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def parse_text(value: Any, limit: int = 2000) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{shown_text(value)} is not a string of at most {limit} characters")
    return value


def amounts_to_json(values: Mapping[Key, Fraction]) -> dict[str, dict[str, str]]:
    """{(contract, dimension): amount} as {contract: {dimension: "amount"}}."""
    document: dict[str, dict[str, str]] = {}
    for (contract, dimension), value in sorted(values.items()):
        document.setdefault(contract, {})[dimension] = amount_text(value)
    return document


def amounts_from_json(document: Any, *, signed: bool = False) -> dict[Key, Fraction]:
    """The reverse of amounts_to_json. Raises ValueError."""
    if not isinstance(document, dict):
        raise ValueError("is not an object of {contract: {dimension: amount}}")
    values = {}
    for contract, dimensions in document.items():
        if not isinstance(dimensions, dict):
            raise ValueError(f"{shown_text(contract)} is not an object")
        for dimension, text in dimensions.items():
            try:
                key = (parse_name(contract), parse_name(dimension))
                values[key] = parse_amount(text, signed=signed)
            except ValueError as error:
                where = f"{shown_text(contract)}/{shown_text(dimension)}"
                raise ValueError(f"{where}: {error}") from None
    return values


def record_problem(record: Any, hour: datetime) -> str | None:
    """What is wrong with a Clazar record of ``hour`` kept in the state, or None: exactly
    RECORD_FIELDS, all strings, a known cloud, a contract id and dimension as
    billing_name_problem wants them, the hour's start and end, and a quantity of ASCII
    digits ("²" passes str.isdigit, and int() refuses it)."""
    if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS):
        return f"does not hold exactly the fields {', '.join(RECORD_FIELDS)}"
    if not all(isinstance(record[name], str) for name in RECORD_FIELDS):
        return "has a field that is not a string"
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


def _fields(data: Any, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    """``data`` as an object holding every ``required`` field and nothing but those and the
    ``optional`` ones. Raises ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"is a JSON {type(data).__name__}, not an object")
    missing = [name for name in required if name not in data]
    unknown = [name for name in data if name not in required and name not in optional]
    if missing or unknown:
        raise ValueError(f"lacks {', '.join(missing)}" if missing else
                         f"holds the unknown field {shown_text(unknown[0])}")
    return data


# --- Ledger lines ------------------------------------------------------------------


@dataclass(frozen=True)
class RecordLine:
    """What happened to one record: its first send (``retry`` false), or a later resend or
    clearing. ``amount`` and ``carried_in`` are the hour's usage and the remainder carried
    into it, on first-send lines; ``answer`` is Clazar's, masked, for waiting outcomes."""

    contract_id: str
    dimension: str
    hour: datetime
    cloud: str
    quantity: int
    outcome: str
    at: datetime
    amount: Fraction | None = None
    carried_in: Fraction | None = None
    record_id: str | None = None
    answer: Any = None
    retry: bool = False
    attempts: int = 1

    kind = "record"
    OPTIONAL = ("amount", "carried_in", "record_id", "answer", "retry", "attempts")

    @property
    def key(self) -> Key:
        return self.contract_id, self.dimension

    def record(self) -> dict[str, str]:
        """The metering record this line stands for, as it was sent."""
        return {"cloud": self.cloud, "contract_id": self.contract_id, "dimension": self.dimension,
                "start_time": format_time(self.hour), "end_time": format_time(self.hour + HOUR),
                "quantity": str(self.quantity)}

    def to_json(self) -> dict[str, Any]:
        data = {"kind": self.kind, "contract_id": self.contract_id, "dimension": self.dimension,
                "hour": format_time(self.hour), "cloud": self.cloud, "quantity": self.quantity,
                "outcome": self.outcome, "at": format_time(self.at), "record_id": self.record_id}
        for name in ("amount", "carried_in"):
            if getattr(self, name) is not None:
                data[name] = amount_text(getattr(self, name))
        if self.answer is not None:
            data["answer"] = self.answer
        if self.retry:
            data["retry"], data["attempts"] = True, self.attempts
        return data

    @classmethod
    def from_json(cls, data: Any) -> RecordLine:
        """Raises ValueError saying what is wrong."""
        _fields(data, ("kind", "contract_id", "dimension", "hour", "cloud", "quantity", "outcome",
                       "at"),
                cls.OPTIONAL)
        quantity = data["quantity"]
        if type(quantity) is not int or not 0 <= quantity < 10**MAX_AMOUNT_DIGITS:
            raise ValueError(f"has quantity {shown_text(quantity)}, not a whole number")
        if data["cloud"] not in CLOUDS or data["outcome"] not in RECORD_OUTCOMES:
            raise ValueError(f"has cloud {shown_text(data['cloud'])} or outcome "
                             f"{shown_text(data['outcome'])}")
        if not isinstance(data.get("retry", False), bool):
            raise ValueError("has a retry that is not true or false")
        record_id = data.get("record_id")
        return cls(parse_name(data["contract_id"]), parse_name(data["dimension"]),
                   parse_hour(data["hour"]),
                   data["cloud"], quantity, data["outcome"], parse_utc(data["at"]),
                   parse_amount(data["amount"]) if "amount" in data else None,
                   parse_amount(data["carried_in"]) if "carried_in" in data else None,
                   None if record_id is None else parse_text(record_id, 200),
                   mask_value(data.get("answer")), data.get("retry", False),
                   max(1, parse_count(data.get("attempts", 1))))


@dataclass(frozen=True)
class LateLine:
    """Usage found for an already billed hour by late check number ``check``: the
    difference from what was accounted before, and whether it was carried or reported."""

    contract_id: str
    dimension: str
    hour: datetime
    accounted_before: Fraction
    difference: Fraction
    action: str  # carried or reported
    check: int
    sources: str
    at: datetime

    kind = "late"

    @property
    def key(self) -> Key:
        return self.contract_id, self.dimension

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "contract_id": self.contract_id, "dimension": self.dimension,
                "hour": format_time(self.hour),
                "accounted_before": amount_text(self.accounted_before),
                "difference": amount_text(self.difference), "action": self.action,
                "check": self.check,
                "sources": self.sources, "at": format_time(self.at)}

    @classmethod
    def from_json(cls, data: Any) -> LateLine:
        """Raises ValueError saying what is wrong."""
        _fields(data, ("kind", "contract_id", "dimension", "hour", "accounted_before", "difference",
                       "action",
                       "check", "sources", "at"), ())
        if data["action"] not in ("carried", "reported"):
            raise ValueError(f"has action {shown_text(data['action'])}, not carried or reported")
        return cls(parse_name(data["contract_id"]), parse_name(data["dimension"]),
                   parse_hour(data["hour"]),
                   parse_amount(data["accounted_before"]),
                   parse_amount(data["difference"], signed=True),
                   data["action"], parse_count(data["check"]), parse_text(data["sources"], 64),
                   parse_utc(data["at"]))


LedgerLine = Union[RecordLine, LateLine]


def ledger_line(data: Any) -> LedgerLine:
    """One ledger line read back, by its kind. Raises ValueError saying what is wrong."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "record":
        return RecordLine.from_json(data)
    if kind == "late":
        return LateLine.from_json(data)
    raise ValueError(f"has kind {shown_text(kind)}, not record or late" if isinstance(data, dict)
                     else f"is a JSON {type(data).__name__}, not an object")


def first_sends(lines: Iterable[LedgerLine]) -> dict[Key, RecordLine]:
    """The first-send record lines of an hour, by key (what an earlier attempt at sending
    the hour found)."""
    return {line.key: line for line in lines if isinstance(line, RecordLine) and not line.retry}


def latest_records(lines: Iterable[LedgerLine]) -> dict[Key, RecordLine]:
    """The latest record line of each key: the record's fate."""
    return {line.key: line for line in lines if isinstance(line, RecordLine)}


def waiting_records(lines: Iterable[LedgerLine]) -> dict[Key, RecordLine]:
    """The records of one hour that wait for an operator: their latest line is rejected, a
    conflict, or a resend of a rejected one whose answer never came."""
    return {key: line for key, line in latest_records(lines).items()
            if line.outcome in (*WAITING_OUTCOMES, RESENDING)}


def waiting_as(line: RecordLine) -> str:
    """What a waiting record waits as: a record being resent is still a rejected one."""
    return REJECTED if line.outcome == RESENDING else line.outcome


def waiting_counts(lines: Iterable[LedgerLine]) -> dict[str, int]:
    """{outcome: how many records wait} for one hour's ledger lines."""
    counts: dict[str, int] = {}
    for line in waiting_records(lines).values():
        counts[waiting_as(line)] = counts.get(waiting_as(line), 0) + 1
    return counts


def accounted_from_ledger(lines: Iterable[LedgerLine]) -> dict[Key, Fraction]:
    """The high-water mark of an hour as its ledger lines tell it: the amounts it was billed
    on, raised by each later difference found, in the order found."""
    marks: dict[Key, Fraction] = {}
    for line in lines:
        if isinstance(line, RecordLine) and not line.retry and line.amount is not None:
            marks[line.key] = line.amount
        elif isinstance(line, LateLine):
            marks[line.key] = max(line.accounted_before, line.accounted_before + line.difference)
    return marks


# --- The pending hour and the accounted hour ------------------------------------------


@dataclass(frozen=True)
class PendingHour:
    """An hour whose records are about to be, or are being, sent.

    Written to the state before the first request; a run that finds it resends exactly
    these records (those not answered yet) and then commits it, so a crash can neither
    lose the hour nor let it be recomputed into different records.
    """

    hour: datetime
    records: tuple[Record, ...]
    amounts: Mapping[Key, Fraction]  # the hour's usage per key, for the ledger and the mark
    carried_in: Mapping[Key, Fraction]  # the remainders each record carried in (not zero)
    remainders: Mapping[Key, Fraction]  # the remainders once it is sent (those that changed)
    clouds: Mapping[str, str]  # each contract's marketplace
    services: Mapping[str, str]  # the services it was read from, with their marketplaces
    sources: str  # hour_digest of the files read
    formulas: str  # formulas_fingerprint of the formulas applied
    unattributable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"hour": format_time(self.hour),
                "records": [dict(record) for record in self.records],
                "amounts": amounts_to_json(self.amounts),
                "carried_in": amounts_to_json(self.carried_in),
                "remainders": amounts_to_json(self.remainders),
                "clouds": dict(sorted(self.clouds.items())),
                "services": dict(sorted(self.services.items())), "sources": self.sources,
                "formulas": self.formulas, "unattributable": self.unattributable}

    @classmethod
    def from_json(cls, data: Any) -> PendingHour:
        """Raises ValueError saying what is wrong."""
        _fields(data, ("hour", "records", "amounts", "carried_in", "remainders", "clouds",
                       "services", "sources",
                       "formulas", "unattributable"), ())
        hour = parse_hour(data["hour"])
        if not isinstance(data["records"], list):
            raise ValueError("records is not a list")
        for index, record in enumerate(data["records"]):
            problem = record_problem(record, hour)
            if problem:
                raise ValueError(f"record {index} {problem}")
        return cls(hour, tuple(data["records"]), amounts_from_json(data["amounts"]),
                   amounts_from_json(data["carried_in"]), amounts_from_json(data["remainders"]),
                   _clouds(data["clouds"], parse_name), _clouds(data["services"], parse_text),
                   parse_text(data["sources"], 64), parse_text(data["formulas"], 64),
                   parse_count(data["unattributable"]))


def _clouds(data: Any, parse_key: Callable[[Any], str]) -> dict[str, str]:
    if not isinstance(data, dict) or not all(cloud in CLOUDS for cloud in data.values()):
        raise ValueError("is not an object of {name: aws|azure|gcp}")
    return {parse_key(key): cloud for key, cloud in data.items()}


@dataclass(frozen=True)
class AccountedHour:
    """What is accounted for one processed hour, for the late-usage check.

    ``amounts`` is the high-water mark per (contract, dimension), in billing dimensions:
    what the hour was billed on plus every increment carried for it since. ``sources``
    is the digest of the files last read, ``formulas`` the fingerprint of the formulas
    the amounts were computed with, ``services`` the services it was read from, and
    ``checks`` how many late checks were committed (their ledger lines carry their number).
    """

    sources: str
    formulas: str
    amounts: Mapping[Key, Fraction]
    services: tuple[str, ...]
    checks: int = 0

    def to_json(self) -> dict[str, Any]:
        """The hour's JSON (not to be changed), made once: an accounted hour never changes,
        and the state, every hour of the lookback in it, is written twice an hour."""
        document = self.__dict__.get("_json")
        if document is None:
            document = {"sources": self.sources, "formulas": self.formulas,
                        "checks": self.checks, "services": list(self.services),
                        "amounts": amounts_to_json(self.amounts)}
            object.__setattr__(self, "_json", document)
        return document

    @classmethod
    def from_json(cls, data: Any) -> AccountedHour:
        _fields(data, ("sources", "formulas", "checks", "services", "amounts"), ())
        if not isinstance(data["services"], list):
            raise ValueError("services is not a list")
        return cls(parse_text(data["sources"], 64), parse_text(data["formulas"], 64),
                   amounts_from_json(data["amounts"]),
                   tuple(parse_text(key) for key in data["services"]),
                   parse_count(data["checks"]))


# --- The state ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceEntry:
    """What the state keeps of one service key, where the original script kept it."""

    last_processed_hour: datetime | None = None
    # Once the marker decided this service's hours, a missing marker is an error.
    hours_by_marker: bool = False
    # The first hour it was billed with, when it joined the deployment after its start.
    first_hour: datetime | None = None

    def billed(self, hour: datetime) -> bool:
        """Whether ``hour``, processed by the deployment, was billed with this service."""
        return (self.first_hour is None or self.first_hour <= hour) and \
            self.last_processed_hour is not None and hour <= self.last_processed_hour

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if self.last_processed_hour is not None:
            entry["last_processed_hour"] = format_time(self.last_processed_hour)
        if self.hours_by_marker:
            entry["hours_by_marker"] = True
        if self.first_hour is not None:
            entry["first_hour"] = format_time(self.first_hour)
        return entry

    @classmethod
    def from_json(cls, data: Any) -> ServiceEntry:
        _fields(data, (), ("last_processed_hour", "hours_by_marker", "first_hour"))
        if not isinstance(data.get("hours_by_marker", False), bool):
            raise ValueError("hours_by_marker is not true or false")
        hour, first = data.get("last_processed_hour"), data.get("first_hour")
        return cls(None if hour is None else parse_hour(hour), data.get("hours_by_marker", False),
                   None if first is None else parse_hour(first))


STATE_VERSION = 2
LATE_NOTES_KEPT = 200


@dataclass(frozen=True)
class DeploymentState:
    """Everything the state remembers: one deployment, billed as one. Pure: each change
    returns a new one.

    Remainders, late-usage marks, the pending hour and the records waiting are per
    (contract, dimension) for the whole deployment; each service keeps only its last
    processed hour and whether the marker decides its hours. Records waiting for an
    operator live in the ledger; ``waiting`` only counts them per hour, so the state
    stays small however many accumulate.
    """

    services: Mapping[str, ServiceEntry] = field(default_factory=dict)
    first_hour: datetime | None = None
    last_processed_hour: datetime | None = None
    remainders: Mapping[Key, Fraction] = field(default_factory=dict)
    clouds: Mapping[str,
                    str] = field(default_factory=dict)  # contract -> marketplace, for remainders
    pending: PendingHour | None = None
    accounted: Mapping[datetime, AccountedHour] = field(default_factory=dict)
    marks_hours: int = 0  # the lookback the marks were last kept for
    waiting: Mapping[datetime, Mapping[str, int]] = field(default_factory=dict)
    late_notes: tuple[Mapping[str, str], ...] = ()  # the latest late usage found, for status
    owed_ledger: tuple[LateLine, ...] = ()  # committed late lines not yet in the ledger
    last_run: Mapping[str, Any] | None = None
    last_success_at: datetime | None = None

    def service(self, key: str) -> ServiceEntry:
        return self.services.get(key, ServiceEntry())

    def with_service(self, key: str, entry: ServiceEntry) -> DeploymentState:
        return dataclasses.replace(self, services={**self.services, key: entry})

    def waiting_count(self, outcome: str) -> int:
        return sum(counts.get(outcome, 0) for counts in self.waiting.values())

    def with_waiting(self, hour: datetime, counts: Mapping[str, int]) -> DeploymentState:
        waiting = {key: value for key, value in self.waiting.items() if key != hour}
        kept = {outcome: count for outcome, count in counts.items() if count}
        return dataclasses.replace(self, waiting={**waiting, **({hour: kept} if kept else {})})

    def committed(self, pending: PendingHour, waiting: Mapping[str, int],
                  lookback_hours: int) -> DeploymentState:
        """The state once ``pending`` is done: its hour processed by the deployment and by
        every service it was read from, its remainders kept, its waiting records counted,
        and its amounts kept as the hour's mark for ``lookback_hours``."""
        accounted = {**self.accounted, pending.hour: AccountedHour(
            pending.sources, pending.formulas, dict(pending.amounts),
            tuple(sorted(pending.services)))}
        services = dict(self.services)
        for key in pending.services:
            services[key] = dataclasses.replace(self.service(key), last_processed_hour=pending.hour)
        remainders = {**self.remainders, **pending.remainders}
        clouds = {**self.clouds, **{contract: pending.clouds[contract] for contract,
                                    _ in pending.remainders
                                    if contract in pending.clouds}}
        state = dataclasses.replace(self, services=services, last_processed_hour=pending.hour,
                                    pending=None,
                                    remainders={key: value for key,
                                                value in remainders.items() if value},
                                    clouds=clouds, accounted=accounted)
        return state.with_waiting(pending.hour, waiting).with_marks_kept(lookback_hours)

    def with_marks_kept(self, lookback_hours: int) -> DeploymentState:
        """The state keeping the marks of the last ``lookback_hours`` processed hours only,
        and the clouds of contracts that still carry a remainder."""
        last = self.last_processed_hour
        accounted = {hour: mark for hour, mark in self.accounted.items()
                     if last is not None and hour > last - lookback_hours * HOUR}
        contracts = {contract for contract, _ in self.remainders}
        clouds = {contract: cloud for contract,
                  cloud in self.clouds.items() if contract in contracts}
        return dataclasses.replace(self, accounted=accounted, marks_hours=lookback_hours,
                                   clouds=clouds)

    def with_run(self, run: Mapping[str, Any], at: datetime, succeeded: bool) -> DeploymentState:
        """The state with this run's summary recorded, for ``status`` and the metrics. Times
        are kept to the second, as the state writes them, so that the metrics of this run and
        of later ones give the same last success."""
        at = at.replace(microsecond=0)
        return dataclasses.replace(self, last_run=dict(run),
                                   last_success_at=at if succeeded else self.last_success_at)


_RUN_FIELDS = ("at", "result", "hours", "sent", "already_delivered", "rejected", "conflicts",
               "unattributable",
               "late_hours", "late_usage", "error", "holding")
_NOTE_FIELDS = ("hour", "contract_id", "dimension", "difference", "action", "at")


def _run_summary(data: Any) -> dict[str, Any]:
    """A last_run summary read back: counts, short texts, the time it ended."""
    _fields(data, ("at", "result"), _RUN_FIELDS)
    parse_utc(data["at"])
    for name, value in data.items():
        if name != "at" and value is not None:
            _ = parse_count(value) if type(value) is int else parse_text(value)
    return dict(data)


def _late_note(data: Any) -> dict[str, str]:
    _fields(data, _NOTE_FIELDS, ())
    parse_hour(data["hour"]), parse_name(data["contract_id"]), parse_name(data["dimension"])
    parse_amount(data["difference"], signed=True), parse_utc(data["at"])
    if data["action"] not in ("carried", "reported"):
        raise ValueError(f"has action {shown_text(data['action'])}")
    return dict(data)


def _within(name: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)``, with a ValueError's message prefixed by ``name``."""
    try:
        return parse(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _by_hour(data: Any, parse: Callable[[Any], Any]) -> dict[datetime, Any]:
    if not isinstance(data, dict):
        raise ValueError("is not an object keyed by hour")
    return {parse_hour(hour): _within(hour, parse, value) for hour, value in data.items()}


def _waiting(data: Any) -> dict[str, int]:
    if not isinstance(data, dict) or not data or any(name not in WAITING_OUTCOMES for name in data):
        raise ValueError("is not an object of {rejected|conflict: count}")
    return {name: parse_count(count) for name, count in data.items()}


def _listed(parse: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def parse_list(items: Any) -> tuple:
        if not isinstance(items, list):
            raise ValueError("is not a list")
        return tuple(parse(item) for item in items)
    return parse_list


def _optional(data: Mapping[str, Any], name: str, parse: Callable[[Any], Any],
              default: Any = None) -> Any:
    return _within(name, parse, data[name]) if data.get(name) is not None else default


_DEPLOYMENT_FIELDS = ("first_hour", "last_processed_hour", "remainders", "clouds", "pending_hour",
                      "accounted",
                      "marks_hours", "waiting", "late_usage", "owed_ledger", "last_run",
                      "last_success_at")


def deployment_from_json(data: Any, services: Mapping[str, ServiceEntry]) -> DeploymentState:
    """The ``deployment`` entry of a version 2 state. Raises ValueError naming the field."""
    _fields(data, (), _DEPLOYMENT_FIELDS)
    return DeploymentState(
        services=services,
        first_hour=_optional(data, "first_hour", parse_hour),
        last_processed_hour=_optional(data, "last_processed_hour", parse_hour),
        remainders=_optional(data, "remainders", amounts_from_json, {}),
        clouds=_optional(data, "clouds", lambda value: _clouds(value, parse_name), {}),
        pending=_optional(data, "pending_hour", PendingHour.from_json),
        accounted=_optional(data, "accounted",
                            lambda value: _by_hour(value, AccountedHour.from_json), {}),
        marks_hours=_optional(data, "marks_hours", parse_count, 0),
        waiting=_optional(data, "waiting", lambda value: _by_hour(value, _waiting), {}),
        late_notes=_optional(data, "late_usage", _listed(_late_note), ()),
        owed_ledger=_optional(data, "owed_ledger", _listed(LateLine.from_json), ()),
        last_run=_optional(data, "last_run", _run_summary),
        last_success_at=_optional(data, "last_success_at", parse_utc),
    )


def deployment_to_json(state: DeploymentState) -> dict[str, Any]:
    data: dict[str, Any] = {"remainders": amounts_to_json(state.remainders),
                            "clouds": dict(sorted(state.clouds.items())),
                            "marks_hours": state.marks_hours}
    for name, hour in (("first_hour", state.first_hour),
                       ("last_processed_hour", state.last_processed_hour),
                       ("last_success_at", state.last_success_at)):
        if hour is not None:
            data[name] = format_time(hour)
    if state.pending is not None:
        data["pending_hour"] = state.pending.to_json()
    data["accounted"] = {format_time(hour): mark.to_json() for hour,
                         mark in sorted(state.accounted.items())}
    data["waiting"] = {format_time(hour): dict(sorted(counts.items()))
                       for hour, counts in sorted(state.waiting.items())}
    data["late_usage"] = [dict(note) for note in state.late_notes]
    data["owed_ledger"] = [line.to_json() for line in state.owed_ledger]
    if state.last_run is not None:
        data["last_run"] = dict(state.last_run)
    return data


def migrate_original_script(document: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1, the original script's state: {service key: {"last_processed_hour": ...}}.
    Each service keeps its last processed hour; the first run decides the deployment's
    from them. Raises ValueError for an entry holding objects or lists, which only
    development versions of this exporter wrote."""
    migrated: dict[str, Any] = {"version": 2, "deployment": {}}
    for key, entry in document.items():
        if not isinstance(entry, dict) or any(isinstance(value, (dict, list))
                                              for value in entry.values()):
            raise ValueError(f"entry {shown_text(key)} is not the original script's (an object "
                             "with last_processed_hour); a state of a development version cannot "
                             "be read")
        migrated[key] = {"last_processed_hour": entry["last_processed_hour"]} \
            if entry.get("last_processed_hour") is not None else {}
    return migrated


# Each function takes a state document of its version to the next one.
MIGRATIONS: dict[int, Callable[[Mapping[str, Any]], dict[str, Any]]] = {1: migrate_original_script}


def state_from_json(document: Any) -> DeploymentState:
    """The state a document holds, migrated from an older version. Raises ValueError."""
    if not isinstance(document, dict):
        raise ValueError("is not a JSON object")
    version = document.get("version", 1)
    if type(version) is not int or not 1 <= version <= STATE_VERSION:
        raise ValueError(f"has version {shown_text(version)}; this exporter reads versions 1 to "
                         f"{STATE_VERSION}")
    while version < STATE_VERSION:
        document, version = MIGRATIONS[version](document), version + 1
    services = {}
    for key, entry in document.items():
        if key not in ("version", "deployment"):
            if not isinstance(key, str) or key.count(":") < 2:
                raise ValueError(f"entry {shown_text(key)} is not a service key "
                                 "(service:environment:plan)")
            services[key] = _within(f"entry {key!r}", ServiceEntry.from_json, entry)
    return _within("entry 'deployment'", lambda data: deployment_from_json(data, services),
                   document.get("deployment", {}))


def state_to_json(state: DeploymentState) -> dict[str, Any]:
    document: dict[str, Any] = {"version": STATE_VERSION, "deployment": deployment_to_json(state)}
    for key, entry in sorted(state.services.items()):
        document[key] = entry.to_json()
    return document


def parse_state(body: bytes, where: str) -> DeploymentState:
    """Parse a state document. Raises StateError naming ``where`` and what is wrong."""
    try:
        return state_from_json(parse_json(body))
    except ValueError as error:
        raise StateError(f"state {where} {error}; it was left untouched: fix or restore "
                         "it") from None


def dump_state(state: DeploymentState) -> bytes:
    """One entry per line: readable, and encoded by json's C encoder (indent would switch
    to the pure-Python one, several times slower for an hour of 20,000 pending records)."""
    document = state_to_json(state)
    lines = [f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}" for key,
             value in document.items()]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


# ===========================================================================
# 7. Adapters: S3 reads, Clazar, storage of the state and the ledger, locks
# ===========================================================================


class DeadlinePassed(Exception):
    """A call abandoned by within_deadline."""


def within_deadline(call: Callable[[], Any], seconds: float, where: str) -> Any:
    """``call()``'s result, or DeadlinePassed after ``seconds``, or RunStopped (naming
    ``where``) the stop's grace after a stop is asked for.

    The call runs on a daemon thread of its own so that it can be abandoned: a server
    trickling a byte at a time defeats every per-read timeout. An abandoned call ends
    with the process. Whatever the call raises is raised here.
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
            ends = min(ends, now + STOP.grace)
        if now >= ends:
            STOP.check(where)
            raise DeadlinePassed(where)
        worker.join(min(StopRequest.POLL_SECONDS, ends - now))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class DaemonPool:
    """Threads that run submitted calls, started as needed up to ``workers``, that never
    hold up the process's exit: a call abandoned past its deadline keeps its thread, which
    ends when the call returns or with the process (concurrent.futures joins its threads at
    exit, for ever), and another thread takes its place. Each future gets ``started``, the
    monotonic time its call began."""

    def __init__(self, workers: int, name: str):
        self.workers = workers
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._closed = False
        self._lock = threading.Lock()  # hours read ahead submit from two threads

    def submit(self, call: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((call, future))
        with self._lock:
            if self._threads < self.workers:
                self._threads += 1
                threading.Thread(target=self._serve, name=f"{self.name}_{self._threads}",
                                 daemon=True).start()
        return future

    def shutdown(self) -> None:
        """Let every thread end once the calls queued before are done or cancelled."""
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._calls.put(None)

    def abandon(self, future: concurrent.futures.Future) -> None:
        """Give up on a running call: its thread ends once the call returns, and another
        takes its place now, or the calls queued behind abandoned ones would never start."""
        with self._lock:
            if getattr(future, "returned", True) or getattr(future, "abandoned", False):
                return
            future.abandoned = True
            if self._closed:  # no call is left to run: none replaces it
                return
            threading.Thread(target=self._serve, name=f"{self.name}_{id(future)}",
                             daemon=True).start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            call, future = item
            future.returned, future.started = False, time.monotonic()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result, error = call(), None
            except BaseException as raised:  # handed over to whoever waits on the future
                result, error = None, raised
            with self._lock:
                future.returned = True
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            if getattr(future, "abandoned", False):
                return


class RequestFailed(OSError):
    """No answer to an HTTP request; the message starts with the failure's own type name."""


def http_session() -> Any:
    """A requests session that takes nothing from the environment by itself (see
    bounded_request): left on, requests would let a ~/.netrc entry replace the bearer
    token (and send the netrc password), and would route by any *_proxy variable."""
    import requests

    session = requests.Session()
    session.trust_env = False
    return session


def bounded_request(session: Any, method: str, url: str, limit: int, **arguments: Any
                    ) -> tuple[int, bytes, Any]:
    """(status, body, response) of one HTTP request on ``session`` (an http_session),
    reading at most ``limit`` + 1 bytes of the body: a longer one is cut there, for the
    caller to refuse.

    No redirect is followed and the answer is asked for uncompressed (a compressed one
    could expand far beyond ``limit``). The CA bundle (REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE) and the proxies (*_proxy, no_proxy honoured) come from the
    environment, except that a plain-http request never goes through a proxy: plain
    http carries credentials only to loopback, and a proxy would receive them in clear.
    Raises RequestFailed.
    """
    import requests
    from requests.utils import get_environ_proxies
    from urllib3.exceptions import HTTPError

    arguments["headers"] = {**arguments.get("headers", {}), "Accept-Encoding": "identity"}
    proxies = {} if url.lower().startswith("http://") else get_environ_proxies(url)
    verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    try:
        response = session.request(method, url, allow_redirects=False, stream=True, proxies=proxies,
                                    verify=verify, **arguments)
        try:
            body = response.raw.read(limit + 1, decode_content=False)
        finally:
            response.close()
    except (requests.RequestException, HTTPError, OSError) as error:
        failed = RequestFailed(f"{type(error).__name__}: {error}")
        # requests wraps urllib3's MaxRetryError, which says whether an attempt may have landed.
        exhausted = next((cause for cause in (error, *getattr(error, "args", ()))
                          if hasattr(cause, "may_have_landed")), None)
        failed.may_have_landed = getattr(exhausted, "may_have_landed", True)
        raise failed from None
    return response.status_code, body, response


# --- S3 --------------------------------------------------------------------------------

# Export files read at once over one connection pool, and hours read ahead of the one
# being sent (one when an hour holds LARGE_HOUR_FILES files or more, to bound memory).
S3_READ_CONCURRENCY = 32
READ_AHEAD_HOURS = 2
LARGE_HOUR_FILES = 1000
# A listing of one hour's folder: at most this many pages of 1,000 keys.
MAX_LISTING_PAGES = 1000
# The largest state and ledger file read from S3.
MAX_STATE_BYTES = 256 * 2**20


def _environment_keys() -> dict[str, str]:
    """The AWS keys of the environment, without the whitespace around them (a Kubernetes
    secret often ends in a newline, which botocore refuses in a header), as boto3 would take
    them first; nothing when they are not set, to leave boto3 its own chain (a role, a profile)."""
    key, secret = (os.environ.get(name, "").strip() for name in ("AWS_ACCESS_KEY_ID",
                                                                  "AWS_SECRET_ACCESS_KEY"))
    if not key or not secret:
        return {}
    token = os.environ.get("AWS_SESSION_TOKEN", os.environ.get("AWS_SECURITY_TOKEN", "")).strip()
    return {"aws_access_key_id": key, "aws_secret_access_key": secret,
            **({"aws_session_token": token} if token else {})}


def s3_client(workers: int = S3_READ_CONCURRENCY) -> Any:
    """One boto3 S3 client with a connection pool as large as the read pool. Endpoint,
    region and credentials follow boto3's own conventions."""
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig

    session = botocore.session.get_session()
    # Keep S3's timestamps as the strings they arrive as (the AWS CLI does the same):
    # nothing here reads LastModified, and parsing it was a third of the CPU of a GET.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    keyed = boto3.session.Session(botocore_session=session, **_environment_keys())

    def client(**direct: Any) -> Any:
        return keyed.client("s3", config=BotoConfig(
            max_pool_connections=workers + 4, connect_timeout=10, read_timeout=30,
            retries={"mode": "standard", "max_attempts": 4}, **direct))

    # The endpoint as boto3 resolved it: from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (checked
    # with the settings), or from the AWS config file's endpoint_url, which only this sees.
    # Over plain http it must be loopback, and is reached directly: botocore would send its
    # signed requests and the session token through any *_proxy.
    first = client()
    endpoint = str(first.meta.endpoint_url or "")
    if not endpoint.lower().startswith("http://"):
        return first
    check_url(f"the S3 endpoint {_shown_url(endpoint)} (from AWS_ENDPOINT_URL_S3, "
              "AWS_ENDPOINT_URL or the AWS config file's endpoint_url)", endpoint,
              carries_credentials=True, allow_userinfo=True)
    return client(proxies={})


def error_code(error: Exception) -> str:
    """S3's error code of a boto3 error ("NoSuchKey", "404", "PreconditionFailed"), or ""."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def http_status(error: Exception) -> int | None:
    return (getattr(error, "response", None) or {}).get("ResponseMetadata",
                                                        {}).get("HTTPStatusCode")


def is_missing(error: Exception) -> bool:
    """Whether S3 says there is no such object."""
    return error_code(error) in ("NoSuchKey", "404", "NotFound")


def is_condition_failure(error: Exception) -> bool:
    """Whether S3 refused a conditional write: 412, or 409 when two writers raced."""
    return error_code(error) in ("PreconditionFailed", "ConditionalRequestConflict") or \
        http_status(error) in (409, 412)


def fetch_object(client: Any, bucket: str, key: str, limit: int,
                 limit_name: str = "MAX_EXPORT_FILE_BYTES") -> tuple[bytes, str]:
    """(body, ETag) of one object, read no further than ``limit`` bytes (``limit_name`` says
    whose limit), with no deadline of its own: see s3_get. Raises SourceError naming the
    object if it is larger, and boto3's own errors (a missing object among them)."""
    where = f"s3://{bucket}/{key}"
    too_large = f"more than {limit_name} ({limit} bytes)"
    answer = client.get_object(Bucket=bucket, Key=key)
    with contextlib.closing(answer["Body"]) as stream:
        size = answer.get("ContentLength")
        if isinstance(size, int) and size > limit:
            raise SourceError(f"{where}: {size} bytes, {too_large}")
        body = stream.read(limit + 1)
    if len(body) > limit:
        raise SourceError(f"{where}: {too_large}")
    return body, str(answer.get("ETag", ""))


def too_slow(bucket: str, key: str, seconds: float) -> SourceError:
    return SourceError(f"s3://{bucket}/{key} was not read within {seconds:g} s "
                       "(S3_TIMEOUT_SECONDS)")


def s3_get(client: Any, bucket: str, key: str, limit: int, seconds: float,
           limit_name: str = "MAX_EXPORT_FILE_BYTES") -> tuple[bytes, str]:
    """fetch_object within ``seconds``. Raises what it raises, or SourceError naming the
    object if it was not read in time."""
    try:
        return within_deadline(lambda: fetch_object(client, bucket, key, limit, limit_name),
                               seconds, f"while reading s3://{bucket}/{key}")
    except DeadlinePassed:
        raise too_slow(bucket, key, seconds) from None


def landed_etag(client: Any, bucket: str, key: str, digest: bytes, size: int,
                seconds: float) -> str | None:
    """The object's ETag if it holds exactly the ``size`` bytes of SHA-256 ``digest``, else
    None (unreadable included). A conditional write that landed but was answered with an
    error (a 500 after storing) is retried by botocore with its condition, which the write
    itself then fails: this tells the run's own write from another run's."""
    try:
        body, etag = s3_get(client, bucket, key, size, seconds, "the size of what was written")
    except Exception:
        return None
    return etag if hashlib.sha256(body).digest() == digest else None


@dataclass(frozen=True)
class HourListing:
    """The export files of one service's hour folder, with their sizes and ETags."""

    files: Mapping[str, tuple[int, str]]  # key -> (size, ETag)
    ignored: tuple[str, ...]


class ExportSource:
    """Reads the Omnistrate export of one bucket, every read bounded in size and time.

    Reads share one pool of threads over one boto3 client whose connection pool is as
    large, however many hours are being read at once.
    """

    def __init__(self, client: Any, bucket: str, max_file_bytes: int, seconds: float,
                 workers: int = S3_READ_CONCURRENCY):
        self.client = client
        self.bucket = bucket
        self.max_file_bytes = max_file_bytes
        self.seconds = seconds
        self.workers = workers
        self._pool = DaemonPool(workers, "s3-read")

    def close(self) -> None:
        # Reads still in flight (after a stop, or past their deadline) end with the process.
        self._pool.shutdown()

    def read_marker(self) -> ExportMarker | None:
        """The completion marker, or None if the bucket has none. Raises MarkerError if it
        exists but cannot be read or parsed: a denied or broken marker must stop the
        deployment, never count as absent."""
        where = f"s3://{self.bucket}/{MARKER_KEY}"
        try:
            body, _ = s3_get(self.client, self.bucket, MARKER_KEY, self.max_file_bytes,
                             self.seconds)
        except SourceError as error:
            raise MarkerError(f"export marker {error}") from None
        except Exception as error:
            if is_missing(error):
                return None
            raise MarkerError(f"cannot read export marker {where}: {error}") from None
        return ExportMarker.parse(body, where)

    def list_hour(self, prefix: str) -> HourListing:
        """Every export file under ``prefix``, page by page.

        botocore's paginator refuses only a continuation token repeated at once; a server
        cycling through tokens (A, B, A, B) would list forever. So the pages are asked for
        here: a token seen before, more than MAX_LISTING_PAGES pages, or more than
        S3_TIMEOUT_SECONDS in all fails the hour, naming the prefix. Raises SourceError.
        """
        where = f"s3://{self.bucket}/{prefix}"
        ends, seen, token = time.monotonic() + self.seconds, set(), None
        files: dict[str, tuple[int, str]] = {}
        ignored: list[str] = []
        for _ in range(MAX_LISTING_PAGES):
            page = self._page(prefix, token, ends - time.monotonic(), where)
            for item in page.get("Contents", ()):
                key = str(item.get("Key", ""))
                name = key[len(prefix):]
                if key.startswith(prefix) and name.endswith(".json") and "/" not in name:
                    files[key] = (int(item.get("Size", 0) or 0), str(item.get("ETag", "")))
                else:
                    ignored.append(key)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated"):
                return HourListing(files, tuple(ignored))
            if not token or token in seen:
                raise SourceError(f"cannot list {where}: S3 repeated a continuation token; the "
                                  "listing would never end")
            seen.add(token)
        raise SourceError(f"cannot list {where}: more than {MAX_LISTING_PAGES} pages")

    def _page(self, prefix: str, token: str | None, seconds: float, where: str
              ) -> Mapping[str, Any]:
        arguments = {"Bucket": self.bucket, "Prefix": prefix,
                     **({"ContinuationToken": token} if token else {})}
        STOP.check("while listing the export")
        try:
            return within_deadline(lambda: self.client.list_objects_v2(**arguments),
                                   max(0.0, seconds), "while listing the export")
        except DeadlinePassed:
            raise SourceError(f"cannot list {where}: not done within {self.seconds:g} s "
                              "(S3_TIMEOUT_SECONDS)") from None
        except Exception as error:
            raise SourceError(f"cannot list {where}: {error}") from None

    def read(self, key: str) -> tuple[bytes, str]:
        """(body, ETag) of one export file, with no deadline of its own (read_all watches
        it). Raises SourceError if it cannot be read or is too large."""
        try:
            return fetch_object(self.client, self.bucket, key, self.max_file_bytes)
        except SourceError:
            raise
        except Exception as error:
            raise SourceError(f"cannot read s3://{self.bucket}/{key}: {error}") from None

    def read_all(self, keys: Iterable[str]) -> Iterator[tuple[str, bytes, str]]:
        """Yield (key, body, ETag) for every key, read concurrently, in completion order.

        At most twice the pool size of reads are queued, so memory stays bounded however
        many files an hour holds. The first failure is raised, or SourceError for a read
        not done within S3_TIMEOUT_SECONDS of its start; the reads still queued are then
        cancelled and those running abandoned. Raises RunStopped once a stop is asked for.
        """
        pending: dict[concurrent.futures.Future, str] = {}
        try:
            for key in keys:
                STOP.check("while reading the export")
                pending[self._pool.submit(lambda k=key: (k, *self.read(k)))] = key
                while len(pending) >= 2 * self.workers:
                    yield from self._finished(pending)
            while pending:
                yield from self._finished(pending)
        finally:
            for future in pending:  # a read left running (another failed) gives up its thread
                if not future.cancel():
                    self._pool.abandon(future)

    def _finished(self, pending: dict[concurrent.futures.Future, str]
                  ) -> Iterator[tuple[str, bytes, str]]:
        """The reads of ``pending`` that end within a poll, taken out of it. Raises what a
        read raised, SourceError for one past its deadline, or RunStopped.

        The deadline is watched here rather than by within_deadline around each read: handing
        every read to a thread of its own cost more than a third of the catch-up's time."""
        done, _ = concurrent.futures.wait(pending, timeout=StopRequest.POLL_SECONDS,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            del pending[future]
            yield future.result()
        STOP.check("while reading the export")
        now = time.monotonic()
        overdue = [(future, key) for future, key in pending.items()
                   if now - getattr(future, "started", now) > self.seconds]
        for future, _ in overdue:
            self._pool.abandon(future)
        if overdue:
            raise too_slow(self.bucket, overdue[0][1], self.seconds)


class HourReader:
    """Reads the hours of a deployment: every service's folder of the hour, as one usage.
    Used by the run, its late-usage checks, and reconcile."""

    def __init__(self, source: ExportSource, formulas: Sequence[Formula]):
        self.source = source
        self.with_prices = any(name.endswith(PRICE_SUFFIX) for formula in formulas
                               for name in formula.inputs)

    def listings(self, hour: datetime, services: Sequence[ServiceKey]) -> dict[str, HourListing]:
        """{service key: its listing of ``hour``}. Raises SourceError."""
        return {service.key: self.source.list_hour(service.hour_prefix(hour))
                for service in services}

    @staticmethod
    def listing_digest(listings: Mapping[str, HourListing]) -> str:
        return hour_digest((key, etag) for listing in listings.values()
                           for key, (_, etag) in listing.files.items())

    def read(self, hour: datetime, services: Sequence[ServiceKey],
             listings: Mapping[str, HourListing] | None = None) -> HourUsage:
        """The usage of ``hour`` across ``services``, its digest made from the ETags of the
        bodies read (not the listing's: a file rewritten in between must show). Raises
        SourceError or ExportFileError naming the file."""
        listings = listings if listings is not None else self.listings(hour, services)
        usage = HourUsage(hour, tuple(services))
        owner = {}
        for service in services:
            listing = listings[service.key]
            usage.folders.append((service.hour_prefix(hour), len(listing.files)))
            usage.ignored += listing.ignored
            for key, (size, _) in listing.files.items():
                if size > self.source.max_file_bytes:
                    raise ExportFileError(f"{key}: {size} bytes, more than MAX_EXPORT_FILE_BYTES "
                                          f"({self.source.max_file_bytes} bytes); the file was not "
                                          "read")
                owner[key] = service.key
        read = []
        with contextlib.closing(self.source.read_all(sorted(owner))) as files:
            for key, body, etag in files:
                usage.add(owner[key], parse_export_file(key, body, with_prices=self.with_prices))
                read.append((key, etag))
        usage.sources = hour_digest(read)
        return usage

    def read_ahead(self, hours: Sequence[tuple[datetime,
                                               Sequence[ServiceKey]]]) -> Iterator[HourUsage]:
        """Each hour's usage, in order, while the next hours are already read.

        Reading ahead only reads: carry, pending hour and commit are applied by the caller
        strictly in order, so a failure at hour H leaves every hour after it untouched. Up
        to READ_AHEAD_HOURS small hours are read at once (they share the read pool); an hour
        of LARGE_HOUR_FILES files or more keeps the pool busy alone, and then only one is
        read ahead, so memory holds the rows of at most two large hours.
        """
        upcoming = iter(hours)
        ahead = concurrent.futures.ThreadPoolExecutor(READ_AHEAD_HOURS,
                                                      thread_name_prefix="read-ahead")
        queued = [ahead.submit(self.read, *item) for item in itertools.islice(upcoming, 1)]
        try:
            while queued:
                usage = STOP.result(queued.pop(0), "while reading the export")
                wanted = READ_AHEAD_HOURS if usage.files < LARGE_HOUR_FILES else 1
                queued += [ahead.submit(self.read, *item)
                           for item in itertools.islice(upcoming, max(0, wanted - len(queued)))]
                yield usage
                if not queued:
                    queued += [ahead.submit(self.read, *item)
                               for item in itertools.islice(upcoming, 1)]
        finally:
            ahead.shutdown(wait=not STOP.is_set(), cancel_futures=True)


# --- Clazar ------------------------------------------------------------------------------

# Requests of one hour in flight at once, on one keep-alive session: more gained nothing.
SEND_CONCURRENCY = 4
# urllib3's own cap on the backoff between two retries.
BACKOFF_MAX_SECONDS = 120.0
# The largest answer read from Clazar: a batch's results take a few hundred bytes per
# record. A larger answer is refused, not read into memory whole.
MAX_ANSWER_BYTES = 16 * 2**20
# Clazar's answer to a second record for a contract, dimension and hour. Whether the
# record there is ours is for duplicate_outcome to say.
_DUPLICATE_MARKERS = (("same contract_id", "same hour"), ("already exists",))


@dataclass(frozen=True)
class RecordResult:
    """Clazar's verdict on one record (or, for NO_ANSWER and UNSENT, its batch's fate).
    ``retried``: its request was sent more than once after an attempt that may have landed."""

    outcome: str
    record_id: str | None = None
    answer: Any = None
    retried: bool = False


def _answer_texts(entry: Mapping[str, Any]) -> list[str]:
    texts = []
    errors = entry.get("errors")
    for error in errors if isinstance(errors, list) else [errors] if errors else []:
        texts.append(str(error.get("message", error)) if isinstance(error, dict) else str(error))
    return texts + [str(entry[name]) for name in ("message", "code") if entry.get(name)]


def classify_result(record: Record, entry: Any, retried: bool = False) -> RecordResult:
    """What Clazar's result entry says about one record it was sent: DELIVERED,
    ALREADY_DELIVERED ("already exists", for duplicate_outcome to judge) or REJECTED.

    Raises ClazarError if the entry does not echo the record (the pairing by position
    cannot be trusted, so the batch must be resent).
    """
    if not isinstance(entry, dict):
        raise ClazarError(f"result entry is a JSON {type(entry).__name__}, not an object")
    for name in ("contract_id", "dimension"):
        if entry.get(name) not in (None, record[name]):
            raise ClazarError(f"result entry echoes {name} "
                              f"{shown_text(mask_value(entry.get(name)))} for a record with "
                              f"{shown_text(record[name])}")
    record_id = entry.get("id")
    # Kept in the state and the ledger: a string, masked, then cut to a sane length, or nothing.
    record_id = mask_outside(record_id)[:200] if isinstance(record_id, str) else None
    if entry.get("status") == "success":
        return RecordResult(DELIVERED, record_id, retried=retried)
    text = " ".join(_answer_texts(entry)).lower()
    answer = mask_value({name: entry[name] for name in ("status", "errors", "code",
                                                        "message") if name in entry})
    if any(all(marker in text for marker in markers) for markers in _DUPLICATE_MARKERS):
        return RecordResult(ALREADY_DELIVERED, record_id, answer, retried)
    return RecordResult(REJECTED, record_id, answer, retried)


def read_results(records: Sequence[Record], body: Any, retried: bool = False) -> list[RecordResult]:
    """Pair a 200 response's ``results`` with the records sent, by position. Raises
    ClazarError if there is no ``results`` list of the right length."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise ClazarError("response has no results list")
    if len(results) != len(records):
        raise ClazarError(f"response has {len(results)} results for {len(records)} records")
    return [classify_result(record, entry, retried) for record, entry in zip(records, results)]


def attempt_may_have_landed(error: Any, status: int | None) -> bool:
    """Whether one attempt at a request may have reached Clazar's processing: it met a 5xx, or
    an error once connected (a read timeout, a reset, no answer). Not a connection refused
    or never made, nor a 4xx (a 429 included): Clazar never read those."""
    from urllib3.exceptions import ConnectTimeoutError  # NewConnectionError is one too

    if error is not None:
        return not isinstance(error, ConnectTimeoutError)
    return (status or 0) >= 500


def _was_retried(response: Any) -> bool:
    """Whether urllib3 sent this request more than once after an attempt that may have
    landed (see attempt_may_have_landed)."""
    retries = getattr(getattr(response, "raw", None), "retries", None)
    return any(attempt_may_have_landed(entry.error, entry.status)
               for entry in getattr(retries, "history", ()))


def batches(records: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [records[i: i + size] for i in range(0, len(records), size)]


def retry_policy(config: Config) -> Any:
    """urllib3's Retry: connection errors, timeouts, 429 and 5xx, exponential backoff with
    jitter (a twentieth of CLAZAR_TIMEOUT_SECONDS, doubling), Retry-After honoured up to
    three times the timeout. POST is included on purpose: a record that landed before the
    answer was lost comes back as "already exists", which duplicate_outcome then judges."""
    from urllib3.exceptions import InvalidHeader, MaxRetryError
    from urllib3.util.retry import Retry

    backoff, retry_after_max = config.timeout_seconds / 20, config.timeout_seconds * 3

    class CappedRetry(Retry):
        # A Retry-After longer than the cap, or one that cannot be read (5,000 digits are
        # too many for int()), is waited as the cap rather than stalling the run.
        def parse_retry_after(self, retry_after: str) -> float:
            try:
                return min(super().parse_retry_after(retry_after), retry_after_max)
            except (ValueError, OverflowError, InvalidHeader):
                return retry_after_max

        # Jitter keeps concurrent batches from retrying in step; added here rather than
        # with backoff_jitter, which urllib3 1.26 (botocore's on Python 3.9) lacks.
        def get_backoff_time(self) -> float:
            wait = super().get_backoff_time()
            return wait + random.uniform(0, backoff) if wait else 0.0

        # urllib3 reads a refused answer whole before it retries: closed instead, unread.
        # When the retries run out, whether any attempt may have landed goes with the error.
        def increment(self, method: Any = None, url: Any = None, response: Any = None,
                      error: Any = None, *arguments: Any, **options: Any) -> Any:
            try:
                retry = super().increment(method, url, response, error, *arguments, **options)
            except MaxRetryError as exhausted:
                attempts = [*((entry.error, entry.status) for entry in self.history),
                            (error, getattr(response, "status", None))]
                exhausted.may_have_landed = any(attempt_may_have_landed(*one) for one in attempts)
                raise
            if response is not None:
                response.close()
            return retry

        # A stop asked for before or during the wait sends the batch no more.
        def sleep(self, response: Any = None) -> None:
            STOP.check("before retrying a batch")
            super().sleep(response)
            STOP.check("before retrying a batch")

    retries = config.max_retries
    return CappedRetry(total=retries, connect=retries, read=retries, status=retries, other=0,
                       redirect=0,
                       status_forcelist=(429, 500, 502, 503, 504),
                       allowed_methods=frozenset({"POST"}),
                       backoff_factor=backoff, respect_retry_after_header=True,
                       raise_on_status=False,
                       raise_on_redirect=False)


def answer_deadline(config: Config) -> float:
    """How long one exchange with Clazar, its retries and waits included, may take in all:
    each attempt its connect timeout and twice its read timeout (the read timeout bounds
    each wait for a byte, not the answer, which a server may trickle), each wait between
    attempts the longest urllib3 may take."""
    attempt = min(10.0, config.timeout_seconds) + 2 * config.timeout_seconds
    wait = max(config.timeout_seconds * 3, BACKOFF_MAX_SECONDS) + config.timeout_seconds / 20
    return (config.max_retries + 1) * attempt + config.max_retries * wait


@dataclass(frozen=True)
class ClazarAnswer:
    status: int
    body: bytes
    retried: bool  # see _was_retried


class ClazarClient:
    """Talks to Clazar over one keep-alive session. Tokens never reach the log."""

    TOKEN_MARGIN = 300.0

    def __init__(self, config: Config, session: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        from requests.adapters import HTTPAdapter

        self.config = config
        self.clock = clock
        self.session = session or http_session()
        # Set once an exchange is abandoned: every later one would wait as long, one batch
        # after another, so the rest of the run fails at once instead.
        self._abandoned: str | None = None
        adapter = HTTPAdapter(max_retries=retry_policy(config), pool_maxsize=SEND_CONCURRENCY)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._senders = concurrent.futures.ThreadPoolExecutor(
            SEND_CONCURRENCY, thread_name_prefix="clazar-send")
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = threading.Lock()

    def close(self) -> None:
        # After a stop, a request still in flight is left to end with the process.
        self._senders.shutdown(wait=not STOP.is_set(), cancel_futures=True)
        self.session.close()

    def _post(self, url: str, payload: Any, token: str | None = None) -> ClazarAnswer:
        """POST ``payload`` and return the answer, read whole and bounded. The exchange runs
        on a thread of its own so that it can be abandoned after answer_deadline, or the
        stop's grace after a stop; whatever it still lands comes back "already exists"
        when the hour is resent. Raises ClazarError when no complete answer came, or
        RunStopped."""
        if self._abandoned:
            error = ClazarError(self._abandoned)
            error.may_have_landed = False
            raise error
        deadline = answer_deadline(self.config)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = (min(10.0, self.config.timeout_seconds), self.config.timeout_seconds)
        try:
            status, body, response = within_deadline(
                lambda: bounded_request(self.session, "POST", url, MAX_ANSWER_BYTES,
                                        data=json.dumps(payload),
                                        headers=headers, timeout=timeout),
                deadline, "while waiting for Clazar's answer; the hour is resent by the next run")
        except DeadlinePassed:
            self._abandoned = (f"no complete answer from {url} within {deadline:.0f} s (see "
                               "CLAZAR_TIMEOUT_SECONDS and CLAZAR_MAX_RETRIES); the request was "
                               "abandoned, and Clazar is not asked again in this run")
            raise ClazarError(self._abandoned) from None
        except RequestFailed as error:
            failure = ClazarError(f"no answer from {url} after {self.config.max_retries} retries: "
                                  f"{error}")
            failure.may_have_landed = error.may_have_landed
            raise failure from None
        # A refusal is told by its status; only an answer to be read must be whole.
        if len(body) > MAX_ANSWER_BYTES and status == 200:
            raise ClazarError(f"Clazar's answer from {url} is larger than {MAX_ANSWER_BYTES} "
                              "bytes; it was not read")
        return ClazarAnswer(status, body, _was_retried(response))

    def token(self) -> str:
        """A valid access token, authenticating when there is none or it is about to expire.
        Raises ClazarAuthError or RunStopped (nothing of the batch was sent)."""
        with self._lock:
            if self._token and self.clock() < self._token_expires:
                return self._token
            # A batch may have waited here for another's exchange: once a stop is asked
            # for, no new request leaves.
            STOP.check("before authenticating with Clazar")
            try:
                credentials = {"client_id": self.config.client_id,
                               "client_secret": self.config.client_secret}
                response = self._post(self.config.auth_url, credentials)
            except ClazarError as error:
                raise ClazarAuthError(f"cannot authenticate with Clazar: {error}") from None
            if response.status != 200:
                raise ClazarAuthError(f"Clazar refused authentication at {self.config.auth_url}: "
                                      f"HTTP {response.status}; check CLAZAR_CLIENT_ID and "
                                      "CLAZAR_CLIENT_SECRET")
            token, lifetime = self._read_token(response.body)
            redact(token)
            self._token = token
            # Refresh early: a token must not expire between the check and the request.
            margin = min(self.TOKEN_MARGIN, lifetime / 10)
            self._token_expires = self.clock() + max(0.0, lifetime - margin)
            log.debug("Authenticated with Clazar; token valid for %.0f s", lifetime)
            return token

    @staticmethod
    def _read_token(body: bytes) -> tuple[str, float]:
        try:
            answer = parse_json(body)
            token = answer["access_token"]
            # A lifetime beyond a day, or not finite, is taken as a day.
            lifetime = min(float(answer.get("expires_in") or 3600), 86400.0)
            if not isinstance(token, str) or not token or not 0 <= lifetime:
                raise ValueError("empty access_token or negative expires_in")
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as error:
            raise ClazarAuthError("Clazar's authentication answer has no usable access_token "
                                  f"({type(error).__name__})") from None
        return token, lifetime

    def forget_token(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def submit(self, records: Sequence[Record]) -> list[RecordResult]:
        """Send one batch and read Clazar's verdict on each record. On a 401 the token is
        renewed once and the batch repeated. Raises ClazarError (with may_have_landed) if
        the batch's fate is unknown; resending it later is safe."""
        try:
            STOP.check("before sending a batch")
            token = self.token()
        except (RunStopped, ClazarError) as unsent:  # nothing of the batch has left
            unsent.may_have_landed = False
            raise
        response = self._post(self.config.api_url, {"request": list(records)}, token)
        retried = response.retried
        if response.status == 401:
            log.info("Clazar answered 401; authenticating again")
            self.forget_token(token)
            try:
                token = self.token()
            except (RunStopped, ClazarError) as unsent:  # the 401 was refused unread
                unsent.may_have_landed = retried
                raise
            response = self._post(self.config.api_url, {"request": list(records)}, token)
            retried = retried or response.retried
        if response.status != 200:
            # Masked whole, then cut: a secret straddling the cut is masked, not kept in part.
            body = escape_control(mask_outside(response.body.decode("utf-8", "replace")))[:300]
            error = ClazarError(f"Clazar answered HTTP {response.status} to {len(records)} "
                                f"records: {body}")
            error.may_have_landed = response.status >= 500 or retried
            raise error
        try:
            return read_results(records, parse_json(response.body), retried)
        except ValueError as error:
            raise ClazarError(f"Clazar answered 200 with a body that {error}") from None

    def deliver(self, records: Sequence[Record]) -> list[RecordResult]:
        """Send ``records`` in batches, several at once, and return each one's result in order.

        Every batch is tried even when another fails; then the first failure is raised,
        carrying ``answered``: every record's result, NO_ANSWER for those of a batch that
        may have landed, UNSENT for those of a batch that cannot have. Once a stop is asked
        for no further batch is sent; those in flight get the stop's grace to be answered.
        If every batch was answered the results are returned as usual, else RunStopped.
        """
        STOP.check("before sending")
        parts = batches(records, self.config.batch_size)
        futures = [self._senders.submit(self.submit, batch) for batch in parts]
        try:
            while concurrent.futures.wait(futures, timeout=STOP.POLL_SECONDS).not_done:
                if STOP.is_set():
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures, timeout=STOP.grace)
                    if not all(future.done() and not future.cancelled() for future in futures):
                        STOP.check("while sending; the batches without an answer are resent by the "
                                   "next run")
            failure = next((future.exception() for future in futures if future.exception()), None)
            if failure is not None:
                raise failure
        except (ClazarError, RunStopped) as failure:
            failure.answered = [result for future, batch in zip(futures, parts)
                                for result in self._fate(future, len(batch))]
            raise
        return [result for future in futures for result in future.result()]

    @staticmethod
    def _fate(future: concurrent.futures.Future, size: int) -> list[RecordResult]:
        """The results of one batch of a failed delivery, or its fate for each record."""
        if future.cancelled() or not future.done():
            return [RecordResult(UNSENT if future.cancelled() else NO_ANSWER)] * size
        error = future.exception()
        if error is None:
            return future.result()
        return [RecordResult(NO_ANSWER if getattr(error, "may_have_landed",
                                                  True) else UNSENT)] * size


# --- Storage of the state and the ledger -------------------------------------------------
#
# One interface, two backends: files under a local folder, or objects under an S3 prefix.
# Every write replaces a whole file (temporary file, fsync, rename) or a whole object (one
# PUT), so a reader sees the old content or the new, never a part. S3 writes are
# conditional (If-Match on the ETag read or written, If-None-Match: * to create), so a run
# never overwrites what another run wrote since it looked.

MAY_EXIST = "*"  # a write's expected version: whatever is there


def check_ours(path: str, status: os.stat_result, what: str) -> None:
    """Raise StateError unless ``path`` belongs to the user running the exporter and no one
    else may write it: a state, lock or ledger planted by another user must never be
    read, sent or written."""
    if status.st_uid != os.geteuid():
        raise StateError(f"{what} {path} belongs to user id {status.st_uid}, not to the user "
                         f"running the exporter ({os.geteuid()}); it was not used. Remove it, or "
                         "run as its owner")
    if status.st_mode & 0o022:
        raise StateError(f"{what} {path} has mode {stat.S_IMODE(status.st_mode):04o}: others may "
                         "write it, so it was not used. Make it writable by its owner only (chmod "
                         "go-w)")


def check_folder(path: str, what: str) -> None:
    """Raise StateError if the folder ``path`` may be written by others and is not the
    user's own: anyone could plant or swap the files the exporter keeps there. Its owner
    may always write it, so a folder of another user (root aside) is refused whatever its
    mode: a ledger folder planted with mode 0755 would otherwise pass, and fail only once
    the hour had been sent."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StateError(f"cannot look at the folder of the {what} {path}: "
                         f"{error.strerror}") from None
    if status.st_uid != os.geteuid() and (status.st_mode & 0o022 or status.st_uid != 0):
        raise StateError(f"the folder {path} holding the {what} may be written by others and "
                         f"belongs to user id {status.st_uid}: files in it could be planted. Keep "
                         f"the {what} in a folder of your own (mode 0700)")


def check_links(path: str, what: str, variable: str = "STATE_FILE_PATH") -> None:
    """Raise StateError if a symbolic link on the way to ``path`` (``variable``) lies in a
    folder others may write (see check_folder) or belongs to another user (root aside):
    whoever may plant or swap the link chooses what is read as the state or ledger and
    where it is written."""
    current, pending, hops = os.sep, os.path.abspath(path).split(os.sep)[1:], 0
    while pending and hops <= 40:  # past 40 links the path itself fails to resolve (ELOOP)
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            status = os.lstat(candidate)
        except OSError:
            return  # nothing there: nothing more to follow
        if not stat.S_ISLNK(status.st_mode):
            current = candidate
            continue
        hops += 1
        problem = None
        try:
            check_folder(current, what)
        except StateError:
            problem = "lies in a folder others may write and not of this user"
        if status.st_uid not in (os.geteuid(), 0):
            problem = f"belongs to user id {status.st_uid}"
        if problem:
            raise StateError(f"the {what}'s path {candidate} is a symbolic link that {problem}: "
                             f"whoever could plant or swap it chooses the {what} this run "
                             f"reads and writes, so it was not followed. Point {variable} "
                             "at a folder of your own")
        target = os.readlink(candidate)
        if os.path.isabs(target):
            current = os.sep
        pending = target.split(os.sep) + pending


def write_file_atomically(path: str, chunks: Iterable[bytes], mode: int = 0o600) -> None:
    """Replace ``path`` with ``chunks``: temporary file in the same folder, fsync, rename,
    fsync of the folder. Readers see the old file or the new one, never a part, and after
    a crash the rename is on disk before anything that follows. Raises OSError; the
    temporary file is removed on any failure."""
    folder = os.path.dirname(os.path.abspath(path))
    # mkstemp creates the file with mode 0600: nothing exists readable by others first.
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
    """Create ``path`` and every missing folder above it with mode 0700 (os.makedirs gives
    only the last folder its mode; the others follow the umask). Raises OSError."""
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


def read_regular_file(path: str, what: str) -> bytes:
    """The whole content of the regular file at ``path``, if it is ours (check_ours).

    Opened without blocking and checked before it is read: a FIFO or a device put where
    a file belongs would otherwise hold the run (and its lock) forever. Raises
    FileNotFoundError if nothing is there, StateError for something that is not ours or
    not a regular file, or OSError.
    """
    # Checked before the open too: opening a device acts by itself.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise StateError(f"{what} {path} is not a regular file (a folder, FIFO, socket or device); "
                         "it was not read")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise StateError(f"{what} {path} is not a regular file; it was not read")
        check_ours(path, status, what)
        return handle.read()


class LocalStorage:
    """Files under one local folder. Versions are not tracked: the flock on the state's
    lock keeps every other run out."""

    def __init__(self, root: str, what: str):
        self.root = root
        self.what = what
        self.display = os.path.abspath(root)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def read(self, name: str) -> tuple[bytes, str] | None:
        """(content, version) of ``name``, or None if there is none. Raises StateError."""
        path = self.path(name)
        try:
            return read_regular_file(path, self.what), ""
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StateError(f"cannot read {self.what} {path}: {error.strerror or error}") from None

    def write(self, name: str, chunks: Iterable[bytes], version: str | None = MAY_EXIST) -> str:
        path = self.path(name)
        check_folder(os.path.dirname(path), self.what)
        try:
            make_private_folders(os.path.dirname(path))
            write_file_atomically(path, chunks)
        except OSError as error:
            raise StateError(f"cannot write {self.what} {path}: "
                             f"{error.strerror or error}") from None
        return ""

    def names(self, folder: str) -> list[str]:
        """The names directly inside ``folder`` (files and folders alike), sorted."""
        path = self.path(folder)
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as error:
            raise StateError(f"cannot list {self.what} {path}: {error.strerror or error}") from None

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StateError(f"cannot delete {self.what} {self.path(name)}: "
                             f"{error.strerror or error}") from None

    def remove_folder(self, folder: str) -> None:
        """Remove ``folder`` if it is empty."""
        with contextlib.suppress(OSError):
            os.rmdir(self.path(folder))


class S3Storage:
    """Objects under one S3 prefix; every write conditional on the version expected."""

    def __init__(self, client: Any, bucket: str, prefix: str, what: str, seconds: float):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.what = what
        self.seconds = seconds
        self.display = f"s3://{bucket}/{prefix}".rstrip("/")

    def read(self, name: str) -> tuple[bytes, str] | None:
        """(content, ETag) of ``name``, or None if there is none. Raises StateError."""
        try:
            return s3_get(self.client, self.bucket, self.prefix + name, MAX_STATE_BYTES,
                          self.seconds,
                          "the largest state or ledger file read")
        except SourceError as error:
            raise StateError(f"cannot read {self.what} {error}") from None
        except Exception as error:
            if is_missing(error):
                return None
            raise StateError(f"cannot read {self.what} {self.display}/{name}: {error}") from None

    def write(self, name: str, chunks: Iterable[bytes], version: str | None = MAY_EXIST) -> str:
        """Write ``name`` if its version is still ``version`` (None: if it does not exist),
        and return the new version. Raises StateError, saying so when another writer won."""
        condition = {} if version == MAY_EXIST else {"IfNoneMatch": "*"} if version is None \
            else {"IfMatch": version}
        digest, size = hashlib.sha256(), 0
        try:
            # Spooled to disk past 1 MiB: an hour of 20,000 lines need not sit in memory.
            with tempfile.SpooledTemporaryFile(max_size=2**20) as body:
                for chunk in chunks:
                    body.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                body.seek(0)
                answer = self.client.put_object(Bucket=self.bucket, Key=self.prefix + name,
                                                Body=body,
                                                ContentType="application/json", **condition)
        except Exception as error:
            if is_condition_failure(error):
                landed = landed_etag(self.client, self.bucket, self.prefix + name,
                                     digest.digest(), size, self.seconds)
                if landed is not None:
                    return landed
                raise StateError(f"{self.what} {self.display}/{name} was changed by another run "
                                 "since this run read it; nothing was overwritten, the next run "
                                 "resumes from what is there") from None
            raise StateError(f"cannot write {self.what} {self.display}/{name}: {error}") from None
        return str(answer.get("ETag", ""))

    def names(self, folder: str) -> list[str]:
        """The names directly inside ``folder``: objects and common prefixes alike.

        Paged here, as the export's listing is (see ExportSource.list_hour): a continuation
        token seen before, more than MAX_LISTING_PAGES pages or more than S3_TIMEOUT_SECONDS
        in all is a StateError naming the prefix, never a listing without end."""
        where = f"cannot list {self.what} {self.display}/{folder}"
        arguments = {"Bucket": self.bucket, "Delimiter": "/",
                     "Prefix": self.prefix + (folder + "/" if folder else "")}
        ends, seen, names = time.monotonic() + self.seconds, set(), set()
        try:
            for _ in range(MAX_LISTING_PAGES):
                page = within_deadline(lambda: self.client.list_objects_v2(**arguments),
                                       max(0.0, ends - time.monotonic()), "while listing the "
                                       + self.what)
                names.update(item["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                             for item in page.get("CommonPrefixes", ()))
                names.update(item["Key"].rsplit("/", 1)[-1] for item in page.get("Contents", ()))
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated"):
                    return sorted(names)
                if not token or token in seen:
                    raise StateError(f"{where}: S3 repeated a continuation token; the listing "
                                     "would never end")
                seen.add(token)
                arguments["ContinuationToken"] = token
        except DeadlinePassed:
            raise StateError(f"{where}: not done within {self.seconds:g} s "
                             "(S3_TIMEOUT_SECONDS)") from None
        except StateError:
            raise
        except Exception as error:
            raise StateError(f"{where}: {error}") from None
        raise StateError(f"{where}: more than {MAX_LISTING_PAGES} pages")

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
        except Exception as error:
            raise StateError(f"cannot delete {self.what} {self.display}/{name}: {error}") from None

    def remove_folder(self, folder: str) -> None:
        """Nothing to do: an S3 prefix ends with its last object."""


Storage = Union[LocalStorage, S3Storage]


# --- Locks -------------------------------------------------------------------------------

LEASE_SECONDS = 900


class LocalLock:
    """An advisory flock on ``<state>.lock``: the kernel drops it when the process dies, so a
    crashed run never leaves a stale lock behind."""

    def __init__(self, path: str):
        self.path = path
        self.display = path
        self._handle: Any = None
        self.lost = threading.Event()  # never set: a flock cannot be taken away

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming its holder. Raises StateError if the lock
        file cannot be opened, is a symbolic link, has a second name, or is not ours."""
        check_folder(os.path.dirname(self.path), "state's lock")
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StateError(f"lock file {self.path} is a symbolic link; it was not opened "
                                 "through it. Remove the link (no run uses it) and run "
                                 "again") from None
            raise StateError(f"cannot open lock file {self.path}: {error.strerror}") from None
        try:
            self._check(descriptor)
        except StateError:
            os.close(descriptor)
            raise
        handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = escape_control(handle.read(300).strip()) or "unknown"
            handle.close()
            raise LockHeld(f"another run holds the lock {self.path} ({holder}); this run did "
                           "nothing") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": format_time(utc_now())}))
        handle.flush()
        self._handle = handle

    def _check(self, descriptor: int) -> None:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise StateError(f"lock file {self.path} is not a regular file; remove it and run "
                             "again")
        # A second name (a hard link) would let the owner record overwrite whatever file
        # that name stands for.
        if status.st_nlink != 1:
            raise StateError(f"lock file {self.path} has {status.st_nlink} names (hard links); it "
                             "was not written. Remove it (no run uses it) and run again")
        check_ours(self.path, status, "lock file")

    def check_held(self) -> None:
        """Nothing to check: a flock is held until it is released."""

    def release(self) -> None:
        if self._handle is not None:
            # The file stays: removing it would let a third run lock a new inode while the
            # second still holds the old one.
            self._handle.close()
            self._handle = None


class S3Lease:
    """One run at a time on an S3 state: a lease object ``<key>.lock`` created with
    If-None-Match: *, renewed in the background, deleted at the end. A lease past its
    expiry (a crashed run) is taken over with If-Match on its ETag.

    Before the lease is trusted, the store is checked once to refuse the conditional
    writes it must refuse: a store that ignores them would let two runs hold the lease,
    and both send.
    """

    def __init__(self, client: Any, bucket: str, key: str, seconds: float,
                 clock: Callable[[], datetime] = utc_now):
        self.client = client
        self.bucket = bucket
        self.key = key
        self.seconds = seconds  # S3_TIMEOUT_SECONDS, for reading a lease
        self.clock = clock
        self.display = f"s3://{bucket}/{key}"
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._etag: str | None = None
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self._written_at: float | None = None  # time.monotonic() as the last write left

    def _body(self) -> bytes:
        expires = self.clock() + timedelta(seconds=LEASE_SECONDS)
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": format_time(expires)}).encode()

    def _put(self, **condition: str) -> str:
        started, body = time.monotonic(), self._body()
        try:
            etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition)["ETag"]
        except Exception as error:
            # The lease holding this very body (our owner id, our expiry) is ours.
            etag = landed_etag(self.client, self.bucket, self.key, hashlib.sha256(body).digest(),
                               len(body), self.seconds) if is_condition_failure(error) else None
            if etag is None:
                raise
        self._written_at = started
        return etag

    def check_held(self) -> None:
        """Raise StateError if this run may no longer hold the lease: it was lost to another
        run, or two thirds of its life have passed since it was last written (two renewals
        missed: the process was stopped, a VM paused), so another run may take it over at any
        moment, or already has. Nothing may be sent or written after that."""
        written = self._written_at
        if not self.lost.is_set() and written is not None and \
                time.monotonic() - written >= LEASE_SECONDS * 2 / 3:
            self.lost.set()
            log.error("The lease %s was last renewed %.0f s ago, more than two thirds of its %d s: "
                      "this run was held up (stopped, or its machine paused) and another run may "
                      "have taken it over; nothing more will be sent or written",
                      self.display, time.monotonic() - written, LEASE_SECONDS)
        if self.lost.is_set():
            raise StateError(f"this run's lease {self.display} lapsed or was lost to another run "
                             "while it was held up; nothing more was sent or written, the next "
                             "run resumes from what is there")

    def acquire(self) -> None:
        """Take the lease, or raise LockHeld naming its holder and expiry. Raises StateError
        when the store does not refuse what it must (see _verify_conditions)."""
        self._verify_conditions()
        try:
            self._etag = self._put(IfNoneMatch="*")
        except Exception as error:
            if not is_condition_failure(error):
                raise StateError(f"cannot create lease {self.display}: {error}") from None
            self._take_over_expired()
        self._renewer = threading.Thread(target=self._keep_renewing, name="lease-renewer",
                                         daemon=True)
        self._renewer.start()

    def _verify_conditions(self) -> None:
        """Raise StateError unless the store refuses a create-if-absent of an object that
        exists and a replace-if-unchanged with an ETag that is not the object's. Tried on a
        probe object of this run's own, before the lease is touched: a store that ignored
        them would otherwise overwrite another run's live lease."""
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", "S3")
        probe = f"{self.key}.check-{self.owner}"
        put = lambda **condition: self.client.put_object(  # noqa: E731
            Bucket=self.bucket, Key=probe, Body=b"", **condition)
        try:
            put(IfNoneMatch="*")
            other_etag = '"' + "0" * 32 + '"'
            for header, condition in (("If-None-Match: *", {"IfNoneMatch": "*"}),
                                      ("If-Match on another ETag", {"IfMatch": other_etag})):
                try:
                    put(**condition)
                except Exception as error:
                    if is_condition_failure(error):
                        continue
                    raise StateError(f"cannot check that {endpoint} honours {header} on "
                                     f"{self.display}: {error}") from None
                raise StateError(
                    f"the S3 store at {endpoint} accepted a write with {header}, which it must "
                    "refuse: it ignores conditional writes, so two runs could hold the lock on the "
                    "state at once and both send. Keep the state on a store that honours If-Match "
                    "and If-None-Match (AWS S3; SeaweedFS) or on a local disk")
        except StateError:
            raise
        except Exception as error:
            raise StateError(f"cannot write the probe s3://{self.bucket}/{probe}: "
                             f"{error}") from None
        finally:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=probe)

    def _take_over_expired(self) -> None:
        try:
            body, etag = s3_get(self.client, self.bucket, self.key, 2**16, self.seconds,
                                "a lease's size")
            holder = parse_json(body)
            expires = parse_utc(holder.get("expires_at") if isinstance(holder, dict) else None)
        except Exception as error:
            if is_missing(error):
                raise LockHeld(f"the lease {self.display} changed hands while this run looked at "
                               "it; this run did nothing") from None
            raise LockHeld(f"the lease {self.display} exists but cannot be read ({error}); if no "
                           "run is active, delete it") from None
        who = escape_control(f"owner {holder.get('owner')} on {holder.get('host')}, pid "
                             f"{holder.get('pid')}")[:300]
        if expires > self.clock():
            raise LockHeld(f"another run holds the lock {self.display} ({who}) until "
                           f"{format_time(expires)}; this run did nothing")
        try:
            self._etag = self._put(IfMatch=etag)
        except Exception as error:
            if is_condition_failure(error):
                raise LockHeld(f"another run took over the expired lease {self.display} first; "
                               "this run did nothing") from None
            raise StateError(f"cannot take over lease {self.display}: {error}") from None
        log.warning("Took over the lease %s, which expired at %s (%s): that run ended without "
                    "releasing it",
                    self.display, format_time(expires), who)

    def _keep_renewing(self) -> None:
        # Renewed at a third of the lease, so two renewals can fail before it lapses.
        while not self._stop_renewing.wait(LEASE_SECONDS / 3):
            try:
                self._etag = self._put(IfMatch=self._etag)
            except Exception as error:
                if is_condition_failure(error):
                    self.lost.set()
                    log.error("Lost the lease %s to another run; nothing more will be written",
                              self.display)
                    return
                log.warning("Could not renew the lease %s (will retry): %s", self.display, error)

    def release(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._etag is None or self.lost.is_set():
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
        except Exception as error:
            log.warning("Could not delete the lease %s; it lapses by itself after %d s: %s",
                        self.display,
                        LEASE_SECONDS, error)
        self._etag = None


class StateStore:
    """The state of one deployment, in a storage, behind a lock."""

    def __init__(self, storage: Storage, name: str, lock: LocalLock | S3Lease, display: str):
        self.storage = storage
        self.name = name
        self.lock = lock
        self.display = display
        self._version: str | None = None

    def load(self) -> DeploymentState:
        """The state, or an empty one if there is none yet. Raises StateError."""
        if isinstance(self.storage, LocalStorage):
            check_folder(self.storage.root, "state")
        found = self.storage.read(self.name)
        if found is None:
            self._version = None
            return DeploymentState()
        body, self._version = found
        return parse_state(body, self.display)

    def save(self, state: DeploymentState) -> None:
        """Write the state if nobody else has since it was read. Raises StateError."""
        self.lock.check_held()
        self._version = self.storage.write(self.name, [dump_state(state)], self._version)

    @contextlib.contextmanager
    def locked(self, ledger: Ledger | None = None) -> Iterator[None]:
        """Hold the lock meanwhile, and stop the run at its next safe point (exit 4), writing
        neither the state nor ``ledger``, once it no longer holds it. Raises LockHeld or
        StateError."""
        self.lock.acquire()

        def guard() -> None:
            try:
                self.lock.check_held()
            except StateError as error:
                STOP.request(str(error), ExitCode.STATE)

        STOP.guard = guard
        if ledger is not None:
            ledger.lock = self.lock
        try:
            yield
        finally:
            STOP.guard = None
            if ledger is not None:
                ledger.lock = None
            self.lock.release()


def open_state_store(config: Config, client: Any) -> StateStore:
    """The store STATE_FILE_PATH names: ``s3://bucket/key`` or a local path. A local path
    that is a symbolic link is resolved once, here: the state is written beside its target
    and replaces it (the link stays), and every run, by the link or by the target's own
    path, takes the same lock, <target>.lock. A link on the way that another user could have
    planted or swapped is refused (check_links). Raises StateError."""
    s3 = split_s3_url(config.state_path)
    if s3:
        bucket, key = s3
        folder, _, name = key.rpartition("/")
        storage = S3Storage(client, bucket, folder + "/" if folder else "", "state",
                            config.s3_timeout_seconds)
        lease = S3Lease(client, bucket, key + ".lock", config.s3_timeout_seconds)
        return StateStore(storage, name, lease, config.state_path)
    check_links(config.state_path, "state")
    target, absolute = os.path.realpath(config.state_path), os.path.abspath(config.state_path)
    display = absolute if target == absolute else f"{absolute} (-> {target})"
    folder, name = os.path.split(target)
    return StateStore(LocalStorage(folder, "state"), name, LocalLock(target + ".lock"), display)


# --- The ledger ----------------------------------------------------------------------------
#
# An audit trail of what was billed, kept beside the state: one JSON object per line, one
# file per hour of the deployment, in a folder per day:
#   <LEDGER_PATH>/2026-02-10/2026-02-10T14.jsonl
# An hour's record lines are written whole before the hour is committed, so a crash can
# leave the ledger ahead of the state but never behind, and a resent pending hour
# rewrites them instead of adding more. Late-usage lines are written after the state
# write that commits their check (the state owes them until then), so no line of a check
# that never committed is ever in the ledger.

_DAY_FOLDER = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_HOUR_FILE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2})\.jsonl")


def day_folder(day: datetime) -> str:
    return day.strftime("%Y-%m-%d")


class Ledger:
    """Reads and writes the ledger through a storage (a folder, or an S3 prefix).

    On S3, each hour's file is written on the condition that it is still what this run
    read (or absent, for an hour this run never read): a run that lost its lease to
    another while frozen cannot overwrite the lines the other run wrote.
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self._versions: dict[str, str | None] = {}
        self.lock: LocalLock | S3Lease | None = None  # the state's, while it is held

    @staticmethod
    def hour_file(hour: datetime) -> str:
        return f"{day_folder(hour)}/{hour:%Y-%m-%dT%H}.jsonl"

    def check(self) -> None:
        """Raise StateError if a local ledger lies in a folder others may write and that is not
        ours, or that this user cannot write: checked before anything is sent, since the
        ledger is written after."""
        if isinstance(self.storage, LocalStorage):
            root = os.path.abspath(self.storage.root)
            check_links(root, "ledger", "LEDGER_PATH")
            folder = root if os.path.isdir(root) else os.path.dirname(root)
            check_folder(folder, "ledger")
            if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
                raise StateError(f"the ledger folder {folder} cannot be written by this user; "
                                 "nothing was sent. Give the user running the exporter a folder "
                                 "of its own (LEDGER_PATH)")

    def read_hour(self, hour: datetime) -> list[LedgerLine] | None:
        """The lines of one hour, or None if the ledger has no file for it. Raises LedgerError."""
        name = self.hour_file(hour)
        found = self._read(name)
        self._versions[name] = None if found is None else found[1]
        return None if found is None else list(self._parse(name, found[0]))

    def _read(self, name: str) -> tuple[bytes, str] | None:
        try:
            return self.storage.read(name)
        except StateError as error:
            raise LedgerError(str(error)) from None

    def _parse(self, name: str, data: bytes) -> Iterator[LedgerLine]:
        """The lines of one ledger file. Raises LedgerError naming the file and the line
        (counted from 1) that is not JSON or not a ledger line."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise LedgerError(f"ledger {self.storage.display}/{name} is corrupt: not UTF-8 text "
                              f"({error.reason})") from None
        for number, text_line in enumerate(text.split("\n"), 1):
            if text_line.strip():
                try:
                    yield ledger_line(parse_json(text_line))
                except ValueError as error:
                    raise LedgerError(f"ledger {self.storage.display}/{name} is corrupt: line "
                                      f"{number} {error}") from None

    def write_hour(self, hour: datetime, lines: Iterable[LedgerLine]) -> None:
        """Replace the lines of one hour. Raises LedgerError (another run wrote it since)."""
        name = self.hour_file(hour)
        chunks = ((json.dumps(line.to_json(),
                              sort_keys=True) + "\n").encode("utf-8") for line in lines)
        try:
            if self.lock is not None:
                self.lock.check_held()
            self._versions[name] = self.storage.write(name, chunks, self._versions.get(name))
        except StateError as error:
            raise LedgerError(str(error)) from None

    def append(self, hour: datetime, lines: Sequence[LedgerLine],
               replacing: Callable[[LedgerLine], bool] = lambda line: False) -> list[LedgerLine]:
        """Add lines to an hour's file, first dropping the earlier lines ``replacing`` selects.
        Writes nothing when there is nothing to add or drop. Returns the hour's lines."""
        earlier = self.read_hour(hour) or []
        kept = [line for line in earlier if not replacing(line)]
        if lines or len(kept) != len(earlier):
            self.write_hour(hour, kept + list(lines))
        return kept + list(lines)

    def hours(self, first: datetime, last: datetime) -> list[datetime]:
        """The hours from ``first`` to ``last`` (inclusive) that have a ledger file."""
        days = [name for name in self._names("") if _DAY_FOLDER.fullmatch(name)
                and day_folder(first) <= name <= day_folder(last)]
        found = []
        for day in days:
            for name in self._names(day):
                match = _HOUR_FILE.fullmatch(name)
                if not match or not name.startswith(day):
                    continue  # not a file this exporter wrote
                try:
                    hour = parse_hour(match.group(1) + ":00:00Z")
                except ValueError:
                    continue
                if first <= hour <= last:
                    found.append(hour)
        return sorted(found)

    def lines(self, first: datetime, last: datetime) -> Iterator[LedgerLine]:
        """Every line of the hours first..last, hour by hour."""
        for hour in self.hours(first, last):
            STOP.check("while reading the ledger")
            yield from self.read_hour(hour) or []

    def _names(self, folder: str) -> list[str]:
        try:
            return self.storage.names(folder)
        except StateError as error:
            raise LedgerError(str(error)) from None

    def prune(self, keep_days: int, today: datetime, keep: Iterable[str] = ()
              ) -> tuple[int, list[str]]:
        """Delete the hour files of day folders older than ``keep_days`` days, except the days
        in ``keep`` (records still wait there). Only files this exporter wrote are deleted,
        known by name and by content; anything else stays, and is returned to be named.
        Returns (how many files were deleted, what was left that is not the ledger's).
        Raises LedgerError (a file that cannot be listed or deleted)."""
        oldest, kept = day_folder(today - timedelta(days=keep_days)), set(keep)
        deleted, foreign = 0, []
        for day in self._names(""):
            if not _DAY_FOLDER.fullmatch(day) or day >= oldest or day in kept:
                continue
            for name in self._names(day):
                if self._is_ledger_file(day, name):
                    try:
                        self.storage.delete(f"{day}/{name}")
                    except StateError as error:
                        raise LedgerError(str(error)) from None
                    deleted += 1
                else:
                    foreign.append(f"{day}/{name}")
            self.storage.remove_folder(day)
        return deleted, foreign

    def _is_ledger_file(self, day: str, name: str) -> bool:
        if not _HOUR_FILE.fullmatch(name) or not name.startswith(day):
            return False
        try:
            found = self.storage.read(f"{day}/{name}")
            if found is None:
                return False
            for _ in self._parse(f"{day}/{name}", found[0]):
                pass
        except StateError:  # unreadable, or not ledger lines
            return False
        return True


def open_ledger(config: Config, client: Any) -> Ledger:
    s3 = split_s3_url(config.ledger_path)
    if s3:
        bucket, prefix = s3
        prefix = prefix.rstrip("/")
        return Ledger(S3Storage(client, bucket, prefix + "/" if prefix else "", "ledger",
                                config.s3_timeout_seconds))
    return Ledger(LocalStorage(config.ledger_path, "ledger"))


# ===========================================================================
# 8. The export run
# ===========================================================================


@dataclass
class RunReport:
    """What one run did, for the summary line, the exit code, the state and the metrics."""

    hours: int = 0
    # Records by outcome and marketplace: {outcome: {cloud: count}}.
    records: dict[str, dict[str, int]] = field(default_factory=dict)
    unattributable: int = 0
    late_hours: int = 0
    late_usage: int = 0
    failure: str | None = None
    stopped: str | None = None
    last_processed_hour: datetime | None = None
    behind: int | None = None
    # The service whose marker holds the deployment's next hour back, if one does.
    holding: str | None = None
    # Per service: when the marker says its data is final up to.
    final_before: dict[str, datetime] = field(default_factory=dict)
    # The oldest hour sent past a marketplace's lateness window: (hour, cloud, how late).
    oldest_late_hour: tuple[datetime, str, timedelta] | None = None
    unbilled_remainders: int = 0
    # Per hour read: (hour, records without payer or dimension, their subscriptions).
    unattributed: list[tuple[datetime, int, frozenset[str]]] = field(default_factory=list)

    def count(self, outcome: str, cloud: str) -> None:
        by_cloud = self.records.setdefault(outcome, {})
        by_cloud[cloud] = by_cloud.get(cloud, 0) + 1

    def total(self, *outcomes: str) -> int:
        return sum(sum(self.records.get(outcome, {}).values()) for outcome in outcomes)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.stopped is None and not self.total(REJECTED, CONFLICT)

    @property
    def result(self) -> str:
        return ("failed" if self.failure else "stopped" if self.stopped else "rejected records"
                if self.total(REJECTED) else "conflicting records" if self.total(CONFLICT)
                else "ok")

    def to_json(self, at: datetime) -> dict[str, Any]:
        return {"at": format_time(at), "result": self.result, "hours": self.hours,
                "sent": self.total(DELIVERED, RETRY_DELIVERED),
                "already_delivered": self.total(ALREADY_DELIVERED),
                "rejected": self.total(REJECTED), "conflicts": self.total(CONFLICT),
                "unattributable": self.unattributable, "late_hours": self.late_hours,
                "late_usage": self.late_usage,
                "error": None if self.failure is None
                else mask_outside(self.failure)[:MASKED_TEXT_LIMIT],
                "holding": self.holding}


class Sender:
    """Sends records and judges each answer, for the run and for retry-failed alike: one
    path from Clazar's verdict to the outcome kept, counted and logged."""

    def __init__(self, clazar: ClazarClient, report: RunReport):
        self.clazar = clazar
        self.report = report

    def send(self, records: Sequence[Record], earlier: Mapping[Key, str | None],
             landed_before: Callable[[Key], bool]) -> dict[Key, RecordResult]:
        """{key: its result} for ``records``, with "already exists" judged by
        duplicate_outcome from the record's ``earlier`` outcome and whether one of our own
        earlier attempts may have stored it (``landed_before``). Raises ClazarError or
        RunStopped, whose ``answered`` then holds the results so far (NO_ANSWER and UNSENT
        for the rest), judged the same way."""
        judge = lambda record, result: self.judge(  # noqa: E731
            record, result, earlier.get(record_key(record)), landed_before(record_key(record)))
        try:
            answers = self.clazar.deliver(records)
        except (ClazarError, RunStopped) as failure:
            # Stopped before the first batch left: nothing was answered, nothing sent.
            answered = failure.answered or [RecordResult(UNSENT)] * len(records)
            failure.answered = {record_key(record): judge(record, result)
                                for record, result in zip(records, answered)}
            raise
        return {record_key(record): judge(record, result)
                for record, result in zip(records, answers)}

    def judge(self, record: Record, result: RecordResult, earlier: str | None, landed_before: bool
              ) -> RecordResult:
        """``result`` with "already exists" resolved, counted in the report and logged where an
        operator must act."""
        if result.outcome == ALREADY_DELIVERED:
            outcome = duplicate_outcome(earlier, landed_before, result.retried)
            result = dataclasses.replace(result, outcome=outcome)
        if result.outcome in (NO_ANSWER, UNSENT):
            return result
        self.report.count(result.outcome, record["cloud"])
        where = (f"contract {record['contract_id']} dimension {record['dimension']} hour "
                 f"{record['start_time']}")
        if result.outcome == ALREADY_DELIVERED:
            (log.info if landed_before else log.warning)(
                "Clazar already holds %s; counted as delivered: %s", where,
                "this exporter sent it before" if landed_before
                else "its request was retried after an answer was lost")
        elif result.outcome == CONFLICT:
            log.error("Conflict: Clazar already holds %s, which this exporter had not sent: "
                      "another exporter, an older script or another deployment bills it. Not "
                      "counted as delivered; our quantity %s is kept in the ledger (see "
                      "'conflicts')", where, record["quantity"])
        elif result.outcome == REJECTED:
            log.error("Clazar rejected %s quantity %s: %s", where, record["quantity"],
                      json.dumps(result.answer, sort_keys=True))
        return result


def hour_lines(pending: PendingHour, results: Mapping[Key, RecordResult],
               earlier: Mapping[Key, RecordLine], at: datetime) -> list[RecordLine]:
    """The first-send ledger lines of a pending hour: one per contract and dimension with
    usage or a record. A record answered in an earlier attempt keeps that attempt's line;
    a resent one keeps the record id it was given before, if the resend brings none."""
    records = {record_key(record): record for record in pending.records}
    lines = []
    for key in sorted(set(pending.amounts) | set(records)):
        result, before, record = results.get(key), earlier.get(key), records.get(key)
        if result is None and before is not None and record is not None:
            lines.append(before)
            continue
        # A record with no answer and no earlier line was never sent; a key without a record
        # had a quantity of zero.
        outcome = result.outcome if result else UNSENT if record is not None else NOT_SENT
        cloud = pending.clouds.get(key[0], record["cloud"] if record else "aws")
        record_id = (result.record_id if result else None) or (before.record_id if before else None)
        lines.append(RecordLine(
            *key, pending.hour, cloud, int(record["quantity"]) if record else 0, outcome, at,
            pending.amounts.get(key, Fraction(0)), pending.carried_in.get(key, Fraction(0)),
            record_id,
            result.answer if result is not None and outcome in WAITING_OUTCOMES else None))
    return lines


@dataclass
class LateFindings:
    """What one run's late checks found, committed together."""

    tracked: dict[datetime, AccountedHour]
    carried: dict[Key, Fraction] = field(default_factory=dict)
    clouds: dict[str, str] = field(default_factory=dict)
    lines: list[LateLine] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)

    def add(self, line: LateLine, cloud: str | None) -> None:
        self.lines.append(line)
        if cloud is not None:
            self.clouds[line.contract_id] = cloud
        self.notes.append({"hour": format_time(line.hour), "contract_id": line.contract_id,
                           "dimension": line.dimension, "difference": amount_text(line.difference),
                           "action": line.action, "at": format_time(line.at)})


class Exporter:
    """One run of a deployment: the imperative shell around the billing rules."""

    def __init__(self, config: Config, reader: HourReader, sender: Sender | None,
                 store: StateStore, ledger: Ledger, state: DeploymentState, report: RunReport,
                 clock: Callable[[], datetime] = utc_now):
        self.config = config
        self.reader = reader
        self.sender = sender  # None in a dry run
        self.store = store
        self.ledger = ledger
        self.state = state
        self.report = report
        self.clock = clock

    def save(self, state: DeploymentState) -> None:
        """Keep ``state``, writing it unless this is a dry run. Raises StateError."""
        if not self.config.dry_run:
            self.store.save(state)
        self.state = state

    def run(self, marker: ExportMarker | None, marker_error: MarkerError | None) -> None:
        """Export every due hour. Raises MeteringError (the hour stays due; StateError: nothing
        may be sent that cannot be recorded) and RunStopped."""
        log.info("Starting processing for %s",
                 ", ".join(service.label for service in self.config.services))
        if not self.config.dry_run:
            self.write_owed_ledger()
        decided = {service.key for service in self.config.services
                   if marker is not None and service.key in marker.processed_to}
        self.admit(self.clock(), decided)
        if not self.config.dry_run and self.state.last_processed_hour is not None \
                and self.config.late_lookback_hours:
            # Before a pending hour is committed: its commit would take the marks as kept for a
            # raised lookback, and the hours that have none would go unnamed.
            self._warn_unmarked_hours()
        if self.state.pending is not None:
            pending = self.state.pending
            log.warning("Resending pending hour %s (%d records) left by an earlier run",
                        display_hour(pending.hour), len(pending.records))
            with working_on(pending.hour):
                self.deliver(pending, resend=True)
        self.report.last_processed_hour = self.state.last_processed_hour
        if not self.config.dry_run:
            self.check_late_usage()
        hours = self.due(marker, marker_error)
        reads = [(hour, self.contributing(hour)) for hour in hours]
        with contextlib.closing(self.reader.read_ahead(reads)) as usages:
            for index, usage in enumerate(usages, 1):
                with working_on(usage.hour):
                    log.info("Processing hour %d/%d: %s", index, len(hours),
                             display_hour(usage.hour))
                    self.bill(usage)
                self.report.behind -= 1

    def contributing(self, hour: datetime) -> list[ServiceKey]:
        """The services whose usage of ``hour`` is billed with it: those that have not
        processed it already (a state of the original script may have some ahead)."""
        return [service for service in self.config.services
                if (self.state.service(service.key).last_processed_hour
                    or EARLIEST_TIME - HOUR) < hour]

    def admit(self, now: datetime, decided: set[str]) -> None:
        """Fix, before anything is read, what later runs must not decide differently: where a
        new deployment starts (so a failure there keeps that hour due instead of the start
        moving with the clock), where an added service starts, and that the marker decides
        a service's hours once it has."""
        state = self.state
        last = state.last_processed_hour
        processed = [state.service(service.key).last_processed_hour
                     for service in self.config.services]
        if last is None and any(processed):
            # The original script's state: start after the service furthest behind.
            last = min(hour for hour in processed if hour is not None)
            state = dataclasses.replace(state, last_processed_hour=last)
        if last is None:
            first = first_due_hour(None, self.config.start_hour, state.first_hour, now)
            if state.first_hour != first:
                why = "START_HOUR" if self.config.start_hour else \
                    "24 hours before the current hour; START_HOUR is unset"
                log.warning("No previous processing found, starting from %s (%s): the state %s has "
                            "no processed hour", display_hour(first), why, self.store.display)
                state = dataclasses.replace(state, first_hour=first)
        else:
            state = self._admit_services(state, last)
            first = first_due_hour(last, self.config.start_hour, state.first_hour, now)
            if first > last + HOUR:
                log.warning("START_HOUR %s skips %d hour(s) after the last processed hour %s: they "
                            "will never be sent", format_time(first),
                            hours_between(last + HOUR, first), display_hour(last))
        for key in decided:
            if not state.service(key).hours_by_marker:
                entry = dataclasses.replace(state.service(key), hours_by_marker=True)
                state = state.with_service(key, entry)
        if state != self.state:
            self.save(state)

    def _admit_services(self, state: DeploymentState, last: datetime) -> DeploymentState:
        pending = state.pending
        for service in self.config.services:
            entry = state.service(service.key)
            # A pending hour is sent as it was computed: a service it was not read from
            # starts after it.
            start = pending.hour if pending is not None and service.key not in pending.services \
                else last
            if entry.last_processed_hour is None or entry.last_processed_hour < start:
                log.warning("Service %s is new to this deployment: it starts with hour %s; its "
                            "earlier hours are not billed", service.key, display_hour(start + HOUR))
                entry = dataclasses.replace(entry, last_processed_hour=start,
                                            first_hour=start + HOUR)
                state = state.with_service(service.key, entry)
        return state

    def due(self, marker: ExportMarker | None, marker_error: MarkerError | None) -> list[datetime]:
        """The hours to bill now, final for every service. Raises MarkerError naming the
        service that holds the deployment back because its marker entry is missing or bad."""
        now = self.clock()
        first = first_due_hour(self.state.last_processed_hour, self.config.start_hour,
                               self.state.first_hour, now)
        finals: dict[str, datetime | None] = {}
        for service in self.config.services:
            self.report.holding = service.key  # if its marker entry is at fault, it holds the rest
            finals[service.key] = self._final_before(service, marker, marker_error)
        end, self.report.holding = deployment_due_end(now, finals)
        self.report.final_before = {key: value for key, value in finals.items() if value}
        self.report.behind = hours_between(first, end)
        hours = due_hours(first, end, self.config.max_hours_per_run)
        if not hours:
            log.info("No hour is due: the next, %s, is not final yet%s", display_hour(first),
                     f" for {self.report.holding}" if self.report.holding else "")
        elif self.report.holding and len(hours) == self.report.behind:
            holding = self.report.holding
            log.info("Hours from %s wait for %s, whose export is final only before %s",
                     display_hour(end), holding, format_time(finals[holding]))
        return hours

    def _final_before(self, service: ServiceKey, marker: ExportMarker | None,
                      marker_error: MarkerError | None) -> datetime | None:
        if marker_error is not None:
            self.report.holding = None  # the whole marker is at fault, not one service
            raise marker_error
        if marker is not None:
            return marker.final_before(service.key)
        if self.state.service(service.key).hours_by_marker:
            raise MarkerError(f"the export marker s3://{self.config.bucket}/{MARKER_KEY} is "
                              f"missing, but it decided the hours of {service.key} before: without "
                              "it no hour can be known final. Restore it (or, if Omnistrate no "
                              "longer writes one, remove hours_by_marker from that service's "
                              "entry in the state)")
        return None

    def bill(self, usage: HourUsage) -> None:
        """Turn one hour's usage into records, record them as pending, send them, commit."""
        hour, config, state = usage.hour, self.config, self.state
        for folder, files in usage.folders:
            log.info("Found %d subscription files in %s", files, folder)
        if usage.ignored:
            log.warning("Ignored %d object(s) that are not .json files, e.g. %s",
                        len(usage.ignored), usage.ignored[0])
        amounts, clouds = billable_amounts(usage, config.formulas,
                                           {s.key: s.cloud for s in usage.services})
        clouds = {**state.clouds, **clouds}
        usage.release()  # the rows, before the slow part, sending, while the next hours are read
        billable, unbilled = billable_remainders(state.remainders, config.formulas)
        if unbilled and not self.report.unbilled_remainders:
            self.report.unbilled_remainders = len(unbilled)
            log.warning("%d carried remainder(s) of a whole unit or more belong to dimensions the "
                        "formulas no longer produce and are not billed (kept in the state), e.g. "
                        "contract %s dimension %s: %s",
                        len(unbilled), *min(unbilled), amount_text(min(unbilled.items())[1]))
        default_cloud = config.services[0].cloud
        quantities, remainders = carry(amounts, billable,
                                       lambda c: config.record_limit(clouds.get(c, default_cloud)))
        records = metering_records(hour, quantities,
                                   {c: clouds.get(c, default_cloud) for c, _ in quantities})
        log.info("Aggregated %d records into %d entries", usage.records, len(amounts))
        self._note_usage(usage)
        contracts = {contract for contract, _ in [*amounts, *quantities, *remainders]}
        pending = PendingHour(
            hour, tuple(records), amounts,
            {key: state.remainders[key] for key in quantities if state.remainders.get(key)},
            remainders, {contract: clouds.get(contract, default_cloud) for contract in contracts},
            {service.key: service.cloud for service in usage.services}, usage.sources,
            formulas_fingerprint(config.formulas), usage.unattributable)
        self.deliver(pending, resend=False)

    def _note_usage(self, usage: HourUsage) -> None:
        hour = display_hour(usage.hour)
        if usage.repeated:
            log.warning("Hour %s: %d repeated row(s) for the same pod and dimension counted once, "
                        "at their largest value", hour, usage.repeated)
        if usage.fractional:
            log.warning("Hour %s: %d record(s) have a fractional value; fractions are carried to "
                        "later hours", hour, usage.fractional)
        if usage.unattributable:  # warned about once per run, in summarise
            self.report.unattributed.append((usage.hour, usage.unattributable,
                                             frozenset(usage.unattributed_subscriptions)))

    def sendable(self, pending: PendingHour) -> None:
        """Raise QuantityError when today's configuration refuses a record of ``pending``: a
        service it was read from now has another marketplace, or a record is above the
        limit of its marketplace. Checked on every send, resends included; nothing of the
        hour is sent then."""
        for key, cloud in sorted(pending.services.items()):
            service = self.config.service(key)
            if service is not None and service.cloud != cloud:
                # Name a record computed for the old marketplace: first one the new one refuses.
                limit = self.config.record_limit(service.cloud)
                computed = [record for record in pending.records if record["cloud"] == cloud]
                refused = [record for record in computed
                           if over_limit({**record, "cloud": service.cloud}, limit)]
                named = "".join(
                    f" ({len(computed)} {cloud} record(s), e.g. contract {record['contract_id']} "
                    f"dimension {record['dimension']} quantity {record['quantity']}"
                    + (f", above the {limit} one {service.cloud} record may carry" if refused
                       else "") + ")" for record in (refused or computed)[:1])
                raise QuantityError(
                    f"pending hour {display_hour(pending.hour)} was computed with {key} on "
                    f"{cloud}, which is now configured as {service.cloud}{named}; nothing of it "
                    f"was sent. Set it back to ={cloud} until the hour is sent (see the README, "
                    "'A pending hour the configuration refuses')")
        for record in pending.records:
            problem = over_limit(record, self.config.record_limit(record["cloud"]))
            if problem:
                raise QuantityError(f"hour {display_hour(pending.hour)}: {problem}; nothing of the "
                                    "hour was sent")

    def deliver(self, pending: PendingHour, resend: bool) -> None:
        """Send ``pending`` and commit it. The pending hour is saved before the first request,
        so a crash anywhere after it resends exactly these records; a resend sends only
        those no earlier attempt had an answer for."""
        STOP.check(f"before hour {display_hour(pending.hour)}"
                   + ("; it stays pending" if resend else ""))
        self.sendable(pending)
        self._note_lateness(pending)
        self.report.unattributable += pending.unattributable
        if self.config.dry_run:
            log.info("Dry run: would send %d records for hour %s", len(pending.records),
                     display_hour(pending.hour))
            for record in pending.records:
                log.info("Dry run record: %s", json.dumps(record, sort_keys=True))
            self._commit(pending, {})
            return
        if not resend and pending.records:
            self.save(dataclasses.replace(self.state, pending=pending))
            log.debug("Recorded pending hour %s in %s", display_hour(pending.hour),
                      self.store.display)
        earlier = first_sends(self.ledger.read_hour(pending.hour) or []) if resend else {}
        self._count_earlier_answers(pending, earlier)
        results = self._send(pending, earlier, resend)
        lines = hour_lines(pending, results, earlier, self.clock())
        if lines:
            # Before the commit: a crash here leaves the ledger ahead of the state, and the
            # resent pending hour rewrites these lines rather than adding to them.
            self.ledger.write_hour(pending.hour, lines)
        self._commit(pending, waiting_counts(lines))

    def _count_earlier_answers(self, pending: PendingHour,
                               earlier: Mapping[Key, RecordLine]) -> None:
        """The records an earlier, unfinished attempt at ``pending`` found rejected or in
        conflict are committed with it by this run: counted in its report (so it ends with
        exit 1, as the run that met them may not have: it was killed or stopped), named once."""
        sent = {record_key(record) for record in pending.records}
        found = [line for key, line in sorted(earlier.items())
                 if key in sent and line.outcome in WAITING_OUTCOMES]
        for line in found:
            self.report.count(line.outcome, line.cloud)
        if found:
            log.error("Hour %s is committed with %d record(s) an earlier attempt found rejected or "
                      "in conflict, e.g. contract %s dimension %s (%s); they wait in the ledger "
                      "(see status)", display_hour(pending.hour), len(found), found[0].contract_id,
                      found[0].dimension, found[0].outcome)

    def _send(self, pending: PendingHour, earlier: Mapping[Key, RecordLine],
              resend: bool) -> dict[Key, RecordResult]:
        """Send the records of ``pending`` that have no answer yet; on a failure, write what
        was answered to the ledger (a conflict among it must stay one) and raise."""
        waiting = [record for record in pending.records
                   if record_key(record) not in earlier
                   or earlier[record_key(record)].outcome not in ANSWERED_OUTCOMES]
        if not waiting:
            return {}
        # Whether one of our own earlier attempts may have stored a record: after a crash
        # that left no line, or a request that met no answer or a 5xx (not one never sent).
        landed = {key: resend and (key not in earlier or earlier[key].outcome == NO_ANSWER)
                  for key in map(record_key, waiting)}
        if any(not value for key, value in landed.items() if key in earlier):
            # From now on these may land: a crash during this resend must not leave them
            # marked as never sent, or their "already exists" would then read as a conflict.
            self.ledger.write_hour(pending.hour, hour_lines(
                pending, {key: RecordResult(NO_ANSWER) for key in landed}, earlier, self.clock()))
        log.info("Sending %d metering records to Clazar", len(waiting))
        try:
            outcomes = {key: line.outcome for key, line in earlier.items()}
            results = self.sender.send(waiting, outcomes, landed.get)
        except (ClazarError, RunStopped) as failure:
            lines = hour_lines(pending, failure.answered, earlier, self.clock())
            self.ledger.write_hour(pending.hour, lines)
            raise
        if all(result.outcome in ACCEPTED_OUTCOMES for result in results.values()):
            log.info("Successfully sent data to Clazar")
        return results

    def _commit(self, pending: PendingHour, waiting: Mapping[str, int]) -> None:
        self.save(self.state.committed(pending, waiting, self.config.late_lookback_hours))
        if not self.config.dry_run:
            log.info("Saved state to %s", self.store.display)
        self.report.hours += 1
        self.report.last_processed_hour = self.state.last_processed_hour

    def _note_lateness(self, pending: PendingHour) -> None:
        late = lateness(pending.hour, (record["cloud"] for record in pending.records), self.clock())
        if late is not None:  # warned about once per run, in summarise
            self.report.late_hours += 1
            oldest = self.report.oldest_late_hour
            if oldest is None or pending.hour < oldest[0]:
                self.report.oldest_late_hour = (pending.hour, *late)

    # --- usage that arrives late ---------------------------------------------------------

    def check_late_usage(self) -> None:
        """Look again at the recently processed hours for files added or rewritten since.

        Usage found late cannot be sent for its own hour (Clazar refuses a second record).
        late_usage compares it with the hour's high-water mark: more is reported, and with
        LATE_USAGE=carry added to the carried remainder of its contract and dimension, to be
        billed with the next hour; less is reported. One state write commits the new marks,
        the remainders and the ledger lines owed; the lines are written after it.
        """
        state, config = self.state, self.config
        if state.last_processed_hour is None or not config.late_lookback_hours:
            return
        found = LateFindings(dict(self.state.accounted))
        for hour, mark in sorted(self.state.accounted.items()):
            if hour > state.last_processed_hour - config.late_lookback_hours * HOUR:
                with working_on(hour):
                    self._check_hour(hour, mark, found)
        if found.tracked == dict(state.accounted) and not found.lines and self.state is state:
            return
        self.save(dataclasses.replace(
            self.state, accounted=found.tracked,
            remainders={**self.state.remainders, **found.carried},
            clouds={**self.state.clouds, **found.clouds},
            late_notes=(self.state.late_notes + tuple(found.notes))[-LATE_NOTES_KEPT:],
            owed_ledger=self.state.owed_ledger + tuple(found.lines)))
        self.write_owed_ledger()

    def _warn_unmarked_hours(self) -> None:
        """Say once which processed hours a raised LATE_USAGE_LOOKBACK_HOURS cannot compare:
        their marks were not kept. Never a silent end to late-usage tracking."""
        state, lookback = self.state, self.config.late_lookback_hours
        if lookback <= state.marks_hours:
            return
        last = state.last_processed_hour
        first = max(last - (lookback - 1) * HOUR, state.first_hour or EARLIEST_TIME)
        end = last - state.marks_hours * HOUR
        if first <= end:
            log.warning("LATE_USAGE_LOOKBACK_HOURS is now %d, but the marks of processed hours "
                        "were kept for %d: hours %s to %s are not checked for late usage", lookback,
                        state.marks_hours,
                        display_hour(first), display_hour(end))
        self.save(dataclasses.replace(state, marks_hours=lookback))

    def _check_hour(self, hour: datetime, mark: AccountedHour, found: LateFindings) -> None:
        fingerprint = formulas_fingerprint(self.config.formulas)
        services = [self.config.service(key) for key in mark.services]
        if mark.formulas != fingerprint or None in services:
            log.warning("Hour %s was billed with other dimension formulas or services than "
                        "today's: it is no longer checked for late usage", display_hour(hour))
            del found.tracked[hour]
            return
        try:
            listings = self.reader.listings(hour, services)
            if self.reader.listing_digest(listings) == mark.sources:
                return
            usage = self.reader.read(hour, services, listings)
            now, clouds = billable_amounts(usage, self.config.formulas,
                                           {s.key: s.cloud for s in services})
        except MeteringError as error:
            self.report.failure = f"checking hour {display_hour(hour)} for late usage: {error}"
            log.error("%s", self.report.failure)
            return
        more, reported, after = late_usage(mark.amounts, now, self.config.late_usage == "carry")
        check = mark.checks + 1 if reported else mark.checks
        at = self.clock()
        for key, difference in reported.items():
            action = "carried" if key in more else "reported"
            found.add(LateLine(key[0], key[1], hour, mark.amounts.get(key, Fraction(0)), difference,
                               action, check,
                               usage.sources, at), clouds.get(key[0]))
            self._log_late(hour, key, difference, action)
        for key, amount in more.items():
            before = found.carried.get(key, self.state.remainders.get(key, Fraction(0)))
            found.carried[key] = before + amount
        self.report.late_usage += len(reported)
        found.tracked[hour] = dataclasses.replace(mark, sources=usage.sources, amounts=after,
                                                  checks=check)

    @staticmethod
    def _log_late(hour: datetime, key: Key, difference: Fraction, action: str) -> None:
        contract, dimension = key
        if difference > 0:
            log.warning("Late usage: hour %s, already billed, now shows %s more %s for contract %s "
                        "(%s)",
                        display_hour(hour), amount_text(difference), dimension, contract,
                        "carried to the next hour" if action == "carried" else
                        "reported only; LATE_USAGE=carry would bill it with the next hour")
        else:
            log.warning("Late usage: hour %s, already billed, now shows %s less %s for contract %s "
                        "than already accounted (reported only; nothing can be taken "
                        "back)", display_hour(hour),
                        amount_text(-difference), dimension, contract)

    def write_owed_ledger(self) -> None:
        """Write the late-usage lines a committed check owes the ledger, replacing any lines of
        the same checks (a crash after an earlier write of them). The state stops owing
        them with its next write."""
        owed = self.state.owed_ledger
        if not owed:
            return
        for hour in sorted({line.hour for line in owed}):
            lines = [line for line in owed if line.hour == hour]
            checks = {line.check for line in lines}
            self.ledger.append(hour, lines, replacing=lambda line, checks=checks:
                               isinstance(line, LateLine) and line.check in checks)
        self.state = dataclasses.replace(self.state, owed_ledger=())


def run_warnings(report: RunReport, config: Config, now: datetime) -> list[str]:
    """What one run warns about, each once however many hours it concerns. Pure."""
    warnings = []
    if report.unattributed:
        subscriptions = sorted(set().union(*(found for _, _, found in report.unattributed)))
        hours = [hour for hour, _, _ in report.unattributed]
        warnings.append(
            f"{sum(count for _, count, _ in report.unattributed)} record(s) from "
            f"{len(subscriptions)} subscription(s) have no externalPayerId or dimension and are "
            f"not sent, in {len(hours)} hour(s) from {display_hour(min(hours))} to "
            f"{display_hour(max(hours))}: "
            + ", ".join(subscriptions[:10]) + (" ..." if len(subscriptions) > 10 else ""))
    if report.oldest_late_hour is not None:
        hour, cloud, late_by = report.oldest_late_hour
        warnings.append(f"{report.late_hours} hour(s) sent past the {cloud} marketplace's "
                        f"{LATENESS_WINDOWS[cloud]}-hour window, the oldest {display_hour(hour)}, "
                        f"which ended {late_by / HOUR:.1f} hours ago: the marketplace may refuse "
                        "to bill them")
    for key, final_before in sorted(report.final_before.items()):
        if now - final_before > config.export_stale_hours * HOUR:
            warnings.append(f"the export of {key} is final only before "
                            f"{format_time(final_before)}, "
                            f"{export_age_hours(final_before, now):.1f} hours ago, more than "
                            f"EXPORT_STALE_HOURS={config.export_stale_hours}: Omnistrate's export "
                            "may have stalled")
    return warnings


def summarise(report: RunReport, config: Config, now: datetime) -> None:
    """Log the run's warnings and its one summary line."""
    last = display_hour(report.last_processed_hour) if report.last_processed_hour else "none"
    behind = "unknown" if report.behind is None else str(report.behind)
    line = (f"Finished: {report.hours} hour(s) processed, "
            f"{report.total(DELIVERED, RETRY_DELIVERED)} record(s) sent, "
            f"{report.total(ALREADY_DELIVERED)} already delivered, {report.total(REJECTED)} "
            "rejected, "
            + (f"{report.total(CONFLICT)} in conflict, " if report.total(CONFLICT) else "")
            + f"{report.unattributable} unattributable; last processed hour {last}; {behind} "
              "hour(s) behind")
    if report.holding:
        line += f"; waiting for {report.holding}"
    if report.late_hours:
        line += f"; {report.late_hours} hour(s) sent past the marketplace's window"
    if report.late_usage:
        line += f"; late usage found for {report.late_usage} contract-dimension-hour(s)"
    for warning in run_warnings(report, config, now):
        log.warning("%s", warning)
    if report.failure:
        log.error("%s; FAILED: %s", line, report.failure)
    elif report.stopped:
        log.warning("%s; STOPPED: %s", line, report.stopped)
    elif not report.ok:
        log.error("%s", line)
    else:
        log.info("%s", line)


def prune_ledger(config: Config, ledger: Ledger, state: DeploymentState, today: datetime) -> None:
    """Delete ledger days past LEDGER_RETENTION_DAYS, except days where records still wait.
    Housekeeping: a failure warns, and never fails a run that billed correctly."""
    try:
        deleted, foreign = ledger.prune(config.ledger_retention_days, today,
                                        {day_folder(hour) for hour in state.waiting})
    except LedgerError as error:
        log.warning("Could not delete ledger days older than %d days (tried again next run): %s",
                    config.ledger_retention_days, error)
        return
    if deleted:
        log.info("Deleted %d ledger file(s) older than %d days", deleted,
                 config.ledger_retention_days)
    if foreign:
        log.warning("Left %d item(s) in old ledger day folders of %s that this exporter did not "
                    "write: %s",
                    len(foreign), ledger.storage.display,
                    ", ".join(shown_text(name) for name in foreign[:5]))


def announce(store: StateStore, ledger: Ledger) -> None:
    """Say where this command keeps its state, lock and ledger (absolute paths or S3 URLs)."""
    log.info("State %s (lock %s); ledger %s", store.display, store.lock.display,
             ledger.storage.display)


def read_marker(source: ExportSource) -> tuple[ExportMarker | None, MarkerError | None]:
    try:
        marker = source.read_marker()
    except MarkerError as error:
        return None, error
    if marker is None:
        log.warning("No export marker at s3://%s/%s; processing every closed hour instead",
                    source.bucket, MARKER_KEY)
    return marker, None


def export(config: Config, client: Any, report: RunReport
           ) -> tuple[ExitCode, DeploymentState | None]:
    """The hourly run: lock, bill every due hour, release. Returns (the exit code, the state
    as it ended, for the metrics)."""
    store, ledger = open_state_store(config, client), open_ledger(config, client)
    announce(store, ledger)
    source = ExportSource(client, config.bucket, config.max_export_file_bytes,
                          config.s3_timeout_seconds)
    clazar = None if config.dry_run else ClazarClient(config)
    exporter: Exporter | None = None
    try:
        with contextlib.nullcontext() if config.dry_run else store.locked(ledger):
            if not config.dry_run:
                ledger.check()
            exporter = Exporter(config, HourReader(source, config.formulas),
                                None if clazar is None else Sender(clazar, report), store, ledger,
                                store.load(),
                                report)
            _run_exporter(exporter, *read_marker(source))
            if not config.dry_run:
                now = utc_now()
                exporter.save(exporter.state.with_run(report.to_json(now), now, report.ok))
                prune_ledger(config, ledger, exporter.state, now)
        code = ExitCode.OK if report.ok else ExitCode.FAILED
    except (StateError, LockHeld) as error:
        (log.warning if isinstance(error, LockHeld) else log.error)("%s", error)
        code = error.exit_code
    except RunStopped as stop:
        (log.warning if stop.exit_code == ExitCode.STOPPED else log.error)(
            "%s; the lock is released, no hour was committed in part, and the next run goes on "
            "from here", stop)
        code = stop.exit_code
    finally:
        source.close()
        if clazar is not None:
            clazar.close()
    return code, exporter.state if exporter is not None else None


def _run_exporter(exporter: Exporter, marker: ExportMarker | None,
                  marker_error: MarkerError | None) -> None:
    report = exporter.report
    try:
        exporter.run(marker, marker_error)
    except StateError:
        summarise(report, exporter.config, utc_now())
        raise
    except MeteringError as error:
        report.failure = str(error)
        log.error("%s", error)
    except RunStopped as stop:
        if stop.exit_code == ExitCode.STOPPED:
            report.stopped = str(stop)
        else:  # the run's own deadline: a failure to look into
            report.failure = str(stop)
        summarise(report, exporter.config, utc_now())
        raise
    except Exception as error:
        # A defect, not bad input: the hour stays due (or pending, if it was recorded).
        # Masked, then cut: a secret straddling the cut is masked whole, not kept in part.
        report.failure = (f"unexpected {type(error).__name__}: "
                          f"{shown_text(mask_secrets(str(error)), 300)}")
        log.error("%s (a defect: please report it with the DEBUG log)", report.failure)
        log.debug("Where it happened", exc_info=error)
    summarise(report, exporter.config, utc_now())


# ===========================================================================
# 9. Operator commands: status, history, reconcile, conflicts, retry-failed
# ===========================================================================


def deployment_status(config: Config, state: DeploymentState, marker: ExportMarker | None,
                      marker_error: MarkerError | None, now: datetime) -> dict[str, Any]:
    """Where the deployment stands, from its state and the export marker. Pure."""
    first = first_due_hour(state.last_processed_hour, config.start_hour, state.first_hour, now)
    services, finals, problem = [], {}, None
    for service in config.services:
        row = {"service": service.key, "cloud": service.cloud,
               "marker": "absent: closed hours are due",
               "export_age_hours": None, "export_stale": None,
               "last_processed_hour": _time_or_none(state.service(service.key).last_processed_hour)}
        try:
            if marker_error is not None:
                raise marker_error
            if marker is None and state.service(service.key).hours_by_marker:
                raise MarkerError("missing, but it decided this service's hours before: no hour is "
                                  "sent until it is back")
            finals[service.key] = marker.final_before(service.key) if marker else None
            if marker is not None:
                age = export_age_hours(finals[service.key], now)
                row.update(marker=f"final before {format_time(finals[service.key])}",
                           export_age_hours=round(age, 1),
                           export_stale=age > config.export_stale_hours)
        except MarkerError as error:
            row["marker"], problem = f"error: {error}", problem or service.key
        services.append(row)
    end, holding = deployment_due_end(now, finals) if problem is None else (first, problem)
    return {
        "state": config.state_path, "last_processed_hour": _time_or_none(state.last_processed_hour),
        "hours_behind": None if problem else hours_between(first, end), "holding": holding,
        "services": services,
        "pending_hour": _time_or_none(state.pending.hour if state.pending else None),
        "pending_records": len(state.pending.records) if state.pending else 0,
        "rejected_waiting": state.waiting_count(REJECTED),
        "conflicts_waiting": state.waiting_count(CONFLICT),
        "last_run": state.last_run, "last_success_at": _time_or_none(state.last_success_at),
        "late_usage_found": len(state.late_notes),
        "last_late_usage": state.late_notes[-1] if state.late_notes else None,
    }


def _time_or_none(moment: datetime | None) -> str | None:
    return format_time(moment) if moment is not None else None


def format_status(status: Mapping[str, Any], stale_hours: int) -> str:
    run = status["last_run"]
    last_run = (f"{run.get('at')}, {run.get('result')}: {run.get('hours')} hour(s), "
                f"{run.get('sent')} sent, {run.get('rejected')} "
                "rejected" + (f"; {run['error']}" if run.get("error")
                                                     else "")) if run else "never"
    pending = (f"{status['pending_hour']} ({status['pending_records']} records, resent by the next "
               "run)"
               if status["pending_hour"] else "none")
    behind = "unknown" if status["hours_behind"] is None else status["hours_behind"]
    lines = [f"State {status['state']}",
             f"  last processed hour:   {status['last_processed_hour'] or 'none'}",
             f"  hours behind marker:   {behind}" + (f" (waiting for {status['holding']})"
                                                     if status["holding"] else ""),
             f"  pending hour:          {pending}",
             f"  rejected records:      {status['rejected_waiting']} waiting"
             + (" (metering-processor retry-failed)" if status["rejected_waiting"] else ""),
             f"  conflicts:             {status['conflicts_waiting']} waiting"
             + (" (metering-processor conflicts; see the README)" if status["conflicts_waiting"]
                else ""),
             f"  last run:              {last_run}",
             f"  last success:          {status['last_success_at'] or 'never'}"]
    if status["late_usage_found"]:
        late = status["last_late_usage"]
        lines.append(f"  late usage found:      {status['late_usage_found']}, the last for hour "
                     f"{late['hour']}, contract {late['contract_id']}, {late['difference']} "
                     f"{late['dimension']} ({late['action']})")
    for row in status["services"]:
        hours_ago = row["export_age_hours"]
        age = "" if hours_ago is None else f" ({hours_ago:.1f} hours ago)"
        lines += [f"{row['service']} ({row['cloud']})",
                  f"  last processed hour:   {row['last_processed_hour'] or 'none'}",
                  f"  export marker:         {row['marker']}{age}"]
        if row["export_stale"]:
            lines.append(f"  WARNING: the export is {row['export_age_hours']:.1f} hours behind, "
                         f"more than EXPORT_STALE_HOURS={stale_hours}: Omnistrate's export may "
                         "have stalled")
    return "\n".join(escape_control(line) for line in lines)


def contract_history(ledger: Ledger, contract: str, first: datetime,
                     last: datetime) -> list[LedgerLine]:
    """What the ledger says was billed to one contract, hour by hour."""
    lines = [line for line in ledger.lines(first, last) if line.contract_id == contract]
    return sorted(lines, key=lambda line: (line.hour, line.dimension, line.at))


def format_history(lines: Sequence[LedgerLine]) -> str:
    if not lines:
        return "Nothing in the ledger for this contract in that range."
    out = [f"{'hour':<21} {'dimension':<30} {'quantity':>14}  {'outcome':<25} record id"]
    for line in lines:
        if isinstance(line, LateLine):
            out.append(f"{format_time(line.hour):<21} {line.dimension:<30} "
                       f"{amount_text(line.difference):>14}  {'late usage ' + line.action:<25}")
        else:
            out.append(f"{format_time(line.hour):<21} {line.dimension:<30} {line.quantity:>14}  "
                       f"{line.outcome:<25} {line.record_id or '-'}")
    total = sum(line.quantity for line in lines
                if isinstance(line, RecordLine) and line.outcome in ACCEPTED_OUTCOMES)
    out.append(f"{len(lines)} line(s); {total} unit(s) billed in all dimensions")
    return "\n".join(escape_control(line) for line in out)


def reconcile_hour(now: Mapping[Key, Fraction], lines: Sequence[LedgerLine],
                   chain: Mapping[Key, Fraction], limit_of: Callable[[str], int | None]
                   ) -> tuple[dict[Key, tuple[int, int, int, int]], dict[Key, Fraction]]:
    """Compare one hour's usage as the export shows it now with what the ledger says was billed.

    Returns ({(contract, dimension): (expected, billed, rejected, conflict)}, remainders
    after the hour). Expected is what carry() bills for today's usage, less the late usage
    committed checks carried to later hours (billed there), with the remainder the ledger
    says was carried in (else the one computed for the hour before, in ``chain``). Billed
    counts records Clazar accepted or already held; rejected and conflict, the quantities
    of records still waiting as such. Pure.
    """
    firsts, latest = first_sends(lines), latest_records(lines)
    billed: dict[Key, int] = {}
    for line in lines:
        if isinstance(line, RecordLine) and line.outcome in ACCEPTED_OUTCOMES:
            billed[line.key] = billed.get(line.key, 0) + line.quantity
    carried_later = {}
    for line in lines:
        if isinstance(line, LateLine) and line.action == "carried":
            carried_later[line.key] = carried_later.get(line.key, Fraction(0)) + line.difference
    keys = sorted(set(now) | set(billed) | set(firsts))
    carried_in = {key: firsts[key].carried_in if key in firsts
                  and firsts[key].carried_in is not None
                  else chain.get(key, Fraction(0)) for key in keys}
    zero = Fraction(0)
    amounts = {key: max(zero, now.get(key, zero) - carried_later.get(key, zero)) for key in keys}
    expected, after = carry(amounts, carried_in, limit_of)
    compared = {}
    for key in keys:
        waiting = latest.get(key)
        waits = waiting is not None and waiting.outcome in (*WAITING_OUTCOMES, RESENDING)
        waits_as = waiting_as(waiting) if waits else None
        compared[key] = (expected.get(key, 0), billed.get(key, 0),
                         waiting.quantity if waits_as == REJECTED else 0,
                         waiting.quantity if waits_as == CONFLICT else 0)
    return compared, {**carried_in, **after}


def billed_services(config: Config, state: DeploymentState, hour: datetime
                    ) -> list[ServiceKey]:
    """The services a processed ``hour`` was billed with: its mark's, while it is kept; else
    the configured services that had joined by then, and the removed ones that still had
    (read with the first configured service's marketplace: its own is not kept)."""
    default = config.services[0].cloud
    known = {service.key: service for service in config.services}
    mark = state.accounted.get(hour)
    if mark is not None:
        keys = list(mark.services)
    else:
        keys = [key for key in known if state.service(key).first_hour is None
                or state.service(key).first_hour <= hour]
        keys += [key for key, entry in sorted(state.services.items())
                 if key not in known and entry.billed(hour)]
    return [known.get(key) or parse_service_keys(key, default)[0] for key in keys]


def reconcile(config: Config, reader: HourReader, ledger: Ledger, state: DeploymentState,
              first: datetime,
              last: datetime) -> dict[str, Any]:
    """Re-read the export for first..last and compare it with the ledger, hour by hour."""
    rows: dict[Key, list[int]] = {}
    differences, unattributable = [], 0
    processed = state.last_processed_hour
    hours = [first + i * HOUR for i in range(hours_between(first, last + HOUR))]
    # Hours before the deployment's first were never its to bill (START_HOUR): not compared.
    before = [hour for hour in hours if state.first_hour is not None and hour < state.first_hour]
    due = [(hour, billed_services(config, state, hour)) for hour in hours
           if processed is not None and hour <= processed and hour not in before]
    chain: dict[Key, Fraction] = {}
    with contextlib.closing(reader.read_ahead(due)) as usages:
        for usage in usages:
            STOP.check(f"before hour {display_hour(usage.hour)}")
            unattributable += usage.unattributable
            now, contract_clouds = billable_amounts(usage, config.formulas,
                                                    {s.key: s.cloud for s in usage.services})
            cloud_of = {**state.clouds, **contract_clouds}
            compared, chain = reconcile_hour(now, ledger.read_hour(usage.hour) or [], chain,
                                             lambda c, clouds=cloud_of: config.record_limit(
                                                 clouds.get(c, config.services[0].cloud)))
            for key, values in compared.items():
                row = rows.setdefault(key, [0, 0, 0, 0])
                for index, value in enumerate(values):
                    row[index] += value
                if values[0] != values[1]:
                    differences.append({"contract_id": key[0], "dimension": key[1],
                                        "hour": format_time(usage.hour),
                                        "expected": values[0], "billed": values[1],
                                        "difference": values[0] - values[1],
                                        "rejected": values[2], "conflict": values[3]})
    return {"from": format_time(first), "to": format_time(last),
            "rows": [{"contract_id": key[0], "dimension": key[1], "expected": value[0],
                      "billed": value[1],
                      "difference": value[0] - value[1], "rejected": value[2], "conflict": value[3]}
                     for key, value in sorted(rows.items())],
            "differences": differences, "unattributable_records": unattributable,
            "hours_not_processed_yet": len(hours) - len(due) - len(before),
            "hours_before_first_hour": len(before)}


def spreadsheet_safe(cell: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @, a tab or a
    carriage return (a formula, e.g. =HYPERLINK(...)) gets a leading ', and control
    characters are escaped (the csv module leaves a CR unquoted). Numbers stay."""
    if not isinstance(cell, str):
        return cell
    return ("'" if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else "") + escape_control(cell)


def format_reconciliation(result: Mapping[str, Any], style: str) -> str:
    columns = ("contract_id", "dimension", "expected", "billed", "difference", "rejected",
               "conflict")
    if style == "json":
        return json.dumps(result, indent=2)
    if style == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([spreadsheet_safe(row[name]) for name in columns]
                         for row in result["rows"])
        return out.getvalue().rstrip("\n")
    widths = {name: max([len(name)] + [len(str(row[name])) for row in result["rows"]])
              for name in columns}
    lines = [f"Reconciliation of {result['from']} .. {result['to']}", "",
             "  ".join(f"{name:<{widths[name]}}" for name in columns)]
    lines += ["  ".join(f"{row[name]!s:<{widths[name]}}" for name in columns)
              for row in result["rows"]]
    lines.append("")
    if result["unattributable_records"]:
        lines.append(f"{result['unattributable_records']} unattributable usage record(s) (no "
                     "externalPayerId or dimension)")
    if result["hours_before_first_hour"]:
        lines.append(f"{result['hours_before_first_hour']} hour(s) of the range before the "
                     "deployment's first hour, never its to bill, not compared")
    if result["hours_not_processed_yet"]:
        lines.append(f"{result['hours_not_processed_yet']} hour(s) of the range not processed yet, "
                     "not compared")
    for difference in result["differences"]:
        lines.append(f"DIFFERENCE contract {difference['contract_id']} {difference['dimension']} "
                     f"hour {difference['hour']}: expected {difference['expected']}, billed "
                     f"{difference['billed']}"
                     + (f" ({difference['rejected']} rejected, see retry-failed)"
                        if difference["rejected"] else "")
                     + (f" ({difference['conflict']} in conflict, see conflicts)"
                        if difference["conflict"] else ""))
    lines.append(f"{len(result['differences'])} difference(s)" if result["differences"]
                 else "Everything matches.")
    return "\n".join(escape_control(line) for line in lines)


def waiting_hours(state: DeploymentState, outcome: str, hour: datetime | None) -> list[datetime]:
    """The hours with records of ``outcome`` waiting, oldest first (only ``hour`` if given)."""
    return [when for when, counts in sorted(state.waiting.items())
            if counts.get(outcome) and (hour is None or when == hour)]


def list_waiting(state: DeploymentState, ledger: Ledger, outcome: str, contract: str | None,
                 hour: datetime | None) -> list[RecordLine]:
    """The records of ``outcome`` waiting in the ledger (of ``contract`` and ``hour`` if given)."""
    found = []
    for when in waiting_hours(state, outcome, hour):
        STOP.check(f"before hour {display_hour(when)}")
        found += [line for line in waiting_records(ledger.read_hour(when) or []).values()
                  if waiting_as(line) == outcome and (contract is None
                                                      or line.contract_id == contract)]
    return found


def format_waiting(lines: Sequence[RecordLine]) -> str:
    if not lines:
        return "No conflict waiting."
    out = [f"{'hour':<21} {'contract':<38} {'dimension':<30} {'quantity':>14}  cloud / Clazar's "
           "answer"]
    out += [f"{format_time(line.hour):<21} {line.contract_id:<38} {line.dimension:<30} "
            f"{line.quantity:>14}  {line.cloud} / "
            f"{json.dumps(line.answer, sort_keys=True)}" for line in lines]
    out.append(f"{len(lines)} conflict(s) waiting; once resolved, clear them with: conflicts "
               "--clear")
    return "\n".join(escape_control(line) for line in out)


def clear_conflicts(store: StateStore, state: DeploymentState, ledger: Ledger,
                    contract: str | None, hour: datetime | None,
                    clock: Callable[[], datetime] = utc_now) -> DeploymentState:
    """Mark the waiting conflicts (of ``contract`` and ``hour`` if given) resolved by an
    operator: a "conflict cleared" line each, then the state's counts. Nothing is sent."""
    for when in waiting_hours(state, CONFLICT, hour):
        STOP.check(f"before hour {display_hour(when)}")
        chosen = list_waiting(state, ledger, CONFLICT, contract, when)
        cleared = [dataclasses.replace(line, outcome=CONFLICT_CLEARED, retry=True, record_id=None,
                                       answer=None,
                                       amount=None, carried_in=None, at=clock()) for line in chosen]
        lines = ledger.append(when, cleared)
        for line in cleared:
            log.info("Cleared the conflict of contract %s dimension %s hour %s (quantity %s, never "
                     "billed by this "
                     "exporter)", line.contract_id, line.dimension, format_time(line.hour),
                     line.quantity)
        state = state.with_waiting(when, waiting_counts(lines))
        store.save(state)
    return state


def retry_line(line: RecordLine, result: RecordResult, at: datetime) -> RecordLine:
    """The ledger line of one resent record: delivered on retry, rejected again, or a conflict."""
    outcome = RETRY_DELIVERED if result.outcome in ACCEPTED_OUTCOMES else result.outcome
    return dataclasses.replace(line, outcome=outcome, record_id=result.record_id, at=at, retry=True,
                               amount=None,
                               carried_in=None, attempts=line.attempts + 1,
                               answer=result.answer if outcome in WAITING_OUTCOMES else None)


def retry_failed(config: Config, store: StateStore, state: DeploymentState, ledger: Ledger,
                 sender: Sender | None, contract: str | None, hour: datetime | None,
                 clock: Callable[[], datetime] = utc_now) -> tuple[ExitCode, DeploymentState]:
    """Resend the rejected records waiting in the ledger, hour by hour, through the run's
    own Sender: accepted (or "already exists" after a resend of ours that may have landed)
    is delivered on retry; "already exists" otherwise is a conflict; rejected again keeps
    waiting with the new answer. Before the send each gets a ``resending`` line (it still
    waits, as a pending hour does), so that a lost answer or a crash leaves the next
    retry-failed knowing the resend may have landed. Each outcome is a new line, written
    before the state's count is updated (the ledger is the truth). Memory holds one hour's
    waiting records at a time. Returns (exit code, state)."""
    code = ExitCode.OK
    waiting = 0
    for when in waiting_hours(state, REJECTED, hour):
        chosen = list_waiting(state, ledger, REJECTED, contract, when)
        waiting += len(chosen)
        # The per-record limit holds for every send: a record above today's stays waiting.
        refused = {line.key: over_limit(line.record(), config.record_limit(line.cloud))
                   for line in chosen}
        for problem in filter(None, refused.values()):
            log.error("Not resent: %s; it keeps waiting", problem)
            code = ExitCode.FAILED
        chosen = [line for line in chosen if not refused[line.key]]
        if sender is None:
            log.info("Dry run: would resend %d rejected record(s) of hour %s", len(chosen),
                     display_hour(when))
            for line in chosen:
                log.info("Dry run record: %s", json.dumps(line.record(), sort_keys=True))
            continue
        if chosen:
            log.info("Resending %d rejected record(s) of hour %s to Clazar", len(chosen),
                     display_hour(when))
            ledger.append(when, [dataclasses.replace(line, outcome=RESENDING, retry=True,
                                                     record_id=None, at=clock(),
                                                     answer=None, amount=None, carried_in=None)
                                 for line in chosen if line.outcome != RESENDING])
            in_flight = {line.key: line.outcome == RESENDING for line in chosen}
            failed = _resend(sender, ledger, when, chosen, in_flight, clock)
            code = ExitCode.FAILED if failed else code
        state = state.with_waiting(when, waiting_counts(ledger.read_hour(when) or []))
        store.save(state)
    if not waiting:
        log.info("No rejected record waiting%s; nothing to resend",
                 " for that contract or hour" if contract or hour else "")
    return code, state


def _resend(sender: Sender, ledger: Ledger, when: datetime, chosen: Sequence[RecordLine],
            in_flight: Mapping[Key, bool], clock: Callable[[], datetime]) -> bool:
    """Resend one hour's chosen records and write their outcomes. Returns whether any did not
    end delivered. Raises RunStopped after writing what was answered."""
    records = [line.record() for line in chosen]
    try:
        results = sender.send(records, {line.key: REJECTED for line in chosen}, in_flight.get)
    except (ClazarError, RunStopped) as failure:
        ledger.append(when, [retry_line(line, failure.answered[line.key],
                                        clock()) for line in chosen
                             if failure.answered[line.key].outcome not in (NO_ANSWER, UNSENT)])
        if isinstance(failure, RunStopped):
            raise
        log.error("%s; the records without an answer stay waiting", failure)
        return True
    lines = [retry_line(line, results[line.key], clock()) for line in chosen]
    ledger.append(when, lines)
    outcomes = [line.outcome for line in lines]
    log.info("Hour %s: %d delivered on retry, %d still rejected, %d in conflict",
             display_hour(when),
             outcomes.count(RETRY_DELIVERED), outcomes.count(REJECTED), outcomes.count(CONFLICT))
    return outcomes.count(RETRY_DELIVERED) != len(outcomes)


# ===========================================================================
# 10. Metrics, signals and the command line
# ===========================================================================

PUSHGATEWAY_JOB = "metering_exporter"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    """A Prometheus label value: escaped as the text format wants, registered secrets masked,
    nothing else changed (a service called "Vault Secret" keeps its name)."""
    return mask_known_secrets(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, help_text: str, samples: Iterable[tuple[str, float]],
            deployment: str) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        labels = f'deployment="{deployment}"' + (f",{labels}" if labels else "")
        shown = f"{value:g}" if isinstance(value, int) else f"{value:.3f}"
        lines.append(f"{name}{{{labels}}} {shown}")
    return lines


_RECORD_METRICS = (
    ((DELIVERED, RETRY_DELIVERED), "metering_run_records_sent",
     "Records Clazar accepted in the last run."),
    ((ALREADY_DELIVERED,), "metering_run_records_already_delivered",
     "Records Clazar already held from this exporter."),
    ((REJECTED,), "metering_run_records_rejected", "Records Clazar rejected in the last run."),
    ((CONFLICT,), "metering_run_records_conflicting",
     "Records Clazar already held from another sender."),
)


def render_metrics(config: Config | None, report: RunReport, state: DeploymentState | None,
                   code: int,
                   started: datetime, duration: float, deployment: str) -> str:
    """The Prometheus text exposition of one run, for node_exporter's textfile collector and
    the Pushgateway. Every series has a ``deployment`` label (its state's location), so two
    deployments on one host never clash. Pure."""
    deployment = _label(deployment)
    family = lambda name, text, samples: _family(name, text, samples, deployment)  # noqa: E731
    lines = family("metering_build_info", "The exporter's version.",
                   [(f'version="{__version__}"', 1)])
    lines += family("metering_run_timestamp_seconds", "When the last run started.",
                    [("", started.timestamp())])
    lines += family("metering_run_duration_seconds", "How long the last run took.",
                    [("", duration)])
    lines += family("metering_run_exit_status",
                    "Exit code of the last run (0 ok, 1 failed, 2 configuration, 4 state, 5 "
                    "stopped by a signal).", [("", int(code))])
    if config is None:
        return "\n".join(lines) + "\n"
    clouds = sorted({service.cloud for service in config.services})
    for outcomes, name, text in _RECORD_METRICS:
        counts = [sum(report.records.get(outcome, {}).get(cloud, 0) for outcome in outcomes)
                  for cloud in clouds]
        lines += family(name, text, [(f'cloud="{cloud}"', count)
                                     for cloud, count in zip(clouds, counts)])
    for value, name, text in (
        (report.hours, "metering_run_hours_processed", "Hours processed by the last run."),
        (report.unattributable, "metering_run_records_unattributable",
         "Usage records without payer or dimension."),
        (report.late_hours, "metering_run_late_hours",
         "Hours sent after a marketplace's lateness window."),
        (report.late_usage, "metering_run_late_usage",
         "Usage found for billed hours, per contract, dimension and hour."),
    ):
        lines += family(name, text, [("", value)])
    if report.behind is not None:
        lines += family("metering_hours_behind", "Final hours not processed yet.",
                        [("", report.behind)])
    per_service = [(f'service="{_label(service.key)}"', service.key) for service in config.services]
    lines += family("metering_service_holding",
                    "1 for the service whose export holds the deployment's next hour.",
                    [(labels, int(key == report.holding)) for labels, key in per_service])
    lines += family("metering_export_final_before_timestamp_seconds",
                    "When the export marker says the service's data is final up to "
                    "(last_processed_to + 1 s).",
                    [(labels, report.final_before[key].timestamp()) for labels, key in per_service
                     if key in report.final_before])
    return "\n".join(lines + _state_metrics(state, family)) + "\n"


def _state_metrics(state: DeploymentState | None, family: Callable[..., list[str]]) -> list[str]:
    if state is None:
        return []
    lines = family("metering_pending_hour", "1 while an hour is recorded as pending.",
                   [("", int(state.pending is not None))])
    lines += family("metering_rejected_records_waiting",
                    "Rejected records waiting for retry-failed.",
                    [("", state.waiting_count(REJECTED))])
    lines += family("metering_conflicting_records_waiting",
                    "Records in conflict, waiting for an operator.",
                    [("", state.waiting_count(CONFLICT))])
    if state.last_processed_hour is not None:
        lines += family("metering_last_processed_hour_timestamp_seconds",
                        "Start of the last hour processed.",
                        [("", state.last_processed_hour.timestamp())])
    if state.last_success_at is not None:
        lines += family("metering_last_success_timestamp_seconds",
                        "When a run last ended without failure.",
                        [("", state.last_success_at.timestamp())])
    return lines


def pushgateway_target(url: str, deployment: str) -> str:
    """Where one run's metrics are PUT:
    ``<url>/metrics/job/metering_exporter/deployment@base64/<state>``,
    the state's location base64url-encoded (the Pushgateway's way of carrying '/'), so each
    deployment replaces only its own group. Pure."""
    encoded = base64.urlsafe_b64encode(deployment.encode("utf-8")).decode("ascii").rstrip("=")
    return f"{url.rstrip('/')}/metrics/job/{PUSHGATEWAY_JOB}/deployment@base64/{encoded or '='}"


def push_metrics(url: str, deployment: str, text: str) -> None:
    """PUT ``text`` to the Pushgateway, replacing what this deployment pushed last. A failure
    is a warning and never changes the exit code: the metrics must not fail a run that
    billed correctly, and the next run pushes again."""
    target = pushgateway_target(url, deployment)
    parts = urlsplit(target)
    # Never a password in the log.
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    timeout = (1.0, 2.0) if STOP.is_set() else (3.0,
                                                5.0)  # shorter after a stop, which must end soon
    try:
        with http_session() as session:
            status, body, _ = within_deadline(
                lambda: bounded_request(session, "PUT", target, 4096, data=text.encode("utf-8"),
                                        timeout=timeout, headers={"Content-Type": PROMETHEUS_TEXT}),
                sum(timeout) * 2, "while pushing the metrics")
    except RequestFailed as error:
        log.warning("Could not push the metrics to %s: %s", shown, error)
        return
    except (DeadlinePassed, RunStopped):
        log.warning("Could not push the metrics to %s: no complete answer within %.0f s", shown,
                    sum(timeout) * 2)
        return
    if not 200 <= status < 300:
        log.warning("Could not push the metrics to %s: HTTP %d: %s", shown, status,
                    escape_control(mask_outside(body.decode("utf-8", "replace")))[:200])
        return
    log.debug("Pushed the metrics to %s", shown)


def publish_metrics(metrics_file: str | None, pushgateway_url: str | None, deployment: str,
                    text: str) -> None:
    """Write the metrics to METRICS_FILE (atomically, mode 0644) and push them to
    METRICS_PUSHGATEWAY_URL, each where set."""
    if metrics_file:
        try:
            write_file_atomically(metrics_file, [text.encode("utf-8")], mode=0o644)
        except OSError as error:
            log.error("Cannot write METRICS_FILE %s: %s", metrics_file, error.strerror or error)
    if pushgateway_url:
        push_metrics(pushgateway_url, deployment, text)


def deployment_name(state_path: str) -> str:
    """The ``deployment`` label: the state's location, which no two deployments share."""
    return state_path if split_s3_url(state_path) else os.path.realpath(state_path)


# --- The command line --------------------------------------------------------------------

FORMULA_HELP = """\
billing dimensions by formula (when any DIMENSION<n>_* is set, only these are sent):
  names:    each Omnistrate dimension (summed per contract and hour, 0 when absent) and
            <dimension>_total_price (sum of value x pricePerUnit, a missing price counts 0)
  grammar:  numbers, names, + - * / // % **, parentheses, unary minus, min, max, abs, round;
            ** takes a whole-number literal exponent from -64 to 64, round's digits -20 to 20;
            arithmetic is exact; any value beyond 2**1024 fails the hour
  example:  DIMENSION1_NAME=memory_gib_hours  DIMENSION1_FORMULA=memory_byte_hours/1073741824"""


def help_epilog() -> str:
    """The settings table and the rest of --help, made from SETTINGS."""
    width = max(len(setting.name) for setting in SETTINGS)
    lines = ["environment variables (default in brackets):"]
    for setting in SETTINGS:
        bounds = f"; {setting.shown_bounds()}" if setting.shown_bounds() else ""
        lines.append(f"  {setting.name:<{width}}  {setting.meaning} "
                     f"[{setting.shown_default()}{bounds}]")
    codes = ", ".join(f"{code.value} {code.name.lower()}" for code in ExitCode)
    return "\n".join(lines + ["", FORMULA_HELP, "", f"exit codes: {codes}", "",
                              "--dry-run may stand before or after the command (run, retry-failed, "
                              "conflicts --clear,",
                              "or none); with it, or DRY_RUN=true, nothing is sent and nothing is "
                              "written."])


def _hour_argument(text: str) -> datetime:
    try:
        return parse_hour(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole UTC hour: {shown_text(text)}") from None


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    # prog is left to argparse: the name this was started by (metering_processor.py, or
    # metering-processor when installed), so --version and usage show what was typed.
    parser = argparse.ArgumentParser(description="Export Omnistrate usage from S3 to Clazar, one "
                                                 "final hour at a time. With no command, run the "
                                                 "export (as cron does).",
                                     epilog=help_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    dry_run = "read and aggregate due hours and print the records; send and write nothing"
    parser.add_argument("--dry-run", action="store_true", default=None, help=dry_run)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    # SUPPRESS: a sub-command's default would overwrite a --dry-run given before the command.
    run = commands.add_parser("run", help="export every due hour (the default)")
    run.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help=dry_run)
    status = commands.add_parser("status",
                                 help="where the deployment stands; read-only, no lock, no Clazar "
                                      "call")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    retry = commands.add_parser("retry-failed",
                                help="resend the rejected records waiting in the ledger")
    retry.add_argument("--contract", help="only this contract")
    retry.add_argument("--hour", type=_hour_argument,
                       help="only this hour, e.g. 2026-02-10T14:00:00Z")
    retry.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                       help="show what would be resent")
    check = commands.add_parser("reconcile",
                                help="re-read the export and compare it with the ledger; exit 1 on "
                                     "a difference")
    check.add_argument("--from", dest="first", type=_hour_argument, required=True,
                       help="first hour")
    check.add_argument("--to", dest="last", type=_hour_argument, required=True,
                       help="last hour (included)")
    output = check.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_const", dest="style", const="json", default="text")
    output.add_argument("--csv", action="store_const", dest="style", const="csv")
    conflicts = commands.add_parser("conflicts",
                                    help="list the records in conflict (another sender holds "
                                         "them), or clear them once resolved; never sends")
    conflicts.add_argument("--contract", help="only this contract")
    conflicts.add_argument("--hour", type=_hour_argument,
                           help="only this hour, e.g. 2026-02-10T14:00:00Z")
    conflicts.add_argument("--clear", action="store_true",
                           help="mark them resolved (takes the lock)")
    conflicts.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                           help="with --clear: list what would be cleared; write nothing")
    conflicts.add_argument("--json", action="store_true")
    history = commands.add_parser("history", help="what the ledger says was billed to one contract")
    history.add_argument("--contract", required=True)
    history.add_argument("--from", dest="first", type=_hour_argument,
                         help="first hour (default: 31 days ago)")
    history.add_argument("--to", dest="last", type=_hour_argument, help="last hour (default: now)")
    history.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def _run_timer(config: Config) -> threading.Timer:
    """Stop the run at a safe point once RUN_TIMEOUT_MINUTES have passed, before the next
    run is due (exit 1: a run that needs so long is a problem to look at)."""
    reason = f"RUN_TIMEOUT_MINUTES ({config.run_timeout_minutes}) passed"
    timer = threading.Timer(config.run_timeout_minutes * 60, STOP.request,
                            (reason, ExitCode.FAILED))
    timer.daemon = True
    timer.start()
    return timer


def publish_run(config: Config | None, environ: Mapping[str, str], dry_run: bool | None,
                report: RunReport,
                state: DeploymentState | None, code: int, started: datetime,
                duration: float) -> None:
    """The one place a run's metrics are published: after it, from the stop's watchdog, and
    for a configuration refused (then only to targets that pass their own checks, and
    never when it may be a dry run: a one-off check must not replace the hourly run's)."""
    if config is not None:
        if config.dry_run or code == ExitCode.LOCKED:  # the run holding the lock publishes
            return
        targets = (config.metrics_file, config.pushgateway_url)
        deployment = deployment_name(config.state_path)
    else:
        targets = metrics_targets_despite_error(environ, dry_run)
        if targets is None:
            return
        deployment = deployment_name((environ.get("STATE_FILE_PATH") or "").strip()
                                     or "./metering_state.json")
        # A path from bytes that are not UTF-8 (refused above) is labelled with those bytes
        # escaped: no UTF-8 text can hold them as they are.
        deployment = deployment.encode("utf-8", "surrogateescape").decode("utf-8",
                                                                          "backslashreplace")
    text = render_metrics(config, report, state, code, started, duration, deployment)
    publish_metrics(*targets, deployment, text)


def command_run(config: Config, arguments: argparse.Namespace, environ: Environ) -> int:
    started, began, report = utc_now(), time.monotonic(), RunReport()

    def publish(code: int, state: DeploymentState | None) -> None:
        publish_run(config, environ, config.dry_run, report, state, code, started,
                    time.monotonic() - began)

    STOP.when_overdue(lambda: publish(STOP.exit_code, None))
    timer = _run_timer(config)
    try:
        code, state = export(config, s3_client(), report)
    except Exception:
        publish(ExitCode.FAILED, None)
        raise
    finally:
        timer.cancel()
    publish(code, state)
    return code


def command_status(config: Config, arguments: argparse.Namespace, environ: Environ) -> int:
    """Print where the deployment stands. Reads the state and the marker; takes no lock."""
    client = s3_client(1)
    store = open_state_store(config, client)
    state = store.load()
    source = ExportSource(client, config.bucket, config.max_export_file_bytes,
                          config.s3_timeout_seconds, 1)
    try:
        marker, marker_error = read_marker(source)
    finally:
        source.close()
    # Where it looked, as every command says it: an absolute path (a relative
    # STATE_FILE_PATH is resolved against the folder it runs in) or the S3 URL.
    status = {**deployment_status(config, state, marker, marker_error, utc_now()),
              "state": store.display}
    text = json.dumps(status, indent=2) if arguments.json else \
        format_status(status, config.export_stale_hours)
    print(mask_known_secrets(text))
    return ExitCode.OK


def command_retry_failed(config: Config, arguments: argparse.Namespace, environ: Environ) -> int:
    client = s3_client()
    store, ledger = open_state_store(config, client), open_ledger(config, client)
    announce(store, ledger)
    clazar = None if config.dry_run else ClazarClient(config)
    timer = _run_timer(config)
    try:
        with contextlib.nullcontext() if config.dry_run else store.locked(ledger):
            ledger.check()
            sender = None if clazar is None else Sender(clazar, RunReport())
            code, _ = retry_failed(config, store, store.load(), ledger, sender, arguments.contract,
                                   arguments.hour)
            return code
    finally:
        timer.cancel()
        if clazar is not None:
            clazar.close()


def command_conflicts(config: Config, arguments: argparse.Namespace, environ: Environ) -> int:
    """List the conflicts (read-only, no lock), or with --clear mark them resolved (with the
    lock). A dry run of --clear lists what it would clear and writes nothing."""
    client = s3_client(1)
    store, ledger = open_state_store(config, client), open_ledger(config, client)
    announce(store, ledger)
    if not arguments.clear or config.dry_run:
        found = list_waiting(store.load(), ledger, CONFLICT, arguments.contract, arguments.hour)
        if arguments.clear:
            log.info("Dry run: would clear the %d conflict(s) listed; nothing is written",
                     len(found))
        print(json.dumps([line.to_json() for line in found],
                         indent=2) if arguments.json else format_waiting(found))
        return ExitCode.OK
    with store.locked(ledger):
        ledger.check()
        clear_conflicts(store, store.load(), ledger, arguments.contract, arguments.hour)
    return ExitCode.OK


def command_history(config: Config, arguments: argparse.Namespace, environ: Environ) -> int:
    client = s3_client(1)
    ledger = open_ledger(config, client)
    announce(open_state_store(config, client), ledger)
    last = arguments.last or floor_hour(utc_now())
    first = arguments.first or floor_hour(last - timedelta(days=31)).replace(hour=0)
    lines = contract_history(ledger, arguments.contract, first, last)
    print(json.dumps([line.to_json() for line in lines],
                     indent=2) if arguments.json else format_history(lines))
    return ExitCode.OK


def command_reconcile(config: Config, arguments: argparse.Namespace, environ: Environ) -> int:
    if arguments.last < arguments.first:
        log.error("--to %s is before --from %s", format_time(arguments.last),
                  format_time(arguments.first))
        return ExitCode.CONFIG
    client = s3_client()
    store, ledger = open_state_store(config, client), open_ledger(config, client)
    announce(store, ledger)
    source = ExportSource(client, config.bucket, config.max_export_file_bytes,
                          config.s3_timeout_seconds)
    try:
        result = reconcile(config, HourReader(source, config.formulas), ledger, store.load(),
                           arguments.first,
                           arguments.last)
    finally:
        source.close()
    print(format_reconciliation(result, arguments.style))
    return ExitCode.FAILED if result["differences"] else ExitCode.OK


COMMANDS: dict[str, Callable[[Config, argparse.Namespace, Environ], int]] = {
    "run": command_run, "status": command_status, "retry-failed": command_retry_failed,
    "conflicts": command_conflicts, "history": command_history, "reconcile": command_reconcile,
}
SENDING_COMMANDS = ("run", "retry-failed")


def register_secrets(environ: Mapping[str, str], config: Config | None = None) -> None:
    """Mask every secret this run can see: the Clazar secret (as set, or from its file), the
    Pushgateway password, and the AWS secret key and session token, as set and trimmed.
    Access tokens are registered as they are received."""
    for name in ("CLAZAR_CLIENT_SECRET", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_SECURITY_TOKEN"):
        redact(environ.get(name))
    if config is not None:
        redact(config.client_secret)
        redact(urlsplit(config.pushgateway_url).password if config.pushgateway_url else None)


def run_command(arguments: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run one command: read the configuration, set up logging, and hand over. Expected
    failures end in their exit code with one line saying why; anything else is a defect,
    logged as one ERROR line (the traceback at DEBUG), never a traceback on screen."""
    command = arguments.command or "run"
    register_secrets(environ)
    try:
        config = load_config(environ, dry_run=arguments.dry_run, sends=command in SENDING_COMMANDS)
    except ConfigError as error:
        print("metering_processor: configuration error: "
              f"{escape_control(mask_known_secrets(str(error)))}",
              file=sys.stderr)
        if command == "run":
            publish_run(None, environ, arguments.dry_run, RunReport(), None, ExitCode.CONFIG,
                        utc_now(), 0.0)
        return ExitCode.CONFIG
    register_secrets(environ, config)
    STOP.deadline = config.stop_timeout_seconds
    # Reports go to stdout, so the log of a reporting command goes to stderr.
    configure_logging(config.log_level, config.log_format,
                      sys.stdout if command in SENDING_COMMANDS else sys.stderr)
    for warning in config.warnings:
        log.warning("%s", warning)
    try:
        return COMMANDS[command](config, arguments, environ)
    except MeteringError as error:
        (log.warning if isinstance(error, LockHeld) else log.error)("%s", error)
        return error.exit_code
    except Exception as error:  # a defect
        log.error("Unexpected %s: %s (a defect: please report it with the DEBUG log)",
                  type(error).__name__,
                  shown_text(mask_secrets(str(error)), 500))
        log.debug("Where it happened", exc_info=error)
        return ExitCode.FAILED


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command and return its exit code. The one entry point: it starts from a clean
    slate each time (a new stop flag and watchdog, no registered secret, its own log
    handler), so it may be called again in one process, and it leaves no thread of its
    own, and the signal handlers and log handlers as they were. SIGTERM and SIGINT are
    handled meanwhile (see StopRequest): the run stops at the next safe point."""
    global STOP
    STOP = StopRequest()
    forget_secrets()
    root = logging.getLogger()
    found = (root.handlers[:], root.level, log.level)
    STOP.install()
    try:
        return int(run_command(parse_arguments(argv), os.environ if environ is None else environ))
    except RunStopped as stop:
        # A signal is a routine stop; the run's own deadline (RUN_TIMEOUT_MINUTES) a failure.
        (log.warning if stop.exit_code == ExitCode.STOPPED else log.error)("%s", stop)
        return int(stop.exit_code)
    finally:
        STOP.retire()
        handlers, level, own_level = found
        root.handlers[:] = handlers
        root.setLevel(level)
        log.setLevel(own_level)


def script() -> None:
    """The program (``metering-processor``, ``python3 metering_processor.py``): main, then an
    exit. After a stop the process ends at once: everything worth keeping is written and the
    lock released, and a request or read left in flight must not hold up the exit, as
    joining its thread would."""
    code = main()
    if STOP.is_set():
        flush_output()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    script()
