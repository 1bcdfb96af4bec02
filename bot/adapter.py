"""Host wiring: the Bot Framework ``CloudAdapter`` and the HTTP side of ``POST /api/messages``.

The Bot Framework SDK is archived; this module and ``bot.function_blueprint`` are the only places
that know its hosting API, so moving to the Microsoft 365 Agents SDK touches them alone.

HTTP mapping, checked before anything reaches the bot:

    wrong Content-Type -> 415   body over MAX_ACTIVITY_BYTES -> 413   not an activity -> 400
    missing / forged / expired / wrong-audience / wrong-issuer token -> 401
    OpenID metadata unreachable -> 503

botbuilder 4.17.1 signals a bad token with several exception types, two of them odd: an unknown
``kid`` raises ``IndexError`` (it indexes an empty match) and a failed endorsement or a disallowed
algorithm raises a plain ``Exception``. Authentication therefore runs here, on its own, so exactly
those refusals map to 401 and nothing from the bot's own turn can be mistaken for one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import azure.functions as func
import jwt
import requests
from botbuilder.core import ConversationState, InvokeResponse, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import Activity, ActivityTypes, DeliveryModes, ExpectedReplies
from botframework.connector.aio import ConnectorClient
from botframework.connector.auth import (
    AuthenticateRequestResult,
    AuthenticationConstants,
    ClaimsIdentity,
    ConnectorFactory,
    ServiceClientCredentialsFactory,
    UserTokenClient,
)
from msrest.exceptions import DeserializationError
from msrest.universal_http.requests import ClientRetryPolicy
from pydantic import ValidationError

from bot.activity_json import activity_from_json, model_to_json
from pipeline.chat_validation import json_refusal
from settings import AppSettings

log = logging.getLogger("bot.adapter")

# msrest 0.7.1 (dormant; botframework-connector's HTTP layer) builds each client's retry policy with
# ``i not in safe_codes`` over a 500-item list, 999 times: ~6 ms of CPU per client, and CloudAdapter
# builds two clients per turn (connector + user token), most of a turn's cost. A frozenset answers
# the same membership test in O(1); nothing else reads the attribute.
if not isinstance(ClientRetryPolicy.safe_codes, frozenset):
    ClientRetryPolicy.safe_codes = frozenset(ClientRetryPolicy.safe_codes)  # type: ignore[assignment]

# Direct Line's limit for one activity; Teams messages are at most ~100 KB.
MAX_ACTIVITY_BYTES = 256 * 1024
# Plain ``Exception`` messages botbuilder's token validation raises for a token it refuses.
_LIBRARY_REFUSALS = ("Could not validate endorsement key", "Token signing algorithm not in allowed list")
APOLOGY = (
    "Sorry, something went wrong on my side while handling your message. I've cleared this "
    "conversation's state; please send it again."
)
TRY_AGAIN = "Sorry, something went wrong on my side while handling your message; please send it again."


class BotConfigurationError(ValueError):
    """The Microsoft App settings do not form an identity the bot can use; the message says which to fix."""


# What each MicrosoftAppType needs (botbuilder checks the same, naming its own APP_* keys instead).
_REQUIRED_SETTINGS = {
    "SingleTenant": ("MicrosoftAppId", "MicrosoftAppPassword", "MicrosoftAppTenantId"),
    "UserAssignedMSI": ("MicrosoftAppId", "MicrosoftAppTenantId"),
}


def adapter_configuration(settings: AppSettings) -> SimpleNamespace:
    """botbuilder's configuration object (read with getattr) from the app's settings.

    Raises ``BotConfigurationError`` for a combination botbuilder would refuse with a bare
    ``Exception`` naming its internal keys, or accept and fail on the first reply (an app id
    without its secret).
    """
    app_type = settings.microsoft_app_type
    values = {
        "MicrosoftAppId": settings.microsoft_app_id,
        "MicrosoftAppPassword": settings.microsoft_app_password.get_secret_value(),
        "MicrosoftAppTenantId": settings.microsoft_app_tenant_id,
    }
    missing = [name for name in _REQUIRED_SETTINGS.get(app_type, ()) if not values[name]]
    if missing:
        fix = "set them from the Azure Bot resource's app registration (or its managed identity)"
        if not values["MicrosoftAppId"]:
            fix += "; for anonymous local mode, use MicrosoftAppType=MultiTenant and no MicrosoftAppId"
        raise BotConfigurationError(f"MicrosoftAppType={app_type} needs {', '.join(missing)}: {fix}")
    if app_type == "MultiTenant" and bool(values["MicrosoftAppId"]) != bool(values["MicrosoftAppPassword"]):
        given, absent = (
            ("MicrosoftAppId", "MicrosoftAppPassword")
            if values["MicrosoftAppId"]
            else ("MicrosoftAppPassword", "MicrosoftAppId")
        )
        raise BotConfigurationError(
            f"{given} is set but {absent} is empty: a MultiTenant bot needs both (the app registration's "
            "client id and secret), or neither for anonymous local mode"
        )
    if app_type == "UserAssignedMSI" and values["MicrosoftAppPassword"]:
        log.warning("bot settings: MicrosoftAppPassword is ignored with MicrosoftAppType=UserAssignedMSI")
    if app_type == "MultiTenant" and values["MicrosoftAppTenantId"]:
        log.warning(
            "bot settings: MicrosoftAppTenantId is ignored with MicrosoftAppType=MultiTenant; "
            "set MicrosoftAppType=SingleTenant to use it"
        )
    return SimpleNamespace(
        APP_ID=values["MicrosoftAppId"],
        APP_PASSWORD=values["MicrosoftAppPassword"],
        APP_TYPE=app_type,
        APP_TENANTID=values["MicrosoftAppTenantId"],
    )


CLIENT_CACHE_SIZE = 64  # distinct (bot app id, serviceUrl, audience): a handful in practice


def _bot_app_id(claims_identity: ClaimsIdentity) -> str:
    # Where botbuilder's own factories read it: the audience (channel tokens), else appid (Emulator).
    audience = claims_identity.get_claim_value(AuthenticationConstants.AUDIENCE_CLAIM)
    return (
        audience
        if audience is not None
        else claims_identity.get_claim_value(AuthenticationConstants.APP_ID_CLAIM)
    )


class _ClientCache:
    """Per event loop (the clients' HTTP sessions belong to one), least recently used dropped first."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, OrderedDict] = (
            weakref.WeakKeyDictionary()
        )

    async def get(self, key: tuple, build: Callable[[], Awaitable[Any]]) -> Any:
        clients = self._by_loop.setdefault(asyncio.get_running_loop(), OrderedDict())
        client = clients.get(key)
        if client is None:
            client = clients[key] = await build()
            while len(clients) > CLIENT_CACHE_SIZE:
                clients.popitem(last=False)
        clients.move_to_end(key)
        return client


