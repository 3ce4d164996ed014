"""The server's globals beside each logical backup: dumped, verified, copied, encrypted, rotated, restored."""

from __future__ import annotations

import gzip
import json
import stat
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import unique
from tests.integration.test_offsite import s3_destination
from tests.shelf import make_age_key
from tests.support import SECRET_PASSWORD, PgCluster, Service, Worker

pytestmark = pytest.mark.integration

ROLES_SQL = """
CREATE ROLE app_owner LOGIN PASSWORD 'x';
CREATE ROLE app_reader;
GRANT app_reader TO app_owner;
ALTER ROLE app_reader SET search_path = app;
"""


@pytest.fixture(scope="module")
def source(session_dir):
    """A server of its own whose roles the tests create (the shared clusters stay as they are)."""
    cluster = PgCluster(session_dir, unique("globals_src"))
    cluster.sql(ROLES_SQL)
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def destination(session_dir):
    cluster = PgCluster(session_dir, unique("globals_dst"))
    yield cluster
    cluster.destroy()


def owned_db(cluster: PgCluster) -> str:
    """A database owned by app_owner with a table granted to app_reader."""
    name = unique("app")
    cluster.sql(f"CREATE DATABASE {name} OWNER app_owner")
    cluster.sql("CREATE SCHEMA app AUTHORIZATION app_owner; SET ROLE app_owner; "
                "CREATE TABLE app.items AS SELECT generate_series(1, 5) AS id; "
                "GRANT SELECT ON app.items TO app_reader", name)
    return name


def manifest_of(path):
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def globals_of(backup):
    return backup.with_name(manifest_of(backup)["globals"]["file"])


