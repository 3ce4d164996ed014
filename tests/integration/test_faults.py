"""Fault injection: kill, stop, starve and confuse the service; each test asserts the exact outcome.

Numbers refer to the fleet issue's list. Dumps are made to wait by a session holding an ACCESS EXCLUSIVE
lock on the table being dumped, so "mid-dump" is a fact, not a race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import psutil
import pytest

from tests.conftest import unique
from tests.support import (
    VENV_BIN,
    RedisServer,
    Service,
    Worker,
    free_port,
    pg_dump_processes,
    run_state,
    table_locked,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.integration

FAST = {"lock_ttl": 2, "visibility_timeout": 10, "restore_interval": 2, "retry_backoff": 1, "retry_backoff_max": 4,
        "retries": 2}


@pytest.fixture
def locked_db(pg):
    name = pg.createdb(unique("faults"))
    pg.sql("CREATE TABLE big AS SELECT i, md5(i::text) AS h FROM generate_series(1, 2000) AS i", name)
    yield name
    pg.dropdb(name)


def service_for(workdir, redis_url, pg, db, **config) -> Service:
    reliability = {**FAST, **config.pop("reliability", {})}
    return Service(workdir, redis_url, [pg.target("erp", db, **config.pop("target", {}))],
                   node=f"f-{uuid.uuid4().hex[:6]}", reliability=reliability, **config)


def call(service: Service, *args: str) -> str:
    result = service.celery("call", "tasks.backup", '--args=["erp", "daily"]', *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def events_of(service: Service, run_id: str) -> list[str]:
    return [e["kind"] for e in service.events() if e["run_id"] == run_id]


def wait_failed(redis_client, service: Service, run_id: str, timeout: float = 60) -> dict:
    """Wait until run `run_id` failed and its notify step told so: the errback marks the run failed, then
    sends notify, so the worker must not be stopped between the two."""
    state = wait_run(redis_client, run_id, timeout)
    if state["status"] == "failed":
        wait_for(lambda: "failure" in events_of(service, run_id), 60, what="the failure notification")
    return state


def test_1_sigkill_of_the_worker_mid_dump(workdir, pg, redis_server, locked_db):
    service = service_for(workdir, redis_server.url, pg, locked_db)
    worker = Worker(service)
    try:
        with table_locked(pg, locked_db):
            run_id = call(service)
            [dump] = wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
            os.kill(worker.proc.pid, signal.SIGKILL)  # the whole worker: main process first
            wait_for(lambda: not dump.is_running() or dump.status() == psutil.STATUS_ZOMBIE, 10, what="pg_dump to die")
            lock_key = "pgbeat:lock:target:erp"
            assert redis_server.client.pttl(lock_key) <= FAST["lock_ttl"] * 1000  # it expires on its own
            wait_for(lambda: not redis_server.client.exists(lock_key), 10, what="the lock to expire")
    finally:
        worker.stop()
    assert service.backups() == []  # nothing under a final name from the killed run
    successor = Worker(service, name="w2")  # Redis gives the unacknowledged dump back after the timeout
    try:
        state = wait_run(redis_server.client, run_id, 90)
    finally:
        successor.stop()
    assert state["status"] == "succeeded"
    assert len(service.backups()) == 1
    assert events_of(service, run_id) == ["warning", "success"]  # one redelivery, one backup
    assert "attempt 2" in service.events()[0]["warnings"][0]


def test_2_sigterm_mid_dump_is_a_warm_shutdown(workdir, pg, redis_server, locked_db):
    service = service_for(workdir, redis_server.url, pg, locked_db)
    worker = Worker(service)
    with table_locked(pg, locked_db):
        run_id = call(service)
        [dump] = wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert dump.is_running() and worker.proc.poll() is None  # the running dump is not cut short
    worker.proc.wait(60)
    assert not pg_dump_processes(locked_db)  # no orphan
    assert run_state(redis_server.client, run_id)["status"] in ("running", "queued")  # done with the dump only
    successor = Worker(service, name="w2")
    try:
        assert wait_run(redis_server.client, run_id, 60)["status"] == "succeeded"
    finally:
        successor.stop()
    assert len(service.backups()) == 1 and events_of(service, run_id) == ["success"]


def test_3_dump_longer_than_the_visibility_timeout_runs_once(workdir, pg, redis_server, locked_db):
    service = service_for(workdir, redis_server.url, pg, locked_db, reliability={"visibility_timeout": 5})
    worker = Worker(service, concurrency=3)
    with table_locked(pg, locked_db):
        run_id = call(service)
        wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
        wait_for(lambda: "is running elsewhere" in worker.log_text(), 40, what="a redelivered copy")
        assert len(pg_dump_processes(locked_db)) == 1
        time.sleep(6)  # another visibility timeout
        assert len(pg_dump_processes(locked_db)) == 1
    try:
        assert wait_run(redis_server.client, run_id, 60)["status"] == "succeeded"
    finally:
        worker.stop()
    assert run_state(redis_server.client, run_id)["attempts:dump:0"] == "1"  # pg_dump ran once
    assert len(service.backups()) == 1 and events_of(service, run_id) == ["success"]


def test_4_one_backup_per_slot_with_duplicates_and_two_beats(workdir, pg, redis_server, locked_db):
    service = service_for(workdir, redis_server.url, pg, locked_db, reliability={"catch_up_window": 1.0}, target={
        "tiers": {"daily": {"schedule": "* * * * *"}, "weekly": {"enabled": False}, "monthly": {"enabled": False}},
        "drill": {"enabled": False}})
    worker = Worker(service)
    try:
        while time.localtime().tm_sec > 50:  # keep the two messages inside one minute's slot
            time.sleep(1)
        first, second = call(service, '--kwargs={"scheduled": true}'), call(service, '--kwargs={"scheduled": true}')
        states = [wait_run(redis_server.client, r) for r in (first, second)]
        assert sorted(s["status"] for s in states) == ["skipped", "succeeded"], states
        assert len(service.backups()) == 1
        beats = [subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers.app", "beat", "-l", "INFO"],
                                  cwd=service.cwd, env=service.env(), stdout=(workdir / f"beat{i}.log").open("wb"),
                                  stderr=subprocess.STDOUT) for i in range(2)]
        try:
            # Wait through the next minute's slot: one beat leads, the other stands by.
            wait_for(lambda: len(service.backups()) >= 2, 90, 0.5, what="beat's backup of the next slot")
            time.sleep(5)  # room for a duplicate to show up, if there were one
        finally:
            for beat in beats:
                beat.terminate()
                beat.wait(20)
    finally:
        worker.stop()
    slots = [json.loads(p.with_name(p.name + ".manifest.json").read_text())["slot"] for p in service.backups()]
    assert len(slots) == len(set(slots)), slots  # never two backups of one slot
    logs = [(workdir / f"beat{i}.log").read_text() for i in range(2)]
    assert sum("Sending due task backup erp daily" in log for log in logs) == 1  # one leader sends


class Supervisor:
    """Restart the worker whenever it exits, as systemd's Restart=on-failure does in deploy/systemd."""

    def __init__(self, service: Service) -> None:
        self.service, self.workers, self.stopping = service, [Worker(service, name="w0")], False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopping:
            if self.workers[-1].proc.poll() is not None:
                time.sleep(1)
                self.workers.append(Worker(self.service, name=f"w{len(self.workers)}"))
            time.sleep(0.5)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(10)
        for worker in self.workers:
            worker.stop()


