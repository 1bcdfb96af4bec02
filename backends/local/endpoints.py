"""Local managed online endpoints: one scoring-server process per endpoint, on a loopback port.

Mirrors Azure ML's online endpoints and deployments: the same name rules, provisioning states
(Creating, Updating, Succeeded, Failed, Deleting), traffic rules and primary/secondary keys.
State lives in ``<workspace>/endpoints/<name>/``: ``endpoint.json`` (config, written here),
``keys.json`` (0600), ``server.json`` (written by the server once it listens), ``last_used``
(touched by the server when it scores) and ``logs/server.log``.

Every operation is idempotent and safe to retry: a per-endpoint file lock serialises callers
(threads and processes alike), the port is chosen once and kept, and a live server is never
started twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from .endpoint_state import (  # noqa: F401 - re-exported: callers import these from here
    DeploymentConfig,
    DeploymentNotFoundError,
    EndpointConfig,
    EndpointKeys,
    EndpointNotFoundError,
    EndpointServerError,
    InvalidEndpointRequest,
    KeyName,
    ProvisioningState,
    ServerRecord,
    process_identity,
    read_endpoint_config,
    read_keys,
    validate_resource_name,
    write_json_atomic,
)
from .server_process import ServerProcesses

log = logging.getLogger(__name__)


# -- what callers get back --------------------------------------------------------------------
class EndpointInfo(BaseModel):
    name: str
    scoring_uri: str
    tags: dict[str, str]
    provisioning_state: ProvisioningState
    traffic: dict[str, int]
    port: int
    pid: int | None
    created_at: datetime
    last_used_at: datetime | None
    error: str | None = None


class DeploymentInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    endpoint_name: str
    model_uri: str
    instance_count: int
    max_new_tokens_limit: int
    provisioning_state: ProvisioningState
    error: str | None = None


class LocalEndpoints(ServerProcesses):
    def __init__(
        self,
        workspace_dir: Path,
        *,
        tracking_uri: str,
        start_timeout_s: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        self.root = Path(workspace_dir).resolve() / "endpoints"
        self.tracking_uri = tracking_uri
        self.start_timeout_s = start_timeout_s
        self.python = python
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- endpoints ---------------------------------------------------------------------------
    def create_or_update_endpoint(self, name: str, *, tags: dict[str, str]) -> EndpointInfo:
        validate_resource_name("endpoint", name)
        with self._locked(name):
            directory = self._dir(name)
            if (directory / "endpoint.json").exists():
                config = read_endpoint_config(directory)
                if config.tags != tags:
                    config.tags = dict(tags)
                    self._write_config(config)
            else:
                (directory / "logs").mkdir(parents=True, exist_ok=True)
                config = EndpointConfig(
                    name=name, port=self._free_port(), tags=dict(tags), created_at=datetime.now(UTC)
                )
                self._write_keys(name, _new_keys())
                self._write_config(config)
            (directory / "deleting").unlink(missing_ok=True)
            self._ensure_server(name)
            return self._endpoint_info(config)

    def get_endpoint(self, name: str) -> EndpointInfo:
        return self._endpoint_info(self._config(name))

    def list_endpoints(self) -> list[EndpointInfo]:
        if not self.root.is_dir():
            return []
        infos = []
        for path in sorted(self.root.glob("*/endpoint.json")):
            try:
                infos.append(self._endpoint_info(self._config(path.parent.name)))
            except EndpointNotFoundError:
                continue  # deleted while we listed
        return infos

    def delete_endpoint(self, name: str) -> None:
        """Delete the endpoint and its deployments; deleting a missing endpoint is a no-op."""
        with self._locked(name):
            directory = self._dir(name)
            if not directory.exists():
                return
            (directory / "deleting").touch()
            self._stop_server(name)
            shutil.rmtree(directory)
        # The lock file stays: unlinking it could let two callers lock different inodes.

    # -- deployments -------------------------------------------------------------------------
    def create_or_update_deployment(
        self,
        endpoint: str,
        deployment: str,
        *,
        model_uri: str,
        instance_count: int = 1,
        max_new_tokens_limit: int = 1024,
        request_timeout_ms: int = 90_000,
        tags: dict[str, str] | None = None,
    ) -> DeploymentInfo:
        """Record the deployment and have the server load it; poll ``get_deployment`` for Succeeded."""
        validate_resource_name("deployment", deployment)
        with self._locked(endpoint):
            config = self._config(endpoint)
            wanted = DeploymentConfig(
                model_uri=model_uri,
                instance_count=instance_count,
                max_new_tokens_limit=max_new_tokens_limit,
                request_timeout_ms=request_timeout_ms,
                tags=tags or {},
            )
            current = config.deployments.get(deployment)
            if current is not None:
                same = current.model_dump(exclude={"revision"}) == wanted.model_dump(exclude={"revision"})
                state = self._deployment_info(config, deployment).provisioning_state
                if same and state != "Failed":
                    return self._deployment_info(config, deployment)
                # A changed spec, or a retry of a failed load, is a new revision like an Azure PUT.
                wanted.revision = current.revision + 1
            config.deployments[deployment] = wanted
            self._apply(config)
            return self._deployment_info(config, deployment)

    def get_deployment(self, endpoint: str, deployment: str) -> DeploymentInfo:
        """The deployment's state, from the server's /health (never blocks on loading)."""
        return self._deployment_info(self._config(endpoint), deployment)

    def list_deployments(self, endpoint: str) -> list[DeploymentInfo]:
        config = self._config(endpoint)
        health = self._health(config)
        return [self._deployment_info(config, name, health) for name in config.deployments]

    def delete_deployment(self, endpoint: str, deployment: str) -> None:
        with self._locked(endpoint):
            config = self._config(endpoint)
            if deployment not in config.deployments:
                return
            if config.traffic.get(deployment, 0) > 0:
                raise InvalidEndpointRequest(
                    f"deployment {deployment!r} receives {config.traffic[deployment]}% of endpoint "
                    f"{endpoint!r}'s traffic: move its traffic elsewhere with set_traffic first"
                )
            del config.deployments[deployment]
            config.traffic.pop(deployment, None)
            self._apply(config, start=False)

    def set_traffic(self, endpoint: str, traffic: dict[str, int]) -> EndpointInfo:
        """Replace the traffic split: integer percentages summing to 100, or all 0."""
        with self._locked(endpoint):
            config = self._config(endpoint)
            health = self._health(config)
            for deployment, percent in traffic.items():
                if deployment not in config.deployments:
                    known = ", ".join(sorted(config.deployments)) or "none"
                    raise InvalidEndpointRequest(
                        f"traffic names deployment {deployment!r}, which endpoint {endpoint!r} does not have "
                        f"(deployments: {known})"
                    )
                if type(percent) is not int or not 0 <= percent <= 100:
                    raise InvalidEndpointRequest(
                        f"traffic for {deployment!r} must be an integer percentage 0-100, got {percent!r}"
                    )
                state = self._deployment_info(config, deployment, health).provisioning_state
                if percent > 0 and state != "Succeeded":
                    raise InvalidEndpointRequest(
                        f"deployment {deployment!r} is {state}: traffic can only go to Succeeded deployments"
                    )
            total = sum(traffic.values())
            if total not in (0, 100):
                raise InvalidEndpointRequest(
                    f"traffic percentages must sum to 100 (or all be 0), got {total}"
                )
            config.traffic = {name: traffic.get(name, 0) for name in config.deployments}
            # Only all-zero traffic passes the checks above while the server is down.
            self._apply(config, start=False)
            return self._endpoint_info(config)

    # -- keys --------------------------------------------------------------------------------
    def get_keys(self, name: str) -> EndpointKeys:
        self._config(name)
        return read_keys(self._dir(name))

    def regenerate_keys(self, name: str, which: KeyName) -> None:
        """Replace one key; the server stops accepting the old one before this returns."""
        if which not in ("primary", "secondary"):
            raise InvalidEndpointRequest(f"key to regenerate must be 'primary' or 'secondary', got {which!r}")
        with self._locked(name):
            config = self._config(name)
            keys = read_keys(self._dir(name))
            setattr(keys, which, SecretStr(secrets.token_urlsafe(32)))
            self._write_keys(name, keys)
            self._apply(config)

    # -- processes ---------------------------------------------------------------------------
    def ensure_running(self) -> list[str]:
        """Restart every endpoint whose server is gone (e.g. after a host restart); return their names.

        One that cannot start (its port taken meanwhile) is logged and left Failed: it must not keep
        the others, or the backend every step uses, from coming up."""
        restarted = []
        for info in self.list_endpoints():
            if info.provisioning_state == "Deleting":
                continue  # a deletion was interrupted; delete_endpoint finishes it
            with self._locked(info.name):
                if self._running_record(info.name) is None:
                    try:
                        self._ensure_server(info.name)
                    except EndpointServerError as exc:
                        log.warning("endpoint %s could not be restarted: %s", info.name, exc)
                        continue
                    restarted.append(info.name)
        return restarted

    def stop_all(self) -> None:
        """Stop every endpoint server (state is kept; ``ensure_running`` brings them back)."""
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/endpoint.json")):
                with self._locked(path.parent.name):
                    self._stop_server(path.parent.name)

    def last_used_at(self, name: str) -> datetime | None:
        marker = self._dir(name) / "last_used"
        try:
            return datetime.fromtimestamp(marker.stat().st_mtime, UTC)
        except FileNotFoundError:
            return None

    # -- internals ---------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        # Validated here too: a name such as ".." must never reach a path we remove.
        return self.root / validate_resource_name("endpoint", name)

    def _config(self, name: str) -> EndpointConfig:
        try:
            return read_endpoint_config(self._dir(name))
        except FileNotFoundError:
            raise EndpointNotFoundError(f"endpoint {name!r} not found under {self.root}") from None

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{validate_resource_name('endpoint', name)}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_config(self, config: EndpointConfig) -> None:
        config.generation += 1
        write_json_atomic(self._dir(config.name) / "endpoint.json", config.model_dump(mode="json"))

    def _write_keys(self, name: str, keys: EndpointKeys) -> None:
        data = {field: value.get_secret_value() for field, value in keys}
        write_json_atomic(self._dir(name) / "keys.json", data, mode=0o600)

    def _free_port(self) -> int:
        """A loopback port the kernel says is free and no other endpoint has claimed."""
        taken = {read_endpoint_config(p.parent).port for p in self.root.glob("*/endpoint.json")}
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            if port not in taken:
                return port

    def _apply(self, config: EndpointConfig, *, start: bool = True) -> None:
        """Write the config and wait until the server runs it. A server that is not running is started,
        unless ``start`` is False: a change that only takes traffic or deployments away need not bring
        it back (it reads the config when it next starts), so a dead endpoint, even one whose port
        another program took, can still be emptied and deleted."""
        self._write_config(config)
        record = self._running_record(config.name)
        if record is None:
            if start:
                self._ensure_server(config.name)
            return
        os.kill(record.pid, signal.SIGHUP)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            health = self._health(config)
            if health is not None and health.get("generation", -1) >= config.generation:
                return
            time.sleep(0.05)
        raise EndpointServerError(
            f"endpoint {config.name!r}: the server did not apply generation {config.generation} within "
            f"{self.start_timeout_s:g} s; see {self._dir(config.name) / 'logs' / 'server.log'}"
        )

    def _ensure_server(self, name: str) -> ServerRecord:
        return self._running_record(name) or self._start_server(name)

    def _health(self, config: EndpointConfig) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{config.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                health = json.load(response)
        except (OSError, ValueError) as error:  # refused, reset, timeout, or not JSON
            log.debug("endpoint %s: no health from %s: %s", config.name, url, error)
            return None
        # Another program may have taken the port while this endpoint's server was down.
        return health if isinstance(health, dict) and health.get("endpoint") == config.name else None

    def _endpoint_info(self, config: EndpointConfig) -> EndpointInfo:
        record = self._running_record(config.name)
        state: ProvisioningState = "Succeeded" if record is not None else "Failed"
        error = None if record is not None else "the server process is not running; call ensure_running()"
        if (self._dir(config.name) / "deleting").exists():
            state = "Deleting"
        return EndpointInfo(
            name=config.name,
            scoring_uri=f"http://127.0.0.1:{config.port}/score",
            tags=config.tags,
            provisioning_state=state,
            traffic={name: config.traffic.get(name, 0) for name in config.deployments},
            port=config.port,
            pid=record.pid if record else None,
            created_at=config.created_at,
            last_used_at=self.last_used_at(config.name),
            error=error,
        )

    def _deployment_info(
        self, config: EndpointConfig, name: str, health: dict[str, Any] | None = None
    ) -> DeploymentInfo:
        wanted = config.deployments.get(name)
        if wanted is None:
            raise DeploymentNotFoundError(f"deployment {name!r} not found on endpoint {config.name!r}")
        health = health or self._health(config)
        pending: ProvisioningState = "Creating" if wanted.revision == 1 else "Updating"
        state, error = _provisioning_state(health, name, wanted, pending)
        return DeploymentInfo(
            name=name,
            endpoint_name=config.name,
            model_uri=wanted.model_uri,
            instance_count=wanted.instance_count,
            max_new_tokens_limit=wanted.max_new_tokens_limit,
            provisioning_state=state,
            error=error,
        )


def _provisioning_state(
    health: dict[str, Any] | None, name: str, wanted: DeploymentConfig, pending: ProvisioningState
) -> tuple[ProvisioningState, str | None]:
    if health is None:
        return "Failed", "the endpoint's server is not answering; call ensure_running()"
    served = health.get("deployments", {}).get(name)
    if served is None or served.get("revision") != wanted.revision:
        return pending, None  # the server has not picked this revision up yet
    if served["state"] == "Ready":
        return "Succeeded", None
    if served["state"] == "Failed":
        return "Failed", served.get("error") or "the model failed to load"
    return pending, None


def _new_keys() -> EndpointKeys:
    return EndpointKeys(
        primary=SecretStr(secrets.token_urlsafe(32)), secondary=SecretStr(secrets.token_urlsafe(32))
    )
