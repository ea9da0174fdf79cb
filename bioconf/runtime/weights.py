"""Loading a NeMo 2 checkpoint's weights into a Megatron model in place, under any parallel layout.

The seed (BioNeMo's ``load_weights_sharded_inplace_nemo2_to_mcore``) handed megatron-core's
``dist_checkpointing.load`` the model's sharded state dict with ``module.`` keys and ignored
everything that did not match. Here the checkpoint's tensor metadata (DCP's ``.metadata``) is read
first and every rank's request is checked against it, so a missing key, a skip prefix that skips
nothing or a shape that does not fit is an error before any weight is touched, on every rank alike.
The load itself is megatron's torch_dist load (resharding, factories, integrity checks) with one
part replaced: the reader. The stock DCP reader ``torch.load``s each stored item and copies it into
the target; bioconf's reads the item's raw bytes (located through the zip archive ``torch.save``
wrote) straight into the target tensor where the layouts allow it, from several threads, and falls
back to the stock per-item path for anything else.
"""

from __future__ import annotations

import difflib
import io
import os
import pickle
import re
import struct
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import maybe_load_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import FileSystemReader, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from bioconf.runtime.checkpoint import (
    CONTENT_METADATA,
    MODULE_PREFIX,
    WEIGHTS_DIR,
    ensure_parallel_state,
    model_chunks,
)
from bioconf.schema.errors import ConfigError, ConfigIssue


class WeightsError(ConfigError):
    """The checkpoint's weights cannot be loaded into the model (raised before any weight changes)."""


# ---- the report -----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What one rank's load did. Keys are the model's state-dict keys (without NeMo's ``module.``;
    ``model_<i>.`` in front for virtual pipeline chunk i > 0)."""

    checkpoint: str
    """The weights folder read."""
    loaded: list[str] = field(default_factory=list)
    """Keys whose values now come from the checkpoint."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Key -> the skip prefix that matched it."""
    missing: list[str] = field(default_factory=list)
    """Keys the checkpoint does not have, left as they were (``strict=False`` only)."""
    cast: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Key -> (checkpoint dtype, model dtype), where the values were converted."""
    bytes_read: int = 0
    """Bytes this rank read from the weights files."""
    stock_reads: int = 0
    """Stored items read through ``torch.load`` because the direct reader does not parse them."""
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1

    @property
    def throughput(self) -> float:
        """Bytes read per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}

    def __str__(self) -> str:
        lines = [
            f"{self.checkpoint}: loaded {len(self.loaded)} tensors, {self.bytes_read / 1e6:,.1f} MB in "
            f"{self.seconds:.2f} s ({self.throughput / 1e9:.2f} GB/s)"
            + (f" on rank {self.rank} of {self.world_size}" if self.world_size > 1 else "")
        ]
        by_prefix: dict[str, int] = {}
        for prefix in self.skipped.values():
            by_prefix[prefix] = by_prefix.get(prefix, 0) + 1
        lines += [f"skipped {n} tensors by prefix {prefix!r}" for prefix, n in by_prefix.items()]
        if self.missing:
            lines.append(f"not in the checkpoint, left as initialized: {', '.join(self.missing)}")
        lines += [f"cast {src} -> {dst}" for src, dst in sorted(set(self.cast.values()))]
        return "\n".join(lines)


# ---- what shapes a weight ---------------------------------------------------------------------------