def test_backup_has_globals_verified_and_damage_fails(workdir, source):
    """The globals file beside the backup: 0600, in the manifest and the .sha256, checked by verify."""
    db = owned_db(source)
    service = Service(workdir, None, [source.target("app", db)])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups("daily")
    record = manifest_of(backup)["globals"]
    path = globals_of(backup)
    assert path.name == backup.name.replace(".sql.gz", ".globals.sql.gz")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record["passwords"] is True and {"app_owner", "app_reader"} <= set(record["roles"])
    assert {"app_owner", "app_reader"} <= set(record["used_roles"])
    text = gzip.decompress(path.read_bytes()).decode()
    assert "CREATE ROLE app_owner;" in text and "SCRAM-SHA-256" in text
    assert path.name in backup.with_name(backup.name + ".sha256").read_text()
    assert service.pgbeat("verify", str(backup)).returncode == 0

    original = path.read_bytes()
    path.write_bytes(original[:-10])
    damaged = service.pgbeat("verify", str(backup))
    assert damaged.returncode == 3, damaged.stdout + damaged.stderr
    assert path.name in damaged.stdout + damaged.stderr
    path.unlink()
    assert service.pgbeat("verify", str(backup)).returncode == 3
    # Copied without it, the backup still restores where its roles are; only --with-globals needs it.
    restored = service.pgbeat("restore", str(backup), "--into", unique("copy"), "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    refused = service.pgbeat("restore", str(backup), "--into", unique("copy"), "--yes", "--with-globals")
    assert refused.returncode == 3 and path.name in refused.stdout + refused.stderr


def roles_on(cluster: PgCluster) -> set[str]:
    return set(cluster.sql("SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\\_%'").split())


def test_restore_onto_a_fresh_server_with_globals_twice(workdir, source, destination):
    """Without --with-globals the pre-check names the missing roles; with it, roles, membership, role
    setting, ownership and grants arrive; a second time the roles exist, are named, and nothing fails."""
    db = owned_db(source)
    service = Service(workdir, None, [source.target("app", db),
                                      destination.target("fresh", "postgres", user="backup",
                                                         password=SECRET_PASSWORD)])
    assert service.pgbeat("backup", "daily", "--target", "app").returncode == 0
    [backup] = service.backups("daily")
    listed = service.pgbeat("restore", str(backup), "--list")
    assert listed.returncode == 0 and f"{globals_of(backup).name}" in listed.stdout, listed.stdout + listed.stderr
    assert "role(s), with role passwords" in listed.stdout

    into = unique("newdb")
    refused = service.pgbeat("restore", str(backup), "--target", "fresh", "--into", into, "--yes")
    assert refused.returncode != 0
    assert "app_owner" in refused.stdout + refused.stderr and "--with-globals" in refused.stdout + refused.stderr
    assert "app_owner" not in roles_on(destination)
    assert destination.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{into}'") == "0"

    restored = service.pgbeat("restore", str(backup), "--target", "fresh", "--into", into, "--yes", "--with-globals")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "roles created: app_owner, app_reader" in restored.stdout
    assert {"app_owner", "app_reader"} <= roles_on(destination)
    assert destination.sql("SELECT pg_has_role('app_owner', 'app_reader', 'MEMBER')") == "t"
    assert destination.sql("SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                           "WHERE r.rolname = 'app_reader'") == "{search_path=app}"
    assert destination.sql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid "
                           "WHERE rolname = 'app_owner'") == "t"
    assert destination.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'items'", into) == "app_owner"
    assert destination.sql("SELECT has_table_privilege('app_reader', 'app.items', 'SELECT')", into) == "t"

    # Again: the roles exist, are reported, and nothing fails.
    again = service.pgbeat("restore", str(backup), "--target", "fresh", "--into", unique("newdb"), "--yes",
                           "--with-globals")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "roles created: none" in again.stdout and "existed, left as they were: " in again.stdout
    assert "app_owner" in again.stdout.split("existed, left as they were: ")[1]


def test_a_backup_user_that_is_not_superuser_gets_globals_without_passwords(workdir, source):
    db = owned_db(source)
    user = unique("reader")
    source.sql(f"CREATE ROLE {user} LOGIN PASSWORD 'pw' IN ROLE pg_read_all_data")
    service = Service(workdir, None, [source.target("app", db, user=user, password="pw")])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups("daily")
    manifest = manifest_of(backup)
    assert manifest["globals"]["passwords"] is False and "app_owner" in manifest["globals"]["roles"]
    assert any(w["kind"] == "globals" and "--no-role-passwords" in w["text"] for w in manifest["warnings"])
    text = gzip.decompress(globals_of(backup).read_bytes()).decode()
    assert "CREATE ROLE app_owner;" in text and "PASSWORD" not in text
    assert service.pgbeat("verify", str(backup)).returncode == 0


def test_an_encrypted_target_encrypts_its_globals(workdir, source, session_dir):
    db = owned_db(source)
    key_file, recipient = make_age_key(workdir)
    fresh = PgCluster(session_dir, unique("globals_fresh"))
    service = Service(workdir, None, [source.target("app", db, encryption={"recipients": [recipient]}),
                                      fresh.target("fresh", "postgres", user="backup", password=SECRET_PASSWORD)])
    assert service.pgbeat("backup", "daily", "--target", "app").returncode == 0
    [backup] = service.backups("daily", ".sql.gz.age")
    record = manifest_of(backup)["globals"]
    path = globals_of(backup)
    assert path.name.endswith(".globals.sql.gz.age") and record["encrypted"] is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in backup.parent.iterdir() if ".globals." in p.name] == [path.name]  # no plaintext
    plain = subprocess.run(["age", "-d", "-i", str(key_file), str(path)], capture_output=True, check=True).stdout
    assert "CREATE ROLE app_owner;" in gzip.decompress(plain).decode()
    assert service.pgbeat("verify", str(backup)).returncode == 0
    assert service.pgbeat("verify", str(backup), "--identity", str(key_file)).returncode == 0
    try:  # the globals are decrypted with the backup's identity
        restored = service.pgbeat("restore", str(backup), "--target", "fresh", "--into", "newdb", "--yes",
                                  "--with-globals", "--identity", str(key_file))
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert fresh.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'items'", "newdb") == "app_owner"
    finally:
        fresh.destroy()
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert service.pgbeat("verify", str(backup)).returncode == 3


def test_globals_go_off_site_come_back_and_rotate_with_their_backup(workdir, source, moto_s3):
    db = owned_db(source)
    bucket = moto_s3.new_bucket()
    service = Service(workdir, None, [source.target("app", db, tiers={"daily": {"keep_days": 1}},
                                                    destinations=[s3_destination(moto_s3, bucket)])])
    for _ in range(2):  # within a second or two: the second may move on to the next second's name
        result = service.pgbeat("backup", "daily")
        assert result.returncode == 0, result.stdout + result.stderr
    older, newer = service.backups("daily")
    older_globals, newer_globals = globals_of(older), globals_of(newer)
    assert older_globals.exists() and newer_globals.exists() and older_globals != newer_globals

    def remote() -> set[str]:
        objects = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="pgbeat/daily/").get("Contents", [])
        return {o["Key"].rsplit("/", 1)[1] for o in objects}

    assert {older_globals.name, newer_globals.name} <= remote()
    fetched = workdir / "fetched"
    got = service.pgbeat("fetch", f"s3://{bucket}/pgbeat/daily/{newer.name}", "--to", str(fetched))
    assert got.returncode == 0, got.stdout + got.stderr
    assert (fetched / newer_globals.name).read_bytes() == newer_globals.read_bytes()
    assert service.pgbeat("verify", str(fetched / newer.name)).returncode == 0

    in_5_days = (datetime.now(UTC) + timedelta(days=5)).isoformat()
    result = service.pgbeat("rotate", "--now", in_5_days)
    assert result.returncode == 0, result.stdout + result.stderr
    assert service.backups("daily") == [newer]
    assert not older_globals.exists() and newer_globals.exists()
    left = remote()
    assert older_globals.name not in left and older.name not in left
    assert {newer.name, newer_globals.name} <= left


