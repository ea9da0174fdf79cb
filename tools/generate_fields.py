"""Generate bioconf/schema/megatron_fields.py from the installed megatron-core.

Reads megatron-core's ``TransformerConfig`` dataclass (``ModelParallelConfig`` included): each
field's type, default and the docstring written under it, maps the types that have no JSON form
to bioconf's names (dtypes, activations, enums), leaves out the ones that cannot be data
(arbitrary callables, context managers), and writes one plain annotated class (``MegatronFields``)
with one pydantic field per entry, which ``ModelConfig`` inherits.

    python tools/generate_fields.py            # rewrite the module
    python tools/generate_fields.py --check    # exit 1 if the checked-in module is stale

``tests/test_megatron_fields.py`` runs ``render()`` and compares it with the checked-in file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import sys
import textwrap
import types
import typing
from importlib.metadata import version
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "bioconf" / "schema" / "megatron_fields.py"

# Fields that have no JSON form, with the reason the README lists.
NO_JSON_FORM = {
    "init_method": "an arbitrary callable (weight initializer)",
    "output_layer_init_method": "an arbitrary callable (weight initializer)",
    "embedding_init_method": "an arbitrary callable (weight initializer)",
    "timers": "a runtime object (megatron timers)",
    "finalize_model_grads_func": "an arbitrary callable set by the training loop",
    "grad_scale_func": "an arbitrary callable set by the training loop",
    "no_sync_func": "an arbitrary callable set by the training loop",
    "grad_sync_func": "an arbitrary callable set by the training loop",
    "param_sync_func": "an arbitrary callable set by the training loop",
    "_cpu_offloading_context": "a context manager created at run time",
    "quant_recipe": "a RecipeConfig object loaded from its own YAML file",
}

# Form groups (x-group). The first matching rule wins; names are matched exactly, then by prefix/infix.
GROUP_EXACT = {
    "architecture": {
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "kv_channels",
        "num_query_groups",
        "hidden_dropout",
        "attention_dropout",
        "normalization",
        "layernorm_epsilon",
        "layernorm_zero_centered_gamma",
        "activation_func",
        "activation_func_clamp_value",
        "gated_linear_unit",
        "add_bias_linear",
        "add_qkv_bias",
        "init_method_std",
        "embedding_init_method_std",
        "apply_residual_connection_post_layernorm",
        "fp32_residual_connection",
        "mtp_num_layers",
        "mtp_loss_scaling_factor",
        "is_hybrid_model",
        "mamba_state_dim",
        "mamba_head_dim",
        "mamba_num_groups",
        "mamba_num_heads",
        "use_mamba_mem_eff_path",
        "calculate_per_token_loss",
        "multi_latent_attention",
        "test_mode",
        "heterogeneous_block_specs",
        "hetereogenous_dist_checkpoint",
        "use_te_rng_tracker",
        "init_model_with_meta_device",
        "glu_linear_offset",
    },
    "precision": {
        "fp16",
        "bf16",
        "params_dtype",
        "pipeline_dtype",
        "autocast_dtype",
        "first_last_layers_bf16",
        "num_layers_at_start_in_bf16",
        "num_layers_at_end_in_bf16",
    },
    "parallelism": {
        "sequence_parallel",
        "defer_embedding_wgrad_compute",
        "wgrad_deferral_limit",
        "microbatch_group_size_per_vp_stage",
        "overlap_p2p_comm",
        "batch_p2p_comm",
        "batch_p2p_sync",
        "use_ring_exchange_p2p",
        "deallocate_pipeline_outputs",
        "variable_seq_lengths",
        "overlap_p2p_comm_warmup_flush",
        "align_param_gather",
        "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split",
        "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage",
        "hybrid_context_parallel",
        "max_seqlen_per_dp_cp_rank",
        "cp_comm_type",
    },
}
GROUP_PREFIXES = [
    ("moe", ("moe_",)),
    ("precision", ("fp8", "fp4", "first_last_layers", "keep_fp8", "use_kitchen", "kitchen_")),
    (
        "parallelism",
        (
            "tensor_model_parallel",
            "pipeline_model_parallel",
            "virtual_pipeline",
            "context_parallel",
            "hierarchical_context",
            "expert_model_parallel",
            "expert_tensor_parallel",
            "tp_comm",
            "cross_entropy",
            "enable_autocast",
            "pipeline_",
        ),
    ),
    (
        "attention",
        (
            "attention",
            "softmax",
            "window_",
            "qk_",
            "rotary",
            "rope",
            "no_rope",
            "mrope",
            "apply_rope",
            "multi_latent",
            "experimental_attention",
            "dsa_",
            "linear_",
            "q_lora",
            "kv_lora",
            "qk_head",
            "v_head",
            "masked_softmax",
        ),
    ),
    (
        "fusions",
        (
            "bias_",
            "persist_layer_norm",
            "memory_efficient_layer_norm",
            "gradient_accumulation_fusion",
            "cuda_graph",
            "fused",
            "use_fused",
            "external_cuda_graph",
            "enable_cuda_graph",
            "flash_decode",
            "cpu_offloading",
            "symmetric_ar",
            "disable_parameter_transpose_cache",
            "inference_",
            "use_inference",
            "transformer_impl",
            "offload",
            "fine_grained_activation",
            "delay_offload",
        ),
    ),
]
# Fields a user typically touches (x-level "basic"); all others are "advanced".
BASIC = {
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "hidden_dropout",
    "attention_dropout",
    "normalization",
    "layernorm_epsilon",
    "activation_func",
    "gated_linear_unit",
    "add_bias_linear",
    "init_method_std",
    "position_embedding_type",
    "bf16",
    "fp16",
    "params_dtype",
    "pipeline_dtype",
    "autocast_dtype",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "sequence_parallel",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "attention_backend",
}


def group_of(name: str) -> str:
    for group, names in GROUP_EXACT.items():
        if name in names:
            return group
    for group, prefixes in GROUP_PREFIXES:
        if name.startswith(prefixes):
            return group
    return "other"


def field_docstrings(cls: type) -> dict[str, str]:
    """The string literal written right under each annotated field in the class body(ies)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__.startswith("bioconf"):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


