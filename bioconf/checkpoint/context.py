"""The NeMo 2 checkpoint form of a ``ModelConfig``: ``<ckpt>/context/io.json``, read and written as data.

A NeMo 2 checkpoint keeps its settings in ``context/io.json``: a ``TrainerContext`` serialized by
fiddle's JSON serialization. NeMo reads it back with ``nemo.lightning.io.load_context``, which
imports every class the file names (seconds of imports, and any module a file chooses to name)
and runs the config's ``__post_init__``. Here the file is walked as plain JSON instead: nothing
it names is imported or unpickled, so a pipeline reads a checkpoint's model config in
milliseconds with pydantic, orjson and PyYAML only (no torch, fiddle, megatron or nemo).

The format (fiddle 0.3.1, ``fiddle/_src/experimental/serialization.py``), as far as it matters here:

- The document is ``{"root": REF, "objects": {KEY: NODE}, "refcounts": {KEY: N}, "version": "0.0.1"}``.
- A value is a JSON scalar (inside metadata), ``{"type": "leaf", "value": V}``,
  ``{"type": "ref", "key": KEY}`` (an entry of ``objects``), ``{"type": "pyref", "module": M,
  "name": N}`` (an importable object: ``torch.bfloat16``, ``torch.nn.functional.silu``, a class;
  an enum member is a pyref whose name is ``"EnumClass.member"``), or an object node
  ``{"type": PYREF, "items": [[PATH_ELEMENT, VALUE], ...], "metadata": VALUE}``. Values reached
  from the root also carry ``"paths": ["<root>.model.config.num_layers", ...]``.
- Object nodes: ``builtins.list``/``builtins.tuple`` (items by ``Index(index=i)``, metadata null),
  ``builtins.dict`` (items by ``Key(key=...)``, metadata the tuple of keys), and fiddle's
  ``Config``/``Partial`` (items by ``Attr(name=...)``: only the init arguments that were passed
  explicitly; metadata a ``BuildableTraverserMetadata`` whose ``fn_or_cls`` names the class).
  NeMo's IOMixin objects flatten to the same items and metadata under their own type.

The model config is the object whose ``paths`` include ``"<root>.model.config"``, which is also how
``load_context(..., subpath="model.config")`` finds it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from bioconf.checkpoint.layout import CONTEXT_DIR, IO_JSON, MODEL_YAML, CheckpointPaths, locate
from bioconf.errors import CheckpointError, ConfigIssue, issues_from_validation, short_repr
from bioconf.fs import fsync_path, read_bytes, refuse_existing, replace_directory, write_synced
from bioconf.schema.families import BIONEMO_FIELDS, FAMILY_OF_BIONEMO_CLASS, NOT_IN_BIONEMO_CONFIGS
from bioconf.schema.files import loads_json
from bioconf.schema.megatron_fields import DTYPE_FIELDS, ENUM_FIELDS
from bioconf.schema.model import BIONEMO_ONLY_FIELDS, ModelConfig
from bioconf.schema.names import ACTIVATIONS, activation_from_import, canonical_dtype

# ---- names the checkpoint form uses ---------------------------------------------------------------

# The bioconf runtime config class (module, class) written for each kind of ``model_cls``: the two
# megatron aliases, and "custom" for an import path "pkg.mod:Class" (written as a pyref in model_cls).
RUNTIME_CONFIG_CLASSES: Final[dict[str, tuple[str, str]]] = {
    "gpt": ("bioconf.runtime.config", "GPTModelConfig"),
    "bert": ("bioconf.runtime.config", "BertModelConfig"),
    "esm2": ("bioconf.runtime.config", "ESM2ModelConfig"),
    "geneformer": ("bioconf.runtime.config", "GeneformerModelConfig"),
    "biobert": ("bioconf.runtime.config", "BiobertModelConfig"),
    "custom": ("bioconf.runtime.config", "CustomModelConfig"),
}

# The model class behind each model_cls alias.
MODEL_CLASSES: Final[dict[str, tuple[str, str]]] = {
    "gpt": ("megatron.core.models.gpt.gpt_model", "GPTModel"),
    "bert": ("megatron.core.models.bert.bert_model", "BertModel"),
    "esm2": ("bioconf.runtime.models", "ESM2Model"),
    "geneformer": ("megatron.core.models.bert.bert_model", "BertModel"),
    "biobert": ("megatron.core.models.bert.bert_model", "BertModel"),
}

# BioNeMo's model classes, read as the family of the config class that names them.
_BIONEMO_MODEL_CLASSES: Final[frozenset[str]] = frozenset(
    {"bionemo.esm2.model.model:ESM2Model", "bionemo.llm.model.biobert.model:MegatronBioBertModel"}
)

MODEL_CONFIG_PATH: Final[str] = "<root>.model.config"
"""The fiddle path of the model config in a ``TrainerContext``."""

# The rest of the TrainerContext a written context holds: NeMo's TrainerContext and Trainer, and a
# namespace standing in for the LightningModule (the file records only its ``config``).
_TRAINER_CONTEXT: Final = ("nemo.lightning.io.pl", "TrainerContext")
_TRAINER: Final = ("nemo.lightning.pytorch.trainer", "Trainer")
_MODEL_HOLDER: Final = ("argparse", "Namespace")

_FIDDLE_VERSION: Final = "0.0.1"
_CONFIG: Final = ("fiddle._src.config", "Config")
_PARTIAL_TYPES: Final = frozenset({"fiddle._src.partial:Partial", "fiddle._src.partial:ArgFactory"})
_METADATA: Final = ("fiddle._src.config", "BuildableTraverserMetadata")
_SEQUENCES: Final = frozenset({"builtins:list", "builtins:tuple", "builtins:set", "builtins:frozenset"})


def _snake(name: str) -> str:
    return re.sub(r"(?<=[^_A-Z])(?=[A-Z])", "_", name).lower()


_KNOWN_FIELDS: Final[frozenset[str]] = frozenset(ModelConfig.model_fields)


def _class_path(module_and_name: tuple[str, str]) -> str:
    return f"{module_and_name[0]}:{module_and_name[1]}"


def _runtime_class_paths() -> frozenset[str]:
    """``"module:Class"`` of every bioconf runtime config class."""
    return frozenset(_class_path(v) for v in RUNTIME_CONFIG_CLASSES.values())


# ---- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointConfig:
    """The model config of a NeMo 2 checkpoint, as data."""

    path: Path
    """The ``io.json`` read."""
    paths: CheckpointPaths
    """Where this checkpoint's parts lie (``paths.root`` is the checkpoint folder)."""
    class_path: str
    """The config class the file names, ``"module:Qualname"``."""
    config: ModelConfig
    """Built from the known fields the file sets (``model_fields_set`` is exactly those)."""
    unknown_fields: dict[str, Any]
    """Fields ModelConfig does not know (NO_JSON_FORM ones included), as data: pyrefs as
    ``"module:name"``, fiddle configs as ``{"_target_": "module:name", **arguments}``."""
    class_is_bioconf: bool
    """True when ``class_path`` is a bioconf runtime class, whose defaults are ModelConfig's."""
    dropped: dict[str, list[Any]] = field(default_factory=dict)
    """Entries of the checkpoint's own lists that bioconf cannot use, dropped and reported rather
    than fatal (checkpoint data is read leniently, user input strictly): names in
    ``override_parent_fields`` that are not fields here, skip prefixes that are not key prefixes."""

    @property
    def defaults_known(self) -> bool:
        """Whether the values the file leaves to its class's defaults are known without importing the
        class: a bioconf class, or a BioNeMo class whose family holds its defaults."""
        return self.class_is_bioconf or self.class_path in FAMILY_OF_BIONEMO_CLASS

    @property
    def bionemo_family(self) -> str | None:
        """The family of a checkpoint written by BioNeMo's own config class, else None."""
        return FAMILY_OF_BIONEMO_CLASS.get(self.class_path)


