"""`packed_varlen`: attention over packed conversations without a mask, for transformers models.

A flat packed batch (see packing.py) is one row of conversations back to back, with their
boundaries in `cu_seq_lens` (FlashAttentionKwargs, which transformers passes through the model to
the attention function). On CUDA in bf16/fp16 this runs PyTorch's own flash-attention
variable-length kernel (`torch.nn.attention.varlen`, no extra package): each conversation attends
causally to itself only, and no work is spent across conversations or on padding. Anywhere else
(CPU, fp32) it runs each conversation through `scaled_dot_product_attention` one by one: the
reference that the CPU tests check the packing logic with and the GPU tests check the kernel against.

Without `cu_seq_lens` (e.g. a [rows, width] batch) the boundaries come from `position_ids`, which
restart at 0 for every conversation and for each row's padding tail.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch

ATTENTION_NAME = "packed_varlen"

_varlen_attn: Any = None
_window_style = ""  # how this torch's varlen_attn takes causality: "window_size" or "is_causal"
_native_gqa = False  # whether it takes fewer key/value heads than query heads (enable_gqa)


def register_packed_attention() -> bool:
    """Register `packed_varlen` with transformers; returns whether the CUDA varlen kernel exists here."""
    global _varlen_attn, _window_style, _native_gqa
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_varlen_attention)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9: only the reference path
        return False
    parameters = inspect.signature(varlen_attn).parameters
    # Decided once, here: inspecting inside the compiled attention would break the graph.
    _window_style = "window_size" if "window_size" in parameters else "is_causal"
    _native_gqa = "enable_gqa" in parameters
    _varlen_attn = varlen_attn
    return True


def varlen_kernel_available() -> bool:
    """Whether this torch ships the flash-attention varlen kernel (torch >= 2.9 built with CUDA)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def packed_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: q, k, v [batch, heads, width, dim] → [batch, width, heads, dim]."""
    if dropout:
        raise ValueError(
            f"{ATTENTION_NAME} attention has no attention dropout (the model asks for {dropout}); "
            "use attention 'sdpa' for this model"
        )
    batch, heads, width, head_dim = query.shape
    if query.dtype != value.dtype and value.dtype in (torch.bfloat16, torch.float16):
        # Under autocast with fp32 weights (full fine-tuning) RoPE's fp32 cos/sin leave q and k in fp32
        # while v, a projection, is half: all three go to the kernel in v's dtype.
        query, key = query.to(value.dtype), key.to(value.dtype)
    cu_seq_lens, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seq_lens is None:
        cu_seq_lens, max_length = bounds_from_positions(kwargs.get("position_ids"), width)
    q, k, v = (_tokens_first(t) for t in (query, key, value))
    # transformers' sliding window (masking_utils.sliding_window_overlay): key i is seen from query j
    # when j - window < i <= j, i.e. window - 1 keys to the left.
    left = sliding_window - 1 if sliding_window is not None and max_length > sliding_window else None
    kernel = _uses_kernel(q)
    if k.shape[1] != heads and not (kernel and _native_gqa):
        # grouped-query attention: kv head j serves query heads j*n .. j*n+n-1
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if kernel:
        out = _flash_varlen(q, k, v, cu_seq_lens, max_length, scaling, left)
    else:
        out = _reference_varlen(q, k, v, cu_seq_lens, scaling, left)
    return out.view(batch, width, heads, head_dim), None


def _uses_kernel(query: torch.Tensor) -> bool:
    """Whether the flash varlen kernel serves these queries: this torch has it, they are on CUDA, in half
    precision. Everything else takes the reference path."""
    return _varlen_attn is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def _tokens_first(tensor: torch.Tensor) -> torch.Tensor:
    batch, heads, width, head_dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch * width, heads, head_dim)


def bounds_from_positions(position_ids: torch.Tensor | None, width: int) -> tuple[torch.Tensor, int]:
    """cu_seq_lens over the flattened [rows, width] tokens: a sequence starts wherever a position is 0."""
    if position_ids is None:
        raise ValueError(
            f"{ATTENTION_NAME} attention needs cu_seq_lens_q or position_ids to find the conversations"
        )
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32), width


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scaling: float | None,
    left: int | None,
) -> torch.Tensor:
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # only where _native_gqa (see above)
    if _window_style == "window_size":
        window = (left if left is not None else -1, 0)
        return _varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scaling, window_size=window, **gqa)
    if left is not None:
        raise ValueError(
            f"this torch's varlen attention has no sliding window, but the model's window ({left + 1}) is "
            "shorter than the sequences; use attention 'sdpa' or a max_seq_length within the window"
        )
    return _varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scaling, is_causal=True, **gqa)


def _reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    scaling: float | None,
    left: int | None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seq_lens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        # [tokens, heads, dim] → [heads, tokens, dim] for sdpa
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        mask = None
        if left is not None:
            positions = torch.arange(end - start, device=q.device)
            offset = positions[:, None] - positions[None, :]
            mask = (offset >= 0) & (offset <= left)
        attended = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling
        )
        out[start:end] = attended.transpose(0, 1)
    return out
