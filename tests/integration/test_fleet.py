"""Load: 60 targets on 3 database servers, 2 worker processes with 2 slots each (fault list item 11)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

import pytest
from celery import Celery

from pgbeat.coordination.dispatch import task_label
from tests.support import (
    VENV_BIN,
    RedisServer,
    Service,
    Worker,
    pg_dump_processes,
    run_state,
    table_locked,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.integration

TARGETS_PER_SERVER = 20


@pytest.fixture
def fleet(pg, pg2, pg3):
    """20 small databases on each of 3 clusters, each with rows of its own."""
    databases = []
    for cluster in (pg, pg2, pg3):
        for i in range(TARGETS_PER_SERVER):
            name = cluster.createdb(f"fleet_{uuid.uuid4().hex[:8]}")
            cluster.sql(f"CREATE TABLE t AS SELECT g AS id, md5(g::text || '{name}') AS h "
                        f"FROM generate_series(1, {100 + i}) AS g", name)
            databases.append((cluster, name))
    yield databases
    for cluster, name in databases:
        cluster.dropdb(name)


def test_sixty_targets_three_servers_caps_hold_and_everything_restores(workdir, fleet, redis_server, make_db):
    targets = [cluster.target(f"t{i:02d}", db) for i, (cluster, db) in enumerate(fleet)]
    service = Service(workdir, redis_server.url, targets, node=f"fleet-{uuid.uuid4().hex[:6]}",
                      reliability={"per_host_dumps": 1, "lock_ttl": 5})
    workers = [Worker(service, name=f"w{n}", concurrency=2) for n in (1, 2)]
    app = Celery(broker=service.redis_url)
    try:
        runs = {}
        for target in targets:
            run_id = uuid.uuid4().hex
            app.send_task("tasks.backup", args=[target["name"], "daily"], task_id=run_id, queue="pgbeat")
            runs[run_id] = target
        states = {run_id: wait_run(redis_server.client, run_id, 600) for run_id in runs}
    finally:
        for worker in workers:
            worker.stop()
    assert [s["status"] for s in states.values()] == ["succeeded"] * 60
    # Both worker processes took part (Celery logs a step under its Flower name: `dump t07/daily`).
    dumped = [{t["name"] for t in targets if f"Task {task_label('dump', t['name'], 'daily')}[" in w.log_text()}
              for w in workers]
    assert all(dumped) and set().union(*dumped) == {t["name"] for t in targets}, dumped

    by_server = defaultdict(list)
    for run_id, target in runs.items():
        backup = service.backup_root / "daily" / states[run_id]["final_path"].rsplit("/", 1)[-1]
        manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
        start = datetime.fromisoformat(manifest["steps"]["dump"]["started_at"])
        by_server[target["port"]].append((start, start + timedelta(seconds=manifest["steps"]["dump"]["duration_s"]),
                                          target, backup))
    assert len(by_server) == 3
    for spans in by_server.values():
        spans.sort(key=lambda span: span[0])
        for before, after in itertools.pairwise(spans):
            assert before[1] <= after[0], f"two dumps at once on one server: {before[:2]} and {after[:2]}"

    clusters = {cluster.port: cluster for cluster, _ in fleet}
    for spans in by_server.values():
        for _, _, target, backup in spans:
            cluster = clusters[target["port"]]
            restored = make_db("restored", cluster=cluster)
            cluster.restore_plain_gz(backup, restored)
            query = "SELECT count(*) || ':' || md5(string_agg(h, ',' ORDER BY id)) FROM t"
            assert cluster.sql(query, restored) == cluster.sql(query, target["dbname"])


def test_manual_backup_is_not_stuck_behind_scheduled_ones(workdir, pg, redis_server, make_db):
    """Six scheduled-priority runs queued before one manual run, one worker slot: the manual one goes first."""
    db = make_db("prio")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 20000) AS i", db)
    targets = [pg.target(f"s{i}", db) for i in range(6)] + [pg.target("manual", db)]
    service = Service(workdir, redis_server.url, targets, node=f"prio-{uuid.uuid4().hex[:6]}",
                      reliability={"per_host_dumps": 0})
    app = Celery(broker=service.redis_url)
    # Every producer must name the priority lists as the workers do (workers.config); beat does.
    app.conf.broker_transport_options = {"priority_steps": list(range(10)), "sep": ":",
                                         "queue_order_strategy": "priority"}
    runs = {}
    for target in targets[:-1]:  # what beat sends at 02:00 (priority 6)
        runs[target["name"]] = uuid.uuid4().hex
        app.send_task("tasks.backup", args=[target["name"], "daily"], task_id=runs[target["name"]], queue="pgbeat",
                      priority=6)
    result = service.pgbeat("backup", "daily", "--target", "manual", "--no-wait")  # priority 0
    runs["manual"] = result.stdout.split("queued as run ")[1].split()[0]
    worker = Worker(service, concurrency=1)  # everything is queued before the only slot opens
    try:
        finished = {name: wait_run(redis_server.client, run_id, 180) for name, run_id in runs.items()}
    finally:
        worker.stop()
    assert {s["status"] for s in finished.values()} == {"succeeded"}
    order = sorted(finished, key=lambda name: float(finished[name]["updated_at"]))
    assert order.index("manual") <= 1, order  # first, or second behind a chain that had already begun


@pytest.fixture
def own_redis(tmp_path_factory):
    """A Redis of this test's own: the session's holds whatever runs earlier tests left stuck."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def test_runs_of_a_dead_host_are_redispatched(tmp_path_factory, pg, own_redis, make_db):
    """Host A dies for good mid-dump: its run is seen as stuck, abandoned and done again on host B."""
    redis_server = own_redis
    db = make_db("dead")
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 1000) AS i", db)
    config = {"reliability": {"node_timeout": 10, "lock_ttl": 2, "visibility_timeout": 8, "restore_interval": 2,
                              "retry_backoff_max": 3}}
    host_a = Service(tmp_path_factory.mktemp("host_a"), redis_server.url, [pg.target("erp", db)], node="host-a",
                     **config)
    host_b = Service(tmp_path_factory.mktemp("host_b"), redis_server.url, [pg.target("erp", db)], node="host-b",
                     **config)
    worker_a = Worker(host_a)
    with table_locked(pg, db):
        run_id = uuid.uuid4().hex
        Celery(broker=redis_server.url).send_task("tasks.backup", args=["erp", "daily"], task_id=run_id,
                                                  queue="pgbeat")
        wait_for(lambda: pg_dump_processes(db), 20, what="pg_dump on host A")
        os.kill(worker_a.proc.pid, signal.SIGKILL)  # host A is gone and does not come back
        worker_a.proc.wait(10)
    worker_b = Worker(host_b)
    try:
        # Host A's last heartbeat expires (30 s), then status calls its run stuck.
        stuck = wait_for(lambda: json.loads(host_b.pgbeat("status", "--json").stdout)["runs"].get("stuck"), 60, 2,
                         what="the run to be reported stuck")
        assert [r["run_id"] for r in stuck] == [run_id]
        assert host_b.celery("call", "tasks.reconcile").returncode == 0
        old = wait_for(lambda: (s := run_state_of(redis_server, run_id)).get("status") == "abandoned" and s, 30,
                       what="the run to be abandoned")
        state = wait_run(redis_server.client, old["replaced_by"], 90)
    finally:
        worker_b.stop()
    assert state["status"] == "succeeded" and state["node"] == "host-b"
    assert host_a.backups() == [] and len(host_b.backups()) == 1
    [warning] = [e for e in host_b.events() if e["kind"] == "warning"]
    assert "re-dispatched" in warning["warnings"][0] and run_id in warning["warnings"][0]


