"""The dump step: run pg_dump under supervision and keep what it wrote under a temporary name.

End of stream is not success: pg_dump's exit code is checked, its stderr kept, and for the plain format
the closing "dump complete" line must be there. The password reaches pg_dump through a passfile held in
memory (pgbeat.postgres.client), never through argv. The plain stream passes through Python once, which
counts rows per table, computes the CRC-32 that verify later checks end to end, and writes the file.
Run again with the same record, the step starts over: what an interrupted attempt wrote is removed first.
Beside the dump, the step writes the globals of the server (roles, memberships, role settings,
tablespaces: pgbeat.postgres.globals), which verify, upload, rotation and restore treat as part of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
from pathlib import Path

from isal import isal_zlib

from pgbeat import faults
from pgbeat.catalog.manifest import GlobalsInfo, new_globals_name
from pgbeat.errors import CancelledError, DumpError, PgbeatError, TransientDumpError
from pgbeat.fsutil import CHUNK, disk_error, open_private, private_dir, remove_path, tree_size
from pgbeat.pipeline.record import DumpResult, Run, StepContext
from pgbeat.postgres.client import client_env, connect
from pgbeat.postgres.clients import ClientChoice, client_for_server
from pgbeat.postgres.clock import SKEW_WARNING, PendingReading
from pgbeat.postgres.globals import NO_PASSWORDS_WARNING, dump_globals, is_superuser, used_roles
from pgbeat.postgres.lockwatch import DumpProgress, LockWatch
from pgbeat.postgres.process import CancelEvent, Supervised, last_error_line
from pgbeat.postgres.sqlscan import DumpScanner
from pgbeat.postgres.standby import backup_source, replay_paused
from pgbeat.runlog import human_size
from pgbeat.settings import Settings, Target
from pgbeat.steps.compress import BLOCK, BlockWriter, write_block_index
from pgbeat.steps.tablefiles import TableFileCompressor, facts_path

log = logging.getLogger(__name__)

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
FORMAT_FLAGS = {"plain": "p", "custom": "c", "directory": "d"}
# Failures worth retrying later: the server is down, starting, overloaded or unreachable for now.
TRANSIENT_MARKERS = (
    "connection refused", "could not connect to server", "timeout expired", "connection timed out",
    "the database system is starting up", "the database system is shutting down", "no route to host",
    "server closed the connection unexpectedly", "too many connections", "is the server running",
    "could not translate host name", "the database system is in recovery mode",
)
DUMP_RUNNING = faults.declare("dump.running", "pg_dump runs; its output file may be empty")
DUMP_STREAMING = faults.declare("dump.streaming", "part of pg_dump's output has been read: a partial dump "
                                                  "is in the work folder")


def compresses_table_files(target: Target) -> bool:
    """A gzip directory archive: pg_dump writes its table files plain and pgbeat compresses them
    (pgbeat.steps.tablefiles), faster than pg_dump's zlib and on the cores pg_dump leaves idle."""
    return target.format == "directory" and target.compression.codec == "gzip"


def dump_argv(pg_dump: str, target: Target, output: Path | None) -> list[str]:
    """The command line of `pg_dump` (the client chosen for the target's server) dumping `target`."""
    argv = [pg_dump, "--dbname", target.conninfo(), "--no-password",
            "--format", FORMAT_FLAGS[target.format]]
    if target.format != "plain":
        codec, level = target.compression.codec, target.compression.level
        # A custom archive compresses itself (PG 15's pg_dump knows gzip only); see compresses_table_files.
        plain_files = codec == "none" or compresses_table_files(target)
        argv += ["--compress", "0" if plain_files else (f"zstd:{level}" if codec == "zstd" else str(level))]
        argv += ["--file", str(output)]
    if target.format == "directory":
        argv += ["--jobs", str(target.jobs)]
    return [*argv, *target.pg_dump_options]


