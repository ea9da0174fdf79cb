"""Loading a checkpoint's settings into a runtime config: the seed's dual override, atomic and reported.

The checkpoint's model config is read as data (nothing it names is imported) and merged with the
target's own values by the same ``bioconf.resolve.merge`` that ``bioconf resolve`` and ``bioconf run``
use, keeping ``override_parent_fields``. The merge is built as a runtime config, so megatron's
``__post_init__`` derives what it derives from the final values, and copied field by field into the
target: the tracked init value first, the live attribute second
(``override_mutate_possibly_extra_mutated_fiddle``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.errors import CheckpointError
from bioconf.resolve import merge
from bioconf.runtime.hparams import (
    IOMixinWithGettersSetters,
    override_mutate_possibly_extra_mutated_fiddle,
    same_value,
)
from bioconf.schema.megatron_fields import NO_JSON_FORM


@dataclass(frozen=True)
class SettingsReport:
    """What ``load_settings_from_checkpoint`` did."""

    checkpoint: str
    """The io.json read."""
    class_path: str
    """The config class the checkpoint names (never imported)."""
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Field -> (old, new) attribute value, for every field whose value changed."""
    unknown: dict[str, Any] = field(default_factory=dict)
    """Checkpoint fields bioconf does not model: not applied."""
    kept: tuple[str, ...] = ()
    """Fields in ``override_parent_fields``: this config's value was kept."""
    not_carried: tuple[str, ...] = ()
    """Fields a checkpoint cannot carry (no JSON form, or unknown to the schema): left as they were."""
    class_defaults_unknown: bool = False
    """The checkpoint names a class that is not bioconf's: values it left to that class's own
    defaults are megatron's defaults here."""


def load_settings(
    target: IOMixinWithGettersSetters, checkpoint_dir: str | os.PathLike[str]
) -> SettingsReport:
    """Override every field of ``target`` (a ``bioconf.runtime.config`` class) that a checkpoint can
    carry with the checkpoint's value, except the fields in ``target.override_parent_fields``; on any
    error ``target`` (attributes and ``__io__``) is unchanged."""
    checkpoint = read_checkpoint_config(checkpoint_dir)
    keep = tuple(target.override_parent_fields)  # type: ignore[attr-defined]
    merged, _ = merge(target.to_schema(), checkpoint, keep)  # type: ignore[attr-defined]
    source = type(target).from_schema(merged, source=str(checkpoint.path))  # type: ignore[attr-defined]

    source_fields = {f.name for f in dataclasses.fields(source)}
    target_fields = [f.name for f in dataclasses.fields(target) if f.init]  # type: ignore[arg-type]
    carried = [name for name in target_fields if name in source_fields and name not in NO_JSON_FORM]
    overridable = [name for name in carried if name not in keep]

    before_attributes = dict(target.__dict__)
    before_tracked = dict(target.__io__.__arguments__)
    try:
        override_mutate_possibly_extra_mutated_fiddle(target, source, overridable)
    except Exception as error:
        _restore(target, before_attributes, before_tracked)
        raise CheckpointError.one(
            f"cannot apply the checkpoint's settings: {error}", "override_error", source=checkpoint.path
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
        unknown=dict(checkpoint.unknown_fields),
        kept=tuple(name for name in target_fields if name in keep),
        not_carried=tuple(name for name in target_fields if name not in carried),
        class_defaults_unknown=not checkpoint.defaults_known,
    )


def _restore(target: Any, attributes: dict[str, Any], tracked: dict[str, Any]) -> None:
    target.__dict__.clear()
    target.__dict__.update(attributes)
    arguments = target.__io__.__arguments__
    arguments.clear()
    arguments.update(tracked)
