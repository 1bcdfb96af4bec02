"""The evaluate step: held-out conversations through the deployed model, scored against references."""

from __future__ import annotations

from pathlib import Path

from activities.steps import StepInput, run_dir
from backends.protocol import MLBackend
from pipeline.evaluation import evaluate_answers, load_eval_cases, summarize, write_rows
from pipeline.steps import StepResult


def _endpoint_answerer(backend: MLBackend, endpoint: str, max_new_tokens: int):
    from backends.scoring import chat_sync

    ep = backend.get_endpoint(endpoint)
    key = backend.get_endpoint_keys(endpoint).primary.get_secret_value()

    def answer(messages):
        return chat_sync(ep.scoring_uri, key, messages, temperature=0.0, max_new_tokens=max_new_tokens)

    return answer


def evaluate(inp: StepInput, backend: MLBackend) -> StepResult:
    cfg = inp.config.evaluation
    if not cfg.enabled:
        return StepResult(skipped="evaluation.enabled is false")
    cases = load_eval_cases(Path(inp.state["dataset"]["test_file"]["path"]), cfg.sample_size)
    if not cases:
        return StepResult(skipped="the test split has no conversations to evaluate")
    answer = _endpoint_answerer(backend, inp.names["endpoint"], inp.config.deployment.max_new_tokens)
    rows = evaluate_answers(cases, answer)
    artifact = write_rows(rows, run_dir(inp.run_id) / "evaluation" / "finetuned.jsonl")
    metrics = summarize(rows)
    backend.log_evaluation(inp.run_id, {"finetuned": metrics.model_dump()}, [artifact])
    summary = (
        f"fine-tuned: ROUGE-L {metrics.rouge_l}, F1 {metrics.f1} over {metrics.rows} conversations "
        f"({metrics.errors} errors)"
    )
    return StepResult(
        summary=summary,
        outputs={"evaluation": {"finetuned": metrics.model_dump(), "rows_file": str(artifact)}},
    )
