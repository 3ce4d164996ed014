"""Run bookkeeping in Redis: per-run state, scheduled slots, once-only flags, and which hosts are alive.

- `RunState`: per-run fields in a Redis hash (status, step, attempts, done steps), the idempotency key
  per (target, tier, scheduled slot), and once-only flags. Nothing secret and no file contents.
- `NodeRegistry`: each worker refreshes its host's entry every few seconds; the reconciler and the CLI
  read which hosts have a live worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis

from pgbeat.coordination import PREFIX, RUN_TTL
from pgbeat.coordination.dispatch import host_queue

if TYPE_CHECKING:
    from pgbeat.coordination.dispatch import QueuedMessage


class NodeRegistry:
    """Which worker hosts are alive, and which queues each worker consumes: each worker refreshes its entry
    every few seconds (`KEY`: `node|worker` scored by when it expires; `QUEUES`: its queues, as JSON)."""

    KEY = f"{PREFIX}:workers"
    QUEUES = f"{PREFIX}:workers:queues"
    FORGET_AFTER = 86400  # an entry not refreshed for a day is removed

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def beat(self, node: str, worker: str, ttl: float, queues: list[str] | None = None) -> None:
        member, now = f"{node}|{worker}", time.time()
        forgotten = self.client.zrangebyscore(self.KEY, "-inf", now - self.FORGET_AFTER)
        pipe = self.client.pipeline()
        pipe.zadd(self.KEY, {member: now + ttl})
        if queues is not None:
            pipe.hset(self.QUEUES, member, json.dumps(sorted(queues)))
        if forgotten:
            pipe.zrem(self.KEY, *forgotten)
            pipe.hdel(self.QUEUES, *forgotten)
        pipe.execute()

    def leave(self, node: str, worker: str) -> None:
        pipe = self.client.pipeline()
        pipe.zrem(self.KEY, f"{node}|{worker}")
        pipe.hdel(self.QUEUES, f"{node}|{worker}")
        pipe.execute()

    def alive_nodes(self) -> set[str]:
        return {m.decode().split("|", 1)[0] for m in self.client.zrangebyscore(self.KEY, time.time(), "+inf")}

    def consumers_of(self, queue: str) -> list[str]:
        """The live workers (`node|worker`) that consume `queue`. A live worker that did not say which
        queues it consumes (an older pgbeat) counts: it may."""
        members = [m.decode() for m in self.client.zrangebyscore(self.KEY, time.time(), "+inf")]
        queues = self.client.hmget(self.QUEUES, members) if members else []
        return [member for member, raw in zip(members, queues, strict=True)
                if raw is None or queue in json.loads(raw)]


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

    def overview(self, heartbeat_ttl: int, alive_nodes: set[str] | None = None,
                 messages: Iterable[QueuedMessage] = (), queue_lengths: dict[str, int] | None = None) -> dict[str, Any]:
        """Runs that are queued, running, or stuck (silent for longer than 3 heartbeats, or on a dead host),
        and per host queue the age of its oldest queued run. `messages` (pgbeat.coordination.dispatch.
        queued_messages) adds what waits in the queues without a run state yet (a `tasks.backup` no worker
        took), and `queue_lengths` how many messages wait per queue."""
        groups: dict[str, Any] = {"queued": [], "running": [], "stuck": [], "queue_ages": {},
                                  "queue_lengths": dict(queue_lengths or {})}
        now = time.time()
        for fields in self.active_runs():
            info = {k: fields.get(k, "?") for k in ("run_id", "target", "tier", "node", "step", "status")}
            silent = now - float(fields.get("updated_at", now))
            dead_host = alive_nodes is not None and fields.get("node") not in alive_nodes
            if fields["status"] in ("claimed", "queued"):
                groups["stuck" if dead_host else "queued"].append(info)
                queue = host_queue(fields.get("node", "?"))
                groups["queue_ages"][queue] = max(groups["queue_ages"].get(queue, 0.0), silent)
            else:
                stuck = dead_host or silent > 3 * max(heartbeat_ttl, 60)
                groups["stuck" if stuck else "running"].append(info)
        known = {info["run_id"] for kind in ("queued", "running", "stuck") for info in groups[kind]}
        for message in messages:
            run_id = message.run_id or message.task_id
            if run_id in known:
                continue  # its run state says more
            known.add(run_id)
            node = message.queue.removeprefix(host_queue("")) if message.queue.startswith(host_queue("")) else "-"
            groups["queued"].append({"run_id": run_id, "target": message.target or "?", "tier": message.tier or "?",
                                     "node": node, "step": message.task.removeprefix("tasks."), "status": "queued",
                                     "queue": message.queue})
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
