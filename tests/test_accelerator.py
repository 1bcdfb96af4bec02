"""How the trainer runs on a device: the choices from config, the memory plan, the out-of-memory
back-off (driven through the real step loop by a simulated allocation failure), and the flat packed
layout with varlen attention, proven equal to one-by-one runs on CPU (its reference path; the
CUDA kernel is compared with the same reference in tests/test_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from backends.local.accelerator import (
    Execution,
    OutOfMemoryPolicy,
    Switches,
    choose_device,
    decoder_layers,
    fit_to_memory,
    gradient_checkpointing_enabled,
    plan_execution,
)
from backends.local.base_models import (
    PHI3_MINI_SHAPE,
    LoraSettings,
    build_phi3_from_config,
    build_tiny_phi3,
    load_trainable_model,
    prepare_base_model,
    save_merged_model,
)
from backends.local.jobs import read_status
from backends.local.memory_plan import (
    ModelShape,
    activation_bytes_per_token,
    plan_micro_batch_tokens,
    saved_bytes_per_token,
)
from backends.local.packed_attention import ATTENTION_NAME
from backends.local.packing import (
    EncodedConversation,
    MicroBatchShape,
    collate,
    encode_conversation,
    load_conversations,
    plan_epoch,
    relayout_step,
    token_losses,
)
from backends.local.step_loop import LoopSettings, train
from tests.support.fact_data import tiny_spec, write_fact_dataset

CPU = torch.device("cpu")
GIB = 1024**3
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Phi-3-mini's architecture at toy size: its vocabulary, head layout and sliding window; few, thin layers.
PHI3_MINI_TOY = {
    **PHI3_MINI_SHAPE,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_fact_dataset(path, rows=48, facts=8, seed=5)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, facts_file):
    model_dir = build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", corpus_files=[facts_file])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [encode_conversation(tokenizer, c, 128) for c in load_conversations(facts_file)]
    return model_dir, tokenizer, encoded


def lora(model_dir: Path, attention: str | None = None, dropout: float = 0.0):
    model = load_trainable_model(
        model_dir, lora=LoraSettings(r=8, alpha=16, dropout=dropout), seed=0, device=CPU, attention=attention
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def one_by_one(model, conversations, pad_id: int) -> list[torch.Tensor]:
    return [token_losses(model, collate([[c]], pad_id))[0, : len(c)] for c in conversations]


def unpack_flat(losses: torch.Tensor, conversations) -> list[torch.Tensor]:
    pieces, offset = [], 0
    for conversation in conversations:
        pieces.append(losses[0, offset : offset + len(conversation)])
        offset += len(conversation)
    return pieces


# -- device and switches ---------------------------------------------------------------------------


def test_auto_picks_cuda_exactly_when_torch_sees_a_gpu():
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_names_the_setting_and_the_way_out():
    with pytest.raises(RuntimeError, match=r"compute.device is 'cuda'.*use 'auto' or 'cpu'"):
        choose_device("cuda")


def test_an_unknown_device_choice_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        choose_device("tpu")


def test_on_the_cpu_every_auto_switch_keeps_fp32_sdpa_rows_and_no_compile():
    execution = plan_execution(CPU, Switches(), lora=True)

    assert execution == Execution(device=CPU)
    assert not execution.flat and execution.tokens_per_micro_batch is None


def test_switches_set_to_on_are_honoured_on_the_cpu_too():
    switches = Switches(compile="on", gradient_checkpointing="on", attention=ATTENTION_NAME)

    execution = plan_execution(CPU, switches, lora=True)

    assert execution.compile and execution.gradient_checkpointing and execution.flat
    assert not execution.bf16 and execution.base_dtype == torch.float32


def test_fused_kernels_forced_on_without_a_gpu_say_what_they_need():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the answer depends on liger-kernel being installed")
    with pytest.raises(RuntimeError, match="liger-kernel"):
        plan_execution(CPU, Switches(fused_kernels="on"), lora=True)


def test_an_unknown_attention_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="packed_varlen"):
        plan_execution(CPU, Switches(attention="flash"), lora=True)


def test_a_spec_without_the_throughput_switches_gets_the_cpu_preserving_defaults(tmp_path, facts_file):
    spec = tiny_spec(tmp_path, "sqlite:///x.db", facts_file)

    assert (spec.compile, spec.gradient_checkpointing, spec.attention, spec.fused_kernels) == ("auto",) * 4
    assert spec.max_tokens_per_micro_batch is None and spec.throughput_log is None


# -- memory plan -----------------------------------------------------------------------------------

PHI3_MINI = ModelShape(
    hidden=3072, intermediate=8192, layers=32, heads=32, kv_heads=32, head_dim=96, vocab=32064
)


def test_the_activation_estimate_bounds_what_autograd_really_keeps(tmp_path, facts_file):
    toy = {**PHI3_MINI_TOY, "hidden_size": 256, "intermediate_size": 688, "vocab_size": 2048}
    model_dir = build_phi3_from_config(tmp_path / "m", corpus_files=[facts_file], shape=toy)
    model = lora(model_dir, attention=ATTENTION_NAME, dropout=0.05)
    generator = torch.Generator().manual_seed(0)
    conversations = []
    for _ in range(16):  # short conversations: the CPU reference attention's scores stay negligible
        ids = torch.randint(10, 2000, (64,), generator=generator).tolist()
        conversations.append(EncodedConversation(ids, ids))  # every token a target: the estimate's bound
    batch = collate([conversations], 0, flat=True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        token_losses(model, batch).sum()

    measured = sum(kept.values()) / batch.input_ids.numel()
    shape = ModelShape.from_config(model.config)
    estimate = saved_bytes_per_token(shape, checkpointing=False, bytes_per_value=4, lora_dropout=True)
    assert measured <= estimate <= 1.25 * measured


def test_the_plan_fills_free_memory_without_checkpointing_when_a_conversation_fits():
    plan = plan_micro_batch_tokens(
        PHI3_MINI, free_bytes=70 * GIB, total_bytes=80 * GIB, max_seq_length=4096, step_tokens=10**6
    )

    per_token = activation_bytes_per_token(PHI3_MINI, checkpointing=False)
    assert not plan.gradient_checkpointing
    assert plan.tokens_per_micro_batch >= 4096 and plan.tokens_per_micro_batch % 256 == 0
    assert plan.tokens_per_micro_batch * per_token * 1.15 <= (70 - 6.4) * GIB


def test_the_plan_turns_checkpointing_on_only_when_one_conversation_would_not_fit():
    plan = plan_micro_batch_tokens(
        PHI3_MINI, free_bytes=12 * GIB, total_bytes=24 * GIB, max_seq_length=4096, step_tokens=10**6
    )

    assert plan.gradient_checkpointing and "does not fit" in plan.reason
    assert plan.tokens_per_micro_batch >= 4096


def test_the_plan_never_exceeds_one_optimizer_steps_tokens():
    plan = plan_micro_batch_tokens(
        PHI3_MINI, free_bytes=130 * GIB, total_bytes=140 * GIB, max_seq_length=2048, step_tokens=8192
    )

    assert plan.tokens_per_micro_batch == 8192


def test_checkpointing_switched_off_stays_off_and_leaves_the_rest_to_the_back_off():
    plan = plan_micro_batch_tokens(
        PHI3_MINI,
        free_bytes=12 * GIB,
        total_bytes=24 * GIB,
        max_seq_length=4096,
        step_tokens=10**6,
        checkpointing="off",
    )

    assert not plan.gradient_checkpointing and plan.tokens_per_micro_batch == 4096
    assert "back-off" in plan.reason


def test_on_the_cpu_the_memory_plan_leaves_the_execution_as_it_is(tiny):
    model = lora(tiny[0])
    execution = Execution(device=CPU)

    fitted = fit_to_memory(
        execution, model, switches=Switches(), max_seq_length=128, step_tokens=512, lora_dropout=False
    )

    assert fitted is execution


# -- out-of-memory back-off --------------------------------------------------------------------------


def test_the_back_off_tries_fewer_rows_then_shorter_rows_then_checkpointing_then_gives_up():
    policy = OutOfMemoryPolicy(MicroBatchShape(4, 512), min_row_length=200, gradient_checkpointing=False)

    steps = []
    while (backoff := policy.next()) is not None:
        steps.append((backoff.shape.rows, backoff.shape.row_length, backoff.gradient_checkpointing))

    assert steps == [
        (2, 512, False),
        (1, 512, False),
        (1, 256, False),
        (1, 200, False),
        (4, 512, True),
        (2, 512, True),
        (1, 512, True),
        (1, 256, True),
        (1, 200, True),
    ]


class SimulatedAllocator(torch.nn.Module):
    """Stands in for a GPU that runs out of memory: a forward pass fails like CUDA's allocator does
    when the micro-batch holds more than `limit` token slots (unless checkpointing is on, if
    `checkpointing_fits`), or on the forward passes numbered in `fail_calls`."""

    def __init__(
        self,
        model,
        *,
        limit: int = 10**9,
        checkpointing_fits: bool = False,
        fail_calls=(),
        cpu_allocator: bool = False,
    ):
        super().__init__()
        self.model, self.limit, self.checkpointing_fits = model, limit, checkpointing_fits
        self.fail_calls, self.calls = set(fail_calls), 0
        self.cpu_allocator = cpu_allocator  # fail through the real CPU allocator instead

    def get_base_model(self):
        return self.model.get_base_model()

    def forward(self, input_ids, **kwargs):
        self.calls += 1
        too_big = input_ids.numel() > self.limit
        if self.checkpointing_fits and gradient_checkpointing_enabled(self.model):
            too_big = False
        if (too_big or self.calls in self.fail_calls) and self.cpu_allocator:
            torch.empty(10**14)  # 400 TB: more than any machine's memory or x86-64's address space
        if too_big or self.calls in self.fail_calls:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 1.50 GiB (simulated for {input_ids.numel()} tokens)"
            )
        return self.model(input_ids=input_ids, **kwargs)


SETTINGS = LoopSettings(
    learning_rate=3e-3,
    num_train_epochs=1,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_seq_length=128,
    logging_steps=1,
)


def trained_lora(
    model_dir, encoded, pad_id, **allocator
) -> tuple[dict[str, torch.Tensor], list[str], object]:
    model = SimulatedAllocator(lora(model_dir), **allocator)
    events: list[str] = []
    final = train(model, encoded, SETTINGS, device=CPU, pad_token_id=pad_id, on_event=events.append)
    assert final.step == final.total_steps
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return weights, events, model


@pytest.fixture(scope="module")
def undisturbed(tiny):
    model_dir, tokenizer, encoded = tiny
    return trained_lora(model_dir, encoded, tokenizer.pad_token_id)[0]


def assert_same_weights(weights, reference):
    assert weights.keys() == reference.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_out_of_memory_halves_the_rows_and_training_ends_with_the_same_weights(tiny, undisturbed):
    model_dir, tokenizer, encoded = tiny
    widest = max(len(c) for c in encoded)

    weights, events, _ = trained_lora(model_dir, encoded, tokenizer.pad_token_id, limit=2 * 128)

    assert len(events) == 1 and "4 → 2 rows of 128 tokens" in events[0] and "out of memory" in events[0]
    assert widest <= 128
    assert_same_weights(weights, undisturbed)


def test_the_cpus_allocation_failure_backs_off_like_cudas_out_of_memory(tiny, undisturbed):
    model_dir, tokenizer, encoded = tiny

    weights, events, _ = trained_lora(
        model_dir, encoded, tokenizer.pad_token_id, limit=2 * 128, cpu_allocator=True
    )

    assert len(events) == 1 and "4 → 2 rows of 128 tokens" in events[0]
    assert "can't allocate memory" in events[0]
    assert_same_weights(weights, undisturbed)


def test_evaluation_out_of_memory_halves_its_rows_and_scores_the_same(tiny, caplog):
    # After training fitted, evaluation must not end the job: it goes on with fewer rows per batch.
    from backends.local.packing import mean_token_loss

    model_dir, tokenizer, encoded = tiny
    model = lora(model_dir)
    options = {"row_length": 128, "pad_token_id": tokenizer.pad_token_id, "device": CPU}

    expected = mean_token_loss(model, encoded, rows_per_batch=1, **options)
    with caplog.at_level("WARNING", logger="backends.local.packing"):
        got = mean_token_loss(
            SimulatedAllocator(model, limit=128, cpu_allocator=True), encoded, rows_per_batch=4, **options
        )

    assert got == pytest.approx(expected, rel=1e-5)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "4 → 2 rows a batch" in said[0] and "2 → 1 rows" in said[1]
    assert "can't allocate memory" in said[0] and model.training  # left as it was found


def test_a_failure_in_a_later_micro_batch_discards_the_steps_partial_gradients(tiny, undisturbed):
    model_dir, tokenizer, encoded = tiny

    weights, events, _ = trained_lora(model_dir, encoded, tokenizer.pad_token_id, fail_calls={2})

    assert len(events) == 1
    assert_same_weights(weights, undisturbed)  # micro-batch 1's gradients were not counted twice


def test_when_no_smaller_shape_fits_checkpointing_goes_on_and_training_goes_on(tiny, undisturbed):
    model_dir, tokenizer, encoded = tiny

    weights, events, model = trained_lora(
        model_dir, encoded, tokenizer.pad_token_id, limit=0, checkpointing_fits=True
    )

    assert "gradient checkpointing on" in events[-1] and gradient_checkpointing_enabled(model)
    assert [e.split("backing off: ")[1].split(";")[0] for e in events[:2]] == [
        "4 → 2 rows of 128 tokens per micro-batch",
        "2 → 1 rows of 128 tokens per micro-batch",
    ]
    assert_same_weights(weights, undisturbed)


def test_out_of_memory_with_nothing_left_to_try_fails_naming_max_seq_length(tiny):
    model_dir, tokenizer, encoded = tiny
    model = SimulatedAllocator(lora(model_dir), limit=0)

    with pytest.raises(RuntimeError, match=r"lower hyperparameters.max_seq_length \(now 128\)"):
        train(model, encoded, SETTINGS, device=CPU, pad_token_id=tokenizer.pad_token_id)


SIMULATED_GPU = """
import torch
from transformers.models.phi3 import modeling_phi3

