"""The `pgbeat` command.

Exit codes: 0 success; 1 a backup or step failed; 2 invalid configuration or usage; 3 verification
failed; 4 the target is locked by another run; 5 a target or the broker is unreachable; 130 interrupted;
`wal-fetch` only: 128 the WAL file could not be fetched (for PostgreSQL's restore_command, 1 means "not in
the archive" and ends recovery, so every other failure is above 125).
Every option and argument has a type of pgbeat/clitypes.py, and every error ends in one message and one
of these codes, never a traceback (`PgbeatGroup`; -vv logs the traceback of an unexpected one). The code
of a failure is its error class's (pgbeat/errors.py), for a failed run too (`error_from_record`).

A command parses its arguments, calls one action (pgbeat/actions.py, the catalog, the restore side) and
renders what it returns; the work, and every loop over backups or steps, lives there.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import re
import shutil
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pgbeat import actions, errors
from pgbeat.actions import selected_targets
from pgbeat.clitypes import (
    BackupLocation,
    BackupURL,
    CheckedText,
    CrontabFile,
    DatabaseName,
    DestinationName,
    IdentityFile,
    IsoTime,
    Listen,
    LocalPath,
    Lsn,
    NodeName,
    RecoveryTime,
    Seconds,
    TargetName,
    TierName,
    Timeline,
    UnixUser,
    WalFileName,
)
from pgbeat.errors import PgbeatError
from pgbeat.runlog import human_size

# Only for annotations: a command imports the settings' models, the catalog, the pipeline's records and
# rich when it runs, so that `--help` (and `wal-push`, once per WAL file) never pays for pydantic.
if TYPE_CHECKING:
    from rich.table import Table

    from pgbeat.catalog.manifest import Manifest
    from pgbeat.pipeline.record import Run
    from pgbeat.settings import Settings


class LazyConsole:
    """A rich Console made on first use: `wal-push` and `wal-fetch` run once per WAL file from PostgreSQL
    and never print through rich, so they do not pay for importing it."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console = None

    def _made(self):
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Rich wraps at 80 columns when not on a terminal; logs and pipes read better unwrapped, unless
            # COLUMNS says how wide they are.
            wide = stream.isatty() or os.environ.get("COLUMNS")
            self._console = Console(stderr=self._stderr, highlight=False, width=None if wide else 200)
        return self._console

    def line(self, text: str) -> None:
        """Print one line of plain text: through rich on a terminal; to a pipe as it is (no markup, no
        wrapping), where rich would cost seconds for a fleet's thousands of lines."""
        stream = sys.stderr if self._stderr else sys.stdout
        if stream.isatty():
            self._made().print(text, markup=False)
        else:
            stream.write(text + "\n")

    def print_json(self, data: object) -> None:
        """Print `data` as JSON: indented and coloured on a terminal; compact to a pipe, where rich's
        rendering would cost seconds for a fleet's status or list."""
        stream = sys.stderr if self._stderr else sys.stdout
        if stream.isatty():
            self._made().print_json(json.dumps(data))
        else:
            stream.write(json.dumps(data, ensure_ascii=False) + "\n")  # compact: the C encoder

    def __getattr__(self, attribute: str):
        return getattr(self._made(), attribute)

    def __setattr__(self, attribute: str, value) -> None:
        if attribute.startswith("_"):
            object.__setattr__(self, attribute, value)
        else:
            setattr(self._made(), attribute, value)  # `out.width = ...` sets the console's


out = LazyConsole()
err = LazyConsole(stderr=True)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def new_table(**options):
    from rich.table import Table

    return Table(**options)


log = logging.getLogger("pgbeat.cli")

# At exit the interpreter runs full garbage collections over every object the command loaded (pydantic's
# schemas, the steps, rich): ~50 ms of each run (of `wal-push`, once per WAL file), to free memory the
# process gives back anyway. Frozen objects are left out of them; the atexit handlers, the flushing of
# stdout and stderr and the closing of files by reference count run as before (pgbeat closes and fsyncs
# what it writes where it writes it, never through the collector).
atexit.register(gc.freeze)


def settings_or_exit(writes: bool = False, recover: bool = True) -> Settings:
    """Load the settings (or exit 2 with the configuration's errors), check that BACKUP_ROOT is a folder
    (and, for a command that `writes` there, writable), then (`recover`) recover what a killed run left
    behind (not for the commands PostgreSQL runs once per WAL file: they leave nothing of the kind)."""
    from pgbeat.settings import get_settings

    try:
        settings = get_settings()
    except PgbeatError as exc:
        fail(exc)
    require_backup_root(settings, writes)
    if not recover:
        return settings
    from pgbeat.startup import recover_host

    recover_host(settings, "cli")  # finish or undo what a killed run left on this host
    return settings


def require_backup_root(settings: Settings, writes: bool) -> None:
    """Exit 2 naming BACKUP_ROOT if it is not a folder, or (`writes`) pgbeat cannot write there."""
    problem = settings.backup_root_problem(writes)
    if problem is not None:
        fail(errors.ConfigError([problem], hint="set BACKUP_ROOT (or backup_root in the targets file) to a "
                                                "folder pgbeat may write"))


def fail(exc: PgbeatError) -> None:
    err.print(exc.render(), markup=False, soft_wrap=True)  # one line stays one line in a log or a pipe
    sys.exit(exc.exit_code)


def render_failure(failure: dict, heading: str) -> None:
    """Print a run's recorded failure under `heading` (`✗ dump`), as PgbeatError.render() words it."""
    first, *rest = errors.error_from_record(failure).render().splitlines()
    out.print(f"  [red]✗ {escape(heading)}[/red] {escape(first)}", markup=True)
    for line in rest:
        out.print(f"    {line}", markup=False)


def broker_error(exc: BaseException) -> bool:
    """True for the errors of a broker (Redis) that cannot be reached or went away."""
    redis = sys.modules.get("redis")
    kombu_errors = sys.modules.get("kombu.exceptions")
    return bool((redis is not None and isinstance(exc, redis.RedisError))
                or (kombu_errors is not None and isinstance(exc, kombu_errors.OperationalError)))


def without_credentials(text: str) -> str:
    return re.sub(r"://[^@/\s]*@", "://***@", text)


class PgbeatGroup(click.Group):
    """The command tree; every error a command lets through ends here in one line and a documented code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors (exit 2) and click's own exits
        except PgbeatError as exc:
            fail(exc)
        except KeyboardInterrupt:
            err.print("pgbeat: interrupted", markup=False)
            sys.exit(errors.EXIT_INTERRUPTED)
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            if broker_error(exc):
                err.print(without_credentials(f"The broker (Redis) cannot be reached: {type(exc).__name__}: {exc}")
                          + "\nHINT: runs already queued go on on the workers; see `pgbeat status` once Redis "
                          "is back", markup=False)
                sys.exit(errors.EXIT_UNREACHABLE)
            err.print(without_credentials(f"pgbeat failed unexpectedly: {type(exc).__name__}: {exc}")
                      + "\nHINT: run it again with -vv for the details, and report it", markup=False)
            sys.exit(errors.EXIT_FAILED)


@click.group(cls=PgbeatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(package_name="pgbeat")
def main(verbose: int) -> None:
    """Scheduled, verified PostgreSQL backups (embedded, or as Celery chains with a broker)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- backup ------------------------------------------------------------------------------------------


def print_event(run: Run, step: str, state: str) -> None:
    from pgbeat.pipeline.record import ArtifactResult, RotateResult, UploadResult

    if state == "started":
        return
    if state == "failed":
        render_failure(run.failure.model_dump() if run.failure else {}, step)
        return
    result = run.steps.get(step)
    extra = ""
    if isinstance(result, ArtifactResult):
        extra = human_size(result.size)
    elif isinstance(result, UploadResult):
        extra = run.final_path or ""
    elif isinstance(result, RotateResult):
        extra = f"removed {len(result.removed)}, kept {result.kept}"
    out.print(f"  [green]✓ {step}[/green] {result.duration_s if result else 0:.2f}s {extra}", markup=True)


@main.command()
@click.argument("tier", type=TierName())
@click.option("--target", "target_name", type=TargetName(), help="Back up only this target (default: all targets).")
@click.option("--no-wait", is_flag=True, help="With a broker: enqueue and return at once.")
@click.option("--timeout", type=Seconds(), default=6 * 3600, show_default=True,
              help="With a broker: seconds to wait for the chain to finish.")
@click.option("--local", is_flag=True, help="Run the chain in this process even when a broker is configured "
                                            "(the way out when Redis or the workers are down).")
@click.option("--dry-run", is_flag=True, help="Show what would run (targets, files, destinations, what "
                                              "retention would remove afterwards); change nothing.")
