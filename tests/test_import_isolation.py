"""The schema layer never pulls in torch, megatron, fiddle or nemo."""

from __future__ import annotations

import subprocess
import sys

from conftest import EXAMPLES

HEAVY = ("torch", "megatron", "fiddle", "nemo", "lightning")

PROGRAM = f"""
import sys
import bioconf.schema as schema
from bioconf.cli import main
schema.load_config({str(EXAMPLES / "gpt_tp2.yaml")!r}).with_overrides("num_layers=4").to_json()
schema.json_schema()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(",".join(heavy))
"""


def test_schema_layer_imports_no_heavy_library():
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
