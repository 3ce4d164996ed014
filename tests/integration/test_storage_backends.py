"""One conformance suite for every storage backend, against real servers on loopback.

Each backend (local folder, S3 on moto's server, GCS on fake-gcs-server, SSH on a real sshd, and S3
behind the retry and bandwidth wrappers) runs the same tests; what the backend stored is checked with an
independent client (boto3 directly, the official GCS client, the `ssh` program or the file system).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from pgbeat.catalog.manifest import FileDigest, Manifest
from pgbeat.errors import StorageError, TransientStorageError
from pgbeat.storage import (
    GCSStorage,
    LocalStorage,
    RetryingStorage,
    S3Storage,
    SSHStorage,
    Storage,
    ThrottledStorage,
)
from pgbeat.storage.verification import verify_copy
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET, elapsed
from tests.support import free_port

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PART = 5 * MiB  # S3's minimum part size; GCS chunks of the same size
BIG = 2 * PART + 2 * MiB + 12345  # three parts/chunks


@dataclass
class Harness:
    """A backend under test plus an independent client on the same destination (names are storage keys)."""

    kind: str
    storage: Storage
    read: Callable[[str], bytes]  # the stored bytes of a file key
    write: Callable[[str, bytes], None]  # replace a stored file behind pgbeat's back
    names: Callable[[str], list[str]]  # every stored file name under a key (itself or key/...)
    sha256: Callable[[str], str]  # SHA-256 of a stored file, computed by the independent side


def _local(tmp_path: Path) -> Harness:
    root = tmp_path / "shelf"
    root.mkdir()

    def names(key: str) -> list[str]:
        path = root / key
        if path.is_file():
            return [key]
        return sorted(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file())

    return Harness("local", LocalStorage(root), read=lambda k: (root / k).read_bytes(),
                   write=lambda k, data: (root / k).write_bytes(data), names=names,
                   sha256=lambda k: hashlib.sha256((root / k).read_bytes()).hexdigest())


def _s3(server, kind: str = "s3", wrap: bool = False) -> Harness:
    bucket = server.new_bucket()
    client = server.client()
    prefix = "pgbeat/prod"
    storage: Storage = S3Storage(bucket=bucket, prefix=prefix, endpoint_url=server.url, region="us-east-1",
                                 storage_class="STANDARD_IA", sse="AES256", access_key_id=S3_ACCESS_KEY,
                                 secret_access_key=SecretStr(S3_SECRET), part_size=PART, name=kind)
    if wrap:
        storage = RetryingStorage(ThrottledStorage(storage, bytes_per_second=1024 * MiB), attempts=3,
                                  sleep=lambda s: None)

    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    def names(key: str) -> list[str]:
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{key}"):
            found += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]
        return sorted(n for n in found if n == key or n.startswith(key + "/"))

    return Harness(kind, storage, read=read,
                   write=lambda k, data: client.put_object(Bucket=bucket, Key=f"{prefix}/{k}", Body=data),
                   names=names, sha256=lambda k: hashlib.sha256(read(k)).hexdigest())


def _gcs(server) -> Harness:
    bucket_name = server.new_bucket()
    bucket = server.client().bucket(bucket_name)
    storage = GCSStorage(bucket=bucket_name, prefix="pgbeat", endpoint=server.url, chunk_size=PART)

    def names(key: str) -> list[str]:
        found = [b.name[len("pgbeat/"):] for b in bucket.list_blobs(prefix=f"pgbeat/{key}")]
        return sorted(n for n in found if n == key or n.startswith(key + "/"))

    def read(key: str) -> bytes:
        return bucket.blob(f"pgbeat/{key}").download_as_bytes()

    return Harness("gcs", storage, read=read,
                   write=lambda k, data: bucket.blob(f"pgbeat/{k}").upload_from_string(data), names=names,
                   sha256=lambda k: hashlib.sha256(read(k)).hexdigest())


def _ssh(server, **options) -> Harness:
    base = server.root / uuid.uuid4().hex[:8] / "backups"
    storage = SSHStorage("127.0.0.1", port=server.port, user=server.user, path=str(base),
                         key_file=server.user_key, known_hosts=server.known_hosts, **options)

    def names(key: str) -> list[str]:
        out = server.ssh(f"cd {base} && find {key} -type f 2>/dev/null || true").stdout
        return sorted(out.split())

    def sha256(key: str) -> str:
        return server.ssh(f"sha256sum {base / key}").stdout.split()[0]

    def read(key: str) -> bytes:
        return (base / key).read_bytes()  # same machine: read the sshd side's file directly

    def write(key: str, data: bytes) -> None:
        import subprocess

        subprocess.run(["ssh", "-i", str(server.user_key), "-p", str(server.port), "-o", "BatchMode=yes",
                        "-o", f"UserKnownHostsFile={server.known_hosts}", f"{server.user}@127.0.0.1",
                        f"cat > {base / key}"], input=data, check=True, capture_output=True, timeout=60)

    harness = Harness("ssh", storage, read=read, write=write, names=names, sha256=sha256)
    harness.base = base  # type: ignore[attr-defined]
    return harness


BACKENDS = ["local", "s3", "gcs", "ssh", "wrapped"]
REMOTE = ["s3", "gcs", "ssh", "wrapped"]


@pytest.fixture
def backend(request, tmp_path):
    kind = request.param
    if kind == "local":
        harness = _local(tmp_path)
    elif kind in ("s3", "wrapped"):
        harness = _s3(request.getfixturevalue("moto_s3"), kind=kind, wrap=kind == "wrapped")
    elif kind == "gcs":
        harness = _gcs(request.getfixturevalue("fake_gcs"))
    else:
        harness = _ssh(request.getfixturevalue("sshd"))
    yield harness
    if kind == "ssh":
        harness.storage.close()


@pytest.fixture
def src(tmp_path):
    """Make local source files (a put may move them, so each put gets its own)."""
    folder = tmp_path / "src"
    folder.mkdir()

    def make(size: int, name: str | None = None, seed: bytes | None = None) -> tuple[Path, bytes]:
        path = folder / (name or uuid.uuid4().hex)
        data = (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size] if seed else os.urandom(size)
        path.write_bytes(data)
        return path, data

    return make


def make_folder(root: Path) -> dict[str, bytes]:
    """A directory-format dump look-alike: toc.dat, numbered data files, one in a subfolder."""
    files = {"toc.dat": os.urandom(3000), "3001.dat.gz": os.urandom(70_000), "3002.dat.gz": b"",
             "blobs/blob_1.dat": os.urandom(5000)}
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return files


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_permanent(exc: StorageError) -> None:
    assert not exc.transient and not isinstance(exc, TransientStorageError), exc


# --- the conformance suite ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_file_round_trip(backend, src, tmp_path):
    storage = backend.storage
    key = "daily/erp_backup_daily_20251119_020000.sql.gz"
    source, data = src(200_000)

    info = storage.put(source, key)
    assert (info.key, info.size, info.sha256) == (key, len(data), sha(data))
    assert backend.read(key) == data and backend.sha256(key) == sha(data)

    found = storage.stat(key)
    assert found is not None and found.size == len(data) and found.modified is not None
    if backend.kind in ("s3", "gcs", "wrapped"):
        assert found.sha256 == sha(data)
    assert storage.stat("daily/nothing-here.sql.gz") is None
    assert [i.key for i in storage.list("daily")] == [key]
    assert storage.list("weekly") == []

    restored = tmp_path / "restored.sql.gz"
    storage.get(key, restored)
    assert restored.read_bytes() == data
    assert not list(tmp_path.glob(".restored*")), "a temporary download was left behind"

    storage.verify(key, len(data), sha(data))
    storage.verify(key, len(data), sha(data), deep=True)

    storage.delete(key)
    assert storage.stat(key) is None and storage.list("daily") == [] and backend.names(key) == []
    storage.delete(key)  # deleting twice is fine
    with pytest.raises(StorageError) as missing:
        storage.get(key, tmp_path / "again")
    assert_permanent(missing.value)
    assert storage.describe(key) in str(missing.value) or key in str(missing.value)
    with pytest.raises(StorageError, match="does not exist"):
        storage.verify(key, len(data), sha(data))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_walk_lists_every_file_under_a_folder_at_any_depth(backend, src):
    storage = backend.storage
    keys = ["wal/erp/0000000100000000/a.gz", "wal/erp/0000000100000001/b.gz", "wal/erp/history/00000002.history",
            "wal/erp-2/0000000100000000/c.gz", "daily/x.sql.gz"]
    for key in keys:
        storage.put(src(1000)[0], key)  # a source each: the local backend may move its source into place
    found = storage.walk("wal/erp")
    assert [i.key for i in found] == sorted(keys[:3]) and {i.size for i in found} == {1000}
    assert storage.walk("wal/nothing") == []
    storage.delete(keys[0])
    assert [i.key for i in storage.walk("wal/erp")] == sorted(keys[1:3])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_refuses_to_overwrite(backend, src, tmp_path):
    storage = backend.storage
    key = "daily/a.sql.gz"
    first, data = src(10_000)
    storage.put(first, key)
    second, _ = src(10_000)
    with pytest.raises(StorageError, match="refusing to overwrite") as refused:
        storage.put(second, key)
    assert_permanent(refused.value)
    assert backend.read(key) == data
    folder = tmp_path / "dir"
    make_folder(folder)
    with pytest.raises(StorageError, match="refusing to overwrite"):
        storage.put(folder, key)
    assert backend.read(key) == data


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_replace_overwrites_a_file_but_never_a_folder(backend, src, tmp_path):
    """Sidecars are replaced in place (`replace=True`), not deleted then put; a folder is never replaced."""
    storage = backend.storage
    key = "daily/a.sql.gz.manifest.json"
    first, _ = src(1000)
    storage.put(first, key, replace=True)  # nothing there yet: a plain put
    second, data = src(2000)
    info = storage.put(second, key, replace=True)
    assert (info.size, info.sha256) == (2000, sha(data))
    assert backend.read(key) == data and backend.names(key) == [key]
    storage.verify(key, len(data), sha(data), deep=True)
    assert [i.key for i in storage.list("daily")] == [key]  # no leftover of the old version or the staging

    folder = tmp_path / "dump.dir"
    make_folder(folder)
    storage.put(folder, "daily/d.dir")
    third, _ = src(10)
    with pytest.raises(StorageError, match="refusing to overwrite"):
        storage.put(third, "daily/d.dir", replace=True)
    again = tmp_path / "again.dir"
    make_folder(again)
    with pytest.raises(StorageError, match="refusing to overwrite"):
        storage.put(again, key, replace=True)
    assert backend.read(key) == data


def test_local_replace_never_leaves_the_key_missing(tmp_path, src):
    import threading

    storage = LocalStorage(tmp_path / "shelf")
    key = "daily/x.manifest.json"
    storage.put(src(100)[0], key)
    missing, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            if storage.stat(key) is None:
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(200):
            storage.put(src(100)[0], key, replace=True)
    finally:
        done.set()
        watcher.join()
    assert missing == []


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_folder_round_trip(backend, tmp_path, src):
    storage = backend.storage
    folder = tmp_path / "dump.dir"
    files = make_folder(folder)
    total = sum(len(d) for d in files.values())
    key = "daily/erp_backup_daily_20251119_020000.dir"
    lone, _ = src(100, name="lone.sql.gz")
    storage.put(lone, "daily/lone.sql.gz")

    info = storage.put(folder, key)
    assert (info.key, info.size, info.sha256) == (key, total, None)
    stored = {n[len(key) + 1:] for n in backend.names(key)}
    assert set(files) <= stored
    for relative, data in files.items():
        assert backend.read(f"{key}/{relative}") == data
    found = storage.stat(key)
    assert found is not None and found.size == total
    assert [(i.key, i.size) for i in storage.list("daily")] == [(key, total), ("daily/lone.sql.gz", 100)]

    restored = tmp_path / "restored.dir"
    storage.get(key, restored)
    got = {p.relative_to(restored).as_posix(): p.read_bytes() for p in restored.rglob("*") if p.is_file()}
    assert got == files

    storage.verify(key, total, None)
    storage.verify(key, total, None, deep=True)
    with pytest.raises(StorageError, match="does not match"):
        storage.verify(key, total + 1, None)

    storage.delete(key)
    assert storage.stat(key) is None and backend.names(key) == []
    assert [i.key for i in storage.list("daily")] == ["daily/lone.sql.gz"]
    storage.delete(key)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.bin"
    with open(path, "wb") as f:
        for _ in range(BIG // MiB + 1):
            f.write(os.urandom(MiB))
        f.truncate(BIG)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, digest


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_file_in_parts(backend, big_file, tmp_path, request):
    original, digest = big_file
    source = tmp_path / "big.bin"
    source.write_bytes(original.read_bytes())
    key = "monthly/big.dump"

    info = backend.storage.put(source, key, sha256=digest)
    assert (info.size, info.sha256) == (BIG, digest)
    assert backend.sha256(key) == digest  # computed by the independent client
    backend.storage.verify(key, BIG, digest, deep=True)

    if backend.kind in ("s3", "wrapped"):
        server = request.getfixturevalue("moto_s3")
        bucket = backend.storage.bucket
        head = server.client().head_object(Bucket=bucket, Key=f"pgbeat/prod/{key}")
        assert head["ETag"].strip('"').endswith("-3"), "not a three-part multipart upload"
        assert head["Metadata"]["sha256"] == digest
        assert head["ContentLength"] == BIG
        assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"
    elif backend.kind == "gcs":
        blob = request.getfixturevalue("fake_gcs").client().bucket(backend.storage.bucket_name).get_blob(
            f"pgbeat/{key}")
        assert blob.size == BIG and blob.metadata["sha256"] == digest
        assert base64.b64decode(blob.md5_hash).hex() == hashlib.md5(original.read_bytes()).hexdigest()
    elif backend.kind == "ssh":
        server = request.getfixturevalue("sshd")
        mode, size = server.ssh(f"stat -c '%a %s' {backend.base / key}").stdout.split()
        assert (mode, int(size)) == ("600", BIG)
        assert server.ssh(f"stat -c %a {backend.base / 'monthly'}").stdout.strip() == "700"
        assert server.ssh(f"ls -A {backend.base / 'monthly'}").stdout.split() == ["big.dump"]

    restored = tmp_path / "restored.bin"
    backend.storage.get(key, restored)
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == digest
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600 or backend.kind == "local"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_verify_reports_an_altered_copy(backend, src):
    storage = backend.storage
    key = "daily/x.sql.gz"
    source, data = src(50_000)
    storage.put(source, key)
    storage.verify(key, len(data), sha(data))

    altered = bytearray(data)
    altered[25_000] ^= 0xFF  # same size, one byte different
    backend.write(key, bytes(altered))
    for deep in (False, True):
        with pytest.raises(StorageError, match="does not match") as caught:
            storage.verify(key, len(data), sha(data), deep=deep)
        assert_permanent(caught.value)
        assert storage.describe(key) in str(caught.value)
        assert "SHA-256" in str(caught.value) or "sha256" in str(caught.value).lower()

    backend.write(key, data + b"tail")  # a different size
    with pytest.raises(StorageError, match=r"size 50004 bytes, expected 50000"):
        storage.verify(key, len(data), sha(data))


def manifest_for(name: str, files: dict[str, bytes] | None = None, data: bytes | None = None) -> Manifest:
    """The manifest of a backup stored as `name`: a directory-format one of `files`, or one file of `data`."""
    common = {"run_id": "r1", "target": "erp", "tier": "daily", "file": name, "codec": "none", "complete": True,
              "started_at": datetime(2025, 11, 19, 2, tzinfo=UTC)}
    if files is not None:
        digests = [FileDigest(name=n, size=len(d), md5=hashlib.md5(d).hexdigest(), sha256=sha(d))
                   for n, d in sorted(files.items())]
        return Manifest(format="directory", size=sum(f.size for f in digests), files=digests, **common)
    assert data is not None
    return Manifest(format="custom", size=len(data), sha256=sha(data), md5=hashlib.md5(data).hexdigest(), **common)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_deep_verify_reads_every_file_of_a_folder_back(backend, tmp_path, src):
    """A flipped byte in one file of a directory-format copy fails a deep verify on every backend, even where
    the backend itself keeps no per-file checksums (local, SSH): the manifest's per-file SHA-256 is compared."""
    storage = backend.storage
    folder = tmp_path / "dump.dir"
    files = make_folder(folder)
    key = "daily/erp_backup_daily_20251119_020000.dir"
    manifest = manifest_for(key.rsplit("/", 1)[1], files=files)
    storage.put(folder, key)
    verify_copy(storage, key, manifest, deep=True)
    verify_copy(storage, key, manifest)

    flipped = bytearray(files["3001.dat.gz"])
    flipped[35_000] ^= 0x01  # same size, one bit of one byte of one file
    backend.write(f"{key}/3001.dat.gz", bytes(flipped))
    with pytest.raises(StorageError, match="does not match") as caught:
        verify_copy(storage, key, manifest, deep=True)
    assert_permanent(caught.value)
    assert "3001.dat.gz: SHA-256" in caught.value.message and "toc.dat" not in caught.value.message
    if storage.capabilities.shallow_reads_back:  # a shallow check that reads the data compares it too
        with pytest.raises(StorageError, match=r"3001\.dat\.gz: SHA-256"):
            verify_copy(storage, key, manifest)
    backend.write(f"{key}/3001.dat.gz", files["3001.dat.gz"])
    verify_copy(storage, key, manifest, deep=True)  # intact again

    storage.delete(key)
    with pytest.raises(StorageError, match="does not exist"):
        verify_copy(storage, key, manifest, deep=True)