def backup(tier: str, target_name: str | None, no_wait: bool, timeout: float, local: bool, dry_run: bool) -> None:
    """Back up TIER (daily, weekly, monthly, base, or a tier the config adds) now.

    With no broker configured (or with --local) the chain runs in this process; with one, it is sent to
    the workers and this command follows its steps.
    """
    settings = settings_or_exit()
    require_configured_tier(settings, tier)
    if dry_run:
        if no_wait:
            fail(errors.UsageError("--no-wait sends a backup; --dry-run sends nothing", hint="pick one"))
        names, found = actions.backup_selection(settings, target_name, dry_run=True)
        code = print_discoveries(found, tier)
        sys.exit(backup_dry_run(settings, names, tier, local) or code)
    here = local or settings.embedded
    if here and no_wait:
        fail(errors.UsageError("--no-wait is for a backup sent to the workers; in this process it runs to its end",
                               hint="leave out --no-wait (or --local)"))
    require_backup_root(settings, writes=here)  # through the broker, the workers write
    names, found = actions.backup_selection(settings, target_name)
    code = print_discoveries(found, tier, settings)
    if here:
        sys.exit(backup_inprocess(settings, names, tier) or code)
    sys.exit(backup_through_broker(settings, names, tier, no_wait, timeout) or code)


def target_label(name: str) -> str:
    """A target's name as tables show it: a whole-server target's database whose name had to be encoded
    (`srv.x-nv4sazdc`) with that name beside it (`srv.x-nv4sazdc ('my db')`)."""
    from pgbeat.settings.servers import ENCODED_PREFIX, split_derived

    derived = split_derived(name)
    if derived is None or not name.rpartition(".")[2].startswith(ENCODED_PREFIX):
        return name
    return f"{name} ({derived[1]!r})"


def printable(name: str) -> str:
    """A database's name as printed: as it is, or quoted with escapes when it holds what a terminal would
    act on (control characters) or a comma."""
    return name if name.isprintable() and "," not in name else repr(name)


def print_discoveries(found: list, tier: str, settings: Settings | None = None) -> int:
    """Print what each whole-server target discovered (and, given `settings`, tell its channels what it
    warns of); return EXIT_UNREACHABLE when a server could not be asked, else EXIT_OK."""
    from pgbeat.discovery import announce

    code = errors.EXIT_OK
    for discovery in found:
        if settings is not None:
            announce(settings, discovery, tier)
        if discovery.error is not None:
            err.print(f"{discovery.server}: cannot list its databases (databases: all): {discovery.error}; none "
                      "of them is backed up", markup=False)
            code = errors.EXIT_UNREACHABLE
            continue
        shown = ", ".join(map(printable, discovery.databases.values())) or "none"
        excluded = f"; excluded: {', '.join(map(printable, discovery.excluded))}" if discovery.excluded else ""
        out.print(f"{discovery.server} (databases: all): {len(discovery.databases)} database(s): {shown}{excluded}",
                  markup=False)
        print_warnings(discovery.warnings())
    return code


def require_configured_tier(settings: Settings, tier: str) -> None:
    """Exit with a usage error naming the configured tiers when no target has `tier`."""
    if tier not in settings.tier_names():
        fail(errors.UsageError(f"Unknown tier {tier!r}", hint=f"configured tiers: {', '.join(settings.tier_names())}"))


def tier_not_run(settings: Settings, name: str, tier: str) -> str:
    """Why target `name` does not run `tier`: it is not one of its tiers, or it is disabled there."""
    return f"tier {tier} is disabled" if tier in settings.target(name).tiers else f"no tier {tier}"


def backup_dry_run(settings: Settings, names: list[str], tier: str, local: bool) -> int:
    """Print what backing up would do, changing nothing; return 1 if a rotation could not be previewed."""
    from pgbeat.coordination.dispatch import DEFAULT_QUEUE

    where = "in this process" if local or settings.embedded else f"through the broker, on queue {DEFAULT_QUEUE}"
    out.line(f"dry run: nothing is dumped, sent or removed; the chain would run {where}")
    code = errors.EXIT_OK
    for plan in actions.plan_backups(settings, names, tier):
        if not plan.enabled:
            out.line(f"{plan.target}: {tier_not_run(settings, plan.target, tier)}, would be skipped")
            continue
        out.line(f"{plan.target} {tier}: {plan.server} -> {settings.backup_root / tier / plan.file} ({plan.format}"
                 f"{', encrypted with age' if plan.encrypted else ''})")
        out.line(f"  copies: local{''.join(', ' + d for d in plan.destinations)}")
        out.line(f"  schedule {plan.schedule}, next run {local_time(settings, plan.next_run, seconds=False)}")
        if plan.rotation:
            out.line(f"  retention: not previewed: {plan.rotation}")
            code = errors.EXIT_FAILED
        elif plan.would_remove:
            out.line(f"  retention would then remove {len(plan.would_remove)}: {', '.join(plan.would_remove)}")
        else:
            out.line("  retention would then remove nothing")
    return code


def backup_inprocess(settings: Settings, names: list[str], tier: str) -> int:
    """Run the chains here, printing each step; return the exit code."""
    def announce(target, enabled: bool) -> None:
        if not enabled:
            out.print(f"{target.name}: {tier_not_run(settings, target.name, tier)}, skipped")
        else:
            out.print(f"[bold]{escape(target.name)}[/bold] {tier} backup of {escape(target.describe())}", markup=True)

    def print_done(run: Run, step: str, state: str) -> None:
        print_event(run, step, state)
        if step == "notify" and state == "done" and run.status == "succeeded":
            out.print(f"  backup: {run.final_path}", markup=False)
            print_warnings(run.steps.notify.warnings if run.steps.notify else [])

    progress = ProgressLine()

    def print_wait(text: str) -> None:
        progress.clear()
        out.print(f"  [yellow]… {escape(text)}[/yellow] (since {local_time(settings, datetime.now(UTC))})",
                  markup=True, soft_wrap=True)  # one line, however long the reason

    def print_step(run: Run, step: str, state: str) -> None:
        progress.clear()
        print_done(run, step, state)

    done = actions.backup_here(settings, names, tier, on_start=announce, on_event=print_step, on_wait=print_wait,
                               on_progress=progress.show if progress.enabled else None)
    progress.clear()
    return next((d.exit_code for d in done if d.exit_code), errors.EXIT_OK)


class ProgressLine:
    """One line of progress on a terminal, rewritten in place and cleared before anything else is printed;
    off when stdout is not a terminal (a log gets the steps' lines, not a line a second)."""

    def __init__(self) -> None:
        self.enabled = sys.stdout.isatty()
        self._shown = False
        self._lock = threading.Lock()  # the dump's progress thread and the steps' lines

    def show(self, text: str) -> None:
        with self._lock:
            width = max(20, shutil.get_terminal_size().columns) - 1  # never wrapped: \r must reach its start
            sys.stdout.write("\r\x1b[K" + f"  {text}"[:width])
            sys.stdout.flush()
            self._shown = True

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                sys.stdout.write("\r\x1b[K")
                sys.stdout.flush()
                self._shown = False


def print_warnings(warnings: list[str]) -> None:
    """A run's warnings (monitoring.anomaly: much smaller, tables gone, no tables, ...), with its result."""
    for warning in warnings:
        out.print(f"  [yellow]⚠ warning[/yellow]: {escape(warning)}", markup=True)


def report_end(names: dict[str, str], end) -> None:
    name = names[end.run_id]
    if end.status == "failed" and end.failure:
        render_failure(end.failure, f"{name} failed at {end.failure.get('step')}:")
    elif end.status == "succeeded":
        out.print(f"  {name}: succeeded: {end.fields.get('final_path')}", markup=False)
        with contextlib.suppress(ValueError):
            print_warnings(json.loads(end.fields.get("warnings") or "[]"))
    else:
        out.print(f"  {name}: {end.status} ({end.fields.get('duplicate_of', '')})", markup=False)


def backup_through_broker(settings: Settings, names: list[str], tier: str, no_wait: bool, timeout: float) -> int:
    """Send the chains to the workers and follow them (unless `no_wait`); return the exit code."""
    for name in [n for n in names if not settings.target(n).runs_tier(tier)]:
        out.print(f"{name}: {tier_not_run(settings, name, tier)}, skipped")
    names = [n for n in names if settings.target(n).runs_tier(tier)]
    if not names:
        return errors.EXIT_OK
    runs = actions.send_backups(settings, names, tier, need_worker=not no_wait)
    for run_id, name in runs.items():
        out.print(f"{name}: {tier} backup queued as run {run_id}")
    if no_wait:
        return errors.EXIT_OK
    ends = actions.follow_backups(settings, list(runs), tier, timeout,
                                  show=lambda run_id, line: out.print(f"  {runs[run_id]}: {line}", markup=False),
                                  on_end=lambda end: report_end(runs, end))
    late = [end for end in ends.values() if end.timed_out]
    if late:
        err.print(f"timed out after {timeout:.0f}s waiting for {len(late)} run(s); they go on")
    return actions.backups_exit_code(list(ends.values()))


# --- list, verify, rotate ----------------------------------------------------------------------------


@main.command("list")
@click.option("--target", "target_name", type=TargetName(), help="Only this target.")
@click.option("--tier", type=TierName(), help="Only this tier.")
@click.option("--destination", type=DestinationName(),
              help="List what this destination holds (from its manifests) instead.")
