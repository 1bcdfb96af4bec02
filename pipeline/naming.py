"""Deterministic resource names derived from the run id.

Activities look resources up by these names before creating them, which is what makes a retried or
replayed step idempotent. Endpoint names are regionally global on Azure (the scoring host is
``<name>.<region>.inference.ml.azure.com``), hence the short hash suffix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pipeline.config import RunConfig


def _suffix(run_id: str, length: int = 6) -> str:
    return hashlib.sha256(run_id.encode()).hexdigest()[:length]


def _slug(text: str, length: int) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (slug[:length].rstrip("-")) or "run"


@dataclass(frozen=True)
class RunNames:
    run_id: str
    job: str
    model: str
    endpoint: str
    deployment: str
    train_data: str
    validation_data: str
    connection: str

    @classmethod
    def for_run(cls, run_id: str, cfg: RunConfig) -> RunNames:
        suffix = _suffix(run_id)
        base = cfg.deployment.endpoint_name or "phi3ft"
        endpoint = f"{base[:24].rstrip('-')}-{suffix}"
        if not endpoint[0].isalpha():
            endpoint = "e" + endpoint[1:]
        return cls(
            run_id=run_id,
            job=f"phi3ft-{_slug(run_id, 40)}-{suffix}",
            model=f"phi3-ft-{suffix}",
            endpoint=endpoint,
            deployment=cfg.deployment.deployment_name,
            train_data=f"phi3ft-train-{suffix}",
            validation_data=f"phi3ft-validation-{suffix}",
            connection=cfg.promptflow.connection_name,
        )
