"""Azure ML workspaces (made by azure-ai-ml's ARM template), quota and VM sizes, compute clusters.

Rules enforced: a workspace's storage, key vault, app insights and (only when one is passed)
container registry come from the creating template, a Foundry project lives on its hub's; a
compute cluster needs a VM size offered in the region; a cluster can be put into ``Failed`` by the
test (``fail_compute``) as Azure sometimes does.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from .arm import RG, SUB, check_group, check_region, check_subscription
from .server import ArmError, Request, Response, not_found
from .store import arm_body, now_iso

if TYPE_CHECKING:
    from .azure import FakeAzure

AML = r"/providers/Microsoft\.MachineLearningServices"
WS = RG + AML + r"/workspaces/(?P<ws>[^/]+)"


def register(fake: FakeAzure) -> None:
    s = fake.server
    s.add("workspace", "GET", WS, lambda r, m: Response(200, workspace(fake, m)))
    s.add("workspace", "PATCH", WS, lambda r, m: _patch_workspace(fake, r, m))
    loc = SUB + AML + r"/locations/(?P<loc>[^/]+)"
    s.add("quota-usages", "GET", loc + r"/usages", lambda r, m: _usages(fake, m))
    s.add("vm-sizes", "GET", loc + r"/vmSizes", lambda r, m: _sizes(fake, m))
    compute = WS + r"/computes/(?P<name>[^/]+)"
    s.add("compute", "GET", compute, lambda r, m: get_child(fake, r, m, "compute"))
    s.add("compute", "PUT", compute, lambda r, m: _put_compute(fake, r, m))
    s.add("compute", "DELETE", compute, lambda r, m: _delete_compute(fake, r, m))


def workspace(fake: FakeAzure, m: re.Match) -> dict:
    check_group(fake, m["sub"], m["rg"])
    return fake.store.get(workspace_id(m), "workspace")


def workspace_id(m: re.Match) -> str:
    return workspace_resource_id(m["sub"], m["rg"], m["ws"])


def workspace_resource_id(sub: str, rg: str, name: str) -> str:
    group = f"/subscriptions/{sub}/resourceGroups/{rg}"
    return f"{group}/providers/Microsoft.MachineLearningServices/workspaces/{name}"


def asset_versions(fake: FakeAzure, req: Request, container_id: str) -> Response:
    """An asset's versions, newest first, honouring ``$top`` (data and models alike)."""
    versions = fake.store.children(container_id, "versions")
    versions.sort(key=lambda v: v["systemData"]["createdAt"], reverse=True)
    top = req.query.get("$top")
    return Response(200, {"value": versions[: int(top)] if top else versions})


def new_asset_version(fake: FakeAzure, resource_id: str, label: str) -> None:
    """Asset versions are immutable: a second PUT of one is a 409."""
    if fake.store.find(resource_id) is not None:
        name, version = resource_id.split("/")[-3], resource_id.split("/")[-1]
        raise ArmError(
            409, "UserError", f"{label} version {name}:{version} already exists; versions are immutable."
        )


def get_child(fake: FakeAzure, req: Request, m: re.Match, kind: str) -> Response:
    workspace(fake, m)
    return Response(200, fake.store.get(req.path, kind))


# workspace creation from azure-ai-ml's ARM template --------------------------------------------
def _param(params: dict, name: str, default=None):
    value = (params.get(name) or {}).get("value")
    return default if value in (None, "") else value


