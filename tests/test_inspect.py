"""``bioconf inspect``: a checkpoint's config and weight index, read without torch and without
unpickling anything the checkpoint names."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bioconf.checkpoint.context import write_checkpoint_context
from bioconf.checkpoint.inspection import format_inspection, inspect_checkpoint
from bioconf.checkpoint.weights_index import ALLOWED_GLOBALS, DTYPE_ITEMSIZE, read_weights_metadata
from bioconf.errors import CheckpointError, CheckpointNotFoundError
from bioconf.schema import ModelConfig

# Writes weights/ with torch DCP itself (FileSystemWriter, two writer threads so two shard files) in a
# one-process gloo group: a tensor split into two chunks (a torch ShardedTensor, which is what megatron
# hands DCP), several dtypes, a scalar, and non-tensor items (bytes, and a nested dict that DCP
# flattens and pickles).
WRITER = r"""
import io, sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

out, init_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
halves = [Shard(full[i : i + 3].clone(), ShardMetadata([i, 0], [3, 4], "rank:0/cpu")) for i in (0, 3)]
state = {
    "embedding.word_embeddings.weight": torch.randn(128, 64, dtype=torch.bfloat16),
    "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(256, 64),
    "decoder.layers.2.mlp.linear_fc1.weight": torch.randn(256, 64),
    "decoder.layers.10.mlp.linear_fc1.weight": torch.randn(256, 64),
    "decoder.final_layernorm.weight": torch.ones(64, dtype=torch.float16),
    "output_layer.weight": init_from_local_shards(halves, [6, 4]),
    "position_ids": torch.arange(32, dtype=torch.int64),
    "mask": torch.ones(3, dtype=torch.bool),
    "step": torch.tensor(7.0, dtype=torch.float64),
    "decoder.layers.0.self_attention._extra_state": io.BytesIO(b"opaque"),
    "rng": {"seed": 1234},
}
dcp.save(state, storage_writer=dcp.FileSystemWriter(out, thread_count=2))
dist.destroy_process_group()
"""

# megatron's own torch_dist save (dist_checkpointing.save with TorchDistSaveShardedStrategy) in a
# one-process gloo group: a layer-stacked tensor, a bf16 one, a ShardedObject. megatron's saver adds
# every rank's SavePlan to the metadata (Metadata.all_local_plans). It calls torch.cuda.synchronize
# and broadcasts a failure flag on torch.cuda.current_device(): on CPU those two are stubbed.
MEGATRON_WRITER = r"""
import os, sys
import torch
import torch.distributed as dist
torch.cuda.synchronize = lambda *args, **kwargs: None
torch.cuda.current_device = lambda: "cpu"
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

