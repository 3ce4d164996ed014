"""The WAL receiver's own decisions, without a server: slot names, which files of the receive folder are
done, and that a WAL file leaves the receive folder only once push_one archived it (in order, stopping at
the first failure). The receiver against a real cluster and Redis: tests/integration/test_receiver.py."""

from __future__ import annotations

import pytest
import yaml

from pgbeat.settings import Settings, load_settings
from pgbeat.wal import receiver
from pgbeat.wal.archive import PushResult, WalError
from pgbeat.wal.receiver import archive_completed, completed_files, slot_name
from tests.support import clear_pgbeat_env

SEGMENTS = ["000000010000000000000003", "000000010000000000000004", "000000010000000000000005"]


@pytest.fixture
def settings(monkeypatch, tmp_path) -> Settings:
    clear_pgbeat_env(monkeypatch)
    config = tmp_path / "pgbeat.yaml"
    config.write_text(yaml.safe_dump({"backup_root": str(tmp_path / "backups"), "timezone": "UTC", "targets": [
        {"name": "erp", "dbname": "erp", "host": "192.0.2.1", "wal": {"receiver": True}}]}))
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    return load_settings(env_file=None)


@pytest.mark.parametrize(("target", "slot"), [("erp_db", "pgbeat_erp_db"), ("ERP-db.1", "pgbeat_erp_db_1"),
                                              ("x" * 200, "pgbeat_" + "x" * 56)])
def test_the_slot_name_is_one_postgresql_accepts(target, slot):
    assert slot_name(target) == slot and len(slot) <= 63


def test_only_completed_wal_files_are_taken_history_first(tmp_path):
    for name in ("000000010000000000000004", "000000010000000000000003", "000000010000000000000005.partial",
                 "00000002.history", ".pgpass", "000000010000000000000006.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in completed_files(tmp_path)] == [
        "00000002.history", "000000010000000000000003", "000000010000000000000004"]
    assert completed_files(tmp_path / "absent") == []


def test_a_file_leaves_the_receive_folder_only_once_archived_and_a_failure_stops_the_round(settings, tmp_path,
                                                                                           monkeypatch):
    folder = tmp_path / "receive"
    folder.mkdir()
    for name in SEGMENTS:
        (folder / name).write_bytes(name.encode())
    pushed = []

    def push_one(settings, target, source, storages):
        pushed.append(source.name)
        if source.name == SEGMENTS[1]:
            return PushResult(source.name, error=WalError("the destination is down"))
        return PushResult(source.name, stored=object())

    monkeypatch.setattr(receiver, "push_one", push_one)
    monkeypatch.setattr(receiver, "hand_to_archive_owner", lambda *args: None)
    done = archive_completed(settings, settings.target("erp"), folder)
    assert done == [SEGMENTS[0]] and pushed == SEGMENTS[:2]  # the later one waits behind the failed one
    assert sorted(p.name for p in folder.iterdir()) == SEGMENTS[1:]


def test_a_real_push_stores_the_file_as_wal_push_does_then_removes_it(settings, tmp_path):
    folder = tmp_path / "receive"
    folder.mkdir()
    (folder / SEGMENTS[0]).write_bytes(b"wal" * 1000)
    assert archive_completed(settings, settings.target("erp"), folder) == [SEGMENTS[0]]
    assert not (folder / SEGMENTS[0]).exists()
    [stored] = (settings.backup_root / "wal" / "erp" / SEGMENTS[0][:16]).glob(f"{SEGMENTS[0]}-*")
    assert stored.stat().st_mode & 0o777 == 0o600
