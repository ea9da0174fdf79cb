"""A freshly initialized checkpoint of a config, so tests, benchmarks and demos have one to start
from when nothing can be downloaded (``bioconf init-checkpoint``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from bioconf.fs import refuse_existing
from bioconf.runtime.build import build_chunks
from bioconf.runtime.config import materialize
from bioconf.runtime.parallel import ensure_parallel_state
from bioconf.runtime.save import save_checkpoint
from bioconf.schema.model import ModelConfig

# What a one-process build of a config leaves out: the checkpoint's tensors do not depend on these.
_SINGLE_RANK_LAYOUT = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "sequence_parallel": False,
    "context_parallel_size": 1,
    "hierarchical_context_parallel_sizes": None,
    "hybrid_context_parallel": False,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "num_layers_in_first_pipeline_stage": None,
    "num_layers_in_last_pipeline_stage": None,
    "pipeline_model_parallel_layout": None,
    "account_for_embedding_in_pipeline_split": False,
    "account_for_loss_in_pipeline_split": False,
}


def single_rank_config(config: ModelConfig) -> ModelConfig:
    """``config`` laid out for one process: every parallel size 1. The checkpoint's tensors are the
    same under any layout, so a one-process build writes the checkpoint a parallel run would."""
    changed = {k: v for k, v in _SINGLE_RANK_LAYOUT.items() if getattr(config, k) != v}
    return config.with_overrides(changed) if changed else config


def init_checkpoint(
    config: ModelConfig, out_dir: str | os.PathLike[str], *, seed: int = 1234, overwrite: bool = False
) -> Path:
    """Build a freshly initialized model of ``config`` (on CPU, from ``seed``) and save it with
    ``save_checkpoint``; the context records ``config`` as given.

    Run alone, the model is built for one process; run by every rank of an existing process group, it
    is built with the config's parallel layout.
    """
    single = not dist.is_initialized() or dist.get_world_size() == 1
    if single:
        refuse_existing(out_dir, overwrite)  # before building the model
    runtime = materialize(single_rank_config(config) if single else config)
    runtime.use_cpu_initialization = True  # the attribute only: the checkpoint records ``config``
    with ensure_parallel_state(runtime), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return save_checkpoint(build_chunks(runtime), config, out_dir, overwrite=overwrite)
