"""Local online endpoints: real server processes, real MLflow models, Azure ML's names and rules."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.local.backend import LocalBackend
from backends.local.endpoint_state import DamagedKeysError, read_keys
from backends.local.endpoints import (
    DeploymentInfo,
    EndpointInfo,
    EndpointServerError,
    InvalidEndpointRequest,
    LocalEndpoints,
    ServerRecord,
    write_json_atomic,
)
from backends.protocol import BackendError
from backends.scoring import ScoringAuthError, chat_sync
from settings import AppSettings
from tests.support.polling import bind_when_free, wait_for
from tests.support.redaction import leaked_pieces
from tests.test_scoring_server import ModelStore, log_test_models


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return log_test_models(tmp_path_factory.mktemp("mlflow"), ("echo", "failing", "gated"))


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory, store: ModelStore) -> Iterator[LocalEndpoints]:
    local = LocalEndpoints(tmp_path_factory.mktemp("workspace"), tracking_uri=store.tracking_uri)
    yield local
    local.stop_all()


@pytest.fixture
def endpoint_name(request: pytest.FixtureRequest, endpoints: LocalEndpoints) -> Iterator[str]:
    """A fresh endpoint name per test (Azure-valid), deleted afterwards."""
    words = re.sub(r"[^a-z0-9]+", "-", request.node.originalname.removeprefix("test_"))
    name = ("ep-" + words)[:28].rstrip("-")
    yield name
    endpoints.delete_endpoint(name)


@pytest.fixture(scope="module")
def live_endpoint(endpoints: LocalEndpoints, store: ModelStore) -> Iterator[str]:
    """One endpoint shared by the tests below: its server stays warm, so model loads take milliseconds."""
    deployed(endpoints, store, "ep-live")
    yield "ep-live"
    endpoints.delete_endpoint("ep-live")


@pytest.fixture
def live(endpoints: LocalEndpoints, store: ModelStore, live_endpoint: str) -> EndpointInfo:
    """The shared endpoint, reset: running, 'blue' (echo) Succeeded with all traffic, nothing else."""
    endpoints.ensure_running()
    info = deployed(endpoints, store, live_endpoint)
    for deployment in endpoints.list_deployments(live_endpoint):
        if deployment.name != "blue":
            endpoints.delete_deployment(live_endpoint, deployment.name)
    return info


def settled(endpoints: LocalEndpoints, endpoint: str, deployment: str) -> DeploymentInfo:
    """Poll like the pipeline does until the deployment leaves Creating/Updating."""

    def done() -> DeploymentInfo | None:
        info = endpoints.get_deployment(endpoint, deployment)
        return info if info.provisioning_state in ("Succeeded", "Failed") else None

    return wait_for(done, timeout=60, what=f"deployment {deployment} to settle")


def deployed(
    endpoints: LocalEndpoints, store: ModelStore, name: str, behaviour: str = "echo"
) -> EndpointInfo:
    """An endpoint with one Succeeded deployment 'blue' taking all traffic."""
    endpoints.create_or_update_endpoint(name, tags={"managed-by": "tests"})
    endpoints.create_or_update_deployment(name, "blue", model_uri=store.uris[behaviour])
    assert settled(endpoints, name, "blue").provisioning_state == "Succeeded"
    return endpoints.set_traffic(name, {"blue": 100})


def ask(info: EndpointInfo, key: str, text: str = "hi") -> str:
    return chat_sync(
        info.scoring_uri, key, [{"role": "user", "content": text}], temperature=0.0, max_new_tokens=8
    )


# -- endpoints ------------------------------------------------------------------------------------
def test_creating_an_endpoint_returns_its_scoring_uri_tags_and_state(endpoints, endpoint_name):
    info = endpoints.create_or_update_endpoint(endpoint_name, tags={"owner": "tests"})
    assert info.scoring_uri == f"http://127.0.0.1:{info.port}/score"
    assert (info.provisioning_state, info.tags, info.traffic) == ("Succeeded", {"owner": "tests"}, {})


def test_creating_an_endpoint_twice_keeps_its_port_and_its_server_process(endpoints, endpoint_name):
    first = endpoints.create_or_update_endpoint(endpoint_name, tags={"owner": "tests"})
    again = endpoints.create_or_update_endpoint(endpoint_name, tags={"owner": "tests", "ttl": "1h"})
    assert (again.port, again.pid) == (first.port, first.pid)
    assert again.tags == {"owner": "tests", "ttl": "1h"}
    assert [e.name for e in endpoints.list_endpoints()].count(endpoint_name) == 1


@pytest.mark.parametrize("bad_name", ["ab", "1abc", "abc-", "a_bc", "x" * 33, "ab c"])
def test_an_endpoint_name_that_azure_would_reject_is_refused(endpoints, bad_name):
    with pytest.raises(InvalidEndpointRequest, match="3-32 characters"):
        endpoints.create_or_update_endpoint(bad_name, tags={})
    assert not (endpoints.root / bad_name).exists()


def test_a_path_like_name_never_reaches_the_file_system(endpoints):
    with pytest.raises(InvalidEndpointRequest):
        endpoints.delete_endpoint("..")
    assert endpoints.root.parent.is_dir()


def test_deleting_an_endpoint_stops_its_process_and_removes_its_folder(endpoints, endpoint_name, store):
    info = endpoints.create_or_update_endpoint(endpoint_name, tags={})
    endpoints.create_or_update_deployment(endpoint_name, "broken", model_uri=store.uris["failing"])
    endpoints.delete_endpoint(endpoint_name)
    assert not (endpoints.root / endpoint_name).exists()
    assert not _is_alive(info.pid)
    endpoints.delete_endpoint(endpoint_name)  # deleting again is a no-op


def _is_alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return text[text.rindex(")") + 2] != "Z"


# -- deployments ----------------------------------------------------------------------------------
def test_a_deployment_is_creating_until_the_server_reports_it_ready(endpoints, live, store):
    created = endpoints.create_or_update_deployment(live.name, "slow", model_uri=store.uris["gated"])
    assert created.provisioning_state == "Creating"
    assert endpoints.get_deployment(live.name, "slow").provisioning_state == "Creating"
    store.gate.touch()
    try:
        assert settled(endpoints, live.name, "slow").provisioning_state == "Succeeded"
    finally:
        store.gate.unlink()


def test_a_deployment_whose_model_fails_to_load_ends_failed_with_the_load_error(endpoints, live, store):
    endpoints.create_or_update_deployment(live.name, "broken", model_uri=store.uris["failing"])
    info = settled(endpoints, live.name, "broken")
    assert info.provisioning_state == "Failed"
    assert "model weights are missing" in info.error


def test_repeating_a_deployment_call_neither_reloads_nor_duplicates_it(endpoints, live, store):
    config_path = endpoints.root / live.name / "endpoint.json"
    config_before = json.loads(config_path.read_text())
    again = endpoints.create_or_update_deployment(live.name, "blue", model_uri=store.uris["echo"])
    assert again.provisioning_state == "Succeeded"
    assert json.loads(config_path.read_text()) == config_before
    assert [d.name for d in endpoints.list_deployments(live.name)] == ["blue"]


def test_changing_a_deployments_model_updates_it_in_place(endpoints, live, store):
    updated = endpoints.create_or_update_deployment(live.name, "blue", model_uri=store.uris["gated"])
    assert updated.provisioning_state == "Updating"
    store.gate.touch()
    try:
        after = settled(endpoints, live.name, "blue")
    finally:
        store.gate.unlink()
    assert (after.provisioning_state, after.model_uri) == ("Succeeded", store.uris["gated"])


def test_retrying_a_failed_deployment_loads_it_again(endpoints, live, store):
    server_log = endpoints.root / live.name / "logs" / "server.log"
    endpoints.create_or_update_deployment(live.name, "broken", model_uri=store.uris["failing"])
    settled(endpoints, live.name, "broken")
    attempts_before = server_log.read_text().count("deployment broken: loading")
    endpoints.create_or_update_deployment(live.name, "broken", model_uri=store.uris["failing"])
    assert settled(endpoints, live.name, "broken").provisioning_state == "Failed"
    assert server_log.read_text().count("deployment broken: loading") == attempts_before + 1


def test_deleting_a_deployment_that_receives_traffic_is_refused(endpoints, live):
    with pytest.raises(InvalidEndpointRequest, match="'blue' receives 100%"):
        endpoints.delete_deployment(live.name, "blue")
    assert [d.name for d in endpoints.list_deployments(live.name)] == ["blue"]


def test_a_deployment_without_traffic_can_be_deleted(endpoints, live):
    endpoints.set_traffic(live.name, {"blue": 0})
    endpoints.delete_deployment(live.name, "blue")
    assert endpoints.list_deployments(live.name) == []
    assert endpoints.get_endpoint(live.name).traffic == {}


# -- traffic --------------------------------------------------------------------------------------
def test_traffic_can_only_go_to_a_succeeded_deployment(endpoints, live, store):
    endpoints.create_or_update_deployment(live.name, "broken", model_uri=store.uris["failing"])
    settled(endpoints, live.name, "broken")
    with pytest.raises(InvalidEndpointRequest, match="deployment 'broken' is Failed"):
        endpoints.set_traffic(live.name, {"blue": 0, "broken": 100})


@pytest.mark.parametrize(
    ("traffic", "complaint"),
    [
        ({"blue": 50}, "must sum to 100"),
        ({"blue": 100.0}, "integer percentage"),
        ({"blue": True}, "integer percentage"),
        ({"blue": 150}, "integer percentage"),
        ({"ghost": 100}, "'ghost', which endpoint"),
    ],
)
def test_traffic_must_be_integer_percentages_summing_to_100(endpoints, live, traffic, complaint):
    with pytest.raises(InvalidEndpointRequest, match=complaint):
        endpoints.set_traffic(live.name, traffic)
    assert endpoints.get_endpoint(live.name).traffic == {"blue": 100}


def test_traffic_routes_scoring_requests_to_the_deployment(endpoints, live):
    answer = json.loads(ask(live, endpoints.get_keys(live.name).primary.get_secret_value(), "ping"))
    assert answer["messages"] == [{"role": "user", "content": "ping"}]
    assert live.traffic == {"blue": 100}


# -- keys -----------------------------------------------------------------------------------------
def test_keys_are_private_on_disk_and_never_shown_in_logs_or_reprs(endpoints, live):
    keys = endpoints.get_keys(live.name)
    primary, secondary = keys.primary.get_secret_value(), keys.secondary.get_secret_value()
    ask(live, primary)
    ask(live, secondary)
    directory = endpoints.root / live.name
    assert stat.S_IMODE((directory / "keys.json").stat().st_mode) == 0o600
    shown = [repr(keys), str(keys), keys.model_dump_json(), (directory / "logs" / "server.log").read_text()]
    shown += [(directory / name).read_text() for name in ("endpoint.json", "server.json")]
    shown += [live.model_dump_json(), endpoints.get_deployment(live.name, "blue").model_dump_json()]
    assert all(primary not in text and secondary not in text for text in shown)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda keys: json.dumps({"primary": keys["primary"]}), "secondary: Field required"),
        (lambda keys: json.dumps(keys, indent=2)[:-2] + ",\n}", "Invalid JSON: trailing comma"),
        (lambda keys: json.dumps(keys)[:60], "Invalid JSON: EOF while parsing"),
    ],
    ids=["a key missing", "a trailing comma", "cut short"],
)
def test_a_damaged_keys_file_is_an_error_that_names_it_and_quotes_no_key(tmp_path, damage, problem):
    keys = {"primary": secrets.token_urlsafe(32), "secondary": secrets.token_urlsafe(32)}
    (tmp_path / "keys.json").write_text(damage(keys))

    with pytest.raises(DamagedKeysError) as raised:
        read_keys(tmp_path)

    message = str(raised.value)
    assert f"{tmp_path / 'keys.json'} is damaged" in message and problem in message
    assert not any(leaked_pieces(message, key) for key in keys.values()), message


def test_the_local_backend_reports_a_damaged_keys_file_as_an_error_to_act_on(
    endpoints, live, tmp_path, monkeypatch
):
    path = endpoints.root / live.name / "keys.json"
    keys = json.loads(path.read_bytes())
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # LocalBackend points them at its own
        monkeypatch.setenv(name, os.environ.get(name, ""))
    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(tmp_path)), restart_endpoints=False)
    backend.endpoints = endpoints  # the backend over this module's endpoints
    try:
        path.write_text(json.dumps({"primary": keys["primary"]}))
        with pytest.raises(BackendError, match=r"keys\.json is damaged") as raised:
            backend.get_endpoint_keys(live.name)
    finally:
        write_json_atomic(path, keys, mode=0o600)
    assert type(raised.value) is BackendError  # permanent: the activity reports it, nothing retries it
    assert raised.value.__cause__ is None and raised.value.__context__ is not None
    assert not any(leaked_pieces(str(raised.value), key) for key in keys.values())


def test_a_regenerated_key_replaces_the_old_one_at_once(endpoints, live):
    old = endpoints.get_keys(live.name)
    endpoints.regenerate_keys(live.name, "primary")
    new = endpoints.get_keys(live.name)
    assert new.primary != old.primary and new.secondary == old.secondary
    with pytest.raises(ScoringAuthError):
        ask(live, old.primary.get_secret_value())
    assert ask(live, new.primary.get_secret_value())


# -- processes ------------------------------------------------------------------------------------
def wait_until_failed(endpoints: LocalEndpoints, name: str) -> None:
    """The endpoint's server was killed: wait until the endpoint says so."""
    wait_for(
        lambda: endpoints.get_endpoint(name).provisioning_state == "Failed",
        timeout=60,
        what=f"endpoint {name} to be seen Failed after the kill",
    )


