"""A randomized soak of the whole exporter, with an oracle.

For each fixed seed, a sequence of steps against SeaweedFS and the Clazar stand-in.

The generator
-------------
* Data: three services (plans) and four contracts. Each hour, each contract has a file
  in any of the three services' folders, whether the deployment bills that service or
  not, its rows alike but for the file (so rows of two services collapse unless a row's
  identity includes its file). A file holds cpu_core_hours (quarters), memory_byte_hours
  (a JSON double of some GiB) and replica_hours (a JSON double, fixed for the file's
  life). The marker moves on, a service's entry lagging at times (it then holds the
  deployment). Some hours arrive empty and fill later; files of hours already billed are
  rewritten (more usage, less, back to an earlier content with the same bytes, a new
  content, deleted); a file is rewritten between the run's LIST of its hour and its GET,
  and the generator may then write the listed bytes back.
* Configuration, changed between runs: the formulas (none; memory_byte_hours /
  replica_hours / 1073741824 over the JSON doubles with cpu_core_hours / 3; or
  cpu_core_hours itself and memory in GiB), services added to and removed from SERVICES,
  the marketplace (CLAZAR_CLOUD, or =cloud on the SERVICES items, then with CLAZAR_CLOUD
  naming another; one marketplace for the whole deployment at a time),
  LATE_USAGE_LOOKBACK_HOURS up and down (0 included); for one run at a time, a
  MAX_RECORD_QUANTITY that bites (or none: the marketplace's own limit), or another
  marketplace while an hour is pending (set back after that run).
* Faults: Clazar answers with random 5xx, 429, hangs and answers lost before or after the
  records landed; runs are killed with SIGKILL at random moments or at exact steps
  (tests/faults/sitecustomize.py); with S3 state, the lease a killed run leaves makes the
  next run exit 3, and is then made to lapse.
* For certain, first (lookback one hour): an answer lost after landing, a clean hour, a
  batch with no usable answer, a kill as a batch's answer arrives; with that hour
  pending, another marketplace, then a limit below one of its records; then, in one run,
  the lookback raised and a third service added.
* Finally: every hour final at its largest content, no faults, clean runs; then no
  formulas and three more hours: the first empty when billed, its usage found late in the
  run of the second (empty too), which is billed with a limit of one unit (with
  LATE_USAGE=carry its records are what was carried in, cut to the limit, the rest carried
  on), the third with a limit that does not bite.

What an hour contributes (the rules the oracle follows)
-------------------------------------------------------
An hour is billed with the configuration of the run that first recorded it, as the
pending hour or committed (the test reads the state after every run, so it knows which
run that was): the services configured then, the formulas then, the marketplace then. So
a service removed stops contributing with the next hour computed (its later files are not
used); one added starts with the next hour computed, never with an hour already pending
(its earlier files are not used); a formula change makes the later hours bill other
dimensions, in other units, so each formula setting is compared on its own dimensions
(cpu_core_hours, the same unit under two settings, adds up across them). An hour's
amounts are, per (contract, dimension), the sum over those services of each service's
formula values (or raw values), rounded down to 10^-9: the oracle computes them with
Fractions from the JSON text the files hold. An hour's *largest content* is, file by
file, the largest value each field had while the exporter could look at the hour; since
replica_hours never changes, every formula here is largest there.

When the exporter stops looking at an hour: a late check compares an hour only while its
mark is kept (LATE_USAGE_LOOKBACK_HOURS after the last processed hour) and only under the
formulas and services it was billed with. So the generator (a) freezes an hour (leaves it
as it is) once the marker lets the deployment move it out of the lookback, first writing
it at its largest content: the next run that gets as far as its late check sees that,
because a run checks before it bills any new hour, and only a pending hour (which keeps
the frozen hour inside the lookback) is committed before; (b) before changing formulas,
removing a service or lowering the lookback, writes every hour still looked at at its
largest content and runs without faults until a run exits 0 with no pending hour (such a
run has checked every hour in its lookback), then freezes the hours the change ends the
checks of. A frozen hour whose mark the state no longer holds is retired: the exporter
never looks at it again (marks are only made when an hour is committed), so its files
are rewritten again, and those contents count for nothing.

The oracle
----------
After every run:
* the state reads back with the module's own reader (parse_state), and reads back as
  written (state_to_json of what it read equals the document);
* the hours recorded (committed, or pending) run from the first hour without a gap and
  never lose one; each newly recorded hour was final for every configured service and
  names the configured services with their marketplace;
* every record Clazar received during the run is within the run's per-record limit (the
  limit holds on every send, resends included); an hour computed in the run is refused
  for the limit only if its own usage is above it (what was carried in is cut);
* a run that finds a pending hour the configuration refuses (another marketplace for a
  service it was read from, a record above the limit) makes no metering call, leaves the
  pending hour as it was, and fails (exit 1) saying why;
* a run that meets a lease changes nothing and sends nothing (exit 3);
* the late-usage marks: every committed hour the exporter still looks at has one; once a
  run exits 0, none is left in the lookback for an hour billed with other formulas or
  services; once a run commits an hour, none is left beyond the lookback; each lies
  between the amounts the hour was billed on and those of its largest content;
* an hour read across a rewrite between LIST and GET is identified by what was read:
  its pending hour or mark holds the digest of the files as they are now;
* a raised lookback names, before the next run exits 0, the processed hours whose marks
  were not kept; "Service X is new to this deployment: it starts with hour H" names the
  first hour billed with X's usage.
At the end:
* every request met the stand-in's format; every attempt at a (contract, dimension, hour)
  carried one quantity; no ledger line is a conflict or a rejection, none waits; Clazar
  accepted exactly the records the ledger says were delivered, with those quantities, so
  none twice; each record of a contract with usage in its hour carries that hour's
  marketplace;
* each hour was billed on the content the run that recorded it read: the ledger's first
  amounts equal the oracle's amounts of that content (the content at that run's start, or
  the one written between LIST and GET);
* each late-usage check of an hour, as the ledger has it, compares with the high-water
  mark so far, and shows a content the hour really had; in report mode nothing is
  carried, in carry mode every increase is;
* each hour's high-water mark (its first amounts raised by every later find, as
  reconcile reads the ledger) equals the amounts of its largest content: the exporter saw
  every hour at its largest, through every configuration change;
* per (contract, dimension) across the deployment: billed + the remainder the state still
  carries = used, exactly, and 0 <= remainder < 1, so billed <= used and billed >= used - 1.
  "Used" is the sum over hours of their largest content's amounts (LATE_USAGE=carry) or
  of what each hour's committed read showed (report). Exact because every amount is
  already rounded to 10^-9 and carrying only moves whole units out of remainders; every
  remainder is billable at the end because the last hour is billed without formulas (all
  dimensions) and with a limit that does not bite;
* the same files in any order give the same amounts: each hour's files, folded into an
  hour's usage in three shuffled orders, give the same billable amounts under each of the
  three formula settings, the oracle's.

Not claimed: the marketplace of a record billed only from a carried remainder (it keeps
the contract's marketplace from when it was carried); two subscription files of one
contract in one service's folder (tests/test_units.py and tests/test_deployment.py have
them; here they would make the dividing formula shrink as a file appears).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import signal
import threading
import time
from datetime import timedelta
from fractions import Fraction

import botocore.client
import metering_processor as mp
import pytest
from clazar_standin import hang, no_results, reset_after_landing, short_results, status
from conftest import SERVICE
from export_data import GIB, hour_prefix, iso, record, service_key, write_file, write_marker

SERVICES = (SERVICE, ("Acme Vector DB", "PROD", "pt-Z3mW8vN1cR"), ("Acme Search", "PROD", "pt-H5jK9dL2sF"))
KEYS = tuple(service_key(service) for service in SERVICES)
CONTRACTS = ("c-1", "c-2", "c-3", "c-4")
HOURS = 10  # hours of data in play; three more are added at the end
ALL_HOURS = HOURS + 3
BIG = 2**63 - 1
CLOUDS = ("aws", "azure", "gcp")
REGIMES = {
    "raw": {},
    "per-replica": {"DIMENSION1_NAME": "memory_gib_per_replica",
                    "DIMENSION1_FORMULA": "memory_byte_hours / replica_hours / 1073741824",
                    "DIMENSION2_NAME": "cpu_thirds", "DIMENSION2_FORMULA": "cpu_core_hours / 3"},
    "gib": {"DIMENSION1_NAME": "cpu_core_hours", "DIMENSION1_FORMULA": "cpu_core_hours",
            "DIMENSION2_NAME": "memory_gib_hours", "DIMENSION2_FORMULA": "memory_byte_hours / 1073741824"},
}
FORMULA_VARIABLES = ("DIMENSION1_NAME", "DIMENSION1_FORMULA", "DIMENSION2_NAME", "DIMENSION2_FORMULA")
LOOKBACKS = (0, 1, 2, 3, 6, 24)
# Events the steps bring, each at least once per seed.
EVENTS = ("formulas", "add service", "remove service", "lookback down", "lookback up", "cloud",
          "limit", "suffixes")


def exact(value: float) -> Fraction:
    """A JSON double as the exporter reads it: the exact value of the text json writes."""
    return Fraction(repr(value))


def floor9(value: Fraction) -> Fraction:
    return Fraction(math.floor(value * 10**9), 10**9)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The configuration of one run."""

    services: tuple[int, ...] = (0, 1)
    cloud: str = "aws"
    suffixed: frozenset = frozenset()  # services whose SERVICES item ends in =cloud
    regime: str = "raw"
    lookback: int = 24
    limit: int | None = BIG  # None: MAX_RECORD_QUANTITY unset, each marketplace's own

    def env(self) -> dict:
        items = [KEYS[s] + (f"={self.cloud}" if s in self.suffixed else "") for s in self.services]
        everyone_suffixed = all(s in self.suffixed for s in self.services)
        # With every item suffixed, CLAZAR_CLOUD names another marketplace: the items win.
        default = CLOUDS[(CLOUDS.index(self.cloud) + 1) % 3] if everyone_suffixed else self.cloud
        env = {"SERVICES": ",".join(items), "CLAZAR_CLOUD": default, "SERVICE_NAME": None,
               "ENVIRONMENT_TYPE": None, "PLAN_ID": None,
               "LATE_USAGE_LOOKBACK_HOURS": str(self.lookback),
               "MAX_RECORD_QUANTITY": None if self.limit is None else str(self.limit)}
        env.update({name: REGIMES[self.regime].get(name) for name in FORMULA_VARIABLES})
        return env

    def limit_of(self, cloud: str) -> int | None:
        return self.limit if self.limit is not None else mp.RECORD_QUANTITY_LIMITS[cloud]

    @property
    def keys(self) -> dict[str, str]:
        return {KEYS[s]: self.cloud for s in self.services}


