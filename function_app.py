"""The Function App: the run API, the Durable pipeline and its activities.

Runs unchanged under Azure Functions (``func start`` / a deployed app) and under ``python -m devhost``.

    POST /api/finetune              start a run (body = run config; 202 + Durable check-status payload)
    GET  /api/runs                  list runs
    GET  /api/runs/{run_id}         the run summary (steps, job, model, endpoint; never a key)
    POST /api/runs/{run_id}/cancel  terminate the run and cancel its fine-tune job
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from datetime import UTC, datetime

import azure.durable_functions as df
import azure.functions as func
from pydantic import ValidationError

from activities.blueprint import bp as activities_bp
from bot.function_blueprint import bp as bot_bp
from orchestrators.finetune import PipelineInput, wait_instance_id
from orchestrators.finetune import bp as pipeline_bp
from orchestrators.instances import PIPELINE, pipeline_runs
from orchestrators.monitor import bp as monitor_bp
from pipeline.chat_validation import json_refusal
from pipeline.config import RUN_ID_PATTERN, InvalidRunConfig, parse_run_config
from pipeline.naming import RunNames
from pipeline.summary import WAIT_STEPS, build_summary
from settings import get_settings, writable_hf_home

with contextlib.suppress(ValidationError):  # (a bad setting is reported by the request that reads it)
    writable_hf_home(get_settings())  # before anything imports datasets or huggingface_hub

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(pipeline_bp)
app.register_functions(monitor_bp)
app.register_functions(activities_bp)
app.register_functions(bot_bp)

log = logging.getLogger("function_app")
ACTIVE = ("Running", "Pending", "ContinuedAsNew", "Suspended")


def _json(body, status: int = 200, headers: dict | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json", headers=headers
    )


def _new_run_id() -> str:
    return f"ft-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    settings = get_settings()
    return _json({"status": "ok", "backend": settings.backend})


def _body_error(message: str) -> func.HttpResponse:
    return _json({"errors": [{"field": "(body)", "message": message}]}, 400)


@app.route(route="finetune", methods=["POST"])
@app.durable_client_input(client_name="client")
async def start_finetune(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    try:
        body = json.loads(req.get_body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _body_error(f"not valid JSON: {exc}")
    except (RecursionError, ValueError) as exc:  # JSON Python will not read: too deep, a 4300+ digit number
        return _body_error(json_refusal(exc))
    settings = get_settings()
    try:
        cfg = parse_run_config(body, settings)
    except InvalidRunConfig as exc:
        return _json({"errors": [p.model_dump() for p in exc.problems]}, 400)
    run_id = cfg.run_id or _new_run_id()
    existing = await client.get_status(run_id)
    if existing and existing.runtime_status and existing.runtime_status.name in ACTIVE:
        return _json(
            {
                "errors": [
                    {
                        "field": "run_id",
                        "message": f"run {run_id} is still "
                        f"{existing.runtime_status.name}; cancel it or pick another run_id",
                    }
                ]
            },
            409,
        )
    await _terminate_waits(client, run_id, "its run was started again")
    names = RunNames.for_run(run_id, cfg)
    pipeline_input = PipelineInput(run_id=run_id, backend=settings.backend, config=cfg, names=vars(names))
    await client.start_new(PIPELINE, run_id, pipeline_input.model_dump(mode="json"))
    log.info("run started run_id=%s preset=%s backend=%s", run_id, cfg.preset, settings.backend)
    return client.create_check_status_response(req, run_id)


async def _run_status(client: df.DurableOrchestrationClient, run_id: str):
    """The run's Durable status, or None when ``run_id`` names no run.

    Only an id a run can have is looked up: the SDK puts the id into the management URL as it is, so
    a ``?``, ``#`` or ``..`` from the path would read another URL (another instance, the instance
    list), and instances that are not runs (a wait step ``<run>:<step>``, a bot delivery) are no runs.
    """
    if re.fullmatch(RUN_ID_PATTERN, run_id) is None:
        return None
    status = await client.get_status(run_id)
    if not status or (status.name or "").lower() != PIPELINE:
        return None
    return status


async def _wait_statuses(client: df.DurableOrchestrationClient, run_id: str) -> dict[str, dict]:
    waits = {}
    for step in WAIT_STEPS:
        status = await client.get_status(wait_instance_id(run_id, step))
        if status and status.runtime_status and status.custom_status:
            waits[step] = status.custom_status
    return waits


@app.route(route="runs/{run_id}", methods=["GET"])
@app.durable_client_input(client_name="client")
async def get_run(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    run_id = req.route_params["run_id"]
    status = await _run_status(client, run_id)
    if status is None:
        return _json({"error": f"no run with id '{run_id}'"}, 404)
    summary = build_summary(run_id, status.to_json(), await _wait_statuses(client, run_id))
    # Once the run is over its endpoint is what a person wants to call: its URI is read now, from the
    # backend (one read per request for a finished run; a running run shows the name only).
    if summary.status not in ACTIVE and summary.endpoint and summary.endpoint.get("name"):
        summary.endpoint.update(await _from_backend("the endpoint", _endpoint_now, summary.endpoint["name"]))
    # The job's status comes from its wait's last poll; a run that ended during (or at the deadline of)
    # that wait left the job running or being canceled: what it is now is read from the backend.
    if summary.status not in ACTIVE and _job_not_seen_ending(summary.job):
        summary.job.update(await _from_backend("the job", _job_now, summary.job["name"]))
    if req.params.get("metrics") == "true" and summary.job and summary.job.get("name"):
        summary.job["metrics"] = await _from_backend("the job's metrics", _job_metrics, summary.job["name"])
    return _json(summary.model_dump(exclude_none=True))


async def _from_backend(what: str, call, *args, then: str = "ask again") -> dict:
    """``call(*args)`` in a worker thread for at most HTTP_BACKEND_WAIT_SECONDS: an HTTP answer has to come
    within Azure's 230 s however long the backend takes (the call goes on; its answer is not waited for)."""
    from backends.protocol import BackendError

    settings = get_settings()
    wait = settings.http_backend_wait_seconds
    try:
        return await asyncio.wait_for(asyncio.to_thread(call, *args), wait)
    except BackendError as exc:  # a person's fix, in the backend's words
        return {"error": str(exc)}
    except TimeoutError:
        log.warning("%s: the %s backend gave no answer within %g s", what, settings.backend, wait)
        return {
            "error": f"the {settings.backend} backend did not answer for {what} within {wait:g} s "
            f"(HTTP_BACKEND_WAIT_SECONDS); {then}"
        }
    except Exception as exc:  # transient failures an activity would retry (network, 503): said, not a 500
        log.warning("%s: the %s backend failed", what, settings.backend, exc_info=True)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        return {
            "error": f"the {settings.backend} backend failed for {what}: {type(exc).__name__}: {first_line}"
        }


