"""HTTP triggers: route an aiohttp request to the matching function and convert both ways.

Requests become ``func.HttpRequest`` with an absolute URL (the Durable client copies its origin into
check-status URLs); results go through the library's own ``HttpResponseConverter``, so a function
sees and returns exactly what it would under the real worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import azure.functions as func
from aiohttp import web
from azure.functions.http import HttpResponseConverter

from .app_loader import AppIndex, FunctionSpec
from .invoker import Invoker

log = logging.getLogger("devhost.http")

# Azure's load balancer waits this long for an HTTP function's answer, whatever functionTimeout says;
# then the caller gets 502 and the function runs on, its answer lost.
HTTP_RESPONSE_LIMIT_S = 230.0


def _json_error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class HttpTriggers:
    def __init__(self, index: AppIndex, invoker: Invoker, response_limit_s: float = HTTP_RESPONSE_LIMIT_S):
        self.index = index
        self.invoker = invoker
        self.response_limit_s = response_limit_s
        self.prefix = "/" + index.route_prefix if index.route_prefix else ""
        self._running: set[asyncio.Task] = set()  # every invocation under way, awaited by a caller or not

    def match(self, path: str, method: str) -> tuple[FunctionSpec | None, dict[str, str], list[str]]:
        allowed: list[str] = []
        for spec in self.index.http:
            params = spec.route.match(path)  # type: ignore[union-attr]
            if params is None:
                continue
            if spec.methods is None or method in spec.methods:
                return spec, params, []
            allowed.extend(sorted(spec.methods))
        return None, {}, allowed

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # The undecoded path: route templates decode each segment once, as the Functions host does
        # (request.path is decoded already: a second decoding turned %2541 into A, %252F into a slash).
        path = request.rel_url.raw_path
        if self.prefix and path[: len(self.prefix)].lower() == self.prefix.lower():
            path = path[len(self.prefix) :]
        spec, params, allowed = self.match(path, request.method)
        if spec is None:
            if allowed:
                return _json_error(405, f"{request.method} is not allowed on {request.path}", allowed=allowed)
            return _json_error(404, f"no function answers {request.path}")
        req = func.HttpRequest(
            method=request.method,
            url=str(request.url),
            headers=dict(request.headers),
            params={k: request.query.get(k) for k in request.query},
            route_params=params,
            body=await request.read(),
        )
        started = time.perf_counter()
        # Its own task, as on Azure: neither a caller that hangs up nor the response limit stops it.
        invocation = asyncio.ensure_future(self.invoker.call(spec, req))
        self._running.add(invocation)
        invocation.add_done_callback(self._running.discard)
        done, _ = await asyncio.wait({invocation}, timeout=self.response_limit_s)
        if not done:
            invocation.add_done_callback(lambda task: self._ended_late(spec, request, task, started))
            log.warning(
                "no answer within %g s from http function %s (%s %s): the caller gets 502, as from Azure's "
                "load balancer, and the function runs on",
                self.response_limit_s,
                spec.name,
                request.method,
                request.path,
            )
            return _json_error(
                502,
                f"function '{spec.name}' did not answer within {self.response_limit_s:g} s, Azure's limit "
                "for an HTTP response; it goes on running, but its answer is lost",
            )
        try:
            response = self._to_response(spec, invocation.result())
        except Exception:
            # Azure answers a failed invocation with a bare 500: what the function raised goes to the
            # host's log only, never to the caller (its message may hold anything, a key included).
            log.exception("http function %s failed", spec.name)
            response = web.Response(status=500)
        self._log_done(spec, request, response.status, started)
        return response

    def _ended_late(
        self, spec: FunctionSpec, request: web.Request, task: asyncio.Task, started: float
    ) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error(
                "http function %s failed after its caller got 502: %s: %s",
                spec.name,
                type(error).__name__,
                error,
            )
        self._log_done(spec, request, 502, started)

    @staticmethod
    def _log_done(spec: FunctionSpec, request: web.Request, status: int, started: float) -> None:
        log.info(
            "http name=%s method=%s path=%s status=%d duration_ms=%.1f",
            spec.name,
            request.method,
            request.path,
            status,
            (time.perf_counter() - started) * 1000,
        )

    @staticmethod
    def _to_response(spec: FunctionSpec, result) -> web.Response:
        try:
            datum = HttpResponseConverter.encode(result, expected_type=None)
        except NotImplementedError:
            return _json_error(
                500,
                f"function '{spec.name}' returned {type(result).__name__}; return func.HttpResponse or str",
            )
        if datum.type == "string":
            return web.Response(text=datum.value, content_type="text/plain")
        value = datum.value
        headers = {k: v.value for k, v in value["headers"].items()}
        return web.Response(status=int(value["status_code"].value), headers=headers, body=value["body"].value)


def describe(spec: FunctionSpec) -> dict:
    """A function as the admin API lists it."""
    info = {"name": spec.name, "kind": spec.kind, "trigger": json.loads(json.dumps(spec.trigger))}
    if spec.route:
        info["route"] = spec.route.template
        info["methods"] = sorted(spec.methods) if spec.methods else "all"
    return info
