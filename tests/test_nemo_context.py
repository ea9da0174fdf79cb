"""The NeMo 2 checkpoint form of a ModelConfig, against the real nemo-toolkit 2.x and fiddle.

The first half needs only bioconf's schema layer. The second half writes checkpoints with NeMo's
own ``TrainerContext.io_dump`` and reads bioconf-written ones with NeMo's ``load_context``; it
imports nemo once (about 10 s), in the module-scoped ``nemo_env`` fixture.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import subprocess
import sys
import textwrap
import types
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import nemo_dump
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bioconf.checkpoint import context as nemo_context
from bioconf.checkpoint.context import (
    RUNTIME_CONFIG_CLASSES,
    checkpoint_context_document,
    read_checkpoint_config,
    write_checkpoint_context,
)
from bioconf.errors import CheckpointError, CheckpointNotFoundError, ConfigReadError, OutputExistsError
from bioconf.schema.families import FAMILIES
from bioconf.schema.megatron_fields import NO_JSON_FORM
from bioconf.schema.model import ModelConfig
from bioconf.schema.names import ACTIVATIONS

HEAVY = ("torch", "fiddle", "nemo", "megatron", "lightning")
BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


def _config(**fields: Any) -> ModelConfig:
    return ModelConfig.model_validate({**BASE, **fields})


def _edit_io_json(ckpt: Path, edit) -> Path:
    path = ckpt / "context" / "io.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return path


def _config_node(document: dict[str, Any]) -> dict[str, Any]:
    return next(n for n in document["objects"].values() if "<root>.model.config" in n.get("paths", ()))


def _argument(document: dict[str, Any], name: str) -> Any:
    return dict(_config_node(document)["items"])[f"Attr(name={name!r})"]


def _heavy_modules_after(code: str, *args: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy top-level packages it left imported."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return sorted(set(json.loads(result.stdout.splitlines()[-1])) & set(HEAVY))


# ---- round trip and document shape (no nemo) ----------------------------------------------------


@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    data: dict[str, Any] = {
        "num_layers": draw(st.integers(1, 96)),
        "hidden_size": heads * draw(st.integers(1, 128)),
        "num_attention_heads": heads,
    }
    optional = {
        "params_dtype": st.sampled_from(["float32", "float16", "bfloat16", "bf16", "torch.float64"]),
        "activation_func": st.sampled_from(sorted(ACTIVATIONS)),
        "attention_backend": st.sampled_from(["flash", "fused", "unfused", "local", "auto"]),
        "window_size": st.none() | st.tuples(st.integers(-1, 8192), st.integers(-1, 8192)),
        "model_cls": st.sampled_from(
            ["gpt", "bert", "pkg.models:MyModel", "megatron.core.models.gpt.gpt_model:GPTModel"]
        ),
        "init_method_std": st.floats(min_value=0.0, allow_nan=False),  # inf included: JSON "Infinity"
        "vocab_size": st.none() | st.integers(1, 10**6),
        "seq_length": st.none() | st.integers(1, 10**6),
        "initial_ckpt_path": st.none() | st.text(max_size=20),
        "initial_ckpt_skip_keys_with_these_prefixes": st.lists(
            st.sampled_from(["head.", "encoder.layers.11", "lm_head"]), unique=True
        ),
        "override_parent_fields": st.lists(
            st.sampled_from(["bf16", "vocab_size", "seq_length", "num_layers", "params_dtype"]), unique=True
        ),
        "bf16": st.booleans(),
        "gated_linear_unit": st.booleans(),
        "position_embedding_type": st.sampled_from(["learned_absolute", "rope", "none"]),
        "rotary_base": st.integers(1, 10**6),
        "recompute_modules": st.none()
        | st.lists(st.sampled_from(["core_attn", "mlp"]), unique=True, min_size=1),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            data[name] = draw(strategy)
    try:
        return ModelConfig.model_validate(data)
    except ValidationError:
        reject()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(config=model_configs())
def test_round_trip(config: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> None:
    ckpt = tmp_path_factory.mktemp("ckpt")
    write_checkpoint_context(config, ckpt)
    read = read_checkpoint_config(ckpt)
    assert read.config == config
    assert read.config.model_fields_set == config.model_fields_set
    assert read.unknown_fields == {}
    assert read.class_is_bioconf
    kind = config.model_cls if config.model_cls in ("gpt", "bert") else "custom"
    assert read.class_path == ":".join(RUNTIME_CONFIG_CLASSES[kind])


def test_document_names_runtime_class_and_fiddle_forms() -> None:
    config = _config(
        params_dtype="bf16",
        bf16=True,
        activation_func="squared_relu",
        attention_backend="local",
        window_size=(16, 0),
        hierarchical_context_parallel_sizes=[1],
        model_cls="pkg.models:Outer.MyModel",
    )
    document = checkpoint_context_document(config)
    assert document["version"] == "0.0.1"
    assert document["root"] == {"type": "ref", "key": "trainer_context_1"}
    node = _config_node(document)
    metadata = document["objects"][node["metadata"]["key"]]
    assert dict(metadata["items"])["Attr(name='fn_or_cls')"] == {
        "type": "pyref",
        "module": "bioconf.runtime.config",
        "name": "CustomModelConfig",
    }

    def arg(name: str) -> Any:
        value = dict(_argument(document, name))
        value.pop("paths")
        return value

    assert arg("params_dtype") == {"type": "pyref", "module": "torch", "name": "bfloat16"}
    assert arg("activation_func") == {
        "type": "pyref",
        "module": "megatron.core.activations",
        "name": "squared_relu",
    }
    assert arg("attention_backend") == {
        "type": "pyref",
        "module": "megatron.core.transformer.enums",
        "name": "AttnBackend.local",
    }
    assert arg("model_cls") == {"type": "pyref", "module": "pkg.models", "name": "Outer.MyModel"}
    window = document["objects"][_argument(document, "window_size")["key"]]
    assert window["type"]["name"] == "tuple" and [v["value"] for _, v in window["items"]] == [16, 0]
    sizes = document["objects"][_argument(document, "hierarchical_context_parallel_sizes")["key"]]
    assert sizes["type"]["name"] == "list"
    assert _argument(document, "num_layers") == {
        "type": "leaf",
        "value": 2,
        "paths": ["<root>.model.config.num_layers"],
    }
    # Only explicit / non-default fields are written.
    assert "tensor_model_parallel_size" not in {p for p, _ in node["items"]}


@pytest.mark.parametrize(("model_cls", "kind"), [("gpt", "gpt"), ("bert", "bert"), ("a.b:C", "custom")])
def test_runtime_class_follows_model_cls(model_cls: str, kind: str) -> None:
    document = checkpoint_context_document(_config(model_cls=model_cls))
    metadata = document["objects"][_config_node(document)["metadata"]["key"]]
    fn = dict(metadata["items"])["Attr(name='fn_or_cls')"]
    assert (fn["module"], fn["name"]) == RUNTIME_CONFIG_CLASSES[kind]


def test_model_yaml_is_readable_schema_data(tmp_path: Path) -> None:
    config = _config(params_dtype="bf16", window_size=(4, 0), vocab_size=32)
    write_checkpoint_context(config, tmp_path)
    text = (tmp_path / "context" / "model.yaml").read_text()
    assert "bioconf.runtime.config:GPTModelConfig" in text
    assert yaml.safe_load(text) == {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_layers": 2,
        "params_dtype": "bfloat16",
        "vocab_size": 32,
        "window_size": [4, 0],
    }
    assert sorted(p.name for p in (tmp_path / "context").iterdir()) == ["io.json", "model.yaml"]


def test_existing_context_raises_unless_overwrite(tmp_path: Path) -> None:
    write_checkpoint_context(_config(num_layers=2), tmp_path)
    with pytest.raises(OutputExistsError) as raised:
        write_checkpoint_context(_config(num_layers=3), tmp_path)
    assert raised.value.issues[0].source == str(tmp_path / "context")
    assert read_checkpoint_config(tmp_path).config.num_layers == 2
    write_checkpoint_context(_config(num_layers=3), tmp_path, overwrite=True)
    assert read_checkpoint_config(tmp_path).config.num_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["context"]  # no staging or old folders left


def test_failed_write_leaves_old_context_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_checkpoint_context(_config(num_layers=2), tmp_path)
    calls = []

    def fail_on_yaml(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if path.name == "model.yaml":
            raise OSError("disk full")
        path.write_bytes(data)

    monkeypatch.setattr(nemo_context, "write_synced", fail_on_yaml)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint_context(_config(num_layers=5), tmp_path, overwrite=True)
    assert calls == ["io.json", "model.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["context"]
    assert read_checkpoint_config(tmp_path).config.num_layers == 2
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint_context(_config(), fresh)
    assert list(fresh.iterdir()) == []


def test_reader_accepts_context_folder_and_io_json(tmp_path: Path) -> None:
    config = _config(vocab_size=8)
    io_json = write_checkpoint_context(config, tmp_path)
    for where in (tmp_path, tmp_path / "context", io_json):
        read = read_checkpoint_config(where)
        assert read.config == config and read.path == io_json


def test_non_finite_floats_in_a_context_are_named(tmp_path: Path) -> None:
    """fiddle writes ``Infinity`` (json.dumps); JSON configs have no such value: an error naming the field."""
    write_checkpoint_context(_config(init_method_std=0.01), tmp_path)

    def infinite_std(document: dict[str, Any]) -> dict[str, Any]:
        _argument(document, "init_method_std")["value"] = math.inf
        return document

    io_json = _edit_io_json(tmp_path, infinite_std)
    assert b"Infinity" in io_json.read_bytes()
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint_config(tmp_path)
    assert excinfo.value.issues[0].field == "init_method_std"


def test_schema_module_imports_no_torch_fiddle_nemo(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from bioconf.schema.model import ModelConfig
        from bioconf.checkpoint.context import read_checkpoint_config, write_checkpoint_context
        config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, params_dtype="bf16",
                             activation_func="silu", attention_backend="local", window_size=(8, 0))
        write_checkpoint_context(config, sys.argv[1])
        assert read_checkpoint_config(sys.argv[1]).config == config
        """
    )
    assert _heavy_modules_after(code, str(tmp_path)) == []


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_context_says_what_was_expected(tmp_path: Path) -> None:
    for where, why in ((tmp_path / "nope", "no such folder"), (tmp_path, "no context/io.json")):
        with pytest.raises(CheckpointNotFoundError) as raised:
            read_checkpoint_config(where)
        issue = raised.value.issues[0]
        assert issue.type == "missing_context" and issue.source == str(where)
        assert str(where / "context" / "io.json") in str(raised.value) and why in str(raised.value)


