"""Which value wins when a model starts from a checkpoint, and does the checkpoint fit.

BioNeMo's rule: every field comes from the checkpoint except ``override_parent_fields``. A fine-tune
config that sets ``hidden_dropout: 0.2`` silently runs with the checkpoint's value. ``resolve``
merges a config with a checkpoint's settings under either rule and says where each value came from:

- policy ``"seed"`` keeps exactly ``override_parent_fields`` (BioNeMo's rule);
- policy ``"explicit"`` (the default) also keeps every field the config sets explicitly.

The merge is validated as a whole, and a kept field that changes a weight's shape (``hidden_size``,
``vocab_size``, ...) so that the checkpoint's weights would not load is an error before any weight
is touched, unless those weights are skipped (``initial_ckpt_skip_keys_with_these_prefixes``).
Plain data only: nothing here imports torch, megatron, fiddle or nemo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from pydantic import ValidationError

from bioconf.schema.errors import ConfigError, ConfigIssue, ConfigReadError, issues_from_validation
from bioconf.schema.model import MODEL_CLS_ALIASES, ModelConfig
from bioconf.schema.nemo_context import CheckpointConfig, read_checkpoint_config

Policy = Literal["seed", "explicit"]
POLICIES: Final[tuple[str, ...]] = ("seed", "explicit")

Source = Literal["user", "default", "checkpoint", "derived"]
SOURCES: Final[tuple[str, ...]] = ("user", "checkpoint", "derived", "default")  # in listing order

# ---- what megatron derives ------------------------------------------------------------------------

# Fields TransformerConfig.__post_init__ fills in when they are None, computed from other fields. The
# merged config keeps None (megatron derives them at materialization, from the final values); the
# result shows the derived value. Only the derivations that size weights are listed: megatron's
# others (autocast_dtype, expert_tensor_parallel_size, embedding_init_method_std) size nothing.
_DERIVED: Final[dict[str, Callable[[ModelConfig], Any]]] = {
    "ffn_hidden_size": lambda c: 4 * c.hidden_size,
    "kv_channels": lambda c: c.hidden_size // c.num_attention_heads,
    "num_query_groups": lambda c: c.num_attention_heads,
    "moe_ffn_hidden_size": lambda c: (
        effective(c, "ffn_hidden_size") if c.num_moe_experts is not None else None
    ),
}


def effective(config: ModelConfig, name: str) -> Any:
    """The value megatron will use for ``name``: the config's, or the derived one when it is None."""
    value = getattr(config, name)
    if value is None and name in _DERIVED:
        return _DERIVED[name](config)
    return value


# ---- which weights a field shapes -------------------------------------------------------------------