@dataclasses.dataclass(frozen=True)
class Recorded:
    """How an hour was first recorded: the run's configuration and the content it read."""

    run: int
    setup: Setup
    read: int  # index into the hour's contents


class Soak:
    """The scenario's memory: every content each hour has had, how each hour was recorded,
    which hours the exporter may no longer look at, and what each run did."""

    def __init__(self, harness, hours, seed: int, mode: str):
        self.harness = harness
        self.hours = hours
        self.mode = mode
        self.random = random.Random(seed)
        self.faults = random.Random(seed * 7919)
        self.fault_rate = 0.0
        harness.clazar.chaos = self.chaos
        self.setup = Setup()
        # Per hour, every content it had: {(service, contract): (cpu, memory)}.
        self.contents: list[list[dict]] = [[] for _ in range(ALL_HOURS)]
        self.replicas: dict[tuple, float] = {}
        self.final = 0  # hours 0 .. final-1 are final (less a service's lag)
        self.lags = [0, 0, 0]
        self.marker: dict[int, int] = {}
        # Hours the generator no longer rewrites, with how many contents they had then: the
        # exporter may stop looking at them at any run. Once it has (their mark is gone from
        # the state), they are retired: their files change again, and must not count.
        self.frozen: dict[int, int] = {}
        self.retired: set[int] = set()
        self.recorded: dict[int, Recorded] = {}
        self.runs = 0
        self.outcomes: list[int] = []
        self.hooked: dict[int, int] = {}  # hour -> content written between LIST and GET, this run
        self.restore: tuple | None = None  # (hour, file, content) the LIST saw, to write back
        self.state: mp.DeploymentState = mp.DeploymentState()
        self.state_body: bytes | None = None
        self.new_service_lines: list[tuple[int, str, str]] = []  # (run, service key, hour named)
        self.unchecked_warning: str | None = None  # expected once the lookback was raised
        self.base_env = {"START_HOUR": iso(hours[0]), "LATE_USAGE": mode, "CLAZAR_BATCH_SIZE": "2",
                         "CLAZAR_MAX_RETRIES": "2", "CLAZAR_TIMEOUT_SECONDS": "1"}
        # A marker from the start: without one, every closed hour up to now would be due.
        self.write_marker()

    # --- the data ---------------------------------------------------------------------------

    def index(self, hour) -> int:
        return round((hour - self.hours[0]) / timedelta(hours=1))

    def current(self, index: int) -> dict:
        return self.contents[index][-1] if self.contents[index] else {}

    def created(self) -> list[int]:
        return [index for index in range(ALL_HOURS) if self.contents[index]]

    def values(self) -> tuple[float, float]:
        return self.random.randint(0, 40) / 4, self.random.uniform(0, 4) * GIB

    def write(self, index: int, content: dict) -> None:
        """Make ``content`` the hour's files: changed files written, absent ones deleted."""
        hour, before = self.hours[index], self.current(index)
        for (s, contract) in sorted(set(before) | set(content)):
            subscription = f"sub-{contract}"
            if (s, contract) not in content:
                key = f"{hour_prefix(SERVICES[s], hour)}{subscription}.json"
                self.harness.s3.delete_object(Bucket=self.harness.bucket, Key=key)
            elif before.get((s, contract)) != content[(s, contract)]:
                cpu, memory = content[(s, contract)]
                if (index, s, contract) not in self.replicas:  # fixed for the file's life
                    self.replicas[index, s, contract] = self.random.uniform(0.25, 2.0)
                replicas = self.replicas[index, s, contract]
                rows = [record(SERVICES[s], hour, contract=contract, subscription=subscription,
                               dimension=dimension, value=value)
                        for dimension, value in (("cpu_core_hours", cpu), ("memory_byte_hours", memory),
                                                 ("replica_hours", replicas))]
                write_file(self.harness.s3, self.harness.bucket, SERVICES[s], hour, subscription, rows)
        self.contents[index].append(dict(content))

    def create(self, index: int) -> None:
        # Some hours arrive late as a whole: empty when they become final.
        content = {}
        if self.random.random() >= 0.2:
            for contract in CONTRACTS:
                if self.random.random() < 0.8:
                    for s in self.random.sample(range(3), self.random.randint(1, 3)):
                        content[(s, contract)] = self.values()
        self.write(index, content)

    def changed_file(self, index: int, file: tuple, deleting: bool = True, less: float = 0.2):
        """A new content for one file of an hour: more, less, an earlier one, a new one, none."""
        now = self.current(index).get(file)
        earlier = [content[file] for content in self.contents[index] if file in content and content[file] != now]
        how = "less" if self.random.random() < less else \
            self.random.choice(("more", "more", "earlier", "new") + (("none",) if deleting else ()))
        if how == "more" and now is not None:
            cpu, memory = self.values()
            return now[0] + cpu, now[1] + memory / 2
        if how == "less" and now is not None:
            return now[0] * self.random.randint(0, 3) / 4, now[1] * self.random.randint(0, 3) / 4
        if how == "earlier" and earlier:
            return self.random.choice(earlier)
        if how == "none" and now is not None:
            return None
        return self.values()

    def rewrite(self) -> None:
        """Rewrite one file of an hour the exporter still looks at (or has not read yet), or
        of an hour it no longer looks at."""
        if self.restore is not None and self.restore[0] not in self.frozen and self.random.random() < 0.8:
            index, file, content = self.restore  # back to the bytes the LIST saw
        else:
            candidates = [index for index in self.created() if index not in self.frozen]
            if self.retired and (not candidates or self.random.random() < 0.25):
                candidates = sorted(self.retired)
            if not candidates:
                return
            index = self.random.choice(candidates)
            file = (self.random.randrange(3), self.random.choice(CONTRACTS))
            content = self.changed_file(index, file)
        self.restore = None
        changed = dict(self.current(index))
        if content is None:
            changed.pop(file, None)
        else:
            changed[file] = content
        self.write(index, changed)

    def seen(self, index: int) -> list[dict]:
        """The contents of an hour the exporter may have read: all of them, or those it had
        when frozen (it was not rewritten again until the exporter stopped looking)."""
        return self.contents[index][:self.frozen.get(index)]

    def largest(self, index: int) -> dict:
        """The hour's largest content: each file at the largest value each of its fields had."""
        largest: dict = {}
        for content in self.seen(index):
            for file, (cpu, memory) in content.items():
                before = largest.get(file, (0.0, 0.0))
                largest[file] = (max(before[0], cpu), max(before[1], memory))
        return largest

    def at_largest(self, index: int) -> None:
        if self.current(index) != self.largest(index):
            self.write(index, self.largest(index))

    def amounts(self, index: int, content: dict, setup: Setup) -> dict:
        """What the exporter bills for a content of an hour under ``setup``: per (contract,
        dimension), the sum over the configured services of each service's (formula)
        values, rounded down to 10^-9; zero amounts left out."""
        totals: dict = {}
        for (s, contract), (cpu, memory) in content.items():
            if s not in setup.services:
                continue
            cpu, memory, replicas = exact(cpu), exact(memory), exact(self.replicas[(index, s, contract)])
            if setup.regime == "raw":
                parts = {"cpu_core_hours": cpu, "memory_byte_hours": memory, "replica_hours": replicas}
            elif setup.regime == "per-replica":
                parts = {"memory_gib_per_replica": memory / replicas / GIB, "cpu_thirds": cpu / 3}
            else:
                parts = {"cpu_core_hours": cpu, "memory_gib_hours": memory / GIB}
            for dimension, value in parts.items():
                totals[contract, dimension] = totals.get((contract, dimension), 0) + value
        return {key: floor9(value) for key, value in totals.items() if floor9(value)}

    def write_marker(self) -> None:
        self.marker = {s: max(0, self.final - self.lags[s]) for s in range(3)}
        write_marker(self.harness.s3, self.harness.bucket,
                     {KEYS[s]: self.hours.final(self.marker[s]) for s in range(3)})

    def advance(self, count: int) -> None:
        """Make ``count`` more hours final, then freeze (at their largest content) the hours
        the deployment could now move out of the lookback before looking at them again."""
        for _ in range(count):
            if self.final < HOURS:
                self.create(self.final)
                self.final += 1
        self.freeze(range(self.final - self.setup.lookback))

    def freeze(self, indexes) -> None:
        for index in indexes:
            if index not in self.frozen and self.contents[index]:
                self.at_largest(index)
                self.frozen[index] = len(self.contents[index])

    # --- faults and runs --------------------------------------------------------------------

    def chaos(self):
        """A fault for one metering call, or None. Answers lost after the records landed come
        most often: they are where a resend or a retry meets "already exists", which must never
        be taken for a conflict. (Called from the stand-in's threads: its own random source.)"""
        if self.faults.random() >= self.fault_rate:
            return None
        if self.faults.random() < 0.5:
            return reset_after_landing()
        return self.faults.choice((status(500), status(503), status(429, "0"), no_results(land=True),
                                   no_results(land=False), short_results(), hang(1.5)))

    def clazar_threads(self) -> set:
        """The stand-in's threads that serve one connection each."""
        server = self.harness.clazar.server
        return {thread for thread in threading.enumerate()
                if getattr(getattr(thread, "_target", None), "__self__", None) is server
                and getattr(thread._target, "__name__", "") == "process_request_thread"}

    def quiet_clazar(self, before: set) -> None:
        """Wait until the stand-in has finished with every connection a killed run opened (a
        request sent whole lands even if its sender is dead; the dead sender's connections
        end once answered), so that what it received so far is this run's and earlier runs'."""
        deadline = time.monotonic() + 30
        while any(thread.is_alive() for thread in self.clazar_threads() - before):
            assert time.monotonic() < deadline, "the stand-in is still answering a dead run"
            time.sleep(0.02)

    def hook_for(self, index: int):
        """A file of hour ``index`` that the run reads, and the content it will find there
        instead of the one listed (None: deleted in between), or None."""
        files = sorted(file for file in self.current(index) if file[0] in self.setup.services)
        if not files:
            return None
        file = self.random.choice(files)
        return index, file, self.changed_file(index, file, deleting=self.random.random() < 0.1, less=0.5)

    @contextlib.contextmanager
    def rewriting_between_list_and_get(self, hook):
        """During an in-process run: as the first file of the hook's hour is fetched (after
        the hour was listed), the hook's file is rewritten; its own GET comes after."""
        if hook is None:
            yield
            return
        index, file, content = hook
        prefixes = tuple(hour_prefix(service, self.hours[index]) for service in SERVICES)
        original = botocore.client.BaseClient._make_api_call
        lock, soak = threading.Lock(), self

        def make_api_call(client, operation, params):
            key = params.get("Key", "") if operation == "GetObject" else ""
            if key.startswith(prefixes) and index not in soak.hooked:
                with lock:
                    if index not in soak.hooked:
                        soak.rewrite_on_read(index, file, content)
            return original(client, operation, params)

        botocore.client.BaseClient._make_api_call = make_api_call
        try:
            yield
        finally:
            botocore.client.BaseClient._make_api_call = original

    def rewrite_on_read(self, index: int, file: tuple, content) -> None:
        listed = self.current(index)[file]
        changed = dict(self.current(index))
        if content is None:
            changed.pop(file)
        else:
            changed[file] = content
        self.write(index, changed)
        self.hooked[index] = len(self.contents[index]) - 1
        self.restore = (index, file, listed)  # for the generator to write the listed bytes back, maybe

    def refusal(self, setup: Setup) -> str | None:
        """Why ``setup`` must refuse the pending hour, or None."""
        pending = self.state.pending
        if pending is None:
            return None
        for key, cloud in pending.services.items():
            if key in setup.keys and setup.keys[key] != cloud:
                return "which is now configured as"
        for sent in pending.records:
            limit = setup.limit_of(sent["cloud"])
            if limit is not None and int(sent["quantity"]) > limit:
                return "(MAX_RECORD_QUANTITY)"
        return None

    def run(self, setup: Setup | None = None, kind: str = "in-process", faults: dict | None = None,
            max_hours: int | None = None, hook: tuple | None = None, patient: bool = False) -> int:
        """One run; ``patient``: no fault is meant to fail it, so Clazar's answers are waited for
        longer than in the steps (1 s, which a hanging answer outlasts), lest a loaded machine fail it."""
        harness, clazar = self.harness, self.harness.clazar
        setup = setup or self.setup
        env = {**self.base_env, **setup.env(),
               "MAX_HOURS_PER_RUN": None if max_hours is None else str(max_hours),
               **({"CLAZAR_TIMEOUT_SECONDS": "5"} if patient else {})}
        start = {index: len(self.contents[index]) - 1 for index in self.created()}
        refusal = self.refusal(setup)
        calls, received = clazar.metering_calls, len(clazar.received)
        self.hooked, self.restore = {}, None
        self.runs += 1
        serving = self.clazar_threads()
        if kind == "in-process":
            with self.rewriting_between_list_and_get(hook):
                result = harness.run(env=env)
            code, output = result.returncode, result.output
        elif kind == "kill at a step":
            result = harness.run(env=env, faults=faults)
            code, output = result.returncode, result.output
        else:
            process = harness.popen(env=env)
            time.sleep(self.random.uniform(0.5, 2.0))
            process.send_signal(signal.SIGKILL)
            output, _ = process.communicate(timeout=60)
            code = process.returncode
        if kind != "in-process":
            self.quiet_clazar(serving)
        assert code in (0, 1, 3, -9), output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        self.outcomes.append(code)
        self.observe(setup, start, code, output, calls, received, refusal)
        if code == 3:
            harness.expire_lease()  # a killed run's S3 lease, made to lapse now
        return code

    def observe(self, setup: Setup, start: dict, code: int, output: str, calls: int, received: int,
                refusal: str | None) -> None:
        """The checks made after every run (see the module docstring)."""
        clazar, before = self.harness.clazar, self.state
        body = self.harness.state_bytes()
        if code == 3:
            assert body == self.state_body and clazar.metering_calls == calls, output[-3000:]
            return
        if body is None:
            assert self.state_body is None, "the state disappeared"
            state = mp.DeploymentState()
        else:
            state = mp.parse_state(body, "after run")  # the module's own reader
            assert mp.state_to_json(state) == json.loads(body), "the state does not read back as written"
        for sent, _ in clazar.received[received:]:
            limit = setup.limit_of(sent["cloud"])
            assert limit is None or int(sent["quantity"]) <= limit, (sent, setup, output[-3000:])
        if refusal is not None:
            assert clazar.metering_calls == calls, (refusal, output[-3000:])
            assert state.pending == before.pending, refusal
            assert code in (1, -9), output[-3000:]
            if code == 1:
                assert refusal in output and "nothing of" in output, (refusal, output[-3000:])
        last = -1 if state.last_processed_hour is None else self.index(state.last_processed_hour)
        pending = None if state.pending is None else self.index(state.pending.hour)
        now = set(range(last + 1)) | ({pending} if pending is not None else set())
        assert now == set(range(len(now))), ("hours recorded with a gap", sorted(now))
        assert set(self.recorded) <= now, ("a recorded hour was lost", sorted(self.recorded), sorted(now))
        for index in sorted(now - set(self.recorded)):
            assert all(index < self.marker[s] for s in setup.services), (index, self.marker, setup)
            self.recorded[index] = Recorded(self.runs, setup, self.hooked.get(index, start[index]))
            if index == pending:
                assert dict(state.pending.services) == setup.keys, (state.pending.services, setup)
            elif self.hours[index] in state.accounted:
                assert set(state.accounted[self.hours[index]].services) == set(setup.keys)
        self.check_marks(setup, state, code, before)
        for index in self.hooked:
            # The hour's identity is what was read (the GET's), not what was listed.
            hour, how = self.hours[index], self.recorded.get(index)
            if state.pending is not None and state.pending.hour == hour and how.run == self.runs:
                assert state.pending.sources == self.digest(index, how.setup), index
            elif hour in state.accounted and code == 0:
                assert state.accounted[hour].sources == self.digest(index, how.setup), index
        if self.unchecked_warning is not None:
            if self.unchecked_warning in output:
                self.unchecked_warning = None
            else:
                assert code != 0, ("a raised lookback's unchecked hours were not named", output[-3000:])
        for found in re.finditer(r"contract (\S+) dimension (\S+) hour (\S+) has quantity (\d+), above the (\d+) one",
                                 output):
            # An hour computed now is refused for the limit only if its own usage is above it:
            # what was carried in is cut to the limit and the rest carried on.
            contract, dimension, start_time, _, limit = found.groups()
            index = self.index(mp.parse_hour(start_time))
            if before.pending is None or before.pending.hour != self.hours[index]:
                read = self.amounts(index, self.contents[index][self.hooked.get(index, start[index])], setup)
                assert math.floor(read.get((contract, dimension), 0)) > int(limit), (found.group(0), read)
        for line in output.splitlines():
            if "is new to this deployment: it starts with hour" in line:
                key = line.split("Service ", 1)[1].split(" is new")[0]
                self.new_service_lines.append((self.runs, key, line.rsplit("hour ", 1)[1].split(";")[0]))
        self.state, self.state_body = state, body

    def check_marks(self, setup: Setup, state: mp.DeploymentState, code: int,
                    before: mp.DeploymentState) -> None:
        """The late-usage marks after a run: kept for every committed hour the exporter still
        looks at; gone, once a run exited 0 (so checked), for those in the lookback billed
        with other formulas or services; none beyond the lookback once the run committed an
        hour; each between the amounts the hour was billed on and those of its largest
        content. A frozen hour whose mark is gone is retired."""
        last = state.last_processed_hour
        marks = {self.index(hour): mark for hour, mark in state.accounted.items()}
        for index, how in self.recorded.items():
            if last is None or self.hours[index] > last:
                continue  # pending
            if index not in self.frozen:
                assert index in marks, ("an hour still looked at has no mark", index, sorted(marks), setup)
            if index in marks:
                mark = {key: value for key, value in marks[index].amounts.items() if value}
                read = self.amounts(index, self.contents[index][how.read], how.setup)
                largest = self.amounts(index, self.largest(index), how.setup)
                for key in set(mark) | set(read) | set(largest):
                    assert read.get(key, 0) <= mark.get(key, 0) <= largest.get(key, 0), \
                        (index, key, mark, read, largest)
            elif index in self.frozen:
                self.retired.add(index)
            other = how.setup.regime != setup.regime or not set(how.setup.services) <= set(setup.services)
            if other and code == 0 and setup.lookback and index > self.index(last) - setup.lookback:
                assert index not in marks, ("an hour billed with other formulas or services is still "
                                            "checked", index, how.setup, setup)
        if last is not None and last != before.last_processed_hour:
            assert all(index > self.index(last) - setup.lookback for index in marks), \
                ("marks kept beyond the lookback", sorted(marks), self.index(last), setup.lookback)

    def digest(self, index: int, setup: Setup) -> str:
        """The identity of an hour's files as they are now (keys and ETags)."""
        harness, files = self.harness, []
        for s in setup.services:
            prefix = hour_prefix(SERVICES[s], self.hours[index])
            listing = harness.s3.list_objects_v2(Bucket=harness.bucket, Prefix=prefix)
            files += [(item["Key"], str(item["ETag"])) for item in listing.get("Contents", ())]
        return mp.hour_digest(files)

    def settle(self, last: int | None = None) -> None:
        """Every hour still looked at written at its largest content, then runs without faults
        until one exits 0 with no pending hour (and, if given, ``last`` processed)."""
        self.fault_rate = 0.0
        for index in self.created():
            if index not in self.frozen:
                self.at_largest(index)
        for _ in range(10):
            code = self.run(patient=True)
            assert code in (0, 3), self.outcomes
            state = self.state
            done = last is None or state.last_processed_hour == self.hours[last]
            if code == 0 and state.pending is None and done:
                return
        raise AssertionError(f"the clean runs did not finish: {self.state}")

    # --- the steps ---------------------------------------------------------------------------

    def change(self, event: str) -> Setup | None:
        """Apply a configuration change. Returns a setup for the next run alone, if the event
        is a one-run episode."""
        setup, pick = self.setup, self.random
        if event == "formulas":
            self.settle()
            self.freeze(self.recorded)
            self.setup = dataclasses.replace(setup, regime=pick.choice([r for r in REGIMES if r != setup.regime]))
        elif event == "add service":
            missing = [s for s in range(3) if s not in setup.services]
            if missing:
                self.setup = dataclasses.replace(setup, services=(*setup.services, pick.choice(missing)))
        elif event == "remove service":
            if len(setup.services) > 1:
                gone = pick.choice(setup.services)
                self.settle()
                self.freeze(index for index, how in self.recorded.items() if gone in how.setup.services)
                self.setup = dataclasses.replace(setup, services=tuple(s for s in setup.services if s != gone))
        elif event in ("lookback down", "lookback up"):
            choices = [value for value in LOOKBACKS if (value < setup.lookback) == (event == "lookback down")
                       and value != setup.lookback]
            if choices:
                lookback = pick.choice(choices[-3:] if event == "lookback down" else choices)
                if lookback < setup.lookback:
                    self.settle()
                self.setup = dataclasses.replace(setup, lookback=lookback)
                self.freeze(range(self.final - lookback))
                self.unchecked_warning = None
                state = self.state
                if state.last_processed_hour is not None and lookback > state.marks_hours:
                    # Processed hours the raised lookback covers but whose marks were not kept:
                    # named in a warning (never a silent end to late-usage tracking).
                    first = max(state.last_processed_hour - (lookback - 1) * mp.HOUR, state.first_hour)
                    if first <= state.last_processed_hour - state.marks_hours * mp.HOUR:
                        self.unchecked_warning = f"LATE_USAGE_LOOKBACK_HOURS is now {lookback}, but"
        elif event == "suffixes":
            everyone = pick.random() < 0.5
            self.setup = dataclasses.replace(setup, suffixed=frozenset(s for s in range(3) if everyone or pick.random() < 0.5))
        elif event == "cloud":
            switched = dataclasses.replace(setup, cloud=pick.choice([c for c in CLOUDS if c != setup.cloud]))
            if self.refusal(switched) is not None:
                return switched  # refused while the hour is pending: switched back after the run
            self.setup = switched
        elif event == "limit":
            quantities = [int(sent["quantity"]) for sent in self.state.pending.records] if self.state.pending else []
            limits = [None, pick.randint(3, 12)] + ([max(quantities) - 1] if quantities and max(quantities) > 1 else [])
            cutting = self.cutting_limit()
            return dataclasses.replace(setup, limit=cutting[0] if cutting and pick.random() < 0.7
                                       else pick.choice(limits))
        return None

    def cutting_limit(self) -> list[int]:
        """A limit no record of the next hour reaches by its own usage, but one reaches with
        what is carried in (which is then cut to the limit), if there is one."""
        state, index = self.state, len(self.recorded)
        if state.pending is not None or index >= self.final or not self.contents[index]:
            return []
        amounts = self.amounts(index, self.current(index), self.setup)
        limit = max([math.floor(value) for value in amounts.values()] + [1])
        carried = [key for key, value in state.remainders.items()
                   if key[1] in self.dimensions() and math.floor(amounts.get(key, 0) + value) > limit]
        return [limit] if carried else []

    def dimensions(self) -> set[str]:
        regime = REGIMES[self.setup.regime]
        return {regime[name] for name in ("DIMENSION1_NAME", "DIMENSION2_NAME")} if regime else \
            {"cpu_core_hours", "memory_byte_hours", "replica_hours"}

    def step(self, events: list[str]) -> None:
        episode = None
        # The episodes of one run (another marketplace, a limit) after the lasting changes.
        for event in sorted(events, key=lambda event: event in ("cloud", "limit")):
            episode = self.change(event) or episode
        if self.final < HOURS and self.random.random() < 0.6:
            self.advance(self.random.randint(1, 2))
        self.lags = [self.random.choice((0, 0, 0, 0, 1, 2)) for _ in range(3)]
        self.write_marker()
        for _ in range(self.random.choice((0, 1, 1, 2))):
            self.rewrite()
        self.fault_rate = self.random.choice((0.0, 0.3, 0.6))
        choice = self.random.random()
        if choice < 0.2:
            fault = self.random.choice(("FAULT_KILL_BEFORE_STATE_WRITE", "FAULT_KILL_AFTER_STATE_WRITE",
                                        "FAULT_KILL_AFTER_BATCH"))
            self.run(episode, "kill at a step", faults={fault: str(self.random.randint(1, 4))})
        elif choice < 0.35:
            self.run(episode, "killed")
        else:
            hook = None
            candidates = [index for index in self.created() if index not in self.frozen]
            if candidates and self.random.random() < 0.4:
                unread = [index for index in candidates if index not in self.recorded]
                hook = self.hook_for(unread[0] if unread and self.random.random() < 0.5
                                     else self.random.choice(candidates))
            self.run(episode, max_hours=self.random.randint(1, 3), hook=hook)

    def finish(self) -> None:
        """Every hour final at its largest content, no more faults, clean runs; then no
        formulas, and three more hours, the first filling once billed, the second billed with
        a limit of one unit; clean runs to the end."""
        self.lags = [0, 0, 0]
        self.setup = dataclasses.replace(self.setup, limit=BIG)
        while self.final < HOURS:
            self.advance(1)
        self.write_marker()
        self.settle(last=HOURS - 1)
        self.freeze(range(HOURS))
        self.setup = dataclasses.replace(self.setup, regime="raw")
        if not self.setup.lookback:
            self.change("lookback up")
        # An empty hour, billed; then its usage arrives late, found in the run of the next
        # hour, empty too. With LATE_USAGE=carry, that hour's records are only what was
        # carried in: with a limit of one unit, each is cut to one and the rest carried on
        # to a last empty hour, billed with no limit that bites.
        self.write(HOURS, {})
        self.final = HOURS + 1
        self.freeze(range(self.final - self.setup.lookback))
        self.write_marker()
        self.settle(last=HOURS)
        assert HOURS not in self.frozen
        self.write(HOURS, {(self.setup.services[0], "c-1"): (2.25, 1.5 * GIB)})
        self.write(HOURS + 1, {})
        self.final = HOURS + 2
        self.freeze(range(self.final - self.setup.lookback))
        self.write_marker()
        assert self.run(dataclasses.replace(self.setup, limit=1), patient=True) == 0, self.outcomes
        assert self.state.last_processed_hour == self.hours[HOURS + 1]
        self.write(HOURS + 2, {})
        self.final = HOURS + 3
        self.freeze(range(self.final - self.setup.lookback))
        self.write_marker()
        self.settle(last=HOURS + 2)


