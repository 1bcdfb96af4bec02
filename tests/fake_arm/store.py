"""The fake's state: ARM resources by id, and long-running operations that finish after some polls.

Azure answers a create/update/delete that takes time with 201/202 and an operation to poll; the
resource shows ``Creating``/``Updating``/``Deleting`` meanwhile. Here an operation completes after
``polls`` reads of its resource (or of its status URL), so a test's timeline depends on what the
client does, never on the clock.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .server import ArmError, not_found


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key(resource_id: str) -> str:
    return re.sub(r"/{2,}", "/", resource_id.rstrip("/")).lower()


@dataclass
class Operation:
    id: str
    resource_id: str
    kind: str  # create | update | delete | action
    polls_left: int
    on_done: Callable[[], None]
    status: str = "InProgress"
    error: dict | None = None
    status_polls: int = 0

    def tick(self) -> None:
        if self.status != "InProgress":
            return
        self.polls_left -= 1
        if self.polls_left <= 0:
            self.on_done()
            if self.status == "InProgress":
                self.status = "Succeeded"


@dataclass
class Store:
    resources: dict[str, dict] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    deleted: list[str] = field(default_factory=list)

    def get(self, resource_id: str, kind: str = "resource") -> dict:
        self.tick_resource(resource_id)
        found = self.resources.get(key(resource_id))
        if found is None:
            raise not_found(kind, resource_id.rsplit("/", 1)[-1])
        return found

    def find(self, resource_id: str) -> dict | None:
        return self.resources.get(key(resource_id))

    def put(self, resource_id: str, body: dict) -> dict:
        self.resources[key(resource_id)] = body
        return body

    def remove(self, resource_id: str) -> None:
        if self.resources.pop(key(resource_id), None) is not None:
            self.deleted.append(resource_id)
        prefix = key(resource_id) + "/"
        for child in [k for k in self.resources if k.startswith(prefix)]:
            self.resources.pop(child)

    def children(self, parent_id: str, collection: str) -> list[dict]:
        prefix = key(parent_id) + "/" + collection.lower() + "/"
        return [r for k, r in self.resources.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]]

    def by_type(self, resource_type: str) -> list[dict]:
        return [r for r in self.resources.values() if r.get("type", "").lower() == resource_type.lower()]

    # long-running operations ------------------------------------------------------------------
    def start(self, resource_id: str, kind: str, polls: int, on_done: Callable[[], None]) -> Operation:
        op = Operation(f"op-{next(self.counter):05d}", resource_id, kind, polls, on_done)
        self.operations[op.id] = op
        if polls <= 0:
            op.tick()
        return op

    def pending(self, resource_id: str) -> Operation | None:
        k = key(resource_id)
        for op in self.operations.values():
            if op.status == "InProgress" and key(op.resource_id) == k:
                return op
        return None

    def tick_resource(self, resource_id: str) -> None:
        """A read of the resource is a poll of whatever operation is running on it."""
        op = self.pending(resource_id)
        if op:
            op.tick()

    def operation(self, op_id: str) -> Operation:
        """A poll of the operation's status URL. azure-core's pollers poll once at once from a background
        thread; that first poll does not count, so the timeline follows the app's own reads."""
        op = self.operations.get(op_id)
        if op is None:
            raise ArmError(404, "OperationNotFound", f"operation {op_id} not found")
        if op.status_polls:
            op.tick()
        op.status_polls += 1
        return op


def arm_body(resource_id: str, resource_type: str, body: dict, **extra: Any) -> dict:
    """A resource as ARM returns it: id, name, type, systemData plus what the client sent."""
    stamp = now_iso()
    system = {
        "createdAt": stamp,
        "createdBy": "fake-client",
        "createdByType": "Application",
        "lastModifiedAt": stamp,
        "lastModifiedBy": "fake-client",
        "lastModifiedByType": "Application",
        **(extra.pop("systemData", None) or {}),
    }
    return {
        "id": resource_id,
        "name": resource_id.rstrip("/").rsplit("/", 1)[-1],
        "type": resource_type,
        **{k: v for k, v in body.items() if k not in ("id", "name", "type")},
        **extra,
        "systemData": system,
    }
