"""``ModelConfig``: a validated, flat config for a Megatron-Core model started from a checkpoint.

The megatron fields come from the generated table (``megatron_fields.py``); this module adds
what building a model and starting from a checkpoint need, and the validation that catches at
submit time what megatron would raise on a GPU node:

- unknown keys are errors with a "did you mean" suggestion;
- scalars are strict: ``3.7`` (or ``"3"``) for an integer field is an error, never a silent cast;
- megatron's cross-field rules (``bioconf.schema.rules``) run on every validation and report
  every violated rule against every field involved.

Instances are frozen values: derive new ones with ``with_overrides``.
"""

import hashlib
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import replace
from functools import cache, partial
from typing import Annotated, Any, Final, Literal, get_args

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic._internal._model_construction import ModelMetaclass
from pydantic_core import InitErrorDetails, PydanticCustomError, SchemaValidator

from bioconf.errors import ConfigError, OverrideError, issues_from_validation, short_repr
from bioconf.schema import rules
from bioconf.schema.families import BIONEMO_FIELDS, FAMILIES
from bioconf.schema.megatron_fields import MegatronFields
from bioconf.schema.overrides import merge_overrides

# Aliases for the model families bioconf builds itself; anything else is "package.module:Class".
MODEL_CLS_ALIASES: Final[tuple[str, ...]] = tuple(FAMILIES)
_IMPORT_PATH = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
ModelClass = Annotated[str, StringConstraints(pattern=rf"^({'|'.join(MODEL_CLS_ALIASES)}|{_IMPORT_PATH})$")]
"""A family (``"gpt"``, ``"bert"``, ``"esm2"``, ...) or an import path ``"package.module:Class"``
(resolved only by the runtime)."""

SkipPrefix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\.?$")]
"""A state-dict key prefix such as ``"head."`` or ``"encoder.layers.11"``."""

# Fields that NeMo/BioNeMo model configs define but that have no JSON form (objects, classes,
# callables): a checkpoint's are read as names and reported, never imported. They may be named in
# override_parent_fields (the BioNeMo default list names the metric fields).
BIONEMO_ONLY_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "train_metric",
        "valid_metric",
        "loss_reduction_class",
        "optimizer_fn",
        "core_attention_override",
        "nemo1_ckpt_path",
        "get_attention_mask_from_fusion",
    }
)

# The seed's keep-list, plus what a fine-tune legitimately changes: parallel layout and precision.
OVERRIDE_BIONEMO_CONFIG_DEFAULTS: Final[tuple[str, ...]] = (
    "initial_ckpt_skip_keys_with_these_prefixes",
    "override_parent_fields",
    "initial_ckpt_path_ignore_weights",
    "initial_ckpt_path",
    "model_cls",
    "bf16",
    "fp16",
    "train_metric",
    "valid_metric",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "sequence_parallel",
    "params_dtype",
    "pipeline_dtype",
    "autocast_dtype",
)

Policy = Literal["seed", "explicit"]
"""Which values win when a config starts from a checkpoint: "seed" keeps exactly
``override_parent_fields`` (BioNeMo's rule); "explicit" also every field the config sets."""
POLICIES: Final[tuple[Policy, ...]] = get_args(Policy)

_CHECKPOINT = {"x-group": "checkpoint", "x-level": "basic"}


_INT64_MIN: Final = -(2**63)
_INT64_END: Final = 2**64
"""What canonical JSON (orjson) holds: -2**63 <= an integer < 2**64."""
_UNBOUNDED: ContextVar[bool] = ContextVar("bioconf_unbounded", default=False)
"""Set while an input is validated again without the 64-bit bounds (``_final_error``)."""


