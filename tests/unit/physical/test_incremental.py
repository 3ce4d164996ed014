"""Chains of incremental base backups as pure functions, with a controlled clock: what the next base backup
is (full or incremental, and to which parent), what a restore combines, and what rotation keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgbeat.catalog.manifest import ChainInfo, Manifest, PhysicalInfo
from pgbeat.errors import PgbeatError
from pgbeat.physical.incremental import ServerFacts, chain_of, choose_parent, unsupported
from pgbeat.settings import TierPolicy
from pgbeat.steps.rotate import plan_rotation
from pgbeat.wal.retention import oldest_start
from tests.shelf import Shelved

NOW = datetime(2026, 3, 15, 1, 0, 30, tzinfo=UTC)
PG18 = ServerFacts(major=18, summarize_wal=True, timeline=1, system_identifier="7")
POLICY = TierPolicy(enabled=True, schedule="0 1 * * *", keep_days=7, min_keep=1)


def base(day: int, parent: Shelved | None = None, timeline: int = 1) -> Shelved:
    """The base backup taken `day` days before NOW: full, or incremental to `parent`."""
    when = NOW - timedelta(days=day, seconds=30)
    name = f"erp_backup_base_{when:%Y%m%d_%H%M%S}.tar.gz"
    if parent is None:
        chain = ChainInfo(kind="full")
    else:
        up = parent.manifest.chain
        chain = ChainInfo(kind="incremental", parent=parent.path, parent_sha256=parent.manifest.sha256,
                          root=up.root if up.incremental else parent.path, depth=up.depth + 1)
    segment = f"{timeline:08X}00000000{100 - day:08X}"
    manifest = Manifest(run_id=name, target="erp", tier="base", file=name, format="tar", codec="gzip", size=1,
                        server_version="18.1",
                        sha256=f"{day:064x}", complete=True, started_at=when, server_time=when, chain=chain,
                        physical=PhysicalInfo(timeline=timeline, start_lsn="0/1", end_lsn="0/2", start_wal=segment))
    return Shelved(name, manifest)


def weekly_chain(start: int, length: int) -> list[Shelved]:
    """A full base backup `start` days ago, then an incremental each day after it, each on the one before."""
    chain = [base(start)]
    for day in range(start - 1, start - length, -1):
        chain.append(base(day, chain[-1]))
    return chain


# --- full or incremental --------------------------------------------------------------------------------


def test_the_first_base_backup_is_full_without_a_warning():
    choice = choose_parent([], 7, NOW, PG18)
    assert choice.chain.kind == "full" and choice.parent is None and choice.note is None


def test_within_full_every_days_the_next_is_incremental_to_the_newest():
    chain = weekly_chain(3, 3)
    choice = choose_parent(chain, 7, NOW, PG18)
    assert choice.parent is chain[-1] and choice.note is None
    assert choice.chain == ChainInfo(kind="incremental", parent=chain[-1].path, parent_sha256=chain[-1].manifest.sha256,
                                     root=chain[0].path, depth=3)


def test_a_full_one_is_taken_once_the_newest_full_is_old_enough():
    chain = weekly_chain(7, 7)
    choice = choose_parent(chain, 7, NOW, PG18)
    assert choice.chain.kind == "full" and choice.parent is None and choice.note is None  # scheduled: no warning
    assert choose_parent(chain, 8, NOW, PG18).parent is chain[-1]


def test_an_older_server_or_summarize_wal_off_takes_a_full_one_and_says_why():
    for facts, words in ((ServerFacts(major=15), "PostgreSQL 15"),
                         (ServerFacts(major=18, summarize_wal=False), "summarize_wal is off")):
        choice = choose_parent(weekly_chain(2, 2), 7, NOW, facts)
        assert choice.chain.kind == "full" and choice.parent is None and words in choice.note
        assert unsupported(facts) == choice.note
    assert unsupported(PG18) is None


def test_a_broken_chain_a_new_timeline_or_encryption_take_a_full_one_with_a_warning():
    chain = weekly_chain(3, 3)
    broken = choose_parent([chain[0], chain[2]], 7, NOW, PG18)  # the middle one is gone
    assert broken.parent is None and "broken" in broken.note and chain[1].path in broken.note
    promoted = choose_parent(chain, 7, NOW, ServerFacts(major=18, summarize_wal=True, timeline=2))
    assert promoted.parent is None and "timeline 2" in promoted.note
    encrypted = choose_parent(chain, 7, NOW, PG18, encrypted=True)
    assert encrypted.parent is None and "encrypted" in encrypted.note
    for member in chain:
        member.manifest.server_version = "17.6"
    upgraded = choose_parent(chain, 7, NOW, PG18)
    assert upgraded.parent is None and "PostgreSQL 17" in upgraded.note and "upgrade" in upgraded.note


# --- what a restore combines ----------------------------------------------------------------------------


def test_the_chain_of_an_incremental_runs_from_its_full_root():
    chain = weekly_chain(4, 4)
    assert chain_of(chain, chain[-1]) == chain
    assert chain_of(chain, chain[0]) == [chain[0]]
    assert chain_of(chain, chain[2]) == chain[:3]


def test_a_chain_with_a_member_missing_or_replaced_is_refused_by_name():
    chain = weekly_chain(3, 3)
    with pytest.raises(PgbeatError, match="not there"):
        chain_of([chain[0], chain[2]], chain[2])
    impostor = Shelved(chain[1].path, chain[1].manifest.model_copy(update={"sha256": "f" * 64}))
    with pytest.raises(PgbeatError, match="SHA-256 differs"):
        chain_of([chain[0], impostor, chain[2]], chain[2])


# --- retention ------------------------------------------------------------------------------------------


def names(entries) -> list[str]:
    return sorted(e.path for e in entries)


def test_rotation_keeps_every_parent_of_a_kept_incremental():
    """A full 10 days ago with an incremental each day since: 7 days keep only the last 7, but those depend
    on the whole chain down to the full, so nothing is removed; the WAL is kept from the full's start."""
    chain = weekly_chain(10, 11)
    result = plan_rotation(chain, POLICY, NOW, "erp", "base")
    assert result.remove == [] and names(result.parents) == names(chain[:4])
    assert result.kept == len(chain)
    assert oldest_start(result.retained) == chain[0].manifest.physical.start_wal


