"""Schema -> runtime: turn a validated ``ModelConfig`` into the Megatron dataclass config.

Names become objects here (dtype names -> ``torch.dtype``, activation names -> functions, enum
names -> members, ``model_cls`` import paths -> classes); this is the only place bioconf imports
a class that a config names.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from bioconf.runtime.config import MegatronBioNeMoTrainableModelConfig
from bioconf.schema.errors import ConfigError, ConfigIssue
from bioconf.schema.megatron_fields import DTYPE_FIELDS, ENUM_FIELDS, MEGATRON_FIELD_NAMES
from bioconf.schema.model import MODEL_CLS_ALIASES, ModelConfig
from bioconf.schema.names import ACTIVATIONS
from bioconf.schema.nemo_context import RUNTIME_CONFIG_CLASSES


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


def runtime_class_for(model_cls: str) -> type[MegatronBioNeMoTrainableModelConfig]:
    """The runtime config class for a schema ``model_cls`` (the same one a checkpoint context names)."""
    kind = model_cls if model_cls in MODEL_CLS_ALIASES else "custom"
    module, name = RUNTIME_CONFIG_CLASSES[kind]
    return import_object(f"{module}:{name}")


def materialize(config: ModelConfig, source: str | None = None) -> MegatronBioNeMoTrainableModelConfig:
    """Build the runtime config for ``config``. Its ``__io__`` records exactly the fields set in
    ``config`` (``model_fields_set``), so a checkpoint saved from it holds the user's choices.
    ``model_cls`` is implied by the class for "gpt"/"bert", imported for an import path."""
    cls = runtime_class_for(config.model_cls)
    kwargs = to_megatron_kwargs(config)
    kwargs.pop("model_cls", None)
    if config.model_cls not in MODEL_CLS_ALIASES:
        try:
            kwargs["model_cls"] = import_object(config.model_cls)
        except (ImportError, AttributeError) as error:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"cannot import the model class: {error}",
                        "import_error",
                        ("model_cls",),
                        config.model_cls,
                        source,
                    )
                ]
            ) from None
    try:
        return cls(**kwargs)
    except Exception as error:  # megatron's environment-dependent checks (TE, CUDA) live in __post_init__
        raise ConfigError(
            [
                ConfigIssue(
                    f"megatron-core rejected the config: {type(error).__name__}: {error}",
                    "megatron_error",
                    (),
                    None,
                    source,
                )
            ]
        ) from error


def to_schema(runtime_config: MegatronBioNeMoTrainableModelConfig) -> ModelConfig:
    """Runtime -> schema: the tracked init values (what a checkpoint records) as a ModelConfig.

    Fields with no JSON form (``NO_JSON_FORM``) have no schema counterpart and are left out.
    ``model_cls`` comes from the class (``BertModelConfig`` -> "bert") unless it was passed.
    """
    recorded = runtime_config.get_hparams()
    values = {name: value for name, value in recorded.items() if name in ModelConfig.model_fields}
    for name in ENUM_FIELDS.keys() & values.keys():
        values[name] = values[name].name
    alias = next((a for a in MODEL_CLS_ALIASES if type(runtime_config) is runtime_class_for(a)), None)
    if alias is None:  # a user model class: always by import path
        cls = runtime_config.get_hparam("model_cls")
        values["model_cls"] = f"{cls.__module__}:{cls.__qualname__}"
    elif alias != ModelConfig.model_fields["model_cls"].default:
        values["model_cls"] = alias
    return ModelConfig.model_validate(values)
