"""SQLite state of the devhost's Durable task hub.

One file under the state directory holds instances, their history, an inbox of new events (start,
activity results, timers with a visibility time, raised events, sub-orchestration results) and the
queue of activities to run. Each orchestrator episode commits in one transaction, so a process
killed at any moment restarts from a consistent state: unconsumed inbox rows are replayed, pending
timers re-armed, activities without a recorded result re-run (at-least-once, like the real host).
WAL + synchronous=NORMAL is durable against a killed process, which is what a dev host needs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  version TEXT,
  status TEXT NOT NULL,
  input TEXT,
  output TEXT,
  custom_status TEXT,
  created TEXT NOT NULL,
  updated TEXT NOT NULL,
  execution_id TEXT NOT NULL,
  parent_id TEXT,
  parent_execution_id TEXT,
  parent_task_id INTEGER,
  action_signature TEXT
);
CREATE INDEX IF NOT EXISTS instances_status ON instances(status);
CREATE TABLE IF NOT EXISTS history (
  instance_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  event TEXT NOT NULL,
  PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  instance_id TEXT NOT NULL,
  execution_id TEXT,
  event TEXT NOT NULL,
  visible_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_instance ON inbox(instance_id, visible_at);
CREATE TABLE IF NOT EXISTS work (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  instance_id TEXT NOT NULL,
  execution_id TEXT NOT NULL,
  task_id INTEGER NOT NULL,
  name TEXT NOT NULL,
  input TEXT
);
CREATE INDEX IF NOT EXISTS work_instance ON work(instance_id);
CREATE TABLE IF NOT EXISTS timer_status (
  function TEXT PRIMARY KEY,
  last TEXT, next TEXT, last_updated TEXT
);
"""


@dataclass
class Instance:
    id: str
    name: str
    version: str | None
    status: str
    input: str | None
    output: str | None
    custom_status: str | None
    created: str
    updated: str
    execution_id: str
    parent_id: str | None
    parent_execution_id: str | None
    parent_task_id: int | None
    action_signature: str | None


@dataclass
class InboxRow:
    id: int
    instance_id: str
    execution_id: str | None
    event: str
    visible_at: float


@dataclass
class WorkItem:
    id: int
    instance_id: str
    execution_id: str
    task_id: int
    name: str
    input: str | None


_INSTANCE_COLS = ", ".join(Instance.__dataclass_fields__)


class Store:
    """Thin typed access to the task hub database; every method is one statement or one transaction."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # instances ---------------------------------------------------------------------------------
    def get_instance(self, instance_id: str) -> Instance | None:
        row = self.db.execute(
            f"SELECT {_INSTANCE_COLS} FROM instances WHERE id = ?", (instance_id,)
        ).fetchone()
        return Instance(*row) if row else None

    def query_instances(
        self, where: str = "", args: Iterable = (), limit: int | None = None
    ) -> list[Instance]:
        sql = f"SELECT {_INSTANCE_COLS} FROM instances {where} ORDER BY created, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Instance(*r) for r in self.db.execute(sql, tuple(args))]

    @staticmethod
    def put_instance(tx: sqlite3.Connection, inst: Instance) -> None:
        cols = list(Instance.__dataclass_fields__)
        tx.execute(
            f"INSERT OR REPLACE INTO instances ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            tuple(getattr(inst, c) for c in cols),
        )

    @staticmethod
    def update_instance(tx: sqlite3.Connection, instance_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        tx.execute(f"UPDATE instances SET {sets} WHERE id = ?", (*fields.values(), instance_id))

    @staticmethod
    def delete_instance_rows(
        tx: sqlite3.Connection, instance_id: str, *, keep_instance: bool = False
    ) -> None:
        for table, col in (("history", "instance_id"), ("inbox", "instance_id"), ("work", "instance_id")):
            tx.execute(f"DELETE FROM {table} WHERE {col} = ?", (instance_id,))
        if not keep_instance:
            tx.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    # history -----------------------------------------------------------------------------------
    def load_history(self, instance_id: str) -> list[str]:
        rows = self.db.execute("SELECT event FROM history WHERE instance_id = ? ORDER BY seq", (instance_id,))
        return [r[0] for r in rows]

    @staticmethod
    def append_history(tx: sqlite3.Connection, instance_id: str, start_seq: int, events: list[str]) -> None:
        tx.executemany(
            "INSERT INTO history (instance_id, seq, event) VALUES (?, ?, ?)",
            [(instance_id, start_seq + i, e) for i, e in enumerate(events)],
        )

    # inbox -------------------------------------------------------------------------------------
    @staticmethod
    def add_inbox(
        tx: sqlite3.Connection,
        instance_id: str,
        event: str,
        *,
        execution_id: str | None = None,
        visible_at: float = 0.0,
    ) -> None:
        tx.execute(
            "INSERT INTO inbox (instance_id, execution_id, event, visible_at) VALUES (?, ?, ?, ?)",
            (instance_id, execution_id, event, visible_at),
        )

    def visible_inbox(self, instance_id: str, now: float) -> list[InboxRow]:
        rows = self.db.execute(
            "SELECT id, instance_id, execution_id, event, visible_at FROM inbox "
            "WHERE instance_id = ? AND visible_at <= ? ORDER BY id",
            (instance_id, now),
        )
        return [InboxRow(*r) for r in rows]

    def future_inbox(self, now: float) -> list[tuple[str, float]]:
        rows = self.db.execute(
            "SELECT instance_id, MIN(visible_at) FROM inbox WHERE visible_at > ? GROUP BY instance_id", (now,)
        )
        return [(r[0], r[1]) for r in rows]

    def instances_with_visible_inbox(self, now: float) -> list[str]:
        return [
            r[0]
            for r in self.db.execute("SELECT DISTINCT instance_id FROM inbox WHERE visible_at <= ?", (now,))
        ]

    @staticmethod
    def delete_inbox(tx: sqlite3.Connection, ids: list[int]) -> None:
        tx.executemany("DELETE FROM inbox WHERE id = ?", [(i,) for i in ids])

    # work (activities) ---------------------------------------------------------------------------
    @staticmethod
    def add_work(tx: sqlite3.Connection, item: WorkItem) -> int:
        cur = tx.execute(
            "INSERT INTO work (instance_id, execution_id, task_id, name, input) VALUES (?, ?, ?, ?, ?)",
            (item.instance_id, item.execution_id, item.task_id, item.name, item.input),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def all_work(self) -> list[WorkItem]:
        rows = self.db.execute(
            "SELECT id, instance_id, execution_id, task_id, name, input FROM work ORDER BY id"
        )
        return [WorkItem(*r) for r in rows]

    def complete_work(self, item: WorkItem, result_event: str) -> bool:
        """Record an activity's result; False when the work was dropped meanwhile (terminated, purged)."""
        with self.transaction() as tx:
            if tx.execute("DELETE FROM work WHERE id = ?", (item.id,)).rowcount != 1:
                return False
            self.add_inbox(tx, item.instance_id, result_event, execution_id=item.execution_id)
        return True

    # timer trigger status ------------------------------------------------------------------------
    def get_timer_status(self, function: str) -> tuple[str, str, str] | None:
        row = self.db.execute(
            "SELECT last, next, last_updated FROM timer_status WHERE function = ?", (function,)
        ).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def put_timer_status(self, function: str, last: str, nxt: str, last_updated: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO timer_status (function, last, next, last_updated) VALUES (?, ?, ?, ?)",
            (function, last, nxt, last_updated),
        )
