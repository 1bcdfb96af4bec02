"""Evaluate a chat model on held-out conversations: ROUGE-L and F1 against the reference answer
(azure-ai-evaluation's F1, and its ``rouge_score`` with a tokenizer for any script; see ``_scorers``),
answer length, errors and latency.

Each test conversation is cut before its last assistant turn; the model answers the conversation so
far and its answer is scored against that reference turn. ``answer`` is any callable from messages
to text (the endpoint directly, or the Prompt flow: ``FlowRunner.answer_conversation``), so the same
code scores base and fine-tuned; ``evaluate_base_vs_finetuned`` puts the two side by side.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from flows.environment import ensure_promptflow_configured
from settings import get_settings

Answerer = Callable[[list[dict[str, str]]], str]
monotonic = time.monotonic  # the evaluation's clock for ``until`` (one name, so a test can turn it)


class EvalRow(BaseModel):
    index: int
    question: str
    reference: str
    answer: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    rouge_l: float | None = None
    f1: float | None = None


class EvalMetrics(BaseModel):
    rows: int
    errors: int
    rouge_l: float | None
    f1: float | None
    answer_chars_mean: float | None
    latency_ms_p50: float | None
    error_types: dict[str, int] = Field(default_factory=dict)  # e.g. {"ScoringTimeoutError": 2}


class SideBySideRow(BaseModel):
    """One test conversation answered by both models (the per-row artifact)."""

    index: int
    question: str
    reference: str
    finetuned: EvalRow
    base: EvalRow | None = None


class ModelComparison(BaseModel):
    """Base vs fine-tuned on the same conversations; ``delta`` is fine-tuned minus base."""

    finetuned: EvalMetrics
    base: EvalMetrics | None = None
    base_skipped: str | None = None
    delta: dict[str, float | None] = Field(default_factory=dict)
    rows_file: str


def jsonl_lines(path: Path) -> list[str]:
    """The file's lines, split at "\\n" only: JSON written with ``ensure_ascii=False`` (the test split,
    the rows) keeps U+2028, U+2029 and U+0085 raw inside strings, where ``str.splitlines()`` would cut."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def load_eval_cases(test_file: Path, sample_size: int) -> list[tuple[list[dict[str, str]], str]]:
    """The first ``sample_size`` conversations (deterministic), as (prompt messages, reference)."""
    cases: list[tuple[list[dict[str, str]], str]] = []
    for line in jsonl_lines(test_file):
        if len(cases) >= sample_size:
            break
        messages = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        cases.append((messages[:last], messages[last]["content"]))
    return cases


# Words of any script, lower-cased; Chinese and Japanese characters one by one (no spaces between words).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class _AnyScript:
    """rouge_score's tokenizer interface, for words of any script (``rouge_tokens``)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return rouge_tokens(text)


def _scorers():
    """ROUGE-L's F-measure and F1, each ``(answer, reference) -> float``.

    ROUGE-L is the ``rouge_score`` that azure-ai-evaluation's RougeScoreEvaluator runs, given a tokenizer
    for any script: its own keeps only ``[a-z0-9]``, so an answer in Cyrillic, Greek, Chinese, ... had no
    words and scored 0.0 even when it was the reference word for word. ASCII text scores as it does there.
    """
    ensure_promptflow_configured(get_settings().state_dir)  # azure-ai-evaluation imports promptflow
    from azure.ai.evaluation import F1ScoreEvaluator
    from azure.ai.evaluation._vendor.rouge_score.rouge_scorer import RougeScorer

    rouge, f1 = RougeScorer(["rougeL"], tokenizer=_AnyScript()), F1ScoreEvaluator()
    return (
        lambda answer, ref: rouge.score(ref, answer)["rougeL"].fmeasure,
        lambda answer, ref: f1(response=answer, ground_truth=ref)["f1_score"],
    )


def evaluate_answers(
    cases: list[tuple[list[dict[str, str]], str]],
    answer: Answerer,
    *,
    done: Sequence[EvalRow] = (),
    until: float | None = None,
    record: Callable[[EvalRow], None] | None = None,
) -> list[EvalRow]:
    """``done`` and the rows after it; after the first, none is started once ``time.monotonic()`` passes
    ``until`` (the caller sees fewer rows than cases and calls again: every call makes progress).
    ``record`` keeps each row as it is scored."""
    rouge, f1 = _scorers()
    rows = list(done)
    for i, (messages, reference) in enumerate(cases[len(rows) :], start=len(rows)):
        if until is not None and i > len(done) and monotonic() >= until:
            break
        row = EvalRow(index=i, question=messages[-1]["content"], reference=reference)
        started = time.perf_counter()
        try:
            row.answer = answer(messages)
        except Exception as exc:  # counted as an error row; the metric says how many failed
            row.error = f"{type(exc).__name__}: {exc}"[:300]
        row.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        if row.answer is not None:
            row.rouge_l, row.f1 = round(rouge(row.answer, reference), 4), round(f1(row.answer, reference), 4)
        rows.append(row)
        if record is not None:
            record(row)
    return rows


def rows_done(path: Path, cases: list[tuple[list[dict[str, str]], str]]) -> list[EvalRow]:
    """The rows an earlier call scored into ``path``, while they are the first of these ``cases`` in
    order (anything else, such as a changed test split, starts over)."""
    if not path.is_file():
        return []
    rows: list[EvalRow] = []
    for line in jsonl_lines(path):
        try:
            row = EvalRow.model_validate_json(line)
        except ValueError:
            break  # a line cut short by a killed worker: that row is answered again
        i = len(rows)
        if row.index != i or i >= len(cases) or row.question != cases[i][0][-1]["content"]:
            break
        rows.append(row)
    return rows


def _append_to(path: Path) -> Callable[[EvalRow], None]:
    def append(row: EvalRow) -> None:
        with path.open("a", encoding="utf-8") as out:
            out.write(row.model_dump_json() + "\n")

    return append


def summarize(rows: list[EvalRow]) -> EvalMetrics:
    scored = [r for r in rows if r.answer is not None]

    def mean(values):
        return round(statistics.fmean(values), 4) if values else None

    latencies = [r.latency_ms for r in scored if r.latency_ms is not None]
    error_types = Counter((r.error or "").split(":", 1)[0] for r in rows if r.answer is None)
    return EvalMetrics(
        rows=len(rows),
        errors=len(rows) - len(scored),
        rouge_l=mean([r.rouge_l for r in scored]),
        f1=mean([r.f1 for r in scored]),
        answer_chars_mean=mean([len(r.answer or "") for r in scored]),
        latency_ms_p50=round(statistics.median(latencies), 1) if latencies else None,
        error_types=dict(error_types),
    )


def write_rows(rows: Sequence[BaseModel], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.model_dump_json() + "\n" for r in rows), encoding="utf-8")
    return path


class EvalProgress(BaseModel):
    """An evaluation that ran out of its call's time: what is scored so far (on disk, resumed next call)."""

    finetuned_rows: int
    base_rows: int | None
    cases: int

    def __str__(self) -> str:
        base = f", base {self.base_rows}" if self.base_rows is not None else ""
        return f"{self.finetuned_rows}{base} of {self.cases} conversations answered"


