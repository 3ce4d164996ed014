"""The verify step: prove a backup is whole before it gets a final name, and write its manifest.

For a plain dump: decompress the whole file (what `gzip -t` checks, with ISA-L checking each CRC-32),
compare the decompressed size and CRC-32 with what pg_dump wrote (so compression lost nothing), check
pg_dump's closing line is there, and compute MD5 (as the seed logs) and SHA-256 of the stored file.
For custom and directory archives: `pg_restore -f -` reads and decompresses every entry, and its
output passes through the same scanner (rows per table, closing line). The same checks back
`pgbeat verify FILE`, which also compares against the manifest and the `.sha256` file.
The step only reads the backup and (re)writes its sidecars in the work folder: run again, it does the same.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zstandard
from isal import isal_zlib

from pgbeat import faults
from pgbeat.catalog.manifest import (
    Entry,
    FileDigest,
    GlobalsInfo,
    Manifest,
    checksum_path,
    find_backup,
    manifest_path,
    write_manifest,
)
from pgbeat.errors import NoSuchBackupError, VerifyError
from pgbeat.fsutil import CHUNK, write_atomic
from pgbeat.hashing import hash_file
from pgbeat.pipeline.record import Run, StepContext, VerifyResult, scratch_folder
from pgbeat.postgres.clients import archive_reader
from pgbeat.postgres.process import Supervised, last_error_line
from pgbeat.postgres.sqlscan import COMPLETE_MARKER, DumpScanner
from pgbeat.settings import Settings
from pgbeat.steps.compress import codec_for_name, decompressing_reader, read_block_index
from pgbeat.steps.tablefiles import COPY_END, list_archive, read_data_file, read_facts, table_names

log = logging.getLogger(__name__)
# What the manifest keeps of each step's result: when it ran, how long it took, what it made.
MANIFEST_STEP_FIELDS = {"started_at", "duration_s", "size", "ratio", "passthrough", "client_dir", "client_note",
                        "source", "source_note", "globals_note", "incremental_note"}
VERIFY_WROTE_MANIFEST = faults.declare("verify.wrote-manifest", "the manifest is in the work folder, not yet "
                                                                "the .sha256")


def file_digests(path: Path) -> dict[str, Any]:
    """Size, MD5 and SHA-256 of a file, the two hashes computed side by side (each on a core)."""
    join_md5 = _in_thread(hash_file, path, "md5")
    try:
        sha256, size = hash_file(path, "sha256")
    finally:
        md5, _ = join_md5()  # joined even when this thread's read failed
    return {"size": size, "md5": md5, "sha256": sha256}


def _in_thread(fn, *args):
    """Start fn(*args) in a thread; return a function that joins it and returns its result or raises."""
    box: dict[str, Any] = {}

    def runner():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()

    def join():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def check_plain(path: Path, codec: str) -> dict[str, Any]:
    """Decompress a plain dump fully; return its digests, decompressed size, CRC-32 and completeness.

    With the block index the compress step left beside the file, the blocks are decompressed in parallel
    while this thread hashes the file; otherwise one stream is decompressed while another thread hashes.
    """
    blocks = read_block_index(path) if codec in ("gzip", "zstd") else None
    try:
        if blocks:
            return check_blocks(path, codec, blocks)
        return check_stream(path, codec)
    except (OSError, EOFError, ValueError, isal_zlib.error, zstandard.ZstdError) as exc:
        raise VerifyError(f"{path.name} does not decompress: {exc}", step="verify",
                          hint="the file is truncated or corrupt; do not restore from it") from None


def check_stream(path: Path, codec: str) -> dict[str, Any]:
    digests = _in_thread(file_digests, path)  # the other core hashes while this one decompresses
    crc, raw_size, tail = 0, 0, b""
    try:
        with decompressing_reader(path, codec) as f:
            while chunk := f.read(CHUNK):
                crc = isal_zlib.crc32(chunk, crc)
                raw_size += len(chunk)
                tail = (tail + chunk[-8192:])[-8192:]
    finally:
        result = digests()
    return {**result, "raw_size": raw_size, "raw_crc32": f"{crc:08x}", "complete": COMPLETE_MARKER in tail}


def _decompress_block(data: bytes, codec: str) -> tuple[int, int, bytes]:
    """Decompress one member/frame in 1 MiB pieces; return the CRC-32 and size of its content and its tail."""
    if codec == "zstd":
        raw = zstandard.ZstdDecompressor().decompress(data)  # the frame records its size: one allocation
        return isal_zlib.crc32(raw), len(raw), raw[-8192:]
    inflater = isal_zlib.decompressobj(wbits=31)  # one gzip member, whose CRC-32 and size ISA-L checks
    crc, size, tail, rest = 0, 0, b"", data
    while rest:
        out = inflater.decompress(rest, CHUNK)
        crc, size, tail = isal_zlib.crc32(out, crc), size + len(out), (tail + out[-8192:])[-8192:]
        rest = inflater.unconsumed_tail
    out = inflater.flush()
    if not inflater.eof or inflater.unused_data:
        raise ValueError("a compressed block does not end where its index says")
    crc, size, tail = isal_zlib.crc32(out, crc), size + len(out), (tail + out[-8192:])[-8192:]
    return crc, size, tail


def check_blocks(path: Path, codec: str, blocks: list[int]) -> dict[str, Any]:
    """Decompress each block on a thread pool (each member/frame checks its own checksum), combine the
    CRC-32s in order, and hash the file in this thread as its blocks are read."""
    md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
    crc, raw_size, tail = 0, 0, b""
    threads = os.cpu_count() or 1
    pending: collections.deque = collections.deque()

    def finish_one() -> None:
        nonlocal crc, raw_size, tail
        block_crc, block_size, tail = pending.popleft().result()
        crc = isal_zlib.crc32_combine(crc, block_crc, block_size)
        raw_size += block_size

    with open(path, "rb") as f, ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
        for length in blocks:
            data = f.read(length)
            if len(data) != length:
                raise EOFError(f"the file ends inside block {len(pending) + 1} of {len(blocks)}")
            md5.update(data)
            sha256.update(data)
            size += length
            pending.append(pool.submit(_decompress_block, data, codec))
            while len(pending) > threads:
                finish_one()
        while pending:
            finish_one()
        if f.read(1):
            raise ValueError("data after the last block")
    return {"size": size, "md5": md5.hexdigest(), "sha256": sha256.hexdigest(), "raw_size": raw_size,
            "raw_crc32": f"{crc:08x}", "complete": COMPLETE_MARKER in tail}


def folder_digests(path: Path) -> dict[str, Any]:
    files = [FileDigest(name=p.relative_to(path).as_posix(), **file_digests(p)).model_dump()
             for p in sorted(path.rglob("*")) if p.is_file()]
    return {"files": files, "size": sum(f["size"] for f in files)}


def check_archive(path: Path, pg_restore: str) -> dict[str, Any]:
    """Read a custom or directory archive through `pg_restore -f -`; return what the scan saw."""
    scanner = DumpScanner()
    proc = Supervised([pg_restore, "--file", "-", str(path)], name="pg_restore")
    try:
        while chunk := proc.stdout.read(CHUNK):
            scanner.feed(chunk)
        rc = proc.wait()
    finally:
        proc.stop()
    scanner.finish()
    if rc != 0:
        raise VerifyError(f"pg_restore cannot read {path.name} (exit code {rc})", step="verify",
                          details=proc.stderr_text()[-6:], reason=last_error_line(proc.stderr_text()),
                          hint="the archive is truncated or corrupt")
    result: dict[str, Any] = {"complete": scanner.complete, "tables": scanner.tables,
                              "server_version": scanner.server_version}
    if path.is_dir():
        result.update(folder_digests(path))
    else:
        result.update(file_digests(path))
    return result


def check_directory(path: Path, pg_restore: str) -> dict[str, Any]:
    """Check a directory archive file by file: its table of contents reads (`pg_restore -l`), every table's
    data file is there, decompresses (each in parallel) and ends with pg_dump's closing line; count rows.

    The data files pgbeat compressed in this run (pgbeat.steps.tablefiles) were decompressed and compared
    block by block as they were written: reading each back to the SHA-256 of what was written proves it
    decompresses to what pg_dump wrote, so only the others are decompressed here.
    """
    listing = list_archive(path, pg_restore)
    result: dict[str, Any] = {**folder_digests(path), "server_version": listing.server_version}
    stored = {f["name"]: f["sha256"] for f in result["files"]}
    written = read_facts(path) or {}
    changed = sorted(name for name, fact in written.items() if stored.get(name) != fact.sha256)
    if changed:
        raise VerifyError(f"{path.name} failed verification", step="verify",
                          details=[f"data files differ from what was written to them: {', '.join(changed[:5])}"])
    data_files = {n: next((f"{n}.dat{s}" for s in ("", ".gz", ".zst") if f"{n}.dat{s}" in stored), None)
                  for n in listing.table_data}
    missing = sorted(n for n, name in data_files.items() if name is None)
    if missing:
        raise VerifyError(f"{path.name} failed verification", step="verify",
                          details=[f"the data of entries {', '.join(map(str, missing[:5]))} is missing"],
                          hint="the archive is incomplete; do not restore from it")
    unread = [name for name in data_files.values() if name not in written]
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="verify") as pool:
            facts = {**written, **{f.name: f for f in pool.map(read_data_file, (path / n for n in unread))}}
    except (OSError, EOFError, ValueError, isal_zlib.error, zstandard.ZstdError) as exc:
        raise VerifyError(f"a data file of {path.name} does not decompress: {exc}", step="verify",
                          hint="the archive is truncated or corrupt; do not restore from it") from None
    names = table_names(path, listing.table_data, pg_restore)
    result["complete"] = all(facts[name].closed for name in data_files.values())
    # Rows: one line each in COPY's text format; the closing `\.` and two empty lines follow them.
    result["tables"] = {names.get(n, str(n)): facts[name].newlines - COPY_END.count(b"\n")
                        for n, name in data_files.items() if facts[name].closed}
    return result


def check_backup(path: Path, dump_format: str, codec: str, settings: Settings,
                 dumped_with: str | None = None) -> dict[str, Any]:
    """Check a backup's file(s) by its format; an archive is read by a pg_restore of the major of
    `dumped_with` (the pg_dump version that wrote it) or newer."""
    if dump_format == "plain":
        return check_plain(path, codec)
    if dump_format == "tar":
        from pgbeat.physical.basebackup import check_base

        return check_base(path, codec, settings)
    pg_restore = archive_reader(settings, None, dumped_with).program("pg_restore")
    if dump_format == "directory":
        return check_directory(path, pg_restore)
    return check_archive(path, pg_restore)


def globals_problems(folder: Path, record: GlobalsInfo | None) -> list[str]:
    """Check a backup's globals file (pgbeat.postgres.globals) in `folder` against its `record`: it is
    there, of its size and SHA-256, and (unless encrypted) decompresses to pg_dumpall's whole output."""
    from pgbeat.postgres.globals import read_globals

    if record is None:
        return []
    path = folder / record.file
    try:
        sha256, size = hash_file(path, "sha256")
    except FileNotFoundError:
        return [f"{record.file} (the server's globals) is missing"]
    if sha256 != record.sha256 or size != record.size:
        return [f"{record.file} (the server's globals) does not match the manifest's size and SHA-256"]
    if not record.encrypted:
        try:
            read_globals(path, codec_for_name(record.file))
        except VerifyError as exc:
            return [exc.message]
    return []


