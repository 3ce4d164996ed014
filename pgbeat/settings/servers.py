"""Whole-server targets (`databases: all`): the names their discovered databases get, in plain Python.

Each database a whole-server target `prod` discovers is backed up as a target of its own, named
`prod.<part>`, so that file names, manifests, retention, locks, status, metrics, `pgbeat list` and
`pgbeat restore` treat it as any listed target. The mapping is deterministic, reversible and collision-free:

- a database name of letters, digits, `_` and `-` that starts with a letter or digit, and does not start
  with `x-`, is its own part: `erp` -> `prod.erp`;
- any other name (dots, spaces, quotes, non-ASCII letters, or a leading `x-`) is `x-` and the base32 of its
  UTF-8 bytes, lower case and unpadded: `my db` -> `prod.x-nv4sazdc`;

so a part never holds a dot: `prod.x` always belongs to the whole-server target `prod`, and a part turns
back into exactly one database name. A database whose derived name would exceed the 63 characters of a
target name is refused, with a warning naming it (define it as a target of its own, with `dbname`).
"""

from __future__ import annotations

import base64
import re

from pgbeat.settings.rules import validate_target_name

PLAIN_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ENCODED_PREFIX = "x-"
ENCODED_PART_RE = re.compile(r"^x-[a-z2-7]+$")


def database_part(dbname: str) -> str:
    """Given a database's name, return the part of its derived target name after `<target>.`."""
    if PLAIN_PART_RE.match(dbname) and not dbname.startswith(ENCODED_PREFIX):
        return dbname
    return ENCODED_PREFIX + base64.b32encode(dbname.encode("utf-8")).decode("ascii").rstrip("=").lower()


def part_database(part: str) -> str | None:
    """Given the part of a derived target name after its last dot, return the database it names, or None
    when no database maps to it (database_part's inverse: only its own spelling is accepted)."""
    if ENCODED_PART_RE.match(part):
        text = part[len(ENCODED_PREFIX):].upper()
        try:
            dbname = base64.b32decode(text + "=" * (-len(text) % 8)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        return dbname if database_part(dbname) == part else None
    if PLAIN_PART_RE.match(part) and not part.startswith(ENCODED_PREFIX):
        return part
    return None


def derived_name(server: str, dbname: str) -> str:
    """Given a whole-server target's name and one of its databases, return the database's target name;
    raise ValueError when it would not be a valid target name (too long)."""
    name = f"{server}.{database_part(dbname)}"
    try:
        return validate_target_name(name)
    except ValueError:
        raise ValueError(f"its target name {name[:40]}... would be {len(name)} characters (at most 63): define "
                         "it as a target of its own, with dbname and a shorter name") from None


def split_derived(name: str) -> tuple[str, str] | None:
    """Given a target name, return (the whole-server target's name, the database) it would be derived from,
    or None when it cannot be a derived name."""
    server, dot, part = name.rpartition(".")
    if not dot or not server:
        return None
    dbname = part_database(part)
    return None if dbname is None else (server, dbname)