@click.option("--wide", is_flag=True, help="Also the format, SHA-256 and the full file name (at a destination: "
                                           "the URL `pgbeat restore` takes), and an incremental base backup's "
                                           "parent, however narrow the terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per backup).")
@click.option("--orphans", is_flag=True, help="Only the backups of targets no longer in the configuration.")
def list_cmd(target_name: str | None, tier: str | None, destination: str | None, wide: bool, as_json: bool,
             orphans: bool) -> None:
    """List the backups on the local shelf (or at a destination), newest last, from their manifests."""
    from pgbeat.catalog.manifest import list_backups
    from pgbeat.catalog.remote import destination_entries

    settings = settings_or_exit(writes=bool(destination))  # a destination's manifests are read via .work
    if orphans and (destination or target_name):
        fail(errors.UsageError("--orphans lists the local shelf's backups of targets that are not configured",
                               hint="leave out --target and --destination"))
    if destination:
        entries = destination_entries(settings, destination, target_name, tier)
    elif orphans:
        from pgbeat.catalog.manifest import orphan_census

        entries = [e for name in orphan_census(settings.backup_root, settings.owns)
                   for e in list_backups(settings.backup_root, name, tier)]
    elif target_name in settings.servers:  # a whole-server target: the backups of each of its databases
        entries = [e for name in selected_targets(settings, target_name)
                   for e in list_backups(settings.backup_root, name, tier, include_pre_restore=True)]
    else:
        entries = list_backups(settings.backup_root, target_name, tier, include_pre_restore=True)
    where = {id(e): backup_location(settings, e, destination) for e in entries}
    if as_json:
        out.print_json([{"path": where[id(e)], **e.manifest.model_dump(mode="json")} for e in entries])
        return
    out.print(f"Backups at {destination}" if destination else f"Backups in {settings.backup_root}", markup=False)
    if not entries:
        out.print("  none", markup=False)
        return
    zone = datetime.now(settings.tz).strftime("%Z")
    # One table per target, its name as a heading: a long name is never cut to `erp_…`, and the columns an
    # operator decides by (date, tier, size, checks, drill) fit 80 columns; --wide adds what is long.
    from rich import box

    by_target: dict[str, list] = {}
    for e in entries:
        by_target.setdefault(e.manifest.target, []).append(e)
    for target, own in sorted(by_target.items()):
        table = new_table(title=escape(target_label(target)), title_justify="left", title_style="bold",
                          box=box.SIMPLE_HEAD, pad_edge=False)
        for column in (f"taken at ({zone})", "tier", "size", "checks", f"drill ({zone})"):
            table.add_column(column, overflow="fold")
        chained = wide and any(e.manifest.chain is not None and e.manifest.chain.incremental for e in own)
        if wide:
            for column in ("format", "sha256", "url" if destination else "file", *(["parent"] if chained else [])):
                table.add_column(column, overflow="fold")
        for e in own:
            m = e.manifest
            row = [plain_time(settings, m.taken_at), tier_cell(m), human_size(m.size), checks_summary(m, destination),
                   drill_summary(settings, m, zone=False)]
            if wide:
                row += [f"{m.format}/{m.codec}{'+age' if m.encryption else ''}", m.sha256 or "", where[id(e)]]
                if chained:  # the backup an incremental base backup restores only with
                    row.append(m.chain.parent if m.chain is not None and m.chain.incremental else "")
            table.add_row(*(escape(cell) for cell in row))
        # --wide: as wide as the longest name needs, so a name or URL is whole on its line (copied whole
        # even where the terminal soft-wraps it), like `ls -l`.
        print_whole(table) if wide else out.print(table)
    if not wide:
        out.print("--wide: file names" + (" and URLs" if destination else "") + "; --json: everything", markup=False)


def print_whole(table: Table) -> None:
    """Print `table` as wide as its longest cell needs, whatever the terminal's width."""
    terminal = out.width
    out.width = max(terminal, out.measure(table, options=out.options.update(width=10**4)).maximum)
    try:
        out.print(table)
    finally:
        out.width = terminal


def backup_location(settings: Settings, entry, destination: str | None) -> str:
    """What names a listed backup for `pgbeat restore`: its path, or at a destination its URL."""
    if destination is None:
        return str(entry.path)
    from pgbeat.storage.destinations import backup_url

    return backup_url(settings.target(entry.manifest.target).destination(destination), entry.path)


def tier_cell(manifest: Manifest) -> str:
    """The tier, and for a base backup of a chain whether it is full or incremental (and its depth)."""
    chain = manifest.chain
    if chain is None:
        return manifest.tier
    return f"{manifest.tier} incr {chain.depth}" if chain.incremental else f"{manifest.tier} full"


def checks_summary(manifest: Manifest, destination: str | None) -> str:
    """'verified', which copies are not good, and a pin: 'verified, s3 failed, pinned'."""
    bad = [f"{name} {copy.status}" for name, copy in sorted(manifest.copies.items())
           if not copy.ok and (destination is None or name == destination)]
    return ", ".join([manifest.status, *bad, *(["pinned"] if manifest.pinned else [])])


def local_time(settings: Settings, when: datetime | str, seconds: bool = True) -> str:
    """A time for a person: in pgbeat's configured zone, and saying which (`2025-11-19 02:00:00 -03`)."""
    when = datetime.fromisoformat(when) if isinstance(when, str) else when
    return when.astimezone(settings.tz).strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def plain_time(settings: Settings, when: datetime | str) -> str:
    """A time in pgbeat's configured zone without the zone, for a column whose heading names it."""
    when = datetime.fromisoformat(when) if isinstance(when, str) else when
    return when.astimezone(settings.tz).strftime("%Y-%m-%d %H:%M")


def drill_summary(settings: Settings, manifest: Manifest, zone: bool = True) -> str:
    """'passed 2025-11-23 05:00:12 -03' for the latest drill of a backup ('passed 2025-11-23 05:00' under a
    heading naming the zone), '-' if it was never drilled."""
    last = manifest.last_drill
    if last is None:
        return "-"
    status = f"{last.status} (0 tables)" if last.passed and last.warnings else last.status  # proved little
    return f"{status} {local_time(settings, last.at) if zone else plain_time(settings, last.at)}"


@main.command()
@click.argument("file", type=BackupLocation(), required=False)
@click.option("--identity", type=IdentityFile(), help="Also decrypt and check an encrypted backup.")
@click.option("--destination", type=DestinationName(),
              help="Check every copy at this destination against its manifest (a scrub).")
@click.option("--deep", is_flag=True, help="With --destination: read each copy back and hash it.")
def verify(file: str | None, identity: Path | None, destination: str | None, deep: bool) -> None:
    """Verify FILE or a copy at a destination (s3://, gs://, ssh://): decompression test, completeness,
    checksums against its manifest and .sha256; or every copy at a destination."""
    from pgbeat.crypt import load_identities

    settings = settings_or_exit(writes=bool(destination or identity or "://" in (file or "")))
    if destination:
        sys.exit(scrub(settings, destination, deep))
    if not file:
        fail(errors.UsageError("Give a backup FILE or --destination NAME", hint="see pgbeat verify --help"))
    try:
        manifest, result = actions.verify_location(settings, file, load_identities(identity) if identity else None)
    except PgbeatError as exc:
        fail(exc)
    what = "complete dump" if result.get("complete") else "stored copy (encrypted; pass --identity to open it)"
    out.print(f"OK {file}: {human_size(result['size'])}, {what}, checksums match the manifest", markup=False)
    if manifest.sha256:
        out.print(f"  MD5     {result['md5']}\n  SHA-256 {result['sha256']}", markup=False)


@main.command()
@click.argument("file", type=LocalPath())
@click.option("--note", type=CheckedText(), help="Why it is kept (shown by rotate and list --json).")
@click.option("--remove", is_flag=True, help="Unpin it: its tier's retention applies again.")
def pin(file: Path, note: str | None, remove: bool) -> None:
    """Keep backup FILE whatever its tier's retention says, on the local shelf and at every destination
    (and if its target leaves the configuration), until `pgbeat pin --remove FILE`."""
    settings = settings_or_exit(writes=True)
    if remove and note:
        fail(errors.UsageError("--note says why a backup is pinned; --remove unpins it", hint="pick one"))
    try:
        manifest = actions.pin(settings, file, note, pinned=not remove)
    except PgbeatError as exc:
        fail(exc)
    if remove:
        out.print(f"unpinned {manifest.file}: the {manifest.tier} tier's retention applies to it again", markup=False)
    else:
        out.print(f"pinned {manifest.file}: every rotation keeps it, here and at every destination, until "
                  f"`pgbeat pin --remove`", markup=False)


def scrub(settings: Settings, destination: str, deep: bool) -> int:
    """Check each copy at `destination`, printing each as it is checked; return the exit code."""
    from pgbeat.catalog.remote import scrub as scrub_destination

    def print_check(check) -> None:
        out.print(f"  ✓ {check.entry.path}" if check.problem is None else f"  ✗ {check.entry.path}: {check.problem}",
                  markup=False)

    report = scrub_destination(settings, destination, deep, on_check=print_check)
    out.print(f"{len(report.checks) - len(report.bad)} of {len(report.checks)} copies at {destination} match their "
              "manifests", markup=False)
    return report.exit_code


