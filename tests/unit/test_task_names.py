"""Every task of a target is named by what it does to which target and tier (Celery's shadow name), however
it is sent: what Flower's task list, `celery events` and `celery inspect` show instead of `tasks.<step>`.
The same names through a real worker and Flower: tests/integration/test_flower.py."""

from __future__ import annotations

import importlib
import os

import yaml

from pgbeat.coordination.dispatch import task_label
from pgbeat.pipeline.record import new_run
from pgbeat.pipeline.steps_table import STEP_TABLE
from pgbeat.settings import load_settings


def task(name: str):
    return getattr(importlib.import_module(f"tasks.{name}"), name)


def test_each_task_of_a_target_names_its_target_and_tier(monkeypatch, tmp_path, own_celery_app):
    for key in list(os.environ):
        if key.startswith(("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME", "BACKUP_ROOT")):
            monkeypatch.delenv(key)
    path = tmp_path / "pgbeat.yaml"
    path.write_text(yaml.safe_dump({"backup_root": str(tmp_path), "timezone": "UTC", "node": "n1",
                                    "targets": [{"name": "erp", "dbname": "erp"}]}))
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    settings = load_settings(env_file=None)
    record = new_run(settings, settings.target("erp"), "weekly").as_json()
    for row in STEP_TABLE:  # a new step is named without anyone remembering to
        assert task(row.name).shadow_name([record], {}, {}) == f"{row.name} erp/weekly"
    assert task("backup").shadow_name(["erp", "daily"], {"scheduled": True}, {}) == "backup erp/daily"
    assert task("drill").shadow_name(["erp"], {"node": "n2"}, {}) == "drill erp"
    assert task("restore").shadow_name(["/b/x.sql.gz", "erp", None, 2], {}, {}) == "restore erp"
    assert task_label("backup", "erp", "daily") == "backup erp/daily" and task_label("drill", "erp") == "drill erp"
