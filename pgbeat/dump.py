"""The dump step: run pg_dump under supervision and keep what it wrote under a temporary name.

End of stream is not success: pg_dump's exit code is checked, its stderr kept, and for the plain format
the closing "dump complete" line must be there. The password reaches pg_dump through a 0600 passfile in
the run's private work folder, never through argv. The plain stream passes through Python once, which
counts rows per table, computes the CRC-32 that verify later checks end to end, and writes the file.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

from isal import isal_zlib

from pgbeat.errors import CancelledError, DumpError, PgbeatError, TransientDumpError
from pgbeat.fsutil import disk_error, open_private, private_dir, remove_path, tree_size
from pgbeat.pgclient import client_env
from pgbeat.process import Supervised, find_pg_binary
from pgbeat.run import Run, StepContext
from pgbeat.settings import Settings, Target
from pgbeat.sqlscan import DumpScanner

log = logging.getLogger(__name__)

CHUNK = 1 << 20
FORMAT_FLAGS = {"plain": "p", "custom": "c", "directory": "d"}
# Failures worth retrying later: the server is down, starting, overloaded or unreachable for now.
TRANSIENT_MARKERS = (
    "connection refused", "could not connect to server", "timeout expired", "connection timed out",
    "the database system is starting up", "the database system is shutting down", "no route to host",
    "server closed the connection unexpectedly", "too many connections", "is the server running",
    "could not translate host name", "the database system is in recovery mode",
)


def pg_dump_version(settings: Settings) -> str:
    out = subprocess.run([find_pg_binary("pg_dump", settings.pg_bin_dir), "--version"], capture_output=True,
                         text=True, timeout=30)
    match = re.search(r"(\d+(?:\.\d+)+)", out.stdout)
    return match.group(1) if match else out.stdout.strip()


def dump_argv(settings: Settings, target: Target, output: Path | None) -> list[str]:
    argv = [find_pg_binary("pg_dump", settings.pg_bin_dir), "--dbname", target.conninfo(), "--no-password",
            "--format", FORMAT_FLAGS[target.format]]
    if target.format != "plain":
        codec, level = target.compression.codec, target.compression.level
        # Custom and directory archives compress themselves; PG 15's pg_dump knows gzip only.
        argv += ["--compress", "0" if codec == "none" else (f"zstd:{level}" if codec == "zstd" else str(level))]
        argv += ["--file", str(output)]
    if target.format == "directory":
        argv += ["--jobs", str(target.jobs)]
    return [*argv, *target.pg_dump_options]


def classify_failure(target: Target, rc: int, stderr: list[str], step: str = "dump") -> PgbeatError:
    """Turn a failed pg_dump into a transient (retry later) or permanent error naming the target."""
    text = "\n".join(stderr).lower()
    message = f"pg_dump of {target.name} ({target.describe()}) failed with exit code {rc}"
    details = stderr[-8:] or ["(pg_dump wrote nothing on stderr)"]
    if "password authentication failed" in text or "no password supplied" in text:
        return DumpError(message, step=step, details=details,
                         hint="check the password (DB_PASSWORD, the target's password or ~/.pgpass)")
    if any(marker in text for marker in TRANSIENT_MARKERS):
        return TransientDumpError(message, step=step, details=details,
                                  hint="the database server could not be reached; pgbeat retries with backoff")
    return DumpError(message, step=step, details=details)


def dump_step(ctx: StepContext, run: Run) -> Run:
    """Dump the run's target into its work folder; return the record with `steps.dump` filled in.

    Raise DumpError (or TransientDumpError) if pg_dump fails or the dump is incomplete, CancelledError
    if the run was cancelled; in every case no partial output is left behind.
    """
    target = ctx.target(run)
    work = private_dir(run.work())
    output = run.work(run.name) if target.format != "plain" else run.work("dump.sql")
    remove_path(output)  # a previous, interrupted attempt of this run
    env = client_env(target, work)
    started, t0 = ctx.now(), time.monotonic()
    scanner = DumpScanner() if target.format == "plain" else None
    crc = 0
    proc = None
    try:
        proc = Supervised(dump_argv(ctx.settings, target, output), env=env, cancel=ctx.cancel, name="pg_dump",
                          stdout=subprocess.PIPE if scanner else subprocess.DEVNULL)
        if scanner is not None:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            try:
                with open_private(output) as out:
                    while n := proc.stdout.readinto(buf):
                        chunk = view[:n]
                        out.write(chunk)
                        crc = isal_zlib.crc32(chunk, crc)
                        scanner.feed(chunk)
            except OSError as exc:
                raise disk_error(exc, output) from None
            scanner.finish()
        rc = proc.wait()
        if ctx.cancel.is_set():
            raise CancelledError(f"Dump of {target.name} cancelled: {ctx.cancel.reason}", step="dump")
        if rc != 0:
            raise classify_failure(target, rc, proc.stderr_text())
        if scanner is not None and not scanner.complete:
            raise DumpError(f"pg_dump of {target.name} exited 0 but its output lacks the closing "
                            "'dump complete' line", step="dump", details=proc.stderr_text()[-8:])
    except BaseException:
        # Includes Celery's SoftTimeLimitExceeded: stop pg_dump, then remove what it wrote.
        if proc is not None:
            proc.stop()
        remove_path(output)
        raise
    finally:
        remove_path(work / ".pgpass")
    size = tree_size(output)
    info = {
        "path": str(output), "size": size, "started_at": started.isoformat(),
        "duration_s": round(time.monotonic() - t0, 3), "pg_dump_version": pg_dump_version(ctx.settings),
        "warnings": proc.stderr_text()[-8:],
    }
    if scanner is not None:
        info.update(raw_size=size, raw_crc32=f"{crc:08x}", tables=scanner.tables, complete=True,
                    server_version=scanner.server_version)
    log.info("dump of %s done: %d bytes in %.1fs", target.name, size, info["duration_s"])
    run.steps["dump"] = info
    return run
