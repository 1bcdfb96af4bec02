"""How many tokens of activations fit in a GPU's free memory, from the model's shape alone.

`saved_bytes_per_token` counts what autograd keeps per token for the backward pass (checked against
autograd's own saved tensors in tests/test_accelerator.py and against CUDA's peak memory in
tests/test_gpu.py); `plan_micro_batch_tokens` turns free memory into a micro-batch token budget and
decides whether gradient checkpointing is needed at all. Pure arithmetic: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

GIB = 1024**3
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a decoder-only transformer's activation memory per token."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
        )


def saved_bytes_per_token(
    shape: ModelShape, *, checkpointing: bool, bytes_per_value: int = 2, lora_dropout: bool = False
) -> int:
    """Bytes autograd keeps per token for the backward pass (LoRA or full fine-tuning alike).

    Per decoder layer: two RMSNorms keep their input in fp32 (8h bytes); the linear layers' inputs
    (qkv, o, gate_up: h each; down: i); flash attention keeps q, k, v and its output (2h + 2·kv);
    the SwiGLU keeps gate_up's output and silu(gate) (3i). LoRA dropout adds a mask and a copy per
    adapter input. Checkpointing keeps only each layer's input and recomputes one layer at a time.
    The loss keeps the logits, their fp32 copy (under bf16) and the log-softmax: counted for every
    token, an upper bound, since only target tokens get logits.
    """
    h, i, b = shape.hidden, shape.intermediate, bytes_per_value
    kv = shape.kv_heads * shape.head_dim
    adapter_inputs = 3 * h + i
    layer = 8 * h + b * (adapter_inputs + 2 * h + 2 * kv + 3 * i)
    if lora_dropout:
        layer += adapter_inputs * (1 + b)
    logits = (b + (4 if b < 4 else 0) + 4) * shape.vocab
    if checkpointing:
        return shape.layers * h * b + layer + logits
    return shape.layers * layer + logits


def activation_bytes_per_token(
    shape: ModelShape, *, checkpointing: bool, bytes_per_value: int = 2, lora_dropout: bool = False
) -> int:
    """The saved activations plus the loss's gradient buffers, which exist while all of them are held."""
    saved = saved_bytes_per_token(
        shape, checkpointing=checkpointing, bytes_per_value=bytes_per_value, lora_dropout=lora_dropout
    )
    return saved + (4 + bytes_per_value) * shape.vocab


@dataclass(frozen=True)
class MemoryPlan:
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    reason: str


SAFETY = 1.15  # allocator fragmentation and transient buffers the estimate leaves out
TOKEN_ROUNDING = 256
MAX_TOKENS_PER_MICRO_BATCH = 65536  # beyond this a bigger micro-batch buys nothing but latency


def plan_micro_batch_tokens(
    shape: ModelShape,
    *,
    free_bytes: int,
    total_bytes: int,
    max_seq_length: int,
    step_tokens: int,
    checkpointing: Switch = "auto",
    bytes_per_value: int = 2,
    lora_dropout: bool = False,
) -> MemoryPlan:
    """The largest micro-batch (in tokens) whose activations fit in free memory, checkpointing only if needed.

    Free memory is measured after the model, its adapters and optimizer state are on the GPU; a
    headroom (8% of the card, at least 1.5 GiB) stays free for cuBLAS/compile workspaces. A
    micro-batch holds at least one longest conversation and at most one optimizer step's tokens.
    """
    usable = free_bytes - max(int(1.5 * GIB), int(0.08 * total_bytes))

    def fitting(with_checkpointing: bool) -> int:
        per_token = SAFETY * activation_bytes_per_token(
            shape,
            checkpointing=with_checkpointing,
            bytes_per_value=bytes_per_value,
            lora_dropout=lora_dropout,
        )
        return max(0, int(usable // per_token))

    ceiling = min(step_tokens, MAX_TOKENS_PER_MICRO_BATCH)
    tokens, use_checkpointing = fitting(False), checkpointing == "on"
    if use_checkpointing:
        tokens = fitting(True)
        reason = "gradient checkpointing on (asked for)"
    elif tokens >= max_seq_length or checkpointing == "off":
        reason = (
            f"{tokens:,} tokens of activations fit in {free_bytes / GIB:.1f} GiB free without checkpointing"
        )
    else:
        tokens, use_checkpointing = fitting(True), True
        reason = (
            f"one {max_seq_length}-token conversation does not fit without checkpointing: checkpointing on"
        )
    budget = max(max_seq_length, min(ceiling, tokens // TOKEN_ROUNDING * TOKEN_ROUNDING))
    if tokens < max_seq_length:
        reason += f"; memory looks short even for {max_seq_length} tokens (out-of-memory back-off will act)"
    return MemoryPlan(budget, use_checkpointing, reason)
