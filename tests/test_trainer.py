"""The trainer process and its parts: spec validation, the step loop, failure and cancel reporting,
and the chat model's mapping of Azure ML generation parameters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from transformers import AutoTokenizer

from backends.local.base_models import LoraSettings, build_tiny_phi3, load_trainable_model
from backends.local.chat_model import MAX_NEW_TOKENS_BOUND, generation_kwargs
from backends.local.jobs import JobStatus, TrainingSpec, read_status
from backends.local.packing import encode_conversation, load_conversations
from backends.local.trainer import LoopSettings, describe_error, train
from tests.support.fact_data import tiny_spec, write_fact_dataset
from tests.support.polling import wait_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_fact_dataset(path, rows=80, facts=10, seed=3)
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, facts_file):
    model_dir = build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", corpus_files=[facts_file])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [encode_conversation(tokenizer, c, 128) for c in load_conversations(facts_file)]
    return model_dir, tokenizer, encoded


def start_trainer(job_dir: Path, spec: dict) -> subprocess.Popen[str]:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "spec.json").write_text(json.dumps(spec, default=str), encoding="utf-8")
    command = [sys.executable, "-m", "backends.local.trainer", str(job_dir)]
    return subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def spec_dict(tmp_path: Path, tracking_uri: str, train_file: Path, **overrides) -> dict:
    return tiny_spec(tmp_path, tracking_uri, train_file, **overrides).model_dump(mode="json")


def test_spec_rejects_an_unknown_scheduler(tmp_path, tracking_uri, facts_file):
    with pytest.raises(ValidationError, match="lr_scheduler_type"):
        tiny_spec(tmp_path, tracking_uri, facts_file, lr_scheduler_type="polynomial")


def test_spec_rejects_fields_it_does_not_know(tmp_path, tracking_uri, facts_file):
    with pytest.raises(ValidationError, match="learning_rat"):
        tiny_spec(tmp_path, tracking_uri, facts_file, learning_rat=1e-3)


def test_a_validation_error_is_described_on_one_line_naming_each_field():
    with pytest.raises(ValidationError) as raised:
        TrainingSpec.model_validate({"job_name": "x", "learning_rate": -1})

    description = describe_error(raised.value)
    assert "\n" not in description
    assert "learning_rate" in description and "train_file" in description and "base_model" in description


def test_the_step_loop_lowers_the_loss_on_assistant_tokens(tiny_setup):
    model_dir, tokenizer, encoded = tiny_setup
    model = load_trainable_model(
        model_dir, lora=LoraSettings(r=32, alpha=64, dropout=0.0), seed=0, device=CPU
    )
    settings = LoopSettings(
        learning_rate=5e-3,
        num_train_epochs=3,
        per_device_train_batch_size=2,
        max_seq_length=128,
        logging_steps=1,
    )
    reports = []

    final = train(
        model, encoded, settings, device=CPU, pad_token_id=tokenizer.pad_token_id, on_progress=reports.append
    )

    assert reports[0].step == 0 and final.step == final.total_steps == reports[-1].step
    assert final.train_loss < reports[1].train_loss - 0.5
    assert 0 < final.real_tokens <= final.padded_tokens
    assert final.epoch == 3


def test_full_finetuning_updates_every_weight(tiny_setup):
    model_dir, tokenizer, encoded = tiny_setup
    model = load_trainable_model(model_dir, lora=None, seed=0, device=CPU)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    train(
        model,
        encoded[:16],
        LoopSettings(learning_rate=1e-3, max_seq_length=128),
        device=CPU,
        pad_token_id=tokenizer.pad_token_id,
    )

    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []


def test_a_single_step_run_with_warmup_still_trains(tiny_setup):
    model_dir, tokenizer, encoded = tiny_setup
    model = load_trainable_model(model_dir, lora=LoraSettings(dropout=0.0), seed=0, device=CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    settings = LoopSettings(
        learning_rate=1e-3, warmup_ratio=0.1, per_device_train_batch_size=64, max_seq_length=128
    )

    final = train(model, encoded[:8], settings, device=CPU, pad_token_id=tokenizer.pad_token_id)

    assert final.total_steps == 1
    changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, before[n])]
    assert changed


def test_lora_training_leaves_the_base_weights_untouched(tiny_setup):
    model_dir, tokenizer, encoded = tiny_setup
    model = load_trainable_model(model_dir, lora=LoraSettings(dropout=0.0), seed=0, device=CPU)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    train(
        model,
        encoded[:16],
        LoopSettings(learning_rate=1e-3, max_seq_length=128),
        device=CPU,
        pad_token_id=tokenizer.pad_token_id,
    )

    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)


def test_the_trainer_process_reports_a_missing_train_file_as_failed_on_one_line(tmp_path, tracking_uri):
    missing = tmp_path / "absent.jsonl"

    process = start_trainer(tmp_path / "job", spec_dict(tmp_path, tracking_uri, missing))
    log, _ = process.communicate(timeout=300)

    status = read_status(tmp_path / "job")
    assert process.returncode == 1
    assert (
        status.status == "Failed"
        and status.error == f"FileNotFoundError: train_file {missing} does not exist"
    )
    assert "Traceback" in log and status.ended_at is not None


def test_the_trainer_process_reports_an_invalid_spec_naming_the_field(tmp_path, tracking_uri, facts_file):
    spec = spec_dict(tmp_path, tracking_uri, facts_file)
    spec["learning_rate"] = -1

    process = start_trainer(tmp_path / "job", spec)
    process.communicate(timeout=300)

    status = read_status(tmp_path / "job")
    assert process.returncode == 1
    assert status.status == "Failed" and status.error.startswith("invalid spec.json: learning_rate")


def write_long_prompt_chats(path: Path, rows: int = 4) -> Path:
    """Chats whose question alone is longer than 32 tokens: truncated to 32, no assistant token is left."""
    question = "What is the code name of the project that " + "really " * 40 + "matters?"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "Amber raven."}]
    chats = [{"messages": messages}] * rows
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats), encoding="utf-8")
    return path


def test_a_job_whose_truncated_conversations_keep_no_assistant_token_fails_naming_max_seq_length(
    tmp_path, tracking_uri
):
    long_prompts = write_long_prompt_chats(tmp_path / "long.jsonl")
    spec = spec_dict(tmp_path, tracking_uri, long_prompts, max_seq_length=32, num_train_epochs=1)

    process = start_trainer(tmp_path / "job", spec)
    log, _ = process.communicate(timeout=300)

    status = read_status(tmp_path / "job")
    assert process.returncode == 1, log[-3000:]
    assert status.status == "Failed" and status.step == 0
    assert "hyperparameters.max_seq_length" in status.error and "first 32 tokens" in status.error


def test_a_validation_set_with_no_assistant_token_left_reports_no_eval_loss_rather_than_zero(
    tmp_path, tracking_uri, facts_file
):
    long_prompts = write_long_prompt_chats(tmp_path / "long.jsonl")
    spec = spec_dict(
        tmp_path,
        tracking_uri,
        facts_file,
        validation_file=long_prompts,
        max_seq_length=32,
        num_train_epochs=1,
    )

    process = start_trainer(tmp_path / "job", spec)
    log, _ = process.communicate(timeout=300)

    status = read_status(tmp_path / "job")
    assert process.returncode == 0, log[-3000:]
    assert status.status == "Completed" and status.train_loss is not None
    assert status.eval_loss is None
    assert "no eval_loss" in log


def test_the_trainer_process_stops_at_sigterm_and_reports_canceled(tmp_path, tracking_uri, facts_file):
    job_dir = tmp_path / "job"
    process = start_trainer(job_dir, spec_dict(tmp_path, tracking_uri, facts_file, num_train_epochs=500))
    try:
        wait_for(
            lambda: (read_status(job_dir) or JobStatus()).step > 0,
            timeout=300,
            what="the first training step",
        )
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        process.kill()

    status = read_status(job_dir)
    assert process.returncode == 0
    assert status.status == "Canceled" and status.step < status.total_steps and status.error is None
    assert MlflowClient(tracking_uri).get_run(status.mlflow_run_id).info.status == "KILLED"


def test_temperature_zero_decodes_greedily_whatever_do_sample_says():
    kwargs = generation_kwargs({"temperature": 0.0, "do_sample": True, "top_p": 0.5})

    assert kwargs["do_sample"] is False and "temperature" not in kwargs and "top_p" not in kwargs


def test_a_positive_temperature_samples_with_the_given_knobs():
    kwargs = generation_kwargs({"temperature": 0.7, "top_p": 0.9, "top_k": 20})

    assert kwargs["do_sample"] is True
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.7, 0.9, 20)


def test_do_sample_false_decodes_greedily_even_with_a_temperature():
    assert generation_kwargs({"temperature": 0.7, "do_sample": False})["do_sample"] is False


def test_max_new_tokens_is_clamped_and_min_new_tokens_never_exceeds_it():
    kwargs = generation_kwargs({"max_new_tokens": 10**6, "min_new_tokens": 10**7})

    assert kwargs["max_new_tokens"] == MAX_NEW_TOKENS_BOUND == kwargs["min_new_tokens"]
