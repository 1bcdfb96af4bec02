"""The fake Azure enforces the rules the app could get wrong — proven with raw requests through the app's
own authenticated ARM pipeline, so a mistake in the app would meet the same answer Azure gives."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import requests
from azure.core.rest import HttpRequest

from backends.azure.clients import AzureClients, AzureSession, AzureTarget
from tests.fake_arm import seed
from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.hosting import RESOURCE_GROUP, WORKSPACE
from tests.fake_arm.registry import component_asset_id

CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"

pytest_plugins = ["tests.fake_arm.fixtures"]


@pytest.fixture
def arm(azure_settings, fake_azure: FakeAzure):
    """Send one request through the app's ARM client; returns (status, json, headers)."""
    workspace_id = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    clients: AzureClients = AzureSession(azure_settings).clients(
        AzureTarget(fake_azure.config.subscription_id, RESOURCE_GROUP, WORKSPACE)
    )

    def send(method: str, path: str, body: dict | None = None, api: str = "2024-10-01"):
        path = path.replace("{ws}", workspace_id).replace("{rg}", clients.target.resource_group_id)
        response = clients.resources.send_request(HttpRequest(method, f"{path}?api-version={api}", json=body))
        return response.status_code, (response.json() if response.content else None), response.headers

    return send


def endpoint_body(traffic: dict | None = None) -> dict:
    return {"location": "eastus", "properties": {"authMode": "Key", "traffic": traffic or {}}}


def test_a_deployment_put_needs_its_endpoint(arm):
    status, body, _ = arm("PUT", "{ws}/onlineEndpoints/phi3ft-missing/deployments/blue", {"properties": {}})
    assert status == 404 and body["error"]["code"] == "ResourceNotFound"


def test_long_running_operations_answer_201_and_finish_after_polls(arm):
    status, body, headers = arm("PUT", "{ws}/onlineEndpoints/phi3ft-lro", endpoint_body())
    assert status == 201 and body["properties"]["provisioningState"] == "Creating"
    assert headers["Azure-AsyncOperation"] and headers["Location"]
    states = [
        arm("GET", "{ws}/onlineEndpoints/phi3ft-lro")[1]["properties"]["provisioningState"] for _ in range(2)
    ]
    assert states == ["Creating", "Succeeded"]


def test_traffic_may_only_go_to_a_deployment_that_succeeded(arm, fake_azure: FakeAzure):
    arm("PUT", "{ws}/onlineEndpoints/phi3ft-tr", endpoint_body())
    arm("GET", "{ws}/onlineEndpoints/phi3ft-tr")
    arm("GET", "{ws}/onlineEndpoints/phi3ft-tr")  # now Succeeded
    model = "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/14"
    status, body, _ = arm(
        "PUT",
        "{ws}/onlineEndpoints/phi3ft-tr/deployments/blue",
        {"properties": {"model": model, "instanceType": "Standard_NC24ads_A100_v4"}, "sku": {"capacity": 1}},
    )
    assert status == 201 and body["properties"]["provisioningState"] == "Creating"
    status, body, _ = arm("PUT", "{ws}/onlineEndpoints/phi3ft-tr", endpoint_body({"blue": 100}))
    assert status == 400 and "not Succeeded" in body["error"]["message"]


def test_endpoint_names_follow_the_rules_and_are_unique_per_region(arm, fake_azure: FakeAzure):
    status, body, _ = arm("PUT", "{ws}/onlineEndpoints/1-starts-with-a-digit", endpoint_body())
    assert status == 400 and "3-32 characters, start with a letter" in body["error"]["message"]
    other = seed.workspace(fake_azure, "rg-someone-else", "their-workspace")
    seed.online_endpoint(fake_azure, other, "phi3ft-popular", tags={}, created_at=datetime.now(UTC))
    status, body, _ = arm("PUT", "{ws}/onlineEndpoints/phi3ft-popular", endpoint_body())
    assert status == 409 and "unique per region" in body["error"]["message"]


