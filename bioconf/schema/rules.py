"""Megatron-core's cross-field config rules, checked on plain values (no torch, no megatron).

``check_rules(cfg)`` mirrors the checks of megatron-core 0.16.1's ``ModelParallelConfig.__post_init__``
and ``TransformerConfig.__post_init__`` that depend only on config values, so that a config is
rejected here exactly when megatron would reject it on the GPU node (except for the checks listed
below, which depend on the installed environment). ``rule_warnings(cfg)`` returns what megatron only
warns about.

``cfg`` is any object with one attribute per megatron field, in schema form: dtypes and enums by
name, the activation by its registry name (``bioconf.schema.names.ACTIVATIONS``), and un-derived
values (``ffn_hidden_size``, ``kv_channels``, ``num_query_groups``, ... may be None); the rules derive
what megatron derives where a rule needs it.

A rule here never rejects a config that megatron accepts. Megatron fails some configs with a plain
Python error instead of a check (a division by zero, ``None % n``): those are rules here too, with a
message saying what megatron needs. tests/test_rules_differential.py compares the verdicts with
megatron's own.

Activation names: megatron compares ``activation_func`` with function objects: F.gelu, F.silu, F.relu
and ``megatron.core.fusions.fused_bias_geglu.quick_gelu``. The registry resolves "gelu", "silu" and
"relu" to the torch.nn.functional functions, but "quick_gelu" to ``megatron.core.activations.quick_gelu``,
a *different* function object, so megatron's checks do not count the registry's "quick_gelu" as their
quick_gelu (see _FUSED_QUICK_GELU_NAMES).
"""

# Left to the runtime: megatron checks that depend on the installed environment, not on the config.
# - apply_rope_fusion without multi_latent_attention: needs TE's fused RoPE kernels (TE >= 1.4).
# - apply_rope_fusion + rotary_interleaved without multi_latent_attention: needs TE >= 2.3.
# - fp8 + selective recompute of "moe_act"/"layernorm" (non-delayed fp8_recipe): needs TE >= 2.6.0dev0.
# - num_moe_experts + fp8: needs TE >= 1.7.0 (TE >= 1.11.0 with moe_grouped_gemm).
# - moe_permute_fusion: needs TE's fused permute/unpermute kernels (TE >= 2.1.0).
# - overlap_moe_expert_parallel_comm: needs torch >= 2.6.0.
# - delay_wgrad_compute + cuda_graph_impl "transformer_engine": needs TE >= 2.10.0.
# - symmetric_ar_type: needs the `packaging` module, torch >= 2.7 and TE >= 2.3.
# - bf16 + disable_bf16_reduced_precision_matmul: sets a torch.backends flag, no check to mirror.
# Fields with no JSON form (init_method, output_layer_init_method, embedding_init_method, timers, the
# *_func callables, _cpu_offloading_context, quant_recipe) are absent and taken as their default, None,
# as megatron does (see the num_layers rule in _misc).

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from typing import Any

from bioconf.schema.derived import effective


@dataclass(frozen=True)
class RuleViolation:
    """One violated rule: ``fields[0]`` is where the error belongs, the rest are also involved."""

    fields: tuple[str, ...]
    message: str


V = RuleViolation

# ---- names and constants ----------------------------------------------------------------------

# Registry names that resolve to the functions megatron's TransformerConfig compares against.
_GELU = "gelu"  # torch.nn.functional.gelu
_SILU = "silu"  # torch.nn.functional.silu
_RELU = "relu"  # torch.nn.functional.relu
# Names resolving to megatron.core.fusions.fused_bias_geglu.quick_gelu: none today (the registry's
# "quick_gelu" is megatron.core.activations.quick_gelu). Add the name here if the registry changes.
_FUSED_QUICK_GELU_NAMES: frozenset[str] = frozenset()
_BIAS_FUSION_ACTIVATIONS = frozenset({_GELU, _SILU}) | _FUSED_QUICK_GELU_NAMES
_TE_ACTIVATIONS = frozenset({_GELU, _SILU, _RELU})

_RECOMPUTE_MODULES = frozenset(
    {"core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"}
)
_DEFAULT_RECOMPUTE_MODULES = ("core_attn",)
_OFFLOAD_MODULES = frozenset(
    {"core_attn", "attn_proj", "expert_fc1", "moe_act", "attn_norm", "mlp_norm", "qkv_linear"}
)
_CAPACITY_LOAD_BALANCING = frozenset({"aux_loss", "seq_aux_loss", "global_aux_loss", "none"})
_CUDA_GRAPH_SCOPES = frozenset(
    {"full_iteration", "attn", "mlp", "moe", "moe_router", "moe_preprocess", "mamba"}
)
# PipelineParallelLayerLayout: layer-type names (list form) and letters (string form).
_LAYER_TYPES = frozenset({"embedding", "loss", "encoder", "decoder", "mtp"})
_LAYOUT_LETTERS = {"E": "embedding", "L": "loss", "t": "decoder", "m": "mtp"}
_LAYOUT_GROUP_REPEAT = re.compile(r"\(([^)]+)\)\*(\d+)")  # "(tt|)*3" -> "tt|tt|tt|"
_LAYOUT_CHAR_REPEAT = re.compile(r"(.)\*(\d+)")  # "t*3" -> "ttt"


def _unroll(match: re.Match[str]) -> str:
    return match.group(1) * int(match.group(2))


# ---- entry points -----------------------------------------------------------------------------


def check_rules(cfg: object) -> list[RuleViolation]:
    """Every megatron cross-field rule that ``cfg`` violates (empty when megatron would accept it)."""
    out: list[RuleViolation] = []
    _block_a(cfg, out)
    _attention(cfg, out)
    _block_b(cfg, out)
    _misc(cfg, out)
    return out


def _block_a(c: object, out: list[RuleViolation]) -> None:
    _precision(c, out)
    _parallelism(c, out)


def _block_b(c: object, out: list[RuleViolation]) -> None:
    granularity, modules = _recompute(c, out)
    _offloading(c, out)
    vpp = _pipeline_layout(c, out)
    _fusions(c, out)
    capacity = _moe(c, out)
    impl, scopes = _cuda_graphs(c, out, granularity, modules, capacity)
    _moe_overlap(c, out, granularity, vpp, impl, scopes)


