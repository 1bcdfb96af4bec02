"""One chat turn to one answer: pick the route, find the endpoint, retry once on a refused key, and
turn every failure into a short honest message for the user plus one structured log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from backends.protocol import BackendError
from backends.scoring import (
    ScoringAuthError,
    ScoringError,
    ScoringNotFoundError,
    ScoringRejectedError,
    ScoringResponseError,
    ScoringThrottledError,
    ScoringTimeoutError,
    ScoringUnavailableError,
)
from bot.conversation import RouteName
from bot.endpoints import EndpointDirectory, NoEndpointError
from bot.routes import ChatRoute
from flows.runner import FlowError, FlowInputError

log = logging.getLogger("bot.answers")


@dataclass(frozen=True)
class Answer:
    text: str
    ok: bool  # False: ``text`` explains a failure (it is not remembered as the model's answer)
    route: RouteName
    endpoint: str | None = None


def _failure(error: Exception, timeout_s: float) -> tuple[str, str]:
    """(kind for the log, message for the user)."""
    if isinstance(error, NoEndpointError):
        return "no_endpoint", f"I can't answer yet: {error}."
    if isinstance(error, ScoringThrottledError):
        wait = f" in about {error.retry_after_s:.0f} seconds" if error.retry_after_s else " in a moment"
        return "throttled", f"The model is busy right now (too many requests). Please try again{wait}."
    if isinstance(error, ScoringTimeoutError):
        return "timeout", (
            f"The model did not answer within {timeout_s:g} seconds. Please try again, perhaps with a "
            "shorter question."
        )
    if isinstance(error, ScoringAuthError):
        return "auth", (
            "The model endpoint refused my key, even after fetching a fresh one. An administrator needs "
            "to check the endpoint's keys."
        )
    if isinstance(error, ScoringUnavailableError | ScoringNotFoundError):
        return "unavailable", "The model endpoint is not reachable right now. Please try again in a minute."
    if isinstance(error, ScoringRejectedError | ScoringResponseError):
        status = f" (HTTP {error.status})" if error.status else ""
        return "rejected", f"The model endpoint could not handle this request{status}. Try rephrasing it."
    if isinstance(error, FlowInputError):
        return "flow_input", (
            "The Prompt flow could not take this question with our history. Try a shorter question, or "
            "/reset to start over."
        )
    if isinstance(error, FlowError):
        return (
            "flow_failed",
            "The Prompt flow failed while answering. An administrator can find why in the log.",
        )
    if isinstance(error, BackendError):
        return "backend", "I could not look up the model endpoint right now. Please try again in a minute."
    return "endpoint_error", "The model endpoint failed while answering. Please try again."


class ChatService:
    """Answers turns through the named route; never raises for endpoint, flow or backend failures."""

    def __init__(
        self, directory: EndpointDirectory, routes: dict[str, ChatRoute], *, timeout_s: float
    ) -> None:
        self.directory = directory
        self.routes = routes
        self.timeout_s = timeout_s

    async def answer(
        self, route: RouteName, question: str, history: list[dict[str, str]], *, conversation: str = "-"
    ) -> Answer:
        started = time.perf_counter()
        endpoint_name: str | None = None
        try:
            endpoint = await self.directory.current()
            endpoint_name = endpoint.name
            try:
                text = await self.routes[route].answer(endpoint, question, history)
            except ScoringAuthError:
                # Keys change when regenerated: fetch the current one and try once more.
                self.directory.forget_key(endpoint.name)
                endpoint = await self.directory.current()
                text = await self.routes[route].answer(endpoint, question, history)
        except (NoEndpointError, ScoringError, BackendError) as error:
            if isinstance(error, ScoringNotFoundError | ScoringUnavailableError | NoEndpointError):
                self.directory.forget_choice()
            kind, message = _failure(error, self.timeout_s)
            log.warning(
                "bot answer failed kind=%s route=%s endpoint=%s conversation=%s status=%s duration_ms=%.0f "
                "error=%s",
                kind,
                route,
                endpoint_name,
                conversation,
                getattr(error, "status", None),
                (time.perf_counter() - started) * 1000,
                error,
            )
            return Answer(message, ok=False, route=route, endpoint=endpoint_name)
        log.info(
            "bot answered route=%s endpoint=%s conversation=%s history_messages=%d duration_ms=%.0f",
            route,
            endpoint_name,
            conversation,
            len(history),
            (time.perf_counter() - started) * 1000,
        )
        if not text.strip():
            return Answer(
                "(The model returned an empty answer.)", ok=False, route=route, endpoint=endpoint_name
            )
        return Answer(text, ok=True, route=route, endpoint=endpoint_name)
