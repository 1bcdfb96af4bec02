"""Endpoint cleanup: delete the online endpoints this app created once they expire or go idle.

Idle endpoints cost money (a GPU instance bills every hour it exists), so a timer trigger runs
``run_cleanup`` on ``CLEANUP_SCHEDULE``. Only endpoints tagged ``managed-by`` this app are ever
looked at; an untagged endpoint is never touched. An endpoint goes when

- its ``expires-at`` tag (set from ``deployment.ttl_hours`` when the run made it) has passed, or
- it has not been used for ``ENDPOINT_IDLE_MINUTES``: last use as the backend records it (local: the
  scoring server's last answer; Azure: the newest minute with requests in Azure Monitor's
  RequestsPerMinute metric, which counts every caller), or its creation time if never used.
  Serverless endpoints report no per-endpoint use, so only their expiry applies.

Deletion order follows Azure ML's rules: traffic to 0, then each deployment, then the endpoint.
With ``CLEANUP_DELETE_MODELS`` the fine-tuned model versions those deployments served go too, once
no deployment anywhere in the workspace still serves them (Azure refuses to delete a model in use);
only versions this app registered are candidates, never catalog models.
``CLEANUP_DRY_RUN`` only reports. Every decision and action is logged; the summary is returned.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from time import monotonic

import azure.functions as func
from pydantic import BaseModel, Field

from activities.steps import MANAGED_BY
from backends.protocol import BackendError, EndpointState, MLBackend, NotFoundError, StillProvisioning
from settings import AppSettings

log = logging.getLogger("cleanup")


class CleanupDecision(BaseModel):
    endpoint: str
    kind: str
    action: str  # keep | delete | would-delete | deleting | failed | deferred
    reason: str
    deployments: list[str] = Field(default_factory=list)
    models_deleted: list[str] = Field(default_factory=list)  # "name:version"
    models_kept: list[str] = Field(default_factory=list)  # "name:version (why)"
    error: str | None = None


class CleanupSummary(BaseModel):
    started_at: str
    dry_run: bool
    idle_minutes: int
    seen: int  # every endpoint listed, including ones this app did not make
    managed: int  # those tagged managed-by this app
    decisions: list[CleanupDecision] = Field(default_factory=list)

    @property
    def deleted(self) -> list[str]:
        return [d.endpoint for d in self.decisions if d.action == "delete"]


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def deletion_reason(
    ep: EndpointState, backend: MLBackend, now: datetime, idle_minutes: int
) -> tuple[str | None, str]:
    """(why it should go, or None) and what was measured, for the log."""
    expires = _parse_time(ep.tags.get("expires-at"))
    if expires is not None and now >= expires:
        return f"expired at {expires:%Y-%m-%dT%H:%M:%SZ}", "expiry"
    expiry = f"expires {expires:%Y-%m-%dT%H:%M:%SZ}" if expires else "no expires-at tag"
    if ep.kind == "serverless":
        return None, f"{expiry}; serverless endpoints report no per-endpoint use"
    last_used = _parse_time(backend.endpoint_last_used(ep.name, idle_minutes))
    since = last_used or _parse_time(ep.created_at)
    if since is None:
        return None, f"{expiry}; neither last use nor creation time is known"
    what = "last used" if last_used else "created (never used)"
    idle = now - since
    if idle >= timedelta(minutes=idle_minutes):
        return (
            f"idle: {what} {since:%Y-%m-%dT%H:%M:%SZ}, "
            f"{int(idle.total_seconds() // 60)} min ≥ {idle_minutes}",
            "idle",
        )
    return None, f"{expiry}; {what} {since:%Y-%m-%dT%H:%M:%SZ}"


def delete_endpoint_and_deployments(
    backend: MLBackend, ep: EndpointState, deployments: list[str]
) -> list[str]:
    """Traffic to 0, each deployment, then the endpoint (a deployment with traffic cannot be deleted)."""
    if any(ep.traffic.get(name) for name in deployments):
        backend.set_traffic(ep.name, {name: 0 for name in deployments})
        log.info("cleanup endpoint=%s traffic set to 0", ep.name)
    for name in deployments:
        backend.delete_deployment(ep.name, name)
        log.info("cleanup endpoint=%s deleted deployment=%s", ep.name, name)
    backend.delete_endpoint(ep.name)
    log.info("cleanup deleted endpoint=%s", ep.name)
    return deployments


def models_in_use(backend: MLBackend) -> set[str]:
    """Every model reference a deployment of any endpoint serves now (this app's or not)."""
    refs: set[str] = set()
    for ep in backend.list_endpoints():
        if ep.kind == "serverless":
            continue
        try:
            refs |= {d.model for d in backend.list_deployments(ep.name) if d.model}
        except NotFoundError:
            continue  # deleted meanwhile
    return refs


def delete_unused_models(backend: MLBackend, served: list[str], decision: CleanupDecision) -> None:
    """Delete the managed model versions ``served`` by a deleted endpoint that nothing serves any more.

    A version another deployment names the same way is kept here; one it names otherwise (another
    spelling of the reference) is refused by the backend's delete, as Azure refuses a model in use.
    """
    candidates = {
        f"{m.name}:{m.version}": m for ref in served if (m := backend.managed_model(ref)) is not None
    }
    if not candidates:
        return
    in_use = models_in_use(backend)
    for label, model in candidates.items():
        if model.uri in in_use:
            decision.models_kept.append(f"{label} (another deployment serves it)")
            log.info("cleanup keep model=%s: another deployment serves it", label)
            continue
        try:
            backend.delete_model_version(model.name, model.version)
        except BackendError as exc:
            decision.models_kept.append(f"{label} ({exc})"[:300])
            log.warning("cleanup could not delete model=%s: %s", label, exc)
            continue
        decision.models_deleted.append(label)
        log.info("cleanup deleted model=%s", label)


def run_cleanup(
    backend: MLBackend,
    *,
    dry_run: bool,
    idle_minutes: int,
    now: datetime | None = None,
    delete_models: bool = False,
    budget_s: float | None = None,
) -> CleanupSummary:
    """One pass over the managed endpoints. Once ``budget_s`` is spent no further endpoint is started
    on: they are ``deferred`` to the next pass (an HTTP answer must come within Azure's 230 s, a timer
    run within the functionTimeout, and deleting one Azure endpoint may take a minute or more)."""
    until = None if budget_s is None else monotonic() + budget_s
    now = now or datetime.now(UTC)
    endpoints = backend.list_endpoints()
    managed = [ep for ep in endpoints if ep.tags.get("managed-by") == MANAGED_BY]
    summary = CleanupSummary(
        started_at=now.isoformat(),
        dry_run=dry_run,
        idle_minutes=idle_minutes,
        seen=len(endpoints),
        managed=len(managed),
    )
    for ep in managed:
        if until is not None and monotonic() >= until:
            summary.decisions.append(
                CleanupDecision(
                    endpoint=ep.name,
                    kind=ep.kind,
                    action="deferred",
                    reason="this pass's time was spent; the next pass looks at it",
                )
            )
            continue
        summary.decisions.append(_decide_and_act(backend, ep, now, idle_minutes, dry_run, delete_models))
    log.info(
        "cleanup done dry_run=%s seen=%d managed=%d deleted=%s",
        dry_run,
        summary.seen,
        summary.managed,
        ",".join(summary.deleted) or "-",
    )
    return summary


def _decide_and_act(
    backend: MLBackend,
    ep: EndpointState,
    now: datetime,
    idle_minutes: int,
    dry_run: bool,
    delete_models: bool = False,
) -> CleanupDecision:
    try:
        reason, measured = deletion_reason(ep, backend, now, idle_minutes)
        if reason is None:
            log.info("cleanup keep endpoint=%s (%s)", ep.name, measured)
            return CleanupDecision(endpoint=ep.name, kind=ep.kind, action="keep", reason=measured)
        if dry_run:
            log.info("cleanup would delete endpoint=%s (%s) [CLEANUP_DRY_RUN]", ep.name, reason)
            return CleanupDecision(endpoint=ep.name, kind=ep.kind, action="would-delete", reason=reason)
        log.info("cleanup deleting endpoint=%s (%s)", ep.name, reason)
        served = [] if ep.kind == "serverless" else backend.list_deployments(ep.name)
        deployments = delete_endpoint_and_deployments(backend, ep, [d.name for d in served])
        decision = CleanupDecision(
            endpoint=ep.name, kind=ep.kind, action="delete", reason=reason, deployments=deployments
        )
        if delete_models:
            delete_unused_models(backend, [d.model for d in served if d.model], decision)
        return decision
    except NotFoundError:
        return CleanupDecision(endpoint=ep.name, kind=ep.kind, action="delete", reason="already gone")
    except StillProvisioning as exc:  # a deletion Azure is still carrying out: the next tick finishes it
        log.info("cleanup endpoint=%s still deleting: %s", ep.name, exc)
        return CleanupDecision(
            endpoint=ep.name,
            kind=ep.kind,
            action="deleting",
            reason="still being deleted",
            error=str(exc)[:500],
        )
    except (BackendError, RuntimeError, OSError) as exc:
        # One endpoint's failure (a busy endpoint, a throttled call) must not stop the others; the
        # next tick tries again.
        log.warning("cleanup failed endpoint=%s: %s", ep.name, exc)
        return CleanupDecision(
            endpoint=ep.name, kind=ep.kind, action="failed", reason="error", error=str(exc)[:500]
        )


# The timer (and a manual trigger that returns the summary) -----------------------------------------
bp = func.Blueprint()
# Read when the app is indexed, like every binding expression; a changed app setting restarts the app.
SCHEDULE = AppSettings().cleanup_schedule


# Time a pass may spend starting on endpoints: the manual trigger answers over HTTP, which Azure's front
# end cuts at 230 s; the timer runs within host.json's 10-minute functionTimeout. An endpoint started
# just before the budget ends may still take a few minutes (each Azure call is watched for
# AZURE_SETUP_WAIT_SECONDS, then handed to the next pass).
HTTP_BUDGET_S = 120.0
TIMER_BUDGET_S = 420.0


def cleanup_now(dry_run: bool | None = None, budget_s: float = TIMER_BUDGET_S) -> CleanupSummary:
    from backends.factory import get_backend
    from settings import get_settings

    settings = get_settings()
    return run_cleanup(
        get_backend(),
        dry_run=settings.cleanup_dry_run if dry_run is None else dry_run,
        idle_minutes=settings.endpoint_idle_minutes,
        delete_models=settings.cleanup_delete_models,
        budget_s=budget_s,
    )


@bp.timer_trigger(schedule=SCHEDULE, arg_name="timer", run_on_startup=False, use_monitor=True)
def cleanup_endpoints(timer: func.TimerRequest) -> None:
    summary = cleanup_now()
    log.info("cleanup summary %s", summary.model_dump_json())


@bp.route(route="cleanup", methods=["POST"])
def cleanup_endpoints_now(req: func.HttpRequest) -> func.HttpResponse:
    """Run the cleanup by hand; ``?dry_run=true`` only reports. Answers with the summary."""
    flag = req.params.get("dry_run")
    if flag is not None and flag.lower() not in ("true", "false"):
        # Anything but "false" read as false would delete what a caller meant only to see (dry_run=1).
        error = f"dry_run must be true or false, not {flag[:100]!r}; leave it out for CLEANUP_DRY_RUN"
        return func.HttpResponse(json.dumps({"error": error}), status_code=400, mimetype="application/json")
    summary = cleanup_now(None if flag is None else flag.lower() == "true", budget_s=HTTP_BUDGET_S)
    return func.HttpResponse(summary.model_dump_json(), mimetype="application/json")
