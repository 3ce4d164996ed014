"""Notifications: every channel of a target (the event log, Apprise channels) gets each event.

Channels implement `Notifier.send(event)`; a channel that fails is logged and never turns a good backup
into a failed one. This release ships the event log (`BACKUP_ROOT/logs/events.jsonl`, one JSON object per
outcome), which monitoring reads; chat and mail channels plug in behind the same interface.

With `once`, each channel's delivery of an event is claimed first, so a step delivered again after a
kill (Celery) never sends an outcome twice on a channel (pgbeat.steps.notify).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pgbeat.notify.apprise_channel import AppriseNotifier
from pgbeat.notify.base import Event, Notifier, event_from_run
from pgbeat.notify.eventlog import EventLogNotifier
from pgbeat.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Event", "EventLogNotifier", "Notifier", "event_from_run", "notifiers", "send_event"]


def notifiers(settings: Settings, event: Event) -> list[Notifier]:
    """The event log, then every Apprise channel of the event's target that wants this kind of event."""
    channels = settings.channels(event.target)
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
