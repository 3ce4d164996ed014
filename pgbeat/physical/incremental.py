"""Incremental base backups (PostgreSQL 17 and later): chains of `pg_basebackup --incremental`.

With the base tier's `full_every_days` set, each base backup is full when the newest full one (the root
of the newest chain) is older than that many days, when there is none, when the newest chain is broken
(a member gone, unverified or not the one its child names), when the server's timeline or system
identifier or major differs from the newest backup's, or when the server cannot take one (older than 17, or
`summarize_wal` off: then with a warning of kind "incremental"). Otherwise it is incremental against the
newest verified base backup of the target: pg_basebackup reads that backup's `backup_manifest`, taken
out of its stored tar as it streams through the decompressing reader (nothing else of it is written).

Each manifest records where the backup stands (`ChainInfo`: kind, parent file and SHA-256, root, depth).
A restore takes the chain from its root to the backup asked for, unpacks each member into a scratch
folder and combines them with `pg_combinebackup` (of the backups' major) into the new data directory,
which `pg_verifybackup` then checks like an unpacked full backup. Rotation never removes a backup that a
kept incremental depends on (pgbeat.steps.rotate).

An encrypted target keeps encrypted files on the shelf, which a backup worker (holding recipients, not
identities) cannot read: its base backups are all full, and `config check` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tarfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import zstandard
from isal import isal_zlib

from pgbeat.catalog.manifest import ChainInfo, Dated, newest
from pgbeat.errors import PgbeatError, VerifyError
from pgbeat.fsutil import CHUNK, open_private
from pgbeat.postgres.clients import recorded_major
from pgbeat.settings import Settings, Target

log = logging.getLogger(__name__)

FIRST_MAJOR = 17  # pg_basebackup --incremental and pg_combinebackup came with PostgreSQL 17


@dataclass(frozen=True)
class ServerFacts:
    """What the server says about taking an incremental backup of it."""

    major: int
    summarize_wal: bool | None = None  # None: not asked (older than 17) or not readable
    timeline: int | None = None
    system_identifier: str | None = None


def server_facts(target: Target) -> ServerFacts:
    """Ask `target`'s server its major, `summarize_wal`, current timeline and system identifier (the last
    two only where the backup user may read pg_control; else None, and pg_basebackup checks them)."""
    from pgbeat.postgres.client import connect
    from pgbeat.postgres.clients import server_major

    with connect(target) as conn:
        major = server_major(conn)
        if major < FIRST_MAJOR:
            return ServerFacts(major=major)
        summarize = conn.execute("SHOW summarize_wal").fetchone()[0] == "on"
        timeline = system = None
        with contextlib.suppress(Exception):
            timeline = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0]
        with contextlib.suppress(Exception):
            system = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    return ServerFacts(major=major, summarize_wal=summarize, timeline=timeline, system_identifier=system)


def unsupported(facts: ServerFacts) -> str | None:
    """Why the server cannot take incremental base backups, or None."""
    if facts.major < FIRST_MAJOR:
        return (f"the server is PostgreSQL {facts.major}: incremental base backups need PostgreSQL "
                f"{FIRST_MAJOR} or later, so every base backup is full")
    if facts.summarize_wal is False:
        return ("summarize_wal is off on the server: incremental base backups need it on "
                "(ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf()), so this base backup is full")
    return None


def chain_of(entries, entry: Dated) -> list:
    """Given a base backup and the verified base backups it may depend on, return its chain, root first,
    ending with `entry`. Raise PgbeatError naming the member that is missing or not the one recorded."""
    by_name = {plain_name(e): e for e in entries}
    chain = [entry]
    seen = {plain_name(entry)}
    while chain[0].manifest.chain is not None and chain[0].manifest.chain.incremental:
        child = chain[0]
        info = child.manifest.chain
        parent = by_name.get(info.parent or "")
        name = os.path.basename(child.path)
        if parent is None:
            raise PgbeatError(f"{name} is an incremental base backup of {info.parent}, which is not there "
                              "(removed, or not verified)",
                              hint="bring it back from a destination (pgbeat list --destination NAME --wide, then "
                                   "pgbeat fetch URL --to BACKUP_ROOT/base), or restore an older full base backup")
        if parent.manifest.sha256 != info.parent_sha256 and plain_sha256(parent) != info.parent_sha256:
            raise PgbeatError(f"{name} is an incremental base backup of {info.parent}, but the backup of that "
                              "name is another one (its SHA-256 differs)", hint="restore an older full base backup")
        if plain_name(parent) in seen:
            raise PgbeatError(f"the chain of {name} loops at {info.parent}")
        seen.add(plain_name(parent))
        chain.insert(0, parent)
    return chain


def plain_name(entry: Dated) -> str:
    """The file name a chain names a backup by: its own on the shelf, the plaintext's for an encrypted copy."""
    encryption = entry.manifest.encryption
    return encryption.plaintext.file if encryption is not None else os.path.basename(entry.path)


def plain_sha256(entry: Dated) -> str | None:
    encryption = entry.manifest.encryption
    return encryption.plaintext.sha256 if encryption is not None else entry.manifest.sha256