def ledger(harness) -> dict[int, list]:
    """Every ledger line, read with the module's own reader, by hour."""
    lines: dict = {}
    for data in harness.ledger_lines():
        line = mp.ledger_line(data)
        lines.setdefault(line.hour, []).append(line)
    return lines


def check_order_does_not_matter(soak: Soak, random_order: random.Random) -> None:
    """Each hour's files, folded into one hour's usage in shuffled orders, give the same
    billable amounts, and those are the oracle's."""
    harness = soak.harness
    for index in range(HOURS):
        hour = soak.hours[index]
        files = []
        for s, service in enumerate(SERVICES):
            prefix = hour_prefix(service, hour)
            for item in harness.s3.list_objects_v2(Bucket=harness.bucket, Prefix=prefix).get("Contents", ()):
                body = harness.s3.get_object(Bucket=harness.bucket, Key=item["Key"])["Body"].read()
                files.append((KEYS[s], item["Key"], body))
        services = tuple(mp.ServiceKey(*service) for service in SERVICES)
        for regime in REGIMES:
            formulas = mp.load_formulas(REGIMES[regime])
            found = []
            for _ in range(3):
                random_order.shuffle(files)
                usage = mp.HourUsage(hour, services)
                for key, name, body in files:
                    usage.add(key, mp.parse_export_file(name, body))
                amounts, _ = mp.billable_amounts(usage, formulas, dict.fromkeys(KEYS, "aws"))
                found.append({key: value for key, value in amounts.items() if value})
            expected = soak.amounts(index, soak.current(index), Setup(services=(0, 1, 2), regime=regime))
            assert found == [expected] * 3, (index, regime)


