#!/usr/bin/env python3
"""How many WAL segments a second `pgbeat wal-push` archives, as a real PostgreSQL's archive_command.

A throwaway cluster (run as postgres, archive_mode on) first builds a backlog: with an empty
archive_command PostgreSQL keeps every finished segment, marked .ready, while bulk INSERTs write WAL.
Then archive_command is set and the time the archiver takes to drain the backlog is measured: the
sustained rate of one archiver process calling the command once per segment. Each configuration runs on
its own backlog: `cp` (the floor: a copy, no fsync, no checks), pgbeat with `wal.push_ahead: 0` (one
Python process per segment, nothing ahead) and pgbeat with push-ahead (default 8); with `--pgbackrest`,
pgBackRest's `archive-push` too, synchronous and asynchronous (process-max 2), into a repository of its own
(bench/pgbackrest_peer.py).

    .venv/bin/python bench/wal.py --segments 32
    .venv/bin/python bench/wal.py --segments 64 --codec zstd --push-ahead 0,4,8
    .venv/bin/python bench/wal.py --segments 32 --pgbackrest

The machine's other load shows in the figures: run it on a quiet machine, and compare rows of one run.
Uses the tests' helpers (tests/support.py) for the cluster and for the venv postgres can run pgbeat from.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pgbackrest_peer import PgBackRest, available  # noqa: E402
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET, MotoS3  # noqa: E402
from tests.support import PgCluster, make_tempdir, postgres_user_pgbeat, wait_for  # noqa: E402


def chown_postgres(path: Path) -> None:
    subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


def build_backlog(pg: PgCluster, segments: int) -> list[str]:
    """Write WAL until `segments` finished segments wait in pg_wal/archive_status as .ready; return their names."""
    pg.sql("CREATE TABLE IF NOT EXISTS filler (id bigint, v text)")
    status = pg.data / "pg_wal" / "archive_status"
    while True:
        ready = sorted(p.name.removesuffix(".ready") for p in status.glob("*.ready"))
        if len(ready) >= segments:
            return ready
        pg.sql("INSERT INTO filler SELECT i, repeat(md5(i::text), 8) FROM generate_series(1, 40000) i")


def drain(pg: PgCluster, command: str, backlog: list[str], timeout: float) -> float:
    """Set archive_command and return the seconds until every segment of `backlog` is archived."""
    before = int(pg.sql("SELECT failed_count FROM pg_stat_archiver"))
    last = backlog[-1]
    start = time.monotonic()
    pg.sql(f"ALTER SYSTEM SET archive_command = '{command}'")
    pg.sql("SELECT pg_reload_conf()")
    archived = "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"
    wait_for(lambda: pg.sql(archived) >= last, timeout, 0.05, what=f"the archiver to reach {last}")
    elapsed = time.monotonic() - start
    pg.sql("ALTER SYSTEM SET archive_command = ''")
    pg.sql("SELECT pg_reload_conf()")
    failed = int(pg.sql("SELECT failed_count FROM pg_stat_archiver")) - before
    if failed:
        raise RuntimeError(f"archive_command failed {failed} time(s): see {pg.dir / 'server.log'}")
    return elapsed


def live(pg: PgCluster, command: str, seconds: float, timeout: float) -> tuple[int, int, int, float]:
    """With archive_command set, write WAL with bulk INSERTs for `seconds`; return the segments written,
    those archived meanwhile, the backlog (.ready) left at the end, and the seconds it then took to drain."""
    archived = "SELECT archived_count FROM pg_stat_archiver"
    pg.sql(f"ALTER SYSTEM SET archive_command = '{command}'")
    pg.sql("SELECT pg_reload_conf()")
    start_lsn, start_count = pg.sql("SELECT pg_current_wal_lsn()"), int(pg.sql(archived))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pg.sql("INSERT INTO filler SELECT i, repeat(md5(i::text), 8) FROM generate_series(1, 40000) i")
    written = int(pg.sql(f"SELECT ((pg_current_wal_lsn() - '{start_lsn}') / 16777216)::bigint"))
    during = int(pg.sql(archived)) - start_count
    status = pg.data / "pg_wal" / "archive_status"
    backlog = len(list(status.glob("*.ready")))
    t0 = time.monotonic()
    wait_for(lambda: not list(status.glob("*.ready")), timeout, 0.1, what="the backlog to drain")
    drained = time.monotonic() - t0
    pg.sql("ALTER SYSTEM SET archive_command = ''")
    pg.sql("SELECT pg_reload_conf()")
    return written, during, backlog, drained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=32, help="segments in each backlog (16 MiB each)")
    parser.add_argument("--codec", choices=("gzip", "zstd", "none"), default="gzip")
    parser.add_argument("--push-ahead", default="0,8", help="the wal.push_ahead values to measure, comma-separated")
    parser.add_argument("--s3", action="store_true", help="give the target an S3 destination (a local moto_server)")
    parser.add_argument("--live", type=float, default=0, help="also: seconds of bulk INSERTs with each "
                        "archive_command active (segments written and archived meanwhile, the backlog left)")
    parser.add_argument("--pgbackrest", action="store_true", help="also pgBackRest's archive-push, sync and async")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.pgbackrest and not available():
        print("--pgbackrest: pgbackrest is not installed (apt-get install pgbackrest)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("run as root: the cluster and pgbeat run as the postgres user", file=sys.stderr)
        return 2

    base = make_tempdir("pgbeat-bench-wal-")
    pg = s3 = None
    try:
        s3 = MotoS3(base) if args.s3 else None
        pgbeat = postgres_user_pgbeat(base)
        pg = PgCluster(base, "pg")
        with open(pg.data / "postgresql.conf", "a") as f:
            f.write("\narchive_mode = on\narchive_command = ''\nmax_wal_size = 8GB\nwal_compression = off\n")
        pg.stop()
        pg.start()
        rows, commands = [], []
        copies = base / "cp-archive"
        copies.mkdir()
        chown_postgres(copies)
        backlog = build_backlog(pg, args.segments)
        rows.append(("cp (no fsync, no checks)", len(backlog), drain(pg, f"cp %p {copies}/%f", backlog, args.timeout)))
        commands.append(("cp (no fsync, no checks)", f"cp %p {copies}/%f"))
        for ahead in [int(n) for n in args.push_ahead.split(",")]:
            cfg = base / f"ahead-{ahead}"
            (cfg / "backups").mkdir(parents=True)
            chown_postgres(cfg)
            config = {"backup_root": str(cfg / "backups"), "timezone": "UTC",
                      "targets": [{"name": "bench", "dbname": "postgres", "host": pg.host, "port": pg.port,
                                   "user": "postgres", "compression": {"codec": args.codec},
                                   "wal": {"push_ahead": ahead}}]}
            if s3 is not None:
                config["targets"][0]["destinations"] = [{
                    "name": "s3", "kind": "s3", "bucket": s3.new_bucket(), "endpoint_url": s3.url,
                    "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET}]
            (cfg / "pgbeat.yaml").write_text(yaml.safe_dump(config))
            (cfg / "pgbeat.yaml").chmod(0o644)
            backlog = build_backlog(pg, args.segments)
            command = f"PGBEAT_CONFIG={cfg / 'pgbeat.yaml'} {pgbeat} wal-push %p --target bench"
            seconds = drain(pg, command, backlog, args.timeout)
            where = " + S3" if s3 is not None else ""
            rows.append((f"pgbeat wal-push, {args.codec}{where}, push_ahead {ahead}", len(backlog), seconds))
            commands.append((rows[-1][0], command))
        if args.pgbackrest:
            peer = PgBackRest(base, pg)
            for mode in ("sync", "async"):
                backlog = build_backlog(pg, args.segments)
                name = f"pgbackrest archive-push, gz 6, {mode}" + (", process-max 2" if mode == "async" else "")
                rows.append((name, len(backlog), drain(pg, peer.archive_command(mode), backlog, args.timeout)))
                commands.append((name, peer.archive_command(mode)))
        print(f"backlogs of about {args.segments} segments of 16 MiB, {os.cpu_count()} CPU(s)")
        print(f"{'archive_command':48} {'segments':>8} {'seconds':>8} {'segments/s':>11} {'MiB/s':>8}")
        for name, count, seconds in rows:
            print(f"{name:48} {count:8d} {seconds:8.2f} {count / seconds:11.2f} {16 * count / seconds:8.1f}")
        if args.live:
            print(f"\nlive: {args.live:.0f} s of bulk INSERTs with archive_command active")
            print(f"{'archive_command':48} {'written':>8} {'archived':>8} {'backlog':>8} {'drain s':>8}")
            for name, command in commands:
                written, during, backlog, drained = live(pg, command, args.live, args.timeout)
                print(f"{name:48} {written:8d} {during:8d} {backlog:8d} {drained:8.1f}")
        return 0
    finally:
        if pg is not None:
            pg.destroy()
        if s3 is not None:
            s3.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