def test_5_redis_restarted_mid_chain(workdir, pg, locked_db):
    # Redis with AOF (what deploy/ runs): queued and unacknowledged messages survive its restart.
    redis = RedisServer(workdir, persistent=True)
    service = service_for(workdir, redis.url, pg, locked_db)
    supervisor = Supervisor(service)
    with table_locked(pg, locked_db):
        run_id = call(service)
        wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
        redis.restart()
        wait_for(lambda: not pg_dump_processes(locked_db), 20, what="the cut-off dump to stop")  # no orphan
    try:
        state = wait_failed(redis.client, service, run_id, 120)
    finally:
        supervisor.stop()
        redis.stop()
    kinds = events_of(service, run_id)
    if state["status"] == "succeeded":
        assert len(service.backups()) == 1 and kinds.count("success") == 1, (state, kinds)
    else:  # loud: a failure notification, no stall
        assert kinds.count("failure") == 1 and service.backups() == [], (state, kinds)


def test_6_unreachable_database_retries_then_one_failure(workdir, pg, redis_server, locked_db):
    service = service_for(workdir, redis_server.url, pg, locked_db)
    worker = Worker(service)
    try:
        first = call(service)
        assert wait_run(redis_server.client, first)["status"] == "succeeded"
        [older] = service.backups()
        before = older.read_bytes()
        service.config["targets"][0]["port"] = free_port()
        service.write_config()
        worker.stop()
        worker = Worker(service, name="w2")
        run_id = call(service)
        assert wait_failed(redis_server.client, service, run_id, 60)["status"] == "failed"
    finally:
        worker.stop()
    assert worker.log_text().count("Retry in") == FAST["retries"]  # with backoff, then give up
    assert events_of(service, run_id) == ["failure"]
    assert service.backups() == [older] and older.read_bytes() == before


