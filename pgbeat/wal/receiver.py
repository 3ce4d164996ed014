"""A WAL receiver: a target's WAL streamed by PostgreSQL's own `pg_receivewal` over the replication
protocol and archived segment by segment exactly as `wal-push` archives it, for hosts where pgbeat cannot
be installed for archive_command.

- One receiver per target across the fleet: a Redis lease `pgbeat:receiver:<target>` (TTL 30 s, renewed
  every 10 s by a compare-and-renew, pgbeat.coordination.leases.RedisLease) is held while pg_receivewal
  runs; when it is lost (taken, expired, Redis gone longer than its TTL) pg_receivewal is stopped at once,
  so that two receivers never stream one slot (PostgreSQL refuses a second stream of an active slot too,
  which covers the seconds before a lease lost to a Redis failover is noticed). Every other process with
  the target tries for the lease every few seconds: a host that dies is replaced within TTL + a retry
  (under a minute).
- The server keeps the WAL in a physical replication slot `pgbeat_<target>` (created if missing), so a
  receiver that is down, or taken over, loses nothing: the next one starts where the slot says.
- pg_receivewal writes into `BACKUP_ROOT/.work/receive-<target>` (`--synchronous`: each write flushed
  and reported at once) and names a segment finally only once it is complete; each completed segment and
  `.history` file is archived with `push_one` (local archive, then every destination) and removed from
  the receive folder only after that succeeded. A failed push leaves it there for the next round.
- pg_receivewal runs with `--no-loop`: when the connection drops it exits and is started again here with
  pgbeat's one backoff (1 s doubling to 30 s), so that each attempt is made under the lease and with the
  slot checked again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pgbeat.backoff import Backoff
from pgbeat.errors import PgbeatError
from pgbeat.fsutil import private_dir
from pgbeat.pipeline.record import WORK_DIR
from pgbeat.postgres.process import CancelEvent, Supervised, last_error_line
from pgbeat.settings import Settings, Target
from pgbeat.wal.archive import COPIED_DIR, LOCK_FILE, WAL_NAME, DestinationStorages, StoredWal, push_one, wal_root

log = logging.getLogger(__name__)

LEASE_TTL_S = 30  # RedisLease renews every TTL/3: 10 s
ACQUIRE_EVERY_S = 5.0  # how often a process without the lease tries for it: takeover within TTL + this
POLL_S = 0.5  # how often the receive folder is looked at for completed segments
RESTART_BACKOFF = Backoff(base=1.0, cap=30.0)  # pg_receivewal exited: the wait before its next start
STEADY_S = 60.0  # pg_receivewal ran this long: it was working, its exit starts the backoff anew
STATE_TTL_S = 30 * 86400
SLOT_PREFIX = "pgbeat_"
SLOT_MAX = 63  # NAMEDATALEN - 1
SLOT_TIMEOUT_S = 60


@dataclass
class ReceiverState:
    """What the holder of a target's receiver lease says of itself in Redis (for `pgbeat status`)."""

    node: str
    pid: int
    since: str  # ISO time the lease was taken
    last_segment: str | None = None  # the last WAL file archived
    last_at: str | None = None  # when


def slot_name(target: str) -> str:
    """The replication slot of `target`'s receiver: `pgbeat_<target>` with anything outside [a-z0-9_]
    made `_` (slot names allow nothing else), within PostgreSQL's 63 characters."""
    return (SLOT_PREFIX + re.sub(r"[^a-z0-9_]", "_", target.lower()))[:SLOT_MAX]


def receive_dir(settings: Settings, target: str) -> Path:
    """Where pg_receivewal writes `target`'s WAL before it is archived. No `.lock` file is ever made in it,
    so the sweep of work folders left by killed runs (pgbeat.pipeline.record) passes it over: segments a
    killed receiver left there are archived by the next one."""
    return settings.backup_root / WORK_DIR / f"receive-{target}"


def completed_files(folder: Path) -> list[Path]:
    """The WAL files pg_receivewal has finished in `folder`, in the order they are archived (timeline
    history first, then segments by name); not the `.partial` one it is writing."""
    try:
        names = [n for n in os.listdir(folder) if WAL_NAME.fullmatch(n) and not n.endswith(".partial")]
    except FileNotFoundError:
        return []
    names.sort(key=lambda n: (not n.endswith(".history"), n))
    return [folder / n for n in names]