def verify_step(ctx: StepContext, run: Run) -> Run:
    """Verify the compressed artifact against what dump and compress recorded; write manifest + .sha256."""
    t0 = time.monotonic()
    path = run.artifact
    dump, compress = run.steps.dump, run.steps.compress
    if dump is None or compress is None:
        raise VerifyError(f"{run.name}: nothing to verify (the dump and compress steps have not run)", step="verify")
    if run.format == "plain" and dump.blocks_checked and compress.sha256:
        # A streaming dump decompressed each block as it wrote it and compared it with pg_dump's bytes,
        # and hashed what it wrote: reading the file back to that SHA-256 (below) proves the stored file
        # decompresses to exactly the dump, so decompressing it all again would prove nothing more.
        result = {**file_digests(path), "raw_size": dump.raw_size, "raw_crc32": dump.raw_crc32,
                  "complete": dump.complete}
    else:
        result = check_backup(path, run.format, run.codec, ctx.settings, dump.pg_dump_version)
    problems = []
    if not result["complete"]:
        problems.append("the dump lacks pg_dump's closing 'dump complete' line (truncated)")
    if run.format == "plain" and (result["raw_size"] != dump.raw_size or result["raw_crc32"] != dump.raw_crc32):
        problems.append(f"decompressed data differs from what pg_dump wrote ({result['raw_size']} bytes, "
                        f"crc {result['raw_crc32']}; expected {dump.raw_size} bytes, crc {dump.raw_crc32})")
    if run.format in ("plain", "tar") and compress.sha256 and compress.sha256 != result["sha256"]:
        problems.append("the file on disk differs from what was written to it (SHA-256 mismatch)")
    physical = None
    if run.format == "tar":
        from pgbeat.physical.basebackup import physical_info, physical_problems

        problems += physical_problems(result, dump.physical)
        physical = None if problems else physical_info(result, dump.physical)
    problems += globals_problems(run.work(), dump.globals)
    if problems:
        raise VerifyError(f"Backup {run.name} failed verification", step="verify", details=problems)

    target = ctx.target(run)
    finished = ctx.now()
    manifest = Manifest(
        run_id=run.run_id, target=run.target, tier=run.tier, file=run.name, format=run.format, codec=run.codec,
        level=run.level, size=result["size"], md5=result.get("md5"), sha256=result.get("sha256"),
        files=result.get("files", []), raw_size=dump.raw_size, raw_crc32=dump.raw_crc32,
        complete=True, server_version=dump.server_version or result.get("server_version"),
        pg_dump_version=dump.pg_dump_version,
        database={"dbname": target.dbname, "host": target.host, "port": target.port},
        tables=dump.tables or result.get("tables") or {},
        started_at=run.started_at, server_time=dump.server_time, clock_skew_s=dump.clock_skew_s,
        finished_at=finished,
        duration_s=round((finished - run.started_at).total_seconds(), 3),
        steps={name: step_result.model_dump(mode="json", include=MANIFEST_STEP_FIELDS)
               for name, step_result in run.steps.items()},
        node=run.node, slot=run.slot, physical=physical, globals=dump.globals, chain=dump.chain,
        properties=dump.properties,
    )
    manifest.steps["verify"] = {"duration_s": round(time.monotonic() - t0, 3)}
    write_manifest(manifest_path(path), manifest)
    faults.fault_point(VERIFY_WROTE_MANIFEST)
    write_atomic(checksum_path(path), manifest.checksum_lines().encode())
    run.steps.verify = VerifyResult(path=str(path), size=result["size"], md5=result.get("md5"),
                                    sha256=result.get("sha256"), duration_s=manifest.steps["verify"]["duration_s"])
    log.info("verified %s (sha256 %s)", run.name, result.get("sha256"))
    return run