def test_a_custom_archive_has_its_globals_too_a_safety_backup_none(workdir, source):
    db = owned_db(source)
    service = Service(workdir, None, [source.target("app", db, format="custom")])
    assert service.pgbeat("backup", "daily").returncode == 0
    [backup] = service.backups("daily", ".dump")
    assert globals_of(backup).name == backup.name.replace(".dump", ".globals.sql.gz")
    assert service.pgbeat("verify", str(backup)).returncode == 0
    listed = service.pgbeat("restore", str(backup), "--list")
    assert globals_of(backup).name in listed.stdout, listed.stdout + listed.stderr
    # In place: the safety backup of the database it replaces goes back onto this server, without globals.
    restored = service.pgbeat("restore", str(backup), "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    [safety] = service.backup_root.glob("pre_restore_app_*.sql.gz")
    assert manifest_of(safety)["globals"] is None and service.pgbeat("verify", str(safety)).returncode == 0


def test_restore_on_a_worker_with_globals_onto_a_fresh_server(workdir, source, session_dir, redis_server):
    """`--with-globals --on-worker`: the worker applies the globals, then restores; the CLI shows what the
    globals did and the restored database's owner and grants are there."""
    fresh = PgCluster(session_dir, unique("globals_w"))
    try:
        db = owned_db(source)
        service = Service(workdir, redis_server.url, [source.target("app", db), fresh.target("fresh", "postgres")],
                          node=f"gw-{unique('n')[-6:]}")
        assert service.pgbeat("backup", "daily", "--target", "app", "--local").returncode == 0
        [backup] = service.backups("daily")
        worker = Worker(service, concurrency=1)
        try:
            into = unique("newdb")
            restored = service.pgbeat("restore", str(backup), "--target", "fresh", "--into", into, "--yes",
                                      "--with-globals", "--on-worker", "--timeout", "120")
        finally:
            worker.stop()
        assert restored.returncode == 0, restored.stdout + restored.stderr + worker.log_text()[-3000:]
        assert "roles created: app_owner, app_reader" in restored.stdout
        assert fresh.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'items'", into) == "app_owner"
        assert fresh.sql("SELECT has_table_privilege('app_reader', 'app.items', 'SELECT')", into) == "t"
    finally:
        fresh.destroy()


def test_a_drill_on_a_fresh_drill_server_creates_the_roles_first(workdir, source, session_dir):
    """A drill server of its own lacks the backup's roles: with drill.with_globals off the drill fails
    naming them (nothing created); by default they are created from the globals file and the drill passes."""
    drill_host = PgCluster(session_dir, unique("globals_drill"))
    try:
        db = owned_db(source)
        drill = {"host": drill_host.host, "port": drill_host.port, "user": "postgres"}
        strict = Service(workdir / "strict", None, [source.target("app", db, drill={**drill, "with_globals": False})])
        assert strict.pgbeat("backup", "daily").returncode == 0
        failed = strict.pgbeat("drill", "--target", "app")
        assert failed.returncode != 0 and "app_owner" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
        assert "app_owner" not in roles_on(drill_host)

        service = Service(workdir / "default", None, [source.target("app", db, drill=drill)])
        assert service.pgbeat("backup", "daily").returncode == 0
        drilled = service.pgbeat("drill", "--target", "app")
        assert drilled.returncode == 0, drilled.stdout + drilled.stderr
        [backup] = service.backups("daily")
        [record] = manifest_of(backup)["drills"]
        assert record["status"] == "passed", record
        assert any("globals applied first: roles created: app_owner, app_reader" in c for c in record["checks"]), record
        assert {"app_owner", "app_reader"} <= roles_on(drill_host)
    finally:
        drill_host.destroy()
