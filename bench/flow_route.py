"""The bot's two routes per chat turn: through the Prompt flow vs straight to the endpoint.

    .venv/bin/python -m bench.flow_route [--turns 30] [--stub-turns 200]

1. A real local deployment of a tiny Phi-3 (built from config, logged with the project's chat
   pyfunc, served by LocalEndpoints): each turn — a question after two earlier turns — goes through
   the flow route (``FlowRunner.answer``: promptflow executor in a worker thread, urllib) and the
   direct route (``ScoringClient.chat``: aiohttp), interleaved turn by turn so machine noise hits
   both alike. Greedy decoding, so both routes must return the same answer. Goal: flow <= 1.1x
   direct at p50.
2. The bare cost of the flow route: the same two routes against a loopback stub that answers at
   once, so the difference is promptflow's own overhead per turn (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT_ROOT / "sample_data" / "support_chats.jsonl"
HISTORY = [
    {"role": "user", "content": "Hi, I bought an Aero purifier last week."},
    {"role": "assistant", "content": "Thanks for choosing Tidewell! How can I help with your Aero?"},
    {"role": "user", "content": "It makes a rattling noise."},
    {"role": "assistant", "content": "Sorry to hear that. Is the filter seated firmly in its slot?"},
]
QUESTION = "How long do I have to return it?"
TOKENS = 32
GREEDY = {"temperature": 0.0, "max_new_tokens": TOKENS}
Route = Callable[[], Awaitable[str]]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def deploy_tiny_phi3(work: Path):  # -> (LocalEndpoints, EndpointInfo)
    import mlflow

    from backends.local.base_models import build_tiny_phi3
    from backends.local.chat_model import log_chat_model
    from backends.local.endpoints import LocalEndpoints

    model_dir = build_tiny_phi3(work / "tiny-phi3", corpus_files=[CORPUS])
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("bench", artifact_location=str(work / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        version = mlflow.register_model(log_chat_model(model_dir), "bench-flow-route").version
    endpoints = LocalEndpoints(work / "workspace", tracking_uri=tracking_uri)
    endpoints.create_or_update_endpoint("bench-flow", tags={"purpose": "bench"})
    endpoints.create_or_update_deployment(
        "bench-flow", "tiny", model_uri=f"models:/bench-flow-route/{version}"
    )
    while (state := endpoints.get_deployment("bench-flow", "tiny")).provisioning_state not in (
        "Succeeded",
        "Failed",
    ):
        time.sleep(0.1)
    if state.provisioning_state == "Failed":
        raise SystemExit(f"the bench deployment failed to load: {state.error}")
    return endpoints, endpoints.set_traffic("bench-flow", {"tiny": 100})


async def interleaved(routes: dict[str, Route], turns: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time each route once per turn, alternating which goes first; all must give the same answer."""
    for _ in range(warmup):
        for route in routes.values():
            await route()
    times: dict[str, list[float]] = {name: [] for name in routes}
    for turn in range(turns):
        answers = {}
        order = list(routes.items())
        for name, route in order if turn % 2 else reversed(order):  # neither route always goes first
            started = time.perf_counter()
            answers[name] = await route()
            times[name].append(time.perf_counter() - started)
        if len(set(answers.values())) != 1:
            raise SystemExit(f"the routes answered differently: {answers}")
    return times


def print_table(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'':34}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}")
    for name, samples in times.items():
        p50, p90, mean = percentile(samples, 0.5), percentile(samples, 0.9), statistics.fmean(samples)
        print(f"{name:34}{p50 * 1e3:10.2f}{p90 * 1e3:10.2f}{mean * 1e3:10.2f}")


async def stub_server():  # -> (AppRunner, scoring URI)
    from aiohttp import web

    async def score(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"output": f"echo({len(body['input_data']['input_string'])})"})

    app = web.Application()
    app.router.add_post("/score", score)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/score"


async def measure(scoring_uri: str, key: str, state_dir: Path, turns: int, stub_turns: int) -> None:
    from backends.scoring import ScoringClient
    from flows.runner import FlowRunner, GenerationOptions

    messages = [*HISTORY, {"role": "user", "content": QUESTION}]
    async with ScoringClient() as client:

        def routes(uri: str, key: str) -> dict[str, Route]:
            flow = FlowRunner(uri, key, options=GenerationOptions(**GREEDY), state_dir=state_dir)
            return {
                "direct (ScoringClient.chat)": lambda: client.chat(uri, key, messages, **GREEDY),
                "flow (FlowRunner.answer)": lambda: flow.answer(QUESTION, HISTORY),
            }

        model_times = await interleaved(routes(scoring_uri, key), turns)
        print_table(f"tiny Phi-3 on a local endpoint: {turns} turns each, interleaved, greedy", model_times)
        direct, flow = model_times["direct (ScoringClient.chat)"], model_times["flow (FlowRunner.answer)"]
        ratio = percentile(flow, 0.5) / percentile(direct, 0.5)
        verdict = "meets" if ratio <= 1.1 else "MISSES"
        print(f"{'ratio flow/direct at p50':34}{ratio:9.3f}x  ({verdict} the 1.1x goal)")

        stub, stub_uri = await stub_server()
        try:
            stub_times = await interleaved(routes(stub_uri, "bench-key"), stub_turns, warmup=20)
        finally:
            await stub.cleanup()
        print_table(f"loopback stub that answers at once: {stub_turns} turns each, interleaved", stub_times)
        direct, flow = stub_times["direct (ScoringClient.chat)"], stub_times["flow (FlowRunner.answer)"]
        overhead_ms = (percentile(flow, 0.5) - percentile(direct, 0.5)) * 1e3
        print(f"{'bare flow overhead at p50':34}{overhead_ms:+9.2f} ms per turn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--stub-turns", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flow-route-") as tmp:
        work = Path(tmp)
        from flows.environment import configure_promptflow

        configure_promptflow(work / "state")  # before anything imports promptflow
        started = time.monotonic()
        endpoints, info = deploy_tiny_phi3(work)
        try:
            print(f"set-up (build, log, register, deploy): {time.monotonic() - started:.1f} s")
            key = endpoints.get_keys(info.name).primary.get_secret_value()
            asyncio.run(measure(info.scoring_uri, key, work / "state", args.turns, args.stub_turns))
        finally:
            endpoints.delete_endpoint(info.name)


if __name__ == "__main__":
    main()
