"""The manifest sees every table pg_dump can write (issue 11, promise 9): hostile schema, table and column
names (newlines, quotes, dots, spaces, backslashes, unicode, text that reads like a COPY header or pg_dump's
closing line) and tables without columns, created on a real cluster, dumped by real pg_dump, scanned; and
a database of such tables backed up and restored through pgbeat with the row-count check."""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from pgbeat.postgres.sqlscan import DumpScanner
from tests.support import PG_BIN, Service

pytestmark = pytest.mark.integration

# Pieces pg_dump's quoting and pgbeat's scanner must both survive, mixed with arbitrary text.
FRAGMENTS = ['"', '""', ".", " ", "  ", "\n", "\r\n", "\t", "\\", "'", "''", "$$", "$_$", "--", "/*", "*/", ";", ",",
             "(", ")", "COPY public.x FROM stdin;", "\nCOPY public.x (a) FROM stdin;\n", "\n\\.\n", " FROM stdin;",
             "\n-- PostgreSQL database dump complete\n", "é", "Ω", "😀", "Select", "user", "1st", "UPPER", "a$b", "%",
             "%s"]
identifiers = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS),
              st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=6)),
    min_size=1, max_size=4,
).map("".join).filter(lambda name: len(name.encode()) <= 63)  # NAMEDATALEN: longer names are cut
schemas = identifiers.filter(lambda name: not name.startswith("pg_"))  # reserved for system schemas
values = st.one_of(st.none(), st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                                      max_size=12), st.sampled_from(FRAGMENTS))
tables = st.lists(st.tuples(schemas, identifiers, st.lists(identifiers, max_size=3, unique=True),
                            st.integers(min_value=0, max_value=3)),
                  min_size=1, max_size=6, unique_by=lambda t: (t[0], t[1]))


def connect(pg, db: str) -> psycopg.Connection:
    return psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=db, autocommit=True)


def create_tables(pg, db: str, specs, data) -> dict[str, int]:
    """Create each (schema, table, columns, rows) with rows of hostile text; return {qualified name: rows},
    the names quoted by the server's quote_ident (not by pgbeat)."""
    expected = {}
    with connect(pg, db) as conn:
        for schema, table, columns, rows in specs:
            qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE TABLE {} ({})").format(qualified, sql.SQL(", ").join(
                sql.SQL("{} text").format(sql.Identifier(c)) for c in columns)))
            for _ in range(rows):
                if columns:  # literals, not parameters: a `%` in a name would read as a placeholder
                    conn.execute(sql.SQL("INSERT INTO {} VALUES ({})").format(
                        qualified, sql.SQL(", ").join(sql.Literal(data.draw(values)) for _ in columns)))
                else:
                    conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(qualified))
            name = conn.execute(sql.SQL("SELECT quote_ident({}) || '.' || quote_ident({})").format(
                sql.Literal(schema), sql.Literal(table))).fetchone()[0]
            expected[name] = rows
    return expected


def scan_dump(argv: list[str], chunk: int) -> DumpScanner:
    """Run a dump command and feed its output to the scanner `chunk` bytes at a time."""
    scanner = DumpScanner()
    with tempfile.TemporaryFile() as errors, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors) as proc:
        while data := proc.stdout.read(chunk):
            scanner.feed(data)
        assert proc.wait(60) == 0, errors.seek(0) or errors.read()
    scanner.finish()
    return scanner


@pytest.fixture(scope="module")
def scratch_db(pg):
    db = pg.createdb(f"hostile_{uuid.uuid4().hex[:8]}")
    yield db
    pg.dropdb(db)


def empty(pg, db: str) -> None:
    """Drop every schema of `db` (what the previous example created) and give it an empty `public`."""
    pg.sql("DO $$ DECLARE s name; BEGIN FOR s IN SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
           "AND nspname <> 'information_schema' LOOP EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; "
           "CREATE SCHEMA public; END $$", db)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=tables, chunk=st.integers(min_value=1, max_value=70000), data=st.data())
def test_real_pg_dump_of_hostile_names_is_scanned_whole(pg, scratch_db, specs, chunk, data):
    empty(pg, scratch_db)
    expected = create_tables(pg, scratch_db, specs, data)
    where = ["-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d", scratch_db]
    plain = scan_dump([str(PG_BIN / "pg_dump"), *where], chunk)
    assert plain.tables == expected and plain.complete
    # A custom archive is read back through `pg_restore -f -` (how verify sees custom and directory).
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "db.dump"
        subprocess.run([str(PG_BIN / "pg_dump"), *where, "-Fc", "-f", str(archive)], check=True, timeout=60)
        custom = scan_dump([str(PG_BIN / "pg_restore"), "-f", "-", str(archive)], chunk)
    assert custom.tables == expected and custom.complete


# One of each kind, for the round trip through pgbeat (fixed, so a failure names its table).
HOSTILE_TABLES = [
    ("public", "no columns", [], 3),
    ("public", "line\nbreak", ["a\nb", "c"], 2),
    ("we\"ird.schema", "t\nCOPY public.x (a) FROM stdin;\n1\n\\.\n", ["x) FROM stdin;"], 2),
    ("public", "-- PostgreSQL database dump complete", ["$$", "'"], 1),
    ("Ω", "😀 \\ back\\slash", ["é"], 4),
    ("public", "empty", ["a"], 0),
]


class Values:
    """A fixed stand-in for hypothesis' `data` in create_tables."""

    def __init__(self) -> None:
        self.n = 0

    def draw(self, _strategy) -> str:
        self.n += 1
        return FRAGMENTS[self.n % len(FRAGMENTS)]


def test_hostile_tables_back_up_and_restore_with_the_row_count_check(workdir, pg, make_db):
    db = make_db("hostile")
    expected = create_tables(pg, db, HOSTILE_TABLES, Values())
    service = Service(workdir, None, [pg.target("erp", db)])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups()
    manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
    assert manifest["tables"] == expected

    copy = f"{db}_copy"
    restored = service.pgbeat("restore", str(backup), "--into", copy, "--yes")
    try:
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert f"{len(expected)} table(s) match the manifest's row counts" in restored.stdout
        assert pg.dump_text(copy) == pg.dump_text(db)
    finally:
        pg.dropdb(copy)