def test_ssh_without_remote_commands_compares_every_file_even_shallow(sshd, tmp_path):
    harness = _ssh(sshd, remote_sha256sum=False)
    storage = harness.storage
    assert storage.capabilities.shallow_reads_back
    folder = tmp_path / "dump.dir"
    files = make_folder(folder)
    key = "daily/erp_backup_daily_20251119_020000.dir"
    manifest = manifest_for(key.rsplit("/", 1)[1], files=files)
    try:
        storage.put(folder, key)
        verify_copy(storage, key, manifest)
        harness.write(f"{key}/toc.dat", bytes([files["toc.dat"][0] ^ 1]) + files["toc.dat"][1:])
        with pytest.raises(StorageError, match=r"toc\.dat: SHA-256"):
            verify_copy(storage, key, manifest)
    finally:
        storage.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_deep_verify_of_a_single_file_is_a_list_of_one(backend, src):
    storage = backend.storage
    key = "daily/erp_backup_daily_20251119_020000.dump"
    source, data = src(40_000)
    storage.put(source, key)
    manifest = manifest_for(key.rsplit("/", 1)[1], data=data)
    assert [(f.name, f.size) for f in manifest.stored_files()] == [("", len(data))]
    verify_copy(storage, key, manifest, deep=True)
    flipped = bytearray(data)
    flipped[0] ^= 0x80
    backend.write(key, bytes(flipped))
    with pytest.raises(StorageError, match="does not match"):
        verify_copy(storage, key, manifest, deep=True)


