"""Observe a plain-format dump as it streams past: rows per table, versions, and the closing line.

The scanner never holds more than a few KiB (plus one partial COPY header), whatever the size of the
dump or of its rows, so it can sit in the dump's single pass. COPY data, which is nearly all of a dump,
is scanned in place (newlines counted, the `\\.` terminator searched) without copying the chunk.

Between COPY blocks the dump is SQL, lexed just enough to know where a statement can start: a line
reading `COPY ...` inside a quoted identifier, a string, a dollar-quoted body or a comment is not a
COPY, because a name may hold newlines and any text (pg_dump double-quotes it, doubling its `"`, and
writes the newlines as they are). A COPY header is what pg_dump writes for a table's data:
`COPY <schema>.<table> (<column>, ...) FROM stdin;`, or with no column list at all for a table without
columns (`COPY public.t  FROM stdin;`, two spaces); every name as pg_dump's fmtId writes it (bare when
it is [a-z_][a-z0-9_]*, else quoted), and a header may span lines. Names are decoded with the dump's
client_encoding. A manifest's table key is the qualified name exactly as pg_dump wrote it.
"""

from __future__ import annotations

import re

COMPLETE_MARKER = b"-- PostgreSQL database dump complete"
EDGE = 8192  # bytes kept from the head (versions, encoding)
MAX_HEADER = 1 << 20  # a COPY header longer than this is not one pg_dump writes (1600 quoted columns fit)
TERMINATOR = b"\n\\.\n"  # the line `\.` that ends COPY data, with the newline before it


def _identifier(first: str, rest: str) -> str:
    """SQL's identifier: double-quoted (`""` inside, anything else too) or bare: a `first` character
    (a letter, _ or any non-ASCII character) then `rest` ones (digits and $ too), classes written for str
    or bytes patterns."""
    return rf'"(?:[^"]|"")*+"|{first}{rest}*+'


# For str, the same classes spelt as the ASCII characters they leave out: `[A-Za-z_\u0080-\U0010ffff]`
# matches the same characters but costs re ~6 ms to compile (a bitmap over every BMP code point), and
# every pattern built on IDENTIFIER is compiled when a backup starts (tests/unit/postgres: same sets).
IDENTIFIER_FIRST = r"[^\x00-\x40\x5b-\x5e\x60\x7b-\x7f]"  # A-Z a-z _ and anything not ASCII
IDENTIFIER_REST = r"[^\x00-\x23\x25-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"  # those, 0-9 and $
IDENTIFIER = _identifier(IDENTIFIER_FIRST, IDENTIFIER_REST)
# A table as a manifest names it, optionally schema-qualified: what restore may put into SQL as it is.
TABLE_NAME_RE = re.compile(rf"(?:{IDENTIFIER})(?:\.(?:{IDENTIFIER}))?")

_ID = b"(?:" + _identifier(r"[A-Za-z_\x80-\xff]", r"[A-Za-z0-9_$\x80-\xff]").encode() + b")"
_COPY_HEADER = re.compile(rb"COPY (" + _ID + rb"(?:\." + _ID + rb")?) (?:\(" + _ID + rb"(?:, " + _ID
                          + rb")*\) | )?FROM stdin;\n")
_SERVER_RE = re.compile(rb"-- Dumped from database version (\S+)")
_CLIENT_RE = re.compile(rb"-- Dumped by pg_dump version (\S+)")
_ENCODING_RE = re.compile(rb"^SET client_encoding = '([A-Za-z0-9_]+)';$", re.M)
_ESCAPES_OFF_RE = re.compile(rb"^SET standard_conforming_strings = off;$", re.M)  # old servers: `\` escapes


def _sql_run(string: bytes) -> re.Pattern[bytes]:
    """Match a run of SQL that cannot start a COPY, a comment or a dollar quote, and whose every quoted
    token is complete with the byte after it in view; the lexer's slow path takes over where it stops."""
    return re.compile(rb"""(?:
        [^"'$\-/\n]++
      | '""" + string + rb"""'(?=[^'])
      | \n(?!COPY\ )(?=.{5})                   # a line that is not a COPY header
      | -(?=[^-]) | /(?=[^*])                  # not a comment
      | "[^"]*+(?:""[^"]*+)*+"(?=[^"])
      | (?<=[A-Za-z0-9_$\x80-\xff])\$          # inside a name, not a dollar quote
    )*+""", re.S | re.X)


