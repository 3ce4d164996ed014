"""Wrappers that add one behaviour to any backend, restic style: each overrides only what it changes and
hands every other attribute to the backend it wraps. They stack: `RetryingStorage(ThrottledStorage(s3))`.

Retry contract. Backends raise `TransientStorageError` for failures that may pass (connection refused or
lost, timeouts, HTTP 5xx, throttling) and plain `StorageError` for those that will not (authentication,
permissions, missing key, refusing to overwrite, checksum mismatch). `RetryingStorage` retries only the
former, with exponential backoff and jitter (`pgbeat.backoff`), and raises a `TransientStorageError`
naming the destination once its attempts are spent (so a Celery task can still retry later). Every
operation is idempotent when repeated after a transient failure (see `pgbeat.storage.base`), with one
subtlety handled here: a `put` whose object was stored but whose response was lost would, when repeated,
find its own object and refuse to overwrite it. A repeated put therefore first checks whether the key
already holds exactly what is being stored (same size and SHA-256, checked by the backend's shallow
`verify`) and, if so, returns it. For a folder only its total size can be compared; the target lock
makes another writer of the same key impossible.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pgbeat.backoff import Backoff, retry
from pgbeat.errors import StorageError, TransientStorageError
from pgbeat.fsutil import tree_size
from pgbeat.hashing import sha256_file
from pgbeat.storage.base import Closing, ObjectInfo, RateLimiter, S, Storage, bandwidth_limit

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Wrapper(Closing):
    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name = inner.name

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.inner, attribute)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class RetryingStorage(_Wrapper):
    """Retry transient failures of every operation: `attempts` tries in all, waiting
    `backoff * 2**n` seconds (capped at `backoff_max`, with jitter between half and all of it) between them."""

    def __init__(self, inner: Storage, attempts: int = 5, backoff: float = 1.0, backoff_max: float = 60.0,
                 sleep: Callable[[float], Any] = time.sleep, jitter: Callable[[], float] = random.random) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        super().__init__(inner)
        self.attempts = attempts
        self.backoff = Backoff(backoff, backoff_max, jitter=jitter)
        self._sleep = sleep

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure: exponential, capped, jittered (half to full)."""
        return self.backoff.delay(failures)

    def _retry(self, action: str, key: str, call: Callable[[int], T]) -> T:
        def warn(exc: Exception, attempt: int, wait: float) -> None:
            message = exc.message if isinstance(exc, StorageError) else str(exc)
            log.warning("%s (attempt %d of %d, retrying in %.1fs)", message, attempt, self.attempts, wait)

        try:
            return retry(call, attempts=self.attempts, backoff=self.backoff, on_retry=warn, sleep=self._sleep,
                         retryable=lambda exc: isinstance(exc, StorageError) and exc.transient)
        except StorageError as exc:
            if not exc.transient:
                raise
            raise TransientStorageError(
                f"{self.name}: {action} {self.inner.describe(key)} failed after {self.attempts} "
                f"attempt{'s' if self.attempts > 1 else ''}: {exc.message}", hint=exc.hint) from exc

    def put(self, source: Path, key: str, sha256: str | None = None, *, replace: bool = False) -> ObjectInfo:
        source = Path(source)
        is_dir = source.is_dir()
        if not is_dir and sha256 is None:
            sha256 = sha256_file(source)  # once, so that every attempt (and the landed-check) uses it
        size = tree_size(source)

        def attempt(number: int) -> ObjectInfo:
            if number > 1:
                landed = self._landed(key, size, sha256)
                if landed is not None:
                    return landed
            return self.inner.put(source, key, sha256=sha256, replace=replace)

        return self._retry("put", key, attempt)

    def _landed(self, key: str, size: int, sha256: str | None) -> ObjectInfo | None:
        """Return the object under `key` if it is the one an earlier attempt was storing, else None."""
        info = self.inner.stat(key)
        if info is None:
            return None
        try:
            self.inner.verify(key, size, sha256)
        except StorageError as exc:
            if exc.transient:
                raise
            return None  # something else is there: the put will refuse to overwrite it
        log.info("%s: an earlier attempt stored %s", self.name, self.inner.describe(key))
        return ObjectInfo(key=info.key, size=info.size, modified=info.modified, sha256=sha256 or info.sha256,
                          md5=info.md5, crc32c=info.crc32c)

    def get(self, key: str, dest: Path) -> None:
        return self._retry("get", key, lambda _: self.inner.get(key, dest))

    def load(self, key: str, open_sink: Callable[[], S]) -> S:
        return self._retry("load", key, lambda _: self.inner.load(key, open_sink))  # a fresh sink per attempt

    def stat(self, key: str) -> ObjectInfo | None:
        return self._retry("stat", key, lambda _: self.inner.stat(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self._retry("list", prefix, lambda _: self.inner.list(prefix))

    def walk(self, prefix: str) -> list[ObjectInfo]:
        return self._retry("list", prefix, lambda _: self.inner.walk(prefix))

    def delete(self, key: str) -> None:
        return self._retry("delete", key, lambda _: self.inner.delete(key))

    def verify(self, key: str, size: int, sha256: str | None, deep: bool = False) -> None:
        return self._retry("verify", key, lambda _: self.inner.verify(key, size, sha256, deep=deep))


class ThrottledStorage(_Wrapper):
    """Limit the bandwidth of one destination to `bytes_per_second` (average; bursts up to `burst` bytes).

    The limit is shared by every transfer through this wrapper, from any thread: uploads (`put`), downloads
    (`get`, `load`) and read-backs (`verify`). Backends count the bytes they stream through `base.throttle`, so
    the limit applies inside the SDK's own loops; metadata requests are not counted.
    """

    def __init__(self, inner: Storage, bytes_per_second: float, burst: float | None = None,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        super().__init__(inner)
        self.limiter = RateLimiter(bytes_per_second, burst=burst, sleep=sleep)

    def put(self, source: Path, key: str, sha256: str | None = None, *, replace: bool = False) -> ObjectInfo:
        with bandwidth_limit(self.limiter):
            return self.inner.put(source, key, sha256=sha256, replace=replace)

    def get(self, key: str, dest: Path) -> None:
        with bandwidth_limit(self.limiter):
            return self.inner.get(key, dest)

    def load(self, key: str, open_sink: Callable[[], S]) -> S:
        with bandwidth_limit(self.limiter):
            return self.inner.load(key, open_sink)

    def verify(self, key: str, size: int, sha256: str | None, deep: bool = False) -> None:
        with bandwidth_limit(self.limiter):
            return self.inner.verify(key, size, sha256, deep=deep)
