"""Secrets, file modes, broker URLs with passwords and TLS, config fuzzing, hostile names."""

from __future__ import annotations

import stat
import subprocess
import threading
import uuid

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbeat.errors import ConfigError
from pgbeat.settings import load_settings
from tests.conftest import unique
from tests.support import (
    SECRET_PASSWORD,
    Service,
    Worker,
    clear_pgbeat_env,
    free_port,
    hold_lock,
    pg_dump_processes,
    release_lock,
    table_locked,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def locked_db(pg):
    name = pg.createdb(unique("sec"))
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 1000) AS i", name)
    yield name
    pg.dropdb(name)


def test_password_appears_nowhere(workdir, pg, redis_server, locked_db):
    """A backup with a recognisable password: not in ps, logs, files, Redis keys, task events or errors."""
    service = Service(workdir, redis_server.url, [pg.target("erp", locked_db, user="backup", password=SECRET_PASSWORD),
                                                  pg.target("bad", locked_db, user="backup",
                                                            password=SECRET_PASSWORD + "-wrong")],
                      node=f"sec-{uuid.uuid4().hex[:6]}")
    events: list[bytes] = []
    pubsub = redis_server.client.pubsub()
    pubsub.psubscribe("*")  # Celery's task events (celeryev) travel through pub/sub
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and isinstance(message.get("data"), bytes):
                events.append(message["data"])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    worker = Worker(service)
    locker = hold_lock(pg, locked_db, 60)
    try:
        result = service.celery("call", "tasks.backup", '--args=["erp", "daily"]')
        run_id = result.stdout.strip()
        wait_for(lambda: pg_dump_processes(locked_db), 20, what="pg_dump")
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        release_lock(pg, locked_db)
        assert wait_run(redis_server.client, run_id)["status"] == "succeeded"
        failed = service.pgbeat("backup", "daily", "--target", "bad")
        assert failed.returncode == 1
        status = service.pgbeat("status") .stdout + service.pgbeat("config", "check").stdout
    finally:
        locker.wait(30)
        worker.stop()
        stop.set()
        listener.join(5)
    assert "pg_dump" in ps and SECRET_PASSWORD not in ps
    haystacks = {"worker log": worker.log_text(), "cli": failed.stdout + failed.stderr + status,
                 "events": "\n".join(decode_event(e) for e in events)}
    for path in service.backup_root.rglob("*"):
        if path.is_file():
            haystacks[str(path)] = path.read_bytes().decode("utf-8", "replace")
    redis_dump = b"".join(redis_server.client.dump(key) or b"" for key in redis_server.client.keys("*"))
    haystacks["redis"] = redis_dump.decode("latin-1")
    assert len(events) > 10 and "task-succeeded" in haystacks["events"]
    for where, text in haystacks.items():
        assert SECRET_PASSWORD not in text, where


