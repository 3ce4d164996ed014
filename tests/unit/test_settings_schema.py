"""The one schema: raw layers merged before validation, each error reported once where it is written,
destinations told apart by kind with only their own keys."""

from __future__ import annotations

import os

import pytest

from pgbeat.errors import ConfigError
from pgbeat.settings import GCSDestination, S3Destination, SSHDestination, load_settings, merge_target


@pytest.fixture
def load(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("DB_", "CELERY_", "PGBEAT_", "TARGET_NAME", "BACKUP_ROOT")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)

    def load_text(text: str, env_text: str | None = None):
        path = tmp_path / "pgbeat.yaml"
        path.write_text(text)
        monkeypatch.setenv("PGBEAT_CONFIG", str(path))
        env_file = None
        if env_text is not None:
            env_file = tmp_path / ".env"
            env_file.write_text(env_text)
        return load_settings(env_file=env_file)

    return load_text


def errors(load, text: str, env_text: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(text, env_text)
    return exc.value.errors


SSH = "{name: vault, kind: ssh, host: h, user: u, path: /p"


@pytest.mark.parametrize(("destination", "key", "says"), [
    (SSH + ", bucket: b}", "bucket", "not a key of a destination of kind 'ssh'"),
    ("{name: offsite, kind: s3, bucket: b, key_file: /k}", "key_file", "not a key of a destination of kind 's3'"),
    ("{name: offsite, kind: gcs, bucket: b, part_size: 6000000}", "part_size", "kind 'gcs'"),
    ("{name: offsite, kind: s3}", "bucket", "Field required"),
    ("{name: vault, kind: ssh, host: h, user: u}", "path", "Field required"),
])
def test_a_destination_accepts_only_the_keys_of_its_kind(load, destination, key, says):
    lines = errors(load, f"targets:\n  - {{name: a, dbname: a, destinations: [{destination}]}}\n")
    assert len(lines) == 1 and f"At 'targets[0].destinations[0].{key}'" in lines[0] and says in lines[0], lines


@pytest.mark.parametrize("kind", ["ftp", None])
def test_a_destination_without_a_known_kind_names_the_kinds(load, kind):
    spelled = "" if kind is None else f", kind: {kind}"
    [line] = errors(load, f"targets:\n  - {{name: a, dbname: a, destinations: [{{name: x, bucket: b{spelled}}}]}}\n")
    assert "At 'targets[0].destinations[0]'" in line and "s3, gcs, ssh" in line


def test_each_kind_is_its_own_model(load):
    settings = load("targets:\n  - name: a\n    dbname: a\n    destinations:\n"
                    f"      - {SSH}}}\n      - {{name: s, kind: s3, bucket: b, part_size: 5242880}}\n"
                    "      - {name: g, kind: gcs, bucket: b, enabled: false}\n")
    ssh, s3 = settings.target("a").destinations  # a disabled destination is not there for the rest of pgbeat
    assert isinstance(ssh, SSHDestination) and isinstance(s3, S3Destination)
    assert s3.part_size == 5242880 and not hasattr(ssh, "bucket") and "key_file" not in GCSDestination.model_fields
    assert set(SSHDestination.model_fields) & {"bucket", "prefix", "endpoint_url"} == set()


def test_an_error_in_defaults_is_reported_once_at_defaults(load):
    lines = errors(load, "defaults:\n  port: 70000\n  tiers: {daily: {keep_days: -1}}\n"
                         "targets:\n  - {name: a, dbname: a}\n  - {name: b, dbname: b, tiers: {daily: {min_keep: 2}}}\n"
                         "  - {name: c, dbname: c, port: 99999}\n", "DB_NAME=erp\n")
    assert sorted(line.split(": At ")[1].split("'")[1] for line in lines) == [
        "defaults.port", "defaults.tiers.daily.keep_days", "targets[2].port"], lines


def test_a_target_overrides_defaults_key_by_key_and_null_is_unset(load):
    settings = load("defaults:\n  port: 6000\n  user: backup\n  drill: {host: drill, statement_timeout: 9}\n"
                    "  tiers: {daily: {keep_days: 9, min_keep: 2}}\n  notify: [{url: 'json://127.0.0.1:1/'}]\n"
                    "targets:\n  - name: a\n    dbname: a\n    port: ~\n    drill: {port: 7000}\n"
                    "    tiers: {daily: {keep_days: 3}, weekly: {min_keep: 4}}\n    notify: []\n")
    a = settings.target("a")
    assert (a.port, a.user, a.notify) == (6000, "backup", [])
    assert (a.drill.host, a.drill.port, a.drill.statement_timeout) == ("drill", 7000, 9)
    assert a.drill.server == {"host": "drill", "port": 7000}
    assert (a.tiers["daily"].keep_days, a.tiers["daily"].min_keep, a.tiers["daily"].schedule) == (3, 2, "0 2 * * *")
    assert (a.tiers["weekly"].min_keep, a.tiers["weekly"].keep_days) == (4, 30)


def test_merge_target_tells_which_keys_came_from_defaults():
    merged, inherited = merge_target({"port": 1, "tiers": {"daily": {"keep_days": 2, "min_keep": 3}}, "user": "u"},
                                     {"name": "a", "user": "v", "tiers": {"daily": {"keep_days": 4}}})
    assert merged == {"port": 1, "user": "v", "name": "a", "tiers": {"daily": {"keep_days": 4, "min_keep": 3}}}
    assert inherited == {("port",), ("tiers", "daily", "min_keep")}
