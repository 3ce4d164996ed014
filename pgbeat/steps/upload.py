"""The upload step: seal (encrypt) the verified backup, give it its final name, copy it off-site.

1. With `encryption` configured, the verified `.sql.gz` is encrypted with age into `.sql.gz.age` before
   anything leaves the worker; the manifest keeps the plaintext's checksums (what restores) and records
   the encrypted file's (what is stored).
2. The local shelf, `BACKUP_ROOT/<tier>/`: the sidecars (`.sha256`, then the manifest, then the server's
   globals file, encrypted too) are published first and the data file last, so a backup under its final
   name always has its manifest and globals.
3. Each off-site destination gets a checked copy (pgbeat.storage.destinations). One that keeps failing does not
   cost the local copy or the other destinations: the step fails naming it (so rotation waits and a
   failure notice goes out), and `pgbeat upload --retry` or the target's next run completes the copy.

The step can be killed at any instant and run again with the same record: each phase leaves a state the
next attempt recognises. The encrypted file is made under a hidden name and counts once its own manifest
is beside it; the final name, once chosen, is kept in the work folder's manifest; a name on the shelf taken
by this run's own files (same run id) is a resumption, not a reason to pick the next free name; sidecars
are published as copies, so the work folder keeps everything until the data file is on the shelf; and a
backup already on the shelf whole is simply taken up again. A run that fails for good (or dies) has what
it published without the data file taken back (`undo_partial_publish`), never a complete backup.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from pgbeat import crypt, faults
from pgbeat.catalog.manifest import (
    CHECKSUM_SUFFIX,
    MANIFEST_SUFFIX,
    STAMP_FORMAT,
    Entry,
    GlobalsInfo,
    Manifest,
    backup_name,
    checksum_path,
    is_globals_name,
    manifest_lock_path,
    manifest_path,
    parse_name,
    read_manifest,
    write_manifest,
)
from pgbeat.errors import StorageError, VerifyError
from pgbeat.fsutil import fsync_file, open_private, private_dir, publish, remove_path, tree_size, write_atomic
from pgbeat.hashing import hash_file
from pgbeat.pipeline.record import Run, StepContext, UploadResult
from pgbeat.settings import Settings
from pgbeat.storage import LocalStorage
from pgbeat.storage.destinations import replicate, replicate_missing, storage_pool

log = logging.getLogger(__name__)

UPLOAD_ENCRYPTED = faults.declare("upload.encrypted", "the encrypted file is complete under a hidden name; the "
                                                      "plaintext is still the backup")
UPLOAD_SEALED = faults.declare("upload.sealed", "the encrypted file and its manifest are in the work folder; "
                                                "the plaintext is not removed yet")
UPLOAD_STAGED = faults.declare("upload.staged", "the final name is chosen and kept in the work folder's "
                                                "manifest; nothing is on the shelf yet")
UPLOAD_CHECKSUM = faults.declare("upload.published-checksum", "the shelf has the .sha256 under the final name, "
                                                              "not the manifest nor the data")
UPLOAD_SIDECARS = faults.declare("upload.published-sidecars", "the shelf has both sidecars (and the globals file) "
                                                              "under the final name, not the data file")
UPLOAD_PUBLISHED = faults.declare("upload.published", "the backup is whole on the shelf; the work folder is "
                                                      "still there")


def local_storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.backup_root, name="local")


def _next_second(name: str) -> str:
    parts = parse_name(name)
    assert parts is not None
    stamp = datetime.strptime(parts["stamp"], STAMP_FORMAT) + timedelta(seconds=1)
    return backup_name(parts["target"], parts["tier"], stamp.strftime(STAMP_FORMAT), parts["ext"])


def _checksum_text(manifest: Manifest, name: str) -> str:
    return manifest.model_copy(update={"file": name}).checksum_lines()


def _ours_on_shelf(final: Path, manifest: Manifest) -> bool:
    """Whether what stands under `final` on the shelf was put there by this run (an earlier attempt)."""
    shelf = read_manifest(manifest_path(final))
    if shelf is not None:
        return shelf.run_id == manifest.run_id
    if final.exists() or os.path.lexists(manifest_path(final)):
        return False  # data or a foreign manifest without a readable pgbeat manifest: not ours
    sums = checksum_path(final)
    try:
        return sums.read_text(encoding="utf-8") == _checksum_text(manifest, final.name)
    except (OSError, UnicodeDecodeError):
        return False


def shelf_name(backup_root: Path, tier: str, manifest: Manifest) -> str:
    """Return the final name for `manifest`'s backup: its recorded name, moved on by a second while its
    time stamp is taken by another backup (two runs within one second; one stamp is one backup whatever
    its extension, since `X.sql.gz` encrypted on its way off-site becomes `X.sql.gz.age`); a name this
    run's own files hold is kept (a resumption)."""
    try:
        present = os.listdir(backup_root / tier)
    except FileNotFoundError:
        present = []
    name = manifest.file
    while True:
        final = backup_root / tier / name
        stem = name.removesuffix(parse_name(name)["ext"])
        others = any(data.startswith(stem + ".") and data != name and not is_globals_name(data) for data in
                     (entry.removesuffix(MANIFEST_SUFFIX).removesuffix(CHECKSUM_SUFFIX) for entry in present))
        taken = any(os.path.lexists(p) for p in (final, manifest_path(final), checksum_path(final)))
        if not others and (not taken or _ours_on_shelf(final, manifest)):
            return name
        name = _next_second(name)


