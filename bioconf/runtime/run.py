"""The main job, as a pipeline submits it: validate -> resolve against the starting checkpoint ->
materialize the merged config -> build the model -> load the sharded weights -> report (and
optionally save).

The checkpoint's settings are read and merged once (``bioconf.resolve``); the model is built from
that merge. Runs the same in one process and under ``torchrun`` (each rank builds its part and loads
its shards; the caller prints on rank 0 only).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule

from bioconf.resolve import Policy, ResolvedConfig, resolve
from bioconf.runtime.build import build_chunks
from bioconf.runtime.config import materialize
from bioconf.runtime.forward import LogitsChecksum, forward_checksum
from bioconf.runtime.parallel import ensure_parallel_state
from bioconf.runtime.save import save_checkpoint
from bioconf.runtime.weights import LoadReport, load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema.model import ModelConfig


@dataclass(frozen=True)
class RunReport:
    """Everything ``bioconf run`` prints: the config, its merge with the checkpoint, what loading did."""

    config: ModelConfig
    """The config as submitted (its fingerprint is the one ``bioconf validate`` prints)."""
    resolved: ResolvedConfig | None
    """The merge with the starting checkpoint, which the model was built from; None without one."""
    models: list[MegatronModule]
    """This rank's model chunks (one without virtual pipelining)."""
    weights: LoadReport | None
    """None without a checkpoint, or with ``initial_ckpt_path_ignore_weights``."""
    saved: Path | None
    seconds: float
    rank: int
    world_size: int
    forward: LogitsChecksum | None = None
    """The logits checksum of one small synthetic batch (``check_forward``); None when not asked."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.config.fingerprint(),
            "resolved": self.resolved.to_dict() if self.resolved else None,
            "weights": self.weights.to_dict() if self.weights else None,
            "saved": str(self.saved) if self.saved else None,
            "seconds": round(self.seconds, 3),
            "rank": self.rank,
            "world_size": self.world_size,
            "forward": self.forward.to_dict() if self.forward is not None else None,
        }

    def __str__(self) -> str:
        lines = [f"config       sha256:{self.config.fingerprint()}"]
        if self.resolved is not None:
            sources: dict[str, list[str]] = {}
            for name, source in self.resolved.sources.items():
                sources.setdefault(source, []).append(name)
            checkpoint = self.resolved.checkpoint
            lines.append(f"checkpoint   {checkpoint.paths.root} ({checkpoint.class_path})")
            lines.append(f"policy       {self.resolved.policy}")
            lines.append(f"from ckpt    {', '.join(sorted(sources.get('checkpoint', []))) or '-'}")
            lines.append(f"from config  {', '.join(sorted(sources.get('user', []))) or '-'}")
            lines += [f"note         {note}" for note in self.resolved.notes]
        lines.append(f"weights      {self.weights if self.weights is not None else 'not loaded'}")
        if self.forward is not None:
            lines.append(f"forward      logits {self.forward}")
        if self.saved:
            lines.append(f"saved        {self.saved}")
        lines.append(f"took         {self.seconds:.2f} s on {self.world_size} process(es)")
        return "\n".join(lines)


def run(
    config: ModelConfig,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    policy: Policy = "explicit",
    device: Literal["cpu", "cuda"] = "cpu",
    save: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    check_forward: bool = False,
) -> RunReport:
    """Resolve ``config`` against its starting checkpoint (``checkpoint``, else its
    ``initial_ckpt_path``), build the model from the merge and load the weights.

    Raises the errors of ``bioconf.errors``: CheckpointMismatchError (shapes, before any weight is
    read; its WeightsError for keys), CheckpointError (an unreadable checkpoint), ConfigError.
    """
    start = time.perf_counter()
    checkpoint = checkpoint if checkpoint is not None else config.initial_ckpt_path
    resolved = resolve(config, checkpoint, policy) if checkpoint is not None else None
    merged = resolved.config if resolved is not None else config
    runtime = materialize(merged)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        runtime.use_cpu_initialization = True  # the attribute only: where this machine initializes
    with ensure_parallel_state(runtime):
        models = build_chunks(runtime)
        weights = None
        if resolved is not None and not merged.initial_ckpt_path_ignore_weights:
            weights = load_weights_sharded_inplace_nemo2_to_mcore(
                models,
                resolved.checkpoint.paths.root,
                merged.initial_ckpt_skip_keys_with_these_prefixes,
                quiet=quiet,
            )
        # The loaded model on one small synthetic batch, before any save (every rank takes part).
        forward = forward_checksum(models) if check_forward else None
        saved = None
        if save is not None:
            config_class = resolved.saved_config_class if resolved is not None else None
            saved = save_checkpoint(models, runtime, save, config_class=config_class)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    seconds = time.perf_counter() - start
    return RunReport(config, resolved, models, weights, saved, seconds, rank, world_size, forward)
