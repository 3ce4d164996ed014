"""The WAL receiver (`wal.receiver`, `pgbeat receive`) against real parts: a throwaway cluster with no
archive_command, a real Redis, and two `pgbeat receive` processes playing two worker hosts (PGBEAT_NODE).
Exactly one holds the lease and streams; its segments land in the local archive as wal-push stores them;
SIGKILLed, the other takes over within a minute with no segment missing; a base backup plus the received
WAL recovers to a moment between two commits through `restore --pitr` (wal-fetch as postgres).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pgbeat.coordination.leases import parse_token, receiver_lease_key
from pgbeat.wal.archive import STORED_NAME, following_segments
from pgbeat.wal.receiver import slot_name
from tests.integration.test_wal import (  # noqa: F401 - postgres_venv: the fixture
    WalWorld,
    chown_postgres,
    postgres_ids,
    postgres_venv,
)
from tests.support import PG_BIN, VENV_BIN, PgCluster, clear_pgbeat_env, free_port, make_tempdir, wait_for

pytestmark = pytest.mark.integration



class Receiving:
    """A cluster without archive_command, a WalWorld for it, and `pgbeat receive` processes as hosts."""

    def __init__(self, base, redis_url: str, pgbeat_script, target: str) -> None:
        self.base, self.redis_url, self.pgbeat_script, self.target = base, redis_url, pgbeat_script, target
        self.cluster = PgCluster(base, "recvpg")
        self.world = WalWorld(base / "cfg", [{"name": target, "dbname": "postgres", "host": "127.0.0.1",
                                              "port": self.cluster.port, "user": "postgres",
                                              "wal": {"receiver": True}, "tiers": {"base": {"enabled": True}}}])
        self.world.base.chmod(0o755)
        (self.world.backup_root / "wal").mkdir()
        chown_postgres(self.world.backup_root / "wal")  # the restored server's wal-fetch reads it as postgres
        self.hosts: dict[str, subprocess.Popen] = {}

    def start(self, node: str, **extra: str) -> subprocess.Popen:
        env = self.world.env(PGBEAT_NODE=node, CELERY_BROKER_URL=self.redis_url, **extra)
        with open(self.base / f"receive-{node}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), "-v", "receive"], cwd=self.world.base, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.hosts[node] = proc
        return proc

    def log(self, node: str) -> str:
        return (self.base / f"receive-{node}.log").read_text()

    def holder(self) -> dict | None:
        return parse_token(self.redis().get(receiver_lease_key(self.target)))

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def slot_active(self) -> bool:
        slot = slot_name(self.target)
        return self.cluster.sql(f"SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'") == "t"

    def switch(self) -> str:
        return self.cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")

    def stored_segments(self) -> list[str]:
        names = [m["wal"] for p in self.world.archive(self.target).rglob("*")
                 if not p.name.startswith(".") and (m := STORED_NAME.fullmatch(p.name))]
        return sorted(n for n in names if len(n) == 24)

    def received(self) -> Path:
        """The receive folder (the two processes share BACKUP_ROOT, as two hosts would share nothing else)."""
        return self.world.backup_root / ".work" / f"receive-{self.target}"

    def destroy(self) -> None:
        for proc in self.hosts.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.cluster.destroy()


@pytest.fixture
def receiving(redis_server, postgres_venv, request):  # noqa: F811
    base = make_tempdir("pgbeat-recv-")
    world = Receiving(base, redis_server.url, postgres_venv, f"recv_{request.node.name[5:20]}")  # one lease each
    yield world
    world.destroy()
    shutil.rmtree(base, ignore_errors=True)


def receiver_gauges(monkeypatch, receiving: Receiving) -> dict[str, float]:
    """The pgbeat_wal_receiver_* samples /metrics would serve now, from settings loaded as the service's."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pgbeat.monitoring.metrics import registry_for
    from pgbeat.settings import load_settings

    clear_pgbeat_env(monkeypatch)
    monkeypatch.setenv("PGBEAT_CONFIG", str(receiving.world.config_path))
    monkeypatch.setenv("CELERY_BROKER_URL", receiving.redis_url)
    text = generate_latest(registry_for(load_settings(env_file=None))).decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("pgbeat_wal_receiver_")}


