"""The catalog at fleet size: status, list, metrics and rotate read each tier folder once and each manifest
of the targets they are asked about, and still agree with the manifests on disk at every moment.

The shelves are the benchmark's (bench/fleet.py `build_shelf`): one real backup's manifest copied per target
and backup, re-sealed, so the commands read real, valid manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.fleet import build_shelf
from pgbeat.catalog.manifest import RACY_S, read_manifest, write_manifest
from tests.support import VENV_BIN, Service, free_port, scrape, start_metrics, wait_for

pytestmark = pytest.mark.integration

BACKUPS = 10  # per target: 7 daily, 2 weekly, 1 monthly
# Names that share prefixes, and one that holds `_backup_daily_` itself: a file name must be parsed, not
# matched by prefix, to tell whose backup it is.
TARGETS = [f"t{i:02d}" for i in range(12)] + ["t01_backup_daily_x", "t01-x", "x.y"]

# `pgbeat` in this process with an audit hook that records every manifest it opens (on stderr, as JSON).
AUDITED = """
import json, sys
opened = []
def hook(event, args):
    if event == "open" and str(args[0]).endswith(".manifest.json"):
        opened.append(str(args[0]).rsplit("/", 1)[-1])
sys.addaudithook(hook)
from pgbeat.cli import main
try:
    main(sys.argv[1:])
finally:
    print(json.dumps(opened), file=sys.stderr)
