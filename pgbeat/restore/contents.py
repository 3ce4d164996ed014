"""What a backup holds, object by object, for `pgbeat restore --list`: every object pg_dump wrote (schemas,
tables, views, functions, sequences, types, indexes, constraints, triggers, large objects...), read from
the headers pg_dump writes above each one (`-- Name: x; Type: VIEW; Schema: erp; Owner: ...`).

A plain dump's stream is decompressed and scanned as it goes (never held in memory); COPY data is skipped,
so no row can pass for a header. A custom or directory archive is read through `pg_restore -f -` of every
table-of-contents entry but the data ones, which writes the same headers without reading any data. pg_dump writes
a name's newlines as spaces in these headers, so one header is one line.
"""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from pgbeat.catalog.manifest import Entry
from pgbeat.errors import PgbeatError
from pgbeat.postgres.clients import archive_reader
from pgbeat.steps.compress import codec_for_name, decompressing_reader

if TYPE_CHECKING:
    from pgbeat.settings import Settings

HEADER = re.compile(rb"^-- (?:Data for )?Name: (?P<name>.*); Type: (?P<kind>[A-Z][A-Z ]*[A-Z]); "
                    rb"Schema: (?P<schema>.*?)(?:; Owner: .*)?$")
COPY_START = re.compile(rb"^COPY .* FROM stdin;$")
# A `pg_restore -l` line of an entry that holds data: `ID; OID OID TYPE ...`, the type right after the OIDs.
DATA_ENTRY = re.compile(rb"^\d+; \d+ \d+ (?:TABLE DATA|BLOBS|BLOB DATA|LARGE OBJECTS|SEQUENCE SET|"
                        rb"MATERIALIZED VIEW DATA) ")
COPY_END = b"\\."
# What a restore does with an object rather than an object of its own: shown as counts only.
BOOKKEEPING = frozenset({"TABLE DATA", "SEQUENCE SET", "SEQUENCE OWNED BY", "DEFAULT", "COMMENT", "ACL",
                         "DEFAULT ACL", "BLOBS", "BLOB DATA", "LARGE OBJECTS", "MATERIALIZED VIEW DATA",
                         "DATABASE PROPERTIES", "ENCODING", "STDSTRINGS", "SEARCHPATH"})


@dataclass(frozen=True)
class DumpObject:
    kind: str  # pg_dump's word: TABLE, VIEW, FUNCTION, SEQUENCE, TYPE, INDEX, FK CONSTRAINT, BLOB, ...
    schema: str | None  # None for what belongs to no schema (a schema, an extension's row, a large object)
    name: str


def objects_in(lines: Iterable[bytes]) -> list[DumpObject]:
    """Given the lines of a plain dump (or of `pg_restore --schema-only`), return the objects their
    headers name, in dump order; COPY data is skipped."""
    found, in_copy = [], False
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if in_copy:
            in_copy = line != COPY_END
        elif line.startswith(b"-- ") and (header := HEADER.match(line)):
            schema = header["schema"].decode(errors="replace")
            found.append(DumpObject(header["kind"].decode(), None if schema == "-" else schema,
                                    header["name"].decode(errors="replace")))
        elif line.startswith(b"COPY ") and COPY_START.match(line):
            in_copy = True
    return found


def lines_of(stream: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream read in chunks (a decompressing reader need not have readline); a
    line longer than a chunk is joined once, not copied per chunk."""
    pieces: list[bytes] = []
    while block := stream.read(chunk):
        start = 0
        while (end := block.find(b"\n", start)) != -1:
            pieces.append(block[start:end])
            yield b"".join(pieces)
            pieces, start = [], end + 1
        pieces.append(block[start:])
    if any(pieces):
        yield b"".join(pieces)


def backup_objects(entry: Entry, settings: Settings) -> list[DumpObject]:
    """Given a local, unencrypted backup, return every object it holds (an archive read by a pg_restore
    of its pg_dump's major or newer). Raise PgbeatError if it cannot be read."""
    m = entry.manifest
    if m.format == "plain":
        with decompressing_reader(entry.path, m.codec or codec_for_name(entry.path.name)) as stream:
            return objects_in(lines_of(stream))
    pg_restore = archive_reader(settings, None, m.pg_dump_version).program("pg_restore")
    toc = run_pg_restore([pg_restore, "--list", str(entry.path)], entry)
    with tempfile.NamedTemporaryFile("wb", prefix="pgbeat-toc-", suffix=".list") as listing:
        listing.write(b"".join(line + b"\n" for line in lines_of(io.BytesIO(toc)) if not DATA_ENTRY.match(line)))
        listing.flush()
        # Every entry but the data: the DDL, and the large objects' lo_create (which --schema-only leaves out).
        sql = run_pg_restore([pg_restore, "--use-list", listing.name, "--file", "-", str(entry.path)], entry)
    return objects_in(lines_of(io.BytesIO(sql)))


def run_pg_restore(argv: list[str], entry: Entry) -> bytes:
    """Run pg_restore, which reads only the archive's table of contents here; return its output. Raise
    PgbeatError if it fails."""
    done = subprocess.run(argv, capture_output=True)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip().splitlines()
        raise PgbeatError(f"pg_restore cannot read the table of contents of {entry.path.name} "
                          f"(exit code {done.returncode})", details=stderr[-6:])
    return done.stdout
