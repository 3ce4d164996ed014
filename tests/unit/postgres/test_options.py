"""pg_dump_options: generated from the option table, every option in every spelling getopt_long accepts;
and the reading itself checked against the real pg_dump installed here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbeat.errors import ConfigError
from pgbeat.postgres.options import (
    PG_DUMP_OPTIONS,
    Arg,
    PgDumpOption,
    PgDumpOptionsError,
    check_pg_dump_options,
    options_for,
    parse,
)
from pgbeat.settings import load_settings
from tests.support import clear_pgbeat_env

VERSIONS = range(13, 19)
VALUE = "erp.invoice*"
# An allowed short option without an argument, to cluster the others with.
PARTNER = next(o for o in PG_DUMP_OPTIONS if o.allowed and o.short and o.arg is Arg.NONE)


def all_names(table=PG_DUMP_OPTIONS) -> list[tuple[str, PgDumpOption]]:
    return [(name, option) for option in table for name in option.names]


def shortest_unique_prefix(name: str, option: PgDumpOption) -> str | None:
    """The shortest prefix of `name` that no other option's name starts with (and that is no other
    option's exact name), found by trying every length; None when only the full name is unique."""
    for length in range(1, len(name)):
        prefix = name[:length]
        owners = {o.canonical for n, o in all_names() if n.startswith(prefix)}
        if owners == {option.canonical}:
            return prefix
    return None


def spellings(option: PgDumpOption) -> list[tuple[str, list[str], list[str]]]:
    """(label, argv elements, expected canonical argv) for every way getopt_long reads `option`."""
    value = [VALUE] if option.arg is Arg.REQUIRED else []
    canonical = [f"--{option.canonical}" + (f"={VALUE}" if value else "")]
    cases = []
    for name in option.names:
        prefix = shortest_unique_prefix(name, option)
        for label, written in (("full", name), ("shortest prefix", prefix)):
            if written is None:
                continue
            if value:
                cases.append((f"{label} =value", [f"--{written}={VALUE}"], canonical))
                cases.append((f"{label} separate value", [f"--{written}", VALUE], canonical))
            else:
                cases.append((label, [f"--{written}"], canonical))
    if option.short:
        partner = [f"--{PARTNER.canonical}"]
        if value:
            cases.append(("short, separate value", [f"-{option.short}", VALUE], canonical))
            cases.append(("short, attached value", [f"-{option.short}{VALUE}"], canonical))
            cases.append(("short clustered, attached value", [f"-{PARTNER.short}{option.short}{VALUE}"],
                          partner + canonical))
            cases.append(("short clustered, separate value", [f"-{PARTNER.short}{option.short}", VALUE],
                          partner + canonical))
        else:
            cases.append(("short", [f"-{option.short}"], canonical))
            if option is not PARTNER:
                cases.append(("short clustered after", [f"-{PARTNER.short}{option.short}"], partner + canonical))
                cases.append(("short clustered before", [f"-{option.short}{PARTNER.short}"], canonical + partner))
    return cases


CASES = [(option, *case) for option in PG_DUMP_OPTIONS for case in spellings(option)]


@pytest.mark.parametrize(("option", "label", "argv", "expected"), CASES,
                         ids=[f"{o.canonical}:{label}" for o, label, _, _ in CASES])
def test_every_option_in_every_spelling(option, label, argv, expected):
    if option.allowed:
        assert check_pg_dump_options(argv) == expected
    else:
        with pytest.raises(PgDumpOptionsError) as exc:
            check_pg_dump_options(argv)
        message = str(exc.value)
        assert f"--{option.canonical}" in message and "refused" in message and option.refused in message


def test_the_table_is_one_definition():
    names = [name for name, _ in all_names()]
    shorts = [o.short for o in PG_DUMP_OPTIONS if o.short]
    assert len(names) == len(set(names)) and len(shorts) == len(set(shorts))
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", name) for name in names)
    # what the issue names is refused; what the task lists is allowed
    refused = {"clean", "create", "if-exists", "data-only", "schema-only", "section", "inserts", "column-inserts",
               "rows-per-insert", "filter", "file", "dbname", "host", "port", "username", "format", "jobs",
               "compress", "snapshot", "role"}
    allowed = {"schema", "exclude-schema", "table", "exclude-table", "exclude-table-data", "no-owner",
               "no-privileges", "no-comments", "no-publications", "no-subscriptions", "no-security-labels",
               "no-tablespaces", "no-toast-compression", "no-unlogged-table-data", "lock-wait-timeout", "extension",
               "exclude-extension", "quote-all-identifiers", "serializable-deferrable", "enable-row-security",
               "strict-names", "load-via-partition-root", "blobs", "no-blobs"}
    by_name = {o.canonical: o for o in PG_DUMP_OPTIONS}
    assert all(not by_name[n].allowed for n in refused) and all(by_name[n].allowed for n in allowed)


