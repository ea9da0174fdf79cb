"""ModelConfig: strict values, helpful errors, override lists, canonical serialization."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bioconf.schema import OVERRIDE_BIONEMO_CONFIG_DEFAULTS, ModelConfig, OverrideError


def error_types(excinfo) -> dict[str, str]:
    return {".".join(map(str, e["loc"])): e["type"] for e in excinfo.value.errors()}


BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


def test_three_fields_make_a_config():
    config = ModelConfig(**BASE)
    assert config.model_fields_set == set(BASE)
    assert config.params_dtype == "float32" and config.activation_func == "gelu"
    assert list(config.override_parent_fields) == list(OVERRIDE_BIONEMO_CONFIG_DEFAULTS)


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("num_layers", 3.7, "int_type"),
        ("num_layers", 3.0, "int_type"),  # no silent float -> int
        ("num_layers", "3", "int_type"),
        ("bf16", 1, "bool_type"),
        ("bf16", "true", "bool_type"),
        ("hidden_dropout", "0.1", "float_type"),
        ("normalization", "layernorm", "literal_error"),
        ("params_dtype", "bf17", "dtype"),
        ("activation_func", "swish2", "activation"),
        ("model_cls", "not a path", "string_pattern_mismatch"),
        ("vocab_size", 0, "greater_than_equal"),
    ],
)
def test_no_silent_coercion(field, value, kind):
    with pytest.raises(ValidationError) as excinfo:
        ModelConfig(**{**BASE, field: value})
    assert error_types(excinfo)[field] == kind


def test_float_field_accepts_an_integer():
    assert ModelConfig(**BASE, hidden_dropout=0).hidden_dropout == 0.0


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "torch.bfloat16", "BF16", " bf16 "])
def test_dtype_spellings_are_canonicalized(spelling):
    assert ModelConfig(**BASE, params_dtype=spelling).params_dtype == "bfloat16"


def test_torch_dtype_and_function_objects_are_accepted_from_notebooks():
    torch = pytest.importorskip("torch")
    config = ModelConfig(**BASE, params_dtype=torch.bfloat16, activation_func=torch.nn.functional.silu)
    assert (config.params_dtype, config.activation_func) == ("bfloat16", "silu")
    assert ModelConfig(**BASE, activation_func=torch.nn.functional.gelu).activation_func == "gelu"


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("silu", "silu"),
        ("torch.nn.functional.silu", "silu"),
        ("megatron.core.activations.squared_relu", "squared_relu"),
    ],
)
def test_activation_spellings(spelling, name):
    assert ModelConfig(**BASE, activation_func=spelling).activation_func == name


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ValidationError) as excinfo:
        ModelConfig.model_validate({**BASE, "hidden_sise": 512, "zzz": 1})
    messages = {e["loc"][0]: e["msg"] for e in excinfo.value.errors()}
    assert messages["hidden_sise"] == "unknown field 'hidden_sise'; did you mean 'hidden_size'?"
    assert messages["zzz"] == "unknown field 'zzz'"


def test_every_error_is_reported_not_only_the_first():
    with pytest.raises(ValidationError) as excinfo:
        ModelConfig.model_validate({**BASE, "num_layers": 1.5, "bf16": "yes", "nope": 1})
    assert set(error_types(excinfo)) == {"num_layers", "bf16", "nope"}


def test_override_parent_fields_must_name_fields():
    with pytest.raises(ValidationError) as excinfo:
        ModelConfig(**BASE, override_parent_fields=["hidden_size", "hiden_dropout"])
    (error,) = excinfo.value.errors()
    assert error["loc"] == ("override_parent_fields",)
    assert "'hiden_dropout' (item 1) is not a field; did you mean 'hidden_dropout'?" in error["msg"]
    with pytest.raises(ValidationError, match="listed twice"):
        ModelConfig(**BASE, override_parent_fields=["bf16", "bf16"])
    # BioNeMo-only names from the default list are accepted.
    assert (
        ModelConfig(**BASE, override_parent_fields=["train_metric", "seq_length"]).override_parent_fields[0]
        == "train_metric"
    )


@pytest.mark.parametrize("prefix", ["", ".head", "head..x", "head x", "a/b"])
def test_bad_skip_prefixes(prefix):
    with pytest.raises(ValidationError):
        ModelConfig(**BASE, initial_ckpt_skip_keys_with_these_prefixes=[prefix])


def test_skip_prefixes_valid_and_unique():
    config = ModelConfig(
        **BASE, initial_ckpt_skip_keys_with_these_prefixes=["head.", "encoder.layers.11", "lm_head"]
    )
    assert len(config.initial_ckpt_skip_keys_with_these_prefixes) == 3
    with pytest.raises(ValidationError, match=r"listed twice: head\."):
        ModelConfig(**BASE, initial_ckpt_skip_keys_with_these_prefixes=["head.", "head."])


def test_model_cls_alias_or_import_path():
    assert ModelConfig(**BASE, model_cls="bert").model_cls == "bert"
    assert ModelConfig(**BASE, model_cls="my_pkg.models:ProteinLM").model_cls == "my_pkg.models:ProteinLM"


def test_frozen():
    config = ModelConfig(**BASE)
    with pytest.raises(ValidationError):
        config.num_layers = 3


def test_repr_shows_only_explicit_fields():
    assert repr(ModelConfig(**BASE)) == "ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)"


# ---- overrides ------------------------------------------------------------------------------


def test_with_overrides_parses_values_and_appends(small_gpt):
    base = ModelConfig(**small_gpt)
    new = base.with_overrides(
        "hidden_size=128", "params_dtype=bf16", 'override_parent_fields+=["seq_length"]'
    )
    assert new.hidden_size == 128 and new.params_dtype == "bfloat16"
    assert new.override_parent_fields[-1] == "seq_length"
    assert new.override_parent_fields[:-1] == list(OVERRIDE_BIONEMO_CONFIG_DEFAULTS)
    assert {"hidden_size", "params_dtype", "override_parent_fields"} <= new.model_fields_set
    assert base.hidden_size == 64  # the original is untouched
    assert base.with_overrides({"num_layers": 4}).num_layers == 4


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("hidden_size=3.5", "--set hidden_size=3.5"),
        ("hiden_size=3", "did you mean 'hidden_size'"),
        ("no_equals_sign", "expected KEY=VALUE"),
        ("num_layers+=[1]", "+= needs a list field"),
        ("a.b=1", "nested keys are not supported"),
    ],
)
def test_bad_override_names_the_override(small_gpt, override, fragment):
    with pytest.raises(OverrideError) as excinfo:
        ModelConfig(**small_gpt).with_overrides(override)
    assert fragment in str(excinfo.value)


# ---- canonical serialization ----------------------------------------------------------------


def test_canonical_json_is_sorted_and_stable():
    a = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, params_dtype="bf16")
    b = ModelConfig(num_layers=2, num_attention_heads=4, params_dtype="torch.bfloat16", hidden_size=64)
    assert a.to_json() == b.to_json() and a.fingerprint() == b.fingerprint()
    keys = list(orjson.loads(a.to_json()))
    assert keys == sorted(keys)
    assert orjson.loads(a.to_json(exclude_defaults=True)) == {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_layers": 2,
        "params_dtype": "bfloat16",
    }
    assert a.fingerprint() != ModelConfig(hidden_size=64, num_layers=3, num_attention_heads=4).fingerprint()


field_values = st.fixed_dictionaries(
    {
        "num_layers": st.integers(1, 96),
        "hidden_size": st.sampled_from([64, 128, 1024]),
        "num_attention_heads": st.sampled_from([1, 2, 4, 8]),
    },
    optional={
        "hidden_dropout": st.floats(0, 1, allow_nan=False),
        "layernorm_epsilon": st.floats(1e-12, 1e-3),
        "params_dtype": st.sampled_from(["fp32", "bf16", "torch.float16", "float64"]),
        "activation_func": st.sampled_from(["gelu", "silu", "squared_relu", "torch.nn.functional.relu"]),
        "normalization": st.sampled_from(["LayerNorm", "RMSNorm"]),
        "window_size": st.none() | st.tuples(st.integers(-1, 512), st.integers(-1, 512)),
        "attention_backend": st.sampled_from(["auto", "flash", "local"]),
        "model_cls": st.sampled_from(["gpt", "bert", "pkg.mod:Cls"]),
        "initial_ckpt_skip_keys_with_these_prefixes": st.lists(
            st.from_regex(r"[a-z_]{1,8}(\.[a-z0-9_]{1,5}){0,2}\.?", fullmatch=True), unique=True, max_size=3
        ),
        "override_parent_fields": st.lists(
            st.sampled_from(["hidden_size", "bf16", "seq_length"]), unique=True
        ),
        "vocab_size": st.none() | st.integers(1, 10**6),
        "offload_modules": st.lists(st.sampled_from(["attn_norm", "mlp_norm"]), unique=True),
    },
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(field_values)
def test_validate_of_dump_is_identity(values):
    config = ModelConfig.model_validate(values)
    again = ModelConfig.model_validate_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()
    sparse = ModelConfig.model_validate(orjson.loads(config.to_json(exclude_defaults=True)))
    assert sparse == config