@pytest.mark.parametrize("backend", ["local", "ssh"], indirect=True)
def test_deep_verify_of_an_old_manifest_without_file_hashes_warns(backend, tmp_path, caplog):
    storage = backend.storage
    folder = tmp_path / "dump.dir"
    files = make_folder(folder)
    key = "daily/erp_backup_daily_20251119_020000.dir"
    storage.put(folder, key)
    old = manifest_for(key.rsplit("/", 1)[1], files=files).model_copy(update={"files": []})
    assert old.stored_files() == []
    verify_copy(storage, key, old, deep=True)  # checked as before: its total size
    assert "records no per-file SHA-256" in caplog.text
    with pytest.raises(StorageError, match="does not match"):
        verify_copy(storage, key, old.model_copy(update={"size": old.size + 1}), deep=True)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_load_streams_a_file_and_refuses_a_missing_one(backend, src):
    storage = backend.storage
    source, data = src(3 * MiB + 7)
    storage.put(source, "daily/l.bin")
    opened = []

    class Collect(bytearray):
        def __init__(self) -> None:
            super().__init__()
            opened.append(self)

        def write(self, chunk: bytes) -> int:
            self.extend(chunk)
            return len(chunk)

    got = storage.load("daily/l.bin", Collect)
    assert bytes(got) == data and len(opened) == 1
    with pytest.raises(StorageError, match="does not exist") as caught:
        storage.load("daily/missing.bin", Collect)
    assert_permanent(caught.value)


