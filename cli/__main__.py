"""``python -m cli run [--preset demo]`` — the whole pipeline locally, then a chat with the result.
``python -m cli chat [--endpoint NAME]`` — chat with a deployed endpoint.

``run`` starts the devhost (unless one already serves this project), starts a run, shows live
progress, prints the summary and a loss-curve PNG, and drops you into a chat. Ctrl-C (or leaving
the chat) cancels an unfinished run, deletes the endpoint it made (``--keep`` keeps it) and stops the
devhost it started: nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import requests
from rich.console import Console

from settings import get_settings

from .devhost_process import DevhostError, ManagedDevhost


def _start_run(api: str, preset: str | None, run_id: str | None) -> str:
    body = {k: v for k, v in {"preset": preset, "run_id": run_id}.items() if v}
    r = requests.post(f"{api}/finetune", json=body, timeout=60)
    if r.status_code == 400:
        problems = "; ".join(f"{p['field']}: {p['message']}" for p in r.json()["errors"])
        raise SystemExit(f"the run config was refused: {problems}")
    r.raise_for_status()
    return r.json()["id"]


def _cleanup(api: str, run_id: str | None, summary: dict | None, keep: bool, console: Console) -> None:
    if run_id and (summary is None or summary.get("status") not in ("Completed", "Failed", "Terminated")):
        r = requests.post(f"{api}/runs/{run_id}/cancel", timeout=60)
        if r.status_code == 202:
            console.print(f"canceled run {run_id} (job: {r.json().get('job')})")
    endpoint = ((summary or {}).get("endpoint") or {}).get("name")
    if endpoint and not keep:
        from .chat import client_backend

        client_backend().delete_endpoint(endpoint)
        console.print(f"deleted endpoint {endpoint} (pass --keep to keep it)")


def run(args: argparse.Namespace, console: Console) -> int:
    from .chat import chat_loop
    from .progress import print_summary, save_loss_curve, watch_run

    host = ManagedDevhost(args.port)
    try:
        started = host.start()
    except DevhostError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    api = f"{host.url}/api"
    console.print(
        f"devhost {'started' if started else 'already running'} at {host.url} (log {host.log_path})"
    )
    run_id, summary = None, None
    try:
        run_id = _start_run(api, args.preset, args.run_id)
        console.print(
            f"run [bold]{run_id}[/] started (preset {args.preset or 'none: the tutorial settings'})"
        )
        summary = watch_run(api, run_id, console)
        print_summary(summary, console)
        curve = save_loss_curve(api, run_id, get_settings().state_dir / "runs" / run_id / "loss_curve.png")
        if curve:
            console.print(f"loss curve: {curve}")
        if summary["status"] != "Completed":
            return 1
        endpoint = (summary.get("endpoint") or {}).get("name")
        console.print(f"\nchat in the browser (Bot Framework Web Chat via the bot): [bold]{host.url}/chat[/]")
        if endpoint and not args.no_chat:
            if sys.stdin.isatty():
                console.print("or here in the terminal; leaving the chat stops everything")
                chat_loop(endpoint, console)
            else:  # no terminal to chat in: keep serving the page until Ctrl-C
                console.print("press Ctrl-C to stop")
                threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    finally:
        _cleanup(api, run_id, summary, args.keep, console)
        if started:
            host.stop()
            console.print("devhost stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the whole pipeline locally, then chat")
    p_run.add_argument(
        "--preset", default="demo", help="smoke | demo | '' for the tutorial settings (default demo)"
    )
    p_run.add_argument("--run-id", default=None)
    p_run.add_argument("--port", type=int, default=int(os.environ.get("DEVHOST_PORT", "7071")))
    p_run.add_argument("--keep", action="store_true", help="keep the endpoint when leaving")
    p_run.add_argument("--no-chat", action="store_true")
    p_chat = sub.add_parser("chat", help="chat with a deployed endpoint")
    p_chat.add_argument("--endpoint", default=None, help="default: the newest endpoint with traffic")
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "run":
        args.preset = args.preset or None
        return run(args, console)
    from .chat import chat_loop, latest_endpoint

    endpoint = args.endpoint or latest_endpoint()
    if not endpoint:
        console.print("[red]no endpoint with traffic: run `make run` first[/]")
        return 1
    return chat_loop(endpoint, console)


if __name__ == "__main__":
    sys.exit(main())
