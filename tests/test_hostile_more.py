# ruff: noqa: F811 - the fixtures of test_hostile_s3, imported, are parameters here
"""Hostile infrastructure and secrets, the cases the other hostile tests leave open: a
password in a URL refused for another reason, a state reached through a link that another
user planted in a folder open to all."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from clazar_standin import call
from conftest import one_hour, run_or_kill
from export_data import iso
# The export (and S3 state) in the in-memory S3 of the hostile-infrastructure tests.
from test_hostile_s3 import (EXPORTER_UID, PLANTER_UID, as_another_user, export_of_one_hour, fake,  # noqa: F401
                             folder, harness, run_as_exporter_user, unprivileged)

CONFIG_ERROR = "metering_processor: configuration error: "
PASSWORD = "hunter2-pw"


@pytest.mark.parametrize("variable, url, problem", [
    ("METRICS_PUSHGATEWAY_URL", f"https://ops:{PASSWORD}@push.example.com:99999/",
     "is not a URL urllib3 can parse (is the port from 1 to 65535?): 'https://[userinfo]@push.example.com:99999/'"),
    ("METRICS_PUSHGATEWAY_URL", f"ftp://ops:{PASSWORD}@push.example.com/",
     "must be an http(s) URL with a host, got 'ftp://[userinfo]@push.example.com/'"),
    ("METRICS_PUSHGATEWAY_URL", f"https://ops:{PASSWORD} @push.example.com/",
     "must not contain spaces or control characters, got 'https://[userinfo]@push.example.com/'"),
    ("METRICS_PUSHGATEWAY_URL", f"https://ops:{PASSWORD}@push.example.com/ x",
     "must not contain spaces or control characters, got 'https://[userinfo]@push.example.com/ x'"),
    ("AWS_ENDPOINT_URL_S3", f"https://AKIAEXAMPLE:{PASSWORD}@s3.example.com\t/",
     "must not contain spaces or control characters, got 'https://[userinfo]@s3.example.com\\t/'"),
    ("CLAZAR_API_URL", f"https://me:{PASSWORD}@api.example.com:9o/metering/",
     "is not a URL urllib3 can parse (is the port from 1 to 65535?): 'https://[userinfo]@api.example.com:9o/metering/'"),
])
def test_a_url_refused_for_another_reason_never_prints_its_password(harness, hours, variable, url, problem):
    """The password of a URL that carries one stays out of the configuration error, whatever
    else is wrong with the URL: the error goes to cron's mail and the journal."""
    env = one_hour(harness, hours)
    result = harness.run(env={**env, variable: url})
    assert result.returncode == 2, result.output
    assert result.output == f"{CONFIG_ERROR}{variable}: {problem}\n", result.output
    assert PASSWORD not in result.output and "ops" not in result.output.split(":", 2)[2]
    assert harness.clazar.auth_calls == 0 and harness.state() == {}


# --- a state reached through a link another user planted ------------------------------------


@as_another_user
@pytest.mark.parametrize("case", ["shared folder", "own open folder"])
def test_a_state_reached_through_a_link_another_user_planted_is_exit_4_before_anything_is_read(
        harness, fake, hours, unprivileged, case):
    """Whoever may plant or swap the link chooses which state the run reads and where it writes
    one: pointed at nothing, the run starts afresh and the hours it had not yet sent are never
    billed; pointed at another deployment's state, it bills with that state's progress."""
    base, home = unprivileged
    env = export_of_one_hour(harness, hours)
    if case == "shared folder":
        where = folder(base / "shared", 0, 0o1777)  # as /tmp is
    else:
        where = folder(base / "open", EXPORTER_UID, 0o777)  # the exporter's own, open to all
    own = folder(base / "own", EXPORTER_UID, 0o700)
    target = own / "chosen-by-another.json"
    link = where / "metering_state.json"
    link.symlink_to(target)
    os.lchown(link, PLANTER_UID, PLANTER_UID)
    fake.requests.clear()
    code, output = run_as_exporter_user(harness, home, {**env, "STATE_FILE_PATH": str(link)})
    assert code == 4, output
    assert f"the state's path {link} is a symbolic link" in output, output
    assert "Point STATE_FILE_PATH at a folder of your own" in output
    assert "Traceback" not in output
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert fake.requests == [], "nothing was read from S3"
    assert os.listdir(own) == [] and os.readlink(link) == str(target)


