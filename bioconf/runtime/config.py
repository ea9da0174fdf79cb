"""The Megatron dataclass configs that bioconf materializes, drop-in for BioNeMo's
``bionemo.llm.model.config`` classes, and the way between them and the schema's ``ModelConfig``
(``materialize`` / ``from_schema`` and ``to_schema``).

Each is a megatron-core ``TransformerConfig`` whose explicit init arguments are tracked in
``__io__`` (``IOMixinWithGettersSetters``), so NeMo 2 can serialize and ``reinit`` it. Every
field has a default: a subclass is built from ``num_layers``, ``hidden_size`` and
``num_attention_heads`` alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from bioconf.errors import ConfigError, ConfigIssue
from bioconf.runtime.build import build_model
from bioconf.runtime.hparams import IOMixinWithGettersSetters, WillHaveGetSetHparam
from bioconf.runtime.models import ESM2Model
from bioconf.runtime.settings import SettingsReport, load_settings
from bioconf.runtime.values import import_object, to_megatron_kwargs, to_megatron_value, to_schema_values
from bioconf.runtime.weights import LoadReport, load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema.families import FAMILIES
from bioconf.schema.model import MODEL_CLS_ALIASES, OVERRIDE_BIONEMO_CONFIG_DEFAULTS, ModelConfig


@dataclass
class MegatronBioNeMoModelConfig(TransformerConfig, WillHaveGetSetHparam):
    """A TransformerConfig that knows which model it builds and the shapes it needs."""

    model_cls: type | None = None
    """The model class to build; None means the class's family default (GPTModel, BertModel)."""
    vocab_size: int | None = None
    """Vocabulary size of the embedding and output layers."""
    seq_length: int | None = None
    """Maximum sequence length."""
    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "learned_absolute"
    """Position embedding: learned absolute positions, rotary (rope), or none."""
    rotary_percent: float = 1.0
    """Fraction of each attention head's dimensions that rotary embeddings rotate."""
    rotary_base: int = 10000
    """Base period of the rotary embedding frequencies."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer's weights to the input embedding."""
    num_tokentypes: int = 0
    """BERT only: number of token types (segment embeddings); 0 disables them."""
    add_binary_head: bool = True
    """BERT only: add the next-sentence-prediction (binary) head."""
    make_vocab_size_divisible_by: int | None = None
    """Pad the embedding rows to a multiple of this times the tensor-parallel size (None: no padding)."""
    # BioNeMo's fields (bioconf.schema.model documents each; bioconf.schema.families says which
    # families have them). The output switches are recorded for BioNeMo and not used by bioconf.
    biobert_spec_option: str = "bert_layer_with_transformer_engine_spec"
    token_dropout: bool = False
    use_attention_mask: bool = False
    mask_token_id: int | None = None
    use_esm_attention: bool = False
    seq_len_interpolation_factor: float | None = None
    fp16_lm_cross_entropy: bool = False
    parallel_output: bool = True
    return_embeddings: bool = False
    include_embeddings: bool = False
    return_only_hidden_states: bool = False
    include_hiddens: bool = False
    include_input_ids: bool = False
    skip_logits: bool = False


