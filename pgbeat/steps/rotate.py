"""The rotate step: age-based retention per target and tier, with a floor that cannot be crossed.

Rules (retention that deletes the last good backups is what users of backup tools fear most after lost data):
- a backup older than the tier's `keep_days` is removed together with its manifest and `.sha256`;
- the newest `min_keep` verified backups of the target/tier are never removed, however old, so a run
  of failed backups can never empty the shelf;
- only files with a pgbeat manifest of that target and tier are considered: anything else is left alone;
- ages are measured on the database server's clock: each backup is dated by the server's clock when its
  dump started (`Manifest.taken_at`), and "now" is the server's (the run's own reading of it plus the
  monotonic time elapsed since, or asked afresh), never only a worker's clock, which may be years off;
- a backup dated in the future (made under a wrong clock) is never removed by age and does not count
  towards the floor; it is flagged (`RotationPlan.future`) for a human to look at;
- a clock moved backwards makes backups look younger, never older: nothing extra is removed;
- a pinned backup (`pgbeat pin`, recorded in its local manifest) is kept, locally and at every destination,
  however old, until unpinned;
- a base backup that a kept incremental one depends on (its parent, the parent's parent, up to the chain's
  full root: `Manifest.chain`) is kept however old (`RotationPlan.parents`), so a chain is only ever
  removed whole or from its tip; members are removed newest first, so an interrupted rotation leaves a
  chain that still restores, and WAL retention counts the kept parents (the oldest kept base backup);
- the backups of a target no longer in the configuration are rotated by `defaults` (its tiers and
  `safety_backups`) at `pgbeat rotate`, on the local shelf only (its destinations' keys went with it), at
  the clock of a configured target's server.

The safety backups a restore takes (`BACKUP_ROOT/pre_restore_*`) are kept by count, not age: the newest
`safety_backups` of a target (and any dated in the future), after a restore succeeds and at `pgbeat rotate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat import faults
from pgbeat.catalog.manifest import (
    Entry,
    checksum_path,
    from_the_future,
    iter_manifests,
    iter_pre_restore,
    manifest_lock_path,
    manifest_path,
    order_key,
)
from pgbeat.errors import PgbeatError
from pgbeat.fsutil import remove_path
from pgbeat.pipeline.record import RotateResult, Run, StepContext
from pgbeat.postgres.clock import ServerReading, ask_server_time, server_now

if TYPE_CHECKING:
    from pgbeat.wal.retention import WalRemoval
from pgbeat.settings import PHYSICAL_TIERS, Settings, TierPolicy

log = logging.getLogger(__name__)
SAFETY_TIER = "pre_restore"  # the tier a safety backup's manifest records
ROTATE_REMOVED_DATA = faults.declare("rotate.removed-data", "an expired backup's data file is gone, its sidecars "
                                                            "not yet (the next rotation removes them)")


@dataclass
class RotationPlan:
    target: str
    tier: str
    keep: list[Entry] = field(default_factory=list)
    remove: list[Entry] = field(default_factory=list)
    protected: list[Entry] = field(default_factory=list, metadata={"doc": "expired but kept by min_keep"})
    orphans: list[Entry] = field(default_factory=list, metadata={"doc": "sidecars whose data file is gone"})
    future: list[Entry] = field(default_factory=list, metadata={"doc": "dated after now: kept, flagged"})
    pinned: list[Entry] = field(default_factory=list, metadata={"doc": "expired but pinned (`pgbeat pin`)"})
    parents: list[Entry] = field(default_factory=list, metadata={"doc": "expired, but a kept incremental base "
                                                                        "backup depends on it"})
    wal: WalRemoval | None = None  # a physical tier: the archived WAL no base backup kept here needs

    @property
    def retained(self) -> list[Entry]:
        """Every backup this plan leaves in place."""
        return [*self.keep, *self.protected, *self.future, *self.pinned, *self.parents]

    @property
    def kept(self) -> int:
        return len(self.keep) + len(self.protected) + len(self.future) + len(self.pinned) + len(self.parents)

    def removal_order(self) -> list:
        """The backups to remove, newest first: a chain of incrementals loses its tip before its parents."""
        return sorted(self.remove, key=order_key, reverse=True)


def settled_and_future(entries: list, now: datetime) -> tuple[list, list]:
    """Given backups, return those whose data file is there, oldest first, split into the settled ones and
    those dated in the future at `now` (made under a wrong clock: never removed by age, never counted)."""
    present = sorted((e for e in entries if e.exists), key=order_key)
    return [e for e in present if not from_the_future(e, now)], [e for e in present if from_the_future(e, now)]


def pinned_names(entries: list[Entry]) -> set[str]:
    """The file names of the pinned backups among local `entries` (a destination's copies are kept by these)."""
    return {e.path.name for e in entries if e.manifest.pinned is not None}


def chain_name(entry) -> str:
    """The name a chain of incremental base backups knows a backup by (the plaintext's, for an encrypted copy)."""
    encryption = entry.manifest.encryption
    return encryption.plaintext.file if encryption is not None else Path(entry.path).name


def chain_parents(entries: list, kept: list) -> set[str]:
    """The names of the backups among `entries` that the `kept` incremental base backups depend on, however
    far up their chains (`Manifest.chain`)."""
    tips = [e for e in kept if getattr(e.manifest, "chain", None) is not None and e.manifest.chain.incremental]
    if not tips:  # a logical tier, or full base backups only
        return set()
    by_name = {chain_name(e): e for e in entries}
    needed: set[str] = set()
    for entry in tips:
        chain = entry.manifest.chain
        while chain is not None and chain.incremental and chain.parent and chain.parent not in needed:
            needed.add(chain.parent)
            parent = by_name.get(chain.parent)
            chain = parent.manifest.chain if parent is not None else None
    return needed


def plan_rotation(entries: list, policy: TierPolicy, now: datetime, target: str, tier: str,
                  pinned: set[str] | frozenset[str] = frozenset()) -> RotationPlan:
    """Given one target/tier's backups (local Entries or RemoteEntries), the server's time `now` and the
    names of the pinned backups, decide what to keep: see the module's rules."""
    plan = RotationPlan(target=target, tier=tier)
    settled, plan.future = settled_and_future(entries, now)
    verified = [e for e in settled if e.verified]
    floor = {e.path for e in verified[-policy.min_keep:]} if policy.min_keep else set()
    cutoff = now - timedelta(days=policy.keep_days)
    for entry in settled:
        expired = entry.manifest.taken_at < cutoff
        if not expired:
            plan.keep.append(entry)
        elif Path(entry.path).name in pinned:
            plan.pinned.append(entry)
        elif entry.path in floor:
            plan.protected.append(entry)
        else:
            plan.remove.append(entry)
    needed = chain_parents(entries, plan.retained)
    if needed:
        plan.parents = [e for e in plan.remove if chain_name(e) in needed]
        plan.remove = [e for e in plan.remove if chain_name(e) not in needed]
    plan.orphans = [e for e in entries if not e.exists and e.manifest.taken_at < cutoff]
    return plan


def future_warning(plan: RotationPlan, where: str = "") -> list[str]:
    """One line naming the backups of `plan` dated in the future, or none."""
    if not plan.future:
        return []
    names = ", ".join(Path(e.path).name for e in plan.future[:5])
    return [f"{len(plan.future)} {plan.target} {plan.tier} backup(s){where} are dated in the future by the database "
            f"server's clock (made under a wrong clock): {names}; kept, never removed by age nor counted as "
            "the newest: check them and remove them by hand"]


def rotation_now(settings: Settings, target: str, reading: ServerReading | None = None) -> datetime:
    """The server's clock now, for rotating `target`: from a run's own `reading` of it while this host's
    monotonic clock can bridge the time since, else asked of the server. Raise PgbeatError if it
    cannot be reached (then nothing is removed: a worker's clock alone never decides an age)."""
    return server_now(reading) or ask_server_time(settings.target(target))


def remove_backup(entry: Entry) -> None:
    """Remove a backup: data first, then its globals and `.sha256`, manifest last (the manifest is what marks
    the rest as pgbeat's)."""
    remove_path(entry.path)
    faults.fault_point(ROTATE_REMOVED_DATA)
    if entry.manifest.globals is not None:
        remove_path(entry.path.with_name(entry.manifest.globals.file))
    remove_path(checksum_path(entry.path))
    remove_path(manifest_path(entry.path))
    remove_path(manifest_lock_path(manifest_path(entry.path)))


def rotate_target(settings: Settings, target: str, tier: str, now: datetime, dry_run: bool = False) -> RotationPlan:
    """Rotate `target`'s backups of `tier` on the local shelf by its retention (`Settings.retention_of`);
    a tier without one is kept whole."""
    policy = settings.retention_of(target, tier)
    entries = list(iter_manifests(settings.backup_root, (tier,), target))
    if policy is None:
        return RotationPlan(target=target, tier=tier, keep=[e for e in entries if e.exists])
    plan = plan_rotation(entries, policy, now, target, tier, pinned_names(entries))
    if not dry_run:
        for entry in [*plan.removal_order(), *plan.orphans]:
            remove_backup(entry)
            log.info("removed %s", entry.path)
    return plan


def plan_safety_rotation(entries: list[Entry], keep: int, now: datetime, target: str) -> RotationPlan:
    """Given one target's safety backups and the server's time `now`, keep the newest `keep` (by
    `order_key`) and every one dated in the future; remove the others."""
    plan = RotationPlan(target=target, tier=SAFETY_TIER)
    settled, plan.future = settled_and_future(entries, now)
    plan.pinned = [e for e in settled if e.manifest.pinned is not None]
    counted = [e for e in settled if e.manifest.pinned is None]
    plan.keep, plan.remove = counted[-keep:], counted[:-keep]
    return plan


def rotate_safety_backups(settings: Settings, target: str, now: datetime, dry_run: bool = False) -> RotationPlan:
    """Remove `target`'s safety backups beyond its `safety_backups` newest (`dry_run`: decide only)."""
    entries = [e for e in iter_pre_restore(settings.backup_root) if e.manifest.target == target]
    keep = (settings.resolve(target) or settings.defaults).safety_backups  # a removed target's: the defaults'
    plan = plan_safety_rotation(entries, keep, now, target)
    if not dry_run:
        for entry in plan.remove:
            remove_backup(entry)
            log.info("removed safety backup %s", entry.path)
    return plan


def rotate_destination(settings: Settings, target: str, tier: str, destination: str, now: datetime,
                       dry_run: bool = False, pinned: set[str] | frozenset[str] = frozenset()) -> RotationPlan:
    """Apply the destination's own retention (same floor rule) to what pgbeat stored there, keeping the
    copies of the `pinned` backups."""
    from pgbeat.storage.destinations import open_storage, remote_entries, remove_remote, retention

    config = settings.target(target)
    spec = config.destination(destination)
    with open_storage(spec) as storage:
        plan = plan_rotation(remote_entries(settings, storage, spec.name, target, tier),
                             retention(config, spec, tier), now, target, tier, pinned)
        if not dry_run:
            for entry in [*plan.removal_order(), *plan.orphans]:
                remove_remote(storage, entry)
                log.info("removed %s from %s", entry.path, destination)
        if tier in PHYSICAL_TIERS:
            from pgbeat.wal.retention import remove_unneeded_remote_wal

            plan.wal = remove_unneeded_remote_wal(storage, target, plan.retained, dry_run=dry_run)
    return plan


@dataclass
class TierRotation:
    """One target/tier rotated at the server's time `now`: the local shelf's plan, then each destination's
    plan or, for a destination that could not be rotated, why (`order`: the destinations as configured)."""

    target: str
    tier: str
    now: datetime
    local: RotationPlan
    order: list[str] = field(default_factory=list)
    destinations: dict[str, RotationPlan] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict, metadata={"doc": "destination: why it was not rotated"})

    @property
    def wal(self) -> WalRemoval | None:
        """A physical tier: the local archive's WAL that no base backup kept on the shelf needs."""
        return self.local.wal

    def warnings(self) -> list[str]:
        """The lines a person should read: backups dated in the future, destinations not rotated."""
        lines = future_warning(self.local)
        for name in self.order:
            if name in self.failed:
                lines.append(f"rotation of {name} failed: {self.failed[name]}")
            else:
                lines += future_warning(self.destinations[name], f" at {name}")
        return lines


