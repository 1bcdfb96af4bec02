"""The ``azureml`` system registry: discovery, the Phi-3 base model and the fine-tuning pipeline component.

The component's declared inputs are a subset of ``chat_completion_pipeline`` 0.0.57's real spec
(Azure/azureml-assets); a pipeline job that passes an input the component does not declare is
refused with 400, as Azure ML's job validation does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .server import Request, Response, not_found

if TYPE_CHECKING:
    from .azure import FakeAzure

REGISTRY_SUBSCRIPTION = "11111111-2222-4333-8444-555555555555"
REGISTRY_GROUP = "registry-builtin-prod-eastus-01"
BASE_MODEL = "Phi-3-mini-4k-instruct"
BASE_VERSIONS = ("13", "14")
PIPELINE_COMPONENT = "chat_completion_pipeline"
COMPONENT_VERSION = "0.0.57"
FINETUNE_SKUS = "Standard_NC24ads_A100_v4,Standard_NC48ads_A100_v4,Standard_NC96ads_A100_v4"
RECOMMENDED_INFERENCE = (
    "Standard_NC24ads_A100_v4,Standard_NC48ads_A100_v4,Standard_NC96ads_A100_v4,"
    "Standard_ND96asr_v4,Standard_ND96amsr_A100_v4"
)


def _string(default=None, enum=None):
    return {"type": "string", "optional": True, "default": default, **({"enum": enum} if enum else {})}


def _number(kind: str, default):
    return {"type": kind, "optional": True, "default": default}


BOOL = ["true", "false"]
COMPONENT_INPUTS: dict[str, dict] = {
    "instance_type_model_import": _string("Standard_d12_v2"),
    "instance_type_preprocess": _string("Standard_d12_v2"),
    "instance_type_finetune": _string("Standard_nc24rs_v3"),
    "instance_type_model_evaluation": _string("Standard_nc24rs_v3"),
    "num_nodes_finetune": _number("integer", 1),
    "number_of_gpu_to_use_finetuning": _number("integer", 1),
    "huggingface_id": _string(),
    "pytorch_model_path": {"type": "custom_model", "optional": True},
    "mlflow_model_path": {"type": "mlflow_model", "optional": True},
    "task_name": {
        "type": "string",
        "optional": False,
        "default": "ChatCompletion",
        "enum": ["ChatCompletion"],
    },
    "pad_to_max_length": _string("false", BOOL),
    "max_seq_length": _number("integer", -1),
    "train_file_path": {"type": "uri_file", "optional": True},
    "validation_file_path": {"type": "uri_file", "optional": True},
    "test_file_path": {"type": "uri_file", "optional": True},
    "apply_lora": _string("false", BOOL),
    "merge_lora_weights": _string("true", BOOL),
    "lora_alpha": _number("integer", 128),
    "lora_r": _number("integer", 8),
    "lora_dropout": _number("number", 0.0),
    "num_train_epochs": _number("integer", 1),
    "max_steps": _number("integer", -1),
    "per_device_train_batch_size": _number("integer", 1),
    "per_device_eval_batch_size": _number("integer", 1),
    "learning_rate": _number("number", 0.00002),
    "warmup_steps": _number("integer", 0),
    "weight_decay": _number("number", 0.0),
    "gradient_accumulation_steps": _number("integer", 1),
    "lr_scheduler_type": _string(
        "linear",
        ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    ),
    "precision": _string("32", ["32", "16"]),
    "seed": _number("integer", 42),
    "apply_deepspeed": _string("false", BOOL),
    "deepspeed_stage": _string("2", ["2", "3"]),
    "apply_ort": _string("false", BOOL),
    "compute_model_import": _string("serverless"),
    "compute_preprocess": _string("serverless"),
    "compute_finetune": _string("serverless"),
    "compute_model_evaluation": _string("serverless"),
}
COMPONENT_OUTPUTS = {
    "pytorch_model_folder": {"type": "uri_folder"},
    "mlflow_model_folder": {"type": "mlflow_model"},
}


def registry_prefix() -> str:
    return (
        f"/subscriptions/{REGISTRY_SUBSCRIPTION}/resourceGroups/{REGISTRY_GROUP}"
        "/providers/Microsoft.MachineLearningServices/registries/azureml"
    )


def component_asset_id() -> str:
    return f"azureml://registries/azureml/components/{PIPELINE_COMPONENT}/versions/{COMPONENT_VERSION}"


def base_model_asset_id(version: str = BASE_VERSIONS[-1]) -> str:
    return f"azureml://registries/azureml/models/{BASE_MODEL}/versions/{version}"


def register(fake: FakeAzure) -> None:
    s = fake.server
    s.add(
        "registry-discovery",
        "GET",
        r"/registrymanagement/v1\.0/registries/(?P<name>[^/]+)/discovery",
        lambda r, m: _discovery(fake, m["name"]),
    )
    reg = (
        r"/mferp/managementfrontend/subscriptions/[^/]+/resourceGroups/[^/]+"
        r"/providers/Microsoft\.MachineLearningServices/registries/azureml"
    )
    s.add(
        "registry-model-versions",
        "GET",
        reg + r"/models/(?P<name>[^/]+)/versions",
        lambda r, m: _model_versions(r, m),
    )
    s.add(
        "registry-model-version",
        "GET",
        reg + r"/models/(?P<name>[^/]+)/versions/(?P<v>[^/]+)",
        lambda r, m: _model_version(m),
    )
    s.add(
        "registry-component-versions",
        "GET",
        reg + r"/components/(?P<name>[^/]+)/versions",
        lambda r, m: _component_versions(r, m),
    )
    s.add(
        "registry-component-version",
        "GET",
        reg + r"/components/(?P<name>[^/]+)/versions/(?P<v>[^/]+)",
        lambda r, m: _component_version(m),
    )


def _discovery(fake: FakeAzure, name: str) -> Response:
    if name != "azureml":
        raise not_found("registry", name)
    return Response(
        200,
        {
            "registryName": "azureml",
            "primaryRegion": "eastus",
            "regions": ["eastus", "eastus2", "westus3", "swedencentral"],
            "primaryRegionResourceProviderUri": f"{fake.url}/",
            "subscriptionId": REGISTRY_SUBSCRIPTION,
            "resourceGroup": REGISTRY_GROUP,
        },
    )


def _model_body(version: str) -> dict:
    return {
        "id": base_model_asset_id(version),  # the registry answers with azureml:// ids
        "name": version,
        "type": "Microsoft.MachineLearningServices/registries/models/versions",
        "properties": {
            "description": "Phi-3 Mini-4K-Instruct",
            "modelType": "mlflow_model",
            "modelUri": f"azureml://registries/azureml/models/{BASE_MODEL}/versions/{version}",
            "flavors": {"transformers": {"data": {"task": "chat-completion"}}},
            "isArchived": False,
            "properties": {
                "inference-recommended-sku": RECOMMENDED_INFERENCE,
                "finetune-recommended-sku": FINETUNE_SKUS,
            },
            "tags": {
                "task": "chat-completion",
                "finetune_compute_allow_list": str(FINETUNE_SKUS.split(",")),
                "maas-finetuning-deploy-regions": "['eastus2']",
            },
        },
        "systemData": {"createdAt": f"2024-0{BASE_VERSIONS.index(version) + 5}-01T00:00:00Z"},
    }


def _model_versions(req: Request, m: re.Match) -> Response:
    if m["name"] != BASE_MODEL:
        raise not_found("model", m["name"])
    versions = [_model_body(v) for v in reversed(BASE_VERSIONS)]  # newest first
    top = req.query.get("$top")
    return Response(200, {"value": versions[: int(top)] if top else versions})


def _model_version(m: re.Match) -> Response:
    if m["name"] != BASE_MODEL or m["v"] not in BASE_VERSIONS:
        raise not_found("model version", f"{m['name']}:{m['v']}")
    return Response(200, _model_body(m["v"]))


def _component_body() -> dict:
    return {
        "id": component_asset_id(),
        "name": COMPONENT_VERSION,
        "type": "Microsoft.MachineLearningServices/registries/components/versions",
        "properties": {
            "description": "Pipeline Component to finetune Hugging Face models for chat completion task.",
            "isArchived": False,
            "componentSpec": {
                "$schema": "https://azuremlschemas.azureedge.net/latest/pipelineComponent.schema.json",
                "name": PIPELINE_COMPONENT,
                "version": COMPONENT_VERSION,
                "type": "pipeline",
                "display_name": "Chat Completion Pipeline",
                "inputs": COMPONENT_INPUTS,
                "outputs": COMPONENT_OUTPUTS,
                "jobs": {},
            },
        },
        "systemData": {"createdAt": "2024-06-01T00:00:00Z"},
    }


def _component_versions(req: Request, m: re.Match) -> Response:
    if m["name"] != PIPELINE_COMPONENT:
        raise not_found("component", m["name"])
    return Response(200, {"value": [_component_body()]})


def _component_version(m: re.Match) -> Response:
    if m["name"] != PIPELINE_COMPONENT or m["v"] != COMPONENT_VERSION:
        raise not_found("component version", f"{m['name']}:{m['v']}")
    return Response(200, _component_body())
