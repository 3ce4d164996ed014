"""Point-in-time recovery's decisions: which base backup, which settings, which folders are refused."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime, timedelta

import pytest

from pgbeat.catalog.manifest import Manifest, PhysicalInfo, backup_name, manifest_path, write_manifest
from pgbeat.errors import PgbeatError, UsageError
from pgbeat.physical.pitr import (
    RecoveryGoal,
    choose_base,
    empty_data_dir,
    lsn_value,
    recovery_settings,
    server_command,
    write_recovery,
)
from pgbeat.settings import load_settings
from tests.support import clear_pgbeat_env

T0 = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path, monkeypatch):
    clear_pgbeat_env(monkeypatch)
    config = tmp_path / "pgbeat.yaml"
    config.write_text(f"backup_root: {tmp_path / 'backups'}\ntimezone: UTC\n"
                      "targets:\n  - {name: erp, dbname: erp, tiers: {base: {enabled: true}}}\n")
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    return load_settings(env_file=None)


def base_backup(settings, stop: datetime, end_lsn: str, status: str = "verified") -> str:
    name = backup_name("erp", "base", (stop - timedelta(minutes=5)).strftime("%Y%m%d_%H%M%S"), ".tar.gz")
    path = settings.backup_root / "base" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"a tar")
    write_manifest(manifest_path(path), Manifest(
        run_id="r", target="erp", tier="base", file=name, format="tar", codec="gzip", size=5, sha256="0" * 64,
        complete=True, status=status, started_at=stop - timedelta(minutes=5), physical=PhysicalInfo(
            timeline=1, start_lsn="0/1000028", end_lsn=end_lsn, start_wal="000000010000000000000001",
            stop_time=stop)))
    return name


def test_the_newest_base_backup_consistent_before_the_target_is_chosen(settings):
    first = base_backup(settings, T0, "0/3000100")
    second = base_backup(settings, T0 + timedelta(days=7), "0/9000100")
    base_backup(settings, T0 + timedelta(days=8), "0/A000100", status="failed")  # never chosen
    at = lambda when: choose_base(settings, "erp", RecoveryGoal("time", when)).path.name  # noqa: E731
    assert at(T0 + timedelta(days=3)) == first
    assert at(T0 + timedelta(days=7, seconds=1)) == second
    assert at(T0 + timedelta(days=7)) == second  # consistent at exactly that moment
    assert choose_base(settings, "erp", RecoveryGoal()).path.name == second
    assert choose_base(settings, "erp", RecoveryGoal("lsn", "0/5000000")).path.name == first
    with pytest.raises(UsageError) as before:
        choose_base(settings, "erp", RecoveryGoal("time", T0 - timedelta(seconds=1)))
    assert "before the restorable window" in before.value.message and "2026-03-01 01:00:00" in before.value.message
    with pytest.raises(UsageError, match="restorable window"):
        choose_base(settings, "erp", RecoveryGoal("lsn", "0/2000000"))


def test_no_base_backup_says_how_to_take_one(settings):
    with pytest.raises(PgbeatError) as failure:
        choose_base(settings, "erp", RecoveryGoal())
    assert "pgbeat backup base --target erp" in failure.value.hint


@pytest.mark.parametrize(("goal", "expected"), [
    (RecoveryGoal(), {}),
    (RecoveryGoal("immediate"), {"recovery_target": "immediate"}),
    (RecoveryGoal("time", T0), {"recovery_target_time": "2026-03-01 01:00:00+00:00"}),
    (RecoveryGoal("lsn", "0/3000060"), {"recovery_target_lsn": "0/3000060"}),
    (RecoveryGoal("xid", "741"), {"recovery_target_xid": "741"}),
    (RecoveryGoal("name", "before upgrade"), {"recovery_target_name": "before upgrade"}),
])
def test_each_recovery_target_is_one_setting_and_the_copy_does_not_archive(goal, expected):
    values = recovery_settings(goal, "cmd")
    targets = {k: v for k, v in values.items() if k.startswith("recovery_target") and k not in
               ("recovery_target_action", "recovery_target_timeline")}
    assert targets == expected
    assert values["recovery_target_action"] == "promote" and values["archive_mode"] == "off"
    assert values["restore_command"] == "cmd" and values["recovery_target_timeline"] == "latest"
    standby = recovery_settings(goal, "cmd", standby=True, primary_conninfo="host=db1 user=rep", archive=True)
    assert not any(k.startswith("recovery_target_") and k != "recovery_target_timeline" for k in standby)
    assert standby["primary_conninfo"] == "host=db1 user=rep" and "archive_mode" not in standby


@pytest.mark.parametrize("goal", [("lsn", "3000060"), ("lsn", "0/3000060; rm -rf /"), ("xid", "12a"),
                                  ("time", datetime(2026, 3, 1)), ("nowhere", None)])
def test_a_malformed_recovery_target_is_a_usage_error(goal):
    with pytest.raises(UsageError):
        RecoveryGoal(*goal)
    with pytest.raises(UsageError):
        RecoveryGoal(timeline="2; DROP")


def test_lsns_compare_as_numbers():
    assert lsn_value("0/A000000") > lsn_value("0/9FFFFFF") and lsn_value("1/0") > lsn_value("0/FFFFFFFF")


def test_the_restore_command_quotes_every_path(settings, tmp_path):
    hostile = settings.model_copy(update={"config_file": tmp_path / "it's a $(config).yaml"})
    command = server_command("/opt/pg beat/bin/pgbeat", hostile, "erp")
    words = shlex.split(command.replace("%f", "F").replace("%p", "P"))
    assert words[0] == f"PGBEAT_CONFIG={tmp_path}/it's a $(config).yaml"
    assert words[2:] == ["/opt/pg beat/bin/pgbeat", "wal-fetch", "F", "P", "--target", "erp"]


def test_settings_are_written_quoted_and_a_used_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    assert empty_data_dir(data) == data and oct(data.stat().st_mode & 0o777) == "0o700"
    (data / "postgresql.auto.conf").write_text("port = 5432\n")
    (data / "postmaster.pid").write_text("123\n")
    write_recovery(data, {"restore_command": "x '%f'", "port": "5999"}, standby=False)
    text = (data / "postgresql.auto.conf").read_text()
    assert "restore_command = 'x ''%f'''" in text and text.index("5432") < text.index("5999")
    assert (data / "recovery.signal").exists() and not (data / "postmaster.pid").exists()
    with pytest.raises(UsageError, match="not an empty folder"):
        empty_data_dir(data)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        empty_data_dir(tmp_path / "file")
