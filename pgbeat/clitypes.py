"""The typed values of the `pgbeat` command line.

Every option and argument of every command has one of these types (or a click Choice, a number range
or a flag; tests/integration/test_cli_matrix.py walks the command tree and proves it), so a bad value is
a usage error, exit 2, with one message naming the option, before anything is read or changed:

- an empty or blank value never means "unset, use the default" (`--into ""` used to restore over the
  target's own database): leaving the option out says that;
- no control characters, no NUL, nothing longer than the thing it names can be;
- no value that starts with '-': `--into --yes` is a slip (an option where a value belongs), not a
  database called "--yes" (write `./-x` for such a file);
- names follow the configuration's own rules (settings.validate_*): one definition of each.
"""

from __future__ import annotations

import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from pgbeat.settings import (
    parse_listen,
    validate_database_name,
    validate_node_name,
    validate_not_blank,
    validate_target_name,
    validate_tier_name,
)

# --now: a preview may look decades ahead or back, not to the year 1 (where `now - keep_days` overflows).
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(3000, 1, 1, tzinfo=UTC)
MAX_TIMEOUT_S = 30 * 86_400
PATH_MAX = 4096  # Linux: longer paths (or components over NAME_MAX) fail with ENAMETOOLONG
NAME_MAX = 255
URL_SCHEMES = ("s3", "gs", "gcs", "ssh")


def shown(value: str, limit: int = 60) -> str:
    """The value as quoted in a message: repr (control characters visible), cut when long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...' ({len(value)} characters)"


class CheckedText(click.ParamType):
    """A value that names something: never blank, no control characters, not option-like, bounded.

    Subclasses set `name` (what the value is, for messages) and refine `check`, which returns the
    converted value or raises ValueError with what is wrong.
    """

    name = "text"
    max_length = 1024

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default, already typed
            value = str(value)
        try:
            self.check_text(value)
            return self.check(value)
        except ValueError as exc:
            self.fail(f"{shown(value)} is not a valid {self.name}: {exc}", param, ctx)

    def check_text(self, value: str) -> None:
        validate_not_blank(value, "the option")  # blank, control characters (NUL among them)
        if value.startswith("-"):
            raise ValueError("it starts with '-' (an option where a value belongs?)")
        if len(value) > self.max_length:
            raise ValueError(f"longer than {self.max_length} characters")

    def check(self, value: str) -> Any:
        return value


def configured_names(kind: str, incomplete: str) -> list:
    """Shell completion: the configured targets' (tiers', destinations') names that start with `incomplete`;
    none when the configuration cannot be read (a completion must never print an error)."""
    from click.shell_completion import CompletionItem

    try:
        from pgbeat.settings import get_settings

        settings = get_settings()
    except Exception:
        return []
    if kind == "target":
        names = set(settings.targets) | set(settings.servers)
    elif kind == "tier":
        names = set(settings.tier_names())
    else:
        names = {d.name for target in settings.configured() for d in target.destinations}
    return [CompletionItem(name) for name in sorted(names) if name.startswith(incomplete)]


class TargetName(CheckedText):
    name = "target name"

    def check(self, value: str) -> str:
        return validate_target_name(value)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        return configured_names("target", incomplete)


class TierName(CheckedText):
    """A tier's name as the config's rules allow it; whether it is configured is the command's to say
    (`list --tier` also lists a tier no longer configured)."""

    name = "tier"

    def check(self, value: str) -> str:
        return validate_tier_name(value)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        return configured_names("tier", incomplete)


class WalFileName(CheckedText):
    """A WAL file's name as PostgreSQL passes it (%f): a segment, its .partial or .backup file, a .history."""

    name = "WAL file name"
    max_length = 64

    def check(self, value: str) -> str:
        from pgbeat.wal.archive import WAL_NAME

        if not WAL_NAME.fullmatch(value):
            raise ValueError("a segment (24 hex digits), its .partial or .backup file, or a timeline's .history")
        return value


class DestinationName(CheckedText):
    name = "destination name"

    def check(self, value: str) -> str:
        return validate_target_name(value)  # destinations follow the targets' naming rule (settings)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        return configured_names("destination", incomplete)


class DatabaseName(CheckedText):
    name = "database name"

    def check(self, value: str) -> str:
        return validate_database_name(value)


class NodeName(CheckedText):
    name = "node name"

    def check(self, value: str) -> str:
        return validate_node_name(value)


class UnixUser(CheckedText):
    """A login name for /etc/cron.d lines: a newline there would be a crontab line of its own."""

    name = "user name"
    max_length = 32

    def check(self, value: str) -> str:
        if not value.isascii() or not (value[0].isalpha() or value[0] == "_") or not all(
                c.isalnum() or c in "._-" for c in value):
            raise ValueError("must be a login name (letters, digits, '.', '_', '-', starting with a letter)")
        return value


class LocalPath(CheckedText):
    """A path on this machine, with what it must be: an existing file, folder, or a file to write."""

    name = "path"
    max_length = PATH_MAX

    def __init__(self, *, must_exist: bool = False, folder: bool = False, writable_file: bool = False) -> None:
        self.must_exist = must_exist
        self.folder = folder
        self.writable_file = writable_file

    def check(self, value: str) -> Path:
        path = Path(value).expanduser()
        if any(len(part.encode()) > NAME_MAX for part in path.parts):
            raise ValueError(f"a part of it is longer than {NAME_MAX} bytes")
        if self.must_exist and not path.exists():
            raise ValueError("no such file or folder")
        if self.folder:  # an existing folder, or one that can be made (no file in the way)
            existing = path
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise ValueError("not a folder" if existing == path else f"{existing} is not a folder")
        if self.must_exist and not self.folder and not path.is_file():
            raise ValueError("not a regular file")
        if self.writable_file:
            if path.is_dir():
                raise ValueError("it is a folder; give a file")
            if not path.parent.is_dir():
                raise ValueError(f"its folder {path.parent} does not exist")
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise ValueError(f"its folder {path.parent} is not writable")
        return path


