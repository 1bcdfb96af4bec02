"""The run API refuses what it cannot run, over real HTTP on the devhost with the real function_app.py:
a bad run config is a 400 that lists every problem by field path, a run id still in use is a 409, an
unknown run is a 404. Nothing is started for a refused request."""

from __future__ import annotations

import asyncio
import json
import time

import azure.durable_functions as df
import pytest
import requests

from backends.local.backend import LocalBackend
from bot.commands import DurableRunStatus
from bot.proactive import delivery_instance_id
from devhost.durable.api import client_binding
from settings import AppSettings
from tests.support.devhost import PROJECT_ROOT, DevhostProcess
from tests.support.polling import wait_for


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_api")
    home = tmp / "home"  # promptflow, MLflow and HF must not write to the user's home
    home.mkdir()
    env = {
        "PHI3_STATE_DIR": str(tmp / "phi3"),
        "PHI3_MODELS_DIR": str(PROJECT_ROOT / ".models"),
        "PHI3_BACKEND": "local",
        "HOME": str(home),
        # Instance queries answer 2 at a time, the first page of each empty, as the Azure Table service
        # may: whatever lists instances must follow the continuation token.
        "DEVHOST_DURABLE_MAX_PAGE": "2",
        "DEVHOST_DURABLE_EMPTY_FIRST_PAGE": "1",
        "BOT_DELIVERY_HISTORY_HOURS": "0",  # the hourly purge takes every finished delivery
    }
    devhost = DevhostProcess(PROJECT_ROOT, tmp / "devhost", env=env)
    devhost.start()
    yield devhost
    devhost.stop()
    backend = LocalBackend(
        AppSettings(PHI3_STATE_DIR=env["PHI3_STATE_DIR"], PHI3_MODELS_DIR=env["PHI3_MODELS_DIR"]),
        restart_endpoints=False,
    )
    for job in backend.jobs.list():  # a run canceled mid-submission may have started one
        if job.status not in ("Completed", "Failed", "Canceled"):
            backend.jobs.cancel(job.name)
    backend.endpoints.stop_all()


def post_finetune(host, **kwargs) -> requests.Response:
    return requests.post(f"{host.url}/api/finetune", timeout=60, **kwargs)


def run_ids(host) -> set[str]:
    r = requests.get(f"{host.url}/api/runs", timeout=30)
    assert r.status_code == 200, r.text
    return {run["run_id"] for run in r.json()["runs"]}


def errors_by_field(response: requests.Response) -> dict[str, str]:
    assert response.headers["Content-Type"].startswith("application/json")
    return {e["field"]: e["message"] for e in response.json()["errors"]}


def test_a_bad_run_config_is_refused_with_every_problem_by_field_path_and_starts_nothing(host):
    before = run_ids(host)
    body = {
        "preset": "smoke",
        "colour": "blue",
        "hyperparameters": {"learning_rate": 0, "lr_scheduler_type": "exponential"},
        "dataset": {"test_size": 1.2},
        "compute": {"min_instances": 2, "max_instances": 1},
    }
    r = post_finetune(host, json=body)
    assert r.status_code == 400, r.text
    problems = errors_by_field(r)
    assert set(problems) == {
        "colour",
        "hyperparameters.learning_rate",
        "hyperparameters.lr_scheduler_type",
        "dataset.test_size",
        "compute.min_instances",
    }
    assert "unknown field" in problems["colour"]
    assert "greater than 0" in problems["hyperparameters.learning_rate"]
    assert "'linear'" in problems["hyperparameters.lr_scheduler_type"]
    assert "less than 1" in problems["dataset.test_size"]
    assert "must not exceed" in problems["compute.min_instances"]
    assert run_ids(host) == before


