"""An Aliyun-OSS-protocol test server: moto's in-process S3 backend behind a small WSGI adapter.

No OSS server exists on any package registry, but OSS is close to S3, so this runs moto's S3
Flask app in this process and puts :class:`OssAdapter` in front of it. The adapter makes the
pair answer ``oss2`` the way real OSS does where our code (and oss2's own checks) depend on it:

* it verifies the OSS V1 signature, so a wrong key is refused with OSS's 403 error XML;
* it sends ``x-oss-hash-crc64ecma`` on object PUT/GET/HEAD, UploadPart and
  CompleteMultipartUpload, so oss2's ``enable_crc=True`` check really runs (without the header
  oss2 silently skips it);
* it answers OSS's ListObjects (v1, ``marker``/``NextMarker``) from moto's ListObjectsV2, which
  paginates keys and common prefixes together correctly, and it removes the S3 XML namespace and
  adds the per-object ``<Type>`` that oss2's parser requires.

The HTTP listener can be stopped and started again on the same port while moto's backend (and
so every bucket and object) lives on in this process: that is how a test takes the store "down".
moto keeps its state in module globals, so all servers in one process share their buckets.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode
from xml.etree import ElementTree

import crcmod
import moto.s3.models
import oss2
from moto.core.request import PRESERVED_HEADER_NAMES_ENVIRON_KEY
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from oss2.auth import ProviderAuth
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.test import Client

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: CRC-64/ECMA-182 as OSS reports it (reflected, init and xor-out all ones; oss2.utils.Crc64).
crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)

#: Query parameters that OSS signs (the "sub-resources"). oss2's list is the protocol's list.
SUBRESOURCES: frozenset[str] = ProviderAuth._subresource_key_set

#: Query parameters of OSS's ListObjects (v1); a bucket GET with only these is a listing.
_LIST_V1_PARAMS = {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}
#: Query parameters that leave an object request about the object's bytes (so it gets a CRC).
_DATA_PARAMS = {"uploadId", "partNumber", "objectMeta", "versionId"}
_S3_NAMESPACE = re.compile(rb'\sxmlns="[^"]*"')
#: What moto is told once the OSS signature has been checked (see OssAdapter.__call__).
_MOTO_AUTHORIZATION = "AWS oss-adapter:verified"
#: OSS's smallest non-last multipart part (100 KB); moto enforces S3's 5 MB unless told otherwise.
OSS_MIN_PART_SIZE = 100 * 1024


def _error_xml(code: str, message: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
        f"<Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>127.0.0.1</HostId></Error>"
    ).encode()


class OssAdapter:
    """WSGI middleware turning moto's S3 app into an OSS endpoint as far as oss2 can tell.

    Only path-style addressing is handled: oss2 uses it for an IP endpoint like ``127.0.0.1``.
    Bodies are buffered whole; this is a test server for objects of a few MB.
    """

    def __init__(self, s3_app: WsgiApp, access_key_id: str, access_key_secret: str,
                 latency: float = 0.0) -> None:
        self.s3_app = s3_app
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.latency = latency  # added to every request: a store this far away (the bench)
        # path -> (ETag, CRC-64) of each object as last stored or read whole: OSS keeps an
        # object's CRC with it, so a ranged GET or a HEAD does not read the whole object again.
        self._crcs: dict[str, tuple[str, int]] = {}
        # "/bucket/key" of every object write the server completed, in order: a PutObject, a copy,
        # or a CompleteMultipartUpload (its parts are not objects). A test counts uploads here.
        self.writes: list[str] = []

    # -- WSGI entry -------------------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.latency:
            time.sleep(self.latency)  # the network distance being simulated, not a synchronisation
        method = environ["REQUEST_METHOD"]
        raw_path = (environ.get("RAW_URI") or environ["REQUEST_URI"]).split("?", 1)[0]
        resource = unquote(raw_path)  # "/", "/bucket/" or "/bucket/key", as oss2 signs it
        bucket, _, key = resource[1:].partition("/")
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        params = dict(query)
        request_id = uuid.uuid4().hex.upper()

        refusal = self._check_signature(environ, method, resource, query)
        if refusal is not None:
            return self._reply(start_response, method, "403 Forbidden",
                               [("Content-Type", "application/xml")],
                               _error_xml(*refusal, request_id), request_id)

        # Verified: tell moto "signed" (it refuses anonymous reads of private objects) without
        # a key or region it would try to interpret, so everything lands in its default account.
        environ["HTTP_AUTHORIZATION"] = _MOTO_AUTHORIZATION
        for name in [n for n in environ if n.startswith("HTTP_X_OSS_META_")]:
            environ["HTTP_X_AMZ_META_" + name[16:]] = environ.pop(name)
        body = self._buffer_body(environ) if method in ("PUT", "POST") else b""
        list_v1 = method == "GET" and bool(bucket) and not key and set(params) <= _LIST_V1_PARAMS
        if list_v1:
            self._list_v1_as_v2(environ, raw_path, params)
        elif params.get("continuation-token") == "":
            # oss2's list_objects_v2 always sends it; S3 (and moto) reject an empty token.
            environ["QUERY_STRING"] = urlencode([(k, v) for k, v in query
                                                 if k != "continuation-token"])

        status, s3_headers, payload = self._call_s3(environ)
        code = int(status.split()[0])
        if code == 200 and bucket and key and ((method == "PUT" and "uploadId" not in params)
                                               or (method == "POST" and "uploadId" in params)):
            self.writes.append(resource)  # list.append is atomic: requests are served on threads
        headers = [(k.replace("x-amz-meta-", "x-oss-meta-"), v) for k, v in s3_headers
                   if k.lower() != "content-length"]
        if payload.lstrip().startswith(b"<?xml"):
            payload = _S3_NAMESPACE.sub(b"", payload, count=1)
            if list_v1 and code == 200:
                payload = self._v2_result_as_v1(payload, params)
            elif b"<Contents>" in payload:
                payload = self._add_object_types(payload)

        data_op = bool(bucket and key) and code in (200, 206) and all(
            k in _DATA_PARAMS or k.startswith("response-") for k in params)
        if data_op:
            crc = None
            etag = {k.lower(): v for k, v in s3_headers}.get("etag", "")
            if method == "PUT" and "HTTP_X_OSS_COPY_SOURCE" not in environ:
                crc = crc64(body)  # PutObject and UploadPart: the CRC of what was stored
                if "uploadId" not in params:
                    self._crcs[raw_path] = (etag, crc)
            elif method == "GET" and code == 200:
                crc = crc64(payload)
                self._crcs[raw_path] = (etag, crc)
            elif method in ("GET", "HEAD") and etag and self._crcs.get(raw_path, ("", 0))[0] == etag:
                crc = self._crcs[raw_path][1]  # a range or HEAD of an object whose CRC is known
            elif method in ("GET", "HEAD") or (method == "POST" and "uploadId" in params):
                crc = self._whole_object_crc(environ, raw_path)  # range, HEAD, Complete
            if crc is not None:
                headers.append(("x-oss-hash-crc64ecma", str(crc)))
            if method in ("GET", "HEAD"):
                etag = {k.lower(): v for k, v in s3_headers}.get("etag", "")
                headers.append(("x-oss-object-type", "Multipart" if "-" in etag else "Normal"))
        if method == "HEAD":
            # A HEAD reply keeps the object's length even though no body follows.
            length = {k.lower(): v for k, v in s3_headers}.get("content-length")
            if length is not None:
                headers.append(("Content-Length", length))
        return self._reply(start_response, method, status, headers, payload, request_id)

    # -- signature --------------------------------------------------------------------------

    def _check_signature(self, environ: Environ, method: str, resource: str,
                         query: list[tuple[str, str]]) -> tuple[str, str] | None:
        """Return ``(code, message)`` of the 403 to send, or None when the V1 signature holds.

        V1 signs: VERB, Content-MD5, Content-Type, Date (or x-oss-date), the sorted lower-cased
        ``x-oss-*`` headers and the resource with the signed sub-resources (see oss2/auth.py).
        """
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if not authorization.startswith("OSS ") or ":" not in authorization:
            return ("AccessDenied", "This test server only accepts OSS V1 (HMAC-SHA1) signatures.")
        key_id, _, signature = authorization[4:].rpartition(":")
        if key_id != self.access_key_id:
            return ("InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist.")

        preserved = environ.get(PRESERVED_HEADER_NAMES_ENVIRON_KEY, {})
        oss_headers = sorted(
            (preserved.get(name, name[5:].replace("_", "-")).lower(), value)
            for name, value in environ.items()
            if name.startswith("HTTP_X_OSS_")
        )
        signed = sorted((k, v) for k, v in query if k in SUBRESOURCES)
        sub = "&".join(f"{k}={v}" if v else k for k, v in signed)
        # WSGI hands header values over as latin-1 str of the wire bytes; oss2 signs those bytes.
        string_to_sign = "\n".join([
            method,
            environ.get("HTTP_CONTENT_MD5", ""),
            environ.get("CONTENT_TYPE", ""),
            environ.get("HTTP_X_OSS_DATE", "") or environ.get("HTTP_DATE", ""),
            "".join(f"{k}:{v}\n" for k, v in oss_headers),
        ]).encode("latin-1", "replace") + (resource + (f"?{sub}" if sub else "")).encode()
        digest = hmac.new(self.access_key_secret.encode(), string_to_sign, hashlib.sha1)
        if not hmac.compare_digest(base64.b64encode(digest.digest()).decode(), signature):
            return ("SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.")
        return None

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _buffer_body(environ: Environ) -> bytes:
        """Read the whole request body (plain or chunked) so its CRC can be taken, then re-feed it."""
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        body = stream.read(int(length)) if length else stream.read() if environ.get(
            "wsgi.input_terminated") else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ.pop("wsgi.input_terminated", None)
        return body

    def _call_s3(self, environ: Environ) -> tuple[str, list[tuple[str, str]], bytes]:
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured["status"], captured["headers"] = status, headers

        chunks = self.s3_app(environ, start_response)
        try:
            payload = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return captured["status"], list(captured["headers"]), payload

    def _whole_object_crc(self, environ: Environ, raw_path: str) -> int | None:
        """CRC of the stored object, fetched with a plain internal GET (for HEAD, ranges, Complete)."""
        sub = {k: v for k, v in environ.items() if not k.startswith("HTTP_") and k not in (
            "CONTENT_TYPE", "CONTENT_LENGTH", PRESERVED_HEADER_NAMES_ENVIRON_KEY)}
        sub.update(HTTP_HOST=environ.get("HTTP_HOST", "127.0.0.1"), REQUEST_METHOD="GET",
                   HTTP_AUTHORIZATION=_MOTO_AUTHORIZATION,
                   QUERY_STRING="", RAW_URI=raw_path, REQUEST_URI=raw_path,
                   **{"wsgi.input": io.BytesIO(b"")})
        status, _, payload = self._call_s3(sub)
        return crc64(payload) if status.startswith("200") else None

    @staticmethod
    def _list_v1_as_v2(environ: Environ, raw_path: str, params: dict[str, str]) -> None:
        """Rewrite an OSS ListObjects (marker) into S3 ListObjectsV2 (start-after).

        moto's own v1 listing returns every common prefix on every page and pages by an opaque
        token; its v2 pages keys and prefixes together in key order, as OSS does.
        """
        v2 = [("list-type", "2")] + [(k, params[k]) for k in ("prefix", "delimiter", "max-keys",
                                                              "encoding-type") if params.get(k)]
        if params.get("marker"):
            v2.append(("start-after", params["marker"]))
        environ["QUERY_STRING"] = urlencode(v2, quote_via=quote)
        environ["RAW_URI"] = environ["REQUEST_URI"] = f"{raw_path}?{environ['QUERY_STRING']}"

    @classmethod
    def _v2_result_as_v1(cls, payload: bytes, params: dict[str, str]) -> bytes:
        """Turn moto's ListObjectsV2 XML into OSS ListObjects XML with Marker and NextMarker."""
        root = ElementTree.fromstring(payload)
        encoded = params.get("encoding-type") == "url"
        for tag in ("KeyCount", "StartAfter", "ContinuationToken", "NextContinuationToken"):
            for node in root.findall(tag):
                root.remove(node)
        marker = params.get("marker", "")
        ElementTree.SubElement(root, "Marker").text = quote(marker) if encoded else marker
        if root.findtext("IsTruncated") == "true":
            names = [n.text or "" for n in root.findall("Contents/Key")]
            names += [n.text or "" for n in root.findall("CommonPrefixes/Prefix")]
            last = max((unquote(n) if encoded else n for n in names), default=marker)
            ElementTree.SubElement(root, "NextMarker").text = quote(last) if encoded else last
        cls._set_types(root)
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)

    @classmethod
    def _add_object_types(cls, payload: bytes) -> bytes:
        root = ElementTree.fromstring(payload)
        cls._set_types(root)
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)

    @staticmethod
    def _set_types(root: ElementTree.Element) -> None:
        """oss2 requires ``<Type>`` per object: "Multipart" for a multipart ETag, else "Normal"."""
        for contents in root.findall("Contents"):
            if contents.find("Type") is None:
                multipart = "-" in (contents.findtext("ETag") or "")
                ElementTree.SubElement(contents, "Type").text = "Multipart" if multipart else "Normal"

    @staticmethod
    def _reply(start_response: StartResponse, method: str, status: str,
               headers: list[tuple[str, str]], payload: bytes, request_id: str) -> list[bytes]:
        headers = [h for h in headers if h[0].lower() != "x-oss-request-id"]
        headers.append(("x-oss-request-id", request_id))
        if method == "HEAD":
            if not status.startswith("2") and payload:
                # OSS answers an error to HEAD in a header, which oss2 decodes into the exception.
                headers.append(("x-oss-err", base64.b64encode(payload).decode()))
            payload = b""
        else:
            headers.append(("Content-Length", str(len(payload))))
        start_response(status, headers)
        return [payload]