@main.command()
@click.option("--target", "target_name", type=TargetName(), help="Only this target.")
@click.option("--tier", type=TierName(), help="Only this tier.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--now", "pretend_now", type=IsoTime(), hidden=True,
              help="Pretend it is this ISO time (tests, previews).")
def rotate(target_name: str | None, tier: str | None, dry_run: bool, pretend_now: datetime | None) -> None:
    """Apply each tier's retention to the local shelf (never below a tier's min_keep), at the database
    server's time: a target whose server cannot be reached is skipped (exit 1), never rotated by this
    host's clock alone."""
    settings = settings_or_exit(writes=not dry_run)
    if tier:
        require_configured_tier(settings, tier)
    names = selected_targets(settings, target_name)
    verb = "would remove" if dry_run else "removed"
    skipped = False
    for target in actions.rotate(settings, names, tier, now=pretend_now, dry_run=dry_run,
                                 orphans=target_name is None):
        if target.skipped:
            skipped = True
            err.print(f"{target.target}: not rotated, nothing removed: {target.skipped}", markup=False)
        for r in target.tiers:
            print_rotation(settings, r, verb)
    if skipped:
        sys.exit(errors.EXIT_FAILED)


def print_rotation(settings: Settings, r, verb: str) -> None:
    """Print one target/tier's rotation (pgbeat.steps.rotate.TierRotation): local shelf, then destinations."""
    from pgbeat.steps.rotate import future_warning

    name, t = r.target, r.tier
    for entry in r.local.remove:
        out.line(f"{name} {t}: {verb} {entry.path.name}")
    for entry in r.local.protected:
        out.line(f"{name} {t}: kept {entry.path.name} (expired, but among the newest "
                 f"{settings.retention_of(name, t).min_keep} verified)")
    for entry in r.local.pinned:
        note = entry.manifest.pinned.note
        out.line(f"{name} {t}: kept {entry.path.name} (expired, but pinned{': ' + note if note else ''})")
    for entry in r.local.parents:
        out.line(f"{name} {t}: kept {entry.path.name} (expired, but a kept incremental base backup depends on it)")
    for line in future_warning(r.local):
        err.line(f"warning: {line}")
    for destination in r.order:
        if destination in r.failed:
            err.line(f"{name} {t} at {destination}: {r.failed[destination]}")
            continue
        for entry in r.destinations[destination].remove:
            out.line(f"{name} {t}: {verb} {entry.path} at {destination}")
        print_wal_removal(name, t, verb, r.destinations[destination].wal, f" at {destination}")
        for line in future_warning(r.destinations[destination], f" at {destination}"):
            err.line(f"warning: {line}")
    print_wal_removal(name, t, verb, r.wal)
    out.line(f"{name} {t}: {len(r.local.remove)} {verb}, {r.local.kept} kept")


def print_wal_removal(name: str, tier: str, verb: str, wal, where: str = "") -> None:
    """One line for the WAL a rotation removed (pgbeat.wal.retention.WalRemoval), locally or `where`."""
    if wal is not None and wal.files:
        names = wal.wal_names
        out.line(f"{name} {tier}: {verb} {len(names)} WAL file(s){where} no kept base backup needs ({names[0]} .. "
                 f"{names[-1]}, before {wal.oldest_needed})")


# --- restore and drills ------------------------------------------------------------------------------


def confirm_restore(yes: bool):
    """Return the confirmation callback: typed `SIM` on a terminal, `--yes` in scripts, else refuse."""
    from pgbeat.restore.restore import RestoreRefused

    def confirm(info) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise RestoreRefused("Refusing to restore without confirmation: there is no terminal to ask on",
                                 hint="type SIM at the prompt in a terminal, or pass --yes in scripts")
        out.print(f"[bold red]ATENÇÃO / WARNING[/bold red]: restoring [bold]{escape(info.backup.name)}[/bold] "
                  f"({human_size(info.size)}, taken {local_time(settings_or_exit(), info.taken_at)})", markup=True)
        out.print(f"into database [bold]{escape(info.database)}[/bold] on {escape(info.server)}.", markup=True)
        if info.foreign:
            of = f" (database {info.backup_database})" if info.backup_database else ""
            out.print(f"[bold yellow]This backup is of target {escape(info.backup_of)}{escape(of)}, not of "
                      f"{escape(info.target)}[/bold yellow]: check that this is the database it belongs in.",
                      markup=True)
        if info.sessions:
            out.print(f"{info.sessions} session(s) connected to {escape(info.database)} now will be disconnected "
                      "when the restored copy is swapped in.", markup=True)
        out.print("This OVERWRITES ALL DATA in that database. A safety backup of its current state is taken first.")
        answer = click.prompt("Digite SIM para confirmar / type SIM to confirm", default="", show_default=False)
        return answer.strip() == "SIM"

    return confirm


def print_manifest(settings: Settings, entry) -> None:
    m = entry.manifest
    out.print(f"{entry.path}\n  target {m.target}, tier {m.tier}, taken {local_time(settings, m.started_at)}, "
              f"{human_size(m.size)}, {m.format}/{m.codec}, PostgreSQL {m.server_version}, status {m.status}, "
              f"drill {drill_summary(settings, m)}", markup=False)
    table = new_table(title=f"{len(m.tables)} table(s)")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in sorted(m.tables.items()):
        table.add_row(escape(name), f"{rows:,}")
    out.print(table)
    if m.globals is not None:
        g = m.globals
        out.print(f"globals: {g.file}, {human_size(g.size)}, {len(g.roles)} role(s), "
                  f"{'with' if g.passwords else 'without'} role passwords{', encrypted' if g.encrypted else ''}"
                  " (restore with --with-globals to create them)", markup=False)
    if m.encryption is not None:
        out.line("other objects: not listed, the backup is encrypted (restore it to see them)")
        return
    from collections import Counter

    from pgbeat.restore.contents import BOOKKEEPING, backup_objects

    objects = backup_objects(entry, settings)
    counts = Counter(o.kind for o in objects)
    out.line("objects: " + ", ".join(f"{kind.lower()} {n}" for kind, n in counts.items()))
    shown = [o for o in objects if o.kind not in BOOKKEEPING and o.kind != "TABLE"]
    if shown:
        table = new_table(title=f"{len(shown)} other object(s)")
        for column in ("kind", "schema", "name"):
            table.add_column(column)
        for o in sorted(shown, key=lambda o: (o.kind, o.schema or "", o.name)):
            table.add_row(o.kind.lower(), escape(o.schema or "-"), escape(o.name))
        out.print(table)


@main.command()
@click.argument("file", type=BackupLocation(), required=False)
@click.option("--latest", is_flag=True, help="Restore the newest verified backup (of --target, --tier).")
@click.option("--target", "target_name", type=TargetName(),
              help="The target to restore into (default: the backup's own).")
@click.option("--tier", type=TierName(), help="With --latest: only this tier.")
@click.option("--into", type=DatabaseName(),
              help="Restore into this database instead (created if missing); the source is untouched.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True,
              help="pg_restore -j for custom/directory backups.")
@click.option("--list", "list_only", is_flag=True, help="Show what the backup holds; restore nothing.")
@click.option("--with-globals", is_flag=True,
              help="First create the roles, memberships, role settings and tablespaces of the backup's server "
                   "from its globals file (those the server has are left as they are; nothing is dropped).")
@click.option("--force-older", is_flag=True,
              help="Restore into a server older than the pg_dump that made the backup (refused without it: "
                   "the dump may use what the older server rejects).")
@click.option("--on-worker", is_flag=True, help="Run the restore as tasks.restore on a worker (needs a broker).")
@click.option("--node", type=NodeName(), help="With --on-worker: the host whose worker restores (default: this host).")
@click.option("--identity", type=IdentityFile(), help="age identity file for encrypted backups.")
@click.option("--timeout", type=Seconds(), default=6 * 3600, show_default=True,
              help="With --on-worker: seconds to wait for the restore; then it is stopped and undone. "
                   "With --pitr --start: seconds to wait for recovery.")
@click.option("--pitr", is_flag=True,
              help="Point-in-time recovery of --target's cluster from a base backup and the WAL archive into "
                   "a new --data-dir.")
@click.option("--to", "to", type=RecoveryTime(),
              help="With --pitr: latest (default), immediate, or a time ('2025-11-19 14:30:00', in the "
                   "configured zone unless one is given).")
@click.option("--to-lsn", type=Lsn(), help="With --pitr: stop at this LSN.")
@click.option("--to-xid", type=click.IntRange(1, 2**63 - 1), help="With --pitr: stop after this transaction.")
@click.option("--to-name", type=CheckedText(), help="With --pitr: stop at this named restore point.")
@click.option("--timeline", type=Timeline(), default="latest", show_default=True,
              help="With --pitr: the timeline to follow.")
