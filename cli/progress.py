"""Watch a run through the run API and show it: a progress bar per step, the training loss live."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

TERMINAL = ("Completed", "Failed", "Terminated", "Canceled")
ICONS = {"succeeded": "[green]✓[/]", "skipped": "[dim]–[/]", "failed": "[red]✗[/]", "running": "[yellow]…[/]"}


def _step_info(step: dict) -> tuple[str, int, int]:
    """(text, completed, total) for a step's bar."""
    live = step.get("live") or {}
    if step["status"] == "running" and live.get("total_steps"):
        loss = f" loss {live['train_loss']:.3f}" if live.get("train_loss") is not None else ""
        return (
            f"{live.get('status', '')} step {live.get('step', 0)}/{live['total_steps']}{loss}",
            int(live.get("step") or 0),
            int(live["total_steps"]),
        )
    if step["status"] == "running":
        return live.get("status") or live.get("provisioning_state") or "", 0, 1
    text = step.get("summary") or step.get("error") or ""
    return text[:90], 1, 1


def _summaries(api: str, run_id: str, poll_seconds: float) -> Iterator[dict]:
    """The run's summary, once a poll, until (and including) the one that says it ended."""
    while True:
        r = requests.get(f"{api}/runs/{run_id}", timeout=30)
        r.raise_for_status()
        summary = r.json()
        yield summary
        if summary["status"] in TERMINAL:
            return
        time.sleep(poll_seconds)


def watch_run(api: str, run_id: str, console: Console, poll_seconds: float = 1.0) -> dict:
    if not console.is_terminal:
        return _watch_run_in_lines(api, run_id, console, poll_seconds)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<34}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    tasks: dict[str, int] = {}
    with Progress(*columns, console=console, transient=False) as progress:
        for summary in _summaries(api, run_id, poll_seconds):
            for step in summary.get("steps", []):
                if step["status"] == "pending":
                    continue
                info, done, total = _step_info(step)
                label = f"{ICONS.get(step['status'], '')} {step['stage']}: {step['name']}"
                if step["name"] not in tasks:
                    tasks[step["name"]] = progress.add_task(label, total=total, info=info)
                task = tasks[step["name"]]
                progress.update(task, description=label, total=total, completed=done, info=info)
                if step["status"] != "running":
                    progress.stop_task(task)
    return summary


def _watch_run_in_lines(api: str, run_id: str, console: Console, poll_seconds: float) -> dict:
    """Without a terminal (a pipe, a log file) a live display is drawn only once, when it stops: a line
    per step as it ends, and a running step's progress every tenth, say what the run is doing meanwhile."""
    reported: dict[str, object] = {}
    for summary in _summaries(api, run_id, poll_seconds):
        for step in summary.get("steps", []):
            if step["status"] == "pending":
                continue
            info, done, total = _step_info(step)
            mark = step["status"] if step["status"] != "running" else f"running {10 * done // total}"
            if reported.get(step["name"]) == mark or (step["status"] == "running" and not done):
                continue
            reported[step["name"]] = mark
            console.print(
                f"{ICONS.get(step['status'], '')} {step['stage']}: {step['name']}  {escape(info)}",
                overflow="ellipsis",
                no_wrap=True,
            )
    return summary


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"run {summary['run_id']}: {summary['status']}", show_lines=False)
    for col in ("stage", "step", "status", "seconds", "outcome"):
        table.add_column(col)
    for step in summary.get("steps", []):
        outcome = step.get("summary") or step.get("error") or ""
        seconds = f"{step['duration_s']:.1f}" if step.get("duration_s") is not None else ""
        table.add_row(step["stage"], step["name"], step["status"], seconds, outcome[:80])
    console.print(table)
    job, model, ep = summary.get("job") or {}, summary.get("model") or {}, summary.get("endpoint") or {}
    if job:
        console.print(
            f"fine-tune job [bold]{job.get('name')}[/]: {job.get('status')}, train loss "
            f"{job.get('train_loss')}, validation loss {job.get('eval_loss')}, log {job.get('link')}"
        )
    if model:
        console.print(f"model [bold]{model.get('name')}[/] version {model.get('version')}")
    if ep:
        where = (
            f"at {ep['scoring_uri']}"
            if ep.get("scoring_uri")
            else f"({ep.get('provisioning_state', 'pending')})"
        )
        console.print(f"endpoint [bold]{ep.get('name')}[/] {where} (expires {ep.get('expires_at')})")
    if summary.get("published_flow"):
        pub = summary["published_flow"]
        console.print(f"flow [bold]{pub.get('display_name')}[/] in Azure AI Foundry: {pub.get('portal_url')}")
    if summary.get("smoke_test"):
        st = summary["smoke_test"]
        console.print(f"smoke test: Q: {st['question']!r}\n            A: {st['answer']!r}")
    evaluation = summary.get("evaluation") or {}
    for name in ("base", "finetuned"):
        if name in evaluation:
            m = evaluation[name]
            console.print(
                f"evaluation ({name}): ROUGE-L {m.get('rouge_l')}  F1 {m.get('f1')}  "
                f"errors {m.get('errors')}/{m.get('rows')}  p50 {m.get('latency_ms_p50')} ms"
            )
    if summary.get("error"):
        console.print(f"[red]failed at {summary['error'].get('step')}: {summary['error'].get('message')}[/]")


def save_loss_curve(api: str, run_id: str, out: Path) -> Path | None:
    r = requests.get(f"{api}/runs/{run_id}", params={"metrics": "true"}, timeout=60)
    metrics = ((r.json().get("job") or {}).get("metrics") or {}) if r.ok else {}
    series = {k: v for k, v in metrics.items() if isinstance(v, list) and v}
    if not series:
        return None
    # Its config and font cache go beside the plot, not into ~/.config or ~/.cache.
    os.environ.setdefault("MPLCONFIGDIR", str(out.parent.parent / ".matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o" if len(points) < 30 else None,
            label=name.replace("_", " "),
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"fine-tune {run_id}")
    ax.legend()
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
