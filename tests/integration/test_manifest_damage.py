"""`pgbeat verify` and `pgbeat restore` (and drills) agree on what a damaged manifest means (issue 11, promise 9).

The damage is generated from the manifest model: every field of `catalog.Manifest` deleted, set to null,
to a wrong type and to a wrong value, plus broken JSON, other versions, another backup's manifest and
damaged `.sha256` files. For each case:
- verify refuses (exit 3) and `restore --yes` refuses with the same code, changing nothing in the
  database, and a drill of the backup fails; a field inside the manifest's seal is always refused;
- or verify accepts and restore accepts too: it goes on to ask for confirmation (exit 2 without a
  terminal, nothing changed); a few such cases restore for real (`--yes`) and are drilled.
"""

from __future__ import annotations

import json
import shutil
import types
import typing
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from pgbeat.catalog.manifest import UNSEALED, Manifest, checksum_path, find_backup, manifest_path
from pgbeat.restore.drill import run_drill
from pgbeat.settings import load_settings
from tests.support import Service, run_cli

pytestmark = pytest.mark.integration

KINDS = ("delete", "null", "wrong type", "wrong value")
FIELD_CASES = [f"{name}: {kind}" for name in Manifest.model_fields for kind in KINDS]
# The other damage, with the verdict both must give (3: refused as damaged, 0: harmless).
OTHER_CASES = {"truncated JSON": 3, "invalid JSON": 3, "empty file": 3, "binary": 3, "JSON array": 3,
               "no manifest": 3, "a directory": 3, "version 1 (unsealed)": 0, "version 3": 3, "version true": 3,
               "another backup's manifest": 3, "another backup's manifest renamed": 3,
               "an extra comment field": 0, ".sha256 missing": 3, ".sha256 empty": 3, ".sha256 wrong digest": 3,
               ".sha256 of another name": 3, ".sha256 binary": 3, ".sha256 with an extra line": 0,
               ".sha256 a directory": 3}
# Accepted damage that is restored in place and drilled for real (the others stop at the confirmation).
FULL_RESTORE = {"version 1 (unsealed)", "drills: wrong value"}


@pytest.fixture(scope="module")
def shelf(pg, tmp_path_factory):
    """A target with two backups (the second of different data), and a Watch on its database."""
    base = tmp_path_factory.mktemp("damage")
    base.chmod(0o755)
    db = pg.createdb("damage_erp")
    pg.sql("CREATE TABLE invoices AS SELECT i AS id FROM generate_series(1, 20) AS i", db)
    service = Service(base, None, [pg.target("erp", db)])
    assert service.pgbeat("backup", "daily").returncode == 0
    pg.sql("INSERT INTO invoices SELECT generate_series(21, 30)", db)
    assert service.pgbeat("backup", "daily").returncode == 0
    first, second = service.backups()
    watch = Watch(pg, db)
    yield service, watch, first, second
    watch.conn.close()
    pg.dropdb(db)


def wrong_type(value, annotation):
    """A JSON value of another type than `value` that pydantic does not coerce into `annotation`."""
    if isinstance(value, str):
        return {"not": "a string"}
    if isinstance(value, bool | int | float):
        return "not a number"
    if isinstance(value, list):
        return {"not": "a list"}
    if isinstance(value, dict):
        return ["not a dict"]
    return {"not": str(annotation)}  # a null optional: no str, int, datetime or list takes an object