def test_missing_model_config_node(tmp_path: Path) -> None:
    write_checkpoint_context(_config(), tmp_path)
    io_json = _edit_io_json(
        tmp_path,
        lambda doc: json.loads(json.dumps(doc).replace("<root>.model.config", "<root>.model.cfg")),
    )
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint_config(tmp_path)
    issue = raised.value.issues[0]
    assert issue.type == "missing_model_config" and issue.source == str(io_json)
    assert issue.field == "model.config" and "'<root>.model.config'" in str(raised.value)


def test_malformed_json(tmp_path: Path) -> None:
    io_json = tmp_path / "context" / "io.json"
    io_json.parent.mkdir()
    io_json.write_text('{"root": {"type": "ref",\n "key": oops}')
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint_config(tmp_path)
    issue = raised.value.issues[0]
    assert (issue.type, issue.source, issue.line) == ("json_invalid", str(io_json), 2)


@pytest.mark.parametrize("document", [[], {"objects": []}, {"root": {}, "objects": {"a": 1}}])
def test_json_that_is_not_a_fiddle_document(tmp_path: Path, document: Any) -> None:
    io_json = tmp_path / "io.json"
    io_json.write_bytes(orjson.dumps(document))
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint_config(io_json)
    assert raised.value.issues[0].source == str(io_json)