class _Reads:
    """Stands in for a config holding ``values``, and records each field read."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(_values=values, read=[])

    def __getattr__(self, name: str) -> Any:
        self.read.append(name)
        return self._values[name]


class _Block:
    """A run of rule groups, and what it reads and reports on the default config.

    Rule groups are deterministic functions of the fields they read. Run on a config whose every
    field read on the defaults holds the default's value, they read the same values in the same
    order, take the same branches and report the same violations: the block need not run. "The same
    value" needs the schema's types (a validated config: floats as floats, never a bool for an int),
    where equal values behave alike.
    """

    def __init__(self, run: Callable[[Any, list[RuleViolation]], None], defaults: Mapping[str, Any]) -> None:
        reads = _Reads(defaults)
        out: list[RuleViolation] = []
        run(reads, out)
        self.run = run
        self.out = tuple(out)
        names = tuple(dict.fromkeys(reads.read))
        names = names if len(names) > 1 else names * 2  # itemgetter of two or more names: a tuple
        self.values: Callable[[Mapping[str, Any]], tuple[Any, ...]] = (
            itemgetter(*names) if names else lambda values: ()
        )
        self.defaults = tuple(defaults[name] for name in names)


class TypedRules:
    """``check_rules`` for validated configs (each field holds a value of its schema type): the same
    violations in the same order, without running the rule groups that can only report what they
    report on ``defaults`` (see ``_Block``). Two such blocks: precision and parallelism; recompute,
    offloading, pipeline layout, fusions, MoE, CUDA graphs and the EP overlap. The attention and
    layer-count groups, which every real config changes, always run."""

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        self._a = _Block(_block_a, defaults)
        self._b = _Block(_block_b, defaults)

    def __call__(self, cfg: Any) -> list[RuleViolation]:
        values = cfg.__dict__
        out: list[RuleViolation] = []
        for block in (self._a, None, self._b):
            if block is None:
                _attention(cfg, out)
            elif block.values(values) == block.defaults:
                out.extend(block.out)
            else:
                block.run(cfg, out)
        _misc(cfg, out)
        return out


def rule_warnings(cfg: object) -> list[RuleViolation]:
    """Megatron's warnings for ``cfg``: legal, but probably not what was meant."""
    c = cfg
    out: list[RuleViolation] = []
    # ModelParallelConfig: EP > 1 and TP > 1 without sequence parallelism
    if c.expert_model_parallel_size > 1 and c.tensor_model_parallel_size > 1 and not c.sequence_parallel:
        out.append(
            V(
                ("sequence_parallel", "expert_model_parallel_size", "tensor_model_parallel_size"),
                f"expert_model_parallel_size ({c.expert_model_parallel_size}) and tensor_model_parallel_size "
                f"({c.tensor_model_parallel_size}) are both > 1: training should use sequence_parallel",
            )
        )
    experts = c.num_moe_experts
    if experts is not None:
        # num_moe_experts set, moe_ffn_hidden_size None -> ffn_hidden_size is used
        if c.moe_ffn_hidden_size is None:
            out.append(
                V(
                    ("moe_ffn_hidden_size", "ffn_hidden_size"),
                    "moe_ffn_hidden_size is not set: the experts use ffn_hidden_size",
                )
            )
        # many experts without fp32/fp64 routing
        if experts >= 32 and not c.moe_router_dtype:
            out.append(
                V(
                    ("moe_router_dtype", "num_moe_experts"),
                    f"num_moe_experts ({experts}) >= 32 without moe_router_dtype: consider 'fp32' routing "
                    "for numerical stability",
                )
            )
    if c.moe_enable_deepep:
        out.append(
            V(
                ("moe_enable_deepep",),
                "moe_enable_deepep is deprecated: use moe_flex_dispatcher_backend='deepep'",
            )
        )
    if c.moe_router_padding_for_fp8:
        out.append(
            V(
                ("moe_router_padding_for_fp8",),
                "moe_router_padding_for_fp8 is deprecated: use moe_router_padding_for_quantization",
            )
        )
    if c.moe_router_topk_limited_devices and not c.moe_router_group_topk:
        out.append(
            V(
                ("moe_router_topk_limited_devices",),
                "moe_router_topk_limited_devices is deprecated: use moe_router_group_topk and "
                "moe_router_num_groups",
            )
        )
    if c.moe_layer_recompute:
        out.append(
            V(
                ("moe_layer_recompute",),
                "moe_layer_recompute is deprecated: use recompute_granularity='selective' with 'moe' in "
                "recompute_modules",
            )
        )
    if c.recompute_granularity == "selective":
        modules = c.recompute_modules
        if modules is None or "core_attn" in modules:
            out.append(
                V(
                    ("recompute_modules",),
                    "recompute_modules includes 'core_attn': with Transformer Engine the core attention may "
                    "already be fused, and recomputing it may be unnecessary",
                )
            )
    if c.apply_rope_fusion and c.multi_latent_attention:
        out.append(
            V(
                ("apply_rope_fusion", "multi_latent_attention"),
                "apply_rope_fusion with multi_latent_attention is experimental and supports training only",
            )
        )
    if c.enable_cuda_graph:
        out.append(V(("enable_cuda_graph",), "enable_cuda_graph is deprecated: use cuda_graph_impl='local'"))
    if c.external_cuda_graph:
        out.append(
            V(
                ("external_cuda_graph",),
                "external_cuda_graph is deprecated: use cuda_graph_impl='transformer_engine'",
            )
        )
    # megatron warns about the "full" scope on every config (it is its own default); it is only
    # worth saying when CUDA graphs are on.
    if c.cuda_graph_impl != "none" or c.enable_cuda_graph or c.external_cuda_graph:
        scope = c.cuda_graph_scope
        if scope == "full" or (isinstance(scope, (list, tuple)) and "full" in scope):
            out.append(
                V(
                    ("cuda_graph_scope",),
                    "cuda_graph_scope 'full' is deprecated: an empty list captures the whole layer",
                )
            )
    return out


# ---- rule groups ------------------------------------------------------------------------------


def _precision(c: object, out: list[RuleViolation]) -> None:
    """fp16/bf16 and the fp8/fp4 options."""
    # fp16 and bf16
    if c.fp16 and c.bf16:
        out.append(V(("fp16", "bf16"), "fp16 and bf16 cannot both be True: choose one"))
    fp8 = c.fp8
    fp4 = c.fp4
    if fp8:
        # fp8 and first_last_layers_bf16 and fp8_recipe == delayed
        if c.first_last_layers_bf16:
            if c.fp8_recipe == "delayed":
                out.append(
                    V(
                        ("first_last_layers_bf16", "fp8_recipe"),
                        "first_last_layers_bf16 is not supported with fp8_recipe 'delayed'",
                    )
                )
            # 0 <= num_layers_at_{start,end}_in_bf16 <= num_layers // pipeline_model_parallel_size
            pp = c.pipeline_model_parallel_size
            if pp != 0:  # pp == 0 is reported in _parallelism
                most = c.num_layers // pp
                for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
                    value = getattr(c, name)
                    if value < 0 or value > most:
                        out.append(
                            V(
                                (name, "num_layers", "pipeline_model_parallel_size"),
                                f"{name} ({value}) must be between 0 and the number of layers per pipeline "
                                f"stage, num_layers // pipeline_model_parallel_size ({most})",
                            )
                        )
        # fp8_recipe == custom requires fp8_quantizer_factory
        if c.fp8_recipe == "custom" and not c.fp8_quantizer_factory:
            out.append(
                V(
                    ("fp8_quantizer_factory", "fp8_recipe"),
                    "fp8_quantizer_factory (an import path) is required when fp8_recipe is 'custom'",
                )
            )
    elif c.fp8_param:
        # fp8_param and not fp8
        out.append(V(("fp8_param", "fp8"), "fp8_param requires fp8 to be set"))
    if fp4:
        # fp4 and fp8
        if fp8:
            out.append(V(("fp4", "fp8"), f"fp4 ({fp4!r}) and fp8 ({fp8!r}) cannot be used together"))
        # fp4_recipe == custom requires fp4_quantizer_factory
        if c.fp4_recipe == "custom" and not c.fp4_quantizer_factory:
            out.append(
                V(
                    ("fp4_quantizer_factory", "fp4_recipe"),
                    "fp4_quantizer_factory (an import path) is required when fp4_recipe is 'custom'",
                )
            )
    elif c.fp4_param:
        # fp4_param and not fp4
        out.append(V(("fp4_param", "fp4"), "fp4_param requires fp4 to be set"))


def _parallelism(c: object, out: list[RuleViolation]) -> None:
    """ModelParallelConfig's rules and the pipeline size itself."""
    tp = c.tensor_model_parallel_size
    pp = c.pipeline_model_parallel_size
    # sequence_parallel and tensor_model_parallel_size <= 1
    if c.sequence_parallel and tp <= 1:
        out.append(
            V(
                ("sequence_parallel", "tensor_model_parallel_size"),
                f"sequence_parallel requires tensor_model_parallel_size > 1 (got {tp})",
            )
        )
    # pipeline_model_parallel_size > 1 and pipeline_dtype is None
    if pp > 1 and c.pipeline_dtype is None:
        out.append(
            V(
                ("pipeline_dtype", "pipeline_model_parallel_size"),
                f"pipeline_dtype must be set when pipeline_model_parallel_size ({pp}) > 1",
            )
        )
    # assert pipeline_model_parallel_size > 0
    if pp <= 0:
        out.append(V(("pipeline_model_parallel_size",), f"pipeline_model_parallel_size ({pp}) must be > 0"))
    # defer_embedding_wgrad_compute needs PP > 1 ... (PP == 1 exactly), grad accumulation fusion,
    # and wgrad_deferral_limit >= 0
    if c.defer_embedding_wgrad_compute:
        if pp == 1:
            out.append(
                V(
                    ("defer_embedding_wgrad_compute", "pipeline_model_parallel_size"),
                    "defer_embedding_wgrad_compute requires pipeline parallelism "
                    "(pipeline_model_parallel_size is 1)",
                )
            )
        if not c.gradient_accumulation_fusion:
            out.append(
                V(
                    ("defer_embedding_wgrad_compute", "gradient_accumulation_fusion"),
                    "defer_embedding_wgrad_compute requires gradient_accumulation_fusion",
                )
            )
        if c.wgrad_deferral_limit < 0:
            out.append(
                V(
                    ("wgrad_deferral_limit", "defer_embedding_wgrad_compute"),
                    f"wgrad_deferral_limit ({c.wgrad_deferral_limit}) must be >= 0 with "
                    "defer_embedding_wgrad_compute",
                )
            )
    # overlap_p2p_comm_warmup_flush needs overlap_p2p_comm and not batch_p2p_comm
    if c.overlap_p2p_comm_warmup_flush and (not c.overlap_p2p_comm or c.batch_p2p_comm):
        out.append(
            V(
                ("overlap_p2p_comm_warmup_flush", "overlap_p2p_comm", "batch_p2p_comm"),
                f"overlap_p2p_comm_warmup_flush requires overlap_p2p_comm=True (got {c.overlap_p2p_comm}) "
                f"and batch_p2p_comm=False (got {c.batch_p2p_comm})",
            )
        )


