"""The dataset step shared by both backends: read chat rows, validate them, split 80/20, write JSONL.

``load_rows`` reads a Hugging Face hub split (streamed, so ``train_sft[:1%]`` does not download the
whole set) or local JSONL / Parquet files / directories saved with ``datasets``. ``prepare_dataset``
validates every row (see ``chat_validation``), splits them exactly like ``Dataset.train_test_split``
with the same seed, writes ``train.jsonl`` and ``test.jsonl`` holding ``{"messages": [...]}`` only,
and returns a compact ``DatasetReport`` that is safe to hand to Durable. Blank JSONL lines are
skipped silently; line numbers in problems are always physical line numbers.

A big source takes longer to scan than one Functions activity may run: given ``until``, the scan saves
its progress every few thousand rows (``dataset_scan``) and a call that has run out of time hands back a
``ScanProgress``; the next call goes on from the saved row, and the files come out the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.chat_validation import (
    APPROX_TOKENIZER,
    MESSAGE_KEYS,
    CountTokens,
    DatasetError,
    DatasetReport,
    InvalidDatasetError,
    OutputFile,
    Problem,
    ProblemReason,
    RowOrigin,
    TokenStats,
    approx_token_count,
    json_refusal,
    token_stats,
    tokenizer_counter,
)
from pipeline.dataset_scan import (
    ReadPosition,
    Scan,
    ScanCheckpoint,
    ScanProgress,
    scan_in_chunks,
    scan_rows,
    write_atomically,
)

__all__ = [
    "DatasetError",
    "DatasetReport",
    "DatasetSource",
    "DatasetSourceError",
    "DatasetTooSmallError",
    "HubDataset",
    "InvalidDatasetError",
    "LocalFiles",
    "OutputFile",
    "Problem",
    "ProblemReason",
    "ReadPosition",
    "ScanProgress",
    "SourceRow",
    "SourceRows",
    "TokenStats",
    "load_rows",
    "prepare_dataset",
    "resolve_split_slice",
    "split_indices",
    "tokenizer_counter",
]

TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"
PROBLEMS_FILE = "problems.json"
SCAN_DIR = "scan"  # under out_dir: the progress of a scan with a deadline
MAX_LISTED_PROBLEMS = 50
_PARQUET_BATCH_ROWS = 2048


class DatasetSourceError(DatasetError):
    """The source cannot be read at all (missing file, unknown format, hub unreachable)."""


class DatasetTooSmallError(DatasetError):
    """Too few valid rows to give both the train and the test split at least one row."""


class HubDataset(BaseModel):
    """A split of a Hugging Face hub dataset, e.g. ultrachat_200k ``train_sft[:1%]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["hub"] = "hub"
    id: str = "HuggingFaceH4/ultrachat_200k"
    split: str = "train_sft[:1%]"
    config_name: str | None = None


class LocalFiles(BaseModel):
    """JSONL / Parquet files, or directories (saved with ``datasets``, or holding such files)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["files"] = "files"
    paths: list[Path] = Field(min_length=1)
    split: str | None = None  # which split of a saved DatasetDict directory


DatasetSource = HubDataset | LocalFiles


@dataclass(frozen=True, slots=True)
class UnreadableRow:
    reason: ProblemReason
    message: str


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One raw row and where it came from; ``error`` is set when the row could not even be parsed."""

    origin: RowOrigin
    value: Any = None
    error: UnreadableRow | None = None


# ---------------------------------------------------------------------------------------------- reading


def load_rows(source: DatasetSource | str | os.PathLike[str]) -> SourceRows:
    """Rows of a hub split or of local files, in order, each with its origin (file + line or row)."""
    if isinstance(source, HubDataset | LocalFiles):
        return SourceRows(source)
    return SourceRows(LocalFiles(paths=[Path(source)]))


class SourceRows(Iterator[SourceRow]):
    """The rows of a source, read as they are asked for; ``position`` says where reading stands after
    the last row handed out, and another reader of the same source can ``start_after`` it."""

    def __init__(self, source: DatasetSource) -> None:
        self.source = source
        self._start = ReadPosition()
        self._handed_out = 0
        self._rows: Iterator[SourceRow] | None = None
        self._stream: Any = None  # a hub split's IterableDataset, once it is open

    def start_after(self, position: ReadPosition) -> None:
        """Skip the rows before ``position`` (a hub stream goes on from its saved state)."""
        if self._rows is not None:
            raise RuntimeError("start_after must come before the first row is read")
        self._start = position

    def position(self) -> ReadPosition:
        state = self._stream.state_dict() if self._stream is not None else self._start.stream_state
        return ReadPosition(rows=self._start.rows + self._handed_out, stream_state=state)

    def __next__(self) -> SourceRow:
        if self._rows is None:
            self._rows = self._read()
        row = next(self._rows)
        self._handed_out += 1
        return row

    def _read(self) -> Iterator[SourceRow]:
        if isinstance(self.source, HubDataset):
            return _read_hub(self.source, self._start, self._opened)
        return _read_files(self.source, self._start.rows)

    def _opened(self, stream: Any) -> None:
        self._stream = stream