# Checkpoint-key fragment -> the config fields that fix the tensor's shape; the first match wins.
_SHAPED_BY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("word_embeddings.", ("vocab_size", "hidden_size")),
    ("output_layer.", ("vocab_size", "hidden_size")),
    ("position_embeddings.", ("seq_length", "hidden_size")),
    ("tokentype_embeddings.", ("num_tokentypes", "hidden_size")),
    ("linear_qkv.layer_norm", ("hidden_size",)),
    ("linear_qkv.", ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")),
    ("linear_proj.", ("hidden_size", "num_attention_heads", "kv_channels")),
    ("q_layernorm.", ("kv_channels",)),
    ("k_layernorm.", ("kv_channels",)),
    ("mlp.router.", ("num_moe_experts", "hidden_size")),
    ("shared_experts.", ("moe_shared_expert_intermediate_size", "hidden_size", "gated_linear_unit")),
    ("experts.", ("num_moe_experts", "moe_ffn_hidden_size", "hidden_size", "gated_linear_unit")),
    ("linear_fc1.layer_norm", ("hidden_size",)),
    ("linear_fc1.", ("ffn_hidden_size", "hidden_size", "gated_linear_unit")),
    ("linear_fc2.", ("ffn_hidden_size", "hidden_size")),
    ("", ("hidden_size",)),
)


def shaped_by(checkpoint_key: str) -> tuple[str, ...]:
    """The config fields that fix the shape of the tensor stored under ``checkpoint_key``; tensors of
    stacked layers (``...layers.<name>``, a leading layer axis) also depend on ``num_layers``."""
    fields = next(fields for fragment, fields in _SHAPED_BY if fragment in checkpoint_key)
    return (*fields, "num_layers") if re.search(r"\blayers\.(?!\d)", checkpoint_key) else fields


def _fields_text(fields: tuple[str, ...], config: Any) -> str:
    if config is None:
        return ", ".join(fields)
    return ", ".join(f"{name}={getattr(config, name, '?')}" for name in fields)


# ---- the direct reader ------------------------------------------------------------------------------

# Legacy storage class names in a torch.save pickle -> dtype (others take the stock path).
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Unsupported(Exception):
    """An item this reader does not parse: the stock path reads it."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorLayout:
    """Where a stored tensor's elements are: ``data_offset`` (bytes, in the .distcp file) of its
    storage, and the view (offset, size, stride, in elements) that ``torch.save`` recorded."""

    data_offset: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage, storage_offset, tuple(size), tuple(stride)


class _TensorPickle(pickle.Unpickler):
    """Reads the ``data.pkl`` of a torch.save'd plain tensor into (storage, offset, size, stride);
    any other global is refused (and the stock ``torch.load`` handles the item)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise _Unsupported(str(pid))
        return _Storage(str(key), _STORAGE_DTYPES[storage_type], int(numel))


