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
from bioconf.schema.overrides import MAX_DEPTH, MAX_STRING_CHARS, MAX_VALUES, limit_breach

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
    """Parse a JSON config into a mapping, within the limits of ``bioconf.schema.overrides`` (depth,
    values, string length), checked before anything else walks the data."""
    data = loads_json(raw, source)
    _require_mapping(data, source)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    index: list[dict[str, int]] = []

    def key_lines(key: str) -> int | None:
        if not index:  # one pass over the text, the first time a line is asked for
            index.append(_json_key_lines(text))
        return index[0].get(key)

    breach = limit_breach(data)
    if breach:
        message, kind, key = breach
        raise ConfigReadError(
            [
                ConfigIssue(
                    message,
                    kind,
                    loc=(key,) if isinstance(key, str) else (),
                    source=source,
                    line=key_lines(key) if isinstance(key, str) else None,
                )
            ]
        )
    return ConfigDocument(source, data, key_lines)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_COLON = re.compile(r"\s*:")


def _json_key_lines(text: str) -> dict[str, int]:
    """The line of the first occurrence of each key in a JSON text, in one pass: its strings are
    read in order, so a key-like sequence inside a string value is never taken for a key."""
    lines: dict[str, int] = {}
    line, counted = 1, 0
    for match in _JSON_STRING.finditer(text):
        if not _COLON.match(text, match.end()):
            continue
        line += text.count("\n", counted, match.start())
        counted = match.start()
        try:
            key = orjson.loads(match.group())
        except orjson.JSONDecodeError:
            continue
        lines.setdefault(key, line)
    return lines


