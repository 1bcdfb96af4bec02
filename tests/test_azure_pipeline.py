"""The whole pipeline on the devhost with PHI3_BACKEND=azure, against the fake Azure (real SDK clients,
real HTTPS, Entra ID tokens from the fake, blobs in Azurite), in both fine-tuning modes.

The request transcript of each run is compared with the reviewed copy in tests/transcripts/
(regenerate with ``UPDATE_TRANSCRIPTS=1`` and read the diff), and its key facts are asserted here.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.hosting import (
    ONE_OF_EACH,
    RESOURCE_GROUP,
    WORKSPACE,
    AzureHost,
    one_of_each,
    resources,
    run_body,
)
from tests.fake_arm.server import Exchange
from tests.fake_arm.transcript import Placeholders, render

pytestmark = pytest.mark.slow
TRANSCRIPTS = Path(__file__).parent / "transcripts"

pytest_plugins = ["tests.fake_arm.fixtures"]


def placeholders(fake: FakeAzure) -> Placeholders:
    """Names derived from the fixed run ids stay as they are (they are stable and readable)."""
    fixed = {fake.config.subscription_id: "{sub}", RESOURCE_GROUP: "{rg}", WORKSPACE: "{ws}"}
    kinds = (
        ("Microsoft.ContainerRegistry/registries", "{acr}"),
        ("Microsoft.Storage/storageAccounts", "{storage}"),
    )
    for kind, name in kinds:
        for resource in resources(fake, kind):
            fixed[resource.rsplit("/", 1)[-1]] = name
    return Placeholders(fixed)


def check_transcript(name: str, text: str) -> None:
    path = TRANSCRIPTS / name
    if os.environ.get("UPDATE_TRANSCRIPTS") == "1" or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"the requests changed; review `UPDATE_TRANSCRIPTS=1` output of {path}"


def provisioning(e: Exchange) -> str | None:
    return ((e.response_body or {}).get("properties") or {}).get("provisioningState")


def first(exchanges: list[Exchange], method: str, route: str, where=lambda e: True) -> int:
    return next(i for i, e in enumerate(exchanges) if e.method == method and e.route == route and where(e))


def test_managed_compute_run_completes_and_makes_one_of_each_resource(
    azure_host: AzureHost, fake_azure: FakeAzure
):
    done = azure_host.run_to_end(run_body("az-managed"))
    assert done["status"] == "Completed", json.dumps(done.get("error"))
    steps = {s["name"]: s["status"] for s in done["steps"]}
    # Comparing with the base model needs a second GPU deployment: off unless AZURE_EVALUATE_BASE_MODEL.
    skipped = {"base_deployment", "wait_for_base_deployment", "remove_base_deployment"}
    assert {n for n, status in steps.items() if status == "skipped"} == skipped, steps
    assert {status for n, status in steps.items() if n not in skipped} == {"succeeded"}, steps
    assert done["endpoint"]["scoring_uri"].startswith(fake_azure.url)
    assert one_of_each(fake_azure) == ONE_OF_EACH

    exchanges = list(fake_azure.server.exchanges)
    check_transcript("azure_managed_compute.txt", render(exchanges, placeholders(fake_azure)))
    # Nothing is created before the preflight (registry model + component, VM sizes, quota) passed.
    creates = [i for i, e in enumerate(exchanges) if e.method in ("PUT", "PATCH", "DELETE")]
    assert min(creates) > first(exchanges, "GET", "quota-usages")
    # Role assignments: deterministic GUID names, managed identities as ServicePrincipal, retried past
    # the fake's PrincipalNotFound (replication lag) to exactly three.
    roles = [e for e in exchanges if e.route == "role-assignment" and e.method == "PUT"]
    assert {e.request_body["properties"]["principalType"] for e in roles} == {"ServicePrincipal"}
    assert [e.status for e in roles].count(400) == 1 and [e.status for e in roles].count(201) == 3
    # The deployment is PUT after its endpoint reported Succeeded; traffic only after the deployment did.
    endpoint_ready = first(exchanges, "GET", "online-endpoint", lambda e: provisioning(e) == "Succeeded")
    assert first(exchanges, "PUT", "online-deployment") > endpoint_ready
    deployment_ready = first(exchanges, "GET", "online-deployment", lambda e: provisioning(e) == "Succeeded")
    traffic_put = first(
        exchanges,
        "PUT",
        "online-endpoint",
        lambda e: e.request_body["properties"].get("traffic") == {"blue": 100},
    )
    assert traffic_put > deployment_ready
    # Every ARM call names its api-version (the data planes — scoring, Azure Files, the flow service —
    # have none); the scoring calls carry the key only in their header.
    data_planes = {
        "token",
        "openid-configuration",
        "scoring",
        "file-share",
        "flow-index",
        "flow-create",
        "flow",
    }
    assert all(e.api_version for e in exchanges if e.route not in data_planes)
    # The Prompt flow connections (the workspace's, and the Foundry project's the flow is published
    # to) carry the endpoint's scoring URI and its current primary key.
    primary = next(iter(fake_azure.endpoint_keys.values()))["primaryKey"]
    connections = [e for e in exchanges if e.route == "connection" and e.method == "PUT"]
    assert {e.path.split("/workspaces/")[1].split("/")[0] for e in connections} == {
        WORKSPACE,
        f"{WORKSPACE}-project",
    }
    for put in connections:
        props = put.request_body["properties"]
        assert props["metadata"]["endpoint"] == done["endpoint"]["scoring_uri"]
        assert props["credentials"] == {"keys": {"key": primary}}
    assert (
        done["published_flow"]["project"] == f"{WORKSPACE}-project" and done["published_flow"]["portal_url"]
    )
    assert done["evaluation"]["logged_to"].startswith("not logged to the workspace's MLflow")
    keys = [v for keys in fake_azure.endpoint_keys.values() for v in keys.values()]
    assert keys and not any(k in azure_host.log_text() or k in json.dumps(done) for k in keys)
    for path in azure_host.state_dir.rglob("*"):  # Durable history and custom status included
        if path.is_file():
            assert not any(k.encode() in path.read_bytes() for k in keys), f"a key leaked into {path}"
    # The scoring URI is read where it is used (the summary above read it from Azure just now).
    for path in azure_host.state_dir.rglob("*"):
        if path.is_file():
            assert done["endpoint"]["scoring_uri"].encode() not in path.read_bytes(), path
    # Azure's front end drops an HTTP answer after 230 s: with that read stalled, the summary comes after
    # HTTP_BACKEND_WAIT_SECONDS (8 s here) without the URI, saying why.
    gate = fake_azure.server.gates[("GET", "online-endpoint")] = threading.Event()
    try:
        stalled = azure_host.summary("az-managed")
    finally:
        gate.set()
        del fake_azure.server.gates[("GET", "online-endpoint")]
    assert stalled["status"] == "Completed" and "scoring_uri" not in stalled["endpoint"]
    assert stalled["endpoint"]["error"] == (
        "the azure backend did not answer for the endpoint within 8 s (HTTP_BACKEND_WAIT_SECONDS); ask again"
    )
    # A read that fails for good after azure-core's retries (an activity would be retried) is said too.
    fake_azure.server.fault_plan = lambda req, route: (
        "503" if (req.method, route) == ("GET", "online-endpoint") else None
    )
    try:
        unavailable = azure_host.summary("az-managed")
    finally:
        fake_azure.server.fault_plan = None
    assert unavailable["endpoint"]["error"].startswith("the azure backend failed for the endpoint: ")
    assert "(ServiceUnavailable) The service is temporarily unavailable" in unavailable["endpoint"]["error"]


def test_serverless_run_fine_tunes_and_deploys_in_east_us_2(fake_azure: FakeAzure, tmp_path: Path):
    host = AzureHost(fake_azure, tmp_path, location="eastus2")
    host.start()
    try:
        done = host.run_to_end(run_body("az-serverless", mode="serverless"))
    finally:
        host.stop()
    assert done["status"] == "Completed", json.dumps(done.get("error"))
    steps = {s["name"]: s["status"] for s in done["steps"]}
    assert steps["identity"] == steps["role_assignments"] == steps["quota"] == "skipped"
    upto_traffic = [s["status"] for s in done["steps"]][
        : [s["name"] for s in done["steps"]].index("traffic") + 1
    ]
    assert set(upto_traffic) <= {"succeeded", "skipped"}, steps
    assert one_of_each(fake_azure, serverless=True) == {
        "resource groups": 1,
        "workspaces": 2,  # the hub and its project (the run's workspace, where the flow is published too)
        "storage accounts": 1,
        "flows": 1,
        "jobs": 1,
        "models": 1,
        "data versions": 2,
        "serverless endpoints": 1,
    }
    exchanges = list(fake_azure.server.exchanges)
    check_transcript("azure_serverless.txt", render(exchanges, placeholders(fake_azure)))
    job = next(e for e in exchanges if e.method == "PUT" and e.route == "job").request_body["properties"]
    assert job["jobType"] == "FineTuning" and not job.get("computeId")
    assert job["fineTuningDetails"]["validationData"]["uri"]
    # Serverless: the workspace already is the Foundry project; the flow goes there, no second project.
    assert done["published_flow"]["project"] == WORKSPACE
    assert done["status"] == "Completed", json.dumps(done.get("error"))