def run_state_of(redis_server, run_id: str) -> dict:
    return run_state(redis_server.client, run_id)


def test_a_lost_restore_fails_and_does_not_stop_the_reconciler(tmp_path_factory, pg, redis_server, make_db):
    """A restore and a backup were running on a host that died: the reconciler marks the restore failed (so
    `pgbeat restore --on-worker` stops waiting; a restore is never re-run elsewhere by itself) and still
    re-dispatches the backup."""
    db = make_db("lost")
    service = Service(tmp_path_factory.mktemp("lost"), redis_server.url, [pg.target("erp", db)], node="live",
                      reliability={"node_timeout": 10})
    long_ago = str(time.time() - 3600)
    restore_id, backup_id = uuid.uuid4().hex, uuid.uuid4().hex
    runs = {restore_id: {"status": "running", "step": "load", "target": "erp", "kind": "restore"},
            backup_id: {"status": "running", "step": "dump", "target": "erp", "tier": "daily"}}
    for run_id, fields in runs.items():
        redis_server.client.hset(f"pgbeat:run:{run_id}", mapping={**fields, "node": "gone", "updated_at": long_ago})
    code = ("import json; from workers.app import app; from workers.reconcile import reconcile; "
            "from pgbeat.settings import get_settings; report = reconcile(app, get_settings()); "
            # the re-dispatched backup is taken back out of the shared broker: no later test's worker runs it
            "report['purged'] = app.control.purge(); print(json.dumps(report))")
    done = subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=service.cwd, env=service.env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["failed"] == [restore_id]
    assert [r["abandoned"] for r in report["redispatched"]] == [backup_id] and report["purged"] == 1
    lost = run_state_of(redis_server, restore_id)
    assert lost["status"] == "failed" and "gone" in json.loads(lost["failure"])["message"]
    assert run_state_of(redis_server, backup_id)["status"] == "abandoned"