@pytest.fixture
def tmpfs(workdir):
    """A small tmpfs as BACKUP_ROOT (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = workdir / "small"
    mount.mkdir()

    def make(size: str):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)], check=True)
        return mount

    yield make
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize(("size", "step", "streaming"), [("256k", "dump", True), ("256k", "dump", False),
                                                       ("1200k", "compress", False)])
def test_7_8_disk_full_fails_cleanly_and_rotates_nothing(workdir, pg, locked_db, tmpfs, size, step, streaming):
    # About 1 MB of dump that compresses to about half: 256k fills during the dump (compressed as it streams
    # or not), 1200k during the compress step of a dump written out first.
    pg.sql("CREATE TABLE noise AS SELECT md5(i::text) || md5((i * 7)::text) AS h FROM generate_series(1, 14000) i",
           locked_db)
    root = tmpfs(size)
    service = service_for(workdir, None, pg, locked_db, backup_root=str(root),
                          target={"tiers": {"daily": {"keep_days": 0}}, "streaming": streaming})
    old = root / "daily" / "erp_backup_daily_20200101_020000.sql.gz"
    old.parent.mkdir(mode=0o700)
    old.write_bytes(b"\x1f\x8b" + b"0" * 100)
    old.with_name(old.name + ".manifest.json").write_text(json.dumps({
        "pgbeat_manifest": 1, "run_id": "x", "target": "erp", "tier": "daily", "file": old.name, "format": "plain",
        "codec": "gzip", "size": 102, "sha256": "0" * 64, "complete": True, "started_at": "2020-01-01T02:00:00Z"}))
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 1
    assert "No space left" in result.stdout and f"✗ {step}" in result.stdout
    assert old.exists()  # rotation never ran
    assert [p.name for p in (root / "daily").iterdir() if not p.name.startswith(old.name)] == []
    assert not list((root / ".work").iterdir())  # partial files removed
    assert "Traceback" not in result.stdout + result.stderr


def test_8_upload_failure_never_rotates_and_notifies_once(workdir, pg, redis_server, locked_db):
    down = {"name": "vault", "kind": "ssh", "host": "127.0.0.1", "port": free_port(), "user": "nobody",
            "path": "/tmp/nowhere", "retries": 1}
    service = service_for(workdir, redis_server.url, pg, locked_db, target={"tiers": {"daily": {"keep_days": 0}}})
    worker = Worker(service)
    try:
        first = call(service)
        assert wait_run(redis_server.client, first)["status"] == "succeeded"
        [older] = service.backups()
        service.config["targets"][0]["destinations"] = [down]
        service.write_config()
        worker.stop()
        worker = Worker(service, name="w2")
        run_id = call(service)
        state = wait_failed(redis_server.client, service, run_id, 60)
    finally:
        worker.stop()
    assert state["status"] == "failed" and json.loads(state["failure"])["step"] == "upload"
    assert older.exists()  # keep_days 0 would have removed it, had rotate run
    assert events_of(service, run_id) == ["failure"]
    assert "tasks.rotate" not in "".join(line for line in worker.log_text().splitlines() if run_id in line)


def test_10_lost_lock_aborts_the_dump(workdir, pg, redis_server, locked_db):
    service = service_for(workdir, redis_server.url, pg, locked_db)
    worker = Worker(service)
    try:
        with table_locked(pg, locked_db):
            run_id = call(service)
            wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
            redis_server.client.delete("pgbeat:lock:target:erp")
            state = wait_failed(redis_server.client, service, run_id, 30)
            assert not pg_dump_processes(locked_db)
    finally:
        worker.stop()
    assert state["status"] == "failed"
    failure = json.loads(state["failure"])
    assert failure["step"] == "dump" and "lost the target lock" in failure["message"]
    assert service.backups() == [] and events_of(service, run_id) == ["failure"]
    assert run_state(redis_server.client, run_id)["attempts:dump:0"] == "1"  # aborted, not run twice
