"""Errors that name the file, the line, the field path and the offending value.

Every way into a ``ModelConfig`` (a file, a ``--set`` override, a checkpoint's ``io.json``) ends
in ``ConfigError``: a list of ``ConfigIssue`` records that render as ``FILE:LINE: field: message
(got VALUE)`` for people and as plain dicts for pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class ConfigIssue:
    """One problem with a config: where it is, what is wrong, and the value found there."""

    message: str
    type: str
    loc: tuple[str | int, ...] = ()
    input: Any = None
    source: str | None = None  # a file path, or the override / checkpoint the value came from
    line: int | None = None

    @property
    def field(self) -> str:
        """The field path in dotted form, ``override_parent_fields.2``."""
        return ".".join(str(part) for part in self.loc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "line": self.line,
            "field": self.field,
            "loc": list(self.loc),
            "message": self.message,
            "type": self.type,
            "input": _jsonable(self.input),
        }

    def __str__(self) -> str:
        where = self.source or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        field = f" {self.field}:" if self.loc else ""
        got = "" if self.input is None else f" (got {_short_repr(self.input)})"
        return f"{where}:{field} {self.message}{got}"


class ConfigError(ValueError):
    """A config that cannot be read or is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Iterable[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def to_list(self) -> list[dict[str, Any]]:
        return [issue.to_dict() for issue in self.issues]


class ConfigReadError(ConfigError):
    """The input could not be read or parsed at all (missing file, bad JSON/YAML, not a mapping)."""


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


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    """The offending input as JSON data (a whole-config dict input is summarized, not echoed)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
