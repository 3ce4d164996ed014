"""Chat, mail and webhook channels through Apprise: one URL per channel (mailto://, slack://, tgram://,
discord://, msteams://, ntfys://, json://, ...). Delivery is retried with backoff; a channel that still
fails raises, and the caller logs it without failing the backup."""

from __future__ import annotations

import logging
import time

from pgbeat.backoff import Backoff, retry
from pgbeat.notify.base import Event
from pgbeat.settings import ChannelSpec

log = logging.getLogger(__name__)

NOTIFY_TYPES = {"success": "success", "failure": "failure", "warning": "warning"}  # apprise.NotifyType values


class AppriseNotifier:
    def __init__(self, channel: ChannelSpec, attempts: int = 3, backoff: float = 1.0, sleep=time.sleep) -> None:
        self.channel = channel
        self.name = channel.label()
        self.attempts, self.backoff, self.sleep = attempts, backoff, sleep

    def send(self, event: Event) -> None:
        import apprise  # imported when there is something to send: it is slow to import

        service = apprise.Apprise()
        if not service.add(self.channel.url.get_secret_value()):
            # Never echo the URL: it usually carries a token or a password.
            raise ValueError(f"channel {self.name}: not a valid Apprise URL")
        notify_type = apprise.NotifyType(NOTIFY_TYPES.get(event.category, "info"))

        def deliver(_: int) -> None:
            if not service.notify(title=event.title(), body=event.body(), notify_type=notify_type):
                raise RuntimeError(f"channel {self.name}: delivery failed after {self.attempts} attempts")

        retry(deliver, attempts=self.attempts, backoff=Backoff(self.backoff, cap=float("inf")), sleep=self.sleep,
              retryable=lambda exc: isinstance(exc, RuntimeError),
              on_retry=lambda _, n, wait: log.warning("channel %s: delivery failed, retrying in %.0fs", self.name,
                                                      wait))
