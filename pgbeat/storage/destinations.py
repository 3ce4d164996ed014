"""Off-site copies: build each destination's storage, copy backups there, and read its catalog back.

A copy is made from the local shelf after the backup got its final name there: data first, checked
against the manifest's size and SHA-256 where it landed, then the `.sha256` file, then the manifest, whose
presence marks a complete copy that pgbeat owns (rotation deletes nothing without one); only then does the
local manifest record the copy as made (`copies.<name>.status = "ok"`). Each destination is retried on its
own (RetryingStorage); one that keeps failing is recorded as failed and completed later without a new dump
(`pgbeat upload --retry`, or the next runs of the target). Run again after an interruption, a copy takes up
what is there: a data object already at the destination with the right size and SHA-256 is not sent again.

Encryption means nothing leaves in plaintext: for a target with `encryption`, a backup that is still
plaintext on the shelf (taken before encryption was turned on) is encrypted on the way out, into a
private scratch file, and the destination gets `<name>.age` with a manifest of its own (the encrypted
file's checksums, the plaintext's under `encryption.plaintext`); the local file stays as it is. A
directory-format backup cannot be encrypted as one file: it is not copied (a warning says so).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from pgbeat import faults
from pgbeat.catalog.manifest import (
    CHECKSUM_SUFFIX,
    MANIFEST_SUFFIX,
    Copy,
    Entry,
    Manifest,
    list_backups,
    manifest_path,
    order_key,
    parse_name,
    read_manifest,
    update_manifest,
    write_manifest,
)
from pgbeat.errors import NoSuchBackupError, PgbeatError, StorageError, UsageError, VerifyError
from pgbeat.pipeline.record import scratch_folder
from pgbeat.settings import DestinationSpec, Settings, Target, TierPolicy
from pgbeat.storage import Storage
from pgbeat.storage.wrappers import RetryingStorage, ThrottledStorage

log = logging.getLogger(__name__)

OFFSITE_ENCRYPTED = faults.declare("upload.offsite-encrypted", "a plaintext backup is encrypted for a destination "
                                                               "in a scratch file, not uploaded yet")
OFFSITE_DATA = faults.declare("upload.offsite-data", "a destination has the data, not yet its .sha256 and manifest")
OFFSITE_CHECKSUM = faults.declare("upload.offsite-checksum", "a destination has the data and its .sha256, not yet "
                                                             "the manifest")
OFFSITE_COPIED = faults.declare("upload.offsite-copied", "a destination has the whole copy; the local manifest "
                                                         "does not record it yet")
ROTATE_REMOTE_REMOVED_DATA = faults.declare("rotate.remote-removed-data", "an expired copy's data is gone from a "
                                                                         "destination, its sidecars not yet")
DIRECTORY_NOT_ENCRYPTED = ("a directory-format backup cannot be encrypted as one file: not copied while the "
                           "target has encryption")


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


@contextmanager
def storage_pool() -> Iterator[dict[str, Storage]]:
    """Yield a dict for the storages a series of copies opens, by destination name (one backend, and one
    connection, per destination), and close them all at the end."""
    storages: dict[str, Storage] = {}
    try:
        yield storages
    finally:
        for storage in storages.values():
            with contextlib.suppress(Exception):  # a close that fails must not hide what happened before
                storage.close()


def retention(target: Target, spec: DestinationSpec | None, tier: str) -> TierPolicy:
    """The retention of `tier` at a destination: the tier's own, with the destination's overrides."""
    policy = target.tiers[tier]
    override = (spec.retention or {}).get(tier) if spec else None
    if override is None:
        return policy
    return policy.model_copy(update=override.model_dump(exclude_none=True))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _put_text(storage: Storage, scratch: Path, text: str, key: str) -> None:
    """Store a small sidecar under `key`, atomically replacing an older version (a manifest changes as
    copies are added): at no moment is the key missing."""
    from pgbeat.fsutil import open_private

    source = scratch / key.rsplit("/", 1)[-1]
    with open_private(source, "w") as f:
        f.write(text)
    storage.put(source, key, replace=True)


def copy_plan(target: Target, manifest: Manifest, spec: DestinationSpec) -> str:
    """How `manifest`'s backup goes to `spec`: "done" (a good copy is there), "copy" (as it is stored),
    "encrypt" (plaintext, for a target that encrypts: encrypted on the way out) or "skip" (it cannot be
    encrypted: a directory-format backup)."""
    if manifest.has_good_copy(spec.name):
        return "done"
    if target.encryption is not None and manifest.encryption is None:
        return "skip" if manifest.files else "encrypt"
    return "copy"


def _remote_manifest(storage: Storage, key: str, scratch: Path) -> Manifest | None:
    local = scratch / (key.rsplit("/", 1)[-1] + MANIFEST_SUFFIX)
    storage.get(key + MANIFEST_SUFFIX, local)
    return read_manifest(local)


def _encrypted_copy(storage: Storage, spec: DestinationSpec, entry: Entry, recipients: list[str],
                    scratch: Path) -> tuple[Manifest, Path | None]:
    """Return the manifest of `entry` encrypted for `spec`, and the encrypted scratch file to upload (None
    when an earlier attempt's upload is there and matches what it recorded)."""
    from pgbeat import crypt

    m = entry.manifest
    name = m.file + crypt.SUFFIX
    key = f"{m.tier}/{name}"
    known = m.copy_at(spec.name)
    if storage.stat(key) is not None:
        if known is not None and known.file == name and known.sha256 and known.size is not None:
            try:
                storage.verify(key, known.size, known.sha256)
                return m.encrypted_as(name, known.size, known.sha256, known.md5, recipients), None
            except StorageError:
                pass
        if storage.stat(key + MANIFEST_SUFFIX) is not None:
            remote = _remote_manifest(storage, key, scratch)
            holds = remote.encryption.plaintext.sha256 if remote is not None and remote.encryption else None
            if remote is None or remote.file != name or holds != m.sha256:
                raise StorageError(f"{spec.name}: {key} holds another copy than this backup's; not replaced",
                                   hint=f"remove {key} and its sidecars from {spec.name} if it is a stale copy")
            storage.verify(key, remote.size, remote.sha256)  # this backup, encrypted before its record was lost
            return remote, None
        storage.delete(key)  # an interrupted upload of ours (no manifest): its bytes cannot be checked
    sealed = scratch / name
    digests = crypt.encrypt_file(entry.path, sealed, recipients)
    faults.fault_point(OFFSITE_ENCRYPTED)
    # What is about to be stored, so that a rerun can check an upload that landed before an interruption.
    pending = Copy(status="pending", file=name, size=digests["size"], sha256=digests["sha256"], md5=digests["md5"],
                   at=now_iso())
    update_manifest(manifest_path(entry.path), lambda mf: mf.record_copy(spec.name, pending))
    return m.encrypted_as(name, digests["size"], digests["sha256"], digests["md5"], recipients), sealed


def copy_backup(settings: Settings, storage: Storage, spec: DestinationSpec, entry: Entry,
                recipients: list[str] | None = None) -> Copy:
    """Copy one local backup to `storage` (encrypted on the way for `recipients`) and check it there; then
    its `.sha256`, then its manifest. Return the copy's record for the local manifest."""
    with scratch_folder(settings, "offsite") as scratch:
        if recipients:
            stored, source = _encrypted_copy(storage, spec, entry, recipients, scratch)
        else:
            stored, source = entry.manifest, entry.path
        key = f"{stored.tier}/{stored.file}"
        sha256 = None if stored.files else stored.sha256
        if source is not None and storage.stat(key) is None:  # data that landed before an interruption stays
            storage.put(source, key, sha256=sha256)
        faults.fault_point(OFFSITE_DATA)
        storage.verify(key, stored.size, sha256)
        stored = copy_globals(storage, entry, stored, bool(recipients))
        _put_text(storage, scratch, stored.checksum_lines(), key + CHECKSUM_SUFFIX)
        faults.fault_point(OFFSITE_CHECKSUM)
        record = Copy(status="ok", location=storage.describe(key), stored_at=now_iso(),
                      verified="size and SHA-256 where stored")
        if recipients:
            record = record.model_copy(update={"file": stored.file, "encrypted": True, "size": stored.size,
                                               "sha256": stored.sha256})
        remote = stored.model_copy(deep=True)
        remote.record_copy(spec.name, record)
        manifest_file = scratch / (stored.file + MANIFEST_SUFFIX)
        write_manifest(manifest_file, remote)  # the way every manifest is written (a derived one is its own)
        storage.put(manifest_file, key + MANIFEST_SUFFIX, replace=True)
        faults.fault_point(OFFSITE_COPIED)
    return record


def copy_globals(storage: Storage, entry: Entry, stored: Manifest, encrypting: bool) -> Manifest:
    """Copy the globals file of local backup `entry` beside its copy (`stored`: that copy's manifest) and check
    it there; return the copy's manifest. A plaintext globals file never goes where the backup goes
    encrypted (a backup of before `encryption` was configured): that copy goes without it, and says so."""
    record = entry.manifest.globals
    if record is None:
        return stored
    if encrypting and not record.encrypted:
        log.warning("%s: its globals file is plaintext; not copied beside the encrypted copy", entry.path.name)
        return stored.model_copy(update={"globals": None})
    key = f"{stored.tier}/{record.file}"
    if storage.stat(key) is None:
        storage.put(entry.path.with_name(record.file), key, sha256=record.sha256)
    storage.verify(key, record.size, record.sha256)
    return stored


def replicate(settings: Settings, target: Target, entry: Entry, only: str | None = None,
              storages: dict[str, Storage] | None = None) -> list[str]:
    """Copy `entry` to each of `target`'s destinations that lack a good copy; return one line per failure.

    `storages` (a `storage_pool`) is filled and reused, so that a series of copies opens each once; without
    it, the storages opened here are closed before returning."""
    if storages is None:
        with storage_pool() as pool:
            return replicate(settings, target, entry, only, pool)
    failures = []
    for spec in target.destinations:
        if only and spec.name != only:
            continue
        manifest = read_manifest(manifest_path(entry.path)) or entry.manifest  # with what earlier attempts noted
        plan = copy_plan(target, manifest, spec)
        if plan == "done":
            continue
        previous = manifest.copy_at(spec.name)
        if plan == "skip":
            if previous is not None and previous.status == "skipped" and previous.reason == DIRECTORY_NOT_ENCRYPTED:
                continue  # said already
            log.warning("%s is not copied to %s: %s", entry.path.name, spec.name, DIRECTORY_NOT_ENCRYPTED)
            record = Copy(status="skipped", reason=DIRECTORY_NOT_ENCRYPTED, at=now_iso())
        else:
            try:
                recipients = target.encryption.recipients if plan == "encrypt" and target.encryption else None
                if spec.name not in storages:
                    storages[spec.name] = open_storage(spec)
                record = copy_backup(settings, storages[spec.name], spec, Entry(path=entry.path, manifest=manifest),
                                     recipients)
            except (StorageError, OSError) as exc:
                message = exc.message if isinstance(exc, PgbeatError) else str(exc)
                fresh = read_manifest(manifest_path(entry.path)) or manifest
                known = fresh.copy_at(spec.name)  # what an encrypted attempt stored, to be checked on the next
                kept = known.model_dump(include={"file", "size", "sha256"}) if known is not None else {}
                record = Copy(**kept, status="failed", error=message, at=now_iso())
                failures.append(f"{spec.name}: {message}")
                log.error("copy of %s to %s failed: %s", entry.path.name, spec.name, message)
        update_manifest(manifest_path(entry.path), lambda m, name=spec.name, r=record: m.record_copy(name, r))
    return failures


def replicate_missing(settings: Settings, target: Target, only: str | None = None, limit: int | None = None,
                      storages: dict[str, Storage] | None = None) -> list[str]:
    """Complete the copies of `target`'s local backups that a destination lacks, newest first; with
    `limit`, of at most that many backups (the rest wait for the next call). Return one line per failure."""
    if storages is None:
        with storage_pool() as pool:
            return replicate_missing(settings, target, only, limit, pool)
    failures, taken = [], 0
    for entry in reversed(list_backups(settings.backup_root, target.name)):
        fresh = read_manifest(manifest_path(entry.path))
        if fresh is None:
            continue
        plans = {copy_plan(target, fresh, spec) for spec in target.destinations if not only or spec.name == only}
        if not plans & {"copy", "encrypt"}:
            if "skip" in plans:
                replicate(settings, target, Entry(path=entry.path, manifest=fresh), only)  # records why, no transfer
            continue
        if limit is not None and taken >= limit:
            log.info("%s: more backups lack off-site copies; the next run (or `pgbeat upload --retry`) goes on",
                     target.name)
            break
        taken += 1
        failures += replicate(settings, target, Entry(path=entry.path, manifest=fresh), only, storages)
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
                and self.manifest.has_good_copy(self.destination))


