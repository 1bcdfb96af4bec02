"""The tutorial's scenario 3 on Azure: the chat flow published to an Azure AI Foundry project.

The real azure-ai-ml and promptflow-azure clients run against the fake Azure: the hub and project
are created through ARM, the custom connection is PUT into the project, the flow's files go to the
project's ``workspaceworkingdirectory`` Azure Files share (Shared Key signed, through the fake's
CONNECT proxy) and the flow service registers the chat flow, reached at the project's discoveryUrl.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from activities.blueprint import _run
from activities.publish import publish_flow
from activities.steps import StepInput, cleanup_run
from backends.azure import publish
from backends.azure.backend import AzureBackend
from backends.factory import set_backend
from backends.protocol import BackendError, ResourceRef
from pipeline.config import RunConfig
from pipeline.steps import StepResult
from tests.fake_arm import seed
from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.flows import working_share
from tests.fake_arm.hosting import RESOURCE_GROUP, WORKSPACE

pytest_plugins = ["tests.fake_arm.fixtures"]

FLOW = Path(__file__).resolve().parents[1] / "flows" / "phi3_chat"
ENDPOINT = "phi3ft-abc123"
AML = "Microsoft.MachineLearningServices/workspaces"


@pytest.fixture
def deployed(fake_azure: FakeAzure) -> dict:
    """The run's Azure ML workspace with its endpoint serving (what the deploy steps leave)."""
    ws = seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    rid = seed.online_endpoint(
        fake_azure, ws, ENDPOINT, tags={}, created_at=datetime.now(UTC), deployments={"blue": 100}
    )
    endpoint = fake_azure.store.find(rid)
    return {
        "workspace": ws,
        "scoring_uri": endpoint["properties"]["scoringUri"],
        "key": fake_azure.endpoint_keys[rid.lower()]["primaryKey"],
    }


def writes(fake: FakeAzure, since: int = 0) -> list[str]:
    return [
        f"{e.method} {e.route}"
        for e in fake.server.exchanges[since:]
        if e.method in ("PUT", "POST", "PATCH", "DELETE") and e.status < 300 and e.route != "token"
    ]


def test_managed_compute_gets_a_hub_a_project_the_connection_and_the_chat_flow(
    azure_backend: AzureBackend, fake_azure: FakeAzure, deployed: dict
):
    result = azure_backend.publish_flow("phi3-endpoint", ENDPOINT, "phi3_chat-run1", RunConfig())

    hub, project = f"{WORKSPACE}-hub", f"{WORKSPACE}-project"
    workspaces = {w["name"]: w for w in fake_azure.store.by_type(AML)}
    assert workspaces[hub]["kind"].lower() == "hub"
    assert workspaces[project]["kind"].lower() == "project"
    assert workspaces[project]["properties"]["hubResourceId"].lower() == workspaces[hub]["id"].lower()

    # The connection the flow resolves by name, in the flow's own project, field by field.
    put = next(
        e
        for e in fake_azure.server.exchanges
        if e.method == "PUT" and e.route == "connection" and f"/workspaces/{project}/" in e.path
    )
    props = put.request_body["properties"]
    assert props["category"] == "CustomKeys" and props["authType"] == "CustomKeys"
    assert props["metadata"]["endpoint"] == deployed["scoring_uri"]
    assert props["credentials"] == {"keys": {"key": deployed["key"]}}
    assert put.path.endswith("/connections/phi3-endpoint")

    # promptflow-azure found the flow service through the project's discoveryUrl (the fake's address).
    ws_get = next(
        e
        for e in fake_azure.server.exchanges
        if e.method == "GET"
        and e.route == "workspace"
        and e.path.endswith(f"/workspaces/{project}")
        and e.status == 200
    )
    assert ws_get.response_body["properties"]["discoveryUrl"].startswith(fake_azure.url)

    # The flow service got a chat flow whose definition is in the project's working-directory share.
    create = next(e for e in fake_azure.server.exchanges if e.route == "flow-create")
    assert create.request_body["flowType"] == "chat"
    assert create.request_body["flowName"] == "phi3_chat-run1"
    assert create.request_body["tags"]["managed-by"] == "phi3-finetune-functions"
    definition = create.request_body["flowDefinitionFilePath"]
    assert definition.startswith(f"Users/{fake_azure.app.object_id}/promptflow/phi3_chat-run1-")
    share = working_share(fake_azure, workspaces[project])
    folder = definition.rsplit("/", 1)[0]
    uploaded = share.tree(folder)
    assert set(uploaded) == {"flow.dag.yaml", "integrate_with_promptflow.py", "requirements.txt"}
    assert uploaded["integrate_with_promptflow.py"] == (FLOW / "integrate_with_promptflow.py").read_bytes()
    dag = yaml.safe_load(uploaded["flow.dag.yaml"])
    assert dag == yaml.safe_load((FLOW / "flow.dag.yaml").read_text())  # the connection is already ours
    file_puts = [e for e in fake_azure.server.exchanges if e.route == "file-share" and e.method == "PUT"]
    assert file_puts and all(e.status == 201 for e in file_puts)

    published = result.details["published_flow"]
    assert published["project"] == project and published["hub"] == hub
    assert published["display_name"] == "phi3_chat-run1"
    assert published["portal_url"] and published["definition_path"] == definition
    assert "compute session" in result.summary  # chatting needs the cloud: the summary says so
    kinds = sorted((r.kind, r.name) for r in result.created)
    assert kinds == sorted(
        [
            ("workspace", hub),
            ("workspace", project),
            ("connection", "phi3-endpoint"),
            ("flow", published["flow_id"]),
        ]
    )
    assert deployed["key"] not in json.dumps(result.details) + result.summary


