"""The files an endpoint shares with its scoring server (endpoint.json, keys.json, server.json), the
names Azure ML allows, and how a live server process is recognised (pid + /proc start time + boot id).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

ProvisioningState = Literal["Creating", "Updating", "Succeeded", "Failed", "Deleting"]
KeyName = Literal["primary", "secondary"]
_NAME = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


# -- the files shared with the server ---------------------------------------------------------
class DeploymentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_uri: str = Field(min_length=1)
    # Bumped whenever the deployment must be (re)loaded; /health reports the revision it serves.
    revision: int = Field(default=1, ge=1)
    instance_count: int = Field(default=1, ge=1)
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    request_timeout_ms: int = Field(default=90_000, ge=1)
    tags: dict[str, str] = Field(default_factory=dict)


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    port: int = Field(ge=1, le=65535)
    # Bumped on every write; /health reports the generation the server has applied.
    generation: int = 0
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    deployments: dict[str, DeploymentConfig] = Field(default_factory=dict)
    traffic: dict[str, int] = Field(default_factory=dict)


class EndpointKeys(BaseModel):
    """An endpoint's keys. ``SecretStr`` keeps them out of repr, str and logs; a damaged keys.json's
    validation error leaves its input out too (it would quote the keys)."""

    model_config = ConfigDict(hide_input_in_errors=True)
    primary: SecretStr
    secondary: SecretStr


class DamagedKeysError(ValueError):
    """keys.json cannot be read as an endpoint's keys. The message names the file and what is wrong
    with it, never its content."""


class ServerRecord(BaseModel):
    pid: int
    port: int
    started_at: datetime
    # With the boot id, the process start time tells a live server from a reused pid.
    start_ticks: int
    boot_id: str


def write_json_atomic(path: Path, data: Any, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=2)
    os.chmod(tmp, mode)  # the umask may have narrowed or (for 0600) the file may pre-exist
    os.replace(tmp, path)


def read_endpoint_config(endpoint_dir: Path) -> EndpointConfig:
    return EndpointConfig.model_validate_json((endpoint_dir / "endpoint.json").read_bytes())


def read_keys(endpoint_dir: Path) -> EndpointKeys:
    path = endpoint_dir / "keys.json"
    try:
        return EndpointKeys.model_validate_json(path.read_bytes())
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc'])) or 'the file'}: {problem['msg']}"
            for problem in error.errors(include_input=False)
        )
        raise DamagedKeysError(
            f"{path} is damaged ({problems}); its keys cannot be read: delete the endpoint, and the next "
            "run creates it again with new keys"
        ) from None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return fields[0], int(fields[19])


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def process_identity(pid: int) -> dict[str, Any]:
    stat = _proc_stat(pid)
    if stat is None:
        raise ProcessLookupError(f"no process {pid}")
    return {"start_ticks": stat[1], "boot_id": _boot_id()}


def validate_resource_name(kind: str, name: str) -> str:
    if not (3 <= len(name) <= 32 and _NAME.match(name)):
        raise InvalidEndpointRequest(
            f"{kind} name {name!r} is invalid: use 3-32 characters, start with a letter, then letters, "
            "digits or hyphens, and do not end with a hyphen (Azure ML's rule)"
        )
    return name


class InvalidEndpointRequest(ValueError):
    """A name, traffic split or key name that Azure ML would reject too."""


class EndpointNotFoundError(LookupError):
    pass


class DeploymentNotFoundError(LookupError):
    pass


class EndpointServerError(RuntimeError):
    """The endpoint's server process did not start or did not apply a change."""
