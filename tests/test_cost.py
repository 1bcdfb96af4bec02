"""The training-time estimate: tokens ÷ tokens/s, measured rates scaled across GPUs by bf16 peaks."""

from __future__ import annotations

import pytest

from pipeline.cost import (
    ASSUMED_MFU,
    AZURE_SKUS,
    BF16_PEAK_TFLOPS,
    PHI3_MINI_NON_EMBEDDING_PARAMS,
    MeasuredThroughput,
    append_measurement,
    best_measurement,
    estimate_training,
    format_duration,
    peak_tflops,
    read_measurements,
)

A100_SKU, H100_SKU = "Standard_NC24ads_A100_v4", "Standard_ND96isr_H100_v5"
H100 = "NVIDIA H100 80GB HBM3"


def measured(tokens_per_second: float, device: str = H100, **fields) -> MeasuredThroughput:
    return MeasuredThroughput(device, tokens_per_second, PHI3_MINI_NON_EMBEDDING_PARAMS, **fields)


def test_the_phi3_mini_parameter_count_is_that_of_a_model_built_with_its_shape():
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from backends.local.accelerator import non_embedding_parameters
    from backends.local.base_models import PHI3_MINI_SHAPE

    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**PHI3_MINI_SHAPE))

    assert non_embedding_parameters(model) == PHI3_MINI_NON_EMBEDDING_PARAMS
    assert model.num_parameters() == 3_821_079_552  # Phi-3-mini's 3.8 B


def test_without_a_measurement_the_rate_is_the_assumed_share_of_the_skus_peak():
    estimate = estimate_training(10_000_000, A100_SKU)

    rate = ASSUMED_MFU * 312e12 / (4 * PHI3_MINI_NON_EMBEDDING_PARAMS)
    assert estimate.basis == "default"
    assert estimate.tokens_per_second == pytest.approx(rate)
    assert estimate.seconds == pytest.approx(10_000_000 / rate)
    assert estimate.node_hours == pytest.approx(estimate.seconds / 3600)
    assert (
        estimate.summary
        == f"≈ 52 minutes on {A100_SKU} (estimate: 15% of 1× A100 bf16 peak, nothing measured yet)"
    )


def test_a_measurement_on_an_h100_scales_to_an_a100_by_the_ratio_of_bf16_peaks():
    estimate = estimate_training(1_000_000, A100_SKU, measured(10_000))

    assert estimate.basis == "measured"
    assert estimate.tokens_per_second == pytest.approx(10_000 * 312 / 989)
    assert "10,000 tokens/s measured on NVIDIA H100 80GB HBM3" in estimate.summary
    assert "bf16 peak 312/989 TFLOP/s" in estimate.summary


def test_the_same_card_gives_back_the_measured_rate():
    estimate = estimate_training(1_000_000, "Standard_NC40ads_H100_v5", measured(8_000, "NVIDIA H100 NVL"))

    assert estimate.tokens_per_second == pytest.approx(8_000)
    assert estimate.seconds == pytest.approx(125)


def test_a_node_with_eight_gpus_trains_eight_times_as_fast_as_one():
    one = estimate_training(1_000_000, "Standard_NC24ads_A100_v4")
    eight = estimate_training(1_000_000, "Standard_ND96amsr_A100_v4")

    assert eight.seconds == pytest.approx(one.seconds / 8)
    assert "8× A100" in eight.detail


def test_a_measurement_on_a_model_half_the_size_halves_the_rate_for_phi3_mini():
    half = MeasuredThroughput(H100, 20_000, PHI3_MINI_NON_EMBEDDING_PARAMS // 2)

    estimate = estimate_training(1_000_000, H100_SKU, half)

    assert estimate.tokens_per_second == pytest.approx(8 * 10_000, rel=1e-6)


def test_full_finetuning_takes_one_and_a_half_times_as_long_as_lora():
    lora = estimate_training(1_000_000, A100_SKU)
    full = estimate_training(1_000_000, A100_SKU, full_finetune=True)

    assert full.seconds == pytest.approx(1.5 * lora.seconds)


@pytest.mark.parametrize(
    "measurement",
    [
        measured(500, "cpu"),
        MeasuredThroughput(H100, 90_000, 100_000_000),  # a small model's utilisation says little
        measured(500, "Some Unknown Accelerator"),
    ],
)
def test_a_measurement_that_cannot_be_scaled_falls_back_to_the_default(measurement):
    estimate = estimate_training(1_000_000, A100_SKU, measurement)

    assert estimate.basis == "default" and estimate == estimate_training(1_000_000, A100_SKU)


def test_an_unknown_sku_says_so_instead_of_guessing():
    estimate = estimate_training(1_000_000, "Standard_D4s_v5")

    assert estimate.basis == "unknown" and estimate.seconds is None
    assert (
        estimate.summary == "training time on Standard_D4s_v5 unknown (not in pipeline/cost.py's SKU table)"
    )


def test_negative_tokens_are_refused():
    with pytest.raises(ValueError, match="tokens"):
        estimate_training(-1, A100_SKU)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA A10", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA GeForce RTX 4090", 165),
        ("NVIDIA RTX A6000", 155),
        ("Tesla V100-PCIE-16GB", 112),
        ("Tesla V100-SXM2-32GB", 125),
        ("Tesla T4", 65),
        ("AMD Instinct MI300X", 1307),
        ("cpu", None),
    ],
)
def test_gpu_names_as_torch_reports_them_map_to_their_bf16_peaks(name, tflops):
    assert peak_tflops(name) == tflops


def test_every_azure_sku_names_a_gpu_with_a_peak():
    assert all(sku.gpu in BF16_PEAK_TFLOPS and sku.gpus >= 1 for sku in AZURE_SKUS.values())


def test_measurements_round_trip_through_the_log_and_the_newest_scalable_one_wins(tmp_path):
    log = tmp_path / "throughput.jsonl"
    append_measurement(log, measured(9_000, recorded_at="2026-01-01T00:00:00+00:00"))
    append_measurement(log, measured(11_000, recorded_at="2026-02-01T00:00:00+00:00"))
    append_measurement(log, measured(400, "cpu", recorded_at="2026-03-01T00:00:00+00:00"))

    records = read_measurements(log)

    assert [r.tokens_per_second for r in records] == [9_000, 11_000, 400]
    assert best_measurement(records).tokens_per_second == 11_000


def test_a_new_measurement_is_stamped_with_the_time_it_was_recorded(tmp_path):
    log = tmp_path / "throughput.jsonl"

    append_measurement(log, measured(9_000))

    assert read_measurements(log)[0].recorded_at.startswith("20")


def test_a_missing_log_holds_no_measurements_and_gives_no_best(tmp_path):
    assert read_measurements(tmp_path / "absent.jsonl") == []
    assert best_measurement([]) is None


def test_a_corrupt_log_line_is_reported_with_its_file_and_line_number(tmp_path):
    log = tmp_path / "throughput.jsonl"
    append_measurement(log, measured(9_000))
    with open(log, "a", encoding="utf-8") as out:
        out.write('{"device": "x"}\n')

    with pytest.raises(ValueError, match=r"throughput.jsonl:2: not a throughput measurement"):
        read_measurements(log)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 second"),
        (45, "45 seconds"),
        (89, "89 seconds"),
        (600, "10 minutes"),
        (5399, "90 minutes"),
        (9000, "2.5 hours"),
    ],
)
def test_durations_read_in_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text