class _ItemFile(io.RawIOBase):
    """One stored item (a byte range of a .distcp file) as a seekable file, read with pread, so
    threads share one descriptor."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self.fd, self.offset, self.length, self.pos, self.bytes_read = fd, offset, length, 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(0, self.length - self.pos)]
        n = _pread_into(self.fd, view, self.offset + self.pos)
        self.pos += n
        self.bytes_read += n
        return n


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` (fewer bytes only at the end of the file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _item_layout(item: _ItemFile) -> _TensorLayout:
    """Parse the zip archive torch.save wrote for one tensor: its pickle and where its storage starts."""
    try:
        with zipfile.ZipFile(item) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise _Unsupported("not one data.pkl")
            root = pickles[0][: -len("data.pkl")]
            if f"{root}byteorder" in names and archive.read(f"{root}byteorder") != sys.byteorder.encode():
                raise _Unsupported("byte order")
            built = _TensorPickle(io.BytesIO(archive.read(pickles[0]))).load()
            storage, storage_offset, size, stride = built
            info = archive.getinfo(f"{root}data/{storage.key}")
            if (
                info.compress_type != zipfile.ZIP_STORED
                or info.file_size != storage.numel * storage.dtype.itemsize
            ):
                raise _Unsupported("compressed or sized unlike its storage")
            item.seek(info.header_offset)
            header = item.read(30)
            if header[:4] != b"PK\x03\x04":
                raise _Unsupported("no local header")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        struct.error,
        LookupError,
        ValueError,
        TypeError,
        AttributeError,
        EOFError,
    ) as error:
        raise _Unsupported(str(error)) from None
    data_offset = item.offset + info.header_offset + 30 + name_length + extra_length
    return _TensorLayout(data_offset, storage.dtype, storage_offset, size, stride)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _read_direct(
    fd: int,
    layout: _TensorLayout,
    req: ReadItem,
    target: torch.Tensor,
    scratch: Callable[[int], torch.Tensor] | None = None,
) -> int:
    """Copy the requested region of a stored tensor into ``target``; returns bytes read. Reads only
    the span of storage the region covers, straight into ``target`` when it is one contiguous run of
    the same dtype in host memory, else through a byte buffer (``scratch(nbytes)`` when given: a
    fresh allocation per tensor costs a page fault per 4 KiB, every load)."""
    lengths = tuple(req.lengths)
    if any(n == 0 for n in lengths):
        return 0
    first = layout.storage_offset + sum(o * s for o, s in zip(req.storage_offsets, layout.stride))
    span = 1 + sum((n - 1) * s for n, s in zip(lengths, layout.stride))
    itemsize = layout.dtype.itemsize
    offset = layout.data_offset + first * itemsize
    numel = target.numel()
    dense = span == numel and all(
        s == c for n, s, c in zip(lengths, layout.stride, _contiguous_strides(lengths)) if n > 1
    )
    if dense and target.dtype == layout.dtype and target.device.type == "cpu" and target.is_contiguous():
        view = memoryview(target.view(-1).view(torch.uint8).numpy())
        if _pread_into(fd, view, offset) != len(view):
            raise OSError(f"short read at byte {offset}")
        return len(view)
    buffer = scratch(span * itemsize) if scratch else torch.empty(span * itemsize, dtype=torch.uint8)
    if _pread_into(fd, memoryview(buffer.numpy()), offset) != buffer.numel():
        raise OSError(f"short read at byte {offset}")
    source = buffer.view(layout.dtype).as_strided(lengths, tuple(s for s in layout.stride))
    target.copy_(source)
    return buffer.numel()


def _read_stock(fd: int, storage: Any, req: ReadItem, target: torch.Tensor) -> int:
    """The stock reader's way: torch.load the whole item, narrow it, copy it."""
    raw = bytearray(storage.length)
    _pread_into(fd, memoryview(raw), storage.offset)
    tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    target.copy_(tensor[tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))])
    return storage.length


class _Progress:
    """A progress line on stderr, shown only once a load has taken more than a moment."""

    def __init__(self, enabled: bool, label: str, delay: float = 1.0):
        self.enabled, self.label, self.delay = enabled, label, delay
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.start < self.delay or now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last, self.shown = now, True
        line = (
            f"{self.label}: {done / 1e6:,.0f}/{total / 1e6:,.0f} MB ({100 * done / max(total, 1):.0f}%) "
            f"{now - self.start:.1f} s"
        )
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()

    def finish(self, done: int, total: int) -> None:
        if self.shown:
            self.last = 0.0
            self.update(done, total)
            if self.tty:
                sys.stderr.write("\n")


