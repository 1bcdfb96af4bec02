"""Step 1 of the tutorial: resource group, container registry, workspace, managed identity, roles.

Everything is get-or-create by a deterministic name. ``workspaces.begin_create`` names its ARM
template deployment and the storage/key-vault/app-insights it makes at random, so a retried step
must never submit a second template while one is running: it looks for a running deployment of
this workspace first. It also creates no container registry, so one is created and attached
(the AcrPull assignment needs it).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.rest import HttpRequest

from backends.protocol import BackendError, ResourceRef, hands_back_with
from pipeline.config import default_hub

from .clients import AzureClients
from .errors import ProvisioningPending, azure_errors, describe, error_code, wait_until

log = logging.getLogger(__name__)

MANAGED_BY_TAG = {"managed-by": "phi3-finetune-functions"}
DEPLOYMENTS_API = "2021-04-01"
STATE_API = "2024-10-01"
# Built-in role definitions (the same GUIDs in every tenant).
CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
STORAGE_BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
ACR_PULL = "7f951dda-4ed3-4680-a7ca-43fe172d538d"


@dataclass(frozen=True)
class WorkspaceInfo:
    id: str
    name: str
    location: str
    workspace_guid: str | None
    storage_account: str | None
    container_registry: str | None
    kind: str = "default"  # default | hub | project


def registry_name(clients: AzureClients) -> str:
    """Registry names are global DNS names (5–50 alphanumerics): the workspace's plus a stable hash."""
    t = clients.target
    base = re.sub(r"[^a-z0-9]", "", t.workspace.lower())[:30] or "phi3"
    digest = hashlib.sha256(
        f"{t.subscription_id}/{t.resource_group}/{t.workspace}".lower().encode()
    ).hexdigest()
    return f"{base}{digest[:8]}"


def ensure_resource_group(clients: AzureClients, location: str) -> bool:
    """True when this call created it."""
    groups = clients.resources.resource_groups
    rg = clients.target.resource_group
    with azure_errors(f"read resource group '{rg}'"):
        try:
            groups.get(rg)
            return False
        except ResourceNotFoundError:
            pass
    with azure_errors(f"create resource group '{rg}' in {location}"):
        groups.create_or_update(rg, {"location": location, "tags": MANAGED_BY_TAG})
    return True


def ensure_container_registry(
    clients: AzureClients, location: str, budget_s: float, created: list[ResourceRef]
) -> str:
    """The workspace's registry (workspaces.begin_create makes none); one this call creates goes into
    `created` before the wait that may hand back."""
    from azure.mgmt.containerregistry.models import Registry, Sku

    registries = clients.container_registries.registries
    rg, name = clients.target.resource_group, registry_name(clients)

    def state() -> tuple[str, str | None]:
        return registries.get(rg, name).provisioning_state or "Unknown", None

    with azure_errors(f"create container registry '{name}'"):
        try:
            registry = registries.get(rg, name)
        except ResourceNotFoundError:
            spec = Registry(
                location=location, sku=Sku(name="Basic"), admin_user_enabled=False, tags=MANAGED_BY_TAG
            )
            registries.begin_create(rg, name, spec, polling=False)  # no poller thread; we poll below
            created.append(ResourceRef(kind="container_registry", name=name))
            registry = None
        if registry is None or registry.provisioning_state != "Succeeded":
            wait_until(f"container registry '{name}'", state, budget_s=budget_s)
            registry = registries.get(rg, name)
    return registry.id


def read_workspace(clients: AzureClients, name: str | None = None) -> WorkspaceInfo | None:
    name = name or clients.target.workspace
    with azure_errors(f"read workspace '{name}'"):
        try:
            ws = clients.ml.workspaces.get(name)
        except ResourceNotFoundError:
            return None
    return WorkspaceInfo(
        id=ws.id,
        name=ws.name,
        location=ws.location,
        workspace_guid=getattr(ws, "_workspace_id", None),
        storage_account=ws.storage_account,
        container_registry=ws.container_registry,
        kind=str(getattr(ws, "_kind", None) or "default").lower(),
    )


def _template_deployments(clients: AzureClients, workspace: str) -> list[dict]:
    """ARM template deployments of a workspace (azure-ai-ml names them '<workspace>-<random digits>')."""
    t = clients.target
    url = (
        f"/subscriptions/{t.subscription_id}/resourcegroups/{t.resource_group}/providers/"
        f"Microsoft.Resources/deployments?api-version={DEPLOYMENTS_API}"
    )
    response = clients.resources.send_request(HttpRequest("GET", url))
    response.raise_for_status()
    prefix = f"{workspace}-".lower()
    found = [d for d in response.json().get("value", []) if d["name"].lower().startswith(prefix)]
    return [d for d in found if re.fullmatch(r"\d+", d["name"][len(prefix) :])]


