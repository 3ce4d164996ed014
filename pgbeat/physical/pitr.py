"""Point-in-time recovery: a base backup unpacked into a new data directory, recovered through the WAL
archive to the moment asked for.

`restore_pitr` picks the base backup that can reach the target (the newest one consistent before it),
checks it against its manifest, unpacks it (decrypting first if it is encrypted; an incremental one with
every backup of its chain, combined by pg_combinebackup: pgbeat.physical.incremental), writes the recovery
settings (`restore_command` running `pgbeat wal-fetch`, `recovery_target_*`, `recovery.signal`, or
`standby.signal` and `primary_conninfo` for a standby) and, with `start`, starts the server and waits
until recovery reached the target and the server was promoted, reporting the last transaction replayed.

The data directory is never one that holds anything: an existing, non-empty folder is refused, so a
restore can never overwrite a live cluster. A target before the oldest base backup's end is refused
with the restorable window in the message.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgbeat.catalog.manifest import Entry, list_backups
from pgbeat.errors import PgbeatError, UsageError
from pgbeat.fsutil import private_dir
from pgbeat.physical.basebackup import unpack_base, verifybackup
from pgbeat.physical.incremental import chain_of, combine
from pgbeat.postgres.clients import major_of, server_programs
from pgbeat.settings import Settings, Target

log = logging.getLogger(__name__)

GOALS = ("latest", "immediate", "time", "lsn", "xid", "name")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
REACHED_RE = re.compile(r"last completed transaction was at log time (?P<time>.+)$", re.M)
STOPPED_RE = re.compile(r"recovery stopping (?:before|after) .+$", re.M)


class RecoveryError(PgbeatError):
    """Recovery did not reach its target (WAL missing, the server stopped, or the wait ran out)."""


def lsn_value(lsn: str) -> int:
    """Given an LSN as PostgreSQL writes it (`16/B374D848`), return it as a number."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class RecoveryGoal:
    """Where recovery stops: the end of the archive (`latest`), the base backup's consistent point
    (`immediate`), or a time, an LSN, a transaction id or a named restore point; and on which timeline."""

    kind: str = "latest"
    value: str | datetime | None = None
    timeline: str = "latest"

    def __post_init__(self) -> None:
        if self.kind not in GOALS:
            raise UsageError(f"unknown recovery target {self.kind!r}; one of {', '.join(GOALS)}")
        if self.kind == "lsn" and not LSN_RE.match(str(self.value)):
            raise UsageError(f"--to-lsn {self.value!r} is not an LSN such as 0/3000060")
        if self.kind == "xid" and not str(self.value).isdigit():
            raise UsageError(f"--to-xid {self.value!r} is not a transaction id (a number)")
        if self.kind == "time" and (not isinstance(self.value, datetime) or self.value.tzinfo is None):
            raise UsageError("--to needs a time with its zone (or a configured time zone)")
        if not (self.timeline in ("latest", "current") or self.timeline.isdigit()):
            raise UsageError(f"--timeline {self.timeline!r}: latest, current or a timeline number")

    def describe(self) -> str:
        if self.kind in ("latest", "immediate"):
            return {"latest": "the end of the archive", "immediate": "the base backup's end"}[self.kind]
        value = self.value.isoformat(sep=" ") if isinstance(self.value, datetime) else self.value
        return f"{self.kind} {value}"


@dataclass
class PitrResult:
    backup: Path
    data_dir: Path
    goal: str
    started: bool = False
    promoted: bool = False
    reached: str | None = None  # the last transaction replayed, from the server's log
    stop_line: str | None = None
    steps: dict[str, float] = field(default_factory=dict)


def base_backups(settings: Settings, target: str) -> list[Entry]:
    """The target's verified base backups on the shelf, oldest first."""
    return [e for e in list_backups(settings.backup_root, target, kind="physical")
            if e.verified and e.manifest.physical is not None]


def window_text(entries: list[Entry]) -> str:
    first = entries[0].manifest.physical
    return (f"the earliest restorable point is {first.stop_time.isoformat(sep=' ')} (the end of the oldest base "
            f"backup, {entries[0].path.name}, LSN {first.end_lsn})")


