"""The speed targets (issue 12), one row each: a benchmark records what it measured against its
target, and ``make bench`` prints every row together at the end (``summary.py``)."""

from __future__ import annotations

import json
import os

RECORD_ENV = "BIOCONF_BENCH_RECORD"
"""The file (JSON lines) the rows go to; unset: a script run on its own records nothing."""


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def record(measure: str, this_run: str, target: str, met: bool) -> None:
    """One row of the target table: what was measured, its figure in this run, the target."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(
                json.dumps({"measure": measure, "this run": this_run, "target": target, "met": met}) + "\n"
            )
