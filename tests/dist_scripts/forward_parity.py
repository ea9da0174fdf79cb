"""Run by tests/test_forward.py under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU).

``forward_parity.py REFERENCES.pt LAYOUT...``: REFERENCES.pt (written by the test) holds a batch and,
per case, a checkpoint path and the logits a one-process (TP=1) load of it gives. For every case and
LAYOUT (``tp2``, ``pp2``, ``pp2vpp2``) each rank loads the checkpoint with ``bioconf.runtime.run.run``
under that layout and computes the full-vocabulary logits on the batch; every rank must hold the same
logits. Rank 0 prints ``parity <case> <layout> <max abs diff against the reference>`` per pair and
writes the logits to ``<REFERENCES>.<case>.<layout>.pt``; any failure raises (non-zero exit).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.runtime.config import materialize
from bioconf.runtime.forward import cpu_forward, forward_logits
from bioconf.runtime.parallel import ensure_parallel_state
from bioconf.runtime.run import run

LAYOUTS = {
    "tp1": {},
    "tp2": {"tensor_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2, "pipeline_dtype": "float32"},
    "pp2vpp2": {
        "pipeline_model_parallel_size": 2,
        "virtual_pipeline_model_parallel_size": 2,
        "pipeline_dtype": "float32",
    },
}


def checkpoint_logits(checkpoint: str, layout: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The checkpoint loaded by ``run`` under ``layout`` (eval mode), and its logits on ``batch``;
    every rank of the process group calls it."""
    config = read_checkpoint_config(checkpoint).config.with_overrides(
        {**LAYOUTS[layout], "initial_ckpt_path": checkpoint}
    )
    with ensure_parallel_state(materialize(config)):  # kept for the forward: run reuses it
        report = run(config, quiet=True)
        assert report.weights is not None and report.weights.loaded, report.weights
        with cpu_forward():
            return forward_logits(report.models, batch["input_ids"], attention_mask=batch["attention_mask"])


def same_on_every_rank(logits: torch.Tensor) -> bool:
    everyone = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, logits)
    return all(torch.equal(logits, other) for other in everyone)


def main(references: Path, layouts: list[str]) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    saved: dict[str, Any] = torch.load(references, weights_only=True)
    for case, expected in saved["cases"].items():
        for layout in layouts:
            logits = checkpoint_logits(expected["checkpoint"], layout, saved["batch"])
            assert same_on_every_rank(logits), f"{case} {layout}: the ranks' logits differ"
            assert logits.shape == expected["logits"].shape, (logits.shape, expected["logits"].shape)
            diff = (logits - expected["logits"]).abs().max().item()
            if dist.get_rank() == 0:
                torch.save(logits, f"{references}.{case}.{layout}.pt")
                print(f"parity {case} {layout} {diff:.3e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
