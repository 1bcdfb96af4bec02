"""Start (or reuse) the devhost serving this project, as a child process the CLI owns."""

from __future__ import annotations

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
        """Returns True when this call started the host (False when one was already serving)."""
        if self.running_here():
            return False
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("a")
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
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DevhostError(f"the devhost exited (code {self.proc.returncode}); see {self.log_path}")
            if self.running_here():
                return True
            time.sleep(0.3)
        raise DevhostError(
            f"the devhost did not answer on {self.url} within {timeout:.0f}s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
