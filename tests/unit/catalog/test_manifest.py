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


def old_seal(data: dict) -> str:
    """The seal as pgbeat computed it before the manifest's parts were typed: SHA-256 of the sealed fields
    of the JSON, canonical."""
    import hashlib

    from pgbeat.catalog.manifest import UNSEALED

    sealed = {k: v for k, v in data.items() if k not in UNSEALED}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def test_an_encrypted_manifest_with_copies_written_as_plain_json_keeps_its_seal(tmp_path):
    """A manifest written when copies and encryption were plain dicts loads typed, seal intact, and is
    written back with the same JSON for them (no nulls added)."""
    data = {"pgbeat_manifest": 2, **Manifest.model_validate(FIELDS).model_dump(mode="json"),
            "file": FIELDS["file"] + ".age",
            "encryption": {"scheme": "age", "recipients": ["age1xyz"], "plaintext": {
                "file": FIELDS["file"], "size": 9, "sha256": "1" * 64, "md5": None}},
            "copies": {"local": {"location": "/b/daily/x", "status": "ok", "stored_at": "2026-01-01T02:01:00"},
                       "s3": {"status": "failed", "error": "no bucket", "at": "2026-01-01T02:02:00",
                              "file": "x.age", "size": 9, "sha256": "2" * 64}}}
    data.pop("seal", None)
    data.pop("physical")  # written before base backups existed: no such key
    data.pop("globals")  # nor globals files
    data.pop("chain")  # nor chains of incremental base backups
    data.pop("properties")  # nor the database's properties
    data["seal"] = old_seal(data)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    loaded = read_manifest(path)
    assert loaded is not None and loaded.seal_problem() is None
    assert loaded.encryption.plaintext.sha256 == "1" * 64 and loaded.copy_at("s3").error == "no bucket"
    assert loaded.good_copies() == ["local"]  # a failed copy is not kept
    write_manifest(path, loaded)
    again = json.loads(path.read_text())
    assert again["copies"] == data["copies"] and again["encryption"] == data["encryption"]
    assert again["seal"] == data["seal"]


def test_encrypted_as_describes_the_stored_file_and_its_plaintext():
    plain = Manifest.model_validate(FIELDS)
    sealed = plain.encrypted_as("x.age", 20, "3" * 64, None, ["age1abc"])
    assert (sealed.file, sealed.size, sealed.sha256) == ("x.age", 20, "3" * 64)
    assert sealed.encryption.plaintext.model_dump() == {"file": plain.file, "size": 10, "sha256": "0" * 64,
                                                        "md5": None}
    assert plain.encryption is None  # the plaintext's manifest is left as it was


def test_copy_states_are_checked():
    from pgbeat.catalog.manifest import COPY_STATES, Copy

    assert [Copy(status=s).ok for s in COPY_STATES] == [s == "ok" for s in COPY_STATES]
    with pytest.raises(ValidationError, match="unknown copy state"):
        Copy(status="done")


def test_a_globals_record_is_sealed_and_follows_the_backups_name(tmp_path):
    from pgbeat.catalog.manifest import GlobalsInfo, globals_name, is_globals_name, new_globals_name

    name = new_globals_name(FIELDS["file"], "zstd")
    assert name == FIELDS["file"].removesuffix(".sql.gz") + ".globals.sql.zst" and is_globals_name(name)
    assert not is_globals_name(FIELDS["file"]) and not is_globals_name(FIELDS["file"] + ".age")
    assert globals_name("x_backup_daily_20260101_020001.dump", name + ".age") == \
        "x_backup_daily_20260101_020001.globals.sql.zst.age"
    manifest = Manifest.model_validate({**FIELDS, "globals": GlobalsInfo(
        file=new_globals_name(FIELDS["file"], "gzip"), size=3, sha256="3" * 64, passwords=True, roles=["a"])})
    assert manifest.checksum_lines().splitlines()[1] == f"{'3' * 64}  {manifest.globals.file}"
    manifest.publish_as(FIELDS["file"].replace("020000", "020001"), "/b", "now")
    assert manifest.globals.file == FIELDS["file"].replace("020000", "020001").replace(".sql.gz", ".globals.sql.gz")
    path = tmp_path / "m.json"
    write_manifest(path, manifest)
    edited = json.loads(path.read_text())
    edited["globals"]["passwords"] = False
    path.write_text(json.dumps(edited))
    assert "does not match its seal" in read_manifest(path).seal_problem()


