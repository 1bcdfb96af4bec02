"""What a failed run's cleanup (``cleanup_on_failure``) is given and how it treats what is not there.

The orchestrator's loop over deletions still under way is proven against the fake Azure in
tests/test_azure_resilience.py; the local end-to-end cleanup in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from activities.integrate import promptflow_connection
from activities.steps import StepInput, cleanup_run
from backends.local.backend import LocalBackend
from backends.protocol import NotFoundError, ResourceRef
from orchestrators.finetune import cleanup_refs
from pipeline.config import RunConfig
from settings import AppSettings
from tests.fake_arm import seed
from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.hosting import RESOURCE_GROUP, WORKSPACE
from tests.test_flow_runner import shared_promptflow_state

pytest_plugins = ["tests.fake_arm.fixtures"]

NAMES = {"job": "phi3ft-r-1a2b3c", "endpoint": "phi3ft-1a2b3c", "connection": "phi3-endpoint"}


def test_a_failed_create_step_adds_what_it_may_have_made_under_the_runs_name():
    data = ResourceRef(kind="data", name="phi3ft-train-1a2b3c", version="1")

    assert cleanup_refs([data], "endpoint", NAMES) == [
        data.model_dump(),
        ResourceRef(kind="endpoint", name="phi3ft-1a2b3c").model_dump(),
    ]
    assert cleanup_refs([data], "submit_finetune", NAMES)[-1] == {
        "kind": "job",
        "name": "phi3ft-r-1a2b3c",
        "version": None,
        "parent": None,
        "previous": None,
    }


def test_other_failed_steps_add_nothing_and_nothing_is_listed_twice():
    endpoint = ResourceRef(kind="endpoint", name="phi3ft-1a2b3c")

    assert cleanup_refs([endpoint], "flow_smoke", NAMES) == [endpoint.model_dump()]
    assert cleanup_refs([endpoint], "endpoint", NAMES) == [endpoint.model_dump()]
    # the shared connection is never added on a guess: another run may be using it
    assert cleanup_refs([], "promptflow_connection", NAMES) == []


def test_cleanup_skips_what_was_never_made(tmp_path):
    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(tmp_path)), restart_endpoints=False)
    refs = [{"kind": "job", "name": "phi3ft-never"}, {"kind": "endpoint", "name": "phi3ft-never"}]

    assert cleanup_run({"created": refs}, backend) == {"actions": [], "pending": [], "failed": []}


# The shared Prompt flow connection ----------------------------------------------------------------
# Every run names its connection alike (promptflow.connection_name), so a failed run's cleanup must
# give an earlier run's connection back instead of deleting it.
CONNECTION = "phi3-shared-conn"


def served_by(backend, name: str, project: str | None = None) -> str | None:
    target = backend.promptflow_connection_target(name, project)
    return next((ep.name for ep in backend.list_endpoints() if ep.scoring_uri == target), target)


def fail_and_clean(backend, endpoint: str, connection_refs: list[ResourceRef], failed=()) -> list[str]:
    """A failed run that made ``endpoint`` and the connections, cleaned up as the orchestrator does."""
    created = [ResourceRef(kind="endpoint", name=endpoint), *connection_refs]
    payload = {"created": [r.model_dump() for r in created], "names": {"endpoint": endpoint}}
    result = cleanup_run(payload, backend)
    assert result["pending"] == [] and len(result["failed"]) == len(failed)
    assert all(fragment in problem for fragment, problem in zip(failed, result["failed"], strict=True))
    return result["actions"]


@pytest.fixture
def local(tmp_path_factory: pytest.TempPathFactory):
    """A local backend on the session's promptflow home (promptflow reads its home once per process)."""
    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(shared_promptflow_state(tmp_path_factory))))
    made = []

    def endpoint(name: str) -> str:
        backend.ensure_endpoint(name, {"run-id": name}, RunConfig())
        made.append(name)
        return name

    backend.make_endpoint = endpoint
    yield backend
    backend.delete_promptflow_connection(CONNECTION)
    for name in made:
        with contextlib.suppress(NotFoundError):
            backend.delete_endpoint(name)
    backend.endpoints.stop_all()


