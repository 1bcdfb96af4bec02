"""Turning model output into channel messages: markdown, and split under Teams' size limit.

Teams takes about 100 KB per bot message (UTF-16, older docs say 40 KB) and answers 413
``MessageSizeTooBig`` above it. 15,000 characters is at most ~60 KB in UTF-16 even for astral
characters, safe under both numbers.
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

from botbuilder.schema import Activity, ActivityTypes, InputHints, TextFormatTypes

TEAMS_SAFE_CHARS = 15_000
FENCE = "```"
# Values copy.deepcopy returns as they are (it shares them too).
_IMMUTABLE = frozenset({type(None), str, int, float, bool})


class ReplyActivity(Activity):
    """An activity the bot sends, which deep-copies in a few microseconds instead of ~50.

    ``TurnContext.send_activities`` deep-copies every outgoing activity, and ``copy.deepcopy`` of an
    msrest model goes through each of its ~45 attributes, most of them None. Here immutable values
    (None, strings, numbers, enum members) are shared, exactly as deepcopy shares them, and everything
    else is deep-copied as usual.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> ReplyActivity:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(
            {
                name: value
                if type(value) in _IMMUTABLE or isinstance(value, Enum)
                else copy.deepcopy(value, memo)
                for name, value in vars(self).items()
            }
        )
        return clone


def split_message(text: str, limit: int = TEAMS_SAFE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at paragraph, line or word breaks.

    A code block cut in two is closed at the end of one piece and reopened at the start of the
    next, so each message renders on its own.
    """
    if limit < 2 * len(FENCE) + 16:
        raise ValueError(f"limit must be at least {2 * len(FENCE) + 16} characters, got {limit}")
    pieces: list[str] = []
    rest = text
    reopen = ""
    while rest:
        room = limit - len(reopen) - len(FENCE) - 1  # leave room to close a code block
        if len(reopen) + len(rest) <= limit:
            pieces.append(reopen + rest)
            break
        cut = _cut_point(rest, room)
        piece, rest = reopen + rest[:cut].rstrip(), rest[cut:].lstrip("\n")
        inside = piece.count(FENCE) % 2 == 1
        pieces.append(piece + "\n" + FENCE if inside else piece)
        reopen = FENCE + "\n" if inside else ""
    return [p for p in pieces if p.strip()]


def _cut_point(text: str, room: int) -> int:
    window = text[:room]
    for separator in ("\n\n", "\n", " "):
        at = window.rfind(separator)
        if at > room // 2:  # a break in the second half: keep pieces reasonably full
            return at + len(separator)
    return room


def markdown_messages(text: str, limit: int = TEAMS_SAFE_CHARS) -> list[Activity]:
    """Message activities for ``text`` (markdown), split to fit."""
    return [
        ReplyActivity(
            type=ActivityTypes.message,
            text=piece,
            text_format=TextFormatTypes.markdown,
            input_hint=InputHints.accepting_input,  # as MessageFactory.text sets it
        )
        for piece in split_message(text, limit) or [text]
    ]


def typing_activity() -> Activity:
    return ReplyActivity(type=ActivityTypes.typing)
