"""Coordination between runs: target locks that renew themselves, and run state in Redis.

- `RedisLease`: a redis-py lock with a TTL, renewed by a thread while the work runs. If the key expires
  or is deleted (renewal finds another token), `on_lost` fires so the dump is aborted rather than run
  twice. A lease whose holder died expires after its TTL; a holder on this node whose process is gone is
  recognised at once and taken over.
- `RunState`: per-run fields in a Redis hash (status, step, attempts, done steps), the idempotency key
  per (target, tier, scheduled slot), and once-only flags. Nothing secret and no file contents.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError

log = logging.getLogger(__name__)

PREFIX = "pgbeat"
RUN_TTL = 14 * 86400

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


class NodeRegistry:
    """Which worker hosts are alive: each worker refreshes its entry every few seconds."""

    KEY = f"{PREFIX}:workers"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def beat(self, node: str, worker: str, ttl: float) -> None:
        pipe = self.client.pipeline()
        pipe.zadd(self.KEY, {f"{node}|{worker}": time.time() + ttl})
        pipe.zremrangebyscore(self.KEY, "-inf", time.time() - 86400)
        pipe.execute()

    def leave(self, node: str, worker: str) -> None:
        self.client.zrem(self.KEY, f"{node}|{worker}")

    def alive_nodes(self) -> set[str]:
        return {m.decode().split("|", 1)[0] for m in self.client.zrangebyscore(self.KEY, time.time(), "+inf")}


def holder_gone(node: str) -> Callable[[dict[str, str]], bool]:
    """Return a take-over test: the holder ran on this node and its process no longer exists."""

    def test(holder: dict[str, str]) -> bool:
        return holder["node"] == node and holder["pid"].isdigit() and not pid_alive(int(holder["pid"]))

    return test


class RunState:
    """Run bookkeeping in Redis, shared by every worker, beat and the CLI."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def key(run_id: str) -> str:
        return f"{PREFIX}:run:{run_id}"

    def update(self, run_id: str, **fields: Any) -> None:
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        values["updated_at"] = str(time.time())
        pipe = self.client.pipeline()
        pipe.hset(self.key(run_id), mapping=values)
        pipe.expire(self.key(run_id), RUN_TTL)
        pipe.execute()

    def progress(self, run_id: str, line: str) -> None:
        """Append a line to the run's progress log (what `pgbeat backup|restore` prints while it waits)."""
        key = f"{self.key(run_id)}:progress"
        pipe = self.client.pipeline()
        pipe.rpush(key, line)
        pipe.expire(key, RUN_TTL)
        pipe.execute()

    def progress_since(self, run_id: str, start: int) -> list[str]:
        return [line.decode() for line in self.client.lrange(f"{self.key(run_id)}:progress", start, -1)]

    def get(self, run_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.key(run_id)).items()}

    def claim_slot(self, target: str, tier: str, slot: str, run_id: str, ttl: int) -> str | None:
        """Claim (target, tier, slot) for `run_id`; return None if claimed now, else the owner's run id."""
        key = f"{PREFIX}:slot:{target}:{tier}:{slot}"
        if self.client.set(key, run_id, nx=True, ex=ttl):
            return None
        owner = self.client.get(key)
        return owner.decode() if owner else None

    def take_slot(self, target: str, tier: str, slot: str, run_id: str, ttl: int) -> None:
        """Give (target, tier, slot) to `run_id` (it replaces an abandoned run)."""
        self.client.set(f"{PREFIX}:slot:{target}:{tier}:{slot}", run_id, ex=ttl)

    def step_result(self, run_id: str, step: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.key(run_id), f"done:{step}")
        return json.loads(raw) if raw else None

    def step_done(self, run_id: str, step: str, record: dict[str, Any]) -> None:
        self.update(run_id, **{f"done:{step}": record})

    def attempt(self, run_id: str, step: str) -> int:
        value = self.client.hincrby(self.key(run_id), f"attempts:{step}", 1)
        self.client.expire(self.key(run_id), RUN_TTL)
        return int(value)

    ACTIVE = ("claimed", "queued", "running", "waiting", "retrying")

    def active_runs(self) -> list[dict[str, str]]:
        """Every run not finished yet, with its fields (run_id, target, tier, node, status, step, updated_at)."""
        runs = []
        for key in self.client.scan_iter(f"{PREFIX}:run:*", count=500):
            name = key.decode()
            if name.count(":") != 2:
                continue  # a run's progress list
            fields = self.get(name.split(":", 2)[2])
            if fields.get("status") in self.ACTIVE:
                runs.append({"run_id": name.split(":", 2)[2], **fields})
        return runs

    def overview(self, heartbeat_ttl: int, alive_nodes: set[str] | None = None) -> dict[str, Any]:
        """Runs that are queued, running, or stuck (silent for longer than 3 heartbeats, or on a dead host),
        and per host queue the age of its oldest queued run."""
        groups: dict[str, Any] = {"queued": [], "running": [], "stuck": [], "queue_ages": {}}
        now = time.time()
        for fields in self.active_runs():
            info = {k: fields.get(k, "?") for k in ("run_id", "target", "tier", "node", "step", "status")}
            silent = now - float(fields.get("updated_at", now))
            dead_host = alive_nodes is not None and fields.get("node") not in alive_nodes
            if fields["status"] in ("claimed", "queued"):
                groups["stuck" if dead_host else "queued"].append(info)
                queue = f"pgbeat.host.{fields.get('node', '?')}"
                groups["queue_ages"][queue] = max(groups["queue_ages"].get(queue, 0.0), silent)
            else:
                stuck = dead_host or silent > 3 * max(heartbeat_ttl, 60)
                groups["stuck" if stuck else "running"].append(info)
        return groups

    def set_latest(self, target: str, node: str) -> None:
        """Record which host holds `target`'s newest backup (drills run there)."""
        self.client.set(f"{PREFIX}:latest:{target}", node)

    def latest_node(self, target: str) -> str | None:
        value = self.client.get(f"{PREFIX}:latest:{target}")
        return value.decode() if value else None

    def once(self, run_id: str, what: str) -> bool:
        """Return True the first time it is called for (run_id, what), False ever after."""
        return bool(self.client.set(f"{PREFIX}:once:{run_id}:{what}", "1", nx=True, ex=RUN_TTL))


def target_lock_key(target: str) -> str:
    return f"{PREFIX}:lock:target:{target}"


def host_slots_key(host: str) -> str:
    return f"{PREFIX}:slots:host:{host}"


GLOBAL_SLOTS_KEY = f"{PREFIX}:slots:global"


def step_lease_key(run_id: str, step: str) -> str:
    return f"{PREFIX}:lease:{run_id}:{step}"
