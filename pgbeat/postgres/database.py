"""What makes a database what it is besides its contents: its row in pg_database and its settings.

A restore in place gives the restored copy the properties of the database it replaces (read from the
server); every logical backup also records its database's properties at the dump (the manifest's sealed
`properties`), so that a restore into a database that does not exist yet (a rebuilt server, `--into` on
another host) creates it with its owner, encoding, locale, settings, ACL and comment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

LOCALE_PROVIDERS = {"c": "libc", "i": "icu", "b": "builtin"}


@dataclass(frozen=True)
class AclItem:
    """One entry of a database's ACL, in the order PostgreSQL keeps them."""

    grantor: str
    grantee: str | None  # None: PUBLIC
    privileges: tuple[tuple[str, bool], ...]  # (privilege, grantable)


@dataclass(frozen=True)
class DatabaseProperties:
    """Everything that makes a database what it is besides its contents: its row in pg_database (minus
    what no copy can share: oid, name, frozen transaction ids) and its rows in pg_db_role_setting.

    Version-dependent columns are None where the server has no such column (PostgreSQL 13-18).
    """

    oid: int
    owner: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str | None  # datlocprovider (15+): c, i, b
    locale: str | None  # daticulocale (15-16), datlocale (17+)
    icu_rules: str | None  # daticurules (16+)
    collation_version: str | None  # datcollversion (15+)
    tablespace: str
    connection_limit: int
    allow_connections: bool
    is_template: bool
    acl: tuple[AclItem, ...] | None  # None: the default ACL
    comment: str | None
    settings: tuple[tuple[str | None, tuple[str, ...]], ...]  # (role or None for all roles, name=value items)

    # Set on the copy only in the swap transaction: a template or closed database could not be loaded or
    # dropped, and a connection limit would throttle pg_restore -j.
    AT_SWAP = ("connection_limit", "allow_connections", "is_template")
    # The library that built the copy's indexes decides it (a fresh copy is built with today's library).
    BUILT = ("collation_version",)

    def record(self) -> dict[str, Any]:
        """The properties as the manifest records them (JSON; without the oid, which is the server's own)."""
        record = asdict(self)
        del record["oid"]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DatabaseProperties:
        """Given a manifest's record, return the properties (oid 0: a database that is not on this server)."""
        acl = record.get("acl")
        return cls(oid=0, **{**{f.name: record.get(f.name) for f in fields(cls) if f.name != "oid"},
                             "acl": None if acl is None else tuple(
                                 AclItem(a["grantor"], a["grantee"], tuple((p, bool(g)) for p, g in a["privileges"]))
                                 for a in acl),
                             "settings": tuple((role, tuple(items)) for role, items in record.get("settings") or ())})

    def roles(self) -> set[str]:
        """The roles these properties name: owner, ACL grantors and grantees, roles of settings."""
        named = {self.owner, *(role for role, _ in self.settings if role)}
        for item in self.acl or ():
            named |= {item.grantor, *([item.grantee] if item.grantee else [])}
        return named

    def differences(self, other: DatabaseProperties, skip: tuple[str, ...] = ()) -> list[str]:
        """One line per property in which `other` differs from this database (except oid and `skip`)."""
        return [f"{f.name}: {getattr(other, f.name)!r}, the original has {getattr(self, f.name)!r}"
                for f in fields(self)
                if f.name not in ("oid", *skip) and getattr(self, f.name) != getattr(other, f.name)]


def _locale_columns(version: int) -> str:
    if version >= 170000:
        return "d.datlocprovider::text, d.datlocale, d.daticurules, d.datcollversion"
    if version >= 160000:
        return "d.datlocprovider::text, d.daticulocale, d.daticurules, d.datcollversion"
    if version >= 150000:
        return "d.datlocprovider::text, d.daticulocale, NULL::text, d.datcollversion"
    return "NULL::text, NULL::text, NULL::text, NULL::text"


def database_properties(conn: psycopg.Connection, name: str) -> DatabaseProperties | None:
    """Given a connection to a server, return database `name`'s properties, or None if it does not exist."""
    row = conn.execute(
        "SELECT d.oid, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, "
        f"{_locale_columns(conn.info.server_version)}, t.spcname, d.datconnlimit, d.datallowconn, "
        "d.datistemplate, d.datacl IS NULL, shobj_description(d.oid, 'pg_database') "
        "FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s", (name,)
    ).fetchone()
    if row is None:
        return None
    oid, *values, default_acl, comment = row
    acl: dict[int, AclItem] = {}
    for position, grantor, grantee, privilege, grantable in conn.execute(
            "SELECT u.n, pg_get_userbyid(a.grantor), CASE WHEN a.grantee = 0 THEN NULL "
            "ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable "
            "FROM pg_database d, unnest(d.datacl) WITH ORDINALITY AS u(item, n), aclexplode(ARRAY[u.item]) AS a "
            "WHERE d.oid = %s ORDER BY u.n", (oid,)):
        item = acl.get(position) or AclItem(grantor, grantee, ())
        acl[position] = AclItem(grantor, grantee, (*item.privileges, (privilege, grantable)))
    settings = conn.execute(
        "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, s.setconfig "
        "FROM pg_db_role_setting s WHERE s.setdatabase = %s ORDER BY 1 NULLS FIRST", (oid,)).fetchall()
    return DatabaseProperties(int(oid), *values, acl=None if default_acl else tuple(acl.values()), comment=comment,
                              settings=tuple((role, tuple(config)) for role, config in settings))


