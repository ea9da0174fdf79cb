"""The direct path of a weight load: plain tensors read from the shard files straight into the
model's own tensors, without megatron's and DCP's load machinery (their planning, validation and
collectives cost more than reading a small model).

``plan.plan_load`` has checked every requested tensor against the index (keys, shapes, chunks that
tile each tensor, files that are long enough); what is left here is reading:

1. each stored item this rank needs is located: its head and tail (the zip records ``torch.save``
   wrote around the tensor's bytes) are read and parsed (``_fast_layout``), or, for anything that
   parser does not expect, parsed by ``reader._item_layout`` (zipfile) as before;
2. the part of each stored chunk the rank keeps becomes runs of bytes (``_runs``): a dense region is
   one run straight into the target tensor, a column block of a row-major tensor (a row-parallel
   weight at TP > 1) one run per row, so that a rank reads only the bytes it keeps;
3. the runs of each file are sorted and coalesced into ``preadv`` calls (gaps within an item under
   ``COALESCE_GAP`` bytes are read into a discard buffer: fewer system calls), split into pieces of
   about ``PIECE`` bytes, read by a thread pool.

Targets that cannot be written in place (another dtype, not in host memory, not contiguous) are
read into a per-thread scratch buffer and copied. A load takes this path when every rank's request
is plain ShardedTensors in plain stored items (``eligible``); otherwise megatron's load with
``reader.DirectLoadStrategy`` runs, as before.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import sys
import threading
import zlib
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
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

COALESCE_GAP = 4096
"""Gaps between two runs of one file shorter than this are read (into a discard buffer) rather than
skipped with another system call: a page, the alignment of what the kernel reads anyway."""
ROW_READS_FROM_GAP = 64 << 10
"""A strided region (a row-parallel weight's part: one span per row) is read row by row only when
the gaps between its rows are at least this long; otherwise its whole stored span is read at once
and the rows copied out. Each row read costs ~10 us of Python bookkeeping here, the time to read
~100 KB from the page cache (measured at TP=2: per-row reads of 8 KiB gaps made the 614 MB load
3.5x slower than reading the span), so only large gaps (high TP) are worth skipping."""
PIECE = 16 << 20
"""About how many bytes one ``preadv`` job reads: large sequential reads, enough jobs for the
threads."""
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
class _Run:
    """``length`` bytes at ``offset`` of a file into ``dest`` (a byte memoryview), or into scratch
    when ``dest`` is None (``job`` then copies them out)."""

    offset: int
    length: int
    dest: memoryview | None


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
    runs: list[_Run] = field(default_factory=list)
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


def _runs(region: _Region, layout: _TensorLayout) -> None:
    """The byte runs of ``region`` in its file: straight into the target where the stored and the
    target layouts agree on a contiguous inner block, else one staged span copied afterwards."""
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
    strided_small_gaps = len(dims) == 1 and (stride[dims[0]] - step) * itemsize < ROW_READS_FROM_GAP
    if (
        not direct
        or len(dims) > 1
        or strided_small_gaps
        or (dims and (dest.dim() == 0 or not dest.is_contiguous()))
    ):
        span = 1 + sum((n - 1) * s for n, s in zip(lengths, stride))
        region.staged = (layout.data_offset + first * itemsize, span * itemsize)
        return
    view = _byte_view(dest)
    run = step * itemsize
    if not dims:
        region.runs.append(_Run(layout.data_offset + first * itemsize, run, view))
        return
    (d,) = dims
    base = layout.data_offset + first * itemsize
    row = stride[d] * itemsize
    region.runs.extend(_Run(base + i * row, run, view[i * run : (i + 1) * run]) for i in range(lengths[d]))


def _copy_staged(region: _Region, buffer: torch.Tensor) -> None:
    layout = region.layout
    assert layout is not None
    source = buffer.view(layout.dtype).as_strided(region.lengths, layout.stride)
    region.dest.copy_(source)


class DirectLoad:
    """Reads every region of a rank's request; ``bytes_read`` counts every byte asked of the kernel
    (zip records, coalesced gaps), ``bytes_kept`` the bytes of the regions."""

    def __init__(self, weights: str, metadata: Metadata, threads: int, progress: Any = None):
        self.weights, self.metadata, self.threads, self.progress = weights, metadata, threads, progress
        self.bytes_read = self.bytes_kept = self.stock_reads = 0
        self.failures: list[Any] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- planning ---------------------------------------------------------------------------------

    def _open(self, relative: str, key: str, files: dict[str, int]) -> int:
        if relative in files:
            return files[relative]
        fd = open_shard(self.weights, relative, key)
        files[relative] = fd
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

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
            for chunk in entry.chunks:
                lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
                hi = [min(o + n, c + m) for o, n, c, m in zip(offsets, lengths, chunk.offsets, chunk.sizes)]
                if any(a >= b for a, b in zip(lo, hi)):
                    continue
                info = storage[MetadataIndex(tensor.key, torch.Size(chunk.offsets))]
                fd = self._open(info.relative_path, tensor.key, files)
                dest = target[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))]
                regions.append(
                    _Region(
                        tensor.key,
                        fd,
                        os.path.join(self.weights, info.relative_path),
                        info,
                        tuple(chunk.sizes),
                        tuple(a - c for a, c in zip(lo, chunk.offsets)),
                        tuple(b - a for a, b in zip(lo, hi)),
                        dest,
                    )
                )
        return regions

    def _locate(self, regions: list[_Region]) -> list[_Region]:
        """Each region's stored layout (one parse per stored item); regions whose item the direct
        reader does not parse are read the stock way here and left out of the result."""
        layouts: dict[tuple[int, int], _TensorLayout | None] = {}
        planned = []
        for region in regions:
            info = region.item
            with _naming(region.where, region.key):
                ident = (region.fd, info.offset)
                if ident not in layouts:
                    layouts[ident] = self._layout(region.fd, info)
                layout = layouts[ident]
                if layout is None:
                    self._stock(region)
                    continue
                if layout.size != region.shape:
                    raise _Corrupt(f"holds a tensor of {layout.size}, the index says {region.shape}")
            region.layout = layout
            _runs(region, layout)
            planned.append(region)
        return planned

    def _layout(self, fd: int, info: Any) -> _TensorLayout | None:
        n = min(info.length, _HEAD)
        head = bytearray(n)
        if pread_into(fd, memoryview(head), info.offset) != n:
            raise _Corrupt(f"the file ends inside the item at byte {info.offset:,}")
        tail = bytearray(n)
        if pread_into(fd, memoryview(tail), info.offset + info.length - n) != n:
            raise _Corrupt(f"the file ends inside the item at byte {info.offset:,}")
        self.bytes_read += 2 * n
        layout = _fast_layout(bytes(head), bytes(tail), info.offset, info.length)
        if layout is not None:
            return layout
        item = _ItemFile(fd, info.offset, info.length)
        try:
            layout = _item_layout(item)
        except _Unsupported:
            layout = None
        self.bytes_read += item.bytes_read
        return layout

    def _stock(self, region: _Region) -> None:
        """torch.load the whole item (weights only), as the stock reader does."""
        raw = _read_item(region.fd, region.item)
        self.bytes_read += len(raw)
        self.stock_reads += 1
        import io

        try:
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as error:  # whatever torch.load raises on bytes it did not write
            raise _Corrupt(f"not a tensor torch.load reads ({one_line(error)})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != region.shape:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise _Corrupt(f"holds {found}, the index says a tensor of {region.shape}")
        region.dest.copy_(tensor[tuple(slice(o, o + n) for o, n in zip(region.src_offsets, region.lengths))])
        self.bytes_kept += math.prod(region.lengths) * region.dest.element_size()

    # -- reading ----------------------------------------------------------------------------------

    def _jobs(self, regions: list[_Region]) -> list[tuple[Any, ...]]:
        """``preadv`` jobs: per file, runs sorted and coalesced; staged regions one job each."""
        jobs: list[tuple[Any, ...]] = []
        by_file: dict[int, list[tuple[_Run, _Region]]] = {}
        for region in regions:
            itemsize = region.layout.dtype.itemsize if region.layout else 1
            self.bytes_kept += math.prod(region.lengths) * itemsize
            if region.staged is not None:
                jobs.append(("staged", region))
                continue
            by_file.setdefault(region.fd, []).extend((run, region) for run in region.runs)
        for fd, runs in by_file.items():
            runs.sort(key=lambda pair: pair[0].offset)
            group: list[tuple[_Run, _Region]] = []
            start = end = size = 0
            for run, region in runs:
                for piece in _split(run):
                    gap = piece.offset - end
                    if group and (
                        gap < 0
                        or gap >= COALESCE_GAP
                        or size >= PIECE
                        or len(group) >= _IOV_MAX // 2
                        or region.item is not group[-1][1].item  # its zip records were read already
                    ):
                        jobs.append(("runs", fd, start, end, group))
                        group = []
                    if not group:
                        start = end = piece.offset
                        size = 0
                    group.append((piece, region))
                    end = piece.offset + piece.length
                    size += piece.length
            if group:
                jobs.append(("runs", fd, start, end, group))
        return jobs

    def _discard(self, n: int) -> memoryview:
        buffer = getattr(self._local, "discard", None)
        if buffer is None or len(buffer) < n:
            buffer = self._local.discard = memoryview(bytearray(max(n, COALESCE_GAP)))
        return buffer[:n]

    def _scratch(self, n: int) -> torch.Tensor:
        buffer = getattr(self._local, "scratch", None)
        if buffer is None or buffer.numel() < n:
            buffer = self._local.scratch = torch.empty(n, dtype=torch.uint8)
        return buffer[:n]

    def _job(self, job: tuple[Any, ...]) -> int:
        if job[0] == "staged":
            region = job[1]
            offset, nbytes = region.staged
            with _naming(region.where, region.key):
                buffer = self._scratch(nbytes)
                if pread_into(region.fd, memoryview(buffer.numpy()), offset) != nbytes:
                    raise _Corrupt(f"the file ends inside the item, before byte {offset + nbytes:,}")
                _copy_staged(region, buffer)
            return nbytes
        _, fd, start, end, group = job
        vectors: list[memoryview] = []
        position = start
        for run, _ in group:
            if run.offset > position:
                vectors.append(self._discard(run.offset - position))
            vectors.append(run.dest)
            position = run.offset + run.length
        done = 0
        while vectors:
            try:
                n = os.preadv(fd, vectors, start + done)
            except OSError as error:
                region = group[0][1]
                with _naming(region.where, region.key):
                    raise error from None
            if n == 0:
                region = group[0][1]
                with _naming(region.where, region.key):
                    raise _Corrupt(f"the file ends at byte {start + done:,}, inside the item")
            done += n
            while vectors and n >= len(vectors[0]):
                n -= len(vectors[0])
                vectors.pop(0)
            if vectors and n:
                vectors[0] = vectors[0][n:]
        return end - start

    def run(self, tensors: list[ShardedTensor]) -> None:
        """Read every tensor; a failure is kept in ``failures`` (a ReadFailure, or another
        exception) for the caller to agree on across ranks."""
        files: dict[str, int] = {}
        try:
            regions = self._locate(self._regions(tensors, files))
            jobs = self._jobs(regions)
            total = sum(job[3] - job[2] if job[0] == "runs" else job[1].staged[1] for job in jobs)
            if self.progress is not None:
                self.progress.reset(total=total)
            if self.threads <= 1 or len(jobs) <= 1:
                for job in jobs:
                    self.bytes_read += self._job(job)
                    if self.progress is not None:
                        self.progress.update(job[3] - job[2] if job[0] == "runs" else job[1].staged[1])
            else:
                pending = [_pool(self.threads).submit(self._job, job) for job in jobs]
                try:
                    for done in pending:
                        n = done.result()
                        self.bytes_read += n
                        if self.progress is not None:
                            self.progress.update(n)
                except BaseException:
                    for job in pending:  # reads not started yet: the load has failed
                        job.cancel()
                    futures.wait(pending)  # none still writes into a target once this returns
                    raise
        except ReadFailure as failure:
            self.failures.append(failure)
        except Exception as error:
            self.failures.append(error)
        finally:
            for fd in files.values():
                os.close(fd)


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


def _split(run: _Run) -> Iterable[_Run]:
    """A run longer than PIECE in pieces, so that threads share a large tensor."""
    if run.length <= PIECE or run.dest is None:
        yield run
        return
    for start in range(0, run.length, PIECE):
        n = min(PIECE, run.length - start)
        yield _Run(run.offset + start, n, run.dest[start : start + n])


def picklable(error: BaseException) -> Any:
    """A failure as something every rank can unpickle: ReadFailure as it is, others as text."""
    if isinstance(error, ReadFailure):
        return error
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(one_line(error))
