"""Writing NeMo 2 checkpoints: ``<out>/context/`` (the schema layer's io.json) and ``<out>/weights/``
(megatron-core's ``torch_dist`` format), so tests, benchmarks and demos have a checkpoint to start
from when nothing can be downloaded.

Key layout, as a NeMo 2 trainer writes it (nemo-toolkit 2.7.3): ``MegatronParallel.sharded_state_dict``
(``nemo/lightning/megatron_parallel.py``) asks each pipeline element for its sharded state dict; the
element is the LightningModule, whose Megatron model sits in its ``module`` attribute, so every key
gets the prefix ``module.`` (``_module_sharded_state_dict``: ``prefix + "module."``; under DDP the
same prefix comes from DDP's own ``module`` child). With virtual pipeline chunks the chunks' dicts are
nested under ``model_0``, ``model_1``, ... but the checkpoint keys are still ``module.<key>``: the
nesting only groups the dict handed to ``dist_checkpointing.save`` (``MegatronCheckpointIO.
save_checkpoint``, ``nemo/lightning/io/pl.py``), and megatron places each chunk's layers at their
global layer index in the stored tensors. This module writes exactly that layout.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from bioconf.checkpoint.context import write_checkpoint_context
from bioconf.checkpoint.layout import CONTENT_METADATA, MODULE_PREFIX, WEIGHTS_DIR
from bioconf.errors import BioconfError
from bioconf.fs import refuse_existing, replace_directory, sync_tree
from bioconf.runtime.parallel import broadcast, ensure_parallel_state, model_chunks
from bioconf.schema.model import ModelConfig


class CpuTorchDistSaveStrategy(SaveShardedStrategy):
    """megatron's ``torch_dist`` format (version 1) written without CUDA.

    megatron's own torch_dist save strategy synchronizes CUDA and all-reduces a CUDA tensor at the
    end, so it cannot run on a CPU-only node. This one converts the sharded state dict with the same
    megatron helpers and writes it with ``torch.distributed.checkpoint``'s ``FileSystemWriter``;
    megatron's loader reads the result like any torch_dist checkpoint.
    """

    def __init__(self, thread_count: int = 2):
        super().__init__("torch_dist", 1)
        self.thread_count = thread_count

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: str | os.PathLike[str]) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        dcp_save(
            mcore_to_pyt_state_dict(by_key, is_loading=False),
            storage_writer=FileSystemWriter(checkpoint_dir, thread_count=self.thread_count),
            planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
        )


def save_strategy() -> SaveShardedStrategy | None:
    """megatron's default (None) where it can run (CUDA and NCCL), the CPU strategy otherwise."""
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return None
    return CpuTorchDistSaveStrategy()


# ---- saving ---------------------------------------------------------------------------------------


def nemo_sharded_state_dict(model: Any, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's sharded state dict as NeMo 2's MegatronParallel builds it: keys prefixed with
    ``module.``; virtual pipeline chunks nested under ``model_<i>``."""
    chunks = model_chunks(model)
    dicts = [
        chunk.sharded_state_dict(prefix=MODULE_PREFIX, metadata=dict(metadata or CONTENT_METADATA))
        for chunk in chunks
    ]
    return dicts[0] if len(dicts) == 1 else {f"model_{i}": d for i, d in enumerate(dicts)}


def save_checkpoint(
    model: Any,
    config: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    config_class: str | None = None,
) -> Path:
    """Write ``model`` (a Megatron model, or its list of virtual pipeline chunks) and ``config`` (a
    ModelConfig, or a runtime config: its ``to_schema()``) as a NeMo 2 checkpoint at ``out_dir``;
    every rank of the process group calls it.

    Everything is written under a hidden temporary sibling of ``out_dir`` and renamed into place by
    rank 0 once all ranks have written their shards, so ``out_dir`` never holds half a checkpoint (a
    killed process may leave the hidden sibling behind). An existing ``out_dir`` is an error
    (OutputExistsError) unless ``overwrite``. ``config_class``: the config class io.json names when
    not bioconf's (``ResolvedConfig.saved_config_class``: BioNeMo's, so BioNeMo reads it back).
    """
    target = Path(out_dir).absolute()
    schema_config = config if isinstance(config, ModelConfig) else config.to_schema()
    with ensure_parallel_state():
        problem, staging = None, None
        if dist.get_rank() == 0:
            try:
                refuse_existing(target, overwrite)
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
                (staging / WEIGHTS_DIR).mkdir(parents=True)
            except (BioconfError, OSError) as error:
                problem = error
        problem, staging = broadcast((problem, staging))
        if problem is not None:
            raise problem
        try:
            if dist.get_rank() == 0:
                write_checkpoint_context(schema_config, staging, config_class=config_class)
            dist_checkpointing.save(
                nemo_sharded_state_dict(model),
                str(staging / WEIGHTS_DIR),
                sharded_strategy=save_strategy(),
                content_metadata=dict(CONTENT_METADATA),
            )
            dist.barrier()
            if dist.get_rank() == 0:
                sync_tree(staging)
                refuse_existing(target, overwrite)  # nothing appeared there meanwhile
                replace_directory(staging, target)
            dist.barrier()
        except BaseException:
            if dist.get_rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
