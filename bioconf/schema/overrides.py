"""Overrides for pipelines and the CLI: ``hidden_size=512``, ``override_parent_fields+=["seq_length"]``.

A value is read as JSON when it parses (``512``, ``true``, ``null``, ``[1, 2]``, ``"3"``) and as a
plain string otherwise (``bf16``, ``bert``). ``+=`` appends to a list field (a list value extends
it). All overrides are applied, then the config is validated as a whole; an error names the
override that caused it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import orjson

from bioconf.errors import ConfigIssue, OverrideError, short_repr

_OVERRIDE = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*(?P<op>\+?=)(?P<value>.*)$", re.DOTALL)

# ---- limits of data from outside ----------------------------------------------------------------
# A config is a flat mapping of ~250 fields whose deepest value is a list of strings (depth 2). These
# bound every document and override before anything walks it (validation, error messages, the
# service's own size checks), so no step's time or memory grows faster than its input: a YAML alias
# bomb, nesting that would exhaust the stack, or a key long enough to make "did you mean" slow is
# refused while it is read. The service tightens them further (bioconf.service.app.check_size).

MAX_DEPTH: Final = 32
"""Nesting levels, the top-level mapping being level 1 (the service's default too)."""
MAX_VALUES: Final = 100_000
"""Values in one document, keys and containers included, YAML aliases counted at each use: ~50,000
keys, 200 times what a config has, and far below what makes validation slow."""
MAX_STRING_CHARS: Final = 65_536
"""Characters of one string or key: a field name is under 64, a path under 4,096."""


def limit_breach(value: Any, depth: int = 1) -> tuple[str, str, Any] | None:
    """(message, type, top-level key or None) of the first limit ``value`` breaks, else None.
    ``depth`` is the level ``value`` sits at. Iterative: nesting cannot exhaust the stack, and a
    shared or cyclic structure is counted at each use, so it stops at a limit."""
    budget = MAX_VALUES
    stack: list[tuple[Any, int, Any]] = [(value, depth, None)]
    while stack:
        item, level, top = stack.pop()
        budget -= 1
        if budget < 0:
            return f"more than {MAX_VALUES} values", "too_many_values", top
        if isinstance(item, str):
            if len(item) > MAX_STRING_CHARS:
                return f"a string of {len(item)} characters (at most {MAX_STRING_CHARS})", "too_long", top
        elif isinstance(item, (list, tuple, dict)):
            if level > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels", "too_deep", top
            if len(item) > budget:
                return f"more than {MAX_VALUES} values", "too_many_values", top
            if isinstance(item, dict):
                for key, child in item.items():
                    where = key if top is None and level == depth else top
                    stack.append((key, level + 1, where))
                    stack.append((child, level + 1, where))
            else:
                stack.extend((child, level + 1, top) for child in item)
    return None


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
                breach = limit_breach(value, 2)
                if breach:
                    raise OverrideError([_syntax_issue(f"{key}={short_repr(value)}", breach[0], breach[1])])
                merged[key] = value
                origin[key] = f"{key}={short_repr(value)}"
            continue
        if len(override) > MAX_STRING_CHARS:
            message = f"an override of {len(override)} characters (at most {MAX_STRING_CHARS})"
            raise OverrideError([_syntax_issue(override, message, "too_long")])
        match = _OVERRIDE.match(override)
        if match is None:
            raise OverrideError([_syntax_issue(override, "expected KEY=VALUE or KEY+=VALUE")])
        key, op, value = match["key"], match["op"], parse_value(match["value"])
        breach = limit_breach(value, 2)
        if breach:
            raise OverrideError([_syntax_issue(override, breach[0], breach[1])])
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
        origin[key] = override if len(override) <= 200 else override[:197] + "..."
    return merged, origin


def _syntax_issue(override: str, message: str, kind: str = "override_syntax") -> ConfigIssue:
    shown = override if len(override) <= 200 else override[:197] + "..."
    return ConfigIssue(message, kind, input=shown, source=f"--set {shown}")
