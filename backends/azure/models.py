"""Fine-tuned model versions in the workspace, for the cleanup timer (``CLEANUP_DELETE_MODELS``).

A deployment names its model as an ARM id (``/subscriptions/…/workspaces/<ws>/models/<name>/versions/<v>``),
an asset URI (``azureml://locations/…/workspaces/<guid>/models/<name>/versions/<v>``) or
``azureml:<name>:<version>``. Only workspace models this app registered (tag ``managed-by``) are ever
candidates: catalog models (``azureml://registries/…``) and anybody else's are never touched.

azure-ai-ml offers ``models.archive`` but no delete; the REST API has one
(``DELETE …/models/{name}/versions/{version}``), which the SDK's own generated client calls. Azure
refuses it (409) while a deployment uses the version — the cleanup deletes deployments first.
"""

from __future__ import annotations

import re

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from backends.protocol import BackendError, RegisteredModel

from .clients import AzureClients
from .errors import azure_errors, describe
from .setup import MANAGED_BY_TAG

_VERSIONED = re.compile(r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/?$", re.IGNORECASE)
_SHORT = re.compile(r"^azureml:(?P<name>[^:/]+):(?P<version>[^:/]+)$")


def parse_model_ref(ref: str | None) -> tuple[str, str] | None:
    """(name, version) of a workspace model reference; None for registry (catalog) models and others."""
    if not ref or "/registries/" in ref.lower():
        return None
    found = _VERSIONED.search(ref) or _SHORT.match(ref)
    return (found["name"], found["version"]) if found else None


def managed_model(clients: AzureClients, ref: str | None) -> RegisteredModel | None:
    parsed = parse_model_ref(ref)
    if parsed is None:
        return None
    name, version = parsed
    with azure_errors(f"read model {name}:{version}"):
        try:
            model = clients.ml.models.get(name, version=version)
        except ResourceNotFoundError:
            return None
    if (model.tags or {}).get("managed-by") != MANAGED_BY_TAG["managed-by"]:
        return None
    return RegisteredModel(name=name, version=version, uri=ref or "")


def delete_model_version(clients: AzureClients, name: str, version: str) -> None:
    target = clients.target
    action = f"delete model {name}:{version}"
    with azure_errors(action):
        try:
            clients.ml.models._model_versions_operation.delete(  # the REST delete azure-ai-ml does not wrap
                resource_group_name=target.resource_group,
                workspace_name=target.workspace,
                name=name,
                version=version,
            )
        except ResourceNotFoundError:
            return  # already gone
        except ResourceExistsError as exc:  # 409: a deployment still uses it
            raise BackendError(f"{action}: {describe(exc, 300)}; delete its deployments first") from None
