"""The bot's slash commands: /help, /reset, /status, /route flow|direct."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from backends.protocol import BackendError
from bot.conversation import ROUTES, ConversationMemory, RouteName
from bot.endpoints import EndpointDirectory, NoEndpointError
from orchestrators.instances import pipeline_runs

log = logging.getLogger("bot.commands")

HELP = """I answer with the fine-tuned Phi-3 model this app deployed, and I remember our recent turns.

- **/help** — this message
- **/reset** — forget this conversation's history
- **/status** — which model, endpoint and route answer, and the latest fine-tune run
- **/route flow** or **/route direct** — answer through the Prompt flow, or straight from the endpoint"""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    current_step: str | None
    created: str | None


class RunStatusSource(Protocol):
    async def latest_run(self) -> RunInfo | None: ...


class DurableRunStatus:
    """The newest ``finetune_pipeline`` instance, from the Durable client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def latest_run(self) -> RunInfo | None:
        runs = await pipeline_runs(self.client)
        if not runs:
            return None
        newest = max(runs, key=lambda s: str(s.created_time))
        progress = newest.custom_status if isinstance(newest.custom_status, dict) else {}
        return RunInfo(
            run_id=newest.instance_id,
            status=newest.runtime_status.name if newest.runtime_status else "Unknown",
            current_step=progress.get("current_step"),
            created=str(newest.created_time) if newest.created_time else None,
        )


@dataclass(frozen=True)
class CommandResult:
    reply: str
    # What the command changes in the conversation's memory, applied by the bot to the memory as stored
    # when it saves (another turn may have saved meanwhile); None: nothing.
    change: Callable[[ConversationMemory], None] | None = None


def _forget(memory: ConversationMemory) -> None:
    memory.turns, memory.resets = [], memory.resets + 1


def parse_command(text: str) -> tuple[str, list[str]] | None:
    if not text.startswith("/"):
        return None
    words = text[1:].split()
    if not words:  # a bare "/": an unknown command, answered with the help
        return "", []
    name, *args = words
    return name.lower(), args


class Commands:
    def __init__(self, directory: EndpointDirectory, default_route: RouteName) -> None:
        self.directory = directory
        self.default_route = default_route

    async def run(
        self, name: str, args: list[str], memory: ConversationMemory, runs: RunStatusSource | None
    ) -> CommandResult:
        if name == "help":
            return CommandResult(HELP)
        if name == "reset":
            return CommandResult("Done: I've forgotten this conversation's history.", change=_forget)
        if name == "route":
            return self._route(args, memory)
        if name == "status":
            return CommandResult(await self._status(memory, runs))
        return CommandResult(f"I don't know the command `/{name}`.\n\n{HELP}")

    def _route(self, args: list[str], memory: ConversationMemory) -> CommandResult:
        if len(args) != 1 or args[0].lower() not in ROUTES:
            current = memory.route or self.default_route
            return CommandResult(
                f"Usage: `/route flow` or `/route direct` (this conversation uses **{current}**)."
            )
        route: RouteName = args[0].lower()  # type: ignore[assignment]
        return CommandResult(
            f"From now on this conversation is answered through **{route}**.",
            change=lambda stored: setattr(stored, "route", route),
        )

    async def _status(self, memory: ConversationMemory, runs: RunStatusSource | None) -> str:
        route = memory.route or self.default_route
        lines = [f"- **Route:** {route}" + ("" if memory.route else " (the app's default)")]
        try:
            where = await self.directory.describe()
            lines.append(f"- **Endpoint:** {where['endpoint']} ({where['chosen_by']})")
            lines.append(f"- **Deployment:** {where['deployment'] or '-'}")
            lines.append(f"- **Model:** {where['model'] or 'unknown'}")
        except (NoEndpointError, BackendError) as exc:
            lines.append(f"- **Endpoint:** none ({exc})")
        lines.append(f"- **History:** {len(memory.turns)} turn(s) remembered")
        lines.append(f"- **Latest fine-tune run:** {await self._latest_run(runs)}")
        return "\n".join(lines)

    @staticmethod
    async def _latest_run(runs: RunStatusSource | None) -> str:
        if runs is None:
            return "unknown (no Durable client in this host)"
        try:
            run = await asyncio.wait_for(runs.latest_run(), timeout=10)
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            log.warning("bot status: cannot read runs: %s", exc)
            return "unknown (the Durable task hub did not answer)"
        except Exception as exc:  # the Durable client raises a bare Exception for any non-200 answer
            log.warning("bot status: cannot read runs: %s: %s", type(exc).__name__, exc)
            return "unknown (the Durable task hub answered with an error)"
        if run is None:
            return "none yet (start one with POST /api/finetune)"
        step = f", step {run.current_step}" if run.current_step and run.status == "Running" else ""
        return f"{run.run_id}: {run.status}{step} (started {run.created})"