def create_workspace_from_template(fake: FakeAzure, sub: str, rg: str, params: dict) -> None:
    name = _param(params, "workspaceName")
    region = check_region(fake, _param(params, "location"), "workspaces")
    store = fake.store

    def dependent(option: str, provider: str, name_param: str, rg_param: str, extra: dict) -> str | None:
        if _param(params, option, "new") == "none":
            return None
        dep_name = _param(params, name_param)
        dep_rg = _param(params, rg_param, rg)
        rid = f"/subscriptions/{sub}/resourceGroups/{dep_rg}/providers/{provider}/{dep_name}"
        if _param(params, option, "new") == "existing":
            if store.find(rid) is None:
                raise ArmError(400, "InvalidTemplateDeployment", f"existing resource {rid} not found")
            return rid
        store.put(
            rid,
            arm_body(
                rid, provider, {}, location=region, properties={"provisioningState": "Succeeded", **extra}
            ),
        )
        return rid

    kind = _param(params, "kind", "Default")
    if kind.lower() == "project":  # a Foundry project lives on its hub's storage, key vault and registry
        hub = store.get(_param(params, "workspace_hub", ""), "hub workspace")
        if hub.get("kind", "").lower() != "hub":
            raise ArmError(400, "InvalidTemplateDeployment", f"{hub['id']} is not a hub")
        inherited = {
            k: hub["properties"].get(k)
            for k in ("storageAccount", "keyVault", "applicationInsights", "containerRegistry")
        }
        _put_workspace(fake, sub, rg, name, region, kind, params, inherited, hub_id=hub["id"])
        return
    storage = dependent(
        "storageAccountOption",
        "Microsoft.Storage/storageAccounts",
        "storageAccountName",
        "storageAccountResourceGroupName",
        {"primaryEndpoints": {"blob": fake.blob.account_url + "/" if fake.blob else "https://fake.blob/"}},
    )
    key_vault = dependent(
        "keyVaultOption", "Microsoft.KeyVault/vaults", "keyVaultName", "keyVaultResourceGroupName", {}
    )
    insights = dependent(
        "applicationInsightsOption",
        "Microsoft.Insights/components",
        "applicationInsightsName",
        "applicationInsightsResourceGroupName",
        {},
    )
    registry = None
    if _param(params, "containerRegistryOption", "none") == "existing":
        registry = dependent(
            "containerRegistryOption",
            "Microsoft.ContainerRegistry/registries",
            "containerRegistryName",
            "containerRegistryResourceGroupName",
            {},
        )
    linked = {
        "storageAccount": storage,
        "keyVault": key_vault,
        "applicationInsights": insights,
        "containerRegistry": registry,
    }
    _put_workspace(fake, sub, rg, name, region, kind, params, linked)


def _put_workspace(
    fake: FakeAzure,
    sub: str,
    rg: str,
    name: str,
    region: str,
    kind: str,
    params: dict,
    linked: dict,
    hub_id: str | None = None,
) -> None:
    store = fake.store
    ws_guid = str(uuid.uuid4())
    rid = workspace_resource_id(sub, rg, name)
    tags = _param(params, "tagValues", {}) or {}
    body = arm_body(
        rid,
        "Microsoft.MachineLearningServices/workspaces",
        {},
        location=region,
        kind=kind,
        tags=tags,
        sku={"name": "Basic", "tier": "Basic"},
        identity={"type": "SystemAssigned", "principalId": str(uuid.uuid4()), "tenantId": fake.app.tenant_id},
        systemData={"createdAt": now_iso(), "createdBy": fake.app.client_id, "createdByType": "Application"},
        properties={
            "friendlyName": _param(params, "friendlyName", name),
            "description": _param(params, "description", ""),
            **linked,
            "hubResourceId": hub_id,
            "workspaceId": ws_guid,
            "provisioningState": "Succeeded",
            "discoveryUrl": f"{fake.url}/discovery",
            "mlFlowTrackingUri": f"azureml://{region}.api.azureml.ms/mlflow/v1.0{rid}",
            "publicNetworkAccess": "Enabled",
        },
    )
    store.put(rid, body)
    container = f"azureml-blobstore-{ws_guid}"
    if fake.blob:
        fake.blob.create_container(container)
    store.put(
        f"{rid}/datastores/workspaceblobstore",
        arm_body(
            f"{rid}/datastores/workspaceblobstore",
            "Microsoft.MachineLearningServices/workspaces/datastores",
            {},
            properties={
                "datastoreType": "AzureBlob",
                "accountName": fake.blob.account
                if fake.blob
                else linked["storageAccount"].rsplit("/", 1)[-1],
                "containerName": container,
                "endpoint": "core.fake-azure.test",
                "protocol": "https",
                "isDefault": True,
                "credentials": {"credentialsType": "AccountKey"},
                "serviceDataAccessAuthIdentity": "None",
            },
        ),
    )
    from .files import provision_working_directory

    provision_working_directory(fake, rid, ws_guid)
    fake.record(f"workspace {name} created by template")


