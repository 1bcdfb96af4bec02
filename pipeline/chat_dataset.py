"""The dataset step shared by both backends: read chat rows, validate them, split 80/20, write JSONL.

``load_rows`` reads a Hugging Face hub split (streamed, so ``train_sft[:1%]`` does not download the
whole set) or local JSONL / Parquet files / directories saved with ``datasets``. ``prepare_dataset``
validates every row (see ``chat_validation``), splits them exactly like ``Dataset.train_test_split``
with the same seed, writes ``train.jsonl`` and ``test.jsonl`` holding ``{"messages": [...]}`` only,
and returns a compact ``DatasetReport`` that is safe to hand to Durable. Blank JSONL lines are
skipped silently; line numbers in problems are always physical line numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.chat_validation import (
    APPROX_TOKENIZER,
    CountTokens,
    DatasetError,
    DatasetReport,
    InvalidDatasetError,
    Issue,
    OutputFile,
    Problem,
    ProblemReason,
    RowOrigin,
    TokenStats,
    approx_token_count,
    check_row,
    json_refusal,
    token_stats,
    tokenizer_counter,
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
    "SourceRow",
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


def load_rows(source: DatasetSource | str | os.PathLike[str]) -> Iterator[SourceRow]:
    """Rows of a hub split or of local files, in order, each with its origin (file + line or row)."""
    if isinstance(source, HubDataset):
        yield from _read_hub(source)
        return
    files = source if isinstance(source, LocalFiles) else LocalFiles(paths=[Path(source)])
    for path in files.paths:
        yield from _read_path(Path(path), files.split)


def _read_path(path: Path, split: str | None) -> Iterator[SourceRow]:
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            yield from _read_saved_dataset(path, split)
            return
        members = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
        if not members:
            raise DatasetSourceError(
                f"dataset directory {path} holds neither a dataset saved with datasets' save_to_disk "
                "nor any .jsonl or .parquet file"
            )
        for member in members:
            yield from _read_path(member, split)
    elif not path.exists():
        raise DatasetSourceError(f"dataset file {path} does not exist; check dataset.files")
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DatasetSourceError(
            f"dataset file {path} has suffix '{path.suffix}'; supported: .jsonl (one JSON object per line), "
            ".parquet, or a directory saved with datasets' save_to_disk"
        )


def _read_jsonl(path: Path) -> Iterator[SourceRow]:
    # Read the lines ourselves: datasets' json loader stops at the first bad line without saying which.
    row = 0
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if raw.isspace():
                continue
            origin = RowOrigin(path.name, row, line_number)
            row += 1
            try:
                value = json.loads(raw)
            except UnicodeDecodeError as error:
                yield SourceRow(origin, error=UnreadableRow(ProblemReason.INVALID_ENCODING, _bad_utf8(error)))
                continue
            except json.JSONDecodeError as error:
                message = f"not valid JSON: {error.msg} at column {error.colno}"
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


def _bad_utf8(error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {error.start + 1}); save the file as UTF-8"


# json.loads lets surrogates through: escaped (\ud83d) and, from bytes, encoded (ED A0 BD). A pair makes
# one character; what is left alone cannot be encoded as UTF-8 later. The hint keeps clean lines cheap.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    found = _SURROGATE.search(json.dumps(value, ensure_ascii=False))
    return found.group() if found else None


def _read_parquet(path: Path) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetSourceError(f"dataset file {path} is not a readable Parquet file: {error}") from error
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for value in batch.to_pylist():
            yield SourceRow(RowOrigin(path.name, row), value)
            row += 1


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[SourceRow]:
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
    row = 0
    for batch in loaded.with_format("arrow").iter(batch_size=_PARQUET_BATCH_ROWS):
        for value in batch.to_pylist():
            yield SourceRow(RowOrigin(name, row), value)
            row += 1


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


def _read_hub(source: HubDataset) -> Iterator[SourceRow]:
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
        label = f"{source.id}:{chosen.split}"  # rows are numbered from the start of the whole split
        for row, value in enumerate(stream, start=chosen.start):
            yield SourceRow(RowOrigin(label, row), value)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as error:
        raise DatasetSourceError(
            f"could not read Hugging Face dataset '{source.id}' split '{source.split}': {error}. "
            "If this machine is offline or cannot reach huggingface.co, point the dataset at local files "
            "instead (JSONL or Parquet, or a directory saved with datasets' save_to_disk)"
        ) from error


# ---------------------------------------------------------------------------------------------- preparing


@dataclass
class _Scan:
    """What one pass over the rows learned; encoded lines are kept instead of parsed rows to save memory."""

    rows_read: int = 0
    rows_invalid: int = 0
    rows_too_long: int = 0
    lines: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    assistant_tokens: int = 0
    problems: list[Problem] = field(default_factory=list)


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
) -> DatasetReport:
    """Validate, split, write ``train.jsonl`` + ``test.jsonl`` under ``out_dir``; same input, same bytes."""
    _check_settings(test_size, max_tokens, epochs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer: str = tokenizer_name or (
        APPROX_TOKENIZER if count_tokens is None else str(getattr(count_tokens, "__name__", "custom"))
    )
    scan = _scan(rows, count_tokens or approx_token_count, max_tokens)
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


def _check_settings(test_size: float, max_tokens: int, epochs: float) -> None:
    if not 0 < test_size < 1:
        raise DatasetError(f"dataset.test_size must be between 0 and 1 (exclusive), got {test_size}")
    if max_tokens < 1:
        raise DatasetError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    if epochs <= 0:
        raise DatasetError(f"epochs must be positive, got {epochs}")


def _scan(rows: Iterable[SourceRow], count_tokens: CountTokens, max_tokens: int) -> _Scan:
    scan = _Scan()
    encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps(**kw) builds one per call
    for source_row in rows:
        scan.rows_read += 1
        if source_row.error is not None:
            scan.rows_invalid += 1
            issue = Issue(source_row.error.reason, "", source_row.error.message)
            scan.problems.append(issue.at(source_row.origin))
            continue
        check = check_row(source_row.value, count_tokens, max_tokens)
        if check.issues:
            scan.rows_invalid += 1
            scan.rows_too_long += check.issues[0].reason is ProblemReason.TOO_LONG
            scan.problems.extend(issue.at(source_row.origin) for issue in check.issues)
            continue
        scan.lines.append(encode({"messages": check.messages}))
        scan.lengths.append(check.total_tokens)
        scan.assistant_tokens += check.assistant_tokens
    if scan.rows_read == 0:
        raise DatasetError("the dataset source has no rows; check dataset.files or dataset.split")
    return scan


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
    _write_atomically(path, data)
    digest = hashlib.sha256(data).hexdigest()
    return OutputFile(path=str(path), sha256=digest, rows=len(order), bytes=len(data))


def _write_problems(path: Path, problems: list[Problem]) -> str | None:
    if not problems:
        path.unlink(missing_ok=True)  # a stale list from an earlier run would contradict this report
        return None
    document = [problem.model_dump(mode="json", exclude_none=True) for problem in problems]
    _write_atomically(path, json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8"))
    return str(path)


def _write_atomically(path: Path, data: bytes) -> None:
    # Readers (and a retried activity checking for existing output) never see a half-written file.
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
