"""Start the devhost as a real subprocess and talk to it over HTTP, as a user or `func start` would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"Completed", "Failed", "Terminated", "Canceled"}


class DevhostProcess:
    """One devhost process; ``restart`` keeps the same state folder and port."""

    def __init__(self, app_root: Path, state_dir: Path, env: dict[str, str] | None = None, port: int = 0):
        self.app_root = app_root
        self.state_dir = state_dir
        self.env = {**os.environ, **(env or {})}
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []
        self._pump: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 60) -> str:
        cmd = [
            sys.executable,
            "-m",
            "devhost",
            "--root",
            str(self.app_root),
            "--port",
            str(self.port),
            "--state",
            str(self.state_dir),
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        ready = threading.Event()

        def pump(stream):
            for line in stream:
                self.output.append(line)
                m = re.match(r"devhost listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()

        self._pump = threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("devhost did not start:\n" + "".join(self.output[-50:]))
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def kill(self) -> None:
        """kill -9: no chance to clean up, exactly what the resume logic must survive."""
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._pump is not None:
            self._pump.join(10)  # the last lines: log_text() after stop() is the whole output

    def restart(self) -> str:
        self.stop() if self.proc and self.proc.poll() is None else None
        return self.start()

    def log_text(self) -> str:
        return "".join(self.output)

    # Durable management API -------------------------------------------------------------------
    @property
    def durable(self) -> str:
        return f"{self.url}/runtime/webhooks/durabletask"

    def start_orchestration(self, name: str, payload=None, instance_id: str | None = None) -> str:
        """Start through the management API with the Python client's double-encoded body."""
        url = f"{self.durable}/orchestrators/{name}" + (f"/{instance_id}" if instance_id else "")
        data = None if payload is None else json.dumps(json.dumps(payload))
        r = requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=30)
        r.raise_for_status()
        return r.json()["id"]

    def status(self, instance_id: str, **flags) -> requests.Response:
        params = {k: "true" if v else "false" for k, v in flags.items()}
        return requests.get(f"{self.durable}/instances/{instance_id}", params=params, timeout=30)

    def wait(self, instance_id: str, timeout: float = 60, until=None) -> dict:
        """Poll the status until it is terminal (or ``until(status)`` holds)."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            r = self.status(instance_id)
            if r.status_code != 404:
                body = r.json()
                if until(body) if until else body["runtimeStatus"] in TERMINAL:
                    return body
            time.sleep(0.05)
        raise TimeoutError(
            f"instance {instance_id} did not get there in {timeout}s; last status {body}\n"
            + "".join(self.output[-30:])
        )


DURABLE_APP = PROJECT_ROOT / "tests" / "apps" / "durable_app"
QUIET_TIMER = "0 0 0 1 1 *"  # the app's timer fires only on 1 January


class DurableAppHost(DevhostProcess):
    """The test app ``tests/apps/durable_app`` on a devhost of its own under ``tmp``; its functions
    append JSON lines to ``activity_log`` (read with ``records``) and keep counters beside it."""

    def __init__(self, tmp: Path, timer_schedule: str = QUIET_TIMER):
        self.activity_log = tmp / "activities.log"
        super().__init__(
            DURABLE_APP,
            tmp / "state",
            env={
                "DEVHOST_TEST_LOG": str(self.activity_log),
                "DEVHOST_TEST_COUNTERS": str(tmp / "counters"),
                "TEST_TIMER_SCHEDULE": timer_schedule,
            },
        )

    def records(self, kind: str) -> list[dict]:
        """What the app's functions logged of ``kind``, in order."""
        if not self.activity_log.exists():
            return []
        return [r for r in map(json.loads, self.activity_log.read_text().splitlines()) if r["kind"] == kind]
