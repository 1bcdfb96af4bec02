"""Step 3 of the tutorial: the compute cluster, the fine-tune job (two modes) and the model it makes.

``managed_compute`` runs the registry's ``chat_completion_pipeline`` component on our cluster; its
declared inputs are read at run time and hyperparameters it does not declare are refused rather
than silently dropped. ``serverless`` uses ``create_finetuning_job`` with no compute (Azure AI
Foundry, East US 2 for Phi-3); the job registers its output model itself. Jobs are submitted under
the run's deterministic name and looked up first, so a retry never submits a second one.
"""

from __future__ import annotations

import logging

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from backends.protocol import (
    BackendError,
    ComputeInfo,
    DataAssets,
    JobState,
    RegisteredModel,
    ResourceRef,
    hands_back_with,
)
from pipeline.config import Hyperparameters, RunConfig

from .catalog import BaseModel, PipelineComponent
from .clients import AzureClients
from .errors import azure_errors, describe, not_found, wait_until

log = logging.getLogger(__name__)

EXPERIMENT = "phi3-finetune"
PIPELINE_OUTPUT = "trained_model"
SERVERLESS_OUTPUT = "registered_model"
# Our hyperparameter -> the pipeline component's input (booleans are the strings "true"/"false").
COMPONENT_INPUT_NAMES = {
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler_type",
    "num_train_epochs": "num_train_epochs",
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "max_seq_length": "max_seq_length",
    "apply_lora": "apply_lora",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "seed": "seed",
}
# What the serverless (MaaS) fine-tuning API takes, as strings (names from the official SDK samples).
SERVERLESS_HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size")


# compute ----------------------------------------------------------------------------------------
def _cluster_state(clients: AzureClients, name: str) -> tuple[str, str | None]:
    compute = clients.ml.compute.get(name)
    state = (compute.provisioning_state or "Unknown").capitalize()
    errors = getattr(compute, "provisioning_errors", None)
    return state, (describe(Exception(str(errors))) if errors else None)


def ensure_cluster(clients: AzureClients, cfg: RunConfig, budget_s: float) -> ComputeInfo:
    """Get-or-create the cluster; one that is (or ends up) Failed is deleted and created once more."""
    spec = cfg.compute
    created: list[ResourceRef] = []
    # hands_back_with outside azure_errors: an Azure error it turns into a BackendError carries the cluster.
    with hands_back_with(created), azure_errors(f"create compute cluster '{spec.name}'"):
        for attempt in (1, 2):
            try:
                existing = clients.ml.compute.get(spec.name)
            except ResourceNotFoundError:
                existing = None
            if existing is not None and (existing.provisioning_state or "").lower() == "failed":
                log.warning("compute cluster %s is Failed; deleting and recreating it", spec.name)
                _delete_cluster(clients, spec.name, budget_s)
                existing = None
            if existing is not None and existing.size and existing.size.lower() != spec.size.lower():
                raise BackendError(
                    f"compute cluster '{spec.name}' exists with size {existing.size}, not {spec.size}; set "
                    "compute.name to a new cluster name or compute.size to the existing size"
                )
            if existing is None:
                _create_cluster(clients, cfg)
                created.append(ResourceRef(kind="compute", name=spec.name))
            state = wait_until(
                f"compute cluster '{spec.name}'",
                lambda: _cluster_state(clients, spec.name),
                budget_s=budget_s,
                done=frozenset({"Succeeded", "Failed"}),
            )
            if state == "Succeeded":
                break
            if attempt == 2:
                _, error = _cluster_state(clients, spec.name)
                raise BackendError(f"compute cluster '{spec.name}' failed to provision twice: {error}")
    nodes = f"{spec.min_instances}..{spec.max_instances} nodes"
    summary = f"cluster {spec.name}: {spec.size}, {nodes}, idle {spec.idle_time_before_scale_down} s"
    return ComputeInfo(name=spec.name, size=spec.size, state=state, summary=summary, created=created[:1])


