"""Orchestrations the devhost benchmark measures: empty activities, a wide fan-out, monitor loops."""

from datetime import timedelta

import azure.durable_functions as df
import azure.functions as func

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
POLL_INTERVAL = timedelta(milliseconds=1)


@app.activity_trigger(input_name="value")
def noop(value):
    return value


@app.orchestration_trigger(context_name="context")
def chain(context: df.DurableOrchestrationContext):
    for i in range(context.get_input()):
        yield context.call_activity("noop", i)
    return "done"


@app.orchestration_trigger(context_name="context")
def fan_out(context: df.DurableOrchestrationContext):
    results = yield context.task_all([context.call_activity("noop", i) for i in range(context.get_input())])
    return len(results)


@app.orchestration_trigger(context_name="context")
def monitor_naive(context: df.DurableOrchestrationContext):
    """The monitor pattern as most samples write it: one ever-growing history."""
    polls = context.get_input()
    for i in range(polls):
        yield context.call_activity("noop", i)
        yield context.create_timer(context.current_utc_datetime + POLL_INTERVAL)
    return polls


@app.orchestration_trigger(context_name="context")
def monitor_continue_as_new(context: df.DurableOrchestrationContext):
    """The same loop, restarting its history every `per_generation` polls."""
    state = context.get_input()
    done, total, per_generation = state["done"], state["total"], state["per_generation"]
    for i in range(min(per_generation, total - done)):
        yield context.call_activity("noop", done + i)
        yield context.create_timer(context.current_utc_datetime + POLL_INTERVAL)
    done += min(per_generation, total - done)
    if done >= total:
        return done
    context.continue_as_new({"done": done, "total": total, "per_generation": per_generation})
