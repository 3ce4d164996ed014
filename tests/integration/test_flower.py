"""Flower as a DBA reads it: a real worker, a real Flower started with the deployed unit's options, its HTTP
API and its task list rendered in a real headless browser.

Every task pgbeat sends shows its step, target and tier as its name (`dump erp/daily`), in Flower, `celery
events` and `celery inspect`, so Flower's search box finds a target's runs by the target's name; a failed or
retried step's exception says why in one line (pg_dump's error line), without the password.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import uuid

import pytest

from tests.conftest import unique
from tests.support import (
    SECRET_PASSWORD,
    VENV_BIN,
    Flower,
    Service,
    Worker,
    deployed_flower_options,
    free_port,
    table_locked,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.integration

STEPS = ("backup", "dump", "compress", "verify", "upload", "rotate", "notify")
WRONG_PASSWORD = "wrong-Pa55-do-not-leak"


@pytest.fixture(scope="module")
def names():
    """Target names of this module only, so that a search for one finds nothing else."""
    tag = uuid.uuid4().hex[:6]
    return {"ok": f"erp_ok_{tag}", "down": f"erp_down_{tag}", "badpass": f"erp_badpass_{tag}",
            "busy": f"erp_busy_{tag}"}


@pytest.fixture(scope="module")
def database(pg):
    name = pg.createdb(unique("flower"))
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 1000) AS i", name)
    yield name
    pg.dropdb(name)


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg, redis_server, database, names):
    base = tmp_path_factory.mktemp("flower")
    base.chmod(0o755)
    closed_port = free_port()  # nothing listens there: pg_dump's connection is refused
    targets = [
        pg.target(names["ok"], database),
        {"name": names["down"], "host": "127.0.0.1", "port": closed_port, "user": "backup",
         "password": SECRET_PASSWORD, "dbname": database},
        pg.target(names["badpass"], database, user="backup", password=WRONG_PASSWORD),
        pg.target(names["busy"], database),
    ]
    # One retry, 8 s after the first failure: long enough to see the retry in Flower as it happens. A dump
    # waits at most 3 s for its target's lock, looking again every 3 s (lock_ttl).
    return Service(base, redis_server.url, targets, node=f"flower-{uuid.uuid4().hex[:6]}",
                   reliability={"retries": 1, "retry_backoff": 8, "lock_ttl": 3, "lock_wait": 3})


@pytest.fixture(scope="module")
def worker(service):
    w = Worker(service)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def events(service):
    """`celery events --dump`: every event the workers send, as a terminal shows it."""
    log = service.base / "events.log"
    proc = subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers.app", "events", "--dump"], cwd=service.cwd,
                            env=service.env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: "starting capture" in log.read_text(), 30, what="celery events")
    yield log
    proc.terminate()
    proc.wait(20)


def flower_options(db) -> list[str]:
    """The deployed unit's Flower options, with this test's state file (port and address: Flower's own)."""
    return [o for o in deployed_flower_options() if not o.startswith(("--port=", "--db="))] + [f"--db={db}"]


@pytest.fixture(scope="module")
def flower(service, worker):
    f = Flower(service, *flower_options(service.base / "flower-state"))
    # Flower asks the workers to send events every 5 s: the first task events need that to have happened.
    wait_for(lambda: worker.name in f.get_json("/api/workers?refresh=1"), 30, 0.5, what="Flower to see the worker")
    yield f
    f.stop()


def backup_no_wait(service: Service, target: str) -> str:
    result = service.pgbeat("backup", "daily", "--target", target, "--no-wait")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("queued as run ")[1].split()[0]


def search(flower: Flower, text: str) -> dict[str, dict]:
    """Flower's search box, through its API: the tasks whose name, args, result... contain `text`."""
    return flower.get_json(f"/api/tasks?search={urllib.parse.quote(text)}")


def row(flower: Flower, target: str, step: str, state: str) -> dict | None:
    """The task found by searching `target` whose name is `<step> <target>/daily`, once it is in `state`."""
    found = [t for t in search(flower, target).values()
             if t["name"] == f"{step} {target}/daily" and t["state"] == state]
    return found[0] if found else None


@pytest.mark.parametrize(("which", "says"), [("down", "Connection refused"),
                                             ("badpass", 'password authentication failed for user "backup"')])
def test_a_failed_dump_is_found_by_its_target_and_says_why(service, flower, events, redis_server, names, which,
                                                           says):
    target = names[which]
    run_id = backup_no_wait(service, target)
    if which == "down":
        # A transient failure: retried once; while it waits, Flower's row says why it is retried.
        retrying = wait_for(lambda: row(flower, target, "dump", "RETRY"), 30, 0.2, what="the retry in Flower")
        assert says in retrying["exception"], retrying
    assert wait_run(redis_server.client, run_id)["status"] == "failed"
    dump = wait_for(lambda: row(flower, target, "dump", "FAILURE"), 30, 0.5, what="the failed dump in Flower")
    # One line: what failed (target, server) and why (pg_dump's error line, not its "Is the server running" hint).
    assert f"pg_dump of {target}" in dump["exception"] and says in dump["exception"], dump["exception"]
    assert "\n" not in dump["exception"]
    assert dump["retries"] == (1 if which == "down" else 0)
    found = search(flower, target)
    # The run's other rows are found by the same search and name it too; the failure was notified.
    assert {t["name"] for t in found.values()} >= {f"backup {target}/daily", f"dump {target}/daily",
                                                   f"notify {target}/daily"}
    shown = json.dumps(found) + json.dumps(flower.get_json(f"/api/task/info/{dump['uuid']}"))
    assert WRONG_PASSWORD not in shown and SECRET_PASSWORD not in shown
    # `celery events` names the task the same way and shows each retry's reason.
    failed = f"task failed: dump {target}/daily("
    log = wait_for(lambda: failed in events.read_text() and events.read_text(), 30, 0.5,
                   what="the failure in `celery events`")
    assert says in log.split(failed)[1].splitlines()[0]
    if which == "down":
        retried = log.split(f"task retried: dump {target}/daily(")[1].splitlines()[0]
        assert says in retried


def test_a_successful_run_shows_its_six_steps_by_target_name(service, flower, worker, pg, database, names,
                                                            redis_server, tmp_path):
    target = names["ok"]
    with table_locked(pg, database):
        run_id = backup_no_wait(service, target)

        def dump_in_inspect():
            result = service.celery("inspect", "active", "--json", "-d", worker.name)
            active = json.loads(result.stdout[result.stdout.index("{"):]) if "{" in result.stdout else {}
            return [t for t in active.get(worker.name, []) if t["id"] != run_id and t["name"] == f"dump {target}/daily"]

        # The dump waits for the table lock: `celery inspect active` shows it by its name, not `tasks.dump`.
        [active] = wait_for(dump_in_inspect, 60, 0.5, what="the dump in `celery inspect active`")
        assert active["type"] == "tasks.dump"
    assert wait_run(redis_server.client, run_id)["status"] == "succeeded"

    def steps_found():
        mine = {t["name"] for t in search(flower, target).values() if t["state"] == "SUCCESS"}
        return mine if len(mine) == len(STEPS) else None

    assert wait_for(steps_found, 30, 0.5, what="the run in Flower") == {f"{step} {target}/daily" for step in STEPS}
    # The run's id (what `pgbeat backup` prints; tasks.backup's task id, in every step's record) finds its rows.
    assert {t["name"] for t in search(flower, run_id).values()} == {f"{step} {target}/daily" for step in STEPS}
    # Each step's row shows its host queue (the routing_key column): pgbeat.host.<node>.
    dump = row(flower, target, "dump", "SUCCESS")
    assert dump["routing_key"] == f"pgbeat.host.{service.config['node']}"

    # Flower's task list as a browser renders it (filled by JavaScript from /tasks/datatable): the rows say
    # which target and tier they are.
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: `bash scripts/system-deps.sh chromium` installs it"
    user, password = Flower.AUTH
    page = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
                           f"http://{user}:{password}@127.0.0.1:{flower.port}/tasks"],
                          capture_output=True, text=True, timeout=120)
    assert page.returncode == 0, page.stderr[-2000:]
    for step in STEPS:
        assert f"{step} {target}/daily" in page.stdout, page.stdout[-3000:]


