"""The flow's custom connection in promptflow's LOCAL connection store (the local ``connection`` step).

``pf flow test``, ``pf flow serve`` and ``load_flow`` without a context resolve the node's
``connection: <name>`` from this store. The connection is a ``CustomConnection`` with config
``endpoint`` (the deployment's scoring URI) and secret ``key``. promptflow encrypts the secret with a
key kept in a plaintext key file under the state directory (``flows.environment``).

The key goes in and never comes back out: results carry the name, the endpoint and what changed,
nothing here logs, and promptflow's entities (which hold the plain secret) never leave this module.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from flows.environment import configure_promptflow, key_file, secure_key_file

_lock = threading.Lock()
# The endpoint the connection served before the run that pointed it at ``endpoint``: kept in the
# connection itself, so a retry of that run's step still knows it (``backends.protocol.served_before``).
PREVIOUS = "previous_endpoint"


class LocalConnection(BaseModel):
    """What the ``connection`` step reports (JSON-safe, never the key)."""

    name: str
    endpoint: str
    store: str  # the promptflow home holding pf.sqlite
    action: Literal["created", "updated", "unchanged"]


def upsert_connection(
    name: str, scoring_uri: str, key: str, *, state_dir: Path, previous: str | None = None
) -> LocalConnection:
    """Create the named custom connection, or update it when the endpoint or key changed (idempotent);
    ``previous``: the endpoint URI it served before (kept in its configs)."""
    if not key:
        raise ValueError(f"connection '{name}': the endpoint key is empty; fetch the endpoint's primary key")
    if not scoring_uri.startswith(("http://", "https://")):
        raise ValueError(f"connection '{name}': endpoint {scoring_uri!r} is not an http(s) scoring URI")
    configs = {"endpoint": scoring_uri} | ({PREVIOUS: previous} if previous else {})
    home = configure_promptflow(state_dir)
    with _lock:
        client = _client(state_dir)
        current = _current(client, name)
        if current == (configs, key):
            action: Literal["created", "updated", "unchanged"] = "unchanged"
        else:
            from promptflow.connections import CustomConnection

            action = "created" if current is None else "updated"
            connection = CustomConnection(name=name, configs=configs, secrets={"key": key})
            client.connections.create_or_update(connection)  # returns the entity with the plain key: drop it
        secure_key_file(home)
    return LocalConnection(name=name, endpoint=scoring_uri, store=str(home), action=action)


def delete_connection(name: str, *, state_dir: Path) -> bool:
    """Delete the named connection; False when there was none (deleting twice is fine)."""
    configure_promptflow(state_dir)
    from promptflow._sdk._errors import ConnectionNotFoundError

    with _lock:
        client = _client(state_dir)
        try:
            client.connections.get(name, with_secrets=False)
        except ConnectionNotFoundError:
            return False
        client.connections.delete(name)
        return True


def connection_endpoint(name: str, *, state_dir: Path) -> str | None:
    """The stored connection's endpoint (without decrypting its key), or None if there is none."""
    return connection_endpoints(name, state_dir=state_dir)[0]


def connection_endpoints(name: str, *, state_dir: Path) -> tuple[str | None, str | None]:
    """The stored connection's endpoint and the one it served before that; (None, None): no connection."""
    configure_promptflow(state_dir)
    from promptflow._sdk._errors import ConnectionNotFoundError

    with _lock:
        try:
            stored = _client(state_dir).connections.get(name, with_secrets=False)
        except ConnectionNotFoundError:
            return None, None
    configs = stored.configs or {}
    return configs.get("endpoint"), configs.get(PREVIOUS)


def _current(client: Any, name: str) -> tuple[dict, str] | None:
    """(configs, key) of the stored connection; None when there is none.

    A stored secret that cannot be decrypted (its key file was lost or replaced) is unrecoverable; it
    reads as ({}, "") so the caller overwrites it with the key it has, under the current key file.
    """
    from promptflow._sdk._errors import ConnectionNotFoundError, DecryptConnectionError

    try:
        stored = client.connections.get(name, with_secrets=True)
    except ConnectionNotFoundError:
        return None
    except DecryptConnectionError:
        return ({}, "")
    except Exception as error:
        if "Encryption key not found" not in str(error):  # promptflow raises a bare Exception for this
            raise
        return ({}, "")
    return dict(stored.configs or {}), (stored.secrets or {}).get("key", "")


def _client(state_dir: Path) -> Any:
    """A PFClient on the local store, with the keyring pinned to our key file."""
    _pin_keyring(key_file(state_dir))
    from promptflow.client import PFClient

    return PFClient()


def _pin_keyring(path: Path) -> None:
    """Use the plaintext key file under the state dir even if keyring was initialised before we were.

    The environment (PYTHON_KEYRING_BACKEND, XDG_DATA_HOME) already selects this file for the pf CLI;
    setting it here as well guards against a keyring backend chosen earlier in this process.
    """
    import keyring
    from keyrings.alt.file import PlaintextKeyring

    current = keyring.get_keyring()
    if isinstance(current, PlaintextKeyring) and Path(current.file_path) == path:
        return
    pinned = PlaintextKeyring()
    pinned.file_path = str(path)
    keyring.set_keyring(pinned)
