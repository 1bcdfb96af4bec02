"""The training step loop: packed micro-batches, gradient accumulation, AdamW with warm-up and decay,
and a meter for loss, real tokens per second and padding. Used by the job (trainer.py) and by bench/.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from backends.local.jobs import TrainingSpec


@dataclass(frozen=True)
class LoopSettings:
    """The step loop's hyperparameters, named as in TrainingSpec (usable without a job, e.g. by bench/)."""

    learning_rate: float
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 2048
    packing: bool = True
    seed: int = 42
    logging_steps: int = 10

    @classmethod
    def from_spec(cls, spec: TrainingSpec) -> LoopSettings:
        return cls(**{field.name: getattr(spec, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    train_loss: float | None
    tokens_per_second: float
    learning_rate: float
    real_tokens: int  # conversation tokens processed, padding excluded
    padded_tokens: int  # row slots processed, padding included
    seconds: float
    eval_loss: float | None = None


def make_optimizer(model: Any, settings: LoopSettings, total_steps: int) -> tuple[Any, Any]:
    """AdamW (no weight decay on biases and norms) and the warm-up + decay schedule."""
    import torch
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    warmup = math.ceil(settings.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        settings.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    return optimizer, scheduler


def train(
    model: Any,
    conversations: Sequence[Any],
    settings: LoopSettings,
    *,
    device: Any,
    pad_token_id: int,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    on_epoch_end: Callable[[Progress], float | None] = lambda progress: None,
    checkpoint: Callable[[], None] = lambda: None,
) -> Progress:
    """Run every epoch's optimizer steps; the loss is the mean over the step's assistant tokens."""
    import torch

    from backends.local.packing import autocast_for, collate, plan_steps, token_losses

    plan = plan_steps(
        conversations,
        epochs=settings.num_train_epochs,
        row_length=settings.max_seq_length,
        rows_per_batch=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        packing=settings.packing,
        seed=settings.seed,
    )
    total_steps = sum(len(steps) for steps in plan)
    optimizer, scheduler = make_optimizer(model, settings, total_steps)
    meter = _Meter(total_steps, settings.learning_rate)
    on_progress(meter.progress)
    model.train()
    for epoch_index, steps in enumerate(plan):
        for step_in_epoch, micro_batches in enumerate(steps, start=1):
            rows_of = [[[conversations[i] for i in row] for row in rows] for rows in micro_batches]
            batches = [collate(rows, pad_token_id) for rows in rows_of]
            step_targets = max(1, sum(batch.target_tokens for batch in batches))
            for batch in batches:
                with autocast_for(device):
                    loss_sum = token_losses(model, batch.to(device)).sum()
                (loss_sum / step_targets).backward()
                meter.add(batch, float(loss_sum.detach()))
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            meter.step(epoch_index + step_in_epoch / len(steps), scheduler.get_last_lr()[0])
            if meter.progress.step % settings.logging_steps == 0 or meter.progress.step == total_steps:
                on_progress(meter.flush())
            checkpoint()
        with meter.paused():  # evaluation time is not training time
            meter.set_eval_loss(on_epoch_end(meter.progress))
    return meter.progress


class _Meter:
    """Training clock, token counts and the loss over the current logging window."""

    def __init__(self, total_steps: int, learning_rate: float) -> None:
        self.progress = Progress(0, total_steps, 0.0, None, 0.0, learning_rate, 0, 0, 0.0)
        self.window_loss, self.window_targets = 0.0, 0
        self.real_tokens, self.padded_tokens = 0, 0
        self.started = time.perf_counter()

    def add(self, batch: Any, loss_sum: float) -> None:
        self.window_loss += loss_sum
        self.window_targets += batch.target_tokens
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.input_ids.numel()

    def step(self, epoch: float, learning_rate: float) -> None:
        seconds = time.perf_counter() - self.started
        self.progress = replace(
            self.progress,
            step=self.progress.step + 1,
            epoch=epoch,
            train_loss=self.window_loss / self.window_targets
            if self.window_targets
            else self.progress.train_loss,
            tokens_per_second=self.real_tokens / seconds if seconds > 0 else 0.0,
            learning_rate=learning_rate,
            real_tokens=self.real_tokens,
            padded_tokens=self.padded_tokens,
            seconds=seconds,
        )

    def flush(self) -> Progress:
        self.window_loss, self.window_targets = 0.0, 0
        return self.progress

    def set_eval_loss(self, eval_loss: float | None) -> None:
        if eval_loss is not None:
            self.progress = replace(self.progress, eval_loss=eval_loss)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        paused_at = time.perf_counter()
        yield
        self.started += time.perf_counter() - paused_at