def test_publishing_again_reuses_the_flow_hub_and_project(
    azure_backend: AzureBackend, fake_azure: FakeAzure, deployed: dict
):
    first = azure_backend.publish_flow("phi3-endpoint", ENDPOINT, "phi3_chat-run1", RunConfig())
    before = len(fake_azure.server.exchanges)

    again = azure_backend.publish_flow("phi3-endpoint", ENDPOINT, "phi3_chat-run1", RunConfig())

    assert again.details["published_flow"]["flow_id"] == first.details["published_flow"]["flow_id"]
    assert "already in" in again.summary
    # Only the connection is written again (it carries the endpoint's current key).
    assert set(writes(fake_azure, before)) <= {
        "PUT connection",
        "POST online-endpoint-keys",
        "POST flow-index",
    }
    assert sum(len(f) for f in fake_azure.flows.values()) == 1
    # Still this run's flow (its display name names the run): listed though this try only found it.
    assert [(r.kind, r.name) for r in again.created] == [
        ("connection", "phi3-endpoint"),
        ("flow", first.details["published_flow"]["flow_id"]),
    ]


def test_an_upload_the_flow_service_refuses_still_records_the_connection_made_in_the_project(
    azure_backend: AzureBackend, fake_azure: FakeAzure, deployed: dict, tmp_path: Path
):
    flow = shutil.copytree(FLOW, tmp_path / "not_a_chat_flow")
    dag = flow / "flow.dag.yaml"
    dag.write_text(dag.read_text().replace("is_chat_input: true", "").replace("is_chat_output: true", ""))
    cfg = RunConfig.model_validate({"promptflow": {"flow": str(flow)}})
    step = StepInput(run_id="run1", config=cfg, names={"connection": "phi3-endpoint", "endpoint": ENDPOINT})
    set_backend(azure_backend)
    try:
        result = StepResult.model_validate(_run("publish_flow", publish_flow, step.model_dump(mode="json")))
    finally:
        set_backend(None)

    assert not result.ok and "is_chat_input" in (result.error or "")
    project = f"{WORKSPACE}-project"
    assert ResourceRef(kind="connection", name="phi3-endpoint", parent=project) in result.created
    # So the failed run's cleanup takes back the connection it made there for its endpoint.
    refs = [ref.model_dump() for ref in result.created]
    cleanup = cleanup_run({"created": refs, "names": {"endpoint": ENDPOINT}}, azure_backend)
    assert f"deleted connection phi3-endpoint in project {project}" in cleanup["actions"]
    assert azure_backend.promptflow_connection_target("phi3-endpoint", project) is None


