"""The GPU checks and timings in one go, for when a GPU machine is at hand (CI has none).

1. ``bioconf run --device cuda`` on a small checkpoint: the model lives on the GPU, the weights
   loaded there equal the checkpoint's, and ``--save`` (megatron's default CUDA save strategy)
   writes a checkpoint that loads back bit for bit.
2. ``weights_speed.py --device cuda``: the seed's path vs bioconf's loader vs plain file reads,
   into a model on the GPU.

    .venv/bin/python benchmarks/gpu_check.py [--repeats 3]

Exits 2 without CUDA, 1 if a check fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def check_run_on_gpu(root: Path) -> None:
    from bioconf.runtime import init_checkpoint, run
    from bioconf.schema import ModelConfig

    shape = {"model_cls": "bert", "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4}
    init_checkpoint(ModelConfig(**shape, vocab_size=64, seq_length=128, add_binary_head=False), root / "pre")
    first = run(ModelConfig(**shape), root / "pre", device="cuda", save=root / "stage1", quiet=True)
    model = first.built[0].model
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"cuda"}, f"parameters on {devices}"
    second = run(ModelConfig(**shape), root / "stage1", device="cuda", quiet=True)
    for (name, a), b in zip(model.state_dict().items(), second.built[0].model.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), f"{name} differs after save and reload on the GPU"
    print(f"PASS run --device cuda, save, reload: {first.built[0].weights}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: needs CUDA", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        check_run_on_gpu(Path(scratch))
    timing = subprocess.run(
        [sys.executable, str(HERE / "weights_speed.py"), "--device", "cuda", *sys.argv[1:]]
    )
    return timing.returncode


if __name__ == "__main__":
    sys.exit(main())
