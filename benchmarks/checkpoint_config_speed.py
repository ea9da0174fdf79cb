"""Reading a checkpoint's model config: bioconf's data reader vs nemo-toolkit's load_context.

1. In-process, warm: ``read_checkpoint_config(ckpt)`` vs
   ``nemo.lightning.io.load_context(ckpt/"context", subpath="model.config")`` on the same
   checkpoint (a BERT one written by bioconf, the same written by NeMo's own io_dump, and a small
   bf16/silu GPT one written by bioconf). Target: >= 10x.
2. Fresh process: ``bioconf resolve CONFIG --checkpoint CKPT`` vs a process that imports nemo and
   calls load_context. Target: >= 30x.

    .venv/bin/python benchmarks/checkpoint_config_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

from _table import median_wall, print_table, rate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nemo.lightning import io


class Holder(io.IOMixin):
    """Stands in for the LightningModule a NeMo checkpoint records around its config."""

    def __init__(self, config):
        self.config = config


def make_checkpoints(root: Path) -> dict[str, Path]:
    """A bioconf-written and a NeMo-written checkpoint context of the same small BERT config, and a
    bioconf-written one of a small bf16 GPT config with a silu activation."""
    import nemo.lightning as nl
    import torch
    from conftest import nemo_dump

    from bioconf.checkpoint.context import write_checkpoint_context
    from bioconf.runtime import BertModelConfig
    from bioconf.schema import ModelConfig

    fields = {
        "num_layers": 6,
        "hidden_size": 320,
        "num_attention_heads": 20,
        "vocab_size": 33,
        "seq_length": 1024,
    }
    write_checkpoint_context(
        ModelConfig(**fields, model_cls="bert", bf16=True, params_dtype="bf16"), root / "bioconf"
    )

    config = BertModelConfig(**fields, bf16=True, params_dtype=torch.bfloat16)
    trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    nemo_dump(io, trainer, Holder(config), root / "nemo" / "context")

    gpt = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128}
    write_checkpoint_context(
        ModelConfig(**gpt, params_dtype="bf16", activation_func="silu"), root / "bioconf-gpt"
    )
    return {
        "bioconf-written": root / "bioconf",
        "NeMo-written": root / "nemo",
        "bioconf-written GPT (bf16, silu)": root / "bioconf-gpt",
    }


def in_process(checkpoints: dict[str, Path]) -> None:
    from bioconf.checkpoint.context import read_checkpoint_config

    rows = []
    for label, ckpt in checkpoints.items():
        ours = rate(lambda ckpt=ckpt: read_checkpoint_config(ckpt))
        theirs = rate(lambda ckpt=ckpt: io.load_context(ckpt / "context", subpath="model.config"))
        rows.append([label, f"{1e3 / ours:.3f}", f"{1e3 / theirs:.3f}", f"{ours / theirs:.1f}x"])
    print_table(
        "In-process, warm: read a checkpoint's model config (ms per read)",
        ["checkpoint", "bioconf read_checkpoint_config", "nemo load_context", "speed-up"],
        rows,
    )


def fresh_process(checkpoints: dict[str, Path], repeats: int) -> None:
    ckpt = checkpoints["bioconf-written"]
    config = ROOT / "examples" / "finetune.json"
    ours = median_wall(
        [str(Path(sys.executable).with_name("bioconf")), "resolve", str(config), "--checkpoint", str(ckpt)],
        repeats,
        cwd=str(ROOT),
    )
    program = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from nemo.lightning import io\n"
        f"io.load_context({str(ckpt / 'context')!r}, subpath='model.config')\n"
    )
    nemo = median_wall([sys.executable, "-c", program], repeats)
    print_table(
        "Fresh process: resolve a config against a checkpoint (median wall seconds)",
        ["command", "seconds", "ratio"],
        [
            ["bioconf resolve examples/finetune.json --checkpoint CKPT", f"{ours:.3f}", "1.0x"],
            [
                "python: import nemo; io.load_context(CKPT, subpath='model.config')",
                f"{nemo:.3f}",
                f"{nemo / ours:.1f}x slower",
            ],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        checkpoints = make_checkpoints(Path(tmp))
        in_process(checkpoints)
        fresh_process(checkpoints, args.repeats)


if __name__ == "__main__":
    main()
