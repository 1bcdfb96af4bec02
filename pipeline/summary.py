"""The run summary a person reads (``GET /api/runs/{id}``), built from the orchestration's status.

Durable custom status carries the steps and their outcomes; the monitor sub-orchestration's status
carries the live fine-tune job (or deployment) state; the backend adds the loss history on request.
Never contains a key: nothing it is built from holds one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

WAIT_STEPS = ("wait_for_finetune", "wait_for_deployment", "wait_for_base_deployment")


class RunSummary(BaseModel):
    run_id: str
    status: str  # Durable runtime status: Pending, Running, Completed, Failed, Terminated, ...
    created: str | None = None
    last_updated: str | None = None
    backend: str | None = None
    preset: str | None = None
    stage: str | None = None
    current_step: str | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)
    dataset: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    endpoint: dict[str, Any] | None = None
    smoke_test: dict[str, Any] | None = None
    flow_smoke: dict[str, Any] | None = None
    connection: dict[str, Any] | None = None
    published_flow: dict[str, Any] | None = None  # Azure: the chat flow in an Azure AI Foundry project
    evaluation: dict[str, Any] | None = None
    created_resources: list[dict[str, Any]] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    # With cleanup_on_failure: what a failed run's cleanup did, and what it could not finish.
    cleanup: dict[str, Any] | None = None


def _time(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


def build_summary(
    run_id: str,
    status: dict[str, Any],
    waits: dict[str, dict[str, Any]],
    job_live: dict[str, Any] | None = None,
) -> RunSummary:
    """``status``: the Durable status object (dict form); ``waits``: live monitor custom statuses."""
    progress = status.get("customStatus") or {}
    if status.get("runtimeStatus") == "Completed" and isinstance(status.get("output"), dict):
        progress = status["output"]
    outputs = progress.get("outputs", {})
    names = progress.get("names", {})
    summary = RunSummary(
        run_id=run_id,
        status=status.get("runtimeStatus") or "Unknown",
        created=_time(status.get("createdTime")),
        last_updated=_time(status.get("lastUpdatedTime")),
        backend=progress.get("backend"),
        preset=progress.get("preset"),
        stage=progress.get("stage"),
        current_step=progress.get("current_step"),
        steps=progress.get("steps", []),
        dataset=outputs.get("dataset"),
        model=outputs.get("model"),
        endpoint=outputs.get("endpoint"),
        smoke_test=outputs.get("smoke_test"),
        evaluation=outputs.get("evaluation"),
        flow_smoke=outputs.get("flow_smoke"),
        connection=outputs.get("connection"),
        published_flow=outputs.get("published_flow"),
        created_resources=progress.get("created", []),
        error=progress.get("error"),
        cleanup=outputs.get("cleanup"),
    )
    if summary.status in ("Running", "Pending"):
        _merge_live_waits(summary, waits)
    job = {"name": names.get("job"), **(outputs.get("wait_for_finetune") or {})}
    if "wait_for_finetune" in waits:
        job.update(waits["wait_for_finetune"])
    if job_live:
        job.update(job_live)
    if any(v is not None for k, v in job.items() if k != "name") or job_live:
        summary.job = job
    elif names.get("job"):
        summary.job = {"name": names["job"]}
    if summary.status == "Failed" and not summary.error:
        summary.error = {"step": summary.current_step, "message": status.get("output")}
    if summary.status == "Terminated":
        summary.error = {"step": summary.current_step, "message": f"canceled: {status.get('output')}"}
    return summary


def _merge_live_waits(summary: RunSummary, waits: dict[str, dict[str, Any]]) -> None:
    """While a wait step runs, its monitor knows the latest poll: show it on the step."""
    for step in summary.steps:
        live = waits.get(step.get("name"))
        if live and step.get("status") == "running":
            step["live"] = live
