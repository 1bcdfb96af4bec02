"""The Azure pipeline is idempotent and survives what real Azure does: re-runs, a host killed mid-run,
throttling, server errors and timeouts on every call."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests

from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.faults import FirstCallFails
from tests.fake_arm.hosting import (
    ONE_OF_EACH,
    RESOURCE_GROUP,
    WORKSPACE,
    AzureHost,
    finished,
    one_of_each,
    resources,
    run_body,
)
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow

pytest_plugins = ["tests.fake_arm.fixtures"]


def creates(fake: FakeAzure, since: int = 0) -> list[str]:
    return [
        f"{e.method} {e.route}"
        for e in fake.server.exchanges[since:]
        if e.method in ("PUT", "PATCH") and e.status < 300
    ]


def job_running(s: dict) -> bool:
    """The fine-tune wait has seen the job Running (or the run is already over)."""
    live = next(x for x in s["steps"] if x["name"] == "wait_for_finetune").get("live") or {}
    return live.get("status") == "Running" or finished(s)


def test_running_the_same_run_id_twice_creates_nothing_new(azure_host: AzureHost, fake_azure: FakeAzure):
    first = azure_host.run_to_end(run_body("az-twice"))
    assert first["status"] == "Completed", json.dumps(first.get("error"))
    before = len(fake_azure.server.exchanges)

    again = azure_host.run_to_end(run_body("az-twice"))
    assert again["status"] == "Completed", json.dumps(again.get("error"))
    assert one_of_each(fake_azure) == ONE_OF_EACH
    # The second run finds everything. The only writes: the role assignments' idempotent PUTs
    # (deterministic names: Azure answers with the existing assignment) and the connection's upsert
    # (it carries the endpoint's current key, which may have been regenerated).
    assert set(creates(fake_azure, before)) == {"PUT role-assignment", "PUT connection"}
    assert again["model"] == first["model"] and again["endpoint"]["name"] == first["endpoint"]["name"]


def test_a_host_killed_while_the_job_runs_resumes_with_one_of_each_resource(
    fake_azure: FakeAzure, tmp_path: Path
):
    running = ("Running",) * 12  # a job long enough to kill the host while it runs
    fake_azure.config.job_statuses = (
        "NotStarted",
        "Queued",
        "Preparing",
        *running,
        "Finalizing",
        "Completed",
    )
    host = AzureHost(fake_azure, tmp_path)
    host.start()
    try:
        run_id = host.start_run(run_body("az-killed"))

        assert not finished(host.wait_summary(run_id, job_running))
        host.kill()
        host.start()
        done = host.wait_summary(run_id, finished)
    finally:
        host.stop()
    assert done["status"] == "Completed", json.dumps(done.get("error"))
    assert one_of_each(fake_azure) == ONE_OF_EACH
    assert len([e for e in fake_azure.server.exchanges if e.route == "job" and e.method == "PUT"]) == 1


def test_throttling_server_errors_and_timeouts_on_every_call_are_survived(
    fake_azure: FakeAzure, tmp_path: Path
):
    faults = FirstCallFails()
    fake_azure.server.fault_plan = faults
    fake_azure.server.stall_seconds = 3.0  # the app's AZURE_HTTP_TIMEOUT_SECONDS is 3 in these tests
    host = AzureHost(fake_azure, tmp_path)
    host.env["AZURE_HTTP_TIMEOUT_SECONDS"] = "2"
    host.start()
    try:
        done = host.run_to_end(run_body("az-faults"), timeout=420)
    finally:
        host.stop()
    assert done["status"] == "Completed", json.dumps(done.get("error"))
    assert one_of_each(fake_azure) == ONE_OF_EACH
    kinds = {kind for _, _, kind in faults.injected}
    assert kinds == {"429", "503", "stall"}
    faulted_routes = {route for _, route, _ in faults.injected}
    assert {
        "token",
        "job",
        "online-endpoint",
        "online-deployment",
        "role-assignment",
        "scoring",
    } <= faulted_routes
    # A stalled PUT had already been applied when the client retried it: still exactly one job.
    assert (
        len(
            [
                e
                for e in fake_azure.server.exchanges
                if e.route == "job" and e.method == "PUT" and e.status < 300
            ]
        )
        == 1
    )


def test_canceling_a_run_cancels_its_azure_ml_job_and_its_wait(fake_azure: FakeAzure, tmp_path: Path):
    fake_azure.config.job_statuses = ("NotStarted", "Queued", *("Running",) * 400, "Completed")
    host = AzureHost(fake_azure, tmp_path)
    host.start()
    try:
        run_id = host.start_run(run_body("az-cancel"))

        assert not finished(host.wait_summary(run_id, job_running))
        answer = requests.post(f"{host.url}/api/runs/{run_id}/cancel", timeout=120)
        assert answer.status_code == 202, answer.text
        done = host.wait_summary(run_id, finished)
        waits = requests.get(
            f"{host.url}/runtime/webhooks/durabletask/instances/{run_id}:wait_for_finetune", timeout=30
        ).json()
    finally:
        host.stop()
    assert done["status"] == "Terminated" and answer.json()["job"]["status"] in (
        "CancelRequested",
        "Canceled",
    )
    cancels = [e for e in fake_azure.server.exchanges if e.route == "job-cancel"]
    assert len(cancels) == 1 and cancels[0].path.split("/jobs/")[1].startswith(done["job"]["name"])
    (job,) = fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces/jobs")
    assert job["properties"]["status"] in ("CancelRequested", "Canceled")
    assert waits["runtimeStatus"] == "Terminated"  # the monitor polling the job stopped too
    # what the job is now, not what the monitor's last poll before the cancel said ("Running")
    assert done["job"]["status"] in ("CancelRequested", "Canceled")


def test_a_run_canceled_while_its_job_is_being_submitted_cancels_that_job_too(
    fake_azure: FakeAzure, tmp_path: Path
):
    fake_azure.config.job_statuses = ("NotStarted", "Queued", *("Running",) * 400, "Completed")
    submitted = fake_azure.server.gates[("PUT", "job")] = threading.Event()  # still under way at the cancel
    host = AzureHost(fake_azure, tmp_path)
    host.start()
    try:
        run_id = host.start_run(run_body("az-cancel-submit"))
        assert fake_azure.server.at_gate.wait(timeout=240), host.summary(run_id)
        answer = requests.post(f"{host.url}/api/runs/{run_id}/cancel", timeout=120)
        assert answer.status_code == 202, answer.text
        assert answer.json()["job"]["status"] == "NotSubmitted"  # not there yet
        submitted.set()
        wait_for(
            lambda: "was canceled meanwhile" in host.log_text(), timeout=120, what="the submission's cancel"
        )
    finally:
        host.stop()
    (job,) = fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces/jobs")
    assert job["properties"]["status"] in ("CancelRequested", "Canceled")


def test_provisioning_longer_than_a_steps_wait_is_waited_on_with_durable_timers(
    fake_azure: FakeAzure, tmp_path: Path
):
    host = AzureHost(fake_azure, tmp_path)
    host.env["AZURE_SETUP_WAIT_SECONDS"] = "0.01"  # every provisioning read hands back to the orchestrator
    host.start()
    try:
        done = host.run_to_end(run_body("az-handback"), timeout=420)
        history = requests.get(
            f"{host.url}/runtime/webhooks/durabletask/instances/az-handback",
            params={"showHistory": "true"},
            timeout=30,
        ).json()["historyEvents"]
    finally:
        host.stop()
    assert done["status"] == "Completed", json.dumps(done.get("error"))
    waited = {s["name"]: s["checks"] for s in done["steps"] if s.get("checks")}
    assert {"workspace", "endpoint"} <= set(waited), waited  # they handed back and were called again
    assert any(e["EventType"] == "TimerCreated" for e in history)
    assert one_of_each(fake_azure) == ONE_OF_EACH  # calling a step again never made a second resource
    assert "AZURE_SETUP_WAIT_SECONDS" in host.log_text()  # the hand-back is logged, not silent
    # What a step created before handing back is this run's, though the call that finished it found it.
    created = {(r["kind"], r["name"]) for r in done["created_resources"]}
    assert {
        ("resource_group", RESOURCE_GROUP),
        ("workspace", WORKSPACE),
        ("workspace", f"{WORKSPACE}-hub"),  # the Foundry hub + project the flow is published to
        ("compute", "gpu-a100"),
        ("endpoint", done["endpoint"]["name"]),
    } <= created, sorted(created)
    assert [kind for kind, _ in created].count("container_registry") == 1  # the workspace needed one


def test_a_failed_run_cleans_up_waiting_on_durable_timers_for_the_endpoint_to_be_deleted(
    fake_azure: FakeAzure, tmp_path: Path
):
    fake_azure.config.lro_polls = 6  # deleting the endpoint outlasts the step's wait below
    host = AzureHost(fake_azure, tmp_path)
    host.env["AZURE_SETUP_WAIT_SECONDS"] = "0.01"
    host.start()
    try:
        body = run_body("az-cleanup", cleanup_on_failure=True, promptflow={"flow": "tests/apps/broken_flow"})
        done = host.run_to_end(body, timeout=420)
    finally:
        host.stop()
    assert done["status"] == "Failed" and done["error"]["step"] == "flow_smoke", json.dumps(done["error"])
    assert "cannot load the flow" in done["error"]["message"]  # the run's own failure, not the cleanup's
    endpoint = done["endpoint"]["name"]
    assert sorted(done["cleanup"]["actions"]) == [
        f"deleted connection {done['connection']['name']}",
        f"deleted endpoint {endpoint}",
    ]
    assert "error" not in done["cleanup"]
    assert resources(fake_azure, "Microsoft.MachineLearningServices/workspaces/onlineEndpoints") == []
    assert f"cleanup: endpoint {endpoint} is still under way" in host.log_text()  # it did hand back
