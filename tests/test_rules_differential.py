"""Differential test: bioconf.schema.rules against megatron-core's own __post_init__ checks.

Hypothesis draws configs that concentrate on the fields the rules involve; each one is (1) checked by
``check_rules`` on a SimpleNamespace of megatron's defaults in schema form plus the drawn overrides, and
(2) built as a real ``TransformerConfig`` (values converted to megatron form). The verdicts (rejected
or not) must agree on every case. Megatron is real, never mocked.

Deliberate exceptions: megatron checks that depend on the installed environment (left to the runtime
by rules.py). On this CPU box there is no Transformer Engine, so megatron raises for them whatever the
config; such cases are excluded by ``environment_dependent`` (documented filter) and counted:

- apply_rope_fusion without multi_latent_attention: looks for TE's fused RoPE kernels.
- fp8 + selective recompute of "moe_act"/"layernorm" with a non-delayed fp8_recipe: TE >= 2.6 check.
- num_moe_experts + fp8: TE >= 1.7 check (>= 1.11 with moe_grouped_gemm).
- moe_permute_fusion: imports TE's fused permutation kernels.
- symmetric_ar_type: TE >= 2.3 and torch >= 2.7 checks.
- delay_wgrad_compute with cuda_graph_impl "transformer_engine": TE >= 2.10 check.
(overlap_moe_expert_parallel_comm's torch >= 2.6 check passes with the installed torch, so those cases
are generated and compared.)
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import types
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig
from pydantic import ValidationError

from bioconf.schema import ModelConfig
from bioconf.schema.names import ACTIVATIONS
from bioconf.schema.rules import RuleViolation, check_rules, rule_warnings

# ---- schema form <-> megatron form ------------------------------------------------------------

NO_JSON_FORM = frozenset(
    {
        "init_method",
        "output_layer_init_method",
        "embedding_init_method",
        "timers",
        "finalize_model_grads_func",
        "grad_scale_func",
        "no_sync_func",
        "grad_sync_func",
        "param_sync_func",
        "_cpu_offloading_context",
        "quant_recipe",
    }
)
DTYPE_FIELDS = ("params_dtype", "pipeline_dtype", "autocast_dtype")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _activation(name: str) -> Any:
    """The function the runtime builds for a registry name (bioconf.schema.names.ACTIVATIONS)."""
    module, attribute = ACTIVATIONS[name]
    return getattr(importlib.import_module(module), attribute)


def _schema_defaults() -> dict[str, Any]:
    defaults = {}
    for f in dataclasses.fields(TransformerConfig):
        if f.name in NO_JSON_FORM:
            continue
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(value, torch.dtype):
            value = _DTYPE_NAMES[value]
        elif value is F.gelu:
            value = "gelu"
        elif isinstance(value, AttnBackend):
            value = value.name
        defaults[f.name] = value
    return defaults


SCHEMA_DEFAULTS = _schema_defaults()


def to_megatron(overrides: dict[str, Any]) -> dict[str, Any]:
    """Schema-form overrides as TransformerConfig keyword arguments."""
    kwargs = copy.deepcopy(overrides)  # megatron mutates lists (recompute_modules)
    for name in DTYPE_FIELDS:
        if kwargs.get(name) is not None:
            kwargs[name] = getattr(torch, kwargs[name])
    if "activation_func" in kwargs:
        kwargs["activation_func"] = _activation(kwargs["activation_func"])
    if "attention_backend" in kwargs:
        kwargs["attention_backend"] = AttnBackend[kwargs["attention_backend"]]
    return kwargs


def megatron_error(overrides: dict[str, Any]) -> BaseException | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TransformerConfig(**to_megatron(overrides))
        except Exception as error:  # any exception is megatron refusing the config
            return error
    return None


def schema_namespace(overrides: dict[str, Any]) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{**SCHEMA_DEFAULTS, **copy.deepcopy(overrides)})


def environment_dependent(kw: dict[str, Any]) -> str | None:
    """Why megatron's verdict on ``kw`` depends on the installed environment (see module docstring)."""
    get = lambda name: kw.get(name, SCHEMA_DEFAULTS[name])  # noqa: E731
    modules = get("recompute_modules") or ["core_attn"]
    if get("apply_rope_fusion") and not get("multi_latent_attention"):
        return "apply_rope_fusion needs Transformer Engine's fused RoPE"
    if (
        get("fp8")
        and get("recompute_granularity") == "selective"
        and ("moe_act" in modules or "layernorm" in modules)
        and get("fp8_recipe") != "delayed"
    ):
        return "fp8 moe_act/layernorm recompute needs TE >= 2.6"
    if get("num_moe_experts") and get("fp8"):
        return "MoE fp8 needs TE >= 1.7"
    if get("moe_permute_fusion"):
        return "moe_permute_fusion needs TE's fused permutation"
    if get("symmetric_ar_type") is not None:
        return "symmetric_ar_type needs TE >= 2.3"
    if get("delay_wgrad_compute") and (
        get("cuda_graph_impl") == "transformer_engine" or get("external_cuda_graph")
    ):
        return "delay_wgrad_compute with TE CUDA graphs needs TE >= 2.10"
    return None


