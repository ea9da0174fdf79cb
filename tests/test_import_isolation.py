"""The schema layer, the checkpoint readers and the merge never pull in torch, megatron, fiddle or
nemo: a pipeline or a web server validates, inspects and resolves without them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import EXAMPLES

from bioconf.checkpoint.context import write_checkpoint_context
from bioconf.schema import ModelConfig

HEAVY = ("torch", "megatron", "fiddle", "nemo", "lightning", "fastapi")

USES = {
    "schema": """
import bioconf.schema as schema
schema.load_config({gpt!r}).with_overrides("num_layers=4").to_json()
schema.json_schema()
""",
    "cli": "from bioconf.cli import main",
    "checkpoint readers": """
from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.checkpoint.inspection import inspect_checkpoint
read_checkpoint_config({ckpt!r})
""",
    "resolve": """
from bioconf.resolve import resolve
from bioconf.schema import ModelConfig
resolve(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4), {ckpt!r})
""",
}


@pytest.mark.parametrize("use", USES)
def test_imports_no_heavy_library(use, tmp_path):
    write_checkpoint_context(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4), tmp_path)
    program = USES[use].format(gpt=str(EXAMPLES / "gpt_tp2.yaml"), ckpt=str(tmp_path))
    program += f"\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
