"""Write a small NeMo 2 checkpoint with NVIDIA BioNeMo's own code (reference data for bioconf's tests).

Run with .venv-bionemo's python (``make bionemo-env``), one CPU process:

    .venv-bionemo/bin/python tests/bionemo_env/write_checkpoint.py --family esm2 --out /tmp/ck/esm2

The model is built by BioNeMo (``config.configure_model(tokenizer)`` through its LightningModule), its
weights are drawn from a seeded generator, and the checkpoint is written as a NeMo 2 trainer does:
``OUT/context/io.json`` (+ ``model.yaml``) by nemo.lightning.io's TrainerContext.io_dump, and
``OUT/weights/`` by megatron's dist_checkpointing with keys prefixed ``module.``. Prints one JSON line:
family, config_class, padded vocab_size, and for every state-dict tensor its shape/dtype and sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bionemo_runtime import (
    CONTENT_METADATA,
    MODULE_PREFIX,
    RESULT,
    CpuTorchDistSaveStrategy,
    init_single_process,
    prepare_bionemo_imports,
    quiet_logs,
    sharded_keys,
    tensor_digests,
)

# The same small size for every family. Only what differs from the class defaults is passed: NeMo
# records only explicitly passed init arguments in io.json, so a real checkpoint leaves most out.
SMALL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "seq_length": 64,
}
# megatron builds parameters on the GPU unless told otherwise (params_dtype defaults to fp32 already);
# without apex megatron's norms are torch's LayerNorm, which refuses BioBertConfig's persist_layer_norm=True;
# megatron's TransformerConfig.__post_init__ refuses BioBertConfig's apply_rope_fusion=True without TE.
CPU = {"use_cpu_initialization": True, "persist_layer_norm": False, "apply_rope_fusion": False}


def build_config_and_tokenizer(family: str):
    """BioNeMo's config class for ``family`` (local, non-TE layer spec) and a tokenizer made locally."""
    from bionemo.llm.model.biobert.transformer_specs import BiobertSpecOption

    if family == "esm2":
        from bionemo.esm2.data.tokenizer import get_tokenizer
        from bionemo.esm2.model.model import ESM2Config
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        config = ESM2Config(
            **SMALL,
            **CPU,
            biobert_spec_option=BiobertSpecOption.esm2_bert_layer_local_spec,
            core_attention_override=DotProductAttention,  # the local ESM-2 spec requires one
            # ESM2Config turns on apply_query_key_layer_scaling for the local spec AFTER megatron's
            # __post_init__ (which would also force fp32 softmax), so DotProductAttention asserts without:
            attention_softmax_in_fp32=True,
        )
        return config, get_tokenizer()  # ships with bionemo-esm2: 33 tokens
    if family == "geneformer":
        from bionemo.geneformer.api import GeneformerConfig
        from bionemo.geneformer.tokenizer.gene_tokenizer import GeneTokenizer

        genes = {f"GENE{i}": f"ENSG{i:011d}" for i in range(40)}
        tokenizer = GeneTokenizer.from_medians_and_genes_dicts({ens: 1.0 for ens in genes.values()}, genes)
        config = GeneformerConfig(**SMALL, **CPU, biobert_spec_option=BiobertSpecOption.bert_layer_local_spec)
        return config, tokenizer
    if family == "biobert":
        from bionemo_test_configs import BioBertTestConfig, TinyTokenizer

        tokenizer = TinyTokenizer(["<pad>", "<cls>", "<mask>", *"ACDEFGHIKLMNPQRSTVWY"])
        config = BioBertTestConfig(
            **SMALL, **CPU, biobert_spec_option=BiobertSpecOption.bert_layer_local_spec
        )
        return config, tokenizer
    raise ValueError(family)


def randomize(model, seed: int) -> None:
    """Every floating tensor from one seeded generator, in key order: distinct, reproducible values, so
    a swapped or mis-mapped key changes the digests (the init's ones/zeros would hide that)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=["esm2", "geneformer", "biobert"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"write_checkpoint: {args.out} exists; refusing to overwrite")

    quiet_logs()
    prepare_bionemo_imports()
    import torch
    from bionemo.llm.model.biobert.lightning import biobert_lightning_module
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.io.pl import TrainerContext
    from nemo.lightning.pytorch.optim import MegatronOptimizerModule

    init_single_process()
    torch.manual_seed(args.seed)
    config, tokenizer = build_config_and_tokenizer(args.family)

    # As BioNeMo's train scripts do: its LightningModule factory, holding config + tokenizer + optimizer.
    module = biobert_lightning_module(
        config,
        tokenizer=tokenizer,
        optimizer=MegatronOptimizerModule(OptimizerConfig(lr=1e-4, optimizer="adam")),
    )
    module.configure_model()  # -> config.configure_model(tokenizer=...): BioNeMo builds the Megatron model
    model = module.module
    randomize(model, args.seed)

    # The trainer NeMo would record (CPU here; a GPU run records its accelerator and devices).
    trainer = nl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=nl.MegatronStrategy(tensor_model_parallel_size=1, pipeline_model_parallel_size=1),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
    )
    # NeMo's ModelCheckpoint calls TrainerContext.from_trainer(trainer).io_dump(..., yaml_attrs=["model"]);
    # from_trainer needs trainer.lightning_module, set only once fit() attaches the model: build the
    # same context directly. `extra` must be passed explicitly with fiddle 0.3.1 (its default_factory
    # is not captured); NeMo puts the datamodule there (there is none here).
    TrainerContext(model=module, trainer=trainer, extra={}).io_dump(
        args.out / "context", yaml_attrs=["model"]
    )

    # MegatronParallel's layout: the LightningModule's `module` gives every key the prefix "module.".
    sharded = model.sharded_state_dict(prefix=MODULE_PREFIX, metadata=dict(CONTENT_METADATA))
    checkpoint_keys = sharded_keys(sharded)
    (args.out / "weights").mkdir(parents=True)
    dist_checkpointing.save(
        sharded,
        str(args.out / "weights"),
        sharded_strategy=CpuTorchDistSaveStrategy(),
        content_metadata=dict(CONTENT_METADATA),
    )

    shapes, digests = tensor_digests(model)
    print(
        json.dumps(
            {
                "family": args.family,
                "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
                "vocab_size": model.vocab_size,
                "keys": shapes,
                "sha256": digests,
                "checkpoint_keys": checkpoint_keys,
            }
        ),
        file=RESULT,
        flush=True,
    )


if __name__ == "__main__":
    main()