def _attention(c: object, out: list[RuleViolation]) -> None:
    """Heads and query groups vs tensor parallelism, attention variants, context parallelism."""
    tp = c.tensor_model_parallel_size
    heads = c.num_attention_heads
    # num_attention_heads % tensor_model_parallel_size != 0
    if tp == 0:
        out.append(
            V(
                ("tensor_model_parallel_size", "num_attention_heads"),
                "tensor_model_parallel_size must not be 0 (num_attention_heads is divided by it)",
            )
        )
    elif heads % tp:
        out.append(
            V(
                ("num_attention_heads", "tensor_model_parallel_size"),
                f"num_attention_heads ({heads}) must be divisible by tensor_model_parallel_size ({tp})",
            )
        )
    # kv_channels defaults to hidden_size // num_attention_heads
    if heads == 0 and c.kv_channels is None:
        out.append(
            V(
                ("num_attention_heads", "kv_channels", "hidden_size"),
                "num_attention_heads must not be 0 when kv_channels is unset "
                "(kv_channels defaults to hidden_size // num_attention_heads)",
            )
        )
    # num_query_groups (default num_attention_heads) must be a multiple or a divisor of TP
    groups = effective(c, "num_query_groups")
    if tp and groups % tp and tp % groups:
        out.append(
            V(
                ("num_query_groups", "tensor_model_parallel_size"),
                f"num_query_groups ({groups}) must be a multiple or a divisor of tensor_model_parallel_size "
                f"({tp})",
            )
        )
    variant = c.experimental_attention_variant
    if variant is not None:
        cp = c.context_parallel_size
        if variant == "gated_delta_net":
            _gated_delta_net(c, out, tp, cp)
        elif variant == "dsa":
            # DSA: no context parallelism, no RoPE fusion
            if cp != 1:
                out.append(
                    V(
                        ("context_parallel_size", "experimental_attention_variant"),
                        f"experimental_attention_variant 'dsa' does not support context_parallel_size ({cp}) "
                        "!= 1",
                    )
                )
            if c.apply_rope_fusion:
                out.append(
                    V(
                        ("apply_rope_fusion", "experimental_attention_variant"),
                        "apply_rope_fusion is not supported with experimental_attention_variant 'dsa'",
                    )
                )
    # multi_latent_attention and rotary_interleaved
    if c.multi_latent_attention and c.rotary_interleaved:
        out.append(
            V(
                ("rotary_interleaved", "multi_latent_attention"),
                "rotary_interleaved does not work with multi_latent_attention",
            )
        )
    # context_parallel_size > 1 and cp_comm_type: a list needs one entry per layer
    if c.context_parallel_size > 1:
        cp_type = c.cp_comm_type
        if cp_type is not None:
            if isinstance(cp_type, (list, tuple)):
                if len(cp_type) != c.num_layers:
                    out.append(
                        V(
                            ("cp_comm_type", "num_layers"),
                            f"cp_comm_type has {len(cp_type)} entries but num_layers is {c.num_layers}: "
                            "a list needs one per layer",
                        )
                    )
            elif not isinstance(cp_type, str):
                out.append(V(("cp_comm_type",), f"cp_comm_type ({cp_type!r}) must be a string or a list"))
    # batch_invariant_mode needs attention_backend flash
    if c.batch_invariant_mode and c.attention_backend != "flash":
        out.append(
            V(
                ("batch_invariant_mode", "attention_backend"),
                f"batch_invariant_mode requires attention_backend 'flash' (got {c.attention_backend!r})",
            )
        )


def _gated_delta_net(c: object, out: list[RuleViolation], tp: int, cp: int) -> None:
    """experimental_attention_variant == "gated_delta_net"."""
    # linear_attention_freq and every linear_* size must be set
    for name in (
        "linear_attention_freq",
        "linear_conv_kernel_dim",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
    ):
        if getattr(c, name) is None:
            out.append(
                V(
                    (name, "experimental_attention_variant"),
                    f"{name} must be set for experimental_attention_variant 'gated_delta_net'",
                )
            )
    key_heads = c.linear_num_key_heads
    value_heads = c.linear_num_value_heads
    # linear_num_value_heads % linear_num_key_heads == 0
    if key_heads is not None and value_heads is not None and (key_heads == 0 or value_heads % key_heads):
        out.append(
            V(
                ("linear_num_value_heads", "linear_num_key_heads"),
                f"linear_num_value_heads ({value_heads}) must be a multiple of linear_num_key_heads "
                f"({key_heads})",
            )
        )
    # linear_num_{key,value}_heads % tensor_model_parallel_size == 0
    if tp:
        for name, value in (("linear_num_key_heads", key_heads), ("linear_num_value_heads", value_heads)):
            if value is not None and value % tp:
                out.append(
                    V(
                        (name, "tensor_model_parallel_size"),
                        f"{name} ({value}) must be a multiple of tensor_model_parallel_size ({tp})",
                    )
                )
    # no context parallelism yet
    if cp != 1:
        out.append(
            V(
                ("context_parallel_size", "experimental_attention_variant"),
                f"experimental_attention_variant 'gated_delta_net' does not support context_parallel_size "
                f"({cp}) != 1",
            )
        )


def _recompute(c: object, out: list[RuleViolation]) -> tuple[str | None, tuple[str, ...] | list[str]]:
    """Activation recomputation. Returns megatron's effective (granularity, modules)."""
    granularity = c.recompute_granularity
    modules = c.recompute_modules
    if modules is None:
        modules = _DEFAULT_RECOMPUTE_MODULES
    if granularity is not None:
        # granularity in {full, selective}
        if granularity not in ("full", "selective"):
            out.append(
                V(
                    ("recompute_granularity",),
                    f"recompute_granularity ({granularity!r}) must be 'full' or 'selective'",
                )
            )
        # method in {block, uniform}; required unless selective
        method = c.recompute_method
        if method is not None:
            if method not in ("block", "uniform"):
                out.append(
                    V(("recompute_method",), f"recompute_method ({method!r}) must be 'block' or 'uniform'")
                )
        elif granularity != "selective":
            out.append(
                V(
                    ("recompute_method", "recompute_granularity"),
                    f"recompute_method must be 'block' or 'uniform' with recompute_granularity "
                    f"{granularity!r}",
                )
            )
        # recompute_num_layers: required unless selective, None with selective
        num_layers = c.recompute_num_layers
        if granularity != "selective":
            if num_layers is None:
                out.append(
                    V(
                        ("recompute_num_layers", "recompute_granularity"),
                        f"recompute_num_layers must be set with recompute_granularity {granularity!r}",
                    )
                )
        elif num_layers is not None:
            out.append(
                V(
                    ("recompute_num_layers", "recompute_granularity"),
                    f"recompute_num_layers ({num_layers}) must be None with recompute_granularity "
                    "'selective'",
                )
            )
        # distribute_saved_activations and sequence_parallel
        if c.distribute_saved_activations and c.sequence_parallel:
            out.append(
                V(
                    ("distribute_saved_activations", "sequence_parallel"),
                    "distribute_saved_activations must be False when sequence_parallel is True "
                    "(with recompute_granularity set)",
                )
            )
        if granularity == "selective":
            _selective_modules(c, out, modules)
    # moe_layer_recompute: not with full recompute; turns on selective recompute of "moe"
    if c.moe_layer_recompute:
        if granularity == "full":
            out.append(
                V(
                    ("moe_layer_recompute", "recompute_granularity"),
                    "moe_layer_recompute cannot be used with recompute_granularity 'full'",
                )
            )
        else:
            granularity = "selective"
        if "moe" not in modules:
            modules = (*modules, "moe")
    return granularity, modules


