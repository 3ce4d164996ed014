#!/usr/bin/env python3
"""pgbeat's fixed start-up cost: `--help` of every command, and the part of `backup daily --local` outside
its steps.

Each row runs the `pgbeat` console script in a new process, `--runs` times; wall times are medians (and
minimums). Two conditions:
- `no bytecode`: PYTHONDONTWRITEBYTECODE=1, as this environment runs it (bytecode only where it already
  exists: site-packages has it from pip, pgbeat's own tree only if it was compiled);
- `bytecode`: every module's bytecode in a private PYTHONPYCACHEPREFIX, written by one unmeasured run
  first, as an installed pgbeat has it.
`imports ms` is the sum of the top-level imports that PYTHONPROFILEIMPORTTIME reports (bytecode; the
median of 3 runs).

The backup rows back up an empty database of a throwaway cluster (initdb in a temporary folder, as in
bench/wal.py) into a fresh BACKUP_ROOT: `outside steps` is the wall time less the steps' own durations
as pgbeat prints them (`✓ dump 0.10s`).

    .venv/bin/python bench/startup.py --runs 10
    .venv/bin/python bench/startup.py --runs 5 --no-backup

The machine's other load shows in the figures: compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgbeat.cli import main as pgbeat_main  # noqa: E402
from tests.support import PgCluster, command_tree, make_tempdir  # noqa: E402

STEP_LINE = re.compile(r"✓ \w+ ([0-9.]+)s")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DB_", "CELERY_", "PGBEAT_", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE"))}
    env.pop("BACKUP_ROOT", None)
    return {**env, **extra}


def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, done


def import_ms(argv: list[str], env: dict[str, str], cwd: Path, runs: int = 3) -> float:
    """The median over `runs` runs of the sum of the top-level imports' cumulative times, in ms."""
    totals = []
    for _ in range(runs):
        _, done = run(argv, {**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd)
        total = 0
        for line in done.stderr.splitlines():
            if line.startswith("import time:"):
                _own, cumulative, name = line.removeprefix("import time:").split("|")
                if cumulative.strip().isdigit() and not name.startswith("  "):  # one level under the root
                    total += int(cumulative)
        totals.append(total / 1000)
    return statistics.median(totals)


def measure(argv: list[str], envs: dict[str, dict[str, str]], runs: int, cwd: Path) -> dict:
    """Per condition: the median and minimum wall time, and of the time outside the printed step durations."""
    row = {}
    for condition, env in envs.items():
        run(argv, env, cwd)  # unmeasured: fills the bytecode cache of `bytecode`, warms the page cache
        walls, outside = [], []
        for _ in range(runs):
            wall, done = run(argv, env, cwd)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
            walls.append(wall)
            outside.append(wall - sum(float(s) for s in STEP_LINE.findall(done.stdout)))
        row[condition] = (statistics.median(walls), min(walls), statistics.median(outside), min(outside))
    row["imports ms"] = import_ms(argv, envs["bytecode"], cwd)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per row and condition")
    parser.add_argument("--pgbeat", default=str(Path(sys.executable).parent / "pgbeat"), help="the pgbeat to run")
    parser.add_argument("--no-backup", action="store_true", help="only the --help rows (no cluster)")
    args = parser.parse_args()

    base = make_tempdir("pgbeat-bench-startup-")
    cache = Path(tempfile.mkdtemp(prefix="pycache-", dir=base))
    envs = {"no bytecode": base_env(PYTHONDONTWRITEBYTECODE="1"), "bytecode": base_env(PYTHONPYCACHEPREFIX=str(cache))}
    compiled = any((ROOT / "pgbeat").rglob("__pycache__/*.pyc"))
    print(f"{args.runs} runs per row, {os.cpu_count()} CPU(s); pgbeat's own tree "
          f"{'has' if compiled else 'has no'} bytecode of its own for `no bytecode`")
    print(f"{'command':40} {'no bytecode s':>16} {'bytecode s':>16} {'imports ms':>10}")
    pg = None
    try:
        for path, _command in command_tree(pgbeat_main):
            row = measure([args.pgbeat, *path, "--help"], envs, args.runs, base)
            cells = [f"{row[c][0]:.3f} ({row[c][1]:.3f})" for c in envs]
            print(f"{' '.join(('pgbeat', *path, '--help')):40} {cells[0]:>16} {cells[1]:>16} {row['imports ms']:10.0f}")
        if args.no_backup:
            return 0
        pg = PgCluster(base, "pg")
        pg.sql("CREATE DATABASE startup")
        config = base / "pgbeat.yaml"
        config.write_text(yaml.safe_dump({
            "backup_root": str(base / "backups"), "timezone": "UTC", "node": "bench",
            "targets": [{"name": "startup", "dbname": "startup", "host": pg.host, "port": pg.port,
                         "user": "postgres"}]}))
        for env in envs.values():
            env["PGBEAT_CONFIG"] = str(config)
        row = measure([args.pgbeat, "backup", "daily", "--local"], envs, args.runs, base)
        print(f"\n{'pgbeat backup daily --local':40} {'no bytecode s':>16} {'bytecode s':>16} {'imports ms':>10}")
        for label, index in (("wall", 0), ("outside steps", 2)):
            cells = [f"{row[c][index]:.3f} ({row[c][index + 1]:.3f})" for c in envs]
            imports = f"{row['imports ms']:.0f}" if index == 0 else ""
            print(f"  {label:38} {cells[0]:>16} {cells[1]:>16} {imports:>10}")
        return 0
    finally:
        if pg is not None:
            pg.destroy()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
