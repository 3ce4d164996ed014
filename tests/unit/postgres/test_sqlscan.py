"""The dump scanner counts rows per table and sees the closing line, whatever the chunking."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pgbeat.postgres.sqlscan import IDENTIFIER_FIRST, IDENTIFIER_REST, DumpScanner

DUMP = (
    b"--\n-- PostgreSQL database dump\n--\n\n-- Dumped from database version 15.20 (Debian)\n"
    b"-- Dumped by pg_dump version 15.20 (Debian)\n\nSET x = 1;\n"
    b"CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$;\n"
    b"COPY public.a (id, v) FROM stdin;\n1\tx\n2\t\\\\.\n3\tCOPY public.fake FROM stdin;\n\\.\n\n"
    b'COPY "Sch ema"."Ta""b (1)" ("sel ect") FROM stdin;\n\\.\n\n'
    b"COPY b FROM stdin;\n" + b"".join(b"%d\t%s\n" % (i, b"y" * (i % 50)) for i in range(500)) + b"\\.\n\n"
    b"--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n"
)
EXPECTED = {"public.a": 3, '"Sch ema"."Ta""b (1)"': 0, "b": 500}


def scan(chunks) -> DumpScanner:
    scanner = DumpScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    scanner.finish()
    return scanner


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def test_whole_dump():
    s = scan([DUMP])
    assert s.tables == EXPECTED and s.complete
    assert (s.server_version, s.pg_dump_version) == ("15.20", "15.20")
    assert s.size == len(DUMP)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(DUMP)), max_size=40))
def test_any_chunking_gives_the_same_counts(cuts):
    s = scan(split(DUMP, cuts))
    assert s.tables == EXPECTED and s.complete


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=len(DUMP) - 1))
def test_a_truncated_dump_is_never_complete(cut):
    s = scan([DUMP[:cut]])
    tail_has_marker = b"dump complete" in DUMP[:cut]
    assert s.complete == tail_has_marker
    assert not s.complete or cut > DUMP.index(b"-- PostgreSQL database dump complete")


def test_byte_at_a_time():
    s = scan(DUMP[i:i + 1] for i in range(len(DUMP)))
    assert s.tables == EXPECTED and s.complete


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(DUMP)), max_size=40))
def test_ranges_of_one_buffer_scan_like_slices(cuts):
    """The dump step passes (buffer, start, end) to avoid copies: same counts, versions and size."""
    points = sorted({c % (len(DUMP) + 1) for c in cuts})
    scanner, buffer = DumpScanner(), bytearray(b"\xff" * 7 + DUMP + b"\xff" * 5)  # bytes outside the ranges
    for a, b in zip([0, *points], [*points, len(DUMP)], strict=True):
        scanner.feed(buffer, 7 + a, 7 + b)
    scanner.finish()
    assert scanner.tables == EXPECTED and scanner.complete
    assert (scanner.server_version, scanner.size) == ("15.20", len(DUMP))


# What pg_dump writes for hostile names (issue 11): a table without columns (two spaces before FROM),
# names holding newlines, quotes, dots, spaces and text that reads like a COPY header, in COPY headers
# spanning lines and in the DDL, strings, dollar-quoted bodies and comments around them, none of which
# may be taken for a COPY.
FAKE = b'\nCOPY public.fake (x) FROM stdin;\n1\n2\n\\.\n'
HOSTILE = (
    b"--\n-- PostgreSQL database dump\n--\n\n-- Dumped from database version 15.20\n"
    b"SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\n"
    b'CREATE TABLE "s.1"."t' + FAKE + b'" ("a' + FAKE + b'" integer);\n'
    b"COMMENT ON TABLE public.x IS 'it''s" + FAKE + b"';\n"
    b"CREATE FUNCTION public.f() RETURNS text AS $_$ SELECT '" + FAKE + b"' $_$;\n"
    b"CREATE FUNCTION public.g() RETURNS text AS $$" + FAKE + b"$$;\n"
    b"SELECT a$b FROM c$$d;\n"  # `$` inside names is not a dollar quote
    b"/* a block" + FAKE + b"/* nested */ still inside" + FAKE + b"*/\n"
    b"-- a comment: COPY public.fake FROM stdin;\n"
    b"COPY public.nocols  FROM stdin;\n\n\n\\.\n\n"
    b'COPY "s.1"."t' + FAKE + b'" ("a' + FAKE + b'", "b"") FROM stdin;") FROM stdin;\n7\t8\n9\t10\n\\.\n\n'
    b'COPY public."\xc3\xa9t\xc3\xa9 \\ ""q"" ." (id) FROM stdin;\n1\n\\.\n\n'
    b"COPY public.empty (id) FROM stdin;\n\\.\n\n"
    b"SELECT pg_catalog.setval('public.\"seq" + FAKE.replace(b'"', b'""') + b"\"', 1, false);\n\n"
    b"--\n-- PostgreSQL database dump complete\n--\n\n"
)
HOSTILE_EXPECTED = {"public.nocols": 2, '"s.1"."t' + FAKE.decode() + '"': 2, 'public."été \\ ""q"" ."': 1,
                    "public.empty": 0}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(HOSTILE)), max_size=40))
def test_hostile_names_and_bodies_are_never_taken_for_a_copy(cuts):
    s = scan(split(HOSTILE, cuts))
    assert s.tables == HOSTILE_EXPECTED and s.complete


def test_hostile_dump_byte_at_a_time():
    s = scan(HOSTILE[i:i + 1] for i in range(len(HOSTILE)))
    assert s.tables == HOSTILE_EXPECTED and s.complete


def test_the_closing_line_counts_only_outside_statements():
    """pg_dump's closing comment inside a name or a string does not make a truncated dump complete."""
    for fake in (b'CREATE TABLE "\n-- PostgreSQL database dump complete\n" (a int);\n',
                 b"COMMENT ON TABLE t IS '\n-- PostgreSQL database dump complete\n';\n"):
        s = scan([b"--\n-- PostgreSQL database dump\n--\n\n" + fake + b"CREATE INDEX i ON t (a"])
        assert not s.complete


