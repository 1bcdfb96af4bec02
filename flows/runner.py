"""Run the chat flow (``flows/phi3_chat``) in-process: the one module that calls promptflow to answer.

A ``FlowRunner`` is built for one (flow folder, scoring URI, key): ``load_flow`` once and a
``FlowContext`` holding a ``CustomConnection`` made in memory from the key fetched at run time (no
connection store involved), reused across turns, conversations and threads. The bot awaits
``answer()``, which runs the flow off the event loop; pipeline steps call ``answer_sync()``.

Our conversations are ``[{"role", "content"}, ...]``; the flow takes Prompt flow's chat history
``[{"inputs": {"question"}, "outputs": {"answer"}}, ...]`` — converted here. Failures come back as
``backends.scoring`` errors (auth, not found, throttled, unavailable, timeout, malformed response),
so callers handle the flow route and the direct route alike; problems with the flow itself or its
inputs are ``FlowError`` / ``FlowInputError``. promptflow is imported on first use only.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from backends.scoring import (
    RetryPolicy,
    ScoringAuthError,
    ScoringError,
    ScoringNotFoundError,
    ScoringRejectedError,
    ScoringResponseError,
    ScoringThrottledError,
    ScoringTimeoutError,
    ScoringUnavailableError,
)
from flows.environment import ensure_promptflow_configured

FLOW_DIR = Path(__file__).resolve().parent / "phi3_chat"
NODE = "integrate_with_promptflow"
_CACHE_SIZE = 8


class FlowError(ScoringError):
    """The flow itself failed (cannot be loaded, a tool bug, an executor error)."""


class FlowInputError(FlowError):
    """The question or history cannot be sent (empty question, prompt over budget, malformed history)."""


@dataclass(frozen=True)
class GenerationOptions:
    """Node inputs the runner overrides; ``None`` keeps the value in ``flow.dag.yaml``."""

    temperature: float | None = None
    max_new_tokens: int | None = None
    max_prompt_chars: int | None = None
    timeout_s: float | None = None
    deployment: str | None = None  # Azure ML's azureml-model-deployment header: one named deployment
    contract: str | None = None  # "mlflow" (online endpoint) or "chat-completions" (serverless endpoint)

    def overrides(self) -> dict[str, Any]:
        values = {
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_chars": self.max_prompt_chars,
            "timeout_s": self.timeout_s,
            "deployment": self.deployment,
            "contract": self.contract,
        }
        return {f"nodes.{NODE}.inputs.{k}": v for k, v in values.items() if v is not None}


class FlowRunner:
    """One loaded chat flow bound to one endpoint and key; thread-safe, reused across turns."""

    def __init__(
        self,
        scoring_uri: str,
        key: str,
        *,
        flow_dir: Path = FLOW_DIR,
        options: GenerationOptions = GenerationOptions(),
        retry: RetryPolicy = RetryPolicy(),
        state_dir: Path | None = None,
    ) -> None:
        if not scoring_uri.startswith(("http://", "https://")):
            raise FlowInputError(f"scoring URI {scoring_uri!r} is not an http(s) URL")
        if not key:
            raise FlowInputError("the endpoint key is empty; fetch the endpoint's primary key")
        if state_dir is None:
            from settings import get_settings

            state_dir = get_settings().state_dir
        ensure_promptflow_configured(state_dir)
        self.flow_dir = Path(flow_dir).resolve()
        self.scoring_uri = scoring_uri
        self.options = options
        self.retry = retry
        self._flow = _load(self.flow_dir, scoring_uri, key, options)

    def answer_sync(self, question: str, history: Sequence[Mapping[str, str]] = ()) -> str:
        """The flow's answer to ``question`` after ``history`` (our messages, oldest first)."""
        if _on_event_loop_thread():
            raise RuntimeError("answer_sync() was called on an event loop thread; await answer() instead")
        inputs = {"question": _checked_question(question), "chat_history": to_chat_history(history)}
        return self._invoke(inputs)

    async def answer(self, question: str, history: Sequence[Mapping[str, str]] = ()) -> str:
        """``answer_sync`` in a worker thread, so the event loop keeps serving other conversations."""
        return await asyncio.to_thread(self.answer_sync, question, list(history))

    def answer_conversation(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Answer a whole conversation whose last message is the user's question (evaluation's shape)."""
        if not messages or messages[-1].get("role") != "user":
            raise FlowInputError("the conversation must end with a user message (the question to answer)")
        return self.answer_sync(messages[-1]["content"], messages[:-1])

    def _invoke(self, inputs: dict[str, Any]) -> str:
        # Like ScoringClient: retry only when the model certainly did not run (no connection, 503).
        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.retry.attempts)),
            wait=wait_exponential(multiplier=self.retry.initial_wait_s, max=self.retry.max_wait_s),
            retry=retry_if_exception(_is_retryable),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._invoke_once(inputs)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _invoke_once(self, inputs: dict[str, Any]) -> str:
        try:
            output = self._flow(**inputs)
        except Exception as error:  # promptflow's errors: translated into ours, nothing swallowed
            raise translate_flow_error(error) from error
        answer = output.get("answer") if isinstance(output, dict) else None
        if not isinstance(answer, str):
            got = sorted(output) if isinstance(output, dict) else type(output).__name__
            raise FlowError(f"the flow in {self.flow_dir} returned {got} instead of an 'answer' string")
        return answer


def _load(flow_dir: Path, scoring_uri: str, key: str, options: GenerationOptions) -> Any:
    from promptflow.client import load_flow
    from promptflow.connections import CustomConnection
    from promptflow.entities import FlowContext

    if not (flow_dir / "flow.dag.yaml").is_file():
        raise FlowError(f"no flow.dag.yaml in {flow_dir}; point the runner at the flows/phi3_chat folder")
    connection = CustomConnection(
        name="phi3-endpoint", configs={"endpoint": scoring_uri}, secrets={"key": key}
    )
    try:
        flow = load_flow(str(flow_dir))
        flow.context = FlowContext(
            connections={NODE: {"connection": connection}}, overrides=options.overrides()
        )
        # Build the executor now (promptflow caches it per flow and context): a broken flow folder fails
        # here, where `flows.validate` would have passed it, and no chat turn pays for the build.
        from promptflow._sdk.entities._flows._flow_context_resolver import FlowContextResolver

        FlowContextResolver.resolve(flow=flow)
    except Exception as error:  # any failure to load is the flow folder's: say which and why
        raise FlowError(f"cannot load the flow in {flow_dir}: {_message(error)}") from error
    return flow


def _checked_question(question: str) -> str:
    # A missing input silently takes the YAML default ("Who founded Microsoft?"): never let it.
    if not isinstance(question, str) or not question.strip():
        raise FlowInputError("the question is empty; there is nothing to send to the flow")
    return question


def to_chat_history(messages: Sequence[Mapping[str, str]]) -> list[dict[str, dict[str, str]]]:
    """Our messages as Prompt flow chat history: each user message answered by the next assistant one.

    System messages and messages no turn can hold (a greeting before any question, a question that
    was never answered) are left out, as the flow has nowhere to put them.
    """
    history: list[dict[str, dict[str, str]]] = []
    pending: str | None = None
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise FlowInputError(
                f"history[{index}] must be {{'role': 'user'|'assistant'|'system', 'content': str}}"
            )
        if role == "user":
            pending = content
        elif role == "assistant" and pending is not None:
            history.append({"inputs": {"question": pending}, "outputs": {"answer": content}})
            pending = None
    return history


# Exception classes of the flow's tool file (loaded by promptflow as its own module, so matched by
# name) and the error each becomes here.
_TOOL_ERRORS: dict[str, type[ScoringError]] = {
    "EndpointAuthError": ScoringAuthError,
    "EndpointMissingError": ScoringNotFoundError,
    "EndpointBusyError": ScoringThrottledError,
    "EndpointFailedError": ScoringUnavailableError,
    "EndpointUnreachableError": ScoringUnavailableError,
    "EndpointRejectedError": ScoringRejectedError,
    "EndpointTimeoutError": ScoringTimeoutError,
    "MalformedAnswerError": ScoringResponseError,
    "FlowInputError": FlowInputError,
}


def translate_flow_error(error: BaseException) -> ScoringError:
    """Our typed error for what ``flow(...)`` raised; the tool's own exception is ``__cause__``."""
    cause = error.__cause__ if type(error).__name__ == "ToolExecutionError" else None
    if cause is None:
        kind = FlowInputError if _is_input_error(error) else FlowError
        return kind(f"the chat flow failed: {_message(error)}")
    target = next((_TOOL_ERRORS[c.__name__] for c in type(cause).__mro__ if c.__name__ in _TOOL_ERRORS), None)
    if target is None:
        return FlowError(f"the flow's tool failed: {type(cause).__name__}: {cause}")
    status = getattr(cause, "status", None)
    if target is ScoringThrottledError:
        retry_after = getattr(cause, "retry_after_s", None)
        return ScoringThrottledError(str(cause), status=status, retry_after_s=retry_after)
    if target is ScoringUnavailableError:
        # Retrying is safe only when nothing reached the model: no connection, or 503 (not serving).
        retryable = type(cause).__name__ == "EndpointUnreachableError" or status == 503
        return ScoringUnavailableError(str(cause), status=status, retryable=retryable)
    if issubclass(target, FlowError):
        return target(str(cause))
    return target(str(cause), status=status)


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, ScoringUnavailableError) and error.retryable