def test_a_body_that_is_not_json_is_refused_with_a_clear_message(host):
    r = post_finetune(host, data=b"preset=smoke", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    problems = errors_by_field(r)
    assert list(problems) == ["(body)"]
    assert problems["(body)"].startswith("not valid JSON")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"hyperparameters": {"seed": ' + b"1" * 5000 + b"}}", "4300 digits"),
    ],
    ids=["nested too deeply", "a 5000-digit number"],
)
def test_json_that_python_will_not_read_is_refused_saying_why(host, body, fragment):
    r = post_finetune(host, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    message = errors_by_field(r)["(body)"]
    assert message.startswith("not valid JSON here") and fragment in message


def test_a_field_holding_json_nested_hundreds_deep_is_refused_by_its_name(host):
    deep = b'{"a": ' * 900 + b"1" + b"}" * 900  # within what Python reads; past a recursive copy's limit
    r = post_finetune(
        host,
        data=b'{"preset": "smoke", "dataset": ' + deep + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert errors_by_field(r) == {"dataset.a": "unknown field"}


def test_a_json_body_that_is_not_an_object_is_refused(host):
    r = post_finetune(host, json=["preset", "smoke"])
    assert r.status_code == 400, r.text
    assert errors_by_field(r) == {"(body)": "must be a JSON object"}


def test_an_unknown_preset_is_refused_naming_the_presets_there_are(host):
    r = post_finetune(host, json={"preset": "huge"})
    assert r.status_code == 400, r.text
    message = errors_by_field(r)["preset"]
    assert "unknown preset 'huge'" in message
    assert "smoke" in message and "demo" in message


def test_starting_a_run_id_that_is_still_active_is_a_conflict_and_leaves_the_run_alone(host):
    run_id = "api-conflict-1"
    body = {"preset": "smoke", "run_id": run_id, "evaluation": {"enabled": False}}
    first = post_finetune(host, json=body)
    assert first.status_code == 202, first.text
    assert first.json()["id"] == run_id
    try:
        again = post_finetune(host, json=body)
        assert again.status_code == 409, again.text
        message = errors_by_field(again)["run_id"]
        assert run_id in message and "cancel it or pick another run_id" in message
        status = requests.get(f"{host.url}/api/runs/{run_id}", timeout=30).json()["status"]
        assert status in ("Pending", "Running")
    finally:
        cancel = requests.post(f"{host.url}/api/runs/{run_id}/cancel", timeout=120)
    assert cancel.status_code == 202, cancel.text
    assert wait_status(host, run_id) == "Terminated"


def wait_status(host, run_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = requests.get(f"{host.url}/api/runs/{run_id}", timeout=30).json()["status"]
        if status in ("Completed", "Failed", "Terminated"):
            return status
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} is still {status} after {timeout}s")


def test_a_run_id_of_the_bots_answer_deliveries_is_refused_and_the_delivery_is_left_alone(
    host, finished_delivery
):
    r = post_finetune(host, json={"preset": "smoke", "run_id": finished_delivery})
    assert r.status_code == 400, r.text
    assert "belong to the bot's answer deliveries" in errors_by_field(r)["run_id"]
    assert host.status(finished_delivery).json()["name"] == "bot_proactive_answer"


def test_the_summary_of_an_unknown_run_is_not_found(host):
    r = requests.get(f"{host.url}/api/runs/no-such-run", timeout=30)
    assert r.status_code == 404
    assert r.json() == {"error": "no run with id 'no-such-run'"}


def test_canceling_an_unknown_run_is_not_found(host):
    r = requests.post(f"{host.url}/api/runs/no-such-run/cancel", timeout=30)
    assert r.status_code == 404
    assert r.json() == {"error": "no run with id 'no-such-run'"}


@pytest.fixture(scope="module")
def failed_run(host, tmp_path_factory) -> str:
    """A run that failed at prepare_dataset (nothing trains): an instance of the pipeline to aim at."""
    bad = tmp_path_factory.mktemp("failed_run") / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    run_id = "api-failed-1"
    body = {"preset": "smoke", "run_id": run_id, "dataset": {"hub_id": None, "files": [str(bad)]}}
    assert post_finetune(host, json=body).status_code == 202
    assert wait_status(host, run_id) == "Failed"
    return run_id


def test_starting_a_run_id_again_ends_the_wait_its_previous_attempt_left_polling(host, tmp_path):
    """Durable's own terminate (the check-status payload's terminatePostUri) ends a run, not its wait:
    the monitor would poll on until its deadline, and the run started again could not start its own."""
    run_id = "api-again-1"
    wait = f"{run_id}:wait_for_finetune"
    monitor = {
        "check": "job_status",
        "args": {"job_name": f"{run_id}-job"},
        "interval_seconds": 30,
        "max_seconds": 300,
        "deadline": "2999-01-01T00:00:00+00:00",
    }
    host.start_orchestration("wait_until_done", monitor, instance_id=wait)
    # Suspended, it stays active for as long as the test takes (an active status the cancel also ends).
    assert requests.post(f"{host.durable}/instances/{wait}/suspend", timeout=10).status_code == 202
    host.wait(wait, until=lambda s: s["runtimeStatus"] == "Suspended")
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    body = {"preset": "smoke", "run_id": run_id, "dataset": {"hub_id": None, "files": [str(bad)]}}
    try:
        assert post_finetune(host, json=body).status_code == 202
        assert wait_status(host, run_id) == "Failed"  # at prepare_dataset: nothing trains

        assert host.wait(wait)["runtimeStatus"] == "Terminated"
        assert host.status(wait).json()["output"] == "its run was started again"
    finally:
        requests.post(
            f"{host.durable}/instances/{wait}/terminate", params={"reason": "test over"}, timeout=10
        )


ODD_DELIVERY_KEY = "t/pending/odd/1"


@pytest.fixture
def finished_delivery(host):
    """A bot delivery instance that has finished, purged again after the test (the purge test counts)."""
    iid = host.start_orchestration(
        "bot_proactive_answer",
        {"pending_key": ODD_DELIVERY_KEY},
        instance_id=delivery_instance_id(ODD_DELIVERY_KEY),
    )
    assert host.wait(iid)["runtimeStatus"] == "Completed"
    yield iid
    assert requests.delete(f"{host.durable}/instances/{iid}", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("path", "run_id"),
    [
        ("api-failed-1%3Fx", "api-failed-1?x"),  # as it is in the SDK's URL, it would read api-failed-1
        ("api-failed-1%23x", "api-failed-1#x"),
        ("%3F", "?"),  # ... it would read the list of every instance
        ("%2E", "."),
        ("%2E%2E", ".."),
        ("api-failed-1%3Aprepare_dataset", "api-failed-1:prepare_dataset"),  # a wait step's id
        (delivery_instance_id(ODD_DELIVERY_KEY), delivery_instance_id(ODD_DELIVERY_KEY)),
    ],
    ids=["run?x", "run#x", "?", ".", "..", "run:step", "a bot delivery"],
)
def test_an_id_that_names_no_run_is_not_found_for_the_summary_and_the_cancel(
    host, failed_run, finished_delivery, path, run_id
):
    summary = requests.get(f"{host.url}/api/runs/{path}", timeout=30)
    cancel = requests.post(f"{host.url}/api/runs/{path}/cancel", timeout=30)

    assert (summary.status_code, summary.json()) == (404, {"error": f"no run with id '{run_id}'"})
    assert (cancel.status_code, cancel.json()) == (404, {"error": f"no run with id '{run_id}'"})
    assert host.status(finished_delivery).json()["runtimeStatus"] == "Completed"


def test_every_run_is_listed_however_many_pages_the_instances_take(host, tmp_path):
    """The Durable SDK's get_status_all reads the host's first page only (100 instances on Azure; 2 on
    this host): the runs API and the bot's /status must page through to find every run."""
    for i in range(3):  # instances that are not runs, made before the run (this host lists oldest first)
        other = host.start_orchestration("bot_proactive_answer", {"pending_key": f"t/pending/c/{i}"})
        assert host.wait(other)["runtimeStatus"] == "Completed"
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    run_id = "api-listed-1"
    time.sleep(1.1)  # creation times have whole seconds: be the newest run after the earlier tests' ones
    body = {"preset": "smoke", "run_id": run_id, "dataset": {"hub_id": None, "files": [str(bad)]}}
    assert post_finetune(host, json=body).status_code == 202
    assert wait_status(host, run_id) == "Failed"  # at prepare_dataset: nothing trains

    assert run_id in run_ids(host)
    client = df.DurableOrchestrationClient(client_binding(host.url, "TestHubName"))
    latest = asyncio.run(DurableRunStatus(client).latest_run())
    assert latest is not None and (latest.run_id, latest.status) == (run_id, "Failed")


def test_the_hourly_purge_removes_finished_answer_deliveries_and_nothing_else(host):
    deliveries = [
        host.start_orchestration(
            "bot_proactive_answer", {"pending_key": key}, instance_id=delivery_instance_id(key)
        )
        for key in (f"t/pending/purge/{i}" for i in range(5))  # more than a page: the purge asks again
    ]
    for iid in deliveries:
        assert host.wait(iid)["runtimeStatus"] == "Completed"
    runs = run_ids(host)
    assert runs  # the earlier tests' runs, which must stay

    assert requests.post(f"{host.url}/admin/functions/bot_purge_deliveries", timeout=30).status_code == 202
    wait_for(
        lambda: "bot deliveries purged=5 kept_hours=0.0" in host.log_text(),
        timeout=30,
        what="the purge's log line",
    )
    assert [host.status(iid).status_code for iid in deliveries] == [404] * 5
    assert run_ids(host) == runs