def test_ensure_running_restarts_a_killed_server_on_the_same_port(endpoints, live):
    os.kill(live.pid, signal.SIGKILL)
    wait_until_failed(endpoints, live.name)
    assert endpoints.ensure_running() == [live.name]
    after = endpoints.get_endpoint(live.name)
    assert (after.port, after.provisioning_state) == (live.port, "Succeeded")
    assert after.pid != live.pid
    assert settled(endpoints, live.name, "blue").provisioning_state == "Succeeded"
    assert ask(after, endpoints.get_keys(live.name).primary.get_secret_value())


def test_an_endpoint_whose_port_was_taken_is_left_failed_and_the_others_restart(endpoints, endpoint_name):
    before = endpoints.create_or_update_endpoint(endpoint_name, tags={})
    os.kill(before.pid, signal.SIGKILL)
    wait_until_failed(endpoints, endpoint_name)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:  # another program took its port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", before.port))
        squatter.listen()

        assert endpoint_name not in endpoints.ensure_running()  # no exception: the backend still starts

        assert endpoints.get_endpoint(endpoint_name).provisioning_state == "Failed"


def test_a_server_that_cannot_start_says_why_before_anything_else(endpoints, endpoint_name, store):
    before = deployed(endpoints, store, endpoint_name)  # a used endpoint: its log has many lines
    os.kill(before.pid, signal.SIGKILL)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_when_free(squatter, before.port)
        squatter.listen()

        with pytest.raises(EndpointServerError) as raised:
            endpoints.create_or_update_endpoint(endpoint_name, tags={"managed-by": "tests"})

    # Callers show a message's first line, or its first few hundred characters.
    first_line = str(raised.value).splitlines()[0][:300]
    assert f"cannot listen on 127.0.0.1:{before.port}" in first_line, first_line
    assert "GET /health" not in str(raised.value)  # the previous server's lines are not this start's
    assert str(endpoints.root / endpoint_name / "logs" / "server.log") in str(raised.value)