class _ReusingConnectorFactory(ConnectorFactory):
    def __init__(self, inner: ConnectorFactory, cache: _ClientCache, app_id: str) -> None:
        self._inner, self._cache, self._app_id = inner, cache, app_id

    async def create(self, service_url: str, audience: str | None = None) -> ConnectorClient:
        key = ("connector", self._app_id, service_url, audience)
        return await self._cache.get(key, lambda: self._inner.create(service_url, audience))


class ReusingBotFrameworkAuthentication(ConfigurationBotFrameworkAuthentication):
    """``ConfigurationBotFrameworkAuthentication`` that reuses its Bot Connector and token clients.

    botbuilder builds a new ConnectorClient and UserTokenClient (msrest clients, each with its own
    configuration and HTTP pipeline) on every turn, which costs more CPU than the rest of a turn;
    they hold nothing turn-specific, so they are kept per bot app id and serviceUrl/audience.
    """

    def __init__(self, configuration: Any, **kwargs: Any) -> None:
        super().__init__(configuration, **kwargs)
        self._clients = _ClientCache()

    async def authenticate_request(self, activity: Activity, auth_header: str) -> AuthenticateRequestResult:
        result = await super().authenticate_request(activity, auth_header)
        if result.connector_factory is not None:
            app_id = _bot_app_id(result.claims_identity)
            result.connector_factory = _ReusingConnectorFactory(
                result.connector_factory, self._clients, app_id
            )
        return result

    def create_connector_factory(self, claims_identity: ClaimsIdentity) -> ConnectorFactory:
        inner = super().create_connector_factory(claims_identity)
        return _ReusingConnectorFactory(inner, self._clients, _bot_app_id(claims_identity))

    async def create_user_token_client(self, claims_identity: ClaimsIdentity) -> UserTokenClient:
        key = ("user-token", _bot_app_id(claims_identity))
        return await self._clients.get(
            key,
            lambda: super(ReusingBotFrameworkAuthentication, self).create_user_token_client(claims_identity),
        )


class AppCloudAdapter(CloudAdapter):
    """botbuilder's ``CloudAdapter``, writing the ``expectReplies`` body with ``bot.activity_json``.

    The body is the same dict ``ExpectedReplies(...).serialize()`` gives (botbuilder 4.17.1's
    ``_process_turn_results``), without msrest's ~300 µs per reply, a fifth of a buffered turn's CPU.
    """

    def _process_turn_results(self, context: TurnContext) -> InvokeResponse | None:
        if context.activity.delivery_mode == DeliveryModes.expect_replies:
            replies = ExpectedReplies(activities=context.buffered_reply_activities)
            return InvokeResponse(status=HTTPStatus.OK, body=model_to_json(replies))
        return super()._process_turn_results(context)


def create_adapter(
    settings: AppSettings, *, credentials_factory: ServiceClientCredentialsFactory | None = None
) -> CloudAdapter:
    """``CloudAdapter`` over the configuration's authentication; an empty app id = anonymous mode."""
    auth = ReusingBotFrameworkAuthentication(
        adapter_configuration(settings), credentials_factory=credentials_factory
    )
    return AppCloudAdapter(auth)