def test_publish_off_skips_with_the_reason_and_calls_nothing(
    azure_backend: AzureBackend, fake_azure: FakeAzure, deployed: dict
):
    before = len(fake_azure.server.exchanges)
    cfg = RunConfig.model_validate({"promptflow": {"publish": False}})

    result = azure_backend.publish_flow("phi3-endpoint", ENDPOINT, "phi3_chat-run1", cfg)

    assert result.skipped and "promptflow.publish" in result.skipped
    assert fake_azure.server.exchanges[before:] == []


def test_a_project_name_that_is_not_a_foundry_project_is_refused_before_any_write(
    azure_backend: AzureBackend, fake_azure: FakeAzure, deployed: dict
):
    before = len(fake_azure.server.exchanges)
    cfg = RunConfig.model_validate({"promptflow": {"project": WORKSPACE}})  # the plain Azure ML workspace

    with pytest.raises(BackendError, match=r"not an Azure AI Foundry project; set promptflow\.project"):
        azure_backend.publish_flow("phi3-endpoint", ENDPOINT, "phi3_chat-run1", cfg)
    assert writes(fake_azure, before) == []


def test_a_derived_name_too_long_for_azure_names_the_setting_to_change():
    cfg = RunConfig()
    with pytest.raises(BackendError, match=r"longer than 33 characters; set promptflow\.hub"):
        publish.foundry_place("w" * 30, cfg)


def test_staging_copies_only_the_flow_and_points_it_at_the_configured_connection(tmp_path: Path):
    source = tmp_path / "flow"
    source.mkdir()
    dag = (FLOW / "flow.dag.yaml").read_text()
    (source / "flow.dag.yaml").write_text(dag)
    (source / "integrate_with_promptflow.py").write_text("# tool\n")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (source / ".promptflow").mkdir()
    (source / ".promptflow" / "flow.log").write_text("local run state")
    (source / "weights.bin").write_bytes(b"\0" * 10)

    staged = publish.stage_flow(source, "team-endpoint", tmp_path / "staged")

    assert sorted(p.name for p in staged.rglob("*")) == ["flow.dag.yaml", "integrate_with_promptflow.py"]
    nodes = yaml.safe_load((staged / "flow.dag.yaml").read_text())["nodes"]
    assert {n["inputs"]["connection"] for n in nodes if "connection" in n.get("inputs", {})} == {
        "team-endpoint"
    }
    # Comments and layout stay as a person wrote them: only the connection line changed.
    changed = [
        (a, b)
        for a, b in zip(dag.splitlines(), (staged / "flow.dag.yaml").read_text().splitlines(), strict=True)
        if a != b
    ]
    assert len(changed) == 1 and "team-endpoint" in changed[0][1]


def test_a_flow_without_a_connection_input_is_refused(tmp_path: Path):
    source = tmp_path / "flow"
    source.mkdir()
    (source / "flow.dag.yaml").write_text("inputs: {}\noutputs: {}\nnodes:\n- name: a\n  type: python\n")

    with pytest.raises(BackendError, match="has no node with a connection input"):
        publish.stage_flow(source, "phi3-endpoint", tmp_path / "staged")


def test_a_stalled_flow_list_times_out_and_is_asked_again(
    azure_backend: AzureBackend, fake_azure: FakeAzure, deployed: dict
):
    # promptflow-azure lists the project's flows with a bare requests.post: without a timeout, a stalled
    # index service held the step until functionTimeout killed the worker.
    server = fake_azure.server
    gate = server.gates[("POST", "flow-index")] = threading.Event()

    def let_the_next_ones_through() -> None:
        server.at_gate.wait(timeout=60)  # the first list call is held (until the test ends)
        del server.gates[("POST", "flow-index")]

    opener = threading.Thread(target=let_the_next_ones_through)
    opener.start()
    try:
        result = azure_backend.publish_flow("phi3-endpoint", ENDPOINT, "phi3_chat-run1", RunConfig())
        answered = [e for e in server.exchanges if e.route == "flow-index"]
    finally:
        gate.set()
        opener.join()
    deadline = time.monotonic() + 30
    while len([e for e in server.exchanges if e.route == "flow-index"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the held call, released, is recorded when its handler ends

    assert result.details["published_flow"]["display_name"] == "phi3_chat-run1"
    assert len(answered) == 1  # the retry's: the held call was still unanswered when the client gave up
    assert len([e for e in server.exchanges if e.route == "flow-index"]) == 2
    assert sum(len(f) for f in fake_azure.flows.values()) == 1
