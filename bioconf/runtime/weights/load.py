"""Loading a NeMo 2 checkpoint's weights into a Megatron model in place, under any parallel layout.

The seed (BioNeMo's ``load_weights_sharded_inplace_nemo2_to_mcore``) handed megatron-core's
``dist_checkpointing.load`` the model's sharded state dict with ``module.`` keys and ignored
everything that did not match. Here the checkpoint's tensor index (DCP's ``.metadata``, unpickled
under the allow-list of ``bioconf.checkpoint.unpickling``) is read first and every rank's request is
checked against it (``plan``); then megatron's torch_dist load runs (resharding, factories,
integrity checks) with bioconf's reader (``reader``).

A weights folder is foreign input: every file of it that is read (``metadata.json``, ``.metadata``,
``common.pt``, the shards) is checked before the first weight changes where that can be known, and
every failure, found before or while reading, is a CheckpointError naming the file (and the
checkpoint key a shard problem concerns), never a traceback from torch or megatron.
"""

from __future__ import annotations

import importlib
import io
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint.api import CheckpointException

from bioconf.checkpoint.layout import BACKEND_FILE, CONTENT_METADATA, METADATA_FILE, locate, read_backend
from bioconf.checkpoint.unpickling import DCP_METADATA_GLOBALS, METADATA_READ_LIMIT, read_dcp_metadata_file
from bioconf.errors import CheckpointError, ConfigIssue
from bioconf.fs import read_fd
from bioconf.runtime.parallel import ensure_parallel_state, model_chunks
from bioconf.runtime.weights.direct import DirectLoad, eligible, picklable
from bioconf.runtime.weights.plan import agree, check_index, damage_issues, plan_load, shard_path
from bioconf.runtime.weights.reader import DirectLoadStrategy, ReadFailure, one_line, progress_bar
from bioconf.runtime.weights.report import LoadReport

BACKEND: dict[str, Any] = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
"""What ``metadata.json`` may say (megatron's ``CheckpointingConfig``; the last three have these
defaults): megatron unpacks it into that dataclass, so another field is a TypeError there."""


def _reader_threads() -> int:
    """Reader threads per process: the node's cores (those this process may run on) shared by the
    processes on this node (torchrun's LOCAL_WORLD_SIZE), at most 8: more threads than cores only
    adds contention."""
    try:
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        per_node = 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // per_node))


def _read_direct(
    request: Any, metadata: Metadata, path: Path, progress: Any, source: str
) -> tuple[int, int, int]:
    """The direct path (``direct``): every rank reads its tensors, then all agree on what failed.
    Returns (bytes read, bytes kept, stock reads)."""
    tensors = [value for state in request.state_dicts for value in state.values()]
    loader = DirectLoad(str(path), metadata, _reader_threads(), progress)
    with progress:
        loader.run(tensors)
    failures = [picklable(error) for error in loader.failures]
    if dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, failures)
    else:
        everyone = [failures]
    found = {rank: errors[0] for rank, errors in enumerate(everyone) if errors}
    if found:
        raise _read_error(found, source)
    return loader.bytes_read, loader.bytes_kept, loader.stock_reads


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


def _check_backend(path: Path) -> None:
    """``metadata.json`` names megatron's torch_dist format, in the fields megatron reads."""
    source = path / BACKEND_FILE
    backend = read_backend(path)
    if backend is None or backend.get("sharded_backend") != "torch_dist":
        named = (
            f"no {BACKEND_FILE}" if backend is None else f"sharded backend {backend.get('sharded_backend')!r}"
        )
        raise CheckpointError.one(
            f"not a torch_dist checkpoint ({named}): only megatron's torch_dist format (NeMo 2's) is read",
            "unsupported_backend",
            source=source,
        )
    for name, value in backend.items():
        if name not in BACKEND:
            raise CheckpointError.one(
                f"unknown field: megatron's {BACKEND_FILE} holds only {', '.join(BACKEND)}",
                "unknown_backend_field",
                source=source,
                loc=(name,),
                input=value,
            )
        if type(value) is not type(BACKEND[name]) or value != BACKEND[name]:
            raise CheckpointError.one(
                f"not a format this loader reads (it reads {BACKEND[name]!r})",
                "unsupported_backend",
                source=source,
                loc=(name,),
                input=value,
            )


