"""The CLI matrix: every command and option from click's own tree, fed hostile values.

Built from `pgbeat.cli.main` (recursively), so a new command or option is covered without anyone
remembering to. Every value that names nothing (empty, blank, control characters, NUL, option-like,
negative, huge) must be refused as a usage error (exit 2) naming the parameter, with the command
*armed*: every other argument set so that, if the value were taken, the command would really act
(restore --yes over the database, rotate for real, upload, drill). Values that may be legitimate
for some types (a huge number, '@@@:::', '../' paths) run against a *safe* baseline (restore --list,
rotate --dry-run): a documented exit code, no traceback. In every case nothing changes: not the
BACKUP_ROOT tree and its modes, not a decoy /etc under the sandbox, not the databases on the test
cluster or their contents. The world has an unreachable database, Redis and destination configured.

The bulk runs in this process through click's CliRunner; a subprocess sample proves the two agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import click
import psycopg
import pytest
import yaml
from click.testing import CliRunner

from pgbeat import errors
from pgbeat.cli import main
from pgbeat.clitypes import CheckedText, Seconds, shown
from pgbeat.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_UNREACHABLE
from pgbeat.wal.archive import EXIT_FETCH_FAILED
from tests.conftest import unique
from tests.integration.test_offsite import s3_destination
from tests.support import (
    VENV_BIN,
    RedisServer,
    Service,
    Worker,
    clear_pgbeat_env,
    command_tree,
    free_port,
    pg_dump_processes,
    table_locked,
    wait_for,
)

pytestmark = pytest.mark.integration

DOCUMENTED = {0, 1, 2, 3, 4, 5, EXIT_INTERRUPTED, EXIT_FETCH_FAILED}  # the last: wal-fetch only
# The values no parameter may take: each is a usage error, exit 2.
MUST_REFUSE = {
    "empty": "",
    "blank": "   ",
    "tab": "\t",
    "newline": "erp\nrm -rf /",
    "escape": "\x1b[2Jerp",
    "nul": "erp\x00x",
    "negative": "-1",
    "option-like": "--yes",
    "huge": "x" * 5000,
}
# Values some types may take (a database may be called '@@@:::'): a documented exit, nothing changed.
MAY_BE_LEGIT = {
    "huge-number": "9" * 30,
    "malformed": "@@@:::",
    "traversal": "../../../../../etc/passwd",  # from the sandbox's deep cwd: the decoy, never the real one
}
NOT_IN_ARGV = {"nul"}  # a real argv cannot hold NUL: in-process only
CASE_TIMEOUT_S = 20


def valued_params(command: click.Command) -> list[click.Parameter]:
    """The parameters that take a value (not flags, counts, or --help)."""
    return [p for p in command.params
            if not (isinstance(p, click.Option) and (p.is_flag or p.count)) and p.name != "help"]


COMMANDS = {path: command for path, command in command_tree(main) if not isinstance(command, click.Group)}


# --- the structure: no plain str, every named thing refuses blanks -------------------------------------

def all_params():
    yield (), main, main.params
    for path, command in COMMANDS.items():
        yield path, command, command.params
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            yield (name,), command, command.params


ALLOWED_TYPES = (CheckedText, click.Choice, click.IntRange, Seconds)


def test_every_parameter_has_a_type_of_its_own():
    """No option or argument of any command is a plain string (or a plain click.Path): each has a type
    that knows what it names, and every one refuses an empty and a blank value."""
    untyped = []
    for path, _command, params in all_params():
        for param in params:
            if isinstance(param, click.Option) and (param.is_flag or param.count or param.name == "help"):
                continue
            if isinstance(param.type, click.types.StringParamType | click.Path) or not isinstance(
                    param.type, ALLOWED_TYPES):
                untyped.append(f"{' '.join(path)} {param.name}: {param.type!r}")
                continue
            for blank in ("", "   "):
                with pytest.raises(click.BadParameter):
                    param.type.convert(blank, param, None)
    assert not untyped


def test_the_tree_is_walked():
    assert {("backup",), ("restore",), ("cron", "install"), ("config", "check")} <= set(COMMANDS)
    assert sum(len(valued_params(c)) for c in COMMANDS.values()) >= 25


# --- the world -----------------------------------------------------------------------------------------


@dataclass
class World:
    sandbox: Path
    cwd: Path  # five folders deep, so that ../../../../../etc is the sandbox's decoy
    config: Path
    backup_root: Path
    backup: Path
    url: str  # a copy's address at the unreachable destination
    db: str
    pg: object
    connection: psycopg.Connection | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME"))}
        env.pop("BACKUP_ROOT", None)
        env.update(PGBEAT_CONFIG=str(self.config), PATH=f"{VENV_BIN}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg):
    sandbox = tmp_path_factory.mktemp("matrix")
    db = pg.createdb(unique("matrix"))
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT i, md5(i::text) FROM "
           "generate_series(1, 50) i", db)
    service = Service(sandbox, None, [pg.target("erp", db)])
    made = service.pgbeat("backup", "daily")
    assert made.returncode == 0, made.stdout + made.stderr
    [backup] = service.backups()
    cwd = sandbox / "w1" / "w2" / "w3" / "w4" / "w5"
    cwd.mkdir(parents=True)
    (sandbox / "etc").mkdir()
    (sandbox / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (sandbox / "cron.d").mkdir()
    (sandbox / "fetched").mkdir()
    (sandbox / "pg_wal").mkdir()
    (sandbox / "pg_wal" / "000000010000000000000001").write_bytes(b"wal" * 1000)
    (sandbox / "pg_wal" / "not-a-wal-file").write_bytes(b"x")
    closed = [free_port() for _ in range(3)]  # nothing listens: database, Redis, S3
    config = {
        "backup_root": str(service.backup_root), "timezone": "UTC", "node": "matrixhost",
        "broker_url": f"redis://127.0.0.1:{closed[1]}/0",
        "reliability": {"retries": 0},
        "targets": [
            pg.target("erp", db, destinations=[{"name": "offsite", "kind": "s3", "bucket": "matrix",
                                                "endpoint_url": f"http://127.0.0.1:{closed[2]}", "retries": 1,
                                                "access_key_id": "matrix-access-key",
                                                "secret_access_key": "matrix-secret-key"}]),
            {"name": "down", "host": "127.0.0.1", "port": closed[0], "dbname": "down", "user": "postgres",
             "connect_timeout": 1},
        ],
    }
    path = sandbox / "matrix.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    world = World(sandbox=sandbox, cwd=cwd, config=path, backup_root=service.backup_root, backup=backup,
                  url=f"s3://matrix/daily/{backup.name}", db=db, pg=pg)
    world.connection = connect(world)
    yield world
    world.connection.close()
    pg.dropdb(db)


def tree(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` with its mode, and for files size, mtime and SHA-256."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            entry: tuple = (info.st_mode,)
            if path.is_file() and not path.is_symlink():
                entry += (info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            found[str(path.relative_to(folder))] = entry
    return found


def databases(world: World) -> tuple:
    """The cluster's databases (oid and name: a swap changes the oid) and the matrix table's contents,
    through one kept connection (a restore that disconnects it shows up as a change, too)."""
    try:
        conn = world.connection
        listing = conn.execute("SELECT oid, datname FROM pg_database ORDER BY 1").fetchall()
        contents = conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM t").fetchone()
    except psycopg.OperationalError as exc:
        world.connection = connect(world)
        return ("connection lost", str(exc)), None
    return tuple(listing), contents


def connect(world: World) -> psycopg.Connection:
    return psycopg.connect(host=world.pg.host, port=world.pg.port, user="postgres", dbname=world.db, autocommit=True)


def snapshot(world: World) -> tuple:
    return tree(world.sandbox), databases(world)


# --- the cases -----------------------------------------------------------------------------------------

# Per command: the armed baseline (the command would really act) and the safe one (it stops short).
# A value under test replaces the baseline's own value of that parameter.
def baselines(world: World) -> dict[tuple[str, ...], tuple[dict, dict]]:
    cron_file = str(world.sandbox / "cron.d" / "pgbeat")
    armed = {
        ("backup",): {"tier": "daily", "timeout": "5"},
        ("list",): {},
        ("verify",): {"file": str(world.backup)},
        ("pin",): {"file": str(world.backup), "note": "year-end close"},
        ("rotate",): {},
        ("restore",): {"file": str(world.backup), "yes": True},
        ("rebuild",): {"source": "erp", "onto_name": "down", "yes": True},  # onto a server that is down
        ("fetch",): {"url": world.url, "folder": str(world.sandbox / "fetched")},
        ("upload",): {"retry": True},
        ("drill",): {},
        ("status",): {},
        ("metrics",): {},
        ("cron", "install"): {"file": cron_file, "user": "pgbeat"},
        ("cron", "remove"): {"file": cron_file},
        ("config", "check"): {},
        ("config", "example"): {},
        ("wal-push",): {"wal_file": str(world.sandbox / "pg_wal" / "000000010000000000000001"), "target_name": "erp"},
        ("wal-fetch",): {"wal_name": "000000010000000000000001", "dest": str(world.sandbox / "fetched" / "WAL"),
                         "target_name": "down"},
        ("check",): {"target_name": "down", "timeout": "5"},
        ("receive",): {"target_name": "erp"},  # erp has no wal.receiver: it stops short, saying so
    }
    safe = {**armed, ("rotate",): {"dry_run": True}, ("pin",): {"file": str(world.sandbox / "none.sql.gz")},
            ("restore",): {"file": str(world.backup), "list_only": True},
            ("rebuild",): {"source": "erp", "onto_name": "down", "dry_run": True},
            ("wal-push",): {"wal_file": str(world.sandbox / "pg_wal" / "not-a-wal-file"), "target_name": "erp"}}
    return {path: (armed[path], safe[path]) for path in armed}


def argv_for(path: tuple[str, ...], command: click.Command, values: dict) -> list[str]:
    """The command line: options, then `--` and the arguments (so that '-1' reaches FILE's type)."""
    options, arguments = list(path), []
    unknown = set(values) - {p.name for p in command.params}
    assert not unknown, f"{path} has no parameter {unknown}"
    for param in command.params:
        if param.name not in values:
            continue
        value = values[param.name]
        if isinstance(param, click.Argument):
            arguments.append(value)
        elif value is True:
            options.append(param.opts[-1])
        else:
            options += [param.opts[-1], value]
    return [*options, "--", *arguments] if arguments else options


class CaseTimeout(BaseException):
    """A command that kept running: it took a value it should have refused, and acted on it."""


@contextlib.contextmanager
def deadline(seconds: int):
    def expired(*_):
        raise CaseTimeout(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(world: World, argv: list[str], monkeypatch) -> tuple[int, str, str]:
    return invoke(world.cwd, world.env(), argv, monkeypatch)


def invoke(cwd: Path, env: dict[str, str], argv: list[str], monkeypatch) -> tuple[int, str, str]:
    """Run `pgbeat argv` in this process (click's CliRunner) as it would run in `cwd` with `env`."""
    from pgbeat.settings import get_settings

    clear_pgbeat_env(monkeypatch)
    monkeypatch.chdir(cwd)
    get_settings.cache_clear()
    try:
        with deadline(CASE_TIMEOUT_S):
            result = CliRunner().invoke(main, argv, env=env)
    finally:
        get_settings.cache_clear()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError(f"{argv!r} raised {result.exception!r}:\n" + "".join(
            traceback.format_exception(result.exception)))
    return result.exit_code, result.stdout, result.stderr


def run_subprocess(world: World, argv: list[str]) -> tuple[int, str, str]:
    done = subprocess.run([str(VENV_BIN / "pgbeat"), *argv], cwd=world.cwd, env=world.env(), capture_output=True,
                          text=True, timeout=CASE_TIMEOUT_S * 2, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def cases():
    for path, command in COMMANDS.items():
        for param in valued_params(command):
            yield pytest.param(path, param.name, id=f"{' '.join(path)}:{param.name}")


def check(world: World, path, name, kind: str, value: str, run) -> tuple[list[str], tuple[int, str, str]]:
    """Run one case; return what is wrong with it (nothing when all is well) and its outcome."""
    command = COMMANDS[path]
    armed, safe = baselines(world).get(path, ({}, {}))
    legit = kind in MAY_BE_LEGIT
    argv = argv_for(path, command, {**(safe if legit else armed), name: value})
    before = snapshot(world)
    started = time.monotonic()
    code, stdout, stderr = outcome = run(argv)
    problems = []
    output = stdout + stderr
    if code not in DOCUMENTED:
        problems.append(f"exit {code} is not a documented exit code")
    if "Traceback" in output or "failed unexpectedly" in output:
        problems.append(f"an unexpected error: {shown(output[-400:], 400)}")
    if not legit:
        param = next(p for p in command.params if p.name == name)
        hint = param.get_error_hint(click.Context(command))  # how click names it: '--into', 'URL', '[FILE]'
        if code != EXIT_CONFIG or f"Invalid value for {hint}" not in stderr:
            problems.append(f"exit {code}, not a usage error naming {hint}: {shown(output[-300:], 300)}")
    after = snapshot(world)
    if legit:  # a file the user named (`cron install --file 999`) may appear where they are, and only there
        here = f"{world.cwd.relative_to(world.sandbox)}/"
        for created in world.cwd.iterdir():
            if created.is_dir():
                shutil.rmtree(created)
            else:
                created.unlink()
        before, after = (({k: v for k, v in files.items() if not k.startswith(here)}, dbs)
                         for files, dbs in (before, after))
    if after != before:
        changed = sorted(set(before[0].items()) ^ set(after[0].items()))
        problems.append(f"it changed something: files {changed[:4]}, databases equal: {before[1] == after[1]}")
    if time.monotonic() - started > CASE_TIMEOUT_S / 2:
        problems.append(f"it took {time.monotonic() - started:.1f}s")
    return [f"{' '.join(shown(a) for a in argv)}: {p}" for p in problems], outcome


def test_every_command_has_baselines(world):
    assert set(COMMANDS) <= set(baselines(world)), "give the new command its baselines here"


@pytest.mark.parametrize(("path", "name"), list(cases()))
def test_cli_matrix(world, path, name, monkeypatch, caplog):
    """One parameter of one command with every hostile value."""
    problems = []
    for kind, value in {**MUST_REFUSE, **MAY_BE_LEGIT}.items():
        problems += check(world, path, name, kind, value, lambda argv: run_in_process(world, argv, monkeypatch))[0]
    assert "Traceback" not in caplog.text
    assert not problems, "\n".join(problems)


# One case per kind of refusal, as real processes (each costs a Python start-up).
SAMPLE = [(("restore",), "into", "empty"), (("restore",), "target_name", "blank"), (("restore",), "into", "traversal"),
          (("backup",), "timeout", "negative"), (("cron", "install"), "user", "newline"),
          (("verify",), "identity", "traversal")]


def test_a_subprocess_sample_agrees_with_the_matrix(world, monkeypatch):
    """The same cases as real processes: the same exit code and first error line, and nothing changed."""
    values = {**MUST_REFUSE, **MAY_BE_LEGIT}
    problems = []
    for path, name, kind in SAMPLE:
        assert kind not in NOT_IN_ARGV
        firsts = []
        for run in (lambda argv: run_in_process(world, argv, monkeypatch), lambda argv: run_subprocess(world, argv)):
            found, (code, _stdout, stderr) = check(world, path, name, kind, values[kind], run)
            problems += found
            firsts.append((code, [line for line in stderr.splitlines() if line.strip()][-1:]))
        if firsts[0] != firsts[1]:
            problems.append(f"{path} {name} {kind}: in-process {firsts[0]} but as a process {firsts[1]}")
    assert not problems, "\n".join(problems)


# --- BACKUP_ROOT, the broker, Ctrl-C, the metrics port -----------------------------------------------


@pytest.fixture
def small(workdir, pg, make_db):
    db = make_db("edge")
    pg.sql("CREATE TABLE big AS SELECT generate_series(1, 100) AS i", db)
    return db


@pytest.mark.parametrize("shape", ["a file", "under a file"])
def test_a_backup_root_that_is_not_a_folder_is_named_before_anything_runs(workdir, pg, small, shape, monkeypatch):
    blocker = workdir / "blocker"
    blocker.write_text("not a folder\n")
    root = blocker if shape == "a file" else blocker / "backups"
    service = Service(workdir, None, [pg.target("erp", small)])
    service.config["backup_root"] = str(root)
    service.write_config()
    for argv in (["backup", "daily"], ["config", "check"], ["rotate"], ["status"], ["list"], ["drill"]):
        code, _out, err = invoke(service.cwd, service.env(), argv, monkeypatch)
        assert code == EXIT_CONFIG, (argv, err)
        assert f"BACKUP_ROOT {root} is not a folder" in err and "Traceback" not in err, argv
    assert blocker.read_text() == "not a folder\n"


def test_an_unwritable_backup_root_is_named_before_a_run_and_by_config_check(workdir, pg, small, monkeypatch):
    readonly = workdir / "readonly"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a read-only tmpfs (an unwritable folder, even for root)")
    try:
        service = Service(workdir, None, [pg.target("erp", small)])
        for root in (readonly, readonly / "backups"):
            service.config["backup_root"] = str(root)
            service.write_config()
            for argv in (["backup", "daily"], ["config", "check", "--no-connect"], ["rotate"], ["upload", "--retry"]):
                code, _out, err = invoke(service.cwd, service.env(), argv, monkeypatch)
                assert code == EXIT_CONFIG, (argv, err)
                assert f"BACKUP_ROOT {root}" in err and "writable" in err, err
            assert invoke(service.cwd, service.env(), ["status"], monkeypatch)[0] == 0  # reading is still fine
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def follow(service: Service, argv: list[str], until) -> subprocess.Popen:
    """Start a pgbeat command that follows a run; return it once `until()` holds (it must still run)."""
    proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), *argv], cwd=service.cwd, env=service.env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: until() or proc.poll() is not None, 60, what=f"{argv} to follow its run")
    except BaseException:
        proc.kill()
        raise
    assert proc.poll() is None, proc.communicate()
    return proc


