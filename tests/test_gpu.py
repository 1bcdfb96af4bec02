"""The trainer on a CUDA GPU: the flash-attention varlen kernel against one-by-one runs, compile,
a real out-of-memory back-off, the memory plan, a full-size Phi-3-mini-shaped model, and the
scoring model in bf16. Marked `gpu`: skipped without CUDA, run by `bench/trainer_gpu.py` after
its measurements (and by `pytest -m gpu`). Imports nothing that a bare GPU image lacks (no
pydantic, no MLflow) except where a test says so.

The first two tests run everywhere: they exercise the benchmark script itself on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from backends.local.accelerator import (
    Execution,
    Switches,
    compile_layers,
    fit_to_memory,
    plan_execution,
    prepare_for_training,
)
from backends.local.base_models import (
    PHI3_MINI_SHAPE,
    LoraSettings,
    build_phi3_from_config,
    load_trainable_model,
    prepare_base_model,
)
from backends.local.memory_plan import ModelShape, activation_bytes_per_token
from backends.local.packed_attention import ATTENTION_NAME, register_packed_attention
from backends.local.packing import EncodedConversation, collate, token_losses
from backends.local.step_loop import LoopSettings, train

PROJECT_ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU; torch {torch.__version__} sees none (run `pytest -m gpu` on a GPU machine)",
)


def on_gpu(test):
    """Marked `gpu` (selected by `pytest -m gpu`) and skipped, saying why, where CUDA is missing."""
    return pytest.mark.gpu(needs_cuda(test))


CUDA = torch.device("cuda")
TOY = {
    **PHI3_MINI_SHAPE,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


# -- the benchmark script, on CPU ---------------------------------------------------------------------


def test_the_gpu_benchmark_runs_both_paths_on_a_tiny_model_on_the_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "bench.trainer_gpu", "--cpu-smoke"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row["name"][:3] for row in rows] == ["(a)", "(b)"]
    assert all(row["tokens_per_second"] > 0 and 0 <= row["padding_fraction"] < 1 for row in rows)
    assert "attention packed_varlen" in rows[1]["detail"]
    # Each path's figures are printed as soon as they are measured: a run stopped by its time limit later
    # (on the lent GPU, before the table) still has them.
    early = [
        json.loads(line[len("measured: ") :])
        for line in result.stdout.splitlines()
        if line.startswith("measured: ")
    ]
    assert [row["name"] for row in early] == [row["name"] for row in rows]
    assert "measured matmul" in result.stdout.split("measured: ")[0]


def test_the_gpu_benchmark_says_how_many_graphs_compile_made_and_what_broke_them():
    from bench.trainer_gpu import compile_summary

    def halves(x: torch.Tensor) -> torch.Tensor:
        x = x + 1
        torch._dynamo.graph_break()
        return x / 2

    torch._dynamo.reset()
    counters.clear()
    try:
        torch.compile(halves, backend="eager")(torch.ones(3))
        summary = compile_summary()
    finally:
        torch._dynamo.reset()

    assert summary.startswith("2 compiled graphs, 1 graph breaks"), summary
    assert "1× Call to `torch._dynamo.graph_break()`" in summary, summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_gpu_benchmark_without_a_gpu_exits_saying_what_it_needs():
    result = subprocess.run(
        [sys.executable, "-m", "bench.trainer_gpu"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--cpu-smoke" in result.stderr


# -- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    messages = [{"role": "user", "content": "What is the code name of Safuzo?"}]
    path.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    return path


def random_conversations(lengths: list[int], vocab: int, seed: int = 0) -> list[EncodedConversation]:
    generator = torch.Generator().manual_seed(seed)
    conversations = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=generator).tolist()
        labels = [-100] * (n // 4) + ids[n // 4 :]  # the first quarter is the prompt
        conversations.append(EncodedConversation(ids, labels))
    return conversations


def bf16_lora(model_dir: Path, attention: str):
    model = load_trainable_model(
        model_dir,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0),
        seed=0,
        device=CUDA,
        dtype=torch.bfloat16,
        attention=attention,
    )
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.05)
    return model


def losses_of(model, batch) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return token_losses(model, batch.to(CUDA))


def flat_and_separate(model_dir: Path, conversations, *, boundaries: bool = True):
    """Per-conversation losses: flat packed with the varlen kernel, and one by one with sdpa."""
    flat = collate([conversations], 0, flat=True)
    if not boundaries:  # one sequence of the whole row, and its length as the longest (the kernel's grid)
        width = flat.input_ids.shape[1]
        bounds = {"cu_seq_lens": torch.tensor([0, width], dtype=torch.int32), "max_length": width}
        flat = type(flat)(**{**flat.__dict__, **bounds})
    packed_losses = losses_of(bf16_lora(model_dir, ATTENTION_NAME), flat)[0]
    reference_model = bf16_lora(model_dir, "sdpa")
    packed, separate, offset = [], [], 0
    for conversation in conversations:
        packed.append(packed_losses[offset : offset + len(conversation)].detach().float())
        separate.append(
            losses_of(reference_model, collate([[conversation]], 0))[0, : len(conversation)].float()
        )
        offset += len(conversation)
    return packed, separate


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a[1:], b[1:], strict=True))


# -- kernels ------------------------------------------------------------------------------------------


@on_gpu
def test_on_this_gpu_auto_plans_bf16_varlen_compile_and_a_budget_from_free_memory(corpus, tmp_path):
    assert register_packed_attention(), "torch.nn.attention.varlen is missing: the flash varlen path is off"
    execution = plan_execution(CUDA, Switches(), lora=True)
    model_dir = build_phi3_from_config(tmp_path / "toy", corpus_files=[corpus], shape=TOY)
    model = bf16_lora(model_dir, execution.attention)

    fitted = fit_to_memory(
        execution, model, switches=Switches(), max_seq_length=4096, step_tokens=65536, lora_dropout=False
    )

    assert execution.bf16 and execution.base_dtype == torch.bfloat16 and execution.flat and execution.compile
    assert fitted.tokens_per_micro_batch >= 4096 and not fitted.gradient_checkpointing


@on_gpu
def test_the_varlen_kernel_gives_the_losses_of_one_by_one_runs_and_fails_without_boundaries(corpus, tmp_path):
    model_dir = build_phi3_from_config(tmp_path / "toy", corpus_files=[corpus], shape=TOY)
    conversations = random_conversations([300, 57, 1200, 800, 129], TOY["vocab_size"])

    packed, separate = flat_and_separate(model_dir, conversations)
    leaked, _ = flat_and_separate(model_dir, conversations, boundaries=False)

    kernel_error, leak_error = worst(packed, separate), worst(leaked, separate)
    assert kernel_error < 0.05 and kernel_error < leak_error / 5, (kernel_error, leak_error)


@on_gpu
def test_the_varlen_kernel_keeps_the_sliding_window(corpus, tmp_path):
    windowed = build_phi3_from_config(
        tmp_path / "w", corpus_files=[corpus], shape={**TOY, "sliding_window": 64}
    )
    unwindowed = build_phi3_from_config(
        tmp_path / "u", corpus_files=[corpus], shape={**TOY, "sliding_window": None}
    )
    conversations = random_conversations([300, 500, 200], TOY["vocab_size"])

    packed, separate = flat_and_separate(windowed, conversations)
    _, without_window = flat_and_separate(unwindowed, conversations)

    assert worst(packed, separate) < worst(separate, without_window) / 5


@on_gpu
def test_the_varlen_kernels_gradients_match_one_by_one_runs(corpus, tmp_path):
    model_dir = build_phi3_from_config(tmp_path / "toy", corpus_files=[corpus], shape=TOY)
    conversations = random_conversations([300, 700, 150], TOY["vocab_size"])
    model = bf16_lora(model_dir, ATTENTION_NAME)
    losses_of(model, collate([conversations], 0, flat=True)).sum().backward()
    packed = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    reference = bf16_lora(model_dir, "sdpa")
    sum(losses_of(reference, collate([[c]], 0)).sum() for c in conversations).backward()

    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(
                packed[name],
                parameter.grad.float(),
                rtol=0.05,
                atol=0.05 * float(parameter.grad.abs().max()),
                msg=name,
            )


@on_gpu
def test_compiled_decoder_layers_give_the_losses_of_eager_ones(corpus, tmp_path):
    model_dir = build_phi3_from_config(tmp_path / "toy", corpus_files=[corpus], shape=TOY)
    conversations = random_conversations([300, 700, 150, 64], TOY["vocab_size"])
    batch = collate([conversations], 0, flat=True, max_length=1024)
    model = bf16_lora(model_dir, ATTENTION_NAME)
    eager = losses_of(model, batch).detach()

    counters.clear()
    assert compile_layers(model) == TOY["num_hidden_layers"]
    compiled = losses_of(model, batch)
    compiled.sum().backward()

    torch.testing.assert_close(compiled.detach().float(), eager.float(), rtol=0.03, atol=0.03)
    # The flash kernel itself inside the graphs (tests/test_compiled_layers.py checks the same on the CPU).
    assert not counters["graph_break"], dict(counters["graph_break"])


# -- memory -------------------------------------------------------------------------------------------

MEDIUM = {
    **TOY,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}


@on_gpu
def test_a_real_out_of_memory_error_backs_off_and_training_goes_on(corpus, tmp_path):
    model_dir = build_phi3_from_config(tmp_path / "medium", corpus_files=[corpus], shape=MEDIUM)
    model = bf16_lora(model_dir, ATTENTION_NAME)
    conversations = random_conversations([1024] * 128, MEDIUM["vocab_size"])
    settings = LoopSettings(
        learning_rate=1e-4, per_device_train_batch_size=64, max_seq_length=1024, logging_steps=1
    )
    execution = Execution(
        device=CUDA,
        bf16=True,
        base_dtype=torch.bfloat16,
        attention=ATTENTION_NAME,
        tokens_per_micro_batch=65536,
    )
    events: list[str] = []
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 12 * 1024**3 / total), CUDA)
    try:
        final = train(
            model,
            conversations,
            settings,
            device=CUDA,
            pad_token_id=0,
            execution=execution,
            on_event=events.append,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()

    assert events and all("out of memory" in e.lower() for e in events), events
    assert final.step == final.total_steps and final.train_loss == final.train_loss


@on_gpu
def test_the_activation_estimate_covers_the_memory_a_step_really_takes(corpus, tmp_path):
    model_dir = build_phi3_from_config(tmp_path / "medium", corpus_files=[corpus], shape=MEDIUM)
    model = bf16_lora(model_dir, ATTENTION_NAME)
    conversations = random_conversations([1024] * 16, MEDIUM["vocab_size"])
    batch = collate([conversations], 0, flat=True, max_length=1024)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    losses_of(model, batch).sum().backward()
    torch.cuda.synchronize()

    used_per_token = (torch.cuda.max_memory_allocated() - before) / batch.input_ids.numel()
    estimate = activation_bytes_per_token(ModelShape.from_config(model.config), checkpointing=False)
    assert used_per_token <= estimate * 1.15, (used_per_token, estimate)


# -- real size ----------------------------------------------------------------------------------------


@pytest.mark.slow
@on_gpu
def test_a_phi3_mini_shaped_checkpoint_loads_and_trains_with_every_auto_switch(corpus, tmp_path):
    model_dir = build_phi3_from_config(
        tmp_path / "phi3-mini-shaped",
        corpus_files=[corpus],
        shape=PHI3_MINI_SHAPE,
        dtype=torch.bfloat16,
        device="cuda",
    )
    base_dir = prepare_base_model(str(model_dir), models_dir=tmp_path, work_dir=tmp_path, corpus_files=[])
    execution = plan_execution(CUDA, Switches(), lora=True)
    model = load_trainable_model(
        base_dir,
        lora=LoraSettings(r=16, alpha=32, dropout=0.05),
        seed=0,
        device=CUDA,
        dtype=execution.base_dtype,
        attention=execution.attention,
    )
    execution = fit_to_memory(
        execution, model, switches=Switches(), max_seq_length=4096, step_tokens=4 * 4096, lora_dropout=True
    )
    prepare_for_training(model, execution)
    conversations = random_conversations([4000, 2500, 1500, 900, 3000, 700, 2048, 1100], 32064)

    final = train(
        model,
        conversations,
        LoopSettings(learning_rate=1e-4, per_device_train_batch_size=4, max_seq_length=4096),
        device=CUDA,
        pad_token_id=0,
        execution=execution,
    )

    assert model.get_base_model().config.num_hidden_layers == 32
    assert final.step == final.total_steps and final.train_loss == final.train_loss


# -- scoring ------------------------------------------------------------------------------------------


@on_gpu
def test_the_scoring_model_loads_on_the_gpu_in_bf16_and_answers(corpus, tmp_path):
    pytest.importorskip(
        "mlflow", reason="the scoring model is an MLflow pyfunc; install mlflow-skinny to run this"
    )
    from backends.local.chat_model import MODEL_DIR_ARTIFACT, ChatCompletionModel

    model_dir = build_phi3_from_config(tmp_path / "toy", corpus_files=[corpus], shape=TOY)
    context = type("Context", (), {"artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)}})()
    chat = ChatCompletionModel()

    chat.load_context(context)
    answer = chat.predict(context, [{"role": "user", "content": "Hello"}], {"max_new_tokens": 4})

    assert chat.model.device.type == "cuda" and chat.model.dtype == torch.bfloat16
    assert isinstance(answer, list) and isinstance(answer[0], str)
