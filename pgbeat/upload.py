"""The upload step: give the verified backup its final name on every destination.

In this release the destination is the local shelf, `BACKUP_ROOT/<tier>/`. The sidecars (manifest,
`.sha256`) are published first and the data file last, so a backup under its final name always has its
manifest; a crash between the two leaves only sidecars, which rotation recognises and removes.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

from pgbeat.catalog import (
    STAMP_FORMAT,
    backup_name,
    checksum_path,
    manifest_path,
    parse_name,
    read_manifest,
    write_manifest,
)
from pgbeat.errors import VerifyError
from pgbeat.fsutil import remove_path, write_atomic
from pgbeat.run import Run, StepContext
from pgbeat.settings import Settings
from pgbeat.storage import LocalStorage, Storage

log = logging.getLogger(__name__)


def local_storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.backup_root, name="local")


def destinations(settings: Settings) -> list[Storage]:
    return [local_storage(settings)]


def free_name(storage: Storage, run: Run) -> str:
    """Return the run's file name, moved on by a second while that name is taken (two runs in one second)."""
    parts = parse_name(run.name)
    assert parts is not None
    stamp = datetime.strptime(parts["stamp"], STAMP_FORMAT)
    name = run.name
    while storage.stat(f"{run.tier}/{name}") is not None:
        stamp += timedelta(seconds=1)
        name = backup_name(run.target, run.tier, stamp.strftime(STAMP_FORMAT), parts["ext"])
    return name


def upload_step(ctx: StepContext, run: Run) -> Run:
    """Publish the verified artifact and its sidecars to each destination; remove the work folder."""
    t0 = time.monotonic()
    artifact = run.artifact
    manifest = read_manifest(manifest_path(artifact))
    if manifest is None or not artifact.exists():
        raise VerifyError(f"{run.name}: nothing verified to upload (artifact or manifest missing)", step="upload")
    copies = {}
    for storage in destinations(ctx.settings):
        name = free_name(storage, run)
        if name != manifest.file:
            renamed = artifact.with_name(name)
            artifact.rename(renamed)
            manifest_path(artifact).unlink()
            checksum_path(artifact).unlink()
            artifact, manifest.file = renamed, name
        key = f"{run.tier}/{name}"
        manifest.copies[storage.name] = {"location": storage.describe(key), "stored_at": ctx.now().isoformat()}
        write_manifest(manifest_path(artifact), manifest)
        write_atomic(checksum_path(artifact), manifest.checksum_lines().encode())
        for source, suffix in ((manifest_path(artifact), ".manifest.json"), (checksum_path(artifact), ".sha256"),
                               (artifact, "")):
            storage.put(source, key + suffix)
        copies[storage.name] = storage.describe(key)
    run.final_path = copies["local"]
    run.name = Path(run.final_path).name
    remove_path(run.work())
    run.steps["upload"] = {"copies": copies, "duration_s": round(time.monotonic() - t0, 3)}
    log.info("stored %s", ", ".join(copies.values()))
    return run
