"""The exporter end to end on this machine, with no AWS account and no Clazar account.

    make demo

Starts SeaweedFS (an S3 server, from PyPI) and the Clazar stand-in on loopback,
writes a day of realistic Omnistrate export data for two services and the
completion marker, then runs metering_processor.py exactly as cron would (a
config file exported with `set -a`, the Clazar secret in a file of its own, billing
GiB-hours by formula, one deployment on two marketplaces), twice: the first run catches up the day,
the second finds nothing to do. Prints both logs (the first with the routine
lines of all but its first hour left out; the whole log is kept in the work
folder), `status`, and a table of what Clazar received, then shuts everything down.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from clazar_standin import ClazarStandIn  # noqa: E402
from export_data import GIB, current_hour, pod_records, record, service_key, write_hour, write_marker  # noqa: E402
from servers import ADMIN, SeaweedFS  # noqa: E402

BUCKET = "omnistrate-usage-metering-export-demo"
POSTGRES = ("Postgres", "PROD", "pt-HJSv20iWX0")
VECTOR = ("Acme Vector DB", "PROD", "pt-Q7rT2bX9kL")
SECRET = "demo-client-secret-0123456789"
CRON_COMMAND = "set -a && . ./config.env && set +a && exec {python} {script}"
# The exporter's routine INFO lines for each hour; after the first hour the digest leaves them out.
HOUR_LINES = (" - INFO - Processing hour ", " - INFO - Found ", " - INFO - Aggregated ", " - INFO - Sending ",
              " - INFO - Successfully sent ", " - INFO - Saved state to ")


def digest(log: str, whole: Path) -> str:
    """The log with every hour's routine lines but the first hour's left out, and a note of how many."""
    kept, left_out, first_hour_seen, in_first_hour = [], 0, False, False
    for line in log.splitlines():
        if " - INFO - Processing hour " in line:
            in_first_hour, first_hour_seen = not first_hour_seen, True
        if any(marker in line for marker in HOUR_LINES) and not in_first_hour:
            left_out += 1
            continue
        if left_out and " - INFO - Processing hour " not in line:
            kept.append(f"    [... {left_out} lines like the above for the hours after; whole log: {whole}]")
            left_out = 0
        kept.append(line)
    return "\n".join(kept) + "\n"


def write_a_day(client, start) -> None:
    """24 hours for two services: a few subscriptions each, one without a marketplace payer."""
    buyers = {
        POSTGRES: [("sub-Pg00000001", "5d0c9e2a-7b41-4f3e-9a6d-2c8e1f0b7a93", 2),
                   ("sub-Pg00000002", "c1e2a7b0-44d1-4b7e-8a0f-6e3d2b1c9f80", 1)],
        VECTOR: [("sub-Vx00000001", "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", 3),
                 ("sub-Vx00000002", None, 1)],  # no External Payer ID: counted, never sent
    }
    randomness = random.Random(7)
    for hour_index in range(24):
        hour = start + timedelta(hours=hour_index)
        for service, subscriptions in buyers.items():
            files = {}
            for subscription, contract, pods in subscriptions:
                rows = []
                for pod in range(pods):
                    rows += pod_records(service, hour, contract=contract, subscription=subscription, pod=f"db-{pod}",
                                        cpu=2, memory=randomness.choice([2, 4]) * GIB, storage=10 * GIB)
                if service == VECTOR and contract:
                    # A half-GiB sidecar: billed in whole GiB-hours, the half carried to the next hour.
                    rows.append(record(service, hour, contract=contract, subscription=subscription,
                                       pod="sidecar-0", dimension="memory_byte_hours", value=GIB // 2))
                files[subscription] = rows
            write_hour(client, BUCKET, service, hour, files)
    write_marker(client, BUCKET, {service_key(POSTGRES): start + timedelta(hours=24),
                                  service_key(VECTOR): start + timedelta(hours=24)})


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="metering-demo-"))
    print(f"Starting SeaweedFS and the Clazar stand-in on loopback (work folder {folder}) ...", flush=True)
    seaweed = SeaweedFS(folder / "seaweedfs").start()
    clazar = ClazarStandIn(client_secret=SECRET).start()
    try:
        client = seaweed.client()
        client.create_bucket(Bucket=BUCKET)
        start = current_hour() - timedelta(hours=24)
        write_a_day(client, start)
        print(f"Wrote 24 hours of export data for 2 services to s3://{BUCKET}/omnistrate-metering/", flush=True)

        work = folder / "exporter"
        work.mkdir()
        # As the cron recipe keeps it: the secret alone in a file beside config.env, mode 0600.
        (work / "clazar_client_secret").write_text(SECRET + "\n")
        (work / "clazar_client_secret").chmod(0o600)
        (work / "config.env").write_text("\n".join([
            f"S3_BUCKET_NAME={BUCKET}",
            # One deployment, two marketplaces: Postgres sells on AWS, the vector DB on Azure.
            # Quoted: the file is read by the shell, and a service name has spaces.
            f"SERVICES='{service_key(POSTGRES)}=aws,{service_key(VECTOR)}=azure'",
            f"CLAZAR_CLIENT_ID={clazar.client_id}",
            "CLAZAR_CLIENT_SECRET_FILE=./clazar_client_secret",
            f"CLAZAR_API_URL={clazar.metering_url}",
            # The demo sends a whole day at once, as a first deployment catching up would: the
            # exporter warns that 18 of those hours are past AWS's 6-hour window.
            f"START_HOUR={start:%Y-%m-%dT%H:00:00Z}",
            # The listing prices GiB-hours, not byte-hours: formulas convert, exactly, carrying
            # fractions (config.env.example's four dimensions).
            "DIMENSION1_NAME=cpu_core_hours",
            "DIMENSION1_FORMULA=cpu_core_hours",
            "DIMENSION2_NAME=memory_gib_hours",
            "DIMENSION2_FORMULA=memory_byte_hours/1073741824",
            "DIMENSION3_NAME=storage_allocated_gib_hours",
            "DIMENSION3_FORMULA=storage_allocated_byte_hours/1073741824",
            "DIMENSION4_NAME=replica_hours",
            "DIMENSION4_FORMULA=replica_hours",
            "STATE_FILE_PATH=./metering_state.json",
            "METRICS_FILE=./metering.prom",
            f"AWS_ENDPOINT_URL_S3={seaweed.endpoint}",
            f"AWS_ACCESS_KEY_ID={ADMIN[0]}",
            f"AWS_SECRET_ACCESS_KEY={ADMIN[1]}",
            "AWS_DEFAULT_REGION=us-east-1",
            "",
        ]))
        (work / "config.env").chmod(0o600)
        command = CRON_COMMAND.format(python=sys.executable, script=ROOT / "metering_processor.py")
        environment = {"PATH": "/usr/bin:/bin", "HOME": str(work), "AWS_CONFIG_FILE": "/dev/null",
                       "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
        codes = []
        print(f"cron runs, in {work}: {command}\n")
        for number, attempt in ((1, "first run: catching up the day"), (2, "second run: nothing new is final yet")):
            print(f"=== {attempt}", flush=True)
            began = time.monotonic()
            run = subprocess.run(["/bin/sh", "-c", command], cwd=work, env=environment,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            (work / f"run-{number}.log").write_text(run.stdout)
            print(digest(run.stdout, work / f"run-{number}.log"), end="")
            print(f"=== exit code {run.returncode} in {time.monotonic() - began:.1f} s\n", flush=True)
            codes.append(run.returncode)

        status = subprocess.run(["/bin/sh", "-c", command + " status"], cwd=work, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print("=== metering_processor.py status\n" + status.stdout, end="")

        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        hours: set[str] = set()
        for (contract, dimension, hour), quantity in sorted(clazar.accepted_quantities().items()):
            totals[contract][dimension] += quantity
            hours.add(hour)
        dimensions = sorted({dimension for per_contract in totals.values() for dimension in per_contract})
        print(f"=== What Clazar received: totals over {len(hours)} hours")
        widths = [len(dimension) + 2 for dimension in dimensions]
        print(f"{'contract':<37}" + "".join(f"{dimension:>{width}}" for dimension, width in zip(dimensions, widths)))
        for contract, per_contract in sorted(totals.items()):
            print(f"{contract:<37}" + "".join(f"{per_contract.get(dimension, 0):>{width}}"
                                              for dimension, width in zip(dimensions, widths)))
        print(f"{len(clazar.accepted_quantities())} records accepted, each (contract, dimension, hour) once. "
              f"Metrics: {work / 'metering.prom'}")
        return 0 if codes == [0, 0] and not clazar.violations else 1
    finally:
        clazar.stop()
        seaweed.stop()
        shutil.rmtree(folder / "seaweedfs", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
