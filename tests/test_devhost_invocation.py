"""How the devhost calls functions: thread pool vs event loop, routes, running by hand, its logs.

Everything goes over real HTTP to a devhost subprocess serving ``tests/apps/host_app``.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from pathlib import Path

import pytest
import requests

from tests.support.devhost import PROJECT_ROOT, DevhostProcess
from tests.support.polling import wait_for

APP = PROJECT_ROOT / "tests" / "apps" / "host_app"
YEARLY = "0 0 0 1 1 *"


def records(log: Path, kind: str) -> list[dict]:
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == kind]


def start_host(tmp: Path, schedule: str, timer_seconds: float, **env: str) -> DevhostProcess:
    proc = DevhostProcess(
        APP,
        tmp / "state",
        env={
            "HOST_TEST_LOG": str(tmp / "runs.log"),
            "SLOW_TIMER_SCHEDULE": schedule,
            "SLOW_TIMER_SECONDS": str(timer_seconds),
            **env,
        },
    )
    proc.start()
    proc.run_log = tmp / "runs.log"
    return proc


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    proc = start_host(tmp_path_factory.mktemp("host_app"), YEARLY, 0.1)
    yield proc
    proc.stop()


def log_records(host: DevhostProcess, logger: str, event: str) -> list[dict[str, str]]:
    """The ``key=value`` fields of the host's log lines ``<logger>: <event> k=v ...``."""
    pattern = re.compile(rf" {re.escape(logger)}: {event} (.*)$")
    found = []
    for line in host.log_text().splitlines():
        m = pattern.search(line)
        if m:
            found.append(dict(re.findall(r"(\w+)=(\S+)", m.group(1))))
    return found


# --- where functions run --------------------------------------------------------------------------
def test_sync_http_functions_run_in_the_thread_pool_and_async_ones_on_the_host_loop(host):
    sync = requests.get(f"{host.url}/api/where/sync", timeout=10).json()
    async_ = requests.get(f"{host.url}/api/where/async", timeout=10).json()
    assert async_["has_loop"] is True and async_["main_thread"] is True
    assert sync["has_loop"] is False and sync["main_thread"] is False
    assert sync["thread"].startswith("fn") and sync["ident"] != async_["ident"]


def test_sync_and_async_activities_run_in_the_pool_and_on_the_loop(host):
    iid = host.start_orchestration("where_activities")
    out = host.wait(iid)["output"]
    assert out["sync"]["has_loop"] is False and out["sync"]["thread"].startswith("fn")
    assert out["async"]["has_loop"] is True and out["async"]["main_thread"] is True


def test_a_blocked_sync_function_does_not_hold_up_other_requests(host):
    held: dict[str, str] = {}

    def call_hold():
        held["body"] = requests.get(f"{host.url}/api/hold", params={"timeout": "10"}, timeout=30).text

    caller = threading.Thread(target=call_hold)
    caller.start()
    try:
        # Each release is answered by an async function on the host's loop while `hold` blocks its
        # thread; on the loop itself, `hold` would keep these unanswered until it timed out.
        wait_for(
            lambda: requests.post(f"{host.url}/api/release", timeout=3).text == "released",
            timeout=10,
            what="the release",
        )
    finally:
        caller.join(30)
    assert held["body"] == "released"


def test_an_http_function_past_azures_response_limit_gets_502_and_runs_on(tmp_path):
    # Azure's load balancer gives an HTTP function 230 s (here 1 s), whatever functionTimeout says: the
    # caller gets 502, the function is not stopped, and what it returns later reaches nobody.
    host = start_host(tmp_path, YEARLY, 0.1, DEVHOST_HTTP_RESPONSE_LIMIT_S="1")
    try:
        cut = requests.get(f"{host.url}/api/hold", params={"timeout": "30"}, timeout=30)
        assert cut.status_code == 502
        assert "'hold' did not answer within 1 s, Azure's limit for an HTTP response" in cut.json()["error"]
        # Still holding its thread: the release finds it waiting, and it then ends (logged, answer lost).
        assert requests.post(f"{host.url}/api/release", timeout=10).text == "released"
        ended = wait_for(
            lambda: [r for r in log_records(host, "devhost.http", "http") if r["name"] == "hold"],
            timeout=20,
            what="the late end of hold in the log",
        )
        assert ended[-1]["status"] == "502" and float(ended[-1]["duration_ms"]) >= 1000
        assert requests.get(f"{host.url}/api/where/async", timeout=10).status_code == 200  # quick ones answer
    finally:
        host.stop()


def test_a_caller_that_hangs_up_does_not_cancel_an_async_function(host):
    # As under the real worker, the invocation is not tied to the caller's connection.
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{host.url}/api/slow_async", params={"seconds": "1", "label": "hung-up"}, timeout=0.2)

    finished = wait_for(
        lambda: [r for r in records(host.run_log, "slow_async") if r["label"] == "hung-up"],
        timeout=20,
        what="the async function to finish after its caller left",
    )
    assert len(finished) == 1