def test_one_receiver_streams_another_takes_over_without_a_gap_and_pitr_recovers(receiving, monkeypatch):
    pg, world, target = receiving.cluster, receiving.world, receiving.target
    first, second = receiving.start("hosta"), receiving.start("hostb")
    holder = wait_for(receiving.holder, 30, what="a receiver to take the lease")
    wait_for(receiving.slot_active, 30, what="pg_receivewal streaming from the slot")
    procs = {"hosta": first, "hostb": second}
    holding, standing_by = holder["node"], ({"hosta", "hostb"} - {holder["node"]}).pop()
    assert int(holder["pid"]) == procs[holding].pid
    assert int(pg.sql("SELECT count(*) FROM pg_stat_replication")) == 1  # only one streams

    based = world.pgbeat("backup", "base", "--target", target)
    assert based.returncode == 0, based.stdout + based.stderr

    pg.sql("CREATE TABLE moments (id int, at timestamptz DEFAULT clock_timestamp())")
    pg.sql("INSERT INTO moments (id) VALUES (1)")  # t1
    t0 = time.monotonic()
    one = receiving.switch()
    wait_for(lambda: world.stored(one, target), 20, what=f"{one} received and archived")
    assert time.monotonic() - t0 < 10
    [stored] = world.stored(one, target)
    assert stored.stat().st_uid == postgres_ids()[0] and stored.stat().st_mode & 0o777 == 0o600
    assert not (receiving.received() / one).exists()  # removed once archived

    # The holder's host dies: the other takes the lease once it expires, and its pg_receivewal goes on
    # from the slot.
    procs[holding].send_signal(signal.SIGKILL)
    procs[holding].wait()
    killed = time.monotonic()
    taken = wait_for(lambda: (h := receiving.holder()) and h["node"] == standing_by and h, 60,
                     what=f"{standing_by} to take over the lease")
    assert int(taken["pid"]) == procs[standing_by].pid
    wait_for(receiving.slot_active, 30, what="the new holder's pg_receivewal streaming")
    assert time.monotonic() - killed < 60

    pg.sql("INSERT INTO moments (id) VALUES (2)")  # t2
    moment = pg.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
    time.sleep(1.2)
    pg.sql("INSERT INTO moments (id) VALUES (3)")  # t3
    two = receiving.switch()
    wait_for(lambda: world.stored(two, target), 30, what=f"{two} archived by the new holder")

    # No gap: every segment from the first received to the last is in the archive.
    segments = receiving.stored_segments()
    assert segments[-1] == two and one in segments
    assert segments == [segments[0], *following_segments(segments[0], len(segments) - 1)], segments

    shown = world.pgbeat("status", "--json", CELERY_BROKER_URL=receiving.redis_url)
    assert shown.returncode == 0, shown.stderr
    [wal] = json.loads(shown.stdout)["wal"]
    assert wal["receiver"]["holder"] == standing_by and wal["receiver"]["since"], wal
    assert wal["receiver"]["last_segment"] == two and wal["gap_count"] == 0, wal
    text = world.pgbeat("status", CELERY_BROKER_URL=receiving.redis_url, COLUMNS="200")
    assert f"receiver {target}: streaming on {standing_by} since" in text.stdout, text.stdout
    assert "archive_mode is off" not in text.stdout, text.stdout
    gauges = receiver_gauges(monkeypatch, receiving)
    assert gauges["pgbeat_wal_receiver_streaming"] == 1
    assert abs(gauges["pgbeat_wal_receiver_last_segment_timestamp_seconds"] - time.time()) < 300

    checked = world.pgbeat("check", "--target", target, "--timeout", "30")  # archive_mode is off: no matter
    assert checked.returncode == 0 and "archived (local)" in checked.stdout, checked.stdout + checked.stderr

    data = make_tempdir("pgbeat-recv-pitr-") / "data"
    port = free_port()
    try:
        restored = world.pgbeat("restore", "--pitr", "--target", target, "--to", moment, "--data-dir", str(data),
                                "--start", "--port", str(port), "--server-pgbeat", str(receiving.pgbeat_script),
                                "--timeout", "120")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        rows = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                               "postgres", "-d", "postgres", "-c", "SELECT string_agg(id::text, ',' ORDER BY id) "
                               "FROM moments"], capture_output=True, text=True)
        assert rows.stdout.strip() == "1,2", rows.stdout + rows.stderr + restored.stdout
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(data.parent, ignore_errors=True)

    # A clean stop: one line, pg_receivewal gone, the lease released for another host at once.
    procs[standing_by].send_signal(signal.SIGTERM)
    assert procs[standing_by].wait(40) == 0
    assert receiving.log(standing_by).rstrip().endswith("pgbeat receive: stopped"), receiving.log(standing_by)
    assert receiving.holder() is None
    assert receiver_gauges(monkeypatch, receiving)["pgbeat_wal_receiver_streaming"] == 0  # the alert's input
    wait_for(lambda: not receiving.slot_active(), 10, what="pg_receivewal to stop")
    assert os.path.isdir(receiving.received())


