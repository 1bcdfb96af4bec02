"""The flow folder executed for real: ``pf flow test`` and ``pf flow serve`` (what a person runs; the
connection resolved by name from the local store) against a loopback stub, and the flow against a
real local deployment of a tiny Phi-3 — base and fine-tuned — including evaluating one against the other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.scoring import ScoringAuthError, chat_sync
from flows.connections import upsert_connection
from flows.environment import promptflow_environment
from flows.runner import FLOW_DIR, FlowRunner, GenerationOptions
from tests.test_flow_runner import HISTORY, KEY, ScoringStub, shared_promptflow_state

PF = Path(sys.executable).parent / "pf"
CONNECTION = "phi3-endpoint"  # the name flow.dag.yaml's node asks for


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_promptflow_state(tmp_path_factory)


@pytest.fixture(scope="module")
def stub() -> Iterator[ScoringStub]:
    server = ScoringStub().start()
    yield server
    server.stop()


@dataclass
class PfCli:
    """The ``pf`` CLI in a child process with HOME and TMPDIR pointed at empty folders."""

    state_dir: Path
    home: Path
    tmp: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **promptflow_environment(self.state_dir),
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
        }

    def flow_test(self, flow_dir: Path, **inputs: str) -> subprocess.CompletedProcess[str]:
        args = ["flow", "test", "--flow", str(flow_dir)]
        if inputs:
            args += ["--inputs", *(f"{name}={value}" for name, value in inputs.items())]
        return subprocess.run(
            [str(PF), *args], env=self.env(), capture_output=True, text=True, timeout=180, cwd=self.tmp
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(PF), *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.tmp,
        )


@pytest.fixture
def pf_cli(tmp_path: Path, state_dir: Path) -> PfCli:
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    return PfCli(state_dir, tmp_path / "home", tmp_path / "tmp")


@pytest.fixture
def flow_copy(tmp_path: Path) -> Path:
    """The flow folder copied as-is: `pf flow test` writes .promptflow/ into the folder it runs."""
    return Path(
        shutil.copytree(FLOW_DIR, tmp_path / "phi3_chat", ignore=shutil.ignore_patterns(".promptflow"))
    )


def everything_under(*roots: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for root in roots for p in root.rglob("*") if p.is_file())


# -- pf flow test against the stub --------------------------------------------------------------------
def test_pf_flow_test_resolves_the_connection_by_name_and_sends_the_history(
    pf_cli, flow_copy, stub, state_dir
):
    upsert_connection(CONNECTION, stub.uri(), KEY, state_dir=state_dir)
    history = json.dumps([
        {"inputs": {"question": HISTORY[0]["content"]}, "outputs": {"answer": HISTORY[1]["content"]}},
        {"inputs": {"question": HISTORY[2]["content"]}, "outputs": {"answer": HISTORY[3]["content"]}},
    ])  # fmt: skip

    done = pf_cli.flow_test(flow_copy, question="How do I register it?", chat_history=history)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"answer": "echo(5): How do I register it?"}
    assert stub.last_messages() == [*HISTORY, {"role": "user", "content": "How do I register it?"}]
    assert stub.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"


def test_pf_flow_test_never_prints_or_writes_the_key_and_leaves_home_empty(
    pf_cli, flow_copy, stub, state_dir
):
    upsert_connection(CONNECTION, stub.uri(), KEY, state_dir=state_dir)

    done = pf_cli.flow_test(flow_copy, question="Hello?")

    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    assert KEY not in everything_under(flow_copy, pf_cli.tmp)
    assert list(pf_cli.home.iterdir()) == []


def test_pf_flow_test_without_inputs_asks_the_tutorials_default_question(pf_cli, flow_copy, stub, state_dir):
    upsert_connection(CONNECTION, stub.uri(), KEY, state_dir=state_dir)

    done = pf_cli.flow_test(flow_copy)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"answer": "echo(1): Who founded Microsoft?"}


def test_pf_flow_test_reports_a_refused_key_as_the_tools_auth_error_without_the_key(
    pf_cli, flow_copy, stub, state_dir
):
    upsert_connection(CONNECTION, stub.uri("401"), KEY, state_dir=state_dir)

    done = pf_cli.flow_test(flow_copy, question="Hello?")

    assert done.returncode != 0
    assert "EndpointAuthError" in done.stdout + done.stderr
    assert "update the connection" in done.stdout + done.stderr
    assert KEY not in done.stdout + done.stderr


def test_pf_flow_serve_answers_a_chat_request_with_history_over_http(pf_cli, flow_copy, stub, state_dir):
    from tests.support.polling import wait_for
    from tests.test_flow_runner import closed_port
    from tests.test_promptflow_hygiene import promptflow_processes
    from tests.test_scoring_server import get_json

    upsert_connection(CONNECTION, stub.uri(), KEY, state_dir=state_dir)
    before = promptflow_processes()
    port = closed_port()
    server = pf_cli.start(
        "flow",
        "serve",
        "--source",
        str(flow_copy),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--skip-open-browser",
    )
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/health"), timeout=60, what="pf flow serve")
        history = [{"inputs": {"question": "q1"}, "outputs": {"answer": "a1"}}]
        answer = post_json(f"http://127.0.0.1:{port}/score", {"question": "Hello?", "chat_history": history})
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]

    assert answer == {"answer": "echo(3): Hello?"}
    assert stub.last_messages()[:2] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]
    assert KEY not in output
    assert list(pf_cli.home.iterdir()) == []
    # Stopping `pf flow serve` stops all of it (no process of it is left behind).
    deadline = time.monotonic() + 20
    while (left := promptflow_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == set(), left


def post_json(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


# -- a real local deployment of the tiny model ---------------------------------------------------------
@dataclass
class TinyDeployment:
    scoring_uri: str
    key: str
    train_file: Path
    endpoints: Any
    name: str

    def scoring_requests(self) -> int:
        """POSTs the endpoint's server has logged (its access log)."""
        log = self.endpoints.root / self.name / "logs" / "server.log"
        return log.read_text(errors="replace").count('"POST /score')