out, init_file = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
qkv, embedding = torch.randn(2, 12, 4), torch.randn(16, 4, dtype=torch.bfloat16)
state = {
    "qkv": ShardedTensor.from_rank_offsets("decoder.layers.linear_qkv.weight", qkv, (0, 0, 1), replica_id=0),
    "embedding": ShardedTensor.from_rank_offsets("embedding.word_embeddings.weight", embedding, replica_id=0),
    "extra": ShardedObject("decoder.layers.self_attention._extra_state", {"a": 1}, (1,), (0,), replica_id=0),
}
os.makedirs(out, exist_ok=True)
dist_checkpointing.save(state, out, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1))
dist.destroy_process_group()
"""

BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
CONFIG = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NeMo 2 checkpoint: context/ written by bioconf, weights/ by torch DCP."""
    root = tmp_path_factory.mktemp("inspect") / "ckpt"
    weights = root / "weights"
    subprocess.run(
        [sys.executable, "-c", WRITER, str(weights), str(root.parent / "pg-init")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (weights / "metadata.json").write_text(json.dumps(BACKEND))
    write_checkpoint_context(ModelConfig(**CONFIG, hidden_dropout=0.2), root)
    return root


@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NeMo 2 checkpoint whose weights/ megatron-core wrote."""
    root = tmp_path_factory.mktemp("inspect-megatron") / "ckpt"
    command = [sys.executable, "-c", MEGATRON_WRITER, str(root / "weights"), str(root.parent / "pg-init")]
    written = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert written.returncode == 0, written.stdout.decode()[-3000:]
    write_checkpoint_context(ModelConfig(**CONFIG), root)
    return root


BIOCONF_WRITER = """
import sys
from bioconf.runtime.initialize import init_checkpoint
from bioconf.schema import ModelConfig
init_checkpoint(ModelConfig.model_validate_json(sys.argv[2]), sys.argv[1])
"""


@pytest.fixture(scope="module")
def bioconf_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NeMo 2 checkpoint written by bioconf's runtime (a freshly built GPT model)."""
    root = tmp_path_factory.mktemp("inspect-bioconf") / "ckpt"
    command = [sys.executable, "-c", BIOCONF_WRITER, str(root), json.dumps(CONFIG)]
    written = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert written.returncode == 0, written.stdout.decode()[-3000:]
    return root


# ---- the reader against torch's own -------------------------------------------------------------


@pytest.mark.parametrize("writer", ["ckpt", "megatron_ckpt", "bioconf_ckpt"])
def test_reader_agrees_with_torch(writer: str, request: pytest.FixtureRequest):
    """Keys, shapes, dtypes, chunks and storage ranges equal what torch's FileSystemReader reads."""
    ckpt = request.getfixturevalue(writer)
    import torch  # noqa: F401  (torch is for the comparison only)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    expected = FileSystemReader(str(ckpt / "weights")).read_metadata()
    storage = {
        (k.fqn, None if k.offset is None else tuple(k.offset)): v for k, v in expected.storage_data.items()
    }
    ours = read_weights_metadata(ckpt)

    tensors = {k: v for k, v in expected.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    assert {t.name for t in ours.tensors} == set(tensors)
    assert {o.name for o in ours.objects} == set(expected.state_dict_metadata) - set(tensors)
    for tensor in ours.tensors:
        theirs = tensors[tensor.name]
        assert tensor.shape == tuple(theirs.size)
        assert f"torch.{tensor.dtype}" == str(theirs.properties.dtype)
        assert tensor.nbytes == theirs.size.numel() * theirs.properties.dtype.itemsize
        assert [(c.offsets, c.sizes) for c in tensor.chunks] == [
            (tuple(c.offsets), tuple(c.sizes)) for c in theirs.chunks
        ]
        for chunk in tensor.chunks:
            info = storage[tensor.name, chunk.offsets]
            assert (chunk.file, chunk.offset, chunk.length) == (info.relative_path, info.offset, info.length)
    for item in ours.objects:
        info = storage[item.name, None]
        assert (item.file, item.offset, item.length) == (info.relative_path, info.offset, info.length)
    assert ours.version == expected.version


def test_reader_result(ckpt: Path):
    weights = read_weights_metadata(ckpt)
    assert weights.path == ckpt / "weights"
    assert weights.backend == BACKEND
    by_name = {t.name: t for t in weights.tensors}
    assert by_name["embedding.word_embeddings.weight"].dtype == "bfloat16"
    assert by_name["embedding.word_embeddings.weight"].nbytes == 128 * 64 * 2
    assert by_name["step"].shape == () and by_name["step"].nbytes == 8
    split = by_name["output_layer.weight"]
    assert (split.shape, split.dtype) == ((6, 4), "float32")
    assert [(c.offsets, c.sizes) for c in split.chunks] == [((0, 0), (3, 4)), ((3, 0), (3, 4))]
    assert [o.name for o in weights.objects] == ["decoder.layers.0.self_attention._extra_state", "rng.seed"]
    layers = [t.name for t in weights.tensors if t.name.startswith("decoder.layers")]
    assert layers == [f"decoder.layers.{i}.mlp.linear_fc1.weight" for i in (0, 2, 10)]  # natural order
    assert set(weights.files()) == {"__0_0.distcp", "__0_1.distcp"}
    stored = sum((ckpt / "weights" / name).stat().st_size for name in weights.files())
    assert sum(weights.files().values()) == stored  # every byte of the shard files is accounted for


def test_megatron_checkpoint(megatron_ckpt: Path):
    """The tensors and the ShardedObject of a megatron save, past its SavePlans in the metadata."""
    weights = read_weights_metadata(megatron_ckpt)
    assert weights.backend == BACKEND
    assert [(t.name, t.shape, t.dtype, t.nbytes) for t in weights.tensors] == [
        ("decoder.layers.linear_qkv.weight", (2, 12, 4), "float32", 384),
        ("embedding.word_embeddings.weight", (16, 4), "bfloat16", 128),
    ]
    assert [o.name for o in weights.objects] == ["decoder.layers.self_attention._extra_state/shard_0_1"]


def test_bioconf_checkpoint(bioconf_ckpt: Path):
    """A model's checkpoint: NeMo's ``module.`` keys, stacked layers stored one chunk per layer."""
    result = inspect_checkpoint(bioconf_ckpt)
    assert result["config"]["fields"] == CONFIG
    tensors = {t["name"]: t for t in result["weights"]["tensors"]}
    assert all(name.startswith("module.") for name in tensors)
    assert tensors["module.embedding.word_embeddings.weight"]["shape"] == [128, 64]
    qkv = tensors["module.decoder.layers.self_attention.linear_qkv.weight"]
    assert (qkv["shape"], qkv["dtype"]) == ([2, 3 * 64, 64], "float32")
    assert [c["offsets"] for c in qkv["chunks"]] == [[0, 0, 0], [1, 0, 0]]
    assert "module.output_layer.weight" in format_inspection(result)


def test_weights_folder_itself_is_accepted(ckpt: Path):
    assert read_weights_metadata(ckpt / "weights") == read_weights_metadata(ckpt)


def test_dtype_table_matches_torch():
    import torch

    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    assert {dtype.__reduce__(): dtype.itemsize for dtype in dtypes} == DTYPE_ITEMSIZE


# ---- inspect_checkpoint and its output ----------------------------------------------------------


def test_inspect_result(ckpt: Path):
    result = inspect_checkpoint(ckpt)
    assert result["checkpoint"] == str(ckpt)
    config = result["config"]
    assert config["class"] == "bioconf.runtime.config:GPTModelConfig"
    assert config["class_is_bioconf"] is True
    assert config["path"] == str(ckpt / "context" / "io.json")
    assert config["fields"] == {**CONFIG, "hidden_dropout": 0.2}
    assert config["unknown_fields"] == {}
    assert result["weights"] == read_weights_metadata(ckpt).to_dict()


def test_json_output(ckpt: Path):
    result = inspect_checkpoint(ckpt)
    document = json.loads(format_inspection(result, "json"))
    assert document == result
    split = next(t for t in document["weights"]["tensors"] if t["name"] == "output_layer.weight")
    assert split["shape"] == [6, 4] and split["bytes"] == 96 and len(split["chunks"]) == 2
    assert document["weights"]["total_bytes"] == sum(t["bytes"] for t in document["weights"]["tensors"])


def test_text_output(ckpt: Path):
    text = format_inspection(inspect_checkpoint(ckpt))
    lines = text.splitlines()
    assert lines[0] == f"checkpoint: {ckpt}"
    assert lines[1] == f"config: bioconf.runtime.config:GPTModelConfig ({ckpt / 'context' / 'io.json'})"
    assert "  hidden_dropout       0.2" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    table = lines[header : header + 11]
    # aligned: every row has its dtype and its right-aligned bytes at the same columns
    dtype_at, bytes_end = table[0].index("dtype"), table[0].index("bytes") + len("bytes")
    row = next(line for line in table if line.startswith("embedding.word_embeddings.weight"))
    assert row[dtype_at:].startswith("bfloat16")
    assert row[:bytes_end].endswith("16,384")
    assert "[128, 64]" in row
    total = table[-1]
    assert total.startswith("total (9 tensors)")
    assert total[:bytes_end].endswith(f"{read_weights_metadata(ckpt).total_bytes:,}")
    assert "decoder.layers.0.self_attention._extra_state" in text and "rng.seed" in text


def test_format_rejects_unknown_format(ckpt: Path):
    with pytest.raises(ValueError, match="yaml"):
        format_inspection(inspect_checkpoint(ckpt), "yaml")  # type: ignore[arg-type]


NO_TORCH = """
import json, sys
from bioconf.checkpoint.inspection import format_inspection, inspect_checkpoint
result = inspect_checkpoint(sys.argv[1])
format_inspection(result, "text")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "megatron", "fiddle", "nemo", "numpy"})
print(json.dumps({"heavy": heavy, "result": result}))
"""


def test_inspect_imports_no_torch(ckpt: Path):
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(ckpt)], capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(run.stdout)
    assert report["heavy"] == []
    assert report["result"] == inspect_checkpoint(ckpt)


# ---- errors -------------------------------------------------------------------------------------


def _context_only(root: Path) -> Path:
    """A checkpoint folder with a context and no weights."""
    write_checkpoint_context(ModelConfig(**CONFIG), root)
    return root


def test_missing_weights_folder(tmp_path: Path):
    root = _context_only(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as caught:
        inspect_checkpoint(root)
    message = str(caught.value)
    assert str(root / "weights" / ".metadata") in message and "no weights/ folder" in message


def test_missing_metadata_names_the_backend(tmp_path: Path):
    root = _context_only(tmp_path / "ckpt")
    (root / "weights").mkdir()
    (root / "weights" / "metadata.json").write_text(json.dumps({**BACKEND, "sharded_backend": "zarr"}))
    with pytest.raises(CheckpointError, match=r"no \.metadata in weights/; .*sharded_backend 'zarr'"):
        inspect_checkpoint(root)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such folder"):
        read_weights_metadata(tmp_path / "nowhere")


def test_any_part_of_a_checkpoint_names_it_and_a_lone_weights_folder_has_no_context(
    tmp_path: Path, ckpt: Path
):
    whole = inspect_checkpoint(ckpt)
    for part in (ckpt / "weights", ckpt / "context", ckpt / "context" / "io.json"):
        assert inspect_checkpoint(part) == whole
    lone = tmp_path / "copy" / "weights"
    shutil.copytree(ckpt / "weights", lone)
    with pytest.raises(CheckpointNotFoundError, match=r"context/io\.json"):
        inspect_checkpoint(lone)


def _weights_with(tmp_path: Path, metadata: bytes) -> Path:
    weights = tmp_path / "weights"
    weights.mkdir(parents=True)
    (weights / ".metadata").write_bytes(metadata)
    return weights


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not a pickle", "not a readable pickle"),
        (
            pickle.dumps({"state_dict_metadata": {}}),
            "the pickle holds no torch.distributed.checkpoint Metadata",
        ),
        (
            b"\x80\x04\x8c%torch.distributed.checkpoint.metadata\x8c\x08Metadata\x93)\x81}b.",
            "Metadata.storage_data is missing",
        ),
        (
            b"\x80\x04\x8c\x05torch\x8c\x04Size\x93J\xff\xff\xff\xff\x85\x85R.",
            "not a sequence of non-negative",
        ),
    ],
)
def test_unreadable_metadata(tmp_path: Path, payload: bytes, message: str):
    weights = _weights_with(tmp_path, payload)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_weights_metadata(weights)
    assert caught.value.issues[0].source == str(weights / ".metadata")


def test_bad_backend_json(tmp_path: Path, ckpt: Path):
    weights = _weights_with(tmp_path, (ckpt / "weights" / ".metadata").read_bytes())
    (weights / "metadata.json").write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON") as caught:
        read_weights_metadata(weights)
    assert caught.value.issues[0].source == str(weights / "metadata.json")


# ---- hostile pickles ----------------------------------------------------------------------------


def _stack_global(module: str, name: str) -> bytes:
    """Protocol 4 opcodes: push ``module.name`` (STACK_GLOBAL)."""
    return b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name)) + b"\x93"


