"""Prometheus metrics, computed from the catalog at every scrape (`pgbeat metrics`, path /metrics).

Names (all gauges):
  pgbeat_backup_last_success_timestamp_seconds{target,tier}
  pgbeat_backup_last_attempt_timestamp_seconds{target,tier}
  pgbeat_backup_last_status{target,tier}                 1 = last attempt succeeded, 0 = failed
  pgbeat_backup_last_duration_seconds{target,tier}       of the newest verified backup
  pgbeat_backup_last_size_bytes{target,tier}
  pgbeat_backup_expected_interval_seconds{target,tier}   the tier's schedule period (absent for a database
                                                         gone from its whole-server target's server)
  pgbeat_backup_first_due_timestamp_seconds{target,tier} a tier that never succeeded: its first scheduled
                                                         time since it was configured (absent once it has)
  pgbeat_backup_size_anomaly{target,tier}                1 when the newest backup is suspiciously small
  pgbeat_backups_future_dated{target,tier}               backups dated after the scrape (a wrong clock)
  pgbeat_backup_last_clock_skew_seconds{target,tier}     the newest backup's worker clock minus the server's
  pgbeat_backups_kept{target,tier,destination}
  pgbeat_drill_last_timestamp_seconds{target}
  pgbeat_drill_last_status{target}                       1 = passed, 0 = failed
  pgbeat_drill_last_duration_seconds{target}
  pgbeat_drill_expected_interval_seconds{target}         the period of the target's drill schedule
  pgbeat_drill_first_due_timestamp_seconds{target}       drills enabled, never drilled: the first drill time
                                                         since the target was configured
  pgbeat_wal_archive_gaps{target}                        segments missing after the oldest base backup
  pgbeat_wal_window_start_timestamp_seconds{target}      the earliest point a PITR can reach
  pgbeat_wal_window_end_timestamp_seconds{target}        the latest point a PITR can reach
  pgbeat_wal_server_reachable{target}                    base tier: 1 = its server's pg_stat_archiver was read
  pgbeat_wal_archive_lag_segments{target}                the server's current WAL file minus the newest
                                                         segment in this host's archive (0-1 keeps up)
  pgbeat_wal_archive_lag_seconds{target}                 since the server last archived a WAL file
  pgbeat_wal_archive_failing{target}                     1 = archive_command's last failure is newer than
                                                         its last success (archiving is failing now)
  pgbeat_wal_archive_failed_count{target}                pg_stat_archiver.failed_count (since stats_reset)
  pgbeat_wal_receiver_streaming{target}                  wal.receiver: 1 = a host holds the receiver's lease
                                                         and streams, 0 = no host does (absent: Redis unread)
  pgbeat_wal_receiver_last_segment_timestamp_seconds{target}  when a receiver last archived a WAL file
  pgbeat_backup_root_free_bytes, pgbeat_backup_root_total_bytes  (BACKUP_ROOT's file system)
  pgbeat_backup_root_used_bytes                          bytes under BACKUP_ROOT
  pgbeat_runs_stuck, pgbeat_queue_oldest_age_seconds{queue}  (with a broker)
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from pgbeat.errors import ConfigError, UsageError
from pgbeat.monitoring.status import StatusReport, build_status
from pgbeat.settings import Settings, parse_listen

log = logging.getLogger(__name__)


def timestamp(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


class CatalogCollector:
    """A custom collector: every scrape reads the manifests afresh, so nothing is lost on restart."""

    def __init__(self, settings: Settings, runs: Callable[[], dict] | None = None) -> None:
        self.settings = settings
        self.runs = runs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = build_status(self.settings, datetime.now(UTC))
        if self.runs is not None:
            try:
                report.runs = self.runs()
            except Exception as exc:  # the broker being down must not hide the backup metrics
                log.warning("cannot read run states: %s", exc)
        yield from families(report)


def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def families(report: StatusReport) -> Iterator[GaugeMetricFamily]:
    tl = ["target", "tier"]
    success = gauge("pgbeat_backup_last_success_timestamp_seconds", "End of the newest verified backup.", tl)
    attempt = gauge("pgbeat_backup_last_attempt_timestamp_seconds", "End of the last attempt.", tl)
    status = gauge("pgbeat_backup_last_status", "1 if the last attempt succeeded, 0 if it failed.", tl)
    duration = gauge("pgbeat_backup_last_duration_seconds", "Duration of the newest verified backup.", tl)
    size = gauge("pgbeat_backup_last_size_bytes", "Size of the newest verified backup.", tl)
    interval = gauge("pgbeat_backup_expected_interval_seconds", "Period of the tier's schedule.", tl)
    anomaly = gauge("pgbeat_backup_size_anomaly", "1 if the newest backup is much smaller than usual.", tl)
    kept = gauge("pgbeat_backups_kept", "Verified backups kept.", [*tl, "destination"])
    future = gauge("pgbeat_backups_future_dated", "Backups dated after now (made under a wrong clock).", tl)
    skew = gauge("pgbeat_backup_last_clock_skew_seconds",
                 "Clock of the worker that made the newest backup minus the database server's.", tl)
    first_due = gauge("pgbeat_backup_first_due_timestamp_seconds",
                      "A tier that never succeeded: its first scheduled time since it was configured.", tl)
    for t in report.tiers:
        labels = [t.target, t.tier]
        if not t.gone:  # a database gone from its whole-server target's server: nothing is due
            interval.add_metric(labels, t.interval_s)
        if t.first_due_at and not t.gone:
            first_due.add_metric(labels, timestamp(t.first_due_at))
        anomaly.add_metric(labels, 1.0 if t.size_anomaly else 0.0)
        if t.last_success_at:
            success.add_metric(labels, timestamp(t.last_success_at))
            duration.add_metric(labels, t.duration_s or 0.0)
            size.add_metric(labels, float(t.size or 0))
        if t.last_attempt:
            attempt.add_metric(labels, timestamp(t.last_attempt["at"]))
            status.add_metric(labels, 1.0 if t.last_attempt["status"] == "success" else 0.0)
        for destination, count in t.kept.items():
            kept.add_metric([*labels, destination], float(count))
        future.add_metric(labels, float(len(t.future)))
        if t.clock_skew_s is not None:
            skew.add_metric(labels, t.clock_skew_s)
    yield from (success, attempt, status, duration, size, interval, first_due, anomaly, kept, future, skew)

    drill_at = gauge("pgbeat_drill_last_timestamp_seconds", "Time of the last restore drill.", ["target"])
    drill_status = gauge("pgbeat_drill_last_status", "1 if the last restore drill passed, 0 if not.", ["target"])
    drill_duration = gauge("pgbeat_drill_last_duration_seconds", "Duration of the last restore drill.", ["target"])
    drill_interval = gauge("pgbeat_drill_expected_interval_seconds", "Period of the target's drill schedule.",
                           ["target"])
    drill_first_due = gauge("pgbeat_drill_first_due_timestamp_seconds",
                            "Drills enabled, never drilled: the first drill time since the target was configured.",
                            ["target"])
    for target, seconds in report.drill_intervals.items():
        drill_interval.add_metric([target], seconds)
    for never in report.never_drilled:
        drill_first_due.add_metric([never.target], timestamp(never.first_due_at))
    for d in report.drills:
        drill_at.add_metric([d.target], timestamp(d.at))
        drill_status.add_metric([d.target], 1.0 if d.status == "passed" else 0.0)
        drill_duration.add_metric([d.target], d.duration_s)
    yield from (drill_at, drill_status, drill_duration, drill_interval, drill_first_due)

    gaps = gauge("pgbeat_wal_archive_gaps", "Segments missing in the WAL archive after the oldest base backup.",
                 ["target"])
    window_start = gauge("pgbeat_wal_window_start_timestamp_seconds",
                         "Earliest point a PITR can reach: the oldest base backup's consistent point.", ["target"])
    window_end = gauge("pgbeat_wal_window_end_timestamp_seconds",
                       "Latest point a PITR can reach: when the last segment before any gap was archived.", ["target"])
    reachable = gauge("pgbeat_wal_server_reachable", "1 if the target's pg_stat_archiver could be read.", ["target"])
    lag_segments = gauge("pgbeat_wal_archive_lag_segments",
                         "The server's current WAL file minus the newest segment in this host's archive.", ["target"])
    lag_seconds = gauge("pgbeat_wal_archive_lag_seconds", "Seconds since the server last archived a WAL file.",
                        ["target"])
    failing = gauge("pgbeat_wal_archive_failing", "1 if archive_command's last failure is newer than its last "
                                                  "success.", ["target"])
    failed = gauge("pgbeat_wal_archive_failed_count", "Failed archive_command runs since the server's statistics "
                                                      "were reset (pg_stat_archiver.failed_count).", ["target"])
    streaming = gauge("pgbeat_wal_receiver_streaming", "1 if a host holds the target's WAL receiver lease and "
                                                       "streams, 0 if no host does.", ["target"])
    received = gauge("pgbeat_wal_receiver_last_segment_timestamp_seconds",
                     "When the target's WAL receiver last archived a WAL file.", ["target"])
    for w in report.wal:
        r = w.receiver
        if r is not None and r.error is None:  # Redis unread: unknown, not "down"
            streaming.add_metric([w.target], 1.0 if r.holder else 0.0)
            if r.last_at:
                received.add_metric([w.target], timestamp(r.last_at))
        if w.base_backups:
            gaps.add_metric([w.target], float(w.gap_count))
        if w.window_start:
            window_start.add_metric([w.target], timestamp(w.window_start))
        if w.window_end:
            window_end.add_metric([w.target], timestamp(w.window_end))
        a = w.archiving
        if a is None:
            continue
        reachable.add_metric([w.target], 1.0 if a.reachable else 0.0)
        if not a.reachable:
            continue  # unknown, not 0: a server that cannot be read has its own alert (reachable = 0)
        if a.lag_segments is not None:
            lag_segments.add_metric([w.target], float(a.lag_segments))
        if a.lag_seconds is not None:
            lag_seconds.add_metric([w.target], a.lag_seconds)
        failing.add_metric([w.target], 1.0 if a.failing else 0.0)
        failed.add_metric([w.target], float(a.failed_count))
    yield from (gaps, window_start, window_end, reachable, lag_segments, lag_seconds, failing, failed, streaming,
                received)

    free = gauge("pgbeat_backup_root_free_bytes", "Free space on BACKUP_ROOT's file system.", [])
    free.add_metric([], float(report.disk_free))
    total = gauge("pgbeat_backup_root_total_bytes", "Size of BACKUP_ROOT's file system.", [])
    total.add_metric([], float(report.disk_total))
    used = gauge("pgbeat_backup_root_used_bytes", "Bytes under BACKUP_ROOT.", [])
    used.add_metric([], float(report.used))
    yield from (free, total, used)

    if report.runs:
        stuck = gauge("pgbeat_runs_stuck", "Runs whose heartbeat stopped before they finished.", [])
        stuck.add_metric([], float(len(report.runs.get("stuck", []))))
        oldest = gauge("pgbeat_queue_oldest_age_seconds", "Age of the oldest message waiting in a queue.", ["queue"])
        for queue, age in report.runs.get("queue_ages", {}).items():
            oldest.add_metric([queue], age)
        yield from (stuck, oldest)


def registry_for(settings: Settings, runs: Callable[[], dict] | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CatalogCollector(settings, runs))
    return registry


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        log.debug("metrics: " + format, *args)


def serve(settings: Settings, listen: str, runs: Callable[[], dict] | None = None) -> None:
    """Serve /metrics on `listen` (host:port, [v6]:port) until interrupted.

    Raise ConfigError if `listen` is not host:port, UsageError if the address cannot be bound.
    """
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError([f"metrics listen address: {exc}"]) from None
    app = make_wsgi_app(registry_for(settings, runs))
    server_class = WSGIServer6 if ":" in host else WSGIServer
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=QuietHandler)
    except OSError as exc:  # in use, not an address of this host, a name that does not resolve
        raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}",
                          hint="choose a free port on an address of this host (--listen or "
                               "monitoring.metrics_listen)") from None
    with server:
        log.warning("serving metrics on http://%s/metrics", listen)
        server.serve_forever()


class WSGIServer6(WSGIServer):
    address_family = socket.AF_INET6