def busy_worker(redis: RedisServer, service: Service, ttl: float = 600, queues: list[str] | None = None) -> None:
    """Give `service`'s host a worker that is alive (its heartbeat is in Redis) but never takes a task."""
    from pgbeat.coordination.runs import NodeRegistry

    NodeRegistry(redis.client).beat(service.config["node"], "busy@worker", ttl=ttl, queues=queues)


def queued(redis: RedisServer):
    """True once a message waits in one of Redis' lists (the queue of a run nobody works on)."""
    return lambda: any(redis.client.type(key) == b"list" for key in redis.client.keys("*"))


@pytest.mark.parametrize("how", ["backup through the broker", "restore --on-worker"])
def test_a_broker_that_goes_away_while_the_cli_follows_is_one_line_and_exit_5(workdir, pg, world, how):
    redis = RedisServer(workdir)  # its own: it is stopped mid-run
    try:
        # No worker: the run stays queued while the CLI follows it.
        service = Service(workdir, redis.url, [pg.target("erp", world.db)], node=f"gone-{unique('n')}")
        argv = ["backup", "daily"] if how == "backup through the broker" else [
            "restore", str(world.backup), "--yes", "--on-worker"]
        # A worker of that host is alive but busy (its heartbeat is there): the run is sent and waits in
        # its queue (with no live worker the CLI refuses to send it at all).
        busy_worker(redis, service)
        proc = follow(service, argv, queued(redis))
        redis.stop()
        out, err = proc.communicate(timeout=60)
    finally:
        if redis.proc.poll() is None:
            redis.stop()
    assert proc.returncode == EXIT_UNREACHABLE, (out, err)
    assert "Traceback" not in err and "broker" in err.lower(), err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2, err  # the line and its HINT


