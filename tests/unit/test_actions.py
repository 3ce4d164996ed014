"""The command line's actions (pgbeat.actions): the same work as the pipeline's steps, typed results."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pgbeat import actions, errors
from pgbeat.steps.rotate import rotate_tier
from tests.unit.steps.test_rotate import NOW, daily_series, names, settings  # noqa: F401 - the fixture


def test_selected_targets(settings):  # noqa: F811
    assert actions.selected_targets(settings, None) == ["crm", "erp"]
    assert actions.selected_targets(settings, "erp") == ["erp"]
    with pytest.raises(errors.UnknownTargetError) as exc:
        actions.selected_targets(settings, "nope")
    assert exc.value.exit_code == errors.EXIT_CONFIG


def test_rotate_is_the_rotate_steps_own_rotation(settings):  # noqa: F811
    """`pgbeat rotate` removes exactly what the step's rotate_tier removes, at the same time."""
    paths = daily_series(settings, "erp", 10)
    preview = rotate_tier(settings, "erp", "daily", NOW, dry_run=True)
    [done] = actions.rotate(settings, ["erp"], "daily", now=NOW)
    [rotation] = done.tiers
    assert done.skipped is None and rotation.now == NOW
    assert names(e.path for e in rotation.local.remove) == names(e.path for e in preview.local.remove) == names(
        paths[7:])
    assert all(not p.exists() for p in paths[7:]) and all(p.exists() for p in paths[:7])
    assert rotation.warnings() == []


def test_rotate_dry_run_removes_nothing_and_every_enabled_tier_is_rotated(settings):  # noqa: F811
    paths = daily_series(settings, "erp", 10)
    [done] = actions.rotate(settings, ["erp"], None, now=NOW + timedelta(days=1), dry_run=True)
    # Every enabled tier, then the safety backups (by count).
    assert [r.tier for r in done.tiers] == [*settings.target("erp").enabled_tiers(), "pre_restore"]
    assert all(p.exists() for p in paths)


def test_rotate_without_the_servers_clock_skips_and_removes_nothing(settings, monkeypatch):  # noqa: F811
    import pgbeat.steps.rotate

    def unreachable(target):
        raise errors.TransientDumpError(f"cannot reach {target.name}")

    monkeypatch.setattr(pgbeat.steps.rotate, "ask_server_time", unreachable)
    paths = daily_series(settings, "crm", 5)
    [done] = actions.rotate(settings, ["crm"], "daily")
    assert done.skipped and "clock could not be read" in done.skipped and done.tiers == []
    assert all(p.exists() for p in paths)
