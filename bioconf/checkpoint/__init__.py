"""NeMo 2 checkpoints as data: where their parts lie, their model config (``context/io.json``) read
and written without importing anything it names, their tensor index (``weights/.metadata``) read
through an allow-list unpickler, and which weights each config field shapes.

Imports pydantic, orjson and PyYAML only, like ``bioconf.schema``: no torch, megatron, fiddle or nemo.
"""

from bioconf.checkpoint.context import CheckpointConfig, read_checkpoint_config, write_checkpoint_context
from bioconf.checkpoint.inspection import format_inspection, inspect_checkpoint
from bioconf.checkpoint.layout import CheckpointPaths, locate
from bioconf.checkpoint.weights_index import WeightsMetadata, read_weights_metadata

__all__ = [
    "CheckpointConfig",
    "CheckpointPaths",
    "WeightsMetadata",
    "format_inspection",
    "inspect_checkpoint",
    "locate",
    "read_checkpoint_config",
    "read_weights_metadata",
    "write_checkpoint_context",
]
