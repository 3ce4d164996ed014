"""The kill matrix: every declared fault point of every chain step, a process killed there, then recovery.

The points come from the code (`faults.declared(<step>.)` for every step in STEPS), so a point added to a
step is covered without editing this file; the test also fails if a declared point is never reached.
Through a real `celery worker` (prefork) against a real Redis, PostgreSQL and S3 server (moto), with
several targets in one worker at once and PGBEAT_FAULTS_DIR so that each point fires once: the pool
process running the step dies there (SIGKILL for every point; SIGTERM, which billiard turns into
SystemExit so that `finally` blocks run, for every point in the middle of a step), Celery retries the
step with the same record, and the run must end succeeded with exactly one good backup that restores,
its older backup intact, one success notification, and nothing left behind locally or at the destination.
The same points are then hit in-process: `pgbeat backup` (no broker) is killed there and run again.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Callable

import pytest
import redis

from pgbeat import errors, faults
from pgbeat.pipeline.runner import STEP_FUNCTIONS  # noqa: F401  (imports every step module: declares their points)
from pgbeat.settings import STEPS, load_settings
from tests.shelf import (
    WarmCli,
    backups_of,
    make_age_key,
    manifest_of,
    plant_expired,
    remote_keys,
    remote_problems,
    restore_into,
    sha256_of,
    shelf_problems,
    upload_folder,
)
from tests.storage_servers import S3_ACCESS_KEY, S3_SECRET
from tests.support import Service, Worker, pg_dump_processes, wait_run
from workers.guard import STEP_STORED

pytestmark = pytest.mark.integration

RELIABILITY = {"lock_ttl": 2, "visibility_timeout": 30, "restore_interval": 2, "retry_backoff": 1,
               "retry_backoff_max": 4, "retries": 2, "per_host_dumps": 0}
CELERY_ONLY = set(STEP_STORED.values())


def chain_points() -> list[str]:
    """Every fault point declared in a chain step, sorted."""
    return sorted(point for step in STEPS for point in faults.declared(f"{step}."))


def middle_points() -> list[str]:
    return [p for p in chain_points() if not p.endswith((".start", ".end", ".stored"))]


# The steps that remove what they wrote when stopped on the way out (`except BaseException`/`finally`):
# under SIGTERM (SystemExit in a pool process) that cleanup runs, so their middles get SIGTERM too.
CLEANING_STEPS = ("dump.", "compress.", "upload.")


def term_points() -> list[str]:
    return [p for p in middle_points() if p.startswith(CLEANING_STEPS)]


def test_every_step_declares_points_at_its_start_middle_and_end():
    points = chain_points()
    for step in STEPS:
        mine = [p for p in points if p.startswith(f"{step}.")]
        assert {f"{step}.start", f"{step}.end"} <= set(mine), step
        assert len(mine) >= 3 + (f"{step}.stored" in mine), f"{step} has no point in its middle: {mine}"


def s3_spec(server, bucket: str) -> dict:
    return {"name": "offsite", "kind": "s3", "bucket": bucket, "prefix": "pgbeat", "endpoint_url": server.url,
            "region": "us-east-1", "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET, "retries": 2}


class Shelf:
    """A service whose targets each have one older plaintext backup, then get an S3 destination (half of
    them encryption too) and an expired backup locally and at the destination, for rotation to remove."""

    def __init__(self, base, pg, redis_url, make_db, moto_s3, recipient, count: int,
                 streaming: Callable[[int], bool] = lambda i: i % 3 != 1, **destination) -> None:
        self.pg, self.s3, self.bucket = pg, moto_s3.client(), moto_s3.new_bucket()
        self.dbs = {f"t{i}": make_db("kill") for i in range(count)}
        for db in self.dbs.values():
            pg.sql(f"CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, {50}) AS i", db)
        self.encrypted = {name for i, name in enumerate(self.dbs) if i % 2 == 0}
        # Both ways of a plain dump: compressed as it streams (the default) and dumped first, then compressed
        # (every third target), so that the points of the compress step are reached too.
        targets = [pg.target(name, db, streaming=streaming(i)) for i, (name, db) in enumerate(self.dbs.items())]
        self.service = Service(base, redis_url, targets, node=f"km-{uuid.uuid4().hex[:6]}",
                               reliability=dict(RELIABILITY))
        first = self.service.pgbeat("backup", "daily", CELERY_BROKER_URL="")  # in-process: plaintext, no copies
        assert first.returncode == 0, first.stdout + first.stderr
        self.older = {name: backups_of(self.service.backup_root, name)[0] for name in self.dbs}
        self.older_sha = {name: sha256_of(path) for name, path in self.older.items()}
        for target in self.service.config["targets"]:
            target["destinations"] = [{**s3_spec(moto_s3, self.bucket), **destination}]
            if target["name"] in self.encrypted:
                target["encryption"] = {"recipients": [recipient]}
            plant_expired(self.service.backup_root / "daily", target["name"])
            remote = plant_expired(base / "remote-expired", target["name"], "20200102_020000", destination="offsite",
                                   encrypted=target["name"] in self.encrypted)
            upload_folder(self.s3, self.bucket, "pgbeat/daily", [remote])
        self.service.write_config()
        self.sources = {name: pg.dump_text(db) for name, db in self.dbs.items()}

    def check(self, runs: dict[str, str], identity, make_db) -> None:
        """Each target: the older backup intact, exactly one new backup (this run's) that restores, the
        expired one gone, copies at S3 complete (encrypted where the target encrypts); and after the next
        pgbeat command on the host (here `pgbeat list`; beat's reconciler does it every minute), nothing left."""
        root = self.service.backup_root
        listing = self.service.pgbeat("list")
        assert listing.returncode == 0, listing.stderr
        for name, run_id in runs.items():
            backups = backups_of(root, name)
            assert len(backups) == 2 and backups[0] == self.older[name], (name, backups)
            assert sha256_of(backups[0]) == self.older_sha[name]
            new = backups[1]
            assert manifest_of(new)["run_id"] == run_id
            assert new.name.endswith(".age") == (name in self.encrypted)
            restored = make_db("restored")
            restore_into(self.pg, new, restored, identity)
            assert self.pg.dump_text(restored) == self.sources[name], name
            keys = set(remote_keys(self.s3, self.bucket, f"pgbeat/daily/{name}_"))
            old_remote = self.older[name].name + (".age" if name in self.encrypted else "")
            assert {f"pgbeat/daily/{new.name}", f"pgbeat/daily/{old_remote}"} <= keys, (name, keys)
            assert not any("2020010" in key for key in keys), keys  # the expired copies were rotated
        assert shelf_problems(root) == []
        assert remote_problems(self.s3, self.bucket, "pgbeat/", self.encrypted) == []
        assert not any(pg_dump_processes(db) for db in self.dbs.values())


def queue_runs(service: Service) -> dict[str, str]:
    """Send tasks.backup for every target of `service`, as `pgbeat backup daily --no-wait` does."""
    from celery import Celery

    app = Celery(broker=service.redis_url)
    runs = {target["name"]: uuid.uuid4().hex for target in service.config["targets"]}
    for name, run_id in runs.items():
        app.send_task("tasks.backup", args=[name, "daily"], task_id=run_id, queue="pgbeat")
    app.close()
    return runs


def test_celery_kill_matrix(workdir, pg, redis_server, make_db, moto_s3):
    """SIGKILL at every point (six targets at once) and SIGTERM at the middle points of the steps that clean
    up on their way out (four other targets), in two workers side by side: every run succeeds once, and
    nothing is lost or left behind."""
    key, recipient = make_age_key(workdir)
    matrices = {"kill": chain_points(), "term": term_points()}
    # Each its own Redis database: a worker takes tasks.backup from the shared default queue.
    urls = {action: redis_server.url.rsplit("/", 1)[0] + f"/{db}" for action, db in (("kill", 3), ("term", 4))}
    clients = {action: redis.Redis.from_url(url) for action, url in urls.items()}
    shelves = {action: Shelf(workdir / action, pg, urls[action], make_db, moto_s3, recipient,
                             6 if action == "kill" else 4) for action in matrices}
    workers, runs = {}, {}
    def start(action: str) -> None:
        fired = workdir / f"fired-{action}"
        fired.mkdir()
        workers[action] = Worker(shelves[action].service, name=action, concurrency=3,
                                 PGBEAT_FAULTS=",".join(f"{p}={action}" for p in matrices[action]),
                                 PGBEAT_FAULTS_DIR=str(fired))

    try:
        starting = [threading.Thread(target=start, args=(action,)) for action in matrices]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(120)
        assert set(workers) == set(matrices)
        for action in matrices:
            runs[action] = queue_runs(shelves[action].service)
            assert set(runs[action]) == set(shelves[action].dbs)
        states = {action: {name: wait_run(clients[action], run_id, 200) for name, run_id in runs[action].items()}
                  for action in matrices}
    finally:
        for worker in workers.values():
            worker.stop()
        for client in clients.values():
            client.flushdb()
    for action, points in matrices.items():
        log = workers[action].log_text()
        fired = sorted(p.name.removesuffix(".fired") for p in (workdir / f"fired-{action}").glob("*.fired"))
        assert fired == points, f"{action}: points never reached: {sorted(set(points) - set(fired))}"
        signal_name = {"kill": "SIGKILL", "term": "SIGTERM"}[action]
        assert log.count(f"exited with 'signal {getattr(signal, signal_name).value} ({signal_name})'") >= len(points)
        for name, state in states[action].items():
            assert state["status"] == "succeeded", (action, name, state)
            kinds = [e["kind"] for e in shelves[action].service.events() if e["run_id"] == runs[action][name]]
            assert kinds.count("success") == 1 and "failure" not in kinds, (action, name, kinds)
        shelves[action].check(runs[action], key, make_db)


def inprocess_points() -> list[str]:
    """The points a killed `pgbeat backup` can die at: all but the Celery-only ones, and but the start of a
    step after the first (in one process that is the same instant as the previous step's end)."""
    repeated = {f"{step}.start" for step in STEPS[1:]}
    return [p for p in chain_points() if p not in CELERY_ONLY and p not in repeated]


def needs_destination(point: str) -> bool:
    return point.startswith("upload.offsite") or point.startswith("rotate.remote")


def run_inprocess_matrix(shelf: Shelf, plan: list[tuple[str, str]], folder, make_db, identity,
                         settings) -> list[str]:
    """Kill `pgbeat backup` at each (point, action) in turn, run it again; return what went wrong, per point.

    The commands run through a warm CLI (tests.shelf.WarmCli: a forked child per command runs the CLI's
    main, and dies at the point). The target has its S3 destination only for the points that need one.
    Checked each time: nothing half-published or left behind, here and at S3; older backups intact; the
    next run's backup is the one new backup and verifies; a backup the killed run published restores."""
    cli = WarmCli(shelf.service, folder / "cli")
    try:
        return _run_inprocess_matrix(shelf, cli, plan, folder, make_db, identity, settings)
    finally:
        cli.close()


def _run_inprocess_matrix(shelf: Shelf, cli: WarmCli, plan, folder, make_db, identity, settings) -> list[str]:
    from pgbeat.crypt import load_identities
    from pgbeat.steps.verify import verify_backup

    service, root, target = shelf.service, shelf.service.backup_root, next(iter(shelf.dbs))
    spec = service.config["targets"][0]["destinations"]
    wrong, new = [], []
    for index, (point, action) in enumerate(plan):
        service.config["targets"][0]["destinations"] = spec if needs_destination(point) else []
        service.write_config()
        if point.startswith("rotate."):  # something expired for rotation to remove, here and at S3
            stamp = f"2020010{1 + index % 9}_0{index % 10}0000"
            plant_expired(root / "daily", target, stamp)
            remote = plant_expired(folder / "remote-expired", target, stamp.replace("_0", "_1"), destination="offsite",
                                   encrypted=target in shelf.encrypted)
            upload_folder(shelf.s3, shelf.bucket, "pgbeat/daily", [remote])
        if point == "upload.offsite-encrypted":  # the newest backup before this run: plaintext, not copied
            encryption = service.config["targets"][0].pop("encryption")
            service.config["targets"][0]["destinations"] = []
            service.write_config()
            assert cli.pgbeat("backup", "daily").returncode == 0
            service.config["targets"][0].update(encryption=encryption, destinations=spec)
            service.write_config()
        earlier = set(backups_of(root, target))
        marks = folder / f"{point}={action}"
        marks.mkdir(parents=True)
        killed = cli.pgbeat("backup", "daily", PGBEAT_FAULTS=f"{point}={action}", PGBEAT_FAULTS_DIR=str(marks))
        expected = {"kill": -signal.SIGKILL, "int": getattr(errors, "EXIT_INTERRUPTED", errors.EXIT_FAILED)}[action]
        if killed.returncode != expected or "Traceback" in killed.stderr:
            wrong.append(f"{point}={action}: the killed run exited {killed.returncode}: {killed.stderr[-300:]}")
            continue
        if action == "int" and shelf_problems(root):  # an interrupted run cleans up after itself at once
            wrong.append(f"{point}=int: after the interrupt: {shelf_problems(root)}")
        before = {p: sha256_of(p) for p in backups_of(root, target) if "2020010" not in p.name}
        published_by_killed = [p for p in before if p not in earlier]
        again = cli.pgbeat("backup", "daily")
        if again.returncode != 0:
            wrong.append(f"{point}={action}: the next run failed: {again.stdout[-500:]}")
            continue
        after = backups_of(root, target)
        new = [p for p in after if p not in before]
        problems = shelf_problems(root) + remote_problems(shelf.s3, shelf.bucket, "pgbeat/", shelf.encrypted)
        problems += [f"older backup {p.name} changed or gone" for p, digest in before.items()
                     if not p.exists() or sha256_of(p) != digest]
        problems += [f"expired {p.name} still there" for p in after if "2020010" in p.name]
        if len(new) != 1 or f"backup: {new[0]}" not in again.stdout:
            problems.append(f"the next run's backup is not the one new backup: {new}")
        else:
            verify_backup(new[0], settings, load_identities(identity))
        for backup in published_by_killed:
            restored = make_db("restored")
            restore_into(shelf.pg, backup, restored, identity)
            if shelf.pg.dump_text(restored) != shelf.sources[target]:
                problems.append(f"{backup.name}, published by the killed run, does not restore to the source")
        if action == "int":
            events = [e["kind"] for e in service.events()]
            if events[-2:] != ["failure", "success"]:
                problems.append(f"the interrupted run was not notified as failed: {events[-3:]}")
        wrong += [f"{point}={action}: {p}" for p in problems]
    if new:  # and the last run's backup, restored like every other kind of backup in these tests
        restored = make_db("restored")
        restore_into(shelf.pg, new[-1], restored, identity)
        if shelf.pg.dump_text(restored) != shelf.sources[target]:
            wrong.append(f"{new[-1].name} does not restore to the source")
    return wrong


def test_inprocess_kill_matrix(workdir, pg, make_db, moto_s3, monkeypatch):
    """`pgbeat backup` without a broker, SIGKILLed at every point, and SIGINT (KeyboardInterrupt: the run
    cleans up, taking back what it published, and notifies) at the local publish's points, then run again;
    two shelves side by side."""
    key, recipient = make_age_key(workdir)
    points = inprocess_points()
    interrupts = [p for p in middle_points() if p.startswith(("upload.staged", "upload.published"))]
    # The first shelf dumps then compresses and takes the compress step's points; the second streams.
    compress = [p for p in points if p.startswith("compress.")]
    others = [p for p in points if p not in compress]
    plans = [[(p, "kill") for p in compress + others[0::2]] + [(p, "int") for p in interrupts[0::2]],
             [(p, "kill") for p in others[1::2]] + [(p, "int") for p in interrupts[1::2]]]
    # At S3 only the newest copy is kept and one older backup is copied per run: what these points need
    # (a killed run's copy completed by the next), without a growing catalog to read back on every run.
    shelves = [Shelf(workdir / f"inproc{i}", pg, None, make_db, moto_s3, recipient, 1, lambda _, i=i: i == 1,
                     retention={"daily": {"keep_days": 0, "min_keep": 1}}) for i in range(len(plans))]
    settings = []
    for shelf in shelves:
        shelf.service.config["reliability"]["copy_backlog_per_run"] = 1
        shelf.service.write_config()
        monkeypatch.setenv("PGBEAT_CONFIG", str(shelf.service.config_path))
        settings.append(load_settings(env_file=None))  # for verify_backup in this process (its paths only)
    wrong: list[list[str]] = [[] for _ in plans]

    def drive(i: int) -> None:
        wrong[i] = run_inprocess_matrix(shelves[i], plans[i], workdir / f"faults{i}", make_db, key, settings[i])

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert [line for lines in wrong for line in lines] == []
    fired = sorted(p.name.removesuffix(".fired") for p in workdir.glob("faults*/*/*.fired"))
    assert fired == sorted(point for plan in plans for point, _ in plan)


def test_the_matrix_covers_a_new_point(monkeypatch):
    """A point declared in a step's module joins the matrices without any change to this file."""
    monkeypatch.setitem(faults._DECLARED, "verify.zz-new-point", "a point added later")
    assert "verify.zz-new-point" in chain_points() and "verify.zz-new-point" in inprocess_points()
    assert "dump.start" in inprocess_points() and "verify.start" not in inprocess_points()
    assert "verify.zz-new-point" in middle_points()
