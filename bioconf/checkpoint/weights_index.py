"""The weight index of a torch_dist checkpoint (``<ckpt>/weights/.metadata``), read as data without torch.

megatron's torch_dist format is torch.distributed.checkpoint (DCP): ``.metadata`` is a pickle of DCP's
``Metadata``, which lists every item of the state dict (a tensor's global shape, dtype and chunks; a
bytes item) and where each chunk's bytes lie in the ``__R_I.distcp`` files. torch reads it with
``pickle.load``, which imports and calls whatever the file names: a checkpoint from elsewhere could run
any code. Here a restricted unpickler resolves only the exact globals that DCP's metadata pickles to
(``ALLOWED_GLOBALS``), each to a small local stand-in that records its state; any other global is
refused before anything is imported or called. torch is never imported, so the index of a large
checkpoint reads in milliseconds on a machine without it.

How DCP's metadata pickles (torch 2.x, protocol 4):

- its dataclasses by ``NEWOBJ`` (``cls.__new__(cls)``) then ``BUILD`` with the instance ``__dict__``;
  ``TensorProperties`` with a tuple ``(dtype, layout, requires_grad, memory_format, pin_memory)``
  from its own ``__getstate__``, the memory format as ``_MEM_FORMAT_ENCODING(code)`` (``REDUCE``);
- ``torch.Size`` as ``REDUCE`` of ``torch.Size((d0, d1, ...))``;
- a dtype as a global ``torch.<name>`` (the canonical name: ``torch.half`` is ``torch.float16``);
- a layout as ``torch.serialization._get_layout("torch.strided")``;
- ``StorageMeta.checkpoint_id`` as a path: ``pathlib.PosixPath(*parts)`` (``REDUCE``).

megatron's torch_dist saver (``save_state_dict_async_plan``, decentralized plans: the default) also
sets ``Metadata.all_local_plans``: every rank's ``SavePlan`` (``WriteItem``s with their
``WriteItemType`` enum member, ``MetadataIndex`` and ``TensorWriteData``), kept to reuse the plan at the
next save. A plan's ``storage_data`` is a ``_StoragePrefix`` when torch's writer runs without
collectives. These are parsed (so they must be allowed) but not reported.

``common.pt`` (a full torch pickle) is never opened here.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Final

from bioconf.checkpoint.layout import METADATA_FILE, locate, read_backend
from bioconf.checkpoint.unpickling import (
    _DCP,
    _FILESYSTEM,
    _PLANNER,
    DCP_METADATA_GLOBALS,
    DTYPE_ITEMSIZE,
    PATH_MODULES,
    Malformed,
    read_dcp_metadata_file,
)
from bioconf.errors import CheckpointError, short_repr
from bioconf.schema.overrides import limit_breach

_INT64: Final = 2**63
"""torch counts elements and bytes in int64: no real size, offset or length reaches this."""

# ---- stand-ins ----------------------------------------------------------------------------------


class _Sealed(type):
    """Metaclass of every stand-in class: a pickle's BUILD can set attributes on any object it holds,
    a class included, and must not be able to change a stand-in for later reads."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")


class _Record(metaclass=_Sealed):
    """A DCP dataclass instance: NEWOBJ makes it empty, BUILD hands it the dataclass's ``__dict__``."""

    __slots__ = ("state",)

    def __new__(cls) -> _Record:
        record = super().__new__(cls)
        record.state = {}
        return record

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or not all(type(key) is str for key in state):
            raise Malformed(f"{type(self).__name__} with a state that is not a dict of fields")
        self.state = state


class _Metadata(_Record):
    __slots__ = ()


class _TensorStorageMetadata(_Record):
    __slots__ = ()


class _BytesStorageMetadata(_Record):
    __slots__ = ()


class _ChunkStorageMetadata(_Record):
    __slots__ = ()


class _MetadataIndex(_Record):
    __slots__ = ()


class _StorageMeta(_Record):
    __slots__ = ()


class _StorageInfo(_Record):
    __slots__ = ()


class _StoragePrefix(_Record):
    __slots__ = ()


class _SavePlan(_Record):
    __slots__ = ()


class _WriteItem(_Record):
    __slots__ = ()


class _TensorWriteData(_Record):
    __slots__ = ()