# Each reader skips the first ``skip`` rows (still counting them for rows' origins) and returns how many
# it skipped, so that the rest of the skip falls on the next file.
RowReader = Generator[SourceRow, None, int]


def _read_files(files: LocalFiles, skip: int) -> Iterator[SourceRow]:
    for path in files.paths:
        skip -= yield from _read_path(Path(path), files.split, skip)


def _read_path(path: Path, split: str | None, skip: int) -> RowReader:
    if path.is_dir():
        if _is_saved_dataset(path):
            return (yield from _read_saved_dataset(path, split, skip))
        members = _members(path)
        if not members:
            raise DatasetSourceError(
                f"dataset directory {path} holds neither a dataset saved with datasets' save_to_disk "
                "nor any .jsonl or .parquet file"
            )
        skipped = 0
        for member in members:
            skipped += yield from _read_path(member, split, skip - skipped)
        return skipped
    elif not path.exists():
        raise DatasetSourceError(f"dataset file {path} does not exist; check dataset.files")
    elif path.suffix.lower() == ".jsonl":  # Windows tools write CHATS.JSONL as readily
        return (yield from _read_jsonl(path, skip))
    elif path.suffix.lower() == ".parquet":
        return (yield from _read_parquet(path, skip))
    else:
        raise DatasetSourceError(
            f"dataset file {path} has suffix '{path.suffix}'; supported: .jsonl (one JSON object per line), "
            ".parquet, or a directory saved with datasets' save_to_disk"
        )


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "dataset_dict.json").exists() or (directory / "state.json").exists()


def _members(directory: Path) -> list[Path]:
    """The files read from a directory that was not saved with ``datasets``."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jsonl", ".parquet"))


def is_dataset_folder(directory: Path) -> bool:
    """A folder ``load_rows`` reads: saved by datasets' ``save_to_disk``, or holding .jsonl/.parquet files."""
    return _is_saved_dataset(directory) or bool(_members(directory))


def _read_jsonl(path: Path, skip: int = 0) -> RowReader:
    # Read the lines ourselves: datasets' json loader stops at the first bad line without saying which.
    row = 0
    with path.open("rb") as lines:
        _refuse_wide_encoding(path, lines.read(4))
        lines.seek(0)
        for line_number, raw in enumerate(lines, start=1):
            if raw.isspace():
                continue
            origin = RowOrigin(path.name, row, line_number)
            row += 1
            if row <= skip:
                continue
            try:
                value = json.loads(raw)
            except UnicodeDecodeError as error:
                yield SourceRow(origin, error=UnreadableRow(ProblemReason.INVALID_ENCODING, _bad_utf8(error)))
                continue
            except json.JSONDecodeError as error:
                message = _json_error(error)
                yield SourceRow(origin, error=UnreadableRow(ProblemReason.INVALID_JSON, message))
                continue
            except (RecursionError, ValueError) as error:  # too deep, or a number of 4300+ digits
                yield SourceRow(origin, error=UnreadableRow(ProblemReason.INVALID_JSON, json_refusal(error)))
                continue
            lone = _lone_surrogate(value) if _SURROGATE_HINT.search(raw) else None
            if lone is not None:
                message = (
                    f"contains \\u{ord(lone):04x}, half of a UTF-16 surrogate pair and not text (a tool "
                    "cut a character in two?); fix or drop the row"
                )
                yield SourceRow(origin, error=UnreadableRow(ProblemReason.INVALID_ENCODING, message))
                continue
            yield SourceRow(origin, value)
    return min(row, skip)


def _json_error(error: json.JSONDecodeError) -> str:
    if error.msg.startswith("Invalid control character"):  # json's message ends in "at", for a position
        character = f"U+{ord(error.doc[error.pos]):04X}"
        return (
            f"not valid JSON: a raw control character ({character}) inside a string at column {error.colno}; "
            "JSON needs it escaped (\\t, \\n, \\u0000)"
        )
    return f"not valid JSON: {error.msg} at column {error.colno}"


