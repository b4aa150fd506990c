"""Hostile infrastructure (issue 19), end to end: the real script against an in-memory S3
that misbehaves (tests/fake_s3.py) and the Clazar stand-in, and against state files planted
by another user (run as a user that is not root, through setpriv).

Each case checks the exit code, the message (naming the prefix, key, store or file), that
nothing was sent to Clazar, that the state is as it was (byte for byte where the run stops
before its end; where an hour fails, everything but the run's own summary), and that time
and memory stay bounded by construction: a page cap, S3_TIMEOUT_SECONDS, a size cap."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import metering_processor as mp
import pytest
from conftest import SCRIPT, SERVICE, Harness, cpu, run_or_kill
from export_data import hour_prefix, iso, record, service_key
from fake_s3 import FakeS3

KEY = service_key(SERVICE)
EXPORT = "export"
# S3_TIMEOUT_SECONDS where the deadline is what a test is about; elsewhere 10 s, which a
# loopback read of the fake never needs, even on a loaded machine.
S3_TIMEOUT = 3


@pytest.fixture
def fake():
    with FakeS3() as server:
        yield server


@pytest.fixture
def harness(fake, clazar, tmp_path) -> Harness:
    """The harness with the export (and, with use_s3_state, the state) in the fake S3."""
    fake.create_bucket(EXPORT)
    harness = Harness(fake.client(), fake, EXPORT, clazar, tmp_path)
    harness.env["S3_TIMEOUT_SECONDS"] = "10"
    return harness


def nothing_sent(harness) -> bool:
    """No metering request reached Clazar (first_hour_billed counts from after its run)."""
    return harness.clazar.metering_calls == 0


def billing_part(body: bytes) -> dict:
    """The state without the run's own summary, which every run that gets that far records."""
    document = json.loads(body)
    document["deployment"] = {name: value for name, value in document["deployment"].items()
                              if name != "last_run"}
    return document


def first_hour_billed(harness, hours) -> dict:
    """Hour 0 billed by an honest run (the fake works end to end); hour 1 written and final,
    for the test to make hostile. Returns the environment of the runs."""
    env = {"START_HOUR": iso(hours[0])}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(2))
    harness.clazar.metering_calls = 0
    return env


def assert_hour_one_failed_and_is_billed_once_fixed(harness, hours, env, state_before, fix):
    """After a run that failed hour 1: nothing of it was sent, the state holds what it held
    (no pending hour, hour 0 the last processed), and once ``fix()`` is applied the next
    run bills hour 1 exactly once."""
    assert harness.clazar.metering_calls == 0
    assert billing_part(harness.state_bytes()) == billing_part(state_before)
    assert "pending_hour" not in harness.state()["deployment"]
    fix()
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 3}


def listing_pages(fake, prefix: str) -> int:
    """How many ListObjectsV2 pages of ``prefix`` the fake served."""
    return sum(1 for method, path in fake.requests if method == "GET"
               and parse_qs(urlsplit(path).query).get("prefix") == [prefix])


def export_requests(fake) -> list[str]:
    """The requests the fake had for the export bucket."""
    return [path for _, path in fake.requests if urlsplit(path).path.split("/")[1] == EXPORT]


# --- listings that never end -----------------------------------------------------------------


def test_a_listing_whose_tokens_cycle_fails_the_hour_naming_the_prefix(harness, fake, hours):
    env = first_hour_billed(harness, hours)
    before = harness.state_bytes()
    prefix = hour_prefix(SERVICE, hours[1])
    # botocore's paginator refuses only a token repeated at once: A, B, A, B would go on.
    fake.never_end_listing(prefix, tokens=("A", "B"))
    result = harness.run(env=env, timeout=60)
    assert result.returncode == 1, result.output
    assert f"cannot list s3://{EXPORT}/{prefix}: S3 repeated a continuation token" in result.output
    # Bounded by construction: the first token seen again ends the listing (page 3).
    assert listing_pages(fake, prefix) <= 3
    assert_hour_one_failed_and_is_billed_once_fixed(harness, hours, env, before,
                                                    fake.behave)


