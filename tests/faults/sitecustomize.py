"""Crash injection for the end-to-end tests.

Python imports ``sitecustomize`` at start-up from PYTHONPATH, so a test that puts
this folder there can kill the real script at an exact step without the script
having any hook of its own. The exporter never ships with this file.

FAULT_KILL_BEFORE_STATE_WRITE=N  SIGKILL just before the N-th write of the state
FAULT_KILL_AFTER_STATE_WRITE=N   SIGKILL just after the N-th write of the state
FAULT_KILL_AFTER_BATCH=N         SIGKILL as the N-th metering response arrives,
                                 before the script can read it
FAULT_DEFECT_ON_BATCH=N          raise RuntimeError (an error no code expects, as
                                 a defect would) as the N-th metering request leaves

A state write is an ``os.replace`` onto STATE_FILE_PATH, or a PutObject of its key
when it is an ``s3://`` URL.
"""

import os
import signal


def _limit(name):
    value = os.environ.get(name)
    return int(value) if value else None


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _install():
    before_write = _limit("FAULT_KILL_BEFORE_STATE_WRITE")
    after_write = _limit("FAULT_KILL_AFTER_STATE_WRITE")
    after_batch = _limit("FAULT_KILL_AFTER_BATCH")
    defect_on_batch = _limit("FAULT_DEFECT_ON_BATCH")
    state_path = os.environ.get("STATE_FILE_PATH", "")
    counts = {"writes": 0, "batches": 0}

    def state_write(perform):
        counts["writes"] += 1
        if counts["writes"] == before_write:
            _die()
        result = perform()
        if counts["writes"] == after_write:
            _die()
        return result

    if before_write or after_write:
        if state_path.startswith("s3://"):
            import botocore.client

            bucket, _, key = state_path[5:].partition("/")
            original_call = botocore.client.BaseClient._make_api_call

            def make_api_call(self, operation, params):
                if operation == "PutObject" and params.get("Bucket") == bucket and params.get("Key") == key:
                    return state_write(lambda: original_call(self, operation, params))
                return original_call(self, operation, params)

            botocore.client.BaseClient._make_api_call = make_api_call
        else:
            target = os.path.abspath(state_path)
            original_replace = os.replace

            def replace(source, destination, **kwargs):
                if os.path.abspath(destination) == target:
                    return state_write(lambda: original_replace(source, destination, **kwargs))
                return original_replace(source, destination, **kwargs)

            os.replace = replace

    if after_batch or defect_on_batch:
        import requests

        original_send = requests.Session.send

        def send(self, request, **kwargs):
            if request.method == "POST" and request.url.rstrip("/").endswith("/metering"):
                counts["requests"] = counts.get("requests", 0) + 1
                if counts["requests"] == defect_on_batch:
                    raise RuntimeError("injected defect")
            response = original_send(self, request, **kwargs)
            if request.method == "POST" and request.url.rstrip("/").endswith("/metering"):
                counts["batches"] += 1
                if counts["batches"] == after_batch:
                    _die()
            return response

        requests.Session.send = send


_install()
