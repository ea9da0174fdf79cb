"""The exported JSON Schema, checked by an independent validator (jsonschema).

The contract: every document bioconf accepts validates against the schema. JSON Schema cannot
express megatron's cross-field rules, so the schema may be looser than bioconf, never stricter.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin

import jsonschema
import pytest
from annotated_types import Ge
from conftest import EXAMPLES, fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import BeforeValidator, StringConstraints, ValidationError
from pydantic.fields import FieldInfo

from bioconf.schema import BIONEMO_ONLY_FIELDS, ModelConfig, json_schema, read_document
from bioconf.schema.groups import GROUPS
from bioconf.schema.json_schema import _portable
from bioconf.schema.megatron_fields import DTYPE_FIELDS, ENUM_FIELDS
from bioconf.schema.names import (
    _ACTIVATION_MODULE_ALIASES,
    _DTYPE_SPELLINGS,
    ACTIVATIONS,
    DTYPE_NAMES,
    canonical_activation,
    canonical_dtype,
)

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
# pydantic matches patterns with Rust's regex engine, whose \w takes letters with combining marks
# (m\u0301) that Python's and ECMA-262's do not.
MODEL_CLASSES = ["gpt", "bert", "pkg.models:Model", "módulo:Clase", "pkg.m\u0301:Cls", "m:Outer.Inner_2"]
# What str.strip() removes: bioconf strips dtype and activation spellings before looking them up.
SPACES = tuple(ch for ch in map(chr, range(0x110000)) if ch.isspace())


@functools.cache
def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def validator():
    return schema_validator()


def choices(prop: dict[str, Any]) -> list[Any] | None:
    """The dropdown the editor page renders for a property (as editor.js's describe() reads it)."""
    for option in prop.get("anyOf", [prop]):
        if "enum" in option:
            return option["enum"]
        if "const" in option:
            return [option["const"]]
    return None


def test_every_field_is_documented_and_placed():
    properties = json_schema()["properties"]
    assert set(properties) == set(ModelConfig.model_fields)
    for name, prop in properties.items():
        assert prop["title"] and "description" in prop, name
        assert prop["x-group"] in GROUPS, name
        assert prop["x-level"] in {"basic", "advanced"}, name
    # A form offers the canonical names; the aliases are accepted besides them.
    for name in DTYPE_FIELDS:
        assert choices(properties[name]) == ["float32", "float16", "bfloat16", "float64"], name
        assert "bf16" in properties[name]["x-aliases"], name
    assert {"null"} <= {option.get("type") for option in properties["autocast_dtype"]["anyOf"]}
    assert properties["params_dtype"]["default"] == "float32"
    assert choices(properties["activation_func"]) == list(ACTIVATIONS)
    assert choices(properties["attention_backend"]) == ["flash", "fused", "unfused", "local", "auto"]
    assert properties["override_parent_fields"]["default"][0] == "initial_ckpt_skip_keys_with_these_prefixes"
    assert "hidden_size" in properties["override_parent_fields"]["items"]["enum"]


def test_serialization_schema_lists_only_canonical_names():
    """What bioconf writes is canonical: the serialization schema says exactly that."""
    properties = json_schema(mode="serialization")["properties"]
    assert properties["params_dtype"]["enum"] == list(DTYPE_NAMES)
    assert properties["activation_func"]["enum"] == list(ACTIVATIONS)


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        return found + [p for value in node.values() for p in _patterns(value)]
    if isinstance(node, list):
        return [p for value in node for p in _patterns(value)]
    return []


def test_patterns_are_portable_ecma_262():
    """JSON Schema patterns are ECMA-262: no inline flags, named groups, \\A/\\Z or \\p{...}."""
    patterns = _patterns(json_schema())
    assert len(patterns) >= 4
    for pattern in patterns:
        assert not re.search(r"\(\?[^:=!]|\\[AZzpP]", pattern), pattern


def test_rust_patterns_are_rewritten_to_mean_at_least_as_much():
    """pydantic's Unicode-aware \\w and \\d become supersets in ECMA-262; what has no such form raises."""
    assert _portable(r"^[a-z]\w*\.\d.$") == r"^[a-z](?:\w|[^\x00-\x7F])*\.(?:\d|[^\x00-\x7F])[^\n]$"
    for pattern in (r"(?i)^gpt$", r"^[\w.]+$", r"\bgpt", r"^\p{L}$"):
        with pytest.raises(ValueError):
            _portable(pattern)


def test_no_other_letters_lower_to_a_dtype_alias():
    """str.lower() maps two non-ASCII characters to ASCII (KELVIN SIGN to k, I WITH DOT to i plus a
    combining dot); the case-insensitive pattern lists [xX] only, so no alias may use k or i."""
    lowered = "".join(map(chr, range(0x80, 0x110000))).lower()
    from_non_ascii = set(re.findall(r"[\x00-\x7f]", lowered))
    assert from_non_ascii == {"i", "k"}
    assert not from_non_ascii & set("".join(s for spellings in _DTYPE_SPELLINGS.values() for s in spellings))


# ---- accepted documents pass the schema -----------------------------------------------------------


def _variants(spelling: str) -> list[str]:
    return [
        spelling,
        spelling.upper(),
        f" {spelling.title()}\t",
        f"\x1c{spelling}\x85\n",
        f"\u3000{spelling}\u2029",
    ]


def _accepted_spellings() -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    for spellings in _DTYPE_SPELLINGS.values():
        for spelling in spellings:
            changes += [{"params_dtype": variant} for variant in _variants(spelling)]
    for name, (module, _) in ACTIVATIONS.items():
        for prefix in ["", ".", *(f"{alias}." for alias in sorted(_ACTIVATION_MODULE_ALIASES[module]))]:
            changes += [{"activation_func": f"{prefix}{name}"}, {"activation_func": f"\t{prefix}{name} \n"}]
    changes += [{"model_cls": model_cls} for model_cls in MODEL_CLASSES]
    changes += [
        {"autocast_dtype": " BF16", "pipeline_dtype": "torch.HALF"},
        {"initial_ckpt_skip_keys_with_these_prefixes": ["head.", "encoder.layers.11", "lm_head"]},
        {"override_parent_fields": ["train_metric", "valid_metric", "hidden_size"]},
        {"window_size": [64, 0]},
    ]
    return changes


def test_every_accepted_spelling_passes_the_schema(validator):
    for change in _accepted_spellings():
        document = {**BASE, **change}
        ModelConfig.model_validate(document)  # bioconf accepts it ...
        errors = [error.message for error in validator.iter_errors(document)]
        assert not errors, (change, errors)  # ... so the schema must


def _spaced(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    padding = st.text(st.sampled_from(SPACES), max_size=2)
    return st.tuples(padding, text, padding).map("".join)


@st.composite
def _any_case(draw: st.DrawFn, text: str) -> str:
    upper = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(ch.upper() if up else ch.lower() for ch, up in zip(text, upper, strict=True))


DTYPE_SPELLINGS = _spaced(
    st.sampled_from(sorted({s for spellings in _DTYPE_SPELLINGS.values() for s in spellings})).flatmap(
        _any_case
    )
)


@st.composite
def _activation(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(ACTIVATIONS)))
    modules = sorted(_ACTIVATION_MODULE_ALIASES[ACTIVATIONS[name][0]])
    prefix = draw(st.sampled_from(["", ".", *(f"{module}." for module in modules)]))
    return prefix + name


ACTIVATION_SPELLINGS = _spaced(_activation())


def values(annotation: Any, metadata: tuple[Any, ...] = ()) -> st.SearchStrategy[Any]:
    """JSON values of a field's type, with the accepted spellings of names."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return values(args[0], (*metadata, *args[1:]))
    low = None
    for item in metadata:
        if isinstance(item, FieldInfo):
            metadata = (*metadata, *item.metadata)
    for item in metadata:
        if isinstance(item, BeforeValidator) and item.func is canonical_dtype:
            return DTYPE_SPELLINGS
        if isinstance(item, BeforeValidator) and item.func is canonical_activation:
            return ACTIVATION_SPELLINGS
        if isinstance(item, StringConstraints) and item.pattern:
            return st.from_regex(item.pattern, fullmatch=True)
        if isinstance(item, Ge):
            low = item.ge
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(values(arg) for arg in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(values(args[0]), max_size=3)
    if origin is tuple:
        return st.tuples(*(values(arg) for arg in args)).map(list)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=low if low is not None else -2, max_value=4096)
    if annotation is float:
        return st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-8, 8))
    if annotation is str:
        return st.text(max_size=8)
    raise AssertionError(f"no strategy for {annotation!r}")


KNOWN_NAMES = sorted(ModelConfig.model_fields.keys() | BIONEMO_ONLY_FIELDS)
VALUES = {
    name: values(info.annotation, tuple(info.metadata)) for name, info in ModelConfig.model_fields.items()
}
VALUES["override_parent_fields"] = st.lists(st.sampled_from(KNOWN_NAMES), unique=True, max_size=4)
VALUES["model_cls"] = st.one_of(st.sampled_from(MODEL_CLASSES), VALUES["model_cls"])
# The fields bioconf reads by a name table or a pattern: each document changes one of them.
SPELLED = sorted(
    [
        *DTYPE_FIELDS,
        *ENUM_FIELDS,
        "activation_func",
        "model_cls",
        "override_parent_fields",
        "initial_ckpt_skip_keys_with_these_prefixes",
    ]
)


@st.composite
def accepted_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A small valid config with one spelled field and up to two other fields changed: varying few
    fields keeps megatron's cross-field rules from rejecting most documents."""
    names = [draw(st.sampled_from(SPELLED)), *draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=2))]
    document = dict(BASE)
    for name in names:
        document[name] = draw(VALUES[name])
    try:
        ModelConfig.model_validate(document)
    except ValidationError:
        assume(False)  # hypothesis: not an accepted document, draw another
    return document


