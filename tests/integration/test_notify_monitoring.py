"""Notifications to real local receivers, warnings, `pgbeat status`, `/metrics`, Flower and cron."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from pgbeat.schedule import next_runs
from tests.receivers import MailReceiver
from tests.support import (
    SECRET_PASSWORD,
    VENV_BIN,
    Flower,
    Service,
    Worker,
    free_port,
    scrape,
    start_metrics,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def mail():
    receiver = MailReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def small_db(pg, make_db):
    db = make_db("notified")
    pg.sql("CREATE TABLE invoices AS SELECT i AS id, md5(i::text) AS h FROM generate_series(1, 2000) AS i", db)
    return db


def test_failure_and_success_reach_mail_and_webhook(workdir, pg, small_db, mail, http):
    channels = [{"url": mail.url(), "events": ["failure", "success"]},
                {"url": f"json://127.0.0.1:{http.port}/hook", "events": ["failure"]}]
    service = Service(workdir, None, [pg.target("erp", small_db, user="backup", password="wrong-password")],
                      notify=channels)
    failed = service.pgbeat("backup", "daily")
    assert failed.returncode == 1
    wait_for(lambda: mail.messages and http.requests, 10, what="both receivers")
    subject, body = mail.texts()[0]
    assert "erp daily backup FAILED at dump" in subject
    for expected in ("Step: dump", "password authentication failed", "Log: ", "erp_daily_", "Target: erp"):
        assert expected in body, (expected, body)
    [(_, _path, payload)] = [r for r in http.requests if r[1] == "/hook"]
    hook = json.loads(payload)
    assert "FAILED at dump" in hook["title"] and "password authentication failed" in hook["message"]
    assert hook["type"] == "failure"
    for text in (body, hook["message"]):
        assert "wrong-password" not in text and SECRET_PASSWORD not in text

    service.config["targets"][0]["password"] = SECRET_PASSWORD
    service.write_config()
    assert service.pgbeat("backup", "daily").returncode == 0
    wait_for(lambda: len(mail.messages) == 2, 10, what="the success mail")
    subject, body = mail.texts()[1]
    assert "erp daily backup OK" in subject and "Size: " in body and "Duration: " in body
    assert len([r for r in http.requests if r[1] == "/hook"]) == 1  # that webhook wants failures only


def test_undeliverable_notification_never_fails_a_good_backup(workdir, pg, small_db):
    dead = f"json://127.0.0.1:{free_port()}/nobody-listens"
    service = Service(workdir, None, [pg.target("erp", small_db)], notify=[{"url": dead, "events": ["success"]}])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "delivery failed after 3 attempts" in result.stderr
    assert [e["kind"] for e in service.events()] == ["success"]
    assert len(service.backups()) == 1


def test_healthcheck_pings_start_success_and_fail(workdir, pg, small_db, http):
    check = f"{http.base()}/ping/{uuid.uuid4()}"
    service = Service(workdir, None, [pg.target("erp", small_db, healthcheck_url=check)], reliability={"retries": 0})
    assert service.pgbeat("backup", "daily").returncode == 0
    service.config["targets"][0]["port"] = free_port()
    service.write_config()
    assert service.pgbeat("backup", "daily").returncode == 1
    base = check.removeprefix(http.base())
    assert http.paths() == [f"{base}/start", base, f"{base}/start", f"{base}/fail"]


def test_size_anomaly_and_lost_table_warn(workdir, pg, small_db, http):
    pg.sql("CREATE TABLE audit AS SELECT i FROM generate_series(1, 10) AS i", small_db)
    service = Service(workdir, None, [pg.target("erp", small_db)],
                      notify=[{"url": f"json://127.0.0.1:{http.port}/warn", "events": ["warning"]}])
    for _ in range(3):
        assert service.pgbeat("backup", "daily").returncode == 0
    assert not [e for e in service.events() if e["kind"] == "warning"]
    pg.sql("DELETE FROM invoices WHERE id > 100; DROP TABLE audit", small_db)
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0
    [warning] = [e for e in service.events() if e["kind"] == "warning"]
    assert any("was data lost?" in w for w in warning["warnings"])
    assert any("public.audit" in w and "missing" in w for w in warning["warnings"])
    newest = service.backups()[-1]
    recorded = json.loads(newest.with_name(newest.name + ".manifest.json").read_text())["warnings"]
    assert [w["text"] for w in recorded] == warning["warnings"]
    assert {w["kind"] for w in recorded} >= {"size-drop", "tables-gone"}
    wait_for(lambda: [r for r in http.requests if r[1] == "/warn"], 10, what="the warning webhook")
    status = json.loads(service.pgbeat("status", "--json").stdout)
    [daily] = [t for t in status["tiers"] if t["tier"] == "daily"]
    assert daily["size_anomaly"] is True


def test_low_disk_warns(workdir, pg, small_db):
    service = Service(workdir, None, [pg.target("erp", small_db)], monitoring={"min_free_percent": 100})
    assert service.pgbeat("backup", "daily").returncode == 0
    [warning] = [e for e in service.events() if e["kind"] == "warning"]
    assert "free on" in warning["warnings"][0]


def test_metrics_and_status_tell_the_truth_across_restarts(workdir, pg, small_db, make_db):
    other = make_db("other")
    service = Service(workdir, None, [pg.target("erp", small_db), pg.target("crm", other, port=free_port())],
                      reliability={"retries": 0})
    assert service.pgbeat("backup", "daily", "--target", "erp").returncode == 0
    assert service.pgbeat("backup", "daily", "--target", "crm").returncode == 1
    assert service.pgbeat("drill", "--target", "erp").returncode == 0
    port = free_port()
    proc = start_metrics(service, port)
    try:
        first = scrape(port)
    finally:
        proc.terminate()
        proc.wait(10)
    [backup] = service.backups()
    manifest = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())
    erp, crm = 'target="erp",tier="daily"', 'target="crm",tier="daily"'
    assert first[f"pgbeat_backup_last_status{{{erp}}}"] == 1.0
    assert first[f"pgbeat_backup_last_status{{{crm}}}"] == 0.0
    assert f"pgbeat_backup_last_success_timestamp_seconds{{{crm}}}" not in first
    assert first[f"pgbeat_backup_last_size_bytes{{{erp}}}"] == manifest["size"]
    assert abs(first[f"pgbeat_backup_last_success_timestamp_seconds{{{erp}}}"] - time.time()) < 600
    assert first[f"pgbeat_backup_expected_interval_seconds{{{erp}}}"] == 86400.0
    assert first[f'pgbeat_backups_kept{{destination="local",{erp}}}'] == 1.0
    assert first['pgbeat_drill_last_status{target="erp"}'] == 1.0
    assert first["pgbeat_backup_root_free_bytes"] > 0 and first["pgbeat_backup_root_used_bytes"] >= manifest["size"]

    proc = start_metrics(service, port)  # a restart: everything comes back from the files
    try:
        again = scrape(port)
    finally:
        proc.terminate()
        proc.wait(10)
    assert {k: v for k, v in again.items() if "root_" not in k} == {k: v for k, v in first.items() if "root_" not in k}

    status = json.loads(service.pgbeat("status", "--json").stdout)
    by_key = {(t["target"], t["tier"]): t for t in status["tiers"]}
    assert by_key[("erp", "daily")]["overdue"] is False
    assert by_key[("erp", "daily")]["last_attempt"]["status"] == "success"
    assert by_key[("crm", "daily")]["never"] is True  # failed right after install: never, not yet overdue
    assert by_key[("crm", "daily")]["overdue"] is False
    assert by_key[("crm", "daily")]["last_attempt"]["step"] == "dump"
    assert by_key[("erp", "weekly")]["last_success_at"] is None
    text = service.pgbeat("status").stdout
    assert "failed at dump" in text and "free of" in text and "BACKUP_ROOT uses" in text


def test_flower_requires_auth_and_shows_each_step(workdir, pg, small_db, redis_server):
    service = Service(workdir, redis_server.url, [pg.target("erp", small_db)], node=f"fl-{uuid.uuid4().hex[:6]}")
    worker = Worker(service)
    # The documented way: the password comes from FLOWER_BASIC_AUTH, never from the command line.
    flower = Flower(service)
    try:
        assert flower.status("/api/tasks") == 401
        time.sleep(2)  # Flower subscribes to the workers' events
        result = service.pgbeat("backup", "daily", "--no-wait")
        run_id = result.stdout.split("queued as run ")[1].split()[0]
        assert wait_run(redis_server.client, run_id)["status"] == "succeeded"

        def tasks_of_run():
            tasks = flower.get_json("/api/tasks")
            mine = {t["name"] for t in tasks.values() if run_id in (t.get("args") or "") or t["uuid"] == run_id}
            return mine if len(mine) >= 7 else None

        names = wait_for(tasks_of_run, 30, 0.5, what="the chain in Flower")
        # Each row is named by its step, target and tier (Celery's shadow name), not tasks.<step>.
        assert names == {f"{step} erp/daily" for step in ("backup", "dump", "compress", "verify", "upload",
                                                          "rotate", "notify")}
    finally:
        flower.stop()
        worker.stop()


def test_cron_install_is_idempotent_and_remove_leaves_other_lines(workdir, pg, small_db):
    service = Service(workdir, None, [pg.target("erp", small_db), pg.target("crm", small_db, tiers={
        "daily": {"schedule": "30 1 * * *"}})])
    crontab = workdir / "crontab"
    crontab.write_text("MAILTO=dba@example.com\n15 * * * * /usr/local/bin/something-else\n")
    for _ in range(2):
        result = service.pgbeat("cron", "install", "--file", str(crontab))
        assert result.returncode == 0, result.stderr
    text = crontab.read_text()
    assert text.count("# BEGIN pgbeat") == 1 and "something-else" in text
    lines = [line for line in text.splitlines() if " backup " in line]
    assert sorted(line.split(" backup ")[1].split(" >>")[0] for line in lines) == [
        "daily --target crm", "daily --target erp", "monthly", "weekly"]
    assert any(line.startswith("0 3 * * 0 ") for line in lines) and any(line.startswith("0 4 1 * * ") for line in lines)
    assert all(f"PGBEAT_CONFIG={service.config_path}" in line for line in lines)
    assert service.pgbeat("cron", "remove", "--file", str(crontab)).returncode == 0
    assert crontab.read_text() == "MAILTO=dba@example.com\n15 * * * * /usr/local/bin/something-else\n"


FAKETIME = shutil.which("faketime")


def pgbeat_at(service: Service, offset: str, *args: str) -> subprocess.CompletedProcess:
    """Run the real CLI with its clock `offset` ahead (libfaketime: `+60d`)."""
    result = subprocess.run([FAKETIME, "-f", offset, str(VENV_BIN / "pgbeat"), *args], cwd=service.cwd,
                            env=service.env(), capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.skipif(FAKETIME is None, reason="libfaketime (Debian package faketime) is not installed")
def test_never_run_tiers_and_never_drilled_targets_are_never_then_overdue(workdir, pg, small_db):
    service = Service(workdir, None, [pg.target("erp", small_db),
                                      pg.target("quiet", small_db, drill={"enabled": False})])
    installed = datetime.now(UTC)
    status = json.loads(service.pgbeat("status", "--json").stdout)
    assert {(t["target"], t["tier"]) for t in status["tiers"]} == {
        (name, tier) for name in ("erp", "quiet") for tier in ("daily", "weekly", "monthly")}
    for t in status["tiers"]:  # right after install: never, and not overdue
        assert t["never"] is True and t["overdue"] is False, t
        expected = next_runs(t["schedule"], installed, ZoneInfo("UTC"))[0]
        assert abs(datetime.fromisoformat(t["first_due_at"]).timestamp() - expected.timestamp()) < 120, t
    assert [d["target"] for d in status["never_drilled"]] == ["erp"]  # quiet has drills disabled
    assert status["never_drilled"][0]["overdue"] is False
    text = service.pgbeat("status").stdout
    assert "never (first due " in text and " UTC)" in text and "overdue" not in text, text
    assert "drill erp: never (first due " in text and "drill quiet" not in text, text

    port = free_port()
    proc = start_metrics(service, port)
    try:
        metrics = scrape(port)
    finally:
        proc.terminate()
        proc.wait(10)
    by_tier = {t["tier"]: t for t in status["tiers"] if t["target"] == "erp"}
    for tier, t in by_tier.items():
        key = f'pgbeat_backup_first_due_timestamp_seconds{{target="erp",tier="{tier}"}}'
        assert metrics[key] == datetime.fromisoformat(t["first_due_at"]).timestamp(), key
    assert metrics['pgbeat_drill_first_due_timestamp_seconds{target="erp"}'] == datetime.fromisoformat(
        status["never_drilled"][0]["first_due_at"]).timestamp()
    assert 'pgbeat_drill_first_due_timestamp_seconds{target="quiet"}' not in metrics

    later = json.loads(pgbeat_at(service, "+60d", "status", "--json").stdout)  # 60 days on, still nothing
    for t in later["tiers"]:  # the first due time stays the one after install, so every tier is now late
        assert t["never"] is True and t["overdue"] is True, t
        assert t["first_due_at"] == next(u for u in status["tiers"] if u["target"] == t["target"]
                                         and u["tier"] == t["tier"])["first_due_at"]
    assert later["never_drilled"][0]["overdue"] is True
    text = pgbeat_at(service, "+60d", "status").stdout
    assert "never (was due " in text and "drill erp: never (was due " in text, text

    assert service.pgbeat("backup", "daily", "--target", "erp").returncode == 0
    drilled = service.pgbeat("drill")  # every target whose drills are enabled: erp, not quiet
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    assert "quiet: drills disabled (drill.enabled: false), skipped" in drilled.stdout
    assert "erp: drill passed" in drilled.stdout
    assert service.pgbeat("backup", "daily", "--target", "quiet").returncode == 0
    asked = service.pgbeat("drill", "--target", "quiet")  # named: drilled although its drills are disabled
    assert asked.returncode == 0 and "quiet: drill passed" in asked.stdout, asked.stdout + asked.stderr
    status = json.loads(service.pgbeat("status", "--json").stdout)
    daily = next(t for t in status["tiers"] if (t["target"], t["tier"]) == ("erp", "daily"))
    assert daily["never"] is False and daily["first_due_at"] is None and daily["overdue"] is False
    assert status["never_drilled"] == []
    proc = start_metrics(service, port)
    try:
        metrics = scrape(port)
    finally:
        proc.terminate()
        proc.wait(10)
    assert 'pgbeat_backup_first_due_timestamp_seconds{target="erp",tier="daily"}' not in metrics
    assert 'pgbeat_backup_first_due_timestamp_seconds{target="erp",tier="weekly"}' in metrics
    assert 'pgbeat_drill_first_due_timestamp_seconds{target="erp"}' not in metrics


def test_warnings_are_printed_with_the_result_and_reach_channels_by_default(workdir, pg, small_db, make_db, http):
    pg.sql("CREATE TABLE audit AS SELECT i FROM generate_series(1, 10) AS i", small_db)
    empty = make_db("empty")
    service = Service(workdir, None, [pg.target("erp", small_db), pg.target("blank", empty)],
                      notify=[{"url": f"json://127.0.0.1:{http.port}/default"}])  # no `events`: the default
    for _ in range(3):
        quiet = service.pgbeat("backup", "daily", "--target", "erp")
        assert quiet.returncode == 0 and "⚠" not in quiet.stdout, quiet.stdout
    pg.sql("DELETE FROM invoices WHERE id > 100; DROP TABLE audit", small_db)
    shrunk = service.pgbeat("backup", "daily", "--target", "erp")
    assert shrunk.returncode == 0, shrunk.stdout + shrunk.stderr
    result_line = shrunk.stdout.index("  backup: ")
    lines = shrunk.stdout[result_line:].splitlines()
    assert any(line.startswith("  ⚠ warning: ") and "was data lost?" in line for line in lines), shrunk.stdout
    assert any(line.startswith("  ⚠ warning: ") and "public.audit" in line and "missing" in line
               for line in lines), shrunk.stdout

    blank = service.pgbeat("backup", "daily", "--target", "blank")
    assert blank.returncode == 0, blank.stdout + blank.stderr
    assert f"⚠ warning: the database {empty} has no tables" in blank.stdout, blank.stdout
    [backup] = [p for p in service.backups() if p.name.startswith("blank_")]
    recorded = json.loads(backup.with_name(backup.name + ".manifest.json").read_text())["warnings"]
    assert [w["kind"] for w in recorded] == ["empty"]

    drill = service.pgbeat("drill", "--target", "blank")  # 0 tables, no assertions: passed, and says so
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "blank: drill passed, but proved little" in drill.stdout, drill.stdout
    assert "⚠ warning: nothing checked but integrity: the backup has 0 tables" in drill.stdout, drill.stdout
    listed = service.pgbeat("list", "--target", "blank").stdout
    assert "passed (0 tables)" in listed, listed
    assert "drill blank: passed, but proved little" in service.pgbeat("status").stdout

    # The channel without `events` got the two warnings, and no success (successes are opt-in).
    hooks = wait_for(lambda: (lambda got: got if len(got) >= 2 else None)(
        [json.loads(r[2]) for r in http.requests if r[1] == "/default"]), 10, what="the warning webhooks")
    time.sleep(1)
    hooks = [json.loads(r[2]) for r in http.requests if r[1] == "/default"]
    assert [h["type"] for h in hooks] == ["warning", "warning"], hooks
    assert "was data lost?" in hooks[0]["message"] and "has no tables" in hooks[1]["message"]


def test_warnings_of_a_run_on_a_worker_are_printed_by_pgbeat_backup(workdir, pg, make_db, redis_server):
    empty = make_db("empty")
    service = Service(workdir, redis_server.url, [pg.target("blank", empty)], node=f"wn-{uuid.uuid4().hex[:6]}")
    worker = Worker(service)
    try:
        result = service.pgbeat("backup", "daily", timeout=120)
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blank: succeeded: " in result.stdout
    assert f"⚠ warning: the database {empty} has no tables" in result.stdout, result.stdout


def test_cron_install_writes_the_schedules_in_pgbeats_time_zone(workdir, pg, small_db):
    from pgbeat.settings import host_timezone

    service = Service(workdir, None, [pg.target("erp", small_db)], timezone="America/Sao_Paulo")
    crontab = workdir / "crontab"
    crontab.write_text("MAILTO=dba@example.com\n15 * * * * /usr/local/bin/something-else\n")
    result = service.pgbeat("cron", "install", "--file", str(crontab))
    assert result.returncode == 0, result.stderr
    block = crontab.read_text().split("# BEGIN pgbeat")[1].splitlines()[1:]
    system = host_timezone()  # what a cron without CRON_TZ would read the lines in (this host: not -03)
    assert block[0] == "CRON_TZ=America/Sao_Paulo"  # before every line of pgbeat's
    assert block[-2:] == [f"CRON_TZ={system}", "# END pgbeat"]  # lines added below the block keep the system's
    assert [line.split()[:5] for line in block if " backup " in line] == [
        ["0", "2", "*", "*", "*"], ["0", "3", "*", "*", "0"], ["0", "4", "1", "*", "*"]]  # pgbeat's own times
    assert "their times in pgbeat's time zone America/Sao_Paulo (CRON_TZ=America/Sao_Paulo)" in result.stdout
    assert f"the system's time zone is {system}" in result.stderr and "Debian's `cron`" in result.stderr
    again = service.pgbeat("cron", "install", "--file", str(crontab))
    assert again.returncode == 0 and crontab.read_text().count("CRON_TZ=America/Sao_Paulo") == 1
    assert service.pgbeat("cron", "remove", "--file", str(crontab)).returncode == 0
    assert crontab.read_text() == "MAILTO=dba@example.com\n15 * * * * /usr/local/bin/something-else\n"

    service.config["timezone"] = system  # the same zone as the system's: no reset line, no warning
    service.write_config()
    same = service.pgbeat("cron", "install", "--file", str(crontab))
    assert same.returncode == 0 and "system's time zone" not in same.stderr
    block = crontab.read_text().split("# BEGIN pgbeat")[1].splitlines()[1:]
    assert block[0] == f"CRON_TZ={system}" and block[-2].endswith("2>&1")


def test_status_times_carry_their_zone(workdir, pg, small_db):
    service = Service(workdir, None, [pg.target("erp", small_db)], timezone="America/Sao_Paulo")
    assert service.pgbeat("backup", "daily").returncode == 0
    assert service.pgbeat("drill").returncode == 0
    text = service.pgbeat("status").stdout
    stamps = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d(?::\d\d)?(?: ([-+]?\w+))?", text)
    assert stamps and all(zone == "-03" for zone in stamps), text  # next runs, first due times, drills
