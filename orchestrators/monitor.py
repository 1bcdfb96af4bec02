"""Wait for a long operation (a fine-tune job, a deployment) with durable timers.

A sub-orchestration polls a status activity, sleeps on a durable timer whose interval grows by
``backoff`` up to ``max_seconds``, and continues-as-new every ``per_generation`` polls so its
history — and the cost of replaying it — stays flat over thousands of polls. The parent makes a
single ``call_sub_orchestrator`` and gets the final status back.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import azure.durable_functions as df
from pydantic import BaseModel, Field

bp = df.Blueprint()

POLL_RETRY = df.RetryOptions(first_retry_interval_in_milliseconds=5000, max_number_of_attempts=3)
# Durable refuses a custom status over 16 KB (the orchestration fails): a poll's texts (an Azure
# provisioning error can be long) are cut there; the result keeps them whole.
STATUS_TEXT_CHARS = 2000


class MonitorState(BaseModel):
    """The monitor's input; it carries its own progress across continue-as-new generations."""

    check: str  # the status activity to call
    args: dict
    interval_seconds: float
    max_seconds: float
    backoff: float = 1.5
    deadline: str  # ISO time after which the wait gives up
    per_generation: int = Field(20, ge=1)
    polls: int = 0
    last: dict | None = None


class PollResult(BaseModel):
    """What a status activity returns."""

    done: bool
    ok: bool = True
    status: str
    detail: dict = Field(default_factory=dict)


def live_status(polls: int, result: PollResult) -> dict:
    detail = {k: v[:STATUS_TEXT_CHARS] if isinstance(v, str) else v for k, v in result.detail.items()}
    return {"polls": polls, "status": result.status[:STATUS_TEXT_CHARS], **detail}


@bp.orchestration_trigger(context_name="context")
def wait_until_done(context: df.DurableOrchestrationContext):
    state = MonitorState.model_validate(context.get_input())
    deadline = datetime.fromisoformat(state.deadline)
    for _ in range(state.per_generation):
        raw = yield context.call_activity_with_retry(state.check, POLL_RETRY, state.args)
        result = PollResult.model_validate(raw)
        state.polls += 1
        state.last = result.model_dump()
        context.set_custom_status(live_status(state.polls, result))
        if result.done:
            return {**state.last, "polls": state.polls}
        if context.current_utc_datetime >= deadline:
            # The parent reports ``detail["error"]`` as the wait step's error: it says why, not "TimedOut".
            gave_up = f"gave up waiting at {state.deadline}: still {result.status} after {state.polls} polls"
            last_error = result.detail.get("error")
            return {
                "done": True,
                "ok": False,
                "status": "TimedOut",
                "polls": state.polls,
                "detail": {**result.detail, "error": f"{gave_up}; {last_error}" if last_error else gave_up},
            }
        wake = min(context.current_utc_datetime + timedelta(seconds=state.interval_seconds), deadline)
        yield context.create_timer(wake)
        state.interval_seconds = min(state.interval_seconds * state.backoff, state.max_seconds)
    context.continue_as_new(state.model_dump())
