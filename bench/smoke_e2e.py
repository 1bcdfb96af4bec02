"""End-to-end time of a `smoke` run: devhost + local backend, from POST /api/finetune to Completed.

    .venv/bin/python -m bench.smoke_e2e [--preset smoke] [--runs 1] [--ask QUESTION ...]

Prints each step's share of the wall time side by side, so a regression shows where it came from,
then the evaluation (base vs fine-tuned) and the deployed model's answers to a few questions — the
shipped support facts it was trained on and a general one — so "it chats" is visible, not claimed.
Targets (issue #3): smoke <= 2 minutes, demo <= 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import requests

from tests.support.devhost import PROJECT_ROOT, DevhostProcess


def one_run(host: DevhostProcess, preset: str) -> tuple[float, dict]:
    started = time.perf_counter()
    r = requests.post(f"{host.url}/api/finetune", json={"preset": preset}, timeout=60)
    r.raise_for_status()
    run_id = r.json()["id"]
    while True:
        summary = requests.get(f"{host.url}/api/runs/{run_id}", timeout=60).json()
        if summary["status"] in ("Completed", "Failed", "Terminated"):
            break
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    if summary["status"] != "Completed":
        raise SystemExit(f"run {run_id} ended {summary['status']}: {summary.get('error')}")
    return elapsed, summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--ask", action="append", help="a question for the deployed model (repeatable)")
    args = parser.parse_args()
    facts = json.loads((PROJECT_ROOT / "sample_data" / "support_facts.json").read_text())
    questions = args.ask or [f["question"] for f in facts[:3]] + ["What is the capital of France?"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PHI3_STATE_DIR": str(Path(tmp) / "phi3"), "PHI3_MODELS_DIR": str(PROJECT_ROOT / ".models")}
        host = DevhostProcess(PROJECT_ROOT, Path(tmp) / "devhost", env=env)
        host.start()
        try:
            results = [one_run(host, args.preset) for _ in range(args.runs)]
            answers = ask(Path(tmp) / "phi3", results[-1][1], questions)
        finally:
            host.stop()
            from backends.local.endpoints import LocalEndpoints

            LocalEndpoints(Path(tmp) / "phi3", tracking_uri="sqlite://").stop_all()
    totals = [r[0] for r in results]
    print(f"\n== {args.preset} run end to end (devhost + local backend) ==")
    print(f"{'step':24s} {'seconds':>9s} {'share':>7s}")
    last = results[-1][1]
    total = totals[-1]
    for step in last["steps"]:
        seconds = step.get("duration_s") or 0.0
        print(f"{step['name']:24s} {seconds:9.2f} {seconds / total:7.1%}")
    label = f"total (median of {len(totals)})"
    print(f"{label:24s} {statistics.median(totals):9.2f}   target: smoke <= 120 s, demo <= 480 s")
    evaluation = last.get("evaluation") or {}
    for model in ("base", "finetuned"):
        if model in evaluation:
            m = evaluation[model]
            print(f"evaluation {model:9s} ROUGE-L {m.get('rouge_l')}  F1 {m.get('f1')}  rows {m.get('rows')}")
    for question, answer in answers:
        print(f"Q: {question}\nA: {answer}")


def ask(state_dir: Path, summary: dict, questions: list[str]) -> list[tuple[str, str]]:
    """The deployed endpoint's answers (key fetched through the backend, as the bot does)."""
    from backends.local.backend import LocalBackend
    from backends.scoring import chat_sync
    from settings import AppSettings

    backend = LocalBackend(
        AppSettings(PHI3_STATE_DIR=str(state_dir), PHI3_MODELS_DIR=str(PROJECT_ROOT / ".models")),
        restart_endpoints=False,
    )
    name = summary["endpoint"]["name"]
    uri = backend.get_endpoint(name).scoring_uri
    key = backend.get_endpoint_keys(name).primary.get_secret_value()
    return [
        (q, chat_sync(uri, key, [{"role": "user", "content": q}], temperature=0.0, max_new_tokens=60))
        for q in questions
    ]


if __name__ == "__main__":
    main()