def test_a_listing_that_never_ends_stops_at_s3_timeout_seconds(harness, fake, hours):
    env = first_hour_billed(harness, hours)
    before = harness.state_bytes()
    prefix = hour_prefix(SERVICE, hours[1])
    delay = 0.25  # each page; a new token every time, so only the deadline ends it
    fake.never_end_listing(prefix, tokens=None, delay=delay)
    result = harness.run(env={**env, "S3_TIMEOUT_SECONDS": str(S3_TIMEOUT)}, timeout=60)
    assert result.returncode == 1, result.output
    assert (f"cannot list s3://{EXPORT}/{prefix}: not done within {S3_TIMEOUT} s "
            "(S3_TIMEOUT_SECONDS)") in result.output
    # Each page takes at least `delay`: within the deadline fit its pages and the one in flight.
    assert listing_pages(fake, prefix) <= S3_TIMEOUT / delay + 1
    assert_hour_one_failed_and_is_billed_once_fixed(harness, hours, env, before,
                                                    fake.behave)


def test_a_listing_that_never_ends_stops_at_the_page_cap(harness, fake, hours, monkeypatch):
    env = first_hour_billed(harness, hours)
    before = harness.state_bytes()
    prefix = hour_prefix(SERVICE, hours[1])
    fake.never_end_listing(prefix, tokens=None)
    # 1,000 pages in production; fewer here, so that the cap (not the deadline) ends it.
    monkeypatch.setattr(mp, "MAX_LISTING_PAGES", 20)
    result = harness.run(env={**env, "S3_TIMEOUT_SECONDS": "60"}, timeout=60)
    assert result.returncode == 1, result.output
    assert f"cannot list s3://{EXPORT}/{prefix}: more than 20 pages" in result.output
    assert listing_pages(fake, prefix) == 20
    assert_hour_one_failed_and_is_billed_once_fixed(harness, hours, env, before,
                                                    fake.behave)


# --- bodies that trickle, sizes that lie ---------------------------------------------------------


def test_an_export_object_that_trickles_fails_the_hour_naming_the_key_within_s3_timeout(harness, fake, hours):
    env = first_hour_billed(harness, hours)
    before = harness.state_bytes()
    key = hour_prefix(SERVICE, hours[1]) + "sub-AAAAAAAAAA.json"
    # A byte every half second: the file's few hundred bytes would take minutes, and every
    # read of the socket gets its byte long before botocore's read timeout.
    fake.trickle(key, 0.5)
    # In a subprocess: the abandoned read ends with the process, as the module means it to.
    ended, code, output = run_or_kill(harness, {**env, "S3_TIMEOUT_SECONDS": str(S3_TIMEOUT)}, timeout=60)
    assert ended, "the run was still reading the trickling object"
    assert code == 1, output
    assert f"s3://{EXPORT}/{key} was not read within {S3_TIMEOUT} s (S3_TIMEOUT_SECONDS)" in output
    assert_hour_one_failed_and_is_billed_once_fixed(harness, hours, env, before,
                                                    fake.behave)


# The size of a hostile object: far beyond the kernel's socket buffers (a few MiB), so that a
# reader that stops at its cap leaves most of it unsent (FakeS3.sent tells).
HOSTILE_SIZE = 32 * 2**20
LIMIT = 2048  # MAX_EXPORT_FILE_BYTES in the size tests


def big_export_file(hour) -> bytes:
    """A valid export file of HOSTILE_SIZE bytes (its records, then blanks JSON ignores):
    read whole, it would bill c-big."""
    rows = json.dumps([record(SERVICE, hour, contract="c-big", subscription="sub-AAAAAAAAAA",
                              dimension="cpu_core_hours", value=1, pod=f"db-{pod}")
                       for pod in range(3)]).encode()
    return rows + b" " * (HOSTILE_SIZE - len(rows))


