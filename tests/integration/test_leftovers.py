"""Leftovers of killed runs go with the next pgbeat process of any kind on the host, a live run's never;
and the password reaches pg_dump without any file on disk.

The sweep (pgbeat.pipeline.record.sweep_work_folders, a recovery in pgbeat.startup) removes a work folder when no live
process holds its lock and, for a Celery run, when the run is no longer active in Redis.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from pgbeat.pipeline.record import SCRATCH_PURPOSES
from tests.conftest import unique
from tests.shelf import backups_of, restore_into, shelf_problems
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import (
    SECRET_PASSWORD,
    VENV_BIN,
    Service,
    Worker,
    pg_dump_processes,
    table_locked,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def locked_db(pg):
    name = pg.createdb(unique("left"))
    pg.sql("CREATE TABLE big AS SELECT i, md5(i::text) AS h FROM generate_series(1, 3000) AS i", name)
    yield name
    pg.dropdb(name)


def partial_dumps(folder: Path) -> list[Path]:
    """What a run's dump has written so far: `dump.sql`, or the backup a streaming dump compresses into."""
    return [p for p in folder.iterdir() if p.name == "dump.sql" or p.name.endswith(".sql.gz")]


def plant_leftovers(work: Path) -> dict[str, Path]:
    """What killed runs leave (as today's main leaves it too): a run's folder with a partial dump and a
    cleartext passfile, an off-site scratch folder, a half-created folder; and a restore's folder, which
    is not the sweep's to judge."""
    work.mkdir(parents=True, exist_ok=True)
    run = work / uuid.uuid4().hex
    run.mkdir()
    (run / "dump.sql").write_text("--\n-- PostgreSQL database dump\n--\nCOPY t (i) FROM stdin;\n1\n")
    (run / ".pgpass").write_text(f"*:*:*:*:{SECRET_PASSWORD}\n")
    celery_run = work / str(uuid.uuid4())  # `celery call` names runs by task id, with dashes
    celery_run.mkdir()
    scratch = work / "offsite-0123456789ab"
    scratch.mkdir()
    (scratch / ".lock").touch()
    (scratch / "x.sql.gz.age").write_bytes(b"age")
    half = work / f".{uuid.uuid4().hex}.new-999999"
    half.mkdir()
    (half / ".lock").touch()
    foreign = work / "restore-0123456789ab"
    foreign.mkdir()
    return {"run": run, "celery run": celery_run, "scratch": scratch, "half-made": half, "foreign": foreign}


@pytest.mark.parametrize("command", [("list",), ("status",), ("config", "check", "--no-connect")])
def test_any_command_sweeps_what_killed_runs_left(workdir, pg, locked_db, command):
    service = Service(workdir, None, [pg.target("erp", locked_db)])
    planted = plant_leftovers(service.backup_root / ".work")
    result = service.pgbeat(*command)
    assert result.returncode == 0, result.stdout + result.stderr
    left = {what for what, path in planted.items() if path.exists()}
    assert left == {"foreign"}  # a restore's folder is left to restore's own recovery
    assert SECRET_PASSWORD not in result.stdout + result.stderr


def test_a_killed_backup_leaves_nothing_after_the_next_command(workdir, pg, locked_db):
    """`pgbeat backup` SIGKILLed mid-dump (a password target): a partial dump, no passfile on disk; the
    next command removes the folder, and the next backup is whole."""
    service = Service(workdir, None, [pg.target("erp", locked_db, user="backup", password=SECRET_PASSWORD)])
    faults = workdir / "faults"
    faults.mkdir()
    killed = service.pgbeat("backup", "daily", PGBEAT_FAULTS="dump.streaming=kill", PGBEAT_FAULTS_DIR=str(faults))
    assert killed.returncode == -signal.SIGKILL
    [folder] = (service.backup_root / ".work").iterdir()
    assert partial_dumps(folder) and not (folder / ".pgpass").exists()
    assert service.pgbeat("list").returncode == 0
    assert not folder.exists()
    again = service.pgbeat("backup", "daily")
    assert again.returncode == 0, again.stdout
    assert len(backups_of(service.backup_root, "erp")) == 1 and shelf_problems(service.backup_root) == []


