"""HTTP triggers: route an aiohttp request to the matching function and convert both ways.

Requests become ``func.HttpRequest`` with an absolute URL (the Durable client copies its origin into
check-status URLs); results go through the library's own ``HttpResponseConverter``, so a function
sees and returns exactly what it would under the real worker.
"""

from __future__ import annotations

import json
import logging
import time

import azure.functions as func
from aiohttp import web
from azure.functions.http import HttpResponseConverter

from .app_loader import AppIndex, FunctionSpec
from .invoker import Invoker

log = logging.getLogger("devhost.http")


def _json_error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class HttpTriggers:
    def __init__(self, index: AppIndex, invoker: Invoker):
        self.index = index
        self.invoker = invoker
        self.prefix = "/" + index.route_prefix if index.route_prefix else ""

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
        path = request.path[len(self.prefix) :] if self.prefix else request.path
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
        try:
            response = self._to_response(spec, await self.invoker.call(spec, req))
        except Exception as exc:
            log.exception("http function %s failed", spec.name)
            response = _json_error(500, f"function '{spec.name}' failed: {type(exc).__name__}: {exc}")
        log.info(
            "http name=%s method=%s path=%s status=%d duration_ms=%.1f",
            spec.name,
            request.method,
            request.path,
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

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
