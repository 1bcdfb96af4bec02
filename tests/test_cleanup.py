"""The endpoint cleanup: only this app's endpoints, expired or idle ones, deployments before endpoints,
dry run only reports — on the local backend (real loopback servers) and the Azure backend (the fake)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

import pipeline.cleanup
from activities.steps import MANAGED_BY
from backends.local.backend import LocalBackend
from backends.protocol import BackendError, NotFoundError
from pipeline.cleanup import (
    CleanupDecision,
    delete_endpoint_and_deployments,
    delete_unused_models,
    run_cleanup,
)
from settings import AppSettings
from tests.fake_arm import seed
from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.hosting import RESOURCE_GROUP, WORKSPACE, AzureHost
from tests.support.polling import bind_when_free, wait_for
from tests.test_scoring_server import log_test_models

NOW = datetime.now(UTC).replace(microsecond=0)

pytest_plugins = ["tests.fake_arm.fixtures"]


def tags(expires: datetime | None = None, managed: bool = True) -> dict[str, str]:
    out = {"run-id": "r1"}
    if managed:
        out["managed-by"] = MANAGED_BY
    if expires:
        out["expires-at"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def expired_endpoint(fake_azure: FakeAzure, ws: str, **deployments) -> str:
    """``phi3ft-old``: made by us a day ago, expired an hour ago; ``deployments``/``models`` as ``seed``'s."""
    return seed.online_endpoint(
        fake_azure,
        ws,
        "phi3ft-old",
        tags=tags(expires=NOW - timedelta(hours=1)),
        created_at=NOW - timedelta(days=1),
        **deployments,
    )


@pytest.fixture
def local(tmp_path: Path):
    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(tmp_path / "phi3")))
    yield backend
    backend.endpoints.stop_all()


def local_endpoints(backend: LocalBackend) -> set[str]:
    return {e.name for e in backend.list_endpoints()}


def test_local_cleanup_deletes_expired_and_idle_endpoints_it_made_and_never_others(local: LocalBackend):
    later = NOW + timedelta(hours=3)  # the cleanup runs three hours after the endpoints were made
    local.endpoints.create_or_update_endpoint("ep-expired", tags=tags(expires=NOW + timedelta(hours=1)))
    local.endpoints.create_or_update_endpoint("ep-never-used", tags=tags(expires=NOW + timedelta(days=1)))
    local.endpoints.create_or_update_endpoint("ep-in-use", tags=tags(expires=NOW + timedelta(days=1)))
    local.endpoints.create_or_update_endpoint(
        "ep-not-ours", tags=tags(expires=NOW - timedelta(days=1), managed=False)
    )
    marker = Path(local.root) / "endpoints" / "ep-in-use" / "last_used"
    marker.touch()
    used = (later - timedelta(minutes=5)).timestamp()
    os.utime(marker, (used, used))  # the scoring server answered 5 minutes before the cleanup

    summary = run_cleanup(local, dry_run=False, idle_minutes=120, now=later)

    assert sorted(summary.deleted) == ["ep-expired", "ep-never-used"]
    assert local_endpoints(local) == {"ep-in-use", "ep-not-ours"}
    reasons = {d.endpoint: d.reason for d in summary.decisions}
    assert reasons["ep-expired"].startswith("expired at")
    assert reasons["ep-never-used"].startswith("idle: created (never used)")
    assert "last used" in reasons["ep-in-use"]
    assert "ep-not-ours" not in reasons and summary.seen == 4 and summary.managed == 3


def test_an_endpoint_another_pass_deleted_meanwhile_is_already_gone_not_a_crash(local: LocalBackend):
    # Two passes (the timer and POST /api/cleanup) listed the same endpoint; the other one deleted it
    # first. Moving its traffic off must say NotFound, as Azure does, so this pass moves on.
    local.endpoints.create_or_update_endpoint("ep-raced", tags=tags(expires=NOW - timedelta(minutes=1)))
    listed = next(ep for ep in local.list_endpoints() if ep.name == "ep-raced")
    local.delete_endpoint("ep-raced")

    with pytest.raises(NotFoundError):
        delete_endpoint_and_deployments(local, listed.model_copy(update={"traffic": {"blue": 100}}), ["blue"])


