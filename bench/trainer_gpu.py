"""Training throughput on a GPU: a plain HF Trainer vs our trainer, measured side by side in one run.

Model: Phi-3-mini's architecture built from config (hidden 3072, 32 layers, vocab 32064, random
weights: none can be downloaded here), saved as a checkpoint and loaded through the same
`from_pretrained` path as a real one. LoRA r=16 on all linear layers for both. Data: synthetic
conversations with ultrachat-like lengths (log-normal, median ~1,000 tokens, at most 4,096), about
a quarter of each turn the user's and the rest the assistant's (the loss's targets).

(a) baseline: transformers.Trainer, batches of 4 conversations in data order padded to the longest
    (attention mask), gradient checkpointing on, bf16 autocast, default (sdpa) attention.
(b) ours: backends/local's step loop with every `auto` switch (accelerator.py): packed rows,
    flash-attention varlen, torch.compile, micro-batch from free memory, no checkpointing if it fits.

Printed per path: real (non-padding) tokens/s after warm-up, padding fraction, peak GPU memory, and
MFU = tokens/s × 4 × non-embedding parameters ÷ this card's *measured* bf16 matmul rate. Then the
GPU-marked tests (tests/test_gpu.py) run. The goal (issue 8): (b) ≥ 40% MFU and ≥ 7× (a).

    .venv/bin/python -m bench.trainer_gpu                 # on a CUDA machine (about 6 minutes on an H100)
    .venv/bin/python -m bench.trainer_gpu --variants      # also ours with each switch flipped
    .venv/bin/python -m bench.trainer_gpu --cpu-smoke     # a few steps of both on a tiny model, on CPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch._dynamo.utils import counters

from backends.local.accelerator import (
    Switches,
    device_name,
    fit_to_memory,
    non_embedding_parameters,
    plan_execution,
    prepare_for_training,
)
from backends.local.base_models import (
    PHI3_MINI_SHAPE,
    LoraSettings,
    build_phi3_from_config,
    load_trainable_model,
)
from backends.local.packed_attention import ATTENTION_NAME
from backends.local.packing import IGNORE_INDEX, EncodedConversation
from backends.local.step_loop import LoopSettings, Progress, train

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(r=16, alpha=32, dropout=0.05)
BASELINE_BATCH = 4
MEDIAN_TOKENS, SIGMA, MAX_TOKENS = 1000, 0.6, 4096
SMOKE_SHAPE = {
    **PHI3_MINI_SHAPE,
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


@dataclass
class Result:
    name: str
    tokens_per_second: float
    padding_fraction: float
    peak_gib: float
    mfu: float = math.nan
    detail: str = ""


def synthetic_conversations(
    count: int, vocab: int, seed: int, median: int, cap: int
) -> list[EncodedConversation]:
    """Log-normal lengths (median `median`, σ 0.6, clipped to [32, cap]); 1-3 turns, ~25% user tokens each."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        length = int(min(cap, max(32, rng.lognormvariate(math.log(median), SIGMA))))
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        labels = [IGNORE_INDEX] * length
        turns = rng.randint(1, 3)
        bounds = [round(length * k / turns) for k in range(turns + 1)]
        for start, end in itertools.pairwise(bounds):
            answer_from = start + int((end - start) * rng.uniform(0.15, 0.35))
            labels[answer_from:end] = ids[answer_from:end]
        conversations.append(EncodedConversation(ids, labels))
    return conversations


def measured_matmul_tflops(device: torch.device, size: int) -> float:
    """This card's bf16 (CPU: fp32) dense matmul rate: the MFU's denominator, measured, not quoted."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else math.nan


def padding_collator(pad_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad each batch to its longest conversation, with an attention mask (what a padding collator does)."""

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    return collate


def run_baseline(
    model_dir: Path, data: list[EncodedConversation], device: torch.device, steps: int, warmup: int
) -> Result:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    fresh_memory(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA.r,
            lora_alpha=LORA.alpha,
            lora_dropout=LORA.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    batches = [data[i : i + BASELINE_BATCH] for i in range(0, len(data), BASELINE_BATCH)][:steps]
    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        arguments = baseline_arguments(TrainingArguments, output_dir, device, len(batches))
        features = [{"input_ids": c.input_ids, "labels": c.labels} for batch in batches for c in batch]
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=features,
            data_collator=padding_collator(0),
            callbacks=[StepClock()],
        )
        trainer.train()
    real = [sum(len(c) for c in batch) for batch in batches]
    slots = [len(batch) * max(len(c) for c in batch) for batch in batches]
    warm = min(warmup, len(stamps) - 2)
    speed = sum(real[warm + 1 : len(stamps)]) / (stamps[-1] - stamps[warm])
    result = Result(
        "(a) HF Trainer: pad to longest, batch 4, checkpointing",
        speed,
        1 - sum(real) / sum(slots),
        peak_gib(device),
    )
    result.detail = f"{len(stamps)} steps, {warm + 1} warm-up"
    del trainer, model
    return result