class _TensorProperties(_Record):
    """Pickled by its own ``__getstate__``: (dtype, layout, requires_grad, memory_format, pin_memory)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if type(state) is not tuple or len(state) != 5:
            raise Malformed("TensorProperties with a state that is not its 5-tuple")
        self.state = dict(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"), state))


class _Dtype(str):
    """A torch dtype, by its canonical name (immutable: no ``__dict__``)."""

    __slots__ = ()


class _Size(tuple, metaclass=_Sealed):
    """``torch.Size((d0, d1, ...))``: a tuple of non-negative ints."""

    __slots__ = ()

    def __new__(cls, dims: Any = ()) -> _Size:
        if type(dims) not in (tuple, list) or not all(type(d) is int and 0 <= d < _INT64 for d in dims):
            raise Malformed(f"torch.Size of {short_repr(dims)}: not a sequence of non-negative 64-bit ints")
        return super().__new__(cls, dims)


class _Layout(str, metaclass=_Sealed):
    """``torch.serialization._get_layout("torch.strided")``: the layout's name."""

    __slots__ = ()

    def __new__(cls, name: Any) -> _Layout:
        if type(name) is not str:
            raise Malformed(f"a layout named {name!r}")
        return super().__new__(cls, name)


class _EnumMember(str, metaclass=_Sealed):
    """A DCP enum member, pickled as ``EnumClass(value)``, by its member name."""

    __slots__ = ()
    _MEMBERS: ClassVar[dict[int, str]] = {}

    def __new__(cls, value: Any) -> _EnumMember:
        if type(value) is not int or value not in cls._MEMBERS:
            raise Malformed(f"{cls.__name__.lstrip('_')}({short_repr(value)}): no such member")
        return super().__new__(cls, cls._MEMBERS[value])


class _MemoryFormat(_EnumMember):
    __slots__ = ()
    _MEMBERS: ClassVar[dict[int, str]] = {
        0: "TORCH_CONTIGUOUS_FORMAT",
        1: "TORCH_CHANNELS_LAST",
        2: "TORCH_PRESERVE_FORMAT",
    }


class _WriteItemType(_EnumMember):
    __slots__ = ()
    _MEMBERS: ClassVar[dict[int, str]] = {1: "TENSOR", 2: "SHARD", 3: "BYTE_IO"}


class _PosixPath(str, metaclass=_Sealed):
    """``pathlib.PosixPath(*parts)`` as a string (no filesystem access)."""

    __slots__ = ()
    _PURE: Final = PurePosixPath

    def __new__(cls, *parts: Any) -> _PosixPath:
        if not all(type(part) is str for part in parts):
            raise Malformed(f"a path made of {parts!r}")
        return super().__new__(cls, str(cls._PURE(*parts)))


class _WindowsPath(_PosixPath):
    __slots__ = ()
    _PURE: Final = PureWindowsPath


ALLOWED_GLOBALS: Final[dict[tuple[str, str], Any]] = {
    (_DCP, "Metadata"): _Metadata,
    (_DCP, "TensorStorageMetadata"): _TensorStorageMetadata,
    (_DCP, "BytesStorageMetadata"): _BytesStorageMetadata,
    (_DCP, "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (_DCP, "TensorProperties"): _TensorProperties,
    (_DCP, "MetadataIndex"): _MetadataIndex,
    (_DCP, "StorageMeta"): _StorageMeta,
    (_DCP, "_MEM_FORMAT_ENCODING"): _MemoryFormat,
    (_FILESYSTEM, "_StorageInfo"): _StorageInfo,
    (_FILESYSTEM, "_StoragePrefix"): _StoragePrefix,
    (_PLANNER, "SavePlan"): _SavePlan,
    (_PLANNER, "WriteItem"): _WriteItem,
    (_PLANNER, "WriteItemType"): _WriteItemType,
    (_PLANNER, "TensorWriteData"): _TensorWriteData,
    ("torch", "Size"): _Size,
    ("torch.serialization", "_get_layout"): _Layout,
    **{("torch", name): _Dtype(name) for name in DTYPE_ITEMSIZE},
    **{(module, name): _PosixPath for module in PATH_MODULES for name in ("PosixPath", "PurePosixPath")},
    **{
        (module, name): _WindowsPath for module in PATH_MODULES for name in ("WindowsPath", "PureWindowsPath")
    },
}
"""The stand-in each of DCP_METADATA_GLOBALS resolves to."""
assert ALLOWED_GLOBALS.keys() == DCP_METADATA_GLOBALS


# ---- the plain result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: its place in the global tensor and its bytes in a shard file
    (``length`` is the stored record's length, a small ``torch.save`` archive by default)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "file": self.file,
            "offset": self.offset,
            "length": self.length,
        }


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the state dict, by its fully qualified key."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return 0 if 0 in self.shape else math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The tensor's size in memory (numel * itemsize), not its stored size."""
        itemsize = DTYPE_ITEMSIZE.get(self.dtype)
        if itemsize is None:
            raise CheckpointError.one(
                f"{_named(self.name)}: unknown dtype {short_repr(self.dtype)}", "unknown_dtype"
            )
        return self.numel * itemsize

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.nbytes,
            "chunks": [chunk.to_dict() for chunk in self.chunks],
        }


