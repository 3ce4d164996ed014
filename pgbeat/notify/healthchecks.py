"""Dead-man's switch: healthchecks-style pings (`<url>/start`, `<url>`, `<url>/fail`) per target, so that
"no backup ran at all" is noticed by something outside pgbeat. A ping that fails is logged, never fatal."""

from __future__ import annotations

import logging

from pgbeat.backoff import Backoff, retry
from pgbeat.settings import Target

log = logging.getLogger(__name__)
PING_BACKOFF = Backoff(base=0.5, cap=60.0)
SUFFIXES = {"start": "/start", "success": "", "fail": "/fail"}


def ping(target: Target, what: str, body: str = "", attempts: int = 3) -> bool:
    """Ping `target`'s healthcheck URL for `what` (start, success, fail); return whether it got through."""
    if target.healthcheck_url is None:
        return False
    import requests  # only targets with a ping URL pay for the import

    url = target.healthcheck_url.get_secret_value().rstrip("/") + SUFFIXES[what]

    def send(_: int) -> bool:
        try:
            response = requests.post(url, data=body.encode()[:10000], timeout=10)
        except requests.RequestException as exc:
            log.warning("healthcheck ping (%s) of %s failed: %s", what, target.name, type(exc).__name__)
            raise _NotThrough from None
        if response.status_code >= 500:
            raise _NotThrough
        return response.ok

    try:
        return retry(send, attempts=attempts, backoff=PING_BACKOFF, retryable=lambda e: isinstance(e, _NotThrough))
    except _NotThrough:
        return False


class _NotThrough(Exception):
    """A ping that may get through if sent again (no answer, or a 5xx)."""