@dataclass(frozen=True)
class _Pyref:
    module: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.module}:{self.name}"


@dataclass(frozen=True)
class _Metadata:
    fn_or_cls: Any
    argument_names: list[Any]


@dataclass(frozen=True)
class _Buildable:
    target: Any  # a _Pyref, normally
    arguments: dict[Any, Any]
    partial: bool


@dataclass(frozen=True)
class _Object:
    type: _Pyref
    items: list[tuple[str, Any]]


class _Malformed(Exception):
    """The document is JSON but not fiddle's serialization (reported with the field at hand)."""


MAX_CONTEXT_DEPTH: Final = 100
"""Levels of nesting below the model config, each reference counted as one: NeMo's deepest (a layer
spec of nested ModuleSpecs) is a few dozen. It keeps the decoder's recursion (a few frames a level)
and what reads its result (``_as_data``, orjson's 255 levels) far from any limit, so a chain of
100,000 references is an error, not a RecursionError."""
MAX_CONTEXT_VALUES: Final = 100_000
"""Values the model config expands to, a shared reference counted at each use (as ``_as_data`` and
JSON output expand it): a real one holds a few hundred. 30 objects that each refer to the one
before twice expand to 2**30; they are refused after these, in time linear in the file."""


class _Decoder:
    """One pass over the nodes reachable from the model config: refs resolved (each once), pyrefs
    kept as names, containers and fiddle configs turned into plain Python data.

    Every method returns ``(value, values, levels)``: the value and the extent it expands to. A
    reference decoded once is reused with its extent, so the limits (MAX_CONTEXT_DEPTH,
    MAX_CONTEXT_VALUES) hold for the expanded result while each object is decoded only once."""

    def __init__(self, objects: dict[str, Any]):
        self.objects = objects
        self.done: dict[str, tuple[Any, int, int]] = {}
        self.active: set[str] = set()

    def value(self, node: Any, depth: int = 0) -> tuple[Any, int, int]:
        if depth > MAX_CONTEXT_DEPTH:
            raise _Malformed(f"nested deeper than {MAX_CONTEXT_DEPTH} levels (references included)")
        if type(node) is dict:
            kind = node.get("type")
            if kind == "leaf":
                return _leaf(node["value"], depth)
            if kind == "ref":
                return self.ref(node.get("key"), depth)
            if kind == "pyref":
                return self.pyref(node), 1, 1
            if type(kind) is dict:
                return self.object(node, depth)
            raise _Malformed(f"a node of unknown type {short_repr(kind)}")
        if type(node) is list:
            decoded = [self.value(item, depth + 1) for item in node]
            return _composite([item for item, _, _ in decoded], decoded)
        return _leaf(node, depth)

    def ref(self, key: Any, depth: int = 0) -> tuple[Any, int, int]:
        if type(key) is str and key in self.done:
            result = self.done[key]
            if depth + result[2] > MAX_CONTEXT_DEPTH:  # its target would sit at depth + 1
                raise _Malformed(f"nested deeper than {MAX_CONTEXT_DEPTH} levels (references included)")
            return result
        result = self.done[key] = self.value(self.referenced(key), depth + 1)
        self.active.discard(key)
        return result

    def referenced(self, key: Any) -> Any:
        """The object ``key`` names, marked as being decoded (the caller unmarks it when done)."""
        if type(key) is not str or key not in self.objects:
            raise _Malformed(f"a reference to a missing object {short_repr(key)}")
        if key in self.active:
            raise _Malformed(f"object {short_repr(key)} contains itself")
        self.active.add(key)
        return self.objects[key]

    @staticmethod
    def pyref(node: dict[str, Any]) -> _Pyref:
        module, name = node.get("module"), node.get("name")
        if type(module) is not str or type(name) is not str:
            raise _Malformed("a pyref without a module and a name")
        return _Pyref(module, name)

    def object(self, node: dict[str, Any], depth: int) -> tuple[Any, int, int]:
        kind = self.pyref(node["type"])
        path = kind.path
        items = node["items"]
        if type(items) is not list or not all(type(item) is list and len(item) == 2 for item in items):
            raise _Malformed(f"the items of a {path} are not a list of [path, value] pairs")
        decoded = [self.value(value, depth + 1) for _, value in items]
        values = [value for value, _, _ in decoded]
        if path in _SEQUENCES:
            return _composite(values, decoded)
        metadata, values_in_metadata, _ = self.metadata(node.get("metadata"), depth + 1)
        if path == "builtins:dict":
            keys = metadata if type(metadata) is list else []
            return _composite(dict(zip(keys, values, strict=True)), decoded, values_in_metadata)
        if isinstance(metadata, _Metadata):
            # fiddle's Config/Partial, or a NeMo IOMixin object flattened from its __io__.
            arguments = dict(zip(metadata.argument_names, values, strict=True))
            return _composite(_Buildable(metadata.fn_or_cls, arguments, path in _PARTIAL_TYPES), decoded)
        paths = [str(p) for p, _ in items]
        return _composite(_Object(kind, list(zip(paths, values, strict=True))), decoded)

    def metadata(self, node: Any, depth: int) -> tuple[Any, int, int]:
        """A Buildable's metadata: only fn_or_cls and the argument names are needed (not the tags
        or history), and the names are plain strings: read them without the general walk."""
        key = node.get("key") if type(node) is dict and node.get("type") == "ref" else None
        if type(key) is str and key in self.done:
            return self.done[key]
        raw = self.objects.get(key) if type(key) is str else node
        kind = raw.get("type") if type(raw) is dict else None
        if type(kind) is not dict or (kind.get("module"), kind.get("name")) != _METADATA:
            return self.value(node, depth)
        fields = {p: v for p, v in raw["items"]}
        names = fields["Attr(name='argument_names')"]
        if type(names) is dict and names.get("type") == "ref":
            names = self.objects[names["key"]]
        argument_names = [n for _, n in names["items"]]
        fn_or_cls, _, _ = self.value(fields["Attr(name='fn_or_cls')"], depth + 1)
        result = (_Metadata(fn_or_cls, argument_names), 1 + len(argument_names), 2)
        if key is not None:
            self.done[key] = result
        return result


