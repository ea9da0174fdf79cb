"""Differential test: bioconf.schema.rules against megatron-core's own __post_init__ checks.

Hypothesis draws configs concentrated on the fields the rules involve. Each one is (1) checked by
``check_rules`` on a SimpleNamespace of megatron's defaults in schema form plus the drawn overrides,
(2) validated by ``bioconf.schema.ModelConfig`` (a ValidationError is a rejection), and (3) built as a
real megatron ``TransformerConfig`` (values converted to megatron form: dtype names to torch dtypes,
activation names to the functions the registry names, attention_backend to AttnBackend). All three
verdicts (rejected or not) must agree on every case. Megatron is real, never mocked.

Two tests draw the configs: random combinations of the feature groups (test_rules_agree_with_megatron),
and every named perturbation of each group forced in turn (test_every_perturbation).

Deliberate exceptions: megatron's checks that depend on the installed environment, which rules.py
leaves to the runtime. This CPU box has no Transformer Engine, so megatron raises for them whatever
the config; ``environment_dependent`` filters such cases out (they are counted, and few):

- apply_rope_fusion without multi_latent_attention: looks for TE's fused RoPE kernels.
- fp8 + selective recompute of "moe_act"/"layernorm" with a non-delayed fp8_recipe: TE >= 2.6 check.
- num_moe_experts + fp8: TE >= 1.7 check (>= 1.11 with moe_grouped_gemm).
- delay_wgrad_compute with cuda_graph_impl "transformer_engine": TE >= 2.10 check.
- moe_permute_fusion (TE's fused permutation kernels) and symmetric_ar_type (TE >= 2.3,
  torch >= 2.7): never generated; the filter names them too.
overlap_moe_expert_parallel_comm's torch >= 2.6 check passes with the installed torch, so those cases
are generated and compared.
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
from hypothesis import HealthCheck, assume, given, reject, settings
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
    modules = get("recompute_modules")
    if modules is None:
        modules = ["core_attn"]
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
# Each feature group first builds a configuration megatron should accept, then (about half the
# time) applies one named perturbation aimed at one rule, or at the legal side of a rule's
# boundary. Rules are thus often the only one violated, so a missing or wrong rule changes the
# verdict. A config combines one to three groups, so rules also meet each other.


def pick(draw: st.DrawFn, *values: Any) -> Any:
    return draw(st.sampled_from(values))


# test_every_perturbation sets "option" to force one perturbation, and "seen" to collect their names.
_PERTURBATION: dict[str, Any] = {"option": None, "seen": None}


def perturb(draw: st.DrawFn, kw: dict[str, Any], options: dict[str, dict[str, Any] | None]) -> None:
    """Apply at most one of ``options`` (name -> field updates, None where it does not apply here)."""
    if _PERTURBATION["seen"] is not None:
        _PERTURBATION["seen"].update(options)
    forced = _PERTURBATION["option"]
    if forced is not None:
        if options.get(forced) is None:
            reject()  # draw another config, one this perturbation applies to
        kw.update(options[forced])
        return
    applicable = sorted(name for name, change in options.items() if change is not None)
    if applicable and draw(st.integers(0, 99)) >= 10:  # Hypothesis often draws 0: then nothing is perturbed
        kw.update(options[draw(st.sampled_from(applicable))])


def _uses_pipeline_split(kw: dict[str, Any]) -> bool:
    return any(
        kw.get(name) not in (None, False)
        for name in (
            "pipeline_model_parallel_layout",
            "num_layers_in_first_pipeline_stage",
            "num_layers_in_last_pipeline_stage",
            "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split",
        )
    )


def _parallelism(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    tp = kw["tensor_model_parallel_size"]
    pp = pick(draw, 1, 2, 4)
    kw["pipeline_model_parallel_size"] = pp
    if pp > 1 or draw(st.booleans()):
        kw["pipeline_dtype"] = pick(draw, "bfloat16", "float32", "float16")
    kw["sequence_parallel"] = tp > 1 and draw(st.booleans())
    kw["context_parallel_size"] = pick(draw, 1, 2)
    if kw["context_parallel_size"] > 1:
        kw["cp_comm_type"] = pick(draw, None, "p2p", "a2a+p2p", ["p2p"] * kw["num_layers"])
    if pp > 1 and draw(st.booleans()):
        kw.update(defer_embedding_wgrad_compute=True, gradient_accumulation_fusion=True)
        kw["wgrad_deferral_limit"] = pick(draw, 0, 2)
    if draw(st.booleans()):
        kw.update(overlap_p2p_comm_warmup_flush=True, overlap_p2p_comm=True, batch_p2p_comm=False)
    defer = {"defer_embedding_wgrad_compute": True, "gradient_accumulation_fusion": True}
    pp2 = {"pipeline_model_parallel_size": 2, "pipeline_dtype": "bfloat16"}
    perturb(
        draw,
        kw,
        {
            "pp without dtype": {"pipeline_model_parallel_size": 2, "pipeline_dtype": None},
            "pp 0": {"pipeline_model_parallel_size": 0},
            "sp without tp": {"sequence_parallel": True, "tensor_model_parallel_size": 1},
            "cp list too long": {
                "context_parallel_size": 2,
                "cp_comm_type": ["p2p"] * (kw["num_layers"] + 1),
            },
            "cp list without cp": {
                "context_parallel_size": 1,
                "cp_comm_type": ["p2p"] * (kw["num_layers"] + 1),
            },
            "defer without pp": {**defer, "pipeline_model_parallel_size": 1},
            "defer without fusion": {**defer, **pp2, "gradient_accumulation_fusion": False},
            "negative deferral": {**defer, **pp2, "wgrad_deferral_limit": -1},
            "negative deferral unused": {"defer_embedding_wgrad_compute": False, "wgrad_deferral_limit": -1},
            "warmup without overlap": {
                "overlap_p2p_comm_warmup_flush": True,
                "overlap_p2p_comm": False,
                "batch_p2p_comm": False,
            },
            "warmup with batch": {
                "overlap_p2p_comm_warmup_flush": True,
                "overlap_p2p_comm": True,
                "batch_p2p_comm": True,
            },
        },
    )


def _layout_stages(draw: st.DrawFn, num_layers: int, stages: int, mtp: int | None) -> list[list[str]]:
    """A valid layout in letters: E first, the decoders spread over the stages, MTP and L last."""
    if draw(st.booleans()):  # as even as possible
        cuts = [num_layers * i // stages for i in range(1, stages)]
    else:
        cuts = sorted(draw(st.lists(st.integers(0, num_layers), min_size=stages - 1, max_size=stages - 1)))
    layout = [["t"] * (b - a) for a, b in zip([0, *cuts], [*cuts, num_layers])]
    layout[0].insert(0, "E")
    layout[-1].extend(["m"] * (mtp or 0) + ["L"])
    return layout


_LAYER_NAMES = {"E": "embedding", "t": "decoder", "L": "loss", "m": "mtp"}


def _replace_first(layout: list[list[str]], old: str, new: str) -> None:
    stage = next(stage for stage in layout if old in stage)
    stage[stage.index(old)] = new


def _move_decoder_after_mtp(layout: list[list[str]]) -> None:
    for stage in layout:
        if "t" in stage:
            stage.remove("t")
            break
    layout[-1].insert(-1, "t")


def _split_mtp(layout: list[list[str]]) -> None:
    """Move the last stage's decoders and one MTP layer to the stage before it."""
    last = layout.pop()
    layout[-1].extend([x for x in last if x == "t"] + ["m"])
    layout.append([x for x in last if x != "t"][1:])