def _bound_ints(schema: Any) -> None:
    """Give every integer in ModelConfig's validator the 64-bit range as pydantic-core bounds: the check
    costs nothing there, where the after validator's pass over every integer field cost ~2 µs. Bounds
    a field has of its own stay; the JSON Schema does not show the added ones."""
    seen: set[int] = set()

    def visit(node: Any) -> None:
        if isinstance(node, list | tuple):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict) or id(node) in seen:
            return
        seen.add(id(node))
        if node.get("type") == "union":
            # A union's errors are located by each choice's name, and a bounded int is named
            # "constrained-int": keep the names the choices had.
            node["choices"] = [
                (choice, SchemaValidator(_unbound(choice)).title)
                if isinstance(choice, dict) and _has_int(choice)
                else choice
                for choice in node["choices"]
            ]
        if node.get("type") == "int":
            added = []
            if "ge" not in node and "gt" not in node:
                node["ge"] = _INT64_MIN
                added.append("ge")
            if "lt" not in node and "le" not in node:
                node["lt"] = _INT64_END
                added.append("lt")
            metadata = node.get("metadata") or {}
            functions = [*metadata.get("pydantic_js_functions", ()), _hide_int64_bounds]
            node["metadata"] = {**metadata, "bioconf_int64": tuple(added), "pydantic_js_functions": functions}
        for key, value in node.items():
            if key != "metadata":
                visit(value)

    visit(schema)


def _hide_int64_bounds(schema: Any, handler: Any) -> Any:
    json_schema = handler(schema)
    if json_schema.get("minimum") == _INT64_MIN:
        del json_schema["minimum"]
    if json_schema.get("exclusiveMaximum") == _INT64_END:
        del json_schema["exclusiveMaximum"]
    return json_schema


def _has_int(node: Any) -> bool:
    if isinstance(node, list | tuple):
        return any(_has_int(item) for item in node)
    if not isinstance(node, dict):
        return False
    return node.get("type") == "int" or any(_has_int(v) for k, v in node.items() if k != "metadata")


def _unbound(node: Any) -> Any:
    """A copy of a core schema without the bounds ``_bound_ints`` added."""
    if isinstance(node, list):
        return [_unbound(item) for item in node]
    if isinstance(node, tuple):  # a union's (choice, name)
        return tuple(_unbound(item) for item in node)
    if not isinstance(node, dict):
        return node
    copy = {key: value if key == "metadata" else _unbound(value) for key, value in node.items()}
    for key in (copy.get("metadata") or {}).get("bioconf_int64", ()):
        del copy[key]
    return copy


