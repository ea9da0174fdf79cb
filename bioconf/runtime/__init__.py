"""The runtime layer: Megatron dataclass configs with tracked hyper-parameters, materialized from
the schema layer, and loaded from NeMo 2 checkpoints (settings and weights); NeMo 2 checkpoints
written on CPU. Imports torch, megatron-core and fiddle."""

from bioconf.runtime.build import build_model
from bioconf.runtime.checkpoint import (
    CpuTorchDistSaveStrategy,
    ensure_parallel_state,
    init_checkpoint,
    save_checkpoint,
)
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
from bioconf.runtime.run import RunReport, run
from bioconf.runtime.settings import SettingsReport
from bioconf.runtime.weights import LoadReport, WeightsError, load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema.model import OVERRIDE_BIONEMO_CONFIG_DEFAULTS

__all__ = [
    "OVERRIDE_BIONEMO_CONFIG_DEFAULTS",
    "BertModelConfig",
    "CpuTorchDistSaveStrategy",
    "CustomModelConfig",
    "GPTModelConfig",
    "IOMixinProto",
    "IOMixinWithGettersSetters",
    "LoadReport",
    "MegatronBioNeMoModelConfig",
    "MegatronBioNeMoTrainableModelConfig",
    "RunReport",
    "SettingsReport",
    "WeightsError",
    "WillHaveGetSetHparam",
    "build_model",
    "ensure_parallel_state",
    "init_checkpoint",
    "load_weights_sharded_inplace_nemo2_to_mcore",
    "materialize",
    "override_mutate_possibly_extra_mutated_fiddle",
    "run",
    "save_checkpoint",
    "to_schema",
]