def _create_cluster(clients: AzureClients, cfg: RunConfig) -> None:
    from azure.ai.ml.entities import AmlCompute

    spec = cfg.compute
    cluster = AmlCompute(
        name=spec.name,
        size=spec.size,
        tier="Dedicated",
        min_instances=spec.min_instances,
        max_instances=spec.max_instances,
        idle_time_before_scale_down=spec.idle_time_before_scale_down,
    )
    try:
        clients.ml.compute.begin_create_or_update(cluster)
    except ResourceExistsError:
        log.info("cluster %s is already being created (a retried request)", spec.name)


def _delete_cluster(clients: AzureClients, name: str, budget_s: float) -> None:
    clients.ml.compute.begin_delete(name)
    wait_until(
        f"deleting failed cluster '{name}'",
        lambda: _gone(clients, name),
        budget_s=budget_s,
        done=frozenset({"Gone"}),
    )


def _gone(clients: AzureClients, name: str) -> tuple[str, str | None]:
    try:
        return (clients.ml.compute.get(name).provisioning_state or "Deleting").capitalize(), None
    except ResourceNotFoundError:
        return "Gone", None


# job submission ---------------------------------------------------------------------------------
def component_inputs(hp: Hyperparameters, component: PipelineComponent) -> dict:
    """Our hyperparameters as component inputs; an undeclared one is an error unless left at its default."""
    defaults = Hyperparameters()
    values, refused = {}, []
    for ours, theirs in COMPONENT_INPUT_NAMES.items():
        value = getattr(hp, ours)
        if theirs not in component.inputs:
            if value != getattr(defaults, ours):
                refused.append(f"hyperparameters.{ours}")
            continue
        values[theirs] = ("true" if value else "false") if isinstance(value, bool) else value
    if refused:
        raise BackendError(
            f"{', '.join(refused)}: not an input of {component.id}; its inputs are "
            f"{', '.join(sorted(component.inputs))}. Leave these hyperparameters at their defaults for "
            "managed_compute."
        )
    return values


def job_state(job) -> JobState:
    status = getattr(job.status, "value", job.status) or "NotStarted"
    error = None
    if status in ("Failed", "Canceled", "NotResponding"):
        error = f"fine-tune job {job.name} ended {status}; see its logs at {job.studio_url}"
    return JobState(name=job.name, status=status, link=job.studio_url, error=error)


def find_job(clients: AzureClients, name: str):
    with azure_errors(f"read job '{name}'"):
        try:
            return clients.ml.jobs.get(name)
        except ResourceNotFoundError:
            return None


def submit(clients: AzureClients, job_name: str, cfg: RunConfig, data: DataAssets, build) -> JobState:
    """Get-or-create the job named ``job_name``; ``build()`` makes the job entity only when needed."""
    existing = find_job(clients, job_name)
    if existing is not None:
        return job_state(existing)
    job = build()
    with azure_errors(f"submit fine-tune job '{job_name}'"):
        try:
            created = clients.ml.jobs.create_or_update(job, experiment_name=EXPERIMENT)
        except ResourceExistsError:  # our PUT landed but its answer was lost
            created = clients.ml.jobs.get(job_name)
    return job_state(created)


def pipeline_job(
    job_name: str,
    run_id: str,
    cfg: RunConfig,
    data: DataAssets,
    model: BaseModel,
    component,
    inputs: dict,
    gpus: int,
):
    from azure.ai.ml import Input
    from azure.ai.ml.dsl import pipeline

    cluster = cfg.compute.name

    @pipeline(name=f"phi3-finetune-{run_id}", description=f"Fine-tune {model.name} (run {run_id})")
    def phi3_finetune():
        node = component(
            mlflow_model_path=Input(type="mlflow_model", path=model.id),
            train_file_path=Input(type="uri_file", path=data.train.uri),
            validation_file_path=Input(type="uri_file", path=data.validation.uri),
            task_name="ChatCompletion",
            compute_model_import=cluster,
            compute_preprocess=cluster,
            compute_finetune=cluster,
            compute_model_evaluation=cluster,
            number_of_gpu_to_use_finetuning=gpus,
            **inputs,
        )
        return {PIPELINE_OUTPUT: node.outputs.mlflow_model_folder}

    job = phi3_finetune()
    job.name = job_name
    job.display_name = f"phi3-finetune {run_id}"
    job.tags = {"managed-by": "phi3-finetune-functions", "run-id": run_id}
    job.settings.force_rerun = True
    job.settings.continue_on_step_failure = False
    return job