class _RewritingMetaclass(ModelMetaclass):
    """``ModelConfig(...)``: field errors rewritten as the validate methods rewrite them."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as error:
            raise _final_error(error, cls, "validate_python", kwargs, {}) from None


class ModelConfig(MegatronFields, BaseModel, metaclass=_RewritingMetaclass):
    """A Megatron model config as data: every JSON-expressible TransformerConfig field, plus the
    checkpoint fields of BioNeMo's ``MegatronBioNeMoTrainableModelConfig`` and what building a
    model needs (``model_cls``, ``vocab_size``, ``seq_length``)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="bioconf ModelConfig",
        # JSON has no NaN or infinity: a config that canonical JSON cannot hold is not accepted.
        allow_inf_nan=False,
    )

    model_cls: ModelClass = Field(
        default="gpt",
        description="The model to build: a family ('gpt' or 'bert': megatron-core's models; 'esm2', "
        "'geneformer' or 'biobert': BioNeMo's, with their defaults), or an import path "
        "'package.module:Class' of a user model class, imported only by the runtime.",
        json_schema_extra={
            "x-group": "architecture",
            "x-level": "basic",
            "x-family-defaults": {name: dict(f.defaults) for name, f in FAMILIES.items()},
        },
    )
    vocab_size: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Vocabulary size of the embedding and output layers. Needed to build a model; "
        "may come from the starting checkpoint.",
        json_schema_extra={"x-group": "architecture", "x-level": "basic"},
    )
    seq_length: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Maximum sequence length (position embeddings, rotary tables). Needed to build a "
        "model; may come from the starting checkpoint.",
        json_schema_extra={"x-group": "architecture", "x-level": "basic"},
    )
    # Constructor arguments of megatron's GPTModel/BertModel, named as NeMo's and BioNeMo's
    # configs name them, so checkpoints written by those map onto these fields.
    position_embedding_type: Literal["learned_absolute", "rope", "none"] = Field(
        default="learned_absolute",
        description="Position embedding: learned absolute positions, rotary (rope), or none.",
        json_schema_extra={"x-group": "architecture", "x-level": "basic"},
    )
    rotary_percent: float = Field(
        default=1.0,
        description="Fraction of each attention head's dimensions that rotary embeddings rotate.",
        json_schema_extra={"x-group": "attention", "x-level": "advanced"},
    )
    rotary_base: int = Field(
        default=10000,
        description="Base period of the rotary embedding frequencies.",
        json_schema_extra={"x-group": "attention", "x-level": "advanced"},
    )
    share_embeddings_and_output_weights: bool = Field(
        default=False,
        description="Tie the output layer's weights to the input embedding.",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    num_tokentypes: int = Field(
        default=0,
        description="BERT only: number of token types (segment embeddings); 0 disables them.",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    add_binary_head: bool = Field(
        default=True,
        description="BERT only: add the next-sentence-prediction (binary) head.",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    make_vocab_size_divisible_by: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Pad the embedding and output layers to a multiple of this times the tensor-"
        "parallel size, as NeMo and BioNeMo do (a size already a multiple of both is kept); None: "
        "vocab_size rows exactly.",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    biobert_spec_option: Literal[
        "bert_layer_local_spec",
        "bert_layer_local_spec_with_qk_ln",
        "bert_layer_with_transformer_engine_spec",
        "bert_layer_with_transformer_engine_and_qk_ln_spec",
        "esm2_bert_layer_local_spec",
        "esm2_bert_layer_with_transformer_engine_spec",
    ] = Field(
        default="bert_layer_with_transformer_engine_spec",
        description="BioNeMo families: the layer spec BioNeMo names. bioconf builds the Transformer "
        "Engine spec where TE is importable and the matching local spec otherwise (both read and "
        "write the same checkpoint keys); the esm2 options add ESM's query scaling.",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    token_dropout: bool = Field(
        default=False,
        description="esm2: zero the embeddings of mask tokens and rescale the rest by the share of "
        "masked tokens seen in training (ESM-2's token dropout).",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    use_attention_mask: bool = Field(
        default=False,
        description="esm2: zero the embeddings of padding positions (where the attention mask is 0).",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    mask_token_id: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="esm2: the id of the mask token that token dropout looks for (32 in ESM-2's "
        "vocabulary; BioNeMo takes it from its tokenizer).",
        json_schema_extra={"x-group": "architecture", "x-level": "advanced"},
    )
    use_esm_attention: bool = Field(
        default=False,
        description="esm2: BioNeMo's ESM-specific attention kernel. Recorded only: bioconf builds "
        "megatron's attention with ESM's query scaling, which computes the same.",
        json_schema_extra={"x-group": "attention", "x-level": "advanced"},
    )
    seq_len_interpolation_factor: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="BioNeMo families: divide rotary positions by this factor (longer sequences than "
        "trained on).",
        json_schema_extra={"x-group": "attention", "x-level": "advanced"},
    )
    fp16_lm_cross_entropy: bool = Field(
        default=False,
        description="BioNeMo families: compute the LM loss's cross entropy in fp16.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    parallel_output: bool = Field(
        default=True,
        description="BioNeMo families: keep the logits split across tensor-parallel ranks.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    return_embeddings: bool = Field(
        default=False,
        description="BioNeMo families: the model returns mean-pooled sequence embeddings instead of "
        "logits. Recorded for BioNeMo; bioconf's forward check reads logits.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    include_embeddings: bool = Field(
        default=False,
        description="BioNeMo families: add the mean-pooled embeddings to the output. Recorded for BioNeMo.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    return_only_hidden_states: bool = Field(
        default=False,
        description="BioNeMo families: return the final hidden states (after the last layernorm), no "
        "logits. Recorded for BioNeMo.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    include_hiddens: bool = Field(
        default=False,
        description="BioNeMo families: add the hidden states to the output. Recorded for BioNeMo.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    include_input_ids: bool = Field(
        default=False,
        description="BioNeMo families: add the input ids to the output. Recorded for BioNeMo.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    skip_logits: bool = Field(
        default=False,
        description="BioNeMo families: skip the output layer (no token logits). Recorded for BioNeMo.",
        json_schema_extra={"x-group": "outputs", "x-level": "advanced"},
    )
    initial_ckpt_path: str | None = Field(
        default=None,
        description="NeMo 2 checkpoint directory to start from: its settings are loaded into this "
        "config (except the fields in override_parent_fields), then its weights into the model.",
        json_schema_extra=_CHECKPOINT,
    )
    initial_ckpt_skip_keys_with_these_prefixes: list[SkipPrefix] = Field(
        # Factories, not list defaults: pydantic deep-copies an unhashable default for every config
        # that leaves the field out (copy.deepcopy: ~1 us, ~7 us for the 19 names below).
        default_factory=list,
        description="Model state-dict key prefixes whose weights are not loaded from the checkpoint "
        "(e.g. a new output head).",
        json_schema_extra={**_CHECKPOINT, "default": []},
    )
    initial_ckpt_path_ignore_weights: bool = Field(
        default=False,
        description="Load only the settings from initial_ckpt_path, not its weights.",
        json_schema_extra=_CHECKPOINT,
    )
    override_parent_fields: list[str] = Field(
        default_factory=partial(list, OVERRIDE_BIONEMO_CONFIG_DEFAULTS),
        description="Fields whose value in this config is kept when settings are loaded from "
        "initial_ckpt_path; every other field takes the checkpoint's value.",
        json_schema_extra={**_CHECKPOINT, "default": list(OVERRIDE_BIONEMO_CONFIG_DEFAULTS)},
    )

    @field_validator("override_parent_fields")
    @classmethod
    def _known_unique_fields(cls, names: list[str]) -> list[str]:
        known = _known_field_names()
        if len(known.intersection(names)) == len(names):  # all known, none twice
            return names
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name not in known:
                raise PydanticCustomError(
                    "unknown_field_name",
                    "{name} (item {index}) is not a field{hint}",
                    {"index": index, "name": short_repr(name), "hint": _did_you_mean(name, known)},
                )
            if name in seen:
                raise PydanticCustomError(
                    "duplicate_name",
                    "{name} (item {index}) is listed twice",
                    {"index": index, "name": short_repr(name)},
                )
            seen.add(name)
        return names

    @field_validator("initial_ckpt_skip_keys_with_these_prefixes")
    @classmethod
    def _unique_prefixes(cls, prefixes: list[str]) -> list[str]:
        if len(set(prefixes)) != len(prefixes):
            duplicates = sorted(p for p, count in Counter(prefixes).items() if count > 1)
            raise PydanticCustomError(
                "duplicate_name", "skip prefixes listed twice: {names}", {"names": ", ".join(duplicates)}
            )
        return prefixes

    # An "after" validator, not a "wrap" one: a wrap validator makes pydantic-core turn JSON input
    # into Python objects and validate those (model_validate_json at half speed). Field errors
    # never reach it, so the entry points below rewrite them (unknown keys: "did you mean").
    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        """The family's defaults, then the family's own fields, 64-bit integers and megatron's
        cross-field rules; errors carry field locations."""
        values = self.__dict__
        fields_set = self.__pydantic_fields_set__
        family = _FAMILY_CHECKS.get(values["model_cls"])
        if family is not None:
            defaults, foreign_values, foreign_defaults, foreign = family
            # A family default is a default: set, but not in fields_set (what a user wrote, what
            # io.json records). Validating a default changes nothing: defaults are schema values.
            for name, value in defaults:
                if name not in fields_set:
                    values[name] = value
            # Another family's field at its default is not misplaced (a full dump holds them all).
            if foreign and foreign_values(values) != foreign_defaults:
                misplaced = [
                    name for name, default in foreign if name in fields_set and values[name] != default
                ]
                if misplaced:
                    raise _misplaced_error(self, misplaced)
        # Integers beyond 64 bits: pydantic-core refuses them (_bound_ints), and the entry points
        # validate such an input again without the bounds, to report it as before, here.
        if _UNBOUNDED.get():
            beyond = [name for name in fields_set if not _json_int_safe(values[name])]
            if beyond:
                raise _beyond_64_bits_error(self, beyond)
        violations = _typed_rules(self)
        if violations:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("megatron_rule", violation.message),
                        loc=(violation.fields[0],),
                        input={name: getattr(self, name, None) for name in violation.fields},
                    )
                    for violation in violations
                ],
            )
        return self

    # Field errors, rewritten at each entry point (the after validator never sees them); a call
    # (``ModelConfig(...)``) is rewritten by the metaclass: an ``__init__`` here would make pydantic
    # validate every input twice.
    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "ModelConfig":
        if type(obj) is cls:
            # pydantic hands an instance back as it is: check it, but apply no family defaults
            # (it has its values already; one built by model_construct keeps its own).
            return obj._checked()
        try:  # no options: pydantic's model_validate would only pass them on
            if kwargs:
                return super().model_validate(obj, **kwargs)
            return cls.__pydantic_validator__.validate_python(obj)  # type: ignore[no-any-return]
        except ValidationError as error:
            raise _final_error(error, cls, "validate_python", obj, kwargs) from None

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any) -> "ModelConfig":
        try:
            if kwargs:
                return super().model_validate_json(json_data, **kwargs)
            return cls.__pydantic_validator__.validate_json(json_data)  # type: ignore[no-any-return]
        except ValidationError as error:
            if error.errors(include_url=False)[0]["type"] == "json_invalid":
                raise  # not JSON: nothing was validated, and the error is pydantic's own
            raise _final_error(error, cls, "validate_json", json_data, kwargs) from None

    @classmethod
    def model_validate_strings(cls, obj: Any, **kwargs: Any) -> "ModelConfig":
        try:
            return super().model_validate_strings(obj, **kwargs)
        except ValidationError as error:
            raise _final_error(error, cls, "validate_strings", obj, kwargs) from None

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        schema = handler(source)
        if source is cls:
            _bound_ints(schema)
        return schema

    def _checked(self) -> "ModelConfig":
        """The checks of ``_check`` on an existing instance, without touching its values."""
        cls = type(self)
        if self.model_cls in FAMILIES:
            misplaced = [
                name
                for name in sorted(self.model_fields_set & BIONEMO_FIELDS.keys())
                if self.model_cls not in BIONEMO_FIELDS[name]
                and getattr(self, name) != cls.model_fields[name].default
            ]
            if misplaced:
                raise _misplaced_error(self, misplaced)
        beyond = [name for name in self.model_fields_set if not _json_int_safe(getattr(self, name))]
        if beyond:
            raise _beyond_64_bits_error(self, beyond)
        violations = rules.check_rules(self)
        if violations:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("megatron_rule", violation.message),
                        loc=(violation.fields[0],),
                        input={name: getattr(self, name, None) for name in violation.fields},
                    )
                    for violation in violations
                ],
            )
        return self

    # ---- derived views -------------------------------------------------------------------

    def advice(self) -> list[str]:
        """Megatron's warnings for this config: legal, but probably not what was meant."""
        return [violation.message for violation in rules.rule_warnings(self)]

    def to_dict(self, *, exclude_defaults: bool = False, exclude_unset: bool = False) -> dict[str, Any]:
        """JSON-ready dict with canonical spellings (tuples as lists, dtypes and enums by name).

        ``exclude_unset`` keeps only the explicitly set fields: what a user wrote, so the result
        validates back to a config with the same ``model_fields_set`` (which the "explicit"
        precedence policy reads). ``exclude_defaults`` drops values equal to their default.
        """
        return self.model_dump(mode="json", exclude_defaults=exclude_defaults, exclude_unset=exclude_unset)

    def to_json(
        self, *, exclude_defaults: bool = False, exclude_unset: bool = False, indent: bool = False
    ) -> bytes:
        """Canonical JSON: sorted keys, canonical spellings (options as for ``to_dict``). Equal
        configs give identical bytes."""
        option = orjson.OPT_SORT_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
        data = self.to_dict(exclude_defaults=exclude_defaults, exclude_unset=exclude_unset)
        return orjson.dumps(data, option=option)

    def fingerprint(self) -> str:
        """sha256 of the full canonical JSON: two configs that build the same model share it."""
        return fingerprint_of(self.to_dict())

    def explicit_fields(self) -> dict[str, Any]:
        """The fields that were set explicitly (not left to their default), in schema form."""
        return {name: getattr(self, name) for name in self.model_fields_set}

    def with_overrides(self, *overrides: str | Mapping[str, Any]) -> "ModelConfig":
        """A new config with ``"key=value"`` / ``"key+=[...]"`` strings or mappings applied on top of
        this one, validated as a whole; an invalid result raises ``OverrideError``."""
        return validate_with_overrides(self.explicit_fields(), overrides)

    def _repr_html_(self) -> str:
        """Jupyter: the explicitly set fields, grouped as in the UI form."""
        title = f"ModelConfig ({len(self.model_fields_set)} fields set, sha256:{self.fingerprint()[:12]})"
        from bioconf.schema.display import fields_table  # html: only notebooks pay for the import

        return fields_table(title, self.explicit_fields(), FIELD_GROUPS)

    def __repr_args__(self) -> Iterable[tuple[str, Any]]:
        # 240 fields is a wall: show only what was set.
        return [(name, getattr(self, name)) for name in self.model_fields if name in self.model_fields_set]


