"""Retention with a controlled clock: age per tier, the min-keep floor, and foreign files left alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgbeat.catalog.manifest import Manifest, backup_name, checksum_path, manifest_path, write_manifest
from pgbeat.settings import TierPolicy, load_settings
from pgbeat.steps.rotate import future_warning, plan_rotation, rotate_target
from tests.shelf import Shelved

NOW = datetime(2025, 11, 19, 2, 0, 30, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path, monkeypatch):
    for key in ("PGBEAT_CONFIG", "DB_NAME", "CELERY_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "pgbeat.yaml"
    config.write_text(f"""
backup_root: {tmp_path / 'backups'}
timezone: UTC
targets:
  - {{name: erp, dbname: erp}}
  - {{name: crm, dbname: crm, tiers: {{daily: {{keep_days: 2, min_keep: 3}}}}}}
""")
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    return load_settings(env_file=None)


def make_backup(settings, target: str, tier: str, when: datetime, status: str = "verified") -> Path:
    name = backup_name(target, tier, when.strftime("%Y%m%d_%H%M%S"), ".sql.gz")
    path = settings.backup_root / tier / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really gzip")
    manifest = Manifest(run_id="r", target=target, tier=tier, file=name, format="plain", codec="gzip", size=15,
                        sha256="0" * 64, complete=status == "verified", status=status, started_at=when)
    write_manifest(manifest_path(path), manifest)
    checksum_path(path).write_text(manifest.checksum_lines())
    return path


def daily_series(settings, target: str, days: int) -> list[Path]:
    return [make_backup(settings, target, "daily", NOW - timedelta(days=d, seconds=20)) for d in range(days)]


def names(paths) -> list[str]:
    return sorted(p.name for p in paths)


def test_keeps_seven_days_of_daily_backups(settings):
    paths = daily_series(settings, "erp", 10)
    plan = rotate_target(settings, "erp", "daily", NOW)
    assert names(e.path for e in plan.remove) == names(paths[7:])
    assert all(p.exists() for p in paths[:7])
    for p in paths[7:]:
        assert not p.exists() and not manifest_path(p).exists() and not checksum_path(p).exists()


def test_run_twice_is_idempotent(settings):
    daily_series(settings, "erp", 10)
    rotate_target(settings, "erp", "daily", NOW)
    again = rotate_target(settings, "erp", "daily", NOW)
    assert again.remove == [] and len(again.keep) == 7


def test_dry_run_removes_nothing(settings):
    paths = daily_series(settings, "erp", 10)
    plan = rotate_target(settings, "erp", "daily", NOW, dry_run=True)
    assert len(plan.remove) == 3 and all(p.exists() for p in paths)


def test_min_keep_protects_the_newest_verified_even_when_all_expired(settings):
    """Backups failed for weeks: age-based retention must not empty the shelf."""
    old = [make_backup(settings, "crm", "daily", NOW - timedelta(days=30 + d)) for d in range(5)]
    failed = make_backup(settings, "crm", "daily", NOW - timedelta(days=20), status="failed")
    plan = rotate_target(settings, "crm", "daily", NOW)
    assert names(e.path for e in plan.protected) == names(old[:3])
    assert names(e.path for e in plan.remove) == names([*old[3:], failed])
    assert all(p.exists() for p in old[:3])


def test_unverified_backups_do_not_count_towards_min_keep(settings):
    verified = make_backup(settings, "erp", "daily", NOW - timedelta(days=40))
    make_backup(settings, "erp", "daily", NOW - timedelta(days=10), status="failed")
    plan = rotate_target(settings, "erp", "daily", NOW)
    assert [e.path for e in plan.protected] == [verified]


def test_clock_moved_backwards_removes_nothing_extra(settings):
    paths = daily_series(settings, "erp", 10)
    plan = rotate_target(settings, "erp", "daily", NOW - timedelta(days=365))
    assert plan.remove == [] and all(p.exists() for p in paths)


def test_clock_jump_forward_still_keeps_the_floor(settings):
    paths = daily_series(settings, "erp", 5)
    plan = rotate_target(settings, "erp", "daily", NOW + timedelta(days=3650))
    assert [e.path for e in plan.protected] == [paths[0]]
    assert paths[0].exists() and not any(p.exists() for p in paths[1:])


def test_foreign_files_and_other_targets_are_left_alone(settings):
    daily_series(settings, "erp", 10)
    crm = daily_series(settings, "crm", 10)
    folder = settings.backup_root / "daily"
    foreign = [folder / "erp_backup_daily_20200101_020000.sql.gz",  # our name pattern but no manifest
               folder / "notes.txt", folder / "erp_backup_daily_20200101_020000.sql.gz.sha256"]
    for path in foreign:
        path.write_text("mine, not pgbeat's")
    lying = folder / "crm_backup_daily_20200101_020000.sql.gz"  # a manifest of another tier does not count
    lying.write_text("x")
    monthly = make_backup(settings, "erp", "monthly", NOW - timedelta(days=100))
    manifest_path(monthly).rename(manifest_path(lying))

    rotate_target(settings, "erp", "daily", NOW)
    assert all(p.exists() for p in foreign) and lying.exists() and manifest_path(lying).exists()
    assert all(p.exists() for p in crm)


def test_orphan_sidecars_of_expired_backups_are_cleaned(settings):
    path = make_backup(settings, "erp", "daily", NOW - timedelta(days=30))
    make_backup(settings, "erp", "daily", NOW)
    path.unlink()  # a crash between publishing the sidecars and the data file
    rotate_target(settings, "erp", "daily", NOW)
    assert not manifest_path(path).exists() and not checksum_path(path).exists()


# --- skewed clocks (issue 11, promise 4): ages and the floor come from the database server's clock -----

YEARS = timedelta(days=5 * 365)


def shelved(name: str, server: datetime | None, worker: datetime | None = None, status: str = "verified") -> Shelved:
    """A backup whose dump started at `server` by the server's clock, run by a worker whose clock said
    `worker` (default: the same); `server=None` is an old manifest that knows only the worker's clock."""
    worker = worker or server
    return Shelved(name, Manifest(run_id=name, target="erp", tier="daily", file=name, format="plain", codec="gzip",
                                  size=1, sha256="0" * 64, complete=status == "verified", status=status,
                                  started_at=worker, server_time=server,
                                  clock_skew_s=None if server is None else (worker - server).total_seconds()))


