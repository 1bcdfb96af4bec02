"""Put resources into the fake directly, as if made earlier (by a past run, or by someone else)."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime

from .azure import FakeAzure
from .store import arm_body
from .workspace import create_workspace_from_template

AML = "Microsoft.MachineLearningServices/workspaces"


def workspace(fake: FakeAzure, resource_group: str, name: str, region: str = "eastus") -> str:
    sub = fake.config.subscription_id
    rg_id = f"/subscriptions/{sub}/resourceGroups/{resource_group}"
    fake.store.put(
        rg_id,
        {
            "id": rg_id,
            "name": resource_group,
            "type": "Microsoft.Resources/resourceGroups",
            "location": region,
            "tags": {},
            "properties": {"provisioningState": "Succeeded"},
        },
    )
    registry = f"{rg_id}/providers/Microsoft.ContainerRegistry/registries/{name.replace('-', '')}acr"
    fake.store.put(
        registry,
        arm_body(
            registry,
            "Microsoft.ContainerRegistry/registries",
            {},
            location=region,
            properties={"provisioningState": "Succeeded"},
        ),
    )
    params = {
        "containerRegistryOption": {"value": "existing"},
        "containerRegistryName": {"value": registry.rsplit("/", 1)[-1]},
        "workspaceName": {"value": name},
        "location": {"value": region},
        "storageAccountName": {"value": f"{name.replace('-', '')}store"},
        "keyVaultName": {"value": f"{name}-kv"},
        "applicationInsightsName": {"value": f"{name}-ai"},
    }
    create_workspace_from_template(fake, sub, resource_group, params)
    return f"{rg_id}/providers/Microsoft.MachineLearningServices/workspaces/{name}"


def online_endpoint(
    fake: FakeAzure,
    workspace_id: str,
    name: str,
    *,
    tags: dict[str, str],
    created_at: datetime,
    deployments: dict[str, int] | None = None,
    models: dict[str, str] | None = None,
) -> str:
    """A provisioned endpoint with provisioned deployments (name -> traffic percent); ``models``: the
    model id a deployment serves (default: the catalog's Phi-3)."""
    ws = fake.store.find(workspace_id)
    assert ws is not None, workspace_id
    rid = f"{workspace_id}/onlineEndpoints/{name}"
    stamp = created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fake.store.put(
        rid,
        arm_body(
            rid,
            f"{AML}/onlineEndpoints",
            {},
            location=ws["location"],
            tags=tags,
            kind="Managed",
            identity={"type": "SystemAssigned"},
            systemData={"createdAt": stamp, "lastModifiedAt": stamp},
            properties={
                "authMode": "Key",
                "traffic": dict(deployments or {}),
                "provisioningState": "Succeeded",
                "scoringUri": f"{fake.url}/inference/{ws['location']}/{name}/score",
                "properties": {},
            },
        ),
    )
    fake.endpoint_keys[rid.lower()] = {
        "primaryKey": secrets.token_urlsafe(24),
        "secondaryKey": secrets.token_urlsafe(24),
    }
    for deployment in deployments or {}:
        did = f"{rid}/deployments/{deployment}"
        fake.store.put(
            did,
            arm_body(
                did,
                f"{AML}/onlineEndpoints/deployments",
                {},
                location=ws["location"],
                sku={"name": "Default", "capacity": 1},
                systemData={"createdAt": stamp, "lastModifiedAt": stamp},
                properties={
                    "model": (models or {}).get(
                        deployment, "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/14"
                    ),
                    "instanceType": "Standard_NC24ads_A100_v4",
                    "endpointComputeType": "Managed",
                    "provisioningState": "Succeeded",
                    "scaleSettings": {"scaleType": "Default"},
                    "properties": {},
                },
            ),
        )
    return rid


def model_version(fake: FakeAzure, workspace_id: str, name: str, version: str, tags: dict[str, str]) -> str:
    """A registered MLflow model version in the workspace; returns the id a deployment names it by."""
    rid = f"{workspace_id}/models/{name}/versions/{version}"
    fake.store.put(
        rid,
        arm_body(
            rid,
            f"{AML}/models/versions",
            {},
            properties={"modelType": "mlflow_model", "flavors": {"python_function": {}}, "tags": tags},
        ),
    )
    return rid


def requests_at(fake: FakeAzure, endpoint_id: str, *minutes: datetime) -> None:
    """Azure Monitor RequestsPerMinute points for an endpoint (one request in each minute given)."""
    series = fake.requests_per_minute.setdefault(endpoint_id.lower(), [])
    series.extend((m.strftime("%Y-%m-%dT%H:%M:00Z"), 1) for m in minutes)


def job(fake: FakeAzure, workspace_id: str, name: str) -> str:
    """A submitted pipeline job (as if by an earlier run); it progresses like any other."""
    rid = f"{workspace_id}/jobs/{name}"
    studio = f"https://ml.azure.test/runs/{name}"
    fake.store.put(
        rid,
        arm_body(
            rid,
            f"{AML}/jobs",
            {},
            properties={
                "jobType": "Pipeline",
                "status": "NotStarted",
                "jobs": {},
                "inputs": {},
                "outputs": {},
                "settings": {},
                "services": {"Studio": {"jobServiceType": "Studio", "endpoint": studio}},
            },
        ),
    )
    return rid


def role_assignment(fake: FakeAzure, scope: str, principal_id: str, role_guid: str) -> str:
    """An assignment made earlier under a name of someone else's choosing (e.g. in the portal)."""
    name = str(uuid.uuid4())
    rid = f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}"
    roles = f"/subscriptions/{fake.config.subscription_id}/providers/Microsoft.Authorization/roleDefinitions"
    definition = f"{roles}/{role_guid}"
    fake.store.put(
        rid,
        arm_body(
            rid,
            "Microsoft.Authorization/roleAssignments",
            {},
            properties={
                "roleDefinitionId": definition,
                "principalId": principal_id,
                "principalType": "ServicePrincipal",
                "scope": scope,
            },
        ),
    )
    return rid
