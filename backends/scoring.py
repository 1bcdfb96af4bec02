"""The scoring contract and the one client that speaks it.

Azure ML online endpoints serving an MLflow chat model, and the local loopback server, take
``{"input_data": {"input_string": [messages...], "parameters": {...}}}`` and answer
``{"output": "<string>"}``. The pydantic models below are the only definition of that body: the
local server validates requests with them and the client builds requests with them, so both
sides agree by construction.

``ScoringClient`` is used by the bot, the pipeline's smoke test and evaluation. Its errors are
typed so callers can word them for people; no error message ever contains the endpoint key.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

DEPLOYMENT_HEADER = "azureml-model-deployment"
# The chat model's own default; the server fills it in so the deployment's limit always applies.
DEFAULT_MAX_NEW_TOKENS = 128
_ERROR_TEXT_LIMIT = 300

Role = Literal["system", "user", "assistant"]


class _Strict(BaseModel):
    # strict: "128" is not a token count and 1 is not a boolean; extra="forbid" catches typos
    # such as OpenAI's "max_tokens" that would otherwise be ignored silently.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ChatMessage(_Strict):
    role: Role
    content: str


class ScoringParameters(_Strict):
    """Generation parameters; ``None`` means "the model's default"."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    min_new_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    do_sample: bool | None = None

    def for_predict(self) -> dict[str, Any]:
        """The parameters to hand to ``pyfunc.predict``: only those that were set."""
        return self.model_dump(exclude_none=True)


class ScoringInput(_Strict):
    input_string: list[ChatMessage] = Field(min_length=1)
    parameters: ScoringParameters = Field(default_factory=ScoringParameters)


class ScoringRequest(_Strict):
    input_data: ScoringInput


class InvalidScoringRequest(ValueError):
    """A request body that breaks the contract; ``problems`` name each field and what is wrong."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid scoring request: " + "; ".join(problems))


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def describe_validation_error(error: ValidationError) -> list[str]:
    return [f"{_field_path(e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)]


def validate_scoring_request(body: Any) -> ScoringRequest:
    try:
        return ScoringRequest.model_validate(body)
    except ValidationError as error:
        raise InvalidScoringRequest(describe_validation_error(error)) from None


def build_scoring_request(
    messages: list[dict[str, str]], *, temperature: float, max_new_tokens: int, **params: Any
) -> dict[str, Any]:
    """The request body for ``messages`` (the whole conversation, oldest first)."""
    body = {
        "input_data": {
            "input_string": messages,
            "parameters": {"temperature": temperature, "max_new_tokens": max_new_tokens, **params},
        }
    }
    return validate_scoring_request(body).model_dump(exclude_none=True)


Contract = Literal["mlflow", "chat-completions"]


def contract_for(endpoint_kind: str | None) -> Contract:
    """Managed online endpoints speak Azure ML's MLflow contract; serverless ones the chat-completions API."""
    return "chat-completions" if endpoint_kind == "serverless" else "mlflow"


def build_chat_completions_request(
    messages: list[dict[str, str]], *, temperature: float, max_new_tokens: int, **params: Any
) -> dict[str, Any]:
    """Azure AI model inference (serverless endpoints): POST <scoring_uri>/chat/completions."""
    # The same checks as the MLflow contract (roles, contents, parameter types), then the other shape.
    checked = build_scoring_request(
        messages, temperature=temperature, max_new_tokens=max_new_tokens, **params
    )
    body: dict[str, Any] = {
        "messages": checked["input_data"]["input_string"],
        "temperature": temperature,
        "max_tokens": max_new_tokens,
    }
    if params.get("top_p") is not None:
        body["top_p"] = params["top_p"]
    return body


def parse_chat_completions_response(body: bytes | str | dict[str, Any], *, key: str = "") -> str:
    """The answer from a chat-completions body; `key` is redacted from the error, should a server echo it."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            raise ScoringResponseError(
                f"chat-completions response is not JSON: {_excerpt(body, key=key)!r}"
            ) from None
    try:
        answer = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        answer = None
    if not isinstance(answer, str):
        raise ScoringResponseError(
            "chat-completions response has no choices[0].message.content: "
            f"{_excerpt(json.dumps(body), key=key)!r}"
        )
    return answer


class ScoringError(Exception):
    """Base of every scoring failure. ``status`` is the HTTP status when there was a response."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ScoringAuthError(ScoringError):
    """401/403: the key is wrong or was regenerated."""