@dataclass
class ChainChoice:
    """What the next base backup is: full (no `parent`) or incremental to `parent`, recorded as `chain`;
    `note` says why a tier asking for incrementals takes a full one it did not plan (a run warning)."""

    chain: ChainInfo
    parent: Dated | None = None
    reason: str = ""
    note: str | None = None


def choose_parent(entries: list, full_every_days: int, now: datetime, facts: ServerFacts | None,
                  encrypted: bool = False) -> ChainChoice:
    """Given a target's verified base backups (oldest first), the tier's `full_every_days`, the server's
    time `now` and what the server says (`facts`), decide whether the next base backup is full or
    incremental, and to which parent (see the module)."""
    full = ChainInfo(kind="full")
    if facts is not None and (why := unsupported(facts)):
        return ChainChoice(full, reason=why, note=why)
    if encrypted:
        why = ("the target is encrypted: its base backups on the shelf cannot be read by a backup worker, so "
               "every base backup is full")
        return ChainChoice(full, reason=why, note=why)
    latest = newest(entries, now)
    if latest is None:
        return ChainChoice(full, reason="no base backup to be incremental to yet")
    name = os.path.basename(latest.path)
    try:
        chain = chain_of(entries, latest)
    except PgbeatError as exc:
        return ChainChoice(full, reason=exc.message, note=f"the newest chain is broken ({exc.message}): this base "
                                                          "backup is full")
    root = chain[0]
    if now - root.manifest.taken_at >= timedelta(days=full_every_days):
        return ChainChoice(full, reason=f"the newest full base backup, {os.path.basename(root.path)}, is "
                                        f"{full_every_days} day(s) old or more")
    physical = latest.manifest.physical
    made_by = recorded_major(latest.manifest.server_version)
    if facts is not None and made_by and made_by != facts.major:
        why = (f"the server is PostgreSQL {facts.major}, {name} a backup of PostgreSQL {made_by} (an upgrade "
               "since): this base backup is full")
        return ChainChoice(full, reason=why, note=why)
    if facts is not None and facts.timeline is not None and physical is not None and \
            physical.timeline != facts.timeline:
        why = (f"the server is on timeline {facts.timeline}, {name} on timeline {physical.timeline} (a promotion "
               "since): this base backup is full")
        return ChainChoice(full, reason=why, note=why)
    depth = latest.manifest.chain.depth if latest.manifest.chain is not None else 0
    return ChainChoice(ChainInfo(kind="incremental", parent=plain_name(latest), parent_sha256=plain_sha256(latest),
                                 root=plain_name(root), depth=depth + 1),
                       parent=latest, reason=f"incremental to {name}")


def system_identifier_problem(manifest_file: Path, facts: ServerFacts | None) -> str | None:
    """Why the parent's backup_manifest is not of this server (another system identifier), or None."""
    import json

    if facts is None or facts.system_identifier is None:
        return None
    try:
        recorded = json.loads(manifest_file.read_text()).get("System-Identifier")
    except (OSError, ValueError):
        return "its backup_manifest cannot be read"
    if recorded is not None and str(recorded) != facts.system_identifier:
        return (f"its system identifier is {recorded}, the server's {facts.system_identifier} (another cluster, "
                "or one restored or upgraded since)")
    return None


def extract_backup_manifest(path: Path, codec: str, dest: Path) -> Path:
    """Take the `backup_manifest` out of the stored base backup `path` (a tar compressed with `codec`)
    into the file `dest` (0600), streaming the tar through the decompressing reader; return `dest`.
    Raise VerifyError if the backup does not decompress or has no backup_manifest."""
    from pgbeat.steps.compress import decompressing_reader

    try:
        with decompressing_reader(path, codec) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.removeprefix("./") == "backup_manifest":
                    source = tar.extractfile(member)
                    with open_private(dest) as out:
                        while chunk := source.read(CHUNK):
                            out.write(chunk)
                    return dest
    except (OSError, EOFError, ValueError, tarfile.TarError, isal_zlib.error, zstandard.ZstdError) as exc:
        raise VerifyError(f"{path.name} cannot be read for its backup_manifest: {exc}", step="dump") from None
    raise VerifyError(f"{path.name} holds no backup_manifest", step="dump")


def combine(settings: Settings, members: list[Path], major: int, data: Path) -> None:
    """Combine the unpacked backups `members` (root first) into the empty folder `data` with
    pg_combinebackup of PostgreSQL `major` (it reads backups of its own major only). Raise VerifyError with
    its complaints."""
    from pgbeat.postgres.clients import server_programs

    program = server_programs(settings, major, f"a chain of incremental base backups of PostgreSQL {major}") \
        .program("pg_combinebackup")
    argv = [program, "--manifest-checksums", "SHA256", "--output", str(data), *map(str, members)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=6 * 3600)
    if out.returncode != 0:
        lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        raise VerifyError(f"pg_combinebackup could not combine the chain (exit code {out.returncode})",
                          step="restore", details=lines[-8:], hint="restore an older full base backup")