@dataclass
class MegatronBioNeMoTrainableModelConfig(MegatronBioNeMoModelConfig):
    """A model config that may start from a NeMo 2 checkpoint (settings, then weights)."""

    initial_ckpt_path: str | None = None
    """Checkpoint directory to start from."""
    initial_ckpt_skip_keys_with_these_prefixes: list[str] = field(default_factory=list)
    """Model state-dict key prefixes whose weights are not loaded from the checkpoint."""
    initial_ckpt_path_ignore_weights: bool = False
    """Load only the settings from initial_ckpt_path, not its weights."""
    override_parent_fields: list[str] = field(default_factory=lambda: list(OVERRIDE_BIONEMO_CONFIG_DEFAULTS))
    """Fields whose value here is kept when settings are loaded from the checkpoint."""

    @classmethod
    def from_schema(
        cls, config: ModelConfig, source: str | None = None
    ) -> MegatronBioNeMoTrainableModelConfig:
        """The runtime config for ``config`` (``materialize``): the class its ``model_cls`` names."""
        return materialize(config, source)

    def to_schema(self) -> ModelConfig:
        """Runtime -> schema: the tracked init values (what a checkpoint records) as a ModelConfig.

        Fields with no JSON form (``NO_JSON_FORM``) have no schema counterpart and are left out.
        ``model_cls`` comes from the class (``BertModelConfig`` -> "bert") unless it was passed.
        """
        values = to_schema_values(self.get_hparams())
        alias = next((a for a in MODEL_CLS_ALIASES if type(self) is _RUNTIME_CLASSES[a]), None)
        if alias is None:  # a user model class: always by import path
            model_cls = self.get_hparam("model_cls")
            values["model_cls"] = f"{model_cls.__module__}:{model_cls.__qualname__}"
        elif alias != ModelConfig.model_fields["model_cls"].default:
            values["model_cls"] = alias
        return ModelConfig.model_validate(values)

    def load_settings_from_checkpoint(self, initial_ckpt_path: str) -> SettingsReport:
        """Load the checkpoint's settings into self, except the fields in ``override_parent_fields``:
        both the tracked init values (what a checkpoint saved later records) and the attributes
        (which ``__post_init__`` may have derived). Atomic; returns what changed."""
        return load_settings(self, initial_ckpt_path)  # type: ignore[arg-type]

    def update_model_from_checkpoint(
        self, model: MegatronModule, initial_ckpt_path: str, *, quiet: bool = False
    ) -> LoadReport:
        """Load the checkpoint's weights into ``model`` in place, except keys starting with a prefix in
        ``initial_ckpt_skip_keys_with_these_prefixes``; returns what was loaded and skipped."""
        return load_weights_sharded_inplace_nemo2_to_mcore(
            model, initial_ckpt_path, set(self.initial_ckpt_skip_keys_with_these_prefixes), quiet=quiet
        )

    def configure_model(self, vp_stage: int | None = None) -> MegatronModule:
        """The model for this rank (and virtual pipeline stage). Starting from ``initial_ckpt_path``,
        its settings come first (they fix the shapes), then its weights, unless
        ``initial_ckpt_path_ignore_weights``."""
        return self.build_and_load(vp_stage).model

    def build_and_load(self, vp_stage: int | None = None, *, quiet: bool = False) -> BuiltModel:
        """``configure_model`` that also returns what loading the settings and weights did
        (``quiet``: no progress bar while loading)."""
        checkpoint = self.initial_ckpt_path
        settings = self.load_settings_from_checkpoint(checkpoint) if checkpoint else None
        model = build_model(self, vp_stage)
        weights = None
        if checkpoint and not self.initial_ckpt_path_ignore_weights:
            weights = self.update_model_from_checkpoint(model, checkpoint, quiet=quiet)
        return BuiltModel(model, settings, weights)


@dataclass(frozen=True)
class BuiltModel:
    """A model built for this rank, with the reports of what came from the starting checkpoint."""

    model: MegatronModule
    settings: SettingsReport | None
    """None when the config does not start from a checkpoint."""
    weights: LoadReport | None
    """None without a checkpoint, or with ``initial_ckpt_path_ignore_weights``."""


@dataclass
class GPTModelConfig(MegatronBioNeMoTrainableModelConfig, IOMixinWithGettersSetters):
    """Builds megatron-core's ``GPTModel`` (decoder-only)."""

    model_cls: type | None = GPTModel


@dataclass
class BertModelConfig(MegatronBioNeMoTrainableModelConfig, IOMixinWithGettersSetters):
    """Builds megatron-core's ``BertModel`` (encoder, e.g. ESM-2-style protein language models)."""

    model_cls: type | None = BertModel