def _train_tiny_phi3(root: Path) -> tuple[Path, Path, Path]:
    """A tiny Phi-3 built from config (base) and the same fine-tuned on made-up facts (LoRA, merged)."""
    import torch
    from transformers import AutoTokenizer

    from backends.local.base_models import (
        LoraSettings,
        build_tiny_phi3,
        load_trainable_model,
        save_merged_model,
    )
    from backends.local.trainer import LoopSettings, encode_file, train
    from tests.support.fact_data import write_fact_dataset

    train_file = root / "train.jsonl"
    write_fact_dataset(train_file, rows=40, facts=5, seed=3)
    base = build_tiny_phi3(root / "base", corpus_files=[train_file])
    tokenizer = AutoTokenizer.from_pretrained(base)
    cpu = torch.device("cpu")
    model = load_trainable_model(base, lora=LoraSettings(r=32, alpha=64, dropout=0.0), seed=0, device=cpu)
    settings = LoopSettings(
        learning_rate=5e-3,
        num_train_epochs=8,
        per_device_train_batch_size=4,
        max_seq_length=128,
        warmup_ratio=0.1,
    )
    train(
        model,
        encode_file(tokenizer, train_file, 128),
        settings,
        device=cpu,
        pad_token_id=tokenizer.pad_token_id,
    )
    return base, save_merged_model(model, tokenizer, root / "finetuned"), train_file


@pytest.fixture(scope="module")
def tiny_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyDeployment]:
    """One local endpoint with two deployments: 'base' and 'finetuned' (all traffic)."""
    import mlflow

    from backends.local.chat_model import log_chat_model
    from backends.local.endpoints import LocalEndpoints
    from tests.test_local_endpoints import settled

    root = tmp_path_factory.mktemp("tiny-deployment")
    base_dir, finetuned_dir, train_file = _train_tiny_phi3(root)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.create_experiment("flow-tests", artifact_location=str(root / "artifacts"))
    uris = {}
    for label, model_dir in (("base", base_dir), ("finetuned", finetuned_dir)):
        with mlflow.start_run(experiment_id=experiment):
            version = mlflow.register_model(log_chat_model(model_dir), f"tiny-phi3-{label}").version
        uris[label] = f"models:/tiny-phi3-{label}/{version}"

    endpoints = LocalEndpoints(root / "workspace", tracking_uri=tracking_uri)
    try:  # the server process must go even when setting up fails
        info = endpoints.create_or_update_endpoint("flow-tests", tags={"managed-by": "tests"})
        for label, uri in uris.items():
            # One at a time: two first loads in one server process race in transformers' lazy imports.
            endpoints.create_or_update_deployment("flow-tests", label, model_uri=uri, max_new_tokens_limit=64)
            deployment = settled(endpoints, "flow-tests", label)
            assert deployment.provisioning_state == "Succeeded", deployment.error
        endpoints.set_traffic("flow-tests", {"finetuned": 100})
        key = endpoints.get_keys("flow-tests").primary.get_secret_value()
        yield TinyDeployment(info.scoring_uri, key, train_file, endpoints, "flow-tests")
    finally:
        endpoints.delete_endpoint("flow-tests")