def read_checksum_file(path: Path) -> dict[str, str]:
    """Parse a `sha256sum` file into {name: hex digest}."""
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            digest, _, name = line.partition("  ")
            sums[name.strip().lstrip("*")] = digest.strip()
    return sums


def stored_problems(result: dict[str, Any], manifest: Manifest) -> list[str]:
    """Compare what is on disk (a file's digests, or a folder's per-file digests) with the manifest."""
    problems = []
    if manifest.files:
        expected = {f.name: f.sha256 for f in manifest.files}
        actual = {f["name"]: f["sha256"] for f in result.get("files", [])}
        if expected != actual:
            changed = sorted(n for n in expected.keys() | actual.keys() if expected.get(n) != actual.get(n))
            problems.append(f"files differ from the manifest: {', '.join(changed[:5])}")
        return problems
    if result["sha256"] != manifest.sha256:
        problems.append(f"SHA-256 {result['sha256']} does not match the manifest's {manifest.sha256}")
    if manifest.md5 and result.get("md5") != manifest.md5:
        problems.append(f"MD5 {result.get('md5')} does not match the manifest's {manifest.md5}")
    if result["size"] != manifest.size:
        problems.append(f"size {result['size']} does not match the manifest's {manifest.size}")
    return problems


def plaintext_problems(result: dict[str, Any], manifest: Manifest) -> list[str]:
    problems = []
    if not result["complete"]:
        problems.append("the dump lacks pg_dump's closing 'dump complete' line (truncated)")
    if manifest.raw_crc32 and result.get("raw_crc32") != manifest.raw_crc32:
        problems.append("decompressed content does not match what pg_dump wrote (CRC-32)")
    if manifest.raw_size is not None and result.get("raw_size") not in (None, manifest.raw_size):
        problems.append(f"decompressed size {result['raw_size']} does not match the manifest's {manifest.raw_size}")
    return problems


