"""The flow runner: the real chat flow executed by promptflow in-process against a loopback stub that
speaks the scoring contract and records what reached it."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from activities.integrate import flow_smoke
from activities.steps import StepInput, smoke_test
from backends.protocol import EndpointKeys, EndpointState
from backends.scoring import (
    NO_RETRY,
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
from flows.runner import (
    FLOW_DIR,
    FlowError,
    FlowInputError,
    FlowRunner,
    GenerationOptions,
    clear_flow_runners,
    get_flow_runner,
    to_chat_history,
)
from pipeline.config import RunConfig
from settings import get_settings
from tests.support.redaction import STRADDLING_FILLER, leaked_pieces

KEY = "flow-k3y-" + "s" * 40
HISTORY = [
    {"role": "user", "content": "Who makes the Aero purifier?"},
    {"role": "assistant", "content": "Contoso makes it."},
    {"role": "user", "content": "And the warranty?"},
    {"role": "assistant", "content": "Two years."},
]


def shared_promptflow_state(factory: pytest.TempPathFactory) -> Path:
    """One promptflow home per test session (promptflow reads it once per process): the session's own,
    or the one an earlier test in this process already configured."""
    return ensure_promptflow_configured(factory.getbasetemp() / "promptflow-state").parent


@dataclass
class ScoringStub:
    """A loopback scoring server on its own thread and loop (the flow's HTTP call is synchronous).

    ``POST /<case>/score`` answers as the case says; every request is recorded.
    """

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)
    release: threading.Event = field(default_factory=threading.Event)
    received: threading.Event = field(default_factory=threading.Event)

    def uri(self, case: str = "ok") -> str:
        return f"{self.url}/{case}/score"

    def start(self) -> ScoringStub:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        self.release.set()
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._run(ready))
        self._loop.close()

    async def _run(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self._app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        await self._stopping.wait()
        await runner.cleanup()

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{case}/score", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        self.hits[case] += 1
        body = await request.json()
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append({"case": case, "headers": headers, "body": body})
        self.received.set()
        messages = body["input_data"]["input_string"]
        auth = request.headers.get("Authorization", "")
        if case == "flaky":
            case = "ok" if self.hits["flaky"] >= 3 else "503"
        if case in ("slow", "gated"):
            # "slow" never answers by itself: the client has to give up; "gated" answers when released.
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
            case = "ok"
        if case == "ok":
            return web.json_response({"output": f"echo({len(messages)}): {messages[-1]['content']}"})
        if case == "garbage":
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        if case == "wrong-shape":
            return web.json_response({"predictions": ["hi"]})
        if case == "echo-200":
            return web.json_response({"received": auth})
        if case == "echo-late-401":  # the echo straddles the cut of the error excerpt
            return web.json_response({"error": {"message": STRADDLING_FILLER + auth}}, status=401)
        if case == "drop":
            request.transport.close()
            return web.Response()
        status = int(case)
        headers = {"Retry-After": "7"} if status == 429 else {}
        # A careless server that echoes the Authorization header: the key must still not surface.
        return web.json_response(
            {"error": {"message": f"status {status} for {auth}"}}, status=status, headers=headers
        )

    def last_messages(self) -> list[dict[str, str]]:
        return self.requests[-1]["body"]["input_data"]["input_string"]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_promptflow_state(tmp_path_factory)


@pytest.fixture(scope="module")
def stub() -> Iterator[ScoringStub]:
    server = ScoringStub().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_stub(stub: ScoringStub) -> None:
    stub.requests.clear()
    stub.hits.clear()
    stub.release.clear()
    stub.received.clear()


@pytest.fixture
def runner_for(stub: ScoringStub, state_dir: Path):
    def build(case: str = "ok", **options: Any) -> FlowRunner:
        retry = options.pop("retry", NO_RETRY)
        return FlowRunner(
            stub.uri(case), KEY, options=GenerationOptions(**options), retry=retry, state_dir=state_dir
        )

    return build


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the contract -----------------------------------------------------------------------------------
def test_the_runner_answers_through_the_flow_with_the_scoring_contract(runner_for, stub):
    answer = runner_for().answer_sync("Hello?")

    assert answer == "echo(1): Hello?"
    sent = stub.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {
        "input_data": {
            "input_string": [{"role": "user", "content": "Hello?"}],
            "parameters": {"temperature": 0.7, "max_new_tokens": 128},
        }
    }


def test_history_reaches_the_endpoint_as_alternating_messages_ending_with_the_question(runner_for, stub):
    runner_for().answer_sync("How do I register it?", HISTORY)

    assert stub.last_messages() == [*HISTORY, {"role": "user", "content": "How do I register it?"}]


def test_generation_options_and_the_deployment_header_reach_the_endpoint(runner_for, stub):
    runner_for(temperature=0.0, max_new_tokens=7, deployment="base").answer_sync("Hi")

    sent = stub.requests[-1]
    assert sent["body"]["input_data"]["parameters"] == {"temperature": 0.0, "max_new_tokens": 7}
    assert sent["headers"]["azureml-model-deployment"] == "base"


def test_old_turns_are_dropped_first_so_the_prompt_fits_the_budget(runner_for, stub):
    history = []
    for turn in range(30):
        history += [
            {"role": "user", "content": f"q{turn} " * 20},
            {"role": "assistant", "content": "a" * 100},
        ]

    runner_for(max_prompt_chars=1000).answer_sync("latest?", history)

    sent = stub.last_messages()
    assert sum(len(m["content"]) for m in sent) <= 1000
    assert 2 < len(sent) < len(history)
    assert sent[-3:-1] == history[-2:]  # the most recent turn survived
    assert [m["role"] for m in sent] == ["user", "assistant"] * (len(sent) // 2) + ["user"]


def test_a_question_longer_than_the_budget_is_refused_before_anything_is_sent(runner_for, stub):
    with pytest.raises(FlowInputError, match="max_prompt_chars=50"):
        runner_for(max_prompt_chars=50).answer_sync("x" * 200)
    assert stub.requests == []


def test_an_empty_question_is_refused_instead_of_taking_the_flows_default(runner_for, stub):
    with pytest.raises(FlowInputError, match="empty"):
        runner_for().answer_sync("   ")
    assert stub.requests == []


# -- history conversion -----------------------------------------------------------------------------
def test_our_messages_become_prompt_flow_turns():
    assert to_chat_history(HISTORY) == [
        {"inputs": {"question": "Who makes the Aero purifier?"}, "outputs": {"answer": "Contoso makes it."}},
        {"inputs": {"question": "And the warranty?"}, "outputs": {"answer": "Two years."}},
    ]


def test_system_messages_greetings_and_unanswered_questions_have_no_turn_to_go_in():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "lost question"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "never answered"},
    ]
    assert to_chat_history(messages) == [{"inputs": {"question": "q"}, "outputs": {"answer": "a"}}]


def test_a_message_without_a_known_role_is_named_by_its_index():
    with pytest.raises(FlowInputError, match=r"history\[1\]"):
        to_chat_history([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}])


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "error", "status"),
    [
        ("401", ScoringAuthError, 401),
        ("403", ScoringAuthError, 403),
        ("404", ScoringNotFoundError, 404),
        ("429", ScoringThrottledError, 429),
        ("500", ScoringUnavailableError, 500),
        ("503", ScoringUnavailableError, 503),
        ("400", ScoringRejectedError, 400),
        ("garbage", ScoringResponseError, None),
        ("wrong-shape", ScoringResponseError, None),
        ("drop", ScoringUnavailableError, None),
    ],
)
def test_each_endpoint_failure_becomes_its_own_error_type(runner_for, case, error, status):
    with pytest.raises(error) as raised:
        runner_for(case).answer_sync("Hello?")

    assert type(raised.value) is error
    assert raised.value.status == status
    assert KEY not in str(raised.value)


@pytest.mark.parametrize(
    ("case", "error"), [("echo-200", ScoringResponseError), ("echo-late-401", ScoringAuthError)]
)
def test_a_key_echoed_in_any_body_reaches_no_error_message_not_even_in_part(runner_for, case, error):
    with pytest.raises(error) as raised:
        runner_for(case).answer_sync("Hello?")
    message = str(raised.value)
    assert not leaked_pieces(message, KEY), message
    assert "***" in message  # the echo was there, redacted where it stood


def test_a_throttled_answer_carries_the_endpoints_retry_after(runner_for):
    with pytest.raises(ScoringThrottledError) as raised:
        runner_for("429").answer_sync("Hello?")
    assert raised.value.retry_after_s == 7


def test_a_server_error_is_not_retried_but_a_503_is(runner_for, stub):
    fast = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.02)
    with pytest.raises(ScoringUnavailableError) as raised:
        runner_for("500", retry=fast).answer_sync("Hello?")
    assert not raised.value.retryable and stub.hits["500"] == 1

    assert runner_for("flaky", retry=fast).answer_sync("Hello?") == "echo(1): Hello?"
    assert stub.hits["flaky"] == 3


def test_an_endpoint_that_never_answers_times_out(runner_for):
    with pytest.raises(ScoringTimeoutError, match=r"within 0\.5 s"):
        runner_for("slow", timeout_s=0.5).answer_sync("Hello?")


def test_a_refused_connection_is_retryable_unavailability(state_dir):
    runner = FlowRunner(f"http://127.0.0.1:{closed_port()}/score", KEY, retry=NO_RETRY, state_dir=state_dir)
    with pytest.raises(ScoringUnavailableError, match="cannot connect") as raised:
        runner.answer_sync("Hello?")
    assert raised.value.retryable


def test_a_flow_that_validate_would_pass_is_refused_when_the_runner_is_built(tmp_path, stub, state_dir):
    from promptflow.client import PFClient

    broken = tmp_path / "broken_flow"
    shutil.copytree(FLOW_DIR, broken, ignore=shutil.ignore_patterns(".promptflow", "__pycache__"))
    dag = broken / "flow.dag.yaml"
    dag.write_text(dag.read_text().replace("${integrate_with_promptflow.output}", "${no_such_node.output}"))
    assert PFClient().flows.validate(broken).passed  # validate is shallow: hence the executor build

    with pytest.raises(FlowError, match="no_such_node"):
        FlowRunner(stub.uri(), KEY, flow_dir=broken, state_dir=state_dir)
    assert stub.requests == []


def test_a_missing_flow_folder_is_named_with_the_fix(tmp_path, stub, state_dir):
    with pytest.raises(FlowError, match=r"no flow\.dag\.yaml in"):
        FlowRunner(stub.uri(), KEY, flow_dir=tmp_path, state_dir=state_dir)


# -- concurrency ------------------------------------------------------------------------------------
def test_one_runner_answers_many_threads_each_with_its_own_answer(runner_for):
    runner = runner_for()
    answers: dict[str, str] = {}

    def ask(thread: int) -> None:
        for turn in range(4):
            question = f"t{thread}-q{turn}"
            answers[question] = runner.answer_sync(question)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(answers) == 32
    assert all(answer == f"echo(1): {question}" for question, answer in answers.items())


@pytest.mark.timeout(60)
async def test_answer_runs_off_the_event_loop(runner_for, stub):
    runner = runner_for("gated")
    pending = asyncio.create_task(runner.answer("Hello?"))
    while not stub.received.is_set():  # this loop only turns if the flow call is in another thread
        await asyncio.sleep(0.01)
    assert not pending.done()
    stub.release.set()
    assert await pending == "echo(1): Hello?"


async def test_answer_sync_on_the_event_loop_thread_is_refused(runner_for):
    with pytest.raises(RuntimeError, match="await answer"):
        runner_for().answer_sync("Hello?")


# -- the runner cache -------------------------------------------------------------------------------
def test_the_same_endpoint_and_key_reuse_one_loaded_flow(stub, state_dir):
    clear_flow_runners()
    first = get_flow_runner(stub.uri(), KEY, state_dir=state_dir)
    assert get_flow_runner(stub.uri(), KEY, state_dir=state_dir) is first


def test_a_new_key_builds_a_new_runner_that_sends_the_new_key(stub, state_dir):
    clear_flow_runners()
    old = get_flow_runner(stub.uri(), KEY, state_dir=state_dir)
    new = get_flow_runner(stub.uri(), KEY + "-rotated", state_dir=state_dir)
    assert new is not old

    new.answer_sync("Hello?")
    assert stub.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}-rotated"


def test_a_new_endpoint_builds_a_new_runner_that_calls_it(stub, state_dir):
    clear_flow_runners()
    old = get_flow_runner(stub.uri(), KEY, state_dir=state_dir)
    moved = get_flow_runner(stub.uri("404"), KEY, state_dir=state_dir)  # e.g. a new deployment's endpoint
    assert moved is not old and get_flow_runner(stub.uri(), KEY, state_dir=state_dir) is old

    with pytest.raises(ScoringError):
        moved.answer_sync("Hello?")
    assert stub.hits["404"] == 1 and stub.hits["ok"] == 0


def test_the_runner_cache_never_holds_the_key_in_its_keys(stub, state_dir):
    from flows import runner as runner_module

    clear_flow_runners()
    get_flow_runner(stub.uri(), KEY, state_dir=state_dir)
    assert KEY not in json.dumps([list(map(str, k)) for k in runner_module._runners])


def test_a_scoring_error_from_the_flow_is_a_scoring_error_for_callers(runner_for):
    with pytest.raises(ScoringError):
        runner_for("404").answer_sync("Hello?")


# -- the pipeline's steps that ask the endpoint ------------------------------------------------------
@dataclass
class OneEndpoint:
    """The few backend calls the smoke steps make, answering for one endpoint: the stub's ``case``."""

    scoring_uri: str

    def get_endpoint(self, name: str) -> EndpointState:
        return EndpointState(name=name, scoring_uri=self.scoring_uri, provisioning_state="Succeeded")

    def get_endpoint_keys(self, name: str) -> EndpointKeys:
        return EndpointKeys(primary=SecretStr(KEY), secondary=SecretStr("unused"))


@pytest.fixture
def app_state_dir(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The app's settings point at this module's promptflow home (promptflow reads one per process)."""
    monkeypatch.setenv("PHI3_STATE_DIR", str(state_dir))
    get_settings.cache_clear()
    yield state_dir
    get_settings.cache_clear()


def step_input(request_timeout_ms: int) -> StepInput:
    config = RunConfig.model_validate(
        {
            "deployment": {"request_timeout_ms": request_timeout_ms},
            "evaluation": {"smoke_question": "Is it on?"},
        }
    )
    return StepInput(run_id="r-timeout", config=config, names={"endpoint": "phi3ft-timeout"})


@pytest.mark.parametrize("step", [smoke_test, flow_smoke], ids=["direct", "through the flow"])
def test_the_smoke_steps_wait_as_long_as_the_deployments_request_timeout(stub, app_state_dir, step):
    # The endpoint works on a request for deployment.request_timeout_ms; the pipeline's own calls wait as
    # long (not the client's 90 s default, which cut a big model on a CPU short, nor longer).
    backend = OneEndpoint(stub.uri("slow"))
    with pytest.raises(ScoringTimeoutError, match=r"within 1 s"):
        step(step_input(request_timeout_ms=1000), backend)

    stub.release.set()  # released, the "gated" case answers at once: well within 5 s
    backend.scoring_uri = stub.uri("gated")
    result = step(step_input(request_timeout_ms=5000), backend)
    assert result.ok and "echo(1): Is it on?" in json.dumps(result.outputs)
