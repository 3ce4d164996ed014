"""Loading: the raw layers merged as plain data, then validated once against the schema.

Two sources, merged into one `Settings`:
- the environment and `.env` in the working directory (pydantic-settings): the seed's `DB_HOST DB_PORT
  DB_NAME DB_USER DB_PASSWORD BACKUP_ROOT` define one target named `TARGET_NAME` (default: `DB_NAME`),
  plus the global `PGBEAT_CONFIG`, `CELERY_BROKER_URL`, `CELERY_RESULT_BACKEND`, `PGBEAT_TIMEZONE`,
  `PGBEAT_NODE`, `PGBEAT_PG_BIN_DIR`, `PGBEAT_NOTIFY_URLS`;
- a targets file (YAML or TOML, path in `PGBEAT_CONFIG`) with many targets, shared `defaults`, and the
  global settings. The environment wins over the file for the global settings.

Every problem in either source is collected and raised together as one `ConfigError`, each line naming
the key and the file it came from. Secrets are `SecretStr` and never appear in those lines.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgbeat.errors import ConfigError
from pgbeat.settings.fields import ConfigPath, DatabaseName, Name, NodeName
from pgbeat.settings.files import read_config_file, read_text_file
from pgbeat.settings.rules import LEVEL_RANGES, SECRET_KEY_HINTS, host_timezone, validate_target_name, validate_timezone
from pgbeat.settings.schema import DESTINATION_KINDS, ChannelSpec, FileConfig, Settings, Target

# The target keys whose mappings merge key by key over `defaults`; any other key a target sets replaces
# the default's value whole (a target's `destinations` or `notify` list is its own, not appended).
MERGED_KEY_BY_KEY = ("compression", "drill")


# The environment's variables for global settings, and the key each sets in the file's schema.
ENV_GLOBALS = {"backup_root": "backup_root", "pgbeat_timezone": "timezone", "celery_broker_url": "broker_url",
               "celery_result_backend": "result_backend", "pgbeat_node": "node", "pgbeat_pg_bin_dir": "pg_bin_dir"}


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


# --- merging the raw layers -----------------------------------------------------------------------------


def without_nulls(data: Any) -> Any:
    """Given raw target options (a target or `defaults`), return them without the keys whose value is
    null, also inside `compression`, `drill` and each tier: `port: ~` means "unset, use the default", as
    leaving the key out does. Anything that is not a mapping is left as it is, for validation to report."""
    if not isinstance(data, dict):
        return data
    cleaned = {key: value for key, value in data.items() if value is not None}
    for key in MERGED_KEY_BY_KEY:
        if isinstance(cleaned.get(key), dict):
            cleaned[key] = {k: v for k, v in cleaned[key].items() if v is not None}
    if isinstance(cleaned.get("tiers"), dict):
        cleaned["tiers"] = {tier: {k: v for k, v in values.items() if v is not None}
                            if isinstance(values, dict) else values for tier, values in cleaned["tiers"].items()}
    return cleaned


def merge_target(defaults: Any, own: Any) -> tuple[Any, set[tuple[Any, ...]]]:
    """Given the raw `defaults` section and one raw target, return the target's merged raw data and the
    key paths whose values came from `defaults` (so that an error there is reported once, at `defaults`).
    `tiers` merge tier by tier and key by key, `compression` and `drill` key by key; every other key of
    the target replaces the default's whole. Anything that is not a mapping is left for validation."""
    defaults = without_nulls(defaults) if isinstance(defaults, dict) else {}
    if not isinstance(own, dict):
        return own, set()
    own = without_nulls(own)
    merged = {**defaults, **own}
    inherited: set[tuple[Any, ...]] = {(key,) for key in defaults if key not in own}
    for key in (*MERGED_KEY_BY_KEY, "tiers"):
        base, value = defaults.get(key), own.get(key)
        if not (key in own and isinstance(base, dict) and isinstance(value, dict)):
            continue
        merged[key] = {**base, **value}
        inherited |= {(key, inner) for inner in base if inner not in value}
        if key == "tiers":  # one level deeper: a tier the target sets still inherits its other keys
            for tier, tier_value in value.items():
                tier_base = base.get(tier)
                if isinstance(tier_base, dict) and isinstance(tier_value, dict):
                    merged[key][tier] = {**tier_base, **tier_value}
                    inherited |= {(key, tier, inner) for inner in tier_base if inner not in tier_value}
    return merged, inherited