def _composite(value: Any, parts: list[tuple[Any, int, int]], extra: int = 0) -> tuple[Any, int, int]:
    """A container's extent from its parts'; refused past MAX_CONTEXT_VALUES."""
    values = 1 + extra + sum(size for _, size, _ in parts)
    if values > MAX_CONTEXT_VALUES:
        raise _Malformed(f"the model config expands to more than {MAX_CONTEXT_VALUES} values")
    return value, values, 1 + max((levels for _, _, levels in parts), default=0)


def _leaf(value: Any, depth: int) -> tuple[Any, int, int]:
    """A plain JSON value (a leaf's, or one inside metadata) with its extent, counted iteratively."""
    if type(value) not in (list, dict):
        return value, 1, 1
    values, levels, stack = 0, 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        values += 1
        levels = max(levels, level)
        if depth + level > MAX_CONTEXT_DEPTH + 1:
            raise _Malformed(f"nested deeper than {MAX_CONTEXT_DEPTH} levels (references included)")
        if values > MAX_CONTEXT_VALUES:
            raise _Malformed(f"the model config expands to more than {MAX_CONTEXT_VALUES} values")
        if type(item) is dict:
            stack.extend((child, level + 1) for child in item.values())
        elif type(item) is list:
            stack.extend((child, level + 1) for child in item)
    return value, values, levels