def no_internals(output: str) -> bool:
    """True when `output` shows none of pgbeat's insides: no traceback, no work folder or passfile."""
    return not any(word in output for word in ("Traceback", "KeyboardInterrupt", ".work/", ".pgpass"))


def test_a_broker_that_is_down_before_anything_is_sent(workdir, pg, small, monkeypatch):
    service = Service(workdir, f"redis://127.0.0.1:{free_port()}/0", [pg.target("erp", small)])
    started = time.monotonic()
    result = service.pgbeat("backup", "daily")
    assert result.returncode == EXIT_UNREACHABLE and no_internals(result.stdout + result.stderr), result.stderr
    assert time.monotonic() - started < 10  # not Celery's 20 retries of its result store, nor redis-py's
    # One line: what is wrong, that nothing was sent, and the way out.
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert f"127.0.0.1:{service.redis_url.rsplit(':', 1)[1].split('/')[0]}" in line, line
    assert "nothing was sent" in line and "`pgbeat backup daily --local`" in line, line
    assert result.stdout == "" and service.backups() == []
    # The way out: the same chain in this process, the broker still down.
    result = service.pgbeat("backup", "daily", "--local")
    assert result.returncode == 0 and result.stderr == "" and no_internals(result.stdout), result.stdout + result.stderr
    [backup] = service.backups()
    assert service.pgbeat("verify", str(backup)).returncode == 0
    code, _out, err = invoke(service.cwd, service.env(), ["status"], monkeypatch)
    assert code == 0 and "cannot read run states from the broker" in err and "Traceback" not in err, err
    code, _out, err = invoke(service.cwd, service.env(), ["restore", "--latest", "--on-worker", "--yes"], monkeypatch)
    assert code == EXIT_UNREACHABLE and "The broker" in err and "Traceback" not in err, err


