"""Fixtures: one SeaweedFS for the session, a fresh bucket, Clazar stand-in and state
folder per test, and a harness that runs the real script: in this process through
``metering_processor.main`` where nothing kills or signals it, else as a subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import export_data  # noqa: E402
from clazar_standin import ClazarStandIn  # noqa: E402
from servers import ADMIN, SeaweedFS  # noqa: E402

SCRIPT = TESTS.parent / "metering_processor.py"
FAULTS = TESTS / "faults"
SERVICE = ("Acme Vector DB", "PROD", "pt-Q7rT2bX9kL")
CLIENT_SECRET = "standin-client-secret-0123456789"


def cpu(hour, contract, subscription, value, **extra):
    """One cpu_core_hours record of SERVICE."""
    return export_data.record(SERVICE, hour, contract=contract, subscription=subscription,
                              dimension="cpu_core_hours", value=value, **extra)


def five_records_in_three_batches(harness, hours) -> dict:
    """Hour 0 with five records (three batches at CLAZAR_BATCH_SIZE=2) and hour 1 with one,
    both final. Returns what Clazar should accept: {(contract, dimension, hour): quantity}."""
    h = hours[0]
    harness.write_hour(h, {"sub-AAAAAAAAAA": export_data.pod_records(SERVICE, h, contract="c-1",
                                                                     subscription="sub-AAAAAAAAAA"),
                           "sub-BBBBBBBBBB": [cpu(h, "c-2", "sub-BBBBBBBBBB", 7)]})
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 1)]})
    harness.write_marker(hours.final(2))
    first, second = export_data.iso(h), export_data.iso(hours[1])
    return {("c-1", "cpu_core_hours", first): 2, ("c-1", "memory_byte_hours", first): 2 * export_data.GIB,
            ("c-1", "storage_allocated_byte_hours", first): 10 * export_data.GIB, ("c-1", "replica_hours", first): 1,
            ("c-2", "cpu_core_hours", first): 7, ("c-1", "cpu_core_hours", second): 1}


class BucketPool:
    """Empty buckets made ready ahead of the tests that take them. SeaweedFS grows a volume
    for a bucket at its first write, which takes a fifth of a second; a thread of the pool
    does that in advance (one object written and deleted) while tests run."""

    def __init__(self, client, size: int = 4):
        self.client = client
        self.ready: queue.Queue = queue.Queue(maxsize=size)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="bucket-pool", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        while not self.closed.is_set():
            name = f"bucket-{uuid.uuid4().hex[:12]}"
            try:
                self.client.create_bucket(Bucket=name)
                self.client.put_object(Bucket=name, Key="warm-up", Body=b"")
                self.client.delete_object(Bucket=name, Key="warm-up")
            except Exception as error:  # handed to the test that takes it
                name = error
            while not self.closed.is_set():
                try:
                    self.ready.put(name, timeout=0.5)
                    break
                except queue.Full:
                    pass

    def take(self) -> str:
        name = self.ready.get(timeout=60)
        if isinstance(name, Exception):
            raise name
        return name

    def close(self) -> None:
        self.closed.set()
        self.thread.join()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(seaweed):
    return seaweed.client()


@pytest.fixture(scope="session")
def buckets(seaweed):
    pool = BucketPool(seaweed.client())
    yield pool
    pool.close()


@pytest.fixture
def bucket(buckets):
    """An empty bucket of the test's own."""
    return buckets.take()


@pytest.fixture
def clazar():
    standin = ClazarStandIn(client_secret=CLIENT_SECRET).start()
    yield standin
    standin.stop()


@dataclass
class Result:
    returncode: int
    output: str

    def lines(self, level: str | None = None) -> list[str]:
        return [line for line in self.output.splitlines() if level is None or f" - {level} - " in line]


