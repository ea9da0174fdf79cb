"""The runtime layer: tracked hyper-parameters, materialization, and settings from a checkpoint."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import nemo.lightning as nl
import pytest
import torch
from conftest import nemo_dump
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_model import GPTModel
from nemo.lightning import io

from bioconf.checkpoint.context import read_checkpoint_config, write_checkpoint_context
from bioconf.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    InvalidMergeError,
)
from bioconf.resolve import merge, resolve
from bioconf.runtime import (
    BertModelConfig,
    CustomModelConfig,
    GPTModelConfig,
    IOMixinProto,
    IOMixinWithGettersSetters,
    MegatronBioNeMoTrainableModelConfig,
    materialize,
    override_mutate_possibly_extra_mutated_fiddle,
    to_schema,
)
from bioconf.schema import OVERRIDE_BIONEMO_CONFIG_DEFAULTS, ModelConfig

SMALL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


class TinyModel(pl.LightningModule, io.IOMixin):
    """A NeMo module holding a bioconf config, as a BioNeMo model holds its config."""

    def __init__(self, config):
        super().__init__()
        self.config = config


# ---- tracked hyper-parameters ------------------------------------------------------------------


def test_only_explicit_arguments_are_tracked():
    config = GPTModelConfig(**SMALL, bf16=True)
    assert config.get_hparams() == {**SMALL, "bf16": True}
    assert isinstance(config, IOMixinProto)


def test_tracked_value_and_attribute_can_differ():
    config = GPTModelConfig(**SMALL)
    config.set_hparam("hidden_dropout", 0.3, also_change_value=False)
    assert (config.get_hparam("hidden_dropout"), config.hidden_dropout) == (0.3, 0.1)
    config.set_hparam("hidden_dropout", 0.4)
    assert (config.get_hparam("hidden_dropout"), config.hidden_dropout) == (0.4, 0.4)


def test_get_hparam_falls_back_to_defaults_including_default_factories():
    config = GPTModelConfig(**SMALL)
    assert config.get_hparam("ffn_hidden_size") is None  # tracked: not passed
    assert config.ffn_hidden_size == 256  # attribute: derived by __post_init__
    assert config.get_hparam("offload_modules") == []  # megatron's default_factory field
    assert config.get_hparam("override_parent_fields") == list(OVERRIDE_BIONEMO_CONFIG_DEFAULTS)


def test_unknown_hparam_lists_valid_names():
    config = GPTModelConfig(**SMALL)
    with pytest.raises(
        KeyError, match="'hiden_size' is not an init argument of GPTModelConfig; valid names: "
    ):
        config.get_hparam("hiden_size")
    with pytest.raises(KeyError, match="hidden_size"):
        config.set_hparam("hiden_size", 3)


def test_non_default_hparams():
    config = GPTModelConfig(**SMALL, hidden_dropout=0.1, bf16=True)  # 0.1 is the default
    assert set(config.get_non_default_hparams()) == {*SMALL, "bf16"}


@dataclasses.dataclass
class ProteinConfig(MegatronBioNeMoTrainableModelConfig, IOMixinWithGettersSetters):
    """A user subclass in the seed's style: overrides a parent default, adds a field."""

    num_layers: int = 6
    hidden_size: int = 320
    num_attention_heads: int = 20
    head_size: int = 7


def test_user_subclass_overrides_parent_defaults():
    config = ProteinConfig()
    assert config.get_hparams() == {}
    assert (config.get_hparam("num_layers"), config.get_hparam("head_size")) == (6, 7)
    assert ProteinConfig(num_layers=2).get_hparams() == {"num_layers": 2}


def test_reinit_rebuilds_from_tracked_values():
    config = GPTModelConfig(**SMALL, params_dtype=torch.bfloat16, bf16=True)
    config.set_hparam("hidden_dropout", 0.25, also_change_value=False)
    rebuilt = io.reinit(config)
    assert type(rebuilt) is GPTModelConfig
    assert rebuilt.hidden_dropout == 0.25 and rebuilt.params_dtype == torch.bfloat16
    assert rebuilt.get_hparams() == config.get_hparams()


