"""One function per pipeline step: parse the input, call the backend, return a small JSON-safe result.

Each step first looks for what it would create (by the deterministic names in ``RunNames``), so a
retried or replayed activity never creates a second job, model version, endpoint or deployment.
Secrets are fetched where they are used (the smoke test, evaluation) and never returned.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backends.protocol import (
    BackendError,
    DataAssets,
    MLBackend,
    NotFoundError,
    RegisteredModel,
    ResourceRef,
    SetupResult,
    StillProvisioning,
)
from pipeline import dataset_scan
from pipeline.chat_dataset import (
    DatasetReport,
    HubDataset,
    LocalFiles,
    ScanProgress,
    load_rows,
    prepare_dataset,
)
from pipeline.config import LOCAL_BASE_MODELS, RunConfig, resolve_project_path, row_token_limit
from pipeline.steps import StepResult
from settings import get_settings

log = logging.getLogger("activities")

MANAGED_BY = "phi3-finetune-functions"


class StepInput(BaseModel):
    run_id: str
    config: RunConfig
    names: dict[str, str]
    state: dict[str, Any] = {}


def run_dir(run_id: str) -> Path:
    path = get_settings().state_dir / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def _from_setup(result: SetupResult) -> StepResult:
    return StepResult(
        summary=result.summary, skipped=result.skipped, outputs=result.details, created=result.created
    )


# setup ---------------------------------------------------------------------------------------------
def workspace(inp: StepInput, backend: MLBackend) -> StepResult:
    return _from_setup(backend.ensure_workspace(inp.config))


def identity(inp: StepInput, backend: MLBackend) -> StepResult:
    return _from_setup(backend.ensure_identity(inp.config))


def role_assignments(inp: StepInput, backend: MLBackend) -> StepResult:
    return _from_setup(backend.ensure_role_assignments(inp.config))


def quota(inp: StepInput, backend: MLBackend) -> StepResult:
    return _from_setup(backend.check_quota(inp.config))


# data ----------------------------------------------------------------------------------------------
def _source(cfg: RunConfig):
    ds = cfg.dataset
    if ds.files:
        return LocalFiles(paths=[resolve_project_path(f) for f in ds.files])
    return HubDataset(id=ds.hub_id, split=ds.split, config_name=ds.config_name)


def _prepare(inp: StepInput, backend: MLBackend) -> DatasetReport | ScanProgress:
    """The dataset, or how far a big source's scan got in this call's budget (saved: the next call goes on).

    ``DATASET_CALL_BUDGET_S`` counts from here, so loading the tokenizer is part of it."""
    until = dataset_scan.monotonic() + get_settings().dataset_call_budget_s
    cfg = inp.config
    count_tokens, tokenizer_name = backend.token_counter(cfg)
    return prepare_dataset(
        load_rows(_source(cfg)),
        out_dir=run_dir(inp.run_id) / "data",
        test_size=cfg.dataset.test_size,
        seed=cfg.dataset.seed,
        drop_invalid=cfg.dataset.drop_invalid_rows,
        count_tokens=count_tokens,
        tokenizer_name=tokenizer_name,
        max_tokens=row_token_limit(cfg)[0],
        epochs=cfg.hyperparameters.num_train_epochs,
        until=until,
    )


def prepare_dataset_step(inp: StepInput, backend: MLBackend) -> StepResult:
    report = _prepare(inp, backend)
    if isinstance(report, ScanProgress):  # the orchestrator calls again after a durable timer
        return StepResult(pending=str(report))
    tokens = report.tokens
    summary = (
        f"{report.rows_valid} valid of {report.rows_read} rows → {report.train_rows} train / "
        f"{report.test_rows} test; ~{report.estimated_training_tokens:,} training tokens "
        f"({tokens.tokenizer})"
    )
    if report.rows_dropped:
        summary += f"; dropped {report.rows_dropped} invalid rows (see {report.problems_file})"
    # The Azure time estimate is for Phi-3-mini-sized models; the local demo models are far smaller.
    estimate = (
        None
        if inp.config.model.name in LOCAL_BASE_MODELS
        else _training_estimate(inp, report.estimated_training_tokens)
    )
    if estimate:
        summary += f"; {estimate.summary}"
    dataset = {
        "rows_read": report.rows_read,
        "rows_valid": report.rows_valid,
        "rows_dropped": report.rows_dropped,
        "train_rows": report.train_rows,
        "test_rows": report.test_rows,
        "estimated_training_tokens": report.estimated_training_tokens,
        "estimated_training": {
            "sku": estimate.sku,
            "seconds": estimate.seconds,
            "basis": estimate.basis,
            "summary": estimate.summary,
        }
        if estimate
        else None,
        "tokens": {
            "tokenizer": tokens.tokenizer,
            "total": tokens.total_tokens,
            "p50": tokens.p50,
            "p95": tokens.p95,
            "max": tokens.max,
            "over_max_tokens": tokens.rows_over_max_tokens,
        },
        "train_file": report.train_file.model_dump(mode="json"),
        "test_file": report.test_file.model_dump(mode="json"),
        # Kept with the run: the smoke test may run on a host instance that lacks the prepared files.
        "smoke_question": _first_user_message(report.test_file.path),
    }
    return StepResult(summary=summary, outputs={"dataset": dataset})


def _training_estimate(inp: StepInput, tokens: int):
    """How long the fine-tune would take on the configured Azure SKU, from measured throughput if any."""
    from pipeline.cost import best_measurement, estimate_training, read_measurements

    measured = best_measurement(read_measurements(get_settings().state_dir / "throughput.jsonl"))
    return estimate_training(
        tokens, inp.config.compute.size, measured, full_finetune=not inp.config.hyperparameters.apply_lora
    )


def prepared_here(inp: StepInput, backend: MLBackend) -> tuple[Path, Path] | StepResult:
    """The prepared train and test files on this host instance, or the step's pending result while a big
    source is scanned again: another instance prepared them (a Function App's working files are the
    instance's own), and preparation is deterministic, so it is redone here."""
    dataset = inp.state["dataset"]
    train, test = Path(dataset["train_file"]["path"]), Path(dataset["test_file"]["path"])
    if not (train.exists() and test.exists()):
        redone = _prepare(inp, backend)
        if isinstance(redone, ScanProgress):
            return StepResult(pending=f"preparing the dataset again on this host: {redone}")
    return train, test


def upload_data(inp: StepInput, backend: MLBackend) -> StepResult:
    files = prepared_here(inp, backend)
    if isinstance(files, StepResult):
        return files
    assets = backend.upload_data(inp.run_id, *files)
    created = [
        ResourceRef(kind="data", name=a.name, version=a.version) for a in (assets.train, assets.validation)
    ]
    return StepResult(
        summary=f"train {assets.train.name}:{assets.train.version}, validation "
        f"{assets.validation.name}:{assets.validation.version}",
        outputs={"data": assets.model_dump()},
        created=created,
    )


# fine-tune -----------------------------------------------------------------------------------------
def compute(inp: StepInput, backend: MLBackend) -> StepResult:
    info = backend.ensure_compute(inp.config)
    return StepResult(
        summary=info.summary,
        outputs={"compute": {"name": info.name, "size": info.size}},
        created=info.created,
    )


def submit_finetune(inp: StepInput, backend: MLBackend) -> StepResult:
    data = DataAssets.model_validate(inp.state["data"])
    job = backend.submit_finetune(inp.names["job"], inp.config, data, inp.run_id)
    return StepResult(
        summary=f"job {job.name} is {job.status}",
        outputs={"job": {"name": job.name, "link": job.link}},
        created=[ResourceRef(kind="job", name=job.name)],
    )


def cancel_job_if_running(job_name: str, backend: MLBackend) -> str:
    """Cancel the job unless it has ended; its status afterwards ("NotSubmitted" when there is none)."""
    try:
        job = backend.get_job(job_name)
        if not job.is_terminal:
            job = backend.cancel_job(job_name)
    except NotFoundError:
        return "NotSubmitted"
    return job.status


def job_status(args: dict, backend: MLBackend) -> dict:
    job = backend.get_job(args["job_name"])
    detail = job.model_dump(exclude_none=True, exclude={"name"})
    return {"done": job.is_terminal, "ok": job.status == "Completed", "status": job.status, "detail": detail}


# deploy --------------------------------------------------------------------------------------------
def register_model(inp: StepInput, backend: MLBackend) -> StepResult:
    model = backend.register_model(
        inp.names["job"], inp.names["model"], {"run_id": inp.run_id, "managed-by": MANAGED_BY}
    )
    return StepResult(
        summary=f"model {model.name} version {model.version}",
        outputs={"model": model.model_dump()},
        created=[ResourceRef(kind="model", name=model.name, version=model.version)],
    )


def endpoint_tags(inp: StepInput) -> dict[str, str]:
    expires = datetime.now(UTC) + timedelta(hours=inp.config.deployment.ttl_hours)
    return {
        "managed-by": MANAGED_BY,
        "run-id": inp.run_id,
        "expires-at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def endpoint(inp: StepInput, backend: MLBackend) -> StepResult:
    name = inp.names["endpoint"]
    try:
        existing = backend.get_endpoint(name)
        tags = existing.tags  # a retry keeps the original expiry
    except NotFoundError:  # the normal first run; a retry keeps the tags it made
        tags = endpoint_tags(inp)
    ep = backend.ensure_endpoint(name, tags, inp.config)
    return StepResult(
        summary=f"endpoint {ep.name} ({ep.provisioning_state}), expires {ep.tags.get('expires-at')}",
        outputs={
            # The scoring URI is read where it is used (bot, connection, the run summary), never
            # carried through Durable history.
            "endpoint": {"name": ep.name, "expires_at": ep.tags.get("expires-at")}
        },
        created=[ResourceRef(kind="endpoint", name=ep.name)],
    )


def deployment(inp: StepInput, backend: MLBackend) -> StepResult:
    model = RegisteredModel.model_validate(inp.state["model"])
    dep = backend.ensure_deployment(inp.names["endpoint"], inp.names["deployment"], model, inp.config)
    return StepResult(
        summary=f"deployment {dep.name} of {model.name}:{model.version} is {dep.provisioning_state}",
        created=[ResourceRef(kind="deployment", name=dep.name, parent=dep.endpoint)],
    )


def deployment_status(args: dict, backend: MLBackend) -> dict:
    dep = backend.get_deployment(args["endpoint"], args["deployment"])
    done = dep.provisioning_state in ("Succeeded", "Failed", "Canceled")
    detail = {"provisioning_state": dep.provisioning_state}
    if dep.error:
        detail["error"] = dep.error
    return {
        "done": done,
        "ok": dep.provisioning_state == "Succeeded",
        "status": dep.provisioning_state,
        "detail": detail,
    }


def traffic(inp: StepInput, backend: MLBackend) -> StepResult:
    ep = backend.set_traffic(inp.names["endpoint"], {inp.names["deployment"]: 100})
    return StepResult(summary=f"traffic {ep.traffic}", outputs={"traffic": ep.traffic})


# integrate -----------------------------------------------------------------------------------------
SMOKE_QUESTION_CHARS = 2000
GREETING = "Hello! What can you help me with?"


def _first_user_message(test_file: Path | str) -> str | None:
    """The first user turn of the test split's first conversation (shortened), or None if there is none."""
    import json

    with open(test_file, encoding="utf-8") as lines:
        first = next(lines, "").strip()
    if not first:
        return None
    question = next((m["content"] for m in json.loads(first)["messages"] if m["role"] == "user"), None)
    return question[:SMOKE_QUESTION_CHARS] if question else None


def first_question(inp: StepInput) -> str:
    """What the smoke tests ask: the configured question, else the test split's first user turn (recorded by
    ``prepare_dataset``, so any host instance has it), else a greeting."""
    if inp.config.evaluation.smoke_question:
        return inp.config.evaluation.smoke_question
    dataset = inp.state["dataset"]
    if dataset.get("smoke_question"):
        return dataset["smoke_question"]
    test_file = Path(dataset["test_file"]["path"])  # a run prepared before the question was recorded
    if test_file.exists():
        return _first_user_message(test_file) or GREETING
    return GREETING


def smoke_test(inp: StepInput, backend: MLBackend) -> StepResult:
    from backends.scoring import chat_sync, contract_for

    name = inp.names["endpoint"]
    ep = backend.get_endpoint(name)
    keys = backend.get_endpoint_keys(name)
    question = first_question(inp)
    started = time.perf_counter()
    answer = chat_sync(
        ep.scoring_uri,
        keys.primary.get_secret_value(),
        [{"role": "user", "content": question}],
        temperature=0.0,
        max_new_tokens=inp.config.deployment.max_new_tokens,
        timeout=inp.config.deployment.request_timeout_s,
        contract=contract_for(ep.kind),
    )
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    if not answer.strip():
        return StepResult(ok=False, error=f"the endpoint answered '{question}' with an empty string")
    return StepResult(
        summary=f"answered in {latency_ms} ms",
        outputs={
            "smoke_test": {"question": question[:300], "answer": answer[:300], "latency_ms": latency_ms}
        },
    )


def cleanup_run(payload: dict, backend: MLBackend) -> dict:
    """Delete what a failed run created (when the config asks): deployments go with their endpoint.

    Idempotent: what is not there is skipped. A deletion still under way after the backend's short
    wait (an Azure endpoint takes minutes) is handed back in ``pending``, to be called again with those
    refs and ``under_way: true`` after a durable timer (then "not there" means "deleted"); ``actions``
    says what was done, ``failed`` what could not be (the others are undone all the same).
    Connections go first, while the run's endpoint still tells whether they point at it (see
    ``clean_connection``).
    """
    actions: list[str] = []
    pending: list[dict] = []
    failed: list[str] = []
    under_way = bool(payload.get("under_way"))
    refs = [ResourceRef.model_validate(r) for r in payload.get("created", [])]
    own_endpoint = (payload.get("names") or {}).get("endpoint")
    for ref in sorted(refs, key=lambda r: r.kind != "connection"):
        try:
            if ref.kind == "endpoint":
                backend.get_endpoint(ref.name)  # NotFoundError: nothing to delete
                backend.delete_endpoint(ref.name)
                actions.append(f"deleted endpoint {ref.name}")
            elif ref.kind == "job":
                if not backend.get_job(ref.name).is_terminal:
                    backend.cancel_job(ref.name)
                    actions.append(f"canceled job {ref.name}")
            elif ref.kind == "connection" and (done := clean_connection(backend, ref, own_endpoint)):
                actions.append(done)
        except NotFoundError:
            if under_way and ref.kind == "endpoint":
                actions.append(f"deleted endpoint {ref.name}")
            continue  # never made, or already gone
        except StillProvisioning as still:
            pending.append(ref.model_dump())
            log.info("cleanup: %s %s is still under way: %s", ref.kind, ref.name, still)
        except BackendError as exc:  # one that cannot be undone must not keep the others (an endpoint
            # that bills by the hour) from going; the idle-endpoint timer is the backstop
            failed.append(f"{ref.kind} {ref.name}: {exc}"[:500])
            log.warning("cleanup: could not undo %s %s: %s", ref.kind, ref.name, exc)
    return {"actions": actions, "pending": pending, "failed": failed}


def clean_connection(backend: MLBackend, ref: ResourceRef, own_endpoint: str | None) -> str | None:
    """Undo what the run did to a Prompt flow connection; what was done, or None when it is gone.

    Every run names its connection alike (``promptflow.connection_name``), so the one a failed run
    pointed at its endpoint may be the one an earlier run's flow still needs. It goes back to the
    endpoint it served before (``ref.previous``) if that endpoint still exists, is deleted if the run
    made it (or what it served is gone too), and is left alone if it serves another endpoint by now
    (a later run took it over).
    """
    target = backend.promptflow_connection_target(ref.name, ref.parent)
    if target is None:
        return None
    where = f"connection {ref.name}" + (f" in project {ref.parent}" if ref.parent else "")
    serving = {ep.scoring_uri: ep.name for ep in backend.list_endpoints() if ep.scoring_uri}
    now = serving.get(target)
    if now is not None and now != own_endpoint:
        return f"left {where}: it serves endpoint {now}"
    if ref.previous is not None and ref.previous in serving.values():
        backend.ensure_promptflow_connection(ref.name, ref.previous, project=ref.parent)
        return f"pointed {where} back to endpoint {ref.previous}"
    backend.delete_promptflow_connection(ref.name, ref.parent)
    return f"deleted {where}"
