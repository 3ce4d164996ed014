"""Leases in Redis: locks and counting semaphores that renew themselves while the work runs.

- `RedisLease`: a redis-py lock with a TTL, renewed by a thread while the work runs. If the key expires
  or is deleted (renewal finds another token), `on_lost` fires so the dump is aborted rather than run
  twice. A lease whose holder died expires after its TTL; a holder on this node whose process is gone is
  recognised at once and taken over.
- `RedisSemaphore`: at most N holders of a key (per database server, across the fleet).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from pgbeat.coordination import PREFIX

log = logging.getLogger(__name__)


# Replace the lock's token only if it is still the stale one we looked at (compare-and-set).
_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3])
end
return false
"""


def make_token(node: str, run_id: str) -> str:
    return f"{node}|{os.getpid()}|{run_id}|{uuid.uuid4().hex[:12]}"


def parse_token(token: str | bytes | None) -> dict[str, str] | None:
    if token is None:
        return None
    text = token.decode() if isinstance(token, bytes) else token
    parts = text.split("|")
    if len(parts) != 4:
        return None
    return {"node": parts[0], "pid": parts[1], "run_id": parts[2], "token": text}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Renewing:
    """A claim in Redis with a TTL, kept alive by a thread while the work runs.

    Subclasses implement `_renew_once()` (raise LockError when the claim is gone) and `_release()`.
    When renewal finds the claim gone, or Redis unreachable for longer than the TTL, `on_lost` fires so
    the work is aborted rather than risk a twin.
    """

    def __init__(self, client: redis.Redis, key: str, ttl: int, node: str, run_id: str,
                 on_lost: Callable[[str], None] | None = None, on_renew: Callable[[], None] | None = None) -> None:
        self.client, self.key, self.ttl, self.node, self.run_id = client, key, ttl, node, run_id
        self.token = make_token(node, run_id)
        self.on_lost = on_lost
        self.on_renew = on_renew  # a heartbeat for whoever watches the run
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew, name=f"lease:{self.key}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(max(self.ttl / 3, 0.5)):
            try:
                self._renew_once()
                last_ok = time.monotonic()
                if self.on_renew:
                    self.on_renew()
            except (LockNotOwnedError, LockError):
                self._lose("the lock was removed or taken by another process")
                return
            except RedisError as exc:
                if time.monotonic() - last_ok > self.ttl:
                    self._lose(f"Redis unreachable for longer than the lock's TTL ({exc})")
                    return

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error("lost %s: %s", self.key, reason)
        if self.on_lost:
            self.on_lost(reason)

    def _renew_once(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        # Expired, taken, or Redis is gone: then there is nothing of ours to release.
        with contextlib.suppress(LockError, RedisError):
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisLease(Renewing):
    """A self-renewing lock on `key` (redis-py's Lock, with our token naming the holder)."""

    def __init__(self, client: redis.Redis, key: str, ttl: int, node: str, run_id: str,
                 on_lost: Callable[[str], None] | None = None, on_renew: Callable[[], None] | None = None) -> None:
        super().__init__(client, key, ttl, node, run_id, on_lost, on_renew)
        self._lock = client.lock(key, timeout=ttl, blocking=False, thread_local=False)

    def holder(self) -> dict[str, str] | None:
        return parse_token(self.client.get(self.key))

    def acquire(self, take_over: Callable[[dict[str, str]], bool] | None = None) -> bool:
        """Take the lock if free, or if `take_over(holder)` says the holder is gone; start renewing."""
        if not self._lock.acquire(token=self.token):
            holder = self.holder()
            if holder is None or take_over is None or not take_over(holder):
                return False
            script = self.client.register_script(_TAKE_OVER)
            if not script(keys=[self.key], args=[holder["token"], self.token, self.ttl * 1000]):
                return False
            self._lock.local.token = self.token.encode()
            log.warning("took over lock %s from %s (holder gone)", self.key, holder["token"])
        self._start()
        return True

    def _renew_once(self) -> None:
        self._lock.reacquire()

    def _release(self) -> None:
        self._lock.release()


# A counting semaphore as a sorted set of holders scored by expiry (Redis server time, so the clocks of
# the worker hosts do not matter); expired holders (a dead worker) drop out on the next acquire.
_SEM_ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('zremrangebyscore', KEYS[1], '-inf', t)
if redis.call('zscore', KEYS[1], ARGV[2]) or redis.call('zcard', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('zadd', KEYS[1], t + tonumber(ARGV[3]), ARGV[2])
    redis.call('expire', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
    return 1
end
return 0
"""
_SEM_RENEW = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
if not redis.call('zscore', KEYS[1], ARGV[1]) then return 0 end
redis.call('zadd', KEYS[1], t + tonumber(ARGV[2]), ARGV[1])
redis.call('expire', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return 1
"""


class RedisSemaphore(Renewing):
    """At most `limit` holders of `key` at once, across every worker host (a per-host or global cap)."""

    def __init__(self, client: redis.Redis, key: str, limit: int, ttl: int, node: str, run_id: str,
                 on_lost: Callable[[str], None] | None = None) -> None:
        super().__init__(client, key, ttl, node, run_id, on_lost)
        self.limit = limit

    def acquire(self) -> bool:
        if not self.client.register_script(_SEM_ACQUIRE)(keys=[self.key], args=[self.limit, self.token, self.ttl]):
            return False
        self._start()
        return True

    def holders(self) -> list[str]:
        return [t.decode() for t in self.client.zrange(self.key, 0, -1)]

    def _renew_once(self) -> None:
        if not self.client.register_script(_SEM_RENEW)(keys=[self.key], args=[self.token, self.ttl]):
            raise LockError("semaphore slot expired or removed")

    def _release(self) -> None:
        self.client.zrem(self.key, self.token)


def holder_gone(node: str) -> Callable[[dict[str, str]], bool]:
    """Return a take-over test: the holder ran on this node and its process no longer exists."""

    def test(holder: dict[str, str]) -> bool:
        return holder["node"] == node and holder["pid"].isdigit() and not pid_alive(int(holder["pid"]))

    return test


def target_lock_key(target: str) -> str:
    return f"{PREFIX}:lock:target:{target}"


def host_slots_key(host: str) -> str:
    return f"{PREFIX}:slots:host:{host}"


GLOBAL_SLOTS_KEY = f"{PREFIX}:slots:global"


def step_lease_key(run_id: str, step: str) -> str:
    return f"{PREFIX}:lease:{run_id}:{step}"


def receiver_lease_key(target: str) -> str:
    """The lease of `target`'s WAL receiver: held by the one process in the fleet that streams its WAL."""
    return f"{PREFIX}:receiver:{target}"


def receiver_state_key(target: str) -> str:
    """What the holder of `target`'s receiver lease last said: since when, and the last segment archived."""
    return f"{PREFIX}:receiver:{target}:state"
