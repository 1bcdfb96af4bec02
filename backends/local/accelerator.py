"""Where and how a fine-tune runs: device, precision, attention kernel, compile, checkpointing, the
micro-batch size that fits the GPU's free memory, and what to do when memory runs out anyway.

The choices are made here, once, into an `Execution`; the step loop (step_loop.py) runs the same
code for every choice. On CPU everything stays as it always was: fp32, sdpa attention over
[rows, width] packed batches, no compile, no checkpointing. On a CUDA GPU the defaults are the
fast ones: bf16 autocast (and a bf16 frozen base under LoRA), the flat packed layout with
flash-attention varlen, `torch.compile` of the decoder layers, no gradient checkpointing while the
planned micro-batch fits, and a micro-batch token budget from the free memory. Each is a switch.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from backends.local.memory_plan import ModelShape, Switch, plan_micro_batch_tokens
from backends.local.packed_attention import ATTENTION_NAME, varlen_kernel_available
from backends.local.packing import MicroBatchShape

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "sdpa", "eager", ATTENTION_NAME)


def choose_device(choice: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU; asking for `cuda` without one is an error that says so."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"compute.device must be auto, cpu or cuda (got {choice!r})")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"compute.device is 'cuda' but torch {torch.__version__} sees no GPU (CPU-only build, or no "
            "driver); use 'auto' or 'cpu'"
        )
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def supports_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: Ampere (A100, A10, RTX 30xx) and newer. Older GPUs and the CPU train in fp32."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass(frozen=True)
class Switches:
    """The user's throughput switches (TrainingSpec / RunConfig.compute); `auto` picks per device."""

    compile: Switch = "auto"
    gradient_checkpointing: Switch = "auto"
    attention: str = "auto"
    fused_kernels: Switch = "auto"
    max_tokens_per_micro_batch: int | None = None


@dataclass(frozen=True)
class Execution:
    """How the step loop runs. `tokens_per_micro_batch=None` keeps the spec's rows × max_seq_length."""

    device: torch.device
    bf16: bool = False
    base_dtype: torch.dtype = torch.float32
    attention: str = "sdpa"
    compile: bool = False
    gradient_checkpointing: bool = False
    fused_kernels: bool = False
    tokens_per_micro_batch: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def flat(self) -> bool:
        """One row per micro-batch, conversation boundaries passed to the varlen attention."""
        return self.attention == ATTENTION_NAME

    def describe(self) -> str:
        budget = self.tokens_per_micro_batch or "spec rows"
        return (
            f"device {self.device}, {'bf16' if self.bf16 else 'fp32'} (base weights "
            f"{str(self.base_dtype).removeprefix('torch.')}), attention {self.attention}, "
            f"compile {'on' if self.compile else 'off'}, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, fused kernels "
            f"{'on' if self.fused_kernels else 'off'}, tokens per micro-batch {budget}"
        )


def plan_execution(
    device: torch.device, switches: Switches, *, lora: bool, attention_dropout: float = 0.0
) -> Execution:
    """Precision, attention, compile and fused kernels: what must be known before the model loads."""
    if switches.attention not in ATTENTION_CHOICES:
        raise ValueError(
            f"attention must be one of {', '.join(ATTENTION_CHOICES)} (got {switches.attention!r})"
        )
    cuda, notes = device.type == "cuda", []
    bf16 = supports_bf16(device)
    if cuda and not bf16:
        notes.append(f"{device_name(device)} has no bf16 tensor cores: training in fp32")
    attention = switches.attention
    if attention == ATTENTION_NAME and cuda and not varlen_kernel_available():
        notes.append(
            f"torch {torch.__version__} has no varlen kernel: {ATTENTION_NAME} runs its slow reference"
        )
    if attention == "auto":
        # The flash varlen kernel needs half precision and has no attention dropout.
        fits = bf16 and attention_dropout == 0 and varlen_kernel_available()
        attention = ATTENTION_NAME if fits else "sdpa"
    fused = switches.fused_kernels == "on" or (
        switches.fused_kernels == "auto" and cuda and fused_kernels_installed()
    )
    if switches.fused_kernels == "on" and not (cuda and fused_kernels_installed()):
        raise RuntimeError(
            "fused_kernels is 'on' but needs a CUDA GPU and the liger-kernel package "
            "(pip install -c constraints.txt liger-kernel==0.8.5); use 'auto' or 'off'"
        )
    return Execution(
        device=device,
        bf16=bf16,
        # LoRA trains fp32 adapters over a frozen base: a bf16 base halves its memory and skips a cast
        # per use. Full fine-tuning keeps fp32 master weights (AdamW updates underflow in bf16).
        base_dtype=torch.bfloat16 if bf16 and lora else torch.float32,
        attention=attention,
        compile=switches.compile == "on" or (switches.compile == "auto" and cuda),
        gradient_checkpointing=switches.gradient_checkpointing == "on",
        fused_kernels=fused,
        tokens_per_micro_batch=switches.max_tokens_per_micro_batch,
        notes=tuple(notes),
    )


