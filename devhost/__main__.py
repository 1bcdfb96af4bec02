"""``python -m devhost [--root DIR] [--port 7071] [--state DIR]``: run a Function App locally."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .app_loader import AppLoadError
from .http_triggers import HTTP_RESPONSE_LIMIT_S
from .server import serve
from .webchat import webchat_plugin


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devhost",
        description="Local Azure Functions + Durable Functions host for a Python v2-model function_app.py.",
    )
    parser.add_argument(
        "--root", type=Path, default=Path.cwd(), help="app folder (default: current directory)"
    )
    parser.add_argument("--port", type=int, default=7071, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--state", type=Path, default=None, help="state folder (default: <root>/.devhost)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument(
        "--max-page",
        type=_page_size,
        default=os.environ.get("DEVHOST_DURABLE_MAX_PAGE") or None,
        help="answer Durable instance queries in pages of at most N, shorter than asked, as a storage "
        "provider may: proves a client follows the continuation token (default: as asked; env "
        "DEVHOST_DURABLE_MAX_PAGE)",
    )
    parser.add_argument(
        "--empty-first-page",
        action="store_true",
        default=os.environ.get("DEVHOST_DURABLE_EMPTY_FIRST_PAGE") == "1",
        help="answer each Durable instance query's first request with no instances and a continuation "
        "token, as the Azure Table service may (env DEVHOST_DURABLE_EMPTY_FIRST_PAGE=1)",
    )
    parser.add_argument(
        "--http-response-limit",
        type=_seconds,
        default=os.environ.get("DEVHOST_HTTP_RESPONSE_LIMIT_S") or HTTP_RESPONSE_LIMIT_S,
        help="seconds an HTTP function has to answer before its caller gets 502 while it runs on, as "
        f"behind Azure's load balancer (default {HTTP_RESPONSE_LIMIT_S:g}; env "
        "DEVHOST_HTTP_RESPONSE_LIMIT_S)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(
            serve(
                args.root,
                args.port,
                args.state,
                plugins=[webchat_plugin],
                max_page=args.max_page,
                empty_first_page=args.empty_first_page,
                http_response_limit_s=args.http_response_limit,
            )
        )
    except AppLoadError as exc:
        print(f"devhost: cannot load the app: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"devhost: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