"""


@pytest.fixture
def fleet(workdir, pg, make_db):
    """A shelf of len(TARGETS) targets x BACKUPS backups, and a Service whose targets file names them."""
    db = make_db("fleetcat")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS id", db)
    seed = Service(workdir / "seed", None, [pg.target("seed", db)])
    done = seed.pgbeat("backup", "daily", "--local")
    assert done.returncode == 0, done.stderr
    [seed_file] = seed.backups()
    service = Service(workdir / "fleet", None, [pg.target(name, db) for name in TARGETS])
    written = build_shelf(service.backup_root, seed_file, TARGETS, BACKUPS, datetime.now(UTC))
    return service, written


def audited(service: Service, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run([str(VENV_BIN / "python"), "-c", AUDITED, *args], cwd=service.cwd, env=service.env(),
                          capture_output=True, text=True, timeout=120)
    return done, json.loads(done.stderr.strip().splitlines()[-1])


def kept(status: dict, target: str) -> dict[str, int]:
    return {t["tier"]: t["kept"].get("local", 0) for t in status["tiers"] if t["target"] == target}


def test_status_and_list_agree_with_each_targets_manifests(fleet):
    service, written = fleet
    status = json.loads(service.pgbeat("status", "--json").stdout)
    for name in TARGETS:
        assert kept(status, name) == {"daily": 7, "weekly": 2, "monthly": 1}, name
        newest = {t["tier"]: t["last_success_file"] for t in status["tiers"] if t["target"] == name}
        assert newest["daily"] == written[name][0].name
    everything = json.loads(service.pgbeat("list", "--json").stdout)
    assert sorted(b["file"] for b in everything) == sorted(p.name for files in written.values() for p in files)
    for name in ("t01", "t01_backup_daily_x", "x.y"):
        done = service.pgbeat("list", "--target", name, "--json")
        assert done.returncode == 0, done.stderr
        assert sorted(b["file"] for b in json.loads(done.stdout)) == sorted(p.name for p in written[name])


@pytest.mark.parametrize("name", ["t01", "t01_backup_daily_x", "x.y"])
def test_list_of_one_target_opens_only_its_manifests(fleet, name):
    service, written = fleet
    done, opened = audited(service, "list", "--target", name, "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(opened) == sorted(p.name + ".manifest.json" for p in written[name])


def test_status_opens_each_manifest_once(fleet):
    service, written = fleet
    done, opened = audited(service, "status", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(opened) == sorted(p.name + ".manifest.json" for files in written.values() for p in files)


def test_the_metrics_server_sees_every_change_at_the_next_scrape(fleet):
    service, written = fleet
    port = free_port()
    proc = start_metrics(service, port)

    def kept_metric(target: str, tier: str = "daily") -> float:
        return scrape(port).get(f'pgbeat_backups_kept{{destination="local",target="{target}",tier="{tier}"}}', 0)

    try:
        time.sleep(RACY_S + 0.2)  # the folders settled: what the server lists now it may keep
        assert kept_metric("t03") == 7
        assert kept_metric("t03") == 7  # listed from what the server kept of the last scrape
        # A backup added, the folder's time then set back to what it was (a second change within one tick
        # of the file system's clock): seen all the same.
        folder = written["t05"][0].parent
        before = os.stat(folder)
        build_shelf(service.backup_root, written["t06"][0], ["t05"], 1, datetime.now(UTC))
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert kept_metric("t05") == 8
        # A backup removed (as rotate does: data, sums, manifest).
        gone = written["t03"][1]
        for path in (gone, gone.with_name(gone.name + ".sha256"), gone.with_name(gone.name + ".manifest.json")):
            path.unlink()
        assert kept_metric("t03") == 6
        # A manifest rewritten in place by another worker: that backup's copy no longer counts.
        changed = written["t04"][0].with_name(written["t04"][0].name + ".manifest.json")
        manifest = read_manifest(changed)
        manifest.status = "failed"
        write_manifest(changed, manifest)
        assert kept_metric("t04") == 6
    finally:
        proc.terminate()
        proc.wait(10)


def test_rotate_reads_each_servers_clock_once(workdir, pg, pg2, make_db):
    """`pgbeat rotate` over many databases of one server connects to it once for its clock (counted by the
    server: pg_stat_database.sessions), not once per target."""
    dbs = {cluster: make_db("rotclock", cluster=cluster) for cluster in (pg, pg2)}
    targets = [cluster.target(f"{cluster.port}_{i}", db) for cluster, db in dbs.items() for i in range(6)]
    service = Service(workdir, None, targets)

    def sessions() -> dict[int, int]:
        return {c.port: int(c.sql(f"SELECT sessions FROM pg_stat_database WHERE datname = '{db}'"))
                for c, db in dbs.items()}

    before = sessions()
    done = service.pgbeat("rotate", "--dry-run")
    assert done.returncode == 0, done.stderr
    after = sessions()
    assert {port: after[port] - before[port] for port in after} == {pg.port: 1, pg2.port: 1}


def test_the_fleet_bench_runs(workdir, pg):
    """bench/fleet.py end to end on a small fleet (a smoke test: it never looks at times)."""
    results = workdir / "fleet.json"
    env = {**os.environ, "PGHOST": pg.host, "PGPORT": str(pg.port), "PGUSER": "postgres"}
    done = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "bench" / "fleet.py"), "--fleets", "3,5",
                           "--backups", "4", "--runs", "1", "--workdir", str(workdir), "--json", str(results)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(results.read_text())
    assert [f["targets"] for f in figures] == [3, 5] and [f["backups"] for f in figures] == [12, 20]
    assert all(value > 0 for f in figures for key, value in f.items() if key.startswith(("status", "scrape")))
    wait_for(lambda: not any(workdir.glob("pgbeat-fleet-*")), 5, what="the bench's shelves removed")


def test_backups_of_targets_no_longer_configured_are_listed_as_orphans(fleet):
    service, written = fleet
    gone = ["t01", "x.y"]  # t01_backup_daily_x and t01-x stay: their names start with t01
    service.config["targets"] = [t for t in service.config["targets"] if t["name"] not in gone]
    service.write_config()
    status = json.loads(service.pgbeat("status", "--json").stdout)
    assert status["orphans"] == {name: BACKUPS for name in gone}
    text = service.pgbeat("status")
    assert "not in the configuration" in text.stdout and "t01 (10 backups)" in text.stdout, text.stdout
    listed = json.loads(service.pgbeat("list", "--orphans", "--json").stdout)
    assert sorted(b["file"] for b in listed) == sorted(p.name for name in gone for p in written[name])
    for conflicting in (("--target", "t02"), ("--destination", "vault")):
        refused = service.pgbeat("list", "--orphans", *conflicting)
        assert refused.returncode == 2 and "--orphans" in refused.stderr, refused.stderr
    # Nothing of theirs is rotated away meanwhile.
    assert service.pgbeat("rotate").returncode == 0
    assert all(p.exists() for name in gone for p in written[name])