_SCALARS: Final = (str, int, float, bool, type(None))


def _as_data(value: Any) -> Any:
    """An unknown field's value as JSON data (what orjson writes): integers beyond 64 bits as text,
    keys as strings. Recursion is bounded by the decoder's MAX_CONTEXT_DEPTH."""
    if type(value) is int and not -(2**63) <= value < 2**64:
        return _int_text(value)
    if type(value) in _SCALARS:
        return value
    if isinstance(value, _Pyref):
        return value.path
    if isinstance(value, list):
        return [_as_data(v) for v in value]
    if isinstance(value, dict):
        return {_key_text(k): _as_data(v) for k, v in value.items()}
    if isinstance(value, _Buildable):
        out: dict[Any, Any] = {"_target_": _as_data(value.target)}
        if value.partial:
            out["_partial_"] = True
        out.update((_key_text(k), _as_data(v)) for k, v in value.arguments.items())
        return out
    if isinstance(value, _Object):
        return {"_type_": value.type.path, "items": {path: _as_data(v) for path, v in value.items}}
    if isinstance(value, _Metadata):
        return _as_data(value.fn_or_cls)
    return value


def _int_text(value: int) -> str:
    """An integer as text (Python converts at most 4,300 digits to decimal)."""
    return str(value) if value.bit_length() < 14000 else f"<integer of {value.bit_length()} bits>"


