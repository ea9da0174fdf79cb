"""Overrides for pipelines and the CLI: ``hidden_size=512``, ``override_parent_fields+=["seq_length"]``.

A value is read as JSON when it parses (``512``, ``true``, ``null``, ``[1, 2]``, ``"3"``) and as a
plain string otherwise (``bf16``, ``bert``). ``+=`` appends to a list field (a list value extends
it). All overrides are applied, then the config is validated as a whole; an error names the
override that caused it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from bioconf.schema.errors import ConfigError, ConfigIssue, issues_from_validation

if TYPE_CHECKING:
    from bioconf.schema.model import ModelConfig

_OVERRIDE = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*(?P<op>\+?=)(?P<value>.*)$", re.DOTALL)


class OverrideError(ConfigError):
    """An override that cannot be parsed or makes the config invalid."""


def parse_value(text: str) -> Any:
    """JSON if it parses, else the stripped text as a string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.strip()


def merge_overrides(
    data: Mapping[str, Any], overrides: Iterable[str | Mapping[str, Any]]
) -> tuple[dict, dict]:
    """``data`` with each override applied in order, and which override last set each key."""
    from bioconf.schema.model import ModelConfig

    merged = dict(data)
    origin: dict[str, str] = {}
    for override in overrides:
        if isinstance(override, Mapping):
            for key, value in override.items():
                merged[key] = value
                origin[key] = f"{key}={value!r}"
            continue
        match = _OVERRIDE.match(override)
        if match is None:
            raise OverrideError([_syntax_issue(override, "expected KEY=VALUE or KEY+=VALUE")])
        key, op, value = match["key"], match["op"], parse_value(match["value"])
        if "." in key:
            raise OverrideError(
                [_syntax_issue(override, f"{key!r}: the config is flat; nested keys are not supported")]
            )
        if op == "+=":
            field = ModelConfig.model_fields.get(key)
            current = merged[key] if key in merged else field and field.get_default(call_default_factory=True)
            if current is not None and not isinstance(current, (list, tuple)):
                raise OverrideError(
                    [_syntax_issue(override, f"+= needs a list field; {key} holds {type(current).__name__}")]
                )
            value = [*(current or ()), *(value if isinstance(value, list) else [value])]
        merged[key] = value
        origin[key] = override
    return merged, origin


def validate_with_overrides(
    data: Mapping[str, Any],
    overrides: Iterable[str | Mapping[str, Any]] = (),
    source: str | None = None,
    line_of: Callable[[str], int | None] | None = None,
) -> ModelConfig:
    """Apply the overrides to ``data`` and validate the result as a whole. Each error is attributed to
    the override that set its field, else to ``source`` (and its line)."""
    from bioconf.schema.model import ModelConfig

    merged, origin = merge_overrides(data, overrides)
    try:
        return ModelConfig.model_validate(merged)
    except ValidationError as error:
        issues = []
        for issue in issues_from_validation(error, source, line_of):
            key = str(issue.loc[0]) if issue.loc else ""
            if key in origin:
                issue = replace(issue, source=f"--set {origin[key]}", line=None)
            issues.append(issue)
        blamed_override = any(issue.source and issue.source.startswith("--set ") for issue in issues)
        raise (OverrideError if blamed_override else ConfigError)(issues) from None


def _syntax_issue(override: str, message: str) -> ConfigIssue:
    return ConfigIssue(message, "override_syntax", input=override, source=f"--set {override}")
