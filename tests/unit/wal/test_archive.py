"""The WAL archive's names: which files are WAL files, where each is kept, what a stored name says, and
the order in which push-ahead takes the files PostgreSQL has marked ready."""

from __future__ import annotations

import pytest

from pgbeat.errors import UsageError
from pgbeat.wal.archive import (
    WalConflictError,
    check_wal_name,
    folder_of,
    following_segments,
    parse_stored,
    ready_files,
    same_or_conflict,
    stored_copies,
    stored_name,
)

SHA = "ab" * 32
OTHER = "cd" * 32


@pytest.mark.parametrize("name", ["000000010000000000000003", "000000010000000000000003.partial",
                                  "000000010000000000000003.00000028.backup", "00000002.history"])
def test_what_postgresql_archives_is_a_wal_name(name):
    assert check_wal_name(name) == name


@pytest.mark.parametrize("name", ["", "00000001000000000000003", "000000010000000000000003.ready",
                                  "000000010000000000000003x", "000000010000000000000003a", "../00000002.history",
                                  "00000002.history.tmp", "RECOVERYXLOG", "archive_status"])
def test_anything_else_is_refused_naming_it(name):
    with pytest.raises(UsageError, match="not the name of a WAL file"):
        check_wal_name(name)


def test_a_stored_name_carries_the_raw_sha256_codec_and_encryption():
    name = stored_name("000000010000000000000003", SHA, "zstd", True)
    assert name == f"000000010000000000000003-{SHA}.zst.age"
    stored = parse_stored(name, folder_of("000000010000000000000003"))
    assert (stored.wal, stored.sha256, stored.codec, stored.encrypted) == ("000000010000000000000003", SHA, "zstd",
                                                                           True)
    assert stored.key("erp") == f"wal/erp/0000000100000000/{name}"
    assert parse_stored(stored_name("00000002.history", SHA, "none", False), "history").codec == "none"
    assert folder_of("00000002.history") == "history"


def test_the_copies_of_a_segment_are_not_those_of_its_partial_or_backup_files():
    names = [stored_name("000000010000000000000003", SHA, "gzip", False),
             stored_name("000000010000000000000003.partial", OTHER, "gzip", False),
             stored_name("000000010000000000000003.00000028.backup", OTHER, "gzip", False),
             f".{stored_name('000000010000000000000003', OTHER, 'gzip', False)}.partial-1a2b3c4d", "junk"]
    [copy] = stored_copies(names, "000000010000000000000003")
    assert copy.sha256 == SHA
    assert same_or_conflict([copy], copy.wal, SHA, "here") == copy
    with pytest.raises(WalConflictError, match="000000010000000000000003: here already holds"):
        same_or_conflict([copy], copy.wal, OTHER, "here")


def test_push_ahead_takes_ready_files_in_postgresql_order_without_its_own(tmp_path):
    status = tmp_path / "archive_status"
    status.mkdir()
    for name in ("000000020000000000000005", "000000010000000000000004", "00000002.history",
                 "000000010000000000000003", "000000010000000000000002.00000028.backup"):
        (status / f"{name}.ready").touch()
    (status / "000000010000000000000001.done").touch()
    (status / "stray.ready").touch()
    picked = ready_files(tmp_path / "000000010000000000000003")
    assert [p.name for p in picked] == ["00000002.history", "000000010000000000000002.00000028.backup",
                                        "000000010000000000000004", "000000020000000000000005"]
    assert ready_files(tmp_path / "nowhere" / "000000010000000000000003") == []


def test_prefetch_names_the_following_segments_across_a_log_boundary():
    assert following_segments("0000000200000000000000FE", 3) == [
        "0000000200000000000000FF", "000000020000000100000000", "000000020000000100000001"]
    assert following_segments("00000002.history", 3) == []
    assert following_segments("000000010000000000000003.partial", 3) == []
    assert following_segments("000000010000000000000003", 0) == []
