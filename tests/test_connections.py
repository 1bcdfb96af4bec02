"""The flow's custom connection in promptflow's local store: created, updated, left alone, deleted —
with the key encrypted at rest, its key file owner-only, and never handed back or logged."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from flows.connections import connection_endpoint, delete_connection, upsert_connection
from flows.environment import key_file, promptflow_home
from tests.test_flow_runner import shared_promptflow_state

KEY = "conn-k3y-" + "z" * 40
URI = "http://127.0.0.1:5/score"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_promptflow_state(tmp_path_factory)


@pytest.fixture
def name(request: pytest.FixtureRequest, state_dir: Path):
    connection = f"conn-{request.node.name[5:40]}".replace("[", "-").rstrip("]")
    yield connection
    delete_connection(connection, state_dir=state_dir)


def test_a_new_connection_is_created_and_its_endpoint_can_be_read_back(name, state_dir):
    result = upsert_connection(name, URI, KEY, state_dir=state_dir)

    assert (result.name, result.endpoint, result.action) == (name, URI, "created")
    assert connection_endpoint(name, state_dir=state_dir) == URI


def test_upserting_the_same_endpoint_and_key_again_changes_nothing(name, state_dir):
    upsert_connection(name, URI, KEY, state_dir=state_dir)
    assert upsert_connection(name, URI, KEY, state_dir=state_dir).action == "unchanged"


def test_a_new_key_or_endpoint_updates_the_connection(name, state_dir):
    upsert_connection(name, URI, KEY, state_dir=state_dir)

    assert upsert_connection(name, URI, KEY + "-rotated", state_dir=state_dir).action == "updated"
    assert upsert_connection(name, URI + "2", KEY + "-rotated", state_dir=state_dir).action == "updated"
    assert connection_endpoint(name, state_dir=state_dir) == URI + "2"


def test_the_stored_connection_is_a_custom_connection_with_the_key_as_a_secret(name, state_dir):
    from promptflow.client import PFClient

    upsert_connection(name, URI, KEY, state_dir=state_dir)

    stored = PFClient().connections.get(name, with_secrets=True)
    assert type(stored).__name__ == "CustomConnection"
    assert (stored.configs, stored.secrets) == ({"endpoint": URI}, {"key": KEY})


def test_the_result_never_carries_the_key(name, state_dir):
    result = upsert_connection(name, URI, KEY, state_dir=state_dir)
    assert KEY not in result.model_dump_json()


def test_the_key_is_encrypted_at_rest_and_its_key_file_is_owner_only(name, state_dir):
    upsert_connection(name, URI, KEY, state_dir=state_dir)

    store = promptflow_home(state_dir)
    assert all(KEY.encode() not in p.read_bytes() for p in store.rglob("*") if p.is_file())
    assert stat.S_IMODE(key_file(state_dir).stat().st_mode) == 0o600
    assert key_file(state_dir).stat().st_size > 0  # the store's encryption key is in it
    assert stat.S_IMODE(store.stat().st_mode) == 0o700


def test_nothing_logged_while_storing_mentions_the_key(name, state_dir, caplog, capfd):
    with caplog.at_level(logging.DEBUG):
        upsert_connection(name, URI, KEY, state_dir=state_dir)
        upsert_connection(name, URI, KEY + "-rotated", state_dir=state_dir)
    out, err = capfd.readouterr()
    assert KEY not in caplog.text + out + err


def test_deleting_a_connection_twice_is_fine(name, state_dir):
    upsert_connection(name, URI, KEY, state_dir=state_dir)

    assert delete_connection(name, state_dir=state_dir) is True
    assert delete_connection(name, state_dir=state_dir) is False
    assert connection_endpoint(name, state_dir=state_dir) is None


@pytest.mark.parametrize(
    ("uri", "key", "problem"), [(URI, "", "key is empty"), ("ftp://x/score", KEY, "http")]
)
def test_an_empty_key_or_a_non_http_endpoint_is_refused_by_name(state_dir, uri, key, problem):
    with pytest.raises(ValueError, match=problem) as raised:
        upsert_connection("conn-refused", uri, key, state_dir=state_dir)
    assert "conn-refused" in str(raised.value)
    assert connection_endpoint("conn-refused", state_dir=state_dir) is None
