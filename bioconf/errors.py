"""Every error bioconf raises on purpose, and what it means to a pipeline.

An error is a list of ``ConfigIssue`` records (file, line, field path, message, offending value)
that render as ``FILE:LINE: field: message (got VALUE)`` for people and as plain dicts for
pipelines. Each class carries its CLI exit code and its RFC 9457 problem (kind, HTTP status,
title): the CLI and the service read them from here and map nothing themselves.

    BioconfError
    ├── ConfigError              1  422 invalid-config      a config that is invalid
    │   ├── ConfigReadError      2  400 unreadable-config   input that cannot be read at all
    │   ├── OverrideError        1  422 invalid-config      a --set that cannot apply
    │   └── InvalidMergeError    1  409 invalid-merge       config + checkpoint break a rule
    ├── UsageError               2  400 invalid-request     arguments that do not make sense
    ├── CheckpointError          2  422 invalid-checkpoint  a checkpoint that cannot be read
    │   ├── CheckpointNotFoundError   2  404 checkpoint-not-found
    │   └── CheckpointForbiddenError  2  403 forbidden-checkpoint
    ├── CheckpointMismatchError  3  409 checkpoint-mismatch the checkpoint does not fit the config
    │   └── WeightsError         3  409 checkpoint-mismatch  (found while planning the weight load)
    └── OutputError              2  500 output-error        an output that cannot be written
        └── OutputExistsError    2  409 output-exists       refusing to replace an output
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from pydantic import ValidationError

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3
"""The CLI's exit codes: done, invalid config, usage error or unreadable input, checkpoint misfit."""

PROBLEM_BASE = "https://bioconf.dev/problems/"
"""RFC 9457 problem types are ``PROBLEM_BASE + kind``."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where it is, what is wrong, and the value found there."""

    message: str
    type: str
    loc: tuple[str | int, ...] = ()
    input: Any = None
    source: str | None = None  # a file path, or the override / checkpoint the value came from
    line: int | None = None

    @property
    def field(self) -> str:
        """The field path in dotted form, ``override_parent_fields.2`` (each part shortened)."""
        return ".".join(_part_text(part) for part in self.loc)

    def to_dict(self) -> dict[str, Any]:
        """The issue as JSON data that orjson always writes: whatever the input was (deep, huge,
        cyclic, integers beyond 64 bits), it comes out bounded (``jsonable``)."""
        return {
            "source": self.source,
            "line": self.line,
            "field": self.field,
            "loc": [part if _is_json_int(part) else _part_text(part) for part in self.loc],
            "message": _truncate(self.message, MAX_MESSAGE_CHARS),
            "type": self.type,
            "input": jsonable(self.input),
        }

    def __str__(self) -> str:
        where = self.source or ("<config>" if self.loc or self.line else "")
        if self.line is not None:
            where += f":{self.line}"
        field = f" {self.field}:" if self.loc else ""
        got = "" if self.input is None else f" (got {short_repr(self.input)})"
        text = f"{_truncate(self.message, MAX_MESSAGE_CHARS)}{got}"
        return (f"{where}:{field} {text}" if where else text).translate(_ONE_LINE)


