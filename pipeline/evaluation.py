"""Evaluate a chat model on held-out conversations: ROUGE-L and F1 against the reference answer
(azure-ai-evaluation's evaluators), answer length, errors and latency.

Each test conversation is cut before its last assistant turn; the model answers the conversation so
far and its answer is scored against that reference turn. ``answer`` is any callable from messages
to text (the endpoint directly, or the Prompt flow), so the same code scores base and fine-tuned.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from flows.environment import configure_promptflow
from settings import get_settings

Answerer = Callable[[list[dict[str, str]]], str]


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


def load_eval_cases(test_file: Path, sample_size: int) -> list[tuple[list[dict[str, str]], str]]:
    """The first ``sample_size`` conversations (deterministic), as (prompt messages, reference)."""
    cases = []
    for line in test_file.read_text(encoding="utf-8").splitlines():
        if len(cases) >= sample_size:
            break
        messages = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        cases.append((messages[:last], messages[last]["content"]))
    return cases


def _scorers():
    configure_promptflow(get_settings().state_dir)  # azure-ai-evaluation imports promptflow
    from azure.ai.evaluation import F1ScoreEvaluator, RougeScoreEvaluator, RougeType

    rouge, f1 = RougeScoreEvaluator(rouge_type=RougeType.ROUGE_L), F1ScoreEvaluator()

    def rouge_l(answer: str, ref: str) -> float:
        result = rouge(response=answer, ground_truth=ref)
        return result.get("rouge_f1_score", result.get("rouge_score"))  # the F-measure of ROUGE-L

    return (rouge_l, lambda answer, ref: f1(response=answer, ground_truth=ref)["f1_score"])


def evaluate_answers(cases: list[tuple[list[dict[str, str]], str]], answer: Answerer) -> list[EvalRow]:
    rouge, f1 = _scorers()
    rows = []
    for i, (messages, reference) in enumerate(cases):
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
    return rows


def summarize(rows: list[EvalRow]) -> EvalMetrics:
    scored = [r for r in rows if r.answer is not None]

    def mean(values):
        return round(statistics.fmean(values), 4) if values else None

    latencies = [r.latency_ms for r in scored if r.latency_ms is not None]
    return EvalMetrics(
        rows=len(rows),
        errors=len(rows) - len(scored),
        rouge_l=mean([r.rouge_l for r in scored]),
        f1=mean([r.f1 for r in scored]),
        answer_chars_mean=mean([len(r.answer or "") for r in scored]),
        latency_ms_p50=round(statistics.median(latencies), 1) if latencies else None,
    )


def write_rows(rows: list[EvalRow], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.model_dump_json() + "\n" for r in rows), encoding="utf-8")
    return path
