"""The devhost's local chat page: ``/chat`` (Bot Framework Web Chat) over a loopback Direct Line.

``webchat_plugin`` is a devhost route plugin (``DevHost(plugins=[webchat_plugin])``). The Web Chat
bundle comes from npm (``botframework-webchat``, pinned in package.json) and is installed into the
ignored ``node_modules/`` by ``make webchat`` (``make run`` does it); it is never committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .directline import CLIENT_PREFIX, DirectLine

if TYPE_CHECKING:
    from devhost.server import DevHost

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WEBCHAT_BUNDLE = PROJECT_ROOT / "node_modules" / "botframework-webchat" / "dist" / "webchat.js"
PAGE = Path(__file__).resolve().parent / "chat.html"

__all__ = ["WEBCHAT_BUNDLE", "DirectLine", "webchat_plugin"]


def webchat_plugin(host: DevHost) -> list[web.RouteDef]:
    directline = DirectLine(host)
    host.directline = directline  # type: ignore[attr-defined]  # for tests and the CLI

    async def page(request: web.Request) -> web.Response:
        html = PAGE.read_text().replace("{{DIRECTLINE_DOMAIN}}", CLIENT_PREFIX)
        return web.Response(text=html, content_type="text/html")

    async def bundle(request: web.Request) -> web.StreamResponse:
        if not WEBCHAT_BUNDLE.is_file():
            return web.Response(
                status=404,
                text=f"// {WEBCHAT_BUNDLE} is missing: run `make webchat` (npm ci) in {PROJECT_ROOT}\n",
                content_type="application/javascript",
            )
        return web.FileResponse(WEBCHAT_BUNDLE, headers={"Content-Type": "application/javascript"})

    return [web.get("/chat", page), web.get("/chat/webchat.js", bundle), *directline.routes()]