@pytest.mark.parametrize("backend", REMOTE, indirect=True)
def test_put_refuses_a_source_that_does_not_match_the_given_sha256(backend, src, big_file, tmp_path):
    small, _ = src(1000)
    with pytest.raises(StorageError, match="does not hash to the SHA-256 given") as caught:
        backend.storage.put(small, "daily/small", sha256="0" * 64)
    assert_permanent(caught.value)
    source = tmp_path / "big.bin"
    source.write_bytes(big_file[0].read_bytes())
    with pytest.raises(StorageError, match="does not hash to the SHA-256 given"):
        backend.storage.put(source, "daily/big", sha256="1" * 64)  # multipart: aborted before completion
    assert backend.storage.stat("daily/small") is None and backend.storage.stat("daily/big") is None
    assert backend.names("daily/small") == [] and backend.names("daily/big") == []


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("key", ["../escape", "daily/../../x", "a//b", "daily/./x", "bad\nname", ""])
def test_rejects_keys_that_are_not_plain_relative_paths(backend, src, key):
    source, _ = src(10)
    with pytest.raises(StorageError, match="key"):
        backend.storage.put(source, key)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_shallow_verify_catches_replaced_content_with_copied_metadata(kind, request, src):
    """Someone replaces the object with different bytes of the same size and copies pgbeat's metadata:
    the checksums the store computes itself still give the change away, without reading the object."""
    harness = _s3(request.getfixturevalue("moto_s3")) if kind == "s3" else _gcs(request.getfixturevalue("fake_gcs"))
    source, data = src(40_000)
    harness.storage.put(source, "daily/y")
    forged = os.urandom(len(data))
    if kind == "s3":
        server = request.getfixturevalue("moto_s3")
        server.client().put_object(Bucket=harness.storage.bucket, Key="pgbeat/prod/daily/y", Body=forged,
                                   Metadata={"sha256": sha(data)}, ChecksumAlgorithm="SHA256")
    else:
        bucket = request.getfixturevalue("fake_gcs").client().bucket(harness.storage.bucket_name)
        metadata = bucket.get_blob("pgbeat/daily/y").metadata
        blob = bucket.blob("pgbeat/daily/y")
        blob.metadata = metadata
        blob.upload_from_string(forged)
        assert bucket.get_blob("pgbeat/daily/y").metadata["sha256"] == sha(data)
    assert harness.storage.stat("daily/y").sha256 == sha(data)  # the metadata alone looks fine
    with pytest.raises(StorageError, match="does not match"):
        harness.storage.verify("daily/y", len(data), sha(data))