@as_another_user
def test_a_state_reached_through_the_users_own_link_in_its_own_folder_is_used(harness, fake, hours, unprivileged):
    """The control: a link of the user's own, in a folder no one else may write, is followed."""
    base, home = unprivileged
    env = export_of_one_hour(harness, hours)
    own = folder(base / "own", EXPORTER_UID, 0o700)
    target = own / "metering_state.json"
    link = own / "current.json"
    link.symlink_to(target.name)
    os.lchown(link, EXPORTER_UID, EXPORTER_UID)
    code, output = run_as_exporter_user(harness, home, {**env, "STATE_FILE_PATH": str(link)})
    assert code == 0, output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert json.loads(target.read_bytes())["deployment"]["last_processed_hour"] == iso(hours[0])


# --- a run frozen past its S3 lease before it sends ---------------------------------------------

SHORT_LEASE = """\
import runpy, sys
sys.path.insert(0, {folder!r})
import metering_processor
metering_processor.LEASE_SECONDS = {seconds}
sys.argv = sys.argv[2:]  # [python, script, arguments...] as the harness starts them
metering_processor.script()
"""


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc)."""
    with open(f"/proc/{pid}/stat") as stat_file:
        return stat_file.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def test_a_run_frozen_past_its_lease_before_sending_sends_nothing_once_it_wakes(harness, fake, hours, tmp_path):
    """A run stopped (SIGSTOP, a VM paused, a laptop asleep) after writing its pending hour and
    before sending it wakes with a lease another run has taken over. Before anything more
    leaves it must see that its lease lapsed: otherwise it sends the hour the other run is
    sending, meets its own records as "already exists" from a request it never made, and
    records them as conflicts, in the ledger and the state, though they were billed once and
    by this deployment."""
    harness.use_s3_state()
    env = export_of_one_hour(harness, hours)
    shim = tmp_path / "short_lease.py"
    shim.write_text(SHORT_LEASE.format(folder=str(harness.command()[1].rsplit("/", 1)[0]), seconds=3))
    # The first run stops itself just after writing its pending hour (the second state write, after the services joined).
    sleeper = harness.popen(env=env, faults={"FAULT_SIGNAL_AFTER_STATE_WRITE": "2", "FAULT_SIGNAL": "SIGSTOP"},
                            wrapper=(sys.executable, str(shim)))
    woken = {}
    try:
        for _ in range(600):
            if sleeper.poll() is not None or stopped(sleeper.pid):
                break
            time.sleep(0.1)
        assert sleeper.poll() is None and stopped(sleeper.pid), sleeper.communicate(timeout=10)[0]
        assert harness.state()["deployment"]["pending_hour"]["hour"] == iso(hours[0])
        time.sleep(4)  # its 3 s lease lapses while it is stopped

        def wake_the_sleeper(_records):
            # The taker's records have landed; the sleeper wakes before the answer is read.
            os.kill(sleeper.pid, signal.SIGCONT)
            woken["output"] = sleeper.communicate(timeout=120)[0]

        harness.clazar.faults.append(call(wake_the_sleeper))
        taker = harness.run(env=env)
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, signal.SIGCONT)
            sleeper.kill()
            sleeper.communicate()
    output = woken["output"]
    assert "Took over the lease" in taker.output, taker.output
    assert taker.returncode == 0, taker.output + "\n--- the run that slept:\n" + output
    assert sleeper.returncode == 4, output
    assert "lease" in output and "lapsed" in output, output
    assert harness.clazar.metering_calls == 1, output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert [(line["contract_id"], line["outcome"]) for line in harness.ledger_lines()] == [("c-1", "delivered")]
    deployment = harness.state()["deployment"]
    assert not deployment.get("waiting") and "pending_hour" not in deployment, deployment
    assert deployment["last_processed_hour"] == iso(hours[0])


# --- a write that lands but is answered 500 -----------------------------------------------------


def land_then_fail(fake, key_suffix: str, which: int) -> list[int]:
    """The ``which``-th PutObject of a key ending in ``key_suffix`` lands, then is answered 500
    InternalError, as a store does when it fails after storing the object: botocore retries
    the write, with its condition. Returns the statuses the later attempts got."""
    real, seen, later = fake._put, [0], []

    def put(bucket, key, body, headers):
        outcome = real(bucket, key, body, headers)
        if key.endswith(key_suffix):
            seen[0] += 1
            if seen[0] == which and outcome[0] == 200:
                return 500, "InternalError"
            if seen[0] > which:
                later.append(outcome[0])
        return outcome

    fake._put = put
    return later


@pytest.mark.parametrize("what, suffix, which", [
    ("the state's commit", "metering_state.json", 3),
    ("the hour's ledger file", ".jsonl", 1),
    ("the lease's creation", "metering_state.json.lock", 1),
])
def test_a_write_that_landed_but_was_answered_500_is_not_taken_for_another_runs(harness, fake, hours, what, suffix,
                                                                              which):
    """The retry of a conditional write that had landed meets its own write (412): that is the
    run's own write, not another run's, and the hour is committed as usual."""
    harness.use_s3_state()
    env = export_of_one_hour(harness, hours)
    later = land_then_fail(fake, suffix, which)
    result = harness.run(env=env)
    assert later and later[0] == 412, (what, later)  # the retry met the write that landed
    assert result.returncode == 0, result.output
    assert "changed by another run" not in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert [(line["contract_id"], line["outcome"]) for line in harness.ledger_lines()] == [("c-1", "delivered")]
    deployment = harness.state()["deployment"]
    assert deployment["last_processed_hour"] == iso(hours[0]) and "pending_hour" not in deployment


def test_a_lease_renewal_that_landed_but_was_answered_500_keeps_the_lease(harness, fake, hours, monkeypatch):
    """The same for a renewal: the retried renewal meets the lease it renewed, which is still
    ours; the run goes on and commits its hour. The lease's life is shortened from 900 s to
    3 s (the module's constant) so that it is renewed while Clazar holds the first batch."""
    import metering_processor as mp

    monkeypatch.setattr(mp, "LEASE_SECONDS", 3)
    harness.use_s3_state()
    env = export_of_one_hour(harness, hours)
    later = land_then_fail(fake, "metering_state.json.lock", 2)

    def until_renewed(_records):
        for _ in range(300):
            if later:
                return
            time.sleep(0.1)

    harness.clazar.faults.append(call(until_renewed, before_landing=True))
    result = harness.run(env=env)
    assert later and later[0] == 412, later  # the retried renewal met the renewal that landed
    assert result.returncode == 0, result.output
    assert "Lost the lease" not in result.output and "lapsed" not in result.output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert harness.state()["deployment"]["last_processed_hour"] == iso(hours[0])


# --- an S3 endpoint from the AWS config file -----------------------------------------------------


@pytest.mark.parametrize("proxied", [False, True])
def test_an_s3_endpoint_over_plain_http_from_the_aws_config_file_is_checked_like_the_variable(
        harness, fake, hours, proxied):
    """boto3 also takes the endpoint from the AWS config file (``endpoint_url``): a plain-http
    endpoint there, to another host, would carry the session token and every signed request
    in clear, through any proxy; one to loopback is reached directly, never through the proxy."""
    from test_operations import Listener

    env = export_of_one_hour(harness, hours)
    token = "session-token-from-the-config-file-51d3"
    with Listener("127.0.0.2") as proxy:
        config = harness.folder / "aws-config"
        # 192.0.2.1 is TEST-NET-1, reached by no one: only the proxy could be asked for it.
        endpoint = fake.endpoint if proxied else "http://192.0.2.1:9000"
        config.write_text(f"[default]\nendpoint_url = {endpoint}\n")
        proxies = {name: proxy.url for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")}
        result = harness.run(env={**env, "AWS_ENDPOINT_URL_S3": None, "AWS_CONFIG_FILE": str(config),
                                  "AWS_SESSION_TOKEN": token, **proxies}, separate_process=True, timeout=60)
    assert (proxy.connections, proxy.received) == (0, b""), result.output
    assert token not in result.output
    if proxied:  # a loopback endpoint: used, straight
        assert result.returncode == 0, result.output
        assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    else:
        assert result.returncode == 2, result.output
        assert "the S3 endpoint 'http://192.0.2.1:9000'" in result.output, result.output
        assert "uses plain http:// to '192.0.2.1'" in result.output, result.output
        assert harness.clazar.auth_calls == 0 and harness.state() == {}


# --- a ledger listing that never ends -------------------------------------------------------------


@pytest.mark.parametrize("tokens", [("A", "B"), None])
def test_a_ledger_listing_that_never_ends_stops_retention_with_a_warning(harness, fake, hours, tokens):
    """Ledger retention lists the ledger's folders on S3 like the export's: a listing whose
    tokens cycle (which botocore's paginator lets through) or that is always truncated stops
    at the first token seen again, S3_TIMEOUT_SECONDS or the page cap, with a warning naming
    the prefix; the hour was billed and committed, so the run still succeeds."""
    harness.use_s3_state()
    env = export_of_one_hour(harness, hours)
    fake.never_end_listing("exporter/metering_ledger/", tokens=tokens, delay=0.05)
    ended, code, output = run_or_kill(harness, {**env, "S3_TIMEOUT_SECONDS": "3"}, timeout=60)
    fake.behave()
    assert ended, "the run was still listing the ledger after 60 s:\n" + output
    assert code == 0, output
    assert "Could not delete ledger days older than" in output and \
        "cannot list ledger s3://" in output and "/exporter/metering_ledger" in output, output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2}
    assert harness.state()["deployment"]["last_processed_hour"] == iso(hours[0])


@as_another_user
def test_a_ledger_reached_through_a_link_another_user_planted_is_exit_4_before_anything_is_sent(
        harness, fake, hours, unprivileged):
    """The same for LEDGER_PATH: whoever may swap the link chooses where ledger days are
    written, and which folder's old days retention deletes."""
    base, home = unprivileged
    env = export_of_one_hour(harness, hours)
    shared = folder(base / "shared", 0, 0o1777)  # as /tmp is
    own = folder(base / "own", EXPORTER_UID, 0o700)
    state_folder = folder(base / "state", EXPORTER_UID, 0o700)
    link = shared / "metering_ledger"
    link.symlink_to(own)
    os.lchown(link, PLANTER_UID, PLANTER_UID)
    code, output = run_as_exporter_user(harness, home, {
        **env, "STATE_FILE_PATH": str(state_folder / "metering_state.json"), "LEDGER_PATH": str(link)})
    assert code == 4, output
    assert f"the ledger's path {link} is a symbolic link that belongs to user id {PLANTER_UID}" in output, output
    assert "Point LEDGER_PATH at a folder of your own" in output
    assert "Traceback" not in output
    assert harness.clazar.metering_calls == 0 and harness.clazar.auth_calls == 0
    assert os.listdir(own) == [] and not (state_folder / "metering_state.json").exists()


# --- a secret straddling the cut of an error message -----------------------------------------------


@pytest.mark.parametrize("where", ["hour", "command"])
def test_a_defect_whose_message_carries_a_secret_at_the_cut_shows_none_of_it(harness, fake, hours, monkeypatch,
                                                                             where):
    """Error texts are cut short; masking must come first, or a secret straddling the cut
    keeps its first characters in the log, the state and status."""
    import metering_processor as mp

    env = export_of_one_hour(harness, hours)
    secret = harness.clazar.client_secret
    at = 300 if where == "hour" else 500

    def defect(*_arguments, **_keywords):
        raise RuntimeError("x" * (at - 6) + secret)

    monkeypatch.setattr(mp, "billable_amounts" if where == "hour" else "export", defect)
    result = harness.run(env=env)
    assert result.returncode == 1, result.output
    assert "a defect" in result.output
    status = harness.report("status", "--json", env=env).output
    for text in (result.output, status, json.dumps(harness.state())):
        assert "xxxxxx" + secret[:4] not in text, text