def remote_members(settings: Settings, target: str) -> list:
    """The base backups of `target` at its destinations (their copies checked where they landed), for the
    members of a chain that the shelf lacks; a destination that cannot be read is passed over, said in the log."""
    from pgbeat.settings import PHYSICAL_TIERS
    from pgbeat.storage.destinations import open_storage, remote_entries

    if target not in settings.targets:
        return []
    found = []
    for spec in settings.targets[target].destinations:
        try:
            with open_storage(spec) as storage:
                for tier in PHYSICAL_TIERS:
                    found += [e for e in remote_entries(settings, storage, spec.name, target, tier)
                              if e.exists and e.verified]
        except PgbeatError as exc:
            log.warning("the base backups of %s at %s cannot be listed: %s", target, spec.name, exc.message)
    return found


def resolve_chain(settings: Settings, target: str, entries: list[Entry], entry: Entry,
                  pool: list | None = None) -> tuple[list, list | None]:
    """Return the chain of `entry` (root first) from the verified base backups on the shelf (`entries`), or,
    if a member is missing there, from those with the copies at the destinations of what the shelf lacks
    (`pool`, listed here once if not given); and that pool. Raise PgbeatError if the chain is broken even so."""
    from pgbeat.physical.incremental import plain_name

    try:
        return chain_of(entries, entry), pool
    except PgbeatError:
        if pool is None:
            have = {plain_name(e) for e in entries}
            pool = [*entries, *(e for e in remote_members(settings, target) if plain_name(e) not in have)]
        return chain_of(pool, entry), pool


def fetch_members(settings: Settings, target: Target, chain: list, scratch: Path, identities: list | None,
                  on_step: Callable[[str, str], None]) -> list[Entry]:
    """Given a chain whose members may be copies at destinations, download and verify those into `scratch`;
    return the chain as local Entries."""
    from pgbeat.actions import fetch_into
    from pgbeat.storage.destinations import backup_url

    local = []
    for i, member in enumerate(chain):
        if isinstance(member, Entry):
            local.append(member)
            continue
        url = backup_url(target.destination(member.destination), member.path)
        on_step("fetch", f"{os.path.basename(member.path)} from {member.destination} (not on the shelf)")
        local.append(fetch_into(settings, url, scratch / f"fetched{i}", identities))
    return local


def choose_base(settings: Settings, target: str, goal: RecoveryGoal) -> Entry:
    """Return the base backup recovery to `goal` starts from: the newest one consistent before it.
    Raise PgbeatError if there is none, naming the restorable window."""
    entries = base_backups(settings, target)
    if not entries:
        raise PgbeatError(f"No verified base backup of {target} in {settings.backup_root}",
                          hint=f"take one: pgbeat backup base --target {target} (tiers.base.enabled)")
    if goal.kind == "time":
        usable = [e for e in entries if e.manifest.physical.stop_time and e.manifest.physical.stop_time <= goal.value]
    elif goal.kind == "lsn":
        usable = [e for e in entries if lsn_value(e.manifest.physical.end_lsn) <= lsn_value(str(goal.value))]
    else:
        usable = entries
    if not usable:
        raise UsageError(f"{goal.describe()} is before the restorable window of {target}: {window_text(entries)}",
                         hint="choose a later point, or a logical backup of that day")
    pool = broken = None
    for entry in reversed(usable):  # an incremental whose chain is broken cannot be restored: an older one can
        try:
            _, pool = resolve_chain(settings, target, entries, entry, pool)
        except PgbeatError as exc:
            log.warning("%s", exc.message)
            broken = broken or exc
            continue
        return entry
    raise broken


def server_command(pgbeat: str, settings: Settings, target: str) -> str:
    """The `restore_command` the recovering server runs: `pgbeat wal-fetch` with this configuration."""
    env = []
    if settings.config_file is not None:
        env.append(f"PGBEAT_CONFIG={shlex.quote(str(settings.config_file))}")
    env.append(f"BACKUP_ROOT={shlex.quote(str(settings.backup_root))}")
    return " ".join([*env, shlex.quote(pgbeat), "wal-fetch", "%f", "%p", "--target", shlex.quote(target)])


