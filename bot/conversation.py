"""What the bot remembers about one conversation, and how much of it goes to the model.

The memory lives in ``ConversationState`` as a plain JSON-safe dict (so any ``Storage``, the blob
one included, can keep it): the recent turns as chat messages and this conversation's route choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from botbuilder.core import ConversationState, TurnContext
from botbuilder.core.bot_state import CachedBotState
from pydantic import BaseModel, Field

from bot.storage import ABSENT, StorageConflictError

RouteName = Literal["flow", "direct"]
COMMIT_ATTEMPTS = 5
ROUTES: tuple[RouteName, ...] = ("flow", "direct")


class ChatTurn(BaseModel):
    question: str
    answer: str


class ConversationMemory(BaseModel):
    turns: list[ChatTurn] = Field(default_factory=list)
    route: RouteName | None = None  # None: the app's BOT_ROUTE
    # Counts /reset: a slow answer to a question asked before the last reset is not remembered.
    resets: int = 0

    def messages(self) -> list[dict[str, str]]:
        """The history as alternating user/assistant messages, oldest first."""
        out: list[dict[str, str]] = []
        for turn in self.turns:
            out.append({"role": "user", "content": turn.question})
            out.append({"role": "assistant", "content": turn.answer})
        return out


@dataclass(frozen=True)
class HistoryBound:
    """How much history is kept: at most ``max_turns`` turns and ``max_chars`` characters.

    Characters stand in for tokens (Phi-3's tokenizer averages ~3-4 characters per token on
    English chat), so the bound needs no tokenizer at the point of use.
    """

    max_turns: int
    max_chars: int

    def apply(self, turns: list[ChatTurn]) -> list[ChatTurn]:
        """The newest turns that fit; an older turn is never kept when a newer one is dropped."""
        kept: list[ChatTurn] = []
        budget = self.max_chars
        for turn in reversed(turns[-self.max_turns :] if self.max_turns else []):
            cost = len(turn.question) + len(turn.answer)
            if cost > budget:
                break
            budget -= cost
            kept.append(turn)
        kept.reverse()
        return kept


def remember(memory: ConversationMemory, question: str, answer: str, bound: HistoryBound) -> None:
    """Add a finished turn and drop what no longer fits."""
    memory.turns = bound.apply([*memory.turns, ChatTurn(question=question, answer=answer)])


class _JsonCachedState(CachedBotState):
    """botbuilder's cached state, fingerprinted as JSON where it is JSON (ours always is).

    ``BotState`` compares a fingerprint taken at load with one taken at save to decide whether to
    write; botbuilder takes both with jsonpickle, ~40 µs each, two or three times a turn. Any
    fingerprint that differs whenever the state differs will do (the same state with its keys in
    another order only costs one unneeded write); state that is not plain JSON keeps botbuilder's.
    """

    def compute_hash(self, obj: Any) -> str:
        try:
            return json.dumps(obj, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            return super().compute_hash(obj)


class AppConversationState(ConversationState):
    """``ConversationState`` with the cheaper change check of ``_JsonCachedState``."""

    async def load(self, turn_context: TurnContext, force: bool = False) -> None:
        # botbuilder 4.17.1's BotState.load, building the cache entry from our class.
        cached = self.get_cached_state(turn_context)
        if force or not cached or not cached.state:
            key = self.get_storage_key(turn_context)
            items = await self._storage.read([key])
            # A conversation with no state yet is saved only if it still has none (see storage.ABSENT).
            turn_context.turn_state[self._context_service_key] = _JsonCachedState(
                items.get(key) or {"e_tag": ABSENT}
            )


class ConversationMemories:
    """Reads and writes ``ConversationMemory`` in a ``ConversationState`` (saved at the end of a turn)."""

    PROPERTY = "chat"

    def __init__(self, state: ConversationState) -> None:
        self.state = state
        self._property = state.create_property(self.PROPERTY)

    async def load(self, ctx: TurnContext) -> ConversationMemory:
        raw = await self._property.get(ctx, dict)
        return ConversationMemory.model_validate(raw or {})

    async def store(self, ctx: TurnContext, memory: ConversationMemory) -> None:
        await self._property.set(ctx, memory.model_dump(mode="json"))

    async def save(self, ctx: TurnContext) -> None:
        await self.state.save_changes(ctx)

    async def commit(
        self, ctx: TurnContext, change: Callable[[ConversationMemory], None]
    ) -> ConversationMemory:
        """Apply `change` to the stored memory and save it now. When another turn of this conversation
        saved in between (an e-tag conflict: two messages at once, a slow answer posted meanwhile),
        read the memory again and apply `change` to that, so neither turn is lost."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            memory = await self.load(ctx)
            change(memory)
            await self.store(ctx, memory)
            try:
                await self.state.save_changes(ctx)
                return memory
            except StorageConflictError:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                await self.state.load(ctx, force=True)
        raise AssertionError("unreachable")