def parse_yaml_document(raw: bytes, source: str) -> ConfigDocument:
    """Parse YAML safely (no Python tags) into a mapping with the line of each top-level key; values
    JSON cannot hold (integers beyond 64 bits, NaN, infinity) are errors, as they are in JSON.

    The document is composed from the parser's events here (``_compose_yaml``), not by PyYAML's
    recursive composer, so the limits of ``bioconf.schema.overrides`` hold before any Python value
    is built: an alias counts as the whole collection it names, so a few hundred bytes that expand
    into a billion values are refused after MAX_VALUES, and an alias inside the collection it names
    (a recursive structure) is refused outright."""
    import yaml  # only YAML input pays for the import

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed
        """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), as JSON does."""

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            """A value Python refuses to build (a date out of range) is a YAML error at its line."""
            try:
                return super().construct_object(node, deep)
            except (ValueError, ArithmeticError, TypeError) as error:
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read this value: {error}", node.start_mark
                ) from None

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
    Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    loader = Loader(raw)
    try:
        node = _compose_yaml(loader, yaml, source)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(error, "problem", None) or str(error)
        if isinstance(error, yaml.reader.ReaderError):  # bytes that are not text: no mark, and two lines
            problem = f"{error.reason} (byte {error.position})"
            line = raw[: error.position].count(b"\n") + 1 if isinstance(raw, bytes) else None
        raise ConfigReadError(
            [ConfigIssue(f"invalid YAML: {problem}", "yaml_invalid", source=source, line=line)]
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
    outside = [
        (key, value)
        for key, value in data.items()
        if not (_json_number_safe(key) and _json_number_safe(value))
    ]
    if outside:
        raise ConfigReadError(
            [
                ConfigIssue(
                    "a number JSON cannot hold (beyond 64 bits, NaN or infinity)",
                    "number_out_of_range",
                    loc=(key,),
                    input=repr(value),
                    source=source,
                    line=lines.get(key if isinstance(key, str) else _scalar_text(key)),
                )
                for key, value in outside
            ]
        )
    return ConfigDocument(source, data, lines.get)


class _HugeInt:
    """A YAML integer too long for Python to read in decimal (over 4,300 digits): kept as its text,
    so that it is reported as a number JSON cannot hold, with its key and line."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"<an integer of {len(self.text)} characters>"


def _construct_int(loader: Any, node: Any) -> Any:
    from yaml.constructor import SafeConstructor

    try:
        return SafeConstructor.construct_yaml_int(loader, node)
    except ValueError:
        if len(node.value) > 4000:
            return _HugeInt(node.value)
        raise


def _compose_yaml(loader: Any, yaml: Any, source: str) -> Any:
    """The single document's node graph, composed from the parser's events in a loop (PyYAML's
    composer recurses once per level) and within the limits, or None for an empty stream.

    Each finished node's extent (values, levels) is kept: an alias adds the extent of the node it
    names, which is how a small document that expands into a huge one is caught while composing. A
    collection's extent is known only when it ends, so an alias to one still open (a collection
    that contains itself) has none: refused."""
    events = yaml.events
    loader.get_event()  # StreamStartEvent
    if loader.check_event(events.StreamEndEvent):
        return None
    loader.get_event()  # DocumentStartEvent
    anchors: dict[str, Any] = {}
    extent: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels), once the node is complete
    open_nodes: list[list[Any]] = []  # [node, values, levels, pending mapping key]
    total, root, top_key = 0, None, None

    def refuse(message: str, kind: str, mark: Any) -> ConfigReadError:
        loc = (top_key,) if isinstance(top_key, str) else ()
        return ConfigReadError([ConfigIssue(message, kind, loc=loc, source=source, line=mark.line + 1)])

    def anchor(name: str | None, node: Any, mark: Any) -> None:
        if name is None:
            return
        if name in anchors:
            first = anchors[name].start_mark.line + 1
            raise yaml.composer.ComposerError(
                None, None, f"found duplicate anchor {name!r} (first on line {first})", mark
            )
        anchors[name] = node

    def attach(node: Any) -> None:
        nonlocal root, top_key
        if not open_nodes:
            root = node
            return
        parent = open_nodes[-1]
        if isinstance(parent[0], yaml.SequenceNode):
            parent[0].value.append(node)
        elif parent[3] is None:
            parent[3] = node
            if len(open_nodes) == 1:
                top_key = node.value if isinstance(node, yaml.ScalarNode) else None
        else:
            parent[0].value.append((parent[3], node))
            parent[3] = None

    def count(values: int, levels: int, mark: Any) -> None:
        """Count a value of ``values`` values and ``levels`` levels that starts inside the open nodes."""
        nonlocal total
        total += values
        if total > MAX_VALUES:
            raise refuse(
                f"more than {MAX_VALUES} values (YAML aliases counted at each use)", "too_many_values", mark
            )
        if len(open_nodes) + levels > MAX_DEPTH:
            raise refuse(f"nested deeper than {MAX_DEPTH} levels", "too_deep", mark)

    def add(values: int, levels: int) -> None:
        """Add a complete value's extent to the innermost open node's."""
        parent = open_nodes[-1]
        parent[1] += values
        parent[2] = max(parent[2], levels + 1)

    while True:
        event = loader.get_event()
        if isinstance(event, events.ScalarEvent):
            if len(event.value) > MAX_STRING_CHARS:
                message = f"a string of {len(event.value)} characters (at most {MAX_STRING_CHARS})"
                raise refuse(message, "too_long", event.start_mark)
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
            node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
            anchor(event.anchor, node, event.start_mark)
            count(1, 1, event.start_mark)
            extent[id(node)] = (1, 1)
            attach(node)
            if open_nodes:
                add(1, 1)
        elif isinstance(event, events.AliasEvent):
            node = anchors.get(event.anchor)
            if node is None:
                raise yaml.composer.ComposerError(
                    None, None, f"found undefined alias {event.anchor!r}", event.start_mark
                )
            if id(node) not in extent:
                raise refuse(
                    f"the alias *{event.anchor} is inside the collection it names (a recursive structure)",
                    "recursive_alias",
                    event.start_mark,
                )
            count(*extent[id(node)], event.start_mark)
            attach(node)
            if open_nodes:
                add(*extent[id(node)])
        elif isinstance(event, (events.SequenceStartEvent, events.MappingStartEvent)):
            kind = yaml.SequenceNode if isinstance(event, events.SequenceStartEvent) else yaml.MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(kind, None, event.implicit)
            node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
            anchor(event.anchor, node, event.start_mark)
            attach(node)
            count(1, 1, event.start_mark)
            open_nodes.append([node, 1, 1, None])
        elif isinstance(event, (events.SequenceEndEvent, events.MappingEndEvent)):
            node, values, levels, _ = open_nodes.pop()
            node.end_mark = event.end_mark
            extent[id(node)] = (values, levels)
            if open_nodes:
                add(values, levels)
        else:  # DocumentEndEvent: a document holds one node, so nothing is open
            break
    if not loader.check_event(events.StreamEndEvent):
        raise yaml.composer.ComposerError(
            None, None, "expected a single document, but found another", loader.get_event().start_mark
        )
    return root


def _scalar_text(key: Any) -> str | None:
    """A key as YAML wrote it, where that is its Python text (an integer key), for its line."""
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() < 10_000:
        return str(key)
    return None


def _json_number_safe(value: Any) -> bool:
    if isinstance(value, _HugeInt):
        return False
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_number_safe(item) for item in value)
    if isinstance(value, dict):
        return all(_json_number_safe(key) and _json_number_safe(item) for key, item in value.items())
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
