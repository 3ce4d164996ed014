"""Continuous WAL archiving: `pgbeat wal-push` as a real PostgreSQL's archive_command, run by the server as
the postgres user from a venv of Debian's own Python; `pgbeat wal-fetch`'s exit codes as restore_command
reads them; `pgbeat check`; pushes that are repeated, conflicting, killed, or meet a destination that is
down; encryption. What wal-push imports: tests/integration/test_startup_imports.py.

The cluster tests run pgbeat as the server runs it: the postgres user, through the venv built by the
`postgres_venv` fixture (Debian's /usr/bin/python3, which postgres can read, with this tree's packages).
The other tests push WAL-named files of their own with the test venv's pgbeat, which is the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from pgbeat.wal.archive import EXIT_FETCH_FAILED, EXIT_MISSING, STORED_NAME
from tests.shelf import make_age_key
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import PG_BIN, VENV_BIN, PgCluster, free_port, make_tempdir, postgres_user_pgbeat, wait_for

pytestmark = pytest.mark.integration

SEGMENT = "000000010000000000000003"
OTHER_SEGMENT = "000000010000000000000004"


def postgres_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def chown_postgres(path: Path) -> None:
    uid, gid = postgres_ids()
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(Path(root) / name, uid, gid)
    os.chown(path, uid, gid)


# --- a world: targets file, BACKUP_ROOT, WAL files -----------------------------------------------------


class WalWorld:
    """A targets file and a BACKUP_ROOT for WAL tests; `pgbeat(...)` runs the CLI with them."""

    def __init__(self, base: Path, targets: list[dict]) -> None:
        self.base = self.cwd = base
        self.backup_root = base / "backups"
        self.backup_root.mkdir(parents=True, exist_ok=True)
        self.config_path = base / "pgbeat.yaml"
        self.targets = targets
        self.write_config()

    def write_config(self) -> None:
        config = {"backup_root": str(self.backup_root), "timezone": "UTC", "node": "walhost", "targets": self.targets}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config_path.chmod(0o644)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "CELERY_", "PGBEAT_", "AWS_"))}
        env.pop("BACKUP_ROOT", None)
        env.update(PGBEAT_CONFIG=str(self.config_path), **extra)
        return env

    def pgbeat(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "pgbeat"), *args], cwd=self.base, env=self.env(**env),
                              capture_output=True, text=True, timeout=120)

    def archive(self, target: str = "wal") -> Path:
        return self.backup_root / "wal" / target

    def stored(self, wal_name: str, target: str = "wal") -> list[Path]:
        """The final (not hidden) files of `wal_name` in the local archive."""
        return sorted(p for p in self.archive(target).rglob(f"{wal_name}-*") if not p.name.startswith("."))


def wal_file(folder: Path, name: str, content: bytes | None = None) -> Path:
    """A file named like a WAL file in `folder` (a stand-in pg_wal), with `content` or 1 MiB of WAL-like bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if content is not None else (name.encode() + os.urandom(4096)) * 256)
    return path


@pytest.fixture
def world(workdir):
    return WalWorld(workdir, [{"name": "wal", "dbname": "postgres", "host": "127.0.0.1", "port": 5432,
                               "user": "postgres", "compression": {"codec": "zstd"}}])


def fetch(world: WalWorld, wal_name: str, dest: Path, target: str = "wal") -> subprocess.CompletedProcess:
    return world.pgbeat("wal-fetch", wal_name, str(dest), "--target", target)


# --- push: stored once, never overwritten, the same again is fine ------------------------------------