class Harness:
    """Runs metering_processor.py as cron would, against SeaweedFS and the stand-in."""

    def __init__(self, s3, seaweed, bucket: str, clazar: ClazarStandIn, folder: Path,
                 buckets: BucketPool | None = None):
        self.s3 = s3
        self.buckets = buckets
        self.seaweed = seaweed
        self.bucket = bucket
        self.clazar = clazar
        self.folder = folder
        self.state_path = folder / "state" / "metering_state.json"
        self.state_key = ""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(folder),
            "AWS_ACCESS_KEY_ID": ADMIN[0],
            "AWS_SECRET_ACCESS_KEY": ADMIN[1],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": seaweed.endpoint,
            "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "S3_BUCKET_NAME": bucket,
            "SERVICE_NAME": SERVICE[0],
            "ENVIRONMENT_TYPE": SERVICE[1],
            "PLAN_ID": SERVICE[2],
            "CLAZAR_CLIENT_ID": clazar.client_id,
            "CLAZAR_CLIENT_SECRET": clazar.client_secret,
            "CLAZAR_API_URL": clazar.metering_url,
            # The waits between retries are a twentieth of this (0.25 s, doubling) and a
            # Retry-After is honoured up to three times it (15 s). Shorter would make the
            # retries quicker, but a read timeout firing on a loaded machine would retry
            # (and count) requests a test does not expect.
            "CLAZAR_TIMEOUT_SECONDS": "5",
            "STATE_FILE_PATH": str(self.state_path),
            "PYTHONDONTWRITEBYTECODE": "1",
            # Most tests bill raw byte-hours, above AWS's per-record limit; the limit
            # has tests of its own, which unset this.
            "MAX_RECORD_QUANTITY": str(2**63 - 1),
        }

    def command(self, *arguments: str) -> list[str]:
        return [sys.executable, str(SCRIPT), *arguments]

    def popen(self, *arguments: str, env: dict | None = None, faults: dict | None = None,
              wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start the script as a subprocess; ``wrapper`` is a command that runs it, e.g.
        ("unshare", "--pid", "--fork")."""
        environment = self.environment(env)
        if faults:
            environment["PYTHONPATH"] = str(FAULTS)
            environment.update(faults)
        return subprocess.Popen([*wrapper, *self.command(*arguments)], env=environment, cwd=self.folder,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, *arguments: str, env: dict | None = None, faults: dict | None = None, timeout: float = 180,
            wrapper: tuple[str, ...] = (), separate_process: bool = False) -> Result:
        """Run the script with these arguments, stdout and stderr merged as cron's log has them.
        With ``faults`` (which kill or signal it), a ``wrapper`` or ``separate_process`` it runs
        as a subprocess; otherwise in this process (see run_in_process), which is the same
        code started the same way without the interpreter's start-up."""
        if faults or wrapper or separate_process:
            process = self.popen(*arguments, env=env, faults=faults, wrapper=wrapper)
            output, _ = process.communicate(timeout=timeout)
            return Result(process.returncode, output)
        code, output, _ = run_in_process(arguments, self.environment(env), self.folder, timeout,
                                         merged=True)
        return Result(code, output)

    def report(self, *arguments: str, env: dict | None = None, timeout: float = 180) -> Result:
        """Run a reporting command (status, conflicts, history, reconcile) and keep what it
        prints on stdout, the report alone: its log (where the state and ledger are) goes to
        stderr, which a script reading the report does not see."""
        code, output, _ = run_in_process(arguments, self.environment(env), self.folder, timeout,
                                         merged=False)
        return Result(code, output)

    def environment(self, env: dict | None = None) -> dict[str, str]:
        """The run's whole environment: the harness's, with ``env`` over it (None unsets)."""
        merged = {**self.env, **(env or {})}
        return {key: value for key, value in merged.items() if value is not None}

    # --- data ----------------------------------------------------------------

    def write_hour(self, hour: datetime, files: dict, service=SERVICE) -> list[str]:
        return export_data.write_hour(self.s3, self.bucket, service, hour, files)

    def write_marker(self, final_before: datetime, services=(SERVICE,)) -> None:
        export_data.write_marker(self.s3, self.bucket, {export_data.service_key(s): final_before for s in services})

    # --- state, wherever STATE_FILE_PATH puts it ---------------------------------

    def use_s3_state(self, key: str = "exporter/metering_state.json") -> str:
        """Keep the state in its own bucket, as a Kubernetes deployment does."""
        if self.buckets is not None:
            self.state_bucket = self.buckets.take()
        else:
            self.state_bucket = f"state-{uuid.uuid4().hex[:12]}"
            self.s3.create_bucket(Bucket=self.state_bucket)
        self.state_key = key
        self.env["STATE_FILE_PATH"] = f"s3://{self.state_bucket}/{key}"
        return self.env["STATE_FILE_PATH"]

    def expire_lease(self) -> None:
        """Let the S3 lease a killed run left behind lapse now, as it would 900 s after its
        last renewal: its expires_at rewritten a second in the past, through the test's own
        client. Fails if there is no lease."""
        key = self.state_key + ".lock"
        lease = json.loads(self.s3.get_object(Bucket=self.state_bucket, Key=key)["Body"].read())
        assert "expires_at" in lease, lease
        lease["expires_at"] = export_data.iso(datetime.now(timezone.utc) - timedelta(seconds=1))
        self.s3.put_object(Bucket=self.state_bucket, Key=key, Body=json.dumps(lease).encode(),
                           ContentType="application/json")

    @property
    def state_display(self) -> str:
        return self.env["STATE_FILE_PATH"]

    @property
    def state_in_s3(self) -> bool:
        return self.env["STATE_FILE_PATH"].startswith("s3://")

    def state_bytes(self, key: str | None = None) -> bytes | None:
        if self.state_in_s3:
            try:
                return self.s3.get_object(Bucket=self.state_bucket, Key=key or self.state_key)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                return None
        path = Path(str(self.state_path) + key[len(self.state_key):]) if key else self.state_path
        return path.read_bytes() if path.exists() else None

    def write_state_bytes(self, body: bytes) -> None:
        if self.state_in_s3:
            self.s3.put_object(Bucket=self.state_bucket, Key=self.state_key, Body=body)
        else:
            self.state_path.write_bytes(body)

    def state(self) -> dict:
        body = self.state_bytes()
        return json.loads(body) if body is not None else {}

    def entry(self, service=SERVICE) -> dict:
        """The state entry of ``service``."""
        return self.state()[export_data.service_key(service)]

    # --- the ledger, beside the state ------------------------------------------------

    def ledger_lines(self) -> list[dict]:
        """Every line of the ledger, wherever it is, file by file in key order."""
        lines = []
        if self.state_in_s3:
            prefix = self.state_key.rpartition("/")[0] + "/metering_ledger/"
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.state_bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    body = self.s3.get_object(Bucket=self.state_bucket, Key=item["Key"])["Body"].read()
                    lines += [json.loads(line) for line in body.decode().splitlines()]
        else:
            for folder, _, names in sorted(os.walk(self.state_path.parent / "metering_ledger")):
                for name in sorted(names):
                    with open(os.path.join(folder, name)) as handle:
                        lines += [json.loads(line) for line in handle]
        return lines


class RunTimedOut(BaseException):
    """An in-process run still going after its timeout (a BaseException, so that no
    handler of the exporter's takes it for an error of its own)."""


# Threads that serve the test, not the run: the stand-ins' servers and the test modules' own.
TEST_THREAD_MODULES = {"socketserver"}


def _runs_thread(thread: threading.Thread) -> bool:
    """Whether ``thread`` was started by the exporter (or a pool of its), not by the test."""
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) or ""
    if module in TEST_THREAD_MODULES:
        return False
    source = getattr(sys.modules.get(module), "__file__", None) or ""
    return not source.startswith(str(TESTS))


