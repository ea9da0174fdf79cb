"""The sizes megatron derives when a config leaves them None (``TransformerConfig.__post_init__``).

A config keeps None (megatron derives the value from the final config at materialization); the
rules, the merge and the shape checks need the value megatron will use. Only the derivations that
size weights are here: megatron's others (``autocast_dtype``, ``expert_tensor_parallel_size``, ...)
size nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

DERIVED: Final[dict[str, Callable[[Any], Any]]] = {
    "ffn_hidden_size": lambda c: 4 * c.hidden_size,
    "kv_channels": lambda c: c.hidden_size // c.num_attention_heads if c.num_attention_heads else None,
    "num_query_groups": lambda c: c.num_attention_heads,
    "moe_ffn_hidden_size": lambda c: (
        effective(c, "ffn_hidden_size") if c.num_moe_experts is not None else None
    ),
}
"""Field -> how megatron derives it from the config (any object with the fields as attributes)."""


def effective(config: Any, name: str) -> Any:
    """The value megatron will use for ``name``: the config's, or the derived one when it is None."""
    value = getattr(config, name)
    if value is None and name in DERIVED:
        return DERIVED[name](config)
    return value