def _endpoint_now(name: str) -> dict:
    """The endpoint's scoring URI and state, read from the backend now (Durable history never holds it)."""
    from backends.factory import get_backend
    from backends.protocol import NotFoundError

    try:
        ep = get_backend().get_endpoint(name)
    except NotFoundError:
        return {"scoring_uri": None, "provisioning_state": "Deleted"}
    return {"scoring_uri": ep.scoring_uri, "provisioning_state": ep.provisioning_state}


def _job_not_seen_ending(job: dict | None) -> bool:
    from backends.protocol import JOB_TERMINAL

    return bool(job and job.get("name") and job.get("status") and job["status"] not in JOB_TERMINAL)


def _job_now(job_name: str) -> dict:
    """The job's state, read from the backend now."""
    from backends.factory import get_backend

    return get_backend().get_job(job_name).model_dump(exclude_none=True, exclude={"name"})


def _job_metrics(job_name: str) -> dict:
    from backends.factory import get_backend

    metrics = get_backend().get_job_metrics(job_name)
    return {key: [[p.step, p.value] for p in points] for key, points in metrics.items()}


@app.route(route="runs", methods=["GET"])
@app.durable_client_input(client_name="client")
async def list_runs(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    runs = []
    for status in await pipeline_runs(client):
        progress = status.custom_status if isinstance(status.custom_status, dict) else {}
        runs.append(
            {
                "run_id": status.instance_id,
                "status": status.runtime_status.name,
                "created": status.created_time,
                "last_updated": status.last_updated_time,
                "preset": progress.get("preset"),
                "current_step": progress.get("current_step"),
            }
        )
    runs.sort(key=lambda r: str(r["created"]), reverse=True)
    return _json({"runs": runs})


@app.route(route="runs/{run_id}/cancel", methods=["POST"])
@app.durable_client_input(client_name="client")
async def cancel_run(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    run_id = req.route_params["run_id"]
    status = await _run_status(client, run_id)
    if status is None:
        return _json({"error": f"no run with id '{run_id}'"}, 404)
    if status.runtime_status.name not in ACTIVE:
        return _json({"error": f"run {run_id} is already {status.runtime_status.name}"}, 409)
    await client.terminate(run_id, "canceled by user")
    # Azure queues the termination: an episode already running still commits what it scheduled (a wait's
    # monitor, a job submission). Look for children and the job once the run reads as ended.
    await _until_ended(client, run_id)
    await _terminate_waits(client, run_id, "run canceled")
    names = (status.custom_status or {}).get("names", {}) if isinstance(status.custom_status, dict) else {}
    job_name = names.get("job")
    job = None
    if job_name:
        then = f"the cancel goes on: GET /api/runs/{run_id} shows the job's status"
        job = {"name": job_name, **await _from_backend("the job's cancel", _cancel_job, job_name, then=then)}
    log.info("run canceled run_id=%s job=%s", run_id, job)
    return _json({"run_id": run_id, "status": "Terminated", "job": job}, 202)


CANCEL_WAIT_S = 20.0


async def _terminate_waits(client: df.DurableOrchestrationClient, run_id: str, reason: str) -> None:
    """Children are not terminated with their parent: a run ended through Durable's own terminate (the
    check-status payload's ``terminatePostUri``) leaves its wait polling until its deadline, and a run
    started again under its id could not start that wait (its instance id is taken)."""
    for step in WAIT_STEPS:
        child = await client.get_status(wait_instance_id(run_id, step))
        if child and child.runtime_status and child.runtime_status.name in ACTIVE:
            await client.terminate(wait_instance_id(run_id, step), reason)


async def _until_ended(client: df.DurableOrchestrationClient, run_id: str) -> None:
    deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        status = await client.get_status(run_id)
        if not status or not status.runtime_status or status.runtime_status.name not in ACTIVE:
            return
        await asyncio.sleep(0.5)
    log.warning("run %s still reads as active %.0f s after its termination", run_id, CANCEL_WAIT_S)


def _cancel_job(job_name: str) -> dict:
    """The job canceled (a submission still under way cancels its own job: activities.blueprint)."""
    from activities.steps import cancel_job_if_running
    from backends.factory import get_backend

    return {"status": cancel_job_if_running(job_name, get_backend())}


from pipeline.cleanup import bp as cleanup_bp  # noqa: E402  (the endpoint cleanup timer + POST /api/cleanup)

app.register_functions(cleanup_bp)
