"""Evaluate steps: serve the base model beside the fine-tuned one, then score both through the flow."""

from __future__ import annotations

from activities.integrate import flow_runner
from activities.steps import StepInput, prepared_here, run_dir
from backends.protocol import MLBackend, ResourceRef
from pipeline import evaluation
from pipeline.config import BASE_DEPLOYMENT
from pipeline.evaluation import EvalProgress, evaluate_base_vs_finetuned, load_eval_cases
from pipeline.steps import StepResult
from settings import get_settings


def base_deployment(inp: StepInput, backend: MLBackend) -> StepResult:
    cfg = inp.config.evaluation
    if not (cfg.enabled and cfg.compare_base):
        return StepResult(skipped="evaluation.compare_base is false")
    dep = backend.ensure_base_deployment(
        inp.names["endpoint"], BASE_DEPLOYMENT, inp.names["job"], inp.names["model"], inp.config
    )
    if dep is None:
        return StepResult(skipped=f"the {backend.name} backend does not serve the base model for comparison")
    return StepResult(
        summary=f"base model deployment {dep.name} is {dep.provisioning_state} (no traffic)",
        outputs={"base_deployment": {"name": dep.name, "model": dep.model}},
        created=[ResourceRef(kind="deployment", name=dep.name, parent=dep.endpoint)],
    )


def evaluate(inp: StepInput, backend: MLBackend) -> StepResult:
    cfg = inp.config.evaluation
    if not cfg.enabled:
        return StepResult(skipped="evaluation.enabled is false")
    # From the call's start: preparing the dataset again on this host (up to DATASET_CALL_BUDGET_S) is
    # part of it, or a call could run past functionTimeout (the first question is asked all the same).
    until = evaluation.monotonic() + get_settings().evaluation_call_budget_s
    files = prepared_here(inp, backend)
    if isinstance(files, StepResult):
        return files
    cases = load_eval_cases(files[1], cfg.sample_size)
    if not cases:
        return StepResult(skipped="the test split has no conversations to evaluate")
    finetuned = flow_runner(backend, inp, deployment=inp.names["deployment"])
    base = flow_runner(backend, inp, deployment=BASE_DEPLOYMENT) if "base_deployment" in inp.state else None
    comparison = evaluate_base_vs_finetuned(
        cases,
        finetuned.answer_conversation,
        base.answer_conversation if base else None,
        out_dir=run_dir(inp.run_id) / "evaluation",
        base_skipped=None if base else "no base model deployment (see the base_deployment step)",
        until=until,
    )
    if isinstance(comparison, EvalProgress):  # the orchestrator calls again after a durable timer
        return StepResult(pending=str(comparison))
    out_dir = run_dir(inp.run_id) / "evaluation"
    artifacts = [
        p
        for p in (out_dir / n for n in ("finetuned.jsonl", "base.jsonl", "side_by_side.jsonl"))
        if p.exists()
    ]
    metrics = {"finetuned": comparison.finetuned.model_dump()}
    if comparison.base:
        metrics["base"] = comparison.base.model_dump()
    logged_to = backend.log_evaluation(inp.run_id, metrics, artifacts)
    ft = comparison.finetuned
    summary = f"fine-tuned ROUGE-L {ft.rouge_l}, F1 {ft.f1} over {ft.rows} conversations ({ft.errors} errors)"
    if comparison.base:
        summary += f"; base ROUGE-L {comparison.base.rouge_l}, F1 {comparison.base.f1}"
    return StepResult(
        summary=summary, outputs={"evaluation": comparison.model_dump(mode="json") | {"logged_to": logged_to}}
    )


def remove_base_deployment(inp: StepInput, backend: MLBackend) -> StepResult:
    """The comparison is done: stop paying for (or holding memory with) the base model's deployment."""
    base = inp.state.get("base_deployment")
    if not base:
        return StepResult(skipped="no base model deployment was created")
    if inp.config.evaluation.keep_base_deployment:
        return StepResult(skipped="evaluation.keep_base_deployment is true: the base deployment stays")
    backend.delete_deployment(inp.names["endpoint"], base["name"])  # idempotent: a missing one is fine
    return StepResult(
        summary=f"base model deployment {base['name']} deleted; the fine-tuned one keeps 100% traffic"
    )
