"""The local fine-tune job: `python -m backends.local.trainer <job_dir>`.

Reads `<job_dir>/spec.json` (a `TrainingSpec`), fine-tunes the base model on the chat data (LoRA
or full, loss on assistant tokens only, packed rows), logs metrics and the merged model to MLflow,
and keeps `<job_dir>/status.json` (a `JobStatus`) current. SIGTERM stops it at the next step
(status Canceled, exit 0); any error ends it with status Failed and a one-line cause (exit 1).

Torch, transformers, peft and MLflow are imported inside the functions that need them, so that
importing this module (e.g. for `LoopSettings`) stays cheap.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

# The job's file contracts live beside the runner (importing them must not load torch).
from backends.local.jobs import SPEC_FILE, JobStatus, TrainingSpec, read_status, utc_now, write_status
from backends.local.step_loop import LoopSettings, Progress, train

if TYPE_CHECKING:
    from backends.local.accelerator import Execution

logger = logging.getLogger("backends.local.trainer")

MODEL_OUTPUT = Path("outputs") / "model"


def describe_error(error: BaseException) -> str:
    """One line naming the cause, fit for status.json (the traceback goes to the log)."""
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors()
        )
        return f"invalid {SPEC_FILE}: {problems}"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


class JobCanceled(Exception):
    """Raised at the next checkpoint after SIGTERM."""


@dataclass
class CancelRequest:
    requested: bool = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        logger.warning("received %s: stopping at the next step", signal.Signals(signum).name)
        self.requested = True

    def checkpoint(self) -> None:
        if self.requested:
            raise JobCanceled("canceled by request")


class StatusReporter:
    """Keeps the job's JobStatus and rewrites status.json atomically on every change."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self.status = read_status(job_dir) or JobStatus()

    def update(self, **fields: Any) -> None:
        self.status = self.status.model_copy(update=fields)
        write_status(self.job_dir, self.status)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id; created with its artifacts next to a SQLite store (not under the CWD)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = str(
            Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        )
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        raced = mlflow.get_experiment_by_name(name)  # another job created it meanwhile
        if raced is None:
            raise
        return raced.experiment_id


def encode_file(tokenizer: Any, path: Path, max_length: int) -> list[Any]:
    from backends.local.packing import encode_conversation, load_conversations

    encoded = [encode_conversation(tokenizer, messages, max_length) for messages in load_conversations(path)]
    truncated = sum(conversation.truncated for conversation in encoded)
    if truncated:
        logger.warning(
            "%d of %d conversations in %s exceed max_seq_length=%d tokens: truncated",
            *(truncated, len(encoded), path, max_length),
        )
    untrained = sum(conversation.target_tokens == 0 for conversation in encoded)
    if untrained:
        logger.warning(
            "%d of %d conversations in %s keep no assistant token within max_seq_length=%d tokens: "
            "nothing to learn or score in them",
            *(untrained, len(encoded), path, max_length),
        )
    return encoded


def no_targets_message(path: Path, max_length: int) -> str:
    return (
        f"no conversation in {path} has an assistant token within its first {max_length} tokens; raise "
        "hyperparameters.max_seq_length (or check that the conversations hold assistant turns)"
    )