GREEDY = {"temperature": 0.0, "max_new_tokens": 24}


def training_cases(train_file: Path, count: int) -> list[tuple[list[dict[str, str]], str]]:
    from pipeline.evaluation import load_eval_cases

    return load_eval_cases(train_file, count)


@pytest.mark.slow
def test_the_flow_answers_from_a_real_deployment_exactly_like_the_direct_route(tiny_deployment, state_dir):
    messages, _ = training_cases(tiny_deployment.train_file, 1)[0]
    question_only = [m for m in messages if m["role"] != "system"]
    runner = FlowRunner(
        tiny_deployment.scoring_uri,
        tiny_deployment.key,
        options=GenerationOptions(**GREEDY),
        state_dir=state_dir,
    )

    through_flow = runner.answer_conversation(question_only)
    direct = chat_sync(tiny_deployment.scoring_uri, tiny_deployment.key, question_only, **GREEDY)

    assert through_flow == direct
    assert "code name" in through_flow  # the fine-tuned model, which has all the traffic


@pytest.mark.slow
def test_pf_flow_test_answers_from_the_real_deployment_by_connection_name(
    tiny_deployment, pf_cli, flow_copy, state_dir
):
    upsert_connection(CONNECTION, tiny_deployment.scoring_uri, tiny_deployment.key, state_dir=state_dir)
    scored_before = tiny_deployment.scoring_requests()

    done = pf_cli.flow_test(flow_copy, question="What is the code name of Tirupe?")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["answer"].strip()  # sampled at the flow's temperature 0.7
    assert tiny_deployment.scoring_requests() == scored_before + 1
    assert tiny_deployment.key not in done.stdout + done.stderr
    assert list(pf_cli.home.iterdir()) == []


@pytest.mark.slow
def test_a_regenerated_key_is_an_auth_error_and_a_runner_with_the_new_key_answers(tiny_deployment, state_dir):
    from flows.runner import get_flow_runner

    old_key = tiny_deployment.endpoints.get_keys(tiny_deployment.name).secondary.get_secret_value()
    old = get_flow_runner(tiny_deployment.scoring_uri, old_key, state_dir=state_dir)
    assert old.answer_sync("Hello?") is not None
    tiny_deployment.endpoints.regenerate_keys(tiny_deployment.name, "secondary")

    with pytest.raises(ScoringAuthError):
        old.answer_sync("Hello?")
    new_key = tiny_deployment.endpoints.get_keys(tiny_deployment.name).secondary.get_secret_value()
    assert isinstance(
        get_flow_runner(tiny_deployment.scoring_uri, new_key, state_dir=state_dir).answer_sync("Hi"), str
    )


@pytest.mark.slow
def test_evaluation_through_the_flow_scores_both_models_and_the_finetuned_one_wins(
    tiny_deployment, state_dir, tmp_path
):
    from pipeline.evaluation import evaluate_base_vs_finetuned

    def runner(deployment: str) -> FlowRunner:
        options = GenerationOptions(**GREEDY, deployment=deployment)
        return FlowRunner(
            tiny_deployment.scoring_uri, tiny_deployment.key, options=options, state_dir=state_dir
        )

    cases = training_cases(tiny_deployment.train_file, 6)
    comparison = evaluate_base_vs_finetuned(
        cases,
        runner("finetuned").answer_conversation,
        runner("base").answer_conversation,
        out_dir=tmp_path / "evaluation",
    )

    assert comparison.base is not None
    assert (comparison.finetuned.rows, comparison.finetuned.errors, comparison.base.errors) == (6, 0, 0)
    assert comparison.finetuned.rouge_l > comparison.base.rouge_l + 0.3
    assert comparison.finetuned.f1 > comparison.base.f1
    assert comparison.delta["rouge_l"] == pytest.approx(
        comparison.finetuned.rouge_l - comparison.base.rouge_l
    )
    side_by_side = [json.loads(line) for line in Path(comparison.rows_file).read_text().splitlines()]
    assert [row["index"] for row in side_by_side] == list(range(6))
    assert all(row["finetuned"]["answer"] and row["base"]["answer"] is not None for row in side_by_side)
    assert {p.name for p in (tmp_path / "evaluation").iterdir()} == {
        "finetuned.jsonl",
        "base.jsonl",
        "side_by_side.jsonl",
    }
