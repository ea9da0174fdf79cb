"""The direct path of a weight load: plain tensors read from the shard files straight into the
model's own tensors, without megatron's and DCP's load machinery (their planning, validation and
collectives cost more than reading a small model).

``plan.plan_load`` has checked every requested tensor against the index (keys, shapes, chunks that
tile each tensor, files that are long enough); what is left here is reading:

1. the part of each stored chunk the rank keeps is a region of its target (``_regions``); the
   regions, in file order, are cut into one contiguous stream per reader thread (``_streams``), and
   the kernel is told of every item they read (``POSIX_FADV_WILLNEED``), so that each thread reads
   its part of the files front to back (on a cold page cache that is what makes the disk the limit);
2. a thread takes each region of its stream in turn: the stored item's head and tail (the zip
   records ``torch.save`` wrote around the tensor's bytes) are read and parsed (``_fast_layout``;
   anything that parser does not expect is parsed by ``reader._item_layout``, zipfile, or read
   the stock way), then the region's bytes are read (``_plan_read``): a dense region in one span
   straight into the target; a column block of a row-major tensor (a row-parallel weight at
   TP > 1) as ``_Rows``, by ``preadv`` calls whose vectors alternate the target's rows and a discard
   buffer for the bytes between them (where those gaps are long, a call per row, so that the rank
   reads only the bytes it keeps). Parsing one item overlaps reading others on the other threads.

Targets that cannot be written in place (another dtype, not in host memory, not contiguous) are
read into a per-thread scratch buffer and copied. A load takes this path when every rank's request
is plain ShardedTensors in plain stored items (``eligible``); otherwise megatron's load with
``reader.DirectLoadStrategy`` runs, as before.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import struct
import sys
import threading
import zlib
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from bioconf.runtime.weights.reader import (
    _STORAGE_DTYPES,
    ReadFailure,
    _Corrupt,
    _item_layout,
    _ItemFile,
    _naming,
    _read_item,
    _TensorLayout,
    _TensorPickle,
    _Unsupported,
    one_line,
    open_shard,
    pread_into,
)

ROW_READS_FROM_GAP = 64 << 10
"""A strided region (a row-parallel weight's part: one span per row) is read with a system call per
row, skipping the gaps, only when the gaps between its rows are at least this long; shorter gaps are
read into a discard buffer by the same ``preadv`` call as the rows around them. A call of its own
costs a row ~2 us here, the time to copy ~16 KB from the page cache, and a gap under a page or two
saves no disk work (readahead reads it anyway), so only large gaps (high TP) are worth skipping."""
_IOV_MAX = 1024
_HEAD = 1024
"""Bytes read at each end of a stored item to find its zip records (torch.save writes ~700 before
the tensor's bytes and ~900 after); an item whose records lie further in is parsed by zipfile."""


def eligible(state_dicts: Iterable[dict[str, Any]], metadata: Metadata, needed: set[str]) -> bool:
    """Whether this rank's request is plain ShardedTensors of plain host or device tensors, stored as
    plain tensor items (no DCP stream transforms): what this path reads."""
    for state in state_dicts:
        for value in state.values():
            if not isinstance(value, ShardedTensor) or value.flattened_range is not None:
                return False
            if type(value.data) is not torch.Tensor and type(value.data) is not torch.nn.Parameter:
                return False
    stored = metadata.state_dict_metadata
    for key in needed:
        if not isinstance(stored.get(key), TensorStorageMetadata):
            return False
    for index, info in metadata.storage_data.items():
        if index.fqn in needed and info.transform_descriptors:
            return False
    return True


@dataclass
class _Rows:
    """``count`` rows of ``length`` bytes, ``pitch`` bytes apart from ``offset`` in a file, into the
    consecutive ``length``-byte pieces of ``dest``."""

    offset: int
    length: int
    pitch: int
    count: int
    dest: memoryview

    def span(self, first: int, count: int) -> tuple[int, int]:
        """File offset and length of rows ``first`` to ``first + count``, the gaps between them included."""
        return self.offset + first * self.pitch, (count - 1) * self.pitch + self.length


@dataclass
class _Region:
    """The part of one stored chunk one target keeps."""

    key: str
    fd: int
    where: str
    item: Any  # _StorageInfo
    shape: tuple[int, ...]  # the stored chunk's, from the index
    src_offsets: tuple[int, ...]  # in the chunk
    lengths: tuple[int, ...]
    dest: torch.Tensor  # the target's view of the region
    layout: _TensorLayout | None = None
    dense: tuple[int, memoryview] | None = None  # (file offset, the target's bytes): read in place
    rows: _Rows | None = None  # read in place
    staged: tuple[int, int] | None = None  # (file offset, nbytes) read into scratch, then copied


@lru_cache(maxsize=256)
def _unpickle(raw: bytes) -> Any:
    """The (storage, offset, size, stride) of a tensor pickle; the same bytes give the same answer."""
    return _TensorPickle(_BytesFile(raw)).load()


class _BytesFile:
    def __init__(self, raw: bytes):
        self.raw, self.pos = raw, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.raw) if n < 0 else self.pos + n
        out = self.raw[self.pos : end]
        self.pos += len(out)
        return out

    def readline(self) -> bytes:
        end = self.raw.find(b"\n", self.pos)
        end = len(self.raw) if end < 0 else end + 1
        out = self.raw[self.pos : end]
        self.pos = end
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _fast_layout(head: bytes, tail: bytes, base: int, length: int) -> _TensorLayout | None:
    """The layout of one stored item from its first and last bytes (``head`` at item offset 0,
    ``tail`` ending at ``length``), for the archives torch.save writes (no zip64 sizes, no comment,
    entries stored, directory in the tail, records of the pickle and the storage in the head, the pickle's
    CRC right); None for anything else, which ``_item_layout`` then parses (and refuses if damaged).
    ``base`` is the item's offset in its file."""
    try:
        if len(tail) < 22 or tail[-22:-18] != b"PK\x05\x06":
            return None
        _, _, _, entries, cd_size, cd_off, comment = struct.unpack_from("<HHHHIIH", tail, len(tail) - 18)
        tail_start = length - len(tail)
        if comment or cd_off < tail_start or entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_off):
            return None
        between = length - 22 - (cd_off + cd_size)  # torch writes a zip64 end record and locator
        end = cd_off + cd_size - tail_start
        if between and not (
            between == 76
            and tail[end : end + 4] == b"PK\x06\x06"
            and tail[end + 56 : end + 60] == b"PK\x06\x07"
        ):
            return None
        pos, names = cd_off - tail_start, {}
        for _ in range(entries):
            if tail[pos : pos + 4] != b"PK\x01\x02":
                return None
            flag, method, _, _, crc, csize, usize, nlen, xlen, clen = struct.unpack_from(
                "<HHHHIIIHHH", tail, pos + 8
            )
            lho = struct.unpack_from("<I", tail, pos + 42)[0]
            name = tail[pos + 46 : pos + 46 + nlen].decode("utf-8")
            names[name] = (flag, method, crc, csize, usize, lho)
            pos += 46 + nlen + xlen + clen
        if pos != cd_off - tail_start + cd_size:
            return None

        def local(name: str, size: int) -> int | None:
            """Where the entry's bytes start (in the item), its local record checked."""
            flag, method, _, csize, usize, lho = names[name]
            if method != 0 or csize != usize or csize != size or flag & 1:
                return None
            if head[lho : lho + 4] != b"PK\x03\x04":
                return None
            nlen, xlen = struct.unpack_from("<HH", head, lho + 26)
            if head[lho + 30 : lho + 30 + nlen] != name.encode():
                return None
            return lho + 30 + nlen + xlen

        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            return None
        root = pickles[0][: -len("data.pkl")]
        pkl = names[pickles[0]]
        start = local(pickles[0], pkl[3])
        if start is None or start + pkl[3] > len(head):
            return None
        pickled = head[start : start + pkl[3]]
        if zlib.crc32(pickled) != pkl[2]:
            return None
        if f"{root}byteorder" in names:
            order = local(f"{root}byteorder", names[f"{root}byteorder"][3])
            if order is None or head[order : order + names[f"{root}byteorder"][3]] != sys.byteorder.encode():
                return None
        storage, storage_offset, size, stride = _unpickle(bytes(pickled))
        nbytes = storage.numel * storage.dtype.itemsize
        data = local(f"{root}data/{storage.key}", nbytes)
    except (struct.error, UnicodeDecodeError, KeyError, ValueError, TypeError, AttributeError):
        return None
    except Exception:  # a refused global, a malformed pickle: _item_layout decides
        return None
    if data is None or data + nbytes > cd_off or storage.dtype not in _STORAGE_DTYPES.values():
        return None
    if not (
        isinstance(storage_offset, int)
        and all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride))
        and len(size) == len(stride)
    ):
        return None
    if math.prod(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        return None
    return _TensorLayout(base + data, storage.dtype, storage_offset, size, stride)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def _plan_read(region: _Region, layout: _TensorLayout) -> None:
    """How ``region`` is read: straight into the target where the stored and the target layouts agree
    on a contiguous inner block (dense, or rows), else one staged span copied afterwards."""
    lengths, stride, itemsize = region.lengths, layout.stride, layout.dtype.itemsize
    first = layout.storage_offset + sum(o * s for o, s in zip(region.src_offsets, stride))
    dest = region.dest
    direct = dest.device.type == "cpu" and dest.dtype == layout.dtype and dest.is_contiguous()
    # Dims (from the innermost) over which the stored region is dense: one run covers them.
    inner, step = len(lengths), 1
    while inner > 0 and (lengths[inner - 1] == 1 or stride[inner - 1] == step):
        step *= lengths[inner - 1]
        inner -= 1
    dims = [d for d in range(inner) if lengths[d] > 1]
    base = layout.data_offset + first * itemsize
    if not direct or len(dims) > 1 or (dims and dest.dim() == 0):
        span = 1 + sum((n - 1) * s for n, s in zip(lengths, stride))
        region.staged = (base, span * itemsize)
        return
    view, run = _byte_view(dest), step * itemsize
    if not dims:
        region.dense = (base, view)
        return
    (d,) = dims
    region.rows = _Rows(base, run, stride[d] * itemsize, lengths[d], view)


def _copy_staged(region: _Region, buffer: torch.Tensor) -> None:
    layout = region.layout
    assert layout is not None
    source = buffer.view(layout.dtype).as_strided(region.lengths, layout.stride)
    region.dest.copy_(source)


class DirectLoad:
    """Reads every region of a rank's request; ``bytes_read`` counts every byte asked of the kernel
    (zip records, gaps read between rows), ``bytes_kept`` the bytes of the regions."""

    def __init__(self, weights: str, metadata: Metadata, threads: int, progress: Any = None):
        self.weights, self.metadata, self.threads, self.progress = weights, metadata, threads, progress
        self.bytes_read = self.bytes_kept = self.stock_reads = 0
        self.failures: list[Any] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._where: dict[str, str] = {}  # a shard's path, by its name in the index
        self._chunk_index: dict[tuple[str, int], dict[tuple[int, ...], list[Any]]] = {}

    # -- planning ---------------------------------------------------------------------------------

    def _open(self, relative: str, key: str, files: dict[str, int]) -> int:
        if relative in files:
            return files[relative]
        fd = open_shard(self.weights, relative, key)
        files[relative] = fd
        self._where[relative] = os.path.join(self.weights, relative)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def _chunks(self, key: str, chunks: list[Any], stacked: int) -> dict[tuple[int, ...], list[Any]]:
        """The stored chunks of ``key`` by their offsets on the ``stacked`` leading axes (a layer's
        index, for a key megatron stacks over layers): a layer's tensor looks only at its layer's
        chunks, not at every layer's."""
        index = self._chunk_index.get((key, stacked))
        if index is None:
            index = self._chunk_index[key, stacked] = {}
            for chunk in chunks:
                index.setdefault(tuple(chunk.offsets[:stacked]), []).append(chunk)
        return index

    def _regions(self, tensors: list[ShardedTensor], files: dict[str, int]) -> list[_Region]:
        stored, storage = self.metadata.state_dict_metadata, self.metadata.storage_data
        regions = []
        for tensor in tensors:
            entry = stored[tensor.key]
            p = tensor.prepend_axis_num
            target = tensor.data.detach()
            for _ in range(p):
                target = target.unsqueeze(0)
            offsets = tuple(tensor.global_offset)
            lengths = (1,) * p + tuple(tensor.local_shape)
            for chunk in self._chunks(tensor.key, entry.chunks, p).get(offsets[:p], ()):
                lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
                hi = [min(o + n, c + m) for o, n, c, m in zip(offsets, lengths, chunk.offsets, chunk.sizes)]
                if any(a >= b for a, b in zip(lo, hi)):
                    continue
                info = storage[MetadataIndex(tensor.key, torch.Size(chunk.offsets))]
                fd = self._open(info.relative_path, tensor.key, files)
                whole = lo == list(offsets) and hi == [o + n for o, n in zip(offsets, lengths)]
                dest = (
                    target
                    if whole
                    else target[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))]
                )
                regions.append(
                    _Region(
                        tensor.key,
                        fd,
                        self._where[info.relative_path],
                        info,
                        tuple(chunk.sizes),
                        tuple(a - c for a, c in zip(lo, chunk.offsets)),
                        tuple(b - a for a, b in zip(lo, hi)),
                        dest,
                    )
                )
        return regions

    def _layout(self, fd: int, info: Any) -> _TensorLayout | None:
        n = min(info.length, _HEAD)
        head = bytearray(n)
        if pread_into(fd, memoryview(head), info.offset) != n:
            raise _Corrupt(f"the file ends inside the item at byte {info.offset:,}")
        tail = bytearray(n)
        if pread_into(fd, memoryview(tail), info.offset + info.length - n) != n:
            raise _Corrupt(f"the file ends inside the item at byte {info.offset:,}")
        self._count(read=2 * n)
        layout = _fast_layout(bytes(head), bytes(tail), info.offset, info.length)
        if layout is not None:
            return layout
        item = _ItemFile(fd, info.offset, info.length)
        try:
            layout = _item_layout(item)
        except _Unsupported:
            layout = None
        self._count(read=item.bytes_read)
        return layout

    def _stock(self, region: _Region) -> None:
        """torch.load the whole item (weights only), as the stock reader does."""
        raw = _read_item(region.fd, region.item)
        self._count(read=len(raw), stock=1)

        try:
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as error:  # whatever torch.load raises on bytes it did not write
            raise _Corrupt(f"not a tensor torch.load reads ({one_line(error)})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != region.shape:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise _Corrupt(f"holds {found}, the index says a tensor of {region.shape}")
        region.dest.copy_(tensor[tuple(slice(o, o + n) for o, n in zip(region.src_offsets, region.lengths))])
        self._count(kept=math.prod(region.lengths) * region.dest.element_size())

    def _count(self, read: int = 0, kept: int = 0, stock: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_kept += kept
            self.stock_reads += stock

    # -- reading ----------------------------------------------------------------------------------

    def _discard(self, n: int) -> memoryview:
        buffer = getattr(self._local, "discard", None)
        if buffer is None or len(buffer) < n:
            buffer = self._local.discard = memoryview(bytearray(n))
        return buffer[:n]

    def _scratch(self, n: int) -> torch.Tensor:
        buffer = getattr(self._local, "scratch", None)
        if buffer is None or buffer.numel() < n:
            buffer = self._local.scratch = torch.empty(n, dtype=torch.uint8)
        return buffer[:n]

    def _read(self, region: _Region) -> int:
        """Read one planned region into its target; the bytes asked of the kernel."""
        if region.dense is not None:
            offset, view = region.dense
            _fill(region.fd, [view], offset)
            return len(view)
        if region.staged is not None:
            offset, nbytes = region.staged
            buffer = self._scratch(nbytes)
            _fill(region.fd, [memoryview(buffer.numpy())], offset)
            _copy_staged(region, buffer)
            return nbytes
        rows = region.rows
        assert rows is not None
        if rows.pitch - rows.length >= ROW_READS_FROM_GAP:  # a call per row, the gaps skipped
            for i in range(rows.count):
                _fill(region.fd, [rows.dest[i * rows.length : (i + 1) * rows.length]], rows.span(i, 1)[0])
            return rows.count * rows.length
        gap = self._discard(rows.pitch - rows.length)
        for first in range(0, rows.count, _IOV_MAX // 2):
            count = min(_IOV_MAX // 2, rows.count - first)
            vectors = []
            for i in range(first, first + count):
                vectors.append(rows.dest[i * rows.length : (i + 1) * rows.length])
                vectors.append(gap)
            vectors.pop()  # nothing is read after the last row
            _fill(region.fd, vectors, rows.span(first, count)[0])
        return rows.span(0, rows.count)[1]

    def _load(self, region: _Region, layouts: dict[tuple[int, int], _TensorLayout | None]) -> None:
        """One region, on a reader thread: its stored item's records read and parsed (once per item
        and stream: ``layouts``), then its bytes read into the target; an item the parser does not
        take is read the stock way."""
        info = region.item
        with _naming(region.where, region.key):
            ident = (region.fd, info.offset)
            if ident not in layouts:
                layouts[ident] = self._layout(region.fd, info)
            layout = layouts[ident]
            if layout is None:
                self._stock(region)
                return
            if layout.size != region.shape:
                raise _Corrupt(f"holds a tensor of {layout.size}, the index says {region.shape}")
            region.layout = layout
            _plan_read(region, layout)
            read = self._read(region)
        self._count(read=read, kept=math.prod(region.lengths) * layout.dtype.itemsize)

    def _stream(self, regions: list[_Region], stop: threading.Event) -> None:
        """One reader thread's share of the regions, front to back; stops early once one has failed."""
        layouts: dict[tuple[int, int], _TensorLayout | None] = {}
        for region in regions:
            if stop.is_set():
                return
            try:
                self._load(region, layouts)
            except BaseException:
                stop.set()
                raise
            if self.progress is not None:
                with self._lock:
                    self.progress.update(region.item.length)

    def run(self, tensors: list[ShardedTensor]) -> None:
        """Read every tensor; a failure is kept in ``failures`` (a ReadFailure, or another
        exception) for the caller to agree on across ranks."""
        files: dict[str, int] = {}
        try:
            regions = self._regions(tensors, files)
            if self.progress is not None:
                self.progress.reset(total=sum(region.item.length for region in regions))
            streams, stop = _streams(regions, self.threads), threading.Event()
            # The kernel is told of every item this rank reads before the first read (on a cold page
            # cache the disk then reads ahead of every stream); this thread reads the first stream
            # itself, the pool the others.
            pool = _pool(self.threads)
            pending = [pool.submit(_will_need, regions)]
            pending += [pool.submit(self._stream, stream, stop) for stream in streams[1:]]
            try:
                for stream in streams[:1]:
                    self._stream(stream, stop)
            finally:
                futures.wait(pending)  # none still writes into a target, nor uses a file, after this
            for done in pending:
                done.result()
        except ReadFailure as failure:
            self.failures.append(failure)
        except Exception as error:
            self.failures.append(error)
        finally:
            for fd in files.values():
                os.close(fd)


def _will_need(regions: list[_Region]) -> None:
    """``POSIX_FADV_WILLNEED`` for the stored items of ``regions``, adjacent ones merged, in file order."""
    if not hasattr(os, "posix_fadvise"):
        return
    spans = sorted({(region.fd, region.item.offset, region.item.length) for region in regions})
    fd = start = end = -1
    for next_fd, offset, length in [*spans, (-1, -1, 0)]:
        if next_fd == fd and offset <= end:
            end = max(end, offset + length)
            continue
        if fd >= 0:
            with contextlib.suppress(OSError):  # advice: a file system may not take it
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        fd, start, end = next_fd, offset, offset + length


def _fill(fd: int, vectors: list[memoryview], offset: int) -> None:
    """``preadv`` until every vector is full; a file that ends first is damaged."""
    done = 0
    while vectors:
        n = os.preadv(fd, vectors, offset + done)
        if n == 0:
            raise _Corrupt(f"the file ends at byte {offset + done:,}, inside the item")
        done += n
        while vectors and n >= len(vectors[0]):
            n -= len(vectors[0])
            vectors.pop(0)
        if vectors and n:
            vectors[0] = vectors[0][n:]


def _streams(regions: list[_Region], threads: int) -> list[list[_Region]]:
    """The regions in file order, cut into at most ``threads`` contiguous streams of about equal
    stored bytes. A region is not split between threads: one larger than a thread's share makes its
    stream that much longer."""
    ordered = sorted(regions, key=lambda region: (region.where, region.item.offset))
    total = sum(region.item.length for region in ordered)
    count = max(1, min(threads, len(ordered)))
    streams: list[list[_Region]] = [[] for _ in range(count)]
    done = 0
    for region in ordered:
        streams[min(count - 1, done * count // max(total, 1))].append(region)
        done += region.item.length
    return [stream for stream in streams if stream]


_POOLS: dict[int, futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> futures.ThreadPoolExecutor:
    """One reader pool per thread count for the process: starting threads costs about a millisecond
    per load, most of a small model's read."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="bioconf-read"
            )
        return _POOLS[threads]


def picklable(error: BaseException) -> Any:
    """A failure as something every rank can unpickle: ReadFailure as it is, others as text."""
    if isinstance(error, ReadFailure):
        return error
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(one_line(error))