def test_a_pushed_segment_is_stored_compressed_private_and_named_by_its_content(world):
    source = wal_file(world.base / "pg_wal", SEGMENT)
    done = world.pgbeat("wal-push", str(source), "--target", "wal")
    assert done.returncode == 0, done.stderr
    [stored] = world.stored(SEGMENT)
    assert stored.parent.name == SEGMENT[:16]
    match = STORED_NAME.fullmatch(stored.name)
    assert match and match["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest() and match["codec"] == ".zst"
    assert subprocess.run(["zstd", "-dc", str(stored)], capture_output=True, check=True).stdout == source.read_bytes()
    assert stored.stat().st_mode & 0o777 == 0o600
    for folder in (stored.parent, world.archive(), world.backup_root / "wal"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert not [p for p in world.archive().rglob(".*") if p.name != ".lock"], "a staging file was left"

    back = fetch(world, SEGMENT, world.base / "RECOVERYXLOG")
    assert back.returncode == 0, back.stderr
    assert (world.base / "RECOVERYXLOG").read_bytes() == source.read_bytes()


def test_the_same_segment_again_succeeds_and_other_content_fails_naming_it(world):
    source = wal_file(world.base / "pg_wal", SEGMENT)
    assert world.pgbeat("wal-push", str(source), "--target", "wal").returncode == 0
    [stored] = world.stored(SEGMENT)
    before = stored.read_bytes()

    again = world.pgbeat("wal-push", str(source), "--target", "wal")
    assert again.returncode == 0, again.stderr

    wal_file(world.base / "other_pg_wal", SEGMENT)  # another cluster's segment of the same name
    other = world.pgbeat("wal-push", str(world.base / "other_pg_wal" / SEGMENT), "--target", "wal")
    assert other.returncode != 0
    assert SEGMENT in other.stderr and "other content" in other.stderr, other.stderr
    assert world.stored(SEGMENT) == [stored] and stored.read_bytes() == before


def test_a_history_file_is_never_overwritten_and_partial_and_backup_files_are_archived(world):
    pg_wal = world.base / "pg_wal"
    history = wal_file(pg_wal, "00000002.history", b"1\t0/3000000\tno recovery target specified\n")
    partial = wal_file(pg_wal, f"{SEGMENT}.partial")
    backup = wal_file(pg_wal, f"{SEGMENT}.00000028.backup", b"START WAL LOCATION: 0/3000028 (file " +
                      SEGMENT.encode() + b")\nSTOP WAL LOCATION: 0/3000100\nLABEL: base\n")
    for path in (history, partial, backup):
        done = world.pgbeat("wal-push", str(path), "--target", "wal")
        assert done.returncode == 0, done.stderr
        assert len(world.stored(path.name)) == 1, path.name
    assert world.stored("00000002.history")[0].parent.name == "history"
    [kept] = world.stored("00000002.history")

    history.write_bytes(b"1\t0/3000000\tno recovery target specified\n2\t0/5000000\tanother\n")
    refused = world.pgbeat("wal-push", str(history), "--target", "wal")
    assert refused.returncode != 0 and "00000002.history" in refused.stderr
    assert world.stored("00000002.history") == [kept]

    for path in (partial, backup):
        out = world.base / f"fetched-{path.name}"
        assert fetch(world, path.name, out).returncode == 0
        assert out.read_bytes() == path.read_bytes()


def test_a_push_also_archives_the_other_ready_segments_ahead(world):
    pg_wal = world.base / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000000000{n:02X}" for n in range(10, 14)]
    for name in names:
        wal_file(pg_wal, name)
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    done = world.pgbeat("wal-push", str(pg_wal / names[0]), "--target", "wal")
    assert done.returncode == 0, done.stderr
    assert all(len(world.stored(name)) == 1 for name in names)
    # PostgreSQL's own calls for the others find them archived, and say so with exit 0.
    for name in names[1:]:
        again = world.pgbeat("wal-push", str(pg_wal / name), "--target", "wal", "--no-ahead")
        assert again.returncode == 0, again.stderr


def test_a_call_for_a_file_pushed_ahead_is_answered_by_its_acknowledgement_and_only_for_its_bytes(world):
    """The fast path: the files pushed ahead are acknowledged in pg_wal/pgbeat_pushed; PostgreSQL's call for
    one answers 0 from the acknowledgement (no settings loaded: no pydantic imported) and consumes it. An
    acknowledgement for other bytes, for another target, or beside another option is never taken: the full
    path decides (a changed file under an archived name fails, as always)."""
    pg_wal = world.base / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000000000{n:02X}" for n in range(0x20, 0x25)]
    for name in names:
        wal_file(pg_wal, name)
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    stale = pg_wal / "pgbeat_pushed" / "000000010000000000000001"  # of a file no longer ready: swept
    stale.parent.mkdir(mode=0o700)
    stale.write_text("wal\n" + "0" * 64 + "\n")
    done = world.pgbeat("wal-push", str(pg_wal / names[0]), "--target", "wal")
    assert done.returncode == 0, done.stderr
    acks = pg_wal / "pgbeat_pushed"
    assert sorted(p.name for p in acks.iterdir()) == names[1:] and not stale.exists()
    assert stat.S_IMODE(acks.stat().st_mode) == 0o700
    first = acks / names[1]
    assert first.read_text() == f"wal\n{hashlib.sha256((pg_wal / names[1]).read_bytes()).hexdigest()}\n"

    env = {k: v for k, v in world.env().items()}
    fast = subprocess.run([str(VENV_BIN / "python"), "-X", "importtime", str(VENV_BIN / "pgbeat"), "wal-push",
                           str(pg_wal / names[1]), "--target", "wal"], cwd=world.base, env=env,
                          capture_output=True, text=True, timeout=60)
    assert fast.returncode == 0, fast.stderr
    assert "pydantic" not in fast.stderr and "click" not in fast.stderr  # answered before the CLI loads
    assert not first.exists()
    again = world.pgbeat("wal-push", str(pg_wal / names[1]), "--target", "wal")  # no acknowledgement: full path
    assert again.returncode == 0, again.stderr

    # Other bytes under an acknowledged name: the acknowledgement does not answer; the full path refuses.
    wal_file(pg_wal, names[2])
    changed = world.pgbeat("wal-push", str(pg_wal / names[2]), "--target", "wal")
    assert changed.returncode == 1 and "already holds this WAL file with other content" in changed.stderr
    # Another target's call, or another option, never takes an acknowledgement.
    other = world.pgbeat("wal-push", str(pg_wal / names[3]), "--target", "nosuch")
    assert other.returncode == 2 and (acks / names[3]).exists(), other.stderr
    with_option = world.pgbeat("wal-push", "--no-ahead", str(pg_wal / names[3]), "--target", "wal")
    assert with_option.returncode == 0 and (acks / names[3]).exists()
    assert world.pgbeat("wal-push", "--target=wal", str(pg_wal / names[4])).returncode == 0
    assert not (acks / names[4]).exists()


def test_bad_wal_names_are_refused_naming_them(world):
    stray = wal_file(world.base / "pg_wal", "postgresql.conf", b"x")
    done = world.pgbeat("wal-push", str(stray), "--target", "wal")
    assert done.returncode == 2 and "'postgresql.conf' is not the name of a WAL file" in done.stderr
    done = fetch(world, "../../etc/passwd", world.base / "x")
    assert done.returncode == 2 and "WAL file name" in done.stderr
    assert not (world.base / "x").exists()


# --- a push killed on the way ------------------------------------------------------------------------


def test_a_push_killed_before_its_final_name_leaves_none_and_the_next_completes(world):
    source = wal_file(world.base / "pg_wal", SEGMENT)
    killed = world.pgbeat("wal-push", str(source), "--target", "wal", PGBEAT_FAULTS="wal.push-staged=kill")
    assert killed.returncode == -9, killed.stderr
    assert world.stored(SEGMENT) == []  # written under a hidden staging name only
    assert [p for p in world.archive().rglob(f".{SEGMENT}-*")], "the kill came after the staging file was written"
    gone = fetch(world, SEGMENT, world.base / "RECOVERYXLOG")
    assert gone.returncode == EXIT_MISSING, gone.stderr

    [left] = [p for p in world.archive().rglob(f".{SEGMENT}-*")]
    hour_ago = time.time() - 3700
    os.utime(left, (hour_ago, hour_ago))  # what a push killed over an hour ago left: no live push writes it
    done = world.pgbeat("wal-push", str(source), "--target", "wal")
    assert done.returncode == 0, done.stderr
    assert len(world.stored(SEGMENT)) == 1
    assert not left.exists(), "the killed push's staging file was not swept"
    assert fetch(world, SEGMENT, world.base / "RECOVERYXLOG").returncode == 0
    assert (world.base / "RECOVERYXLOG").read_bytes() == source.read_bytes()


# --- fetch's exit codes ------------------------------------------------------------------------------


def test_wal_fetch_says_missing_with_1_and_damaged_above_125(world):
    dest = world.base / "pg_wal" / "RECOVERYXLOG"
    dest.parent.mkdir()
    missing = fetch(world, OTHER_SEGMENT, dest)
    assert missing.returncode == EXIT_MISSING and OTHER_SEGMENT in missing.stderr, missing.stderr
    missing_history = fetch(world, "00000005.history", dest)
    assert missing_history.returncode == EXIT_MISSING

    source = wal_file(world.base / "src", SEGMENT)
    assert world.pgbeat("wal-push", str(source), "--target", "wal").returncode == 0
    [stored] = world.stored(SEGMENT)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    damaged = fetch(world, SEGMENT, dest)
    assert damaged.returncode == EXIT_FETCH_FAILED > 125, damaged.stderr
    assert SEGMENT in damaged.stderr
    assert not dest.exists() and list(dest.parent.iterdir()) == [], "nothing half-written beside DEST"

    truncated = stored.read_bytes()[:100]
    stored.write_bytes(truncated)
    assert fetch(world, SEGMENT, dest).returncode == EXIT_FETCH_FAILED


def test_an_unusable_configuration_makes_wal_fetch_stop_recovery_not_end_it(world):
    world.config_path.write_text("targets: [")
    done = fetch(world, SEGMENT, world.base / "RECOVERYXLOG")
    assert done.returncode == EXIT_FETCH_FAILED, done.stderr


# --- encryption --------------------------------------------------------------------------------------


def test_an_encrypted_target_stores_age_files_and_fetches_them_back(world):
    identity, recipient = make_age_key(world.base)
    world.targets[0]["encryption"] = {"recipients": [recipient], "identity_file": str(identity)}
    world.write_config()
    source = wal_file(world.base / "pg_wal", SEGMENT)
    assert world.pgbeat("wal-push", str(source), "--target", "wal").returncode == 0
    [stored] = world.stored(SEGMENT)
    assert stored.name.endswith(".zst.age")
    assert stored.read_bytes().startswith(b"age-encryption.org/v1")
    plain = subprocess.run(["age", "-d", "-i", str(identity), str(stored)], capture_output=True, check=True).stdout
    assert subprocess.run(["zstd", "-dc"], input=plain, capture_output=True, check=True).stdout == source.read_bytes()

    assert fetch(world, SEGMENT, world.base / "RECOVERYXLOG").returncode == 0
    assert (world.base / "RECOVERYXLOG").read_bytes() == source.read_bytes()

    other, _ = make_age_key(world.base)
    world.targets[0]["encryption"]["identity_file"] = str(other)
    world.write_config()
    wrong = fetch(world, SEGMENT, world.base / "RECOVERYXLOG2")
    assert wrong.returncode == EXIT_FETCH_FAILED and "decrypt" in wrong.stderr, wrong.stderr


# --- destinations ------------------------------------------------------------------------------------


def s3_destination(url: str, bucket: str) -> dict:
    return {"name": "offsite", "kind": "s3", "bucket": bucket, "prefix": "pg", "endpoint_url": url,
            "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET, "retries": 1}


def s3_keys(moto_s3, bucket: str) -> list[str]:
    listing = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="pg/wal/")
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def test_a_destination_that_is_down_fails_the_push_and_nothing_is_lost_when_it_is_back(world, moto_s3):
    bucket = moto_s3.new_bucket()
    world.targets[0]["destinations"] = [s3_destination(f"http://127.0.0.1:{free_port()}", bucket)]
    world.write_config()
    source = wal_file(world.base / "pg_wal", SEGMENT)
    down = world.pgbeat("wal-push", str(source), "--target", "wal")
    assert down.returncode != 0 and "offsite" in down.stderr, down.stderr
    assert S3_SECRET not in down.stderr
    [stored] = world.stored(SEGMENT)  # kept locally, fsync'ed, for the retry

    world.targets[0]["destinations"] = [s3_destination(moto_s3.url, bucket)]  # the destination is back
    world.write_config()
    back = world.pgbeat("wal-push", str(source), "--target", "wal")
    assert back.returncode == 0, back.stderr
    key = f"pg/wal/wal/{SEGMENT[:16]}/{stored.name}"
    assert s3_keys(moto_s3, bucket) == [key]
    assert moto_s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == stored.read_bytes()

    # A damaged local copy is passed over for the destination's good one; so is a local archive without it.
    stored.write_bytes(stored.read_bytes()[:1000])
    dest = world.base / "RECOVERYXLOG"
    assert fetch(world, SEGMENT, dest).returncode == 0
    assert dest.read_bytes() == source.read_bytes()
    shutil.rmtree(world.archive())
    dest.unlink()
    assert fetch(world, SEGMENT, dest).returncode == 0
    assert dest.read_bytes() == source.read_bytes()
    assert fetch(world, OTHER_SEGMENT, dest).returncode == EXIT_MISSING
    moto_s3.client().put_object(Bucket=bucket, Key=key, Body=b"not a zstd frame")
    assert fetch(world, SEGMENT, world.base / "again").returncode == EXIT_FETCH_FAILED

    world.targets[0]["destinations"] = [s3_destination(f"http://127.0.0.1:{free_port()}", bucket)]
    world.write_config()
    unreachable = fetch(world, OTHER_SEGMENT, dest)
    assert unreachable.returncode == EXIT_FETCH_FAILED, unreachable.stderr  # it might be there: never "missing"


def test_a_push_killed_before_the_destination_copy_is_completed_by_the_next(world, moto_s3):
    bucket = moto_s3.new_bucket()
    world.targets[0]["destinations"] = [s3_destination(moto_s3.url, bucket)]
    world.write_config()
    source = wal_file(world.base / "pg_wal", SEGMENT)
    killed = world.pgbeat("wal-push", str(source), "--target", "wal", PGBEAT_FAULTS="wal.push-local=kill")
    assert killed.returncode == -9
    assert len(world.stored(SEGMENT)) == 1 and s3_keys(moto_s3, bucket) == []
    assert world.pgbeat("wal-push", str(source), "--target", "wal").returncode == 0
    assert len(s3_keys(moto_s3, bucket)) == 1

    # PostgreSQL's next call for it (after a push-ahead, say) takes the fast path: no destination contacted.
    world.targets[0]["destinations"] = [s3_destination(f"http://127.0.0.1:{free_port()}", bucket)]
    world.write_config()
    assert world.pgbeat("wal-push", str(source), "--target", "wal").returncode == 0
    world.targets[0]["destinations"] = [s3_destination(moto_s3.url, bucket)]
    world.write_config()

    # Another cluster's segment of the same name at the destination only: refused there, loudly.
    other = wal_file(world.base / "other", OTHER_SEGMENT)
    sha = hashlib.sha256(b"another cluster").hexdigest()
    moto_s3.client().put_object(Bucket=bucket, Key=f"pg/wal/wal/{OTHER_SEGMENT[:16]}/{OTHER_SEGMENT}-{sha}.zst",
                                Body=b"x")
    refused = world.pgbeat("wal-push", str(other), "--target", "wal")
    assert refused.returncode != 0 and OTHER_SEGMENT in refused.stderr and "offsite" in refused.stderr


# --- a real cluster, as the postgres user ------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_venv():
    base = make_tempdir("pgbeat-walvenv-")
    yield postgres_user_pgbeat(base)
    shutil.rmtree(base, ignore_errors=True)


class ArchivingCluster:
    """A throwaway cluster started as postgres with archive_mode on and archive_command = pgbeat wal-push."""

    def __init__(self, base: Path, pgbeat: Path) -> None:
        self.base = base
        self.pgbeat_script = pgbeat
        self.cluster = PgCluster(base, "walpg")
        self.world = WalWorld(base / "cfg", [])
        self.world.base.chmod(0o755)
        self.world.targets.append({"name": "walpg", "dbname": "postgres", "host": "127.0.0.1",
                                   "port": self.cluster.port, "user": "postgres"})
        self.world.write_config()
        (self.world.backup_root / "wal").mkdir()
        chown_postgres(self.world.backup_root / "wal")  # as the README asks: BACKUP_ROOT/wal is postgres's
        with open(self.cluster.data / "postgresql.conf", "a") as f:
            f.write(f"\narchive_mode = on\narchive_command = '{self.archive_command('walpg')}'\n")
        with open(self.cluster.data / "pg_hba.conf", "a") as f:
            f.write("host replication postgres 127.0.0.1/32 trust\n")  # pg_basebackup
        self.cluster.stop()
        self.cluster.start()

    def archive_command(self, target: str) -> str:
        return f"PGBEAT_CONFIG={self.world.config_path} {self.pgbeat_script} wal-push %p --target {target}"

    def as_postgres(self, *args: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "PGBEAT_CONFIG": str(self.world.config_path), "LANG": "C.UTF-8"}
        return subprocess.run(["runuser", "-u", "postgres", "--", "env", *(f"{k}={v}" for k, v in env.items()),
                               str(self.pgbeat_script), *args], capture_output=True, text=True, cwd="/",
                              timeout=120)

    def archived_count(self) -> int:
        return int(self.cluster.sql("SELECT archived_count FROM pg_stat_archiver"))

    def destroy(self) -> None:
        self.cluster.destroy()


@pytest.fixture(scope="module")
def archiving(postgres_venv):
    base = make_tempdir("pgbeat-walpg-")
    cluster = ArchivingCluster(base, postgres_venv)
    yield cluster
    cluster.destroy()
    shutil.rmtree(base, ignore_errors=True)


def test_a_real_archive_command_archives_segments_and_wal_fetch_brings_them_back(archiving):
    pg = archiving.cluster
    before = archiving.archived_count()
    pg.sql("CREATE TABLE IF NOT EXISTS filler (id int, v text)")
    pg.sql("INSERT INTO filler SELECT i, md5(i::text) FROM generate_series(1, 20000) i")
    segment = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
    wait_for(lambda: archiving.archived_count() > before, 60, what="archive_command to archive a segment")
    assert pg.sql("SELECT failed_count FROM pg_stat_archiver") == "0"
    [stored] = archiving.world.stored(segment, "walpg")
    uid, _ = postgres_ids()
    assert stored.stat().st_uid == uid and stored.stat().st_mode & 0o777 == 0o600
    assert stored.name.endswith(".gz")  # the target's codec: gzip by default

    dest = archiving.base / "restore-pg_wal"
    dest.mkdir(exist_ok=True)
    chown_postgres(dest)
    fetched = archiving.as_postgres("wal-fetch", segment, str(dest / "RECOVERYXLOG"), "--target", "walpg")
    assert fetched.returncode == 0, fetched.stderr
    raw = (dest / "RECOVERYXLOG").read_bytes()
    assert len(raw) == 16 << 20 and hashlib.sha256(raw).hexdigest() == STORED_NAME.fullmatch(stored.name)["sha256"]
    live = pg.data / "pg_wal" / segment
    if live.exists():  # not recycled yet: byte for byte the server's own segment
        assert raw == live.read_bytes()


def test_check_reports_ok_when_archiving_works(archiving):
    done = archiving.world.pgbeat("check", "--target", "walpg", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK walpg: ") and "archived (local)" in done.stdout


def test_check_says_why_when_archive_command_fails(archiving):
    pg = archiving.cluster
    pg.sql(f"ALTER SYSTEM SET archive_command = '{archiving.archive_command('nosuchtarget')}'")
    pg.sql("SELECT pg_reload_conf()")
    try:
        done = archiving.world.pgbeat("check", "--target", "walpg", "--timeout", "60")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "archive_command is failing" in done.stderr and "failed at" in done.stderr, done.stderr
    finally:
        pg.sql("ALTER SYSTEM RESET archive_command")
        pg.sql("SELECT pg_reload_conf()")
    # Once archive_command works again, the segments it failed on are archived: nothing was lost.
    wait_for(lambda: archiving.world.pgbeat("check", "--target", "walpg", "--timeout", "30").returncode == 0, 90,
             interval=1, what="archiving to recover")


def test_check_says_so_when_archiving_is_off(pg, workdir):
    world = WalWorld(workdir, [{"name": "plain", "dbname": "postgres", "host": pg.host, "port": pg.port,
                                "user": "postgres"}])
    done = world.pgbeat("check", "--target", "plain", "--timeout", "5")
    assert done.returncode == 1 and "archive_mode is off" in done.stderr, done.stderr



def test_a_base_backup_without_wal_recovers_through_wal_fetch_to_the_end_of_the_archive(archiving):
    """restore_command = wal-fetch, with a real PostgreSQL reading its exit codes: every segment since the
    base backup comes from the archive, and exit 1 for the first file the archive lacks ends recovery."""
    pg = archiving.cluster
    pg.sql("DROP TABLE IF EXISTS pitr; CREATE TABLE pitr (id int)")
    pg.sql("INSERT INTO pitr SELECT generate_series(1, 100)")
    replica = archiving.base / "replica"
    replica.mkdir()
    chown_postgres(replica)
    data = replica / "data"
    made = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_basebackup"), "-h", pg.host, "-p",
                           str(pg.port), "-U", "postgres", "-D", str(data), "-X", "none", "--no-sync"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    pg.sql("INSERT INTO pitr SELECT generate_series(101, 250)")
    last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
    wait_for(lambda: archiving.world.stored(last, "walpg"), 60, what=f"{last} in the archive")
    assert not list((data / "pg_wal").glob("0*")), "the base backup holds no WAL: all of it must come from the archive"

    port = free_port()
    fetch_command = (f"PGBEAT_CONFIG={archiving.world.config_path} {archiving.pgbeat_script} wal-fetch %f %p "
                     "--target walpg")
    with open(data / "postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{replica}'\narchive_mode = off\n"
                f"restore_command = '{fetch_command}'\n")
    (data / "recovery.signal").touch()
    chown_postgres(replica)
    log = replica / "server.log"
    started = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-l",
                              str(log), "-w", "-t", "120", "start"], capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")

        def sql(query: str) -> str:
            return subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                                   "postgres", "-d", "postgres", "-c", query], capture_output=True, text=True,
                                  check=True).stdout.strip()

        # pg_ctl returns once hot standby accepts reads; recovery ends when wal-fetch says "missing" (exit 1).
        wait_for(lambda: sql("SELECT pg_is_in_recovery()") == "f", 120, 0.2, what="the end of recovery")
        assert sql("SELECT count(*) FROM pitr") == "250", log.read_text()[-4000:]
        server_log = log.read_text()
        assert f'restored log file "{last}" from archive' in server_log, server_log[-3000:]
        assert "archive recovery complete" in server_log
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "-w", "stop"], capture_output=True)


