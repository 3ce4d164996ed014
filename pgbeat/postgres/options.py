"""`pg_dump_options`: an allow-list, read the way pg_dump itself reads its command line.

pg_dump parses argv with GNU getopt_long, which accepts any unambiguous prefix of a long option
(`--fil=x` is `--file=x`, `--dbn=...` is `--dbname=...`), an exact name even when it is the prefix of
another (`--schema`), clustered short options (`-cC`), arguments attached (`-tfoo`, `--table=foo`) or in
the next element (`-t foo`, `--table foo`, whatever that element looks like), and moves every
non-option word to the end, where the first one becomes the database name. A check that looks at
option names as written (`name in RESERVED`) is therefore a check that `--fil=/tmp/x` walks past.

So the configured list is parsed here with the same rules against `PG_DUMP_OPTIONS`, the union of
pg_dump's options in PostgreSQL 13 to 18, and every option it names must be on the allow-list: options
that cannot change where the dump comes from (server, database, role, snapshot, foreign servers), where
it goes (file, format, compression), or what a restore of it does beyond leaving something out
(`--clean`/`--create` make a plain dump drop and recreate the database *named in the dump*, the
source, when it is restored `--into` a copy). pg_dump then receives the canonical spellings
(`--table=foo`), so no prefix or cluster is left for it to read differently.

Matching against the union of all versions keeps the reading right for any pg_dump: a prefix that is
unique in the union names the same option in every version that has it (a version without it rejects
it, so the dump fails loudly), and a prefix that is ambiguous in the union is refused even if one
version would accept it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum


class Arg(Enum):
    NONE = "none"
    REQUIRED = "required"


@dataclass(frozen=True)
class PgDumpOption:
    """One pg_dump option: its long names (canonical first, then aliases), short letter, argument,
    the PostgreSQL major versions that have it, and why it is refused (None: allowed)."""

    names: tuple[str, ...]
    short: str | None = None
    arg: Arg = Arg.NONE
    since: int = 13
    until: int | None = None  # the last major version that has it
    refused: str | None = None
    alias_since: int | None = None  # the aliases (names after the first) came in this version

    @property
    def canonical(self) -> str:
        return self.names[0]

    @property
    def allowed(self) -> bool:
        return self.refused is None

    def in_version(self, major: int) -> bool:
        return self.since <= major and (self.until is None or major <= self.until)

    def names_in(self, major: int) -> tuple[str, ...]:
        return self.names if self.alias_since is None or major >= self.alias_since else self.names[:1]


# Why an option is refused, one sentence per reason (shown in the configuration error).
SOURCE = "it changes where the dump comes from; pgbeat connects with the target's own settings"
OUTPUT = "it changes where the dump goes or how it is written; pgbeat chooses that (format, compression, jobs)"
CLEAN = ("a restore of the dump would drop objects first, and with --create the database named in the dump "
         "(the source), even when it is restored --into a copy")
PART = "the dump would not hold the whole database; pgbeat's restore and its checks expect schema and data"
INSERTS = "the dump would hold INSERTs instead of COPY; pgbeat counts the rows of every table from the COPY blocks"
RESTORE = "it changes what a restore of the dump does (ownership, triggers, session authorization)"
DATA = "it changes the data written (precision, encoding, statistics), so a restore differs from the source"
NOOP = "it asks pg_dump for something other than a dump (help, version, a password prompt) or does nothing"
FILE_INPUT = "it makes pg_dump read a file; list the patterns here instead (--table, --exclude-table, ...)"
SECURITY = "a fixed key weakens psql's protection against commands hidden in the data of a plain dump"

# pg_dump's options in PostgreSQL 13-18, from src/bin/pg_dump/pg_dump.c (long_options[] and the
# getopt_long string) of each release; `pg_dump --help` lists all but the aliases and -R.
PG_DUMP_OPTIONS: tuple[PgDumpOption, ...] = (
    # --- allowed: leave things out, or change how the dump waits or quotes, nothing else ---------------
    PgDumpOption(("blobs", "large-objects"), "b", alias_since=16),
    PgDumpOption(("no-blobs", "no-large-objects"), "B", alias_since=16),
    PgDumpOption(("extension",), "e", Arg.REQUIRED, since=14),
    PgDumpOption(("exclude-extension",), arg=Arg.REQUIRED, since=17),
    PgDumpOption(("schema",), "n", Arg.REQUIRED),
    PgDumpOption(("exclude-schema",), "N", Arg.REQUIRED),
    PgDumpOption(("table",), "t", Arg.REQUIRED),
    PgDumpOption(("exclude-table",), "T", Arg.REQUIRED),
    PgDumpOption(("table-and-children",), arg=Arg.REQUIRED, since=16),
    PgDumpOption(("exclude-table-and-children",), arg=Arg.REQUIRED, since=16),
    PgDumpOption(("exclude-table-data",), arg=Arg.REQUIRED),
    PgDumpOption(("exclude-table-data-and-children",), arg=Arg.REQUIRED, since=16),
    PgDumpOption(("no-owner",), "O"),
    PgDumpOption(("no-privileges", "no-acl"), "x"),
    PgDumpOption(("no-comments",)),
    PgDumpOption(("no-publications",)),
    PgDumpOption(("no-subscriptions",)),
    PgDumpOption(("no-security-labels",)),
    PgDumpOption(("no-tablespaces",)),
    PgDumpOption(("no-table-access-method",), since=15),
    PgDumpOption(("no-toast-compression",), since=14),
    PgDumpOption(("no-unlogged-table-data",)),
    PgDumpOption(("no-policies",), since=18),
    PgDumpOption(("no-statistics",), since=18),
    PgDumpOption(("lock-wait-timeout",), arg=Arg.REQUIRED),
    PgDumpOption(("quote-all-identifiers",)),
    PgDumpOption(("serializable-deferrable",)),
    PgDumpOption(("enable-row-security",)),
    PgDumpOption(("strict-names",)),
    PgDumpOption(("load-via-partition-root",)),
    # --- refused -------------------------------------------------------------------------------------
    PgDumpOption(("dbname",), "d", Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("host",), "h", Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("port",), "p", Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("username",), "U", Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("role",), arg=Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("snapshot",), arg=Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("include-foreign-data",), arg=Arg.REQUIRED, refused=SOURCE),
    PgDumpOption(("no-synchronized-snapshots",), until=14, refused=SOURCE),
    PgDumpOption(("file",), "f", Arg.REQUIRED, refused=OUTPUT),
    PgDumpOption(("format",), "F", Arg.REQUIRED, refused=OUTPUT),
    PgDumpOption(("jobs",), "j", Arg.REQUIRED, refused=OUTPUT),
    PgDumpOption(("compress",), "Z", Arg.REQUIRED, refused=OUTPUT),
    PgDumpOption(("no-sync",), refused=OUTPUT),
    PgDumpOption(("sync-method",), arg=Arg.REQUIRED, since=17, refused=OUTPUT),
    PgDumpOption(("verbose",), "v", refused=OUTPUT),
    PgDumpOption(("clean",), "c", refused=CLEAN),
    PgDumpOption(("create",), "C", refused=CLEAN),
    PgDumpOption(("if-exists",), refused=CLEAN),
    PgDumpOption(("data-only",), "a", refused=PART),
    PgDumpOption(("schema-only",), "s", refused=PART),
    PgDumpOption(("section",), arg=Arg.REQUIRED, refused=PART),
    PgDumpOption(("no-data",), since=18, refused=PART),
    PgDumpOption(("no-schema",), since=18, refused=PART),
    PgDumpOption(("statistics-only",), since=18, refused=PART),
    PgDumpOption(("with-data",), since=18, refused=PART),
    PgDumpOption(("with-schema",), since=18, refused=PART),
    PgDumpOption(("sequence-data",), since=18, refused=PART),
    PgDumpOption(("inserts",), refused=INSERTS),
    PgDumpOption(("column-inserts", "attribute-inserts"), refused=INSERTS),
    PgDumpOption(("rows-per-insert",), arg=Arg.REQUIRED, refused=INSERTS),
    PgDumpOption(("on-conflict-do-nothing",), refused=INSERTS),
    PgDumpOption(("superuser",), "S", Arg.REQUIRED, refused=RESTORE),
    PgDumpOption(("disable-triggers",), refused=RESTORE),
    PgDumpOption(("use-set-session-authorization",), refused=RESTORE),
    PgDumpOption(("binary-upgrade",), refused=RESTORE),
    PgDumpOption(("disable-dollar-quoting",), refused=RESTORE),
    PgDumpOption(("encoding",), "E", Arg.REQUIRED, refused=DATA),
    PgDumpOption(("extra-float-digits",), arg=Arg.REQUIRED, refused=DATA),
    PgDumpOption(("statistics",), since=18, refused=DATA),
    PgDumpOption(("with-statistics",), since=18, refused=DATA),
    PgDumpOption(("filter",), arg=Arg.REQUIRED, since=17, refused=FILE_INPUT),
    PgDumpOption(("restrict-key",), arg=Arg.REQUIRED, refused=SECURITY),  # 13.22, 14.19, 15.14, 16.10, 17.6, 18
    PgDumpOption(("no-password",), "w", refused=NOOP),
    PgDumpOption(("password",), "W", refused=NOOP),
    PgDumpOption(("no-reconnect",), "R", refused=NOOP),
    # -? and -V work only as pg_dump's first argument, which is never one of these: not getopt letters.
    PgDumpOption(("help",), refused=NOOP),
    PgDumpOption(("version",), refused=NOOP),
)


class PgDumpOptionsError(ValueError):
    """The list holds options pg_dump must not get; `problems` has one line per element at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def options_for(major: int | None = None) -> tuple[PgDumpOption, ...]:
    """Return the table (for one PostgreSQL major version, or the union of 13-18)."""
    if major is None:
        return PG_DUMP_OPTIONS
    return tuple(replace(o, names=o.names_in(major)) for o in PG_DUMP_OPTIONS if o.in_version(major))


