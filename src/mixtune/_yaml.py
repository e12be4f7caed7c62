"""YAML read within budgets: size, nesting depth, expanded size (aliases), and no duplicate keys.

    data = read_yaml_file("configs/tiny.yaml")        # or parse_yaml(text, origin="--data.columns")

PyYAML's safe loader builds plain values, but a 354-byte "billion laughs" of aliases expands into a structure
that copying (dataclasses.asdict, yaml.safe_dump) turns into gigabytes, a few thousand nested brackets end in
a RecursionError, and a key given twice silently keeps the last value. A config is a few KB: these budgets
refuse such a text in milliseconds, before anything is built from it. Errors are `YAMLRefused` (a ValueError)
whose one-line message names the origin (the file, or the command-line key) and the line.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

YAML_MAX_BYTES = 1 << 20       # bytes of one file
YAML_MAX_DEPTH = 32            # nested mappings / sequences
YAML_MAX_NODES = 100_000       # values once every alias is expanded (what copying the result would build)


class YAMLRefused(ValueError):
    """A YAML text that is invalid, not UTF-8, over a budget, or with a duplicate key (one line, with the
    origin and where possible the line)."""


class _Refused(Exception):
    """Raised inside the loader; parse_yaml adds the origin."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a mapping with the same key twice (YAML leaves it undefined; PyYAML
    keeps the last silently). Keys merged in with `<<` may be overridden, as YAML intends."""

    def flatten_mapping(self, node):
        # called on every mapping before its `<<` merges are folded in (which changes node.value): check its
        # own keys then, once per node
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _Refused(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class says so
                    continue
        super().flatten_mapping(node)


def _check_budget(text: str) -> None:
    """Walk the event stream (no objects built, no recursion) and refuse depth or expanded size over budget.
    An alias counts as a copy of what its anchor holds, so an alias bomb is caught while still small."""
    stack: list[list] = []          # open collections: [expanded size so far, anchor]
    sizes: dict[str, int] = {}      # anchor -> expanded size of its node
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([1, ev.anchor])
            if len(stack) > YAML_MAX_DEPTH:
                raise _Refused(f"nested more than {YAML_MAX_DEPTH} levels deep (line {ev.start_mark.line + 1})")
            continue
        if isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            n, anchor = stack.pop()
        elif isinstance(ev, yaml.ScalarEvent):
            n, anchor = 1, ev.anchor
        elif isinstance(ev, yaml.AliasEvent):
            n, anchor = sizes.get(ev.anchor, 1), None
        else:
            continue
        if anchor:
            sizes[anchor] = n
        if stack:
            stack[-1][0] += n
            n = stack[-1][0]
        if n > YAML_MAX_NODES:
            raise _Refused(f"more than {YAML_MAX_NODES:,} values once its aliases (*name) are expanded "
                           f"(line {ev.start_mark.line + 1})")


def parse_yaml(text: str, origin: str) -> Any:
    """YAML text -> Python values, within the budgets and without duplicate keys; YAMLRefused naming `origin`
    otherwise."""
    try:
        _check_budget(text)
        return yaml.load(text, Loader=_StrictLoader)
    except _Refused as e:
        raise YAMLRefused(f"{origin}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise YAMLRefused(f"{origin}: not valid YAML ({str(e).splitlines()[0]})") from None


def read_yaml_file(path: str | os.PathLike) -> Any:
    """The values of a UTF-8 YAML file of at most YAML_MAX_BYTES (YAMLRefused otherwise, or when missing)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(YAML_MAX_BYTES + 1)
    except FileNotFoundError:
        raise YAMLRefused(f"config file not found: {path}") from None
    if len(raw) > YAML_MAX_BYTES:
        raise YAMLRefused(f"{path}: refused: larger than {YAML_MAX_BYTES >> 20} MiB (a config is a few KB)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YAMLRefused(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it "
                          f"as UTF-8") from None
    return parse_yaml(text, str(path))