def hand_to_archive_owner(settings: Settings, target: str, stored: StoredWal) -> None:
    """When the receiver runs as root, give what a push made to the owner of BACKUP_ROOT/wal (the README
    asks for the postgres user): a restore's wal-fetch runs as the server's user and must read it."""
    if os.geteuid() != 0:
        return
    try:
        owner = (settings.backup_root / "wal").stat()
    except FileNotFoundError:
        return
    if owner.st_uid == 0:
        return
    root = wal_root(settings, target)
    copied = root / COPIED_DIR
    paths = [root, root / LOCK_FILE, root / stored.folder, root / stored.relpath, copied]
    for place in copied.iterdir() if copied.is_dir() else []:
        paths += [place, place / stored.name]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def archive_completed(settings: Settings, target: Target, folder: Path) -> list[str]:
    """Archive every completed WAL file in `folder` with push_one, removing each only once it is stored
    everywhere; stop at the first that fails (it and the later ones wait for the next round, in order).
    Return the names archived."""
    done: list[str] = []
    storages = DestinationStorages()
    try:
        for path in completed_files(folder):
            result = push_one(settings, target, path, storages)
            if result.error is not None:
                if not path.exists():
                    continue  # archived and removed meanwhile by another receiver sharing this folder
                log.warning("%s: archiving %s failed, tried again in the next round: %s", target.name, path.name,
                            result.error.message)
                break
            assert result.stored is not None
            hand_to_archive_owner(settings, target.name, result.stored)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            done.append(path.name)
    finally:
        storages.close()
    return done


def receivewal_argv(pg_receivewal: str, target: Target, folder: Path) -> list[str]:
    return [pg_receivewal, "--dbname", target.conninfo(), "--no-password", "--directory", str(folder),
            "--slot", slot_name(target.name), "--synchronous", "--no-loop", "--verbose"]


def create_slot_argv(pg_receivewal: str, target: Target) -> list[str]:
    return [pg_receivewal, "--dbname", target.conninfo(), "--no-password", "--slot", slot_name(target.name),
            "--create-slot", "--if-not-exists"]