def _selective_modules(c: object, out: list[RuleViolation], modules: tuple[str, ...] | list[str]) -> None:
    """recompute_granularity == "selective": the modules and what each one needs."""
    invalid = [m for m in modules if m not in _RECOMPUTE_MODULES]
    if invalid:
        out.append(
            V(
                ("recompute_modules",),
                f"recompute_modules has unknown modules {invalid}; allowed: {sorted(_RECOMPUTE_MODULES)}",
            )
        )
    if "moe_act" in modules and not c.moe_grouped_gemm:
        out.append(
            V(
                ("recompute_modules", "moe_grouped_gemm"),
                "recompute_modules 'moe_act' requires moe_grouped_gemm",
            )
        )
    if "mla_up_proj" in modules and not c.multi_latent_attention:
        out.append(
            V(
                ("recompute_modules", "multi_latent_attention"),
                "recompute_modules 'mla_up_proj' requires multi_latent_attention",
            )
        )
    if (
        "shared_experts" in modules
        and c.moe_shared_expert_intermediate_size is not None
        and c.moe_shared_expert_overlap
    ):
        out.append(
            V(
                ("recompute_modules", "moe_shared_expert_overlap"),
                "recompute_modules 'shared_experts' cannot be used with moe_shared_expert_overlap",
            )
        )
    # fp8 + delayed scaling: no moe_act/layernorm recompute (the TE version check is left to the runtime)
    if c.fp8 and c.fp8_recipe == "delayed" and ("moe_act" in modules or "layernorm" in modules):
        out.append(
            V(
                ("recompute_modules", "fp8_recipe", "fp8"),
                "recompute_modules 'moe_act'/'layernorm' are not supported with fp8_recipe 'delayed'",
            )
        )


def _offloading(c: object, out: list[RuleViolation]) -> None:
    """CPU offloading and fine-grained activation offloading."""
    if c.cpu_offloading:
        # 0 <= cpu_offloading_num_layers < num_layers
        n = c.cpu_offloading_num_layers
        if n < 0 or n >= c.num_layers:
            out.append(
                V(
                    ("cpu_offloading_num_layers", "num_layers"),
                    f"cpu_offloading_num_layers ({n}) must be >= 0 and < num_layers ({c.num_layers})",
                )
            )
        # cpu_offloading and pipeline_model_parallel_size > 1
        if c.pipeline_model_parallel_size > 1:
            out.append(
                V(
                    ("cpu_offloading", "pipeline_model_parallel_size"),
                    f"cpu_offloading is not supported with pipeline_model_parallel_size "
                    f"({c.pipeline_model_parallel_size}) > 1",
                )
            )
        # cpu_offloading and recompute_granularity (as given, before moe_layer_recompute)
        if c.recompute_granularity is not None:
            out.append(
                V(
                    ("cpu_offloading", "recompute_granularity"),
                    f"cpu_offloading does not work with activation recomputation (recompute_granularity "
                    f"{c.recompute_granularity!r})",
                )
            )
    if c.fine_grained_activation_offloading:
        if c.cpu_offloading:
            out.append(
                V(
                    ("fine_grained_activation_offloading", "cpu_offloading"),
                    "fine_grained_activation_offloading cannot be used with cpu_offloading",
                )
            )
        modules = c.offload_modules
        if not modules:
            out.append(
                V(
                    ("offload_modules", "fine_grained_activation_offloading"),
                    "offload_modules must name at least one module with fine_grained_activation_offloading",
                )
            )
        else:
            invalid = [m for m in modules if m not in _OFFLOAD_MODULES]
            if invalid:
                out.append(
                    V(
                        ("offload_modules",),
                        f"offload_modules has unknown modules {invalid}; allowed: {sorted(_OFFLOAD_MODULES)}",
                    )
                )
            # attn_proj's input is core_attn's output: not one without the other
            if "attn_proj" in modules and "core_attn" not in modules:
                out.append(
                    V(
                        ("offload_modules",),
                        "offload_modules 'attn_proj' requires 'core_attn' (attn_proj's input is core_attn's "
                        "output)",
                    )
                )


def _pipeline_layout(c: object, out: list[RuleViolation]) -> int | None:
    """Uneven pipeline stages, embedding/loss accounting and the explicit pipeline layout.

    Returns the effective virtual_pipeline_model_parallel_size (a layout can imply it)."""
    vpp = c.virtual_pipeline_model_parallel_size
    layout = c.pipeline_model_parallel_layout
    first = c.num_layers_in_first_pipeline_stage
    last = c.num_layers_in_last_pipeline_stage
    embedding = c.account_for_embedding_in_pipeline_split
    loss = c.account_for_loss_in_pipeline_split
    uneven = first is not None or last is not None
    if layout is None and not uneven and not embedding and not loss:
        return vpp
    # num_layers_in_{first,last}_pipeline_stage vs account_for_{embedding,loss}_in_pipeline_split
    if uneven and (embedding or loss):
        out.append(
            V(
                _set_names(
                    ("num_layers_in_first_pipeline_stage", first is not None),
                    ("num_layers_in_last_pipeline_stage", last is not None),
                    ("account_for_embedding_in_pipeline_split", embedding),
                    ("account_for_loss_in_pipeline_split", loss),
                ),
                "num_layers_in_first/last_pipeline_stage cannot be combined with "
                "account_for_embedding/loss_in_pipeline_split",
            )
        )
    pp = c.pipeline_model_parallel_size
    num_layers = c.num_layers
    if layout is not None:
        # the layout excludes every other pipeline split option
        if uneven or embedding or loss:
            out.append(
                V(
                    (
                        "pipeline_model_parallel_layout",
                        *_set_names(
                            ("num_layers_in_first_pipeline_stage", first is not None),
                            ("num_layers_in_last_pipeline_stage", last is not None),
                            ("account_for_embedding_in_pipeline_split", embedding),
                            ("account_for_loss_in_pipeline_split", loss),
                        ),
                    ),
                    "pipeline_model_parallel_layout cannot be combined with num_layers_in_first/last_"
                    "pipeline_stage or account_for_embedding/loss_in_pipeline_split",
                )
            )
        if pp > 0:  # pp <= 0 is reported in _parallelism
            vpp = _check_layout(c, out, layout, pp, vpp, num_layers)
    elif uneven:
        # Uneven PP: first/last stages take their layers, the middle stages share the rest evenly.
        middle_layers = num_layers
        middle_stages = pp
        for name, value in (
            ("num_layers_in_first_pipeline_stage", first),
            ("num_layers_in_last_pipeline_stage", last),
        ):
            if value is None:
                continue
            if value <= 0:
                out.append(V((name,), f"{name} ({value}) must be > 0"))
            if vpp is not None and (vpp == 0 or value % vpp):
                out.append(
                    V(
                        (name, "virtual_pipeline_model_parallel_size"),
                        f"{name} ({value}) must be divisible by virtual_pipeline_model_parallel_size ({vpp})",
                    )
                )
            middle_layers -= value
            middle_stages -= 1
        if bool(middle_layers) != bool(middle_stages):
            out.append(
                V(
                    ("num_layers", "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"),
                    f"{middle_layers} layers are left for {middle_stages} middle pipeline stages "
                    f"(num_layers {num_layers}, pipeline_model_parallel_size {pp}, first stage {first}, "
                    f"last stage {last})",
                )
            )
        elif middle_stages:
            if middle_layers % middle_stages:
                out.append(
                    V(
                        (
                            "num_layers",
                            "num_layers_in_first_pipeline_stage",
                            "num_layers_in_last_pipeline_stage",
                        ),
                        f"the {middle_layers} layers left for the middle pipeline stages must be divisible "
                        f"by their number ({middle_stages})",
                    )
                )
            elif vpp is not None:
                per_rank = middle_layers // middle_stages
                if vpp == 0 or per_rank % vpp:
                    out.append(
                        V(
                            ("virtual_pipeline_model_parallel_size", "num_layers"),
                            f"the {per_rank} layers on each middle pipeline stage must be divisible by "
                            f"virtual_pipeline_model_parallel_size ({vpp})",
                        )
                    )
    elif pp > 0:
        # account_for_embedding/loss: embedding and loss count as layers in the split
        total = num_layers + bool(embedding) + bool(loss)
        names = (
            "num_layers",
            "pipeline_model_parallel_size",
            *_set_names(
                ("account_for_embedding_in_pipeline_split", embedding),
                ("account_for_loss_in_pipeline_split", loss),
            ),
        )
        if total % pp:
            out.append(
                V(
                    names,
                    f"num_layers ({num_layers}) plus the embedding/loss layers ({total}) must be divisible "
                    f"by pipeline_model_parallel_size ({pp})",
                )
            )
        elif vpp is not None:
            per_rank = total // pp
            if vpp == 0 or per_rank % vpp:
                out.append(
                    V(
                        ("virtual_pipeline_model_parallel_size", *names),
                        f"the {per_rank} layers per pipeline stage (embedding/loss included) must be "
                        f"divisible by virtual_pipeline_model_parallel_size ({vpp})",
                    )
                )
    return vpp


