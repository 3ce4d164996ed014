#!/usr/bin/env python3
"""pgbeat side by side with plain shell pipelines, measured in one run.

Given a size, build (or reuse) a throwaway PostgreSQL cluster with the ERP-like database of
`bench/gen_erp.sql`, then time each pipeline interleaved with the ceiling (`pg_dump -Fp db > /dev/null`):
ceiling, pipeline, ceiling, pipeline, ... Every ratio is taken pair by pair and the median is quoted,
because on a noisy machine a ratio measured within one run is worth more than any absolute time.

Print a table (wall time, client CPU, server CPU, peak RSS, output size, compression ratio, ratio against
the ceiling and against the seed's way) and write every raw sample to JSON.

    .venv/bin/python bench/run.py --size small --runs 3
    .venv/bin/python bench/run.py --size tiny --only 'pgbeat_*,restore_*'
    .venv/bin/python bench/run.py --list

Only the standard library and what pgbeat depends on (rich, psycopg) plus psutil (pgbeat's test extras).
Exit status: 0 when every measured pipeline succeeded (rows marked n/a do not count), 1 if one failed,
2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
GENERATOR = BENCH_DIR / "gen_erp.sql"
DBNAME = "erp"
KEEP_FILE = "bench-cluster.json"

# Row counts per size. "tiny" is the CI smoke test; "small" and "large" are for measuring. The tables with
# their indexes take about 5 MB, 300 MB and 1.5 GB (PostgreSQL 15; pg_database_size adds ~7.5 MB of catalog).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"accounts": 10_000, "orders": 2_500, "customers": 1_000, "invoice_lines": 6_000},
    "small": {"accounts": 700_000, "orders": 170_000, "customers": 40_000, "invoice_lines": 420_000},
    "large": {"accounts": 3_500_000, "orders": 850_000, "customers": 200_000, "invoice_lines": 2_100_000},
}
# perf-baseline.md's cluster settings; tiny gets small memory settings so CI stays light.
SERVER_SETTINGS = {
    "shared_buffers": "1GB", "maintenance_work_mem": "1GB", "work_mem": "64MB", "max_wal_size": "8GB",
    "checkpoint_timeout": "30min", "wal_level": "replica",
}
TINY_SETTINGS = {"shared_buffers": "128MB", "maintenance_work_mem": "64MB"}
# pgbeat targets, one per pgbeat pipeline; the streaming ones are added only when this pgbeat knows them.
PGBEAT_TARGETS: dict[str, dict[str, Any]] = {
    "bench_default": {},
    "bench_dump_first": {"streaming": False},
    "bench_stream_zstd": {"streaming": True, "compression": {"codec": "zstd", "level": 3}},
    "bench_custom": {"format": "custom"},
    "bench_directory_j2": {"format": "directory", "jobs": 2},
}
STREAMING_TARGETS = ("bench_dump_first", "bench_stream_zstd")
BACKEND_TITLE = re.compile(r"^postgres: (\S+ \S+ (\d{1,3}(\.\d{1,3}){3}\(\d+\)|\[local\])|parallel worker)")
SAMPLE_INTERVAL = 0.05

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
log_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def note(message: str) -> None:
    log_console.print(message, markup=False)


def pg_bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def tree_size(path: Path) -> int:
    """Return the size of a file, or the total size of the files under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def human_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# --- the database server --------------------------------------------------------------------------------


