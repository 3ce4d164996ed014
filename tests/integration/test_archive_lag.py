"""Archive lag and archiving failures in `pgbeat status` and /metrics, against a real PostgreSQL whose
archive_command is a real `pgbeat wal-push` run as the postgres user (the cluster of test_wal.py): healthy,
then archive_command failing, then the server down. The pure part: tests/unit/wal/test_archiver.py.

The tests share one cluster and run in order: each leaves the server in the state the next starts from.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pytest

from pgbeat.wal.archiver import READ_CONNECT_TIMEOUT_S
from tests.integration.test_wal import (  # noqa: F401 - postgres_venv: the fixture
    ArchivingCluster,
    WalWorld,
    chown_postgres,
    postgres_venv,
)
from tests.support import PG_BIN, free_port, make_tempdir, scrape, start_metrics, wait_for

pytestmark = pytest.mark.integration

TARGET = "walpg"
LABEL = f'{{target="{TARGET}"}}'


@pytest.fixture(scope="module")
def cluster(postgres_venv):  # noqa: F811
    base = make_tempdir("pgbeat-archlag-")
    archiving = ArchivingCluster(base, postgres_venv)
    archiving.world.targets[0]["tiers"] = {"base": {"enabled": True}}
    archiving.world.write_config()
    archiving.cluster.sql("CREATE TABLE filler (id int)")
    yield archiving
    archiving.destroy()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def metrics(cluster):
    """A `pgbeat metrics` server over the cluster's configuration; returns its port."""
    port = free_port()
    proc = start_metrics(cluster.world, port)
    yield port
    proc.terminate()
    proc.wait(10)


def switch(cluster: ArchivingCluster) -> str:
    """Write a little and finish the segment (an idle server would not switch); return its name."""
    cluster.cluster.sql("INSERT INTO filler SELECT generate_series(1, 1000)")
    return cluster.cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")


def archiving(cluster: ArchivingCluster) -> dict:
    done = cluster.world.pgbeat("status", "--json")
    assert done.returncode == 0, done.stderr
    [wal] = json.loads(done.stdout)["wal"]
    return wal["archiving"]


def test_a_healthy_archive_is_at_most_one_segment_behind_and_not_failing(cluster, metrics):
    segment = switch(cluster)
    wait_for(lambda: cluster.world.stored(segment, TARGET), 60, what=f"{segment} in the archive")
    status = archiving(cluster)
    assert status["reachable"] and status["archive_mode"] == "on" and not status["failing"], status
    assert status["lag_segments"] in (0, 1) and status["newest_archived"] == segment, status
    assert status["failed_count"] == 0 and status["last_failed_wal"] is None
    assert status["last_archived_wal"] == segment and 0 <= status["lag_seconds"] < 60

    values = scrape(metrics)
    assert values[f"pgbeat_wal_server_reachable{LABEL}"] == 1 and values[f"pgbeat_wal_archive_failing{LABEL}"] == 0
    assert values[f"pgbeat_wal_archive_lag_segments{LABEL}"] <= 1
    assert values[f"pgbeat_wal_archive_failed_count{LABEL}"] == 0

    text = cluster.world.pgbeat("status").stdout
    assert f"archiving {TARGET}: " in text and "segment(s) behind" in text and "no failure" in text, text


def test_a_failing_archive_command_shows_the_failed_segment_failing_and_a_growing_lag(cluster, metrics):
    segment = switch(cluster)  # one archived segment first, so the lag is a number however the tests are ordered
    wait_for(lambda: cluster.world.stored(segment, TARGET), 60, what=f"{segment} in the archive")
    before = archiving(cluster)["lag_segments"]
    cluster.cluster.sql("ALTER SYSTEM SET archive_command = 'false'")
    cluster.cluster.sql("SELECT pg_reload_conf()")
    failed = switch(cluster)
    wait_for(lambda: cluster.cluster.sql("SELECT last_failed_wal FROM pg_stat_archiver") == failed, 30,
             what=f"pg_stat_archiver to report {failed} failed")
    switch(cluster)  # the archiver retries the failed segment first: this one waits behind it

    status = archiving(cluster)
    assert status["failing"] and status["last_failed_wal"] == failed and status["failed_count"] >= 1, status
    assert status["lag_segments"] >= 2 > before, status

    values = scrape(metrics)
    assert values[f"pgbeat_wal_archive_failing{LABEL}"] == 1
    assert values[f"pgbeat_wal_archive_failed_count{LABEL}"] >= 1
    assert values[f"pgbeat_wal_archive_lag_segments{LABEL}"] >= 2

    text = cluster.world.pgbeat("status").stdout
    [line] = [line for line in text.splitlines() if line.startswith(f"archiving {TARGET}: ")]
    assert f"failing: last failed {failed} at " in line, text


def test_a_standby_is_read_without_asking_for_its_current_wal(cluster):
    """pg_current_wal_lsn() raises in recovery: the one query must not call it on a standby."""
    pg = cluster.cluster
    folder = cluster.base / "standby"
    folder.mkdir()
    chown_postgres(folder)
    data, port = folder / "data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    made = subprocess.run([*as_postgres, str(PG_BIN / "pg_basebackup"), "-h", pg.host, "-p", str(pg.port), "-U",
                           "postgres", "-D", str(data), "-R", "--no-sync"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    with open(data / "postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{folder}'\n")
    started = subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                              "-t", "60", "start"], capture_output=True, text=True)
    world = cluster.world
    world.targets.append({**world.targets[0], "name": "standby", "port": port})
    world.write_config()
    try:
        assert started.returncode == 0, started.stderr
        done = world.pgbeat("status", "--json")
        assert done.returncode == 0, done.stderr
        [standby] = [w["archiving"] for w in json.loads(done.stdout)["wal"] if w["target"] == "standby"]
        assert standby["reachable"] and standby["standby"], standby
        assert standby["current_wal"] is None and standby["lag_segments"] is None
        assert "archiving standby: standby (no WAL file of its own" in world.pgbeat("status").stdout
    finally:
        world.targets.pop()
        world.write_config()
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)


def test_a_server_down_is_unreachable_in_one_line_without_a_traceback(cluster, metrics):
    cluster.cluster.stop()
    try:
        done = cluster.world.pgbeat("status")
        assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr
        [line] = [line for line in done.stdout.splitlines() if line.startswith(f"archiving {TARGET}: ")]
        assert line.startswith(f"archiving {TARGET}: server not reachable: Cannot connect to "), done.stdout
        status = archiving(cluster)
        assert not status["reachable"] and status["error"] and status["lag_segments"] is None, status

        values = scrape(metrics)
        assert values[f"pgbeat_wal_server_reachable{LABEL}"] == 0
        assert f"pgbeat_wal_archive_failing{LABEL}" not in values  # unknown, not "not failing"
    finally:
        cluster.cluster.start()


def test_servers_that_never_answer_cost_status_one_short_connect_timeout_in_all(workdir):
    """Three base-tier targets on a port that accepts TCP and never answers (a hung host): read at once,
    each within the short timeout, not the targets' own connect_timeout of 10 s one after another."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        world = WalWorld(workdir, [{"name": f"hung{n}", "dbname": "postgres", "host": "127.0.0.1", "port": port,
                                    "user": "postgres", "tiers": {"base": {"enabled": True}}} for n in range(3)])
        started = time.monotonic()
        done = world.pgbeat("status")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("archiving hung")]
    assert len(lines) == 3 and all("server not reachable" in line and "timeout" in line for line in lines), lines
    assert READ_CONNECT_TIMEOUT_S <= elapsed < 2 * READ_CONNECT_TIMEOUT_S, elapsed
