"""The fine-tune pipeline, as one orchestrator that reads like the tutorial's table of contents.

Orchestrators only decide: every side effect is an activity (``activities/steps.py``), inputs and
outputs are small JSON documents, and progress is published as custom status after each step.
"""

from __future__ import annotations

from datetime import timedelta

import azure.durable_functions as df
from pydantic import BaseModel

from backends.protocol import ResourceRef
from pipeline.config import RunConfig
from pipeline.steps import RunProgress, StepResult
from pipeline.summary import status_view

bp = df.Blueprint()

# Transient failures (network, throttling, a busy host) are retried; permanent ones come back as
# StepResult(ok=False) and are not.
STEP_RETRY = df.RetryOptions(first_retry_interval_in_milliseconds=5000, max_number_of_attempts=3)


class PipelineInput(BaseModel):
    run_id: str
    backend: str
    config: RunConfig
    names: dict[str, str]


class StepFailed(Exception):
    def __init__(self, step: str, message: str):
        super().__init__(f"step '{step}' failed: {message}")
        self.step, self.message = step, message


def wait_instance_id(run_id: str, step: str) -> str:
    """The monitor sub-orchestration of a wait step (the runs API reads its live status)."""
    return f"{run_id}:{step}"


class PipelineRun:
    """Runs steps in order and keeps the run's progress (deterministic: rebuilt on every replay)."""

    def __init__(self, context: df.DurableOrchestrationContext, run: PipelineInput):
        self.context, self.run = context, run
        self.progress = RunProgress.start(run.run_id, run.backend, run.config.preset, run.names)
        self.publish()

    def publish(self) -> None:
        self.context.set_custom_status(status_view(self.progress))

    def payload(self) -> dict:
        return {
            "run_id": self.run.run_id,
            "config": self.run.config.model_dump(mode="json"),
            "names": self.run.names,
            "state": self.progress.outputs,
        }

    def step(self, name: str):
        polling = self.run.config.polling
        started = self.context.current_utc_datetime
        deadline = started + timedelta(hours=polling.timeout_hours)
        interval = polling.initial_seconds
        self.progress.begin(name, started)
        self.publish()
        while True:
            try:
                raw = yield self.context.call_activity_with_retry(name, STEP_RETRY, self.payload())
                result = StepResult.model_validate(raw)
            except Exception as exc:  # retries exhausted: the activity's own error text
                result = StepResult(ok=False, error=_activity_error(exc))
            if not result.pending:
                break
            # Still provisioning: wait on a durable timer, then call the (idempotent) step again.
            now = self.context.current_utc_datetime
            if now >= deadline:
                result = StepResult(
                    ok=False,
                    error=f"still under way after {polling.timeout_hours} h: {result.pending}",
                    created=result.created,
                )
                break
            self.progress.still_pending(name, result.pending, result.created)
            self.publish()
            yield self.context.create_timer(now + timedelta(seconds=interval))
            interval = min(interval * polling.backoff, polling.max_seconds)
        self.progress.finish(name, result, self.context.current_utc_datetime)
        self.publish()
        if not result.ok:
            raise StepFailed(name, result.error or "failed")
        return result

    def cleanup(self, refs: list[dict]):
        """cleanup_run until nothing is pending (deletions under way are waited on with durable timers).

        Never raises: the run has already failed, and that failure is what it reports; a cleanup that
        cannot finish says so in its own record.
        """
        polling = self.run.config.polling
        deadline = self.context.current_utc_datetime + CLEANUP_TIMEOUT
        interval = polling.initial_seconds
        actions: list[str] = []
        failed: list[str] = []
        under_way = False
        while True:
            try:
                result = yield self.context.call_activity_with_retry(
                    "cleanup_run", STEP_RETRY, self.payload() | {"created": refs, "under_way": under_way}
                )
            except Exception as exc:  # retries exhausted
                return {"actions": actions, "error": _activity_error(exc), "left": refs} | _failed(failed)
            actions += result.get("actions", [])
            failed += result.get("failed", [])
            refs, under_way = result.get("pending") or [], True
            if not refs:
                return {"actions": actions} | _failed(failed)
            now = self.context.current_utc_datetime
            if now >= deadline:
                left = {"actions": actions, "error": "deletions still under way after 2 h", "left": refs}
                return left | _failed(failed)
            self.progress.outputs["cleanup"] = {"actions": actions, "pending": refs} | _failed(failed)
            self.publish()
            yield self.context.create_timer(now + timedelta(seconds=interval))
            interval = min(interval * polling.backoff, polling.max_seconds)

    def skip(self, name: str, reason: str) -> None:
        now = self.context.current_utc_datetime
        self.progress.begin(name, now)
        self.progress.finish(name, StepResult(skipped=reason), now)
        self.publish()

    def wait(self, name: str, check: str, args: dict):
        """Wait on a long operation in a monitor sub-orchestration with durable timers."""
        polling = self.run.config.polling
        now = self.context.current_utc_datetime
        self.progress.begin(name, now)
        self.publish()
        monitor_input = {
            "check": check,
            "args": args,
            "interval_seconds": polling.initial_seconds,
            "max_seconds": polling.max_seconds,
            "backoff": polling.backoff,
            "deadline": (now + timedelta(hours=polling.timeout_hours)).isoformat(),
        }
        try:
            final = yield self.context.call_sub_orchestrator(
                "wait_until_done", monitor_input, wait_instance_id(self.run.run_id, name)
            )
            detail = final.get("detail") or {}
            ok = bool(final.get("ok"))
            summary = f"{final['status']} after {final['polls']} polls"
            result = StepResult(
                ok=ok,
                summary=summary,
                outputs={name: {"status": final["status"], **detail}},
                error=None if ok else detail.get("error") or f"ended {final['status']}",
            )
        except Exception as exc:
            result = StepResult(ok=False, error=_activity_error(exc))
        self.progress.finish(name, result, self.context.current_utc_datetime)
        self.publish()
        if not result.ok:
            raise StepFailed(name, result.error or "failed")
        return result