@pytest.mark.parametrize("served, message", [
    # The object says how large it is: refused from its length, before reading.
    ("length told", f": {HOSTILE_SIZE} bytes, more than MAX_EXPORT_FILE_BYTES (2048 bytes)"),
    # No length at all: the read itself stops at the limit.
    ("no length", ": more than MAX_EXPORT_FILE_BYTES (2048 bytes)"),
    # A length smaller than the body: no more than it is read, and the cut file is refused.
    ("length too small", "is not valid JSON"),
])
def test_a_listing_that_understates_a_size_still_stops_the_read_at_max_export_file_bytes(
        harness, fake, hours, served, message):
    env = {**first_hour_billed(harness, hours), "MAX_EXPORT_FILE_BYTES": str(LIMIT)}
    before = harness.state_bytes()
    key = hour_prefix(SERVICE, hours[1]) + "sub-AAAAAAAAAA.json"
    body = big_export_file(hours[1])
    fake.put(EXPORT, key, body)
    fake.lie_in_listing(key, 100)
    if served == "no length":
        fake.lie_about_length(key, None)
    elif served == "length too small":
        fake.lie_about_length(key, LIMIT // 2)
    result = harness.run(env=env)
    assert result.returncode == 1, result.output
    failure = next(line for line in result.lines("ERROR") if key in line)
    assert message in failure, result.output
    assert "c-big" not in str(harness.clazar.accepted_keys())
    assert fake.sent[key] < len(body), "the reader hung up long before the end"

    def fix():
        fake.behave()
        harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 3)]})

    assert_hour_one_failed_and_is_billed_once_fixed(harness, hours, {**env, "MAX_EXPORT_FILE_BYTES": None},
                                                    before, fix)


# --- state and ledger objects larger than allowed ------------------------------------------------

CAP = 64 * 1024  # MAX_STATE_BYTES in these tests (256 MiB in production)


def serve_oversized(fake, bucket: str, key: str, valid: bytes, padding: bytes, served: str) -> bytes:
    """Put ``valid`` (a state or ledger file) at ``key``, padded to HOSTILE_SIZE with
    ``padding`` (blanks, which JSON and the ledger skip: read whole, it would be read as it
    is) unless the lie is the length alone. Returns the body."""
    body = valid if served == "length too large" else \
        valid + padding * ((HOSTILE_SIZE - len(valid)) // len(padding))
    fake.put(bucket, key, body)
    if served == "no length":
        fake.lie_about_length(key, None)
    elif served == "length too large":
        fake.lie_about_length(key, CAP + 1)
    return body


SERVED = ["length told", "no length", "length too large"]


def too_large(body: bytes, served: str) -> str:
    """The end of the message: with the size S3 claimed, if it claimed one."""
    claimed = {"length told": f" {len(body)} bytes,", "length too large": f" {CAP + 1} bytes,"}
    return f":{claimed.get(served, '')} more than the largest state or ledger file read ({CAP} bytes)"


@pytest.mark.parametrize("served", SERVED)
def test_a_state_object_larger_than_the_cap_is_exit_4(harness, fake, hours, monkeypatch, served):
    harness.use_s3_state()
    env = first_hour_billed(harness, hours)
    monkeypatch.setattr(mp, "MAX_STATE_BYTES", CAP)
    body = serve_oversized(fake, harness.state_bucket, harness.state_key, harness.state_bytes(), b" ",
                           served)
    result = harness.run(env=env)
    assert result.returncode == 4, result.output
    assert (f"cannot read state s3://{harness.state_bucket}/{harness.state_key}"
            + too_large(body, served)) in result.output
    assert nothing_sent(harness) and fake.get(harness.state_bucket, harness.state_key) == body
    if served != "length too large":
        assert fake.sent[harness.state_key] < len(body), "the reader hung up long before the end"
    assert fake.get(harness.state_bucket, harness.state_key + ".lock") is None, "the lease is released"


@pytest.mark.parametrize("served", SERVED)
def test_a_ledger_object_larger_than_the_cap_is_exit_4(harness, fake, hours, monkeypatch, served):
    harness.use_s3_state()
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    env = {"START_HOUR": iso(hours[0])}
    # Clazar refuses the secret: the hour stays pending, with its ledger lines ("not sent
    # yet"), which the next run reads before it resends.
    refused = harness.run(env={**env, "CLAZAR_CLIENT_SECRET": "not-the-secret-0123"})
    assert refused.returncode == 1, refused.output
    ledger_key = harness.state_key.rpartition("/")[0] + "/metering_ledger/" + mp.Ledger.hour_file(hours[0])
    lines = fake.get(harness.state_bucket, ledger_key)
    assert lines and "pending_hour" in harness.state()["deployment"], refused.output
    state = harness.state_bytes()
    monkeypatch.setattr(mp, "MAX_STATE_BYTES", CAP)
    body = serve_oversized(fake, harness.state_bucket, ledger_key, lines, b" ", served)
    result = harness.run(env=env)
    assert result.returncode == 4, result.output
    assert (f"cannot read ledger s3://{harness.state_bucket}/{ledger_key}"
            + too_large(body, served)) in result.output
    assert nothing_sent(harness)
    assert harness.state_bytes() == state and fake.get(harness.state_bucket, ledger_key) == body
    if served != "length too large":
        assert fake.sent[ledger_key] < len(body), "the reader hung up long before the end"


# --- locking on a store that must honour If-Match / If-None-Match ------------------------------


@pytest.mark.parametrize("ignored, refused", [
    ({"If-Match", "If-None-Match"}, "If-None-Match: *"),
    ({"If-None-Match"}, "If-None-Match: *"),
    ({"If-Match"}, "If-Match on another ETag"),
])
def test_a_store_that_ignores_conditional_writes_is_refused_before_anything_is_sent(harness, fake, hours,
                                                                                   ignored, refused):
    harness.use_s3_state()
    env = first_hour_billed(harness, hours)
    state, authenticated = harness.state_bytes(), harness.clazar.auth_calls
    fake.ignored_conditions = ignored
    fake.requests.clear()
    result = harness.run(env=env)
    assert result.returncode == 4, result.output
    assert (f"the S3 store at {fake.endpoint} accepted a write with {refused}, which it must "
            "refuse: it ignores conditional writes, so two runs could hold the lock on the state at "
            "once and both send") in result.output
    assert nothing_sent(harness) and harness.clazar.auth_calls == authenticated
    assert harness.state_bytes() == state
    assert export_requests(fake) == [], "nothing of the export was read"
    assert fake.get(harness.state_bucket, harness.state_key + ".lock") is None, "no lease left behind"
    assert [key for key in fake.buckets.get(harness.state_bucket, {}) if ".check-" in key] == [], \
        "no probe left behind"
    # Honoured again, the hour is billed once.
    fake.behave()
    assert harness.run(env=env).returncode == 0
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[1]))] == 3
    assert harness.clazar.metering_calls == 1