def check(soak: Soak) -> None:
    harness, clazar, mode = soak.harness, soak.harness.clazar, soak.mode
    assert clazar.violations == []
    state = soak.state
    assert state.pending is None and not state.waiting and not state.owed_ledger, state
    assert state.last_processed_hour == soak.hours[ALL_HOURS - 1]

    # Every attempt at a record carried one quantity, however often tried.
    quantities: dict[tuple, set] = {}
    for sent, _ in clazar.received:
        quantities.setdefault((sent["contract_id"], sent["dimension"], sent["start_time"]), set()).add(sent["quantity"])
    assert all(len(found) == 1 for found in quantities.values()), quantities

    # The ledger: every record delivered, none in conflict or rejected, ever; Clazar accepted
    # exactly those records, with those quantities; each with its hour's marketplace.
    lines = ledger(harness)
    delivered = {}
    for hour, found in lines.items():
        assert not mp.waiting_records(found), (hour, mp.waiting_records(found))
        for line in found:
            if isinstance(line, mp.RecordLine):
                assert line.outcome not in (mp.CONFLICT, mp.REJECTED), line
        for key, line in mp.latest_records(found).items():
            if line.quantity:
                assert line.outcome in mp.ACCEPTED_OUTCOMES, line
                delivered[(*key, iso(hour))] = line.quantity
    assert delivered == clazar.accepted_quantities()
    for (contract, _, start), accepted in clazar.accepted.items():
        index = soak.index(mp.parse_hour(start))
        recorded = soak.recorded[index]
        read = soak.amounts(index, soak.contents[index][recorded.read], recorded.setup)
        if any(key[0] == contract for key in read):
            assert accepted["cloud"] == recorded.setup.cloud, (accepted, recorded.setup)

    # Each hour: billed on the content the recording run read; every late check saw a content
    # it had; its high-water mark is its largest content.
    used_largest: dict = {}
    used_read: dict = {}
    for index in range(ALL_HOURS):
        recorded = soak.recorded[index]
        hour, setup = soak.hours[index], recorded.setup
        found = lines.get(hour, [])
        every = [soak.amounts(index, content, setup) for content in soak.seen(index)]
        read = soak.amounts(index, soak.contents[index][recorded.read], setup)
        first = {line.key: line.amount for line in mp.first_sends(found).values() if line.amount}
        assert first == read, (index, first, read)
        checks: dict = {}
        high = dict(first)
        for line in found:
            if isinstance(line, mp.LateLine):
                # Compared with the high-water mark: what it was billed on, raised by each later find.
                assert line.accounted_before == high.get(line.key, 0), (index, line, high)
                high[line.key] = max(high.get(line.key, 0), line.accounted_before + line.difference)
                checks.setdefault(line.check, {})[line.key] = line.accounted_before + line.difference
                assert mode == "carry" or line.action == "reported", line
                assert (line.action == "carried") == (mode == "carry" and line.difference > 0), line
        for number, shown in checks.items():
            assert any(all(amounts.get(key, 0) == value for key, value in shown.items()) for amounts in every), \
                (index, number, shown)
        largest = soak.amounts(index, soak.largest(index), setup)
        mark = {key: value for key, value in mp.accounted_from_ledger(found).items() if value}
        assert mark == largest, (index, mark, largest)
        for key, value in largest.items():
            used_largest[key] = used_largest.get(key, 0) + value
        for key, value in read.items():
            used_read[key] = used_read.get(key, 0) + value

    # Per (contract, dimension) across the deployment: billed + remainder = used, the
    # remainder below one unit.
    used = used_largest if mode == "carry" else used_read
    billed: dict = {}
    for (contract, dimension, _), quantity in clazar.accepted_quantities().items():
        billed[contract, dimension] = billed.get((contract, dimension), 0) + quantity
    for key in sorted(set(used) | set(billed) | set(state.remainders)):
        remainder = state.remainders.get(key, Fraction(0))
        total, paid = used.get(key, Fraction(0)), billed.get(key, 0)
        assert paid + remainder == total, (key, paid, remainder, total, soak.outcomes)
        assert 0 <= remainder < 1, (key, remainder)
        assert total - 1 < paid <= total <= used_largest.get(key, 0), (key, paid, total)

    # A new service's first hour, as its warning names it.
    for run, key, named in soak.new_service_lines:
        s = KEYS.index(key)
        later = sorted(index for index, how in soak.recorded.items() if how.run >= run and s in how.setup.services)
        if later:
            assert named == mp.display_hour(soak.hours[later[0]]), (key, named, later[0], run)

    check_order_does_not_matter(soak, random.Random(len(soak.outcomes)))


