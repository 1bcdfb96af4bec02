"""The bot's behaviour, turn by turn, through botbuilder's TestAdapter/TestFlow.

The bot is the app's own runtime (``bot.runtime.create_runtime``) talking through the real scoring
client to a loopback endpoint (``StubModel``), found through a backend that lists it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from botbuilder.core import TurnContext
from botbuilder.core.adapters import TestAdapter, TestFlow
from botbuilder.schema import Activity, ActivityTypes, ChannelAccount, ConversationAccount, Entity

from bot.adapter import APOLOGY, TRY_AGAIN, turn_error_handler
from bot.commands import RunInfo
from bot.messages import TEAMS_SAFE_CHARS
from bot.phi3_bot import TURN_SERVICES, WELCOME, TurnServices
from bot.proactive import ACKNOWLEDGEMENT, InProcessScheduler
from bot.runtime import BotRuntime, create_runtime
from bot.storage import MemoryStore
from settings import AppSettings
from tests.support.bot_fakes import StubBackend, StubModel


@pytest.fixture
async def model():
    stub = await StubModel().start()
    yield stub
    await stub.stop()


@pytest.fixture
def backend(model):
    backend = StubBackend()
    backend.add("ep-new", model, created_at="2031-01-01T00:00:00Z")
    return backend


class LatestRun:
    """A run-status source answering what a Durable client would report."""

    async def latest_run(self) -> RunInfo | None:
        return RunInfo(
            run_id="ft-20310101-000000-abc123", status="Running", current_step="finetune", created="t0"
        )


class Harness:
    def __init__(self, runtime: BotRuntime, *, runs=None) -> None:
        self.runtime = runtime
        # botbuilder's default template uses the Channels enum as channel id, which a stored
        # conversation reference turns into text; a channel posting JSON always sends text.
        template = Activity(
            channel_id="test",
            service_url="https://test.com",
            from_property=ChannelAccount(id="User1", name="user"),
            recipient=ChannelAccount(id="bot", name="Bot"),
            conversation=ConversationAccount(id="Convo1"),
        )
        self.adapter = TestAdapter(self._logic, template)
        self.adapter.on_turn_error = turn_error_handler(runtime.conversation_state)
        self.scheduler = InProcessScheduler(runtime.proactive, self.adapter)
        self.runs = runs

    async def _logic(self, turn_context: TurnContext) -> None:
        turn_context.turn_state[TURN_SERVICES] = TurnServices(runs=self.runs, scheduler=self.scheduler)
        await self.runtime.bot.on_turn(turn_context)

    async def say(self, text: str, **fields) -> list[Activity]:
        """Send one message and return every activity the bot sent during the turn."""
        await self.adapter.receive_activity(Activity(type=ActivityTypes.message, text=text, **fields))
        sent = list(self.adapter.activity_buffer)
        self.adapter.activity_buffer.clear()
        return sent

    async def ask(self, text: str, **fields) -> list[str]:
        return [a.text for a in await self.say(text, **fields) if a.type == ActivityTypes.message]


def settings(**values) -> AppSettings:
    return AppSettings(**{"BOT_ROUTE": "direct", "BOT_ACK_AFTER_S": 30, **values})


@pytest.fixture
async def make_bot(backend):
    made: list[BotRuntime] = []

    def make(*, runs=None, backend_=None, **values) -> Harness:
        chosen = backend_ or backend
        runtime = create_runtime(settings(**values), backend=lambda: chosen, store=MemoryStore())
        made.append(runtime)
        return Harness(runtime, runs=runs)

    yield make
    for runtime in made:
        await runtime.close()


@pytest.fixture
def bot(make_bot) -> Harness:
    return make_bot()


async def test_a_question_gets_a_typing_indicator_then_the_endpoints_answer(bot, model):
    flow = await TestFlow(None, bot.adapter).send("What is the return window?")
    flow = await flow.assert_reply(lambda a, _: _expect(a.type == ActivityTypes.typing, a))
    await flow.assert_reply("Answer to: What is the return window? [1 messages]")
    assert model.requests[-1]["headers"]["Authorization"] == f"Bearer {model.key}"


def _expect(condition: bool, activity: Activity) -> None:
    assert condition, f"unexpected activity {activity.type}: {activity.text}"


async def test_answers_are_markdown(bot):
    sent = await bot.say("hello")
    assert [a.text_format for a in sent if a.type == ActivityTypes.message] == ["markdown"]


async def test_follow_up_questions_carry_the_history_as_alternating_messages(bot, model):
    await bot.ask("first question")
    await bot.ask("second question")
    assert model.last_messages() == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Answer to: first question [1 messages]"},
        {"role": "user", "content": "second question"},
    ]


async def test_history_keeps_only_the_newest_turns_that_fit_the_bound(make_bot, model):
    bot = make_bot(BOT_HISTORY_TURNS=2, BOT_HISTORY_CHARS=100_000)
    for n in range(4):
        await bot.ask(f"q{n}")
    await bot.ask("last")
    sent_history = [m["content"] for m in model.last_messages() if m["role"] == "user"]
    assert sent_history == ["q2", "q3", "last"]


async def test_history_is_bounded_by_characters_so_the_prompt_fits_the_context(make_bot, model):
    bot = make_bot(BOT_HISTORY_TURNS=50, BOT_HISTORY_CHARS=120)
    for n in range(3):
        await bot.ask(f"question number {n} " + "x" * 20)  # each turn costs ~85 characters
    await bot.ask("last")
    assert [m["content"][:17] for m in model.last_messages() if m["role"] == "user"] == [
        "question number 2",
        "last",
    ]


async def test_reset_forgets_the_history(bot, model):
    await bot.ask("remember me")
    assert await bot.ask("/reset") == ["Done: I've forgotten this conversation's history."]
    await bot.ask("who am I?")
    assert model.last_messages() == [{"role": "user", "content": "who am I?"}]


async def test_help_lists_every_command(bot):
    (reply,) = await bot.ask("/help")
    for command in ("/help", "/reset", "/status", "/route flow", "/route direct"):
        assert command in reply


async def test_an_unknown_command_says_so_and_shows_help(bot, model):
    (reply,) = await bot.ask("/frobnicate now")
    assert reply.startswith("I don't know the command `/frobnicate`") and "/reset" in reply
    assert model.requests == []


async def test_route_command_switches_only_this_conversation(bot, model):
    assert "answered through **flow**" in (await bot.ask("/route flow"))[0]
    other = ConversationAccount(id="another-conversation")
    await bot.ask("still direct?", conversation=other)
    assert model.last_messages()[-1]["content"] == "still direct?"
    (status,) = await bot.ask("/status")
    assert "**Route:** flow" in status and "default" not in status.split("\n")[0]


async def test_route_command_rejects_unknown_routes(bot):
    (reply,) = await bot.ask("/route carrier-pigeon")
    assert reply.startswith("Usage: `/route flow` or `/route direct`")


async def test_status_names_endpoint_model_route_and_the_latest_fine_tune_run(make_bot):
    bot = make_bot(runs=LatestRun())
    (status,) = await bot.ask("/status")
    assert "**Route:** direct (the app's default)" in status
    assert "**Endpoint:** ep-new (newest healthy)" in status
    assert "**Model:** ep-new-model:1" in status
    assert "ft-20310101-000000-abc123: Running, step finetune" in status


async def test_members_added_are_welcomed_but_the_bot_does_not_greet_itself(bot):
    update = Activity(
        type=ActivityTypes.conversation_update,
        members_added=[ChannelAccount(id="bot", name="Bot"), ChannelAccount(id="User1", name="user")],
    )
    await bot.adapter.receive_activity(update)
    assert [a.text for a in bot.adapter.activity_buffer] == [WELCOME]


async def test_the_bots_teams_mention_is_stripped_before_answering(bot, model):
    mention = Entity(type="mention")
    mention.additional_properties = {
        "mentioned": {"id": "bot", "name": "Phi3Bot"},
        "text": "<at>Phi3Bot</at>",
    }
    await bot.ask("<at>Phi3Bot</at> how do I reset the filter?", entities=[mention], channel_id="msteams")
    assert model.last_messages()[-1]["content"] == "how do I reset the filter?"


async def test_a_long_answer_is_split_at_paragraphs_into_messages_under_the_teams_limit(bot, model):
    paragraph = "word " * 1999 + "end.\n\n"  # 10,001 characters: two do not fit in one message
    model.fixed_answer = paragraph * 4
    texts = await bot.ask("tell me everything")
    assert len(texts) == 4
    assert all(len(t) <= TEAMS_SAFE_CHARS and t.rstrip().endswith("end.") for t in texts)
    assert " ".join(texts).split() == model.fixed_answer.split()


async def test_a_message_longer_than_the_limit_is_refused_without_calling_the_model(make_bot, model):
    bot = make_bot(BOT_MAX_QUESTION_CHARS=50)
    (reply,) = await bot.ask("x" * 51)
    assert reply == "That message is 51 characters long; I can take at most 50. Please shorten it."
    assert model.requests == []


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, "7", "The model is busy right now (too many requests). Please try again in about 7 seconds."),
        (503, None, "The model endpoint is not reachable right now. Please try again in a minute."),
        (400, None, "The model endpoint could not handle this request (HTTP 400). Try rephrasing it."),
    ],
)
async def test_endpoint_failures_get_a_short_honest_reply_and_are_not_remembered(
    bot, model, status, retry_after, expected, caplog
):
    model.status, model.retry_after = status, retry_after
    assert await bot.ask("hello?") == [expected]
    assert f"status={status}" in caplog.text and "bot answer failed" in caplog.text
    model.status = 200
    await bot.ask("again")
    assert model.last_messages() == [{"role": "user", "content": "again"}]


async def test_a_model_that_does_not_answer_in_time_gets_a_timeout_reply(make_bot, model):
    bot = make_bot(BOT_MODEL_TIMEOUT_S=0.1)
    model.delay_s = 0.5
    assert await bot.ask("slow?") == [
        "The model did not answer within 0.1 seconds. Please try again, perhaps with a shorter question."
    ]


async def test_an_endpoint_that_is_down_is_reported_and_chosen_again_next_turn(bot, model, backend):
    await model.stop()
    assert await bot.ask("anyone there?") == [
        "The model endpoint is not reachable right now. Please try again in a minute."
    ]
    replacement = await StubModel().start()
    try:
        backend.endpoints.clear()
        backend.add("ep-replacement", replacement, created_at="2032-01-01T00:00:00Z")
        assert await bot.ask("now?") == ["Answer to: now? [1 messages]"]
    finally:
        await replacement.stop()


async def test_with_no_endpoint_deployed_the_user_is_told_how_to_get_one(make_bot):
    bot = make_bot(backend_=StubBackend())
    (reply,) = await bot.ask("hi")
    assert reply.startswith("I can't answer yet: no model is deployed yet: start a fine-tune run")


async def test_a_regenerated_key_is_fetched_again_and_the_turn_still_succeeds(bot, model, backend):
    await bot.ask("one")
    fetches = backend.key_fetches
    model.key = "regenerated-" + "z" * 30
    assert await bot.ask("two") == ["Answer to: two [3 messages]"]
    assert backend.key_fetches == fetches + 1


async def test_the_key_is_fetched_once_and_never_stored_or_replied(bot, model, backend):
    replies = [t for q in ("a", "b", "c") for t in await bot.ask(q)]
    assert backend.key_fetches == 1
    stored = json.dumps(bot.runtime.store.memory, default=str)
    assert model.key not in stored and not any(model.key in r for r in replies)


async def test_the_newest_healthy_online_endpoint_answers_and_a_setting_overrides_it(make_bot, backend):
    older = await StubModel(fixed_answer="from the older endpoint").start()
    broken = await StubModel(fixed_answer="from the broken endpoint").start()
    try:
        backend.add("ep-old", older, created_at="2030-01-01T00:00:00Z")
        backend.add("ep-broken", broken, created_at="2035-01-01T00:00:00Z", healthy=False)
        backend.add("ep-serverless", broken, created_at="2036-01-01T00:00:00Z", kind="serverless")
        assert (await make_bot().ask("who?"))[0].startswith("Answer to: who?")
        pinned = make_bot(BOT_ENDPOINT_NAME="ep-old")
        assert await pinned.ask("who?") == ["from the older endpoint"]
        missing = make_bot(BOT_ENDPOINT_NAME="ep-nope")
        assert "'ep-nope' named by BOT_ENDPOINT_NAME does not exist" in (await missing.ask("who?"))[0]
    finally:
        await older.stop()
        await broken.stop()


async def test_a_retried_activity_is_answered_once(bot, model):
    first = await bot.ask("once please", id="activity-42")
    retry = await bot.ask("once please", id="activity-42")
    assert first == ["Answer to: once please [1 messages]"] and retry == []
    assert len(model.requests) == 1


async def test_a_slow_answer_is_acknowledged_then_posted_proactively_and_remembered(make_bot, model):
    bot = make_bot(BOT_ACK_AFTER_S=0.05)
    model.delay_s = 0.5
    assert await bot.ask("take your time", id="question-7") == [ACKNOWLEDGEMENT]
    reports = await asyncio.gather(*bot.scheduler.tasks)
    assert [r.reason for r in reports] == ["sent"]
    (answer,) = bot.adapter.activity_buffer
    assert answer.text == "Answer to: take your time [1 messages]" and answer.reply_to_id == "question-7"
    assert len(model.requests) == 1  # the running call was adopted, not repeated
    bot.adapter.activity_buffer.clear()
    again = await bot.runtime.proactive.deliver(bot.adapter, reports[0].pending_key)  # a replayed activity
    assert not again.delivered and bot.adapter.activity_buffer == []
    model.delay_s = 0
    await bot.ask("and then?")
    assert [m["content"] for m in model.last_messages()][:2] == [
        "take your time",
        "Answer to: take your time [1 messages]",
    ]


def user_questions(model) -> list[str]:
    return [m["content"] for m in model.last_messages() if m["role"] == "user"]


async def test_a_bare_slash_is_an_unknown_command_and_the_history_stays(bot, model):
    await bot.ask("remember this")
    replies = await bot.ask("/")
    assert replies[0].startswith("I don't know the command `/`")
    await bot.ask("and now?")
    assert user_questions(model) == ["remember this", "and now?"]


async def test_two_messages_of_one_conversation_at_once_are_both_remembered(bot, model):
    model.delay_s = 0.2  # both turns are in the model at once, and save one after the other
    answers = await asyncio.gather(bot.ask("first"), bot.ask("second"))
    model.delay_s = 0
    await bot.ask("third")
    replies = [text for sent in answers for text in sent]
    assert APOLOGY not in replies and TRY_AGAIN not in replies
    assert sorted(user_questions(model)[:2]) == ["first", "second"] and user_questions(model)[2:] == ["third"]


async def test_a_slow_answer_posted_while_a_follow_up_is_answered_keeps_both_turns(make_bot, model):
    bot = make_bot(BOT_ACK_AFTER_S=0.5)
    # The slow question lands at ~0.8 s, while the follow-up (asked at ~0.5 s, answered inline within the
    # acknowledgement time) is still in the model: it saves after the slow answer's delivery did.
    model.delays = [0.8, 0.4]
    assert await bot.ask("slow one", id="q-1") == [ACKNOWLEDGEMENT]
    during = await bot.ask("quick follow-up", id="q-2")  # what the channel got meanwhile, both answers
    await asyncio.gather(*bot.scheduler.tasks)
    assert sorted(text.split(" [")[0] for text in during) == [
        "Answer to: quick follow-up",
        "Answer to: slow one",
    ]
    await bot.ask("and then?")
    assert sorted(user_questions(model)[:2]) == ["quick follow-up", "slow one"]


async def test_a_slow_answer_the_channel_did_not_take_is_kept_for_the_retry_and_the_history_stays(
    make_bot, model, monkeypatch
):
    bot = make_bot(BOT_ACK_AFTER_S=0.05)
    await bot.ask("remember this")
    model.delay_s = 0.3
    assert await bot.ask("slow one", id="q-9") == [ACKNOWLEDGEMENT]
    connector_down = ConnectionError("the Bot Connector did not answer")

    async def refuse(context, activities):
        raise connector_down

    with monkeypatch.context() as down:
        down.setattr(bot.adapter, "send_activities", refuse)
        with pytest.raises(ConnectionError):  # raised to Durable, which retries the delivery
            await asyncio.gather(*bot.scheduler.tasks)
    key = "test/pending/Convo1/q-9"
    assert key in bot.runtime.store.memory  # nothing was sent, so nothing was dropped

    report = await bot.runtime.proactive.deliver(bot.adapter, key)  # the retry, with the channel back

    assert report.delivered and bot.adapter.activity_buffer[-1].text.startswith("Answer to: slow one")
    model.delay_s = 0
    await bot.ask("and then?")
    assert user_questions(model) == ["remember this", "slow one", "and then?"]


async def test_a_slow_answer_to_a_question_asked_before_a_reset_is_posted_but_not_remembered(make_bot, model):
    bot = make_bot(BOT_ACK_AFTER_S=0.05)
    model.delay_s = 0.4
    assert await bot.ask("slow one", id="q-r") == [ACKNOWLEDGEMENT]
    model.delay_s = 0
    assert (await bot.ask("/reset"))[0].startswith("Done: I've forgotten")
    await asyncio.gather(*bot.scheduler.tasks)
    assert bot.adapter.activity_buffer[-1].text.startswith("Answer to: slow one")  # still answered
    await bot.ask("after the reset")
    assert user_questions(model) == ["after the reset"]  # ...but forgotten, as /reset promised


class FailingRuns:
    async def latest_run(self):
        raise Exception("The operation failed with an unexpected status code 500")  # as the Durable client


async def test_status_when_the_task_hub_answers_with_an_error_says_unknown_and_keeps_the_history(
    make_bot, model
):
    bot = make_bot(runs=FailingRuns())
    await bot.ask("remember this")
    (status,) = await bot.ask("/status")
    assert "**Latest fine-tune run:** unknown (the Durable task hub answered with an error)" in status
    await bot.ask("and now?")
    assert user_questions(model) == ["remember this", "and now?"]


async def test_a_failed_turn_apologises_and_clears_the_conversation_state(bot, model):
    await bot.ask("remember this")
    key = "test/conversations/Convo1"
    bot.runtime.store.memory[key]["chat"] = {"turns": "not a list"}  # state the bot cannot read
    assert await bot.ask("and now?") == [APOLOGY]
    assert [name for name in bot.runtime.store.memory[key] if name != "e_tag"] == []  # cleared
    assert await bot.ask("fresh start") == ["Answer to: fresh start [1 messages]"]


async def test_seen_activity_ids_are_forgotten_once_stale():
    store = MemoryStore()
    assert await store.claim("test/activities/c/1", {}, stale_after_s=60)
    assert not await store.claim("test/activities/c/1", {}, stale_after_s=60)
    assert await store.claim("test/activities/c/2", {}, stale_after_s=0)  # drops every stale claim
    assert list(store.claims) == ["test/activities/c/2"]


class CountingStore(MemoryStore):
    """MemoryStore that counts writes per key."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[str] = Counter()

    async def write(self, changes) -> None:
        self.writes.update(changes.keys())
        await super().write(changes)


async def test_conversation_state_is_written_only_when_a_turn_changes_it(backend, model):
    store = CountingStore()
    runtime = create_runtime(settings(), backend=lambda: backend, store=store)
    bot = Harness(runtime)
    key = "test/conversations/Convo1"
    try:
        await bot.ask("first question")  # a new turn in the history
        assert store.writes[key] == 1
        await bot.ask("/help")  # reads the history, changes nothing
        assert store.writes[key] == 1
        await bot.ask("/route flow")  # this conversation's route
        assert store.writes[key] == 2
        assert store.memory[key]["chat"]["route"] == "flow"
    finally:
        await runtime.close()


def test_state_that_is_not_plain_json_is_still_checked_for_changes():
    from bot.conversation import _JsonCachedState

    plain = _JsonCachedState({"chat": {"turns": [], "route": None}})
    assert not plain.is_changed
    plain.state["chat"]["route"] = "direct"
    assert plain.is_changed
    odd = _JsonCachedState({"tags": {"a"}})  # a set: botbuilder's own fingerprint takes over
    assert not odd.is_changed
    odd.state["tags"].add("b")
    assert odd.is_changed