def decode_event(raw: bytes) -> str:
    """A Celery event as published on Redis: JSON whose body is base64-encoded JSON."""
    import base64
    import json

    try:
        message = json.loads(raw)
        return base64.b64decode(message["body"]).decode("utf-8", "replace") if "body" in message else raw.decode()
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "dump-then-compress"])
def test_temporary_files_are_private_too(workdir, pg, locked_db, streaming):
    service = Service(workdir, None, [pg.target("erp", locked_db, streaming=streaming)])
    with table_locked(pg, locked_db):
        proc = subprocess.Popen([str(service.env()["PATH"].split(":")[0] + "/pgbeat"), "backup", "daily"],
                                cwd=service.cwd, env=service.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            work = service.backup_root / ".work"
            # pg_dump runs (blocked by the lock) once its output file exists: the file may come an instant after
            pattern = "*/erp_*" if streaming else "*/dump.sql"
            [partial] = wait_for(lambda: pg_dump_processes(locked_db) and list(work.glob(pattern)), 20,
                                 what="pg_dump writing its partial dump")
            run_dir = partial.parent
            for folder in (service.backup_root, work, run_dir):
                assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
            assert stat.S_IMODE(partial.stat().st_mode) == 0o600
        except BaseException:
            proc.kill()  # the lock is released on the way out; do not wait for a backup nobody checks
            raise
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    for path in service.backup_root.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


@pytest.fixture
def tls_redis(workdir):
    """A redis-server that wants a password and speaks TLS only."""
    certs = workdir / "tls"
    certs.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs / "key.pem"),
                    "-out", str(certs / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(certs / "cert.pem"), "--tls-key-file", str(certs / "key.pem"),
                             "--tls-ca-cert-file", str(certs / "cert.pem"), "--tls-auth-clients", "no",
                             "--requirepass", "redis-pw-x", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = (f"rediss://:redis-pw-x@127.0.0.1:{port}/0?ssl_cert_reqs=required"
           f"&ssl_ca_certs={certs / 'cert.pem'}")
    import redis

    client = redis.Redis.from_url(url)
    wait_for(lambda: _pings(client), 20, what="redis over TLS")
    yield url, client
    proc.terminate()
    proc.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_broker_with_password_over_tls(workdir, pg, locked_db, tls_redis):
    url, _client = tls_redis
    service = Service(workdir, url, [pg.target("erp", locked_db)], node=f"tls-{uuid.uuid4().hex[:6]}")
    worker = Worker(service)
    try:
        result = service.pgbeat("backup", "daily")
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(service.backups()) == 1
    assert "redis-pw-x" not in worker.log_text() + result.stdout + result.stderr


def test_hostile_database_names_are_backed_up_inside_backup_root(workdir, pg, make_db):
    weird = 'erp "prod" ação \'x\' ../../etc'
    pg.sql(f'CREATE DATABASE "{weird.replace(chr(34), chr(34) * 2)}"')
    try:
        pg.sql("CREATE TABLE t AS SELECT 42 AS answer", weird)
        (workdir / "cwd").mkdir(exist_ok=True)
        service = Service(workdir, None, [pg.target("erp_weird", weird)])
        result = service.pgbeat("backup", "daily")
        assert result.returncode == 0, result.stdout + result.stderr
        [backup] = service.backups()
        assert backup.parent == service.backup_root / "daily"
        assert all(service.backup_root in p.parents for p in service.backup_root.rglob("*"))
        restored = make_db("restored")
        pg.restore_plain_gz(backup, restored)
        assert pg.sql("SELECT answer FROM t", restored) == "42"
    finally:
        pg.sql(f'DROP DATABASE IF EXISTS "{weird.replace(chr(34), chr(34) * 2)}" WITH (FORCE)')


# --- config fuzzing ----------------------------------------------------------------------------------

KEYS = ["name", "dbname", "host", "port", "user", "password", "format", "jobs", "compression", "codec", "level",
        "tiers", "daily", "weekly", "schedule", "keep_days", "min_keep", "enabled", "destinations", "kind",
        "bucket", "encryption", "recipients", "notify", "url", "events", "drill", "assertions", "targets",
        "defaults", "reliability", "visibility_timeout", "timezone", "backup_root", "../x", "", "ção"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["plain", "gzip", "zstd", "s3", "0 2 * * *", "UTC",
                                                           "daily", "-1", "1e9", "age1abc"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=20)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents, env=st.dictionaries(st.sampled_from(["DB_NAME", "DB_PORT", "DB_HOST", "TARGET_NAME",
                                                                "BACKUP_ROOT", "PGBEAT_TIMEZONE"]),
                                               st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]),
                                                       max_size=12), max_size=4),
       raw=st.one_of(st.none(), st.tuples(st.sampled_from([".toml", ".yaml"]), st.text(max_size=200))))
def test_any_config_is_valid_or_a_clear_error(tmp_path_factory, monkeypatch, document, env, raw):
    """Structured YAML documents, and raw text as TOML or YAML: a Settings or a ConfigError, nothing else."""
    folder = tmp_path_factory.mktemp("fuzz")
    if raw is None:
        path = folder / "c.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True))
    else:
        path = folder / f"c{raw[0]}"
        path.write_text(raw[1])
    clear_pgbeat_env(monkeypatch)
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    (folder / ".env").write_text("".join(f"{k}='{v.replace(chr(39), '')}'\n" for k, v in env.items()))
    monkeypatch.chdir(folder)
    try:
        load_settings(env_file=folder / ".env")
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        assert all(" in " in e or "At '" in e or str(path) in e for e in exc.errors), exc.errors
