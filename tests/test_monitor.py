"""The wait step's monitor: growing durable-timer intervals, continue-as-new, deadline — on the devhost."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.devhost import PROJECT_ROOT, DevhostProcess

APP = PROJECT_ROOT / "tests" / "apps" / "monitor_app"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    proc = DevhostProcess(
        APP, tmp_path_factory.mktemp("monitor") / "state", env={"PYTHONPATH": str(PROJECT_ROOT)}
    )
    proc.start()
    yield proc
    proc.stop()


def monitor_input(
    key, done_after, *, interval=0.05, max_seconds=0.2, per_generation=5, deadline_s=120, final="Completed"
):
    deadline = (datetime.now(UTC) + timedelta(seconds=deadline_s)).isoformat()
    return {
        "check": "scripted_status",
        "args": {"key": key, "done_after": done_after, "final": final},
        "interval_seconds": interval,
        "max_seconds": max_seconds,
        "backoff": 2.0,
        "deadline": deadline,
        "per_generation": per_generation,
    }


def test_monitor_polls_until_done_across_generations(host):
    iid = host.start_orchestration("wait_until_done", monitor_input("a", 12), instance_id="mon-a")
    out = host.wait(iid)["output"]
    assert out["status"] == "Completed" and out["ok"] is True
    assert out["polls"] == 12


def test_monitor_history_stays_flat_thanks_to_continue_as_new(host):
    iid = host.start_orchestration("wait_until_done", monitor_input("b", 23), instance_id="mon-b")
    host.wait(iid)
    db = sqlite3.connect(host.state_dir / "MonitorTestHub.sqlite")
    (events,) = db.execute("SELECT COUNT(*) FROM history WHERE instance_id = ?", (iid,)).fetchone()
    # 23 polls in one history would be ~180 events; a generation holds at most 5 polls.
    assert events < 60


def test_poll_interval_grows_up_to_its_maximum(host):
    iid = host.start_orchestration(
        "wait_until_done", monitor_input("c", 5, interval=0.05, max_seconds=0.2), instance_id="mon-c"
    )
    host.wait(iid)
    history = host.status(iid, showHistory=True).json()["historyEvents"]
    fired = [
        datetime.fromisoformat(e["FireAt"].replace("Z", "+00:00"))
        for e in history
        if e["EventType"] == "TimerFired"
    ]
    started = [
        datetime.fromisoformat(e["Timestamp"].replace("Z", "+00:00"))
        for e in history
        if e["EventType"] == "TaskCompleted"
    ]
    gaps = [(f - s).total_seconds() for s, f in zip(started, fired, strict=False)]
    assert len(gaps) == 4
    assert gaps[0] < gaps[1] < gaps[2]  # 0.05 → 0.1 → 0.2 ...
    assert gaps[3] <= 0.2 + 0.05  # ... capped at max_seconds


def test_failed_operation_is_reported_not_ok(host):
    out = host.wait(
        host.start_orchestration(
            "wait_until_done", monitor_input("d", 2, final="Failed"), instance_id="mon-d"
        )
    )["output"]
    assert out == {"done": True, "ok": False, "status": "Failed", "detail": {"poll": 2}, "polls": 2}


def test_a_long_error_is_cut_in_the_live_status_and_whole_in_the_result(host):
    args = monitor_input("long-error", 1, final="Failed")
    args["args"]["error"] = "the deployment failed: " + "stack frame\n" * 3000  # 36 KB of text
    done = host.wait(host.start_orchestration("wait_until_done", args, instance_id="mon-long-error"))

    assert done["runtimeStatus"] == "Completed"  # not failed by Durable's 16 KB custom status limit
    assert done["output"]["detail"]["error"] == args["args"]["error"]
    assert len(done["customStatus"]["error"]) <= 2000
    assert done["customStatus"]["error"].startswith("the deployment failed: stack frame")


def test_monitor_gives_up_at_its_deadline(host):
    out = host.wait(
        host.start_orchestration(
            "wait_until_done", monitor_input("e", 10_000, deadline_s=1), instance_id="mon-e"
        )
    )["output"]
    assert out["status"] == "TimedOut" and out["ok"] is False


def test_a_wait_past_its_deadline_says_why_as_the_error_the_wait_step_reports(host):
    args = monitor_input("timeout-says-why", 10_000, deadline_s=1)
    out = host.wait(host.start_orchestration("wait_until_done", args, instance_id="mon-timeout-why"))[
        "output"
    ]

    # orchestrators.finetune reports detail["error"] (else "ended TimedOut") as the step's error
    error = out["detail"]["error"]
    assert error.startswith(f"gave up waiting at {args['deadline']}: still Running after ")
    assert error.endswith(f"after {out['polls']} polls")


def test_live_progress_is_in_custom_status(host):
    iid = host.start_orchestration(
        "wait_until_done", monitor_input("f", 40, interval=0.1, max_seconds=0.1), instance_id="mon-f"
    )
    seen = host.wait(iid, until=lambda s: (s["customStatus"] or {}).get("polls", 0) >= 3)
    assert seen["customStatus"]["status"] == "Running"
    assert json.dumps(host.wait(iid)["output"])


def test_an_activity_past_host_jsons_function_timeout_fails_as_on_azure(host):
    # This app's host.json sets functionTimeout 00:00:02; Azure fails such an invocation (and restarts
    # the worker), which is why long steps hand back to the orchestrator instead of blocking.
    slow = host.wait(host.start_orchestration("calls_sleepy", 4))
    quick = host.wait(host.start_orchestration("calls_sleepy", 0.1))

    assert slow["output"].startswith("failed: Activity function 'sleepy' failed: FunctionTimeoutError:")
    assert "Timeout value of 00:00:02 exceeded by function 'Functions.sleepy'" in slow["output"]
    assert quick["output"] == "woke up"
