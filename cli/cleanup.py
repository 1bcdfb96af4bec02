"""What ``run`` does on the way out, however it ends (done, failed, Ctrl-C): leave nothing running.

An interrupt can land in any step, so the last summary the progress view saw is not trusted: the run
is read again, canceled when unfinished, the devhost this CLI started is stopped (it lets an activity
in flight finish first, so no endpoint server appears after we looked), and then the fine-tune job
and the endpoint are stopped through the backend by the run's deterministic names. The endpoint
name is only in the summary once its step has finished, and the scoring server runs in its own
session, so an interrupt during deployment would otherwise leave it serving.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from rich.console import Console

from backends.protocol import BackendError, NotFoundError
from pipeline.config import InvalidRunConfig, parse_run_config
from pipeline.naming import RunNames
from settings import get_settings

from .devhost_process import ManagedDevhost

TERMINAL = ("Completed", "Failed", "Terminated", "Canceled")
NOT_FOUND = "NotFound"  # the run API never heard of the run (e.g. Ctrl-C before it was accepted)
UNKNOWN = "Unknown"  # the run API did not answer
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class RunResources:
    """What a run may have left running, by name."""

    job: str | None
    endpoint: str | None

    @classmethod
    def of(cls, run_id: str, body: dict[str, Any], summary: dict[str, Any]) -> RunResources:
        names = _deterministic_names(run_id, body)
        job = (summary.get("job") or {}).get("name") or (names.job if names else None)
        endpoint = (summary.get("endpoint") or {}).get("name") or (names.endpoint if names else None)
        return cls(job=job, endpoint=endpoint)


def _deterministic_names(run_id: str, body: dict[str, Any]) -> RunNames | None:
    """The names the pipeline gives this run's resources (the same function the run API uses)."""
    try:
        return RunNames.for_run(run_id, parse_run_config({**body, "run_id": run_id}, get_settings()))
    except InvalidRunConfig:
        return None  # the run API refused it too: nothing was created


def leave_nothing_running(
    api: str,
    run_id: str | None,
    body: dict[str, Any],
    *,
    host: ManagedDevhost | None,
    keep_endpoint: bool,
    console: Console,
) -> None:
    """``host``: the devhost this CLI started (None when it found one already serving)."""
    # A second Ctrl-C (or kill) must not stop the cleanup half-way and strand what the first was stopping.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *ENDING_SIGNALS)}
    try:
        summary = _read_run(api, run_id, console) if run_id else {"status": NOT_FOUND}
        if run_id and summary["status"] not in (*TERMINAL, NOT_FOUND):
            _cancel_run(api, run_id, console)
        if host is not None:
            host.stop()
            console.print("devhost stopped")
        if run_id and summary["status"] != NOT_FOUND:
            resources = RunResources.of(run_id, body, summary)
            # A devhost found serving may keep its state elsewhere: then its endpoint is not ours to see.
            elsewhere = host is None and bool((summary.get("endpoint") or {}).get("name"))
            _stop_resources(resources, summary["status"], keep_endpoint, console, elsewhere=elsewhere)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def ending_signals_interrupt() -> Iterator[None]:
    """Within it a closed terminal (SIGHUP) or ``kill``/``timeout`` (SIGTERM) ends the CLI as Ctrl-C does,
    through the same cleanup. By default they end it at once, and the devhost (in its own session, so the
    signal does not reach it), the run and the servers it started would go on."""

    def interrupt(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            _leave_the_terminal()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in ENDING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _leave_the_terminal() -> None:
    """After a hang-up, writing to the terminal fails (EIO) and would stop the cleanup half-way."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if os.isatty(fd):
            os.dup2(devnull, fd)
    os.close(devnull)


def _read_run(api: str, run_id: str, console: Console) -> dict[str, Any]:
    """The run summary now; its ``status`` is NOT_FOUND or UNKNOWN when the run API cannot say."""
    try:
        r = requests.get(f"{api}/runs/{run_id}", timeout=30)
    except requests.RequestException as exc:
        console.print(f"[yellow]the run API did not answer ({exc}); stopping run {run_id}'s resources[/]")
        return {"status": UNKNOWN}
    if r.status_code == 404:
        return {"status": NOT_FOUND}
    if not r.ok:
        console.print(f"[yellow]reading run {run_id} failed: {r.status_code} {r.text[:200]}[/]")
        return {"status": UNKNOWN}
    return r.json()


def _cancel_run(api: str, run_id: str, console: Console) -> None:
    try:
        r = requests.post(f"{api}/runs/{run_id}/cancel", timeout=120)
    except requests.RequestException as exc:
        console.print(f"[yellow]canceling run {run_id} through the run API failed: {exc}[/]")
        return
    if r.status_code == 202:
        job = r.json().get("job") or {}
        console.print(f"canceled run {run_id} (fine-tune job {job.get('name')}: {job.get('status')})")
    elif r.status_code != 409:  # 409: it finished meanwhile
        console.print(f"[yellow]canceling run {run_id} failed: {r.status_code} {r.text[:200]}[/]")


def _stop_resources(
    resources: RunResources, status: str, keep: bool, console: Console, *, elsewhere: bool = False
) -> None:
    """``elsewhere``: the run was served by a devhost this CLI did not start and reported an endpoint."""
    from .chat import client_backend

    backend = client_backend()
    if resources.job and status != "Completed":
        _cancel_job(backend, resources.job, console)
    if not resources.endpoint:
        return
    if keep:
        console.print(f"kept endpoint {resources.endpoint} (--keep)")
        return
    try:
        backend.get_endpoint(resources.endpoint)
    except NotFoundError:
        if elsewhere:  # e.g. a devhost of another checkout, or one with another PHI3_STATE_DIR
            console.print(
                f"endpoint {resources.endpoint} is not in {get_settings().state_dir}: the devhost that "
                "served the run keeps its state elsewhere; if the endpoint still serves, delete it there",
                style="yellow",
                markup=False,
            )
        return  # else the run never got that far
    except BackendError as exc:
        console.print(f"[red]could not look up endpoint {resources.endpoint}: {exc}[/]")
        return
    try:
        backend.delete_endpoint(resources.endpoint)
    except BackendError as exc:
        console.print(f"[red]endpoint {resources.endpoint} is still running; deleting it failed: {exc}[/]")
        return
    console.print(f"deleted endpoint {resources.endpoint} (pass --keep to keep it)")


def _cancel_job(backend, job_name: str, console: Console) -> None:
    """The run API cancels the job too, but a submission in flight when it did lands afterwards."""
    try:
        job = backend.get_job(job_name)
        if not job.is_terminal:
            job = backend.cancel_job(job_name)
            console.print(f"canceled fine-tune job {job_name}: {job.status}")
    except NotFoundError:
        return  # never submitted
    except BackendError as exc:
        console.print(f"[red]could not cancel fine-tune job {job_name}: {exc}[/]")