class _RunOutput(io.TextIOBase):
    """sys.stdout or sys.stderr during an in-process run. What the run writes (the thread
    that called main, and the threads the run starts) goes to ``captured``; what a test's
    own threads write meanwhile (a stand-in's server reporting a dropped connection) goes
    on to ``outside``, as it would from another process."""

    def __init__(self, captured: io.TextIOWrapper, outside, caller: int):
        self.captured, self.outside, self.caller = captured, outside, caller

    def _target(self):
        thread = threading.current_thread()
        return self.captured if thread.ident == self.caller or _runs_thread(thread) else self.outside

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return self.captured.encoding

    @property
    def errors(self) -> str:
        return self.captured.errors


def _captured_stream() -> tuple[io.BytesIO, io.TextIOWrapper]:
    """A stream that encodes as the script's stdout does when started by the subprocess
    harness (UTF-8 from the C locale, lone surrogates refused), over the bytes it wrote."""
    raw = io.BytesIO()
    return raw, io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", write_through=True)


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise RunTimedOut in the main thread after ``seconds``, as a subprocess's timeout would."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(number, frame):
        raise RunTimedOut(f"the in-process run was still going after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(arguments, environment: dict[str, str], folder: Path, timeout: float,
                   merged: bool) -> tuple[int, str, str]:
    """Run ``metering_processor.main(arguments, environment)`` as a subprocess would run the
    script: os.environ is the run's environment (boto3 and requests read it), the working
    folder is ``folder``, argv[0] is the script, stdout and stderr are captured (one stream
    when ``merged``). Returns (exit code, stdout, stderr).

    Afterwards everything is as it was, and checked: the environment, folder and argv are
    put back; the signal handlers and log handlers must be the ones found, and no thread
    the run started may still be alive. An exception main lets out fails the test, as its
    traceback would have failed the subprocess."""
    import logging

    import metering_processor

    arguments = [str(argument) for argument in arguments]
    caller = threading.get_ident()
    signals = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    handlers = logging.getLogger().handlers[:]
    threads_before = set(threading.enumerate())
    saved_environ, saved_argv, saved_folder = dict(os.environ), sys.argv, os.getcwd()
    zone = os.environ.get("TZ")
    out_bytes, out = _captured_stream()
    err_bytes, err = (out_bytes, out) if merged else _captured_stream()
    os.environ.clear()
    os.environ.update(environment)
    if environment.get("TZ") != zone:
        time.tzset()
    sys.argv = [str(SCRIPT), *arguments]
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(_RunOutput(out, sys.stdout, caller)), \
                contextlib.redirect_stderr(_RunOutput(err, sys.stderr, caller)), _time_limit(timeout):
            try:
                code = metering_processor.main(arguments, os.environ)
            except SystemExit as exit_:  # argparse: --help, --version, a bad argument
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(saved_folder)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environ)
        if environment.get("TZ") != zone:
            time.tzset()
    left = [thread for thread in set(threading.enumerate()) - threads_before
            if _runs_thread(thread)]
    for thread in left:
        thread.join(2)
    alive = [thread.name for thread in left if thread.is_alive()]
    assert alive == [], "threads of the run outlived it"
    handlers_now = {number: signal.getsignal(number) for number in signals}
    assert handlers_now == signals, "the signal handlers were changed"
    assert logging.getLogger().handlers == handlers, "the log handlers were changed"
    # Read as the subprocess harness reads a pipe: UTF-8, strictly.
    return code, out_bytes.getvalue().decode(), "" if merged else err_bytes.getvalue().decode()


