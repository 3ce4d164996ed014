"""Reading the targets file safely: bounded, UTF-8 text, no alias bombs or absurd nesting."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from pgbeat.settings.rules import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES

# libyaml's parser where PyYAML was built with it: a fleet's targets file of thousands of entries loads ten
# times faster than with the pure-Python one (same documents, same safe constructors).
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_text_file(path: Path, what: str) -> tuple[str | None, str | None]:
    """Given a configuration file, return (its text, None) or (None, one line saying why it cannot be used:
    missing, not a regular file, too big, not UTF-8 text, binary)."""
    try:
        if not path.is_file():
            problem = "no such file" if not path.exists() else "not a regular file"
            return None, f"{path}: cannot read the {what}: {problem}"
        with path.open("rb") as f:  # bounded: /dev/zero or a runaway file must not fill memory
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, f"{path}: cannot read the {what}: {exc.strerror or exc}"
    if len(raw) > MAX_CONFIG_BYTES:
        return None, f"{path}: the {what} is larger than {MAX_CONFIG_BYTES >> 20} MiB"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"{path}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                      "save it as UTF-8")
    if "\x00" in text:
        return None, f"{path}: the {what} is binary (a NUL byte at offset {text.index(chr(0))}), not text"
    return text, None


def _yaml_problem(root: yaml.Node) -> str | None:
    """Given a composed YAML document, return why it is unusable (aliases that expand too far, an alias
    that contains itself, nesting too deep), or None. Expanded sizes are counted, not built."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            depths[key] = 1 + max((depths[id(c)] for c in children), default=0)
            if sizes[key] > MAX_CONFIG_VALUES:
                return f"it expands to more than {MAX_CONFIG_VALUES} values (YAML aliases repeating one another)"
            if depths[key] > MAX_CONFIG_DEPTH:
                return f"it is nested more than {MAX_CONFIG_DEPTH} levels deep"
            continue
        if key in sizes:
            continue
        if key in on_path:
            return "a YAML alias refers to a node that contains it (a recursive structure)"
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return None


def _data_depth(data: Any) -> int:
    """The nesting depth of parsed TOML data (no aliases there), counted without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_CONFIG_DEPTH:
            break
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


def read_config_file(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Given a YAML or TOML file, return its mapping and a list of errors (with the file's name)."""
    text, problem = read_text_file(path, "targets file")
    if problem is not None:
        return None, [problem]
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
            if _data_depth(data) > MAX_CONFIG_DEPTH:
                return None, [f"{path}: not a usable targets file: it is nested more than {MAX_CONFIG_DEPTH} "
                              "levels deep"]
        else:
            # Depth first, from the parser's events (iterative): the composer recurses once per level.
            depth = 0
            for event in yaml.parse(text, Loader=SafeLoader):
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_CONFIG_DEPTH:
                        return None, [f"{path}: not a usable targets file: it is nested more than "
                                      f"{MAX_CONFIG_DEPTH} levels deep"]
                elif isinstance(event, yaml.CollectionEndEvent):
                    depth -= 1
            loader = SafeLoader(text)
            try:
                node = loader.get_single_node()
                problem = _yaml_problem(node) if node is not None else None
                if problem is not None:
                    return None, [f"{path}: not a usable targets file: {problem}"]
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{path}: not valid TOML: {exc}"]
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound, below ours
            return None, [f"{path}: not a usable targets file: it is nested more than {MAX_CONFIG_DEPTH} "
                          "levels deep"]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        return None, [f"{path}: not valid YAML{where}: {problem}"]
    except RecursionError:  # the parsers recurse once per level of nesting
        return None, [f"{path}: not a usable targets file: it is nested more than {MAX_CONFIG_DEPTH} levels deep"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"{path}: the top level must be a mapping of settings, not {type(data).__name__}"]
    return data, []

