"""The fast reader behind a weight load: DCP's file-system reader with its ``read_data`` replaced.

The stock DCP reader ``torch.load``s each stored item and copies it into the target; this one reads
the item's raw bytes (located through the zip archive ``torch.save`` wrote) straight into the target
tensor where the layouts allow it, from several threads sharing one descriptor per file, and falls
back to the stock per-item path (``torch.load(weights_only=True)``) for anything else.

A stored item that cannot be read (a damaged zip archive, a short read, a tensor unlike the index's
chunk) raises ``ReadFailure`` naming the file and the checkpoint key: DCP gathers it from every rank
and the loader turns it into a CheckpointError. Every stored item is loaded with weights-only
semantics, bytes items included (DCP's own planner unpickles those with ``weights_only=False``).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import stat
import struct
import sys
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from tqdm import tqdm

from bioconf.checkpoint.unpickling import RestrictedUnpickler
from bioconf.runtime.weights.plan import Damage, shard_path

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


class _Corrupt(Exception):
    """An item whose bytes are not what torch.save wrote (its zip archive is damaged, it lies beyond
    its file): no reader can load it."""


class ReadFailure(Exception):
    """A stored item that cannot be read: ``damage`` is the plan's ``Damage`` tuple. Built from plain
    strings so that it pickles: DCP gathers every rank's failure to every rank."""

    def __init__(self, kind: str, source: str, what: str, key: str):
        super().__init__(kind, source, what, key)

    @property
    def damage(self) -> Damage:
        kind, source, what, key = self.args
        return kind, source, what, key

    def __str__(self) -> str:
        _, source, what, key = self.args
        return f"{source}: {what} (checkpoint key {key})"


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception in one line: torch.load's weights-only errors run to a page, with the reason in
    the middle (``WeightsUnpickler error: ...``)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = "weights-only unpickler: " + text.split(marker, 1)[1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


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


class _TensorPickle(RestrictedUnpickler):
    """Reads the ``data.pkl`` of a torch.save'd plain tensor into (storage, offset, size, stride);
    any other global is refused (and the stock ``torch.load`` handles the item)."""

    GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): OrderedDict,
        **{("torch", name): name for name in _STORAGE_DTYPES},
    }

    def __init__(self, file: Any):
        super().__init__(file, self.GLOBALS)

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise _Unsupported(str(pid))
        return _Storage(str(key), _STORAGE_DTYPES[storage_type], int(numel))


