"""Hugging Face ESM-2 (``EsmForMaskedLM``: config.json + model.safetensors) to a NeMo 2 checkpoint of
bioconf's ``esm2`` family, and back.

Both directions build the megatron model on CPU in memory (one process) and use bioconf's own
writer and loader for the NeMo side (``save_checkpoint``, ``load_weights_sharded_inplace_nemo2_to_mcore``):
the NeMo format's sharded layout is theirs to get right. The HF side streams: the safetensors file
is read one tensor at a time into the model's parameters, and written one tensor at a time from
them. Memory is therefore the model's size plus its largest tensor, not twice the model.

Not carried: ESM's contact-prediction head (``esm.contact_head.*``; megatron's model has no place
for it: HF initializes a fresh one when it loads the converted folder), the rotary ``inv_freq``
buffers and ``position_ids`` (derived from the config; written back computed as HF computes them),
a stored copy of the tied decoder (``lm_head.decoder.weight``; checked equal to the embedding) and
the tokenizer files (vocab.txt and friends).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.convert.esm2_hf import (
    CONTACT_HEAD,
    DERIVED_BUFFERS,
    QKV_INDEX,
    TIED_DECODER,
    hf_config_from_model,
    hf_shape,
    model_config_from_hf,
    require_hf_compatible,
    rotary_buffer_names,
    tensor_pairs,
)
from bioconf.convert.tensorfile import Planned, TensorFile, write_tensor_file
from bioconf.errors import CheckpointError, UsageError
from bioconf.fs import read_bytes, refuse_existing, replace_directory, sync_tree, write_synced
from bioconf.resolve import resolve
from bioconf.runtime.build import build_model
from bioconf.runtime.config import materialize
from bioconf.runtime.initialize import single_rank_config
from bioconf.runtime.parallel import ensure_parallel_state
from bioconf.runtime.save import save_checkpoint
from bioconf.runtime.weights import load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema.model import ModelConfig

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HALF_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
"""Weights stored in these are converted in them (``params_dtype``); anything else in float32."""


# ---- HF -> NeMo ---------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | os.PathLike[str]) -> ModelConfig:
    """The esm2 ModelConfig of the HF folder's config.json (CheckpointError naming the file/field)."""
    path = Path(hf_dir) / HF_CONFIG
    if not Path(hf_dir).is_dir():
        raise CheckpointError.one("not a folder", "not_a_folder", source=hf_dir)
    if not path.is_file():
        raise CheckpointError.one(
            f"not a Hugging Face model folder: no {HF_CONFIG}", "missing_file", source=path
        )
    try:
        document = json.loads(read_bytes(path, CheckpointError))
    except ValueError as error:
        raise CheckpointError.one(f"not JSON: {error}", "invalid_json", source=path) from None
    return model_config_from_hf(document, path)


def _open_hf_weights(hf_dir: str | os.PathLike[str]) -> TensorFile:
    path = Path(hf_dir) / HF_WEIGHTS
    if not path.is_file():
        sharded = Path(hf_dir) / f"{HF_WEIGHTS}.index.json"
        hint = " (sharded safetensors are not supported)" if sharded.exists() else ""
        raise CheckpointError.one(f"no {HF_WEIGHTS} in the model folder{hint}", "missing_file", source=path)
    return TensorFile(path)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_hf_tensors(
    weights: TensorFile, config: ModelConfig, mcore_shapes: dict[str, tuple[int, ...]]
) -> None:
    """Before anything is copied: every tensor the masked LM needs is there with its shape and a
    floating dtype, and nothing unknown is (a file of another model would be misread silently)."""
    entries, pairs = weights.entries, tensor_pairs(config.num_layers)
    missing = [pair.hf for pair in pairs if pair.hf not in entries]
    if missing:
        raise CheckpointError.one(
            f"not an EsmForMaskedLM of this config: missing tensors {_shown(missing)}",
            "missing_tensors",
            source=weights.path,
        )
    for pair in pairs:
        entry, wanted = entries[pair.hf], hf_shape(mcore_shapes[pair.mcore], pair.part, config.vocab_size)
        if entry.shape != wanted:
            raise CheckpointError.one(
                f"shape {list(entry.shape)} where config.json implies {list(wanted)}",
                "shape_mismatch",
                source=weights.path,
                loc=(pair.hf,),
            )
        if not entry.dtype.is_floating_point:
            raise CheckpointError.one(
                f"not floating point ({entry.dtype})", "bad_dtype", source=weights.path, loc=(pair.hf,)
            )
    known = {pair.hf for pair in pairs} | set(rotary_buffer_names(config.num_layers))
    unknown = sorted(set(entries) - known - {TIED_DECODER, *CONTACT_HEAD, *DERIVED_BUFFERS})
    if unknown:
        raise CheckpointError.one(
            f"tensors an ESM-2 masked LM does not have: {_shown(unknown)}",
            "unknown_tensors",
            source=weights.path,
        )


