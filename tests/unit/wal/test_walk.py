"""The archive walk: gaps between the oldest base backup and the newest segment, timeline switches seen
from the names, the end of what is whole, segment sizes other than 16 MiB."""

from __future__ import annotations

from pathlib import Path

from pgbeat.catalog.manifest import Entry, Manifest, PhysicalInfo
from pgbeat.wal.archive import folder_of, stored_name, wal_root
from pgbeat.wal.walk import name, walk_archive
from tests.unit.physical.test_pitr import settings  # noqa: F401 - the fixture (a base tier)

SHA = "ab" * 32


def store(settings, *segments: str) -> None:  # noqa: F811
    for segment in segments:
        folder = wal_root(settings, "erp") / folder_of(segment)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / stored_name(segment, SHA, "gzip", False)).write_bytes(b"x")


def base(start_wal: str) -> Entry:
    manifest = Manifest(run_id="r", target="erp", tier="base", file="b.tar.gz", format="tar", codec="gzip", size=1,
                        complete=True, started_at="2026-01-01T00:00:00Z",
                        physical=PhysicalInfo(timeline=int(start_wal[:8], 16), start_lsn="0/0", end_lsn="0/0",
                                              start_wal=start_wal))
    return Entry(path=Path("b.tar.gz"), manifest=manifest)


def segments(tli: int, log: int, first: int, last: int) -> list[str]:
    return [name(tli, log, seg) for seg in range(first, last + 1)]


def test_a_whole_archive_ends_at_its_newest_segment(settings):  # noqa: F811
    store(settings, *segments(1, 0, 1, 9))
    walk = walk_archive(settings, "erp", [base(name(1, 0, 3))])
    assert walk.whole and walk.start == name(1, 0, 3) and walk.end == walk.newest == name(1, 0, 9)
    assert walk.segments == 7 and walk.timelines == [1]


def test_a_missing_segment_is_a_gap_and_the_window_ends_before_it(settings):  # noqa: F811
    store(settings, *segments(1, 0, 1, 4), *segments(1, 0, 6, 7), name(1, 0, 9))
    walk = walk_archive(settings, "erp", [base(name(1, 0, 2)), base(name(1, 0, 6))])
    assert walk.start == name(1, 0, 2)  # from the oldest base backup
    assert walk.gaps == [name(1, 0, 5), name(1, 0, 8)] and walk.gap_count == 2
    assert walk.end == name(1, 0, 4) and walk.newest == name(1, 0, 9)


def test_a_promotion_is_followed_onto_the_new_timeline(settings):  # noqa: F811
    # Timeline 2 forked in segment 5: from there on, timeline 1's segments are not what recovery reads.
    store(settings, *segments(1, 0, 1, 4), name(1, 0, 6), *segments(2, 0, 5, 8))
    walk = walk_archive(settings, "erp", [base(name(1, 0, 2))])
    assert walk.whole and walk.timelines == [1, 2] and walk.end == name(2, 0, 8)


def test_the_walk_crosses_logs_at_the_segment_size_it_sees(settings):  # noqa: F811
    store(settings, *segments(1, 0, 0xFE, 0xFF), *segments(1, 1, 0, 1))  # 16 MiB: 256 segments per log
    assert walk_archive(settings, "erp", [base(name(1, 0, 0xFE))]).whole
    store(settings, *segments(1, 2, 0x3FE, 0x3FF), *segments(1, 3, 0, 0))  # 4 MiB segments: 1024 per log
    walk = walk_archive(settings, "erp", [base(name(1, 2, 0x3FE))])
    assert walk.whole and walk.end == name(1, 3, 0)


def test_no_base_backup_or_no_archive_walks_nothing(settings):  # noqa: F811
    assert walk_archive(settings, "erp", []).start is None
    assert walk_archive(settings, "erp", [base(name(1, 0, 1))]).end is None