def test_a_failed_run_points_the_connection_back_to_the_endpoint_it_served_before(local):
    first, second = local.make_endpoint("phi3ft-conn-first"), local.make_endpoint("phi3ft-conn-second")
    made = local.ensure_promptflow_connection(CONNECTION, first).created
    assert [r.previous for r in made] == [None]  # nothing there before: this run made it
    step = StepInput(run_id="r2", config=RunConfig(), names={"connection": CONNECTION, "endpoint": second})
    result = promptflow_connection(step, local)  # the second run's step
    (taken,) = result.created
    assert taken.previous == first
    assert result.summary.endswith(f"-> endpoint {second} (it served endpoint {first} before)")

    actions = fail_and_clean(local, second, [taken])

    assert actions == [
        f"pointed connection {CONNECTION} back to endpoint {first}",
        f"deleted endpoint {second}",
    ]
    assert served_by(local, CONNECTION) == first
    assert stored_key(local, CONNECTION) == local.get_endpoint_keys(first).primary.get_secret_value()
    # Cleaning up again (a retried activity) changes nothing.
    assert fail_and_clean(local, second, [taken]) == [
        f"left connection {CONNECTION}: it serves endpoint {first}"
    ]


def test_a_retried_connection_step_still_knows_the_endpoint_the_connection_served_before(local):
    first, second = local.make_endpoint("phi3ft-conn-first"), local.make_endpoint("phi3ft-conn-second")
    local.ensure_promptflow_connection(CONNECTION, first)
    step = StepInput(run_id="r2", config=RunConfig(), names={"connection": CONNECTION, "endpoint": second})
    promptflow_connection(step, local)  # the second run's step re-pointed it; its answer was lost
    (taken,) = promptflow_connection(step, local).created  # the retry finds it pointing at `second`

    assert taken.previous == first
    assert (
        fail_and_clean(local, second, [taken])[0]
        == f"pointed connection {CONNECTION} back to endpoint {first}"
    )
    assert served_by(local, CONNECTION) == first


def test_a_connection_the_failed_run_made_is_deleted_and_one_a_later_run_took_over_is_left(local):
    first, second = local.make_endpoint("phi3ft-conn-first"), local.make_endpoint("phi3ft-conn-second")
    (made,) = local.ensure_promptflow_connection(CONNECTION, first).created
    local.ensure_promptflow_connection(CONNECTION, second)  # a later run took the connection over

    assert fail_and_clean(local, first, [made]) == [
        f"left connection {CONNECTION}: it serves endpoint {second}",
        f"deleted endpoint {first}",
    ]
    assert served_by(local, CONNECTION) == second

    assert fail_and_clean(local, second, [made]) == [
        f"deleted connection {CONNECTION}",
        f"deleted endpoint {second}",
    ]
    assert local.promptflow_connection_target(CONNECTION) is None


def test_the_endpoint_served_before_being_gone_too_the_connection_is_deleted(local):
    first, second = local.make_endpoint("phi3ft-conn-first"), local.make_endpoint("phi3ft-conn-second")
    local.ensure_promptflow_connection(CONNECTION, first)
    (taken,) = local.ensure_promptflow_connection(CONNECTION, second).created
    local.delete_endpoint(first)  # the idle-endpoint timer took the earlier run's endpoint meanwhile

    assert fail_and_clean(local, second, [taken])[0] == f"deleted connection {CONNECTION}"
    assert local.promptflow_connection_target(CONNECTION) is None


