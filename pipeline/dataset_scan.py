"""The scan of a dataset's rows: each one checked and token-counted, the valid ones kept encoded.

The dataset step scans every row of its source; a big source (all 207,865 conversations of
ultrachat_200k's ``train_sft``) takes longer than one Functions activity may run. Given a deadline,
``scan_in_chunks`` saves what it has learned after every chunk of rows, in a folder under the run's
data directory, and stops at the first save past the deadline; the next call goes on from there:

- ``rows.jsonl``: the valid rows so far, encoded as they will be written to train/test, appended;
- ``problems.jsonl``: the problems found so far, appended;
- ``state.json``: the counts, the rows' token lengths, how many bytes of the two files are saved, where
  reading the source stands, and a fingerprint of what is scanned; replaced atomically, last.

A worker killed mid-save leaves the two files longer than ``state.json`` says: resuming cuts them back,
so no row is counted twice. A missing, unreadable or foreign state (another source, tokenizer or limit)
starts the scan over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from pipeline.chat_validation import CountTokens, Issue, Problem, ProblemReason, check_row

if TYPE_CHECKING:  # chat_dataset reads the rows and imports this module to scan them
    from pipeline.chat_dataset import SourceRow, SourceRows

log = logging.getLogger("pipeline")

STATE_VERSION = 1
# A chunk ends after this many rows or seconds, whichever comes first; the deadline is looked at only
# then, so a call overruns it by at most one chunk.
CHECKPOINT_ROWS = 5000
CHECKPOINT_SECONDS = 5.0
monotonic = time.monotonic  # the scan's clock for its deadline (one name, so a test can turn it)


@dataclass
class Scan:
    """What a pass over the rows has learned; encoded lines are kept instead of parsed rows to save memory."""

    rows_read: int = 0
    rows_invalid: int = 0
    rows_too_long: int = 0
    lines: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    assistant_tokens: int = 0
    problems: list[Problem] = field(default_factory=list)

    def take(self, row: SourceRow, count_tokens: CountTokens, max_tokens: int) -> None:
        self.rows_read += 1
        if row.error is not None:
            self.rows_invalid += 1
            self.problems.append(Issue(row.error.reason, "", row.error.message).at(row.origin))
            return
        check = check_row(row.value, count_tokens, max_tokens)
        if check.issues:
            self.rows_invalid += 1
            self.rows_too_long += check.issues[0].reason is ProblemReason.TOO_LONG
            self.problems.extend(issue.at(row.origin) for issue in check.issues)
            return
        self.lines.append(_encode({"messages": check.messages}))
        self.lengths.append(check.total_tokens)
        self.assistant_tokens += check.assistant_tokens


_encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps(**kw) builds one per call


def scan_rows(rows: Iterable[SourceRow], count_tokens: CountTokens, max_tokens: int) -> Scan:
    """The whole scan in one go, nothing saved."""
    scan = Scan()
    for row in rows:
        scan.take(row, count_tokens, max_tokens)
    return scan


def scan_in_chunks(
    rows: SourceRows,
    count_tokens: CountTokens,
    max_tokens: int,
    checkpoint: ScanCheckpoint,
    until: float,
) -> Scan | ScanProgress:
    """The scan from where ``checkpoint`` stands, saved after every chunk; it stops at the first save
    once ``monotonic()`` has reached ``until``, so every call scans at least one chunk. A worker killed
    mid-chunk loses that chunk only: the next call reads its rows again."""
    scan, position = checkpoint.resume()
    rows.start_after(position)
    chunk_rows, chunk_started = 0, monotonic()
    for row in rows:
        scan.take(row, count_tokens, max_tokens)
        chunk_rows += 1
        now = monotonic()
        if chunk_rows >= CHECKPOINT_ROWS or now - chunk_started >= CHECKPOINT_SECONDS:
            checkpoint.save(scan, rows.position())
            if now >= until:
                return ScanProgress(rows_scanned=scan.rows_read, rows_invalid=scan.rows_invalid)
            chunk_rows, chunk_started = 0, now
    return scan


class ReadPosition(BaseModel):
    """Where reading a source stands: rows handed out so far, and a hub stream's ``state_dict()`` then."""

    rows: int = 0
    stream_state: dict[str, Any] | None = None


class ScanProgress(BaseModel):
    """A scan that ran out of its call's time: how far it got (saved; the next call goes on from there)."""

    rows_scanned: int
    rows_invalid: int

    def __str__(self) -> str:
        invalid = f" ({self.rows_invalid:,} invalid so far)" if self.rows_invalid else ""
        return f"scanned {self.rows_scanned:,} rows of the source{invalid}"


