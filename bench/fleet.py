#!/usr/bin/env python3
"""The catalog at fleet size: `pgbeat status`, a metrics scrape, `rotate --dry-run` and `list --target`
over synthetic shelves of many targets, measured in one run.

One real backup of a small seed database is taken with `pgbeat backup daily --local`; its manifest is then
copied per target and per backup (target, file name and dates changed, re-sealed), with the data file
hard-linked and its `.sha256` rewritten, so that every command reads real, valid manifests. Each fleet has
`--backups` backups per target (7 daily, then weekly and monthly), in one targets file.

    .venv/bin/python bench/fleet.py --fleets 50,500,5000
    .venv/bin/python bench/fleet.py --fleets 50 --runs 1        # the CI smoke test

Printed per fleet: wall time of each command (median of --runs), the first and the next metrics scrape of
one `pgbeat metrics` server, and the rotate step of one target (what a backup's rotate step pays), cold
(a fresh process) and warm (the same process again). Exit status: 0 when every command succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SEED_DB = "pgbeat_fleet_seed"
# Tier of each of a target's backups, newest first, and the days between two of the same tier.
TIER_DAYS = {"daily": 1, "weekly": 7, "monthly": 30}

# What a backup's rotate step does for its target and tier, timed in the process (cold, then warm).
ROTATE_STEP = """
import sys, time
from datetime import UTC, datetime
t0 = time.perf_counter()
from pgbeat.settings import get_settings
from pgbeat.steps.rotate import rotate_target
settings = get_settings()
t1 = time.perf_counter()
rotate_target(settings, sys.argv[1], "daily", datetime.now(UTC), dry_run=True)
t2 = time.perf_counter()
rotate_target(settings, sys.argv[1], "daily", datetime.now(UTC), dry_run=True)
t3 = time.perf_counter()
print(t2 - t1, t3 - t2)
"""


def seed_manifest(pgbeat: Path, work: Path, pg: dict[str, str]) -> Path:
    """Take one real backup of a small seed database; return its data file."""
    with psycopg.connect(dbname="postgres", autocommit=True, **pg) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SEED_DB}")
        conn.execute(f"CREATE DATABASE {SEED_DB}")
    with psycopg.connect(dbname=SEED_DB, autocommit=True, **pg) as conn:
        for i in range(20):
            conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, note text)")
            conn.execute(f"INSERT INTO t{i} SELECT g, md5(g::text) FROM generate_series(1, 100) g")
    env = {**os.environ, "DB_HOST": pg["host"], "DB_PORT": pg["port"], "DB_NAME": SEED_DB, "DB_USER": pg["user"],
           "BACKUP_ROOT": str(work / "seed"), "PGBEAT_CONFIG": ""}
    subprocess.run([str(pgbeat), "backup", "daily", "--local"], env=env, check=True, capture_output=True)
    (data,) = [p for p in (work / "seed" / "daily").iterdir()
               if p.name.endswith(".sql.gz") and ".globals." not in p.name]  # not its server's globals
    return data


def drop_seed(pg: dict[str, str]) -> None:
    """Drop the seed database (the shelves are built from its one backup): the server is left as it was."""
    try:
        with psycopg.connect(dbname="postgres", autocommit=True, **pg) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {SEED_DB} WITH (FORCE)")
    except psycopg.Error as exc:
        print(f"bench/fleet.py: could not drop {SEED_DB}: {exc}", file=sys.stderr)


def build_shelf(root: Path, seed: Path, targets: list[str], backups: int, now: datetime, tier: str | None = None,
                every: timedelta = timedelta(hours=1)) -> dict[str, list[Path]]:
    """Write `backups` backups per target from the seed (7 daily, then weekly, then monthly; with `tier`, all
    of that tier, `every` apart; newest first): real manifests, re-sealed by pgbeat's own code. Return each
    target's data files, newest first."""
    from pgbeat.catalog.manifest import Manifest, backup_name, write_manifest

    template = json.loads(seed.with_name(seed.name + ".manifest.json").read_text())
    tiers = [tier] * backups if tier else (["daily"] * 7 + ["weekly"] * 2 + ["monthly"] * backups)[:backups]
    spacing = {tier: every} if tier else {t: timedelta(days=days) for t, days in TIER_DAYS.items()}
    for folder in spacing:
        (root / folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    written: dict[str, list[Path]] = {}
    for t, name in enumerate(targets):
        seen: dict[str, int] = {}
        for shelf_tier in tiers:
            k = seen[shelf_tier] = seen.get(shelf_tier, -1) + 1
            taken = now - spacing[shelf_tier] * k - timedelta(hours=1, minutes=t % 60)
            file = backup_name(name, shelf_tier, taken.strftime("%Y%m%d_%H%M%S"), ".sql.gz")
            data = root / shelf_tier / file
            os.link(seed, data)
            data.with_name(file + ".sha256").write_text(f"{template['sha256']}  {file}\n")
            iso = taken.isoformat().replace("+00:00", "Z")
            manifest = Manifest.model_validate({
                **template, "target": name, "tier": shelf_tier, "file": file, "started_at": iso, "server_time": iso,
                "finished_at": iso, "copies": {"local": {**template["copies"]["local"], "location": str(data)}}})
            write_manifest(data.with_name(file + ".manifest.json"), manifest)
            written.setdefault(name, []).append(data)
    return written


def target_names(count: int) -> list[str]:
    return [f"t{t:05d}" for t in range(count)]


def write_config(path: Path, root: Path, targets: int, pg: dict[str, str]) -> None:
    config = {"backup_root": str(root),
              "defaults": {"host": pg["host"], "port": int(pg["port"]), "user": pg["user"]},
              "targets": [{"name": name, "dbname": SEED_DB} for name in target_names(targets)]}
    path.write_text(yaml.safe_dump(config))


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_times(pgbeat: Path, env: dict[str, str], scrapes: int) -> list[float]:
    """Start one `pgbeat metrics` server; time `scrapes` scrapes of /metrics in a row."""
    port = free_port()
    server = subprocess.Popen([str(pgbeat), "metrics", "--listen", f"127.0.0.1:{port}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    error = server.stderr.read().decode()[-500:]
                    raise RuntimeError(f"pgbeat metrics did not start: {error}") from None
                time.sleep(0.05)
        times = []
        for _ in range(scrapes):
            start = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=600) as response:
                body = response.read()
            times.append(time.perf_counter() - start)
            if b"pgbeat_backups_kept" not in body:
                raise RuntimeError("the scrape has no pgbeat_backups_kept")
        return times
    finally:
        server.terminate()
        server.wait(30)


def measure_fleet(pgbeat: Path, work: Path, seed: Path, targets: int, backups: int, runs: int,
                  pg: dict[str, str], keep: bool = False) -> dict[str, Any]:
    folder = work / f"fleet-{targets}"
    shutil.rmtree(folder, ignore_errors=True)
    root = folder / "root"
    started = time.perf_counter()
    build_shelf(root, seed, target_names(targets), backups, datetime.now(UTC))
    built = time.perf_counter() - started
    config = folder / "pgbeat.yaml"
    write_config(config, root, targets, pg)
    env = {**os.environ, "PGBEAT_CONFIG": str(config), "BACKUP_ROOT": str(root)}
    for name in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD"):
        env.pop(name, None)
    one = target_names(targets)[targets // 2]
    commands = {
        "status --json": ["status", "--json"],
        "rotate --dry-run": ["rotate", "--dry-run"],
        "list": ["list", "--json"],
        "list --target (one)": ["list", "--target", one, "--json"],
    }
    figures: dict[str, Any] = {"targets": targets, "backups": targets * backups, "build_s": built}
    for label, args in commands.items():
        figures[label] = statistics.median(timed([str(pgbeat), *args], env) for _ in range(runs))
    scrapes = scrape_times(pgbeat, env, 1 + runs)
    figures["scrape (first)"], figures["scrape (next)"] = scrapes[0], statistics.median(scrapes[1:])
    step = subprocess.run([sys.executable, "-c", ROTATE_STEP, one], env=env, capture_output=True, text=True,
                          check=True)
    figures["rotate step (cold)"], figures["rotate step (warm)"] = map(float, step.stdout.split())
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def print_table(results: list[dict[str, Any]]) -> None:
    labels = [k for k in results[0] if k not in ("targets", "backups", "build_s")]
    table = Table(title="catalog at fleet size (seconds)")
    table.add_column("command")
    for figures in results:
        table.add_column(f"{figures['targets']} x {figures['backups'] // figures['targets']}", justify="right")
    for label in labels:
        table.add_row(label, *(f"{figures[label]:.3f}" for figures in results))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleets", default="50,500,5000", help="comma-separated target counts")
    parser.add_argument("--backups", type=int, default=10, help="backups per target")
    parser.add_argument("--runs", type=int, default=3, help="runs per command (median)")
    parser.add_argument("--pgbeat", type=Path, default=Path(sys.executable).parent / "pgbeat")
    parser.add_argument("--workdir", type=Path, default=None, help="where the shelves are built")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the shelves and their config (to profile)")
    args = parser.parse_args(argv)
    pg = {"host": os.environ.get("PGHOST", "127.0.0.1"), "port": os.environ.get("PGPORT", "5432"),
          "user": os.environ.get("PGUSER", "postgres")}
    work = Path(tempfile.mkdtemp(prefix="pgbeat-fleet-", dir=args.workdir))
    try:
        seed = seed_manifest(args.pgbeat, work, pg)
        results = []
        for targets in (int(n) for n in args.fleets.split(",")):
            results.append(measure_fleet(args.pgbeat, work, seed, targets, args.backups, args.runs, pg, args.keep))
            print(json.dumps(results[-1]), file=sys.stderr)
        print_table(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"bench/fleet.py: {exc}", file=sys.stderr)
        return 1
    finally:
        drop_seed(pg)
        if args.keep:
            print(f"shelves kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
