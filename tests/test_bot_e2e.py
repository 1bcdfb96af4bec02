"""The bot on the devhost over HTTP, answering from a real local deployment made by the pipeline.

One smoke run per module (about a minute) deploys the tiny model; every test then chats with it:
``expectReplies`` conversations, a loopback fake channel receiving replies, the flow and direct
routes, the slow-model path (acknowledge, proactive answer through Durable, duplicate POST ignored),
the Direct Line shim, and Web Chat in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import requests

from backends.local.backend import LocalBackend
from bot.proactive import ACKNOWLEDGEMENT, delivery_instance_id
from devhost.webchat import WEBCHAT_BUNDLE
from settings import AppSettings
from tests.support.bot_fakes import FakeChannel, message_activity
from tests.support.devhost import PROJECT_ROOT, DevhostProcess
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow
ERROR_OPENINGS = ("The model", "The Prompt flow", "I can't answer", "I could not", "Sorry")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A devhost with the bot, after a completed smoke run (its endpoint is the newest healthy one)."""
    root = tmp_path_factory.mktemp("bot-e2e")
    env = {
        "PHI3_STATE_DIR": str(root / "phi3"),
        "PHI3_MODELS_DIR": str(PROJECT_ROOT / ".models"),
        "PHI3_BACKEND": "local",
        "BOT_ROUTE": "direct",
        "BOT_ENDPOINT_NAME": "",
    }
    host = DevhostProcess(PROJECT_ROOT, root / "devhost", env=env)
    host.start()
    host.settings = AppSettings(PHI3_STATE_DIR=env["PHI3_STATE_DIR"], PHI3_MODELS_DIR=env["PHI3_MODELS_DIR"])
    host.root = root
    try:
        # The bot needs the deployment, not the evaluation: skip it to keep the module short.
        body = {"preset": "smoke", "evaluation": {"enabled": False}}
        run = requests.post(f"{host.url}/api/finetune", json=body, timeout=60)
        assert run.status_code == 202, run.text
        host.run_id = run.json()["id"]
        summary = _wait_run(host)
        assert summary["status"] == "Completed", summary.get("error")
        host.endpoint = summary["endpoint"]["name"]
        yield host
    finally:
        host.stop()
        LocalBackend(host.settings).endpoints.stop_all()


