"""A small Direct Line 3.0 service on loopback, relaying to the app's ``POST /api/messages``.

Client side (what DirectLineJS / Web Chat calls, ``domain = <host>/directline/v3/directline``):

    POST /conversations                               -> 201 {conversationId, token, expires_in}
    GET  /conversations/{id}                          -> the same (reconnect)
    POST /conversations/{id}/activities               -> {id}; the activity is echoed into the
                                                         transcript and forwarded to the bot
    GET  /conversations/{id}/activities?watermark=N   -> {activities: transcript[N:], watermark}

Channel side (the bot's ``serviceUrl`` = ``<host>/directline``): ``POST
/v3/conversations/{id}/activities[/{replyToId}]`` appends the bot's reply (or proactive message) to
the transcript. The bot runs in anonymous mode (no MicrosoftAppId), as with any local channel.
Everything lives in memory and goes away with the devhost.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from devhost.server import DevHost

log = logging.getLogger("devhost.directline")

CHANNEL_ID = "webchat"
BOT_ACCOUNT = {"id": "phi3-bot", "name": "Phi-3 bot", "role": "bot"}
CLIENT_PREFIX = "/directline/v3/directline"
CHANNEL_PREFIX = "/directline"
BOT_TIMEOUT_S = 15.0  # what Direct Line waits for the bot before answering 502/504
TOKEN_LIFETIME_S = 3600


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Conversation:
    id: str
    token: str
    transcript: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def append(self, activity: dict[str, Any]) -> str:
        activity["id"] = f"{self.id}|{len(self.transcript):07d}"
        activity.setdefault("timestamp", _now())
        self.transcript.append(activity)
        self.changed.set()
        return activity["id"]


class DirectLine:
    def __init__(self, host: DevHost, messages_path: str = "/api/messages") -> None:
        self.host = host
        self.messages_path = messages_path
        self.conversations: dict[str, Conversation] = {}
        self._background: set[asyncio.Task] = set()

    @property
    def service_url(self) -> str:
        return self.host.base_url + CHANNEL_PREFIX

    def routes(self) -> list[web.RouteDef]:
        c = CLIENT_PREFIX
        return [
            web.post(f"{c}/conversations", self.start_conversation),
            web.get(f"{c}/conversations/{{conversation}}", self.reconnect),
            web.post(f"{c}/conversations/{{conversation}}/activities", self.post_activity),
            web.get(f"{c}/conversations/{{conversation}}/activities", self.get_activities),
            web.post(f"{CHANNEL_PREFIX}/v3/conversations/{{conversation}}/activities", self.bot_sends),
            web.post(
                f"{CHANNEL_PREFIX}/v3/conversations/{{conversation}}/activities/{{reply_to}}", self.bot_sends
            ),
            web.put(
                f"{CHANNEL_PREFIX}/v3/conversations/{{conversation}}/activities/{{activity}}",
                self.bot_updates,
            ),
        ]

    def _conversation(self, request: web.Request) -> Conversation:
        conversation = self.conversations.get(request.match_info["conversation"])
        if conversation is None:
            raise web.HTTPNotFound(
                text='{"error": {"code": "BadArgument", "message": "Conversation not found"}}',
                content_type="application/json",
            )
        return conversation

    # -- client side -----------------------------------------------------------------------
    async def start_conversation(self, request: web.Request) -> web.Response:
        conversation = Conversation(id=uuid.uuid4().hex[:22], token=secrets.token_urlsafe(24))
        self.conversations[conversation.id] = conversation
        # Like Direct Line: the bot learns about the conversation and greets whoever joined.
        update = {"type": "conversationUpdate", "membersAdded": [BOT_ACCOUNT, {"id": "user", "name": "You"}]}
        task = asyncio.get_running_loop().create_task(self._forward(conversation, update))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return web.json_response(self._describe(conversation), status=201)

    async def reconnect(self, request: web.Request) -> web.Response:
        return web.json_response(self._describe(self._conversation(request)))

    @staticmethod
    def _describe(conversation: Conversation) -> dict[str, Any]:
        return {
            "conversationId": conversation.id,
            "token": conversation.token,
            "expires_in": TOKEN_LIFETIME_S,
        }

    async def post_activity(self, request: web.Request) -> web.Response:
        conversation = self._conversation(request)
        try:
            activity = await request.json()
        except ValueError:
            return web.json_response(
                {"error": {"code": "BadArgument", "message": "body is not JSON"}}, status=400
            )
        if not isinstance(activity, dict) or not activity.get("type"):
            return web.json_response(
                {"error": {"code": "BadArgument", "message": "not an activity"}}, status=400
            )
        activity_id = conversation.append(activity)  # the echo Web Chat waits for
        status = await self._forward(conversation, activity)
        if status >= 300:
            return web.json_response(
                {"error": {"code": "BotError", "message": f"the bot answered HTTP {status}"}}, status=502
            )
        return web.json_response({"id": activity_id})

    async def get_activities(self, request: web.Request) -> web.Response:
        conversation = self._conversation(request)
        try:
            watermark = int(request.query.get("watermark") or 0)
        except ValueError:
            watermark = 0
        activities = conversation.transcript[watermark:]
        return web.json_response({"activities": activities, "watermark": str(len(conversation.transcript))})

    async def _forward(self, conversation: Conversation, activity: dict[str, Any]) -> int:
        """POST the activity to the bot as the channel would; returns the bot's HTTP status."""
        outgoing = {
            **activity,
            "channelId": CHANNEL_ID,
            "serviceUrl": self.service_url,
            "conversation": {"id": conversation.id},
            "recipient": BOT_ACCOUNT,
            "from": activity.get("from") or {"id": "user", "name": "You"},
            "timestamp": activity.get("timestamp") or _now(),
        }
        outgoing.setdefault("id", f"{conversation.id}|update-{uuid.uuid4().hex[:8]}")
        url = self.host.base_url + self.messages_path
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    url, json=outgoing, timeout=aiohttp.ClientTimeout(total=BOT_TIMEOUT_S)
                ) as response,
            ):
                await response.read()
                if response.status >= 300:
                    log.warning(
                        "directline: the bot answered HTTP %s for %s", response.status, outgoing["type"]
                    )
                return response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("directline: the bot did not take the activity: %s", exc)
            return 504

    # -- channel side (the bot's replies and proactive messages) -----------------------------
    async def bot_sends(self, request: web.Request) -> web.Response:
        conversation = self._conversation(request)
        activity = await request.json()
        activity["conversation"] = {"id": conversation.id}
        activity.setdefault("from", BOT_ACCOUNT)
        return web.json_response({"id": conversation.append(activity)})

    async def bot_updates(self, request: web.Request) -> web.Response:
        self._conversation(request)
        return web.json_response({"id": request.match_info["activity"]})
