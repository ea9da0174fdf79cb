"""torch.distributed and megatron's parallel state, for callers that have set up neither, and the
model chunks each rank holds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import unwrap_model


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
def ensure_parallel_state(config: Any = None) -> Iterator[None]:
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
                model_parallel_cuda_manual_seed(torch.initial_seed() % 2**63)
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


def model_chunks(model: Any) -> list[MegatronModule]:
    """A model as its list of virtual pipeline chunks (one chunk without virtual pipelining), each
    out of megatron's DDP wrapper, whose own ``module`` level would add a second ``module.``."""
    chunks = list(model) if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]
    return unwrap_model(chunks, (DistributedDataParallel,))


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
