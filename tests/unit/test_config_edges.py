"""The configuration at its edges: files that are not text, bombs and absurd nesting, blank names,
numbers without a ceiling."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path

import annotated_types
import pydantic
import pyrage
import pytest
import yaml

from pgbeat.errors import ConfigError
from pgbeat.settings import (
    MAX_CONFIG_BYTES,
    ChannelSpec,
    DestinationSpec,
    DrillSpec,
    EncryptionSpec,
    EnvSettings,
    FileConfig,
    MonitoringSpec,
    TargetOptions,
    TargetSpec,
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
        (TargetSpec, "targets[0]", {"name": "erp", "dbname": "erp"}),
        (TargetOptions, "defaults", {}),
        (DrillSpec, "targets[0].drill", {}),
        (ChannelSpec, "notify[0]", {"url": "json://127.0.0.1:1/"}),
        (DestinationSpec, "targets[0].destinations[0]",
         {"name": "off", "kind": "ssh", "host": "127.0.0.1", "user": "u", "path": "/backups"}),
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
    seen, stack = [], [FileConfig, TargetSpec, EnvSettings]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            for member in unwrap(info.annotation):
                for inner in [member, *typing.get_args(member)]:
                    for candidate in [inner, *typing.get_args(inner)]:
                        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
                            stack.append(candidate)
    return seen


# Numbers bounded elsewhere: compression levels by codec (a cross-field check), time limits by a validator.
BOUNDED_ELSEWHERE = {("CompressionSpec", "level"), ("Reliability", "time_limits")}


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
