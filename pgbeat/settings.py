"""Configuration: the single source of truth, validated by pydantic.

Two sources, merged into one `Settings`:
- the environment and `.env` in the working directory (pydantic-settings): the seed's `DB_HOST DB_PORT
  DB_NAME DB_USER DB_PASSWORD BACKUP_ROOT` define one target named `TARGET_NAME` (default: `DB_NAME`),
  plus the global `PGBEAT_CONFIG`, `CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND`, `PGBEAT_TIMEZONE`,
  `PGBEAT_NODE`;
- a targets file (YAML or TOML, path in `PGBEAT_CONFIG`) with many targets, shared `defaults`, and the
  global settings. The environment wins over the file for the global settings.

Every problem in either source is collected and raised together as one `ConfigError`, each line naming
the key and the file it came from. Secrets are `SecretStr` and never appear in those lines.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cronsim import CronSim, CronSimError
from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgbeat.errors import ConfigError, UnknownTargetError
from pgbeat.postgres.options import check_pg_dump_options

TIERS = ("daily", "weekly", "monthly")
Tier = Literal["daily", "weekly", "monthly"]
DumpFormat = Literal["plain", "custom", "directory"]
Codec = Literal["gzip", "zstd", "none"]

# The seed's schedule: daily 02:00 keep 7 days, weekly Sunday 03:00 keep 30, monthly day 1 04:00 keep 365.
DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "daily": {"schedule": "0 2 * * *", "keep_days": 7},
    "weekly": {"schedule": "0 3 * * 0", "keep_days": 30},
    "monthly": {"schedule": "0 4 1 * *", "keep_days": 365},
}
DEFAULT_DRILL_SCHEDULE = "0 5 * * 0"  # weekly, Sunday 05:00: after the weekly backup of 03:00
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


Name = Annotated[str, AfterValidator(validate_not_blank)]
DatabaseName = Annotated[str, AfterValidator(validate_database_name)]
NodeName = Annotated[str, AfterValidator(validate_node_name)]
ConfigPath = Annotated[Path, BeforeValidator(_path_not_blank)]
Listen = Annotated[str, AfterValidator(_validate_listen)]
# Cron syntax that cronsim and Celery's crontab (beat) both read the same way: numbers, names, * , - /.
CRON_FIELD_RE = re.compile(r"^[0-9A-Za-z*,/-]+$")
CRON_MONTHS = {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"}
CRON_DAYS = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"}


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
    try:
        CronSim(expr, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"is not a valid cron expression: {exc}") from None
    return expr


def validate_timezone(name: str) -> str:
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


class Strict(BaseModel):
    # No inf or nan in any float: they pass `gt`/`le` checks in surprising ways and break arithmetic later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TierSpec(Strict):
    """One tier's overrides; unset fields inherit from `defaults` and then the built-in values."""

    enabled: bool | None = None
    schedule: str | None = Field(None, description="cron expression in the configured time zone")
    keep_days: int | None = Field(None, ge=0, le=MAX_KEEP_DAYS, description="remove backups older than this many days")
    min_keep: int | None = Field(None, ge=1, le=MAX_KEEP_COUNT,
                                 description="never remove the newest N verified backups")

    _cron = field_validator("schedule")(lambda v: None if v is None else validate_cron(v))


class DrillSpec(Strict):
    """Restore drills: a scheduled restore of the latest backup into a scratch database, with checks."""

    enabled: bool | None = None
    schedule: str | None = Field(None, description="cron expression; default weekly, Sunday 05:00")
    tier: Tier | None = Field(None, description="drill the latest backup of this tier; default: any tier")
    host: Name | None = Field(None, description="the drill server; default: the target's own server")
    port: int | None = Field(None, ge=1, le=65535)
    user: Name | None = None
    password: SecretStr | None = None
    passfile: ConfigPath | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    assertions: list[str] | None = Field(None, description="SQL returning one boolean, e.g. "
                                                           "'SELECT count(*) > 0 FROM invoices'")
    statement_timeout: int | None = Field(None, ge=1, le=86_400, description="seconds per check query")

    _cron = field_validator("schedule")(lambda v: None if v is None else validate_cron(v))


EventCategory = Literal["failure", "success", "warning", "drill", "restore"]