@click.option("--data-dir", type=LocalPath(folder=True), help="With --pitr: the new data directory (empty).")
@click.option("--start", is_flag=True, help="With --pitr: start the server and wait until it is promoted.")
@click.option("--port", type=click.IntRange(1, 65535), help="With --pitr: the restored server's port.")
@click.option("--standby", is_flag=True, help="With --pitr: make it a standby (standby.signal) of --primary-conninfo.")
@click.option("--primary-conninfo", type=CheckedText(), help="With --pitr --standby: how it reaches the primary.")
@click.option("--server-pgbeat", type=LocalPath(must_exist=True),
              help="With --pitr: the pgbeat the restored server runs for restore_command (one its user, "
                   "postgres, can run; default: this one).")
def restore(file: str | None, latest: bool, target_name: str | None, tier: str | None, into: str | None, yes: bool,
            jobs: int, list_only: bool, with_globals: bool, force_older: bool, on_worker: bool, node: str | None,
            identity: Path | None, timeout: float, pitr: bool, to, to_lsn: str | None, to_xid: int | None,
            to_name: str | None, timeline: str, data_dir: Path | None, start: bool, port: int | None, standby: bool,
            primary_conninfo: str | None, server_pgbeat: Path | None) -> None:
    """Restore FILE, a copy at a destination (s3://, gs://, ssh://), or --latest: integrity check, typed
    confirmation, safety backup. With --pitr: a cluster as of a moment, from a base backup and the WAL.

    The backup is restored into a temporary database, checked against its manifest, and swapped in:
    a failure at any point leaves the existing database as it was. Emergency revert:
    `pgbeat restore BACKUP_ROOT/pre_restore_<target>_<stamp>.sql.gz`.
    """
    from pgbeat.pipeline.record import scratch_folder
    from pgbeat.restore import restore as restoring
    from pgbeat.steps.verify import open_backup

    pitr_options = {"--to": to, "--to-lsn": to_lsn, "--to-xid": to_xid, "--to-name": to_name, "--data-dir": data_dir,
                    "--start": start, "--port": port, "--standby": standby, "--primary-conninfo": primary_conninfo,
                    "--server-pgbeat": server_pgbeat, "--timeline": timeline if timeline != "latest" else None}
    if pitr:
        sys.exit(restore_pitr_cmd(target_name, file, latest, into, identity, timeout, pitr_options))
    given = [name for name, value in pitr_options.items() if value not in (None, False)]
    if given:
        fail(errors.UsageError(f"{', '.join(given)}: only with --pitr", hint="see pgbeat restore --help"))
    settings = settings_or_exit(writes=not list_only or "://" in (file or ""))
    scratch = contextlib.ExitStack()  # a fetched copy's folder, removed however this ends
    try:
        if into is not None:
            restoring.refuse_reserved(into)  # before anything is downloaded, asked or sent
        if bool(file) == latest:
            raise errors.UsageError("Give either a backup FILE or --latest", hint="see pgbeat restore --help")
        if node and not on_worker:
            raise errors.UsageError("--node names the worker of --on-worker",
                                    hint="add --on-worker, or leave out --node")
        if on_worker and not settings.embedded:
            from pgbeat.coordination.dispatch import require_broker

            require_broker(settings, "`pgbeat restore` without --on-worker restores in this process, without it")
        if file and "://" in file:
            entry = actions.fetch_and_check(settings, file, scratch.enter_context(scratch_folder(settings, "fetch")))
        else:
            entry = open_backup(Path(file)) if file else restoring.latest_backup(settings, target_name, tier)
        if list_only:
            print_manifest(settings, entry)
            return
        target = restoring.restore_target(settings, entry, target_name)
        if on_worker:
            sys.exit(restore_on_worker(settings, entry, target.name, into, jobs, yes, node, timeout,
                                       with_globals=with_globals, force_older=force_older))

        def on_step(step: str, state: str) -> None:
            if state == "done":
                out.print(f"  [green]✓ {step}[/green]", markup=True)
            elif state != "started":
                out.print(f"  {step}: {state}", markup=False)

        out.print(f"Restoring {file or entry.path} into {into or target.dbname} on {target.describe()}", markup=False)
        result = restoring.restore(settings, entry, target, into=into, jobs=jobs, confirm=confirm_restore(yes),
                                   on_step=on_step, identities=restoring.identities_for(target, identity),
                                   force_older=force_older, with_globals=with_globals)
    except PgbeatError as exc:
        fail(exc)
    finally:
        scratch.close()
    out.print("  " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in result.steps.items()), markup=False)
    if result.safety_backup:
        out.print(f"  safety backup: {result.safety_backup}", markup=False)
    out.print(f"Restored {result.database} in {result.duration_s:.1f}s (load {result.restore_s:.1f}s); "
              f"{result.tables_checked} table(s) match the manifest's row counts", markup=False)


def restore_pitr_cmd(target_name: str | None, file: str | None, latest: bool, into: str | None,
                     identity: Path | None, timeout: float, options: dict) -> int:
    """`restore --pitr`: check the options, restore, print what recovery reached; return the exit code."""
    from pgbeat.physical.pitr import RecoveryGoal, restore_pitr
    from pgbeat.restore.restore import identities_for

    settings = settings_or_exit(writes=True)
    try:
        if file or latest or into:
            raise errors.UsageError("--pitr restores a whole cluster into --data-dir; FILE, --latest and --into "
                                    "are for logical restores")
        if target_name is None or options["--data-dir"] is None:
            raise errors.UsageError("--pitr needs --target and --data-dir",
                                    hint="e.g. pgbeat restore --pitr --target erp --to '2025-11-19 14:30' "
                                         "--data-dir /var/lib/postgresql/15/restored")
        goals = {k: v for k, v in options.items() if k in ("--to", "--to-lsn", "--to-xid", "--to-name") and v}
        if len(goals) > 1:
            raise errors.UsageError(f"{' and '.join(goals)}: give one recovery target")
        if options["--primary-conninfo"] and not options["--standby"]:
            raise errors.UsageError("--primary-conninfo is for --standby")
        to = options["--to"] or "latest"
        if options["--to-lsn"]:
            goal = RecoveryGoal("lsn", options["--to-lsn"], timeline=options["--timeline"] or "latest")
        elif options["--to-xid"]:
            goal = RecoveryGoal("xid", str(options["--to-xid"]), timeline=options["--timeline"] or "latest")
        elif options["--to-name"]:
            goal = RecoveryGoal("name", options["--to-name"], timeline=options["--timeline"] or "latest")
        elif isinstance(to, datetime):
            goal = RecoveryGoal("time", to if to.tzinfo else to.replace(tzinfo=settings.tz),
                                timeline=options["--timeline"] or "latest")
        else:
            goal = RecoveryGoal(to, timeline=options["--timeline"] or "latest")
        target = settings.target(target_name)
        out.print(f"Point-in-time restore of {target.name} to {goal.describe()} into {options['--data-dir']}",
                  markup=False)
        result = restore_pitr(
            settings, target, goal, options["--data-dir"], start=options["--start"], port=options["--port"],
            standby=options["--standby"], primary_conninfo=options["--primary-conninfo"],
            identities=identities_for(target, identity), timeout=timeout,
            pgbeat=str(options["--server-pgbeat"]) if options["--server-pgbeat"] else None,
            on_step=lambda step, text: out.print(f"  [green]✓ {step}[/green] {'' if text == 'done' else text}",
                                                 markup=True))
    except PgbeatError as exc:
        fail(exc)
    out.print("  " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in result.steps.items()), markup=False)
    if not result.started:
        out.print(f"Ready: start it with pg_ctl -D {result.data_dir} start (it recovers to {result.goal}, "
                  "then is promoted)", markup=False)
    elif result.promoted:
        out.print(f"Recovered and promoted: {result.stop_line or 'the end of the archive'}; last transaction "
                  f"replayed at {result.reached or 'unknown'}", markup=False)
    else:
        out.print(f"Standby running from {result.data_dir}", markup=False)
    return errors.EXIT_OK


def restore_on_worker(settings: Settings, entry, target: str, into: str | None, jobs: int, yes: bool,
                      node: str | None, timeout: float, with_globals: bool = False, force_older: bool = False) -> int:
    """Confirm here, have a worker restore (pgbeat.restore.on_worker), print how it ended; return the exit code."""
    from pgbeat.restore.on_worker import restore_on_worker as restore_there

    outcome = restore_there(settings, entry, target, into, jobs, node, timeout, confirm_restore(yes),
                            show=lambda line: out.print(f"  {line}", markup=False), with_globals=with_globals,
                            force_older=force_older)
    for line in outcome.lines:
        (out if outcome.exit_code == 0 else err).print(line, markup=False)
    return outcome.exit_code


@main.command()
@click.argument("source", type=TargetName())
@click.option("--onto", "onto_name", type=TargetName(), required=True,
              help="The target whose server receives the databases (its connection; its dbname is not used).")
@click.option("--tier", type=TierName(), help="Only this tier's backups (default: the newest of any logical tier).")
@click.option("--dry-run", is_flag=True, help="Show which backup rebuilds each database; restore nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True,
              help="pg_restore -j for custom/directory backups.")