def test_a_pass_whose_time_is_spent_defers_the_rest_to_the_next(local: LocalBackend, monkeypatch):
    for name in ("ep-one", "ep-two", "ep-three"):
        local.endpoints.create_or_update_endpoint(name, tags=tags(expires=NOW - timedelta(minutes=1)))
    ticks = itertools.count()  # the clock moves one second each time the pass looks at it
    monkeypatch.setattr(pipeline.cleanup, "monotonic", lambda: next(ticks))

    first = run_cleanup(local, dry_run=False, idle_minutes=120, budget_s=2)

    assert sorted((d.action, d.endpoint) for d in first.decisions) == [
        ("deferred", "ep-three"),
        ("deferred", "ep-two"),
        ("delete", "ep-one"),
    ]
    assert "the next pass looks at it" in first.decisions[-1].reason
    assert local_endpoints(local) == {"ep-two", "ep-three"}
    second = run_cleanup(local, dry_run=False, idle_minutes=120)
    assert sorted(second.deleted) == ["ep-three", "ep-two"] and local_endpoints(local) == set()


def test_local_dry_run_reports_what_it_would_delete_and_deletes_nothing(local: LocalBackend):
    local.endpoints.create_or_update_endpoint("ep-expired", tags=tags(expires=NOW - timedelta(minutes=1)))

    summary = run_cleanup(local, dry_run=True, idle_minutes=120)

    assert [(d.endpoint, d.action) for d in summary.decisions] == [("ep-expired", "would-delete")]
    assert summary.deleted == [] and local_endpoints(local) == {"ep-expired"}


@pytest.fixture
def local_with_model(tmp_path: Path):
    """A local backend whose own MLflow registry holds the test model ``echo``, and its URI."""
    store = log_test_models(tmp_path / "phi3", ("echo",))
    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(tmp_path / "phi3")))
    yield backend, store.uris["echo"]
    backend.endpoints.stop_all()


def test_an_endpoint_whose_server_cannot_start_again_is_still_deleted(local_with_model):
    # After a reboot another program holds its port, so ensure_running left it Failed; deleting it must
    # not need its server back (Azure deletes a failed endpoint too).
    local, model_uri = local_with_model
    name = "ep-port-taken"
    before = local.endpoints.create_or_update_endpoint(name, tags=tags(expires=NOW - timedelta(minutes=1)))
    local.endpoints.create_or_update_deployment(name, "blue", model_uri=model_uri)
    wait_for(
        lambda: local.get_deployment(name, "blue").provisioning_state == "Succeeded",
        timeout=60,
        what="deployment blue to load",
    )
    local.set_traffic(name, {"blue": 100})
    os.kill(before.pid, signal.SIGKILL)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The port frees once the killed server's last thread (its model loader) is gone.
        bind_when_free(squatter, before.port)
        squatter.listen()
        assert local.get_endpoint(name).provisioning_state == "Failed"

        summary = run_cleanup(local, dry_run=False, idle_minutes=120)

    assert [(d.endpoint, d.action, d.error) for d in summary.decisions] == [(name, "delete", None)]
    assert summary.decisions[0].deployments == ["blue"]
    assert local_endpoints(local) == set() and not (local.root / "endpoints" / name).exists()


