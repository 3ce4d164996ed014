"""`pgbeat rebuild SOURCE --onto DEST`: a server rebuilt on a fresh cluster from its globals and its
databases' backups, in one command; run twice; refused and planned without changing anything."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.conftest import unique
from tests.shelf import make_age_key
from tests.support import VENV_BIN, PgCluster, Service, wait_for

pytestmark = pytest.mark.integration

ROLES_SQL = """
CREATE ROLE rb_owner LOGIN PASSWORD 'x';
CREATE ROLE rb_reader;
GRANT rb_reader TO rb_owner;
ALTER ROLE rb_reader SET work_mem = '8MB';
"""
HOSTILE = 'rb "quoted" db'


@pytest.fixture(scope="module")
def world(session_dir, tmp_path_factory):
    """A source server with roles and two databases owned by them (one with a hostile name), backed up by a
    whole-server target (`databases: all`), and `postgres` by a listed one; a fresh cluster to rebuild onto."""
    source = PgCluster(session_dir, unique("rb_src"))
    fresh = PgCluster(session_dir, unique("rb_dst"))
    source.sql(ROLES_SQL)
    for db in ("rb_app", HOSTILE):
        source.sql(f'CREATE DATABASE "{db.replace(chr(34), chr(34) * 2)}" OWNER rb_owner')
        source.sql("SET ROLE rb_owner; CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v "
                   "FROM generate_series(1, 50) g; GRANT SELECT ON items TO rb_reader", db)
    service = Service(tmp_path_factory.mktemp("rebuild"), None,
                      [whole_server(source, "srv", exclude=["postgres"]),
                       source.target("maint", "postgres"), fresh.target("fresh", "postgres")])
    for target in ("srv", "maint"):
        done = service.pgbeat("backup", "daily", "--target", target)
        assert done.returncode == 0, done.stdout + done.stderr
    yield source, fresh, service
    source.destroy()
    fresh.destroy()


def whole_server(cluster: PgCluster, name: str, **extra) -> dict:
    """A `databases: all` target of `cluster`."""
    target = cluster.target(name, "-")
    del target["dbname"]
    return {**target, "databases": "all", **extra}


def databases(cluster: PgCluster) -> set[str]:
    return set(cluster.sql("SELECT datname FROM pg_database WHERE NOT datistemplate").splitlines())


def test_dry_run_plans_every_database_and_changes_nothing(world):
    _, fresh, service = world
    before = databases(fresh)
    planned = service.pgbeat("rebuild", "srv", "--onto", "fresh", "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    text = planned.stdout
    assert "rb_app" in text and "rb \"quoted\" db" in text and "2 database(s) would be restored" in text, text
    assert "postgres" in text and "skipped" in text  # the maintenance database: by hand, into another name
    assert databases(fresh) == before


def test_without_a_terminal_or_yes_it_is_refused_and_nothing_changes(world):
    _, fresh, service = world
    before = databases(fresh)
    refused = service.pgbeat("rebuild", "maint", "--onto", "fresh")
    assert refused.returncode != 0 and "confirmation" in refused.stderr, refused.stdout + refused.stderr
    assert databases(fresh) == before


def test_onto_the_same_server_or_a_physical_tier_is_a_usage_error(world):
    _, _, service = world
    same = service.pgbeat("rebuild", "srv", "--onto", "maint", "--yes")
    assert same.returncode == 2 and "the server being rebuilt" in same.stderr, same.stdout + same.stderr
    base = service.pgbeat("rebuild", "maint", "--onto", "fresh", "--tier", "base", "--yes")
    assert base.returncode == 2 and "--tier base" in base.stderr, base.stdout + base.stderr


def test_a_server_rebuilt_on_a_fresh_cluster_twice_equals_the_source(world):
    """Roles, memberships and role settings first, then each database with its owner and grants; the
    data equal to the source's; a second run restores them again and still equals."""
    source, fresh, service = world
    for attempt in (1, 2):
        rebuilt = service.pgbeat("rebuild", "srv" if attempt == 1 else "maint", "--onto", "fresh", "--yes")
        assert rebuilt.returncode == 0, f"run {attempt}:\n{rebuilt.stdout}{rebuilt.stderr}"
        assert "Rebuilt 2 of 2 database(s)" in rebuilt.stdout, rebuilt.stdout
        assert {"rb_app", HOSTILE} <= databases(fresh)
        for db in ("rb_app", HOSTILE):
            assert fresh.dump_text(db) == source.dump_text(db), db
            assert fresh.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'items'", db) == "rb_owner"
            assert fresh.sql("SELECT has_table_privilege('rb_reader', 'items', 'SELECT')", db) == "t"
        assert fresh.sql("SELECT pg_has_role('rb_owner', 'rb_reader', 'MEMBER')") == "t"
        assert fresh.sql("SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                         "WHERE r.rolname = 'rb_reader'") == "{work_mem=8MB}"
    # The second run replaced what the first restored: a safety backup of each, under the --onto target.
    assert len(list(service.backup_root.glob("pre_restore_fresh_*.sql.gz"))) == 2


def test_a_damaged_backup_fails_its_database_only(world, session_dir):
    """One database's newest backup damaged: the others are rebuilt, the damaged one is named, exit 3."""
    source, _, service = world
    other = PgCluster(session_dir, unique("rb_other"))
    try:
        service2 = Service(service.base / unique("dmg"), None, [source.target("app", "rb_app"),
                                                                source.target("hostile", HOSTILE),
                                                                other.target("other", "postgres")])
        for target in ("app", "hostile"):
            assert service2.pgbeat("backup", "daily", "--target", target).returncode == 0
        [damaged] = [b for b in service2.backups("daily") if b.name.startswith("app_")]
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
        rebuilt = service2.pgbeat("rebuild", "app", "--onto", "other", "--yes")
        assert rebuilt.returncode == 3, rebuilt.stdout + rebuilt.stderr
        assert "Rebuilt 1 of 2 database(s)" in rebuilt.stderr and "failed: rb_app" in rebuilt.stderr
        assert HOSTILE in databases(other) and "rb_app" not in databases(other)
    finally:
        other.destroy()


def test_encrypted_backups_rebuild_with_the_sources_identity_file(workdir, session_dir):
    """An encrypted target's backups (and globals) are decrypted with its encryption.identity_file: no
    --identity needed, and the --onto target has no key of its own."""
    source = PgCluster(session_dir, unique("rb_enc"))
    fresh = PgCluster(session_dir, unique("rb_enc_dst"))
    try:
        source.sql("CREATE ROLE enc_owner LOGIN")
        source.createdb("enc_app")
        source.sql("ALTER DATABASE enc_app OWNER TO enc_owner")
        source.sql("SET ROLE enc_owner; CREATE TABLE items AS SELECT generate_series(1, 20) AS id", "enc_app")
        key_file, recipient = make_age_key(workdir)
        service = Service(workdir, None, [
            source.target("enc", "enc_app", encryption={"recipients": [recipient], "identity_file": str(key_file)}),
            fresh.target("fresh", "postgres")])
        assert service.pgbeat("backup", "daily").returncode == 0
        assert service.backups("daily", ".sql.gz.age")
        rebuilt = service.pgbeat("rebuild", "enc", "--onto", "fresh", "--yes")
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert fresh.dump_text("enc_app") == source.dump_text("enc_app")
        assert fresh.sql("SELECT datdba::regrole FROM pg_database WHERE datname = 'enc_app'") == "enc_owner"
    finally:
        fresh.destroy()
        source.destroy()


def test_a_rebuild_stopped_midway_undoes_that_restore_stops_and_the_next_run_completes(workdir, session_dir):
    """SIGTERM while the first database loads: that restore is undone (no temporary database, nothing
    named like it), the rest are not begun, exit 130; run again, every database is rebuilt."""
    source = PgCluster(session_dir, unique("rb_int"))
    fresh = PgCluster(session_dir, unique("rb_int_dst"))
    try:
        for db in ("int_a", "int_b"):
            source.createdb(db)
            source.sql("CREATE TABLE items AS SELECT generate_series(1, 30) AS id", db)
        service = Service(workdir, None, [source.target("a", "int_a"), source.target("b", "int_b"),
                                          fresh.target("fresh", "postgres")])
        for target in ("a", "b"):
            assert service.pgbeat("backup", "daily", "--target", target).returncode == 0
        before = databases(fresh)
        marks = workdir / "marks"
        marks.mkdir()
        stopped = subprocess.Popen([str(VENV_BIN / "pgbeat"), "rebuild", "a", "--onto", "fresh", "--yes"],
                                   cwd=service.cwd, env=service.env(PGBEAT_FAULTS="restore.load.middle=pause",
                                                                    PGBEAT_FAULTS_DIR=str(marks)),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: (marks / "restore.load.middle.reached").exists(), 60, what="the first load")
            stopped.send_signal(signal.SIGTERM)
            out, err = stopped.communicate(timeout=60)
        finally:
            if stopped.poll() is None:
                stopped.kill()
        assert stopped.returncode == 130, out + err
        assert "interrupted, the rest were not begun" in err and "Rebuilt 0 of 2" in err, out + err
        assert databases(fresh) == before  # the interrupted restore left nothing, the other never began

        again = service.pgbeat("rebuild", "a", "--onto", "fresh", "--yes")
        assert again.returncode == 0, again.stdout + again.stderr
        for db in ("int_a", "int_b"):
            assert fresh.dump_text(db) == source.dump_text(db)
    finally:
        fresh.destroy()
        source.destroy()
