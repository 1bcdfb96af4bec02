"""``MicrosoftAppType``: what each kind of bot identity gives the adapter, and which settings it needs.

SingleTenant bots get reply tokens from their own tenant; a user-assigned managed identity gets them
from the Functions host's identity endpoint (``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``, served here
on loopback from a thread, as msal calls it with blocking ``requests``), and the reply reaches a
loopback channel carrying that token. Settings botbuilder would refuse with a bare ``Exception``
naming its own ``APP_*`` keys, or accept and fail on the first reply, are refused at start-up with
the setting to fix.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
import pytest
from botframework.connector.auth import (
    AuthenticationConstants,
    ClaimsIdentity,
    ManagedIdentityAppCredentials,
    MicrosoftAppCredentials,
)

from bot.adapter import BotConfigurationError, create_adapter
from bot.runtime import create_runtime
from bot.storage import MemoryStore
from settings import AppSettings
from tests.support.bot_fakes import (
    FakeChannel,
    LoopbackJsonServer,
    StubBackend,
    message_activity,
    openid_provider_installed,
)

TENANT = "11111111-2222-3333-4444-555555555555"
SERVICE_URL = "https://smba.trafficmanager.net/teams/"


def bot_settings(**values: str) -> AppSettings:
    return AppSettings(BOT_ROUTE="direct", **values)


async def reply_credentials(settings: AppSettings, app_id: str):
    """The credentials the adapter's connector client signs replies to a channel with."""
    adapter = create_adapter(settings)
    claims = ClaimsIdentity(
        {AuthenticationConstants.AUDIENCE_CLAIM: app_id, AuthenticationConstants.APP_ID_CLAIM: app_id},
        True,
    )
    factory = adapter.bot_framework_authentication.create_connector_factory(claims)
    client = await factory.create(SERVICE_URL, AuthenticationConstants.TO_CHANNEL_FROM_BOT_OAUTH_SCOPE)
    return client.config.credentials


async def test_a_single_tenant_bot_asks_its_own_tenant_for_reply_tokens():
    app_id = str(uuid.uuid4())
    settings = bot_settings(
        MicrosoftAppId=app_id,
        MicrosoftAppPassword="client-secret",
        MicrosoftAppType="SingleTenant",
        MicrosoftAppTenantId=TENANT,
    )
    credentials = await reply_credentials(settings, app_id)
    assert isinstance(credentials, MicrosoftAppCredentials)
    assert credentials.microsoft_app_id == app_id
    assert credentials.microsoft_app_password == "client-secret"
    assert credentials.oauth_endpoint == f"https://login.microsoftonline.com/{TENANT}"


async def test_a_multi_tenant_bot_asks_the_bot_framework_tenant_for_reply_tokens():
    app_id = str(uuid.uuid4())
    settings = bot_settings(MicrosoftAppId=app_id, MicrosoftAppPassword="client-secret")
    credentials = await reply_credentials(settings, app_id)
    assert isinstance(credentials, MicrosoftAppCredentials)
    assert credentials.oauth_endpoint == "https://login.microsoftonline.com/botframework.com"


async def test_a_user_assigned_identity_bot_uses_managed_identity_credentials_for_its_client_id():
    client_id = str(uuid.uuid4())
    settings = bot_settings(
        MicrosoftAppId=client_id, MicrosoftAppType="UserAssignedMSI", MicrosoftAppTenantId=TENANT
    )
    credentials = await reply_credentials(settings, client_id)
    assert isinstance(credentials, ManagedIdentityAppCredentials)
    assert credentials.microsoft_app_id == client_id
    assert credentials.oauth_scope == "https://api.botframework.com"


# -- a user-assigned managed identity, end to end --------------------------------------------------
class FakeIdentityEndpoint(LoopbackJsonServer):
    """The App Service / Functions managed identity endpoint (``IDENTITY_ENDPOINT``), on loopback."""

    def __init__(self, header_secret: str) -> None:
        self.header_secret = header_secret
        self.requests: list[dict[str, Any]] = []

    @property
    def token_url(self) -> str:
        return f"{self.url}/msi/token"

    def token_for(self, client_id: str) -> str:
        return f"msi-token-for-{client_id}"

    def answer_get(self, path: str, headers: Any) -> tuple[int, Any]:
        query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        self.requests.append({"query": query, "header": headers.get("X-IDENTITY-HEADER")})
        if headers.get("X-IDENTITY-HEADER") != self.header_secret:
            return 400, {"statusCode": 400, "message": "missing or wrong X-IDENTITY-HEADER"}
        return 200, {
            "access_token": self.token_for(query.get("client_id", "system")),
            "expires_on": str(int(time.time()) + 3600),
            "resource": query.get("resource"),
            "token_type": "Bearer",
        }


