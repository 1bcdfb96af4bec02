"""The tutorial's scenario 3: the chat flow in an Azure AI Foundry project, ready to chat in the portal.

Where it goes — one story for both modes. The hub is ``promptflow.hub`` (default ``<workspace>-hub``,
the hub serverless mode already made). The project is ``promptflow.project``, by default:
- serverless: the run's workspace, which is already a Foundry project holding the serverless
  endpoint and (from the ``promptflow_connection`` step) the custom connection;
- managed_compute: ``<workspace>-project`` on that hub, made beside the Azure ML workspace that
  serves the online endpoint; the custom connection (same name, endpoint URI and key) is made in it
  too, because a flow resolves its connection in its own project.

The flow folder is staged (its files only, no caches, the node's ``connection`` set to the configured
name) and uploaded with promptflow-azure's ``PFClient`` on the project's ``MLClient``:
``flows.create_or_update(type="chat")`` writes it to the project's ``workspaceworkingdirectory``
Azure Files share (``Users/<object id>/promptflow/<folder>-<timestamp>/``) and registers it with
the flow service (base URL from the project's ``discoveryUrl``). A flow of the run's display name
already in the project is reused, so a retried step makes no second one.

Chatting needs the cloud: in the portal, Start compute session, then Chat. No run starts one.
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tenacity import retry, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from backends.protocol import BackendError, ResourceRef, hands_back_with
from pipeline.config import MAX_WORKSPACE_NAME, RunConfig, foundry_names

from . import setup
from .clients import AzureClients
from .errors import TRANSIENT_STATUS, azure_errors, describe

log = logging.getLogger(__name__)

STAGED_SUFFIXES = (".yaml", ".yml", ".py", ".txt", ".jinja2", ".json", ".md")
CLOUD_ONLY = (
    "chatting in the portal needs a compute session, which runs only in Azure: open the flow, "
    "Start compute session, then Chat (this run starts none)"
)


@dataclass(frozen=True)
class FoundryPlace:
    hub: str
    project: str


@dataclass(frozen=True)
class FoundryProject:
    name: str
    hub: str | None  # None: an existing project was used as it is (on whatever hub it lives)
    location: str


@dataclass(frozen=True)
class PublishedFlow:
    flow_id: str
    display_name: str
    portal_url: str | None
    definition_path: str  # flow.dag.yaml in the project's working-directory file share
    created: bool


def foundry_place(workspace: str, cfg: RunConfig) -> FoundryPlace:
    """The hub and project the flow goes to (see the module docstring); the run config refuses derived
    names that are too long, this says so again for a workspace named after the run started."""
    hub, project = foundry_names(workspace, cfg)
    for field, name in (("hub", hub), ("project", project)):
        if len(name) > MAX_WORKSPACE_NAME:
            raise BackendError(
                f"the Azure AI Foundry {field} name '{name}' (derived from the workspace) is longer than "
                f"{MAX_WORKSPACE_NAME} characters; set promptflow.{field} to a shorter name"
            )
    return FoundryPlace(hub=hub, project=project)


def ensure_project(
    clients: AzureClients, place: FoundryPlace, location: str, budget_s: float
) -> tuple[FoundryProject, list[ResourceRef]]:
    """Get-or-create the hub and the project (an existing project is used whatever hub it is on)."""
    from azure.ai.ml.entities import Hub, Project

    existing = setup.read_workspace(clients, place.project)
    if existing is not None:
        if existing.kind != "project":
            raise BackendError(
                f"'{place.project}' is an Azure ML {existing.kind} workspace, not an Azure AI Foundry "
                "project; set promptflow.project to a project's name (or a new name to create one)"
            )
        return FoundryProject(name=existing.name, hub=None, location=existing.location), []
    tags = dict(setup.MANAGED_BY_TAG)
    refs: list[ResourceRef] = []
    with hands_back_with(refs):
        hub = setup._ensure_named_workspace(
            clients, place.hub, lambda: Hub(name=place.hub, location=location, tags=tags), budget_s, refs
        )
        if hub.kind != "hub":
            raise BackendError(
                f"'{place.hub}' is an Azure ML {hub.kind} workspace, not an Azure AI Foundry hub; set "
                "promptflow.hub to a hub's name (or a new name to create one)"
            )
        project = setup._ensure_named_workspace(
            clients,
            place.project,
            lambda: Project(name=place.project, hub_id=hub.id, location=location, tags=tags),
            budget_s,
            refs,
            with_key_vault=False,
        )
    return FoundryProject(name=project.name, hub=hub.name, location=project.location), refs


def stage_flow(source: Path, connection: str, dest: Path) -> Path:
    """Copy the flow's files (no caches, no local run state), its node's connection set to ``connection``."""
    dag = source / "flow.dag.yaml"
    if not dag.is_file():
        raise BackendError(f"promptflow.flow: {source} has no flow.dag.yaml")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith((".", "__")) for part in relative.parts) or not path.is_file():
            continue
        if path.suffix in STAGED_SUFFIXES:
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / relative)
    _set_connection(dest / "flow.dag.yaml", connection)
    return dest


def _set_connection(dag: Path, connection: str) -> None:
    """Rewrite only the ``connection:`` lines (comments and layout stay as a person wrote them)."""
    text = dag.read_text(encoding="utf-8")
    nodes = (yaml.safe_load(text) or {}).get("nodes") or []
    used = {
        str(n.get("inputs", {}).get("connection")) for n in nodes if n.get("inputs", {}).get("connection")
    }
    if not used:
        raise BackendError(f"{dag.parent.name}/flow.dag.yaml has no node with a connection input")
    for old in used - {connection}:
        text = re.sub(rf"(?m)^(\s+connection:\s*){re.escape(old)}\s*$", rf"\g<1>{connection}", text)
    dag.write_text(text, encoding="utf-8")
    nodes = (yaml.safe_load(text) or {}).get("nodes") or []
    if {n.get("inputs", {}).get("connection") for n in nodes if n.get("inputs", {}).get("connection")} != {
        connection
    }:
        raise BackendError(f"could not set the connection of {dag} to '{connection}'; edit the file")


def publish_chat_flow(
    project: AzureClients, staged: Path, display_name: str, tags: dict[str, str], state_dir: Path
) -> PublishedFlow:
    """Upload ``staged`` to the project as a chat flow, or find the one this run uploaded before."""
    from flows.environment import ensure_promptflow_configured

    ensure_promptflow_configured(state_dir)  # its home, telemetry and log level, before the first import
    _bridge_azure_ai_ml_datastore_type()
    from promptflow.azure import PFClient

    _forget_cached_flow_service_callers()
    _bound_flow_list_calls(project.settings.azure_http_timeout_seconds)
    t = project.target
    action = f"publish the flow '{display_name}' to Azure AI Foundry project '{t.workspace}'"
    with _promptflow_errors(action), azure_errors(action):
        pf = PFClient(
            project.credential, t.subscription_id, t.resource_group, t.workspace, ml_client=project.ml
        )
        flow, created = _find_or_create_flow(pf, staged, display_name, tags)
    log.info("flow %s %s in project %s", display_name, "created" if created else "exists", t.workspace)
    return PublishedFlow(
        flow_id=flow.name,
        display_name=flow.display_name,
        portal_url=flow.flow_portal_url,
        definition_path=flow.path,
        created=created,
    )


def _bridge_azure_ai_ml_datastore_type() -> None:
    """promptflow-azure 1.18.5 (the last release) imports ``DatastoreType`` from azure-ai-ml's versioned
    ``_restclient.v2022_10_01``, which azure-ai-ml 1.33+ no longer has (microsoft/promptflow#4176, closed
    unfixed). The enum lives on, same values, in the one TypeSpec client 1.35 ships; it is the only name
    promptflow-azure takes from there, so that module is provided with it before promptflow.azure loads.
    """
    legacy = "azure.ai.ml._restclient.v2022_10_01"
    try:
        importlib.import_module(f"{legacy}.models")
        return
    except ModuleNotFoundError:
        pass
    from azure.ai.ml._restclient.arm_ml_service.models import DatastoreType

    package, models = types.ModuleType(legacy), types.ModuleType(f"{legacy}.models")
    models.DatastoreType = DatastoreType  # type: ignore[attr-defined]
    package.models = models  # type: ignore[attr-defined]
    sys.modules.setdefault(legacy, package)
    sys.modules.setdefault(f"{legacy}.models", models)


class _RequestsWithTimeout(types.ModuleType):
    """``requests`` whose ``post`` has a timeout unless the caller gave one."""

    def __init__(self, timeout: float):
        super().__init__("requests")
        self.timeout = timeout

    def post(self, url: str, **kwargs: Any) -> Any:
        import requests

        kwargs.setdefault("timeout", self.timeout)
        return requests.post(url, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import requests

        return getattr(requests, name)


def _bound_flow_list_calls(timeout: float) -> None:
    """promptflow-azure 1.18.5 lists flows with a bare ``requests.post`` (no timeout, its module's one use
    of ``requests``): a stalled index service held the step until ``functionTimeout`` killed the worker.
    That module gets a ``requests`` whose post has the Azure calls' timeout (``AZURE_HTTP_TIMEOUT_SECONDS``);
    a timed-out list is an ``OSError``, retried by ``_find_or_create_flow``."""
    from promptflow.azure.operations import _flow_operations

    _flow_operations.requests = _RequestsWithTimeout(timeout)  # type: ignore[attr-defined]


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status behind a promptflow-azure error: its cause's, or the one its message quotes."""
    cause = exc.__cause__ or getattr(exc, "inner_exception", None)
    status = getattr(cause, "status_code", None) or getattr(exc, "status_code", None)
    if status is None:
        quoted = re.search(r"\bCode: (\d{3})\b", str(exc))  # the index service's errors quote it
        status = int(quoted.group(1)) if quoted else None
    return status