# ---- strategies -------------------------------------------------------------------------------


def often(draw: st.DrawFn, likely: Any, *others: Any, p: int = 70) -> Any:
    """``likely`` with probability ~p%, else one of ``others``."""
    if not others or draw(st.integers(0, 99)) < p:
        return likely
    return draw(st.sampled_from(others))


def pick(draw: st.DrawFn, *values: Any) -> Any:
    return draw(st.sampled_from(values))


def _precision(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    kw["fp16"], kw["bf16"] = often(draw, (False, True), (True, False), (False, False), (True, True), p=60)
    if draw(st.booleans()):
        kw["fp8"] = pick(draw, "e4m3", "hybrid")
        kw["fp8_recipe"] = pick(draw, "delayed", "tensorwise", "mxfp8", "blockwise", "custom")
        kw["fp8_quantizer_factory"] = often(draw, "pkg.mod.factory", None, p=50)
        kw["first_last_layers_bf16"] = draw(st.booleans())
        kw["num_layers_at_start_in_bf16"] = often(draw, 1, 0, -1, 2, 5)
        kw["num_layers_at_end_in_bf16"] = often(draw, 1, 0, -1, 3, 7)
    kw["fp8_param"] = often(draw, False, True)
    if draw(st.integers(0, 3)) == 0:
        kw["fp4"] = "e2m1"
        kw["fp4_recipe"] = pick(draw, "nvfp4", "custom")
        kw["fp4_quantizer_factory"] = often(draw, None, "pkg.mod.factory", p=50)
    kw["fp4_param"] = often(draw, False, True, p=85)


def _parallelism(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    pp = pick(draw, 1, 2, 2, 4, 3)
    kw["pipeline_model_parallel_size"] = pp
    if pp > 1 or draw(st.booleans()):
        kw["pipeline_dtype"] = often(draw, "bfloat16", None, "float32", p=80)
    if kw["tensor_model_parallel_size"] > 1:
        kw["sequence_parallel"] = draw(st.booleans())
    else:
        kw["sequence_parallel"] = often(draw, False, True, p=85)
    kw["context_parallel_size"] = pick(draw, 1, 1, 2)
    if kw["context_parallel_size"] > 1:
        kw["cp_comm_type"] = pick(
            draw, None, "p2p", ["a2a"] * kw["num_layers"], ["p2p"] * (kw["num_layers"] + 1)
        )
    if draw(st.integers(0, 2)) == 0:
        kw["defer_embedding_wgrad_compute"] = True
        kw["gradient_accumulation_fusion"] = often(draw, True, False)
        kw["wgrad_deferral_limit"] = often(draw, 0, -1, 3)
    if draw(st.integers(0, 2)) == 0:
        kw["overlap_p2p_comm_warmup_flush"] = True
        kw["overlap_p2p_comm"] = often(draw, True, False)
        kw["batch_p2p_comm"] = often(draw, False, True)


def _attention(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    kw["num_query_groups"] = pick(draw, None, 1, 2, 4, 8, 3, 6)
    if draw(st.integers(0, 3)) == 0:
        kw["kv_channels"] = 16
    variant = pick(draw, None, None, "gated_delta_net", "dsa")
    if variant is not None:
        kw["experimental_attention_variant"] = variant
        kw["context_parallel_size"] = often(draw, 1, 2)
    if variant == "gated_delta_net":
        kw["linear_attention_freq"] = often(draw, 4, None, [1, 0])
        kw["linear_num_key_heads"] = often(draw, 4, 3, None, 8)
        kw["linear_num_value_heads"] = often(draw, 8, 6, 12)
        kw["linear_conv_kernel_dim"] = often(draw, 4, None, p=85)
    if variant == "dsa":
        kw["apply_rope_fusion"] = often(draw, False, True)
        kw["multi_latent_attention"] = True  # keeps apply_rope_fusion off TE's path
    if draw(st.integers(0, 3)) == 0:
        kw["multi_latent_attention"] = True
        kw["rotary_interleaved"] = often(draw, False, True)
    if draw(st.integers(0, 4)) == 0:
        kw["fused_single_qkv_rope"] = True
        kw["attention_output_gate"] = often(draw, False, True)
    if draw(st.integers(0, 4)) == 0:
        kw["batch_invariant_mode"] = True
        kw["attention_backend"] = often(draw, "flash", "auto", "fused", "local", "unfused")


_RECOMPUTE_MODULE_CHOICES = (
    "core_attn",
    "moe_act",
    "layernorm",
    "mla_up_proj",
    "mlp",
    "moe",
    "shared_experts",
)


def _recompute(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    granularity = pick(draw, None, "full", "selective", "selective")
    kw["recompute_granularity"] = granularity
    if granularity == "full":
        kw["recompute_method"] = often(draw, "uniform", "block", None)
        kw["recompute_num_layers"] = often(draw, 1, None, 2)
    elif granularity == "selective":
        kw["recompute_method"] = often(draw, None, "uniform", p=85)
        kw["recompute_num_layers"] = often(draw, None, 1, p=85)
        modules = draw(st.lists(st.sampled_from(_RECOMPUTE_MODULE_CHOICES), max_size=3, unique=True))
        kw["recompute_modules"] = often(draw, modules, None, ["bogus"], [], p=80)
        kw["moe_grouped_gemm"] = often(draw, True, False)
        kw["multi_latent_attention"] = draw(st.booleans())
        kw["moe_shared_expert_intermediate_size"] = often(draw, None, 64, p=80)
        kw["moe_shared_expert_overlap"] = often(draw, False, True, p=80)
    kw["distribute_saved_activations"] = often(draw, False, True, p=80)
    kw["moe_layer_recompute"] = often(draw, False, True, p=80)


def _offloading(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    if draw(st.booleans()):
        kw["cpu_offloading"] = True
        kw["cpu_offloading_num_layers"] = often(draw, 0, -1, kw["num_layers"], kw["num_layers"] - 1)
    if draw(st.booleans()):
        kw["fine_grained_activation_offloading"] = True
        modules = draw(
            st.lists(
                st.sampled_from(
                    ("core_attn", "attn_proj", "expert_fc1", "moe_act", "attn_norm", "qkv_linear")
                ),
                max_size=3,
                unique=True,
            )
        )
        kw["offload_modules"] = often(draw, modules, None, ["bogus"], ["attn_proj"], p=75)


_LETTER_NAMES = {"E": "embedding", "t": "decoder", "L": "loss", "m": "mtp"}


def _layout(draw: st.DrawFn, num_layers: int, pp: int, mtp: int | None) -> str | list[list[str]]:
    """A pipeline layout for these sizes, valid unless a mutation is drawn."""
    vpp = pick(draw, 1, 1, 2)
    n_stages = pp * vpp
    cuts = sorted(draw(st.lists(st.integers(0, num_layers), min_size=n_stages - 1, max_size=n_stages - 1)))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, num_layers])]
    stages = [["t"] * k for k in counts]
    stages[0].insert(0, "E")
    stages[-1].extend(["m"] * (mtp or 0) + ["L"])
    mutation = often(
        draw, None, "no_loss", "extra_t", "bad_letter", "mtp_first", "drop_stage", "encoder", p=65
    )
    if mutation == "no_loss":
        stages[-1].remove("L")
    elif mutation == "extra_t":
        stages[-1].insert(0, "t")
    elif mutation == "bad_letter":
        stages[0].append("x")
    elif mutation == "mtp_first":
        stages[0].append("m")
    elif mutation == "drop_stage" and len(stages) > 1:
        stages[-2].extend(stages.pop())
    as_list = mutation == "encoder" or draw(st.booleans())
    if as_list:
        names = [[_LETTER_NAMES.get(x, x) for x in stage] for stage in stages]
        if mutation == "encoder":
            names[0].insert(1, "encoder")
        if names[0] and draw(st.booleans()):
            names[0][0] = " Embedding "  # megatron strips and lower-cases list entries
        return names
    text = "|".join("".join(stage) for stage in stages)
    if draw(st.booleans()):  # exercise the repetition syntax: "ttt" -> "t*3"
        text = text.replace("ttt", "t*3").replace("|", ",|")
    return text


def _pipeline(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    pp = kw.setdefault("pipeline_model_parallel_size", pick(draw, 2, 4, 1))
    if pp > 1:
        kw.setdefault("pipeline_dtype", "bfloat16")
    mode = pick(draw, "uneven", "account", "layout", "layout", "vpp")
    if mode == "uneven":
        kw["num_layers_in_first_pipeline_stage"] = often(draw, 1, None, 2, 0, 3, p=60)
        kw["num_layers_in_last_pipeline_stage"] = often(draw, 1, None, 2, 4, p=60)
        kw["virtual_pipeline_model_parallel_size"] = often(draw, None, 1, 2, p=60)
        kw["account_for_embedding_in_pipeline_split"] = often(draw, False, True, p=85)
    elif mode == "account":
        kw["account_for_embedding_in_pipeline_split"] = draw(st.booleans())
        kw["account_for_loss_in_pipeline_split"] = draw(st.booleans())
        kw["virtual_pipeline_model_parallel_size"] = often(draw, None, 1, 2, 3, p=60)
    elif mode == "layout":
        mtp = often(draw, None, 1, 2)
        kw["mtp_num_layers"] = often(draw, mtp, None, 1, p=85)
        layout = _layout(draw, kw["num_layers"], pp, mtp)
        kw["pipeline_model_parallel_layout"] = layout
        if draw(st.integers(0, 3)) == 0:
            kw["virtual_pipeline_model_parallel_size"] = pick(draw, 1, 2)
        if draw(st.integers(0, 5)) == 0:
            kw["num_layers_in_last_pipeline_stage"] = 1
    else:
        kw["virtual_pipeline_model_parallel_size"] = pick(draw, 1, 2, 3)


def _moe(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    experts = often(draw, 4, None, 8, 1, 0, 32, p=60)
    kw["num_moe_experts"] = experts
    kw["moe_ffn_hidden_size"] = often(draw, None, 64, p=75)
    kw["add_bias_linear"] = often(draw, False, True, p=60)
    kw["expert_tensor_parallel_size"] = often(draw, None, 1, 2, p=60)
    kw["expert_model_parallel_size"] = often(draw, 1, 2, p=60)
    dispatcher = pick(draw, "allgather", "alltoall", "flex")
    kw["moe_token_dispatcher_type"] = dispatcher
    if dispatcher == "flex":
        kw["moe_flex_dispatcher_backend"] = pick(draw, "deepep", "hybridep")
        kw["moe_enable_deepep"] = often(draw, False, True)
    if draw(st.integers(0, 2)) == 0:
        kw["moe_expert_capacity_factor"] = pick(draw, 1.0, -1.0, 1.5)
        kw["moe_pad_expert_input_to_capacity"] = draw(st.booleans())
    else:
        kw["moe_pad_expert_input_to_capacity"] = often(draw, False, True, p=85)
    balancing = pick(draw, "aux_loss", "seq_aux_loss", "sinkhorn", "none", ["aux_loss", "seq_aux_loss"])
    kw["moe_router_load_balancing_type"] = balancing
    if isinstance(balancing, list):
        kw["moe_aux_loss_coeff"] = often(draw, [0.01, 0.001], 0.01, [0.01])
    if draw(st.integers(0, 2)) == 0:
        kw["moe_shared_expert_intermediate_size"] = often(draw, 64, 0, -8)
        kw["moe_shared_expert_overlap"] = draw(st.booleans())
    kw["moe_router_topk"] = often(draw, 2, 1, p=75)
    kw["moe_router_pre_softmax"] = draw(st.booleans())
    kw["moe_router_score_function"] = pick(draw, "softmax", "sigmoid")
    kw["moe_router_enable_expert_bias"] = often(draw, False, True, p=80)
    if draw(st.integers(0, 3)) == 0:
        kw["moe_router_padding_for_quantization"] = often(draw, True, False)
        kw["moe_router_padding_for_fp8"] = often(draw, False, True)
        kw["fp4"] = often(draw, "e2m1", None)
    if draw(st.integers(0, 2)) == 0:
        kw["moe_router_group_topk"] = often(draw, 1, 2, 3, None)
        kw["moe_router_num_groups"] = often(draw, 2, 4, 3, None)
        kw["moe_router_topk_limited_devices"] = often(draw, None, 1, p=80)
    kw["variable_seq_lengths"] = often(draw, False, True, p=75)
    kw["moe_router_dtype"] = pick(draw, None, "fp32")


def _cuda_graphs(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    kw["cuda_graph_impl"] = pick(draw, "none", "local", "transformer_engine", "transformer_engine")
    if draw(st.integers(0, 4)) == 0:
        kw["enable_cuda_graph"] = True
        kw["external_cuda_graph"] = often(draw, False, True)
    kw["cuda_graph_scope"] = pick(
        draw,
        "full",
        "attn",
        "mlp",
        "moe",
        "moe_router",
        "moe_router,moe_preprocess",
        "moe_preprocess",
        "full_iteration",
        "attn,mlp",
        "mamba",
        "bogus",
        [],
        ["attn", "moe_router"],
        ["moe", "moe_router"],
        ["full", "attn"],
    )
    kw["attention_dropout"] = pick(draw, 0.0, 0.1)
    kw["hidden_dropout"] = pick(draw, 0.0, 0.1)
    if draw(st.integers(0, 3)) == 0:
        kw["moe_input_jitter_eps"] = 0.01
    if draw(st.integers(0, 2)) == 0:
        # MoE models, so the MoE scopes are legal
        kw["num_moe_experts"] = pick(draw, 4, 8)
        kw["add_bias_linear"] = False
        kw["moe_layer_freq"] = pick(draw, 1, 2, [1, 0] * (kw["num_layers"] // 2) or [1])
        kw["moe_expert_capacity_factor"] = often(draw, None, 1.0)
        kw["moe_pad_expert_input_to_capacity"] = kw["moe_expert_capacity_factor"] is not None
        kw["moe_token_dispatcher_type"] = pick(draw, "allgather", "alltoall")
    if draw(st.booleans()):
        kw["recompute_granularity"] = pick(draw, "selective", "full")
        if kw["recompute_granularity"] == "full":
            kw["recompute_method"] = "uniform"
            kw["recompute_num_layers"] = 1
        else:
            kw["recompute_modules"] = pick(draw, None, ["mlp"], ["moe"], ["core_attn", "moe"], ["layernorm"])
            kw["moe_grouped_gemm"] = True


def _ep_overlap(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    kw["overlap_moe_expert_parallel_comm"] = often(draw, True, False)
    kw["num_moe_experts"] = often(draw, 4, None, p=85)
    kw["add_bias_linear"] = False
    kw["expert_model_parallel_size"] = often(draw, 2, 1)
    kw["moe_token_dispatcher_type"] = often(draw, "alltoall", "flex", "allgather")
    if kw["moe_token_dispatcher_type"] == "flex":
        kw["moe_flex_dispatcher_backend"] = "hybridep"
    kw["bf16"] = often(draw, True, False)
    kw["mtp_num_layers"] = often(draw, None, 1, 2)
    kw["moe_shared_expert_overlap"] = often(draw, False, True, p=85)
    kw["delay_wgrad_compute"] = often(draw, False, True)
    kw["moe_use_legacy_grouped_gemm"] = often(draw, False, True, p=85)
    kw["ep_overlap_early_attn_memory_release"] = often(draw, False, True)
    if draw(st.integers(0, 3)) == 0:
        kw["pipeline_model_parallel_size"] = 2
        kw["pipeline_dtype"] = "bfloat16"
        kw["virtual_pipeline_model_parallel_size"] = often(draw, 2, None)
    if draw(st.integers(0, 3)) == 0:
        kw["recompute_granularity"] = pick(draw, "full", "selective")
        kw["recompute_method"] = often(draw, None, "uniform")
        kw["recompute_num_layers"] = often(draw, None, 1)


_ACTIVATION_CHOICES = ("gelu", "silu", "relu", "quick_gelu", "squared_relu", "fast_gelu", "tanh")


def _fusions(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    kw["activation_func"] = pick(draw, *_ACTIVATION_CHOICES)
    kw["gated_linear_unit"] = draw(st.booleans())
    kw["add_bias_linear"] = draw(st.booleans())
    kw["bias_activation_fusion"] = draw(st.booleans())
    kw["glu_linear_offset"] = often(draw, 0.0, 1.0, p=80)
    kw["use_te_activation_func"] = often(draw, False, True)
    kw["activation_func_fp8_input_store"] = often(draw, False, True, p=80)
    if draw(st.integers(0, 3)) == 0:
        kw["apply_rope_fusion"] = True
        kw["multi_latent_attention"] = True  # TE's RoPE kernels are not looked for with MLA


def _misc(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    n = kw["num_layers"]
    kw["no_rope_freq"] = pick(draw, None, 2, 3, 4, [0, 1] * (n // 2) or [1], [0] * (n + 1))
    kw["flash_decode"] = often(draw, False, True, p=80)
    if draw(st.booleans()):
        kw["transformer_impl"] = "inference_optimized"
        kw["normalization"] = often(draw, "RMSNorm", "LayerNorm")
        kw["add_bias_linear"] = often(draw, False, True)
        kw["add_qkv_bias"] = often(draw, False, True, p=85)
        kw["layernorm_zero_centered_gamma"] = often(draw, False, True, p=85)
        kw["use_kitchen"] = often(draw, False, True, p=85)
    else:
        kw["transformer_impl"] = pick(draw, "transformer_engine", "local")
    kw["inference_fuse_tp_communication"] = often(draw, False, True, p=80)


GROUPS = {
    "precision": _precision,
    "parallelism": _parallelism,
    "attention": _attention,
    "recompute": _recompute,
    "offloading": _offloading,
    "pipeline": _pipeline,
    "moe": _moe,
    "cuda_graphs": _cuda_graphs,
    "ep_overlap": _ep_overlap,
    "fusions": _fusions,
    "misc": _misc,
}


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """Schema-form overrides: a base architecture plus one to three feature groups."""
    heads = pick(draw, 1, 2, 3, 4, 6, 8, 12, 16)
    kw: dict[str, Any] = {
        "num_layers": often(draw, pick(draw, 1, 2, 3, 4, 6, 8), 0, p=97),
        "num_attention_heads": heads,
        "hidden_size": heads * pick(draw, 8, 16),
    }
    divisors = [tp for tp in (1, 2, 4, 8) if heads % tp == 0]
    kw["tensor_model_parallel_size"] = often(draw, pick(draw, *divisors), 2, 3, 4, p=85)
    for name in draw(st.lists(st.sampled_from(sorted(GROUPS)), min_size=1, max_size=3, unique=True)):
        GROUPS[name](draw, kw)
    return kw


# ---- the differential test --------------------------------------------------------------------


def _verdicts(overrides: dict[str, Any]) -> tuple[list[RuleViolation], BaseException | None]:
    return check_rules(schema_namespace(overrides)), megatron_error(overrides)


def _model_config_rejects(overrides: dict[str, Any]) -> list[str] | None:
    try:
        ModelConfig.model_validate(copy.deepcopy(overrides))
    except ValidationError as error:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    return None


def test_rules_agree_with_megatron() -> None:
    tally = {"rejected": 0, "accepted": 0, "environment": 0}
    groups_seen: set[str] = set()

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(configs())
    def check(overrides: dict[str, Any]) -> None:
        if environment_dependent(overrides) is not None:
            tally["environment"] += 1
            assume(False)
        violations, error = _verdicts(overrides)
        assert bool(violations) == (error is not None), (
            f"rules and megatron disagree on {overrides!r}:\n"
            f"  check_rules: {[v.message for v in violations]}\n"
            f"  megatron: {error!r}"
        )
        # through the pydantic model as well: a ValidationError is a rejection
        model_errors = _model_config_rejects(overrides)
        assert bool(model_errors) == (error is not None), (
            f"ModelConfig and megatron disagree on {overrides!r}:\n"
            f"  ModelConfig: {model_errors}\n"
            f"  megatron: {error!r}"
        )
        tally["rejected" if violations else "accepted"] += 1
        groups_seen.update(v.fields[0] for v in violations)

    check()
    print("TALLY", tally, sorted(groups_seen))
    compared = tally["rejected"] + tally["accepted"]
    assert compared >= 300, tally
    assert tally["rejected"] >= compared // 4, tally
    assert tally["accepted"] >= compared // 4, tally
    assert tally["environment"] <= compared // 5, tally


# ---- rule messages, group by group ------------------------------------------------------------


def violations_for(**overrides: Any) -> list[RuleViolation]:
    base = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    return check_rules(schema_namespace({**base, **overrides}))


def only(violations: list[RuleViolation]) -> RuleViolation:
    assert len(violations) == 1, violations
    return violations[0]


def test_defaults_pass_and_are_cheap_to_check() -> None:
    assert violations_for() == []
    assert megatron_error({"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4}) is None


def test_precision_messages() -> None:
    v = only(violations_for(fp16=True, bf16=True))
    assert v.fields == ("fp16", "bf16") and "fp16" in v.message and "bf16" in v.message
    v = only(
        violations_for(
            fp8="e4m3", first_last_layers_bf16=True, fp8_recipe="tensorwise", num_layers_at_end_in_bf16=5
        )
    )
    assert v.fields[0] == "num_layers_at_end_in_bf16" and "(5)" in v.message and "(4)" in v.message
    assert only(violations_for(fp8_param=True)).fields == ("fp8_param", "fp8")


def test_parallelism_messages() -> None:
    v = only(
        violations_for(
            num_attention_heads=12, hidden_size=96, num_query_groups=1, tensor_model_parallel_size=5
        )
    )
    assert v.message == "num_attention_heads (12) must be divisible by tensor_model_parallel_size (5)"
    assert v.fields == ("num_attention_heads", "tensor_model_parallel_size")
    v = only(violations_for(num_attention_heads=8, num_query_groups=3, tensor_model_parallel_size=2))
    assert v.fields[0] == "num_query_groups" and "(3)" in v.message and "(2)" in v.message
    v = only(violations_for(pipeline_model_parallel_size=2))
    assert v.fields[0] == "pipeline_dtype" and "(2)" in v.message
    v = only(violations_for(sequence_parallel=True))
    assert v.fields == ("sequence_parallel", "tensor_model_parallel_size") and "(got 1)" in v.message


def test_recompute_messages() -> None:
    v = only(violations_for(recompute_granularity="full", recompute_method="uniform"))
    assert v.fields[0] == "recompute_num_layers" and "'full'" in v.message
    v = only(violations_for(recompute_granularity="selective", recompute_modules=["moe_act"]))
    assert v.fields == ("recompute_modules", "moe_grouped_gemm")
    v = only(violations_for(cpu_offloading=True, cpu_offloading_num_layers=4))
    assert v.fields[0] == "cpu_offloading_num_layers" and "(4)" in v.message and "num_layers (4)" in v.message


def test_pipeline_layout_messages() -> None:
    common = {"pipeline_model_parallel_size": 2, "pipeline_dtype": "bfloat16", "num_layers": 8}
    v = only(
        violations_for(**common, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=4)
    )
    assert "1 layers are left for 0 middle pipeline stages" in v.message
    assert (
        violations_for(**common, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=5)
        == []
    )
    v = only(violations_for(**common, pipeline_model_parallel_layout="Et*3|t*4L"))
    assert (
        v.fields[0] == "pipeline_model_parallel_layout"
        and "7 decoder layers" in v.message
        and "8" in v.message
    )
    assert violations_for(**common, pipeline_model_parallel_layout="Et*3|(t|)*2,t*3L") == []
    v = only(
        violations_for(
            **common, pipeline_model_parallel_layout="Et*4|t*4L", virtual_pipeline_model_parallel_size=2
        )
    )
    assert v.fields[0] == "virtual_pipeline_model_parallel_size" and "(2)" in v.message and "= 1" in v.message
    v = only(violations_for(**common, account_for_loss_in_pipeline_split=True))
    assert "(9)" in v.message and "(2)" in v.message


def test_moe_messages() -> None:
    v = only(violations_for(expert_model_parallel_size=2))
    assert v.fields == ("expert_model_parallel_size", "num_moe_experts") and "(2)" in v.message
    v = only(
        violations_for(
            num_moe_experts=6, add_bias_linear=False, moe_router_group_topk=1, moe_router_num_groups=4
        )
    )
    assert v.message == "num_moe_experts (6) must be divisible by moe_router_num_groups (4)"
    v = only(violations_for(num_moe_experts=4, tensor_model_parallel_size=2))
    assert v.fields[0] == "expert_tensor_parallel_size" and "from tensor_model_parallel_size" in v.message
    v = only(violations_for(moe_router_topk=1))  # megatron checks it without MoE too
    assert v.fields[0] == "moe_router_pre_softmax"
    v = only(violations_for(variable_seq_lengths=True))
    assert v.fields == ("variable_seq_lengths", "moe_token_dispatcher_type")


def test_cuda_graph_messages() -> None:
    v = only(violations_for(cuda_graph_scope="attn,bogus"))
    assert v.fields == ("cuda_graph_scope",) and "bogus" in v.message
    v = only(violations_for(cuda_graph_impl="transformer_engine", cuda_graph_scope="moe"))
    assert v.fields == ("cuda_graph_scope", "num_moe_experts")
    v = only(
        violations_for(
            cuda_graph_impl="local",
            recompute_granularity="selective",
            recompute_modules=["core_attn"],
            attention_dropout=0.1,
        )
    )
    assert v.fields[0] == "attention_dropout" and "(0.1)" in v.message


def test_fusion_messages() -> None:
    v = only(violations_for(bias_activation_fusion=True, activation_func="gelu", add_bias_linear=False))
    assert v.fields[0] == "add_bias_linear" and "'gelu'" in v.message
    # the registry's quick_gelu is megatron.core.activations.quick_gelu, not the fused one megatron knows
    overrides = {"bias_activation_fusion": True, "activation_func": "quick_gelu", "gated_linear_unit": True}
    v = only(violations_for(**overrides))
    assert v.fields == ("activation_func", "bias_activation_fusion") and "'quick_gelu'" in v.message
    assert (
        megatron_error({"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, **overrides})
        is not None
    )
    v = only(violations_for(activation_func_fp8_input_store=True, activation_func="silu"))
    assert "'silu'" in v.message and "gated_linear_unit False" in v.message


def test_misc_messages() -> None:
    v = only(violations_for(no_rope_freq=3))
    assert v.message == "num_layers (4) must be divisible by no_rope_freq (3)"
    v = only(violations_for(num_layers=0))
    assert v.fields == ("num_layers",) and "(0)" in v.message
    v = only(violations_for(batch_invariant_mode=True))
    assert v.fields == ("batch_invariant_mode", "attention_backend") and "'auto'" in v.message


def test_warnings_are_not_errors() -> None:
    overrides = {
        "num_moe_experts": 64,
        "add_bias_linear": False,
        "expert_model_parallel_size": 2,
        "tensor_model_parallel_size": 2,
        "expert_tensor_parallel_size": 1,
    }
    assert violations_for(**overrides) == []
    messages = [w.message for w in rule_warnings(schema_namespace(overrides))]
    assert any("sequence_parallel" in m for m in messages)
    assert any("num_moe_experts (64)" in m for m in messages)
    assert rule_warnings(schema_namespace({"num_layers": 4})) == []


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_each_group_produces_both_verdicts(name: str) -> None:
    """Each strategy group alone reaches both verdicts on megatron (so it exercises its rules)."""
    outcomes = set()

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        kw = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "tensor_model_parallel_size": 2}
        GROUPS[name](data.draw, kw)
        if environment_dependent(kw) is None:
            violations, error = _verdicts(kw)
            assert bool(violations) == (error is not None), (kw, violations, error)
            outcomes.add(bool(violations))

    run()
    assert outcomes == {True, False}