@dataclass(frozen=True)
class ObjectInfo:
    """A non-tensor item (DCP stores it as bytes: a megatron ShardedObject, an ``_extra_state``)."""

    name: str
    file: str
    offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "offset": self.offset, "length": self.length}


@dataclass(frozen=True)
class WeightsMetadata:
    """What a torch_dist ``weights/`` folder holds, from its ``.metadata`` and ``metadata.json``."""

    path: Path
    """The weights folder."""
    backend: dict[str, Any] | None
    """``metadata.json`` (megatron's ``sharded_backend``, ``common_backend``, versions); None if absent."""
    version: str | None
    """DCP's metadata version (``"1.0.0"``; None before torch wrote one)."""
    tensors: tuple[TensorInfo, ...]
    objects: tuple[ObjectInfo, ...]

    @property
    def total_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    def files(self) -> dict[str, int]:
        """Bytes recorded per shard file (tensor chunks and objects)."""
        stored = [(chunk.file, chunk.length) for tensor in self.tensors for chunk in tensor.chunks]
        stored += [(item.file, item.length) for item in self.objects]
        sizes: Counter[str] = Counter()
        for file, length in stored:
            sizes[file] += length
        return dict(sorted(sizes.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "dcp_version": self.version,
            "total_bytes": self.total_bytes,
            "files": self.files(),
            "tensors": [tensor.to_dict() for tensor in self.tensors],
            "objects": [item.to_dict() for item in self.objects],
        }


# ---- reading ------------------------------------------------------------------------------------


def load_dcp_metadata(path: Path) -> _Metadata:
    """Unpickle a DCP ``.metadata`` file into stand-ins (DCP_METADATA_GLOBALS only)."""
    return read_dcp_metadata_file(path, ALLOWED_GLOBALS)


_RECORD_NAMES: Final[dict[type, str]] = {
    stand_in: name
    for (_, name), stand_in in ALLOWED_GLOBALS.items()
    if isinstance(stand_in, type) and issubclass(stand_in, _Record)
}


def _named(name: str) -> str:
    """A tensor's name for a message: names come from the file, and may be megabytes long."""
    return name if len(name) <= 200 else name[:197] + "..."


def _field(record: _Record, name: str, kinds: type | tuple[type, ...], where: str = "") -> Any:
    """``record.name``, checked to be one of ``kinds``; ``where`` names the item for the message."""
    value = record.state.get(name)
    if not isinstance(value, kinds):
        got = "missing" if value is None else f"a {type(value).__name__}"
        prefix = f"{_named(where)}: " if where else ""
        raise Malformed(f"{prefix}{_RECORD_NAMES[type(record)]}.{name} is {got}")
    return value


def _storage_index(metadata: _Metadata) -> dict[tuple[str, tuple[int, ...] | None], _StorageInfo]:
    """``storage_data``: (fqn, chunk offsets or None for a bytes item) -> where its bytes are."""
    storage = _field(metadata, "storage_data", dict)
    index = {}
    for key, info in storage.items():
        if not isinstance(key, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise Malformed("Metadata.storage_data is not a map of MetadataIndex to _StorageInfo")
        fqn = _field(key, "fqn", str, "storage_data")
        index[fqn, _field(key, "offset", (_Size, type(None)), fqn)] = info
    return index


def _location(
    storage: dict[Any, _StorageInfo], fqn: str, offsets: tuple[int, ...] | None
) -> tuple[str, int, int]:
    """(file, offset, length) of one stored item."""
    info = storage.get((fqn, offsets))
    if info is None:
        at = "" if offsets is None else f" at offsets {short_repr(list(offsets))}"
        raise Malformed(f"{_named(fqn)}{at}: no storage_data entry says where its bytes are")
    return (_field(info, "relative_path", str, fqn), _count(info, "offset", fqn), _count(info, "length", fqn))


def _count(record: _Record, name: str, where: str) -> int:
    """``record.name``, an int that a file offset or length can be (0 <= n < 2**63)."""
    value = _field(record, name, int, where)
    if type(value) is not int or not 0 <= value < _INT64:
        record_name = _RECORD_NAMES[type(record)]
        raise Malformed(f"{_named(where)}: {record_name}.{name} is {short_repr(value)}, not a 64-bit count")
    return value


def _tensor(name: str, item: _TensorStorageMetadata, storage: dict[Any, _StorageInfo]) -> TensorInfo:
    properties = _field(item, "properties", _TensorProperties, name)
    dtype = _field(properties, "dtype", _Dtype, name)
    if dtype not in DTYPE_ITEMSIZE:
        raise Malformed(f"{_named(name)}: unknown dtype {short_repr(str(dtype))}")
    chunks = []
    for chunk in _field(item, "chunks", list, name):
        if not isinstance(chunk, _ChunkStorageMetadata):
            raise Malformed(f"{_named(name)}: a chunk that is not a ChunkStorageMetadata")
        offsets = _field(chunk, "offsets", _Size, name)
        chunks.append(
            Chunk(
                tuple(offsets), tuple(_field(chunk, "sizes", _Size, name)), *_location(storage, name, offsets)
            )
        )
    shape = tuple(_field(item, "size", _Size, name))
    if 0 not in shape:
        nbytes = DTYPE_ITEMSIZE[dtype]
        for dim in shape:  # stops as soon as it is too large: a product of huge factors is slow
            nbytes *= dim
            if nbytes >= _INT64:
                raise Malformed(
                    f"{_named(name)}: a {dtype!s} tensor of shape {short_repr(shape)} "
                    "holds more than 2**63 bytes"
                )
    return TensorInfo(name, shape, str(dtype), tuple(chunks))


def _natural_key(name: str) -> list[Any]:
    """``layers.2`` before ``layers.10`` (numbers of up to 18 ASCII digits: ``int`` reads those
    quickly and never refuses them)."""
    parts: list[Any] = []
    for part in name.split("."):
        number = part.isascii() and part.isdigit() and len(part) <= 18
        parts.extend((0, int(part)) if number else (1, part))
    return parts


def _sorted(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(sorted(items, key=lambda item: _natural_key(item.name)))


def read_weights_metadata(ckpt_dir: str | os.PathLike[str]) -> WeightsMetadata:
    """The tensors and objects of the torch_dist checkpoint at ``ckpt_dir`` (its ``weights/.metadata``
    and ``metadata.json``), read without torch and without importing or calling anything the file
    names. Raises CheckpointError naming the file: missing, not a pickle, a refused global, not DCP
    metadata."""
    weights = locate(ckpt_dir).require_weights()
    path = weights / METADATA_FILE
    backend = read_backend(weights)
    if backend is not None and (breach := limit_breach(backend)):
        raise CheckpointError.one(
            f"metadata.json: {breach[0]}", breach[1], source=weights / "metadata.json", loc=(breach[2],)
        )
    metadata = load_dcp_metadata(path)
    try:
        storage = _storage_index(metadata)
        tensors, objects = [], []
        for name, item in _field(metadata, "state_dict_metadata", dict).items():
            if not isinstance(name, str):
                raise Malformed(f"a state dict key {short_repr(name)} that is not a string")
            if isinstance(item, _TensorStorageMetadata):
                tensors.append(_tensor(name, item, storage))
            elif isinstance(item, _BytesStorageMetadata):
                objects.append(ObjectInfo(name, *_location(storage, name, None)))
            else:
                raise Malformed(f"{_named(name)}: an item that is neither a tensor nor bytes")
        version = _field(metadata, "version", (str, type(None)))
        result = WeightsMetadata(weights, backend, version, _sorted(tensors), _sorted(objects))
        if result.total_bytes >= _INT64 or any(size >= _INT64 for size in result.files().values()):
            raise Malformed("the tensors or a shard file add up to more than 2**63 bytes")
    except Malformed as error:
        raise CheckpointError.one(f"not DCP metadata: {error}", "not_dcp_metadata", source=path) from None
    return result