def test_a_server_that_never_comes_up_is_stopped_not_left_behind(tmp_path, store):
    # A server stuck before it listens (a hung file system, a machine swapping under a fine-tune).
    stuck = tmp_path / "stuck-python"
    stuck.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nexec sleep 600\n")
    stuck.chmod(0o755)
    local = LocalEndpoints(
        tmp_path / "workspace", tracking_uri=store.tracking_uri, python=str(stuck), start_timeout_s=1
    )

    with pytest.raises(EndpointServerError, match="did not start within 1 s and was stopped"):
        local.create_or_update_endpoint("ep-stuck", tags={})

    pid = int((tmp_path / "pid").read_text())
    assert not _is_alive(pid)  # a retry must not find it holding the port, or add a second one


def test_ensure_running_leaves_a_live_server_alone(endpoints, live):
    assert endpoints.ensure_running() == []
    assert endpoints.get_endpoint(live.name).pid == live.pid


def test_a_reused_pid_is_not_mistaken_for_the_server(endpoints, endpoint_name):
    before = endpoints.create_or_update_endpoint(endpoint_name, tags={})
    record_path = endpoints.root / endpoint_name / "server.json"
    record = ServerRecord.model_validate_json(record_path.read_bytes())
    os.kill(before.pid, signal.SIGKILL)
    wait_until_failed(endpoints, endpoint_name)
    # The pid now belongs to another live process (this one), started at another time.
    write_json_atomic(record_path, record.model_copy(update={"pid": os.getpid()}).model_dump(mode="json"))
    assert endpoints.get_endpoint(endpoint_name).provisioning_state == "Failed"
    assert endpoints.ensure_running() == [endpoint_name]
    assert endpoints.get_endpoint(endpoint_name).port == before.port


