"""The WAL archive: where each WAL file is kept, pushing one there (archive_command), fetching one back
(restore_command).

Layout. A WAL file `F` of target `T` is stored once per place, under the same relative name everywhere:
locally `BACKUP_ROOT/wal/T/<dir>/<stored>`, at each destination of the target under the key
`wal/T/<dir>/<stored>`, where
- `<dir>` is the first 16 characters of a segment's name (timeline and log: at most 256 segments a
  folder, so that a destination lists a bounded folder), the same for its `.partial` and `.backup` files,
  and `history` for timeline history files (`00000002.history`);
- `<stored>` is `F-<SHA-256 of F's raw bytes>` plus the codec's suffix (`.gz`, `.zst`, none) and `.age`
  when the target encrypts: `000000010000000000000003-9f86d0...a08.zst.age`. The raw SHA-256 is in the
  name (as pgBackRest does), so that a second push compares by listing one folder, without
  decompressing or decrypting anything, and the name and the content it vouches for can never disagree
  (no sidecar to lose).

Pushing is idempotent and never overwrites: the same WAL file pushed again with the same content is a
success, with different content a `WalConflictError` naming it (two clusters sharing one archive). A
file is written under a hidden staging name (`base.staging_name`), fsync'ed, and published with a hard
link (`fsutil.publish`, which never replaces a name and fsyncs the folder), so a push killed at any
point leaves no half file under a final name; the next push takes up where it stopped. Then each
destination gets the local file (checked where it landed: size and SHA-256 of the stored bytes); a
marker `BACKUP_ROOT/wal/T/.copied/<destination>/<stored>` records that, so that the next call for the
same file (PostgreSQL's, after a push-ahead) finds it done without contacting the destination.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pgbeat import faults
from pgbeat.errors import PgbeatError, StorageError, UsageError
from pgbeat.fsutil import CHUNK, fsync_dir, fsync_file, open_private, private_dir, publish, remove_path
from pgbeat.hashing import sha256_file
from pgbeat.settings import Settings, Target
from pgbeat.storage.base import is_staging, staging_name
from pgbeat.wal.acked import sweep_acks, write_ack

log = logging.getLogger(__name__)

WAL_DIR = "wal"
HISTORY_DIR = "history"
COPIED_DIR = ".copied"
LOCK_FILE = ".lock"
CODEC_SUFFIX = {"gzip": ".gz", "zstd": ".zst", "none": ""}
AGE_SUFFIX = ".age"
# What PostgreSQL archives: segments, a promoted standby's last partial segment, base backup history
# files (`.backup`, they say where a base backup starts and ends), timeline history files.
WAL_NAME = re.compile(r"(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)")
STORED_NAME = re.compile(rf"(?P<wal>{WAL_NAME.pattern})-(?P<sha256>[0-9a-f]{{64}})(?P<codec>\.gz|\.zst)?"
                         r"(?P<age>\.age)?")
EXIT_MISSING = 1  # restore_command: not in the archive (the normal end of recovery)
EXIT_FETCH_FAILED = 128  # restore_command: above 125, so that PostgreSQL stops instead of ending recovery

PUSH_STAGED = faults.declare("wal.push-staged", "a WAL file is compressed (and encrypted) in the local archive "
                                                "under a hidden staging name, not yet under its final name")
PUSH_LOCAL = faults.declare("wal.push-local", "a WAL file is in the local archive under its final name, not yet "
                                              "at the destinations")


class WalError(PgbeatError):
    """A WAL file could not be archived (or the archive checked); nothing archived was changed."""


class WalConflictError(WalError):
    """The archive holds this WAL file with other content: another cluster writes to the same archive."""


class WalMissing(PgbeatError):
    """The WAL file asked for is in no place of the archive (restore_command: the end of recovery)."""

    exit_code = EXIT_MISSING


class WalFetchError(PgbeatError):
    """The WAL file could not be fetched: a damaged copy, an unreadable archive, a destination down."""

    exit_code = EXIT_FETCH_FAILED


# --- layout ------------------------------------------------------------------------------------------


def check_wal_name(name: str) -> str:
    """Given a WAL file name, return it; raise UsageError if PostgreSQL would never archive such a name."""
    if not WAL_NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not the name of a WAL file",
                         hint="a segment (24 hex digits), its .partial or .backup file, or a timeline's .history")
    return name


def wal_root(settings: Settings, target: str) -> Path:
    """The local archive of `target`: BACKUP_ROOT/wal/<target>."""
    return settings.backup_root / WAL_DIR / target


def folder_of(wal_name: str) -> str:
    """The folder (relative to the archive) that holds `wal_name`."""
    return HISTORY_DIR if wal_name.endswith(".history") else wal_name[:16]


def stored_name(wal_name: str, sha256: str, codec: str, encrypted: bool) -> str:
    return f"{wal_name}-{sha256}{CODEC_SUFFIX[codec]}{AGE_SUFFIX if encrypted else ''}"


@dataclass(frozen=True)
class StoredWal:
    """One stored copy of a WAL file: its stored name, folder, and what the name says of it."""

    name: str
    folder: str
    wal: str
    sha256: str  # of the raw WAL file
    codec: str
    encrypted: bool

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"

    def key(self, target: str) -> str:
        """Its key at a destination."""
        return f"{WAL_DIR}/{target}/{self.relpath}"


def parse_stored(name: str, folder: str) -> StoredWal | None:
    match = STORED_NAME.fullmatch(name)
    if match is None:
        return None
    codec = {".gz": "gzip", ".zst": "zstd", None: "none"}[match["codec"]]
    return StoredWal(name, folder, match["wal"], match["sha256"], codec, bool(match["age"]))


def stored_copies(names: list[str], wal_name: str) -> list[StoredWal]:
    """The stored copies of `wal_name` among the file names of its folder."""
    folder = folder_of(wal_name)
    found = [parse_stored(name, folder) for name in names if name.startswith(wal_name + "-")]
    return [s for s in found if s is not None and s.wal == wal_name]


def local_copies(settings: Settings, target: str, wal_name: str) -> list[StoredWal]:
    folder = wal_root(settings, target) / folder_of(wal_name)
    try:
        names = [n for n in os.listdir(folder) if not is_staging(n)]
    except FileNotFoundError:
        return []
    return stored_copies(names, wal_name)


def same_or_conflict(copies: list[StoredWal], wal_name: str, sha256: str, where: str) -> StoredWal | None:
    """Given the copies of `wal_name` found in one place, return the one with the content `sha256`, None if
    there is none; raise WalConflictError if one holds other content."""
    other = [c for c in copies if c.sha256 != sha256]
    if other:
        raise WalConflictError(
            f"{wal_name}: {where} already holds this WAL file with other content (SHA-256 {other[0].sha256[:16]}…, "
            f"this one {sha256[:16]}…); not archived",
            hint="two clusters seem to archive into the same target: give each cluster its own target")
    return copies[0] if copies else None


@contextlib.contextmanager
def archive_lock(root: Path) -> Iterator[None]:
    """Hold the archive's lock (an flock, per open file: threads and processes alike wait): checking what
    a folder holds and publishing into it is one step, so two pushes of one WAL file with different
    contents cannot both publish."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- push --------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    """What one `wal-push` did: its own file (`stored`, or the `error` that failed it) and those it pushed ahead."""

    wal: str
    stored: StoredWal | None = None
    error: PgbeatError | None = None
    ahead: list[PushResult] = field(default_factory=list)


class DestinationStorages:
    """The destinations' storages of one push: one per destination, opened on first use and used by one
    thread at a time (an SFTP session must not be shared between threads, and making a boto3 client
    per thread costs more CPU than a segment's upload), all closed at the end. The local work of the
    files pushed ahead (hashing, compressing, fsync) runs in parallel; their uploads take turns."""

    def __init__(self) -> None:
        self.storages: dict[str, object] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, spec) -> Iterator:
        with self.lock:
            lock = self.locks.setdefault(spec.name, threading.Lock())
        with lock:
            if spec.name not in self.storages:
                from pgbeat.storage.destinations import open_storage  # a destination's SDK only when it is used

                self.storages[spec.name] = open_storage(spec)
            yield self.storages[spec.name]

    def close(self) -> None:
        for storage in self.storages.values():
            with contextlib.suppress(Exception):  # a close that fails must not hide the push's outcome
                storage.close()


def push(settings: Settings, target: Target, source: Path, ahead: bool = True) -> PushResult:
    """Archive the WAL file `source` (PostgreSQL's %p) of `target`: locally, then at every destination.
    With `ahead`, also archive up to `target.wal.push_ahead` other files PostgreSQL has marked ready in
    `<pg_wal>/archive_status`, in parallel. Return what was done; `result.error` is set when `source`
    itself is not archived everywhere (the other files' failures are only logged: PostgreSQL asks again)."""
    check_wal_name(source.name)
    if not source.is_file():
        raise WalError(f"{source}: no such WAL file", hint="archive_command passes %p, the path PostgreSQL gives")
    others = []
    if ahead and target.wal.push_ahead:
        ready = ready_files(source)
        sweep_acks(source.parent, {path.name for path in ready})
        waiting = not_stored(settings, target.name, ready)
        others = [path for path in waiting if path.is_file()][:target.wal.push_ahead]
    storages = DestinationStorages()
    try:
        if not others:
            return push_one(settings, target, source, storages)
        with ThreadPoolExecutor(1 + len(others), thread_name_prefix="wal-push") as pool:
            mine = pool.submit(push_one, settings, target, source, storages)
            theirs = [pool.submit(push_one, settings, target, other, storages) for other in others]
            result = mine.result()
            result.ahead = [f.result() for f in theirs]
    finally:
        storages.close()
    for other, done in zip(others, result.ahead, strict=True):
        if done.error is not None:
            log.warning("pushing %s ahead failed (PostgreSQL will ask again): %s", done.wal, done.error.message)
        elif done.stored is not None:
            try:  # its own call then answers at once (pgbeat.wal.acked); without it, by the full path
                write_ack(other, target.name, done.stored.sha256)
            except OSError as exc:
                log.warning("cannot acknowledge %s pushed ahead (its call takes the full path): %s", done.wal, exc)
    return result


def ready_files(source: Path) -> list[Path]:
    """The WAL files other than `source` that PostgreSQL has marked ready to archive, in the order it
    archives them (timeline history files first, then by name: the next calls are for these)."""
    status = source.parent / "archive_status"
    try:
        names = sorted(n.removesuffix(".ready") for n in os.listdir(status) if n.endswith(".ready"))
    except OSError:
        return []
    # PostgreSQL archives timeline history files first; segments in name order.
    names.sort(key=lambda n: (not n.endswith(".history"), n))
    return [source.parent / n for n in names if n != source.name and WAL_NAME.fullmatch(n)]


def not_stored(settings: Settings, target: str, files: list[Path]) -> list[Path]:
    """The files of `files` of which the local archive holds no copy at all, by name alone: a file pushed
    ahead already is not hashed again by every later call (its own call compares its content)."""
    stored: dict[str, set[str]] = {}  # folder -> the WAL names it holds
    left = []
    for path in files:
        folder = folder_of(path.name)
        if folder not in stored:
            try:
                names = os.listdir(wal_root(settings, target) / folder)
            except FileNotFoundError:
                names = []
            stored[folder] = {match["wal"] for name in names if (match := STORED_NAME.fullmatch(name))}
        if path.name not in stored[folder]:
            left.append(path)
    return left


def push_one(settings: Settings, target: Target, source: Path, storages: DestinationStorages) -> PushResult:
    """Archive one WAL file everywhere; return the result (an error is returned, not raised, so that a
    push-ahead's failure never hides the outcome of the file PostgreSQL asked for)."""
    result = PushResult(source.name)
    try:
        result.stored = store_locally(settings, target, source)
        faults.fault_point(PUSH_LOCAL)
        copy_to_destinations(settings, target, result.stored, storages)
    except PgbeatError as exc:
        result.error = exc
    except OSError as exc:
        result.error = WalError(f"{source.name}: cannot archive: {exc.strerror or exc} ({exc.filename or source})")
    return result


def store_locally(settings: Settings, target: Target, source: Path) -> StoredWal:
    """Put `source` in the local archive unless it is there with the same content; return its stored
    copy. Raise WalConflictError if it is there with other content."""
    wal_name = source.name
    root = wal_root(settings, target.name)
    if not root.is_dir():  # the first push of the target: its folders' entries made durable too
        private_dir(root)
        fsync_dir(root.parent)
        fsync_dir(root.parent.parent)
    sha256 = sha256_file(source)
    found = same_or_conflict(local_copies(settings, target.name, wal_name), wal_name, sha256, "the local archive")
    if found is not None:
        return found  # the fast path: pushed before (ahead, or by a call whose answer was lost)
    folder = root / folder_of(wal_name)
    if not folder.is_dir():
        private_dir(folder)
        fsync_dir(root)
    recipients = target.encryption.recipients if target.encryption else None
    name = stored_name(wal_name, sha256, target.compression.codec, bool(recipients))
    staged = folder / staging_name(name)
    try:
        written = write_stored(source, staged, target.compression.codec, target.compression.level, recipients)
        if written != sha256:
            raise WalError(f"{wal_name} changed while it was being archived",
                           hint="PostgreSQL never changes a WAL file it asks to archive: is another program "
                                "writing into pg_wal?")
        faults.fault_point(PUSH_STAGED)
        with archive_lock(root):
            found = same_or_conflict(local_copies(settings, target.name, wal_name), wal_name, sha256,
                                     "the local archive")
            if found is None:
                publish(staged, folder / name)  # never replaces a name; fsyncs the folder
    finally:
        remove_path(staged)
    sweep_staging(folder, wal_name)
    return found or parse_stored(name, folder.name)  # found: another push published it meanwhile


STALE_STAGING_S = 3600  # no live push takes this long to write one WAL file


def sweep_staging(folder: Path, wal_name: str) -> None:
    """Remove what killed pushes of `wal_name` left in `folder` (hidden staging files), once they are
    old enough that no live push can still be writing them (each writer has a name of its own)."""
    now = time.time()
    for name in os.listdir(folder):
        if name.startswith(f".{wal_name}-") and is_staging(name):
            with contextlib.suppress(FileNotFoundError):
                if now - (folder / name).stat().st_mtime > STALE_STAGING_S:
                    remove_path(folder / name)
                    log.info("removed %s, left by a killed push", name)


def write_stored(source: Path, dest: Path, codec: str, level: int, recipients: list[str] | None) -> str:
    """Write `source` compressed with `codec` (the compress step's own codec functions, one gzip member or
    zstd frame per block) and, for `recipients`, encrypted with age, into a new 0600 file `dest`, fsync'ed.
    Return the SHA-256 of the raw bytes read."""
    from pgbeat.steps.compress import BLOCK, compress_block

    raw = hashlib.sha256()
    plain = dest if not recipients else dest.with_name(dest.name + ".plain")
    try:
        with open(source, "rb") as src, open_private(plain) as out:
            while block := src.read(BLOCK):
                raw.update(block)
                out.write(block if codec == "none" else compress_block(block, codec, level))
            out.flush()
            os.fsync(out.fileno())
        if recipients:
            from pgbeat.crypt import encrypt_file

            encrypt_file(plain, dest, recipients)
            fsync_file(dest)
    finally:
        if plain != dest:
            remove_path(plain)
    return raw.hexdigest()


def copy_to_destinations(settings: Settings, target: Target, stored: StoredWal, storages: DestinationStorages) -> None:
    """Copy the local `stored` file to each destination of `target` that has not got it, checked where it
    landed (size and SHA-256 of the stored bytes). Raise WalConflictError
    if a destination holds the WAL file with other content, StorageError if one cannot take it (naming
    it; the local copy stays, and the next push goes on from there)."""
    root = wal_root(settings, target.name)
    local = root / stored.relpath
    for spec in target.destinations:
        marker = root / COPIED_DIR / spec.name / stored.name
        if marker.exists():
            continue
        key = stored.key(target.name)
        size, sha256 = local.stat().st_size, sha256_file(local)
        with storages.use(spec) as storage:
            there = same_or_conflict(remote_copies(storage, target.name, stored.wal), stored.wal, stored.sha256,
                                     spec.name)
            if there is not None and there.name != stored.name:
                # The same WAL content stored another way (codec or encryption changed since): it is archived.
                log.info("%s: %s holds %s as %s", stored.wal, spec.name, stored.wal, there.name)
            elif there is None:
                try:
                    storage.put(local, key, sha256=sha256)
                except StorageError:
                    # Another push of the same file (a second pgbeat process) may have stored it meanwhile.
                    if stored.name not in [c.name for c in remote_copies(storage, target.name, stored.wal)]:
                        raise
                storage.verify(key, size, sha256)
            else:
                storage.verify(key, size, sha256)  # an earlier push stored it; its marker was not written
        private_dir(marker.parent)
        with open_private(marker):
            pass  # not fsync'ed: a marker lost in a crash only costs one more check at the destination


# --- fetch -------------------------------------------------------------------------------------------


@dataclass
class FetchResult:
    wal: str
    source: str  # where it came from: "local" or a destination's name
    size: int


def fetch(settings: Settings, target: Target, wal_name: str, dest: Path) -> FetchResult:
    """Fetch `wal_name` (PostgreSQL's %f) into `dest` (%p): from the local archive, else from each
    destination in order; decrypt (the target's `encryption.identity_file`), decompress, check its
    SHA-256 against its name, write `dest` atomically. Raise WalMissing (exit 1) when no place has it,
    WalFetchError (exit 128) when it could not be read from a place that has or may have it and no other
    place had a good copy."""
    check_wal_name(wal_name)
    problems: list[str] = []
    for where, copies, open_copy in places(settings, target, wal_name, dest.parent):
        try:
            found = copies()
        except (PgbeatError, OSError) as exc:
            problems.append(f"{where}: {message_of(exc)}")
            continue
        for stored in found:
            try:
                with open_copy(stored) as path:
                    size = decode_into(path, stored, dest, target)
            except (PgbeatError, OSError) as exc:
                problems.append(f"{where}: {stored.name}: {message_of(exc)}")
                log.warning("%s: cannot use %s at %s: %s", wal_name, stored.name, where, message_of(exc))
                continue
            if problems:
                log.warning("%s: fetched from %s after: %s", wal_name, where, "; ".join(problems))
            if where != "local":
                prefetch(settings, target, wal_name, where)
            return FetchResult(wal_name, where, size)
    if problems:
        raise WalFetchError(f"{wal_name} could not be fetched: " + "; ".join(problems),
                            hint="PostgreSQL stops here instead of ending recovery early; fix the archive or the "
                                 "destination and start it again")
    raise WalMissing(f"{wal_name} is not in the archive of {target.name}")


def message_of(exc: BaseException) -> str:
    if isinstance(exc, PgbeatError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc.strerror or exc)
    return str(exc)


Place = tuple[str, Callable[[], list[StoredWal]], Callable[[StoredWal], contextlib.AbstractContextManager[Path]]]


def places(settings: Settings, target: Target, wal_name: str, scratch: Path) -> Iterator[Place]:
    """The places to look for `wal_name`, in order, as (name, list its copies, open a copy as a local
    file): the local archive, then each destination (opened only when the local archive had no good
    copy; a download goes to a hidden name in `scratch` and is removed after)."""
    root = wal_root(settings, target.name)

    @contextlib.contextmanager
    def local_file(stored: StoredWal) -> Iterator[Path]:
        yield root / stored.relpath

    yield "local", lambda: local_copies(settings, target.name, wal_name), local_file
    from pgbeat.storage.destinations import open_storage

    for spec in target.destinations:
        with open_storage(spec) as storage:
            def listed(storage=storage) -> list[StoredWal]:
                return remote_copies(storage, target.name, wal_name)

            @contextlib.contextmanager
            def downloaded(stored: StoredWal, storage=storage) -> Iterator[Path]:
                path = scratch / staging_name(stored.name, "download")
                try:
                    storage.get(stored.key(target.name), path)
                    yield path
                finally:
                    remove_path(path)

            yield spec.name, listed, downloaded


def remote_copies(storage, target: str, wal_name: str) -> list[StoredWal]:
    """The copies of `wal_name` a destination holds (one listing of its folder)."""
    folder_key = f"{WAL_DIR}/{target}/{folder_of(wal_name)}"
    return stored_copies([info.key.rsplit("/", 1)[-1] for info in storage.list(folder_key)], wal_name)


SEGMENTS_PER_LOG = 256  # with PostgreSQL's default 16 MiB segments


def following_segments(wal_name: str, count: int) -> list[str]:
    """The names of the `count` segments after `wal_name` on its timeline (none for other WAL files).
    With segments other than 16 MiB a guess may name no segment: it is then not found, which costs nothing."""
    if len(wal_name) != 24 or not WAL_NAME.fullmatch(wal_name):
        return []
    timeline, number = wal_name[:8], int(wal_name[8:16], 16) * SEGMENTS_PER_LOG + int(wal_name[16:], 16)
    return [f"{timeline}{n // SEGMENTS_PER_LOG:08X}{n % SEGMENTS_PER_LOG:08X}" for n in range(number + 1,
                                                                                         number + 1 + count)]


def prefetch(settings: Settings, target: Target, wal_name: str, destination: str) -> list[str]:
    """After `wal_name` came from `destination`, copy the stored files of up to `target.wal.prefetch`
    following segments from there into the local archive (as they are stored: fetching one checks it),
    so that PostgreSQL's next calls find them without starting a download each. Only where this user may
    write the local archive; a failure only logs (the call for that segment tries again). Return the
    names copied."""
    names = following_segments(wal_name, target.wal.prefetch)
    root = wal_root(settings, target.name)
    try:
        private_dir(root)
    except OSError:
        return []  # a restore host without a local archive of its own: every call downloads its segment
    if not os.access(root, os.W_OK):
        return []
    spec = target.destination(destination)
    copied = []
    storages = DestinationStorages()
    try:
        with storages.use(spec) as storage:
            listings: dict[str, list[StoredWal]] = {}
            for name in names:
                if local_copies(settings, target.name, name):
                    continue
                folder = folder_of(name)
                if folder not in listings:
                    listings[folder] = [parse_stored(i.key.rsplit("/", 1)[-1], folder)
                                        for i in storage.list(f"{WAL_DIR}/{target.name}/{folder}")]
                there = [s for s in listings[folder] if s is not None and s.wal == name]
                if len(there) != 1:
                    break  # the end of the archive (or a conflict, for that segment's own call to report)
                local_folder = private_dir(root / folder)
                staged = local_folder / staging_name(there[0].name)
                try:
                    storage.get(there[0].key(target.name), staged)
                    fsync_file(staged)
                    with archive_lock(root):
                        if not local_copies(settings, target.name, name):
                            publish(staged, local_folder / there[0].name)
                            copied.append(name)
                finally:
                    remove_path(staged)
    except (PgbeatError, OSError) as exc:
        log.warning("prefetching after %s from %s stopped: %s", wal_name, destination, message_of(exc))
    finally:
        storages.close()
    return copied


def decode_into(path: Path, stored: StoredWal, dest: Path, target: Target) -> int:
    """Decrypt and decompress the stored file `path` into `dest` (through a hidden name beside it, then a
    rename), checking the SHA-256 its name gives; return the size written. Raise WalFetchError if it does
    not decompress or match, DecryptionError if it cannot be decrypted."""
    from pgbeat.steps.compress import decompressing_reader

    staged = dest.with_name(staging_name(dest.name))
    plain = dest.with_name(staging_name(dest.name, "sealed"))
    try:
        source = path
        if stored.encrypted:
            from pgbeat.crypt import decrypt_file, load_identities

            identity = target.encryption.identity_file if target.encryption else None
            decrypt_file(path, plain, load_identities(identity))
            source = plain
        digest, size = hashlib.sha256(), 0
        try:
            with decompressing_reader(source, stored.codec) as reader, open_private(staged) as out:
                while chunk := reader.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            if exc.errno is not None:  # the disk, not the data (gzip's own errors carry no errno)
                raise
            raise WalFetchError(f"{stored.name} does not decompress: {exc}") from None
        except Exception as exc:  # EOFError, zstandard.ZstdError, isal's errors: damaged data
            raise WalFetchError(f"{stored.name} does not decompress: {type(exc).__name__}: {exc}") from None
        if digest.hexdigest() != stored.sha256:
            raise WalFetchError(f"{stored.name} is damaged: its content's SHA-256 is {digest.hexdigest()[:16]}…, "
                                f"its name says {stored.sha256[:16]}…")
        os.replace(staged, dest)
    finally:
        remove_path(staged)
        remove_path(plain)
    return size


def stored_anywhere(settings: Settings, target: Target, wal_name: str, destinations: bool = True) -> str | None:
    """Where `wal_name` is archived (the local archive, else the first destination that has it), or None."""
    if local_copies(settings, target.name, wal_name):
        return "local"
    if not destinations:
        return None
    from pgbeat.storage.destinations import open_storage

    for spec in target.destinations:
        try:
            with open_storage(spec) as storage:
                if remote_copies(storage, target.name, wal_name):
                    return spec.name
        except StorageError as exc:
            log.warning("%s: cannot look for %s: %s", spec.name, wal_name, exc.message)
    return None