# The fields that fix a weight's shape, its layout or whether it exists, and the weights each one
# shapes, as prefixes of the keys of megatron-core's GPTModel / BertModel state dict: the keys of
# ``model.sharded_state_dict()`` (one entry per layer), which initial_ckpt_skip_keys_with_these_prefixes
# is matched against. Placeholders: "*" is every weight of the model; "{block}" is its transformer
# block, "decoder" in GPTModel and "encoder" in BertModel; "{layer}" is each layer of that block,
# "{block}.layers.0.", "{block}.layers.1.", ... (skipping "decoder.layers." or every layer counts).
# tests/test_resolve.py builds tiny models with megatron-core 0.16.1's local layer specs and checks
# that changing a field changes only weights under its prefixes, and that the rest change none.
# Not here: parallel sizes and dtypes (distributed checkpoints reshard and cast), transformer_impl and
# moe_grouped_gemm (module layouts whose sharded state dicts name the same checkpoint tensors), rotary
# settings (no weights), and what changes computation only (dropout, epsilon, activation, fusions, ...).
SHAPE_PREFIXES: Final[dict[str, tuple[str, ...]]] = {
    "model_cls": ("*",),  # gpt against bert; a user class is compared with nothing
    "hidden_size": ("*",),
    "num_layers": ("{block}.layers.",),
    "normalization": ("{layer}", "{block}.final_layernorm.", "lm_head."),  # LayerNorm has a bias
    # attention: linear_qkv (its bias also follows add_bias_linear), linear_proj, q/k_layernorm,
    # core_attention.softmax_offset. Heads and groups also fix how linear_qkv splits into heads: with
    # kv_channels derived, 4 -> 8 heads keeps its shape but not its meaning.
    "num_attention_heads": ("{layer}self_attention.",),
    "num_query_groups": ("{layer}self_attention.",),
    "kv_channels": ("{layer}self_attention.",),
    "add_qkv_bias": ("{layer}self_attention.linear_qkv.",),
    "attention_output_gate": ("{layer}self_attention.linear_qkv.",),
    "qk_layernorm": ("{layer}self_attention.",),
    "softmax_type": ("{layer}self_attention.",),
    "multi_latent_attention": ("{layer}self_attention.",),
    "dsa_indexer_n_heads": ("{layer}self_attention.",),
    "dsa_indexer_head_dim": ("{layer}self_attention.",),
    "experimental_attention_variant": ("{layer}",),
    "linear_attention_freq": ("{layer}",),
    "linear_conv_kernel_dim": ("{layer}",),
    "linear_key_head_dim": ("{layer}",),
    "linear_value_head_dim": ("{layer}",),
    "linear_num_key_heads": ("{layer}",),
    "linear_num_value_heads": ("{layer}",),
    # MLP and MoE: linear_fc1 / linear_fc2, router (and its expert_bias), experts, shared_experts
    "ffn_hidden_size": ("{layer}mlp.",),
    "gated_linear_unit": ("{layer}mlp.",),
    "add_bias_linear": ("{layer}self_attention.", "{layer}mlp."),
    "num_moe_experts": ("{layer}mlp.",),
    "moe_ffn_hidden_size": ("{layer}mlp.",),
    "moe_layer_freq": ("{layer}mlp.",),
    "moe_shared_expert_intermediate_size": ("{layer}mlp.",),
    "moe_shared_expert_gate": ("{layer}mlp.",),
    "moe_router_enable_expert_bias": ("{layer}mlp.",),
    "moe_latent_size": ("{layer}mlp.",),
    # embeddings and heads
    "vocab_size": ("embedding.word_embeddings.", "output_layer."),
    "seq_length": ("embedding.position_embeddings.",),
    "position_embedding_type": ("embedding.position_embeddings.",),
    "num_tokentypes": ("embedding.tokentype_embeddings.",),
    "share_embeddings_and_output_weights": ("output_layer.",),
    "add_binary_head": ("binary_head.", "pooler."),
    "mtp_num_layers": ("mtp.",),
    # Mamba mixers: only a user model class (MambaModel and the like) builds them
    "mamba_state_dim": ("{layer}",),
    "mamba_head_dim": ("{layer}",),
    "mamba_num_groups": ("{layer}",),
    "mamba_num_heads": ("{layer}",),
}


def _always(c: ModelConfig) -> bool:
    return True


def _learned_positions(c: ModelConfig) -> bool:
    return c.position_embedding_type == "learned_absolute"


def _has_experts(c: ModelConfig) -> bool:
    return c.num_moe_experts is not None


def _dsa(c: ModelConfig) -> bool:
    return c.experimental_attention_variant == "dsa"


def _gated_delta_net(c: ModelConfig) -> bool:
    return c.experimental_attention_variant == "gated_delta_net"


def _user_model_class(c: ModelConfig) -> bool:
    return c.model_cls not in MODEL_CLS_ALIASES


# Shape fields that size weights only in some models: the condition on the model being built.
_SHAPES_ONLY_WHEN: Final[dict[str, Callable[[ModelConfig], bool]]] = {
    "seq_length": _learned_positions,
    "moe_ffn_hidden_size": _has_experts,
    "moe_layer_freq": _has_experts,
    "moe_shared_expert_intermediate_size": _has_experts,
    "moe_shared_expert_gate": _has_experts,
    "moe_router_enable_expert_bias": _has_experts,
    "moe_latent_size": _has_experts,
    "dsa_indexer_n_heads": _dsa,
    "dsa_indexer_head_dim": _dsa,
    "linear_attention_freq": _gated_delta_net,
    "linear_conv_kernel_dim": _gated_delta_net,
    "linear_key_head_dim": _gated_delta_net,
    "linear_value_head_dim": _gated_delta_net,
    "linear_num_key_heads": _gated_delta_net,
    "linear_num_value_heads": _gated_delta_net,
    "mamba_state_dim": _user_model_class,
    "mamba_head_dim": _user_model_class,
    "mamba_num_groups": _user_model_class,
    "mamba_num_heads": _user_model_class,
}

