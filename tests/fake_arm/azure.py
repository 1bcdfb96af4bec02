"""``FakeAzure``: a stateful stand-in for Entra ID, Azure Resource Manager and Azure ML, over HTTPS.

It enforces what Azure enforces that the app could get wrong (see each module), answers
long-running operations with 201/202 and an operation to poll, and serves the deployed endpoints'
scoring URIs with the scoring contract. Blob data goes to Azurite, a real Azure Storage emulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .certs import make_test_certificates
from .identity import AppRegistration
from .server import FakeServer, Request, Response
from .store import Operation, Store

SUBSCRIPTION = "3c5f0d4e-7a1b-4c2d-9e8f-000000000001"
AML = "Microsoft.MachineLearningServices"


@dataclass
class VmSize:
    name: str
    family: str
    vcpus: int
    gpus: int
    memory_gb: float


DEFAULT_SIZES = [
    VmSize("Standard_NC24ads_A100_v4", "standardNCADSA100v4Family", 24, 1, 220.0),
    VmSize("Standard_NC48ads_A100_v4", "standardNCADSA100v4Family", 48, 2, 440.0),
    VmSize("Standard_NC96ads_A100_v4", "standardNCADSA100v4Family", 96, 4, 880.0),
    # Standard_NC6s_v3 (the tutorial's) is not offered: it was retired on 2025-09-30.
    VmSize("Standard_NC12s_v3", "standardNCSv3Family", 12, 2, 224.0),
    VmSize("Standard_DS3_v2", "standardDSv2Family", 4, 0, 14.0),
]
FAMILY_NAMES = {
    "standardNCADSA100v4Family": "Standard NCADSA100v4 Family",
    "standardNCSv3Family": "Standard NCSv3 Family",
    "standardDSv2Family": "Standard DSv2 Family",
}


@dataclass
class FakeAzureConfig:
    subscription_id: str = SUBSCRIPTION
    regions: tuple[str, ...] = ("eastus", "eastus2", "westus3", "swedencentral")
    lro_polls: int = 2
    job_statuses: tuple[str, ...] = (
        "NotStarted",
        "Queued",
        "Preparing",
        "Running",
        "Finalizing",
        "Completed",
    )
    deployment_polls: int = 3
    principal_lag: int = 1  # role assignments for a new identity fail with PrincipalNotFound this often
    sizes: list[VmSize] = field(default_factory=lambda: list(DEFAULT_SIZES))
    # (family, region) -> (current usage, limit) in vCPUs; regional total under the key ("total", region)
    quota: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    default_family_limit: int = 96
    default_total_limit: int = 200
    taken_endpoint_names: dict[str, set[str]] = field(
        default_factory=dict
    )  # region -> names in other tenants
    # The Retry-After the fake gives operation pollers. The app never waits on a poller (it reads the
    # resource's state itself), and the SDK's background poller threads must not add requests to the
    # transcript at moments that depend on timing: so they are told to come back in an hour.
    poller_retry_after_s: int = 3600


class FakeAzure:
    def __init__(self, folder: Path, config: FakeAzureConfig | None = None, *, blob=None):
        self.folder = folder
        self.config = config or FakeAzureConfig()
        self.app = AppRegistration()
        self.certs = make_test_certificates(folder / "certs")
        self.server = FakeServer(self.certs)
        self.store = Store()
        self.blob = blob  # AzuriteBlob: the storage account behind every workspace
        self.events: list[str] = []  # what the fake did on its own (operations finishing, jobs ending)
        self.principals: dict[str, int] = {}  # principal id -> PrincipalNotFound answers still to give
        self.taken_registry_names: set[str] = set()
        self.fail_compute: set[str] = set()  # clusters whose next creation ends Failed
        self.requests_per_minute: dict[str, list[tuple[str, int]]] = {}  # endpoint id -> metric points
        self.endpoint_keys: dict[
            str, dict[str, str]
        ] = {}  # endpoint id (lower) -> keys, served by listKeys only
        self.deployment_logs: dict[str, str] = {}
        self.job_progress: dict[str, int] = {}  # job id -> index into config.job_statuses
        self.connection_secrets: dict[str, dict[str, str]] = {}  # connection id (lower) -> its keys
        from .files import FileShares
        from .proxy import ConnectProxy

        self.files = FileShares()  # Azure Files shares (workspaces' working directories)
        self.flows: dict[str, dict[str, dict]] = {}  # workspace id (lower) -> flow id -> flow
        self.proxy = ConnectProxy(self.server)
        from . import identity

        identity.register(self)
        from . import arm, contents, endpoints, files, flows, jobs, registry, scoring, workspace

        for module in (arm, workspace, contents, jobs, registry, endpoints, scoring, flows, files):
            module.register(self)
        self.server.add(
            "operation-status",
            "GET",
            r"/fakeoperations/(?P<op>[^/]+)",
            lambda r, m: operation_status(self, r, m["op"]),
        )
        self.server.add(
            "operation-result",
            "GET",
            r"/fakeoperations/(?P<op>[^/]+)/result",
            lambda r, m: operation_result(self, r, m["op"]),
        )

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> FakeAzure:
        self.server.start()
        self.proxy.start()
        return self

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def environment(self) -> dict[str, str]:
        """What the app's process needs to reach this fake instead of Azure (no app code changes)."""
        return {
            "ARM_CLOUD_METADATA_URL": f"{self.url}/metadata/endpoints?api-version=2019-05-01",
            "REGISTRY_DISCOVERY_ENDPOINT_URL": f"{self.url}/",
            "AZURE_TENANT_ID": self.app.tenant_id,
            "AZURE_CLIENT_ID": self.app.client_id,
            "AZURE_CLIENT_SECRET": self.app.client_secret,
            "REQUESTS_CA_BUNDLE": str(self.certs.ca_file),
            "SSL_CERT_FILE": str(self.certs.ca_file),
            "AZURE_SUBSCRIPTION_ID": self.config.subscription_id,
            # Azure Files hosts (<account>.file.<suffix>) through the fake's tunnel; loopback goes direct.
            "HTTPS_PROXY": self.proxy.url,
            "https_proxy": self.proxy.url,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # long-running operations ------------------------------------------------------------------
    def accepted(self, op: Operation, status: int, body: dict | None, *, api_version: str | None) -> Response:
        """201/202 with the headers azure-core's ARM polling follows."""
        query = f"?api-version={api_version or '2024-01-01'}"
        status_url = f"{self.url}/fakeoperations/{op.id}{query}"
        headers = {
            "Azure-AsyncOperation": status_url,
            "Location": f"{self.url}/fakeoperations/{op.id}/result{query}",
            "Retry-After": str(self.config.poller_retry_after_s),
        }
        return Response(status, body, headers)

    def record(self, event: str) -> None:
        self.events.append(event)


def operation_status(fake: FakeAzure, req: Request, op_id: str) -> Response:
    op = fake.store.operation(op_id)
    body = {"id": f"/fakeoperations/{op.id}", "name": op.id, "status": op.status}
    if op.error:
        body["error"] = op.error
    return Response(200, body, {"Retry-After": str(fake.config.poller_retry_after_s)})


def operation_result(fake: FakeAzure, req: Request, op_id: str) -> Response:
    op = fake.store.operation(op_id)
    if op.status == "InProgress":
        location = f"{fake.url}{req.path}?api-version={req.api_version}"
        return Response(
            202, None, {"Location": location, "Retry-After": str(fake.config.poller_retry_after_s)}
        )
    if op.status == "Failed":
        return Response(400, {"error": op.error or {"code": "Failed", "message": "operation failed"}})
    found = fake.store.find(op.resource_id)
    return Response(200, found) if (found and op.kind != "delete") else Response(204)
