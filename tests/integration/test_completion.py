"""Shell completion (click's, as the README documents it): every option and argument that names a target,
a destination or a tier completes to the configured names, walked from the command tree, in real `pgbeat`
processes as bash asks them; with a broken configuration it completes nothing and prints no error."""

from __future__ import annotations

import subprocess

import click
import pytest

from pgbeat.cli import main
from pgbeat.clitypes import DestinationName, TargetName, TierName
from pgbeat.settings import TIERS
from tests.support import VENV_BIN, Service, command_tree

pytestmark = pytest.mark.integration

TARGETS = ["erp", "erp-2", "crm"]
DESTINATIONS = ["vault"]
HOURLY = {"schedule": "0 * * * *", "keep_days": 2}  # a tier of crm's own: completed too


def completed_params():
    """(words before the value, what it must complete to) for every parameter naming a target,
    a destination or a tier."""
    for path, command in command_tree(main):
        for param in command.params:
            if isinstance(param.type, TargetName):
                expected = sorted(TARGETS)
            elif isinstance(param.type, DestinationName):
                expected = DESTINATIONS
            elif isinstance(param.type, TierName):
                expected = sorted([*TIERS, "hourly"])
            else:
                continue
            if isinstance(param, click.Option):
                yield pytest.param((*path, param.opts[-1]), expected, id=" ".join((*path, param.opts[-1])))
            elif not [p for p in command.params if isinstance(p, click.Argument)].index(param):
                yield pytest.param(path, expected, id=" ".join((*path, param.name.upper())))


def complete(service: Service, words: tuple[str, ...], **env: str) -> subprocess.CompletedProcess:
    line = " ".join(("pgbeat", *words, ""))
    return subprocess.run([str(VENV_BIN / "pgbeat")], cwd=service.cwd, capture_output=True, text=True, timeout=60,
                          env=service.env(_PGBEAT_COMPLETE="bash_complete", COMP_WORDS=line,
                                          COMP_CWORD=str(len(words) + 1), **env))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    base = tmp_path_factory.mktemp("completion")
    vault = {"name": "vault", "kind": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9"}
    return Service(base, None, [{"name": name, "dbname": "db", "destinations": [vault] if name == "erp" else [],
                                 **({"tiers": {"hourly": HOURLY}} if name == "crm" else {})} for name in TARGETS])


@pytest.mark.parametrize(("words", "expected"), list(completed_params()))
def test_names_complete_to_the_configured_ones(service, words, expected):
    done = complete(service, words)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split() == [f"plain,{name}" for name in expected]


def test_completion_narrows_and_says_nothing_when_the_config_is_broken(service, tmp_path):
    done = subprocess.run([str(VENV_BIN / "pgbeat")], cwd=service.cwd, capture_output=True, text=True, timeout=60,
                          env=service.env(_PGBEAT_COMPLETE="bash_complete", COMP_WORDS="pgbeat list --target er",
                                          COMP_CWORD="3"))
    assert done.stdout.split() == ["plain,erp", "plain,erp-2"], done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("targets: [\n")
    done = complete(service, ("list", "--target"), PGBEAT_CONFIG=str(broken))
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr == ""


def test_the_completion_script_is_what_the_readme_says(service):
    done = subprocess.run([str(VENV_BIN / "pgbeat")], cwd=service.cwd, capture_output=True, text=True, timeout=60,
                          env=service.env(_PGBEAT_COMPLETE="bash_source"))
    assert done.returncode == 0 and "complete -o nosort -F _pgbeat_completion pgbeat" in done.stdout
