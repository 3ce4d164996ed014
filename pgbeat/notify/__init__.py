"""The notify step: tell the world how a run ended. It always runs, after success and after failure.

Channels implement `Notifier.send(event)`; a channel that fails is logged and never turns a good backup
into a failed one. This release ships the event log (`BACKUP_ROOT/logs/events.jsonl`, one JSON object per
outcome), which monitoring reads; chat and mail channels plug in behind the same interface.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from pgbeat import runlog
from pgbeat.anomaly import backup_warnings, disk_warnings
from pgbeat.catalog import find_backup, manifest_path, record_attempt, update_manifest
from pgbeat.errors import PgbeatError
from pgbeat.notify import healthchecks
from pgbeat.notify.apprise_channel import AppriseNotifier
from pgbeat.notify.base import Event, Notifier, event_from_run
from pgbeat.notify.eventlog import EventLogNotifier
from pgbeat.run import Run, StepContext
from pgbeat.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Event", "EventLogNotifier", "Notifier", "event_from_run", "notifiers", "notify_step", "send_event"]


def notifiers(settings: Settings, event: Event) -> list[Notifier]:
    """The event log, then every Apprise channel of the event's target that wants this kind of event."""
    channels = settings.channels(event.target) if event.target in settings.targets else settings.notify
    return [EventLogNotifier(settings.backup_root),
            *(AppriseNotifier(c) for c in channels if c.wants(event.category))]


def send_event(settings: Settings, event: Event) -> tuple[list[str], list[str]]:
    """Send `event` through every channel of its target; return the channels that took it and those that failed."""
    sent, failed = [], []
    for channel in notifiers(settings, event):
        try:
            channel.send(event)
            sent.append(channel.name)
        except Exception as exc:  # a channel must never fail the backup
            log.warning("notification through %s failed: %s", channel.name, exc)
            failed.append(channel.name)
    return sent, failed


def notify_step(ctx: StepContext, run: Run) -> Run:
    """Record the run's outcome in its log and send it to every channel; return the record."""
    t0 = time.monotonic()
    if run.status == "running":  # every earlier step succeeded: a failure sets "failed" before notify
        run.status = "succeeded"
    settings = ctx.settings
    event = event_from_run(settings, run, ctx.now())
    entry = find_backup(Path(run.final_path)) if run.final_path else None
    if event.kind == "success" and entry is not None:
        event.warnings += backup_warnings(settings, entry)
        if event.warnings:
            update_manifest(manifest_path(entry.path), lambda m: setattr(m, "warnings", event.warnings))
    elif event.kind == "failure":
        event.warnings += disk_warnings(settings.backup_root, settings.monitoring)
    try:
        record_attempt(settings.backup_root, run.target, run.tier, {
            "status": event.kind, "at": event.at, "run_id": run.run_id, "duration_s": event.duration_s,
            "size": event.size, "step": event.step, "reason": event.reason, "file": event.file})
    except PgbeatError as exc:  # a full disk: the notification matters more than the record
        log.warning("cannot record the attempt: %s", exc.message)
    if event.kind == "success":
        runlog.write(ctx.settings, run, ctx.now(), f"Backup concluído com sucesso em {event.duration_s}s",
                     *(f"WARNING: {w}" for w in event.warnings))
    else:
        runlog.write(ctx.settings, run, ctx.now(), f"ERROR: backup falhou na etapa {event.step}: {event.reason}",
                     *(f"  {line}" for line in event.details), *( [f"HINT: {event.hint}"] if event.hint else []))
    sent, failed = send_event(settings, event)
    if event.warnings and event.kind == "success":
        send_event(settings, replace(event, kind="warning"))
    target = settings.targets.get(run.target)
    if target is not None:
        healthchecks.ping(target, "success" if event.kind == "success" else "fail", event.body())
    run.steps["notify"] = {"event": event.kind, "sent": sent, "failed": failed, "warnings": event.warnings,
                           "duration_s": round(time.monotonic() - t0, 3)}
    return run
