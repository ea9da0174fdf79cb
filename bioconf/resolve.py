"""Which value wins when a model starts from a checkpoint, and does the checkpoint fit.

BioNeMo's rule: every field comes from the checkpoint except ``override_parent_fields``. A fine-tune
config that sets ``hidden_dropout: 0.2`` silently runs with the checkpoint's value. ``resolve``
merges a config with a checkpoint's settings under either rule and says where each value came from:

- policy ``"seed"`` keeps exactly ``override_parent_fields`` (BioNeMo's rule);
- policy ``"explicit"`` (the default) also keeps every field the config sets explicitly.

The merge is validated as a whole, and a kept field that changes a weight's shape (``hidden_size``,
``vocab_size``, ...) so that the checkpoint's weights would not load is an error before any weight
is touched, unless those weights are skipped (``initial_ckpt_skip_keys_with_these_prefixes``).
Plain data only: nothing here imports torch, megatron, fiddle or nemo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from html import escape
from typing import Any, Final, Literal

from pydantic import ValidationError

from bioconf.checkpoint.context import CheckpointConfig, read_checkpoint_config
from bioconf.checkpoint.layout import METADATA_FILE, MODULE_PREFIX
from bioconf.checkpoint.shapes import (
    SHAPE_PREFIXES,
    SHAPES_ONLY_WHEN,
    UNRECORDED_WHEN_NONE,
    LayerPrefixes,
    shaped_weights,
)
from bioconf.checkpoint.weights_index import read_weights_metadata
from bioconf.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigIssue,
    InvalidMergeError,
    UsageError,
    issues_from_validation,
)
from bioconf.schema.derived import DERIVED, effective
from bioconf.schema.display import fields_table
from bioconf.schema.families import BIONEMO_FAMILIES, FAMILIES, padded_vocab_size
from bioconf.schema.model import FIELD_GROUPS, MODEL_CLS_ALIASES, POLICIES, ModelConfig, Policy

Source = Literal["user", "default", "checkpoint", "checkpoint weights", "derived"]
SOURCES: Final[tuple[Source, ...]] = ("user", "checkpoint", "checkpoint weights", "derived", "default")
"""Where a value came from, in listing order. "checkpoint weights": a size no config holds, read from
the shape of the checkpoint's weights (BioNeMo's configs hold no vocab_size: its tokenizer does)."""

# ---- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedConfig:
    """A config merged with the settings of the checkpoint it starts from, and where each value came from."""

    config: ModelConfig
    """The merged config, validated; fields megatron derives stay None here."""
    sources: dict[str, Source]
    """Every field's source: "user", "default", "checkpoint" or "derived"."""
    keep: tuple[str, ...]
    """The effective keep-list: what the runtime's load_settings_from_checkpoint is given as its
    override_parent_fields."""
    policy: Policy
    checkpoint: CheckpointConfig
    derived: dict[str, Any]
    """The values megatron will derive, for the fields whose source is "derived"."""
    notes: list[str]

    @property
    def saved_config_class(self) -> str | None:
        """The config class a checkpoint saved from this merge names: the source checkpoint's when it
        is BioNeMo's (not bioconf's, and the model one of BioNeMo's families), so that BioNeMo loads it
        back without bioconf; None: bioconf's own class."""
        if self.checkpoint.class_is_bioconf or self.config.model_cls not in BIONEMO_FAMILIES:
            return None
        return self.checkpoint.class_path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the checkpoint, the policy, the keep-list, every field not left to its default
        (value and source), the checkpoint fields bioconf does not model, the notes, the fingerprint."""
        data = self.config.to_dict()
        return {
            "checkpoint": {
                "directory": str(self.checkpoint.paths.root),
                "path": str(self.checkpoint.path),
                "class": self.checkpoint.class_path,
                "class_is_bioconf": self.checkpoint.class_is_bioconf,
                "bionemo_family": self.checkpoint.bionemo_family,
            },
            "policy": self.policy,
            "keep": list(self.keep),
            "fields": {
                name: {"value": self.derived.get(name, data[name]), "source": source}
                for name, source in self.sources.items()
                if source != "default"
            },
            "unknown_checkpoint_fields": self.checkpoint.unknown_fields,
            "dropped_checkpoint_entries": self.checkpoint.dropped,
            "notes": list(self.notes),
            "fingerprint": self.config.fingerprint(),
        }

    def _repr_html_(self) -> str:
        """Jupyter: every value not left to its default, grouped, with its source; then the notes."""
        fields = self.to_dict()["fields"]
        title = f"Resolved against {self.checkpoint.paths.root} (policy {self.policy})"
        table = fields_table(
            title,
            {n: f["value"] for n, f in fields.items()},
            FIELD_GROUPS,
            {n: f["source"] for n, f in fields.items()},
        )
        return table + "".join(f"<p>note: {escape(note)}</p>" for note in self.notes)


# ---- resolve ------------------------------------------------------------------------------------------


def keep_list(config: ModelConfig, policy: Policy = "explicit") -> tuple[str, ...]:
    """The fields whose value in ``config`` wins over the checkpoint's: ``override_parent_fields``, and
    under "explicit" also every explicitly set field (appended in schema order)."""
    if policy not in POLICIES:
        raise UsageError.one(f"policy must be one of {', '.join(POLICIES)}", "invalid_policy", input=policy)
    keep = list(config.override_parent_fields)
    if policy == "explicit":
        listed = set(keep)
        keep += [n for n in ModelConfig.model_fields if n in config.model_fields_set and n not in listed]
    return tuple(keep)


def merge(
    config: ModelConfig, checkpoint: CheckpointConfig, keep: tuple[str, ...] | list[str]
) -> tuple[ModelConfig, dict[str, Source]]:
    """The one merge of a config with a checkpoint's settings: each field in ``keep`` takes the
    config's value, every other field the checkpoint's (or its default, where the checkpoint sets
    none). Returns the merged config, validated as a whole (InvalidMergeError names each value a
    broken rule involves and where it came from), and every field's source. A model class given by
    import path that would come from the checkpoint is a CheckpointError: building would import it."""
    kept = set(keep)
    data: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for name in ModelConfig.model_fields:
        side = config if name in kept else checkpoint.config
        if name in side.model_fields_set:
            data[name] = getattr(side, name)
            sources[name] = "user" if side is config else "checkpoint"
        else:
            sources[name] = "default"
    if "vocab_size" not in data and (rows := vocab_rows_in_weights(checkpoint)) is not None:
        data["vocab_size"] = rows
        sources["vocab_size"] = "checkpoint weights"
    model_cls = data.get("model_cls")
    if sources["model_cls"] == "checkpoint" and model_cls not in MODEL_CLS_ALIASES:
        # Building would import it: only a class the user names is ever imported.
        raise CheckpointError.one(
            f"the checkpoint names the model class {model_cls!r}, and model_cls is not kept from this "
            "config: bioconf imports only a model class the config names; set model_cls (and keep it)",
            "checkpoint_model_class",
            source=checkpoint.path,
            loc=("model_cls",),
            input=model_cls,
        )
    return _validate_merge(data, sources, checkpoint), sources


def resolve(
    config: ModelConfig,
    checkpoint_dir: str | os.PathLike[str] | CheckpointConfig | None = None,
    policy: Policy = "explicit",
) -> ResolvedConfig:
    """Merge ``config`` with the settings of the NeMo 2 checkpoint it starts from (``checkpoint_dir``,
    or its config already read; else ``config.initial_ckpt_path``): kept fields (``keep_list``) take
    the config's value, the others the checkpoint's. Raises UsageError when no checkpoint is named,
    CheckpointError without a readable checkpoint context, InvalidMergeError when the merge breaks a
    megatron rule, CheckpointMismatchError when the weights would not fit."""
    keep = keep_list(config, policy)
    if checkpoint_dir is None:
        checkpoint_dir = config.initial_ckpt_path
    if checkpoint_dir is None:
        raise UsageError.one(
            "no checkpoint to start from: the config sets no initial_ckpt_path and none was given",
            "missing_checkpoint",
            loc=("initial_ckpt_path",),
        )
    ckpt = (
        checkpoint_dir
        if isinstance(checkpoint_dir, CheckpointConfig)
        else read_checkpoint_config(checkpoint_dir)
    )
    merged, sources = merge(config, ckpt, keep)
    derived = {}
    for name in DERIVED:
        if getattr(merged, name) is None and (value := effective(merged, name)) is not None:
            derived[name] = value
            sources[name] = "derived"
    kept = set(keep)
    notes = _precedence_notes(config, merged, ckpt, kept, policy)
    notes += _check_shapes(merged, sources, ckpt, kept)
    return ResolvedConfig(
        config=merged,
        sources=sources,
        keep=keep,
        policy=policy,
        checkpoint=ckpt,
        derived=derived,
        notes=notes,
    )


_ORIGIN: Final[dict[str, str]] = {
    "user": "from this config",
    "checkpoint": "from the checkpoint",
    "checkpoint weights": "from the checkpoint's weights",
    "default": "the default",
    "derived": "derived",
}


def _validate_merge(data: dict[str, Any], sources: dict[str, Source], ckpt: CheckpointConfig) -> ModelConfig:
    """The merged config; a violated rule names each value involved and where it came from."""
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        issues = []
        for issue in issues_from_validation(error, f"merged with {ckpt.path}"):
            if isinstance(issue.input, dict):
                involved = issue.input
            else:
                involved = {str(issue.loc[0]): issue.input} if issue.loc else {}
            origin = "; ".join(
                f"{name}={value!r} {_ORIGIN[sources.get(name, 'default')]}"
                for name, value in involved.items()
            )
            issues.append(replace(issue, message=f"{issue.message} [{origin}]"))
        raise InvalidMergeError(issues) from None


def _precedence_notes(
    config: ModelConfig, merged: ModelConfig, ckpt: CheckpointConfig, kept: set[str], policy: Policy
) -> list[str]:
    """What surprises people: values this config sets that the merge drops, and unknown defaults."""
    notes = []
    if ckpt.dropped:
        notes.append(
            "entries of the checkpoint's own lists that bioconf cannot use were dropped: "
            + "; ".join(f"{name}: {', '.join(map(repr, items))}" for name, items in ckpt.dropped.items())
        )
    if not ckpt.defaults_known:
        notes.append(
            f"the checkpoint's config class {ckpt.class_path} is not a bioconf class: the fields its "
            "io.json does not set take that class's own defaults at run time, which may differ from the "
            "values shown here as 'default'"
        )
    for name in ModelConfig.model_fields:
        if name in config.model_fields_set and name not in kept:
            ours, theirs = getattr(config, name), getattr(merged, name)
            if ours != theirs:
                whose = "the checkpoint's" if name in ckpt.config.model_fields_set else "the default"
                notes.append(
                    f"{name}: this config sets {ours!r}, but {whose} {theirs!r} is used "
                    f"(policy {policy!r} keeps only override_parent_fields)"
                )
    return notes


def _check_shapes(
    merged: ModelConfig, sources: dict[str, Source], ckpt: CheckpointConfig, kept: set[str]
) -> list[str]:
    """Raise CheckpointMismatchError for every shape field whose value would not fit the checkpoint's
    weights; return notes on the differences that do no harm and on what cannot be checked."""
    notes: list[str] = []
    issues: list[ConfigIssue] = []
    unknown: list[str] = []
    skips = merged.initial_ckpt_skip_keys_with_these_prefixes
    for name in SHAPE_PREFIXES:
        if name in SHAPES_ONLY_WHEN and not SHAPES_ONLY_WHEN[name](merged):
            continue
        if name == "make_vocab_size_divisible_by":  # compared as the rows vocab_size pads to
            continue
        if not ckpt.defaults_known and name not in ckpt.config.model_fields_set:
            if name in kept:
                unknown.append(name)
            continue
        ours, theirs = effective(merged, name), effective(ckpt.config, name)
        if name == "vocab_size":  # compare the rows the weights have, padding included
            ours, theirs = _vocab_rows(merged), vocab_rows_in_weights(ckpt) or _vocab_rows(ckpt.config)
        if ours == theirs:
            continue
        if name == "model_cls":
            if not (ours in FAMILIES and theirs in FAMILIES):
                continue
            if FAMILIES[ours].architecture == FAMILIES[theirs].architecture:
                notes.append(
                    f"model_cls: {ours!r} here, {theirs!r} in the checkpoint: fine, both build "
                    f"megatron's {FAMILIES[ours].architecture} module tree (the same weights)"
                )
                continue
        if name in UNRECORDED_WHEN_NONE and None in (ours, theirs):
            notes.append(
                f"{name}: {ours!r} here, {theirs!r} in the checkpoint: not checked (None is unknown)"
            )
            continue
        difference = f"{ours!r} here ({_ORIGIN[sources[name]]}) but {theirs!r} in the checkpoint"
        weights = shaped_weights(merged, name)
        if merged.initial_ckpt_path_ignore_weights:
            notes.append(f"{name}: {difference}: fine, initial_ckpt_path_ignore_weights loads no weights")
        elif weights is None:
            why = f"{merged.model_cls} is not gpt or bert: bioconf cannot tell which weights it shapes"
            issues.append(_mismatch(name, ours, theirs, difference, why, ckpt))
        elif not weights:
            notes.append(f"{name}: {difference}: fine, the model built has none of the weights it shapes")
        elif loaded := weights.not_skipped(skips):
            why = f"the weights it shapes would not load (not skipped: {_summary(loaded)})"
            issues.append(_mismatch(name, ours, theirs, difference, why, ckpt))
        else:
            notes.append(f"{name}: {difference}: fine, every weight it shapes is skipped")
    if unknown:
        notes.append(
            f"not checked against the checkpoint: {', '.join(unknown)} (kept here; its class "
            f"{ckpt.class_path} leaves them to its own defaults)"
        )
    if issues:
        raise CheckpointMismatchError(issues)
    return notes


def vocab_rows_in_weights(ckpt: CheckpointConfig) -> int | None:
    """The rows of the checkpoint's word embedding (or output layer): its padded vocabulary; None
    without a weight index or either weight."""
    if not (ckpt.paths.weights / METADATA_FILE).is_file():
        return None
    tensors = {tensor.name: tensor for tensor in read_weights_metadata(ckpt.paths.root).tensors}
    for key in _VOCAB_WEIGHTS:
        if (tensor := tensors.get(MODULE_PREFIX + key)) is not None and tensor.shape:
            return tensor.shape[0]
    return None


_VOCAB_WEIGHTS: Final = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def _vocab_rows(config: ModelConfig) -> int | None:
    if config.vocab_size is None:
        return None
    return padded_vocab_size(
        config.vocab_size, config.make_vocab_size_divisible_by, config.tensor_model_parallel_size
    )


def _mismatch(
    name: str, ours: Any, theirs: Any, difference: str, why: str, ckpt: CheckpointConfig
) -> ConfigIssue:
    return ConfigIssue(
        f"{difference}: {why}; use the checkpoint's value, or skip those weights with "
        "initial_ckpt_skip_keys_with_these_prefixes",
        "checkpoint_mismatch",
        loc=(name,),
        input={"config": ours, "checkpoint": theirs},
        source=str(ckpt.path),
    )


_MAX_RANGES_SHOWN: Final = 20


def _summary(parts: list[str | LayerPrefixes]) -> str:
    """Prefixes for reading, per-layer ones folded: "decoder.layers.{0..11}.mlp.", "{0,2,5..7}"."""
    shown = []
    for part in parts:
        if isinstance(part, str):
            shown.append(part)
            continue
        ranges = [str(start) if stop - start == 1 else f"{start}..{stop - 1}" for start, stop in part.layers]
        if len(ranges) > _MAX_RANGES_SHOWN:
            ranges = [*ranges[:_MAX_RANGES_SHOWN], f"... {len(ranges) - _MAX_RANGES_SHOWN} more"]
        single = len(ranges) == 1 and ".." not in ranges[0]
        shown.append(f"{part.base}{ranges[0] if single else '{' + ','.join(ranges) + '}'}.{part.tail}")
    return ", ".join(shown)
