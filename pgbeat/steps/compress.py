"""The compress step and the codecs behind it.

gzip is the default, so the result is the seed's `.sql.gz`, restorable with `gunzip -c | psql`; zstd is
the option for the smallest files. Both are written in independent blocks of 4 MiB, compressed on a thread
pool (ISA-L for gzip, zstandard for zstd; both release the GIL) and written in order: each block is a
complete gzip member or zstd frame, and a file of concatenated members/frames is ordinary gzip or zstd to
every tool (`gzip -t`, `gunzip -c`, `zstd -d`, psql pipes). The block sizes are kept beside the file in the
work folder, so verify can decompress the blocks in parallel too. gzip's levels 1-9 map onto ISA-L's
four (0 -> 0, 1-3 -> 1, 4-6 -> 2, 7-9 -> 3). Custom and directory archives compress themselves and pass
through; a streaming dump arrives compressed already.

The step can be run again with the same record: the compressed file is written under a hidden name and
renamed into place, and only then is the plain dump removed, so a dump that is gone means a compressed
file that is complete (a second run then just describes it).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import zstandard
from isal import igzip, igzip_threaded, isal_zlib

from pgbeat import faults
from pgbeat.errors import VerifyError
from pgbeat.fsutil import disk_error, fsync_dir, open_private, remove_path

if TYPE_CHECKING:  # the codecs serve wal-push too, which needs none of the pipeline's records
    from pgbeat.pipeline.record import Run, StepContext

log = logging.getLogger(__name__)

BLOCK = 4 << 20  # raw bytes per gzip member / zstd frame
BLOCKS_SUFFIX = ".blocks.json"  # the compressed size of each block, for a parallel verify
COMPRESS_WRITTEN = faults.declare("compress.written", "the compressed file is complete under a hidden name; "
                                                      "the plain dump is still there")
COMPRESS_COMMITTED = faults.declare("compress.committed", "the compressed file has its name; the plain dump "
                                                          "is not removed yet")


def isal_level(gzip_level: int) -> int:
    """Map a gzip(1) level (0-9) onto ISA-L's levels (0-3)."""
    return 0 if gzip_level <= 0 else min(3, (gzip_level + 2) // 3)


def thread_count(threads: int) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


_zstd = threading.local()


def compress_block(block, codec: str, level: int) -> bytes:
    """Compress one block into a complete gzip member or zstd frame (with its checksum and size)."""
    if codec == "gzip":
        return igzip.compress(block, compresslevel=isal_level(level))
    compressors = getattr(_zstd, "compressors", None)
    if compressors is None:
        compressors = _zstd.compressors = {}
    if level not in compressors:  # a ZstdCompressor must not be shared between threads
        compressors[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return compressors[level].compress(block)


def compress_checked_block(block, codec: str, level: int) -> bytes:
    """Compress one block, then decompress the result and compare it with the block byte for byte."""
    data = compress_block(block, codec, level)
    try:
        if codec == "gzip":
            back = igzip.decompress(data)  # ISA-L also checks the member's CRC-32 and size
        else:
            back = zstandard.ZstdDecompressor().decompress(data, max_output_size=len(block))
    except (OSError, EOFError, ValueError, isal_zlib.error, zstandard.ZstdError):
        back = None
    if back != block:
        raise VerifyError("a compressed block does not decompress to its input", step="dump",
                          hint="the compressor or this machine's memory is faulty")
    return data


class BlockWriter:
    """A writable file object that compresses in independent blocks on a thread pool and writes them, in
    order, to `out`; it counts what it writes and remembers each block's compressed size.

    With `check`, each block is also decompressed on the pool and compared with its input, and the
    SHA-256 of what is written is kept: a read-back of the file that finds that SHA-256 then proves the
    stored file decompresses to the input without decompressing it again (the streaming dump's verify).
    """

    def __init__(self, out: BinaryIO, codec: str, level: int, threads: int, check: bool = False) -> None:
        self.out, self.codec, self.level = out, codec, level
        self.threads = thread_count(threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"{codec}-block")
        self.compress = compress_checked_block if check else compress_block
        self.sha256 = hashlib.sha256() if check else None
        self.pending: collections.deque[Future] = collections.deque()
        self.buffer = bytearray()
        self.sizes: list[int] = []
        self.size = 0

    def write(self, data) -> int:
        if not self.buffer and len(data) == BLOCK:
            self._submit(bytes(data))  # a whole block: no copy through the buffer
            return len(data)
        self.buffer += data
        while len(self.buffer) >= BLOCK:
            self._submit(bytes(self.buffer[:BLOCK]))
            del self.buffer[:BLOCK]
        return len(data)

    def write_block(self, block) -> None:
        """Take one whole block (or the last, shorter one) as it is; the caller must not reuse its buffer."""
        assert not self.buffer
        self._submit(block)

    def _submit(self, block) -> None:
        self.pending.append(self.pool.submit(self.compress, block, self.codec, self.level))
        while len(self.pending) > self.threads:  # bounded memory: one block in flight per thread, one more
            self._write_one()

    def _write_one(self) -> None:
        data = self.pending.popleft().result()
        self.out.write(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        self.sizes.append(len(data))
        self.size += len(data)

    def close(self) -> None:
        try:
            if self.buffer:
                self._submit(bytes(self.buffer))
                self.buffer.clear()
            while self.pending:
                self._write_one()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def digest(self) -> dict:
        return {"size": self.size, "blocks": len(self.sizes)}


def write_block_index(path: Path, sizes: list[int]) -> None:
    with open_private(path.with_name(path.name + BLOCKS_SUFFIX), "w") as f:
        json.dump(sizes, f)


def read_block_index(path: Path) -> list[int] | None:
    try:
        return json.loads(path.with_name(path.name + BLOCKS_SUFFIX).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def decompressing_reader(path: Path | BinaryIO, codec: str) -> Iterator[BinaryIO]:
    """Yield a file object reading `path` decompressed (every member or frame); damage raises."""
    if codec == "gzip":
        # A reader thread decompresses while the caller works; ISA-L checks each member's CRC-32 and size.
        with igzip_threaded.open(path, "rb", threads=1) as f:
            yield f
    elif codec == "zstd":
        with open(path, "rb") if isinstance(path, Path) else _nullcontext(path) as raw, \
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
            yield f
    elif codec == "none":
        with open(path, "rb") if isinstance(path, Path) else _nullcontext(path) as f:
            yield f
    else:
        raise VerifyError(f"unknown codec {codec!r}")


@contextmanager
def _nullcontext(value):
    yield value


def codec_for_name(name: str) -> str:
    """Guess a backup's codec from its file name (for files without a manifest)."""
    if name.endswith((".gz", ".gz.age")):
        return "gzip"
    if name.endswith((".zst", ".zst.age")):
        return "zstd"
    return "none"


def compress_file(source: Path, dest: Path, codec: str, level: int, threads: int) -> dict:
    """Compress `source` into a new 0600 file `dest`; return its size and block count as written."""
    with open(source, "rb") as src, open_private(dest) as raw:
        writer = BlockWriter(raw, codec, level, threads)
        try:
            while block := src.read(BLOCK):
                writer.write(block)
            writer.close()
            raw.flush()
            os.fsync(raw.fileno())
        except OSError as exc:
            writer.abort()
            raise disk_error(exc, dest) from None
        except BaseException:
            writer.abort()
            raise
    write_block_index(dest, writer.sizes)
    return writer.digest()


def compress_step(ctx: StepContext, run: Run) -> Run:
    """Compress the plain dump into the backup's final name inside the work folder; others pass through.

    Raise VerifyError if neither the dump nor a compressed file made from it is there.
    """
    from pgbeat.pipeline.record import CompressResult

    t0 = time.monotonic()
    dump = run.steps.dump
    if dump is None:
        raise VerifyError(f"{run.name}: nothing to compress (the dump step has not run)", step="compress")
    if dump.compressed or run.format != "plain":
        # A self-compressing archive or a streaming dump: nothing to do but say so.
        run.steps.compress = CompressResult(path=dump.path, size=dump.size, sha256=dump.sha256, passthrough=True,
                                            codec=run.codec)
        return run
    source = Path(dump.path)
    dest = run.work(run.name)
    target = ctx.target(run)
    if not source.exists() and dest.exists():
        # An earlier run of this step got as far as removing the dump: its file is complete.
        log.warning("compress of run %s was done already: %s is there", run.run_id, dest.name)
        blocks = read_block_index(dest)  # what compress_file wrote beside it (codec none: no index)
        written = {"size": dest.stat().st_size, **({"blocks": len(blocks)} if blocks is not None else {"sha256": None})}
    elif not source.exists():
        raise VerifyError(f"{run.name}: nothing to compress (the dump {source.name} is missing)", step="compress")
    elif run.codec == "none":
        faults.fault_point(COMPRESS_WRITTEN)
        os.replace(source, dest)
        written = {"size": dest.stat().st_size, "sha256": None}
    else:
        partial = dest.with_name(f".{dest.name}.partial")
        try:
            written = compress_file(source, partial, run.codec, run.level, target.compression.threads)
            faults.fault_point(COMPRESS_WRITTEN)
            os.replace(partial.with_name(partial.name + BLOCKS_SUFFIX), dest.with_name(dest.name + BLOCKS_SUFFIX))
            os.replace(partial, dest)
            fsync_dir(dest.parent)
        except BaseException:
            remove_path(partial)
            remove_path(partial.with_name(partial.name + BLOCKS_SUFFIX))
            raise
    faults.fault_point(COMPRESS_COMMITTED)
    remove_path(source)  # the uncompressed copy is no longer needed
    duration = round(time.monotonic() - t0, 3)
    ratio = round(dump.size / written["size"], 2) if written["size"] else None
    run.steps.compress = CompressResult(path=str(dest), codec=run.codec, level=run.level, ratio=ratio,
                                        duration_s=duration, **written)
    log.info("compressed %s with %s: %d -> %d bytes in %.1fs", run.name, run.codec, dump.size,
             written["size"], duration)
    return run
