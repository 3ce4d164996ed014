"""A directory archive whose table files pgbeat compresses as pg_dump closes them (pgbeat.steps.tablefiles):
damage of every kind to a stored archive fails `pgbeat verify`, a file changed between dump and verify fails
the verify step, and a dump that fails or is killed midway leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import signal

import pytest

from tests.conftest import unique
from tests.shelf import backups_of, shelf_problems
from tests.support import Service

pytestmark = pytest.mark.integration


@pytest.fixture
def two_tables(make_db, pg):
    db = make_db("dirfmt")
    pg.sql("CREATE TABLE big AS SELECT i, md5(i::text) AS h FROM generate_series(1, 30000) AS i;"
           "CREATE TABLE small AS SELECT i FROM generate_series(1, 7) AS i;"
           "CREATE TABLE empty (i int)", db)
    return db


def dir_service(workdir, pg, db, **extra) -> Service:
    return Service(workdir, None, [pg.target("erp", db, format="directory", jobs=2, **extra)])


def data_file(archive, table_rows: int):
    """The stored data file of the table with `table_rows` rows."""
    for path in sorted(archive.glob("*.dat.gz")):
        if gzip.decompress(path.read_bytes()).count(b"\n") - 3 == table_rows:
            return path
    raise AssertionError(f"no data file with {table_rows} rows in {archive}")


def flip_middle(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(data)


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unterminated(path) -> None:
    # A valid gzip file whose table data stops before pg_dump's closing `\.`: cut short before compression.
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).rsplit(b"\\.", 1)[0]))


DAMAGE = {"flipped byte": flip_middle, "truncated": truncate, "deleted": lambda p: p.unlink(),
          "unterminated": unterminated}


def test_rows_and_files_of_a_directory_archive(workdir, pg, two_tables, make_db):
    service = dir_service(workdir, pg, two_tables)
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [archive] = backups_of(service.backup_root, "erp")
    manifest = json.loads(archive.with_name(archive.name + ".manifest.json").read_text())
    assert manifest["tables"] == {"public.big": 30000, "public.small": 7, "public.empty": 0}
    assert sorted(p.suffix for p in archive.iterdir()) == [".dat", ".gz", ".gz", ".gz"]  # toc.dat + 3 tables
    restored = make_db("restored")
    assert service.pgbeat("restore", str(archive), "--into", restored, "--jobs", "2", "--yes").returncode == 0
    assert pg.dump_text(restored) == pg.dump_text(two_tables)
    assert service.pgbeat("verify", str(archive)).returncode == 0  # on the shelf: every file decompressed


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_to_a_stored_data_file_fails_verify(workdir, pg, two_tables, damage):
    service = dir_service(workdir, pg, two_tables)
    assert service.pgbeat("backup", "daily").returncode == 0
    [archive] = backups_of(service.backup_root, "erp")
    DAMAGE[damage](data_file(archive, 30000))
    verify = service.pgbeat("verify", str(archive))
    assert verify.returncode == 3, verify.stdout + verify.stderr
    assert archive.name in verify.stderr and "Traceback" not in verify.stderr


@pytest.mark.parametrize("damage", ["flipped byte", "unterminated"])
def test_a_data_file_changed_between_dump_and_verify_fails_the_verify_step(workdir, pg, two_tables, monkeypatch,
                                                                         damage):
    """What the dump compressed was checked block by block as it was written; verify must still read each
    file back and refuse one whose bytes are not those checked."""
    from pgbeat.errors import VerifyError
    from pgbeat.pipeline.record import StepContext, new_run
    from pgbeat.settings import load_settings
    from pgbeat.steps.compress import compress_step
    from pgbeat.steps.dump import dump_step
    from pgbeat.steps.verify import verify_step

    service = dir_service(workdir, pg, two_tables)
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    settings = load_settings(env_file=None)
    ctx = StepContext(settings)
    run = compress_step(ctx, dump_step(ctx, new_run(settings, settings.target("erp"), "daily")))
    changed = data_file(run.artifact, 7)
    DAMAGE[damage](changed)
    with pytest.raises(VerifyError) as failure:
        verify_step(ctx, run)
    assert any(changed.name in line and "differ from what was written" in line for line in failure.value.details)
    assert not list(service.backup_root.glob("daily/*"))  # nothing reached a final name


def test_a_dump_killed_while_compressing_leaves_nothing_and_the_next_run_is_whole(workdir, pg, two_tables,
                                                                                 make_db):
    service = dir_service(workdir, pg, two_tables)
    faults = workdir / "faults"
    faults.mkdir()
    killed = service.pgbeat("backup", "daily", PGBEAT_FAULTS="dump.running=kill", PGBEAT_FAULTS_DIR=str(faults))
    assert killed.returncode == -signal.SIGKILL
    assert service.pgbeat("list").returncode == 0  # sweeps what the killed run left
    assert not list((service.backup_root / ".work").iterdir())
    again = service.pgbeat("backup", "daily")
    assert again.returncode == 0, again.stdout
    [archive] = backups_of(service.backup_root, "erp")
    assert shelf_problems(service.backup_root) == []
    restored = make_db("restored")
    assert service.pgbeat("restore", str(archive), "--into", restored, "--yes").returncode == 0
    assert pg.dump_text(restored) == pg.dump_text(two_tables)


def test_a_failing_dump_stops_compressing_and_removes_the_folder(workdir, pg, two_tables):
    # pg_dump fails on a table it may not read, with the compressor already watching its folder.
    reader = unique("dirfmt_reader")
    pg.sql(f"CREATE ROLE {reader} LOGIN PASSWORD 'r-pw'; GRANT SELECT ON big, empty TO {reader}", two_tables)
    service = dir_service(workdir, pg, two_tables, user=reader, password="r-pw")
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 1, result.stdout
    assert "permission denied" in result.stdout
    assert not list((service.backup_root / ".work").iterdir())
    assert not (service.backup_root / "daily").exists() or not list((service.backup_root / "daily").iterdir())
