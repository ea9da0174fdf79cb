"""Config files: JSON or YAML in, canonical JSON out, with file names and lines in every error."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bioconf.errors import BioconfError, ConfigIssue, ConfigReadError
from bioconf.fs import read_bytes, write_atomic
from bioconf.schema.model import ModelConfig, validate_with_overrides

YAML_SUFFIXES = (".yaml", ".yml")


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


@dataclass(frozen=True)
class ConfigDocument:
    """A parsed config file: its top-level mapping and where each top-level key stands."""

    source: str
    data: dict[str, Any]
    key_lines: Callable[[str], int | None]


def read_document(path: str | os.PathLike[str]) -> ConfigDocument:
    """Parse a JSON or YAML config file (by suffix; JSON otherwise) into a mapping."""
    source = os.fspath(path)
    raw = read_bytes(source)
    if source.endswith(YAML_SUFFIXES):
        return parse_yaml_document(raw, source)
    return parse_json_document(raw, source)


def loads_json(raw: bytes | str, source: str, error: type[BioconfError] = ConfigReadError) -> Any:
    """Parse JSON; malformed input raises ``error`` naming the file and the line."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as failure:
        line = raw.count(b"\n" if isinstance(raw, bytes) else "\n", 0, failure.pos) + 1
        raise error.one(f"invalid JSON: {failure.msg}", "json_invalid", source=source, line=line) from None


def parse_json_document(raw: bytes | str, source: str) -> ConfigDocument:
    data = loads_json(raw, source)
    _require_mapping(data, source)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw

    def key_lines(key: str) -> int | None:
        match = re.search(rf'"{re.escape(key)}"\s*:', text)
        return text.count("\n", 0, match.start()) + 1 if match else None

    return ConfigDocument(source, data, key_lines)


def parse_yaml_document(raw: bytes, source: str) -> ConfigDocument:
    """Parse YAML safely (no Python tags) into a mapping with the line of each top-level key; values
    JSON cannot hold (integers beyond 64 bits, NaN, infinity) are errors, as they are in JSON."""
    import yaml  # only YAML input pays for the import

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed
        """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), as JSON does."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
    loader = Loader(raw)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigReadError(
            [
                ConfigIssue(
                    f"invalid YAML: {problem}",
                    "yaml_invalid",
                    source=source,
                    line=mark.line + 1 if mark else None,
                )
            ]
        ) from None
    finally:
        loader.dispose()
    _require_mapping(data, source)
    lines: dict[str, int] = {}
    duplicates = []
    for key_node, _ in node.value:
        if key_node.value in lines:
            duplicates.append(
                ConfigIssue(
                    f"key {key_node.value!r} appears twice (first on line {lines[key_node.value]})",
                    "duplicate_key",
                    loc=(key_node.value,),
                    source=source,
                    line=key_node.start_mark.line + 1,
                )
            )
        lines.setdefault(key_node.value, key_node.start_mark.line + 1)
    if duplicates:
        raise ConfigReadError(duplicates)
    outside = [(key, value) for key, value in data.items() if not _json_number_safe(value)]
    if outside:
        raise ConfigReadError(
            [
                ConfigIssue(
                    "a number JSON cannot hold (beyond 64 bits, NaN or infinity)",
                    "number_out_of_range",
                    loc=(key,),
                    input=repr(value),
                    source=source,
                    line=lines.get(key),
                )
                for key, value in outside
            ]
        )
    return ConfigDocument(source, data, lines.get)


def _json_number_safe(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_number_safe(item) for item in value)
    if isinstance(value, dict):
        return all(_json_number_safe(item) for item in value.values())
    return True


def _require_mapping(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigReadError(
            [
                ConfigIssue(
                    f"a config must be a mapping of field names to values, not {type(data).__name__}",
                    "not_a_mapping",
                    source=source,
                    line=1,
                )
            ]
        )


def validate_document(
    document: ConfigDocument, overrides: Iterable[str | Mapping[str, Any]] = ()
) -> ModelConfig:
    """Apply overrides to a parsed document and validate the result; errors name the file and line,
    or the override."""
    return validate_with_overrides(document.data, overrides, document.source, document.key_lines)


def load_config(
    path: str | os.PathLike[str], overrides: Iterable[str | Mapping[str, Any]] = ()
) -> ModelConfig:
    """Read, validate and (optionally) override a JSON or YAML config file."""
    return validate_document(read_document(path), overrides)


def save_config(config: ModelConfig, path: str | os.PathLike[str]) -> None:
    """Write the canonical JSON (or YAML, by suffix) of ``config`` atomically."""
    data = config.to_dict(exclude_unset=True)  # what was set, so it reloads with the same explicit fields
    if os.fspath(path).endswith(YAML_SUFFIXES):
        import yaml

        payload = yaml.safe_dump(dict(sorted(data.items())), sort_keys=False).encode()
    else:
        payload = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    write_atomic(path, payload)