@pytest.fixture
def harness(s3, seaweed, bucket, clazar, tmp_path, buckets) -> Harness:
    return Harness(s3, seaweed, bucket, clazar, tmp_path, buckets)


@pytest.fixture
def certificate(tmp_path):
    """A private CA and a certificate for 127.0.0.1 signed by it."""
    def openssl(*arguments):
        subprocess.run(["openssl", *arguments], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", "server.pem")
    return tmp_path


@pytest.fixture(params=["local-state", "s3-state"])
def backend_harness(request, harness) -> Harness:
    """The harness, once with a local state file and once with the state in S3."""
    if request.param == "s3-state":
        harness.use_s3_state()
    return harness


@pytest.fixture
def hours():
    """A window of past hours, and a marker moment that makes the first ``n`` final."""
    base = export_data.current_hour() - timedelta(hours=30)

    class Hours:
        start = base

        def __getitem__(self, index: int) -> datetime:
            return base + timedelta(hours=index)

        def final(self, count: int) -> datetime:
            return base + timedelta(hours=count)

    return Hours()


def one_hour(harness, hours):
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    return {"START_HOUR": export_data.iso(hours[0])}


def run_or_kill(harness, env, timeout):
    """Run the script; (ended by itself, exit code, output)."""
    process = harness.popen(env=env)
    try:
        output, _ = process.communicate(timeout=timeout)
        return True, process.returncode, output
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return False, process.returncode, output


# --- helpers for 2.0.0's ledger, state and metrics (tests of the deployment rules) -----------


def put_ledger_files(harness, files: dict[str, bytes]) -> None:
    """Files under the ledger (a folder beside the state, or its S3 prefix), by relative name."""
    for name, body in files.items():
        if harness.state_in_s3:
            prefix = harness.state_key.rpartition("/")[0] + "/metering_ledger/"
            harness.s3.put_object(Bucket=harness.state_bucket, Key=prefix + name, Body=body)
        else:
            path = harness.state_path.parent / "metering_ledger" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)