def own_backup(settings: Settings, run: Run) -> Entry | None:
    """Return this run's backup if it is whole on the shelf already (an earlier attempt published it)."""
    folder = settings.backup_root / run.tier
    prefix = f"{run.target}_backup_{run.tier}_"
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return None
    for name in names:
        if not (name.startswith(prefix) and name.endswith(MANIFEST_SUFFIX)):
            continue
        parts = parse_name(name.removesuffix(MANIFEST_SUFFIX))
        if parts is None or parts["target"] != run.target or parts["stamp"] < run.stamp:
            continue  # a name is only ever moved on from the run's own stamp
        manifest = read_manifest(folder / name)
        if manifest is None or manifest.run_id != run.run_id or manifest.file != name.removesuffix(MANIFEST_SUFFIX):
            continue
        path = folder / manifest.file
        if path.exists() and tree_size(path) == manifest.size:
            return Entry(path=path, manifest=manifest)
    return None


def seal(artifact: Path, manifest: Manifest, recipients: list[str]) -> tuple[Path, Manifest]:
    """Encrypt `artifact` for `recipients` next to it as `<name>.age` with its own manifest, then drop the
    plaintext and its sidecars; return the sealed file and its manifest."""
    sealed = artifact.with_name(artifact.name + crypt.SUFFIX)
    partial = sealed.with_name(f".{sealed.name}.partial")
    try:
        stored = crypt.encrypt_file(artifact, partial, recipients)
        fsync_file(partial)
    except BaseException:
        remove_path(partial)
        raise
    faults.fault_point(UPLOAD_ENCRYPTED)
    os.replace(partial, sealed)
    manifest = manifest.encrypted_as(sealed.name, stored["size"], stored["sha256"], stored["md5"], recipients)
    if manifest.globals is not None:
        manifest.globals = seal_globals(artifact.parent, manifest.globals, recipients)
    write_manifest(manifest_path(sealed), manifest)  # from here on, the sealed file is the backup
    faults.fault_point(UPLOAD_SEALED)
    _drop_plaintext(artifact)
    return sealed, manifest


def seal_globals(work: Path, record: GlobalsInfo, recipients: list[str]) -> GlobalsInfo:
    """Encrypt the globals file `record` in `work` for `recipients` into `<name>.age` (the plaintext stays
    until the sealed manifest is written); return the encrypted file's record."""
    plain = work / record.file
    sealed = plain.with_name(plain.name + crypt.SUFFIX)
    stored = crypt.encrypt_file(plain, sealed, recipients)  # truncates what a killed attempt left there
    fsync_file(sealed)
    return record.model_copy(update={"file": sealed.name, "size": stored["size"], "sha256": stored["sha256"],
                                     "encrypted": True, "plaintext_sha256": record.sha256,
                                     "plaintext_size": record.size})