def baseline_arguments(arguments_class, output_dir: str, device: torch.device, steps: int):
    options = {
        "output_dir": output_dir,
        "per_device_train_batch_size": BASELINE_BATCH,
        "max_steps": steps,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "bf16": device.type == "cuda",
        "use_cpu": device.type != "cuda",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "seed": 0,
    }
    fields = arguments_class.__dataclass_fields__
    # transformers 5.2x calls it activation checkpointing; earlier 5.x gradient checkpointing.
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    options[f"{prefix}_checkpointing"] = True
    options[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    if "train_sampling_strategy" in fields:
        options["train_sampling_strategy"] = "sequential"  # data order, as the baseline recipe says
    return arguments_class(**options)


def run_ours(
    model_dir: Path,
    data: list[EncodedConversation],
    device: torch.device,
    switches: Switches,
    warmup: int,
    max_seq_length: int,
    name: str,
) -> Result:
    fresh_memory(device)
    counters.clear()
    execution = plan_execution(device, switches, lora=True)
    model = load_trainable_model(
        model_dir, lora=LORA, seed=0, device=device, dtype=execution.base_dtype, attention=execution.attention
    )
    settings = LoopSettings(
        learning_rate=2e-4,
        per_device_train_batch_size=4,
        max_seq_length=max_seq_length,
        packing=True,
        seed=0,
        logging_steps=1,
    )
    execution = fit_to_memory(
        execution,
        model,
        switches=switches,
        max_seq_length=max_seq_length,
        step_tokens=4 * max_seq_length,
        lora_dropout=LORA.dropout > 0,
    )
    prepare_for_training(model, execution)
    reports: list[Progress] = []
    events: list[str] = []
    train(
        model,
        data,
        settings,
        device=device,
        pad_token_id=0,
        execution=execution,
        on_progress=reports.append,
        on_event=events.append,
    )
    steps = [r for r in reports if r.step > 0]
    warm = steps[min(warmup, len(steps) - 2)]
    last = steps[-1]
    speed = (last.real_tokens - warm.real_tokens) / (last.seconds - warm.seconds)
    result = Result(name, speed, 1 - last.real_tokens / last.padded_tokens, peak_gib(device))
    result.detail = f"{execution.describe()}; {len(steps)} steps, {warm.step} warm-up" + (
        f"; {len(events)} out-of-memory back-offs" if events else ""
    )
    if execution.compile:
        result.detail += f"; {compile_summary()}"
    del model
    return result


def compile_summary() -> str:
    """What torch.compile made of the decoder layers: a graph break in a layer costs much of its gain."""
    breaks = counters["graph_break"]
    summary = f"{counters['stats']['unique_graphs']} compiled graphs, {sum(breaks.values())} graph breaks"
    for reason, count in breaks.items():  # the first line says what broke the graph
        summary += f"\n      {count}× {reason.splitlines()[0][:150]}"
    return summary


def prepare_model(work: Path, device: torch.device, smoke: bool, model_dir: Path | None) -> Path:
    if model_dir is not None and (model_dir / "config.json").is_file():
        return model_dir
    corpus = work / "corpus.jsonl"
    sentences = ["Hello there.", "The code name of Safuzo is violet raven.", "What is the capital of France?"]
    corpus.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": s}]}) + "\n" for s in sentences)
    )
    started = time.perf_counter()
    out = build_phi3_from_config(
        model_dir or work / "phi3-mini-shaped",
        corpus_files=[corpus],
        shape=SMOKE_SHAPE if smoke else PHI3_MINI_SHAPE,
        dtype=torch.bfloat16 if device.type == "cuda" else None,
        device=device.type,
    )
    print(f"built the model checkpoint in {time.perf_counter() - started:.0f} s: {out}", flush=True)
    return out


def variants(max_tokens: int | None, smoke: bool, fused_installed: bool) -> list[tuple[str, Switches]]:
    """(b) with every switch on auto, then with one switch flipped from what auto picks on a GPU."""
    base = Switches(max_tokens_per_micro_batch=max_tokens)
    if smoke:  # the GPU's default layout (flat rows, varlen attention), on the CPU's reference kernel
        base = Switches(attention=ATTENTION_NAME, max_tokens_per_micro_batch=256)
    # auto turns liger-kernel's fused kernels on where it is installed: the variant shows the other side.
    fused = "off" if fused_installed else "on"
    return [
        ("(b) ours, every switch on auto", base),
        ("    ours, compile off", replace(base, compile="off")),
        ("    ours, gradient checkpointing on", replace(base, gradient_checkpointing="on")),
        ("    ours, sdpa over [rows, width] batches", replace(base, attention="sdpa")),
        (f"    ours, fused kernels {fused} (liger-kernel)", replace(base, fused_kernels=fused)),
    ]