def evaluate_base_vs_finetuned(
    cases: list[tuple[list[dict[str, str]], str]],
    answer_finetuned: Answerer,
    answer_base: Answerer | None,
    *,
    out_dir: Path,
    base_skipped: str | None = None,
    until: float | None = None,
) -> ModelComparison | EvalProgress:
    """Score both models on the same ``cases``; per-row results go to ``out_dir`` as JSONL.

    ``answer_base`` None means the base model is not evaluated (``base_skipped`` says why, e.g. on
    Azure without a base deployment). Files: ``finetuned.jsonl``, ``base.jsonl`` and
    ``side_by_side.jsonl`` (one line per conversation with both answers and scores). Each row is kept as
    it is scored, so a call that reaches ``until`` (a ``time.monotonic()`` value) returns an
    ``EvalProgress`` and the next call goes on from there; a Functions activity stays under its timeout.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"finetuned": out_dir / "finetuned.jsonl", "base": out_dir / "base.jsonl"}
    answerers = {"finetuned": answer_finetuned, "base": answer_base}
    rows: dict[str, list[EvalRow]] = {}
    answered = False  # in this call: once it has, the budget holds even for the base model's first row
    for model, answer in answerers.items():
        if answer is None:
            continue
        done = rows_done(files[model], cases)
        write_rows(done, files[model])  # drops whatever followed them
        if answered and until is not None and len(done) < len(cases) and monotonic() >= until:
            rows[model] = done
        else:
            record = _append_to(files[model])
            rows[model] = evaluate_answers(cases, answer, done=done, until=until, record=record)
        answered = answered or len(rows[model]) > len(done)
        if len(rows[model]) < len(cases):
            base_rows = len(rows["base"]) if "base" in rows else (0 if answer_base else None)
            return EvalProgress(finetuned_rows=len(rows["finetuned"]), base_rows=base_rows, cases=len(cases))
    finetuned_rows, base_rows = rows["finetuned"], rows.get("base")
    side_by_side = [
        SideBySideRow(
            index=row.index,
            question=row.question,
            reference=row.reference,
            finetuned=row,
            base=base_rows[row.index] if base_rows is not None else None,
        )
        for row in finetuned_rows
    ]
    rows_file = write_rows(side_by_side, out_dir / "side_by_side.jsonl")
    finetuned, base = summarize(finetuned_rows), summarize(base_rows) if base_rows is not None else None
    return ModelComparison(
        finetuned=finetuned,
        base=base,
        base_skipped=None if base is not None else (base_skipped or "no base model to compare with"),
        delta=_delta(finetuned, base),
        rows_file=str(rows_file),
    )


def _delta(finetuned: EvalMetrics, base: EvalMetrics | None) -> dict[str, float | None]:
    if base is None:
        return {}
    out: dict[str, float | None] = {}
    for metric in ("rouge_l", "f1", "answer_chars_mean", "latency_ms_p50"):
        a, b = getattr(finetuned, metric), getattr(base, metric)
        out[metric] = round(a - b, 4) if a is not None and b is not None else None
    return out