def test_an_archive_folder_the_postgres_user_cannot_write_is_named(archiving):
    world = archiving.world
    world.targets.append({**world.targets[0], "name": "locked"})
    world.write_config()
    try:
        (world.backup_root / "wal" / "locked").mkdir(mode=0o700)  # root's: postgres may not enter it
        segment = wal_file(archiving.base / "locked_pg_wal", SEGMENT)
        (archiving.base / "locked_pg_wal").chmod(0o755)
        segment.chmod(0o644)
        done = archiving.as_postgres("wal-push", str(segment), "--target", "locked")
        assert done.returncode == 1, done.stderr
        assert "Permission denied" in done.stderr and str(world.backup_root / "wal" / "locked") in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        world.targets.pop()
        world.write_config()


def test_a_segment_fetched_from_a_destination_brings_the_following_ones_into_the_local_archive(world, moto_s3):
    bucket = moto_s3.new_bucket()
    world.targets[0]["destinations"] = [s3_destination(moto_s3.url, bucket)]
    world.targets[0]["wal"] = {"prefetch": 2}
    world.write_config()
    names = ["0000000100000000000000FE", "0000000100000000000000FF", "000000010000000100000000",
             "000000010000000100000001"]  # across a log boundary
    sources = {name: wal_file(world.base / "pg_wal", name) for name in names}
    for name in names:
        assert world.pgbeat("wal-push", str(sources[name]), "--target", "wal", "--no-ahead").returncode == 0
    shutil.rmtree(world.archive())  # a restore host: the destination has it all, the local archive nothing

    dest = world.base / "RECOVERYXLOG"
    assert fetch(world, names[0], dest).returncode == 0
    assert [bool(world.stored(name)) for name in names] == [False, True, True, False]  # the next two, as stored
    world.targets[0]["destinations"] = [s3_destination(f"http://127.0.0.1:{free_port()}", bucket)]
    world.write_config()
    for name in names[1:3]:  # PostgreSQL's next calls: from the local archive, the destination not needed
        done = fetch(world, name, dest)
        assert done.returncode == 0, done.stderr
        assert dest.read_bytes() == sources[name].read_bytes()