def test_a_live_runs_folder_survives_a_sweep_started_while_it_runs(workdir, pg, locked_db, make_db):
    service = Service(workdir, None, [pg.target("erp", locked_db)])
    with table_locked(pg, locked_db):
        proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), "backup", "daily"], cwd=service.cwd, env=service.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
            [folder] = (service.backup_root / ".work").iterdir()
            for command in (("list",), ("status",)):
                assert service.pgbeat(*command).returncode == 0
            assert partial_dumps(folder)
        except BaseException:
            proc.kill()
            raise
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + errs
    [backup] = backups_of(service.backup_root, "erp")
    restored = make_db("restored")
    restore_into(pg, backup, restored)
    assert pg.dump_text(restored) == pg.dump_text(locked_db)


def test_worker_start_sweeps_dead_runs_and_keeps_active_ones(workdir, pg, locked_db, redis_server):
    """At worker start: folders of runs that are over (failed, abandoned, unknown to Redis) go; the folder of
    a Celery run between two steps (active in Redis, no process holds it) stays."""
    service = Service(workdir, redis_server.url, [pg.target("erp", locked_db)], node=f"lo-{uuid.uuid4().hex[:6]}")
    planted = plant_leftovers(service.backup_root / ".work")
    work = service.backup_root / ".work"
    by_status = {status: work / uuid.uuid4().hex for status in ("queued", "running", "waiting", "failed",
                                                                 "abandoned", "succeeded")}
    for status, folder in by_status.items():
        folder.mkdir()
        (folder / "dump.sql").write_text("partial")
        redis_server.client.hset(f"pgbeat:run:{folder.name}", mapping={"status": status})
    worker = Worker(service)
    try:
        wait_for(lambda: not planted["run"].exists(), 30, what="the sweep at worker start")
    finally:
        worker.stop()
    assert {s for s, folder in by_status.items() if folder.exists()} == {"queued", "running", "waiting"}
    assert {what for what, path in planted.items() if path.exists()} == {"foreign"}
    assert "removed the work folder" in worker.log_text()


def test_no_passfile_on_disk_while_pg_dump_runs(workdir, pg, locked_db, make_db):
    """The password reaches pg_dump through a file that exists only in pgbeat's memory: while the dump
    waits, pg_dump's PGPASSFILE is a /proc path to a memfd, no file on disk holds the password, and the
    password is not in ps. pg_dump -j's worker connections find it too."""
    service = Service(workdir, None, [
        pg.target("erp", locked_db, user="backup", password=SECRET_PASSWORD),
        pg.target("erp_dir", locked_db, user="backup", password=SECRET_PASSWORD, format="directory", jobs=2)])
    for name in ("erp", "erp_dir"):
        with table_locked(pg, locked_db):
            proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), "backup", "daily", "--target", name], cwd=service.cwd,
                                    env=service.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                dumps = wait_for(lambda: (found := pg_dump_processes(locked_db)) and len(found) >= 1 and found,
                                 20, what="pg_dump")
                passfile = dumps[0].environ()["PGPASSFILE"]
                assert passfile.startswith(f"/proc/{proc.pid}/fd/"), passfile
                assert os.readlink(passfile).startswith("/memfd:pgbeat-passfile")
                assert stat.S_ISREG(os.stat(passfile).st_mode) and stat.S_IMODE(os.stat(passfile).st_mode) == 0o600
                for path in [*service.backup_root.rglob("*"), *Path("/tmp").glob("*pgpass*")]:
                    if path.is_file():
                        assert SECRET_PASSWORD.encode() not in path.read_bytes(), path
                ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                assert "pg_dump" in ps and SECRET_PASSWORD not in ps
            except BaseException:
                proc.kill()
                raise
        out, errs = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + errs
    assert shelf_problems(service.backup_root) == []
    [plain] = backups_of(service.backup_root, "erp")
    restored = make_db("restored")
    restore_into(pg, plain, restored)
    assert pg.dump_text(restored) == pg.dump_text(locked_db)
    [directory] = backups_of(service.backup_root, "erp_dir")
    assert len(list(directory.glob("*.dat.gz"))) >= 1  # written by pg_dump -j 2's workers


