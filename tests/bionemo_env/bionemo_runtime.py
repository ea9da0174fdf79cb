"""What write_checkpoint.py and read_back.py share: a CPU-only process that can import and run
BioNeMo's own model code. Runs inside .venv-bionemo (``make bionemo-env``), never inside bioconf's venv;
bioconf is not importable here on purpose, so these scripts are an independent reference.
"""

# ruff: noqa: E402  (stdout is redirected below before nemo is imported)
from __future__ import annotations

import os

# stdout carries only the scripts' one JSON line (RESULT); NeMo logs to stdout, so everything else
# written to file descriptor 1, from here on, goes to stderr.
RESULT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import hashlib
import sys
import types
from typing import Any

# Import nemo's and megatron's Transformer-Engine-aware modules BEFORE the stand-in below exists, so
# they see the truth (no TE) and take their non-TE code paths.
import megatron.core.extensions.transformer_engine
import megatron.core.fusions.fused_layer_norm as fused_layer_norm
import megatron.core.models.bert.bert_layer_specs  # noqa: F401
import nemo.lightning  # noqa: F401
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

# What NeMo 2's MegatronStrategy records as dist_checkpointing content metadata (no distributed optimizer).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
MODULE_PREFIX = "module."  # NeMo's MegatronParallel: the Megatron model is the LightningModule's `module`


def prepare_bionemo_imports() -> None:
    """Let BioNeMo's model code import and build its LOCAL specs on a CPU-only machine (this process only).

    1. A stand-in ``transformer_engine`` module (see below).
    2. Stand-ins for three names bionemo 2.4.5 imports that nemo-toolkit 2.7.3 removed (see below).
    3. megatron's ``FusedLayerNorm`` refuses to be constructed without apex (``HAVE_FUSED_LAYER_NORM``),
       and BioNeMo's ``esm2_bert_layer_local_spec`` names FusedLayerNorm directly (megatron's own
       ``bert_layer_local_spec`` falls back to torch's LayerNorm without apex). apex needs CUDA to build.
       The flag only guards apex's forward kernel: the parameters (``weight``, ``bias``; ones/zeros) and
       the state-dict keys are the same, and nothing here runs a forward pass.
    4. megatron's ``RotaryEmbedding`` builds ``inv_freq`` on ``torch.cuda.current_device()`` unless given
       ``use_cpu_initialization=True``, which BioNeMo's ESM2Model does not pass. Default it to True here
       (``inv_freq`` is a plain attribute, not in the state dict).
    """
    # nemo.collections.llm (which bionemo.geneformer imports for its fine-tuning heads) asks for TE's
    # package version once `import transformer_engine` succeeds: import it before the stand-in exists.
    import nemo.collections.llm  # noqa: F401

    install_transformer_engine_stand_in()
    install_removed_nemo_names()
    # The Geneformer sources (bionemo-framework just before their removal) are newer than bionemo-llm
    # 2.4.5 on the index: finetune_token_regressor (imported by bionemo.geneformer.api) imports
    # average_losses_across_data_parallel_group(..., with_context_parallel=) from bionemo.llm.utils.
    # megatron_utils, which 2.4.5 lacks. Only its fine-tuning loss calls it: a stand-in that raises.
    import bionemo.llm.utils.megatron_utils as bionemo_megatron_utils

    if not hasattr(bionemo_megatron_utils, "average_losses_across_data_parallel_group"):

        def average_losses_across_data_parallel_group(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("stand-in: not in bionemo-llm 2.4.5")

        bionemo_megatron_utils.average_losses_across_data_parallel_group = (
            average_losses_across_data_parallel_group
        )
    fused_layer_norm.HAVE_FUSED_LAYER_NORM = True

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    original_init = RotaryEmbedding.__init__

    def cpu_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("use_cpu_initialization", True)
        original_init(self, *args, **kwargs)

    RotaryEmbedding.__init__ = cpu_init


def install_transformer_engine_stand_in() -> None:
    """Make ``import transformer_engine as te`` succeed in THIS process only.

    Why: bionemo-llm 2.4.5's ``bionemo.llm.model.layers`` (imported by ``transformer_specs``, hence by
    every BioBERT/ESM-2/Geneformer config) does ``import transformer_engine as te`` and subclasses
    ``te.pytorch.LayerNorm`` at import time. Transformer Engine cannot be installed on a machine without
    CUDA, so without this nothing of BioNeMo's model code imports. The scripts only ever build BioNeMo's
    LOCAL (non-TE) specs, so the stand-in class is never instantiated; if it were, it raises.

    It is a sys.modules entry, not a package in the venv: nothing else (nemo, megatron, a later user of
    .venv-bionemo) can mistake it for a real TE. It has no ``__path__``, so any
    ``from transformer_engine.pytorch.x import y`` still fails with ImportError and takes the no-TE path.
    """
    if "transformer_engine" in sys.modules:
        return

    class LayerNorm(torch.nn.Module):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("transformer_engine stand-in: TE layers cannot be built on this machine")

    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.LayerNorm = LayerNorm
    sys.modules["transformer_engine"] = te


def install_removed_nemo_names() -> None:
    """Provide the names bionemo 2.4.5 imports from older nemo-toolkit, in THIS process only.

    Why: nemo-toolkit 2.7.3 (the version bioconf pins and tests against) no longer ships
    ``nemo.collections.nlp``, yet ``bionemo.llm.model.loss`` (imported by every BioBERT config) imports
    ``average_losses_across_data_parallel_group`` from it, and ``bionemo.geneformer.api`` imports
    ``ParallelLinearAdapter`` (fine-tuning adapters) through ``finetune_token_regressor``. The first moved
    to ``nemo.utils.megatron_utils`` unchanged: the stand-in re-exports that very function. The adapter is
    never built here (no PEFT); its stand-in raises if it were. ``bionemo.llm.model.loss`` also imports
    ``masked_token_loss_context_parallel`` from ``nemo.lightning.megatron_parallel`` (gone in 2.7.3): a
    loss for training steps, which these scripts never run; its stand-in raises.
    """
    import importlib.util

    import nemo.lightning.megatron_parallel as megatron_parallel

    if not hasattr(megatron_parallel, "masked_token_loss_context_parallel"):

        def masked_token_loss_context_parallel(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("stand-in: masked_token_loss_context_parallel is gone from nemo-toolkit")

        megatron_parallel.masked_token_loss_context_parallel = masked_token_loss_context_parallel

    if importlib.util.find_spec("nemo.collections.nlp") is not None:
        return  # an older nemo-toolkit that still has it: use the real one
    from nemo.utils.megatron_utils import average_losses_across_data_parallel_group

    class ParallelLinearAdapter(torch.nn.Module):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("nemo.collections.nlp stand-in: ParallelLinearAdapter is not available")

    base = "nemo.collections.nlp"
    names = ["", ".modules", ".modules.common", ".modules.common.megatron"]
    names += [".modules.common.megatron.utils", ".modules.common.megatron.adapters"]
    names += [".modules.common.megatron.adapters.parallel_adapters"]
    for name in names:
        module = types.ModuleType(base + name)
        module.__path__ = []  # a package, so its children resolve through sys.modules
        sys.modules[base + name] = module
    sys.modules[
        f"{base}.modules.common.megatron.utils"
    ].average_losses_across_data_parallel_group = average_losses_across_data_parallel_group
    sys.modules[
        f"{base}.modules.common.megatron.adapters.parallel_adapters"
    ].ParallelLinearAdapter = ParallelLinearAdapter


def init_single_process() -> None:
    """A 1-rank gloo process group (port picked by the OS) and megatron parallel state TP=PP=1."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


class CpuTorchDistSaveStrategy(SaveShardedStrategy):
    """megatron's ``torch_dist`` format (version 1) written without CUDA.

    megatron's default torch_dist save strategy calls ``torch.cuda.synchronize()`` and all-reduces a CUDA
    tensor, so it fails on CPU. This converts the sharded state dict with the same megatron helpers and
    writes it with torch DCP's FileSystemWriter; megatron's default loader reads it as any torch_dist one.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Any) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        dcp_save(
            mcore_to_pyt_state_dict(by_key, is_loading=False),
            storage_writer=FileSystemWriter(checkpoint_dir, thread_count=1),
            planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False),
        )