def queue_lists(redis: RedisServer) -> dict[str, int]:
    """Every Redis list that holds task messages (kombu's queues: not pgbeat's progress lists), with its length."""
    return {key.decode(): redis.client.llen(key) for key in redis.client.keys("*")
            if redis.client.type(key) == b"list" and not key.endswith(b":progress")}


def test_a_backup_that_no_worker_would_take_is_said_at_once_and_status_shows_what_waits(workdir, pg, small):
    redis = RedisServer(workdir)  # its own: no worker of another test may take what is queued here
    try:
        targets = [pg.target(name, small) for name in ("erp", "crm", "hr")]
        service = Service(workdir, redis.url, targets, node=f"idle-{unique('n')}")
        started = time.monotonic()
        result = service.pgbeat("backup", "daily", "--target", "erp")
        assert time.monotonic() - started < 10, "said within seconds, not after the 6 h timeout"
        assert result.returncode == EXIT_UNREACHABLE and no_internals(result.stdout + result.stderr), result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.strip()]
        assert "No live worker consumes queue pgbeat" in line and "nothing was sent" in line, line
        assert "`pgbeat backup daily --local`" in line, line
        assert queue_lists(redis) == {}

        # Sent anyway (--no-wait): status shows the three messages that really wait in Redis.
        sent = service.pgbeat("backup", "daily", "--no-wait")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        runs = dict(re.findall(r"^(\w+): daily backup queued as run (\w+)$", sent.stdout, re.M))
        assert set(runs) == {"erp", "crm", "hr"}
        assert queue_lists(redis) == {"pgbeat": 3}
        status = service.pgbeat("status", "--json")
        assert status.returncode == 0, status.stderr
        overview = json.loads(status.stdout)["runs"]
        assert {(r["target"], r["tier"], r["run_id"], r["queue"]) for r in overview["queued"]} == {
            (name, "daily", run_id, "pgbeat") for name, run_id in runs.items()}
        assert overview["queue_lengths"] == {"pgbeat": 3}
        text = service.pgbeat("status").stdout
        assert "queue pgbeat: 3 message(s) waiting" in text and f"erp/daily ({runs['erp'][:8]})" in text, text
    finally:
        redis.stop()


