"""The notify step: tell the world how a run ended. It always runs, after success and after failure.

Channels implement `Notifier.send(event)`; a channel that fails is logged and never turns a good backup
into a failed one. This release ships the event log (`BACKUP_ROOT/logs/events.jsonl`, one JSON object per
outcome), which monitoring reads; chat and mail channels plug in behind the same interface.
"""

from __future__ import annotations

import logging
import time

from pgbeat import runlog
from pgbeat.notify.base import Event, Notifier, event_from_run
from pgbeat.notify.eventlog import EventLogNotifier
from pgbeat.run import Run, StepContext
from pgbeat.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Event", "EventLogNotifier", "Notifier", "event_from_run", "notifiers", "notify_step", "send_event"]


def notifiers(settings: Settings, target: str) -> list[Notifier]:
    return [EventLogNotifier(settings.backup_root)]


def send_event(settings: Settings, event: Event) -> tuple[list[str], list[str]]:
    """Send `event` through every channel of its target; return the channels that took it and those that failed."""
    sent, failed = [], []
    for channel in notifiers(settings, event.target):
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
    event = event_from_run(ctx.settings, run, ctx.now())
    if event.kind == "success":
        runlog.write(ctx.settings, run, ctx.now(), f"Backup concluído com sucesso em {event.duration_s}s")
    else:
        runlog.write(ctx.settings, run, ctx.now(), f"ERROR: backup falhou na etapa {event.step}: {event.reason}",
                     *(f"  {line}" for line in event.details), *( [f"HINT: {event.hint}"] if event.hint else []))
    sent, failed = send_event(ctx.settings, event)
    run.steps["notify"] = {"event": event.kind, "sent": sent, "failed": failed,
                           "duration_s": round(time.monotonic() - t0, 3)}
    return run