def test_broken_reference_names_the_file(tmp_path: Path) -> None:
    write_checkpoint_context(_config(window_size=(1, 2)), tmp_path)

    def drop_tuple(doc: dict[str, Any]) -> dict[str, Any]:
        del doc["objects"][_argument(doc, "window_size")["key"]]
        return doc

    io_json = _edit_io_json(tmp_path, drop_tuple)
    with pytest.raises(CheckpointError, match="missing object") as raised:
        read_checkpoint_config(tmp_path)
    assert raised.value.issues[0].source == str(io_json)


def test_invalid_value_names_file_field_and_value(tmp_path: Path) -> None:
    write_checkpoint_context(_config(params_dtype="bf16"), tmp_path)

    def corrupt(doc: dict[str, Any]) -> dict[str, Any]:
        _argument(doc, "num_layers")["value"] = 2.5
        _argument(doc, "params_dtype")["name"] = "int8"
        return doc

    io_json = _edit_io_json(tmp_path, corrupt)
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint_config(tmp_path)
    assert not isinstance(raised.value, ConfigReadError)
    by_field = {issue.field: issue for issue in raised.value.issues}
    assert by_field["num_layers"].input == 2.5 and by_field["num_layers"].source == str(io_json)
    assert by_field["params_dtype"].input == "torch.int8"
    assert f"{io_json}: params_dtype:" in str(raised.value)