def test_on_a_store_that_ignores_conditions_another_runs_live_lease_is_left_as_it_was(harness, fake,
                                                                                     hours):
    """The store is checked on a probe object of the run's own before the lease is touched: a
    store that ignored conditional writes would otherwise let this run overwrite the live lease
    of another (a run of an earlier version during an upgrade, say) before refusing the store."""
    harness.use_s3_state()
    env = first_hour_billed(harness, hours)
    lock_key = harness.state_key + ".lock"
    until = datetime.now(timezone.utc) + timedelta(minutes=10)
    lease = json.dumps({"owner": "other-run", "host": "elsewhere", "pid": 1,
                        "expires_at": iso(until)}).encode()
    harness.s3.put_object(Bucket=harness.state_bucket, Key=lock_key, Body=lease)
    fake.ignored_conditions = {"If-Match", "If-None-Match"}
    result = harness.run(env=env)
    assert result.returncode == 4, result.output
    assert "ignores conditional writes" in result.output
    assert fake.get(harness.state_bucket, lock_key) == lease, "the other run's lease is untouched"
    assert nothing_sent(harness)


def test_a_live_lease_is_never_overwritten_and_an_expired_one_is_taken_over(harness, fake, hours):
    harness.use_s3_state()
    env = first_hour_billed(harness, hours)
    state = harness.state_bytes()
    lock_key = harness.state_key + ".lock"
    until = datetime.now(timezone.utc) + timedelta(minutes=10)
    lease = json.dumps({"owner": "other-run", "host": "elsewhere", "pid": 4242,
                        "expires_at": iso(until)}).encode()
    fake.put(harness.state_bucket, lock_key, lease)
    fake.requests.clear()
    held = harness.run(env=env)
    assert held.returncode == 3, held.output
    assert (f"another run holds the lock s3://{harness.state_bucket}/{lock_key} (owner other-run on "
            f"elsewhere, pid 4242) until {iso(until)}; this run did nothing") in held.output
    assert fake.get(harness.state_bucket, lock_key) == lease, "the live lease was not touched"
    assert harness.state_bytes() == state and nothing_sent(harness)
    assert export_requests(fake) == [], "nothing of the export was read"
    harness.expire_lease()
    taken = harness.run(env=env)
    assert taken.returncode == 0, taken.output
    assert f"Took over the lease s3://{harness.state_bucket}/{lock_key}, which expired at" in taken.output
    assert harness.clazar.accepted_quantities()[("c-1", "cpu_core_hours", iso(hours[1]))] == 3
    assert harness.clazar.metering_calls == 1
    assert fake.get(harness.state_bucket, lock_key) is None, "released at the end"


