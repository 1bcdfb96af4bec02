"""Start (or reuse) the devhost serving this project, as a child process the CLI owns."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from settings import PROJECT_ROOT


class DevhostError(RuntimeError):
    pass


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


class ManagedDevhost:
    def __init__(self, port: int, state_dir: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.state_dir = state_dir or PROJECT_ROOT / ".devhost"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir / "devhost.log"

    def running_here(self) -> bool:
        """A devhost answers on the port. Something else there (another web server, a port that never
        answers) is not one: starting ours then fails, and says the port is taken."""
        try:
            r = requests.get(f"{self.url}/api/health", timeout=2)
            health = r.json() if r.ok else None
        except (requests.RequestException, ValueError):
            return False
        return isinstance(health, dict) and health.get("status") == "ok"

    def start(self, timeout: float = 90) -> bool:
        """Returns True when this call started the host (False when one was already serving).

        Port 0 always starts a private host on a free port; ``url`` then says which."""
        if self.port and self.running_here():
            return False
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            message = f"cannot make the devhost's state folder {self.state_dir}: {error.strerror}"
            raise DevhostError(message) from None
        with self.log_path.open("a") as log:
            log_start = log.tell()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "devhost",
                    "--root",
                    str(PROJECT_ROOT),
                    "--port",
                    str(self.port),
                    "--state",
                    str(self.state_dir),
                ],
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,  # the chat reads the terminal, never the host
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the CLI only; the CLI stops the host in order
                env=os.environ.copy(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                reason = self._last_words(log_start)
                if self.port and _port_taken(self.port):
                    reason += (
                        f" (port {self.port} is taken by something that is not a devhost: "
                        "pass --port 0 for any free port)"
                    )
                raise DevhostError(
                    f"the devhost exited (code {self.proc.returncode}){': ' + reason if reason else ''}; "
                    f"see {self.log_path}"
                )
            if self._announced() and self.running_here():
                return True
            time.sleep(0.3)
        raise DevhostError(
            f"the devhost did not answer on {self.url} within {timeout:.0f}s; see {self.log_path}"
        )

    def _last_words(self, since: int) -> str:
        """Why the host exited, in its words (``devhost: cannot listen on ...: Address already in use``,
        ``devhost: cannot load the app: ...``) from this start's part of the log."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        said = [i for i, line in enumerate(lines) if line.startswith("devhost: ")]
        if not said:
            return ""
        return "\n".join(lines[said[-1] :]).removeprefix("devhost: ").strip()

    def _announced(self) -> bool:
        """The host writes ``devhost.json`` once listening; ours is the one with our child's pid."""
        assert self.proc
        try:
            info = json.loads((self.state_dir / "devhost.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if info.get("pid") != self.proc.pid:
            return False  # a previous host's file
        self.port = int(info["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        return True

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
