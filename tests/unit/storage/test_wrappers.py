"""The storage wrappers and streaming helpers, around the real local backend with injected faults."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from pgbeat.errors import StorageError, TransientStorageError
from pgbeat.storage import LocalStorage, RetryingStorage, ThrottledStorage
from pgbeat.storage.base import HashingReader, RateLimiter, check_key


class Faulty:
    """Wraps a real backend; `failures[op]` transient errors are raised before (or, for "put-after", after)
    the real call."""

    def __init__(self, inner: LocalStorage, **failures: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.failures = failures
        self.calls: list[str] = []

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)

    def _fail(self, op: str) -> None:
        if self.failures.get(op, 0) > 0:
            self.failures[op] -= 1
            raise TransientStorageError(f"{self.name}: {op} failed: connection reset")

    def put(self, source, key, sha256=None, *, replace=False):
        self.calls.append("put")
        self._fail("put")
        info = self.inner.put(source, key, sha256=sha256, replace=replace)
        self._fail("put-after")  # stored, but the caller never hears of it
        return info

    def stat(self, key):
        self.calls.append("stat")
        self._fail("stat")
        return self.inner.stat(key)


@pytest.fixture
def shelf(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "shelf", name="offsite")


def source(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"src-{os.urandom(4).hex()}"
    path.write_bytes(data)
    return path


def test_transient_failures_are_retried_with_capped_jittered_backoff(shelf, tmp_path):
    sleeps: list[float] = []
    faulty = Faulty(shelf, stat=4)
    storage = RetryingStorage(faulty, attempts=5, backoff=1.0, backoff_max=3.0, sleep=sleeps.append, jitter=lambda: 1.0)
    assert storage.stat("daily/x") is None
    assert sleeps == [1.0, 2.0, 3.0, 3.0]
    half = RetryingStorage(shelf, backoff=2.0, jitter=lambda: 0.0)
    assert [half.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]


def test_attempts_spent_raise_a_transient_error_naming_the_destination(shelf):
    sleeps: list[float] = []
    storage = RetryingStorage(Faulty(shelf, stat=10), attempts=3, sleep=sleeps.append)
    with pytest.raises(TransientStorageError) as caught:
        storage.stat("daily/x")
    assert caught.value.transient
    assert str(caught.value).startswith(f"offsite: stat {shelf.describe('daily/x')} failed after 3 attempts: ")
    assert len(sleeps) == 2


def test_permanent_failures_are_not_retried(shelf, tmp_path):
    sleeps: list[float] = []
    storage = RetryingStorage(shelf, sleep=sleeps.append)
    storage.put(source(tmp_path, b"one"), "daily/x")
    with pytest.raises(StorageError, match="refusing to overwrite") as caught:
        storage.put(source(tmp_path, b"two"), "daily/x")
    assert not caught.value.transient and sleeps == []
    with pytest.raises(StorageError, match="does not exist"):
        storage.get("daily/missing", tmp_path / "out")
    assert sleeps == []


def test_a_put_whose_answer_was_lost_is_recognised_not_refused(shelf, tmp_path):
    faulty = Faulty(shelf, **{"put-after": 1})
    storage = RetryingStorage(faulty, sleep=lambda s: None)
    data = b"backup bytes" * 100
    info = storage.put(source(tmp_path, data), "daily/x")
    assert faulty.calls == ["put", "stat"]  # the retry found the object the first attempt stored
    assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert (shelf.root / "daily/x").read_bytes() == data


def test_a_retried_put_still_refuses_someone_elses_object(shelf, tmp_path):
    faulty = Faulty(shelf, put=1)
    storage = RetryingStorage(faulty, sleep=lambda s: None)
    shelf.put(source(tmp_path, b"theirs"), "daily/x")
    with pytest.raises(StorageError, match="refusing to overwrite") as caught:
        storage.put(source(tmp_path, b"ours!!"), "daily/x")
    assert not caught.value.transient
    assert (shelf.root / "daily/x").read_bytes() == b"theirs"


def test_wrappers_delegate_what_they_do_not_change(shelf, tmp_path):
    storage = RetryingStorage(ThrottledStorage(shelf, bytes_per_second=10**9))
    assert storage.name == "offsite" and storage.root == shelf.root
    assert storage.describe("daily/x") == shelf.describe("daily/x")
    storage.put(source(tmp_path, b"abc"), "daily/x")
    storage.verify("daily/x", 3, hashlib.sha256(b"abc").hexdigest(), deep=True)
    assert [i.key for i in storage.list("daily")] == ["daily/x"]


def test_rate_limiter_keeps_the_average_rate():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(1000, burst=500, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        limiter.consume(1000)
    assert sum(slept) == pytest.approx(10.0)
    now[0] += 60  # idle: only `burst` bytes go through without waiting
    slept.clear()
    limiter.consume(500)
    assert slept == []
    limiter.consume(1000)
    assert sum(slept) == pytest.approx(1.0)


def test_hashing_reader_hashes_each_byte_once_when_a_client_rewinds():
    data = os.urandom(1000)
    reader = HashingReader(io.BytesIO(data))
    assert reader.read(600) == data[:600]
    reader.seek(200)  # a resumable upload resends a chunk
    assert reader.read(600) == data[200:800]
    reader.read()
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()
    skipping = HashingReader(io.BytesIO(data))
    skipping.seek(10)
    skipping.read(10)
    with pytest.raises(StorageError, match="skipped bytes"):
        skipping.hexdigest()


@pytest.mark.parametrize("key", ["../x", "a/../../b", "a//b", "./a", "a/.", "a\\b", "a\tb", "", "/"])
def test_keys_must_be_plain_relative_paths(key):
    with pytest.raises(StorageError):
        check_key("s3", key)


def test_check_key_accepts_and_normalises_plain_keys():
    assert check_key("s3", "/daily/erp_backup_daily_20251119_020000.sql.gz") == \
        "daily/erp_backup_daily_20251119_020000.sql.gz"
    assert check_key("s3", "", allow_empty=True) == ""


def test_local_put_records_sha256_and_list_hides_interrupted_copies(shelf, tmp_path):
    data = b"x" * 1000
    info = shelf.put(source(tmp_path, data), "daily/a")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    (shelf.root / "daily" / ".b.partial").write_bytes(b"half")
    assert [i.key for i in shelf.list("daily")] == ["daily/a"]
    (shelf.root / "daily" / "a").write_bytes(b"y" * 1000)
    with pytest.raises(StorageError, match="does not match"):
        shelf.verify("daily/a", 1000, info.sha256)
