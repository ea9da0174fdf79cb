"""The checks before a weight load: what each rank asks for, checked against the checkpoint's
tensor index (keys, shapes, skip prefixes) and against the files that hold it, on every rank alike,
so that a load that cannot succeed fails before any weight changes.

A checkpoint is foreign input: its index (``.metadata``) says where each stored item lies, and a
damaged or hostile index must not send a read outside the weights folder, nor leave part of a tensor
unread. ``check_index`` checks what every rank reads alike (the index's types, every stored item's
location); ``plan_load`` checks what this rank needs (chunks that tile each tensor, shard files that
exist, are regular files inside the folder and are long enough); ``agree`` raises one error on every
rank from what all ranks found.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)

from bioconf.checkpoint.layout import METADATA_FILE, MODULE_PREFIX
from bioconf.checkpoint.shapes import shaped_by
from bioconf.errors import CheckpointError, ConfigIssue, WeightsError

SKIP_FIELD = "initial_ckpt_skip_keys_with_these_prefixes"
"""The config field an unused skip prefix is reported against."""


def _fields_text(fields: tuple[str, ...], config: Any) -> str:
    if config is None:
        return ", ".join(fields)
    return ", ".join(f"{name}={getattr(config, name, '?')}" for name in fields)


@dataclass
class Request:
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
    needed: set[str] = field(default_factory=set)
    """Checkpoint keys this rank reads."""
    damaged: list[Damage] = field(default_factory=list)
    """What is wrong with the stored items this rank reads (see ``Damage``)."""
    direct: bool = False
    """Whether the direct path (``direct.eligible``) can read this rank's request."""


Damage = tuple[str, str, str, str]
"""One damaged stored item: (issue type, the file, what is wrong with it, the checkpoint key).
Plain strings, so ranks gather them and every rank builds the same error (``damage_issues``)."""

_KEYS_SHOWN = 5


def damage_issues(damages: Iterable[Damage]) -> list[ConfigIssue]:
    """One issue per damaged file and problem, naming the checkpoint keys stored there; the same on
    every rank whatever order the ranks found them in."""
    grouped: dict[tuple[str, str, str], set[str]] = {}
    for kind, source, what, key in damages:
        grouped.setdefault((kind, source, what), set()).add(key)
    issues = []
    for (kind, source, what), keys in sorted(grouped.items()):
        names = sorted(keys)
        shown = ", ".join(names[:_KEYS_SHOWN]) + (
            f" and {len(names) - _KEYS_SHOWN} more" if len(names) > _KEYS_SHOWN else ""
        )
        keys_text = "checkpoint key" if len(names) == 1 else f"{len(names)} checkpoint keys:"
        loc = (names[0].removeprefix(MODULE_PREFIX),) if len(names) == 1 else ()
        issues.append(ConfigIssue(f"{what} ({keys_text} {shown})", kind, loc, source=source))
    return issues


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_int(n) and n >= 0 for n in value)


def _unsafe_location(relative: Any) -> str | None:
    """Why a stored item's ``relative_path`` may not be read, or None: it must name a file below the
    weights folder (no absolute path, no ``..``; links are resolved when the file is checked)."""
    if not isinstance(relative, str):
        return f"is a {type(relative).__name__}, not a file name"
    parts = PurePosixPath(relative).parts
    if "\0" in relative or not relative.strip("/. "):
        return "names no file in the weights folder"
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        return "is an absolute path: stored items lie in the weights folder"
    if ".." in parts or ".." in relative.split("\\"):
        return "leaves the weights folder ('..')"
    return None


