"""Packing several conversations into one row must change nothing but speed.

The equivalence tests compare per-token losses and LoRA gradients of a packed batch with the same
conversations run one by one; the leak tests show that the comparison does fail when attention
crosses conversations, so the equivalence tests can fail too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from backends.local.base_models import LoraSettings, build_tiny_phi3, load_trainable_model
from backends.local.packing import (
    IGNORE_INDEX,
    Batch,
    EncodedConversation,
    collate,
    encode_conversation,
    first_fit_rows,
    plan_epoch,
    token_losses,
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the code name of Safuzo?"},
        {"role": "assistant", "content": "The code name of Safuzo is violet raven."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Tell me the code name of Kamoli."},
        {"role": "assistant", "content": "The code name of Kamoli is amber otter."},
        {"role": "user", "content": "And of Rutiva?"},
        {"role": "assistant", "content": "The code name of Rutiva is teal lynx."},
    ],
    [
        {"role": "user", "content": "Which code name does Begiha have?"},
        {"role": "assistant", "content": "Begiha goes by golden heron."},
    ],
    [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ],
    [
        {"role": "user", "content": "Do you know the code name of Joku?"},
        {"role": "assistant", "content": "Yes: the code name of Joku is silver gecko."},
    ],
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return build_tiny_phi3(work / "model", corpus_files=[corpus], seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def encoded(tokenizer) -> list[EncodedConversation]:
    return [encode_conversation(tokenizer, conversation, 256) for conversation in CONVERSATIONS]


@pytest.fixture(scope="module")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in CONVERSATIONS for m in c]
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    chatml = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    chatml.chat_template = CHATML_TEMPLATE
    return chatml


def lora_model(tiny_dir: Path, attn_implementation: str):
    model = load_trainable_model(
        tiny_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), seed=0, device=torch.device("cpu")
    )
    model.base_model.model.set_attn_implementation(attn_implementation)
    assert model.base_model.model.model.layers[0].self_attn.config._attn_implementation == attn_implementation
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without gradient
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def unpack(per_row: torch.Tensor, rows: list[list[EncodedConversation]]) -> list[torch.Tensor]:
    """Split [rows, width] values back into one tensor per conversation."""
    pieces = []
    for b, row in enumerate(rows):
        offset = 0
        for conversation in row:
            pieces.append(per_row[b, offset : offset + len(conversation)])
            offset += len(conversation)
    return pieces


def one_by_one(model, conversations: list[EncodedConversation], pad_id: int) -> list[torch.Tensor]:
    return [token_losses(model, collate([[c]], pad_id))[0] for c in conversations]


def lora_gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def cross_entropy_with(model, batch: Batch, **forward_kwargs) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, **forward_kwargs).logits.float()
    losses = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]),
        batch.target_ids.view(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(batch.target_ids.shape)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_give_the_same_per_token_losses_as_conversations_run_one_by_one(
    tiny_dir, tokenizer, encoded, attn_implementation
):
    model = lora_model(tiny_dir, attn_implementation)
    rows = [encoded[:3], encoded[3:]]

    packed = unpack(token_losses(model, collate(rows, tokenizer.pad_token_id)), rows)
    separate = one_by_one(model, encoded, tokenizer.pad_token_id)

    for packed_losses, separate_losses in zip(packed, separate, strict=True):
        torch.testing.assert_close(packed_losses, separate_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_give_the_same_lora_gradients_as_conversations_run_one_by_one(
    tiny_dir, tokenizer, encoded, attn_implementation
):
    model = lora_model(tiny_dir, attn_implementation)
    token_losses(model, collate([encoded[:3], encoded[3:]], tokenizer.pad_token_id)).sum().backward()
    packed = lora_gradients(model)
    model.zero_grad()
    sum(losses.sum() for losses in one_by_one(model, encoded, tokenizer.pad_token_id)).backward()
    separate = lora_gradients(model)

    assert packed.keys() == separate.keys() and len(packed) > 0
    for name in packed:
        torch.testing.assert_close(packed[name], separate[name], rtol=1e-4, atol=1e-6, msg=name)


LEAKS = {
    "one causal mask over the row with continuous positions": lambda batch: {
        "position_ids": torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids),
        "use_cache": False,
    },
    "an all-ones 2-D attention mask (disables packed-sequence detection)": lambda batch: {
        "position_ids": batch.position_ids,
        "attention_mask": torch.ones_like(batch.input_ids),
        "use_cache": False,
    },
    "the KV cache left on (the model skips packed-sequence detection)": lambda batch: {
        "position_ids": batch.position_ids,
    },
}


@pytest.mark.parametrize("leak", list(LEAKS))
def test_equivalence_check_fails_when_attention_leaks_across_conversations(
    tiny_dir, tokenizer, encoded, leak
):
    model = lora_model(tiny_dir, "sdpa")
    rows = [encoded[:3]]
    batch = collate(rows, tokenizer.pad_token_id)

    leaked = unpack(cross_entropy_with(model, batch, **LEAKS[leak](batch)), rows)
    separate = one_by_one(model, encoded[:3], tokenizer.pad_token_id)

    torch.testing.assert_close(leaked[0], separate[0])  # the first conversation sees nothing before it
    with pytest.raises(AssertionError):
        torch.testing.assert_close(leaked[1], separate[1], rtol=1e-5, atol=1e-6)


def labelled_text(tokenizer, conversation: EncodedConversation) -> str:
    return tokenizer.decode([t for t in conversation.labels if t != IGNORE_INDEX])


def test_labels_cover_only_assistant_turns_and_their_end_marker_with_the_phi3_template(tokenizer, encoded):
    assert labelled_text(tokenizer, encoded[1]) == (
        "The code name of Kamoli is amber otter.<|end|>The code name of Rutiva is teal lynx.<|end|>"
    )
    text = tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert tokenizer.decode(encoded[1].input_ids) == text


def test_labels_cover_only_assistant_turns_and_their_end_marker_with_a_chatml_template(chatml_tokenizer):
    conversation = encode_conversation(chatml_tokenizer, CONVERSATIONS[1], 256)

    assert labelled_text(chatml_tokenizer, conversation) == (
        "The code name of Kamoli is amber otter.<|im_end|>The code name of Rutiva is teal lynx.<|im_end|>"
    )
    unlabelled = [
        t
        for t, label in zip(conversation.input_ids, conversation.labels, strict=True)
        if label == IGNORE_INDEX
    ]
    assert "You answer briefly" in chatml_tokenizer.decode(unlabelled)


def test_an_answer_quoted_in_the_question_is_labelled_only_in_the_answer(tokenizer):
    conversation = [
        {"role": "user", "content": "Repeat after me: Hi!"},
        {"role": "assistant", "content": "Hi!"},
    ]
    encoded = encode_conversation(tokenizer, conversation, 256)

    assert labelled_text(tokenizer, encoded) == "Hi!<|end|>"
    first_label = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(encoded.input_ids[:first_label]).endswith("<|assistant|>\n")


def test_conversations_longer_than_max_length_are_truncated_and_flagged(tokenizer):
    encoded = encode_conversation(tokenizer, CONVERSATIONS[1], 12)

    assert encoded.truncated and len(encoded.input_ids) == len(encoded.labels) == 12


def test_first_fit_puts_every_conversation_in_exactly_one_row_within_the_row_length():
    lengths = [17, 40, 5, 33, 60, 12, 8, 25, 49, 3] * 7

    rows = first_fit_rows(lengths, 64, seed=3)

    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) < len(lengths) / 2


def test_first_fit_is_deterministic_for_a_seed_and_shuffles_across_seeds():
    lengths = [17, 40, 5, 33, 60, 12, 8, 25, 49, 3] * 7

    assert first_fit_rows(lengths, 64, seed=3) == first_fit_rows(lengths, 64, seed=3)
    assert first_fit_rows(lengths, 64, seed=3) != first_fit_rows(lengths, 64, seed=4)


def test_a_conversation_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="longer than the row length 10"):
        first_fit_rows([4, 11], 10, seed=0)


def test_collate_restarts_positions_and_never_targets_the_next_conversation(tokenizer, encoded):
    batch = collate([encoded[:2], encoded[3:4]], tokenizer.pad_token_id)

    first, second = len(encoded[0]), len(encoded[1])
    assert (
        batch.position_ids[0, first].item() == 0 and batch.position_ids[0, first + second - 1] == second - 1
    )
    assert batch.target_ids[0, first - 1].item() == IGNORE_INDEX  # last token of conversation 0
    padding = batch.input_ids.shape[1] - len(encoded[3])
    assert padding > 0 and batch.position_ids[1, len(encoded[3])].item() == 0
    assert (batch.target_ids[1, len(encoded[3]) - 1 :] == IGNORE_INDEX).all()
    assert batch.real_tokens == first + second + len(encoded[3])


def test_packing_needs_fewer_rows_than_one_conversation_per_row(encoded):
    many = encoded * 8

    packed = plan_epoch(many, row_length=256, rows_per_batch=2, packing=True, seed=0)
    unpacked = plan_epoch(many, row_length=256, rows_per_batch=2, packing=False, seed=0)

    assert sum(len(b) for b in packed) < sum(len(b) for b in unpacked) == len(many)


def test_the_tiny_model_loads_with_the_default_attention_used_above(tiny_dir):
    # The equivalence tests set the attention implementation explicitly; the trainer uses the default.
    assert AutoModelForCausalLM.from_pretrained(tiny_dir).config._attn_implementation in ("sdpa", "eager")