def _set_names(*pairs: tuple[str, object]) -> tuple[str, ...]:
    return tuple(name for name, is_set in pairs if is_set)


@lru_cache(maxsize=256)
def _parse_layout_string(layout: str) -> tuple[tuple[tuple[str, ...], ...] | None, str]:
    """The string form: "Et*3|(tt|)*2,mL" -> stages of layer-type names (cached, as megatron does)."""
    text = _LAYOUT_CHAR_REPEAT.sub(_unroll, _LAYOUT_GROUP_REPEAT.sub(_unroll, layout.replace(",", "")))
    stages = []
    for stage in text.split("|"):
        row = []
        for char in stage:
            name = _LAYOUT_LETTERS.get(char)
            if name is None:
                return None, f"unknown layer letter {char!r} (known: E, L, t, m)"
            row.append(name)
        stages.append(tuple(row))
    return tuple(stages), ""


def _layout_stages(layout: object) -> tuple[Sequence[Sequence[str]] | None, str]:
    """The stages of a layout as sequences of layer-type names, or (None, why it is malformed)."""
    if isinstance(layout, str):
        return _parse_layout_string(layout)
    if isinstance(layout, (list, tuple)):
        stages = []
        for row in layout:
            if not isinstance(row, (list, tuple)):
                return None, f"must be a list of lists, but has a {type(row).__name__} entry"
            names = []
            for item in row:
                name = item.strip().lower() if isinstance(item, str) else None
                if name not in _LAYER_TYPES:
                    return None, f"unknown layer type {item!r} (known: {', '.join(sorted(_LAYER_TYPES))})"
                names.append(name)
            stages.append(names)
        return stages, ""
    return None, f"must be a string or a list of lists, got {type(layout).__name__}"


def _check_layout(
    c: object, out: list[RuleViolation], layout: object, pp: int, vpp: int | None, num_layers: int
) -> int | None:
    """PipelineParallelLayerLayout's parsing and validate_layer_layout. Returns the effective VPP size."""
    field = "pipeline_model_parallel_layout"
    stages, why = _layout_stages(layout)
    if stages is None:
        out.append(V((field,), f"pipeline_model_parallel_layout {why}"))
        return vpp
    # the number of stages is pipeline_model_parallel_size * the VPP size
    if len(stages) % pp:
        out.append(
            V(
                (field, "pipeline_model_parallel_size"),
                f"pipeline_model_parallel_layout has {len(stages)} stages, not a multiple of "
                f"pipeline_model_parallel_size ({pp})",
            )
        )
        return vpp
    detected = len(stages) // pp
    if vpp is not None:
        if vpp != detected:
            out.append(
                V(
                    ("virtual_pipeline_model_parallel_size", field, "pipeline_model_parallel_size"),
                    f"virtual_pipeline_model_parallel_size ({vpp}) conflicts with "
                    f"pipeline_model_parallel_layout ({len(stages)} stages / pipeline_model_parallel_size "
                    f"{pp} = {detected})",
                )
            )
    elif detected > 1:
        vpp = detected
    # Stage i holds VPP stage i // pp of PP rank i % pp, so the stages in order are the layers in order.
    flat = [name for stage in stages for name in stage]
    problems = []
    if not flat or flat[0] != "embedding":
        problems.append("the first layer must be the embedding ('E')")
    if not flat or flat[-1] != "loss":
        problems.append("the last layer must be the loss ('L')")
    if flat.count("embedding") != 1:
        problems.append("the embedding must appear exactly once")
    if flat.count("loss") != 1:
        problems.append("the loss must appear exactly once")
    decoders = flat.count("decoder")
    if decoders != num_layers:
        problems.append(f"it has {decoders} decoder layers ('t') but num_layers is {num_layers}")
    if "encoder" in flat:
        problems.append("encoder layers are not supported")
    mtp = c.mtp_num_layers
    mtps = flat.count("mtp")
    if mtps != mtp and not (mtp is None and mtps == 0):
        problems.append(f"it has {mtps} MTP layers ('m') but mtp_num_layers is {mtp}")
    if mtps:
        if "decoder" in flat[flat.index("mtp") :]:
            problems.append("decoder layers must come before the MTP layers")
        # MTP only in the last VPP stage of a rank, all of it in one stage
        last_round = (detected - 1) * pp
        if any("mtp" in stage for stage in stages[:last_round]):
            problems.append("MTP layers must be in the last virtual pipeline stage of their rank")
        for stage in stages[last_round:]:
            if mtp is not None and "mtp" in stage and stage.count("mtp") != mtp:
                problems.append("all MTP layers must be in the same stage")
                break
    if problems:
        fields = (field, "num_layers", "mtp_num_layers") if mtps or mtp else (field, "num_layers")
        out.append(V(fields, f"pipeline_model_parallel_layout is invalid: {'; '.join(problems)}"))
    return vpp


def _fusions(c: object, out: list[RuleViolation]) -> None:
    """Fused kernels that restrict the activation or the attention options."""
    act = c.activation_func
    glu = c.gated_linear_unit
    if c.bias_activation_fusion:
        # activation must be gelu, silu (swiglu) or quick_gelu
        if act not in _BIAS_FUSION_ACTIVATIONS:
            out.append(
                V(
                    ("activation_func", "bias_activation_fusion"),
                    f"bias_activation_fusion supports activation_func gelu or silu, not {act!r} "
                    "(megatron's fused quick_gelu is not the registry's quick_gelu)",
                )
            )
        # gelu without GLU needs add_bias_linear
        if act == _GELU and not glu and not c.add_bias_linear:
            out.append(
                V(
                    ("add_bias_linear", "bias_activation_fusion", "activation_func", "gated_linear_unit"),
                    "bias_activation_fusion with activation_func 'gelu' and gated_linear_unit False requires "
                    "add_bias_linear",
                )
            )
        # fused quick_gelu needs GLU
        if act in _FUSED_QUICK_GELU_NAMES and not glu:
            out.append(
                V(
                    ("gated_linear_unit", "bias_activation_fusion", "activation_func"),
                    f"bias_activation_fusion with activation_func {act!r} requires gated_linear_unit",
                )
            )
        # glu_linear_offset != 0 only with the fused quick_gelu
        if c.glu_linear_offset != 0.0 and act not in _FUSED_QUICK_GELU_NAMES:
            out.append(
                V(
                    ("glu_linear_offset", "bias_activation_fusion", "activation_func"),
                    f"bias_activation_fusion with glu_linear_offset ({c.glu_linear_offset}) != 0 is not "
                    f"supported for activation_func {act!r}",
                )
            )
        # not with use_te_activation_func
        if c.use_te_activation_func:
            out.append(
                V(
                    ("use_te_activation_func", "bias_activation_fusion"),
                    "bias_activation_fusion and use_te_activation_func cannot both be True",
                )
            )
    # use_te_activation_func: gelu, silu or relu
    if c.use_te_activation_func and act not in _TE_ACTIVATIONS:
        out.append(
            V(
                ("activation_func", "use_te_activation_func"),
                f"use_te_activation_func supports activation_func gelu, silu or relu, not {act!r}",
            )
        )
    # activation_func_fp8_input_store: SwiGLU only
    if c.activation_func_fp8_input_store and (act != _SILU or not glu):
        out.append(
            V(
                ("activation_func_fp8_input_store", "activation_func", "gated_linear_unit"),
                f"activation_func_fp8_input_store requires SwiGLU (activation_func 'silu' with "
                f"gated_linear_unit), got {act!r} with gated_linear_unit {glu}",
            )
        )
    # fused_single_qkv_rope and attention_output_gate
    if c.fused_single_qkv_rope and c.attention_output_gate:
        out.append(
            V(
                ("fused_single_qkv_rope", "attention_output_gate"),
                "fused_single_qkv_rope does not support attention_output_gate",
            )
        )


