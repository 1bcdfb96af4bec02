"""Make Prompt flow a well-behaved library inside our app. Call ``configure_promptflow()`` before
anything imports promptflow (or azure-ai-evaluation, which imports it).

Out of the box promptflow writes ``~/.promptflow``, sends telemetry, may start a detached trace
service, logs user text at INFO, and needs an OS keyring for its connection store. Here its home,
config and key file live under the project's state directory, telemetry and tracing are off, and
its log level keeps user text out of logs.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_configured: Path | None = None

PF_CONFIG = "telemetry:\n  enabled: false\ntrace:\n  destination: none\n"


def configure_promptflow(state_dir: Path) -> Path:
    """Idempotent; returns promptflow's home. Must run before the first promptflow import."""
    global _configured
    with _lock:
        home = (state_dir / "promptflow").resolve()
        if _configured == home:
            return home
        if any(m == "promptflow" or m.startswith("promptflow.") for m in sys.modules) and _configured is None:
            raise RuntimeError("promptflow was imported before configure_promptflow(); import it lazily")
        home.mkdir(parents=True, exist_ok=True)
        (home / "tmp").mkdir(exist_ok=True)
        config = home / "pf.yaml"
        if not config.exists():
            config.write_text(PF_CONFIG)
        os.environ["PF_HOME_DIRECTORY"] = str(home)
        os.environ["PF_LOGGING_LEVEL"] = "WARNING"
        os.environ["PF_DISABLE_TRACING"] = "true"
        os.environ["APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED"] = "true"
        # The local connection store encrypts secrets with a key kept in a keyring; on a headless
        # machine use a plaintext key file, under the state dir (0600), for Python and the pf CLI alike.
        os.environ["PYTHON_KEYRING_BACKEND"] = "keyrings.alt.file.PlaintextKeyring"
        os.environ["XDG_DATA_HOME"] = str(home / "xdg")
        key_dir = home / "xdg" / "python_keyring"
        key_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(key_dir, 0o700)
        _configured = home
        return home


def secure_key_file(home: Path) -> None:
    """The keyring file is plaintext base64: owner-only."""
    key_file = home / "xdg" / "python_keyring" / "keyring_pass.cfg"
    if key_file.exists():
        os.chmod(key_file, 0o600)
