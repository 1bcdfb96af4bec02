"""The one place that builds the backend, from settings (``PHI3_BACKEND=local|azure``).

Activities, the bot and the cleanup timer ask ``get_backend()``; tests swap the factory with
``set_backend`` instead of patching deep inside.
"""

from __future__ import annotations

import threading

from backends.protocol import BackendError, MLBackend
from settings import AppSettings, get_settings

_lock = threading.Lock()
_backend: MLBackend | None = None


def create_backend(settings: AppSettings, *, host: bool = True) -> MLBackend:
    """``host=False`` for clients (the CLI): they use endpoints but never restart them."""
    if settings.backend == "local":
        from backends.local.backend import LocalBackend

        return LocalBackend(settings, restart_endpoints=host)
    if settings.backend == "azure":
        try:
            from backends.azure.backend import AzureBackend
        except ImportError as exc:
            raise BackendError(f"the azure backend cannot be loaded: {exc}") from exc
        return AzureBackend(settings)
    raise BackendError(f"PHI3_BACKEND must be 'local' or 'azure', not {settings.backend!r}")


def get_backend() -> MLBackend:
    global _backend
    with _lock:
        if _backend is None:
            _backend = create_backend(get_settings())
        return _backend


def set_backend(backend: MLBackend | None) -> None:
    global _backend
    with _lock:
        _backend = backend