class TargetReceiver:
    """The receiver of one target in this process: tries for the lease, and while it holds it runs
    pg_receivewal and archives what it completes. `run()` returns once `stop` is set."""

    def __init__(self, settings: Settings, target: Target, client, stop: threading.Event) -> None:
        from pgbeat.coordination.leases import receiver_lease_key, receiver_state_key

        self.settings, self.target, self.client, self.stop = settings, target, client, stop
        self.folder = receive_dir(settings, target.name)
        self.lease_key, self.state_key = receiver_lease_key(target.name), receiver_state_key(target.name)
        self.state: ReceiverState | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.round()
            except Exception:  # a thread that died would leave the target without a receiver on this host
                log.exception("%s: the receiver failed unexpectedly; trying again in %.0f s", self.target.name,
                              ACQUIRE_EVERY_S)
                self.stop.wait(ACQUIRE_EVERY_S)

    def round(self) -> None:
        """Archive what is left in the receive folder, try for the lease, and while it is held receive."""
        from redis.exceptions import RedisError

        from pgbeat.coordination.leases import RedisLease, holder_gone

        self.archive()  # what a receiver killed on this host left: archiving it again is harmless
        cancel = CancelEvent()
        lease = RedisLease(self.client, self.lease_key, LEASE_TTL_S, self.settings.node, "receiver",
                           on_lost=lambda reason: cancel.cancel(f"lease lost: {reason}"))
        try:
            held = lease.acquire(take_over=holder_gone(self.settings.node))
        except RedisError as exc:
            log.warning("%s: cannot reach Redis for the receiver lease: %s", self.target.name, exc)
            held = False
        if not held:
            self.stop.wait(ACQUIRE_EVERY_S)
            return
        try:
            log.info("%s: holding the receiver lease on %s", self.target.name, self.settings.node)
            self.hold(cancel)
        finally:
            lease.release()
            self.archive()  # what pg_receivewal completed before it was stopped

    def hold(self, cancel: CancelEvent) -> None:
        """Run pg_receivewal until `cancel` (the lease lost) or `stop`, starting it again with a backoff
        whenever it exits."""
        self.state = ReceiverState(self.settings.node, os.getpid(), datetime.now(UTC).isoformat(timespec="seconds"))
        self.save_state()
        failures = 0
        while not cancel.is_set():
            if self.stop.is_set():
                cancel.cancel("the receiver is stopping")
                break
            started = time.monotonic()
            problem = self.receive(cancel)
            if cancel.is_set() or self.stop.is_set():
                break
            failures = 0 if time.monotonic() - started > STEADY_S else failures + 1
            delay = RESTART_BACKOFF.delay(failures) if failures else 0.0
            log.warning("%s: %s; starting it again in %.0f s", self.target.name, problem, delay)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not cancel.is_set() and not self.stop.wait(POLL_S):
                pass

    def receive(self, cancel: CancelEvent) -> str:
        """Make sure the slot exists and run pg_receivewal once, archiving what it completes as it goes;
        return why it ended."""
        from pgbeat.postgres.client import client_env
        from pgbeat.steps.dump import client_for_target

        private_dir(self.folder)
        try:
            # pg_receivewal of the server's major (pgbeat.postgres.clients), as for pg_basebackup.
            program = client_for_target(self.settings, self.target, "pg_receivewal").program("pg_receivewal")
        except PgbeatError as exc:
            return f"cannot start pg_receivewal: {exc.message}"
        env = client_env(self.target, self.folder)
        try:
            made = subprocess.run(create_slot_argv(program, self.target), env=env, capture_output=True, text=True,
                                  timeout=SLOT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"creating the replication slot {slot_name(self.target.name)} took over {SLOT_TIMEOUT_S} s"
        if made.returncode != 0:
            return (f"cannot create the replication slot {slot_name(self.target.name)}: "
                    f"{last_error_line(made.stderr.splitlines()) or f'exit code {made.returncode}'}")
        proc = Supervised(receivewal_argv(program, self.target, self.folder), env=env, stdout=subprocess.DEVNULL,
                          cancel=cancel, name="pg_receivewal")
        try:
            while proc.proc.poll() is None:
                self.archive()
                if self.stop.wait(POLL_S):
                    cancel.cancel("the receiver is stopping")
            rc = proc.wait()
        finally:
            proc.stop()
        self.archive()
        return f"pg_receivewal exited with code {rc}: {last_error_line(proc.stderr_text()) or 'no message'}"

    def archive(self) -> None:
        done = archive_completed(self.settings, self.target, self.folder)
        if done and self.state is not None:
            self.state.last_segment, self.state.last_at = done[-1], datetime.now(UTC).isoformat(timespec="seconds")
            self.save_state()

    def save_state(self) -> None:
        from redis.exceptions import RedisError

        if self.state is None:
            return
        try:
            self.client.set(self.state_key, json.dumps(asdict(self.state)), ex=STATE_TTL_S)
        except RedisError as exc:  # only status reads it
            log.warning("%s: cannot record the receiver's state: %s", self.target.name, exc)


def receiver_targets(settings: Settings, only: str | None = None) -> list[Target]:
    """The targets whose WAL a receiver streams (`wal.receiver`), or just `only`."""
    return [t for t in settings.targets.values() if t.wal.receiver and (only is None or t.name == only)]


def run_receivers(settings: Settings, targets: list[Target], stop: threading.Event) -> list[threading.Thread]:
    """Start one thread per target in `targets` running its TargetReceiver until `stop`; return them.
    pg_receivewal dies with the thread that started it (PR_SET_PDEATHSIG is per thread): each runs in its
    receiver's own thread, which lives as long as the receiver."""
    from pgbeat.coordination import redis_client

    client = redis_client(settings)
    threads = []
    for target in targets:
        receiver = TargetReceiver(settings, target, client, stop)
        thread = threading.Thread(target=receiver.run, name=f"receiver:{target.name}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads


@dataclass
class ReceiverStatus:
    """A target's receiver as `pgbeat status` shows it: who holds the lease now (None: nobody streams), since
    when, the last WAL file archived by a holder, or why Redis could not say."""

    holder: str | None = None
    since: str | None = None
    last_segment: str | None = None
    last_at: str | None = None
    error: str | None = None


def receiver_status(client, target: str) -> ReceiverStatus:
    """Read `target`'s receiver lease and the state its holders recorded."""
    from redis.exceptions import RedisError

    from pgbeat.coordination.leases import parse_token, receiver_lease_key, receiver_state_key

    try:
        holder = parse_token(client.get(receiver_lease_key(target)))
        raw = client.get(receiver_state_key(target))
    except RedisError as exc:
        return ReceiverStatus(error=f"Redis cannot be reached: {exc}")
    state = json.loads(raw) if raw else {}
    current = holder is not None and (state.get("node"), str(state.get("pid"))) == (holder["node"], holder["pid"])
    return ReceiverStatus(holder=holder["node"] if holder else None, since=state.get("since") if current else None,
                          last_segment=state.get("last_segment"), last_at=state.get("last_at"))