def test_scoring_sets_the_endpoints_last_used_time(endpoints, live):
    (endpoints.root / live.name / "last_used").unlink(missing_ok=True)
    assert endpoints.get_endpoint(live.name).last_used_at is None
    ask(live, endpoints.get_keys(live.name).primary.get_secret_value())
    assert endpoints.get_endpoint(live.name).last_used_at is not None


# -- a real model ---------------------------------------------------------------------------------
def test_a_tiny_phi3_logged_with_the_chat_model_answers_through_the_endpoint(
    endpoints, live, store, tmp_path
):
    chat_model = pytest.importorskip(
        "backends.local.chat_model", reason="backends/local/chat_model.py not written yet"
    )
    base_models = pytest.importorskip(
        "backends.local.base_models", reason="backends/local/base_models.py missing"
    )
    import mlflow

    corpus = Path(__file__).resolve().parents[1] / "sample_data" / "support_chats.jsonl"
    model_dir = base_models.build_tiny_phi3(tmp_path / "tiny-phi3", corpus_files=[corpus])
    mlflow.set_tracking_uri(store.tracking_uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("scoring-tests").experiment_id):
        logged_uri = chat_model.log_chat_model(model_dir)
    version = mlflow.register_model(logged_uri, "tiny-phi3-chat").version
    model_uri = f"models:/tiny-phi3-chat/{version}"
    endpoints.create_or_update_deployment(live.name, "tiny", model_uri=model_uri)
    deployment = settled(endpoints, live.name, "tiny")
    assert deployment.provisioning_state == "Succeeded", deployment.error

    key = endpoints.get_keys(live.name).primary.get_secret_value()
    messages = [{"role": "user", "content": "How long do I have to return my Aero purifier?"}]

    def served(tokens: int) -> str:
        return chat_sync(
            live.scoring_uri, key, messages, deployment="tiny", temperature=0.0,
            max_new_tokens=tokens, min_new_tokens=tokens,
        )  # fmt: skip

    in_process = mlflow.pyfunc.load_model(model_uri)
    expected = in_process.predict(
        messages, params={"temperature": 0.0, "max_new_tokens": 6, "min_new_tokens": 6}
    )
    assert served(6) == expected[0]  # greedy: the server passed messages and params through unchanged
    assert served(12) != served(6)  # the token budget reached generate
