"""Field values between their schema form and megatron's: names become objects here (dtype names
-> ``torch.dtype``, activation names -> functions, enum names -> members, ``model_cls`` import paths
-> classes) and back. This is the only place bioconf imports something a config names.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from bioconf.schema.megatron_fields import DTYPE_FIELDS, ENUM_FIELDS, MEGATRON_FIELD_NAMES
from bioconf.schema.model import ModelConfig
from bioconf.schema.names import ACTIVATIONS


def import_object(path: str) -> Any:
    """Import ``"package.module:Qualname"`` (or ``"package.module.name"``)."""
    module_name, sep, qualname = path.partition(":")
    if not sep:
        module_name, _, qualname = path.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def to_megatron_value(name: str, value: Any) -> Any:
    """The value megatron expects for field ``name`` given its schema form."""
    if value is None:
        return None
    if name in DTYPE_FIELDS:
        return getattr(torch, value)
    if name == "activation_func":
        module, attribute = ACTIVATIONS[value]
        return import_object(f"{module}:{attribute}")
    if name in ENUM_FIELDS:
        module, enum_class = ENUM_FIELDS[name]
        return import_object(f"{module}:{enum_class}")[value]
    if isinstance(value, list):
        return list(value)  # a fresh list: megatron may mutate it
    return value


def to_megatron_kwargs(
    config: ModelConfig, *, only_megatron_fields: bool = False, explicit_only: bool = True
) -> dict[str, Any]:
    """Constructor arguments for the runtime config: the explicit fields (or all), in megatron form."""
    names = config.model_fields_set if explicit_only else ModelConfig.model_fields.keys()
    if only_megatron_fields:
        names = [n for n in names if n in MEGATRON_FIELD_NAMES]
    return {name: to_megatron_value(name, getattr(config, name)) for name in names}


def to_schema_values(recorded: dict[str, Any]) -> dict[str, Any]:
    """Tracked init values in schema form (enum members by name; dtypes and activations are
    accepted as objects by ModelConfig itself); fields the schema does not have are left out."""
    values = {name: value for name, value in recorded.items() if name in ModelConfig.model_fields}
    for name in ENUM_FIELDS.keys() & values.keys():
        values[name] = values[name].name
    return values
