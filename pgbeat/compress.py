"""The compress step and the codecs behind it.

gzip (the default, so the result is the seed's `.sql.gz`, restorable with `gunzip -c | psql`) is written
by ISA-L, multi-threaded: the output is ordinary gzip at several times the speed of gzip(1). gzip's
levels 1-9 map onto ISA-L's four (0 -> 0, 1-3 -> 1, 4-6 -> 2, 7-9 -> 3). zstd is the option for the
smallest files at the same speed. Custom and directory archives compress themselves and pass through.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import zstandard
from isal import igzip_threaded

from pgbeat.errors import VerifyError
from pgbeat.fsutil import disk_error, open_private, remove_path
from pgbeat.run import Run, StepContext

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def isal_level(gzip_level: int) -> int:
    """Map a gzip(1) level (0-9) onto ISA-L's levels (0-3)."""
    return 0 if gzip_level <= 0 else min(3, (gzip_level + 2) // 3)


def thread_count(threads: int) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


class HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:  # the owner closes the real file
        self.flush()

    @property
    def closed(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


@contextmanager
def compressing_writer(raw: BinaryIO, codec: str, level: int, threads: int) -> Iterator[BinaryIO]:
    """Yield a file object that compresses into `raw` with `codec`; everything is flushed on exit."""
    if codec == "gzip":
        with igzip_threaded.open(raw, "wb", compresslevel=isal_level(level), threads=thread_count(threads)) as out:
            yield out
    elif codec == "zstd":
        cctx = zstandard.ZstdCompressor(level=level, threads=thread_count(threads), write_checksum=True)
        with cctx.stream_writer(raw, closefd=False) as out:
            yield out
    elif codec == "none":
        yield raw
    else:
        raise ValueError(f"unknown codec {codec!r}")


@contextmanager
def decompressing_reader(path: Path, codec: str) -> Iterator[BinaryIO]:
    """Yield a file object reading `path` decompressed; corrupt or truncated input raises VerifyError."""
    if codec == "gzip":
        # A reader thread decompresses while the caller hashes; ISA-L checks each member's CRC-32 and size.
        with igzip_threaded.open(path, "rb", threads=1) as f:
            yield f
    elif codec == "zstd":
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
            yield f
    elif codec == "none":
        with open(path, "rb") as f:
            yield f
    else:
        raise VerifyError(f"unknown codec {codec!r}")


def codec_for_name(name: str) -> str:
    """Guess a backup's codec from its file name (for files without a manifest)."""
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith(".zst"):
        return "zstd"
    return "none"


def compress_file(source: Path, dest: Path, codec: str, level: int, threads: int) -> dict:
    """Compress `source` into a new 0600 file `dest`; return its size and SHA-256 as written."""
    with open(source, "rb") as src, open_private(dest) as raw:
        hashing = HashingWriter(raw)
        try:
            with compressing_writer(hashing, codec, level, threads) as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
            raw.flush()
            os.fsync(raw.fileno())
        except OSError as exc:
            raise disk_error(exc, dest) from None
    return {"size": hashing.size, "sha256": hashing.sha256.hexdigest()}


def compress_step(ctx: StepContext, run: Run) -> Run:
    """Compress the plain dump into the backup's final name inside the work folder; others pass through."""
    t0 = time.monotonic()
    dump = run.step("dump")
    if dump.get("compressed") or run.format != "plain":
        # A self-compressing archive or a streaming dump: nothing to do but say so.
        run.steps["compress"] = {"path": dump["path"], "size": dump["size"], "passthrough": True,
                                 "codec": run.codec, "duration_s": 0.0}
        return run
    source = Path(dump["path"])
    dest = run.work(run.name)
    target = ctx.target(run)
    try:
        if run.codec == "none":
            os.replace(source, dest)
            written = {"size": dest.stat().st_size, "sha256": None}
        else:
            written = compress_file(source, dest, run.codec, run.level, target.compression.threads)
    except BaseException:
        remove_path(dest)
        raise
    remove_path(source)  # the uncompressed copy is no longer needed
    duration = round(time.monotonic() - t0, 3)
    ratio = round(dump["size"] / written["size"], 2) if written["size"] else None
    run.steps["compress"] = {"path": str(dest), "codec": run.codec, "level": run.level, "ratio": ratio,
                             "duration_s": duration, **written}
    log.info("compressed %s with %s: %d -> %d bytes in %.1fs", run.name, run.codec, dump["size"],
             written["size"], duration)
    return run