def _misplaced_error(config: ModelConfig, misplaced: list[str]) -> ValidationError:
    return ValidationError.from_exception_data(
        type(config).__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError(
                    "not_a_family_field",
                    f"a field of the {', '.join(BIONEMO_FIELDS[name])} model families only; "
                    f"model_cls is {config.model_cls!r}",
                ),
                loc=(name,),
                input=getattr(config, name),
            )
            for name in misplaced
        ],
    )


def _beyond_64_bits_error(config: ModelConfig, beyond: list[str]) -> ValidationError:
    return ValidationError.from_exception_data(
        type(config).__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError(
                    "number_out_of_range", "an integer JSON cannot hold (beyond 64 bits)"
                ),
                loc=(name,),
                input=getattr(config, name),
            )
            for name in sorted(beyond)
        ],
    )


def _json_int_safe(value: Any) -> bool:
    """No integer beyond 64 bits (what canonical JSON, the fingerprint, can hold), also in a list."""
    if type(value) is int:
        return -(2**63) <= value < 2**64
    if isinstance(value, (list, tuple)):
        return all(_json_int_safe(item) for item in value)
    return True


@cache
def _known_field_names() -> frozenset[str]:
    """What override_parent_fields may name: the fields, and BioNeMo's fields with no JSON form."""
    return frozenset(ModelConfig.model_fields.keys() | BIONEMO_ONLY_FIELDS)


