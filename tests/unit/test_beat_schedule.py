"""Cron arithmetic and the beat schedule built from settings."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from beat_schedule import build_beat_schedule
from pgbeat.schedule import expiry_seconds, next_runs, slot_id
from pgbeat.settings import load_settings

SP = ZoneInfo("America/Sao_Paulo")


def test_slot_is_the_latest_fire_time_not_after_now():
    at_two = datetime(2025, 11, 19, 5, 0, 0, tzinfo=UTC)  # 02:00 in São Paulo
    assert slot_id("0 2 * * *", at_two, SP) == "20251119T0200-0300"
    assert slot_id("0 2 * * *", at_two.replace(second=40), SP) == "20251119T0200-0300"
    assert slot_id("0 2 * * *", at_two.replace(hour=4, minute=59), SP) == "20251118T0200-0300"


def test_next_runs_of_the_seed_tiers():
    now = datetime(2025, 11, 19, 12, 0, tzinfo=UTC)  # a Wednesday
    assert next_runs("0 3 * * 0", now, SP)[0].strftime("%a %Y-%m-%d %H:%M") == "Sun 2025-11-23 03:00"
    assert next_runs("0 4 1 * *", now, SP)[0].strftime("%Y-%m-%d %H:%M") == "2025-12-01 04:00"


@pytest.mark.parametrize(("expr", "low", "high"), [
    ("0 2 * * *", 80000, 86400), ("0 3 * * 0", 7 * 86400 * 0.9, 7 * 86400),
    ("0 4 1 * *", 26 * 86400, 28 * 86400), ("* * * * *", 59, 61)])
def test_expiry_is_just_short_of_the_next_run(expr, low, high):
    assert low <= expiry_seconds(expr, datetime(2025, 11, 19, tzinfo=UTC), SP) < high


def test_beat_schedule_has_one_entry_per_enabled_target_tier(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("""
timezone: America/Sao_Paulo
targets:
  - {name: erp, dbname: erp}
  - {name: crm, dbname: crm, tiers: {monthly: {enabled: false}, daily: {schedule: "30 1 * * 1-5"}}}
""")
    for key in ("DB_NAME", "CELERY_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    schedule = build_beat_schedule(load_settings(env_file=None), datetime(2025, 11, 19, tzinfo=UTC))
    assert sorted(schedule) == ["backup crm daily", "backup crm weekly", "backup erp daily", "backup erp monthly",
                                "backup erp weekly", "drill crm", "drill erp", "reconcile runs"]
    assert schedule["reconcile runs"]["task"] == "tasks.reconcile"
    drill = schedule["drill erp"]
    assert drill["task"] == "tasks.drill" and drill["args"] == ("erp",)
    assert (drill["schedule"].hour, drill["schedule"].day_of_week) == ({5}, {0})  # weekly by default
    entry = schedule["backup crm daily"]
    assert entry["task"] == "tasks.backup" and entry["args"] == ("crm", "daily")
    assert entry["kwargs"] == {"scheduled": True}
    assert entry["options"]["priority"] == 6  # behind manual runs (0) on Redis
    # Flower, `celery events` and `celery inspect` show the step, target and tier, not tasks.backup.
    assert entry["options"]["shadow"] == "backup crm/daily" and drill["options"]["shadow"] == "drill erp"
    cron = entry["schedule"]
    assert (cron.minute, cron.hour, cron.day_of_week) == ({30}, {1}, {1, 2, 3, 4, 5})
    assert 0 < entry["options"]["expires"] < 86400
    weekly = schedule["backup erp weekly"]["schedule"]
    assert weekly.day_of_week == {0} and weekly.hour == {3}


def test_a_target_with_the_base_tier_gets_a_pitr_drill_on_its_own_schedule(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("""
timezone: UTC
targets:
  - {name: erp, dbname: erp, tiers: {base: {enabled: true}}, drill: {pitr_schedule: "30 7 * * 6"}}
  - {name: crm, dbname: crm}
  - {name: nodrill, dbname: nodrill, tiers: {base: {enabled: true}}, drill: {enabled: false}}
""")
    for key in ("DB_NAME", "CELERY_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    schedule = build_beat_schedule(load_settings(env_file=None), datetime(2025, 11, 19, tzinfo=UTC))
    assert [name for name in schedule if name.endswith(" pitr")] == ["drill erp pitr"]
    entry = schedule["drill erp pitr"]
    assert entry["task"] == "tasks.drill" and entry["args"] == ("erp",) and entry["kwargs"] == {"pitr": True}
    assert (entry["schedule"].minute, entry["schedule"].hour, entry["schedule"].day_of_week) == ({30}, {7}, {6})
    assert entry["options"]["shadow"] == "drill erp/pitr"