def open_backup(path: Path) -> Entry:
    """Return the backup at `path` with its manifest; raise VerifyError if it is not one or its manifest is
    damaged (its seal does not match)."""
    path = path.expanduser()
    if not path.exists():
        raise NoSuchBackupError(f"{path}: no such file", hint="give the path of a backup, e.g. from `pgbeat list`")
    entry = find_backup(path.resolve())
    if entry is None:
        raise VerifyError(f"{path} is not a pgbeat backup: no manifest {manifest_path(path).name} next to it",
                          hint="pgbeat works with backups it made; for a foreign .sql.gz use gzip -t and psql")
    damaged = entry.manifest.seal_problem()
    if damaged:  # nothing it says can be trusted (not even which target it restores into): stop here
        raise VerifyError(f"{path.name} failed verification", step="verify",
                          details=[f"{manifest_path(entry.path).name}: {damaged}"],
                          hint="do not restore from this file; use a remote copy (with its own manifest) or "
                               "another backup")
    return entry


def verify_backup(path: Path, settings: Settings, identities: list | None = None,
                  checksums_only: bool = False, with_globals: bool = True) -> tuple[Manifest, dict[str, Any]]:
    """Verify a backup on disk against its manifest and `.sha256`; raise VerifyError naming what is wrong.

    An encrypted backup is checked as stored (size, checksums); with `identities` it is also decrypted,
    and the plaintext is checked like any backup (checksums, full decompression, completeness).
    `checksums_only` (restore's pre-check): the stored bytes must hash to what the manifest recorded when
    the backup was fully verified, which proves them identical to that verified file; the restore that
    follows decompresses everything again anyway.
    The server's globals file beside it is checked too, unless not `with_globals`: a restore that does not
    apply them (or a drill) needs only the backup itself, which may have been copied without them.
    """
    entry = open_backup(path)
    manifest = entry.manifest
    # The stored bytes hashing to the manifest's checksums proves them the verified file only when the
    # manifest itself is proven (sealed); an old, unsealed manifest gets the full check.
    checksums_only = checksums_only and manifest.seal is not None
    codec = manifest.codec if manifest.format == "plain" else codec_for_name(path.name)
    if checksums_only or manifest.encryption:
        result = folder_digests(entry.path) if manifest.files else file_digests(entry.path)
        problems = stored_problems(result, manifest)
        result["complete"] = None if manifest.encryption else manifest.complete and not problems
        if manifest.encryption and identities is not None and not problems:
            problems += decrypted_problems(entry, settings, identities, codec, result)
    else:
        result = check_backup(entry.path, manifest.format, codec, settings, manifest.pg_dump_version)
        problems = stored_problems(result, manifest) + plaintext_problems(result, manifest)
        if manifest.format == "tar":
            from pgbeat.physical.basebackup import physical_problems

            problems += physical_problems(result, manifest.physical)
    sums_file = checksum_path(entry.path)
    try:
        sums = read_checksum_file(sums_file)
    except FileNotFoundError:
        problems.append(f"{sums_file.name} is missing")
    except (OSError, UnicodeDecodeError):
        problems.append(f"{sums_file.name} is not a readable sha256sum file")
    else:
        listed = {f"{manifest.file}/{f['name']}": f["sha256"] for f in result.get("files", [])} or \
            {manifest.file: result.get("sha256")}
        if any(sums.get(name) != digest for name, digest in listed.items()):
            problems.append(f"{sums_file.name} does not match the file's SHA-256")
    if with_globals:
        problems += globals_problems(entry.path.parent, manifest.globals)
    if problems:
        raise VerifyError(f"{path.name} failed verification", step="verify", details=problems,
                          hint="do not restore from this file; use an older backup or a remote copy")
    return manifest, result


def decrypted_problems(entry, settings: Settings, identities: list, codec: str, result: dict) -> list[str]:
    """Decrypt an encrypted backup into a scratch file and check the plaintext; fill `result` in."""
    from pgbeat import crypt

    plaintext = entry.manifest.encryption.plaintext
    # Killed here, the next pgbeat run sweeps the plaintext (a scratch folder is held while in use).
    with scratch_folder(settings, "verify") as folder:
        scratch = folder / plaintext.file
        digests = crypt.decrypt_file(entry.path, scratch, identities)
        if digests["sha256"] != plaintext.sha256:
            return ["the decrypted content does not match the plaintext SHA-256 in the manifest"]
        checked = check_backup(scratch, entry.manifest.format, codec, settings, entry.manifest.pg_dump_version)
        result.update(complete=checked["complete"], plaintext_sha256=digests["sha256"])
        return plaintext_problems(checked, entry.manifest)