def test_check_on_a_host_without_the_local_archive_looks_at_the_destinations(archiving, moto_s3, workdir):
    world = archiving.world
    bucket = moto_s3.new_bucket()
    world.targets[0]["destinations"] = [s3_destination(moto_s3.url, bucket)]
    world.write_config()  # archive_command reads it on its next call
    try:
        elsewhere = WalWorld(workdir, [dict(world.targets[0])])  # another host: same target, no local archive
        done = elsewhere.pgbeat("check", "--target", "walpg", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert "archived (offsite)" in done.stdout, done.stdout
        assert not (elsewhere.backup_root / "wal").exists()
    finally:
        del world.targets[0]["destinations"]
        world.write_config()


def test_restore_pitr_recovers_a_base_backup_to_a_moment_through_this_archive(archiving, workdir):
    """The whole path: `pgbeat backup base`, WAL archived by wal-push as the server's archive_command, then
    `pgbeat restore --pitr --to TIME --start` whose restore_command is wal-fetch: the rows of that moment."""
    pg, world = archiving.cluster, archiving.world
    world.targets[0]["tiers"] = {"base": {"enabled": True}}
    world.write_config()
    try:
        pg.sql("DROP TABLE IF EXISTS moments; CREATE TABLE moments (id int, at timestamptz DEFAULT now())")
        based = world.pgbeat("backup", "base", "--target", "walpg")
        assert based.returncode == 0, based.stdout + based.stderr
        pg.sql("INSERT INTO moments (id) SELECT generate_series(1, 10)")
        moment = pg.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
        time.sleep(1.5)
        pg.sql("INSERT INTO moments (id) SELECT generate_series(11, 30)")
        last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
        wait_for(lambda: archiving.world.stored(last, "walpg"), 60, what=f"{last} in the archive")

        data = make_tempdir("pgbeat-pitr-") / "data"
        port = free_port()
        restored = world.pgbeat("restore", "--pitr", "--target", "walpg", "--to", moment, "--data-dir", str(data),
                                "--start", "--port", str(port), "--server-pgbeat", str(archiving.pgbeat_script),
                                "--timeout", "120")
        assert restored.returncode == 0, restored.stdout + restored.stderr

        def sql(query: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                                   "postgres", "-d", "postgres", "-c", query], capture_output=True, text=True)

        # --start returns once the server is promoted (not while it still recovers: it read pg_control's
        # "in production", which the base backup copied from the running primary, before 5fba2b4).
        assert sql("SELECT pg_is_in_recovery()").stdout.strip() == "f", restored.stdout
        count = sql("SELECT count(*) FROM moments")
        assert count.stdout.strip() == "10", count.stdout + count.stderr + restored.stdout
    finally:
        world.targets[0].pop("tiers", None)
        world.write_config()
        if "data" in locals() and data.exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True)
            shutil.rmtree(data.parent, ignore_errors=True)


