"""`pgbeat config check` checks what a run will need: free space, each server, the client programs, the
backup user's rights to dump, restore and drill, each destination by a write-read-delete probe that
leaves nothing behind, the broker and a live worker; exit 0, 1 (something missing) or 5 (unreachable)."""

from __future__ import annotations

import uuid

import pytest

from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import PgCluster, RedisServer, Service, free_port

pytestmark = pytest.mark.integration


def lines(done) -> dict[str, str]:
    """'subject: what' -> the mark (✓, ✗ or !) of each check line."""
    found = {}
    for line in done.stdout.splitlines():
        line = line.strip()
        if line[:1] in "✓✗!" and line[1:2] == " ":
            subject, what, _ = (line[2:] + ": ").split(": ", 2)
            found[f"{subject}: {what}"] = line[0]
    return found


def s3(server, bucket: str) -> dict:
    return {"name": "vault", "kind": "s3", "bucket": bucket, "prefix": "pgbeat", "endpoint_url": server.url,
            "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET}


def test_everything_a_run_needs_is_checked(workdir, pg, make_db, moto_s3):
    db = make_db("check")
    bucket = moto_s3.new_bucket()
    service = Service(workdir, None, [pg.target("erp", db, destinations=[s3(moto_s3, bucket)])])
    done = service.pgbeat("config", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(lines(done).values()) == {"✓"}
    assert set(lines(done)) == {"BACKUP_ROOT: free space", "erp: connection", "erp: client programs",
                                "erp: dump rights", "erp: globals", "erp: restore rights", "erp: drill rights",
                                "erp -> vault: write, read, delete"}
    assert moto_s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # the probe is gone


def test_a_user_without_rights_is_told_which_and_how(workdir, pg, make_db):
    db = make_db("norights")
    role = f"weak_{uuid.uuid4().hex[:6]}"
    pg.sql(f"CREATE ROLE {role} LOGIN PASSWORD 'weak-pw'; CREATE TABLE secret (id int); CREATE TABLE open (id int); "
           f"GRANT SELECT ON open TO {role}", db)
    try:
        service = Service(workdir, None, [pg.target("erp", db, user=role, password="weak-pw")])
        done = service.pgbeat("config", "check")
        assert done.returncode == 1, done.stdout + done.stderr
        checks = lines(done)
        assert checks["erp: connection"] == "✓" and checks["erp: dump rights"] == "✗"
        assert checks["erp: restore rights"] == "✗" and checks["erp: drill rights"] == "✗"
        assert "cannot read 1 relation(s) pg_dump would dump: public.secret" in done.stdout
        assert "CREATEDB" in done.stdout
        assert checks["erp: globals"] == "!" and "--no-role-passwords" in done.stdout
    finally:
        pg.sql(f"DROP OWNED BY {role}", db)
        pg.sql(f"DROP ROLE {role}")


def test_what_cannot_be_reached_exits_5(workdir, pg, make_db, moto_s3):
    db = make_db("unreach")
    redis = RedisServer(workdir)  # no worker of any test listens here
    try:
        targets = [pg.target("erp", db, destinations=[s3(moto_s3, f"missing-{uuid.uuid4().hex[:8]}")]),
                   pg.target("gone", db, port=free_port(), connect_timeout=1)]
        service = Service(workdir, redis.url, targets)
        done = service.pgbeat("config", "check", timeout=120)
    finally:
        redis.stop()
    assert done.returncode == 5, done.stdout + done.stderr
    checks = lines(done)
    assert checks["erp: connection"] == "✓" and checks["erp -> vault: write, read, delete"] == "✗"
    assert checks["gone: connection"] == "✗" and "gone: dump rights" not in checks
    assert checks["broker: Redis answers"] == "✓" and checks["broker: a live worker on queue pgbeat"] == "✗"
    assert "Traceback" not in done.stdout + done.stderr and S3_SECRET not in done.stdout + done.stderr


def test_base_backups_and_the_receiver_need_a_replication_connection(workdir, session_dir):
    """The REPLICATION attribute, then a real replication connection, which pg_hba.conf may refuse."""
    cluster = PgCluster(session_dir, f"repl_{uuid.uuid4().hex[:6]}")
    try:
        cluster.createdb("erp")
        cluster.sql("CREATE ROLE plain LOGIN PASSWORD 'plain-pw'; "
                    "CREATE ROLE streamer LOGIN REPLICATION PASSWORD 'streamer-pw'")
        base = {"tiers": {"base": {"enabled": True}}}
        targets = [cluster.target("super", "erp", **base),
                   cluster.target("plain", "erp", user="plain", password="plain-pw", **base),
                   cluster.target("streamer", "erp", user="streamer", password="streamer-pw",
                                  wal={"receiver": True}),
                   cluster.target("dumps", "erp")]
        service = Service(workdir, None, targets)
        done = service.pgbeat("config", "check")
        checks = lines(done)
        assert checks["super: replication"] == "✓" and checks["streamer: replication"] == "✓", done.stdout
        assert checks["plain: replication"] == "✗" and "ALTER ROLE plain REPLICATION" in done.stdout
        assert "dumps: replication" not in checks  # no base tier, no receiver: no replication connection
        assert done.returncode == 1

        # pg_hba.conf without replication lines: the attribute is there, the connection is refused.
        hba = cluster.data / "pg_hba.conf"
        hba.write_text("".join(line + "\n" for line in hba.read_text().splitlines() if "replication" not in line))
        cluster.sql("SELECT pg_reload_conf()")
        refused = lines(done := service.pgbeat("config", "check"))
        assert refused["super: replication"] == "✗" and refused["streamer: replication"] == "✗", done.stdout
        assert "pg_hba.conf" in done.stdout and "streamer-pw" not in done.stdout + done.stderr
    finally:
        cluster.destroy()
