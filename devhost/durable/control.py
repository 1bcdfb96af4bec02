"""Client operations on instances — what the management API asks of the engine: start, raise an
event, terminate, suspend/resume, purge, restart. Each is one transaction on the task hub.
"""

from __future__ import annotations

import json
import logging
import uuid

from . import history as h
from .store import Instance

log = logging.getLogger("devhost.durable")

MAX_INSTANCE_ID = 256


class DurableError(Exception):
    """A management request the engine refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


class InstanceControl:
    """Mixin of DurableEngine (uses its store, index, kick(), _append(), _notify_parent(), _replays)."""

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
        """Queued, as the extension queues it: the instance reads as before until its next episode
        applies it, and an episode already under way commits what it decided first."""
        self._require(instance_id)
        ended = h.event(h.EventType.ExecutionTerminated, h.utcnow(), Input=reason)
        with self.store.transaction() as tx:
            self.store.add_inbox(tx, instance_id, h.dumps(ended))
        log.info("terminate queued instance=%s reason=%s", instance_id, reason)
        self.kick(instance_id)

    def _apply_termination(self, inst: Instance, event_json: str) -> None:
        reason = json.loads(event_json).get("Input")
        with self.store.transaction() as tx:
            self._append(tx, inst.id, [event_json])
            self.store.update_instance(
                tx, inst.id, status=h.TERMINATED, output=json.dumps(reason), updated=h.iso(h.utcnow())
            )
            tx.execute("DELETE FROM inbox WHERE instance_id = ?", (inst.id,))
            tx.execute("DELETE FROM work WHERE instance_id = ?", (inst.id,))
            self._notify_parent(
                tx, inst, ok=False, reason=f"Orchestration '{inst.id}' was terminated: {reason}"
            )
        self._replays.pop(inst.id, None)
        self._changed.set()
        log.info("terminated instance=%s reason=%s", inst.id, reason)

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