@dataclass
class FineTuneJob:
    """One job's prepare → train → finalize, reporting to status.json and the active MLflow run."""

    job_dir: Path
    spec: TrainingSpec
    reporter: StatusReporter
    cancel: CancelRequest
    device: Any
    backoffs: int = 0  # out-of-memory back-offs so far

    def run(self) -> str:
        """Returns the logged MLflow model's URI."""
        from backends.local.base_models import LoraSettings, load_trainable_model, save_merged_model
        from backends.local.chat_model import log_chat_model

        spec = self.spec
        base_dir, tokenizer = self.prepare_base()
        self.train_set = encode_file(tokenizer, spec.train_file, spec.max_seq_length)
        if not any(conversation.target_tokens for conversation in self.train_set):
            # Training would run every step without a gradient and report the base model as fine-tuned.
            raise ValueError(no_targets_message(spec.train_file, spec.max_seq_length))
        self.eval_set = (
            encode_file(tokenizer, spec.validation_file, spec.max_seq_length) if spec.validation_file else []
        )
        if self.eval_set and not any(conversation.target_tokens for conversation in self.eval_set):
            # Its mean loss over no tokens would read 0.0, a perfect score: report none instead.
            logger.warning("no eval_loss: %s", no_targets_message(spec.validation_file, spec.max_seq_length))
            self.eval_set = []
        self.log_dataset_sizes()
        lora = (
            None
            if spec.full_finetune
            else LoraSettings(spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.target_modules)
        )
        self.execution = self.plan_execution(base_dir)
        self.model = load_trainable_model(
            base_dir,
            lora=lora,
            seed=spec.seed,
            device=self.device,
            dtype=self.execution.base_dtype,
            attention=self.execution.attention,
        )
        self.fit_execution()
        self.cancel.checkpoint()
        self.settings = LoopSettings.from_spec(spec)
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        final = train(
            self.model,
            self.train_set,
            self.settings,
            device=self.device,
            pad_token_id=self.pad_token_id,
            on_progress=self.report,
            on_epoch_end=self.evaluate_epoch,
            checkpoint=self.cancel.checkpoint,
            execution=self.execution,
            on_event=self.record_event,
        )
        logger.info(
            "trained %d steps: %.0f tokens/s, last train_loss %s",
            final.step,
            final.tokens_per_second,
            final.train_loss,
        )
        self.record_throughput(final)
        self.reporter.update(status="Finalizing")
        model_dir = save_merged_model(self.model, tokenizer, self.job_dir / MODEL_OUTPUT)
        self.cancel.checkpoint()
        return log_chat_model(model_dir)

    def plan_execution(self, base_dir: Path) -> Execution:
        from transformers import AutoConfig

        from backends.local.accelerator import Switches, plan_execution

        spec = self.spec
        self.switches = Switches(
            compile=spec.compile,
            gradient_checkpointing=spec.gradient_checkpointing,
            attention=spec.attention,
            fused_kernels=spec.fused_kernels,
            max_tokens_per_micro_batch=spec.max_tokens_per_micro_batch,
        )
        dropout = getattr(AutoConfig.from_pretrained(base_dir), "attention_dropout", 0.0) or 0.0
        return plan_execution(
            self.device, self.switches, lora=not spec.full_finetune, attention_dropout=dropout
        )

    def fit_execution(self) -> None:
        """The micro-batch budget from free GPU memory, then checkpointing/kernels/compile on the model."""
        import mlflow

        from backends.local.accelerator import fit_to_memory, prepare_for_training

        spec = self.spec
        self.execution = fit_to_memory(
            self.execution,
            self.model,
            switches=self.switches,
            max_seq_length=spec.max_seq_length,
            step_tokens=spec.max_seq_length
            * spec.per_device_train_batch_size
            * spec.gradient_accumulation_steps,
            lora_dropout=not spec.full_finetune and spec.lora_dropout > 0,
        )
        prepare_for_training(self.model, self.execution)
        logger.info("execution: %s", self.execution.describe())
        for note in self.execution.notes:
            logger.info("execution: %s", note)
        mlflow.set_tag("execution", self.execution.describe())

    def record_event(self, message: str) -> None:
        """Out-of-memory back-offs: into the job log and the MLflow run; training goes on."""
        import mlflow

        self.backoffs += 1
        logger.warning("%s", message)
        mlflow.set_tags({"oom_backoffs": str(self.backoffs), f"oom_backoff_{self.backoffs}": message[:5000]})

    def record_throughput(self, final: Progress) -> None:
        """Append the measured tokens/s to spec.throughput_log, for the cost estimates (pipeline/cost.py)."""
        from backends.local.accelerator import device_name, non_embedding_parameters
        from pipeline.cost import MeasuredThroughput, append_measurement

        if self.spec.throughput_log is None or final.seconds <= 0:
            return
        measured = MeasuredThroughput(
            device_name=device_name(self.device),
            tokens_per_second=round(final.tokens_per_second, 1),
            non_embedding_params=non_embedding_parameters(self.model),
            base_model=self.spec.base_model,
            full_finetune=self.spec.full_finetune,
        )
        append_measurement(self.spec.throughput_log, measured)

    def prepare_base(self) -> tuple[Path, Any]:
        from transformers import AutoTokenizer

        from backends.local.base_models import prepare_base_model

        spec = self.spec
        corpus = [spec.train_file, *([spec.validation_file] if spec.validation_file else [])]
        base_dir = prepare_base_model(
            spec.base_model,
            models_dir=spec.models_dir,
            work_dir=self.job_dir / "work",
            corpus_files=corpus,
            seed=spec.seed,
        )
        self.cancel.checkpoint()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if not tokenizer.chat_template:
            raise ValueError(
                f"the tokenizer in {base_dir} has no chat template; use an instruct/chat checkpoint"
            )
        return base_dir, tokenizer

    def log_dataset_sizes(self) -> None:
        import mlflow

        truncated = sum(c.truncated for c in self.train_set)
        sizes = {"train_conversations": len(self.train_set), "validation_conversations": len(self.eval_set)}
        mlflow.log_params({**sizes, "truncated_conversations": truncated})

    def report(self, progress: Progress) -> None:
        import mlflow

        self.reporter.update(
            status="Running",
            step=progress.step,
            total_steps=progress.total_steps,
            epoch=round(progress.epoch, 4),
            train_loss=progress.train_loss,
            tokens_per_second=round(progress.tokens_per_second, 1),
        )
        if progress.step:
            metrics = {
                "learning_rate": progress.learning_rate,
                "tokens_per_second": progress.tokens_per_second,
            }
            if progress.train_loss is not None:
                metrics["train_loss"] = progress.train_loss
            mlflow.log_metrics({**metrics, "epoch": progress.epoch}, step=progress.step)

    def evaluate_epoch(self, progress: Progress) -> float | None:
        import mlflow

        from backends.local.packing import mean_token_loss

        if not self.eval_set:
            return None
        eval_loss = mean_token_loss(
            self.model,
            self.eval_set,
            row_length=self.settings.max_seq_length,
            rows_per_batch=self.settings.per_device_train_batch_size,
            pad_token_id=self.pad_token_id,
            device=self.device,
            flat=self.execution.flat,
            bf16=self.execution.bf16,
        )
        logger.info("epoch %.0f: eval_loss %.4f", progress.epoch, eval_loss)
        self.reporter.update(eval_loss=eval_loss)
        mlflow.log_metric("eval_loss", eval_loss, step=progress.step)
        return eval_loss


