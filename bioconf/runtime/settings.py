"""Loading a checkpoint's settings into a runtime config: the seed's dual override, atomic and reported.

The checkpoint's model config is read as data by the schema layer (nothing it names is imported),
built as a runtime config so megatron's ``__post_init__`` derives what it derived at training
time, then copied field by field into the target: the tracked init value first, the live
attribute second (``override_mutate_possibly_extra_mutated_fiddle``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from bioconf.runtime.hparams import (
    IOMixinWithGettersSetters,
    override_mutate_possibly_extra_mutated_fiddle,
    same_value,
)
from bioconf.runtime.materialize import materialize
from bioconf.schema.errors import ConfigError, ConfigIssue
from bioconf.schema.megatron_fields import NO_JSON_FORM
from bioconf.schema.nemo_context import read_checkpoint_config


@dataclass(frozen=True)
class SettingsReport:
    """What ``load_settings_from_checkpoint`` did."""

    checkpoint: str
    """The io.json read."""
    class_path: str
    """The config class the checkpoint names (never imported)."""
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Field -> (old, new) attribute value, for every field whose value changed."""
    dropped: dict[str, Any] = field(default_factory=dict)
    """Checkpoint fields this megatron-core/bioconf does not know: not applied."""
    kept: tuple[str, ...] = ()
    """Fields this config has that the checkpoint cannot carry: left as they were."""
    preserved: tuple[str, ...] = ()
    """Fields in ``override_parent_fields``: the checkpoint's value was not applied."""
    class_defaults_unknown: bool = False
    """The checkpoint names a class that is not bioconf's: values it left to that class's own
    defaults are megatron's defaults here."""


def load_settings(
    target: IOMixinWithGettersSetters, checkpoint_dir: str | os.PathLike[str]
) -> SettingsReport:
    """Override every field of ``target`` that the checkpoint's config also has, except the fields in
    ``target.override_parent_fields``; on any error ``target`` (attributes and ``__io__``) is unchanged."""
    checkpoint = read_checkpoint_config(checkpoint_dir)
    source = materialize(checkpoint.config, source=str(checkpoint.path))

    source_fields = {f.name for f in dataclasses.fields(source)}  # type: ignore[arg-type]
    target_fields = [f.name for f in dataclasses.fields(target) if f.init]  # type: ignore[arg-type]
    keep = set(target.override_parent_fields)  # type: ignore[attr-defined]
    # Fields with no JSON form cannot come from a checkpoint: the source only has their defaults.
    overridable = [
        name
        for name in target_fields
        if name in source_fields and name not in keep and name not in NO_JSON_FORM
    ]

    before_attributes = dict(target.__dict__)
    before_tracked = dict(target.__io__.__arguments__)
    try:
        override_mutate_possibly_extra_mutated_fiddle(target, source, overridable)  # type: ignore[arg-type]
    except Exception as error:
        _restore(target, before_attributes, before_tracked)
        raise ConfigError(
            [
                ConfigIssue(
                    f"cannot apply the checkpoint's settings: {error}",
                    "override_error",
                    source=str(checkpoint.path),
                )
            ]
        ) from error

    changed = {
        name: (before_attributes.get(name), getattr(target, name))
        for name in overridable
        if not same_value(before_attributes.get(name), getattr(target, name))
    }
    return SettingsReport(
        checkpoint=str(checkpoint.path),
        class_path=checkpoint.class_path,
        changed=changed,
        dropped=dict(checkpoint.unknown_fields),
        kept=tuple(name for name in target_fields if name not in source_fields or name in NO_JSON_FORM),
        preserved=tuple(name for name in target_fields if name in keep),
        class_defaults_unknown=not checkpoint.class_is_bioconf,
    )


def _restore(target: Any, attributes: dict[str, Any], tracked: dict[str, Any]) -> None:
    target.__dict__.clear()
    target.__dict__.update(attributes)
    arguments = target.__io__.__arguments__
    arguments.clear()
    arguments.update(tracked)