def test_a_followed_backup_whose_last_worker_goes_is_said_and_stays_queued(workdir, pg, small):
    redis = RedisServer(workdir)
    try:
        service = Service(workdir, redis.url, [pg.target("erp", small)], node=f"going-{unique('n')}")
        busy_worker(redis, service, ttl=8, queues=["pgbeat"])  # its heartbeat runs out 8 s from now
        started = time.monotonic()
        result = service.pgbeat("backup", "daily", timeout=60)
        assert result.returncode == EXIT_UNREACHABLE and no_internals(result.stdout + result.stderr), result.stderr
        assert time.monotonic() - started < 8 + 10  # within a few seconds of the heartbeat's end
        [line] = [line for line in result.stderr.splitlines() if line.strip()]
        run_id = result.stdout.split("queued as run ")[1].split()[0]
        assert f"run {run_id} stays queued there" in line, line
        assert queue_lists(redis) == {"pgbeat": 1}
    finally:
        redis.stop()


def test_a_worker_of_another_queue_does_not_count_and_a_live_one_without_a_heartbeat_does(workdir, pg, small):
    """Which queue a worker consumes is what counts; and a worker whose heartbeat is missing from Redis
    (lost, or not yet written) is found by asking the workers themselves."""
    redis = RedisServer(workdir)
    try:
        service = Service(workdir, redis.url, [pg.target("erp", small)], node=f"q-{unique('n')}")
        busy_worker(redis, service, queues=["pgbeat.host.elsewhere"])
        assert service.pgbeat("backup", "daily").returncode == EXIT_UNREACHABLE
        redis.client.delete("pgbeat:workers", "pgbeat:workers:queues")
        worker = Worker(service)
        try:
            redis.client.delete("pgbeat:workers", "pgbeat:workers:queues")  # as if its heartbeat were lost
            result = service.pgbeat("backup", "daily", timeout=120)
        finally:
            worker.stop()
        assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout + result.stderr
    finally:
        redis.stop()


def test_ctrl_c_while_following_a_run_is_one_line(workdir, pg, small):
    redis = RedisServer(workdir)  # its own: the queued run must not reach another test's worker
    try:
        service = Service(workdir, redis.url, [pg.target("erp", small)], node=f"intr-{unique('n')}")
        busy_worker(redis, service)
        proc = follow(service, ["backup", "daily"], queued(redis))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        redis.stop()
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    assert err.strip() == "pgbeat: interrupted", err


def test_ctrl_c_at_every_step_of_a_local_backup_is_one_line(workdir, pg, small):
    """SIGINT at the start and the end of every step of `backup --local` (the broker down): one line, exit
    130, none of pgbeat's insides (traceback, work folder, passfile) shown, no work folder left."""
    from pgbeat.pipeline.steps_table import STEPS

    service = Service(workdir, f"redis://127.0.0.1:{free_port()}/0", [pg.target("erp", small)])
    problems = []
    for point in [f"{step}.{end}" for step in STEPS for end in ("start", "end")]:
        result = service.pgbeat("backup", "daily", "--local", timeout=60, PGBEAT_FAULTS=f"{point}=int")
        output = result.stdout + result.stderr
        if result.returncode != EXIT_INTERRUPTED or result.stderr.strip() != "pgbeat: interrupted":
            problems.append(f"{point}: exit {result.returncode}, stderr {result.stderr[-300:]!r}")
        if not no_internals(output) or "✗" in output:
            problems.append(f"{point}: {output[-300:]!r}")
        if list((service.backup_root / ".work").glob("*")):
            problems.append(f"{point}: left {list((service.backup_root / '.work').iterdir())}")
    assert not problems, "\n".join(problems)


def test_an_empty_broker_url_backs_up_in_this_process(workdir, pg, small):
    """`CELERY_BROKER_URL=` (empty, in the environment) is no broker: the chain runs here."""
    service = Service(workdir, None, [pg.target("erp", small)])
    result = service.pgbeat("backup", "daily", CELERY_BROKER_URL="")
    assert result.returncode == 0 and "✓ notify" in result.stdout and no_internals(result.stdout + result.stderr)
    assert len(service.backups()) == 1


