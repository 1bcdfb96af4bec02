"""The local scoring server, run as a real process on loopback, serving real MLflow pyfunc models."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backends.local.endpoints import (
    DeploymentConfig,
    EndpointConfig,
    EndpointKeys,
    ServerRecord,
    read_endpoint_config,
    write_json_atomic,
)
from tests.support.polling import wait_for
from tests.support.redaction import leaked_pieces

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Test models, logged as MLflow "models from code". Behaviour comes from model_config so one file
# serves every case; none of them imports this project.
TEST_MODEL_CODE = """
import json, os, threading, time
from typing import Any
import mlflow

class TestChatModel(mlflow.pyfunc.PythonModel):
    _guard = threading.Lock()
    active = 0
    max_active = 0

    def load_context(self, context):
        config = context.model_config or {}
        self.behaviour = config["behaviour"]
        if self.behaviour == "failing":
            raise RuntimeError("model weights are missing (test model)")
        if self.behaviour == "gated":
            while not os.path.exists(config["gate"]):
                time.sleep(0.02)

    def predict(
        self, context, model_input: list[dict[str, str]], params: dict[str, Any] | None = None
    ) -> list[str]:
        if model_input[-1]["content"] == "please fail":
            raise ValueError("the test model was asked to fail")
        if self.behaviour == "exclusive":
            with TestChatModel._guard:
                TestChatModel.active += 1
                TestChatModel.max_active = max(TestChatModel.max_active, TestChatModel.active)
            time.sleep(0.05)  # widen the window in which an overlapping request would be seen
            with TestChatModel._guard:
                TestChatModel.active -= 1
            return [json.dumps({"max_active": TestChatModel.max_active})]
        return [json.dumps({"behaviour": self.behaviour, "messages": model_input, "params": params})]