class ChannelSpec(Strict):
    """A notification channel: an Apprise URL (mailto://, slack://, tgram://, json://, ntfys://, ...)."""

    url: SecretStr = Field(description="Apprise URL; it usually holds a token, so it is a secret")
    events: list[EventCategory] = Field(default_factory=lambda: ["failure"],
                                        description="failure is always sent; add success, warning, drill, restore")
    name: Name | None = Field(None, description="a label for logs (default: the URL's scheme)")

    def label(self) -> str:
        return self.name or self.url.get_secret_value().split("://", 1)[0]

    def wants(self, category: str) -> bool:
        return category == "failure" or category in self.events


class MonitoringSpec(Strict):
    """Warnings that are not failures, and the metrics endpoint."""

    size_drop_ratio: float = Field(0.5, gt=0, lt=1, description="warn when a dump is smaller than this share "
                                                                "of the median of the previous ones")
    duration_growth_ratio: float = Field(3.0, gt=1, le=1000,
                                         description="warn when a run takes this many times the median")
    min_duration_s: float = Field(60.0, ge=0, le=MAX_SECONDS,
                                  description="ignore duration growth below this many seconds")
    history: int = Field(5, ge=2, le=50, description="how many previous backups the comparisons use")
    min_free_percent: float = Field(10.0, ge=0, le=100, description="warn when BACKUP_ROOT has less free space")
    min_free_bytes: int = Field(0, ge=0, le=MAX_BYTES)
    metrics_listen: Listen = Field("127.0.0.1:9810", description="host:port of `pgbeat metrics`")


class RetentionSpec(Strict):
    keep_days: int | None = Field(None, ge=0, le=MAX_KEEP_DAYS)
    min_keep: int | None = Field(None, ge=1, le=MAX_KEEP_COUNT)


class DestinationSpec(Strict):
    """An off-site copy: S3 (or compatible), GCS, or a folder over SSH. The local shelf is always kept."""

    name: str
    kind: Literal["s3", "gcs", "ssh"]
    enabled: bool = True
    prefix: str = Field("", description="s3/gcs: key prefix inside the bucket")
    bucket: Name | None = Field(None, description="s3, gcs")
    endpoint_url: Name | None = Field(None, description="s3: an S3-compatible service (MinIO, Wasabi, GCS interop)")
    region: Name | None = None
    storage_class: Name | None = Field(None, description="s3: e.g. STANDARD_IA, GLACIER_IR")
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="s3 server-side encryption")
    sse_kms_key_id: Name | None = None
    access_key_id: SecretStr | None = Field(None, description="s3; default: AWS env vars, profiles, roles")
    secret_access_key: SecretStr | None = None
    profile: Name | None = None
    part_size: int | None = Field(None, ge=5 * 1024 * 1024, le=5 * 1024**3,
                                  description="s3 multipart part size in bytes (S3 allows 5 MiB to 5 GiB)")
    project: Name | None = Field(None, description="gcs")
    credentials_file: ConfigPath | None = Field(None, description="gcs; default: GOOGLE_APPLICATION_CREDENTIALS")
    endpoint: Name | None = Field(None, description="gcs: an emulator's URL")
    host: Name | None = Field(None, description="ssh")
    port: int | None = Field(None, ge=1, le=65535, description="ssh (default 22)")
    user: Name | None = Field(None, description="ssh")
    path: Name | None = Field(None, description="ssh: the remote folder")
    key_file: ConfigPath | None = Field(None, description="ssh; default: the agent or ~/.ssh keys")
    known_hosts: ConfigPath | None = Field(None, description="ssh; host keys are always checked")
    retention: dict[Tier, RetentionSpec] | None = Field(None, description="this destination's own retention")
    bandwidth_limit: int | None = Field(None, ge=1024, le=1 << 40, description="bytes per second")
    retries: int = Field(5, ge=1, le=20, description="attempts per operation, with exponential backoff")

    _name = field_validator("name")(lambda v: validate_target_name(v))

    @model_validator(mode="after")
    def _kind_fields(self) -> DestinationSpec:
        needed = {"s3": ("bucket",), "gcs": ("bucket",), "ssh": ("host", "user", "path")}[self.kind]
        missing = [f for f in needed if not getattr(self, f)]
        if missing:
            raise ValueError(f"a {self.kind} destination needs {', '.join(missing)}")
        if self.name == "local":
            raise ValueError("'local' is the name of the local shelf; choose another name")
        return self