def test_check_names_the_grants_a_user_without_the_right_to_switch_the_wal_needs(archiving, workdir):
    from tests.support import SECRET_PASSWORD

    pg, world = archiving.cluster, archiving.world
    pg.sql("DROP OWNED BY walcheck CASCADE; DROP ROLE walcheck", check=False)
    pg.sql(f"CREATE ROLE walcheck LOGIN PASSWORD '{SECRET_PASSWORD}'")
    kept = dict(world.targets[0])
    world.targets[0].update(user="walcheck", password=SECRET_PASSWORD)
    world.write_config()
    try:
        done = world.pgbeat("check", "--target", "walpg", "--timeout", "10")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "walcheck may not switch the WAL" in done.stderr, done.stderr
        assert "GRANT EXECUTE ON FUNCTION pg_switch_wal()" in done.stderr
        assert SECRET_PASSWORD not in done.stdout + done.stderr
        pg.sql("GRANT EXECUTE ON FUNCTION pg_switch_wal(), pg_create_restore_point(text) TO walcheck")
        granted = world.pgbeat("check", "--target", "walpg", "--timeout", "60")
        assert granted.returncode == 0, granted.stderr
        assert "archived (local)" in granted.stdout

        # Checked from a host whose BACKUP_ROOT is not where archive_command writes: said so, not a timeout.
        elsewhere = WalWorld(workdir, [dict(world.targets[0])])
        lost = elsewhere.pgbeat("check", "--target", "walpg", "--timeout", "60")
        assert lost.returncode == 1 and "but it is not in this host's archive" in lost.stderr, lost.stderr
    finally:
        world.targets[0] = kept
        world.write_config()


# --- every recovery target restore --pitr offers --------------------------------------------------------


@pytest.fixture(scope="module")
def pitr_history(archiving):
    """A base backup, then 10 rows (with the time, LSN, transaction id and a restore point right after
    them), then 20 more; all of it archived. Yields what each recovery target names."""
    pg, world = archiving.cluster, archiving.world
    world.targets[0]["tiers"] = {"base": {"enabled": True}}
    world.write_config()
    pg.sql("DROP TABLE IF EXISTS history; CREATE TABLE history (id int)")
    based = world.pgbeat("backup", "base", "--target", "walpg")
    assert based.returncode == 0, based.stdout + based.stderr
    xid = pg.sql("WITH ten AS (INSERT INTO history SELECT generate_series(1, 10) RETURNING id) "
                 "SELECT txid_current() FROM ten LIMIT 1")
    lsn = pg.sql("SELECT pg_current_wal_insert_lsn()")
    pg.sql("SELECT pg_create_restore_point('after_ten')")
    moment = pg.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
    time.sleep(1.2)
    pg.sql("INSERT INTO history SELECT generate_series(11, 30)")
    last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
    wait_for(lambda: world.stored(last, "walpg"), 60, what=f"{last} in the archive")
    yield {"--to": moment, "--to-lsn": lsn, "--to-xid": xid.strip(), "--to-name": "after_ten"}
    world.targets[0].pop("tiers", None)
    world.write_config()


