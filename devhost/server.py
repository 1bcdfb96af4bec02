"""The devhost: one aiohttp server on one event loop playing the Functions host and the Durable extension.

One loop matters: the Durable SDK caches a module-global aiohttp session, and client functions
call the host's management API from inside a request the host is serving.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from azure.functions import meta
from azure.functions.durable_functions import ActivityTriggerConverter

from .app_loader import AppIndex, load_app
from .durable.api import ManagementApi, client_binding
from .durable.engine import DurableEngine
from .durable.store import Store
from .http_triggers import HTTP_RESPONSE_LIMIT_S, HttpTriggers, describe
from .invoker import Invoker
from .timer_triggers import TimerTrigger

log = logging.getLogger("devhost")

MAX_REQUEST_BYTES = 100 * 1024 * 1024  # the Functions host's default request size limit

# Extra routes (e.g. a local chat page) a project can add: a callable given the running host.
RoutePlugin = Callable[["DevHost"], list[web.RouteDef]]


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)


class DevHost:
    def __init__(
        self,
        root: Path,
        *,
        port: int = 7071,
        state_dir: Path | None = None,
        bind: str = "127.0.0.1",
        plugins: list[RoutePlugin] | None = None,
        max_page: int | None = None,
        empty_first_page: bool = False,
        http_response_limit_s: float = HTTP_RESPONSE_LIMIT_S,
    ):
        self.root = root.resolve()
        self.max_page = max_page
        self.empty_first_page = empty_first_page
        self.http_response_limit_s = http_response_limit_s
        self.bind = bind
        self.port = port
        self.state_dir = (state_dir or self.root / ".devhost").resolve()
        self.plugins = plugins or []
        self.index: AppIndex | None = None
        self._runner: web.AppRunner | None = None
        self._timer_tasks: list[asyncio.Task] = []
        self.timers: dict[str, TimerTrigger] = {}
        self._manual_runs: set[asyncio.Task] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.index = load_app(self.root)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / f"{self.index.task_hub}.sqlite")
        self._function_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fn")
        self._replay_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="replay")
        self.invoker = Invoker(
            self._function_pool, lambda: self._binding, str(self.root), self.index.function_timeout_s
        )
        self.engine = DurableEngine(
            self.index, self.store, self.invoker, orchestrator_executor=self._replay_pool
        )
        self.timers = {t.name.lower(): TimerTrigger(t, self.store, self.invoker) for t in self.index.timers}
        self.http = HttpTriggers(self.index, self.invoker, self.http_response_limit_s)
        app = web.Application(middlewares=[_errors_as_json], client_max_size=MAX_REQUEST_BYTES)
        app.add_routes(
            ManagementApi(self.engine, self.index.task_hub, self.max_page, self.empty_first_page).routes()
        )
        app.add_routes(
            [
                web.get("/admin/host/status", self._host_status),
                web.get("/admin/functions", self._list_functions),
                web.post("/admin/functions/{name}", self._run_function),
            ]
        )
        for plugin in self.plugins:
            app.add_routes(plugin(self))
        prefix = "/" + self.index.route_prefix if self.index.route_prefix else ""
        app.router.add_route("*", prefix + "/{tail:.*}", self.http.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._binding = client_binding(self.base_url, self.index.task_hub)
        (self.state_dir / "devhost.json").write_text(
            json.dumps({"pid": os.getpid(), "port": self.port, "url": self.base_url, "root": str(self.root)})
        )
        self.engine.resume()
        for timer in self.timers.values():
            self._timer_tasks.append(asyncio.get_running_loop().create_task(timer.run_forever()))
        log.info("devhost listening on %s (app %s, state %s)", self.base_url, self.root, self.state_dir)

    async def stop(self) -> None:
        for task in self._timer_tasks:
            task.cancel()
        if self._runner:
            await self._runner.cleanup()
        self._function_pool.shutdown(wait=False, cancel_futures=True)
        self._replay_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    async def _host_status(self, request: web.Request) -> web.Response:
        return web.json_response({"state": "Running", "processId": os.getpid(), "url": self.base_url})

    async def _list_functions(self, request: web.Request) -> web.Response:
        assert self.index
        return web.json_response([describe(s) for s in self.index.functions.values()])

    async def _run_function(self, request: web.Request) -> web.Response:
        """``POST /admin/functions/{name}`` runs a non-HTTP function by hand, as Core Tools does.

        Timer functions run under their no-overlap lock. Activity functions take ``input`` as the
        serialized (JSON) activity input, as the Durable extension reads it for a manual run;
        orchestrators cannot be run this way (the extension cannot bind one outside an instance).
        """
        assert self.index
        name = request.match_info["name"]
        spec = self.index.function(name)
        if spec is None:
            return web.json_response({"error": f"no function named '{name}'"}, status=404)
        if spec.kind not in ("timer", "activity"):
            return web.json_response({"error": _not_runnable_by_hand(spec)}, status=400)
        try:
            body = await request.json() if await request.read() else {}
        except json.JSONDecodeError:
            return web.json_response({"error": 'body must be JSON like {"input": "..."}'}, status=400)
        value = body.get("input") if isinstance(body, dict) else None
        timer = self.timers.get(spec.name.lower())
        if timer:
            job = timer.invoke(past_due=False)
        else:
            try:
                activity_input = _activity_input(spec.name, value)
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            job = self._invoke_by_hand(spec, activity_input)
        task = asyncio.get_running_loop().create_task(job)
        self._manual_runs.add(task)
        task.add_done_callback(self._manual_runs.discard)
        return web.Response(status=202)

    async def _invoke_by_hand(self, spec, value) -> None:
        started = time.perf_counter()
        outcome = "ok"
        try:
            await self.invoker.call(spec, value)
        except Exception as exc:
            outcome = f"failed: {type(exc).__name__}: {exc}"
            log.exception("function %s failed (run by hand)", spec.name)
        log.info(
            "by_hand name=%s duration_ms=%.1f outcome=%s",
            spec.name,
            (time.perf_counter() - started) * 1000,
            outcome,
        )


def _not_runnable_by_hand(spec) -> str:
    how = {
        "http": "call its route instead",
        "orchestrator": "start it through the Durable API "
        "(POST /runtime/webhooks/durabletask/orchestrators/<name>) instead",
    }.get(spec.kind, "the devhost runs only timer and activity functions by hand")
    return f"function '{spec.name}' (kind: {spec.kind}) cannot be run by hand; {how}"


_ACTIVITY_INPUT_EXAMPLE = r'{"input": "\"Tokyo\""} or {"input": "{\"n\": 1}"}'


def _activity_input(name: str, value) -> object:
    """The value an activity run by hand receives: ``input`` is its serialized (JSON) input.

    The extension parses it as JSON (``[<input>]``), so text that is not JSON fails there; we say so
    up front instead of failing in the background.
    """
    if value is None or value == "":
        return None
    problem = None
    if not isinstance(value, str):
        problem = "must be a string holding the activity's JSON input"
    else:
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            problem = f"is not JSON ({exc.msg} at column {exc.colno}); send the serialized input"
    if problem:
        raise ValueError(f"'input' for activity '{name}' {problem}, e.g. {_ACTIVITY_INPUT_EXAMPLE}")
    return ActivityTriggerConverter.decode(meta.Datum(type="json", value=value), trigger_metadata=None)


def freeze_startup_heap() -> None:
    """Keep what start-up built out of the garbage collector's scans.

    Loading the app imports azure-ai-ml, botbuilder, promptflow and the rest: about a hundred thousand
    long-lived container objects that every full collection would walk again (~60 ms each, several
    times a minute under chat load). ``gc.freeze`` moves them to the permanent generation; objects made
    afterwards are collected as usual.
    """
    gc.collect()
    gc.freeze()


async def serve(
    root: Path,
    port: int,
    state_dir: Path | None,
    plugins: list[RoutePlugin] | None = None,
    max_page: int | None = None,
    empty_first_page: bool = False,
    http_response_limit_s: float = HTTP_RESPONSE_LIMIT_S,
) -> None:
    host = DevHost(
        root,
        port=port,
        state_dir=state_dir,
        plugins=plugins,
        max_page=max_page,
        empty_first_page=empty_first_page,
        http_response_limit_s=http_response_limit_s,
    )
    await host.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"devhost listening on {host.base_url}", flush=True)
    await stop.wait()
    log.info("shutting down")
    await host.stop()
