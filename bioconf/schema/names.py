"""Names for the TransformerConfig values that have no JSON form of their own.

Megatron keeps dtypes as ``torch.dtype`` objects and the activation as a function. The schema
holds them as strings instead: one canonical spelling each, a forgiving set of accepted
spellings on input, and the import location the runtime (and a NeMo checkpoint's ``io.json``)
uses. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BeforeValidator, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

# What str.strip() removes (str.isspace()), in ECMA-262 terms: its \s lacks \x1c-\x1f and \x85.
_STRIPPED_SPACE = r"[\s\x1c-\x1f\x85]*"
_ECMA_SYNTAX = frozenset("\\^$.*+?()[]{}|/")


def _literal_pattern(text: str, *, any_case: bool = False) -> str:
    """``text`` as a pattern that means the same in ECMA-262 and Python; with ``any_case`` each
    letter as ``[xX]``, since ECMA-262 has no inline ``(?i)``."""
    return "".join(
        f"[{ch.lower()}{ch.upper()}]"
        if any_case and ch.lower() != ch.upper()
        else f"\\{ch}"
        if ch in _ECMA_SYNTAX
        else ch
        for ch in text
    )


class _NamesSchema:
    """JSON Schema of a name field: on input the canonical names (first, for a form's choices) or any
    spelling ``pattern`` accepts; on output, where bioconf writes canonical names only, just those."""

    def __init__(self, names: list[str], pattern: str, **extra: object) -> None:
        self.names, self.pattern, self.extra = names, pattern, extra

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        canonical = {"type": "string", "enum": list(self.names)}
        if handler.mode == "serialization":
            return canonical
        return {"anyOf": [canonical, {"type": "string", "pattern": self.pattern}], **self.extra}


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


# canonical_dtype's lookup as a pattern: any spelling in any case, between any whitespace.
DTYPE_PATTERN: Final[str] = (
    f"^{_STRIPPED_SPACE}("
    + "|".join(_literal_pattern(spelling, any_case=True) for spelling in sorted(_DTYPE_BY_SPELLING))
    + f"){_STRIPPED_SPACE}$"
)

DType = Annotated[
    str,
    BeforeValidator(canonical_dtype),
    _NamesSchema(list(DTYPE_NAMES), DTYPE_PATTERN, **{"x-aliases": sorted(_DTYPE_BY_SPELLING)}),
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


def _activation_pattern() -> str:
    """canonical_activation's lookup as a pattern: a name, optionally after one of the modules its
    function is found in (or a bare dot), between any whitespace."""
    choices = []
    for module, aliases in _ACTIVATION_MODULE_ALIASES.items():
        names = [name for name, (home, _) in ACTIVATIONS.items() if home == module]
        modules = "|".join(_literal_pattern(alias) for alias in sorted(aliases))
        choices.append(f"(({modules})?\\.)?(" + "|".join(map(_literal_pattern, names)) + ")")
    return f"^{_STRIPPED_SPACE}(" + "|".join(choices) + f"){_STRIPPED_SPACE}$"


ACTIVATION_PATTERN: Final[str] = _activation_pattern()

Activation = Annotated[
    str,
    BeforeValidator(canonical_activation),
    _NamesSchema(list(ACTIVATIONS), ACTIVATION_PATTERN),
]
"""An activation function by registry name: ``"gelu"``, ``"silu"``, ``"squared_relu"``, ..."""
