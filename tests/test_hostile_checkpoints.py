"""Foreign checkpoints: mutated ``context/io.json`` documents and ``weights/.metadata`` pickles are
read in bounded time and memory, and every failure is a CheckpointError (exit 2, one JSON document
with ``--format json``), never a traceback, a RecursionError or a hang.

What could hang (reference bombs, long chains) also runs through the CLI in a subprocess whose
timeout is the bound.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from conftest import ROOT

from bioconf.checkpoint.context import (
    MAX_CONTEXT_DEPTH,
    MAX_CONTEXT_VALUES,
    read_checkpoint_config,
    write_checkpoint_context,
)
from bioconf.checkpoint.inspection import format_inspection, inspect_checkpoint
from bioconf.checkpoint.weights_index import TensorInfo, read_weights_metadata
from bioconf.errors import CheckpointError
from bioconf.schema import ModelConfig

CONFIG = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``python -m bioconf ARGS`` in a fresh process; a hang fails the test at ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "bioconf", *args], capture_output=True, cwd=ROOT, timeout=timeout
    )


def cli_json(*args: str, timeout: float = 30) -> tuple[int, Any]:
    """Exit code and the one JSON document ``--format json`` printed (orjson refuses trailing data)."""
    result = cli(*args, "--format", "json", timeout=timeout)
    assert not result.stderr.strip() or b"Traceback" not in result.stderr, result.stderr.decode()[-2000:]
    return result.returncode, orjson.loads(result.stdout)


# ---- weights/.metadata pickles, written opcode by opcode (no torch) ------------------------------

_DCP = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


class G:
    """The global ``module.name`` (STACK_GLOBAL)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class New:
    """``cls.__new__(cls)`` then BUILD with ``state``: how DCP's dataclasses pickle."""

    def __init__(self, cls: G, state: Any):
        self.cls, self.state = cls, state


class Call:
    """``function(*args)`` (REDUCE)."""

    def __init__(self, function: G, *args: Any):
        self.function, self.args = function, args


class _Writer(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]


def _save_global(writer: Any, obj: G) -> None:
    writer.save(obj.module)
    writer.save(obj.name)
    writer.write(pickle.STACK_GLOBAL)


def _save_new(writer: Any, obj: New) -> None:
    writer.save(obj.cls)
    writer.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
    writer.save(obj.state)
    writer.write(pickle.BUILD)


def _save_call(writer: Any, obj: Call) -> None:
    writer.save(obj.function)
    writer.save(tuple(obj.args))
    writer.write(pickle.REDUCE)


_Writer.dispatch.update({G: _save_global, New: _save_new, Call: _save_call})


def dumps(obj: Any) -> bytes:
    out = io.BytesIO()
    _Writer(out, protocol=4).dump(obj)
    return out.getvalue()


def size(*dims: Any) -> Call:
    return Call(G("torch", "Size"), tuple(dims))


def tensor(name: Any, shape: tuple[Any, ...], dtype: Any = None, length: Any = 16) -> tuple[Any, ...]:
    """(name, TensorStorageMetadata, MetadataIndex, _StorageInfo) of a one-chunk tensor."""
    properties = New(
        G(_DCP, "TensorProperties"),
        (
            dtype if dtype is not None else G("torch", "float32"),
            Call(G("torch.serialization", "_get_layout"), "torch.strided"),
            False,
            Call(G(_DCP, "_MEM_FORMAT_ENCODING"), 0),
            False,
        ),
    )
    origin = size(*[0] * len(shape))
    chunk = New(G(_DCP, "ChunkStorageMetadata"), {"offsets": origin, "sizes": size(*shape)})
    item = New(
        G(_DCP, "TensorStorageMetadata"), {"properties": properties, "size": size(*shape), "chunks": [chunk]}
    )
    index = New(G(_DCP, "MetadataIndex"), {"fqn": name, "offset": origin, "index": None})
    info = New(
        G(_FILESYSTEM, "_StorageInfo"), {"relative_path": "__0_0.distcp", "offset": 0, "length": length}
    )
    return name, item, index, info