@cache
def _unbounded_validator() -> SchemaValidator:
    """ModelConfig's validator as it was before ``_bound_ints``: built once an input needs it."""
    schema = _unbound(ModelConfig.__pydantic_core_schema__)
    return SchemaValidator(schema, schema["schema"]["config"])


def _beyond_bounds(error: ValidationError) -> bool:
    """Whether pydantic-core refused an integer for the bounds ``_bound_ints`` added."""
    for item in error.errors(include_url=False):
        ctx = item.get("ctx") or {}
        if (item["type"] == "less_than" and ctx.get("lt") == _INT64_END) or (
            item["type"] == "greater_than_equal" and ctx.get("ge") == _INT64_MIN
        ):
            return True
    return False


def _final_error(
    error: ValidationError, model: type["ModelConfig"], method: str, data: Any, kwargs: dict[str, Any]
) -> Exception:
    """The error an entry point raises: with an integer beyond 64 bits, what validating without the
    bounds reports (every other field error first, the family's fields, then "beyond 64 bits"), as
    when the after validator checked them; field errors rewritten (``_with_suggestions``)."""
    if _beyond_bounds(error):
        token = _UNBOUNDED.set(True)
        try:
            getattr(_unbounded_validator(), method)(data, **kwargs)
        except ValidationError as unbounded_error:
            error = unbounded_error
        else:  # pragma: no cover - the after validator refuses what the bounds refused
            raise AssertionError("an integer beyond 64 bits validated") from error
        finally:
            _UNBOUNDED.reset(token)
    return _with_suggestions(error, model, json=method == "validate_json")


