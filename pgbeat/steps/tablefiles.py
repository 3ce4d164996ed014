"""A directory-format dump whose table files pgbeat compresses itself, each as soon as pg_dump closes it.

`pg_dump -Fd -j N` compresses each table's file with zlib in the worker process that also formats its rows:
on two cores that made `format: directory, jobs: 2` 2.7x the single-stream ceiling, while the same dump
uncompressed (`-Z 0`) takes 0.7-0.8x. So for gzip pgbeat runs pg_dump with `-Z 0` and compresses each data
file (`NNNN.dat`, `blob_NNNN.dat`) into `NNNN.dat.gz` the moment pg_dump closes it (inotify), in the
checked blocks of the compress step (ISA-L, each block decompressed again and compared), on the cores
pg_dump leaves idle. pg_restore of every supported version reads `NNNN.dat.gz` where `NNNN.dat` is absent,
so the result is an ordinary directory archive for `pg_restore -j`. What each file held (size, CRC-32,
rows, pg_dump's closing `\\.`) and the SHA-256 of what was written are kept beside the archive, in the
work folder, for the verify step; the archive itself holds only what pg_dump would have written.

Data files are never more than one table's worth uncompressed at a time per pg_dump job. Off Linux (no
inotify) the files are compressed after pg_dump exits.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from isal import isal_zlib
from pydantic import BaseModel

from pgbeat.errors import VerifyError
from pgbeat.fsutil import CHUNK, open_private, write_atomic
from pgbeat.postgres.process import last_error_line
from pgbeat.postgres.sqlscan import IDENTIFIER
from pgbeat.steps.compress import BLOCK, BlockWriter, decompressing_reader

log = logging.getLogger(__name__)

DATA_FILE = re.compile(r"(?:\d+|blob_\d+)\.dat")  # what pg_dump -Fd writes per table (and large object)
COPY_END = b"\\.\n\n\n"  # how pg_dump ends a table's data file: the `\.` line, then two empty lines
FACTS_SUFFIX = ".files.json"


class DataFile(BaseModel):
    """One data file of a directory archive: what pg_dump wrote into it, and what pgbeat stored."""

    name: str  # as stored, e.g. 3338.dat.gz
    raw_size: int
    raw_crc32: str
    newlines: int
    closed: bool  # ends with pg_dump's closing `\.` (table data; large objects have none)
    sha256: str | None = None  # of the stored file, as written (read back from disk: left to the caller)


class DataFiles(BaseModel):
    files: list[DataFile]


def facts_path(archive: Path) -> Path:
    return archive.with_name(archive.name + FACTS_SUFFIX)


def read_facts(archive: Path) -> dict[str, DataFile] | None:
    try:
        return {f.name: f for f in DataFiles.model_validate_json(facts_path(archive).read_bytes()).files}
    except (OSError, ValueError):
        return None


class Stopped(Exception):
    """The dump failed or was cancelled while a data file was being compressed."""


class GrowingFile:
    """One data file compressed into `<name>.gz` (0600) while pg_dump still writes it: each whole block
    pg_dump has written is compressed as it appears, the rest once pg_dump has closed the file."""

    def __init__(self, path: Path, codec: str, level: int, threads: int, stopped: threading.Event) -> None:
        self.path, self.stopped = path, stopped
        self.src = open(path, "rb")  # noqa: SIM115  (closed by close() or abort())
        self.dest = path.with_name(path.name + ".gz")
        try:
            self.out = open_private(self.dest)
        except BaseException:
            self.src.close()
            raise
        self.writer = BlockWriter(self.out, codec, level, threads, check=True)
        self.crc, self.raw, self.newlines, self.tail = 0, 0, 0, b""

    def pump(self, closed: bool = False) -> None:
        """Compress the whole blocks written so far; once pg_dump has `closed` the file, everything."""
        while closed or os.fstat(self.src.fileno()).st_size - self.raw >= BLOCK:
            if self.stopped.is_set():
                raise Stopped(self.path.name)
            block = self.src.read(BLOCK)
            if not block:
                return
            self.crc, self.raw = isal_zlib.crc32(block, self.crc), self.raw + len(block)
            self.newlines += block.count(b"\n")
            self.tail = (self.tail + block[-len(COPY_END):])[-len(COPY_END):]
            self.writer.write_block(block)

    def close(self) -> DataFile:
        """pg_dump has closed the file: compress the rest, make the .gz durable, remove the plain file."""
        self.pump(closed=True)
        self.writer.close()
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        self.src.close()
        self.path.unlink()
        return DataFile(name=self.dest.name, raw_size=self.raw, raw_crc32=f"{self.crc:08x}",
                        newlines=self.newlines, closed=self.tail == COPY_END, sha256=self.writer.sha256.hexdigest())

    def abort(self) -> None:
        self.writer.abort()
        self.out.close()
        self.src.close()


def compress_data_file(path: Path, codec: str, level: int, threads: int,
                       stopped: threading.Event | None = None) -> DataFile:
    """Compress one closed data file into `<name>.gz` (0600, fsynced), then remove it; return its facts.
    Raise Stopped if `stopped` is set on the way (a failed dump does not wait for its biggest table)."""
    growing = GrowingFile(path, codec, level, threads, stopped or threading.Event())
    try:
        return growing.close()
    except BaseException:
        growing.abort()
        raise


class TableFileCompressor:
    """Compress the data files pg_dump writes into `folder` while it writes them, on a thread of its own.

    Use: create the (empty) folder, `start()` before pg_dump starts, `finish()` once it has exited 0 (it
    compresses what is left and writes the facts file), `stop()` on failure. The folder is watched for
    files created and closed (inotify); between events, every open file's new whole blocks are compressed.
    """

    POLL_MS = 50

    def __init__(self, folder: Path, codec: str, level: int, threads: int) -> None:
        self.folder, self.codec, self.level, self.threads = folder, codec, level, threads
        self.facts: dict[str, DataFile] = {}
        self.error: BaseException | None = None
        self._done, self._stopped = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify = None
        self._growing: dict[str, GrowingFile] = {}

    def start(self) -> None:
        try:
            from inotify_simple import INotify, flags
        except (ImportError, OSError):  # not Linux: everything is compressed after pg_dump exits
            return
        self._inotify = INotify()
        self._inotify.add_watch(self.folder, flags.CREATE | flags.CLOSE_WRITE)
        self._created, self._closed = flags.CREATE, flags.CLOSE_WRITE
        self._thread = threading.Thread(target=self._follow, name="table-files", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            while True:
                done = self._done.is_set()  # read before the last wait, so no close is missed after it
                for event in self._inotify.read(timeout=self.POLL_MS):
                    if not DATA_FILE.fullmatch(event.name):
                        continue
                    if event.mask & self._created and event.name not in self._growing:
                        self._growing[event.name] = GrowingFile(self.folder / event.name, self.codec, self.level,
                                                                self.threads, self._stopped)
                    if event.mask & self._closed and event.name in self._growing:
                        fact = self._growing.pop(event.name).close()
                        self.facts[fact.name] = fact
                for growing in self._growing.values():
                    growing.pump()
                if done:
                    return
        except Stopped:
            pass
        except BaseException as exc:  # handed to finish()
            self.error = exc

    def _join(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._inotify is not None:
            self._inotify.close()

    def finish(self) -> dict[str, DataFile]:
        """pg_dump has exited 0: compress what is left, write the facts file beside the folder, return them."""
        self._join()
        if self.error is not None:
            self._abort_growing()
            raise self.error
        for name, growing in sorted(self._growing.items()):  # closed after the last event was read
            self.facts[f"{name}.gz"] = growing.close()
        self._growing.clear()
        for path in sorted(self.folder.iterdir()):
            if DATA_FILE.fullmatch(path.name):  # written before the watch saw it, or no inotify here
                fact = compress_data_file(path, self.codec, self.level, self.threads, self._stopped)
                self.facts[fact.name] = fact
        write_atomic(facts_path(self.folder),
                     DataFiles(files=sorted(self.facts.values(), key=lambda f: f.name)).model_dump_json().encode())
        log.debug("compressed %d data files of %s", len(self.facts), self.folder.name)
        return self.facts

    def _abort_growing(self) -> None:
        for growing in self._growing.values():
            growing.abort()
        self._growing.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._join()
        self._abort_growing()


class ArchiveListing(BaseModel):
    """What `pg_restore -l` says of a directory archive: its table data entries and the server it came from."""

    table_data: list[int]  # dump IDs: the data of entry N is in N.dat[.gz|.zst]
    server_version: str | None = None


TABLE_DATA_LINE = re.compile(r"^(\d+); \d+ \d+ TABLE DATA ", re.M)
SERVER_LINE = re.compile(r"^;\s+Dumped from database version: (\S+)", re.M)
STUB_COPY = re.compile(rf"^COPY ((?:{IDENTIFIER})(?:\.(?:{IDENTIFIER}))?) (?:\(.*\) )?FROM stdin;\n(\d+)\n\\\.$", re.M)


def list_archive(archive: Path, pg_restore: str) -> ArchiveListing:
    """Read the archive's table of contents (`pg_restore -l`: toc.dat only, no data)."""
    out = subprocess.run([pg_restore, "--list", str(archive)], capture_output=True, text=True)
    if out.returncode != 0:
        stderr = out.stderr.splitlines()
        raise VerifyError(f"pg_restore cannot read the table of contents of {archive.name} "
                          f"(exit code {out.returncode})", step="verify", reason=last_error_line(stderr),
                          details=stderr[-6:], hint="the archive is truncated or corrupt")
    version = SERVER_LINE.search(out.stdout)
    return ArchiveListing(table_data=[int(n) for n in TABLE_DATA_LINE.findall(out.stdout)],
                          server_version=version.group(1) if version else None)


