"""Realistic Omnistrate export files and completion markers, as the export reference shows them."""

from __future__ import annotations

import json
import random
import string
from datetime import datetime, timedelta, timezone

GIB = 1024**3
MARKER_KEY = "omnistrate-metering/last_success_export.json"


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def current_hour() -> datetime:
    return floor_hour(datetime.now(timezone.utc))


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_id(prefix: str, length: int = 10) -> str:
    return prefix + "".join(random.choices(string.ascii_letters + string.digits, k=length))


def record(service: tuple[str, str, str], hour: datetime, *, contract: str | None, subscription: str,
           dimension: str, value, pod: str = "db-0", instance: str = "instance-w8e7r6t5y",
           host: str = "ip-10-4-17-88.ec2.internal", price=None, email: str = "ops@buyer.example", **extra) -> dict:
    """One export record, with every field a real export carries."""
    name, environment, plan = service
    row = {
        "timestamp": iso(hour + timedelta(hours=1, minutes=2, seconds=11)),
        "organizationId": "org-a1b2c3d4e5",
        "organizationName": "Acme Data",
        "customerId": "user-Hq72LmPz0a",
        "customerEmail": email,
        "subscriptionId": subscription,
        "serviceId": "s-Vx81KqT3Lm",
        "serviceName": name,
        "serviceEnvironmentId": "se-P0o9I8u7Y6",
        "serviceEnvironmentType": environment,
        "productTierId": plan,
        "productTierName": "Standard",
        "hostClusterId": "hc-k2j3h4g5f6",
        "instanceId": instance,
        "podName": pod,
        "instanceType": "m6i.large",
        "hostName": host,
        "dimension": dimension,
        "value": value,
    }
    if contract is not None:
        row["externalPayerId"] = contract
    if price is not None:
        row["pricePerUnit"] = price
    row.update(extra)
    return row


def pod_records(service, hour, *, contract, subscription, pod="db-0", cpu=2, memory=2 * GIB, storage=10 * GIB,
                replicas=1) -> list[dict]:
    """The four records of one pod-hour."""
    return [
        record(service, hour, contract=contract, subscription=subscription, pod=pod, dimension=dimension, value=value)
        for dimension, value in (("cpu_core_hours", cpu), ("memory_byte_hours", memory),
                                 ("storage_allocated_byte_hours", storage), ("replica_hours", replicas))
    ]


def files_with_refusals(service, hour, *, unknown_contract: str) -> dict[str, list[dict]]:
    """One hour's files for a stand-in that knows only contract c-1 and not replica_hours:
    c-1's 2 cpu_core_hours are accepted; its replica_hours and ``unknown_contract``'s 5
    cpu_core_hours are refused."""
    return {
        "sub-AAAAAAAAAA": [
            record(service, hour, contract="c-1", subscription="sub-AAAAAAAAAA", dimension="cpu_core_hours", value=2),
            record(service, hour, contract="c-1", subscription="sub-AAAAAAAAAA", dimension="replica_hours", value=1),
        ],
        "sub-BBBBBBBBBB": [record(service, hour, contract=unknown_contract, subscription="sub-BBBBBBBBBB",
                                  dimension="cpu_core_hours", value=5)],
    }


def hour_prefix(service: tuple[str, str, str], hour: datetime) -> str:
    name, environment, plan = service
    return f"omnistrate-metering/{name}/{environment}/{plan}/{hour:%Y/%m/%d/%H}/"


def write_file(client, bucket: str, service, hour: datetime, subscription: str, body) -> str:
    key = hour_prefix(service, hour) + f"{subscription}.json"
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return key


def write_hour(client, bucket: str, service, hour: datetime, files: dict[str, object]) -> list[str]:
    """Write one hour's files: {subscription id: list of records, or raw bytes}."""
    return [write_file(client, bucket, service, hour, subscription, body) for subscription, body in files.items()]


def service_key(service: tuple[str, str, str]) -> str:
    return ":".join(service)


def write_marker(client, bucket: str, entries: dict[str, datetime]) -> None:
    """The completion marker: data of each key is final before the given moment
    (written as last_processed_to = moment - 1 s, as Omnistrate does)."""
    document = {
        key: {"last_processed_to": iso(final_before - timedelta(seconds=1)),
              "last_updated_at": iso(final_before + timedelta(minutes=5))}
        for key, final_before in entries.items()
    }
    client.put_object(Bucket=bucket, Key=MARKER_KEY, Body=json.dumps(document).encode())