def _refuse_wide_encoding(path: Path, head: bytes) -> None:
    """A UTF-16 or UTF-32 file (Notepad's "Unicode") split at b"\n" would be read line by line in pieces:
    ``json.loads`` guesses each piece's encoding anew, so most rows would pass and the rest fail as bad
    UTF-8. Whole-file, it is one clear error instead."""
    encoding = json.detect_encoding(head)  # the guess json.loads makes: a BOM, or NULs in JSON's first bytes
    if not encoding.startswith("utf-8"):
        raise DatasetSourceError(
            f"dataset file {path} is encoded as {encoding.upper()}, not UTF-8; JSONL must be UTF-8: save it "
            "again as UTF-8 (in Notepad: Save As, Encoding: UTF-8)"
        )


def _bad_utf8(error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {error.start + 1}); save the file as UTF-8"


# json.loads lets surrogates through: escaped (\ud83d) and, from bytes, encoded (ED A0 BD). A pair makes
# one character; what is left alone cannot be encoded as UTF-8 later. The hint keeps clean lines cheap.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    found = _SURROGATE.search(json.dumps(value, ensure_ascii=False))
    return found.group() if found else None


def _read_parquet(path: Path, skip: int = 0) -> RowReader:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetSourceError(f"dataset file {path} is not a readable Parquet file: {error}") from error
    if skip >= parquet.metadata.num_rows:
        return parquet.metadata.num_rows
    return (yield from _read_batches(_parquet_batches(parquet, path), path.name, skip))


def _parquet_batches(parquet: Any, path: Path) -> Iterator[Any]:
    """The file's record batches; a damaged page is an error naming the file and where, not Arrow's bare
    "Corrupt snappy compressed data"."""
    import pyarrow as pa

    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:
            reason = str(error).strip()
            raise DatasetSourceError(
                f"dataset file {path} cannot be read from row {row} on, the file is damaged: {reason}; "
                "write it again, or leave it out of dataset.files"
            ) from error
        row += batch.num_rows
        yield batch


def _read_batches(batches: Iterable[Any], name: str, skip: int) -> RowReader:
    """Rows of Arrow record batches or tables; a batch wholly skipped is never turned into Python."""
    row = 0
    for batch in batches:
        first = min(max(skip - row, 0), batch.num_rows)
        for index, value in enumerate(batch.slice(first).to_pylist(), start=row + first):
            yield SourceRow(RowOrigin(name, index), _without_absent_message_keys(value))
        row += batch.num_rows
    return min(row, skip)


def _without_absent_message_keys(value: Any) -> Any:
    """An Arrow column of messages has one struct type for all of them: a ``name`` on one message gives
    every other message ``name: None``. Such a null key was absent in the source, so it is dropped here;
    one with a value is kept, for validation to report."""
    messages = value.get("messages") if isinstance(value, dict) else None
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and len(message) > len(MESSAGE_KEYS):
                for key in [k for k, v in message.items() if v is None and k not in MESSAGE_KEYS]:
                    del message[key]
    return value


def _read_saved_dataset(path: Path, split: str | None, skip: int) -> RowReader:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    name = path.name
    if isinstance(loaded, datasets.DatasetDict):
        split = split or (next(iter(loaded)) if len(loaded) == 1 else "train")
        if split not in loaded:
            raise DatasetSourceError(
                f"dataset directory {path} has splits {', '.join(loaded)}; set dataset.split to one of them"
            )
        loaded, name = loaded[split], f"{path.name}/{split}"
    batches = loaded.with_format("arrow").iter(batch_size=_PARQUET_BATCH_ROWS)
    return (yield from _read_batches(batches, name, skip))


@dataclass(frozen=True)
class SplitSlice:
    split: str
    start: int
    stop: int | None  # None: to the end of the split


def resolve_split_slice(spec: str, split_sizes: dict[str, int] | None) -> SplitSlice:
    """Turn ``train_sft[:1%]`` into absolute rows, rounding like ``datasets`` does without streaming."""
    instruction = _parse_split(spec)
    relative = instruction._relative_instructions[0]
    if not split_needs_size(spec):
        return SplitSlice(relative.splitname, relative.from_ or 0, relative.to)
    if split_sizes and relative.splitname not in split_sizes:
        raise DatasetSourceError(
            f"dataset.split '{spec}' names split '{relative.splitname}', which the dataset does not have; "
            f"its splits: {', '.join(split_sizes)}"
        )
    size = (split_sizes or {}).get(relative.splitname)
    if not size:
        raise DatasetSourceError(
            f"dataset.split '{spec}' needs the size of split '{relative.splitname}', which the dataset "
            f"does not publish; use an absolute row slice such as '{relative.splitname}[:2000]'"
        )
    absolute = instruction.to_absolute({relative.splitname: size})[0]
    return SplitSlice(relative.splitname, absolute.from_, absolute.to)


