"""The main job, as a pipeline submits it: validate -> resolve against the starting checkpoint ->
materialize -> build the model -> load the sharded weights -> report (and optionally save).

Runs the same in one process and under ``torchrun`` (each rank builds its part and loads its
shards; the caller prints on rank 0 only).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from bioconf.runtime.checkpoint import ensure_parallel_state, save_checkpoint
from bioconf.runtime.config import BuiltModel
from bioconf.runtime.materialize import materialize
from bioconf.schema.model import ModelConfig
from bioconf.schema.resolve import ResolvedConfig, resolve


@dataclass(frozen=True)
class RunReport:
    """Everything ``bioconf run`` prints: the resolved config and what building and loading did."""

    config: ModelConfig
    resolved: ResolvedConfig | None
    built: list[BuiltModel]
    """One per virtual pipeline stage on this rank (one without virtual pipelining)."""
    saved: Path | None
    seconds: float
    rank: int
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        settings = self.built[0].settings
        weights = [b.weights.to_dict() for b in self.built if b.weights is not None]
        return {
            "fingerprint": self.config.fingerprint(),
            "resolved": self.resolved.to_dict() if self.resolved else None,
            "settings": None
            if settings is None
            else {
                "checkpoint": settings.checkpoint,
                "class": settings.class_path,
                "changed": {k: [repr(old), repr(new)] for k, (old, new) in settings.changed.items()},
                "kept": list(settings.preserved),
                "dropped": sorted(settings.dropped),
            },
            "weights": weights,
            "saved": str(self.saved) if self.saved else None,
            "seconds": round(self.seconds, 3),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def __str__(self) -> str:
        lines = [f"config       sha256:{self.config.fingerprint()}"]
        if self.resolved is not None:
            sources: dict[str, list[str]] = {}
            for name, source in self.resolved.sources.items():
                sources.setdefault(source, []).append(name)
            checkpoint = self.resolved.checkpoint
            lines.append(f"checkpoint   {checkpoint.path.parent.parent} ({checkpoint.class_path})")
            lines.append(f"policy       {self.resolved.policy}")
            lines.append(f"from ckpt    {', '.join(sorted(sources.get('checkpoint', []))) or '-'}")
            lines.append(f"kept (user)  {', '.join(sorted(sources.get('user', []))) or '-'}")
            for note in self.resolved.notes:
                lines.append(f"note         {note}")
        for index, built in enumerate(self.built):
            label = "weights" if len(self.built) == 1 else f"weights[{index}]"
            lines.append(f"{label:<12} {built.weights if built.weights is not None else 'not loaded'}")
        if self.saved:
            lines.append(f"saved        {self.saved}")
        lines.append(f"took         {self.seconds:.2f} s on {self.world_size} process(es)")
        return "\n".join(lines)


def run(
    config: ModelConfig,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    policy: Literal["seed", "explicit"] = "explicit",
    device: Literal["cpu", "cuda"] = "cpu",
    save: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> RunReport:
    """Resolve ``config`` against its starting checkpoint, build the model and load the weights.

    A checkpoint that does not fit raises ``CheckpointMismatchError`` (shapes, before any weight
    is read) or ``WeightsError`` (keys); an invalid config ``ConfigError``.
    """
    start = time.perf_counter()
    checkpoint = checkpoint if checkpoint is not None else config.initial_ckpt_path
    resolved = None
    if checkpoint is not None:
        resolved = resolve(config, checkpoint, policy)
        # The runtime keeps the seed's rule; the schema layer hands it the effective keep-list, plus
        # where to initialize (a property of this machine, not of the checkpoint).
        keep = [*resolved.keep, "use_cpu_initialization"]
        config = config.with_overrides({"initial_ckpt_path": str(checkpoint), "override_parent_fields": keep})
    runtime = materialize(config)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        runtime.use_cpu_initialization = True  # the attribute only: not recorded for a saved checkpoint
    with ensure_parallel_state(runtime):
        vp_size = runtime.virtual_pipeline_model_parallel_size
        stages = [None] if not vp_size else list(range(vp_size))
        built = [runtime.build_and_load(vp_stage, quiet=quiet) for vp_stage in stages]
        saved = None
        if save is not None:
            models = [b.model for b in built]
            saved = save_checkpoint(models if len(models) > 1 else models[0], runtime, save)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return RunReport(config, resolved, built, saved, time.perf_counter() - start, rank, world_size)
