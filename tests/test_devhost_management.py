"""The Durable management API as the extension answers it: status flags and history, list filters and
paging, purge by filter, and terminate/raise/rewind/purge through the real DurableOrchestrationClient.

The client calls go through the test app's ``client/{op}`` HTTP function, so the SDK's own
``DurableOrchestrationClient`` builds each request and reads each answer, exactly as in an app.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

import pytest
import requests

from tests.support.devhost import DevhostProcess, DurableAppHost


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    proc = DurableAppHost(tmp_path_factory.mktemp("management"))
    proc.start()
    yield proc
    proc.stop()


def client(host: DevhostProcess, op: str, **args) -> dict:
    """One DurableOrchestrationClient call inside the app: ``{"result": ...}`` or ``{"error": ...}``."""
    r = requests.post(f"{host.url}/api/client/{op}", json=args, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}-"


def running(host: DevhostProcess, iid: str) -> dict:
    return host.wait(iid, until=lambda s: s["runtimeStatus"] == "Running")


def moment() -> datetime:
    """A boundary between creations: the host runs on this machine's clock."""
    time.sleep(0.05)
    now = datetime.now(timezone.utc)
    time.sleep(0.05)
    return now


def ids(statuses: list[dict]) -> list[str]:
    return sorted(s["instanceId"] for s in statuses)


def list_page(host: DevhostProcess, token: str | None = None, **params) -> requests.Response:
    headers = {"x-ms-continuation-token": token} if token else {}
    return requests.get(f"{host.durable}/instances/", params=params, headers=headers, timeout=10)


# --- get_status: showHistory / showHistoryOutput / showInput ----------------------------------------
@pytest.fixture(scope="module")
def probe(host):
    """A finished history_probe: an activity, a timer and an external event (raised by the client)."""
    iid = host.start_orchestration("history_probe", {"name": "probe"}, instance_id=unique("probe") + "0")
    host.wait(iid, until=lambda s: s["customStatus"] == "waiting for Go")
    assert client(host, "raise_event", id=iid, name="Go", data={"go": True}) == {"result": None}
    assert host.wait(iid)["runtimeStatus"] == "Completed"
    return iid


def test_history_shows_each_event_the_way_the_extension_does(host, probe):
    body = host.status(probe, showHistory=True, showHistoryOutput=True).json()
    events = body["historyEvents"]
    assert [e["EventType"] for e in events] == [
        "ExecutionStarted",
        "TaskCompleted",  # its TaskScheduled is folded into it
        "TimerCreated",
        "TimerFired",
        "EventRaised",
        "ExecutionCompleted",
    ]
    for e in events:
        assert not {"EventId", "IsPlayed", "TaskScheduledId", "TimerId"} & set(e), e
    started, completed, created, fired, raised, finished = events
    assert started["FunctionName"] == "history_probe"
    assert json.loads(started["Input"]) == {"name": "probe"}
    assert not {"Name", "OrchestrationInstance", "ParentInstance", "Version"} & set(started)
    assert completed["FunctionName"] == "say_hello"
    assert json.loads(completed["Input"]) == "probe"  # the scheduled activity's input
    assert json.loads(completed["Result"]) == "Hello probe!"
    assert completed["ScheduledTime"] <= completed["Timestamp"]
    assert created["FireAt"] == fired["FireAt"]
    assert raised["Name"] == "Go"
    assert json.loads(json.loads(raised["Input"])) == {"go": True}  # the client double-encodes
    assert finished["OrchestrationStatus"] == "Completed"
    assert json.loads(finished["Result"]) == body["output"]


def test_history_without_show_history_output_drops_every_result_but_keeps_inputs(host, probe):
    events = host.status(probe, showHistory=True).json()["historyEvents"]
    assert [e for e in events if "Result" in e] == []
    with_input = {e["EventType"] for e in events if "Input" in e}
    assert with_input == {"ExecutionStarted", "TaskCompleted", "EventRaised"}


def test_show_input_false_omits_the_input_from_the_status_and_the_history(host, probe):
    assert json.loads(host.status(probe).json()["input"]) == {"name": "probe"}  # default: shown
    assert host.status(probe, showInput=False).json()["input"] is None
    body = host.status(probe, showInput=False, showHistory=True, showHistoryOutput=True).json()
    assert body["input"] is None
    assert [e["EventType"] for e in body["historyEvents"] if "Input" in e] == []
    assert len([e for e in body["historyEvents"] if "Result" in e]) == 2  # output is still shown
    assert "historyEvents" not in host.status(probe).json()


