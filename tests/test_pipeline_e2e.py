"""The whole pipeline on the devhost with the local backend, over real HTTP, with real training,
MLflow registry and a loopback endpoint. Also: kill -9 mid-run, and cancel."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import requests

from backends.local.backend import LocalBackend
from backends.scoring import chat_sync
from pipeline import dataset_scan
from settings import AppSettings
from tests.support.devhost import PROJECT_ROOT, DevhostProcess

pytestmark = pytest.mark.slow
FACTS = json.loads((PROJECT_ROOT / "sample_data" / "support_facts.json").read_text())


@pytest.fixture
def stack(tmp_path):
    home = tmp_path / "home"  # promptflow, MLflow and HF must not write to the user's home
    home.mkdir()
    env = {
        "PHI3_STATE_DIR": str(tmp_path / "phi3"),
        "PHI3_MODELS_DIR": str(PROJECT_ROOT / ".models"),
        "PHI3_BACKEND": "local",
        "HOME": str(home),
        # The evaluate step hands back and goes on in its next call, as on Azure past this budget.
        "EVALUATION_CALL_BUDGET_S": "0.3",
        # So does the dataset step, after each chunk of rows of a source bigger than one chunk.
        "DATASET_CALL_BUDGET_S": "0.01",
    }
    host = DevhostProcess(PROJECT_ROOT, tmp_path / "devhost", env=env)
    host.start()
    host.home = home
    host.settings = AppSettings(PHI3_STATE_DIR=env["PHI3_STATE_DIR"], PHI3_MODELS_DIR=env["PHI3_MODELS_DIR"])
    yield host
    host.stop()
    LocalBackend(host.settings, restart_endpoints=False).endpoints.stop_all()


def start_run(host, body) -> str:
    r = requests.post(f"{host.url}/api/finetune", json=body, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def summary(host, run_id) -> dict:
    r = requests.get(f"{host.url}/api/runs/{run_id}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_summary(host, run_id, until, timeout=600) -> dict:
    deadline = time.monotonic() + timeout
    last = {}
    while time.monotonic() < deadline:
        last = summary(host, run_id)
        if until(last):
            return last
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} never got there: {json.dumps(last)[:2000]}\n{host.log_text()[-3000:]}")


def finished(s):
    return s["status"] in ("Completed", "Failed", "Terminated")


def promptflow_processes_since(before: set) -> callable:
    from tests.test_promptflow_hygiene import promptflow_processes

    return lambda: {p for p in promptflow_processes() if p not in before}


def wait_until_gone(alive, timeout: float) -> set:
    deadline = time.monotonic() + timeout
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_smoke_run_completes_and_the_endpoint_answers_from_its_training_data(stack):
    from tests.test_promptflow_hygiene import promptflow_processes

    before = promptflow_processes()
    run_id = start_run(stack, {"preset": "smoke"})
    done = wait_summary(stack, run_id, finished)
    assert done["status"] == "Completed", done.get("error")
    statuses = {s["name"]: s["status"] for s in done["steps"]}
    assert statuses["identity"] == statuses["role_assignments"] == statuses["quota"] == "skipped"
    assert all(v in ("succeeded", "skipped") for v in statuses.values()), statuses
    assert all(s["duration_s"] is not None and s["started"] and s["ended"] for s in done["steps"])
    assert done["job"]["status"] == "Completed" and done["job"]["train_loss"] is not None
    assert done["job"]["eval_loss"] is not None
    assert done["model"]["version"] == "1"
    assert done["endpoint"]["scoring_uri"].startswith("http://127.0.0.1:")
    assert done["connection"]["name"] == "phi3-endpoint"
    assert done["flow_smoke"]["answer"] and done["flow_smoke"]["follow_up_answer"]
    evaluation = done["evaluation"]
    assert evaluation["finetuned"]["rows"] == 10 and evaluation["finetuned"]["errors"] == 0
    assert next(s for s in done["steps"] if s["name"] == "evaluate")["checks"] >= 1  # it went on in parts
    assert evaluation["base"]["rows"] == evaluation["finetuned"]["rows"]
    assert evaluation["finetuned"]["rouge_l"] > evaluation["base"]["rouge_l"]  # it learned its training data
    assert statuses["remove_base_deployment"] == "succeeded"  # the comparison deployment is not left running
    assert list(stack.home.iterdir()) == [], "the pipeline wrote into HOME"

    backend = LocalBackend(stack.settings, restart_endpoints=False)
    key = backend.get_endpoint_keys(done["endpoint"]["name"]).primary.get_secret_value()
    recalled = 0
    for fact in FACTS:
        answer = chat_sync(
            done["endpoint"]["scoring_uri"],
            key,
            [{"role": "user", "content": fact["question"]}],
            temperature=0.0,
            max_new_tokens=48,
        )
        recalled += fact["answer_contains"].lower() in answer.lower()
    assert recalled >= len(FACTS) * 0.6, f"recalled {recalled}/{len(FACTS)} training facts"

    # The key must never reach Durable history, custom status, the run summary or the host's log.
    secrets = [key, backend.get_endpoint_keys(done["endpoint"]["name"]).secondary.get_secret_value()]
    for path in (stack.state_dir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), f"a key leaked into {path}"
    assert not any(s in json.dumps(done) for s in secrets)
    # The scoring URI is read at the point of use (the summary read it from the backend just now).
    for path in stack.state_dir.rglob("*"):
        if path.is_file():
            assert done["endpoint"]["scoring_uri"].encode() not in path.read_bytes(), path
    assert not any(s in stack.log_text() for s in secrets)

    listed = requests.get(f"{stack.url}/api/runs", timeout=30).json()["runs"]
    assert run_id in [r["run_id"] for r in listed]

    # The evaluation is in MLflow too: one run for this pipeline run, both models' metrics, the rows.
    client = backend.registry.client()
    experiment = client.get_experiment_by_name("phi3-evaluation")
    (logged,) = client.search_runs([experiment.experiment_id], f"tags.run_id = '{run_id}'")
    assert logged.data.metrics["finetuned.rouge_l"] == pytest.approx(evaluation["finetuned"]["rouge_l"])
    assert logged.data.metrics["base.f1"] == pytest.approx(evaluation["base"]["f1"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"finetuned.jsonl", "base.jsonl", "side_by_side.jsonl"} <= artifacts
    assert done["evaluation"]["logged_to"].startswith("MLflow run")

    # Prompt flow ran inside the host (connection, flow smoke, evaluation): nothing of it outlives it.
    stack.stop()
    assert wait_until_gone(promptflow_processes_since(before), timeout=20) == set()


def _one_of_each(stack, run_id):
    root = Path(stack.settings.state_dir)
    jobs = [p for p in (root / "jobs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(jobs) == 1, jobs
    endpoints = [p for p in (root / "endpoints").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(endpoints) == 1, endpoints
    config = json.loads((endpoints[0] / "endpoint.json").read_text())
    assert list(config["deployments"]) == ["blue"]
    assert config["deployments"]["blue"]["revision"] == 1  # never re-created or reloaded
    backend = LocalBackend(stack.settings, restart_endpoints=False)
    model_name = summary(stack, run_id)["model"]["name"]
    versions = backend.registry.client().search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1


@pytest.mark.parametrize("kill_at", ["wait_for_finetune", "wait_for_deployment"])
def test_killed_host_resumes_the_run_with_exactly_one_job_and_one_deployment(stack, kill_at):
    run_id = start_run(stack, {"preset": "smoke"})

    def at_kill_point(s):
        step = next(x for x in s["steps"] if x["name"] == kill_at)
        return step["status"] == "running" or finished(s)

    s = wait_summary(stack, run_id, at_kill_point)
    assert not finished(s), f"the run finished before the kill point: {s.get('error')}"
    stack.kill()
    stack.start()
    done = wait_summary(stack, run_id, finished)
    assert done["status"] == "Completed", done.get("error")
    _one_of_each(stack, run_id)


def test_cancel_during_fine_tune_cancels_the_job_and_leaves_nothing_running(stack):
    run_id = start_run(stack, {"preset": "smoke", "hyperparameters": {"num_train_epochs": 60}})
    wait_summary(
        stack,
        run_id,
        lambda s: (
            (next(x for x in s["steps"] if x["name"] == "wait_for_finetune").get("live") or {}).get("status")
            == "Running"
        ),
    )
    r = requests.post(f"{stack.url}/api/runs/{run_id}/cancel", timeout=60)
    assert r.status_code == 202, r.text
    assert r.json()["job"]["status"] == "Canceled"
    done = wait_summary(stack, run_id, finished, timeout=60)
    assert done["status"] == "Terminated"
    jobs = Path(stack.settings.state_dir) / "jobs"
    job_dir = next(p for p in jobs.iterdir() if not p.name.startswith("."))
    pid = json.loads((job_dir / "job.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    endpoints = Path(stack.settings.state_dir) / "endpoints"
    assert not endpoints.exists() or not [p for p in endpoints.iterdir() if not p.name.startswith(".")]
    monitor = requests.get(f"{stack.durable}/instances/{run_id}:wait_for_finetune", timeout=30).json()
    assert monitor["runtimeStatus"] == "Terminated"
    again = requests.post(f"{stack.url}/api/runs/{run_id}/cancel", timeout=60)
    assert again.status_code == 409


def test_a_failed_step_records_what_exists_and_cleans_it_up_when_asked(stack):
    body = {
        "preset": "smoke",
        "promptflow": {"flow": "tests/apps/broken_flow"},
        "cleanup_on_failure": True,
        "evaluation": {"enabled": False},
    }
    run_id = start_run(stack, body)
    done = wait_summary(stack, run_id, finished)
    assert done["status"] == "Failed"
    assert done["error"]["step"] == "flow_smoke"
    assert "cannot load the flow" in done["error"]["message"]
    kinds = {r["kind"] for r in done["created_resources"]}
    assert {"data", "job", "model", "endpoint", "deployment", "connection"} <= kinds
    endpoints = Path(stack.settings.state_dir) / "endpoints"
    assert not [p for p in endpoints.iterdir() if not p.name.startswith(".")], "cleanup left the endpoint"


def test_bad_data_fails_the_run_with_the_line_before_any_compute_or_job(stack, tmp_path):
    bad = tmp_path / "chats.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    bad.write_text(
        "\n".join([good] * 20 + ['{"messages": [{"role": "robot", "content": "beep"}]}'] + [good] * 5)
    )
    run_id = start_run(stack, {"preset": "smoke", "dataset": {"hub_id": None, "files": [str(bad)]}})

    done = wait_summary(stack, run_id, finished)

    assert done["status"] == "Failed" and done["error"]["step"] == "prepare_dataset"
    assert "line 21" in done["error"]["message"] and "robot" in done["error"]["message"]
    statuses = {s["name"]: s["status"] for s in done["steps"]}
    assert statuses["compute"] == statuses["submit_finetune"] == "pending"
    root = Path(stack.settings.state_dir)
    assert not (root / "jobs").exists() or not any((root / "jobs").iterdir())


def test_bad_data_far_into_a_big_source_fails_the_run_with_its_line_after_the_step_went_on_in_parts(
    stack, tmp_path
):
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    rows = 2 * dataset_scan.CHECKPOINT_ROWS + 1
    big = tmp_path / "chats.jsonl"
    big.write_text("\n".join([good] * rows + ['{"messages": [{"role": "robot", "content": "beep"}]}']))
    run_id = start_run(stack, {"preset": "smoke", "dataset": {"hub_id": None, "files": [str(big)]}})

    done = wait_summary(stack, run_id, finished)

    assert done["status"] == "Failed" and done["error"]["step"] == "prepare_dataset"
    assert (
        f"line {rows + 1}" in done["error"]["message"] and f"of {rows + 1} rows" in done["error"]["message"]
    )
    step = next(s for s in done["steps"] if s["name"] == "prepare_dataset")
    assert step["checks"] >= 2  # handed back after each chunk, and went on where it stopped