# --- routing ----------------------------------------------------------------------------------------
def test_routes_that_differ_only_in_constraints_load_and_each_get_their_paths(host):
    assert requests.get(f"{host.url}/api/kinds/42", timeout=10).text == "number 42"
    assert requests.get(f"{host.url}/api/kinds/abc", timeout=10).text == "word abc"
    assert requests.get(f"{host.url}/api/kinds/a1", timeout=10).status_code == 404


# --- running non-HTTP functions by hand ------------------------------------------------------------
def test_admin_endpoint_runs_an_activity_with_its_serialized_input(host):
    r = requests.post(
        f"{host.url}/admin/functions/remember", json={"input": json.dumps({"n": 1, "s": "x"})}, timeout=10
    )
    assert r.status_code == 202
    run = wait_for(lambda: records(host.run_log, "remember"), timeout=20, what="the remember run")[0]
    assert run["payload"] == {"n": 1, "s": "x"} and run["type"] == "dict"


@pytest.mark.parametrize(
    ("name", "body", "status", "message"),
    [
        ("where_activities", {"input": ""}, 400, "(kind: orchestrator) cannot be run by hand"),
        ("where_sync", {"input": ""}, 400, "(kind: http) cannot be run by hand; call its route"),
        ("remember", {"input": "Tokyo"}, 400, "'input' for activity 'remember' is not JSON"),
        ("remember", {"input": {"n": 1}}, 400, "must be a string holding the activity's JSON input"),
        ("no_such_function", {"input": ""}, 404, "no function named 'no_such_function'"),
    ],
)
def test_admin_endpoint_refuses_what_it_cannot_run_with_a_clear_error(host, name, body, status, message):
    r = requests.post(f"{host.url}/admin/functions/{name}", json=body, timeout=10)
    assert r.status_code == status
    assert message in r.json()["error"]


# --- structured logs --------------------------------------------------------------------------------
def test_log_lines_name_the_function_instance_episode_and_duration(host):
    started = requests.post(f"{host.url}/api/orchestrators/where_activities", timeout=10)
    assert started.status_code == 202
    iid = started.json()["id"]
    assert host.wait(iid)["runtimeStatus"] == "Completed"
    wait_for(
        lambda: any(
            r.get("instance") == iid
            for r in log_records(host, "devhost.durable", "episode")
            if r.get("episode") == "3"
        ),
        timeout=20,
        what="episode 3 in the log",
    )

    http = [r for r in log_records(host, "devhost.http", "http") if r["name"] == "http_start"]
    assert http and http[-1]["method"] == "POST" and http[-1]["status"] == "202"
    assert http[-1]["path"] == "/api/orchestrators/where_activities"
    float(http[-1]["duration_ms"])

    episodes = [r for r in log_records(host, "devhost.durable", "episode") if r["instance"] == iid]
    assert [r["episode"] for r in episodes] == ["1", "2", "3"]
    assert all(r["name"] == "where_activities" for r in episodes)
    assert all(float(r["duration_ms"]) >= 0 for r in episodes)

    activities = [r for r in log_records(host, "devhost.durable", "activity") if r["instance"] == iid]
    assert [(r["name"], r["task"], r["outcome"]) for r in activities] == [
        ("where_sync_activity", "0", "ok"),
        ("where_async_activity", "1", "ok"),
    ]
    assert all(float(r["duration_ms"]) >= 0 for r in activities)


# --- timers never overlap ---------------------------------------------------------------------------
def test_timer_runs_never_overlap_even_when_slower_than_the_schedule_and_run_by_hand(tmp_path):
    host = start_host(tmp_path, "* * * * * *", 1.0)  # every second; each run takes one second
    try:
        wait_for(lambda: records(host.run_log, "slow_timer_start"), timeout=20, what="the first timer run")
        for _ in range(2):  # while the first scheduled run is still going
            r = requests.post(f"{host.url}/admin/functions/slow_timer", json={"input": ""}, timeout=10)
            assert r.status_code == 202
        wait_for(lambda: len(records(host.run_log, "slow_timer_end")) >= 4, timeout=30, what="4 timer runs")
        starts = sorted(records(host.run_log, "slow_timer_start"), key=lambda r: r["t"])
        ends = {r["run"]: r["t"] for r in records(host.run_log, "slow_timer_end")}
        for earlier, later in itertools.pairwise(starts):
            assert earlier["run"] in ends, "a run started before the previous one ended"
            assert ends[earlier["run"]] <= later["t"]
        timer_logs = log_records(host, "devhost.timers", "timer")
        assert timer_logs and all(r["name"] == "slow_timer" for r in timer_logs)
        assert all(float(r["duration_ms"]) >= 1000 for r in timer_logs)
    finally:
        host.stop()