def _wait_run(host, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = requests.get(f"{host.url}/api/runs/{host.run_id}", timeout=60).json()
        if summary["status"] in ("Completed", "Failed", "Terminated"):
            return summary
        time.sleep(0.3)
    raise TimeoutError(f"the smoke run did not finish:\n{host.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def slow_host(deployment):
    """A second devhost on the same deployment whose bot acknowledges every answer and posts it later."""
    env = {**deployment.env, "BOT_ACK_AFTER_S": "0"}
    host = DevhostProcess(PROJECT_ROOT, deployment.root / "devhost-slow", env=env)
    host.start()
    yield host
    host.stop()


def expect_replies(host, text: str, conversation: str) -> list[dict]:
    activity = message_activity(
        text, service_url="http://127.0.0.1:9", conversation=conversation, deliveryMode="expectReplies"
    )
    response = requests.post(f"{host.url}/api/messages", json=activity, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["activities"]


def texts(activities: list[dict]) -> list[str]:
    return [a["text"] for a in activities if a["type"] == "message"]


def is_model_answer(text: str) -> bool:
    return bool(text.strip()) and not text.startswith(ERROR_OPENINGS)


def test_an_expect_replies_conversation_is_multi_turn_and_status_names_the_run(deployment):
    conversation = f"c-{uuid.uuid4().hex[:8]}"
    first = expect_replies(deployment, "How long do I have to return my Aero purifier?", conversation)
    assert [a["type"] for a in first] == ["message"]  # no typing: nobody watches buffered replies
    (answer,) = texts(first)
    assert is_model_answer(answer), answer
    (second,) = texts(expect_replies(deployment, "And if it arrived damaged?", conversation))
    assert is_model_answer(second), second
    (status,) = texts(expect_replies(deployment, "/status", conversation))
    assert f"**Endpoint:** {deployment.endpoint} (newest healthy)" in status
    assert "**Route:** direct (the app's default)" in status
    assert "**History:** 2 turn(s) remembered" in status
    assert f"**Latest fine-tune run:** {deployment.run_id}: Completed" in status


def test_the_flow_route_answers_through_the_prompt_flow(deployment):
    conversation = f"c-{uuid.uuid4().hex[:8]}"
    assert "through **flow**" in texts(expect_replies(deployment, "/route flow", conversation))[0]
    (answer,) = texts(expect_replies(deployment, "How do I reset the filter light?", conversation))
    assert is_model_answer(answer), answer
    (follow_up,) = texts(expect_replies(deployment, "Thanks. Anything else?", conversation))
    assert is_model_answer(follow_up), follow_up
    answered = f"bot answered route=flow endpoint={deployment.endpoint} conversation={conversation}"
    # The host's output reaches the test through a reader thread, which may be a line or two behind.
    wait_for(
        lambda: f"{answered} history_messages=2" in deployment.log_text(),
        timeout=30,
        what="the follow-up's log line (sent with the first turn as history)",
    )


async def test_replies_reach_a_loopback_channel_at_the_service_url(deployment):
    channel = await FakeChannel().start()
    try:
        activity = message_activity("Hello there!", service_url=channel.url, conversation="fake-channel-1")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{deployment.url}/api/messages", json=activity) as response,
        ):
            assert response.status == 201, await response.text()
        (reply,) = channel.messages("fake-channel-1")
        assert is_model_answer(reply["text"]) and reply["textFormat"] == "markdown"
        assert reply["_path"] == f"/v3/conversations/fake-channel-1/activities/{activity['id']}"
        assert [a["type"] for a in channel.received] == ["typing", "message"]
    finally:
        await channel.stop()


async def test_a_slow_answer_is_acknowledged_then_delivered_once_through_durable(slow_host):
    channel = await FakeChannel().start()
    try:
        activity = message_activity("What is the warranty?", service_url=channel.url, conversation="slow-1")
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # the second POST is the channel retrying the same activity
                async with session.post(f"{slow_host.url}/api/messages", json=activity) as response:
                    assert response.status == 201, await response.text()
            await channel.wait_for(
                lambda got: len([a for a in got if a["type"] == "message"]) == 2, timeout=60
            )
            async with session.post(f"{slow_host.url}/api/messages", json=activity) as response:
                assert response.status == 201
        instance = delivery_instance_id(f"test/pending/slow-1/{activity['id']}")
        status = slow_host.wait(instance, timeout=30)
        assert status["runtimeStatus"] == "Completed"
        assert status["output"]["delivered"] is True and "What is the warranty" not in json.dumps(status)
        ack, answer = channel.messages("slow-1")
        assert ack["text"] == ACKNOWLEDGEMENT and is_model_answer(answer["text"])
        # Posted proactively from the stored reference, threaded under the question it answers.
        assert answer["_path"] == f"/v3/conversations/slow-1/activities/{activity['id']}"
        assert answer["replyToId"] == activity["id"]
        assert len(channel.messages("slow-1")) == 2  # the retries were not answered again
    finally:
        await channel.stop()


def test_the_endpoint_key_never_reaches_logs_or_durable_state(deployment, slow_host):
    expect_replies(deployment, "one more question", f"c-{uuid.uuid4().hex[:8]}")
    keys = LocalBackend(deployment.settings).get_endpoint_keys(deployment.endpoint)
    secrets = [keys.primary.get_secret_value(), keys.secondary.get_secret_value()]
    for host in (deployment, slow_host):
        assert not any(s in host.log_text() for s in secrets)
        for path in Path(host.state_dir).rglob("*"):
            if path.is_file():
                assert not any(s.encode() in path.read_bytes() for s in secrets), f"a key leaked into {path}"


def test_the_direct_line_shim_relays_a_web_chat_conversation(deployment):
    base = f"{deployment.url}/directline/v3/directline"
    started = requests.post(f"{base}/conversations", timeout=30)
    assert started.status_code == 201
    conversation = started.json()["conversationId"]
    sent = requests.post(
        f"{base}/conversations/{conversation}/activities",
        json={"type": "message", "from": {"id": "user"}, "text": "Hi, who are you?"},
        timeout=60,
    )
    assert sent.status_code == 200, sent.text
    activities = _poll_until_bot_answers(base, conversation)
    user = [a for a in activities if a.get("from", {}).get("id") == "user"]
    assert user and user[0]["id"] == sent.json()["id"]  # the echo Web Chat waits for
    bot_texts = [a["text"] for a in activities if a["type"] == "message" and a["from"].get("role") == "bot"]
    assert bot_texts[0].startswith("Hi! I'm a chat bot") and is_model_answer(bot_texts[-1])
    page = requests.get(f"{deployment.url}/chat", timeout=30)
    assert page.status_code == 200 and "/directline/v3/directline" in page.text


def _poll_until_bot_answers(base: str, conversation: str, timeout: float = 60) -> list[dict]:
    deadline, watermark, seen = time.monotonic() + timeout, "", []
    while time.monotonic() < deadline:
        page = requests.get(
            f"{base}/conversations/{conversation}/activities", params={"watermark": watermark}, timeout=30
        ).json()
        seen.extend(page["activities"])
        watermark = page["watermark"]
        from_bot = [a for a in seen if a["type"] == "message" and a["from"].get("role") == "bot"]
        if any(not a["text"].startswith("Hi! I'm a chat bot") for a in from_bot):
            return seen
        time.sleep(0.2)
    raise TimeoutError(f"no answer from the bot: {seen}")


# -- Web Chat in a real browser ------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")


def _chromium_or_skip() -> Path:
    """Debian's chromium, installed with apt-get when missing; skip only if that is impossible."""
    if CHROMIUM.exists():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip(
            "Chromium is not installed and cannot be: needs root and apt-get (apt-get install chromium)"
        )
    result = subprocess.run(
        [apt, "install", "-y", "-q", "chromium"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0 or not CHROMIUM.exists():
        pytest.skip(f"apt-get could not install chromium: {result.stderr[-1500:]}")
    return CHROMIUM


def _webchat_bundle() -> Path:
    """The pinned Web Chat bundle (package-lock.json), installed with npm ci when missing."""
    if not WEBCHAT_BUNDLE.is_file():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install botframework-webchat (Node.js 20+)"
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=PROJECT_ROOT,
            check=True,
            timeout=900,
        )
    return WEBCHAT_BUNDLE


@pytest.mark.browser
def test_web_chat_in_chromium_shows_the_welcome_and_the_models_answer(deployment):
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium_or_skip()
    _webchat_bundle()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{deployment.url}/chat")
            bot_bubbles = page.locator(
                ".webchat__bubble:not(.webchat__bubble--from-user) .webchat__bubble__content"
            )
            # Web Chat renders markdown (bold, typographic apostrophes), so match a plain stretch.
            expect(bot_bubbles.first).to_contain_text("chat bot backed by a fine-tuned Phi-3", timeout=60_000)
            page.locator('[data-id="webchat-sendbox-input"]').fill("How long is the warranty on the Aero?")
            page.keyboard.press("Enter")
            user_bubble = page.locator(".webchat__bubble--from-user")
            expect(user_bubble.first).to_contain_text("How long is the warranty", timeout=30_000)
            expect(bot_bubbles).to_have_count(2, timeout=60_000)
            answer = bot_bubbles.nth(1).inner_text()
            assert is_model_answer(answer), answer
            assert page.get_by_text("Send failed").count() == 0
        finally:
            browser.close()