@click.option("--identity", type=IdentityFile(),
              help="age identity file for encrypted backups (default: SOURCE's encryption.identity_file).")
@click.option("--force-older", is_flag=True,
              help="Restore into a server older than the pg_dump that made the backups.")
def rebuild(source: str, onto_name: str, tier: str | None, dry_run: bool, yes: bool, jobs: int,
            identity: Path | None, force_older: bool) -> None:
    """Rebuild the server of target SOURCE on the server of --onto, from the backups on this host: its
    globals (roles, memberships, role settings, tablespaces), then each database it had, from its newest
    verified logical backup, each restored as `pgbeat restore` does (checked, swapped in, safety backup)."""
    from pgbeat.catalog.manifest import PHYSICAL_TIERS
    from pgbeat.postgres.clock import ask_server_time
    from pgbeat.restore import rebuild as rebuilding
    from pgbeat.restore.restore import RestoreRefused, identities_for

    settings = settings_or_exit(writes=not dry_run)
    try:
        if tier in PHYSICAL_TIERS:
            raise errors.UsageError(f"--tier {tier} holds physical base backups: a rebuild restores logical ones",
                                    hint="rebuild a cluster from a base backup with pgbeat restore --pitr")
        # A whole-server target names its server as well as any of its databases' targets does.
        server, onto = (settings.servers.get(name) or settings.target(name) for name in (source, onto_name))
        rebuilding.refuse_same_server(server, onto)
        try:
            now = ask_server_time(onto)
        except PgbeatError:
            now = datetime.now(UTC)
        items = rebuilding.rebuild_plan(settings, server, tier, now)
    except PgbeatError as exc:
        fail(exc)
    where = f"{server.host or 'local socket'}:{server.port}"
    table = new_table(title=f"Rebuilding {where} onto {onto.describe()}")
    for column in ("database", "backup", "taken", "size", "globals"):
        table.add_column(column)
    for item in items:
        m = item.entry.manifest
        table.add_row(escape(item.database), escape(item.entry.path.name) if item.skip is None else "skipped",
                      local_time(settings, m.started_at), human_size(m.size),
                      ("yes" if m.globals is not None else "no") if item.skip is None else escape(item.skip))
    out.print(table)
    todo = [item for item in items if item.skip is None]
    if dry_run:
        out.line(f"dry run: {len(todo)} database(s) would be restored onto {onto.describe()}; nothing was changed")
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(RestoreRefused("Refusing to rebuild without confirmation: there is no terminal to ask on",
                                hint="type SIM at the prompt in a terminal, or pass --yes in scripts"))
        out.print(f"[bold red]ATENÇÃO / WARNING[/bold red]: this creates or OVERWRITES {len(todo)} database(s) on "
                  f"{escape(onto.describe())} (a safety backup of each one it replaces is taken first).", markup=True)
        answer = click.prompt("Digite SIM para confirmar / type SIM to confirm", default="", show_default=False)
        if answer.strip() != "SIM":
            fail(RestoreRefused("Rebuild cancelled: not confirmed", hint="type SIM to confirm, or pass --yes"))

    def on_step(step: str, state: str) -> None:
        if state not in ("done", "started"):
            out.print(f"    {step}: {state}", markup=False)

    report = rebuilding.rebuild(settings, items, onto, jobs=jobs, identities=identities_for(server, identity),
                                force_older=force_older, on_step=on_step,
                                on_item=lambda item: out.print(f"  {item.database} from {item.entry.path.name}",
                                                               markup=False))
    for outcome in report.outcomes:
        if outcome.error is None:
            result = outcome.result
            out.print(f"  [green]✓[/green] {escape(outcome.item.database)}: restored in {result.duration_s:.1f}s, "
                      f"{result.tables_checked} table(s) match", markup=True)
        else:
            err.print(f"  ✗ {outcome.item.database}: {outcome.error.render()}", markup=False, soft_wrap=True)
    done = len(report.outcomes) - len(report.failed)
    summary = f"Rebuilt {done} of {len(todo)} database(s) onto {onto.describe()}"
    if report.interrupted:
        err.print(f"{summary}; interrupted, the rest were not begun", markup=False)
        sys.exit(errors.EXIT_INTERRUPTED)
    if report.failed:
        err.print(f"{summary}; failed: {', '.join(o.item.database for o in report.failed)}", markup=False)
        sys.exit(max(o.error.exit_code for o in report.failed))
    out.print(summary, markup=False)


@main.command("fetch")
@click.argument("url", type=BackupURL())
@click.option("--to", "folder", type=LocalPath(folder=True), default=".", show_default=True,
              help="Where to put the backup and its manifest and .sha256 (a folder; created if missing).")
@click.option("--identity", type=IdentityFile(), help="Also decrypt-check an encrypted backup.")
def fetch_cmd(url: str, folder: Path, identity: Path | None) -> None:
    """Download a backup from a destination and verify it, without restoring it: only a copy that
    matches its manifest gets its names in the folder (a damaged one leaves nothing there)."""
    from pgbeat.crypt import load_identities

    settings = settings_or_exit(writes=bool(identity))  # its plaintext is checked in BACKUP_ROOT/.work
    try:
        entry = actions.fetch_into(settings, url, folder, load_identities(identity) if identity else None)
    except PgbeatError as exc:
        fail(exc)
    out.print(f"Fetched and verified {entry.path} ({human_size(entry.manifest.size)})", markup=False)


@main.command()
@click.option("--retry", is_flag=True, required=True, help="Complete the off-site copies that are missing or failed.")
@click.option("--target", "target_name", type=TargetName(), help="Only this target.")
@click.option("--destination", type=DestinationName(), help="Only this destination.")
def upload(retry: bool, target_name: str | None, destination: str | None) -> None:
    """Copy local backups to the destinations where their copy is missing or failed (no new dump)."""
    settings = settings_or_exit(writes=True)
    failures = actions.retry_uploads(settings, selected_targets(settings, target_name), destination)
    for line in failures:
        err.print(f"✗ {line}", markup=False)
    out.print("All copies are complete." if not failures else f"{len(failures)} copy(ies) still failing.",
              markup=False)
    sys.exit(errors.EXIT_FAILED if failures else 0)


@main.command()
@click.option("--target", "target_name", type=TargetName(), help="Drill only this target (default: every target).")
@click.option("--pitr", is_flag=True, help="Drill the newest base backup with the WAL archive: recover it in a "
                                           "scratch cluster to the end of the archive, then check it.")
@click.option("--server-pgbeat", type=LocalPath(must_exist=True),
              help="With --pitr: the pgbeat the scratch server's restore_command runs (as the server's user; "
                   "default: the target's drill.server_pgbeat).")
@click.option("--timeout", type=Seconds(), default=3600, show_default=True, help="With --pitr: seconds for recovery.")
def drill(target_name: str | None, pitr: bool, server_pgbeat: Path | None, timeout: float) -> None:
    """Restore the latest backup of each target into a scratch database now and check it."""
    settings = settings_or_exit(writes=True)
    names = selected_targets(settings, target_name)
    if pitr:
        from pgbeat.physical.drill import run_pitr_drill

        if target_name is None:  # the targets with base backups
            names = [name for name in names if settings.target(name).tiers["base"].enabled]
        def server_side(name: str) -> str | None:  # the option, else the target's drill.server_pgbeat
            chosen = server_pgbeat or settings.target(name).drill.server_pgbeat
            return str(chosen) if chosen else None

        results = (run_pitr_drill(settings, name, pgbeat=server_side(name), timeout=timeout) for name in names)
        sys.exit(print_drills(results))
    elif server_pgbeat is not None:
        fail(errors.UsageError("--server-pgbeat is for --pitr drills", hint="add --pitr, or leave it out"))
    if target_name is None:  # every target whose drills are enabled; --target drills a disabled one on request
        for name in names:
            if not settings.target(name).drill.enabled:
                out.print(f"{name}: drills disabled (drill.enabled: false), skipped", markup=False)
        names = [name for name in names if settings.target(name).drill.enabled]
    # A drill stopped by a signal raises (recorded, its scratch database dropped): PgbeatGroup says so.
    sys.exit(print_drills(actions.drills(settings, names)))


def print_drills(results) -> int:
    """Print each drill (pgbeat.restore.drill.DrillResult) as it ends; return the exit code."""
    failed = 0
    for result in results:
        mark = "[red]FAILED[/red]"
        if result.passed:
            mark = "[yellow]passed, but proved little[/yellow]" if result.warnings else "[green]passed[/green]"
        out.print(f"{result.target}: drill {mark} on {result.backup or '-'} in {result.duration_s:.1f}s "
                  f"(restore {result.restore_s or 0:.1f}s)", markup=True)
        for line in result.checks:
            out.print(f"  ✓ {line}", markup=False)
        for line in result.problems:
            out.print(f"  ✗ {line}", markup=False)
        print_warnings(result.warnings)
        failed += not result.passed
    return errors.EXIT_FAILED if failed else 0


# --- WAL archiving -----------------------------------------------------------------------------------