def test_role_assignments_need_a_guid_name_and_principal_type_service_principal(arm, fake_azure: FakeAzure):
    status, identity, _ = arm(
        "PUT",
        "{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai",
        {"location": "eastus"},
        "2024-11-30",
    )
    assert status == 201
    principal = identity["properties"]["principalId"]
    sub = fake_azure.config.subscription_id
    props = {
        "roleDefinitionId": f"/subscriptions/{sub}/providers/Microsoft.Authorization/roleDefinitions/"
        + CONTRIBUTOR,
        "principalId": principal,
    }
    roles = "{rg}/providers/Microsoft.Authorization/roleAssignments"
    assert (
        arm("PUT", f"{roles}/not-a-guid", {"properties": props}, "2022-04-01")[1]["error"]["code"]
        == "InvalidRoleAssignmentId"
    )
    # The API's default principalType is User: wrong for a managed identity.
    status, body, _ = arm("PUT", f"{roles}/{uuid.uuid4()}", {"properties": props}, "2022-04-01")
    assert (status, body["error"]["code"]) == (400, "UnmatchedPrincipalType")
    service = {"properties": {**props, "principalType": "ServicePrincipal"}}
    name = uuid.uuid4()
    assert (
        arm("PUT", f"{roles}/{name}", service, "2022-04-01")[1]["error"]["code"] == "PrincipalNotFound"
    )  # replication lag
    assert arm("PUT", f"{roles}/{name}", service, "2022-04-01")[0] == 201
    status, body, _ = arm("PUT", f"{roles}/{uuid.uuid4()}", service, "2022-04-01")
    assert (status, body["error"]["code"]) == (409, "RoleAssignmentExists")


def test_model_versions_are_immutable(arm):
    body = {
        "properties": {
            "modelType": "custom_model",
            "modelUri": "azureml://datastores/workspaceblobstore/paths/m",
        }
    }
    assert arm("PUT", "{ws}/models/phi3-ft/versions/1", body)[0] == 201
    status, answer, _ = arm("PUT", "{ws}/models/phi3-ft/versions/1", body)
    assert status == 409 and "immutable" in answer["error"]["message"]


def test_a_pipeline_node_may_only_pass_inputs_its_component_declares(arm):
    node = {
        "componentId": component_asset_id(),
        "inputs": {
            "task_name": {"jobInputType": "literal", "value": "ChatCompletion"},
            "warmup_ratio": {"jobInputType": "literal", "value": "0.1"},
        },
    }
    status, body, _ = arm(
        "PUT", "{ws}/jobs/phi3ft-bad", {"properties": {"jobType": "Pipeline", "jobs": {"ft": node}}}
    )
    assert (
        status == 400
        and "['warmup_ratio'] are not declared by chat_completion_pipeline" in body["error"]["message"]
    )


def test_only_tokens_the_fake_authority_issued_open_arm(fake_azure: FakeAzure, azure_settings):
    ca = str(fake_azure.certs.ca_file)
    sub = fake_azure.config.subscription_id
    path = f"{fake_azure.url}/subscriptions/{sub}/resourceGroups/x?api-version=2025-04-01"
    answer = requests.get(path, headers={"Authorization": "Bearer made-up"}, verify=ca, timeout=10)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "InvalidAuthenticationToken"
    form = {
        "grant_type": "client_credentials",
        "client_id": fake_azure.app.client_id,
        "client_secret": "wrong",
        "scope": f"{fake_azure.url}/.default",
    }
    token = requests.post(
        f"{fake_azure.url}/{fake_azure.app.tenant_id}/oauth2/v2.0/token", data=form, verify=ca, timeout=10
    )
    assert token.status_code == 401 and token.json()["error"] == "invalid_client"


@pytest.mark.parametrize("suffix", ["7", "1728", "10000000"])
def test_transcripts_name_azure_ai_mls_random_arm_deployment_suffix_whatever_its_length(suffix):
    """azure-ai-ml names a workspace's ARM deployment ``<name>-<randint(1, 10_000_000)>``; a short draw
    must not change the transcript (it once did, about one run in a thousand). Our own online
    deployments keep their names."""
    from tests.fake_arm.transcript import Placeholders

    arm = f"PUT /subscriptions/s/providers/Microsoft.Resources/deployments/my-ws-hub-{suffix}  → 201"
    online = "GET /onlineEndpoints/e/deployments/blue-2  → 200"
    names = Placeholders({"my-ws": "{ws}"})
    assert names(arm) == "PUT /subscriptions/s/providers/Microsoft.Resources/deployments/{ws}-hub-{n}  → 201"
    assert names(online) == online
