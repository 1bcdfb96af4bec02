"""Integrate steps: the Prompt flow custom connection, and the flow answering through it once."""

from __future__ import annotations

import time

from activities.steps import StepInput, first_question
from backends.protocol import MLBackend
from backends.scoring import contract_for
from pipeline.config import resolve_project_path
from pipeline.steps import StepResult
from settings import get_settings


def promptflow_connection(inp: StepInput, backend: MLBackend) -> StepResult:
    result = backend.ensure_promptflow_connection(inp.names["connection"], inp.names["endpoint"], inp.config)
    summary = result.summary + "".join(
        f" (it served endpoint {ref.previous} before)" for ref in result.created if ref.previous
    )
    return StepResult(summary=summary, skipped=result.skipped, outputs=result.details, created=result.created)


def flow_runner(backend: MLBackend, inp: StepInput, deployment: str | None):
    """The project's chat flow bound to this run's endpoint (and optionally one deployment of it)."""
    from flows.runner import GenerationOptions, get_flow_runner

    ep = backend.get_endpoint(inp.names["endpoint"])
    key = backend.get_endpoint_keys(inp.names["endpoint"]).primary.get_secret_value()
    options = GenerationOptions(
        temperature=0.0,
        max_new_tokens=inp.config.deployment.max_new_tokens,
        timeout_s=inp.config.deployment.request_timeout_s,
        deployment=deployment,
        contract=contract_for(ep.kind),
    )
    return get_flow_runner(
        ep.scoring_uri or "",
        key,
        flow_dir=resolve_project_path(inp.config.promptflow.flow),
        options=options,
        state_dir=get_settings().state_dir,
    )


def flow_smoke(inp: StepInput, backend: MLBackend) -> StepResult:
    """Two turns through the flow: a question, then a follow-up that carries the first turn as history."""
    runner = flow_runner(backend, inp, deployment=None)
    question = first_question(inp)
    started = time.perf_counter()
    answer = runner.answer_sync(question)
    follow_up = runner.answer_sync(
        "Thanks. Can you say that again in one sentence?",
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    )
    latency_ms = round((time.perf_counter() - started) * 1000 / 2, 1)
    if not answer.strip() or not follow_up.strip():
        return StepResult(ok=False, error=f"the flow answered '{question}' with an empty string")
    return StepResult(
        summary=f"the flow answered 2 turns ({latency_ms} ms per turn)",
        outputs={
            "flow_smoke": {
                "question": question[:300],
                "answer": answer[:300],
                "follow_up_answer": follow_up[:300],
                "latency_ms": latency_ms,
            }
        },
    )
