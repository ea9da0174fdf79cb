"""The checked-in field table agrees with the installed megatron-core."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
from conftest import ROOT
from megatron.core.transformer.transformer_config import TransformerConfig

from bioconf.schema import ModelConfig
from bioconf.schema.megatron_fields import MEGATRON_FIELD_NAMES, NO_JSON_FORM


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_fields", ROOT / "tools" / "generate_fields.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate_fields"] = module
    spec.loader.exec_module(module)
    return module


def test_checked_in_table_is_what_the_generator_writes_today():
    generator = load_generator()
    expected = generator.format_source(generator.render())
    actual = generator.TARGET.read_text()
    assert actual == expected, "bioconf/schema/megatron_fields.py is stale: run `make schema-table`"


def test_every_transformer_config_field_is_covered_or_listed():
    megatron_names = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert len(megatron_names) == 242
    assert MEGATRON_FIELD_NAMES | set(NO_JSON_FORM) == megatron_names
    assert not MEGATRON_FIELD_NAMES & set(NO_JSON_FORM)
    assert set(ModelConfig.model_fields) >= MEGATRON_FIELD_NAMES


@pytest.mark.parametrize("name", sorted(MEGATRON_FIELD_NAMES))
def test_default_matches_megatron(name):
    field = next(f for f in dataclasses.fields(TransformerConfig) if f.name == name)
    megatron_default = (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    )
    ours = ModelConfig.model_fields[name].get_default(call_default_factory=True)
    if hasattr(megatron_default, "is_floating_point"):  # torch.dtype
        assert ours == str(megatron_default).removeprefix("torch.")
    elif hasattr(megatron_default, "name") and hasattr(megatron_default, "value"):  # enum
        assert ours == megatron_default.name
    elif callable(megatron_default):
        assert ours == megatron_default.__name__
    else:
        assert ours == megatron_default


def test_descriptions_come_from_megatron_docstrings():
    fields = ModelConfig.model_fields
    described = [name for name in MEGATRON_FIELD_NAMES if fields[name].description]
    assert len(described) >= 0.9 * len(MEGATRON_FIELD_NAMES)
    assert "Intra-layer model parallelism" in fields["tensor_model_parallel_size"].description