@dataclass
class CustomModelConfig(MegatronBioNeMoTrainableModelConfig, IOMixinWithGettersSetters):
    """Builds a user model class named by ``model_cls``."""


def _family_config(alias: str, model_class: type, doc: str) -> type[BertModelConfig]:
    """A BertModelConfig whose defaults are the family's (``bioconf.schema.families``, the one table
    of them), so that ``ESM2ModelConfig(num_layers=6)`` is what BioNeMo's ``ESM2Config(num_layers=6)`` is."""
    types = {f.name: f.type for f in dataclasses.fields(BertModelConfig)}
    fields = [("model_cls", "type | None", field(default=model_class))]
    fields += [
        (name, types[name], field(default=to_megatron_value(name, value)))
        for name, value in FAMILIES[alias].defaults.items()
    ]
    name = f"{alias.capitalize() if alias != 'esm2' else 'ESM2'}ModelConfig"
    return dataclasses.make_dataclass(
        name, fields, bases=(BertModelConfig,), namespace={"__module__": __name__, "__doc__": doc}
    )


ESM2ModelConfig = _family_config("esm2", ESM2Model, "BioNeMo's ESM2Config, built with bioconf's ESM2Model.")
GeneformerModelConfig = _family_config("geneformer", BertModel, "BioNeMo's GeneformerConfig.")
BiobertModelConfig = _family_config("biobert", BertModel, "BioNeMo's BioBertConfig.")

_RUNTIME_CLASSES: dict[str, type[MegatronBioNeMoTrainableModelConfig]] = {
    "gpt": GPTModelConfig,
    "bert": BertModelConfig,
    "esm2": ESM2ModelConfig,
    "geneformer": GeneformerModelConfig,
    "biobert": BiobertModelConfig,
    "custom": CustomModelConfig,
}
"""The runtime config class for each kind of ``model_cls`` (``bioconf.checkpoint.context`` writes
their names into io.json as ``RUNTIME_CONFIG_CLASSES``)."""


def materialize(config: ModelConfig, source: str | None = None) -> MegatronBioNeMoTrainableModelConfig:
    """Build the runtime config for ``config``. Its ``__io__`` records exactly the fields set in
    ``config`` (``model_fields_set``), so a checkpoint saved from it holds the user's choices.
    ``model_cls`` is implied by the class for "gpt"/"bert", imported for an import path; a
    config megatron rejects (its environment-dependent checks) raises ConfigError naming ``source``."""
    kwargs: dict[str, Any] = to_megatron_kwargs(config)
    kwargs.pop("model_cls", None)
    if config.model_cls in MODEL_CLS_ALIASES:
        cls = _RUNTIME_CLASSES[config.model_cls]
    else:
        cls = CustomModelConfig
        kwargs["model_cls"] = _import_model_class(config.model_cls, source)
    try:
        return cls(**kwargs)
    except Exception as error:  # megatron's environment-dependent checks (TE, CUDA) live in __post_init__
        raise ConfigError.one(
            f"megatron-core rejected the config: {type(error).__name__}: {error}",
            "megatron_error",
            source=source,
        ) from error


def _import_model_class(path: str, source: str | None) -> type[torch.nn.Module]:
    """The user's model class ``"package.module:Class"``: imported, and checked to be a module class."""

    def refuse(message: str, kind: str) -> ConfigError:
        return ConfigError([ConfigIssue(message, kind, ("model_cls",), path, source)])

    try:
        model_class = import_object(path)
    except (ImportError, AttributeError) as error:
        raise refuse(f"cannot import the model class: {error}", "import_error") from None
    if not (isinstance(model_class, type) and issubclass(model_class, torch.nn.Module)):
        raise refuse(f"not a model class: {path} is a {type(model_class).__name__}", "not_a_model_class")
    return model_class


def to_schema(runtime_config: MegatronBioNeMoTrainableModelConfig) -> ModelConfig:
    """``runtime_config.to_schema()``."""
    return runtime_config.to_schema()
