"""Cron arithmetic in the configured time zone: next runs, the slot a run serves, and message expiry."""

from __future__ import annotations

import functools
import itertools
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim


def next_runs(expr: str, now: datetime, tz: ZoneInfo, count: int = 1) -> list[datetime]:
    """Return the next `count` fire times of `expr` after `now`, in `tz`."""
    return list(fire_times(expr, now.astimezone(tz).replace(microsecond=0) + timedelta(seconds=1), count))


# Memoised: `pgbeat status` and a metrics scrape ask the same few schedules at the same `now` for every
# target of a fleet.
@functools.lru_cache(maxsize=1024)
def fire_times(expr: str, start: datetime, count: int) -> tuple[datetime, ...]:
    it = CronSim(expr, start)
    return tuple(next(it) for _ in range(count))


def slot_of(expr: str, now: datetime, tz: ZoneInfo) -> datetime:
    """Return the fire time a run started at `now` serves: the latest one not after `now`."""
    # cronsim's reverse iteration starts strictly before its start time: start a second later.
    local = now.astimezone(tz).replace(microsecond=0) + timedelta(seconds=1)
    return next(CronSim(expr, local, reverse=True))


def slot_id(expr: str, now: datetime, tz: ZoneInfo) -> str:
    return slot_of(expr, now, tz).strftime("%Y%m%dT%H%M%z")


def min_interval(expr: str, now: datetime, tz: ZoneInfo, samples: int = 13) -> timedelta:
    """Return the shortest gap between consecutive fire times (over the next `samples` runs)."""
    runs = next_runs(expr, now, tz, samples)
    return min(b - a for a, b in itertools.pairwise(runs))


def expiry_seconds(expr: str, now: datetime, tz: ZoneInfo) -> int:
    """Seconds a scheduled message stays valid: just short of the next run, so a backlog never stacks."""
    gap = min_interval(expr, now, tz).total_seconds()
    return int(max(60.0, gap - max(60.0, gap * 0.05)))
