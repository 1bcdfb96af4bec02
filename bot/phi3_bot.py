"""The chat bot: an ``ActivityHandler`` that answers with the fine-tuned Phi-3 and remembers the turns.

Host wiring (adapter, authentication, HTTP) lives in ``bot.adapter`` and ``bot.function_blueprint``;
this module only decides what to say.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from botbuilder.core import ActivityHandler, TurnContext
from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, DeliveryModes

from bot.answers import ChatService
from bot.commands import Commands, RunStatusSource, parse_command
from bot.conversation import ConversationMemories, ConversationMemory, HistoryBound, RouteName, remember
from bot.dedupe import ActivityLedger
from bot.messages import markdown_messages, typing_activity
from bot.proactive import ACKNOWLEDGEMENT, AnswerScheduler, ProactiveAnswers

log = logging.getLogger("bot")

# Per-request collaborators the host puts into ``turn_state`` (the bot itself is built once).
TURN_SERVICES = "phi3.turn_services"

WELCOME = (
    "Hi! I'm a chat bot backed by a fine-tuned **Phi-3** model. Ask me anything; I remember our "
    "recent turns. Type **/help** for commands."
)
NO_TEXT = "I can only answer text messages. Type a question, or **/help**."


@dataclass(frozen=True)
class TurnServices:
    runs: RunStatusSource | None = None
    scheduler: AnswerScheduler | None = None


@dataclass(frozen=True)
class BotOptions:
    default_route: RouteName
    ack_after_s: float
    max_question_chars: int
    bound: HistoryBound


def question_text(activity: Activity) -> str:
    """The user's text without the bot's Teams @mention (``<at>Bot</at> hi`` -> ``hi``)."""
    text = activity.text or ""
    bot_id = activity.recipient.id if activity.recipient else None
    for entity in activity.entities or []:
        props = entity.additional_properties or {}
        mentioned = props.get("mentioned") or {}
        if (entity.type or "").lower() == "mention" and bot_id and mentioned.get("id") == bot_id:
            text = text.replace(props.get("text") or f"<at>{mentioned.get('name', '')}</at>", "")
    return text.strip()


class Phi3Bot(ActivityHandler):
    def __init__(
        self,
        memories: ConversationMemories,
        chat: ChatService,
        commands: Commands,
        proactive: ProactiveAnswers,
        ledger: ActivityLedger,
        options: BotOptions,
    ) -> None:
        self.memories = memories
        self.chat = chat
        self.commands = commands
        self.proactive = proactive
        self.ledger = ledger
        self.options = options

    async def on_turn(self, turn_context: TurnContext) -> None:
        activity = turn_context.activity
        deduplicated = activity.type in (ActivityTypes.message, ActivityTypes.conversation_update)
        if deduplicated and not await self.ledger.first_time(activity):
            return  # a channel's retry of an activity already being answered
        await super().on_turn(turn_context)
        await self.memories.save(turn_context)  # botbuilder does not save state by itself

    async def on_members_added_activity(self, members_added: list[ChannelAccount], turn_context: TurnContext):
        for member in members_added:
            if member.id != turn_context.activity.recipient.id:
                await turn_context.send_activities(markdown_messages(WELCOME))

    async def on_message_activity(self, turn_context: TurnContext) -> None:
        text = question_text(turn_context.activity)
        if not text:
            await turn_context.send_activity(NO_TEXT)
            return
        memory = await self.memories.load(turn_context)
        services: TurnServices = turn_context.turn_state.get(TURN_SERVICES) or TurnServices()
        command = parse_command(text)
        if command is not None:
            result = await self.commands.run(*command, memory, services.runs)
            if result.change is not None:
                await self.memories.commit(turn_context, result.change)
            await turn_context.send_activities(markdown_messages(result.reply))
            return
        if len(text) > self.options.max_question_chars:
            await turn_context.send_activity(
                f"That message is {len(text)} characters long; I can take at most "
                f"{self.options.max_question_chars}. Please shorten it."
            )
            return
        await self._answer(turn_context, memory, text, services.scheduler)

    async def _answer(
        self,
        turn_context: TurnContext,
        memory: ConversationMemory,
        question: str,
        scheduler: AnswerScheduler | None,
    ) -> None:
        route = memory.route or self.options.default_route
        history = memory.messages()
        conversation = turn_context.activity.conversation.id
        if turn_context.activity.delivery_mode != DeliveryModes.expect_replies:
            await turn_context.send_activity(typing_activity())  # buffered replies show no typing
        answering = asyncio.ensure_future(
            self.chat.answer(route, question, history, conversation=conversation)
        )
        await asyncio.wait({answering}, timeout=self.options.ack_after_s)
        if not answering.done() and scheduler is not None and turn_context.activity.id:
            await self.proactive.hand_off(
                turn_context, question, route, history, answering, scheduler, resets=memory.resets
            )
            await turn_context.send_activity(ACKNOWLEDGEMENT)
            return
        answer = await answering
        await turn_context.send_activities(markdown_messages(answer.text))
        if answer.ok:
            await self.memories.commit(
                turn_context, lambda stored: remember(stored, question, answer.text, self.options.bound)
            )