class _DirectReader(FileSystemReader):
    """DCP's file-system reader with a faster ``read_data`` (see the module docstring). Targets are
    resolved and committed on the calling thread, as the planner expects; only reads run in threads."""

    def __init__(self, path: str | os.PathLike[str], metadata: Metadata, progress: _Progress, threads: int):
        super().__init__(path)
        self.metadata, self.progress, self.threads = metadata, progress, threads
        self.bytes_read = self.stock_reads = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        if any(self.storage_data[r.storage_index].transform_descriptors for r in plan.items):
            self.stock_reads += len(plan.items)  # DCP stream extensions: the stock path knows them
            return super().read_data(plan, planner)
        files: dict[str, int] = {}
        try:
            for relative in {self.storage_data[r.storage_index].relative_path for r in plan.items}:
                files[relative] = os.open(os.path.join(self.path, relative), os.O_RDONLY)
            jobs = []
            for req in plan.items:
                storage = self.storage_data[req.storage_index]
                fd = files[storage.relative_path]
                if req.type == LoadItemType.BYTE_IO:
                    raw = bytearray(storage.length)
                    self.bytes_read += _pread_into(fd, memoryview(raw), storage.offset)
                    planner.load_bytes(req, io.BytesIO(raw))
                    continue
                target = planner.resolve_tensor(req).detach()
                if type(target) is not torch.Tensor:  # a tensor subclass (FP8): stock path, committed at once
                    self.bytes_read += _read_stock(fd, storage, req, target)
                    self.stock_reads += 1
                    planner.commit_tensor(req, target)
                    continue
                jobs.append((fd, storage, req, target))
            self._run(jobs)
            for _, _, req, target in jobs:
                planner.commit_tensor(req, target)
        finally:
            for fd in files.values():
                os.close(fd)
        done: torch.futures.Future[None] = torch.futures.Future()
        done.set_result(None)
        return done

    def _run(self, jobs: list[tuple[int, Any, ReadItem, torch.Tensor]]) -> None:
        total = sum(storage.length for _, storage, _, _ in jobs)
        lock, done, local = threading.Lock(), [0], threading.local()

        def scratch(nbytes: int) -> torch.Tensor:
            """One byte buffer per thread for the whole load, grown as needed."""
            buffer = getattr(local, "buffer", None)
            if buffer is None or buffer.numel() < nbytes:
                buffer = local.buffer = torch.empty(nbytes, dtype=torch.uint8)
            return buffer[:nbytes]

        def read(fd: int, storage: Any, req: ReadItem, target: torch.Tensor) -> None:
            item = _ItemFile(fd, storage.offset, storage.length)
            stock = False
            try:
                n = _read_direct(fd, _item_layout(item), req, target, scratch) + item.bytes_read
            except _Unsupported:
                n, stock = _read_stock(fd, storage, req, target) + item.bytes_read, True
            with lock:
                self.bytes_read += n
                self.stock_reads += stock
                done[0] += storage.length

        with futures.ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending = {pool.submit(read, *job) for job in jobs}
            while pending:
                finished, pending = futures.wait(pending, timeout=0.2, return_when=futures.FIRST_EXCEPTION)
                for job in finished:
                    job.result()  # re-raise a failed read here
                self.progress.update(done[0], total)
        self.progress.finish(done[0], total)