@fuzz_settings(300)
@given(document=accepted_documents())
def test_accepted_documents_pass_the_schema(document):
    errors = [f"{list(error.path)}: {error.message}" for error in schema_validator().iter_errors(document)]
    assert not errors, errors


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")) + sorted(EXAMPLES.glob("*.yaml")), ids=str)
def test_examples_pass_the_schema(validator, path):
    validator.validate(read_document(path).data)


# ---- where the schema can tell, invalid documents fail it too -----------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_sise": 12},  # unknown key
        {"num_layers": 2.5},  # wrong type
        {"num_layers": "2"},
        {"params_dtype": "fp8"},  # not a dtype name
        {"params_dtype": "b f16"},
        {"params_dtype": "torch.bf16"},
        {"params_dtype": 16},
        {"activation_func": "GELU"},  # activation names are case-sensitive
        {"activation_func": "torch.squared_relu"},  # not where torch keeps it
        {"activation_func": "torch.nn.functional.gelu_new"},
        {"attention_backend": "FLASH"},  # enums by exact member name
        {"normalization": "BatchNorm"},  # not in the Literal
        {"window_size": [1, 2, 3]},  # wrong tuple length
        {"vocab_size": 0},  # below the bound
        {"model_cls": "not a path"},  # pattern
        {"model_cls": "pkg.module"},
        {"initial_ckpt_skip_keys_with_these_prefixes": ["head/"]},
        {"initial_ckpt_skip_keys_with_these_prefixes": ["head.", "head."]},  # listed twice
        {"override_parent_fields": ["hidden_size", "hidden_size"]},
        {"override_parent_fields": ["hiden_size"]},  # not a field name
    ],
    ids=str,
)
def test_invalid_configs_are_rejected_by_both(validator, change):
    document = {**BASE, **change}
    assert not validator.is_valid(document)
    with pytest.raises(ValueError):
        ModelConfig.model_validate(document)
