"""`pgbeat restore --list` shows every kind of object a backup holds, the same for every format, checked
against the source database's own catalogs; a row of data that reads like pg_dump's header is not an
object."""

from __future__ import annotations

import re

import pytest

from tests.support import ROOT, Service, without_ansi

pytestmark = pytest.mark.integration

FORMATS = [{"format": "plain"}, {"format": "plain", "compression": {"codec": "zstd"}}, {"format": "custom"},
           {"format": "directory", "jobs": 2}]
FAKE = "-- Name: not_a_view; Type: VIEW; Schema: erp; Owner: postgres"


@pytest.fixture(scope="module")
def rich(pg):
    db = pg.createdb("restore_list_rich")
    pg.psql_file(ROOT / "tests" / "data" / "rich.sql", db)
    pg.sql("CREATE TYPE erp.mood AS ENUM ('ok', 'sad'); CREATE INDEX invoices_by_customer ON erp.invoices "
           "(customer_id); CREATE MATERIALIZED VIEW erp.totals AS SELECT 1 AS one; "
           f"CREATE TABLE erp.notes (line text); INSERT INTO erp.notes VALUES ('{FAKE}')", db)
    yield db
    pg.dropdb(db)


def listed_objects(stdout: str) -> set[tuple[str, str, str]]:
    """(kind, schema, name) of the rows of the 'other object(s)' table."""
    text = without_ansi(stdout)
    table = text[text.index("other object(s)"):]
    rows = set()
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)[1:-1]]
        if len(cells) == 3 and cells[0] and cells[0] != "kind":
            rows.add(tuple(cells))
    return rows


def catalog_objects(pg, db: str) -> set[tuple[str, str, str]]:
    """What the source database's catalogs say it holds, outside the system schemas."""
    user = "NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    queries = {
        "view": f"SELECT schemaname, viewname FROM pg_views WHERE schemaname {user}",
        "materialized view": f"SELECT schemaname, matviewname FROM pg_matviews WHERE schemaname {user}",
        "sequence": f"SELECT schemaname, sequencename FROM pg_sequences WHERE schemaname {user}",
        "schema": f"SELECT '-', nspname FROM pg_namespace WHERE nspname {user} AND nspname NOT LIKE 'pg_%' "
                  "AND nspname <> 'public'",
        "type": f"SELECT n.nspname, t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                f"WHERE t.typtype = 'e' AND n.nspname {user}",
        "index": f"SELECT schemaname, indexname FROM pg_indexes i WHERE schemaname {user} AND NOT EXISTS "
                 "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
        "blob": "SELECT '-', oid::text FROM pg_largeobject_metadata",
    }
    found = set()
    for kind, query in queries.items():
        for line in pg.sql(query, db).splitlines():
            schema, name = line.split("|")
            found.add((kind, schema, name))
    return found


def test_every_object_kind_is_listed_the_same_in_every_format(workdir, pg, rich):
    targets = [pg.target(f"f{i}", rich, **options) for i, options in enumerate(FORMATS)]
    service = Service(workdir, None, targets)
    assert service.pgbeat("backup", "daily").returncode == 0
    listings = {}
    for target in targets:
        done = service.pgbeat("restore", "--list", "--latest", "--target", target["name"], COLUMNS="250")
        assert done.returncode == 0, done.stderr
        listings[target["name"]] = listed_objects(done.stdout)
        assert "objects: " in done.stdout and "table 4" in done.stdout, done.stdout
    first = listings["f0"]
    assert all(objects == first for objects in listings.values()), listings
    missing = catalog_objects(pg, rich) - first
    assert not missing, missing
    assert {kind for kind, _, _ in first} >= {"schema", "function", "view", "materialized view", "sequence", "type",
                                              "index", "constraint", "fk constraint", "trigger", "blob"}
    assert not [o for o in first if "not_a_view" in o[2]]  # a row of erp.notes, not an object


def test_an_encrypted_backup_lists_its_tables_and_says_why_not_the_rest(workdir, pg, rich):
    import subprocess

    key = workdir / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = re.search(r"public key: (\S+)", key.read_text()).group(1)
    service = Service(workdir, None, [pg.target("sealed", rich, encryption={"recipients": [recipient]})])
    assert service.pgbeat("backup", "daily").returncode == 0
    done = service.pgbeat("restore", "--list", "--latest", "--target", "sealed")
    assert done.returncode == 0, done.stderr
    assert "4 table(s)" in done.stdout and "the backup is encrypted" in done.stdout