def fused_kernels_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def fit_to_memory(
    execution: Execution,
    model: Any,
    *,
    switches: Switches,
    max_seq_length: int,
    step_tokens: int,
    lora_dropout: bool,
) -> Execution:
    """On CUDA, with no fixed budget: the micro-batch budget and checkpointing from free memory."""
    if execution.device.type != "cuda" or switches.max_tokens_per_micro_batch is not None:
        return execution
    free, total = torch.cuda.mem_get_info(execution.device)
    # Gradients and AdamW's two moments of the trainable weights (fp32) do not exist yet.
    pending = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_micro_batch_tokens(
        ModelShape.from_config(model.config),
        free_bytes=free - pending,
        total_bytes=total,
        max_seq_length=max_seq_length,
        step_tokens=step_tokens,
        checkpointing=switches.gradient_checkpointing,
        bytes_per_value=2 if execution.bf16 else 4,
        lora_dropout=lora_dropout,
    )
    return replace(
        execution,
        tokens_per_micro_batch=plan.tokens_per_micro_batch,
        gradient_checkpointing=plan.gradient_checkpointing,
        notes=(*execution.notes, plan.reason),
    )


def causal_lm(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute each decoder layer in the backward pass (saves most activation memory, costs ~30%)."""
    base = causal_lm(model)
    if enabled == gradient_checkpointing_enabled(model):
        return
    # transformers 5.2x renamed it "activation checkpointing"; older 5.x only has the gradient_* names.
    modern = hasattr(base, "activation_checkpointing_enable")
    if enabled:
        # Non-reentrant: gradients reach the LoRA adapters although the embeddings are frozen.
        kwargs = {"use_reentrant": False}
        if modern:
            base.activation_checkpointing_enable(kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif modern:
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def gradient_checkpointing_enabled(model: Any) -> bool:
    base = causal_lm(model)
    if hasattr(type(base), "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(base.is_gradient_checkpointing)


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks (transformers names their classes in `_no_split_modules`)."""
    base = causal_lm(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} declares no decoder layer class (_no_split_modules)")
    return layers


def compile_layers(model: Any) -> int:
    """`torch.compile` each decoder layer in place ("regional" compilation: the layers share one
    compiled code, so compiling takes seconds rather than minutes; parameter names and the state
    dict stay as they were, so saving and merging are unchanged)."""
    layers = decoder_layers(model)
    config = torch._dynamo.config
    # A recompile per layer must never hit the limit and silently fall back to eager.
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(getattr(config, limit_name), 4 * len(layers)))
    for layer in layers:
        layer.compile()
    return len(layers)