def _is_input_error(error: BaseException) -> bool:
    # promptflow's input validation errors (InputNotFound, InputTypeError, InputParseError, ...).
    return any(c.__name__.startswith("Input") for c in type(error).__mro__)


def _message(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {text}"[:500]


def _on_event_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# One runner per (flow, endpoint, key, options): a rotated key or a new endpoint builds a new one.
_runners: OrderedDict[tuple[Any, ...], FlowRunner] = OrderedDict()
_runners_lock = threading.Lock()


def get_flow_runner(
    scoring_uri: str,
    key: str,
    *,
    flow_dir: Path = FLOW_DIR,
    options: GenerationOptions = GenerationOptions(),
    retry: RetryPolicy = RetryPolicy(),
    state_dir: Path | None = None,
) -> FlowRunner:
    """The cached runner for this endpoint and key (keyed by a hash of the key, never the key)."""
    cache_key = (
        str(Path(flow_dir).resolve()),
        scoring_uri,
        hashlib.sha256(key.encode("utf-8")).hexdigest(),
        options,
        retry,
    )
    with _runners_lock:
        runner = _runners.get(cache_key)
        if runner is not None:
            _runners.move_to_end(cache_key)
            return runner
    runner = FlowRunner(
        scoring_uri, key, flow_dir=flow_dir, options=options, retry=retry, state_dir=state_dir
    )
    with _runners_lock:
        runner = _runners.setdefault(cache_key, runner)
        _runners.move_to_end(cache_key)
        while len(_runners) > _CACHE_SIZE:
            _runners.popitem(last=False)
    return runner


def clear_flow_runners() -> None:
    """Forget every cached runner (tests; or after keys were regenerated everywhere)."""
    with _runners_lock:
        _runners.clear()
