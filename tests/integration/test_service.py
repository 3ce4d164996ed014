"""The service around the chain: time limits, beat, and start-up with a bad configuration."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from tests.conftest import unique
from tests.support import VENV_BIN, Service, Worker, hold_lock, pg_dump_processes, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def locked_db(pg):
    name = pg.createdb(unique("locked"))
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 1000) AS i", name)
    yield name
    pg.dropdb(name)


def test_step_time_limit_stops_pg_dump_and_cleans_up(workdir, pg, redis_server, locked_db):
    """A dump that outlives its time limit: pg_dump is terminated, partial files removed, failure notified."""
    service = Service(workdir, redis_server.url, [pg.target("slow", locked_db)], node=f"tl-{uuid.uuid4().hex[:6]}",
                      reliability={"time_limits": {"dump": 3}})
    worker = Worker(service)
    locker = hold_lock(pg, locked_db, 12)
    try:
        result = service.pgbeat("backup", "daily", "--target", "slow", timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "time limit" in result.stdout
        assert not pg_dump_processes(locked_db)
        [event] = service.events()
        assert event["kind"] == "failure" and event["step"] == "dump" and "time limit" in event["reason"]
        assert not list((service.backup_root / ".work").iterdir())
        assert service.backups() == []
    finally:
        locker.terminate()
        worker.stop()


def test_beat_tick_sends_a_scheduled_backup(workdir, pg, redis_server, make_db):
    """A real `celery beat` emits tasks.backup for a target/tier; the worker makes a backup of that slot."""
    db = make_db("beat")
    service = Service(workdir, redis_server.url,
                      [pg.target("ticked", db, tiers={"daily": {"schedule": "* * * * *"},
                                                      "weekly": {"enabled": False}, "monthly": {"enabled": False}})],
                      node=f"beat-{uuid.uuid4().hex[:6]}")
    worker = Worker(service)
    beat_log = workdir / "beat.log"
    beat = subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers.app", "beat", "-l", "INFO"], cwd=service.cwd,
                            env=service.env(), stdout=beat_log.open("wb"), stderr=subprocess.STDOUT)
    try:
        [backup] = wait_for(lambda: service.backups(), 90, 0.5, what="a backup sent by beat")
        manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
        assert manifest["slot"] and manifest["slot"].endswith("+0000")  # a scheduled run records its slot
        assert "Sending due task backup ticked daily (tasks.backup)" in beat_log.read_text()
    finally:
        beat.terminate()
        beat.wait(20)
        worker.stop()


def test_bad_config_stops_worker_and_cli_with_every_error(workdir, redis_server):
    service = Service(workdir, redis_server.url, [{"name": "a b", "dbname": "x"}, {"name": "ok", "dbname": "y",
                                                                                   "port": 0}])
    result = service.pgbeat("config", "check")
    assert result.returncode == 2
    assert "At 'targets[0].name'" in result.stderr and "At 'targets[1].port'" in result.stderr
    assert "Traceback" not in result.stderr
    started = time.monotonic()
    worker = service.celery("worker", "-l", "INFO", timeout=60)
    assert worker.returncode == 2 and time.monotonic() - started < 30
    assert "At 'targets[0].name'" in worker.stderr and "Traceback" not in worker.stderr


def test_config_check_reports_targets_and_connectivity(workdir, pg, make_db):
    db = make_db("check")
    service = Service(workdir, None, [pg.target("good", db), pg.target("down", db, port=1)])
    result = service.pgbeat("config", "check")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "good: connection: " in result.stdout and "PostgreSQL 15" in result.stdout
    assert "down:" in result.stdout and "✗" in result.stdout
    assert "0 2 * * *" in result.stdout and "0 3 * * 0" in result.stdout and "0 4 1 * *" in result.stdout