class EncryptionSpec(Strict):
    """Client-side encryption with age: workers hold only the public recipients."""

    recipients: list[str] = Field(min_length=1, description="age X25519 public keys (age1...)")
    identity_file: ConfigPath | None = Field(None, description="the private identity, needed only to restore")

    @field_validator("recipients")
    @classmethod
    def _valid_recipients(cls, recipients: list[str]) -> list[str]:
        import pyrage

        for recipient in recipients:
            try:
                pyrage.x25519.Recipient.from_str(recipient)
            except Exception:
                raise ValueError(f"{recipient[:12]}... is not an age X25519 recipient (age1...)") from None
        return recipients


class CompressionSpec(Strict):
    codec: Codec | None = None
    level: int | None = None
    threads: int | None = Field(None, ge=0, le=64, description="0 = one per CPU")


class TargetOptions(Strict):
    """Everything a target can set; also the shape of the file's `defaults` section."""

    host: Name | None = Field(None, description="host name, IP or socket directory; unset = libpq default")
    port: int | None = Field(None, ge=1, le=65535)
    user: Name | None = None
    password: SecretStr | None = Field(None, description="unset = ~/.pgpass, PGPASSFILE or `passfile`")
    passfile: ConfigPath | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    connect_timeout: int | None = Field(None, ge=1, le=600)
    format: DumpFormat | None = None
    jobs: int | None = Field(None, ge=1, le=64, description="parallel pg_dump jobs (directory format)")
    compression: CompressionSpec | None = None
    streaming: bool | None = Field(None, description="plain format: compress while dumping, in one pass, "
                                                     "with no uncompressed copy on disk (see README)")
    pg_dump_options: list[str] | None = Field(None, description="extra pg_dump options from an allow-list "
                                                                 "(pgbeat/pgoptions.py), passed spelled out")
    tiers: dict[Tier, TierSpec] | None = None
    drill: DrillSpec | None = None
    notify: list[ChannelSpec] | None = Field(None, description="channels for this target, besides the global ones")
    healthcheck_url: SecretStr | None = Field(None, description="healthchecks-style ping URL: /start, success, /fail")
    destinations: list[DestinationSpec] | None = Field(None, description="off-site copies besides the local shelf")
    encryption: EncryptionSpec | None = None

    @field_validator("pg_dump_options")
    @classmethod
    def _allowed_dump_options(cls, options: list[str] | None) -> list[str] | None:
        # Read the way pg_dump's getopt_long reads them, and handed on spelled out (see pgbeat/pgoptions.py).
        return None if options is None else check_pg_dump_options(options)


class TargetSpec(TargetOptions):
    name: str
    dbname: DatabaseName

    _name = field_validator("name")(lambda v: validate_target_name(v))