class ScoringNotFoundError(ScoringError):
    """404: no such endpoint path or no such deployment."""


class ScoringRejectedError(ScoringError):
    """Other 4xx (400, 413, ...): the request itself is wrong; retrying will not help."""


class ScoringThrottledError(ScoringError):
    """429: too many requests; ``retry_after_s`` is the server's hint, if it gave one."""

    def __init__(self, message: str, *, status: int | None = 429, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class ScoringUnavailableError(ScoringError):
    """5xx or no connection. ``retryable`` is True only when the model certainly did not run."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message, status=status)
        self.retryable = retryable


class ScoringTimeoutError(ScoringError):
    """No answer within the timeout (or the server said 408)."""


class ScoringResponseError(ScoringError):
    """The server answered 200 with a body that is not ``{"output": "<string>"}``."""


def parse_scoring_response(body: bytes | str | dict[str, Any], *, key: str = "") -> str:
    """The answer string from a scoring response body; `key` is redacted from the error, should a server
    echo it."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            raise ScoringResponseError(f"scoring response is not JSON: {_excerpt(body, key=key)!r}") from None
    if not isinstance(body, dict) or not isinstance(body.get("output"), str):
        got = _excerpt(json.dumps(body), key=key)
        raise ScoringResponseError(f'scoring response should be {{"output": "<string>"}}, got {got!r}')
    return body["output"]


def _excerpt(text: bytes | str, limit: int = _ERROR_TEXT_LIMIT, *, key: str = "") -> str:
    """`text` shortened for an error message, `key` redacted first (after, a key cut in two would stay)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if key:
        text = text.replace(key, "***")
    return text if len(text) <= limit else text[:limit] + "…"


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    if value.strip().replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _server_message(body: bytes, key: str) -> str:
    """The server's error text, shortened, with the key redacted in case a server echoed it."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("message", text))
        text = error.get("message", json.dumps(error)) if isinstance(error, dict) else str(error)
    return _excerpt(text.strip(), key=key) or "(empty body)"


def _error_for_status(status: int, body: bytes, headers: Any, *, target: str, key: str) -> ScoringError:
    """The typed error for a non-200 scoring response."""
    detail = _server_message(body, key)
    where = f"scoring endpoint {target}"
    if status in (401, 403):
        return ScoringAuthError(
            f"{where} refused the key (HTTP {status}: {detail}); fetch the current key, keys change "
            "when they are regenerated",
            status=status,
        )
    if status == 404:
        return ScoringNotFoundError(f"{where} not found (HTTP 404: {detail})", status=status)
    if status == 408:
        return ScoringTimeoutError(f"{where} timed out (HTTP 408: {detail})", status=status)
    if status == 429:
        retry_after = _retry_after_seconds(headers.get("Retry-After"))
        hint = f"; retry after {retry_after:g} s" if retry_after is not None else ""
        return ScoringThrottledError(
            f"{where} is busy (HTTP 429: {detail}){hint}", status=status, retry_after_s=retry_after
        )
    if status >= 500 or status == 424:
        return ScoringUnavailableError(
            f"{where} failed (HTTP {status}: {detail})", status=status, retryable=status == 503
        )
    return ScoringRejectedError(f"{where} rejected the request (HTTP {status}: {detail})", status=status)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for failures where the model certainly did not run (connection refused, 503)."""

    attempts: int = 3
    initial_wait_s: float = 0.2
    max_wait_s: float = 2.0


NO_RETRY = RetryPolicy(attempts=1)


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, ScoringUnavailableError) and error.retryable


class ScoringClient:
    """Async client for the scoring contract; one ``aiohttp.ClientSession`` per event loop."""

    def __init__(
        self, *, timeout_s: float = 90.0, connect_timeout_s: float = 5.0, retry: RetryPolicy = RetryPolicy()
    ) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry = retry
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
            weakref.WeakKeyDictionary()
        )

    async def __aenter__(self) -> ScoringClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = aiohttp.ClientSession()
            self._sessions[loop] = session
        return session

    async def close(self) -> None:
        """Close this event loop's session (call before the loop ends)."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()

    async def chat(
        self,
        scoring_uri: str,
        key: str,
        messages: list[dict[str, str]],
        *,
        deployment: str | None = None,
        timeout: float | None = None,
        temperature: float = 0.7,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        contract: Contract = "mlflow",
        **params: Any,
    ) -> str:
        """The model's answer to the conversation ``messages``."""
        if contract == "chat-completions":
            body = build_chat_completions_request(
                messages, temperature=temperature, max_new_tokens=max_new_tokens, **params
            )
            scoring_uri, parse = (
                scoring_uri.rstrip("/") + "/chat/completions",
                parse_chat_completions_response,
            )
        else:
            body = build_scoring_request(
                messages, temperature=temperature, max_new_tokens=max_new_tokens, **params
            )
            parse = parse_scoring_response
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if deployment:
            headers[DEPLOYMENT_HEADER] = deployment
        client_timeout = aiohttp.ClientTimeout(
            total=timeout or self.timeout_s, sock_connect=self.connect_timeout_s
        )
        payload = json.dumps(body).encode()
        try:
            return await self._post_once(scoring_uri, key, payload, headers, client_timeout, parse)
        except ScoringUnavailableError as error:
            if not error.retryable or self.retry.attempts <= 1:
                raise
        # The first try found no server (or a 503): back off and retry. Tenacity is set up only here,
        # so a request answered at once pays nothing for it. Waits: initial, 2x, 4x ... up to max.
        await asyncio.sleep(min(self.retry.initial_wait_s, self.retry.max_wait_s))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts - 1),
            wait=wait_exponential(multiplier=2 * self.retry.initial_wait_s, max=self.retry.max_wait_s),
            retry=retry_if_exception(_is_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._post_once(scoring_uri, key, payload, headers, client_timeout, parse)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _post_once(
        self,
        scoring_uri: str,
        key: str,
        body: bytes,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        parse: Callable[..., str] = parse_scoring_response,
    ) -> str:
        target = _describe_target(scoring_uri)
        try:
            async with self._session().post(scoring_uri, data=body, headers=headers, timeout=timeout) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise _error_for_status(resp.status, payload, resp.headers, target=target, key=key)
                return parse(payload, key=key)
        except ScoringError:
            raise
        except TimeoutError:
            raise ScoringTimeoutError(
                f"scoring endpoint {target} did not answer within {timeout.total:g} s"
            ) from None
        except aiohttp.ClientConnectorError as error:
            # Nothing reached the server, so trying again cannot run the model twice.
            raise ScoringUnavailableError(
                f"cannot connect to scoring endpoint {target}: {error.os_error.strerror or error.os_error}",
                retryable=not isinstance(error, aiohttp.ClientSSLError),
            ) from None
        except aiohttp.InvalidURL:
            raise ScoringRejectedError(f"scoring URI {target!r} is not a valid http(s) URL") from None
        except aiohttp.ClientError as error:
            raise ScoringUnavailableError(
                f"scoring endpoint {target} dropped the request: {type(error).__name__}"
            ) from None


def _describe_target(scoring_uri: str) -> str:
    parts = urlsplit(scoring_uri)
    # Only scheme, host and path: a query string could carry a credential.
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _on_event_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def chat_sync(
    scoring_uri: str,
    key: str,
    messages: list[dict[str, str]],
    *,
    deployment: str | None = None,
    timeout: float | None = None,
    retry: RetryPolicy = RetryPolicy(),
    **params: Any,
) -> str:
    """``ScoringClient.chat`` for code running in a worker thread (no event loop of its own)."""
    if _on_event_loop_thread():
        raise RuntimeError(
            "chat_sync() was called on an event loop thread; await ScoringClient.chat() instead"
        )

    async def once() -> str:
        async with ScoringClient(retry=retry) as client:
            return await client.chat(
                scoring_uri, key, messages, deployment=deployment, timeout=timeout, **params
            )

    return asyncio.run(once())