def _copy_in(target: torch.Tensor, tensor: torch.Tensor, part: str, heads: int) -> None:
    """Write the HF ``tensor`` into its place in the megatron ``target`` (in place)."""
    if part == "rows":
        target[: tensor.shape[0]].copy_(tensor)
        target[tensor.shape[0] :].zero_()  # vocabulary padding: never a real token
    elif part in QKV_INDEX:
        per_head = target.view(heads, 3, -1, *target.shape[1:])
        per_head[:, QKV_INDEX[part]].copy_(tensor.view(heads, -1, *tensor.shape[1:]))
    else:
        target.copy_(tensor)


def _check_tied_decoder(weights: TensorFile, embedding: torch.Tensor) -> None:
    """A stored decoder copy must be the embedding: the esm2 model ties them and keeps one."""
    if TIED_DECODER in weights.entries and not torch.equal(weights.read(TIED_DECODER), embedding):
        raise CheckpointError.one(
            "the decoder differs from the word embeddings: ESM-2's are tied and the esm2 family keeps one",
            "untied_decoder",
            source=weights.path,
            loc=(TIED_DECODER,),
        )


def hf_to_nemo(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Convert an HF ``EsmForMaskedLM`` folder to a NeMo 2 checkpoint of the esm2 family at
    ``out_dir`` (written under a temporary sibling and renamed into place by ``save_checkpoint``).

    The model is built in memory (megatron's sharded save needs it) with ``perform_initialization``
    off; the HF tensors are then copied in one at a time. Raises CheckpointError for a folder that
    is not an ESM-2 masked LM, OutputExistsError for an existing ``out_dir`` unless ``overwrite``."""
    config = read_hf_config(hf_dir)
    with _open_hf_weights(hf_dir) as weights:
        embedding = weights.entries.get("esm.embeddings.word_embeddings.weight")
        if embedding is not None and embedding.dtype in HALF_DTYPES:  # keep the file's precision
            config = config.with_overrides({"params_dtype": HALF_DTYPES[embedding.dtype]})
        refuse_existing(out_dir, overwrite)
        runtime = materialize(config)
        runtime.use_cpu_initialization = True
        runtime.perform_initialization = False  # every parameter is overwritten below
        with ensure_parallel_state(runtime):
            model = build_model(runtime)
            state = model.state_dict()
            shapes = {key: tuple(value.shape) for key, value in state.items() if torch.is_tensor(value)}
            _check_hf_tensors(weights, config, shapes)
            with torch.no_grad():
                for pair in tensor_pairs(config.num_layers):
                    _copy_in(state[pair.mcore], weights.read(pair.hf), pair.part, config.num_attention_heads)
            _check_tied_decoder(weights, state["embedding.word_embeddings.weight"][: config.vocab_size])
            return save_checkpoint(model, config, out_dir, overwrite=overwrite)


# ---- NeMo -> HF ---------------------------------------------------------------------------------


def _take_out(source: torch.Tensor, part: str, heads: int, vocab: int) -> torch.Tensor:
    """The HF tensor that is (part of) the megatron tensor ``source`` (a copy)."""
    if part == "rows":
        return source[:vocab].clone()
    if part in QKV_INDEX:
        per_head = source.view(heads, 3, -1, *source.shape[1:])
        return per_head[:, QKV_INDEX[part]].reshape(-1, *source.shape[1:]).clone()
    return source.clone()


def rotary_inv_freq(head_dim: int) -> torch.Tensor:
    """HF's ESM ``inv_freq`` buffer for a head size, computed as HF computes it (fp32)."""
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _hf_plans(state: dict[str, torch.Tensor], config: ModelConfig, vocab: int) -> list[Planned]:
    """Every HF tensor, in one dtype: the word embedding's. megatron keeps some tensors (its
    layernorms) in float32 whatever ``params_dtype`` says, while an HF model is saved in one dtype;
    a bfloat16 HF model converted both ways thus comes back bit-exact, dtypes included."""
    heads, dtype = config.num_attention_heads, state["embedding.word_embeddings.weight"].dtype
    plans = [
        Planned(
            pair.hf,
            dtype,
            hf_shape(tuple(state[pair.mcore].shape), pair.part, vocab),
            lambda p=pair: _take_out(state[p.mcore], p.part, heads, vocab).to(dtype),
        )
        for pair in tensor_pairs(config.num_layers)
    ]
    head_dim = config.hidden_size // heads
    plans += [
        Planned(name, dtype, (head_dim // 2,), lambda: rotary_inv_freq(head_dim).to(dtype))
        for name in rotary_buffer_names(config.num_layers)
    ]
    return plans


def _read_nemo_config(ckpt_dir: str | os.PathLike[str], vocab_size: int | None) -> tuple[ModelConfig, Path]:
    """The checkpoint's esm2 config, merged with what its weights say (the vocabulary rows when the
    context does not record ``vocab_size``, as BioNeMo's do not), checked against HF's ESM."""
    ckpt = read_checkpoint_config(ckpt_dir)
    require_hf_compatible(ckpt.config, ckpt.path)
    merged = resolve(ckpt.config, ckpt, "seed").config
    if vocab_size is not None:
        if vocab_size <= 0 or (merged.vocab_size is not None and vocab_size > merged.vocab_size):
            raise UsageError.one(
                f"--vocab-size must be between 1 and the checkpoint's {merged.vocab_size}",
                "bad_vocab_size",
                input=vocab_size,
            )
        merged = merged.with_overrides({"vocab_size": vocab_size})
    require_hf_compatible(merged, ckpt.path)
    return merged, ckpt.paths.root


def nemo_to_hf(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    vocab_size: int | None = None,
) -> Path:
    """Convert a NeMo 2 checkpoint of the esm2 family to an HF ``EsmForMaskedLM`` folder
    (config.json + model.safetensors) at ``out_dir``: written under a hidden temporary sibling and
    renamed into place, so ``out_dir`` never holds half a model.

    The model is built in memory and loaded with bioconf's loader (any saved parallel layout);
    each HF tensor is then cut out of it and written as its turn comes. ``vocab_size``: the rows HF
    keeps, for a checkpoint that records only its padded embedding (default: the config's).
    Raises CheckpointError for a checkpoint HF's ESM cannot express (naming the field), the
    loader's errors for unreadable weights, OutputExistsError for an existing ``out_dir``."""
    target = Path(out_dir).absolute()
    refuse_existing(target, overwrite)
    config, root = _read_nemo_config(ckpt_dir, vocab_size)
    runtime = materialize(single_rank_config(config))
    runtime.use_cpu_initialization = True
    runtime.perform_initialization = False  # every parameter is loaded below
    with ensure_parallel_state(runtime):
        model = build_model(runtime)
        load_weights_sharded_inplace_nemo2_to_mcore(model, root, quiet=True)
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    vocab = config.vocab_size
    dtype = str(state["embedding.word_embeddings.weight"].dtype).removeprefix("torch.")
    hf_config = hf_config_from_model(config, vocab, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        write_synced(staging / HF_CONFIG, json.dumps(hf_config, indent=2, sort_keys=True).encode() + b"\n")
        write_tensor_file(staging / HF_WEIGHTS, _hf_plans(state, config, vocab))
        sync_tree(staging)
        refuse_existing(target, overwrite)  # nothing appeared there meanwhile
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def describe(path: Path) -> dict[str, Any]:
    """What a conversion wrote: the folder and its size (for the CLI's one line)."""
    return {"out": str(path), "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}
