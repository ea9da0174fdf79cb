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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from bioconf.schema.files import fsync_path, replace_directory
from bioconf.schema.model import ModelConfig
from bioconf.schema.nemo_context import write_checkpoint_context

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule

    from bioconf.runtime.config import MegatronBioNeMoModelConfig

WEIGHTS_DIR = "weights"
MODULE_PREFIX = "module."
"""The prefix NeMo 2 gives every weight key (the Megatron model is the LightningModule's ``module``)."""

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
"""What NeMo 2's MegatronStrategy records as ``content_metadata`` for a run without a distributed
optimizer: how the sharded state dict was laid out, so a loader can ask for the same layout."""

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


# ---- torch.distributed and megatron parallel state ----------------------------------------------


def _parallel_sizes(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    return {
        "tensor_model_parallel_size": config.tensor_model_parallel_size,
        "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": config.virtual_pipeline_model_parallel_size,
        "context_parallel_size": config.context_parallel_size,
        "expert_model_parallel_size": config.expert_model_parallel_size,
        "expert_tensor_parallel_size": config.expert_tensor_parallel_size,
    }


@contextmanager
def ensure_parallel_state(config: MegatronBioNeMoModelConfig | None = None) -> Iterator[None]:
    """torch.distributed and megatron's parallel state for the duration, so a single-process caller
    need not set them up. Without a process group: one from torchrun's variables, or else a 1-rank
    group on a port the OS picks (NCCL with CUDA, gloo otherwise). Without megatron parallel state:
    one with ``config``'s parallel sizes (all 1 without a config). Whatever was created here is torn
    down on exit; what existed is left alone."""
    created_group = not dist.is_initialized()
    if created_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" in os.environ:  # under torchrun: its rendezvous variables
            dist.init_process_group(backend)
        else:
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)  # port 0: the OS picks a free one
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
    created_state = not parallel_state.model_parallel_is_initialized()
    try:
        if created_state:
            parallel_state.initialize_model_parallel(**_parallel_sizes(config))
            if torch.cuda.is_available():  # megatron's GPU initialization draws from its tracked RNG
                from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

                model_parallel_cuda_manual_seed(torch.initial_seed() % 2**63)
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


# ---- saving ---------------------------------------------------------------------------------------


def model_chunks(model: Any) -> list[MegatronModule]:
    """A model as its list of virtual pipeline chunks (one chunk without virtual pipelining), each
    out of megatron's DDP wrapper, whose own ``module`` level would add a second ``module.``."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.utils import unwrap_model

    chunks = list(model) if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]
    return unwrap_model(chunks, (DistributedDataParallel,))


def nemo_sharded_state_dict(model: Any, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's sharded state dict as NeMo 2's MegatronParallel builds it: keys prefixed with
    ``module.``; virtual pipeline chunks nested under ``model_<i>``."""
    chunks = model_chunks(model)
    dicts = [
        chunk.sharded_state_dict(prefix=MODULE_PREFIX, metadata=dict(metadata or CONTENT_METADATA))
        for chunk in chunks
    ]
    return dicts[0] if len(dicts) == 1 else {f"model_{i}": d for i, d in enumerate(dicts)}


def _schema_config(config: Any) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    from bioconf.runtime.materialize import to_schema

    return to_schema(config)


def _sync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the folders themselves: the rename publishes only data on disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; pass overwrite=True to replace it")
    replace_directory(staging, target)


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(
    model: Any,
    config: MegatronBioNeMoModelConfig | ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a Megatron model, or its list of virtual pipeline chunks) and ``config`` as a
    NeMo 2 checkpoint at ``out_dir``; every rank of the process group calls it.

    Everything is written under a hidden temporary sibling of ``out_dir`` and renamed into place by
    rank 0 once all ranks have written their shards, so ``out_dir`` never holds half a checkpoint (a
    killed process may leave the hidden sibling behind). An existing ``out_dir`` is an error
    (FileExistsError) unless ``overwrite``.
    """
    target = Path(out_dir).absolute()
    schema_config = _schema_config(config)
    with ensure_parallel_state():
        problem, staging = None, None
        if dist.get_rank() == 0:
            if target.exists() and not overwrite:
                problem = f"{target}: already exists; pass overwrite=True to replace it"
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
                (staging / WEIGHTS_DIR).mkdir(parents=True)
        problem, staging = _broadcast((problem, staging))
        if problem is not None:
            raise FileExistsError(problem)
        try:
            if dist.get_rank() == 0:
                write_checkpoint_context(schema_config, staging)
            dist_checkpointing.save(
                nemo_sharded_state_dict(model),
                str(staging / WEIGHTS_DIR),
                sharded_strategy=save_strategy(),
                content_metadata=dict(CONTENT_METADATA),
            )
            dist.barrier()
            if dist.get_rank() == 0:
                _sync_tree(staging)
                _publish(staging, target, overwrite)
            dist.barrier()
        except BaseException:
            if dist.get_rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


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
    from bioconf.runtime.build import build_model
    from bioconf.runtime.materialize import materialize

    single = not dist.is_initialized() or dist.get_world_size() == 1
    if single and Path(out_dir).exists() and not overwrite:  # before building the model
        raise FileExistsError(f"{out_dir}: already exists; pass overwrite=True to replace it")
    runtime = materialize(single_rank_config(config) if single else config)
    runtime.use_cpu_initialization = True  # the attribute only: the checkpoint records ``config``
    with ensure_parallel_state(runtime), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vp_size = runtime.virtual_pipeline_model_parallel_size
        model = [build_model(runtime, vp) for vp in range(vp_size)] if vp_size else build_model(runtime)
        return save_checkpoint(model, config, out_dir, overwrite=overwrite)
