"""Off-site copies: build each destination's storage, copy backups there, and read its catalog back.

A copy is made from the local shelf after the backup got its final name there: data first, checked
against the manifest's size and SHA-256 where it landed, then the `.sha256` file, then the manifest, whose
presence marks a complete copy that pgbeat owns (rotation deletes nothing without one). Each destination
is retried on its own (RetryingStorage); one that keeps failing is recorded in the local manifest
(`copies.<name>.status = "failed"`) and completed later without a new dump (`pgbeat upload --retry`, or the
next run of the target).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pgbeat.catalog import (
    CHECKSUM_SUFFIX,
    MANIFEST_SUFFIX,
    Entry,
    Manifest,
    checksum_path,
    list_backups,
    manifest_path,
    order_key,
    parse_name,
    read_manifest,
    update_manifest,
)
from pgbeat.errors import PgbeatError, StorageError
from pgbeat.settings import DestinationSpec, Settings, Target, TierPolicy
from pgbeat.storage import Storage
from pgbeat.storage.wrappers import RetryingStorage, ThrottledStorage

log = logging.getLogger(__name__)


def open_storage(spec: DestinationSpec) -> Storage:
    """Return the storage of `spec`, retried on its own and, if configured, bandwidth-limited."""
    secret = lambda value: value.get_secret_value() if value is not None else None  # noqa: E731
    if spec.kind == "s3":
        from pgbeat.storage.s3 import DEFAULT_PART_SIZE, S3Storage

        inner: Storage = S3Storage(
            spec.bucket, spec.prefix, endpoint_url=spec.endpoint_url, region=spec.region,
            storage_class=spec.storage_class, sse=spec.sse, sse_kms_key_id=spec.sse_kms_key_id,
            access_key_id=secret(spec.access_key_id), secret_access_key=spec.secret_access_key,
            profile=spec.profile, part_size=spec.part_size or DEFAULT_PART_SIZE, name=spec.name)
    elif spec.kind == "gcs":
        from pgbeat.storage.gcs import GCSStorage

        inner = GCSStorage(spec.bucket, spec.prefix, project=spec.project, credentials_file=spec.credentials_file,
                           endpoint=spec.endpoint, name=spec.name)
    else:
        from pgbeat.storage.ssh import SSHStorage

        inner = SSHStorage(spec.host, port=spec.port or 22, user=spec.user, path=spec.path, key_file=spec.key_file,
                           known_hosts=spec.known_hosts, name=spec.name)
    storage: Storage = RetryingStorage(inner, attempts=spec.retries)
    if spec.bandwidth_limit:
        storage = ThrottledStorage(storage, spec.bandwidth_limit)
    return storage


def retention(target: Target, spec: DestinationSpec | None, tier: str) -> TierPolicy:
    """The retention of `tier` at a destination: the tier's own, with the destination's overrides."""
    policy = target.tiers[tier]
    override = (spec.retention or {}).get(tier) if spec else None
    if override is None:
        return policy
    return policy.model_copy(update=override.model_dump(exclude_none=True))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _replace(storage: Storage, source: Path, key: str) -> None:
    """Store a small sidecar, replacing an older version (manifests change when copies are added)."""
    storage.delete(key)
    storage.put(source, key)


def copy_backup(storage: Storage, spec: DestinationSpec, entry: Entry) -> dict[str, Any]:
    """Copy one local backup to `storage` and check it there; return the copy's record for the manifest."""
    m = entry.manifest
    key = f"{m.tier}/{m.file}"
    folder = bool(m.files)
    existing = storage.stat(key)
    if existing is None:
        storage.put(entry.path, key, sha256=None if folder else m.sha256)
    storage.verify(key, m.size, None if folder else m.sha256)
    _replace(storage, checksum_path(entry.path), key + CHECKSUM_SUFFIX)
    return {"location": storage.describe(key), "status": "ok", "stored_at": now_iso(),
            "verified": "size and SHA-256 where stored"}


def replicate(settings: Settings, target: Target, entry: Entry, only: str | None = None) -> list[str]:
    """Copy `entry` to each of `target`'s destinations that lack a good copy; return one line per failure."""
    failures, done = [], []
    for spec in target.destinations:
        if (only and spec.name != only) or entry.manifest.copies.get(spec.name, {}).get("status") == "ok":
            continue
        try:
            record = copy_backup(open_storage(spec), spec, entry)
            done.append(spec.name)
        except (StorageError, OSError) as exc:
            message = exc.message if isinstance(exc, PgbeatError) else str(exc)
            record = {"status": "failed", "error": message, "at": now_iso()}
            failures.append(f"{spec.name}: {message}")
            log.error("copy of %s to %s failed: %s", entry.path.name, spec.name, message)
        update_manifest(manifest_path(entry.path), lambda m, name=spec.name, r=record: m.copies.__setitem__(name, r))
    # The manifest goes last, with every copy's record: its presence marks a complete copy.
    for name in done:
        spec = target.destination(name)
        try:
            _replace(open_storage(spec), manifest_path(entry.path), f"{entry.manifest.tier}/{entry.path.name}"
                     + MANIFEST_SUFFIX)
        except StorageError as exc:
            failures.append(f"{name}: {exc.message}")
            update_manifest(manifest_path(entry.path), lambda m, n=name, e=exc: m.copies.__setitem__(
                n, {"status": "failed", "error": e.message, "at": now_iso()}))
    return failures