class Restored:
    """A cluster restored by `pgbeat restore --pitr ... --start`, on a port of its own."""

    def __init__(self, archiving, *args: str) -> None:
        self.data = make_tempdir("pgbeat-pitr-") / "data"
        self.port = free_port()
        self.result = archiving.world.pgbeat("restore", "--pitr", "--target", "walpg", "--data-dir", str(self.data),
                                             "--start", "--port", str(self.port), "--server-pgbeat",
                                             str(archiving.pgbeat_script), "--timeout", "120", *args)

    def sql(self, query: str) -> str:
        out = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                              "postgres", "-d", "postgres", "-c", query], capture_output=True, text=True)
        return out.stdout.strip() or out.stderr.strip()

    def destroy(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m",
                        "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.data.parent, ignore_errors=True)


@pytest.mark.parametrize(("option", "rows"), [("--to", 10), ("--to-lsn", 10), ("--to-xid", 10), ("--to-name", 10),
                                              ("latest", 30), ("immediate", 0)])
def test_restore_pitr_reaches_each_kind_of_recovery_target(archiving, pitr_history, option, rows):
    args = ("--to", option) if option in ("latest", "immediate") else (option, pitr_history[option])
    restored = Restored(archiving, *args)
    try:
        assert restored.result.returncode == 0, restored.result.stdout + restored.result.stderr
        assert "Recovered and promoted" in restored.result.stdout, restored.result.stdout
        assert restored.sql("SELECT pg_is_in_recovery()") == "f"  # promoted when the command returned
        assert restored.sql("SELECT count(*) FROM history") == str(rows)
        assert (restored.data / "recovery.signal").exists() is False
        conf = (restored.data / "postgresql.auto.conf").read_text()
        assert "archive_mode = 'off'" in conf and "wal-fetch %f %p --target walpg" in conf
    finally:
        restored.destroy()


def test_restore_pitr_refuses_a_moment_before_the_oldest_base_backup_naming_the_window(archiving, pitr_history):
    restored = Restored(archiving, "--to", "2001-01-01 00:00:00")
    assert restored.result.returncode == 2, restored.result.stdout + restored.result.stderr
    assert "before the restorable window" in restored.result.stderr
    assert "the earliest restorable point is" in restored.result.stderr
    assert not restored.data.exists() or not any(restored.data.iterdir())
    shutil.rmtree(restored.data.parent, ignore_errors=True)


def test_restore_pitr_never_writes_into_a_folder_that_holds_anything(archiving, pitr_history):
    data = make_tempdir("pgbeat-pitr-used-")
    (data / "PG_VERSION").write_text("15\n")
    done = archiving.world.pgbeat("restore", "--pitr", "--target", "walpg", "--data-dir", str(data))
    assert done.returncode == 2 and "not an empty folder" in done.stderr, done.stdout + done.stderr
    assert [p.name for p in data.iterdir()] == ["PG_VERSION"]
    shutil.rmtree(data, ignore_errors=True)


def test_restore_pitr_standby_streams_from_the_primary(archiving, pitr_history):
    pg = archiving.cluster
    restored = Restored(archiving, "--standby", "--primary-conninfo",
                        f"host=127.0.0.1 port={pg.port} user=postgres application_name=pgbeat_standby")
    try:
        assert restored.result.returncode == 0, restored.result.stdout + restored.result.stderr
        assert "Standby running" in restored.result.stdout
        wait_for(lambda: pg.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = "
                                "'pgbeat_standby'") == "1", 60, what="the standby to stream from the primary")
        assert restored.sql("SELECT pg_is_in_recovery()") == "t"
        pg.sql("INSERT INTO history SELECT generate_series(31, 35)")
        wait_for(lambda: restored.sql("SELECT count(*) FROM history") == pg.sql("SELECT count(*) FROM history"),
                 30, what="a new row to reach the standby")
    finally:
        restored.destroy()


def two_base_backups(pg: PgCluster, world: WalWorld, archived) -> tuple[Path, Path, str]:
    """Two base backups of `world`'s target with WAL segments before, between and after them, each switched
    segment waited for until `archived(name)`; return both backups, oldest first, and the newer's start segment."""
    pg.sql("CREATE TABLE kept (id int)")

    def switch() -> None:
        pg.sql("INSERT INTO kept SELECT generate_series(1, 1000)")
        last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
        wait_for(lambda: archived(last), 60, what=f"{last} archived")

    for _ in range(2):
        switch()
    for _ in range(2):
        assert world.pgbeat("backup", "base", "--target", "walpg").returncode == 0
        switch()
    first, second = sorted(p for p in world.backup_root.glob("base/*") if p.name.endswith((".tar.gz", ".tar")))
    manifest = json.loads(second.with_name(second.name + ".manifest.json").read_text())
    return first, second, manifest["physical"]["start_wal"]


