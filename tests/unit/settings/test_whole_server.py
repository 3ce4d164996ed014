"""Whole-server targets (`databases: all`): their validation, and the names their databases get."""

from __future__ import annotations

import pytest

from pgbeat.errors import ConfigError, UnknownTargetError
from pgbeat.settings.servers import database_part, derived_name, part_database, split_derived
from tests.support import clear_pgbeat_env
from tests.unit.settings.test_settings import load


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    clear_pgbeat_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return tmp_path


HOSTILE = ['we"ird db', "it's", "a.b", "café", "x-lead", "-dash", "tab\there", "new\nline", "日本", "a" * 60,
           "UPPER_lower-1", "x", "X-upper"]


@pytest.mark.parametrize("dbname", HOSTILE)
def test_every_database_name_maps_to_one_safe_part_and_back(dbname):
    part = database_part(dbname)
    assert part_database(part) == dbname
    assert "." not in part and part[0].isalnum()
    assert split_derived(f"prod.{part}") == ("prod", dbname)


def test_plain_names_are_their_own_part_and_the_others_are_encoded():
    assert database_part("erp") == "erp" and database_part("erp_2-x") == "erp_2-x"
    assert database_part("a.b").startswith("x-") and database_part("x-lead").startswith("x-")
    assert len({database_part(name) for name in HOSTILE}) == len(HOSTILE)
    # Spellings no database maps to name none: uppercase base32, a plain name with a leading x-.
    assert part_database("x-" + database_part("a.b")[2:].upper()) is None and part_database("x-lead") is None
    assert part_database("X-MEXGE") == "X-MEXGE"  # `x-` is the marker, `X-` is a plain name
    assert part_database("x-") is None and part_database("a.b") is None and split_derived("erp") is None


def test_a_derived_name_longer_than_a_target_name_is_refused_with_the_reason():
    assert derived_name("prod", "a" * 58) == "prod." + "a" * 58
    with pytest.raises(ValueError, match="at most 63"):
        derived_name("prod", "a" * 59)


SERVER = "targets:\n  - {name: prod, databases: all, host: db1, exclude: [postgres], include: ['app_*']}\n"


def test_a_whole_server_target_is_a_template_its_databases_resolve_by_name(clean_env, monkeypatch):
    s = load(clean_env, file_text=SERVER + "  - {name: erp, dbname: erp}\n", monkeypatch=monkeypatch)
    assert sorted(s.targets) == ["erp"] and sorted(s.servers) == ["prod"]
    one = s.target("prod.app_one")
    assert (one.name, one.dbname, one.host, one.server_target, one.databases) == ("prod.app_one", "app_one", "db1",
                                                                                  "prod", None)
    odd = s.target(f"prod.{database_part('my db')}")
    assert odd.dbname == "my db" and "'my db'" in odd.conninfo()
    assert s.owns("prod.gone_long_ago") and not s.owns("other.erp") and s.resolve("prod") is None
    assert s.retention_of("prod.gone_long_ago", "daily") == s.servers["prod"].tiers["daily"]
    server = s.servers["prod"]
    assert server.selects("app_x") and not server.selects("postgres") and not server.selects("crm")
    with pytest.raises(UnknownTargetError) as caught:
        s.target("prod")
    assert "prod.<database>" in caught.value.hint


@pytest.mark.parametrize("text, expected", [
    ("  - {name: p, databases: all, dbname: erp}\n", "At 'targets[0].dbname': dbname and databases: all exclude"),
    ("  - {name: p}\n", "At 'targets[0].dbname': missing: name the target's database, or back up every"),
    ("  - {name: p, dbname: erp, exclude: ['x*']}\n", "At 'targets[0].exclude': only with databases: all"),
    ("  - {name: p, dbname: erp, include: ['x*']}\n", "At 'targets[0].include': only with databases: all"),
    ("  - {name: p, databases: some}\n", "At 'targets[0].databases': Input should be 'all'"),
    ("  - {name: p, databases: all, include: ['']}\n", "At 'targets[0].include[0]': must not be empty"),
    ("  - {name: p, databases: all, tiers: {base: {enabled: true}}}\n", "At 'targets[0].tiers.base': a whole-server"),
    ("  - {name: p, databases: all, wal: {receiver: true}}\n", "At 'targets[0].wal.receiver': the WAL is"),
    ("  - {name: p, databases: all}\n  - {name: p.erp, dbname: erp}\n",
     "At 'targets[1].name': 'p.erp' is in the names of whole-server target 'p'"),
])
def test_validation_errors_name_the_key(clean_env, monkeypatch, text, expected):
    with pytest.raises(ConfigError) as caught:
        load(clean_env, file_text="targets:\n" + text, monkeypatch=monkeypatch)
    assert any(expected in line for line in caught.value.errors), caught.value.errors


def test_defaults_cannot_make_every_target_whole_server(clean_env, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        load(clean_env, file_text="defaults: {databases: all}\ntargets: [{name: p, dbname: erp}]\n",
             monkeypatch=monkeypatch)
    assert any("defaults.databases" in line for line in caught.value.errors), caught.value.errors


def test_beat_sends_a_whole_server_target_s_name_once_per_tier_and_drill(clean_env, monkeypatch):
    from beat_schedule import build_beat_schedule

    s = load(clean_env, file_text=SERVER, monkeypatch=monkeypatch)
    schedule = build_beat_schedule(s)
    backups = {key: entry["args"] for key, entry in schedule.items() if entry["task"] == "tasks.backup"}
    assert backups == {f"backup prod {tier}": ("prod", tier) for tier in ("daily", "weekly", "monthly")}
    assert schedule["drill prod"]["args"] == ("prod",) and "drill prod pitr" not in schedule
    assert "reconcile runs" in schedule
