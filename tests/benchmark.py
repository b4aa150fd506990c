"""Catch-up benchmark: the exporter against a sequential reader and the floor.

    .venv/bin/python tests/benchmark.py                 # 6 h x 100 files x 8 records
    .venv/bin/python tests/benchmark.py --scale         # time at 1x, 4x and 16x the files
    .venv/bin/python tests/benchmark.py --memory        # peak RSS at 1, 2 and 4 h x 5,000 files
    .venv/bin/python tests/benchmark.py --waiting       # status and retry-failed with up to 1,000,000 waiting records

It starts SeaweedFS behind a proxy that adds a fixed delay to each S3 request, and
the Clazar stand-in with a fixed delay per call; writes H hours x F files x R records
of realistic export data and the completion marker; then, alternating and repeating
(median of --repeat runs), times three programs, each a fresh Python process:

1. the exporter catching up all H hours (metering_processor.py, as cron runs it);
2. a naive sequential reader: list, then get, parse and sum one object at a time;
3. the floor: list, then concurrent get and JSON parse of every object, nothing else.

It checks the exporter's totals are exactly right and prints wall time, peak RSS and
the ratios exporter/floor and sequential/exporter. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

SERVICE = ("Acme Vector DB", "PROD", "pt-Q7rT2bX9kL")
SECRET = "benchmark-client-secret-0123456789"


# --- the two reference readers (run as their own processes) -----------------------


def _client(pool: int):
    """The exporter's own S3 client, so that only the way of reading differs."""
    sys.path.insert(0, str(TESTS.parent))
    from metering_processor import s3_client

    return s3_client(pool)


def _keys(client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", ()) if item["Key"].endswith(".json")]
    return keys


def read_sequential(bucket: str, prefixes: list[str]) -> dict:
    client = _client(1)
    totals: dict[str, int] = defaultdict(int)
    for prefix in prefixes:
        for key in _keys(client, bucket, prefix):
            for row in json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read()):
                totals[row["dimension"]] += row["value"]
    return totals


def read_floor(bucket: str, prefixes: list[str], workers: int) -> dict:
    client = _client(workers)
    keys = [key for prefix in prefixes for key in _keys(client, bucket, prefix)]
    with ThreadPoolExecutor(workers) as pool:
        documents = pool.map(lambda key: json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read()), keys)
        return {"objects": sum(1 for _ in documents)}


# --- the harness --------------------------------------------------------------------


def write_data(client, bucket: str, hours: int, files: int, records: int, start) -> dict:
    """H x F files of R records: each file one subscription of one contract, R/4 pods of 4 dimensions."""
    from export_data import GIB, record, write_file, write_marker

    expected: dict[tuple[str, str], int] = defaultdict(int)
    jobs = []
    for h in range(hours):
        hour = start + timedelta(hours=h)
        for f in range(files):
            contract = f"5d0c9e2a-7b41-4f3e-9a6d-{f:012d}"
            subscription = f"sub-{f:010d}"
            rows = []
            for r in range(records):
                dimension, value = [("cpu_core_hours", 2 + f % 3), ("memory_byte_hours", 2 * GIB + f),
                                    ("storage_allocated_byte_hours", 10 * GIB), ("replica_hours", 1)][r % 4]
                rows.append(record(SERVICE, hour, contract=contract, subscription=subscription, dimension=dimension,
                                   value=value, pod=f"db-{r // 4}", price=0.05))
                expected[contract, dimension] += value
            jobs.append((hour, subscription, rows))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda job: write_file(client, bucket, SERVICE, job[0], job[1], job[2]), jobs))
    write_marker(client, bucket, {":".join(SERVICE): start + timedelta(hours=hours)})
    return dict(expected)


def _watch_peak_rss(pid: int, program: str, peak: list[float], done: threading.Event) -> None:
    """Follow the child's VmHWM (its peak RSS) in /proc until it exits.

    The rusage of a child is no use here: its peak includes the pages it shared
    with this (large) process between fork and exec. VmHWM restarts at exec, and
    is read only once the child's command line shows it is running ``program``.
    """
    while not done.is_set():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if program.encode() in handle.read():
                    with open(f"/proc/{pid}/status") as status:
                        for line in status:
                            if line.startswith("VmHWM:"):
                                peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except OSError:
            return
        time.sleep(0.02)


