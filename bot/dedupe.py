"""Retried activities are answered once.

Channels retry a POST they gave up on (Teams after ~15 s; Direct Line clients on network errors),
so the same activity id can arrive twice, even at two instances. The first arrival claims the id in
the shared store; later arrivals within ``window_s`` are ignored.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from botbuilder.schema import Activity

log = logging.getLogger("bot.dedupe")


def channel_of(activity: Activity) -> str:
    """The channel id as text (botbuilder's own test adapter uses the ``Channels`` enum)."""
    channel = activity.channel_id
    return str(getattr(channel, "value", channel))


class ClaimStore(Protocol):
    async def claim(self, key: str, value: dict[str, Any], stale_after_s: float) -> bool: ...


class ActivityLedger:
    def __init__(self, store: ClaimStore, *, window_s: float = 3600.0) -> None:
        self.store = store
        self.window_s = window_s

    @staticmethod
    def key(activity: Activity) -> str | None:
        if not activity.id or not activity.conversation:
            return None  # nothing to recognise a retry by
        return f"{channel_of(activity)}/activities/{activity.conversation.id}/{activity.id}"

    async def first_time(self, activity: Activity) -> bool:
        """True the first time this activity is seen; False for a retry of it."""
        key = self.key(activity)
        if key is None:
            return True
        if await self.store.claim(key, {"activity": activity.id}, self.window_s):
            return True
        log.info(
            "bot duplicate activity ignored channel=%s conversation=%s activity=%s",
            activity.channel_id,
            activity.conversation.id,
            activity.id,
        )
        return False
