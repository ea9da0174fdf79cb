"""Which weights each config field shapes: the one table the resolver and the loader read.

A field that fixes a weight's shape, its layout or whether it exists maps to the prefixes of the
state-dict keys of megatron-core's GPTModel / BertModel it shapes: the keys of
``model.sharded_state_dict()`` (one entry per layer), which ``initial_ckpt_skip_keys_with_these_prefixes``
is matched against. The resolver uses it to tell, before any weight is read, whether a kept value
that differs from the checkpoint's would break the load; the loader to name the fields behind a
shape that does not fit. Plain data: nothing here imports torch or megatron.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, overload

from bioconf.checkpoint.layout import MODULE_PREFIX
from bioconf.schema.derived import effective
from bioconf.schema.families import FAMILIES
from bioconf.schema.model import MODEL_CLS_ALIASES, ModelConfig

# Placeholders: "*" is every weight of the model; "{block}" is its transformer
# block, "decoder" in GPTModel and "encoder" in BertModel; "{layer}" is each layer of that block,
# "{block}.layers.0.", "{block}.layers.1.", ... (skipping "decoder.layers." or every layer counts).
# tests/test_resolve.py builds tiny models with megatron-core 0.16.1's local layer specs and checks
# that changing a field changes only weights under its prefixes, and that the rest change none.
# Not here: parallel sizes and dtypes (distributed checkpoints reshard and cast), transformer_impl and
# moe_grouped_gemm (module layouts whose sharded state dicts name the same checkpoint tensors), rotary
# settings (no weights), and what changes computation only (dropout, epsilon, activation, fusions, ...).
SHAPE_PREFIXES: Final[dict[str, tuple[str, ...]]] = {
    "model_cls": ("*",),  # gpt against a BERT family; a user class is compared with nothing
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
    "make_vocab_size_divisible_by": ("embedding.word_embeddings.", "output_layer."),
    "biobert_spec_option": ("{layer}self_attention.",),  # "..._qk_ln" options add q/k layernorms
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
    return isinstance(c.model_cls, str) and c.model_cls not in MODEL_CLS_ALIASES


# Shape fields that size weights only in some models: the condition on the model being built.
SHAPES_ONLY_WHEN: Final[dict[str, Callable[[ModelConfig], bool]]] = {
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
UNRECORDED_WHEN_NONE: Final[frozenset[str]] = frozenset({"vocab_size", "seq_length"})


class _Runs(Sequence[str]):
    """Prefixes made of consecutive runs, each known by its size and how to make its i-th prefix:
    counted and indexed without expanding them."""

    def _runs(self) -> Iterator[tuple[int, Callable[[int], str]]]:
        raise NotImplementedError

    @property
    def count(self) -> int:
        """How many prefixes (``len`` fails beyond ``sys.maxsize``; this never does)."""
        return sum(size for size, _ in self._runs())

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return any(size for size, _ in self._runs())

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        for size, make in self._runs():
            if 0 <= index < size:
                return make(index)
            index -= size
        raise IndexError("prefix index out of range")

    def __iter__(self) -> Iterator[str]:
        for size, make in self._runs():
            yield from (make(i) for i in range(size))


@dataclass(frozen=True)
class LayerPrefixes(_Runs):
    """The prefixes ``{block}.layers.{i}.{tail}`` of the layers ``i`` in ``layers`` (ranges
    ``[start, stop)``), as one pattern: a model of 10**12 layers costs what one of 2 does. A sequence
    of its prefixes all the same, expanded only when iterated."""

    block: str
    tail: str
    layers: tuple[tuple[int, int], ...]

    @property
    def base(self) -> str:
        """``decoder.layers.``: what every prefix starts with before its layer number."""
        return f"{self.block}.layers."

    def prefix(self, layer: int) -> str:
        return f"{self.base}{layer}.{self.tail}"

    def _runs(self) -> Iterator[tuple[int, Callable[[int], str]]]:
        for start, stop in self.layers:
            yield stop - start, lambda index, start=start: self.prefix(start + index)

    def not_skipped(self, skips: Sequence[str]) -> LayerPrefixes:
        """The layers none of ``skips`` covers, decided from the skips alone (never per layer): a skip
        that is a prefix of ``base`` covers every layer; ``base + "3."`` (and longer, within ``tail``)
        covers layer 3; ``base + "3"`` every layer whose number starts with 3 (the runtime matches
        keys by ``startswith``)."""
        total = self.layers[-1][1] if self.layers else 0
        covered: list[tuple[int, int]] = []
        for skip in skips:
            if self.base.startswith(skip):
                return LayerPrefixes(self.block, self.tail, ())
            if not skip.startswith(self.base):
                continue
            number, dot, rest = skip[len(self.base) :].partition(".")
            if not (number.isascii() and number.isdigit()) or len(number) > len(str(total)):
                continue  # no layer's number is written so (or that long)
            if dot:
                if str(int(number)) == number and self.tail.startswith(rest):
                    covered.append((int(number), int(number) + 1))
            else:
                covered += _numbers_starting_with(number, total)
        return LayerPrefixes(self.block, self.tail, _subtract(self.layers, covered))


def _numbers_starting_with(digits: str, stop: int) -> list[tuple[int, int]]:
    """The ranges of the numbers in ``[0, stop)`` whose decimal form starts with ``digits``."""
    if digits.startswith("0"):
        return [(0, 1)] if digits == "0" and stop > 0 else []
    head, spans, scale = int(digits), [], 1
    while head * scale < stop:
        spans.append((head * scale, min((head + 1) * scale, stop)))
        scale *= 10
    return spans


def _subtract(
    spans: tuple[tuple[int, int], ...], removed: list[tuple[int, int]]
) -> tuple[tuple[int, int], ...]:
    """``spans`` (sorted, disjoint) less the union of ``removed``."""
    out: list[tuple[int, int]] = []
    cuts = sorted(removed)
    for start, stop in spans:
        position = start
        for cut_start, cut_stop in cuts:
            if cut_stop <= position or cut_start >= stop:
                continue
            if cut_start > position:
                out.append((position, cut_start))
            position = max(position, cut_stop)
        if position < stop:
            out.append((position, stop))
    return tuple(out)


class ShapedWeights(_Runs):
    """The key prefixes of the weights a field shapes: plain prefixes and per-layer patterns
    (``LayerPrefixes``) in table order. A sequence of every prefix, expanded only when iterated;
    ``not_skipped`` answers without expanding."""

    def __init__(self, parts: Sequence[str | LayerPrefixes]):
        self.parts: tuple[str | LayerPrefixes, ...] = tuple(part for part in parts if part)

    def _runs(self) -> Iterator[tuple[int, Callable[[int], str]]]:
        for part in self.parts:
            if isinstance(part, str):
                yield 1, lambda _, part=part: part
            else:
                yield from part._runs()

    def __repr__(self) -> str:
        return f"ShapedWeights({list(self.parts)!r})"

    def not_skipped(self, skips: Sequence[str]) -> list[str | LayerPrefixes]:
        """The parts (per-layer ones narrowed to their layers) that no skip prefix covers."""
        left: list[str | LayerPrefixes] = []
        for part in self.parts:
            if isinstance(part, str):
                if not is_skipped(part, skips):
                    left.append(part)
            elif narrowed := part.not_skipped(skips):
                left.append(narrowed)
        return left


def shaped_weights(config: ModelConfig, name: str) -> ShapedWeights | None:
    """The key prefixes of the weights field ``name`` shapes in the model ``config`` builds (empty when
    it builds none of them); None when bioconf cannot tell (a user model class). Per-layer prefixes
    stay patterns: nothing here grows with ``num_layers``."""
    family = FAMILIES[config.model_cls].architecture if config.model_cls in FAMILIES else None
    if family not in _MODULES:
        return None
    present = [module for module, exists in _MODULES[family].items() if exists(config)]
    block = _BLOCK[family]
    parts: list[str | LayerPrefixes] = []
    for pattern in SHAPE_PREFIXES[name]:
        if pattern == "*":
            parts.extend(present)
        elif pattern.startswith("{layer}"):
            layers = ((0, config.num_layers),) if config.num_layers and config.num_layers > 0 else ()
            parts.append(LayerPrefixes(block, pattern.removeprefix("{layer}").format(block=block), layers))
        else:
            parts.append(pattern.format(block=block))
    return ShapedWeights(
        [
            part
            for part in parts
            if any(
                (part if isinstance(part, str) else part.prefix(0)).startswith(module) for module in present
            )
        ]
    )


assert all(p.startswith("{layer}") or "{layer}" not in p for ps in SHAPE_PREFIXES.values() for p in ps)


def is_skipped(prefix: str, skips: Sequence[str]) -> bool:
    """The runtime skips a key that starts with a skip prefix: a broader (or equal) skip covers ``prefix``."""
    return any(prefix.startswith(skip) for skip in skips)


# The fields of SHAPE_PREFIXES that set a weight's size (the others decide whether a weight exists or
# how it is laid out): what a shape mismatch is explained by.
RESIZES: Final[frozenset[str]] = frozenset(
    {
        "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
        "attention_output_gate", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "linear_conv_kernel_dim",
        "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
        "ffn_hidden_size", "gated_linear_unit", "num_moe_experts", "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size", "moe_latent_size", "vocab_size", "seq_length",
        "num_tokentypes", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
    }
)  # fmt: skip
assert SHAPE_PREFIXES.keys() >= RESIZES

_ANY_BLOCK: Final = r"(?:decoder|encoder)"


def _key_pattern(prefix: str) -> re.Pattern[str]:
    """A SHAPE_PREFIXES entry as a regex over checkpoint keys, whose layers may be stacked (no index)."""
    if prefix == "*":
        return re.compile("")
    text = re.escape(prefix).replace(r"\{layer\}", rf"{_ANY_BLOCK}\.layers\.(?:\d+\.)?")
    return re.compile(text.replace(r"\{block\}", _ANY_BLOCK))


_KEY_PATTERNS: Final[dict[str, tuple[re.Pattern[str], ...]]] = {
    name: tuple(_key_pattern(prefix) for prefix in prefixes) for name, prefixes in SHAPE_PREFIXES.items()
}


def shaped_by(checkpoint_key: str, config: Any = None) -> tuple[str, ...]:
    """The fields that set the size of the tensor stored under ``checkpoint_key`` (``module.`` or
    not), in table order. With ``config`` (a schema or runtime config), fields that size nothing in
    that model are left out; without one, so are all conditional fields. ``num_layers`` counts only
    for stacked layers (``...layers.<name>``: a leading layer axis)."""
    key = checkpoint_key.removeprefix(MODULE_PREFIX)
    stacked = re.search(r"\blayers\.(?!\d)", key) is not None
    fields = []
    for name in SHAPE_PREFIXES:
        if name not in RESIZES or (name == "num_layers" and not stacked):
            continue
        if name in SHAPES_ONLY_WHEN and (config is None or not SHAPES_ONLY_WHEN[name](config)):
            continue
        if config is not None and effective(config, name) is None:  # an absent part sizes nothing
            continue
        if any(pattern.match(key) for pattern in _KEY_PATTERNS[name]):
            fields.append(name)
    return tuple(fields)
