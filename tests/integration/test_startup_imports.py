"""What a `pgbeat` process imports: the start-up cost every command pays before it does anything.

`--help` of every command and subcommand (walked from the click group, so a new command is covered by
itself) imports no SDK of a backend, no Celery or Redis, no rich, no pydantic: only click and pgbeat's own
light modules. `wal-push`, which PostgreSQL runs once per WAL file, reads the settings (pydantic) but
imports no Celery, Redis, rich, Apprise nor an SDK its configuration does not need, with a broker
configured too.

Each case runs the installed `pgbeat` console script in a real process with PYTHONPROFILEIMPORTTIME (what
`python -X importtime` prints, one line per module imported); the timings themselves are bench's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pgbeat.cli import main
from tests.support import VENV_BIN, command_tree

pytestmark = pytest.mark.integration

BACKENDS = ("boto3", "botocore", "google", "paramiko", "apprise")
SERVICE = ("celery", "kombu", "redis")
NOT_FOR_HELP = (*BACKENDS, *SERVICE, "rich", "pydantic_settings", "pydantic")
NOT_FOR_WAL_PUSH = (*BACKENDS, *SERVICE, "rich")
SEGMENT = "000000010000000000000003"


COMMANDS = [path for path, _command in command_tree(main)]  # groups too: `pgbeat cron --help`


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without pgbeat's variables (nothing configured unless `extra` says so)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "CELERY_", "PGBEAT_", "AWS_"))}
    env.pop("BACKUP_ROOT", None)
    return {**env, **extra}


def imported(*args: str, cwd: Path, full: bool = False, **env: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `pgbeat ARGS`; return the process and the top-level names of the modules it imported (`full`:
    their whole names)."""
    done = subprocess.run([str(VENV_BIN / "pgbeat"), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHONPROFILEIMPORTTIME="1", **env))
    modules = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            own, _, name = line.removeprefix("import time:").split("|")
            if own.strip().isdigit():  # not the heading line
                modules.add(name.strip() if full else name.strip().split(".")[0])
    return done, modules


def test_every_command_is_walked():
    assert {(), ("backup",), ("wal-push",), ("cron",), ("cron", "install"), ("config", "example")} <= set(COMMANDS)
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "pgbeat")
def test_help_imports_no_backend_celery_rich_nor_pydantic(path, workdir):
    done, modules = imported(*path, "--help", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: pgbeat" in done.stdout
    assert "click" in modules  # the modules are seen at all
    assert sorted(modules & set(NOT_FOR_HELP)) == []


def test_help_after_arguments_imports_no_more(workdir):
    """--help wins over the arguments before it: nothing is loaded for them."""
    done, modules = imported("backup", "daily", "--local", "--help", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Back up TIER" in done.stdout
    assert sorted(modules & set(NOT_FOR_HELP)) == []


def test_the_check_sees_what_a_command_imports(workdir):
    """A command that renders the settings' schema does import pydantic, and the check sees it."""
    done, modules = imported("config", "example", cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pydantic" in modules


@pytest.mark.parametrize("broker", [None, "redis://127.0.0.1:1/0"], ids=["embedded", "with a broker"])
def test_wal_push_imports_no_celery_redis_rich_nor_an_unused_sdk(broker, workdir):
    """A target without destinations or notifications: the push needs none of them, broker or not (the
    broker's address is never contacted: nothing listens on port 1)."""
    config = workdir / "pgbeat.yaml"
    config.write_text(yaml.safe_dump({
        "backup_root": str(workdir / "backups"), "timezone": "UTC", "node": "walhost",
        "targets": [{"name": "wal", "dbname": "postgres", "host": "127.0.0.1", "port": 5432, "user": "postgres",
                     "compression": {"codec": "zstd"}}]}))
    segment = workdir / "pg_wal" / SEGMENT
    segment.parent.mkdir()
    segment.write_bytes((SEGMENT.encode() + os.urandom(4096)) * 256)
    env = {"PGBEAT_CONFIG": str(config), **({"CELERY_BROKER_URL": broker} if broker else {})}
    done, modules = imported("wal-push", str(segment), "--target", "wal", cwd=workdir, full=True, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pydantic" in modules  # it did read the settings
    assert sorted(m for m in modules if m.split(".")[0] in NOT_FOR_WAL_PUSH) == []
    # Nor the pipeline's records and the catalog's models: the codecs it shares with the steps need neither.
    assert not modules & {"pgbeat.pipeline.record", "pgbeat.catalog.manifest"}
    assert [p for p in (workdir / "backups" / "wal" / "wal").rglob(f"{SEGMENT}-*") if not p.name.startswith(".")]
