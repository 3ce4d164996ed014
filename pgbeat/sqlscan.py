"""Observe a plain-format dump as it streams past: rows per table, versions, and the closing line.

The scanner never holds more than a few KiB (plus one partial statement line outside COPY data),
whatever the size of the dump or of its rows, so it can sit in the dump's single pass.
"""

from __future__ import annotations

import re

COMPLETE_MARKER = b"-- PostgreSQL database dump complete"
EDGE = 8192  # bytes kept from the head (versions) and the tail (closing line)
MAX_STATEMENT_LINE = 1 << 20  # a COPY header longer than this is not one pg_dump writes

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
        self._prev = b"\n"  # the byte before `_carry`: tells whether it starts a line
        self._carry = b""  # bytes not yet classified

    def feed(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        self.size += len(data)
        if len(self.head) < EDGE:
            self.head += data[: EDGE - len(self.head)]
        self.tail = (self.tail + data[-EDGE:])[-EDGE:]
        buf = self._prev + self._carry + data
        pos = 1  # buf[0] is the context byte
        while pos >= 0:
            if pos >= len(buf):
                self._prev, self._carry = buf[-1:], b""
                break
            pos = self._copy_data(buf, pos) if self._table is not None else self._statements(buf, pos)

    def _copy_data(self, buf: bytes, pos: int) -> int:
        """Count rows of the current COPY block from `pos`; return where the block ended, or -1."""
        start = pos - 1  # include the context byte so a terminator at a line start is found
        end = buf.find(b"\n\\.\n", start)
        if end != -1:
            self._rows += buf.count(b"\n", pos, end + 1)
            assert self._table is not None
            self.tables[self._table] = self.tables.get(self._table, 0) + self._rows
            self._table, self._rows = None, 0
            return end + 4
        # Keep the last 3 bytes: they could be the start of a terminator split across chunks.
        safe = max(pos, len(buf) - 3)
        self._rows += buf.count(b"\n", pos, safe)
        self._prev, self._carry = buf[safe - 1:safe], buf[safe:]
        return -1

    def _statements(self, buf: bytes, pos: int) -> int:
        """Skip SQL statements from `pos` up to the next COPY header; return where its data starts, or -1."""
        at = buf.find(b"\nCOPY ", pos - 1) + 1
        if at <= 0:
            # No COPY header here; keep the last partial line in case it is the start of one.
            last_nl = buf.rfind(b"\n", pos - 1)
            keep_from = pos if last_nl == -1 else last_nl + 1
            if len(buf) - keep_from > MAX_STATEMENT_LINE:
                keep_from = len(buf)
            self._prev, self._carry = buf[keep_from - 1:keep_from], buf[keep_from:]
            return -1
        line_end = buf.find(b"\n", at)
        if line_end == -1:
            if len(buf) - at > MAX_STATEMENT_LINE:
                self._prev, self._carry = buf[-1:], b""
            else:
                self._prev, self._carry = buf[at - 1:at], buf[at:]
            return -1
        match = _COPY_RE.match(buf, at, line_end)
        if match:
            self._table = match.group(1).decode("utf-8", "replace")
            self._rows = 0
            self._prev, self._carry = b"\n", b""
        return line_end + 1

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