def _running(deployments: list[dict]) -> dict | None:
    running = ("Accepted", "Running", "Created", "Creating", "Ready")
    return next((d for d in deployments if d["properties"].get("provisioningState") in running), None)


def _deployment_state(clients: AzureClients, deployment_id: str) -> tuple[str, str | None]:
    response = clients.resources.send_request(
        HttpRequest("GET", f"{deployment_id}?api-version={DEPLOYMENTS_API}")
    )
    response.raise_for_status()
    props = response.json().get("properties", {})
    error = props.get("error")
    return props.get("provisioningState", "Unknown"), (describe(Exception(str(error))) if error else None)


def _ensure_named_workspace(
    clients: AzureClients,
    name: str,
    make_entity: Callable[[], object],
    budget_s: float,
    created: list[ResourceRef],
    with_key_vault: bool = True,
) -> WorkspaceInfo:
    """Get-or-create one workspace/hub/project (a project has no Key Vault of its own); never a second
    template while one is running. A create this call starts goes into `created` at once, before the
    wait that may hand back."""
    found = read_workspace(clients, name)
    if found is not None:
        return found
    if not name[:1].isalpha() and with_key_vault:
        # A workspace or hub comes with a Key Vault that azure-ai-ml names after the workspace's first
        # characters; a vault name must start with a letter, so the template would fail on a name the
        # user never chose.
        raise BackendError(
            f"a new Azure ML workspace or hub needs a name that starts with a letter, not '{name}' (its "
            "Key Vault is named after it); choose another name"
        )
    with azure_errors(f"create workspace '{name}'"):
        in_flight = _running(_template_deployments(clients, name))
        if in_flight is None:
            # Returns at once (the template runs in Azure); the running deployment is waited on below.
            try:
                clients.ml_resource_group.workspaces.begin_create(make_entity())
            except ResourceExistsError:
                log.info("a template deployment of workspace %s is already running (a retried request)", name)
            created.append(ResourceRef(kind="workspace", name=name))
            in_flight = _running(_template_deployments(clients, name))
        if in_flight is not None:
            wait_until(
                f"workspace '{name}' (ARM deployment {in_flight['name']})",
                lambda: _deployment_state(clients, in_flight["id"]),
                budget_s=budget_s,
            )
    found = read_workspace(clients, name)
    if found is None:
        raise ProvisioningPending(f"workspace '{name}' is not readable yet after its deployment finished")
    return found


def ensure_workspace(
    clients: AzureClients, location: str, budget_s: float, *, foundry_project: bool = False
) -> tuple[WorkspaceInfo, list[ResourceRef]]:
    """The run's workspace: an Azure ML workspace with a registry, or (serverless) a Foundry hub + project,
    and what this call created (what it created before handing back goes with the hand-back)."""
    created: list[ResourceRef] = []
    with hands_back_with(created):
        return _ensure_workspace(clients, location, budget_s, foundry_project, created)


def _ensure_workspace(
    clients: AzureClients, location: str, budget_s: float, foundry_project: bool, created: list[ResourceRef]
) -> tuple[WorkspaceInfo, list[ResourceRef]]:
    from azure.ai.ml.entities import Hub, Project, Workspace

    name = clients.target.workspace
    if ensure_resource_group(clients, location):
        created.append(ResourceRef(kind="resource_group", name=clients.target.resource_group))
    tags = dict(MANAGED_BY_TAG)
    if foundry_project:
        existing = read_workspace(clients)
        if existing is not None and existing.kind != "project":
            raise BackendError(
                f"serverless fine-tuning needs an Azure AI Foundry project, but '{name}' is a "
                f"{existing.kind} "
                "workspace; set AZURE_ML_WORKSPACE to a project in eastus2 (or a new name to create one)"
            )
        hub_name = default_hub(name)
        hub = _ensure_named_workspace(
            clients, hub_name, lambda: Hub(name=hub_name, location=location, tags=tags), budget_s, created
        )
        project = _ensure_named_workspace(
            clients,
            name,
            lambda: Project(name=name, hub_id=hub.id, location=location, tags=tags),
            budget_s,
            created,
            with_key_vault=False,
        )
        return project, created

    def new_workspace() -> Workspace:
        registry = ensure_container_registry(clients, location, budget_s, created)  # begin_create makes none
        return Workspace(
            name=name,
            location=location,
            display_name=name,
            description="Phi-3 fine-tuning workspace (created by phi3-finetune-functions)",
            container_registry=registry,
            tags=tags,
        )

    workspace = _ensure_named_workspace(clients, name, new_workspace, budget_s, created)
    if not workspace.container_registry:
        workspace = _attach_registry(
            clients, workspace, ensure_container_registry(clients, location, budget_s, created), budget_s
        )
    return workspace, created