def _key_text(key: Any) -> str:
    """A mapping key as JSON writes it: strings as they are, numbers and names as text."""
    if type(key) is str:
        return key
    if type(key) is int:
        return _int_text(key)
    if isinstance(key, _Pyref):
        return key.path
    return short_repr(key, 1000)


def _known_value(name: str, value: Any, class_path: str) -> Any:
    """A known field's value in schema form; what cannot be converted is left for ModelConfig to
    reject with its own message."""
    if type(value) in _SCALARS and name != "model_cls":
        return value
    if isinstance(value, list):
        return [_known_value(name, v, class_path) for v in value]
    if name == "model_cls":
        return _model_cls_name(value, class_path)
    if not isinstance(value, _Pyref):
        return _as_data(value)
    if name == "activation_func":
        return activation_from_import(value.module, value.name) or f"{value.module}.{value.name}"
    if value.module == "torch":
        try:
            return canonical_dtype(f"torch.{value.name}")
        except PydanticCustomError:
            return f"torch.{value.name}"
    enum_class, dot, member = value.name.rpartition(".")
    if dot and enum_class[:1].isupper():  # an enum member: "AttnBackend.local"
        return member
    return value.path


def _model_cls_name(value: Any, class_path: str) -> Any:
    """A family's model class by the family's alias (the config class decides between families that
    build the same class), except in bioconf's CustomModelConfig (which always holds an import path);
    a class the runtime class leaves to its family default (None) too."""
    custom = class_path == _class_path(RUNTIME_CONFIG_CLASSES["custom"])
    if isinstance(value, _Pyref):
        if custom:
            return value.path
        own = _family_of_class(class_path)
        if own and (value.path in _BIONEMO_MODEL_CLASSES or _class_path(MODEL_CLASSES[own]) == value.path):
            return own
        for alias, target in MODEL_CLASSES.items():
            if (value.module, value.name) == target:
                return alias
        return value.path
    if value is None:
        return _family_of_class(class_path) or None
    return _as_data(value)


def _family_of_class(class_path: str) -> str | None:
    """The family a config class builds: bioconf's runtime classes and BioNeMo's known ones."""
    for alias in MODEL_CLASSES:
        if class_path == _class_path(RUNTIME_CONFIG_CLASSES[alias]):
            return alias
    return FAMILY_OF_BIONEMO_CLASS.get(class_path)


def _parse(raw: bytes, source: str) -> Any:
    try:
        return loads_json(raw, source, CheckpointError)
    except CheckpointError:
        try:  # fiddle writes with json.dumps, which spells non-finite floats NaN / Infinity
            return json.loads(raw)
        except (ValueError, RecursionError):  # the json module recurses once per level
            pass
        raise


def read_checkpoint_config(ckpt_dir: str | os.PathLike[str]) -> CheckpointConfig:
    """The model config of the NeMo 2 checkpoint at ``ckpt_dir`` (its ``context/io.json``; any part
    ``locate`` accepts), read as data: nothing the file names is imported. Raises CheckpointError
    when the file is unreadable, not a fiddle serialization with a model config or holds a value
    ModelConfig rejects (its subclass CheckpointNotFoundError when there is no io.json)."""
    paths = locate(ckpt_dir)
    path = paths.require_context()
    return parse_checkpoint_config(read_bytes(path, CheckpointError), paths)


