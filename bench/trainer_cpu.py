"""Training throughput on CPU: our packed step loop vs transformers.Trainer with a padding collator.

Both fine-tune the same tiny-phi3 (LoRA r32 on all linear layers, fp32, same torch threads) on
the same conversations for the same epochs. Tokens/s counts real conversation tokens only, so
time spent on padding counts against whoever pads. The baseline is the common recipe: batches
of 16 conversations in data order, each padded to its longest row.

    .venv/bin/python -m bench.trainer_cpu [--epochs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as transformers_logging

from backends.local.base_models import LoraSettings, build_tiny_phi3, load_trainable_model
from backends.local.packing import EncodedConversation, encode_conversation, load_conversations
from backends.local.trainer import LoopSettings, train

DATA_FILE = Path(__file__).resolve().parents[1] / "sample_data" / "support_chats.jsonl"
LORA = LoraSettings(r=32, alpha=64, dropout=0.0)
BASELINE_BATCH = 16  # conversations per step
PACKED_ROW, PACKED_ROWS = 256, 4  # the same 1024 token slots per step as 16 conversations of ~64 tokens
CPU = torch.device("cpu")


@dataclass
class Measurement:
    tokens_per_second: float
    padding_fraction: float
    seconds: float
    mean_loss: float


def measure_ours(
    model_dir: Path, encoded: list[EncodedConversation], pad_id: int, epochs: int
) -> Measurement:
    model = load_trainable_model(model_dir, lora=LORA, seed=0, device=CPU)
    settings = LoopSettings(
        learning_rate=5e-3,
        warmup_ratio=0.1,
        num_train_epochs=epochs,
        per_device_train_batch_size=PACKED_ROWS,
        max_seq_length=PACKED_ROW,
        packing=True,
        seed=0,
        logging_steps=10**9,
    )
    final = train(model, encoded, settings, device=CPU, pad_token_id=pad_id)
    padding = 1 - final.real_tokens / final.padded_tokens
    return Measurement(
        final.real_tokens / final.seconds, padding, final.seconds, final.train_loss or math.nan
    )


def measure_hf_trainer(
    model_dir: Path, encoded: list[EncodedConversation], tokenizer, epochs: int
) -> Measurement:
    model = load_trainable_model(model_dir, lora=LORA, seed=0, device=CPU)
    features = [{"input_ids": c.input_ids, "labels": c.labels} for c in encoded]
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BASELINE_BATCH,
            num_train_epochs=epochs,
            learning_rate=5e-3,
            warmup_steps=0.1,  # a float below 1 is a ratio in transformers 5
            train_sampling_strategy="sequential",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_strategy="no",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    real = sum(len(c) for c in encoded)
    padded = sum(
        len(batch) * max(len(c) for c in batch)
        for batch in (encoded[i : i + BASELINE_BATCH] for i in range(0, len(encoded), BASELINE_BATCH))
    )
    return Measurement(real * epochs / seconds, 1 - real / padded, seconds, result.training_loss)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (ours, baseline); medians are shown")
    options = parser.parse_args()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as work:
        model_dir = build_tiny_phi3(Path(work) / "tiny-phi3", corpus_files=[DATA_FILE], seed=0)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        encoded = [encode_conversation(tokenizer, c, PACKED_ROW) for c in load_conversations(DATA_FILE)]
        lengths = [len(c) for c in encoded]
        print(
            f"data: {len(encoded)} conversations from {DATA_FILE.name}, {sum(lengths)} tokens "
            f"(length {min(lengths)}-{max(lengths)}, mean {statistics.mean(lengths):.0f}), "
            f"{options.epochs} epochs, {torch.get_num_threads()} threads"
        )
        ours, baseline = [], []
        for _ in range(options.rounds):
            ours.append(measure_ours(model_dir, encoded, tokenizer.pad_token_id, options.epochs))
            baseline.append(measure_hf_trainer(model_dir, encoded, tokenizer, options.epochs))

    def median(runs: list[Measurement]) -> Measurement:
        return sorted(runs, key=lambda m: m.tokens_per_second)[len(runs) // 2]

    rows = {
        f"ours: packed rows {PACKED_ROWS}x{PACKED_ROW}": median(ours),
        f"transformers.Trainer, pad to longest, batch {BASELINE_BATCH}": median(baseline),
    }
    print(f"{'trainer':<48} {'tokens/s':>10} {'padding':>8} {'train s':>8} {'mean loss':>10}")
    for name, m in rows.items():
        speed, padding = f"{m.tokens_per_second:>10.0f}", f"{m.padding_fraction:>8.1%}"
        print(f"{name:<48} {speed} {padding} {m.seconds:>8.1f} {m.mean_loss:>10.3f}")
    # Each round runs both back to back, so a round's ratio is the least disturbed by other load.
    ratios = [o.tokens_per_second / b.tokens_per_second for o, b in zip(ours, baseline, strict=True)]
    print(
        f"speed-up (ours / baseline), median of {len(ratios)} paired rounds: {statistics.median(ratios):.2f}x"
    )
    print("goal >= 1.5x; per round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    every_run = {
        "ours_tokens_per_s": [round(m.tokens_per_second) for m in ours],
        "baseline_tokens_per_s": [round(m.tokens_per_second) for m in baseline],
    }
    print(json.dumps(every_run))


if __name__ == "__main__":
    main()
