"""The schema layer: validate, serialize and export Megatron model configs as data.

Imports pydantic, orjson and PyYAML only — never torch, megatron, fiddle or nemo — so a pipeline
or a web server validates a config in milliseconds on a machine without a GPU.
"""

from bioconf.errors import ConfigError, ConfigIssue, ConfigReadError, OverrideError
from bioconf.schema.files import load_config, read_document, save_config, validate_document
from bioconf.schema.json_schema import json_schema
from bioconf.schema.model import (
    BIONEMO_ONLY_FIELDS,
    MODEL_CLS_ALIASES,
    OVERRIDE_BIONEMO_CONFIG_DEFAULTS,
    ModelConfig,
)

__all__ = [
    "BIONEMO_ONLY_FIELDS",
    "MODEL_CLS_ALIASES",
    "OVERRIDE_BIONEMO_CONFIG_DEFAULTS",
    "ConfigError",
    "ConfigIssue",
    "ConfigReadError",
    "ModelConfig",
    "OverrideError",
    "json_schema",
    "load_config",
    "read_document",
    "save_config",
    "validate_document",
]
