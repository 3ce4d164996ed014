"""The upload step: seal (encrypt) the verified backup, give it its final name, copy it off-site.

1. With `encryption` configured, the verified `.sql.gz` is encrypted with age into `.sql.gz.age` before
   anything leaves the worker; the manifest keeps the plaintext's checksums (what restores) and records
   the encrypted file's (what is stored).
2. The local shelf, `BACKUP_ROOT/<tier>/`: the sidecars (manifest, `.sha256`) are published first and the
   data file last, so a backup under its final name always has its manifest.
3. Each off-site destination gets a checked copy (pgbeat.destinations). One that keeps failing does not
   cost the local copy or the other destinations: the step fails naming it (so rotation waits and a
   failure notice goes out), and `pgbeat upload --retry` or the target's next run completes the copy.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

from pgbeat import crypt
from pgbeat.catalog import (
    STAMP_FORMAT,
    Entry,
    backup_name,
    checksum_path,
    manifest_path,
    parse_name,
    read_manifest,
    write_manifest,
)
from pgbeat.destinations import replicate, replicate_missing
from pgbeat.errors import StorageError, VerifyError
from pgbeat.fsutil import remove_path, write_atomic
from pgbeat.run import Run, StepContext
from pgbeat.settings import Settings
from pgbeat.storage import LocalStorage, Storage

log = logging.getLogger(__name__)


def local_storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.backup_root, name="local")


def free_name(storage: Storage, tier: str, name: str) -> str:
    """Return `name`, moved on by a second while that name is taken (two runs within one second)."""
    parts = parse_name(name)
    assert parts is not None
    stamp = datetime.strptime(parts["stamp"], STAMP_FORMAT)
    while storage.stat(f"{tier}/{name}") is not None:
        stamp += timedelta(seconds=1)
        name = backup_name(parts["target"], tier, stamp.strftime(STAMP_FORMAT), parts["ext"])
    return name


def seal(artifact: Path, manifest, recipients: list[str]) -> Path:
    """Encrypt `artifact` for `recipients` next to it as `<name>.age`; update `manifest`; drop the plaintext."""
    sealed = artifact.with_name(artifact.name + crypt.SUFFIX)
    stored = crypt.encrypt_file(artifact, sealed, recipients)
    manifest.encryption = {"scheme": "age", "recipients": recipients, "plaintext": {
        "file": manifest.file, "size": manifest.size, "sha256": manifest.sha256, "md5": manifest.md5}}
    manifest.file, manifest.size, manifest.sha256, manifest.md5 = sealed.name, stored["size"], stored["sha256"], \
        stored["md5"]
    for old in (manifest_path(artifact), checksum_path(artifact), artifact):
        remove_path(old)
    return sealed


def upload_step(ctx: StepContext, run: Run) -> Run:
    """Seal, publish locally, copy off-site; return the record with `steps.upload` filled in."""
    t0 = time.monotonic()
    artifact = run.artifact
    manifest = read_manifest(manifest_path(artifact))
    if manifest is None or not artifact.exists():
        raise VerifyError(f"{run.name}: nothing verified to upload (artifact or manifest missing)", step="upload")
    target = ctx.target(run)
    if target.encryption is not None:
        artifact = seal(artifact, manifest, target.encryption.recipients)
    local = local_storage(ctx.settings)
    name = free_name(local, run.tier, manifest.file)
    key = f"{run.tier}/{name}"
    manifest.file = name
    manifest.copies["local"] = {"location": local.describe(key), "status": "ok", "stored_at": ctx.now().isoformat()}
    staged = artifact.with_name(name)
    if staged != artifact:
        artifact.rename(staged)
    write_manifest(manifest_path(staged), manifest)
    write_atomic(checksum_path(staged), manifest.checksum_lines().encode())
    local.put(manifest_path(staged), key + ".manifest.json")
    local.put(checksum_path(staged), key + ".sha256")
    local.put(staged, key, sha256=manifest.sha256)  # known already: no second read of the backup
    final = local.path(key)
    run.final_path, run.name = str(final), name
    remove_path(run.work())

    failures = replicate(ctx.settings, target, Entry(path=final, manifest=manifest))
    if not failures:
        failures = replicate_missing(ctx.settings, target)  # copies an earlier run could not make
    copies = {dest: info for dest, info in (read_manifest(manifest_path(final)) or manifest).copies.items()}
    run.steps["upload"] = {"copies": {d: c.get("location") or c.get("error") for d, c in copies.items()},
                           "failed": failures, "duration_s": round(time.monotonic() - t0, 3)}
    log.info("stored %s; copies: %s", final, ", ".join(f"{d}={c.get('status')}" for d, c in copies.items()))
    if failures:
        raise StorageError(f"{len(failures)} off-site copy(ies) failed; the local backup {final} is kept",
                           step="upload", details=failures,
                           hint="`pgbeat upload --retry` completes the copies without a new dump")
    return run
