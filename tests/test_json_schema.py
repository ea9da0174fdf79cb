"""The exported JSON Schema, checked by an independent validator (jsonschema)."""

from __future__ import annotations

import jsonschema
import pytest
from conftest import EXAMPLES

from bioconf.schema import ModelConfig, json_schema, read_document
from bioconf.schema.groups import GROUPS


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_field_is_documented_and_placed():
    properties = json_schema()["properties"]
    assert set(properties) == set(ModelConfig.model_fields)
    for name, prop in properties.items():
        assert prop["title"] and "description" in prop, name
        assert prop["x-group"] in GROUPS, name
        assert prop["x-level"] in {"basic", "advanced"}, name
    assert properties["params_dtype"]["enum"] == ["float32", "float16", "bfloat16", "float64"]
    assert properties["params_dtype"]["default"] == "float32"
    assert "gelu" in properties["activation_func"]["enum"]
    assert properties["override_parent_fields"]["default"][0] == "initial_ckpt_skip_keys_with_these_prefixes"
    assert "hidden_size" in properties["override_parent_fields"]["items"]["enum"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")) + sorted(EXAMPLES.glob("*.yaml")), ids=str)
def test_examples_pass_the_schema(validator, path):
    validator.validate(read_document(path).data)


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_sise": 12},  # unknown key
        {"num_layers": 2.5},  # wrong type
        {"num_layers": "2"},
        {"params_dtype": "fp8"},  # not a dtype name
        {"normalization": "BatchNorm"},  # not in the Literal
        {"window_size": [1, 2, 3]},  # wrong tuple length
        {"vocab_size": 0},  # below the bound
        {"model_cls": "not a path"},  # pattern
        {"override_parent_fields": ["hiden_size"]},  # not a field name
    ],
    ids=str,
)
def test_invalid_configs_are_rejected_by_both(validator, change):
    document = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, **change}
    assert not validator.is_valid(document)
    with pytest.raises(ValueError):
        ModelConfig.model_validate(document)
