"""The one settings schema: every key of the targets file, its description, its bounds and its default.

Each default is written once, on its field. The loader (`pgbeat.settings.load`) merges the raw layers
(`defaults` under each target, the environment over the file) as plain data and validates the result
against these models once; `pgbeat config example` renders them as `deploy/pgbeat.example.yaml`.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from pgbeat.errors import UnknownTargetError
from pgbeat.postgres.clients import DEFAULT_PG_BIN_DIRS
from pgbeat.postgres.options import check_pg_dump_options
from pgbeat.settings.fields import ConfigPath, DatabaseName, Listen, Name, NodeName, TierName
from pgbeat.settings.rules import (
    DEFAULT_LEVELS,
    MAX_BYTES,
    MAX_KEEP_COUNT,
    MAX_KEEP_DAYS,
    MAX_SECONDS,
    PHYSICAL_TIERS,
    STEPS,
    TIERS,
    Codec,
    DumpFormat,
    validate_cron,
    validate_target_name,
    validate_timezone,
)

# The seed's schedule: daily 02:00 keep 7 days, weekly Sunday 03:00 keep 30, monthly day 1 04:00 keep 365.
# The physical `base` tier (PITR) is off until enabled: it needs a user with the REPLICATION attribute
# and a `replication` line in the server's pg_hba.conf.
DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "daily": {"schedule": "0 2 * * *", "keep_days": 7},
    "weekly": {"schedule": "0 3 * * 0", "keep_days": 30},
    "monthly": {"schedule": "0 4 1 * *", "keep_days": 365},
    "base": {"schedule": "0 1 * * 0", "keep_days": 30, "enabled": False},
}
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class Strict(BaseModel):
    # No inf or nan in any float: they pass `gt`/`le` checks in surprising ways and break arithmetic later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TierPolicy(Strict):
    """One tier: when it runs and how long its backups are kept. Unset keys come from `defaults`, then
    from the tier's built-in schedule (daily 02:00 keep 7, weekly Sunday 03:00 keep 30, monthly day 1
    04:00 keep 365). A tier of another name (`hourly`) is a logical tier of its own, and sets both its
    `schedule` and its `keep_days`."""

    enabled: bool = True
    schedule: str = Field(description="cron expression in the configured time zone")
    keep_days: int = Field(ge=0, le=MAX_KEEP_DAYS, description="remove backups older than this many days")
    min_keep: int = Field(1, ge=1, le=MAX_KEEP_COUNT, description="never remove the newest N verified backups")
    full_every_days: int | None = Field(None, ge=1, le=MAX_KEEP_DAYS,
                                        description="base tier, PostgreSQL 17 and later with summarize_wal = on: "
                                                    "take a full base backup when the newest full one is older "
                                                    "than this many days (or there is none, or the chain is "
                                                    "broken, or the timeline changed), else an incremental one "
                                                    "(pg_basebackup --incremental) against the newest verified "
                                                    "base backup; restore combines the chain (pg_combinebackup). "
                                                    "Unset: every base backup is full",
                                        examples=[7])

    _cron = field_validator("schedule")(lambda v: validate_cron(v))


def _with_tier_defaults(value: Any) -> Any:
    """Given the raw `tiers` mapping, return it with every built-in tier present, first and in their order,
    each with its built-in schedule and retention under the keys it leaves out; then the extra tiers as
    given (anything else is left for validation to report)."""
    if not isinstance(value, dict):
        return value
    filled = {}
    for tier in TIERS:
        given = value.get(tier, {})
        filled[tier] = {**DEFAULT_TIERS[tier], **given} if isinstance(given, dict) else given
    return {**filled, **{tier: given for tier, given in value.items() if tier not in filled}}


def _default_tiers() -> dict[str, TierPolicy]:
    return {tier: TierPolicy(**values) for tier, values in DEFAULT_TIERS.items()}


class DrillPolicy(Strict):
    """Restore drills: a scheduled restore of the latest backup into a scratch database, with checks."""

    enabled: bool = True
    schedule: str = Field("0 5 * * 0", description="cron expression; weekly, Sunday 05:00: after the weekly "
                                                   "backup of 03:00")
    tier: TierName | None = Field(None, description="drill the latest backup of this tier; unset: any tier",
                              examples=["weekly"])

    @field_validator("tier")
    @classmethod
    def _logical_tier(cls, tier: str | None) -> str | None:
        if tier in PHYSICAL_TIERS:
            raise ValueError(f"drills restore logical backups; {tier!r} holds physical base backups")
        return tier
    host: Name | None = Field(None, description="the drill server; unset: the target's own server",
                              examples=["drill-db.internal"])
    port: int | None = Field(None, ge=1, le=65535, description="unset: the target's", examples=[5432])
    user: Name | None = Field(None, description="unset: the target's", examples=["drill"])
    password: SecretStr | None = Field(None, description="unset: the target's (prefer a passfile)")
    passfile: ConfigPath | None = Field(None, examples=["/etc/pgbeat/drill.pgpass"])
    sslmode: SslMode | None = Field(None, examples=["require"])
    assertions: list[str] = Field(default_factory=list, description="SQL returning one boolean, e.g. "
                                                                    "'SELECT count(*) > 0 FROM invoices'")
    statement_timeout: int = Field(300, ge=1, le=86_400, description="seconds per check query")
    with_globals: bool = Field(True, description="when the drill server lacks roles the backup's objects need, "
                                                 "create them first from the backup's globals file (roles it "
                                                 "has are left as they are, nothing is dropped); off: such a "
                                                 "drill fails naming the roles")
    pitr_schedule: str = Field("0 6 * * 0", description="cron expression of the PITR drill of a target with the "
                                                        "base tier: its newest base backup and the WAL archive "
                                                        "recovered in a scratch cluster, then checked; weekly, "
                                                        "Sunday 06:00: after the base backup of 01:00")
    server_pgbeat: ConfigPath | None = Field(None, description="the pgbeat a PITR drill's scratch server runs as "
                                                               "restore_command (as the server's user); unset: "
                                                               "the one beside the worker's Python",
                                             examples=["/opt/pgbeat-server/bin/pgbeat"])

    _cron = field_validator("schedule", "pitr_schedule")(lambda v: validate_cron(v))

    @property
    def server(self) -> dict[str, Any]:
        """The connection fields of the drill server that differ from the target's."""
        keys = ("host", "port", "user", "password", "passfile", "sslmode")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