mlflow.models.set_model(TestChatModel())
"""

# Every parameter must appear in the input example, or MLflow drops it at predict time.
EXAMPLE_PARAMS = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 50,
    "max_new_tokens": 128,
    "min_new_tokens": 0,
    "repetition_penalty": 1.0,
    "do_sample": False,
}


@dataclass
class ModelStore:
    tracking_uri: str
    uris: dict[str, str]  # behaviour -> models:/<name>/<version>
    gate: Path  # the gated model finishes loading once this file exists


def log_test_models(root: Path, behaviours: tuple[str, ...]) -> ModelStore:
    """Register one test model per behaviour in a fresh SQLite-backed MLflow store under ``root``."""
    import mlflow

    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    code = root / "test_chat_model.py"
    code.write_text(TEST_MODEL_CODE)
    gate = root / "gate"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.create_experiment("scoring-tests", artifact_location=str(root / "artifacts"))
    uris = {}
    gate.touch()  # logging loads the model once to check the input example
    for behaviour in behaviours:
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                model_config={"behaviour": behaviour, "gate": str(gate)},
                input_example=([{"role": "user", "content": "hello"}], EXAMPLE_PARAMS),
                pip_requirements=["mlflow-skinny"],
                registered_model_name=f"test-{behaviour}",
            )
        uris[behaviour] = f"models:/test-{behaviour}/{info.registered_model_version}"
    gate.unlink()
    return ModelStore(tracking_uri=tracking_uri, uris=uris, gate=gate)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict[str, Any] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


class ServerProcess:
    """A scoring server started directly from hand-written endpoint files."""

    def __init__(self, directory: Path, config: EndpointConfig, tracking_uri: str) -> None:
        self.dir = directory
        self.keys = {"primary": secrets.token_urlsafe(32), "secondary": secrets.token_urlsafe(32)}
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / "keys.json", self.keys, mode=0o600)
        write_json_atomic(directory / "endpoint.json", config.model_dump(mode="json"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(PROJECT_ROOT)}
        self.log = open(directory / "logs" / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backends.local.scoring_server", str(directory)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{config.port}"
        wait_for(lambda: (directory / "server.json").exists(), timeout=60, what="server.json")

    def health(self) -> dict[str, Any]:
        health = get_json(f"{self.url}/health")
        assert health is not None, "the server does not answer /health"
        return health

    def wait_for_states(self, **states: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            health = self.health()
            served = health["deployments"]
            ok = all(name in served and served[name]["state"] == state for name, state in states.items())
            return health if ok else None

        return wait_for(reached, timeout=60, what=f"deployment states {states}")

    def reconfigure(self, config: EndpointConfig) -> None:
        """Write endpoint.json, send SIGHUP, and wait until the server reports the new generation."""
        config.generation = read_endpoint_config(self.dir).generation + 1
        write_json_atomic(self.dir / "endpoint.json", config.model_dump(mode="json"))
        self.process.send_signal(signal.SIGHUP)
        wait_for(lambda: self.health()["generation"] == config.generation, timeout=60, what="the reload")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)
        self.log.close()

    def log_text(self) -> str:
        return (self.dir / "logs" / "server.log").read_text(errors="replace")


def endpoint_config(name: str, **deployments: DeploymentConfig) -> EndpointConfig:
    return EndpointConfig(name=name, port=free_port(), created_at=datetime.now(UTC), deployments=deployments)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return log_test_models(tmp_path_factory.mktemp("mlflow"), ("echo", "failing", "exclusive", "gated"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: ModelStore) -> Iterator[ServerProcess]:
    config = endpoint_config(
        "main-endpoint",
        blue=DeploymentConfig(model_uri=store.uris["echo"], max_new_tokens_limit=64),
        green=DeploymentConfig(model_uri=store.uris["echo"]),
        broken=DeploymentConfig(model_uri=store.uris["failing"]),
        exclusive=DeploymentConfig(model_uri=store.uris["exclusive"]),
    )
    config.traffic = {"blue": 75, "green": 25}
    running = ServerProcess(tmp_path_factory.mktemp("main-endpoint"), config, store.tracking_uri)
    running.wait_for_states(blue="Ready", green="Ready", exclusive="Ready", broken="Failed")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def bare_process(tmp_path_factory: pytest.TempPathFactory, store: ModelStore) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("bare-endpoint")
    running = ServerProcess(directory, endpoint_config("bare-endpoint"), store.tracking_uri)
    yield running
    running.stop()


@pytest.fixture
def bare_server(bare_process: ServerProcess) -> ServerProcess:
    """A live endpoint with no deployments, no traffic, its original keys and no last-used mark."""
    write_json_atomic(bare_process.dir / "keys.json", bare_process.keys, mode=0o600)
    config = read_endpoint_config(bare_process.dir)
    config.deployments, config.traffic = {}, {}
    bare_process.reconfigure(config)
    (bare_process.dir / "last_used").unlink(missing_ok=True)
    return bare_process


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


def chat_body(*contents: str, **parameters: Any) -> dict[str, Any]:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return {"input_data": {"input_string": messages, "parameters": parameters}}


async def score(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    body: Any,
    *,
    key: str | None = None,
    deployment: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if deployment is not None:
        headers["azureml-model-deployment"] = deployment
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(f"{server.url}/score", data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


def answer(payload: dict[str, Any]) -> dict[str, Any]:
    return json.loads(payload["output"])


# -- auth ---------------------------------------------------------------------------------------
async def test_a_request_without_a_key_is_refused_with_401(http, server):
    status, payload, _ = await score(http, server, chat_body("hi"))
    assert status == 401
    assert payload["error"]["code"] == "Unauthorized"


async def test_a_wrong_key_is_refused_and_the_error_shows_no_key_material(http, server):
    wrong = secrets.token_urlsafe(32)
    status, payload, _ = await score(http, server, chat_body("hi"), key=wrong)
    assert status == 401
    text = json.dumps(payload)
    assert wrong not in text
    assert all(key not in text for key in server.keys.values())


async def test_the_secondary_key_is_accepted(http, server):
    status, payload, _ = await score(
        http, server, chat_body("hi"), key=server.keys["secondary"], deployment="blue"
    )
    assert status == 200, payload
    assert answer(payload)["messages"] == [{"role": "user", "content": "hi"}]


# -- validation -----------------------------------------------------------------------------------
BAD_BODIES = [
    ("not-json", None, "body"),
    ("not-an-object", [1, 2], "body"),
    ("no-input-data", {}, "input_data"),
    ("no-input-string", {"input_data": {}}, "input_data.input_string"),
    ("string-not-list", {"input_data": {"input_string": "hi"}}, "input_data.input_string"),
    ("empty-list", {"input_data": {"input_string": []}}, "input_data.input_string"),
    ("no-content", {"input_data": {"input_string": [{"role": "user"}]}},
     "input_data.input_string[0].content"),
    ("content-not-string", {"input_data": {"input_string": [{"role": "user", "content": 5}]}},
     "input_data.input_string[0].content"),
    ("unknown-role", {"input_data": {"input_string": [{"role": "robot", "content": "x"}]}},
     "input_data.input_string[0].role"),
    ("parameters-not-object",
     {"input_data": {"input_string": [{"role": "user", "content": "x"}], "parameters": "x"}},
     "input_data.parameters"),
    ("temperature-string", chat_body("x", temperature="hot"), "input_data.parameters.temperature"),
    ("max-new-tokens-float", chat_body("x", max_new_tokens=1.5), "input_data.parameters.max_new_tokens"),
    ("do-sample-string", chat_body("x", do_sample="yes"), "input_data.parameters.do_sample"),
    ("negative-temperature", chat_body("x", temperature=-1), "input_data.parameters.temperature"),
    ("unknown-parameter", chat_body("x", max_tokens=10), "input_data.parameters.max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field"), BAD_BODIES, ids=[case for case, _, _ in BAD_BODIES])
async def test_a_malformed_body_is_rejected_with_400_naming_the_field(http, server, case, body, field):
    raw = b"{not json" if case == "not-json" else None
    status, payload, _ = await score(http, server, body, key=server.keys["primary"], raw=raw)
    assert status == 400
    assert any(problem.startswith(f"{field}:") for problem in payload["error"]["problems"]), payload


async def test_a_body_over_the_size_limit_is_rejected_with_413(http, server):
    huge = chat_body("x" * (2 * 1024 * 1024))
    status, payload, _ = await score(http, server, huge, key=server.keys["primary"])
    assert status == 413
    assert payload["error"]["code"] == "PayloadTooLarge"


# -- routing --------------------------------------------------------------------------------------
async def test_the_deployment_header_routes_to_that_deployment(http, server):
    status, _, headers = await score(
        http, server, chat_body("hi"), key=server.keys["primary"], deployment="green"
    )
    assert status == 200
    assert headers["azureml-model-deployment"] == "green"


async def test_an_unknown_deployment_in_the_header_gives_404(http, server):
    status, payload, _ = await score(
        http, server, chat_body("hi"), key=server.keys["primary"], deployment="red"
    )
    assert status == 404
    assert "'red'" in payload["error"]["message"]


async def test_requests_without_the_header_are_split_by_the_traffic_weights(http, server):
    served = Counter()
    for _ in range(8):  # two full cycles of the 75/25 split
        status, _, headers = await score(http, server, chat_body("hi"), key=server.keys["primary"])
        assert status == 200
        served[headers["azureml-model-deployment"]] += 1
    assert served == {"blue": 6, "green": 2}


async def test_a_deployment_that_failed_to_load_answers_503_with_the_load_error(http, server):
    status, payload, _ = await score(
        http, server, chat_body("hi"), key=server.keys["primary"], deployment="broken"
    )
    assert status == 503
    assert "model weights are missing" in payload["error"]["message"]


async def test_an_endpoint_without_traffic_answers_503(http, bare_server):
    status, payload, _ = await score(http, bare_server, chat_body("hi"), key=bare_server.keys["primary"])
    assert status == 503
    assert "no deployment receives traffic" in payload["error"]["message"]


# -- what reaches the model -----------------------------------------------------------------------
async def test_multi_turn_messages_reach_predict_intact(http, server):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Vermilion — «rouge»."},
        {"role": "user", "content": "Another, please?\n"},
    ]
    body = {"input_data": {"input_string": messages, "parameters": {"temperature": 0.0}}}
    status, payload, _ = await score(http, server, body, key=server.keys["primary"], deployment="blue")
    assert status == 200
    assert answer(payload)["messages"] == messages


async def test_max_new_tokens_is_clamped_to_the_deployment_limit(http, server):
    body = chat_body("hi", max_new_tokens=5000, min_new_tokens=100)
    status, payload, _ = await score(http, server, body, key=server.keys["primary"], deployment="blue")
    assert status == 200
    params = answer(payload)["params"]
    assert (params["max_new_tokens"], params["min_new_tokens"]) == (64, 64)


async def test_generation_parameters_reach_predict_with_their_types(http, server):
    body = chat_body("hi", temperature=1, top_p=0.5, top_k=7, do_sample=True, repetition_penalty=1.1)
    status, payload, _ = await score(http, server, body, key=server.keys["primary"], deployment="green")
    assert status == 200
    params = answer(payload)["params"]
    assert params | {"max_new_tokens": None} == {
        "temperature": 1.0, "top_p": 0.5, "top_k": 7, "do_sample": True, "repetition_penalty": 1.1,
        "min_new_tokens": 0, "max_new_tokens": None,
    }  # fmt: skip


async def test_a_model_error_becomes_500_with_a_short_message(http, server):
    status, payload, _ = await score(
        http, server, chat_body("please fail"), key=server.keys["primary"], deployment="blue"
    )
    assert status == 500
    assert "ValueError: the test model was asked to fail" in payload["error"]["message"]


async def test_requests_to_one_deployment_never_run_concurrently(http, server):
    key = server.keys["primary"]
    results = await asyncio.gather(
        *(score(http, server, chat_body(f"q{i}"), key=key, deployment="exclusive") for i in range(4))
    )
    assert [status for status, _, _ in results] == [200] * 4
    assert {answer(payload)["max_active"] for _, payload, _ in results} == {1}


# -- health, state files, reload ------------------------------------------------------------------
def test_health_reports_each_deployment_state_including_a_failed_load(server, store):
    health = server.health()
    assert health["status"] == "Degraded"
    assert health["endpoint"] == "main-endpoint"
    assert health["device"] in ("cpu", "cuda:0")
    states = {name: entry["state"] for name, entry in health["deployments"].items()}
    assert states == {"blue": "Ready", "green": "Ready", "exclusive": "Ready", "broken": "Failed"}
    assert health["deployments"]["broken"]["model_uri"] == store.uris["failing"]
    assert "model weights are missing" in health["deployments"]["broken"]["error"]


def test_server_json_names_the_listening_process(server):
    record = ServerRecord.model_validate_json((server.dir / "server.json").read_bytes())
    assert record.pid == server.process.pid
    assert server.url.endswith(f":{record.port}")


async def test_scoring_records_when_the_endpoint_was_last_used(http, bare_server, store):
    marker = bare_server.dir / "last_used"
    assert not marker.exists()
    await score(http, bare_server, chat_body("hi"), key=bare_server.keys["primary"], deployment="none")
    assert marker.exists() is False  # unknown deployment: nothing was scored
    config = read_endpoint_config(bare_server.dir)
    config.deployments = {"blue": DeploymentConfig(model_uri=store.uris["echo"])}
    bare_server.reconfigure(config)
    bare_server.wait_for_states(blue="Ready")
    await score(http, bare_server, chat_body("hi"), key=bare_server.keys["primary"], deployment="blue")
    assert marker.exists()


async def test_sighup_loads_an_added_deployment_and_applies_its_traffic(http, bare_server, store):
    first_pid = bare_server.process.pid
    config = read_endpoint_config(bare_server.dir)
    config.deployments = {"blue": DeploymentConfig(model_uri=store.uris["echo"])}
    config.traffic = {"blue": 100}
    bare_server.reconfigure(config)
    bare_server.wait_for_states(blue="Ready")
    status, _, headers = await score(http, bare_server, chat_body("hi"), key=bare_server.keys["primary"])
    assert (status, headers["azureml-model-deployment"]) == (200, "blue")
    assert bare_server.process.pid == first_pid and bare_server.process.poll() is None


def test_health_shows_loading_until_the_model_has_loaded(bare_server, store):
    config = read_endpoint_config(bare_server.dir)
    config.deployments = {"slow": DeploymentConfig(model_uri=store.uris["gated"])}
    bare_server.reconfigure(config)
    assert bare_server.health()["deployments"]["slow"]["state"] == "Loading"
    assert bare_server.health()["status"] == "Degraded"
    store.gate.touch()
    try:
        health = bare_server.wait_for_states(slow="Ready")
    finally:
        store.gate.unlink()
    assert health["status"] == "Healthy"


async def test_sighup_reloads_regenerated_keys(http, bare_server):
    old = bare_server.keys["primary"]
    new = EndpointKeys(primary=secrets.token_urlsafe(32), secondary=bare_server.keys["secondary"])
    data = {name: value.get_secret_value() for name, value in new}
    write_json_atomic(bare_server.dir / "keys.json", data, mode=0o600)
    bare_server.reconfigure(read_endpoint_config(bare_server.dir))
    old_status, _, _ = await score(http, bare_server, chat_body("hi"), key=old)
    new_status, _, _ = await score(http, bare_server, chat_body("hi"), key=data["primary"])
    assert old_status == 401
    assert new_status == 503  # accepted, but the bare endpoint has no traffic


async def test_a_damaged_keys_file_is_ignored_on_reload_and_its_keys_stay_out_of_the_log(http, bare_server):
    primary, secondary = bare_server.keys["primary"], bare_server.keys["secondary"]
    # A hand edit gone wrong: a trailing comma after the last key.
    damaged = json.dumps(bare_server.keys, indent=2)[:-2] + ",\n}"
    (bare_server.dir / "keys.json").write_text(damaged)
    bare_server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload ignored" in bare_server.log_text(), timeout=30, what="the reload to be refused")

    log_text = bare_server.log_text()
    assert "keys.json is damaged" in log_text and "trailing comma" in log_text
    assert not leaked_pieces(log_text, primary) and not leaked_pieces(log_text, secondary)
    status, _, _ = await score(http, bare_server, chat_body("hi"), key=primary)
    assert status == 503  # the key it had still opens the door (and the bare endpoint has no traffic)


async def test_the_server_log_never_contains_a_key(http, server):
    for key in server.keys.values():
        await score(http, server, chat_body("hi"), key=key, deployment="blue")
        await score(http, server, chat_body("hi"), key=key, deployment="broken")
        await score(http, server, {"bad": 1}, key=key)
    log_text = server.log_text()
    assert "POST /score" in log_text  # the requests were logged...
    assert all(key not in log_text for key in server.keys.values())  # ...without their keys
