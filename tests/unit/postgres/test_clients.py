"""The choice of client programs per server major (pgbeat.postgres.clients), from installations laid out
in tmp_path: each a bin folder whose tiny `pg_dump` (and psql, pg_restore) prints a version and counts
how often it was asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgbeat.errors import PgbeatError
from pgbeat.postgres import clients
from pgbeat.postgres.clients import archive_reader, choose_client, installed_clients, pinned_dir
from pgbeat.settings.load import load_settings
from tests.support import clear_pgbeat_env

PROGRAMS = ("pg_dump", "psql", "pg_restore")


def install(bin_dir: Path, version: str) -> Path:
    """Lay out a fake client of `version` in `bin_dir`; each `--version` call appends a line to asked.log."""
    bin_dir.mkdir(parents=True)
    for name in PROGRAMS:
        program = bin_dir / name
        program.write_text(f'#!/bin/sh\necho "$0" >> "{bin_dir}/asked.log"\necho "{name} (PostgreSQL) {version}"\n')
        program.chmod(0o755)
    return bin_dir


def asked(bin_dir: Path) -> int:
    log = bin_dir / "asked.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def roots(tmp_path):
    """A Debian-like and a RHEL-like root under tmp_path, as `pg_bin_dirs` templates."""
    return [str(tmp_path / "debian/{major}/bin"), str(tmp_path / "rhel/pgsql-{major}/bin")]


def test_the_servers_major_is_chosen_from_the_roots(tmp_path, roots):
    install(tmp_path / "debian/15/bin", "15.8")
    install(tmp_path / "debian/18/bin", "18.1")
    choice = choose_client(None, roots, 15, "the server of erp")
    assert (choice.client.major, choice.client.version, choice.note) == (15, "15.8", None)
    assert choice.program("pg_dump") == str(tmp_path / "debian/15/bin/pg_dump")
    assert choose_client(None, roots, 18, "x").client.bin_dir == tmp_path / "debian/18/bin"


def test_the_first_root_wins_for_one_major(tmp_path, roots):
    install(tmp_path / "rhel/pgsql-16/bin", "16.2")
    install(tmp_path / "debian/16/bin", "16.4")
    assert choose_client(None, roots, 16, "x").client.version == "16.4"


def test_without_the_same_major_the_newest_newer_client_is_chosen_with_a_note(tmp_path, roots):
    for major in (13, 16, 18):
        install(tmp_path / f"debian/{major}/bin", f"{major}.1")
    choice = choose_client(None, roots, 15, "the server of erp")
    assert choice.client.major == 18
    assert choice.note and "no PostgreSQL 15 client" in choice.note and "18.1" in choice.note


def test_only_older_clients_is_an_error_naming_the_majors_and_the_package(tmp_path, roots):
    install(tmp_path / "debian/15/bin", "15.8")
    install(tmp_path / "rhel/pgsql-13/bin", "13.2")
    with pytest.raises(PgbeatError) as exc:
        choose_client(None, roots, 18, "the server of erp (PostgreSQL 18)")
    assert "the server of erp (PostgreSQL 18)" in exc.value.message
    assert "majors found: 15" in exc.value.message and "13" in exc.value.message
    assert "postgresql-client-18" in exc.value.hint


def test_nothing_installed_says_none(tmp_path, roots):
    with pytest.raises(PgbeatError, match="majors found: none"):
        choose_client(None, roots, 15, "x")


def test_a_pinned_folder_is_used_when_new_enough_and_refused_when_older(tmp_path, roots):
    install(tmp_path / "debian/15/bin", "15.8")
    pinned = install(tmp_path / "opt/pg17", "17.3")
    choice = choose_client(pinned, roots, 15, "x")
    assert (choice.client.bin_dir, choice.note) == (pinned, None)  # the operator's choice: no note
    with pytest.raises(PgbeatError) as exc:
        choose_client(pinned, roots, 18, "the server of erp")
    assert "17.3" in exc.value.message and str(pinned) in exc.value.message and "refuses a newer server" in \
        exc.value.message
    assert "postgresql-client-18" in exc.value.hint
    with pytest.raises(PgbeatError, match="has no pg_dump"):
        choose_client(tmp_path / "empty", roots, 15, "x")


def test_plain_folders_pg_config_and_path_entries(tmp_path, monkeypatch):
    plain = install(tmp_path / "embedded/bin", "18.6")
    on_path = install(tmp_path / "path/bin", "16.1")
    monkeypatch.setenv("PATH", f"{on_path}:{os.environ['PATH']}")
    found = installed_clients([str(plain), "PATH", str(plain)])  # each folder once
    assert [(c.bin_dir, c.major) for c in found] == [(plain, 18), (on_path, 16)]
    config_bin = install(tmp_path / "config/bin", "14.9")
    pg_config = tmp_path / "config/pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {config_bin}\n")
    pg_config.chmod(0o755)
    monkeypatch.setenv("PATH", f"{pg_config.parent}:{os.environ['PATH']}")
    assert [c.major for c in installed_clients(["pg_config"])] == [14]


def test_a_template_matches_digits_only(tmp_path, roots):
    install(tmp_path / "debian/15/bin", "15.8")
    install(tmp_path / "debian/15-old/bin", "15.1")
    install(tmp_path / "debian/x/bin", "99.0")
    assert [c.version for c in installed_clients(roots)] == ["15.8"]


def test_each_program_is_asked_its_version_once_per_process(tmp_path, roots, monkeypatch):
    monkeypatch.setattr(clients, "_versions", {})
    bin_dir = install(tmp_path / "debian/15/bin", "15.8")
    for _ in range(3):
        choose_client(None, roots, 15, "x")
        installed_clients(roots)
    assert asked(bin_dir) == 1
    program = bin_dir / "pg_dump"
    program.write_text(program.read_text().replace("15.8", "15.9") + "\n")  # upgraded in place
    assert choose_client(None, roots, 15, "x").client.version == "15.9"
    assert asked(bin_dir) == 2


def test_an_archive_is_read_by_its_pg_dumps_major_or_newer(tmp_path, monkeypatch):
    for major in (15, 18):
        install(tmp_path / f"debian/{major}/bin", f"{major}.2")
    settings = load(tmp_path, monkeypatch, f"pg_bin_dirs: ['{tmp_path}/debian/{{major}}/bin']\n"
                                           "targets: [{name: a, dbname: a}]\n")
    assert archive_reader(settings, None, "15.4").client.major == 15
    assert archive_reader(settings, None, "16.1").client.major == 18
    assert archive_reader(settings, None, None).client.major == 18  # unrecorded: the newest reads all
    with pytest.raises(PgbeatError, match=r"pg_dump 19\.0"):
        archive_reader(settings, None, "19.0")


def load(tmp_path, monkeypatch, text: str):
    clear_pgbeat_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pgbeat.yaml").write_text(text)
    monkeypatch.setenv("PGBEAT_CONFIG", str(tmp_path / "pgbeat.yaml"))
    return load_settings(env_file=None)


def test_pg_bin_dir_per_target_in_defaults_and_globally(tmp_path, monkeypatch):
    settings = load(tmp_path, monkeypatch, "defaults: {pg_bin_dir: /opt/pg18/bin}\ntargets:\n  - {name: a, dbname: a}\n"
                                           "  - {name: b, dbname: b, pg_bin_dir: /opt/pg15/bin}\n")
    assert pinned_dir(settings, settings.target("a")) == Path("/opt/pg18/bin")
    assert pinned_dir(settings, settings.target("b")) == Path("/opt/pg15/bin")
    assert settings.pg_bin_dirs == list(clients.DEFAULT_PG_BIN_DIRS)

    monkeypatch.setenv("PGBEAT_PG_BIN_DIR", "/opt/global/bin")  # every target that sets none
    settings = load_settings(env_file=None)
    assert pinned_dir(settings, settings.target("b")) == Path("/opt/pg15/bin")
    (tmp_path / "pgbeat.yaml").write_text("targets: [{name: a, dbname: a}]\n")
    settings = load_settings(env_file=None)
    assert pinned_dir(settings, settings.target("a")) == Path("/opt/global/bin")
    assert pinned_dir(settings, None) == Path("/opt/global/bin")


def test_a_major_installed_after_a_discovery_is_found(tmp_path, roots):
    install(tmp_path / "debian/15/bin", "15.8")
    assert [c.major for c in installed_clients(roots)] == [15]
    install(tmp_path / "debian/18/bin", "18.1")  # the listed folder changed: listed again
    assert [c.major for c in installed_clients(roots)] == [18, 15]
