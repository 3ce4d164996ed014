"""`prefer_standby`: dumps and base backups read a streaming standby of the target's server while it replays
close behind the primary; a standby that is down, too far behind, paused or not a standby at all is passed
over for the primary, and the backup says so (a `standby` warning on the terminal and in the manifest).
Against a real primary and a real standby built from it with pg_basebackup -R."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.support import (
    PG_BIN,
    SECRET_PASSWORD,
    VENV_BIN,
    PgCluster,
    Service,
    free_port,
    make_tempdir,
    wait_for,
)

pytestmark = pytest.mark.integration


class Standby:
    """A hot standby of `primary`, streaming from it, on a port of its own."""

    def __init__(self, base, primary: PgCluster) -> None:
        self.dir = base / "standby"
        self.dir.mkdir()
        subprocess.run(["chown", "postgres:postgres", str(self.dir)], check=True)
        self.data = self.dir / "data"
        self.port = free_port()
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_basebackup"), "-h", primary.host, "-p",
                        str(primary.port), "-U", "postgres", "-D", str(self.data), "-R", "-X", "stream",
                        "--checkpoint=fast"],
                       check=True, capture_output=True)
        with open(self.data / "postgresql.auto.conf", "a") as f:
            f.write(f"\nport = {self.port}\nunix_socket_directories = '{self.dir}'\nhot_standby = on\n")
        self.start()

    def start(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                        str(self.dir / "server.log"), "-w", "start"], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m",
                        "fast", "-w", "stop"], capture_output=True)

    def sql(self, query: str, db: str = "postgres") -> str:
        return subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                               "postgres", "-d", db, "-c", query], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def pair():
    base = make_tempdir("pgbeat-standby-")
    primary = PgCluster(base, "primary")
    # The tests' clusters run without full_page_writes; a base backup taken on a standby needs them.
    primary.sql("ALTER SYSTEM SET full_page_writes = on")
    primary.sql("SELECT pg_reload_conf()")
    primary.sql("CHECKPOINT")
    primary.sql("CREATE DATABASE erp")
    primary.sql("CREATE TABLE invoices AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 300) g", "erp")
    standby = Standby(base, primary)
    wait_for(lambda: standby.sql("SELECT count(*) FROM invoices", "erp") == "300", 60, what="the standby to replay")
    yield primary, standby
    standby.stop()
    primary.destroy()
    shutil.rmtree(base, ignore_errors=True)


def manifest_of(path) -> dict:
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def service_for(workdir, primary, standby, **prefer) -> Service:
    spec = {"host": "127.0.0.1", "port": standby.port, **prefer}
    return Service(workdir / "svc", None, [primary.target("erp", "erp", prefer_standby=spec,
                                                          tiers={"base": {"enabled": True}})])


def test_a_dump_reads_the_standby_and_restores_like_the_primary(workdir, pair):
    primary, standby = pair
    service = service_for(workdir, primary, standby)
    done = service.pgbeat("backup", "daily")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backed up from the primary" not in done.stdout + done.stderr
    [backup] = service.backups()
    manifest = manifest_of(backup)
    assert manifest["steps"]["dump"]["source"].endswith(f":{standby.port}/erp")
    assert manifest["steps"]["dump"]["source_note"] is None and manifest["database"]["port"] == primary.port
    assert not [w for w in manifest["warnings"] if w["kind"] == "standby"]
    copy = "erp_from_standby"
    restored = service.pgbeat("restore", str(backup), "--into", copy, "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert primary.dump_text(copy) == primary.dump_text("erp")
    primary.dropdb(copy)


def test_a_base_backup_reads_the_standby_and_verifies(workdir, pair):
    primary, standby = pair
    service = service_for(workdir, primary, standby)
    done = service.pgbeat("backup", "base", "--local")
    assert done.returncode == 0, done.stdout + done.stderr
    [backup] = service.backups("base", ".tar.gz")
    assert manifest_of(backup)["steps"]["dump"]["source"].endswith(f":{standby.port}/erp")
    verified = service.pgbeat("verify", str(backup))
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("how", ["down", "behind", "not a standby"])
def test_a_standby_that_cannot_serve_is_passed_over_for_the_primary_and_said(workdir, pair, how):
    primary, standby = pair
    prefer = {"max_lag_bytes": 0} if how == "behind" else {}
    service = service_for(workdir, primary, standby, **prefer)
    if how == "not a standby":  # the "standby" is the primary itself
        service.config["targets"][0]["prefer_standby"]["port"] = primary.port
        service.write_config()
    try:
        if how == "down":
            standby.stop()
        elif how == "behind":
            standby.sql("SELECT pg_wal_replay_pause()")
            primary.sql("INSERT INTO invoices SELECT g, 'later' FROM generate_series(301, 400) g", "erp")
        done = service.pgbeat("backup", "daily")
        assert done.returncode == 0, done.stdout + done.stderr
        expected = {"down": "could not be used", "behind": "behind the primary (max_lag_bytes 0 B)",
                    "not a standby": "is not a standby"}[how]
        assert expected in done.stdout and "backed up from the primary" in done.stdout, done.stdout
        [backup] = service.backups()
        manifest = manifest_of(backup)
        assert manifest["steps"]["dump"]["source"].endswith(f":{primary.port}/erp")
        [warning] = [w for w in manifest["warnings"] if w["kind"] == "standby"]
        assert expected in warning["text"]
        if how == "behind":  # the primary's rows, not the paused standby's
            assert manifest["tables"]["public.invoices"] == 400
    finally:
        if how == "down":
            standby.start()
        elif how == "behind":
            standby.sql("SELECT pg_wal_replay_resume()")
            primary.sql("DELETE FROM invoices WHERE id > 300", "erp")
            wait_for(lambda: standby.sql("SELECT count(*) FROM invoices", "erp") == "300", 60,
                     what="the standby to catch up")


def test_the_standbys_own_credentials_log_in_and_appear_nowhere(workdir, pair):
    """The standby's user and password (scram over TCP, not the primary's trust) reach libpq through a
    private passfile: the dump logs in, and the password is in no manifest, log or output."""
    primary, standby = pair
    service = service_for(workdir, primary, standby, user="backup", password=SECRET_PASSWORD)
    done = service.pgbeat("backup", "daily")
    assert done.returncode == 0, done.stdout + done.stderr
    [backup] = service.backups()
    manifest = backup.with_name(backup.name + ".manifest.json").read_text()
    assert json.loads(manifest)["steps"]["dump"]["source"] == f"backup@127.0.0.1:{standby.port}/erp"
    logs = "".join(p.read_text() for p in (service.backup_root / "logs").glob("*") if p.is_file())
    for text in (manifest, logs, done.stdout + done.stderr):
        assert SECRET_PASSWORD not in text


# --- pause_replay: the standby's replay paused for the length of the dump, never left paused -----------


def replay_paused(standby: Standby) -> bool:
    return standby.sql("SELECT pg_is_wal_replay_paused()") == "t"


def pause_records(service: Service) -> list:
    return sorted(p.name for p in (service.backup_root / ".work" / "replay").glob("*.paused"))


def test_pause_replay_pauses_for_the_dump_and_a_killed_dump_is_resumed_by_the_next_run(workdir, pair):
    """While pg_dump runs the standby replays nothing (a row written on the primary meanwhile is not on
    it); killed there, the pause stays recorded, and the next pgbeat run on the host resumes replay.
    Ended normally, replay runs again and nothing is recorded."""
    primary, standby = pair
    service = service_for(workdir, primary, standby, pause_replay=True)
    marks = workdir / "marks"
    marks.mkdir()
    dump = subprocess.Popen([str(VENV_BIN / "pgbeat"), "backup", "daily", "--local"], cwd=service.cwd,
                            env=service.env(PGBEAT_FAULTS="dump.running=pause", PGBEAT_FAULTS_DIR=str(marks)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (marks / "dump.running.reached").exists(), 60, what="the dump to be running")
        assert replay_paused(standby) and pause_records(service)
        primary.sql("INSERT INTO invoices VALUES (1000, 'during the dump')", "erp")
        primary.sql("SELECT pg_switch_wal()")
        time.sleep(1)
        assert standby.sql("SELECT count(*) FROM invoices WHERE id = 1000", "erp") == "0"
        os.killpg(dump.pid, signal.SIGKILL)
        dump.wait(30)
        assert replay_paused(standby) and pause_records(service)  # the kill left it paused, and recorded

        listed = service.pgbeat("list")  # any pgbeat run on this host settles it
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "resumed WAL replay on the standby" in listed.stderr, listed.stderr
        assert not replay_paused(standby) and not pause_records(service)
        wait_for(lambda: standby.sql("SELECT count(*) FROM invoices WHERE id = 1000", "erp") == "1", 60,
                 what="the standby to replay the row again")

        done = service.pgbeat("backup", "daily")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "backed up from the primary" not in done.stdout + done.stderr and "paused" not in done.stdout
        assert not replay_paused(standby) and not pause_records(service)
        [backup] = service.backups()
        assert manifest_of(backup)["steps"]["dump"]["source"].endswith(f":{standby.port}/erp")
        assert manifest_of(backup)["tables"]["public.invoices"] == 301
    finally:
        if dump.poll() is None:
            os.killpg(dump.pid, signal.SIGKILL)
        standby.sql("SELECT pg_wal_replay_resume()")
        primary.sql("DELETE FROM invoices WHERE id > 300", "erp")
        wait_for(lambda: standby.sql("SELECT count(*) FROM invoices", "erp") == "300", 60, what="the catch-up")


def test_pause_replay_leaves_a_dbas_pause_alone_and_says_when_it_may_not_pause(workdir, pair):
    primary, standby = pair
    service = service_for(workdir, primary, standby, pause_replay=True)
    standby.sql("SELECT pg_wal_replay_pause()")
    try:
        done = service.pgbeat("backup", "daily")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "was already paused (not by pgbeat)" in done.stdout, done.stdout
        assert replay_paused(standby)  # still the DBA's
    finally:
        standby.sql("SELECT pg_wal_replay_resume()")
    primary.sql("CREATE ROLE weak_reader LOGIN PASSWORD 'weak-pw' IN ROLE pg_read_all_data")
    try:
        wait_for(lambda: standby.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'weak_reader'") == "1", 60,
                 what="the role on the standby")
        weak = service_for(workdir / "weak", primary, standby, pause_replay=True, user="weak_reader",
                           password="weak-pw")
        done = weak.pgbeat("backup", "daily")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "could not be paused" in done.stdout and "dumped while it replays" in done.stdout, done.stdout
        [backup] = weak.backups()
        assert manifest_of(backup)["steps"]["dump"]["source"].endswith(f":{standby.port}/erp")
        assert not replay_paused(standby) and not pause_records(weak)
    finally:
        primary.sql("DROP ROLE weak_reader")