def _is_transient(exc: BaseException) -> bool:
    from azure.core.exceptions import ResourceExistsError

    cause = exc.__cause__ or getattr(exc, "inner_exception", None)
    if isinstance(cause, ResourceExistsError) and "upload flow to file share" in str(exc):
        # azure-storage-file-share retried a create whose first try had landed (a timed-out answer):
        # Azure Files says 409. A new attempt uploads into a new, timestamped folder.
        return True
    return _status_of(exc) in TRANSIENT_STATUS or isinstance(cause, OSError) or isinstance(exc, OSError)


@retry(
    retry=retry_if_exception(_is_transient),
    # Within the activity's functionTimeout: no new attempt starts after 3 minutes of them.
    stop=stop_after_attempt(5) | stop_after_delay(180),
    wait=wait_exponential(multiplier=1, max=10),
    reraise=True,
    before_sleep=lambda state: log.warning(
        "publishing the flow: %s; trying again", describe(state.outcome.exception())
    ),
)
def _find_or_create_flow(pf, staged: Path, display_name: str, tags: dict[str, str]):
    """The run's flow if an earlier try made it, else a new upload (into a new timestamped folder).

    Retried here: the index service is called with plain ``requests`` and no retry policy, and a
    folder create that timed out after it landed answers 409 on the storage SDK's own retry.
    """
    found = next((f for f in pf.flows.list(max_results=100) if f.display_name == display_name), None)
    if found is not None:
        return pf.flows.get(found.name), False
    return pf.flows.create_or_update(
        flow=str(staged), type="chat", display_name=display_name, tags=tags
    ), True


def _forget_cached_flow_service_callers() -> None:
    """promptflow-azure keeps one flow-service caller per workspace id for the life of the process, with
    the credential and service URL of the first call. A publish is once per run: start fresh, so a
    rotated credential or a recreated project (same ARM id, new discovery URL) is never served stale.
    """
    from promptflow.azure._restclient.service_caller_factory import _FlowServiceCallerFactory

    with _FlowServiceCallerFactory._instance_lock:
        _FlowServiceCallerFactory.caller_cache_by_workspace_id.clear()


@contextmanager
def _promptflow_errors(action: str) -> Iterator[None]:
    """promptflow-azure's own errors: Azure's answer (its status) decides transient vs. a person's fix."""
    from promptflow.exceptions import PromptflowException

    try:
        yield
    except PromptflowException as exc:
        if _is_transient(exc):
            raise  # outlived the client's retries: the orchestrator retries the step
        raise BackendError(f"{action}: {describe(exc)}") from None
