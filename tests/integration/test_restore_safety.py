"""Restores that never touch the wrong database and never leave one closed or half-swapped (issue 11, 1).

The kill matrices are generated from the structure: every fault point declared under `restore.` and
`drill.` (pgbeat.faults) times every signal, through the real CLI and through a real worker, so a new
phase or point is covered without editing this file. Cases run concurrently on databases of their own.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import pytest

import pgbeat.restore.drill  # declares the drill's fault points
import pgbeat.restore.restore  # noqa: F401  (declares the restore's fault points)
from pgbeat import faults
from pgbeat.catalog.manifest import Manifest, write_manifest
from pgbeat.fsutil import private_dir
from tests.conftest import unique
from tests.support import VENV_BIN, Service, Worker, pg_dump_processes, table_locked, wait_for

pytestmark = pytest.mark.integration

RESTORE_POINTS = list(faults.declared("restore."))
DRILL_POINTS = list(faults.declared("drill."))
PHASES = {"restore": ("safety", "create", "load", "check", "swap", "drop"), "drill": ("create", "load", "check")}
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "hup": signal.SIGHUP, "int": signal.SIGINT}
# Runs of "any kind" that must settle what a killed run left; the cases take them in turn.
NEXT_RUNS = [("list",), ("status",), ("config", "check", "--no-connect"), ("rotate", "--dry-run")]
FAST = {"lock_ttl": 2, "visibility_timeout": 10, "restore_interval": 2, "retry_backoff": 1, "retry_backoff_max": 4,
        "retries": 2}
CONCURRENT_CASES = 4

SOURCE_SQL = """
CREATE TABLE big AS SELECT i, md5(i::text) AS h FROM generate_series(1, 200) AS i;
CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL);
INSERT INTO notes (body) SELECT 'note ' || i FROM generate_series(1, 20) AS i;
CREATE VIEW note_count AS SELECT count(*) FROM notes;
"""
CHANGE_SQL = "CREATE TABLE teste_restore (id int); INSERT INTO teste_restore VALUES (1); UPDATE notes SET body = 'x'"


@dataclass
class Source:
    db: str
    backup: Path
    text: str  # dump_text of the backed-up database
    template: str  # a database with the backup's data and then some changes; each case copies it
    changed: str  # its dump_text: what a case database holds until a swap commits


@pytest.fixture(scope="module")
def source(pg, tmp_path_factory):
    """One small database, its verified backup, and a changed copy of it that every case starts from."""
    base = tmp_path_factory.mktemp("restore-safety")
    base.chmod(0o755)
    db = pg.createdb(unique("src"))
    pg.sql(SOURCE_SQL, db)
    service = Service(base, None, [pg.target("erp", db)])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups()
    template = pg.createdb(unique("tpl"))
    pg.restore_plain_gz(backup, template)
    pg.sql(CHANGE_SQL, template)
    yield Source(db=db, backup=backup, text=pg.dump_text(db), template=template, changed=pg.dump_text(template))
    pg.dropdb(template)
    pg.dropdb(db)


# --- helpers -----------------------------------------------------------------------------------------


def query(pg, sql: str, db: str = "postgres", params: tuple = ()) -> list[tuple]:
    """Run `sql` as postgres in a connection of its own (the cases run in threads); return its rows."""
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=db, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def case_database(pg, source: Source, name: str | None = None) -> str:
    """A new database holding the source's changed copy (restored and not restored are told apart)."""
    name = name or unique("k")
    query(pg, f'CREATE DATABASE "{name}" TEMPLATE "{source.template}"')
    return name


def case_databases(pg, source: Source, count: int) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CASES) as pool:
        return list(pool.map(lambda _: case_database(pg, source), range(count)))


