"""The one unpickling policy for checkpoint files: a pickle may name only the globals a format
needs, each resolved to an object the caller chose; anything else is refused before it is imported
or called.

torch reads a DCP ``.metadata`` with plain ``pickle.load``, which imports and calls whatever the file
names: a checkpoint from elsewhere could run any code. Every pickle bioconf reads from a checkpoint
goes through ``unpickle`` instead. ``DCP_METADATA_GLOBALS`` lists what torch's checkpoint metadata
pickles to; the schema-side reader resolves those names to small stand-ins (no torch), the runtime
loader to torch's own classes (plain dataclasses, ``torch.Size``, dtypes: constructing them runs no
code a file can choose).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from typing import Any, Final

from bioconf.errors import CheckpointError
from bioconf.fs import read_bytes

_DCP: Final = "torch.distributed.checkpoint.metadata"
_FILESYSTEM: Final = "torch.distributed.checkpoint.filesystem"
_PLANNER: Final = "torch.distributed.checkpoint.planner"
PATH_MODULES: Final = ("pathlib", "pathlib._local")  # Python 3.13 defines the path classes in _local

# The torch dtypes by bytes per element, by the names a pickle uses for them (torch 2.13; a test checks
# the table against the installed torch).
_DTYPES_BY_ITEMSIZE: Final[dict[int, tuple[str, ...]]] = {
    16: ("complex128",),
    8: ("complex64", "float64", "int64", "uint64"),
    4: ("complex32", "float32", "int32", "qint32", "uint32"),
    2: ("bfloat16", "bits16", "float16", "int16", "uint16"),
    1: (
        "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "float4_e2m1fn_x2", "float8_e4m3fn",
        "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "int1", "int2", "int3",
        "int4", "int5", "int6", "int7", "int8", "qint8", "quint2x4", "quint4x2", "quint8", "uint1",
        "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "uint8",
    ),
}  # fmt: skip
DTYPE_ITEMSIZE: Final[dict[str, int]] = {
    name: size for size, names in _DTYPES_BY_ITEMSIZE.items() for name in names
}
"""Bytes per element of each torch dtype, by canonical name (``"bfloat16": 2``)."""

DCP_METADATA_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "TensorProperties"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        (_FILESYSTEM, "_StorageInfo"),
        (_FILESYSTEM, "_StoragePrefix"),
        (_PLANNER, "SavePlan"),
        (_PLANNER, "WriteItem"),
        (_PLANNER, "WriteItemType"),
        (_PLANNER, "TensorWriteData"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        *(("torch", name) for name in DTYPE_ITEMSIZE),
        *((module, name) for module in PATH_MODULES for name in ("PosixPath", "PurePosixPath")),
        *((module, name) for module in PATH_MODULES for name in ("WindowsPath", "PureWindowsPath")),
    }
)
"""Every global a torch_dist ``.metadata`` names (torch 2.x, megatron's default save plans):
DCP's dataclasses and enums, ``torch.Size``, dtypes, the layout helper and ``pathlib`` paths."""


METADATA_READ_LIMIT: Final = 1 << 30
"""The largest ``.metadata`` read (1 GiB): a checkpoint of thousands of tensors holds a few MB."""


class Malformed(Exception):
    """Raised by a resolved object: the pickle is readable but not the format expected."""


class _Refused(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are ``resolved`` (``(module, name) -> object``) and nothing else; a
    persistent id is refused too."""

    def __init__(self, file: Any, resolved: Mapping[tuple[str, str], Any]):
        super().__init__(file)
        self.resolved = resolved

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.resolved[module, name]
        except (KeyError, TypeError):
            raise _Refused(str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> Any:
        raise Malformed(f"a persistent id {pid!r}")


def unpickle(
    raw: bytes, resolved: Mapping[tuple[str, str], Any], source: str | os.PathLike[str], what: str
) -> Any:
    """Unpickle ``raw`` with only ``resolved``'s globals; every failure is a CheckpointError naming
    ``source`` (``what`` the file should be, for the message)."""
    try:
        return RestrictedUnpickler(io.BytesIO(raw), resolved).load()
    except _Refused as refused:
        raise CheckpointError.one(
            f"refused to load global '{refused}': a {what} names only its format's own classes "
            "(nothing was imported or run)",
            "unsafe_pickle",
            source=source,
            input=str(refused),
        ) from None
    except Malformed as error:
        raise CheckpointError.one(f"not {what}: {error}", "not_dcp_metadata", source=source) from None
    except Exception as error:  # anything else an untrusted pickle can raise
        raise CheckpointError.one(
            f"not a readable pickle: {type(error).__name__}: {error}", "pickle_invalid", source=source
        ) from None


def read_dcp_metadata_file(path: str | os.PathLike[str], resolved: Mapping[tuple[str, str], Any]) -> Any:
    """A DCP ``.metadata`` file unpickled with ``resolved`` (DCP_METADATA_GLOBALS -> objects), checked
    to hold the object ``Metadata`` resolves to."""
    metadata = unpickle(
        read_bytes(path, CheckpointError, METADATA_READ_LIMIT), resolved, path, "DCP metadata"
    )
    if not isinstance(metadata, resolved[_DCP, "Metadata"]):
        raise CheckpointError.one(
            "not DCP metadata: the pickle holds no torch.distributed.checkpoint Metadata",
            "not_dcp_metadata",
            source=path,
            input=type(metadata).__name__,
        )
    return metadata