def serverless_job(
    job_name: str, run_id: str, cfg: RunConfig, data: DataAssets, model: BaseModel, model_name: str
):
    from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

    hp = cfg.hyperparameters
    hyper = {name: str(getattr(hp, name)) for name in SERVERLESS_HYPERPARAMETERS}
    if hp.batch_size_multiplier is not None:
        hyper["batch_size_multiplier"] = str(hp.batch_size_multiplier)
    return create_finetuning_job(
        model=model.id,
        task=FineTuningTaskType.CHAT_COMPLETION,
        training_data=data.train.uri,
        # Always given: azure-ai-ml 1.35 raises UnboundLocalError without it (azure-sdk-for-python#45771).
        validation_data=data.validation.uri,
        hyperparameters=hyper,
        output_model_name_prefix=model_name,
        name=job_name,
        experiment_name=EXPERIMENT,
        display_name=f"phi3-finetune {run_id}",
        tags={"managed-by": "phi3-finetune-functions", "run-id": run_id},
    )


def is_serverless(job) -> bool:
    """A standalone fine-tuning job with no compute is a serverless (Azure AI Foundry) one."""
    return getattr(job, "type", "") == "finetuning" and not getattr(job, "compute", None)


def get_job(clients: AzureClients, job_name: str) -> JobState:
    with azure_errors(f"read job '{job_name}'"):
        try:
            return job_state(clients.ml.jobs.get(job_name))
        except ResourceNotFoundError as exc:
            raise not_found(
                f"no fine-tune job named '{job_name}' in workspace '{clients.target.workspace}'", exc
            ) from None


def cancel_job(clients: AzureClients, job_name: str) -> JobState:
    with azure_errors(f"cancel job '{job_name}'"):
        try:
            clients.ml.jobs.begin_cancel(job_name)
        except ResourceNotFoundError:
            raise BackendError(f"no fine-tune job named '{job_name}'") from None
    return get_job(clients, job_name)


# the fine-tuned model ----------------------------------------------------------------------------
def register_pipeline_model(
    clients: AzureClients, job_name: str, model_name: str, tags: dict[str, str]
) -> RegisteredModel:
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    job = get_job(clients, job_name)
    if job.status != "Completed":
        raise BackendError(
            f"job '{job_name}' is {job.status}; only a Completed job's model can be registered"
        )
    version = "1"  # one model name per run (the name carries the run's hash)
    with azure_errors(f"register model {model_name}:{version}"):
        try:
            model = clients.ml.models.get(model_name, version=version)
        except ResourceNotFoundError:
            spec = Model(
                name=model_name,
                version=version,
                path=f"azureml://jobs/{job_name}/outputs/{PIPELINE_OUTPUT}",
                type=AssetTypes.MLFLOW_MODEL,
                description=f"Phi-3 fine-tuned by job {job_name}",
                tags={**tags, "job_name": job_name},
            )
            try:
                model = clients.ml.models.create_or_update(spec)
            except ResourceExistsError:
                model = clients.ml.models.get(model_name, version=version)
    if (model.tags or {}).get("job_name") != job_name:
        raise BackendError(
            f"model {model_name}:{version} exists but was not made by job {job_name}; delete it or use a "
            "new run id"
        )
    return RegisteredModel(name=model_name, version=version, uri=model.id)


def serverless_model(
    clients: AzureClients, job_name: str, location: str, workspace_guid: str
) -> RegisteredModel:
    """The model a serverless fine-tune registered itself (its output ``registered_model``)."""
    with azure_errors(f"read job '{job_name}'"):
        job = clients.ml.jobs.get(job_name)
    status = getattr(job.status, "value", job.status)
    if status != "Completed":
        raise BackendError(f"job '{job_name}' is {status}; only a Completed job's model can be deployed")
    name = job.outputs[SERVERLESS_OUTPUT].name
    with azure_errors(f"read model '{name}' registered by job {job_name}"):
        model = clients.ml.models.get(name, version="1")
    uri = f"azureml://locations/{location}/workspaces/{workspace_guid}/models/{model.name}/versions/{model.version}"
    return RegisteredModel(name=model.name, version=str(model.version), uri=uri)
