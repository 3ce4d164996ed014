"""Configuration: the single source of truth, validated by pydantic.

- `schema`: the one schema of the targets file (every key, its description, bounds and default) and the
  resolved `Settings` the rest of pgbeat reads;
- `load`: the environment, `.env` and the targets file merged as plain data, then validated once;
- `files`: reading the targets file safely (bounded, UTF-8, no alias bombs);
- `fields`: limits and checks shared by the models;
- `example`: `deploy/pgbeat.example.yaml`, rendered from the schema.
"""

from pgbeat.settings.fields import (
    DEFAULT_LEVELS,
    LEVEL_RANGES,
    MAX_BYTES,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    MAX_KEEP_COUNT,
    MAX_KEEP_DAYS,
    MAX_SECONDS,
    PHYSICAL_TIERS,
    STEPS,
    TIERS,
    Codec,
    ConfigPath,
    DatabaseName,
    DumpFormat,
    Listen,
    Name,
    NodeName,
    Tier,
    _path_not_blank,
    _validate_listen,
    host_timezone,
    parse_listen,
    validate_cron,
    validate_database_name,
    validate_node_name,
    validate_not_blank,
    validate_target_name,
    validate_timezone,
)
from pgbeat.settings.files import read_config_file, read_text_file
from pgbeat.settings.load import EnvSettings, format_loc, get_settings, load_settings, merge_target
from pgbeat.settings.schema import (
    DEFAULT_TIERS,
    DESTINATION_KINDS,
    ChannelSpec,
    Compression,
    DestinationBase,
    DestinationSpec,
    DrillPolicy,
    EncryptionSpec,
    FileConfig,
    GCSDestination,
    MonitoringSpec,
    Reliability,
    RetentionSpec,
    S3Destination,
    Settings,
    SSHDestination,
    Target,
    TargetOptions,
    TierPolicy,
    WalSpec,
    quote_conninfo,
)

__all__ = [
    "DEFAULT_LEVELS", "DEFAULT_TIERS", "DESTINATION_KINDS", "LEVEL_RANGES", "MAX_BYTES", "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH", "MAX_CONFIG_VALUES", "MAX_KEEP_COUNT", "MAX_KEEP_DAYS", "MAX_SECONDS", "PHYSICAL_TIERS",
    "STEPS", "TIERS",
    "ChannelSpec", "Codec", "Compression", "ConfigPath", "DatabaseName", "DestinationBase", "DestinationSpec",
    "DrillPolicy", "DumpFormat", "EncryptionSpec", "EnvSettings", "FileConfig", "GCSDestination", "Listen",
    "MonitoringSpec", "Name", "NodeName", "Reliability", "RetentionSpec", "S3Destination", "SSHDestination",
    "Settings", "Target", "TargetOptions", "Tier", "TierPolicy", "WalSpec", "_path_not_blank", "_validate_listen",
    "format_loc", "get_settings", "host_timezone", "load_settings", "merge_target", "parse_listen",
    "quote_conninfo", "read_config_file", "read_text_file", "validate_cron", "validate_database_name",
    "validate_node_name", "validate_not_blank", "validate_target_name", "validate_timezone",
]