def match_long(name: str, table: tuple[PgDumpOption, ...]) -> PgDumpOption:
    """Given a long option name as written (without `--` and `=value`), return the option getopt_long
    takes it for.

    An exact name wins; else the options the name is a prefix of, which must all be one option
    (getopt_long accepts a prefix shared by aliases of one option). Raise ValueError otherwise.
    """
    exact = [o for o in table if name in o.names]
    if exact:
        return exact[0]
    candidates = {o.canonical: o for o in table if name and any(n.startswith(name) for n in o.names)}
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise ValueError(f"'--{name}' is not a pg_dump option")
    raise ValueError(f"'--{name}' is ambiguous: it abbreviates " + ", ".join(f"--{c}" for c in sorted(candidates)))


@dataclass(frozen=True)
class ParsedOption:
    option: PgDumpOption
    value: str | None
    written: str  # as given, for messages

    def argv(self) -> str:
        """The canonical spelling for pg_dump: `--name` or `--name=value` (one element, nothing to misread)."""
        name = f"--{self.option.canonical}"
        return name if self.value is None else f"{name}={self.value}"


def parse(args: list[str], table: tuple[PgDumpOption, ...] = PG_DUMP_OPTIONS) -> tuple[list[ParsedOption], list[str]]:
    """Given argv elements, return the options in them as getopt_long reads them, and one line for each
    thing pg_dump would not accept (an unknown or ambiguous option, a missing or unwanted argument) or
    must not be given: a non-option word, which pg_dump takes for the database name.

    After a problem, reading goes on with the next element, so that every problem is reported.
    """
    parsed: list[ParsedOption] = []
    problems: list[str] = []
    shorts = {o.short: o for o in table if o.short}
    index = 0
    while index < len(args):
        element = args[index]
        index += 1
        if element == "--":
            problems.append("'--' ends pg_dump's options: what follows it would be taken for a database name")
        elif element.startswith("--"):
            name, equals, value = element[2:].partition("=")
            try:
                option = match_long(name, table)
            except ValueError as exc:
                problems.append(str(exc) if element == f"--{name}" else f"{element!r}: {exc}")
                continue
            written = repr(element)
            if option.arg is Arg.NONE:
                if equals:
                    problems.append(f"{element!r}: --{option.canonical} takes no value")
                else:
                    parsed.append(ParsedOption(option, None, written))
                continue
            if not equals:
                if index >= len(args):
                    problems.append(f"{element!r}: --{option.canonical} needs a value")
                    continue
                value = args[index]  # getopt takes the next element, whatever it looks like
                index += 1
                written = f"{element!r} {value!r}"
            parsed.append(ParsedOption(option, value, written))
        elif element.startswith("-") and element != "-":
            position = 1
            while position < len(element):
                letter = element[position]
                position += 1
                option = shorts.get(letter)
                if option is None:
                    problems.append(f"{element!r}: -{letter} is not a pg_dump option")
                    break
                alone = position == 2 and (len(element) == 2 or option.arg is Arg.REQUIRED)
                written = repr(element) if alone else f"-{letter} in {element!r}"
                if option.arg is Arg.NONE:
                    parsed.append(ParsedOption(option, None, written))
                    continue
                value = element[position:]  # -tfoo: the rest of the element is the value
                if not value:
                    if index >= len(args):
                        problems.append(f"{element!r}: -{letter} (--{option.canonical}) needs a value")
                        break
                    value = args[index]
                    index += 1
                    written = f"{written} {value!r}"
                parsed.append(ParsedOption(option, value, written))
                break
        else:
            problems.append(f"{element!r} is not an option: pg_dump would take it for the database to dump")
    return parsed, problems


def check_pg_dump_options(args: list[str]) -> list[str]:
    """Given the configured `pg_dump_options`, return them in canonical spelling for pg_dump.

    Raise PgDumpOptionsError naming every element that is not an allowed option with a usable value.
    """
    problems = []
    for number, element in enumerate(args):
        if "\x00" in element:
            problems.append(f"element {number} contains a NUL character")
    if problems:
        raise PgDumpOptionsError(problems)
    parsed, problems = parse(args)
    refused: dict[str, list[str]] = {}
    for item in parsed:
        name = f"--{item.option.canonical}"
        spelled_out = item.written == repr(name) or item.written.startswith((f"'{name}=", f"'{name}' "))
        shown = item.written if spelled_out else f"{item.written} (that is {name})"
        if not item.option.allowed:
            refused.setdefault(item.option.refused, []).append(shown)
        elif item.value is not None and not item.value.strip():
            problems.append(f"{shown} has an empty value")
    for reason, shown in refused.items():
        problems.append(f"{' and '.join(shown)} {'is' if len(shown) == 1 else 'are'} refused: {reason}")
    if problems:
        raise PgDumpOptionsError(problems)
    return [item.argv() for item in parsed]
