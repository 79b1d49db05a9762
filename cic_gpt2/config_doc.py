"""Documentation of the run config, generated from the dataclasses in `cic_gpt2.config`: every key's type,
default and the string literal under its field (`cic-gpt2 train --help`, docs/training.md)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from cic_gpt2.config import RunConfig


@dataclass(frozen=True)
class KeyDoc:
    key: str
    """Dotted key as set on the command line, e.g. `train.lr`."""
    type: str
    """The annotation as written in the source, e.g. `Optional[int]`."""
    default: str
    """The default as written on the command line or in YAML (`null`, `true`, `0.0005`, `""`, `required`)."""
    doc: str
    """The string literal under the field ("" when it has none)."""


def _field_source(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (its annotation as written, the string literal right under it) in `cls`'s source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.encode().splitlines()  # ast offsets count UTF-8 bytes
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    out = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            a = node.annotation
            annotation = (lines[a.lineno - 1][a.col_offset:a.end_col_offset].decode() if a.lineno == a.end_lineno
                          else ast.unparse(a))
            literal = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
            out[node.target.id] = (annotation, inspect.cleandoc(literal) if isinstance(literal, str) else "")
    return out


def _format_value(value: Any) -> str:
    """`value` as written after `KEY=` or in YAML; `parse_overrides` reads it back as `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and value and value == value.strip() and yaml.safe_load(value) == value:
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)  # JSON is YAML: "quoted", [lists]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _format_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _format_value(f.default_factory())
    return "required"


def _sections(cls: type, prefix: str = "", doc: str = "") -> list[tuple[str, str, list[KeyDoc]]]:
    """[(section, its doc, its own keys)], `cls` first; a nested config dataclass is a section of its own."""
    hints, source = typing.get_type_hints(cls), _field_source(cls)
    own: list[KeyDoc] = []
    nested: list[tuple[str, str, list[KeyDoc]]] = []
    for f in dataclasses.fields(cls):
        annotation, field_doc = source.get(f.name, (str(f.type), ""))
        if dataclasses.is_dataclass(hints[f.name]):
            nested += _sections(hints[f.name], f"{prefix}{f.name}.", field_doc)
        else:
            own.append(KeyDoc(prefix + f.name, annotation, _default(f), field_doc))
    return [(prefix.rstrip("."), doc, own)] + nested


def config_keys(cls: type = RunConfig) -> list[KeyDoc]:
    """Every settable dotted key of config dataclass `cls`, with its type, default and doc."""
    return [k for _, _, keys in _sections(cls) for k in keys]


def config_help(cls: type = RunConfig, width: int = 100) -> str:
    """Every key of `cls` grouped by section, as an argparse epilog (use `RawDescriptionHelpFormatter`)."""
    lines = ["config keys (set with KEY=VALUE; precedence: defaults < --config FILE < KEY=VALUE):"]
    for section, section_doc, keys in _sections(cls):
        if section:
            lines += ["", f"{section}: {section_doc}".rstrip()]
        for k in keys:
            lines.append(f"  {k.key} ({k.type}, default {k.default})")
            for paragraph in k.doc.split("\n\n"):
                lines += textwrap.wrap(paragraph, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
