"""Durable Task history events, in the shape the Durable extension hands to the Python SDK.

Events are DTFx events serialised PascalCase; ``EventType``, ``EventId``, ``IsPlayed`` and
``Timestamp`` are required on every one (the SDK raises without them).
"""

from __future__ import annotations

import enum
import json
from datetime import datetime, timezone
from typing import Any


class EventType(enum.IntEnum):
    ExecutionStarted = 0
    ExecutionCompleted = 1
    ExecutionFailed = 2
    ExecutionTerminated = 3
    TaskScheduled = 4
    TaskCompleted = 5
    TaskFailed = 6
    SubOrchestrationInstanceCreated = 7
    SubOrchestrationInstanceCompleted = 8
    SubOrchestrationInstanceFailed = 9
    TimerCreated = 10
    TimerFired = 11
    OrchestratorStarted = 12
    OrchestratorCompleted = 13
    EventSent = 14
    EventRaised = 15
    ContinueAsNew = 16
    GenericEvent = 17
    HistoryState = 18
    ExecutionSuspended = 19
    ExecutionResumed = 20


# Runtime statuses (OrchestrationRuntimeStatus); unknown strings break the SDK's enum parse.
PENDING, RUNNING, COMPLETED, CONTINUED_AS_NEW = "Pending", "Running", "Completed", "ContinuedAsNew"
FAILED, CANCELED, TERMINATED, SUSPENDED = "Failed", "Canceled", "Terminated", "Suspended"
TERMINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELED, TERMINATED})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(ts: datetime) -> str:
    """Event timestamps: ISO-8601 UTC with microseconds and a literal Z."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_seconds(ts: datetime) -> str:
    """Status API times: ``yyyy-MM-ddTHH:mm:ssZ``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def event(kind: EventType, ts: datetime, *, event_id: int = -1, **fields: Any) -> dict[str, Any]:
    return {"EventType": int(kind), "EventId": event_id, "IsPlayed": False, "Timestamp": iso(ts), **fields}


def orchestrator_started(ts: datetime) -> dict[str, Any]:
    return event(EventType.OrchestratorStarted, ts)


def orchestrator_completed(ts: datetime) -> dict[str, Any]:
    return event(EventType.OrchestratorCompleted, ts)


def execution_started(
    ts: datetime,
    *,
    name: str,
    version: str | None,
    input_text: str | None,
    instance_id: str,
    execution_id: str,
    parent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return event(
        EventType.ExecutionStarted,
        ts,
        Name=name,
        Version=version or "",
        Input=input_text,
        OrchestrationInstance={"InstanceId": instance_id, "ExecutionId": execution_id},
        ParentInstance=parent,
    )


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def played(event_json: str) -> str:
    """The stored form of an event: every stored event is replayed as already played."""
    return event_json.replace('"IsPlayed":false', '"IsPlayed":true', 1)
