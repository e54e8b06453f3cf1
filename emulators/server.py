"""HTTPS front end shared by every emulated service: one ``ThreadingHTTPServer`` per service on 127.0.0.1.

The server turns each HTTP request into an :class:`~emulators.base.EmuRequest`, consults the shared
:class:`~emulators.base.FaultPlan` (``status`` -> that status with ``Retry-After``; ``drop`` -> the connection is
closed without a response; ``delay`` -> sleep, then serve normally) and passes the request to ``Service.handle``.
Requests under ``/_control/`` skip faults and go to the optional ``control`` handler (the hub's JSON control API).

HTTP/1.1 with keep-alive, ``Content-Length`` or chunked request bodies, TLS handshake done in the worker thread.
Secrets never reach a log: only method, path and status are recorded (see :class:`RequestLog`).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .base import EmuRequest, EmuResponse, FaultPlan, Service

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 32 * 1024 * 1024     # hard cap; larger bodies get 413 and the connection is closed


@dataclass(frozen=True)
class LoggedRequest:
    """One served request (no headers or bodies: they may carry tokens)."""

    service: str
    method: str
    path: str
    query: dict[str, list[str]]
    status: int                          # 0 = connection dropped by a fault
    fault: str | None
    at: float


class RequestLog:
    """Thread-safe ring buffer of the last ``maxlen`` requests across all services."""

    def __init__(self, maxlen: int = 20000) -> None:
        self._items: deque[LoggedRequest] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, item: LoggedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def entries(self, service: str | None = None, method: str | None = None,
                path_contains: str | None = None) -> list[LoggedRequest]:
        """Requests so far, optionally filtered (``path_contains`` is a substring of the decoded path)."""
        with self._lock:
            items = list(self._items)
        return [i for i in items
                if (service is None or i.service == service)
                and (method is None or i.method.upper() == method.upper())
                and (path_contains is None or path_contains in i.path)]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class _Dropped(Exception):
    """Internal: close the connection without answering."""


class _Handler(BaseHTTPRequestHandler):
    # Without this, small responses wait on Nagle's algorithm (~40 ms a request on loopback).
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "EmulatorHTTPS/1.0"
    sys_version = ""
    timeout = 60                          # idle keep-alive connections are closed after this
    server: EmuHTTPServer

    # -- plumbing -------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        return                            # the stdlib would print the request line (query strings) to stderr

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_REQUEST_BODY:
                    raise OverflowError
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BODY:
            raise OverflowError
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        started = time.monotonic()
        srv = self.server
        split = urlsplit(self.path)
        try:
            body = self._read_body()
        except OverflowError:
            self.close_connection = True
            self._send(EmuResponse(413, {"error": {"code": "RequestEntityTooLarge",
                                                   "message": "request body too large for the emulator"}}))
            return
        except ValueError:
            self.close_connection = True
            self._send(EmuResponse(400, {"error": {"code": "BadRequest", "message": "bad chunked encoding"}}))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = EmuRequest(
            method=self.command.upper(),
            path=unquote(split.path),
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=body,
            raw_target=self.path,
            base_url=srv.base_url,
        )
        service = srv.service
        fault_kind: str | None = None
        try:
            if request.path.startswith("/_control/") and srv.control is not None:
                response = srv.control(request)
            else:
                fault = srv.faults.next_fault(service.name, request) if srv.faults is not None else None
                if fault is not None:
                    fault_kind = fault.kind
                    if fault.kind == "drop":
                        raise _Dropped
                    if fault.kind == "delay":
                        time.sleep(max(0.0, fault.seconds))
                        fault = None
                if fault is not None and fault.kind == "status":
                    response = _fault_response(service, fault.status, fault.retry_after)
                else:
                    response = service.handle(request)
        except (_Dropped, ConnectionAbortedError):
            srv.log.add(LoggedRequest(service.name, request.method, request.path, request.query, 0,
                                      fault_kind or "drop", time.time()))
            self._drop()
            return
        except Exception:
            log.exception("emulator %s failed on %s %s", service.name, request.method, request.path)
            response = EmuResponse(500, {"error": {"code": "EmulatorError",
                                                   "message": "the emulator raised an exception (see its log)"}})
        if not request.path.startswith("/_control/"):
            srv.log.add(LoggedRequest(service.name, request.method, request.path, request.query, response.status,
                                      fault_kind, time.time()))
        if response.status >= 500 or fault_kind:
            log.debug("%s %s %s -> %s (%.1f ms)", service.name, request.method, request.path, response.status,
                      (time.monotonic() - started) * 1000)
        self._send(response, request.headers.get("client-request-id"))

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, response: EmuResponse, client_request_id: str | None = None) -> None:
        payload: bytes
        content_type: str | None = None
        body = response.body
        if body is None:
            payload = b""
        elif isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode("utf-8")
            content_type = "text/plain; charset=utf-8"
        else:
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            content_type = "application/json; charset=utf-8"
        self.send_response(response.status)
        names = {k.lower() for k in response.headers}
        if content_type and "content-type" not in names and response.status != 204:
            self.send_header("Content-Type", content_type)
        if "request-id" not in names:
            self.send_header("request-id", str(uuid.uuid4()))
        if client_request_id and "client-request-id" not in names:
            self.send_header("client-request-id", client_request_id)
        for name, value in response.headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        if response.status == 204 or response.status < 200:
            payload = b""
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    # -- verbs ----------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(timestamp, usegmt=True)


def _fault_response(service: Service, status: int, retry_after: str | None) -> EmuResponse:
    """An injected error in the service's own error shape when it offers one (``fault_body(status)``)."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    maker = getattr(service, "fault_body", None)
    if callable(maker):
        body = maker(status)
    else:
        code = {429: "TooManyRequests", 503: "ServiceUnavailable", 502: "BadGateway",
                504: "GatewayTimeout"}.get(status, "InternalServerError")
        body = {"error": {"code": code, "message": f"Injected fault: HTTP {status}."}}
    return EmuResponse(status, body, headers)


class EmuHTTPServer(ThreadingHTTPServer):
    """HTTPS server for one service; :attr:`service` can be swapped at run time (the hub does on reset)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, service: Service, context: ssl.SSLContext, faults: FaultPlan | None = None,
                 control: Callable[[EmuRequest], EmuResponse] | None = None, host: str = "127.0.0.1",
                 port: int = 0, request_log: RequestLog | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.service = service
        self.context = context
        self.faults = faults
        self.control = control
        self.log = request_log or RequestLog()
        self.base_url = f"https://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(_Handler.timeout)
            request.do_handshake()
        except (OSError, ssl.SSLError):
            return                            # a client that gives up on TLS (or a port probe)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error on %s", self.base_url, exc_info=True)

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"emulator-{self.service.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def server_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """TLS 1.2+ server context for the emulator certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_pem, key_pem)
    return context
