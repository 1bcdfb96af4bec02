"""The training step loop: packed micro-batches, gradient accumulation, AdamW with warm-up and decay,
and a meter for loss, real tokens per second and padding. Used by the job (trainer.py) and by bench/.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing jobs would load pydantic; the loop runs without it (e.g. bench/ on a GPU box)
    from backends.local.accelerator import Execution
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
    # At most all but the last step: warm-up starts at learning rate 0, so a run that is warm-up only
    # (one step with any warmup_ratio) would take every step at rate 0 and leave the model untouched.
    warmup = min(math.ceil(settings.warmup_ratio * total_steps), max(0, total_steps - 1))
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
    execution: Execution | None = None,
    on_event: Callable[[str], None] = lambda message: None,
) -> Progress:
    """Run every epoch's optimizer steps; the loss is the mean over the step's assistant tokens.

    `execution` (accelerator.py) says how: precision, layout, micro-batch budget; by default the
    device's plain settings. An out-of-memory error re-runs the step with smaller micro-batches
    (or checkpointing), reported through `on_event`, and training goes on.
    """
    from backends.local.accelerator import Execution
    from backends.local.packing import plan_steps

    execution = execution or Execution(device=device, bf16=device.type == "cuda")
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
    runner = _StepRunner(model, conversations, settings, execution, pad_token_id, on_event)
    meter = _Meter(total_steps, settings.learning_rate)
    on_progress(meter.progress)
    model.train()
    for epoch_index, steps in enumerate(plan):
        for step_in_epoch, micro_batches in enumerate(steps, start=1):
            meter.add(*runner.accumulate_gradients(micro_batches, optimizer))
            runner.optimizer_step(optimizer, scheduler)
            meter.step(epoch_index + step_in_epoch / len(steps), scheduler.get_last_lr()[0])
            if meter.progress.step % settings.logging_steps == 0 or meter.progress.step == total_steps:
                on_progress(meter.flush())
            checkpoint()
        with meter.paused():  # evaluation time is not training time
            meter.set_eval_loss(on_epoch_end(meter.progress))
    return meter.progress


@dataclass(frozen=True)
class StepTokens:
    real: int
    padded: int
    targets: int


class _StepRunner:
    """Forward and backward passes of one optimizer step, in micro-batches of the current shape."""

    def __init__(
        self,
        model: Any,
        conversations: Sequence[Any],
        settings: LoopSettings,
        execution: Execution,
        pad_token_id: int,
        on_event: Callable[[str], None],
    ) -> None:
        from backends.local.accelerator import OutOfMemoryPolicy, initial_shape, set_gradient_checkpointing

        self.model, self.conversations, self.settings = model, conversations, settings
        self.execution, self.pad_token_id, self.on_event = execution, pad_token_id, on_event
        self.lengths = [len(conversation) for conversation in conversations]
        self.planned_shape = initial_shape(
            execution,
            rows_per_batch=settings.per_device_train_batch_size,
            max_seq_length=settings.max_seq_length,
        )
        self.shape = self.planned_shape
        self.plan_is_shape = execution.tokens_per_micro_batch is None
        self.policy = OutOfMemoryPolicy(
            self.shape,
            min_row_length=max(self.lengths, default=1),
            gradient_checkpointing=execution.gradient_checkpointing,
        )
        set_gradient_checkpointing(model, execution.gradient_checkpointing)

    def accumulate_gradients(self, micro_batches: list[Any], optimizer: Any) -> tuple[StepTokens, float]:
        """Gradients of the step's mean token loss; on out-of-memory, back off and run the step again."""
        from backends.local.accelerator import is_out_of_memory, release_memory

        while True:
            failure = None
            try:
                return self._forward_backward(self._layout(micro_batches))
            except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(error):
                    raise
                failure = (str(error).strip().splitlines() or ["out of memory"])[0]
            # Outside the except block, so the traceback (and the activations it holds) is gone.
            optimizer.zero_grad(set_to_none=True)
            release_memory(self.execution.device)
            self._back_off(failure)

    def _layout(self, micro_batches: list[Any]) -> list[Any]:
        from backends.local.packing import relayout_step

        if self.plan_is_shape and self.shape == self.planned_shape:
            return micro_batches
        return relayout_step(micro_batches, self.lengths, self.shape, seed=self.settings.seed)

    def _forward_backward(self, micro_batches: list[Any]) -> tuple[StepTokens, float]:
        from backends.local.packing import autocast_for, collate, token_losses

        execution, device = self.execution, self.execution.device
        batches = [
            collate(
                [[self.conversations[i] for i in row] for row in rows],
                self.pad_token_id,
                flat=execution.flat,
                max_length=self.settings.max_seq_length,
            )
            for rows in micro_batches
        ]
        step_targets = max(1, sum(batch.target_tokens for batch in batches))
        loss_total = None
        for batch in batches:
            with autocast_for(device, execution.bf16):
                loss_sum = token_losses(self.model, batch.to(device)).sum()
            (loss_sum / step_targets).backward()
            detached = loss_sum.detach()
            loss_total = detached if loss_total is None else loss_total + detached
        tokens = StepTokens(
            real=sum(batch.real_tokens for batch in batches),
            padded=sum(batch.input_ids.numel() for batch in batches),
            targets=sum(batch.target_tokens for batch in batches),
        )
        return tokens, float(loss_total) if loss_total is not None else 0.0  # one sync per step

    def _back_off(self, failure: str) -> None:
        from backends.local.accelerator import set_gradient_checkpointing

        backoff = self.policy.next()
        if backoff is None:
            raise RuntimeError(
                f"out of memory even with one conversation per micro-batch and gradient checkpointing on "
                f"({failure}); lower hyperparameters.max_seq_length (now {self.settings.max_seq_length}) "
                "or use a GPU with more free memory"
            )
        set_gradient_checkpointing(self.model, backoff.gradient_checkpointing)
        self.shape = backoff.shape
        self.on_event(f"out of memory ({failure}); backing off: {backoff.reason}; repeating the step")

    def optimizer_step(self, optimizer: Any, scheduler: Any) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