def metadata(*tensors: tuple[Any, ...]) -> bytes:
    return dumps(
        New(
            G(_DCP, "Metadata"),
            {
                "state_dict_metadata": {name: item for name, item, _, _ in tensors},
                "storage_data": {index: info for _, _, index, info in tensors},
                "version": "1.0.0",
            },
        )
    )


def checkpoint(root: Path, pickled: bytes | None = None) -> Path:
    """A checkpoint folder: bioconf's context and (with ``pickled``) a weights/.metadata."""
    if not (root / "context").exists():
        write_checkpoint_context(ModelConfig(**CONFIG), root)
    if pickled is not None:
        (root / "weights").mkdir(exist_ok=True)
        (root / "weights" / ".metadata").write_bytes(pickled)
    return root


GOOD = metadata(tensor("embedding.word_embeddings.weight", (128, 64)), tensor("decoder.layers.0.mlp.w", (4,)))


def test_the_pickle_writer_writes_what_the_reader_reads(tmp_path: Path):
    weights = read_weights_metadata(checkpoint(tmp_path / "ckpt", GOOD))
    assert [(t.name, t.shape, t.dtype) for t in weights.tensors] == [
        ("decoder.layers.0.mlp.w", (4,), "float32"),
        ("embedding.word_embeddings.weight", (128, 64), "float32"),
    ]


@pytest.mark.parametrize(
    ("pickled", "message"),
    [
        (metadata(tensor("w", (2**70,))), "not a sequence of non-negative 64-bit ints"),
        (metadata(tensor("w", (2**40, 2**40))), "holds more than 2**63 bytes"),
        (metadata(tensor("w", (2,), length=2**70)), "not a 64-bit count"),
        (metadata(tensor("w", (2,), length=True)), "not a 64-bit count"),
        (metadata(*(tensor(f"w{i}", (2**60,)) for i in range(4))), "add up to more than 2**63 bytes"),
        (metadata((7, *tensor("w", (2,))[1:])), "a state dict key 7 that is not a string"),
        (metadata((("x",) * 100_000, *tensor("w", (2,))[1:])), "that is not a string"),
        (
            metadata(tensor("w", (2,), dtype=G("torch", "float128"))),
            "refused to load global 'torch.float128'",
        ),
        (metadata(tensor("w", (2,), dtype="float32")), "TensorProperties.dtype is a str"),
        (metadata(tensor("w", tuple(range(1, 100_000)))), "holds more than 2**63 bytes"),
    ],
    ids=[
        "2**70-size",
        "2**80-bytes",
        "2**70-length",
        "bool-length",
        "total",
        "int-name",
        "tuple-name",
        "unknown-dtype",
        "str-dtype",
        "100000-dims",
    ],
)
def test_hostile_metadata_is_an_error(tmp_path: Path, pickled: bytes, message: str):
    root = checkpoint(tmp_path / "ckpt", pickled)
    with pytest.raises(CheckpointError) as caught:
        read_weights_metadata(root)
    (issue,) = caught.value.issues
    assert message in issue.message and issue.source == str(root / "weights" / ".metadata")
    assert len(str(issue)) < 1000 and len(str(issue).splitlines()) == 1
    code, report = cli_json("inspect", str(root))
    assert code == 2 and report["errors"][0]["source"] == issue.source


def test_odd_tensor_names_render(tmp_path: Path):
    huge = "decoder." + "x" * 1_000_000
    digits = "layers." + "9" * 5000
    pickled = metadata(
        tensor(huge, (2,)), tensor(digits, (3,)), tensor("layers.²", (1,)), tensor("", (0, 2**62))
    )
    root = checkpoint(tmp_path / "ckpt", pickled)
    result = inspect_checkpoint(root)
    assert {t["name"] for t in result["weights"]["tensors"]} == {huge, digits, "layers.²", ""}
    text = format_inspection(result, "text")
    assert len(text) < 20_000
    as_json = cli("inspect", str(root), "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert {t["name"] for t in orjson.loads(as_json.stdout)["weights"]["tensors"]} == {
        huge,
        digits,
        "layers.²",
        "",
    }
    assert cli("inspect", str(root)).returncode == 0


