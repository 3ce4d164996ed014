"""Beat's scheduler: RedBeat that keeps sending through whatever Redis goes through.

RedBeat keeps the schedule in Redis (one hash per entry with its definition and last run, a sorted set
of due times) behind a leader lock, so that a second beat is a standby. On its own (RedBeat 2.4) it stops
sending in ways that nobody sees:

- Redis restarted without its data: the lock extension fails and beat exits; the restarted beat creates
  the entries again with "last run: now", so a slot that fell while Redis was away is never sent. A
  standby that takes the free lock first ticks on an empty schedule until someone restarts a beat.
- An entry's hash evicted or deleted: RedBeat drops the entry from the schedule for good ("Failed to
  load"); its sorted-set member lost: the entry is never due again.
- Redis down, still loading its data, or a read-only replica after a failover: beat exits, and forgets
  the last runs it knew.
- A blocking lock acquisition at start-up: a standby learns nothing while it waits.
- (A lock timeout shorter than beat's loop interval expired between two ticks and beat exited:
  workers/config.py makes the interval a fifth of the lock timeout.)

This scheduler holds the same lock itself, on every tick:

1. The leader extends the lock. If the lock has vanished (Redis lost it, or this beat stalled longer than
   the lock timeout) and nobody else holds it, it takes it again; if another beat holds it, this one
   becomes a standby in place. A standby tries to take the lock on every tick.
2. Every beat reads every configured entry in one pipeline and remembers its last run. The leader
   re-creates any entry Redis lost with the last run it remembers, so a slot that fell during the loss is
   sent once and none twice (an entry this beat never saw starts from now, as a new one does).
3. The leader sends what is due (RedBeat's tick).

A Redis error (down, loading, timing out, read-only) is a warning and the tick is tried again a few
seconds later: beat does not exit. It exits only when stopped, or with a non-zero status on an
unexpected error, for its supervisor to restart it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from datetime import datetime

from celery.utils.log import get_logger
from celery.utils.time import humanize_seconds
from kombu.utils.url import maybe_sanitize_url
from redbeat.schedulers import RedBeatScheduler, get_redis
from redis.exceptions import LockNotOwnedError, RedisError

logger = get_logger("celery.beat")

# Seconds between two attempts while Redis fails (at most beat_max_loop_interval).
REDIS_RETRY = 5.0
# Seconds between two warnings about the same outage.
WARN_EVERY = 60.0


class PgbeatScheduler(RedBeatScheduler):
    """RedBeat's scheduler, with the leader lock held in `tick` and the schedule restored when Redis loses it."""

    def __init__(self, app, **kwargs) -> None:
        self.lock = None
        self.standing_by = False
        self.last_runs: dict[str, datetime] = {}
        self.set_up = False
        self.redis_down_since: float | None = None
        self.redis_warned_at = 0.0
        # The lock's value names its holder, so `GET <lock key>` tells an operator which beat leads.
        self.leader_token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        super().__init__(app, **kwargs)
        # RedBeat takes its lock in a beat_init receiver, blocking, and only when `lock_key` is set: with it
        # cleared, the lock (the same key, so beats of either kind exclude each other) is this class's.
        self.leader_key, self.lock_key = self.lock_key, None

    def setup_schedule(self) -> None:
        """Write the configured entries to Redis (RedBeat); if Redis does not answer, leave it to `tick`."""
        try:
            super().setup_schedule()
        except RedisError as exc:
            self.redis_unreachable(exc)
            return
        self.set_up = True

    def tick(self, min=min, **kwargs) -> float:
        """Hold or wait for the leader lock, restore lost entries, and (as the leader) send what is due.

        Return the seconds until the next tick.
        """
        try:
            if not self.set_up:
                self.setup_schedule()
                if not self.set_up:
                    return min(self.max_interval, REDIS_RETRY)
            leading = self.hold_leader_lock()
            self.check_entries(restore=leading)
            self.redis_reachable()
            if not leading:
                return self.max_interval
            return super().tick(min=min, **kwargs)
        except RedisError as exc:
            self.redis_unreachable(exc)
            return min(self.max_interval, REDIS_RETRY)

    def hold_leader_lock(self) -> bool:
        """Return whether this beat leads: extend the lock it holds, or take it if it is free."""
        client = get_redis(self.app)
        if self.lock is None:
            lock = client.lock(self.leader_key, timeout=self.lock_timeout, thread_local=False)
            if not lock.acquire(blocking=False, token=self.leader_token):
                if not self.standing_by:
                    self.standing_by = True
                    logger.info("beat: %s holds the lock %s: this beat stands by", client.get(self.leader_key),
                                self.leader_key)
                return False
            self.lock, self.standing_by = lock, False
            logger.info("beat: Acquired lock %s as %s: this beat sends the schedule", self.leader_key,
                        self.leader_token)
            return True
        try:
            self.lock.extend(self.lock_timeout, replace_ttl=True)
            return True
        except LockNotOwnedError:
            pass
        if self.lock.acquire(blocking=False, token=self.leader_token):
            logger.warning("beat: the lock %s had vanished from Redis (restarted without its data, or this beat "
                           "stalled for longer than beat_lock_timeout): taken again", self.leader_key)
            return True
        logger.warning("beat: %s holds the lock %s now: this beat is a standby", client.get(self.leader_key),
                       self.leader_key)
        self.lock, self.standing_by = None, True
        return False

    def check_entries(self, restore: bool) -> None:
        """Remember the last run of every configured entry; if `restore`, re-create those Redis lost."""
        conf = self.app.redbeat_conf
        names = list(conf.schedule)
        client = get_redis(self.app)
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                key = self.Entry.generate_key(self.app, name)
                pipe.hmget(key, "definition", "meta")
                pipe.zscore(conf.schedule_key, key)
            pipe.scard(conf.statics_key)
            replies = pipe.execute()
        missing = []
        for index, name in enumerate(names):
            (definition, meta), due = replies[2 * index], replies[2 * index + 1]
            last_run = self.Entry.decode_meta(meta).get("last_run_at")
            if last_run is not None:
                self.last_runs[name] = last_run
            if definition is None or due is None:
                missing.append(name)
        if restore and missing:
            self.restore_entries(missing)
        if restore and names and not replies[-1]:
            # RedBeat reads this set at start-up to delete the entries that left the configuration.
            client.sadd(conf.statics_key, *names)
            logger.warning("beat: the set of configured entries %s was missing from Redis: written again",
                           conf.statics_key)

    def restore_entries(self, names: list[str]) -> None:
        """Write the configured entries `names` to Redis again, each with the last run this beat saw."""
        schedule = self.app.redbeat_conf.schedule
        remembered = []
        for name in names:
            entry = self._maybe_entry(name, schedule[name])
            if name in self.last_runs:
                entry.last_run_at = self.last_runs[name]
                remembered.append(name)
            entry.save()
        logger.warning("beat: %d schedule entries were missing from Redis (restarted without its data?) and are "
                       "written again: %s; %s", len(names), ", ".join(sorted(names)),
                       f"{len(remembered)} keep the last run this beat saw, the others count from now"
                       if remembered != names else "each keeps the last run this beat saw")

    def reserve(self, entry):
        """RedBeat's reserve (the entry's last run becomes now), remembered before the message is sent."""
        new_entry = super().reserve(entry)
        self.last_runs[entry.name] = new_entry.last_run_at
        return new_entry

    def redis_unreachable(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.redis_down_since is None:
            self.redis_down_since = now
        if now - self.redis_warned_at >= WARN_EVERY:
            self.redis_warned_at = now
            logger.warning("beat: Redis fails (%s), for %.0f s now: trying again every %.0f s",
                           exc, now - self.redis_down_since, min(self.max_interval, REDIS_RETRY))

    def redis_reachable(self) -> None:
        if self.redis_down_since is not None:
            logger.warning("beat: Redis works again after %.0f s", time.monotonic() - self.redis_down_since)
            self.redis_down_since, self.redis_warned_at = None, 0.0

    def close(self) -> None:
        """Release the lock if this beat holds it (a standby takes over at once), then close as RedBeat does."""
        lock, self.lock = self.lock, None
        if lock is not None:
            with contextlib.suppress(RedisError):
                if lock.owned():
                    lock.release()
                    logger.info("beat: Released lock %s", self.leader_key)
        super().close()

    @property
    def info(self) -> str:
        return (f"       . redis -> {maybe_sanitize_url(self.app.redbeat_conf.redis_url)}\n"
                f"       . lock -> `{self.leader_key}` {humanize_seconds(self.lock_timeout)} ({self.lock_timeout}s), "
                f"held on every tick: a second beat is a standby")
