"""Physical base backups (the `base` tier): the same chain, a second kind of run.

A base backup of a real cluster is taken through `pgbeat backup base`, verified by pg_verifybackup,
published with its manifest's WAL range, restores into a new data directory that starts and holds the
same data; a damaged one fails `pgbeat verify`; one killed while pg_basebackup runs leaves nothing under
a final name and the next run completes.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess

import pytest

from pgbeat.physical.basebackup import unpack_base
from tests.support import PG_BIN, PgCluster, Service, _as_postgres, free_port, make_tempdir, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(session_dir):
    """A cluster of its own: a base backup copies every database of it."""
    cluster = PgCluster(session_dir, "physical")
    cluster.createdb("erp")
    cluster.sql("CREATE TABLE invoices (id int PRIMARY KEY, total numeric, note text);"
                "INSERT INTO invoices SELECT g, g * 1.5, repeat('x', g % 50) FROM generate_series(1, 20000) g;"
                "CREATE INDEX ON invoices (total);", db="erp")
    yield cluster
    cluster.destroy()


def base_service(workdir, cluster, **target) -> Service:
    return Service(workdir, None, [cluster.target("erp", "erp", tiers={"base": {"enabled": True}}, **target)])


def start_copy(data, base) -> PgCluster:
    """Start the restored data directory `data` as a cluster of its own on a free port."""
    port = free_port()
    with open(data / "postgresql.auto.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{base}'\narchive_mode = off\n")
    pw = pwd.getpwnam("postgres")
    for root, dirs, files in os.walk(base):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.chown(base, pw.pw_uid, pw.pw_gid)
    subprocess.run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"),
                    "-w", "-t", "60", "start"], check=True, capture_output=True)
    copy = PgCluster.__new__(PgCluster)
    copy.dir, copy.data, copy.port, copy.host, copy.bin = base, data, port, "127.0.0.1", PG_BIN
    return copy


def test_a_base_backup_runs_the_chain_verifies_and_restores_the_whole_cluster(workdir, cluster):
    service = base_service(workdir, cluster)
    result = service.pgbeat("backup", "base", "--target", "erp")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("dump", "compress", "verify", "upload", "rotate", "notify"):
        assert f"✓ {step}" in result.stdout, result.stdout
    [backup] = service.backups("base", ".tar.gz")
    assert backup.name.startswith("erp_backup_base_") and oct(backup.stat().st_mode & 0o777) == "0o600"
    manifest = json.loads((backup.parent / (backup.name + ".manifest.json")).read_text())
    physical = manifest["physical"]
    assert manifest["format"] == "tar" and manifest["tier"] == "base" and manifest["server_version"] == "15"
    assert physical["timeline"] == 1 and len(physical["start_wal"]) == 24 and physical["stop_time"]
    assert physical["start_lsn"] and physical["end_lsn"] and physical["client_version"].startswith("15")

    verified = service.pgbeat("verify", str(backup))
    assert verified.returncode == 0, verified.stdout + verified.stderr

    restored = make_tempdir("pgbeat-restored-")  # the postgres user must reach it
    unpack_base(backup, "gzip", restored / "data")
    copy = start_copy(restored / "data", restored)
    try:
        assert copy.dump_text("erp") == cluster.dump_text("erp")
        assert copy.sql("SELECT count(*), sum(total) FROM invoices", db="erp") == \
            cluster.sql("SELECT count(*), sum(total) FROM invoices", db="erp")
    finally:
        copy.destroy()


def test_a_damaged_base_backup_fails_verification(workdir, cluster):
    service = base_service(workdir, cluster, compression={"codec": "zstd", "level": 3})
    assert service.pgbeat("backup", "base", "--target", "erp").returncode == 0
    [backup] = service.backups("base", ".tar.zst")
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x40
    backup.write_bytes(data)
    result = service.pgbeat("verify", str(backup))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "does not decompress" in result.stderr and "do not restore from it" in result.stderr


def test_a_base_backup_inside_is_checked_not_only_its_bytes(workdir, cluster, tmp_path):
    """pg_verifybackup runs on what is unpacked: a file of the cluster changed inside a well-formed
    archive (re-packed, so every checksum of the container is new) is caught by the backup manifest."""
    from pgbeat.errors import VerifyError
    from pgbeat.physical.basebackup import verifybackup
    from pgbeat.settings import load_settings

    service = base_service(workdir, cluster)
    assert service.pgbeat("backup", "base", "--target", "erp").returncode == 0
    [backup] = service.backups("base", ".tar.gz")
    data = tmp_path / "data"
    unpack_base(backup, "gzip", data)
    victim = next(p for p in sorted((data / "base").rglob("*")) if p.is_file() and p.stat().st_size > 8192)
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x01
    victim.write_bytes(raw)
    os.environ["PGBEAT_CONFIG"] = str(service.config_path)
    try:
        with pytest.raises(VerifyError) as failure:
            verifybackup(load_settings(env_file=None), data)
    finally:
        del os.environ["PGBEAT_CONFIG"]
    assert "checksum mismatch" in " ".join(failure.value.details), failure.value.details


def test_a_base_backup_killed_while_pg_basebackup_runs_leaves_nothing_and_the_next_run_completes(workdir, cluster):
    service = base_service(workdir, cluster)
    killed = service.pgbeat("backup", "base", "--target", "erp", PGBEAT_FAULTS="basebackup.running=kill")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert not service.backups("base", ".tar.gz")
    wait_for(lambda: not any("pg_basebackup" in " ".join(p) for p in _processes()), what="pg_basebackup to end")
    again = service.pgbeat("backup", "base", "--target", "erp")
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(service.backups("base", ".tar.gz")) == 1
    work = service.backup_root / ".work"
    assert not work.exists() or not any(work.iterdir()), list(work.iterdir())


def _processes() -> list[list[str]]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            found.append(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
    return found


def test_a_server_without_a_replication_entry_fails_with_the_servers_reason(workdir, cluster):
    service = base_service(workdir, cluster, user="backup", password="wrong-password-for-sure")
    result = service.pgbeat("backup", "base", "--target", "erp")
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "pg_basebackup of erp" in text and "password authentication failed" in text, text
    assert "wrong-password-for-sure" not in text
    assert not service.backups("base", ".tar.gz")


def test_celery_call_of_the_base_tier_runs_the_same_chain_on_a_worker(workdir, cluster, redis_server):
    """`celery call tasks.backup --args='["erp", "base"]'`, as the README says: each step its own task."""
    import uuid

    from tests.support import Worker, wait_run

    service = Service(workdir, redis_server.url, [cluster.target("erp", "erp", tiers={"base": {"enabled": True}})],
                      node=f"physical-{uuid.uuid4().hex[:6]}")
    worker = Worker(service, concurrency=1)
    try:
        called = service.celery("call", "tasks.backup", '--args=["erp", "base"]')
        assert called.returncode == 0, called.stderr
        state = wait_run(redis_server.client, called.stdout.strip(), timeout=180)
        assert state["status"] == "succeeded", state
        [backup] = service.backups("base", ".tar.gz")
        assert state["final_path"] == str(backup)
        verified = service.pgbeat("verify", str(backup))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        worker.stop()


def test_a_base_backup_carries_no_empty_database_warning(workdir, cluster):
    """A base backup counts no rows per table: it must not be taken for a dump of an empty database."""
    service = base_service(workdir, cluster)
    result = service.pgbeat("backup", "base", "--target", "erp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout.lower(), result.stdout
    [backup] = service.backups("base", ".tar.gz")
    manifest = json.loads((backup.parent / (backup.name + ".manifest.json")).read_text())
    assert not [w for w in manifest["warnings"] if w["kind"] == "empty"], manifest["warnings"]
