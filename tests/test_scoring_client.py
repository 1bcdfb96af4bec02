"""The scoring client against a loopback aiohttp stub that misbehaves in every way a server can."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from backends.scoring import (
    InvalidScoringRequest,
    RetryPolicy,
    ScoringAuthError,
    ScoringClient,
    ScoringNotFoundError,
    ScoringRejectedError,
    ScoringResponseError,
    ScoringThrottledError,
    ScoringTimeoutError,
    ScoringUnavailableError,
    build_scoring_request,
    chat_sync,
    contract_for,
    parse_chat_completions_response,
    parse_scoring_response,
)
from tests.support.redaction import STRADDLING_FILLER, leaked_pieces

KEY = "k3y-" + "s" * 40
MESSAGES = [{"role": "user", "content": "Hello?"}]
FAST_RETRY = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.02)


@dataclass
class Stub:
    url: str
    hits: Counter[str] = field(default_factory=Counter)
    hit_times: dict[str, list[float]] = field(default_factory=dict)
    last_request: dict[str, Any] = field(default_factory=dict)
    never: asyncio.Event = field(default_factory=asyncio.Event)

    def uri(self, path: str) -> str:
        return f"{self.url}/{path}"


def _stub_app(stub: Stub) -> web.Application:
    def error(status: int, message: str, **headers: str) -> web.Response:
        return web.json_response({"error": {"code": "X", "message": message}}, status=status, headers=headers)

    async def handle(request: web.Request) -> web.Response:
        case = request.match_info["case"]
        stub.hits[case] += 1
        stub.hit_times.setdefault(case, []).append(time.monotonic())
        stub.last_request = {"headers": dict(request.headers), "body": await request.json()}
        responses = {
            "ok": lambda: web.json_response({"output": "Hi there."}),
            "401": lambda: error(401, f"invalid key {request.headers.get('Authorization', '')}"),
            "403": lambda: error(403, "forbidden"),
            "404": lambda: error(404, "no such deployment"),
            "400": lambda: error(400, "input_data.input_string: Field required"),
            "429": lambda: error(429, "too many requests", **{"Retry-After": "7"}),
            "500": lambda: error(500, "ValueError: boom"),
            "503": lambda: error(503, "no deployment receives traffic"),
            "garbage": lambda: web.Response(text="<html>proxy error</html>"),
            "wrong-shape": lambda: web.json_response({"predictions": ["Hi"]}),
            # Careless servers that echo the Authorization header: in a 200 body of the wrong shape, and
            # in an error message whose echo straddles the cut of the error excerpt.
            "echo-200": lambda: web.json_response({"received": request.headers.get("Authorization", "")}),
            "echo-late-401": lambda: error(401, STRADDLING_FILLER + request.headers.get("Authorization", "")),
        }
        if case == "flaky" and stub.hits[case] < 3:
            return error(503, "loading")
        if case == "flaky":
            return responses["ok"]()
        if case == "slow":
            await stub.never.wait()  # never set: the client has to give up
        return responses[case]()

    async def chat_completions(request: web.Request) -> web.Response:
        """Azure AI model inference, as serverless endpoints answer it."""
        stub.hits["chat-completions"] += 1
        stub.last_request = {
            "path": request.path,
            "headers": dict(request.headers),
            "body": await request.json(),
        }
        return web.json_response(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}}]}
        )

    async def chat_completions_echo(request: web.Request) -> web.Response:
        return web.json_response({"received": request.headers.get("Authorization", "")})

    app = web.Application()
    app.router.add_post("/serverless/chat/completions", chat_completions)
    app.router.add_post("/echo-200/chat/completions", chat_completions_echo)
    app.router.add_post("/{case}", handle)
    return app


@pytest.fixture
async def stub() -> Any:
    holder = Stub(url="")
    runner = web.AppRunner(_stub_app(holder), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    holder.url = f"http://127.0.0.1:{port}"
    yield holder
    await runner.cleanup()


@pytest.fixture
async def client() -> Any:
    async with ScoringClient(retry=FAST_RETRY) as scoring:
        yield scoring


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


# -- the contract ---------------------------------------------------------------------------------
async def test_a_serverless_endpoint_is_asked_through_the_chat_completions_contract(stub, client):
    history = [*MESSAGES, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again?"}]
    answer = await client.chat(
        stub.uri("serverless"),
        KEY,
        history,
        temperature=0.0,
        max_new_tokens=16,
        contract=contract_for("serverless"),
    )
    assert answer == "Hi!"
    assert stub.last_request["path"] == "/serverless/chat/completions"
    assert stub.last_request["body"] == {"messages": history, "temperature": 0.0, "max_tokens": 16}
    assert stub.last_request["headers"]["Authorization"] == f"Bearer {KEY}"


def test_a_chat_completions_answer_without_choices_is_a_response_error():
    with pytest.raises(ScoringResponseError, match=r"choices\[0\].message.content"):
        parse_chat_completions_response(b'{"output": "wrong contract"}')
    assert contract_for("online") == "mlflow"


async def test_chat_sends_the_scoring_contract_and_returns_the_output(stub, client):
    history = [*MESSAGES, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again?"}]
    answer = await client.chat(
        stub.uri("ok"), KEY, history, deployment="blue", temperature=0.2, max_new_tokens=16, top_p=0.9
    )
    assert answer == "Hi there."
    headers, body = stub.last_request["headers"], stub.last_request["body"]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["azureml-model-deployment"] == "blue"
    assert body == {
        "input_data": {
            "input_string": history,
            "parameters": {"temperature": 0.2, "max_new_tokens": 16, "top_p": 0.9},
        }
    }


def test_building_a_request_with_an_invalid_message_names_the_field():
    with pytest.raises(InvalidScoringRequest, match=r"input_data\.input_string\[1\]\.role"):
        build_scoring_request(
            [*MESSAGES, {"role": "bot", "content": "x"}], temperature=0.7, max_new_tokens=128
        )


def test_building_a_request_with_an_unknown_parameter_names_it():
    with pytest.raises(InvalidScoringRequest, match=r"input_data\.parameters\.max_tokens"):
        build_scoring_request(MESSAGES, temperature=0.7, max_new_tokens=128, max_tokens=5)


@pytest.mark.parametrize("body", [b"not json", b'{"answer": "x"}', b'{"output": 5}', b'["x"]'])
def test_a_response_that_is_not_an_output_string_is_a_response_error(body):
    with pytest.raises(ScoringResponseError):
        parse_scoring_response(body)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "error_type"),
    [
        ("401", ScoringAuthError),
        ("403", ScoringAuthError),
        ("404", ScoringNotFoundError),
        ("400", ScoringRejectedError),
        ("500", ScoringUnavailableError),
        ("garbage", ScoringResponseError),
        ("wrong-shape", ScoringResponseError),
    ],
)
async def test_each_failure_raises_its_own_error_type(stub, client, case, error_type):
    with pytest.raises(error_type) as raised:
        await client.chat(stub.uri(case), KEY, MESSAGES)
    assert KEY not in str(raised.value)


async def test_an_auth_error_never_repeats_the_key_even_when_the_server_echoes_it(stub, client):
    with pytest.raises(ScoringAuthError) as raised:
        await client.chat(stub.uri("401"), KEY, MESSAGES)
    assert raised.value.status == 401
    assert KEY not in str(raised.value) and "***" in str(raised.value)


@pytest.mark.parametrize(
    ("case", "contract", "error_type"),
    [
        ("echo-200", "mlflow", ScoringResponseError),
        ("echo-200", "chat-completions", ScoringResponseError),
        ("echo-late-401", "mlflow", ScoringAuthError),
    ],
)
async def test_a_key_echoed_in_any_body_reaches_no_error_message_not_even_in_part(
    stub, client, case, contract, error_type
):
    key = secrets.token_urlsafe(32)
    with pytest.raises(error_type) as raised:
        await client.chat(stub.uri(case), key, MESSAGES, contract=contract)
    message = str(raised.value)
    assert not leaked_pieces(message, key), message
    assert "***" in message  # the echo was there, redacted where it stood


async def test_throttling_carries_the_servers_retry_after(stub, client):
    with pytest.raises(ScoringThrottledError) as raised:
        await client.chat(stub.uri("429"), KEY, MESSAGES)
    assert raised.value.retry_after_s == 7.0
    assert stub.hits["429"] == 1  # a throttled request is left to the caller


async def test_a_503_is_retried_within_the_budget(stub, client):
    assert await client.chat(stub.uri("flaky"), KEY, MESSAGES) == "Hi there."
    assert stub.hits["flaky"] == 3


async def test_a_503_past_the_budget_is_unavailable(stub):
    async with ScoringClient(retry=RetryPolicy(attempts=2, initial_wait_s=0.01)) as client:
        with pytest.raises(ScoringUnavailableError) as raised:
            await client.chat(stub.uri("503"), KEY, MESSAGES)
    assert (raised.value.status, stub.hits["503"]) == (503, 2)


async def test_retries_back_off_exponentially_from_the_first_failure(stub):
    policy = RetryPolicy(attempts=4, initial_wait_s=0.05, max_wait_s=0.15)
    async with ScoringClient(retry=policy) as client:
        with pytest.raises(ScoringUnavailableError):
            await client.chat(stub.uri("503"), KEY, MESSAGES)
    times = stub.hit_times["503"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) == 4  # the first try and three retries, no more
    # initial, twice that, then capped at max: never sooner than the policy says
    assert [gap >= wait for gap, wait in zip(gaps, (0.05, 0.1, 0.15), strict=True)] == [True] * 3


async def test_a_model_error_is_not_retried(stub, client):
    with pytest.raises(ScoringUnavailableError) as raised:
        await client.chat(stub.uri("500"), KEY, MESSAGES)
    assert (raised.value.status, raised.value.retryable, stub.hits["500"]) == (500, False, 1)


async def test_a_refused_connection_is_unavailable_and_retryable(client):
    with pytest.raises(ScoringUnavailableError) as raised:
        await client.chat(f"http://127.0.0.1:{closed_port()}/score", KEY, MESSAGES)
    assert raised.value.retryable and raised.value.status is None


async def test_a_server_that_does_not_answer_in_time_is_a_timeout(stub, client):
    with pytest.raises(ScoringTimeoutError, match=r"did not answer within 0\.2 s"):
        await client.chat(stub.uri("slow"), KEY, MESSAGES, timeout=0.2)
    assert stub.hits["slow"] == 1  # a timeout is not retried: the model may still be generating


# -- sessions and the sync helper -----------------------------------------------------------------
async def test_one_client_reuses_one_session_per_event_loop(stub, client):
    await client.chat(stub.uri("ok"), KEY, MESSAGES)
    first = client._session()
    await client.chat(stub.uri("ok"), KEY, MESSAGES)
    assert client._session() is first


async def test_chat_sync_answers_from_a_worker_thread(stub):
    answer = await asyncio.to_thread(
        chat_sync, stub.uri("ok"), KEY, MESSAGES, temperature=0.0, max_new_tokens=8
    )
    assert answer == "Hi there."
    assert json.dumps(stub.last_request["body"]["input_data"]["parameters"]) == (
        '{"temperature": 0.0, "max_new_tokens": 8}'
    )


async def test_chat_sync_refuses_to_block_an_event_loop(stub):
    with pytest.raises(RuntimeError, match=r"await ScoringClient\.chat"):
        chat_sync(stub.uri("ok"), KEY, MESSAGES)