def test_an_unknown_dtype_is_an_error_not_a_key_error():
    with pytest.raises(CheckpointError, match="unknown dtype 'float128'"):
        _ = TensorInfo("w", (2,), "float128", ()).nbytes


def test_a_deep_metadata_json_is_an_error(tmp_path: Path):
    root = checkpoint(tmp_path / "ckpt", GOOD)
    (root / "weights" / "metadata.json").write_text('{"a": ' + "[" * 600 + "]" * 600 + "}")
    with pytest.raises(CheckpointError, match="nested deeper than"):
        read_weights_metadata(root)
    code, report = cli_json("inspect", str(root))
    assert code == 2 and report["errors"][0]["field"] == "a"


# ---- context/io.json ---------------------------------------------------------------------------------


def mutate(
    root: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None], python_json: bool = False
) -> Path:
    """Rewrite ``root``'s io.json: ``edit(document, model_config_node)``. ``python_json``: written by
    Python's json, which writes any integer and NaN (orjson then refuses the file, and the reader
    falls back to json, as it does for fiddle's own NaN)."""
    path = root / "context" / "io.json"
    document = json.loads(path.read_text())
    node = next(n for n in document["objects"].values() if "<root>.model.config" in n.get("paths", ()))
    edit(document, node)
    try:
        path.write_bytes(json.dumps(document).encode() if python_json else orjson.dumps(document))
    except TypeError:  # deeper than orjson writes (255 levels)
        path.write_bytes(json.dumps(document).encode())
    return root


def argument(document: dict[str, Any], node: dict[str, Any], name: Any, value: Any) -> None:
    """Add the argument ``name=value`` (a node) to the model config."""
    objects = document["objects"]
    fields = dict(objects[node["metadata"]["key"]]["items"])
    names = objects[fields["Attr(name='argument_names')"]["key"]]["items"]
    node["items"].append([f"Attr(name={name!r})", value])
    names.append([f"Index(index={len(names)})", name])


def ref(key: str) -> dict[str, Any]:
    return {"type": "ref", "key": key}


def as_list(*items: Any) -> dict[str, Any]:
    return {
        "type": {"type": "pyref", "module": "builtins", "name": "list"},
        "items": [[f"Index(index={i})", item] for i, item in enumerate(items)],
        "metadata": None,
    }


def bomb(document: dict[str, Any], node: dict[str, Any]) -> None:
    """40 lists, each holding the one before twice: 2**40 leaves once expanded."""
    objects = document["objects"]
    objects["lol_0"] = as_list({"type": "leaf", "value": "lol"}, {"type": "leaf", "value": "lol"})
    for n in range(1, 41):
        objects[f"lol_{n}"] = as_list(ref(f"lol_{n - 1}"), ref(f"lol_{n - 1}"))
    argument(document, node, "bomb", ref("lol_40"))


def list_chain(document: dict[str, Any], node: dict[str, Any]) -> None:
    """5,000 lists, each holding the next (past the interpreter's 1,000 frames)."""
    objects = document["objects"]
    objects["chain_0"] = as_list({"type": "leaf", "value": 1})
    for n in range(1, 5_000):
        objects[f"chain_{n}"] = as_list(ref(f"chain_{n - 1}"))
    argument(document, node, "chain", ref("chain_4999"))


def ref_chain(document: dict[str, Any], node: dict[str, Any]) -> None:
    """100,000 objects, each a reference to the next (no container between)."""
    objects = document["objects"]
    objects["hop_0"] = {"type": "leaf", "value": 1}
    for n in range(1, 100_000):
        objects[f"hop_{n}"] = ref(f"hop_{n - 1}")
    argument(document, node, "hops", ref("hop_99999"))


