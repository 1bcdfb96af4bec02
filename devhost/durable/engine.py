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
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime

from azure.functions import meta
from azure.functions.durable_functions import ActivityTriggerConverter

from ..app_loader import AppIndex
from ..invoker import Invoker
from . import history as h
from .episode import EpisodeResult, action_signature, nondeterminism, run_episode
from .store import Instance, Store, WorkItem

log = logging.getLogger("devhost.durable")

MAX_INSTANCE_ID = 256


class DurableError(Exception):
    """A management request the engine refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


def validate_instance_id(instance_id: str) -> None:
    if not instance_id or len(instance_id) > MAX_INSTANCE_ID:
        raise DurableError(400, f"instance ID must be 1 to {MAX_INSTANCE_ID} characters long")
    if instance_id.startswith("@"):
        raise DurableError(400, f"instance ID '{instance_id}' must not start with '@'")
    bad = [c for c in instance_id if c in "/\\?#" or ord(c) < 32 or ord(c) == 127]
    if bad:
        raise DurableError(
            400, f"instance ID '{instance_id}' contains a character that is not allowed: {bad[0]!r}"
        )


def input_column(value_text: str | None) -> str | None:
    """Instances keep their input as the JSON text of the context's ``input`` value."""
    return None if value_text is None else json.dumps(value_text)


class DurableEngine:
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
    def start(
        self, name: str, instance_id: str | None, input_text: str | None, version: str | None = None
    ) -> Instance:
        spec = self.index.orchestrators.get(name.lower())
        if spec is None:
            known = ", ".join(sorted(f"'{s.registered_name}'" for s in self.index.orchestrators.values()))
            raise DurableError(
                400,
                f"The function '{name}' doesn't exist, is disabled, or is not an orchestrator function. "
                f"Additional info: the following are the known orchestrator functions: {known or 'none'}.",
            )
        instance_id = instance_id or uuid.uuid4().hex
        validate_instance_id(instance_id)
        with self.store.transaction() as tx:
            existing = self.store.get_instance(instance_id)
            if existing and existing.status not in h.TERMINAL_STATUSES:
                raise DurableError(
                    409, f"An instance with ID '{instance_id}' already exists and is {existing.status}."
                )
            inst = self._create_instance(tx, spec.registered_name, instance_id, input_text, version, existing)
        self._replays.pop(instance_id, None)
        log.info("started instance=%s name=%s", instance_id, inst.name)
        self.kick(instance_id)
        return inst

    def _create_instance(self, tx, name, instance_id, input_text, version, existing, parent=None) -> Instance:
        if existing:
            self.store.delete_instance_rows(tx, instance_id)
        now = h.utcnow()
        inst = Instance(
            id=instance_id,
            name=name,
            version=version,
            status=h.PENDING,
            input=input_column(input_text),
            output=None,
            custom_status=None,
            created=h.iso(now),
            updated=h.iso(now),
            execution_id=uuid.uuid4().hex,
            parent_id=parent[0] if parent else None,
            parent_execution_id=parent[1] if parent else None,
            parent_task_id=parent[2] if parent else None,
            action_signature=None,
        )
        self.store.put_instance(tx, inst)
        parent_ref = (
            {
                "OrchestrationInstance": {"InstanceId": parent[0], "ExecutionId": parent[1]},
                "TaskScheduleId": parent[2],
            }
            if parent
            else None
        )
        started = h.execution_started(
            now,
            name=name,
            version=version,
            input_text=input_text,
            instance_id=instance_id,
            execution_id=inst.execution_id,
            parent=parent_ref,
        )
        self.store.add_inbox(tx, instance_id, h.dumps(started), execution_id=inst.execution_id)
        return inst

    def raise_event(self, instance_id: str, name: str, input_text: str | None) -> None:
        inst = self._require(instance_id)
        ev = h.event(h.EventType.EventRaised, h.utcnow(), Name=name, Input=input_text)
        with self.store.transaction() as tx:
            self.store.add_inbox(tx, instance_id, h.dumps(ev))
        log.info("event raised instance=%s event=%s", instance_id, name)
        if inst.status != h.SUSPENDED:
            self.kick(instance_id)

    def terminate(self, instance_id: str, reason: str) -> None:
        inst = self._require(instance_id)
        with self.store.transaction() as tx:
            self._append(
                tx, instance_id, [h.dumps(h.event(h.EventType.ExecutionTerminated, h.utcnow(), Input=reason))]
            )
            self.store.update_instance(
                tx, instance_id, status=h.TERMINATED, output=json.dumps(reason), updated=h.iso(h.utcnow())
            )
            tx.execute("DELETE FROM inbox WHERE instance_id = ?", (instance_id,))
            tx.execute("DELETE FROM work WHERE instance_id = ?", (instance_id,))
            self._notify_parent(
                tx, inst, ok=False, reason=f"Orchestration '{instance_id}' was terminated: {reason}"
            )
        self._replays.pop(instance_id, None)
        self._changed.set()
        log.info("terminated instance=%s reason=%s", instance_id, reason)

    def suspend(self, instance_id: str, reason: str) -> None:
        self._require(instance_id)
        with self.store.transaction() as tx:
            self.store.update_instance(tx, instance_id, status=h.SUSPENDED, updated=h.iso(h.utcnow()))
        log.info("suspended instance=%s reason=%s", instance_id, reason)

    def resume_instance(self, instance_id: str, reason: str) -> None:
        inst = self._require(instance_id, allow_suspended=True)
        if inst.status != h.SUSPENDED:
            return
        with self.store.transaction() as tx:
            self.store.update_instance(tx, instance_id, status=h.RUNNING, updated=h.iso(h.utcnow()))
        log.info("resumed instance=%s reason=%s", instance_id, reason)
        self.kick(instance_id)

    def purge(self, instances: list[Instance]) -> int:
        deletable = [i for i in instances if i.status in h.TERMINAL_STATUSES]
        with self.store.transaction() as tx:
            for inst in deletable:
                self.store.delete_instance_rows(tx, inst.id)
        for inst in deletable:
            self._replays.pop(inst.id, None)
        return len(deletable)

    def restart(self, instance_id: str, new_id: bool) -> Instance:
        inst = self.store.get_instance(instance_id)
        if inst is None:
            raise DurableError(404, f"No instance with ID '{instance_id}' was found.")
        input_text = json.loads(inst.input) if inst.input else None
        return self.start(inst.name, None if new_id else instance_id, input_text, inst.version)

    def _require(self, instance_id: str, *, allow_suspended: bool = True) -> Instance:
        inst = self.store.get_instance(instance_id)
        if inst is None:
            raise DurableError(404, f"No instance with ID '{instance_id}' was found.")
        if inst.status in h.TERMINAL_STATUSES:
            raise DurableError(410, f"The instance '{instance_id}' is already {inst.status}.")
        return inst

    # episodes ----------------------------------------------------------------------------------
    def _replay_for(self, inst: Instance) -> _Replay:
        replay = self._replays.get(inst.id)
        if replay is None or replay.execution_id != inst.execution_id:
            replay = _Replay(execution_id=inst.execution_id, events=[])
            replay.absorb(self.store.load_history(inst.id))
            self._replays[inst.id] = replay
        return replay

    async def _episode(self, instance_id: str) -> None:
        inst = self.store.get_instance(instance_id)
        if inst is None or inst.status == h.SUSPENDED:
            return
        rows = self.store.visible_inbox(instance_id, time.time())
        fresh = [r for r in rows if r.execution_id in (None, inst.execution_id)]
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
                self.store.update_instance(tx, inst.id, status=h.RUNNING, **fields)
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