# The top-level weights of the models bioconf builds (every state-dict key starts with one) and
# whether the model being built has them: GPTModel has no output_layer when it shares the word
# embeddings, BertModel keeps its output_layer.bias either way.
_BLOCK: Final[dict[str, str]] = {"gpt": "decoder", "bert": "encoder"}
_MODULES: Final[dict[str, dict[str, Callable[[ModelConfig], bool]]]] = {
    "gpt": {
        "embedding.word_embeddings.": _always,
        "embedding.position_embeddings.": _learned_positions,
        "decoder.": _always,
        "output_layer.": lambda c: not c.share_embeddings_and_output_weights,
        "mtp.": lambda c: bool(c.mtp_num_layers),
    },
    "bert": {
        "embedding.word_embeddings.": _always,
        "embedding.position_embeddings.": _learned_positions,
        "embedding.tokentype_embeddings.": lambda c: c.num_tokentypes > 0,
        "encoder.": _always,
        "lm_head.": _always,
        "output_layer.": _always,
        "binary_head.": lambda c: c.add_binary_head,
        "pooler.": lambda c: c.add_binary_head,
    },
}

# Shape fields whose None means "not recorded" (the model cannot be built without them), not a shape.
_UNRECORDED_WHEN_NONE: Final[frozenset[str]] = frozenset({"vocab_size", "seq_length"})


def shaped_weights(config: ModelConfig, name: str) -> tuple[str, ...] | None:
    """The key prefixes of the weights field ``name`` shapes in the model ``config`` builds (empty when
    it builds none of them); None when bioconf cannot tell (a user model class)."""
    family = config.model_cls
    if family not in _MODULES:
        return None
    present = [module for module, exists in _MODULES[family].items() if exists(config)]
    block = _BLOCK[family]
    prefixes: list[str] = []
    for pattern in SHAPE_PREFIXES[name]:
        if pattern == "*":
            prefixes.extend(present)
        elif "{layer}" in pattern:
            prefixes.extend(
                pattern.format(layer=f"{block}.layers.{i}.", block=block) for i in range(config.num_layers)
            )
        else:
            prefixes.append(pattern.format(block=block))
    return tuple(p for p in prefixes if any(p.startswith(module) for module in present))


def _skipped(prefix: str, skips: list[str]) -> bool:
    """The runtime skips a key that starts with a skip prefix: a broader (or equal) skip covers ``prefix``."""
    return any(prefix.startswith(skip) for skip in skips)


# ---- errors -------------------------------------------------------------------------------------------


class CheckpointMismatchError(ConfigError):
    """The config builds weights of other shapes than the checkpoint holds: loading them would fail."""


class InvalidMergeError(ConfigError):
    """Config and checkpoint are each valid, but their merge breaks a megatron rule."""


# ---- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedConfig:
    """A config merged with the settings of the checkpoint it starts from, and where each value came from."""

    config: ModelConfig
    """The merged config, validated; fields megatron derives stay None here."""
    sources: dict[str, Source]
    """Every field's source: "user", "default", "checkpoint" or "derived"."""
    keep: tuple[str, ...]
    """The effective keep-list: what the runtime's load_settings_from_checkpoint is given as its
    override_parent_fields."""
    policy: Policy
    checkpoint: CheckpointConfig
    derived: dict[str, Any]
    """The values megatron will derive, for the fields whose source is "derived"."""
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the checkpoint, the policy, the keep-list, every field not left to its default
        (value and source), the checkpoint fields bioconf does not model, the notes, the fingerprint."""
        data = self.config.to_dict()
        return {
            "checkpoint": {
                "path": str(self.checkpoint.path),
                "class": self.checkpoint.class_path,
                "class_is_bioconf": self.checkpoint.class_is_bioconf,
            },
            "policy": self.policy,
            "keep": list(self.keep),
            "fields": {
                name: {"value": self.derived.get(name, data[name]), "source": source}
                for name, source in self.sources.items()
                if source != "default"
            },
            "unknown_checkpoint_fields": self.checkpoint.unknown_fields,
            "notes": list(self.notes),
            "fingerprint": self.config.fingerprint(),
        }

    def _repr_html_(self) -> str:
        """Jupyter: every value not left to its default, grouped, with its source; then the notes."""
        from html import escape

        from bioconf.schema.display import fields_table

        fields = self.to_dict()["fields"]
        title = f"Resolved against {self.checkpoint.path.parent.parent} (policy {self.policy})"
        table = fields_table(
            title, {n: f["value"] for n, f in fields.items()}, {n: f["source"] for n, f in fields.items()}
        )
        return table + "".join(f"<p>note: {escape(note)}</p>" for note in self.notes)


# ---- resolve ------------------------------------------------------------------------------------------


def keep_list(config: ModelConfig, policy: Policy = "explicit") -> tuple[str, ...]:
    """The fields whose value in ``config`` wins over the checkpoint's: ``override_parent_fields``, and
    under "explicit" also every explicitly set field (appended in schema order)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    keep = list(config.override_parent_fields)
    if policy == "explicit":
        listed = set(keep)
        keep += [n for n in ModelConfig.model_fields if n in config.model_fields_set and n not in listed]
    return tuple(keep)


