"""The flow's one tool: answer the chat turn with the fine-tuned Phi-3 behind an online endpoint.

The conversation so far (Prompt flow's chat history) and the new question become the scoring
contract's messages, oldest turns dropped first so the prompt fits the model's context, and go to
``POST <endpoint>`` with ``Authorization: Bearer <key>``::

    {"input_data": {"input_string": [{"role": "user", "content": ...}, ...],
                    "parameters": {"temperature": 0.7, "max_new_tokens": 128}}}   ->   {"output": "<answer>"}

This folder runs unchanged under ``pf flow test``, ``pf flow serve``, ``load_flow`` and in Azure AI
Foundry, so it imports nothing but the standard library and promptflow. Each failure is its own
exception type (below) so a caller can tell a rotated key from a missing deployment, a busy endpoint,
a crashed model, a timeout or a malformed answer. Nothing here logs: request bodies are user text and
headers carry the key; error messages never contain the key.
"""

import http.client
import json
import urllib.error
import urllib.request
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from promptflow.connections import CustomConnection
from promptflow.core import tool

# A role marker and separators per message in the chat template (Phi-3: "<|user|>\n...<|end|>\n").
MESSAGE_OVERHEAD_CHARS = 16
_ERROR_TEXT_LIMIT = 300


class FlowInputError(ValueError):
    """The question, history or connection handed to the flow is unusable; fix the input, not the endpoint."""


class PromptTooLongError(FlowInputError):
    """The question alone is longer than the prompt budget (``max_prompt_chars``)."""


class EndpointError(Exception):
    """Base of every failure calling the scoring endpoint; ``status`` is the HTTP status if one came back."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EndpointAuthError(EndpointError):
    """401/403: the key in the connection is wrong or was regenerated."""


class EndpointMissingError(EndpointError):
    """404: no endpoint at that URI, or the named deployment does not exist."""


class EndpointBusyError(EndpointError):
    """429: throttled; ``retry_after_s`` is the endpoint's hint when it gave one."""

    def __init__(self, message: str, *, status: int | None = 429, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class EndpointFailedError(EndpointError):
    """5xx (or the connection dropped mid-answer): the model server failed."""


class EndpointRejectedError(EndpointError):
    """Another 4xx: the endpoint refused the request itself (e.g. 400, 413)."""


class EndpointUnreachableError(EndpointError):
    """No connection at all (refused, DNS, TLS): nothing reached the model."""


class EndpointTimeoutError(EndpointError):
    """No answer within ``timeout_s`` (or the endpoint answered 408)."""


class MalformedAnswerError(EndpointError):
    """HTTP 200 with a body that is not ``{"output": "<string>"}``."""


@tool
def answer_with_phi3(
    question: str,
    connection: CustomConnection,
    chat_history: list = None,  # noqa: RUF013 - promptflow reads tool input types from plain annotations
    temperature: float = 0.7,
    max_new_tokens: int = 128,
    max_prompt_chars: int = 9000,
    timeout_s: float = 90.0,
    deployment: str = "",
    contract: str = "mlflow",
) -> str:
    """The model's answer to ``question`` given ``chat_history`` (Prompt flow's chat history shape).

    ``contract``: "mlflow" for a managed online endpoint (the tutorial's), "chat-completions" for a
    serverless endpoint (Azure AI model inference: POST <endpoint>/chat/completions).
    """
    endpoint, key = _endpoint_and_key(connection)
    messages = conversation_messages(question, chat_history, max_prompt_chars=max_prompt_chars)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if contract == "chat-completions":
        url = endpoint.rstrip("/") + "/chat/completions"
        body: dict = {
            "messages": messages,
            "temperature": float(temperature),
            "max_tokens": int(max_new_tokens),
        }
    elif contract == "mlflow":
        url = endpoint
        body = {
            "input_data": {
                "input_string": messages,
                "parameters": {"temperature": float(temperature), "max_new_tokens": int(max_new_tokens)},
            }
        }
    else:
        raise FlowInputError(f"contract must be 'mlflow' or 'chat-completions', not {contract!r}")
    if deployment:
        headers["azureml-model-deployment"] = deployment  # Azure ML's header to pick one deployment
    payload = _post(url, key, json.dumps(body).encode("utf-8"), headers, timeout_s=float(timeout_s))
    return _answer(payload, f"scoring endpoint {_describe(url)}", key, contract)


def conversation_messages(question: str, chat_history: list | None, *, max_prompt_chars: int) -> list[dict]:
    """History as alternating user/assistant messages plus the question, newest turns kept first.

    A turn without an answer (it failed) is left out whole, so roles keep alternating.
    """
    if not isinstance(question, str) or not question.strip():
        raise FlowInputError("question must be a non-empty string")
    budget = int(max_prompt_chars) - len(question) - MESSAGE_OVERHEAD_CHARS
    if budget < 0:
        raise PromptTooLongError(
            f"the question is {len(question)} characters; the flow's prompt budget max_prompt_chars="
            f"{max_prompt_chars} leaves no room for it. Shorten the question or raise max_prompt_chars "
            "(within the model's context window)"
        )
    kept: list[dict] = []
    for user, assistant in reversed(_turns(chat_history)):
        cost = len(user) + len(assistant) + 2 * MESSAGE_OVERHEAD_CHARS
        if cost > budget:
            break  # older turns are dropped: the most recent context matters most
        budget -= cost
        kept[:0] = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*kept, {"role": "user", "content": question}]


