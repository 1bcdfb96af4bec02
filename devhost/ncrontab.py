"""Timer trigger schedules: NCRONTAB (6 fields, seconds first) and TimeSpan intervals.

Functions reads ``{second} {minute} {hour} {day} {month} {day-of-week}``; NCrontab ANDs day-of-month
with day-of-week (Vixie cron ORs them). croniter reads a sixth field as seconds *at the end* unless
told otherwise, so ``0 */5 * * * *`` would fire every second — hence ``second_at_beginning=True``.
All schedules are evaluated in UTC (what Azure uses unless WEBSITE_TIME_ZONE is set).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from croniter import croniter

_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{2}):(?P<s>\d{2})$")
# NCrontab's field grammar (stricter than croniter, which also takes L, W, ?, # and a day-of-week 7):
# a list of '*' or n or n-m, each with an optional /step; months and days may be English names.
_ITEM = re.compile(r"^(?:\*|(?P<low>\d+|[A-Za-z]+)(?:-(?P<high>\d+|[A-Za-z]+))?)(?:/(?P<step>\d+))?$")
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december"]  # fmt: skip
_DAYS = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]
_FIELDS = (
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
)


def _value(text: str, names: list[str] | None, first: int) -> int | None:
    if text.isdigit():
        return int(text)
    if names is None or len(text) < 3:
        return None
    found = [i for i, name in enumerate(names) if name.startswith(text.lower())]
    return found[0] + first if len(found) == 1 else None


def _ncrontab_problem(fields: list[str]) -> str | None:
    """What NCrontab would refuse in these six fields, or None."""
    for text, (field, low, high, names) in zip(fields, _FIELDS, strict=True):
        for item in text.split(","):
            m = _ITEM.match(item)
            if m is None:
                return (
                    f"the {field} field '{text}' has '{item}': NCRONTAB takes *, n, n-m and lists, with /step"
                )
            for bound in (m["low"], m["high"]):
                value = None if bound is None else _value(bound, names, low)
                if bound is not None and (value is None or not low <= value <= high):
                    return f"the {field} field '{text}' has '{bound}': it must be {low}-{high}"
            if m["step"] is not None and int(m["step"]) == 0:
                return f"the {field} field '{text}' has a step of 0"
    return None


class ScheduleError(ValueError):
    """A timer schedule the host cannot run."""


def resolve_app_setting(expression: str, settings: Mapping[str, str] | None = None) -> str:
    """Resolve ``%NAME%`` from app settings, as the Functions host does for binding expressions."""
    settings = os.environ if settings is None else settings
    m = re.fullmatch(r"%([^%]+)%", expression.strip())
    if not m:
        return expression
    name = m.group(1)
    if name not in settings or not settings[name].strip():
        raise ScheduleError(f"schedule '{expression}': app setting '{name}' is not set")
    return settings[name].strip()


@dataclass(frozen=True)
class Schedule:
    """A parsed timer schedule; ``next_after`` gives the next occurrence strictly after a time."""

    expression: str
    cron: str | None = None
    interval: timedelta | None = None

    @classmethod
    def parse(cls, expression: str, settings: Mapping[str, str] | None = None) -> Schedule:
        resolved = resolve_app_setting(expression, settings)
        span = _TIMESPAN.match(resolved)
        if span:
            interval = timedelta(
                days=int(span["days"] or 0),
                hours=int(span["h"]),
                minutes=int(span["m"]),
                seconds=int(span["s"]),
            )
            if interval <= timedelta(0):
                raise ScheduleError(f"schedule '{expression}': a TimeSpan interval must be positive")
            return cls(expression=resolved, interval=interval)
        fields = resolved.split()
        if len(fields) != 6:
            raise ScheduleError(
                f"schedule '{expression}' has {len(fields)} fields; NCRONTAB needs exactly 6: "
                "{second} {minute} {hour} {day} {month} {day-of-week}, e.g. '0 */5 * * * *'"
            )
        problem = _ncrontab_problem(fields)
        if problem:
            raise ScheduleError(f"schedule '{expression}': {problem}")
        if not croniter.is_valid(resolved, second_at_beginning=True):
            raise ScheduleError(f"schedule '{expression}' is not a valid NCRONTAB expression")
        return cls(expression=resolved, cron=resolved)

    def next_after(self, moment: datetime) -> datetime:
        moment = moment.astimezone(timezone.utc)
        if self.interval is not None:
            return moment + self.interval
        it = croniter(self.cron, moment, second_at_beginning=True, day_or=False)
        nxt = it.get_next(datetime)
        return nxt.astimezone(timezone.utc)

    def occurrences(self, start: datetime, count: int) -> list[datetime]:
        out, t = [], start
        for _ in range(count):
            t = self.next_after(t)
            out.append(t)
        return out

    @property
    def default_use_monitor(self) -> bool:
        """Functions monitors schedules whose interval is at least one minute."""
        probe = datetime(2030, 1, 1, tzinfo=timezone.utc)
        first, second = self.occurrences(probe, 2)
        return (second - first) >= timedelta(minutes=1)
