"""The table files' compressor on a real folder with real inotify: files are compressed as they are closed
(not before), others are left alone, and a stop interrupts a file midway."""

from __future__ import annotations

import gzip
import threading
import time

import pytest

from pgbeat.steps.compress import BLOCK
from pgbeat.steps.tablefiles import COPY_END, Stopped, TableFileCompressor, compress_data_file, read_facts


def table_data(rows: int) -> bytes:
    return b"".join(b"%d\trow %d\n" % (i, i) for i in range(rows)) + COPY_END


def wait_for(predicate, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_files_are_compressed_while_written_and_only_data_files(tmp_path):
    folder = tmp_path / "x.dir"
    folder.mkdir()
    compressor = TableFileCompressor(folder, "gzip", 6, 2)
    compressor.start()
    rows = table_data(2_000_000)
    assert len(rows) > 5 * BLOCK
    with open(folder / "3001.dat", "wb") as open_file:
        open_file.write(rows[: 4 * BLOCK + 10])  # the writer keeps one block per thread in flight
        open_file.flush()
        # Whole blocks are compressed while pg_dump still writes; the plain file stays until it is closed.
        wait_for(lambda: (folder / "3001.dat.gz").stat().st_size > 0)
        time.sleep(0.2)
        assert (folder / "3001.dat").exists()
        open_file.write(rows[4 * BLOCK + 10:])
    wait_for(lambda: not (folder / "3001.dat").exists())
    (folder / "toc.dat").write_bytes(b"PGDMP")
    (folder / "blobs.toc").write_bytes(b"1 blob_1.dat\n")
    (folder / "blob_1.dat").write_bytes(b"\x00binary")
    facts = compressor.finish()
    assert sorted(p.name for p in folder.iterdir()) == ["3001.dat.gz", "blob_1.dat.gz", "blobs.toc", "toc.dat"]
    assert gzip.decompress((folder / "3001.dat.gz").read_bytes()) == rows
    assert facts["3001.dat.gz"].closed and facts["3001.dat.gz"].newlines == 2_000_003
    assert facts["3001.dat.gz"].raw_size == len(rows)
    assert not facts["blob_1.dat.gz"].closed
    assert read_facts(folder) == facts


def test_a_file_left_open_at_the_end_is_compressed_by_finish(tmp_path):
    folder = tmp_path / "x.dir"
    folder.mkdir()
    (folder / "7.dat").write_bytes(table_data(3))  # closed before the watch began
    compressor = TableFileCompressor(folder, "gzip", 1, 1)
    compressor.start()
    assert compressor.finish()["7.dat.gz"].newlines == 6


def test_stop_interrupts_a_file_midway(tmp_path):
    path = tmp_path / "5.dat"
    path.write_bytes(b"x" * (3 * BLOCK))
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Stopped):
        compress_data_file(path, "gzip", 6, 1, stopped)
    assert path.exists()  # the source is removed only once its compressed file is whole