def _turns(chat_history: list | None) -> list[tuple[str, str]]:
    if chat_history is None:
        return []
    if not isinstance(chat_history, list):
        raise FlowInputError(f"chat_history must be a list of turns, got {type(chat_history).__name__}")
    turns = []
    for index, turn in enumerate(chat_history):
        inputs = turn.get("inputs") if isinstance(turn, dict) else None
        if not isinstance(inputs, dict) or not isinstance(inputs.get("question"), str):
            raise FlowInputError(
                f'chat_history[{index}] should be {{"inputs": {{"question": "..."}}, "outputs": '
                f'{{"answer": "..."}}}} (Prompt flow\'s chat history shape)'
            )
        outputs = turn.get("outputs")
        answer = outputs.get("answer") if isinstance(outputs, dict) else None
        if isinstance(answer, str) and answer:
            turns.append((inputs["question"], answer))
    return turns


def _endpoint_and_key(connection: CustomConnection) -> tuple[str, str]:
    endpoint = (connection.configs or {}).get("endpoint")
    key = (connection.secrets or {}).get("key")
    if not isinstance(endpoint, str) or urlsplit(endpoint).scheme not in ("http", "https"):
        raise FlowInputError(
            "the connection's config 'endpoint' must be the deployment's http(s) scoring URI, got "
            f"{_describe(endpoint) if isinstance(endpoint, str) else repr(endpoint)}"
        )
    if not isinstance(key, str) or not key or set(key) == {"*"}:
        raise FlowInputError(
            "the connection's secret 'key' is missing (or scrubbed); set it to the endpoint's primary key"
        )
    return endpoint, key


def _post(endpoint: str, key: str, data: bytes, headers: dict[str, str], *, timeout_s: float) -> bytes:
    where = f"scoring endpoint {_describe(endpoint)}"
    request = urllib.request.Request(endpoint, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = response.read()
    except urllib.error.HTTPError as error:
        with error:
            raise _error_for_status(error.code, error.read(), error.headers, where, key) from None
    except TimeoutError:
        raise EndpointTimeoutError(f"{where} did not answer within {timeout_s:g} s") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise EndpointTimeoutError(f"{where} did not answer within {timeout_s:g} s") from None
        raise EndpointUnreachableError(f"cannot connect to {where}: {error.reason}") from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise EndpointFailedError(f"{where} dropped the connection ({type(error).__name__})") from None
    return payload


def _answer(payload: bytes, where: str, key: str, contract: str = "mlflow") -> str:
    try:
        body: Any = json.loads(payload)
    except ValueError:
        raise MalformedAnswerError(
            f"{where} answered with a body that is not JSON: {_excerpt(payload, key)!r}"
        ) from None
    if contract == "chat-completions":
        try:
            answer = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            answer = None
        if not isinstance(answer, str):
            raise MalformedAnswerError(
                f"{where} answered {_excerpt(payload, key)!r}; expected choices[0].message.content"
            )
        return answer
    if not isinstance(body, dict) or not isinstance(body.get("output"), str):
        raise MalformedAnswerError(
            f'{where} answered {_excerpt(payload, key)!r}; the scoring contract is {{"output": "<string>"}}'
        )
    return body["output"]


def _error_for_status(status: int, payload: bytes, headers: Any, where: str, key: str) -> EndpointError:
    detail = _excerpt(payload, key) or "(empty body)"
    if status in (401, 403):
        return EndpointAuthError(
            f"{where} refused the key (HTTP {status}: {detail}); the connection's 'key' is wrong or was "
            "regenerated: update the connection with the endpoint's current key",
            status=status,
        )
    if status == 404:
        return EndpointMissingError(
            f"{where} not found (HTTP 404: {detail}); check the connection's 'endpoint' and that the "
            "deployment exists",
            status=status,
        )
    if status == 408:
        return EndpointTimeoutError(f"{where} timed out (HTTP 408: {detail})", status=status)
    if status == 429:
        retry_after = _retry_after_s(headers.get("Retry-After"))
        hint = f"; retry after {retry_after:g} s" if retry_after is not None else ""
        return EndpointBusyError(f"{where} is busy (HTTP 429: {detail}){hint}", retry_after_s=retry_after)
    if status >= 500:
        return EndpointFailedError(f"{where} failed (HTTP {status}: {detail})", status=status)
    return EndpointRejectedError(f"{where} rejected the request (HTTP {status}: {detail})", status=status)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _describe(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"  # no query string: it could carry a credential


def _excerpt(payload: bytes, key: str) -> str:
    """The body, shortened, for an error message; the key redacted first, in case a server echoed it
    (redacting after shortening would miss a key cut in two)."""
    text = payload.decode("utf-8", errors="replace").replace(key, "***").strip()
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + "…"