EventCategory = Literal["failure", "success", "warning", "drill", "restore"]


class ChannelSpec(Strict):
    """A notification channel: an Apprise URL (mailto://, slack://, tgram://, json://, ntfys://, ...)."""

    url: SecretStr = Field(description="Apprise URL; it usually holds a token, so it is a secret")
    events: list[EventCategory] = Field(default_factory=lambda: ["failure", "warning"],
                                        description="failure is always sent; warning by default; add success, "
                                                    "drill, restore")
    name: Name | None = Field(None, description="a label for logs (unset: the URL's scheme)", examples=["dba-mail"])

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
    min_free_bytes: int = Field(0, ge=0, le=MAX_BYTES, description="... or fewer free bytes than this")
    metrics_listen: Listen = Field("127.0.0.1:9810", description="host:port of `pgbeat metrics`")


class RetentionSpec(Strict):
    """A destination's own retention of one tier; unset keys keep the tier's."""

    keep_days: int | None = Field(None, ge=0, le=MAX_KEEP_DAYS, examples=[35])
    min_keep: int | None = Field(None, ge=1, le=MAX_KEEP_COUNT, examples=[3])


class DestinationBase(Strict):
    """What every off-site copy has. The local shelf (BACKUP_ROOT) is always kept besides them."""

    name: str = Field(description="letters, digits, . _ - (not 'local', the name of the local shelf)")
    enabled: bool = Field(True, description="false: kept in the file, not copied to")
    retention: dict[TierName, RetentionSpec] | None = Field(None, description="this destination's own retention",
                                                        examples=[{"daily": {"keep_days": 35}}])
    bandwidth_limit: int | None = Field(None, ge=1024, le=1 << 40, description="bytes per second",
                                        examples=[20971520])
    retries: int = Field(5, ge=1, le=20, description="attempts per operation, with exponential backoff")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        validate_target_name(name)
        if name == "local":
            raise ValueError("'local' is the name of the local shelf; choose another name")
        return name