def _render_layout(draw: st.DrawFn, layout: list[list[str]], as_list: bool) -> str | list[list[str]]:
    if as_list:
        names = [[_LAYER_NAMES.get(x, x) for x in stage] for stage in layout]
        if names and names[0] and draw(st.booleans()):
            names[0][0] = " Embedding "  # megatron strips and lower-cases list entries
        return names
    parts = ["".join(stage) for stage in layout]
    form = pick(draw, "repeated stages", "plain", "repeated layers")
    if form == "repeated layers":  # "ttt|" -> "t*3,|" (commas are cosmetic)
        return "|".join(parts).replace("ttt", "t*3").replace("|", ",|")
    if form == "repeated stages":  # the first run of equal stages (not the last one) as "(tt|)*2"
        for i in range(len(parts) - 1):
            k = 1
            while i + k < len(parts) - 1 and parts[i + k] == parts[i]:
                k += 1
            if k > 1:
                head = "".join(part + "|" for part in parts[:i])
                return f"{head}({parts[i]}|)*{k}" + "|".join(parts[i + k :])
    return "|".join(parts)


def _pipeline(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    pp = pick(draw, 2, 3, 4, 1)
    kw["pipeline_model_parallel_size"] = pp
    if pp > 1:
        kw["pipeline_dtype"] = "bfloat16"
    vpp = pick(draw, None, 1, 2)
    unit = vpp or 1
    mode = pick(draw, "uneven", "account", "layout", "layout", "vpp")
    if mode == "uneven":
        which = "first" if pp == 1 else pick(draw, "first", "last", "both")
        first = unit * draw(st.integers(1, 3)) if which in ("first", "both") else None
        last = unit * draw(st.integers(1, 3)) if which in ("last", "both") else None
        middle = pp - (first is not None) - (last is not None)
        per_middle = unit * draw(st.integers(1, 2))
        n = (first or 0) + (last or 0) + middle * per_middle
        kw.update(
            num_layers=n,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
            virtual_pipeline_model_parallel_size=vpp,
        )
        edge = (
            "num_layers_in_first_pipeline_stage" if first is not None else "num_layers_in_last_pipeline_stage"
        )
        value = first if first is not None else last
        perturb(
            draw,
            kw,
            {
                "stage of 0 layers": {edge: 0, "num_layers": n - value},
                "stage of -1 layers": {edge: -1, "num_layers": n - value - 1},
                "stage vs vpp": {edge: value + 1, "num_layers": n + 1},
                "middle not divisible": {"num_layers": n + 1},
                "no middle layers": {"num_layers": (first or 0) + (last or 0)},
                "middle vs vpp": {"num_layers": n + middle} if vpp == 2 and middle > 0 else None,
                "vpp 0": {"virtual_pipeline_model_parallel_size": 0},
                "with account": {"account_for_embedding_in_pipeline_split": True},
            },
        )
    elif mode == "account":
        embedding = draw(st.booleans())
        loss = not embedding or draw(st.booleans())
        n = pp * unit * draw(st.integers(1, 3)) - embedding - loss
        if n <= 0:
            n += pp * unit
        kw.update(
            num_layers=n,
            account_for_embedding_in_pipeline_split=embedding,
            account_for_loss_in_pipeline_split=loss,
            virtual_pipeline_model_parallel_size=vpp,
        )
        perturb(
            draw,
            kw,
            {
                "not divisible": {"num_layers": n + 1},
                "vpp 3": {"virtual_pipeline_model_parallel_size": 3},
                "with first stage": {"num_layers_in_first_pipeline_stage": 1},
            },
        )
    elif mode == "layout":
        mtp = pick(draw, None, None, 1, 2)
        n = kw["num_layers"]
        vpp = pick(draw, 1, 1, 2)
        layout = _layout_stages(draw, n, pp * vpp, mtp)
        as_list = draw(st.booleans())
        kw.update(mtp_num_layers=mtp, virtual_pipeline_model_parallel_size=pick(draw, None, vpp))
        kw["pipeline_model_parallel_layout"] = _render_layout(draw, layout, as_list)
        variants: dict[str, Any] = {
            "no loss": lambda s: s[-1].remove("L"),
            "extra decoder": lambda s: s[-1].insert(0, "t"),
            "second embedding": lambda s: s[-1].insert(0, "E"),
            "second loss": lambda s: s[0].append("L"),
            "bad letter": lambda s: _replace_first(s, "t", "x"),
            "mtp in first stage": lambda s: s[0].append("m"),
            "merged stages": lambda s: s[-2].extend(s.pop()) if len(s) > 1 else s.append([]),
            "empty": lambda s: s.clear(),
        }
        # (None where the variant needs MTP layers or several stages)
        variants["decoder after mtp"] = mtp and _move_decoder_after_mtp
        variants["mtp split"] = mtp and pp * vpp > 1 and _split_mtp
        # everything but the loss on the first stage, a non-last virtual stage of rank 0
        variants["mtp before the last virtual stage"] = (
            mtp
            and vpp > 1
            and (
                lambda s: s.__setitem__(
                    slice(None), [["E", *["t"] * n, *["m"] * mtp], *[[] for _ in s[2:]], ["L"]]
                )
            )
        )
        options: dict[str, dict[str, Any]] = {
            "vpp conflict": {"virtual_pipeline_model_parallel_size": vpp + 1},
            "mtp count": {"mtp_num_layers": (mtp or 0) + 1},
            "with last stage": {"num_layers_in_last_pipeline_stage": 1},
            "with account": {"account_for_loss_in_pipeline_split": True},
            "letters in list form": {"pipeline_model_parallel_layout": [list(stage) for stage in layout]},
            "a row that is not a list": {  # an empty string instead of an empty stage
                "pipeline_model_parallel_layout": [
                    *([_LAYER_NAMES[x] for x in stage] for stage in layout[:-1]),
                    "",
                    [_LAYER_NAMES[x] for x in layout[-1]],
                ],
                "pipeline_model_parallel_size": 1,
                "virtual_pipeline_model_parallel_size": None,
            },
            "encoder": {
                "pipeline_model_parallel_layout": [
                    [_LAYER_NAMES[x] for x in stage] + (["encoder"] if i == 0 else [])
                    for i, stage in enumerate(layout)
                ]
            },
        }
        for name, change in variants.items():
            broken = copy.deepcopy(layout)
            if change:
                change(broken)
            options[name] = (
                {"pipeline_model_parallel_layout": _render_layout(draw, broken, as_list)} if change else None
            )
        perturb(draw, kw, options)
    else:
        kw["virtual_pipeline_model_parallel_size"] = pick(draw, 1, 2, 3, 0)
        perturb(draw, kw, {})


def _attention(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    tp = kw["tensor_model_parallel_size"]
    kw["num_query_groups"] = pick(draw, None, *[g for g in (1, 2, 4, 8, 16) if g % tp == 0 or tp % g == 0])
    if draw(st.integers(0, 3)) == 0:
        kw["kv_channels"] = 16
    variant = pick(draw, None, None, "gated_delta_net", "dsa")
    key_heads = tp * pick(draw, 1, 2)
    gdn = {
        "experimental_attention_variant": "gated_delta_net",
        "context_parallel_size": 1,
        "linear_attention_freq": 4,
        "linear_num_key_heads": key_heads,
        "linear_num_value_heads": key_heads * 2,
    }
    if variant == "gated_delta_net":
        kw.update(gdn, linear_attention_freq=pick(draw, 4, [1, 0]))
    elif variant == "dsa":
        kw.update(experimental_attention_variant="dsa", context_parallel_size=1)
    if draw(st.booleans()):
        kw.update(multi_latent_attention=True, rotary_interleaved=False)
    else:
        kw["rotary_interleaved"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        kw.update(fused_single_qkv_rope=True, attention_output_gate=False)
    if draw(st.integers(0, 3)) == 0:
        kw.update(batch_invariant_mode=True, attention_backend="flash")
    else:
        kw["attention_backend"] = pick(draw, "auto", "flash", "fused", "unfused", "local")
    heads = kw["num_attention_heads"]
    perturb(
        draw,
        kw,
        {
            "heads vs tp": {"tensor_model_parallel_size": 5 if heads % 3 == 0 else 3, "num_query_groups": 1},
            "groups vs tp": {"num_query_groups": 3 if tp > 1 else None},
            "groups multiple of tp": {"num_query_groups": 2 * tp},
            "tp 0": {"tensor_model_parallel_size": 0, "sequence_parallel": False},
            "heads 0": {"num_attention_heads": 0, "kv_channels": None, "num_query_groups": 1},
            "heads 0 with kv_channels": {
                "num_attention_heads": 0,
                "kv_channels": 16,
                "num_query_groups": None,
            },
            "gdn without freq": {**gdn, "linear_attention_freq": None},
            "gdn without key heads": {**gdn, "linear_num_key_heads": None},
            "gdn value vs key": {**gdn, "linear_num_value_heads": key_heads * 3 // 2 if tp > 1 else 3},
            "gdn key vs tp": {**gdn, "linear_num_key_heads": tp + 1, "linear_num_value_heads": 2 * (tp + 1)},
            "gdn with cp": {**gdn, "context_parallel_size": 2},
            "dsa with cp": {"experimental_attention_variant": "dsa", "context_parallel_size": 2},
            "dsa with rope fusion": {
                "experimental_attention_variant": "dsa",
                "context_parallel_size": 1,
                "apply_rope_fusion": True,
                "multi_latent_attention": True,
                "rotary_interleaved": False,
            },
            "mla interleaved": {"multi_latent_attention": True, "rotary_interleaved": True},
            "qkv rope with gate": {"fused_single_qkv_rope": True, "attention_output_gate": True},
            "batch invariant": {
                "batch_invariant_mode": True,
                "attention_backend": pick(draw, "auto", "fused"),
            },
        },
    )


def _precision(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    kw["fp16"], kw["bf16"] = pick(draw, (False, True), (True, False), (False, False))
    per_stage = kw["num_layers"] // max(kw.get("pipeline_model_parallel_size", 1), 1)
    if draw(st.booleans()):
        kw["fp8"] = pick(draw, "e4m3", "hybrid")
        kw["fp8_recipe"] = pick(draw, "delayed", "tensorwise", "mxfp8", "blockwise")
        kw["fp8_param"] = draw(st.booleans())
        if kw["fp8_recipe"] != "delayed" and draw(st.booleans()):
            kw["first_last_layers_bf16"] = True
            kw["num_layers_at_start_in_bf16"] = draw(st.integers(0, max(per_stage, 0)))
            kw["num_layers_at_end_in_bf16"] = draw(st.integers(0, max(per_stage, 0)))
    elif draw(st.booleans()):
        kw.update(fp4="e2m1", fp4_param=draw(st.booleans()))
    bf16_layers = {"fp8": "hybrid", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True, "fp4": None}
    perturb(
        draw,
        kw,
        {
            "fp16 and bf16": {"fp16": True, "bf16": True},
            "bf16 layers with delayed": {**bf16_layers, "fp8_recipe": "delayed"},
            "too many bf16 layers at start": {**bf16_layers, "num_layers_at_start_in_bf16": per_stage + 1},
            "negative bf16 layers at end": {**bf16_layers, "num_layers_at_end_in_bf16": -1},
            "bf16 layers without fp8": {
                "fp8": None,
                "first_last_layers_bf16": True,
                "num_layers_at_end_in_bf16": -1,
            },
            "custom fp8 without factory": {
                "fp8": "e4m3",
                "fp8_recipe": "custom",
                "first_last_layers_bf16": False,
            },
            "custom fp8 with factory": {
                "fp8": "e4m3",
                "fp8_recipe": "custom",
                "fp8_quantizer_factory": "pkg.mod.factory",
                "first_last_layers_bf16": False,
                "fp4": None,
            },
            "fp8_param without fp8": {"fp8": None, "fp8_param": True},
            "fp4 and fp8": {"fp4": "e2m1", "fp8": "e4m3"},
            "custom fp4 without factory": {
                "fp4": "e2m1",
                "fp4_recipe": "custom",
                "fp8": None,
                "fp8_param": False,
            },
            "fp4_param without fp4": {"fp4": None, "fp4_param": True},
        },
    )


_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts")


def _recompute(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    granularity = pick(draw, None, "full", "selective", "selective")
    kw["recompute_granularity"] = granularity
    if granularity == "full":
        kw.update(recompute_method=pick(draw, "uniform", "block"), recompute_num_layers=pick(draw, 1, 2))
    elif granularity == "selective":
        grouped, mla = draw(st.booleans()), draw(st.booleans())
        allowed = [*_RECOMPUTE_MODULES, *(["moe_act"] if grouped else []), *(["mla_up_proj"] if mla else [])]
        modules = draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True))
        kw.update(moe_grouped_gemm=grouped, recompute_modules=pick(draw, None, modules))
        if mla:
            kw.update(multi_latent_attention=True, rotary_interleaved=False)
        kw["recompute_method"] = pick(draw, None, None, "uniform")  # allowed, unused, with selective
    if not kw.get("sequence_parallel"):
        kw["distribute_saved_activations"] = draw(st.booleans())
    if granularity != "full":
        kw["moe_layer_recompute"] = pick(draw, False, False, True)
    selective = {"recompute_granularity": "selective", "recompute_num_layers": None}
    sp = {
        "sequence_parallel": True,
        "tensor_model_parallel_size": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
    }
    perturb(
        draw,
        kw,
        {
            "full without method": {
                "recompute_granularity": "full",
                "recompute_method": None,
                "recompute_num_layers": 1,
            },
            "full without layers": {
                "recompute_granularity": "full",
                "recompute_method": "block",
                "recompute_num_layers": None,
            },
            "unknown granularity": {
                "recompute_granularity": "bogus",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            },
            "full with bad method": {
                "recompute_granularity": "full",
                "recompute_method": "bogus",
                "recompute_num_layers": 1,
            },
            "selective with layers": {**selective, "recompute_num_layers": 1},
            "unknown module": {**selective, "recompute_modules": ["core_attn", "bogus"]},
            "unknown module unused": {"recompute_granularity": None, "recompute_modules": ["bogus"]},
            "moe_act without grouped gemm": {
                **selective,
                "recompute_modules": ["moe_act"],
                "moe_grouped_gemm": False,
            },
            "mla_up_proj without mla": {
                **selective,
                "recompute_modules": ["mla_up_proj"],
                "multi_latent_attention": False,
            },
            "shared experts with overlap": {
                **selective,
                "recompute_modules": ["shared_experts"],
                "moe_shared_expert_intermediate_size": 64,
                "moe_shared_expert_overlap": True,
                "moe_token_dispatcher_type": "alltoall",
            },
            "fp8 delayed layernorm": {
                **selective,
                "recompute_modules": ["layernorm"],
                "fp8": "e4m3",
                "fp8_recipe": "delayed",
            },
            "distribute with sp": {**selective, **sp, "distribute_saved_activations": True},
            "distribute with sp, no recompute": {
                **sp,
                "recompute_granularity": None,
                "distribute_saved_activations": True,
            },
            "moe_layer_recompute with full": {
                "moe_layer_recompute": True,
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            },
        },
    )


def _offloading(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    n = kw["num_layers"]
    if (
        kw.get("pipeline_model_parallel_size", 1) == 1
        and not kw.get("recompute_granularity")
        and draw(st.booleans())
    ):
        kw.update(cpu_offloading=True, cpu_offloading_num_layers=draw(st.integers(0, max(n - 1, 0))))
    elif draw(st.booleans()):
        modules = draw(
            st.lists(
                st.sampled_from(("core_attn", "attn_proj", "expert_fc1", "moe_act", "qkv_linear")), max_size=3
            )
        )
        if "attn_proj" in modules:
            modules.append("core_attn")
        kw.update(fine_grained_activation_offloading=True, offload_modules=modules or ["mlp_norm"])
    cpu = {
        "cpu_offloading": True,
        "cpu_offloading_num_layers": 0,
        "fine_grained_activation_offloading": False,
    }
    fine = {"fine_grained_activation_offloading": True, "cpu_offloading": False}
    perturb(
        draw,
        kw,
        {
            "offload every layer": {**cpu, "cpu_offloading_num_layers": n},
            "offload -1 layers": {**cpu, "cpu_offloading_num_layers": -1},
            "offload with pp": {**cpu, "pipeline_model_parallel_size": 2, "pipeline_dtype": "bfloat16"},
            "offload with recompute": {
                **cpu,
                "recompute_granularity": "selective",
                "recompute_num_layers": None,
            },
            "offload with moe_layer_recompute": {
                **cpu,
                "recompute_granularity": None,
                "moe_layer_recompute": True,
            },
            "offload with cuda graphs": {**cpu, "cuda_graph_impl": "local"},
            "fine-grained with cpu offload": {
                **cpu,
                **fine,
                "cpu_offloading": True,
                "offload_modules": ["core_attn"],
            },
            "fine-grained, no modules": {**fine, "offload_modules": []},
            "fine-grained, modules None": {**fine, "offload_modules": None},
            "fine-grained, unknown module": {**fine, "offload_modules": ["qkv_linear", "bogus"]},
            "fine-grained, attn_proj alone": {**fine, "offload_modules": ["attn_proj"]},
            "modules without fine-grained": {
                "fine_grained_activation_offloading": False,
                "offload_modules": ["bogus"],
            },
        },
    )


def _moe(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    tp = kw["tensor_model_parallel_size"]
    experts = pick(draw, 2, 4, 8)
    kw.update(num_moe_experts=experts, moe_ffn_hidden_size=pick(draw, None, 32))
    kw["add_bias_linear"] = draw(st.booleans())
    if kw["add_bias_linear"]:
        kw["expert_tensor_parallel_size"] = 1 if tp != 1 else pick(draw, None, 1)
    else:
        kw["expert_tensor_parallel_size"] = pick(draw, None, 1, 2)
    kw["expert_model_parallel_size"] = pick(draw, 1, 2)
    dispatcher = pick(draw, "allgather", "alltoall", "flex")
    kw["moe_token_dispatcher_type"] = dispatcher
    deepep = False
    if dispatcher == "flex":
        kw["moe_flex_dispatcher_backend"] = pick(draw, "deepep", "hybridep")
        deepep = kw["moe_flex_dispatcher_backend"] == "deepep"
        kw["moe_enable_deepep"] = deepep and draw(st.booleans())
    capacity = pick(draw, None, 1.0, 1.5)
    kw["moe_expert_capacity_factor"] = capacity
    kw["moe_pad_expert_input_to_capacity"] = capacity is not None and not deepep and draw(st.booleans())
    balancing = pick(draw, "aux_loss", "seq_aux_loss", "global_aux_loss", "none", "sinkhorn", "list")
    if balancing == "sinkhorn" and capacity is not None:
        balancing = "aux_loss"
    if balancing == "list":
        kw.update(
            moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[0.01, 0.001]
        )
    else:
        kw["moe_router_load_balancing_type"] = balancing
    score = pick(draw, "softmax", "sigmoid")
    kw["moe_router_score_function"] = score
    kw["moe_router_enable_expert_bias"] = score == "sigmoid" and draw(st.booleans())
    kw["moe_router_pre_softmax"] = draw(st.booleans())
    if score == "sigmoid" or kw["moe_router_pre_softmax"] or balancing == "sinkhorn":
        kw["moe_router_topk"] = pick(draw, 1, 2)
    if draw(st.booleans()):
        kw["moe_shared_expert_intermediate_size"] = 64
        kw["moe_shared_expert_overlap"] = dispatcher == "alltoall" and draw(st.booleans())
    if dispatcher != "allgather":
        kw["variable_seq_lengths"] = draw(st.booleans())
        if draw(st.integers(0, 3)) == 0:
            kw.update(moe_router_padding_for_quantization=True, fp4="e2m1")
    if draw(st.booleans()):
        groups = pick(draw, *[g for g in (1, 2, 4) if experts % g == 0])
        kw.update(moe_router_num_groups=groups, moe_router_group_topk=draw(st.integers(1, groups)))
    kw["moe_router_dtype"] = pick(draw, None, "fp32")
    no_experts = {
        "num_moe_experts": None,
        "moe_ffn_hidden_size": None,
        "expert_model_parallel_size": 1,
        "moe_router_group_topk": None,
    }
    plain = {"moe_token_dispatcher_type": "alltoall", "moe_enable_deepep": False}
    top1 = {
        "moe_router_topk": 1,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": False,
        "moe_router_enable_expert_bias": False,
        "moe_expert_capacity_factor": None,
        "moe_pad_expert_input_to_capacity": False,
        "moe_aux_loss_coeff": 0.0,
    }
    perturb(
        draw,
        kw,
        {
            "ep without experts": {**no_experts, "expert_model_parallel_size": 2},
            "moe ffn without experts": {**no_experts, "moe_ffn_hidden_size": 32},
            "moe options without experts": no_experts,
            "0 experts": {"num_moe_experts": 0, "moe_router_group_topk": None},
            "bias with etp 2": {"add_bias_linear": True, "expert_tensor_parallel_size": 2},
            "bias with etp from tp": {
                "add_bias_linear": True,
                "expert_tensor_parallel_size": None,
                "tensor_model_parallel_size": 2,
                "num_attention_heads": 4,
                "hidden_size": 64,
                "num_query_groups": None,
            },
            "deepep without flex": {"moe_enable_deepep": True, "moe_token_dispatcher_type": "alltoall"},
            "deepep with hybridep": {
                "moe_enable_deepep": True,
                "moe_token_dispatcher_type": "flex",
                "moe_flex_dispatcher_backend": "hybridep",
                "moe_pad_expert_input_to_capacity": False,
            },
            "deepep backend with padding": {
                "moe_token_dispatcher_type": "flex",
                "moe_flex_dispatcher_backend": "deepep",
                "moe_enable_deepep": False,
                "moe_expert_capacity_factor": 1.0,
                "moe_pad_expert_input_to_capacity": True,
                "moe_router_load_balancing_type": "aux_loss",
            },
            "hybridep backend with padding": {
                "moe_token_dispatcher_type": "flex",
                "moe_flex_dispatcher_backend": "hybridep",
                "moe_enable_deepep": False,
                "moe_expert_capacity_factor": 1.0,
                "moe_pad_expert_input_to_capacity": True,
                "moe_router_load_balancing_type": "aux_loss",
            },
            "shared size 0": {"moe_shared_expert_intermediate_size": 0, "moe_shared_expert_overlap": False},
            "shared overlap with allgather": {
                "moe_shared_expert_intermediate_size": 64,
                "moe_shared_expert_overlap": True,
                "moe_token_dispatcher_type": "allgather",
                "moe_enable_deepep": False,
                "variable_seq_lengths": False,
                "moe_router_padding_for_quantization": False,
            },
            "coefficient not a list": {
                "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"],
                "moe_aux_loss_coeff": 0.01,
            },
            "coefficient list too short": {
                "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"],
                "moe_aux_loss_coeff": [0.01],
            },
            "capacity with sinkhorn": {
                "moe_expert_capacity_factor": 1.0,
                "moe_router_load_balancing_type": "sinkhorn",
            },
            "negative capacity with sinkhorn": {
                "moe_expert_capacity_factor": -1.0,
                "moe_pad_expert_input_to_capacity": False,
                "moe_router_load_balancing_type": "sinkhorn",
            },
            "negative capacity with padding": {
                **plain,
                "moe_expert_capacity_factor": -1.0,
                "moe_pad_expert_input_to_capacity": True,
                "moe_router_load_balancing_type": "aux_loss",
            },
            "padding without capacity": {
                **plain,
                "moe_expert_capacity_factor": None,
                "moe_pad_expert_input_to_capacity": True,
            },
            "expert bias with softmax": {
                "moe_router_enable_expert_bias": True,
                "moe_router_score_function": "softmax",
                "moe_router_topk": 2,
            },
            "quantization padding without fp8/fp4": {
                **plain,
                "moe_router_padding_for_quantization": True,
                "fp4": None,
                "fp8": None,
            },
            "fp8 padding alias with allgather": {
                "moe_router_padding_for_fp8": True,
                "fp4": "e2m1",
                "fp8": None,
                "moe_token_dispatcher_type": "allgather",
                "moe_enable_deepep": False,
                "variable_seq_lengths": False,
                "moe_shared_expert_overlap": False,
            },
            "top-1 softmax": {**top1, "moe_router_load_balancing_type": "aux_loss"},
            "top-1 softmax, sinkhorn": {**top1, "moe_router_load_balancing_type": "sinkhorn"},
            "top-1 softmax, sinkhorn in a list": {
                **top1,
                "moe_router_load_balancing_type": ["sinkhorn"],
                "moe_aux_loss_coeff": [0.0],
            },
            "group topk without groups": {"moe_router_group_topk": 1, "moe_router_num_groups": None},
            "group topk with limited devices": {
                "moe_router_group_topk": 1,
                "moe_router_num_groups": 2,
                "num_moe_experts": 4,
                "moe_router_topk_limited_devices": 1,
            },
            "group topk above groups": {
                "moe_router_group_topk": 3,
                "moe_router_num_groups": 2,
                "num_moe_experts": 4,
            },
            "groups not dividing experts": {
                "moe_router_group_topk": 1,
                "moe_router_num_groups": 3,
                "num_moe_experts": 4,
            },
            "groups without experts": {**no_experts, "moe_router_group_topk": 1, "moe_router_num_groups": 2},
            "limited devices alone": {"moe_router_group_topk": None, "moe_router_topk_limited_devices": 2},
            "allgather with variable lengths": {
                "moe_token_dispatcher_type": "allgather",
                "moe_enable_deepep": False,
                "variable_seq_lengths": True,
                "moe_shared_expert_overlap": False,
                "moe_router_padding_for_quantization": False,
            },
        },
    )


def _cuda_graphs(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    n = kw["num_layers"]
    impl = pick(draw, "local", "transformer_engine", "none")
    moe = draw(st.booleans())
    dropping = False
    if moe:
        freq = pick(draw, 1, 2, [1, 0] * (n // 2) or [1])
        kw.update(
            num_moe_experts=4,
            add_bias_linear=False,
            moe_layer_freq=freq,
            moe_token_dispatcher_type="alltoall",
        )
        dropping = draw(st.booleans())
        if dropping:
            kw.update(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    if impl == "local" and draw(st.integers(0, 3)) == 0:
        kw["enable_cuda_graph"] = True  # the deprecated spelling of cuda_graph_impl="local"
    else:
        kw["cuda_graph_impl"] = impl
    scopes: list[Any] = ["full", [], "attn", "attn,mamba"]
    if impl == "local":
        scopes.append("full_iteration")
    freq = kw.get("moe_layer_freq", 1)
    if not moe or freq == 2 or (isinstance(freq, list) and 0 in freq):  # some dense layers
        scopes += ["mlp", "attn,mlp"]
    if moe:
        scopes += ["moe_router", "moe_router,moe_preprocess"] + (["moe"] if dropping else [])
        if impl == "local":
            scopes.append("moe_preprocess")
    kw["cuda_graph_scope"] = pick(draw, *scopes)
    kw["attention_dropout"] = pick(draw, 0.0, 0.1)
    kw["hidden_dropout"] = pick(draw, 0.0, 0.1)
    if draw(st.booleans()):
        kw.update(
            recompute_granularity="selective",
            attention_dropout=0.0,
            hidden_dropout=0.0,
            moe_grouped_gemm=True,
        )
        kw["recompute_modules"] = pick(draw, None, ["mlp"], ["core_attn", "layernorm"], ["moe_act"])
    elif kw["cuda_graph_scope"] == "full_iteration" and draw(st.booleans()):
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    selective = {
        "recompute_granularity": "selective",
        "recompute_method": None,
        "recompute_num_layers": None,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }
    moe4 = {"num_moe_experts": 4, "add_bias_linear": False, "moe_router_group_topk": None}
    local = {"cuda_graph_impl": "local", "enable_cuda_graph": False, "external_cuda_graph": False}
    te = {"cuda_graph_impl": "transformer_engine", "enable_cuda_graph": False, "external_cuda_graph": False}
    perturb(
        draw,
        kw,
        {
            "enable_cuda_graph with cuda_graph_impl": {"enable_cuda_graph": True, "cuda_graph_impl": "local"},
            "enable_cuda_graph alone": {"enable_cuda_graph": True, "cuda_graph_impl": "none"},
            "external_cuda_graph alone": {"external_cuda_graph": True, "cuda_graph_impl": "none"},
            "enable and external": {
                "enable_cuda_graph": True,
                "external_cuda_graph": True,
                "cuda_graph_impl": "none",
            },
            "unknown scope": {"cuda_graph_scope": "attn,bogus"},
            "unknown scope, graphs off": {**local, "cuda_graph_impl": "none", "cuda_graph_scope": ["bogus"]},
            "space in scope": {"cuda_graph_scope": "attn, mamba"},
            "empty scope string": {"cuda_graph_scope": ""},
            "full with others": {"cuda_graph_scope": ["full", "attn"]},
            "te full_iteration": {**te, "cuda_graph_scope": "full_iteration"},
            "moe and moe_router": {**local, **moe4, "cuda_graph_scope": ["moe", "moe_router"]},
            "moe_preprocess alone, te": {**te, **moe4, "cuda_graph_scope": "moe_preprocess"},
            "moe_preprocess alone, local": {**local, **moe4, "cuda_graph_scope": "moe_preprocess"},
            "moe scope, dense": {
                **local,
                "num_moe_experts": None,
                "moe_router_group_topk": None,
                "cuda_graph_scope": "moe",
            },
            "moe_router scope, 1 expert": {
                **te,
                **moe4,
                "num_moe_experts": 1,
                "cuda_graph_scope": "moe_router",
            },
            "mlp scope, all moe": {**local, **moe4, "moe_layer_freq": 1, "cuda_graph_scope": "attn,mlp"},
            "mlp scope, all moe list": {
                **local,
                **moe4,
                "moe_layer_freq": [1] * max(n, 1),
                "cuda_graph_scope": "mlp",
            },
            "moe scope without padding": {
                **local,
                **moe4,
                "moe_expert_capacity_factor": None,
                "moe_pad_expert_input_to_capacity": False,
                "cuda_graph_scope": "moe",
            },
            "moe_preprocess with alltoall capacity": {
                **te,
                **moe4,
                "moe_token_dispatcher_type": "alltoall",
                "moe_expert_capacity_factor": 1.0,
                "moe_pad_expert_input_to_capacity": False,
                "moe_router_load_balancing_type": "aux_loss",
                "cuda_graph_scope": "moe_router,moe_preprocess",
            },
            "full recompute, attn scope": {
                **local,
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
                "cuda_graph_scope": "attn",
            },
            "graphed core_attn recompute with dropout": {
                **selective,
                "recompute_modules": ["core_attn"],
                "attention_dropout": 0.1,
                "cuda_graph_scope": pick(draw, "attn", [], "full"),
            },
            "core_attn recompute outside the graph": {
                **selective,
                "recompute_modules": ["core_attn"],
                "attention_dropout": 0.1,
                "cuda_graph_scope": "mamba",
            },
            "graphed mlp recompute with dropout": {
                **selective,
                "recompute_modules": ["mlp"],
                "hidden_dropout": 0.1,
                "cuda_graph_scope": [],
            },
            "graphed moe recompute with jitter": {
                **selective,
                "recompute_modules": ["moe"],
                "moe_input_jitter_eps": 0.01,
                "cuda_graph_scope": [],
            },
            "te moe recompute with moe_router": {
                **te,
                **moe4,
                **selective,
                "recompute_modules": ["moe"],
                "cuda_graph_scope": "moe_router",
            },
            "cuda graphs with cpu offloading": {"cpu_offloading": True, "cpu_offloading_num_layers": 0},
            # moe_layer_recompute turns on selective recompute of "moe" after the recompute checks
            "moe_layer_recompute, graphed, with dropout": {
                **selective,
                "recompute_granularity": None,
                "moe_layer_recompute": True,
                "recompute_modules": [],
                "hidden_dropout": 0.1,
                "cuda_graph_scope": [],
            },
            "moe_layer_recompute, outside the graph, with dropout": {
                **selective,
                "recompute_granularity": None,
                "moe_layer_recompute": True,
                "recompute_modules": [],
                "hidden_dropout": 0.1,
                "cuda_graph_scope": "attn",
            },
        },
    )


def _ep_overlap(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    dispatcher = pick(draw, "alltoall", "flex")
    kw.update(
        overlap_moe_expert_parallel_comm=True,
        num_moe_experts=4,
        add_bias_linear=False,
        expert_model_parallel_size=2,
        moe_token_dispatcher_type=dispatcher,
        moe_flex_dispatcher_backend=pick(draw, "hybridep", "deepep"),
    )
    kw["fp16"], kw["bf16"] = pick(draw, (False, True), (True, False))
    if not _uses_pipeline_split(kw):
        pp = pick(draw, 1, 2)
        kw["pipeline_model_parallel_size"] = pp
        if pp > 1:
            kw.update(
                pipeline_dtype="bfloat16",
                virtual_pipeline_model_parallel_size=2,
                mtp_num_layers=pick(draw, None, 1),
            )
    kw["delay_wgrad_compute"] = draw(st.booleans())
    kw["ep_overlap_early_attn_memory_release"] = draw(st.booleans())
    n = kw["num_layers"]
    quarter = [n // 4 + (i < n % 4) for i in range(4)]
    perturb(
        draw,
        kw,
        {
            "pp without vpp": {
                "pipeline_model_parallel_size": 2,
                "pipeline_dtype": "bfloat16",
                "virtual_pipeline_model_parallel_size": None,
            },
            "pp with vpp from the layout": {
                "pipeline_model_parallel_size": 2,
                "pipeline_dtype": "bfloat16",
                "virtual_pipeline_model_parallel_size": None,
                "mtp_num_layers": None,
                "num_layers_in_first_pipeline_stage": None,
                "num_layers_in_last_pipeline_stage": None,
                "account_for_embedding_in_pipeline_split": False,
                "account_for_loss_in_pipeline_split": False,
                "pipeline_model_parallel_layout": "E" + "|".join("t" * k for k in quarter) + "L",
            },
            "ep 1": {"expert_model_parallel_size": 1},
            "allgather": {"moe_token_dispatcher_type": "allgather", "variable_seq_lengths": False},
            "full recompute": {
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            },
            "recompute method": {
                "recompute_granularity": "selective",
                "recompute_method": "uniform",
                "recompute_num_layers": None,
            },
            "recompute layers": {
                "recompute_granularity": None,
                "recompute_method": None,
                "recompute_num_layers": 2,
            },
            "selective recompute": {
                "recompute_granularity": "selective",
                "recompute_method": None,
                "recompute_num_layers": None,
            },
            "no fp16/bf16": {"bf16": False, "fp16": False},
            "shared expert overlap": {
                "moe_shared_expert_intermediate_size": 64,
                "moe_shared_expert_overlap": True,
                "moe_token_dispatcher_type": "alltoall",
            },
            "2 mtp layers": {"mtp_num_layers": 2},
            "mtp without pp": {
                "mtp_num_layers": 1,
                "pipeline_model_parallel_size": 1,
                "virtual_pipeline_model_parallel_size": None,
            },
            "local cuda graphs": {"cuda_graph_impl": "local", "cuda_graph_scope": "attn"},
            "te cuda graphs on mlp": {
                "cuda_graph_impl": "transformer_engine",
                "cuda_graph_scope": "mlp",
                "moe_layer_freq": 2,
            },
            "te cuda graphs on attn": {
                "cuda_graph_impl": "transformer_engine",
                "cuda_graph_scope": "attn",
                "delay_wgrad_compute": False,
            },
            "delay without overlap": {
                "overlap_moe_expert_parallel_comm": False,
                "delay_wgrad_compute": True,
                "ep_overlap_early_attn_memory_release": False,
            },
            "delay with legacy grouped gemm": {
                "delay_wgrad_compute": True,
                "moe_use_legacy_grouped_gemm": True,
            },
            "early release without overlap": {
                "overlap_moe_expert_parallel_comm": False,
                "delay_wgrad_compute": False,
                "ep_overlap_early_attn_memory_release": True,
            },
            "no overlap": {
                "overlap_moe_expert_parallel_comm": False,
                "delay_wgrad_compute": False,
                "ep_overlap_early_attn_memory_release": False,
            },
        },
    )


_ACTIVATION_CHOICES = ("gelu", "silu", "relu", "quick_gelu", "squared_relu", "fast_gelu", "tanh")


def _fusions(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    activation = pick(draw, *_ACTIVATION_CHOICES)
    glu = draw(st.booleans())
    kw.update(activation_func=activation, gated_linear_unit=glu)
    if activation in ("gelu", "silu") and draw(st.booleans()):
        kw["bias_activation_fusion"] = True
        if activation == "gelu" and not glu:
            kw["add_bias_linear"] = True
    elif activation in ("gelu", "silu", "relu") and draw(st.booleans()):
        kw["use_te_activation_func"] = True
    if activation == "silu" and glu:
        kw["activation_func_fp8_input_store"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        kw.update(apply_rope_fusion=True, multi_latent_attention=True, rotary_interleaved=False)
    fusion = {"bias_activation_fusion": True, "use_te_activation_func": False, "glu_linear_offset": 0.0}
    perturb(
        draw,
        kw,
        {
            "fusion with another activation": {
                **fusion,
                "activation_func": pick(draw, "relu", "squared_relu", "fast_gelu", "tanh"),
            },
            "fusion with quick_gelu (GPT-OSS)": {
                **fusion,
                "activation_func": "quick_gelu",
                "gated_linear_unit": True,
                "glu_linear_offset": 1.0,
            },
            "fusion, gelu without bias": {
                **fusion,
                "activation_func": "gelu",
                "gated_linear_unit": False,
                "add_bias_linear": False,
            },
            "fusion, geglu without bias": {
                **fusion,
                "activation_func": "gelu",
                "gated_linear_unit": True,
                "add_bias_linear": False,
            },
            "fusion with glu offset": {**fusion, "activation_func": "silu", "glu_linear_offset": 1.0},
            "glu offset without fusion": {"bias_activation_fusion": False, "glu_linear_offset": 1.0},
            "fusion and te activation": {**fusion, "activation_func": "silu", "use_te_activation_func": True},
            "te activation, unsupported": {
                "bias_activation_fusion": False,
                "use_te_activation_func": True,
                "activation_func": pick(draw, "quick_gelu", "squared_relu", "tanh"),
            },
            "fp8 input store, gelu": {
                "activation_func_fp8_input_store": True,
                "activation_func": "gelu",
                "gated_linear_unit": True,
            },
            "fp8 input store, no glu": {
                "activation_func_fp8_input_store": True,
                "activation_func": "silu",
                "gated_linear_unit": False,
            },
            "rope fusion, mla interleaved": {
                "apply_rope_fusion": True,
                "multi_latent_attention": True,
                "rotary_interleaved": True,
            },
        },
    )


def _misc(draw: st.DrawFn, kw: dict[str, Any]) -> None:
    n = kw["num_layers"]
    divisors = [d for d in (1, 2, 3, 4) if n % d == 0]
    kw["no_rope_freq"] = pick(draw, None, pick(draw, *divisors), [0, 1] * (n // 2) + [0] * (n % 2))
    if not kw["no_rope_freq"]:
        kw["flash_decode"] = draw(st.booleans())
    optimized = {
        "transformer_impl": "inference_optimized",
        "normalization": "RMSNorm",
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "layernorm_zero_centered_gamma": False,
        "use_kitchen": False,
    }
    if draw(st.booleans()):
        kw.update(optimized, inference_fuse_tp_communication=draw(st.booleans()))
    else:
        kw["transformer_impl"] = pick(draw, "transformer_engine", "local")
    perturb(
        draw,
        kw,
        {
            "no rope with flash decode": {"no_rope_freq": pick(draw, *divisors), "flash_decode": True},
            "no rope 0 with flash decode": {"no_rope_freq": 0, "flash_decode": True},
            "no rope [] with flash decode": {"no_rope_freq": [], "flash_decode": True},
            "no rope not dividing": {"no_rope_freq": n + 1},
            "no rope list too long": {"no_rope_freq": [0] * (n + 1)},
            "optimized with LayerNorm": {**optimized, "normalization": "LayerNorm"},
            "optimized with bias": {**optimized, "add_bias_linear": True},
            "optimized with qkv bias": {**optimized, "add_qkv_bias": True},
            "optimized with zero-centered gamma": {**optimized, "layernorm_zero_centered_gamma": True},
            "optimized with kitchen": {**optimized, "use_kitchen": True},
            "fused tp communication, not optimized": {
                "transformer_impl": "transformer_engine",
                "inference_fuse_tp_communication": True,
            },
            "0 layers": {"num_layers": 0},
            "-2 layers": {"num_layers": -2},
        },
    )


# Applied in this order (the pipeline group may set num_layers, which later groups read).
GROUPS = {
    "parallelism": _parallelism,
    "pipeline": _pipeline,
    "attention": _attention,
    "precision": _precision,
    "recompute": _recompute,
    "offloading": _offloading,
    "moe": _moe,
    "cuda_graphs": _cuda_graphs,
    "ep_overlap": _ep_overlap,
    "fusions": _fusions,
    "misc": _misc,
}


def _base(draw: st.DrawFn) -> dict[str, Any]:
    heads = pick(draw, 1, 2, 3, 4, 6, 8, 12, 16)
    return {
        "num_layers": pick(draw, 1, 2, 3, 4, 6, 8, 12),
        "num_attention_heads": heads,
        "hidden_size": heads * pick(draw, 8, 16),
        "tensor_model_parallel_size": pick(draw, *[tp for tp in (1, 2, 4, 8) if heads % tp == 0]),
    }


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """Schema-form overrides: a base architecture plus one to three feature groups."""
    kw = _base(draw)
    count = pick(draw, 1, 1, 1, 2, 2, 3)
    chosen = set(draw(st.lists(st.sampled_from(list(GROUPS)), min_size=count, max_size=count, unique=True)))
    for name, group in GROUPS.items():
        if name in chosen:
            group(draw, kw)
    return kw


# ---- the differential test --------------------------------------------------------------------


def _model_config_errors(overrides: dict[str, Any]) -> list[str]:
    try:
        ModelConfig.model_validate(copy.deepcopy(overrides))
    except ValidationError as error:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    return []


def compare(overrides: dict[str, Any]) -> list[RuleViolation]:
    """Assert check_rules, ModelConfig and megatron agree on ``overrides``; return the violations."""
    violations = check_rules(schema_namespace(overrides))
    error = megatron_error(overrides)
    assert bool(violations) == (error is not None), (
        f"check_rules and megatron disagree on {overrides!r}:\n"
        f"  check_rules: {[v.message for v in violations]}\n"
        f"  megatron: {error!r}"
    )
    model_errors = _model_config_errors(overrides)  # a ValidationError is a rejection
    assert bool(model_errors) == (error is not None), (
        f"ModelConfig and megatron disagree on {overrides!r}:\n"
        f"  ModelConfig: {model_errors}\n"
        f"  megatron: {error!r}"
    )
    return violations


_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
}


def test_rules_agree_with_megatron() -> None:
    """Random combinations of the feature groups: check_rules, ModelConfig and megatron agree."""
    tally = {"rejected": 0, "accepted": 0, "environment": 0}
    blamed: set[str] = set()  # the fields the violations are attached to

    @settings(max_examples=500, **_SETTINGS)
    @given(configs())
    def check(overrides: dict[str, Any]) -> None:
        if environment_dependent(overrides) is not None:
            tally["environment"] += 1
            assume(False)
        violations = compare(overrides)
        tally["rejected" if violations else "accepted"] += 1
        blamed.update(v.fields[0] for v in violations)

    check()
    compared = tally["rejected"] + tally["accepted"]
    assert compared >= 400, tally
    assert tally["rejected"] >= compared // 4, tally  # both verdicts are common
    assert tally["accepted"] >= compared // 4, tally
    assert tally["environment"] <= compared // 5, tally
    assert len(blamed) >= 40, sorted(blamed)  # and the rejections come from many different rules


def _run_group(group: str, examples: int) -> set[bool]:
    """Draw ``examples`` configs from one group on a plain base; check the verdicts agree."""
    outcomes: set[bool] = set()

    @settings(max_examples=examples, **_SETTINGS)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        kw = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "tensor_model_parallel_size": 2}
        GROUPS[group](data.draw, kw)
        if environment_dependent(kw) is None:
            outcomes.add(bool(compare(kw)))

    run()
    return outcomes


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_perturbation(group: str) -> None:
    """Every named perturbation of a group, forced in turn, on varied valid configs of the group."""
    names: set[str] = set()
    _PERTURBATION["seen"] = names
    try:
        outcomes = _run_group(group, 40)
    finally:
        _PERTURBATION["seen"] = None
    assert names
    for name in sorted(names):
        _PERTURBATION["option"] = name
        try:
            outcomes |= _run_group(group, 8)
        finally:
            _PERTURBATION["option"] = None
    assert outcomes == {True, False}


@pytest.mark.parametrize(
    "layout",
    [
        "Et*3|(t|)*2,t*3L",
        "Et*3|(tt|)*2tL",
        "E(t)*3|t*5L",
        "E((t)*2)*2|t*4L",
        "(Ett|)*1t*6L",
        "Et*8|L",
        "Et*4,|,t*4L",
        "Et*4|t*4L|",
        "E t*4|t*4L",
        "et*4|t*4L",
        "Et*04|t*4L",
        "Et*4|t*2mL",
        [["embedding", "decoder", "decoder"], ["DECODER"] * 6 + ["loss "]],
        [["embedding"] + ["decoder"] * 8, []],
        [["embedding"] + ["decoder"] * 8, ["loss"]],
        [["E", "t"], ["t"] * 7 + ["L"]],
    ],
)
def test_layout_syntax_agrees(layout: Any) -> None:
    """The layout syntax (repetition, commas, case, empty stages) is read as megatron reads it."""
    base = {"num_layers": 8, "hidden_size": 64, "num_attention_heads": 4}
    compare(
        {
            **base,
            "pipeline_model_parallel_size": 2,
            "pipeline_dtype": "bfloat16",
            "pipeline_model_parallel_layout": layout,
        }
    )


# ---- rule messages, group by group ------------------------------------------------------------


def violations_for(**overrides: Any) -> list[RuleViolation]:
    """check_rules on a small model plus ``overrides`` (megatron and ModelConfig must agree)."""
    return compare({"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, **overrides})


def only(violations: list[RuleViolation]) -> RuleViolation:
    assert len(violations) == 1, violations
    return violations[0]


def test_defaults_pass() -> None:
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


def test_attention_messages() -> None:
    gdn = {"experimental_attention_variant": "gated_delta_net", "linear_attention_freq": 4}
    v = only(violations_for(**gdn, linear_num_key_heads=4, linear_num_value_heads=6))
    assert v.message == "linear_num_value_heads (6) must be a multiple of linear_num_key_heads (4)"
    v = only(violations_for(**gdn, context_parallel_size=2))
    assert v.fields[0] == "context_parallel_size" and "(2)" in v.message
    v = only(violations_for(num_attention_heads=0))
    assert v.fields == ("num_attention_heads", "kv_channels", "hidden_size")
    assert violations_for(num_attention_heads=0, kv_channels=16) == []  # nothing else divides by it
    v = only(violations_for(multi_latent_attention=True, rotary_interleaved=True))
    assert v.fields == ("rotary_interleaved", "multi_latent_attention")


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


def test_model_config_reports_rule_errors_on_their_field() -> None:
    with pytest.raises(ValidationError) as raised:
        ModelConfig.model_validate(
            {"num_layers": 4, "hidden_size": 96, "num_attention_heads": 12, "tensor_model_parallel_size": 5}
        )
    errors = {e["loc"]: e["msg"] for e in raised.value.errors()}
    assert (
        "num_attention_heads (12) must be divisible by tensor_model_parallel_size (5)"
        in errors[("num_attention_heads",)]
    )
