"""Physical base backups (the `base` tier): the dump step's and the verify step's physical side.

The dump step of a base backup runs `pg_basebackup --format tar --pgdata -` and compresses its stream as
it arrives, in the same checked blocks as a streaming logical dump (pgbeat.steps.compress.BlockWriter): no
uncompressed copy of the cluster is ever on disk. With `--pgdata -` PostgreSQL puts the WAL the backup
needs (`--wal-method fetch`) and its `backup_manifest` into the one tar stream, so the stored file alone
restores a consistent cluster; a cluster with extra tablespaces cannot be written to one stream and is
refused by pg_basebackup (the message says so).

Verification unpacks the backup into a scratch folder and runs `pg_verifybackup` on it (every file's
SHA-256 against the backup manifest, and the WAL from start to end point parsed), then checks that the
`backup_label` inside is the one pg_basebackup reported: the file restores, not only decompresses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard
from isal import isal_zlib

from pgbeat import faults
from pgbeat.catalog.manifest import ChainInfo, PhysicalInfo
from pgbeat.errors import CancelledError, DumpError, PgbeatError, VerifyError
from pgbeat.fsutil import CHUNK, disk_error, open_private, private_dir, remove_path, tree_size
from pgbeat.pipeline.record import DumpResult, Run, StepContext, scratch_folder
from pgbeat.postgres.client import client_env
from pgbeat.postgres.clients import client_for_major, major_of
from pgbeat.postgres.clock import PendingReading, ask_server_time
from pgbeat.postgres.process import Supervised
from pgbeat.postgres.standby import backup_source
from pgbeat.settings import Settings, Target
from pgbeat.steps.compress import BlockWriter, decompressing_reader, write_block_index
from pgbeat.steps.dump import abandon, classify_failure, client_for_target, stream_blocks, widen_pipe

log = logging.getLogger(__name__)

BASE_RUNNING = faults.declare("basebackup.running", "pg_basebackup runs; the compressed tar may be partial")
START_RE = re.compile(r"write-ahead log start point: (?P<lsn>[0-9A-F]+/[0-9A-F]+) on timeline (?P<tli>\d+)")
END_RE = re.compile(r"write-ahead log end point: (?P<lsn>[0-9A-F]+/[0-9A-F]+)")
LABEL_START_RE = re.compile(r"^START WAL LOCATION: (?P<lsn>\S+) \(file (?P<file>[0-9A-F]{24})\)$", re.M)
LABEL_TIMELINE_RE = re.compile(r"^START TIMELINE: (?P<tli>\d+)$", re.M)
LABEL_TIME_RE = re.compile(r"^START TIME: (?P<time>.+)$", re.M)
# What pg_basebackup and the server say when they refuse an incremental backup (WAL summaries missing or not
# yet written, a manifest of another cluster or timeline): then a full base backup is taken instead.
INCREMENTAL_REFUSED = ("incremental", "summar", "manifest", "system identifier", "timeline")


def base_backup_argv(pg_basebackup: str, target: Target, label: str, incremental: Path | None = None) -> list[str]:
    """pg_basebackup's command line; with `incremental`, the parent's backup_manifest, an incremental one."""
    extra = [f"--incremental={incremental}"] if incremental is not None else []
    return [pg_basebackup, "--dbname", target.conninfo(), "--no-password",
            "--pgdata", "-", "--format", "tar", "--wal-method", "fetch", "--checkpoint", "fast",
            "--manifest-checksums", "SHA256", "--label", label, "--verbose", *extra]


def plan_chain(ctx: StepContext, run: Run, target: Target) -> tuple[ChainInfo | None, Path | None, str | None]:
    """Decide whether this base backup is full or incremental (pgbeat.physical.incremental): return what its
    manifest records of the chain (None: the tier takes full backups only), the parent's backup_manifest
    taken out into the work folder (None: full), and why a tier asking for incrementals takes a full one."""
    from pgbeat.physical.incremental import (
        choose_parent,
        extract_backup_manifest,
        server_facts,
        system_identifier_problem,
    )
    from pgbeat.physical.pitr import base_backups

    policy = ctx.target(run).tiers.get(run.tier)
    if policy is None or policy.full_every_days is None:
        return None, None, None
    try:
        facts = server_facts(target)
    except PgbeatError:
        facts = None  # pg_basebackup says what is wrong with the server
    try:
        now = ask_server_time(target)
    except PgbeatError:
        now = ctx.now()
    entries = [e for e in base_backups(ctx.settings, run.target) if e.manifest.tier == run.tier]
    choice = choose_parent(entries, policy.full_every_days, now, facts, encrypted=target.encryption is not None)
    log.info("%s: base backup %s: %s", run.target, run.name, choice.reason)
    if choice.parent is None:
        return choice.chain, None, choice.note
    parent = choice.parent
    try:
        manifest_file = extract_backup_manifest(parent.path, parent.manifest.codec,
                                                run.work() / "parent.backup_manifest")
    except VerifyError as exc:
        return ChainInfo(kind="full"), None, f"{exc.message}: this base backup is full"
    if problem := system_identifier_problem(manifest_file, facts):
        remove_path(manifest_file)
        return ChainInfo(kind="full"), None, f"{parent.path.name} is not of this server ({problem}): this base " \
                                             "backup is full"
    return choice.chain, manifest_file, None


def _stream_raw(pipe, out) -> str:
    """Copy an uncompressed tar stream to `out`; return its SHA-256."""
    import hashlib

    sha256, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    while n := pipe.readinto(buf):
        out.write(view[:n])
        sha256.update(view[:n])
    return sha256.hexdigest()


def wal_range(stderr: list[str]) -> tuple[str, int, str]:
    """Given pg_basebackup's --verbose lines, return (start LSN, timeline, end LSN). Raise DumpError if
    they are not there (pg_basebackup exited 0 without saying where the backup's WAL is)."""
    text = "\n".join(stderr)
    start, end = START_RE.search(text), END_RE.search(text)
    if not (start and end):
        raise DumpError("pg_basebackup ended without reporting the backup's write-ahead log start and end "
                        "points", step="dump", details=stderr[-8:])
    return start["lsn"], int(start["tli"]), end["lsn"]


def base_backup_step(ctx: StepContext, run: Run) -> Run:
    """Take a physical base backup of the run's target's cluster into its work folder, compressed as it
    streams; return the record with `steps.dump` filled in (its `physical` part: the WAL range). With the
    tier's `full_every_days`, it is incremental when `plan_chain` says so (`steps.dump.chain`), and full,
    with `incremental_note` saying why, if pg_basebackup refuses the incremental.

    Raise DumpError (TransientDumpError for a server that is down) if pg_basebackup fails, CancelledError
    if the run was cancelled; in every case no partial output is left behind.
    """
    source = backup_source(ctx.target(run))
    if source.note:
        log.warning("%s: %s", run.target, source.note)
    target = source.server  # the standby prefer_standby chose (pg_basebackup reads a standby too), or the primary
    work = private_dir(run.work())
    output = run.work(run.name)
    remove_path(output)  # a previous, interrupted attempt of this run
    chain, parent_manifest, chain_note = plan_chain(ctx, run, target)
    try:
        return take_base_backup(ctx, run, source, target, work, output, chain, parent_manifest, chain_note)
    except DumpError as exc:
        said = " ".join([exc.message, *exc.details]).lower()
        if parent_manifest is None or ctx.cancel.is_set() or exc.transient or \
                not any(marker in said for marker in INCREMENTAL_REFUSED):
            raise  # a failure of its own (a password, the disk): a full one would fail the same way
        # An incremental the server refuses (its WAL summaries gone since, another cluster): a full one,
        # which restores alone, rather than no base backup at all.
        note = f"pg_basebackup --incremental failed ({exc.reason or exc.message}): this base backup is full"
        log.warning("%s: %s", run.target, note)
        return take_base_backup(ctx, run, source, target, work, output, ChainInfo(kind="full"), None, note)
    finally:
        if parent_manifest is not None:
            remove_path(parent_manifest)


def take_base_backup(ctx: StepContext, run: Run, source, target: Target, work: Path, output: Path,
                     chain: ChainInfo | None, parent_manifest: Path | None, chain_note: str | None) -> Run:
    """Run pg_basebackup into `output` (incremental to `parent_manifest` if given); see base_backup_step."""
    remove_path(output)
    env = client_env(target, work)
    started, t0 = ctx.now(), time.monotonic()
    proc = writer = reading = client = None
    sha256 = None
    try:
        # pg_basebackup, like pg_dump, must be of the server's major or newer.
        client = client_for_target(ctx.settings, target, "pg_basebackup")
        argv = base_backup_argv(client.program("pg_basebackup"), target, f"pgbeat {run.name}", parent_manifest)
        proc = Supervised(argv, env=env, cancel=ctx.cancel, name="pg_basebackup", stdout=subprocess.PIPE)
        reading = PendingReading(target, env, ctx.now, argv[0])
        faults.fault_point(BASE_RUNNING)
        widen_pipe(proc.stdout)
        try:
            with open_private(output) as out:
                if run.codec == "none":
                    sha256 = _stream_raw(proc.stdout, out)
                else:
                    writer = BlockWriter(out, run.codec, run.level, target.compression.threads, check=True)
                    stream_blocks(proc.stdout, writer)
                    writer.close()
                    sha256 = writer.sha256.hexdigest()
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise disk_error(exc, output) from None
        rc = proc.wait()
        clock = reading.result()
        if ctx.cancel.is_set():
            raise CancelledError(f"Base backup of {target.name} cancelled: {ctx.cancel.reason}", step="dump")
        if rc != 0:
            raise classify_failure(target, rc, proc.stderr_text(), program="pg_basebackup")
        start_lsn, timeline, end_lsn = wal_range(proc.stderr_text())
    except BaseException:
        abandon(output, writer, proc, reading)
        raise
    finally:
        remove_path(work / ".pgpass")
    duration = round(time.monotonic() - t0, 3)
    try:
        stop_time = ask_server_time(target)  # the backup is consistent from here on, by the data's clock
    except PgbeatError:
        skew = clock.skew_s if clock is not None else 0.0
        stop_time = ctx.now() - timedelta(seconds=skew)
    info = DumpResult(path=str(output), size=tree_size(output), started_at=started, duration_s=duration,
                      warnings=proc.stderr_text()[-8:], complete=True, compressed=run.codec != "none",
                      codec=run.codec, sha256=sha256, blocks_checked=writer is not None,
                      physical=PhysicalInfo(timeline=timeline, start_lsn=start_lsn, end_lsn=end_lsn,
                                            stop_time=stop_time,
                                            client_version=client.client.version),
                      client_dir=str(client.client.bin_dir), client_note=client.note,
                      source=target.describe(), source_note=source.note, chain=chain,
                      incremental_note=chain_note)
    if writer is not None:
        write_block_index(output, writer.sizes)
        info.blocks = len(writer.sizes)
    if clock is not None:
        info.clock, info.server_time, info.clock_skew_s = clock, clock.server_time, clock.skew_s
    else:
        info.clock_error = reading.error
    kind = f"incremental to {chain.parent}" if chain is not None and chain.incremental else "full"
    log.info("base backup of %s done (%s): %d bytes in %.1fs (WAL %s to %s on timeline %d)", target.name, kind,
             info.size, duration, start_lsn, end_lsn, timeline)
    run.steps.dump = info
    return run


# --- unpacking and verifying --------------------------------------------------------------------------------


def unpack_base(path: Path, codec: str, dest: Path) -> None:
    """Unpack the base backup `path` (a tar compressed with `codec`) into the new folder `dest` (0700).
    Raise VerifyError if it does not decompress or is not a whole tar."""
    private_dir(dest)
    tar = subprocess.Popen(["tar", "--extract", "--file", "-", "--directory", str(dest), "--no-same-owner"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    problem = None
    try:
        with decompressing_reader(path, codec) as f:
            while chunk := f.read(CHUNK):
                tar.stdin.write(chunk)
    except BrokenPipeError:
        problem = "tar stopped reading"
    except (OSError, EOFError, ValueError, isal_zlib.error, zstandard.ZstdError) as exc:
        problem = f"it does not decompress: {exc}"
    finally:
        with contextlib.suppress(BrokenPipeError):
            tar.stdin.close()
        rc = tar.wait()
    if problem or rc != 0:
        detail = tar.stderr.read().decode(errors="replace").strip().splitlines()[-4:]
        raise VerifyError(f"{path.name} cannot be unpacked: {problem or f'tar exited with code {rc}'}",
                          step="verify", details=detail, hint="the file is truncated or corrupt; do not restore "
                                                              "from it")


def read_label(data: Path) -> dict[str, Any]:
    """Return the start of WAL, the timeline and the start time that `data/backup_label` records."""
    try:
        text = (data / "backup_label").read_text()
    except OSError:
        raise VerifyError("the base backup has no backup_label", step="verify") from None
    start, timeline, when = LABEL_START_RE.search(text), LABEL_TIMELINE_RE.search(text), LABEL_TIME_RE.search(text)
    if not (start and timeline):
        raise VerifyError("the base backup's backup_label does not say where its WAL starts", step="verify")
    start_time = None
    if when:
        try:
            start_time = datetime.strptime(when["time"].strip(), "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC)
        except ValueError:
            start_time = None  # a zone other than UTC: the manifest's server_time dates the backup anyway
    return {"start_lsn": start["lsn"], "start_wal": start["file"], "timeline": int(timeline["tli"]),
            "start_time": start_time}


def verifybackup(settings: Settings, data: Path) -> None:
    """Run pg_verifybackup (of the backup's major or newer) on the unpacked backup `data`; raise
    VerifyError with its complaints."""
    major = major_of((data / "PG_VERSION").read_text()) if (data / "PG_VERSION").exists() else 0
    pg_verifybackup = client_for_major(settings, None, major, f"a base backup of PostgreSQL {major}",
                                       "pg_verifybackup").program("pg_verifybackup")
    argv = [pg_verifybackup, "--quiet", str(data)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        raise VerifyError(f"pg_verifybackup found the base backup damaged (exit code {out.returncode})",
                          step="verify", details=lines[-8:], hint="do not restore from it; take a new base backup")


def check_base(path: Path, codec: str, settings: Settings) -> dict[str, Any]:
    """Unpack the base backup `path` into a scratch folder and verify it with pg_verifybackup; return
    its digests, its server's major version and its WAL range as the backup itself records it."""
    from pgbeat.steps.verify import file_digests

    digests = file_digests(path)
    with scratch_folder(settings, "unpack") as folder:
        data = folder / "data"
        unpack_base(path, codec, data)
        verifybackup(settings, data)
        label = read_label(data)
        try:
            ranges = json.loads((data / "backup_manifest").read_text())["WAL-Ranges"]
            end_lsn = ranges[-1]["End-LSN"]
        except (OSError, ValueError, KeyError, IndexError):
            raise VerifyError("the base backup's backup_manifest has no WAL range", step="verify") from None
        version = (data / "PG_VERSION").read_text().strip() if (data / "PG_VERSION").exists() else None
    return {**digests, "complete": True, "server_version": version, "label": label, "end_lsn": end_lsn}


def physical_problems(result: dict[str, Any], recorded: PhysicalInfo | None) -> list[str]:
    """Given what verify found in a base backup and what its dump step recorded, return the differences."""
    if recorded is None:
        return ["the dump step recorded no WAL range for this base backup"]
    label = result["label"]
    problems = []
    if (label["start_lsn"], label["timeline"]) != (recorded.start_lsn, recorded.timeline):
        problems.append(f"its backup_label starts at {label['start_lsn']} on timeline {label['timeline']}, "
                        f"pg_basebackup reported {recorded.start_lsn} on timeline {recorded.timeline}")
    if result["end_lsn"] != recorded.end_lsn:
        problems.append(f"its manifest's WAL ends at {result['end_lsn']}, pg_basebackup reported {recorded.end_lsn}")
    return problems


def physical_info(result: dict[str, Any], recorded: PhysicalInfo) -> PhysicalInfo:
    """The manifest's WAL range: what pg_basebackup reported, with what only the backup_label knows."""
    label = result["label"]
    return recorded.model_copy(update={"start_wal": label["start_wal"], "start_time": label["start_time"]})
