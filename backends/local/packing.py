"""Chat rows → token rows: assistant-only labels, first-fit sequence packing, and the packed forward pass.

Several conversations share one row. Each keeps its own position ids (restarting at 0), and its
tokens never attend to another conversation's: transformers (5.x) builds a block-diagonal causal
mask when a forward pass gets `position_ids` that restart, *no* 2-D attention mask and *no* KV
cache (`masking_utils.find_packed_sequence_indices`). Two ways to silently lose it, both guarded by
`packed_forward`: passing an all-ones `attention_mask`, or leaving `use_cache` on (the model then
creates an empty cache and skips the detection). tests/test_packing.py proves equivalence with
one-by-one runs.

On CUDA the trainer uses the *flat* layout instead: a micro-batch is one row holding every
conversation back to back, and the `packed_varlen` attention registered below runs PyTorch's
flash-attention variable-length kernel over the conversation boundaries (`cu_seq_lens`), so no
mask is built and no attention is computed across or into padding. Off CUDA (or in fp32) the
same function computes each conversation's causal attention one by one, which is the reference
that tests/test_accelerator.py compares with and tests/test_gpu.py compares the kernel against.
Logits are computed only at positions that have a target (`logits_to_keep`).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# End-of-turn markers the model must learn to emit after an answer (Phi-3, ChatML, Llama 3).
END_OF_TURN_MARKERS = ("<|end|>", "<|im_end|>", "<|eot_id|>")

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids and aligned labels: the token id on assistant tokens, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is computed on: assistant labels after the first position (collate shifts them)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass(frozen=True)
class Batch:
    """A micro-batch of rows; `target_ids[b, i]` is the token that position i must predict.

    `keep` lists the columns where some row has a target (only those get logits). A flat batch (one
    row) also carries its sequence boundaries for the varlen attention: `cu_seq_lens` (int32, the
    padding tail counts as one more sequence) and `max_length`, an upper bound on any sequence's length.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor
    real_tokens: int
    target_tokens: int
    keep: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    max_length: int | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.target_ids.to(device, non_blocking=True),
            self.real_tokens,
            self.target_tokens,
            move(self.keep),
            move(self.cu_seq_lens),
            self.max_length,
        )


def load_conversations(path: Path) -> list[Conversation]:
    """Read a JSONL file of `{"messages": [{"role", "content"}, ...]}` rows; errors name file and line."""
    conversations = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                conversations.append(_parse_row(line, f"{path}:{line_number}"))
    if not conversations:
        raise ValueError(f"{path} holds no conversations (expected one JSON object per line)")
    return conversations


def _parse_row(line: str, where: str) -> Conversation:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected an object with a non-empty 'messages' list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{index}].role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{index}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_conversation(tokenizer: Any, messages: Conversation, max_length: int) -> EncodedConversation:
    """Tokenize with the model's own chat template; label assistant contents and their end-of-turn marker."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoding = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=False,
        return_attention_mask=False,
    )
    spans = _assistant_spans(tokenizer, messages, text)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(start <= char_start < end for start, end in spans) else IGNORE_INDEX
        for token, (char_start, _) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    truncated = len(input_ids) > max_length
    return EncodedConversation(input_ids[:max_length], labels[:max_length], truncated)


def _assistant_spans(tokenizer: Any, messages: Conversation, text: str) -> list[tuple[int, int]]:
    markers = [*END_OF_TURN_MARKERS, tokenizer.eos_token]
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Search after the rendered prompt so an answer quoted in an earlier turn is not labelled there.
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        search_from = max(cursor, len(prompt)) if index and text.startswith(prompt) else cursor
        start = text.find(message["content"], search_from)
        if start < 0:
            raise ValueError(
                f"the chat template changed assistant message {index} while rendering it (content not found "
                "verbatim); strip surrounding whitespace from the dataset's contents or use a template that "
                "keeps them"
            )
        end = start + len(message["content"])
        for marker in markers:
            if marker and text.startswith(marker, end):
                end += len(marker)
                break
        spans.append((start, end))
        cursor = end
    return spans


def first_fit_rows(lengths: Sequence[int], row_length: int, seed: int) -> list[list[int]]:
    """Pack item indices into rows of at most `row_length` tokens, first-fit in a seeded random order."""
    too_long = [i for i, length in enumerate(lengths) if length > row_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sequences are longer than the row length {row_length} (first: #{too_long[0]})"
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    shortest = min(lengths, default=0)
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # indices of rows that can still take the shortest item
    for item in order:
        length = lengths[item]
        target = next((row for row in open_rows if free[row] >= length), None)
        if target is None:
            target = len(rows)
            rows.append([])
            free.append(row_length)
            open_rows.append(target)
        rows[target].append(item)
        free[target] -= length
        if free[target] < shortest:
            open_rows.remove(target)
    return rows


def single_rows(count: int, seed: int) -> list[list[int]]:
    """One item per row, in a seeded random order (packing off)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [[item] for item in order]


