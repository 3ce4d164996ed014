"""`deploy/pgbeat.example.yaml`, rendered from the schema: every key with its description as a comment,
its default as the value (a key with no default is shown commented out, with an example), and the example
targets below. `pgbeat config example` prints it; a test checks the committed file is this text.
"""

from __future__ import annotations

import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pgbeat.settings.schema import DESTINATION_KINDS, DestinationBase, FileConfig, Target

WIDTH = 110
HEADER = """\
pgbeat targets file: point PGBEAT_CONFIG at it. YAML (or the same keys in TOML).
Every key is optional except each target's name and dbname (or `databases: all`: every database of the
server, each a target of its own); each value shown is the default, and a key commented out has no default
(the comment says what leaving it out means). A target's keys are those of `defaults`, which it overrides
(tiers, compression and drill key by key).
Generated from the schema (pgbeat/settings/schema.py) by `pgbeat config example`: edit the schema, not this file.
"""

# What the example sets besides the defaults: channels, and two targets showing every kind of destination.
EXAMPLE_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
EXAMPLE: dict[str, Any] = {
    "notify": [
        {"url": "mailtos://backup:smtp-password@smtp.example.com?to=dba@example.com",
         "events": ["failure", "warning", "drill"]},
        {"url": "slack://TokenA/TokenB/TokenC/#backups"},
    ],
    "targets": [
        {"name": "erp_db", "dbname": "erp", "host": "db1.internal", "port": 5432,
         "healthcheck_url": "https://hc-ping.com/your-uuid",
         "tiers": {"daily": {"keep_days": 14, "min_keep": 3},
                   "hourly": {"schedule": "30 8-18 * * 1-5", "keep_days": 2}},
         "encryption": {"recipients": [EXAMPLE_RECIPIENT], "identity_file": "/etc/pgbeat/restore-key.txt"},
         "destinations": [
             {"name": "offsite-s3", "kind": "s3", "bucket": "company-pg-backups", "prefix": "erp/",
              "region": "eu-west-1", "storage_class": "STANDARD_IA", "sse": "AES256",
              "retention": {"daily": {"keep_days": 35}}, "bandwidth_limit": 20971520},
             {"name": "vault", "kind": "ssh", "host": "vault.internal", "user": "pgbeat", "path": "/srv/pgbeat",
              "key_file": "/etc/pgbeat/id_ed25519", "known_hosts": "/etc/pgbeat/known_hosts"},
         ]},
        {"name": "crm", "dbname": "crm", "host": "db2.internal", "format": "directory", "jobs": 2,
         "passfile": "/etc/pgbeat/crm.pgpass", "pg_dump_options": ["--exclude-table-data=audit_log"],
         "tiers": {"monthly": {"enabled": False},
                   "base": {"full_every_days": 7}},
         "destinations": [{"name": "gcs", "kind": "gcs", "bucket": "company-pg-backups-eu", "prefix": "crm"}]},
        {"name": "db3", "databases": "all", "host": "db3.internal", "include": ["app_*", "billing"],
         "exclude": ["*_scratch"]},
    ],
}


def flow(value: Any) -> str:
    """Given a plain value (or a model, a Path), return it as one line of YAML."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, Path):
        value = str(value)
    elif isinstance(value, dict):
        value = {key: (item.model_dump(mode="json", exclude_none=True) if isinstance(item, BaseModel) else item)
                 for key, item in value.items()}
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (Optional opened), or None."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a list's items (`notify`, `targets`), or None; the union of `destinations` gives its
    first kind (an item's own `kind` picks its model)."""
    for member in _members(annotation):
        if typing.get_origin(member) is list:
            (item,) = typing.get_args(member)
            while typing.get_origin(item) is typing.Annotated:
                item = typing.get_args(item)[0]
            return next((model for model in map(_model, _members(item)) if model is not None), None)
    return None


def _dict_of_models(annotation: Any) -> type[BaseModel] | None:
    """The model of a mapping's values (`tiers`), or None."""
    for member in _members(annotation):
        if typing.get_origin(member) is dict:
            return _model(typing.get_args(member)[1])
    return None


def _keys_described(model: type[BaseModel]) -> str:
    return "; ".join(f"{name} ({info.description})" if info.description else name
                     for name, info in model.model_fields.items())


def _default(info: FieldInfo) -> Any:
    """The field's default, or PydanticUndefined when it has none (a required field)."""
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def _comment(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, WIDTH - indent - 2, initial_indent=" " * indent + "# ",
                         subsequent_indent=" " * indent + "# ")