def test_backslash_escapes_in_strings_when_standard_conforming_strings_is_off():
    dump = (b"SET client_encoding = 'UTF8';\nSET standard_conforming_strings = off;\n"
            b"COMMENT ON TABLE t IS 'a\\'" + FAKE + b"';\nCOPY public.t (a) FROM stdin;\n1\n\\.\n"
            b"--\n-- PostgreSQL database dump complete\n--\n")
    for cuts in ([], list(range(len(dump)))):
        s = scan(split(dump, cuts))
        assert s.tables == {"public.t": 1} and s.complete


def test_names_are_decoded_with_the_dump_encoding():
    dump = (b"SET client_encoding = 'LATIN1';\nSET standard_conforming_strings = on;\n"
            b'COPY public."caf\xe9" (a) FROM stdin;\n1\n\\.\n--\n-- PostgreSQL database dump complete\n--\n')
    assert scan([dump]).tables == {'public."café"': 1}


def test_every_recorded_name_is_one_restore_can_check():
    from pgbeat.postgres.sqlscan import TABLE_NAME_RE

    for name in [*EXPECTED, *HOSTILE_EXPECTED]:
        assert TABLE_NAME_RE.fullmatch(name), name
    for bad in ("public.t; DROP TABLE x", 'public."open', "a.b.c", "x --", ""):
        assert not TABLE_NAME_RE.fullmatch(bad), bad


def test_the_identifier_classes_are_the_plain_ones_spelt_cheaply():
    """IDENTIFIER's classes match exactly the characters of their plain spelling, every code point."""
    every = "".join(map(chr, range(0x110000)))
    for cheap, plain in ((IDENTIFIER_FIRST, r"[A-Za-z_\u0080-\U0010ffff]"),
                         (IDENTIFIER_REST, r"[A-Za-z0-9_$\u0080-\U0010ffff]")):
        assert re.sub(cheap, "", every) == re.sub(plain, "", every)
        assert len(re.sub(cheap, "", every)) == 128 - len(re.findall(plain, every[:128]))
