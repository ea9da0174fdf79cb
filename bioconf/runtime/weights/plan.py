"""The checks before a weight load: what each rank asks for, checked against the checkpoint's
tensor index (keys, shapes, skip prefixes) on every rank alike, so that a load that cannot succeed
fails before any weight changes."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import Metadata, TensorStorageMetadata

from bioconf.checkpoint.layout import MODULE_PREFIX
from bioconf.checkpoint.shapes import shaped_by
from bioconf.errors import ConfigIssue, WeightsError

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
                    if entry.properties.dtype != item.dtype:
                        request.cast[shown] = (str(entry.properties.dtype), str(item.dtype))
            if absent:
                request.missing.append((shown, absent[0]))
                continue
            kept[key] = value
            request.loaded.append(shown)
        request.state_dicts.append(kept)
    return request


def agree(request: Request, metadata: Metadata, skip: list[str], strict: bool, source: str) -> None:
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
                (SKIP_FIELD,),
                prefix,
                source,
            )
    if issues:
        raise WeightsError(issues.values())
