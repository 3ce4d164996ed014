"""The configuration at its edges: files that are not text, bombs and absurd nesting, blank names,
numbers without a ceiling; and a fuzz over the whole schema with extreme values: whatever passes the
loader must work in rotation, status, metrics and the schedule."""

from __future__ import annotations

import itertools
import os
import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import annotated_types
import pydantic
import pyrage
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pgbeat.clitypes import EARLIEST_TIME, LATEST_TIME
from pgbeat.errors import ConfigError
from pgbeat.settings import (
    MAX_CONFIG_BYTES,
    TIERS,
    ChannelSpec,
    Compression,
    DrillPolicy,
    EncryptionSpec,
    EnvSettings,
    FileConfig,
    GCSDestination,
    MonitoringSpec,
    Reliability,
    RetentionSpec,
    S3Destination,
    SSHDestination,
    Target,
    TargetOptions,
    TierPolicy,
    _path_not_blank,
    _validate_listen,
    load_settings,
    validate_database_name,
    validate_node_name,
    validate_not_blank,
)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith(("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME", "BACKUP_ROOT")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_file(folder: Path, monkeypatch, content: bytes | str, name: str = "pgbeat.yaml"):
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    return load_settings(env_file=None)


def alias_bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]" for n in range(1, 10)]
    return "\n".join(lines) + "\n"