class S3Destination(DestinationBase):
    """A bucket of S3 or of an S3-compatible service (MinIO, Wasabi, GCS interop)."""

    kind: Literal["s3"]
    bucket: Name = Field(examples=["company-pg-backups"])
    prefix: str = Field("", description="key prefix inside the bucket")
    endpoint_url: Name | None = Field(None, description="an S3-compatible service; unset: AWS",
                                      examples=["https://minio.internal:9000"])
    region: Name | None = Field(None, examples=["eu-west-1"])
    storage_class: Name | None = Field(None, description="e.g. STANDARD_IA, GLACIER_IR", examples=["STANDARD_IA"])
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="server-side encryption", examples=["AES256"])
    sse_kms_key_id: Name | None = Field(None, description="with sse: aws:kms", examples=["alias/pgbeat"])
    access_key_id: SecretStr | None = Field(None, description="unset: AWS env vars, profiles, roles")
    secret_access_key: SecretStr | None = None
    profile: Name | None = Field(None, description="a profile of the AWS config files", examples=["backups"])
    part_size: int | None = Field(None, ge=5 * 1024 * 1024, le=5 * 1024**3,
                                  description="multipart part size in bytes (S3 allows 5 MiB to 5 GiB); "
                                              "unset: pgbeat's (pgbeat/storage/s3.py)", examples=[67108864])


class GCSDestination(DestinationBase):
    """A Google Cloud Storage bucket."""

    kind: Literal["gcs"]
    bucket: Name = Field(examples=["company-pg-backups-eu"])
    prefix: str = Field("", description="key prefix inside the bucket")
    project: Name | None = Field(None, examples=["company-backups"])
    credentials_file: ConfigPath | None = Field(None, description="unset: GOOGLE_APPLICATION_CREDENTIALS",
                                                examples=["/etc/pgbeat/gcs.json"])
    endpoint: Name | None = Field(None, description="an emulator's URL", examples=["http://127.0.0.1:4443"])


class SSHDestination(DestinationBase):
    """A folder on another host, over SFTP; its host key is always checked."""

    kind: Literal["ssh"]
    host: Name = Field(examples=["vault.internal"])
    port: int | None = Field(None, ge=1, le=65535, description="unset: 22", examples=[22])
    user: Name = Field(examples=["pgbeat"])
    path: Name = Field(description="the remote folder", examples=["/srv/pgbeat"])
    key_file: ConfigPath | None = Field(None, description="unset: the agent or ~/.ssh keys",
                                        examples=["/etc/pgbeat/id_ed25519"])
    known_hosts: ConfigPath | None = Field(None, description="unset: ~/.ssh/known_hosts",
                                           examples=["/etc/pgbeat/known_hosts"])


# An off-site copy, told apart by `kind`: each kind accepts only its own keys.
DESTINATION_KINDS: dict[str, type[DestinationBase]] = {"s3": S3Destination, "gcs": GCSDestination,
                                                       "ssh": SSHDestination}
DestinationSpec = Annotated[S3Destination | GCSDestination | SSHDestination, Field(discriminator="kind")]


class EncryptionSpec(Strict):
    """Client-side encryption with age: workers hold only the public recipients."""

    recipients: list[str] = Field(min_length=1, description="age X25519 public keys (age1...)",
                                  examples=[["age1..."]])
    identity_file: ConfigPath | None = Field(None, description="the private identity, needed only where "
                                                               "restores and drills run",
                                             examples=["/etc/pgbeat/restore-key.txt"])

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


