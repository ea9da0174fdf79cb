"""Overrides for pipelines and the CLI: ``hidden_size=512``, ``override_parent_fields+=["seq_length"]``.

A value is read as JSON when it parses (``512``, ``true``, ``null``, ``[1, 2]``, ``"3"``) and as a
plain string otherwise (``bf16``, ``bert``). ``+=`` appends to a list field (a list value extends
it). All overrides are applied, then the config is validated as a whole; an error names the
override that caused it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from bioconf.errors import ConfigIssue, OverrideError

_OVERRIDE = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*(?P<op>\+?=)(?P<value>.*)$", re.DOTALL)


def parse_value(text: str) -> Any:
    """JSON if it parses, else the stripped text as a string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.strip()


def merge_overrides(
    data: Mapping[str, Any],
    overrides: Iterable[str | Mapping[str, Any]],
    default_of: Callable[[str], Any] = lambda key: None,
) -> tuple[dict, dict]:
    """``data`` with each override applied in order, and which override last set each key.
    ``default_of(key)`` is the value ``+=`` extends when ``data`` does not set ``key``."""
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
            current = merged[key] if key in merged else default_of(key)
            if current is not None and not isinstance(current, (list, tuple)):
                raise OverrideError(
                    [_syntax_issue(override, f"+= needs a list field; {key} holds {type(current).__name__}")]
                )
            value = [*(current or ()), *(value if isinstance(value, list) else [value])]
        merged[key] = value
        origin[key] = override
    return merged, origin


def _syntax_issue(override: str, message: str) -> ConfigIssue:
    return ConfigIssue(message, "override_syntax", input=override, source=f"--set {override}")
