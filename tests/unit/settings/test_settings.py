"""Configuration: defaults, merging, and errors that name each bad key and its file."""

from __future__ import annotations

import pytest

from pgbeat.errors import ConfigError
from pgbeat.settings import load_settings
from tests.support import ROOT, clear_pgbeat_env


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    clear_pgbeat_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load(tmp_path, env_text: str | None = None, file_text: str | None = None, suffix: str = ".yaml", monkeypatch=None):
    if file_text is not None:
        path = tmp_path / f"targets{suffix}"
        path.write_text(file_text)
        monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    env_file = None
    if env_text is not None:
        env_file = tmp_path / ".env"
        env_file.write_text(env_text)
    return load_settings(env_file=env_file)


def errors_of(exc_info) -> list[str]:
    return exc_info.value.errors


def test_env_defines_one_target_with_the_seed_defaults(clean_env, monkeypatch):
    s = load(clean_env, "DB_HOST=db1\nDB_PORT=5433\nDB_NAME=erp\nDB_USER=bk\nDB_PASSWORD=pw\n", monkeypatch=monkeypatch)
    t = s.target("erp")
    assert (t.host, t.port, t.dbname, t.user, t.password.get_secret_value()) == ("db1", 5433, "erp", "bk", "pw")
    assert s.backup_root == (clean_env / "backups").resolve()
    assert s.embedded
    assert {tier: (p.schedule, p.keep_days, p.min_keep) for tier, p in t.tiers.items() if p.enabled} == {
        "daily": ("0 2 * * *", 7, 1), "weekly": ("0 3 * * 0", 30, 1), "monthly": ("0 4 1 * *", 365, 1)}
    assert t.enabled_tiers() == ["daily", "weekly", "monthly"]  # the physical base tier is opt-in
    assert (t.format, t.compression.codec, t.compression.level) == ("plain", "gzip", 6)
    assert "pw" not in repr(s) and "pw" not in t.conninfo()


def test_target_name_overrides_and_environment_beats_dotenv(clean_env, monkeypatch):
    monkeypatch.setenv("DB_PORT", "6543")
    s = load(clean_env, "DB_NAME=erp\nDB_PORT=5432\nTARGET_NAME=erp_db\n", monkeypatch=monkeypatch)
    assert list(s.targets) == ["erp_db"] and s.targets["erp_db"].port == 6543


def test_environment_names_in_any_case_empty_is_unset_and_others_are_ignored(clean_env, monkeypatch):
    """What pydantic-settings did (case_sensitive=False, env_ignore_empty=True), EnvSettings does itself."""
    monkeypatch.setenv("db_host", "db9")
    monkeypatch.setenv("DB_USER", "")  # empty: unset, .env's value stands
    monkeypatch.setenv("SOMETHING_ELSE", "x")
    s = load(clean_env, "Db_Name=erp\nDB_USER=bk\nDB_PASSWORD=\nDB_PORT\nNOT_OURS=1\n", monkeypatch=monkeypatch)
    t = s.target("erp")
    assert (t.host, t.user, t.password, t.port) == ("db9", "bk", None, 5432)


def test_a_blank_environment_value_is_an_error_naming_the_variable(clean_env, monkeypatch):
    monkeypatch.setenv("DB_HOST", "  ")
    with pytest.raises(ConfigError) as exc_info:
        load(clean_env, "DB_NAME=erp\n", monkeypatch=monkeypatch)
    assert any(line.startswith("DB_HOST in the environment: must not be empty or blank")
               for line in errors_of(exc_info))