class _State(BaseModel):
    """``state.json``: a scan's counts and where its files and its reading stand."""

    version: int = STATE_VERSION
    fingerprint: str
    position: ReadPosition = ReadPosition()
    rows_read: int = 0
    rows_invalid: int = 0
    rows_too_long: int = 0
    assistant_tokens: int = 0
    lengths: list[int] = []
    lines: int = 0  # how many lines of rows.jsonl are saved
    lines_bytes: int = 0  # and their size
    problems: int = 0
    problems_bytes: int = 0


class ScanCheckpoint:
    """The saved progress of one scan in ``folder``; ``fingerprint`` names what is scanned and how."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint
        self.rows_file, self.problems_file = folder / "rows.jsonl", folder / "problems.jsonl"
        self.state_file = folder / "state.json"
        self._saved = _State(fingerprint=fingerprint)

    def resume(self) -> tuple[Scan, ReadPosition]:
        """The scan as last saved and where to read on; an empty scan from the start if there is none."""
        state = self._read_state()
        saved = self._saved_parts(state) if state is not None else None
        if state is None or saved is None:
            self.clear()
            return Scan(), ReadPosition()
        lines, problems = saved
        self._saved = state
        scan = Scan(
            rows_read=state.rows_read,
            rows_invalid=state.rows_invalid,
            rows_too_long=state.rows_too_long,
            lines=lines,
            lengths=state.lengths,
            assistant_tokens=state.assistant_tokens,
            problems=problems,
        )
        return scan, state.position

    def save(self, scan: Scan, position: ReadPosition) -> None:
        """Append what is new since the last save, then record it all in ``state.json``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        before = self._saved
        new_lines = "".join([line + "\n" for line in scan.lines[before.lines :]])
        new_problems = "".join(
            [p.model_dump_json(exclude_none=True) + "\n" for p in scan.problems[before.problems :]]
        )
        state = _State(
            fingerprint=self.fingerprint,
            position=position,
            rows_read=scan.rows_read,
            rows_invalid=scan.rows_invalid,
            rows_too_long=scan.rows_too_long,
            assistant_tokens=scan.assistant_tokens,
            lengths=scan.lengths,
            lines=len(scan.lines),
            lines_bytes=before.lines_bytes + _append(self.rows_file, new_lines),
            problems=len(scan.problems),
            problems_bytes=before.problems_bytes + _append(self.problems_file, new_problems),
        )
        write_atomically(self.state_file, state.model_dump_json().encode("utf-8"))
        self._saved = state

    def clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _read_state(self) -> _State | None:
        if not self.state_file.is_file():
            return None
        try:
            state = _State.model_validate_json(self.state_file.read_bytes())
        except ValidationError as error:  # e.g. the disk lost what a crash had not yet flushed
            log.warning("dataset scan: %s is unreadable, scanning from the start: %s", self.state_file, error)
            return None
        if state.version != STATE_VERSION or state.fingerprint != self.fingerprint:
            log.info("dataset scan: %s is of another source or settings; scanning over", self.folder)
            return None
        return state

    def _saved_parts(self, state: _State) -> tuple[list[str], list[Problem]] | None:
        """The saved lines and problems, the files cut back to what ``state`` counts; None if short."""
        for path, size in ((self.rows_file, state.lines_bytes), (self.problems_file, state.problems_bytes)):
            if (path.stat().st_size if path.exists() else 0) < size:
                log.warning("dataset scan: %s is shorter than its state says; scanning from the start", path)
                return None
            if path.exists():
                os.truncate(path, size)  # what a save killed before its state.json had appended
        lines = _read_lines(self.rows_file)
        problems = [Problem.model_validate_json(line) for line in _read_lines(self.problems_file)]
        if len(lines) != state.lines or len(problems) != state.problems:
            log.warning("dataset scan: %s holds other rows than its state says; scanning over", self.folder)
            return None
        return lines, problems


def _append(path: Path, text: str) -> int:
    """Append ``text`` and make it durable before the state that counts it is written; its byte size."""
    data = text.encode("utf-8")
    with path.open("ab") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return len(data)


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    # Only "\n" ends a line: JSON escapes it inside strings, but not U+2028 and its kind.
    with path.open(encoding="utf-8", newline="\n") as file:
        return [line[:-1] for line in file]


def write_atomically(path: Path, data: bytes) -> None:
    """Readers (a retried activity checking for existing output, a call resuming after a crash) see the
    old file or the new one, never a part of one, even after the machine went down."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
