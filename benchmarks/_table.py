"""Small helpers shared by the benchmarks: timing and a markdown table with ratios."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Sequence


def median_wall(command: Sequence[str], repeats: int, cwd: str | None = None) -> float:
    """Median wall-clock seconds of running ``command`` in a fresh process (which must succeed)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=cwd)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def median_walls(commands: Sequence[Sequence[str]], repeats: int, cwd: str | None = None) -> list[float]:
    """``median_wall`` of each command, their runs interleaved (a, b, a, b, ...): on a shared machine a
    burst of other work then slows both sides of a ratio, not one."""
    samples: list[list[float]] = [[] for _ in commands]
    for _ in range(repeats):
        for command, times in zip(commands, samples, strict=True):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=cwd)
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


def rate(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (best of three rounds)."""
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            for _ in range(50):
                fn()
            count += 50
        best = max(best, count / elapsed)
    return best


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