class Compression(Strict):
    """How backups are compressed: gzip (ISA-L, levels 0-9), zstd (1-19) or none; custom and directory
    formats use pg_dump's own compression with the same codec and level."""

    codec: Codec = "gzip"
    level: int = Field(description="unset: the codec's default (gzip 6, zstd 3)", examples=[6])
    threads: int = Field(0, ge=0, le=64, description="0 = one per CPU")

    @model_validator(mode="before")
    @classmethod
    def _codec_level(cls, data: Any) -> Any:
        # The level's default depends on the codec: filled in here, the one place that knows both.
        if isinstance(data, dict) and "level" not in data:
            codec = data.get("codec", "gzip")
            if isinstance(codec, str) and codec in DEFAULT_LEVELS:
                return {**data, "level": DEFAULT_LEVELS[codec]}
        return data


class StandbySpec(Strict):
    """A standby of the target's server that backups prefer (`prefer_standby`): dumps and base backups read
    it instead of the primary while it replays close enough behind; otherwise they read the primary and
    say why. Unset connection keys are the target's."""

    host: Name = Field(examples=["db1-replica.internal"])
    port: int | None = Field(None, ge=1, le=65535, description="unset: the target's", examples=[5432])
    user: Name | None = Field(None, description="unset: the target's")
    password: SecretStr | None = Field(None, description="unset: the target's (prefer a passfile)")
    passfile: ConfigPath | None = Field(None, examples=["/etc/pgbeat/replica.pgpass"])
    sslmode: SslMode | None = Field(None, examples=["require"])
    max_lag_bytes: int = Field(16 << 20, ge=0, le=MAX_BYTES, description="how far the standby's replay may be "
                                                                          "behind the primary's WAL; further "
                                                                          "behind, the primary is backed up")
    pause_replay: bool = Field(False, description="pause the standby's WAL replay for the length of each dump "
                                                  "(pg_wal_replay_pause, as pg_back does), so no recovery "
                                                  "conflict can cancel it; resumed when the dump ends, or by the "
                                                  "next pgbeat run on the host if the dump was killed. Needs a "
                                                  "superuser or EXECUTE on pg_wal_replay_pause and "
                                                  "pg_wal_replay_resume; the standby falls behind meanwhile")

    def connection(self) -> dict[str, Any]:
        """The connection fields that differ from the target's."""
        keys = ("host", "port", "user", "password", "passfile", "sslmode")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


class WalSpec(Strict):
    """Continuous WAL archiving (`archive_command = 'pgbeat wal-push %p --target NAME'`, or a receiver; see
    README)."""

    push_ahead: int = Field(8, ge=0, le=64, description="each wal-push also archives up to this many other "
                                                        "segments PostgreSQL has marked .ready, in parallel, so "
                                                        "that the calls for them find them done (0 = only its own)")
    prefetch: int = Field(8, ge=0, le=64, description="when wal-fetch gets a segment from a destination, it also "
                                                      "downloads up to this many following segments into the "
                                                      "local archive, if it may write there, so that the next "
                                                      "calls find them (0 = none)")
    receiver: bool = Field(False, description="stream the WAL with pg_receivewal over the replication protocol "
                                              "instead of archive_command, from the worker pool (or `pgbeat "
                                              "receive`): one receiver per target across the fleet (a Redis "
                                              "lease), each completed segment archived as wal-push would; needs a "
                                              "REPLICATION role, a pg_hba replication line and the broker's "
                                              "Redis, and creates the slot pgbeat_<target> (README)")


