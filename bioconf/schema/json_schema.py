"""JSON Schema (draft 2020-12) of ``ModelConfig`` for UIs that render a form from it.

Every property carries a title, megatron's description, its default and type (with ``enum``
for names); ``x-group`` and ``x-level`` (basic/advanced) place it in a form. The top-level
``x-groups`` gives the groups' order and titles.

The schema may be looser than bioconf (it cannot say megatron's cross-field rules) but never
stricter: every document bioconf accepts validates against it. Hence the name fields accept every
spelling bioconf does (``bioconf.schema.names``), and pydantic's patterns, which run on Rust's
Unicode-aware regex engine, are rewritten to mean at least as much in ECMA-262.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import StringConstraints
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode

from bioconf.schema.groups import GROUPS
from bioconf.schema.model import BIONEMO_ONLY_FIELDS, ModelConfig

DRAFT = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    schema_dialect = DRAFT


def json_schema(mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """The JSON Schema of ModelConfig, with form groups."""
    schema = ModelConfig.model_json_schema(schema_generator=_Generator, mode=mode)
    schema["$schema"] = DRAFT
    schema["$id"] = "https://bioconf.dev/schema/model-config.json"
    schema["description"] = (ModelConfig.__doc__ or "").split("\n\n")[0].replace("\n", " ").strip()
    # A UI can offer the field names as choices for the keep-list.
    schema["properties"]["override_parent_fields"]["items"]["enum"] = sorted(
        ModelConfig.model_fields.keys() | BIONEMO_ONLY_FIELDS
    )
    # ModelConfig rejects a name or prefix listed twice; so can the schema.
    for name in ("override_parent_fields", "initial_ckpt_skip_keys_with_these_prefixes"):
        schema["properties"][name]["uniqueItems"] = True
    schema["x-groups"] = [{"name": name, "title": title} for name, title in GROUPS.items()]
    for prop in schema["properties"].values():
        _flatten_any_of(prop)
    _portable_patterns(schema, _pydantic_patterns())
    return schema


def _flatten_any_of(prop: dict[str, Any]) -> None:
    """``anyOf: [{anyOf: [names, spellings]}, null]`` (a nullable name field) as one level, which is
    what a form reads: the canonical names' ``enum`` among the property's own ``anyOf``."""
    options: list[dict[str, Any]] = []
    for option in prop.get("anyOf", []):
        if "anyOf" in option and all(key == "anyOf" or key.startswith("x-") for key in option):
            options.extend(option.pop("anyOf"))
            prop.update(option)  # x-aliases
        else:
            options.append(option)
    if options:
        prop["anyOf"] = options


def _pydantic_patterns() -> set[str]:
    """The ``pattern``s ModelConfig's fields give pydantic (which the schema repeats as they are)."""
    found: set[str] = set()

    def visit(item: Any) -> None:
        if isinstance(item, StringConstraints) and item.pattern:
            found.add(str(item.pattern))
        for arg in typing.get_args(item):
            visit(arg)

    for info in ModelConfig.model_fields.values():
        visit(info.annotation)
        for item in info.metadata:
            visit(item)
    return found


# Rust's \w, \d and \s are Unicode-aware; ECMA-262's \w and \d are ASCII and its \s lacks \x85.
# Outside a character class each becomes a superset in both ECMA-262 and Python; `.` matches \r
# and the line separators in Rust, not in ECMA-262.
_PORTABLE = {"w": r"(?:\w|[^\x00-\x7F])", "d": r"(?:\d|[^\x00-\x7F])", "s": r"(?:\s|\x85)", ".": r"[^\n]"}


def _portable(pattern: str) -> str:
    """A Rust-regex ``pattern`` rewritten to match at least the same strings in ECMA-262; a construct
    this does not know raises, so that the schema never silently gets stricter than bioconf."""
    out: list[str] = []
    in_class = False
    index = 0
    while index < len(pattern):
        ch = pattern[index]
        token = pattern[index : index + 2] if ch == "\\" else ch
        index += len(token)
        if token == "[" and not in_class:
            in_class = True
        elif token == "]" and in_class:
            in_class = False
        elif token == "(" and pattern.startswith("?", index) and not pattern.startswith("?:", index):
            raise ValueError(f"pattern {pattern!r}: no portable form of its (?...) group")
        elif len(token) == 2 and token[1].isalnum():
            if token[1] not in _PORTABLE or in_class:
                raise ValueError(f"pattern {pattern!r}: no portable form of {token}")
            token = _PORTABLE[token[1]]
        elif token == "." and not in_class:
            token = _PORTABLE["."]
        out.append(token)
    return "".join(out)


def _portable_patterns(node: Any, rust_patterns: set[str]) -> None:
    """Rewrite, in place, the patterns that came from pydantic's field constraints."""
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str) and node["pattern"] in rust_patterns:
            node["pattern"] = _portable(node["pattern"])
        for value in node.values():
            _portable_patterns(value, rust_patterns)
    elif isinstance(node, list):
        for value in node:
            _portable_patterns(value, rust_patterns)