def wrong_value(name: str, value, annotation):
    """A valid value of the field's type that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        try:
            return (datetime.fromisoformat(value) + timedelta(days=1)).isoformat()
        except ValueError:
            return {"format": "custom", "codec": "zstd", "tier": "weekly", "status": "failed"}.get(name, "x" + value)
    if isinstance(value, list):
        return value[:-1] if value else [sample(typing.get_args(annotation)[0])]
    if isinstance(value, dict):
        if value:
            key = next(iter(value))
            return {**value, key: wrong_value(key, value[key], typing.Any)}
        return {"x": sample(typing.get_args(annotation)[1] if typing.get_args(annotation) else str)}
    # A null optional: a value of its type.
    inner = next(a for a in typing.get_args(annotation) if a is not type(None))
    return sample(inner)


def sample(annotation):
    """Some valid JSON value of `annotation`."""
    origin = typing.get_origin(annotation) or annotation
    if origin is typing.Any or origin is dict:
        return {}
    if origin is list:
        return []
    if origin is datetime:
        return "2025-11-19T02:00:00+00:00"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # an optional: a value of its type
        return sample(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if hasattr(annotation, "model_fields"):  # a sub-model (FileDigest, DrillRecord, ...): its required fields
        return {name: sample(field.annotation) for name, field in annotation.model_fields.items()
                if field.is_required()}
    return {int: 7, float: 7.5, str: "x", bool: True}[origin]


def damage(case: str, folder: Path, backup: Path, other: Path) -> None:
    """Apply `case` to the copy of `backup` in `folder` (its manifest and .sha256)."""
    manifest, sums = manifest_path(backup), checksum_path(backup)
    data = json.loads(manifest.read_text())
    if case in FIELD_CASES:
        name, kind = case.split(": ")
        annotation = Manifest.model_fields[name].annotation
        if kind == "delete":
            data.pop(name, None)
        elif kind == "null":
            data[name] = None
        elif kind == "wrong type":
            data[name] = wrong_type(data.get(name), annotation)
        else:
            data[name] = wrong_value(name, data.get(name), annotation)
        manifest.write_text(json.dumps(data))
    elif case == "truncated JSON":
        manifest.write_text(manifest.read_text()[:len(manifest.read_text()) // 2])
    elif case == "invalid JSON":
        manifest.write_text("{not json")
    elif case == "empty file":
        manifest.write_text("")
    elif case == "binary":
        manifest.write_bytes(bytes(range(256)))
    elif case == "JSON array":
        manifest.write_text(json.dumps([data]))
    elif case == "no manifest":
        manifest.unlink()
    elif case == "a directory":
        manifest.unlink()
        manifest.mkdir()
    elif case.startswith("version"):
        data["pgbeat_manifest"] = {"version 1 (unsealed)": 1, "version 3": 3, "version true": True}[case]
        if data["pgbeat_manifest"] == 1:
            data.pop("seal")
        manifest.write_text(json.dumps(data))
    elif case == "another backup's manifest":
        shutil.copyfile(manifest_path(other), manifest)
    elif case == "another backup's manifest renamed":
        theirs = json.loads(manifest_path(other).read_text())
        manifest.write_text(json.dumps({**theirs, "file": backup.name}))
    elif case == "an extra comment field":
        manifest.write_text(json.dumps({**data, "comment": "checked by hand on Tuesday"}))
    elif case == ".sha256 missing":
        sums.unlink()
    elif case == ".sha256 empty":
        sums.write_text("")
    elif case == ".sha256 wrong digest":
        sums.write_text(f"{'0' * 64}  {backup.name}\n")
    elif case == ".sha256 of another name":
        sums.write_text(f"{data['sha256']}  {other.name}\n")
    elif case == ".sha256 binary":
        sums.write_bytes(b"\xff\xfe" + bytes(range(256)))
    elif case == ".sha256 with an extra line":
        sums.write_text(sums.read_text() + f"{'0' * 64}  notes.txt\n")
    elif case == ".sha256 a directory":
        sums.unlink()
        sums.mkdir()
    else:
        raise AssertionError(f"unknown case {case}")


def unchanged(case: str, backup: Path) -> bool:
    """True when a field's damage leaves its meaning as it was: deleting a field that holds its default,
    setting a null one to null (but the version key's presence is what marks a pgbeat manifest)."""
    name, kind = case.split(": ")
    if name == "pgbeat_manifest":
        return False
    value = getattr(find_backup(backup).manifest, name)
    field = Manifest.model_fields[name]
    if kind == "delete":
        return not field.is_required() and field.get_default(call_default_factory=True) == value
    return kind == "null" and value is None


class Watch:
    """A session on the target database: what a restore would change is its oid (a swap makes a new
    database and ends this session) and a marker table created after the backups."""

    def __init__(self, pg, db: str) -> None:
        self.pg, self.db = pg, db
        self.conn = self.connect()

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(host=self.pg.host, port=self.pg.port, user="postgres", dbname=self.db,
                               autocommit=True)

    def state(self) -> tuple[int, bool]:
        try:
            return self.query()
        except psycopg.OperationalError:  # the session was ended: the database was swapped
            self.conn.close()
            self.conn = self.connect()
            return self.query()

    def query(self) -> tuple[int, bool]:
        return self.conn.execute("SELECT (SELECT oid FROM pg_database WHERE datname = current_database()), "
                                 "to_regclass('public.marker') IS NOT NULL").fetchone()

    def reset(self) -> tuple[int, bool]:
        """Put the marker back (a restore that went through removed it); return the state."""
        self.state()
        self.conn.execute("CREATE TABLE IF NOT EXISTS marker (id int)")
        return self.query()


@pytest.mark.parametrize("case", FIELD_CASES + list(OTHER_CASES))
def test_verify_restore_and_drills_agree_on_a_damaged_manifest(shelf, tmp_path, monkeypatch, case):
    service, watch, first, second = shelf
    folder = tmp_path / "daily"
    folder.mkdir()
    server_globals = first.with_name(find_backup(first).manifest.globals.file)  # part of the backup
    for path in (first, manifest_path(first), checksum_path(first), server_globals):
        shutil.copyfile(path, folder / path.name)
    backup = folder / first.name
    damage(case, folder, backup, second)
    before = watch.reset()

    verified = run_cli(service, "verify", str(backup))
    refused = verified.exit_code != 0
    restored = run_cli(service, "restore", str(backup), *(["--yes"] if refused or case in FULL_RESTORE else []))
    assert "Traceback" not in verified.output + restored.output
    assert verified.exit_code in (0, 3), verified.output
    if case in OTHER_CASES:
        assert verified.exit_code == OTHER_CASES[case], verified.output
    elif unchanged(case, first):
        assert not refused, f"{case}: the manifest means the same, yet was refused"
    elif case.split(": ")[0] not in UNSEALED:
        assert refused, f"{case}: damage to what the checks rely on was accepted"
    if refused:
        assert restored.exit_code == verified.exit_code, restored.output
        assert watch.state() == before, f"{case}: a refused restore changed the database"
    elif case in FULL_RESTORE:
        assert restored.exit_code == 0 and "match the manifest's row counts" in restored.output, restored.output
        oid, marker = watch.state()
        assert oid != before[0] and not marker  # swapped in: a new database, without the later marker
    else:
        assert restored.exit_code == 2 and "no terminal" in restored.output, restored.output  # checks passed
        assert watch.state() == before

    entry = find_backup(backup)
    if entry is not None and (refused or case in FULL_RESTORE):  # a drill's shelf has only manifests that load
        monkeypatch.setenv("PGBEAT_CONFIG", str(service.config_path))
        drill = run_drill(load_settings(env_file=None), "erp", entry=entry)
        assert drill.passed != refused, (case, drill.problems)
