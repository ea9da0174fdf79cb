"""The runtime layer: Megatron dataclass configs with tracked hyper-parameters, materialized from
the schema layer, and loaded from NeMo 2 checkpoints. Imports torch, megatron-core and fiddle."""

from bioconf.runtime.config import (
    BertModelConfig,
    CustomModelConfig,
    GPTModelConfig,
    MegatronBioNeMoModelConfig,
    MegatronBioNeMoTrainableModelConfig,
)
from bioconf.runtime.hparams import (
    IOMixinProto,
    IOMixinWithGettersSetters,
    WillHaveGetSetHparam,
    override_mutate_possibly_extra_mutated_fiddle,
)
from bioconf.runtime.materialize import materialize, to_schema
from bioconf.runtime.settings import SettingsReport
from bioconf.schema.model import OVERRIDE_BIONEMO_CONFIG_DEFAULTS

__all__ = [
    "OVERRIDE_BIONEMO_CONFIG_DEFAULTS",
    "BertModelConfig",
    "CustomModelConfig",
    "GPTModelConfig",
    "IOMixinProto",
    "IOMixinWithGettersSetters",
    "MegatronBioNeMoModelConfig",
    "MegatronBioNeMoTrainableModelConfig",
    "SettingsReport",
    "WillHaveGetSetHparam",
    "materialize",
    "override_mutate_possibly_extra_mutated_fiddle",
    "to_schema",
]
