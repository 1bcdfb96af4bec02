"""The local backend: one machine, no Azure. A directory plays the Azure ML workspace.

``<state>/`` holds datasets (immutable versions), fine-tune jobs (child processes), an MLflow
tracking store and model registry (SQLite), and online endpoints (loopback scoring servers with
generated keys). Steps that only make sense on Azure (managed identity, role assignments, GPU
quota) report themselves as skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from backends.protocol import (
    BackendError,
    ComputeInfo,
    DataAsset,
    DataAssets,
    DeploymentState,
    EndpointKeys,
    EndpointState,
    JobState,
    MetricPoint,
    NotFoundError,
    RegisteredModel,
    SetupResult,
    connection_ref,
    served_before,
)
from pipeline.config import LOCAL_SCHEDULERS, PHI3_MINI, SMOLLM2, TINY_PHI3, RunConfig
from settings import AppSettings

from .endpoint_state import DamagedKeysError
from .endpoints import (
    DeploymentNotFoundError,
    EndpointNotFoundError,
    EndpointServerError,
    InvalidEndpointRequest,
    LocalEndpoints,
)
from .jobs import JobNotFoundError, LocalJobRunner, TrainingSpec
from .registry import LocalRegistry

log = logging.getLogger(__name__)

EXPERIMENT = "phi3-finetune"
LOCAL_PUBLISH_SKIPPED = (
    "local backend: open flows/phi3_chat with `pf flow serve`/VS Code; "
    "publishing is an Azure AI Foundry feature"
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LocalBackend:
    name = "local"

    def __init__(self, settings: AppSettings, *, restart_endpoints: bool = True):
        self.settings = settings
        self.root = settings.state_dir.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # MLflow resolves some URIs (a model version's "models:/m-..." source) through the process-wide
        # tracking URI, not the client's: point it at this workspace, overriding anything inherited.
        os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
        os.environ["MLFLOW_REGISTRY_URI"] = settings.mlflow_tracking_uri
        self.jobs = LocalJobRunner(self.root)
        # Every job appends its measured tokens/s here; dataset preparation turns it into a time estimate.
        self.throughput_log = self.root / "throughput.jsonl"
        self.registry = LocalRegistry(settings.mlflow_tracking_uri, self.root / "mlartifacts")
        self.endpoints = LocalEndpoints(self.root, tracking_uri=settings.mlflow_tracking_uri)
        # The host restarts endpoints whose server died with it; a client (the CLI) must not revive them.
        restarted = self.endpoints.ensure_running() if restart_endpoints else []
        if restarted:
            log.info("restarted local endpoints after a host restart: %s", ", ".join(restarted))

    # setup --------------------------------------------------------------------------------------
    def ensure_workspace(self, cfg: RunConfig) -> SetupResult:
        for sub in ("data", "jobs", "endpoints", "runs", "mlartifacts"):
            (self.root / sub).mkdir(exist_ok=True)
        return SetupResult(
            summary=f"local workspace at {self.root}",
            details={"workspace": str(self.root), "tracking_uri": self.settings.mlflow_tracking_uri},
        )

    def ensure_identity(self, cfg: RunConfig) -> SetupResult:
        return SetupResult(
            summary="",
            skipped="local backend: jobs and endpoints run as the current user; "
            "no managed identity is needed",
        )

    def ensure_role_assignments(self, cfg: RunConfig) -> SetupResult:
        return SetupResult(summary="", skipped="local backend: no Azure role assignments to make")

    def check_quota(self, cfg: RunConfig) -> SetupResult:
        return SetupResult(
            summary="",
            skipped="local backend: no Azure GPU quota applies; the job uses this machine's CPU/GPU",
        )

    # data ---------------------------------------------------------------------------------------
    def base_model(self, cfg: RunConfig) -> str:
        """What the trainer loads: a named local model or a checkpoint directory."""
        name = cfg.model.name
        if name == PHI3_MINI:
            if not self.settings.phi3_checkpoint_dir:
                raise BackendError(
                    f"{PHI3_MINI} needs PHI3_LOCAL_CHECKPOINT_DIR (a local copy) in local mode"
                )
            return str(self.settings.phi3_checkpoint_dir.resolve())
        return name

    def token_counter(self, cfg: RunConfig) -> tuple[Callable[[str], int] | None, str | None]:
        """The base model's own tokenizer when it is on disk; None means the byte approximation."""
        base = self.base_model(cfg)
        if base == TINY_PHI3:
            return None, None  # its tokenizer is trained on this very data inside the job
        directory = self.settings.models_dir / "SmolLM2-135M-Instruct" if base == SMOLLM2 else Path(base)
        if not (directory / "tokenizer_config.json").exists() and not (directory / "tokenizer.json").exists():
            return None, None
        from transformers import AutoTokenizer

        from pipeline.chat_dataset import tokenizer_counter

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return tokenizer_counter(tokenizer), directory.name

    def upload_data(self, run_id: str, train_file: Path, validation_file: Path) -> DataAssets:
        return DataAssets(
            train=self._register_data(f"{run_id}-train", train_file),
            validation=self._register_data(f"{run_id}-validation", validation_file),
        )

    def _register_data(self, name: str, source: Path) -> DataAsset:
        """Immutable versions like Azure ML data assets: same content reuses its version."""
        sha = _sha256(source)
        folder = self.root / "data" / name
        versions = (
            sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True)
            if folder.exists()
            else []
        )
        for version in versions:
            meta = json.loads((folder / str(version) / "asset.json").read_text())
            if meta["sha256"] == sha:
                return DataAsset(**meta)
        version = str((versions[0] if versions else 0) + 1)
        target = folder / version
        tmp = folder / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(source, tmp / source.name)
        asset = DataAsset(name=name, version=version, uri=str(target / source.name), sha256=sha)
        (tmp / "asset.json").write_text(asset.model_dump_json())
        os.replace(tmp, target)
        return asset

    # fine-tune ----------------------------------------------------------------------------------
    def ensure_compute(self, cfg: RunConfig) -> ComputeInfo:
        import torch

        want = cfg.compute.device
        if want == "cuda" and not torch.cuda.is_available():
            raise BackendError("compute.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
        if want in ("auto", "cuda") and torch.cuda.is_available():
            size, summary = torch.cuda.get_device_name(0), f"local GPU: {torch.cuda.get_device_name(0)}"
        else:
            size, summary = "cpu", f"local CPU ({os.cpu_count()} cores)"
        return ComputeInfo(name="local", size=size, state="Succeeded", summary=summary)

    def submit_finetune(self, job_name: str, cfg: RunConfig, data: DataAssets, run_id: str) -> JobState:
        hp = cfg.hyperparameters
        if hp.lr_scheduler_type not in LOCAL_SCHEDULERS:
            raise BackendError(
                f"hyperparameters.lr_scheduler_type '{hp.lr_scheduler_type}' is not supported by "
                f"the local trainer; use one of {', '.join(LOCAL_SCHEDULERS)}"
            )
        spec = TrainingSpec(
            job_name=job_name,
            base_model=self.base_model(cfg),
            models_dir=self.settings.models_dir,
            train_file=Path(data.train.uri),
            validation_file=Path(data.validation.uri),
            learning_rate=hp.learning_rate,
            lr_scheduler_type=hp.lr_scheduler_type,
            warmup_ratio=hp.warmup_ratio,
            num_train_epochs=hp.num_train_epochs,
            per_device_train_batch_size=hp.per_device_train_batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            weight_decay=hp.weight_decay,
            max_seq_length=hp.max_seq_length,
            lora_r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            full_finetune=not hp.apply_lora,
            seed=hp.seed,
            device=cfg.compute.device,
            compile=cfg.compute.compile,
            gradient_checkpointing=cfg.compute.gradient_checkpointing,
            attention=cfg.compute.attention,
            fused_kernels=cfg.compute.fused_kernels,
            max_tokens_per_micro_batch=cfg.compute.max_tokens_per_micro_batch,
            throughput_log=self.throughput_log,
            mlflow_tracking_uri=self.settings.mlflow_tracking_uri,
            mlflow_experiment=EXPERIMENT,
            run_tags={"run_id": run_id, "job_name": job_name},
        )
        return self._job_state(self.jobs.submit(job_name, spec))

    def get_job(self, job_name: str) -> JobState:
        try:
            return self._job_state(self.jobs.get(job_name))
        except JobNotFoundError as exc:
            raise NotFoundError(f"no fine-tune job named '{job_name}' in {self.root / 'jobs'}") from exc

    def cancel_job(self, job_name: str) -> JobState:
        try:
            return self._job_state(self.jobs.cancel(job_name))
        except JobNotFoundError as exc:
            raise NotFoundError(f"no fine-tune job named '{job_name}'") from exc

    @staticmethod
    def _job_state(info) -> JobState:
        return JobState(
            name=info.name,
            status=info.status,
            step=info.step,
            total_steps=info.total_steps,
            epoch=info.epoch,
            train_loss=info.train_loss,
            eval_loss=info.eval_loss,
            tokens_per_second=info.tokens_per_second,
            error=info.error,
            link=str(info.log_path),
            device=info.device,
        )

    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]:
        info = self.jobs.get(job_name)
        if not info.mlflow_run_id:
            return {}
        return self.registry.metric_history(info.mlflow_run_id, ("train_loss", "eval_loss"))

    # deploy -------------------------------------------------------------------------------------
    def register_model(self, job_name: str, model_name: str, tags: dict[str, str]) -> RegisteredModel:
        info = self.jobs.get(job_name)
        if info.status != "Completed" or not info.model_uri:
            raise BackendError(
                f"job '{job_name}' is {info.status}; only a Completed job's model can be registered"
            )
        return self.registry.register(
            model_name, info.model_uri, job_name=job_name, mlflow_run_id=info.mlflow_run_id, tags=tags
        )

    def ensure_endpoint(self, name: str, tags: dict[str, str], cfg: RunConfig) -> EndpointState:
        try:
            return self._endpoint_state(self.endpoints.create_or_update_endpoint(name, tags=tags))
        except (InvalidEndpointRequest, EndpointServerError) as exc:
            raise BackendError(str(exc)) from exc

    def ensure_deployment(
        self,
        endpoint: str,
        deployment: str,
        model: RegisteredModel,
        cfg: RunConfig,
    ) -> DeploymentState:
        try:
            info = self.endpoints.create_or_update_deployment(
                endpoint,
                deployment,
                model_uri=model.uri,
                instance_count=cfg.deployment.instance_count,
                max_new_tokens_limit=cfg.deployment.max_new_tokens,
                request_timeout_ms=cfg.deployment.request_timeout_ms,
                tags={"model": f"{model.name}:{model.version}"},
            )
        except (InvalidEndpointRequest, EndpointServerError) as exc:
            raise BackendError(str(exc)) from exc
        except EndpointNotFoundError as exc:
            raise NotFoundError(str(exc)) from exc
        return self._deployment_state(info)

    def get_deployment(self, endpoint: str, deployment: str) -> DeploymentState:
        try:
            return self._deployment_state(self.endpoints.get_deployment(endpoint, deployment))
        except (EndpointNotFoundError, DeploymentNotFoundError) as exc:
            raise NotFoundError(str(exc)) from exc

    @staticmethod
    def _deployment_state(info) -> DeploymentState:
        return DeploymentState(
            endpoint=info.endpoint_name,
            name=info.name,
            provisioning_state=info.provisioning_state,
            model=info.model_uri,
            error=info.error,
        )

    def set_traffic(self, endpoint: str, traffic: dict[str, int]) -> EndpointState:
        try:
            return self._endpoint_state(self.endpoints.set_traffic(endpoint, traffic))
        except InvalidEndpointRequest as exc:
            raise BackendError(str(exc)) from exc
        except EndpointNotFoundError as exc:
            raise NotFoundError(str(exc)) from exc

    def get_endpoint(self, name: str) -> EndpointState:
        try:
            return self._endpoint_state(self.endpoints.get_endpoint(name))
        except EndpointNotFoundError as exc:
            raise NotFoundError(f"no endpoint named '{name}'") from exc

    def get_endpoint_keys(self, name: str) -> EndpointKeys:
        try:
            keys = self.endpoints.get_keys(name)
        except EndpointNotFoundError as exc:
            raise NotFoundError(f"no endpoint named '{name}'") from exc
        except DamagedKeysError as exc:
            raise BackendError(str(exc)) from None
        return EndpointKeys(primary=keys.primary, secondary=keys.secondary)

    def list_endpoints(self) -> list[EndpointState]:
        return [self._endpoint_state(e) for e in self.endpoints.list_endpoints()]

    def endpoint_last_used(self, name: str, window_minutes: int) -> str | None:
        """When the scoring server last answered (it touches a marker file); None if never."""
        used = self.endpoints.last_used_at(name)
        return used.isoformat() if used else None

    def list_deployments(self, endpoint: str) -> list[DeploymentState]:
        try:
            return [self._deployment_state(d) for d in self.endpoints.list_deployments(endpoint)]
        except EndpointNotFoundError as exc:
            raise NotFoundError(str(exc)) from exc

    def delete_deployment(self, endpoint: str, deployment: str) -> None:
        try:
            self.endpoints.delete_deployment(endpoint, deployment)
        except (EndpointNotFoundError, DeploymentNotFoundError):
            return
        except InvalidEndpointRequest as exc:
            raise BackendError(str(exc)) from exc

    def delete_endpoint(self, name: str) -> None:
        try:
            self.endpoints.delete_endpoint(name)
        except EndpointNotFoundError:
            return

    def managed_model(self, deployment_model: str | None) -> RegisteredModel | None:
        return self.registry.managed_version(deployment_model)

    def delete_model_version(self, name: str, version: str) -> None:
        """As Azure ML: refused while any deployment serves it; a missing version is already gone."""
        uri = f"models:/{name}/{version}"
        for ep in self.endpoints.list_endpoints():
            for dep in self.endpoints.list_deployments(ep.name):
                if dep.model_uri == uri:
                    raise BackendError(
                        f"model {name}:{version} is used by deployment {dep.name} of endpoint {ep.name}; "
                        "delete the deployment first"
                    )
        self.registry.delete_version(name, version)

    @staticmethod
    def _endpoint_state(info) -> EndpointState:
        return EndpointState(
            name=info.name,
            scoring_uri=info.scoring_uri,
            provisioning_state=info.provisioning_state,
            tags=info.tags,
            traffic=info.traffic,
            last_used_at=info.last_used_at.isoformat() if info.last_used_at else None,
            created_at=info.created_at.isoformat(),
        )

    # integrate ----------------------------------------------------------------------------------
    def ensure_promptflow_connection(
        self, name: str, endpoint: str, cfg: RunConfig | None = None, project: str | None = None
    ) -> SetupResult:
        """A CustomConnection in promptflow's local store (key encrypted; key file under the state dir).

        There are no projects locally: ``project`` only ever comes from an Azure run's record."""
        from flows.connections import connection_endpoints, upsert_connection

        ep = self.get_endpoint(endpoint)
        key = self.get_endpoint_keys(endpoint).primary.get_secret_value()
        before = served_before(*connection_endpoints(name, state_dir=self.root), ep.scoring_uri)
        ref = connection_ref(self, name, before, endpoint)  # before the write: nothing may fail after it
        conn = upsert_connection(name, ep.scoring_uri or "", key, state_dir=self.root, previous=before)
        return SetupResult(
            summary=f"connection {conn.name} {conn.action} -> endpoint {endpoint}",
            details={"connection": {"name": conn.name, "endpoint": endpoint, "store": "local"}},
            created=[ref],
        )

    def promptflow_connection_target(self, name: str, project: str | None = None) -> str | None:
        from flows.connections import connection_endpoint

        return connection_endpoint(name, state_dir=self.root)

    def delete_promptflow_connection(self, name: str, project: str | None = None) -> None:
        from flows.connections import delete_connection

        delete_connection(name, state_dir=self.root)

    def publish_flow(self, connection: str, endpoint: str, display_name: str, cfg: RunConfig) -> SetupResult:
        return SetupResult(summary="", skipped=LOCAL_PUBLISH_SKIPPED)

    # evaluation ---------------------------------------------------------------------------------
    def base_checkpoint(self, job_name: str) -> Path:
        """The directory the job fine-tuned from (the tiny model is built inside the job)."""
        spec = json.loads((self.root / "jobs" / job_name / "spec.json").read_text())
        base = spec["base_model"]
        if base == TINY_PHI3:
            return self.root / "jobs" / job_name / "work" / "tiny-phi3"
        if base == SMOLLM2:
            return self.settings.models_dir / "SmolLM2-135M-Instruct"
        return Path(base)

    def ensure_base_deployment(
        self, endpoint: str, deployment: str, job_name: str, model_name: str, cfg: RunConfig
    ) -> DeploymentState | None:
        """Serve the untuned base model as a second deployment (no traffic) so evaluation can compare."""
        base_name = f"{model_name}-base"
        model = self.registry.version_for_job(base_name, job_name)
        if model is None:
            checkpoint = self.base_checkpoint(job_name)
            if not (checkpoint / "config.json").exists():
                raise BackendError(f"the base checkpoint {checkpoint} of job '{job_name}' is missing")
            model = self.registry.register_directory(checkpoint, base_name, job_name)
        try:
            info = self.endpoints.create_or_update_deployment(
                endpoint,
                deployment,
                model_uri=model.uri,
                max_new_tokens_limit=cfg.deployment.max_new_tokens,
                request_timeout_ms=cfg.deployment.request_timeout_ms,
                tags={"model": f"{model.name}:{model.version}"},
            )
        except (InvalidEndpointRequest, EndpointServerError) as exc:
            raise BackendError(str(exc)) from exc
        return self._deployment_state(info)

    def log_evaluation(self, run_id: str, metrics: dict[str, dict], artifacts: list[Path]) -> str:
        mlflow_run = self.registry.log_evaluation(run_id, metrics, artifacts)
        return f"MLflow run {mlflow_run} in experiment phi3-evaluation ({self.registry.tracking_uri})"