def test_unknown_activation_is_an_error_not_dropped(tmp_path: Path) -> None:
    write_checkpoint_context(_config(activation_func="silu"), tmp_path)

    def custom(doc: dict[str, Any]) -> dict[str, Any]:
        _argument(doc, "activation_func").update(module="my_pkg.acts", name="swish2")
        return doc

    _edit_io_json(tmp_path, custom)
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint_config(tmp_path)
    assert raised.value.issues[0].field == "activation_func"
    assert raised.value.issues[0].input == "my_pkg.acts.swish2"


# ---- against nemo-toolkit ----------------------------------------------------------------------

_TEMP_MODULE = '''
from dataclasses import dataclass, field
from typing import Optional, Type

import lightning.pytorch as pl
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from nemo.lightning import io


class Head:
    """A class-valued setting ModelConfig does not know."""


@dataclass
class TempBioConfig(TransformerConfig, io.IOMixin):
    """Like NeMo/BioNeMo model configs: an IOMixin records only the explicit init arguments."""

    model_cls: Type = GPTModel
    vocab_size: Optional[int] = None
    seq_length: int = 1024
    head_cls: Type = Head
    pair: tuple = (0, 0)
    labels: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class PlainConfig(TransformerConfig):
    """A plain dataclass: NeMo records every init field (values after __post_init__)."""

    model_cls: Type = GPTModel


class TinyModel(pl.LightningModule, io.IOMixin):
    def __init__(self, config):
        super().__init__()
        self.config = config
'''