def check_index(metadata: Metadata, weights: str) -> None:
    """Raise CheckpointError, before anything is read and the same on every rank, when the index is
    not what DCP's planner can walk (types torch's own code would trip over with a traceback), or a
    stored item lies outside the weights folder."""
    source = os.path.join(weights, METADATA_FILE)

    def invalid(message: str, type: str = "index_invalid", **details: Any) -> CheckpointError:
        return CheckpointError.one(f"not a usable weight index: {message}", type, source=source, **details)

    tensors = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(tensors, dict):
        raise invalid("state_dict_metadata is not a mapping", input=type(tensors).__name__)
    for key, entry in tensors.items():
        if not isinstance(key, str) or not isinstance(entry, (TensorStorageMetadata, BytesStorageMetadata)):
            raise invalid(f"the entry of {key!r} is a {type(entry).__name__}", loc=(str(key),))
        if isinstance(entry, TensorStorageMetadata) and not (
            isinstance(entry.properties, TensorProperties)
            and isinstance(entry.properties.dtype, torch.dtype)
            and _ints(entry.size)
            and isinstance(entry.chunks, list)
            and all(
                isinstance(chunk, ChunkStorageMetadata)
                and _ints(chunk.offsets)
                and _ints(chunk.sizes)
                and len(chunk.offsets) == len(chunk.sizes) == len(entry.size)
                for chunk in entry.chunks
            )
        ):
            raise invalid(f"the entry of {key!r} is malformed (dtype, size or chunks)", loc=(key,))
    if not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise invalid("storage_meta is not DCP's StorageMeta", input=type(metadata.storage_meta).__name__)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise invalid("storage_data is not a mapping", input=type(storage).__name__)
    unsafe: dict[tuple[str, str], set[str]] = {}
    checked: dict[str, str | None] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            raise invalid(f"a storage_data key is a {type(index).__name__}")
        if not (
            isinstance(info, _StorageInfo)
            and _is_int(info.offset)
            and _is_int(info.length)
            and info.offset >= 0
            and info.length >= 0
            and (
                info.transform_descriptors is None
                or (
                    isinstance(info.transform_descriptors, (list, tuple))
                    and all(isinstance(d, str) for d in info.transform_descriptors)
                )
            )
        ):
            raise invalid(
                f"where {index.fqn!r} is stored is malformed", loc=(index.fqn.removeprefix(MODULE_PREFIX),)
            )
        relative = info.relative_path
        if isinstance(relative, str):  # a shard file holds many items: its name is checked once
            if relative not in checked:
                checked[relative] = _unsafe_location(relative)
            why = checked[relative]
        else:
            why = _unsafe_location(relative)
        if why is not None:
            unsafe.setdefault((repr(info.relative_path), why), set()).add(index.fqn)
    if unsafe:
        raise CheckpointError(
            damage_issues(
                ("index_unsafe_location", source, f"a stored item's location {shown} {why}", key)
                for (shown, why), keys in unsafe.items()
                for key in keys
            )
        )


def inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` (resolved) or below it."""
    return os.path.commonpath([path, root]) == root


def shard_path(weights: str, relative: str) -> str:
    """The resolved path of a stored item's file; raises ValueError when a link leads outside the
    weights folder (itself resolved: a weights folder that is a link is fine)."""
    root = os.path.realpath(weights)
    path = os.path.realpath(os.path.join(weights, relative))
    if not inside(path, root) or path == root:
        raise ValueError("leads outside the weights folder (a link)")
    return path


def _check_chunks(
    key: str, entry: TensorStorageMetadata, storage: dict[Any, Any], source: str
) -> list[Damage]:
    """The chunks of a tensor this rank reads must lie inside it, tile it and each be stored: DCP
    reads only what the chunks cover and leaves the rest of the target as it was."""
    size = tuple(entry.size)
    for chunk in entry.chunks:
        if any(o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, size)):
            what = f"the chunk at {tuple(chunk.offsets)} of size {tuple(chunk.sizes)} lies outside {size}"
            return [("index_invalid", source, what, key)]
        if MetadataIndex(key, torch.Size(chunk.offsets)) not in storage:
            what = f"the chunk at {tuple(chunk.offsets)} has no stored item"
            return [("index_incomplete", source, what, key)]
    covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
    if covered != math.prod(size):
        what = f"its chunks cover {covered:,} of the tensor's {math.prod(size):,} elements"
        return [("index_incomplete", source, what, key)]
    return []


def _check_files(weights: str, ends: dict[str, dict[str, int]]) -> list[Damage]:
    """Each shard file this rank reads (relative path -> key -> the end of its items) must be a
    regular file inside the weights folder, as long as the index says."""
    damaged = []
    for relative, keys in sorted(ends.items()):
        shown = os.path.join(weights, relative)
        try:
            resolved = shard_path(weights, relative)
            info = os.stat(resolved)
            if not os.access(resolved, os.R_OK):
                raise PermissionError(13, "Permission denied")
        except ValueError as error:
            kind, what = "shard_outside", str(error)
        except FileNotFoundError:
            kind, what = "shard_missing", "missing: the index stores items in it"
        except OSError as error:
            kind, what = "shard_unreadable", f"cannot be read: {error.strerror or error}"
        else:
            end = max(keys.values())
            if not stat.S_ISREG(info.st_mode):
                kind = "shard_not_a_file"
                what = "not a regular file" + (" (a folder)" if stat.S_ISDIR(info.st_mode) else "")
            elif info.st_size < end:
                kind = "shard_truncated"
                what = (
                    "empty"
                    if info.st_size == 0
                    else f"truncated: {info.st_size:,} bytes, shorter than the index says"
                )
            else:
                continue
        damaged.extend((kind, shown, what, key) for key in keys)
    return damaged


def check_stored(metadata: Metadata, needed: set[str], weights: str) -> list[Damage]:
    """What is wrong with the stored items of the keys this rank reads (``check_index`` ran)."""
    source = os.path.join(weights, METADATA_FILE)
    stored, storage = metadata.state_dict_metadata, metadata.storage_data
    damaged = []
    for key in sorted(needed):
        entry = stored[key]
        if isinstance(entry, TensorStorageMetadata):
            damaged += _check_chunks(key, entry, storage, source)
        elif MetadataIndex(key) not in storage:
            damaged.append(("index_incomplete", source, "the object has no stored item", key))
    ends: dict[str, dict[str, int]] = {}
    for index, info in storage.items():
        if index.fqn in needed:
            per_key = ends.setdefault(info.relative_path, {})
            per_key[index.fqn] = max(per_key.get(index.fqn, 0), info.offset + info.length)
    return damaged + _check_files(weights, ends)


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


def plan_load(
    chunks: list[Any], content: dict[str, Any], metadata: Metadata, skip: list[str], source: str
) -> Request:
    stored = metadata.state_dict_metadata
    request = Request()
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
            absent, keys = [], []
            for item in _built(value):
                if isinstance(item, ShardedObject):
                    if item.unique_key not in stored:
                        absent.append(item.unique_key)
                    keys.append(item.unique_key)
                    continue
                entry = stored.get(item.key)
                if not isinstance(entry, TensorStorageMetadata):
                    absent.append(item.key)
                elif tuple(entry.size) != tuple(item.global_shape):
                    fields = shaped_by(item.key, config)
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
                    keys.append(item.key)
                    if entry.properties.dtype != item.dtype:
                        request.cast[shown] = (str(entry.properties.dtype), str(item.dtype))
            if absent:
                request.missing.append((shown, absent[0]))
                continue
            kept[key] = value
            request.loaded.append(shown)
            request.needed.update(keys)
        request.state_dicts.append(kept)
    request.damaged = check_stored(metadata, request.needed, source)
    return request


def agree(request: Request, metadata: Metadata, skip: list[str], strict: bool, source: str) -> bool:
    """Raise the same error on every rank if any rank found a problem: CheckpointError for damaged
    stored items (a checkpoint that cannot be read), else WeightsError. A skip prefix is in use if it
    matches a model key on some rank, or a checkpoint key (a chunk of a virtual pipeline, loaded on
    its own, need not hold every key its prefixes are meant for). Returns whether every rank's
    request can take the direct path (the same answer on every rank)."""
    mine = (
        request.issues,
        request.missing,
        request.prefixes_used,
        request.key_prefixes,
        request.damaged,
        request.direct,
    )
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
    damaged = [damage for *_, rank_damaged, _ in everyone for damage in rank_damaged]
    if damaged:
        raise CheckpointError(damage_issues(damaged))
    for rank_issues, rank_missing, rank_used, rank_keys, _, _ in everyone:
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
                (SKIP_FIELD,),
                prefix,
                source,
            )
    if issues:
        raise WeightsError(issues.values())
    return all(rank[-1] for rank in everyone)
