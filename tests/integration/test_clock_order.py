"""Order is the order of the data (issue 11, promise 4): backups are dated by the database server's clock.

A worker whose clock is years ahead or behind (the in-process runner's `StepContext.now`, and real
processes under libfaketime) makes normal backups: "latest" (restore --latest, drills, status), rotation
(its cut-off and min_keep floor), the freshness metrics and the anomaly comparisons all follow the
server's clock; a backup dated in the future is flagged, kept, and never "latest" while others exist.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgbeat.catalog.manifest import list_backups, manifest_path, read_manifest
from pgbeat.monitoring.metrics import registry_for
from pgbeat.monitoring.status import build_status
from pgbeat.pipeline.record import StepContext
from pgbeat.pipeline.runner import run_inprocess
from pgbeat.restore.drill import run_drill
from pgbeat.restore.restore import latest_backup
from pgbeat.settings import load_settings
from pgbeat.steps.rotate import rotate_target, rotation_now
from tests.support import VENV_BIN, Service, free_port, run_cli

pytestmark = pytest.mark.integration

YEARS = timedelta(days=5 * 365)
KEEP = {"daily": {"keep_days": 7, "min_keep": 1}}


@pytest.fixture
def small_db(pg, make_db):
    db = make_db("clock")
    pg.sql("CREATE TABLE invoices AS SELECT i AS id FROM generate_series(1, 50) AS i", db)
    return db


@pytest.fixture
def service(workdir, pg, small_db, monkeypatch):
    service = Service(workdir, None, [pg.target("erp", small_db, tiers=KEEP, drill={"enabled": True})])
    monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
    for key in ("DB_NAME", "CELERY_BROKER_URL", "BACKUP_ROOT"):
        monkeypatch.delenv(key, raising=False)
    return service


def backup_with_clock(settings, offset: timedelta = timedelta(0)) -> Path:
    """Run the whole chain in-process as a worker whose clock is `offset` away from the real one."""
    ctx = StepContext(settings, now=lambda: datetime.now(UTC) + offset)
    run = run_inprocess(settings, "erp", "daily", ctx=ctx)
    assert run.status == "succeeded", run.failure
    return Path(run.final_path)


def metrics(settings) -> dict[str, float]:
    text = generate_latest(registry_for(settings)).decode()
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_worker_years_ahead_or_behind_changes_no_order(service, pg, small_db):
    settings = load_settings(env_file=None)
    first = backup_with_clock(settings)
    ahead = backup_with_clock(settings, YEARS)
    after = backup_with_clock(settings)

    m = read_manifest(manifest_path(ahead))
    assert abs((m.started_at - datetime.now(UTC) - YEARS).total_seconds()) < 300  # the worker's clock...
    assert m.started_at.strftime("%Y%m%d_%H%M%S")[:11] in ahead.name  # ...names the file, as the seed's did
    assert abs((m.server_time - datetime.now(UTC)).total_seconds()) < 300  # dated by the server
    assert abs(m.clock_skew_s - YEARS.total_seconds()) < 300
    assert any("ahead of the database server's" in w.text and w.kind == "clock" for w in m.warnings)
    assert first.exists(), "the worker years ahead rotated away a fresh backup"
    assert [e.path for e in list_backups(settings.backup_root, "erp")] == [first, ahead, after]
    assert latest_backup(settings, "erp").path == after

    status = {t.tier: t for t in build_status(settings, datetime.now(UTC)).tiers}["daily"]
    assert status.last_success_file == after.name and not status.overdue and status.future == []
    success = metrics(settings)["pgbeat_backup_last_success_timestamp_seconds{target=erp,tier=daily}"]
    assert abs(success - datetime.now(UTC).timestamp()) < 300
    drill = run_drill(settings, "erp")
    assert drill.passed and drill.backup == after.name

    behind = backup_with_clock(settings, -YEARS)  # its rotation, by the server's clock, keeps everything
    assert all(p.exists() for p in (first, ahead, after, behind))
    assert read_manifest(manifest_path(behind)).clock_skew_s < -YEARS.total_seconds() + 300
    assert latest_backup(settings, "erp").path == behind
    last = backup_with_clock(settings)  # a normal run's rotation does not take the fresh one for ancient
    assert behind.exists() and latest_backup(settings, "erp").path == last
    assert metrics(settings)["pgbeat_backup_last_clock_skew_seconds{target=erp,tier=daily}"] == pytest.approx(0, abs=60)


def legacy_copy(backup: Path, stamp: str, started_at: datetime) -> Path:
    """A copy of `backup` under an old, unsealed manifest (version 1: no server clock) dated `started_at`."""
    copy = backup.with_name(backup.name.replace(backup.name.split("_daily_")[1][:15], stamp))
    shutil.copyfile(backup, copy)
    data = json.loads(manifest_path(backup).read_text())
    for key in ("seal", "server_time", "clock_skew_s"):
        data.pop(key, None)
    data.update(pgbeat_manifest=1, file=copy.name, started_at=started_at.isoformat(), run_id="legacy")
    manifest_path(copy).write_text(json.dumps(data))
    copy.with_name(copy.name + ".sha256").write_text(f"{data['sha256']}  {copy.name}\n")
    return copy


def test_a_backup_dated_in_the_future_is_flagged_kept_and_never_latest(service):
    settings = load_settings(env_file=None)
    real = backup_with_clock(settings)
    future = legacy_copy(real, "20310101_020000", datetime.now(UTC) + YEARS)
    assert run_cli(service, "verify", str(future)).exit_code == 0  # an old manifest loads and verifies

    assert latest_backup(settings, "erp").path == real
    status = {t.tier: t for t in build_status(settings, datetime.now(UTC)).tiers}["daily"]
    assert status.future == [future.name] and status.last_success_file == real.name
    assert any("dated in the future" in w for w in status.warnings)
    assert metrics(settings)["pgbeat_backups_future_dated{target=erp,tier=daily}"] == 1.0
    text = run_cli(service, "status").output
    assert "dated in the future" in text and future.name in text

    plan = rotate_target(settings, "erp", "daily", rotation_now(settings, "erp") + timedelta(days=30))
    assert [e.path for e in plan.future] == [future] and future.exists()
    assert [e.path for e in plan.protected] == [real] and real.exists()  # the floor is the real newest
    newer = backup_with_clock(settings)
    warnings = read_manifest(manifest_path(newer)).warnings
    assert any("dated in the future" in w.text and future.name in w.text for w in warnings)


FAKETIME = shutil.which("faketime")


@pytest.mark.skipif(FAKETIME is None, reason="libfaketime (Debian package faketime) is not installed")
def test_real_processes_with_a_wrong_clock_rotate_by_the_server(service, pg, small_db):
    """`pgbeat backup` and `pgbeat rotate` as real processes whose clock is 5 years off (libfaketime)."""
    def pgbeat(*args: str, offset: str | None = None) -> subprocess.CompletedProcess:
        prefix = [FAKETIME, "-f", offset] if offset else []
        result = subprocess.run([*prefix, str(VENV_BIN / "pgbeat"), *args], cwd=service.cwd, env=service.env(),
                                capture_output=True, text=True, timeout=120)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    normal = backup_with_clock(load_settings(env_file=None))
    assert pgbeat("backup", "daily", offset="+1825d").returncode == 0
    [ahead] = set(service.backups()) - {normal}
    assert f"_daily_{(datetime.now(UTC) + YEARS).year}" in ahead.name  # the seed's stamp, from the worker's clock
    assert abs(json.loads(manifest_path(ahead).read_text())["clock_skew_s"] - YEARS.total_seconds()) < 300
    assert normal.exists(), "the backup run years ahead rotated away a fresh backup"

    rotated = pgbeat("rotate", offset="+1825d")
    assert rotated.returncode == 0 and "0 removed, 2 kept" in rotated.stdout, rotated.stdout + rotated.stderr
    assert normal.exists() and ahead.exists()
    daily = {t.tier: t for t in build_status(load_settings(env_file=None), datetime.now(UTC)).tiers}["daily"]
    assert daily.last_success_file == ahead.name and not daily.overdue

    service.config["targets"][0]["port"] = free_port()  # the server is gone: rotate removes nothing
    service.write_config()
    down = pgbeat("rotate", offset="+1825d")
    assert down.returncode == 1 and "nothing removed" in down.stderr and normal.exists() and ahead.exists()