def test_a_base_backups_wal_range_is_sealed_and_older_seals_hold_without_it(tmp_path):
    from pgbeat.catalog.manifest import PhysicalInfo

    plain = Manifest.model_validate(FIELDS)
    plain.seal = plain.computed_seal()
    data = plain.model_dump(mode="json")
    assert data["physical"] is None and data["globals"] is None and data["chain"] is None
    assert data["properties"] is None
    data.pop("physical")
    data.pop("globals")
    data.pop("chain")
    data.pop("properties")
    assert data["seal"] == old_seal({k: v for k, v in data.items() if k != "seal"})  # as before the field
    base = Manifest.model_validate({**FIELDS, "tier": "base", "format": "tar", "physical": PhysicalInfo(
        timeline=1, start_lsn="0/2000028", end_lsn="0/2000100", start_wal="000000010000000000000002")})
    base.seal = base.computed_seal()
    path = tmp_path / "m.json"
    write_manifest(path, base)
    assert read_manifest(path).seal_problem() is None
    edited = json.loads(path.read_text())
    edited["physical"]["start_lsn"] = "0/1000000"
    path.write_text(json.dumps(edited))
    assert "does not match its seal" in read_manifest(path).seal_problem()


def test_a_base_backups_chain_is_sealed(tmp_path):
    """Which parent an incremental base backup needs is sealed: a restore combines exactly that one."""
    from pgbeat.catalog.manifest import ChainInfo

    incremental = Manifest.model_validate({**FIELDS, "tier": "base", "format": "tar", "chain": ChainInfo(
        kind="incremental", parent="erp_backup_base_20260101_010000.tar.gz", parent_sha256="3" * 64,
        root="erp_backup_base_20260101_010000.tar.gz", depth=1)})
    path = tmp_path / "m.json"
    write_manifest(path, incremental)
    assert read_manifest(path).seal_problem() is None and read_manifest(path).chain.incremental
    edited = json.loads(path.read_text())
    edited["chain"]["parent"] = "erp_backup_base_20251225_010000.tar.gz"
    path.write_text(json.dumps(edited))
    assert "does not match its seal" in read_manifest(path).seal_problem()


def test_first_configured_keeps_the_first_sighting_of_each_tier(tmp_path):
    from datetime import UTC, datetime, timedelta

    from pgbeat.catalog.manifest import CONFIGURED_FILE, first_configured

    root, installed = tmp_path / "backups", datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assert first_configured(root, ["erp/daily"], installed) == {"erp/daily": installed}
    later = installed + timedelta(days=30)
    assert first_configured(root, ["erp/daily", "crm/daily"], later) == {"erp/daily": installed, "crm/daily": later}
    assert (root / CONFIGURED_FILE).stat().st_mode & 0o777 == 0o600 and root.stat().st_mode & 0o777 == 0o700
    (root / CONFIGURED_FILE).write_text("not json")  # a damaged record counts from now, and is rewritten
    assert first_configured(root, ["erp/daily"], later) == {"erp/daily": later}
    assert first_configured(root, ["erp/daily"], later + timedelta(days=1)) == {"erp/daily": later}


@pytest.mark.parametrize("version", ["missing", True, 0, 3, "2"])
def test_a_manifest_is_read_only_with_a_written_readable_version(tmp_path, version):
    import json

    from pgbeat.catalog.manifest import read_manifest

    fields = {"run_id": "r", "target": "erp", "tier": "daily", "file": "f.sql.gz", "format": "plain",
              "codec": "gzip", "size": 1, "complete": True, "started_at": "2026-01-01T00:00:00Z"}
    path = tmp_path / "f.sql.gz.manifest.json"
    path.write_text(json.dumps(fields if version == "missing" else {**fields, "pgbeat_manifest": version}))
    assert read_manifest(path) is None
    path.write_text(json.dumps({**fields, "pgbeat_manifest": 2}))
    assert read_manifest(path) is not None


def test_a_databases_properties_round_trip_through_the_manifest_sealed(tmp_path):
    """What a restore gives a database it creates is recorded whole and sealed: an edited owner is refused."""
    from pgbeat.postgres.database import AclItem, DatabaseProperties

    like = DatabaseProperties(oid=16384, owner="ledger owner", encoding="UTF8", collate="C.UTF-8", ctype="C.UTF-8",
                              locale_provider="c", locale=None, icu_rules=None, collation_version=None,
                              tablespace="archive", connection_limit=5, allow_connections=True, is_template=False,
                              acl=(AclItem("ledger owner", None, (("CONNECT", False),)),
                                   AclItem("ledger owner", "reader", (("CONNECT", True), ("TEMPORARY", False)))),
                              comment="the books", settings=((None, ("work_mem=8MB",)), ("reader", ("search_path=a",))))
    manifest = Manifest.model_validate({**FIELDS, "properties": like.record()})
    manifest.seal = manifest.computed_seal()
    path = tmp_path / "m.json"
    write_manifest(path, manifest)
    loaded = read_manifest(path)
    assert loaded.seal_problem() is None
    assert DatabaseProperties.from_record(loaded.properties) == DatabaseProperties(**{**like.__dict__, "oid": 0})
    assert DatabaseProperties.from_record(loaded.properties).roles() == {"ledger owner", "reader"}
    edited = json.loads(path.read_text())
    edited["properties"]["owner"] = "postgres"
    path.write_text(json.dumps(edited))
    assert "does not match its seal" in read_manifest(path).seal_problem()
