"""``POST /api/messages`` refuses what it must: bad tokens (401), bad bodies (400/413/415).

Tokens are signed with our own RSA key; the OpenID metadata is served on loopback from a separate
thread (botbuilder fetches it with blocking ``requests``). Replies to an accepted activity land on a
loopback fake channel with the bearer our credentials factory issued.
"""

from __future__ import annotations

import json

import azure.functions as func
import pytest
from botframework.connector.auth import (
    ChannelValidation,
    JwtTokenExtractor,
    MicrosoftAppCredentials,
    PasswordServiceClientCredentialFactory,
)
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.adapter import MAX_ACTIVITY_BYTES, refusal_reason
from bot.phi3_bot import WELCOME
from bot.runtime import BotRuntime, create_runtime
from bot.storage import MemoryStore
from settings import AppSettings
from tests.support.bot_fakes import (
    FakeChannel,
    OpenIdProvider,
    StubBackend,
    message_activity,
    openid_provider_installed,
)

APP_ID = "00000000-aaaa-bbbb-cccc-000000000001"
OUTBOUND_TOKEN = "outbound-token-from-the-fixed-factory"


class FixedTokenCredentials(MicrosoftAppCredentials):
    def get_access_token(self, force_refresh: bool = False) -> str:
        return OUTBOUND_TOKEN


class FixedTokenFactory(PasswordServiceClientCredentialFactory):
    """Outbound tokens without Entra ID: the bot's replies carry a fixed bearer."""

    created = 0

    async def create_credentials(self, app_id, oauth_scope, login_endpoint, validate_authority):
        FixedTokenFactory.created += 1
        return FixedTokenCredentials(app_id, "unused", oauth_scope=oauth_scope)


@pytest.fixture(scope="module")
def openid():
    with openid_provider_installed() as provider:
        yield provider


@pytest.fixture
async def channel():
    fake = await FakeChannel().start()
    yield fake
    await fake.stop()


async def _runtime(app_id: str) -> BotRuntime:
    settings = AppSettings(
        MicrosoftAppId=app_id, MicrosoftAppPassword="pw" if app_id else "", BOT_ROUTE="direct"
    )
    return create_runtime(
        settings,
        backend=StubBackend,
        store=MemoryStore(),
        credentials_factory=FixedTokenFactory(app_id) if app_id else None,
    )


@pytest.fixture
async def secured():
    runtime = await _runtime(APP_ID)
    yield runtime
    await runtime.close()


@pytest.fixture
async def anonymous():
    runtime = await _runtime("")
    yield runtime
    await runtime.close()


def request(body, *, token: str | None = None, content_type: str = "application/json") -> func.HttpRequest:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return func.HttpRequest("POST", "http://127.0.0.1/api/messages", headers=headers, body=data)


async def post(runtime: BotRuntime, req: func.HttpRequest) -> func.HttpResponse:
    return await runtime.endpoint.handle(req, runtime.bot.on_turn)


def good_claims(channel: FakeChannel) -> dict:
    return {"aud": APP_ID, "serviceurl": channel.url}


async def test_a_valid_channel_token_is_accepted_and_the_reply_carries_the_bots_token(
    secured, openid, channel
):
    response = await post(
        secured,
        request(
            message_activity("/help", service_url=channel.url), token=openid.token(**good_claims(channel))
        ),
    )
    assert response.status_code == 201
    (reply,) = channel.messages()
    assert "/reset" in reply["text"]
    assert channel.authorizations == [f"Bearer {OUTBOUND_TOKEN}"]


async def test_connector_and_token_clients_are_built_once_not_per_turn(secured, openid, channel):
    FixedTokenFactory.created = 0
    for n in range(3):
        activity = message_activity("/help", service_url=channel.url, conversation=f"c{n}")
        response = await post(secured, request(activity, token=openid.token(**good_claims(channel))))
        assert response.status_code == 201
    assert len(channel.messages()) == 3
    assert FixedTokenFactory.created == 2  # one connector client, one user token client


async def test_a_request_without_a_token_is_refused(secured, openid, channel):
    response = await post(secured, request(message_activity("hi", service_url=channel.url)))
    assert response.status_code == 401 and channel.received == []


