"""The server's globals: what applying them leaves out, and the names pg_dumpall quotes."""

from __future__ import annotations

from pgbeat.postgres.globals import created_roles, dumpall_argv, without_existing
from pgbeat.settings import Target

GLOBALS = '''\\restrict abc
SET default_transaction_read_only = off;
CREATE ROLE app_owner;
ALTER ROLE app_owner WITH NOSUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:x';
CREATE ROLE "Odd ""name""";
ALTER ROLE "Odd ""name""" WITH NOLOGIN;
ALTER ROLE app_owner SET search_path TO 'app';
CREATE TABLESPACE fast OWNER app_owner LOCATION '/srv/fast';
CREATE TABLESPACE slow OWNER app_owner LOCATION '/srv/slow';
GRANT "Odd ""name""" TO app_owner GRANTED BY postgres;
\\unrestrict abc
'''


def test_roles_and_tablespaces_the_server_has_are_left_out_and_named():
    text, existing = without_existing(GLOBALS, roles={"app_owner"}, tablespaces={"fast"})
    assert existing == ["app_owner"]
    assert "CREATE ROLE app_owner;" not in text and "ALTER ROLE app_owner" not in text  # left as it is
    assert 'CREATE ROLE "Odd ""name""";' in text and 'ALTER ROLE "Odd ""name""" WITH NOLOGIN' in text
    assert 'GRANT "Odd ""name""" TO app_owner' in text  # memberships are added
    assert "CREATE TABLESPACE fast" not in text and "CREATE TABLESPACE slow" in text
    assert text.startswith("\\restrict abc\n") and text.endswith("\\unrestrict abc\n")


def test_quoted_names_are_read_as_the_catalog_spells_them():
    assert created_roles(GLOBALS) == ["app_owner", 'Odd "name"']
    text, existing = without_existing(GLOBALS, roles={'Odd "name"'}, tablespaces=set())
    assert existing == ['Odd "name"'] and "Odd" not in text.split("GRANT")[0]


def test_no_password_on_the_command_line_and_no_role_passwords_for_a_non_superuser():
    target = Target(name="erp", host="db1", dbname="erp", user="backup", password="s3cret")
    argv = dumpall_argv("/usr/bin/pg_dumpall", target, passwords=True)
    assert "--globals-only" in argv and "--no-role-passwords" not in argv
    assert not any("s3cret" in arg for arg in argv) and argv[argv.index("-l") + 1] == "erp"
    assert dumpall_argv("/usr/bin/pg_dumpall", target, passwords=False)[-1] == "--no-role-passwords"