class Unsupported(Exception):
    """A type with no JSON form that is not listed in NO_JSON_FORM."""


def annotation(tp: object, name: str) -> str:
    """The pydantic annotation (as source text) for a megatron field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (bool, int, float, str):
        return tp.__name__
    if tp is type(None):
        return "None"
    if getattr(tp, "__module__", None) == "torch" and getattr(tp, "__name__", None) == "dtype":
        return "DType"
    if name == "activation_func":
        return "Activation"
    if tp is list and name == "pipeline_model_parallel_layout":
        return "list[list[str]]"  # stages, each a list of layer-type names
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if name == "cuda_graph_scope":
            return "str"  # megatron also accepts scope names that are not members ("full")
        return "Literal[" + ", ".join(repr(m) for m in tp.__members__) + "]"
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (typing.Union, types.UnionType):
        parts: list[str] = []
        for arg in args:
            # pipeline_model_parallel_layout's PipelineParallelLayerLayout has its own str/list forms;
            # CudaGraphScope members are spelled by name, i.e. as str.
            if isinstance(arg, type) and arg.__name__ == "PipelineParallelLayerLayout":
                continue
            text = annotation(arg, name)
            if text not in parts:
                parts.append(text)
        return " | ".join(parts)
    if origin in (list, typing.List):  # noqa: UP006 - megatron spells some as typing.List
        return f"list[{annotation(args[0], name)}]"
    if origin in (tuple, typing.Tuple):  # noqa: UP006
        # JSON has no tuples: accept a list (or tuple); the items stay strict.
        return "Annotated[tuple[" + ", ".join(annotation(a, name) for a in args) + "], Strict(False)]"
    raise Unsupported(f"{name}: no JSON form for {tp!r}; add it to NO_JSON_FORM or map it")


def default_source(f: dataclasses.Field) -> tuple[str, str]:
    """(keyword, source) for the pydantic Field's default, e.g. ('default', '1')."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if value == []:
            # A factory, not default=[]: pydantic deep-copies an unhashable default for every config
            # that leaves the field out (copy.deepcopy: ~1 us a field). The JSON Schema still shows it.
            return "default_factory", "list"
        raise Unsupported(f"{f.name}: default_factory producing {value!r}")
    value = f.default
    if getattr(type(value), "__name__", None) == "dtype":
        return "default", repr(str(value).removeprefix("torch."))
    if isinstance(value, enum.Enum):
        return "default", repr(value.name)
    if callable(value):
        return "default", repr(value.__name__)
    return "default", repr(value)


