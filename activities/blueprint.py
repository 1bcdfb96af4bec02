"""The pipeline's activities as Durable activity functions: thin wrappers around ``activities.steps``.

Errors a person must act on (bad data, a config the backend refuses, an endpoint that answers 401)
come back as ``StepResult(ok=False)`` and are not retried; anything else raises, and the
orchestrator's retry policy retries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import azure.durable_functions as df
from pydantic import ValidationError

from activities import evaluate as evaluate_module
from activities import integrate, publish, steps
from backends.factory import get_backend
from backends.protocol import BackendError, MLBackend, StillProvisioning
from pipeline.chat_dataset import DatasetError
from pipeline.steps import StepResult

bp = df.Blueprint()
log = logging.getLogger("activities")


def _permanent_errors() -> tuple[type[Exception], ...]:
    from backends.scoring import ScoringError

    return BackendError, DatasetError, ScoringError, ValidationError


def _run(name: str, fn: Callable[[steps.StepInput, MLBackend], StepResult], payload: dict) -> dict:
    inp = steps.StepInput.model_validate(payload)
    started = time.perf_counter()
    try:
        result = fn(inp, get_backend())
    except StillProvisioning as exc:  # the orchestrator calls the step again after a durable timer
        result = StepResult(pending=str(exc), created=exc.created)
    except _permanent_errors() as exc:  # what the call made before it failed is recorded all the same
        result = StepResult(ok=False, error=str(exc), created=getattr(exc, "created", []))
    outcome = (
        "failed"
        if not result.ok
        else ("skipped" if result.skipped else "pending" if result.pending else "ok")
    )
    log.info(
        "step=%s run_id=%s outcome=%s duration_ms=%.0f",
        name,
        inp.run_id,
        outcome,
        (time.perf_counter() - started) * 1000,
    )
    if result.pending:
        log.info("step=%s run_id=%s still under way: %s", name, inp.run_id, result.pending)
    return result.model_dump(mode="json")


@bp.activity_trigger(input_name="payload")
def workspace(payload: dict) -> dict:
    return _run("workspace", steps.workspace, payload)


@bp.activity_trigger(input_name="payload")
def identity(payload: dict) -> dict:
    return _run("identity", steps.identity, payload)


@bp.activity_trigger(input_name="payload")
def role_assignments(payload: dict) -> dict:
    return _run("role_assignments", steps.role_assignments, payload)


@bp.activity_trigger(input_name="payload")
def quota(payload: dict) -> dict:
    return _run("quota", steps.quota, payload)


@bp.activity_trigger(input_name="payload")
def prepare_dataset(payload: dict) -> dict:
    return _run("prepare_dataset", steps.prepare_dataset_step, payload)


@bp.activity_trigger(input_name="payload")
def upload_data(payload: dict) -> dict:
    return _run("upload_data", steps.upload_data, payload)


@bp.activity_trigger(input_name="payload")
def compute(payload: dict) -> dict:
    return _run("compute", steps.compute, payload)


@bp.activity_trigger(input_name="payload")
@bp.durable_client_input(client_name="client")
async def submit_finetune(payload: dict, client: df.DurableOrchestrationClient) -> dict:
    """Submit the job; then, if the run was canceled while this ran, cancel the job it just made.

    Terminating an orchestration does not stop its running activity, and the cancel request found no
    job to cancel yet: without this the job would train (and bill) for hours after the cancel.
    """
    result = await asyncio.to_thread(_run, "submit_finetune", steps.submit_finetune, payload)
    run_id, job_name = payload["run_id"], payload["names"]["job"]
    status = await client.get_status(run_id)
    if status and status.runtime_status == df.OrchestrationRuntimeStatus.Terminated:
        job = await asyncio.to_thread(steps.cancel_job_if_running, job_name, get_backend())
        log.info("step=submit_finetune run_id=%s was canceled meanwhile: job %s is %s", run_id, job_name, job)
    return result


@bp.activity_trigger(input_name="payload")
def register_model(payload: dict) -> dict:
    return _run("register_model", steps.register_model, payload)


@bp.activity_trigger(input_name="payload")
def endpoint(payload: dict) -> dict:
    return _run("endpoint", steps.endpoint, payload)


@bp.activity_trigger(input_name="payload")
def deployment(payload: dict) -> dict:
    return _run("deployment", steps.deployment, payload)


@bp.activity_trigger(input_name="payload")
def traffic(payload: dict) -> dict:
    return _run("traffic", steps.traffic, payload)


@bp.activity_trigger(input_name="payload")
def smoke_test(payload: dict) -> dict:
    return _run("smoke_test", steps.smoke_test, payload)


@bp.activity_trigger(input_name="payload")
def promptflow_connection(payload: dict) -> dict:
    return _run("promptflow_connection", integrate.promptflow_connection, payload)


@bp.activity_trigger(input_name="payload")
def flow_smoke(payload: dict) -> dict:
    return _run("flow_smoke", integrate.flow_smoke, payload)


@bp.activity_trigger(input_name="payload")
def publish_flow(payload: dict) -> dict:
    return _run("publish_flow", publish.publish_flow, payload)


@bp.activity_trigger(input_name="payload")
def base_deployment(payload: dict) -> dict:
    return _run("base_deployment", evaluate_module.base_deployment, payload)


@bp.activity_trigger(input_name="payload")
def evaluate(payload: dict) -> dict:
    return _run("evaluate", evaluate_module.evaluate, payload)


@bp.activity_trigger(input_name="payload")
def remove_base_deployment(payload: dict) -> dict:
    return _run("remove_base_deployment", evaluate_module.remove_base_deployment, payload)


# Status checks polled by the monitor sub-orchestration: {"done", "ok", "status", "detail"}.
@bp.activity_trigger(input_name="args")
def job_status(args: dict) -> dict:
    return steps.job_status(args, get_backend())


@bp.activity_trigger(input_name="args")
def deployment_status(args: dict) -> dict:
    return steps.deployment_status(args, get_backend())


@bp.activity_trigger(input_name="payload")
def cleanup_run(payload: dict) -> dict:
    return steps.cleanup_run(payload, get_backend())