def test_a_dump_that_waited_too_long_names_the_run_holding_its_target(service, flower, pg, database, names,
                                                                     redis_server):
    target = names["busy"]
    with table_locked(pg, database):
        holder = backup_no_wait(service, target)  # its pg_dump waits for the table, holding the target lock
        wait_for(lambda: redis_server.client.exists(f"pgbeat:lock:target:{target}"), 30, 0.2, what="the target lock")
        waiting = backup_no_wait(service, target)
        assert wait_run(redis_server.client, waiting)["status"] == "failed"
    assert wait_run(redis_server.client, holder)["status"] == "succeeded"
    failed = wait_for(lambda: [t for t in search(flower, target).values() if t["state"] == "FAILURE"], 30, 0.5,
                      what="the failed dump in Flower")
    [dump] = failed
    assert dump["name"] == f"dump {target}/daily"
    assert f"{target} is being dumped by run {holder}" in dump["exception"], dump["exception"]


def test_the_broker_tab_names_each_host_queue(service, flower, worker):
    """Flower's Broker tab lists the queues the workers consume: the shared one and each host's."""
    queues = {q["name"] for q in flower.get_json("/api/queues/length")["active_queues"]}
    assert queues == {"pgbeat", f"pgbeat.host.{service.config['node']}"}


def test_flower_keeps_its_task_list_across_a_restart(service, worker, redis_server, names):
    """With the deployed options (--persistent, --db): what Flower saw comes back after a restart; what
    happened while it was down does not (Celery's events are not queued for an absent Flower)."""
    db = service.base / "restart-state"
    target = names["badpass"]
    first = Flower(service, *flower_options(db))
    try:
        wait_for(lambda: worker.name in first.get_json("/api/workers?refresh=1"), 30, 0.5, what="the worker")
        seen = backup_no_wait(service, target)
        wait_run(redis_server.client, seen)
        dump = wait_for(lambda: row(first, target, "dump", "FAILURE"), 30, 0.5, what="the failed dump")
    finally:
        first.stop()  # SIGTERM, as systemd stops it: Flower saves its state
    unseen = backup_no_wait(service, target)
    wait_run(redis_server.client, unseen)
    again = Flower(service, *flower_options(db))
    try:
        kept = search(again, target)
        assert dump["uuid"] in kept and kept[dump["uuid"]]["exception"] == dump["exception"]
        assert unseen not in kept
    finally:
        again.stop()
