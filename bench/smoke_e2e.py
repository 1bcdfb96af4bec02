"""End-to-end time of a `smoke` run: devhost + local backend, from POST /api/finetune to Completed.

    .venv/bin/python -m bench.smoke_e2e [--preset smoke] [--runs 1]

Prints each step's share of the wall time side by side, so a regression shows where it came from.
Target (issue #3): the smoke preset completes in <= 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PHI3_STATE_DIR": str(Path(tmp) / "phi3"), "PHI3_MODELS_DIR": str(PROJECT_ROOT / ".models")}
        host = DevhostProcess(PROJECT_ROOT, Path(tmp) / "devhost", env=env)
        host.start()
        try:
            results = [one_run(host, args.preset) for _ in range(args.runs)]
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


if __name__ == "__main__":
    main()