def replicate_missing(settings: Settings, target: Target, only: str | None = None) -> list[str]:
    """Complete every local backup of `target` that lacks a good copy on a destination."""
    failures = []
    for entry in list_backups(settings.backup_root, target.name):
        fresh = read_manifest(manifest_path(entry.path))
        if fresh is not None:
            failures += replicate(settings, target, Entry(path=entry.path, manifest=fresh), only)
    return failures


# --- reading a destination back ----------------------------------------------------------------------


@dataclass
class RemoteEntry:
    """A backup at a destination, as rotation and listing see it."""

    path: str  # the data key
    manifest: Manifest
    exists: bool
    destination: str

    @property
    def verified(self) -> bool:
        """The backup verified, and this copy was checked where it landed."""
        return (self.manifest.status == "verified" and self.manifest.complete
                and self.manifest.copies.get(self.destination, {}).get("status") == "ok")


def remote_entries(settings: Settings, storage: Storage, destination: str, target: str,
                   tier: str) -> list[RemoteEntry]:
    """Read the manifests of `target`'s `tier` backups at a destination (only pgbeat's objects count)."""
    listed = {info.key.rsplit("/", 1)[-1] for info in storage.list(f"{tier}/")}
    entries = []
    with tempfile.TemporaryDirectory(dir=_scratch(settings)) as scratch:
        for name in sorted(listed):
            if not name.endswith(MANIFEST_SUFFIX):
                continue
            data_name = name.removesuffix(MANIFEST_SUFFIX)
            parts = parse_name(data_name)
            if parts is None or parts["target"] != target or parts["tier"] != tier:
                continue
            local = Path(scratch) / name
            storage.get(f"{tier}/{name}", local)
            manifest = read_manifest(local)
            if manifest is None or manifest.file != data_name or manifest.target != target:
                continue
            entries.append(RemoteEntry(path=f"{tier}/{data_name}", manifest=manifest, exists=data_name in listed,
                                       destination=destination))
    return sorted(entries, key=order_key)


def remove_remote(storage: Storage, entry: RemoteEntry) -> None:
    """Remove a backup at a destination: data first, its manifest last."""
    storage.delete(entry.path)
    storage.delete(entry.path + CHECKSUM_SUFFIX)
    storage.delete(entry.path + MANIFEST_SUFFIX)


def _scratch(settings: Settings) -> Path:
    from pgbeat.fsutil import private_dir

    return private_dir(settings.backup_root / ".work")


# --- addresses ---------------------------------------------------------------------------------------


def locate(settings: Settings, url: str) -> tuple[Target, DestinationSpec, str]:
    """Find which configured destination holds `url` (s3://, gs://, ssh://); return it and the key."""
    parsed = urlparse(url)
    scheme = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "ssh": "ssh"}.get(parsed.scheme)
    if scheme is None:
        raise PgbeatError(f"{url}: not a backup address", hint="use s3://bucket/..., gs://bucket/... or "
                                                               "ssh://user@host:port/path/...")
    for target in settings.targets.values():
        for spec in target.destinations:
            if spec.kind != scheme:
                continue
            if scheme in ("s3", "gcs"):
                if parsed.netloc != spec.bucket:
                    continue
                path = parsed.path.lstrip("/")
                prefix = spec.prefix.strip("/")
                if prefix and not path.startswith(prefix + "/"):
                    continue
                return target, spec, path[len(prefix) + 1:] if prefix else path
            base = spec.path.rstrip("/") + "/"
            if parsed.hostname == spec.host and parsed.path.startswith(base) and (
                    parsed.port or 22) == (spec.port or 22):
                return target, spec, parsed.path[len(base):]
    raise PgbeatError(f"{url}: no configured destination holds this address",
                      hint="pgbeat fetches only from destinations in its configuration (for their credentials)")


def fetch(settings: Settings, url: str, folder: Path) -> Entry:
    """Download the backup at `url` with its manifest and `.sha256` into `folder`, checked; return it."""
    target, spec, key = locate(settings, url)
    storage = open_storage(spec)
    name = key.rsplit("/", 1)[-1]
    folder.mkdir(parents=True, exist_ok=True)
    manifest_file = folder / (name + MANIFEST_SUFFIX)
    try:
        storage.get(key + MANIFEST_SUFFIX, manifest_file)
    except StorageError as exc:
        raise StorageError(f"{url}: no pgbeat manifest next to it ({exc.message})",
                           hint="only complete copies made by pgbeat can be fetched") from None
    manifest = read_manifest(manifest_file)
    if manifest is None or manifest.file != name or manifest.target != target.name:
        raise StorageError(f"{url}: its manifest is not a pgbeat manifest of this backup")
    storage.get(key + CHECKSUM_SUFFIX, folder / (name + CHECKSUM_SUFFIX))
    storage.get(key, folder / name)
    return Entry(path=folder / name, manifest=manifest)
