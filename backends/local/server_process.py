"""Starting, finding and stopping an endpoint's scoring-server process (a mixin of LocalEndpoints)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from .endpoint_state import EndpointServerError, ServerRecord, _boot_id, _proc_stat

log = logging.getLogger("backends.local.endpoints")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ServerProcesses:
    """Mixin of LocalEndpoints: uses its ``_dir()``, ``_children``, ``tracking_uri``, ``python``
    and ``start_timeout_s``."""

    def _start_server(self, name: str) -> ServerRecord:
        directory = self._dir(name)
        (directory / "server.json").unlink(missing_ok=True)
        (directory / "logs").mkdir(exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }
        log_path = directory / "logs" / "server.log"
        with open(log_path, "ab") as server_log:
            started_at_byte = server_log.tell()  # the log is appended to across restarts
            child = subprocess.Popen(
                [self.python, "-m", "backends.local.scoring_server", str(directory)],
                cwd=_PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the host's terminal must not kill endpoints
            )
        self._children[name] = child
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            record = self._running_record(name)
            if record is not None and record.pid == child.pid:
                log.info("endpoint %s: server pid %s on port %s", name, record.pid, record.port)
                return record
            if child.poll() is not None:
                raise EndpointServerError(
                    f"endpoint {name!r}: the server exited with code {child.returncode}: "
                    f"{_last_line(log_path, started_at_byte)} (its output is in {log_path})"
                )
            time.sleep(0.05)
        # Left running, it could come up later beside the next attempt's server or hold the port.
        _signal_server(child.pid, signal.SIGKILL)
        child.wait()
        del self._children[name]
        (directory / "server.json").unlink(missing_ok=True)
        raise EndpointServerError(
            f"endpoint {name!r}: the server did not start within {self.start_timeout_s:g} s and was "
            f"stopped; see {log_path}"
        )

    def _running_record(self, name: str) -> ServerRecord | None:
        """The server record if that very process is alive (not a zombie, not a reused pid)."""
        child = self._children.get(name)
        if child is not None and child.poll() is not None:
            del self._children[name]  # reaped: no zombie left behind
        try:
            record = ServerRecord.model_validate_json((self._dir(name) / "server.json").read_bytes())
        except FileNotFoundError:
            return None
        stat = _proc_stat(record.pid)
        if (
            stat is None
            or stat[0] in ("Z", "X")
            or stat[1] != record.start_ticks
            or record.boot_id != _boot_id()
        ):
            return None
        return record

    def _stop_server(self, name: str) -> None:
        record = self._running_record(name)
        if record is not None:
            _signal_server(record.pid, signal.SIGTERM)
            if not self._wait_gone(name, record, timeout_s=10.0):
                log.warning("endpoint %s: server pid %s ignored SIGTERM; killing it", name, record.pid)
                _signal_server(record.pid, signal.SIGKILL)
                self._wait_gone(name, record, timeout_s=10.0)
        (self._dir(name) / "server.json").unlink(missing_ok=True)

    def _wait_gone(self, name: str, record: ServerRecord, *, timeout_s: float) -> bool:
        child = self._children.get(name)
        if child is not None and child.pid == record.pid:
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return False
            del self._children[name]
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stat = _proc_stat(record.pid)
            if stat is None or stat[0] in ("Z", "X") or stat[1] != record.start_ticks:
                return True
            time.sleep(0.05)
        return False


def _signal_server(pid: int, signum: int) -> None:
    """Signal the server and anything it started (it leads its own session), never a foreign group."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        return  # it exited on its own meanwhile


def _last_line(path: Path, offset: int) -> str:
    """The last line a server wrote from ``offset`` on: why it exited (its SystemExit message or its
    traceback's exception). It leads the error, which callers shorten to a line or a few hundred
    characters."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(offset)
            lines = log_file.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no server log)"
    said = [line.strip() for line in lines if line.strip()]
    return said[-1] if said else "(it wrote nothing)"