def split_needs_size(spec: str) -> bool:
    """Percent and negative slices are relative to the split's length; streaming cannot resolve them."""
    relative = _parse_split(spec)._relative_instructions[0]
    return relative.unit == "%" or (relative.from_ or 0) < 0 or (relative.to or 0) < 0


def _parse_split(spec: str) -> Any:
    from datasets import ReadInstruction

    try:
        instruction = ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as error:
        raise DatasetSourceError(f"dataset.split '{spec}' is not a split expression: {error}") from error
    if len(instruction._relative_instructions) != 1:
        raise DatasetSourceError(f"dataset.split '{spec}' combines splits with '+'; name one split")
    return instruction


def _read_hub(source: HubDataset, start: ReadPosition, opened: Callable[[Any], None]) -> Iterator[SourceRow]:
    """The rows of a hub split, streamed; from ``start`` on (the stream's saved state: whole shards are
    skipped unread), handing the stream to ``opened`` so that its state can be saved in turn."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        sizes = None
        if split_needs_size(source.split):
            builder = datasets.load_dataset_builder(source.id, source.config_name)
            splits = builder.info.splits or {}
            sizes = {name: info.num_examples for name, info in splits.items()}
        chosen = resolve_split_slice(source.split, sizes)
        try:
            stream = datasets.load_dataset(source.id, source.config_name, split=chosen.split, streaming=True)
        except ValueError as error:
            if "Bad split" not in str(error):
                raise
            raise DatasetSourceError(f"dataset.split '{source.split}': {error}") from error
        if chosen.start:
            stream = stream.skip(chosen.start)
        if chosen.stop is not None:
            stream = stream.take(max(chosen.stop - chosen.start, 0))
        if start.stream_state is not None:
            stream.load_state_dict(start.stream_state)
        opened(stream)
        label = f"{source.id}:{chosen.split}"  # rows are numbered from the start of the whole split
        for row, value in enumerate(stream, start=chosen.start + start.rows):
            yield SourceRow(RowOrigin(label, row), _without_absent_message_keys(value))
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as error:
        raise DatasetSourceError(
            f"could not read Hugging Face dataset '{source.id}' split '{source.split}': {error}. "
            "If this machine is offline or cannot reach huggingface.co, point the dataset at local files "
            "instead (JSONL or Parquet, or a directory saved with datasets' save_to_disk)"
        ) from error


# ---------------------------------------------------------------------------------------------- preparing


def prepare_dataset(
    rows: Iterable[SourceRow],
    *,
    out_dir: str | os.PathLike[str],
    test_size: float = 0.2,
    seed: int = 42,
    drop_invalid: bool = False,
    count_tokens: CountTokens | None = None,
    tokenizer_name: str | None = None,
    max_tokens: int = 4096,
    epochs: float = 3,
    until: float | None = None,
) -> DatasetReport | ScanProgress:
    """Validate, split, write ``train.jsonl`` + ``test.jsonl`` under ``out_dir``; same input, same bytes.

    With ``until`` (a ``dataset_scan.monotonic()`` value) the scan saves its progress under
    ``out_dir/scan`` after every chunk of rows and, once past ``until``, hands back a ``ScanProgress``;
    the next call with the same arguments goes on from there (so ``rows`` must come from ``load_rows``).
    Every call scans at least one chunk; the files and the report are the same as one call's.
    """
    _check_settings(test_size, max_tokens, epochs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer: str = tokenizer_name or (
        APPROX_TOKENIZER if count_tokens is None else str(getattr(count_tokens, "__name__", "custom"))
    )
    count = count_tokens or approx_token_count
    if until is None:
        scan: Scan | ScanProgress = scan_rows(rows, count, max_tokens)
        checkpoint = None
    else:
        if not isinstance(rows, SourceRows):
            raise TypeError("prepare_dataset(until=...) resumes reading where a call stopped: use load_rows")
        checkpoint = ScanCheckpoint(out / SCAN_DIR, _fingerprint(rows.source, tokenizer, max_tokens))
        scan = scan_in_chunks(rows, count, max_tokens, checkpoint, until)
    if isinstance(scan, ScanProgress):
        return scan
    try:
        return _split_and_write(scan, out, test_size, seed, drop_invalid, tokenizer, max_tokens, epochs)
    finally:  # the scan is whole in memory now; its saved copy would only double the run's data on disk
        if checkpoint is not None:
            checkpoint.clear()


def _check_settings(test_size: float, max_tokens: int, epochs: float) -> None:
    if not 0 < test_size < 1:
        raise DatasetError(f"dataset.test_size must be between 0 and 1 (exclusive), got {test_size}")
    if max_tokens < 1:
        raise DatasetError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    if epochs <= 0:
        raise DatasetError(f"epochs must be positive, got {epochs}")


def _split_and_write(
    scan: Scan,
    out: Path,
    test_size: float,
    seed: int,
    drop_invalid: bool,
    tokenizer: str,
    max_tokens: int,
    epochs: float,
) -> DatasetReport:
    if scan.rows_read == 0:
        raise DatasetError("the dataset source has no rows; check dataset.files or dataset.split")
    problems_file = _write_problems(out / PROBLEMS_FILE, scan.problems)
    report = DatasetReport(
        rows_read=scan.rows_read,
        rows_valid=scan.rows_read - scan.rows_invalid,
        rows_invalid=scan.rows_invalid,
        rows_dropped=scan.rows_invalid if drop_invalid else 0,
        train_rows=0,
        test_rows=0,
        test_size=test_size,
        seed=seed,
        epochs=epochs,
        problem_counts=dict(sorted(Counter(p.reason.value for p in scan.problems).items())),
        first_problems=scan.problems[:MAX_LISTED_PROBLEMS],
        problems_file=problems_file,
        tokens=token_stats(scan.lengths, scan.assistant_tokens, scan.rows_too_long, tokenizer, max_tokens),
        estimated_training_tokens=0,
    )
    if scan.rows_invalid and not drop_invalid:
        raise InvalidDatasetError(report)
    test_rows, train_rows = split_indices(len(scan.lines), test_size, seed, dropped=scan.rows_invalid)
    trained_tokens = sum(min(scan.lengths[i], max_tokens) for i in train_rows)
    return report.model_copy(
        update={
            "train_rows": len(train_rows),
            "test_rows": len(test_rows),
            "estimated_training_tokens": round(trained_tokens * epochs),
            "train_file": _write_jsonl(out / TRAIN_FILE, scan.lines, train_rows),
            "test_file": _write_jsonl(out / TEST_FILE, scan.lines, test_rows),
        }
    )


def _fingerprint(source: DatasetSource, tokenizer: str, max_tokens: int) -> str:
    """What a saved scan is of: the source (with its files' sizes and times), the tokenizer and the limit."""
    files: list[tuple[str, int, int]] = []
    reader = None
    if isinstance(source, HubDataset):
        import datasets

        reader = datasets.__version__  # a saved stream state is the library's own structure
    else:
        for path in map(Path, source.paths):
            if not path.is_dir():
                members = [path]
            elif _is_saved_dataset(path):
                members = sorted(p for p in path.rglob("*") if p.is_file())
            else:
                members = _members(path)
            files += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in members if p.exists()]
    described = {
        "source": source.model_dump(mode="json"),
        "files": files,
        "reader": reader,
        "tokenizer": tokenizer,
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode("utf-8")).hexdigest()


