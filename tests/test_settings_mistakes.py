"""A new adopter's mistakes with the settings: each must stop the run at once with exit 2
naming the variable, and the advice the exporter gives must bill what the adopter billed
before."""

from __future__ import annotations

import metering_processor as mp
import pytest

BASE = {"S3_BUCKET_NAME": "your-export-bucket", "SERVICES": "Postgres:PROD:pt-HJSv20iWX0=aws",
        "CLAZAR_CLIENT_ID": "id", "CLAZAR_CLIENT_SECRET": "secret-value",
        # Nothing listens there: a run that got past its settings would fail, not reach S3.
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true", "CLAZAR_MAX_RETRIES": "0", "S3_TIMEOUT_SECONDS": "1"}


@pytest.mark.parametrize("value", ["s3://your-export-bucket", "your-export-bucket/omnistrate-metering",
                                   "s3://your-export-bucket/omnistrate-metering/", "your export bucket"])
def test_a_bucket_written_as_a_url_or_with_a_folder_is_a_setting_error(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert mp.main(["--dry-run"], {**BASE, "S3_BUCKET_NAME": value}) == 2
    error = capsys.readouterr().err
    assert "S3_BUCKET_NAME" in error and "without s3://" in error


@pytest.mark.parametrize("value", ["your-export-bucket", "omnistrate.usage_Export-2",
                                   "arn:aws:s3:us-east-1:123456789012:accesspoint/metering",
                                   "arn:aws:s3-outposts:us-east-1:123456789012:outpost/op-01ac5d28a6a232904/accesspoint/m"])
def test_bucket_names_and_access_points_are_accepted(value):
    assert mp.load_config({**BASE, "S3_BUCKET_NAME": value}).bucket == value


@pytest.mark.parametrize("variable, value", [
    ("STATE_FILE_PATH", "S3://your-state-bucket/metering/metering_state.json"),
    ("STATE_FILE_PATH", "s3:/your-state-bucket/metering/metering_state.json"),
    ("STATE_FILE_PATH", "s3:your-state-bucket/metering/metering_state.json"),
    ("LEDGER_PATH", "S3://your-state-bucket/metering/metering_ledger"),
])
def test_a_misspelt_s3_location_is_refused_rather_than_kept_on_local_disk(variable, value, tmp_path, monkeypatch,
                                                                          capsys):
    """Taken as a local path, it would start a new deployment's state (billing from START_HOUR
    again) or ledger in a folder named S3: beside the run."""
    monkeypatch.chdir(tmp_path)
    assert mp.main([], {**BASE, variable: value}) == 2
    assert variable in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_advice_for_a_quantity_above_the_limit_keeps_the_other_dimensions_billed():
    """Without formulas every Omnistrate dimension is sent; once one DIMENSION<n> is set only
    those are. The suggested formula alone would bill memory and stop billing the rest."""
    record = mp.metering_records(mp.parse_hour("2026-02-10T14:00:00Z"),
                                 {("c-1", "memory_byte_hours"): 2**31}, {"c-1": "aws"})[0]
    problem = mp.over_limit(record, 2**31 - 1)
    assert "DIMENSION1_FORMULA=memory_byte_hours/1073741824" in problem
    assert "every other dimension you bill" in problem and "only the DIMENSION<n> dimensions are sent" in problem


@pytest.mark.parametrize("variable, value", [
    ("DIMENSION2_FORMULA", '"memory_byte_hours/1073741824"'), ("CLAZAR_CLIENT_ID", "'your-clazar-client-id'"),
    ("SERVICES", '"Acme Vector DB:PROD:pt-Q7rT2bX9kL=aws"'), ("METRICS_FILE", '"/var/lib/metering.prom"'),
])
def test_a_value_docker_would_read_with_its_quotes_is_named(variable, value):
    """`docker run --env-file` keeps quotes: a quoted client id was sent to Clazar as it stood
    (refused, every run), a quoted formula refused as one that 'may only contain numbers'."""
    environment = {**BASE, variable: value, "DIMENSION1_NAME": "memory_gib_hours",
                   "DIMENSION1_FORMULA": "memory_byte_hours/1073741824"}
    if variable == "DIMENSION2_FORMULA":
        environment["DIMENSION2_NAME"] = "memory_units"
    with pytest.raises(mp.ConfigError, match="wrapped in quotes") as error:
        mp.load_config(environment)
    assert error.value.variable == variable


def test_a_secret_may_begin_and_end_with_a_quote():
    assert mp.load_config({**BASE, "CLAZAR_CLIENT_SECRET": '"s3cr3t"'}).client_secret == '"s3cr3t"'


@pytest.mark.parametrize("arguments", [["retry-failed"], ["retry-failed", "--dry-run"],
                                       ["retry-failed", "--contract", "c-1"]])
def test_retry_failed_with_nothing_waiting_says_so(arguments, tmp_path, monkeypatch, capsys):
    """As `conflicts` says "No conflict waiting.": an operator following the runbook must be
    able to tell "nothing to resend" from a command that did nothing."""
    monkeypatch.chdir(tmp_path)
    assert mp.main(arguments, {**BASE, "STATE_FILE_PATH": str(tmp_path / "metering_state.json")}) == 0
    output = capsys.readouterr()
    assert "No rejected record waiting" in output.out + output.err
