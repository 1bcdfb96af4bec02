"""The bot's relay overhead: ``/api/messages`` (expectReplies, direct route) vs calling the endpoint.

    .venv/bin/python -m bench.bot [--turns 400] [--concurrency 1 8 64]

Three processes on loopback: a fast stub endpoint speaking the scoring contract (answers at once),
the devhost running the unchanged Function App whose bot answers through that endpoint (the
backend lists the stub as the newest healthy endpoint; history off so every turn sends the same
one message), and this load generator. At each concurrency it runs the same number of turns both
ways, direct POST /score vs POST /api/messages with ``deliveryMode: expectReplies``, in alternating
rounds so machine noise hits both alike, and prints p50/p99 latency and turns/s side by side, with the
CPU time per turn: the three processes together (what a turn costs the machine) and the devhost
alone (what caps one worker: at most 1000 ms / that many turns/s).
Goals (issue #4), judged on every row: relay p50 <= 1.2x direct, and >= 300 turns/s through the relay
wherever the endpoint itself allows it (with ``--model-ms``, N conversations can ask at most
N / model time turns/s of any path; such a row says n/a). With an instant stub the ratio is the bare
relay cost over one loopback round trip, and can never reach 1.2x: a relayed turn makes that same
round trip plus one more (load generator -> devhost). ``--model-ms 50`` lets the stub take as long as
a small model does, which is the ratio a user feels.

Concurrency means N conversations in flight all the time, so each conversation makes at least
``--conversation-turns`` turns (default 40) in a round and the p50 is over all of them. The N
conversations of a round start in the same instant; their first turns queue behind each other on one
worker, and with a constant answer time the conversations stay bunched for a few turns before they
spread out. Those first turns are a burst, not the steady load: they are in the p50 like any other,
and are also reported on their own (``burst``: the first turn of every conversation, relay vs direct).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key-" + "b" * 30
QUESTION = "How long do I have to return my Aero purifier?"
P50_RATIO_GOAL = 1.2
TURNS_PER_S_GOAL = 300


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux /proc); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- process 1: the stub endpoint ------------------------------------------------------------------
async def serve_stub(port_file: Path, model_ms: float) -> None:
    async def score(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": "invalid key"}, status=401)
        body = await request.json()
        if model_ms:
            await asyncio.sleep(model_ms / 1000)  # generation time, without using the CPU
        return web.json_response({"output": f"echo: {body['input_data']['input_string'][-1]['content']}"})

    app = web.Application()
    app.router.add_post("/score", score)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_file.write_text(str(site._server.sockets[0].getsockname()[1]))  # type: ignore[union-attr]
    await asyncio.Event().wait()


# -- process 2: the devhost, its backend pointing at the stub -----------------------------------------
def serve_devhost(stub_url: str, state: Path, port_file: Path) -> None:
    import logging

    from pydantic import SecretStr

    from backends.factory import set_backend
    from backends.protocol import EndpointKeys, EndpointState
    from devhost.server import DevHost, freeze_startup_heap

    class StubEndpointBackend:
        """The endpoint listing half of the backend, answering with the stub endpoint."""

        name = "bench"

        def list_endpoints(self) -> list[EndpointState]:
            return [
                EndpointState(
                    name="bench-endpoint",
                    scoring_uri=f"{stub_url}/score",
                    provisioning_state="Succeeded",
                    tags={"managed-by": "phi3-finetune-functions"},
                    traffic={"blue": 100},
                    created_at="2030-01-01T00:00:00Z",
                )
            ]

        def get_endpoint_keys(self, name: str) -> EndpointKeys:
            return EndpointKeys(primary=SecretStr(KEY), secondary=SecretStr(KEY))

    logging.basicConfig(level=logging.WARNING)
    set_backend(StubEndpointBackend())  # type: ignore[arg-type]

    async def serve() -> None:
        host = DevHost(PROJECT_ROOT, port=0, state_dir=state)
        await host.start()
        freeze_startup_heap()  # as python -m devhost does
        port_file.write_text(str(host.port))
        await asyncio.Event().wait()

    asyncio.run(serve())


def _start(args: list[str], port_file: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.bot", *args], cwd=PROJECT_ROOT, env=env)
    deadline = time.monotonic() + 90
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench helper {args[0]} did not start (exit {proc.poll()})")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


# -- process 3: the load ---------------------------------------------------------------------------
class Load:
    def __init__(self, session: aiohttp.ClientSession, stub: str, host: str) -> None:
        self.session, self.stub, self.host = session, stub, host
        self.score_body = {
            "input_data": {
                "input_string": [{"role": "user", "content": QUESTION}],
                "parameters": {"temperature": 0.7, "max_new_tokens": 128},
            }
        }

    async def direct(self, conversation: str) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with self.session.post(f"{self.stub}/score", json=self.score_body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()

    async def relay(self, conversation: str) -> None:
        activity = {
            "type": "message",
            "id": uuid.uuid4().hex,
            "channelId": "bench",
            "serviceUrl": "http://127.0.0.1:9",
            "deliveryMode": "expectReplies",
            "from": {"id": "user"},
            "recipient": {"id": "bot"},
            "conversation": {"id": conversation},
            "text": QUESTION,
        }
        async with self.session.post(f"{self.host}/api/messages", json=activity) as r:
            assert r.status == 200, await r.text()
            replies = (await r.json())["activities"]
            assert replies[-1]["text"] == f"echo: {QUESTION}", replies

    async def round(
        self, way, concurrency: int, turns: int, conversation_turns: int
    ) -> tuple[list[list[float]], float]:
        """At least ``turns`` turns by ``concurrency`` conversations at once, each conversation making
        at least ``conversation_turns``: (the latencies by turn number within the conversations —
        ``[0]`` is the start-up burst —, wall seconds).
        """
        per_conversation = max(conversation_turns, -(-turns // concurrency))
        by_turn: list[list[float]] = [[] for _ in range(per_conversation)]

        async def conversation(n: int) -> None:
            conversation_id = f"bench-{n}-{uuid.uuid4().hex[:6]}"
            for turn in range(per_conversation):
                started = time.perf_counter()
                await way(conversation_id)
                by_turn[turn].append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(conversation(n) for n in range(concurrency)))
        return by_turn, time.perf_counter() - started


async def measure(
    stub: str,
    host: str,
    concurrencies: list[int],
    turns: int,
    rounds: int,
    conversation_turns: int,
    pids: dict[str, int],
) -> list[dict]:
    """Rows of p50/p99/turns/s per way, the p50 of the conversations' first turns (``burst_p50_ms``)
    and of each turn number (``by_turn_p50_ms``), and CPU ms per turn: ``cpu_ms`` for the three
    processes together (the 2 cores' real cost of a turn), ``devhost_cpu_ms`` for the devhost alone."""
    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        load = Load(session, stub, host)
        # warm-up: imports, first endpoint lookup, connections
        await load.round(load.relay, 4, 40, conversation_turns=10)
        await load.round(load.direct, 4, 40, conversation_turns=10)
        for concurrency in concurrencies:
            results: dict[str, dict] = {
                name: {"by_turn": [], "wall": 0.0, "cpu": dict.fromkeys(pids, 0.0)}
                for name in ("direct", "relay")
            }
            for _ in range(rounds):
                for name, way in (("direct", load.direct), ("relay", load.relay)):
                    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
                    by_turn, wall = await load.round(way, concurrency, turns // rounds, conversation_turns)
                    after = {who: cpu_seconds(pid) for who, pid in pids.items()}
                    result = results[name]
                    if not result["by_turn"]:
                        result["by_turn"] = [[] for _ in by_turn]
                    for merged, new in zip(result["by_turn"], by_turn, strict=True):
                        merged += new
                    result["wall"] += wall
                    for who in pids:
                        if before[who] is not None and after[who] is not None:
                            result["cpu"][who] += after[who] - before[who]
            row: dict = {"concurrency": concurrency}
            for name, result in results.items():
                latencies = list(itertools.chain(*result["by_turn"]))
                count = len(latencies)
                row[name] = {
                    "p50_ms": percentile(latencies, 0.5) * 1000,
                    "p99_ms": percentile(latencies, 0.99) * 1000,
                    "burst_p50_ms": percentile(result["by_turn"][0], 0.5) * 1000,
                    "by_turn_p50_ms": [percentile(t, 0.5) * 1000 for t in result["by_turn"]],
                    "turns_per_s": count / result["wall"],
                    "turns": count,
                    "cpu_ms": sum(result["cpu"].values()) * 1000 / count,
                    "devhost_cpu_ms": result["cpu"]["devhost"] * 1000 / count,
                }
            rows.append(row)
    return rows


def verdicts(row: dict) -> dict[str, str]:
    """Each goal for one row: "met", "not met", or "n/a" where the endpoint itself caps the rate."""
    direct, relay = row["direct"], row["relay"]
    ratio_ok = relay["p50_ms"] <= P50_RATIO_GOAL * direct["p50_ms"]
    if direct["turns_per_s"] < TURNS_PER_S_GOAL:
        rate = "n/a"  # N conversations each waiting on the model: no path can go faster
    else:
        rate = "met" if relay["turns_per_s"] >= TURNS_PER_S_GOAL else "not met"
    return {"p50": "met" if ratio_ok else "not met", "rate": rate}


def print_table(rows: list[dict]) -> None:
    print(
        f"{'conversations':>13} | {'direct p50':>10} {'p99':>8} {'turns/s':>8} {'CPU/turn':>8} | "
        f"{'relay p50':>10} {'p99':>8} {'turns/s':>8} {'CPU/turn':>8} {'(devhost)':>9} | "
        f"{'p50 ratio':>9} | {'burst p50 direct/relay':>22} | goals: p50, turns/s"
    )
    for row in rows:
        d, r = row["direct"], row["relay"]
        cells = [
            f"{w['p50_ms']:>8.2f}ms {w['p99_ms']:>6.1f}ms {w['turns_per_s']:>8.0f} {w['cpu_ms']:>6.2f}ms"
            for w in (d, r)
        ]
        goals = verdicts(row)
        print(
            f"{row['concurrency']:>13} | {cells[0]} | {cells[1]} {r['devhost_cpu_ms']:>7.2f}ms | "
            f"{r['p50_ms'] / d['p50_ms']:>8.2f}x | "
            f"{d['burst_p50_ms']:>6.1f} / {r['burst_p50_ms']:>5.1f}ms "
            f"{r['burst_p50_ms'] / d['burst_p50_ms']:>5.2f}x | "
            f"{goals['p50']}, {goals['rate']}"
        )
    overhead = rows[0]["relay"]["p50_ms"] - rows[0]["direct"]["p50_ms"]
    print(f"relay overhead per turn at {rows[0]['concurrency']} conversation(s), p50: {overhead:.2f} ms")
    print("CPU/turn: load generator + stub + devhost together; (devhost): the devhost alone")
    print("burst: each conversation's first turn, all of a round's conversations starting at once")


def print_by_turn(row: dict, first: int = 12) -> None:
    """How the start-up burst fades: p50 by turn number within the conversations, relay vs direct."""
    direct, relay = row["direct"]["by_turn_p50_ms"], row["relay"]["by_turn_p50_ms"]
    shown = min(first, len(direct))
    print(f"p50 by turn number at {row['concurrency']} conversation(s), relay / direct:")
    print("  " + " ".join(f"{n + 1:>5}" for n in range(shown)) + "   rest")
    rest_d, rest_r = sum(direct[shown:]), sum(relay[shown:])
    ratios = [r / d for d, r in zip(direct[:shown], relay[:shown], strict=True)]
    print(
        "  "
        + " ".join(f"{q:>4.2f}x" for q in ratios)
        + (f"  {rest_r / rest_d:>4.2f}x (mean of turns {shown + 1}-{len(direct)})" if rest_d else "")
    )


def print_goals(rows: list[dict]) -> None:
    """The goals judged on every row, not only the first."""
    judged = [(row["concurrency"], verdicts(row)) for row in rows]
    missed = [str(n) for n, v in judged if v["p50"] != "met"]
    print(
        f"goal relay p50 <= {P50_RATIO_GOAL}x direct at every concurrency: "
        + ("met" if not missed else f"not met (at {', '.join(missed)} conversation(s))")
    )
    rated = [(n, v["rate"]) for n, v in judged if v["rate"] != "n/a"]
    slow = [str(n) for n, rate in rated if rate != "met"]
    if not rated:
        verdict = "n/a (the stub's answer time caps every row below that, direct calls included)"
    else:
        verdict = "met" if not slow else f"not met (at {', '.join(slow)} conversation(s))"
        skipped = [str(n) for n, v in judged if v["rate"] == "n/a"]
        if skipped:
            verdict += f"; n/a at {', '.join(skipped)} (capped by the stub's answer time)"
    best = max(row["relay"]["turns_per_s"] for row in rows)
    print(f"goal >= {TURNS_PER_S_GOAL} turns/s through the relay: {verdict} (best {best:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bot", description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=400, help="turns per way per concurrency (default 400)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per concurrency (default 4)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--conversation-turns",
        type=int,
        default=40,
        help="turns each conversation makes per round, at least (default 40)",
    )
    parser.add_argument(
        "--model-ms",
        type=float,
        default=0.0,
        help="the stub's answer time, as a model's (default 0: overhead only)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--serve-stub", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-devhost", nargs=3, metavar=("STUB_URL", "STATE", "PORT_FILE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_stub:
        asyncio.run(serve_stub(args.serve_stub, args.model_ms))
        return
    if args.serve_devhost:
        stub_url, state, port_file = args.serve_devhost
        serve_devhost(stub_url, Path(state), Path(port_file))
        return

    with tempfile.TemporaryDirectory(prefix="bench-bot-") as work:
        work_dir = Path(work)
        env = {
            **os.environ,
            "PHI3_STATE_DIR": str(work_dir / "phi3"),
            "BOT_ROUTE": "direct",
            "BOT_ENDPOINT_NAME": "",
            "BOT_HISTORY_TURNS": "0",
            "MicrosoftAppId": "",
            # The endpoint-cleanup timer (every :00 and :30) would ask the stub backend for
            # deployments it does not have, and take CPU from the turns it lands among.
            "CLEANUP_SCHEDULE": "0 0 0 1 1 *",
        }
        stub_args = ["--serve-stub", str(work_dir / "stub.port"), "--model-ms", str(args.model_ms)]
        stub, stub_port = _start(stub_args, work_dir / "stub.port", env)
        stub_url = f"http://127.0.0.1:{stub_port}"
        host_args = ["--serve-devhost", stub_url, str(work_dir / "devhost"), str(work_dir / "host.port")]
        host, host_port = _start(host_args, work_dir / "host.port", env)
        try:
            rows = asyncio.run(
                measure(
                    stub_url,
                    f"http://127.0.0.1:{host_port}",
                    args.concurrency,
                    args.turns,
                    args.rounds,
                    args.conversation_turns,
                    {"load": os.getpid(), "stub": stub.pid, "devhost": host.pid},
                )
            )
        finally:
            for proc in (host, stub):
                proc.terminate()
                proc.wait(10)
    print(
        f"stub endpoint answer time: {args.model_ms:g} ms; "
        f"each conversation makes at least {args.conversation_turns} turns a round"
    )
    print_table(rows)
    print_by_turn(rows[-1])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print_goals(rows)


if __name__ == "__main__":
    main()
