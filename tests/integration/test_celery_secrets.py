"""No Celery setting shows a secret: every key of `celery_config`, as Celery censors it, and everything a
running worker, beat and Flower show of it (every `inspect` command, `celery report`, every Flower page).

Celery censors by a setting's name (broker_url, *backend*, keys matching PASS, KEY, SECRET...): a URL
under any other name is shown whole, which is how redbeat_redis_url showed the broker's password.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from urllib.parse import quote

import pytest
import yaml
from celery import Celery
from celery.app.utils import filter_hidden_settings
from celery.worker.control import Panel
from flower.urls import handlers as flower_handlers
from tornado.web import RequestHandler

from pgbeat.settings import load_settings
from tests.support import VENV_BIN, Flower, Service, Worker, free_port, wait_for
from workers.config import celery_config

pytestmark = pytest.mark.integration

# Recognisable, and with the characters a URL must escape.
REDIS_PASSWORD = "Redis-s3cr3t/p@ss:w0rd%"
BACKEND_PASSWORD = "Backend-s3cr3t-pw"
FLOWER_AUTH = Flower.AUTH


def forms(secret: str) -> set[str]:
    """The ways a secret may show: as is, and percent-encoded as it is in a URL."""
    return {secret, quote(secret, safe="")}


def assert_hidden(text: str, where: str, *secrets: str) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"{where} shows {form!r}"


BROKER_URLS = {
    "password only": "redis://:{pw}@127.0.0.1:6379/0",
    "user and password": "redis://pgbeat:{pw}@127.0.0.1:6379/0",
    "TLS": "rediss://pgbeat:{pw}@127.0.0.1:6380/0?ssl_cert_reqs=required",
}


def settings_with(tmp_path, monkeypatch, broker: str, backend: str | None = None):
    config = {"backup_root": str(tmp_path / "backups"), "timezone": "UTC", "broker_url": broker,
              "targets": [{"name": "erp", "dbname": "erp"}]}
    if backend:
        config["result_backend"] = backend
    path = tmp_path / "pgbeat.yaml"
    path.write_text(yaml.safe_dump(config))
    for key in [k for k in os.environ if k.startswith(("DB_", "PGBEAT_", "CELERY_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    monkeypatch.chdir(tmp_path)
    return load_settings(env_file=None)


@pytest.mark.parametrize("shape", sorted(BROKER_URLS))
@pytest.mark.parametrize("own_backend", [False, True], ids=["backend=broker", "own backend"])
def test_every_celery_setting_is_censored(tmp_path, monkeypatch, shape, own_backend):
    """Every key of celery_config, as Celery shows it (inspect conf, Flower, celery report): no password."""
    broker = BROKER_URLS[shape].format(pw=quote(REDIS_PASSWORD, safe=""))
    backend = f"redis://:{BACKEND_PASSWORD}@127.0.0.1:6379/1" if own_backend else None
    config = celery_config(settings_with(tmp_path, monkeypatch, broker, backend))
    assert config["broker_url"] == broker  # the real value is there; only its display is censored
    for key, value in config.items():
        shown = json.dumps(filter_hidden_settings({key: value}), default=repr)
        assert_hidden(shown, key, REDIS_PASSWORD, BACKEND_PASSWORD)
    # ... and RedBeat still gets the credentials (the password is masked by its option's name).
    assert config["redbeat_redis_options"]["password"] == REDIS_PASSWORD


@pytest.fixture
def redis_with_password(workdir):
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass",
                             REDIS_PASSWORD, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    wait_for(lambda: _pings(client), 20, what="redis-server with a password")
    yield url
    proc.terminate()
    proc.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def flower_get_routes(worker: str, task_id: str) -> list[str]:
    """Every page and API of Flower that answers GET, with a worker's name or a task's id filled in."""
    paths = []
    for handler in flower_handlers:
        pattern, view = (handler.regex.pattern, handler.handler_class) if hasattr(handler, "regex") else handler[:2]
        if view.get is RequestHandler.get or pattern.startswith(("/static", "/login", "/logout", ".*")):
            continue  # no GET of its own (POST-only control APIs), or not about Celery
        value = worker if "worker" in pattern else task_id
        paths.append(re.sub(r"\(\.[+*]\)", quote(value, safe="@"), pattern.rstrip("$")))
    return paths


def get(url: str) -> tuple[int, str]:
    auth = base64.b64encode(":".join(FLOWER_AUTH).encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def test_worker_beat_and_flower_show_no_password(workdir, redis_with_password):
    """A broker URL with a recognisable password: not in the reply to any `celery inspect` command (conf
    among them), `celery report`, any Flower page or API, nor the worker's, beat's and Flower's logs."""
    service = Service(workdir, redis_with_password, [{"name": "erp", "port": 1, "dbname": "erp"}],
                      node=f"sec-{uuid.uuid4().hex[:6]}")
    beat_log = workdir / "beat.log"
    flower = Flower(service)
    beat = subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers.app", "beat", "-l", "INFO"], cwd=service.cwd,
                            env=service.env(), stdout=beat_log.open("wb"), stderr=subprocess.STDOUT)
    worker = Worker(service)
    settings = load_settings_of(service)
    control = Celery("control")
    control.conf.update(celery_config(settings))  # the same transport options as pgbeat's processes
    shown: dict[str, str] = {}
    try:
        # RedBeat reached Redis with the credentials it got apart from its URL.
        wait_for(lambda: "Acquired lock" in beat_log.read_text(), 30, what="beat to take its lock")
        for name, meta in sorted(Panel.meta.items()):
            if meta.type != "inspect":
                continue  # `celery inspect NAME` sends this broadcast and prints the reply
            calls = [{}] + ([{"with_defaults": True}] if name == "conf" else [])
            for arguments in calls:
                reply = control.control.broadcast(name, arguments=arguments, destination=[worker.name], reply=True,
                                                  timeout=10, limit=1)
                assert reply, f"inspect {name}: no reply"
                shown[f"inspect {name} {arguments}"] = json.dumps(reply, default=repr)
        conf = json.loads(shown["inspect conf {'with_defaults': True}"])[0][worker.name]
        assert set(celery_config(settings)) <= set(conf)  # every pgbeat setting was in the answer
        shown["celery report"] = control.bugreport()  # what `celery -A workers.app report` prints
        task_id = control.send_task("tasks.reconcile", queue="pgbeat").id
        base = flower.url
        wait_for(lambda: get(f"{base}/api/task/info/{task_id}")[0] == 200, 30, 0.5, what="Flower to see the task")
        assert get(f"{base}/api/workers?refresh=1")[0] == 200
        for path in flower_get_routes(worker.name, task_id):
            status, body = get(base + path)
            assert status < 500, f"{path}: {status}"
            shown[f"Flower {path}"] = body
        assert worker.name in shown["Flower /api/workers"]
        assert "redbeat_redis_url" in shown[f"Flower /worker/{worker.name}"]  # the page showed the settings
    finally:
        flower.stop()
        beat.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            beat.wait(20)
        worker.stop()
        control.close()
    shown.update({"worker log": worker.log_text(), "beat log": beat_log.read_text(),
                  "flower log": flower.log.read_text()})
    for where, text in shown.items():
        assert_hidden(text, where, REDIS_PASSWORD)


def load_settings_of(service: Service):
    """The settings the service's processes load (PGBEAT_CONFIG and CELERY_BROKER_URL of its environment)."""
    env = service.env()
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PGBEAT_CONFIG", "CELERY_BROKER_URL"):
            patch.setenv(key, env[key])
        patch.chdir(service.cwd)
        return load_settings(env_file=None)
