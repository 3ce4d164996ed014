"""Whole-server targets (`databases: all`) over a cluster of their own: each run discovers the databases
(templates, `datallowconn = false` and excluded ones left out; include patterns respected), backs each up
as a target of its own, picks up a database created between two runs (and that backup restores), reports
a database that is gone while its backups stay (never orphans, rotated by the tier's retention), and
handles hostile database names; beat's task of a whole-server target runs each database on the workers
within the fleet caps, once."""

from __future__ import annotations

import itertools
import json
import os
import stat
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest
from celery import Celery
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from pgbeat.monitoring.metrics import registry_for
from pgbeat.settings import load_settings
from pgbeat.settings.servers import database_part
from tests.support import PgCluster, Service, Worker, run_state, wait_for, wait_run
from workers.chain import database_run_id

pytestmark = pytest.mark.integration

HOSTILE = ['we"ird db.x', "it's", "café"]
PLAIN = ["app_one", "app_two"]


def execute(cluster: PgCluster, statement: sql.Composable, db: str = "postgres") -> None:
    with psycopg.connect(host=cluster.host, port=cluster.port, user="postgres", dbname=db, autocommit=True) as conn:
        conn.execute(statement)


def create(cluster: PgCluster, name: str, options: str = "", rows: int = 0) -> None:
    execute(cluster, sql.SQL("CREATE DATABASE {} " + options).format(sql.Identifier(name)))
    if rows:
        execute(cluster, sql.SQL("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS body "
                                 "FROM generate_series(1, {}) g").format(sql.Literal(rows)), name)


@pytest.fixture(scope="module")
def cluster(session_dir):
    """A cluster of its own (discovery sees every database of a server): plain and hostile names, one
    excluded, a template and one that refuses connections."""
    pg = PgCluster(session_dir, "whole-server")
    for index, name in enumerate([*PLAIN, *HOSTILE]):
        create(pg, name, rows=10 + index)
    create(pg, "scratch_1")
    create(pg, "tpl_x", "IS_TEMPLATE true")
    create(pg, "noconn", "ALLOW_CONNECTIONS false")
    yield pg
    pg.destroy()


def server_target(cluster: PgCluster, **extra) -> dict:
    return {"name": "srv", "databases": "all", "host": cluster.host, "port": cluster.port, "user": "postgres",
            "exclude": ["postgres", "scratch_*"], "drill": {"enabled": False}, **extra}


def backed_up(service: Service) -> dict[str, list]:
    found: dict[str, list] = {}
    for path in service.backups():
        manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
        found.setdefault(manifest["target"], []).append(path)
    return found


def name_of(dbname: str) -> str:
    return f"srv.{database_part(dbname)}"


