"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m bioconf ARGS`` in a fresh process, as a pipeline would."""
    return subprocess.run(
        [sys.executable, "-m", "bioconf", *args], input=stdin, capture_output=True, cwd=ROOT, timeout=120
    )


@pytest.fixture
def small_gpt() -> dict:
    return {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}
