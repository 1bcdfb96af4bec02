"""The blob state store against Azurite (a real Blob REST implementation), and two bot instances
sharing it the way scaled-out Function App instances do."""

from __future__ import annotations

import asyncio

import pytest
from botbuilder.core import TurnContext
from botbuilder.core.adapters import TestAdapter
from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, ConversationAccount

from bot.runtime import BotRuntime, create_runtime, create_store
from bot.storage import ABSENT, BlobStore, MemoryStore, StorageConflictError, blob_name
from settings import AppSettings
from tests.fake_arm.azurite import AzuriteBlob, AzuriteUnavailable
from tests.support.bot_fakes import StubBackend, StubModel

TEAMS_KEY = "msteams/conversations/19:abc@thread.tacv2;messageid=1700000000000"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    try:
        server = AzuriteBlob(tmp_path_factory.mktemp("azurite")).start()
    except AzuriteUnavailable as exc:
        pytest.fail(f"Azurite is needed for the blob store tests: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["blob", "memory"])
async def store(request):
    """Both stores keep the same contract: e-tags on every item, a stale one refused."""
    if request.param == "memory":
        yield MemoryStore()
        return
    azurite = request.getfixturevalue("azurite")
    blob_store = BlobStore(
        f"bot-{request.node.name[-24:].replace('_', '-').replace('[', '-').strip('-]')}",
        connection_string=azurite.connection_string,
    )
    yield blob_store
    await blob_store.close()


async def test_items_round_trip_under_teams_style_keys(store):
    await store.write({TEAMS_KEY: {"chat": {"turns": [{"question": "q", "answer": "a"}]}}})
    item = (await store.read([TEAMS_KEY, "missing/key"]))[TEAMS_KEY]
    assert item["chat"] == {"turns": [{"question": "q", "answer": "a"}]} and item["e_tag"]
    assert (await store.read(["missing/key"])) == {}
    await store.delete([TEAMS_KEY, "missing/key"])
    assert await store.read([TEAMS_KEY]) == {}


async def test_a_write_with_a_stale_e_tag_is_refused(store):
    await store.write({"k": {"n": 1}})
    first = (await store.read(["k"]))["k"]
    await store.write({"k": {**first, "n": 2}})  # someone else's turn, with the same e-tag
    with pytest.raises(StorageConflictError, match="changed by another turn"):
        await store.write({"k": {**first, "n": 3}})
    await store.write({"k": {"n": 4, "e_tag": "*"}})  # '*' overwrites whatever is there
    assert (await store.read(["k"]))["k"]["n"] == 4


async def test_an_item_read_as_absent_is_written_back_only_if_still_absent(store):
    await store.write({"new": {"n": 1, "e_tag": ABSENT}})  # the first turn of a conversation
    with pytest.raises(StorageConflictError):
        await store.write({"new": {"n": 2, "e_tag": ABSENT}})  # another first turn, saved later
    assert (await store.read(["new"]))["new"]["n"] == 1


async def test_a_written_item_carries_its_new_e_tag_so_a_second_save_does_not_conflict_with_itself(store):
    item = {"n": 1}
    await store.write({"again": item})
    item["n"] = 2
    await store.write({"again": item})  # the same turn saving twice
    assert (await store.read(["again"]))["again"]["n"] == 2
    read = (await store.read(["again"]))["again"]
    read["n"] = 99  # a reader's copy, not the stored item
    assert (await store.read(["again"]))["again"]["n"] == 2


async def test_only_one_of_many_concurrent_claims_wins(store):
    results = await asyncio.gather(*(store.claim("test/activities/c/a1", {"by": i}, 60) for i in range(6)))
    assert results.count(True) == 1
    assert await store.claim("test/activities/c/a1", {}, 60) is False
    assert await store.claim("test/activities/c/a1", {}, stale_after_s=0) is True  # a stale claim is retaken


def test_very_long_keys_get_a_bounded_blob_name():
    assert len(blob_name("x" * 5000)) < 1024
    assert blob_name("a/b:c;d") == "a%2Fb%3Ac%3Bd.json"


@pytest.fixture
async def instances(azurite):
    """Two bot runtimes (two Function App instances) sharing one container and one endpoint."""
    model = await StubModel().start()
    backend = StubBackend()
    backend.add("ep", model, created_at="2031-01-01T00:00:00Z")
    settings = AppSettings(
        BOT_ROUTE="direct",
        BOT_STATE_STORE="blob",
        BOT_STATE_CONTAINER="bot-instances",
        BOT_STATE_CONNECTION_STRING=azurite.connection_string,
    )
    runtimes = [create_runtime(settings, backend=lambda: backend) for _ in range(2)]
    yield runtimes, model
    for runtime in runtimes:
        await runtime.close()
    await model.stop()


async def _say(
    runtime: BotRuntime, text: str, activity_id: str, conversation: str = "19:abc@thread.tacv2"
) -> list[str]:
    template = Activity(
        channel_id="msteams",
        service_url="https://smba.example",
        from_property=ChannelAccount(id="user-1"),
        recipient=ChannelAccount(id="bot"),
        conversation=ConversationAccount(id=conversation),
    )

    async def logic(turn_context: TurnContext) -> None:
        await runtime.bot.on_turn(turn_context)

    adapter = TestAdapter(logic, template)
    await adapter.receive_activity(Activity(type=ActivityTypes.message, text=text, id=activity_id))
    return [a.text for a in adapter.activity_buffer if a.type == ActivityTypes.message]


async def test_history_written_by_one_instance_is_read_by_another(instances):
    (a, b), model = instances
    assert await _say(a, "first", "act-1") == ["Answer to: first [1 messages]"]
    assert await _say(b, "second", "act-2") == ["Answer to: second [3 messages]"]
    assert [m["content"] for m in model.last_messages()] == [
        "first",
        "Answer to: first [1 messages]",
        "second",
    ]


async def test_two_instances_answering_one_conversation_at_once_both_keep_their_turn(instances):
    (a, b), model = instances
    conversation = "19:race@thread.tacv2"
    model.delay_s = 0.3  # both turns are in the model at once, and save one after the other
    answers = await asyncio.gather(
        _say(a, "first", "race-1", conversation), _say(b, "second", "race-2", conversation)
    )
    model.delay_s = 0
    await _say(a, "third", "race-3", conversation)

    assert all(len(sent) == 1 and sent[0].startswith("Answer to:") for sent in answers)  # no apology
    asked = [m["content"] for m in model.last_messages() if m["role"] == "user"]
    assert sorted(asked[:2]) == ["first", "second"] and asked[2:] == ["third"]


async def test_a_retry_arriving_at_another_instance_is_not_answered_again(instances):
    (a, b), model = instances
    assert await _say(a, "once", "act-retry") != []
    assert await _say(b, "once", "act-retry") == []
    assert len(model.requests) == 1


def test_the_store_is_memory_locally_and_blob_on_azure():
    assert isinstance(create_store(AppSettings(PHI3_BACKEND="local")), MemoryStore)
    on_azure = create_store(
        AppSettings(PHI3_BACKEND="azure", AzureWebJobsStorage="UseDevelopmentStorage=true")
    )
    assert isinstance(on_azure, BlobStore) and on_azure.container == "bot-state"
    by_identity = create_store(AppSettings(PHI3_BACKEND="azure", AzureWebJobsStorage__accountName="acct"))
    assert (
        isinstance(by_identity, BlobStore)
        and by_identity._account_url == "https://acct.blob.core.windows.net"
    )


def test_a_blob_store_without_any_account_says_which_settings_to_set(monkeypatch):
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    with pytest.raises(ValueError, match="BOT_STATE_CONNECTION_STRING"):
        create_store(AppSettings(PHI3_BACKEND="azure"))