MAX_SUGGESTIONS: Final = 20
"""Unknown names that get a "did you mean": each is a difflib search over every field, and a
document with thousands of unknown keys is not a config with a typo (the rest are still listed)."""
_LONGEST_NAME: Final = 64
"""No field name is longer: a name far longer matches none, and is not searched for."""


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    if len(name) > 2 * _LONGEST_NAME:
        return ""
    import difflib  # only an unknown name pays for the import

    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


# pydantic-core words these errors in JSON terms when it validates JSON; a config's errors read the
# same however it arrived (as when every input was validated as Python objects).
_PYTHON_MESSAGES: Final[dict[str, str]] = {
    "model_type": "Input should be a valid dictionary or instance of {model}",
    "list_type": "Input should be a valid list",
    "tuple_type": "Input should be a valid tuple",
    "dict_type": "Input should be a valid dictionary",
    "set_type": "Input should be a valid set",
    "frozen_set_type": "Input should be a valid frozenset",
    "none_required": "Input should be None",
}


def _with_suggestions(
    error: ValidationError, model: type["ModelConfig"], json: bool = False
) -> ValidationError:
    """Rewrite pydantic's "extra inputs are not permitted" as "unknown field ...; did you mean" (for
    the first MAX_SUGGESTIONS unknown names); ``json``: pydantic's JSON wording as its Python one.

    Re-raising needs every error as a custom error: pydantic only rebuilds its own types from a
    name, and ours (dtype, activation, ...) would not round-trip.
    """
    details: list[InitErrorDetails] = []
    suggested = 0
    for item in error.errors(include_url=False):
        if item["type"] == "extra_forbidden":
            name = str(item["loc"][-1])
            hint = ""
            if suggested < MAX_SUGGESTIONS:
                suggested += 1
                hint = _did_you_mean(name, model.model_fields)
            kind, message = "unknown_field", f"unknown field {short_repr(name)}{hint}"
        else:
            kind, message = item["type"], item["msg"]
            if json and kind in _PYTHON_MESSAGES:
                message = _PYTHON_MESSAGES[kind].format(model=model.__name__)
        details.append(
            InitErrorDetails(type=PydanticCustomError(kind, message), loc=item["loc"], input=item["input"])
        )
    return ValidationError.from_exception_data(error.title, details)


