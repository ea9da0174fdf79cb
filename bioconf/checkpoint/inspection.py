"""``bioconf inspect CKPT``: what a NeMo 2 checkpoint holds, read as data.

The model config comes from ``context/io.json`` (``read_checkpoint_config``) and the tensor table from
``weights/.metadata`` (``read_weights_metadata``); neither imports nor calls anything the checkpoint
names, and neither imports torch, so a checkpoint from anywhere can be looked at safely and quickly.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import orjson

from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.checkpoint.weights_index import read_weights_metadata
from bioconf.errors import jsonable


def inspect_checkpoint(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's model config (class, explicit fields, fields bioconf does not model) and its
    weights (backend, tensors with shape/dtype/bytes/chunks, non-tensor items), as JSON-ready data.
    Raises CheckpointError: a file missing or unreadable, a refused pickle global, a config value
    ModelConfig rejects."""
    checkpoint = read_checkpoint_config(ckpt_dir)
    weights = read_weights_metadata(ckpt_dir)
    values = checkpoint.config.to_dict()
    return {
        "checkpoint": str(checkpoint.paths.root),
        "config": {
            "path": str(checkpoint.path),
            "class": checkpoint.class_path,
            "class_is_bioconf": checkpoint.class_is_bioconf,
            "bionemo_family": checkpoint.bionemo_family,
            "fields": {name: values[name] for name in sorted(checkpoint.config.model_fields_set)},
            "unknown_fields": checkpoint.unknown_fields,
            "dropped_entries": checkpoint.dropped,
        },
        "weights": weights.to_dict(),
    }


def format_inspection(result: dict[str, Any], fmt: Literal["text", "json"] = "text") -> str:
    """``inspect_checkpoint``'s result for people (the config, then an aligned tensor table with a
    total) or as one JSON document."""
    if fmt == "json":
        option = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
        try:
            return orjson.dumps(result, option=option).decode() + "\n"
        except TypeError:  # orjson.JSONEncodeError: the readers bound what they return; this is a net
            return orjson.dumps(jsonable(result), option=option).decode() + "\n"
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}; expected 'text' or 'json'")
    return "\n".join(_text_lines(result)) + "\n"


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _human(n: int) -> str:
    """``208.5 KiB``."""
    scaled, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024 or unit == "TiB":
            break
        scaled /= 1024
    return f"{n} B" if unit == "B" else f"{scaled:.1f} {unit}"


MAX_CELL_CHARS = 200
"""Characters shown of one table cell: a name or value from a checkpoint may be megabytes long, and
every row is padded to the widest (the JSON output holds everything)."""


def _cell(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Rows aligned in columns (those in ``right`` right-aligned), two spaces apart; long cells cut."""
    rows = [tuple(_cell(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


def _text_lines(result: dict[str, Any]) -> list[str]:
    config, weights = result["config"], result["weights"]
    family = f", read as BioNeMo's {config['bionemo_family']}" if config["bionemo_family"] else ""
    lines = [f"checkpoint: {result['checkpoint']}", f"config: {config['class']} ({config['path']}{family})"]
    fields = [(f"  {name}", _shown(value)) for name, value in config["fields"].items()]
    fields += [
        (f"  {name}", f"{_shown(value)}  (not modelled by bioconf)")
        for name, value in config["unknown_fields"].items()
    ]
    fields += [
        (f"  {name}", f"{_shown(items)}  (dropped: bioconf cannot use these entries)")
        for name, items in config["dropped_entries"].items()
    ]
    lines += _table(fields, set()) if fields else []

    backend = weights["backend"]
    kind = (
        f"{backend.get('sharded_backend')} v{backend.get('sharded_backend_version')}"
        if backend
        else "no metadata.json"
    )
    lines += [
        "",
        f"weights: {weights['path']} ({kind}, DCP metadata {weights['dcp_version']})",
        "files: " + ", ".join(f"{name} {_human(size)}" for name, size in weights["files"].items()),
        "",
    ]
    tensors = weights["tensors"]
    rows = [("name", "shape", "dtype", "bytes", "chunks")]
    rows += [
        (
            t["name"],
            _shown(t["shape"]).replace(",", ", "),
            t["dtype"],
            f"{t['bytes']:,}",
            str(len(t["chunks"])),
        )
        for t in tensors
    ]
    rows.append((f"total ({len(tensors)} tensors)", "", "", f"{weights['total_bytes']:,}", ""))
    lines += _table(rows, {3, 4})
    lines.append(f"in memory: {_human(weights['total_bytes'])}")
    if weights["objects"]:
        lines += ["", f"non-tensor items ({len(weights['objects'])}, stored as bytes):"]
        lines += _table([(f"  {o['name']}", o["file"], f"{o['length']:,}") for o in weights["objects"]], {2})
    return lines
