"""The embedded default: `pgbeat` with a `.env` and no broker, against a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess

import pytest

from tests.support import SECRET_PASSWORD, Service, free_port

pytestmark = pytest.mark.integration


def write_env(service: Service, **values) -> None:
    (service.cwd / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def env_service(workdir, pg, db, **extra) -> Service:
    service = Service(workdir, None, [])
    service.config_path.unlink()
    write_env(service, DB_HOST=pg.host, DB_PORT=pg.port, DB_NAME=db, DB_USER="postgres",
              BACKUP_ROOT=service.backup_root, **extra)
    return service


def no_config(service: Service) -> dict:
    return {"PGBEAT_CONFIG": ""}


def test_env_backup_round_trip(workdir, pg, rich_db, make_db):
    """The README's main command: a daily backup of the .env database restores identically."""
    service = env_service(workdir, pg, rich_db, TARGET_NAME="erp_db")
    result = service.pgbeat("backup", "daily", **no_config(service))
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups()
    assert backup.name.startswith("erp_db_backup_daily_") and backup.name.endswith(".sql.gz")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE((service.backup_root / "daily").stat().st_mode) == 0o700
    assert stat.S_IMODE(service.backup_root.stat().st_mode) == 0o700

    restored = make_db("restored")
    pg.restore_plain_gz(backup, restored)
    assert pg.dump_text(restored) == pg.dump_text(rich_db)

    manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(backup.read_bytes()).hexdigest()
    assert manifest["md5"] == hashlib.md5(backup.read_bytes()).hexdigest()
    assert manifest["tables"]["erp.customers"] == 300
    assert manifest["tables"]["erp.invoices"] == 1200
    assert manifest["tables"]['"Ação Fiscal"."Notas ""Fiscais"" (2025)"'] == 3
    assert manifest["status"] == "verified" and manifest["complete"] is True
    assert manifest["server_version"].startswith("15")
    sums = subprocess.run(["sha256sum", "-c", backup.name + ".sha256"], cwd=backup.parent, capture_output=True,
                          text=True)
    assert sums.returncode == 0 and ": OK" in sums.stdout

    log_lines = (service.backup_root / "logs").glob("erp_db_daily_*.log")
    text = "".join(p.read_text() for p in log_lines)
    for expected in ("] Iniciando backup do banco de dados...", "] SUCCESS: Backup SQL criado",
                     "] SUCCESS: Backup verificado com sucesso", "] Removidos 0 backup(s) antigo(s)"):
        assert expected in text
    assert not list((service.backup_root / ".work").iterdir())

    verify = service.pgbeat("verify", str(backup), **no_config(service))
    assert verify.returncode == 0, verify.stderr
    listing = service.pgbeat("list", "--json", **no_config(service))
    assert [b["file"] for b in json.loads(listing.stdout)] == [backup.name]


def test_custom_and_directory_formats_restore_with_pg_restore(workdir, pg, rich_db, make_db):
    service = Service(workdir, None, [pg.target("erp_custom", rich_db, format="custom"),
                                      pg.target("erp_dir", rich_db, format="directory", jobs=2)])
    tables = {}
    for name, suffix in (("erp_custom", ".dump"), ("erp_dir", ".dir")):
        result = service.pgbeat("backup", "weekly", "--target", name)
        assert result.returncode == 0, result.stdout + result.stderr
        [backup] = service.backups("weekly", suffix)
        manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
        assert manifest["tables"]["erp.invoices"] == 1200
        tables[name] = manifest["tables"]
        restored = make_db("restored")
        subprocess.run([str(pg_restore()), "-j", "2", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d",
                        restored, str(backup)], check=True, capture_output=True)
        assert pg.dump_text(restored) == pg.dump_text(rich_db)
        assert service.pgbeat("verify", str(backup)).returncode == 0
        if backup.is_dir():
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in backup.iterdir())
            # pgbeat compressed every data file itself (pg_dump ran with -Z 0), large objects too.
            data = sorted(p.name for p in backup.iterdir() if p.name not in ("toc.dat", "blobs.toc"))
            assert data and all(n.endswith(".dat.gz") for n in data), data
            assert any(n.startswith("blob_") for n in data), data
            assert not list(service.backup_root.rglob("*.files.json"))  # the in-flight facts stay in the run
    # Rows per table, the hostile name included, counted from the data files as from pg_restore's stream.
    assert tables["erp_dir"] == tables["erp_custom"] and '"Ação Fiscal"."Notas ""Fiscais"" (2025)"' in tables["erp_dir"]