# --- error lines ----------------------------------------------------------------------------------------


def format_loc(loc: tuple[Any, ...]) -> str:
    """Given a pydantic error location, return it as `targets[2].tiers.daily.keep_days`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Given an error location, return it without the destination kind pydantic puts after the index of a
    discriminated union (`destinations, 0, s3, bucket` is `destinations[0].bucket` in the file)."""
    out: list[Any] = []
    for index, part in enumerate(loc):
        if (index >= 2 and part in DESTINATION_KINDS and isinstance(loc[index - 1], int)
                and loc[index - 2] == "destinations"):
            continue
        out.append(part)
    return tuple(out)


def _destination_message(error: Mapping[str, Any]) -> str | None:
    """Given a pydantic error, return what to say of a destination's kind or of a key its kind does not
    have, or None for any other error."""
    kinds = ", ".join(DESTINATION_KINDS)
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return f"a destination needs a kind: {kinds}"
    loc = tuple(error["loc"])
    kind = next((part for part in loc if part in DESTINATION_KINDS), None)
    if error["type"] == "extra_forbidden" and kind is not None:
        keys = ", ".join(DESTINATION_KINDS[kind].model_fields)
        return f"not a key of a destination of kind {kind!r} (its keys: {keys})"
    return None


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
                 prefix: tuple[Any, ...] = (), inherited: set[tuple[Any, ...]] = frozenset()) -> list[str]:
    """Given a validation error, return one line per problem naming its key and `where` it is; problems
    under a key path in `inherited` (values from `defaults`, reported there) are left out."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = _without_union_tags(tuple(error["loc"]))
        if any(loc[:len(path)] == path for path in inherited):
            continue
        msg = _destination_message(error) or error["msg"].removeprefix("Value error, ")
        error = {**error, "loc": (*prefix, *loc)}
        if env_names is not None:
            field = str(error["loc"][0]) if error["loc"] else ""
            lines.append(f"{field.upper()} in {env_names.get(field.upper(), where)}: {msg}{_safe_input(error)}")
        else:
            lines.append(f"{where}: At '{format_loc(error['loc'])}': {msg}{_safe_input(error)}")
    return lines


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
    if target.whole_server:
        if target.dbname is not None:
            problems.append(("dbname", "dbname and databases: all exclude each other (a target backs up one "
                                       "database, or every database of its server)"))
        if target.runs_tier("base"):
            problems.append(("tiers.base", "a whole-server target dumps each database; a base backup (PITR) is "
                                           "of the whole cluster already: give it a target of its own, with dbname"))
        if target.wal.receiver:
            problems.append(("wal.receiver", "the WAL is the whole cluster's: stream it for a target of its own, "
                                             "with dbname"))
    else:
        if target.dbname is None:
            problems.append(("dbname", "missing: name the target's database, or back up every database of the "
                                       "server with databases: all"))
        for key in ("include", "exclude"):
            if getattr(target, key):
                problems.append((key, "only with databases: all (it chooses among the server's databases)"))
    return problems


def validate_target(raw: Any, defaults: Any, source: str
                    ) -> tuple[Target | None, set[tuple[Any, ...]], ValidationError | None]:
    """Given one raw target, the raw `defaults` and where the target is defined, return (the Target, the
    key paths it inherited, None), or (None, those key paths, the validation error): the target's keys
    laid over the defaults as plain data, then validated once."""
    merged, inherited = merge_target(defaults, raw)
    try:
        target = Target.model_validate(merged)
    except ValidationError as exc:
        return None, inherited, exc
    target._source = source  # not a key of the file: set by the loader, for messages
    return target, inherited, None


# --- loading --------------------------------------------------------------------------------------------


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

    config_path = None
    data: dict[str, Any] = {}
    # Read the targets file even when the environment has errors, so that all errors are listed at once.
    raw_config = env.pgbeat_config if env is not None else (
        os.environ.get("PGBEAT_CONFIG") or (dotenv_values(env_path).get("PGBEAT_CONFIG") if dotenv else None))
    if raw_config:
        config_path = Path(raw_config).expanduser().resolve()
        read, file_errors = read_config_file(config_path)
        errors.extend(file_errors)
        data = {key: value for key, value in read.items() if value is not None} if read is not None else {}
    if env is not None:  # the environment's globals win over the file's: laid over them before validation
        data.update({key: getattr(env, var) for var, key in ENV_GLOBALS.items() if getattr(env, var) is not None})
    raw_targets = data.pop("targets", None) or []
    if not isinstance(raw_targets, list):
        errors.append(f"{config_path}: At 'targets': must be a list of targets")
        raw_targets = []
    if "defaults" in data:
        data["defaults"] = without_nulls(data["defaults"])
    raw_defaults = data.get("defaults", {})

    targets: dict[str, Target] = {}
    seen_names: set[str] = set()
    for index, raw in enumerate(raw_targets):
        target, inherited, exc = validate_target(raw, raw_defaults, f"{config_path} targets[{index}]")
        if target is None:
            errors.extend(_error_lines(exc, str(config_path), prefix=("targets", index), inherited=inherited))
            continue
        errors.extend(f"{config_path}: At 'targets[{index}].{field}': {msg}"
                      for field, msg in _target_problems(target))
        if target.name in seen_names:
            errors.append(f"{config_path}: At 'targets[{index}].name': duplicate target name {target.name!r}")
        seen_names.add(target.name)
        targets[target.name] = target
    # The names `<server>.<database>` belong to a whole-server target: no other target may take one.
    servers = {name: target for name, target in targets.items() if target.whole_server}
    for index, name in enumerate(t.get("name") if isinstance(t, dict) else None for t in raw_targets):
        owner = next((s for s in servers if isinstance(name, str) and name.startswith(f"{s}.")), None)
        if owner is not None and name in targets:
            errors.append(f"{config_path}: At 'targets[{index}].name': {name!r} is in the names of whole-server "
                          f"target {owner!r} (its databases are backed up as {owner}.<database>): choose another")
    file_cfg: FileConfig | None = None
    try:
        # The targets are validated already (instances are not validated again): this checks the rest.
        file_cfg = FileConfig.model_validate({**data, "targets": list(targets.values())})
    except ValidationError as exc:
        errors.extend(_error_lines(exc, str(config_path)))

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
            own = {"name": name, "dbname": env.db_name, "host": env.db_host, "port": env.db_port,
                   "user": env.db_user, "password": env.db_password, "healthcheck_url": env.db_healthcheck_url}
            target, _inherited, _error = validate_target(own, raw_defaults, f"DB_* in {env_label}")
            # The environment's values are valid already: an error here is in `defaults`, reported above.
            if target is not None:
                errors.extend(f"{env_label}: the .env target's {field}: {msg}"
                              for field, msg in _target_problems(target))
                owner = next((s for s in servers if name.startswith(f"{s}.")), None)
                if owner is not None:
                    errors.append(f"{key} in {names.get(key, 'the environment')}: {name!r} is in the names of "
                                  f"whole-server target {owner!r}: choose another")
                if name in targets:
                    errors.append(f"{key} in {names.get(key, 'the environment')}: target {name!r} is also defined "
                                  f"in {config_path}")
                targets[name] = target
    elif any(getattr(env, f) for f in ("db_host", "db_port", "db_user", "db_password", "target_name")):
        errors.append(f"DB_NAME in {env_label}: missing; DB_HOST/DB_PORT/DB_USER/DB_PASSWORD define a target "
                      "only together with DB_NAME")

    if errors or file_cfg is None:
        raise ConfigError(errors)

    notify = list(file_cfg.notify)
    if env.pgbeat_notify_urls:
        notify += [ChannelSpec(url=SecretStr(url), events=["failure", "warning"])
                   for url in re.split(r"[\s,]+", env.pgbeat_notify_urls.get_secret_value()) if url]
    return Settings(
        backup_root=file_cfg.backup_root.expanduser().resolve(),
        timezone=file_cfg.timezone or host_timezone(),
        broker_url=file_cfg.broker_url,
        result_backend=file_cfg.result_backend,
        node=file_cfg.node or socket.gethostname(),
        pg_bin_dir=file_cfg.pg_bin_dir,
        pg_bin_dirs=file_cfg.pg_bin_dirs,
        reliability=file_cfg.reliability,
        targets={name: target for name, target in targets.items() if not target.whole_server},
        servers=servers,
        defaults=file_cfg.defaults,
        notify=notify,
        monitoring=file_cfg.monitoring,
        config_file=config_path,
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return this process's settings, loaded once (workers, beat and the CLI each load their own)."""
    return load_settings()