# --- files that are ours -------------------------------------------------------------------------


def forged_state(hours, quantity: int = 999_999) -> bytes:
    """A valid state whose pending hour 0 holds one forged record of ``quantity``: resent
    as it is by any run that trusts it."""
    hour, key = hours[0], ("c-forged", "cpu_core_hours")
    pending = mp.PendingHour(hour, tuple(mp.metering_records(hour, {key: quantity}, {"c-forged": "aws"})),
                             {key: Fraction(quantity)}, {}, {}, {"c-forged": "aws"}, {KEY: "aws"},
                             "forged", mp.formulas_fingerprint(()))
    return mp.dump_state(mp.DeploymentState(services={KEY: mp.ServiceEntry(hours_by_marker=True)},
                                            first_hour=hour, pending=pending))


def export_of_one_hour(harness, hours) -> dict:
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    return {"START_HOUR": iso(hours[0])}


FORGED = {("c-forged", "cpu_core_hours")}


def test_the_forged_state_bills_when_it_is_ours(harness, fake, hours):
    """The control of the tests below: the same state, the run's own, is resent as it is.
    What keeps it from Clazar there is who owns it, nothing else."""
    env = export_of_one_hour(harness, hours)
    harness.state_path.write_bytes(forged_state(hours))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    assert harness.clazar.accepted_quantities() == {("c-forged", "cpu_core_hours", iso(hours[0])): 999_999}


@pytest.mark.parametrize("name, mode, message", [
    ("metering_state.json", 0o666, "state {path} has mode 0666: others may write it"),
    ("metering_state.json", 0o620, "state {path} has mode 0620: others may write it"),
    ("metering_state.json.lock", 0o646, "lock file {path} has mode 0646: others may write it"),
])
def test_a_state_or_lock_others_may_write_is_exit_4_before_anything_is_read(harness, fake, hours, name,
                                                                            mode, message):
    env = export_of_one_hour(harness, hours)
    harness.state_path.write_bytes(forged_state(hours))
    path = harness.state_path.parent / name
    path.touch()
    path.chmod(mode)
    state = harness.state_bytes()
    fake.requests.clear()
    result = harness.run(env=env)
    assert result.returncode == 4, result.output
    assert message.format(path=path) in result.output
    assert nothing_sent(harness) and harness.clazar.auth_calls == 0
    assert harness.state_bytes() == state and stat.S_IMODE(path.stat().st_mode) == mode
    assert fake.requests == [], "nothing was read from S3"


# As root, the tests run the exporter as another user, against files planted by a third.
SETPRIV = shutil.which("setpriv")
EXPORTER_UID = 65534  # nobody
PLANTER_UID = 4245  # another user, with no name on this machine


def interpreter_runs_as_another_user() -> bool:
    """Whether root can run this interpreter, with the project's packages, as EXPORTER_UID:
    one kept in root's own home and linked to a libpython there (a pyenv build with
    --enable-shared) cannot be loaded by another user."""
    if SETPRIV is None or os.geteuid() != 0:
        return False
    probe = subprocess.run([SETPRIV, f"--reuid={EXPORTER_UID}", f"--regid={EXPORTER_UID}", "--clear-groups",
                            sys.executable, "-c", "import boto3, requests"],
                           cwd="/", capture_output=True, timeout=120)
    return probe.returncode == 0


as_another_user = pytest.mark.skipif(
    not interpreter_runs_as_another_user(),
    reason="needs root, setpriv (util-linux) and an interpreter another user can run")