@pytest.mark.parametrize("major", VERSIONS)
def test_canonical_spellings_mean_the_same_to_every_pg_dump(major):
    """pgbeat hands allowed options over by their canonical names. A pg_dump that has the option reads
    the name exactly; one that lacks it must not read it as an abbreviation of something else."""
    names_here = [name for name, _ in all_names(options_for(major))]
    for option in PG_DUMP_OPTIONS:
        if not option.allowed:
            continue
        if option.in_version(major):
            assert option.canonical in names_here, (major, option.canonical)
        else:
            assert not [n for n in names_here if n.startswith(option.canonical)], (major, option.canonical)


def test_prefixes_shared_by_two_options_are_refused_as_ambiguous():
    ambiguous = set()
    for name, _option in all_names():
        for length in range(1, len(name)):
            prefix = name[:length]
            owners = {o.canonical for n, o in all_names() if n.startswith(prefix)}
            exact = any(n == prefix for n, _ in all_names())
            if len(owners) > 1 and not exact:
                ambiguous.add(prefix)
    assert {"fil", "no-p", "exclude-table-d", "s"} <= ambiguous
    for prefix in sorted(ambiguous):
        with pytest.raises(PgDumpOptionsError, match="ambiguous"):
            check_pg_dump_options([f"--{prefix}"])


@pytest.mark.parametrize(("argv", "expected"), [
    (["--clean", "--create"], ["--clean", "--create"]),
    (["--fil=/tmp/x"], ["ambiguous", "--file"]),
    (["--dbn=postgres"], ["--dbname"]),
    (["-cC"], ["--clean", "--create"]),
    (["mydb"], ["'mydb'", "database"]),
    (["--no-owner", "other_db"], ["'other_db'"]),
    (["other_db", "--no-owner"], ["'other_db'"]),  # getopt moves non-options to the end: still the dbname
    (["--", "--no-owner"], ["'--'"]),
    (["-"], ["'-'"]),
    ([""], ["''"]),
    (["--table"], ["needs a value"]),
    (["-t"], ["needs a value"]),
    (["--no-owner=yes"], ["takes no value"]),
    (["--table="], ["empty value"]),
    (["-t", "  "], ["empty value"]),
    (["--no-such-option"], ["not a pg_dump option"]),
    (["-q"], ["not a pg_dump option"]),
    (["--table=a\x00b"], ["NUL"]),
    (["-xf/tmp/x"], ["--file"]),  # a cluster may end in an option that takes the rest as its value
    (["-ZF"], ["--compress"]),
    (["--no-owner --clean"], ["not a pg_dump option"]),  # one element, one (unknown) long option
])
def test_refused_lists_name_every_problem(argv, expected):
    with pytest.raises(PgDumpOptionsError) as exc:
        check_pg_dump_options(argv)
    for part in expected:
        assert part in str(exc.value), (part, str(exc.value))


def test_values_are_taken_the_way_getopt_takes_them():
    # a required argument takes the next element whatever it looks like: it is a pattern, not an option
    assert check_pg_dump_options(["--table", "--file=/tmp/x"]) == ["--table=--file=/tmp/x"]
    assert check_pg_dump_options(["-t", "-f"]) == ["--table=-f"]
    assert check_pg_dump_options(["-xOtpublic.*", "--no-ow", "--lock-w", "5s"]) == [
        "--no-privileges", "--no-owner", "--table=public.*", "--no-owner", "--lock-wait-timeout=5s"]
    assert check_pg_dump_options([]) == []


def test_every_problem_of_a_list_is_reported_at_once():
    with pytest.raises(PgDumpOptionsError) as exc:
        check_pg_dump_options(["--fil=x", "mydb", "-c", "--no-owner", "--inserts"])
    assert len(exc.value.problems) == 4


# --- the configuration ---------------------------------------------------------------------------------


def load(tmp_path, monkeypatch, text: str):
    clear_pgbeat_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pgbeat.yaml"
    path.write_text(text)
    monkeypatch.setenv("PGBEAT_CONFIG", str(path))
    return load_settings(env_file=None)


