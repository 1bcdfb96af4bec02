"""Azure Resource Manager: resource groups, template deployments (how azure-ai-ml creates a
workspace), user-assigned identities, role assignments, container registries, storage accounts
and Azure Monitor metrics.

Rules enforced, as ARM does: unknown subscription → 404 SubscriptionNotFound; a resource in a
missing group → 404 ResourceGroupNotFound; unknown region → 400; role assignments need a GUID
name, a built-in role definition id, an existing principal with ``principalType``
ServicePrincipal (managed identities), and one (principal, role, scope) at most (409
RoleAssignmentExists); a brand-new principal is not yet replicated (400 PrincipalNotFound, the
first ``principal_lag`` tries); registry names are 5–50 alphanumerics and globally unique.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from .server import ArmError, Request, Response, not_found
from .store import arm_body, now_iso

if TYPE_CHECKING:
    from .azure import FakeAzure

SUB = r"/subscriptions/(?P<sub>[^/]+)"
RG = SUB + r"/resourceGroups/(?P<rg>[^/]+)"
BUILTIN_ROLES = {
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
    "7f951dda-4ed3-4680-a7ca-43fe172d538d": "AcrPull",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "acdd72a7-3385-48ef-bd42-f606fba81ae7": "Reader",
}
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def check_subscription(fake: FakeAzure, sub: str) -> None:
    if sub.lower() != fake.config.subscription_id.lower():
        raise ArmError(404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found.")


def check_group(fake: FakeAzure, sub: str, rg: str) -> dict:
    check_subscription(fake, sub)
    group = fake.store.find(f"/subscriptions/{sub}/resourceGroups/{rg}")
    if group is None:
        raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
    return group


def check_region(fake: FakeAzure, location: str | None, what: str) -> str:
    region = (location or "").replace(" ", "").lower()
    if region not in fake.config.regions:
        raise ArmError(
            400,
            "LocationNotAvailableForResourceType",
            f"The provided location '{location}' is not available for {what}. "
            f"List of available regions is '{','.join(fake.config.regions)}'.",
        )
    return region


def register(fake: FakeAzure) -> None:
    s = fake.server
    s.add("resource-group", "GET", RG, lambda r, m: _get_group(fake, m))
    s.add("resource-group", "PUT", RG, lambda r, m: _put_group(fake, r, m))
    deployments = RG + r"/providers/Microsoft\.Resources/deployments"
    s.add("template-deployments", "GET", deployments, lambda r, m: _list_deployments(fake, m))
    s.add(
        "template-deployment",
        "PUT",
        deployments + r"/(?P<name>[^/]+)",
        lambda r, m: _put_deployment(fake, r, m),
    )
    s.add("template-deployment", "GET", deployments + r"/(?P<name>[^/]+)", lambda r, m: _get(fake, r.path))
    for operations in (deployments, RG + r"/deployments"):  # the SDK's vendored client uses the old path too
        s.add(
            "template-deployment-operations",
            "GET",
            operations + r"/(?P<name>[^/]+)/operations",
            lambda r, m: Response(200, {"value": []}),
        )
    identity = RG + r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/(?P<name>[^/]+)"
    s.add("identity", "PUT", identity, lambda r, m: _put_identity(fake, r, m))
    s.add("identity", "GET", identity, lambda r, m: _get(fake, r.path, "user assigned identity"))
    roles = r"(?P<scope>/subscriptions/.+?)/providers/Microsoft\.Authorization/roleAssignments"
    s.add("role-assignment", "PUT", roles + r"/(?P<name>[^/]+)", lambda r, m: _put_role(fake, r, m))
    s.add(
        "role-assignment",
        "GET",
        roles + r"/(?P<name>[^/]+)",
        lambda r, m: _get(fake, r.path, "role assignment"),
    )
    s.add("role-assignments", "GET", roles, lambda r, m: _list_roles(fake, r, m))
    acr = RG + r"/providers/Microsoft\.ContainerRegistry/registries/(?P<name>[^/]+)"
    s.add("container-registry", "PUT", acr, lambda r, m: _put_registry(fake, r, m))
    s.add("container-registry", "GET", acr, lambda r, m: _get(fake, r.path, "container registry"))
    for kind, provider in (
        ("storage-account", r"Microsoft\.Storage/storageAccounts"),
        ("key-vault", r"Microsoft\.KeyVault/vaults"),
        ("app-insights", r"Microsoft\.Insights/components"),
    ):
        s.add(
            kind,
            "GET",
            RG + rf"/providers/{provider}/(?P<name>[^/]+)",
            lambda r, m, k=kind: _get(fake, r.path, k),
        )
    s.add(
        "metrics",
        "GET",
        r"(?P<resource>/subscriptions/.+?)/providers/microsoft\.insights/metrics",
        lambda r, m: _metrics(fake, r, m),
    )


def _get(fake: FakeAzure, path: str, kind: str = "resource") -> Response:
    return Response(200, fake.store.get(path, kind))


# resource groups --------------------------------------------------------------------------------
def _get_group(fake: FakeAzure, m: re.Match) -> Response:
    check_subscription(fake, m["sub"])
    group = fake.store.find(m.group(0))
    if group is None:
        raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
    return Response(200, group)


def _put_group(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    check_subscription(fake, m["sub"])
    body = req.json()
    region = check_region(fake, body.get("location"), "resource groups")
    rid = f"/subscriptions/{m['sub']}/resourceGroups/{m['rg']}"
    existing = fake.store.find(rid)
    if existing and existing["location"] != region:
        raise ArmError(
            409,
            "InvalidResourceGroupLocation",
            f"Invalid resource group location '{region}'. The Resource group already exists in location "
            f"'{existing['location']}'.",
        )
    group = {
        "id": rid,
        "name": m["rg"],
        "type": "Microsoft.Resources/resourceGroups",
        "location": region,
        "tags": body.get("tags") or {},
        "properties": {"provisioningState": "Succeeded"},
    }
    fake.store.put(rid, group)
    return Response(200 if existing else 201, group)


# template deployments (workspace creation by azure-ai-ml) ---------------------------------------
def _list_deployments(fake: FakeAzure, m: re.Match) -> Response:
    check_group(fake, m["sub"], m["rg"])
    prefix = f"/subscriptions/{m['sub']}/resourceGroups/{m['rg']}/providers/Microsoft.Resources/deployments"
    return Response(200, {"value": fake.store.children(prefix.rsplit("/", 1)[0], "deployments")})


def _param(params: dict, name: str, default=None):
    value = (params.get(name) or {}).get("value")
    return default if value in (None, "") else value


def _put_deployment(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    check_group(fake, m["sub"], m["rg"])
    props = req.json().get("properties") or {}
    params = props.get("parameters") or {}
    if not props.get("template") or not _param(params, "workspaceName"):
        raise ArmError(400, "InvalidTemplate", "the fake deploys only azure-ai-ml's workspace template")
    rid = m.group(0)
    running = fake.store.find(rid)
    if running and running["properties"]["provisioningState"] == "Running":
        raise ArmError(
            409,
            "DeploymentActive",
            f"Unable to edit or replace deployment '{m['name']}': previous deployment is still active.",
        )
    deployment = {
        "id": rid,
        "name": m["name"],
        "type": "Microsoft.Resources/deployments",
        "properties": {
            "provisioningState": "Running",
            "timestamp": now_iso(),
            "duration": "PT1S",
            "mode": "Incremental",
        },
    }
    fake.store.put(rid, deployment)
    from .workspace import create_workspace_from_template

    def finish() -> None:
        create_workspace_from_template(fake, m["sub"], m["rg"], params)
        deployment["properties"]["provisioningState"] = "Succeeded"

    op = fake.store.start(rid, "create", fake.config.lro_polls, finish)
    return fake.accepted(op, 201, deployment, api_version=req.api_version)


# managed identities ----------------------------------------------------------------------------
def _put_identity(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    check_group(fake, m["sub"], m["rg"])
    body = req.json()
    region = check_region(fake, body.get("location"), "userAssignedIdentities")
    rid = m.group(0)
    existing = fake.store.find(rid)
    props = (existing or {}).get("properties") or {
        "tenantId": fake.app.tenant_id,
        "principalId": str(uuid.uuid4()),
        "clientId": str(uuid.uuid4()),
    }
    identity = arm_body(
        rid,
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        {},
        location=region,
        tags=body.get("tags") or {},
        properties=props,
    )
    fake.store.put(rid, identity)
    if not existing:
        fake.principals[props["principalId"]] = fake.config.principal_lag
    return Response(200 if existing else 201, identity)


# role assignments ------------------------------------------------------------------------------
def _put_role(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    scope, name = m["scope"], m["name"]
    check_subscription(fake, scope.split("/")[2])
    if not GUID.match(name):
        raise ArmError(
            400,
            "InvalidRoleAssignmentId",
            f"The role assignment ID '{name}' is not valid. The role assignment ID must be a GUID.",
        )
    props = req.json().get("properties") or {}
    definition = props.get("roleDefinitionId") or ""
    role = re.fullmatch(
        r"/subscriptions/([^/]+)/providers/Microsoft\.Authorization/roleDefinitions/([^/]+)",
        definition,
        re.IGNORECASE,
    )
    if not role or role.group(2).lower() not in BUILTIN_ROLES:
        raise ArmError(
            400,
            "RoleDefinitionDoesNotExist",
            f"The specified role definition with ID '{definition}' does not exist.",
        )
    if len(scope.split("/")) > 4 and fake.store.find(scope) is None:
        raise not_found("scope", scope)
    principal = props.get("principalId")
    if principal not in fake.principals:
        raise ArmError(
            400,
            "PrincipalNotFound",
            f"Principal {principal} does not exist in the directory {fake.app.tenant_id}.",
        )
    if props.get("principalType") != "ServicePrincipal":
        raise ArmError(
            400,
            "UnmatchedPrincipalType",
            f"The PrincipalType '{props.get('principalType')}' in the request doesn't match the type of "
            f"the principal {principal} (ServicePrincipal).",
        )
    if fake.principals[principal] > 0:  # Entra replication lag right after the identity was created
        fake.principals[principal] -= 1
        raise ArmError(
            400,
            "PrincipalNotFound",
            f"Principal {principal} does not exist in the directory {fake.app.tenant_id}. Check that you "
            "have the correct principal ID. If you are creating this principal and then immediately "
            "assigning a role, this error might be related to a replication delay.",
        )
    rid = m.group(0)
    wanted = (principal, role.group(2).lower(), scope.lower())
    for existing in fake.store.by_type("Microsoft.Authorization/roleAssignments"):
        p = existing["properties"]
        same = (
            p["principalId"],
            p["roleDefinitionId"].rsplit("/", 1)[-1].lower(),
            p["scope"].lower(),
        ) == wanted
        if existing["id"].lower() == rid.lower():
            if not same:
                raise ArmError(
                    400,
                    "RoleAssignmentUpdateNotPermitted",
                    "Tenant ID, application ID, principal ID, and scope are not allowed to be updated.",
                )
            return Response(201, existing)
        if same:
            raise ArmError(409, "RoleAssignmentExists", "The role assignment already exists.")
    body = arm_body(
        rid,
        "Microsoft.Authorization/roleAssignments",
        {},
        properties={
            "roleDefinitionId": definition,
            "principalId": principal,
            "principalType": "ServicePrincipal",
            "scope": scope,
            "createdOn": now_iso(),
        },
    )
    fake.store.put(rid, body)
    return Response(201, body)


def _list_roles(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    scope = m["scope"].lower()
    found = [
        r
        for r in fake.store.by_type("Microsoft.Authorization/roleAssignments")
        if r["properties"]["scope"].lower() == scope
    ]
    wanted = re.search(r"principalId eq '([^']+)'", req.query.get("$filter", ""))
    if wanted:
        found = [r for r in found if r["properties"]["principalId"] == wanted.group(1)]
    return Response(200, {"value": found})


# container registries --------------------------------------------------------------------------
def _put_registry(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    check_group(fake, m["sub"], m["rg"])
    name, rid = m["name"], m.group(0)
    if not re.fullmatch(r"[a-zA-Z0-9]{5,50}", name):
        raise ArmError(
            400, "InvalidResourceName", f"Registry name '{name}' must be 5-50 alphanumeric characters."
        )
    existing = fake.store.find(rid)
    if existing is None and name.lower() in fake.taken_registry_names:
        raise ArmError(
            409, "AlreadyInUse", f"The registry DNS name {name.lower()}.azurecr.io is already in use."
        )
    body = req.json()
    region = check_region(fake, body.get("location"), "registries")
    sku = (body.get("sku") or {}).get("name")
    if sku not in ("Basic", "Standard", "Premium"):
        raise ArmError(400, "InvalidSku", f"The sku '{sku}' is not valid; use Basic, Standard or Premium.")
    registry = arm_body(
        rid,
        "Microsoft.ContainerRegistry/registries",
        {},
        location=region,
        sku={"name": sku, "tier": sku},
        tags=body.get("tags") or {},
        properties={
            "loginServer": f"{name.lower()}.fake.azurecr.test",
            "adminUserEnabled": False,
            "provisioningState": "Creating",
            "creationDate": now_iso(),
        },
    )
    fake.store.put(rid, registry)
    fake.taken_registry_names.add(name.lower())

    def finish() -> None:
        registry["properties"]["provisioningState"] = "Succeeded"

    op = fake.store.start(rid, "create", fake.config.lro_polls, finish)
    return fake.accepted(op, 201 if existing is None else 200, registry, api_version=req.api_version)


# Azure Monitor metrics -------------------------------------------------------------------------
def _metrics(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    resource = fake.store.get(m["resource"])
    names = req.query.get("metricnames", "")
    series = fake.requests_per_minute.get(resource["id"].lower(), [])
    start, _, end = req.query.get("timespan", "/").partition("/")
    data = [
        {"timeStamp": ts, "total": float(n)}
        for ts, n in series
        if (not start or start <= ts) and (not end or ts <= end)
    ]
    return Response(
        200,
        {
            "timespan": req.query.get("timespan", ""),
            "interval": req.query.get("interval", "PT1M"),
            "value": [
                {
                    "id": f"{resource['id']}/providers/Microsoft.Insights/metrics/{name}",
                    "type": "Microsoft.Insights/metrics",
                    "name": {"value": name, "localizedValue": name},
                    "unit": "Count",
                    "timeseries": [{"metadatavalues": [], "data": data}],
                }
                for name in names.split(",")
                if name
            ],
            "namespace": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
            "resourceregion": resource.get("location", ""),
        },
    )