class TargetOptions(Strict):
    """Everything a target can set; also the shape of the file's `defaults` section."""

    host: Name | None = Field(None, description="host name, IP or socket directory; unset: libpq's default",
                              examples=["db1.internal"])
    port: int = Field(5432, ge=1, le=65535)
    user: Name | None = Field(None, description="unset: libpq's default (the OS user)", examples=["backup"])
    password: SecretStr | None = Field(None, description="unset: ~/.pgpass, PGPASSFILE or `passfile`; never "
                                                         "on a command line")
    passfile: ConfigPath | None = Field(None, examples=["/etc/pgbeat/erp.pgpass"])
    sslmode: SslMode | None = Field(None, description="unset: libpq's default (prefer)", examples=["require"])
    connect_timeout: int = Field(10, ge=1, le=600, description="seconds")
    format: DumpFormat = Field("plain", description="plain (.sql.gz, restores with gunzip -c | psql), custom, "
                                                    "directory")
    jobs: int = Field(1, ge=1, le=64, description="parallel pg_dump jobs (directory format only)")
    compression: Compression = Field(default_factory=lambda: Compression())
    streaming: bool = Field(True, description="plain format: compress while dumping, in one pass, with no "
                                              "uncompressed copy on disk; false: dump to a plain file first, "
                                              "then compress it (releases the server sooner; see README)")
    pg_dump_options: list[str] = Field(default_factory=list, description="extra pg_dump options from an "
                                                                         "allow-list (pgbeat/postgres/options.py), "
                                                                         "passed spelled out",
                                       examples=[["--exclude-table-data=audit_log"]])
    pg_bin_dir: ConfigPath | None = Field(None, description="the bin folder of the PostgreSQL client programs "
                                                            "for this target (its pg_dump must be of the server's "
                                                            "major or newer); unset: the global pg_bin_dir, else "
                                                            "the server's major from pg_bin_dirs",
                                          examples=["/usr/lib/postgresql/18/bin"])
    tiers: dict[TierName, TierPolicy] = Field(default_factory=_default_tiers,
                                              description="daily, weekly, monthly, base: a tier sets only what "
                                                          "differs; another name (hourly) adds a logical tier "
                                                          "with its own schedule and keep_days",
                                              examples=[{"hourly": {"schedule": "0 * * * *", "keep_days": 2}}])
    drill: DrillPolicy = Field(default_factory=lambda: DrillPolicy())
    notify: list[ChannelSpec] = Field(default_factory=list,
                                      description="channels for this target, besides the global ones")
    healthcheck_url: SecretStr | None = Field(None, description="healthchecks-style ping URL (dead-man's "
                                                                "switch): /start, success, /fail",
                                              examples=["https://hc-ping.com/your-uuid"])
    destinations: list[DestinationSpec] = Field(default_factory=list,
                                                description="off-site copies besides the local shelf: kind s3, "
                                                            "gcs or ssh, each with its own keys")
    encryption: EncryptionSpec | None = Field(None, description="age encryption of every copy")
    wal: WalSpec = Field(default_factory=lambda: WalSpec())
    prefer_standby: StandbySpec | None = Field(None, description="take dumps and base backups from this standby "
                                                                 "while it is in sync (max_lag_bytes); else "
                                                                 "from the primary, with a warning")
    safety_backups: int = Field(3, ge=1, le=MAX_KEEP_COUNT,
                                description="safety backups (pre_restore_*) kept per target: after a restore "
                                            "succeeds, and at `pgbeat rotate`, the oldest beyond this are removed")

    _tiers = field_validator("tiers", mode="before")(_with_tier_defaults)

    @field_validator("pg_dump_options")
    @classmethod
    def _allowed_dump_options(cls, options: list[str]) -> list[str]:
        # Read the way pg_dump's getopt_long reads them, and handed on spelled out (see pgbeat/postgres/options.py).
        return check_pg_dump_options(options)

    @field_validator("destinations")
    @classmethod
    def _enabled_destinations(cls, destinations: list[Any]) -> list[Any]:
        # A disabled destination is validated like the others, and then not there for the rest of pgbeat.
        return [d for d in destinations if d.enabled]


