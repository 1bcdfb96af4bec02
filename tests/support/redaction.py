"""Checking that a secret did not leak, not even a piece of it (an error message that shortens a body
after redacting it, or redacts after shortening, can keep part of a key)."""

from __future__ import annotations

PIECE = 8  # characters: long enough not to occur by chance in an error message


def leaked_pieces(text: str, secret: str, size: int = PIECE) -> set[str]:
    """Every `size`-character piece of `secret` that occurs in `text`."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1) if secret[i : i + size] in text}


# A body whose echoed key starts this far in straddles a 300-character error excerpt: filler of this
# length, then "Bearer <key>", inside {"error": {"message": ...}}.
STRADDLING_FILLER = "x" * 260