_RUN = _sql_run(rb"[^']*+(?:''[^']*+)*+")
_RUN_ESCAPES = _sql_run(rb"(?:[^'\\]++|''|\\.)*+")
_STRING_END_ESCAPES = re.compile(rb"['\\]")
_DOLLAR = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_DOLLAR_PARTIAL = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\Z")
_BLOCK_TOKENS = re.compile(rb"/\*|\*/")
_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$" + bytes(range(128, 256)))
_SQL, _QUOTED_NAME, _STRING, _DOLLAR_BODY, _LINE_COMMENT, _BLOCK_COMMENT = range(6)
NL, DQUOTE, QUOTE, BACKSLASH = 10, 34, 39, 92

# PostgreSQL's server encodings, by the name `SET client_encoding` gives, as Python codecs.
_CODECS = {"UTF8": "utf-8", "SQL_ASCII": "utf-8", "EUC_JP": "euc_jp", "EUC_CN": "gb2312", "EUC_KR": "euc_kr",
           "EUC_JIS_2004": "euc_jis_2004", "KOI8R": "koi8_r", "KOI8U": "koi8_u", "WIN866": "cp866",
           "WIN874": "cp874", **{f"WIN{n}": f"cp{n}" for n in range(1250, 1259)},
           **{f"ISO_8859_{n}": f"iso8859_{n}" for n in range(5, 9)},
           **{f"LATIN{n}": f"iso8859_{p}" for n, p in enumerate((1, 2, 3, 4, 9, 10, 13, 14, 15, 16), start=1)}}