@pytest.fixture
def openid():
    with openid_provider_installed() as provider:
        yield provider


@pytest.fixture
def identity_endpoint(monkeypatch):
    endpoint = FakeIdentityEndpoint(header_secret=uuid.uuid4().hex).start()
    for other in ("IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.delenv(other, raising=False)  # msal would pick another managed identity source
    monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.token_url)
    monkeypatch.setenv("IDENTITY_HEADER", endpoint.header_secret)
    yield endpoint
    endpoint.stop()


@pytest.fixture
async def channel():
    fake = await FakeChannel().start()
    yield fake
    await fake.stop()


async def test_a_user_assigned_identity_bot_replies_with_a_token_from_the_hosts_identity_endpoint(
    openid, identity_endpoint, channel
):
    client_id = str(uuid.uuid4())  # msal caches managed identity tokens per client id, process-wide
    settings = bot_settings(
        MicrosoftAppId=client_id, MicrosoftAppType="UserAssignedMSI", MicrosoftAppTenantId=TENANT
    )
    runtime = create_runtime(settings, backend=StubBackend, store=MemoryStore())
    try:
        token = openid.token(aud=client_id, serviceurl=channel.url)
        body = json.dumps(message_activity("/help", service_url=channel.url)).encode()
        request = func.HttpRequest(
            "POST",
            "http://127.0.0.1/api/messages",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            body=body,
        )
        response = await runtime.endpoint.handle(request, runtime.bot.on_turn)
    finally:
        await runtime.close()
    assert response.status_code == 201, response.get_body()
    (reply,) = channel.messages()
    assert "/reset" in reply["text"]
    assert channel.authorizations == [f"Bearer {identity_endpoint.token_for(client_id)}"]
    (asked,) = identity_endpoint.requests
    assert asked["query"]["client_id"] == client_id
    assert asked["query"]["resource"] == "https://api.botframework.com"
    assert asked["header"] == identity_endpoint.header_secret


# -- settings that cannot work ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "says"),
    [
        (
            {"MicrosoftAppType": "SingleTenant", "MicrosoftAppId": "app", "MicrosoftAppPassword": "pw"},
            "MicrosoftAppType=SingleTenant needs MicrosoftAppTenantId",
        ),
        (
            {"MicrosoftAppType": "SingleTenant", "MicrosoftAppId": "app", "MicrosoftAppTenantId": TENANT},
            "MicrosoftAppType=SingleTenant needs MicrosoftAppPassword",
        ),
        (
            {"MicrosoftAppType": "SingleTenant"},
            "needs MicrosoftAppId, MicrosoftAppPassword, MicrosoftAppTenantId",
        ),
        (
            {"MicrosoftAppType": "UserAssignedMSI", "MicrosoftAppId": "client-id"},
            "MicrosoftAppType=UserAssignedMSI needs MicrosoftAppTenantId",
        ),
        (
            {"MicrosoftAppType": "UserAssignedMSI", "MicrosoftAppTenantId": TENANT},
            "MicrosoftAppType=UserAssignedMSI needs MicrosoftAppId",
        ),
        (
            {"MicrosoftAppId": "app"},
            "MicrosoftAppId is set but MicrosoftAppPassword is empty",
        ),
        (
            {"MicrosoftAppPassword": "pw"},
            "MicrosoftAppPassword is set but MicrosoftAppId is empty",
        ),
    ],
    ids=[
        "single tenant without tenant",
        "single tenant without secret",
        "single tenant with nothing",
        "managed identity without tenant",
        "managed identity without client id",
        "multi tenant app id without secret",
        "multi tenant secret without app id",
    ],
)
def test_settings_that_cannot_form_a_bot_identity_are_refused_naming_the_setting(values, says):
    with pytest.raises(BotConfigurationError, match=says):
        create_runtime(bot_settings(**values), backend=StubBackend, store=MemoryStore())


def test_without_an_app_id_the_bot_needs_no_secret_and_says_how_to_run_anonymously():
    with pytest.raises(BotConfigurationError, match="MicrosoftAppType=MultiTenant and no MicrosoftAppId"):
        create_adapter(bot_settings(MicrosoftAppType="UserAssignedMSI", MicrosoftAppTenantId=TENANT))
    create_adapter(bot_settings())  # anonymous local mode: nothing needed


def test_a_secret_beside_a_managed_identity_is_ignored_with_a_warning(caplog):
    create_adapter(
        bot_settings(
            MicrosoftAppId="client-id",
            MicrosoftAppPassword="stale-secret",
            MicrosoftAppType="UserAssignedMSI",
            MicrosoftAppTenantId=TENANT,
        )
    )
    assert "MicrosoftAppPassword is ignored with MicrosoftAppType=UserAssignedMSI" in caplog.text
    assert "stale-secret" not in caplog.text