@pytest.fixture(scope="module")
def nemo_env(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """nemo imported once; checkpoints NeMo wrote whose config class is importable no more."""
    io = pytest.importorskip("nemo.lightning.io")
    import nemo.lightning as nl
    import torch
    from fiddle._src.experimental import serialization
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.enums import AttnBackend

    root = tmp_path_factory.mktemp("nemo")
    module_dir = root / "modules"
    module_dir.mkdir()
    name = f"bioconf_test_cfg_{uuid.uuid4().hex}"
    (module_dir / f"{name}.py").write_text(_TEMP_MODULE)
    sys.path.insert(0, str(module_dir))
    try:
        module = importlib.import_module(name)
        trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        iomixin = module.TempBioConfig(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            params_dtype=torch.bfloat16,
            bf16=True,
            activation_func=torch.nn.functional.silu,
            window_size=(16, 0),
            attention_backend=AttnBackend.local,
            hierarchical_context_parallel_sizes=[1],
            gated_linear_unit=True,
            model_cls=BertModel,
            vocab_size=128,
            head_cls=module.Head,
            pair=(3, "x"),
            labels={"a": 1, "b": [1, 2]},
            note="hello",
        )
        nemo_dump(io, trainer, module.TinyModel(iomixin), root / "iomixin" / "context")
        plain = module.PlainConfig(
            num_layers=2, hidden_size=64, num_attention_heads=4, params_dtype=torch.float16, fp16=True
        )
        nemo_dump(io, trainer, module.TinyModel(plain), root / "plain" / "context")
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop(name, None)
        (module_dir / f"{name}.py").unlink()
    importlib.invalidate_caches()
    return types.SimpleNamespace(
        io=io, torch=torch, serialization=serialization, root=root, module=name, nl=nl, trainer=trainer
    )


def test_reads_context_nemo_wrote_without_importing_its_classes(nemo_env: types.SimpleNamespace) -> None:
    read = read_checkpoint_config(nemo_env.root / "iomixin")
    assert read.path == nemo_env.root / "iomixin" / "context" / "io.json"
    assert read.class_path == f"{nemo_env.module}:TempBioConfig"
    assert not read.class_is_bioconf
    config = read.config
    assert config.model_fields_set == {
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "params_dtype",
        "bf16",
        "activation_func",
        "window_size",
        "attention_backend",
        "hierarchical_context_parallel_sizes",
        "gated_linear_unit",
        "model_cls",
        "vocab_size",
    }
    assert (config.params_dtype, config.bf16, config.activation_func) == ("bfloat16", True, "silu")
    assert (config.window_size, config.attention_backend, config.model_cls) == ((16, 0), "local", "bert")
    assert (config.hierarchical_context_parallel_sizes, config.vocab_size) == ([1], 128)
    assert read.unknown_fields == {
        "head_cls": f"{nemo_env.module}:Head",
        "pair": [3, "x"],
        "labels": {"a": 1, "b": [1, 2]},
        "note": "hello",
    }
    assert nemo_env.module not in sys.modules
    code = textwrap.dedent(
        f"""
        import sys
        from bioconf.checkpoint.context import read_checkpoint_config
        read = read_checkpoint_config(sys.argv[1])
        assert read.config.params_dtype == "bfloat16", read
        assert {nemo_env.module!r} not in sys.modules
        """
    )
    assert _heavy_modules_after(code, str(nemo_env.root / "iomixin")) == []


def test_reads_plain_dataclass_context_with_every_field(nemo_env: types.SimpleNamespace) -> None:
    """A config that is not an IOMixin is recorded whole, values after ``__post_init__``."""
    read = read_checkpoint_config(nemo_env.root / "plain")
    config = read.config
    assert read.class_path == f"{nemo_env.module}:PlainConfig"
    assert (config.params_dtype, config.fp16, config.model_cls) == ("float16", True, "gpt")
    assert config.ffn_hidden_size == 256 and config.kv_channels == 16  # derived by megatron, recorded
    assert set(NO_JSON_FORM) <= read.unknown_fields.keys()
    assert read.unknown_fields["init_method"] == {
        "_target_": "torch.nn.init:normal_",
        "_partial_": True,
        "mean": 0.0,
        "std": 0.02,
    }
    from megatron.core.transformer.transformer_config import TransformerConfig

    recorded = {f.name for f in dataclasses.fields(TransformerConfig)} | {"model_cls"}
    assert config.model_fields_set == recorded & set(ModelConfig.model_fields)


def _runtime_kwargs(torch: Any, model_cls: type) -> dict[str, Any]:
    from megatron.core.transformer.enums import AttnBackend

    return {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "params_dtype": torch.bfloat16,
        "bf16": True,
        "activation_func": torch.nn.functional.silu,
        "attention_backend": AttnBackend.local,
        "window_size": (16, 0),
        "hierarchical_context_parallel_sizes": [1],
        "vocab_size": 128,
        "seq_length": 256,
        "initial_ckpt_skip_keys_with_these_prefixes": ["head."],
        "override_parent_fields": ["bf16", "vocab_size"],
        "model_cls": model_cls,
    }


@pytest.mark.parametrize(
    ("model_cls", "kind"),
    [("gpt", "gpt"), ("bert", "bert"), ("megatron.core.models.gpt.gpt_model:GPTModel", "custom")],
)
def test_load_context_builds_the_runtime_class(
    nemo_env: types.SimpleNamespace, tmp_path: Path, model_cls: str, kind: str
) -> None:
    runtime = pytest.importorskip("bioconf.runtime.config")
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = _config(
        params_dtype="bf16",
        bf16=True,
        activation_func="silu",
        attention_backend="local",
        window_size=(16, 0),
        hierarchical_context_parallel_sizes=[1],
        vocab_size=128,
        seq_length=256,
        initial_ckpt_skip_keys_with_these_prefixes=["head."],
        override_parent_fields=["bf16", "vocab_size"],
        model_cls=model_cls,
    )
    write_checkpoint_context(config, tmp_path)
    built = nemo_env.io.load_context(tmp_path / "context", subpath="model.config")
    cls = getattr(runtime, RUNTIME_CONFIG_CLASSES[kind][1])
    assert type(built) is cls
    kwargs = _runtime_kwargs(nemo_env.torch, BertModel if kind == "bert" else GPTModel)
    direct = cls(**kwargs)
    for field in dataclasses.fields(direct):
        if field.name not in NO_JSON_FORM:
            assert getattr(built, field.name) == getattr(direct, field.name), field.name
    # The runtime class records the same explicit arguments, so NeMo re-saves the same context.
    assert set(built.__io__.__arguments__) == set(kwargs)
    # The context is fiddle's own serialization of what load_context reads, byte for byte.
    unbuilt = nemo_env.io.load_context(tmp_path / "context", build=False)
    assert (
        nemo_env.serialization.dump_json(unbuilt).encode() == (tmp_path / "context" / "io.json").read_bytes()
    )
    full = nemo_env.io.load_context(tmp_path / "context")
    assert type(full.model.config) is cls


def test_runtime_class_defaults_are_model_config_defaults() -> None:
    """What ``class_is_bioconf`` promises: a field a bioconf context leaves out has ModelConfig's
    default in the runtime class too (checked on the dataclass defaults, before __post_init__)."""
    runtime = pytest.importorskip("bioconf.runtime.config")
    import enum

    from bioconf.schema.names import canonical_activation

    def schema_form(value: Any) -> Any:
        if type(value).__name__ == "dtype":
            return str(value).removeprefix("torch.")
        if isinstance(value, enum.Enum):
            return value.name
        if callable(value) and not isinstance(value, type):
            return canonical_activation(value)
        return value

    for kind, (_, class_name) in RUNTIME_CONFIG_CLASSES.items():
        cls = getattr(runtime, class_name)
        for field in dataclasses.fields(cls):
            if field.name not in ModelConfig.model_fields or field.name == "model_cls":
                continue
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            expected = ModelConfig.model_fields[field.name].get_default(call_default_factory=True)
            if kind in FAMILIES:  # a family's class starts from the family's defaults
                expected = FAMILIES[kind].defaults.get(field.name, expected)
            assert schema_form(default) == expected, (kind, field.name)
