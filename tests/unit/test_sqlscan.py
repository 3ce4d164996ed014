"""The dump scanner counts rows per table and sees the closing line, whatever the chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pgbeat.sqlscan import DumpScanner

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
