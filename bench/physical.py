#!/usr/bin/env python3
"""Base backups and point-in-time restores, pgbeat side by side with pg_basebackup and pgBackRest, in one run.

A throwaway cluster (run as postgres) is filled by `pgbench -i`; archive_command sends every WAL file both
to pgbeat (`wal-push`, push-ahead 8) and to pgBackRest (`archive-push`). Then, each `--runs` times:

- base backup: `pg_basebackup -Ft -z` alone (the floor: gzip, no verification), `pgbeat backup base`
  (the whole chain: pg_basebackup, gzip, verify with pg_verifybackup, rotate), `pgbackrest backup
  --type=full` (gz 6, process-max 2); wall time and stored size;
- after `--wal-mb` of pgbench writes (WAL that recovery must replay), restore to the end of the archive and
  promote: `pgbeat restore --pitr --start` against `pgbackrest restore` + start + recovery; and, for
  scale, `pgbeat restore` of a logical (`.sql.gz`) backup of the same database into a new one.

    .venv/bin/python bench/physical.py --scale 30 --runs 2

Run it as root on a quiet machine; compare rows of one run. Needs pgbackrest (apt-get install pgbackrest).
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
from tests.support import VENV_BIN, PgCluster, free_port, make_tempdir, postgres_user_pgbeat, wait_for  # noqa: E402

OUTPUTS: dict[str, str] = {}  # the last stdout of each pgbeat command, for its own phase timings


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: str = "/") -> float:
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    OUTPUTS[" ".join(argv[1:3])] = done.stdout
    return time.monotonic() - start


def as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv]


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def archived_up_to(pg: PgCluster, segment: str, timeout: float) -> None:
    wait_for(lambda: pg.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") >= segment, timeout,
             0.2, what=f"the archiver to reach {segment}")


def ask(bin_dir: Path, port: int, query: str) -> str:
    """`query`'s answer from the restored server on `port` ('' while it does not answer)."""
    out = subprocess.run([str(bin_dir / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                          "postgres", "-d", "postgres", "-c", query], capture_output=True, text=True)
    return out.stdout.strip()


def promoted(bin_dir: Path, port: int, timeout: float) -> None:
    wait_for(lambda: ask(bin_dir, port, "SELECT pg_is_in_recovery()") == "f", timeout, 0.1,
             what=f"the server on port {port} to be promoted")


def stop(bin_dir: Path, data: Path) -> None:
    subprocess.run(as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"),
                   capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=30, help="pgbench scale (about 15 MB of data each)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--wal-mb", type=int, default=256, help="WAL written after the base backups")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the clusters, pgbeat's wal-push and pgBackRest run as the postgres user", file=sys.stderr)
        return 2
    if not available():
        print("pgbackrest is not installed (apt-get install pgbackrest)", file=sys.stderr)
        return 2

    base = make_tempdir("pgbeat-bench-physical-")
    pg = None
    try:
        server_pgbeat = postgres_user_pgbeat(base)
        pg = PgCluster(base, "pg")
        with open(pg.data / "postgresql.conf", "a") as f:
            f.write("\narchive_mode = on\narchive_command = ''\nmax_wal_size = 8GB\n")
        pg.stop()
        pg.start()
        subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", str(args.scale), "-h", pg.host, "-p", str(pg.port),
                        "-U", "postgres", "postgres"], check=True, capture_output=True)
        db_size = int(pg.sql("SELECT pg_database_size('postgres')"))

        root = base / "pgbeat"
        (root / "backups" / "wal").mkdir(parents=True)
        subprocess.run(["chown", "-R", "postgres:postgres", str(root / "backups" / "wal")], check=True)
        config = root / "pgbeat.yaml"
        config.write_text(yaml.safe_dump({
            "backup_root": str(root / "backups"), "timezone": "UTC",
            "targets": [{"name": "bench", "dbname": "postgres", "host": pg.host, "port": pg.port, "user": "postgres",
                         "tiers": {"base": {"enabled": True, "keep_days": 30, "min_keep": 10},
                                   "daily": {"keep_days": 30, "min_keep": 10}},
                         "wal": {"push_ahead": 8}}]}))
        config.chmod(0o644)
        root.chmod(0o755)
        env = {**os.environ, "PGBEAT_CONFIG": str(config)}
        pgbeat = str(VENV_BIN / "pgbeat")
        peer = PgBackRest(base, pg)
        both = f"PGBEAT_CONFIG={config} {server_pgbeat} wal-push %p --target bench && {peer.archive_command('sync')}"
        pg.sql(f"ALTER SYSTEM SET archive_command = '{both}'")
        pg.sql("SELECT pg_reload_conf()")

        backups: dict[str, list[tuple[float, int]]] = {}
        for run in range(args.runs):
            folder = base / f"basebackup-{run}"
            folder.mkdir()
            subprocess.run(["chown", "postgres:postgres", str(folder)], check=True)
            seconds = timed(as_postgres(str(pg.bin / "pg_basebackup"), "-h", pg.host, "-p", str(pg.port), "-U",
                                        "postgres", "-D", str(folder), "-Ft", "-z", "-X", "fetch",
                                        "--checkpoint=fast"))
            backups.setdefault("pg_basebackup -Ft -z (gzip, nothing checked)", []).append((seconds, tree_size(folder)))
            shutil.rmtree(folder)
            shelf = root / "backups" / "base"
            before = set(shelf.glob("*.tar.gz"))
            seconds = timed([pgbeat, "backup", "base", "--target", "bench", "--local"], env=env, cwd=str(root))
            [made] = set(shelf.glob("*.tar.gz")) - before
            backups.setdefault("pgbeat backup base (gzip, verified, all steps)", []).append(
                (seconds, made.stat().st_size))
            size_before = peer.repo_size("backup")
            seconds = timed(as_postgres(*peer.command("backup"), "--type=full"))
            backups.setdefault("pgbackrest backup --type=full (gz 6, process-max 2)", []).append(
                (seconds, peer.repo_size("backup") - size_before))

        # WAL that recovery must replay: pgbench writes, then every segment reaches both archives.
        start_lsn = pg.sql("SELECT pg_current_wal_lsn()")
        while int(pg.sql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'")) < args.wal_mb << 20:
            subprocess.run([str(pg.bin / "pgbench"), "-n", "-T", "5", "-c", "2", "-h", pg.host, "-p", str(pg.port),
                            "-U", "postgres", "postgres"], check=True, capture_output=True)
        wal_mb = int(pg.sql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'")) >> 20
        last = pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
        archived_up_to(pg, last, args.timeout)
        accounts = pg.sql("SELECT sum(abalance) FROM pgbench_accounts")

        restores: dict[str, list[float]] = {}
        for _ in range(args.runs):
            data = make_tempdir("pgbeat-bench-pitr-") / "data"
            port = free_port()
            seconds = timed([pgbeat, "restore", "--pitr", "--target", "bench", "--to", "latest", "--data-dir",
                             str(data), "--start", "--port", str(port), "--server-pgbeat", str(server_pgbeat),
                             "--timeout", str(args.timeout)], env=env, cwd=str(root))
            if ask(pg.bin, port, "SELECT sum(abalance) FROM pgbench_accounts") != accounts:
                raise RuntimeError("pgbeat's restored cluster differs from the source")
            restores.setdefault("pgbeat restore --pitr --start (to the end of the archive)", []).append(seconds)
            stop(pg.bin, data)
            shutil.rmtree(data.parent, ignore_errors=True)

            data = make_tempdir("pgbeat-bench-pgbr-") / "data"
            data.mkdir(mode=0o700)
            subprocess.run(["chown", "-R", "postgres:postgres", str(data.parent)], check=True)
            port = free_port()
            t0 = time.monotonic()
            timed(as_postgres(*peer.command("restore"), f"--pg1-path={data}", "--archive-mode=off"))
            with open(data / "postgresql.auto.conf", "a") as f:
                f.write(f"\nport = {port}\nunix_socket_directories = '{data.parent}'\n")
            timed(as_postgres(str(pg.bin / "pg_ctl"), "-D", str(data), "-l", str(data.parent / "server.log"), "-w",
                              "-t", str(int(args.timeout)), "start"))
            promoted(pg.bin, port, args.timeout)
            restores.setdefault("pgbackrest restore + start + recovery", []).append(time.monotonic() - t0)
            if ask(pg.bin, port, "SELECT sum(abalance) FROM pgbench_accounts") != accounts:
                raise RuntimeError("pgBackRest's restored cluster differs from the source")
            stop(pg.bin, data)
            shutil.rmtree(data.parent, ignore_errors=True)

        pg.sql("ALTER SYSTEM SET archive_command = ''")
        pg.sql("SELECT pg_reload_conf()")
        timed([pgbeat, "backup", "daily", "--target", "bench", "--local"], env=env, cwd=str(root))
        [logical] = [p for p in (root / "backups" / "daily").glob("*.sql.gz") if ".globals." not in p.name]
        for run in range(args.runs):
            into = f"bench_logical_{run}"
            seconds = timed([pgbeat, "restore", str(logical), "--into", into, "--yes"], env=env, cwd=str(root))
            restores.setdefault("pgbeat restore of a logical .sql.gz into a new database", []).append(seconds)
            pg.sql(f'DROP DATABASE "{into}"')

        print(f"pgbench scale {args.scale}: database {db_size / 2**20:.0f} MiB; {wal_mb} MiB of WAL replayed by each "
              f"PITR restore; {os.cpu_count()} CPU(s); runs {args.runs}")
        floor = min(s for s, _ in backups["pg_basebackup -Ft -z (gzip, nothing checked)"])
        print(f"\n{'base backup':56} {'seconds':>16} {'MiB':>8} {'x floor':>8}")
        for name, runs in backups.items():
            best = min(s for s, _ in runs)
            print(f"{name:56} {', '.join(f'{s:.1f}' for s, _ in runs):>16} {runs[0][1] / 2**20:8.0f} "
                  f"{best / floor:8.2f}")
        peer_best = min(restores["pgbackrest restore + start + recovery"])
        print(f"\n{'restore (RTO)':56} {'seconds':>16} {'x pgBackRest':>13}")
        for name, runs in restores.items():
            print(f"{name:56} {', '.join(f'{s:.1f}' for s in runs):>16} {min(runs) / peer_best:13.2f}")
        phases = [line.strip() for line in OUTPUTS.get("restore --pitr", "").splitlines() if line.startswith("  ")]
        if phases:
            print(f"\npgbeat restore --pitr, its phases: {phases[-1]}")
        return 0
    finally:
        if pg is not None:
            pg.destroy()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