def test_s3_interrupted_folder_upload_is_invisible_and_cleaned_up(moto_s3, tmp_path):
    harness = _s3(moto_s3)
    client = moto_s3.client()
    key = "daily/half.dir"
    for name in ("toc.dat", "stale-from-crash.dat"):  # what a put that died before its marker leaves
        client.put_object(Bucket=harness.storage.bucket, Key=f"pgbeat/prod/{key}/{name}", Body=b"old")
    assert harness.storage.stat(key) is None and harness.storage.list("daily") == []
    with pytest.raises(StorageError, match="does not exist"):
        harness.storage.get(key, tmp_path / "nope")

    folder = tmp_path / "dump"
    files = make_folder(folder)
    harness.storage.put(folder, key)
    assert {n[len(key) + 1:] for n in harness.names(key)} == {*files, ".pgbeat-folder.json"}
    harness.storage.get(key, tmp_path / "back")
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in (tmp_path / "back").rglob("*")
                  if p.is_file()) == sorted(files)
    marker = json.loads(harness.read(f"{key}/.pgbeat-folder.json"))
    assert {f["path"]: f["sha256"] for f in marker["files"]} == {k: sha(v) for k, v in files.items()}

    client.put_object(Bucket=harness.storage.bucket, Key=f"pgbeat/prod/{key}/toc.dat", Body=b"x" * 3000)
    with pytest.raises(StorageError, match=r"toc\.dat"):
        harness.storage.verify(key, sum(len(v) for v in files.values()), None)


