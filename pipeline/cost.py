"""How long a fine-tune will take on an Azure GPU SKU, before anything is spent.

    seconds = training tokens (tokens × epochs) ÷ tokens per second on the SKU

The tokens per second come from a measurement when there is one (the local trainer appends one
per finished job to a JSONL file, see `append_measurement`): the measured card's achieved
fraction of its bf16 peak is carried over to the SKU's GPUs, i.e. the rate is scaled by the ratio
of their bf16 peaks, by the GPU count (assuming linear data-parallel scaling: an optimistic bound)
and by the ratio of model sizes (FLOPs per token are proportional to parameters). Without a
measurement the rate is a documented default, `ASSUMED_MFU` of the SKU's peak, and the estimate
says so. Pure Python: importable by the Functions app and by the trainer without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's and AMD's datasheets (they
# quote 2× these "with sparsity"): A100 SXM4/PCIe 312; H100 SXM5 989; H100 NVL 835; H100 PCIe 756;
# H200 SXM 989; L40S 362; A10 125; L4 121; RTX 6000 Ada 364; RTX A6000 155; GeForce RTX 4090 165
# and RTX 3090 71 (with fp32 accumulate, Ada/Ampere whitepapers); AMD Instinct MI300X 1307.
# V100 and T4 have no bf16: their fp16 tensor peaks (V100 PCIe 112, SXM2 125; T4 65) stand in.
BF16_PEAK_TFLOPS: dict[str, float] = {
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM5 (also "H100 80GB HBM3")
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 155.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100 PCIe": 112.0,
    "V100": 125.0,
    "T4": 65.0,
    "MI300X": 1307.0,
}


@dataclass(frozen=True)
class Sku:
    gpu: str  # a BF16_PEAK_TFLOPS key
    gpus: int


# Azure ML GPU SKUs (Azure VM size documentation: NC A100 v4, ND A100 v4, NC H100 v5, ND H100 v5,
# ND H200 v5, NCv3, NVadsA10 v5, NCasT4_v3, ND MI300X v5 series).
AZURE_SKUS: dict[str, Sku] = {
    "Standard_NC24ads_A100_v4": Sku("A100", 1),
    "Standard_NC48ads_A100_v4": Sku("A100", 2),
    "Standard_NC96ads_A100_v4": Sku("A100", 4),
    "Standard_ND96asr_v4": Sku("A100", 8),
    "Standard_ND96amsr_A100_v4": Sku("A100", 8),
    "Standard_NC40ads_H100_v5": Sku("H100 NVL", 1),
    "Standard_NC80adis_H100_v5": Sku("H100 NVL", 2),
    "Standard_ND96isr_H100_v5": Sku("H100", 8),
    "Standard_ND96isr_H200_v5": Sku("H200", 8),
    "Standard_NC6s_v3": Sku("V100 PCIe", 1),
    "Standard_NC12s_v3": Sku("V100 PCIe", 2),
    "Standard_NC24s_v3": Sku("V100 PCIe", 4),
    "Standard_NC24rs_v3": Sku("V100 PCIe", 4),
    "Standard_NV36ads_A10_v5": Sku("A10", 1),
    "Standard_NV72ads_A10_v5": Sku("A10", 2),
    "Standard_NC4as_T4_v3": Sku("T4", 1),
    "Standard_NC8as_T4_v3": Sku("T4", 1),
    "Standard_NC16as_T4_v3": Sku("T4", 1),
    "Standard_NC64as_T4_v3": Sku("T4", 4),
    "Standard_ND96is_MI300X_v5": Sku("MI300X", 8),
}

# Phi-3-mini: 32 layers × (qkv 3072×9216 + o 3072² + gate_up 3072×16384 + down 8192×3072 + 2 norms)
# + the final norm; the 32064×3072 embedding and output projection are left out.
PHI3_MINI_NON_EMBEDDING_PARAMS = 3_624_078_336
# The default when nothing was measured: 15% of the bf16 peak. Issue 8's reference figures on an
# H100 are 5% for a padded HF Trainer with checkpointing and 27% packed and compiled; Azure's
# fine-tuning component sits between the two. A measurement replaces this as soon as one exists.
ASSUMED_MFU = 0.15
# A measurement on a small model says little about a large one's utilisation.
MIN_PARAMS_TO_SCALE = 1_000_000_000


@dataclass(frozen=True)
class MeasuredThroughput:
    """Real (non-padding) training tokens per second of one finished job, and what it ran on."""

    device_name: str  # torch.cuda.get_device_name(), or "cpu"
    tokens_per_second: float
    non_embedding_params: int
    base_model: str = ""
    full_finetune: bool = False
    recorded_at: str = ""


@dataclass(frozen=True)
class Estimate:
    sku: str
    tokens: int
    tokens_per_second: float | None
    seconds: float | None
    node_hours: float | None
    basis: Literal["measured", "default", "unknown"]
    detail: str

    @property
    def summary(self) -> str:
        """e.g. "≈ 42 minutes on Standard_NC24ads_A100_v4 (estimate: ...)"."""
        if self.seconds is None:
            return f"training time on {self.sku} unknown ({self.detail})"
        return f"≈ {format_duration(self.seconds)} on {self.sku} ({self.detail})"


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a GPU named as torch names it, e.g. "NVIDIA H100 80GB HBM3" → 989."""
    name = device_name.upper()
    for key, tflops in BF16_PEAK_TFLOPS.items():  # specific names ("H100 NVL") come before "H100"
        if all(part in name for part in key.upper().split()):
            return tflops
    return None


