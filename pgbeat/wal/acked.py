"""Acknowledgements of WAL files pushed ahead: the fast path of `pgbeat wal-push`, standard library only.

When a `wal-push` archives other `.ready` files ahead of PostgreSQL's calls for them (`wal.push_ahead`),
it leaves for each one it stored durably (fsync'ed locally, checked at every destination) an
acknowledgement in `<pg_wal>/pgbeat_pushed/<name>`: the target's name and the file's SHA-256. PostgreSQL's
call for that file then finds it, hashes the file it passes (%p) and, when both match, removes the
acknowledgement and exits 0 without loading the settings. Anything else (no acknowledgement, another
target, other content, any other option) takes the full path, which checks the archive itself; so a file
is never reported archived on an acknowledgement that does not match its bytes. The folder lives in
pg_wal beside `archive_status`, the server user's like the segments (WAL-G keeps its own there too).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

ACK_DIR = "pgbeat_pushed"
CHUNK = 1 << 20


def ack_path(source: Path) -> Path:
    """Where the acknowledgement of the WAL file `source` (in pg_wal) is kept."""
    return source.parent / ACK_DIR / source.name


def write_ack(source: Path, target: str, sha256: str) -> None:
    """Acknowledge that `source` of `target`, whose raw bytes hash to `sha256`, is archived everywhere; the
    acknowledgement appears whole (written aside, then renamed) or not at all."""
    folder = source.parent / ACK_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    aside = folder / f".{source.name}.{os.getpid()}"
    with open(aside, "w") as out:
        out.write(f"{target}\n{sha256}\n")
    os.replace(aside, folder / source.name)


def sweep_acks(pg_wal: Path, ready: set[str]) -> None:
    """Remove the acknowledgements of files PostgreSQL no longer has marked ready (archived another way, or
    gone): an acknowledgement is only ever for a call still to come."""
    folder = pg_wal / ACK_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name not in ready:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)


def parse_push_args(args: list[str]) -> tuple[str, str] | None:
    """(WAL file, target) of exactly `PATH --target NAME` (in either order, or `--target=NAME`), else None."""
    rest, target = [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--target" and i + 1 < len(args) and target is None:
            target, i = args[i + 1], i + 2
            continue
        if arg.startswith("--target=") and target is None:
            target = arg.removeprefix("--target=")
        elif arg.startswith("-"):
            return None  # any other option: the full path knows it
        else:
            rest.append(arg)
        i += 1
    return (rest[0], target) if target and len(rest) == 1 else None


def acknowledged(args: list[str]) -> bool:
    """True when the `wal-push` arguments `args` name a file pushed ahead with its bytes unchanged: its
    acknowledgement is then consumed. Never raises: any doubt is the full path's to settle."""
    parsed = parse_push_args(args)
    if parsed is None:
        return False
    source = Path(parsed[0])
    ack = ack_path(source)
    try:
        target, sha256 = ack.read_text().split("\n")[:2]
        if target != parsed[1]:
            return False
        digest = hashlib.sha256()
        with open(source, "rb") as raw:
            while chunk := raw.read(CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            return False
        os.unlink(ack)
    except (OSError, ValueError):
        return False
    return True