def test_nemo_trainer_context_with_this_config_round_trips(tmp_path):
    config = BertModelConfig(**SMALL, vocab_size=33, params_dtype=torch.bfloat16, bf16=True)
    trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    nemo_dump(io, trainer, TinyModel(config), tmp_path / "context")
    loaded = io.load_context(tmp_path / "context", subpath="model.config")
    assert type(loaded) is BertModelConfig
    assert loaded.get_hparams() == config.get_hparams()
    assert to_schema(loaded) == to_schema(config)
    assert (loaded.ffn_hidden_size, loaded.kv_channels) == (256, 16)  # __post_init__ ran again


def test_override_mutate_copies_tracked_then_attribute():
    target = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2)
    source = GPTModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    override_mutate_possibly_extra_mutated_fiddle(target, source, ["hidden_size", "ffn_hidden_size"])
    assert (target.get_hparam("hidden_size"), target.hidden_size) == (64, 64)
    # ffn_hidden_size: the tracked value stays "not passed"; the attribute takes the source's derived value
    assert (target.get_hparam("ffn_hidden_size"), target.ffn_hidden_size) == (None, 256)


# ---- materialization ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_cls", "runtime_class", "model_class"),
    [("gpt", GPTModelConfig, GPTModel), ("bert", BertModelConfig, BertModel)],
)
def test_materialize_picks_the_class_and_records_only_set_fields(model_cls, runtime_class, model_class):
    schema = ModelConfig(**SMALL, model_cls=model_cls, params_dtype="bf16", bf16=True, activation_func="silu")
    runtime = materialize(schema)
    assert type(runtime) is runtime_class and runtime.model_cls is model_class
    assert runtime.params_dtype is torch.bfloat16 and runtime.activation_func is torch.nn.functional.silu
    assert set(runtime.get_hparams()) == schema.model_fields_set - {"model_cls"}


def test_materialize_imports_a_user_model_class_only_here():
    runtime = materialize(ModelConfig(**SMALL, model_cls="megatron.core.models.gpt.gpt_model:GPTModel"))
    assert type(runtime) is CustomModelConfig and runtime.model_cls is GPTModel
    with pytest.raises(ConfigError, match="model_cls: cannot import the model class"):
        materialize(ModelConfig(**SMALL, model_cls="no_such_package.models:Model"))


