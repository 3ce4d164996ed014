"""The Celery chain on real worker processes, a real Redis and two real PostgreSQL clusters."""

from __future__ import annotations

import json
import signal
import time
import uuid
from datetime import datetime, timedelta

import pytest

from tests.conftest import DATA, unique
from tests.support import (
    SECRET_PASSWORD,
    Service,
    Worker,
    pg_dump_processes,
    run_state,
    table_locked,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dbs(pg, pg2):
    names = {"rich": unique("rich"), "small": unique("small"), "other": unique("other"), "locked": unique("locked")}
    pg.createdb(names["rich"])
    pg.psql_file(DATA / "rich.sql", names["rich"])
    pg.createdb(names["small"])
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 100) AS i", names["small"])
    pg2.createdb(names["other"])
    pg2.sql("CREATE TABLE other_t AS SELECT md5(i::text) AS h FROM generate_series(1, 50) AS i", names["other"])
    pg.createdb(names["locked"])
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 1000) AS i", names["locked"])
    yield names
    for cluster, key in ((pg, "rich"), (pg, "small"), (pg2, "other"), (pg, "locked")):
        cluster.dropdb(names[key])


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg, pg2, redis_server, dbs):
    redis_server.client.flushall()
    base = tmp_path_factory.mktemp("chain")
    base.chmod(0o755)
    targets = [
        pg.target("erp_rich", dbs["rich"]),
        pg.target("erp_small", dbs["small"], user="backup", password=SECRET_PASSWORD),
        pg2.target("erp_other", dbs["other"]),
        pg.target("erp_badpass", dbs["small"], user="backup", password="wrong-password"),
        pg.target("erp_locked", dbs["locked"]),
    ]
    svc = Service(base, redis_server.url, targets, node=f"chain-{uuid.uuid4().hex[:6]}",
                  reliability={"lock_ttl": 3, "retries": 1, "retry_backoff": 1, "catch_up_window": 1.0})
    yield svc


@pytest.fixture(scope="module")
def worker(service):
    w = Worker(service, concurrency=2)
    yield w
    w.stop()