@pytest.fixture
def unprivileged():
    """A folder of the exporter's user (HOME, working folder, a copy of the script), in a
    folder that user can reach: the test's own tmp_path is root's alone."""
    base = Path(tempfile.mkdtemp(prefix="metering-hostile-s3-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir(mode=0o700)
    shutil.copy(SCRIPT, home / "metering_processor.py")
    os.chown(home, EXPORTER_UID, EXPORTER_UID)
    yield base, home
    shutil.rmtree(base)


def run_as_exporter_user(harness, home: Path, env: dict) -> tuple[int, str]:
    environment = harness.environment({**env, "HOME": str(home)})
    process = subprocess.run(
        [SETPRIV, f"--reuid={EXPORTER_UID}", f"--regid={EXPORTER_UID}", "--clear-groups",
         sys.executable, str(home / "metering_processor.py")],
        env=environment, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=120)
    return process.returncode, process.stdout


def plant(path: Path, body: bytes, mode: int) -> None:
    path.write_bytes(body)
    os.chown(path, PLANTER_UID, PLANTER_UID)
    path.chmod(mode)


def folder(path: Path, owner: int, mode: int) -> Path:
    path.mkdir()
    os.chown(path, owner, owner)
    path.chmod(mode)  # after chown, which clears the sticky bit's neighbours on some systems
    return path


@as_another_user
@pytest.mark.parametrize("case", ["shared folder", "own open folder, state and lock",
                                  "own open folder, state alone"])
def test_a_state_planted_by_another_user_is_exit_4_before_anything_is_read_or_sent(
        harness, fake, hours, unprivileged, case):
    base, home = unprivileged
    env = export_of_one_hour(harness, hours)
    if case == "shared folder":
        where = folder(base / "shared", 0, 0o1777)  # as /tmp is
    else:
        # The exporter's own folder, open to all: allowed as its own, but what others put
        # there is not the exporter's.
        where = folder(base / "open", EXPORTER_UID, 0o777)
    state_path, lock_path = where / "metering_state.json", where / "metering_state.json.lock"
    plant(state_path, forged_state(hours), 0o644)
    if case != "own open folder, state alone":
        plant(lock_path, b"", 0o666)  # open to all: the exporter could take and write it
    planted = {path: path.read_bytes() for path in (state_path, lock_path) if path.exists()}
    fake.requests.clear()
    code, output = run_as_exporter_user(harness, home, {**env, "STATE_FILE_PATH": str(state_path)})
    assert code == 4, output
    expected = {
        "shared folder": f"the folder {where} holding the state's lock may be written by others "
                         "and belongs to user id 0",
        "own open folder, state and lock": f"lock file {lock_path} belongs to user id {PLANTER_UID}, "
                                           f"not to the user running the exporter ({EXPORTER_UID})",
        "own open folder, state alone": f"state {state_path} belongs to user id {PLANTER_UID}, not "
                                        f"to the user running the exporter ({EXPORTER_UID})",
    }[case]
    assert expected in output
    assert "Traceback" not in output
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert fake.requests == [], "nothing was read from S3"
    for path, body in planted.items():
        assert path.read_bytes() == body and path.stat().st_uid == PLANTER_UID


@as_another_user
@pytest.mark.parametrize("mode", [0o777, 0o755])
def test_a_ledger_folder_planted_by_another_user_is_exit_4_before_anything_is_sent(
        harness, fake, hours, unprivileged, mode):
    base, home = unprivileged
    env = export_of_one_hour(harness, hours)
    state_folder = folder(base / "state", EXPORTER_UID, 0o700)
    ledger = folder(base / "ledger-parent", EXPORTER_UID, 0o777)  # the exporter's, open to all
    planted = folder(ledger / "metering_ledger", PLANTER_UID, mode)
    fake.requests.clear()
    code, output = run_as_exporter_user(harness, home, {
        **env, "STATE_FILE_PATH": str(state_folder / "metering_state.json"), "LEDGER_PATH": str(planted)})
    assert code == 4, output
    assert (f"the folder {planted} holding the ledger may be written by others and belongs to user "
            f"id {PLANTER_UID}") in output
    assert "Traceback" not in output
    assert nothing_sent(harness) and harness.clazar.auth_calls == 0
    assert fake.requests == [], "nothing was read from S3"
    assert os.listdir(planted) == [] and not (state_folder / "metering_state.json").exists()
