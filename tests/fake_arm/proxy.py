"""An HTTP CONNECT proxy that lets storage hosts under the fake cloud's suffix reach the fake.

Clients build Azure Files URLs from the account name and the cloud's storage suffix
(``https://<account>.file.<suffix>``), names no resolver here knows. The app's process gets
``HTTPS_PROXY`` pointing at this proxy (and ``NO_PROXY`` for loopback, so everything else goes
direct): the SDK opens a tunnel with ``CONNECT <host>:443``, this side answers with the fake's test
certificate (which names ``*.file.<suffix>``), and the requests inside the tunnel are served by the
fake's own router, recorded in the same exchange log. Tunnels to any other host are refused (403),
so nothing can leave the machine through it.
"""

from __future__ import annotations

import re
import socketserver
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .certs import STORAGE_SUFFIX
from .server import FakeServer

TUNNEL_HOSTS = re.compile(rf"^[a-z0-9]{{3,24}}\.file\.{re.escape(STORAGE_SUFFIX)}:443$", re.IGNORECASE)


class ConnectProxy:
    """Plain-HTTP proxy on loopback; each accepted tunnel is TLS-terminated and served by ``server``."""

    def __init__(self, server: FakeServer):
        self.server = server
        self.tunnels: list[str] = []  # the hosts tunnels were opened to, in order
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""

    def start(self) -> str:
        proxy = self

        class _Tunnel(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # the fake's exchanges are the log
                return

            def do_CONNECT(self) -> None:
                if not TUNNEL_HOSTS.match(self.path):
                    self.send_error(403, f"the fake Azure proxy tunnels only to *.file.{STORAGE_SUFFIX}")
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                proxy.tunnels.append(self.path)
                context: ssl.SSLContext = proxy.server.certs.server_context()
                tls = context.wrap_socket(self.connection, server_side=True)
                # The handler's loop now reads the tunnelled requests from the TLS stream (http.client
                # sends CONNECT as HTTP/1.0, which would otherwise end the loop here).
                self.close_connection = False
                self.connection = self.request = tls
                self.rfile = tls.makefile("rb")
                self.wfile = socketserver._SocketWriter(tls)  # what StreamRequestHandler itself uses

            def _tunnelled(self) -> None:
                proxy.server._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _tunnelled

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Tunnel)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, name="fake-azure-proxy", daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
