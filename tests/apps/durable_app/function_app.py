"""A small Function App that exercises every Durable feature the devhost must honour.

Activities record each execution in ``$DEVHOST_TEST_LOG`` (one JSON line per run), so tests can
prove which activities ran and how often — across a killed and restarted host too.
"""

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import azure.durable_functions as df
import azure.functions as func

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


def _record(kind: str, **fields) -> None:
    path = os.environ.get("DEVHOST_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")


def _bump(key: str) -> int:
    """Attempt counter that survives a host restart (a file per key)."""
    folder = Path(os.environ.get("DEVHOST_TEST_COUNTERS", "/tmp/devhost-counters"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / key
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


# --- HTTP starter and plain HTTP routes -----------------------------------------------------------
@app.route(route="orchestrators/{name}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client) -> func.HttpResponse:
    body = req.get_body()
    payload = json.loads(body) if body else None
    instance_id = await client.start_new(req.route_params["name"], None, payload)
    return client.create_check_status_response(req, instance_id)


@app.route(route="events/{instance_id}/{event}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def http_raise(req: func.HttpRequest, client) -> func.HttpResponse:
    await client.raise_event(req.route_params["instance_id"], req.route_params["event"], req.get_json())
    return func.HttpResponse(status_code=202)


@app.route(route="items/{id:int}", methods=["GET"])
def item_by_id(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps({"id": int(req.route_params["id"]), "q": req.params.get("q")}), mimetype="application/json"
    )


@app.route(route="items/{name:alpha}/{detail?}", methods=["GET"])
def item_by_name(req: func.HttpRequest) -> str:
    return f"name={req.route_params['name']} detail={req.route_params.get('detail')}"


@app.route(route="files/{*path}", methods=["GET", "PUT"])
async def files(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(
            {"path": req.route_params.get("path"), "method": req.method, "body": req.get_body().decode()}
        ),
        status_code=201,
        headers={"X-Echo": req.headers.get("x-test", "")},
        mimetype="application/json",
    )


@app.route(route="boom")
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("kaboom")


# --- Activities -------------------------------------------------------------------------------------
@app.activity_trigger(input_name="name")
def say_hello(name: str) -> str:
    _record("say_hello", name=name)
    return f"Hello {name}!"


@app.activity_trigger(input_name="value")
def square(value: int) -> int:
    return value * value


@app.activity_trigger(input_name="args")
def flaky(args: dict) -> str:
    attempt = _bump(args["key"])
    _record("flaky", key=args["key"], attempt=attempt)
    if attempt <= args["failures"]:
        raise ConnectionError(f"transient failure {attempt}")
    return f"ok after {attempt}"


@app.activity_trigger(input_name="message")
def explode(message: str) -> str:
    raise ValueError(message)


@app.activity_trigger(input_name="args")
def slow_step(args: dict) -> str:
    _record("slow_step_start", step=args["step"])
    time.sleep(args.get("seconds", 1.0))
    _record("slow_step", step=args["step"])
    return f"step {args['step']} done"


@app.activity_trigger(input_name="payload")
async def async_echo(payload):
    return {"echo": payload}


# --- Orchestrators ----------------------------------------------------------------------------------
@app.orchestration_trigger(context_name="context")
def hello_chain(context: df.DurableOrchestrationContext):
    names = context.get_input() or ["Tokyo", "Seattle", "London"]
    results = []
    for name in names:
        results.append((yield context.call_activity("say_hello", name)))
    return results


@app.orchestration_trigger(context_name="context")
def fan_out(context: df.DurableOrchestrationContext):
    count = context.get_input()["count"]
    squares = yield context.task_all([context.call_activity("square", i) for i in range(count)])
    return {"count": len(squares), "sum": sum(squares)}


@app.orchestration_trigger(context_name="context")
def retrying(context: df.DurableOrchestrationContext):
    args = context.get_input()
    options = df.RetryOptions(
        first_retry_interval_in_milliseconds=200, max_number_of_attempts=args["attempts"]
    )
    try:
        result = yield context.call_activity_with_retry("flaky", options, args)
        return {"ok": True, "result": result}
    except Exception as exc:
        return {"ok": False, "error": str(exc).split("\n")[0]}


def _fast_retry(attempts: int) -> df.RetryOptions:
    return df.RetryOptions(first_retry_interval_in_milliseconds=100, max_number_of_attempts=attempts)


@app.orchestration_trigger(context_name="context")
def retrying_fan_out(context: df.DurableOrchestrationContext):
    """task_all of retried activities (``failures``) and retried sub-orchestrations (``child_failures``)."""
    args = context.get_input()
    options = _fast_retry(args["attempts"])
    tasks = [
        context.call_activity_with_retry("flaky", options, {"key": f"{args['key']}-a{i}", "failures": n})
        for i, n in enumerate(args.get("failures", []))
    ] + [
        context.call_sub_orchestrator_with_retry(
            "flaky_child", options, {"key": f"{args['key']}-c{i}", "failures": n}
        )
        for i, n in enumerate(args.get("child_failures", []))
    ]
    try:
        return {"ok": True, "results": (yield context.task_all(tasks))}
    except Exception as exc:
        return {"ok": False, "error": str(exc).split("\n")[0]}


@app.orchestration_trigger(context_name="context")
def flaky_child(context: df.DurableOrchestrationContext):
    """Fails (uncaught) while its ``flaky`` activity fails; a retrying parent starts one child per attempt."""
    return (yield context.call_activity("flaky", context.get_input()))


@app.orchestration_trigger(context_name="context")
def retrying_child(context: df.DurableOrchestrationContext):
    args = context.get_input()
    try:
        result = yield context.call_sub_orchestrator_with_retry(
            "flaky_child", _fast_retry(args["attempts"]), {"key": args["key"], "failures": args["failures"]}
        )
        return {"ok": True, "result": result}
    except Exception as exc:
        return {"ok": False, "error": str(exc).split("\n")[0]}


@app.orchestration_trigger(context_name="context")
def catches_failure(context: df.DurableOrchestrationContext):
    try:
        yield context.call_activity("explode", "bad input 42")
    except Exception as exc:
        return {"caught": str(exc)}
    return {"caught": None}


@app.orchestration_trigger(context_name="context")
def fails(context: df.DurableOrchestrationContext):
    yield context.call_activity("explode", "unrecoverable")
    return "unreachable"


@app.orchestration_trigger(context_name="context")
def timer_then_hello(context: df.DurableOrchestrationContext):
    seconds = context.get_input()["seconds"]
    start = context.current_utc_datetime
    yield context.create_timer(start + timedelta(seconds=seconds))
    greeting = yield context.call_activity("say_hello", "after timer")
    elapsed = (context.current_utc_datetime - start).total_seconds()
    return {"greeting": greeting, "elapsed": elapsed}


@app.orchestration_trigger(context_name="context")
def approval(context: df.DurableOrchestrationContext):
    timeout = context.get_input()["timeout"]
    context.set_custom_status({"stage": "waiting for approval"})
    deadline = context.current_utc_datetime + timedelta(seconds=timeout)
    timer = context.create_timer(deadline)
    event = context.wait_for_external_event("Approval")
    winner = yield context.task_any([event, timer])
    if winner == event:
        timer.cancel()
        payload = event.result
        context.set_custom_status({"stage": "approved"})
        return {"approved": True, "payload": payload}
    context.set_custom_status({"stage": "timed out"})
    return {"approved": False}


@app.orchestration_trigger(context_name="context")
def child_square(context: df.DurableOrchestrationContext):
    n = context.get_input()
    if n < 0:
        raise ValueError(f"negative input {n}")
    return (yield context.call_activity("square", n))


@app.orchestration_trigger(context_name="context")
def parent(context: df.DurableOrchestrationContext):
    values = context.get_input()
    results = []
    for v in values:
        try:
            results.append((yield context.call_sub_orchestrator("child_square", v)))
        except Exception as exc:
            results.append("failed: " + str(exc).split("\n")[0])
    return results


@app.orchestration_trigger(context_name="context")
def counter(context: df.DurableOrchestrationContext):
    state = context.get_input()
    n, limit = state["n"], state["limit"]
    context.set_custom_status({"n": n})
    if n >= limit:
        return {"final": n, "history_length": len(context.histories)}
    yield context.call_activity("square", n)
    context.continue_as_new({"n": n + 1, "limit": limit})


@app.orchestration_trigger(context_name="context")
def long_steps(context: df.DurableOrchestrationContext):
    args = context.get_input()
    done = []
    for step in range(args["steps"]):
        context.set_custom_status({"step": step})
        done.append((yield context.call_activity("slow_step", {"step": step, "seconds": args["seconds"]})))
    return done


@app.orchestration_trigger(context_name="context")
def growing_status(context: df.DurableOrchestrationContext):
    """Custom status of ``sizes`` characters in turn, an activity between each."""
    for size in context.get_input()["sizes"]:
        context.set_custom_status({"filler": "x" * size})
        yield context.call_activity("say_hello", str(size))
    return "done"


@app.orchestration_trigger(context_name="context")
def waits_forever(context: df.DurableOrchestrationContext):
    context.set_custom_status("waiting")
    yield context.wait_for_external_event("never")
    return "done"


@app.orchestration_trigger(context_name="context")
def async_activity(context: df.DurableOrchestrationContext):
    return (yield context.call_activity("async_echo", {"n": 1}))


@app.orchestration_trigger(context_name="context")
def calls_unknown(context: df.DurableOrchestrationContext):
    return (yield context.call_activity("no_such_activity", 1))


# --- Timer trigger ----------------------------------------------------------------------------------
@app.timer_trigger(
    schedule="%TEST_TIMER_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=False
)
def ticker(timer: func.TimerRequest) -> None:
    _record("tick", past_due=timer.past_due)


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", run_on_startup=False, use_monitor=True)
def yearly(timer: func.TimerRequest) -> None:
    _record("yearly", past_due=timer.past_due, schedule_status=timer.schedule_status)


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", run_on_startup=True, use_monitor=False)
def on_startup(timer: func.TimerRequest) -> None:
    _record("on_startup", past_due=timer.past_due)


@app.orchestration_trigger(context_name="context")
def nondeterministic(context: df.DurableOrchestrationContext):
    """Reads a file during replay (forbidden): the host must notice the replay changed course."""
    flag = Path(context.get_input()["flag_file"]).read_text().strip()
    yield context.call_activity("slow_step", {"step": flag, "seconds": 0.5})
    yield context.call_activity("say_hello", "end")
    return flag


# --- Management through the real DurableOrchestrationClient (tests/test_devhost_management.py) -----
@app.orchestration_trigger(context_name="context")
def history_probe(context: df.DurableOrchestrationContext):
    """One of each history row the status API folds or shows: activity, timer, external event."""
    greeting = yield context.call_activity("say_hello", context.get_input()["name"])
    yield context.create_timer(context.current_utc_datetime + timedelta(milliseconds=100))
    context.set_custom_status("waiting for Go")
    go = yield context.wait_for_external_event("Go")
    return {"greeting": greeting, "go": go}


def _client_status(status) -> dict:
    """What a DurableOrchestrationStatus object holds, as the client built it."""
    return {
        "truthy": bool(status),
        "instanceId": status.instance_id,
        "name": status.name,
        "runtimeStatus": status.runtime_status.value if status.runtime_status else None,
        "input": status.input_,
        "output": status.output,
        "customStatus": status.custom_status,
        "history": status.history,
        "historyEvents": getattr(status, "historyEvents", None),
    }


def _client_time(text):
    from datetime import datetime

    return datetime.fromisoformat(text) if text else None


def _client_statuses(names):
    return None if names is None else [df.OrchestrationRuntimeStatus(n) for n in names]


@app.route(route="client/{op}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def http_client_op(req: func.HttpRequest, client) -> func.HttpResponse:
    """Make one DurableOrchestrationClient call with the JSON body's arguments and answer with what
    it returned (``{"result": ...}``) or raised (``{"error": "<Type>: <message>"}``)."""
    a = req.get_json()
    op = req.route_params["op"]
    try:
        if op == "get_status":
            flags = (
                a.get("show_history", False),
                a.get("show_history_output", False),
                a.get("show_input", False),
            )
            result = _client_status(await client.get_status(a["id"], *flags))
        elif op == "get_status_all":
            result = [_client_status(s) for s in await client.get_status_all()]
        elif op == "get_status_by":
            found = await client.get_status_by(
                _client_time(a.get("from")),
                _client_time(a.get("to")),
                _client_statuses(a.get("runtime_status")),
                a.get("prefix"),
            )
            result = [_client_status(s) for s in found]
        elif op == "terminate":
            result = await client.terminate(a["id"], a["reason"])
        elif op == "raise_event":
            result = await client.raise_event(a["id"], a["name"], a.get("data"))
        elif op == "rewind":
            result = await client.rewind(a["id"], a["reason"])
        elif op == "purge":
            result = (await client.purge_instance_history(a["id"])).instances_deleted
        elif op == "purge_by":
            purged = await client.purge_instance_history_by(
                _client_time(a.get("from")),
                _client_time(a.get("to")),
                _client_statuses(a.get("runtime_status")),
            )
            result = purged.instances_deleted
        else:
            return func.HttpResponse(f"unknown client operation {op}", status_code=404)
    except Exception as exc:
        return func.HttpResponse(
            json.dumps({"error": f"{type(exc).__name__}: {exc}"}), mimetype="application/json"
        )
    return func.HttpResponse(json.dumps({"result": result}), mimetype="application/json")


@app.orchestration_trigger(context_name="context")
def decides_slowly(context: df.DurableOrchestrationContext):
    """Its first episode takes until the file ``gate`` exists (as one building a large input might), then
    schedules one step: a terminate asked for meanwhile has to wait for that episode."""
    gate = Path(context.get_input()["gate"])
    if not context.is_replaying:
        _record("deciding", instance=context.instance_id)
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    yield context.call_activity("slow_step", {"step": context.instance_id, "seconds": 0})
    return "done"


@app.orchestration_trigger(context_name="context")
def slow_episode(context: df.DurableOrchestrationContext):
    """Its first episode lasts until the file ``gate`` exists (it writes ``started`` first), so a test can
    act on the instance while an episode is under way."""
    args = context.get_input()
    if not context.is_replaying:
        Path(args["started"]).touch()
        deadline = time.monotonic() + 60
        while not Path(args["gate"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return (yield context.call_activity("say_hello", "gate"))