class DumpScanner:
    """Feed it the dump's bytes in any chunking; read `tables`, versions and `complete` at the end."""

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}
        self.size = 0
        self.head = b""
        self._encoding = "utf-8"
        self._run = _RUN
        self._table: str | None = None  # inside `COPY ... FROM stdin;` data when set
        self._rows = 0
        self._matched = 0  # in COPY data: how much of TERMINATOR the bytes seen so far end with
        self._state = _SQL  # outside COPY data: where the lexer is
        self._delimiter = b""  # of the dollar-quoted body being skipped
        self._depth = 0  # of nested block comments
        self._carry = b"\n"  # outside COPY data: bytes whose meaning depends on what follows (the dump
        self._prev = NL  # starts a line), and the byte before them
        self._complete = False  # pg_dump's closing comment seen where a statement may start

    def feed(self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> None:
        """Scan data[start:end] (bounds let a caller pass part of a big buffer without copying it)."""
        if isinstance(data, memoryview):
            data = data.obj if data.obj is not None and len(data) == len(data.obj) else bytes(data)
        end = len(data) if end is None else end
        self.size += end - start
        if len(self.head) < EDGE:
            self.head += bytes(data[start:min(end, start + EDGE - len(self.head))])
            self._read_head()
        pos = start
        if self._table is not None:
            pos = self._copy_data(data, pos, end)
            if self._table is not None:
                return
            pos -= 1  # the terminator's newline: a statement may start after it
        if pos < end:
            self._scan(self._carry + bytes(data[pos:end]))

    def _read_head(self) -> None:
        match = _ENCODING_RE.search(self.head)
        if match:
            self._encoding = _CODECS.get(match.group(1).decode().upper(), "utf-8")
        if _ESCAPES_OFF_RE.search(self.head):
            self._run = _RUN_ESCAPES

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

    def _keep(self, buf: bytes, at: int) -> None:
        """Keep buf[at:] for the next chunk (its meaning depends on what follows), and the byte before it."""
        if at > 0:
            self._prev = buf[at - 1]
        self._carry = buf[at:]

    def _scan(self, buf: bytes) -> None:
        """Lex `buf` (the carried bytes, then the new ones) from the current state; count the COPY blocks
        met on the way, in place; keep what the next chunk decides."""
        i, n = 0, len(buf)
        while i < n:
            if self._table is not None:
                i = self._copy_data(buf, i, n)
                if self._table is None:
                    i -= 1  # the terminator's newline: a statement may start after it
                continue
            state = self._state
            if state == _SQL:
                i = self._run.match(buf, i).end()
                if i == n:
                    break
                byte = buf[i]
                if byte == NL:
                    if buf.startswith(b"COPY ", i + 1):
                        header = _COPY_HEADER.match(buf, i + 1)
                        if header:
                            self._table = header.group(1).decode(self._encoding, "replace")
                            # `_matched = 1`: the header's newline may begin the terminator (no rows).
                            self._rows, self._matched = 0, 1
                            i = header.end()
                            continue
                        if n - i <= MAX_HEADER and not _line_ends(buf, i + 1):
                            return self._keep(buf, i)  # a header cut by the chunk's end
                    elif b"\nCOPY ".startswith(buf[i:]):
                        return self._keep(buf, i)
                    i += 1
                elif byte == DQUOTE:
                    self._state, i = _QUOTED_NAME, i + 1
                elif byte == QUOTE:
                    self._state, i = _STRING, i + 1
                elif byte == 0x2D:  # -
                    if i + 1 == n:
                        return self._keep(buf, i)
                    if buf[i + 1] != 0x2D:
                        i += 1
                        continue
                    if (buf[i - 1] if i else self._prev) == NL:
                        if buf.startswith(COMPLETE_MARKER, i):
                            self._complete = True
                        elif n - i < len(COMPLETE_MARKER) and COMPLETE_MARKER.startswith(buf[i:]):
                            return self._keep(buf, i)
                    self._state, i = _LINE_COMMENT, i + 2
                elif byte == 0x2F:  # /
                    if i + 1 == n:
                        return self._keep(buf, i)
                    if buf[i + 1] == 0x2A:
                        self._state, self._depth, i = _BLOCK_COMMENT, 1, i + 2
                    else:
                        i += 1
                else:  # $: a dollar quote's delimiter, unless it is part of a name
                    if (buf[i - 1] if i else self._prev) in _NAME_BYTES:
                        i += 1
                        continue
                    delimiter = _DOLLAR.match(buf, i)
                    if delimiter:
                        self._state, self._delimiter, i = _DOLLAR_BODY, delimiter.group(), delimiter.end()
                    elif n - i <= MAX_HEADER and _DOLLAR_PARTIAL.match(buf, i):
                        return self._keep(buf, i)  # a delimiter cut by the chunk's end
                    else:
                        i += 1
            elif state == _QUOTED_NAME:
                k = buf.find(b'"', i)
                if k == -1:
                    i = n
                elif k + 1 == n:
                    return self._keep(buf, k)  # `"` closes the name, or `""` goes on: the next byte says
                else:
                    self._state, i = (_QUOTED_NAME, k + 2) if buf[k + 1] == DQUOTE else (_SQL, k + 1)
            elif state == _STRING:
                if self._run is _RUN_ESCAPES:
                    found = _STRING_END_ESCAPES.search(buf, i)
                    k = found.start() if found else -1
                else:
                    k = buf.find(b"'", i)
                if k == -1:
                    i = n
                elif k + 1 == n:
                    return self._keep(buf, k)
                elif buf[k] == BACKSLASH:
                    i = k + 2
                else:
                    self._state, i = (_STRING, k + 2) if buf[k + 1] == QUOTE else (_SQL, k + 1)
            elif state == _DOLLAR_BODY:
                k = buf.find(self._delimiter, i)
                if k == -1:
                    return self._keep(buf, max(i, n - len(self._delimiter) + 1))
                self._state, i = _SQL, k + len(self._delimiter)
            elif state == _LINE_COMMENT:
                k = buf.find(b"\n", i)
                if k == -1:
                    i = n
                else:
                    self._state, i = _SQL, k  # its newline may begin a COPY header
            else:  # _BLOCK_COMMENT
                token = _BLOCK_TOKENS.search(buf, i)
                if token is None:
                    return self._keep(buf, n - 1 if buf[-1] in b"/*" else n)
                self._depth += 1 if token.group() == b"/*" else -1
                i = token.end()
                if self._depth == 0:
                    self._state = _SQL
        self._keep(buf, n)

    def finish(self) -> None:
        """Call once at end of stream; an unterminated COPY block means the dump was cut short."""
        if self._table is not None:
            self.tables[self._table] = self.tables.get(self._table, 0) + self._rows

    @property
    def complete(self) -> bool:
        """True when pg_dump's closing comment was seen outside any statement and no COPY block is open."""
        return self._table is None and self._complete

    @property
    def server_version(self) -> str | None:
        match = _SERVER_RE.search(self.head)
        return match.group(1).decode() if match else None

    @property
    def pg_dump_version(self) -> str | None:
        match = _CLIENT_RE.search(self.head)
        return match.group(1).decode() if match else None


def _line_ends(buf: bytes, at: int) -> bool:
    """True when the line from `at` ends in `buf`: a newline outside double quotes follows."""
    pos = at
    while (k := buf.find(b"\n", pos)) != -1:
        if buf.count(b'"', at, k) % 2 == 0:
            return True
        pos = k + 1
    return False