def split_indices(
    n_rows: int, test_size: float, seed: int, *, dropped: int = 0
) -> tuple[list[int], list[int]]:
    """(test, train) row indices, the same permutation ``Dataset.train_test_split(test_size, seed)`` picks."""
    n_test = math.ceil(test_size * n_rows)
    if n_test < 1 or n_rows - n_test < 1:
        after = f" after dropping {dropped} invalid rows" if dropped else ""
        raise DatasetTooSmallError(
            f"{n_rows} valid rows{after} cannot be split with test_size={test_size} so that both train and "
            f"test get at least one row (test would get {n_test}); add rows or change dataset.test_size"
        )
    permutation = np.random.default_rng(seed).permutation(n_rows).tolist()
    return permutation[:n_test], permutation[n_test:]


def _write_jsonl(path: Path, lines: Sequence[str], order: Sequence[int]) -> OutputFile:
    data = "".join([lines[i] + "\n" for i in order]).encode("utf-8")
    write_atomically(path, data)
    digest = hashlib.sha256(data).hexdigest()
    return OutputFile(path=str(path), sha256=digest, rows=len(order), bytes=len(data))


def _write_problems(path: Path, problems: list[Problem]) -> str | None:
    if not problems:
        path.unlink(missing_ok=True)  # a stale list from an earlier run would contradict this report
        return None
    document = [problem.model_dump(mode="json", exclude_none=True) for problem in problems]
    write_atomically(path, json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8"))
    return str(path)
