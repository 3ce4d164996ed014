"""Archive lag and failures from a reading of pg_stat_archiver (pgbeat/wal/archiver.py): the pure part, with
readings made by hand. The same against a real server: tests/integration/test_archive_lag.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgbeat.monitoring.metrics import families
from pgbeat.monitoring.status import StatusReport, archiving_status, build_status, wal_status
from pgbeat.wal.archiver import ArchiverReading
from pgbeat.wal.walk import name, segments_after, walk_archive
from tests.unit.physical.test_pitr import settings  # noqa: F401 - the fixture (a base tier)
from tests.unit.wal.test_walk import segments, store

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
MIB = 1 << 20


def reading(**fields) -> ArchiverReading:
    """A primary that archived segment 9 a minute ago and is writing segment 10, unless `fields` say otherwise."""
    defaults = dict(reachable=True, archived_count=9, last_archived_wal=name(1, 0, 9),
                    last_archived_time=NOW - timedelta(minutes=1), current_wal=name(1, 0, 10), archive_mode="on",
                    segment_size=16 * MIB, server_time=NOW)
    return ArchiverReading(**{**defaults, **fields})


def test_segments_after_counts_across_logs_at_the_servers_segment_size_whatever_the_timeline():
    assert segments_after(name(1, 0, 0xFF), name(1, 1, 0), 16 * MIB) == 1
    assert segments_after(name(1, 0, 0xFE), name(2, 1, 1), 16 * MIB) == 3
    assert segments_after(name(1, 0, 3), name(1, 1, 0), 1024 * MIB) == 1  # 1 GiB: 4 segments per log
    assert segments_after(name(1, 0, 5), name(1, 0, 3), 16 * MIB) == -2


def test_a_server_that_keeps_up_is_one_segment_behind_and_not_failing():
    status = archiving_status(reading(), name(1, 0, 9))
    assert status.reachable and status.lag_segments == 1 and status.lag_seconds == 60.0
    assert not status.failing and status.failed_count == 0 and status.last_failed_wal is None


def test_an_archive_ahead_of_the_server_is_not_behind():
    assert archiving_status(reading(), name(1, 0, 12)).lag_segments == 0


def test_a_failure_newer_than_the_last_success_is_failing_an_older_one_is_not():
    failed = dict(failed_count=3, last_failed_wal=name(1, 0, 10))
    now_failing = archiving_status(reading(**failed, last_failed_time=NOW - timedelta(seconds=5)), name(1, 0, 9))
    assert now_failing.failing and now_failing.last_failed_wal == name(1, 0, 10) and now_failing.failed_count == 3
    recovered = archiving_status(reading(**failed, last_failed_time=NOW - timedelta(hours=1)), name(1, 0, 9))
    assert not recovered.failing and recovered.failed_count == 3
    never_archived = reading(**failed, last_archived_wal=None, last_archived_time=None, last_failed_time=NOW)
    status = archiving_status(never_archived, None)
    assert status.failing and status.lag_segments is None and status.lag_seconds is None


def test_a_standby_has_no_lag_in_segments_and_an_unreachable_server_says_why():
    standby = archiving_status(reading(in_recovery=True, current_wal=None), name(1, 0, 9))
    assert standby.standby and standby.lag_segments is None
    down = archiving_status(ArchiverReading(reachable=False, error="Cannot connect to db:5432: refused"), None)
    assert not down.reachable and down.error.endswith("refused") and down.failed_count is None


def test_the_walk_finds_the_newest_segment_without_a_base_backup(settings):  # noqa: F811
    store(settings, *segments(1, 0, 1, 4))
    walk = walk_archive(settings, "erp", [])
    assert walk.newest == name(1, 0, 4) and walk.start is None and walk.end is None


def metric_values(report: StatusReport) -> dict[str, float]:
    return {f"{family.name}{{{sample.labels.get('target', '')}}}": sample.value
            for family in families(report) for sample in family.samples}


def report_with(wal) -> StatusReport:
    return StatusReport(generated_at=NOW.isoformat(), backup_root="/b", disk_total=1, disk_free=1, used=0, tiers=[],
                        drills=[], wal=[wal])


def test_metrics_say_failing_and_the_lag_and_nothing_but_unreachable_for_a_server_down(settings):  # noqa: F811
    store(settings, *segments(1, 0, 1, 4))
    failing = reading(failed_count=2, last_failed_wal=name(1, 0, 5), last_failed_time=NOW, current_wal=name(1, 0, 8))
    values = metric_values(report_with(wal_status(settings, "erp", failing)))
    assert values["pgbeat_wal_server_reachable{erp}"] == 1 and values["pgbeat_wal_archive_failing{erp}"] == 1
    assert values["pgbeat_wal_archive_lag_segments{erp}"] == 4 and values["pgbeat_wal_archive_failed_count{erp}"] == 2
    assert values["pgbeat_wal_archive_lag_seconds{erp}"] == 60.0
    assert "pgbeat_wal_archive_gaps{erp}" not in values  # no base backup: nothing to have a gap in

    values = metric_values(report_with(wal_status(settings, "erp", ArchiverReading(reachable=False, error="down"))))
    assert values["pgbeat_wal_server_reachable{erp}"] == 0
    assert not [key for key in values if key.startswith(("pgbeat_wal_archive_lag", "pgbeat_wal_archive_fail"))]


def test_status_connects_to_no_server_of_a_target_without_the_base_tier(tmp_path, monkeypatch):
    from pgbeat.settings import load_settings
    from tests.support import clear_pgbeat_env

    def refuse(targets):
        raise AssertionError(f"connected to {[t.name for t in targets]}")

    clear_pgbeat_env(monkeypatch)
    config = tmp_path / "pgbeat.yaml"
    config.write_text(f"backup_root: {tmp_path / 'backups'}\ntimezone: UTC\n"
                      "targets:\n  - {name: erp, dbname: erp, host: 192.0.2.1}\n")
    monkeypatch.setenv("PGBEAT_CONFIG", str(config))
    monkeypatch.setattr("pgbeat.monitoring.status.read_archivers", refuse)
    assert build_status(load_settings(env_file=None), NOW).wal == []


@pytest.mark.parametrize(("archiving", "expected"), [
    (archiving_status(ArchiverReading(reachable=False, error="Cannot connect to [db]: refused"), None),
     "[red]server not reachable[/red]: Cannot connect to \\[db]: refused"),
    (archiving_status(reading(archive_mode="off"), None),
     "[red]archive_mode is off[/red] on the server: no WAL reaches the archive"),
    (archiving_status(reading(), name(1, 0, 9)),
     "[green]1 segment(s) behind[/green] (server at 00000001000000000000000A); last archived "
     "000000010000000000000009 1.0m ago; no failure"),
    (archiving_status(reading(current_wal=name(1, 0, 12)), name(1, 0, 9)), "[yellow]3 segment(s) behind[/yellow]"),
    (archiving_status(reading(), None), "[yellow]lag unknown[/yellow] (server at 00000001000000000000000A, "
                                        "the archive here holds nothing)"),
    (archiving_status(reading(in_recovery=True, current_wal=None), name(1, 0, 9)), "standby (no WAL file"),
    (archiving_status(reading(failed_count=1, last_failed_wal=name(1, 0, 10), last_failed_time=NOW),
                      name(1, 0, 9)),
     "; [red]failing: last failed 00000001000000000000000A at 2026-12-04 12:00:00 UTC[/red] (1 failure(s))"),
    (archiving_status(reading(failed_count=4, last_failed_wal=name(1, 0, 5),
                              last_failed_time=NOW - timedelta(hours=2)), name(1, 0, 9)),
     "; last failed 000000010000000000000005 at 2026-12-04 10:00:00 UTC (4 failure(s))"),
])
def test_the_archiving_line_says_the_lag_the_failure_or_the_reason_in_one_line(settings, archiving,  # noqa: F811
                                                                                 expected):
    from pgbeat.cli import archiving_text

    text = archiving_text(settings, archiving)
    assert "\n" not in text and expected in text, text
