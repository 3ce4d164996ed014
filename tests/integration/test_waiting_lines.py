"""`pgbeat backup` in this process says what it waits for as the wait begins: a target lock another run
holds (with its pid), a retry after a failure (with the reason and the delay), each with the time it
began; never silent for minutes."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.support import Service, free_port, hold_lock

pytestmark = pytest.mark.integration

HOLD_LOCK = """
import sys, time
from pathlib import Path
from pgbeat.coordination.filelock import FileLock
lock = FileLock(Path(sys.argv[1]), "target-erp")
assert lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_busy_target_is_said_at_once_and_the_backup_runs_when_it_is_free(workdir, pg, make_db):
    db = make_db("waitlock")
    service = Service(workdir, None, [pg.target("erp", db)], timezone="America/Sao_Paulo")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(service.backup_root), "4"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        done = service.pgbeat("backup", "daily")
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started >= 3  # it did wait for the holder
    line = next(line for line in done.stdout.splitlines() if "waiting for the lock of erp" in line)
    assert f"(pid {holder.pid})" in line and "since 20" in line and "-03" in line, line
    assert done.stdout.index("waiting for the lock") < done.stdout.index("backup: ")


def test_a_retry_is_said_with_its_reason_and_delay(workdir, pg):
    service = Service(workdir, None, [pg.target("erp", "nodb", port=free_port(), connect_timeout=1)],
                      reliability={"retries": 2, "retry_backoff": 1, "retry_backoff_max": 1})
    done = service.pgbeat("backup", "daily", timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
    retries = [line for line in done.stdout.splitlines() if "dump failed: " in line and "; retry " in line]
    assert [r.split("; retry ")[1].split(" in ")[0] for r in retries] == ["1", "2"], done.stdout
    assert all("Connection refused" in r and "in 1s" in r and "since " in r for r in retries), retries


def test_a_dump_blocked_on_a_lock_names_the_blocking_session(workdir, pg, make_db):
    db = make_db("waitdump")
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 100) AS id", db)
    service = Service(workdir, None, [pg.target("erp", db)])
    locker = hold_lock(pg, db, 6)  # the backup waits for it, then runs
    try:
        locker_pid = int(pg.sql("SELECT pid FROM pg_stat_activity WHERE query LIKE 'BEGIN; LOCK TABLE big%'", db))
        done = service.pgbeat("backup", "daily", timeout=120)
    finally:
        locker.wait(30)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "pg_dump waits for a lock" in line)
    assert f"held by pid {locker_pid} (postgres, psql: 'BEGIN; LOCK TABLE big" in line and "since " in line, line
    [backup] = service.backups()
    assert service.pgbeat("verify", str(backup)).returncode == 0


def test_a_long_dump_shows_its_progress_on_a_terminal_only(workdir, pg, make_db):
    import pexpect

    from tests.support import VENV_BIN, without_ansi

    db = make_db("progress")
    pg.sql("CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 300000) AS g", db)
    service = Service(workdir, None, [pg.target("erp", db)])
    # A lock held for 3 s keeps pg_dump from starting its COPY: the dump lasts longer than a progress tick
    # however fast this machine is.
    locker = hold_lock(pg, db, 3)
    try:
        child = pexpect.spawn(str(VENV_BIN / "pgbeat"), ["backup", "daily"], cwd=str(service.cwd),
                              env=service.env(), encoding="utf-8", timeout=300, dimensions=(40, 120))
        shown = without_ansi(child.read())
        child.close()
    finally:
        locker.wait(30)
    assert child.exitstatus == 0, shown
    assert re.search(r"dump: [\d.]+ [KMG]?B of SQL, [\d,]+ rows so far", shown), shown
    piped = service.pgbeat("backup", "daily")
    assert piped.returncode == 0 and "so far" not in piped.stdout  # nothing noisy in a pipe or a log
