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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

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
        """The field path in dotted form, ``override_parent_fields.2``."""
        return ".".join(str(part) for part in self.loc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "line": self.line,
            "field": self.field,
            "loc": [part if isinstance(part, (str, int)) else str(part) for part in self.loc],
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


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    """The offending input as JSON data (a whole-config dict input is summarized, not echoed)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)  # what orjson can write
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