def test_ssh_checks_by_reading_back_without_remote_commands(sshd, src):
    harness = _ssh(sshd, remote_sha256sum=False)
    source, data = src(30_000)
    harness.storage.put(source, "daily/z")
    harness.storage.verify("daily/z", len(data), sha(data))
    harness.write("daily/z", os.urandom(len(data)))
    with pytest.raises(StorageError, match="does not match"):
        harness.storage.verify("daily/z", len(data), sha(data))
    harness.storage.close()


# --- retries, errors and secrets -----------------------------------------------------------------------------


def down_storage(kind: str, tmp_path: Path, request) -> Storage:
    port = free_port()  # nothing listens there
    if kind == "s3":
        return S3Storage(bucket="pgbeat-down", endpoint_url=f"http://127.0.0.1:{port}", access_key_id=S3_ACCESS_KEY,
                         secret_access_key=SecretStr(S3_SECRET), max_attempts=1, connect_timeout=2)
    if kind == "gcs":
        return GCSStorage(bucket="pgbeat-down", endpoint=f"http://127.0.0.1:{port}", retry_deadline=0.3, timeout=2)
    server = request.getfixturevalue("sshd")
    return SSHStorage("127.0.0.1", port=port, user=server.user, path="/srv/backups", key_file=server.user_key,
                      known_hosts=server.known_hosts, connect_timeout=2)


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    texts = []
    while exc is not None:
        texts += [str(exc), repr(exc)]
        if isinstance(exc, StorageError):
            texts.append(exc.render())
        exc = exc.__cause__
    for secret in secrets:
        assert all(secret not in text for text in texts), f"secret leaked: {texts}"