def classify_failure(target: Target, rc: int | None, stderr: list[str], step: str = "dump",
                     program: str = "pg_dump") -> PgbeatError:
    """Turn a failed pg_dump (or pg_basebackup), or with `rc` None a failed connection before it (asking
    the server's version), into a transient (retry later) or permanent error naming the target."""
    text = "\n".join(stderr).lower()
    message = (f"{program} of {target.name} ({target.describe()}) failed with exit code {rc}" if rc is not None
               else f"{program} of {target.name} ({target.describe()}) did not start: the server could not be "
                    "asked its version")
    details = stderr[-8:] or [f"({program} wrote nothing on stderr)"]
    reason = last_error_line(stderr) or details[-1]
    if "password authentication failed" in text or "no password supplied" in text:
        return DumpError(message, step=step, details=details, reason=reason,
                         hint="check the password (DB_PASSWORD, the target's password or ~/.pgpass)")
    if any(marker in text for marker in TRANSIENT_MARKERS):
        return TransientDumpError(message, step=step, details=details, reason=reason,
                                  hint="the database server could not be reached; pgbeat retries with backoff")
    return DumpError(message, step=step, details=details, reason=reason)


def client_for_target(settings: Settings, target: Target, program: str = "pg_dump",
                      step: str = "dump") -> ClientChoice:
    """Ask `target`'s server its major and return the client programs for it (pgbeat.postgres.clients).
    A server that cannot be reached fails like pg_dump failing to connect: transient or not by libpq's
    words, which are kept in the details."""
    try:
        return client_for_server(settings, target)
    except PgbeatError as exc:
        libpq = exc.__context__  # connect() keeps libpq's last line; the whole text says what happened
        if libpq is None:
            raise  # no client fits the server: said by the chooser
        # Indentation kept: it marks libpq's continuation lines, which last_error_line passes over.
        lines = [line.rstrip() for line in str(libpq).splitlines() if line.strip()]
        raise classify_failure(target, None, lines or [exc.message], step, program) from None


def widen_pipe(pipe) -> None:
    """Give pg_dump a 1 MiB pipe (Linux), so it keeps writing while this side compresses or scans."""
    # Over /proc/sys/fs/pipe-max-size, or not Linux: then the default pipe still works.
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, CHUNK)


def _stream_file(pipe, out, scanner: DumpScanner) -> int:
    """Copy the dump from `pipe` to `out`, scanning it; return its CRC-32."""
    crc, buf = 0, bytearray(CHUNK)
    view = memoryview(buf)
    first = True
    while n := pipe.readinto(buf):
        chunk = view[:n]
        out.write(chunk)
        crc = isal_zlib.crc32(chunk, crc)
        scanner.feed(chunk)
        if first:
            out.flush()
            faults.fault_point(DUMP_STREAMING)
            first = False
    return crc


def stream_blocks(pipe, writer: BlockWriter, scanner: DumpScanner | None = None) -> int:
    """Read a stream from `pipe` straight into fresh block buffers handed to `writer` (no copies: this
    thread's time is the stream's limit), scanning it if a dump `scanner` is given; return its CRC-32."""
    crc = 0
    while True:
        block = bytearray(BLOCK)
        view, filled = memoryview(block), 0
        while filled < BLOCK and (n := pipe.readinto(view[filled:filled + CHUNK])):
            crc = isal_zlib.crc32(view[filled:filled + n], crc)
            if scanner is not None:
                scanner.feed(block, filled, filled + n)
            filled += n
        if filled:
            writer.write_block(block if filled == BLOCK else view[:filled])
            faults.fault_point(DUMP_STREAMING)
        if filled < BLOCK:
            return crc


def abandon(output: Path, writer: BlockWriter | None, proc: Supervised | None, reading,
            compressor: TableFileCompressor | None = None) -> None:
    """Stop what still runs of a failed dump (the block writer, the client program, the clock reading, the
    table files' compressor), then remove what it wrote."""
    if writer is not None:
        writer.abort()
    for running in (proc, reading, compressor):
        if running is not None:
            running.stop()
    remove_path(output)
    remove_path(facts_path(output))


