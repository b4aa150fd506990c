"""The export's read path: files read on a pool of threads whose deadline read_all watches."""

from __future__ import annotations

import pytest
from conftest import Harness, cpu, run_or_kill
from export_data import iso
from fake_s3 import FakeS3

import metering_processor as mp

EXPORT = "export"


@pytest.fixture
def fake():
    with FakeS3() as server:
        yield server


@pytest.fixture
def harness(fake, clazar, tmp_path) -> Harness:
    fake.create_bucket(EXPORT)
    harness = Harness(fake.client(), fake, EXPORT, clazar, tmp_path)
    harness.env["S3_TIMEOUT_SECONDS"] = "10"
    return harness


def test_reads_abandoned_past_their_deadline_do_not_starve_the_hours_read_after_them(harness, fake, hours):
    """A late-usage check whose files all trickle fails that check at S3_TIMEOUT_SECONDS and
    the run goes on: the reads it abandoned must not keep the pool's every thread, or the
    hours due after it are never read (nor timed out) and the run bills nothing."""
    env = {"START_HOUR": iso(hours[0]), "LATE_USAGE_LOOKBACK_HOURS": "24"}
    harness.write_hour(hours[0], {"sub-AAAAAAAAAA": [cpu(hours[0], "c-1", "sub-AAAAAAAAAA", 2)]})
    harness.write_marker(hours.final(1))
    result = harness.run(env=env)
    assert result.returncode == 0, result.output
    # Files added to the billed hour, as many as the pool has threads, each a trickle.
    late = {f"sub-T{n:09d}": [cpu(hours[0], "c-1", f"sub-T{n:09d}", 1)]
            for n in range(mp.S3_READ_CONCURRENCY)}
    for key in harness.write_hour(hours[0], late):
        fake.trickle(key, 0.5)
    harness.write_hour(hours[1], {"sub-AAAAAAAAAA": [cpu(hours[1], "c-1", "sub-AAAAAAAAAA", 3)]})
    harness.write_marker(hours.final(2))
    ended, code, output = run_or_kill(harness, {**env, "S3_TIMEOUT_SECONDS": "2"}, timeout=40)
    assert ended, "the run never read the hour due after the failed check:\n" + output
    assert "checking hour" in output and "S3_TIMEOUT_SECONDS" in output, output
    assert harness.clazar.accepted_quantities() == {("c-1", "cpu_core_hours", iso(hours[0])): 2,
                                                    ("c-1", "cpu_core_hours", iso(hours[1])): 3}
