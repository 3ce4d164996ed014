"""Notifications to real local receivers, warnings, `pgbeat status`, `/metrics`, Flower and cron."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.receivers import MailReceiver
from tests.support import SECRET_PASSWORD, VENV_BIN, Flower, Service, Worker, free_port, wait_for, wait_run

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


def scrape(port: int) -> dict[str, float]:
    """Return {'name{label="value",...}': value} with labels sorted by name, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return {k: v for k, v in values.items() if k.startswith("pgbeat_")}


def start_metrics(service: Service, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), "metrics", "--listen", f"127.0.0.1:{port}"], cwd=service.cwd,
                            env=service.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(port), 20, what="the metrics endpoint")
    return proc


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


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
    assert by_key[("crm", "daily")]["overdue"] is True
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
