"""What the ``azureml`` registry says about the base model and the fine-tuning component, read at run time.

The base model's latest version, its ``inference-recommended-sku`` list, the regions where its
serverless fine-tunes deploy, and the pipeline component's declared inputs all change between
releases; nothing here is hard-coded except the names.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import HttpResponseError

from backends.protocol import BackendError

from .clients import AzureClients
from .errors import azure_errors

log = logging.getLogger(__name__)

PIPELINE_COMPONENT = "chat_completion_pipeline"


@dataclass(frozen=True)
class BaseModel:
    id: str  # azureml://registries/<registry>/models/<name>/versions/<n>
    name: str
    version: str
    inference_skus: tuple[str, ...]
    serverless_regions: tuple[str, ...]


@dataclass(frozen=True)
class PipelineComponent:
    id: str
    version: str
    inputs: dict[str, dict]  # name -> {"type", "optional", "default", ...}
    entity: Any = field(default=None, compare=False, repr=False)  # callable inside a @pipeline function


def _list_value(raw: str | None) -> tuple[str, ...]:
    """Registry tags hold lists as "a,b" or as a Python literal "['a','b']"."""
    if not raw:
        return ()
    text = raw.strip()
    if text.startswith("["):
        try:
            return tuple(str(x).strip() for x in ast.literal_eval(text))
        except (ValueError, SyntaxError):
            text = text.strip("[]")
    return tuple(part.strip().strip("'\"") for part in text.split(",") if part.strip())


def _latest(clients: AzureClients, registry: str, kind: str, name: str, action: str, missing: str):
    """The latest version of a registry model/component; a 404 means ``missing``."""
    with azure_errors(action):
        try:
            return getattr(clients.registry(registry), kind).get(name, label="latest")
        except HttpResponseError as exc:
            if exc.status_code != 404:
                raise
            raise BackendError(missing) from None


def base_model(clients: AzureClients, registry: str, name: str) -> BaseModel:
    model = _latest(
        clients,
        registry,
        "models",
        name,
        f"read model '{name}' from the '{registry}' registry",
        f"model.name '{name}' is not in the '{registry}' registry; use a catalog name such as "
        "Phi-3-mini-4k-instruct (or fix azure.registry)",
    )
    properties, tags = model.properties or {}, model.tags or {}
    return BaseModel(
        id=model.id,
        name=model.name,
        version=str(model.version),
        inference_skus=_list_value(properties.get("inference-recommended-sku")),
        serverless_regions=tuple(r.lower() for r in _list_value(tags.get("maas-finetuning-deploy-regions"))),
    )


def pipeline_component(clients: AzureClients, registry: str) -> PipelineComponent:
    component = _latest(
        clients,
        registry,
        "components",
        PIPELINE_COMPONENT,
        f"read component '{PIPELINE_COMPONENT}' from the '{registry}' registry",
        f"the '{registry}' registry has no '{PIPELINE_COMPONENT}' component; managed_compute fine-tuning "
        "needs the azureml system registry (azure.registry: azureml)",
    )
    inputs = {name: dict(spec) for name, spec in (component.inputs or {}).items()}
    return PipelineComponent(id=component.id, version=str(component.version), inputs=inputs, entity=component)
