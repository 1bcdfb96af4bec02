"""Registering a base checkpoint in the local MLflow registry: the weights are written once (Phi-3-mini's
are 7.6 GB), a job gets one version however often the step runs or is killed, and that version serves."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.local.backend import LocalBackend
from backends.local.base_models import build_tiny_phi3
from backends.local.jobs import SPEC_FILE, TrainingSpec
from backends.local.registry import LocalRegistry
from backends.protocol import DeploymentState, RegisteredModel
from backends.scoring import chat_sync
from pipeline.config import RunConfig
from settings import AppSettings
from tests.support.polling import wait_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAND_IN_WEIGHTS = "stand-in-weights.bin"
STAND_IN_BYTES = 48 << 20
JOB, MODEL = "phi3-ft-run1-job", "phi3-ft-run1-base"

# A step killed halfway through copying the weights (a host timeout, a crash): the first copy of the big
# file stops after half of it and the process dies at once, with no chance to clean up.
KILLED_MID_COPY = f"""
import os, shutil, signal, sys
from pathlib import Path
from backends.local.registry import LocalRegistry

def copy2_killed_halfway(src, dst, *args, **kwargs):
    if Path(src).name == {STAND_IN_WEIGHTS!r}:
        with open(src, "rb") as source, open(dst, "wb") as target:
            target.write(source.read(os.path.getsize(src) // 2))
        os.kill(os.getpid(), signal.SIGKILL)
    return real_copy2(src, dst, *args, **kwargs)

real_copy2, shutil.copy2 = shutil.copy2, copy2_killed_halfway
tracking_uri, artifacts_dir, checkpoint = sys.argv[1:]
LocalRegistry(tracking_uri, Path(artifacts_dir)).register_directory(Path(checkpoint), {MODEL!r}, {JOB!r})
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Phi-3 plus a large file standing in for real weights (from_pretrained ignores it)."""
    corpus = PROJECT_ROOT / "sample_data" / "support_chats.jsonl"
    out = build_tiny_phi3(tmp_path_factory.mktemp("base") / "checkpoint", corpus_files=[corpus])
    block = os.urandom(1 << 20)
    with open(out / STAND_IN_WEIGHTS, "wb") as weights:
        for _ in range(STAND_IN_BYTES >> 20):
            weights.write(block)
    return out


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalBackend]:
    import mlflow

    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(tmp_path / "phi3")))
    mlflow.set_registry_uri(backend.registry.tracking_uri)  # models:/ URIs loaded here resolve in it
    yield backend
    backend.endpoints.stop_all()


def bytes_written() -> int:
    """Bytes this process has passed to write-like system calls so far (file copies included)."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("counting written bytes needs Linux's /proc/self/io")
    fields = dict(line.split(": ") for line in io.read_text().splitlines())
    return int(fields["wchar"])


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in root.rglob("*")
        if path.is_file()
    }


def versions(registry: LocalRegistry) -> list[str]:
    return sorted(str(v.version) for v in registry.client().search_model_versions(f"name='{MODEL}'"))


def registered_model_dir(registry: LocalRegistry, model: RegisteredModel) -> tuple[str, Path]:
    """The status of the MLflow logged model behind a version, and the checkpoint copy inside it."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    client = registry.client()
    source = client.get_model_version(model.name, model.version).source
    logged = client.get_logged_model(source.removeprefix("models:/"))
    return str(logged.status), Path(local_file_uri_to_path(logged.artifact_location)) / "artifacts"


def test_registering_a_checkpoint_writes_its_weights_once(local: LocalBackend, checkpoint: Path):
    size = tree_bytes(checkpoint)
    before = bytes_written()

    local.registry.register_directory(checkpoint, MODEL, JOB)

    written = bytes_written() - before
    # One copy of the checkpoint plus the model's own small files (MLmodel, environment, code, SQLite).
    assert size <= written < size + STAND_IN_BYTES // 2


def test_registering_a_jobs_checkpoint_again_copies_nothing_and_reuses_its_version(
    local: LocalBackend, checkpoint: Path
):
    first = local.registry.register_directory(checkpoint, MODEL, JOB)
    before = bytes_written()

    again = local.registry.register_directory(checkpoint, MODEL, JOB)

    assert again == first
    assert bytes_written() - before < STAND_IN_BYTES // 2
    assert versions(local.registry) == ["1"]


def test_a_retry_after_a_kill_mid_copy_registers_one_complete_version(
    local: LocalBackend, checkpoint: Path, tmp_path: Path
):
    registry = local.registry
    child_tmp = tmp_path / "child-tmp"  # where MLflow stages the copy, so the killed one's half lands here
    child_tmp.mkdir()
    arguments = [registry.tracking_uri, str(registry.artifacts_dir), str(checkpoint)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_COPY, *arguments],
        cwd=PROJECT_ROOT,
        env={**os.environ, "TMPDIR": str(child_tmp)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died mid-copy, not before or after
    assert versions(registry) == []

    model = registry.register_directory(checkpoint, MODEL, JOB)

    assert versions(registry) == ["1"]
    status, model_dir = registered_model_dir(registry, model)
    assert status == "READY"
    assert digests(model_dir / checkpoint.name) == digests(checkpoint)  # complete, not the killed half
    assert len(list(registry.artifacts_dir.rglob(STAND_IN_WEIGHTS))) == 1  # the store holds one copy


def test_the_registered_base_model_serves_through_the_base_deployment(local: LocalBackend, checkpoint: Path):
    import mlflow

    spec = TrainingSpec(
        job_name=JOB,
        base_model=str(checkpoint),
        models_dir=local.settings.models_dir,
        train_file=PROJECT_ROOT / "sample_data" / "support_chats.jsonl",
        mlflow_tracking_uri=local.registry.tracking_uri,
    )
    job_dir = local.root / "jobs" / JOB
    job_dir.mkdir(parents=True)
    (job_dir / SPEC_FILE).write_text(spec.model_dump_json())
    cfg = RunConfig()
    endpoint = local.ensure_endpoint("ep-base-model", {"managed-by": "tests"}, cfg)

    local.ensure_base_deployment(endpoint.name, "base", JOB, "phi3-ft-run1", cfg)

    def settled() -> DeploymentState | None:
        state = local.get_deployment(endpoint.name, "base")
        return state if state.provisioning_state in ("Succeeded", "Failed") else None

    deployment = wait_for(settled, timeout=120, what="the base deployment to settle")
    assert deployment.provisioning_state == "Succeeded", deployment.error
    assert deployment.model == f"models:/{MODEL}/1"
    key = local.get_endpoint_keys(endpoint.name).primary.get_secret_value()
    messages = [{"role": "user", "content": "How long do I have to return my Aero purifier?"}]
    params = {"temperature": 0.0, "max_new_tokens": 6, "min_new_tokens": 6}
    answer = chat_sync(endpoint.scoring_uri or "", key, messages, deployment="base", **params)
    assert answer == mlflow.pyfunc.load_model(deployment.model).predict(messages, params=params)[0]