def test_a_connection_that_cannot_be_pointed_back_does_not_keep_the_endpoint_from_going(local):
    first, second = local.make_endpoint("phi3ft-conn-first"), local.make_endpoint("phi3ft-conn-second")
    local.ensure_promptflow_connection(CONNECTION, first)
    (taken,) = local.ensure_promptflow_connection(CONNECTION, second).created
    keys = Path(local.root) / "endpoints" / first / "keys.json"
    keys.write_text("{damaged")  # the earlier endpoint's key cannot be read to point the connection back

    actions = fail_and_clean(local, second, [taken], failed=[f"{first}/keys.json is damaged"])

    assert actions == [f"deleted endpoint {second}"]
    assert second not in {ep.name for ep in local.list_endpoints()}


def stored_key(backend: LocalBackend, name: str) -> str:
    from promptflow.client import PFClient

    return PFClient().connections.get(name, with_secrets=True).secrets["key"]


def two_runs_endpoints(fake_azure: FakeAzure) -> tuple[str, str]:
    """The workspace (its id) with two runs' endpoints, and a Foundry project's name beside it."""
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    project = f"{WORKSPACE}-project"
    seed.workspace(fake_azure, RESOURCE_GROUP, project)
    for name in ("phi3ft-first", "phi3ft-second"):
        seed.online_endpoint(
            fake_azure, ws, name, tags={}, created_at=datetime.now(UTC), deployments={"blue": 100}
        )
    return ws, project


def test_on_azure_the_workspace_and_project_connections_go_back_to_the_earlier_endpoint(
    azure_backend, fake_azure: FakeAzure
):
    ws, project = two_runs_endpoints(fake_azure)
    for where in (None, project):  # the earlier run: its step, then publish_flow's copy in the project
        assert azure_backend.ensure_promptflow_connection(
            CONNECTION, "phi3ft-first", project=where
        ).created == [ResourceRef(kind="connection", name=CONNECTION, parent=where)]
    refs = [
        ref
        for where in (None, project)
        for ref in azure_backend.ensure_promptflow_connection(
            CONNECTION, "phi3ft-second", project=where
        ).created
    ]
    assert [(r.parent, r.previous) for r in refs] == [(None, "phi3ft-first"), (project, "phi3ft-first")]

    actions = fail_and_clean(azure_backend, "phi3ft-second", refs)

    assert actions == [
        f"pointed connection {CONNECTION} back to endpoint phi3ft-first",
        f"pointed connection {CONNECTION} in project {project} back to endpoint phi3ft-first",
        "deleted endpoint phi3ft-second",
    ]
    first_key = azure_backend.get_endpoint_keys("phi3ft-first").primary.get_secret_value()
    for where in (ws, f"{ws.rsplit('/', 1)[0]}/{project}"):
        rid = f"{where}/connections/{CONNECTION}".lower()
        assert fake_azure.connection_secrets[rid] == {"key": first_key}
    assert (
        served_by(azure_backend, CONNECTION)
        == served_by(azure_backend, CONNECTION, project)
        == "phi3ft-first"
    )


def test_on_azure_a_retried_connection_step_still_points_both_connections_back(
    azure_backend, fake_azure: FakeAzure
):
    _, project = two_runs_endpoints(fake_azure)
    for where in (None, project):
        azure_backend.ensure_promptflow_connection(CONNECTION, "phi3ft-first", project=where)
    refs = []
    for where in (None, project):
        # The second run's try re-pointed the connection and died before it could answer; the retry:
        azure_backend.ensure_promptflow_connection(CONNECTION, "phi3ft-second", project=where)
        refs += azure_backend.ensure_promptflow_connection(CONNECTION, "phi3ft-second", project=where).created
    assert [(r.parent, r.previous) for r in refs] == [(None, "phi3ft-first"), (project, "phi3ft-first")]

    actions = fail_and_clean(azure_backend, "phi3ft-second", refs)

    assert actions[:2] == [
        f"pointed connection {CONNECTION} back to endpoint phi3ft-first",
        f"pointed connection {CONNECTION} in project {project} back to endpoint phi3ft-first",
    ]
    assert (
        served_by(azure_backend, CONNECTION)
        == served_by(azure_backend, CONNECTION, project)
        == "phi3ft-first"
    )
