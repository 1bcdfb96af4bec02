"""A Function App that shows how the devhost calls functions: which thread, which loop, in what order.

Functions report where they ran (thread, whether an event loop is running there), so tests can tell
the host's loop from its thread pool. The slow timer writes one JSON line per run start and end to
``$HOST_TEST_LOG``, so tests can check that runs never overlap.
"""

import asyncio
import json
import os
import threading
import time
import uuid

import azure.durable_functions as df
import azure.functions as func

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)

_hold_entered = threading.Event()
_hold_released = threading.Event()


def _where() -> dict:
    try:
        asyncio.get_running_loop()
        has_loop = True
    except RuntimeError:
        has_loop = False
    thread = threading.current_thread()
    return {
        "thread": thread.name,
        "ident": thread.ident,
        "main_thread": thread is threading.main_thread(),
        "has_loop": has_loop,
    }


def _record(kind: str, **fields) -> None:
    with open(os.environ["HOST_TEST_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")


# --- Where do functions run? --------------------------------------------------------------------
@app.route(route="where/sync", methods=["GET"])
def where_sync(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(_where()), mimetype="application/json")


@app.route(route="where/async", methods=["GET"])
async def where_async(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(_where()), mimetype="application/json")


@app.route(route="hold", methods=["GET"])
def hold(req: func.HttpRequest) -> str:
    """Blocks its thread until ``release`` is called: on the host's loop it would block every request."""
    _hold_released.clear()
    _hold_entered.set()
    released = _hold_released.wait(timeout=float(req.params.get("timeout", "10")))
    _hold_entered.clear()
    return "released" if released else "timed out"


@app.route(route="slow_async", methods=["GET"])
async def slow_async(req: func.HttpRequest) -> str:
    """Sleeps on the host's loop, then records that it finished (whoever is still waiting for it)."""
    await asyncio.sleep(float(req.params.get("seconds", "1")))
    _record("slow_async", label=req.params.get("label", ""))
    return "done"


@app.route(route="release", methods=["POST"])
async def release(req: func.HttpRequest) -> str:
    if not _hold_entered.is_set():
        return "nobody is holding"
    _hold_released.set()
    return "released"


@app.activity_trigger(input_name="label")
def where_sync_activity(label: str) -> dict:
    return {"label": label, **_where()}


@app.activity_trigger(input_name="label")
async def where_async_activity(label: str) -> dict:
    return {"label": label, **_where()}


@app.orchestration_trigger(context_name="context")
def where_activities(context: df.DurableOrchestrationContext):
    sync = yield context.call_activity("where_sync_activity", "sync")
    async_ = yield context.call_activity("where_async_activity", "async")
    return {"sync": sync, "async": async_}


@app.route(route="orchestrators/{name}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client) -> func.HttpResponse:
    body = req.get_body()
    instance_id = await client.start_new(req.route_params["name"], None, json.loads(body) if body else None)
    return client.create_check_status_response(req, instance_id)


# --- Routes that share a prefix but never the same path ---------------------------------------------
@app.route(route="kinds/{n:int}", methods=["GET"])
def kind_number(req: func.HttpRequest) -> str:
    return f"number {req.route_params['n']}"


@app.route(route="kinds/{word:alpha}", methods=["GET"])
def kind_word(req: func.HttpRequest) -> str:
    return f"word {req.route_params['word']}"


# --- Timer slower than its schedule ----------------------------------------------------------------
@app.timer_trigger(
    schedule="%SLOW_TIMER_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=False
)
def slow_timer(timer: func.TimerRequest) -> None:
    run = uuid.uuid4().hex
    _record("slow_timer_start", run=run)
    time.sleep(float(os.environ.get("SLOW_TIMER_SECONDS", "1.5")))
    _record("slow_timer_end", run=run)


@app.activity_trigger(input_name="payload")
def remember(payload) -> dict:
    """Records its input exactly as it arrived (its type too): for running an activity by hand."""
    _record("remember", payload=payload, type=type(payload).__name__)
    return {"payload": payload}
