"""Slow answers: acknowledge now, post the answer later into the same conversation.

Channels give up on a turn after ~15 s (Teams then retries the POST). When the model has not
answered within ``BOT_ACK_AFTER_S``, the turn stores a ``PendingAnswer`` (the conversation
reference, the question and the history it was asked with) in the bot's store, replies with an
acknowledgement, and schedules delivery by key: on the Function App a Durable orchestration
(``bot.function_blueprint``), so a restart cannot lose it. Durable history holds only the key,
never the user's text. Delivery adopts the model call already running in this process when there
is one (no second model call), else asks again, then sends the answer with ``continue_conversation``
and adds the turn to the conversation's history.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Literal, Protocol

from botbuilder.core import BotAdapter, Storage, TurnContext
from botbuilder.schema import ConversationReference
from pydantic import BaseModel

from bot.answers import Answer, ChatService
from bot.conversation import ConversationMemories, ConversationMemory, HistoryBound, RouteName, remember
from bot.dedupe import channel_of
from bot.messages import markdown_messages
from pipeline.config import DELIVERY_INSTANCE_PREFIX

log = logging.getLogger("bot.proactive")

ACKNOWLEDGEMENT = "This one is taking a while. I'll post the answer here as soon as it's ready."
IN_FLIGHT_KEEP_S = 900.0  # an answer nobody adopted (delivered by another instance) is dropped


class PendingAnswer(BaseModel):
    reference: dict
    question: str
    history: list[dict[str, str]]
    route: RouteName
    resets: int = 0  # the conversation's /reset count when the question was asked
    state: Literal["pending", "answered"] = "pending"  # answered: kept so a retried send reuses it
    answer: str | None = None
    ok: bool = False


class DeliveryReport(BaseModel):
    """What the Durable activity returns: small, no user text."""

    pending_key: str
    delivered: bool
    reason: str
    messages: int = 0


class AnswerScheduler(Protocol):
    async def schedule(self, pending_key: str) -> None: ...


def pending_key(activity) -> str:
    return f"{channel_of(activity)}/pending/{activity.conversation.id}/{activity.id}"


def delivery_instance_id(key: str) -> str:
    """One Durable instance per pending answer, so a repeated schedule cannot deliver twice."""
    return DELIVERY_INSTANCE_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


class ProactiveAnswers:
    def __init__(
        self,
        store: Storage,
        chat: ChatService,
        memories: ConversationMemories,
        bound: HistoryBound,
        *,
        app_id: str = "",
    ) -> None:
        self.store = store
        self.chat = chat
        self.memories = memories
        self.bound = bound
        self.app_id = app_id
        self._in_flight: dict[str, asyncio.Future[Answer]] = {}

    async def hand_off(
        self,
        ctx: TurnContext,
        question: str,
        route: RouteName,
        history: list[dict[str, str]],
        in_flight: asyncio.Future[Answer],
        scheduler: AnswerScheduler,
        resets: int = 0,
    ) -> str:
        """Park the turn and schedule its delivery; the caller sends the acknowledgement."""
        key = pending_key(ctx.activity)
        reference = TurnContext.get_conversation_reference(ctx.activity)
        pending = PendingAnswer(
            reference=reference.serialize(), question=question, history=history, route=route, resets=resets
        )
        await self.store.write({key: pending.model_dump(mode="json")})
        self._in_flight[key] = in_flight
        in_flight.add_done_callback(
            lambda _: asyncio.get_running_loop().call_later(IN_FLIGHT_KEEP_S, self._in_flight.pop, key, None)
        )
        await scheduler.schedule(key)
        log.info(
            "bot answer handed off conversation=%s activity=%s", ctx.activity.conversation.id, ctx.activity.id
        )
        return key

    async def deliver(self, adapter: BotAdapter, key: str) -> DeliveryReport:
        """Answer (or adopt the running answer), send it, remember the turn. Safe to run again."""
        raw = (await self.store.read([key])).get(key)
        if raw is None:
            return DeliveryReport(pending_key=key, delivered=False, reason="already delivered or unknown")
        pending = PendingAnswer.model_validate({k: v for k, v in raw.items() if k != "e_tag"})
        if pending.state == "pending":
            answer = await self._answer(key, pending)
            pending.state, pending.answer, pending.ok = "answered", answer.text, answer.ok
            await self.store.write({key: pending.model_dump(mode="json")})
        sent = await self._send(adapter, pending)
        await self.store.delete([key])  # delivered: a replay finds nothing left to send
        return DeliveryReport(pending_key=key, delivered=True, reason="sent", messages=sent)

    async def _answer(self, key: str, pending: PendingAnswer) -> Answer:
        running = self._in_flight.pop(key, None)
        if running is not None and running.get_loop() is asyncio.get_running_loop():
            return await running
        reference = ConversationReference().deserialize(pending.reference)
        return await self.chat.answer(
            pending.route, pending.question, pending.history, conversation=reference.conversation.id
        )

    async def _send(self, adapter: BotAdapter, pending: PendingAnswer) -> int:
        reference = ConversationReference().deserialize(pending.reference)
        activities = markdown_messages(pending.answer or "")

        failures: list[BaseException] = []

        async def post(ctx: TurnContext) -> None:
            # Address the answer as a reply to the question it answers (replyToId), as an inline
            # answer would be, not to the synthetic continuation event's id.
            ctx.activity.id = reference.activity_id
            try:
                for activity in activities:
                    await ctx.send_activity(activity)
                if pending.ok:
                    answer = pending.answer or ""

                    def add_turn(memory: ConversationMemory) -> None:
                        if memory.resets == pending.resets:  # else /reset came after the question
                            remember(memory, pending.question, answer, self.bound)

                    await self.memories.commit(ctx, add_turn)
            except Exception as error:
                failures.append(error)  # the adapter hands it to on_turn_error, which does not raise
                raise

        await adapter.continue_conversation(reference, post, self.app_id)
        if failures:  # not delivered: the caller keeps the pending answer and Durable retries
            raise failures[0]
        return len(activities)


class InProcessScheduler:
    """Delivers in a task of this process: for hosts without Durable (tests, a bare adapter)."""

    def __init__(self, answers: ProactiveAnswers, adapter: BotAdapter) -> None:
        self.answers = answers
        self.adapter = adapter
        self.tasks: set[asyncio.Task[DeliveryReport]] = set()

    async def schedule(self, pending_key: str) -> None:
        task = asyncio.ensure_future(self.answers.deliver(self.adapter, pending_key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
