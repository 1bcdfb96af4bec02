"""Timer triggers, with the WebJobs timer listener's rules.

On start, with monitoring on, a missed occurrence (stored ``Next`` in the past) runs once at once
with ``IsPastDue: true``; otherwise ``run_on_startup`` runs it once. After each run ``Last``/``Next``
are stored. The next wait is computed from *now*, so missed ticks do not pile up, and runs of one
timer never overlap (including runs started by hand through the admin API).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime

from azure.functions import meta
from azure.functions.timer import TimerRequestConverter

from .app_loader import AppLoadError, FunctionSpec
from .durable import history as h
from .durable.store import Store
from .invoker import Invoker
from .ncrontab import Schedule, ScheduleError

log = logging.getLogger("devhost.timers")


class TimerTrigger:
    def __init__(self, spec: FunctionSpec, store: Store, invoker: Invoker):
        self.spec = spec
        self.store = store
        self.invoker = invoker
        try:
            self.schedule = Schedule.parse(spec.trigger["schedule"])
        except ScheduleError as exc:
            raise AppLoadError(f"timer function '{spec.name}': {exc}") from exc
        monitor = spec.trigger.get("useMonitor")
        self.use_monitor = self.schedule.default_use_monitor if monitor is None else bool(monitor)
        self.run_on_startup = bool(spec.trigger.get("runOnStartup"))
        self._lock = asyncio.Lock()
        self.runs = 0

    async def run_forever(self) -> None:
        status = self.store.get_timer_status(self.spec.name) if self.use_monitor else None
        now = h.utcnow()
        if status and status[1] and h.parse_iso(status[1]) < now:
            log.info(
                "timer %s missed its occurrence at %s; running it now (past due)", self.spec.name, status[1]
            )
            await self.invoke(past_due=True)
        elif self.run_on_startup:
            await self.invoke(past_due=False)
        while True:
            nxt = self.schedule.next_after(h.utcnow())
            await asyncio.sleep(max(0.0, nxt.timestamp() - time.time()))
            await self.invoke(past_due=False)

    def _request(self, past_due: bool, status: tuple | None) -> str:
        schedule_status = None
        if self.use_monitor and status:
            schedule_status = {"Last": status[0], "Next": status[1], "LastUpdated": status[2]}
        return json.dumps(
            {"Schedule": {"AdjustForDST": True}, "ScheduleStatus": schedule_status, "IsPastDue": past_due}
        )

    async def invoke(self, *, past_due: bool) -> None:
        async with self._lock:
            status = self.store.get_timer_status(self.spec.name) if self.use_monitor else None
            request = TimerRequestConverter.decode(
                meta.Datum(type="json", value=self._request(past_due, status)), trigger_metadata=None
            )
            started, began = time.perf_counter(), h.utcnow()
            outcome = "ok"
            try:
                await self.invoker.call(self.spec, request)
            except Exception as exc:  # a failing run is logged, never retried (as the host does)
                outcome = f"failed: {type(exc).__name__}: {exc}"
                log.exception("timer function %s failed", self.spec.name)
            self.runs += 1
            if self.use_monitor:
                now = h.utcnow()
                self.store.put_timer_status(
                    self.spec.name, h.iso(began), h.iso(self.schedule.next_after(now)), h.iso(now)
                )
            log.info(
                "timer name=%s past_due=%s duration_ms=%.1f outcome=%s",
                self.spec.name,
                past_due,
                (time.perf_counter() - started) * 1000,
                outcome,
            )

    def next_occurrences(self, count: int = 3) -> list[datetime]:
        return self.schedule.occurrences(h.utcnow(), count)
