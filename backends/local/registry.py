"""The local model registry and experiment store: MLflow on SQLite, in the workspace.

Registration is idempotent by job: a model version carries the job's name as a tag, so a retried
step finds the version it made instead of creating a second one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from backends.protocol import BackendError, MetricPoint, RegisteredModel

EVAL_EXPERIMENT = "phi3-evaluation"
MANAGED_BY_TAG = {"managed-by": "phi3-finetune"}


class LocalRegistry:
    def __init__(self, tracking_uri: str, artifacts_dir: Path):
        self.tracking_uri = tracking_uri
        self.artifacts_dir = artifacts_dir

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def metric_history(self, mlflow_run_id: str, keys: tuple[str, ...]) -> dict[str, list[MetricPoint]]:
        client = self.client()
        return {
            key: [
                MetricPoint(step=m.step, value=m.value) for m in client.get_metric_history(mlflow_run_id, key)
            ]
            for key in keys
        }

    def version_for_job(self, model_name: str, job_name: str) -> RegisteredModel | None:
        # A model never registered has no versions: []. Any error (a locked store...) propagates and the
        # step is retried: read as "none yet", it would register a second version.
        versions = self.client().search_model_versions(f"name='{model_name}'")
        for mv in versions:
            if mv.tags.get("job_name") == job_name:
                return _registered(model_name, mv.version)
        return None

    def register(
        self,
        model_name: str,
        model_uri: str,
        *,
        job_name: str,
        mlflow_run_id: str | None,
        tags: dict[str, str],
    ) -> RegisteredModel:
        existing = self.version_for_job(model_name, job_name)
        if existing:  # a retried step: reuse, never a second version
            return existing
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, tags=MANAGED_BY_TAG)
        mv = client.create_model_version(
            model_name, model_uri, run_id=mlflow_run_id, tags={**tags, "job_name": job_name}
        )
        return _registered(model_name, mv.version)

    def managed_version(self, model_uri: str | None) -> RegisteredModel | None:
        """``models:/<name>/<version>`` of a version this app registered (its container carries our tag)."""
        from mlflow.exceptions import MlflowException

        found = re.fullmatch(r"models:/([^/]+)/([^/]+)", model_uri or "")
        if not found:
            return None
        name, version = found.groups()
        client = self.client()
        try:
            container = client.get_registered_model(name)
            client.get_model_version(name, version)
        except MlflowException:
            return None
        if container.tags.get("managed-by") != MANAGED_BY_TAG["managed-by"]:
            return None
        return _registered(name, version)

    def delete_version(self, name: str, version: str) -> None:
        """Delete one version (idempotent); the registered model goes with its last version."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.delete_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return  # already gone
            # A full disk or a locked database: the version is still there and must not be reported gone.
            raise BackendError(
                f"model {name}:{version} could not be deleted from the MLflow registry "
                f"{self.tracking_uri}: {(str(exc.message).splitlines() or [''])[0]}"  # not the SQL after it
            ) from exc
        if not client.search_model_versions(f"name='{name}'"):
            client.delete_registered_model(name)

    def register_directory(self, checkpoint: Path, model_name: str, job_name: str) -> RegisteredModel:
        """Log a plain HF checkpoint as a chat pyfunc model (in the evaluation experiment) and register it.

        A retried step finds the version it registered before logging anything: logging copies the weights.
        """
        existing = self.version_for_job(model_name, job_name)
        if existing:
            return existing
        import mlflow

        from .chat_model import log_chat_model

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(
            experiment_id=self._evaluation_experiment(),
            run_name=f"base-{job_name}",
            tags={"job_name": job_name, "purpose": "base-model"},
        ) as run:
            model_uri = log_chat_model(checkpoint)
        return self.register(
            model_name,
            model_uri,
            job_name=job_name,
            mlflow_run_id=run.info.run_id,
            tags={"purpose": "base-model"},
        )

    def log_evaluation(self, run_id: str, metrics: dict[str, dict], artifacts: list[Path]) -> str:
        """One MLflow run per pipeline run in the evaluation experiment (reused on retry)."""
        client = self.client()
        experiment_id = self._evaluation_experiment()
        found = client.search_runs([experiment_id], f"tags.run_id = '{run_id}'", max_results=1)
        run = (
            found[0] if found else client.create_run(experiment_id, tags={"run_id": run_id}, run_name=run_id)
        )
        for model, values in metrics.items():
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    client.log_metric(run.info.run_id, f"{model}.{key}", float(value))
        for path in artifacts:
            client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    def _evaluation_experiment(self) -> str:
        client = self.client()
        experiment = client.get_experiment_by_name(EVAL_EXPERIMENT)
        if experiment:
            return experiment.experiment_id
        return client.create_experiment(
            EVAL_EXPERIMENT, artifact_location=(self.artifacts_dir / "evaluation").as_uri()
        )


def _registered(model_name: str, version: Any) -> RegisteredModel:
    return RegisteredModel(name=model_name, version=str(version), uri=f"models:/{model_name}/{version}")