def render() -> str:
    from megatron.core.transformer.transformer_config import TransformerConfig

    docs = field_docstrings(TransformerConfig)
    hints = typing.get_type_hints(TransformerConfig)
    lines = [
        "# GENERATED FILE - do not edit by hand.",
        f"# Generated by tools/generate_fields.py from megatron-core {version('megatron-core')}.",
        "# Regenerate with `make schema-table` (or `python tools/generate_fields.py`).",
        '"""One pydantic field per JSON-expressible field of megatron-core\'s TransformerConfig.',
        "",
        "Names, types, defaults and descriptions follow megatron-core; dtypes, the activation and enums",
        "are held by name (see bioconf.schema.names). Fields with no JSON form are listed in NO_JSON_FORM.",
        '"""',
        "",
        "# No `from __future__ import annotations`: pydantic would compile every annotation string at",
        "# import time, which is a tenth of the CLI's start-up.",
        "from typing import Annotated, Literal",
        "",
        "from pydantic import Field, Strict",
        "",
        "from bioconf.schema.names import Activation, DType",
        "",
        f"MEGATRON_CORE_VERSION = {version('megatron-core')!r}",
        "",
        "# TransformerConfig fields that cannot be written as data, and why.",
        "NO_JSON_FORM: dict[str, str] = {",
        *(f"    {k!r}: {v!r}," for k, v in NO_JSON_FORM.items()),
        "}",
        "",
        "",
        "class MegatronFields:",
        '    """The TransformerConfig fields (ModelParallelConfig\'s included), in megatron\'s order."""',
        "",
        "    # A plain class, not a BaseModel: ModelConfig collects these fields once, where a model base",
        "    # would have pydantic collect (and copy) all of them twice at import time.",
        "",
    ]
    dtype_fields: list[str] = []
    enum_fields: dict[str, tuple[str, str]] = {}
    for f in dataclasses.fields(TransformerConfig):
        if f.name in NO_JSON_FORM:
            continue
        kind, default = default_source(f)
        extra = {"x-group": group_of(f.name), "x-level": "basic" if f.name in BASIC else "advanced"}
        if kind == "default_factory":
            extra["default"] = []
        text = annotation(hints[f.name], f.name)
        if text.startswith("DType"):
            dtype_fields.append(f.name)
        if (
            isinstance(hints[f.name], type)
            and issubclass(hints[f.name], enum.Enum)
            and text.startswith("Literal")
        ):
            enum_fields[f.name] = (hints[f.name].__module__, hints[f.name].__qualname__)
        if f.default is None and "None" not in text:
            text += " | None"  # megatron annotates some None-defaulted fields without Optional
        lines.append(f"    {f.name}: {text} = Field(")
        lines.append(f"        {kind}={default},")
        lines.append(f"        description={docs.get(f.name, '')!r},")
        lines.append(f"        json_schema_extra={extra!r},")
        lines.append("    )")
    lines.append("")
    lines.append("MEGATRON_FIELD_NAMES = frozenset(MegatronFields.__annotations__)")
    lines.append("")
    lines.append("# Fields megatron holds as torch.dtype (the schema holds the canonical name).")
    lines.append(f"DTYPE_FIELDS = frozenset({sorted(dtype_fields)!r})")
    lines.append(
        "# Fields megatron holds as enum members: field -> (module, enum class); the schema holds the name."
    )
    lines.append(f"ENUM_FIELDS = {enum_fields!r}")
    return "\n".join(lines) + "\n"


def format_source(source: str) -> str:
    """Format with ruff so the checked-in file is stable under `ruff format`."""
    import subprocess

    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run(
        [str(ruff), "format", "--stdin-filename", str(TARGET), "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in module is stale")
    args = parser.parse_args()
    source = format_source(render())
    if args.check:
        if TARGET.read_text() != source:
            print(f"{TARGET} is stale; run `make schema-table`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(source)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
