"""Load a Python v2-model Function App the way the Functions worker does, and index its functions.

The worker puts the app root on ``sys.path``, imports ``function_app.py`` (or the file named by the
``PYTHON_SCRIPT_FILE_NAME`` setting), takes the single module-level ``FunctionRegister`` and calls
``get_functions()`` once. Core Tools loads ``local.settings.json`` ``Values`` into the environment
before that. We read the function metadata the library itself produces (the function.json-style
binding dicts) instead of poking at decorator internals.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

from .routing import RouteTemplate, RouteTemplateError

log = logging.getLogger("devhost.loader")

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")


class AppLoadError(RuntimeError):
    """The Function App cannot be loaded; the message says why and what to fix."""


@dataclass
class FunctionSpec:
    """One indexed function: its metadata and how to call it."""

    name: str
    kind: str  # http | orchestrator | activity | timer | entity | other
    user_function: Any
    trigger: dict[str, Any]
    bindings: list[dict[str, Any]]
    is_async: bool
    wants_context: bool
    client_params: list[str] = field(default_factory=list)
    registered_name: str | None = None  # orchestrator / activity name
    route: RouteTemplate | None = None
    methods: frozenset[str] | None = None

    @property
    def trigger_param(self) -> str:
        return self.trigger["name"]


@dataclass
class AppIndex:
    """Everything the host needs to know about a loaded app."""

    root: Path
    host_json: dict[str, Any]
    functions: dict[str, FunctionSpec]
    http: list[FunctionSpec]
    orchestrators: dict[str, FunctionSpec]
    activities: dict[str, FunctionSpec]
    timers: list[FunctionSpec]

    @property
    def route_prefix(self) -> str:
        http = self.host_json.get("extensions", {}).get("http", {})
        return str(http.get("routePrefix", "api")).strip("/")

    @property
    def task_hub(self) -> str:
        durable = self.host_json.get("extensions", {}).get("durableTask", {})
        return str(durable.get("hubName") or "TestHubName")

    @property
    def function_timeout_s(self) -> float | None:
        """host.json ``functionTimeout`` ([d.]hh:mm:ss) in seconds; None when absent or -1 (unbounded)."""
        value = str(self.host_json.get("functionTimeout", "")).strip()
        if value in ("", "-1"):
            return None
        m = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})", value)
        if m is None:
            raise AppLoadError(f"host.json functionTimeout '{value}' is not a [d.]hh:mm:ss time span")
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)

    def function(self, name: str) -> FunctionSpec | None:
        return self.functions.get(name.lower())


def load_local_settings(root: Path) -> dict[str, str]:
    """Apply ``local.settings.json`` Values to the environment; already-set variables win, like Core Tools."""
    path = root / "local.settings.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AppLoadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError:
        raise AppLoadError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    values = data.get("Values") if isinstance(data, dict) else []
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise AppLoadError(
            f"{path}: must be an object whose 'Values' is an object of setting names to strings"
        )
    applied = {}
    for key, value in values.items():
        if key not in os.environ:
            os.environ[key] = "" if value is None else str(value)
            applied[key] = os.environ[key]
    return applied


def read_host_json(root: Path) -> dict[str, Any]:
    path = root / "host.json"
    if not path.exists():
        return {"version": "2.0"}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AppLoadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def _import_script(root: Path) -> Any:
    script = os.environ.get("PYTHON_SCRIPT_FILE_NAME", "function_app.py")
    path = root / script
    if not path.exists():
        raise AppLoadError(f"no {script} in {root}; run devhost from the app folder or pass --root")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module_name = Path(script).stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = next(
            (f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if str(root) in f.filename), ""
        )
        raise AppLoadError(
            f"importing {path} failed{' at ' + where if where else ''}: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _find_register(module: Any, path: str) -> func.FunctionRegister:
    registers = [v for v in vars(module).values() if isinstance(v, func.FunctionRegister)]
    if not registers:
        raise AppLoadError(
            f"{path} defines no FunctionApp: create one at module level, e.g. `app = df.DFApp()`"
        )
    if len(registers) > 1:
        raise AppLoadError(
            f"{path} defines {len(registers)} FunctionApp objects at module level; the worker accepts "
            "exactly "
            "one (merge the others with app.register_functions(blueprint))"
        )
    return registers[0]


def _function_kind(trigger_type: str) -> str:
    return {
        "httptrigger": "http",
        "orchestrationtrigger": "orchestrator",
        "activitytrigger": "activity",
        "timertrigger": "timer",
        "entitytrigger": "entity",
    }.get(trigger_type.lower(), "other")


def _build_spec(fn: func.Function) -> FunctionSpec:
    name = fn.get_function_name()
    bindings = [json.loads(b) for b in fn.get_raw_bindings()]
    trigger = next((b for b in bindings if b["type"].lower().endswith("trigger")), None)
    if trigger is None:
        raise AppLoadError(f"function '{name}' has no trigger")
    kind = _function_kind(trigger["type"])
    user_fn = fn.get_user_function()
    target = getattr(user_fn, "client_function", user_fn)
    params = inspect.signature(target).parameters
    binding_names = {b["name"] for b in bindings}
    spec = FunctionSpec(
        name=name,
        kind=kind,
        user_function=user_fn,
        trigger=trigger,
        bindings=bindings,
        is_async=inspect.iscoroutinefunction(user_fn),
        wants_context="context" in params and "context" not in binding_names,
        client_params=[b["name"] for b in bindings if b["type"].lower() == "durableclient"],
    )
    if kind == "http":
        route = trigger.get("route") or name
        try:
            spec.route = RouteTemplate.parse(route)
        except RouteTemplateError as exc:
            raise AppLoadError(f"function '{name}': {exc}") from exc
        methods = trigger.get("methods")
        spec.methods = frozenset(m.upper() for m in methods) if methods else None
    elif kind == "orchestrator":
        spec.registered_name = trigger.get("orchestration") or name
    elif kind == "activity":
        spec.registered_name = trigger.get("activity") or name
    if spec.client_params and not inspect.iscoroutinefunction(target):
        raise AppLoadError(
            f"function '{name}' takes a durable client binding, so it must be `async def` "
            "(the SDK awaits it; a sync one fails with 'object HttpResponse can't be used in await')"
        )
    return spec


def _check_route_clashes(http: list[FunctionSpec]) -> None:
    seen: dict[tuple, FunctionSpec] = {}
    for spec in http:
        assert spec.route is not None
        for method in spec.methods or HTTP_METHODS:
            key = (spec.route.shape(), method)
            other = seen.get(key)
            if other is not None:
                raise AppLoadError(
                    f"route clash: functions '{other.name}' and '{spec.name}' both answer {method} "
                    f"'{spec.route.template}'; give one of them another route or method"
                )
            seen[key] = spec


def load_app(root: Path) -> AppIndex:
    """Load settings, import the app and index its functions (``get_functions()`` is called once)."""
    root = root.resolve()
    load_local_settings(root)
    host_json = read_host_json(root)
    module = _import_script(root)
    register = _find_register(module, str(root / "function_app.py"))
    try:
        functions = register.get_functions()
    except ValueError as exc:
        raise AppLoadError(f"indexing the app's functions failed: {exc}") from exc
    index = AppIndex(
        root=root, host_json=host_json, functions={}, http=[], orchestrators={}, activities={}, timers=[]
    )
    for fn in functions:
        spec = _build_spec(fn)
        key = spec.name.lower()
        if key in index.functions:
            raise AppLoadError(f"two functions are named '{spec.name}' (names are case-insensitive)")
        index.functions[key] = spec
        if spec.kind == "http":
            index.http.append(spec)
        elif spec.kind == "orchestrator":
            index.orchestrators[spec.registered_name.lower()] = spec  # type: ignore[union-attr]
        elif spec.kind == "activity":
            index.activities[spec.registered_name.lower()] = spec  # type: ignore[union-attr]
        elif spec.kind == "timer":
            index.timers.append(spec)
    index.http.sort(key=lambda s: s.route.specificity)  # type: ignore[union-attr]
    _check_route_clashes(index.http)
    log.info(
        "loaded %s: %d functions (%d http, %d orchestrators, %d activities, %d timers)",
        root,
        len(index.functions),
        len(index.http),
        len(index.orchestrators),
        len(index.activities),
        len(index.timers),
    )
    return index