@pytest.mark.parametrize("kind", ["s3", "gcs", "ssh"])
def test_unreachable_destination_is_retried_then_fails_transient(kind, tmp_path, src, request):
    sleeps: list[float] = []
    inner = down_storage(kind, tmp_path, request)
    storage = RetryingStorage(inner, attempts=3, backoff=1.0, sleep=sleeps.append)
    source, _ = src(1000)
    key = "daily/x.sql.gz"
    with pytest.raises(TransientStorageError) as caught:
        storage.put(source, key)
    error = caught.value
    assert error.transient
    assert inner.describe(key) in str(error) and "after 3 attempts" in str(error)
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0
    assert_no_secret(error, S3_SECRET, S3_ACCESS_KEY)
    assert S3_SECRET not in repr(inner)

    sleeps.clear()
    with pytest.raises(TransientStorageError, match="after 3 attempts"):
        storage.stat(key)
    assert len(sleeps) == 2


def test_ssh_server_down_then_back(sshd, src):
    harness = _ssh(sshd)
    source, data = src(5000)
    harness.storage.put(source, "daily/a")
    harness.storage.close()
    sleeps: list[float] = []
    storage = RetryingStorage(harness.storage, attempts=2, sleep=sleeps.append)
    sshd.stop()
    try:
        with pytest.raises(TransientStorageError, match=r"ssh://.*daily/a.*after 2 attempts"):
            storage.stat("daily/a")
        assert len(sleeps) == 1
    finally:
        sshd.start()
    assert storage.stat("daily/a").size == len(data)  # the same object reconnects
    harness.storage.close()


