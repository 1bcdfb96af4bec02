"""Loopback stand-ins at the bot's outer edges: a scoring endpoint, the backend's endpoint listing,
a Bot Framework channel (where replies land) and an OpenID provider for channel tokens.

Each is a real HTTP server on 127.0.0.1 (or a real ``MLBackend``-shaped object); the bot's own
code runs unchanged against them.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from backends.protocol import DeploymentState, EndpointKeys, EndpointState, NotFoundError
from backends.scoring import validate_scoring_request

MANAGED_BY = "phi3-finetune-functions"


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free loopback port of the running loop: (its runner, its origin URL)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


# -- a scoring endpoint ------------------------------------------------------------------------
@dataclass
class StubModel:
    """A loopback endpoint with the scoring contract. ``status``/``delay_s`` make it misbehave."""

    key: str = "stub-key-" + "k" * 24
    status: int = 200
    delay_s: float = 0.0
    delays: list[float] = field(default_factory=list)  # per request, first to last; then delay_s
    retry_after: str | None = None
    fixed_answer: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    @property
    def scoring_uri(self) -> str:
        return f"{self.url}/score"

    async def _score(self, request: web.Request) -> web.Response:
        body = await request.json()
        validate_scoring_request(body)
        self.requests.append({"headers": dict(request.headers), "body": body})
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": "invalid key"}, status=401)
        delay = self.delays.pop(0) if self.delays else self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if self.status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response(
                {"error": f"stub status {self.status}"}, status=self.status, headers=headers
            )
        messages = body["input_data"]["input_string"]
        if self.fixed_answer is not None:
            return web.json_response({"output": self.fixed_answer})
        return web.json_response(
            {"output": f"Answer to: {messages[-1]['content']} [{len(messages)} messages]"}
        )

    async def start(self) -> StubModel:
        app = web.Application()
        app.router.add_post("/score", self._score)
        self._runner, self.url = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def last_messages(self) -> list[dict[str, str]]:
        return self.requests[-1]["body"]["input_data"]["input_string"]


class StubBackend:
    """The endpoint half of ``MLBackend`` over ``StubModel``s: what the bot asks a backend."""

    name = "stub"

    def __init__(self) -> None:
        self.endpoints: dict[str, tuple[EndpointState, StubModel]] = {}
        self.key_fetches = 0

    def add(
        self, name: str, model: StubModel, *, created_at: str, healthy: bool = True, kind: str = "online"
    ) -> None:
        self.endpoints[name] = (
            EndpointState(
                name=name,
                kind=kind,
                created_at=created_at,
                scoring_uri=model.scoring_uri,
                provisioning_state="Succeeded" if healthy else "Failed",
                tags={"managed-by": MANAGED_BY, "run-id": f"run-{name}"},
                traffic={"blue": 100},
            ),
            model,
        )

    def get_endpoint(self, name: str) -> EndpointState:
        if name not in self.endpoints:
            raise NotFoundError(f"no endpoint named '{name}'")
        return self.endpoints[name][0]

    def list_endpoints(self) -> list[EndpointState]:
        return [state for state, _ in self.endpoints.values()]

    def get_endpoint_keys(self, name: str) -> EndpointKeys:
        self.key_fetches += 1
        model = self.endpoints[name][1]
        return EndpointKeys(primary=SecretStr(model.key), secondary=SecretStr("unused-secondary"))

    def get_deployment(self, endpoint: str, deployment: str) -> DeploymentState:
        return DeploymentState(
            endpoint=endpoint, name=deployment, provisioning_state="Succeeded", model=f"{endpoint}-model:1"
        )


# -- a Bot Framework channel ---------------------------------------------------------------------
@dataclass
class FakeChannel:
    """The channel side of the Bot Connector API: records what the bot posts, answers ``{"id"}``."""

    received: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def _post(self, request: web.Request) -> web.Response:
        activity = await request.json()
        activity["_path"] = request.path
        self.received.append(activity)
        self.authorizations.append(request.headers.get("Authorization"))
        self._arrived.set()
        return web.json_response({"id": str(uuid.uuid4())})

    async def start(self) -> FakeChannel:
        app = web.Application()
        app.router.add_post("/v3/conversations/{conversation}/activities", self._post)
        app.router.add_post("/v3/conversations/{conversation}/activities/{reply_to}", self._post)
        self._runner, self.url = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def messages(self, conversation: str | None = None) -> list[dict[str, Any]]:
        return [
            a
            for a in self.received
            if a.get("type") == "message"
            and (conversation is None or a["conversation"]["id"] == conversation)
        ]

    async def wait_for(self, predicate, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``predicate(received)`` holds; returns ``received``."""
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the channel never got what was expected; received {self.received}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                continue
        return self.received


