"""Shared fixtures: throwaway clusters and Redis for the whole session, fresh databases per test."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.support import PgCluster, RedisServer, make_tempdir

DATA = Path(__file__).parent / "data"

# pytest-xdist's worker processes are started with COLUMNS=80 (execnet's popen), which every pgbeat the
# tests run would inherit and wrap its output by; a test that wants a width passes COLUMNS itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

# The longest files first, so that with several test processes (`make test`, --dist loadfile) none of them
# is left running one long file after the others have finished: a few minutes each, measured 2026-12-06.
LONGEST_FIRST = ("test_schedule_faults.py", "test_wal.py", "test_restore_safety.py", "test_faults.py",
                 "test_kill_matrix.py", "test_fleet.py", "test_receiver.py", "test_incremental.py",
                 "test_globals.py", "test_whole_server.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def session_dir():
    path = make_tempdir("pgbeat-tests-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(session_dir):
    cluster = PgCluster(session_dir, "pg1")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def pg2(session_dir):
    cluster = PgCluster(session_dir, "pg2")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def redis_server(session_dir):
    server = RedisServer(session_dir)
    yield server
    server.stop()


@pytest.fixture
def workdir(tmp_path):
    tmp_path.chmod(0o755)
    return tmp_path


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_db(pg):
    """Create databases on a cluster (default: pg) with an optional SQL file; drop them afterwards."""
    created = []

    def make(prefix: str = "db", sql: Path | None = None, cluster: PgCluster | None = None) -> str:
        cluster = cluster or pg
        name = cluster.createdb(unique(prefix))
        created.append((cluster, name))
        if sql is not None:
            cluster.psql_file(sql, name)
        return name

    yield make
    for cluster, name in created:
        cluster.dropdb(name)


@pytest.fixture
def rich_db(make_db):
    return make_db("rich", DATA / "rich.sql")


@pytest.fixture(scope="session")
def pg3(session_dir):
    cluster = PgCluster(session_dir, "pg3")
    yield cluster
    cluster.destroy()


@pytest.fixture
def own_celery_app():
    """A Celery app of the test's own, current while it runs: the `tasks.*` modules' shared tasks resolve to
    it whatever app an earlier test left current (an integration test's `Celery(broker=...)`)."""
    from celery import Celery
    from celery._state import get_current_app

    before = get_current_app()
    app = Celery("pgbeat-unit-tests", set_as_current=True)
    app.finalize()
    yield app
    app.close()
    before.set_current()
