"""The HTTPS core of the fake Azure: routing, bearer-token checks, fault injection and the request log.

One loopback HTTPS server answers everything the app's real Azure SDK clients call: Entra ID token
issuance, Azure Resource Manager, the Azure ML registry data plane and the endpoints' scoring URIs.
Handlers run one at a time under a lock (Azure's answers depend on state); injected stalls sleep
outside it so a stalled call never blocks the others.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .certs import TestCertificates


class ArmError(Exception):
    """An Azure-style error answer: ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def not_found(kind: str, name: str) -> ArmError:
    return ArmError(404, "ResourceNotFound", f"The {kind} '{name}' was not found.")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    raw: bytes
    body: Any = None
    host: str = ""  # the Host header: a storage host reached through the CONNECT proxy, or the server's own
    target: str = ""  # the request target as sent (percent-encoded path and query): Shared Key signs it

    @property
    def api_version(self) -> str | None:
        return self.query.get("api-version")

    def json(self) -> dict:
        if not isinstance(self.body, dict):
            raise ArmError(400, "InvalidRequestContent", "The request content was invalid: a JSON object")
        return self.body


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list → JSON; bytes → as is; None → empty
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Exchange:
    """One request as the server saw it (the transcript is made from these)."""

    seq: int
    method: str
    path: str
    api_version: str | None
    route: str
    status: int
    request_body: Any
    response_body: Any
    fault: str | None = None
    at: float = 0.0  # seconds since the server started


Handler = Callable[[Request, re.Match], Response]
FaultPlan = Callable[[Request, str], str | None]  # (request, route name) -> fault kind or None


@dataclass
class Route:
    name: str
    method: str
    pattern: re.Pattern
    handler: Handler
    auth: str  # "bearer" (an Entra token from this fake), "none", or "custom" (the handler checks)
    host: re.Pattern | None = None  # None: the server's own address; else a host served via the proxy


