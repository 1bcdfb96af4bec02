"""The devhost's Durable engine: instances, episodes, activities, timers and sub-orchestrations.

Everything state-changing happens on the host's single event loop; the SDK's replay and sync
activities run in thread pools. Per instance, episodes are serialised: events that arrive while an
episode runs wait in the inbox and are handed to the next one together (batching, as the real
extension does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime

from ..app_loader import AppIndex
from ..invoker import Invoker
from . import history as h
from .activity_worker import ActivityWorker
from .control import DurableError, InstanceControl, input_column, validate_instance_id
from .episode import EpisodeResult, action_signature, nondeterminism, run_episode
from .store import Instance, Store, WorkItem

log = logging.getLogger("devhost.durable")

# The extension refuses a custom status over 16 KB of UTF-16 JSON (DurableOrchestrationContext
# .SetCustomStatus via MessagePayloadDataConverter.Serialize): the episode throws and the orchestration
# fails. The size is the compact JSON text's UTF-16 byte count, in whole KB, rounded down.
MAX_CUSTOM_STATUS_KB = 16


def custom_status_error(custom) -> str | None:
    text = json.dumps(custom, separators=(",", ":"), ensure_ascii=False)
    size_kb = int(len(text.encode("utf-16-le")) / 1024)
    if size_kb <= MAX_CUSTOM_STATUS_KB:
        return None
    return (
        f"The UTF-16 size of the JSON-serialized payload must not exceed {MAX_CUSTOM_STATUS_KB} KB. "
        f"The current payload size is {size_kb} KB."
    )


MAX_INSTANCE_ID = 256


@dataclass
class _Replay:
    """In-memory copy of an instance's current-execution history (stored events, already played)."""

    execution_id: str
    events: list[str]
    recorded: set[int] = field(default_factory=set)
    last_started: datetime | None = None
    episodes: int = 0

    def absorb(self, events: list[str]) -> None:
        for text in events:
            ev = json.loads(text)
            kind = ev["EventType"]
            if kind in (
                h.EventType.TaskScheduled,
                h.EventType.TimerCreated,
                h.EventType.SubOrchestrationInstanceCreated,
            ):
                self.recorded.add(ev["EventId"])
            elif kind == h.EventType.OrchestratorStarted:
                self.last_started = h.parse_iso(ev["Timestamp"])
                self.episodes += 1
        self.events.extend(events)


def _is_termination(event_json: str) -> bool:
    return json.loads(event_json)["EventType"] == h.EventType.ExecutionTerminated


