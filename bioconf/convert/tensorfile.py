"""Reading and writing the safetensors format one tensor at a time, without the ``safetensors``
package (not a bioconf dependency) and without holding more than one tensor in memory.

The format (as documented by its authors): 8 bytes, little-endian unsigned, the length N of a JSON
header; N bytes of header, an object ``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin,
end]}, "__metadata__": {str: str}}``; then the data, each tensor's bytes little-endian and C-ordered
at ``8 + N + begin``. Offsets are relative to the data section, and the tensors tile it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from bioconf.errors import BioconfError, CheckpointError

DTYPES: Final[dict[str, torch.dtype]] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names -> torch dtypes (the ones a model's weights use)."""

NAMES: Final[dict[torch.dtype, str]] = {dtype: name for name, dtype in DTYPES.items()}

MAX_HEADER: Final = 100 << 20
"""The largest JSON header read (100 MiB, as the format's own reader allows): a bigger one is damage."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes lie and what they are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute file offset of the first byte."""
    nbytes: int


class TensorFile:
    """A safetensors file opened for reading tensor by tensor (``read(name)``): only the header is
    parsed up front, so memory stays bounded by the largest tensor. Every problem is a
    CheckpointError naming the file (and the tensor)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if sys.byteorder != "little":  # torch tensors are in the machine's order, the file's is little
            raise self._error("safetensors files are read on little-endian machines only", "unsupported")
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as error:
            raise self._error(f"cannot read file: {error.strerror}", "read_error") from None
        try:
            self.metadata, self.entries = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, message: str, type: str, tensor: str | None = None) -> BioconfError:
        return CheckpointError.one(message, type, source=self.path, loc=(tensor,) if tensor else ())

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as error:
            raise self._error(f"cannot read file: {error.strerror}", "read_error") from None
        if len(data) != size:
            raise self._error(f"the file ends early (at byte {offset + len(data):,})", "truncated")
        return data

    def _read_header(self) -> tuple[dict[str, str], dict[str, Entry]]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._error(
                "not a safetensors file: shorter than its 8-byte header length", "not_safetensors"
            )
        (length,) = struct.unpack("<Q", self._pread(8, 0))
        if length > min(MAX_HEADER, size - 8):
            raise self._error(
                f"not a safetensors file: header length {length:,} is impossible", "not_safetensors"
            )
        try:
            header = json.loads(self._pread(length, 8))
        except ValueError as error:
            raise self._error(
                f"not a safetensors file: the header is not JSON ({error})", "not_safetensors"
            ) from None
        if not isinstance(header, dict):
            raise self._error("not a safetensors file: the header is not a JSON object", "not_safetensors")
        metadata = header.pop("__metadata__", None) or {}
        entries = {name: self._entry(name, spec, 8 + length, size) for name, spec in header.items()}
        return metadata, entries

    def _entry(self, name: str, spec: object, data_start: int, size: int) -> Entry:
        """One header entry, checked: a known dtype, a shape of non-negative ints, and offsets
        inside the file spanning exactly the shape's bytes."""
        if not isinstance(spec, dict):
            raise self._error("malformed header entry", "malformed_header", name)
        dtype = DTYPES.get(spec.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if dtype is None:
            raise self._error(f"unsupported dtype {spec.get('dtype')!r}", "unsupported_dtype", name)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._error(f"malformed shape {shape!r}", "malformed_header", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise self._error(f"malformed data_offsets {offsets!r}", "malformed_header", name)
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end and end - begin == nbytes and data_start + end <= size):
            raise self._error(
                f"data_offsets {offsets} do not hold a {spec['dtype']} tensor of shape {shape} "
                f"within the file's {size:,} bytes",
                "malformed_header",
                name,
            )
        return Entry(name, dtype, tuple(shape), data_start + begin, nbytes)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, freshly allocated (its own memory, writable)."""
        entry = self.entries[name]
        buffer = bytearray(self._pread(entry.nbytes, entry.begin))
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


@dataclass(frozen=True)
class Planned:
    """One tensor to write: its name, dtype, shape, and how to make it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def write_tensor_file(
    path: str | os.PathLike[str], tensors: Iterable[Planned], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file of ``tensors`` in the order given (names sorted, as the format's own
    writer sorts them, for deterministic bytes), making each only when it is written: memory stays
    bounded by the largest tensor. The header is known from the plans' dtypes and shapes, so the
    file is written front to back in one pass; each made tensor must match its plan."""
    plans = sorted(tensors, key=lambda plan: plan.name)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for plan in plans:
        nbytes = math.prod(plan.shape) * torch.empty((), dtype=plan.dtype).element_size()
        header[plan.name] = {
            "dtype": NAMES[plan.dtype],
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for plan in plans:
            tensor = plan.make().detach().to("cpu").contiguous()
            if tensor.dtype != plan.dtype or tuple(tensor.shape) != plan.shape:
                made = f"{tensor.dtype} {tuple(tensor.shape)}"
                raise AssertionError(f"{plan.name}: made {made}, planned {plan.dtype} {plan.shape}")
            if tensor.numel():  # the tensor's own bytes, no copy
                handle.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        handle.flush()
        os.fsync(handle.fileno())
