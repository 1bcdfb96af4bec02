from datetime import datetime, timedelta, timezone

import pytest

from devhost.ncrontab import Schedule, ScheduleError

T0 = datetime(2026, 3, 2, 10, 0, 1, tzinfo=timezone.utc)  # a Monday


def test_every_five_minutes_fires_every_five_minutes_not_every_second():
    times = Schedule.parse("0 */5 * * * *").occurrences(T0, 3)
    assert times == [
        T0.replace(minute=5, second=0),
        T0.replace(minute=10, second=0),
        T0.replace(minute=15, second=0),
    ]


def test_seconds_field_comes_first():
    times = Schedule.parse("*/10 * * * * *").occurrences(T0, 2)
    assert times == [T0.replace(second=10), T0.replace(second=20)]


def test_day_of_month_and_day_of_week_are_anded_like_ncrontab():
    first_tuesdays = Schedule.parse("0 0 8 1-7 * Tue").occurrences(T0, 2)
    assert first_tuesdays == [
        datetime(2026, 3, 3, 8, tzinfo=timezone.utc),
        datetime(2026, 4, 7, 8, tzinfo=timezone.utc),
    ]


def test_sunday_is_zero():
    nxt = Schedule.parse("0 30 9 * * 0").next_after(T0)
    assert nxt == datetime(2026, 3, 8, 9, 30, tzinfo=timezone.utc) and nxt.weekday() == 6


@pytest.mark.parametrize("expr", ["*/5 * * * *", "0 0 * * * * *", "nonsense", "61 * * * * *"])
def test_schedules_without_exactly_six_valid_fields_are_rejected(expr):
    with pytest.raises(ScheduleError):
        Schedule.parse(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "0 0 0 L * *",
        "0 0 0 * * 1#2",
        "0 0 0 ? * *",
        "0 0 0 * * 7",
        "0 0 0 * * 0-7",
        "0 0 3 W * *",
        "0 */0 * * * *",
    ],
)
def test_what_croniter_takes_but_ncrontab_refuses_is_refused(expr):
    # On Azure such a schedule keeps the timer from starting: idle endpoints would never be cleaned up.
    with pytest.raises(ScheduleError, match=r"NCRONTAB takes|must be|step of 0"):
        Schedule.parse(expr)


@pytest.mark.parametrize(
    "expr",
    ["0 */5 * * * *", "0 0 9 * * Mon-Fri", "0 30 6 1 Jan,Jul *", "0 0 0 * * 0-6/2", "5-10/5 * * * * *"],
)
def test_ncrontab_forms_are_taken(expr):
    assert Schedule.parse(expr).cron == expr


def test_app_setting_reference_is_resolved():
    assert (
        Schedule.parse("%CLEANUP_SCHEDULE%", {"CLEANUP_SCHEDULE": "0 */30 * * * *"}).cron == "0 */30 * * * *"
    )


def test_missing_app_setting_is_named_in_the_error():
    with pytest.raises(ScheduleError, match="CLEANUP_SCHEDULE"):
        Schedule.parse("%CLEANUP_SCHEDULE%", {})


def test_timespan_schedule_is_a_constant_interval():
    s = Schedule.parse("00:00:30")
    assert s.next_after(T0) == T0 + timedelta(seconds=30)


def test_monitoring_defaults_on_for_intervals_of_a_minute_or_more():
    assert Schedule.parse("0 */5 * * * *").default_use_monitor is True
    assert Schedule.parse("*/10 * * * * *").default_use_monitor is False