class DurableEngine(InstanceControl, ActivityWorker):
    def __init__(
        self,
        index: AppIndex,
        store: Store,
        invoker: Invoker,
        *,
        orchestrator_executor: Executor,
        activity_concurrency: int = 16,
    ):
        self.index = index
        self.store = store
        self.invoker = invoker
        self._orch_executor = orchestrator_executor
        self._activity_slots = asyncio.Semaphore(activity_concurrency)
        self._running: dict[str, asyncio.Task] = {}
        self._dirty: set[str] = set()
        self._replays: dict[str, _Replay] = {}
        self._background: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        # Called after every episode with its measurements (benchmarks, diagnostics).
        self.observer: Callable[[dict], None] | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """After a (re)start: re-run unfinished activities, replay pending inboxes, re-arm timers."""
        now = time.time()
        work = self.store.all_work()
        for item in work:
            self._dispatch(item)
        pending = self.store.instances_with_visible_inbox(now)
        for iid in pending:
            self.kick(iid)
        future = self.store.future_inbox(now)
        for iid, at in future:
            self._wake_at(iid, at)
        if work or pending or future:
            log.info(
                "resumed task hub: %d activities re-queued, %d instances with pending events, "
                "%d timers re-armed",
                len(work),
                len(pending),
                len(future),
            )

    async def drain(self) -> None:
        """Wait for in-flight episodes (used on shutdown and by benchmarks)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def wait_changed(self, timeout: float) -> None:
        """Sleep until any instance changes state, or the timeout passes."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    # scheduling --------------------------------------------------------------------------------
    def kick(self, instance_id: str) -> None:
        if instance_id in self._running:
            self._dirty.add(instance_id)
            return
        self._running[instance_id] = self._spawn(self._drive(instance_id))

    async def _drive(self, instance_id: str) -> None:
        try:
            while True:
                self._dirty.discard(instance_id)
                try:
                    await self._episode(instance_id)
                except Exception:
                    log.exception("episode failed inside the host instance=%s", instance_id)
                    return
                if instance_id not in self._dirty:
                    return
        finally:
            self._running.pop(instance_id, None)

    def _wake_at(self, instance_id: str, at: float) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, at - time.time()) + 0.001, self.kick, instance_id)

    # client operations -------------------------------------------------------------------------
    def _replay_for(self, inst: Instance) -> _Replay:
        replay = self._replays.get(inst.id)
        if replay is None or replay.execution_id != inst.execution_id:
            replay = _Replay(execution_id=inst.execution_id, events=[])
            replay.absorb(self.store.load_history(inst.id))
            self._replays[inst.id] = replay
        return replay

    async def _episode(self, instance_id: str) -> None:
        inst = self.store.get_instance(instance_id)
        if inst is None:
            return
        rows = self.store.visible_inbox(instance_id, time.time())
        fresh = [r for r in rows if r.execution_id in (None, inst.execution_id)]
        if inst.status not in h.TERMINAL_STATUSES:  # a termination goes first, suspended or not
            ended = next((r for r in fresh if _is_termination(r.event)), None)
            if ended is not None:
                self._apply_termination(inst, ended.event)
                return
        if inst.status == h.SUSPENDED:
            return
        if inst.status in h.TERMINAL_STATUSES or not fresh:
            if rows:
                with self.store.transaction() as tx:
                    self.store.delete_inbox(tx, [r.id for r in rows])
            return
        replay = self._replay_for(inst)
        ts = h.utcnow()
        if replay.last_started and ts < replay.last_started:
            ts = replay.last_started
        new_events = [h.dumps(h.orchestrator_started(ts)), *(r.event for r in fresh)]
        context_json = (
            '{"history":['
            + ",".join([*replay.events, *new_events])
            + '],"input":'
            + (inst.input or "null")
            + ',"instanceId":'
            + json.dumps(inst.id)
            + ',"isReplaying":false,"parentInstanceId":'
            + json.dumps(inst.parent_id)
            + ',"upperSchemaVersion":1,"upperSchemaVersionNew":2}'
        )
        spec = self.index.orchestrators.get(inst.name.lower())
        started = time.perf_counter()
        if spec is None:
            result = EpisodeResult(
                None,
                f"The function '{inst.name}' doesn't exist, is disabled, or is not an orchestrator function.",
            )
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                self._orch_executor, run_episode, spec.user_function, context_json, set(replay.recorded), ts
            )
        episode, history_length = replay.episodes + 1, len(replay.events) + len(new_events)
        self._commit_episode(inst, replay, [r.id for r in rows], new_events, result, ts)
        duration_ms = (time.perf_counter() - started) * 1000
        log.info(
            "episode instance=%s name=%s episode=%d history=%d new_tasks=%d duration_ms=%.1f%s",
            inst.id,
            inst.name,
            episode,
            history_length,
            len(result.new_tasks),
            duration_ms,
            f" error={result.error!r}" if result.error else "",
        )
        if self.observer:
            self.observer(
                {
                    "instance": inst.id,
                    "name": inst.name,
                    "episode": episode,
                    "history": history_length,
                    "duration_ms": duration_ms,
                }
            )

    def _commit_episode(
        self,
        inst: Instance,
        replay: _Replay,
        consumed: list[int],
        new_events: list[str],
        result: EpisodeResult,
        ts: datetime,
    ) -> None:
        current = self.store.get_instance(inst.id)
        if (
            current is None
            or current.execution_id != inst.execution_id
            or current.status in h.TERMINAL_STATUSES
        ):
            return  # terminated, purged or restarted while the episode ran: its decisions are void
        error = result.error
        signature = action_signature(result.actions)
        if error is None and current.action_signature:
            error = nondeterminism(json.loads(current.action_signature), signature)
        unsupported = [t for t in result.new_tasks if t.kind == "unsupported"]
        if error is None and unsupported:
            error = f"the devhost does not support {unsupported[0].detail}"
        custom = result.state.get("customStatus") if result.state else None
        oversize = custom_status_error(custom) if custom is not None else None
        if oversize:  # refused, so never stored: the status keeps its last value
            error = error or oversize
            custom = json.loads(current.custom_status) if current.custom_status else None
        after: list[Callable[[], None]] = []
        events = [h.played(e) for e in new_events]
        with self.store.transaction() as tx:
            self.store.delete_inbox(tx, consumed)
            fields = {
                "custom_status": None if custom is None else json.dumps(custom),
                "updated": h.iso(h.utcnow()),
                "action_signature": json.dumps(signature),
            }
            can, can_input = result.continue_as_new_input
            if error is not None:
                self._finish(
                    tx,
                    inst,
                    events,
                    ts,
                    h.FAILED,
                    f"Orchestrator function '{inst.name}' failed: {error}",
                    fields,
                )
            elif result.is_done and can:
                self._continue_as_new(tx, inst, can_input, fields)
                after.append(lambda: self.kick(inst.id))
            elif result.is_done:
                self._finish(tx, inst, events, ts, h.COMPLETED, (result.state or {}).get("output"), fields)
            else:
                events += self._schedule(tx, inst, result, ts, after)
                events.append(h.played(h.dumps(h.orchestrator_completed(ts))))
                self._append(tx, inst.id, events, start=len(replay.events))
                # A suspend that landed while the episode ran holds: the episode commits, no later one runs.
                status = h.SUSPENDED if current.status == h.SUSPENDED else h.RUNNING
                self.store.update_instance(tx, inst.id, status=status, **fields)
        if error is None and not result.is_done:
            replay.absorb(events)
        else:
            self._replays.pop(inst.id, None)
            if inst.parent_id:
                after.append(lambda: self.kick(inst.parent_id))  # type: ignore[arg-type]
        self._changed.set()
        for action in after:
            action()

    def _finish(
        self, tx, inst: Instance, events: list[str], ts: datetime, status: str, output, fields
    ) -> None:
        output_json = json.dumps(output)
        events = [
            *events,
            h.played(h.dumps(h.orchestrator_completed(ts))),
            h.played(
                h.dumps(
                    h.event(
                        h.EventType.ExecutionCompleted, ts, OrchestrationStatus=status, Result=output_json
                    )
                )
            ),
        ]
        self._append(tx, inst.id, events, start=None)
        self.store.update_instance(tx, inst.id, status=status, output=output_json, **fields)
        if status == h.COMPLETED:
            self._notify_parent(tx, inst, ok=True, result=output_json)
        else:
            self._notify_parent(tx, inst, ok=False, reason=output, details="")
        log.info("instance=%s name=%s %s", inst.id, inst.name, status.lower())

    def _continue_as_new(self, tx, inst: Instance, input_text: str | None, fields) -> None:
        tx.execute("DELETE FROM history WHERE instance_id = ?", (inst.id,))
        tx.execute("DELETE FROM work WHERE instance_id = ?", (inst.id,))
        tx.execute("DELETE FROM inbox WHERE instance_id = ? AND execution_id IS NOT NULL", (inst.id,))
        execution_id = uuid.uuid4().hex
        fields = {**fields, "action_signature": None}
        self.store.update_instance(
            tx, inst.id, status=h.RUNNING, execution_id=execution_id, input=input_column(input_text), **fields
        )
        started = h.execution_started(
            h.utcnow(),
            name=inst.name,
            version=inst.version,
            input_text=input_text,
            instance_id=inst.id,
            execution_id=execution_id,
        )
        self.store.add_inbox(tx, inst.id, h.dumps(started), execution_id=execution_id)
        log.info("instance=%s name=%s continued as new", inst.id, inst.name)

    def _schedule(self, tx, inst: Instance, result: EpisodeResult, ts: datetime, after: list) -> list[str]:
        events: list[str] = []
        for task in result.new_tasks:
            if task.kind == "activity":
                events.append(
                    h.dumps(
                        h.event(
                            h.EventType.TaskScheduled,
                            ts,
                            event_id=task.task_id,
                            Name=task.name,
                            Input=task.input,
                        )
                    )
                )
                item = WorkItem(0, inst.id, inst.execution_id, task.task_id, task.name or "", task.input)
                item.id = self.store.add_work(tx, item)
                after.append(lambda item=item: self._dispatch(item))
            elif task.kind == "timer":
                assert task.fire_at is not None
                fire_at = h.iso(task.fire_at)
                events.append(
                    h.dumps(h.event(h.EventType.TimerCreated, ts, event_id=task.task_id, FireAt=fire_at))
                )
                fired = h.event(h.EventType.TimerFired, task.fire_at, TimerId=task.task_id, FireAt=fire_at)
                at = task.fire_at.timestamp()
                self.store.add_inbox(
                    tx, inst.id, h.dumps(fired), execution_id=inst.execution_id, visible_at=at
                )
                after.append(lambda at=at: self._wake_at(inst.id, at))
            elif task.kind == "suborchestration":
                child_id = task.instance_id or f"{inst.id}:{task.task_id}"
                events.append(
                    h.dumps(
                        h.event(
                            h.EventType.SubOrchestrationInstanceCreated,
                            ts,
                            event_id=task.task_id,
                            Name=task.name,
                            InstanceId=child_id,
                            Input=task.input,
                        )
                    )
                )
                self._start_child(tx, inst, task.task_id, child_id, task, after)
        return [h.played(e) for e in events]

    def _start_child(self, tx, parent: Instance, task_id: int, child_id: str, task, after: list) -> None:
        existing = self.store.get_instance(child_id)
        problem = None
        try:
            validate_instance_id(child_id)
        except DurableError as exc:
            problem = str(exc)
        if existing and existing.status not in h.TERMINAL_STATUSES:
            problem = (
                f"An orchestration with instance ID '{child_id}' already exists and is {existing.status}."
            )
        if problem:
            ev = h.event(
                h.EventType.SubOrchestrationInstanceFailed,
                h.utcnow(),
                TaskScheduledId=task_id,
                Reason=problem,
                Details="",
            )
            self.store.add_inbox(tx, parent.id, h.dumps(ev), execution_id=parent.execution_id)
            after.append(lambda: self.kick(parent.id))
            return
        spec = self.index.orchestrators.get((task.name or "").lower())
        name = spec.registered_name if spec else task.name
        self._create_instance(
            tx,
            name,
            child_id,
            task.input,
            task.version,
            existing,
            parent=(parent.id, parent.execution_id, task_id),
        )
        self._replays.pop(child_id, None)
        after.append(lambda: self.kick(child_id))

    def _notify_parent(
        self, tx, inst: Instance, *, ok: bool, result: str | None = None, reason=None, details: str = ""
    ) -> None:
        if not inst.parent_id:
            return
        if ok:
            ev = h.event(
                h.EventType.SubOrchestrationInstanceCompleted,
                h.utcnow(),
                TaskScheduledId=inst.parent_task_id,
                Result=result,
            )
        else:
            ev = h.event(
                h.EventType.SubOrchestrationInstanceFailed,
                h.utcnow(),
                TaskScheduledId=inst.parent_task_id,
                Reason=str(reason),
                Details=details,
            )
        self.store.add_inbox(tx, inst.parent_id, h.dumps(ev), execution_id=inst.parent_execution_id)

    def _append(self, tx, instance_id: str, events: list[str], start: int | None = None) -> None:
        if start is None:
            row = tx.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM history WHERE instance_id = ?", (instance_id,)
            ).fetchone()
            start = int(row[0])
        self.store.append_history(tx, instance_id, start, events)

    # activities --------------------------------------------------------------------------------