def test_the_target_gets_the_canonical_spelling(tmp_path, monkeypatch):
    settings = load(tmp_path, monkeypatch, "defaults: {pg_dump_options: [-O]}\ntargets:\n"
                                           "  - {name: a, dbname: a, pg_dump_options: [-xT, audit, --no-comm]}\n"
                                           "  - {name: b, dbname: b}\n")
    assert settings.target("a").pg_dump_options == ["--no-privileges", "--exclude-table=audit", "--no-comments"]
    assert settings.target("b").pg_dump_options == ["--no-owner"]
    from pgbeat.steps.dump import dump_argv

    argv = dump_argv("pg_dump", settings.target("a"), None)
    assert argv[-3:] == ["--no-privileges", "--exclude-table=audit", "--no-comments"]


def test_a_refused_option_is_a_config_error_naming_key_and_option(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, monkeypatch, "defaults: {pg_dump_options: [--create]}\ntargets:\n"
                                    "  - {name: a, dbname: a, pg_dump_options: [--no-owner, --dbn=postgres]}\n")
    lines = exc.value.errors
    assert len(lines) == 2
    [target_line] = [line for line in lines if "At 'targets[0].pg_dump_options'" in line]
    assert "'--dbn=postgres' (that is --dbname) is refused" in target_line
    assert str(tmp_path / "pgbeat.yaml") in target_line
    [defaults_line] = [line for line in lines if "At 'defaults.pg_dump_options'" in line]
    assert "'--create' is refused" in defaults_line


# --- against the real pg_dump ------------------------------------------------------------------------

GETOPT_COMPLAINTS = ("unrecognized option", "invalid option", "is ambiguous", "requires an argument",
                     "doesn't allow an argument", "too many command-line arguments")
PG_BIN = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())


def installed_major() -> int:
    out = subprocess.run([str(PG_BIN / "pg_dump"), "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"(\d+)", out).group(1))


def pg_dump_accepts(argv: list[str], workdir: Path) -> bool:
    """Whether the installed pg_dump's getopt_long accepts `argv` after pgbeat's own --dbname (it then
    fails to connect to a server that does not exist, or on a value it checks, but not on the options)."""
    # Every way to a server leads nowhere: an empty --dbname= in argv falls back to these variables.
    nowhere = {"PGHOST": "/nonexistent-pgbeat-test", "PGPORT": "1", "PGDATABASE": "nonexistent",
               "PGSERVICEFILE": "/dev/null", "PGPASSFILE": "/dev/null", "PGCONNECT_TIMEOUT": "1"}
    result = subprocess.run([str(PG_BIN / "pg_dump"), "--dbname=host=/nonexistent-pgbeat-test port=1", *argv],
                            cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=20,
                            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", **nowhere}, start_new_session=True)
    assert result.returncode != 0, result  # it never gets to dump anything
    return not any(complaint in result.stderr for complaint in GETOPT_COMPLAINTS)


MAJOR = installed_major()
TABLE = options_for(MAJOR)
# Left out of the generated argv: options whose value pg_dump checks inside its getopt loop, stopping
# there before getopt would complain about what follows (--help and --version end the loop too); -W,
# which would prompt; and --host, which would look names up in DNS (no test traffic leaves 127.0.0.0/8).
SKIPPED = {"jobs", "compress", "extra-float-digits", "rows-per-insert", "section", "help", "version", "password",
           "host"}
READ = tuple(o for o in TABLE if o.canonical not in SKIPPED)
LONG = sorted({name for name, _ in all_names(READ)} | {"no-such", "fi", "no-", "exclude-extension", "with-data"})
SHORT = sorted({o.short for o in READ if o.short} | {"q", "y"})
token = st.one_of(
    st.tuples(st.sampled_from(LONG), st.integers(1, 40), st.sampled_from(["", "=v", "="])).map(
        lambda t: f"--{t[0][:t[1]]}{t[2]}"),
    st.tuples(st.lists(st.sampled_from(SHORT), min_size=1, max_size=3), st.sampled_from(["", "v"])).map(
        lambda t: "-" + "".join(t[0]) + t[1]),
    st.sampled_from(["word", "-", "", "5s"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(token, min_size=1, max_size=4))
def test_the_reading_matches_the_installed_pg_dump(tmp_path, argv):
    """Whatever argv: pgbeat's parser (with this pg_dump's table) finds nothing wrong exactly when this
    pg_dump's getopt_long accepts it; so prefixes, clusters and values are read as pg_dump reads them."""
    _parsed, problems = parse(argv, TABLE)
    assert (not problems) == pg_dump_accepts(argv, tmp_path), (argv, problems)