def dump_progress(scanner: DumpScanner | None, output: Path) -> str:
    """How far a dump is: the SQL read and rows counted so far (plain), else what is on disk."""
    if scanner is not None:
        return f"dump: {human_size(scanner.size)} of SQL, {sum(list(scanner.tables.values())):,} rows so far"
    return f"dump: {human_size(tree_size(output))} written so far"


def dump_server_globals(target: Target, run: Run, client: ClientChoice, env: dict[str, str],
                        cancel: CancelEvent | None) -> tuple[GlobalsInfo | None, str | None]:
    """Dump the globals of `target`'s server into the run's work folder (pgbeat.postgres.globals); return
    their record, or None and why they could not be dumped: the backup itself still restores onto a server
    that has its roles, so that is a warning on it, not a failure of the run."""
    path = run.work(new_globals_name(run.name, run.codec))
    remove_path(path)  # a previous, interrupted attempt of this run
    try:
        with connect(target) as conn:
            superuser, needed = is_superuser(conn), used_roles(conn)
        info = dump_globals(client.program("pg_dumpall"), target, env, path, run.codec, run.level,
                            passwords=superuser, used=needed, cancel=cancel)
    except PgbeatError as exc:
        remove_path(path)
        if cancel is not None and cancel.is_set():  # pg_dumpall was stopped: the run is cancelled, not warned
            raise CancelledError(f"Dump of {target.name} cancelled: {cancel.reason}", step="dump") from None
        log.warning("%s: the server's globals could not be dumped: %s", target.name, exc.message)
        return None, f"the server's globals could not be dumped: {exc.message}"
    if not superuser:
        log.warning("%s: %s", target.name, NO_PASSWORDS_WARNING)
    return info, None


def database_record(target: Target) -> dict | None:
    """The dumped database's properties (pgbeat.postgres.database) for the manifest, or None when the
    server cannot be asked now (the backup is whole without them: a restore then creates the database
    with the server's defaults)."""
    import psycopg

    from pgbeat.postgres.client import connect
    from pgbeat.postgres.database import database_properties

    try:
        with connect(target) as conn:
            found = database_properties(conn, target.dbname)
    except (PgbeatError, psycopg.Error) as exc:  # only a restore into a new database needs them
        log.warning("%s: could not read the database's properties (%s)", target.name, exc)
        return None
    return found.record() if found is not None else None