def run_job(job_dir: Path, spec: TrainingSpec, reporter: StatusReporter, cancel: CancelRequest) -> None:
    import mlflow
    import torch

    from backends.local.accelerator import choose_device, device_name

    device = choose_device(spec.device)
    torch.set_num_threads(spec.torch_threads or os.cpu_count() or 1)
    where = f"{device} ({device_name(device)})" if device.type == "cuda" else str(device)
    reporter.update(status="Preparing", started_at=utc_now(), device=where, error=None)
    for field in ("train_file", "validation_file"):
        path = getattr(spec, field)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{field} {path} does not exist")
    experiment_id = ensure_experiment(spec.mlflow_tracking_uri, spec.mlflow_experiment)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=spec.job_name, tags=spec.run_tags)
    reporter.update(mlflow_run_id=run.info.run_id)
    try:
        mlflow.log_params(
            spec.model_dump(exclude={"run_tags", "mlflow_tracking_uri", "models_dir"}, mode="json")
        )
        model_uri = FineTuneJob(job_dir, spec, reporter, cancel, device).run()
    except JobCanceled:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    reporter.update(status="Completed", model_uri=model_uri, ended_at=utc_now())


def configure_process() -> None:
    # Nothing may reach the Hugging Face hub; set before transformers/huggingface_hub are imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m backends.local.trainer <job_dir>", file=sys.stderr)
        return 2
    job_dir = Path(argv[0]).resolve()
    cancel = CancelRequest()
    cancel.install()  # first, so a cancel during the slow imports below is not lost
    configure_process()
    reporter = StatusReporter(job_dir)
    try:
        spec = TrainingSpec.model_validate_json((job_dir / SPEC_FILE).read_text(encoding="utf-8"))
        run_job(job_dir, spec, reporter, cancel)
    except JobCanceled:
        logger.warning("job canceled at step %d", reporter.status.step)
        reporter.update(status="Canceled", ended_at=utc_now())
        return 0
    except Exception as error:  # the job's boundary: every failure becomes status Failed with its cause
        logger.exception("job failed")
        reporter.update(status="Failed", error=describe_error(error), ended_at=utc_now())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
