"""Block compression with the in-flight check the streaming dump relies on, on the real codecs."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess

import pytest

from pgbeat.errors import VerifyError
from pgbeat.steps import compress
from pgbeat.steps.compress import BLOCK, BlockWriter

# Compressible text with some noise, a little over two blocks, so the last block is a short one.
DATA = b"".join(b"%d\tcustomer %d\t%s\n" % (i, i % 977, os.urandom(8).hex().encode()) for i in range(250_000))


@pytest.mark.parametrize(("codec", "tool"), [("gzip", "gzip"), ("zstd", "zstd")])
def test_checked_blocks_decompress_to_the_input_and_hash_what_was_written(tmp_path, codec, tool):
    assert 2 * BLOCK < len(DATA) < 3 * BLOCK
    out = io.BytesIO()
    writer = BlockWriter(out, codec, 3, threads=2, check=True)
    view = memoryview(DATA)
    for start in range(0, len(DATA), BLOCK):
        writer.write_block(bytearray(view[start:start + BLOCK]))
    writer.close()
    stored = out.getvalue()
    assert writer.sha256.hexdigest() == hashlib.sha256(stored).hexdigest()
    assert writer.sizes and sum(writer.sizes) == len(stored) == writer.size and len(writer.sizes) == 3
    path = tmp_path / f"dump.{codec}"
    path.write_bytes(stored)
    assert subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True).stdout == DATA


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("fault", ["other content", "damaged block"])
def test_a_block_that_does_not_decompress_to_its_input_stops_the_writer(monkeypatch, codec, fault):
    real = compress.compress_block

    def faulty(block, codec, level):
        if fault == "other content":
            return real(bytes(block)[:-1] + b"?", codec, level)
        data = bytearray(real(block, codec, level))
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    monkeypatch.setattr(compress, "compress_block", faulty)
    writer = BlockWriter(io.BytesIO(), codec, 3, threads=2, check=True)
    with pytest.raises(VerifyError, match="does not decompress to its input"):
        writer.write_block(bytearray(DATA[:BLOCK]))
        writer.close()
    writer.abort()