_forward = modeling_phi3.Phi3Model.forward


def forward(self, input_ids=None, *args, **kwargs):
    if input_ids is not None and input_ids.numel() > {limit}:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return _forward(self, input_ids, *args, **kwargs)


modeling_phi3.Phi3Model.forward = forward
"""


def test_a_job_that_runs_out_of_memory_completes_and_its_log_says_how_it_backed_off(tmp_path, facts_file):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SIMULATED_GPU.format(limit=2 * 96))
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec = tiny_spec(
        tmp_path,
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        facts_file,
        per_device_train_batch_size=4,
        max_seq_length=96,
        num_train_epochs=1,
        throughput_log=tmp_path / "throughput.jsonl",
    )
    (job_dir / "spec.json").write_text(spec.model_dump_json(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{PROJECT_ROOT}", "HF_HUB_OFFLINE": "1"}

    result = subprocess.run(
        [sys.executable, "-m", "backends.local.trainer", str(job_dir)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    status = read_status(job_dir)
    assert result.returncode == 0, result.stdout[-3000:]
    assert status.status == "Completed"
    assert "out of memory" in result.stdout and "backing off: 4 → 2 rows of 96 tokens" in result.stdout
    measured = json.loads((tmp_path / "throughput.jsonl").read_text().splitlines()[-1])
    assert measured["device_name"] == "cpu" and measured["tokens_per_second"] > 0


# -- relayout ---------------------------------------------------------------------------------------


def test_relayout_keeps_a_steps_conversations_and_fits_the_new_shape(tiny):
    encoded = tiny[2]
    lengths = [len(c) for c in encoded]
    micro_batches = plan_epoch(encoded, row_length=128, rows_per_batch=4, packing=True, seed=0)[:2]

    relaid = relayout_step(micro_batches, lengths, MicroBatchShape(1, 256), seed=0)

    before = sorted(i for rows in micro_batches for row in rows for i in row)
    assert sorted(i for rows in relaid for row in rows for i in row) == before
    assert all(len(rows) == 1 and sum(lengths[i] for i in rows[0]) <= 256 for rows in relaid)


# -- flat layout and varlen attention ----------------------------------------------------------------


def test_flat_batches_with_varlen_attention_give_the_losses_of_one_by_one_sdpa_runs(tiny):
    model_dir, tokenizer, encoded = tiny
    conversations = encoded[:6]
    reference = one_by_one(lora(model_dir, "sdpa"), conversations, tokenizer.pad_token_id)

    flat = collate([conversations[:3], conversations[3:]], tokenizer.pad_token_id, flat=True)
    packed = unpack_flat(token_losses(lora(model_dir, ATTENTION_NAME), flat), conversations)

    assert flat.input_ids.shape[0] == 1 and flat.input_ids.shape[1] % 64 == 0
    for got, want in zip(packed, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flat_batches_with_varlen_attention_give_the_lora_gradients_of_one_by_one_runs(tiny):
    model_dir, tokenizer, encoded = tiny
    conversations = encoded[:6]
    model = lora(model_dir, ATTENTION_NAME)
    token_losses(model, collate([conversations], tokenizer.pad_token_id, flat=True)).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference_model = lora(model_dir, "sdpa")
    sum(
        losses.sum() for losses in one_by_one(reference_model, conversations, tokenizer.pad_token_id)
    ).backward()
    separate = {n: p.grad for n, p in reference_model.named_parameters() if p.requires_grad}

    assert packed.keys() == separate.keys() and packed
    for name in packed:
        torch.testing.assert_close(packed[name], separate[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_varlen_check_fails_when_the_conversation_boundaries_are_lost(tiny):
    model_dir, tokenizer, encoded = tiny
    conversations = encoded[:3]
    model = lora(model_dir, ATTENTION_NAME)
    flat = collate([conversations], tokenizer.pad_token_id, flat=True)
    one_sequence = torch.tensor([0, flat.input_ids.shape[1]], dtype=torch.int32)
    leaked = unpack_flat(
        token_losses(model, type(flat)(**{**flat.__dict__, "cu_seq_lens": one_sequence})), conversations
    )
    reference = one_by_one(lora(model_dir, "sdpa"), conversations, tokenizer.pad_token_id)

    torch.testing.assert_close(leaked[0], reference[0], rtol=1e-5, atol=1e-6)  # nothing before it
    with pytest.raises(AssertionError):
        torch.testing.assert_close(leaked[1], reference[1], rtol=1e-5, atol=1e-6)


def test_varlen_attention_finds_the_conversations_from_positions_in_a_rows_batch(tiny):
    model_dir, tokenizer, encoded = tiny
    rows = [encoded[:3], encoded[3:5]]
    reference = one_by_one(lora(model_dir, "sdpa"), [c for row in rows for c in row], tokenizer.pad_token_id)

    losses = token_losses(lora(model_dir, ATTENTION_NAME), collate(rows, tokenizer.pad_token_id))

    offset, pieces = 0, []
    for b, row in enumerate(rows):
        offset = 0
        for conversation in row:
            pieces.append(losses[b, offset : offset + len(conversation)])
            offset += len(conversation)
    for got, want in zip(pieces, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_varlen_attention_keeps_transformers_sliding_window(tmp_path, facts_file, tiny):
    encoded = tiny[2][:3]
    assert all(len(c) > 8 for c in encoded)
    windowed, unwindowed = (
        build_phi3_from_config(
            tmp_path / name, corpus_files=[facts_file], shape={**PHI3_MINI_TOY, "sliding_window": w}
        )
        for name, w in (("windowed", 8), ("unwindowed", None))
    )
    reference = one_by_one(lora(windowed, "sdpa"), encoded, 0)
    without_window = one_by_one(lora(unwindowed, "sdpa"), encoded, 0)  # same weights (same seed)

    packed = unpack_flat(
        token_losses(lora(windowed, ATTENTION_NAME), collate([encoded], 0, flat=True)), encoded
    )

    for got, want in zip(packed, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):  # the window changes the result, so the check above can fail
        torch.testing.assert_close(packed[0], without_window[0], rtol=1e-5, atol=1e-6)


def test_logits_only_where_there_are_targets_give_the_full_logits_losses(tiny):
    model_dir, tokenizer, encoded = tiny
    model = lora(model_dir)
    batch = collate([encoded[:3], encoded[3:6]], tokenizer.pad_token_id)

    selected = token_losses(model, batch)
    full = token_losses(model, type(batch)(**{**batch.__dict__, "keep": None}))

    assert batch.keep.numel() < batch.input_ids.shape[1]
    torch.testing.assert_close(selected, full, rtol=1e-5, atol=1e-6)


def test_the_step_loop_trains_in_the_flat_layout_with_varlen_attention(tiny):
    model_dir, tokenizer, encoded = tiny
    model = lora(model_dir, ATTENTION_NAME)
    execution = Execution(device=CPU, attention=ATTENTION_NAME, tokens_per_micro_batch=256)
    settings = LoopSettings(
        learning_rate=5e-3, num_train_epochs=2, per_device_train_batch_size=2, max_seq_length=128
    )
    reports = []

    final = train(
        model,
        encoded,
        settings,
        device=CPU,
        pad_token_id=tokenizer.pad_token_id,
        execution=execution,
        on_progress=reports.append,
    )

    assert final.train_loss < reports[1].train_loss
    assert (
        final.padded_tokens - final.real_tokens < 64 * final.step * settings.gradient_accumulation_steps * 2
    )


def test_the_layers_to_compile_are_the_models_decoder_layers(tiny):
    layers = decoder_layers(lora(tiny[0]))

    assert [type(layer).__name__ for layer in layers] == ["Phi3DecoderLayer"] * 2


def test_a_model_trained_with_varlen_attention_is_saved_with_a_loadable_config(tiny, tmp_path):
    model_dir, tokenizer, _ = tiny
    model = lora(model_dir, ATTENTION_NAME)

    saved = save_merged_model(model, tokenizer, tmp_path / "merged")

    assert ATTENTION_NAME not in (saved / "config.json").read_text()


# -- Phi-3-mini-shaped model -------------------------------------------------------------------------


def test_a_phi3_mini_shaped_model_from_config_loads_as_a_checkpoint_and_trains_with_lora(
    tmp_path, facts_file, tiny
):
    model_dir = build_phi3_from_config(
        tmp_path / "phi3-mini-toy", corpus_files=[facts_file], shape=PHI3_MINI_TOY
    )

    base_dir = prepare_base_model(str(model_dir), models_dir=tmp_path, work_dir=tmp_path, corpus_files=[])
    model = lora(base_dir, ATTENTION_NAME)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encoded = [encode_conversation(tokenizer, c, 128) for c in load_conversations(facts_file)][:16]
    final = train(
        model,
        encoded,
        LoopSettings(learning_rate=1e-3, per_device_train_batch_size=2, max_seq_length=128),
        device=CPU,
        pad_token_id=tokenizer.pad_token_id,
        execution=Execution(device=CPU, attention=ATTENTION_NAME),
    )

    config = model.get_base_model().config
    assert (config.vocab_size, config.sliding_window, type(model.get_base_model()).__name__) == (
        32064,
        2047,
        "Phi3ForCausalLM",
    )
    adapted = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert final.step == final.total_steps and final.train_loss == final.train_loss  # finite


def test_tokens_per_second_leave_out_the_first_step_which_holds_compiling():
    # On a GPU the first step traces and autotunes the compiled layers (minutes); a short job's
    # whole-run average would carry that into every step and into the cost estimates scaled from it.
    from backends.local.step_loop import StepTokens, _Meter

    ticks = iter([0.0, 30.0, 31.0, 32.0])  # start, then the end of each step: 30 s, 1 s, 1 s
    meter = _Meter(total_steps=3, learning_rate=1e-4, clock=lambda: next(ticks))
    rates = []
    for _ in range(3):
        meter.add(StepTokens(real=1000, padded=1200, targets=400), loss_sum=1.0)
        meter.step(epoch=0.0, learning_rate=1e-4)
        rates.append(meter.progress.tokens_per_second)

    assert rates == [pytest.approx(1000 / 30), 1000.0, 1000.0]
    assert (meter.progress.real_tokens, meter.progress.seconds) == (3000, 32.0)  # the totals stay whole


def test_fused_kernels_patch_this_model_only_and_keep_rope_out_of_the_compiled_layers(tiny, monkeypatch):
    # liger-kernel needs triton and a GPU, so a stand-in does what liger-kernel 0.8.5's
    # apply_liger_kernel_to_phi3 does: it rebinds the modeling module's names for the whole process
    # (and, with rope=True, its RoPE, whose dispatcher is torch.compiler.disable'd) and swaps this model's
    # norms and MLPs. What we keep of that must stay with this model.
    import types

    from transformers.models.phi3 import modeling_phi3

    from backends.local.accelerator import apply_fused_kernels

    class FusedNorm(torch.nn.Module):
        pass

    calls = []

    def apply_to_instance(model, **switches):
        calls.append(switches)
        modeling_phi3.Phi3RMSNorm = FusedNorm
        modeling_phi3.liger_marker = True
        if switches["rope"]:
            modeling_phi3.apply_rotary_pos_emb = lambda *args, **kwargs: None
        for layer in model.model.layers:
            layer.input_layernorm.forward = types.MethodType(lambda self, x: x, layer.input_layernorm)

    stand_in = types.ModuleType("liger_kernel.transformers")
    stand_in._apply_liger_kernel_to_instance = apply_to_instance
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", stand_in)
    names_before = dict(vars(modeling_phi3))
    model = lora(tiny[0])

    apply_fused_kernels(model)

    assert calls == [
        {
            "rope": False,
            "rms_norm": True,
            "swiglu": True,
            "cross_entropy": False,
            "fused_linear_cross_entropy": False,
        }
    ]
    assert dict(vars(modeling_phi3)) == names_before  # a model built next is transformers' own
    layer = model.base_model.model.model.layers[0]
    assert layer.input_layernorm(torch.ones(2)).tolist() == [1.0, 1.0]  # this model keeps the patch


def test_varlen_attention_takes_fp32_queries_and_keys_beside_half_values_in_the_values_dtype():
    # Full fine-tuning under bf16 autocast: RoPE's fp32 cos/sin keep q and k fp32 while v is bf16; the
    # attention must run in bf16 (on a GPU: the flash kernel, not the per-conversation fallback).
    from backends.local.packed_attention import packed_varlen_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    bounds = {"cu_seq_lens_q": torch.tensor([0, 4, 6], dtype=torch.int32), "max_length_q": 4}
    half = torch.bfloat16

    mixed, _ = packed_varlen_attention(torch.nn.Module(), q, k, v.to(half), None, **bounds)
    same, _ = packed_varlen_attention(torch.nn.Module(), q.to(half), k.to(half), v.to(half), None, **bounds)

    assert mixed.dtype == half
    torch.testing.assert_close(mixed, same, rtol=0, atol=0)
