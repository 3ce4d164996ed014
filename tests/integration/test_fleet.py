"""Load: 60 targets on 3 database servers, 2 worker processes with 2 slots each (fault list item 11)."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

import pytest
from celery import Celery

from tests.support import Service, Worker, wait_run

pytestmark = pytest.mark.integration

TARGETS_PER_SERVER = 20


@pytest.fixture
def fleet(pg, pg2, pg3):
    """20 small databases on each of 3 clusters, each with rows of its own."""
    databases = []
    for cluster in (pg, pg2, pg3):
        for i in range(TARGETS_PER_SERVER):
            name = cluster.createdb(f"fleet_{uuid.uuid4().hex[:8]}")
            cluster.sql(f"CREATE TABLE t AS SELECT g AS id, md5(g::text || '{name}') AS h "
                        f"FROM generate_series(1, {100 + i}) AS g", name)
            databases.append((cluster, name))
    yield databases
    for cluster, name in databases:
        cluster.dropdb(name)


def test_sixty_targets_three_servers_caps_hold_and_everything_restores(workdir, fleet, redis_server, make_db):
    targets = [cluster.target(f"t{i:02d}", db) for i, (cluster, db) in enumerate(fleet)]
    service = Service(workdir, redis_server.url, targets, node=f"fleet-{uuid.uuid4().hex[:6]}",
                      reliability={"per_host_dumps": 1, "lock_ttl": 5})
    workers = [Worker(service, name=f"w{n}", concurrency=2) for n in (1, 2)]
    app = Celery(broker=service.redis_url)
    try:
        runs = {}
        for target in targets:
            run_id = uuid.uuid4().hex
            app.send_task("tasks.backup", args=[target["name"], "daily"], task_id=run_id, queue="pgbeat")
            runs[run_id] = target
        states = {run_id: wait_run(redis_server.client, run_id, 600) for run_id in runs}
    finally:
        for worker in workers:
            worker.stop()
    assert [s["status"] for s in states.values()] == ["succeeded"] * 60
    assert all("Task tasks.dump[" in w.log_text() for w in workers)  # both worker processes took part

    by_server = defaultdict(list)
    for run_id, target in runs.items():
        backup = service.backup_root / "daily" / states[run_id]["final_path"].rsplit("/", 1)[-1]
        manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
        start = datetime.fromisoformat(manifest["steps"]["dump"]["started_at"])
        by_server[target["port"]].append((start, start + timedelta(seconds=manifest["steps"]["dump"]["duration_s"]),
                                          target, backup))
    assert len(by_server) == 3
    for spans in by_server.values():
        spans.sort(key=lambda span: span[0])
        for before, after in itertools.pairwise(spans):
            assert before[1] <= after[0], f"two dumps at once on one server: {before[:2]} and {after[:2]}"

    clusters = {cluster.port: cluster for cluster, _ in fleet}
    for spans in by_server.values():
        for _, _, target, backup in spans:
            cluster = clusters[target["port"]]
            restored = make_db("restored", cluster=cluster)
            cluster.restore_plain_gz(backup, restored)
            query = "SELECT count(*) || ':' || md5(string_agg(h, ',' ORDER BY id)) FROM t"
            assert cluster.sql(query, restored) == cluster.sql(query, target["dbname"])
