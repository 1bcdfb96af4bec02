"""The run summary a person reads (``GET /api/runs/{id}``), built from the orchestration's status.

Durable custom status carries the steps and their outcomes (``status_view``: the run's progress cut to
what the summary shows, and to Durable's size limit); the monitor sub-orchestration's status carries
the live fine-tune job (or deployment) state; a completed run's output is its whole progress; the
backend adds the loss history on request. Never contains a key: nothing it is built from holds one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from pipeline.steps import STEP_ORDER, STEP_STAGE, RunProgress

WAIT_STEPS = ("wait_for_finetune", "wait_for_deployment", "wait_for_base_deployment")
# The step outputs a summary shows (the others are state the later steps read).
SHOWN_OUTPUTS = (
    "dataset",
    "model",
    "endpoint",
    "smoke_test",
    "evaluation",
    "flow_smoke",
    "connection",
    "published_flow",
    "cleanup",
    "wait_for_finetune",
)
# Durable refuses a custom status over 16 KB of UTF-16 JSON text, and the orchestration fails (the
# extension's SetCustomStatus throws: it counts whole KB, so 17 KB is the first refused). The view
# stays within 16 KB.
STATUS_BUDGET_BYTES = 16 * 1024
ERROR_CHARS = 2000  # of the failing step's error, when the view must be cut


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
    created_not_shown: int | None = None  # an abridged status lists the first 20 only
    error: dict[str, Any] | None = None
    # With cleanup_on_failure: what a failed run's cleanup did, and what it could not finish.
    cleanup: dict[str, Any] | None = None
    # True when the run's status had to be cut to fit Durable's 16 KB custom status (a running or
    # failed run with long step texts); a completed run's summary is always whole.
    abridged: bool = False


def utf16_bytes(value: Any) -> int:
    """The size Durable measures: the compact JSON text in UTF-16."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-16-le"))


def _cut(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def _cut_step_texts(limit: int) -> Callable[[dict], None]:
    def cut(view: dict) -> None:
        for step in view["steps"]:
            for field in ("summary", "error"):
                if step.get(field):
                    step[field] = _cut(step[field], limit)

    return cut


def _cut_error(view: dict) -> None:
    if view.get("error"):
        view["error"] = {**view["error"], "message": _cut(view["error"].get("message"), ERROR_CHARS)}


def _drop_dataset_files(view: dict) -> None:
    for field in ("train_file", "test_file"):
        (view["outputs"].get("dataset") or {}).pop(field, None)


def _keep_outputs(*names: str) -> Callable[[dict], None]:
    def keep(view: dict) -> None:
        view["outputs"] = {k: v for k, v in view["outputs"].items() if k in names}

    return keep


def _cut_created(view: dict) -> None:
    created = view["created"]
    if len(created) > 20:
        view["created"] = created[:20]
        view["created_not_shown"] = len(created) - 20


def _compact_steps(view: dict) -> None:
    """Each step without its stage (the summary puts it back) and with whole-second times."""
    for step in view["steps"]:
        step.pop("stage", None)
        for field in ("started", "ended"):
            if step.get(field):
                step[field] = step[field][:19] + step[field][26:] if "." in step[field] else step[field]


# Applied in order, each only while the view is still too big: the same facts in fewer characters
# first, then shorter texts, then fewer details.
_SHRINK: list[Callable[[dict], None]] = [
    _compact_steps,
    _cut_error,
    _drop_dataset_files,
    _cut_step_texts(200),
    _cut_step_texts(100),
    _keep_outputs("endpoint", "model", "smoke_test", "evaluation", "cleanup", "wait_for_finetune"),
    _cut_step_texts(40),
    _cut_created,
    _keep_outputs("cleanup"),
]


def status_view(progress: RunProgress, budget: int = STATUS_BUDGET_BYTES) -> dict[str, Any]:
    """The run's progress as Durable custom status: what the summary shows, under ``budget`` bytes.

    Deterministic (a function of the progress only), as the orchestrator needs. What had to be cut
    is marked ``abridged``; the completed run's summary is built from its output, which is whole.
    """
    full = progress.model_dump(mode="json", exclude_none=True)
    view = {**full, "outputs": {k: v for k, v in full.get("outputs", {}).items() if k in SHOWN_OUTPUTS}}
    for shrink in _SHRINK:
        if utf16_bytes(view) <= budget:
            return view
        view["abridged"] = True
        shrink(view)
    if utf16_bytes(view) <= budget:
        return view
    error = full.get("error")
    first = ("run_id", "backend", "preset", "status", "stage", "current_step")
    return {  # nothing else fits: what a person needs first
        **{k: full[k] for k in first if k in full},
        "steps": [{"name": step["name"], "status": step["status"]} for step in full["steps"]],
        "error": error and {**error, "message": _cut(error.get("message"), ERROR_CHARS)},
        "abridged": True,
    }


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
        steps=[
            {"name": s.get("name"), "stage": STEP_STAGE.get(s.get("name")), **s}
            # Before its first episode a run has no status yet: every step is still to come.
            for s in progress.get("steps") or [{"name": name, "status": "pending"} for name in STEP_ORDER]
        ],
        dataset=outputs.get("dataset"),
        model=outputs.get("model"),
        endpoint=outputs.get("endpoint"),
        smoke_test=outputs.get("smoke_test"),
        evaluation=outputs.get("evaluation"),
        flow_smoke=outputs.get("flow_smoke"),
        connection=outputs.get("connection"),
        published_flow=outputs.get("published_flow"),
        created_resources=progress.get("created", []),
        created_not_shown=progress.get("created_not_shown"),
        error=progress.get("error"),
        cleanup=outputs.get("cleanup"),
        abridged=bool(progress.get("abridged")),
    )
    # A wait instance ``<run>:<step>`` outlives its run: re-submitting a run id finds the previous
    # attempt's monitors. Only a wait this run has reached is its own.
    reached = {s["name"] for s in summary.steps if s.get("status") not in (None, "pending", "skipped")}
    waits = {step: live for step, live in waits.items() if step in reached}
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
    if summary.status in ENDED:
        _end_running_steps(summary)
    return summary


# Runtime statuses after which the orchestrator never runs again, so never publishes a step's end.
ENDED = ("Failed", "Terminated", "Canceled")


def _end_running_steps(summary: RunSummary) -> None:
    """A run terminated mid-step (or failed outside a step) left that step "running" in its status."""
    for step in summary.steps:
        if step.get("status") == "running":
            step["status"] = "failed"
            step["error"] = step.get("error") or (summary.error or {}).get("message") or summary.status


def _merge_live_waits(summary: RunSummary, waits: dict[str, dict[str, Any]]) -> None:
    """While a wait step runs, its monitor knows the latest poll: show it on the step."""
    for step in summary.steps:
        live = waits.get(step.get("name"))
        if live and step.get("status") == "running":
            step["live"] = live
