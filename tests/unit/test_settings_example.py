"""deploy/pgbeat.example.yaml is generated from the schema: current, valid, and showing every key."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import pydantic
import pytest

from pgbeat.settings import (
    DESTINATION_KINDS,
    Compression,
    DrillPolicy,
    FileConfig,
    MonitoringSpec,
    Reliability,
    load_settings,
)
from pgbeat.settings.example import example_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "pgbeat.example.yaml"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME", "BACKUP_ROOT")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_committed_example_is_what_the_schema_renders():
    assert EXAMPLE.read_text() == example_config(), (
        "deploy/pgbeat.example.yaml is stale: run `pgbeat config example > deploy/pgbeat.example.yaml`")


def schema_models() -> list[type[pydantic.BaseModel]]:
    """Every model of the targets file, destinations of every kind included."""
    seen: list[type[pydantic.BaseModel]] = []
    stack: list[typing.Any] = [FileConfig, *DESTINATION_KINDS.values()]
    while stack:
        candidate = stack.pop()
        stack.extend(typing.get_args(candidate))
        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel) and candidate not in seen:
            seen.append(candidate)
            stack.extend(info.annotation for info in candidate.model_fields.values())
    return seen


def test_the_example_shows_every_key_of_every_model():
    text = example_config()
    keys = set(re.findall(r"^\s*(?:# )?(?:- )?(\w+):", text, flags=re.MULTILINE))
    keys |= {key for row in re.findall(r"\{(.*)\}", text) for key in re.findall(r"(\w+):", row)}
    missing = [f"{model.__name__}.{name}" for model in schema_models() for name in model.model_fields
               if name not in keys]
    assert len(schema_models()) >= 12 and not missing


def test_the_example_loads_and_its_values_are_the_defaults(clean_env, monkeypatch):
    monkeypatch.setenv("PGBEAT_CONFIG", str(EXAMPLE))
    settings = load_settings(env_file=None)
    assert sorted(settings.targets) == ["crm", "erp_db"]
    assert settings.reliability == Reliability() and settings.monitoring == MonitoringSpec()
    crm, erp = settings.target("crm"), settings.target("erp_db")
    assert crm.compression == Compression() and crm.drill == DrillPolicy()
    assert (crm.connect_timeout, crm.port, erp.format, erp.jobs) == (10, 5432, "plain", 1)
    assert settings.backup_root == (clean_env / "backups").resolve()
    assert {d.kind for t in settings.targets.values() for d in t.destinations} == set(DESTINATION_KINDS)
