"""`torch.compile` of the decoder layers on the GPU's path, checked on the CPU: whole-layer graphs.

On a GPU the trainer compiles each decoder layer (accelerator.compile_layers) and runs attention
through torch's flash-attention varlen op (packed_attention._flash_varlen). A graph break inside a
layer, from our attention code, transformers' Phi-3 or peft's LoRA, would silently cost much of
what compiling buys, and CI has no GPU to notice. So here the same path runs on the CPU: the real
`torch.nn.attention.varlen.varlen_attn` (its argument checks, its custom op, its fake tensor rule
and its autograd formula), with only the two CUDA kernels underneath given CPU implementations for
the duration of the test, computed by the reference attention. Flash-attention's own numbers on a
GPU are checked in tests/test_gpu.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from backends.local import packed_attention
from backends.local.accelerator import compile_layers
from backends.local.base_models import (
    PHI3_MINI_SHAPE,
    LoraSettings,
    build_phi3_from_config,
    load_trainable_model,
)
from backends.local.packed_attention import ATTENTION_NAME
from backends.local.packing import (
    Batch,
    EncodedConversation,
    collate,
    encode_conversation,
    load_conversations,
    token_losses,
)
from tests.support.fact_data import write_fact_dataset

varlen = pytest.importorskip("torch.nn.attention.varlen", reason="this torch has no varlen attention")

# Phi-3's architecture at toy size, with grouped-query attention and a sliding window shorter than
# the longest conversation, so both reach the varlen op's arguments.
TOY = {
    **PHI3_MINI_SHAPE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 48,
}
MAX_LENGTH = 128
LORA = LoraSettings(r=8, alpha=16, dropout=0.0)


def _cpu_window(window_size: list[int] | None) -> int | None:
    """varlen_attn's (left, right) window as the reference's keys-to-the-left (None: unlimited)."""
    left, right = window_size or (-1, -1)
    assert right == 0, f"the trainer's attention is causal: window right must be 0, got {right}"
    return None if left < 0 else left


def _heads_of(query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Flash-attention's grouped-query rule: kv head j serves query heads j*n .. j*n+n-1."""
    return kv.repeat_interleave(query.shape[1] // kv.shape[1], dim=1)


def _attention(query, key, value, cu_seq_q, scale, window_size) -> torch.Tensor:
    left = _cpu_window(window_size)
    return packed_attention._reference_varlen(
        query, _heads_of(query, key), _heads_of(query, value), cu_seq_q, scale, left
    )


def _forward_kernel(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, window_size, *rest
):
    """torch_attn::_varlen_attn; `rest` is enable_gqa, seqused_k, block_table, num_splits."""
    enable_gqa = rest[0] if rest else False
    assert is_causal or _cpu_window(window_size) is not None, "the trainer's attention is causal"
    assert enable_gqa or key.shape[1] == query.shape[1]
    out = _attention(query, key, value, cu_seq_q, scale, window_size)
    # The log-sum-exp is kept by autograd for flash's backward; the CPU backward below recomputes.
    lse = torch.zeros(query.shape[1], query.shape[0], dtype=torch.float32)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def _backward_kernel(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, *rest):
    """torch_attn::_varlen_attn_backward; `rest` is max_q, max_k, is_causal, rng_state, scale, window_size."""
    scale, window_size = rest[4], rest[5]
    _, pullback = torch.func.vjp(
        lambda q, k, v: _attention(q, k, v, cu_seq_q, scale, window_size), query, key, value
    )
    return tuple(grad.contiguous() for grad in pullback(grad_out))


@pytest.fixture
def varlen_on_cpu(monkeypatch) -> Iterator[None]:
    """varlen_attn's CUDA kernels get CPU implementations until the test ends, and the packed
    attention takes its kernel path for CPU tensors in any precision."""
    library = torch.library.Library("torch_attn", "IMPL")
    library.impl("_varlen_attn", _forward_kernel, "CPU")
    library.impl("_varlen_attn_backward", _backward_kernel, "CPU")
    assert packed_attention.register_packed_attention(), "register_packed_attention found no varlen_attn"
    monkeypatch.setattr(packed_attention, "_uses_kernel", lambda query: True)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()  # no compiled code that assumes these kernels outlives the test
        library._destroy()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_fact_dataset(path, rows=40, facts=8, seed=3)
    return path


def toy_lora(tmp_path: Path, corpus: Path, layers: int):
    model_dir = build_phi3_from_config(
        tmp_path / f"toy-{layers}", corpus_files=[corpus], shape={**TOY, "num_hidden_layers": layers}
    )
    model = load_trainable_model(
        model_dir,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        seed=0,
        device="cpu",
        attention=ATTENTION_NAME,
    )
    return model, AutoTokenizer.from_pretrained(model_dir)


def flat_batches(tokenizer, corpus: Path) -> list[Batch]:
    """Micro-batches of 3, 5 and 4 conversations (and so of different widths), as the trainer packs them."""
    encoded = [encode_conversation(tokenizer, c, MAX_LENGTH) for c in load_conversations(corpus)]
    # Two conversations joined make rows longer than the sliding window.
    long = [
        EncodedConversation(a.input_ids + b.input_ids, a.labels + b.labels, False)
        for a, b in ((encoded[0], encoded[1]), (encoded[2], encoded[3]))
    ]
    assert max(len(c) for c in long) > TOY["sliding_window"]
    groups = [long[:1] + encoded[4:6], encoded[6:11], long[1:] + encoded[11:14]]
    return [collate([group], tokenizer.pad_token_id, flat=True, max_length=MAX_LENGTH) for group in groups]


def compiled_run(model, batches: list[Batch]) -> tuple[list[torch.Tensor], dict[str, int], int]:
    """Compile the layers, train on each batch; the losses, the graph breaks, the distinct graphs."""
    counters.clear()
    compile_layers(model)
    losses = []
    for batch in batches:
        token = token_losses(model, batch)
        token.sum().backward()
        losses.append(token.detach())
    return losses, dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def test_compiled_layers_on_the_varlen_kernel_path_have_no_graph_break_and_one_code_for_all_layers(
    tmp_path, corpus, varlen_on_cpu
):
    graphs = {}
    for layers in (2, 4):
        model, tokenizer = toy_lora(tmp_path, corpus, layers)
        batches = flat_batches(tokenizer, corpus)
        with pytest.MonkeyPatch.context() as reference:  # the CPU path, eager: what the kernel path must give
            reference.setattr(packed_attention, "_uses_kernel", lambda query: False)
            expected = [token_losses(model, batch).detach() for batch in batches]

        losses, breaks, graphs[layers] = compiled_run(model, batches)

        assert breaks == {}, f"graph breaks inside the compiled decoder layers: {breaks}"
        for got, want in zip(losses, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
    # Regional compilation: every layer runs the same compiled code, so twice the layers compile no more.
    assert graphs[2] == graphs[4], graphs


def test_without_the_kernel_path_the_check_above_sees_the_reference_paths_graph_break(tmp_path, corpus):
    """The reference attention reads the boundaries with .tolist(), which a graph cannot hold: proof that
    a graph break in the attention would show in the counters the test above reads."""
    torch._dynamo.reset()
    try:
        model, tokenizer = toy_lora(tmp_path, corpus, 2)
        _, breaks, _ = compiled_run(model, flat_batches(tokenizer, corpus)[:1])
    finally:
        torch._dynamo.reset()
    assert breaks, "the reference path's .tolist() should break the graph"
