"""The devhost runs the Durable features of a real v2-model app over real HTTP.

One devhost serves the whole module; instance ids are unique per test.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
import uuid

import pytest
import requests

from devhost.durable.history import EventType
from tests.support.devhost import DevhostProcess, DurableAppHost
from tests.support.polling import wait_for


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    proc = DurableAppHost(tmp_path_factory.mktemp("durable"), timer_schedule="*/2 * * * * *")
    proc.start()
    yield proc
    proc.stop()


def start_via_app(host: DevhostProcess, name: str, payload=None) -> dict:
    """Start through the app's own HTTP starter: the real DurableOrchestrationClient talks to the host."""
    r = requests.post(f"{host.url}/api/orchestrators/{name}", json=payload, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()


def test_http_starter_answers_with_the_check_status_payload(host):
    payload = start_via_app(host, "hello_chain", ["Tokyo", "Seattle"])
    assert set(payload) >= {
        "id",
        "statusQueryGetUri",
        "sendEventPostUri",
        "terminatePostUri",
        "purgeHistoryDeleteUri",
    }
    status = requests.get(payload["statusQueryGetUri"], timeout=10)
    assert status.status_code in (200, 202)
    done = host.wait(payload["id"])
    assert done["runtimeStatus"] == "Completed"
    assert done["output"] == ["Hello Tokyo!", "Hello Seattle!"]


def test_function_chaining_runs_activities_in_order(host):
    iid = host.start_orchestration("hello_chain", ["a", "b", "c"])
    assert host.wait(iid)["output"] == ["Hello a!", "Hello b!", "Hello c!"]
    history = host.status(iid, showHistory=True, showHistoryOutput=True).json()["historyEvents"]
    completed = [e for e in history if e["EventType"] == "TaskCompleted"]
    assert [json.loads(e["Result"]) for e in completed] == ["Hello a!", "Hello b!", "Hello c!"]
    assert all(e["FunctionName"] == "say_hello" for e in completed)


def test_fan_out_fan_in_of_150_activities(host):
    iid = host.start_orchestration("fan_out", {"count": 150})
    assert host.wait(iid, timeout=120)["output"] == {"count": 150, "sum": sum(i * i for i in range(150))}


def test_retry_succeeds_after_transient_failures(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration("retrying", {"key": key, "failures": 2, "attempts": 4})
    assert host.wait(iid)["output"] == {"ok": True, "result": "ok after 3"}
    attempts = [r["attempt"] for r in host.records("flaky") if r["key"] == key]
    assert attempts == [1, 2, 3]


def test_exhausted_retries_surface_as_a_catchable_exception(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration("retrying", {"key": key, "failures": 10, "attempts": 3})
    out = host.wait(iid)["output"]
    assert out["ok"] is False
    assert "Activity function 'flaky' failed: ConnectionError: transient failure 3" in out["error"]
    assert len([r for r in host.records("flaky") if r["key"] == key]) == 3


def attempts_of(host: DevhostProcess, key: str) -> list[int]:
    return [r["attempt"] for r in host.records("flaky") if r["key"] == key]


def scheduled_ids(host: DevhostProcess, iid: str) -> dict[str, list[int]]:
    """The task ids the host recorded, by event type, read from its store (the API folds them away)."""
    db = sqlite3.connect(f"file:{host.state_dir / 'DevhostTestHub.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT event FROM history WHERE instance_id = ? ORDER BY seq", (iid,)).fetchall()
    finally:
        db.close()
    ids: dict[str, list[int]] = {}
    for (text,) in rows:
        event = json.loads(text)
        kind = EventType(event["EventType"]).name
        if kind in ("TaskScheduled", "TimerCreated", "SubOrchestrationInstanceCreated"):
            ids.setdefault(kind, []).append(event["EventId"])
    return ids


def test_retried_activities_inside_task_all_each_retry_until_they_succeed(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration("retrying_fan_out", {"key": key, "failures": [0, 2, 1, 3], "attempts": 5})
    out = host.wait(iid)["output"]
    assert out == {"ok": True, "results": ["ok after 1", "ok after 3", "ok after 2", "ok after 4"]}
    for i, failures in enumerate([0, 2, 1, 3]):
        assert attempts_of(host, f"{key}-a{i}") == list(range(1, failures + 2))  # no attempt lost or repeated
    ids = scheduled_ids(host, iid)
    assert len(ids["TaskScheduled"]) == 10  # 1 + 3 + 2 + 4 attempts
    assert len(ids["TimerCreated"]) == 6  # one retry timer per failure
    every_id = ids["TaskScheduled"] + ids["TimerCreated"]
    assert len(set(every_id)) == len(every_id)  # the SDK's numbering: no id used twice


def test_an_exhausted_retry_inside_task_all_fails_it_and_can_be_caught(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration("retrying_fan_out", {"key": key, "failures": [0, 9], "attempts": 3})
    out = host.wait(iid)["output"]
    assert out["ok"] is False
    assert "Activity function 'flaky' failed: ConnectionError: transient failure 3" in out["error"]
    assert attempts_of(host, f"{key}-a1") == [1, 2, 3]


def test_sub_orchestration_with_retry_runs_each_attempt_as_a_new_child(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration("retrying_child", {"key": key, "failures": 2, "attempts": 4})
    assert host.wait(iid)["output"] == {"ok": True, "result": "ok after 3"}
    assert attempts_of(host, key) == [1, 2, 3]
    children = requests.get(
        f"{host.durable}/instances/", params={"instanceIdPrefix": iid + ":"}, timeout=10
    ).json()
    assert sorted(c["runtimeStatus"] for c in children) == ["Completed", "Failed", "Failed"]
    assert len(scheduled_ids(host, iid)["SubOrchestrationInstanceCreated"]) == 3


def test_exhausted_sub_orchestration_retries_surface_the_childs_failure(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration("retrying_child", {"key": key, "failures": 9, "attempts": 2})
    out = host.wait(iid)["output"]
    assert out["ok"] is False
    assert out["error"].startswith("Orchestrator function 'flaky_child' failed: ")
    assert "transient failure 2" in out["error"]
    assert attempts_of(host, key) == [1, 2]


def test_task_all_of_retried_activities_and_retried_sub_orchestrations_completes(host):
    key = uuid.uuid4().hex
    iid = host.start_orchestration(
        "retrying_fan_out", {"key": key, "failures": [1, 2], "child_failures": [2, 0], "attempts": 4}
    )
    out = host.wait(iid)["output"]
    assert out == {"ok": True, "results": ["ok after 2", "ok after 3", "ok after 3", "ok after 1"]}
    assert [attempts_of(host, f"{key}-{k}") for k in ("a0", "a1", "c0", "c1")] == [
        [1, 2],
        [1, 2, 3],
        [1, 2, 3],
        [1],
    ]
    ids = scheduled_ids(host, iid)
    assert len(ids["SubOrchestrationInstanceCreated"]) == 4  # 3 attempts + 1
    every_id = [i for group in ids.values() for i in group]
    assert len(set(every_id)) == len(every_id)


def test_activity_exception_reaches_the_orchestrator(host):
    iid = host.start_orchestration("catches_failure")
    caught = host.wait(iid)["output"]["caught"]
    assert "Activity function 'explode' failed: ValueError: bad input 42" in caught


def test_uncaught_activity_failure_fails_the_instance_with_the_extension_text(host):
    iid = host.start_orchestration("fails")
    status = host.wait(iid)
    assert status["runtimeStatus"] == "Failed"
    assert status["output"].startswith("Orchestrator function 'fails' failed: ")
    assert "ValueError: unrecoverable" in status["output"]


def test_unknown_activity_fails_with_a_clear_message(host):
    status = host.wait(host.start_orchestration("calls_unknown"))
    assert status["runtimeStatus"] == "Failed"
    assert "The function 'no_such_activity' doesn't exist" in status["output"]


def test_async_activity_runs_on_the_host_loop(host):
    assert host.wait(host.start_orchestration("async_activity"))["output"] == {"echo": {"n": 1}}


def test_durable_timer_delays_the_orchestration(host):
    iid = host.start_orchestration("timer_then_hello", {"seconds": 2})
    running = host.wait(iid, until=lambda s: s["runtimeStatus"] == "Running")
    assert running["runtimeStatus"] == "Running"
    out = host.wait(iid)["output"]
    assert out["greeting"] == "Hello after timer!"
    assert out["elapsed"] >= 2.0  # orchestration time moves to (at least) the timer's fire time


def test_external_event_wins_the_race_against_its_timeout(host):
    iid = host.start_orchestration("approval", {"timeout": 60})
    host.wait(iid, until=lambda s: (s["customStatus"] or {}).get("stage") == "waiting for approval")
    # Raise through the app's function: the real client double-encodes the payload.
    r = requests.post(f"{host.url}/api/events/{iid}/Approval", json={"by": "alice"}, timeout=10)
    assert r.status_code == 202
    done = host.wait(iid)
    assert done["output"]["approved"] is True
    assert json.loads(done["output"]["payload"]) == {"by": "alice"}  # what the real host delivers
    assert done["customStatus"] == {"stage": "approved"}


def test_timeout_wins_when_no_event_arrives(host):
    iid = host.start_orchestration("approval", {"timeout": 1})
    done = host.wait(iid)
    assert done["output"] == {"approved": False}
    assert done["customStatus"] == {"stage": "timed out"}


def test_sub_orchestrations_succeed_and_fail_independently(host):
    iid = host.start_orchestration("parent", [3, -1, 4])
    out = host.wait(iid)["output"]
    assert out[0] == 9 and out[2] == 16
    assert out[1].startswith("failed: Orchestrator function 'child_square' failed: negative input -1")
    children = requests.get(
        f"{host.durable}/instances/", params={"instanceIdPrefix": iid + ":"}, timeout=10
    ).json()
    assert sorted(c["runtimeStatus"] for c in children) == ["Completed", "Completed", "Failed"]


def test_continue_as_new_resets_history_each_generation(host):
    iid = host.start_orchestration("counter", {"n": 0, "limit": 25})
    out = host.wait(iid)["output"]
    assert out["final"] == 25
    assert out["history_length"] <= 4  # a fresh [OrchestratorStarted, ExecutionStarted, ...] each generation


def test_a_custom_status_over_16_kb_of_utf16_fails_the_orchestration_as_the_extension_does(host):
    # {"filler":"..."} is 13 characters plus the filler; UTF-16 doubles it; the extension rounds down
    # to whole KB and refuses more than 16: 8,690 filler characters are 16 KB, 8,691 are 17 KB.
    fits = host.wait(host.start_orchestration("growing_status", {"sizes": [8690]}))
    assert fits["runtimeStatus"] == "Completed" and len(fits["customStatus"]["filler"]) == 8690

    failed = host.wait(host.start_orchestration("growing_status", {"sizes": [100, 8691]}))
    assert failed["runtimeStatus"] == "Failed"
    assert "must not exceed 16 KB. The current payload size is 17 KB" in failed["output"]
    assert failed["customStatus"] == {"filler": "x" * 100}  # the refused one was never stored


def test_custom_status_is_visible_while_running(host):
    iid = host.start_orchestration("long_steps", {"steps": 3, "seconds": 0.5})
    seen = host.wait(
        iid, until=lambda s: s["runtimeStatus"] == "Running" and s["customStatus"] == {"step": 1}
    )
    assert seen["customStatus"] == {"step": 1}
    assert host.wait(iid)["runtimeStatus"] == "Completed"


def test_terminate_stops_an_instance_and_keeps_the_reason(host):
    iid = host.start_orchestration("waits_forever")
    host.wait(iid, until=lambda s: s["customStatus"] == "waiting")
    r = requests.post(
        f"{host.durable}/instances/{iid}/terminate", params={"reason": "no longer needed"}, timeout=10
    )
    assert r.status_code == 202
    status = host.wait(iid)
    assert status["runtimeStatus"] == "Terminated"
    assert status["output"] == "no longer needed"
    again = requests.post(f"{host.durable}/instances/{iid}/terminate", params={"reason": "x"}, timeout=10)
    assert again.status_code == 410


def test_terminate_is_queued_behind_an_episode_under_way_which_still_commits_what_it_decided(host, tmp_path):
    # The extension queues a terminate: until the instance's next episode applies it, the instance reads
    # as before, and an episode already running commits its decisions (here: an activity that then runs,
    # its result dropped). A client that must act once the instance has ended waits for it to read so.
    gate = tmp_path / "decide"
    iid = host.start_orchestration("decides_slowly", {"gate": str(gate)})
    wait_for(
        lambda: any(r["instance"] == iid for r in host.records("deciding")),
        timeout=20,
        what="the first episode under way",
    )
    r = requests.post(f"{host.durable}/instances/{iid}/terminate", params={"reason": "canceled"}, timeout=10)
    assert r.status_code == 202
    assert host.status(iid).json()["runtimeStatus"] == "Pending"  # queued behind its first episode

    gate.touch()
    status = host.wait(iid)

    assert (status["runtimeStatus"], status["output"]) == ("Terminated", "canceled")
    wait_for(
        lambda: any(r["step"] == iid for r in host.records("slow_step")),
        timeout=20,
        what="the activity the episode scheduled before the terminate was applied",
    )
    history = requests.get(f"{host.durable}/instances/{iid}", params={"showHistory": "true"}, timeout=10)
    kinds = [e["EventType"] for e in history.json()["historyEvents"]]
    assert kinds.index("TaskScheduled") < kinds.index("ExecutionTerminated")


def test_raise_event_after_completion_is_gone(host):
    iid = host.start_orchestration("hello_chain", ["x"])
    host.wait(iid)
    r = requests.post(f"{host.durable}/instances/{iid}/raiseEvent/Late", json=json.dumps({}), timeout=10)
    assert r.status_code == 410


def test_purge_deletes_a_finished_instance(host):
    iid = host.start_orchestration("hello_chain", ["x"])
    host.wait(iid)
    r = requests.delete(f"{host.durable}/instances/{iid}", timeout=10)
    assert r.status_code == 200 and r.json() == {"instancesDeleted": 1}
    assert host.status(iid).status_code == 404


def test_purge_refuses_a_running_instance(host):
    iid = host.start_orchestration("waits_forever")
    host.wait(iid, until=lambda s: s["runtimeStatus"] == "Running")
    assert requests.delete(f"{host.durable}/instances/{iid}", timeout=10).status_code == 404
    assert host.status(iid).json()["runtimeStatus"] == "Running"
    requests.post(f"{host.durable}/instances/{iid}/terminate", params={"reason": "cleanup"}, timeout=10)


def test_unknown_instance_is_404(host):
    assert host.status("does-not-exist").status_code == 404


def test_unknown_orchestrator_is_400_with_the_extension_message_shape(host):
    r = requests.post(f"{host.durable}/orchestrators/nope", timeout=10)
    assert r.status_code == 400
    assert "The function 'nope' doesn't exist" in r.json()["ExceptionMessage"]


def test_starting_a_running_instance_id_again_is_refused(host):
    iid = f"fixed-{uuid.uuid4().hex[:8]}"
    host.start_orchestration("waits_forever", instance_id=iid)
    r = requests.post(f"{host.durable}/orchestrators/waits_forever/{iid}", timeout=10)
    assert r.status_code == 409
    requests.post(f"{host.durable}/instances/{iid}/terminate", params={"reason": "cleanup"}, timeout=10)


def test_suspend_holds_events_until_resume(host):
    iid = host.start_orchestration("approval", {"timeout": 120})
    host.wait(iid, until=lambda s: s["runtimeStatus"] == "Running")
    assert requests.post(f"{host.durable}/instances/{iid}/suspend", timeout=10).status_code == 202
    requests.post(
        f"{host.durable}/instances/{iid}/raiseEvent/Approval", json=json.dumps({"ok": 1}), timeout=10
    )
    time.sleep(0.5)  # give a (wrong) host the chance to process the event while suspended
    assert host.status(iid).json()["runtimeStatus"] == "Suspended"
    assert requests.post(f"{host.durable}/instances/{iid}/resume", timeout=10).status_code == 202
    assert host.wait(iid)["output"]["approved"] is True


def test_a_suspend_that_lands_while_an_episode_runs_holds_after_that_episode_commits(host, tmp_path):
    # As on Azure, the episode under way commits its decisions; the instance stays Suspended (it was set
    # back to Running, and went on to finish while its status had said Suspended).
    started, gate = tmp_path / "started", tmp_path / "gate"
    iid = host.start_orchestration("slow_episode", {"started": str(started), "gate": str(gate)})
    wait_for(started.exists, timeout=60, what="the first episode to start")
    assert requests.post(f"{host.durable}/instances/{iid}/suspend", timeout=10).status_code == 202
    gate.touch()
    ran = lambda: [r for r in host.records("say_hello") if r["name"] == "gate"]  # noqa: E731
    wait_for(ran, timeout=60, what="the activity the episode scheduled")
    time.sleep(0.5)  # give a (wrong) host the chance to take the activity's result while suspended

    assert host.status(iid).json()["runtimeStatus"] == "Suspended"
    assert requests.post(f"{host.durable}/instances/{iid}/resume", timeout=10).status_code == 202
    assert host.wait(iid)["output"] == "Hello gate!"


def test_list_filters_by_status_and_prefix(host):
    prefix = f"list-{uuid.uuid4().hex[:6]}-"
    for i in range(3):
        host.start_orchestration("hello_chain", ["x"], instance_id=f"{prefix}{i}")
    for i in range(3):
        host.wait(f"{prefix}{i}")
    r = requests.get(
        f"{host.durable}/instances/",
        params={"instanceIdPrefix": prefix, "runtimeStatus": "Completed"},
        timeout=10,
    )
    assert sorted(s["instanceId"] for s in r.json()) == [f"{prefix}{i}" for i in range(3)]


def test_restart_runs_the_instance_again_with_its_input(host):
    iid = host.start_orchestration("hello_chain", ["again"])
    host.wait(iid)
    r = requests.post(
        f"{host.durable}/instances/{iid}/restart", params={"restartWithNewInstanceId": "true"}, timeout=10
    )
    assert r.status_code == 202
    new_id = r.json()["id"]
    assert new_id != iid
    assert host.wait(new_id)["output"] == ["Hello again!"]


def test_http_trigger_routes_params_methods_and_errors(host):
    r = requests.get(f"{host.url}/api/items/42", params={"q": "z"}, timeout=10)
    assert r.json() == {"id": 42, "q": "z"}
    assert requests.get(f"{host.url}/api/items/abc", timeout=10).text == "name=abc detail=None"
    assert requests.get(f"{host.url}/api/items/abc/more", timeout=10).text == "name=abc detail=more"
    assert requests.get(f"{host.url}/api/items/ab1", timeout=10).status_code == 404
    r = requests.put(f"{host.url}/api/files/a/b/c.txt", data="hi", headers={"x-test": "t"}, timeout=10)
    assert r.status_code == 201 and r.headers["X-Echo"] == "t"
    assert r.json() == {"path": "a/b/c.txt", "method": "PUT", "body": "hi"}
    assert requests.delete(f"{host.url}/api/files/a", timeout=10).status_code == 405


def test_a_failing_http_function_gets_a_bare_500_as_on_azure_and_its_error_goes_to_the_log(host):
    boom = requests.get(f"{host.url}/api/boom", timeout=10)
    assert (boom.status_code, boom.content) == (500, b"")
    wait_for(
        lambda: "RuntimeError: kaboom" in host.log_text(), timeout=10, what="the traceback in the host's log"
    )


@pytest.mark.parametrize(
    ("path", "param"),
    [("a%20b", "a b"), ("100%2541", "100%41"), ("x%252Fy", "x%2Fy"), ("caf%C3%A9", "café")],
)
def test_a_route_parameter_is_percent_decoded_once_as_the_functions_host_does(host, path, param):
    r = requests.get(f"{host.url}/api/files/{path}", timeout=10)
    assert r.status_code == 201, r.text
    assert r.json()["path"] == param


def test_timer_trigger_fires_on_its_ncrontab_cadence(host):
    deadline = time.monotonic() + 30
    while len(host.records("tick")) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    ticks = [r["t"] for r in host.records("tick")]
    assert len(ticks) >= 3
    # "*/2 * * * * *" fires on even seconds: never twice within the same 2-second slot.
    slots = [int(t) // 2 for t in ticks]
    assert len(slots) == len(set(slots))
    assert all(b - a >= 1.5 for a, b in itertools.pairwise(ticks))


def test_admin_endpoint_runs_a_timer_function_by_hand(host):
    before = len(host.records("tick"))
    r = requests.post(f"{host.url}/admin/functions/ticker", json={"input": ""}, timeout=10)
    assert r.status_code == 202
    deadline = time.monotonic() + 10
    while len(host.records("tick")) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(host.records("tick")) > before


def test_malformed_management_requests_get_a_clear_400(host):
    bad_json = requests.post(
        f"{host.durable}/orchestrators/hello_chain",
        data="{not json",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["Message"]
    bad_id = requests.post(f"{host.durable}/orchestrators/hello_chain/%40starts-with-at", timeout=10)
    assert bad_id.status_code == 400 and "must not start with '@'" in bad_id.json()["Message"]
    iid = host.start_orchestration("waits_forever")
    wrong_type = requests.post(
        f"{host.durable}/instances/{iid}/raiseEvent/never",
        data="x",
        headers={"Content-Type": "text/plain"},
        timeout=10,
    )
    assert wrong_type.status_code == 400
    no_filter = requests.delete(f"{host.durable}/instances/", timeout=10)
    assert no_filter.status_code == 400 and "createdTimeFrom" in no_filter.json()["Message"]
    requests.post(f"{host.durable}/instances/{iid}/terminate", params={"reason": "cleanup"}, timeout=10)
