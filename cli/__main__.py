"""``python -m cli run [--preset demo]`` — the whole pipeline locally, then a chat with the result.
``python -m cli chat [--endpoint NAME]`` — chat with a deployed endpoint.

``run`` starts the devhost (unless one already serves this project), starts a run, shows live
progress, prints the summary and a loss-curve PNG, and drops you into a chat (without a terminal it
answers the questions piped to stdin, one a line, then serves the web chat until Ctrl-C). Ctrl-C at any
point (or leaving the chat) cancels an unfinished run and its fine-tune job, deletes the endpoint it
made (``--keep`` keeps it) and stops the devhost it started: nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import requests
from pydantic import ValidationError
from rich.console import Console

from backends.protocol import BackendError
from devhost.app_loader import AppLoadError, load_local_settings
from settings import PROJECT_ROOT, get_settings

from .cleanup import ending_signals_interrupt, leave_nothing_running
from .devhost_process import DevhostError, ManagedDevhost


class RunRefused(Exception):
    """The run API would not start the run; the message says why."""


def _new_run_id() -> str:
    # Chosen here, not by the server, so a Ctrl-C while the start request is in flight still knows
    # which run to cancel.
    return f"ft-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _start_run(api: str, body: dict) -> None:
    r = requests.post(f"{api}/finetune", json=body, timeout=60)
    if r.status_code in (400, 409):
        problems = "; ".join(f"{p['field']}: {p['message']}" for p in r.json()["errors"])
        raise RunRefused(f"the run API did not start the run: {problems}")
    r.raise_for_status()


def run(args: argparse.Namespace, console: Console) -> int:
    host = ManagedDevhost(args.port, args.devhost_state)
    try:
        started = host.start()
    except DevhostError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    except KeyboardInterrupt:
        host.stop()  # it runs in its own session: Ctrl-C did not reach it
        console.print("\ninterrupted while the devhost started; stopped it")
        return 130
    api = f"{host.url}/api"
    console.print(
        f"devhost {'started' if started else 'already running'} at {host.url} (log {host.log_path})"
    )
    run_id = args.run_id or _new_run_id()
    body = {k: v for k, v in {"preset": args.preset, "run_id": run_id}.items() if v}
    # A run id the user chose may name someone else's run: it is ours only once the API accepts it.
    owned = None if args.run_id else run_id
    try:
        _start_run(api, body)
        owned = run_id
        console.print(
            f"run [bold]{run_id}[/] started (preset {args.preset or 'none: the tutorial settings'})"
        )
        return _follow_run(api, run_id, host, args, console)
    except RunRefused as exc:
        owned = None
        console.print(f"[red]{exc}[/]")
        return 2
    except KeyboardInterrupt:
        console.print("\ninterrupted: stopping the run and everything it started")
        return 130
    finally:
        leave_nothing_running(
            api, owned, body, host=host if started else None, keep_endpoint=args.keep, console=console
        )
        if not started:
            console.print(f"the devhost at {host.url} was already running; left it running")


def _follow_run(
    api: str, run_id: str, host: ManagedDevhost, args: argparse.Namespace, console: Console
) -> int:
    """Progress, summary, loss curve, then the chat; returns the exit code."""
    from devhost.webchat import WEBCHAT_BUNDLE

    from .chat import chat_loop, piped_questions
    from .progress import print_summary, save_loss_curve, watch_run

    summary = watch_run(api, run_id, console)
    print_summary(summary, console)
    curve = save_loss_curve(api, run_id, get_settings().state_dir / "runs" / run_id / "loss_curve.png")
    if curve:
        console.print(f"loss curve: {curve}")
    if summary["status"] != "Completed":
        return 1
    endpoint = (summary.get("endpoint") or {}).get("name")
    if WEBCHAT_BUNDLE.is_file():
        console.print(f"\nchat in the browser (Bot Framework Web Chat via the bot): [bold]{host.url}/chat[/]")
    else:
        console.print(
            f"\nthe browser chat at {host.url}/chat needs the Web Chat bundle: "
            "install Node.js and run `make webchat`"
        )
    if not endpoint or args.no_chat:
        return 0
    if sys.stdin.isatty():
        console.print("or here in the terminal; leaving the chat stops everything")
        chat_loop(endpoint, console)
        return 0
    # No terminal: answer the questions piped in (one a line), then keep serving the page.
    chat_loop(endpoint, console, read=piped_questions(console))
    console.print("press Ctrl-C to stop")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("\nstopping")
    return 0


def port_number(text: str) -> int:
    """A TCP port for argparse: 0-65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port number (0-65535; the default comes from DEVHOST_PORT when it is set)"
        )
    return port


def state_folder(text: str) -> Path:
    """A folder for the devhost's state: not a file (whether it can be made is known when it is made)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def _settings_problems(error: ValidationError) -> str:
    """Each bad setting by name; not its value, which may be a secret."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return (
        f"the app settings are not valid ({PROJECT_ROOT / 'local.settings.json'}'s Values or the "
        f"environment): {problems}"
    )


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
    p_run.add_argument(
        "--port",
        type=port_number,
        # A string default goes through `type` too, once parsing is done: a bad DEVHOST_PORT is an error
        # that names it, and --help still works.
        default=os.environ.get("DEVHOST_PORT", "7071"),
        help="the devhost's port (default $DEVHOST_PORT or 7071; 0 = a private devhost on any free port)",
    )
    p_run.add_argument(
        "--devhost-state",
        type=state_folder,
        default=None,
        help="the devhost's state folder when this starts one (default .devhost)",
    )
    p_run.add_argument("--keep", action="store_true", help="keep the endpoint when leaving")
    p_run.add_argument("--no-chat", action="store_true")
    p_chat = sub.add_parser("chat", help="chat with a deployed endpoint")
    p_chat.add_argument("--endpoint", default=None, help="default: the newest endpoint with traffic")
    args = parser.parse_args(argv)
    console = Console()
    try:
        # The settings the devhost gives the app (it runs this project): the chat, the cleanup on leaving
        # and the loss curve must find the run's endpoint and state where the app put them.
        load_local_settings(PROJECT_ROOT)
        get_settings()  # a bad value is named here, not by a traceback or a devhost that will not start
    except AppLoadError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    except ValidationError as exc:
        console.print(_settings_problems(exc), style="red", markup=False)
        return 2
    if args.command == "run":
        args.preset = args.preset or None
        with ending_signals_interrupt():
            return run(args, console)
    from .chat import chat_loop, latest_endpoint

    try:
        endpoint = args.endpoint or latest_endpoint()
    except BackendError as exc:  # e.g. PHI3_BACKEND=azure without the settings that name the workspace
        console.print(str(exc), style="red", markup=False)
        return 1
    if not endpoint:
        console.print("[red]no endpoint with traffic: run `make run` first[/]")
        return 1
    return chat_loop(endpoint, console)


if __name__ == "__main__":
    sys.exit(main())
