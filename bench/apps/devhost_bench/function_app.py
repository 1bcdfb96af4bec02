"""Orchestrations the devhost benchmark measures: empty activities, a wide fan-out, monitor loops."""

from datetime import timedelta

import azure.durable_functions as df
import azure.functions as func

from orchestrators.monitor import bp as monitor_bp

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(monitor_bp)  # the pipeline's real wait_until_done monitor
POLL_INTERVAL = timedelta(milliseconds=1)
_polls: dict[str, int] = {}


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


@app.activity_trigger(input_name="args")
def countdown_status(args: dict) -> dict:
    """A status check for wait_until_done: 'Running' until the poll count reaches ``total``."""
    _polls[args["key"]] = _polls.get(args["key"], 0) + 1
    done = _polls[args["key"]] >= args["total"]
    return {"done": done, "ok": True, "status": "Completed" if done else "Running", "detail": {}}