class Target(TargetOptions):
    """A fully resolved target: its own keys over `defaults`, every field with its final value."""

    name: str = Field(description="letters, digits, . _ - (it is part of file names)")
    dbname: DatabaseName | None = Field(None, description="the database to back up; or `databases: all` instead",
                                        examples=["erp"])
    databases: Literal["all"] | None = Field(None, description="all: a whole-server target: each run backs up "
                                                               "every database of the server that accepts "
                                                               "connections (not templates), each as a target "
                                                               "of its own named <name>.<database> (README); "
                                                               "instead of dbname", examples=["all"])
    include: list[Name] = Field(default_factory=list, description="with databases: all: only the databases whose "
                                                                  "name matches one of these glob patterns "
                                                                  "(fnmatch: * ? [...]; unset: every one)",
                                examples=[["erp*", "crm"]])
    exclude: list[Name] = Field(default_factory=list, description="with databases: all: leave out the databases "
                                                                  "whose name matches one of these glob patterns",
                                examples=[["postgres", "*_scratch"]])
    _source: str = PrivateAttr("")
    _server: str | None = PrivateAttr(None)

    _name = field_validator("name")(lambda v: validate_target_name(v))

    @property
    def source(self) -> str:
        """Where the target was defined, for messages."""
        return self._source

    @property
    def whole_server(self) -> bool:
        """True for a whole-server target (`databases: all`): a template of the targets it discovers."""
        return self.databases == "all"

    @property
    def server_target(self) -> str | None:
        """The whole-server target this target was discovered by, or None for a listed target."""
        return self._server

    def for_database(self, dbname: str) -> Target:
        """Given one database this whole-server target discovered, return the database's own target: this
        one's keys, named <name>.<database part> (pgbeat.settings.servers). Raise ValueError when the
        derived name cannot be a target name."""
        from pgbeat.settings.servers import derived_name

        target = self.model_copy(update={"name": derived_name(self.name, dbname), "dbname": dbname,
                                         "databases": None, "include": [], "exclude": []})
        target._source = f"{self.source} (databases: all)"
        target._server = self.name
        return target

    def selects(self, dbname: str) -> bool:
        """True when a whole-server target's include and exclude patterns keep database `dbname`."""
        from fnmatch import fnmatchcase

        if self.include and not any(fnmatchcase(dbname, pattern) for pattern in self.include):
            return False
        return not any(fnmatchcase(dbname, pattern) for pattern in self.exclude)

    def conninfo(self) -> str:
        """Return a libpq connection string without the password (it travels through a passfile)."""
        fields = {"dbname": self.dbname, "host": self.host, "port": str(self.port), "user": self.user,
                  "sslmode": self.sslmode, "connect_timeout": str(self.connect_timeout),
                  "application_name": "pgbeat"}
        return " ".join(f"{key}={quote_conninfo(value)}" for key, value in fields.items() if value)

    def describe(self) -> str:
        return (f"{self.user + '@' if self.user else ''}{self.host or 'local socket'}:{self.port}/"
                f"{'* (databases: all)' if self.whole_server else self.dbname}")

    @model_validator(mode="after")
    def _configured_tiers(self) -> Target:
        # A tier named elsewhere in the target must be one of its tiers: a typo would otherwise drill
        # nothing, or keep a destination's copies by the tier's retention instead of the one written.
        named = [("drill.tier", self.drill.tier)] if self.drill.tier else []
        named += [(f"destinations.{d.name}.retention", tier) for d in self.destinations for tier in d.retention or {}]
        for where, tier in named:
            if tier not in self.tiers:
                raise ValueError(f"{where}: {tier!r} is not one of this target's tiers ({', '.join(self.tiers)})")
        for tier, policy in self.tiers.items():
            if policy.full_every_days is not None and tier not in PHYSICAL_TIERS:
                raise ValueError(f"tiers.{tier}.full_every_days: incremental backups are base backups; {tier!r} "
                                 "holds logical dumps (set it on tiers.base)")
        return self

    def enabled_tiers(self) -> list[str]:
        return [tier for tier, policy in self.tiers.items() if policy.enabled]

    def runs_tier(self, tier: str) -> bool:
        """True when `tier` is one of this target's tiers and enabled."""
        return tier in self.tiers and self.tiers[tier].enabled

    def destination(self, name: str) -> DestinationSpec:
        for spec in self.destinations:
            if spec.name == name:
                return spec
        known = ", ".join(["local", *(d.name for d in self.destinations)])
        raise UnknownTargetError(f"Target {self.name} has no destination {name!r}", hint=f"destinations: {known}")

    def drill_server(self) -> Target:
        """The connection drills restore into: this target with the drill's server overrides."""
        return self.model_copy(update=self.drill.server)

    def standby_server(self) -> Target | None:
        """The connection to the standby backups prefer (`prefer_standby`), or None."""
        if self.prefer_standby is None:
            return None
        return self.model_copy(update={**self.prefer_standby.connection(), "prefer_standby": None})


