"""Scoring-server overhead: POST /score through the local endpoint vs raw ``generate`` and the same pyfunc
predict, in-process.

    .venv/bin/python -m bench.scoring_overhead [--requests 60]

Builds a tiny Phi-3-architecture model (backends.local.base_models), logs it with the project's chat
pyfunc (backends.local.chat_model) into a throwaway MLflow store, deploys it to a local endpoint and
times the same chat both ways, interleaved request by request so machine noise hits both sides
alike. Decoding is greedy with min_new_tokens = max_new_tokens = 32, so both sides generate exactly
32 tokens. The third side is bare transformers: the chat template applied once up front, then
``model.generate`` on the token ids. Goal: the server costs at most 1.1x raw generate at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT_ROOT / "sample_data" / "support_chats.jsonl"
MESSAGES = [
    {"role": "system", "content": "You are Tidewell's customer support assistant. Answer briefly."},
    {"role": "user", "content": "How long do I have to return my Aero purifier?"},
]
TOKENS = 32
PARAMS = {"temperature": 0.0, "max_new_tokens": TOKENS, "min_new_tokens": TOKENS}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def register_tiny_model(work: Path) -> tuple[str, str, Path]:
    """(tracking URI, registered model URI, checkpoint) of a freshly built tiny Phi-3 chat model."""
    import mlflow

    from backends.local.base_models import build_tiny_phi3
    from backends.local.chat_model import log_chat_model

    model_dir = build_tiny_phi3(work / "tiny-phi3", corpus_files=[CORPUS])
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("bench", artifact_location=str(work / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        logged = log_chat_model(model_dir)
    version = mlflow.register_model(logged, "bench-tiny-phi3").version
    return tracking_uri, f"models:/bench-tiny-phi3/{version}", model_dir


def raw_generate(model_dir: Path):
    """A callable running bare ``generate`` on pre-tokenized chat input (what the server wraps)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids

    def run() -> None:
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
        assert out.shape[1] - ids.shape[1] == TOKENS

    return run


def deploy(work: Path, tracking_uri: str, model_uri: str):  # -> (LocalEndpoints, EndpointInfo)
    from backends.local.endpoints import LocalEndpoints

    endpoints = LocalEndpoints(work / "workspace", tracking_uri=tracking_uri)
    endpoints.create_or_update_endpoint("bench-endpoint", tags={"purpose": "bench"})
    endpoints.create_or_update_deployment("bench-endpoint", "tiny", model_uri=model_uri)
    while (state := endpoints.get_deployment("bench-endpoint", "tiny")).provisioning_state not in (
        "Succeeded",
        "Failed",
    ):
        time.sleep(0.1)
    if state.provisioning_state == "Failed":
        raise SystemExit(f"the bench deployment failed to load: {state.error}")
    return endpoints, endpoints.set_traffic("bench-endpoint", {"tiny": 100})


async def measure(model, generate, scoring_uri: str, key: str, requests: int) -> dict[str, list[float]]:
    from backends.scoring import ScoringClient, ScoringNotFoundError

    times: dict[str, list[float]] = {
        "raw generate": [],
        "in-process predict": [],
        "POST /score": [],
        "server path, no model": [],
    }
    async with ScoringClient() as client:

        async def routed_nowhere() -> None:
            # Auth, body validation and routing, then 404: the server's own cost without generation.
            with contextlib.suppress(ScoringNotFoundError):
                await client.chat(scoring_uri, key, MESSAGES, deployment="absent", **PARAMS)

        async def served() -> str:
            return await client.chat(scoring_uri, key, MESSAGES, **PARAMS)

        for _ in range(5):  # warm-up: first generate calls and the connection pool
            generate()
            model.predict(MESSAGES, params=PARAMS)
            await served()
        for _ in range(requests):
            started = time.perf_counter()
            generate()
            times["raw generate"].append(time.perf_counter() - started)
            started = time.perf_counter()
            local_answer = model.predict(MESSAGES, params=PARAMS)[0]
            times["in-process predict"].append(time.perf_counter() - started)
            started = time.perf_counter()
            served_answer = await served()
            times["POST /score"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await routed_nowhere()
            times["server path, no model"].append(time.perf_counter() - started)
            if served_answer != local_answer:
                raise SystemExit(f"answers differ: {served_answer!r} vs {local_answer!r}")
    return times


def report(times: dict[str, list[float]], health: dict) -> None:
    raw, local, served = times["raw generate"], times["in-process predict"], times["POST /score"]
    print(
        f"\n{len(local)} requests each, interleaved; {TOKENS} new tokens, greedy; device {health['device']}"
    )
    print(f"{'':22}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, samples in times.items():
        p50, p99, mean = percentile(samples, 0.5), percentile(samples, 0.99), statistics.fmean(samples)
        print(f"{name:22}{p50 * 1e3:10.2f}{p99 * 1e3:10.2f}{mean * 1e3:10.2f}")
    for label, base in (("server/raw generate", raw), ("server/predict", local)):
        ratio_p50 = percentile(served, 0.5) / percentile(base, 0.5)
        ratio_p99 = percentile(served, 0.99) / percentile(base, 0.99)
        print(f"{'ratio ' + label:22}{ratio_p50:9.3f}x{ratio_p99:9.3f}x")
    ratio = percentile(served, 0.5) / percentile(raw, 0.5)
    overhead_ms = (percentile(served, 0.5) - percentile(raw, 0.5)) * 1e3
    verdict = "meets" if ratio <= 1.1 else "MISSES"
    print(f"server overhead over raw generate at p50: {overhead_ms:+.2f} ms/request; {verdict} the 1.1x goal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    import json
    import urllib.request

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="scoring-overhead-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        tracking_uri, model_uri, model_dir = register_tiny_model(work)
        endpoints, info = deploy(work, tracking_uri, model_uri)
        try:
            model = mlflow.pyfunc.load_model(model_uri)
            print(f"set-up (build, log, register, deploy, load): {time.monotonic() - started:.1f} s")
            key = endpoints.get_keys(info.name).primary.get_secret_value()
            generate = raw_generate(model_dir)
            times = asyncio.run(measure(model, generate, info.scoring_uri, key, args.requests))
            with urllib.request.urlopen(info.scoring_uri.replace("/score", "/health")) as response:
                health = json.load(response)
            report(times, health)
        finally:
            endpoints.delete_endpoint(info.name)


if __name__ == "__main__":
    main()
