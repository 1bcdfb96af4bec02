"""The one place that creates the Azure credential and every Azure client the backend uses.

Production uses ``DefaultAzureCredential`` (on a Function App: the managed identity named by
``AZURE_CLIENT_ID``). The cloud is the public one unless ``ARM_CLOUD_METADATA_URL`` names ARM's
metadata document of another (a sovereign or private cloud, or the tests' fake); then the
credential's authority and every management client's base URL come from that document, exactly as
azure-ai-ml resolves them from the same variable. Clients are built lazily, once per target.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from settings import AppSettings

log = logging.getLogger(__name__)

PUBLIC_ARM = "https://management.azure.com/"
# Authorities MSAL knows; any other one is trusted because the operator configured it.
KNOWN_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)


@dataclass(frozen=True)
class AzureTarget:
    """Where a run's resources live."""

    subscription_id: str
    resource_group: str
    workspace: str

    @property
    def resource_group_id(self) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"


@dataclass(frozen=True)
class AzureCloud:
    resource_manager: str  # ends with "/"
    authority: str | None  # None = the credential's default (public cloud)

    @property
    def arm_scope(self) -> str:
        return self.resource_manager + ".default"


def resolve_cloud(settings: AppSettings) -> AzureCloud:
    """The public cloud, or the one described by the ARM metadata document at ARM_CLOUD_METADATA_URL."""
    url = settings.azure_cloud_metadata_url
    if not url:
        return AzureCloud(resource_manager=PUBLIC_ARM, authority=None)
    from azure.core.exceptions import HttpResponseError
    from azure.core.pipeline.transport import RequestsTransport
    from azure.core.rest import HttpRequest
    from azure.mgmt.core import ARMPipelineClient

    from backends.protocol import BackendError

    try:
        with ARMPipelineClient(base_url=url, policies=[], transport=RequestsTransport()) as client:
            response = client.send_request(HttpRequest("GET", url))
            response.raise_for_status()
            clouds = response.json()  # a connection failure propagates: the step is retried
    except HttpResponseError as exc:
        raise BackendError(
            f"cannot read the cloud metadata at ARM_CLOUD_METADATA_URL ({url}): {exc}; "
            "fix the URL or unset it for the Azure public cloud"
        ) from exc
    cloud = next(
        (c for c in (clouds if isinstance(clouds, list) else [clouds]) if c.get("resourceManager") in url),
        None,
    )
    if cloud is None:
        raise BackendError(
            f"ARM_CLOUD_METADATA_URL ({url}) lists no cloud whose resourceManager it is served from"
        )
    arm = cloud["resourceManager"].rstrip("/") + "/"
    return AzureCloud(resource_manager=arm, authority=cloud["authentication"]["loginEndpoint"])


class AzureClients:
    """The credential and the SDK clients for one target (subscription, resource group, workspace)."""

    def __init__(self, settings: AppSettings, target: AzureTarget, cloud: AzureCloud, credential: Any):
        self.settings = settings
        self.target = target
        self.cloud = cloud
        self.credential = credential
        timeout = settings.azure_http_timeout_seconds
        # azure-core pipeline options, forwarded by MLClient to every internal service client too.
        self.pipeline_options: dict[str, Any] = {"connection_timeout": timeout, "read_timeout": timeout}
        self._registries: dict[str, Any] = {}
        self._lock = threading.Lock()

    # azure-mgmt-* -----------------------------------------------------------------------------
    def _mgmt(self, cls: type) -> Any:
        return cls(
            self.credential,
            self.target.subscription_id,
            base_url=self.cloud.resource_manager,
            credential_scopes=[self.cloud.arm_scope],
            **self.pipeline_options,
        )

    @cached_property
    def resources(self) -> Any:
        from azure.mgmt.resource.resources import ResourceManagementClient

        return self._mgmt(ResourceManagementClient)

    @cached_property
    def identities(self) -> Any:
        from azure.mgmt.msi import ManagedServiceIdentityClient

        return self._mgmt(ManagedServiceIdentityClient)

    @cached_property
    def authorization(self) -> Any:
        from azure.mgmt.authorization import AuthorizationManagementClient

        return self._mgmt(AuthorizationManagementClient)

    @cached_property
    def container_registries(self) -> Any:
        from azure.mgmt.containerregistry import ContainerRegistryManagementClient

        return self._mgmt(ContainerRegistryManagementClient)

    # azure-ai-ml ------------------------------------------------------------------------------
    def _ml_options(self) -> dict[str, Any]:
        return {"show_progress": False, "enable_telemetry": False, **self.pipeline_options}

    @cached_property
    def ml(self) -> Any:
        """Workspace-scoped operations (data, compute, jobs, models, endpoints)."""
        from azure.ai.ml import MLClient

        t = self.target
        return MLClient(
            self.credential, t.subscription_id, t.resource_group, t.workspace, **self._ml_options()
        )

    @cached_property
    def ml_resource_group(self) -> Any:
        """Resource-group-scoped operations: creating the workspace itself."""
        from azure.ai.ml import MLClient

        t = self.target
        return MLClient(self.credential, t.subscription_id, t.resource_group, **self._ml_options())

    def registry(self, name: str) -> Any:
        """A system registry (``azureml``): base models and the fine-tuning pipeline components."""
        from azure.ai.ml import MLClient

        with self._lock:
            if name not in self._registries:
                self._registries[name] = MLClient(self.credential, registry_name=name, **self._ml_options())
            return self._registries[name]


class AzureSession:
    """The cloud and credential of this process (built once), handing out clients per target."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self._clients: dict[AzureTarget, AzureClients] = {}
        self._lock = threading.Lock()

    @cached_property
    def cloud(self) -> AzureCloud:
        return resolve_cloud(self.settings)

    @cached_property
    def credential(self) -> Any:
        from azure.identity import DefaultAzureCredential

        cloud = self.cloud
        if cloud.authority is None:
            return DefaultAzureCredential()
        host = urlsplit(cloud.authority).netloc.lower()
        return DefaultAzureCredential(
            authority=cloud.authority,
            # MSAL validates unknown authorities against the public cloud's instance discovery; an
            # authority from the operator's own cloud metadata is trusted as configured.
            disable_instance_discovery=host not in KNOWN_AUTHORITY_HOSTS,
        )

    def clients(self, target: AzureTarget) -> AzureClients:
        with self._lock:
            if target not in self._clients:
                self._clients[target] = AzureClients(self.settings, target, self.cloud, self.credential)
            return self._clients[target]