def apply_fused_kernels(model: Any) -> bool:
    """Liger's Triton kernels for RMSNorm and SwiGLU (optional package, CUDA only), on this model only.

    The loss stays ours (logits only where there are targets), so its fused cross-entropy is not used.
    Its RoPE is not either: liger-kernel 0.8.5 runs it through a ``torch.compiler.disable``d dispatcher,
    which would split every compiled decoder layer in two. Liger also rebinds the modeling module's
    names (``Phi3RMSNorm``, ``Phi3MLP``, ...) for the whole process besides patching this model's
    modules; those names are put back, so a model built later (the bench's fused-kernels-off variant,
    the scoring server's) is transformers' own.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = causal_lm(model)
    with _module_names_kept(sys.modules[type(base).__module__]):
        _apply_liger_kernel_to_instance(
            model=base,
            rope=False,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    return True


@contextlib.contextmanager
def _module_names_kept(module: types.ModuleType) -> Iterator[None]:
    """Whatever the block rebinds or adds in ``module``'s namespace is undone when it ends."""
    before = dict(vars(module))
    try:
        yield
    finally:
        for name in [name for name in vars(module) if name not in before]:
            delattr(module, name)
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def prepare_for_training(model: Any, execution: Execution) -> None:
    """Checkpointing, fused kernels and compile, in that order (compile traces the patched forwards)."""
    set_gradient_checkpointing(model, execution.gradient_checkpointing)
    if execution.fused_kernels:
        apply_fused_kernels(model)
    if execution.compile:
        compile_layers(model)


def initial_shape(execution: Execution, *, rows_per_batch: int, max_seq_length: int) -> MicroBatchShape:
    """The micro-batch shape the loop starts with (the plan's own shape when no budget is set)."""
    budget = execution.tokens_per_micro_batch
    if budget is None:
        return MicroBatchShape(rows_per_batch, max_seq_length)
    if execution.flat:
        return MicroBatchShape(1, max(budget, max_seq_length))
    return MicroBatchShape(max(1, budget // max_seq_length), max_seq_length)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's allocator (torch.OutOfMemoryError, cuBLAS) or the CPU's, which raises a plain RuntimeError
    ("DefaultCPUAllocator: can't allocate memory") when a micro-batch exceeds the machine's memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message.lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in message
        or "can't allocate memory" in message
    )


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Backoff:
    shape: MicroBatchShape
    gradient_checkpointing: bool
    reason: str


class OutOfMemoryPolicy:
    """What to try after an out-of-memory error, smallest sacrifice first.

    Fewer rows per micro-batch, then shorter rows (never shorter than the longest conversation),
    then gradient checkpointing with the original shape (which then shrinks again if it must).
    Every back-off keeps the optimizer steps as they were: only their split into micro-batches changes.
    """

    def __init__(
        self, initial: MicroBatchShape, *, min_row_length: int, gradient_checkpointing: bool
    ) -> None:
        self.initial, self.shape = initial, initial
        self.min_row_length = min_row_length
        self.gradient_checkpointing = gradient_checkpointing

    def next(self) -> Backoff | None:
        shape = self.shape
        if shape.rows > 1:
            self.shape = MicroBatchShape(shape.rows // 2, shape.row_length)
            reason = f"{shape.rows} → {self.shape.rows} rows of {shape.row_length} tokens per micro-batch"
        elif shape.row_length > self.min_row_length:
            self.shape = MicroBatchShape(1, max(self.min_row_length, shape.row_length // 2))
            reason = f"rows of {shape.row_length} → {self.shape.row_length} tokens"
        elif not self.gradient_checkpointing:
            self.shape, self.gradient_checkpointing = self.initial, True
            reason = (
                f"gradient checkpointing on, back to {self.initial.rows} rows of "
                f"{self.initial.row_length} tokens per micro-batch"
            )
        else:
            return None
        return Backoff(self.shape, self.gradient_checkpointing, reason)


def non_embedding_parameters(model: Any) -> int:
    """Base-model parameters outside the token embedding and output projection (LoRA adapters excluded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = {
        id(p)
        for module in (base.get_input_embeddings(), base.get_output_embeddings())
        if module
        for p in module.parameters()
    }
    return sum(p.numel() for name, p in base.named_parameters() if id(p) not in skip and "lora_" not in name)
