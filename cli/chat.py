"""A terminal chat with a deployed endpoint, multi-turn, through the one scoring client.

The key is fetched from the backend at start (the run API never returns it) and kept in memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console

from backends.factory import create_backend
from backends.protocol import BackendError
from backends.scoring import ScoringError, chat_sync, contract_for
from settings import get_settings

HISTORY_CHARS = 6000  # keeps the prompt well inside a 4k-token context


def client_backend():
    """The backend as a client sees it: it reads endpoints and keys, and never restarts servers."""
    return create_backend(get_settings(), host=False)


def latest_endpoint() -> str | None:
    endpoints = [e for e in client_backend().list_endpoints() if e.traffic and any(e.traffic.values())]
    endpoints.sort(key=lambda e: e.tags.get("expires-at", ""), reverse=True)
    return endpoints[0].name if endpoints else None


def trim_history(messages: list[dict[str, str]], limit: int = HISTORY_CHARS) -> list[dict[str, str]]:
    """Drop the oldest turns (user+assistant pairs) until the conversation fits."""
    kept = list(messages)
    while len(kept) > 1 and sum(len(m["content"]) for m in kept) > limit:
        kept = kept[2:]
    return kept


def piped_questions(console: Console) -> Callable[[str], str]:
    """A ``read`` for ``chat_loop`` when stdin is not a terminal: one question a line, echoed so the
    transcript reads like a chat; EOFError at the end of the input."""

    def read(prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        console.print(f"{prompt}{line.rstrip()}", markup=False, highlight=False)
        return line

    return read


def chat_loop(
    endpoint: str,
    console: Console,
    read: Callable[[str], str] = input,
    temperature: float = 0.2,
    max_new_tokens: int = 128,
) -> int:
    backend = client_backend()
    try:
        ep = backend.get_endpoint(endpoint)
        key = backend.get_endpoint_keys(endpoint).primary.get_secret_value()
    except BackendError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    console.print(f"chatting with [bold]{endpoint}[/] ({ep.scoring_uri}); /reset forgets, /quit leaves")
    history: list[dict[str, str]] = []
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            console.print("[dim]history cleared[/]")
            continue
        messages = trim_history([*history, {"role": "user", "content": text}])
        try:
            answer = chat_sync(
                ep.scoring_uri,
                key,
                messages,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                contract=contract_for(ep.kind),
            )
        except ScoringError as exc:
            console.print(f"[red]the model did not answer: {exc}[/]")
            continue
        console.print(f"[bold cyan]model>[/] {answer}")
        history = [*messages, {"role": "assistant", "content": answer}]
