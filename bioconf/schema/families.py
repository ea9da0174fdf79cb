"""The model families bioconf builds by name (``model_cls``), and BioNeMo's config classes they stand for.

``"gpt"`` and ``"bert"`` are megatron-core's GPTModel and BertModel with megatron's defaults. The
BioNeMo families build the module tree BioNeMo's ``MegatronBioBertModel`` builds (the state-dict keys
of megatron's BertModel) and start from the defaults of BioNeMo's config class, so that a fine-tune
config holds only what its user changes and a BioNeMo checkpoint, whose ``io.json`` records only the
arguments passed explicitly, reads back with the values its class gave the rest.

The defaults are BioNeMo 2.4's class defaults (``BioBertConfig``, ``ESM2GenericConfig``,
``GeneformerConfig``), in schema form, with one deliberate difference: ``apply_rope_fusion`` and
``persist_layer_norm`` stay off, since they need Transformer Engine or Apex (megatron refuses them
without); set them on GPU nodes that have those.
Plain data: nothing here imports torch, megatron or BioNeMo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final


@dataclass(frozen=True)
class Family:
    """A model family: what ``model_cls`` alias builds, and from which defaults."""

    name: str
    architecture: str
    """The megatron model whose module tree (and state-dict keys) it builds: "gpt" or "bert"."""
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    """Field -> value (schema form) where the family's default differs from ModelConfig's."""
    bionemo_config_classes: tuple[str, ...] = ()
    """BioNeMo's config classes ("module:Class") whose checkpoints are of this family."""


# BioBertConfig's defaults: the base of every BioNeMo family (BioNeMo 2.4, bionemo.llm.model.biobert).
_BIOBERT: Final[dict[str, Any]] = {
    "num_layers": 6,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "seq_length": 1024,
    "init_method_std": 0.02,
    "position_embedding_type": "learned_absolute",
    "share_embeddings_and_output_weights": False,
    "make_vocab_size_divisible_by": 128,
    "bias_dropout_fusion": True,
    "bias_activation_fusion": True,
    "masked_softmax_fusion": True,
    "biobert_spec_option": "bert_layer_with_transformer_engine_spec",
    # BioNeMo's models never build BERT's next-sentence head (configure_model: do_next_sentence=False)
    "add_binary_head": False,
    "num_tokentypes": 0,
}

FAMILIES: Final[dict[str, Family]] = {
    family.name: family
    for family in (
        Family("gpt", "gpt", "megatron-core's GPTModel (decoder-only), megatron's defaults"),
        Family("bert", "bert", "megatron-core's BertModel (encoder), megatron's defaults"),
        Family(
            "biobert",
            "bert",
            "BioNeMo's BioBERT (MegatronBioBertModel): BERT without the next-sentence head, "
            "vocabulary padded to a multiple of 128",
            _BIOBERT,
            ("bionemo.llm.model.biobert.model:BioBertConfig",),
        ),
        Family(
            "esm2",
            "bert",
            "ESM-2 protein language model as BioNeMo builds it: rotary positions, tied embeddings, "
            "token dropout, ESM's query scaling; 650M-parameter shape by default",
            {
                **_BIOBERT,
                "num_layers": 33,
                "hidden_size": 1280,
                "num_attention_heads": 20,
                "ffn_hidden_size": 5120,
                "hidden_dropout": 0.0,
                "attention_dropout": 0.0,
                "layernorm_epsilon": 1e-5,
                "activation_func": "gelu",
                "softmax_scale": 1.0,
                "attention_softmax_in_fp32": False,
                "apply_query_key_layer_scaling": False,
                "position_embedding_type": "rope",
                "rotary_base": 10000,
                "rotary_percent": 1.0,
                "share_embeddings_and_output_weights": True,
                "biobert_spec_option": "esm2_bert_layer_with_transformer_engine_spec",
                "token_dropout": True,
                "use_attention_mask": True,
                "mask_token_id": 32,
            },
            ("bionemo.esm2.model.model:ESM2Config",),
        ),
        Family(
            "geneformer",
            "bert",
            "Geneformer single-cell model as BioNeMo builds it: learned positions, tied embeddings",
            {
                **_BIOBERT,
                "num_layers": 6,
                "hidden_size": 256,
                "ffn_hidden_size": 512,
                "num_attention_heads": 4,
                "seq_length": 2048,
                "attention_dropout": 0.1,
                "hidden_dropout": 0.02,
                "layernorm_epsilon": 1e-12,
                "activation_func": "gelu",
                "share_embeddings_and_output_weights": True,
                "enable_autocast": False,
            },
            ("bionemo.geneformer.api:GeneformerConfig",),
        ),
    )
}

BIONEMO_FAMILIES: Final[tuple[str, ...]] = tuple(n for n, f in FAMILIES.items() if f.bionemo_config_classes)

FAMILY_OF_BIONEMO_CLASS: Final[dict[str, str]] = {
    path: family.name for family in FAMILIES.values() for path in family.bionemo_config_classes
}
"""BioNeMo config class ("module:Class") -> the family its checkpoints are read as."""

BIONEMO_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "biobert_spec_option": BIONEMO_FAMILIES,
    "return_embeddings": BIONEMO_FAMILIES,
    "include_embeddings": BIONEMO_FAMILIES,
    "return_only_hidden_states": BIONEMO_FAMILIES,
    "include_hiddens": BIONEMO_FAMILIES,
    "include_input_ids": BIONEMO_FAMILIES,
    "skip_logits": BIONEMO_FAMILIES,
    "fp16_lm_cross_entropy": BIONEMO_FAMILIES,
    "parallel_output": BIONEMO_FAMILIES,
    "seq_len_interpolation_factor": BIONEMO_FAMILIES,
    "token_dropout": ("esm2",),
    "use_attention_mask": ("esm2",),
    "use_esm_attention": ("esm2",),
    "mask_token_id": ("esm2",),
}
"""Fields that only some families have -> those families (setting one for another family is an error)."""

NOT_IN_BIONEMO_CONFIGS: Final[frozenset[str]] = frozenset(
    {
        "model_cls",
        "vocab_size",
        "num_tokentypes",
        "add_binary_head",
        "mask_token_id",
        "initial_ckpt_path_ignore_weights",
    }
)
"""bioconf fields BioNeMo's config classes do not have (BioNeMo takes the vocabulary and the mask
token from its tokenizer): left out of a checkpoint context written for a BioNeMo class."""


def family(model_cls: str) -> Family | None:
    """The family ``model_cls`` names, or None for a user model class (an import path)."""
    return FAMILIES.get(model_cls)


def padded_vocab_size(vocab_size: int, divisible_by: int | None, tensor_parallel: int = 1) -> int:
    """The rows of the embedding and output layers for a vocabulary of ``vocab_size`` tokens.

    NeMo and BioNeMo pad to the next multiple of ``divisible_by`` x tensor-parallel size. A size that
    is already a multiple of both (a checkpoint's padded embedding, read back) is kept: the same
    checkpoint then loads at any tensor-parallel size, where NeMo's rule would ask 128 rows for 256
    at TP=2. None: no padding."""
    if divisible_by is None:
        return vocab_size
    tensor_parallel = max(tensor_parallel, 1)
    if vocab_size % divisible_by == 0 and vocab_size % tensor_parallel == 0:
        return vocab_size
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