def resolve(
    config: ModelConfig,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    policy: Policy = "explicit",
) -> ResolvedConfig:
    """Merge ``config`` with the settings of the NeMo 2 checkpoint it starts from (``checkpoint_dir``,
    else ``config.initial_ckpt_path``): kept fields (``keep_list``) take the config's value, the others
    the checkpoint's. Raises ConfigReadError without a readable checkpoint context, InvalidMergeError
    when the merge breaks a megatron rule, CheckpointMismatchError when the weights would not fit."""
    keep = keep_list(config, policy)
    if checkpoint_dir is None:
        checkpoint_dir = config.initial_ckpt_path
    if checkpoint_dir is None:
        raise ConfigReadError(
            [
                ConfigIssue(
                    "no checkpoint to start from: the config sets no initial_ckpt_path and none was given",
                    "missing_checkpoint",
                    loc=("initial_ckpt_path",),
                )
            ]
        )
    ckpt = read_checkpoint_config(checkpoint_dir)
    kept = set(keep)
    data: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for name in ModelConfig.model_fields:
        side = config if name in kept else ckpt.config
        if name in side.model_fields_set:
            data[name] = getattr(side, name)
            sources[name] = "user" if side is config else "checkpoint"
        else:
            sources[name] = "default"
    merged = _validate_merge(data, sources, ckpt)
    derived = {}
    for name in _DERIVED:
        if getattr(merged, name) is None and (value := effective(merged, name)) is not None:
            derived[name] = value
            sources[name] = "derived"
    notes = _precedence_notes(config, merged, ckpt, kept, policy)
    notes += _check_shapes(merged, sources, ckpt, kept)
    return ResolvedConfig(
        config=merged,
        sources=sources,
        keep=keep,
        policy=policy,
        checkpoint=ckpt,
        derived=derived,
        notes=notes,
    )


_ORIGIN: Final[dict[str, str]] = {
    "user": "from this config",
    "checkpoint": "from the checkpoint",
    "default": "the default",
    "derived": "derived",
}


def _validate_merge(data: dict[str, Any], sources: dict[str, Source], ckpt: CheckpointConfig) -> ModelConfig:
    """The merged config; a violated rule names each value involved and where it came from."""
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        issues = []
        for issue in issues_from_validation(error, f"merged with {ckpt.path}"):
            if isinstance(issue.input, dict):
                involved = issue.input
            else:
                involved = {str(issue.loc[0]): issue.input} if issue.loc else {}
            origin = "; ".join(
                f"{name}={value!r} {_ORIGIN[sources.get(name, 'default')]}"
                for name, value in involved.items()
            )
            issues.append(replace(issue, message=f"{issue.message} [{origin}]"))
        raise InvalidMergeError(issues) from None


def _precedence_notes(
    config: ModelConfig, merged: ModelConfig, ckpt: CheckpointConfig, kept: set[str], policy: Policy
) -> list[str]:
    """What surprises people: values this config sets that the merge drops, and unknown defaults."""
    notes = []
    if not ckpt.class_is_bioconf:
        notes.append(
            f"the checkpoint's config class {ckpt.class_path} is not a bioconf class: the fields its "
            "io.json does not set take that class's own defaults at run time, which may differ from the "
            "values shown here as 'default'"
        )
    for name in ModelConfig.model_fields:
        if name in config.model_fields_set and name not in kept:
            ours, theirs = getattr(config, name), getattr(merged, name)
            if ours != theirs:
                whose = "the checkpoint's" if name in ckpt.config.model_fields_set else "the default"
                notes.append(
                    f"{name}: this config sets {ours!r}, but {whose} {theirs!r} is used "
                    f"(policy {policy!r} keeps only override_parent_fields)"
                )
    return notes