def remote_entries(settings: Settings, storage: Storage, destination: str, target: str,
                   tier: str) -> list[RemoteEntry]:
    """Read the manifests of `target`'s `tier` backups at a destination (only pgbeat's objects count)."""
    listed = {info.key.rsplit("/", 1)[-1] for info in storage.list(f"{tier}/")}
    entries = []
    with scratch_folder(settings, "offsite") as scratch:
        for name in sorted(listed):
            if not name.endswith(MANIFEST_SUFFIX):
                continue
            data_name = name.removesuffix(MANIFEST_SUFFIX)
            parts = parse_name(data_name)
            if parts is None or parts["target"] != target or parts["tier"] != tier:
                continue
            local = scratch / name
            storage.get(f"{tier}/{name}", local)
            manifest = read_manifest(local)
            if manifest is None or manifest.file != data_name or manifest.target != target:
                continue
            entries.append(RemoteEntry(path=f"{tier}/{data_name}", manifest=manifest, exists=data_name in listed,
                                       destination=destination))
    return sorted(entries, key=order_key)


def remove_remote(storage: Storage, entry: RemoteEntry) -> None:
    """Remove a backup at a destination: data first, then its globals and `.sha256`, its manifest last (a
    removal cut short leaves a manifest without data, which the next rotation removes as an orphan)."""
    storage.delete(entry.path)
    faults.fault_point(ROTATE_REMOTE_REMOVED_DATA)
    if entry.manifest.globals is not None:
        storage.delete(f"{entry.path.rsplit('/', 1)[0]}/{entry.manifest.globals.file}")
    storage.delete(entry.path + CHECKSUM_SUFFIX)
    storage.delete(entry.path + MANIFEST_SUFFIX)