def _call(function: bytes, argument: str) -> bytes:
    """``function(argument)``: a unicode argument, TUPLE1, REDUCE."""
    return function + b"\x8c" + bytes([len(argument)]) + argument.encode() + b"\x85R"


def _hostile(marker: Path) -> list[tuple[bytes, str]]:
    """Pickles that would create ``marker`` (or run code) if their globals were resolved."""
    touch = f"touch {marker}"
    return [
        (b"\x80\x04" + _call(_stack_global("os", "system"), touch) + b".", "os.system"),
        (b"\x80\x04" + _call(_stack_global("posix", "system"), touch) + b".", "posix.system"),
        (
            b"\x80\x04" + _call(_stack_global("builtins", "eval"), f"open({str(marker)!r}, 'w')") + b".",
            "builtins.eval",
        ),
        (
            b"\x80\x04" + _call(_stack_global("builtins", "exec"), f"open({str(marker)!r}, 'w')") + b".",
            "builtins.exec",
        ),
        (b"\x80\x04" + _call(_stack_global("subprocess", "getoutput"), touch) + b".", "subprocess.getoutput"),
        (f"cos\nsystem\n(S'{touch}'\ntR.".encode(), "os.system"),  # protocol 0 GLOBAL
        (f"(S'{touch}'\nios\nsystem\n.".encode(), "os.system"),  # protocol 0 INST
        # a legitimate DCP prefix, then the payload inside the Metadata's state
        (
            b"\x80\x04" + _stack_global("torch.distributed.checkpoint.metadata", "Metadata") + b")\x81"
            b"}\x8c\x13state_dict_metadata" + _call(_stack_global("os", "system"), touch) + b"sb.",
            "os.system",
        ),
        # torch's own loaders and a name next to an allowed one are refused too
        (b"\x80\x04" + _call(_stack_global("torch", "load"), str(marker)) + b".", "torch.load"),
        (
            b"\x80\x04" + _stack_global("torch.distributed.checkpoint.metadata", "torch") + b".",
            "metadata.torch",
        ),
        (b"\x80\x04" + _call(_stack_global("this", "s"), "x") + b".", "this.s"),
    ]


