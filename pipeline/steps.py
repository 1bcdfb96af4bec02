"""The pipeline's steps (the tutorial's table of contents) and the progress record a run carries.

The orchestrator keeps a ``RunProgress`` and publishes it as Durable custom status after every
step; ``GET /api/runs/{id}`` reads it back. It holds names, states, times and short summaries —
never datasets or secrets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from backends.protocol import ResourceRef

STAGES: list[tuple[str, list[str]]] = [
    ("setup", ["workspace", "identity", "role_assignments", "quota"]),
    ("data", ["prepare_dataset", "upload_data"]),
    ("fine-tune", ["compute", "submit_finetune", "wait_for_finetune"]),
    ("deploy", ["register_model", "endpoint", "deployment", "wait_for_deployment", "traffic"]),
    ("integrate", ["promptflow_connection", "smoke_test", "flow_smoke", "publish_flow"]),
    ("evaluate", ["base_deployment", "wait_for_base_deployment", "evaluate", "remove_base_deployment"]),
]
STEP_STAGE = {step: stage for stage, steps in STAGES for step in steps}
STEP_ORDER = [step for _, steps in STAGES for step in steps]

StepStatus = Literal["pending", "running", "succeeded", "failed", "skipped"]


class StepResult(BaseModel):
    """What every step activity returns (JSON-safe, small)."""

    ok: bool = True
    summary: str = ""
    skipped: str | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)
    created: list[ResourceRef] = Field(default_factory=list)
    error: str | None = None
    # Set when an operation the step started is still under way: the orchestrator calls the step again
    # after a durable timer instead of an activity waiting on it.
    pending: str | None = None


class StepRecord(BaseModel):
    name: str
    stage: str
    status: StepStatus = "pending"
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    summary: str | None = None
    error: str | None = None
    checks: int | None = None  # how often a step handed back while its operation was still under way


class RunProgress(BaseModel):
    run_id: str
    backend: str
    preset: str | None = None
    status: Literal["Running", "Completed", "Failed", "Canceled"] = "Running"
    stage: str | None = None
    current_step: str | None = None
    steps: list[StepRecord]
    names: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    created: list[ResourceRef] = Field(default_factory=list)
    error: dict[str, str] | None = None

    @classmethod
    def start(cls, run_id: str, backend: str, preset: str | None, names: dict[str, str]) -> RunProgress:
        steps = [StepRecord(name=s, stage=STEP_STAGE[s]) for s in STEP_ORDER]
        return cls(run_id=run_id, backend=backend, preset=preset, steps=steps, names=names)

    def step(self, name: str) -> StepRecord:
        return next(s for s in self.steps if s.name == name)

    def begin(self, name: str, now: datetime) -> None:
        record = self.step(name)
        record.status, record.started = "running", now.isoformat()
        self.stage, self.current_step = record.stage, name

    def finish(self, name: str, result: StepResult, now: datetime) -> None:
        record = self.step(name)
        record.ended = now.isoformat()
        if record.started:
            record.duration_s = round((now - datetime.fromisoformat(record.started)).total_seconds(), 3)
        if not result.ok:
            record.status, record.error = "failed", result.error
        elif result.skipped:
            record.status, record.summary = "skipped", result.skipped
        else:
            record.status, record.summary = "succeeded", result.summary
        self.record_created(result.created)
        self.outputs.update(result.outputs)

    def record_created(self, refs: list[ResourceRef]) -> None:
        self.created.extend(r for r in refs if r not in self.created)

    def still_pending(self, name: str, note: str, created: list[ResourceRef] | None = None) -> None:
        """The step handed back; what it created before that is recorded now (the call that finishes
        the step finds it already there)."""
        self.record_created(created or [])
        record = self.step(name)
        record.checks = (record.checks or 0) + 1
        record.summary = f"waiting: {note}"

    def fail(self, name: str, message: str) -> None:
        self.status = "Failed"
        self.error = {"step": name, "message": message}
        for record in self.steps:
            if record.status == "running":
                record.status, record.error = "failed", message
