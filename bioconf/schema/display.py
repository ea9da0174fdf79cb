"""Notebook rendering: a compact HTML table of the fields that matter, grouped as in the UI form,
instead of a wall of 240 fields."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from bioconf.schema.groups import GROUPS


def fields_table(
    title: str,
    values: Mapping[str, Any],
    group_of: Mapping[str, str],
    sources: Mapping[str, str] | None = None,
) -> str:
    """An HTML table of ``values`` grouped by form group (``group_of``: field -> group, in the form's
    order), with a source column when ``sources`` is given."""
    rows = [f"<tr><th colspan='{3 if sources else 2}' style='text-align:left'>{html.escape(title)}</th></tr>"]
    by_group: dict[str, list[str]] = {}
    for name in values:
        by_group.setdefault(group_of.get(name, "other"), []).append(name)
    for group, group_title in GROUPS.items():
        names = sorted(by_group.get(group, []))
        if not names:
            continue
        rows.append(
            f"<tr><td colspan='3' style='text-align:left'><i>{html.escape(group_title)}</i></td></tr>"
        )
        for name in names:
            cells = [f"<code>{html.escape(name)}</code>", html.escape(repr(values[name]))]
            if sources is not None:
                cells.append(html.escape(sources.get(name, "")))
            rows.append(
                "<tr>" + "".join(f"<td style='text-align:left'>{cell}</td>" for cell in cells) + "</tr>"
            )
    return "<table>" + "".join(rows) + "</table>"