class Reliability(Strict):
    """Timing knobs of the Celery chain; the README's "Reliability" section says why each matters."""

    lock_ttl: int = Field(60, ge=2, le=86_400, description="seconds a target lock lives without renewal")
    lock_wait: int = Field(6 * 3600, ge=0, le=MAX_SECONDS, description="how long a backup waits for a busy target")
    visibility_timeout: int = Field(6 * 3600, ge=5, le=MAX_SECONDS,
                                    description="Redis redelivery timeout (all consumers)")
    restore_interval: int = Field(10, ge=1, le=3600, description="how often workers look for messages to redeliver")
    max_attempts: int = Field(3, ge=1, le=100, description="deliveries of one step before it is declared failed")
    retries: int = Field(3, ge=0, le=100, description="retries of a transient failure (server unreachable)")
    retry_backoff: int = Field(30, ge=0, le=86_400, description="first retry delay in seconds, doubled each time")
    retry_backoff_max: int = Field(600, ge=0, le=MAX_SECONDS)
    time_limits: dict[str, int] = Field(
        default_factory=lambda: {"dump": 5 * 3600, "compress": 2 * 3600, "verify": 2 * 3600,
                                 "upload": 5 * 3600, "rotate": 900, "notify": 300},
        description="soft time limit per step in seconds; the hard limit is hard_limit_grace later",
    )
    hard_limit_grace: int = Field(60, ge=1, le=86_400, description="seconds between a step's soft and hard time limit")
    result_expires: int = Field(86400, ge=60, le=MAX_SECONDS)
    per_host_dumps: int = Field(1, ge=0, le=MAX_KEEP_COUNT,
                                description="dumps at once against one database server (0 = no cap)")
    max_dumps: int = Field(0, ge=0, le=MAX_KEEP_COUNT, description="dumps at once across the fleet (0 = no cap)")
    node_timeout: int = Field(180, ge=10, le=MAX_SECONDS,
                              description="seconds without a live worker on a host before its runs "
                                          "are re-dispatched elsewhere")
    catch_up_window: float = Field(0.5, gt=0, le=1, description="a scheduled run starting later than this share "
                                                                "of its tier's period after its slot is skipped")
    beat_lock_timeout: int = Field(150, ge=10, le=86_400,
                                   description="RedBeat leader lock: a standby beat takes over after it")
    copy_backlog_per_run: int = Field(3, ge=0, le=10_000,
                                      description="older local backups (newest first) a backup's upload step copies "
                                                  "to destinations that lack them; `pgbeat upload --retry` copies "
                                                  "all (0 = only it)")

    @field_validator("time_limits")
    @classmethod
    def _known_steps(cls, limits: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(limits) - set(STEPS))
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
        if any(not 1 <= v <= MAX_SECONDS for v in limits.values()):
            raise ValueError(f"every time limit must be from 1 to {MAX_SECONDS} seconds (30 days)")
        return limits

    @model_validator(mode="after")
    def _countdowns_fit(self) -> Reliability:
        # A message held with a countdown longer than visibility_timeout is delivered again and again:
        # every retry countdown and re-check (lock_ttl) must fit inside it.
        if self.visibility_timeout <= max(self.retry_backoff_max, 2 * self.lock_ttl):
            raise ValueError(f"visibility_timeout ({self.visibility_timeout}) must exceed retry_backoff_max and "
                             "twice lock_ttl (countdowns longer than it are delivered twice)")
        return self

    def redelivery_warning(self) -> str | None:
        """Steps that outlive the visibility timeout are delivered again; the step guard makes the copy
        wait and never run in parallel, but it costs messages: say so in `pgbeat config check`."""
        longest = max(self.limits().values()) + self.hard_limit_grace
        if self.visibility_timeout <= longest:
            return (f"visibility_timeout ({self.visibility_timeout} s) is shorter than the longest step may run "
                    f"({longest} s): such steps are delivered again (harmless, the copy waits) - raise it")
        return None

    def limits(self) -> dict[str, int]:
        defaults = Reliability.model_fields["time_limits"].default_factory()
        return {**defaults, **self.time_limits}


class FileConfig(Strict):
    """The targets file."""

    backup_root: ConfigPath | None = None
    timezone: str | None = None
    broker_url: SecretStr | None = None
    result_backend: SecretStr | None = None
    node: NodeName | None = None
    pg_bin_dir: ConfigPath | None = None
    defaults: TargetOptions = TargetOptions()
    reliability: Reliability = Reliability()
    notify: list[ChannelSpec] = Field(default_factory=list, description="channels for every target")
    monitoring: MonitoringSpec = MonitoringSpec()

    _tz = field_validator("timezone")(lambda v: None if v is None else validate_timezone(v))