def turn_error_handler(
    conversation_state: ConversationState,
) -> Callable[[TurnContext, Exception], Awaitable]:
    """``on_turn_error``: log and apologise; clear the conversation's state only when it is the state
    that cannot be read (anything else — a store conflict, a failed send — leaves the history alone)."""

    async def on_turn_error(turn_context: TurnContext, error: Exception) -> None:
        activity = turn_context.activity
        log.error(
            "bot turn failed channel=%s conversation=%s activity=%s error=%s: %s",
            activity.channel_id,
            activity.conversation.id if activity.conversation else None,
            activity.id,
            type(error).__name__,
            error,
            exc_info=error,
        )
        unreadable = isinstance(error, ValidationError)  # ConversationMemory refused what is stored
        if unreadable:
            try:
                await conversation_state.clear_state(turn_context)
                await conversation_state.save_changes(turn_context, force=True)
            except Exception:  # the store itself may be what failed; the apology still goes out
                log.exception("bot could not clear the conversation state after a failed turn")
        if activity.type == ActivityTypes.message:
            await turn_context.send_activity(APOLOGY if unreadable else TRY_AGAIN)

    return on_turn_error


def _response(status: int, error: str | None = None) -> func.HttpResponse:
    body = json.dumps({"error": error}) if error else None
    return func.HttpResponse(body, status_code=status, mimetype="application/json")


def refusal_reason(error: Exception) -> str | None:
    """Why botbuilder refused the token, or None when ``error`` is not a refusal."""
    if isinstance(error, PermissionError):
        return str(error) or "no valid identity"
    if isinstance(error, jwt.PyJWTError):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, IndexError):
        return "the token's signing key id (kid) is not in the OpenID metadata"
    if type(error) is Exception and str(error) in _LIBRARY_REFUSALS:
        return str(error)
    return None


def read_activity(req: func.HttpRequest) -> Activity | func.HttpResponse:
    """The request's activity, or the 4xx response that says what is wrong with it."""
    content_type = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return _response(415, f"Content-Type must be application/json, not {content_type or '(none)'}")
    body = req.get_body() or b""
    if len(body) > MAX_ACTIVITY_BYTES:
        return _response(413, f"activity is {len(body)} bytes; the limit is {MAX_ACTIVITY_BYTES}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _response(400, f"body is not valid JSON: {exc}")
    except (RecursionError, ValueError) as exc:  # JSON Python will not read: too deep, a 4300+ digit number
        return _response(400, f"body is {json_refusal(exc)}")
    if not isinstance(data, dict):
        return _response(400, f"body must be a JSON object (an activity), not {type(data).__name__}")
    try:
        activity = activity_from_json(data)
    except DeserializationError as exc:
        return _response(400, f"body is not a Bot Framework activity: {exc}")
    missing = [
        name
        for name, value in (
            ("type", activity.type),
            ("channelId", activity.channel_id),
            ("serviceUrl", activity.service_url),
            ("conversation.id", activity.conversation and activity.conversation.id),
        )
        if not value
    ]
    if missing:
        return _response(400, f"activity is missing {', '.join(missing)}")
    problem = _service_url_problem(activity.service_url)
    if problem:
        return _response(400, f"activity's serviceUrl {activity.service_url!r:.200} {problem}")
    return activity


def _service_url_problem(url: Any) -> str | None:
    """Why the Bot Connector client could not post replies to ``url``, or None (checked as requests
    checks it when the reply is sent, after the turn: a 500 there)."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        return "is not an http(s) URL"
    try:
        requests.PreparedRequest().prepare_url(url, None)
    except requests.RequestException as exc:
        return f"is not a URL requests can call: {exc}"
    return None


class MessagesEndpoint:
    """``POST /api/messages``: authenticate, run the turn, answer as the channel expects."""

    def __init__(self, adapter: CloudAdapter) -> None:
        self.adapter = adapter

    async def handle(
        self, req: func.HttpRequest, logic: Callable[[TurnContext], Awaitable[Any]]
    ) -> func.HttpResponse:
        activity = read_activity(req)
        if isinstance(activity, func.HttpResponse):
            return activity
        auth = await self._authenticate(activity, req.headers.get("Authorization") or "")
        if isinstance(auth, func.HttpResponse):
            return auth
        invoke = await self.adapter.process_activity(auth, activity, logic)
        if invoke is None:
            return func.HttpResponse(status_code=201)  # what botbuilder's aiohttp host answers
        body = json.dumps(invoke.body) if invoke.body is not None else None
        return func.HttpResponse(body, status_code=int(invoke.status), mimetype="application/json")

    async def _authenticate(
        self, activity: Activity, header: str
    ) -> AuthenticateRequestResult | func.HttpResponse:
        try:
            return await self.adapter.bot_framework_authentication.authenticate_request(activity, header)
        except requests.RequestException as exc:
            log.error("bot cannot fetch the OpenID metadata to check a token: %s", exc)
            return _response(503, "cannot check the token now (OpenID metadata unreachable)")
        except Exception as exc:  # narrowed right below: only botbuilder's token refusals become 401
            reason = refusal_reason(exc)
            if reason is None:
                raise
            log.warning(
                "bot request refused status=401 channel=%s serviceUrl=%s reason=%s",
                activity.channel_id,
                activity.service_url,
                reason,
            )
            return _response(401, "unauthorized")