class Server:
    """Where the benchmark database lives: a throwaway cluster of our own, or an existing server (--dsn)."""

    def __init__(self, env: dict[str, str], dbname: str, postmaster_pid: int | None = None) -> None:
        self.env = env  # PGHOST, PGPORT, PGUSER (and PGPASSWORD) for every client program
        self.dbname = dbname
        self.postmaster_pid = postmaster_pid

    @property
    def host(self) -> str:
        return self.env.get("PGHOST", "127.0.0.1")

    @property
    def port(self) -> int:
        return int(self.env.get("PGPORT", "5432"))

    @property
    def user(self) -> str:
        return self.env.get("PGUSER", "postgres")

    def psql(self, sql: str, db: str | None = None) -> str:
        out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db or self.dbname,
                              "-c", sql], env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def server_cpu(self) -> float | None:
        """Return the CPU seconds of the server's exited backends so far (the postmaster's cutime+cstime).

        A backend's CPU is added when it exits, so call this after its clients have disconnected
        (`wait_backends_gone`). None when the server is not ours (--dsn).
        """
        if self.postmaster_pid is None:
            return None
        try:
            stat = Path(f"/proc/{self.postmaster_pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def wait_backends_gone(self, timeout: float = 5.0) -> None:
        """Wait until no client backend or parallel worker runs, so its CPU time has been counted."""
        if self.postmaster_pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(backend_pending(child) for child in self.server_processes()):
            time.sleep(0.02)

    def server_processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.postmaster_pid).children()
        except psutil.Error:
            return []

    def createdb(self, name: str) -> None:
        self.psql(f'CREATE DATABASE "{name}"', db="postgres")

    def dropdb(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', db="postgres")

    def checkpoint(self) -> None:
        with contextlib.suppress(RuntimeError):  # needs superuser or pg_checkpoint on a foreign server
            self.psql("CHECKPOINT")

    def user_tables(self, db: str | None = None) -> dict[str, int]:
        """Return the exact row count of every user table of `db` (for checking restores)."""
        names = self.psql("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables ORDER BY 1", db)
        tables = [n for n in names.splitlines() if n]
        if not tables:
            return {}
        query = " UNION ALL ".join(f"SELECT {i}, count(*) FROM {t}" for i, t in enumerate(tables))
        counts = dict(line.split("|") for line in self.psql(query, db).splitlines())
        return {t: int(counts[str(i)]) for i, t in enumerate(tables)}


def backend_pending(child: psutil.Process) -> bool:
    """Return True for a server process whose CPU time the postmaster has not counted yet: a client backend
    or parallel worker, one that is exiting (its command line is empty then), or one that exited and is a
    zombie until the postmaster reaps it."""
    try:
        if child.status() == psutil.STATUS_ZOMBIE:
            return True
        title = " ".join(child.cmdline()).strip()
    except psutil.ZombieProcess:
        return True
    except psutil.Error:
        return False  # gone: reaped, so counted
    return not title or bool(BACKEND_TITLE.match(title))


class Cluster:
    """A PostgreSQL cluster of our own in `base/cluster`, started with perf-baseline.md's settings."""

    def __init__(self, base: Path, port: int | None = None) -> None:
        self.dir = base / "cluster"
        self.data = self.dir / "data"
        self.port = port or free_port()

    def create(self, settings: dict[str, str]) -> None:
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        out = subprocess.run([*as_postgres(), "initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                              "--locale=C.UTF-8", "-A", "trust"], capture_output=True, text=True)
        if out.returncode != 0:
            hint = " (as root, every folder above it must be reachable by the postgres user)" if as_postgres() else ""
            raise SystemExit(f"initdb failed{hint}: {out.stderr.strip()}")
        lines = ["listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{self.dir}'",
                 *(f"{key} = {value}" for key, value in settings.items())]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# bench/run.py\n" + "\n".join(lines) + "\n")
        self.set_port(self.port)

    def set_port(self, port: int) -> None:
        self.port = port
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"port = {port}\n")

    def start(self) -> None:
        out = subprocess.run([*as_postgres(), "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"),
                              "-w", "-t", "120", "start"], capture_output=True, text=True)
        if out.returncode != 0:
            server_log = self.dir / "server.log"
            log = server_log.read_text(errors="replace")[-2000:] if server_log.exists() else ""
            raise SystemExit(f"pg_ctl start failed: {out.stderr.strip()} {out.stdout.strip()}\n{log}")

    def stop(self) -> None:
        subprocess.run([*as_postgres(), "pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def server(self, dbname: str) -> Server:
        env = client_env({"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres"})
        return Server(env, dbname, self.postmaster_pid())


def client_env(pg: dict[str, str]) -> dict[str, str]:
    """Return this process's environment for PostgreSQL clients: pg_config's bindir first, PG* from `pg`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "DB_", "CELERY_")) and k != "BACKUP_ROOT"}
    env["PATH"] = f"{pg_bindir()}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(pg)
    return env


def generate(server: Server, rows: dict[str, int]) -> float:
    """Create the database and fill it with gen_erp.sql; return the seconds it took."""
    t0 = time.monotonic()
    server.psql(f'CREATE DATABASE "{server.dbname}"', db="postgres")
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *(f"-v{k}={v}" for k, v in rows.items()),
            "-d", server.dbname, "-f", str(GENERATOR)]
    out = subprocess.run(argv, env=server.env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"generating the data failed: {out.stderr.strip()}")
    return time.monotonic() - t0


# --- measuring one command ----------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Follow a process tree's memory every SAMPLE_INTERVAL seconds: the peak of the summed RSS of all its
    processes, and the largest single process's peak RSS (VmHWM, exact for every process sampled at
    least once). wait4's ru_maxrss is not used for that: a child inherits the high-water mark of the
    forking process, so it would never read below this harness's own RSS."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_tree = 0
        self.peak_process = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stopped.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
                self.peak_process = max(self.peak_process, high_water_rss(proc.pid))
            self.peak_tree = max(self.peak_tree, total)
            self.stopped.wait(SAMPLE_INTERVAL)

    def stop(self) -> tuple[int, int]:
        self.stopped.set()
        self.join()
        return self.peak_tree, self.peak_process


def high_water_rss(pid: int) -> int:
    """Return a process's peak RSS in bytes since its last exec (VmHWM), or 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Invocation:
    """One timed command: a bash -o pipefail script, and where its output and logs go."""

    shell: str
    folder: Path
    env: dict[str, str]
    cwd: Path | None = None
    output: Path | None = None  # file or folder whose size is the output size
    pgbeat_backup: bool = False  # output is a BACKUP_ROOT/daily folder holding one backup and its sidecars


def measure(inv: Invocation, server: Server) -> dict[str, Any]:
    """Run `inv` once; return wall time, CPU of the client processes (rusage of the whole process tree,
    from wait4), server CPU, peak RSS (sampled sum over the tree, and the largest single process),
    exit code and the last lines of stderr."""
    os.sync()  # earlier runs' dirty pages are written now, not during this run
    server.wait_backends_gone()
    srv0 = server.server_cpu()
    stdout_path, stderr_path = inv.folder / "stdout.log", inv.folder / "stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", inv.shell], cwd=inv.cwd or inv.folder,
                                env=inv.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            sampler.stop()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak_tree, peak_process = sampler.stop()
    with contextlib.suppress(ProcessLookupError):  # anything the command left behind in its session
        os.killpg(proc.pid, signal.SIGKILL)
    server.wait_backends_gone()
    srv1 = server.server_cpu()
    sample = {
        "wall_s": round(wall, 4),
        "cpu_user_s": round(usage.ru_utime, 3),
        "cpu_sys_s": round(usage.ru_stime, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "server_cpu_s": None if srv0 is None or srv1 is None else round(srv1 - srv0, 2),
        "rss_tree_peak_bytes": peak_tree,
        "rss_max_process_bytes": peak_process,
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,  # floored by the harness's own RSS (see RssSampler)
        "exit_code": proc.returncode,
        "stdout": stdout_path.read_text(errors="replace")[-4000:],
    }
    if proc.returncode != 0:
        sample["stderr_tail"] = stderr_path.read_text(errors="replace").strip().splitlines()[-8:]
    return sample


# --- pipelines ---------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """A way of dumping or restoring, with what it needs and how its result is measured."""

    name: str
    kind: str  # "dump" or "restore"
    command: str  # as shown to people, with FILE/DB placeholders
    build: Callable[[Bench, Path], Invocation]
    needs: Callable[[Bench], str | None] = lambda bench: None  # a reason why it cannot run here, or None
    restore_from: str | None = None  # artifact a restore reads: plain_gz, custom or directory


def q(value: Any) -> str:
    return shlex.quote(str(value))


def shell_dump(script: str, output: str | None) -> Callable[[Bench, Path], Invocation]:
    def build(bench: Bench, folder: Path) -> Invocation:
        out = folder / output if output else None
        text = script.format(db=q(bench.server.dbname), out=q(out) if out else "", dir=q(folder))
        return Invocation(text, folder, bench.server.env, output=out)
    return build


def needs_program(name: str) -> Callable[[Bench], str | None]:
    return lambda bench: None if shutil.which(name, path=bench.server.env["PATH"]) else f"n/a ({name} is not installed)"


def pgbeat_backup(target: str) -> Callable[[Bench, Path], Invocation]:
    def build(bench: Bench, folder: Path) -> Invocation:
        backup_root = folder / "backups"
        text = f"{q(bench.pgbeat)} backup daily --target {q(target)}"
        return Invocation(text, folder, bench.pgbeat_env(backup_root), cwd=bench.pgbeat_cwd,
                          output=backup_root / "daily", pgbeat_backup=True)
    return build


def needs_streaming(bench: Bench) -> str | None:
    return None if bench.features["streaming"] else "n/a (not supported by this pgbeat)"


def needs_pgbeat_restore(jobs: bool) -> Callable[[Bench], str | None]:
    def check(bench: Bench) -> str | None:
        if not bench.features["restore"]:
            return "n/a (not supported by this pgbeat)"
        if jobs and not bench.features["restore_jobs"]:
            return "n/a (this pgbeat restore has no --jobs)"
        return None
    return check


def shell_restore(script: str) -> Callable[[Bench, Path], Invocation]:
    def build(bench: Bench, folder: Path) -> Invocation:
        return Invocation(script.format(backup=q(bench.restore_input), rdb=q(bench.restore_db)), folder,
                          bench.server.env)
    return build


def pgbeat_restore(jobs: int | None) -> Callable[[Bench, Path], Invocation]:
    def build(bench: Bench, folder: Path) -> Invocation:
        extra = f" --jobs {jobs}" if jobs else ""
        text = f"{q(bench.pgbeat)} restore {q(bench.restore_input)} --into {q(bench.restore_db)}{extra} --yes"
        return Invocation(text, folder, bench.pgbeat_env(bench.restore_input_root), cwd=bench.pgbeat_cwd)
    return build


PSQL = "psql -X -q -v ON_ERROR_STOP=1"
PIPELINES = [
    Pipeline("ceiling", "dump", "pg_dump -Fp DB > /dev/null", shell_dump("pg_dump -Fp {db} > /dev/null", None)),
    Pipeline("seed", "dump", "pg_dump -Fp DB > f.sql && gzip f.sql && gzip -t f.sql.gz && md5sum f.sql.gz > f.md5",
             shell_dump("pg_dump -Fp {db} > {dir}/f.sql && gzip {dir}/f.sql && gzip -t {dir}/f.sql.gz"
                        " && md5sum {dir}/f.sql.gz > {dir}/f.md5", "f.sql.gz")),
    Pipeline("gzip_pipe", "dump", "pg_dump -Fp DB | gzip -6 > f.sql.gz",
             shell_dump("pg_dump -Fp {db} | gzip -6 > {out}", "f.sql.gz")),
    Pipeline("pigz_pipe", "dump", "pg_dump -Fp DB | pigz -p 2 > f.sql.gz",
             shell_dump("pg_dump -Fp {db} | pigz -p 2 > {out}", "f.sql.gz"), needs_program("pigz")),
    Pipeline("zstd_pipe", "dump", "pg_dump -Fp DB | zstd -q -3 -T2 > f.sql.zst",
             shell_dump("pg_dump -Fp {db} | zstd -q -3 -T2 > {out}", "f.sql.zst"), needs_program("zstd")),
    Pipeline("pgbeat_default", "dump", "pgbeat backup daily (plain, gzip 6; compressed as it streams since "
             "the streaming key defaults to true)", pgbeat_backup("bench_default")),
    Pipeline("pgbeat_dump_first", "dump", "pgbeat backup daily (streaming: false: dump, then compress)",
             pgbeat_backup("bench_dump_first"), needs_streaming),
    Pipeline("pgbeat_stream_zstd", "dump", "pgbeat backup daily (streaming: true, zstd 3)",
             pgbeat_backup("bench_stream_zstd"), needs_streaming),
    Pipeline("pg_dump_custom", "dump", "pg_dump -Fc DB > f.dump", shell_dump("pg_dump -Fc {db} > {out}", "f.dump")),
    Pipeline("pgbeat_custom", "dump", "pgbeat backup daily (format: custom)", pgbeat_backup("bench_custom")),
    Pipeline("pg_dump_dir_j2", "dump", "pg_dump -Fd -j 2 -f f.dir DB",
             shell_dump("pg_dump -Fd -j 2 -f {out} {db}", "f.dir")),
    Pipeline("pg_dump_dir_j2_z0", "dump", "pg_dump -Fd -j 2 -Z 0 -f f.dir DB",
             shell_dump("pg_dump -Fd -j 2 -Z 0 -f {out} {db}", "f.dir")),
    Pipeline("pgbeat_directory_j2", "dump", "pgbeat backup daily (format: directory, jobs: 2)",
             pgbeat_backup("bench_directory_j2")),
    Pipeline("restore_psql", "restore", "gunzip -c FILE.sql.gz | psql -v ON_ERROR_STOP=1 -d NEWDB",
             shell_restore(f"gunzip -c {{backup}} | {PSQL} -d {{rdb}} > /dev/null"), restore_from="plain_gz"),
    Pipeline("pgbeat_restore_plain", "restore", "pgbeat restore FILE.sql.gz --into NEWDB --yes",
             pgbeat_restore(None), needs_pgbeat_restore(False), restore_from="plain_gz"),
    Pipeline("pg_restore_custom_j2", "restore", "pg_restore -j 2 -d NEWDB FILE.dump",
             shell_restore("pg_restore -j 2 -d {rdb} {backup}"), restore_from="custom"),
    Pipeline("pgbeat_restore_custom_j2", "restore", "pgbeat restore FILE.dump --into NEWDB --jobs 2 --yes",
             pgbeat_restore(2), needs_pgbeat_restore(True), restore_from="custom"),
    Pipeline("pg_restore_dir_j2", "restore", "pg_restore -j 2 -d NEWDB FILE.dir",
             shell_restore("pg_restore -j 2 -d {rdb} {backup}"), restore_from="directory"),
    Pipeline("pgbeat_restore_dir_j2", "restore", "pgbeat restore FILE.dir --into NEWDB --jobs 2 --yes",
             pgbeat_restore(2), needs_pgbeat_restore(True), restore_from="directory"),
]
BY_NAME = {p.name: p for p in PIPELINES}
# Which pgbeat target makes each restore's input (a pgbeat backup, so pgbeat restore finds its manifest).
ARTIFACT_TARGETS = {"plain_gz": "bench_default", "custom": "bench_custom", "directory": "bench_directory_j2"}
ARTIFACT_OF_PIPELINE = {"pgbeat_default": "plain_gz", "pgbeat_custom": "custom", "pgbeat_directory_j2": "directory"}
SEED_RESTORE = "restore_psql"
STEP_LINE = re.compile(r"✓ (\w+) ([\d.]+)s")


# --- the benchmark ------------------------------------------------------------------------------------


@dataclass
class Bench:
    server: Server
    workdir: Path
    pgbeat: Path
    source_rows: dict[str, int] = field(default_factory=dict)
    features: dict[str, bool] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    restore_input: Path | None = None
    restore_db: str = ""
    counter: int = 0

    @property
    def pgbeat_cwd(self) -> Path:
        path = self.workdir / "pgbeat-cwd"  # an empty folder: pgbeat reads .env from its working directory
        path.mkdir(exist_ok=True)
        return path

    @property
    def config_path(self) -> Path:
        return self.workdir / "pgbeat.yaml"

    @property
    def restore_input_root(self) -> Path:
        assert self.restore_input is not None
        return self.restore_input.parent.parent  # BACKUP_ROOT/daily/FILE

    def pgbeat_env(self, backup_root: Path) -> dict[str, str]:
        env = {k: v for k, v in self.server.env.items() if not k.startswith("PGBEAT_")}
        env.update(PGBEAT_CONFIG=str(self.config_path), BACKUP_ROOT=str(backup_root), PYTHONUNBUFFERED="1")
        return env

    def target_entry(self, name: str) -> dict[str, Any]:
        entry = {"name": name, "host": self.server.host, "port": self.server.port, "user": self.server.user,
                 "dbname": self.server.dbname}
        if self.server.env.get("PGPASSWORD"):
            entry["password"] = self.server.env["PGPASSWORD"]
        return {**entry, **PGBEAT_TARGETS[name]}

    def write_config(self, path: Path, names: list[str]) -> None:
        config = {"backup_root": str(self.workdir / "unused-backups"), "timezone": "UTC", "node": "bench",
                  "targets": [self.target_entry(n) for n in names]}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def detect_features(self) -> None:
        """Find out what this pgbeat supports: streaming targets, `pgbeat restore` and its --jobs."""
        probe = self.workdir / "probe.yaml"
        self.write_config(probe, list(STREAMING_TARGETS))
        env = {**self.pgbeat_env(self.workdir / "unused-backups"), "PGBEAT_CONFIG": str(probe)}
        check = subprocess.run([str(self.pgbeat), "config", "check", "--no-connect"], env=env, cwd=self.pgbeat_cwd,
                               capture_output=True, text=True)
        self.features["streaming"] = check.returncode == 0
        probe.unlink()
        helptext = subprocess.run([str(self.pgbeat), "restore", "--help"], env=env, cwd=self.pgbeat_cwd,
                                  capture_output=True, text=True)
        self.features["restore"] = helptext.returncode == 0 and "--into" in helptext.stdout
        self.features["restore_jobs"] = self.features["restore"] and "--jobs" in helptext.stdout
        names = [n for n in PGBEAT_TARGETS if self.features["streaming"] or n not in STREAMING_TARGETS]
        self.write_config(self.config_path, names)

    def new_folder(self, label: str) -> Path:
        self.counter += 1
        path = self.workdir / "runs" / f"{self.counter:04d}-{label}"
        path.mkdir(parents=True)
        return path

    def ensure_artifact(self, kind: str) -> Path:
        """Return a pgbeat backup of kind plain_gz, custom or directory, making one (untimed) if needed."""
        if kind not in self.artifacts:
            folder = self.workdir / "artifacts" / kind
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            inv = pgbeat_backup(ARTIFACT_TARGETS[kind])(self, folder)
            sample = measure(inv, self.server)
            if sample["exit_code"] != 0:
                raise RuntimeError(f"pgbeat backup for the {kind} restore input failed: {sample.get('stderr_tail')}")
            self.artifacts[kind] = pgbeat_data_file(inv.output)
        return self.artifacts[kind]

    def run_once(self, pipeline: Pipeline, label: str, keep: bool = False) -> dict[str, Any]:
        """Run `pipeline` once, measured; return its sample (output removed unless `keep`)."""
        folder = self.new_folder(f"{pipeline.name}-{label}")
        if pipeline.kind == "restore":
            self.restore_input = self.ensure_artifact(pipeline.restore_from or "")
            self.restore_db = f"bench_restore_{self.counter}"
            self.server.createdb(self.restore_db)
            self.server.checkpoint()
        inv = pipeline.build(self, folder)
        try:
            sample = measure(inv, self.server)
            if sample["exit_code"] == 0:
                sample.update(self.result_of(pipeline, inv, sample))
        finally:
            if pipeline.kind == "restore":
                self.server.dropdb(self.restore_db)
        if keep and sample["exit_code"] == 0 and pipeline.name in ARTIFACT_OF_PIPELINE:
            self.artifacts[ARTIFACT_OF_PIPELINE[pipeline.name]] = pgbeat_data_file(inv.output)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        sample.pop("stdout", None)
        return sample

    def result_of(self, pipeline: Pipeline, inv: Invocation, sample: dict[str, Any]) -> dict[str, Any]:
        """Measure what a successful run produced: output size, pgbeat's step times, a restore's rows."""
        result: dict[str, Any] = {}
        if pipeline.kind == "restore":
            restored = self.server.user_tables(self.restore_db)
            result["rows_match"] = restored == self.source_rows
            if not result["rows_match"]:
                result["exit_code"] = -1
                result["stderr_tail"] = ["restored row counts differ from the source database"]
            result["output_bytes"] = int(self.server.psql(f"SELECT pg_database_size('{self.restore_db}')",
                                                          db="postgres"))
            return result
        if inv.pgbeat_backup:
            data = pgbeat_data_file(inv.output)
            result["output_bytes"] = tree_size(data)
            result["steps"] = pgbeat_steps(data, sample.get("stdout", ""))
        elif inv.output is not None:
            result["output_bytes"] = tree_size(inv.output)
        return result


def pgbeat_data_file(daily: Path | None) -> Path:
    """Return the backup file (or folder) pgbeat left in BACKUP_ROOT/daily (not its sidecars)."""
    assert daily is not None
    found = [p for p in daily.iterdir() if not p.name.endswith((".manifest.json", ".sha256"))
             and not p.name.startswith(".") and ".globals." not in p.name]  # its server's globals: not the backup
    if len(found) != 1:
        raise RuntimeError(f"expected one backup in {daily}, found {[p.name for p in found]}")
    return found[0]


def pgbeat_steps(data: Path, stdout: str) -> dict[str, float]:
    """Return each chain step's duration: from the CLI's `✓ step 1.23s` lines, else from the manifest."""
    steps = {name: float(seconds) for name, seconds in STEP_LINE.findall(stdout)}
    if steps:
        return steps
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(data.with_name(data.name + ".manifest.json").read_text())
        return {name: info["duration_s"] for name, info in manifest.get("steps", {}).items() if "duration_s" in info}
    return {}


def select_pipelines(only: str | None) -> list[Pipeline]:
    if not only:
        return list(PIPELINES)
    patterns = [p.strip() for p in only.split(",") if p.strip() and p.strip() != "celery"]
    if not patterns:
        return []
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in BY_NAME)]
    if unknown:
        raise SystemExit(f"--only: no pipeline matches {', '.join(unknown)} (see --list)")
    chosen = [p for p in PIPELINES if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
    return chosen if chosen[0].name == "ceiling" else [BY_NAME["ceiling"], *chosen]


def run_pipelines(bench: Bench, pipelines: list[Pipeline], runs: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Run each pipeline `runs` times, each run right after a ceiling run (A, B, A, B, ...)."""
    ceiling = BY_NAME["ceiling"]
    results: dict[str, dict[str, Any]] = {p.name: {"name": p.name, "kind": p.kind, "command": p.command,
                                                   "status": "ok", "samples": []} for p in pipelines}
    for index, pipeline in enumerate(pipelines, 1):
        row = results[pipeline.name]
        if pipeline.name == "ceiling":
            continue  # measured as every other pipeline's partner
        reason = pipeline.needs(bench)
        if reason:
            row["status"] = reason
            note(f"[{index}/{len(pipelines)}] {pipeline.name}: {reason}")
            continue
        try:
            for w in range(warmup):
                bench.run_once(pipeline, f"warmup{w + 1}")
            for n in range(runs):
                base = bench.run_once(ceiling, f"pair{n + 1}")
                results["ceiling"]["samples"].append({**base, "paired_with": pipeline.name})
                if base["exit_code"] != 0:
                    raise RuntimeError(f"the ceiling run failed: {base.get('stderr_tail')}")
                sample = bench.run_once(pipeline, f"run{n + 1}", keep=n == runs - 1)
                sample["ceiling_wall_s"] = base["wall_s"]
                row["samples"].append(sample)
                if sample["exit_code"] != 0:
                    row["status"] = "failed"
                    row["error"] = sample.get("stderr_tail")
                    note(f"[{index}/{len(pipelines)}] {pipeline.name} run {n + 1}/{runs} FAILED "
                         f"(exit {sample['exit_code']}): {' / '.join(sample.get('stderr_tail') or [])}")
                    break
                note(f"[{index}/{len(pipelines)}] {pipeline.name} run {n + 1}/{runs}: {sample['wall_s']:.2f} s "
                     f"(ceiling {base['wall_s']:.2f} s, x{sample['wall_s'] / base['wall_s']:.2f})")
        except RuntimeError as exc:
            row["status"] = "failed"
            row["error"] = [str(exc)]
            note(f"[{index}/{len(pipelines)}] {pipeline.name} FAILED: {exc}")
    return results


# --- summary and table -------------------------------------------------------------------------------


def summarise(results: dict[str, dict[str, Any]], raw_bytes: int) -> None:
    """Add a `summary` to each measured row: medians, min-max, ratios against the ceiling and the seed."""
    for row in results.values():
        good = [s for s in row["samples"] if s["exit_code"] == 0]
        if row["name"] == "ceiling":
            good = [{**s, "ceiling_wall_s": s["wall_s"], "output_bytes": raw_bytes} for s in good]
        if not good or row["status"] != "ok":
            continue
        walls = [s["wall_s"] for s in good]
        ratios = [s["wall_s"] / s["ceiling_wall_s"] for s in good]
        outputs = [s["output_bytes"] for s in good if s.get("output_bytes") is not None]
        server = [s["server_cpu_s"] for s in good if s.get("server_cpu_s") is not None]
        summary = {
            "runs": len(good),
            "wall_s_median": statistics.median(walls), "wall_s_min": min(walls), "wall_s_max": max(walls),
            "cpu_s_median": statistics.median(s["cpu_s"] for s in good),
            "server_cpu_s_median": statistics.median(server) if server else None,
            "rss_tree_peak_bytes": max(s["rss_tree_peak_bytes"] for s in good),
            "rss_max_process_bytes": max(s["rss_max_process_bytes"] for s in good),
            "output_bytes_median": int(statistics.median(outputs)) if outputs else None,
            "vs_ceiling_median": statistics.median(ratios), "vs_ceiling_min": min(ratios),
            "vs_ceiling_max": max(ratios),
        }
        if row["kind"] == "dump" and outputs:
            summary["compression_ratio"] = raw_bytes / summary["output_bytes_median"]
        if any(s.get("steps") for s in good):
            names = {name for s in good for name in s.get("steps", {})}
            summary["steps_s_median"] = {name: statistics.median(s["steps"].get(name, 0.0) for s in good)
                                         for name in sorted(names)}
            # Wall time outside the steps: interpreter start-up, imports, settings, the CLI itself.
            summary["outside_steps_s_median"] = statistics.median(s["wall_s"] - sum(s.get("steps", {}).values())
                                                                  for s in good)
        row["summary"] = summary
    for row in results.values():
        reference = results.get("seed" if row["kind"] == "dump" else SEED_RESTORE)
        if "summary" in row and reference and "summary" in reference:
            # Both are drift-free ratios against the ceiling, so their quotient is too.
            row["summary"]["vs_seed"] = row["summary"]["vs_ceiling_median"] / reference["summary"]["vs_ceiling_median"]


def print_table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    title = (f"pgbeat bench: {meta['size']} ({human_bytes(meta['database_bytes'])} database, "
             f"{human_bytes(meta['raw_dump_bytes'])} plain dump), {meta['runs']} run(s) per pipeline, "
             f"each paired with a ceiling run")
    table = Table(title=title, title_justify="left")
    for column, justify in (("pipeline", "left"), ("wall s median (min-max)", "right"), ("CPU s", "right"),
                            ("server CPU s", "right"), ("peak RSS tree / largest", "right"),
                            ("output", "right"), ("ratio", "right"), ("x ceiling (min-max)", "right"),
                            ("x seed", "right")):
        table.add_column(column, justify=justify)
    for row in results.values():
        s = row.get("summary")
        if row["status"] != "ok" or s is None:
            status = row["status"] if row["status"] != "ok" else "no sample"
            if row.get("error"):
                status += ": " + " / ".join(row["error"])[-100:]
            table.add_row(row["name"], status, *[""] * 7)
            continue
        mib = 1024 * 1024
        table.add_row(
            row["name"],
            f"{s['wall_s_median']:.2f} ({s['wall_s_min']:.2f}-{s['wall_s_max']:.2f})",
            f"{s['cpu_s_median']:.2f}",
            "-" if s["server_cpu_s_median"] is None else f"{s['server_cpu_s_median']:.2f}",
            f"{s['rss_tree_peak_bytes'] / mib:.0f} / {s['rss_max_process_bytes'] / mib:.0f} MiB",
            human_bytes(s["output_bytes_median"]),
            f"x{s['compression_ratio']:.2f}" if "compression_ratio" in s else "-",
            f"{s['vs_ceiling_median']:.2f} ({s['vs_ceiling_min']:.2f}-{s['vs_ceiling_max']:.2f})",
            f"{s['vs_seed']:.2f}" if "vs_seed" in s else "-",
        )
    console.print(table)
    for row in results.values():
        medians = row.get("summary", {}).get("steps_s_median")
        if medians:
            console.print(f"  {row['name']} steps (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items())
                          + f"; outside the steps (start-up, CLI) {row['summary']['outside_steps_s_median']:.2f}",
                          markup=False)
    console.print("ratio: plain dump size / output size. x ceiling: median of the pairwise ratios against the "
                  "ceiling run just before. x seed: that median divided by the seed's (restores: by "
                  f"{SEED_RESTORE}'s). Restore rows: output = restored database size.", markup=False)


# --- optional: Celery orchestration (--celery) -------------------------------------------------------


def wait_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {path.read_text(errors='replace')[-1500:]}")
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {path.read_text(errors='replace')[-1500:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a process we started in its own session, then SIGKILL whatever is left of that session."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def celery_program(bench: Bench) -> Path:
    return bench.pgbeat.parent / "celery"


def start_celery(bench: Bench, config: Path, role: list[str], log: Path) -> subprocess.Popen:
    env = {**bench.pgbeat_env(bench.workdir / "unused-backups"), "PGBEAT_CONFIG": str(config)}
    env.pop("BACKUP_ROOT")
    with open(log, "wb") as out:
        return subprocess.Popen([str(celery_program(bench)), "-A", "workers.app", *role], cwd=bench.pgbeat_cwd,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def celery_config_file(bench: Bench, path: Path, broker: str, node: str, targets: list[dict[str, Any]]) -> Path:
    config = {"backup_root": str(path.parent / f"{path.stem}-backups"), "timezone": "UTC", "node": node,
              "broker_url": broker, "targets": targets}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def chain_overhead(bench: Bench, folder: Path, broker: str, runs: int, warmup: int = 2) -> dict[str, Any]:
    """Back up an empty database `runs` times through one real worker; overhead = total - the steps' work."""
    target = {**bench.target_entry("bench_default"), "name": "bench_empty", "dbname": "bench_empty"}
    config = celery_config_file(bench, folder / "chain.yaml", broker, "bench", [target])
    log = folder / "worker.log"
    worker = start_celery(bench, config, ["worker", "-l", "INFO", "-c", "2", "-n", "bench@bench",
                                          "--without-mingle", "--without-gossip", "-P", "prefork"], log)
    try:
        wait_log(log, " ready.", worker, 90, "the celery worker")
        env = {**bench.pgbeat_env(folder), "PGBEAT_CONFIG": str(config)}
        env.pop("BACKUP_ROOT")
        python = bench.pgbeat.parent / "python"
        probe = subprocess.run([str(python if python.exists() else sys.executable), str(BENCH_DIR / "celery_probe.py"),
                                "bench_empty", str(runs + warmup), "120"], cwd=bench.pgbeat_cwd, env=env,
                               capture_output=True, text=True, timeout=(runs + warmup) * 130)
    finally:
        stop_process(worker)
    samples = [json.loads(line) for line in probe.stdout.splitlines() if line.startswith("{")]
    bad = [s for s in samples if s["status"] != "succeeded"]
    if probe.returncode != 0 or bad or len(samples) != runs + warmup:
        raise RuntimeError(f"chain runs failed: {bad or probe.stderr.strip()[-1500:]}")
    samples = samples[warmup:]
    for sample in samples:
        sample["steps_sum_s"] = sum(v or 0.0 for v in sample["steps_s"].values())
        sample["overhead_s"] = sample["total_s"] - sample["steps_sum_s"]
    overheads = [s["overhead_s"] for s in samples]
    return {"runs": runs, "warmup_discarded": warmup, "samples": samples,
            "total_s_median": statistics.median(s["total_s"] for s in samples),
            "steps_sum_s_median": statistics.median(s["steps_sum_s"] for s in samples),
            "overhead_s_median": statistics.median(overheads), "overhead_s_min": min(overheads),
            "overhead_s_max": max(overheads)}


def beat_emission(bench: Bench, folder: Path, broker: str, count: int) -> dict[str, Any]:
    """Give beat `count` targets due every minute and time how long the next minute's messages take to be
    in the queue (no worker consumes them)."""
    import redis

    base = bench.target_entry("bench_default")
    targets = [{**base, "name": f"t{i:04d}", "dbname": "bench_empty",
                "tiers": {"daily": {"schedule": "* * * * *"}, "weekly": {"enabled": False},
                          "monthly": {"enabled": False}}} for i in range(count)]
    config = celery_config_file(bench, folder / "beat.yaml", broker, "bench-beat", targets)
    client = redis.Redis.from_url(broker)
    client.flushdb()
    log = folder / "beat.log"
    started = time.time()
    beat = start_celery(bench, config, ["beat", "-l", "INFO"], log)
    first = last = None
    seen = 0
    try:
        wait_log(log, "beat: Starting", beat, 90, "celery beat")
        ready = time.time()
        deadline = time.monotonic() + 135  # the next minute boundary, plus slack
        while time.monotonic() < deadline:
            # Redis priorities: scheduled runs wait in `pgbeat:6` (kombu: one list per priority step).
            seen = sum(client.llen(queue) for queue in ("pgbeat", *(f"pgbeat:{p}" for p in range(1, 10))))
            now = time.time()
            if seen and first is None:
                first = now
            if seen >= count:
                last = now
                break
            time.sleep(0.005)
    finally:
        stop_process(beat)
    if first is None or last is None:
        raise RuntimeError(f"beat queued {seen} of {count} messages in time; keys: {client.keys('*')[:10]}")
    boundary = (first // 60) * 60
    client.flushdb()
    return {"targets": count, "beat_start_s": round(ready - started, 3),
            "last_after_boundary_s": round(last - boundary, 3), "first_to_last_s": round(last - first, 3)}


def celery_sections(bench: Bench, runs: int, beat_targets: int) -> dict[str, Any]:
    """Start a loopback redis-server, measure the chain overhead and beat's emission; never raise."""
    if not shutil.which("redis-server"):
        return {"status": "n/a (redis-server is not installed)"}
    if not celery_program(bench).exists():
        return {"status": f"n/a (no celery beside {bench.pgbeat})"}
    folder = bench.workdir / "celery"
    folder.mkdir(exist_ok=True)
    port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
    result: dict[str, Any] = {"status": "ok", "redis": f"127.0.0.1:{port}"}
    try:
        time.sleep(0.5)
        bench.server.dropdb("bench_empty")
        bench.server.createdb("bench_empty")
        for name, measure_section in (
                ("chain", lambda: chain_overhead(bench, folder, f"redis://127.0.0.1:{port}/0", runs)),
                ("beat", lambda: beat_emission(bench, folder, f"redis://127.0.0.1:{port}/1", beat_targets))):
            note(f"celery: measuring the {name} ...")
            try:
                result[name] = measure_section()
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                result[name] = {"status": "failed", "error": str(exc)}
                result["status"] = "failed"
                note(f"celery {name} FAILED: {exc}")
    finally:
        stop_process(redis_proc)
        with contextlib.suppress(RuntimeError):
            bench.server.dropdb("bench_empty")
    return result


def print_celery(result: dict[str, Any]) -> None:
    console.print("Celery orchestration (loopback Redis, one worker -c 2, an empty database):", markup=False)
    if result.get("status", "").startswith("n/a"):
        console.print(f"  {result['status']}", markup=False)
        return
    chain_result, beat = result.get("chain", {}), result.get("beat", {})
    if "overhead_s_median" in chain_result:
        c = chain_result
        console.print(f"  six-step chain, {c['runs']} runs: total {c['total_s_median'] * 1000:.0f} ms median, "
                      f"steps' own work {c['steps_sum_s_median'] * 1000:.0f} ms, overhead "
                      f"{c['overhead_s_median'] * 1000:.0f} ms median ({c['overhead_s_min'] * 1000:.0f}-"
                      f"{c['overhead_s_max'] * 1000:.0f}); issue's target: under 150 ms", markup=False)
    else:
        console.print(f"  chain: {chain_result.get('error')}", markup=False)
    if "last_after_boundary_s" in beat:
        console.print(f"  beat, {beat['targets']} targets due the same minute: all queued "
                      f"{beat['last_after_boundary_s']:.2f} s after the minute began ({beat['first_to_last_s']:.2f} s "
                      f"from first to last); issue's target: under 2 s", markup=False)
    else:
        console.print(f"  beat: {beat.get('error')}", markup=False)


# --- setup and main ---------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def versions(bench: Bench) -> dict[str, str]:
    env_path = bench.server.env["PATH"]
    which = lambda name: shutil.which(name, path=env_path) or name  # noqa: E731
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {
        "pgbeat": first_line([str(bench.pgbeat), "--version"]), "pg_dump": first_line([which("pg_dump"), "--version"]),
        "server": bench.server.psql("SHOW server_version"), "gzip": first_line([which("gzip"), "--version"]),
        "pigz": first_line([which("pigz"), "--version"]), "zstd": first_line([which("zstd"), "--version"]),
        "bench_commit": commit or "unknown",
    }


def table_bytes(server: Server) -> dict[str, int]:
    query = "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables ORDER BY 2 DESC"
    return {name: int(size) for name, size in (line.split("|") for line in server.psql(query).splitlines())}


def find_pgbeat(option: str | None) -> Path:
    if option:
        return Path(option).resolve()
    beside = Path(sys.executable).parent / "pgbeat"
    if beside.exists():
        return beside
    found = shutil.which("pgbeat")
    if not found:
        raise SystemExit("pgbeat not found: install it in this venv (pip install -e .) or pass --pgbeat PATH")
    return Path(found)


def dsn_server(dsn: str) -> Server:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    mapping = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
               "sslmode": "PGSSLMODE"}
    env = client_env({var: str(params[key]) for key, var in mapping.items() if params.get(key)})
    return Server(env, str(params.get("dbname") or DBNAME))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="database size: tiny ≈ 5 MB (CI smoke test), small ≈ 300 MB, large ≈ 1.5 GB")
    parser.add_argument("--runs", type=int, help="measured pairs per pipeline (default: 1 for tiny, 3 otherwise)")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured runs of each pipeline first (default 0)")
    parser.add_argument("--only", help="comma-separated pipeline names or patterns (fnmatch), e.g. 'pgbeat_*,seed'; "
                                       "the ceiling always runs")
    parser.add_argument("--list", action="store_true", help="list the pipelines and exit")
    parser.add_argument("--keep", action="store_true", help="keep the cluster (stopped) for --reuse")
    parser.add_argument("--reuse", type=Path, metavar="DIR", help="reuse a cluster kept with --keep (no regeneration)")
    parser.add_argument("--dsn", help="benchmark an existing database instead (libpq connection string); "
                                      "restores create and drop databases on that server")
    parser.add_argument("--json", type=Path, metavar="PATH", help="where to write the results "
                                                                  "(default bench/results/<timestamp>.json)")
    parser.add_argument("--workdir", type=Path, help="parent folder for the cluster and outputs (default: $TMPDIR)")
    parser.add_argument("--pgbeat", help="the pgbeat program to measure (default: the one beside this Python)")
    parser.add_argument("--celery", action="store_true",
                        help="also measure the Celery orchestration: a six-step chain's overhead on an empty "
                             "database, and beat emitting --beat-targets targets' tasks (starts redis-server, a "
                             "worker and beat; the beat part waits for the next minute); --only celery runs "
                             "only this")
    parser.add_argument("--celery-runs", type=int, default=20, help="chains measured with --celery (default 20)")
    parser.add_argument("--beat-targets", type=int, default=500, help="targets given to beat (default 500)")
    args = parser.parse_args(argv)
    if args.reuse and args.dsn:
        parser.error("--reuse and --dsn exclude each other")
    if (args.runs is not None and args.runs < 1) or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for p in PIPELINES:
            console.print(f"{p.name:26} {p.kind:8} {p.command}", markup=False)
        return 0
    pipelines = select_pipelines(args.only)
    if args.only and "celery" in [p.strip() for p in args.only.split(",")]:
        args.celery = True
    pgbeat = find_pgbeat(args.pgbeat)
    started = datetime.now(UTC)
    cluster: Cluster | None = None
    keep_dir: Path | None = None
    rows = SIZES[args.size]
    generation_s = None
    if args.reuse:
        keep_dir = args.reuse.resolve()
        kept = json.loads((keep_dir / KEEP_FILE).read_text())
        cluster = Cluster(keep_dir, kept["port"])
        if args.size != kept["size"]:
            note(f"--reuse: the kept cluster holds size {kept['size']}; using that")
        args.size, rows = kept["size"], kept["rows"]
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", cluster.port), timeout=1).close()
            cluster.set_port(free_port())  # the old port is taken by someone else now
        base = keep_dir
    else:
        parent = args.workdir.resolve() if args.workdir else None
        if parent:
            parent.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix=f"pgbeat-bench-{args.size}-", dir=parent))
        base.chmod(0o755)  # the postgres user must reach its data folder
    if args.runs is None:
        args.runs = 1 if args.size == "tiny" else 3
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        if args.dsn:
            server = dsn_server(args.dsn)
            note(f"using the existing database {server.dbname} on {server.host}:{server.port}")
            args.size = "dsn"
        else:
            if cluster is None:
                cluster = Cluster(base)
                settings = {**SERVER_SETTINGS, **(TINY_SETTINGS if args.size == "tiny" else {})}
                note(f"initdb in {cluster.data} (port {cluster.port})")
                cluster.create(settings)
                cluster.start()
                server = cluster.server(DBNAME)
                note(f"generating the {args.size} database: {', '.join(f'{k} {v:,}' for k, v in rows.items())}")
                generation_s = round(generate(server, rows), 1)
                note(f"generated in {generation_s:.1f} s")
            else:
                cluster.start()
                server = cluster.server(DBNAME)
        bench = Bench(server, work, pgbeat)
        bench.detect_features()
        bench.source_rows = server.user_tables()
        # One unmeasured plain dump: the raw size every ratio refers to, and it warms the cache.
        raw = subprocess.run(["bash", "-o", "pipefail", "-c", f"pg_dump -Fp {q(server.dbname)} | wc -c"],
                             env=server.env, capture_output=True, text=True, check=True)
        raw_bytes = int(raw.stdout.strip())
        meta = {
            "started_at": started.isoformat(), "size": args.size, "rows": rows if not args.dsn else None,
            "runs": args.runs, "warmup": args.warmup, "argv": sys.argv[1:], "generation_s": generation_s,
            "database_bytes": int(server.psql(f"SELECT pg_database_size('{server.dbname}')")),
            "raw_dump_bytes": raw_bytes, "source_rows": bench.source_rows,
            "table_bytes": table_bytes(server),
            "features": bench.features, "versions": versions(bench), "machine": machine_info(),
            "server_settings": None if args.dsn else {**SERVER_SETTINGS,
                                                      **(TINY_SETTINGS if args.size == "tiny" else {})},
        }
        note(f"database {human_bytes(meta['database_bytes'])}, plain dump {human_bytes(raw_bytes)}; "
             f"pgbeat {meta['versions']['pgbeat']}; features {bench.features}")
        results = run_pipelines(bench, pipelines, args.runs, args.warmup)
        meta["finished_at"] = datetime.now(UTC).isoformat()
        summarise(results, raw_bytes)
        if results:
            print_table(results, meta)
        celery = celery_sections(bench, args.celery_runs, args.beat_targets) if args.celery else None
        if celery is not None:
            print_celery(celery)
        path = args.json or BENCH_DIR / "results" / f"{started.strftime('%Y%m%d_%H%M%S')}-{args.size}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {"meta": meta, "pipelines": list(results.values()), "celery": celery}
        path.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"results: {path}", markup=False)
        failed = [row["name"] for row in results.values() if row["status"] == "failed"]
        if celery is not None and celery["status"] == "failed":
            failed.append("celery")
        if failed:
            note(f"failed: {', '.join(failed)}")
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cluster is not None:
            cluster.stop()
            if args.keep or args.reuse:
                (base / KEEP_FILE).write_text(json.dumps({"port": cluster.port, "size": args.size, "rows": rows}))
                note(f"cluster kept in {base}: reuse it with --reuse {base}")
        if not (args.keep or args.reuse):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
