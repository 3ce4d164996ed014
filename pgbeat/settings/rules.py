"""The configuration's rules that need no pydantic: the tiers and steps, the limits, and the checks of
names and values shared by every model of the schema (pgbeat.settings.fields wraps them as field types).

Plain Python on purpose: the command line checks its arguments with these same functions
(pgbeat/clitypes.py), and `pgbeat --help` must not pay for importing pydantic to do so.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import Any, Literal

# The built-in tiers, always configured (each with its schedule and retention in schema.DEFAULT_TIERS); a
# config may add its own (`hourly`, `quarterly`...), each with a schedule and a retention of its own.
TIERS = ("daily", "weekly", "monthly", "base")
# The tiers whose backups are physical (a base backup of the whole cluster, for PITR), not pg_dump's.
PHYSICAL_TIERS = ("base",)
# A tier's name is a folder under BACKUP_ROOT and a part of every backup's file name,
# `<target>_backup_<tier>_<stamp>`: lower-case letters and digits only, so no `_` makes that name ambiguous.
TIER_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,23}$")
# BACKUP_ROOT's other folders: a tier of one of these names would mix its backups with the logs or the WAL.
RESERVED_TIER_NAMES = {"logs": "the logs", "wal": "the WAL archive"}
DumpFormat = Literal["plain", "custom", "directory"]
Codec = Literal["gzip", "zstd", "none"]

DEFAULT_LEVELS = {"gzip": 6, "zstd": 3, "none": 0}
LEVEL_RANGES = {"gzip": (0, 9), "zstd": (1, 19), "none": (0, 0)}
STEPS = ("dump", "compress", "verify", "upload", "rotate", "notify")

# Target names end up in file names, Redis keys and log lines: a conservative alphabet.
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Node names end up in queue names (pgbeat.host.<node>) and Redis keys: a host name's alphabet.
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,252}$")
HOST_NAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
# PostgreSQL cuts identifiers at NAMEDATALEN - 1 bytes: a longer name would silently name another database.
MAX_IDENTIFIER_BYTES = 63
# Upper bounds of the numeric settings: far beyond any real use, and small enough that every date,
# countdown and expiry computed from them stays in range (`now - timedelta(days=keep_days)`, Celery
# ETAs, Redis TTLs): `keep_days: 1000000` used to pass `config check` and then fail every rotation.
MAX_KEEP_DAYS = 36_500  # a century
MAX_KEEP_COUNT = 10_000
MAX_SECONDS = 30 * 86_400  # any wait, timeout, TTL or time limit
MAX_BYTES = 1 << 60
# The targets file: bigger, deeper or (after YAML aliases) larger than this is a mistake or an attack.
MAX_CONFIG_BYTES = 4 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 200_000
SECRET_KEY_HINTS = ("password", "secret", "token", "broker", "backend", "url", "key")


def validate_target_name(name: str) -> str:
    """Given a target name, return it; raise ValueError if it is unsafe in a file name."""
    if not TARGET_NAME_RE.match(name) or ".." in name:
        raise ValueError(
            "must be 1-63 characters of letters, digits, '.', '_' or '-', start with a letter or digit, "
            "and contain no '..' (it becomes part of file names)"
        )
    return name


def validate_not_blank(value: str, leave_out: str = "the key") -> str:
    """Given a configured name (host, user, bucket, ...), return it; raise ValueError if it is empty or
    blank: an empty value never means "unset, use the default" (that is what leaving the key out says)."""
    if not value.strip():
        raise ValueError(f"must not be empty or blank (leave {leave_out} out to use the default)")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


def validate_tier_name(name: str) -> str:
    """Given a tier's name, return it; raise ValueError if it cannot name a tier folder and file names."""
    if not TIER_NAME_RE.match(name):
        raise ValueError("must be 1-24 lower-case letters or digits, starting with a letter (it names a "
                         "folder under BACKUP_ROOT and is part of every backup's file name)")
    if name in RESERVED_TIER_NAMES:
        raise ValueError(f"is reserved: BACKUP_ROOT/{name} holds {RESERVED_TIER_NAMES[name]}")
    return name


def validate_database_name(name: str) -> str:
    """Given a database name, return it; raise ValueError if PostgreSQL would not use it as written."""
    validate_not_blank(name)
    size = len(name.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"is {size} bytes long; PostgreSQL cuts names at {MAX_IDENTIFIER_BYTES} bytes, so it "
                         "would name another database")
    return name


def validate_node_name(name: str) -> str:
    """Given a node (host) name, return it; raise ValueError if it cannot name a host queue."""
    validate_not_blank(name)
    if not NODE_NAME_RE.match(name):
        raise ValueError("must be a host name: 1-253 letters, digits, '.', '_', '@' or '-', starting with a "
                         "letter or digit")
    return name


def parse_listen(value: str) -> tuple[str, int]:
    """Given `host:port` (`[::1]:port` for IPv6), return (host, port); raise ValueError saying what is wrong."""
    import ipaddress

    host, colon, port_text = value.strip().rpartition(":")
    if not colon:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9810)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif not host:
        raise ValueError(f"{value!r} names no host (write 127.0.0.1{value.strip()} for this machine only)")
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [::1]:9810")
    elif not HOST_NAME_RE.match(host):
        raise ValueError(f"{value!r}: {host!r} is not a host name or IP address")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _validate_listen(value: str) -> str:
    validate_not_blank(value)
    parse_listen(value)
    return value


def _path_not_blank(value: Any) -> Any:
    # Path("") is the current folder: a blank path must be refused before pydantic turns it into one.
    if isinstance(value, str):
        validate_not_blank(value)
    return value


# Cron syntax that cronsim and Celery's crontab (beat) both read the same way: numbers, names, * , - /.
CRON_FIELD_RE = re.compile(r"^[0-9A-Za-z*,/-]+$")
CRON_MONTHS = {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"}
CRON_DAYS = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"}


# Memoised: a fleet's targets file repeats the same few schedules thousands of times.
@functools.lru_cache(maxsize=256)
def validate_cron(expr: str) -> str:
    """Given a 5-field cron expression, return it normalised; raise ValueError if cronsim rejects it, or if
    it uses what beat (Celery's crontab) cannot read: L, W, #, ? and 7 for Sunday."""
    expr = " ".join(expr.split())
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError("must be a cron expression with 5 fields: minute hour day-of-month month day-of-week")
    names = ({}, {}, {}, CRON_MONTHS, CRON_DAYS)
    for field, allowed in zip(fields, names, strict=True):
        tokens = re.split(r"[,/-]", field)
        if not CRON_FIELD_RE.match(field) or not all(t == "*" or t.isdigit() or t.lower() in allowed for t in tokens):
            raise ValueError("may use only numbers, month and day names (jan, mon), '*', ',', '-' and '/' "
                             "(no L, W, # or ?)")
    if "7" in re.split(r"[,-]", fields[4].split("/")[0]):
        raise ValueError("day-of-week 7: write 0 for Sunday")
    from cronsim import CronSim, CronSimError  # imported here: only the configuration's cron needs it

    try:
        CronSim(expr, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"is not a valid cron expression: {exc}") from None
    return expr


def validate_timezone(name: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # imported here: the command line's checks need no zones

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as 'America/Sao_Paulo')") from None
    return name


def host_timezone() -> str:
    """Return the host's IANA time zone name, or UTC when it cannot be told."""
    try:
        import tzlocal

        return tzlocal.get_localzone_name() or "UTC"
    except Exception:  # tzlocal raises several kinds when /etc/localtime is odd
        return "UTC"