def dump_step(ctx: StepContext, run: Run) -> Run:
    """Dump the run's target into its work folder; return the record with `steps.dump` filled in.

    A plain dump streams through this process once: rows are counted per table and a CRC-32 taken (which
    verify checks end to end), and the bytes go either to `dump.sql` for the compress step, or, with
    `streaming`, straight into the compressed backup (no uncompressed copy on disk).
    Raise DumpError (or TransientDumpError) if pg_dump fails or the dump is incomplete, CancelledError
    if the run was cancelled; in every case no partial output is left behind.
    """
    source = backup_source(ctx.target(run))
    if source.note:
        log.warning("%s: %s", run.target, source.note)
    target = source.server  # the standby prefer_standby chose, or the target's own server
    work = private_dir(run.work())
    streaming = target.format == "plain" and target.streaming and run.codec != "none"
    output = run.work(run.name) if target.format != "plain" or streaming else run.work("dump.sql")
    remove_path(output)  # a previous, interrupted attempt of this run
    remove_path(facts_path(output))
    env = client_env(target, work)
    started, t0 = ctx.now(), time.monotonic()
    scanner = DumpScanner() if target.format == "plain" else None
    crc = 0
    proc = writer = reading = compressor = watch = progress = client = None
    pause = contextlib.ExitStack()  # the standby's replay, paused while pg_dump and pg_dumpall read it
    try:
        pause_note = pause.enter_context(replay_paused(ctx.settings.backup_root, ctx.target(run), source))
        client = client_for_target(ctx.settings, target)
        if client.note:
            log.info("%s: %s", target.name, client.note)
        argv = dump_argv(client.program("pg_dump"), target, output)
        if compresses_table_files(target):
            # pg_dump fills an empty folder that exists; the watch on it must be there before the first file.
            compressor = TableFileCompressor(private_dir(output), run.codec, run.level, target.compression.threads)
            compressor.start()
        proc = Supervised(argv, env=env, cancel=ctx.cancel, name="pg_dump",
                          stdout=subprocess.PIPE if scanner else subprocess.DEVNULL)
        # The server's clock dates the backup; read beside pg_dump, so the dump never waits for it.
        reading = PendingReading(target, env, ctx.now, argv[0])
        if ctx.on_wait is not None:  # someone watches: say it if pg_dump is blocked on a lock
            watch = LockWatch(target, ctx.on_wait).start()
        if ctx.on_progress is not None:
            progress = DumpProgress(lambda: dump_progress(scanner, output), ctx.on_progress).start()
        faults.fault_point(DUMP_RUNNING)
        if scanner is not None:
            widen_pipe(proc.stdout)
            try:
                with open_private(output) as out:
                    if streaming:
                        writer = BlockWriter(out, run.codec, run.level, target.compression.threads, check=True)
                        crc = stream_blocks(proc.stdout, writer, scanner)
                        writer.close()
                        out.flush()
                        os.fsync(out.fileno())
                    else:
                        crc = _stream_file(proc.stdout, out, scanner)
            except OSError as exc:
                raise disk_error(exc, output) from None
            scanner.finish()
        rc = proc.wait()
        clock = reading.result()
        if ctx.cancel.is_set():
            raise CancelledError(f"Dump of {target.name} cancelled: {ctx.cancel.reason}", step="dump")
        if rc != 0:
            raise classify_failure(target, rc, proc.stderr_text())
        if scanner is not None and not scanner.complete:
            raise DumpError(f"pg_dump of {target.name} exited 0 but its output lacks the closing "
                            "'dump complete' line", step="dump", details=proc.stderr_text()[-8:],
                            reason=last_error_line(proc.stderr_text()))
        if compressor is not None:
            try:
                compressor.finish()
            except OSError as exc:
                raise disk_error(exc, output) from None
        server_globals, globals_note = (dump_server_globals(target, run, client, env, ctx.cancel)
                                        if run.keeps_globals else (None, None))
        properties = database_record(target)
    except BaseException:
        # Includes Celery's SoftTimeLimitExceeded: stop pg_dump, then remove what it wrote.
        abandon(output, writer, proc, reading, compressor)
        raise
    finally:
        for thread in (watch, progress):
            if thread is not None:
                thread.stop()
        remove_path(work / ".pgpass")
        pause.close()
    if pause_note:
        log.warning("%s: %s", run.target, pause_note)
    size = tree_size(output)
    info = DumpResult(path=str(output), size=size, started_at=started, duration_s=round(time.monotonic() - t0, 3),
                      pg_dump_version=client.client.version, client_dir=str(client.client.bin_dir),
                      client_note=client.note, warnings=proc.stderr_text()[-8:], source=target.describe(),
                      source_note="; ".join(filter(None, [source.note, pause_note])) or None,
                      globals=server_globals, globals_note=globals_note, properties=properties)
    if clock is not None:
        info.clock, info.server_time, info.clock_skew_s = clock, clock.server_time, clock.skew_s
        if abs(clock.skew_s) > SKEW_WARNING.total_seconds():
            log.warning("the clock of %s is %+.0f s off the database server's (%s)", ctx.settings.node,
                        clock.skew_s, target.describe())
    else:
        info.clock_error = reading.error
        log.warning("could not read the database server's clock for %s: %s", target.name, reading.error)
    if scanner is not None:
        info.raw_size, info.raw_crc32, info.tables = scanner.size, f"{crc:08x}", scanner.tables
        info.complete, info.server_version = True, scanner.server_version
    if writer is not None:
        write_block_index(output, writer.sizes)
        info.compressed, info.codec, info.blocks, info.blocks_checked = True, run.codec, len(writer.sizes), True
        info.sha256 = writer.sha256.hexdigest()
    log.info("dump of %s done: %d bytes in %.1fs%s", target.name, size, info.duration_s,
             " (compressed while streaming)" if writer is not None else "")
    run.steps.dump = info
    return run