def _moe(c: object, out: list[RuleViolation]) -> float | None:
    """Mixture-of-experts rules. Returns the effective moe_expert_capacity_factor.

    Several of these apply whether or not num_moe_experts is set (megatron checks the moe_* options on
    dense models too, e.g. moe_router_topk == 1 or the default allgather dispatcher with
    variable_seq_lengths), so each rule is guarded by its own trigger field instead of one MoE switch."""
    experts = c.num_moe_experts
    dispatcher = c.moe_token_dispatcher_type
    ep = c.expert_model_parallel_size
    if experts is None:
        # expert parallelism needs experts
        if ep > 1:
            out.append(
                V(
                    ("expert_model_parallel_size", "num_moe_experts"),
                    f"expert_model_parallel_size ({ep}) > 1 requires num_moe_experts",
                )
            )
        # moe_ffn_hidden_size only with experts
        if c.moe_ffn_hidden_size is not None:
            out.append(
                V(
                    ("moe_ffn_hidden_size", "num_moe_experts"),
                    f"moe_ffn_hidden_size ({c.moe_ffn_hidden_size}) must be None when num_moe_experts is "
                    "not set",
                )
            )
    else:
        # num_moe_experts > 0
        if experts <= 0:
            out.append(V(("num_moe_experts",), f"num_moe_experts ({experts}) must be > 0"))
        # bias in experts only with expert_tensor_parallel_size (default TP) == 1
        if c.add_bias_linear:
            etp = c.expert_tensor_parallel_size
            if etp is None:
                etp = c.tensor_model_parallel_size
            if etp != 1:
                out.append(
                    V(
                        ("expert_tensor_parallel_size", "add_bias_linear", "num_moe_experts"),
                        f"add_bias_linear with MoE requires expert_tensor_parallel_size == 1 (it is {etp}"
                        + (
                            ", from tensor_model_parallel_size"
                            if c.expert_tensor_parallel_size is None
                            else ""
                        )
                        + ")",
                    )
                )
    # moe_enable_deepep: flex dispatcher, not the hybridep backend
    if c.moe_enable_deepep:
        if dispatcher != "flex":
            out.append(
                V(
                    ("moe_enable_deepep", "moe_token_dispatcher_type"),
                    f"moe_enable_deepep requires moe_token_dispatcher_type 'flex' (got {dispatcher!r})",
                )
            )
        if c.moe_flex_dispatcher_backend == "hybridep":
            out.append(
                V(
                    ("moe_enable_deepep", "moe_flex_dispatcher_backend"),
                    "moe_enable_deepep cannot be used with moe_flex_dispatcher_backend 'hybridep'",
                )
            )
    # flex dispatcher with the deepep backend: no padding to capacity
    pad = c.moe_pad_expert_input_to_capacity
    if pad and dispatcher == "flex" and (c.moe_enable_deepep or c.moe_flex_dispatcher_backend == "deepep"):
        out.append(
            V(
                (
                    "moe_pad_expert_input_to_capacity",
                    "moe_token_dispatcher_type",
                    "moe_flex_dispatcher_backend",
                ),
                "moe_pad_expert_input_to_capacity is not supported by the flex dispatcher with the deepep "
                "backend",
            )
        )
    # shared experts: size > 0; overlap only with the alltoall dispatcher
    shared = c.moe_shared_expert_intermediate_size
    if shared is not None:
        if shared <= 0:
            out.append(
                V(
                    ("moe_shared_expert_intermediate_size",),
                    f"moe_shared_expert_intermediate_size ({shared}) must be > 0 "
                    "(num_shared_experts * ffn size of each)",
                )
            )
        if c.moe_shared_expert_overlap and dispatcher != "alltoall":
            out.append(
                V(
                    ("moe_shared_expert_overlap", "moe_token_dispatcher_type"),
                    f"moe_shared_expert_overlap requires moe_token_dispatcher_type 'alltoall' "
                    f"(got {dispatcher!r})",
                )
            )
    # a list of load-balancing types needs a list of aux-loss coefficients of the same length
    balancing = c.moe_router_load_balancing_type
    balancing_is_list = isinstance(balancing, (list, tuple))
    if balancing_is_list:
        coeff = c.moe_aux_loss_coeff
        if not isinstance(coeff, (list, tuple)) or len(coeff) != len(balancing):
            out.append(
                V(
                    ("moe_aux_loss_coeff", "moe_router_load_balancing_type"),
                    f"moe_aux_loss_coeff ({coeff!r}) must be a list as long as "
                    f"moe_router_load_balancing_type ({len(balancing)} entries)",
                )
            )
    # capacity factor: negative means None; only with the aux-loss (or no) balancing types
    capacity = c.moe_expert_capacity_factor
    if capacity is not None:
        if capacity < 0:
            capacity = None
        bad = (
            [t for t in balancing if t not in _CAPACITY_LOAD_BALANCING]
            if balancing_is_list
            else ([] if balancing in _CAPACITY_LOAD_BALANCING else [balancing])
        )
        if bad:
            out.append(
                V(
                    ("moe_router_load_balancing_type", "moe_expert_capacity_factor"),
                    f"moe_expert_capacity_factor works only with load balancing aux_loss, seq_aux_loss, "
                    f"global_aux_loss or none, not {', '.join(map(repr, bad))}",
                )
            )
    # padding to capacity needs a capacity factor
    if pad and capacity is None:
        out.append(
            V(
                ("moe_pad_expert_input_to_capacity", "moe_expert_capacity_factor"),
                "moe_pad_expert_input_to_capacity requires moe_expert_capacity_factor (>= 0)",
            )
        )
    # expert bias (aux-loss-free balancing) only with the sigmoid score function
    if c.moe_router_enable_expert_bias and c.moe_router_score_function != "sigmoid":
        out.append(
            V(
                ("moe_router_enable_expert_bias", "moe_router_score_function"),
                f"moe_router_enable_expert_bias requires moe_router_score_function 'sigmoid' "
                f"(got {c.moe_router_score_function!r})",
            )
        )
    # padding the routing map for quantization (moe_router_padding_for_fp8 turns it on)
    if c.moe_router_padding_for_quantization or c.moe_router_padding_for_fp8:
        name = (
            "moe_router_padding_for_quantization"
            if c.moe_router_padding_for_quantization
            else "moe_router_padding_for_fp8"
        )
        if c.fp8 is None and c.fp4 is None:
            out.append(V((name, "fp8", "fp4"), f"{name} requires fp8 or fp4 to be set"))
        if dispatcher in ("allgather", "alltoall_seq"):
            out.append(
                V(
                    (name, "moe_token_dispatcher_type"),
                    f"{name} is not supported by moe_token_dispatcher_type {dispatcher!r}",
                )
            )
    # top-1 routing with softmax after top-k has zero gradient: needs pre-softmax (or sinkhorn)
    if (
        c.moe_router_topk == 1
        and c.moe_router_score_function == "softmax"
        and not c.moe_router_pre_softmax
        and balancing != "sinkhorn"
    ):
        out.append(
            V(
                ("moe_router_pre_softmax", "moe_router_topk", "moe_router_score_function"),
                "moe_router_topk 1 with moe_router_score_function 'softmax' requires moe_router_pre_softmax "
                "(or load balancing 'sinkhorn')",
            )
        )
    # group-limited routing
    group_topk = c.moe_router_group_topk
    if group_topk:
        if c.moe_router_topk_limited_devices:
            out.append(
                V(
                    ("moe_router_topk_limited_devices", "moe_router_group_topk"),
                    "moe_router_topk_limited_devices is replaced by moe_router_group_topk and "
                    "moe_router_num_groups: do not set both",
                )
            )
        groups = c.moe_router_num_groups
        if not groups:
            out.append(
                V(
                    ("moe_router_num_groups", "moe_router_group_topk"),
                    f"moe_router_num_groups must be set when moe_router_group_topk ({group_topk}) is",
                )
            )
        else:
            if experts is None:
                out.append(
                    V(
                        ("num_moe_experts", "moe_router_num_groups"),
                        "num_moe_experts must be set for group-limited routing (moe_router_num_groups)",
                    )
                )
            elif experts % groups:
                out.append(
                    V(
                        ("num_moe_experts", "moe_router_num_groups"),
                        f"num_moe_experts ({experts}) must be divisible by moe_router_num_groups ({groups})",
                    )
                )
            if group_topk > groups:
                out.append(
                    V(
                        ("moe_router_group_topk", "moe_router_num_groups"),
                        f"moe_router_group_topk ({group_topk}) must be <= moe_router_num_groups ({groups})",
                    )
                )
    # the allgather dispatcher (megatron's default, also for dense models) and variable_seq_lengths
    if dispatcher == "allgather" and c.variable_seq_lengths is True:
        out.append(
            V(
                ("variable_seq_lengths", "moe_token_dispatcher_type"),
                "variable_seq_lengths is not supported by moe_token_dispatcher_type 'allgather' "
                "(megatron's default, checked even without MoE): use 'alltoall'",
            )
        )
    return capacity