def _attach_registry(
    clients: AzureClients, ws: WorkspaceInfo, registry_id: str, budget_s: float
) -> WorkspaceInfo:
    from azure.ai.ml.entities import Workspace

    with azure_errors(f"attach container registry to workspace '{ws.name}'"):
        clients.ml_resource_group.workspaces.begin_update(
            Workspace(name=ws.name, container_registry=registry_id), update_dependent_resources=True
        )

        def state() -> tuple[str, str | None]:
            resource = clients.resources.resources.get_by_id(ws.id, api_version=STATE_API)
            return (resource.properties or {}).get("provisioningState", "Unknown"), None

        wait_until(f"workspace '{ws.name}' attaching its container registry", state, budget_s=budget_s)
    found = read_workspace(clients)
    if found is None:
        raise ProvisioningPending(f"workspace '{ws.name}' is not readable after attaching its registry")
    return found


# managed identity and its role assignments ------------------------------------------------------
@dataclass(frozen=True)
class IdentityInfo:
    id: str
    principal_id: str
    client_id: str


def ensure_identity(clients: AzureClients, name: str, location: str) -> tuple[IdentityInfo, bool]:
    from azure.mgmt.msi.models import Identity

    identities = clients.identities.user_assigned_identities
    rg = clients.target.resource_group
    created = False
    with azure_errors(f"create user-assigned identity '{name}'"):
        try:
            found = identities.get(rg, name)
        except ResourceNotFoundError:
            found = identities.create_or_update(rg, name, Identity(location=location, tags=MANAGED_BY_TAG))
            created = True
    return IdentityInfo(id=found.id, principal_id=found.principal_id, client_id=found.client_id), created


def read_identity(clients: AzureClients, name: str) -> IdentityInfo:
    with azure_errors(f"read user-assigned identity '{name}'"):
        try:
            found = clients.identities.user_assigned_identities.get(clients.target.resource_group, name)
        except ResourceNotFoundError:
            raise BackendError(
                f"user-assigned identity '{name}' does not exist; the identity step creates it — run the "
                "whole "
                "pipeline (or check azure.identity_name)"
            ) from None
    return IdentityInfo(id=found.id, principal_id=found.principal_id, client_id=found.client_id)


def role_assignment_name(scope: str, principal_id: str, role: str) -> str:
    """Deterministic, so a retried step finds its own assignment instead of making another."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{scope.lower()}|{principal_id}|{role}"))


def assign_role(clients: AzureClients, scope: str, role: str, principal_id: str, budget_s: float) -> str:
    """'created' or 'existed'. Retries PrincipalNotFound: a new identity takes a while to replicate."""
    from azure.mgmt.authorization.models import RoleAssignmentCreateParameters

    roles = (
        f"/subscriptions/{clients.target.subscription_id}/providers/Microsoft.Authorization/roleDefinitions"
    )
    definition = f"{roles}/{role}"
    params = RoleAssignmentCreateParameters(
        role_definition_id=definition, principal_id=principal_id, principal_type="ServicePrincipal"
    )
    name = role_assignment_name(scope, principal_id, role)
    deadline, delay = time.monotonic() + budget_s, 0.5
    while True:
        action = f"assign role {role} to {principal_id} on {scope}"
        try:
            clients.authorization.role_assignments.create(scope, name, params)
            return "created"
        except ResourceExistsError as exc:
            if error_code(exc) == "RoleAssignmentExists":  # granted before, under another name
                return "existed"
            raise BackendError(f"{action}: {describe(exc)}") from None
        except HttpResponseError as exc:
            if error_code(exc) != "PrincipalNotFound":
                with azure_errors(action):
                    raise
            if time.monotonic() + delay > deadline:
                raise ProvisioningPending(
                    f"identity {principal_id} has not replicated to Entra ID yet (PrincipalNotFound); "
                    "retrying the step"
                ) from None
            log.info("principal %s not replicated yet; retrying in %.1f s", principal_id, delay)
            time.sleep(delay)
            delay = min(delay * 2, 20.0)