@main.command("wal-push")
@click.argument("wal_file", type=LocalPath(must_exist=True))
@click.option("--target", "target_name", type=TargetName(), required=True, help="The target whose WAL this is.")
@click.option("--no-ahead", is_flag=True, help="Archive only WAL_FILE, not the other files marked ready.")
def wal_push(wal_file: Path, target_name: str, no_ahead: bool) -> None:
    """Archive one WAL file: archive_command = 'pgbeat wal-push %p --target NAME'.

    Exit 0 only once the file is fsync'ed in BACKUP_ROOT/wal/NAME and copied and checked at every
    destination of the target; the same file again is a success, other content under its name a failure.
    """
    from pgbeat.wal.archive import push

    # Only BACKUP_ROOT/wal need be the postgres user's (README): a folder it cannot write is named by the push.
    settings = settings_or_exit(recover=False)
    result = push(settings, settings.target(target_name), wal_file, ahead=not no_ahead)
    if result.error is not None:
        fail(result.error)


@main.command("wal-fetch")
@click.argument("wal_name", type=WalFileName())
@click.argument("dest", type=LocalPath(writable_file=True))
@click.option("--target", "target_name", type=TargetName(), required=True, help="The target whose WAL this is.")
def wal_fetch(wal_name: str, dest: Path, target_name: str) -> None:
    """Fetch one WAL file: restore_command = 'pgbeat wal-fetch %f %p --target NAME'.

    From the local archive, else each destination in order; checked against its SHA-256, written to DEST
    atomically. Exit 1 when the archive has no such file (the normal end of recovery), 128 when it could
    not be read (damaged, a destination down), so that PostgreSQL stops rather than end recovery early.
    """
    from pgbeat.settings import get_settings
    from pgbeat.wal.archive import EXIT_FETCH_FAILED, WalMissing, fetch

    # Any failure but "not in the archive" exits above 125: for PostgreSQL, 1 to 125 end recovery.
    try:
        settings = get_settings()
        fetch(settings, settings.target(target_name), wal_name, dest)
    except WalMissing as exc:
        fail(exc)
    except PgbeatError as exc:
        err.print(exc.render(), markup=False)
        sys.exit(EXIT_FETCH_FAILED)
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        err.print(without_credentials(f"pgbeat wal-fetch failed unexpectedly: {type(exc).__name__}: {exc}"),
                  markup=False)
        sys.exit(EXIT_FETCH_FAILED)


@main.command("receive")
@click.option("--target", "target_name", type=TargetName(), help="Only this target (default: every target with "
                                                                  "wal.receiver).")
def receive_cmd(target_name: str | None) -> None:
    """Stream the WAL of the targets with wal.receiver (pg_receivewal) and archive it, in the foreground.

    One receiver per target across the fleet holds a Redis lease; the others wait to take over. The
    worker runs the same in a thread; this command is for a host without one. Ctrl-C or SIGTERM stops it.
    """
    import signal

    from pgbeat.wal.receiver import receiver_targets, run_receivers

    settings = settings_or_exit(writes=True)
    if settings.broker_url is None:
        fail(errors.UsageError("pgbeat receive needs the broker's Redis (broker_url) for its lease",
                               hint="one receiver per target across the fleet is kept by a Redis lease"))
    if target_name is not None:
        settings.target(target_name)  # an unknown name is said as everywhere else
    targets = receiver_targets(settings, target_name)
    if not targets:
        fail(errors.UsageError(f"{target_name} does not have wal.receiver set" if target_name
                               else "no target has wal.receiver set",
                               hint="set `wal: {receiver: true}` on the target (README, WAL receiver)"))
    stop = threading.Event()
    # SIGTERM (systemd, kill) stops as Ctrl-C does: pg_receivewal stopped, the lease released.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = run_receivers(settings, targets, stop)
    err.print(f"pgbeat receive: {', '.join(t.name for t in targets)} on {settings.node}", markup=False)
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        stop.set()
    for thread in threads:
        thread.join(timeout=30)
    err.print("pgbeat receive: stopped", markup=False)


@main.command("check")
@click.option("--target", "target_name", type=TargetName(), required=True, help="The target to check.")
@click.option("--timeout", type=Seconds(), default=60, show_default=True,
              help="Seconds to wait for the segment to reach the archive.")
def check_cmd(target_name: str, timeout: float) -> None:
    """Check WAL archiving: force a segment switch on the target and wait for it in the archive."""
    from pgbeat.wal.check import check_archiving

    settings = settings_or_exit()
    result = check_archiving(settings, settings.target(target_name), timeout)
    out.print(f"OK {target_name}: {result.segment} archived ({result.where}) in {result.seconds:.1f}s",
              markup=False)


# --- status, metrics, cron ---------------------------------------------------------------------------


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def success_text(settings: Settings, t) -> str:
    """The "last success" cell: its age, or "never" with the first due time (monitoring.status.TierStatus)."""
    if not t.never:
        return age_text(t.age_s)
    return f"never ({'was due' if t.overdue else 'first due'} {local_time(settings, t.first_due_at, seconds=False)})"


def archiving_text(settings: Settings, a) -> str:
    """The "archiving" line of a target with the base tier (monitoring.status.ArchivingStatus), in rich
    markup: the lag, the last success, the last failure (red while archiving is failing), or, in one line,
    why the server could not be read."""
    if not a.reachable:
        return f"[red]server not reachable[/red]: {escape(a.error or 'no reason given')}"
    if a.archive_mode == "off":
        return "[red]archive_mode is off[/red] on the server: no WAL reaches the archive"
    if a.standby:
        lag = "standby (no WAL file of its own to compare with)"
    elif a.lag_segments is None:
        lag = f"[yellow]lag unknown[/yellow] (server at {a.current_wal}, the archive here holds " \
              f"{a.newest_archived or 'nothing'})"
    else:
        color = "green" if a.lag_segments <= 1 else "yellow"
        lag = f"[{color}]{a.lag_segments} segment(s) behind[/{color}] (server at {a.current_wal})"
    archived = (f"last archived {a.last_archived_wal} {age_text(a.lag_seconds)}" if a.last_archived_wal
                else "nothing archived since the statistics were reset")
    if a.last_failed_wal is None:
        failed = "no failure"
    else:
        last = f"{a.last_failed_wal} at {local_time(settings, a.last_failed_at)}"
        failed = (f"[red]failing: last failed {last}[/red]" if a.failing else f"last failed {last}") \
            + f" ({a.failed_count} failure(s))"
    return f"{lag}; {archived}; {failed}"


