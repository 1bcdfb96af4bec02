"""The Prompt flow custom connection in the workspace: endpoint URI plus key, read by the flow by name.

Prompt flow resolves a workspace connection of category ``CustomKeys`` into a ``CustomConnection``:
``properties.credentials.keys`` become its secrets and ``properties.metadata`` its configs.
azure-ai-ml's public ``WorkspaceConnection(type="custom")`` writes ``authType: ApiKey`` with a single
``key`` instead (no ``keys`` map, so the flow would find no secret), hence the plain ARM PUT through
the management client's pipeline (same credential, cloud and retries as every other call).
"""

from __future__ import annotations

from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.mgmt.core.exceptions import ARMErrorFormat

from .clients import AzureClients
from .errors import azure_errors

CONNECTIONS_API = "2024-10-01"
# The endpoint URI the connection served before the run that pointed it at its target: kept in the
# connection itself, so a retry of that run's step (its first try's answer lost after the PUT landed)
# still knows what to point it back to (``backends.protocol.served_before``).
PREVIOUS = "previousEndpoint"


def _url(clients: AzureClients, name: str) -> str:
    t = clients.target
    return (
        f"/subscriptions/{t.subscription_id}/resourceGroups/{t.resource_group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{t.workspace}/connections/{name}?api-version={CONNECTIONS_API}"
    )


def upsert_custom_connection(
    clients: AzureClients, name: str, endpoint_uri: str, key: str, previous: str | None = None
) -> str:
    """Create or update; 'created' or 'updated'. The key goes only into the request body to Azure;
    ``previous``: the endpoint URI it served before (kept in its metadata)."""
    metadata = {"endpoint": endpoint_uri} | ({PREVIOUS: previous} if previous else {})
    body = {
        "properties": {
            "category": "CustomKeys",
            "authType": "CustomKeys",
            "target": endpoint_uri,
            "credentials": {"keys": {"key": key}},
            "metadata": metadata,
            "isSharedToAll": False,
        }
    }
    with azure_errors(f"create Prompt flow connection '{name}'"):
        response = clients.resources.send_request(HttpRequest("PUT", _url(clients, name), json=body))
        if response.status_code >= 400:
            raise HttpResponseError(response=response, error_format=ARMErrorFormat)
    return "created" if response.status_code == 201 else "updated"


def connection_target(clients: AzureClients, name: str) -> str | None:
    """The endpoint URI connection ``name`` points at (a plain GET: Azure returns no secrets); None: none."""
    return connection_targets(clients, name)[0]


def connection_targets(clients: AzureClients, name: str) -> tuple[str | None, str | None]:
    """The endpoint URI connection ``name`` points at, and the one it served before that; (None, None):
    no such connection."""
    with azure_errors(f"read Prompt flow connection '{name}'"):
        response = clients.resources.send_request(HttpRequest("GET", _url(clients, name)))
        if response.status_code == 404:
            return None, None
        if response.status_code >= 400:
            raise HttpResponseError(response=response, error_format=ARMErrorFormat)
    properties = response.json().get("properties") or {}
    metadata = properties.get("metadata") or {}
    return metadata.get("endpoint") or properties.get("target"), metadata.get(PREVIOUS)


def delete_connection(clients: AzureClients, name: str) -> None:
    with azure_errors(f"delete Prompt flow connection '{name}'"):
        response = clients.resources.send_request(HttpRequest("DELETE", _url(clients, name)))
        if response.status_code >= 400 and response.status_code != 404:
            raise HttpResponseError(response=response, error_format=ARMErrorFormat)