@pytest.mark.parametrize("how", ["no broker", "--local, the broker down"])
def test_ctrl_c_during_a_backup_in_this_process_is_one_line_and_leaves_nothing(workdir, pg, small, how):
    broker = None if how == "no broker" else f"redis://127.0.0.1:{free_port()}/0"
    service = Service(workdir, broker, [pg.target("erp", small)])
    argv = ["backup", "daily"] + ([] if broker is None else ["--local"])
    with table_locked(pg, small):
        proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), *argv], cwd=service.cwd, env=service.env(),
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: pg_dump_processes(small), 30, what="pg_dump")
        except BaseException:
            proc.kill()
            raise
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    assert err.strip() == "pgbeat: interrupted" and no_internals(err + out), (out, err)
    wait_for(lambda: not pg_dump_processes(small), 10, what="pg_dump gone")
    assert service.backups() == [] and not list((service.backup_root / ".work").glob("*"))


@pytest.mark.parametrize("argv", [["restore", "--latest", "--jobs", "0"], ["backup", "daily", "--timeout", "-5"],
                                  ["metrics", "--listen", "garbage"], ["rotate", "--now", "0001-01-01"],
                                  ["restore", "--latest", "--into", "--yes"], ["backup", "daily", "--timeout", "inf"]])
def test_the_issue_examples_are_usage_errors(world, argv, monkeypatch):
    code, _out, err = invoke(world.cwd, world.env(), argv, monkeypatch)
    assert code == EXIT_CONFIG and "Invalid value for" in err and "Traceback" not in err, err


def test_metrics_on_a_port_in_use_is_one_line(workdir, pg, small, monkeypatch):
    service = Service(workdir, None, [pg.target("erp", small)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _out, err = invoke(service.cwd, service.env(), ["metrics", "--listen",
                                                              f"127.0.0.1:{taken.getsockname()[1]}"], monkeypatch)
    assert code == EXIT_CONFIG and "cannot listen on" in err and "Traceback" not in err, err


def test_allowed_pg_dump_options_reach_pg_dump_spelled_out(workdir, pg, small, make_db):
    """Abbreviated and clustered options from the allow-list work in a real dump: pg_dump gets their
    canonical spelling, and the backup restores without the excluded data."""
    pg.sql("CREATE TABLE audit AS SELECT generate_series(1, 10) AS i; GRANT SELECT ON audit TO backup", small)
    service = Service(workdir, None, [pg.target("erp", small, pg_dump_options=["-xO", "--exclude-table-data",
                                                                             "audit", "--quote-all"])])
    result = service.pgbeat("backup", "daily")
    assert result.returncode == 0, result.stdout + result.stderr
    restored = make_db("opts")
    pg.restore_plain_gz(service.backups()[0], restored)
    assert pg.sql("SELECT count(*) FROM audit", restored) == "0"
    assert pg.sql("SELECT count(*) FROM big", restored) == "100"
    assert pg.sql("SELECT count(*) FROM information_schema.role_table_grants WHERE table_name = 'audit' "
                  "AND grantee = 'backup'", restored) == "0"


# --- every documented exit code, from a real scenario --------------------------------------------------
#
# Generated from the README's exit-code table: a code documented there without a scenario here (or a
# scenario for a code not documented) fails `test_every_documented_exit_code_has_a_scenario`.

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_exit_codes() -> dict[int, str]:
    """The README's "Exit codes" table: {code: meaning}."""
    section = README.read_text().split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)}


@dataclass
class Scene:
    """One exit-code scenario's world: a target `erp` on database `db`, and a verified backup."""

    service: Service
    db: str
    backup: Path
    pg: object
    request: pytest.FixtureRequest  # for the servers only some scenarios need (moto's S3)

    def copy_at_s3(self) -> tuple[str, str, str]:
        """Give `erp` an S3 destination (moto) and copy the backup there; return (its URL, bucket, key)."""
        moto = self.request.getfixturevalue("moto_s3")
        bucket = moto.new_bucket()
        self.service.config["targets"][0]["destinations"] = [s3_destination(moto, bucket)]
        self.service.write_config()
        copied = self.service.pgbeat("upload", "--retry", timeout=120)
        assert copied.returncode == 0, copied.stdout + copied.stderr
        key = f"pgbeat/daily/{self.backup.name}"
        return f"s3://{bucket}/{key}", bucket, key

    def damaged_copy_at_s3(self, damage: str) -> str:
        """Copy the backup to S3, then damage the copy there (`damage`: a key of REMOTE_DAMAGE); return its URL."""
        url, bucket, key = self.copy_at_s3()
        client = self.request.getfixturevalue("moto_s3").client()
        suffix, change = REMOTE_DAMAGE[damage]
        if change is None:
            client.delete_object(Bucket=bucket, Key=key + suffix)
        else:
            body = client.get_object(Bucket=bucket, Key=key + suffix)["Body"].read()
            client.put_object(Bucket=bucket, Key=key + suffix, Body=change(body))
        return url


def flip_middle_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    return bytes(changed)


def other_row_count(manifest: bytes) -> bytes:
    """The manifest with another row count: valid JSON, but its seal no longer matches."""
    data = json.loads(manifest)
    data["tables"] = {table: rows + 1 for table, rows in data["tables"].items()}
    return json.dumps(data).encode()