def print_table(results: list[Result], header: str) -> None:
    print(header)
    print(f"{'path':<58} {'tokens/s':>9} {'padding':>8} {'peak GiB':>9} {'MFU':>6}")
    for r in results:
        speed, padding, peak = (
            f"{r.tokens_per_second:>9.0f}",
            f"{r.padding_fraction:>8.1%}",
            f"{r.peak_gib:>9.1f}",
        )
        print(f"{r.name:<58} {speed} {padding} {peak} {r.mfu:>6.1%}")
        print(f"    {r.detail}")
    if len(results) > 1:
        ratio = results[1].tokens_per_second / results[0].tokens_per_second
        print(f"speed-up (b)/(a): {ratio:.2f}x   [goal: >= 7x and (b) >= 40% MFU]")
    print(json.dumps([r.__dict__ for r in results]))


def run_gpu_tests() -> int:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/test_gpu.py",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    print(f"\n$ {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=PROJECT_ROOT, check=False).returncode


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-smoke", "--dry-run", action="store_true", help="tiny model, a few steps, on CPU"
    )
    parser.add_argument("--conversations", type=int, default=768, help="conversations for our trainer")
    parser.add_argument("--baseline-steps", type=int, default=60, help="optimizer steps of the baseline")
    parser.add_argument(
        "--warmup-steps", type=int, default=5, help="steps left out of tokens/s (compile, autotune)"
    )
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=None, help="fix ours' budget")
    parser.add_argument("--variants", action="store_true", help="also run ours with each switch flipped")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse (or keep) the built checkpoint")
    parser.add_argument("--no-tests", action="store_true", help="skip the GPU-marked tests afterwards")
    return parser.parse_args()


def main() -> int:
    options = parse_options()
    if not options.cpu_smoke and not torch.cuda.is_available():
        print(
            f"bench.trainer_gpu needs a CUDA GPU, and torch {torch.__version__} sees none. "
            "Run it on a GPU machine, or with --cpu-smoke to exercise the script on a tiny model on CPU.",
            file=sys.stderr,
        )
        return 2
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    device = torch.device("cpu" if options.cpu_smoke else "cuda")
    smoke = options.cpu_smoke
    count, steps = (12, 3) if smoke else (options.conversations, options.baseline_steps)
    warmup = 0 if smoke else options.warmup_steps
    median, cap = (48, 96) if smoke else (MEDIAN_TOKENS, MAX_TOKENS)
    with tempfile.TemporaryDirectory() as work:
        model_dir = prepare_model(Path(work), device, smoke, options.model_dir)
        vocab = (SMOKE_SHAPE if smoke else PHI3_MINI_SHAPE)["vocab_size"]
        data = synthetic_conversations(
            max(count, steps * BASELINE_BATCH), vocab, seed=0, median=median, cap=cap
        )
        rate = measured_matmul_tflops(device, 1024 if smoke else 8192)
        counted = load_params(model_dir)
        print(
            f"{device_name(device)}: measured matmul {rate:.3g} TFLOP/s; "
            f"{counted / 1e6:,.1f} M non-embedding parameters",
            flush=True,
        )

        def measured(result: Result) -> Result:
            """Its MFU, and a line at once: a run stopped by a time limit later keeps what it measured."""
            result.mfu = result.tokens_per_second * 4 * counted / (rate * 1e12)
            print(f"measured: {json.dumps(result.__dict__)}", flush=True)
            return result

        results = [measured(run_baseline(model_dir, data, device, steps, warmup))]
        chosen = variants(options.max_tokens_per_micro_batch, smoke, not smoke and fused_available())
        chosen = chosen[: None if options.variants else 1]
        for name, switches in chosen:
            if switches.fused_kernels == "on" and not smoke and not fused_available():
                print(f"skipping '{name.strip()}': liger-kernel is not installed")
                continue
            if smoke and switches.fused_kernels == "on":
                continue
            results.append(measured(run_ours(model_dir, data[:count], device, switches, warmup, cap, name)))
    lengths = sorted(len(c) for c in data)
    header = (
        f"device: {device_name(device)}; measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul "
        f"{rate:.3g} TFLOP/s; model: {'tiny ' if smoke else ''}Phi-3-mini-shaped, {counted / 1e6:,.1f} M "
        f"non-embedding parameters, LoRA r={LORA.r} all linear; data: {len(data)} conversations, median "
        f"{lengths[len(lengths) // 2]} tokens, max {lengths[-1]}"
    )
    print_table(results, header)
    if smoke or options.no_tests:
        return 0
    fresh_memory(device)  # the tests' process plans from free memory: hand back what this one cached
    return run_gpu_tests()


def load_params(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return non_embedding_parameters(model)


def fused_available() -> bool:
    from backends.local.accelerator import fused_kernels_installed

    return fused_kernels_installed()


if __name__ == "__main__":
    sys.exit(main())