def test_a_lost_lease_stops_pg_receivewal_at_once_and_a_failed_push_stays_for_the_next_receiver(receiving):
    """Another process's token in the lease (taken, as after a Redis failover): pg_receivewal stops within
    one renewal and nothing streams while the other holds it. A segment whose push fails stays in the
    receive folder, and the next receiver archives it."""
    pg, world, target = receiving.cluster, receiving.world, receiving.target
    failing = receiving.start("hosta", PGBEAT_FAULTS="wal.push-staged=transient")  # every push fails, staged
    wait_for(receiving.slot_active, 30, what="pg_receivewal streaming")

    pg.sql("CREATE TABLE filler (id int); INSERT INTO filler VALUES (1)")
    kept = receiving.switch()
    wait_for(lambda: (receiving.received() / kept).exists(), 20, what=f"{kept} received")
    time.sleep(2)  # several rounds of pushes that fail
    assert (receiving.received() / kept).exists() and not world.stored(kept, target)
    assert "tried again in the next round" in receiving.log("hosta")

    key = receiver_lease_key(target)
    receiving.redis().set(key, "elsewhere|1|receiver|0123456789ab", px=90_000)  # outlasts the test
    stopped = wait_for(lambda: not receiving.slot_active() and time.monotonic(), 15,
                       what="pg_receivewal to stop once the lease is lost")
    assert "lost " in receiving.log("hosta") or "lease lost" in receiving.log("hosta"), receiving.log("hosta")
    time.sleep(3)
    assert not receiving.slot_active() and receiving.holder()["node"] == "elsewhere"
    assert failing.poll() is None  # it waits to take the lease again
    failing.send_signal(signal.SIGINT)  # Ctrl-C
    assert failing.wait(40) == 0
    assert receiving.log("hosta").rstrip().endswith("pgbeat receive: stopped"), receiving.log("hosta")
    assert time.monotonic() - stopped < 40

    receiving.redis().delete(key)
    receiving.start("hostb")  # no fault: archives what the failed pushes left, then streams on
    wait_for(lambda: world.stored(kept, target), 30, what=f"{kept} archived by the next receiver")
    wait_for(lambda: not (receiving.received() / kept).exists(), 10, what=f"{kept} removed once archived")
    # A round archives the folder's leftovers before it tries for the lease: the lease comes just after.
    wait_for(lambda: (receiving.holder() or {}).get("node") == "hostb", 15, what="hostb to hold the lease")


def test_the_worker_runs_the_receiver_and_releases_it_at_shutdown(receiving):
    from tests.support import Service, Worker

    pg, target = receiving.cluster, receiving.target
    service = Service(receiving.base / "service", receiving.redis_url, receiving.world.targets, node="workerhost")
    worker = Worker(service)
    try:
        wait_for(lambda: (h := receiving.holder()) and h["node"] == "workerhost", 30, what="the worker's receiver")
        wait_for(receiving.slot_active, 30, what="pg_receivewal streaming from the worker")
        pg.sql("CREATE TABLE filler (id int); INSERT INTO filler VALUES (1)")
        segment = receiving.switch()
        wait_for(lambda: list((service.backup_root / "wal" / target).rglob(f"{segment}-*")), 20,
                 what=f"{segment} archived by the worker")
    finally:
        worker.stop()
    assert receiving.holder() is None, worker.log_text()[-2000:]  # released at shutdown, not left to expire
    assert not receiving.slot_active()