class CrontabFile(LocalPath):
    """A crontab file to edit (`cron --file`): new, or one whose lines are all crontab lines, so that a
    slip (`--file /etc/passwd`) is refused instead of rewritten."""

    name = "crontab file"
    max_bytes = 1 << 20

    def __init__(self) -> None:
        super().__init__(writable_file=True)

    def check(self, value: str) -> Path:
        path = super().check(value)
        if not path.exists():
            return path
        if not path.is_file():
            raise ValueError("not a regular file")
        with path.open("rb") as f:
            raw = f.read(self.max_bytes + 1)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("it is not a text file, so not a crontab") from None
        if len(raw) > self.max_bytes:
            raise ValueError("it is too large to be a crontab")
        for number, line in enumerate(text.splitlines(), 1):
            if not crontab_line(line):
                raise ValueError(f"it is not a crontab (line {number} is neither a schedule, a variable nor "
                                 "a comment)")
        return path


def crontab_line(line: str) -> bool:
    """True for a line a crontab may hold: blank, a comment, NAME=value, @reboot-style or 5 time fields
    and a command (optionally a user, for /etc/cron.d)."""
    line = line.strip()
    if not line or line.startswith("#") or line.startswith("@"):
        return True
    name, equals, _ = line.partition("=")
    if equals and name.strip().replace("_", "").isalnum():
        return True
    fields = line.split()
    return len(fields) >= 6 and all(field and set(field) <= CRON_CHARACTERS for field in fields[:5])


CRON_CHARACTERS = set("0123456789*,/-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class IdentityFile(LocalPath):
    """An age identity file: read and parsed now, so a wrong file is refused before anything starts."""

    name = "age identity file"

    def __init__(self) -> None:
        super().__init__(must_exist=True)

    def check(self, value: str) -> Path:
        from pgbeat.crypt import load_identities
        from pgbeat.errors import PgbeatError

        path = super().check(value)
        try:
            load_identities(path)
        except PgbeatError as exc:
            raise ValueError(exc.message) from None
        except (UnicodeDecodeError, ValueError):
            raise ValueError("it is not a text file of age identities (AGE-SECRET-KEY-...)") from None
        return path


class BackupURL(CheckedText):
    """A copy at a destination: s3://bucket/key, gs://bucket/key or ssh://user@host[:port]/path."""

    name = "backup address"
    max_length = PATH_MAX

    def check(self, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in URL_SCHEMES or not parsed.netloc or parsed.path.strip("/") == "":
            raise ValueError("use s3://bucket/..., gs://bucket/... or ssh://user@host:port/path/...")
        if any(c.isspace() for c in value):
            raise ValueError("an address holds no spaces")
        try:
            parsed.port  # noqa: B018 - raises for a port that is not a number in range
        except ValueError:
            raise ValueError("its port must be a number from 1 to 65535") from None
        return value


class BackupLocation(CheckedText):
    """`restore`'s and `verify`'s FILE: a backup file on this machine or a copy at a destination (s3://,
    gs://, ssh://); whether it is a backup is theirs to say, with its own exit code."""

    name = "backup file or address"
    max_length = PATH_MAX

    def check(self, value: str) -> str:
        if "://" in value:
            return BackupURL().check(value)
        LocalPath().check(value)
        return value


class Listen(CheckedText):
    name = "host:port"

    def check(self, value: str) -> str:
        parse_listen(value)  # the configuration's monitoring.metrics_listen is read by the same function
        return value


class IsoTime(CheckedText):
    name = "ISO 8601 time"

    def check(self, value: str) -> datetime:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("use e.g. 2025-11-19T02:00:00 or 2025-11-19T02:00:00-03:00") from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        if not EARLIEST_TIME <= when < LATEST_TIME:
            raise ValueError(f"must lie between {EARLIEST_TIME:%Y-%m-%d} and {LATEST_TIME:%Y-%m-%d}")
        return when


class Seconds(click.FloatRange):
    """A duration in seconds: positive, finite (click's FloatRange lets nan through), at most 30 days."""

    name = "seconds"

    def __init__(self) -> None:
        super().__init__(min=0, max=MAX_TIMEOUT_S, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{shown(str(value))} is not a number of seconds", param, ctx)
        return number


class RecoveryTime(CheckedText):
    """Where a point-in-time recovery stops: `latest`, `immediate`, or a time (naive: in the configured
    zone, applied by the command, which knows the settings)."""

    name = "recovery target"

    def check(self, value: str) -> str | datetime:
        if value in ("latest", "immediate"):
            return value
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("use latest, immediate, or e.g. '2025-11-19 14:30:00' or "
                             "'2025-11-19 14:30:00-03:00'") from None
        if not EARLIEST_TIME <= (when if when.tzinfo else when.replace(tzinfo=UTC)) < LATEST_TIME:
            raise ValueError(f"must lie between {EARLIEST_TIME:%Y-%m-%d} and {LATEST_TIME:%Y-%m-%d}")
        return when


class Lsn(CheckedText):
    name = "LSN"

    def check(self, value: str) -> str:
        if not re.match(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", value):
            raise ValueError("an LSN looks like 0/3000060 (as pg_current_wal_lsn() shows it)")
        return value.upper()


class Timeline(CheckedText):
    name = "timeline"

    def check(self, value: str) -> str:
        if value not in ("latest", "current") and not (value.isdigit() and 0 < int(value) < 2**32):
            raise ValueError("latest, current or a timeline number")
        return value
