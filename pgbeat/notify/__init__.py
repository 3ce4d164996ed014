"""The notify step: tell the world how a run ended. It always runs, after success and after failure.

Channels implement `Notifier.send(event)`; a channel that fails is logged and never turns a good backup
into a failed one. This release ships the event log (`BACKUP_ROOT/logs/events.jsonl`, one JSON object per
outcome), which monitoring reads; chat and mail channels plug in behind the same interface.

Where a step may be delivered again (Celery), the step context's `once` claims each channel's delivery of
each outcome first, so a notify step run again after a kill never sends an outcome twice on a channel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pgbeat import faults, runlog
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
NOTIFY_SENT = faults.declare("notify.sent", "the channels have the outcome; the warning event and the "
                                           "healthcheck ping are not sent yet")


def notifiers(settings: Settings, event: Event) -> list[Notifier]:
    """The event log, then every Apprise channel of the event's target that wants this kind of event."""
    channels = settings.channels(event.target) if event.target in settings.targets else settings.notify
    return [EventLogNotifier(settings.backup_root),
            *(AppriseNotifier(c) for c in channels if c.wants(event.category))]


def send_event(settings: Settings, event: Event,
               once: Callable[[str], bool] | None = None) -> tuple[list[str], list[str]]:
    """Send `event` through every channel of its target; return the channels that took it and those that failed.

    With `once`, a channel is used only if `once(<key of this event on that channel>)` claims it first.
    """
    sent, failed = [], []
    for channel in notifiers(settings, event):
        if once is not None and not once(f"notify:{event.kind}:{channel.name}"):
            continue  # an earlier delivery of this step sent it
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
    once = ctx.once or (lambda what: True)
    if not once(f"notify:{event.kind}:runlog"):
        pass  # written by an earlier delivery of this step
    elif event.kind == "success":
        runlog.write(ctx.settings, run, ctx.now(), f"Backup concluído com sucesso em {event.duration_s}s",
                     *(f"WARNING: {w}" for w in event.warnings))
    else:
        runlog.write(ctx.settings, run, ctx.now(), f"ERROR: backup falhou na etapa {event.step}: {event.reason}",
                     *(f"  {line}" for line in event.details), *( [f"HINT: {event.hint}"] if event.hint else []))
    sent, failed = send_event(settings, event, ctx.once)
    faults.fault_point(NOTIFY_SENT)
    if event.warnings and event.kind == "success":
        send_event(settings, replace(event, kind="warning"), ctx.once)
    target = settings.targets.get(run.target)
    if target is not None and once(f"notify:{event.kind}:healthcheck"):
        healthchecks.ping(target, "success" if event.kind == "success" else "fail", event.body())
    run.steps["notify"] = {"event": event.kind, "sent": sent, "failed": failed, "warnings": event.warnings,
                           "duration_s": round(time.monotonic() - t0, 3)}
    return run