# What a step creates under the run's own names. When such a step fails, its result (the record of what
# it made) never comes back, yet the thing may exist: a job submitted before a later call failed, an
# endpoint created that never became ready. Cleanup deletes these too, if they exist.
CREATES_UNDER_RUN_NAMES = {"submit_finetune": "job", "endpoint": "endpoint"}
CLEANUP_TIMEOUT = timedelta(hours=2)


def cleanup_refs(created: list[ResourceRef], failed_step: str, names: dict[str, str]) -> list[dict]:
    refs = list(created)
    kind = CREATES_UNDER_RUN_NAMES.get(failed_step)
    if kind and names.get(kind):
        attempted = ResourceRef(kind=kind, name=names[kind])
        if attempted not in refs:
            refs.append(attempted)
    return [ref.model_dump() for ref in refs]


def _failed(failed: list[str]) -> dict:
    return {"failed": failed} if failed else {}


def _activity_error(exc: Exception) -> str:
    """Durable hands the orchestrator ``"<Reason> \\n <Details>"``; the reason is what a person needs."""
    text = str(exc).split("\n")[0].strip()
    return text[:1000]


@bp.orchestration_trigger(context_name="context")
def finetune_pipeline(context: df.DurableOrchestrationContext):
    run = PipelineInput.model_validate(context.get_input())
    pipeline = PipelineRun(context, run)
    progress = pipeline.progress
    try:
        # 1. Setup: workspace, identity and its role assignments, GPU quota.
        for step in ("workspace", "identity", "role_assignments", "quota"):
            yield from pipeline.step(step)
        # 2. Data: prepare and validate the chat dataset, then upload it.
        yield from pipeline.step("prepare_dataset")
        yield from pipeline.step("upload_data")
        # 3. Fine-tune: compute, submit the job, wait for it on durable timers.
        yield from pipeline.step("compute")
        yield from pipeline.step("submit_finetune")
        yield from pipeline.wait("wait_for_finetune", "job_status", {"job_name": run.names["job"]})
        # 4. Deploy: register the model, create the endpoint and deployment, then route traffic.
        yield from pipeline.step("register_model")
        yield from pipeline.step("endpoint")
        yield from pipeline.step("deployment")
        yield from pipeline.wait(
            "wait_for_deployment",
            "deployment_status",
            {"endpoint": run.names["endpoint"], "deployment": run.names["deployment"]},
        )
        yield from pipeline.step("traffic")
        # 5. Integrate: the Prompt flow connection; the endpoint and the flow answer; on Azure the flow
        #    goes to an Azure AI Foundry project to chat with in the portal.
        yield from pipeline.step("promptflow_connection")
        yield from pipeline.step("smoke_test")
        yield from pipeline.step("flow_smoke")
        yield from pipeline.step("publish_flow")
        # 6. Evaluate on held-out conversations, base model vs fine-tuned.
        base = yield from pipeline.step("base_deployment")
        if base.skipped:
            pipeline.skip("wait_for_base_deployment", base.skipped)
        else:
            yield from pipeline.wait(
                "wait_for_base_deployment",
                "deployment_status",
                {"endpoint": run.names["endpoint"], "deployment": "base"},
            )
        yield from pipeline.step("evaluate")
        if base.skipped:
            pipeline.skip("remove_base_deployment", base.skipped)
        else:
            yield from pipeline.step("remove_base_deployment")
    except StepFailed as failure:
        progress.fail(failure.step, failure.message)
        pipeline.publish()
        refs = cleanup_refs(progress.created, failure.step, run.names)
        if run.config.cleanup_on_failure and refs:
            progress.outputs["cleanup"] = yield from pipeline.cleanup(refs)
            pipeline.publish()
        raise
    progress.status, progress.stage, progress.current_step = "Completed", None, None
    pipeline.publish()
    return progress.model_dump(mode="json", exclude_none=True)