def test_wrong_s3_credentials_fail_at_once_without_leaking(moto_s3_auth, src):
    sleeps: list[float] = []
    inner = S3Storage(bucket="pgbeat-auth", endpoint_url=moto_s3_auth.url, access_key_id=S3_ACCESS_KEY,
                      secret_access_key=S3_SECRET, name="offsite")
    storage = RetryingStorage(inner, attempts=4, sleep=sleeps.append)
    source, _ = src(100)
    for call in (lambda: storage.put(source, "daily/x"), lambda: storage.list("daily")):
        with pytest.raises(StorageError) as caught:
            call()
        assert_permanent(caught.value)
        assert caught.value.message.startswith("offsite: cannot ") and "s3://pgbeat-auth/" in caught.value.message
        assert_no_secret(caught.value, S3_SECRET, S3_ACCESS_KEY)
    assert sleeps == []
    assert S3_SECRET not in repr(inner) and S3_SECRET not in repr(vars(inner))


def test_ssh_authentication_and_host_key_failures_are_permanent(sshd, src, tmp_path):
    source, _ = src(100)
    stranger_key = sshd.other_key.read_text()
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    cases = {
        "authentication failed": dict(key_file=sshd.other_key, known_hosts=sshd.known_hosts),
        "not in": dict(key_file=sshd.user_key, known_hosts=empty_known_hosts),
    }
    for expected, options in cases.items():
        sleeps: list[float] = []
        storage = RetryingStorage(SSHStorage("127.0.0.1", port=sshd.port, user=sshd.user, path=str(tmp_path),
                                             **options), attempts=3, sleep=sleeps.append)
        with pytest.raises(StorageError, match=expected) as caught:
            storage.put(source, "daily/x")
        assert_permanent(caught.value)
        assert sleeps == []
        assert f"ssh://{sshd.user}@127.0.0.1:{sshd.port}" in str(caught.value)
        assert_no_secret(caught.value, stranger_key.splitlines()[1], sshd.user_key.read_text().splitlines()[1])


def test_gcs_credentials_file_never_appears_in_errors(tmp_path, src):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    closed = free_port()
    account = {"type": "service_account", "project_id": "pgbeat-test", "private_key_id": "k1", "private_key": pem,
               "client_email": "backup@pgbeat-test.iam.gserviceaccount.com", "client_id": "1",
               "token_uri": f"http://127.0.0.1:{closed}/token"}  # nothing listens: no traffic leaves the host
    credentials = tmp_path / "sa.json"
    credentials.write_text(json.dumps(account))
    storage = GCSStorage(bucket="pgbeat-creds", credentials_file=credentials, endpoint=f"http://127.0.0.1:{closed}",
                         retry_deadline=0.3, timeout=2)
    source, _ = src(100)
    with pytest.raises(StorageError) as caught:
        storage.put(source, "daily/x")
    assert "gs://pgbeat-creds/daily/x" in str(caught.value)
    assert_no_secret(caught.value, pem.splitlines()[1], pem.splitlines()[5])


# --- bandwidth ---------------------------------------------------------------------------------------------------


def test_bandwidth_limit_paces_uploads_and_downloads(moto_s3, src, tmp_path):
    harness = _s3(moto_s3)
    throttled = ThrottledStorage(harness.storage, bytes_per_second=2 * MiB)
    source, data = src(3 * MiB // 2)
    assert elapsed(lambda: throttled.put(source, "daily/slow")) >= 0.6  # 1.5 MiB at 2 MiB/s: 0.75 s
    assert elapsed(lambda: throttled.get("daily/slow", tmp_path / "slow")) >= 0.6
    assert (tmp_path / "slow").read_bytes() == data
    fast, _ = src(3 * MiB // 2)
    assert elapsed(lambda: harness.storage.put(fast, "daily/fast")) < 0.6


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_backend_is_a_context_manager_that_closes_its_connection(backend, src):
    source, data = src(1000)
    with backend.storage as storage:
        assert storage is backend.storage
        storage.put(source, "daily/c.bin")
    inner = storage
    while hasattr(inner, "inner"):
        inner = inner.inner
    opened = vars(inner)  # not getattr: S3's `_client` property would make a new client
    assert opened.get("_client") is None and opened.get("_client_instance") is None
    storage.close()  # twice is fine
    assert backend.read("daily/c.bin") == data
    assert storage.stat("daily/c.bin").size == 1000  # a closed backend opens a new connection when used again
    storage.close()