def _drop_plaintext(artifact: Path) -> None:
    """Remove the plaintext backup in the work folder, its sidecars and its globals (once sealed)."""
    plain_globals = [p for p in artifact.parent.iterdir() if is_globals_name(p.name)
                     and not p.name.endswith(crypt.SUFFIX)] if artifact.parent.is_dir() else []
    for old in (artifact, checksum_path(artifact), manifest_path(artifact), *plain_globals):
        remove_path(old)


def staged_artifact(run: Run, recipients: list[str] | None) -> tuple[Path, Manifest]:
    """Return the verified artifact in the work folder and its manifest, sealed when `recipients` are given
    (or when an earlier attempt sealed it already). Raise VerifyError if nothing verified is there."""
    plain = run.artifact
    sealed = plain.with_name(plain.name + crypt.SUFFIX)
    manifest = read_manifest(manifest_path(sealed))
    if manifest is not None and manifest.run_id == run.run_id and sealed.exists():
        _drop_plaintext(plain)  # an earlier attempt sealed it and may have died before this
        return sealed, manifest
    manifest = read_manifest(manifest_path(plain))
    if manifest is None or manifest.run_id != run.run_id or not plain.exists():
        raise VerifyError(f"{run.name}: nothing verified to upload (artifact or manifest missing)", step="upload")
    if recipients:
        return seal(plain, manifest, recipients)
    return plain, manifest


def _publish_copy(final: Path, data: bytes, ours) -> None:
    """Put a copy of `data` on the shelf as `final` (whole or not at all, never over another file); a
    `final` that `ours(final)` recognises as this run's is left as it is."""
    if os.path.lexists(final):
        if ours(final):
            return
        raise StorageError(f"Refusing to overwrite existing {final}")
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        with open_private(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, final)
    finally:
        remove_path(tmp)


def _publish_globals(work: Path, shelved: Path, record: GlobalsInfo) -> None:
    """Put the globals file of `record` on the shelf as `shelved` (0600, never over another file); one there
    already with the recorded SHA-256 is this run's (an earlier attempt).

    In the work folder it keeps the name the dump gave it (the final name may have moved on by a second),
    so it is found there as the one file with its SHA-256: a name is never needed to survive a kill."""
    def ours(path: Path) -> bool:
        return hash_file(path, "sha256") == (record.sha256, record.size)

    if os.path.lexists(shelved) and ours(shelved):
        return
    staged = next((p for p in sorted(work.iterdir()) if is_globals_name(p.name) and ours(p)), None)
    if staged is None:
        raise VerifyError(f"{record.file}: the verified globals file is not in the work folder {work}",
                          step="upload")
    _publish_copy(shelved, staged.read_bytes(), ours)


def publish_local(ctx: StepContext, run: Run, artifact: Path, manifest: Manifest) -> Entry:
    """Give the staged backup its final name in its tier's folder on the shelf (see `shelve`)."""
    name = shelf_name(ctx.settings.backup_root, run.tier, manifest)
    return shelve(ctx.settings, run.run_id, artifact, manifest, f"{run.tier}/{name}", ctx.now())