class FakeServer:
    """Routes requests to handlers; records each one; injects the faults a ``FaultPlan`` asks for."""

    def __init__(self, certs: TestCertificates, *, stall_seconds: float = 4.0):
        self.certs = certs
        self.routes: list[Route] = []
        self.exchanges: list[Exchange] = []
        self.tokens: dict[str, dict] = {}
        self.lock = threading.RLock()
        # (method, route) -> a request there waits for the event before it is handled (outside the lock,
        # so the others go on); ``at_gate`` is set when one is waiting: a call still under way.
        self.gates: dict[tuple[str, str], threading.Event] = {}
        self.at_gate = threading.Event()
        self.fault_plan: FaultPlan | None = None
        self.stall_seconds = stall_seconds
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""
        self.started = time.monotonic()

    # -- setup ----------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        method: str,
        pattern: str,
        handler: Handler,
        auth: str = "bearer",
        host: str | None = None,
    ) -> None:
        host_pattern = re.compile(f"^{host}$", re.IGNORECASE) if host else None
        self.routes.append(
            Route(name, method, re.compile(f"^{pattern}$", re.IGNORECASE), handler, auth, host_pattern)
        )

    def start(self) -> str:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # the exchanges are the log
                return

            def _any(self) -> None:
                server._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _any

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.socket = self.certs.server_context().wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self.url = f"https://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, name="fake-azure", daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- serving --------------------------------------------------------------------------------
    def _read(self, h: BaseHTTPRequestHandler) -> Request:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        body: Any = None
        if raw and "json" in headers.get("content-type", "json"):
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        path = re.sub(r"/{2,}", "/", unquote(parts.path))
        host = headers.get("host", "").rsplit(":443", 1)[0]
        return Request(h.command, path, dict(parse_qsl(parts.query)), headers, raw, body, host, h.path)

    def _match(self, req: Request) -> tuple[Route, re.Match] | None:
        proxied = bool(req.host) and not req.host.startswith(("127.0.0.1", "localhost"))
        for route in self.routes:
            if (route.host is not None) != proxied or (route.host and not route.host.match(req.host)):
                continue
            if route.method == req.method or (route.method == "GET" and req.method == "HEAD"):
                m = route.pattern.match(req.path)
                if m:
                    return route, m
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        req = self._read(h)
        found = self._match(req)
        route_name = found[0].name if found else "unknown"
        fault = self.fault_plan(req, route_name) if (self.fault_plan and found) else None
        gate = self.gates.get((req.method, route_name)) if found else None
        if gate is not None:
            self.at_gate.set()
            gate.wait(timeout=120)
        if fault in ("429", "503", "504"):
            resp = _fault_response(fault)
        else:
            with self.lock:
                resp = self._dispatch(req, found)
        with self.lock:
            self.exchanges.append(
                Exchange(
                    seq=len(self.exchanges),
                    method=req.method,
                    path=req.path,
                    api_version=req.api_version,
                    route=route_name,
                    status=resp.status,
                    request_body=req.body,
                    # a snapshot: the fake goes on changing the resource it answered with
                    response_body=json.loads(json.dumps(resp.body))
                    if isinstance(resp.body, dict | list)
                    else None,
                    fault=fault,
                    at=round(time.monotonic() - self.started, 3),
                )
            )
        if fault == "stall":  # the work is done but the answer comes too late: the client must retry
            time.sleep(self.stall_seconds)
        if fault in ("stall", "drop"):
            _hang_up(h)
            return
        _write(h, req, resp)

    def _dispatch(self, req: Request, found: tuple[Route, re.Match] | None) -> Response:
        if not found:
            return _error_response(
                ArmError(
                    404, "NoRegisteredProviderFound", f"fake Azure has no route for {req.method} {req.path}"
                )
            )
        route, m = found
        try:
            if route.auth == "bearer":
                self.check_bearer(req)
            return route.handler(req, m)
        except ArmError as exc:
            return _error_response(exc)

    def check_bearer(self, req: Request) -> dict:
        auth = req.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        grant = self.tokens.get(token)
        if not grant:
            raise ArmError(
                401,
                "InvalidAuthenticationToken",
                "The access token is missing or was not issued by this authority.",
                {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/"'},
            )
        return grant

    def exchanges_for(self, route: str) -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges if e.route == route]


def _fault_response(kind: str) -> Response:
    text = {
        "429": ("TooManyRequests", "The request is being throttled (injected by the test)."),
        "503": ("ServiceUnavailable", "The service is temporarily unavailable (injected by the test)."),
        "504": ("GatewayTimeout", "The gateway did not receive a response in time (injected by the test)."),
    }[kind]
    return Response(
        int(kind),
        {"error": {"code": text[0], "message": text[1]}},
        {"Retry-After": "0", "x-ms-retry-after-ms": "10"},
    )


def _error_response(exc: ArmError) -> Response:
    return Response(exc.status, {"error": {"code": exc.code, "message": exc.message}}, dict(exc.headers))


def _write(h: BaseHTTPRequestHandler, req: Request, resp: Response) -> None:
    if isinstance(resp.body, bytes):
        payload, ctype = resp.body, resp.headers.get("Content-Type", "application/octet-stream")
    elif resp.body is None:
        payload, ctype = b"", "application/json"
    else:
        payload, ctype = json.dumps(resp.body).encode(), "application/json; charset=utf-8"
    try:
        h.send_response(resp.status)
        headers = {"Content-Type": ctype, **resp.headers, "Content-Length": str(len(payload))}
        headers.setdefault("x-ms-request-id", f"fake-{len(payload)}-{time.monotonic_ns()}")
        for name, value in headers.items():
            h.send_header(name, value)
        h.end_headers()
        if req.method != "HEAD":
            h.wfile.write(payload)
        h.wfile.flush()
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        h.close_connection = True


def _hang_up(h: BaseHTTPRequestHandler) -> None:
    h.close_connection = True
    try:
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
