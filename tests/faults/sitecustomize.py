"""Crash and signal injection for the end-to-end tests.

Python imports ``sitecustomize`` at start-up from PYTHONPATH, so a test that puts
this folder there can kill or signal the real script at an exact step without the
script having any hook of its own. The exporter never ships with this file.

FAULT_KILL_BEFORE_STATE_WRITE=N    SIGKILL just before the N-th write of the state
FAULT_KILL_AFTER_STATE_WRITE=N     SIGKILL just after the N-th write of the state
FAULT_KILL_AFTER_BATCH=N           SIGKILL as the N-th metering response arrives,
                                   before the script can read it
FAULT_SIGNAL_AFTER_STATE_WRITE=N   FAULT_SIGNAL just after the N-th write of the state
FAULT_SIGNAL_AFTER_BATCH=N         FAULT_SIGNAL as the N-th metering response arrives
FAULT_SIGNAL_ON_READ=N             FAULT_SIGNAL as the N-th export file is read
FAULT_SIGNAL=SIGTERM               the signal those send (SIGTERM or SIGINT)
FAULT_HANG_BEFORE_STATE_WRITE=N    FAULT_SIGNAL, then hang for an hour, just before the
                                   N-th write of the state (a store that stops answering)
FAULT_HANG_AFTER_STATE_WRITE=N     the same just after it (the write landed, its answer
                                   never comes)
FAULT_DEFECT_ON_BATCH=N            raise RuntimeError (an error no code expects, as a
                                   defect would) as the N-th metering request leaves

A state write is an ``os.replace`` onto STATE_FILE_PATH, or a PutObject of its key
when it is an ``s3://`` URL. An export file read is a GetObject of a key under
omnistrate-metering/ other than the marker.
"""

import itertools
import os
import signal
import time


def _limit(name):
    value = os.environ.get(name)
    return int(value) if value else None


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _stop():
    # The process signals itself, as systemd, Kubernetes or docker stop would.
    os.kill(os.getpid(), getattr(signal, os.environ.get("FAULT_SIGNAL", "SIGTERM")))


def _hang():
    _stop()
    time.sleep(3600)


def _defect():
    raise RuntimeError("injected defect")


def _install():
    triggers = {
        "before write": [(_limit("FAULT_KILL_BEFORE_STATE_WRITE"), _die), (_limit("FAULT_HANG_BEFORE_STATE_WRITE"), _hang)],
        "after write": [(_limit("FAULT_KILL_AFTER_STATE_WRITE"), _die), (_limit("FAULT_SIGNAL_AFTER_STATE_WRITE"), _stop),
                        (_limit("FAULT_HANG_AFTER_STATE_WRITE"), _hang)],
        "batch": [(_limit("FAULT_KILL_AFTER_BATCH"), _die), (_limit("FAULT_SIGNAL_AFTER_BATCH"), _stop)],
        "read": [(_limit("FAULT_SIGNAL_ON_READ"), _stop)],
        "request": [(_limit("FAULT_DEFECT_ON_BATCH"), _defect)],
    }
    counts = {"writes": 0}
    # next() of a count is atomic: reads and batches happen on several threads at once.
    reads, batches, requests_sent = itertools.count(1), itertools.count(1), itertools.count(1)

    def wanted(*moments):
        return any(limit for moment in moments for limit, _ in triggers[moment])

    def fire(moment, count):
        for limit, action in triggers[moment]:
            if limit == count:
                action()

    def state_write(perform):
        counts["writes"] += 1
        fire("before write", counts["writes"])
        result = perform()
        fire("after write", counts["writes"])
        return result

    state_path = os.environ.get("STATE_FILE_PATH", "")
    s3_state = state_path.startswith("s3://") and wanted("before write", "after write")
    if s3_state or wanted("read"):
        import botocore.client

        bucket, _, key = state_path[5:].partition("/")
        original_call = botocore.client.BaseClient._make_api_call

        def make_api_call(self, operation, params):
            if s3_state and operation == "PutObject" and params.get("Bucket") == bucket and params.get("Key") == key:
                return state_write(lambda: original_call(self, operation, params))
            object_key = params.get("Key", "")
            if operation == "GetObject" and object_key.startswith("omnistrate-metering/") \
                    and not object_key.endswith("last_success_export.json"):
                fire("read", next(reads))
            return original_call(self, operation, params)

        botocore.client.BaseClient._make_api_call = make_api_call
    if not state_path.startswith("s3://") and wanted("before write", "after write"):
        target = os.path.abspath(state_path)
        original_replace = os.replace

        def replace(source, destination, **kwargs):
            if os.path.abspath(destination) == target:
                return state_write(lambda: original_replace(source, destination, **kwargs))
            return original_replace(source, destination, **kwargs)

        os.replace = replace

    if wanted("batch", "request"):
        import requests

        original_send = requests.Session.send

        def send(self, request, **kwargs):
            if request.method == "POST" and request.url.rstrip("/").endswith("/metering"):
                fire("request", next(requests_sent))
            response = original_send(self, request, **kwargs)
            if request.method == "POST" and request.url.rstrip("/").endswith("/metering"):
                fire("batch", next(batches))
            return response

        requests.Session.send = send


_install()
