"""Timer trigger start-up rules (run_on_startup, missed occurrences) and the determinism check."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.support.devhost import DurableAppHost
from tests.support.polling import wait_for


@pytest.fixture
def host(tmp_path):
    proc = DurableAppHost(tmp_path)
    yield proc
    proc.stop()


def test_run_on_startup_runs_once_at_start_and_monitored_timers_do_not(host, tmp_path):
    host.start()
    wait_for(lambda: host.records("on_startup"), timeout=20, what="the run_on_startup timer")
    time.sleep(0.5)
    assert [r["past_due"] for r in host.records("on_startup")] == [False]
    assert host.records("yearly") == []


def test_a_missed_occurrence_runs_once_past_due_after_downtime(host, tmp_path):
    state = tmp_path / "state"
    state.mkdir(parents=True)
    host.start()  # creates the database
    host.stop()
    db = sqlite3.connect(state / "DevhostTestHub.sqlite")
    db.execute(
        "INSERT OR REPLACE INTO timer_status VALUES ('yearly', '2020-01-01T00:00:00.000000Z', "
        "'2021-01-01T00:00:00.000000Z', '2020-01-01T00:00:00.000000Z')"
    )
    db.commit()
    db.close()
    host.start()
    wait_for(lambda: host.records("yearly"), timeout=20, what="the yearly timer")
    run = host.records("yearly")[0]
    assert run["past_due"] is True
    assert run["schedule_status"]["Next"].startswith("2021-01-01")
    host.stop()
    host.start()  # the status was updated: no second past-due run
    time.sleep(1.0)
    assert len(host.records("yearly")) == 1


def test_replay_that_changes_course_fails_as_non_deterministic(host, tmp_path):
    host.start()
    flag = tmp_path / "flag"
    flag.write_text("first")
    iid = host.start_orchestration("nondeterministic", {"flag_file": str(flag)})
    wait_for(lambda: host.records("slow_step_start"), timeout=20, what="the slow step to start")
    flag.write_text("second")  # the next replay schedules a different activity input
    status = host.wait(iid)
    assert status["runtimeStatus"] == "Failed"
    assert "Non-Deterministic workflow detected" in status["output"]


def test_host_timestamps_parse_to_the_same_instant_as_the_sdks_parser():
    from datetime import datetime, timezone

    from dateutil.parser import parse

    from devhost.durable.episode import _fast_timestamp_parse
    from devhost.durable.history import iso

    for ts in (datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc), datetime.now(timezone.utc)):
        assert _fast_timestamp_parse(iso(ts)) == parse(iso(ts))
    assert _fast_timestamp_parse("2026-01-02T03:04:05Z") == parse("2026-01-02T03:04:05Z")