# --- addresses ---------------------------------------------------------------------------------------


def backup_url(spec: DestinationSpec, key: str) -> str:
    """The address of `key` at destination `spec` that `pgbeat restore` and `pgbeat fetch` take (`locate`'s
    inverse): s3://bucket/prefix/key, gs://bucket/prefix/key, ssh://user@host:port/path/key."""
    if spec.kind in ("s3", "gcs"):
        prefix = spec.prefix.strip("/")
        return f"{'s3' if spec.kind == 's3' else 'gs'}://{spec.bucket}/{prefix + '/' if prefix else ''}{key}"
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    return f"ssh://{spec.user}@{host}:{spec.port or 22}{spec.path.rstrip('/')}/{key}"


def locate(settings: Settings, url: str) -> tuple[Target, DestinationSpec, str]:
    """Find which configured destination holds `url` (s3://, gs://, ssh://); return it and the key."""
    parsed = urlparse(url)
    scheme = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "ssh": "ssh"}.get(parsed.scheme)
    if scheme is None:
        raise UsageError(f"{url}: not a backup address", hint="use s3://bucket/..., gs://bucket/... or "
                                                               "ssh://user@host:port/path/...")
    for target in settings.configured():
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
    raise UsageError(f"{url}: no configured destination holds this address",
                      hint="pgbeat fetches only from destinations in its configuration (for their credentials)")


