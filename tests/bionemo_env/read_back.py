"""Read a NeMo 2 checkpoint with NVIDIA BioNeMo's own code, as a BioNeMo user without Transformer
Engine would (reference reader for bioconf's tests: can BioNeMo load what bioconf writes?).

Run with .venv-bionemo's python (``make bionemo-env``), one CPU process:

    .venv-bionemo/bin/python tests/bionemo_env/read_back.py /tmp/ck/esm2 [--tokenizer-family esm2]

Loads the config with ``nemo.lightning.io.load_context(CKPT/context, subpath="model.config")``, builds the
model with BioNeMo's ``configure_model(tokenizer)``, loads ``CKPT/weights`` with megatron's
dist_checkpointing and ``load_state_dict(strict=True)`` as NeMo does, and prints one JSON line:
config_class, a few config fields, and the sha256 of every state-dict tensor (same keys as
write_checkpoint.py). Exits 1 with a message on stderr when any step fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from bionemo_runtime import (
    CONTENT_METADATA,
    MODULE_PREFIX,
    RESULT,
    init_single_process,
    prepare_bionemo_imports,
    quiet_logs,
    tensor_digests,
)

REPORTED_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "seq_length",
    "make_vocab_size_divisible_by",
    "position_embedding_type",
    "share_embeddings_and_output_weights",
    "biobert_spec_option",
    "params_dtype",
)


def make_tokenizer(family: str):
    """The tokenizer the writer used (vocab size decides the embedding rows), made locally."""
    if family == "esm2":
        from bionemo.esm2.data.tokenizer import get_tokenizer

        return get_tokenizer()
    if family == "geneformer":
        from bionemo.geneformer.tokenizer.gene_tokenizer import GeneTokenizer

        genes = {f"GENE{i}": f"ENSG{i:011d}" for i in range(40)}
        return GeneTokenizer.from_medians_and_genes_dicts({ens: 1.0 for ens in genes.values()}, genes)
    from bionemo_test_configs import TinyTokenizer

    return TinyTokenizer(["<pad>", "<cls>", "<mask>", *"ACDEFGHIKLMNPQRSTVWY"])


def guess_family(config: Any) -> str:
    module = type(config).__module__
    return "esm2" if ".esm2." in module else "geneformer" if ".geneformer." in module else "biobert"


def cpu_overrides(config: Any) -> None:
    """What a BioNeMo user without Transformer Engine, apex or a GPU must change before the config is
    built (on the unbuilt fiddle Config: BioBertConfig's own __post_init__ already rejects some values):

    - a TE layer spec -> the matching local one (same checkpoint keys: the local specs map their norm
      keys onto TE's names with ``sharded_state_dict_keys_map``); the local ESM-2 spec needs an explicit
      core attention, and fp32 softmax (ESM2Config enables query-key layer scaling after megatron's
      __post_init__ would have forced it);
    - apply_rope_fusion and persist_layer_norm off (megatron refuses them without TE / apex);
    - use_cpu_initialization (megatron builds on the GPU otherwise).
    None of these changes a parameter's name, shape or dtype.
    """
    from bionemo.llm.model.biobert.transformer_specs import BiobertSpecOption as Spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    local = {
        Spec.bert_layer_with_transformer_engine_spec: Spec.bert_layer_local_spec,
        Spec.bert_layer_with_transformer_engine_and_qk_ln_spec: Spec.bert_layer_local_spec_with_qk_ln,
        Spec.esm2_bert_layer_with_transformer_engine_spec: Spec.esm2_bert_layer_local_spec,
    }
    default = fdl_default(config, "biobert_spec_option")
    option = Spec(getattr(config, "biobert_spec_option", default))
    option = local.get(option, option)
    config.biobert_spec_option = option
    if option == Spec.esm2_bert_layer_local_spec:
        if getattr(config, "core_attention_override", None) is None:
            config.core_attention_override = DotProductAttention
        config.attention_softmax_in_fp32 = True
    config.apply_rope_fusion = False
    config.persist_layer_norm = False
    config.use_cpu_initialization = True
    # The weights are this checkpoint's own: a checkpoint saved from a fine-tune records the one it
    # started from (initial_ckpt_path), which configure_model would load first (and which BioNeMo 2.4.5
    # cannot read on today's megatron: offload_modules). NeMo's trainer restores this checkpoint's
    # weights after configure_model; here they are loaded below.
    config.initial_ckpt_path = None
    # This process is one rank: a checkpoint saved at TP=2 records tensor_model_parallel_size=2, which a
    # BioNeMo user loading it on one rank overrides (it would also pad the vocabulary to 128 x 2).
    config.tensor_model_parallel_size = 1
    config.pipeline_model_parallel_size = 1


def fdl_default(config: Any, name: str) -> Any:
    """The class default of a dataclass field the fiddle Config leaves unset."""
    import dataclasses

    import fiddle as fdl

    fields = {f.name: f for f in dataclasses.fields(fdl.get_callable(config))}
    return fields[name].default


def read(checkpoint: Path, tokenizer_family: str | None) -> dict:
    import fiddle as fdl
    import torch
    from megatron.core import dist_checkpointing
    from nemo.lightning import io

    # BioNeMo's own reading (MegatronBioNeMoTrainableModelConfig.load_settings_from_checkpoint): the
    # `model.config` node of the TrainerContext; every class it names is imported. Unbuilt first, so
    # the CPU overrides can go in before the config's __post_init__ runs.
    unbuilt = io.load_context(checkpoint / "context", subpath="model.config", build=False)
    named_spec = getattr(unbuilt, "biobert_spec_option", fdl_default(unbuilt, "biobert_spec_option"))
    cpu_overrides(unbuilt)
    config = fdl.build(unbuilt)
    config_class = f"{type(config).__module__}.{type(config).__qualname__}"
    reported = {name: getattr(config, name, None) for name in REPORTED_FIELDS}
    reported["biobert_spec_option"], reported["built_with_spec"] = named_spec, config.biobert_spec_option
    model = config.configure_model(make_tokenizer(tokenizer_family or guess_family(config)))

    # NeMo's MegatronCheckpointIO.load_checkpoint: dist_checkpointing.load into the model's sharded
    # state dict (keys "module.*"), then the LightningModule's load_state_dict (strict).
    sharded = model.sharded_state_dict(prefix=MODULE_PREFIX, metadata=dict(CONTENT_METADATA))
    loaded = dist_checkpointing.load(sharded, str(checkpoint / "weights"))
    # load() also returns the checkpoint's common state (e.g. "content_metadata"), which NeMo keeps
    # apart from the model's: only the "module." keys are the model's.
    state = {k.removeprefix(MODULE_PREFIX): v for k, v in loaded.items() if k.startswith(MODULE_PREFIX)}
    model.load_state_dict(state, strict=True)

    _, digests = tensor_digests(model)
    for name, value in reported.items():
        if isinstance(value, torch.dtype):
            reported[name] = str(value)
        elif hasattr(value, "value"):  # enums
            reported[name] = value.value
    return {"config_class": config_class, "config": reported, "sha256": digests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokenizer-family", choices=["esm2", "geneformer", "biobert"])
    args = parser.parse_args()

    quiet_logs()
    prepare_bionemo_imports()
    init_single_process()
    try:
        result = read(args.checkpoint, args.tokenizer_family)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        sys.exit(f"read_back: BioNeMo could not load {args.checkpoint}: {type(error).__name__}: {error}")
    print(json.dumps(result), file=RESULT, flush=True)


if __name__ == "__main__":
    main()
