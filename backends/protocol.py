"""The seam between the pipeline and where it runs: ``MLBackend``, implemented by ``azure`` and ``local``.

Names and states follow Azure ML (job status NotStarted/Queued/Preparing/Running/Finalizing/
Completed/Failed/Canceled; provisioning states Creating/Updating/Succeeded/Failed/Deleting), so
the orchestrator reads the same on both. Every result is small and JSON-safe (it crosses Durable
history); secrets come back only from ``get_endpoint_keys``, never from any other call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field, SecretStr

from pipeline.config import RunConfig

JOB_TERMINAL = frozenset({"Completed", "Failed", "Canceled", "NotResponding", "Paused"})
JOB_STATES = (
    "NotStarted",
    "Queued",
    "Preparing",
    "Provisioning",
    "Starting",
    "Running",
    "CancelRequested",
    "Finalizing",
    "Completed",
    "Failed",
    "Canceled",
    "NotResponding",
    "Paused",
)
PROVISIONING_TERMINAL = frozenset({"Succeeded", "Failed", "Canceled"})


class BackendError(Exception):
    """A failure a person must act on (bad config, quota, a resource in a bad state): not retried.

    ``created``: what the call created before it failed (see ``hands_back_with``); the failed step's
    result carries it, so the run's record (and its cleanup) knows those resources exist.
    """

    def __init__(self, *args: object, created: list[ResourceRef] | None = None) -> None:
        super().__init__(*args)
        self.created: list[ResourceRef] = list(created or [])


class NotFoundError(BackendError):
    """The named resource does not exist (get-or-create treats this, and only this, as 'create')."""


class StillProvisioning(Exception):
    """An operation the step started is still under way after the step's short wait. The step hands back
    to the orchestrator, which calls it again after a durable timer (the step is idempotent, so the call
    picks the operation up where Azure is) — no activity sits on a long poller.

    ``created``: what the call created before handing back. The call that finishes the step finds those
    resources already there, so this is the only record that this run made them.
    """

    def __init__(self, *args: object, created: list[ResourceRef] | None = None) -> None:
        super().__init__(*args)
        self.created: list[ResourceRef] = list(created or [])


@contextmanager
def hands_back_with(created: list[ResourceRef]) -> Iterator[None]:
    """Whatever `created` holds when the block hands back (StillProvisioning) or fails for good
    (BackendError) goes with the hand-back or the failure."""
    try:
        yield
    except (StillProvisioning, BackendError) as stopped:
        stopped.created.extend(ref for ref in created if ref not in stopped.created)
        raise


class ResourceRef(BaseModel):
    """Something a run created, so a failed run can say what exists and clean it up."""

    kind: (
        str  # job | model | endpoint | deployment | data | compute | identity | role_assignment | connection
    )
    name: str
    parent: str | None = None
    version: str | None = None
    # A shared thing the run re-pointed rather than made (the Prompt flow connection, which every run
    # names alike): the endpoint it served before, which a failed run's cleanup points it back to.
    previous: str | None = None


class SetupResult(BaseModel):
    """Outcome of a setup step; ``skipped`` explains why a step does not apply to this backend."""

    summary: str
    skipped: str | None = None
    details: dict = Field(default_factory=dict)
    created: list[ResourceRef] = Field(default_factory=list)


class DataAsset(BaseModel):
    name: str
    version: str
    uri: str
    sha256: str | None = None


class DataAssets(BaseModel):
    train: DataAsset
    validation: DataAsset


class ComputeInfo(BaseModel):
    name: str
    size: str
    state: str
    summary: str
    created: list[ResourceRef] = Field(default_factory=list)


class JobState(BaseModel):
    name: str
    status: str
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    error: str | None = None
    link: str | None = None  # studio URL (Azure) or the job's log file (local)
    device: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in JOB_TERMINAL


class RegisteredModel(BaseModel):
    name: str
    version: str
    uri: str


class EndpointState(BaseModel):
    name: str
    scoring_uri: str | None = None
    provisioning_state: str
    tags: dict[str, str] = Field(default_factory=dict)
    traffic: dict[str, int] = Field(default_factory=dict)
    last_used_at: str | None = None
    # When it was created (ISO 8601); with last_used_at, what the cleanup timer measures idleness from.
    created_at: str | None = None
    kind: str = "online"  # online (managed online endpoint, scoring contract) | serverless (Azure AI Foundry)


class DeploymentState(BaseModel):
    endpoint: str
    name: str
    provisioning_state: str
    model: str | None = None
    error: str | None = None


class EndpointKeys(BaseModel):
    primary: SecretStr
    secondary: SecretStr


class MetricPoint(BaseModel):
    step: int
    value: float


@runtime_checkable
class MLBackend(Protocol):
    name: str

    # setup
    def ensure_workspace(self, cfg: RunConfig) -> SetupResult: ...
    def ensure_identity(self, cfg: RunConfig) -> SetupResult: ...
    def ensure_role_assignments(self, cfg: RunConfig) -> SetupResult: ...
    def check_quota(self, cfg: RunConfig) -> SetupResult: ...

    # data
    def token_counter(self, cfg: RunConfig) -> tuple[Callable[[str], int] | None, str | None]: ...
    def upload_data(self, run_id: str, train_file: Path, validation_file: Path) -> DataAssets: ...

    # fine-tune
    def ensure_compute(self, cfg: RunConfig) -> ComputeInfo: ...
    def submit_finetune(self, job_name: str, cfg: RunConfig, data: DataAssets, run_id: str) -> JobState: ...
    def get_job(self, job_name: str) -> JobState: ...
    def cancel_job(self, job_name: str) -> JobState: ...
    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]: ...

    # deploy
    def register_model(self, job_name: str, model_name: str, tags: dict[str, str]) -> RegisteredModel: ...
    def ensure_endpoint(self, name: str, tags: dict[str, str], cfg: RunConfig) -> EndpointState: ...
    def ensure_deployment(
        self,
        endpoint: str,
        deployment: str,
        model: RegisteredModel,
        cfg: RunConfig,
    ) -> DeploymentState: ...
    def get_deployment(self, endpoint: str, deployment: str) -> DeploymentState: ...
    def set_traffic(self, endpoint: str, traffic: dict[str, int]) -> EndpointState: ...
    def list_deployments(self, endpoint: str) -> list[DeploymentState]: ...
    def delete_deployment(self, endpoint: str, deployment: str) -> None: ...

    # endpoints at the point of use (bot, connection, cleanup)
    def get_endpoint(self, name: str) -> EndpointState: ...
    def get_endpoint_keys(self, name: str) -> EndpointKeys: ...
    def list_endpoints(self) -> list[EndpointState]: ...
    def endpoint_last_used(self, name: str, window_minutes: int) -> str | None: ...
    def delete_endpoint(self, name: str) -> None: ...
    # cleanup: the model version a deployment serves, if this app registered it (None: a catalog or
    # registry model, someone else's, or gone), and deleting one (refused while a deployment uses it)
    def managed_model(self, deployment_model: str | None) -> RegisteredModel | None: ...
    def delete_model_version(self, name: str, version: str) -> None: ...

    # integrate: the Prompt flow custom connection (endpoint + key) the flow resolves by name; ``project``:
    # the copy in an Azure AI Foundry project (publish_flow) instead of the workspace's. Its ref's
    # ``previous`` names the endpoint it served before (see ``endpoint_serving``).
    def ensure_promptflow_connection(
        self, name: str, endpoint: str, cfg: RunConfig | None = None, project: str | None = None
    ) -> SetupResult: ...
    def promptflow_connection_target(self, name: str, project: str | None = None) -> str | None: ...
    def delete_promptflow_connection(self, name: str, project: str | None = None) -> None: ...
    # the chat flow in an Azure AI Foundry project (the tutorial's scenario 3); local: skipped with the reason
    def publish_flow(
        self, connection: str, endpoint: str, display_name: str, cfg: RunConfig
    ) -> SetupResult: ...

    # evaluation: the base model served beside the fine-tuned one (None = not offered by this backend)
    def ensure_base_deployment(
        self, endpoint: str, deployment: str, job_name: str, model_name: str, cfg: RunConfig
    ) -> DeploymentState | None: ...
    def log_evaluation(
        self, run_id: str, metrics: dict[str, dict], artifacts: list[Path]
    ) -> str: ...  # where


def endpoint_serving(backend: MLBackend, scoring_uri: str | None) -> str | None:
    """The name of the backend's endpoint at ``scoring_uri`` (what a connection points at); None: none."""
    if not scoring_uri:
        return None
    return next((ep.name for ep in backend.list_endpoints() if ep.scoring_uri == scoring_uri), None)


def served_before(target: str | None, recorded: str | None, scoring_uri: str | None) -> str | None:
    """What a connection served before a run points it at ``scoring_uri``: its ``target`` now, unless it
    already points there. Then an earlier try of this very step re-pointed it (the answer was lost: the
    instance died or the call failed after the write), and what it served before is the URI that try
    ``recorded`` in the connection itself; read as "nothing", the run's cleanup would delete a connection
    an earlier run's flow still uses."""
    return recorded if target is not None and target == scoring_uri else target


def connection_ref(
    backend: MLBackend, name: str, before: str | None, endpoint: str, project: str | None = None
) -> ResourceRef:
    """The record of connection ``name`` pointed at ``endpoint``, when it pointed at ``before`` (a URI)."""
    previous = endpoint_serving(backend, before)
    return ResourceRef(
        kind="connection", name=name, parent=project, previous=None if previous == endpoint else previous
    )