def test_discovery_runs_rotation_and_a_gone_database(workdir, cluster, monkeypatch):
    # keep_days 0: every rotation removes all but the newest backup of each database (min_keep 1).
    service = Service(workdir / "svc", None, [server_target(cluster)],
                      defaults={"tiers": {"daily": {"keep_days": 0, "min_keep": 1}}})
    first = service.pgbeat("backup", "daily")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "srv (databases: all): 5 database(s)" in first.stdout and "excluded: postgres, scratch_1" in first.stdout
    expected = {name_of(db) for db in [*PLAIN, *HOSTILE]}
    assert set(backed_up(service)) == expected  # no template, no noconn, nothing excluded
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in service.backups())

    # A database created between two runs is backed up by the second, and that backup restores.
    create(cluster, "app_new", rows=42)
    second = service.pgbeat("backup", "daily", "--target", "srv")
    assert second.returncode == 0, second.stdout + second.stderr
    [new] = backed_up(service)["srv.app_new"]
    cluster.createdb("app_new_copy")
    cluster.restore_plain_gz(new, "app_new_copy")
    assert cluster.dump_text("app_new_copy") == cluster.dump_text("app_new")
    cluster.dropdb("app_new_copy")
    assert set(backed_up(service)) == expected | {"srv.app_new"}

    # A database dropped from the server: reported by the run, by status and on the event log; its backup
    # stays, through the run's rotation and `pgbeat rotate`, and is no orphan.
    cluster.dropdb("app_two")
    third = service.pgbeat("backup", "daily")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "database 'app_two' of srv is gone from the server" in third.stdout
    told = [e for e in service.events() if e["kind"] == "warning" and any("app_two" in w for w in e["warnings"])]
    assert len(told) == 1 and told[0]["target"] == "srv"
    again = service.pgbeat("backup", "daily", "--target", "srv.app_one")  # a database of it, by its name
    assert again.returncode == 0, again.stdout + again.stderr
    fourth = service.pgbeat("backup", "daily")  # says it again, tells the channels once only
    assert "database 'app_two' of srv is gone" in fourth.stdout
    assert len([e for e in service.events() if any("app_two" in w for w in e.get("warnings") or [])]) == 1
    rotated = service.pgbeat("rotate")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    shelf = backed_up(service)
    assert len(shelf["srv.app_two"]) == 1 and all(len(files) == 1 for files in shelf.values())
    status = json.loads(service.pgbeat("status", "--json").stdout)
    assert status["orphans"] == {} and status["servers"]["srv"]["gone"] == {"srv.app_two": "app_two"}
    gone = [t for t in status["tiers"] if t["target"] == "srv.app_two"]
    assert gone and all(t["gone"] and not t["overdue"] for t in gone)
    assert not any(t["gone"] for t in status["tiers"] if t["target"] != "srv.app_two")
    # No overdue alert for it: /metrics gives it no expected interval (the alert's rule compares with it).
    for key in [k for k in os.environ if k.startswith(("DB_", "CELERY_", "PGBEAT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    text = generate_latest(registry_for(load_settings(env_file=None))).decode()
    intervals = {s.labels["target"] for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "pgbeat_backup_expected_interval_seconds"}
    assert "srv.app_one" in intervals and "srv.app_two" not in intervals
    text = service.pgbeat("status").stdout
    assert "srv (databases: all): 5 database(s)" in text and "'app_two' of srv is gone" in text
    assert json.loads(service.pgbeat("list", "--orphans", "--json").stdout) == []


def test_hostile_names_back_up_list_and_restore(workdir, cluster):
    service = Service(workdir / "svc", None, [server_target(cluster, include=["*'*", "*.*", "caf?"])])
    done = service.pgbeat("backup", "daily")
    assert done.returncode == 0, done.stdout + done.stderr
    shelf = backed_up(service)
    assert set(shelf) == {name_of(db) for db in HOSTILE}
    for dbname in HOSTILE:
        [path] = shelf[name_of(dbname)]
        assert path.name.startswith(f"{name_of(dbname)}_backup_daily_") and name_of(dbname).isascii()
        manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
        assert manifest["target"] == name_of(dbname)
        listed = json.loads(service.pgbeat("list", "--target", name_of(dbname), "--json").stdout)
        assert [b["file"] for b in listed] == [path.name]
    shown = " ".join(service.pgbeat("status", COLUMNS="250").stdout.split())
    assert f"{name_of('café')} ('café')" in shown and f"{name_of(HOSTILE[0])} ('we\"ird db.x')" in shown
    every = json.loads(service.pgbeat("list", "--target", "srv", "--json").stdout)
    assert sorted(b["file"] for b in every) == sorted(p.name for [p] in shelf.values())
    weird = HOSTILE[0]
    execute(cluster, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(weird + "_copy")))
    cluster.restore_plain_gz(shelf[name_of(weird)][0], weird + "_copy")
    assert cluster.dump_text(weird + "_copy") == cluster.dump_text(weird)
    execute(cluster, sql.SQL("DROP DATABASE {}").format(sql.Identifier(weird + "_copy")))


def test_config_check_and_dry_run_show_what_a_run_would_back_up(workdir, cluster):
    # include and exclude together: app_one only (scratch_1 is included, then excluded).
    service = Service(workdir / "svc", None, [server_target(cluster, include=["app_one", "scratch_*"],
                                                            exclude=["scratch_*"])])
    planned = service.pgbeat("backup", "daily", "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "srv (databases: all): 1 database(s): app_one; excluded: " in planned.stdout
    assert "scratch_1" in planned.stdout.splitlines()[0]
    assert "srv.app_one daily:" in planned.stdout and not service.backup_root.exists()  # a dry run keeps nothing
    checked = service.pgbeat("config", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    flat = " ".join(checked.stdout.split())
    assert "srv: databases: all: 1 found: 'app_one' as srv.app_one" in flat
    assert "'scratch_1' (excluded)" in flat and "'tpl_x' (a template)" in flat and "'noconn' (does not allow" in flat
    assert "srv.app_one: connection" in flat


def test_a_user_without_connect_is_told_which_database_it_cannot_back_up(workdir, cluster):
    for statement in ("CREATE ROLE limited LOGIN", "CREATE DATABASE locked_db",
                      "REVOKE CONNECT ON DATABASE locked_db FROM PUBLIC"):
        cluster.sql(statement)
    try:
        target = server_target(cluster, user="limited", host=str(cluster.dir), include=["app_one", "locked_db"])
        service = Service(workdir / "svc", None, [target])
        planned = service.pgbeat("backup", "daily", "--dry-run")
        assert "database 'locked_db' of srv is not backed up: limited lacks CONNECT" in planned.stdout
        assert "srv.app_one daily:" in planned.stdout
    finally:
        cluster.dropdb("locked_db")
        cluster.sql("DROP ROLE limited")


def test_beat_s_task_backs_up_each_database_on_the_workers_within_the_fleet_caps(workdir, cluster, redis_server):
    wanted = sorted(cluster.sql("SELECT datname FROM pg_database WHERE datname LIKE 'app\\_%'").split())
    every_minute = {"daily": {"schedule": "* * * * *"}}  # with catch_up_window 1: never too late for its slot
    service = Service(workdir / "svc", redis_server.url,
                      [server_target(cluster, include=["app_*"], tiers=every_minute)],
                      node=f"ws-{uuid.uuid4().hex[:6]}",
                      reliability={"per_host_dumps": 1, "lock_ttl": 5, "catch_up_window": 1})
    worker = Worker(service, concurrency=2)
    app = Celery(broker=service.redis_url)
    try:
        task_id = uuid.uuid4().hex
        # What beat sends for a whole-server target: its name; the worker discovers the databases.
        app.send_task("tasks.backup", args=["srv", "daily"], kwargs={"scheduled": True}, task_id=task_id,
                      queue="pgbeat")
        run_ids = {name_of(db): database_run_id(task_id, name_of(db)) for db in wanted}
        states = {name: wait_run(redis_server.client, run_id, 120) for name, run_id in run_ids.items()}
        assert {s["status"] for s in states.values()} == {"succeeded"}, states
        # The same message again (a redelivery): no second backup of any database.
        app.send_task("tasks.backup", args=["srv", "daily"], kwargs={"scheduled": True}, task_id=task_id,
                      queue="pgbeat")
        wait_for(lambda: run_state(redis_server.client, task_id).get("deliveries") == "2", 30, what="the resend")
        assert json.loads(run_state(redis_server.client, task_id)["databases"]) == sorted(run_ids)
    finally:
        worker.stop()
    shelf = backed_up(service)
    assert sorted(shelf) == sorted(run_ids) and all(len(files) == 1 for files in shelf.values())
    spans = []
    for [path] in shelf.values():
        dump = json.loads(path.with_name(path.name + ".manifest.json").read_text())["steps"]["dump"]
        start = datetime.fromisoformat(dump["started_at"])
        spans.append((start, start + timedelta(seconds=dump["duration_s"])))
    for before, after in itertools.pairwise(sorted(spans)):
        assert before[1] <= after[0], "two dumps at once on one server despite per_host_dumps: 1"


def test_a_server_that_cannot_be_asked_fails_its_target_and_spares_the_others(workdir, cluster):
    closed = {"name": "down", "databases": "all", "host": "127.0.0.1", "port": 1, "user": "postgres",
              "connect_timeout": 2}
    listed = {"name": "one", "dbname": "app_one", "host": cluster.host, "port": cluster.port, "user": "postgres"}
    service = Service(workdir / "svc", None, [closed, listed])
    done = service.pgbeat("backup", "daily")
    assert done.returncode == 5, done.stdout + done.stderr
    assert "down: cannot list its databases (databases: all)" in done.stderr
    assert [p.name.split("_backup_")[0] for p in service.backups()] == ["one"]
    [failure] = [e for e in service.events() if e["kind"] == "failure"]
    assert failure["target"] == "down" and failure["step"] == "discover"