def message_activity(text: str, *, service_url: str, conversation: str = "conv-1", **extra: Any) -> dict:
    """A user's message as a channel posts it to ``/api/messages``."""
    return {
        "type": "message",
        "id": extra.pop("id", str(uuid.uuid4())),
        "channelId": extra.pop("channelId", "test"),
        "serviceUrl": service_url,
        "from": {"id": "user-1", "name": "User"},
        "recipient": {"id": "bot-1", "name": "Phi3Bot"},
        "conversation": {"id": conversation},
        "text": text,
        **extra,
    }


# -- an OpenID provider for channel tokens ------------------------------------------------------
class LoopbackJsonServer:
    """A loopback HTTP server on a thread of its own that answers GETs with JSON.

    Its own thread, because botbuilder and azure-identity fetch with blocking calls from the event
    loop under test: a server on that loop could never answer them. Subclasses answer with
    ``answer_get(path, headers) -> (status, body)``; ``url`` is the server's origin once started.
    """

    url = ""
    _server: http.server.ThreadingHTTPServer | None = None

    def answer_get(self, path: str, headers: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def start(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = server.answer_get(self.path, self.headers)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class OpenIdProvider(LoopbackJsonServer):
    """Our own RSA key and OpenID metadata, served from a separate thread.

    botbuilder fetches metadata with blocking ``requests.get`` from the event loop, so the server
    must not share that loop.
    """

    def __init__(self, *, kid: str = "k1", endorsements: list[str] | None = None) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = self.key.public_key().public_numbers()
        jwk = {
            "kty": "RSA",
            "use": "sig",
            "kid": kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }
        if endorsements is not None:
            jwk["endorsements"] = endorsements
        self.jwks = {"keys": [jwk]}

    def answer_get(self, path: str, headers: Any) -> tuple[int, Any]:
        if path == "/.well-known/openidconfiguration":
            return 200, {"issuer": "https://api.botframework.com", "jwks_uri": f"{self.url}/keys"}
        if path == "/keys":
            return 200, self.jwks
        return 404, {"error": f"no {path} here"}

    @property
    def metadata_url(self) -> str:
        return f"{self.url}/.well-known/openidconfiguration"

    def token(self, *, key: Any = None, kid: str | None = None, lifetime_s: int = 600, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": "https://api.botframework.com", "nbf": now - 10, "exp": now + lifetime_s, **claims}
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid})


@contextmanager
def openid_provider_installed() -> Iterator[OpenIdProvider]:
    """Our OpenID provider as the Bot Framework channel's, for the time of the block."""
    from botframework.connector.auth import ChannelValidation, JwtTokenExtractor

    provider = OpenIdProvider().start()
    saved = ChannelValidation.open_id_metadata_endpoint
    ChannelValidation.open_id_metadata_endpoint = provider.metadata_url
    JwtTokenExtractor.metadataCache.clear()  # class-level cache, keyed by URL
    try:
        yield provider
    finally:
        ChannelValidation.open_id_metadata_endpoint = saved
        JwtTokenExtractor.metadataCache.clear()
        provider.stop()