def quote_conninfo(value: str) -> str:
    """Quote a value for a libpq connection string (single quotes, backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _default_time_limits() -> dict[str, int]:
    return {"dump": 5 * 3600, "compress": 2 * 3600, "verify": 2 * 3600, "upload": 5 * 3600, "rotate": 900,
            "notify": 300}


class Reliability(Strict):
    """Timing knobs of the Celery chain; the README's "Reliability" section says why each matters."""

    lock_ttl: int = Field(60, ge=2, le=86_400, description="seconds a target lock and dump slot live without "
                                                           "renewal (renewed every lock_ttl/3 while pg_dump runs)")
    lock_wait: int = Field(6 * 3600, ge=0, le=MAX_SECONDS, description="how long a backup waits for a busy "
                                                                       "target or a free slot before failing")
    visibility_timeout: int = Field(6 * 3600, ge=5, le=MAX_SECONDS,
                                    description="Redis redelivery timeout (the same for every consumer)")
    restore_interval: int = Field(10, ge=1, le=3600, description="how often workers look for unacknowledged "
                                                                 "messages to redeliver")
    max_attempts: int = Field(3, ge=1, le=100, description="deliveries of one step (worker killed) before the "
                                                           "run is failed")
    retries: int = Field(3, ge=0, le=100, description="retries of a transient failure (server unreachable)")
    retry_backoff: int = Field(30, ge=0, le=86_400, description="first retry delay in seconds, doubled each time")
    retry_backoff_max: int = Field(600, ge=0, le=MAX_SECONDS, description="the longest retry delay in seconds")
    time_limits: dict[str, int] = Field(
        default_factory=_default_time_limits,
        description="soft time limit per step in seconds; the hard limit is hard_limit_grace later",
    )
    hard_limit_grace: int = Field(60, ge=1, le=86_400, description="seconds between a step's soft and hard time limit")
    result_expires: int = Field(86400, ge=60, le=MAX_SECONDS, description="seconds Celery keeps a task's result")
    per_host_dumps: int = Field(1, ge=0, le=MAX_KEEP_COUNT,
                                description="dumps at once against one database server, across all workers "
                                            "(0 = no cap)")
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
        return {**_default_time_limits(), **self.time_limits}


class FileConfig(Strict):
    """The targets file (YAML, or the same keys in TOML; path in PGBEAT_CONFIG). Every key is optional
    except each target's name and dbname (or `databases: all`). The environment wins over the file for the
    global keys."""

    backup_root: ConfigPath = Field(Path("./backups"), description="where backups are kept (the local "
                                                                   "shelf), relative to the working folder or "
                                                                   "absolute; BACKUP_ROOT in the environment wins")
    timezone: str | None = Field(None, description="schedules and file names; unset: the host's zone; "
                                                   "PGBEAT_TIMEZONE wins", examples=["America/Sao_Paulo"])
    broker_url: SecretStr | None = Field(None, description="Celery broker; unset: embedded (no Celery); "
                                                           "CELERY_BROKER_URL wins",
                                         examples=["redis://:password@redis.internal:6379/0"])
    result_backend: SecretStr | None = Field(None, description="Celery results; CELERY_RESULT_BACKEND wins",
                                             examples=["redis://:password@redis.internal:6379/1"])
    node: NodeName | None = Field(None, description="this host's queue name; unset: the host name; "
                                                    "PGBEAT_NODE wins", examples=["db-backup-1"])
    pg_bin_dir: ConfigPath | None = Field(None, description="the folder of pg_dump, psql, pg_restore for every "
                                                            "target that sets none; unset: chosen per server "
                                                            "major from pg_bin_dirs; PGBEAT_PG_BIN_DIR wins",
                                          examples=["/usr/lib/postgresql/16/bin"])
    pg_bin_dirs: list[Name] = Field(list(DEFAULT_PG_BIN_DIRS),
                                    description="where PostgreSQL installations are looked for, in order: bin "
                                                "folders, templates with {major}, and the words pg_config "
                                                "(`pg_config --bindir`) and PATH; a server of major N gets the "
                                                "client of major N, else the newest newer one",
                                    examples=[["/usr/lib/postgresql/{major}/bin", "/opt/pg18/bin", "PATH"]])
    notify: list[ChannelSpec] = Field(default_factory=list, description="channels for every target "
                                                                        "(PGBEAT_NOTIFY_URLS adds more)")
    monitoring: MonitoringSpec = Field(default_factory=lambda: MonitoringSpec())
    reliability: Reliability = Field(default_factory=lambda: Reliability())
    defaults: TargetOptions = Field(default_factory=lambda: TargetOptions(),
                                    description="shared by every target, overridable per target (tiers, "
                                                "compression and drill key by key)")
    targets: list[Target] = Field(default_factory=list, description="the databases to back up")

    _tz = field_validator("timezone")(lambda v: None if v is None else validate_timezone(v))