def test_an_activity_in_flight_shows_as_task_scheduled_until_it_completes(host):
    iid = host.start_orchestration("long_steps", {"steps": 1, "seconds": 1.5})
    deadline = time.monotonic() + 30
    pending: list[dict] = []
    while not pending and time.monotonic() < deadline:
        events = host.status(iid, showHistory=True).json().get("historyEvents") or []
        pending = [e for e in events if e["EventType"] == "TaskScheduled"]
        time.sleep(0.05)
    assert len(pending) == 1, "the running activity never showed up in the history"
    assert pending[0]["Name"] == "slow_step"
    assert json.loads(pending[0]["Input"]) == {"step": 0, "seconds": 1.5}
    host.wait(iid)
    events = host.status(iid, showHistory=True).json()["historyEvents"]
    assert [e["EventType"] for e in events if e["EventType"].startswith("Task")] == ["TaskCompleted"]


def test_client_get_status_reads_input_history_and_history_output(host, probe):
    plain = client(host, "get_status", id=probe)["result"]
    assert plain["truthy"] and plain["runtimeStatus"] == "Completed" and plain["name"] == "history_probe"
    # show_input=False (the client's default) sends nothing; the host's default shows the input.
    assert json.loads(plain["input"]) == {"name": "probe"}
    assert plain["historyEvents"] is None and plain["history"] is None

    with_history = client(host, "get_status", id=probe, show_history=True)["result"]
    assert with_history["history"] is None  # the SDK keeps it as attribute historyEvents
    kinds = [e["EventType"] for e in with_history["historyEvents"]]
    assert kinds[0] == "ExecutionStarted" and kinds[-1] == "ExecutionCompleted"
    assert [e for e in with_history["historyEvents"] if "Result" in e] == []

    with_output = client(host, "get_status", id=probe, show_history=True, show_history_output=True)
    results = [e["Result"] for e in with_output["result"]["historyEvents"] if "Result" in e]
    assert len(results) == 2 and json.loads(results[0]) == "Hello probe!"

    missing = client(host, "get_status", id="no-such-instance")["result"]
    assert missing["truthy"] is False  # 404 -> an empty, falsy status object


# --- get_status_by / list: filters and paging --------------------------------------------------------
def test_get_status_by_filters_on_created_time_and_runtime_status(host):
    prefix = unique("by")
    early = host.start_orchestration("hello_chain", ["e"], instance_id=prefix + "early")
    host.wait(early)
    t1 = moment()
    done = host.start_orchestration("hello_chain", ["d"], instance_id=prefix + "done")
    host.wait(done)
    waiting = host.start_orchestration("waits_forever", instance_id=prefix + "waiting")
    running(host, waiting)
    killed = host.start_orchestration("waits_forever", instance_id=prefix + "killed")
    running(host, killed)
    assert client(host, "terminate", id=killed, reason="stop") == {"result": None}
    host.wait(killed)
    t2 = moment()
    late = host.start_orchestration("hello_chain", ["l"], instance_id=prefix + "late")
    host.wait(late)

    def by(**args) -> list[str]:
        return ids(client(host, "get_status_by", prefix=prefix, **args)["result"])

    assert by(**{"from": t1.isoformat(), "to": t2.isoformat()}) == sorted([done, waiting, killed])
    assert by(**{"from": t1.isoformat()}) == sorted([done, waiting, killed, late])
    assert by(to=t1.isoformat()) == [early]
    assert by(runtime_status=["Running", "Terminated"]) == sorted([waiting, killed])
    assert by(**{"from": t1.isoformat(), "to": t2.isoformat(), "runtime_status": ["Completed"]}) == [done]
    assert by(runtime_status=["Failed"]) == []

    # The list shows each instance's input by default, as the extension's query does.
    listed = {s["instanceId"]: s for s in client(host, "get_status_by", prefix=prefix)["result"]}
    assert json.loads(listed[done]["input"]) == ["d"]
    assert listed[killed]["output"] == "stop" and listed[killed]["runtimeStatus"] == "Terminated"
    everything = {s["instanceId"]: s for s in client(host, "get_status_all")["result"]}
    assert {early, done, waiting, killed, late} <= set(everything)
    assert json.loads(everything[late]["input"]) == ["l"]
    client(host, "terminate", id=waiting, reason="cleanup")