def timed(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS in MB, CPU seconds, output) of one child process."""
    began = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0.0], threading.Event()
    watcher = threading.Thread(target=_watch_peak_rss, args=(process.pid, command[1], peak, done), daemon=True)
    watcher.start()
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - began
    watcher.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command[1:3]} exited {process.returncode}:\n{output[-3000:]}")
    return elapsed, peak[0], usage.ru_utime + usage.ru_stime, output


class Bench:
    def __init__(self, arguments):
        from clazar_standin import ClazarStandIn
        from servers import ADMIN, SeaweedFS, TCPProxy

        self.arguments = arguments
        self.folder = Path(tempfile.mkdtemp(prefix="metering-bench-"))
        self.seaweed = SeaweedFS(self.folder / "seaweedfs").start()
        self.proxy = TCPProxy(self.seaweed.s3_port, delay=arguments.s3_delay)
        self.clazar = ClazarStandIn(client_secret=SECRET, delay=arguments.clazar_delay, max_batch=None).start()
        self.s3 = self.seaweed.client()
        self.env = {
            "PATH": os.environ.get("PATH", ""), "HOME": str(self.folder),
            "AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.proxy.endpoint, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "SERVICES": ":".join(SERVICE), "CLAZAR_CLIENT_ID": self.clazar.client_id,
            "CLAZAR_CLIENT_SECRET": SECRET, "CLAZAR_API_URL": self.clazar.metering_url,
            # The data bills raw byte-hours, above AWS's per-record limit.
            "MAX_RECORD_QUANTITY": str(2**63 - 1),
        }
        self.runs = 0

    def close(self):
        self.clazar.stop()
        self.proxy.close()
        self.seaweed.stop()

    def dataset(self, hours: int, files: int, records: int):
        from export_data import current_hour

        bucket = f"bench-{hours}x{files}x{records}-{int(time.time() * 1000) % 10**8}"
        self.s3.create_bucket(Bucket=bucket)
        start = current_hour() - timedelta(hours=hours + 2)
        expected = write_data(self.s3, bucket, hours, files, records, start)
        prefixes = [f"omnistrate-metering/{'/'.join(SERVICE)}/{start + timedelta(hours=h):%Y/%m/%d/%H}/"
                    for h in range(hours)]
        return bucket, start, expected, prefixes

    def exporter(self, bucket, start, hours, expected=None, extra=None) -> tuple[float, float, float]:
        """Run the exporter over the first ``hours`` hours; check its totals against ``expected``."""
        self.runs += 1
        with self.clazar.lock:
            self.clazar.accepted.clear()
            self.clazar.received.clear()
        env = {**self.env, "S3_BUCKET_NAME": bucket, "START_HOUR": start.strftime("%Y-%m-%dT%H:00:00Z"),
               "MAX_HOURS_PER_RUN": str(hours), "STATE_FILE_PATH": str(self.folder / f"state-{self.runs}.json"),
               # each run its own ledger: a ledger left by an earlier run would make this one a replay
               "LEDGER_PATH": str(self.folder / f"ledger-{self.runs}"),
               **(extra or {})}
        seconds, rss, cpu, output = timed([sys.executable, str(TESTS.parent / "metering_processor.py")], env)
        totals: dict[tuple[str, str], int] = defaultdict(int)
        for (contract, dimension, _), quantity in self.clazar.accepted_quantities().items():
            totals[contract, dimension] += quantity
        if expected is not None and dict(totals) != expected:
            raise AssertionError("the exporter's totals are wrong")
        return seconds, rss, cpu

    def reader(self, mode: str, bucket: str, prefixes: list[str]) -> tuple[float, float, float]:
        command = [sys.executable, __file__, mode, bucket, json.dumps(prefixes), str(self.arguments.floor_workers)]
        seconds, rss, cpu, _ = timed(command, {**self.env, "PYTHONPATH": str(TESTS)})
        return seconds, rss, cpu


def main_benchmark(arguments) -> None:
    bench = Bench(arguments)
    try:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"{platform.platform()}")
        once = arguments.memory or arguments.waiting  # each row is one run
        print(f"S3 delay {arguments.s3_delay * 1000:.0f} ms per request, Clazar delay "
              f"{arguments.clazar_delay * 1000:.0f} ms per call, "
              + ("one run each" if once else f"median of {arguments.repeat}"))
        if arguments.memory:
            return memory(bench, arguments)
        if arguments.waiting:
            return waiting(bench, arguments)
        if arguments.scale:
            return scale(bench, arguments)
        h, f, r = arguments.hours, arguments.files, arguments.records
        bucket, start, expected, prefixes = bench.dataset(h, f, r)
        results = defaultdict(list)
        for i in range(arguments.repeat):
            order = ["exporter", "sequential", "floor"]
            order = order[i % 3:] + order[:i % 3]  # alternate who goes first
            for name in order:
                if name == "exporter":
                    results[name].append(bench.exporter(bucket, start, h, expected))
                else:
                    results[name].append(bench.reader(f"read-{name}", bucket, prefixes))
        median = {name: (statistics.median(t for t, _, _ in runs), max(m for _, m, _ in runs),
                         statistics.median(c for _, _, c in runs)) for name, runs in results.items()}
        print(f"\n{h} hours x {f} files x {r} records ({h * f} objects, {h * f * r} records); exporter totals exact\n")
        print("| program | wall time (s) | its CPU time (s) | peak RSS (MB) |\n|---|---|---|---|")
        for name in ("exporter", "sequential", "floor"):
            print(f"| {name} | {median[name][0]:.2f} | {median[name][2]:.2f} | {median[name][1]:.0f} |")
        print(f"\nexporter / floor = {median['exporter'][0] / median['floor'][0]:.2f} (target <= 1.3)")
        print(f"sequential / exporter = {median['sequential'][0] / median['exporter'][0]:.1f} (target >= 8)")
    finally:
        bench.close()


def scale(bench, arguments) -> None:
    rows = []
    for factor in (1, 4, 16):
        h, f, r = arguments.hours, arguments.files * factor, arguments.records
        bucket, start, expected, _ = bench.dataset(h, f, r)
        times = [bench.exporter(bucket, start, h, expected)[0] for _ in range(arguments.repeat)]
        rows.append((factor, h * f, statistics.median(times)))
    print("\n| data | objects | exporter wall time (s) | ms per object |\n|---|---|---|---|")
    for factor, objects, seconds in rows:
        print(f"| {factor}x | {objects} | {seconds:.2f} | {seconds / objects * 1000:.2f} |")


def memory(bench, arguments) -> None:
    """Peak RSS over 1, 2 and 4 hours of 5,000 files (the 4 hours' totals checked)."""
    bucket, start, expected, _ = bench.dataset(4, 5000, arguments.records)
    print("\n| hours x files | records | exporter wall time (s) | peak RSS (MB) |\n|---|---|---|---|")
    for hours in (1, 2, 4):
        seconds, rss, _ = bench.exporter(bucket, start, hours, expected if hours == 4 else None)
        print(f"| {hours} x 5000 | {hours * 5000 * arguments.records} | {seconds:.2f} | {rss:.0f} |", flush=True)


def waiting(bench, arguments) -> None:
    """Peak RSS and time of status and retry-failed --dry-run with 10,000, 100,000 and
    1,000,000 rejected records waiting (1,000 contracts, one record each per hour), written
    as runs leave them by the suite's own helper."""
    from types import SimpleNamespace

    from conftest import fabricate_waiting
    from export_data import current_hour

    bucket = f"bench-waiting-{int(time.time() * 1000) % 10**8}"
    bench.s3.create_bucket(Bucket=bucket)  # status reads its marker: there is none
    print("\n| records waiting | state (bytes) | ledger (MB) | status (s) | status peak RSS (MB) "
          "| retry-failed --dry-run (s) | its peak RSS (MB) |\n|---|---|---|---|---|---|---|")
    for hours in (10, 100, 1000):
        folder = bench.folder / f"waiting-{hours}"
        state = folder / "metering_state.json"
        folder.mkdir()
        # fabricate_waiting needs of its harness only where the state is.
        count = fabricate_waiting(SimpleNamespace(state_path=state),
                                  [current_hour() - timedelta(hours=h + 1) for h in range(hours)],
                                  [f"c-{i:05d}" for i in range(1000)])
        env = {**bench.env, "S3_BUCKET_NAME": bucket, "STATE_FILE_PATH": str(state)}
        command = [sys.executable, str(TESTS.parent / "metering_processor.py")]
        status_seconds, status_rss, _, _ = timed([*command, "status"], env)
        dry_seconds, dry_rss, _, output = timed([*command, "retry-failed", "--dry-run"], {**env, "LOG_LEVEL": "INFO"})
        assert output.count("Dry run record:") == count
        ledger = sum(path.stat().st_size for path in (folder / "metering_ledger").rglob("*.jsonl"))
        print(f"| {count:,} | {state.stat().st_size:,} | {ledger / 2**20:.0f} | {status_seconds:.2f} | {status_rss:.0f} "
              f"| {dry_seconds:.2f} | {dry_rss:.0f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("read-sequential", "read-floor"):
        mode, bucket, prefixes, workers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
        result = read_sequential(bucket, prefixes) if mode == "read-sequential" else read_floor(bucket, prefixes, workers)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--s3-delay", type=float, default=0.020)
    parser.add_argument("--clazar-delay", type=float, default=0.030)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--floor-workers", type=int, default=64)
    parser.add_argument("--scale", action="store_true", help="exporter time at 1x, 4x and 16x the files")
    parser.add_argument("--memory", action="store_true", help="peak RSS at 1, 2 and 4 hours of 5,000 files")
    parser.add_argument("--waiting", action="store_true", help="status and retry-failed with up to 1,000,000 waiting records")
    main_benchmark(parser.parse_args())


if __name__ == "__main__":
    main()