class EnvSettings(BaseSettings):
    """The environment and `.env`: the seed's variables plus pgbeat's globals."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False, env_ignore_empty=True)

    # An empty variable (`DB_PASSWORD=`, as in .env.example) is unset; a blank one ("  ") is an error.
    db_host: Name | None = None
    db_port: int | None = Field(None, ge=1, le=65535)
    db_name: DatabaseName | None = None
    db_user: Name | None = None
    db_password: SecretStr | None = None
    target_name: str | None = None
    backup_root: ConfigPath | None = None
    pgbeat_config: ConfigPath | None = None
    pgbeat_timezone: str | None = None
    pgbeat_node: NodeName | None = None
    pgbeat_pg_bin_dir: ConfigPath | None = None
    celery_broker_url: SecretStr | None = None
    celery_result_backend: SecretStr | None = None
    pgbeat_notify_urls: SecretStr | None = Field(None, description="Apprise URLs separated by spaces or commas")
    db_healthcheck_url: SecretStr | None = None

    _tz = field_validator("pgbeat_timezone")(lambda v: None if v is None else validate_timezone(v))


class TierPolicy(Strict):
    enabled: bool
    schedule: str
    keep_days: int
    min_keep: int


class Compression(Strict):
    codec: Codec
    level: int
    threads: int


class DrillPolicy(Strict):
    enabled: bool
    schedule: str
    tier: str | None
    server: dict[str, Any] = Field(description="connection fields that differ from the target's")
    assertions: list[str]
    statement_timeout: int


class Target(Strict):
    """A fully resolved target: every field has its final value."""

    name: str
    dbname: str
    host: str | None
    port: int
    user: str | None
    password: SecretStr | None
    passfile: Path | None
    sslmode: str | None
    connect_timeout: int
    format: DumpFormat
    jobs: int
    compression: Compression
    streaming: bool = False
    pg_dump_options: list[str]
    tiers: dict[str, TierPolicy]
    drill: DrillPolicy
    notify: list[ChannelSpec] = Field(default_factory=list)
    healthcheck_url: SecretStr | None = None
    destinations: list[DestinationSpec] = Field(default_factory=list)
    encryption: EncryptionSpec | None = None
    source: str = Field(description="where the target was defined, for messages")

    def conninfo(self) -> str:
        """Return a libpq connection string without the password (it travels through a passfile)."""
        fields = {"dbname": self.dbname, "host": self.host, "port": str(self.port), "user": self.user,
                  "sslmode": self.sslmode, "connect_timeout": str(self.connect_timeout),
                  "application_name": "pgbeat"}
        return " ".join(f"{key}={quote_conninfo(value)}" for key, value in fields.items() if value)

    def describe(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host or 'local socket'}:{self.port}/{self.dbname}"

    def enabled_tiers(self) -> list[str]:
        return [tier for tier in TIERS if self.tiers[tier].enabled]

    def destination(self, name: str) -> DestinationSpec:
        for spec in self.destinations:
            if spec.name == name:
                return spec
        known = ", ".join(["local", *(d.name for d in self.destinations)])
        raise UnknownTargetError(f"Target {self.name} has no destination {name!r}", hint=f"destinations: {known}")

    def drill_server(self) -> Target:
        """The connection drills restore into: this target with the drill's server overrides."""
        return self.model_copy(update=self.drill.server)


def quote_conninfo(value: str) -> str:
    """Quote a value for a libpq connection string (single quotes, backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Settings(BaseModel):
    """Everything pgbeat needs, resolved from both sources."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    backup_root: Path
    timezone: str
    broker_url: SecretStr | None
    result_backend: SecretStr | None
    node: str
    pg_bin_dir: Path | None
    reliability: Reliability
    targets: dict[str, Target]
    notify: list[ChannelSpec] = Field(default_factory=list)
    monitoring: MonitoringSpec = MonitoringSpec()
    config_file: Path | None = None

    def channels(self, target: str) -> list[ChannelSpec]:
        """The notification channels of `target`: the global ones, then the target's own."""
        own = self.targets[target].notify if target in self.targets else []
        return [*self.notify, *own]

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: every chain runs in-process."""
        return self.broker_url is None

    @cached_property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def backup_root_problem(self, writes: bool) -> str | None:
        """Return why BACKUP_ROOT cannot be used (not a folder; with `writes`, not writable or not creatable),
        or None."""
        root = self.backup_root
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "" if existing == root else f" ({existing} is a file)"
            return f"BACKUP_ROOT {root} is not a folder{where}"
        if existing == root and not os.access(root, os.R_OK | os.X_OK):
            return f"BACKUP_ROOT {root} cannot be read by this user"
        if writes and not os.access(existing, os.W_OK | os.X_OK):
            what = "is not writable" if existing == root else f"cannot be created: {existing} is not writable"
            return f"BACKUP_ROOT {root} {what} by this user"
        return None

    def target(self, name: str) -> Target:
        try:
            return self.targets[name]
        except KeyError:
            known = ", ".join(sorted(self.targets)) or "none"
            raise UnknownTargetError(f"Unknown target {name!r}", hint=f"configured targets: {known}") from None


# --- loading ----------------------------------------------------------------------------------------


def format_loc(loc: tuple[Any, ...]) -> str:
    """Given a pydantic error location, return it as `targets[2].tiers.daily.keep_days`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _safe_input(error: Mapping[str, Any]) -> str:
    """Return ` (got X)` for an error whose input can be shown, else '' (never echo a secret)."""
    loc = " ".join(str(p) for p in error.get("loc", ())).lower()
    value = error.get("input")
    if error.get("type") == "extra_forbidden" or any(hint in loc for hint in SECRET_KEY_HINTS):
        return ""
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 80):
        return f" (got {value!r})"
    return ""