def _line(indent: int, key: str, value: str, description: str | None, commented: bool,
          after: bool = False) -> list[str]:
    """`key: value` with the description after it if it fits (or `after`), above it otherwise."""
    body = f"{' ' * indent}{'# ' if commented else ''}{key}:{' ' + value if value else ''}"
    if not description:
        return [body]
    if after or len(body) + 3 + len(description) <= WIDTH:
        return [f"{body}  # {description}"]
    return [*_comment(description, indent), body]


def render_model(model: type[BaseModel], given: dict[str, Any], indent: int, commented: bool = False,
                 only_given: bool = False, first: str | None = None) -> list[str]:
    """Given a model and the values the example sets in it, return its lines: every field (or with
    `only_given`, only the set ones), set values as they are, the others as their default or commented out.
    The key `first` comes first, its description after it (a list item starts with it)."""
    lines: list[str] = []
    fields = dict(model.model_fields)
    leading = [name for name in (first, "name", "kind", "dbname", "databases") if name in fields]
    if issubclass(model, DestinationBase):  # a kind's own keys before those every destination has
        leading += [name for name in fields if name not in DestinationBase.model_fields]
    order = list(dict.fromkeys([*leading, *fields]))
    for name in order:
        info = fields[name]
        if only_given and name not in given:
            continue
        description = info.description
        nested = _model(info.annotation)
        if name in given:
            value: Any = given[name]
            if nested is not None and isinstance(value, dict):
                lines += _line(indent, name, "", description, commented)
                lines += render_model(nested, value, indent + 2, commented)
            elif _list_item_model(info.annotation) is not None and value:
                lines += _line(indent, name, "", description, commented)
                for item in value:
                    lines += _render_item(name, info.annotation, item, indent + 2, commented)
            else:
                lines += _line(indent, name, flow(value), description, commented, after=name == first)
            continue
        default = _default(info)
        if nested is not None and default is not PydanticUndefined:
            if default is None:  # an optional section: shown commented out, with its keys
                lines += _line(indent, name, "", description, True)
                lines += render_model(nested, {}, indent + 2, True)
            else:
                lines += _line(indent, name, "", description, commented)
                lines += render_model(nested, {}, indent + 2, commented)
        elif _dict_of_models(info.annotation) and isinstance(default, dict) and default:
            item_model = _dict_of_models(info.annotation)
            lines += _line(indent, name, "", description, commented)
            lines += _comment(f"each one: {_keys_described(item_model)}", indent + 2)
            lines += [f"{' ' * (indent + 2)}{'# ' if commented else ''}{key}: {flow(value)}"
                      for key, value in default.items()]
        elif default is PydanticUndefined or default is None:
            example = flow(info.examples[0]) if info.examples else "..."
            lines += _line(indent, name, example, description, True)
        else:
            lines += _line(indent, name, flow(default), description, commented)
    return lines


def _render_item(field: str, annotation: Any, item: dict[str, Any], indent: int, commented: bool) -> list[str]:
    """One item of a list of models, as a `- ` block: a destination with every key of its kind, a
    target with only the keys it sets (all of them are shown under `defaults`)."""
    model = DESTINATION_KINDS[item["kind"]] if field == "destinations" else _list_item_model(annotation)
    if model is None:
        raise TypeError(f"{field} is not a list of models")
    lines = render_model(model, item, indent + 2, commented, only_given=model is Target, first=next(iter(item)))
    lines[0] = " " * indent + "- " + lines[0][indent + 2:]
    return lines


SECTION = re.compile(r"^\w+:(\s+#.*)?$")  # a top-level key that opens a block


def example_config() -> str:
    """Return the text of `deploy/pgbeat.example.yaml`: the schema of the targets file with the example."""
    lines = _comment_block(HEADER)
    body = render_model(FileConfig, EXAMPLE, 0)
    for index, line in enumerate(body):
        # A blank line before each top-level section and the description above it, for the eye.
        following = next((later for later in body[index:] if not _is_description(later)), "")
        starts_group = index == 0 or not _is_description(body[index - 1])
        if starts_group and SECTION.match(following) and lines[-1] != "":
            lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _is_description(line: str) -> bool:
    """True for a top-level comment line that describes the key below it (not a commented-out key)."""
    return line.startswith("# ") and re.match(r"^# \w+:", line) is None


def _comment_block(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()] + [""]
