"""``bioconf demo``: the main job on an embedded default, with nothing to download.

It makes, once, a small pretrained-style checkpoint shaped like a protein language model (an
ESM-2-like BERT: 33-token vocabulary, 6 layers), then fine-tunes it the way a user would: start
from that checkpoint, change dropout and precision, and skip the output head (``lm_head.``) so a
new one is trained. ``examples/pretrain_esm2_small.json`` and ``examples/finetune.json`` hold the
same two configs (a test keeps them equal).
"""

from __future__ import annotations

import time
from pathlib import Path

from bioconf.runtime.initialize import init_checkpoint
from bioconf.runtime.run import run
from bioconf.schema.model import ModelConfig

PRETRAIN = {
    "model_cls": "bert",
    "num_layers": 6,
    "hidden_size": 320,
    "ffn_hidden_size": 1280,
    "num_attention_heads": 20,
    "vocab_size": 33,
    "seq_length": 1024,
    "normalization": "LayerNorm",
    "activation_func": "gelu",
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "position_embedding_type": "rope",
    "add_binary_head": False,
    "bf16": True,
    "params_dtype": "bfloat16",
    "pipeline_dtype": "bfloat16",
    "autocast_dtype": "bfloat16",
}
"""The pretrained model: an ESM-2-like encoder in bf16."""

FINETUNE = {
    "model_cls": "bert",
    "num_layers": 6,
    "hidden_size": 320,
    "num_attention_heads": 20,
    "initial_ckpt_path": "checkpoints/esm2-small",
    "initial_ckpt_skip_keys_with_these_prefixes": ["lm_head."],
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "bf16": False,
    "params_dtype": "float32",
}
"""The fine-tune: more dropout, fp32, a fresh output head; everything else from the checkpoint."""


def run_demo(cache: Path) -> int:
    """Create the demo checkpoint under ``cache`` if missing, run the fine-tune, print the report."""
    start = time.perf_counter()
    checkpoint = cache / "esm2-small"
    if (checkpoint / "weights" / ".metadata").is_file():
        print(f"using the demo checkpoint in {checkpoint}")
    else:
        init_checkpoint(ModelConfig(**PRETRAIN), checkpoint, overwrite=checkpoint.exists())
        print(f"created the demo checkpoint in {checkpoint} (ESM-2-like BERT, 6 layers, bf16)")
    config = ModelConfig(**{**FINETUNE, "initial_ckpt_path": str(checkpoint)})
    print(run(config, quiet=True))
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0