def plan_epoch(
    conversations: Sequence[EncodedConversation],
    *,
    row_length: int,
    rows_per_batch: int,
    packing: bool,
    seed: int,
) -> list[list[list[int]]]:
    """Micro-batches of rows of conversation indices for one epoch (deterministic for a seed)."""
    lengths = [len(conversation) for conversation in conversations]
    rows = first_fit_rows(lengths, row_length, seed) if packing else single_rows(len(lengths), seed)
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def plan_steps(
    conversations: Sequence[EncodedConversation],
    *,
    epochs: int,
    row_length: int,
    rows_per_batch: int,
    gradient_accumulation_steps: int,
    packing: bool,
    seed: int,
) -> list[list[list[list[list[int]]]]]:
    """Per epoch, its optimizer steps; per step, its micro-batches (each a list of rows of indices)."""
    plan = []
    for epoch in range(epochs):
        micro_batches = plan_epoch(
            conversations,
            row_length=row_length,
            rows_per_batch=rows_per_batch,
            packing=packing,
            seed=seed + epoch,
        )
        n = gradient_accumulation_steps
        plan.append([micro_batches[i : i + n] for i in range(0, len(micro_batches), n)])
    return plan


@dataclass(frozen=True)
class MicroBatchShape:
    """How many rows a micro-batch holds and how many tokens fit in a row (flat layout: one long row)."""

    rows: int
    row_length: int

    @property
    def tokens(self) -> int:
        return self.rows * self.row_length


def relayout_step(
    micro_batches: Sequence[Sequence[Sequence[int]]],
    lengths: Sequence[int],
    shape: MicroBatchShape,
    seed: int,
) -> list[list[list[int]]]:
    """The same conversations (so the same optimizer step) re-packed into micro-batches of `shape`."""
    items = [i for rows in micro_batches for row in rows for i in row]
    rows = first_fit_rows([lengths[i] for i in items], shape.row_length, seed)
    packed = [[items[position] for position in row] for row in rows]
    return [packed[i : i + shape.rows] for i in range(0, len(packed), shape.rows)]


FLAT_PAD_MULTIPLE = 64  # flat rows are padded to a multiple of this (tensor-core friendly widths)


def collate(
    rows: Sequence[Sequence[EncodedConversation]],
    pad_token_id: int,
    *,
    flat: bool = False,
    max_length: int | None = None,
) -> Batch:
    """Concatenate each row's conversations; pad the tail as its own dummy sequence with no targets.

    `flat=True` puts every conversation of every row into one row and records the boundaries for the
    varlen attention; `max_length` (default: the longest conversation) bounds any sequence's length.
    """
    if flat:
        return _collate_flat([c for row in rows for c in row], pad_token_id, max_length)
    batch = _collate_rows(rows, pad_token_id)
    return replace(batch, keep=_target_columns(batch.target_ids))


def _collate_flat(
    conversations: Sequence[EncodedConversation], pad_token_id: int, max_length: int | None
) -> Batch:
    real = sum(len(c) for c in conversations)
    width = -(-real // FLAT_PAD_MULTIPLE) * FLAT_PAD_MULTIPLE
    batch = _collate_rows([conversations], pad_token_id, width=width)
    bounds = [0]
    for conversation in conversations:
        bounds.append(bounds[-1] + len(conversation))
    if width > real:
        bounds.append(width)  # the padding tail: a sequence of its own that nothing attends to
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    return Batch(
        batch.input_ids,
        batch.position_ids,
        batch.target_ids,
        batch.real_tokens,
        batch.target_tokens,
        keep=_target_columns(batch.target_ids),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.int32),
        max_length=max(longest, max_length or 0),
    )


