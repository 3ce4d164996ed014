"""The manifest model: warnings carry a kind, and manifests written before kinds existed still load."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pgbeat.catalog.manifest import WARNING_KINDS, BackupWarning, Manifest, read_manifest, write_manifest

FIELDS = {"run_id": "r1", "target": "erp", "tier": "daily", "file": "erp_backup_daily_20260101_020000.sql.gz",
          "format": "plain", "codec": "gzip", "size": 10, "sha256": "0" * 64, "complete": True,
          "started_at": "2026-01-01T02:00:00+00:00"}


def test_old_text_warnings_load_with_the_kind_status_decides_by(tmp_path):
    """A version-2 manifest whose warnings are plain text keeps its seal and gets kinds on load."""
    manifest = Manifest.model_validate(FIELDS)
    path = tmp_path / "m.json"
    write_manifest(path, manifest)
    data = json.loads(path.read_text())
    data["warnings"] = ["backup is 1 kB, 3% of the median of the previous 3 (30 kB): was data lost?",
                        "1 table(s) of the previous backup are missing: public.audit", "something else"]
    path.write_text(json.dumps(data))
    loaded = read_manifest(path)
    assert loaded is not None and loaded.seal_problem() is None  # warnings are outside the seal
    assert [w.kind for w in loaded.warnings] == ["size-drop", "tables-gone", "other"]
    assert loaded.warnings[2].text == "something else"


def test_every_kind_is_accepted_and_no_other():
    for kind in WARNING_KINDS:
        assert BackupWarning(kind=kind, text="x").kind == kind
    with pytest.raises(ValidationError, match="unknown warning kind"):
        BackupWarning(kind="sizedrop", text="x")


def test_typed_warnings_round_trip(tmp_path):
    manifest = Manifest.model_validate({**FIELDS, "warnings": [{"kind": "clock", "text": "the clock is off"}]})
    path = tmp_path / "m.json"
    write_manifest(path, manifest)
    assert json.loads(path.read_text())["warnings"] == [{"kind": "clock", "text": "the clock is off"}]
    assert read_manifest(path).warnings == manifest.warnings