BAD_FILES = [
    ("latin-1", "pgbeat.yaml", "targets:\n  - {name: erp, dbname: caf\xe9}\n".encode("latin-1"), "not UTF-8 text"),
    ("binary", "pgbeat.yaml", bytes(range(256)) * 8, "not UTF-8 text"),
    ("NUL bytes", "pgbeat.yaml", b"targets: []\n\x00\x00\x00\n", "binary"),
    ("utf-16", "pgbeat.toml", "[[targets]]\nname = 'erp'\n".encode("utf-16"), "not UTF-8 text"),
    ("deep YAML", "pgbeat.yaml", "a: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    ("deep YAML mapping", "pgbeat.yaml", "".join(f"{'  ' * n}k{n}:\n" for n in range(60)) + "  " * 60 + "x: 1\n",
     "nested more than"),
    ("deep TOML", "pgbeat.toml", "a = " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    ("moderately deep TOML", "pgbeat.toml", "a = " + "[" * 40 + "]" * 40 + "\n", "nested more than"),
    ("alias bomb", "pgbeat.yaml", alias_bomb(), "expands to more than"),
    ("recursive alias", "pgbeat.yaml", "a: &x [1, *x]\n", "recursive"),
    ("scalar", "pgbeat.yaml", "just a string\n", "must be a mapping"),
    ("list", "pgbeat.yaml", "- a\n- b\n", "must be a mapping"),
    ("huge", "pgbeat.yaml", "# " + "x" * (MAX_CONFIG_BYTES + 10) + "\n", "larger than"),
    ("python tag", "pgbeat.yaml", "a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("bad TOML", "pgbeat.toml", "a = = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize(("name", "content", "expected"), [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_a_file_that_is_not_a_usable_config_is_one_clear_line(folder, monkeypatch, name, content, expected):
    with pytest.raises(ConfigError) as exc:
        load_file(folder, monkeypatch, content, name)
    [line] = exc.value.errors
    assert line.startswith(str(folder / name)) and expected in line, line
    assert len(line) < 300


@pytest.mark.parametrize("where", ["/dev/zero", "directory", "fifo", "missing"])
def test_a_targets_file_that_is_not_a_regular_file(folder, monkeypatch, where):
    path = {"/dev/zero": Path("/dev/zero"), "directory": folder, "fifo": folder / "fifo",
            "missing": folder / "missing.yaml"}[where]
    if where == "fifo":
        os.mkfifo(path)  # reading it would block forever
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    with pytest.raises(ConfigError) as exc:
        load_settings(env_file=None)
    [line] = exc.value.errors
    assert str(path) in line and ("not a regular file" in line or "no such file" in line), line


def test_a_dotenv_that_is_not_text_is_reported_with_the_other_errors(folder, monkeypatch):
    env = folder / ".env"
    env.write_bytes(b"DB_NAME=caf\xe9\n")
    (folder / "pgbeat.yaml").write_text("targets:\n  - {name: erp, dbname: erp, port: 70000}\n")
    monkeypatch.setenv("PGBEAT_CONFIG", str(folder / "pgbeat.yaml"))
    with pytest.raises(ConfigError) as exc:
        load_settings(env_file=env)
    assert any(str(env) in line and "not UTF-8" in line for line in exc.value.errors), exc.value.errors
    assert any("At 'targets[0].port'" in line for line in exc.value.errors), exc.value.errors


def test_yaml_anchors_that_stay_small_still_work(folder, monkeypatch):
    settings = load_file(folder, monkeypatch, "defaults: &d {user: backup, tiers: {daily: {keep_days: 9}}}\n"
                                              "targets:\n  - {name: a, dbname: a}\n  - {<<: *d, name: b, dbname: b}\n")
    assert settings.target("a").user == "backup" and settings.target("b").tiers["daily"].keep_days == 9


# --- the schema, walked: blank names, ceilings ----------------------------------------------------------

RECIPIENT = str(pyrage.x25519.Identity.generate().to_public())
NAME_CHECKS = {validate_not_blank, validate_database_name, validate_node_name, _path_not_blank, _validate_listen}


def unwrap(annotation) -> list:
    """The member types of an annotation (Optional and unions opened), Annotated kept."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def checks_of(info) -> set:
    """The validator functions on a field (pydantic keeps a bare Annotated's in the field's metadata)."""
    found = {getattr(meta, "func", None) for meta in info.metadata} - {None}
    for member in unwrap(info.annotation):
        if typing.get_origin(member) is typing.Annotated:
            for meta in typing.get_args(member)[1:]:
                func = getattr(meta, "func", None)
                if func is not None:
                    found.add(getattr(func, "__wrapped__", func))
    return found


def models_with_paths():
    """(model, path in a document, minimal valid document at that path) for every model of the file."""
    return [
        (FileConfig, "", {}),
        (Target, "targets[0]", {"name": "erp", "dbname": "erp"}),
        (TargetOptions, "defaults", {}),
        (DrillPolicy, "targets[0].drill", {}),
        (ChannelSpec, "notify[0]", {"url": "json://127.0.0.1:1/"}),
        (SSHDestination, "targets[0].destinations[0]",
         {"name": "off", "kind": "ssh", "host": "127.0.0.1", "user": "u", "path": "/backups"}),
        (S3Destination, "targets[0].destinations[0]", {"name": "off-s3", "kind": "s3", "bucket": "b"}),
        (GCSDestination, "targets[0].destinations[0]", {"name": "off-gcs", "kind": "gcs", "bucket": "b"}),
        (EncryptionSpec, "targets[0].encryption", {"recipients": [RECIPIENT]}),
        (MonitoringSpec, "monitoring", {}),
    ]


def place(path: str, value: dict) -> dict:
    """A document with `value` at `path` (`targets[0].drill`), and what a target needs around it."""
    document: dict = {}
    if path.startswith("targets[0]"):
        document["targets"] = [{"name": "erp", "dbname": "erp"}]
    if not path:
        document.update(value)
        return document
    cursor: typing.Any = document
    parts = path.replace("[0]", ".0").split(".")
    for part, following in zip(parts, [*parts[1:], None], strict=True):
        key: typing.Any = 0 if part == "0" else part
        if following is None:
            if isinstance(cursor, list):
                cursor[0] = {**cursor[0], **value} if cursor else value
                if not cursor:
                    cursor.append(value)
            else:
                cursor[key] = {**cursor.get(key, {}), **value}
        elif following == "0":
            cursor = cursor.setdefault(key, [{}]) if isinstance(cursor, dict) else cursor[key]
        else:
            cursor = cursor.setdefault(key, {}) if isinstance(cursor, dict) else cursor[key]
    return document


BLANK_CASES = [(model, path, base, field) for model, path, base in models_with_paths()
               for field, info in model.model_fields.items() if checks_of(info) & NAME_CHECKS]


@pytest.mark.parametrize("blank", ["", "   "])
@pytest.mark.parametrize(("model", "path", "base", "field"), BLANK_CASES,
                         ids=[f"{p or 'top'}.{f}" for _, p, _, f in BLANK_CASES])
def test_a_blank_name_in_the_file_is_an_error_never_the_default(folder, monkeypatch, model, path, base, field, blank):
    load_file(folder, monkeypatch, yaml.safe_dump(place(path, base)))  # the document around it is valid
    with pytest.raises(ConfigError) as exc:
        load_file(folder, monkeypatch, yaml.safe_dump(place(path, {**base, field: blank})))
    key = f"{path}.{field}" if path else field
    assert any(f"At '{key}'" in line and "empty or blank" in line for line in exc.value.errors), exc.value.errors


def test_the_blank_cases_cover_every_kind_of_name():
    covered = {f"{path}.{field}" for _, path, _, field in BLANK_CASES}
    assert {"targets[0].dbname", "targets[0].host", "targets[0].user", ".backup_root", ".node",
            "targets[0].destinations[0].bucket", "targets[0].destinations[0].path", "monitoring.metrics_listen",
            "targets[0].encryption.identity_file", "targets[0].drill.host"} <= covered | {
        f".{f}" for _, p, _, f in BLANK_CASES if not p}


def all_models():
    seen, stack = [], [FileConfig, Target, EnvSettings]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            for member in unwrap(info.annotation):
                nested = [member]  # opened all the way down: lists of a discriminated union of models
                while nested:
                    candidate = nested.pop()
                    nested.extend(typing.get_args(candidate))
                    if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
                        stack.append(candidate)
    return seen


# Numbers bounded elsewhere: compression levels by codec (a cross-field check), time limits by a validator.
BOUNDED_ELSEWHERE = {("Compression", "level"), ("Reliability", "time_limits")}


def test_every_number_in_the_schema_has_a_ceiling():
    unbounded = []
    for model in all_models():
        for name, info in model.model_fields.items():
            members = unwrap(info.annotation)
            numeric = any(m in (int, float) for m in members)
            ceiling = any(isinstance(meta, annotated_types.Le | annotated_types.Lt) for meta in info.metadata)
            if numeric and not ceiling and (model.__name__, name) not in BOUNDED_ELSEWHERE:
                unbounded.append(f"{model.__name__}.{name}")
    assert not unbounded


@pytest.mark.parametrize(("text", "key"), [
    ("targets:\n  - {name: a, dbname: a, tiers: {daily: {keep_days: 1000000}}}\n", "targets[0].tiers.daily.keep_days"),
    ("targets:\n  - {name: a, dbname: a, compression: {level: 100000000000000000000}}\n",
     "targets[0].compression.level"),
    ("reliability: {time_limits: {dump: 99999999999}}\n", "reliability.time_limits"),
    ("monitoring: {min_duration_s: .inf}\n", "monitoring.min_duration_s"),
    ("monitoring: {size_drop_ratio: .nan}\n", "monitoring.size_drop_ratio"),
    ("targets:\n  - {name: a, dbname: a, tiers: {daily: {schedule: '0 0 * * 7'}}}\n",
     "targets[0].tiers.daily.schedule"),
    ("targets:\n  - {name: a, dbname: a, tiers: {daily: {schedule: '0 0 L * *'}}}\n",
     "targets[0].tiers.daily.schedule"),
    (f"targets:\n  - {{name: a, dbname: {'d' * 64}}}\n", "targets[0].dbname"),
])
def test_values_that_would_break_later_are_refused_now(folder, monkeypatch, text, key):
    with pytest.raises(ConfigError) as exc:
        load_file(folder, monkeypatch, text)
    assert any(f"At '{key}'" in line for line in exc.value.errors), exc.value.errors


# --- fuzz: the whole schema with extreme values -------------------------------------------------------

EXTREME_INTS = [-(2**63), -1, 0, 1, 2, 5, 59, 60, 64, 65535, 65536, 36_500, 36_501, 86_400, 2_592_000, 2_592_001,
                2**31, 2**63, 10**30]
EXTREME_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-300, 0.5, 0.999, 1.0, 1.0001, 100.0,
                  1e308]
TEXTS = ["", "   ", "x" * 300, "a\nb", "\x1b[31m", "-x", "../../etc", "erp", "127.0.0.1", "ção", "erp", "db-1"]
SPECIAL = {
    "schedule": ["0 2 * * *", "*/1 * * * *", "0 0 29 2 *", "59 23 31 12 *", "0 0 * * 7", "0 0 L * *", "61 0 * * *"],
    "timezone": ["UTC", "Pacific/Kiritimati", "America/Sao_Paulo", "Mars/Olympus"],
    "metrics_listen": ["127.0.0.1:9810", "[::1]:1", "localhost:65535", ":9810", "0.0.0.0:0", "h:99999"],
    "recipients": [[RECIPIENT], [], ["age1bad"]],
    "name": ["erp", "crm", "a" * 63, "a" * 64, "../x"],
    "dbname": ["erp", "d" * 63, "d" * 64, "x\x00y"],
    "url": ["json://127.0.0.1:1/", ""],
    "time_limits": [{"dump": 1}, {"dump": 2_592_000}, {"dump": 2_592_001}, {"bogus": 5}],
    "pg_dump_options": [["-xO"], ["--clean"], ["--fil=x"], ["--lock-wait-timeout=1s", "-t", "a"]],
    "events": [["failure", "success"], ["bogus"]],
}
SKIPPED = {"backup_root", "broker_url", "result_backend", "pg_bin_dir", "passfile", "credentials_file", "key_file",
           "known_hosts", "identity_file", "password", "access_key_id", "secret_access_key", "healthcheck_url"}


def bounds_of(metadata) -> tuple[float | None, float | None]:
    low = high = None
    for meta in metadata:
        if isinstance(meta, annotated_types.Ge | annotated_types.Gt):
            low = getattr(meta, "ge", None) if isinstance(meta, annotated_types.Ge) else meta.gt
        if isinstance(meta, annotated_types.Le | annotated_types.Lt):
            high = getattr(meta, "le", None) if isinstance(meta, annotated_types.Le) else meta.lt
    return low, high


def number_for(kind: type, metadata) -> st.SearchStrategy:
    """Half the time a value at the field's own bounds (which must work), half an extreme one."""
    low, high = bounds_of(metadata)
    edges = [kind(v) for v in (low, high) if v is not None]
    if kind is float:
        edges = [*edges, *(kind(v) + d for v in (low, high) if v is not None for d in (1e-9, -1e-9))]
    edges = [v for v in edges if (low is None or v >= low) and (high is None or v <= high)] or [kind(1)]
    extremes = EXTREME_INTS if kind is int else EXTREME_FLOATS + EXTREME_INTS[:8]
    beyond = [kind(v) + d for v in (low, high) if v is not None for d in (-1, 1)]
    return st.one_of(st.sampled_from(edges), st.sampled_from(extremes + beyond))


def value_for(field: str, annotation, metadata=(), depth: int = 0) -> st.SearchStrategy:
    if field in SPECIAL:
        return st.sampled_from(SPECIAL[field])
    options = []
    for member in unwrap(annotation):
        base, extra = member, list(metadata)
        if typing.get_origin(member) is typing.Annotated:
            base, *more = typing.get_args(member)
            extra += more
        origin = typing.get_origin(base)
        if base is bool:
            options.append(st.booleans())
        elif base in (int, float):
            options.append(number_for(base, extra))
        elif base in (str, Path):
            options.append(st.sampled_from(TEXTS))
        elif origin is typing.Literal:
            options.append(st.sampled_from([*typing.get_args(base), "bogus"]))
        elif origin is list and depth < 3:
            options.append(st.lists(value_for(field, typing.get_args(base)[0], (), depth + 1), max_size=2))
        elif origin is dict and depth < 3:
            key_type, value_type = typing.get_args(base)
            keys = list(typing.get_args(key_type)) if typing.get_origin(key_type) is typing.Literal else ["daily"]
            options.append(st.dictionaries(st.sampled_from(keys), value_for(field, value_type, (), depth + 1),
                                           max_size=2))
        elif isinstance(base, type) and issubclass(base, pydantic.BaseModel) and depth < 3:
            options.append(document_for(base, depth + 1))
    return st.one_of(options) if options else st.none()


def document_for(model, depth: int = 0) -> st.SearchStrategy:
    fields = {name: value_for(name, info.annotation, info.metadata, depth) for name, info in model.model_fields.items()
              if name not in SKIPPED and name != "targets"}
    return st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=4).flatmap(
        lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen}))


def parts_of(path: str) -> list:
    """'targets[0].tiers.daily' as ['targets', 0, 'tiers', 'daily']."""
    return [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".") if p]


# Every field of every model at its place in a document: the fuzz sets one to three of them at a time in
# an otherwise valid document, so that each extreme value is tried on its own as well as together.
# Each kind of destination at its own index, so that its own keys are tried in a destination of its kind.
DESTINATION_AT = {SSHDestination: 0, S3Destination: 1, GCSDestination: 2}
LEAF_MODELS = [*((model, f"targets[0].destinations[{DESTINATION_AT[model]}]" if model in DESTINATION_AT else path, base)
                 for model, path, base in models_with_paths()),
               *((TierPolicy, f"targets[0].tiers.{tier}", {}) for tier in TIERS),
               (Compression, "targets[0].compression", {}),
               (RetentionSpec, "targets[0].destinations[0].retention.daily", {}), (Reliability, "reliability", {})]
LEAVES = [([*parts_of(path), name], value_for(name, info.annotation, info.metadata, 1))
          for model, path, _base in LEAF_MODELS for name, info in model.model_fields.items()
          if name not in SKIPPED and name != "targets"]
NEEDS = {**{("targets", 0, "destinations", index): base for model, _path, base in models_with_paths()
            for kind, index in DESTINATION_AT.items() if model is kind}, ("targets", 0, "encryption"): {
    "recipients": [RECIPIENT]}, ("notify", 0): {"url": "json://127.0.0.1:1/"}}


def set_in(document: dict, parts: list, value) -> None:
    cursor: typing.Any = document
    for part, following in itertools.pairwise(parts):
        if isinstance(part, int):
            while len(cursor) <= part:
                cursor.append({})
        container = cursor[part] if isinstance(part, int) else cursor.get(part)
        if not isinstance(container, dict | list):
            container = [] if isinstance(following, int) else {}
            cursor[part] = container
        cursor = container
    if isinstance(parts[-1], int):
        while len(cursor) <= parts[-1]:
            cursor.append({})
    cursor[parts[-1]] = value


def build(assignments) -> dict:
    document: dict = {"timezone": "UTC", "targets": [{"name": "erp", "dbname": "erp"}]}
    for index, value in assignments:
        parts = LEAVES[index][0]
        for prefix in NEEDS:
            if tuple(parts[:len(prefix)]) == prefix and len(parts) > len(prefix):
                # the destinations before this one too: a list has no holes
                before = [(*prefix[:-1], i) for i in range(prefix[-1])] if prefix[2:3] == ("destinations",) else []
                for place_ in [*before, prefix]:
                    for key, needed_value in NEEDS[place_].items():
                        set_in(document, [*place_, key], needed_value)
        set_in(document, parts, value)
    return document


documents = st.lists(st.integers(0, len(LEAVES) - 1).flatmap(lambda i: st.tuples(st.just(i), LEAVES[i][1])),
                     min_size=1, max_size=3).map(build)


@dataclass
class FakeEntry:  # what plan_rotation reads of an Entry
    path: Path
    manifest: typing.Any
    exists: bool = True
    verified: bool = True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(document=documents)
@example(document={"targets": [{"name": "erp", "dbname": "erp", "tiers": {"daily": {"keep_days": 1_000_000}}}]})
@example(document={"targets": [{"name": "erp", "dbname": "erp", "tiers": {"daily": {"schedule": "0 0 * * 7"}}}]})
@example(document={"reliability": {"lock_wait": 10**12, "visibility_timeout": 10**13}, "targets": []})
def test_whatever_config_check_accepts_works_in_every_computation(tmp_path_factory, monkeypatch, document):
    """Extreme values anywhere in the schema: `config check` refuses them (exit 2, no traceback), or
    rotation, status, metrics, the beat schedule, Celery's settings and every countdown work with them."""
    from beat_schedule import build_beat_schedule
    from pgbeat import cli
    from pgbeat.monitoring.metrics import families
    from pgbeat.monitoring.status import build_status
    from pgbeat.pipeline.runner import backoff_delays
    from pgbeat.settings import get_settings
    from pgbeat.steps.rotate import plan_rotation
    from workers.config import celery_config

    folder = tmp_path_factory.mktemp("fuzz")
    document = {**document, "backup_root": str(folder / "backups")}
    path = folder / "pgbeat.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    for key in list(os.environ):
        if key.startswith(("DB_", "PGBEAT_", "CELERY_", "TARGET_NAME", "BACKUP_ROOT")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    monkeypatch.chdir(folder)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main, ["config", "check", "--no-connect"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code in (0, 2), (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    try:
        settings_ = load_settings(env_file=None)
    except ConfigError as exc:
        assert result.exit_code == 2 and "Configuration is invalid" in result.output
        assert all("At '" in line or str(path) in line for line in exc.errors), exc.errors
        event("refused")
        return
    event("accepted")
    assert result.exit_code == 0, result.output
    for now in (datetime.now(UTC), EARLIEST_TIME, LATEST_TIME - timedelta(seconds=1)):
        for name, target in settings_.targets.items():
            for tier, policy in target.tiers.items():
                entries = [FakeEntry(Path(f"{name}_{n}"), types.SimpleNamespace(
                    started_at=now - timedelta(days=d), taken_at=now - timedelta(days=d)))
                           for n, d in enumerate((0, 1, 400, 36_000))]
                plan = plan_rotation(entries, policy, now, name, tier)
                assert len(plan.keep) + len(plan.remove) + len(plan.protected) == len(entries)
        report = build_status(settings_, now)
        assert list(families(report))
    schedule = build_beat_schedule(settings_)
    assert all(entry["options"]["expires"] > 0 for entry in schedule.values())
    config = celery_config(settings_)
    r = settings_.reliability
    delays = backoff_delays(settings_)
    for seconds in (*delays, r.lock_ttl, r.lock_wait, r.visibility_timeout, r.result_expires, r.node_timeout,
                    r.beat_lock_timeout, *r.limits().values(), max(r.limits().values()) + r.hard_limit_grace,
                    config["result_expires"]):
        assert datetime.now(UTC) + timedelta(seconds=seconds) < datetime(9999, 1, 1, tzinfo=UTC)
