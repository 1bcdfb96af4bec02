"""Azure backend steps in-process against the fake: cluster recovery, job status and cancel, data assets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from backends.azure import deploy
from backends.azure.backend import AzureBackend
from backends.protocol import BackendError, RegisteredModel, ResourceRef
from pipeline.config import RunConfig
from tests.fake_arm import seed
from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.hosting import RESOURCE_GROUP, WORKSPACE
from tests.fake_arm.server import ArmError, not_found

pytest_plugins = ["tests.fake_arm.fixtures"]


def calls(fake: FakeAzure, route: str, since: int = 0) -> list[str]:
    return [
        f"{e.method} {e.status}"
        for e in fake.server.exchanges[since:]
        if e.route == route and e.method != "GET"
    ]


def test_a_cluster_that_fails_to_provision_is_deleted_and_created_again(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    fake_azure.fail_compute.add("gpu-a100")  # Azure sometimes leaves a new cluster Failed

    info = azure_backend.ensure_compute(RunConfig())

    assert info.state == "Succeeded"
    assert calls(fake_azure, "compute") == ["PUT 201", "DELETE 202", "PUT 201"]


def test_job_states_are_reported_with_azure_ml_names_as_the_job_progresses(
    azure_backend, fake_azure: FakeAzure
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    seed.job(fake_azure, ws, "phi3ft-seen")

    states = [azure_backend.get_job("phi3ft-seen") for _ in range(5)]

    assert [s.status for s in states] == ["Queued", "Preparing", "Running", "Finalizing", "Completed"]
    assert states[-1].is_terminal and not states[2].is_terminal and states[0].link.startswith("https://")


def test_cancel_asks_azure_to_cancel_and_the_job_ends_canceled(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    seed.job(fake_azure, ws, "phi3ft-cancel")
    azure_backend.get_job("phi3ft-cancel")  # Queued

    azure_backend.cancel_job("phi3ft-cancel")

    assert calls(fake_azure, "job-cancel") == ["POST 202"]
    assert azure_backend.get_job("phi3ft-cancel").status == "Canceled"


def test_data_assets_are_reused_for_the_same_content_and_versioned_for_new_content(
    azure_backend: AzureBackend, fake_azure: FakeAzure, tmp_path: Path
):
    seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    train, validation = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    validation.write_text('{"messages": [{"role": "user", "content": "yo"}]}\n')

    first = azure_backend.upload_data("run-a", train, validation)
    again = azure_backend.upload_data("run-a", train, validation)
    train.write_text(train.read_text() * 2)
    changed = azure_backend.upload_data("run-a", train, validation)

    assert again == first and first.train.version == "1"
    assert changed.train.version == "2" and changed.validation == first.validation
    assert calls(fake_azure, "data-version") == ["PUT 201", "PUT 201", "PUT 201"]
    workspace = next(iter(fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces")))
    container = f"azureml-blobstore-{workspace['properties']['workspaceId']}"
    stored = fake_azure.blob.blobs(container)  # the bytes really went to (Azurite's) Blob Storage
    assert sorted(stored.values()) == sorted(
        {train.read_bytes(), validation.read_bytes(), train.read_bytes()[: len(train.read_bytes()) // 2]}
    )


def test_a_role_granted_earlier_under_another_name_counts_as_granted(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    cfg = RunConfig()
    identity = azure_backend.ensure_identity(cfg).details["identity"]
    fake_azure.principals[identity["principal_id"]] = 0  # replicated long ago
    group = ws.split("/providers/")[0]
    seed.role_assignment(fake_azure, group, identity["principal_id"], "b24988ac-6180-42a0-ab88-20f7382dd24c")

    result = azure_backend.ensure_role_assignments(cfg)

    assert result.details["roles"] == {
        "Contributor": "existed",
        "Storage Blob Data Reader": "created",
        "AcrPull": "created",
    }
    assert [e.status for e in fake_azure.server.exchanges if e.route == "role-assignment"] == [409, 201, 201]


@dataclass
class StallFirst:
    """A fault plan: the first `method` on `route` is applied, but its answer comes too late."""

    method: str
    route: str
    stalled: list[str] = field(default_factory=list)

    def __call__(self, req, route: str) -> str | None:
        if (req.method, route) == (self.method, self.route) and not self.stalled:
            self.stalled.append(req.path)
            return "stall"
        return None


def test_a_serverless_endpoint_whose_create_answer_was_lost_is_taken_as_created(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE, region="eastus2")
    seed.model_version(fake_azure, ws, "phi3-ft-0a2c2c", "1", {})
    guid = fake_azure.store.get(ws, "workspace")["properties"]["workspaceId"]
    model = RegisteredModel(
        name="phi3-ft-0a2c2c",
        version="1",
        uri=f"azureml://locations/eastus2/workspaces/{guid}/models/phi3-ft-0a2c2c/versions/1",
    )
    fake_azure.server.fault_plan = plan = StallFirst("PUT", "serverless-endpoint")

    state = deploy.ensure_serverless_endpoint(
        azure_backend._clients(), "phi3ft-0a2c2c", {"run-id": "r"}, model, "eastus2"
    )

    assert plan.stalled  # the first PUT was applied, its answer lost; azure-core sent it again: 409
    assert calls(fake_azure, "serverless-endpoint") == ["PUT 201", "PUT 409"]
    assert state.name == "phi3ft-0a2c2c"


def test_cleanup_hands_back_a_deletion_under_way_and_finishes_it_when_called_again(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    from datetime import UTC, datetime

    from activities.steps import cleanup_run

    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    seed.online_endpoint(fake_azure, ws, "phi3ft-gone", tags={}, created_at=datetime.now(UTC))
    fake_azure.config.lro_polls = 6  # Azure deletes an endpoint in minutes; a step waits seconds
    azure_backend.wait_s = 0.01
    refs = [
        {"kind": "endpoint", "name": "phi3ft-gone"},
        {"kind": "job", "name": "phi3ft-never-submitted"},  # a failed submit: maybe made, here not
    ]

    first = cleanup_run({"created": refs}, azure_backend)
    results = [first]
    while results[-1]["pending"] and len(results) < 20:
        results.append(cleanup_run({"created": results[-1]["pending"], "under_way": True}, azure_backend))

    assert first["actions"] == [] and [r["name"] for r in first["pending"]] == ["phi3ft-gone"]
    assert results[-1] == {"actions": ["deleted endpoint phi3ft-gone"], "pending": [], "failed": []}
    assert calls(fake_azure, "online-endpoint").count("DELETE 202") >= 1
    assert fake_azure.store.find(f"{ws}/onlineEndpoints/phi3ft-gone") is None


def test_a_cluster_created_before_azure_refuses_to_show_it_is_recorded_with_the_failure(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    # The run's record must name the cluster it made, or nothing tells its cleanup it is there.
    seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    server = fake_azure.server
    created = []

    def refuse_after_the_create(request, match):
        if created:
            raise ArmError(403, "AuthorizationFailed", "The client may not read the compute.")
        raise not_found("compute", match["name"])

    server.add("compute", "GET", r".*/computes/(?P<name>[^/]+)", refuse_after_the_create)
    server.routes.insert(0, server.routes.pop())
    put = next(r for r in server.routes if r.name == "compute" and r.method == "PUT")
    original = put.handler
    server.routes[server.routes.index(put)] = replace(
        put, handler=lambda request, match: (created.append(match["name"]), original(request, match))[1]
    )

    with pytest.raises(BackendError, match="AuthorizationFailed") as failure:
        azure_backend.ensure_compute(RunConfig())

    assert created == ["gpu-a100"]
    assert failure.value.created == [ResourceRef(kind="compute", name="gpu-a100")]
