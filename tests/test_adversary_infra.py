"""Hostile infrastructure and secrets, the cases the other hostile tests leave open: a
password in a URL refused for another reason, a state reached through a link that another
user planted in a folder open to all."""

from __future__ import annotations

import pytest
from conftest import one_hour

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
