"""Scheduling never stops silently: real `celery beat` (RedBeat, workers.scheduler) and worker processes
against a real redis-server that restarts with and without its data, goes away, fails over to a replica
without the data and loses single keys, and a standby beat that takes over.

The fast tests watch RedBeat's keys in Redis (no minute boundary needed); the slow one waits for real
slots of a tier scheduled every minute and checks their backups.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support import VENV_BIN, RedisServer, Service, Worker, wait_for

pytestmark = pytest.mark.integration

PREFIX = "pgbeat:redbeat:"
LOCK = f"{PREFIX}:lock"
SCHEDULE = f"{PREFIX}:schedule"
STATICS = f"{PREFIX}:statics"
ENTRY = "backup erp daily"
# The shortest lock the settings allow: beat ticks every 2 s (a fifth of it), a standby takes over within 12 s.
LOCK_TIMEOUT = 10
EVERY_MINUTE = {"daily": {"schedule": "* * * * *"}, "weekly": {"enabled": False}, "monthly": {"enabled": False}}
# For the tests that watch the keys: an entry that never fires while they run, so its last run stays put.
YEARLY = {"daily": {"schedule": "0 0 1 1 *"}, "weekly": {"enabled": False}, "monthly": {"enabled": False}}


class Beat:
    """A real `celery -A workers.app beat` process serving a Service."""

    def __init__(self, service: Service, name: str = "a") -> None:
        self.name = name
        self.log = service.base / f"beat-{name}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers.app", "beat", "-l", "INFO"],
                                     cwd=service.cwd, env=service.env(), stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def sent(self, entry: str = ENTRY) -> int:
        return self.log_text().count(f"Sending due task {entry} ")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def beat_service(workdir: Path, redis: RedisServer, targets: list[dict] | None = None) -> Service:
    targets = targets or [{"name": "erp", "host": "127.0.0.1", "port": 1, "dbname": "erp", "tiers": YEARLY,
                           "drill": {"enabled": False}}]
    return Service(workdir, redis.url, targets, node=f"sch-{uuid.uuid4().hex[:6]}",
                   reliability={"beat_lock_timeout": LOCK_TIMEOUT})


def holder(redis: RedisServer) -> str | None:
    """The token of the beat holding the leader lock: `host:pid:nonce` (None if nobody holds it)."""
    value = redis.client.get(LOCK)
    return value.decode() if value else None


def holder_pid(redis: RedisServer) -> int | None:
    token = holder(redis)
    return int(token.split(":")[1]) if token else None


def entry_state(redis: RedisServer, entry: str = ENTRY) -> tuple[bool, str, bool]:
    """(definition present, last run, in the due-time set) of one RedBeat entry."""
    key = PREFIX + entry
    definition, meta = redis.client.hmget(key, "definition", "meta")
    last_run = json.loads(meta)["last_run_at"] if meta else None
    return definition is not None, json.dumps(last_run), redis.client.zscore(SCHEDULE, key) is not None


def schedule_complete(redis: RedisServer) -> bool:
    definition, _, due = entry_state(redis)
    return definition and due and redis.client.sismember(STATICS, ENTRY) and holder(redis) is not None


def fail_over_to_an_empty_replica(redis: RedisServer, beat: Beat) -> None:
    """A failover that loses the data: this Redis becomes a read-only replica of an empty one, takes its
    empty data set, and (once beat's writes have failed with READONLY) is promoted back to primary."""
    other = RedisServer(redis.dir.parent)
    other.client.config_set("repl-diskless-sync-delay", 0)
    try:
        failures = beat.log_text().count("beat: Redis fails")
        redis.client.replicaof("127.0.0.1", other.port)
        wait_for(lambda: redis.client.info("replication").get("master_link_status") == "up", 20,
                 what="the replica to sync")
        wait_for(lambda: beat.log_text().count("beat: Redis fails") > failures, 10, what="beat to meet the replica")
        assert "read only replica" in beat.log_text().rsplit("beat: Redis fails", 1)[1]
        redis.client.replicaof("NO", "ONE")
    finally:
        other.stop()


def wipe_and_restart(redis: RedisServer, beat: Beat | None = None) -> None:
    """Restart Redis without its data (AOF and RDB files removed while it is down)."""
    redis.stop()
    for path in redis.dir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    redis.start()


# --- Lost keys and a lock another beat holds, watched in Redis --------------------------------------------

# Every key RedBeat keeps, lost while beat runs, and what beat says when it writes it back.
LOSSES = {
    "everything (restarted without its data)": (wipe_and_restart, "were missing from Redis"),
    "everything (failed over to a replica without the data)": (fail_over_to_an_empty_replica,
                                                               "were missing from Redis"),
    "the leader lock": (lambda r, _: r.client.delete(LOCK), "had vanished from Redis"),
    "an entry's hash": (lambda r, _: r.client.delete(PREFIX + ENTRY), "were missing from Redis"),
    "an entry's due time": (lambda r, _: r.client.zrem(SCHEDULE, PREFIX + ENTRY), "were missing from Redis"),
    "the static entries' set": (lambda r, _: r.client.delete(STATICS), "configured entries"),
}


def test_beat_restores_whatever_redis_lost_and_stands_by_for_another_beat(workdir):
    """RedBeat alone exits when its lock is gone or another beat took it, and drops an entry for good when
    its hash or due time is gone. Here the same beat takes the lock again and writes each lost key back
    with the entry's last run; when another beat holds the lock it stands by in place, and leads again
    when that beat is gone. (A Redis down at start is in the slow test.)"""
    redis = RedisServer(workdir, persistent=True)
    beat = Beat(beat_service(workdir, redis))
    try:
        wait_for(lambda: schedule_complete(redis), 30, what="beat's entries and lock")
        token, before = holder(redis), entry_state(redis)
        for lost, (lose, said) in LOSSES.items():
            told = beat.log_text().count(said)
            lose(redis, beat)
            wait_for(lambda said=said, told=told: (beat.log_text().count(said) > told and schedule_complete(redis))
                     or not beat.alive(), 3 * LOCK_TIMEOUT, what=f"{lost} restored")
            assert beat.alive(), f"{lost}: {beat.log_text()[-3000:]}"
            assert holder(redis) == token, lost  # the same beat leads: nothing was restarted
            assert entry_state(redis) == before, lost  # same definition, same last run, due again

        redis.client.set(LOCK, "elsewhere:1:x", px=LOCK_TIMEOUT * 1000)  # another beat has the lock now
        wait_for(lambda: "this beat is a standby" in beat.log_text() or not beat.alive(), 10, what="beat to stand by")
        time.sleep(1)
        assert beat.alive() and holder(redis) == "elsewhere:1:x", beat.log_text()[-3000:]  # standing by
        redis.client.delete(LOCK)  # ... and that beat is gone
        wait_for(lambda: holder(redis) == token, 10, what="beat to take the free lock again")
        assert "Traceback" not in beat.log_text()
    finally:
        beat.stop()
        redis.stop()


# --- Real slots: a tier every minute, a worker, two beats, Redis restarts and a failover ---------------------


class Supervised:
    """Start a process again whenever it exits, as the units' Restart=always does; keep every exit code."""

    def __init__(self, start) -> None:
        self.start, self.runs, self.exits, self.enabled = start, [start()], [], True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    @property
    def current(self):
        return self.runs[-1]

    def _watch(self) -> None:
        while self.enabled:
            code = self.current.proc.poll()
            if code is not None and self.enabled:
                self.exits.append(code)
                time.sleep(1)
                if self.enabled:
                    self.runs.append(self.start())
            time.sleep(0.3)

    def stop(self) -> None:
        self.enabled = False
        self.thread.join(10)
        for run in self.runs:
            run.stop()


def slot_of_minute(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M+0000", time.gmtime(epoch))


def backed_up_slots(service: Service) -> list[str]:
    slots = []
    for backup in service.backups():
        manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
        assert manifest["status"] == "verified" and manifest["complete"], manifest
        slots.append(manifest["slot"])
    return slots


def successes(service: Service) -> int:
    return sum(event["kind"] == "success" for event in service.events())


def wait_for_slot(service: Service, boundary: float, runs: int) -> None:
    """Wait until the slot of `boundary` has its backup and the chain has finished (`runs` successes)."""
    slot = slot_of_minute(boundary)
    wait_for(lambda: slot in backed_up_slots(service) and successes(service) >= runs, boundary - time.time() + 60,
             0.5, what=f"the backup of {slot}")


def sleep_until(epoch: float) -> None:
    time.sleep(max(0.0, epoch - time.time()))


@pytest.mark.slow
def test_slots_keep_firing_through_redis_restarts_and_a_beat_failover(workdir, pg, make_db):
    """(a) Redis restarted with its data, (b) restarted without it (no worker connected meanwhile), (c) the
    leading beat SIGKILLed while a standby runs: each time the next slot fires, once, and its backup
    verifies and restores. About two and a half minutes: three minute boundaries."""
    db = make_db("sched")
    pg.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 500) AS i", db)
    redis = RedisServer(workdir, persistent=True)
    service = beat_service(workdir, redis, [pg.target("erp", db, tiers=EVERY_MINUTE, drill={"enabled": False})])
    beats: dict[str, Supervised] = {}
    worker = late_worker = None
    expected: list[float] = []

    def sent() -> int:
        return sum(run.sent() for beat in beats.values() for run in beat.runs)

    try:
        # The beats start before Redis (a host booting): RedBeat alone exits 1; these wait for it.
        redis.stop()
        beats = {name: Supervised(lambda name=name: Beat(service, name)) for name in ("a", "b")}
        wait_for(lambda: all("beat: Redis fails" in beat.current.log_text() for beat in beats.values()), 20,
                 what="the beats to start")
        redis.start()
        worker = Supervised(lambda: Worker(service, name=f"w{time.monotonic_ns()}"))
        wait_for(lambda: schedule_complete(redis), 30, what="a beat to lead")
        boundary = (time.time() // 60 + 1) * 60

        # (a) With its data (AOF): lock, entries and last runs survive; beats and worker reconnect. If Redis
        # is still down at the slot's time, the leader sends it as soon as Redis is back.
        redis.restart(down_for=1)
        expected.append(boundary)
        wait_for_slot(service, boundary, len(expected))

        # (b) Without its data, and no worker connected until beat has sent the slot: a beat takes the lock
        # again and writes the entries back with the last runs it saw; the message waits for a worker.
        # The worker leaves by a remote shutdown (`celery control shutdown`, Flower's button): exit 0, which
        # the units restart (Restart=always) and Restart=on-failure would not.
        worker.enabled = False
        service.celery("control", "shutdown", "-d", worker.current.name)  # it replies nothing: "no nodes replied"
        assert worker.current.proc.wait(30) == 0
        boundary += 60
        sleep_until(boundary - 12)
        sent_before = sent()
        wipe_and_restart(redis)
        wait_for(lambda: sent() > sent_before, boundary - time.time() + 30, 0.5,
                 what="a beat to send the slot after the data loss")
        late_worker = Worker(service, name="late")
        expected.append(boundary)
        wait_for_slot(service, boundary, len(expected))

        # (c) The leading beat killed: the standby takes over within the lock timeout and sends the next slot.
        leader = next(name for name, beat in beats.items() if beat.current.proc.pid == holder_pid(redis))
        standby = beats["b" if leader == "a" else "a"].current
        beats[leader].enabled = False
        beats[leader].current.proc.kill()
        wait_for(lambda: holder_pid(redis) == standby.proc.pid, LOCK_TIMEOUT + 10, what="the standby to take over")
        standby_sent = standby.sent()
        boundary += 60
        expected.append(boundary)
        wait_for_slot(service, boundary, len(expected))
        assert standby.sent() == standby_sent + 1
    finally:
        for supervised in (*beats.values(), worker):
            if supervised:
                supervised.stop()
        if late_worker:
            late_worker.stop()
        redis.stop()
    slots = backed_up_slots(service)
    assert sorted(slots) == [slot_of_minute(b) for b in expected], slots  # every slot once, none twice
    assert sent() == len(expected) and successes(service) == len(expected)
    assert beats["a"].exits == [] and beats["b"].exits == []  # no beat had to be restarted
    assert worker.exits == []  # the idle worker reconnected after the restart with data
    source = pg.dump_text(db)
    for backup in service.backups():
        restored = make_db("restored")
        pg.restore_plain_gz(backup, restored)
        assert pg.dump_text(restored) == source, backup.name
