"""kill -9 the devhost mid-orchestration; a restart resumes every instance from its stored state."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.support.devhost import DurableAppHost
from tests.support.polling import wait_for


@pytest.fixture
def host(tmp_path):
    proc = DurableAppHost(tmp_path)
    proc.start()
    yield proc
    proc.stop()


def test_killed_host_resumes_mid_chain_without_rerunning_completed_steps(host):
    iid = host.start_orchestration("long_steps", {"steps": 4, "seconds": 1.0})
    # Kill while step 1 runs: step 0 is recorded as completed, step 1 is in flight.
    wait_for(
        lambda: any(r["step"] == 1 for r in host.records("slow_step_start")),
        timeout=30,
        what="step 1 to start",
    )
    host.kill()
    host.start()
    status = host.wait(iid, timeout=60)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == [f"step {i} done" for i in range(4)]
    finished = Counter(r["step"] for r in host.records("slow_step"))
    started = Counter(r["step"] for r in host.records("slow_step_start"))
    assert finished == {0: 1, 1: 1, 2: 1, 3: 1}
    assert started[0] == 1  # a completed step is never re-run
    assert started[1] == 2  # the in-flight one is re-run: activities are at-least-once


def test_pending_durable_timer_fires_after_a_restart(host):
    iid = host.start_orchestration("timer_then_hello", {"seconds": 3})
    host.wait(iid, until=lambda s: s["runtimeStatus"] == "Running")
    host.kill()
    host.start()
    out = host.wait(iid, timeout=30)["output"]
    assert out["greeting"] == "Hello after timer!"
    assert len(host.records("say_hello")) == 1


def test_instances_started_while_down_are_not_lost_and_terminal_ones_stay_terminal(host):
    done = host.start_orchestration("hello_chain", ["one"])
    host.wait(done)
    running = host.start_orchestration("approval", {"timeout": 120})
    host.wait(running, until=lambda s: s["runtimeStatus"] == "Running")
    host.kill()
    host.start()
    assert host.status(done).json()["runtimeStatus"] == "Completed"
    assert host.status(running).json()["runtimeStatus"] == "Running"
    import requests

    requests.post(
        f"{host.durable}/instances/{running}/raiseEvent/Approval", json=json.dumps({"ok": True}), timeout=10
    )
    assert host.wait(running)["output"]["approved"] is True
    assert len(host.records("say_hello")) == 1