def _patch_workspace(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    body = workspace(fake, m)
    update = req.json()
    props = update.get("properties") or {}
    registry = props.get("containerRegistry")
    if registry:
        if fake.store.find(registry) is None:
            raise ArmError(400, "BadRequest", f"container registry {registry} not found")
        if body["properties"].get("containerRegistry") not in (None, registry):
            raise ArmError(400, "BadRequest", "the workspace's container registry cannot be changed once set")
        body["properties"]["containerRegistry"] = registry
    for field in ("description", "friendlyName", "publicNetworkAccess"):
        if field in props:
            body["properties"][field] = props[field]
    if "tags" in update:
        body["tags"] = update["tags"] or {}
    body["properties"]["provisioningState"] = "Updating"

    def finish() -> None:
        body["properties"]["provisioningState"] = "Succeeded"

    op = fake.store.start(body["id"], "update", fake.config.lro_polls, finish)
    return fake.accepted(op, 202, body, api_version=req.api_version)


# quota and VM sizes ----------------------------------------------------------------------------
def _family_label(family: str) -> str:
    from .azure import FAMILY_NAMES

    return FAMILY_NAMES.get(family, family)


def _usages(fake: FakeAzure, m: re.Match) -> Response:
    check_subscription(fake, m["sub"])
    region = check_region(fake, m["loc"], "usages")
    cfg = fake.config
    rows = []
    used, limit = cfg.quota.get(("total", region), (0, cfg.default_total_limit))
    rows.append(
        {
            "id": f"/subscriptions/{m['sub']}/usages",
            "type": "Microsoft.MachineLearningServices/dedicatedCores/usages",
            "currentValue": used,
            "limit": limit,
            "unit": "Count",
            "name": {
                "value": "Total Cluster Dedicated Regional vCPUs",
                "localizedValue": "Total Cluster Dedicated Regional vCPUs",
            },
        }
    )
    for family in sorted({s.family for s in cfg.sizes}):
        used, limit = cfg.quota.get((family, region), (0, cfg.default_family_limit))
        label = f"{_family_label(family)} Cluster Dedicated vCPUs"
        rows.append(
            {
                "id": f"/subscriptions/{m['sub']}/usages/{label.replace(' ', '_')}",
                "type": "Microsoft.MachineLearningServices/vmFamily/usages",
                "currentValue": used,
                "limit": limit,
                "unit": "Count",
                "name": {"value": label, "localizedValue": label},
            }
        )
    return Response(200, {"value": rows})


def _sizes(fake: FakeAzure, m: re.Match) -> Response:
    check_subscription(fake, m["sub"])
    check_region(fake, m["loc"], "vmSizes")
    return Response(
        200,
        {
            "value": [
                {
                    "name": s.name,
                    "family": s.family,
                    "vCPUs": s.vcpus,
                    "gpus": s.gpus,
                    "memoryGB": s.memory_gb,
                    "osVhdSizeMB": 1047552,
                    "maxResourceVolumeMB": 65536,
                    "lowPriorityCapable": True,
                    "premiumIO": True,
                    "supportedComputeTypes": ["AmlCompute", "ComputeInstance"],
                }
                for s in fake.config.sizes
            ]
        },
    )


def size(fake: FakeAzure, name: str):
    return next((s for s in fake.config.sizes if s.name.lower() == (name or "").lower()), None)


# compute clusters -------------------------------------------------------------------------------
def _put_compute(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    rid = f"{ws['id']}/computes/{m['name']}"
    body = req.json()
    props = body.get("properties") or {}
    inner = props.get("properties") or {}
    if props.get("computeType") != "AmlCompute":
        raise ArmError(
            400, "BadArgument", f"computeType '{props.get('computeType')}' is not served by the fake"
        )
    vm = size(fake, inner.get("vmSize"))
    if vm is None:
        raise ArmError(
            400, "BadArgument", f"VM size '{inner.get('vmSize')}' is not available in {ws['location']}."
        )
    scale = inner.get("scaleSettings") or {}
    if scale.get("minNodeCount", 0) > scale.get("maxNodeCount", 1):
        raise ArmError(400, "BadArgument", "minNodeCount cannot exceed maxNodeCount")
    existing = fake.store.find(rid)
    if existing and existing["properties"]["provisioningState"] in ("Creating", "Deleting"):
        raise ArmError(
            409, "Conflict", f"compute {m['name']} is {existing['properties']['provisioningState']}"
        )
    compute = arm_body(
        rid,
        "Microsoft.MachineLearningServices/workspaces/computes",
        {},
        location=ws["location"],
        properties={
            **props,
            "provisioningState": "Creating",
            "createdOn": now_iso(),
            "provisioningErrors": None,
            "properties": {**inner, "allocationState": "Steady", "currentNodeCount": 0, "targetNodeCount": 0},
        },
    )
    fake.store.put(rid, compute)
    fail = m["name"] in fake.fail_compute

    def finish() -> None:
        if fail:
            fake.fail_compute.discard(m["name"])
            compute["properties"]["provisioningState"] = "Failed"
            compute["properties"]["provisioningErrors"] = [
                {"error": {"code": "AllocationFailed", "message": "injected"}}
            ]
        else:
            compute["properties"]["provisioningState"] = "Succeeded"

    op = fake.store.start(rid, "create", fake.config.lro_polls, finish)
    return fake.accepted(op, 201 if not existing else 200, compute, api_version=req.api_version)


def _delete_compute(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    rid = f"{ws['id']}/computes/{m['name']}"
    compute = fake.store.find(rid)
    if compute is None:
        raise not_found("compute", m["name"])
    compute["properties"]["provisioningState"] = "Deleting"
    op = fake.store.start(rid, "delete", fake.config.lro_polls, lambda: fake.store.remove(rid))
    return fake.accepted(op, 202, None, api_version=req.api_version)
