"""The Durable extension's management HTTP API (``/runtime/webhooks/durabletask/``) and client binding.

The Python SDK's ``DurableOrchestrationClient`` calls these routes (its ``rpcBaseUrl``), and the
check-status payload points people at them. Status codes, bodies and quirks follow the 1.x client:
every body is JSON or empty, start/raise-event bodies arrive double-encoded, 404 means unknown.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from urllib.parse import quote

from aiohttp import web
from dateutil.parser import isoparse

from . import history as h
from .engine import DurableEngine, DurableError
from .store import Instance

PREFIX = "/runtime/webhooks/durabletask"


def client_binding(base_url: str, task_hub: str) -> str:
    """The JSON string a ``durableClient`` binding receives (placeholders exactly as the extension's)."""
    base = f"{base_url}{PREFIX}"
    q = f"taskHub={task_hub}&connection=Storage"
    return json.dumps(
        {
            "taskHubName": task_hub,
            "creationUrls": {
                "createNewInstancePostUri": f"{base}/orchestrators/{{functionName}}[/{{instanceId}}]?{q}",
                "createAndWaitOnNewInstancePostUri": (
                    f"{base}/orchestrators/{{functionName}}[/{{instanceId}}]"
                    f"?timeout={{timeoutInSeconds}}&pollingInterval={{intervalInSeconds}}&{q}"
                ),
            },
            "managementUrls": management_urls(base_url, task_hub, "INSTANCEID"),
            "baseUrl": base,
            "requiredQueryStringParameters": "",
            "rpcBaseUrl": f"{base}/",
        }
    )


def management_urls(base_url: str, task_hub: str, instance_id: str) -> dict[str, str]:
    base = f"{base_url}{PREFIX}/instances/{quote(instance_id, safe='')}"
    q = f"taskHub={task_hub}&connection=Storage"
    return {
        "id": instance_id,
        "statusQueryGetUri": f"{base}?{q}",
        "sendEventPostUri": f"{base}/raiseEvent/{{eventName}}?{q}",
        "terminatePostUri": f"{base}/terminate?reason={{text}}&{q}",
        "rewindPostUri": f"{base}/rewind?reason={{text}}&{q}",
        "purgeHistoryDeleteUri": f"{base}?{q}",
        "restartPostUri": f"{base}/restart?{q}",
        "suspendPostUri": f"{base}/suspend?reason={{text}}&{q}",
        "resumePostUri": f"{base}/resume?reason={{text}}&{q}",
    }


def _error(status: int, message: str) -> web.Response:
    body = {"Message": message, "ExceptionMessage": message} if status == 400 else {"Message": message}
    return web.json_response(body, status=status)


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter the way .NET's ``bool.TryParse`` reads it (else the default)."""
    value = (request.query.get(name) or "").strip().lower()
    return value == "true" if value in ("true", "false") else default


# A completion folds the event that scheduled it into itself (by TaskScheduledId).
_SCHEDULED_BY = {
    h.EventType.TaskCompleted: h.EventType.TaskScheduled,
    h.EventType.TaskFailed: h.EventType.TaskScheduled,
    h.EventType.SubOrchestrationInstanceCompleted: h.EventType.SubOrchestrationInstanceCreated,
    h.EventType.SubOrchestrationInstanceFailed: h.EventType.SubOrchestrationInstanceCreated,
}
_RESULT_EVENTS = (
    h.EventType.TaskCompleted,
    h.EventType.SubOrchestrationInstanceCompleted,
    h.EventType.ExecutionCompleted,
)


def _history_for_api(events: list[dict], show_output: bool, show_input: bool) -> list[dict]:
    """The extension's ``historyEvents`` (DurableClient.GetDurableOrchestrationStatusAsync).

    Type names instead of numbers; no ``EventId``/``IsPlayed``; Orchestrator* rows dropped. A
    TaskScheduled/SubOrchestrationInstanceCreated row is folded into its completion (``FunctionName``,
    ``ScheduledTime`` and, with showInput, the scheduled ``Input``); one still in flight stays.
    ``Result`` only with showHistoryOutput; no ``Input`` anywhere when showInput is false. (The
    extension parses ``Result`` into a JSON value; the devhost keeps it as the stored JSON text.)
    """
    items: list[dict | None] = []
    scheduled: dict[tuple[h.EventType, int], int] = {}
    for ev in events:
        kind = h.EventType(ev["EventType"])
        if kind in (h.EventType.OrchestratorStarted, h.EventType.OrchestratorCompleted):
            continue
        item = {k: v for k, v in ev.items() if k not in ("EventId", "IsPlayed")}
        item["EventType"] = kind.name
        if kind in (h.EventType.TaskScheduled, h.EventType.SubOrchestrationInstanceCreated):
            scheduled[(kind, ev["EventId"])] = len(items)
            item.pop("Version", None)
        elif kind in _SCHEDULED_BY:
            index = scheduled.pop((_SCHEDULED_BY[kind], item.pop("TaskScheduledId", None)), None)
            source = items[index] if index is not None else None
            if source is not None:
                items[index] = None  # type: ignore[index]
                item["ScheduledTime"] = source["Timestamp"]
                item["FunctionName"] = source.get("Name")
                if show_input:
                    item["Input"] = source.get("Input")
        elif kind == h.EventType.ExecutionStarted:
            item["FunctionName"] = item.pop("Name", None)
            for key in ("OrchestrationInstance", "ParentInstance", "Version", "Tags"):
                item.pop(key, None)
        elif kind == h.EventType.TimerFired:
            item.pop("TimerId", None)
        if kind in _RESULT_EVENTS and not show_output:
            item.pop("Result", None)
        if not show_input:
            item.pop("Input", None)
        items.append(item)
    return [i for i in items if i is not None]


def status_object(
    engine: DurableEngine, inst: Instance, *, show_input=True, show_history=False, show_history_output=False
) -> dict:
    body = {
        "name": inst.name,
        "instanceId": inst.id,
        "runtimeStatus": inst.status,
        "input": json.loads(inst.input) if (inst.input and show_input) else None,
        "customStatus": json.loads(inst.custom_status) if inst.custom_status else None,
        "output": json.loads(inst.output) if inst.output else None,
        "createdTime": h.iso_seconds(h.parse_iso(inst.created)),
        "lastUpdatedTime": h.iso_seconds(h.parse_iso(inst.updated)),
    }
    if show_history:
        events = [json.loads(e) for e in engine.store.load_history(inst.id)]
        body["historyEvents"] = _history_for_api(events, show_history_output, show_input)
    return body


def _parse_body_input(raw: bytes) -> str | None:
    """Start/raise bodies: the Python client sends ``json.dumps(value)`` as a JSON string (double-encoded)."""
    if not raw.strip():
        return None
    value = json.loads(raw)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


DEFAULT_PAGE = 100  # the extension's page when a query gives no ``top``


class ManagementApi:
    def __init__(
        self,
        engine: DurableEngine,
        task_hub: str,
        max_page: int | None = None,
        empty_first_page: bool = False,
    ):
        self.engine = engine
        self.task_hub = task_hub
        self.max_page = max_page
        self.empty_first_page = empty_first_page

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        return [
            web.post(p + "/orchestrators/{name}", self.start),
            web.post(p + "/orchestrators/{name}/{instance_id}", self.start),
            web.get(p + "/instances", self.list_instances),
            web.get(p + "/instances/", self.list_instances),
            web.delete(p + "/instances", self.purge_many),
            web.delete(p + "/instances/", self.purge_many),
            web.get(p + "/instances/{instance_id}", self.get_status),
            web.delete(p + "/instances/{instance_id}", self.purge_one),
            web.post(p + "/instances/{instance_id}/raiseEvent/{event}", self.raise_event),
            web.post(p + "/instances/{instance_id}/terminate", self.terminate),
            web.post(p + "/instances/{instance_id}/suspend", self.suspend),
            web.post(p + "/instances/{instance_id}/resume", self.resume),
            web.post(p + "/instances/{instance_id}/restart", self.restart),
            web.post(p + "/instances/{instance_id}/rewind", self.rewind),
        ]

    def _check_status_response(self, request: web.Request, inst: Instance) -> web.Response:
        origin = f"{request.scheme}://{request.host}"
        payload = management_urls(origin, self.task_hub, inst.id)
        return web.json_response(
            payload, status=202, headers={"Location": payload["statusQueryGetUri"], "Retry-After": "10"}
        )

    async def start(self, request: web.Request) -> web.Response:
        try:
            input_text = _parse_body_input(await request.read())
        except json.JSONDecodeError as exc:
            return _error(400, f"the request body is not valid JSON: {exc.msg}")
        try:
            inst = self.engine.start(
                request.match_info["name"],
                request.match_info.get("instance_id"),
                input_text,
                request.query.get("version"),
            )
        except DurableError as exc:
            return _error(exc.status, str(exc))
        return self._check_status_response(request, inst)

    async def get_status(self, request: web.Request) -> web.Response:
        inst = self.engine.store.get_instance(request.match_info["instance_id"])
        if inst is None:
            return web.Response(status=404)
        body = status_object(
            self.engine,
            inst,
            show_input=_flag(request, "showInput", True),
            show_history=_flag(request, "showHistory"),
            show_history_output=_flag(request, "showHistoryOutput"),
        )
        if inst.status in h.TERMINAL_STATUSES:
            return web.json_response(body, status=200)
        origin = f"{request.scheme}://{request.host}"
        return web.json_response(
            body,
            status=202,
            headers={
                "Location": management_urls(origin, self.task_hub, inst.id)["statusQueryGetUri"],
                "Retry-After": "5",
            },
        )

    @staticmethod
    def _filter(request: web.Request) -> tuple[list[str], list]:
        clauses, args = [], []
        for param, op in (("createdTimeFrom", ">="), ("createdTimeTo", "<=")):
            if request.query.get(param):
                clauses.append(f"created {op} ?")
                args.append(h.iso(_parse_time(request.query[param], param)))
        statuses = [s for s in request.query.get("runtimeStatus", "").split(",") if s]
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        prefix = request.query.get("instanceIdPrefix")
        if prefix:
            clauses.append("substr(id, 1, ?) = ?")
            args.extend([len(prefix), prefix])
        return clauses, args

    def _filtered(self, request: web.Request) -> list[Instance]:
        clauses, args = self._filter(request)
        return self.engine.store.query_instances(_where(clauses), args)

    async def list_instances(self, request: web.Request) -> web.Response:
        """List/filter, a page at a time as the extension does: ``top`` instances (100 when not given,
        its ``OrchestrationStatusQueryCondition.PageSize``) and an ``x-ms-continuation-token`` (request
        and response header) that carries on after the last instance returned — by key, so instances
        purged or created between pages neither shift nor repeat the rest. ``max_page`` makes pages
        shorter than asked, and ``empty_first_page`` answers a query's first request with no instances
        and a token, as the Azure Table service may ("always check the continuation token")."""
        token = request.headers.get("x-ms-continuation-token")
        if self.empty_first_page and not token:  # as the Table service may: nothing yet, but go on
            # A token from before the first instance (every created time sorts after "").
            return web.json_response([], headers={"x-ms-continuation-token": _encode_token("", "")})
        try:
            clauses, args = self._filter(request)
            if token:
                created, last_id = _decode_token(token)
                clauses.append("(created > ? OR (created = ? AND id > ?))")
                args.extend([created, created, last_id])
        except DurableError as exc:
            return _error(exc.status, str(exc))
        try:
            top = int(request.query.get("top", "0"))
        except ValueError:
            top = 0  # the extension ignores a ``top`` that is not an integer
        page = top if top > 0 else DEFAULT_PAGE
        if self.max_page:
            page = min(page, self.max_page)
        instances = self.engine.store.query_instances(_where(clauses), args, limit=page + 1)
        headers = {}
        if len(instances) > page:
            instances = instances[:page]
            headers["x-ms-continuation-token"] = _encode_token(instances[-1].created, instances[-1].id)
        show_input = _flag(request, "showInput", True)  # OrchestrationStatusQueryCondition.ShowInput
        body = [status_object(self.engine, i, show_input=show_input) for i in instances]
        return web.json_response(body, headers=headers)

    async def purge_one(self, request: web.Request) -> web.Response:
        inst = self.engine.store.get_instance(request.match_info["instance_id"])
        if inst is None or self.engine.purge([inst]) == 0:
            return web.Response(status=404)
        return web.json_response({"instancesDeleted": 1})

    async def purge_many(self, request: web.Request) -> web.Response:
        if not request.query.get("createdTimeFrom"):
            return _error(400, "purging by filter needs createdTimeFrom")
        try:
            deleted = self.engine.purge(self._filtered(request))
        except DurableError as exc:
            return _error(exc.status, str(exc))
        if deleted == 0:
            return web.Response(status=404)
        return web.json_response({"instancesDeleted": deleted})

    async def raise_event(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _error(400, "raiseEvent needs Content-Type: application/json")
        try:
            raw = await request.read()
            # The extension stores the parsed body as the event's JSON: a client that posts
            # json.dumps(data) (the Python SDK does) gets a *string* back from wait_for_external_event.
            input_text = json.dumps(json.loads(raw)) if raw.strip() else None
            self.engine.raise_event(
                request.match_info["instance_id"], request.match_info["event"], input_text
            )
        except json.JSONDecodeError as exc:
            return _error(400, f"the event payload is not valid JSON: {exc.msg}")
        except DurableError as exc:
            return _error(exc.status, str(exc))
        return web.Response(status=202)

    async def _simple(self, request: web.Request, op) -> web.Response:
        try:
            op(request.match_info["instance_id"], request.query.get("reason", ""))
        except DurableError as exc:
            return _error(exc.status, str(exc))
        return web.Response(status=202)

    async def terminate(self, request: web.Request) -> web.Response:
        return await self._simple(request, self.engine.terminate)

    async def suspend(self, request: web.Request) -> web.Response:
        return await self._simple(request, self.engine.suspend)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._simple(request, self.engine.resume_instance)

    async def restart(self, request: web.Request) -> web.Response:
        new_id = request.query.get("restartWithNewInstanceId", "true").lower() != "false"
        try:
            inst = self.engine.restart(request.match_info["instance_id"], new_id)
        except DurableError as exc:
            return _error(exc.status, str(exc))
        return self._check_status_response(request, inst)

    async def rewind(self, request: web.Request) -> web.Response:
        inst = self.engine.store.get_instance(request.match_info["instance_id"])
        if inst is None:
            return web.Response(status=404)
        if inst.status in (h.COMPLETED, h.TERMINATED, h.CANCELED):
            return web.Response(status=410)  # the extension's answer before it tries to rewind
        return web.json_response(
            "rewind is not supported by the devhost; restart the instance instead", status=400
        )


def _where(clauses: list[str]) -> str:
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def _encode_token(created: str, last_id: str) -> str:
    """The token that carries on after the instance created at ``created`` with id ``last_id``."""
    return base64.urlsafe_b64encode(json.dumps([created, last_id]).encode()).decode()


def _decode_token(token: str) -> tuple[str, str]:
    try:
        created, last_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(created, str) and isinstance(last_id, str):
            return created, last_id
    except (ValueError, TypeError):
        pass
    raise DurableError(400, f"x-ms-continuation-token '{token}' is not a token this host issued")


def _parse_time(text: str, param: str) -> datetime:
    try:
        return isoparse(text)
    except ValueError as exc:
        raise DurableError(400, f"{param}: '{text}' is not an ISO-8601 time") from exc