def table_names(archive: Path, ids: list[int], pg_restore: str) -> dict[int, str]:
    """Name each table data entry the way pg_dump's COPY statement does (`public."My Table"`), which
    `pg_restore -l` cannot say unambiguously: restore a copy of the archive whose data files hold only
    their own ID as a row, and read the IDs back from under each COPY."""
    if not ids:
        return {}
    with tempfile.TemporaryDirectory(prefix="pgbeat-toc-") as stub:
        folder = Path(stub)
        shutil.copyfile(archive / "toc.dat", folder / "toc.dat")  # pg_restore wants a regular file, no link
        for n in ids:
            (folder / f"{n}.dat").write_bytes(f"{n}\n".encode() + COPY_END)
        (folder / "list").write_text("".join(f"{n}; 0 0 TABLE DATA - - -\n" for n in ids))
        out = subprocess.run([pg_restore, "--data-only", "--file", "-", "--use-list", str(folder / "list"),
                              str(folder)], capture_output=True)
    if out.returncode != 0:
        raise VerifyError(f"pg_restore cannot read the table of contents of {archive.name}", step="verify",
                          details=out.stderr.decode(errors="replace").splitlines()[-6:])
    return {int(n): name for name, n in STUB_COPY.findall(out.stdout.decode("utf-8", "replace"))}


def read_data_file(path: Path) -> DataFile:
    """Decompress one stored data file (.dat.gz, .dat.zst or plain .dat) fully; return what it holds
    (damage raises: each gzip member's CRC-32 and each zstd frame's checksum are checked on the way)."""
    codec = "gzip" if path.name.endswith(".gz") else "zstd" if path.name.endswith(".zst") else "none"
    crc, raw, newlines, tail = 0, 0, 0, b""
    with decompressing_reader(path, codec) as f:
        while chunk := f.read(CHUNK):
            crc, raw = isal_zlib.crc32(chunk, crc), raw + len(chunk)
            newlines += chunk.count(b"\n")
            tail = (tail + chunk[-len(COPY_END):])[-len(COPY_END):]
    return DataFile(name=path.name, raw_size=raw, raw_crc32=f"{crc:08x}", newlines=newlines,
                    closed=tail == COPY_END)