def test_targets_file_defaults_and_overrides_merge(clean_env, monkeypatch):
    s = load(clean_env, file_text="""
timezone: America/Sao_Paulo
defaults:
  user: backup
  compression: {codec: zstd}
  tiers:
    daily: {keep_days: 14}
targets:
  - name: erp
    dbname: erp
    tiers:
      daily: {min_keep: 3}
      monthly: {enabled: false}
  - name: crm
    host: db2
    dbname: crm
    compression: {level: 9}
    format: directory
    jobs: 4
""", monkeypatch=monkeypatch)
    erp, crm = s.target("erp"), s.target("crm")
    assert erp.user == "backup" and erp.compression.codec == "zstd" and erp.compression.level == 3
    assert (erp.tiers["daily"].keep_days, erp.tiers["daily"].min_keep) == (14, 3)
    assert erp.enabled_tiers() == ["daily", "weekly"]
    assert crm.compression.level == 9 and crm.jobs == 4 and crm.tiers["daily"].keep_days == 14
    assert s.timezone == "America/Sao_Paulo"


def test_toml_targets_file(clean_env, monkeypatch):
    s = load(clean_env, file_text='[[targets]]\nname = "erp"\ndbname = "erp"\nport = 5544\n', suffix=".toml",
             monkeypatch=monkeypatch)
    assert s.target("erp").port == 5544