FIELD_GROUPS: Final[dict[str, str]] = {
    name: (info.json_schema_extra or {}).get("x-group", "other")  # type: ignore[union-attr]
    for name, info in ModelConfig.model_fields.items()
}
"""Field -> its form group (``x-group``)."""


def _family_checks(name: str) -> tuple[Any, ...]:
    foreign = tuple(
        (field, ModelConfig.model_fields[field].default)
        for field in sorted(BIONEMO_FIELDS)
        if name not in BIONEMO_FIELDS[field]
    )
    getter = operator.itemgetter(*(field for field, _ in foreign), "model_cls")  # always a tuple
    return (
        tuple(FAMILIES[name].defaults.items()),
        getter,
        getter({**dict(foreign), "model_cls": name}),
        foreign,
    )


_FAMILY_CHECKS: Final[dict[str, tuple[Any, ...]]] = {name: _family_checks(name) for name in FAMILIES}
"""Family -> (its defaults; the values of the fields of other families only (and model_cls), those
at their defaults; those fields with their defaults, sorted): what ``_check`` reads for the family."""


_typed_rules: Final = rules.TypedRules(
    {name: info.get_default(call_default_factory=True) for name, info in ModelConfig.model_fields.items()}
)
"""``rules.check_rules`` for a validated config, skipping the rule groups its defaults decide."""


def _list_default(name: str) -> Any:
    field = ModelConfig.model_fields.get(name)
    return field.get_default(call_default_factory=True) if field else None


def validate_with_overrides(
    data: Mapping[str, Any],
    overrides: Iterable[str | Mapping[str, Any]] = (),
    source: str | None = None,
    line_of: Callable[[str], int | None] | None = None,
) -> ModelConfig:
    """Apply the overrides to ``data`` and validate the result as a whole. Each error is attributed to
    the override that set its field, else to ``source`` (and its line)."""
    merged, origin = merge_overrides(data, overrides, _list_default)
    try:
        return ModelConfig.model_validate(merged)
    except ValidationError as error:
        issues = []
        for issue in issues_from_validation(error, source, line_of):
            key = str(issue.loc[0]) if issue.loc else ""
            if key in origin:
                issue = replace(issue, source=f"--set {origin[key]}", line=None)
            issues.append(issue)
        blamed_override = any(issue.source and issue.source.startswith("--set ") for issue in issues)
        raise (OverrideError if blamed_override else ConfigError)(issues) from None


def fingerprint_of(dump: dict[str, Any]) -> str:
    """``ModelConfig.fingerprint`` from the config's full dump (``to_dict()``), for a caller that has
    made that dump already (the service's answer: one dump for both)."""
    return hashlib.sha256(orjson.dumps(dump, option=orjson.OPT_SORT_KEYS)).hexdigest()
