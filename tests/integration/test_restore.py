"""`pgbeat restore` and restore drills against a real PostgreSQL."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import zlib
from pathlib import Path

import pexpect
import pytest

from tests.conftest import DATA
from tests.support import PG_BIN, VENV_BIN, Service, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def erp(make_db):
    """A database with the rich schema, its service (target `erp`) and a first daily backup."""
    return make_db("erp", DATA / "rich.sql")


def service_for(workdir, pg, db, **target_options) -> Service:
    return Service(workdir, None, [pg.target("erp", db, **target_options)])


def backup(service: Service, tier: str = "daily", suffix: str = ".sql.gz") -> Path:
    before = set(service.backups(tier, suffix))
    result = service.pgbeat("backup", tier)
    assert result.returncode == 0, result.stdout + result.stderr
    [new] = set(service.backups(tier, suffix)) - before
    return new


def tables(pg, db) -> list[str]:
    return pg.sql("SELECT string_agg(table_schema || '.' || table_name, ',' ORDER BY 1) FROM information_schema.tables "
                  "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')", db).split(",")


def leftover_databases(pg) -> list[str]:
    out = pg.sql("SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'pgbeat\\_%'")
    return [d for d in out.split(",") if d]


def test_seed_restore_test(workdir, pg, erp):
    """The seed's own test: back up, create teste_restore, restore: the table is gone; the safety backup
    taken before restoring brings it back."""
    service = service_for(workdir, pg, erp)
    original = backup(service)
    pg.sql("CREATE TABLE teste_restore (id INT); INSERT INTO teste_restore VALUES (1), (2)", erp)

    result = service.pgbeat("restore", str(original), "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "public.teste_restore" not in tables(pg, erp)
    assert pg.sql("SELECT count(*) FROM erp.invoices", erp) == "1200"
    [safety] = sorted(service.backup_root.glob("pre_restore_erp_*.sql.gz"))
    assert (service.backup_root / (safety.name + ".manifest.json")).exists()
    assert service.pgbeat("verify", str(safety)).returncode == 0
    assert str(safety) in result.stdout

    revert = service.pgbeat("restore", str(safety), "--yes")
    assert revert.returncode == 0, revert.stdout + revert.stderr
    assert pg.sql("SELECT count(*) FROM teste_restore", erp) == "2"
    assert leftover_databases(pg) == []
    log = "".join(p.read_text() for p in (service.backup_root / "logs").glob("erp_restore_*.log"))
    assert "Backup de segurança criado" in log and "Restauração concluída" in log
    listing = json.loads(service.pgbeat("list", "--json").stdout)
    assert {b["tier"] for b in listing} >= {"daily", "pre_restore"}


def test_typed_confirmation(workdir, pg, erp):
    service = service_for(workdir, pg, erp)
    original = backup(service)
    pg.sql("CREATE TABLE teste_restore (id INT)", erp)

    no_tty = service.pgbeat("restore", str(original))
    assert no_tty.returncode == 2 and "no terminal" in no_tty.stderr

    child = pexpect.spawn(str(VENV_BIN / "pgbeat"), ["restore", str(original)], cwd=str(service.cwd),
                          env=service.env(), encoding="utf-8", timeout=60)
    child.expect(r"taken \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)")  # the backup's time says its zone
    child.expect("OVERWRITES ALL DATA")
    child.expect("type SIM to confirm")
    child.sendline("nao")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "public.teste_restore" in tables(pg, erp)
    assert not list(service.backup_root.glob("pre_restore_*"))

    child = pexpect.spawn(str(VENV_BIN / "pgbeat"), ["restore", str(original)], cwd=str(service.cwd),
                          env=service.env(), encoding="utf-8", timeout=120)
    child.expect(erp)  # the prompt names the database...
    child.expect("type SIM to confirm")
    child.sendline("SIM")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "public.teste_restore" not in tables(pg, erp)


def test_the_prompt_counts_the_sessions_and_warns_of_another_targets_backup(workdir, pg, erp, make_db):
    other = make_db("crm")
    pg.sql("CREATE TABLE crm_only (id INT)", other)
    service = Service(workdir, None, [pg.target("erp", erp), pg.target("crm", other)],
                      timezone="America/Sao_Paulo")
    assert service.pgbeat("backup", "daily", "--target", "crm").returncode == 0
    [crm_backup] = service.backups()
    sleepers = [subprocess.Popen([str(PG_BIN / "psql"), "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d", erp,
                                  "-c", "SELECT pg_sleep(120)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(2)]
    try:
        wait_for(lambda: pg.sql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{erp}'") == "2", 20)
        child = pexpect.spawn(str(VENV_BIN / "pgbeat"), ["restore", str(crm_backup), "--target", "erp"],
                              cwd=str(service.cwd), env=service.env(), encoding="utf-8", timeout=60,
                              dimensions=(50, 200))
        child.expect(r"taken \d{4}-\d\d-\d\d \d\d:\d\d:\d\d -03\)")  # in pgbeat's zone, and saying which
        child.expect(f"This backup is of target crm \\(database {other}\\), not of erp")
        child.expect(f"2 session\\(s\\) connected to {erp} now will be disconnected")
        child.expect("type SIM to confirm")
        child.sendline("nao")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 2
    finally:
        for sleeper in sleepers:
            sleeper.terminate()
            sleeper.wait(10)
    assert "public.crm_only" not in tables(pg, erp)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "wrong checksum"])
def test_damaged_backup_is_refused_before_anything_changes(workdir, pg, erp, damage):
    service = service_for(workdir, pg, erp)
    original = backup(service)
    pg.sql("CREATE TABLE teste_restore (id INT)", erp)
    data = original.read_bytes()
    if damage == "flip a byte":
        original.write_bytes(data[:300] + bytes([data[300] ^ 1]) + data[301:])
    elif damage == "truncate":
        original.write_bytes(data[:-100])
    else:
        manifest = original.with_name(original.name + ".manifest.json")
        values = json.loads(manifest.read_text())
        values["sha256"] = hashlib.sha256(b"something else").hexdigest()
        manifest.write_text(json.dumps(values))
    before = pg.dump_text(erp)
    result = service.pgbeat("restore", str(original), "--yes")
    assert result.returncode == 3, result.stdout + result.stderr
    assert pg.dump_text(erp) == before
    assert not list(service.backup_root.glob("pre_restore_*")) and leftover_databases(pg) == []


def rewrite_backup(path: Path, sql_text: bytes) -> None:
    """Replace a plain backup's content and update its manifest (sealed again, as pgbeat writes it) and
    .sha256 so it passes integrity checks."""
    from pgbeat.catalog.manifest import Manifest, write_manifest

    compressed = gzip.compress(sql_text)
    path.write_bytes(compressed)
    manifest_file = path.with_name(path.name + ".manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest.update(size=len(compressed), sha256=hashlib.sha256(compressed).hexdigest(),
                    md5=hashlib.md5(compressed).hexdigest(), raw_size=len(sql_text),
                    raw_crc32=f"{zlib.crc32(sql_text):08x}")
    write_manifest(manifest_file, Manifest.model_validate(manifest))
    path.with_name(path.name + ".sha256").write_text(f"{manifest['sha256']}  {path.name}\n")


def test_restore_failing_halfway_leaves_the_database_intact(workdir, pg, erp):
    service = service_for(workdir, pg, erp)
    original = backup(service)
    text = gzip.decompress(original.read_bytes())
    cut = text.index(b"CREATE VIEW")
    rewrite_backup(original, text[:cut] + b"SELECT * FROM no_such_table_here;\n" + text[cut:])
    assert service.pgbeat("verify", str(original)).returncode == 0  # intact as a file; wrong as SQL
    pg.sql("CREATE TABLE teste_restore (id INT)", erp)
    before = pg.dump_text(erp)
    result = service.pgbeat("restore", str(original), "--yes")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no_such_table_here" in result.stderr and "not touched" in result.stderr
    assert pg.dump_text(erp) == before
    assert leftover_databases(pg) == []
    [event] = [e for e in service.events() if e["kind"] == "restore_failed"]
    assert event["target"] == "erp" and any("no_such_table_here" in d for d in event["details"])


def test_restore_with_other_sessions_connected(workdir, pg, erp):
    service = service_for(workdir, pg, erp)
    original = backup(service)
    pg.sql("CREATE TABLE teste_restore (id INT)", erp)
    session = subprocess.Popen([str(PG_BIN / "psql"), "-X", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d",
                                erp, "-c", "SELECT pg_sleep(120)"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pg.sql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{erp}' "
                                "AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()") == "1", 10,
                 what="the other session")
        result = service.pgbeat("restore", str(original), "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "disconnected 1 session(s)" in result.stdout
        session.wait(20)
        assert "terminat" in session.stderr.read()
    finally:
        session.kill()
    assert "public.teste_restore" not in tables(pg, erp)
    assert pg.sql("SELECT datallowconn FROM pg_database WHERE datname = current_database()", erp) == "t"


@pytest.mark.parametrize(("fmt", "suffix"), [("custom", ".dump"), ("directory", ".dir")])
def test_archive_formats_restore_in_parallel(workdir, pg, erp, fmt, suffix):
    service = service_for(workdir, pg, erp, format=fmt)
    expected = pg.dump_text(erp)
    original = backup(service, "weekly", suffix)
    pg.sql("DELETE FROM erp.invoices WHERE id > 100; CREATE TABLE teste_restore (id INT)", erp)
    result = service.pgbeat("restore", str(original), "--yes", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pg.dump_text(erp) == expected


def test_into_another_database_leaves_the_source_alone(workdir, pg, erp):
    service = service_for(workdir, pg, erp)
    original = backup(service)
    pg.sql("CREATE TABLE teste_restore (id INT)", erp)
    source_before = pg.dump_text(erp)
    copy = f"{erp}_copy"
    try:
        result = service.pgbeat("restore", str(original), "--into", copy)  # a new database: nothing to confirm
        assert result.returncode == 0, result.stdout + result.stderr
        assert pg.dump_text(erp) == source_before
        assert "public.teste_restore" not in tables(pg, copy)
        assert pg.sql("SELECT count(*) FROM erp.customers", copy) == "300"
    finally:
        pg.dropdb(copy)


def test_database_properties_survive_the_swap(workdir, pg, erp):
    pg.sql(f'ALTER DATABASE "{erp}" OWNER TO backup')
    pg.sql(f"ALTER DATABASE \"{erp}\" SET work_mem = '12MB'")
    pg.sql(f"ALTER DATABASE \"{erp}\" SET search_path = erp, public")
    pg.sql(f"COMMENT ON DATABASE \"{erp}\" IS 'o banco do ERP'")
    pg.sql(f'REVOKE CONNECT ON DATABASE "{erp}" FROM PUBLIC')
    props = ("SELECT pg_get_userbyid(datdba), (SELECT array_agg(a ORDER BY a::text) FROM unnest(datacl) a)::text, "
             "shobj_description(oid, 'pg_database'), "
             "(SELECT setconfig::text FROM pg_db_role_setting WHERE setdatabase = d.oid AND setrole = 0) "
             f"FROM pg_database d WHERE datname = '{erp}'")
    before = pg.sql(props)
    service = service_for(workdir, pg, erp)
    assert service.pgbeat("restore", str(backup(service)), "--yes").returncode == 0
    assert pg.sql(props) == before


def test_bad_input_is_refused_clearly(workdir, pg, erp):
    service = service_for(workdir, pg, erp)
    stray = workdir / "stray.sql.gz"
    stray.write_bytes(gzip.compress(b"SELECT 1;"))
    cases = [([str(workdir / "missing.sql.gz")], 2, "no such file"), ([str(stray)], 3, "not a pgbeat backup"),
             (["--latest", "--target", "nope"], 2, "Unknown target 'nope'"), (["--latest"], 1, "No verified backup")]
    for args, code, text in cases:
        result = service.pgbeat("restore", *args, "--yes")
        assert result.returncode == code and text in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_list_shows_what_a_backup_holds(workdir, pg, erp):
    service = service_for(workdir, pg, erp)
    original = backup(service)
    result = service.pgbeat("restore", str(original), "--list")
    assert result.returncode == 0
    assert "erp.invoices" in result.stdout and "1,200" in result.stdout and "15." in result.stdout


def test_drills_pass_fail_notify_and_show_in_list(workdir, pg, make_db):
    db = make_db("drilled")
    pg.sql("CREATE TABLE invoices AS SELECT generate_series(1, 20) AS id", db)
    service = Service(workdir, None, [pg.target("erp", db, drill={"assertions": ["SELECT count(*) > 0 FROM invoices",
                                                                                 "SELECT true"]})])
    good = backup(service)
    passed = service.pgbeat("drill")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "drill passed" in passed.stdout and "assertion holds: SELECT count(*) > 0 FROM invoices" in passed.stdout
    manifest = json.loads(good.with_name(good.name + ".manifest.json").read_text())
    [record] = manifest["drills"]
    assert record["status"] == "passed" and record["restore_s"] > 0 and record["duration_s"] >= record["restore_s"]

    pg.sql("DELETE FROM invoices", db)  # a backup of an emptied table
    emptied = backup(service, "weekly")
    failed = service.pgbeat("drill", "--target", "erp")
    assert failed.returncode == 1
    assert "assertion does not hold: SELECT count(*) > 0 FROM invoices" in failed.stdout
    [event] = [e for e in service.events() if e["kind"] == "drill_failed"]
    assert event["target"] == "erp" and event["file"].endswith(emptied.name)
    assert any("SELECT count(*) > 0 FROM invoices" in d for d in event["details"])
    assert leftover_databases(pg) == []

    listing = service.pgbeat("list", "--wide").stdout
    good_row = next(line for line in listing.splitlines() if good.name in line)
    bad_row = next(line for line in listing.splitlines() if emptied.name in line)
    assert "passed" in good_row and "failed" in bad_row