def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    for i, (payload, refused) in enumerate(_hostile(marker)):
        weights = _weights_with(tmp_path / str(i), payload)
        with pytest.raises(CheckpointError) as caught:
            read_weights_metadata(weights)
        issue = caught.value.issues[0]
        assert issue.type == "unsafe_pickle"
        assert issue.source == str(weights / ".metadata")
        assert refused in str(issue.input) and refused in str(caught.value)
        assert "nothing was imported or run" in issue.message
    assert not marker.exists()
    assert "this" not in sys.modules  # a refused module is never imported


def test_hostile_pickles_really_are_hostile(tmp_path: Path):
    """The payloads do what they claim under plain pickle (so the refusal test means something)."""
    marker = tmp_path / "pwned"
    pickle.loads(_hostile(marker)[0][0])
    assert marker.exists()


def test_stand_ins_cannot_be_altered(tmp_path: Path, ckpt: Path):
    """BUILD with a slot state on an allowed class would set class attributes; it is refused, and a
    later read is unaffected."""
    size = _stack_global("torch", "Size")
    payload = b"\x80\x04" + size + b"N}\x8c\x07__new__" + size + b"s\x86b."
    weights = _weights_with(tmp_path, payload)
    stand_in = ALLOWED_GLOBALS["torch", "Size"]
    new = stand_in.__new__
    with pytest.raises(CheckpointError, match="read-only"):
        read_weights_metadata(weights)
    assert stand_in.__new__ is new
    assert read_weights_metadata(ckpt).tensors[0].shape  # torch.Size still reads


def test_cli_inspect(ckpt: Path, tmp_path: Path):
    from conftest import run_cli

    text = run_cli("inspect", str(ckpt))
    assert text.returncode == 0, text.stderr
    assert text.stdout.decode() == format_inspection(inspect_checkpoint(ckpt), "text")
    as_json = run_cli("inspect", str(ckpt), "--format", "json")
    assert json.loads(as_json.stdout) == json.loads(format_inspection(inspect_checkpoint(ckpt), "json"))
    missing = run_cli("inspect", str(tmp_path / "nope"), "--format", "json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["errors"][0]["type"]
