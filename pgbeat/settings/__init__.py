"""Configuration: the single source of truth, validated by pydantic.

- `schema`: the one schema of the targets file (every key, its description, bounds and default) and the
  resolved `Settings` the rest of pgbeat reads;
- `load`: the environment, `.env` and the targets file merged as plain data, then validated once;
- `files`: reading the targets file safely (bounded, UTF-8, no alias bombs);
- `rules`: the tiers, steps, limits and checks of names and values, in plain Python (no pydantic);
- `fields`: those checks as pydantic field types of the models;
- `example`: `deploy/pgbeat.example.yaml`, rendered from the schema.

Importing this package loads only `rules`: every other name is imported on first use (PEP 562), so that
`pgbeat --help` and the command line's checks of its arguments do not pay for pydantic and the models
(~100 ms); `from pgbeat.settings import Settings` works as before.
"""

import sys

from pgbeat.settings.rules import (
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
    DumpFormat,
    _path_not_blank,
    _validate_listen,
    host_timezone,
    parse_listen,
    validate_cron,
    validate_database_name,
    validate_node_name,
    validate_not_blank,
    validate_target_name,
    validate_tier_name,
    validate_timezone,
)

# The names of the modules that import pydantic, loaded when one of them is first asked for.
LAZY = {
    "pgbeat.settings.fields": ("ConfigPath", "DatabaseName", "Listen", "Name", "NodeName", "TierName"),
    "pgbeat.settings.files": ("read_config_file", "read_text_file"),
    "pgbeat.settings.load": ("EnvSettings", "format_loc", "get_settings", "load_settings", "merge_target"),
    "pgbeat.settings.schema": (
        "DEFAULT_TIERS", "DESTINATION_KINDS", "ChannelSpec", "Compression", "DestinationBase", "DestinationSpec",
        "DrillPolicy", "EncryptionSpec", "FileConfig", "GCSDestination", "MonitoringSpec", "Reliability",
        "RetentionSpec", "S3Destination", "SSHDestination", "Settings", "Target", "TargetOptions", "TierPolicy",
        "WalSpec", "quote_conninfo",
    ),
}
MODULE_OF = {name: module for module, names in LAZY.items() for name in names}


def __getattr__(name: str):
    """Import the module that defines `name` (pgbeat.settings.schema for `Settings`, ...) and return it."""
    module = MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    __import__(module)  # not importlib.import_module: -X importtime shows what goes through __import__ only
    value = getattr(sys.modules[module], name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *MODULE_OF])


__all__ = [
    "DEFAULT_LEVELS", "DEFAULT_TIERS", "DESTINATION_KINDS", "LEVEL_RANGES", "MAX_BYTES", "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH", "MAX_CONFIG_VALUES", "MAX_KEEP_COUNT", "MAX_KEEP_DAYS", "MAX_SECONDS", "PHYSICAL_TIERS",
    "STEPS", "TIERS",
    "ChannelSpec", "Codec", "Compression", "ConfigPath", "DatabaseName", "DestinationBase", "DestinationSpec",
    "DrillPolicy", "DumpFormat", "EncryptionSpec", "EnvSettings", "FileConfig", "GCSDestination", "Listen",
    "MonitoringSpec", "Name", "NodeName", "Reliability", "RetentionSpec", "S3Destination", "SSHDestination",
    "Settings", "Target", "TargetOptions", "TierName", "TierPolicy", "WalSpec", "_path_not_blank", "_validate_listen",
    "format_loc", "get_settings", "host_timezone", "load_settings", "merge_target", "parse_listen",
    "quote_conninfo", "read_config_file", "read_text_file", "validate_cron", "validate_database_name",
    "validate_node_name", "validate_not_blank", "validate_target_name", "validate_tier_name", "validate_timezone",
]