def tensor_digests(model: torch.nn.Module) -> tuple[dict[str, list], dict[str, str]]:
    """``({key: [shape, dtype]}, {key: sha256 of the raw bytes})`` for every tensor of the model's
    state dict (megatron local-layout keys, no ``module.`` prefix; ``_extra_state`` entries skipped)."""
    shapes, digests = {}, {}
    for key, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        flat = value.detach().cpu().contiguous().reshape(-1)
        shapes[key] = [list(value.shape), str(value.dtype).removeprefix("torch.")]
        digests[key] = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return shapes, digests


def sharded_keys(sharded_state_dict: dict[str, Any]) -> dict[str, list]:
    """``{checkpoint key: [global shape, dtype]}`` of what dist_checkpointing stores (stacked layers,
    TE-layout names from the specs' ``sharded_state_dict_keys_map``)."""
    out = {}
    for value in sharded_state_dict.values():
        if hasattr(value, "dtype"):  # ShardedTensor
            out[value.key] = [list(value.global_shape), str(value.dtype).removeprefix("torch.")]
        elif hasattr(value, "key"):  # ShardedObject (e.g. a layer's _extra_state): no shape, no dtype
            out[value.key] = ["object", None]
    return dict(sorted(out.items()))


def quiet_logs() -> None:
    """Keep stdout for the one JSON line: send nemo/megatron log chatter to stderr."""
    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
