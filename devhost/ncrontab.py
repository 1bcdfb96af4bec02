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