POLICY = TierPolicy(enabled=True, schedule="0 2 * * *", keep_days=7, min_keep=1)


def plan(entries, now=NOW, policy=POLICY):
    return plan_rotation(entries, policy, now, "erp", "daily")


def paths(entries) -> list[str]:
    return [e.path for e in entries]


def test_a_backup_from_a_worker_years_ahead_is_aged_by_the_server_clock():
    old = shelved("old", NOW - timedelta(days=40), worker=NOW - timedelta(days=40) + YEARS)
    expired = shelved("expired", NOW - timedelta(days=20))
    fresh = shelved("fresh", NOW - timedelta(days=1))
    result = plan([fresh, old, expired])
    assert paths(result.remove) == ["old", "expired"] and paths(result.keep) == ["fresh"]
    assert result.future == []


def test_a_backup_from_a_worker_years_behind_is_not_removed_as_ancient():
    behind = shelved("behind", NOW - timedelta(hours=1), worker=NOW - timedelta(hours=1) - YEARS)
    result = plan([shelved("older", NOW - timedelta(days=2)), behind])
    assert result.remove == [] and paths(result.keep) == ["older", "behind"]


def test_the_floor_is_the_newest_by_the_server_clock():
    """All expired: min_keep keeps the newest by the server's clock, whatever the workers' clocks said."""
    entries = [shelved(f"b{d}", NOW - timedelta(days=30 + d), worker=NOW - timedelta(days=30 - 3 * d))
               for d in range(4)]  # worker clocks in the opposite order
    result = plan(entries, policy=POLICY.model_copy(update={"min_keep": 2}))
    assert paths(result.protected) == ["b1", "b0"] and paths(result.remove) == ["b3", "b2"]


def test_a_backup_dated_in_the_future_is_kept_flagged_and_never_the_floor():
    """An old manifest stamped by a clock years ahead: never removed by age, not counted towards min_keep
    (so the real newest backup stays protected), flagged."""
    future = shelved("future", None, worker=NOW + YEARS)
    older, newer = shelved("older", NOW - timedelta(days=30)), shelved("newer", NOW - timedelta(days=20))
    result = plan([future, older, newer])
    assert paths(result.future) == ["future"] and future not in result.remove
    assert paths(result.protected) == ["newer"] and paths(result.remove) == ["older"]
    assert result.kept == 2 and "dated in the future" in future_warning(result)[0]


def test_within_the_tolerance_is_not_the_future():
    """A few seconds of drift between hosts is not a wrong clock."""
    result = plan([shelved("now", NOW + timedelta(seconds=30))])
    assert result.future == [] and paths(result.keep) == ["now"]


def test_newest_skips_the_future_unless_it_is_alone():
    from pgbeat.catalog.manifest import newest

    future, real = shelved("future", None, worker=NOW + YEARS), shelved("real", NOW - timedelta(days=3))
    assert newest([future, real], NOW) is real
    assert newest([future], NOW) is future and newest([], NOW) is None


def test_the_rotate_step_removes_nothing_when_the_server_clock_cannot_be_read(tmp_path, monkeypatch):
    """A run record without a reading this host can bridge (another boot) and a server that is down:
    rotation is skipped with a warning, whatever the worker's clock says."""
    import socket

    from pgbeat.pipeline.record import DumpResult, StepContext, new_run
    from pgbeat.postgres.clock import ServerReading
    from pgbeat.steps.rotate import rotate_step

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    for key in ("PGBEAT_CONFIG", "DB_NAME", "CELERY_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "pgbeat.yaml"
    config.write_text(f"backup_root: {tmp_path / 'backups'}\ntimezone: UTC\ntargets:\n"
                      f"  - {{name: erp, dbname: erp, host: 127.0.0.1, port: {port}, connect_timeout: 2}}\n")
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    settings = load_settings(env_file=None)
    old = daily_series(settings, "erp", 10)
    run = new_run(settings, settings.target("erp"), "daily", now=NOW)
    reading = ServerReading(server_time=NOW.isoformat(), local_time=NOW.isoformat(), monotonic=1.0,
                            boot_id="another boot")
    run.steps.dump = DumpResult(path=str(run.work("dump.sql")), size=0, started_at=NOW, clock=reading)
    run = rotate_step(StepContext(settings, now=lambda: NOW + YEARS), run)
    assert run.steps.rotate.removed == [] and all(p.exists() for p in old)
    assert "nothing removed" in run.steps.rotate.errors[0]


def test_a_pinned_safety_backup_is_kept_and_not_counted():
    from pgbeat.catalog.manifest import PinRecord
    from pgbeat.steps.rotate import plan_safety_rotation

    entries = [shelved(f"pre_restore_erp_{day}.sql.gz", NOW - timedelta(days=day)) for day in range(6, 0, -1)]
    entries[0].manifest.pinned = PinRecord(at=NOW.isoformat(), note="before the migration")
    result = plan_safety_rotation(entries, 3, NOW, "erp")
    assert paths(result.pinned) == [entries[0].path]
    assert paths(result.keep) == paths(entries[-3:]) and paths(result.remove) == paths(entries[1:3])
    assert result.kept == 4
