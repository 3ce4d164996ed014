"""Tiers beyond the seed's three: a tier of any name with a schedule and a retention (`hourly`) is backed up,
listed, rotated by its own retention, scheduled by beat and cron, previewed by --dry-run, completed by the
shell, and restores; a tier name that cannot be one is a clear error naming it, and nothing is written."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import build_shelf
from pgbeat.monitoring.metrics import registry_for
from pgbeat.settings import load_settings
from tests.support import Service

pytestmark = pytest.mark.integration

HOURLY = {"schedule": "15 * * * *", "keep_days": 1, "min_keep": 2}


def test_an_extra_tier_backs_up_lists_rotates_and_restores(workdir, pg, make_db, monkeypatch):
    db = make_db("hourly")
    pg.sql("CREATE TABLE invoices AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 500) g", db)
    drill = {"tier": "hourly", "assertions": ["SELECT count(*) = 500 FROM invoices"]}
    targets = [pg.target("erp", db, drill=drill), pg.target("crm", db, tiers={"hourly": {"enabled": False}})]
    service = Service(workdir / "svc", None, targets, defaults={"tiers": {"hourly": HOURLY}})

    done = service.pgbeat("backup", "hourly")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "crm: tier hourly is disabled, skipped" in done.stdout
    [backup] = service.backups("hourly")
    assert backup.name.startswith("erp_backup_hourly_")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE((service.backup_root / "hourly").stat().st_mode) == 0o700
    manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
    assert manifest["tier"] == "hourly" and manifest["target"] == "erp"

    listed = json.loads(service.pgbeat("list", "--tier", "hourly", "--json").stdout)
    assert [b["file"] for b in listed] == [backup.name]
    everything = json.loads(service.pgbeat("list", "--json").stdout)
    assert backup.name in [b["file"] for b in everything]
    status = json.loads(service.pgbeat("status", "--json").stdout)
    hourly = [t for t in status["tiers"] if t["tier"] == "hourly"]
    assert [t["target"] for t in hourly] == ["erp"] and hourly[0]["last_success_file"] == backup.name
    for key in [k for k in os.environ if k.startswith(("DB_", "CELERY_", "PGBEAT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    text = generate_latest(registry_for(load_settings(env_file=None))).decode()
    sizes = {s.labels["target"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "pgbeat_backup_last_size_bytes" and s.labels["tier"] == "hourly"}
    assert sizes == {"erp": backup.stat().st_size}

    # The drill of the tier it names: the hourly backup, its check passed.
    drilled = service.pgbeat("drill", "--target", "erp")
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    [record] = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())["drills"]
    assert record["status"] == "passed"

    # A round trip: the hourly backup restores into a fresh database with the source's content.
    copy = f"{db}_copy"
    restored = service.pgbeat("restore", "--latest", "--target", "erp", "--tier", "hourly", "--into", copy, "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert pg.dump_text(copy) == pg.dump_text(db)

    # Its own retention: 30 hours of hourly backups, keep_days 1: the ones older than a day go, never
    # below min_keep; the daily tier's shelf is not touched by a rotation of the hourly one.
    written = build_shelf(service.backup_root, backup, ["erp"], 30, datetime.now(UTC), tier="hourly")
    daily = service.pgbeat("backup", "daily", "--target", "erp")
    assert daily.returncode == 0, daily.stdout + daily.stderr
    cutoff = datetime.now(UTC) - timedelta(days=1)
    old = sorted(p.name for p in written["erp"]
                 if datetime.strptime(p.name.split("_hourly_")[1][:15], "%Y%m%d_%H%M%S").replace(tzinfo=UTC) < cutoff)
    assert len(old) >= 5
    preview = service.pgbeat("rotate", "--tier", "hourly", "--dry-run")
    assert sorted(line.split(": would remove ")[1] for line in preview.stdout.splitlines()
                  if ": would remove " in line) == old, preview.stdout
    rotated = service.pgbeat("rotate", "--tier", "hourly")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert not any((service.backup_root / "hourly" / name).exists() for name in old)
    assert backup.exists() and len(service.backups("hourly")) == 31 - len(old)
    assert len(service.backups("daily")) == 1
    again = service.pgbeat("rotate", "--tier", "hourly")  # run twice: nothing more to remove
    assert again.returncode == 0 and "would remove" not in again.stdout and ": removed " not in again.stdout

    # `pgbeat rotate` with no --tier rotates the extra tier too (by its retention, not daily's).
    build_shelf(service.backup_root, backup, ["erp"], 3, datetime.now(UTC) - timedelta(days=3), tier="hourly")
    everything = service.pgbeat("rotate", "--target", "erp")
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert "erp hourly: 3 removed" in everything.stdout, everything.stdout


def test_an_extra_tier_is_scheduled_and_previewed(workdir, pg, make_db, monkeypatch):
    db = make_db("hourlyplan")
    targets = [pg.target("erp", db), pg.target("crm", db, tiers={"hourly": {"schedule": "45 */2 * * *"}})]
    service = Service(workdir / "svc", None, targets, defaults={"tiers": {"hourly": HOURLY}})

    plan = service.pgbeat("backup", "hourly", "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "schedule 15 * * * *" in plan.stdout and "schedule 45 */2 * * *" in plan.stdout
    assert f"{service.backup_root}/hourly/erp_backup_hourly_" in plan.stdout
    assert not (service.backup_root / "hourly").exists()

    crontab = workdir / "crontab"
    cron = service.pgbeat("cron", "install", "--file", str(crontab))
    assert cron.returncode == 0, cron.stdout + cron.stderr
    lines = [line for line in crontab.read_text().splitlines() if " backup hourly" in line]
    assert [line.split(" ")[:5] for line in lines] == [["45", "*/2", "*", "*", "*"], ["15", "*", "*", "*", "*"]]
    assert lines[0].endswith("--target crm >> " + str(service.backup_root / "logs" / "cron.log") + " 2>&1")

    from beat_schedule import build_beat_schedule

    for key in [k for k in os.environ if k.startswith(("DB_", "CELERY_", "PGBEAT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    schedule = build_beat_schedule(load_settings(env_file=None), datetime(2025, 11, 19, tzinfo=UTC))
    entry = schedule["backup crm hourly"]
    assert entry["args"] == ("crm", "hourly") and entry["options"]["shadow"] == "backup crm/hourly"
    assert entry["schedule"].minute == {45} and entry["schedule"].hour == set(range(0, 24, 2))
    assert schedule["backup erp hourly"]["schedule"].minute == {15}


@pytest.mark.parametrize(("tiers", "fault"), [
    ({"hourly": {"keep_days": 2}}, "tiers.hourly.schedule"),
    ({"hourly": {"schedule": "0 * * * *"}}, "tiers.hourly.keep_days"),
    ({"logs": {"schedule": "0 * * * *", "keep_days": 1}}, "reserved: BACKUP_ROOT/logs"),
    ({"wal": {"schedule": "0 * * * *", "keep_days": 1}}, "reserved: BACKUP_ROOT/wal"),
    ({"every_hour": {"schedule": "0 * * * *", "keep_days": 1}}, "lower-case letters or digits"),
    ({"Hourly": {"schedule": "0 * * * *", "keep_days": 1}}, "lower-case letters or digits"),
    ({"../x": {"schedule": "0 * * * *", "keep_days": 1}}, "lower-case letters or digits"),
    ({"": {"schedule": "0 * * * *", "keep_days": 1}}, "lower-case letters or digits"),
    ({"hourly": {"schedule": "61 * * * *", "keep_days": 1}}, "tiers.hourly.schedule"),
])
def test_a_tier_that_cannot_be_is_a_clear_error(workdir, pg, tiers, fault):
    service = Service(workdir / "svc", None, [pg.target("erp", "postgres", tiers=tiers)])
    for args in (["config", "check"], ["backup", "daily"]):
        done = service.pgbeat(*args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert fault in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (service.backup_root / "daily").exists()


@pytest.mark.parametrize(("options", "fault"), [
    ({"drill": {"tier": "hourly"}}, "drill.tier: 'hourly' is not one of this target's tiers"),
    ({"destinations": [{"name": "off", "kind": "ssh", "host": "127.0.0.1", "user": "u", "path": "/tmp/x",
                        "retention": {"yearly": {"keep_days": 400}}}]},
     "destinations.off.retention: 'yearly' is not one of this target's tiers"),
])
def test_a_tier_named_but_not_configured_is_a_clear_error(workdir, pg, options, fault):
    service = Service(workdir / "svc", None, [pg.target("erp", "postgres", **options)])
    done = service.pgbeat("config", "check")
    assert done.returncode == 2 and fault in done.stderr, done.stdout + done.stderr


def test_an_unknown_tier_on_the_command_line_is_a_usage_error(workdir, pg, make_db):
    db = make_db("hourlyusage")
    service = Service(workdir / "svc", None, [pg.target("erp", db)], defaults={"tiers": {"hourly": HOURLY}})
    for args in (["backup", "hourlyy"], ["rotate", "--tier", "hourlyy"], ["backup", "hourlyy", "--dry-run"]):
        done = service.pgbeat(*args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Unknown tier 'hourlyy'" in done.stderr and "daily, weekly, monthly, base, hourly" in done.stderr
    for args in (["backup", "Hourly"], ["list", "--tier", "hour_ly"], ["restore", "--latest", "--tier", "../x"]):
        done = service.pgbeat(*args)
        assert done.returncode == 2 and "is not a valid tier" in done.stderr, done.stdout + done.stderr
    assert not service.backups("daily") and not service.backups("hourly")