def open_shard(weights: str, relative: str, key: str) -> int:
    """A shard's descriptor. Its path is resolved and checked to lie in the weights folder again
    (the plan checked it before), and opened with O_NOFOLLOW: a link swapped in since is refused."""
    where = os.path.join(weights, relative)
    try:
        resolved = shard_path(weights, relative)
    except ValueError as error:
        raise ReadFailure("shard_outside", where, str(error), key) from None
    with _naming(where, key):
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            os.close(fd)
            raise
    if not regular:
        os.close(fd)
        raise ReadFailure("shard_not_a_file", where, "not a regular file", key)
    return fd


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
        n = pread_into(self.fd, view, self.offset + self.pos)
        self.pos += n
        self.bytes_read += n
        return n


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` (fewer bytes only at the end of the file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _item_layout(item: _ItemFile) -> _TensorLayout:
    """Parse the zip archive torch.save wrote for one tensor: its pickle and where its storage starts.
    Raises _Unsupported for what torch.load may still read (no zip at all: torch's legacy format;
    another kind of object or storage), _Corrupt for a damaged archive (zipfile checks the pickle's
    CRC: a flipped bit there could otherwise rebuild a wrong view of the right bytes)."""
    try:
        archive = zipfile.ZipFile(item)
    except zipfile.BadZipFile as error:
        raise _Unsupported(str(error)) from None
    except (OSError, EOFError, ValueError, struct.error) as error:
        raise _Corrupt(f"unreadable zip archive ({error})") from None
    try:
        with archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise _Unsupported("not one data.pkl")
            root = pickles[0][: -len("data.pkl")]
            if f"{root}byteorder" in names and archive.read(f"{root}byteorder") != sys.byteorder.encode():
                raise _Unsupported("byte order")
            pickled = archive.read(pickles[0])  # checked against its CRC: damage is _Corrupt
            try:
                built = _TensorPickle(io.BytesIO(pickled)).load()
            except Exception as error:  # a refused global, a malformed pickle: torch.load decides
                raise _Unsupported(str(error)) from None
            try:
                storage, storage_offset, size, stride = built
                info = archive.getinfo(f"{root}data/{storage.key}")
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                raise _Unsupported(str(error)) from None
            if (
                info.compress_type != zipfile.ZIP_STORED
                or info.file_size != storage.numel * storage.dtype.itemsize
            ):
                raise _Unsupported("compressed or sized unlike its storage")
            item.seek(info.header_offset)
            header = item.read(30)
            if header[:4] != b"PK\x03\x04":
                raise _Corrupt(f"no zip entry where the archive's directory places {info.filename!r}")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            if item.read(name_length) != info.filename.encode():
                raise _Corrupt(f"the zip entry of {info.filename!r} carries another name")
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        LookupError,
        EOFError,
        struct.error,
        OSError,
    ) as error:
        raise _Corrupt(f"damaged zip archive ({error})") from None
    if not (
        isinstance(storage_offset, int)
        and all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride))
        and len(size) == len(stride)
    ):
        raise _Unsupported("a view torch.save does not write")
    if math.prod(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise _Corrupt(f"its view {size} at {storage_offset} reaches past its storage of {storage.numel}")
    data_offset = item.offset + info.header_offset + 30 + name_length + extra_length
    if data_offset + info.file_size > item.offset + item.length:
        raise _Corrupt("its storage runs past the end of the item")
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
        if (n := pread_into(fd, view, offset)) != len(view):
            raise _Corrupt(f"the file ends at byte {offset + n:,}, inside the item")
        return len(view)
    buffer = scratch(span * itemsize) if scratch else torch.empty(span * itemsize, dtype=torch.uint8)
    if (n := pread_into(fd, memoryview(buffer.numpy()), offset)) != buffer.numel():
        raise _Corrupt(f"the file ends at byte {offset + n:,}, inside the item")
    source = buffer.view(layout.dtype).as_strided(lengths, tuple(s for s in layout.stride))
    target.copy_(source)
    return buffer.numel()


def _read_item(fd: int, storage: Any) -> bytes:
    """A stored item's bytes, all of them."""
    raw = bytearray(storage.length)
    if (n := pread_into(fd, memoryview(raw), storage.offset)) != storage.length:
        raise _Corrupt(f"the file ends at byte {storage.offset + n:,}, inside the item")
    return bytes(raw)


def _read_stock(fd: int, storage: Any, req: ReadItem, target: torch.Tensor, shape: tuple[int, ...]) -> int:
    """The stock reader's way: torch.load the whole item (weights only), check it is the tensor of
    ``shape`` the index describes, narrow it, copy it (torch would broadcast a wrong shape)."""
    try:
        tensor = torch.load(io.BytesIO(_read_item(fd, storage)), map_location="cpu", weights_only=True)
    except _Corrupt:
        raise
    except Exception as error:  # whatever torch.load raises on bytes it did not write
        raise _Corrupt(f"not a tensor torch.load reads ({one_line(error)})") from None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise _Corrupt(f"holds {found}, the index says a tensor of {shape}")
    target.copy_(tensor[tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))])
    return storage.length


def progress_bar(enabled: bool, label: str) -> tqdm:
    """A progress bar on stderr (bytes read), shown only on a terminal and only once a load has taken
    more than a second; ``enabled`` is False on every rank but 0 and with ``quiet``."""
    return tqdm(
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=1.0,
        leave=False,
        disable=not (enabled and sys.stderr.isatty()),
        file=sys.stderr,
    )


@contextmanager
def _naming(where: str, key: str) -> Iterator[None]:
    """Turn a damaged item or a failed read into a ReadFailure naming the file and the key."""
    try:
        yield
    except _Corrupt as error:
        raise ReadFailure("shard_corrupt", where, f"a damaged stored item: {error}", key) from None
    except OSError as error:
        raise ReadFailure(
            "shard_unreadable", where, f"cannot be read: {error.strerror or error}", key
        ) from None


class _DirectReader(FileSystemReader):
    """DCP's file-system reader with a faster ``read_data`` (see the module docstring). Targets are
    resolved and committed on the calling thread, as the planner expects; only reads run in threads."""

    def __init__(self, path: str | os.PathLike[str], metadata: Metadata, progress: tqdm, threads: int):
        super().__init__(path)
        self.metadata, self.progress, self.threads = metadata, progress, threads
        self.bytes_read = self.stock_reads = 0
        self.shapes = {
            MetadataIndex(key, chunk.offsets): tuple(chunk.sizes)
            for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
            for chunk in entry.chunks
        }

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def _where(self, storage: Any) -> str:
        return os.path.join(self.path, storage.relative_path)

    def _open(self, storage: Any, key: str) -> int:
        return open_shard(str(self.path), storage.relative_path, key)

    def _shape(self, req: ReadItem) -> tuple[int, ...]:
        """The shape the index gives the stored chunk ``req`` reads from."""
        try:
            return self.shapes[req.storage_index]
        except KeyError:
            raise _Corrupt("not a chunk of the index") from None

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        if any(self.storage_data[r.storage_index].transform_descriptors for r in plan.items):
            self._read_extended(plan, planner)
        else:
            self._read_plain(plan, planner)
        done: torch.futures.Future[None] = torch.futures.Future()
        done.set_result(None)
        return done

    def _read_extended(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """DCP stream extensions: the stock path knows them; one item at a time, so that a failure
        names its key."""
        for req in plan.items:
            storage = self.storage_data[req.storage_index]
            try:
                super().read_data(replace(plan, items=[req]), planner)
            except Exception as error:  # whatever the stock reader and torch.load raise
                what = f"a stored item that cannot be read ({one_line(error)})"
                raise ReadFailure(
                    "shard_corrupt", self._where(storage), what, req.storage_index.fqn
                ) from None
            self.stock_reads += 1

    def _read_plain(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        files: dict[str, int] = {}
        try:
            jobs = []
            for req in plan.items:
                storage = self.storage_data[req.storage_index]
                key, where = req.storage_index.fqn, self._where(storage)
                if storage.relative_path not in files:
                    files[storage.relative_path] = self._open(storage, key)
                fd = files[storage.relative_path]
                if req.type == LoadItemType.BYTE_IO:
                    with _naming(where, key):
                        raw = _read_item(fd, storage)
                        self.bytes_read += len(raw)
                        try:
                            planner.load_bytes(req, io.BytesIO(raw))
                        except Exception as error:  # torch.load(weights_only=True) on foreign bytes
                            raise _Corrupt(f"not an object torch.load reads ({one_line(error)})") from None
                    continue
                target = planner.resolve_tensor(req).detach()
                if type(target) is not torch.Tensor:  # a tensor subclass (FP8): stock path, committed at once
                    with _naming(where, key):
                        self.bytes_read += _read_stock(fd, storage, req, target, self._shape(req))
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
            with _naming(self._where(storage), req.storage_index.fqn):
                shape = self._shape(req)
                try:
                    layout = _item_layout(item)
                    if layout.size != shape:
                        raise _Corrupt(f"holds a tensor of {layout.size}, the index says {shape}")
                    n = _read_direct(fd, layout, req, target, scratch) + item.bytes_read
                except _Unsupported:
                    n, stock = _read_stock(fd, storage, req, target, shape) + item.bytes_read, True
            with lock:
                self.bytes_read += n
                self.stock_reads += stock
                done[0] += storage.length

        with futures.ThreadPoolExecutor(max_workers=self.threads) as pool:
            self.progress.reset(total=total)
            pending = {pool.submit(read, *job) for job in jobs}
            try:
                while pending:
                    finished, pending = futures.wait(
                        pending, timeout=0.2, return_when=futures.FIRST_EXCEPTION
                    )
                    for job in finished:
                        job.result()  # re-raise a failed read here
                    self.progress.update(done[0] - self.progress.n)
            except BaseException:
                for job in pending:  # reads not started yet: the load has failed
                    job.cancel()
                raise


class _WeightsOnlyPlanner(MCoreLoadPlanner):
    """megatron's load planner with bytes items loaded as weights only, as every tensor is (DCP's
    ``DefaultLoadPlanner.load_bytes`` unpickles them with ``weights_only=False``)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class DirectLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron's torch_dist load (translation to DCP, shape validation, key mapping) with the
    direct reader and the metadata read beforehand."""

    def __init__(self, metadata: Metadata, progress: tqdm, threads: int):
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
            planner=_WeightsOnlyPlanner(
                shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
                allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch},
            ),
        )
        self.bytes_read, self.stock_reads = reader.bytes_read, reader.stock_reads
        loaded = {key: _unwrap_pyt_sharded_tensor(value) for key, value in pyt_state_dict.items()}
        loaded = _replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
        _restore_dict_types(loaded, sharded_state_dict)
        return loaded
