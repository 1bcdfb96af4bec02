"""The fine-tuned model as an MLflow pyfunc chat-completion model (Azure ML's chat contract, offline).

`predict` takes the conversation (a list of `{"role", "content"}` messages) and Azure ML's
chat-completion generation parameters, and returns the assistant's answer: new tokens only.

MLflow logs this file as "model from code": it copies the file into the model and executes it
at load time, so the file imports nothing of this project (only mlflow, torch and transformers)
and ends with `set_model`. Loading the model happens once, in `load_context`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

MODEL_DIR_ARTIFACT = "model_dir"
DEVICE_ENV_VAR = "PHI3_DEVICE"
MAX_NEW_TOKENS_BOUND = 2048

# Azure ML chat-completion parameters and their defaults. Decoding samples only when do_sample is
# true *and* temperature > 0, so temperature 0 is always greedy and {"temperature": 0.7} samples.
GENERATION_DEFAULTS: dict[str, Any] = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 50,
    "max_new_tokens": 128,
    "min_new_tokens": 0,
    "repetition_penalty": 1.0,
    "do_sample": True,
}


def chat_signature() -> ModelSignature:
    """Messages in, answer out, every generation parameter declared (MLflow drops undeclared params)."""
    params = ParamSchema(
        [
            ParamSpec("temperature", "double", GENERATION_DEFAULTS["temperature"]),
            ParamSpec("top_p", "double", GENERATION_DEFAULTS["top_p"]),
            ParamSpec("top_k", "long", GENERATION_DEFAULTS["top_k"]),
            ParamSpec("max_new_tokens", "long", GENERATION_DEFAULTS["max_new_tokens"]),
            ParamSpec("min_new_tokens", "long", GENERATION_DEFAULTS["min_new_tokens"]),
            ParamSpec("repetition_penalty", "double", GENERATION_DEFAULTS["repetition_penalty"]),
            ParamSpec("do_sample", "boolean", GENERATION_DEFAULTS["do_sample"]),
        ]
    )
    messages = Schema([ColSpec("string", "role"), ColSpec("string", "content")])
    return ModelSignature(inputs=messages, outputs=Schema([ColSpec("string")]), params=params)


def generation_kwargs(params: dict[str, Any] | None) -> dict[str, Any]:
    """Map Azure ML parameters onto `generate` keyword arguments (sampling knobs only when sampling)."""
    merged = {**GENERATION_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
    temperature = float(merged["temperature"])
    sample = bool(merged["do_sample"]) and temperature > 0
    max_new_tokens = max(1, min(int(merged["max_new_tokens"]), MAX_NEW_TOKENS_BOUND))
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max(0, min(int(merged["min_new_tokens"]), max_new_tokens)),
        "repetition_penalty": float(merged["repetition_penalty"]),
        "do_sample": sample,
    }
    if sample:
        kwargs.update(temperature=temperature, top_p=float(merged["top_p"]), top_k=int(merged["top_k"]))
    return kwargs


def resolve_device(choice: str | None) -> str:
    import torch

    choice = (choice or "auto").lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV_VAR}={choice!r} is not one of auto, cpu, cuda")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


class ChatCompletionModel(PythonModel):
    """A chat-completion pyfunc over a merged Hugging Face checkpoint directory."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = context.artifacts[MODEL_DIR_ARTIFACT]
        self.device = resolve_device(os.environ.get(DEVICE_ENV_VAR))
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()

    # The input is typed as the DataFrame pyfunc builds from the message list: a `list[dict]` hint would
    # make MLflow infer the signature from the hint and take params only from an input example,
    # which costs a model load and a generation at log time.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """Answer the conversation in `model_input` (one message per row: role, content)."""
        import torch

        records = (
            model_input.to_dict(orient="records") if isinstance(model_input, pd.DataFrame) else model_input
        )
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in records]
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**encoded, **generation_kwargs(params))
        new_tokens = output[0][encoded["input_ids"].shape[1] :]
        return [self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()]


def default_pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"torch=={version('torch').split('+')[0]}",
        f"transformers=={version('transformers')}",
        f"tokenizers=={version('tokenizers')}",
        f"mlflow-skinny=={mlflow.__version__}",
    ]


def log_chat_model(
    model_dir: Path, *, artifact_name: str = "model", pip_requirements: list[str] | None = None
) -> str:
    """Log `model_dir` as a chat pyfunc into the active MLflow run; return the logged model's URI.

    The signature is given explicitly and there is no input example, so logging never loads the
    weights or generates (MLflow would otherwise run predict once at log time).

    The weights are copied once. `mlflow.pyfunc.log_model` copies them twice: into a temporary
    model directory, then from there into the artifact store — minutes for Phi-3-mini's 7.6 GB on a
    slow disk. With a local artifact store the model is saved straight into the logged model's
    artifact directory instead, and marked READY only once it is complete (a killed attempt leaves a
    PENDING model that no version points to).
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    run_id = run.info.run_id if run else None
    run_params = client.get_run(run_id).data.params if run_id else None  # as log_model records them
    logged = mlflow.initialize_logged_model(name=artifact_name, source_run_id=run_id, params=run_params)
    repo = get_artifact_repository(logged.artifact_location)
    saved = {
        "python_model": str(Path(__file__).resolve()),
        "artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)},
        "signature": chat_signature(),
        "pip_requirements": pip_requirements or default_pip_requirements(),
        "metadata": {"task": "chat-completion"},
    }
    with warnings.catch_warnings():
        # The explicit signature replaces the input example MLflow asks for (see predict's comment).
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        if not isinstance(repo, LocalArtifactRepository):  # a remote store: MLflow uploads the model
            return mlflow.pyfunc.log_model(model_id=logged.model_id, **saved).model_uri
        if run_id:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        try:
            mlflow.pyfunc.save_model(
                path=repo.artifact_dir,
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                ),
                **saved,
            )
        except BaseException:
            mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"


# Executed when MLflow runs this file as model code; a plain import only sets MLflow's pending model.
set_model(ChatCompletionModel())
