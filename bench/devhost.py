"""Benchmark the devhost's Durable engine, side by side in one run.

    .venv/bin/python -m bench.devhost [--polls 1000] [--fan-out 1000]

Prints: per-activity overhead of a chain of empty activities (p50/p99 of the round trip
scheduled -> completed -> next scheduled), the wall time of a 1,000-activity fan-out, and the
replay cost per poll of a monitor loop at poll 10 vs poll 1,000, written naively vs with
continue-as-new (the ratio shows whether the cost stays flat). Targets (issue #2): p50 <= 10 ms,
fan-out <= 15 s on 2 cores, continue-as-new ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from devhost.durable import history as h
from devhost.server import DevHost

APP = Path(__file__).parent / "apps" / "devhost_bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bench:
    def __init__(self, host: DevHost, session: aiohttp.ClientSession):
        self.host, self.session = host, session
        self.episodes: dict[str, list[dict]] = defaultdict(list)
        host.engine.observer = lambda e: self.episodes[e["instance"]].append(e)

    async def run(self, name: str, payload, instance_id: str) -> float:
        url = f"{self.host.base_url}/runtime/webhooks/durabletask/orchestrators/{name}/{instance_id}"
        started = time.perf_counter()
        async with self.session.post(url, json=json.dumps(payload)) as r:
            assert r.status == 202, await r.text()
        while True:
            inst = self.host.store.get_instance(instance_id)
            if inst and inst.status in h.TERMINAL_STATUSES:
                assert inst.status == h.COMPLETED, inst.output
                return time.perf_counter() - started
            await self.host.engine.wait_changed(0.5)

    async def activity_overhead(self, chains: int, length: int) -> list[float]:
        """Round trip per chained empty activity, from the stored history's timestamps."""
        gaps: list[float] = []
        for c in range(chains):
            iid = f"chain-{c}"
            await self.run("chain", length, iid)
            events = [json.loads(e) for e in self.host.store.load_history(iid)]
            scheduled = [
                h.parse_iso(e["Timestamp"]) for e in events if e["EventType"] == h.EventType.TaskScheduled
            ]
            gaps += [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(scheduled)]
        return gaps

    def poll_costs(self, instance_id: str) -> list[float]:
        """Replay + commit cost per poll (two episodes each: activity result, then timer)."""
        eps = [e["duration_ms"] for e in self.episodes[instance_id]]
        return [a + b for a, b in zip(eps[1::2], eps[2::2], strict=False)]


def window(costs: list[float], start: int, size: int = 20) -> float:
    """Mean cost over one whole monitor generation (20 polls), so both sides compare like with like."""
    return statistics.mean(costs[start : start + size])


async def main(polls: int, fan_out: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as state:
        host = DevHost(APP, port=0, state_dir=Path(state))
        await host.start()
        async with aiohttp.ClientSession() as session:
            bench = Bench(host, session)
            await bench.run("chain", 5, "warm-up")
            gaps = await bench.activity_overhead(chains=10, length=50)
            fan_seconds = await bench.run("fan_out", fan_out, "fan-out")
            naive_seconds = await bench.run("monitor_naive", polls, "naive")
            deadline = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            monitor = {
                "check": "countdown_status",
                "args": {"key": "can", "total": polls},
                "interval_seconds": 0.001,
                "max_seconds": 0.001,
                "deadline": deadline,
                "per_generation": 20,
            }
            can_seconds = await bench.run("wait_until_done", monitor, "can")
            naive, can = bench.poll_costs("naive"), bench.poll_costs("can")
        await host.stop()

    late = min(len(naive), len(can)) - 20
    print("\n== devhost benchmark (2 cores, SQLite WAL) ==")
    print(
        f"empty activity round trip   p50 {percentile(gaps, 0.5):7.2f} ms"
        f"   p99 {percentile(gaps, 0.99):7.2f} ms"
        f"   (n={len(gaps)}; target p50 <= 10 ms)"
    )
    print(f"fan-out of {fan_out} activities   {fan_seconds:7.2f} s   (target <= 15 s)")
    print(
        f"monitor loop, {polls} polls      naive total {naive_seconds:7.1f} s   continue-as-new total "
        f"{can_seconds:7.1f} s"
    )
    late_label = f"polls {late + 1}-{late + 20}"
    print(f"{'replay cost per poll':28s} {'polls 1-20':>10s} {late_label:>12s} {'ratio':>8s}")
    for label, costs in (("naive while-loop", naive), ("wait_until_done (20/gen)", can)):
        early, late_cost = window(costs, 0), window(costs, late)
        print(f"  {label:26s} {early:8.2f}ms {late_cost:10.2f}ms {late_cost / early:8.2f}x")
    print("target: continue-as-new ratio <= 1.3")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--polls", type=int, default=1000)
    parser.add_argument("--fan-out", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.polls, args.fan_out))
