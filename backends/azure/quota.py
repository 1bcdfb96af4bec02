"""GPU quota and SKU checks, run before anything is created.

Azure ML clusters and managed online endpoints draw on the same per-family "Cluster Dedicated
vCPUs" quota and the regional total. A deployment reserves headroom for rolling upgrades: Azure ML
holds back 20 % extra instances, at least one (one instance of a 4-vCPU SKU needs 8 vCPUs; ten need
48). The cluster scales to zero ``idle_time_before_scale_down`` seconds after the fine-tune, long
before the deployment starts, so with ``min_instances`` 0 the two needs do not add up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from backends.protocol import BackendError
from pipeline.config import RunConfig

from .clients import AzureClients
from .errors import azure_errors

TOTAL_ROW = "Total Cluster Dedicated Regional vCPUs"
UPGRADE_RESERVE = 0.2


@dataclass(frozen=True)
class VmSku:
    name: str
    family: str
    vcpus: int
    gpus: int


@dataclass
class Need:
    purpose: str
    sku: VmSku
    instances: int

    @property
    def vcpus(self) -> int:
        return self.instances * self.sku.vcpus


@dataclass
class QuotaLine:
    quota: str
    used: int
    limit: int
    need: int
    needs: list[Need] = field(default_factory=list)

    @property
    def free(self) -> int:
        return self.limit - self.used

    @property
    def ok(self) -> bool:
        return self.limit < 0 or self.free >= self.need  # -1 = unlimited

    def describe(self) -> str:
        parts = "; ".join(
            f"{n.purpose} {n.instances} × {n.sku.vcpus} vCPUs ({n.sku.name})" for n in self.needs
        )
        return (
            f"{self.quota}: {self.used}/{self.limit} used, {self.free} free, run needs {self.need} ({parts})"
        )


def _field(entity, snake: str, wire: str):
    """azure-ai-ml 1.35 copies the wire dict onto VmSize/Usage entities: ``vCPUs`` set, ``v_cp_us`` None."""
    value = getattr(entity, snake, None)
    return value if value is not None else vars(entity).get(wire)


def _usage_name(usage) -> str:
    name = usage.name
    return str(name.get("value") if isinstance(name, dict) else getattr(name, "value", name))


def _norm(text: str) -> str:
    return re.sub(r"[\s_]", "", text).lower()


def vm_sizes(clients: AzureClients, location: str) -> dict[str, VmSku]:
    with azure_errors(f"list Azure ML VM sizes in {location}"):
        sizes = clients.ml.compute.list_sizes(location=location)
        return {
            s.name.lower(): VmSku(
                name=s.name,
                family=s.family or "",
                vcpus=int(_field(s, "v_cp_us", "vCPUs") or 0),
                gpus=int(_field(s, "gpus", "gpus") or 0),
            )
            for s in sizes
        }


def require_sku(sizes: dict[str, VmSku], name: str, field_name: str, location: str) -> VmSku:
    sku = sizes.get(name.lower())
    if sku is None:
        gpu = sorted(s.name for s in sizes.values() if s.gpus > 0)
        raise BackendError(
            f"{field_name} '{name}' is not an Azure ML VM size in {location} (Standard_NC6s_v3 was "
            "retired on "
            f"2025-09-30); GPU sizes offered there: {', '.join(gpu) or 'none'}"
        )
    return sku


def needs(cfg: RunConfig, sizes: dict[str, VmSku], location: str) -> list[Need]:
    deploy = require_sku(sizes, cfg.deployment.instance_type, "deployment.instance_type", location)
    count = cfg.deployment.instance_count
    reserved = count + max(1, math.ceil(count * UPGRADE_RESERVE))
    found = [Need("deployment (incl. Azure ML's upgrade reserve)", deploy, reserved)]
    if cfg.mode == "managed_compute":
        cluster = require_sku(sizes, cfg.compute.size, "compute.size", location)
        found.insert(0, Need("fine-tune cluster", cluster, cfg.compute.max_instances))
    return found


def _combined(group: list[Need], scales_to_zero: bool) -> int:
    vcpus = [n.vcpus for n in group]
    return max(vcpus) if scales_to_zero else sum(vcpus)


def quota_lines(
    clients: AzureClients, cfg: RunConfig, location: str, run_needs: list[Need]
) -> list[QuotaLine]:
    with azure_errors(f"read Azure ML quota in {location}"):
        usages = list(clients.ml.compute.list_usage(location=location))
    rows = {_norm(_usage_name(u)): u for u in usages}
    scales_to_zero = cfg.compute.min_instances == 0
    lines = []
    families: dict[str, list[Need]] = {}
    for need in run_needs:
        families.setdefault(need.sku.family, []).append(need)
    for family, group in families.items():
        label = next((k for k in rows if k.startswith(_norm(family)) and "clusterdedicated" in k), None)
        if label is None:
            raise BackendError(f"Azure ML reports no quota row for VM family '{family}' in {location}")
        lines.append(_line(rows[label], _combined(group, scales_to_zero), group))
    total = rows.get(_norm(TOTAL_ROW))
    if total is not None:
        lines.append(_line(total, _combined(run_needs, scales_to_zero), run_needs))
    return lines


def _line(usage, need: int, group: list[Need]) -> QuotaLine:
    used = int(_field(usage, "current_value", "currentValue") or 0)
    return QuotaLine(_usage_name(usage), used, int(_field(usage, "limit", "limit") or 0), need, group)


def check(clients: AzureClients, cfg: RunConfig, location: str) -> list[QuotaLine]:
    """The quota lines for this run; BackendError (with the numbers and the fix) when one is short."""
    sizes = vm_sizes(clients, location)
    lines = quota_lines(clients, cfg, location, needs(cfg, sizes, location))
    short = [line for line in lines if not line.ok]
    if short:
        raise BackendError(
            "not enough Azure ML quota in "
            + location
            + ": "
            + " | ".join(line.describe() for line in short)
            + ". Request an increase in Azure ML studio → Quota (GPU requests may need a support ticket), or "
            "lower compute.max_instances / deployment.instance_count, or pick another SKU or region."
        )
    return lines