def test_rotation_removes_a_whole_chain_once_no_kept_backup_depends_on_it_tip_first():
    old = weekly_chain(20, 5)      # days 20..16: all expired, nothing kept depends on them
    current = weekly_chain(6, 7)   # days 6..0: kept by age
    result = plan_rotation([*old, *current], POLICY, NOW, "erp", "base")
    assert names(result.remove) == names(old) and result.parents == []
    assert [e.path for e in result.removal_order()] == [e.path for e in reversed(old)]  # the tip goes first
    assert oldest_start(result.retained) == current[0].manifest.physical.start_wal


def test_rotation_keeps_the_parents_of_the_floor_and_of_a_pinned_incremental():
    chain = weekly_chain(30, 4)  # days 30..27, all expired: min_keep 1 keeps the newest, so its parents
    result = plan_rotation(chain, POLICY, NOW, "erp", "base")
    assert names(result.protected) == [chain[-1].path] and names(result.parents) == names(chain[:-1])
    older = weekly_chain(60, 3)
    result = plan_rotation([*older, *chain], POLICY, NOW, "erp", "base", pinned={older[1].path})
    assert names(result.pinned) == [older[1].path] and names(result.parents) == names([older[0], *chain[:-1]])
    assert names(result.remove) == [older[2].path]  # a pin keeps its parents, not its children


# --- the parent's backup_manifest, and the setting --------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_the_parents_backup_manifest_is_taken_out_of_its_stored_tar_alone(tmp_path, codec):
    import io
    import tarfile

    from pgbeat.physical.incremental import extract_backup_manifest
    from pgbeat.steps.compress import compress_file

    raw = tmp_path / "base.tar"
    with tarfile.open(raw, "w") as tar:
        for name, data in (("PG_VERSION", b"18\n"), ("base/1/1259", b"x" * 70000), ("backup_manifest", b'{"v": 2}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stored = tmp_path / f"base.tar{'' if codec == 'none' else '.c'}"
    if codec != "none":
        compress_file(raw, stored, codec, 3, 1)
    got = extract_backup_manifest(stored, codec, tmp_path / "parent.backup_manifest")
    assert got.read_bytes() == b'{"v": 2}' and got.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "PG_VERSION").exists() and not (tmp_path / "base").exists()  # nothing else unpacked


def test_a_parent_without_a_backup_manifest_or_that_does_not_decompress_is_refused(tmp_path):
    from pgbeat.errors import VerifyError
    from pgbeat.physical.incremental import extract_backup_manifest

    empty = tmp_path / "empty.tar"
    import tarfile

    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(VerifyError, match="holds no backup_manifest"):
        extract_backup_manifest(empty, "none", tmp_path / "m")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not gzip at all" * 100)
    with pytest.raises(VerifyError, match="cannot be read"):
        extract_backup_manifest(junk, "gzip", tmp_path / "m")


def test_full_every_days_is_a_setting_of_the_base_tier_only():
    from pydantic import ValidationError

    from pgbeat.settings import Target

    target = Target(name="erp", dbname="erp", tiers={"base": {"enabled": True, "full_every_days": 7}})
    assert target.tiers["base"].full_every_days == 7 and target.tiers["daily"].full_every_days is None
    with pytest.raises(ValidationError, match="incremental backups are base backups"):
        Target(name="erp", dbname="erp", tiers={"daily": {"full_every_days": 7}})