@pytest.fixture
def encrypted_offsite(workdir, pg, locked_db, moto_s3):
    """A target whose backups are encrypted (a real age key) and copied to S3 (moto); one backup taken.
    Returns (service, local backup, its S3 address, identity file)."""
    key = workdir / "backup-key.txt"
    made = subprocess.run(["age-keygen", "-o", str(key)], capture_output=True, text=True, check=True)
    recipient = made.stderr.strip().split("Public key: ")[1]
    bucket = moto_s3.new_bucket()
    s3 = {"name": "offsite-s3", "kind": "s3", "bucket": bucket, "prefix": "pgbeat", "endpoint_url": moto_s3.url,
          "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET, "retries": 1}
    service = Service(workdir, None, [pg.target("erp", locked_db, encryption={"recipients": [recipient]},
                                                destinations=[s3])])
    first = service.pgbeat("backup", "daily")
    assert first.returncode == 0, first.stdout + first.stderr
    [local] = service.backups("daily", ".sql.gz.age")
    return service, local, f"s3://{bucket}/pgbeat/daily/{local.name}", key


# How to get a pgbeat process into each kind of scratch folder; a kind without a way in fails the test below.
SCRATCH_COMMANDS = {
    "fetch": lambda local, url, key: ("restore", url, "--into", f"left_{uuid.uuid4().hex[:8]}", "--identity", str(key)),
    "verify": lambda local, url, key: ("verify", str(local), "--identity", str(key)),
    "offsite": lambda local, url, key: ("backup", "daily"),
    "unpack": lambda local, url, key: ("verify", BASE_BACKUP),
}
BASE_BACKUP = "{a base backup of the target's cluster}"  # taken by the test when a command needs one


@pytest.mark.parametrize("purpose", sorted(SCRATCH_PURPOSES))
def test_a_process_killed_with_a_full_scratch_folder_leaves_nothing(workdir, encrypted_offsite, purpose):
    """Killed while its scratch folder holds a download, a plaintext or an encrypted copy, the next pgbeat
    command removes the folder; the shelf keeps its whole backups."""
    assert set(SCRATCH_COMMANDS) == set(SCRATCH_PURPOSES)
    service, local, url, key = encrypted_offsite
    faults = workdir / f"faults-{purpose}"
    faults.mkdir()
    command = SCRATCH_COMMANDS[purpose](local, url, key)
    if BASE_BACKUP in command:
        service.config["targets"][0]["tiers"] = {"base": {"enabled": True}}
        service.write_config()
        taken = service.pgbeat("backup", "base")
        assert taken.returncode == 0, taken.stdout + taken.stderr
        [base] = service.backups("base", ".tar.gz.age")
        command = (*(str(base) if part == BASE_BACKUP else part for part in command), "--identity", str(key))
    killed = service.pgbeat(*command, PGBEAT_FAULTS=f"scratch.{purpose}=kill", PGBEAT_FAULTS_DIR=str(faults))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    work = service.backup_root / ".work"
    [left] = [p for p in work.iterdir() if p.name.startswith(f"{purpose}-")]
    assert any(left.iterdir()), "the fault point is reached with the folder's content in place"
    assert service.pgbeat("list").returncode == 0
    assert not left.exists() and not [p for p in work.iterdir() if p.name.startswith(f"{purpose}-")]
    assert local.exists() and shelf_problems(service.backup_root) == []


def test_a_sweep_between_the_safety_backups_steps_keeps_its_folder(workdir, pg, locked_db):
    """An in-place restore paused between its safety backup's steps (the dump done, not yet compressed):
    another pgbeat process starting then (its sweep) leaves the folder alone; killed there, the restore's
    journal undoes it on the next command and the database is as it was."""
    service = Service(workdir, None, [pg.target("erp", locked_db)])
    assert service.pgbeat("backup", "daily").returncode == 0
    [backup] = service.backups()
    faults = workdir / "faults"
    faults.mkdir()
    restoring = subprocess.Popen([str(VENV_BIN / "pgbeat"), "restore", str(backup), "--yes"], cwd=service.cwd,
                                 env=service.env(PGBEAT_FAULTS="restore.safety.middle=pause",
                                                 PGBEAT_FAULTS_DIR=str(faults)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (faults / "restore.safety.middle.reached").exists(), 60, what="the pause point")
        work = service.backup_root / ".work"
        folders = [p for p in work.iterdir() if partial_dumps(p)]
        assert len(folders) == 1, list(work.iterdir())
        assert service.pgbeat("list").returncode == 0  # sweeps what no live process holds
        assert partial_dumps(folders[0]), "a live restore's safety backup folder was swept"
    finally:
        restoring.kill()
        restoring.wait(10)
    assert service.pgbeat("list").returncode == 0
    assert pg.sql("SELECT count(*) FROM big", locked_db) == "3000"
    assert not folders[0].exists()
