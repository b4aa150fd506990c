"""An in-memory S3 on loopback that can be told to misbehave, for the hostile-infrastructure
tests (issue 19): the exporter must stay bounded and refuse what it cannot trust whatever
the store does.

What it speaks, path-style (``http://127.0.0.1:<port>/<bucket>/<key>``), as much as boto3
and the exporter use:

- CreateBucket (``PUT /bucket``) and HeadBucket;
- ListObjectsV2 (``GET /bucket?list-type=2``) with ``prefix``, ``delimiter`` (common
  prefixes), ``max-keys`` (default 1,000) and continuation tokens;
- GetObject and HeadObject;
- PutObject, honouring ``If-None-Match: *`` (412 if the object exists) and
  ``If-Match: <ETag>`` (412 if it is another, 404 if there is none);
- DeleteObject, honouring ``If-Match``.

ETags are the MD5 of the body, quoted, as S3 gives for a single-part upload.

What it does not: authentication (any signature, or none, is accepted: it is a stand-in,
not a test of SigV4), DeleteObjects (the exporter deletes one object at a time), ListObjects
version 1, multipart uploads, ranges, versions, ACLs, checksums (sent ones are ignored),
``aws-chunked`` uploads, virtual-hosted addressing, regions.

Misbehaviours, set by the test at any time (keys are object keys, in whichever bucket):

- ``ignored_conditions``: the conditional headers ignored ({"If-Match", "If-None-Match"}:
  both, as some S3-compatible stores do; AWS itself only honours them since 2024);
- ``never_end_listing(prefix, tokens, delay)``: a listing of a prefix under ``prefix`` is
  always truncated, its continuation tokens cycling through ``tokens`` (A, B, A, B by
  default; None gives a new token every page), each page ``delay`` seconds late;
- ``lie_about_length(key, claimed)``: GetObject and HeadObject say ``Content-Length:
  claimed`` whatever the body (None: no length at all, the body ending with the
  connection), and ``Connection: close``;
- ``lie_in_listing(key, size)``: the listing gives ``size`` as the object's Size;
- ``trickle(key, interval)``: GetObject sends the body one byte per ``interval`` seconds,
  until it is stopped or the reader hangs up.

A state or ledger object larger than allowed is simply put there (``put``), served as it
is or with one of the lies above. ``behave()`` ends every misbehaviour.

``sent[key]`` is how many bytes of the last GetObject of ``key`` reached the socket before
the body ended or the reader hung up: a reader that stops early leaves most of a large body
unsent (the kernel's buffers hold a few MiB).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
LISTED_TIME = "2026-01-01T00:00:00.000Z"


def etag_of(body: bytes) -> str:
    return '"' + hashlib.md5(body).hexdigest() + '"'  # noqa: S324 - S3's ETag, not security


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _untoken(token: str) -> str:
    return base64.urlsafe_b64decode(token.encode()).decode()


class FakeS3:
    """The server: ``start()`` (or ``with``), then ``endpoint`` for AWS_ENDPOINT_URL_S3."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, tuple[bytes, str]]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path and query), in order
        self.ignored_conditions: set[str] = set()
        self.endless: dict[str, tuple[tuple[str, ...] | None, float]] = {}
        self.claimed_lengths: dict[str, int | None] = {}
        self.listed_sizes: dict[str, int] = {}
        self.trickled: dict[str, float] = {}
        self.sent: dict[str, int] = {}
        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeS3:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-s3", daemon=True).start()
        return self

    def stop(self) -> None:
        self.closing.set()  # ends trickles
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeS3:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def client(self):
        """A boto3 client of this store, for the test's own reads and writes."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="fake", aws_secret_access_key="fake-secret",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    # --- content, directly --------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        with self.lock:
            self.buckets.setdefault(bucket, {})

    def put(self, bucket: str, key: str, body: bytes) -> str:
        with self.lock:
            self.buckets.setdefault(bucket, {})[key] = (body, etag_of(body))
        return etag_of(body)

    def get(self, bucket: str, key: str) -> bytes | None:
        with self.lock:
            found = self.buckets.get(bucket, {}).get(key)
        return None if found is None else found[0]

    # --- misbehaviours ------------------------------------------------------------------

    def behave(self) -> None:
        """Speak S3 as it should from now on."""
        self.ignored_conditions = set()
        self.endless.clear()
        self.claimed_lengths.clear()
        self.listed_sizes.clear()
        self.trickled.clear()

    def never_end_listing(self, prefix: str, tokens: tuple[str, ...] | None = ("A", "B"),
                          delay: float = 0.0) -> None:
        self.endless[prefix] = (tokens, delay)

    def lie_about_length(self, key: str, claimed: int | None) -> None:
        self.claimed_lengths[key] = claimed

    def lie_in_listing(self, key: str, size: int) -> None:
        self.listed_sizes[key] = size

    def trickle(self, key: str, interval: float) -> None:
        self.trickled[key] = interval

    # --- the protocol -----------------------------------------------------------------

    def _listing(self, bucket: str, query: dict[str, str]) -> tuple[int, bytes]:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        token = query.get("continuation-token")
        with self.lock:
            objects = {key: value for key, value in self.buckets[bucket].items()
                       if key.startswith(prefix)}
        endless = next((rule for start, rule in self.endless.items() if prefix.startswith(start)),
                       None)
        if endless is not None:
            tokens, delay = endless
            time.sleep(delay)
            if tokens is None:
                following = str(int(token or "0") + 1)
            else:
                following = tokens[(tokens.index(token) + 1) % len(tokens)] \
                    if token in tokens else tokens[0]
            return 200, self._listing_xml(bucket, prefix, delimiter, sorted(objects), [], objects,
                                          token, following)
        entries: list[str] = []  # keys and common prefixes, in order, each once
        prefixes: set[str] = set()
        for key in sorted(objects):
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common not in prefixes:
                    prefixes.add(common)
                    entries.append(common)
            else:
                entries.append(key)
        after = _untoken(token) if token else query.get("start-after", "")
        entries = [entry for entry in entries if entry > after]
        size = int(query.get("max-keys", "1000"))
        page, more = entries[:size], len(entries) > size
        return 200, self._listing_xml(bucket, prefix, delimiter,
                                      [entry for entry in page if entry not in prefixes],
                                      [entry for entry in page if entry in prefixes], objects,
                                      token, _token(page[-1]) if more else None)

    def _listing_xml(self, bucket: str, prefix: str, delimiter: str, keys: list[str],
                     common: list[str], objects: dict[str, tuple[bytes, str]],
                     token: str | None, following: str | None) -> bytes:
        parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{XMLNS}">',
                 f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
                 f"<KeyCount>{len(keys) + len(common)}</KeyCount><MaxKeys>1000</MaxKeys>",
                 f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "",
                 f"<IsTruncated>{'true' if following else 'false'}</IsTruncated>",
                 f"<ContinuationToken>{escape(token)}</ContinuationToken>" if token else "",
                 f"<NextContinuationToken>{escape(following)}</NextContinuationToken>"
                 if following else ""]
        for key in keys:
            body, etag = objects[key]
            size = self.listed_sizes.get(key, len(body))
            parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{LISTED_TIME}"
                         f"</LastModified><ETag>{escape(etag)}</ETag><Size>{size}</Size>"
                         "<StorageClass>STANDARD</StorageClass></Contents>")
        parts += [f"<CommonPrefixes><Prefix>{escape(name)}</Prefix></CommonPrefixes>"
                  for name in common]
        parts.append("</ListBucketResult>")
        return "".join(parts).encode()

    def _put(self, bucket: str, key: str, body: bytes, headers: Any) -> tuple[int, str]:
        """(status, S3 error code or the new ETag)."""
        with self.lock:
            objects = self.buckets[bucket]
            found = objects.get(key)
            if headers.get("If-None-Match") == "*" and found is not None \
                    and "If-None-Match" not in self.ignored_conditions:
                return 412, "PreconditionFailed"
            refused = self._if_match_refusal(found, headers)
            if refused:
                return refused
            objects[key] = (body, etag_of(body))
            return 200, etag_of(body)

    def _if_match_refusal(self, found: Any, headers: Any) -> tuple[int, str] | None:
        """S3's answer to an If-Match the object ``found`` (or its absence) fails, unless
        the fake ignores If-Match."""
        wanted = headers.get("If-Match")
        if wanted is None or "If-Match" in self.ignored_conditions:
            return None
        if found is None:
            return 404, "NoSuchKey"
        return (412, "PreconditionFailed") if wanted != found[1] else None

    def _delete(self, bucket: str, key: str, headers: Any) -> tuple[int, str]:
        with self.lock:
            objects = self.buckets[bucket]
            found = objects.get(key)
            refused = self._if_match_refusal(found, headers)
            if refused:
                return refused
            objects.pop(key, None)
            return 204, ""

    def _handler_class(self) -> type:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _target(self) -> tuple[str, str, dict[str, str]]:
                parts = urlsplit(self.path)
                bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
                query = {name: values[0] for name, values in
                         parse_qs(parts.query, keep_blank_values=True).items()}
                with store.lock:
                    store.requests.append((self.command, self.path))
                return bucket, key, query

            def _answer(self, status: int, body: bytes = b"", headers: dict | None = None,
                        length: int | None = -1, key: str = "") -> None:
                """Answer ``body`` with its length, or with ``length`` (None: none), in which
                case the connection is closed after it."""
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if length is None or length >= 0:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                if length is not None:
                    self.send_header("Content-Length", str(len(body) if length < 0 else length))
                self.end_headers()
                if self.command == "HEAD":
                    return
                view, sent = memoryview(body), 0
                try:
                    while sent < len(body):
                        self.wfile.write(view[sent:sent + 65536])
                        sent = min(len(body), sent + 65536)
                except OSError:  # the reader hung up
                    self.close_connection = True
                finally:
                    if key:
                        store.sent[key] = sent

            def _error(self, status: int, code: str, resource: str = "") -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{code}</Message><Resource>{escape(resource)}</Resource>"
                        "</Error>").encode()
                self._answer(status, body, {"Content-Type": "application/xml"})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _bucket_exists(self, bucket: str) -> bool:
                with store.lock:
                    found = bucket in store.buckets
                if not found:
                    self._error(404, "NoSuchBucket", bucket)
                return found

            def do_PUT(self) -> None:
                bucket, key, _ = self._target()
                body = self._body()
                if not key:
                    store.create_bucket(bucket)
                    self._answer(200, headers={"Location": "/" + bucket})
                    return
                if not self._bucket_exists(bucket):
                    return
                status, outcome = store._put(bucket, key, body, self.headers)
                if status == 200:
                    self._answer(200, headers={"ETag": outcome})
                else:
                    self._error(status, outcome, key)

            def do_DELETE(self) -> None:
                bucket, key, _ = self._target()
                self._body()
                if not self._bucket_exists(bucket):
                    return
                status, outcome = store._delete(bucket, key, self.headers)
                if status == 204:
                    self._answer(204)
                else:
                    self._error(status, outcome, key)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                bucket, key, query = self._target()
                if not self._bucket_exists(bucket):
                    return
                if not key:
                    if self.command == "HEAD":
                        self._answer(200)
                    elif query.get("list-type") == "2":
                        status, body = store._listing(bucket, query)
                        self._answer(status, body, {"Content-Type": "application/xml"})
                    else:
                        self._error(501, "NotImplemented", bucket)
                    return
                with store.lock:
                    found = store.buckets[bucket].get(key)
                if found is None:
                    self._error(404, "NoSuchKey", key)
                    return
                body, etag = found
                headers = {"ETag": etag, "Content-Type": "application/octet-stream",
                           "Last-Modified": formatdate(usegmt=True)}
                if key in store.claimed_lengths:
                    self._answer(200, body, headers, store.claimed_lengths[key], key)
                elif key in store.trickled and self.command == "GET":
                    self._trickle(body, headers, store.trickled[key])
                else:
                    self._answer(200, body, headers, key=key)

            def _trickle(self, body: bytes, headers: dict, interval: float) -> None:
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.close_connection = True
                try:
                    for index in range(len(body)):
                        if store.closing.wait(interval):
                            return
                        self.wfile.write(body[index:index + 1])
                        self.wfile.flush()
                except OSError:  # the reader hung up
                    pass

        return Handler
