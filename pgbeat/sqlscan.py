"""Observe a plain-format dump as it streams past: rows per table, versions, and the closing line.

The scanner never holds more than a few KiB (plus one partial statement line outside COPY data),
whatever the size of the dump or of its rows, so it can sit in the dump's single pass. COPY data, which
is nearly all of a dump, is scanned in place (newlines counted, the `\\.` terminator searched) without
copying the chunk; only the statements between COPY blocks go through a small carry-over buffer.
"""

from __future__ import annotations

import re

COMPLETE_MARKER = b"-- PostgreSQL database dump complete"
EDGE = 8192  # bytes kept from the head (versions) and the tail (closing line)
MAX_STATEMENT_LINE = 1 << 20  # a COPY header longer than this is not one pg_dump writes
TERMINATOR = b"\n\\.\n"  # the line `\.` that ends COPY data, with the newline before it

_IDENT = rb'(?:"(?:[^"]|"")*"|[^\s."(]+)'
_COPY_RE = re.compile(rb"COPY (" + _IDENT + rb"(?:\." + _IDENT + rb")?)(?: \(.*\))? FROM stdin;$", re.S)
_SERVER_RE = re.compile(rb"-- Dumped from database version (\S+)")
_CLIENT_RE = re.compile(rb"-- Dumped by pg_dump version (\S+)")


class DumpScanner:
    """Feed it the dump's bytes in any chunking; read `tables`, versions and `complete` at the end."""

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}
        self.size = 0
        self.head = b""
        self.tail = b""
        self._table: str | None = None  # inside `COPY ... FROM stdin;` data when set
        self._rows = 0
        self._matched = 0  # in COPY data: how much of TERMINATOR the bytes seen so far end with
        self._prev = b"\n"  # outside COPY data: the byte before `_carry` (does it start a line?)
        self._carry = b""  # outside COPY data: bytes not yet classified (a partial line)

    def feed(self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> None:
        """Scan data[start:end] (bounds let a caller pass part of a big buffer without copying it)."""
        if isinstance(data, memoryview):
            data = data.obj if data.obj is not None and len(data) == len(data.obj) else bytes(data)
        end = len(data) if end is None else end
        self.size += end - start
        if len(self.head) < EDGE:
            self.head += bytes(data[start:min(end, start + EDGE - len(self.head))])
        self.tail = (self.tail + bytes(data[max(start, end - EDGE):end]))[-EDGE:]
        pos = start
        while pos < end:
            if self._table is not None:
                pos = self._copy_data(data, pos, end)
            else:
                # Statements are rare and short: scan them in a buffer with the carried partial line.
                self._statements(self._prev + self._carry + bytes(data[pos:end]))
                return

    def _copy_data(self, data, pos: int, end: int) -> int:
        """Count rows of the current COPY block in data[pos:end]; return where the block ended, or `end`."""
        if self._matched:
            rest = TERMINATOR[self._matched:]
            if data[pos:pos + len(rest)] == rest:  # the terminator straddles two chunks
                self._end_table()
                return pos + len(rest)
            if end - pos < len(rest) and rest.startswith(bytes(data[pos:end])):
                self._matched += end - pos  # still straddling: a chunk of one or two bytes
                return end
        k = data.find(TERMINATOR, pos, end)
        if k != -1:
            self._rows += data.count(b"\n", pos, k + 1)
            self._end_table()
            return k + len(TERMINATOR)
        self._rows += data.count(b"\n", pos, end)
        self._matched = next((m for m in (3, 2, 1) if end - pos >= m and data[end - m:end] == TERMINATOR[:m]), 0)
        return end

    def _end_table(self) -> None:
        assert self._table is not None
        self.tables[self._table] = self.tables.get(self._table, 0) + self._rows
        self._table, self._rows, self._matched = None, 0, 0
        self._prev, self._carry = b"\n", b""

    def _statements(self, buf: bytes) -> None:
        """Skip statements up to the next COPY header (buf[0] is the byte before them), then go on."""
        pos = 1
        while True:
            at = buf.find(b"\nCOPY ", pos - 1) + 1
            if at <= 0:
                # No COPY header here; keep the last partial line in case it is the start of one.
                last_nl = buf.rfind(b"\n", pos - 1)
                keep_from = pos if last_nl == -1 else last_nl + 1
                if len(buf) - keep_from > MAX_STATEMENT_LINE:
                    keep_from = len(buf)
                self._prev, self._carry = buf[keep_from - 1:keep_from], buf[keep_from:]
                return
            line_end = buf.find(b"\n", at)
            if line_end == -1:
                if len(buf) - at > MAX_STATEMENT_LINE:
                    self._prev, self._carry = buf[-1:], b""
                else:
                    self._prev, self._carry = buf[at - 1:at], buf[at:]
                return
            match = _COPY_RE.match(buf, at, line_end)
            pos = line_end + 1
            if match:
                # `_matched = 1`: the COPY line's newline may begin the terminator (an empty block).
                self._table, self._rows, self._matched = match.group(1).decode("utf-8", "replace"), 0, 1
                pos = self._copy_data(buf, pos, len(buf))
                if self._table is not None:  # the block goes on in the next chunk
                    return
                if pos >= len(buf):
                    self._prev, self._carry = b"\n", b""
                    return

    def finish(self) -> None:
        """Call once at end of stream; an unterminated COPY block means the dump was cut short."""
        if self._table is not None:
            self.tables[self._table] = self.tables.get(self._table, 0) + self._rows

    @property
    def complete(self) -> bool:
        """True when pg_dump's closing line is among the last bytes and no COPY block is open."""
        return self._table is None and COMPLETE_MARKER in self.tail

    @property
    def server_version(self) -> str | None:
        match = _SERVER_RE.search(self.head)
        return match.group(1).decode() if match else None

    @property
    def pg_dump_version(self) -> str | None:
        match = _CLIENT_RE.search(self.head)
        return match.group(1).decode() if match else None