# Damage done to a copy at a destination: (the object's suffix, how it is changed; None: removed).
REMOTE_DAMAGE = {
    "a flipped byte": ("", flip_middle_byte),
    "a truncated file": ("", lambda data: data[: len(data) // 2]),
    "a manifest that is not JSON": (".manifest.json", lambda data: data[:-7]),
    "a manifest that does not match its seal": (".manifest.json", other_row_count),
    "a damaged .sha256": (".sha256", lambda data: b"0" * 64 + data[64:]),
    "no manifest": (".manifest.json", None),
}


@contextlib.contextmanager
def held_target_lock(scene: Scene):
    """Hold `erp`'s target lock as another embedded run on this host would (pgbeat.coordination.filelock)."""
    from pgbeat.coordination.filelock import FileLock

    lock = FileLock(scene.service.backup_root, "target-erp")
    assert lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def waits_on(proc: subprocess.Popen, path: Path) -> bool:
    """True once process `proc` has `path` open (a backup waiting for the target lock)."""
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{proc.pid}/fd").iterdir())
    return False


def backup_locked(scene: Scene):
    with held_target_lock(scene):
        return scene.service.pgbeat("backup", "daily", timeout=60)


def restore_locked(scene: Scene):
    """Another restore (here: this test's session) holds the restore lock of the database restored into."""
    from pgbeat.restore.restore import restore_lock_keys

    into = f"{scene.db}_into"
    with psycopg.connect(host=scene.pg.host, port=scene.pg.port, user="postgres", dbname="postgres",
                         autocommit=True) as holder:
        assert holder.execute("SELECT pg_try_advisory_lock(%s, %s)", restore_lock_keys(into)).fetchone()[0]
        return scene.service.pgbeat("restore", str(scene.backup), "--into", into, "--yes", timeout=120)


def verify_damaged(scene: Scene):
    damaged = scene.service.base / "damaged" / scene.backup.name
    damaged.parent.mkdir()
    for sidecar in scene.backup.parent.glob(f"{scene.backup.name}*"):
        shutil.copy(sidecar, damaged.parent / sidecar.name)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    return scene.service.pgbeat("verify", str(damaged), timeout=60)


def unreachable_target(scene: Scene):
    scene.service.config["targets"][0]["port"] = free_port()
    scene.service.write_config()
    return scene.service.pgbeat("config", "check", timeout=60)


def broker_down(scene: Scene):
    scene.service.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    return scene.service.pgbeat("backup", "daily", timeout=60)


def backup_local_with_the_broker_down(scene: Scene):
    scene.service.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    return scene.service.pgbeat("backup", "daily", "--local", timeout=120)


def backup_with_no_worker(scene: Scene):
    redis = RedisServer(scene.service.base)  # its own: no other test's worker is alive there
    try:
        scene.service.redis_url = redis.url
        return scene.service.pgbeat("backup", "daily", timeout=60)
    finally:
        redis.stop()


def backup_of_a_gone_server(scene: Scene):
    scene.service.config["targets"][0]["port"] = free_port()
    scene.service.write_config()
    return scene.service.pgbeat("backup", "daily", timeout=120)


def interrupted_while_waiting_for_the_lock(scene: Scene):
    """Ctrl-C while `backup` waits for the target lock another run holds."""
    scene.service.config["reliability"]["lock_wait"] = 120
    scene.service.write_config()
    with held_target_lock(scene) as lock:
        proc = subprocess.Popen([str(VENV_BIN / "pgbeat"), "backup", "daily"], cwd=scene.service.cwd,
                                env=scene.service.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: waits_on(proc, lock.path) or proc.poll() is not None, 60, what="backup waiting")
        finally:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def fetch_damaged(scene: Scene, damage: str):
    """`pgbeat fetch` of a damaged copy into a folder it must create: nothing may be left there."""
    url = scene.damaged_copy_at_s3(damage)
    into = scene.service.base / "fetched" / "new"
    result = scene.service.pgbeat("fetch", url, "--to", str(into), timeout=120)
    assert not (scene.service.base / "fetched").exists(), sorted(scene.service.base.joinpath("fetched").rglob("*"))
    return result


def fetch_good(scene: Scene):
    """`pgbeat fetch` of a good copy into folders it creates: 0700 folders, 0600 files, the same bytes."""
    url, _bucket, _key = scene.copy_at_s3()
    into = scene.service.base / "fetched" / "new"
    result = scene.service.pgbeat("fetch", url, "--to", str(into), timeout=120)
    server_globals = json.loads(scene.backup.with_name(scene.backup.name + ".manifest.json").read_text())["globals"]
    assert sorted(p.name for p in into.iterdir()) == sorted(
        [p.name for p in scene.backup.parent.glob(f"{scene.backup.name}*")] + [server_globals["file"]]
    ), list(into.iterdir())
    for folder in (into, into.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for file in into.iterdir():
        assert file.stat().st_mode & 0o777 == 0o600, file
    assert (into / scene.backup.name).read_bytes() == scene.backup.read_bytes()
    return result


def fetch_over_a_file(scene: Scene):
    """`pgbeat fetch` into a folder that already holds the backup's name: refused, the file untouched."""
    url, _bucket, _key = scene.copy_at_s3()
    into = scene.service.base / "fetched"
    into.mkdir()
    (into / scene.backup.name).write_bytes(b"mine")
    result = scene.service.pgbeat("fetch", url, "--to", str(into), timeout=120)
    assert [p.name for p in into.iterdir()] == [scene.backup.name]
    assert (into / scene.backup.name).read_bytes() == b"mine"
    return result


def latest_of_several_targets(scene: Scene):
    """`restore --latest` without --target when two targets are configured: which one is not ours to guess."""
    scene.service.config["targets"].append({**scene.service.config["targets"][0], "name": "erp2"})
    scene.service.write_config()
    return scene.service.pgbeat("restore", "--latest", "--yes", timeout=60)


def damaged_copy_scenarios(command: str) -> dict:
    """One scenario per kind of damage of a copy at S3, for `command` (verify, restore or fetch)."""
    run = {"verify": lambda s, d: s.service.pgbeat("verify", s.damaged_copy_at_s3(d), timeout=120),
           "restore": lambda s, d: s.service.pgbeat("restore", s.damaged_copy_at_s3(d), "--into", f"{s.db}_r",
                                                    "--yes", timeout=120),
           "fetch": fetch_damaged}[command]
    return {f"{command} a copy at S3 with {damage}": lambda s, d=damage: run(s, d) for damage in REMOTE_DAMAGE}


def wal_fetch_damaged(s: Scene):
    """restore_command's real error: a damaged WAL file is 128, never 1 (which would end recovery)."""
    wal = s.service.base / "pg_wal" / "000000010000000000000001"
    wal.parent.mkdir()
    wal.write_bytes(b"wal" * 1000)
    pushed = s.service.pgbeat("wal-push", str(wal), "--target", "erp")
    assert pushed.returncode == 0, pushed.stderr
    [stored] = (s.service.backup_root / "wal" / "erp").rglob("000000010000000000000001-*")
    stored.write_bytes(b"damaged")
    return s.service.pgbeat("wal-fetch", "000000010000000000000001", str(s.service.base / "RECOVERYXLOG"),
                            "--target", "erp")


EXIT_SCENARIOS = {
    0: {"backup": lambda s: s.service.pgbeat("backup", "daily", timeout=120),
        "verify a good backup": lambda s: s.service.pgbeat("verify", str(s.backup), timeout=60),
        "verify a good copy at S3": lambda s: s.service.pgbeat("verify", s.copy_at_s3()[0], timeout=120),
        "fetch a good copy into new folders": fetch_good,
        "backup --local with the broker down": backup_local_with_the_broker_down},
    1: {"backup of a server that went away": backup_of_a_gone_server},
    2: {"a bad option value": lambda s: s.service.pgbeat("backup", "daily", "--timeout", "-5"),
        "restore into template1": lambda s: s.service.pgbeat("restore", "--latest", "--into", "template1", "--yes"),
        "restore not confirmed": lambda s: s.service.pgbeat("restore", str(s.backup), input="", timeout=60),
        "restore --latest of several targets without --target": latest_of_several_targets,
        "verify a file that is not there": lambda s: s.service.pgbeat("verify", f"{s.backup}.gone", timeout=60),
        "restore a file that is not there": lambda s: s.service.pgbeat("restore", f"{s.backup}.gone", "--yes"),
        "restore a copy that is not at S3": lambda s: s.service.pgbeat("restore", s.copy_at_s3()[0] + ".gone",
                                                                       "--yes", timeout=120),
        "fetch into a folder that holds its name": fetch_over_a_file,
        "verify a copy at a destination that is not configured": lambda s: s.service.pgbeat(
            "verify", f"s3://not-configured/daily/{s.backup.name}", timeout=60)},
    3: {"verify a damaged backup": verify_damaged, **damaged_copy_scenarios("verify"),
        **damaged_copy_scenarios("restore"), **damaged_copy_scenarios("fetch")},
    4: {"backup while another run holds the target lock": backup_locked,
        "restore while another restore holds the database's lock": restore_locked},
    5: {"config check of an unreachable target": unreachable_target,
        "backup with the broker down": broker_down,
        "backup with no live worker": backup_with_no_worker},
    EXIT_INTERRUPTED: {"Ctrl-C while backup waits for the lock": interrupted_while_waiting_for_the_lock},
    EXIT_FETCH_FAILED: {"wal-fetch of a damaged WAL file": wal_fetch_damaged},
}


def test_every_documented_exit_code_has_a_scenario():
    documented = documented_exit_codes()
    assert set(documented) == DOCUMENTED, documented
    assert set(EXIT_SCENARIOS) == set(documented), "give each documented exit code a scenario in EXIT_SCENARIOS"
    assert {errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_CONFIG, errors.EXIT_VERIFY, errors.EXIT_LOCKED,
            errors.EXIT_UNREACHABLE, errors.EXIT_INTERRUPTED, EXIT_FETCH_FAILED} == set(documented)


def test_every_error_class_exits_with_a_documented_code():
    """Each PgbeatError subclass anywhere in the core carries one of the README's exit codes."""
    import importlib
    import pkgutil

    import pgbeat

    for module in pkgutil.walk_packages(pgbeat.__path__, "pgbeat."):
        importlib.import_module(module.name)
    classes, pending = [], [errors.PgbeatError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending += cls.__subclasses__()
    assert len(classes) > 20
    documented = documented_exit_codes()
    assert {c.__name__: c.exit_code for c in classes if c.exit_code not in documented} == {}


@pytest.fixture
def scene(workdir, pg, small, request):
    service = Service(workdir, None, [pg.target("erp", small)], reliability={"retries": 0, "lock_wait": 0})
    made = service.pgbeat("backup", "daily", timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    [backup] = service.backups()
    scene = Scene(service, small, backup, pg, request)
    yield scene
    pg.dropdb(f"{small}_r")


@pytest.mark.parametrize(("code", "name"), [(code, name) for code, cases in EXIT_SCENARIOS.items() for name in cases])
def test_each_documented_exit_code_is_reached(scene, code, name):
    """The scenario ends with its documented code: one message, no traceback, nothing left behind."""
    result = EXIT_SCENARIOS[code][name](scene)
    output = result.stdout + result.stderr
    assert result.returncode == code, (name, output)
    assert "Traceback" not in output and "failed unexpectedly" not in output, output
    if code == EXIT_LOCKED:
        assert "Another" in output, output  # the message names what holds the lock
    if code == EXIT_INTERRUPTED:
        assert result.stderr.strip() == "pgbeat: interrupted", result.stderr
    if code not in (0, EXIT_INTERRUPTED):
        assert not list((scene.service.backup_root / ".work").glob("*")), "a failed command left work behind"

