"""Real parts for the tests: throwaway PostgreSQL clusters, a Redis server, Celery worker processes.

Nothing here touches the machine's own databases: clusters are created with initdb in temporary
folders on free ports and removed afterwards; Redis runs on a free port without persistence.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PG_BIN = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
SECRET_PASSWORD = "s3cr3t-Pa55w0rd-do-not-leak"


# The environment variables pgbeat reads: a test that loads settings in this process starts without them.
PGBEAT_ENV_PREFIXES = ("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME", "BACKUP_ROOT")


def command_tree(command, path: tuple[str, ...] = ()):
    """(words that name it, command) for a click command and, below a group, every command and subcommand:
    ((), main), (("backup",), backup), ..., (("cron",), cron), (("cron", "install"), install), ..."""
    yield path, command
    for name in sorted(getattr(command, "commands", {})):  # a click.Group's subcommands
        yield from command_tree(command.commands[name], (*path, name))


def clear_pgbeat_env(monkeypatch) -> None:
    """Remove from this process's environment (for the test) every variable pgbeat reads."""
    for key in list(os.environ):
        if key.startswith(PGBEAT_ENV_PREFIXES):
            monkeypatch.delenv(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


class PgCluster:
    """A PostgreSQL cluster of its own, playing another database host."""

    def __init__(self, base: Path, name: str, bin_dir: Path = PG_BIN) -> None:
        self.bin = bin_dir  # the installation it runs under (and whose client programs the helpers use)
        self.dir = base / name
        self.data = self.dir / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        run = [*_as_postgres(), str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
               "--locale=C.UTF-8", "-A", "trust", "--no-sync"]
        subprocess.run(run, check=True, capture_output=True)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 60\n"
                    "shared_buffers = 32MB\n")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication postgres 127.0.0.1/32 trust\n"  # base backups (pg_basebackup, pg_receivewal)
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )
        self.start()
        self.sql(f"CREATE ROLE backup LOGIN SUPERUSER PASSWORD '{SECRET_PASSWORD}'")

    def start(self) -> None:
        subprocess.run([*_as_postgres(), str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                        str(self.dir / "server.log"), "-w", "-t", "60", "start"], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*_as_postgres(), str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True)

    def psql(self, sql: str, db: str = "postgres", *, check: bool = True, user: str = "postgres") -> str:
        out = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host,
                              "-p", str(self.port), "-U", user, "-d", db, "-c", sql],
                             capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    sql = psql

    def psql_file(self, path: Path, db: str) -> None:
        subprocess.run([str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p",
                        str(self.port), "-U", "postgres", "-d", db, "-f", str(path)], check=True, capture_output=True)

    def createdb(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return name

    def dropdb(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def restore_plain_gz(self, backup: Path, db: str) -> None:
        """Restore a .sql.gz the seed's way: `gunzip -c FILE | psql` (with ON_ERROR_STOP)."""
        cmd = (f"gunzip -c {shlex_quote(backup)} | {self.bin / 'psql'} -X -q -v ON_ERROR_STOP=1 -h {self.host} "
               f"-p {self.port} -U postgres -d {shlex_quote(db)}")
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True)

    def dump_text(self, db: str) -> str:
        """A plain dump of `db` for comparisons, without the lines that differ between any two dumps."""
        out = subprocess.run([str(self.bin / "pg_dump"), "-h", self.host, "-p", str(self.port), "-U", "postgres",
                              "--no-owner", db], capture_output=True, text=True, check=True).stdout
        return "\n".join(line for line in out.splitlines() if not re.match(r"\\(un)?restrict ", line))

    def target(self, name: str, db: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "host": self.host, "port": self.port, "user": "postgres", "dbname": db, **extra}

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def shlex_quote(value) -> str:
    import shlex

    return shlex.quote(str(value))


class RedisServer:
    """A redis-server of the tests' own; `persistent` turns on AOF (what production should run)."""

    def __init__(self, base: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.dir = base / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.persistent = persistent
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes" if self.persistent else "no",
                                      "--appendfsync", "always", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis.from_url(self.url)
        wait_for(self._ping, 20, what="redis-server")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def restart(self, down_for: float = 2.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


class Service:
    """A pgbeat environment: a targets file, BACKUP_ROOT and a working directory (without .env)."""

    def __init__(self, base: Path, redis_url: str | None, targets: list[dict], **config: Any) -> None:
        self.base = base
        self.backup_root = base / "backups"
        self.cwd = base / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.config_path = base / "pgbeat.yaml"
        self.redis_url = redis_url
        self.config: dict[str, Any] = {"backup_root": str(self.backup_root), "timezone": "UTC",
                                       "node": config.pop("node", "testhost"), "targets": targets, **config}
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "CELERY_", "PGBEAT_"))}
        env.pop("BACKUP_ROOT", None)
        env.update(PGBEAT_CONFIG=str(self.config_path), PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
                   PYTHONUNBUFFERED="1")
        if self.redis_url:
            env["CELERY_BROKER_URL"] = self.redis_url
        env.update(extra)
        return env

    def pgbeat(self, *args: str, input: str | None = None, timeout: float = 300, **env: str):
        return subprocess.run([str(VENV_BIN / "pgbeat"), *args], cwd=self.cwd, env=self.env(**env),
                              capture_output=True, text=True, input=input, timeout=timeout)

    def celery(self, *args: str, timeout: float = 60, **env: str):
        return subprocess.run([str(VENV_BIN / "celery"), "-A", "workers.app", *args], cwd=self.cwd,
                              env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def events(self) -> list[dict]:
        path = self.backup_root / "logs" / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def backups(self, tier: str = "daily", suffix: str = ".sql.gz") -> list[Path]:
        folder = self.backup_root / tier
        # A backup's globals file (`X.globals.sql.gz`) is part of it, not a backup of its own.
        return sorted(p for p in folder.glob(f"*{suffix}") if ".globals." not in p.name) if folder.exists() else []


def without_ansi(text: str) -> str:
    """`text` as a terminal shows it, without its colour and cursor escapes (CRLF as LF)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text).replace("\r\n", "\n")


class Worker:
    """A real `celery worker` process (prefork pool) serving a Service."""

    def __init__(self, service: Service, name: str = "w1", concurrency: int = 2, **env: str) -> None:
        self.service = service
        self.name = f"{name}@{service.config['node']}"
        self.log = service.base / f"worker-{name}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "celery"), "-A", "workers.app", "worker", "-l", "INFO", "-c", str(concurrency),
             "-n", self.name, "--without-mingle", "--without-gossip", "-P", "prefork"],
            cwd=service.cwd, env=service.env(**env), stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self.proc.poll() is not None or " ready." in self.log_text(), 60, what="worker ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def pool_children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


FLOWER_UNIT = ROOT / "deploy" / "systemd" / "pgbeat-flower.service"


def deployed_flower_options() -> list[str]:
    """The options pgbeat-flower.service gives Flower (what follows `celery -A workers.app flower`)."""
    [line] = [line for line in FLOWER_UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    return line.split(" flower ", 1)[1].split()


class Flower:
    """A real Flower (`celery -A workers.app flower`) serving a Service's broker on a free loopback port, with
    basic auth from FLOWER_BASIC_AUTH (the documented way); `options` are more of Flower's options."""

    AUTH = ("admin", "flower-pw")

    def __init__(self, service: Service, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = service.base / f"flower-{self.port}.log"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "celery"), "-A", "workers.app", "flower", *options, f"--port={self.port}",
             "--address=127.0.0.1"], cwd=service.cwd, env=service.env(FLOWER_BASIC_AUTH=":".join(self.AUTH)),
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or self.status("/healthcheck") == 200, 60, 0.2, what="Flower")
        if self.proc.poll() is not None:
            raise RuntimeError(f"Flower exited with {self.proc.returncode}:\n{self.log.read_text()}")

    def status(self, path: str) -> int | None:
        """The HTTP status of GET `path` without credentials (None while nothing answers)."""
        import urllib.error
        import urllib.request

        try:
            return urllib.request.urlopen(self.url + path, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError):
            return None

    def get_json(self, path: str) -> Any:
        """GET `path` with the credentials; return the decoded JSON."""
        import base64
        import urllib.request

        auth = base64.b64encode(":".join(self.AUTH).encode()).decode()
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Basic {auth}"})
        return json.loads(urllib.request.urlopen(request, timeout=15).read())

    def stop(self) -> None:
        """SIGTERM, as systemd stops it (Flower saves its state, with --persistent, on the way out)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def run_state(redis_client, run_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(f"pgbeat:run:{run_id}").items()}


def wait_run(redis_client, run_id: str, timeout: float = 120) -> dict[str, str]:
    """Wait until run `run_id` is finished (succeeded, failed or skipped); return its state."""
    return wait_for(lambda: (s := run_state(redis_client, run_id)).get("status") in ("succeeded", "failed", "skipped")
                    and s, timeout, 0.2, what=f"run {run_id}")


def pg_dump_processes(dbname: str | None = None) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []  # None for a zombie (exited, not yet reaped)
            if proc.info["name"] == "pg_dump" and (dbname is None or any(dbname in a for a in cmdline)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def make_tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def hold_lock(pg, db: str, seconds: float) -> subprocess.Popen:
    """Lock table `big` in `db` for `seconds`, so a pg_dump of `db` waits that long."""
    proc = subprocess.Popen([str(PG_BIN / "psql"), "-X", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-d", db,
                             "-c", f"BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({seconds});"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: pg.sql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                            "WHERE c.relname = 'big' AND l.mode = 'AccessExclusiveLock' AND l.granted", db) == "1",
             10, what="table lock")
    return proc


def release_lock(pg, db: str) -> None:
    """End the session that holds the table lock (so the test need not wait for its sleep)."""
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
           "AND query LIKE 'BEGIN; LOCK TABLE big%'", db)


@contextlib.contextmanager
def table_locked(pg, db: str, seconds: float = 60):
    """Hold table `big` of `db` locked inside the block, so a pg_dump of `db` stays mid-dump until it ends."""
    locker = hold_lock(pg, db, seconds)
    try:
        yield locker
    finally:
        release_lock(pg, db)
        locker.wait(30)


def run_cli(service: Service, *args: str):
    """Run `pgbeat ARGS` for `service` in this process (click's runner: exit code and output without an
    interpreter's start-up), with its environment and working directory and the settings loaded afresh,
    as a new process would; return click's Result."""
    from click.testing import CliRunner

    from pgbeat.cli import main
    from pgbeat.settings import get_settings

    env = service.env()
    before = Path.cwd()
    get_settings.cache_clear()
    os.chdir(service.cwd)
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False,
                                  env={**dict.fromkeys(os.environ), **env})
    finally:
        os.chdir(before)
        get_settings.cache_clear()


def postgres_user_pgbeat(base: Path) -> Path:
    """Build in `base` (a folder the postgres user can read) a venv of Debian's own Python that sees the
    test venv's packages (pgbeat among them, editable: this tree), with a `pgbeat` command; return that
    command. The tests' own Python lives under /root, which postgres cannot read, and PostgreSQL runs
    archive_command and restore_command as postgres. Raise RuntimeError if postgres cannot run it."""
    import sysconfig

    venv = base / "venv"
    made = subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], capture_output=True)
    if made.returncode != 0:  # Debian splits venv out of python3
        subprocess.run(["apt-get", "install", "-y", "python3-venv"], capture_output=True, timeout=600)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    # addsitedir, not a plain path: the editable install's own .pth (this tree) must be read too.
    Path(site, "pgbeat-tests.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    script = venv / "bin" / "pgbeat"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom pgbeat.entry import main\nsys.exit(main())\n")
    script.chmod(0o755)
    check = subprocess.run([*_as_postgres(), str(script), "--version"], capture_output=True, text=True, cwd="/")
    if check.returncode != 0:
        raise RuntimeError(f"postgres cannot run pgbeat from {venv}: {check.stderr}")
    return script


# --- the metrics endpoint ----------------------------------------------------------------------------


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