class BioconfError(Exception):
    """Base of bioconf's errors: ``issues`` lists every problem found."""

    exit_code: ClassVar[int] = EXIT_INVALID
    kind: ClassVar[str] = "invalid-config"
    status: ClassVar[int] = 422
    title: ClassVar[str] = "Invalid config"

    def __init__(self, issues: Iterable[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def one(cls, message: str, type: str, source: Any = None, **details: Any) -> BioconfError:
        """The error with a single issue (``source`` may be a path)."""
        return cls([ConfigIssue(message, type, source=None if source is None else str(source), **details)])

    def to_list(self) -> list[dict[str, Any]]:
        return [issue.to_dict() for issue in self.issues]

    @property
    def problem_type(self) -> str:
        return PROBLEM_BASE + self.kind


class ConfigError(BioconfError, ValueError):
    """A config that is invalid."""


class ConfigReadError(ConfigError):
    """The input could not be read or parsed at all (missing file, bad JSON/YAML, not a mapping)."""

    exit_code = EXIT_USAGE
    kind, status, title = "unreadable-config", 400, "The body is not a readable config"


class OverrideError(ConfigError):
    """An override that cannot be parsed or makes the config invalid."""


class InvalidMergeError(ConfigError):
    """Config and checkpoint are each valid, but their merge breaks a megatron rule."""

    kind, status, title = "invalid-merge", 409, "The config merged with the checkpoint breaks a rule"


class UsageError(BioconfError):
    """Arguments that do not make sense together (no checkpoint named, an unknown policy)."""

    exit_code = EXIT_USAGE
    kind, status, title = "invalid-request", 400, "Invalid request"


class CheckpointError(BioconfError):
    """A checkpoint that cannot be read, or holds values bioconf rejects."""

    exit_code = EXIT_USAGE
    kind, status, title = "invalid-checkpoint", 422, "Invalid checkpoint"


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint (or not the part asked for) at the path given."""

    kind, status, title = "checkpoint-not-found", 404, "Checkpoint not found"


class CheckpointForbiddenError(CheckpointError):
    """A checkpoint path outside the folders this process may read."""

    kind, status, title = "forbidden-checkpoint", 403, "Checkpoint path not allowed"


class CheckpointMismatchError(BioconfError):
    """The config builds weights the checkpoint does not hold (other shapes, missing keys)."""

    exit_code = EXIT_MISMATCH
    kind, status, title = "checkpoint-mismatch", 409, "The checkpoint's weights do not fit the config"


class WeightsError(CheckpointMismatchError):
    """The checkpoint's weights cannot be loaded into the model (raised before any weight changes)."""


class OutputError(BioconfError):
    """An output (a checkpoint, a schema file) that cannot be written."""

    exit_code = EXIT_USAGE
    kind, status, title = "output-error", 500, "The output cannot be written"


class OutputExistsError(OutputError, FileExistsError):
    """An output (a checkpoint, its context) exists and replacing it was not asked for."""

    exit_code = EXIT_USAGE
    kind, status, title = "output-exists", 409, "The output exists"


def issues_from_validation(
    error: ValidationError,
    source: str | None = None,
    line_of: Callable[[str], int | None] | None = None,
) -> list[ConfigIssue]:
    """Turn pydantic's errors into ConfigIssues; ``line_of(field)`` finds the line in the file."""
    issues = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        top = str(loc[0]) if loc else ""
        issues.append(
            ConfigIssue(
                message=item["msg"],
                type=item["type"],
                loc=loc,
                input=item.get("input"),
                source=source,
                line=line_of(top) if (line_of and top) else None,
            )
        )
    return issues


# ---- showing what was found: bounded, whatever it is ----------------------------------------------

MAX_SHOWN_DEPTH: Final = 8
"""Nesting shown of an offending input; deeper containers are shown as ``[...]`` / ``{...}``."""
MAX_SHOWN_ITEMS: Final = 50
"""Items shown of one list or mapping (then how many more there were)."""
MAX_SHOWN_VALUES: Final = 500
"""Values shown of one input in all: with depth and items alone, 50 ** 8 could still be shown."""
MAX_SHOWN_CHARS: Final = 500
"""Characters shown of one string (a key, a value, a field name)."""
MAX_MESSAGE_CHARS: Final = 2000
"""Characters shown of one message: messages quote what they found, and an issue is one line."""
_MAX_INT_BITS: Final = 4000
"""Integers up to here are written in decimal (1205 digits); Python refuses to convert longer ones."""


_ONE_LINE: Final = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
"""What ``str.splitlines`` breaks at, escaped: an issue reads as one line whatever a file name, an
override or a message holds."""


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_json_int(value: Any) -> bool:
    """An int orjson can write (bool is written as itself)."""
    return type(value) is int and -(2**63) <= value < 2**64


def _int_text(value: int) -> str:
    """An integer as text, without Python's limit on converting long integers to decimal."""
    bits = value.bit_length()
    return str(value) if bits <= _MAX_INT_BITS else f"<{'-' if value < 0 else ''}integer of {bits} bits>"


def _part_text(part: Any) -> str:
    """One part of a field path as (short) text."""
    if isinstance(part, str):
        return _truncate(part, MAX_SHOWN_CHARS)
    if isinstance(part, int) and not isinstance(part, bool):
        return _truncate(_int_text(part), MAX_SHOWN_CHARS)
    return short_repr(part, MAX_SHOWN_CHARS)


class _BoundedRepr(reprlib.Repr):
    """``repr`` bounded in depth and width, whose integers never hit Python's digit limit. Its
    limits are wide enough that a value whose full repr fits in a message reads as ``repr`` would."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = MAX_SHOWN_DEPTH
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = MAX_SHOWN_ITEMS
        self.maxset = self.maxfrozenset = self.maxdeque = MAX_SHOWN_ITEMS
        self.maxstring = self.maxlong = self.maxother = MAX_SHOWN_CHARS

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        """In insertion order, as ``repr`` (reprlib sorts the keys)."""
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        pieces = [
            f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}"
            for key, value in itertools.islice(x.items(), self.maxdict)
        ]
        if len(x) > self.maxdict:
            pieces.append("...")
        return "{" + ", ".join(pieces) + "}"

    def repr_int(self, x: int, level: int) -> str:
        return _truncate(_int_text(x), self.maxlong)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return _truncate(repr(x), self.maxother)
        except Exception:  # a repr that fails (or recurses) must not hide the error being shown
            return f"<{type(x).__name__} instance>"


_REPR: Final = _BoundedRepr()


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters; bounded work whatever ``value`` is."""
    try:
        text = _REPR.repr(value)
    except Exception:  # RecursionError from a pathological __repr__, a comparison in sorting keys
        text = f"<{type(value).__name__}>"
    return _truncate(text, limit)


def jsonable(value: Any) -> Any:
    """``value`` as JSON data orjson always writes, bounded: MAX_SHOWN_DEPTH levels, MAX_SHOWN_ITEMS
    items per container, MAX_SHOWN_VALUES values in all, MAX_SHOWN_CHARS per string; integers beyond
    64 bits as text, keys as text, anything else by its (short) repr. A cycle ends at the depth limit."""
    budget = [MAX_SHOWN_VALUES]
    return _bounded(value, 0, budget)


def _bounded(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _truncate(value, MAX_SHOWN_CHARS)
    if isinstance(value, int):
        return int(value) if _is_json_int(int(value)) else _truncate(_int_text(value), MAX_SHOWN_CHARS)
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple, dict)):
        if depth >= MAX_SHOWN_DEPTH or budget[0] <= 0:
            return "{...}" if isinstance(value, dict) else "[...]"
        shown = min(len(value), MAX_SHOWN_ITEMS, max(budget[0], 1))
        more = len(value) - shown
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for index, (key, item) in enumerate(value.items()):
                if index == shown:
                    break
                out[key if isinstance(key, str) and len(key) <= MAX_SHOWN_CHARS else _part_text(key)] = (
                    _bounded(item, depth + 1, budget)
                )
            if more:
                out["..."] = f"{more} more"
            return out
        items = [_bounded(value[index], depth + 1, budget) for index in range(shown)]
        return [*items, f"... {more} more"] if more else items
    return short_repr(value, MAX_SHOWN_CHARS)