class _Meter:
    """Training clock, token counts and the loss over the current logging window.

    Tokens per second are counted from the end of the first step on once there is a second: the first
    holds torch.compile's tracing and kernel autotuning (minutes on a GPU), which a short job's whole-run
    average would spread over every step, understating the rate the cost estimates are scaled from.
    """

    def __init__(
        self, total_steps: int, learning_rate: float, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.progress = Progress(0, total_steps, 0.0, None, 0.0, learning_rate, 0, 0, 0.0)
        self.window_loss, self.window_targets = 0.0, 0
        self.real_tokens, self.padded_tokens = 0, 0
        self.clock = clock
        self.started = clock()
        self.first_step_end: tuple[float, int] | None = None  # (time, real tokens) after step 1

    def add(self, tokens: StepTokens, loss_sum: float) -> None:
        self.window_loss += loss_sum
        self.window_targets += tokens.targets
        self.real_tokens += tokens.real
        self.padded_tokens += tokens.padded

    def step(self, epoch: float, learning_rate: float) -> None:
        now = self.clock()
        seconds = now - self.started
        if self.first_step_end is None:  # the first step: from the start
            since, tokens = self.started, self.real_tokens
            self.first_step_end = (now, self.real_tokens)
        else:
            since, tokens = self.first_step_end[0], self.real_tokens - self.first_step_end[1]
        self.progress = replace(
            self.progress,
            step=self.progress.step + 1,
            epoch=epoch,
            train_loss=self.window_loss / self.window_targets
            if self.window_targets
            else self.progress.train_loss,
            tokens_per_second=tokens / (now - since) if now > since else 0.0,
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