def _cuda_graphs(
    c: object,
    out: list[RuleViolation],
    granularity: str | None,
    modules: tuple[str, ...] | list[str],
    capacity: float | None,
) -> tuple[str, list[str]]:
    """CUDA graph implementation and scope. Returns the effective (cuda_graph_impl, scope names)."""
    impl = c.cuda_graph_impl
    enable = c.enable_cuda_graph
    external = c.external_cuda_graph
    # deprecated enable_cuda_graph / external_cuda_graph: not with cuda_graph_impl, not both
    if enable or external:
        if impl != "none":
            out.append(
                V(
                    ("cuda_graph_impl", "enable_cuda_graph" if enable else "external_cuda_graph"),
                    f"enable_cuda_graph/external_cuda_graph cannot be combined with cuda_graph_impl "
                    f"({impl!r})",
                )
            )
        if enable and external:
            out.append(
                V(
                    ("enable_cuda_graph", "external_cuda_graph"),
                    "enable_cuda_graph and external_cuda_graph cannot both be True",
                )
            )
        impl = "transformer_engine" if external else "local"
    # the scope is parsed on every config: "a,b" or a list of CudaGraphScope names, or "full" alone
    scope = c.cuda_graph_scope
    if scope == "full":  # megatron's default
        scopes: list[str] = []
    else:
        scopes = _scope_names(scope, out)
    if impl == "none":
        return impl, scopes
    if impl not in ("local", "transformer_engine"):
        out.append(
            V(("cuda_graph_impl",), f"cuda_graph_impl ({impl!r}) must be 'local' or 'transformer_engine'")
        )
    # no CUDA graphs with CPU offloading
    if c.cpu_offloading:
        out.append(
            V(
                ("cpu_offloading", "cuda_graph_impl"),
                "CUDA graphs (cuda_graph_impl) do not work with cpu_offloading",
            )
        )
    # the local implementation captures the MoE router and preprocessing together
    if impl == "local" and ("moe_router" in scopes or "moe_preprocess" in scopes):
        scopes = [*scopes, *(s for s in ("moe_router", "moe_preprocess") if s not in scopes)]
    elif impl == "transformer_engine" and "full_iteration" in scopes:
        out.append(
            V(
                ("cuda_graph_scope", "cuda_graph_impl"),
                "cuda_graph_scope 'full_iteration' requires cuda_graph_impl 'local'",
            )
        )
    if "moe" in scopes and "moe_router" in scopes:
        out.append(V(("cuda_graph_scope",), "cuda_graph_scope cannot contain both 'moe' and 'moe_router'"))
    if "moe_preprocess" in scopes and "moe_router" not in scopes:
        out.append(V(("cuda_graph_scope",), "cuda_graph_scope 'moe_preprocess' requires 'moe_router'"))
    experts = c.num_moe_experts
    if experts is None or experts <= 1:
        # MoE scopes only for MoE models
        if "moe" in scopes or "moe_router" in scopes:
            out.append(
                V(
                    ("cuda_graph_scope", "num_moe_experts"),
                    "cuda_graph_scope 'moe'/'moe_router' requires num_moe_experts > 1",
                )
            )
    else:
        # 'mlp' needs dense layers
        freq = c.moe_layer_freq
        if "mlp" in scopes and (freq == 1 or (isinstance(freq, (list, tuple)) and 0 not in freq)):
            out.append(
                V(
                    ("cuda_graph_scope", "moe_layer_freq"),
                    "cuda_graph_scope 'mlp' needs dense layers, but moe_layer_freq makes every layer MoE",
                )
            )
        # 'moe' needs drop-and-pad MoE; 'moe_preprocess' not with host syncs in alltoall preprocessing
        if capacity is None or not c.moe_pad_expert_input_to_capacity:
            if "moe" in scopes:
                out.append(
                    V(
                        (
                            "cuda_graph_scope",
                            "moe_expert_capacity_factor",
                            "moe_pad_expert_input_to_capacity",
                        ),
                        "cuda_graph_scope 'moe' requires drop-and-pad MoE (moe_expert_capacity_factor and "
                        "moe_pad_expert_input_to_capacity)",
                    )
                )
            if (
                "moe_preprocess" in scopes
                and c.moe_token_dispatcher_type == "alltoall"
                and (capacity is not None or c.moe_router_padding_for_fp8)
            ):
                out.append(
                    V(
                        ("cuda_graph_scope", "moe_token_dispatcher_type"),
                        "cuda_graph_scope 'moe_preprocess' is not supported with the alltoall dispatcher "
                        "when its preprocessing syncs with the host (capacity factor or padding for fp8)",
                    )
                )
    if granularity:
        if granularity != "selective":
            # full recompute only inside a full-iteration graph
            if scopes != ["full_iteration"]:
                out.append(
                    V(
                        ("recompute_granularity", "cuda_graph_scope"),
                        "recompute_granularity 'full' with CUDA graphs requires cuda_graph_scope "
                        "['full_iteration']",
                    )
                )
        else:
            _graphed_recompute(c, out, impl, modules, scopes)
    return impl, scopes


def _scope_names(scope: object, out: list[RuleViolation]) -> list[str]:
    """cuda_graph_scope as a list of CudaGraphScope names ("full" alone means [])."""
    if scope is None:
        return []
    if isinstance(scope, str):
        items = scope.split(",")
    elif isinstance(scope, (list, tuple)):
        items = list(scope)
    else:
        out.append(V(("cuda_graph_scope",), f"cuda_graph_scope ({scope!r}) must be a string or a list"))
        return []
    if not all(isinstance(item, str) for item in items):
        out.append(V(("cuda_graph_scope",), f"cuda_graph_scope ({scope!r}) must hold scope names"))
        return []
    if "full" in items:
        if items != ["full"]:
            out.append(
                V(
                    ("cuda_graph_scope",),
                    f"cuda_graph_scope 'full' cannot be combined with others ({scope!r})",
                )
            )
        return []
    unknown = [item for item in items if item not in _CUDA_GRAPH_SCOPES]
    if unknown:
        out.append(
            V(
                ("cuda_graph_scope",),
                f"cuda_graph_scope has unknown scopes {unknown}; known: 'full', "
                + ", ".join(map(repr, sorted(_CUDA_GRAPH_SCOPES))),
            )
        )
        return [item for item in items if item in _CUDA_GRAPH_SCOPES]
    return items