def test_every_error_is_listed_with_its_path_and_file(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(clean_env, "DB_NAME=erp\nDB_PORT=not-a-port\n", file_text="""
timezone: Mars/Olympus
targets:
  - name: ok
    dbname: ok
  - name: also ok
    dbname: x
  - name: erp2
    dbname: erp2
    port: 70000
    tiers:
      daily: {schedule: "61 2 * * *", keep_days: -1}
    compresion: {codec: gzip}
""", monkeypatch=monkeypatch)
    errors = errors_of(exc)
    path = str(clean_env / "targets.yaml")
    assert any(e.startswith("DB_PORT in ") and "valid integer" in e for e in errors), errors
    expected = ["At 'timezone'", "At 'targets[1].name'", "At 'targets[2].port'", "At 'targets[2].tiers.daily.schedule'",
                "At 'targets[2].tiers.daily.keep_days'", "At 'targets[2].compresion'"]
    for key in expected:
        assert any(key in e and e.startswith(path) for e in errors), (key, errors)
    assert len(errors) == len(expected) + 1


def test_cross_field_errors(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(clean_env, file_text="""
targets:
  - {name: a, dbname: a, jobs: 2}
  - {name: b, dbname: b, compression: {codec: zstd, level: 40}}
  - {name: a, dbname: c}
  - {name: d, dbname: d, pg_dump_options: ["--file=/tmp/x"]}
""", monkeypatch=monkeypatch)
    errors = "\n".join(errors_of(exc))
    assert "At 'targets[0].jobs'" in errors and "directory" in errors
    assert "At 'targets[1].compression.level'" in errors and "1-19" in errors
    assert "At 'targets[2].name'" in errors and "duplicate" in errors
    assert "At 'targets[3].pg_dump_options'" in errors


def test_unsafe_target_names_are_rejected(clean_env, monkeypatch):
    for name in ("../etc", "a/b", "with space", "x;rm -rf", "$(id)", "a..b", "ção", "-x"):
        with pytest.raises(ConfigError) as exc:
            load(clean_env, f"DB_NAME=erp\nTARGET_NAME='{name}'\n", monkeypatch=monkeypatch)
        assert errors_of(exc)[0].startswith("TARGET_NAME in ") or "DB_NAME" in errors_of(exc)[0]


def test_db_name_that_is_not_a_safe_target_name_asks_for_target_name(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(clean_env, "DB_NAME='erp prod'\n", monkeypatch=monkeypatch)
    assert "set TARGET_NAME" in errors_of(exc)[0]
    s = load(clean_env, "DB_NAME='erp prod'\nTARGET_NAME=erp_prod\n", monkeypatch=monkeypatch)
    assert s.target("erp_prod").dbname == "erp prod"


def test_secrets_are_never_echoed_in_errors(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(clean_env, file_text="""
targets:
  - name: erp
    dbname: erp
    pasword: hunter2-secret
    password: [not, a, string, hunter3-secret]
""", monkeypatch=monkeypatch)
    text = exc.value.render()
    assert "hunter2-secret" not in text and "hunter3-secret" not in text
    assert "At 'targets[0].pasword'" in text and "At 'targets[0].password'" in text


def test_invalid_yaml_names_the_line(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(clean_env, file_text="targets:\n  - name: erp\n   dbname: [\n", monkeypatch=monkeypatch)
    assert "line" in errors_of(exc)[0] and "targets.yaml" in errors_of(exc)[0]


def test_visibility_timeout_must_cover_countdowns_and_warns_about_long_steps(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(clean_env, file_text="reliability: {visibility_timeout: 100, lock_ttl: 60}\n", monkeypatch=monkeypatch)
    assert "At 'reliability'" in errors_of(exc)[0] and "visibility_timeout" in errors_of(exc)[0]
    s = load(clean_env, file_text="reliability: {visibility_timeout: 3600, time_limits: {dump: 7200}}\n",
             monkeypatch=monkeypatch)
    assert "delivered again" in s.reliability.redelivery_warning()
    assert load(clean_env, file_text="", monkeypatch=monkeypatch).reliability.redelivery_warning() is None


def test_shipped_example_config_is_valid(clean_env, monkeypatch):

    example = ROOT / "deploy" / "pgbeat.example.yaml"
    monkeypatch.setenv("PGBEAT_CONFIG", str(example))
    s = load_settings(env_file=None)
    assert sorted(s.targets) == ["crm", "erp_db"]
    assert s.target("crm").enabled_tiers() == ["daily", "weekly"]


# A file value and an environment value of each global that the environment can set (ENV_GLOBALS).
GLOBAL_VALUES = {"backup_root": ("/srv/file-root", "/srv/env-root"), "timezone": ("UTC", "America/Sao_Paulo"),
                 "broker_url": ("redis://file:6379/0", "redis://env:6379/0"),
                 "result_backend": ("redis://file:6379/1", "redis://env:6379/1"),
                 "node": ("file-node", "env-node"), "pg_bin_dir": ("/opt/file/bin", "/opt/env/bin")}


def test_the_environment_wins_over_the_file_for_every_global(clean_env, monkeypatch):
    from pathlib import Path

    import yaml
    from pydantic import SecretStr

    from pgbeat.settings.load import ENV_GLOBALS

    assert set(ENV_GLOBALS.values()) == set(GLOBAL_VALUES)
    file_text = yaml.safe_dump({key: file for key, (file, _env) in GLOBAL_VALUES.items()})

    def value(settings, key):
        found = getattr(settings, key)
        return found.get_secret_value() if isinstance(found, SecretStr) else str(found)

    only_file = load(clean_env, file_text=file_text, monkeypatch=monkeypatch)
    assert {key: value(only_file, key) for key in GLOBAL_VALUES} == {k: f for k, (f, _e) in GLOBAL_VALUES.items()}
    for var, key in ENV_GLOBALS.items():
        monkeypatch.setenv(var.upper(), GLOBAL_VALUES[key][1])
    both = load(clean_env, file_text=file_text, monkeypatch=monkeypatch)
    assert {key: value(both, key) for key in GLOBAL_VALUES} == {k: e for k, (_f, e) in GLOBAL_VALUES.items()}
    assert both.backup_root == Path("/srv/env-root")


def test_a_bad_file_value_that_the_environment_replaces_is_not_an_error_but_a_bad_env_value_is(clean_env, monkeypatch):
    monkeypatch.setenv("PGBEAT_TIMEZONE", "UTC")
    settings = load(clean_env, file_text="timezone: Mars/Olympus\n", monkeypatch=monkeypatch)
    assert settings.timezone == "UTC"
    monkeypatch.setenv("PGBEAT_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError) as failure:
        load(clean_env, file_text="timezone: UTC\n", monkeypatch=monkeypatch)
    assert any("PGBEAT_TIMEZONE" in line and "Mars/Olympus" in line for line in errors_of(failure)), errors_of(failure)
