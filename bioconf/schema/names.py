"""Names for the TransformerConfig values that have no JSON form of their own.

Megatron keeps dtypes as ``torch.dtype`` objects and the activation as a function. The schema
holds them as strings instead: one canonical spelling each, a forgiving set of accepted
spellings on input, and the import location the runtime (and a NeMo checkpoint's ``io.json``)
uses. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

# Canonical dtype name (the attribute of the ``torch`` module) -> the spellings accepted on input.
_DTYPE_SPELLINGS: Final[dict[str, tuple[str, ...]]] = {
    "float32": ("fp32", "float32", "float", "torch.float32", "torch.float", "32"),
    "float16": ("fp16", "float16", "half", "torch.float16", "torch.half", "16"),
    "bfloat16": ("bf16", "bfloat16", "torch.bfloat16"),
    "float64": ("fp64", "float64", "double", "torch.float64", "torch.double", "64"),
}
DTYPE_NAMES: Final[tuple[str, ...]] = tuple(_DTYPE_SPELLINGS)
_DTYPE_BY_SPELLING: Final[dict[str, str]] = {
    spelling: canonical for canonical, spellings in _DTYPE_SPELLINGS.items() for spelling in spellings
}


def canonical_dtype(value: object) -> object:
    """Map any accepted dtype spelling to its canonical name; anything else is an error."""
    if isinstance(value, str):
        canonical = _DTYPE_BY_SPELLING.get(value.strip().lower())
        if canonical is not None:
            return canonical
    elif type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        # A torch.dtype passed from a notebook: str(torch.bfloat16) == "torch.bfloat16".
        return canonical_dtype(str(value))
    raise PydanticCustomError(
        "dtype",
        "unknown dtype {value}; expected one of {expected}",
        {
            "value": repr(value),
            "expected": ", ".join(DTYPE_NAMES) + " (or fp32, fp16, bf16, torch.bfloat16, ...)",
        },
    )


DType = Annotated[
    str,
    BeforeValidator(canonical_dtype),
    Field(json_schema_extra={"enum": list(DTYPE_NAMES), "x-aliases": sorted(_DTYPE_BY_SPELLING)}),
]
"""A torch dtype by name: ``"bfloat16"``; also accepts ``"bf16"``, ``"torch.bfloat16"``, ..."""


# Activation name -> (module, attribute) where the runtime finds the function. torch's C-level
# functions report other modules (``torch._C._nn.gelu``), so reading a checkpoint also accepts
# the modules in _ACTIVATION_MODULE_ALIASES.
ACTIVATIONS: Final[dict[str, tuple[str, str]]] = {
    **{
        name: ("torch.nn.functional", name)
        for name in (
            "gelu",
            "silu",
            "relu",
            "relu6",
            "elu",
            "selu",
            "celu",
            "leaky_relu",
            "mish",
            "hardswish",
            "softplus",
            "tanh",
            "sigmoid",
            "glu",
            "logsigmoid",
        )
    },
    **{name: ("megatron.core.activations", name) for name in ("squared_relu", "quick_gelu", "fast_gelu")},
}
_ACTIVATION_MODULE_ALIASES: Final[dict[str, frozenset[str]]] = {
    "torch.nn.functional": frozenset({"torch.nn.functional", "torch._C._nn", "torch", "torch._C"}),
    "megatron.core.activations": frozenset({"megatron.core.activations"}),
}


def activation_from_import(module: str, name: str) -> str | None:
    """The registry name of the function ``module.name``, or None if it is not a known activation."""
    known = ACTIVATIONS.get(name)
    if known is None or module not in _ACTIVATION_MODULE_ALIASES[known[0]]:
        return None
    return name


def canonical_activation(value: object) -> object:
    """Accept a registry name (``"gelu"``, ``"torch.nn.functional.gelu"``) or the function itself."""
    if callable(value):
        name = activation_from_import(getattr(value, "__module__", "") or "", getattr(value, "__name__", ""))
        if name is not None:
            return name
    elif isinstance(value, str):
        module, _, name = value.strip().rpartition(".")
        if not module and name in ACTIVATIONS:
            return name
        if module and activation_from_import(module, name) is not None:
            return name
    raise PydanticCustomError(
        "activation",
        "unknown activation function {value}; expected one of {expected}",
        {"value": repr(value), "expected": ", ".join(ACTIVATIONS)},
    )


Activation = Annotated[
    str,
    BeforeValidator(canonical_activation),
    Field(json_schema_extra={"enum": list(ACTIVATIONS)}),
]
"""An activation function by registry name: ``"gelu"``, ``"silu"``, ``"squared_relu"``, ..."""