@pytest.mark.parametrize(
    "case",
    [
        "forged",
        "expired",
        "wrong audience",
        "wrong issuer",
        "unknown kid",
        "service url mismatch",
        "not a jwt",
    ],
)
async def test_each_bad_token_is_refused_with_401(secured, openid, channel, case, caplog):
    claims = good_claims(channel)
    tokens = {
        "forged": lambda: openid.token(
            key=rsa.generate_private_key(public_exponent=65537, key_size=2048), **claims
        ),
        "expired": lambda: openid.token(lifetime_s=-3600, **claims),
        "wrong audience": lambda: openid.token(**{**claims, "aud": "someone-else"}),
        "wrong issuer": lambda: openid.token(**claims, iss="https://evil.example"),
        "unknown kid": lambda: openid.token(kid="k-unknown", **claims),
        "service url mismatch": lambda: openid.token(**{**claims, "serviceurl": "https://other.example"}),
        "not a jwt": lambda: "not.a.jwt",
    }
    response = await post(
        secured, request(message_activity("hi", service_url=channel.url), token=tokens[case]())
    )
    assert response.status_code == 401
    assert channel.received == []
    assert "bot request refused status=401" in caplog.text


async def test_a_key_not_endorsed_for_the_channel_is_refused(secured, channel):
    provider = OpenIdProvider(endorsements=["msteams"]).start()
    saved = ChannelValidation.open_id_metadata_endpoint
    ChannelValidation.open_id_metadata_endpoint = provider.metadata_url
    try:
        token = provider.token(**good_claims(channel))
        activity = message_activity("hi", service_url=channel.url, channelId="webchat")
        assert (await post(secured, request(activity, token=token))).status_code == 401
        endorsed = message_activity("/help", service_url=channel.url, channelId="msteams")
        assert (await post(secured, request(endorsed, token=token))).status_code == 201
    finally:
        ChannelValidation.open_id_metadata_endpoint = saved
        JwtTokenExtractor.metadataCache.clear()
        provider.stop()


async def test_anonymous_mode_accepts_requests_without_a_token(anonymous, channel):
    update = {
        **message_activity("", service_url=channel.url),
        "type": "conversationUpdate",
        "membersAdded": [{"id": "user-1"}],
    }
    assert (await post(anonymous, request(update))).status_code == 201
    assert [m["text"] for m in channel.messages()] == [WELCOME]
    assert channel.authorizations == [None]


async def test_anonymous_mode_still_refuses_a_garbage_bearer(anonymous, channel):
    response = await post(
        anonymous, request(message_activity("hi", service_url=channel.url), token="garbage")
    )
    assert response.status_code == 401


async def test_expect_replies_returns_the_replies_in_the_response(anonymous):
    activity = message_activity("/help", service_url="http://127.0.0.1:9", deliveryMode="expectReplies")
    response = await post(anonymous, request(activity))
    assert response.status_code == 200
    (reply,) = json.loads(response.get_body())["activities"]
    assert "/status" in reply["text"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "must be a JSON object"),
        (
            b'{"type": "message", "channelId": "t", "conversation": {"id": "c"}}',
            "application/json",
            400,
            "missing serviceUrl",
        ),
        (
            b'{"type": "message", "serviceUrl": "http://x", "conversation": {"id": "c"}}',
            "application/json",
            400,
            "missing channelId",
        ),
        (
            b'{"type": "message", "channelId": "t", "serviceUrl": "not a url", "conversation": {"id": "c"}}',
            "application/json",
            400,
            "serviceUrl 'not a url' is not an http(s) URL",
        ),
        (
            b'{"type": "message", "channelId": "t", "serviceUrl": "http://a b", "conversation": {"id": "c"}}',
            "application/json",
            400,
            "serviceUrl 'http://a b' is not a URL requests can call",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "not valid JSON here: nested too deeply"),
        (b'{"type": "message", "x": ' + b"1" * 5000 + b"}", "application/json", 400, "4300 digits"),
        (
            b'{"type": "message", "serviceUrl": "http://x", "conversation": "c"}',
            "application/json",
            400,
            "activity",
        ),
        (b"{}", "text/plain", 415, "Content-Type must be application/json"),
        (b"{}", "", 415, "(none)"),
        (b"{" + b" " * MAX_ACTIVITY_BYTES + b"}", "application/json", 413, "the limit is"),
    ],
)
async def test_malformed_requests_are_refused_with_the_reason(anonymous, body, content_type, status, says):
    response = await post(anonymous, request(body, content_type=content_type))
    assert response.status_code == status
    assert says in json.loads(response.get_body())["error"]


def test_an_unrelated_error_is_never_taken_for_a_token_refusal():
    assert refusal_reason(Exception("connection pool is full")) is None
    assert refusal_reason(KeyError("conversation")) is None
    assert refusal_reason(Exception("Could not validate endorsement key")) is not None
