"""The storage interface as a checklist: every backend and wrapper has every operation; what a manifest
says is stored (`stored_files`), which deep verification reads back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pgbeat.catalog.manifest import FileDigest, Manifest
from pgbeat.storage import GCSStorage, LocalStorage, RetryingStorage, S3Storage, SSHStorage, ThrottledStorage
from pgbeat.storage.base import Capabilities, is_staging, staging_name

OPERATIONS = ("put", "get", "load", "stat", "list", "delete", "verify", "describe", "close", "__enter__", "__exit__")


@pytest.mark.parametrize("cls", [LocalStorage, S3Storage, GCSStorage, SSHStorage])
def test_every_backend_has_every_operation(cls):
    missing = [name for name in OPERATIONS if not callable(getattr(cls, name, None))]
    assert missing == []


@pytest.mark.parametrize("wrap", [RetryingStorage, lambda inner: ThrottledStorage(inner, bytes_per_second=1e6)])
def test_every_wrapper_offers_every_operation(wrap, tmp_path):
    wrapped = wrap(LocalStorage(tmp_path))  # what a wrapper does not override, it hands to the backend
    missing = [name for name in OPERATIONS if not callable(getattr(wrapped, name, None))]
    assert missing == []


def test_capabilities_pass_through_wrappers(tmp_path):
    local = LocalStorage(tmp_path)
    assert local.capabilities == Capabilities(shallow_reads_back=True, consumes_source=True)
    wrapped = RetryingStorage(ThrottledStorage(local, bytes_per_second=1e9))
    assert wrapped.capabilities is local.capabilities
    ssh = SSHStorage("127.0.0.1", user="u", path="/b", remote_sha256sum=False)
    assert ssh.capabilities.shallow_reads_back
    assert not SSHStorage("h", user="u", path="/b").capabilities.shallow_reads_back


def test_staging_names_are_hidden_unique_and_recognised():
    first, second = staging_name("a.sql.gz"), staging_name("a.sql.gz")
    assert first != second and first.startswith(".a.sql.gz.partial-")
    assert is_staging(first) and is_staging(staging_name("d.dir", "deleting")) and is_staging(".b.partial")
    assert not is_staging("a.sql.gz") and not is_staging(".a.manifest.json.lock")


def _manifest(**fields) -> Manifest:
    return Manifest(run_id="r", target="erp", tier="daily", codec="gzip", complete=True,
                    started_at=datetime(2025, 11, 19, 2, tzinfo=UTC), **fields)


def test_stored_files_lists_a_directory_backup_per_file_and_any_other_as_one():
    files = [FileDigest(name="toc.dat", size=10, md5="m1", sha256="a" * 64),
             FileDigest(name="3001.dat.gz", size=20, md5="m2", sha256="b" * 64)]
    directory = _manifest(file="x.dir", format="directory", size=30, files=files)
    assert directory.stored_files() == files
    single = _manifest(file="x.sql.gz", format="plain", size=5, sha256="c" * 64, md5="d" * 32)
    assert single.stored_files() == [FileDigest(name="", size=5, md5="d" * 32, sha256="c" * 64)]
    assert _manifest(file="old.dir", format="directory", size=30).stored_files() == []  # older pgbeat
    assert _manifest(file="old.sql.gz", format="plain", size=5).stored_files() == []


def test_a_sealed_directory_manifest_keeps_its_seal_with_optional_md5():
    files = [FileDigest(name="toc.dat", size=10, md5="m1", sha256="a" * 64)]
    manifest = _manifest(file="x.dir", format="directory", size=10, files=files)
    manifest.seal = manifest.computed_seal()
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again.seal_problem() is None and again.files[0].md5 == "m1"