def page_through(host: DevhostProcess, **params) -> list[list[str]]:
    pages, token = [], None
    for _ in range(50):
        r = list_page(host, token, **params)
        assert r.status_code == 200, r.text
        pages.append([s["instanceId"] for s in r.json()])
        token = r.headers.get("x-ms-continuation-token")
        if not token:
            return pages
    raise AssertionError("the continuation tokens never ran out")


def test_top_pages_through_every_instance_exactly_once(host):
    prefix = unique("page")
    done = [host.start_orchestration("hello_chain", [str(i)], instance_id=f"{prefix}{i}") for i in range(7)]
    for iid in done:
        host.wait(iid)
    waiting = [host.start_orchestration("waits_forever", instance_id=f"{prefix}w{i}") for i in range(2)]
    for iid in waiting:
        running(host, iid)

    pages = page_through(host, instanceIdPrefix=prefix, top="4")
    assert [len(p) for p in pages] == [4, 4, 1]
    seen = [i for p in pages for i in p]
    assert sorted(seen) == sorted(done + waiting)  # each exactly once

    pages = page_through(host, instanceIdPrefix=prefix, runtimeStatus="Completed", top="3")
    assert [len(p) for p in pages] == [3, 3, 1]  # top applies after the filter
    assert sorted(i for p in pages for i in p) == sorted(done)

    assert len(page_through(host, instanceIdPrefix=prefix, top="9")) == 1  # an exact fit: no token
    assert page_through(host, instanceIdPrefix=prefix) == [done + waiting]  # no top: all, in creation order
    for iid in waiting:
        client(host, "terminate", id=iid, reason="cleanup")


def test_paging_neither_skips_nor_repeats_when_instances_are_purged_between_pages(host):
    prefix = unique("purgepage")
    made = [host.start_orchestration("hello_chain", [str(i)], instance_id=f"{prefix}{i}") for i in range(6)]
    for iid in made:
        host.wait(iid)
    first = list_page(host, instanceIdPrefix=prefix, top="2")
    assert [s["instanceId"] for s in first.json()] == made[:2]
    token = first.headers["x-ms-continuation-token"]
    for iid in made[:2]:
        assert client(host, "purge", id=iid) == {"result": 1}
    second = list_page(host, token, instanceIdPrefix=prefix, top="2")
    assert [s["instanceId"] for s in second.json()] == made[2:4]
    third = list_page(host, second.headers["x-ms-continuation-token"], instanceIdPrefix=prefix, top="2")
    assert [s["instanceId"] for s in third.json()] == made[4:]
    assert "x-ms-continuation-token" not in third.headers


def test_malformed_paging_requests_get_a_clear_answer_not_a_500(host):
    prefix = unique("badpage")
    iid = host.start_orchestration("hello_chain", ["x"], instance_id=prefix + "0")
    host.wait(iid)
    bad_token = list_page(host, "not-a-token", instanceIdPrefix=prefix, top="1")
    assert bad_token.status_code == 400
    assert "x-ms-continuation-token" in bad_token.json()["Message"]
    not_a_number = list_page(host, instanceIdPrefix=prefix, top="many")  # ignored, as the extension does
    assert not_a_number.status_code == 200 and ids(not_a_number.json()) == [iid]


# --- purge_instance_history_by ------------------------------------------------------------------------
def test_purge_by_filter_deletes_only_matching_finished_instances(host):
    prefix = unique("purgeby")
    early = host.start_orchestration("hello_chain", ["e"], instance_id=prefix + "early")
    host.wait(early)
    t1 = moment()
    c1 = host.start_orchestration("hello_chain", ["1"], instance_id=prefix + "c1")
    c2 = host.start_orchestration("hello_chain", ["2"], instance_id=prefix + "c2")
    failed = host.start_orchestration("fails", instance_id=prefix + "failed")
    killed = host.start_orchestration("waits_forever", instance_id=prefix + "killed")
    waiting = host.start_orchestration("waits_forever", instance_id=prefix + "waiting")
    for iid in (c1, c2, failed):
        host.wait(iid)
    running(host, killed)
    running(host, waiting)
    client(host, "terminate", id=killed, reason="stop")
    host.wait(killed)
    t2 = moment()
    late = host.start_orchestration("hello_chain", ["l"], instance_id=prefix + "late")
    host.wait(late)
    window = {"from": t1.isoformat(), "to": t2.isoformat()}

    def gone(iid: str) -> bool:
        return host.status(iid).status_code == 404

    purged = client(host, "purge_by", runtime_status=["Completed", "Terminated"], **window)
    assert purged == {"result": 3}
    assert [gone(i) for i in (c1, c2, killed)] == [True, True, True]
    assert [gone(i) for i in (early, failed, waiting, late)] == [False, False, False, False]

    assert client(host, "purge_by", runtime_status=["Running"], **window) == {"result": 0}
    assert host.status(waiting).json()["runtimeStatus"] == "Running"  # never purged while running

    assert client(host, "purge_by", **window) == {"result": 1}  # every finished one left: the Failed
    assert gone(failed) and not gone(waiting)
    assert client(host, "purge_by", **window) == {"result": 0}
    nothing = requests.delete(
        f"{host.durable}/instances/",
        params={"createdTimeFrom": t1.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "createdTimeTo": window["to"]},
        timeout=10,
    )
    assert nothing.status_code == 404  # what the client turns into instances_deleted == 0
    assert not gone(early) and not gone(late)
    client(host, "terminate", id=waiting, reason="cleanup")


