"""`pgbeat cron install|remove`: the seed's `setup_cron.sh` for a single machine without Redis.

The lines live in a marked block, so installing twice changes nothing and removing takes out only what
pgbeat wrote. Without `--file` the user's crontab is edited through `crontab -l` / `crontab -`.

The schedules are pgbeat's, in pgbeat's configured time zone, so the block starts with `CRON_TZ=<zone>`
rather than leaving cron to read them in the system's zone. cronie (and other crons with CRON_TZ) honour
it; Debian's `cron` package (3.0pl1) does not (it passes it to the jobs as a variable and fires in the
system's zone), which is why install says which zone the system has when the two differ. CRON_TZ holds
for the lines after it, so the block ends by setting the system's zone back for lines added below it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from pgbeat.errors import PgbeatError
from pgbeat.fsutil import write_atomic
from pgbeat.settings import Settings, host_timezone

BEGIN = "# BEGIN pgbeat (managed by `pgbeat cron install`; edit the schedules in pgbeat's config)"
END = "# END pgbeat"


def cron_lines(settings: Settings, workdir: Path, pgbeat: str, env: dict[str, str],
               user: str | None = None) -> list[str]:
    """One line per tier, or one per target of a tier whose targets do not all share one schedule."""
    prefix = f"cd {shlex.quote(str(workdir))} && " + "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(env.items()))
    log = shlex.quote(str(settings.backup_root / "logs" / "cron.log"))
    who = f" {user}" if user else ""  # /etc/cron.d lines name the user
    lines = []
    for tier in settings.tier_names():
        schedules = {t.name: t.tiers[tier].schedule for t in settings.configured() if t.runs_tier(tier)}
        if not schedules:
            continue
        if len(set(schedules.values())) == 1:
            runs = [(next(iter(schedules.values())), "")]
        else:
            runs = [(schedule, f" --target {shlex.quote(name)}") for name, schedule in sorted(schedules.items())]
        lines += [f"{schedule}{who} {prefix}{shlex.quote(pgbeat)} backup {tier}{target} >> {log} 2>&1"
                  for schedule, target in runs]
    system = host_timezone()
    reset = [] if same_zone(system, settings.timezone) else [f"CRON_TZ={system}"]
    return [f"CRON_TZ={settings.timezone}", *lines, *reset]


def same_zone(a: str, b: str) -> bool:
    """True when zones `a` and `b` keep the same time (UTC and Etc/UTC), judged over the next two years."""
    if a == b:
        return True
    za, zb = ZoneInfo(a), ZoneInfo(b)
    start = datetime.now(UTC)
    return all((start + timedelta(days=d)).astimezone(za).utcoffset() == (start + timedelta(days=d)).astimezone(
        zb).utcoffset() for d in range(0, 730, 3))


def replace_block(text: str, lines: list[str]) -> str:
    """Return crontab `text` with pgbeat's block replaced by `lines` (removed when `lines` is empty)."""
    kept, inside = [], False
    for line in text.splitlines():
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END and inside:
            inside = False
        elif not inside:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    block = [BEGIN, *lines, END] if lines else []
    out = [*kept, *([""] if kept and block else []), *block]
    return "\n".join(out) + "\n" if out else ""


def read_crontab(file: Path | None) -> str:
    if file is not None:
        return file.read_text() if file.exists() else ""
    crontab = shutil.which("crontab")
    if crontab is None:
        raise PgbeatError("crontab not found", hint="install cron (apt-get install cron) or pass --file")
    result = subprocess.run([crontab, "-l"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""  # "no crontab for user" is an empty crontab


def write_crontab(file: Path | None, text: str) -> None:
    if file is not None:
        write_atomic(file, text.encode())
        file.chmod(0o644)  # cron reads /etc/cron.d files as root; they must not be group/world writable
        return
    result = subprocess.run([shutil.which("crontab") or "crontab", "-"], input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise PgbeatError(f"crontab refused the new table: {result.stderr.strip()}")


def install(settings: Settings, file: Path | None, workdir: Path, env: dict[str, str], user: str | None) -> list[str]:
    pgbeat = str(Path(sys.argv[0]).resolve()) if Path(sys.argv[0]).name == "pgbeat" else shutil.which("pgbeat")
    lines = cron_lines(settings, workdir, pgbeat or "pgbeat", env, user)
    write_crontab(file, replace_block(read_crontab(file), lines))
    return lines


def remove(file: Path | None) -> None:
    write_crontab(file, replace_block(read_crontab(file), []))