def parse_checkpoint_config(raw: bytes, paths: CheckpointPaths) -> CheckpointConfig:
    """``read_checkpoint_config`` of the bytes of ``paths.io_json``, read by the caller (the service
    reads them through the file descriptors it checked)."""
    path = paths.io_json
    source = str(path)
    document = _parse(raw, source)
    objects = document.get("objects") if isinstance(document, dict) else None
    if not isinstance(objects, dict):
        raise CheckpointError(
            [
                ConfigIssue(
                    "not a fiddle serialization: expected a JSON object with 'root' and 'objects'",
                    "not_fiddle",
                    source=source,
                )
            ]
        )
    key = next(
        (
            k
            for k, node in objects.items()
            if isinstance(node, dict)
            and isinstance(node.get("paths"), list)
            and MODEL_CONFIG_PATH in node["paths"]
        ),
        None,
    )
    if key is None:
        raise CheckpointError(
            [
                ConfigIssue(
                    f"no model config: no object in the file has the path {MODEL_CONFIG_PATH!r} "
                    "(a NeMo 2 TrainerContext's model.config)",
                    "missing_model_config",
                    loc=("model", "config"),
                    source=source,
                )
            ]
        )
    decoder = _Decoder(objects)
    try:
        node, _, _ = decoder.ref(key)
    except (_Malformed, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise _malformed(error, ("model", "config"), source) from None
    if not isinstance(node, _Buildable) or not isinstance(node.target, _Pyref):
        raise CheckpointError(
            [
                ConfigIssue(
                    f"the object at {MODEL_CONFIG_PATH!r} is not a config of a named class",
                    "not_a_config",
                    loc=("model", "config"),
                    source=source,
                )
            ]
        )
    class_path = node.target.path
    known: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for name, value in node.arguments.items():
        if name in _KNOWN_FIELDS:
            known[name] = _known_value(name, value, class_path)
        else:
            unknown[_key_text(name)] = _as_data(value)
    if "model_cls" not in known:
        known["model_cls"] = _implied_family(class_path, known)
        if known["model_cls"] is None:
            del known["model_cls"]
    dropped = _drop_unusable_entries(known)
    try:
        config = ModelConfig.model_validate(known)
    except ValidationError as error:
        raise CheckpointError(issues_from_validation(error, source)) from None
    return CheckpointConfig(
        path=path,
        paths=paths,
        class_path=class_path,
        config=config,
        unknown_fields=unknown,
        class_is_bioconf=class_path in _runtime_class_paths(),
        dropped=dropped,
    )


def _implied_family(class_path: str, known: dict[str, Any]) -> str | None:
    """The family of a config that leaves ``model_cls`` to its class: a BioNeMo class's own; for a
    class bioconf does not know (a user's BioBertConfig subclass) that records fields only BioNeMo's
    families have, the family those fields imply ("biobert", BioNeMo's base, when it has them all)."""
    if class_path in FAMILY_OF_BIONEMO_CLASS:
        return FAMILY_OF_BIONEMO_CLASS[class_path]
    if class_path in _runtime_class_paths():
        return None  # bioconf's class: ModelConfig's default
    families: set[str] | None = None
    for name in known.keys() & BIONEMO_FIELDS.keys():
        families = set(BIONEMO_FIELDS[name]) if families is None else families & set(BIONEMO_FIELDS[name])
    if not families:
        return None
    return "biobert" if "biobert" in families else sorted(families)[0]


_SKIP_PREFIX: Final = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\.?")


def _drop_unusable_entries(known: dict[str, Any]) -> dict[str, list[Any]]:
    """Take out of the checkpoint's keep list the names bioconf does not model (BioNeMo's lists name
    its own fields), and out of its skip list what is no key prefix, duplicates included; return
    them. The lists stay lists: a value of another type is ModelConfig's to reject."""
    checks = {
        "override_parent_fields": lambda item: item in _KNOWN_FIELDS or item in BIONEMO_ONLY_FIELDS,
        "initial_ckpt_skip_keys_with_these_prefixes": lambda item: bool(_SKIP_PREFIX.fullmatch(item)),
    }
    dropped: dict[str, list[Any]] = {}
    for name, usable in checks.items():
        items = known.get(name)
        if not isinstance(items, list):
            continue
        kept: list[Any] = []
        for item in items:
            if isinstance(item, str) and usable(item) and item not in kept:
                kept.append(item)
            else:
                dropped.setdefault(name, []).append(_as_data(item))
        known[name] = kept
    return dropped


def _malformed(error: Exception, loc: tuple[str, ...], source: str) -> CheckpointError:
    detail = str(error) if isinstance(error, _Malformed) else f"{type(error).__name__}: {error}"
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return CheckpointError(
        [
            ConfigIssue(
                f"not a fiddle serialization of a config: {detail}", "not_fiddle", loc=loc, source=source
            )
        ]
    )


# ---- writing ------------------------------------------------------------------------------------


class _Writer:
    """Builds fiddle's document the way fiddle's serializer lays it out: children before their
    parent in ``objects``, containers and configs memoized under ``<snake_type>_<n>``, values
    reachable from the root carrying their paths, metadata without."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.refcounts: dict[str, int] = {}

    def memo(self, hint: str, node: dict[str, Any]) -> dict[str, Any]:
        n = 1
        while f"{hint}_{n}" in self.objects:
            n += 1
        key = f"{hint}_{n}"
        self.objects[key] = node
        self.refcounts[key] = 1
        return {"type": "ref", "key": key}

    @staticmethod
    def pyref(target: tuple[str, str], path: str | None = None) -> dict[str, Any]:
        node: dict[str, Any] = {"type": "pyref", "module": target[0], "name": target[1]}
        if path is not None:
            node["paths"] = [path]
        return node

    def value(self, value: Any, path: str) -> dict[str, Any]:
        """A plain value (scalar, list, tuple) at ``path``."""
        if isinstance(value, (list, tuple)):
            kind = "tuple" if isinstance(value, tuple) else "list"
            items = [[f"Index(index={i})", self.value(v, f"{path}[{i}]")] for i, v in enumerate(value)]
            node = {"type": self.pyref(("builtins", kind)), "items": items, "metadata": None, "paths": [path]}
            return node if value == () else self.memo(kind, node)
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"type": "leaf", "value": value, "paths": [path]}
        raise TypeError(f"{path}: no fiddle form for {value!r}")

    def metadata_tuple(self, values: list[Any]) -> dict[str, Any]:
        node = {
            "type": self.pyref(("builtins", "tuple")),
            "items": [[f"Index(index={i})", v] for i, v in enumerate(values)],
            "metadata": None,
        }
        return self.memo("tuple", node) if values else node

    def empty_dict(self) -> dict[str, Any]:
        node = {"type": self.pyref(("builtins", "dict")), "items": [], "metadata": self.metadata_tuple([])}
        return self.memo("dict", node)

    def config(self, target: tuple[str, str], arguments: list[tuple[str, Any]], path: str) -> dict[str, Any]:
        """A ``fdl.Config(target, **arguments)``; ``arguments`` hold already-built value nodes."""
        items = [[f"Attr(name={name!r})", node] for name, node in arguments]
        metadata = self.memo(
            "buildable_traverser_metadata",
            {
                "type": self.pyref(_METADATA),
                "items": [
                    ["Attr(name='fn_or_cls')", self.pyref(target)],
                    ["Attr(name='argument_names')", self.metadata_tuple([name for name, _ in arguments])],
                    ["Attr(name='argument_tags')", self.empty_dict()],
                    ["Attr(name='argument_history')", self.empty_dict()],
                ],
                "metadata": self.pyref(_METADATA),
            },
        )
        node = {"type": self.pyref(_CONFIG), "items": items, "metadata": metadata, "paths": [path]}
        return self.memo(_snake(target[1].rpartition(".")[2]), node)


def _written_fields(config: ModelConfig) -> list[str]:
    """The explicit fields plus every field whose value differs from its default, in schema order."""
    explicit = config.model_fields_set
    return [
        name
        for name, info in ModelConfig.model_fields.items()
        if name in explicit or getattr(config, name) != info.get_default(call_default_factory=True)
    ]


def _runtime_target(model_cls: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(runtime config class, model class) for a ``model_cls`` value."""
    if model_cls in MODEL_CLASSES:
        return RUNTIME_CONFIG_CLASSES[model_cls], MODEL_CLASSES[model_cls]
    module, _, name = model_cls.partition(":")
    return RUNTIME_CONFIG_CLASSES["custom"], (module, name)


def checkpoint_context_document(config: ModelConfig, config_class: str | None = None) -> dict[str, Any]:
    """The ``io.json`` document of ``config``: a TrainerContext whose ``model.config`` is a fiddle
    Config of the bioconf runtime class for ``config.model_cls`` (RUNTIME_CONFIG_CLASSES), or of
    ``config_class`` ("module:Class", a BioNeMo config class): then without the fields BioNeMo's
    classes do not have (``NOT_IN_BIONEMO_CONFIGS``), so BioNeMo loads it without bioconf."""
    writer = _Writer()
    target, model_class = _runtime_target(config.model_cls)
    names = _written_fields(config)
    if config_class is not None:
        module, _, name = config_class.partition(":")
        target = (module, name)
        names = [name for name in names if name not in NOT_IN_BIONEMO_CONFIGS]
    arguments: list[tuple[str, Any]] = []
    for name in names:
        value = getattr(config, name)
        path = f"{MODEL_CONFIG_PATH}.{name}"
        if name == "model_cls":
            node = writer.pyref(model_class, path)
        elif name in DTYPE_FIELDS and value is not None:
            node = writer.pyref(("torch", value), path)
        elif name == "activation_func":
            node = writer.pyref(ACTIVATIONS[value], path)
        elif name in ENUM_FIELDS:
            module, enum_class = ENUM_FIELDS[name]
            node = writer.pyref((module, f"{enum_class}.{value}"), path)
        else:
            node = writer.value(value, path)
        arguments.append((name, node))
    model_config = writer.config(target, arguments, MODEL_CONFIG_PATH)
    model = writer.config(_MODEL_HOLDER, [("config", model_config)], "<root>.model")
    trainer = writer.config(_TRAINER, [], "<root>.trainer")
    extra = writer.empty_dict()
    writer.objects[extra["key"]]["paths"] = ["<root>.extra"]
    root = writer.config(
        _TRAINER_CONTEXT, [("model", model), ("trainer", trainer), ("extra", extra)], "<root>"
    )
    return {
        "root": root,
        "objects": writer.objects,
        "refcounts": writer.refcounts,
        "version": _FIDDLE_VERSION,
    }


def _model_yaml(config: ModelConfig, class_path: str) -> bytes:
    data = config.to_dict()
    written = {name: data[name] for name in sorted(_written_fields(config))}
    header = (
        "# The model config of this checkpoint, for people (bioconf schema form; fields not listed\n"
        f"# have their defaults). Loaders read io.json, where it is a {class_path}.\n"
    )
    import yaml  # only writing pays for the import

    return (header + yaml.safe_dump(written, sort_keys=False)).encode()


def write_checkpoint_context(
    config: ModelConfig,
    ckpt_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    config_class: str | None = None,
) -> Path:
    """Write ``<ckpt_dir>/context/`` (``io.json`` for NeMo's ``load_context`` plus a readable
    ``model.yaml``) and return the io.json path. ``config_class``: name that class instead of
    bioconf's (``checkpoint_context_document``).

    The folder is built whole in a temporary folder beside it and renamed into place, so no
    reader ever sees a half-written context. An existing ``context/`` is an error unless
    ``overwrite``: then the old folder is renamed aside, the new one renamed in, and the old one
    deleted (a reader sees the old context, for an instant none, or the new one; never a mix; if
    the second rename fails the old one is put back).
    """
    ckpt = Path(ckpt_dir)
    context = ckpt / CONTEXT_DIR
    refuse_existing(context, overwrite)
    document = checkpoint_context_document(config, config_class)
    # json.dumps as fiddle does (NaN / Infinity spelled as Python's json module spells them).
    io_json = json.dumps(document).encode()
    class_path = config_class or _class_path(_runtime_target(config.model_cls)[0])
    ckpt.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".context.", suffix=".tmp", dir=ckpt))
    try:
        write_synced(staging / IO_JSON, io_json)
        write_synced(staging / MODEL_YAML, _model_yaml(config, class_path))
        fsync_path(staging)
        replace_directory(staging, context)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return context / IO_JSON