def rotate_tier(settings: Settings, target: str, tier: str, now: datetime, dry_run: bool = False) -> TierRotation:
    """Given a target, a tier and the server's time `now`, rotate the local shelf, then every destination,
    each by its own rules (`dry_run`: decide only); return what was (or would be) removed and kept.
    A destination that fails is named in `failed` (rotated next time); the others go on."""
    plan = rotate_target(settings, target, tier, now, dry_run=dry_run)
    rotation = TierRotation(target=target, tier=tier, now=now, local=plan)
    config = settings.resolve(target)
    if tier in PHYSICAL_TIERS and config is not None:  # a removed target's WAL is left alone
        from pgbeat.wal.retention import remove_unneeded_wal

        plan.wal = remove_unneeded_wal(settings, target, plan.retained, dry_run=dry_run)
    pinned = pinned_names([*plan.keep, *plan.pinned, *plan.protected])
    for spec in config.destinations if config is not None else []:
        rotation.order.append(spec.name)
        try:
            rotation.destinations[spec.name] = rotate_destination(settings, target, tier, spec.name, now,
                                                                  dry_run=dry_run, pinned=pinned)
        except PgbeatError as exc:  # a destination that is down: rotate it next time, say so now
            rotation.failed[spec.name] = exc.message
    return rotation


def rotate_step(ctx: StepContext, run: Run) -> Run:
    """Rotate the run's target/tier on the local shelf and on every destination, each by its own rules,
    at the server's time (never the worker's: see `rotation_now`)."""
    t0 = time.monotonic()
    try:
        now = rotation_now(ctx.settings, run.target, run.steps.dump.clock if run.steps.dump else None)
    except PgbeatError as exc:
        run.steps.rotate = RotateResult(errors=[f"rotation skipped, nothing removed: the database server's clock "
                                                f"could not be read ({exc.message})"],
                                        duration_s=round(time.monotonic() - t0, 3))
        return run
    rotation = rotate_tier(ctx.settings, run.target, run.tier, now)
    plan = rotation.local
    removed = {"local": [e.path.name for e in plan.remove]}
    removed.update({name: [Path(e.path).name for e in remote.remove] for name, remote in rotation.destinations.items()})
    run.steps.rotate = RotateResult(
        removed=removed["local"], removed_by_destination=removed, errors=rotation.warnings(), kept=plan.kept,
        protected=[e.path.name for e in [*plan.protected, *plan.parents]], future=[e.path.name for e in plan.future],
        server_now=now, duration_s=round(time.monotonic() - t0, 3),
    )
    return run