class Settings(BaseModel):
    """Everything pgbeat needs, resolved from the environment and the targets file: what `FileConfig`
    validated, with the environment's values over it and the host's defaults filled in (no defaults
    here: each one is on its field in the schema above)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    backup_root: Path
    timezone: str
    broker_url: SecretStr | None
    result_backend: SecretStr | None
    node: str
    pg_bin_dir: Path | None
    pg_bin_dirs: list[str]
    reliability: Reliability
    targets: dict[str, Target] = Field(description="by name: the file's targets and the .env target")
    servers: dict[str, Target] = Field(default_factory=dict,
                                       description="by name: the whole-server targets (databases: all); the "
                                                   "databases each run discovers are targets of their own "
                                                   "(resolve, pgbeat.discovery)")
    defaults: TargetOptions = Field(default_factory=lambda: TargetOptions(),
                                    description="the file's defaults: what rotates backups of targets no longer "
                                                "configured")
    notify: list[ChannelSpec] = Field(description="the file's channels, then PGBEAT_NOTIFY_URLS")
    monitoring: MonitoringSpec
    config_file: Path | None = Field(description="the targets file, if any")

    def channels(self, target: str) -> list[ChannelSpec]:
        """The notification channels of `target`: the global ones, then the target's own."""
        known = self.resolve(target) or self.servers.get(target)
        own = known.notify if known is not None else []
        return [*self.notify, *own]

    def resolve(self, name: str) -> Target | None:
        """The target named `name`: a listed one, or a database of a whole-server target (`prod.erp`, see
        pgbeat.settings.servers), whether or not that database still exists; None for any other name."""
        from pgbeat.settings.servers import split_derived

        if name in self.targets:
            return self.targets[name]
        derived = split_derived(name)
        if derived is None or derived[0] not in self.servers:
            return None
        try:
            return self.servers[derived[0]].for_database(derived[1])
        except ValueError:
            return None

    def owns(self, name: str) -> bool:
        """True when target `name` is configured: listed, or a database of a whole-server target (also one
        gone from its server: its backups are the whole-server target's, never orphans)."""
        return self.resolve(name) is not None

    def configured(self) -> list[Target]:
        """Every configured target: the listed ones, then the whole-server ones (templates, not runnable)."""
        return [*self.targets.values(), *self.servers.values()]

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

    def retention_of(self, target: str, tier: str) -> TierPolicy | None:
        """The retention `target`'s backups of `tier` are rotated by: the target's own; for a target no
        longer configured, the tier's in `defaults` (None when neither has the tier: never rotated)."""
        options = self.resolve(target) or self.defaults
        return options.tiers.get(tier)

    def tier_names(self) -> list[str]:
        """Every tier some target has: the built-in ones, then the extra ones in the order first configured."""
        return list(dict.fromkeys([*TIERS, *(tier for target in self.configured() for tier in target.tiers)]))

    def target(self, name: str) -> Target:
        """The target named `name` (see resolve); raise UnknownTargetError naming the configured ones. A
        whole-server target's own name is not one: it stands for the databases a run discovers."""
        found = self.resolve(name)
        if found is None:
            known = ", ".join(sorted(self.targets)) or "none"
            servers = "".join(f"; {n}.<database> for the databases of {n} (databases: all)"
                              for n in sorted(self.servers))
            raise UnknownTargetError(f"Unknown target {name!r}", hint=f"configured targets: {known}{servers}")
        return found
