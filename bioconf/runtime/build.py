"""Building the Megatron model a runtime config describes, for the calling rank's pipeline stage.

GPT and BERT use megatron-core's own models with the Transformer Engine layer spec where TE is
importable and the local (pure PyTorch) spec otherwise. A user model class named by
``model_cls`` is called with the documented contract:

    model_cls(config=config, pre_process=bool, post_process=bool, vp_stage=int | None)

where ``config`` carries ``vocab_size``, ``seq_length`` and the other fields the class needs.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from bioconf.errors import ConfigError, ConfigIssue
from bioconf.runtime.models import QueryScaling
from bioconf.schema.families import padded_vocab_size


def transformer_engine_available() -> bool:
    """Whether the Transformer Engine layer specs can be used."""
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def pipeline_stage(vp_stage: int | None = None) -> tuple[bool, bool]:
    """(pre_process, post_process) for this rank and virtual stage; (True, True) without model parallelism."""
    if not parallel_state.model_parallel_is_initialized():
        return True, True
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )


def _require_shapes(config: Any) -> tuple[int, int]:
    missing = [name for name in ("vocab_size", "seq_length") if getattr(config, name) is None]
    if missing:
        raise ConfigError(
            [
                ConfigIssue(
                    f"{name} is needed to build a model: set it, or start from a checkpoint that has it",
                    "missing",
                    (name,),
                )
                for name in missing
            ]
        )
    return config.vocab_size, config.seq_length  # type: ignore[return-value]


def parameter_estimate(config: Any) -> tuple[int, int, int]:
    """(embedding, per-layer, shards): about how many parameters a GPT/BERT model's embeddings and
    output layer hold, and each of its layers (attention's q, k, v and output projection, the MLP or
    every expert's), and how many ranks share them (tensor x pipeline x expert parallel). Norms,
    biases and heads are left out: a model refused by it surely does not fit. Python integers, so
    no product overflows."""
    hidden = config.hidden_size
    heads = config.num_attention_heads or 1
    kv_channels = config.kv_channels or hidden // heads
    groups = config.num_query_groups or heads
    attention = hidden * kv_channels * (2 * heads + 2 * groups)
    glu = 2 if config.gated_linear_unit else 1
    ffn = config.ffn_hidden_size or 4 * hidden
    if config.num_moe_experts:
        mlp = config.num_moe_experts * (glu + 1) * hidden * (config.moe_ffn_hidden_size or ffn)
    else:
        mlp = (glu + 1) * hidden * ffn
    embedding = (config.vocab_size or 0) * hidden * (1 if config.share_embeddings_and_output_weights else 2)
    if config.position_embedding_type == "learned_absolute":
        embedding += (config.seq_length or 0) * hidden
    shards = (
        max(config.tensor_model_parallel_size or 1, 1)
        * max(config.pipeline_model_parallel_size or 1, 1)
        * max(config.expert_model_parallel_size or 1, 1)
    )
    return embedding, attention + mlp, shards


def memory_for_parameters(config: Any) -> tuple[int, str]:
    """(bytes, where) the parameters will be allocated in: the GPU's free memory unless megatron
    initializes on CPU, else the machine's physical memory."""
    if not config.use_cpu_initialization and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"GPU {torch.cuda.current_device()} (free memory)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine (physical memory)"


def _require_memory(config: Any) -> None:
    """Refuse, before anything is allocated, a model whose parameters alone cannot fit: torch would
    fail deep inside megatron with an overflow or an out-of-memory error (vocab_size 2**62 read from
    a checkpoint), or the machine would start swapping."""
    embedding, per_layer, shards = parameter_estimate(config)
    layers = per_layer * (config.num_layers or 0)
    params = (embedding + layers) // shards
    itemsize = torch.empty((), dtype=config.params_dtype).element_size()
    needed = params * itemsize
    available, where = memory_for_parameters(config)
    if needed <= available:
        return
    fields = {
        name: getattr(config, name)
        for name in ("vocab_size", "hidden_size", "num_layers", "ffn_hidden_size", "num_attention_heads")
    }
    message = (
        f"the model's parameters need about {_size(needed)} on this rank ({_count(params)} parameters "
        f"of {itemsize} bytes, {config.params_dtype}, over {shards} model-parallel ranks) but {where} "
        f"has {_size(available)}: " + ", ".join(f"{name}={_count(value)}" for name, value in fields.items())
    )
    largest = "vocab_size" if embedding >= layers else "num_layers"
    raise ConfigError([ConfigIssue(message, "model_too_large", (largest,), fields)])


def _count(value: Any) -> str:
    """A (possibly huge) integer for a message."""
    if not isinstance(value, int):
        return repr(value)
    return f"{value:,}" if value.bit_length() < 200 else f"about 2**{value.bit_length() - 1}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            break
        n //= 1024
    return f"{_count(n)} {unit}"


def gpt_layer_spec(config: Any) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    options = {
        "num_experts": config.num_moe_experts,
        "moe_grouped_gemm": config.moe_grouped_gemm,
        "qk_layernorm": config.qk_layernorm,
    }
    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**options)
    return gpt_layer_specs.get_gpt_layer_local_spec(**options, normalization=config.normalization)