def cycle(document: dict[str, Any], node: dict[str, Any]) -> None:
    document["objects"].update(a=as_list(ref("b")), b=as_list(ref("c")), c=as_list(ref("a")))
    argument(document, node, "cycle", ref("a"))


def self_cycle(document: dict[str, Any], node: dict[str, Any]) -> None:
    key = next(k for k, n in document["objects"].items() if n is node)
    argument(document, node, "me", ref(key))


def metadata_cycle(document: dict[str, Any], node: dict[str, Any]) -> None:
    objects = document["objects"]
    key = next(k for k, n in objects.items() if n is node)
    fields = objects[node["metadata"]["key"]]["items"]
    fields[0][1] = ref(key)  # fn_or_cls: the config itself


def deep_leaf(document: dict[str, Any], node: dict[str, Any]) -> None:
    argument(document, node, "deep", {"type": "leaf", "value": json.loads("[" * 500 + "]" * 500)})


def wide_leaf(document: dict[str, Any], node: dict[str, Any]) -> None:
    argument(document, node, "wide", {"type": "leaf", "value": list(range(MAX_CONTEXT_VALUES + 1))})


MALFORMED: dict[str, tuple[Callable[[dict[str, Any], dict[str, Any]], None], str]] = {
    "reference-bomb": (bomb, f"expands to more than {MAX_CONTEXT_VALUES} values"),
    "list-chain": (list_chain, f"nested deeper than {MAX_CONTEXT_DEPTH} levels"),
    "ref-chain": (ref_chain, f"nested deeper than {MAX_CONTEXT_DEPTH} levels"),
    "cycle": (cycle, "contains itself"),
    "self-cycle": (self_cycle, "contains itself"),
    "metadata-cycle": (metadata_cycle, "contains itself"),
    "deep-leaf": (deep_leaf, "nested deeper than"),
    "wide-leaf": (wide_leaf, "expands to more than"),
    "unhashable-dict-key": (
        lambda d, n: argument(
            d,
            n,
            "labels",
            {
                "type": {"type": "pyref", "module": "builtins", "name": "dict"},
                "items": [["Key(key=[1])", {"type": "leaf", "value": 1}]],
                "metadata": as_list({"type": "leaf", "value": [1]}),
            },
        ),
        "unhashable type",
    ),
    "unhashable-argument-name": (
        lambda d, n: argument(d, n, [1, 2], {"type": "leaf", "value": 1}),
        "unhashable",
    ),
    "items-not-a-list": (lambda d, n: n.update(items={"a": 1}), "not a list of [path, value] pairs"),
    "items-not-pairs": (lambda d, n: n["items"].append([1, 2, 3]), "not a list of [path, value] pairs"),
    "type-is-a-number": (lambda d, n: argument(d, n, "x", {"type": 5}), "a node of unknown type 5"),
    "ref-key-is-a-list": (lambda d, n: argument(d, n, "x", ref([1])), "a reference to a missing object [1]"),  # type: ignore[arg-type]
    "leaf-without-value": (lambda d, n: argument(d, n, "x", {"type": "leaf"}), "KeyError"),
    "pyref-without-module": (
        lambda d, n: argument(d, n, "x", {"type": "pyref", "module": 5}),
        "a pyref without",
    ),
    "metadata-missing": (lambda d, n: n.pop("metadata"), "is not a config of a named class"),
    "100000-deep-json": (lambda d, n: d.update(extra=json.loads("[" * 900 + "]" * 900)), "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_contexts_are_checkpoint_errors(tmp_path: Path, case: str):
    edit, message = MALFORMED[case]
    root = mutate(checkpoint(tmp_path / "ckpt"), edit)
    if case == "100000-deep-json":  # past orjson's 1024 levels: the json module's fallback recursed
        path = root / "context" / "io.json"
        text = path.read_text()
        path.write_text(text[:-1] + ', "deeper": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint_config(root)
    (issue,) = caught.value.issues
    assert message in issue.message and issue.source == str(root / "context" / "io.json")
    assert len(str(issue)) < 1000 and len(str(issue).splitlines()) == 1


@pytest.mark.parametrize("case", ["reference-bomb", "ref-chain", "cycle"])
def test_malformed_contexts_through_the_cli(tmp_path: Path, case: str):
    root = mutate(checkpoint(tmp_path / "ckpt", GOOD), MALFORMED[case][0])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "initial_ckpt_path": str(root)}))
    for command in (("inspect", str(root)), ("resolve", str(config))):
        code, report = cli_json(*command, timeout=20)
        assert code == 2 and report["exit_code"] == 2
        assert report["errors"][0]["type"] == "not_fiddle"