def fetch(settings: Settings, url: str, folder: Path) -> Entry:
    """Download the backup at `url` with its manifest, `.sha256` and globals into `folder`, checked; return it."""
    target, spec, key = locate(settings, url)
    with open_storage(spec) as storage:
        return _fetch(storage, target, url, key, folder)


def _fetch(storage: Storage, target: Target, url: str, key: str, folder: Path) -> Entry:
    name = key.rsplit("/", 1)[-1]
    folder.mkdir(parents=True, exist_ok=True)
    manifest_file = folder / (name + MANIFEST_SUFFIX)
    try:
        storage.get(key + MANIFEST_SUFFIX, manifest_file)
    except StorageError as exc:
        if storage.stat(key + MANIFEST_SUFFIX) is not None:
            raise  # it is there, but could not be read: the storage's failure, not the copy's
        if storage.stat(key) is None:
            raise NoSuchBackupError(f"{url}: no such copy (neither it nor its manifest is there)",
                                    hint="`pgbeat list --destination NAME` lists the copies there") from None
        raise VerifyError(f"{url}: no pgbeat manifest next to it ({exc.message})",
                          hint="only complete copies made by pgbeat can be fetched") from None
    manifest = read_manifest(manifest_file)
    if manifest is None or manifest.file != name or manifest.target != target.name:
        # As for a local backup (steps.verify.open_backup): a damaged or foreign manifest fails verification.
        raise VerifyError(f"{url}: its manifest is not a pgbeat manifest of this backup", step="verify",
                          hint="do not restore from this copy; use another copy or backup")
    storage.get(key + CHECKSUM_SUFFIX, folder / (name + CHECKSUM_SUFFIX))
    if manifest.globals is not None:
        storage.get(f"{key.rsplit('/', 1)[0]}/{manifest.globals.file}", folder / manifest.globals.file)
    storage.get(key, folder / name)
    return Entry(path=folder / name, manifest=manifest)
