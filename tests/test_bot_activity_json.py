"""Activities as the bot reads, copies and writes them: exactly as botbuilder's own msrest code does.

``bot.activity_json`` is run against msrest on each case and compared: the same model (every
attribute, its type, nested models and unknown keys), the same JSON text, or the same error. Real
channel shapes first (Teams, Web Chat, card actions), then values of the wrong type, then a seeded
random sweep. The bot's replies (``ReplyActivity``) deep-copy like any activity, only faster.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
from typing import Any

import botbuilder.schema as schema
import pytest
from botbuilder.core import CardFactory, MessageFactory, TurnContext
from botbuilder.schema import (
    Activity,
    ActivityTypes,
    CardAction,
    ChannelAccount,
    ConversationAccount,
    ExpectedReplies,
    Mention,
    SuggestedActions,
    TextFormatTypes,
)
from msrest.serialization import Model

from bot.activity_json import activity_from_json, model_to_json
from bot.messages import ReplyActivity, markdown_messages, typing_activity

TEAMS_MESSAGE = {
    "type": "message",
    "id": "1700000000000",
    "timestamp": "2026-11-02T10:15:30.1234567Z",
    "localTimestamp": "2026-11-02T11:15:30.123+01:00",
    "localTimezone": "Europe/Berlin",
    "serviceUrl": "https://smba.trafficmanager.net/emea/",
    "channelId": "msteams",
    "from": {"id": "29:1abc", "name": "Ada", "aadObjectId": "00000000-0000-0000-0000-00000000000a"},
    "conversation": {
        "isGroup": True,
        "conversationType": "channel",
        "tenantId": "tenant-1",
        "id": "19:abc@thread.tacv2;messageid=1700000000000",
    },
    "recipient": {"id": "28:bot", "name": "Phi3Bot"},
    "textFormat": "plain",
    "locale": "en-GB",
    "text": "<at>Phi3Bot</at> how long is the warranty?",
    "attachments": [{"contentType": "text/html", "content": "<div><at>Phi3Bot</at> how long?</div>"}],
    "entities": [
        {
            "type": "mention",
            "mentioned": {"id": "28:bot", "name": "Phi3Bot"},
            "text": "<at>Phi3Bot</at>",
        },
        {
            "type": "clientInfo",
            "locale": "en-GB",
            "country": "GB",
            "platform": "Web",
            "timezone": "Europe/Berlin",
        },
    ],
    "channelData": {
        "tenant": {"id": "tenant-1"},
        "team": {"id": "19:team@thread.tacv2", "name": "Support"},
        "channel": {"id": "19:abc@thread.tacv2"},
        "eventType": None,
    },
}
WEBCHAT_UPDATE = {
    "type": "conversationUpdate",
    "id": "abc|0000000",
    "channelId": "directline",
    "serviceUrl": "http://127.0.0.1:7071/directline",
    "conversation": {"id": "abc"},
    "recipient": {"id": "bot", "role": "bot"},
    "membersAdded": [{"id": "bot", "role": "bot"}, {"id": "user", "name": "You", "role": "user"}],
    "membersRemoved": [],
}
CARD_INVOKE = {
    "type": "invoke",
    "name": "adaptiveCard/action",
    "id": "f:1",
    "channelId": "msteams",
    "serviceUrl": "https://smba.trafficmanager.net/emea/",
    "conversation": {"id": "a:1"},
    "from": {"id": "29:1abc"},
    "value": {"action": {"type": "Action.Execute", "verb": "rate", "data": {"stars": 5, "ok": True}}},
    "replyToId": "1700000000000",
    "deliveryMode": "expectReplies",
    "suggestedActions": {"to": ["user"], "actions": [{"type": "imBack", "title": "Yes", "value": "yes"}]},
    "x-unknown-top-level": {"kept": [1, 2.5, None]},
}
WRONG_TYPES = [
    {"type": "message", "text": 5},
    {"type": "message", "text": {"a": 1}},
    {"type": "message", "conversation": "c"},
    {"type": "message", "attachments": "not a list"},
    {"type": "message", "attachments": [None, {"contentType": "x"}]},
    {"type": "message", "membersAdded": [{"id": 7}]},
    {"type": "message", "conversation": {"id": "c", "isGroup": "true"}},
    {"type": "message", "conversation": {"id": "c", "isGroup": "maybe"}},
    {"type": "message", "timestamp": "not a time"},
    {"type": "message", "timestamp": 1700000000},
    {"type": "message", "entities": [{"type": "mention", "mentioned": "not an account"}]},
    {"type": "message", "channelData": ["a", {"b": None}]},
    {"type": "message", "from": {"id": "u", "properties": {"x": 1}}},
    {"type": True},
    {},
]


def outcome(decode, data: Any) -> tuple[str, Any]:
    try:
        return "ok", shape(decode(copy.deepcopy(data)))
    except Exception as error:
        return type(error).__name__, str(error)


def shape(value: Any) -> Any:
    """``value`` with every type spelled out (``True == 1`` and ``Activity == Activity`` are too lax)."""
    if isinstance(value, Model):
        return type(value).__name__, {name: shape(v) for name, v in vars(value).items()}
    if isinstance(value, dict):
        return "dict", {key: shape(v) for key, v in value.items()}
    if isinstance(value, list):
        return "list", [shape(v) for v in value]
    return type(value).__name__, value


def assert_reads_like_msrest(data: dict[str, Any]) -> None:
    expected = outcome(lambda d: Activity().deserialize(d), data)
    got = outcome(activity_from_json, data)
    assert got == expected, data


def assert_writes_like_msrest(model: Model) -> None:
    expected = outcome(lambda m: m.serialize(), model)
    got = outcome(model_to_json, model)
    assert got == expected
    if got[0] == "ok":  # and the same text, key order included
        assert json.dumps(model_to_json(model)) == json.dumps(model.serialize())


@pytest.mark.parametrize(
    "data", [TEAMS_MESSAGE, WEBCHAT_UPDATE, CARD_INVOKE], ids=["teams", "webchat", "invoke"]
)
def test_channel_activities_are_read_exactly_as_msrest_reads_them(data):
    assert_reads_like_msrest(data)


def test_keys_the_schema_does_not_know_are_kept_as_additional_properties():
    activity = activity_from_json(copy.deepcopy(TEAMS_MESSAGE))
    mention = activity.entities[0]
    assert mention.additional_properties == {
        "mentioned": {"id": "28:bot", "name": "Phi3Bot"},
        "text": "<at>Phi3Bot</at>",
    }
    assert activity_from_json(copy.deepcopy(CARD_INVOKE)).additional_properties == {
        "x-unknown-top-level": {"kept": [1, 2.5, None]}
    }
    assert activity.timestamp == dt.datetime(2026, 11, 2, 10, 15, 30, 123456, tzinfo=dt.UTC)


@pytest.mark.parametrize("data", WRONG_TYPES, ids=[json.dumps(d)[:40] for d in WRONG_TYPES])
def test_values_of_the_wrong_type_are_converted_or_refused_exactly_as_msrest_does(data):
    assert_reads_like_msrest(data)


def replies_to(incoming: dict[str, Any]) -> list[Activity]:
    """What the bot sends back, addressed the way ``TurnContext.send_activities`` addresses it."""
    reference = TurnContext.get_conversation_reference(Activity().deserialize(copy.deepcopy(incoming)))
    markdown = MessageFactory.text("**Two years.**")
    markdown.text_format = TextFormatTypes.markdown
    card = MessageFactory.attachment(
        CardFactory.adaptive_card({"type": "AdaptiveCard", "version": "1.5", "body": [{"type": "TextBlock"}]})
    )
    card.suggested_actions = SuggestedActions(
        actions=[CardAction(type="imBack", title="More", value={"ask": "more"})]
    )
    mention = Mention(mentioned=ChannelAccount(id="29:1abc", name="Ada"), text="<at>Ada</at>", type="mention")
    addressed = MessageFactory.text("<at>Ada</at> done", input_hint="ignoringInput")
    addressed.entities = [mention, None]
    addressed.timestamp = dt.datetime(2026, 11, 2, 10, 15, 30, tzinfo=dt.UTC)
    addressed.channel_data = {"notification": {"alert": True}, "account": ChannelAccount(id="x")}
    typing = Activity(type=ActivityTypes.typing)
    replies = [markdown, card, addressed, typing, *markdown_messages("**Two years.**"), typing_activity()]
    for reply in replies:
        TurnContext.apply_conversation_reference(reply, reference)
    return replies


@pytest.mark.parametrize(
    "incoming", [TEAMS_MESSAGE, WEBCHAT_UPDATE, CARD_INVOKE], ids=["teams", "webchat", "invoke"]
)
def test_replies_are_written_exactly_as_msrest_writes_them(incoming):
    replies = replies_to(incoming)
    for reply in replies:
        assert_writes_like_msrest(reply)
    assert_writes_like_msrest(ExpectedReplies(activities=replies))


@pytest.mark.parametrize(
    "oddity",
    [
        {"text": 5},
        {"conversation": {"id": "not a model"}},
        {"attachments": ("a", "tuple")},
        {"members_added": [ChannelAccount(id="u"), "not an account"]},
        {"timestamp": "2026-11-02T10:15:30Z"},
        {"timestamp": "not a time"},
        {"conversation": ConversationAccount(id="c", is_group="yes")},
    ],
    ids=lambda o: next(iter(o)),
)
def test_attributes_of_the_wrong_type_are_written_or_refused_exactly_as_msrest_does(oddity):
    activity = MessageFactory.text("hi")
    for name, value in oddity.items():
        setattr(activity, name, value)
    assert_writes_like_msrest(activity)


def test_the_usual_shapes_never_fall_back_to_msrest(monkeypatch):
    def msrest_used(*args, **kwargs):
        raise AssertionError("fell back to msrest")

    replies = replies_to(TEAMS_MESSAGE)[:2]
    monkeypatch.setattr(Activity, "deserialize", msrest_used)
    monkeypatch.setattr(Model, "serialize", msrest_used)
    for incoming in (TEAMS_MESSAGE, WEBCHAT_UPDATE, CARD_INVOKE):
        activity_from_json(copy.deepcopy(incoming))
    model_to_json(ExpectedReplies(activities=replies))


# -- the bot's replies ------------------------------------------------------------------------------
def test_the_bots_replies_are_the_messages_message_factory_would_make():
    expected = MessageFactory.text("**Two years.**")
    expected.text_format = TextFormatTypes.markdown
    (reply,) = markdown_messages("**Two years.**")
    assert shape(vars(reply)) == shape(vars(expected))
    assert shape(vars(typing_activity())) == shape(vars(Activity(type=ActivityTypes.typing)))


def test_a_reply_deep_copies_into_an_equal_activity_that_shares_nothing_mutable():
    incoming = activity_from_json(copy.deepcopy(TEAMS_MESSAGE))
    (reply,) = markdown_messages("see the card")
    reply.attachments = copy.deepcopy(incoming.attachments)
    reply.entities = copy.deepcopy(incoming.entities)
    reply.channel_data = {"notification": {"alert": True}}
    TurnContext.apply_conversation_reference(reply, TurnContext.get_conversation_reference(incoming))
    clone = copy.deepcopy(reply)
    assert type(clone) is ReplyActivity and shape(clone) == shape(reply)
    for name, value in vars(reply).items():
        if isinstance(value, list | dict | Model):
            assert getattr(clone, name) is not value, name
    clone.attachments[0].content = "changed"
    clone.channel_data["notification"]["alert"] = False
    clone.from_property.name = "changed"
    assert reply.attachments[0].content.startswith("<div>")
    assert reply.channel_data == {"notification": {"alert": True}} and reply.from_property.name == "Phi3Bot"


# -- a seeded random sweep over the Activity schema ----------------------------------------------
def random_value(rng: random.Random, type_: str, depth: int = 0) -> Any:
    """A JSON value for an attribute of msrest type ``type_``: usually right, sometimes not."""
    if rng.random() < 0.08:  # the wrong kind of value for any type
        return rng.choice([None, 0, 1, True, "text", 2.5, [], {}, ["x"], {"id": 3}])
    if type_ == "str":
        return rng.choice(["", "a", "ünïcode ✓", "message", "x" * 40])
    if type_ == "bool":
        return rng.choice([True, False, "true", "0"])
    if type_ == "int":
        return rng.choice([0, 7, -1, "12"])
    if type_ == "float":
        return rng.choice([0.5, 3.0, 2])
    if type_ == "iso-8601":
        return rng.choice(["2026-11-02T10:15:30Z", "2026-11-02T10:15:30.1234567+02:00", "2026-13-40"])
    if type_ == "object" or type_.startswith("{"):
        return rng.choice([{"k": [1, {"n": None}]}, "s", 3, [True], {"deep": {"er": "x"}}])
    if type_ == "bytearray":
        return rng.choice(["aGVsbG8=", "not base64 ~"])
    if type_.startswith("["):
        return [random_value(rng, type_[1:-1], depth + 1) for _ in range(rng.randint(0, 3))]
    cls = getattr(schema, type_, None)
    if cls is None or depth > 2:
        return None
    return random_json(rng, cls, depth + 1)


def random_json(rng: random.Random, cls: type, depth: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for desc in cls._attribute_map.values():
        if rng.random() < 0.35:
            data[desc["key"]] = random_value(rng, desc["type"], depth)
    if rng.random() < 0.2:
        data["unknownKey"] = {"kept": True}
    return data


def test_random_activities_are_read_and_written_exactly_as_msrest_does():
    rng = random.Random(20261102)
    written = 0
    for _ in range(400):
        data = random_json(rng, Activity)
        assert_reads_like_msrest(data)
        try:
            activity = Activity().deserialize(copy.deepcopy(data))
        except Exception:
            continue
        assert_writes_like_msrest(activity)
        written += 1
    assert written > 100  # the sweep wrote a fair share, not only refusals


def test_a_model_whose_constructor_defaults_are_not_none_is_left_to_msrest():
    """Reading sets only the attributes a message holds; msrest passes None for the rest, the same
    only where every default is None. A model with another default is not planned."""
    import bot.activity_json as activity_json

    class Defaulted(ChannelAccount):
        def __init__(self, *, role: str = "user", **kwargs: Any) -> None:
            super().__init__(role=role, **kwargs)

    with pytest.raises(activity_json._NotPlain):
        activity_json._plan(Defaulted)
    assert activity_json._plan(ChannelAccount)  # the schema's own models are planned
