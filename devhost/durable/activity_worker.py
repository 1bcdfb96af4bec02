"""Activity execution: at least once, in the function thread pool (or on the loop when async), with
the Durable extension's failure wording. A result is recorded only if its work item still exists
(a terminated or purged instance drops it).
"""

from __future__ import annotations

import logging
import time
import traceback

from azure.functions import meta
from azure.functions.durable_functions import ActivityTriggerConverter

from . import history as h
from .store import WorkItem

log = logging.getLogger("devhost.durable")


class ActivityWorker:
    """Mixin of DurableEngine (uses its index, store, invoker, kick(), _spawn(), _activity_slots)."""

    def _dispatch(self, item: WorkItem) -> None:
        self._spawn(self._run_activity(item))

    async def _run_activity(self, item: WorkItem) -> None:
        async with self._activity_slots:
            spec = self.index.activities.get(item.name.lower())
            started = time.perf_counter()
            if spec is None:
                known = ", ".join(sorted(f"'{s.registered_name}'" for s in self.index.activities.values()))
                event = self._activity_failed(
                    item,
                    f"The function '{item.name}' doesn't exist, is disabled, or is not an activity function. "
                    f"Known activity functions: {known or 'none'}.",
                    "",
                )
            else:
                event = await self._invoke_activity(spec, item)
            recorded = self.store.complete_work(item, h.dumps(event))
            outcome = "ok" if event["EventType"] == h.EventType.TaskCompleted else "failed"
            log.info(
                "activity name=%s instance=%s task=%d duration_ms=%.1f outcome=%s%s",
                item.name,
                item.instance_id,
                item.task_id,
                (time.perf_counter() - started) * 1000,
                outcome,
                "" if recorded else " (dropped)",
            )
            if recorded:
                self.kick(item.instance_id)

    async def _invoke_activity(self, spec, item: WorkItem) -> dict:
        try:
            value = ActivityTriggerConverter.decode(
                meta.Datum(type="json", value=item.input or "null"), trigger_metadata=None
            )
            result = await self.invoker.call(spec, value)
            encoded = ActivityTriggerConverter.encode(result, expected_type=None).value
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = (
                f"at {frames[-1].name} ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})"
                if frames
                else ""
            )
            return self._activity_failed(
                item, f"Activity function '{item.name}' failed: {type(exc).__name__}: {exc}", where
            )
        return h.event(h.EventType.TaskCompleted, h.utcnow(), TaskScheduledId=item.task_id, Result=encoded)

    @staticmethod
    def _activity_failed(item: WorkItem, reason: str, details: str) -> dict:
        return h.event(
            h.EventType.TaskFailed, h.utcnow(), TaskScheduledId=item.task_id, Reason=reason, Details=details
        )