def receiver_text(settings: Settings, r) -> str:
    """The "receiver" line of a target with wal.receiver (pgbeat.wal.receiver.ReceiverStatus), in rich markup."""
    if r.error:
        return f"[yellow]unknown[/yellow]: {escape(r.error)}"
    last = (f"last archived {r.last_segment} at {local_time(settings, r.last_at)}" if r.last_segment
            else "nothing archived yet")
    if r.holder is None:
        return f"[red]no host streams[/red] (the slot keeps the WAL on the server); {last}"
    since = f" since {local_time(settings, r.since)}" if r.since else ""
    return f"[green]streaming on {escape(r.holder)}[/green]{since}; {last}"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(as_json: bool) -> None:
    """Per target and tier: last success (red when overdue), size, duration, copies, next run; disk use."""
    from pgbeat.monitoring.status import build_status

    settings = settings_or_exit()
    report = build_status(settings, datetime.now(UTC))
    if not settings.embedded:
        report.runs = run_overview(settings)
    if as_json:
        out.print_json(report.as_json())
        return
    table = new_table(title=f"pgbeat status ({settings.backup_root})")
    for column in ("target", "tier", "last success", "size", "duration", "copies (kept)", "last attempt", "next run"):
        table.add_column(column)
    for t in report.tiers:
        color = "red" if t.overdue else "yellow" if t.never else "green"
        attempt = t.last_attempt or {}
        attempt_text = attempt.get("status", "-")
        if attempt.get("status") == "failure":
            attempt_text = f"[red]failed at {attempt.get('step')}[/red]"
        warning = " [yellow]⚠ size[/yellow]" if t.size_anomaly else ""
        warning += " [yellow]⚠ dated in the future[/yellow]" if t.future else ""
        table.add_row(escape(target_label(t.target)), t.tier,
                      f"[{color}]{success_text(settings, t)}[/{color}]{warning}",
                      human_size(t.size) if t.size is not None else "-",
                      f"{t.duration_s:.1f}s" if t.duration_s else "-",
                      ", ".join(f"{d} ({n})" for d, n in sorted(t.kept.items())) or "-", attempt_text,
                      local_time(settings, t.next_run))
    out.print(table)
    for t in report.tiers:
        for line in t.warnings[-1:] if t.future else []:  # the future-dated warning comes last
            out.print(f"warning: {t.target} {t.tier}: {line}", markup=False)
    for d in report.drills:
        color = "red" if d.status != "passed" else "yellow" if d.warnings else "green"
        shown = f"{d.status}, but proved little" if d.status == "passed" and d.warnings else d.status
        out.print(f"drill {d.target}: [{color}]{shown}[/{color}] {local_time(settings, d.at)} on {d.backup} "
                  f"({d.duration_s:.1f}s)", markup=True)
    for never in report.never_drilled:
        color = "red" if never.overdue else "yellow"
        due = "was due" if never.overdue else "first due"
        out.print(f"drill {never.target}: [{color}]never[/{color}] ({due} {local_time(settings, never.first_due_at)})",
                  markup=True)
    for w in report.wal:
        window = (f"{local_time(settings, w.window_start) if w.window_start else '?'} to "
                  f"{local_time(settings, w.window_end) if w.window_end else '?'}")
        timelines = f", timelines {'->'.join(map(str, w.timelines))}" if len(w.timelines) > 1 else ""
        if w.gap_count:
            out.print(f"wal {escape(w.target)}: [red]{w.gap_count} segment(s) missing[/red] from {w.gaps[0]}: "
                      f"restorable {window} only (the archive holds up to {w.newest_segment})", markup=True)
        elif not w.base_backups:
            out.print(f"wal {escape(w.target)}: [yellow]no base backup yet[/yellow]: nothing is restorable "
                      f"(the archive holds up to {w.newest_segment or 'nothing'})", markup=True)
        else:
            out.print(f"wal {escape(w.target)}: [green]restorable {window}[/green] ({w.segments} segment(s) up to "
                      f"{w.end_segment}{timelines})", markup=True)
        if w.receiver is not None:
            out.print(f"receiver {escape(w.target)}: {receiver_text(settings, w.receiver)}", markup=True)
        # A receiver streams the WAL: archive_mode is rightly off then, and pg_stat_archiver says nothing.
        if w.archiving is not None and not (settings.target(w.target).wal.receiver and w.archiving.reachable):
            out.print(f"archiving {escape(w.target)}: {archiving_text(settings, w.archiving)}", markup=True)
    for server, seen in report.servers.items():
        when = local_time(settings, datetime.fromisoformat(seen["discovered_at"])) if seen["discovered_at"] else None
        out.print(f"{server} (databases: all): " + (f"{len(seen['databases'])} database(s) at its last run ({when})"
                                                     if when else "no run yet"), markup=False)
        print_warnings(seen["warnings"])
    if report.orphans:
        out.line("not in the configuration (rotated by `defaults` at `pgbeat rotate` unless pinned; "
                 "`pgbeat list --orphans`): "
                 + ", ".join(f"{name} ({count} backups)" for name, count in report.orphans.items()))
    out.print(f"BACKUP_ROOT uses {human_size(report.used)}; {human_size(report.disk_free)} free of "
              f"{human_size(report.disk_total)} ({100 * report.disk_free / max(report.disk_total, 1):.0f}%)",
              markup=False)
    for kind in ("queued", "running", "stuck"):
        if report.runs.get(kind):
            out.print(f"{kind}: " + ", ".join(f"{r['target']}/{r['tier']} ({r['run_id'][:8]})"
                                               for r in report.runs[kind]), markup=False)
    for queue, waiting in sorted(report.runs.get("queue_lengths", {}).items()):
        out.print(f"queue {queue}: {waiting} message(s) waiting for a worker", markup=False)


def run_overview(settings: Settings) -> dict:
    """Queued, running and stuck runs from Redis (empty when the broker cannot be reached)."""
    from pgbeat.coordination import redis_client
    from pgbeat.coordination.dispatch import broker_problem, queued_messages
    from pgbeat.coordination.runs import NodeRegistry, RunState

    problem = broker_problem(settings)
    if problem is not None:
        err.print(f"cannot read run states from the broker: {problem}", markup=False)
        return {}
    try:
        client = redis_client(settings)
        messages, lengths = queued_messages(settings)
        return RunState(client).overview(settings.reliability.lock_ttl, NodeRegistry(client).alive_nodes(),
                                         messages, lengths)
    except Exception as exc:  # status must still show the shelf when Redis is down
        err.print(f"cannot read run states from the broker: {type(exc).__name__}", markup=False)
        return {}


@main.command()
@click.option("--listen", type=Listen(), help="host:port (default: monitoring.metrics_listen, 127.0.0.1:9810).")
def metrics(listen: str | None) -> None:
    """Serve Prometheus metrics computed from the catalog on /metrics."""
    from pgbeat.monitoring.metrics import serve

    settings = settings_or_exit()
    runs = None if settings.embedded else (lambda: run_overview(settings))
    serve(settings, listen or settings.monitoring.metrics_listen, runs)


@main.group()
def cron() -> None:
    """Schedule backups with cron on a single machine without Redis (the seed's setup_cron.sh)."""


@cron.command("install")
@click.option("--file", "file", type=CrontabFile(), help="Edit this crontab file (e.g. /etc/cron.d/"
              "pgbeat) instead of the user's crontab.")
@click.option("--user", type=UnixUser(), help="With --file in /etc/cron.d: the user the jobs run as.")
def cron_install(file: Path | None, user: str | None) -> None:
    """Write one crontab line per tier (daily 02:00, weekly Sunday 03:00, monthly day 1 04:00 by default)."""
    from pgbeat import cron as crontab
    from pgbeat.settings import host_timezone

    settings = settings_or_exit()
    env = {k: os.environ[k] for k in ("PGBEAT_CONFIG", "BACKUP_ROOT") if os.environ.get(k)}
    try:
        lines = crontab.install(settings, file, Path.cwd(), env, user)
    except PgbeatError as exc:
        fail(exc)
    where = file or "the crontab"
    jobs = [line for line in lines if not line.startswith("CRON_TZ=")]
    out.print(f"Installed {len(jobs)} line(s) in {where}, their times in pgbeat's time zone {settings.timezone} "
              f"(CRON_TZ={settings.timezone}):", markup=False)
    for line in lines:
        out.print(f"  {line}", markup=False)
    system = host_timezone()
    if not crontab.same_zone(system, settings.timezone):
        err.print(f"warning: the system's time zone is {system}: a cron without CRON_TZ (Debian's `cron` "
                  f"package) runs these lines at {system} times; use cronie, or set timezone: {system} in "
                  "pgbeat's config", markup=False)


@cron.command("remove")
@click.option("--file", "file", type=CrontabFile(), help="The crontab file given to install.")
def cron_remove(file: Path | None) -> None:
    """Remove the lines `pgbeat cron install` wrote; leave everything else."""
    from pgbeat import cron as crontab

    try:
        crontab.remove(file)
    except PgbeatError as exc:
        fail(exc)
    out.print(f"Removed pgbeat's lines from {file or 'the crontab'}", markup=False)


# --- config ------------------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@click.option("--no-connect", is_flag=True, help="Validate only; do not connect to the targets.")
def config_check(no_connect: bool) -> None:
    """Validate the configuration, test each target's connection, show targets and their next runs."""
    from pgbeat.schedule import next_runs

    settings = settings_or_exit(writes=True)  # reports a BACKUP_ROOT that backups could not be written to
    now = datetime.now(UTC)
    servers = f" and {len(settings.servers)} whole-server target(s)" if settings.servers else ""
    out.print(f"Configuration OK ({len(settings.targets)} target(s){servers}); BACKUP_ROOT {settings.backup_root}; "
              f"time zone {settings.timezone}; "
              f"{'embedded (no broker)' if settings.embedded else 'Celery with a broker'}", markup=False)
    table = new_table()
    for column in ("target", "database", "format", "tier", "schedule", "keep", "next run"):
        table.add_column(column)
    for target in settings.configured():
        for tier in target.enabled_tiers():
            policy = target.tiers[tier]
            upcoming = next_runs(policy.schedule, now, settings.tz)[0]
            table.add_row(target.name, target.describe(), f"{target.format}/{target.compression.codec}", tier,
                          policy.schedule, f"{policy.keep_days}d (min {policy.min_keep})",
                          upcoming.strftime("%Y-%m-%d %H:%M %Z"))
    out.print(table)
    warning = settings.reliability.redelivery_warning()
    if warning:
        out.print(f"[yellow]warning[/yellow]: {warning}", markup=True)
    if no_connect:
        return
    from pgbeat.checks import run_checks

    failed = unreachable = False
    for check in run_checks(settings):
        if check.ok:
            out.print(f"  [green]✓[/green] {escape(check.subject)}: {escape(check.what)}: {escape(check.detail)}",
                      markup=True)
        elif check.warning:
            out.print(f"  [yellow]![/yellow] {escape(check.subject)}: {escape(check.what)}: {escape(check.problem)}",
                      markup=True)
        else:
            failed, unreachable = True, unreachable or check.unreachable
            out.print(f"  [red]✗[/red] {escape(check.subject)}: {escape(check.what)}: {escape(check.problem)}",
                      markup=True)
    sys.exit(errors.EXIT_UNREACHABLE if unreachable else errors.EXIT_FAILED if failed else 0)


@config.command("example")
def config_example() -> None:
    """Print a targets file with every key, its description and its default (deploy/pgbeat.example.yaml)."""
    from pgbeat.settings.example import example_config

    click.echo(example_config(), nl=False)


if __name__ == "__main__":
    main()
