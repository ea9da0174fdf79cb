"""What Hugging Face's ESM-2 (``EsmForMaskedLM``) and bioconf's ``esm2`` family are to each other:
the config fields, and which tensor of one is which (part of a) tensor of the other.

The two models compute the same function: pre-layernorm transformer layers, ESM's query scaling
before the rotary embedding, erf GELU, a final layernorm, the masked-LM head (dense, GELU,
layernorm, tied decoder plus bias), token dropout and padding zeroed in the embedding. Two layout
differences are all the conversion does:

* megatron fuses query, key and value into ``linear_qkv``, grouped per head: for head h the rows
  ``[q_h; k_h; v_h]`` (head_dim rows each), which ``SelfAttention.get_query_key_value_tensors``
  reads back as [heads, 3 * head_dim] (one query group per head). HF keeps three [H, H] matrices.
* megatron pads the vocabulary rows (embedding, output bias) to ``make_vocab_size_divisible_by``;
  HF has exactly ``vocab_size`` rows. Padding rows are zero here and dropped on the way back.

Plain data and shape arithmetic: no torch import (the caller moves the tensors).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from bioconf.errors import CheckpointError, ConfigIssue
from bioconf.schema.derived import effective
from bioconf.schema.model import ModelConfig

Part = Literal["whole", "rows", "q", "k", "v"]
"""How an HF tensor sits in its megatron tensor: all of it, its first ``vocab_size`` rows (padded
vocabulary), or the query / key / value rows of the per-head fused ``linear_qkv``."""

ROTARY_BASE: Final = 10000
"""HF's ESM rotary embedding has this base built in (not a config field)."""


@dataclass(frozen=True)
class Pair:
    """One HF tensor and where it lives in megatron's state dict."""

    hf: str
    mcore: str
    part: Part = "whole"


def tensor_pairs(num_layers: int) -> list[Pair]:
    """Every tensor of HF's masked LM that the megatron model holds, in file order."""
    pairs = [
        Pair("esm.embeddings.word_embeddings.weight", "embedding.word_embeddings.weight", "rows"),
        Pair("lm_head.bias", "output_layer.bias", "rows"),
    ]
    for i in range(num_layers):
        hf, mc = f"esm.encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            pairs += [
                Pair(f"{hf}attention.LayerNorm.{kind}", f"{mc}input_layernorm.{kind}"),
                *(
                    Pair(f"{hf}attention.self.{name}.{kind}", f"{mc}self_attention.linear_qkv.{kind}", part)
                    for name, part in (("query", "q"), ("key", "k"), ("value", "v"))
                ),
                Pair(f"{hf}attention.output.dense.{kind}", f"{mc}self_attention.linear_proj.{kind}"),
                Pair(f"{hf}LayerNorm.{kind}", f"{mc}pre_mlp_layernorm.{kind}"),
                Pair(f"{hf}intermediate.dense.{kind}", f"{mc}mlp.linear_fc1.{kind}"),
                Pair(f"{hf}output.dense.{kind}", f"{mc}mlp.linear_fc2.{kind}"),
            ]
    for kind in ("weight", "bias"):
        pairs += [
            Pair(f"esm.encoder.emb_layer_norm_after.{kind}", f"encoder.final_layernorm.{kind}"),
            Pair(f"lm_head.dense.{kind}", f"lm_head.dense.{kind}"),
            Pair(f"lm_head.layer_norm.{kind}", f"lm_head.layer_norm.{kind}"),
        ]
    return pairs


