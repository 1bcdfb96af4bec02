"""The bot's ``flow`` route, turn by turn: the real chat flow (promptflow in-process) against a loopback
endpoint, and what the user and the log see when the flow or its endpoint fails.

A flow failure (``FlowError``: the flow folder does not load, its tool has a bug; ``FlowInputError``:
the question does not fit the flow's prompt budget) is answered with a short honest message and one
structured log line, is not remembered as an answer, and does not crash the turn.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bot.adapter import APOLOGY
from bot.routes import FlowRoute
from bot.runtime import create_runtime
from bot.storage import MemoryStore
from flows.runner import FLOW_DIR
from tests.support.bot_fakes import StubBackend, StubModel
from tests.test_bot_handler import Harness, settings
from tests.test_flow_runner import shared_promptflow_state

CONVERSATION_KEY = "test/conversations/Convo1"
FLOW_FAILED = "The Prompt flow failed while answering. An administrator can find why in the log."
FLOW_INPUT = (
    "The Prompt flow could not take this question with our history. Try a shorter question, or /reset "
    "to start over."
)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return shared_promptflow_state(tmp_path_factory)


@pytest.fixture
async def model():
    stub = await StubModel().start()
    yield stub
    await stub.stop()


@pytest.fixture
async def make_bot(model, state_dir):
    backend = StubBackend()
    backend.add("ep-new", model, created_at="2031-01-01T00:00:00Z")
    made = []

    def make(*, flow_dir: Path | None = None, **values) -> Harness:
        app_settings = settings(BOT_ROUTE="flow", PHI3_STATE_DIR=str(state_dir), **values)
        routes = None
        if flow_dir is not None:  # the app's routes, with another flow folder in place of flows/phi3_chat
            routes = {
                "flow": FlowRoute(
                    temperature=0.7, max_new_tokens=64, timeout_s=30, flow_dir=flow_dir, state_dir=state_dir
                )
            }
        runtime = create_runtime(app_settings, backend=lambda: backend, store=MemoryStore(), routes=routes)
        made.append(runtime)
        return Harness(runtime)

    yield make
    for runtime in made:
        await runtime.close()


def remembered_turns(bot: Harness) -> list:
    return bot.runtime.store.memory.get(CONVERSATION_KEY, {}).get("chat", {}).get("turns", [])


def copy_of_the_flow(tmp_path: Path) -> Path:
    flow = tmp_path / "phi3_chat"
    shutil.copytree(FLOW_DIR, flow, ignore=shutil.ignore_patterns(".promptflow", "__pycache__"))
    return flow


def flow_whose_tool_has_a_bug(tmp_path: Path) -> Path:
    flow = copy_of_the_flow(tmp_path)
    tool = flow / "integrate_with_promptflow.py"
    source = tool.read_text()
    call = "    endpoint, key = _endpoint_and_key(connection)\n"
    assert call in source
    tool.write_text(source.replace(call, "    raise KeyError('chat_template')  # a bug in the tool\n" + call))
    return flow


def flow_that_does_not_load(tmp_path: Path) -> Path:
    flow = copy_of_the_flow(tmp_path)
    dag = flow / "flow.dag.yaml"
    dag.write_text(dag.read_text().replace("path: integrate_with_promptflow.py", "path: no_such_tool.py"))
    return flow


async def test_the_flow_route_answers_through_the_prompt_flow_with_the_history(make_bot, model):
    bot = make_bot()
    assert await bot.ask("Who makes the Aero?") == ["Answer to: Who makes the Aero? [1 messages]"]
    await bot.ask("And its warranty?")
    assert [m["content"] for m in model.last_messages()] == [
        "Who makes the Aero?",
        "Answer to: Who makes the Aero? [1 messages]",
        "And its warranty?",
    ]
    assert len(remembered_turns(bot)) == 2


@pytest.mark.parametrize(
    ("broken_flow", "logged"),
    [
        (flow_whose_tool_has_a_bug, "the flow's tool failed: KeyError: 'chat_template'"),
        (flow_that_does_not_load, "cannot load the flow in"),
    ],
    ids=["tool bug", "flow does not load"],
)
async def test_a_failing_flow_gets_a_short_honest_reply_and_one_structured_log_line(
    make_bot, model, tmp_path, caplog, broken_flow, logged
):
    bot = make_bot(flow_dir=broken_flow(tmp_path))
    assert await bot.ask("hello?") == [FLOW_FAILED]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bot answer failed")]
    assert line.startswith(
        "bot answer failed kind=flow_failed route=flow endpoint=ep-new conversation=Convo1"
    )
    assert logged in line and "duration_ms=" in line
    assert model.key not in caplog.text
    assert model.requests == [] and remembered_turns(bot) == []
    assert APOLOGY not in await bot.ask("still there?")  # a flow failure is answered, not a crashed turn


async def test_a_question_over_the_flows_prompt_budget_is_refused_by_the_flow_and_explained(
    make_bot, model, caplog
):
    bot = make_bot(BOT_MAX_QUESTION_CHARS=20_000)  # more than the flow's max_prompt_chars (9000)
    await bot.ask("first question")
    assert await bot.ask("x" * 9_500) == [FLOW_INPUT]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bot answer failed")]
    assert line.startswith("bot answer failed kind=flow_input route=flow endpoint=ep-new")
    assert "max_prompt_chars=9000" in line
    assert len(model.requests) == 1  # only the first question reached the endpoint
    assert len(remembered_turns(bot)) == 1  # the refused question is not remembered


async def test_a_busy_endpoint_behind_the_flow_is_reported_like_on_the_direct_route(make_bot, model, caplog):
    bot = make_bot()
    model.status, model.retry_after = 429, "7"
    assert await bot.ask("hello?") == [
        "The model is busy right now (too many requests). Please try again in about 7 seconds."
    ]
    assert "bot answer failed kind=throttled route=flow endpoint=ep-new" in caplog.text
    assert "status=429" in caplog.text and remembered_turns(bot) == []
