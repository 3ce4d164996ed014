"""The server's globals beside each logical backup: dumped, verified, copied, encrypted, rotated, restored."""

from __future__ import annotations

import gzip
import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import unique
from tests.support import SECRET_PASSWORD, PgCluster, Service

pytestmark = pytest.mark.integration

ROLES_SQL = """
CREATE ROLE app_owner LOGIN PASSWORD 'x';
CREATE ROLE app_reader;
GRANT app_reader TO app_owner;
ALTER ROLE app_reader SET search_path = app;
"""


@pytest.fixture(scope="module")
def source(session_dir):
    """A server of its own whose roles the tests create (the shared clusters stay as they are)."""
    cluster = PgCluster(session_dir, unique("globals_src"))
    cluster.sql(ROLES_SQL)
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def destination(session_dir):
    cluster = PgCluster(session_dir, unique("globals_dst"))
    yield cluster
    cluster.destroy()


def owned_db(cluster: PgCluster) -> str:
    """A database owned by app_owner with a table granted to app_reader."""
    name = unique("app")
    cluster.sql(f"CREATE DATABASE {name} OWNER app_owner")
    cluster.sql("CREATE SCHEMA app AUTHORIZATION app_owner; SET ROLE app_owner; "
                "CREATE TABLE app.items AS SELECT generate_series(1, 5) AS id; "
                "GRANT SELECT ON app.items TO app_reader", name)
    return name


def manifest_of(path):
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def globals_of(backup):
    return backup.with_name(manifest_of(backup)["globals"]["file"])


def test_backup_has_globals_verified_and_damage_fails(workdir, source):
    db = owned_db(source)
    service = Service(workdir, None, [source.target("app", db)])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    [backup] = service.backups("daily")
    record = manifest_of(backup)["globals"]
    path = globals_of(backup)
    assert path.name == backup.name.replace(".sql.gz", ".globals.sql.gz")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record["passwords"] is True and {"app_owner", "app_reader"} <= set(record["roles"])
    assert {"app_owner", "app_reader"} <= set(record["used_roles"])
    text = gzip.decompress(path.read_bytes()).decode()
    assert "CREATE ROLE app_owner;" in text and "SCRAM-SHA-256" in text
    assert path.name in backup.with_name(backup.name + ".sha256").read_text()
    assert service.pgbeat("verify", str(backup)).returncode == 0

    original = path.read_bytes()
    path.write_bytes(original[:-10])
    damaged = service.pgbeat("verify", str(backup))
    assert damaged.returncode == 3, damaged.stdout + damaged.stderr
    assert path.name in damaged.stdout + damaged.stderr
    path.unlink()
    assert service.pgbeat("verify", str(backup)).returncode == 3