def drop_databases(pg, names: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CASES) as pool:
        list(pool.map(lambda name: query(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'), names))


def shelf_copy(backup: Path, service: Service, target: str | None = None) -> Path:
    """Put a copy of `backup` (with its sidecars) on `service`'s shelf, as a backup of `target` if given
    (file name, manifest and .sha256 say so); return its path."""
    folder = private_dir(service.backup_root / "daily")
    name = backup.name if target is None else backup.name.replace(backup.name.split("_backup_")[0], target, 1)
    shutil.copy2(backup, folder / name)
    manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
    manifest.update(file=name, target=target or manifest["target"])
    write_manifest(folder / f"{name}.manifest.json", Manifest.model_validate(manifest))  # sealed again
    (folder / f"{name}.sha256").write_text(f"{manifest['sha256']}  {name}\n")
    for path in folder.glob(f"{name}*"):
        path.chmod(0o600)
    return folder / name


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def database_oid(pg, db: str) -> int | None:
    rows = query(pg, "SELECT oid FROM pg_database WHERE datname = %s", params=(db,))
    return int(rows[0][0]) if rows else None


def journals(service: Service, target: str = "*") -> list[Path]:
    """The files in `service`'s restore journal folder (of `target`'s runs only, if given)."""
    folder = service.backup_root / ".state" / "restores"
    files = sorted(folder.iterdir()) if folder.exists() else []
    if target == "*":
        return files
    ids = {p.stem for p in files if p.suffix == ".json" and journal_target(p) == target}
    return [p for p in files if p.name.lstrip(".").split(".")[0] in ids]


def journal_target(path: Path) -> str | None:
    """The target of the journal at `path`; None if it is gone (a case running beside this one settled it)."""
    try:
        return json.loads(path.read_text())["target"]
    except FileNotFoundError:
        return None


def run_names(service: Service, target: str = "*") -> set[str]:
    """The temporary, retired and scratch databases named in the restore logs and journals of `target`."""
    text = "".join(p.read_text() for p in (service.backup_root / "logs").glob(f"{target}_restore_*.log"))
    text += "".join(p.read_text() for p in journals(service, target) if p.suffix == ".json")
    ids = set(re.findall(r"pgbeat_(?:restore|old|drill)_([0-9a-f]{12})", text))
    return {f"pgbeat_{kind}_{i}" for i in ids for kind in ("restore", "old", "drill")}


def existing(pg, names: set[str]) -> list[str]:
    return sorted(name for (name,) in query(pg, "SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                                            params=(sorted(names),)))


def leftover_databases(pg, prefix: str = "pgbeat") -> list[str]:
    return sorted(name for (name,) in query(pg, "SELECT datname FROM pg_database WHERE datname LIKE %s",
                                            params=(prefix.replace("_", "\\_") + "\\_%",)))


def state_problems(pg, db: str, oid_before: int, source: Source, swapped: bool | None, when: str) -> list[str]:
    """What is wrong with `db` now: it must accept a new connection, be open to all, and hold exactly its
    old data (same OID) or exactly the backup (a new OID: the swap committed); `swapped` says which."""
    try:
        [(allowed, oid)] = query(pg, "SELECT datallowconn, oid FROM pg_database WHERE datname = current_database()",
                                 db)
    except psycopg.Error as exc:
        return [f"{when}: {db} refuses connections: {str(exc).strip()[-200:]}"]
    problems = [] if allowed else [f"{when}: {db} has datallowconn=false"]
    now_swapped = int(oid) != oid_before
    if swapped is not None and now_swapped != swapped:
        problems.append(f"{when}: swap committed={now_swapped}, expected {swapped}")
    text = pg.dump_text(db)
    if text != (source.text if now_swapped else source.changed):
        problems.append(f"{when}: {db} holds neither its old data nor the backup's"
                        if text not in (source.text, source.changed) else f"{when}: {db} holds the wrong one")
    return problems


def pre_restore_problems(service: Service) -> list[str]:
    """Every safety backup that was published is whole (its bytes hash to its manifest's SHA-256)."""
    problems = []
    for path in service.backup_root.glob("pre_restore_*.sql.gz"):
        manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
        if hashlib.sha256(path.read_bytes()).hexdigest() != manifest["sha256"]:
            problems.append(f"safety backup {path.name} does not match its manifest")
    return problems


def interrupted_output(result, action: str, what: str) -> list[str]:
    """A restore or drill stopped by a signal says so briefly, exits non-zero, shows no traceback."""
    problems = []
    # 1: the restore or drill failed; for Ctrl-C also 130, the shells' code that pgbeat's CLI may adopt
    expected = {-signal.SIGKILL} if action == "kill" else {1, 130} if action == "int" else {1}
    if result.returncode not in expected:
        problems.append(f"exit code {result.returncode}, expected {expected}: {result.stderr[-400:]}")
    if action != "kill":
        name = SIGNALS[action].name
        if f"interrupted by {name}" not in result.stdout + result.stderr:
            problems.append(f"{what} does not say it was interrupted by {name}: {result.stderr[-400:]}")
        if "Traceback" in result.stderr:
            problems.append(f"a traceback: {result.stderr[-400:]}")
    return problems


def run_concurrently(cases: list, run) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CASES) as pool:
        return [line for lines in pool.map(lambda args: run(*args), cases) for line in lines]


# --- the structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PHASES))
def test_every_phase_has_fault_points_at_start_middle_and_end(kind):
    declared = set(faults.declared(f"{kind}."))
    missing = {f"{kind}.{phase}.{where}" for phase in PHASES[kind] for where in ("start", "middle", "end")} - declared
    assert not missing, f"phases without their fault points: {sorted(missing)}"


def matrix_service(pg, source: Source, base: Path, count: int, as_targets: bool = False):
    """One BACKUP_ROOT with targets erp0..erpN-1, each on a case database of its own, and the source backup
    on its shelf (once, or as a backup of each target); return (service, databases, backups)."""
    databases = case_databases(pg, source, count)
    service = Service(base, None, [pg.target(f"erp{i}", db) for i, db in enumerate(databases)])
    backups = ([shelf_copy(source.backup, service, f"erp{i}") for i in range(count)] if as_targets
               else [shelf_copy(source.backup, service)] * count)
    return service, databases, backups


def restore_case(pg, source: Source, service: Service, backup: Path, index: int, db: str, point: str,
                 action: str) -> list[str]:
    target, oid = f"erp{index}", database_oid(pg, db)
    marks = private_dir(service.base / f"faults-{index}")
    result = service.pgbeat("restore", str(backup), "--target", target, "--yes", PGBEAT_FAULTS=f"{point}={action}",
                            PGBEAT_FAULTS_DIR=str(marks))
    if not (marks / f"{point}.fired").exists():
        return [f"{point}={action}: never reached ({result.returncode}): {result.stderr[-300:]}"]
    problems = interrupted_output(result, action, "the restore")
    swapped = point.startswith("restore.drop.")  # the renames commit between swap.end and drop.start
    problems += state_problems(pg, db, oid, source, swapped, "right after the signal")
    if action != "kill" and (existing(pg, run_names(service, target)) or journals(service, target)):
        problems.append(f"not undone in the process: {existing(pg, run_names(service, target))}, "
                        f"{journals(service, target)}")
    return [f"{point}={action}: {p}" for p in problems]


def settled_after_the_next_run(pg, source: Source, service: Service, databases: list[str], oids: list[int],
                               command: tuple[str, ...], swapped: list[bool | None]) -> list[str]:
    """Run one pgbeat command; then nothing of any case may be left, and every database must be intact."""
    result = service.pgbeat(*command)
    problems = [] if result.returncode == 0 else [f"pgbeat {' '.join(command)} failed: {result.stderr[-300:]}"]
    for i, db in enumerate(databases):
        problems += [f"erp{i}: {p}" for p in state_problems(pg, db, oids[i], source, swapped[i], "after the next run")]
    if existing(pg, run_names(service)) or journals(service):
        problems.append(f"left behind: {existing(pg, run_names(service))}, {[p.name for p in journals(service)]}")
    return problems


def matrix(points: list[str], everywhere: tuple[str, ...], at_middles: tuple[str, ...],
           phases: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """The cases of a kill matrix: every point with each signal of `everywhere`, and the middle of every
    phase (of `phases` only, if given) with each of `at_middles`. SIGHUP and SIGINT take the very code path
    of SIGTERM (one handler for the three, installed for the whole run at once, and a fault point always
    signals from Python code), so the suite's time budget goes to SIGKILL and SIGTERM at every point."""
    middles = [p for p in points if p.endswith(".middle") and (phases is None or p.split(".")[1] in phases)]
    return [(p, a) for a in everywhere for p in points] + [(p, a) for a in at_middles for p in middles]


# --- the kill matrix: every restore point x SIGKILL and SIGTERM; SIGHUP and SIGINT in load and swap --


def test_restore_kill_matrix_through_the_cli(pg, source, workdir):
    """For every restore fault point: the CLI killed (or signalled) there leaves the original intact and
    open at once; a signal undoes everything in the process, and after a kill the next pgbeat run does.
    All cases share one BACKUP_ROOT (each its own target and database) and run a few at a time, so each
    CLI start also settles the journals of cases killed before it, and never touches a live one."""
    # SIGHUP and SIGINT while psql loads and while the swap transaction holds the original's lock.
    cases = matrix(RESTORE_POINTS, ("kill", "term"), ("hup", "int"), phases=("load", "swap"))
    assert cases
    service, databases, backups = matrix_service(pg, source, workdir, len(cases))
    oids, shelf = [database_oid(pg, db) for db in databases], hashes(service.backup_root / "daily")
    try:
        problems = run_concurrently([(pg, source, service, backups[i], i, databases[i], point, action)
                                     for i, (point, action) in enumerate(cases)], restore_case)
        problems += settled_after_the_next_run(pg, source, service, databases, oids, ("list",),
                                               [p.startswith("restore.drop.") for p, _ in cases])
        if hashes(service.backup_root / "daily") != shelf:
            problems.append("the backups on the shelf changed")
        problems += pre_restore_problems(service)
    finally:
        drop_databases(pg, databases)
    assert not problems, "\n".join(problems)
    assert leftover_databases(pg, "pgbeat_restore") == [] and leftover_databases(pg, "pgbeat_old") == []


# --- drills: every point x SIGKILL, every phase's middle x SIGTERM, the load's x SIGHUP and SIGINT ---


def drill_case(pg, source: Source, service: Service, backup: Path, index: int, db: str, point: str,
               action: str) -> list[str]:
    target, data = f"erp{index}", backup.read_bytes()
    marks = private_dir(service.base / f"faults-{index}")
    result = service.pgbeat("drill", "--target", target, PGBEAT_FAULTS=f"{point}={action}",
                            PGBEAT_FAULTS_DIR=str(marks))
    if not (marks / f"{point}.fired").exists():
        return [f"{point}={action}: never reached ({result.returncode}): {result.stderr[-300:]}"]
    problems = interrupted_output(result, action, "the drill")
    if action != "kill":
        manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
        if not manifest["drills"] or manifest["drills"][-1]["status"] != "failed":
            problems.append("the interrupted drill was not recorded as failed")
        if journals(service, target):
            problems.append(f"not undone in the process: {journals(service, target)}")
    if pg.dump_text(db) != source.changed or backup.read_bytes() != data:
        problems.append("the drill changed the target's database or its backup")
    return [f"{point}={action}: {p}" for p in problems]


def test_drill_kill_matrix(pg, source, workdir):
    cases = matrix(DRILL_POINTS, ("kill",), ("term",)) + matrix(DRILL_POINTS, (), ("hup", "int"), phases=("load",))
    assert cases
    service, databases, backups = matrix_service(pg, source, workdir, len(cases), as_targets=True)
    oids = [database_oid(pg, db) for db in databases]
    try:
        problems = run_concurrently([(pg, source, service, backups[i], i, databases[i], p, a)
                                     for i, (p, a) in enumerate(cases)], drill_case)
        problems += settled_after_the_next_run(pg, source, service, databases, oids, ("status",), [False] * len(cases))
    finally:
        drop_databases(pg, databases)
    assert not problems, "\n".join(problems)
    assert leftover_databases(pg, "pgbeat_drill") == []


# --- the kill matrix through a real worker (SIGKILL of the pool process in every phase) -------------


def celery_client(redis_url: str):
    """A Celery client of the test's own that sends as the CLI does (pgbeat's priority transport options)."""
    from celery import Celery

    app = Celery("pgbeat-tests", broker=redis_url, backend=redis_url)
    transport = {"priority_steps": list(range(10)), "sep": ":", "queue_order_strategy": "priority"}
    app.conf.update(broker_transport_options=transport, result_backend_transport_options=transport,
                    task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return app


def test_restore_kill_matrix_through_a_worker(pg, source, workdir, redis_server):
    """A worker whose pool process dies at the middle of every restore phase in turn (each point fires
    once, so the N-th restore it runs dies at the N-th point it reaches; the CLI matrix covers every point,
    and the state a kill leaves on the server does not depend on which process died). The first restore is
    followed by the CLI, which says the worker died and exits non-zero; the others are sent straight to the
    worker's queue. Every original is intact and open, swapped exactly where the kill came after the
    commit; each restore's start settles the journal of the one before, and the next pgbeat run the last."""
    points = [p for p, _ in matrix(RESTORE_POINTS, (), ("kill",))]
    marks = private_dir(workdir / "faults")
    databases = case_databases(pg, source, len(points))
    oids = [database_oid(pg, db) for db in databases]
    node = f"rk-{uuid.uuid4().hex[:6]}"
    service = Service(workdir / "svc", redis_server.url, [pg.target(f"erp{i}", db) for i, db in enumerate(databases)],
                      node=node, reliability=FAST)
    backup = shelf_copy(source.backup, service)
    worker = Worker(service, concurrency=1, PGBEAT_FAULTS=",".join(f"{p}=kill" for p in points),
                    PGBEAT_FAULTS_DIR=str(marks))
    try:
        followed = service.pgbeat("restore", str(backup), "--target", "erp0", "--yes", "--on-worker",
                                  "--timeout", "120")
        client = celery_client(redis_server.url)
        sent = [client.send_task("tasks.restore", args=[str(backup), f"erp{i}", None, 2], queue=f"pgbeat.host.{node}",
                                 priority=0) for i in range(1, len(databases))]
        wait_for(lambda: all(result.state == "FAILURE" for result in sent), 240, 0.5, what="every restore to die")
        assert all(type(result.result).__name__ == "WorkerLostError" for result in sent)
    finally:
        worker.stop()
    try:
        assert followed.returncode == 1 and "died" in followed.stderr, followed.stdout + followed.stderr
        assert "Traceback" not in followed.stderr
        problems = []
        for i, (db, oid) in enumerate(zip(databases, oids, strict=True)):
            problems += [f"erp{i}: {p}" for p in state_problems(pg, db, oid, source, None, "after the kill")]
        assert not problems, "\n".join(problems)
        swapped = sum(database_oid(pg, db) != oid for db, oid in zip(databases, oids, strict=True))
        assert swapped == len([p for p in points if p.startswith("restore.drop.")])
        assert {p.name.removesuffix(".fired") for p in marks.glob("*.fired")} == set(points)
        assert settled_after_the_next_run(pg, source, service, databases, oids, ("config", "check", "--no-connect"),
                                          [None] * len(databases)) == []
        assert leftover_databases(pg, "pgbeat_restore") == [] and leftover_databases(pg, "pgbeat_old") == []
    finally:
        drop_databases(pg, databases)


# --- a live restore is left alone; two at once: the second refuses ---------------------------------


def test_recovery_leaves_a_running_restore_alone(pg, source, workdir):
    db = case_database(pg, source)
    try:
        service = Service(workdir, None, [pg.target("erp", db)])
        backup = shelf_copy(source.backup, service)
        oid = database_oid(pg, db)
        marks = private_dir(workdir / "faults")
        restoring = subprocess.Popen([str(VENV_BIN / "pgbeat"), "restore", str(backup), "--yes"], cwd=service.cwd,
                                     env=service.env(PGBEAT_FAULTS="restore.load.middle=pause",
                                                     PGBEAT_FAULTS_DIR=str(marks)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (marks / "restore.load.middle.reached").exists(), 60, what="the paused restore")
            names = existing(pg, run_names(service))
            assert service.pgbeat("list").returncode == 0
            assert journals(service) and existing(pg, run_names(service)) == names != []  # untouched
            assert restoring.poll() is None
        finally:
            restoring.kill()
            restoring.wait(30)
        assert state_problems(pg, db, oid, source, False, "after SIGKILL") == []
        assert service.pgbeat("status").returncode == 0
        assert journals(service) == [] and existing(pg, set(names)) == []
    finally:
        pg.dropdb(db)


def test_two_restores_of_one_database(pg, source, workdir):
    """From two hosts (two BACKUP_ROOTs) at once: the second refuses at once, naming the first; the first
    completes."""
    db = case_database(pg, source)
    try:
        first = Service(workdir / "host-a", None, [pg.target("erp", db)], node="host-a")
        second = Service(workdir / "host-b", None, [pg.target("erp", db)], node="host-b")
        backup = shelf_copy(source.backup, first)
        with table_locked(pg, db):  # the first one's safety backup waits for this lock, holding the restore lock
            restoring = subprocess.Popen([str(VENV_BIN / "pgbeat"), "restore", str(backup), "--yes"], cwd=first.cwd,
                                         env=first.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: pg_dump_processes(db), 30, what="the first restore's safety backup")
            refused = second.pgbeat("restore", str(backup), "--yes", timeout=60)
            assert refused.returncode == 4, refused.stdout + refused.stderr
            assert f"Another restore of database '{db}'" in refused.stderr
            assert f"pgbeat restore host-a pid {restoring.pid}" in refused.stderr
            assert "Traceback" not in refused.stderr
            assert not list(second.backup_root.glob("pre_restore_*"))
        out, errors = restoring.communicate(timeout=120)
        assert restoring.returncode == 0, out + errors
        assert pg.dump_text(db) == source.text
    finally:
        pg.dropdb(db)


def test_reserved_databases_are_refused_before_anything(pg, source, workdir):
    service = Service(workdir, None, [pg.target("erp", source.db)])
    backup = shelf_copy(source.backup, service)
    template1 = pg.dump_text("template1")
    for name in ("postgres", "template0", "template1", " "):  # a blank name may be refused by --into's type
        result = service.pgbeat("restore", str(backup), "--into", name, "--yes")
        assert result.returncode == 2, (name, result.stdout + result.stderr)
        assert "Traceback" not in result.stderr and (name == " " or "Refusing to restore into" in result.stderr)
    assert not list(service.backup_root.glob("pre_restore_*")) and journals(service) == []
    assert pg.dump_text("template1") == template1 and leftover_databases(pg, "pgbeat_restore") == []


# --- fidelity: the swapped-in database is the original's twin ---------------------------------------


PROPERTIES = ("SELECT to_jsonb(d) - 'oid' - 'datname' - 'datfrozenxid' - 'datminmxid', "
              "shobj_description(d.oid, 'pg_database') FROM pg_database d WHERE datname = '{db}'")
SETTINGS = ("SELECT coalesce(r.rolname, '*') || ' ' || s.setconfig::text FROM pg_db_role_setting s "
            "JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE d.datname = '{db}' ORDER BY 1")


def snapshot(pg, db: str) -> tuple[str, str]:
    return pg.sql(PROPERTIES.format(db=db)), pg.sql(SETTINGS.format(db=db))


def icu_locale(pg) -> str:
    locales = pg.sql("SELECT string_agg(colliculocale, ' ') FROM pg_collation WHERE collprovider = 'i' "
                     "AND colliculocale IN ('de-DE', 'de', 'en-US', 'und')").split()
    if not locales:
        pytest.skip("this server has no ICU collations")
    return "de-DE" if "de-DE" in locales else locales[0]


def test_in_place_restore_recreates_the_database_exactly(pg, session_dir, workdir):
    """An ICU database with every kind of property, and a LATIN1 libc one with a non-default collation:
    after an in-place restore, their pg_database rows (minus oid, name and frozen xids), comments and
    every pg_db_role_setting row are identical, and the ICU sort order is still ICU's."""
    tag = uuid.uuid4().hex[:6]
    owner, reader, writer, space = f"fid_owner_{tag}", f"fid_reader_{tag}", f"fid_writer_{tag}", f"fid_space_{tag}"
    location = session_dir / space
    location.mkdir()
    shutil.chown(location, "postgres", "postgres")
    icu, latin = f"fid_icu_{tag}", f"fid_latin_{tag}"
    pg.sql(f"CREATE ROLE {owner}; CREATE ROLE {reader}; CREATE ROLE {writer}")
    pg.sql(f"CREATE TABLESPACE {space} LOCATION '{location}'")
    pg.sql(f"CREATE DATABASE {icu} TEMPLATE template0 OWNER {owner} LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale(pg)}' "
           f"LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TABLESPACE {space} CONNECTION LIMIT 7 IS_TEMPLATE true")
    pg.sql(f"CREATE DATABASE {latin} TEMPLATE template0 ENCODING 'LATIN1' LOCALE_PROVIDER libc LC_COLLATE 'C' "
           "LC_CTYPE 'POSIX'")
    for statement in (
            f"ALTER DATABASE {icu} SET search_path = '$user', public, \"we,ird\"",
            f"ALTER DATABASE {icu} SET work_mem = '12MB'", f"ALTER DATABASE {icu} SET myapp.flag = 'on'",
            f"ALTER ROLE {reader} IN DATABASE {icu} SET statement_timeout = '5s'",
            f"ALTER ROLE {reader} IN DATABASE {icu} SET search_path = erp",
            f"ALTER ROLE {writer} IN DATABASE {latin} SET lock_timeout = '2s'",
            f"REVOKE CONNECT ON DATABASE {icu} FROM PUBLIC",
            f"GRANT CONNECT ON DATABASE {icu} TO {reader} WITH GRANT OPTION",
            f"GRANT CREATE ON DATABASE {icu} TO {writer}",
            f"SET ROLE {reader}; GRANT CONNECT ON DATABASE {icu} TO {writer}",  # a grant not made by the owner
            f"COMMENT ON DATABASE {icu} IS 'o banco, com ''aspas'' e ç'"):
        pg.sql(statement)
    words = ["b", "B", "a", "Z", "ä", "z"]
    for db in (icu, latin):
        pg.sql("CREATE TABLE words (w text); INSERT INTO words VALUES " + ", ".join(f"('{w}')" for w in words), db)
    try:
        service = Service(workdir, None, [pg.target("icu", icu), pg.target("latin", latin)])
        for name, db in (("icu", icu), ("latin", latin)):
            order = pg.sql("SELECT string_agg(w, ' ' ORDER BY w) FROM words", db)
            assert service.pgbeat("backup", "daily", "--target", name).returncode == 0
            pg.sql("INSERT INTO words VALUES ('after the backup')", db)
            before = snapshot(pg, db)
            [backup] = [b for b in service.backups() if b.name.startswith(f"{name}_")]
            result = service.pgbeat("restore", str(backup), "--yes")
            assert result.returncode == 0, result.stdout + result.stderr
            assert snapshot(pg, db) == before
            assert pg.sql("SELECT string_agg(w, ' ' ORDER BY w) FROM words", db) == order
        assert pg.sql("SELECT string_agg(w, ' ' ORDER BY w) FROM words", icu).startswith("a ä b B")  # ICU's order
        assert leftover_databases(pg, "pgbeat_restore") == [] and leftover_databases(pg, "pgbeat_old") == []
    finally:
        pg.sql(f"ALTER DATABASE {icu} IS_TEMPLATE false")
        for db in (icu, latin):
            pg.dropdb(db)
        pg.sql(f"DROP TABLESPACE {space}")
        pg.sql(f"DROP ROLE {owner}; DROP ROLE {reader}; DROP ROLE {writer}")


# --- rights: a non-superuser owner can; a user without a right is told which, before anything -------


PASSWORD = "restore-Pa55"


def login_role(pg, prefix: str, *options: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:6]}"
    pg.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}' {' '.join(options)}")
    return name


def test_a_non_superuser_owner_restores_and_drills_and_others_are_told_what_they_lack(pg, source, workdir):
    owner = login_role(pg, "own", "CREATEDB")
    nocreate = login_role(pg, "nocreate")
    intruder = login_role(pg, "intruder", "CREATEDB")
    db = pg.createdb(unique("owned"))
    db2 = pg.createdb(unique("owned2"))
    pg.sql(f'ALTER DATABASE "{db}" OWNER TO {owner}; ALTER DATABASE "{db2}" OWNER TO {nocreate}')
    pg.sql(f"SET ROLE {owner}; {SOURCE_SQL}", db)
    try:
        service = Service(workdir / "owner", None, [pg.target("erp", db, user=owner, password=PASSWORD)])
        result = service.pgbeat("backup", "daily")
        assert result.returncode == 0, result.stdout + result.stderr
        [backup] = service.backups()
        expected = pg.dump_text(db)
        pg.sql(f"SET ROLE {owner}; {CHANGE_SQL}", db)
        result = service.pgbeat("restore", str(backup), "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        assert pg.dump_text(db) == expected
        assert pg.sql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{db}'") == owner
        drilled = service.pgbeat("drill")
        assert drilled.returncode == 0 and "drill passed" in drilled.stdout, drilled.stdout + drilled.stderr

        for user, into, right, grant in ((nocreate, db2, "CREATEDB", f"ALTER ROLE {nocreate} CREATEDB"),
                                         (intruder, db, f"ownership of database {db}", f"GRANT {owner} TO {intruder}")):
            other = Service(workdir / user, None, [pg.target("erp", into, user=user, password=PASSWORD)])
            before = pg.dump_text(into)
            result = other.pgbeat("restore", str(backup), "--yes")
            assert result.returncode == 1, result.stdout + result.stderr
            assert right in result.stderr and grant in result.stderr and "nothing was changed" in result.stderr
            assert "Traceback" not in result.stderr
            assert not list(other.backup_root.glob("pre_restore_*")) and pg.dump_text(into) == before
            [event] = [e for e in other.events() if e["kind"] == "restore_failed"]
            assert any(grant in d for d in event["details"])
        drill = Service(workdir / "nocreate-drill", None, [pg.target("erp", db2, user=nocreate, password=PASSWORD)])
        shelf_copy(backup, drill)
        refused = drill.pgbeat("drill")
        assert refused.returncode == 1 and f"ALTER ROLE {nocreate} CREATEDB" in refused.stdout, refused.stdout
        assert [e["kind"] for e in drill.events()] == ["drill_failed"]
        assert leftover_databases(pg) == []
    finally:
        for name in (db, db2):
            pg.dropdb(name)
        pg.sql(f"DROP ROLE {owner}; DROP ROLE {nocreate}; DROP ROLE {intruder}")


# --- restore --on-worker never waits forever ----------------------------------------------------


def test_on_worker_without_a_worker_then_timed_out_then_with_the_whole_worker_killed(pg, source, workdir,
                                                                                    redis_server):
    db = case_database(pg, source)
    service = Service(workdir, redis_server.url, [pg.target("erp", db)], node=f"ow-{uuid.uuid4().hex[:6]}",
                      reliability=FAST)
    backup = shelf_copy(source.backup, service)
    oid = database_oid(pg, db)
    try:
        t0 = time.monotonic()
        nobody = service.pgbeat("restore", str(backup), "--yes", "--on-worker", "--timeout", "60")
        assert nobody.returncode == 5 and "No live worker on host" in nobody.stderr, nobody.stderr
        assert time.monotonic() - t0 < 20

        worker = Worker(service, concurrency=1)
        try:  # the restore it gave up on never runs, even now that a worker is there
            with table_locked(pg, db):  # a restore's safety backup waits here, mid-run
                t0 = time.monotonic()
                timed_out = service.pgbeat("restore", str(backup), "--yes", "--on-worker", "--timeout", "5")
                assert timed_out.returncode == 1, timed_out.stdout + timed_out.stderr
                assert "Timed out after 5 s" in timed_out.stderr
                assert "interrupted by SIGTERM" in timed_out.stderr  # stopped there, and undone
                assert time.monotonic() - t0 < 60
            assert journals(service) == [] and existing(pg, run_names(service)) == []
            assert state_problems(pg, db, oid, source, False, "after the timeout") == []
            assert not list(service.backup_root.glob("pre_restore_*"))  # the first restore never ran

            with table_locked(pg, db):
                killing = subprocess.Popen([str(VENV_BIN / "pgbeat"), "restore", str(backup), "--yes", "--on-worker",
                                            "--timeout", "120"], cwd=service.cwd, env=service.env(),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                wait_for(lambda: journals(service), 60, what="the restore to begin")
                os.killpg(worker.proc.pid, signal.SIGKILL)  # the whole worker, as when its host dies
                out, errors = killing.communicate(timeout=60)
            assert killing.returncode == 1 and "has not reported for over" in errors, out + errors
            assert state_problems(pg, db, oid, source, False, "after the worker died") == []
        finally:
            worker.stop()
        assert journals(service)  # nobody settled it yet...
        successor = Worker(service, name="w2", concurrency=1)  # ...and a worker start does
        try:
            wait_for(lambda: not journals(service), 30, what="the worker start to settle the journal")
        finally:
            successor.stop()
        assert existing(pg, run_names(service)) == [] and not any(p.is_dir() for p in
                                                                  (service.backup_root / ".work").glob("*"))
        # cmdline from process_iter's info: None for a process gone or a zombie (another test's, in parallel)
        assert not [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "pg_dump"
                    and db in " ".join(p.info["cmdline"] or [])]
    finally:
        pg.dropdb(db)