def _graphed_recompute(
    c: object, out: list[RuleViolation], impl: str, modules: tuple[str, ...] | list[str], scopes: list[str]
) -> None:
    """Selective recompute with CUDA graphs: a recomputed module must not contain a graphed scope, and
    graphed recomputation cannot replay random numbers (dropout, jitter)."""
    if impl == "transformer_engine" and "moe" in modules and "moe_router" in scopes:
        out.append(
            V(
                ("recompute_modules", "cuda_graph_scope"),
                "recompute of 'moe' does not work with cuda_graph_scope 'moe_router' under cuda_graph_impl "
                "'transformer_engine'",
            )
        )
    whole = not scopes or "full_iteration" in scopes
    if c.attention_dropout != 0.0 and "core_attn" in modules and (whole or "attn" in scopes):
        out.append(
            V(
                ("attention_dropout", "recompute_modules", "cuda_graph_scope"),
                f"attention_dropout ({c.attention_dropout}) must be 0 with graphed recompute of 'core_attn'",
            )
        )
    if c.hidden_dropout != 0.0 and (
        ("mlp" in modules and (whole or "mlp" in scopes)) or ("moe" in modules and (whole or "moe" in scopes))
    ):
        out.append(
            V(
                ("hidden_dropout", "recompute_modules", "cuda_graph_scope"),
                f"hidden_dropout ({c.hidden_dropout}) must be 0 with graphed recompute of 'mlp'/'moe'",
            )
        )
    if c.moe_input_jitter_eps is not None and "moe" in modules and (whole or "moe" in scopes):
        out.append(
            V(
                ("moe_input_jitter_eps", "recompute_modules", "cuda_graph_scope"),
                "moe_input_jitter_eps must be None with graphed recompute of 'moe'",
            )
        )


def _moe_overlap(
    c: object,
    out: list[RuleViolation],
    granularity: str | None,
    vpp: int | None,
    impl: str,
    scopes: list[str],
) -> None:
    """overlap_moe_expert_parallel_comm and the options that depend on it."""
    overlap = c.overlap_moe_expert_parallel_comm
    if overlap:
        f = "overlap_moe_expert_parallel_comm"
        pp = c.pipeline_model_parallel_size
        if pp > 1 and vpp is None:
            out.append(
                V(
                    ("virtual_pipeline_model_parallel_size", f, "pipeline_model_parallel_size"),
                    f"{f} with pipeline_model_parallel_size ({pp}) > 1 requires "
                    "virtual_pipeline_model_parallel_size",
                )
            )
        if c.expert_model_parallel_size <= 1:
            out.append(
                V(
                    ("expert_model_parallel_size", f),
                    f"{f} requires expert_model_parallel_size > 1 (got {c.expert_model_parallel_size})",
                )
            )
        if c.moe_token_dispatcher_type not in ("alltoall", "flex"):
            out.append(
                V(
                    ("moe_token_dispatcher_type", f),
                    f"{f} requires moe_token_dispatcher_type 'alltoall' or 'flex' "
                    f"(got {c.moe_token_dispatcher_type!r})",
                )
            )
        if granularity == "full":
            out.append(
                V(("recompute_granularity", f), f"{f} does not work with recompute_granularity 'full'")
            )
        if c.recompute_method is not None:
            out.append(V(("recompute_method", f), f"{f} requires recompute_method None"))
        if c.recompute_num_layers is not None:
            out.append(V(("recompute_num_layers", f), f"{f} requires recompute_num_layers None"))
        if not (c.bf16 or c.fp16):
            out.append(V((f, "bf16", "fp16"), f"{f} requires bf16 or fp16"))
        if c.moe_shared_expert_overlap:
            out.append(
                V(("moe_shared_expert_overlap", f), f"moe_shared_expert_overlap cannot be used with {f}")
            )
        mtp = c.mtp_num_layers
        if not (mtp is None or mtp == 1):
            out.append(V(("mtp_num_layers", f), f"{f} supports mtp_num_layers None or 1 (got {mtp})"))
        if mtp == 1 and pp <= 1:
            out.append(
                V(
                    ("pipeline_model_parallel_size", f, "mtp_num_layers"),
                    f"{f} with an MTP layer requires pipeline_model_parallel_size > 1",
                )
            )
        if impl != "none" and (impl != "transformer_engine" or "moe" in scopes or "mlp" in scopes):
            out.append(
                V(
                    ("cuda_graph_impl", f, "cuda_graph_scope"),
                    f"{f} with CUDA graphs requires cuda_graph_impl 'transformer_engine' without the 'moe' "
                    "and 'mlp' scopes",
                )
            )
    if c.delay_wgrad_compute:
        if not overlap:
            out.append(
                V(
                    ("delay_wgrad_compute", "overlap_moe_expert_parallel_comm"),
                    "delay_wgrad_compute requires overlap_moe_expert_parallel_comm",
                )
            )
        if c.moe_use_legacy_grouped_gemm:
            out.append(
                V(
                    ("delay_wgrad_compute", "moe_use_legacy_grouped_gemm"),
                    "delay_wgrad_compute does not work with moe_use_legacy_grouped_gemm",
                )
            )
    if c.ep_overlap_early_attn_memory_release and not overlap:
        out.append(
            V(
                ("ep_overlap_early_attn_memory_release", "overlap_moe_expert_parallel_comm"),
                "ep_overlap_early_attn_memory_release requires overlap_moe_expert_parallel_comm",
            )
        )


def _misc(c: object, out: list[RuleViolation]) -> None:
    """Layer count, no-RoPE layers and the inference-optimized implementation."""
    num_layers = c.num_layers
    # output_layer_init_method (never given as data) defaults to an init with std / sqrt(2 * num_layers)
    if num_layers <= 0:
        out.append(
            V(
                ("num_layers",),
                f"num_layers ({num_layers}) must be > 0 (megatron scales the output-layer init by "
                "1/sqrt(2*num_layers))",
            )
        )
    # no_rope_freq: not with flash_decode; an int must divide num_layers, a list has one entry per layer
    no_rope = c.no_rope_freq
    if no_rope:
        if c.flash_decode:
            out.append(V(("flash_decode", "no_rope_freq"), "flash_decode cannot be used with no_rope_freq"))
        if isinstance(no_rope, int):
            if num_layers % no_rope:
                out.append(
                    V(
                        ("no_rope_freq", "num_layers"),
                        f"num_layers ({num_layers}) must be divisible by no_rope_freq ({no_rope})",
                    )
                )
        elif len(no_rope) != num_layers:
            out.append(
                V(
                    ("no_rope_freq", "num_layers"),
                    f"no_rope_freq has {len(no_rope)} entries but num_layers is {num_layers}",
                )
            )
    impl = c.transformer_impl
    if impl == "inference_optimized":
        # RMSNorm, no zero-centered gamma, no biases, no kitchen
        if c.normalization != "RMSNorm":
            out.append(
                V(
                    ("normalization", "transformer_impl"),
                    f"transformer_impl 'inference_optimized' requires normalization 'RMSNorm' "
                    f"(got {c.normalization!r})",
                )
            )
        for name in ("layernorm_zero_centered_gamma", "add_bias_linear", "add_qkv_bias", "use_kitchen"):
            if getattr(c, name):
                out.append(
                    V(
                        (name, "transformer_impl"),
                        f"transformer_impl 'inference_optimized' requires {name} False",
                    )
                )
    elif c.inference_fuse_tp_communication:
        out.append(
            V(
                ("inference_fuse_tp_communication", "transformer_impl"),
                f"inference_fuse_tp_communication requires transformer_impl 'inference_optimized' "
                f"(got {impl!r})",
            )
        )