class _DirectLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron's torch_dist load (translation to DCP, shape validation, key mapping) with the
    direct reader and the metadata read beforehand."""

    def __init__(self, metadata: Metadata, progress: _Progress, threads: int):
        super().__init__()
        self.metadata, self.progress, self.threads = metadata, progress, threads
        self.bytes_read = self.stock_reads = 0

    def load(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        by_key, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=True)
        reader = _DirectReader(checkpoint_dir, self.metadata, self.progress, self.threads)
        dcp_load(
            pyt_state_dict,
            storage_reader=reader,
            planner=MCoreLoadPlanner(
                shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
                allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch},
            ),
        )
        self.bytes_read, self.stock_reads = reader.bytes_read, reader.stock_reads
        loaded = {key: _unwrap_pyt_sharded_tensor(value) for key, value in pyt_state_dict.items()}
        loaded = _replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
        _restore_dict_types(loaded, sharded_state_dict)
        return loaded


# ---- the loader ---------------------------------------------------------------------------------------


def _reader_threads() -> int:
    """Up to 4 reader threads per process, sharing the cores with the other processes on this node
    (torchrun's LOCAL_WORLD_SIZE): more threads than cores only adds contention."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // per_node))


def weights_dir(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """``<ckpt>/weights``; a path that already is a weights folder is taken as it is."""
    path = Path(checkpoint_dir)
    if path.name != WEIGHTS_DIR and (path / WEIGHTS_DIR).is_dir():
        return path / WEIGHTS_DIR
    return path


def _open_checkpoint(path: Path) -> tuple[Metadata, dict[str, Any]]:
    """DCP's metadata and megatron's content metadata, or an error naming what is wrong."""

    def fail(message: str, kind: str, file: Path = path) -> WeightsError:
        return WeightsError([ConfigIssue(message, kind, source=str(file))])

    if not path.is_dir():
        raise fail("no such checkpoint folder (expected <checkpoint>/weights)", "not_found")
    config = maybe_load_config(str(path))
    if config is None:
        raise fail("not a megatron distributed checkpoint: no metadata.json", "not_a_checkpoint")
    if config.sharded_backend != "torch_dist":
        raise fail(
            f"sharded backend {config.sharded_backend!r}: only 'torch_dist' (NeMo 2's format) is read",
            "unsupported_backend",
            path / "metadata.json",
        )
    try:
        metadata = FileSystemReader(path).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise fail(f"cannot read the tensor metadata: {error}", "bad_metadata", path / ".metadata") from None
    content = dist_checkpointing.load_content_metadata(str(path)) or dict(CONTENT_METADATA)
    return metadata, content


@dataclass
class _Request:
    """One rank's plan: what is loaded, skipped, missing, cast, and what is wrong."""

    state_dicts: list[dict[str, Any]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    """Keys whose values now come from the checkpoint."""
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)
    cast: dict[str, tuple[str, str]] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)
    prefixes_used: set[str] = field(default_factory=set)
    key_prefixes: set[str] = field(default_factory=set)


def _built(value: Any) -> list[Any]:
    """The ShardedTensors/ShardedObjects behind a state-dict value (factories built)."""
    out = []
    for item in nested_values(value) if isinstance(value, (dict, list)) else [value]:
        if isinstance(item, ShardedTensorFactory):
            out.extend(_built(item.build()))
        elif isinstance(item, (ShardedTensor, ShardedObject)):
            out.append(item)
    return out


def _dot_prefixes(key: str) -> set[str]:
    parts = key.split(".")
    return {".".join(parts[:i]) + "." for i in range(1, len(parts))} | {key}


def _plan(
    chunks: list[Any], content: dict[str, Any], metadata: Metadata, skip: list[str], source: str
) -> _Request:
    stored = metadata.state_dict_metadata
    request = _Request()
    for index, chunk in enumerate(chunks):
        config = getattr(chunk, "config", None)
        kept: dict[str, Any] = {}
        for key, value in chunk.sharded_state_dict(prefix=MODULE_PREFIX, metadata=dict(content)).items():
            name = key.removeprefix(MODULE_PREFIX)
            shown = f"model_{index}.{name}" if index else name
            if "_extra_state" in name:
                continue
            request.key_prefixes |= _dot_prefixes(name)
            prefix = next((p for p in skip if name.startswith(p)), None)
            if prefix is not None:
                request.skipped[shown] = prefix
                request.prefixes_used.add(prefix)
                continue
            absent = []
            for item in _built(value):
                if isinstance(item, ShardedObject):
                    if item.unique_key not in stored:
                        absent.append(item.unique_key)
                    continue
                entry = stored.get(item.key)
                if not isinstance(entry, TensorStorageMetadata):
                    absent.append(item.key)
                elif tuple(entry.size) != tuple(item.global_shape):
                    fields = shaped_by(item.key)
                    request.issues.append(
                        ConfigIssue(
                            f"shape mismatch for checkpoint key {item.key!r}: the checkpoint has "
                            f"{tuple(entry.size)}, the model {tuple(item.global_shape)}; the shape follows "
                            f"{_fields_text(fields, config)} (the model's values)",
                            "shape_mismatch",
                            (shown,),
                            {"checkpoint": list(entry.size), "model": list(item.global_shape)},
                            source,
                        )
                    )
                else:
                    # Shapes are checked: megatron need not zero a flexible-shape tensor (embeddings)
                    # before reading it, nor tolerate a mismatch.
                    item.allow_shape_mismatch = False
                    if entry.properties.dtype != item.dtype:
                        request.cast[shown] = (str(entry.properties.dtype), str(item.dtype))
            if absent:
                request.missing.append((shown, absent[0]))
                continue
            kept[key] = value
            request.loaded.append(shown)
        request.state_dicts.append(kept)
    return request


def _agree(request: _Request, metadata: Metadata, skip: list[str], strict: bool, source: str) -> None:
    """Raise the same WeightsError on every rank if any rank found a problem. A skip prefix is in use
    if it matches a model key on some rank, or a checkpoint key (a chunk of a virtual pipeline, loaded
    on its own, need not hold every key its prefixes are meant for)."""
    mine = (request.issues, request.missing, request.prefixes_used, request.key_prefixes)
    everyone = [mine]
    if dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    issues: dict[tuple[Any, ...], ConfigIssue] = {}
    keys = {
        prefix
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
        for prefix in _dot_prefixes(key.removeprefix(MODULE_PREFIX))
    }
    used = {p for p in skip if any(k.startswith(p) for k in keys)}
    for rank_issues, rank_missing, rank_used, rank_keys in everyone:
        for issue in rank_issues:
            issues.setdefault((issue.type, issue.loc), issue)
        if strict:
            for shown, ckpt_key in rank_missing:
                issues.setdefault(
                    ("missing", (shown,)),
                    ConfigIssue(
                        f"not in the checkpoint (checkpoint key {ckpt_key!r}); skip it with a prefix in "
                        "initial_ckpt_skip_keys_with_these_prefixes, or load with strict=False",
                        "missing_in_checkpoint",
                        (shown,),
                        source=source,
                    ),
                )
        used |= rank_used
        keys |= rank_keys
    for prefix in skip:
        if prefix not in used:
            near = difflib.get_close_matches(prefix, sorted(keys), n=3, cutoff=0.5)
            hint = f"; nearest keys: {', '.join(near)}" if near else ""
            issues[("unused_prefix", (prefix,))] = ConfigIssue(
                f"skip prefix matches no key of the model or the checkpoint{hint}",
                "unused_skip_prefix",
                ("skip_keys_with_these_prefixes",),
                prefix,
                source,
            )
    if issues:
        raise WeightsError(issues.values())


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

    ``distributed_checkpoint_dir`` is the checkpoint (its ``weights/`` is read) or the weights folder.
    Model keys starting with one of ``skip_keys_with_these_prefixes`` keep their values, as do
    ``_extra_state`` entries; checkpoint keys the model does not ask for are ignored. Raises
    WeightsError, before any weight changes, for: a model key the checkpoint lacks (with
    ``strict=False`` it is reported instead), a skip prefix that matches no key of the model (on any
    rank) or of the checkpoint, a shape that differs from the checkpoint's. Values stored in another
    dtype are cast. A progress line appears on rank 0's stderr when the read takes more than a
    second, unless ``quiet``.
    """
    start = time.perf_counter()
    path = weights_dir(distributed_checkpoint_dir)
    source = str(path)
    skip = sorted(set(skip_keys_with_these_prefixes))
    metadata, content = _open_checkpoint(path)
    chunks = model_chunks(model)
    with ensure_parallel_state():
        request = _plan(chunks, content, metadata, skip, source)
        _agree(request, metadata, skip, strict, source)
        rank = dist.get_rank()
        progress = _Progress(not quiet and rank == 0, f"loading {source}")
        strategy = _DirectLoadStrategy(metadata, progress, threads=_reader_threads())
        requested = (
            request.state_dicts[0]
            if len(chunks) == 1
            else {f"model_{i}": d for i, d in enumerate(request.state_dicts)}
        )
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