def pg_restore():
    from tests.support import PG_BIN

    return PG_BIN / "pg_restore"


def snapshot(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("failure", ["wrong password", "unreachable host"])
def test_failing_dump_leaves_older_backups_and_no_final_file(workdir, pg, make_db, failure):
    db = make_db("small")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS i", db)
    service = Service(workdir, None, [pg.target("erp", db, user="backup", password=SECRET_PASSWORD)],
                      reliability={"retries": 1, "retry_backoff": 1})
    assert service.pgbeat("backup", "daily").returncode == 0
    before = snapshot(service.backup_root / "daily")
    assert len(before) == 4  # backup, manifest, .sha256, the server's globals

    if failure == "wrong password":
        service.config["targets"][0]["password"] = "not-the-password"
    else:
        service.config["targets"][0]["port"] = free_port()
    service.write_config()
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 1
    assert snapshot(service.backup_root / "daily") == before
    assert not list((service.backup_root / ".work").iterdir())
    events = service.events()
    assert [e["kind"] for e in events] == ["success", "failure"]
    failed = events[-1]
    assert failed["step"] == "dump"
    details = "\n".join(failed["details"])
    if failure == "wrong password":
        assert "password authentication failed" in details
        assert "WARNING" not in "".join(p.read_text() for p in (service.backup_root / "logs").glob("*.log"))
    else:
        assert "Connection refused" in details or "could not connect" in details
        log_text = "".join(p.read_text() for p in (service.backup_root / "logs").glob("erp_daily_*.log"))
        assert "nova tentativa em 1s" in log_text  # one retry with backoff before giving up
    everything = result.stdout + result.stderr + json.dumps(events)
    everything += "".join(p.read_text() for p in (service.backup_root / "logs").glob("*"))
    assert SECRET_PASSWORD not in everything and "not-the-password" not in everything


def test_password_never_on_command_line(workdir, pg, make_db):
    """pg_dump gets the password through a 0600 passfile; `ps` never shows it."""
    db = make_db("locked")
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 1000) AS i", db)
    service = Service(workdir, None, [pg.target("erp", db, user="backup", password=SECRET_PASSWORD)])
    # Hold a lock so pg_dump waits while we look at the process table.
    locker = subprocess.Popen([str(pg_restore().parent / "psql"), "-h", pg.host, "-p", str(pg.port), "-U", "postgres",
                               "-d", db, "-c", "BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);"],
                              stdout=subprocess.DEVNULL)
    try:
        import time

        time.sleep(0.5)
        proc = subprocess.Popen([str(service.env()["PATH"].split(":")[0] + "/pgbeat"), "backup", "daily"],
                                cwd=service.cwd, env=service.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        from tests.support import pg_dump_processes, wait_for

        [dump] = wait_for(lambda: pg_dump_processes(db), 20, what="pg_dump running")
        cmdline = " ".join(dump.cmdline())
        assert SECRET_PASSWORD not in cmdline
        assert "PGPASSWORD" not in dump.environ()
        passfile = dump.environ()["PGPASSFILE"]
        assert stat.S_IMODE(os.stat(passfile).st_mode) == 0o600
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'BEGIN; LOCK TABLE big%'")
        out, errs = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + errs
        assert not os.path.exists(passfile)
    finally:
        locker.wait(30)


def test_zstd_codec_round_trip_and_standard_tools(workdir, pg, rich_db, make_db):
    service = Service(workdir, None, [pg.target("erp", rich_db, compression={"codec": "zstd", "level": 5})])
    assert service.pgbeat("backup", "daily").returncode == 0
    [backup] = service.backups("daily", ".sql.zst")
    assert subprocess.run(["zstd", "-qt", str(backup)]).returncode == 0
    restored = make_db("restored")
    cmd = f"zstd -qdc {backup} | psql -X -q -v ON_ERROR_STOP=1 -h {pg.host} -p {pg.port} -U postgres -d {restored}"
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True)
    assert pg.dump_text(restored) == pg.dump_text(rich_db)