def _check_shapes(
    merged: ModelConfig, sources: dict[str, Source], ckpt: CheckpointConfig, kept: set[str]
) -> list[str]:
    """Raise CheckpointMismatchError for every shape field whose value would not fit the checkpoint's
    weights; return notes on the differences that do no harm and on what cannot be checked."""
    notes: list[str] = []
    issues: list[ConfigIssue] = []
    unknown: list[str] = []
    skips = merged.initial_ckpt_skip_keys_with_these_prefixes
    for name in SHAPE_PREFIXES:
        if name in _SHAPES_ONLY_WHEN and not _SHAPES_ONLY_WHEN[name](merged):
            continue
        if not ckpt.class_is_bioconf and name not in ckpt.config.model_fields_set:
            if name in kept:
                unknown.append(name)
            continue
        ours, theirs = effective(merged, name), effective(ckpt.config, name)
        if ours == theirs:
            continue
        if name == "model_cls" and not (ours in MODEL_CLS_ALIASES and theirs in MODEL_CLS_ALIASES):
            continue
        if name in _UNRECORDED_WHEN_NONE and None in (ours, theirs):
            notes.append(
                f"{name}: {ours!r} here, {theirs!r} in the checkpoint: not checked (None is unknown)"
            )
            continue
        difference = f"{ours!r} here ({_ORIGIN[sources[name]]}) but {theirs!r} in the checkpoint"
        weights = shaped_weights(merged, name)
        if merged.initial_ckpt_path_ignore_weights:
            notes.append(f"{name}: {difference}: fine, initial_ckpt_path_ignore_weights loads no weights")
        elif weights is None:
            why = f"{merged.model_cls} is not gpt or bert: bioconf cannot tell which weights it shapes"
            issues.append(_mismatch(name, ours, theirs, difference, why, ckpt))
        elif not weights:
            notes.append(f"{name}: {difference}: fine, the model built has none of the weights it shapes")
        elif loaded := [prefix for prefix in weights if not _skipped(prefix, skips)]:
            why = f"the weights it shapes would not load (not skipped: {_summary(loaded)})"
            issues.append(_mismatch(name, ours, theirs, difference, why, ckpt))
        else:
            notes.append(f"{name}: {difference}: fine, every weight it shapes is skipped")
    if unknown:
        notes.append(
            f"not checked against the checkpoint: {', '.join(unknown)} (kept here; its class "
            f"{ckpt.class_path} leaves them to its own defaults)"
        )
    if issues:
        raise CheckpointMismatchError(issues)
    return notes


def _mismatch(
    name: str, ours: Any, theirs: Any, difference: str, why: str, ckpt: CheckpointConfig
) -> ConfigIssue:
    return ConfigIssue(
        f"{difference}: {why}; use the checkpoint's value, or skip those weights with "
        "initial_ckpt_skip_keys_with_these_prefixes",
        "checkpoint_mismatch",
        loc=(name,),
        input={"config": ours, "checkpoint": theirs},
        source=str(ckpt.path),
    )


def _summary(prefixes: list[str]) -> str:
    """Per-layer prefixes folded for reading: "decoder.layers.{0..11}.mlp."."""
    folded: dict[str, list[int]] = {}
    for prefix in prefixes:
        head, sep, rest = prefix.partition(".layers.")
        index, dot, tail = rest.partition(".")
        if sep and dot and index.isdigit():
            folded.setdefault(f"{head}.layers.{{}}.{tail}", []).append(int(index))
        else:
            folded[prefix] = []
    parts = []
    for key, indices in folded.items():
        if not indices:
            parts.append(key)
        elif len(indices) == 1:
            parts.append(key.format(indices[0]))
        elif indices == list(range(indices[0], indices[-1] + 1)):
            parts.append(key.format(f"{{{indices[0]}..{indices[-1]}}}"))
        else:
            parts.append(key.format("{" + ",".join(map(str, indices)) + "}"))
    return ", ".join(parts)