def shelve(settings: Settings, run_id: str, artifact: Path, manifest: Manifest, key: str, now: datetime) -> Entry:
    """Publish `artifact` (staged in run `run_id`'s work folder, with `manifest`) on the local shelf as
    `key`: `.sha256`, manifest, then the data file, so a backup under its final name always has its
    manifest. What this run already put there (an earlier attempt) is taken up; anything else under
    those names is never overwritten (StorageError)."""
    local = local_storage(settings)
    final = local.path(key)
    here = manifest.copy_at("local")
    if manifest.file != final.name or here is None or here.location != str(final):
        manifest.publish_as(final.name, str(final), now.isoformat())
        write_manifest(manifest_path(artifact), manifest)  # the choice of name outlives this attempt
    checksums = manifest.checksum_lines()
    write_atomic(checksum_path(artifact), checksums.encode())
    faults.fault_point(UPLOAD_STAGED)
    private_dir(final.parent)
    _publish_copy(checksum_path(final), checksums.encode(), lambda p: p.read_text(encoding="utf-8") == checksums)
    faults.fault_point(UPLOAD_CHECKSUM)
    _publish_copy(manifest_path(final), manifest.model_dump_json(indent=2).encode() + b"\n",
                  lambda p: getattr(read_manifest(p), "run_id", None) == run_id)
    if manifest.globals is not None:  # before the data file: a backup under its final name is whole
        _publish_globals(artifact.parent, final.with_name(manifest.globals.file), manifest.globals)
    faults.fault_point(UPLOAD_SIDECARS)
    if not final.exists():
        local.put(artifact, key, sha256=None if manifest.files else manifest.sha256)  # moves it: no second read
    faults.fault_point(UPLOAD_PUBLISHED)
    return Entry(path=final, manifest=manifest)


def undo_partial_publish(settings: Settings, work: Path, run_id: str) -> list[str]:
    """Take back what run `run_id` (whose work folder is `work`) put on the shelf without its data file:
    its sidecars under a final name. A backup whose data file is there is whole and is never touched.
    Return one line per thing removed."""
    done = []
    for staged in sorted(work.glob("*" + MANIFEST_SUFFIX)):
        manifest = read_manifest(staged)
        if manifest is None or manifest.run_id != run_id or parse_name(manifest.file) is None:
            continue
        final = settings.backup_root / manifest.tier / manifest.file
        if os.path.lexists(final) or not _ours_on_shelf(final, manifest):
            continue
        globals_file = [final.with_name(manifest.globals.file)] if manifest.globals is not None else []
        for sidecar in (*globals_file, checksum_path(final), manifest_path(final)):  # the manifest, the marker, last
            if os.path.lexists(sidecar):
                remove_path(sidecar)
                done.append(f"removed {sidecar}: its run {run_id} never published the data file")
        remove_path(manifest_lock_path(manifest_path(final)))
    return done


def upload_step(ctx: StepContext, run: Run) -> Run:
    """Seal, publish locally, copy off-site; return the record with `steps.upload` filled in.

    Raise VerifyError if there is nothing verified to upload, StorageError if a destination keeps failing.
    """
    t0 = time.monotonic()
    target = ctx.target(run)
    entry = own_backup(ctx.settings, run)
    if entry is None:
        recipients = target.encryption.recipients if target.encryption is not None else None
        entry = publish_local(ctx, run, *staged_artifact(run, recipients))
    else:
        log.warning("upload of run %s: %s is whole on the shelf already; carrying on from there", run.run_id,
                    entry.path.name)
    run.final_path, run.name = str(entry.path), entry.path.name
    remove_path(run.work())

    with storage_pool() as storages:  # one backend (and connection) per destination for the whole step
        failures = replicate(ctx.settings, target, entry, storages=storages)
        if not failures:
            # Copies an earlier run could not make (or older backups, for a new destination): a few per run,
            # so that a long backlog never makes one backup's upload step long; `upload --retry` does them all.
            failures = replicate_missing(ctx.settings, target, limit=ctx.settings.reliability.copy_backlog_per_run,
                                         storages=storages)
    final = entry.path
    copies = {dest: info for dest, info in (read_manifest(manifest_path(final)) or entry.manifest).copies.items()}
    run.steps.upload = UploadResult(copies={d: c.location or c.error or c.reason for d, c in copies.items()},
                                    failed=failures, duration_s=round(time.monotonic() - t0, 3))
    log.info("stored %s; copies: %s", final, ", ".join(f"{d}={c.status}" for d, c in copies.items()))
    if failures:
        raise StorageError(f"{len(failures)} off-site copy(ies) failed; the local backup {final} is kept",
                           step="upload", details=failures,
                           hint="`pgbeat upload --retry` completes the copies without a new dump")
    return run