def test_azure_cleanup_moves_traffic_off_and_deletes_deployments_before_the_endpoint(
    fake_azure: FakeAzure, azure_backend
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    ep = expired_endpoint(fake_azure, ws, deployments={"blue": 100, "base": 0})
    seed.online_endpoint(
        fake_azure,
        ws,
        "someone-elses",
        tags=tags(expires=NOW - timedelta(days=9), managed=False),
        created_at=NOW - timedelta(days=9),
        deployments={"green": 100},
    )
    before = len(fake_azure.server.exchanges)

    summary = run_cleanup(azure_backend, dry_run=False, idle_minutes=120)

    assert summary.deleted == ["phi3ft-old"] and sorted(summary.decisions[0].deployments) == ["base", "blue"]
    writes = [e for e in fake_azure.server.exchanges[before:] if e.method in ("PUT", "DELETE")]
    assert [(e.method, e.route) for e in writes] == [
        ("PUT", "online-endpoint"),
        ("DELETE", "online-deployment"),
        ("DELETE", "online-deployment"),
        ("DELETE", "online-endpoint"),
    ]
    assert not any(writes[0].request_body["properties"]["traffic"].values())  # azure-ai-ml sends 0 % as {}
    assert {e.path.rsplit("/", 1)[-1] for e in writes[1:3]} == {"base", "blue"}
    assert fake_azure.store.find(ep) is None
    assert [
        e["name"]
        for e in fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces/onlineEndpoints")
    ] == ["someone-elses"]
    # Only this app's endpoints are asked about their use (Azure Monitor is not queried for others).
    assert {
        e.path.split("/onlineEndpoints/")[1].split("/")[0]
        for e in fake_azure.server.exchanges
        if e.route == "metrics"
    } <= {"phi3ft-old"}


def test_azure_idle_is_measured_from_request_metrics_and_then_from_creation(
    fake_azure: FakeAzure, azure_backend
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    far = NOW + timedelta(days=1)
    busy = seed.online_endpoint(
        fake_azure, ws, "phi3ft-busy", tags=tags(expires=far), created_at=NOW - timedelta(hours=5)
    )
    seed.requests_at(fake_azure, busy, NOW - timedelta(minutes=30))
    quiet = seed.online_endpoint(
        fake_azure, ws, "phi3ft-quiet", tags=tags(expires=far), created_at=NOW - timedelta(hours=5)
    )
    seed.requests_at(fake_azure, quiet, NOW - timedelta(hours=4))  # before the 2-hour window
    seed.online_endpoint(
        fake_azure, ws, "phi3ft-new", tags=tags(expires=far), created_at=NOW - timedelta(minutes=10)
    )

    summary = run_cleanup(azure_backend, dry_run=True, idle_minutes=120)

    actions = {d.endpoint: d.action for d in summary.decisions}
    assert actions == {"phi3ft-busy": "keep", "phi3ft-quiet": "would-delete", "phi3ft-new": "keep"}
    assert len(fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces/onlineEndpoints")) == 3


def test_the_timer_runs_on_the_configured_schedule_and_the_manual_trigger_returns_the_summary(
    fake_azure: FakeAzure, tmp_path: Path
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    expired_endpoint(fake_azure, ws, deployments={"blue": 100})
    host = AzureHost(fake_azure, tmp_path)
    host.env["CLEANUP_SCHEDULE"] = "0 */5 * * * *"
    host.start()
    try:
        listed = requests.get(f"{host.url}/admin/functions", timeout=30).json()
        timer = next(f for f in listed if f["name"] == "cleanup_endpoints")
        assert "0 */5 * * * *" in str(timer)
        dry = requests.post(f"{host.url}/api/cleanup", params={"dry_run": "true"}, timeout=120).json()
        assert [(d["endpoint"], d["action"]) for d in dry["decisions"]] == [("phi3ft-old", "would-delete")]
        real = requests.post(f"{host.url}/api/cleanup", timeout=120).json()
        assert [(d["endpoint"], d["action"], d["deployments"]) for d in real["decisions"]] == [
            ("phi3ft-old", "delete", ["blue"])
        ]
    finally:
        host.stop()
    assert fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces/onlineEndpoints") == []
    assert "cleanup deleted endpoint=phi3ft-old" in host.log_text()


def test_a_dry_run_flag_that_is_neither_true_nor_false_is_refused_and_deletes_nothing(
    fake_azure: FakeAzure, tmp_path: Path
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    expired_endpoint(fake_azure, ws, deployments={"blue": 100})
    host = AzureHost(fake_azure, tmp_path)
    host.start()
    try:
        r = requests.post(f"{host.url}/api/cleanup", params={"dry_run": "1"}, timeout=120)
    finally:
        host.stop()
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "dry_run must be true or false, not '1'; leave it out for CLEANUP_DRY_RUN"}
    assert len(fake_azure.store.by_type("Microsoft.MachineLearningServices/workspaces/onlineEndpoints")) == 1


def test_azure_cleanup_deletes_the_fine_tuned_model_nothing_serves_any_more(
    fake_azure: FakeAzure, azure_backend
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    ours = {"managed-by": MANAGED_BY, "run_id": "r1"}
    tuned = seed.model_version(fake_azure, ws, "phi3-ft-aaa", "1", ours)
    shared = seed.model_version(fake_azure, ws, "phi3-ft-shared", "1", ours)
    foreign = seed.model_version(fake_azure, ws, "their-model", "3", {"team": "search"})
    catalog = "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/14"
    expired_endpoint(
        fake_azure,
        ws,
        deployments={"blue": 100, "green": 0, "base": 0, "red": 0},
        models={"blue": tuned, "green": shared, "base": catalog, "red": foreign},
    )
    seed.online_endpoint(  # not expired, and not ours: it still serves the shared version
        fake_azure,
        ws,
        "someone-elses",
        tags=tags(managed=False),
        created_at=NOW - timedelta(days=1),
        deployments={"green": 100},
        models={"green": shared},
    )

    summary = run_cleanup(azure_backend, dry_run=False, idle_minutes=120, delete_models=True)

    decision = next(d for d in summary.decisions if d.endpoint == "phi3ft-old")
    assert decision.action == "delete" and decision.models_deleted == ["phi3-ft-aaa:1"]
    assert decision.models_kept == ["phi3-ft-shared:1 (another deployment serves it)"]
    assert fake_azure.store.find(tuned) is None
    assert fake_azure.store.find(shared) and fake_azure.store.find(foreign)  # never someone else's
    deletes = [
        e.path for e in fake_azure.server.exchanges if e.method == "DELETE" and e.route == "model-version"
    ]
    assert [p.rsplit("/models/", 1)[1] for p in deletes] == ["phi3-ft-aaa/versions/1"]  # catalog untouched


def test_models_are_kept_unless_asked_and_azure_refuses_deleting_one_in_use(
    fake_azure: FakeAzure, azure_backend
):
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    tuned = seed.model_version(fake_azure, ws, "phi3-ft-aaa", "1", {"managed-by": MANAGED_BY})
    expired_endpoint(fake_azure, ws, deployments={"blue": 100}, models={"blue": tuned})
    with pytest.raises(BackendError, match="delete its deployments first"):
        azure_backend.delete_model_version("phi3-ft-aaa", "1")  # the fake refuses, as Azure does

    summary = run_cleanup(azure_backend, dry_run=False, idle_minutes=120)  # CLEANUP_DELETE_MODELS off

    assert summary.deleted == ["phi3ft-old"] and summary.decisions[0].models_deleted == []
    assert fake_azure.store.find(tuned) is not None
    azure_backend.delete_model_version("phi3-ft-aaa", "1")
    azure_backend.delete_model_version("phi3-ft-aaa", "1")  # idempotent: already gone is fine
    assert fake_azure.store.find(tuned) is None


def test_local_registry_knows_its_own_versions_and_deletes_them(local: LocalBackend, tmp_path: Path):
    import mlflow

    registry = local.registry
    client = registry.client()
    client.create_registered_model("phi3-ft-aaa", tags={"managed-by": "phi3-finetune"})
    client.create_model_version("phi3-ft-aaa", (tmp_path / "m").as_uri(), tags={"job_name": "j"})
    client.create_registered_model("their-model")
    client.create_model_version("their-model", (tmp_path / "t").as_uri())
    assert mlflow.__version__  # the real MLflow registry on SQLite

    assert local.managed_model("models:/phi3-ft-aaa/1").name == "phi3-ft-aaa"
    assert local.managed_model("models:/their-model/1") is None
    assert local.managed_model("models:/phi3-ft-aaa/9") is None
    assert local.managed_model("azureml://registries/azureml/models/x/versions/1") is None

    local.delete_model_version("phi3-ft-aaa", "1")
    local.delete_model_version("phi3-ft-aaa", "1")
    assert [m.name for m in client.search_registered_models()] == ["their-model"]


def test_a_model_version_the_registry_fails_to_delete_is_kept_and_said_not_deleted(
    local: LocalBackend, tmp_path: Path
):
    client = local.registry.client()
    client.create_registered_model("phi3-ft-ccc", tags={"managed-by": "phi3-finetune"})
    client.create_model_version("phi3-ft-ccc", (tmp_path / "m").as_uri(), tags={"job_name": "j"})
    # The registry's SQLite file refuses the write, as on a full disk.
    with sqlite3.connect(local.root / "mlflow.db") as db:
        db.execute(
            "CREATE TRIGGER disk_full BEFORE UPDATE ON model_versions "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    decision = CleanupDecision(endpoint="ep-x", kind="online", action="delete", reason="expired")

    delete_unused_models(local, ["models:/phi3-ft-ccc/1"], decision)

    assert decision.models_deleted == []
    assert decision.models_kept[0].startswith("phi3-ft-ccc:1 (model phi3-ft-ccc:1 could not be deleted")
    assert decision.models_kept[0].endswith("database or disk is full)")
    assert [str(v.version) for v in client.search_model_versions("name='phi3-ft-ccc'")] == ["1"]


def test_registering_a_jobs_model_again_reuses_its_version(local: LocalBackend, tmp_path: Path):
    registry = local.registry
    assert registry.version_for_job("phi3-ft-bbb", "j") is None  # never registered: no versions, no error
    uri = (tmp_path / "m").as_uri()

    first = registry.register("phi3-ft-bbb", uri, job_name="j", mlflow_run_id=None, tags={})
    again = registry.register("phi3-ft-bbb", uri, job_name="j", mlflow_run_id=None, tags={})

    assert first == again and first.version == "1"
    assert [str(v.version) for v in registry.client().search_model_versions("name='phi3-ft-bbb'")] == ["1"]


@pytest.mark.parametrize("minutes", ["0", "-5"])
def test_an_idle_time_under_a_minute_is_refused_naming_the_setting(minutes):
    # With 0 or less every managed endpoint would be idle, even one a run deployed a moment ago.
    with pytest.raises(ValidationError, match="ENDPOINT_IDLE_MINUTES"):
        AppSettings(ENDPOINT_IDLE_MINUTES=minutes)