def recovery_settings(goal: RecoveryGoal, command: str, *, standby: bool = False,
                      primary_conninfo: str | None = None, port: int | None = None,
                      archive: bool = False) -> dict[str, str]:
    """The settings written to the restored cluster's postgresql.auto.conf."""
    values = {"restore_command": command, "recovery_target_timeline": goal.timeline}
    if not standby:
        if goal.kind == "immediate":
            values["recovery_target"] = "immediate"
        elif goal.kind == "time":
            values["recovery_target_time"] = goal.value.isoformat(sep=" ")
        elif goal.kind in ("lsn", "xid", "name"):
            values[f"recovery_target_{goal.kind}"] = str(goal.value)
        values["recovery_target_action"] = "promote"
    if primary_conninfo:
        values["primary_conninfo"] = primary_conninfo
    if port is not None:
        values["port"] = str(port)
    if not archive:
        # A copy must not push its new timeline's WAL into the archive of the cluster it was made from.
        values["archive_mode"] = "off"
    return values


def quote_setting(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def write_recovery(data: Path, values: dict[str, str], standby: bool) -> None:
    """Append `values` to data/postgresql.auto.conf (later lines win) and create the signal file."""
    lines = ["", "# written by pgbeat restore --pitr", *(f"{k} = {quote_setting(v)}" for k, v in values.items())]
    with open(data / "postgresql.auto.conf", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    signal = data / ("standby.signal" if standby else "recovery.signal")
    signal.touch(mode=0o600)
    for stale in ("postmaster.pid", "postmaster.opts"):
        (data / stale).unlink(missing_ok=True)


def empty_data_dir(path: Path) -> Path:
    """Return `path` as a new, private, empty folder; raise UsageError if it exists and holds anything."""
    path = path.expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--data-dir {path} is not an empty folder",
                         hint="a point-in-time restore writes a new data directory; it never overwrites one")
    return private_dir(path)


def server_user() -> list[str]:
    """Run the server as `postgres` when pgbeat runs as root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def hand_to_server_user(data: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam("postgres")
    for root, dirs, files in os.walk(data):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.chown(data, pw.pw_uid, pw.pw_gid)


def check_major(settings: Settings, entry: Entry) -> None:
    """Raise PgbeatError if no server programs of the base backup's major are installed (a cluster starts
    only under the binaries of its own major)."""
    wanted = entry.manifest.server_version
    if wanted:
        server_programs(settings, major_of(wanted), f"{entry.path.name} (a base backup of PostgreSQL {wanted})")


def server_program(settings: Settings, data: Path, name: str) -> str:
    """The path of server program `name` (pg_ctl, pg_controldata) of the major of the cluster in `data`."""
    major = int((data / "PG_VERSION").read_text().strip())
    return server_programs(settings, major, f"the cluster in {data}").program(name)


def cluster_state(settings: Settings, data: Path) -> str:
    out = subprocess.run([*server_user(), server_program(settings, data, "pg_controldata"), str(data)],
                         capture_output=True, text=True, timeout=30)
    match = re.search(r"^Database cluster state:\s+(.+)$", out.stdout, re.M)
    return match.group(1).strip() if match else "unknown"


def start_and_wait(settings: Settings, data: Path, standby: bool, timeout: float) -> tuple[bool, str]:
    """Start the restored cluster and wait until it is promoted (or, a standby, until it runs); return
    (promoted, the server log). Raise RecoveryError if it stops or the wait runs out first."""
    log_file = data / "pgbeat-recovery.log"
    pg_ctl = server_program(settings, data, "pg_ctl")
    started = subprocess.run([*server_user(), pg_ctl, "-D", str(data), "-l", str(log_file), "-W", "start"],
                             capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        raise RecoveryError("the restored server did not start", details=started.stderr.strip().splitlines()[-4:])
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.5)
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        state = cluster_state(settings, data)
        running = subprocess.run([*server_user(), pg_ctl, "-D", str(data), "status"],
                                 capture_output=True).returncode == 0
        # pg_control says "in production" from the start (the backup copied it from a running primary):
        # promotion is when the server has removed recovery.signal and runs in production.
        if state == "in production" and running and not (data / "recovery.signal").exists() and not standby:
            return True, text
        if standby and running and ("started streaming WAL" in text or "consistent recovery state" in text):
            return False, text
        if not running:
            fatal = [line for line in text.splitlines() if "FATAL" in line or "PANIC" in line]
            raise RecoveryError("the restored server stopped before recovery reached its target",
                                details=(fatal or text.splitlines())[-6:],
                                hint="is the WAL up to the target in the archive? (pgbeat wal-fetch reads it)")
        if time.monotonic() > deadline:
            raise RecoveryError(f"recovery did not reach its target within {timeout:.0f}s; the server goes on "
                                f"recovering in {data}", details=text.splitlines()[-4:])


def restore_pitr(settings: Settings, target: Target, goal: RecoveryGoal, data_dir: Path, *,
                 start: bool = False, port: int | None = None, standby: bool = False,
                 primary_conninfo: str | None = None, archive: bool = False, identities: list | None = None,
                 pgbeat: str | None = None, timeout: float = 3600,
                 on_step: Callable[[str, str], None] = lambda step, text: None) -> PitrResult:
    """Restore `target`'s cluster as of `goal` into the new folder `data_dir`, as described above."""
    from pgbeat.pipeline.record import scratch_folder
    from pgbeat.restore.restore import plaintext_of
    from pgbeat.steps.verify import verify_backup

    data = empty_data_dir(data_dir)
    entry = choose_base(settings, target.name, goal)
    check_major(settings, entry)
    result = PitrResult(backup=entry.path, data_dir=data, goal=goal.describe())
    on_step("choose", f"{entry.path.name} (consistent at {entry.manifest.physical.stop_time}, "
                      f"LSN {entry.manifest.physical.end_lsn})")
    t0 = time.monotonic()
    chain, _ = resolve_chain(settings, target.name, base_backups(settings, target.name), entry)  # [entry]: full
    if len(chain) > 1:
        root = os.path.basename(chain[0].path)
        on_step("chain", f"{len(chain) - 1} incremental(s) on {root}, combined by pg_combinebackup")
    with scratch_folder(settings, "fetch") as scratch:
        chain = fetch_members(settings, target, chain, scratch, identities, on_step)
        plains = []
        for i, member in enumerate(chain):
            verify_backup(member.path, settings, identities, checksums_only=True)
            plains.append(plaintext_of(settings, member, identities, scratch / f"plain{i}"))
        result.steps["check"] = round(time.monotonic() - t0, 3)
        on_step("check", "done")
        t1 = time.monotonic()
        if len(chain) == 1:
            unpack_base(plains[0].path, plains[0].manifest.codec, data)
        else:
            unpacked = []
            for i, plain in enumerate(plains):
                unpacked.append(scratch / f"member{i}")
                unpack_base(plain.path, plain.manifest.codec, unpacked[-1])
            combine(settings, unpacked, major_of(entry.manifest.server_version or "0"), data)
    verifybackup(settings, data)  # what is in the data directory now is what the backup manifest lists
    result.steps["unpack"] = round(time.monotonic() - t1, 3)
    on_step("unpack", "done" if len(chain) == 1 else f"{len(chain)} base backups combined, pg_verifybackup passed")
    command = server_command(pgbeat or str(Path(sys.executable).with_name("pgbeat")), settings, target.name)
    write_recovery(data, recovery_settings(goal, command, standby=standby, primary_conninfo=primary_conninfo,
                                           port=port, archive=archive), standby)
    hand_to_server_user(data)
    on_step("recovery settings", "done")
    if start:
        t2 = time.monotonic()
        result.started = True
        result.promoted, text = start_and_wait(settings, data, standby, timeout)
        reached, stopped = REACHED_RE.findall(text), STOPPED_RE.findall(text)
        result.reached = reached[-1].strip() if reached else None
        result.stop_line = stopped[-1].strip() if stopped else None
        result.steps["recovery"] = round(time.monotonic() - t2, 3)
        on_step("recovery", "done")
    return result