def _error_lines(exc: ValidationError, where: str, env_names: Mapping[str, str] | None = None,
                 prefix: tuple[Any, ...] = ()) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        error = {**error, "loc": (*prefix, *error["loc"])}
        msg = error["msg"].removeprefix("Value error, ")
        if env_names is not None:
            field = str(error["loc"][0]) if error["loc"] else ""
            lines.append(f"{field.upper()} in {env_names.get(field.upper(), where)}: {msg}{_safe_input(error)}")
        else:
            lines.append(f"{where}: At '{format_loc(error['loc'])}': {msg}{_safe_input(error)}")
    return lines


def read_text_file(path: Path, what: str) -> tuple[str | None, str | None]:
    """Given a configuration file, return (its text, None) or (None, one line saying why it cannot be used:
    missing, not a regular file, too big, not UTF-8 text, binary)."""
    try:
        if not path.is_file():
            problem = "no such file" if not path.exists() else "not a regular file"
            return None, f"{path}: cannot read the {what}: {problem}"
        with path.open("rb") as f:  # bounded: /dev/zero or a runaway file must not fill memory
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, f"{path}: cannot read the {what}: {exc.strerror or exc}"
    if len(raw) > MAX_CONFIG_BYTES:
        return None, f"{path}: the {what} is larger than {MAX_CONFIG_BYTES >> 20} MiB"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"{path}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                      "save it as UTF-8")
    if "\x00" in text:
        return None, f"{path}: the {what} is binary (a NUL byte at offset {text.index(chr(0))}), not text"
    return text, None


def _yaml_problem(root: yaml.Node) -> str | None:
    """Given a composed YAML document, return why it is unusable (aliases that expand too far, an alias
    that contains itself, nesting too deep), or None. Expanded sizes are counted, not built."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            depths[key] = 1 + max((depths[id(c)] for c in children), default=0)
            if sizes[key] > MAX_CONFIG_VALUES:
                return f"it expands to more than {MAX_CONFIG_VALUES} values (YAML aliases repeating one another)"
            if depths[key] > MAX_CONFIG_DEPTH:
                return f"it is nested more than {MAX_CONFIG_DEPTH} levels deep"
            continue
        if key in sizes:
            continue
        if key in on_path:
            return "a YAML alias refers to a node that contains it (a recursive structure)"
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return None


def _data_depth(data: Any) -> int:
    """The nesting depth of parsed TOML data (no aliases there), counted without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_CONFIG_DEPTH:
            break
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


