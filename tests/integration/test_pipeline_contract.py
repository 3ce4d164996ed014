"""Both runners, real processes: the in-process CLI and the Celery chain follow the same step table.

With a fault point making every step of the table fail transiently once (pgbeat.faults, action
`transient`), each runner retries each step and completes a backup that restores; the healthchecks start
ping goes out once per run whatever was retried; a target held by another backup makes the dump wait in
both (an flock in-process, a Redis lease in Celery) instead of failing.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from pgbeat.coordination.filelock import FileLock
from pgbeat.coordination.leases import RedisLease, target_lock_key
from pgbeat.pipeline.steps_table import STEPS
from tests.support import VENV_BIN, Service, Worker, run_state, wait_for, wait_run

pytestmark = pytest.mark.integration

# Small backoffs keep the retries fast; the same settings drive both runners.
RELIABILITY = {"retries": 1, "retry_backoff": 1, "retry_backoff_max": 1, "lock_ttl": 3}
EVERY_STEP_ONCE = ",".join(f"{name}.start=transient" for name in STEPS)


@pytest.fixture
def db(pg, make_db):
    name = make_db("contract")
    pg.sql("CREATE TABLE invoices AS SELECT i AS id, md5(i::text) AS h FROM generate_series(1, 500) AS i", name)
    return name


def service_for(workdir, pg, db, http, redis_url: str | None) -> tuple[Service, str]:
    check = f"{http.base()}/ping/{uuid.uuid4()}"
    service = Service(workdir, redis_url, [pg.target("erp", db, healthcheck_url=check)],
                      node=f"contract-{uuid.uuid4().hex[:6]}", reliability=RELIABILITY)
    return service, check.removeprefix(http.base())


def fired(folder) -> set[str]:
    return {p.name.removesuffix(".start.fired") for p in folder.glob("*.start.fired")}


def assert_restores(pg, make_db, service: Service, db: str) -> None:
    [backup] = service.backups()
    restored = make_db("contract_restored")
    pg.restore_plain_gz(backup, restored)
    assert pg.dump_text(restored) == pg.dump_text(db)


def test_in_process_runner_retries_every_step_once(workdir, pg, db, make_db, http):
    service, base = service_for(workdir, pg, db, http, None)
    faults = workdir / "faults"
    faults.mkdir()
    result = service.pgbeat("backup", "daily", PGBEAT_FAULTS=EVERY_STEP_ONCE, PGBEAT_FAULTS_DIR=str(faults))
    assert result.returncode == 0, result.stdout + result.stderr
    assert fired(faults) == set(STEPS)
    [log] = (service.backup_root / "logs").glob("erp_daily_*.log")
    retried = [line for line in log.read_text().splitlines() if "injected transient failure" in line]
    assert [line.split("fault point ")[1].split(".start")[0] for line in retried] == list(STEPS)
    assert_restores(pg, make_db, service, db)
    assert http.paths() == [f"{base}/start", base]


def test_celery_chain_retries_every_step_once(workdir, pg, db, make_db, http, redis_server):
    service, base = service_for(workdir, pg, db, http, redis_server.url)
    faults = workdir / "faults"
    faults.mkdir()
    worker = Worker(service, PGBEAT_FAULTS=EVERY_STEP_ONCE, PGBEAT_FAULTS_DIR=str(faults))
    try:
        result = service.celery("call", "tasks.backup", f"--args={json.dumps(['erp', 'daily'])}")
        assert result.returncode == 0, result.stderr
        run_id = result.stdout.strip()
        state = wait_run(redis_server.client, run_id, 120)
        assert state["status"] == "succeeded", state
        progress = [line.decode() for line in redis_server.client.lrange(f"pgbeat:run:{run_id}:progress", 0, -1)]
        retried = [line.split(" will be retried")[0] for line in progress if "will be retried" in line]
        assert retried == list(STEPS), progress
    finally:
        worker.stop()
    assert fired(faults) == set(STEPS)
    assert_restores(pg, make_db, service, db)
    assert http.paths() == [f"{base}/start", base]


def test_a_held_target_waits_in_process(workdir, pg, db, http):
    service, _ = service_for(workdir, pg, db, http, None)
    lock = FileLock(service.backup_root, "target-erp")
    assert lock.acquire()
    try:
        proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), "backup", "daily"], cwd=service.cwd, env=service.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        assert proc.poll() is None and service.backups() == []  # waiting for the target, not failed
    finally:
        lock.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert len(service.backups()) == 1


def test_a_held_target_waits_in_celery(workdir, pg, db, http, redis_server):
    service, _ = service_for(workdir, pg, db, http, redis_server.url)
    worker = Worker(service)
    lease = RedisLease(redis_server.client, target_lock_key("erp"), 30, "another-host", "another-run")
    assert lease.acquire()
    try:
        result = service.celery("call", "tasks.backup", f"--args={json.dumps(['erp', 'daily'])}")
        assert result.returncode == 0, result.stderr
        run_id = result.stdout.strip()
        wait_for(lambda: run_state(redis_server.client, run_id).get("status") == "waiting", 30, what="waiting")
        time.sleep(2)
        assert run_state(redis_server.client, run_id).get("status") == "waiting" and service.backups() == []
        lease.release()
        state = wait_run(redis_server.client, run_id, 120)
        assert state["status"] == "succeeded", state
    finally:
        lease.release()
        worker.stop()
    assert len(service.backups()) == 1