round_trip_values = st.fixed_dictionaries(
    {
        "num_layers": st.integers(1, 8),
        "hidden_size": st.sampled_from([64, 128]),
        "num_attention_heads": st.just(4),
    },
    optional={
        "model_cls": st.sampled_from(["gpt", "bert", "megatron.core.models.bert.bert_model:BertModel"]),
        "params_dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
        "activation_func": st.sampled_from(["gelu", "silu", "squared_relu", "quick_gelu"]),
        "attention_backend": st.sampled_from(["auto", "local", "flash"]),
        "hidden_dropout": st.floats(0, 1),
        "window_size": st.tuples(st.integers(-1, 64), st.integers(-1, 64)),
        "ffn_hidden_size": st.integers(1, 512),
        "normalization": st.sampled_from(["LayerNorm", "RMSNorm"]),
        "vocab_size": st.integers(1, 1000),
        "position_embedding_type": st.sampled_from(["rope", "learned_absolute"]),
        "initial_ckpt_skip_keys_with_these_prefixes": st.just(["head."]),
        "override_parent_fields": st.just(["hidden_size"]),
    },
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(round_trip_values)
def test_schema_runtime_schema_round_trip_is_exact(values):
    schema = ModelConfig.model_validate(values)
    back = to_schema(materialize(schema))
    assert back == schema
    # "gpt" is the default and the class implies it: a runtime GPTModelConfig does not record it.
    implied = {"model_cls"} if schema.model_cls == "gpt" else set()
    assert back.model_fields_set == schema.model_fields_set - implied


# ---- settings from a checkpoint ----------------------------------------------------------------


def checkpoint(tmp_path: Path, **fields) -> Path:
    write_checkpoint_context(ModelConfig(**fields), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_load_settings_from_a_bioconf_checkpoint(tmp_path):
    ckpt = checkpoint(
        tmp_path,
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        hidden_dropout=0.2,
        vocab_size=100,
        bf16=True,
        params_dtype="bf16",
        fp16=False,
    )
    config = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=50)
    report = config.load_settings_from_checkpoint(str(ckpt))
    # Taken from the checkpoint, tracked and attribute:
    assert (config.num_layers, config.get_hparam("num_layers"), config.hidden_dropout) == (4, 4, 0.2)
    # Derived attributes follow the checkpoint's derivation; the tracked value stays unset.
    assert (config.ffn_hidden_size, config.get_hparam("ffn_hidden_size")) == (256, None)
    # override_parent_fields kept (bf16 and params_dtype are in the default keep-list).
    assert (config.bf16, config.params_dtype) == (False, torch.float32)
    assert report.changed["hidden_size"] == (32, 64) and report.changed["ffn_hidden_size"] == (128, 256)
    assert "bf16" in report.kept and "init_method" in report.not_carried
    assert report.unknown == {} and not report.class_defaults_unknown


def test_load_settings_from_a_nemo_checkpoint_whose_class_is_gone(tmp_path):
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    name = f"gone_{uuid.uuid4().hex}"
    (module_dir / f"{name}.py").write_text(
        "from dataclasses import dataclass\n"
        "from megatron.core.transformer.transformer_config import TransformerConfig\n"
        "from nemo.lightning import io\n\n"
        "@dataclass\nclass ESMLikeConfig(TransformerConfig, io.IOMixin):\n"
        "    vocab_size: int = 33\n    esm_special: str = 'x'\n"
    )
    sys.path.insert(0, str(module_dir))
    try:
        module = importlib.import_module(name)
        source = module.ESMLikeConfig(
            num_layers=3,
            hidden_size=48,
            num_attention_heads=4,
            vocab_size=33,
            activation_func=torch.nn.functional.silu,
            esm_special="y",
        )
        trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        nemo_dump(io, trainer, TinyModel(source), tmp_path / "ckpt" / "context")
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop(name, None)
        (module_dir / f"{name}.py").unlink()

    config = BertModelConfig(**SMALL)
    report = config.load_settings_from_checkpoint(str(tmp_path / "ckpt"))
    assert name not in sys.modules  # read as data, never imported
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (3, 48, 33)
    assert config.activation_func is torch.nn.functional.silu
    assert report.class_path == f"{name}:ESMLikeConfig" and report.class_defaults_unknown
    assert report.unknown == {"esm_special": "y"}


@dataclasses.dataclass
class RefusesLateDropout(GPTModelConfig):
    """Refuses one value of attention_dropout, which the override reaches after it has changed
    earlier fields (num_layers comes first in the dataclass); records num_layers at that moment."""

    seen_at_refusal: ClassVar[list[int]] = []

    def __setattr__(self, name, value):
        if name == "attention_dropout" and value == 0.33:
            self.seen_at_refusal.append(self.num_layers)
            raise ValueError("attention_dropout 0.33 is refused")
        super().__setattr__(name, value)


def test_failed_load_restores_every_field_it_had_changed(tmp_path):
    ckpt = checkpoint(tmp_path, num_layers=6, hidden_size=128, num_attention_heads=8, attention_dropout=0.33)
    config = RefusesLateDropout(num_layers=2, hidden_size=32, num_attention_heads=2)
    before = (dict(config.__dict__), dict(config.__io__.__arguments__))
    with pytest.raises(CheckpointError, match=r"attention_dropout 0\.33 is refused"):
        config.load_settings_from_checkpoint(str(ckpt))
    assert RefusesLateDropout.seen_at_refusal == [6]  # the failure came after num_layers changed ...
    assert (dict(config.__dict__), dict(config.__io__.__arguments__)) == before  # ... and was undone


def test_missing_context_says_what_was_expected(tmp_path):
    config = GPTModelConfig(**SMALL)
    with pytest.raises(CheckpointNotFoundError, match=r"context/io\.json"):
        config.load_settings_from_checkpoint(str(tmp_path))


# ---- one merge: the runtime's settings load and the schema's resolve agree -------------------------

_VARIED = {
    "num_layers": st.integers(1, 4),
    "hidden_size": st.sampled_from([32, 64]),
    "num_attention_heads": st.sampled_from([2, 4]),
    "ffn_hidden_size": st.sampled_from([None, 96, 128]),
    "hidden_dropout": st.floats(0, 0.5),
    "attention_dropout": st.floats(0, 0.5),
    "layernorm_epsilon": st.sampled_from([1e-5, 1e-6]),
    "normalization": st.sampled_from(["LayerNorm", "RMSNorm"]),
    "activation_func": st.sampled_from(["gelu", "silu"]),
    "params_dtype": st.sampled_from(["float32", "bfloat16"]),
    "vocab_size": st.integers(8, 64),
    "seq_length": st.sampled_from([16, 32]),
    "position_embedding_type": st.sampled_from(["rope", "learned_absolute"]),
    "model_cls": st.sampled_from(["gpt", "bert"]),
    "add_bias_linear": st.booleans(),
    "init_method_std": st.floats(0.001, 0.05),
}
_ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads")
_config_values = st.fixed_dictionaries(
    {name: _VARIED[name] for name in _ARCHITECTURE},
    optional={name: strategy for name, strategy in _VARIED.items() if name not in _ARCHITECTURE},
)
_keep_lists = st.lists(
    st.sampled_from(["hidden_dropout", "attention_dropout", "layernorm_epsilon", "init_method_std"]),
    unique=True,
).map(lambda extra: [*OVERRIDE_BIONEMO_CONFIG_DEFAULTS, *extra])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(ours=_config_values, theirs=_config_values, keep=_keep_lists)
def test_load_settings_and_resolve_are_one_merge(ours, theirs, keep, tmp_path_factory):
    """For any config and checkpoint: the runtime config after load_settings_from_checkpoint, read
    back as schema, is exactly what resolve(..., policy="seed") merges (or both refuse the merge)."""
    try:
        config = ModelConfig(**ours, override_parent_fields=keep)
        saved = ModelConfig(**theirs)
    except ValueError:
        return  # a rule rejects the combination: nothing to merge
    ckpt = tmp_path_factory.mktemp("ckpt")
    write_checkpoint_context(saved, ckpt)
    runtime = materialize(config)
    before = (dict(runtime.__dict__), dict(runtime.__io__.__arguments__))
    try:
        resolved = resolve(config, ckpt, policy="seed")
        merged, derived = resolved.config, resolved.derived
    except InvalidMergeError:
        with pytest.raises(InvalidMergeError):
            runtime.load_settings_from_checkpoint(str(ckpt))
        assert (dict(runtime.__dict__), dict(runtime.__io__.__arguments__)) == before
        return
    except CheckpointMismatchError:  # the weights would not fit; the settings still merge
        merged, derived = merge(config, read_checkpoint_config(ckpt), keep)[0], {}
    runtime.load_settings_from_checkpoint(str(ckpt))
    assert runtime.to_schema().to_dict() == merged.to_dict()
    # The attributes megatron derives follow the merged values, as resolve reports them.
    for name, value in derived.items():
        assert getattr(runtime, name) == value, name


# ---- nothing a checkpoint names is imported ------------------------------------------------------

_ZEN_PROGRAM = """
import subprocess
import sys
from bioconf.runtime import GPTModelConfig
config = GPTModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, override_parent_fields={keep!r})
try:
    config.load_settings_from_checkpoint({ckpt!r})
except Exception as error:
    print(type(error).__name__, error)
print("imported" if "this" in sys.modules else "not imported")
"""


@pytest.mark.parametrize("keep_model_cls", [True, False])
def test_a_model_class_named_by_a_checkpoint_is_never_imported(tmp_path, keep_model_cls):
    """`this` prints the Zen of Python when imported: a checkpoint must not make bioconf import it."""
    ckpt = checkpoint(tmp_path, **SMALL, model_cls="this:s")
    keep = [n for n in OVERRIDE_BIONEMO_CONFIG_DEFAULTS if keep_model_cls or n != "model_cls"]
    result = subprocess.run(
        [sys.executable, "-c", _ZEN_PROGRAM.format(keep=keep, ckpt=str(ckpt))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Beautiful is better than ugly" not in result.stdout
    assert result.stdout.strip().endswith("not imported")
    if not keep_model_cls:
        assert (
            "CheckpointError" in result.stdout
            and "imports only a model class the config names" in result.stdout
        )


def test_a_model_class_must_be_a_module_class():
    with pytest.raises(ConfigError, match="not a model class: os:system is a builtin_function_or_method"):
        materialize(ModelConfig(**SMALL, model_cls="os:system"))
