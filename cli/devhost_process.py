"""Start (or reuse) the devhost serving this project, as a child process the CLI owns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from settings import PROJECT_ROOT


class DevhostError(RuntimeError):
    pass


class ManagedDevhost:
    def __init__(self, port: int, state_dir: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.state_dir = state_dir or PROJECT_ROOT / ".devhost"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir / "devhost.log"

    def running_here(self) -> bool:
        try:
            r = requests.get(f"{self.url}/api/health", timeout=2)
        except requests.ConnectionError:
            return False
        return r.ok and r.json().get("status") == "ok"

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
                raise DevhostError(f"the devhost exited (code {self.proc.returncode}); see {self.log_path}")
            if self._announced() and self.running_here():
                return True
            time.sleep(0.3)
        raise DevhostError(
            f"the devhost did not answer on {self.url} within {timeout:.0f}s; see {self.log_path}"
        )

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
