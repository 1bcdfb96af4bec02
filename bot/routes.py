"""How a chat turn reaches the model: ``flow`` (the project's Prompt flow) or ``direct`` (the endpoint).

Both routes take the same inputs (the question, the history as chat messages, the endpoint with its
key) and raise the scoring client's typed errors for endpoint failures, so the bot words failures
the same whichever route answered. Prompt flow is at end of life: ``FlowRoute`` is the one adapter
that knows about the flow runner (``flows.runner``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from backends.scoring import ScoringClient
from bot.endpoints import ModelEndpoint
from flows.runner import FLOW_DIR, GenerationOptions, get_flow_runner


class ChatRoute(Protocol):
    name: str

    async def answer(self, endpoint: ModelEndpoint, question: str, history: list[dict[str, str]]) -> str:
        """The model's answer to ``question`` after ``history`` (user/assistant messages, oldest first)."""
        ...


class DirectRoute:
    """The scoring contract straight to the endpoint, through the app's one ``ScoringClient``."""

    name = "direct"

    def __init__(
        self, client: ScoringClient, *, temperature: float, max_new_tokens: int, timeout_s: float
    ) -> None:
        self.client = client
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s

    async def answer(self, endpoint: ModelEndpoint, question: str, history: list[dict[str, str]]) -> str:
        return await self.client.chat(
            endpoint.scoring_uri,
            endpoint.key,
            [*history, {"role": "user", "content": question}],
            timeout=self.timeout_s,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            contract=endpoint.contract,
        )


class FlowRoute:
    """The project's Prompt flow (``flows/phi3_chat``) through the flow runner.

    ``flows.runner`` keeps one loaded flow per endpoint and key (a rotated key builds a new one),
    runs it off the event loop and raises the scoring client's errors for endpoint failures, or
    ``FlowError`` / ``FlowInputError`` for the flow itself. promptflow loads on the first turn.
    """

    name = "flow"

    def __init__(
        self,
        *,
        temperature: float,
        max_new_tokens: int,
        timeout_s: float,
        flow_dir: Path = FLOW_DIR,
        state_dir: Path | None = None,
    ) -> None:
        self.options = GenerationOptions(
            temperature=temperature, max_new_tokens=max_new_tokens, timeout_s=timeout_s
        )
        self.flow_dir = flow_dir
        self.state_dir = state_dir  # promptflow's home (the app's state directory)

    async def answer(self, endpoint: ModelEndpoint, question: str, history: list[dict[str, str]]) -> str:
        options = replace(self.options, contract=endpoint.contract)
        runner = await asyncio.to_thread(
            get_flow_runner,
            endpoint.scoring_uri,
            endpoint.key,
            flow_dir=self.flow_dir,
            options=options,
            state_dir=self.state_dir,
        )
        return await runner.answer(question, history)