def celery_call(service: Service, target: str, tier: str = "daily", **kwargs) -> str:
    args = ["call", "tasks.backup", f"--args={json.dumps([target, tier])}"]
    if kwargs:
        args.append(f"--kwargs={json.dumps(kwargs)}")
    result = service.celery(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_celery_call_round_trip(service, worker, pg, dbs, redis_server, make_db):
    """`celery call tasks.backup` on a running worker gives a verified backup that restores identically."""
    run_id = celery_call(service, "erp_rich")
    state = wait_run(redis_server.client, run_id)
    assert state["status"] == "succeeded", state
    backup = service.backup_root / "daily" / state["final_path"].rsplit("/", 1)[-1]
    assert backup.exists()
    restored = make_db("restored")
    pg.restore_plain_gz(backup, restored)
    assert pg.dump_text(restored) == pg.dump_text(dbs["rich"])

    # Every step ran as its own task, on this host's queue, and what Redis holds is a small record.
    metas = [json.loads(redis_server.client.get(k)) for k in redis_server.client.keys("celery-task-meta-*")]
    ours = [m for m in metas if isinstance(m.get("result"), dict) and m["result"].get("run_id") == run_id]
    assert {m["name"] for m in ours} >= {f"tasks.{s}" for s in
                                         ("dump", "compress", "verify", "upload", "rotate", "notify")}
    assert all(m["status"] == "SUCCESS" for m in ours)
    steps = [m for m in ours if m["name"] != "tasks.backup"]
    assert {m["queue"] for m in steps} == {f"pgbeat.host.{service.config['node']}"}
    assert max(len(json.dumps(m)) for m in ours) < 8000
    ttls = [redis_server.client.ttl(k) for k in redis_server.client.keys("celery-task-meta-*")]
    assert all(0 < ttl <= 86400 for ttl in ttls)  # results expire


def test_only_json_messages_are_accepted(service, worker, redis_server):
    """A pickled message is refused: pickle from a shared broker would be remote code execution."""
    from celery import Celery

    app = Celery(broker=service.redis_url)
    task_id = uuid.uuid4().hex
    app.send_task("tasks.backup", args=["erp_small", "daily"], task_id=task_id, queue="pgbeat",
                  serializer="pickle")
    wait_for(lambda: "ContentDisallowed" in worker.log_text() or "Refusing to deserialize" in worker.log_text(),
             30, what="the refusal in the worker log")
    assert run_state(redis_server.client, task_id) == {}


def test_cli_with_broker_follows_the_chain(service, worker):
    result = service.pgbeat("backup", "weekly", "--target", "erp_small")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded" in result.stdout
    assert len(service.backups("weekly")) == 1


def test_two_targets_on_two_clusters(service, worker, pg, pg2, dbs, make_db):
    before = set(service.backups("monthly"))
    result = service.pgbeat("backup", "monthly", "--target", "erp_small")
    other = service.pgbeat("backup", "monthly", "--target", "erp_other")
    assert result.returncode == 0 and other.returncode == 0, result.stdout + other.stdout
    new = sorted(set(service.backups("monthly")) - before)
    assert [p.name.split("_backup_")[0] for p in new] == ["erp_other", "erp_small"]
    for backup, cluster, db in ((new[0], pg2, dbs["other"]), (new[1], pg, dbs["small"])):
        restored = make_db("restored", cluster=cluster)
        cluster.restore_plain_gz(backup, restored)
        assert cluster.dump_text(restored) == cluster.dump_text(db)


def test_failed_dump_notifies_and_leaves_no_file(service, worker, redis_server):
    result = service.pgbeat("backup", "daily", "--target", "erp_badpass")
    assert result.returncode == 1
    assert "password authentication failed" in result.stdout
    assert not [p for p in service.backups() if p.name.startswith("erp_badpass")]
    # The errback marks the run failed, then sends notify: the outcome may arrive a moment after the CLI ends.
    failures = wait_for(lambda: [e for e in service.events() if e["target"] == "erp_badpass"], 30,
                        what="the failure notification")
    time.sleep(1)  # and it comes once
    assert failures == [e for e in service.events() if e["target"] == "erp_badpass"]
    assert len(failures) == 1 and failures[0]["kind"] == "failure" and failures[0]["step"] == "dump"
    assert any("password authentication failed" in line for line in failures[0]["details"])
    # The password is neither in the notification nor in anything Redis holds.
    dump = b"".join(redis_server.client.dump(k) or b"" for k in redis_server.client.keys("*"))
    assert b"wrong-password" not in dump and SECRET_PASSWORD.encode() not in dump
    assert "wrong-password" not in json.dumps(failures)


def test_duplicate_scheduled_messages_make_one_backup(service, worker, redis_server):
    """Two beat messages for the same (target, tier, slot): one backup, the other is skipped."""
    before = len([p for p in service.backups("weekly") if p.name.startswith("erp_other")])
    first = celery_call(service, "erp_other", "weekly", scheduled=True)
    second = celery_call(service, "erp_other", "weekly", scheduled=True)
    states = [wait_run(redis_server.client, first), wait_run(redis_server.client, second)]
    assert sorted(s["status"] for s in states) == ["skipped", "succeeded"]
    after = len([p for p in service.backups("weekly") if p.name.startswith("erp_other")])
    assert after == before + 1


def test_redelivered_message_does_not_dispatch_twice(service, worker, redis_server):
    from celery import Celery

    app = Celery(broker=service.redis_url)
    task_id = uuid.uuid4().hex
    before = len(service.backups("monthly"))
    app.send_task("tasks.backup", args=["erp_rich", "monthly"], task_id=task_id, queue="pgbeat")
    wait_run(redis_server.client, task_id)
    # The same message again, as after a redelivery:
    app.send_task("tasks.backup", args=["erp_rich", "monthly"], task_id=task_id, queue="pgbeat")
    wait_for(lambda: "already dispatched" in worker.log_text() or None, 30, what="second delivery handled")
    time.sleep(1)
    assert len(service.backups("monthly")) == before + 1
    assert run_state(redis_server.client, task_id)["status"] == "succeeded"


def test_worker_killed_mid_dump_redoes_the_backup_once(service, worker, pg, dbs, redis_server):
    with table_locked(pg, dbs["locked"]):
        run_id = celery_call(service, "erp_locked")
        [dump] = wait_for(lambda: pg_dump_processes(dbs["locked"]), 20, what="pg_dump")
        pool_child = dump.parent()
        assert pool_child.pid in [c.pid for c in worker.pool_children()]
        pool_child.send_signal(signal.SIGKILL)
        wait_for(lambda: not dump.is_running() or dump.status() == "zombie", 10, what="orphaned pg_dump to die")
    state = wait_run(redis_server.client, run_id, 90)
    assert state["status"] == "succeeded", state
    final_name = state["final_path"].rsplit("/")[-1]
    assert [p.name for p in service.backups() if p.name.startswith("erp_locked")] == [final_name]
    mine = [e for e in service.events() if e["run_id"] == run_id]
    assert [e["kind"] for e in mine] == ["success"]
    assert not pg_dump_processes(dbs["locked"])
    assert not list((service.backup_root / ".work").glob(f"{run_id}*"))


def test_target_lock_serialises_dumps_of_one_database(service, worker, pg, dbs, redis_server):
    with table_locked(pg, dbs["locked"]):
        first = celery_call(service, "erp_locked", "weekly")
        second = celery_call(service, "erp_locked", "weekly")
        wait_for(lambda: pg_dump_processes(dbs["locked"]), 20, what="first pg_dump")
        seen = []
        for _ in range(10):  # both runs have been dispatched; only one may be dumping
            seen.append(len(pg_dump_processes(dbs["locked"])))
            time.sleep(0.2)
        assert max(seen) == 1
        waiting = [run_state(redis_server.client, r).get("status") for r in (first, second)]
        assert "waiting" in waiting
    states = [wait_run(redis_server.client, r, 120) for r in (first, second)]
    assert [s["status"] for s in states] == ["succeeded", "succeeded"]
    manifests = [json.loads((service.backup_root / "weekly" / (s["final_path"].rsplit("/")[-1] + ".manifest.json"))
                            .read_text()) for s in states]
    spans = sorted((datetime.fromisoformat(m["steps"]["dump"]["started_at"]),
                    datetime.fromisoformat(m["steps"]["dump"]["started_at"])
                    + timedelta(seconds=m["steps"]["dump"]["duration_s"])) for m in manifests)
    assert spans[0][1] <= spans[1][0], f"dumps overlapped: {spans}"
    assert len({m["file"] for m in manifests}) == 2


def test_restore_and_drill_as_tasks(service, worker, pg, dbs, redis_server):
    """tasks.restore (with the CLI following it) and tasks.drill, run by the worker on its host."""
    result = service.pgbeat("backup", "daily", "--target", "erp_small")
    assert result.returncode == 0, result.stdout
    backup = max((p for p in service.backups() if p.name.startswith("erp_small")), key=lambda p: p.name)
    pg.sql("CREATE TABLE teste_restore (id INT)", dbs["small"])
    restored = service.pgbeat("restore", str(backup), "--yes", "--on-worker")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "succeeded" in restored.stdout and "swap" in restored.stdout
    assert pg.sql("SELECT to_regclass('public.teste_restore') IS NULL", dbs["small"]) == "t"

    manifest = backup.with_name(backup.name + ".manifest.json")
    celery_result = service.celery("call", "tasks.drill", '--args=["erp_small"]')
    assert celery_result.returncode == 0
    record = wait_for(lambda: json.loads(manifest.read_text())["drills"], 60, 0.3, what="the drill's record")
    assert record[-1]["status"] == "passed"