def test_rotating_base_backups_removes_exactly_the_wal_no_kept_one_needs(postgres_venv, workdir):
    """Two base backups with WAL between and after them; rotating the base tier 40 days later keeps the
    newest (min_keep) and removes the older with every WAL file before the kept one's start segment, no
    other; a dry run removes nothing; the kept base backup still recovers to the end of the archive."""
    base = make_tempdir("pgbeat-walret-")
    archiving = ArchivingCluster(base, postgres_venv)
    pg, world = archiving.cluster, archiving.world
    world.targets[0]["tiers"] = {"base": {"enabled": True, "keep_days": 30, "min_keep": 1}}
    world.write_config()
    data = None
    try:
        first, second, start = two_base_backups(pg, world, lambda last: world.stored(last, "walpg"))
        archive = world.archive("walpg")

        def stored_wal() -> list[str]:
            return sorted(p.name.split("-", 1)[0] for p in archive.rglob("*-*") if not p.name.startswith("."))

        before = stored_wal()
        doomed = [n for n in before if not n.endswith(".history") and n[8:24] < start[8:24]]
        assert doomed and any(n[8:24] >= start[8:24] for n in before)
        later = (datetime.now(UTC) + timedelta(days=40)).isoformat()

        dry = world.pgbeat("rotate", "--tier", "base", "--target", "walpg", "--dry-run", "--now", later)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert f"would remove {len(doomed)} WAL file(s) no kept base backup needs" in dry.stdout, dry.stdout
        assert stored_wal() == before and first.exists()

        done = world.pgbeat("rotate", "--tier", "base", "--target", "walpg", "--now", later)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not first.exists() and second.exists()
        assert stored_wal() == [n for n in before if n not in doomed]
        again = world.pgbeat("rotate", "--tier", "base", "--target", "walpg", "--now", later)  # twice: no more goes
        assert again.returncode == 0 and stored_wal() == [n for n in before if n not in doomed]

        # What stays is enough: the kept base backup recovers to the end of the archive, every row there.
        rows = pg.sql("SELECT count(*) FROM kept")
        data = make_tempdir("pgbeat-walret-pitr-") / "data"
        port = free_port()
        restored = world.pgbeat("restore", "--pitr", "--target", "walpg", "--to", "latest", "--data-dir", str(data),
                                "--start", "--port", str(port), "--server-pgbeat", str(archiving.pgbeat_script),
                                "--timeout", "120")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        count = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                                "postgres", "-d", "postgres", "-c", "SELECT count(*) FROM kept"],
                               capture_output=True, text=True)
        assert count.stdout.strip() == rows, count.stdout + count.stderr
    finally:
        if data is not None and data.exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True)
            shutil.rmtree(data.parent, ignore_errors=True)
        archiving.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_a_destination_keeps_the_wal_its_own_base_backups_need_and_no_more(postgres_venv, moto_s3):
    """An S3 destination that keeps base backups 60 days (the shelf: 30) keeps their WAL as long: rotating
    40 days later removes the older base backup and its WAL on the shelf only; 75 days later the destination
    drops that base backup and exactly the WAL before its kept one's start segment; a dry run says so first."""
    base = make_tempdir("pgbeat-walret-s3-")
    archiving = ArchivingCluster(base, postgres_venv)
    pg, world = archiving.cluster, archiving.world
    bucket = moto_s3.new_bucket()
    world.targets[0]["tiers"] = {"base": {"enabled": True, "keep_days": 30, "min_keep": 1}}
    world.targets[0]["destinations"] = [{
        "name": "offsite", "kind": "s3", "bucket": bucket, "prefix": "pg", "endpoint_url": moto_s3.url,
        "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET, "retries": 2,
        "retention": {"base": {"keep_days": 60}}}]
    world.write_config()

    def at_s3(folder: str) -> list[str]:
        pages = moto_s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"pg/{folder}/")
        return sorted(o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", []))

    def remote_wal() -> list[str]:
        return [name.split("-", 1)[0] for name in at_s3("wal/walpg")]

    def rotate(days: int, *extra: str):
        later = (datetime.now(UTC) + timedelta(days=days)).isoformat()
        done = world.pgbeat("rotate", "--tier", "base", "--target", "walpg", "--now", later, *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    try:
        first, second, start = two_base_backups(pg, world, lambda last: last in remote_wal())
        before = remote_wal()
        doomed = [n for n in before if not n.endswith(".history") and n[8:24] < start[8:24]]
        assert doomed and any(n[8:24] >= start[8:24] for n in before)
        assert {first.name, second.name} <= set(at_s3("base"))

        rotate(40)
        assert not first.exists() and second.exists()
        assert remote_wal() == before and first.name in at_s3("base")  # the destination keeps 60 days

        dry = rotate(75, "--dry-run")
        assert f"would remove {len(doomed)} WAL file(s) at offsite no kept base backup needs" in dry.stdout, dry.stdout
        assert remote_wal() == before
        rotate(75)
        assert remote_wal() == [n for n in before if n not in doomed]
        assert first.name not in at_s3("base") and second.name in at_s3("base")
        rotate(75)  # twice: nothing more goes
        assert remote_wal() == [n for n in before if n not in doomed]
    finally:
        archiving.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_after_losing_the_host_pitr_recovers_from_the_encrypted_s3_copies_alone(postgres_venv, moto_s3):
    """The whole way through a destination: base backup and WAL go to S3 age-encrypted; the host is lost (a
    new, empty BACKUP_ROOT, the same configuration); `list --destination` names the base backup, `fetch`
    brings it onto the new shelf, and `restore --pitr --to TIME --start` recovers the rows committed at t1
    and t2 and not those of t3, through wal-fetch reading the WAL from S3 and decrypting it as postgres."""
    base = make_tempdir("pgbeat-pitr-s3-")
    archiving = ArchivingCluster(base, postgres_venv)
    pg, world = archiving.cluster, archiving.world
    bucket = moto_s3.new_bucket()
    identity, recipient = make_age_key(base)
    chown_postgres(identity)  # wal-fetch runs as the server's user and decrypts with it (0600, its own)
    world.targets[0]["tiers"] = {"base": {"enabled": True}}
    world.targets[0]["encryption"] = {"recipients": [recipient], "identity_file": str(identity)}
    world.targets[0]["destinations"] = [{
        "name": "offsite", "kind": "s3", "bucket": bucket, "prefix": "pg", "endpoint_url": moto_s3.url,
        "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET, "retries": 2}]
    world.write_config()
    data = None

    def at_s3(folder: str) -> list[str]:
        pages = moto_s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"pg/{folder}/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    try:
        pg.sql("DROP TABLE IF EXISTS ledger; CREATE TABLE ledger (id int, note text)")
        pg.sql("SELECT pg_switch_wal()")  # the segments from before encryption was configured stay behind
        done = world.pgbeat("backup", "base", "--target", "walpg")
        assert done.returncode == 0, done.stdout + done.stderr
        pg.sql("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 200) g")  # t1
        pg.sql("SELECT pg_switch_wal()")
        pg.sql("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(201, 300) g")  # t2
        digest = pg.sql("SELECT md5(string_agg(id || ':' || note, ',' ORDER BY id)) FROM ledger")
        moment = pg.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
        time.sleep(1.5)
        pg.sql("SELECT pg_switch_wal()")
        pg.sql("INSERT INTO ledger SELECT g, 'after the moment' FROM generate_series(301, 350) g")  # t3
        last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
        wait_for(lambda: any(f"/{last}-" in key for key in at_s3("wal/walpg")), 60, what=f"{last} at S3")
        assert all(key.endswith(".age") for key in at_s3("wal/walpg") if f"/{last}-" in key)
        [copy] = json.loads(world.pgbeat("list", "--destination", "offsite", "--json").stdout)
        assert copy["tier"] == "base" and copy["path"].startswith(f"s3://{bucket}/pg/base/")

        # The host is lost: its shelf and local archive with it. A new host has the configuration only.
        lost = world.backup_root
        world.backup_root = base / "newhost" / "backups"
        (world.backup_root / "wal").mkdir(parents=True)
        chown_postgres(world.backup_root / "wal")
        world.write_config()
        shutil.rmtree(lost)
        fetched = world.pgbeat("fetch", copy["path"], "--to", str(world.backup_root / "base"))
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr

        data = make_tempdir("pgbeat-pitr-s3-data-") / "data"
        port = free_port()
        restored = world.pgbeat("restore", "--pitr", "--target", "walpg", "--to", moment, "--data-dir", str(data),
                                "--start", "--port", str(port), "--server-pgbeat", str(archiving.pgbeat_script),
                                "--identity", str(identity), "--timeout", "120")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        recovered = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                                    "postgres", "-d", "postgres", "-c",
                                    "SELECT md5(string_agg(id || ':' || note, ',' ORDER BY id)) FROM ledger"],
                                   capture_output=True, text=True)
        assert recovered.stdout.strip() == digest, recovered.stdout + recovered.stderr  # t1 and t2, not t3
    finally:
        if data is not None and data.exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True)
            shutil.rmtree(data.parent, ignore_errors=True)
        archiving.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_status_and_metrics_show_the_restorable_window_and_a_gap(world):
    """A base backup starting in segment 2, the archive holding 1-4 and 6-7: status and /metrics say the
    window ends at segment 4 and that one segment is missing; pushing it closes the gap."""
    from pgbeat.catalog.manifest import Manifest, PhysicalInfo, backup_name, manifest_path, write_manifest
    from tests.support import scrape, start_metrics

    world.targets[0]["tiers"] = {"base": {"enabled": True}}
    world.write_config()
    name = backup_name("wal", "base", "20261201_010000", ".tar.gz")
    data = world.backup_root / "base" / name
    data.parent.mkdir(parents=True)
    data.write_bytes(b"a tar")
    write_manifest(manifest_path(data), Manifest(
        run_id="r", target="wal", tier="base", file=name, format="tar", codec="gzip", size=5, sha256="0" * 64,
        complete=True, started_at="2026-12-01T01:00:00Z", physical=PhysicalInfo(
            timeline=1, start_lsn="0/2000028", end_lsn="0/2000100", start_wal="000000010000000000000002",
            stop_time="2026-12-01T01:00:05Z")))
    pg_wal = world.base / "pg_wal"
    for n in (1, 2, 3, 4, 6, 7):
        segment = f"00000001000000000000000{n}"
        assert world.pgbeat("wal-push", str(wal_file(pg_wal, segment)), "--target", "wal").returncode == 0

    status = json.loads(world.pgbeat("status", "--json").stdout)
    [wal] = status["wal"]
    assert wal["gap_count"] == 1 and wal["gaps"] == ["000000010000000000000005"]
    assert wal["end_segment"] == "000000010000000000000004" and wal["window_start"].startswith("2026-12-01T01:00:05")
    text = world.pgbeat("status").stdout
    assert "wal wal: 1 segment(s) missing from 000000010000000000000005" in text, text

    port = free_port()
    proc = start_metrics(world, port)
    try:
        assert scrape(port)['pgbeat_wal_archive_gaps{target="wal"}'] == 1
        assert world.pgbeat("wal-push", str(wal_file(pg_wal, "000000010000000000000005")), "--target",
                            "wal").returncode == 0
        metrics = scrape(port)
        assert metrics['pgbeat_wal_archive_gaps{target="wal"}'] == 0
        assert metrics['pgbeat_wal_window_end_timestamp_seconds{target="wal"}'] > 0
    finally:
        proc.terminate()
        proc.wait(10)
    assert "restorable" in world.pgbeat("status").stdout


def test_a_pitr_drill_recovers_the_newest_base_backup_to_the_end_of_the_archive_and_checks_it(archiving):
    pg, world = archiving.cluster, archiving.world
    pg.sql("DROP TABLE IF EXISTS drilled; CREATE TABLE drilled (id int)")
    world.targets[0]["tiers"] = {"base": {"enabled": True}}
    world.targets[0]["drill"] = {"assertions": ["SELECT count(*) = 25 FROM drilled"]}
    world.write_config()
    try:
        assert world.pgbeat("backup", "base", "--target", "walpg").returncode == 0
        pg.sql("INSERT INTO drilled SELECT generate_series(1, 25)")  # after the base backup: only in the WAL
        last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
        wait_for(lambda: world.stored(last, "walpg"), 60, what=f"{last} in the archive")
        passed = world.pgbeat("drill", "--pitr", "--server-pgbeat", str(archiving.pgbeat_script), "--timeout", "120")
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "walpg: drill passed" in passed.stdout and "assertion holds: SELECT count(*) = 25" in passed.stdout
        newest = sorted(p for p in world.backup_root.glob("base/*") if p.name.endswith(".tar.gz"))[-1]
        [record] = json.loads(newest.with_name(newest.name + ".manifest.json").read_text())["drills"]
        assert record["status"] == "passed" and record["restore_s"] > 0 and record["reached"]
        assert not list(Path(tempfile.gettempdir()).glob("pgbeat-pitr-drill-*"))  # the scratch cluster is gone

        world.targets[0]["drill"] = {"assertions": ["SELECT count(*) = 26 FROM drilled"]}
        world.write_config()
        failed = world.pgbeat("drill", "--pitr", "--target", "walpg", "--server-pgbeat", str(archiving.pgbeat_script))
        assert failed.returncode == 1 and "FAILED" in failed.stdout and "does not hold" in failed.stdout
    finally:
        world.targets[0].pop("tiers", None)
        world.targets[0].pop("drill", None)
        world.write_config()


def test_beats_pitr_drill_runs_on_a_worker_and_records_the_point_reached(archiving, redis_server, monkeypatch):
    """Beat's `drill NAME pitr` entry, sent as beat sends it, is run by a real worker: the newest base backup
    and the WAL recovered in a scratch cluster by the configured drill.server_pgbeat, checked, recorded."""
    import uuid

    from beat_schedule import build_beat_schedule
    from pgbeat.settings import load_settings
    from tests.support import Service, Worker, clear_pgbeat_env

    pg, world = archiving.cluster, archiving.world
    base = archiving.base / f"beat-drill-{uuid.uuid4().hex[:6]}"
    base.mkdir(mode=0o755)
    target = {**world.targets[0], "tiers": {"base": {"enabled": True}},
              "drill": {"assertions": ["SELECT count(*) = 7 FROM beat_drilled"],
                        "server_pgbeat": str(archiving.pgbeat_script)}}
    service = Service(base, redis_server.url, [target], backup_root=str(world.backup_root),
                      node=f"pitrdrill-{uuid.uuid4().hex[:6]}")
    service.config_path.chmod(0o644)  # the scratch server's restore_command reads it as postgres
    clear_pgbeat_env(monkeypatch)
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    entry = build_beat_schedule(load_settings(env_file=None))["drill walpg pitr"]
    assert entry["kwargs"] == {"pitr": True} and entry["options"]["shadow"] == "drill walpg/pitr"
    assert (entry["schedule"].hour, entry["schedule"].day_of_week) == ({6}, {0})  # after the base backup

    pg.sql("DROP TABLE IF EXISTS beat_drilled; CREATE TABLE beat_drilled (id int)")
    done = service.pgbeat("backup", "base", "--target", "walpg", "--local")
    assert done.returncode == 0, done.stdout + done.stderr
    pg.sql("INSERT INTO beat_drilled SELECT generate_series(1, 7)")  # after the base backup: only in the WAL
    last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
    wait_for(lambda: world.stored(last, "walpg"), 60, what=f"{last} in the archive")
    newest = sorted(p for p in world.backup_root.glob("base/*") if p.name.endswith(".tar.gz"))[-1]

    def drills() -> list[dict]:
        return json.loads(newest.with_name(newest.name + ".manifest.json").read_text())["drills"]

    worker = Worker(service, concurrency=1)
    try:
        called = service.celery("call", entry["task"], f"--args={json.dumps(list(entry['args']))}",
                                f"--kwargs={json.dumps(entry['kwargs'])}")
        assert called.returncode == 0, called.stderr
        wait_for(lambda: drills(), 180, what="the PITR drill's record on the newest base backup")
    finally:
        worker.stop()
    [record] = drills()
    assert record["status"] == "passed", record
    assert record["reached"] and record["restore_s"] > 0
    assert any("assertion holds: SELECT count(*) = 7" in line for line in record["checks"]), record
    assert not list(Path(tempfile.gettempdir()).glob("pgbeat-pitr-drill-*"))
