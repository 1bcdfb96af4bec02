"""Managed online endpoints and deployments, and serverless endpoints.

Rules enforced, as Azure ML does: endpoint names are 3–32 characters matching
``^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$`` and unique per region across all of Azure (409; names
in ``taken_endpoint_names`` belong to other tenants); user-assigned identities must exist; a
deployment PUT needs its endpoint (404) in a terminal state (409), a registered model and a VM
size offered in the region; traffic may only name deployments that Succeeded and must sum to 100
(or all 0); a deployment with traffic cannot be deleted; everything that provisions answers
201/202 with an operation and moves Creating → Succeeded over polls. A serverless endpoint needs
a model registered in this workspace and East US 2.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

from .server import ArmError, Request, Response, not_found
from .store import arm_body, now_iso
from .workspace import WS, size, workspace

if TYPE_CHECKING:
    from .azure import FakeAzure

NAME = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
TERMINAL = ("Succeeded", "Failed", "Canceled")
ONLINE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
SERVERLESS = "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints"


def register(fake: FakeAzure) -> None:
    s = fake.server
    ep = WS + r"/onlineEndpoints/(?P<ep>[^/]+)"
    s.add("online-endpoints", "GET", WS + r"/onlineEndpoints", lambda r, m: _list(fake, m, "onlineEndpoints"))
    s.add("online-endpoint", "GET", ep, lambda r, m: Response(200, _endpoint(fake, m)))
    s.add("online-endpoint", "PUT", ep, lambda r, m: _put_endpoint(fake, r, m))
    s.add("online-endpoint", "DELETE", ep, lambda r, m: _delete_endpoint(fake, r, m, ONLINE))
    s.add("online-endpoint-keys", "POST", ep + r"/listKeys", lambda r, m: _keys(fake, m, "onlineEndpoints"))
    dep = ep + r"/deployments/(?P<dep>[^/]+)"
    s.add("online-deployments", "GET", ep + r"/deployments", lambda r, m: _list_deployments(fake, m))
    s.add("online-deployment", "GET", dep, lambda r, m: Response(200, _deployment(fake, m)))
    s.add("online-deployment", "PUT", dep, lambda r, m: _put_deployment(fake, r, m))
    s.add("online-deployment", "DELETE", dep, lambda r, m: _delete_deployment(fake, r, m))
    s.add("online-deployment-logs", "POST", dep + r"/getLogs", lambda r, m: _logs(fake, m))
    se = WS + r"/serverlessEndpoints/(?P<ep>[^/]+)"
    s.add(
        "serverless-endpoints",
        "GET",
        WS + r"/serverlessEndpoints",
        lambda r, m: _list(fake, m, "serverlessEndpoints"),
    )
    s.add("serverless-endpoint", "GET", se, lambda r, m: Response(200, _serverless(fake, m)))
    s.add("serverless-endpoint", "PUT", se, lambda r, m: _put_serverless(fake, r, m))
    s.add("serverless-endpoint", "DELETE", se, lambda r, m: _delete_endpoint(fake, r, m, SERVERLESS))
    s.add(
        "serverless-endpoint-keys",
        "POST",
        se + r"/listKeys",
        lambda r, m: _keys(fake, m, "serverlessEndpoints"),
    )


def _ep_id(ws: dict, collection: str, name: str) -> str:
    return f"{ws['id']}/{collection}/{name}"


def _list(fake: FakeAzure, m: re.Match, collection: str) -> Response:
    ws = workspace(fake, m)
    return Response(200, {"value": fake.store.children(ws["id"], collection)})


def _endpoint(fake: FakeAzure, m: re.Match) -> dict:
    ws = workspace(fake, m)
    return fake.store.get(_ep_id(ws, "onlineEndpoints", m["ep"]), "online endpoint")


def _check_name(kind: str, name: str) -> None:
    if not (3 <= len(name) <= 32) or not NAME.match(name):
        raise ArmError(
            400,
            "BadArgument",
            f"{kind} name '{name}' is invalid: 3-32 characters, start with a letter, letters, digits and "
            "'-' only, "
            "not ending with '-'.",
        )


def _check_unique(fake: FakeAzure, ws: dict, name: str, rid: str) -> None:
    region = ws["location"]
    taken = {n.lower() for n in fake.config.taken_endpoint_names.get(region, set())}
    for other in fake.store.by_type(ONLINE) + fake.store.by_type(SERVERLESS):
        if other["location"] == region and other["id"].lower() != rid.lower():
            taken.add(other["name"].lower())
    if name.lower() in taken:
        raise ArmError(
            409,
            "EndpointNameAlreadyExists",
            f"Endpoint name '{name}' is already in use in region {region}. Endpoint names must be unique "
            "per region.",
        )


def _scoring_uri(fake: FakeAzure, region: str, name: str) -> str:
    return f"{fake.url}/inference/{region}/{name}/score"


def _put_endpoint(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    name, rid = m["ep"], _ep_id(ws, "onlineEndpoints", m["ep"])
    _check_name("Endpoint", name)
    _check_unique(fake, ws, name, rid)
    body = req.json()
    props = body.get("properties") or {}
    existing = fake.store.find(rid)
    if existing and existing["properties"]["provisioningState"] not in TERMINAL:
        raise ArmError(
            409,
            "Conflict",
            f"Endpoint {name} is {existing['properties']['provisioningState']}; retry when it finishes.",
        )
    if props.get("authMode") not in ("Key", "AMLToken", "AADToken"):
        raise ArmError(400, "BadArgument", f"authMode '{props.get('authMode')}' is not valid")
    identity = body.get("identity") or {"type": "SystemAssigned"}
    for uai in identity.get("userAssignedIdentities") or {}:
        if fake.store.find(uai) is None:
            raise ArmError(400, "BadArgument", f"user-assigned identity {uai} was not found")
    traffic = {k: int(v) for k, v in (props.get("traffic") or {}).items()}
    _check_traffic(fake, rid, traffic)
    endpoint = arm_body(
        rid,
        ONLINE,
        {},
        location=ws["location"],
        tags=body.get("tags") or {},
        identity=identity,
        kind="Managed",
        systemData=(existing or {}).get("systemData")
        or {"createdAt": now_iso(), "createdBy": fake.app.client_id},
        properties={
            "authMode": props["authMode"],
            "description": props.get("description"),
            "traffic": traffic,
            "scoringUri": _scoring_uri(fake, ws["location"], name),
            "swaggerUri": _scoring_uri(fake, ws["location"], name).replace("/score", "/swagger.json"),
            "provisioningState": "Updating" if existing else "Creating",
            "publicNetworkAccess": props.get("publicNetworkAccess") or "Enabled",
            "properties": {"azureml.onlineendpointid": rid.lower()},
        },
    )
    fake.endpoint_keys.setdefault(rid.lower(), _new_keys())
    fake.store.put(rid, endpoint)

    def finish() -> None:
        endpoint["properties"]["provisioningState"] = "Succeeded"

    op = fake.store.start(rid, "update" if existing else "create", fake.config.lro_polls, finish)
    return fake.accepted(op, 200 if existing else 201, endpoint, api_version=req.api_version)


def _new_keys() -> dict[str, str]:
    return {"primaryKey": secrets.token_urlsafe(24), "secondaryKey": secrets.token_urlsafe(24)}


def _check_traffic(fake: FakeAzure, endpoint_id: str, traffic: dict[str, int]) -> None:
    for name, share in traffic.items():
        dep = fake.store.find(f"{endpoint_id}/deployments/{name}")
        if dep is None:
            raise ArmError(400, "BadArgument", f"traffic names deployment '{name}', which does not exist")
        if share > 0 and dep["properties"]["provisioningState"] != "Succeeded":
            raise ArmError(
                400,
                "BadArgument",
                f"traffic cannot go to deployment '{name}': it is "
                f"{dep['properties']['provisioningState']}, not Succeeded",
            )
    total = sum(traffic.values())
    if traffic and total not in (0, 100):
        raise ArmError(400, "BadArgument", f"traffic must add up to 100 (or all be 0), not {total}")


def _delete_endpoint(fake: FakeAzure, req: Request, m: re.Match, kind: str) -> Response:
    ws = workspace(fake, m)
    rid = _ep_id(ws, "onlineEndpoints" if kind == ONLINE else "serverlessEndpoints", m["ep"])
    found = fake.store.find(rid)
    if found is None:
        return Response(204)
    if found["properties"]["provisioningState"] in ("Creating", "Updating"):
        raise ArmError(409, "Conflict", f"endpoint {m['ep']} is {found['properties']['provisioningState']}")
    found["properties"]["provisioningState"] = "Deleting"
    op = fake.store.start(rid, "delete", fake.config.lro_polls, lambda: fake.store.remove(rid))
    return fake.accepted(op, 202, None, api_version=req.api_version)


def _keys(fake: FakeAzure, m: re.Match, collection: str) -> Response:
    ws = workspace(fake, m)
    found = fake.store.get(_ep_id(ws, collection, m["ep"]), "endpoint")
    return Response(200, dict(fake.endpoint_keys[found["id"].lower()]))


# deployments -----------------------------------------------------------------------------------
def _deployment(fake: FakeAzure, m: re.Match) -> dict:
    endpoint = _endpoint(fake, m)
    return fake.store.get(f"{endpoint['id']}/deployments/{m['dep']}", "deployment")


def _list_deployments(fake: FakeAzure, m: re.Match) -> Response:
    endpoint = _endpoint(fake, m)
    return Response(200, {"value": fake.store.children(endpoint["id"], "deployments")})


def _model_exists(fake: FakeAzure, ws: dict, model: str) -> bool:
    return bool(model) and (model.startswith("azureml://registries/") or fake.store.find(model) is not None)


def _put_deployment(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    endpoint = _endpoint(fake, m)  # 404 when the endpoint does not exist
    _check_name("Deployment", m["dep"])
    if endpoint["properties"]["provisioningState"] not in TERMINAL:
        raise ArmError(
            409,
            "Conflict",
            f"Endpoint {m['ep']} is {endpoint['properties']['provisioningState']}; deployments wait for it.",
        )
    rid = f"{endpoint['id']}/deployments/{m['dep']}"
    existing = fake.store.find(rid)
    if existing and existing["properties"]["provisioningState"] not in TERMINAL:
        raise ArmError(
            409, "Conflict", f"Deployment {m['dep']} is {existing['properties']['provisioningState']}."
        )
    body = req.json()
    props = body.get("properties") or {}
    if not _model_exists(fake, ws, props.get("model") or ""):
        raise ArmError(400, "BadArgument", f"model '{props.get('model')}' was not found in the workspace")
    vm = size(fake, props.get("instanceType"))
    if vm is None:
        raise ArmError(
            400,
            "BadArgument",
            f"instance type '{props.get('instanceType')}' is not supported in {ws['location']}",
        )
    capacity = (body.get("sku") or {}).get("capacity", 1)
    deployment = arm_body(
        rid,
        f"{ONLINE}/deployments",
        {},
        location=ws["location"],
        tags=body.get("tags") or {},
        sku=body.get("sku") or {"name": "Default", "capacity": capacity},
        systemData={"createdAt": now_iso(), "createdBy": fake.app.client_id},
        properties={
            **props,
            "properties": props.get("properties") or {},
            "provisioningState": "Updating" if existing else "Creating",
            "scaleSettings": props.get("scaleSettings") or {"scaleType": "Default"},
        },
    )
    fake.store.put(rid, deployment)
    short = _quota_shortfall(fake, ws, vm, int(capacity))

    def finish() -> None:
        if short:
            deployment["properties"]["provisioningState"] = "Failed"
            fake.deployment_logs[rid.lower()] = short
        else:
            deployment["properties"]["provisioningState"] = "Succeeded"
        fake.record(f"deployment {m['ep']}/{m['dep']} {deployment['properties']['provisioningState']}")

    op = fake.store.start(rid, "create", fake.config.deployment_polls, finish)
    return fake.accepted(op, 200 if existing else 201, deployment, api_version=req.api_version)


def _quota_shortfall(fake: FakeAzure, ws: dict, vm, count: int) -> str | None:
    used, limit = fake.config.quota.get((vm.family, ws["location"]), (0, fake.config.default_family_limit))
    need = (count + max(1, -(-count // 5))) * vm.vcpus
    if limit - used >= need:
        return None
    return (
        f"InferencingClientCreateDeploymentFailed: Not enough quota available for {vm.name} in "
        "SubscriptionId "
        f"{fake.config.subscription_id}. Current usage/limit: {used}/{limit}. Additional needed: {need}"
    )


def _delete_deployment(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    endpoint = _endpoint(fake, m)
    rid = f"{endpoint['id']}/deployments/{m['dep']}"
    if fake.store.find(rid) is None:
        return Response(204)
    share = (endpoint["properties"].get("traffic") or {}).get(m["dep"], 0)
    if share:
        raise ArmError(
            400,
            "BadArgument",
            f"Deployment {m['dep']} receives {share}% of the traffic; set it to 0 before deleting it.",
        )
    fake.store.find(rid)["properties"]["provisioningState"] = "Deleting"
    op = fake.store.start(rid, "delete", fake.config.lro_polls, lambda: fake.store.remove(rid))
    return fake.accepted(op, 202, None, api_version=req.api_version)


def _logs(fake: FakeAzure, m: re.Match) -> Response:
    dep = _deployment(fake, m)
    return Response(
        200, {"content": fake.deployment_logs.get(dep["id"].lower(), "model loaded; listening on :5001")}
    )


# serverless endpoints --------------------------------------------------------------------------
def _serverless(fake: FakeAzure, m: re.Match) -> dict:
    ws = workspace(fake, m)
    return fake.store.get(_ep_id(ws, "serverlessEndpoints", m["ep"]), "serverless endpoint")


def _put_serverless(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    name, rid = m["ep"], _ep_id(ws, "serverlessEndpoints", m["ep"])
    _check_name("Endpoint", name)
    _check_unique(fake, ws, name, rid)
    if fake.store.find(rid) is not None:
        raise ArmError(409, "Conflict", f"serverless endpoint {name} already exists")
    body = req.json()
    model_id = ((body.get("properties") or {}).get("modelSettings") or {}).get("modelId") or ""
    found = re.fullmatch(
        r"azureml://locations/([^/]+)/workspaces/([^/]+)/models/([^/]+)/versions/([^/]+)", model_id
    )
    guid = ws["properties"]["workspaceId"]
    if (
        not found
        or found.group(2) != guid
        or fake.store.find(f"{ws['id']}/models/{found.group(3)}/versions/{found.group(4)}") is None
    ):
        raise ArmError(
            400, "BadArgument", f"modelId '{model_id}' is not a model registered in this workspace"
        )
    if ws["location"] != "eastus2":
        raise ArmError(
            400,
            "BadArgument",
            f"fine-tuned Phi-3 models deploy serverless only in eastus2, not {ws['location']}",
        )
    endpoint = arm_body(
        rid,
        SERVERLESS,
        {},
        location=ws["location"],
        tags=body.get("tags") or {},
        sku={"name": "Consumption"},
        systemData={"createdAt": now_iso(), "createdBy": fake.app.client_id},
        properties={
            "authMode": "Key",
            "modelSettings": {"modelId": model_id},
            "provisioningState": "Creating",
            "endpointState": "Creating",
            "inferenceEndpoint": {"uri": f"{fake.url}/serverless/{ws['location']}/{name}", "headers": {}},
        },
    )
    fake.endpoint_keys[rid.lower()] = _new_keys()
    fake.store.put(rid, endpoint)

    def finish() -> None:
        endpoint["properties"].update(provisioningState="Succeeded", endpointState="Online")

    op = fake.store.start(rid, "create", fake.config.deployment_polls, finish)
    return fake.accepted(op, 201, endpoint, api_version=req.api_version)


def find_by_scoring_name(fake: FakeAzure, kind: str, region: str, name: str) -> dict:
    for found in fake.store.by_type(kind):
        if found["name"].lower() == name.lower() and found["location"] == region:
            return found
    raise not_found("endpoint", name)