# --- terminate / raise_event / rewind / purge through the real client --------------------------------
def test_client_terminate_stops_a_running_instance_and_tolerates_a_finished_one(host):
    iid = host.start_orchestration("waits_forever")
    host.wait(iid, until=lambda s: s["customStatus"] == "waiting")
    assert client(host, "terminate", id=iid, reason="no longer needed") == {"result": None}
    status = host.wait(iid)
    assert status["runtimeStatus"] == "Terminated" and status["output"] == "no longer needed"
    history = host.status(iid, showHistory=True).json()["historyEvents"]
    assert history[-1]["EventType"] == "ExecutionTerminated" and history[-1]["Input"] == "no longer needed"
    assert client(host, "terminate", id=iid, reason="again") == {"result": None}  # 410: the client shrugs
    assert host.status(iid).json()["output"] == "no longer needed"
    missing = client(host, "terminate", id="no-such-instance", reason="x")
    assert missing == {"error": "Exception: No instance with ID 'no-such-instance' found."}


def test_client_raise_event_delivers_and_reports_gone_and_unknown_instances(host):
    iid = host.start_orchestration("approval", {"timeout": 60})
    host.wait(iid, until=lambda s: (s["customStatus"] or {}).get("stage") == "waiting for approval")
    assert client(host, "raise_event", id=iid, name="Approval", data={"by": "bob"}) == {"result": None}
    done = host.wait(iid)
    assert done["output"]["approved"] is True and json.loads(done["output"]["payload"]) == {"by": "bob"}
    late = client(host, "raise_event", id=iid, name="Approval", data={})
    assert late == {"error": f"Exception: Instance with ID {iid} is gone: either completed or failed"}
    missing = client(host, "raise_event", id="no-such-instance", name="Approval", data={})
    assert missing == {"error": "Exception: No instance with ID no-such-instance found."}


def test_client_rewind_is_refused_clearly_for_each_kind_of_instance(host):
    failed = host.start_orchestration("fails")
    assert host.wait(failed)["runtimeStatus"] == "Failed"
    refused = client(host, "rewind", id=failed, reason="retry")["error"]
    assert refused.startswith("Exception: rewind is not supported by the devhost")
    assert host.status(failed).json()["runtimeStatus"] == "Failed"

    done = host.start_orchestration("hello_chain", ["x"])
    host.wait(done)
    assert client(host, "rewind", id=done, reason="retry") == {
        "error": "Exception: The rewind operation is only supported on failed orchestration instances."
    }
    assert client(host, "rewind", id="no-such-instance", reason="retry") == {
        "error": "Exception: No instance with ID no-such-instance found."
    }


def test_client_purge_reports_what_it_deleted(host):
    done = host.start_orchestration("hello_chain", ["x"])
    host.wait(done)
    assert client(host, "purge", id=done) == {"result": 1}
    assert host.status(done).status_code == 404
    assert client(host, "get_status", id=done)["result"]["truthy"] is False
    assert client(host, "purge", id=done) == {"result": 0}
    assert client(host, "purge", id="no-such-instance") == {"result": 0}

    waiting = host.start_orchestration("waits_forever")
    running(host, waiting)
    assert client(host, "purge", id=waiting) == {"result": 0}
    assert host.status(waiting).json()["runtimeStatus"] == "Running"
    client(host, "terminate", id=waiting, reason="cleanup")
    host.wait(waiting)
    assert client(host, "purge", id=waiting) == {"result": 1}