def read_config_file(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Given a YAML or TOML file, return its mapping and a list of errors (with the file's name)."""
    text, problem = read_text_file(path, "targets file")
    if problem is not None:
        return None, [problem]
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
            if _data_depth(data) > MAX_CONFIG_DEPTH:
                return None, [f"{path}: not a usable targets file: it is nested more than {MAX_CONFIG_DEPTH} "
                              "levels deep"]
        else:
            # Depth first, from the parser's events (iterative): the composer recurses once per level.
            depth = 0
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_CONFIG_DEPTH:
                        return None, [f"{path}: not a usable targets file: it is nested more than "
                                      f"{MAX_CONFIG_DEPTH} levels deep"]
                elif isinstance(event, yaml.CollectionEndEvent):
                    depth -= 1
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                problem = _yaml_problem(node) if node is not None else None
                if problem is not None:
                    return None, [f"{path}: not a usable targets file: {problem}"]
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{path}: not valid TOML: {exc}"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        return None, [f"{path}: not valid YAML{where}: {problem}"]
    except RecursionError:  # the parsers recurse once per level of nesting
        return None, [f"{path}: not a usable targets file: it is nested more than {MAX_CONFIG_DEPTH} levels deep"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"{path}: the top level must be a mapping of settings, not {type(data).__name__}"]
    return data, []


def _merge_spec(*layers: BaseModel | None) -> dict[str, Any]:
    """Merge option layers (later wins) into one dict, field by field, tiers and compression deeply."""
    merged: dict[str, Any] = {"tiers": {tier: dict(values) for tier, values in DEFAULT_TIERS.items()},
                              "compression": {}, "drill": {}}
    for layer in layers:
        if layer is None:
            continue
        for key, value in layer.model_dump(exclude_none=True, exclude_unset=False).items():
            if key == "tiers":
                for tier, tier_values in value.items():
                    merged["tiers"][tier].update(tier_values)
            elif key in ("compression", "drill"):
                nested = getattr(layer, key)
                merged[key].update({k: getattr(nested, k) for k in value})  # keeps SecretStr
            else:
                merged[key] = getattr(layer, key)  # keep SecretStr as it is
    return merged


def resolve_target(spec: TargetSpec, defaults: TargetOptions, source: str) -> Target:
    merged = _merge_spec(defaults, spec)
    codec = merged["compression"].get("codec", "gzip")
    compression = Compression(codec=codec, level=merged["compression"].get("level", DEFAULT_LEVELS[codec]),
                              threads=merged["compression"].get("threads", 0))
    tiers = {tier: TierPolicy(enabled=values.get("enabled", True), schedule=values["schedule"],
                              keep_days=values["keep_days"], min_keep=values.get("min_keep", 1))
             for tier, values in merged["tiers"].items()}
    drill = merged["drill"]
    server_keys = ("host", "port", "user", "password", "passfile", "sslmode")
    drill_policy = DrillPolicy(
        enabled=drill.get("enabled", True), schedule=drill.get("schedule", DEFAULT_DRILL_SCHEDULE),
        tier=drill.get("tier"), server={k: drill[k] for k in server_keys if drill.get(k) is not None},
        assertions=drill.get("assertions", []), statement_timeout=drill.get("statement_timeout", 300),
    )
    return Target(
        name=spec.name, dbname=spec.dbname, drill=drill_policy, host=merged.get("host"), port=merged.get("port", 5432),
        user=merged.get("user"), password=merged.get("password"), passfile=merged.get("passfile"),
        sslmode=merged.get("sslmode"), connect_timeout=merged.get("connect_timeout", 10),
        format=merged.get("format", "plain"), jobs=merged.get("jobs", 1), compression=compression,
        streaming=merged.get("streaming", False),
        pg_dump_options=merged.get("pg_dump_options", []), tiers=tiers, source=source,
        notify=merged.get("notify", []), healthcheck_url=merged.get("healthcheck_url"),
        destinations=[d for d in merged.get("destinations", []) if d.enabled], encryption=merged.get("encryption"),
    )


def _target_problems(target: Target) -> list[tuple[str, str]]:
    """Cross-field checks that pydantic cannot do on one field: (key path, message) pairs."""
    problems = []
    low, high = LEVEL_RANGES[target.compression.codec]
    if not low <= target.compression.level <= high:
        problems.append(("compression.level", f"{target.compression.codec} levels are {low}-{high} "
                                              f"(got {target.compression.level})"))
    if target.jobs > 1 and target.format != "directory":
        problems.append(("jobs", f"parallel dumps (jobs > 1) need format 'directory' (got {target.format!r})"))
    if target.encryption is not None and target.format == "directory":
        problems.append(("encryption", "encryption needs format 'plain' or 'custom' (a directory is many files)"))
    names = [d.name for d in target.destinations]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(("destinations", f"two destinations are named {name!r}"))
    return problems


def load_settings(env_file: str | Path | None = ".env") -> Settings:
    """Read the environment, `.env` and the targets file; return Settings or raise ConfigError listing all."""
    env_path = Path(env_file) if env_file else None
    env_label = str(env_path) if env_path else ".env"
    errors: list[str] = []
    if env_path is not None and env_path.is_file():
        _text, problem = read_text_file(env_path, "environment file")
        if problem is not None:  # report it, and read the rest without it so every error is listed
            errors.append(problem)
            env_path = None
    dotenv = {k.upper() for k in dotenv_values(env_path)} if env_path and env_path.is_file() else set()
    in_environ = {k.upper() for k, v in os.environ.items() if v != ""}
    names = {key: ("the environment" if key in in_environ else env_label) for key in dotenv | in_environ}
    try:
        env = EnvSettings(_env_file=env_path)
    except ValidationError as exc:
        errors.extend(_error_lines(exc, "the environment", names))
        env = None

    file_cfg: FileConfig | None = None
    config_path = None
    raw_targets: list[Any] = []
    seen_names: set[str] = set()
    # Read the targets file even when the environment has errors, so that all errors are listed at once.
    raw_config = env.pgbeat_config if env is not None else (
        os.environ.get("PGBEAT_CONFIG") or (dotenv_values(env_path).get("PGBEAT_CONFIG") if dotenv else None))
    if raw_config:
        config_path = Path(raw_config).expanduser().resolve()
        data, file_errors = read_config_file(config_path)
        errors.extend(file_errors)
        if data is not None:
            raw_targets = data.pop("targets", None) or []
            if not isinstance(raw_targets, list):
                errors.append(f"{config_path}: At 'targets': must be a list of targets")
                raw_targets = []
            try:
                file_cfg = FileConfig.model_validate(data)
            except ValidationError as exc:
                errors.extend(_error_lines(exc, str(config_path)))
    file_ok = file_cfg is not None or config_path is None
    file_cfg = file_cfg or FileConfig()

    targets: dict[str, Target] = {}
    for index, raw in enumerate(raw_targets):
        try:
            spec = TargetSpec.model_validate(raw)
        except ValidationError as exc:
            errors.extend(_error_lines(exc, str(config_path), prefix=("targets", index)))
            continue
        if file_ok:
            target = resolve_target(spec, file_cfg.defaults, f"{config_path} targets[{index}]")
            errors.extend(f"{config_path}: At 'targets[{index}].{field}': {msg}"
                          for field, msg in _target_problems(target))
            targets[spec.name] = target
        if spec.name in seen_names:
            errors.append(f"{config_path}: At 'targets[{index}].name': duplicate target name {spec.name!r}")
        seen_names.add(spec.name)

    if env is None:
        raise ConfigError(errors)
    if env.db_name:
        name = env.target_name or env.db_name
        key = "TARGET_NAME" if env.target_name else "DB_NAME"
        try:
            validate_target_name(name)
        except ValueError as exc:
            hint = "" if env.target_name else " (the target is named after DB_NAME; set TARGET_NAME)"
            errors.append(f"{key} in {names.get(key, 'the environment')}: {exc}{hint}")
        else:
            spec = TargetSpec(name=name, dbname=env.db_name, host=env.db_host, port=env.db_port,
                              user=env.db_user, password=env.db_password, healthcheck_url=env.db_healthcheck_url)
            target = resolve_target(spec, file_cfg.defaults, f"DB_* in {env_label}")
            errors.extend(f"{env_label}: the .env target's {field}: {msg}" for field, msg in _target_problems(target))
            if name in targets:
                errors.append(f"{key} in {names.get(key, 'the environment')}: target {name!r} is also defined "
                              f"in {config_path}")
            targets[name] = target
    elif any(getattr(env, f) for f in ("db_host", "db_port", "db_user", "db_password", "target_name")):
        errors.append(f"DB_NAME in {env_label}: missing; DB_HOST/DB_PORT/DB_USER/DB_PASSWORD define a target "
                      "only together with DB_NAME")

    if errors:
        raise ConfigError(errors)

    notify = list(file_cfg.notify)
    if env.pgbeat_notify_urls:
        notify += [ChannelSpec(url=SecretStr(url), events=["failure", "warning"])
                   for url in re.split(r"[\s,]+", env.pgbeat_notify_urls.get_secret_value()) if url]
    backup_root = env.backup_root or file_cfg.backup_root or Path("./backups")
    node = env.pgbeat_node or file_cfg.node or socket.gethostname()
    return Settings(
        backup_root=backup_root.expanduser().resolve(),
        timezone=env.pgbeat_timezone or file_cfg.timezone or host_timezone(),
        broker_url=env.celery_broker_url or file_cfg.broker_url,
        result_backend=env.celery_result_backend or file_cfg.result_backend,
        node=node,
        pg_bin_dir=env.pgbeat_pg_bin_dir or file_cfg.pg_bin_dir,
        reliability=file_cfg.reliability,
        targets=targets,
        notify=notify,
        monitoring=file_cfg.monitoring,
        config_file=config_path,
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return this process's settings, loaded once (workers, beat and the CLI each load their own)."""
    return load_settings()
