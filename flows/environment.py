"""Make Prompt flow a well-behaved library inside our app. Call ``configure_promptflow()`` before
anything imports promptflow (or azure-ai-evaluation, which imports it).

Out of the box promptflow writes ``~/.promptflow``, sends telemetry, may start a detached trace
service, logs user text at INFO, and needs an OS keyring for its connection store. Here its home,
config and key file live under the project's state directory, telemetry and tracing are off, and
its log level keeps user text out of logs. ``promptflow_environment()`` gives the same settings as
environment variables for child processes such as the ``pf`` CLI, so they share the store and key.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

_lock = threading.Lock()
_configured: Path | None = None

# Settings promptflow reads from <home>/pf.yaml; these two must hold whatever else the file says.
REQUIRED_CONFIG: dict[str, dict[str, Any]] = {
    "telemetry": {"enabled": False},
    "trace": {"destination": "none"},
}
KEY_FILE = Path("xdg") / "python_keyring" / "keyring_pass.cfg"


def promptflow_home(state_dir: Path) -> Path:
    return (Path(state_dir) / "promptflow").resolve()


def key_file(state_dir: Path) -> Path:
    """The plaintext keyring file holding the connection store's encryption key (owner-only)."""
    return promptflow_home(state_dir) / KEY_FILE


def promptflow_environment(state_dir: Path) -> dict[str, str]:
    """The environment variables that point promptflow (library or ``pf`` CLI) at ``state_dir``."""
    home = promptflow_home(state_dir)
    return {
        "PF_HOME_DIRECTORY": str(home),
        # INFO would log every flow input ("Execute flow with data {...}"): user text.
        "PF_LOGGING_LEVEL": "WARNING",
        "PF_DISABLE_TRACING": "true",
        # The Azure Monitor exporter fetches remote settings even with telemetry disabled.
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        # The local connection store encrypts secrets with a key kept in a keyring; on a headless machine
        # use a plaintext key file under the state dir (0600), for Python and the pf CLI alike.
        "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring",
        "XDG_DATA_HOME": str(home / "xdg"),
    }


def configure_promptflow(state_dir: Path) -> Path:
    """Idempotent; returns promptflow's home. Must run before the first promptflow import.

    promptflow reads its home once, at import: a second state directory in the same process after
    that cannot take effect, so it is refused instead of silently using the first one.
    """
    global _configured
    with _lock:
        home = promptflow_home(state_dir)
        if _configured == home:
            return home
        imported = any(m == "promptflow" or m.startswith("promptflow.") for m in sys.modules)
        if imported and _configured is None:
            raise RuntimeError(
                "promptflow was imported before configure_promptflow(); import it lazily, after "
                "configure_promptflow(settings.state_dir)"
            )
        if imported:
            raise RuntimeError(
                f"promptflow is already configured for {_configured} in this process and reads its home "
                f"only once; cannot switch to {home}. Use one state directory per process"
            )
        _prepare_home(home)
        os.environ.update(promptflow_environment(state_dir))
        _configured = home
        return home


def ensure_promptflow_configured(state_dir: Path) -> Path:
    """Configure for ``state_dir`` unless this process already configured promptflow; returns its home.

    For code that never touches the connection store (running a flow with an in-memory connection,
    azure-ai-evaluation's scorers): any home this process configured is as good as ``state_dir``.
    """
    with _lock:
        configured = _configured
    return configured if configured is not None else configure_promptflow(state_dir)


def _prepare_home(home: Path) -> None:
    for directory in (home, home / "tmp", home / KEY_FILE.parent):
        directory.mkdir(parents=True, exist_ok=True)
    # The store holds encrypted secrets and the key sits next to it: owner-only, all the way down.
    for directory in (home, home / "xdg", home / KEY_FILE.parent):
        os.chmod(directory, 0o700)
    _write_config(home / "pf.yaml")
    secure_key_file(home)


def _write_config(config: Path) -> None:
    """Keep whatever promptflow wrote (its installation id) but force telemetry and tracing off."""
    current = yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else None
    merged: dict[str, Any] = dict(current) if isinstance(current, dict) else {}
    for section, values in REQUIRED_CONFIG.items():
        existing = merged.get(section)
        merged[section] = {**(existing if isinstance(existing, dict) else {}), **values}
    if merged != current:
        config.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")


def secure_key_file(home: Path) -> Path:
    """Create the key file owner-only before keyring writes it, and tighten one that exists."""
    path = home / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path