def _read_common(path: Path) -> dict[str, Any]:
    """megatron's ``common.pt``, loaded here (weights only, as megatron would) so that a damaged one
    is an error naming it before any weight changes, and handed to megatron's load as it is."""
    source = path / COMMON_STATE_FNAME

    def error(message: str, type: str, **details: Any) -> CheckpointError:
        return CheckpointError.one(message, type, source=source, **details)

    try:
        resolved = shard_path(str(path), COMMON_STATE_FNAME)
    except ValueError as failure:
        raise error(str(failure), "common_outside") from None
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError:
        raise error(
            "missing: megatron's torch_dist format keeps its common state here", "common_missing"
        ) from None
    except OSError as failure:
        raise error(f"cannot read file: {failure.strerror or failure}", "read_error") from None
    try:
        raw = read_fd(fd, source, CheckpointError, METADATA_READ_LIMIT)
    finally:
        os.close(fd)
    try:
        common = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as failure:  # whatever torch.load raises on bytes torch.save did not write
        raise error(
            f"not a file torch.load reads with weights only ({one_line(failure)})", "common_invalid"
        ) from None
    content = common.get("content_metadata", {}) if isinstance(common, dict) else None
    if not isinstance(content, (dict, type(None))):
        raise error(
            "not megatron's common state: a dict with an optional content_metadata dict",
            "common_invalid",
            input=type(common if content is None else content).__name__,
        )
    return common


class _PreloadedCommon(TorchCommonLoadStrategy):
    """megatron's common strategy, handing back the ``common.pt`` already read and checked."""

    def __init__(self, common: dict[str, Any]):
        super().__init__()
        self.common = common

    def load_common(self, checkpoint_dir: Any) -> dict[str, Any]:
        return self.common


def _open_checkpoint(path: Path) -> tuple[Metadata, dict[str, Any], dict[str, Any]]:
    """DCP's metadata, megatron's content metadata and common state, or an error naming what is
    wrong; the same on every rank (each reads the same files)."""
    _check_backend(path)
    metadata = read_dcp_metadata(path)
    check_index(metadata, str(path))
    common = _read_common(path)
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or dict(CONTENT_METADATA)
    return metadata, content, common


def _read_error(failures: dict[int, Any], source: str) -> BaseException:
    """The CheckpointError for what DCP gathered from every rank (so the same on every rank): each
    ReadFailure names its file and key; anything else names the rank. A KeyboardInterrupt or a
    SystemExit one rank raised is raised again as it was."""
    damages, issues = [], []
    for rank, failure in sorted(failures.items()):
        error = failure[0] if isinstance(failure, tuple) else failure
        if not isinstance(error, Exception):
            return error
        if isinstance(error, ReadFailure):
            damages.append(error.damage)
            continue
        issues.append(
            ConfigIssue(
                f"cannot read the weights (rank {rank}): {one_line(error)}",
                "unreadable_weights",
                source=source,
            )
        )
    return CheckpointError(damage_issues(damages) + issues)


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
    metadata, content, common = _open_checkpoint(path)
    chunks = model_chunks(model)
    with ensure_parallel_state():
        request = plan_load(chunks, content, metadata, skip, source)
        request.direct = eligible(request.state_dicts, metadata, request.needed)
        direct = agree(request, metadata, skip, strict, source)
        rank = dist.get_rank()
        progress = progress_bar(not quiet and rank == 0, f"loading {path.parent.name}")
        if direct:
            bytes_read, bytes_kept, stock_reads = _read_direct(request, metadata, path, progress, source)
            return _report(request, source, start, bytes_read, stock_reads, bytes_kept)
        strategy = DirectLoadStrategy(metadata, progress, threads=_reader_threads())
        requested = (
            request.state_dicts[0]
            if len(chunks) == 1
            else {f"model_{i}": d for i, d in enumerate(request.state_dicts)}
        )
        try:
            with progress:
                loaded = dist_checkpointing.load(
                    requested,
                    str(path),
                    sharded_strategy=strategy,
                    common_strategy=_PreloadedCommon(common),
                    strict=StrictHandling.ASSUME_OK_UNEXPECTED,
                )
        except CheckpointException as failure:  # a BaseException: DCP's failures, gathered from every rank
            raise _read_error(failure.failures, source) from None
        except CheckpointingException as failure:  # megatron's own checks
            raise CheckpointError.one(
                f"megatron cannot load the weights: {failure}", "unreadable_weights", source=source
            ) from None
        _copy_back(request.state_dicts, loaded)
        return _report(request, source, start, strategy.bytes_read, strategy.stock_reads)


def _report(
    request: Any, source: str, start: float, bytes_read: int, stock_reads: int, bytes_kept: int = 0
) -> LoadReport:
    """What a load did, on this rank (``bytes_kept``: counted by the direct path only)."""
    return LoadReport(
        checkpoint=source,
        loaded=request.loaded,
        skipped=request.skipped,
        missing=[shown for shown, _ in request.missing],
        cast=request.cast,
        bytes_read=bytes_read,
        bytes_kept=bytes_kept,
        stock_reads=stock_reads,
        seconds=time.perf_counter() - start,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
    )