def bert_layer_spec(config: Any) -> ModuleSpec:
    """megatron's BERT layer (TE or local), with what ``biobert_spec_option`` adds as BioNeMo does:
    ESM's query scaling (``esm2_...``), or layernorms on query and key (``..._qk_ln`` options, when
    ``qk_layernorm``)."""
    from megatron.core.models.bert import bert_layer_specs

    if transformer_engine_available():
        spec = bert_layer_specs.get_bert_layer_with_transformer_engine_spec()
    else:
        spec = bert_layer_specs.bert_layer_local_spec
    option = config.biobert_spec_option
    if option.startswith("esm2_"):
        query, key = QueryScaling, None
    elif "qk_ln" in option and config.qk_layernorm:
        query = key = _te_norm() if transformer_engine_available() else spec.submodules.input_layernorm
    else:
        return spec
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    attention.q_layernorm = query
    if key is not None:
        attention.k_layernorm = key
    return spec


def _te_norm() -> Any:
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def vocab_rows(config: Any) -> int:
    """The rows of the embedding and output layers: ``vocab_size`` padded as NeMo pads it
    (``bioconf.schema.families.padded_vocab_size``)."""
    return padded_vocab_size(
        config.vocab_size, config.make_vocab_size_divisible_by, config.tensor_model_parallel_size
    )


def build_model(config: Any, vp_stage: int | None = None) -> MegatronModule:
    """The model for this rank's pipeline stage (and virtual stage ``vp_stage``); ``config`` is a
    runtime config (``bioconf.runtime.config``)."""
    pre_process, post_process = pipeline_stage(vp_stage)
    model_cls = config.model_cls
    is_gpt = isinstance(model_cls, type) and issubclass(model_cls, GPTModel)
    is_bert = isinstance(model_cls, type) and issubclass(model_cls, BertModel)
    if not (is_gpt or is_bert):
        return model_cls(config=config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    _, seq_length = _require_shapes(config)
    _require_memory(config)
    common = {
        "config": config,
        "vocab_size": vocab_rows(config),
        "max_sequence_length": seq_length,
        "pre_process": pre_process,
        "post_process": post_process,
        "share_embeddings_and_output_weights": config.share_embeddings_and_output_weights,
        "position_embedding_type": config.position_embedding_type,
        "rotary_percent": config.rotary_percent,
        "vp_stage": vp_stage,
    }
    if is_gpt:
        return model_cls(
            **common, transformer_layer_spec=gpt_layer_spec(config), rotary_base=config.rotary_base
        )
    return model_cls(
        **common,
        transformer_layer_spec=bert_layer_spec(config),
        num_tokentypes=config.num_tokentypes,
        add_binary_head=config.add_binary_head,
        seq_len_interpolation_factor=config.seq_len_interpolation_factor,
        fp16_lm_cross_entropy=config.fp16_lm_cross_entropy,
        parallel_output=config.parallel_output,
    )


def build_chunks(config: Any) -> list[MegatronModule]:
    """This rank's model as its list of virtual pipeline chunks (one without virtual pipelining)."""
    vp_size = config.virtual_pipeline_model_parallel_size
    return [build_model(config, vp) for vp in range(vp_size)] if vp_size else [build_model(config)]