def training_flops_per_token(non_embedding_params: int, *, full_finetune: bool = False) -> float:
    """Forward 2N, backward 2N for the activations' gradients, and 2N more for weight gradients
    when every weight trains (LoRA's adapter weights are negligible): 4N under LoRA, 6N in full."""
    return (6 if full_finetune else 4) * non_embedding_params


def estimate_training(
    tokens: int,
    sku: str,
    measured: MeasuredThroughput | None = None,
    *,
    non_embedding_params: int = PHI3_MINI_NON_EMBEDDING_PARAMS,
    full_finetune: bool = False,
) -> Estimate:
    """Time to train `tokens` (already multiplied by the epochs) on one node of the Azure `sku`."""
    if tokens < 0:
        raise ValueError(f"tokens must not be negative (got {tokens})")
    target = AZURE_SKUS.get(sku)
    if target is None:
        return Estimate(sku, tokens, None, None, None, "unknown", "not in pipeline/cost.py's SKU table")
    sku_flops = BF16_PEAK_TFLOPS[target.gpu] * 1e12 * target.gpus
    flops_per_token = training_flops_per_token(non_embedding_params, full_finetune=full_finetune)
    measured_peak = peak_tflops(measured.device_name) if measured else None
    if measured and measured_peak and measured.non_embedding_params >= MIN_PARAMS_TO_SCALE:
        achieved = measured.tokens_per_second * training_flops_per_token(
            measured.non_embedding_params, full_finetune=measured.full_finetune
        )
        utilisation = achieved / (measured_peak * 1e12)
        rate = utilisation * sku_flops / flops_per_token
        detail = (
            f"from {measured.tokens_per_second:,.0f} tokens/s measured on {measured.device_name}, scaled by "
            f"bf16 peak {BF16_PEAK_TFLOPS[target.gpu]:g}/{measured_peak:g} TFLOP/s"
            + (f" × {target.gpus} GPUs" if target.gpus > 1 else "")
        )
        basis: Literal["measured", "default"] = "measured"
    else:
        rate = ASSUMED_MFU * sku_flops / flops_per_token
        detail = f"estimate: {ASSUMED_MFU:.0%} of {target.gpus}× {target.gpu} bf16 peak, nothing measured yet"
        basis = "default"
    seconds = tokens / rate
    return Estimate(sku, tokens, rate, seconds, seconds / 3600, basis, detail)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        count = max(1, round(seconds))
        return f"{count} second{'s' if count != 1 else ''}"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes"
    return f"{seconds / 3600:.1f} hours"


def append_measurement(path: Path, measured: MeasuredThroughput) -> None:
    """Add one measurement to the JSONL log (one line per finished job)."""
    record = asdict(measured)
    record["recorded_at"] = record["recorded_at"] or datetime.now(UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def read_measurements(path: Path) -> list[MeasuredThroughput]:
    """Every measurement in the log, oldest first; a missing log is an empty one."""
    if not path.is_file():
        return []
    measurements = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            measurements.append(MeasuredThroughput(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a throughput measurement ({error})") from error
    return measurements


def best_measurement(measurements: list[MeasuredThroughput]) -> MeasuredThroughput | None:
    """The newest measurement that can be scaled: a GPU with a known peak and a model of ≥ 1 B parameters."""
    usable = [
        m
        for m in measurements
        if peak_tflops(m.device_name) is not None and m.non_embedding_params >= MIN_PARAMS_TO_SCALE
    ]
    return max(usable, key=lambda m: m.recorded_at, default=None)
