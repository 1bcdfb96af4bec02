"""Step 4 of the tutorial: online endpoint, deployment, traffic, keys; serverless endpoints; cleanup listing.

A managed online endpoint carries the user-assigned identity (deployments use it to pull the image
and read the model) and key auth. A deployment is MLflow no-code (no environment, no scoring
script) with probe delays long enough for an LLM container to load, and traffic moves to it only
after it has Succeeded. In serverless mode the endpoint *is* the deployment of the fine-tuned model.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.rest import HttpRequest

from backends.protocol import (
    BackendError,
    DeploymentState,
    EndpointKeys,
    EndpointState,
    NotFoundError,
    RegisteredModel,
)
from pipeline.config import RunConfig

from .clients import AzureClients
from .errors import ProvisioningPending, azure_errors, describe, error_code, wait_until

log = logging.getLogger(__name__)

# An LLM's MLflow container takes minutes to load the weights before it answers probes.
PROBE = {"initial_delay": 600, "period": 100, "timeout": 10, "failure_threshold": 30}
METRICS_API = "2023-10-01"
SERVERLESS_STATES = {
    "succeeded": "Succeeded",
    "creating": "Creating",
    "updating": "Updating",
    "deleting": "Deleting",
    "failed": "Failed",
    "canceled": "Canceled",
}


def _state(value: str | None) -> str:
    text = str(getattr(value, "value", value) or "Unknown")
    return SERVERLESS_STATES.get(text.lower(), text[:1].upper() + text[1:])


def _created_at(entity) -> str | None:
    system = getattr(entity, "system_data", None) or getattr(entity, "properties", {}) or {}
    created = getattr(system, "created_at", None) or (
        system.get("createdAt") if isinstance(system, dict) else None
    )
    return created.isoformat() if isinstance(created, datetime) else created


def endpoint_state(ep, *, serverless: bool = False) -> EndpointState:
    traffic = {} if serverless else {k: int(v) for k, v in (ep.traffic or {}).items()}
    return EndpointState(
        name=ep.name,
        scoring_uri=ep.scoring_uri,
        provisioning_state=_state(ep.provisioning_state),
        tags=dict(ep.tags or {}),
        traffic=traffic,
        created_at=_created_at(ep),
        kind="serverless" if serverless else "online",
    )


# managed online endpoints -----------------------------------------------------------------------
def find_online_endpoint(clients: AzureClients, name: str):
    with azure_errors(f"read endpoint '{name}'"):
        try:
            return clients.ml.online_endpoints.get(name)
        except ResourceNotFoundError:
            return None


def _endpoint_provisioning(clients: AzureClients, name: str) -> tuple[str, str | None]:
    return _state(clients.ml.online_endpoints.get(name).provisioning_state), None


def ensure_online_endpoint(
    clients: AzureClients, name: str, tags: dict[str, str], identity_id: str, budget_s: float
) -> EndpointState:
    from azure.ai.ml.entities import (
        IdentityConfiguration,
        ManagedIdentityConfiguration,
        ManagedOnlineEndpoint,
    )

    action = f"create endpoint '{name}'"
    if find_online_endpoint(clients, name) is None:
        endpoint = ManagedOnlineEndpoint(
            name=name,
            auth_mode="key",
            description="Phi-3 fine-tuned chat model (phi3-finetune-functions)",
            tags=tags,
            identity=IdentityConfiguration(
                type="user_assigned",
                user_assigned_identities=[ManagedIdentityConfiguration(resource_id=identity_id)],
            ),
        )
        with azure_errors(action):
            try:
                clients.ml.online_endpoints.begin_create_or_update(endpoint)
            except ResourceExistsError as exc:
                # Either our own PUT landed and its answer was lost (the endpoint is ours now), or the
                # name belongs to someone else in this region.
                if find_online_endpoint(clients, name) is None:
                    raise BackendError(
                        f"{action}: the name is taken in this region (endpoint names are unique per region "
                        "across "
                        f"all of Azure: {describe(exc, 200)}); set deployment.endpoint_name to another prefix"
                    ) from None
    with azure_errors(action):
        wait_until(f"endpoint '{name}'", lambda: _endpoint_provisioning(clients, name), budget_s=budget_s)
        return endpoint_state(clients.ml.online_endpoints.get(name))


def _deployment_state(dep, endpoint: str, error: str | None = None) -> DeploymentState:
    return DeploymentState(
        endpoint=endpoint,
        name=dep.name,
        provisioning_state=_state(dep.provisioning_state),
        model=dep.model,
        error=error,
    )


def ensure_online_deployment(
    clients: AzureClients, endpoint: str, name: str, model: RegisteredModel, cfg: RunConfig, budget_s: float
) -> DeploymentState:
    from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

    action = f"create deployment '{name}' on endpoint '{endpoint}'"
    with azure_errors(action):
        if find_online_endpoint(clients, endpoint) is None:
            raise NotFoundError(
                f"{action}: endpoint '{endpoint}' does not exist; run the endpoint step first"
            )
        # A deployment PUT is refused while its endpoint is still being created or updated.
        wait_until(
            f"endpoint '{endpoint}'", lambda: _endpoint_provisioning(clients, endpoint), budget_s=budget_s
        )
        try:
            existing = clients.ml.online_deployments.get(name, endpoint)
        except ResourceNotFoundError:
            existing = None
        if existing is not None and _state(existing.provisioning_state) != "Failed":
            return _deployment_state(existing, endpoint)  # creating, updating or done: never a second rollout
        spec = ManagedOnlineDeployment(
            name=name,
            endpoint_name=endpoint,
            model=model.uri,
            instance_type=cfg.deployment.instance_type,
            instance_count=cfg.deployment.instance_count,
            request_settings=OnlineRequestSettings(
                request_timeout_ms=cfg.deployment.request_timeout_ms, max_concurrent_requests_per_instance=1
            ),
            liveness_probe=ProbeSettings(**PROBE),
            readiness_probe=ProbeSettings(**PROBE),
            tags={"model": f"{model.name}:{model.version}"},
        )
        try:
            clients.ml.online_deployments.begin_create_or_update(spec)
        except ResourceExistsError:
            log.info(
                "deployment %s/%s is already being created (a retried request); reading it back",
                endpoint,
                name,
            )
        return _deployment_state(clients.ml.online_deployments.get(name, endpoint), endpoint)


def get_online_deployment(clients: AzureClients, endpoint: str, name: str) -> DeploymentState:
    with azure_errors(f"read deployment '{name}' of endpoint '{endpoint}'"):
        try:
            dep = clients.ml.online_deployments.get(name, endpoint)
        except ResourceNotFoundError:
            raise NotFoundError(f"endpoint '{endpoint}' has no deployment '{name}'") from None
        error = None
        if _state(dep.provisioning_state) == "Failed":
            error = f"deployment '{name}' failed to provision: {_log_tail(clients, endpoint, name)}"
    return _deployment_state(dep, endpoint, error)


def _log_tail(clients: AzureClients, endpoint: str, name: str) -> str:
    try:
        logs = clients.ml.online_deployments.get_logs(name, endpoint, lines=20) or ""
    except HttpResponseError as exc:
        return f"(logs unavailable: {describe(exc, 150)})"
    return " | ".join(line for line in logs.splitlines()[-5:] if line.strip())[:600] or "(no logs)"


def set_online_traffic(
    clients: AzureClients, endpoint: str, traffic: dict[str, int], budget_s: float
) -> EndpointState:
    action = f"route traffic {traffic} on endpoint '{endpoint}'"
    with azure_errors(action):
        for name, share in traffic.items():
            state = get_online_deployment(clients, endpoint, name).provisioning_state
            if share > 0 and state != "Succeeded":
                raise BackendError(
                    f"{action}: deployment '{name}' is {state}; traffic only goes to a deployment that "
                    "succeeded"
                )
        ep = clients.ml.online_endpoints.get(endpoint)
        if {k: int(v) for k, v in (ep.traffic or {}).items() if v} != {k: v for k, v in traffic.items() if v}:
            ep.traffic = dict(traffic)
            clients.ml.online_endpoints.begin_create_or_update(ep)  # full PUT carrying the traffic split
        wait_until(
            f"endpoint '{endpoint}' applying traffic",
            lambda: _endpoint_provisioning(clients, endpoint),
            budget_s=budget_s,
        )
        return endpoint_state(clients.ml.online_endpoints.get(endpoint))


def list_online_deployments(clients: AzureClients, endpoint: str) -> list[DeploymentState]:
    with azure_errors(f"list deployments of endpoint '{endpoint}'"):
        return [_deployment_state(d, endpoint) for d in clients.ml.online_deployments.list(endpoint)]


def delete_online_deployment(clients: AzureClients, endpoint: str, name: str, budget_s: float) -> None:
    def gone() -> tuple[str, str | None]:
        try:
            return _state(clients.ml.online_deployments.get(name, endpoint).provisioning_state), None
        except ResourceNotFoundError:
            return "Gone", None

    with azure_errors(f"delete deployment '{name}' of endpoint '{endpoint}'"):
        try:
            clients.ml.online_deployments.begin_delete(name, endpoint)
        except ResourceNotFoundError:
            return
        wait_until(f"deleting deployment '{name}'", gone, budget_s=budget_s, done=frozenset({"Gone"}))


# serverless endpoints -----------------------------------------------------------------------------
def find_serverless_endpoint(clients: AzureClients, name: str):
    with azure_errors(f"read serverless endpoint '{name}'"):
        try:
            return clients.ml.serverless_endpoints.get(name)
        except ResourceNotFoundError:
            return None


def ensure_serverless_endpoint(
    clients: AzureClients, name: str, tags: dict[str, str], model: RegisteredModel, location: str
) -> EndpointState:
    from azure.ai.ml.entities import ServerlessEndpoint

    existing = find_serverless_endpoint(clients, name)
    if existing is None:
        spec = ServerlessEndpoint(name=name, model_id=model.uri, auth_mode="key", tags=tags)
        spec.location = location
        with azure_errors(f"create serverless endpoint '{name}'"):
            try:
                clients.ml.serverless_endpoints.begin_create_or_update(spec)
            except ResourceExistsError as exc:
                # Our own PUT landed and its answer was lost (azure-core retried it), or another endpoint
                # has the name: only the second is an error.
                if find_serverless_endpoint(clients, name) is None:
                    raise BackendError(
                        f"create serverless endpoint '{name}': the name is taken ({describe(exc, 200)}); "
                        "set deployment.endpoint_name to another prefix"
                    ) from None
        existing = find_serverless_endpoint(clients, name)
    return endpoint_state(existing, serverless=True)


def serverless_deployment(clients: AzureClients, endpoint: str, name: str) -> DeploymentState:
    found = find_serverless_endpoint(clients, endpoint)
    if found is None:
        raise NotFoundError(f"no serverless endpoint named '{endpoint}'")
    state = _state(found.provisioning_state)
    error = f"serverless endpoint '{endpoint}' ended {state}" if state == "Failed" else None
    return DeploymentState(
        endpoint=endpoint, name=name, provisioning_state=state, model=found.model_id, error=error
    )


# every endpoint: read, keys, list, delete ---------------------------------------------------------
def get_endpoint(clients: AzureClients, name: str) -> EndpointState:
    online = find_online_endpoint(clients, name)
    if online is not None:
        return endpoint_state(online)
    serverless = find_serverless_endpoint(clients, name)
    if serverless is not None:
        return endpoint_state(serverless, serverless=True)
    raise NotFoundError(f"no endpoint named '{name}' in workspace '{clients.target.workspace}'")


def get_keys(clients: AzureClients, name: str) -> EndpointKeys:
    ep = get_endpoint(clients, name)
    ops = clients.ml.serverless_endpoints if ep.kind == "serverless" else clients.ml.online_endpoints
    with azure_errors(f"read the keys of endpoint '{name}'"):
        keys = ops.get_keys(name)
    primary, secondary = getattr(keys, "primary_key", None), getattr(keys, "secondary_key", None)
    if not primary:
        raise BackendError(f"endpoint '{name}' does not use key auth; it was not created by this app")
    return EndpointKeys(primary=primary, secondary=secondary or "")


def list_endpoints(clients: AzureClients, idle_window: timedelta | None = None) -> list[EndpointState]:
    with azure_errors("list endpoints"):
        found = [endpoint_state(e) for e in clients.ml.online_endpoints.list()]
        found += [endpoint_state(e, serverless=True) for e in clients.ml.serverless_endpoints.list()]
    if idle_window is not None:
        for ep in found:
            if ep.kind == "online" and ep.tags.get("managed-by"):  # never query metrics for others' endpoints
                ep.last_used_at = last_request_at(clients, ep.name, idle_window)
    return found


def last_request_at(clients: AzureClients, name: str, window: timedelta) -> str | None:
    """The newest minute with requests, from Azure Monitor's RequestsPerMinute (every caller counts)."""
    t = clients.target
    resource = (
        f"/subscriptions/{t.subscription_id}/resourceGroups/{t.resource_group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{t.workspace}/onlineEndpoints/{name}"
    )
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - window
    url = (
        f"{resource}/providers/Microsoft.Insights/metrics?api-version={METRICS_API}&metricnames=RequestsPerMinute"
        f"&aggregation=Total&interval=PT1M&timespan={start:%Y-%m-%dT%H:%M:%SZ}/{end:%Y-%m-%dT%H:%M:%SZ}"
    )
    with azure_errors(f"read request metrics of endpoint '{name}'"):
        response = clients.resources.send_request(HttpRequest("GET", url))
        response.raise_for_status()
    points = [
        point["timeStamp"]
        for metric in response.json().get("value", [])
        for series in metric.get("timeseries", [])
        for point in series.get("data", [])
        if (point.get("total") or 0) > 0
    ]
    return max(points) if points else None


def delete_endpoint(clients: AzureClients, name: str, budget_s: float) -> None:
    try:
        ep = get_endpoint(clients, name)
    except NotFoundError:
        return
    ops = clients.ml.serverless_endpoints if ep.kind == "serverless" else clients.ml.online_endpoints

    def gone() -> tuple[str, str | None]:
        try:
            return _state(ops.get(name).provisioning_state), None
        except ResourceNotFoundError:
            return "Gone", None

    with azure_errors(f"delete endpoint '{name}'"):
        try:
            ops.begin_delete(name=name)
        except ResourceNotFoundError:
            return
        except HttpResponseError as exc:
            if error_code(exc) != "Conflict":
                raise
            raise ProvisioningPending(
                f"endpoint '{name}' is busy ({describe(exc, 120)}); try again later"
            ) from None
        wait_until(f"deleting endpoint '{name}'", gone, budget_s=budget_s, done=frozenset({"Gone"}))