def _target_columns(target_ids: torch.Tensor) -> torch.Tensor:
    return (target_ids != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def _collate_rows(
    rows: Sequence[Sequence[EncodedConversation]], pad_token_id: int, width: int | None = None
) -> Batch:
    width = width or max(sum(len(c) for c in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    target_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    real_tokens = 0
    for b, row in enumerate(rows):
        offset = 0
        for conversation in row:
            n = len(conversation)
            input_ids[b, offset : offset + n] = torch.tensor(conversation.input_ids)
            position_ids[b, offset : offset + n] = torch.arange(n)
            # Targets shift inside the conversation, so no token is asked to predict the next conversation.
            target_ids[b, offset : offset + n - 1] = torch.tensor(conversation.labels[1:])
            offset += n
        real_tokens += offset
        # Positions restart for the padding too, so it forms a separate block nobody attends to.
        position_ids[b, offset:] = torch.arange(width - offset)
    target_tokens = int((target_ids != IGNORE_INDEX).sum())
    return Batch(input_ids, position_ids, target_ids, real_tokens, target_tokens)


def packed_forward(model: Any, batch: Batch, *, logits_to_keep: torch.Tensor | int = 0) -> torch.Tensor:
    """Logits of a packed batch with per-conversation attention (see the module docstring)."""
    varlen: dict[str, Any] = {}
    if batch.cu_seq_lens is not None:
        # FlashAttentionKwargs: transformers hands them through the model to the attention function.
        varlen = {
            "cu_seq_lens_q": batch.cu_seq_lens,
            "cu_seq_lens_k": batch.cu_seq_lens,
            "max_length_q": batch.max_length,
            "max_length_k": batch.max_length,
        }
    if not isinstance(logits_to_keep, int) and not accepts_logits_to_keep(model):
        logits_to_keep = 0
    extra = {"logits_to_keep": logits_to_keep} if not isinstance(logits_to_keep, int) else {}
    return model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=None,
        use_cache=False,
        **extra,
        **varlen,
    ).logits


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under any PEFT wrapper can compute logits for chosen positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def token_losses(model: Any, batch: Batch) -> torch.Tensor:
    """Cross-entropy per position (0 where there is no target), in fp32, shape [rows, width].

    Logits are computed only for the columns in `batch.keep` (where some row has a target): the
    vocabulary projection and its fp32 copy are the largest activations of a small-vocabulary model.
    """
    if batch.keep is None or not accepts_logits_to_keep(model):
        logits = packed_forward(model, batch).float()
        columns, targets = None, batch.target_ids
    else:
        logits = packed_forward(model, batch, logits_to_keep=batch.keep).float()
        columns, targets = batch.keep, batch.target_ids[:, batch.keep]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    if columns is None:
        return losses
    full = torch.zeros(batch.target_ids.shape, dtype=losses.dtype, device=losses.device)
    return full.index_copy(1, columns, losses)


def autocast_for(device: torch.device, bf16: bool | None = None) -> torch.autocast:
    """bf16 autocast on CUDA (unless `bf16=False`); disabled on CPU, where fp32 is exact and fastest here."""
    enabled = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def mean_token_loss(
    model: Any,
    conversations: Sequence[EncodedConversation],
    *,
    row_length: int,
    rows_per_batch: int,
    pad_token_id: int,
    device: torch.device,
    flat: bool = False,
    bf16: bool | None = None,
) -> float:
    """Token-weighted mean loss over the assistant tokens of `conversations` (evaluation, no gradients).

    Out of memory (after training fitted: another process took the GPU's memory, or the rows are wider
    than the training's backed-off ones), it starts over with half the rows per batch, down to one."""
    from backends.local.accelerator import is_out_of_memory, release_memory

    def mean_loss(rows_per_batch: int) -> float:
        micro_batches = plan_epoch(
            conversations, row_length=row_length, rows_per_batch=rows_per_batch, packing=True, seed=0
        )
        was_training, total, targets = model.training, 0.0, 0
        model.eval()
        try:
            with torch.no_grad(), autocast_for(device, bf16):
                for rows in micro_batches:
                    rows_of = [[conversations[i] for i in row] for row in rows]
                    batch = collate(rows_of, pad_token_id, flat=flat, max_length=row_length)
                    total += float(token_losses(model, batch.to(device)).sum())
                    targets += batch.target_tokens
        finally:
            model.train(was_training)
        return total / max(1, targets)

    while True:
        try:
            return mean_loss(rows_per_batch)
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if rows_per_batch == 1 or not is_out_of_memory(error):
                raise
            failure = (str(error).strip().splitlines() or ["out of memory"])[0]
        release_memory(device)  # outside the except block: its traceback held the activations
        halved = rows_per_batch // 2
        logger.warning("evaluation out of memory (%s); %d → %d rows a batch", failure, rows_per_batch, halved)
        rows_per_batch = halved
