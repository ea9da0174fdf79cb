"""The runtime layer: Megatron dataclass configs with tracked hyper-parameters, materialized from
the schema layer, and loaded from NeMo 2 checkpoints (settings and weights); NeMo 2 checkpoints
written on CPU. Imports torch, megatron-core and fiddle.

By step: ``config`` (the dataclass configs, ``materialize``/``to_schema``), ``hparams`` (tracked
init values), ``settings`` (a checkpoint's settings into a config), ``parallel`` (process groups),
``build`` (the model), ``weights/`` (loading), ``save``, ``initialize`` (a fresh checkpoint) and
``run`` (all of it, as ``bioconf run``).
"""

from bioconf.runtime.build import build_chunks, build_model
from bioconf.runtime.config import (
    BertModelConfig,
    BuiltModel,
    CustomModelConfig,
    GPTModelConfig,
    MegatronBioNeMoModelConfig,
    MegatronBioNeMoTrainableModelConfig,
    materialize,
    to_schema,
)
from bioconf.runtime.hparams import (
    IOMixinProto,
    IOMixinWithGettersSetters,
    WillHaveGetSetHparam,
    override_mutate_possibly_extra_mutated_fiddle,
)
from bioconf.runtime.initialize import init_checkpoint
from bioconf.runtime.parallel import ensure_parallel_state
from bioconf.runtime.run import RunReport, run
from bioconf.runtime.save import CpuTorchDistSaveStrategy, save_checkpoint
from bioconf.runtime.settings import SettingsReport
from bioconf.runtime.weights import LoadReport, load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema.model import OVERRIDE_BIONEMO_CONFIG_DEFAULTS

__all__ = [
    "OVERRIDE_BIONEMO_CONFIG_DEFAULTS",
    "BertModelConfig",
    "BuiltModel",
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
    "WillHaveGetSetHparam",
    "build_chunks",
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
