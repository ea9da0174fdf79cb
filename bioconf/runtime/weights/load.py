"""Loading a NeMo 2 checkpoint's weights into a Megatron model in place, under any parallel layout.

The seed (BioNeMo's ``load_weights_sharded_inplace_nemo2_to_mcore``) handed megatron-core's
``dist_checkpointing.load`` the model's sharded state dict with ``module.`` keys and ignored
everything that did not match. Here the checkpoint's tensor index (DCP's ``.metadata``, unpickled
under the allow-list of ``bioconf.checkpoint.unpickling``) is read first and every rank's request is
checked against it (``plan``); then megatron's torch_dist load runs (resharding, factories,
integrity checks) with bioconf's reader (``reader``).
"""

from __future__ import annotations

import importlib
import os
import time
from functools import cache
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import Metadata

from bioconf.checkpoint.layout import CONTENT_METADATA, METADATA_FILE, locate, read_backend
from bioconf.checkpoint.unpickling import DCP_METADATA_GLOBALS, read_dcp_metadata_file
from bioconf.errors import CheckpointError
from bioconf.runtime.parallel import ensure_parallel_state, model_chunks
from bioconf.runtime.weights.plan import agree, plan_load
from bioconf.runtime.weights.reader import DirectLoadStrategy, progress_bar
from bioconf.runtime.weights.report import LoadReport


def _reader_threads() -> int:
    """Up to 4 reader threads per process, sharing the cores with the other processes on this node
    (torchrun's LOCAL_WORLD_SIZE): more threads than cores only adds contention."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // per_node))


@cache
def _dcp_classes() -> dict[tuple[str, str], Any]:
    """DCP_METADATA_GLOBALS resolved to torch's own classes (those this Python has)."""
    resolved = {}
    for module, name in DCP_METADATA_GLOBALS:
        try:
            resolved[module, name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pathlib._local before Python 3.13
            continue
    return resolved


def read_dcp_metadata(weights: os.PathLike[str]) -> Metadata:
    """DCP's ``Metadata`` of a weights folder as torch's own objects, unpickled under the allow-list
    (torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``)."""
    return read_dcp_metadata_file(os.path.join(weights, METADATA_FILE), _dcp_classes())


def _open_checkpoint(path: Any) -> tuple[Metadata, dict[str, Any]]:
    """DCP's metadata and megatron's content metadata, or an error naming what is wrong."""
    backend = read_backend(path)
    if backend is None or backend.get("sharded_backend") != "torch_dist":
        named = (
            "no metadata.json" if backend is None else f"sharded backend {backend.get('sharded_backend')!r}"
        )
        raise CheckpointError.one(
            f"not a torch_dist checkpoint ({named}): only megatron's torch_dist format (NeMo 2's) is read",
            "unsupported_backend",
            source=path,
        )
    metadata = read_dcp_metadata(path)
    content = dist_checkpointing.load_content_metadata(str(path)) or dict(CONTENT_METADATA)
    return metadata, content


def _copy_back(chunks_state: list[dict[str, Any]], loaded: dict[str, Any]) -> None:
    """Copy loaded values that did not land in the model's own tensors (factory merges, contiguous
    copies megatron made) into them, so the load is in place in every case."""
    results = [loaded] if len(chunks_state) == 1 else [loaded[f"model_{i}"] for i in range(len(chunks_state))]
    for requested, result in zip(chunks_state, results):
        for key, value in requested.items():
            own = value.data if isinstance(value, (ShardedTensor, ShardedTensorFactory)) else None
            new = result.get(key)
            if (
                isinstance(own, torch.Tensor)
                and isinstance(new, torch.Tensor)
                and new.data_ptr() != own.data_ptr()
            ):
                own.detach().copy_(new)


def load_weights_sharded_inplace_nemo2_to_mcore(
    model: Any,
    distributed_checkpoint_dir: str | os.PathLike[str],
    skip_keys_with_these_prefixes: set[str] | list[str] | tuple[str, ...] = (),
    *,
    strict: bool = True,
    quiet: bool = False,
) -> LoadReport:
    """Load a NeMo 2 checkpoint's weights into ``model`` (a Megatron model, or its list of virtual
    pipeline chunks) in place, on every rank of the process group, whatever the layouts of the saving
    and the loading run.

    ``distributed_checkpoint_dir`` is the checkpoint or any part ``bioconf.checkpoint.locate`` accepts.
    Model keys starting with one of ``skip_keys_with_these_prefixes`` keep their values, as do
    ``_extra_state`` entries; checkpoint keys the model does not ask for are ignored. Raises
    WeightsError, before any weight changes, for: a model key the checkpoint lacks (with
    ``strict=False`` it is reported instead), a skip prefix that matches no key of the model (on any
    rank) or of the checkpoint, a shape that differs from the checkpoint's. Values stored in another
    dtype are cast. A progress bar appears on rank 0's stderr, on a terminal, when the read takes
    more than a second, unless ``quiet``. A checkpoint that cannot be read raises CheckpointError;
    its ``.metadata`` is unpickled under bioconf's allow-list, so nothing it names is imported.
    """
    start = time.perf_counter()
    path = locate(distributed_checkpoint_dir).require_weights()
    source = str(path)
    skip = sorted(set(skip_keys_with_these_prefixes))
    metadata, content = _open_checkpoint(path)
    chunks = model_chunks(model)
    with ensure_parallel_state():
        request = plan_load(chunks, content, metadata, skip, source)
        agree(request, metadata, skip, strict, source)
        rank = dist.get_rank()
        progress = progress_bar(not quiet and rank == 0, f"loading {path.parent.name}")
        strategy = DirectLoadStrategy(metadata, progress, threads=_reader_threads())
        requested = (
            request.state_dicts[0]
            if len(chunks) == 1
            else {f"model_{i}": d for i, d in enumerate(request.state_dicts)}
        )
        with progress:
            loaded = dist_checkpointing.load(
                requested, str(path), sharded_strategy=strategy, strict=StrictHandling.ASSUME_OK_UNEXPECTED
            )
        _copy_back(request.state_dicts, loaded)
        return LoadReport(
            checkpoint=source,
            loaded=request.loaded,
            skipped=request.skipped,
            missing=[shown for shown, _ in request.missing],
            cast=request.cast,
            bytes_read=strategy.bytes_read,
            stock_reads=strategy.stock_reads,
            seconds=time.perf_counter() - start,
            rank=rank,
            world_size=dist.get_world_size(),
        )
