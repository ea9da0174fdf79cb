"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m bioconf ARGS`` in a fresh process, as a pipeline would."""
    return subprocess.run(
        [sys.executable, "-m", "bioconf", *args], input=stdin, capture_output=True, cwd=ROOT, timeout=120
    )


@pytest.fixture
def parallel():
    """A 1-rank gloo group and megatron parallel state, as a single-process user would have."""
    from bioconf.runtime.parallel import ensure_parallel_state

    with ensure_parallel_state():
        yield


@pytest.fixture
def small_gpt() -> dict:
    return {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}


def nemo_dump(io: Any, trainer: Any, model: Any, context_dir: Path) -> None:
    """Write a checkpoint context with NeMo's own ``TrainerContext.io_dump``.

    ``extra`` is passed explicitly (fiddle 0.3.1 cannot read its default_factory default); without
    nemo_run, which io_dump imports only to also write model.yaml, that YAML step is skipped:
    io.json is written by NeMo all the same.
    """
    context = io.TrainerContext(model=model, trainer=trainer, extra={})
    if importlib.util.find_spec("nemo_run") is None:
        context._io_dump_yaml = lambda _io, attrs: {}
    context.io_dump(context_dir, yaml_attrs=["model"])


FUZZ_SCALE = int(os.environ.get("BIOCONF_FUZZ_SCALE", "1"))
"""``make fuzz`` multiplies the fuzz tests' example counts by this (1 in ``make test``)."""


def fuzz_settings(examples: int, **options: Any) -> settings:
    """Hypothesis settings of a fuzz test: ``examples`` derandomized in ``make test`` (repeatable in
    CI); ``examples * BIOCONF_FUZZ_SCALE`` fresh random inputs in ``make fuzz``."""
    return settings(max_examples=examples * FUZZ_SCALE, deadline=None, derandomize=FUZZ_SCALE == 1, **options)
