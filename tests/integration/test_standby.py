"""`prefer_standby`: dumps and base backups read a streaming standby of the target's server while it replays
close behind the primary; a standby that is down, too far behind, paused or not a standby at all is passed
over for the primary, and the backup says so (a `standby` warning on the terminal and in the manifest).
Against a real primary and a real standby built from it with pg_basebackup -R."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support import PG_BIN, SECRET_PASSWORD, PgCluster, Service, free_port, make_tempdir, wait_for

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