def test_gzip_output_passes_gzip_t(workdir, pg, rich_db):
    service = Service(workdir, None, [pg.target("erp", rich_db, compression={"level": 1})])
    assert service.pgbeat("backup", "daily").returncode == 0
    [backup] = service.backups()
    assert subprocess.run(["gzip", "-t", str(backup)]).returncode == 0


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "append garbage", "edit the manifest", "no sha256"])
def test_verify_refuses_a_damaged_backup(workdir, pg, rich_db, damage):
    service = Service(workdir, None, [pg.target("erp", rich_db)])
    assert service.pgbeat("backup", "daily").returncode == 0
    [backup] = service.backups()
    data = backup.read_bytes()
    manifest_file = backup.with_name(backup.name + ".manifest.json")
    if damage == "truncate":
        backup.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        backup.write_bytes(data[:500] + bytes([data[500] ^ 0x40]) + data[501:])
    elif damage == "append garbage":
        backup.write_bytes(data + b"garbage")
    elif damage == "edit the manifest":
        manifest = json.loads(manifest_file.read_text())
        manifest["sha256"] = "0" * 64
        manifest_file.write_text(json.dumps(manifest))
    else:
        backup.with_name(backup.name + ".sha256").unlink()
    result = service.pgbeat("verify", str(backup))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "failed verification" in result.stderr or "does not decompress" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_refuses_files_that_are_not_pgbeat_backups(workdir, pg, rich_db):
    service = Service(workdir, None, [pg.target("erp", rich_db)])
    stray = workdir / "stray.sql.gz"
    stray.write_bytes(b"\x1f\x8b not really")
    # A file that is not a backup fails verification; one that is not there is a usage error, not damage.
    for path, code in ((stray, 3), (workdir / "missing.sql.gz", 2)):
        result = service.pgbeat("verify", str(path))
        assert result.returncode == code and str(path) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("codec", "suffix", "tester"), [("gzip", ".sql.gz", "gzip"), ("zstd", ".sql.zst", "zstd")])
def test_streaming_dump_compresses_in_one_pass(workdir, pg, rich_db, make_db, codec, suffix, tester):
    service = Service(workdir, None, [pg.target("erp", rich_db, streaming=True, compression={"codec": codec})])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups("daily", suffix)
    manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
    assert manifest["steps"]["compress"]["passthrough"] is True  # the dump arrived compressed
    assert manifest["raw_size"] > manifest["size"] and manifest["tables"]["erp.invoices"] == 1200
    assert subprocess.run([tester, "-t", str(backup)]).returncode == 0
    restored = make_db("restored")
    cmd = f"{tester} -dc {backup} | psql -X -q -v ON_ERROR_STOP=1 -h {pg.host} -p {pg.port} -U postgres -d {restored}"
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True)
    assert pg.dump_text(restored) == pg.dump_text(rich_db)
    assert service.pgbeat("verify", str(backup)).returncode == 0
    assert not list((service.backup_root / "daily").glob("*.blocks.json"))  # the index stays in the work folder


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_streaming_verify_catches_a_file_changed_after_it_was_written(workdir, pg, rich_db, monkeypatch, codec):
    """The streaming dump checks each block as it writes it; verify must still read the file back and
    refuse one whose bytes are not those checked (here one byte flipped between the two steps)."""
    from pgbeat.errors import VerifyError
    from pgbeat.pipeline.record import StepContext, new_run
    from pgbeat.settings import load_settings
    from pgbeat.steps.compress import compress_step
    from pgbeat.steps.dump import dump_step
    from pgbeat.steps.verify import verify_step

    service = Service(workdir, None, [pg.target("erp", rich_db, streaming=True, compression={"codec": codec})])
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    settings = load_settings(env_file=None)
    ctx = StepContext(settings)
    run = compress_step(ctx, dump_step(ctx, new_run(settings, settings.target("erp"), "daily")))
    assert run.steps.dump.blocks_checked and run.steps.compress.passthrough
    artifact = run.artifact
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(data)
    with pytest.raises(VerifyError) as failure:
        verify_step(ctx, run)
    assert any("SHA-256 mismatch" in line for line in failure.value.details)
    assert not list(service.backup_root.glob("daily/*"))  # nothing reached a final name