def rotary_buffer_names(num_layers: int) -> list[str]:
    """HF's per-layer rotary ``inv_freq`` buffers: derived from the head size, not weights."""
    return [f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq" for i in range(num_layers)]


TIED_DECODER: Final = "lm_head.decoder.weight"
"""HF's output projection, tied to the word embeddings (a file may hold a copy, or not)."""

CONTACT_HEAD: Final = ("esm.contact_head.regression.weight", "esm.contact_head.regression.bias")
"""ESM's contact-prediction head: not part of the masked LM, and megatron's model has no place for it."""

DERIVED_BUFFERS: Final = ("esm.embeddings.position_ids",)


def hf_shape(mcore_shape: tuple[int, ...], part: Part, vocab_size: int) -> tuple[int, ...]:
    """The HF tensor's shape, from the megatron tensor's (``heads`` does not matter: q, k and v
    each take a third of the fused rows)."""
    if part == "rows":
        return (vocab_size, *mcore_shape[1:])
    if part in ("q", "k", "v"):
        return (mcore_shape[0] // 3, *mcore_shape[1:])
    return mcore_shape


QKV_INDEX: Final[dict[str, int]] = {"q": 0, "k": 1, "v": 2}


# ---- config.json -> ModelConfig --------------------------------------------------------------------

_POSITIVE_INTS: Final = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def _refuse(
    message: str, type: str, source: str, field: str | None = None, value: Any = None
) -> CheckpointError:
    loc = (field,) if field else ()
    return CheckpointError([ConfigIssue(message, type, loc, value, source)])


def _require_esm2_features(hf: dict[str, Any], source: str) -> None:
    """Refuse what HF's ESM class can be but ESM-2's masked LM is not."""
    if hf.get("model_type") != "esm":
        raise _refuse(
            "not an ESM model: model_type must be 'esm'",
            "not_esm",
            source,
            "model_type",
            hf.get("model_type"),
        )
    if hf.get("is_folding_model"):
        raise _refuse(
            "an ESMFold model, not an ESM-2 masked LM", "not_esm2", source, "is_folding_model", True
        )
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "rotary":
        raise _refuse(
            "not ESM-2: ESM-2 uses rotary position embeddings (absolute ones are ESM-1b's)",
            "not_esm2",
            source,
            "position_embedding_type",
            kind,
        )
    if hf.get("emb_layer_norm_before"):
        raise _refuse(
            "not ESM-2: a layernorm before the first layer (ESM-1b's) has no place in the esm2 family",
            "not_esm2",
            source,
            "emb_layer_norm_before",
            True,
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise _refuse("ESM-2 uses the (erf) gelu activation", "not_esm2", source, "hidden_act", act)


def _number(hf: dict[str, Any], name: str, default: float, source: str) -> float:
    value = hf.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _refuse("must be a non-negative number", "invalid_field", source, name, value)
    return float(value)


def model_config_from_hf(hf: Any, source: str | os.PathLike[str]) -> ModelConfig:
    """The ``esm2`` ModelConfig of an HF ESM-2 ``config.json`` (parsed), or CheckpointError naming
    the file and the field that is not ESM-2's. ``bias_activation_fusion`` is off: megatron's fused
    bias-GELU is the tanh approximation, HF's ESM computes erf GELU."""
    source = str(source)
    if not isinstance(hf, dict):
        raise _refuse("not a model config: expected a JSON object", "not_a_config", source)
    _require_esm2_features(hf, source)
    sizes: dict[str, int] = {}
    for name in _POSITIVE_INTS:
        value = hf.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _refuse(
                "must be a positive integer",
                "invalid_field" if name in hf else "missing",
                source,
                name,
                value,
            )
        sizes[name] = value
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise _refuse(
            f"hidden_size {sizes['hidden_size']} is not a multiple of num_attention_heads",
            "invalid_field",
            source,
            "num_attention_heads",
            sizes["num_attention_heads"],
        )
    token_dropout = bool(hf.get("token_dropout", False))
    mask_token_id = hf.get("mask_token_id")
    if token_dropout and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int)):
        raise _refuse(
            "token_dropout needs an integer mask_token_id", "missing", source, "mask_token_id", mask_token_id
        )
    values: dict[str, Any] = {
        "model_cls": "esm2",
        "num_layers": sizes["num_hidden_layers"],
        "hidden_size": sizes["hidden_size"],
        "num_attention_heads": sizes["num_attention_heads"],
        "ffn_hidden_size": sizes["intermediate_size"],
        "vocab_size": sizes["vocab_size"],
        "seq_length": sizes["max_position_embeddings"],
        "layernorm_epsilon": _number(hf, "layer_norm_eps", 1e-12, source),
        "hidden_dropout": _number(hf, "hidden_dropout_prob", 0.0, source),
        "attention_dropout": _number(hf, "attention_probs_dropout_prob", 0.0, source),
        "init_method_std": _number(hf, "initializer_range", 0.02, source),
        "token_dropout": token_dropout,
        "bias_activation_fusion": False,
    }
    if isinstance(mask_token_id, int) and not isinstance(mask_token_id, bool):
        values["mask_token_id"] = mask_token_id
    try:
        return ModelConfig.model_validate(values)
    except ValueError as error:  # a value bioconf's schema refuses (a dropout above 1, say)
        raise _refuse(f"not a valid esm2 config: {error}", "invalid_field", source) from None


# ---- ModelConfig -> config.json --------------------------------------------------------------------

_HF_REQUIRES: Final[dict[str, Any]] = {
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
    "rotary_base": ROTARY_BASE,
    "share_embeddings_and_output_weights": True,
    "add_binary_head": False,
    "num_tokentypes": 0,
    "activation_func": "gelu",
    "gated_linear_unit": False,
    "add_bias_linear": True,
    "normalization": "LayerNorm",
    "qk_layernorm": False,
    "softmax_scale": 1.0,
    "apply_query_key_layer_scaling": False,
}
"""The esm2 settings HF's EsmForMaskedLM has built in: a checkpoint that changed one cannot become it."""


def require_hf_compatible(config: ModelConfig, source: str | os.PathLike[str]) -> None:
    """Refuse (CheckpointError naming the field) an esm2 checkpoint HF's ESM cannot express."""
    source = str(source)
    if config.model_cls != "esm2":
        raise _refuse(
            "not an ESM-2 checkpoint: its model_cls is not the esm2 family",
            "not_esm2",
            source,
            "model_cls",
            config.model_cls,
        )
    for name, wanted in _HF_REQUIRES.items():
        if getattr(config, name) != wanted:
            raise _refuse(
                f"HF's EsmForMaskedLM has {name}={wanted!r} built in",
                "not_convertible",
                source,
                name,
                getattr(config, name),
            )
    if not str(config.biobert_spec_option).startswith("esm2_"):
        raise _refuse(
            "without ESM's query scaling (an esm2_* spec) the model is not HF's ESM",
            "not_convertible",
            source,
            "biobert_spec_option",
            config.biobert_spec_option,
        )
    heads, hidden = config.num_attention_heads, config.hidden_size
    for name, wanted in (("num_query_groups", heads), ("kv_channels", hidden // heads)):
        value = effective(config, name)
        if value is not None and value != wanted:
            raise _refuse(
                f"HF's ESM has {name}={wanted} for this shape", "not_convertible", source, name, value
            )


def hf_config_from_model(config: ModelConfig, vocab_size: int, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` of HF's EsmForMaskedLM for an esm2 ModelConfig (checked with
    ``require_hf_compatible``). ``pad_token_id`` is the ESM-2 vocabulary's (1): the NeMo side does
    not record it, and HF's rotary ESM uses it for nothing but the embedding's padding index."""
    return {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "vocab_size": vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": effective(config, "ffn_hidden_size"),
        "max_position_embeddings": config.seq_length,
        "position_embedding_type": "rotary",
        "layer_norm_eps": config.layernorm_epsilon,
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "token_dropout": config.token_dropout,
        "mask_token_id": config.mask_token_id,
        "pad_token_id": 1,
        "emb_layer_norm_before": False,
        "is_folding_model": False,
        "esmfold_config": None,
        "vocab_list": None,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def hf_names(num_layers: int) -> Iterator[str]:
    """Every HF tensor name the masked LM's file holds that bioconf writes (pairs and rotary buffers)."""
    yield from (pair.hf for pair in tensor_pairs(num_layers))
    yield from rotary_buffer_names(num_layers)
