"""Dotted overrides for pipelines and the CLI: ``hidden_size=512``, ``override_parent_fields+=["seq_length"]``.

A value is read as JSON when it parses (``512``, ``true``, ``null``, ``[1, 2]``, ``"3"``) and as a
plain string otherwise (``bf16``, ``bert``). ``+=`` appends to a list field (a list value extends
it). All overrides are applied, then the config is validated as a whole; an error names the
override that caused it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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


def apply_overrides(config: ModelConfig, overrides: Iterable[str | Mapping[str, Any]]) -> ModelConfig:
    """A new config: ``config``'s explicit fields, then each override in order, validated as a whole."""
    data = config.explicit_fields()
    origin: dict[str, str] = {}  # field -> the override text that last set it
    for override in overrides:
        if isinstance(override, Mapping):
            for key, value in override.items():
                data[key] = value
                origin[key] = f"{key}={value!r}"
            continue
        match = _OVERRIDE.match(override)
        if match is None:
            raise OverrideError(
                [ConfigIssue("expected KEY=VALUE or KEY+=VALUE", "override_syntax", input=override,
                             source=f"--set {override}")]
            )
        key, op, value = match["key"], match["op"], parse_value(match["value"])
        if "." in key:
            raise OverrideError(
                [ConfigIssue(f"{key!r}: ModelConfig is flat; nested keys are not supported", "override_syntax",
                             loc=(key,), input=override, source=f"--set {override}")]
            )
        if op == "+=":
            current = data.get(key, getattr(config, key, None))
            if current is not None and not isinstance(current, (list, tuple)):
                raise OverrideError(
                    [ConfigIssue(f"+= needs a list field; {key} holds {type(current).__name__}",
                                 "override_syntax", loc=(key,), input=override, source=f"--set {override}")]
                )
            value = [*(current or ()), *(value if isinstance(value, list) else [value])]
        data[key] = value
        origin[key] = override
    try:
        return type(config).model_validate(data)
    except ValidationError as error:
        issues = issues_from_validation(error)
        raise OverrideError(
            [
                ConfigIssue(
                    issue.message,
                    issue.type,
                    issue.loc,
                    issue.input,
                    source=f"--set {origin[str(issue.loc[0])]}" if issue.loc and str(issue.loc[0]) in origin else None,
                )
                for issue in issues
            ]
        ) from None