def soak_test(harness, hours, seed: int, mode: str, state: str, steps: int) -> None:
    if state == "s3":
        harness.use_s3_state()
    soak = Soak(harness, hours, seed, mode)
    # Every SERVICES item names its marketplace, CLAZAR_CLOUD another one.
    soak.setup = dataclasses.replace(soak.setup, suffixed=frozenset(range(3)))
    # For certain, first, with a lookback of one hour: an answer lost after its records
    # landed (the retry meets "already exists"), a clean hour, a batch with no usable answer
    # (the hour stays pending), a kill as a batch's answer arrives (it stays pending); then,
    # with that hour pending, another marketplace and a limit below one of its records (each
    # refused, sending nothing, then set back); then the lookback raised (the hour whose mark
    # was not kept must be named) and a third service added (it starts after the pending
    # hour), in one run. Then everything at random.
    soak.setup = dataclasses.replace(soak.setup, lookback=1)
    for index, fault, kill in ((0, reset_after_landing(), None), (1, None, None), (2, no_results(land=True), None),
                               (3, None, {"FAULT_KILL_AFTER_BATCH": "1"})):
        while not soak.amounts(index, soak.current(index), soak.setup):
            soak.create(index)
        soak.final = index + 1
        soak.freeze(range(soak.final - soak.setup.lookback))
        soak.write_marker()
        harness.clazar.faults.extend([fault] if fault else [])
        soak.run(kind="kill at a step" if kill else "in-process", faults=kill, max_hours=1, patient=True)
    assert soak.outcomes == [0, 0, 1, -9], soak.outcomes
    assert soak.state.pending is not None, "no hour was left pending"
    for episode in ("cloud", "limit"):
        while True:
            setup = soak.change(episode)
            if setup is not None and soak.refusal(setup) is not None:
                break
        if soak.run(setup) == 3:  # the killed run's lease, lapsed
            soak.run(setup)
        assert soak.outcomes[-1] == 1, soak.outcomes
    soak.change("lookback up")
    assert soak.unchecked_warning is not None
    soak.change("add service")
    soak.run(max_hours=2, patient=True)
    assert soak.outcomes[-1] == 0, soak.outcomes
    schedule = [[] for _ in range(steps)]
    for event in EVENTS:
        soak.random.choice(schedule).append(event)
    for events in schedule:
        if soak.random.random() < 0.15:
            events.append(soak.random.choice(EVENTS))
        soak.step(events)
    soak.finish()
    check(soak)



# Two short seeds in `make test`, one of each mode and state store; in `make test-slow`,
# every seed, long.
@pytest.mark.parametrize("seed, mode, state", [(14, "carry", "s3"), (15, "report", "local")])
def test_soak(harness, hours, seed, mode, state):
    soak_test(harness, hours, seed, mode, state, steps=14)


@pytest.mark.slow
@pytest.mark.parametrize("seed, mode, state", [
    (11, "carry", "local"), (12, "report", "s3"), (13, "carry", "local"), (14, "carry", "s3"),
    (15, "report", "local"), (16, "carry", "s3"),
])
def test_soak_long(harness, hours, seed, mode, state):
    soak_test(harness, hours, seed, mode, state, steps=36)