def ledger_waiting(harness, outcome: str = "rejected") -> list[dict]:
    """The ledger lines of the records waiting as ``outcome`` (rejected or conflict), found
    as the exporter finds them: each hour's lines parsed, the latest line of a record its fate."""
    import metering_processor as mp

    by_hour: dict = {}
    for data in harness.ledger_lines():
        line = mp.ledger_line(data)
        by_hour.setdefault(line.hour, []).append(line)
    return [line.to_json() for hour in sorted(by_hour) for line in mp.waiting_records(by_hour[hour]).values()
            if mp.waiting_as(line) == outcome]


def fabricate_waiting(harness, hours, contracts, outcome: str = "rejected", dimension: str = "replica_hours") -> int:
    """Records waiting as ``outcome`` (3 units each), as runs leave them: each hour's ledger
    file written by the exporter's own Ledger, and the local state's count per hour.
    Returns how many."""
    from fractions import Fraction

    import metering_processor as mp

    folder = str(harness.state_path.parent)
    ledger = mp.Ledger(mp.LocalStorage(folder + "/metering_ledger", "ledger"))
    store = mp.StateStore(mp.LocalStorage(folder, "state"), harness.state_path.name,
                          mp.LocalLock(str(harness.state_path) + ".lock"), str(harness.state_path))
    state, at = store.load(), datetime.now(timezone.utc)
    for hour in hours:
        ledger.write_hour(hour, [mp.RecordLine(contract, dimension, hour, "aws", 3, outcome, at, Fraction(3),
                                               Fraction(0), None, {"status": "fail"})
                                 for contract in contracts])
        state = state.with_waiting(hour, {outcome: len(contracts)})
    store.save(state)
    return len(hours) * len(contracts)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` in a metrics file whose labels, besides
    ``deployment`` (which every sample must have), are exactly ``labels``."""
    import re

    found = []
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)\{(.*)\} (\S+)", line)
        if match and match.group(1) == name:
            pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)))
            assert "deployment" in pairs, line
            del pairs["deployment"]
            if pairs == labels:
                found.append(float(match.group(3)))
    assert len(found) == 1, (name, labels, text)
    return found[0]


def answer_first_request_of(clazar: ClazarStandIn, contract: str, code: int, land: bool = False) -> None:
    """The first metering request holding a record of ``contract`` is answered HTTP ``code``
    (after its records land in the stand-in when ``land``); every other request as usual.
    The batches of an hour leave several at once, so a fault meant for one record's batch
    must pick its request by content, not by arrival."""
    base = clazar.server.RequestHandlerClass
    done: list[bool] = []

    class Answering(base):
        def _metering_request(self, body):
            records = body.get("request") if isinstance(body, dict) else None
            with clazar.lock:
                mine = not done and isinstance(records, list) and any(
                    isinstance(item, dict) and item.get("contract_id") == contract for item in records)
                if mine:
                    done.append(True)
                    clazar.metering_calls += 1
                    if land:
                        clazar._meter(records)
            if not mine:
                return super()._metering_request(body)
            return self._reply(code, {"detail": "scripted"})

    clazar.server.RequestHandlerClass = Answering
