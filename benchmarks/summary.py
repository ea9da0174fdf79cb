"""Every speed target with this run's figure: the rows the benchmarks recorded (``_targets``).

BIOCONF_BENCH_RECORD=targets.jsonl .venv/bin/python benchmarks/schema_speed.py  # and the others
.venv/bin/python benchmarks/summary.py targets.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from _table import print_table
from _targets import verdict


def main() -> int:
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    print_table(
        f"Speed targets, this run ({os.cpu_count()} CPUs; each figure measured side by side with its limit)",
        ["measure", "this run", "target", ""],
        [[row["measure"], row["this run"], row["target"], verdict(row["met"])] for row in rows],
    )
    missed = sum(not row["met"] for row in rows)
    print(f"\n{len(rows) - missed} of {len(rows)} targets met in this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
