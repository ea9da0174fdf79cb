"""Tracked init hyper-parameters for dataclass configs, as NeMo 2's ``IOMixin`` records them.

A config built through ``IOMixinWithGettersSetters`` keeps, in ``self.__io__`` (a
``fiddle.Config`` of its class), the init arguments that were passed explicitly. That record is
what a NeMo 2 checkpoint stores and what ``nemo.lightning.io.reinit`` rebuilds from, while the
attributes may drift from it (``__post_init__`` derives some). ``set_hparam``/``get_hparam`` read
and write the record; the attribute only when asked. No nemo import: fiddle only.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import fiddle as fdl


@runtime_checkable
class IOMixinProto(Protocol):
    """What ``override_mutate_possibly_extra_mutated_fiddle`` needs of a config."""

    def set_hparam(self, attribute: str, value: Any, also_change_value: bool = True) -> None: ...

    def get_hparam(self, attribute: str) -> Any: ...


class WillHaveGetSetHparam(ABC):
    """Abstract base of configs that will get the hparam getters and setters (from the mixin)."""

    @abstractmethod
    def set_hparam(self, attribute: str, value: Any, also_change_value: bool = True) -> None:
        """Set the tracked init value of ``attribute`` (and the attribute, unless told not to)."""

    @abstractmethod
    def get_hparam(self, attribute: str) -> Any:
        """The tracked init value of ``attribute``."""

    @abstractmethod
    def get_hparams(self) -> dict[str, Any]:
        """The recorded (explicitly passed) init arguments."""

    @abstractmethod
    def get_non_default_hparams(self) -> list[str]:
        """Names of recorded init arguments whose value differs from the default."""


def _wrap_init(cls: type) -> None:
    """Make ``cls.__init__`` record its explicit arguments in ``self.__io__`` (once per class)."""
    if "_bioconf_records_init" in cls.__dict__:
        return
    original = cls.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        # A subclass's __init__ that calls super().__init__ must not re-record: the outermost wins.
        if "__io__" not in self.__dict__:
            names = (
                [f.name for f in dataclasses.fields(self) if f.init] if dataclasses.is_dataclass(self) else []
            )
            explicit = dict(zip(names, args, strict=False)) if args else {}
            explicit.update(kwargs)
            self.__dict__["__io__"] = fdl.Config(type(self), **explicit)
        original(self, *args, **kwargs)

    cls.__init__ = init
    cls._bioconf_records_init = True


class IOMixinWithGettersSetters(WillHaveGetSetHparam):
    """Records a dataclass's explicit init arguments in ``self.__io__`` and reads/writes them.

    Defaults are not recorded (as NeMo's IOMixin), so a saved checkpoint holds the user's choices.
    ``get_hparam`` falls back to the field's default, including ``default_factory`` fields.
    """

    __io__: fdl.Config

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Wrap lazily: @dataclass writes __init__ after the class body (and after __init_subclass__).
        _wrap_init(cls)
        return super().__new__(cls)

    def _init_fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]

    def _require_init_field(self, attribute: str) -> dataclasses.Field:
        fields = self._init_fields()
        if attribute not in fields:
            raise KeyError(
                f"{attribute!r} is not an init argument of {type(self).__name__}; "
                f"valid names: {', '.join(sorted(fields))}"
            )
        return fields[attribute]

    def set_hparam(self, attribute: str, value: Any, also_change_value: bool = True) -> None:
        self._require_init_field(attribute)
        setattr(self.__io__, attribute, value)
        if also_change_value:
            setattr(self, attribute, value)

    def get_hparam(self, attribute: str) -> Any:
        field = self._require_init_field(attribute)
        arguments = self.__io__.__arguments__
        if attribute in arguments:
            return arguments[attribute]
        return _field_default(field)

    def get_hparams(self) -> dict[str, Any]:
        return dict(self.__io__.__arguments__)

    def get_non_default_hparams(self) -> list[str]:
        fields = self._init_fields()
        return [
            name
            for name, value in self.__io__.__arguments__.items()
            if name not in fields or not same_value(value, _field_default(fields[name]))
        ]


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    if field.default is dataclasses.MISSING:
        raise KeyError(f"{field.name!r} has no default and was not passed")
    return field.default


def same_value(a: Any, b: Any) -> bool:
    """``a == b`` where that is a plain answer; identity for values whose == is not (tensors)."""
    try:
        return bool(a == b)
    except Exception:
        return a is b


def override_mutate_possibly_extra_mutated_fiddle(
    target_cfg: IOMixinProto, source_cfg: IOMixinProto, maybe_mutated_elements_to_clone: list[str]
) -> None:
    """Copy each named field from ``source_cfg`` into ``target_cfg``: first the tracked init value
    (what a checkpoint saved later records), then the live attribute (which ``__post_init__`` may
    have derived differently, e.g. ``ffn_hidden_size``)."""
    for name in maybe_mutated_elements_to_clone:
        target_cfg.set_hparam(name, source_cfg.get_hparam(name), also_change_value=False)
        setattr(target_cfg, name, getattr(source_cfg, name))
