"""The Azure backend (``PHI3_BACKEND=azure``): the tutorial's steps through azure-ai-ml and azure-mgmt-*.

Every step is get-or-create by a name derived from the run id and safe to run again; long
operations are submitted and polled by the orchestrator (jobs, deployments) or watched for at most
``AZURE_SETUP_WAIT_SECONDS`` (workspace, registry, cluster, endpoint, traffic) and then handed back
(``StillProvisioning``) for the orchestrator to call the step again after a durable timer; Azure's errors come
back as ``BackendError`` messages that say what to do. Keys are read only by ``get_endpoint_keys``.

Where the run lives: the app settings (AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP,
AZURE_ML_WORKSPACE). A run config's ``azure`` section may restate them but not point elsewhere,
because the status polls, the bot and the cleanup timer only know the app settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from backends.protocol import (
    BackendError,
    ComputeInfo,
    DataAssets,
    DeploymentState,
    EndpointKeys,
    EndpointState,
    JobState,
    MetricPoint,
    RegisteredModel,
    ResourceRef,
    SetupResult,
    connection_ref,
    hands_back_with,
    served_before,
)
from pipeline.config import RunConfig, azure_target, azure_target_problems, resolve_project_path
from pipeline.naming import RunNames
from settings import AppSettings

from . import catalog, connections, data, deploy, finetune, models, publish, quota, setup
from .clients import AzureClients, AzureSession, AzureTarget

log = logging.getLogger(__name__)

SERVERLESS_REGION = "eastus2"
SERVERLESS_NO_IDENTITY = (
    "serverless mode: the fine-tune and the serverless endpoint run in Azure AI Foundry's own capacity, "
    "so no "
    "managed identity or role assignments of ours are involved"
)


def _region(location: str) -> str:
    return location.replace(" ", "").lower()


class AzureBackend:
    name = "azure"

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.session = AzureSession(settings)
        self.wait_s = settings.azure_setup_wait_seconds

    # where things live -------------------------------------------------------------------------
    def _target(self, cfg: RunConfig | None = None) -> AzureTarget:
        problems = azure_target_problems(cfg.azure if cfg else None, self.settings)
        if problems:
            field, message = problems[0]
            raise BackendError(f"azure.{field}: {message}")
        return AzureTarget(**azure_target(self.settings))

    def _clients(self, cfg: RunConfig | None = None) -> AzureClients:
        return self.session.clients(self._target(cfg))

    def _location(self, cfg: RunConfig) -> str:
        location = cfg.azure.location or self.settings.azure_location
        if not location:
            raise BackendError(
                "set azure.location or the app setting AZURE_LOCATION (required with PHI3_BACKEND=azure)"
            )
        return _region(location)

    def _workspace(self, clients: AzureClients) -> setup.WorkspaceInfo:
        found = setup.read_workspace(clients)
        if found is None:
            raise BackendError(
                f"workspace '{clients.target.workspace}' does not exist; run the workspace step first"
            )
        return found

    # setup -------------------------------------------------------------------------------------
    def preflight(self, cfg: RunConfig) -> dict:
        """Everything that can be refused before anything is created, checked in that order."""
        location = self._location(cfg)
        if cfg.mode == "serverless" and location != SERVERLESS_REGION:
            raise BackendError(
                f"serverless fine-tuning of Phi-3 runs only in East US 2 (eastus2), not '{location}'; set "
                "azure.location / AZURE_LOCATION to eastus2 and use a workspace (Foundry project) there"
            )
        clients = self._clients(cfg)  # refuses a run config that points elsewhere than the app settings
        model = catalog.base_model(clients, cfg.azure.registry, cfg.model.name)
        details: dict = {"base_model": model.id, "location": location}
        if cfg.mode == "serverless":
            if model.serverless_regions and location not in model.serverless_regions:
                raise BackendError(
                    f"{model.name} v{model.version} deploys serverless fine-tunes only in "
                    f"{', '.join(model.serverless_regions)}"
                )
            return details
        component = catalog.pipeline_component(clients, cfg.azure.registry)
        finetune.component_inputs(cfg.hyperparameters, component)  # refuses undeclared hyperparameters
        lines = quota.check(clients, cfg, location)
        details["quota"] = [line.describe() for line in lines]
        details["component"] = component.id
        sku = cfg.deployment.instance_type
        if model.inference_skus and sku.lower() not in {s.lower() for s in model.inference_skus}:
            warning = (
                f"deployment.instance_type {sku} is not in {model.name}'s inference-recommended-sku list "
                f"({', '.join(model.inference_skus)}); the deployment may fail to load the model"
            )
            log.warning(warning)
            details["warning"] = warning
        return details

    def ensure_workspace(self, cfg: RunConfig) -> SetupResult:
        details = self.preflight(cfg)
        clients = self._clients(cfg)
        serverless = cfg.mode == "serverless"
        workspace, created = setup.ensure_workspace(
            clients, self._location(cfg), self.wait_s, foundry_project=serverless
        )
        details.update(
            workspace=workspace.id,
            storage_account=workspace.storage_account,
            container_registry=workspace.container_registry,
        )
        what = "Azure AI Foundry project" if serverless else "workspace"
        return SetupResult(
            summary=f"{what} {workspace.name} in {workspace.location}",
            details=details,
            created=created,
        )

    def ensure_identity(self, cfg: RunConfig) -> SetupResult:
        if cfg.mode == "serverless":
            return SetupResult(summary="", skipped=SERVERLESS_NO_IDENTITY)
        name = cfg.azure.identity_name
        identity, created = setup.ensure_identity(self._clients(cfg), name, self._location(cfg))
        return SetupResult(
            summary=f"user-assigned identity {name} (principal {identity.principal_id})",
            details={
                "identity": {
                    "id": identity.id,
                    "principal_id": identity.principal_id,
                    "client_id": identity.client_id,
                }
            },
            created=[ResourceRef(kind="identity", name=name)] if created else [],
        )

    def ensure_role_assignments(self, cfg: RunConfig) -> SetupResult:
        if cfg.mode == "serverless":
            return SetupResult(summary="", skipped=SERVERLESS_NO_IDENTITY)
        clients = self._clients(cfg)
        identity = setup.read_identity(clients, cfg.azure.identity_name)
        ws = self._workspace(clients)
        grants = [
            ("Contributor", clients.target.resource_group_id, setup.CONTRIBUTOR),
            ("Storage Blob Data Reader", ws.storage_account, setup.STORAGE_BLOB_DATA_READER),
            ("AcrPull", ws.container_registry, setup.ACR_PULL),
        ]
        outcomes, created = {}, []
        for label, scope, role in grants:
            if not scope:
                raise BackendError(f"workspace '{ws.name}' has no {label} scope (storage account / registry)")
            outcome = setup.assign_role(clients, scope, role, identity.principal_id, self.wait_s)
            outcomes[label] = outcome
            if outcome == "created":
                created.append(
                    ResourceRef(
                        kind="role_assignment",
                        name=setup.role_assignment_name(scope, identity.principal_id, role),
                    )
                )
        summary = ", ".join(f"{label} ({outcome})" for label, outcome in outcomes.items())
        return SetupResult(
            summary=f"roles for {cfg.azure.identity_name}: {summary}",
            details={"roles": outcomes},
            created=created,
        )

    def check_quota(self, cfg: RunConfig) -> SetupResult:
        if cfg.mode == "serverless":
            return SetupResult(
                summary="", skipped="serverless fine-tuning and endpoints use no Azure ML vCPU quota"
            )
        lines = quota.check(self._clients(cfg), cfg, self._location(cfg))
        return SetupResult(
            summary="; ".join(f"{line.quota}: {line.free} free ≥ {line.need} needed" for line in lines),
            details={"quota": [line.describe() for line in lines]},
        )

    # data --------------------------------------------------------------------------------------
    def token_counter(self, cfg: RunConfig) -> tuple[Callable[[str], int] | None, str | None]:
        # The base model's tokenizer lives in the registry, not on this machine: estimate from bytes.
        return None, None

    def upload_data(self, run_id: str, train_file: Path, validation_file: Path) -> DataAssets:
        names = RunNames.for_run(run_id, RunConfig())  # data asset names depend on the run id only
        clients = self._clients()
        return DataAssets(
            train=data.ensure_data_asset(clients, names.train_data, train_file),
            validation=data.ensure_data_asset(clients, names.validation_data, validation_file),
        )

    # fine-tune ---------------------------------------------------------------------------------
    def ensure_compute(self, cfg: RunConfig) -> ComputeInfo:
        if cfg.mode == "serverless":
            return ComputeInfo(
                name="serverless",
                size="",
                state="Succeeded",
                summary="serverless fine-tuning needs no cluster",
            )
        return finetune.ensure_cluster(self._clients(cfg), cfg, self.wait_s)

    def submit_finetune(
        self, job_name: str, cfg: RunConfig, data_assets: DataAssets, run_id: str
    ) -> JobState:
        clients = self._clients(cfg)
        registry = cfg.azure.registry

        def build():
            model = catalog.base_model(clients, registry, cfg.model.name)
            if cfg.mode == "serverless":
                model_name = RunNames.for_run(run_id, cfg).model
                return finetune.serverless_job(job_name, run_id, cfg, data_assets, model, model_name)
            component = catalog.pipeline_component(clients, registry)
            inputs = finetune.component_inputs(cfg.hyperparameters, component)
            gpus = max(1, quota.vm_sizes(clients, self._location(cfg))[cfg.compute.size.lower()].gpus)
            return finetune.pipeline_job(
                job_name, run_id, cfg, data_assets, model, component.entity, inputs, gpus
            )

        return finetune.submit(clients, job_name, cfg, data_assets, build)

    def get_job(self, job_name: str) -> JobState:
        return finetune.get_job(self._clients(), job_name)

    def cancel_job(self, job_name: str) -> JobState:
        return finetune.cancel_job(self._clients(), job_name)

    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]:
        # Azure ML keeps job metrics in its MLflow tracking server (azureml-mlflow, not installed here);
        # the studio link in the job status shows the loss curves.
        return {}

    # deploy ------------------------------------------------------------------------------------
    def register_model(self, job_name: str, model_name: str, tags: dict[str, str]) -> RegisteredModel:
        clients = self._clients()
        job = finetune.find_job(clients, job_name)
        if job is not None and finetune.is_serverless(job):
            ws = self._workspace(clients)
            return finetune.serverless_model(clients, job_name, ws.location, ws.workspace_guid or "")
        return finetune.register_pipeline_model(clients, job_name, model_name, tags)

    def ensure_endpoint(self, name: str, tags: dict[str, str], cfg: RunConfig) -> EndpointState:
        clients = self._clients(cfg)
        if cfg.mode == "serverless":
            run_id = tags.get("run-id")
            if not run_id:
                raise BackendError(
                    f"endpoint '{name}': tags must carry the run-id of the fine-tune it serves"
                )
            names = RunNames.for_run(run_id, cfg)
            ws = self._workspace(clients)
            model = finetune.serverless_model(clients, names.job, ws.location, ws.workspace_guid or "")
            return deploy.ensure_serverless_endpoint(clients, name, tags, model, ws.location)
        identity = setup.read_identity(clients, cfg.azure.identity_name)
        return deploy.ensure_online_endpoint(clients, name, tags, identity.id, self.wait_s)

    def ensure_deployment(
        self, endpoint: str, deployment: str, model: RegisteredModel, cfg: RunConfig
    ) -> DeploymentState:
        clients = self._clients(cfg)
        if cfg.mode == "serverless":
            return deploy.serverless_deployment(clients, endpoint, deployment)
        return deploy.ensure_online_deployment(clients, endpoint, deployment, model, cfg, self.wait_s)

    def get_deployment(self, endpoint: str, deployment: str) -> DeploymentState:
        clients = self._clients()
        if deploy.find_online_endpoint(clients, endpoint) is None and deploy.find_serverless_endpoint(
            clients, endpoint
        ):
            return deploy.serverless_deployment(clients, endpoint, deployment)
        return deploy.get_online_deployment(clients, endpoint, deployment)

    def set_traffic(self, endpoint: str, traffic: dict[str, int]) -> EndpointState:
        clients = self._clients()
        ep = deploy.get_endpoint(clients, endpoint)
        if ep.kind == "serverless":  # one model per serverless endpoint: all of it goes there
            return ep.model_copy(update={"traffic": {name: 100 for name in traffic}})
        return deploy.set_online_traffic(clients, endpoint, traffic, self.wait_s)

    def list_deployments(self, endpoint: str) -> list[DeploymentState]:
        clients = self._clients()
        ep = deploy.get_endpoint(clients, endpoint)
        if ep.kind == "serverless":
            return []
        return deploy.list_online_deployments(clients, endpoint)

    def managed_model(self, deployment_model: str | None) -> RegisteredModel | None:
        return models.managed_model(self._clients(), deployment_model)

    def delete_model_version(self, name: str, version: str) -> None:
        models.delete_model_version(self._clients(), name, version)

    def delete_deployment(self, endpoint: str, deployment: str) -> None:
        deploy.delete_online_deployment(self._clients(), endpoint, deployment, self.wait_s)

    # endpoints at the point of use ------------------------------------------------------------
    def get_endpoint(self, name: str) -> EndpointState:
        return deploy.get_endpoint(self._clients(), name)

    def get_endpoint_keys(self, name: str) -> EndpointKeys:
        return deploy.get_keys(self._clients(), name)

    def list_endpoints(self) -> list[EndpointState]:
        return deploy.list_endpoints(self._clients())

    def endpoint_last_used(self, name: str, window_minutes: int) -> str | None:
        return deploy.last_request_at(self._clients(), name, timedelta(minutes=window_minutes))

    def delete_endpoint(self, name: str) -> None:
        deploy.delete_endpoint(self._clients(), name, self.wait_s)

    # integrate ---------------------------------------------------------------------------------
    def _upsert_connection(
        self, clients: AzureClients, name: str, endpoint: str, project: str | None = None
    ) -> tuple[str, ResourceRef]:
        """The endpoint's scoring URI and key (read now, from ``clients``' workspace) into connection
        ``name`` of that workspace, or of Foundry ``project``: (created | updated, its record)."""
        into = self._in_project(clients, project)
        ep = deploy.get_endpoint(clients, endpoint)
        key = deploy.get_keys(clients, endpoint).primary.get_secret_value()
        before = served_before(*connections.connection_targets(into, name), ep.scoring_uri)
        # The record is made before the write: nothing that can fail may come between the two.
        ref = connection_ref(self, name, before, endpoint, project)
        outcome = connections.upsert_custom_connection(into, name, ep.scoring_uri or "", key, before)
        return outcome, ref

    def _in_project(self, clients: AzureClients, project: str | None) -> AzureClients:
        if project is None or project == clients.target.workspace:
            return clients
        return self.session.clients(replace(clients.target, workspace=project))

    def ensure_promptflow_connection(
        self, name: str, endpoint: str, cfg: RunConfig | None = None, project: str | None = None
    ) -> SetupResult:
        outcome, ref = self._upsert_connection(self._clients(cfg), name, endpoint, project)
        store = f"project {project}" if project else "workspace"
        return SetupResult(
            summary=f"{store} connection {name} {outcome} -> endpoint {endpoint}",
            details={"connection": {"name": name, "endpoint": endpoint, "store": store}},
            created=[ref],
        )

    def promptflow_connection_target(self, name: str, project: str | None = None) -> str | None:
        return connections.connection_target(self._in_project(self._clients(), project), name)

    def delete_promptflow_connection(self, name: str, project: str | None = None) -> None:
        connections.delete_connection(self._in_project(self._clients(), project), name)

    def publish_flow(self, connection: str, endpoint: str, display_name: str, cfg: RunConfig) -> SetupResult:
        """The tutorial's scenario 3: hub + project, the connection in the project, the chat flow in it."""
        if not cfg.promptflow.publish:
            return SetupResult(summary="", skipped="promptflow.publish is false: the flow was not uploaded")
        clients = self._clients(cfg)
        place = publish.foundry_place(clients.target.workspace, cfg)
        staged = publish.stage_flow(
            resolve_project_path(cfg.promptflow.flow),
            connection,
            self.settings.state_dir / "promptflow-publish" / display_name,
        )
        project, created = publish.ensure_project(clients, place, self._location(cfg), self.wait_s)
        in_project = self._in_project(clients, project.name)
        # A failed upload must not lose the record of the connection re-pointed at this run's endpoint:
        # the run's cleanup points it back (or deletes it) only if the record says it was.
        with hands_back_with(created):
            if project.name != clients.target.workspace:  # else the promptflow_connection step made it
                created.append(self._upsert_connection(clients, connection, endpoint, project.name)[1])
            tags = {**setup.MANAGED_BY_TAG, "connection": connection}
            flow = publish.publish_chat_flow(in_project, staged, display_name, tags, self.settings.state_dir)
        # The display name names the run (activities.publish), so a flow found by it is the one an
        # earlier try of this step uploaded, even if that try died before it could say so.
        created.append(ResourceRef(kind="flow", name=flow.flow_id, parent=project.name))
        return SetupResult(
            summary=(
                f"chat flow '{flow.display_name}' {'uploaded to' if flow.created else 'already in'} Azure AI "
                f"Foundry project {project.name} (connection {connection}); {publish.CLOUD_ONLY}"
            ),
            details={
                "published_flow": {
                    "hub": project.hub,
                    "project": project.name,
                    "flow_id": flow.flow_id,
                    "display_name": flow.display_name,
                    "portal_url": flow.portal_url,
                    "definition_path": flow.definition_path,
                    "connection": connection,
                    "note": publish.CLOUD_ONLY,
                }
            },
            created=created,
        )

    # evaluation --------------------------------------------------------------------------------
    def ensure_base_deployment(
        self, endpoint: str, deployment: str, job_name: str, model_name: str, cfg: RunConfig
    ) -> DeploymentState | None:
        """The catalog model beside the fine-tuned one; only with AZURE_EVALUATE_BASE_MODEL (a 2nd GPU)."""
        if not self.settings.azure_evaluate_base_model or cfg.mode == "serverless":
            return None
        clients = self._clients(cfg)
        base = catalog.base_model(clients, cfg.azure.registry, cfg.model.name)
        model = RegisteredModel(name=base.name, version=base.version, uri=base.id)
        return deploy.ensure_online_deployment(clients, endpoint, deployment, model, cfg, self.wait_s)

    def log_evaluation(self, run_id: str, metrics: dict[str, dict], artifacts: list[Path]) -> str:
        # Azure ML's MLflow tracking needs the azureml-mlflow plugin, which this app does not install:
        # say so instead of pretending.
        log.info("evaluation run_id=%s metrics=%s artifacts=%s", run_id, metrics, [a.name for a in artifacts])
        return (
            "not logged to the workspace's MLflow (that needs the azureml-mlflow plugin, which this app does "
            "not install): the metrics are in this summary, the per-row files on the Function App's disk"
        )