def _pick_port() -> int:
    """A free port below the kernel's ephemeral range.

    A port from ``bind(0)`` comes from the ephemeral range, where any outgoing connection on a
    busy machine may take it while the server is stopped; below that range only a listener could.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low <= 21000:
        return 0
    for port in random.sample(range(20000, low), 50):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return 0


class _QuietHandler(MotoRequestHandler):
    """moto's handler (keeps underscored header names) without a log line per request."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class OssServer:
    """An OSS endpoint on ``127.0.0.1`` for tests; a context manager, or call start()/stop().

    ``stop()`` closes only the listener (new connections are refused); ``start()`` listens again
    on the same port, and all buckets and objects are still there. The default ``port=None``
    picks a free port at once (so ``endpoint`` is known before ``start()``); ``port=0`` lets the
    kernel choose at the first ``start()``.
    """

    def __init__(self, port: int | None = None, access_key_id: str = "test-oss-key-id",
                 access_key_secret: str = "test-oss-key-secret", latency: float = 0.0) -> None:
        self.port = _pick_port() if port is None else port
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        # moto reads this module global when completing an upload; OSS allows parts of 100 KB.
        moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = OSS_MIN_PART_SIZE
        self._s3_app = create_backend_app("s3")
        self.app = OssAdapter(self._s3_app, access_key_id, access_key_secret, latency)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint for ``oss2.Bucket`` (an IP, so oss2 addresses buckets path-style)."""
        if not self.port:
            raise RuntimeError("with port=0 the port is only known once start() has run")
        return f"http://127.0.0.1:{self.port}"

    def bucket(self, name: str, enable_crc: bool = True) -> oss2.Bucket:
        """An ``oss2.Bucket`` on this server with the configured (correct) credentials."""
        auth = oss2.Auth(self.access_key_id, self.access_key_secret)
        return oss2.Bucket(auth, self.endpoint, name, enable_crc=enable_crc)

    @property
    def writes(self) -> list[str]:
        """"/bucket/key" of every object write completed since the server was made, in order."""
        return self.app.writes

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> OssServer:
        if self._server is not None:
            return self
        try:
            server = make_server("127.0.0.1", self.port, self.app, threaded=True,
                                 request_handler=_QuietHandler)
        except SystemExit as exc:  # werkzeug prints the bind error and exits
            raise OSError(f"cannot listen on 127.0.0.1:{self.port}") from exc
        self.port = server.server_port
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"oss-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (requests in flight finish); the data and the port number are kept."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def create_bucket(self, name: str) -> None:
        """Create a bucket (directly in moto, so it also works while the listener is stopped)."""
        response = Client(self._s3_app).put(f"/{name}", headers={"Host": "127.0.0.1"})
        if response.status_code not in (200, 409):
            raise RuntimeError(f"creating bucket {name!r} failed: {response.status} {response.data!r}")

    def __enter__(self) -> OssServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main() -> None:
    """Serve until SIGTERM or Ctrl-C, e.g. ``python -m tests.oss_server --port 9000 -b archive``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("-b", "--bucket", action="append", default=[])
    parser.add_argument("--access-key-id", default="test-oss-key-id")
    parser.add_argument("--access-key-secret", default="test-oss-key-secret")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    args = parser.parse_args()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with OssServer(args.port, args.access_key_id, args.access_key_secret, args.latency) as server:
        for name in args.bucket:
            server.create_bucket(name)
        print(f"OSS endpoint {server.endpoint} (key id {server.access_key_id})", flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