def test_huge_integers_and_odd_keys_in_unknown_fields_are_written_as_json(tmp_path: Path):
    """Python's json (the reader's fallback when orjson refuses NaN) reads integers of any size."""

    def edit(document: dict[str, Any], node: dict[str, Any]) -> None:
        argument(document, node, "big", {"type": "leaf", "value": 2**70})
        argument(document, node, "nan", {"type": "leaf", "value": float("nan")})
        argument(
            document,
            node,
            "labels",
            {
                "type": {"type": "pyref", "module": "builtins", "name": "dict"},
                "items": [[f"Key(key={i})", {"type": "leaf", "value": -(2**80)}] for i in range(4)],
                "metadata": as_list(*({"type": "leaf", "value": key} for key in (2**70, 1.5, None, True))),
            },
        )
        argument(document, node, 7, {"type": "leaf", "value": 2**64})

    root = mutate(checkpoint(tmp_path / "ckpt", GOOD), edit, python_json=True)
    unknown = read_checkpoint_config(root).unknown_fields
    assert unknown["big"] == str(2**70) and unknown["7"] == str(2**64)
    assert unknown["labels"] == {
        str(2**70): str(-(2**80)),
        "1.5": str(-(2**80)),
        "None": str(-(2**80)),
        "True": str(-(2**80)),
    }
    code, report = cli_json("inspect", str(root))
    assert code == 0 and report["config"]["unknown_fields"]["big"] == str(2**70)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "initial_ckpt_path": str(root)}))
    code, report = cli_json("resolve", str(config))
    assert code == 0 and report["unknown_checkpoint_fields"]["labels"][str(2**70)] == str(-(2**80))


def test_a_known_field_beyond_64_bits_is_a_checkpoint_error(tmp_path: Path):
    def edit(document: dict[str, Any], node: dict[str, Any]) -> None:
        argument(document, node, "nan", {"type": "leaf", "value": float("nan")})
        for name, value in node["items"]:
            if name == "Attr(name='num_layers')":
                value["value"] = 2**70

    root = mutate(checkpoint(tmp_path / "ckpt"), edit, python_json=True)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint_config(root)
    (issue,) = caught.value.issues
    assert (issue.type, issue.field) == ("number_out_of_range", "num_layers")
    code, report = cli_json("inspect", str(root))
    assert code == 2 and report["errors"][0]["input"] == str(2**70)


@pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None, reason="needs megatron-core (bioconf[runtime])"
)
def test_a_vocabulary_of_2_to_the_62_is_refused_before_the_build(tmp_path: Path):
    """It validates (it fits in 64 bits), and building allocated vocab_size x hidden_size: a crash."""
    root = tmp_path / "ckpt"
    write_checkpoint_context(ModelConfig(**{**CONFIG, "vocab_size": 2**62}), root)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}))
    code, report = cli_json("run", str(config), "--checkpoint", str(root), timeout=240)
    assert code == 1
    (error,) = report["errors"]
    assert error["type"] == "model_too_large" and error["field"] == "vocab_size"
    assert "vocab_size=4,611,686,018,427,387,904" in error["message"] and "PiB" in error["message"]
