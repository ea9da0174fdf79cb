"""Corrupted weight folders: every one is a CheckpointError naming the file (and, for a shard, a key
it holds), or a correct load where the corruption is harmless; never a traceback, never a silently
wrong load. Problems found before reading leave the model's weights as they were.

One small checkpoint is built per module; each corruption is applied to a fresh copy of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import torch
from conftest import ROOT, run_cli
from dist_scripts.layouts import build, gathered, same

from bioconf.errors import CheckpointError
from bioconf.runtime.initialize import init_checkpoint
from bioconf.runtime.weights import direct, load_weights_sharded_inplace_nemo2_to_mcore, reader
from bioconf.schema import ModelConfig

GPT = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
KEY = "module.output_layer.weight"
"""A weight every load reads; the shard holding it is the one corrupted."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return init_checkpoint(GPT, tmp_path_factory.mktemp("ckpt") / "gpt", seed=7)


@pytest.fixture(scope="module")
def reference(ckpt) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as a model loaded from the intact checkpoint holds them."""
    from bioconf.runtime.parallel import ensure_parallel_state

    with ensure_parallel_state():
        model = build(GPT, seed=1)
        load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [], quiet=True)
        return gathered(model)


# ---- corruptions: each changes the weights folder of a fresh copy --------------------------------


def _index(weights: Path):
    """The weight index as torch wrote it (a test reads its own file with plain pickle)."""
    return pickle.loads((weights / ".metadata").read_bytes())


def _item(weights: Path, key: str = KEY):
    """(relative path, offset, length) of the first stored item of ``key``."""
    for index, info in _index(weights).storage_data.items():
        if index.fqn == key:
            return info.relative_path, info.offset, info.length
    raise KeyError(key)


def _keys_in(weights: Path, relative: str) -> set[str]:
    return {i.fqn for i, info in _index(weights).storage_data.items() if info.relative_path == relative}


def _shard(weights: Path) -> Path:
    return weights / _item(weights)[0]


def _rewrite_index(weights: Path, change: Callable[[object], None]) -> None:
    metadata = _index(weights)
    change(metadata)
    (weights / ".metadata").write_bytes(pickle.dumps(metadata))


def _relocate(relative: str) -> Callable[[Path], None]:
    """Point every stored item of the shard holding KEY at ``relative``."""

    def corrupt(weights: Path) -> None:
        shard = _item(weights)[0]

        def change(metadata) -> None:
            for index, info in metadata.storage_data.items():
                if info.relative_path == shard:
                    metadata.storage_data[index] = dataclasses.replace(info, relative_path=relative)

        _rewrite_index(weights, change)

    return corrupt


def truncate_shard(weights: Path) -> None:
    shard = _shard(weights)
    os.truncate(shard, shard.stat().st_size // 2)


def empty_shard(weights: Path) -> None:
    _shard(weights).write_bytes(b"")


def zero_shard(weights: Path) -> None:
    shard = _shard(weights)
    shard.write_bytes(bytes(shard.stat().st_size))


def _flip(at: Callable[[bytes], int], mask: int = 0x04) -> Callable[[Path], None]:
    """Flip bits (``mask``) of one byte of KEY's stored item, at ``at(item's bytes)``."""

    def corrupt(weights: Path) -> None:
        relative, offset, length = _item(weights)
        raw = bytearray((weights / relative).read_bytes())
        raw[offset + at(bytes(raw[offset : offset + length]))] ^= mask
        (weights / relative).write_bytes(bytes(raw))

    return corrupt


def _stride(item: bytes) -> int:
    """The 64 of the pickled stride (64, 1) of KEY's (128, 64) tensor: flipped to 0, every row would
    read the first row's values, in bounds."""
    return item.index(b"K@K\x01\x86") + 1


def _data_offset(item: bytes) -> int:
    """The low byte of the zip directory's offset of the tensor's data entry."""
    at = item.find(b"PK\x01\x02")
    while not item[at + 46 : at + 46 + int.from_bytes(item[at + 28 : at + 30], "little")].endswith(
        b"/data/0"
    ):
        at = item.find(b"PK\x01\x02", at + 1)
    return at + 42


def missing_shard(weights: Path) -> None:
    _shard(weights).unlink()


def folder_for_shard(weights: Path) -> None:
    shard = _shard(weights)
    shard.unlink()
    shard.mkdir()


def symlink_outside(weights: Path) -> None:
    """The shard, intact, moved out of the checkpoint and linked back: the data would even be right."""
    shard = _shard(weights)
    outside = weights.parents[1] / f"outside-{shard.name}"
    shard.rename(outside)
    shard.symlink_to(outside)


def linked_folder(weights: Path) -> None:
    """The index names ``outside/<shard>`` and ``outside`` links to a folder out of the checkpoint."""
    shard = _shard(weights)
    folder = weights.parents[1] / "elsewhere"
    folder.mkdir()
    shard.rename(folder / shard.name)
    (weights / "outside").symlink_to(folder)
    _relocate(f"outside/{shard.name}")(weights)


def common_outside(weights: Path) -> None:
    common = weights / "common.pt"
    outside = weights.parents[1] / "outside-common.pt"
    common.rename(outside)
    common.symlink_to(outside)


def symlink_inside(weights: Path) -> None:
    """A link to a file inside the weights folder is fine."""
    shard = _shard(weights)
    shard.rename(weights / "moved.bin")
    shard.symlink_to("moved.bin")


def garbage(name: str, data: bytes) -> Callable[[Path], None]:
    def corrupt(weights: Path) -> None:
        (weights / name).write_bytes(data)

    return corrupt


def truncate_index(weights: Path) -> None:
    index = weights / ".metadata"
    os.truncate(index, index.stat().st_size // 2)


def drop_stored_item(weights: Path) -> None:
    """The index lists KEY's chunk, but not where it is stored."""

    def change(metadata) -> None:
        del metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == KEY)]

    _rewrite_index(weights, change)


def drop_chunk(weights: Path) -> None:
    """KEY's only chunk is gone from the index: nothing would be read into it."""

    def change(metadata) -> None:
        metadata.state_dict_metadata[KEY].chunks.clear()

    _rewrite_index(weights, change)


def item_past_the_end(weights: Path) -> None:
    def change(metadata) -> None:
        index = next(i for i in metadata.storage_data if i.fqn == KEY)
        metadata.storage_data[index].length += 1 << 20

    _rewrite_index(weights, change)


def broken_index_fields(weights: Path) -> None:
    def change(metadata) -> None:
        metadata.storage_data = [1, 2, 3]

    _rewrite_index(weights, change)


def extra_file(weights: Path) -> None:
    (weights / "notes.txt").write_text("not part of the checkpoint\n")
    (weights / "__9_9.distcp").write_bytes(b"\0" * 100)


BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}
SHARD = "__0_1.distcp"  # the shard holding KEY (checked by test_the_table_corrupts_the_shard_it_means)

# name -> (corruption, the file an error names or None for a correct load, a key is named, found
# before reading)
CASES: dict[str, tuple[Callable[[Path], None], str | None, bool, bool]] = {
    "truncated shard": (truncate_shard, SHARD, True, True),
    "empty shard": (empty_shard, SHARD, True, True),
    "zeroed shard": (zero_shard, SHARD, True, False),
    "bit flip in a zip header": (_flip(lambda item: 2), SHARD, True, False),
    "bit flip in a tensor's pickle": (_flip(_stride, 0x40), SHARD, True, False),
    "bit flip in a zip directory": (_flip(_data_offset, 0x08), SHARD, True, False),
    "missing shard": (missing_shard, SHARD, True, True),
    "folder in place of a shard": (folder_for_shard, SHARD, True, True),
    "shard links outside the checkpoint": (symlink_outside, SHARD, True, True),
    "a stored item under a folder that links outside": (linked_folder, "outside/" + SHARD, True, True),
    "shard links inside the weights folder": (symlink_inside, None, False, False),
    "missing common.pt": (lambda weights: (weights / "common.pt").unlink(), "common.pt", False, True),
    "common.pt links outside the checkpoint": (common_outside, "common.pt", False, True),
    "garbage common.pt": (garbage("common.pt", b"\x80\x04garbage" * 10), "common.pt", False, True),
    "empty common.pt": (garbage("common.pt", b""), "common.pt", False, True),
    "zip-shaped garbage common.pt": (
        garbage("common.pt", b"PK\x03\x04" + bytes(200)),
        "common.pt",
        False,
        True,
    ),
    "garbage metadata.json": (garbage("metadata.json", b"\x00{garbage"), "metadata.json", False, True),
    "metadata.json with an unknown field": (
        garbage("metadata.json", json.dumps({**BACKEND, "shiny": True}).encode()),
        "metadata.json",
        False,
        True,
    ),
    "metadata.json naming another backend": (
        garbage("metadata.json", json.dumps({**BACKEND, "sharded_backend": "zarr"}).encode()),
        "metadata.json",
        False,
        True,
    ),
    "metadata.json with a string version": (
        garbage("metadata.json", json.dumps({**BACKEND, "sharded_backend_version": "1"}).encode()),
        "metadata.json",
        False,
        True,
    ),
    "a plain dict pickled as .metadata": (
        garbage(".metadata", pickle.dumps({"a": 1})),
        ".metadata",
        False,
        True,
    ),
    "truncated .metadata": (truncate_index, ".metadata", False, True),
    "index fields of the wrong type": (broken_index_fields, ".metadata", False, True),
    "a stored item escapes the weights folder": (_relocate("../../etc/passwd"), ".metadata", True, True),
    "a stored item at an absolute path": (_relocate("/etc/passwd"), ".metadata", True, True),
    "a stored item at the folder itself": (_relocate("."), ".metadata", True, True),
    "a chunk without a stored item": (drop_stored_item, ".metadata", True, True),
    "a tensor without chunks": (drop_chunk, ".metadata", True, True),
    "a stored item past the end of its shard": (item_past_the_end, SHARD, True, True),
    "an extra unknown file": (extra_file, None, False, False),
}


@pytest.fixture
def copy(ckpt, tmp_path) -> Path:
    target = tmp_path / "gpt"
    shutil.copytree(ckpt, target, symlinks=True)
    return target


def test_the_table_corrupts_the_shard_it_means(ckpt):
    assert _item(ckpt / "weights")[0] == SHARD


@pytest.mark.parametrize("case", CASES)
def test_a_corrupted_weights_folder(parallel, ckpt, copy, reference, case):
    corrupt, named, key_named, before_reading = CASES[case]
    weights = copy / "weights"
    keys = _keys_in(ckpt / "weights", SHARD)
    corrupt(weights)
    model = build(GPT, seed=1)
    before = gathered(model)
    if named is None:
        load_weights_sharded_inplace_nemo2_to_mcore(model, copy, [], quiet=True)
        assert same(gathered(model), reference)
        return
    with pytest.raises(CheckpointError) as caught:
        load_weights_sharded_inplace_nemo2_to_mcore(model, copy, [], quiet=True)
    error = caught.value
    assert type(error) is CheckpointError and error.exit_code == 2
    text = str(error)
    assert named in text, text
    assert "Traceback" not in text and "CheckpointException" not in text, text
    if key_named:
        assert any(key.removeprefix("module.") in text for key in keys), text
    if before_reading:
        assert same(gathered(model), before), "weights changed before the error"
    json.dumps(error.to_list())  # plain data for the CLI and the service


def test_an_interrupt_during_the_read_stays_an_interrupt(parallel, ckpt, monkeypatch):
    """DCP wraps whatever a read raises, KeyboardInterrupt included, in its CheckpointException (a
    BaseException): the loader raises the interrupt again instead of reporting a bad checkpoint."""

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(reader, "_item_layout", interrupted)  # megatron's path
    monkeypatch.setattr(direct, "_fast_layout", interrupted)  # the direct path
    with pytest.raises(KeyboardInterrupt):
        load_weights_sharded_inplace_nemo2_to_mcore(build(GPT, seed=1), ckpt, [], quiet=True)


def test_the_cli_reports_a_corrupted_checkpoint_as_one_json_document(ckpt, tmp_path):
    copy = tmp_path / "gpt"
    shutil.copytree(ckpt, copy)
    zero_shard(copy / "weights")
    config = tmp_path / "config.json"
    config.write_bytes(GPT.with_overrides({"initial_ckpt_path": str(copy)}).to_json(exclude_unset=True))
    result = run_cli("run", str(config), "--format", "json")
    assert result.returncode == 2, result.stderr.decode()[-3000:]
    document = orjson.loads(result.stdout)  # exactly one JSON document
    assert document["ok"] is False and document["exit_code"] == 2
    (issue,) = document["errors"]
    assert issue["type"] == "shard_corrupt" and issue["source"] == str(copy / "weights" / SHARD), issue
    assert "checkpoint key module." in issue["message"], issue
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()[-3000:]


# ---- every rank raises the same error ------------------------------------------------------------

ON_THE_LAST_STAGE = ("a tensor without chunks", "bit flip in a tensor's pickle")
"""Damage to output_layer.weight, which only the last pipeline stage reads: found by one rank, before
reading and while reading."""


def test_every_rank_raises_the_same_error(ckpt, tmp_path):
    """Two processes at PP=2 (this file run under torchrun): the rank that does not read the damaged
    key raises the same CheckpointError as the one that does."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            str(ckpt),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for case in ON_THE_LAST_STAGE:
        first, second = (json.loads((tmp_path / f"{case}.{rank}.json").read_text()) for rank in (0, 1))
        assert first is not None and first == second, (case, first, second)
        assert "output_layer.weight" in json.dumps(first), first


def _each_rank(ckpt: Path, out: Path) -> None:
    """Under torchrun: load each case of ON_THE_LAST_STAGE at PP=2 and write the error each rank
    raised (null for none) to ``out/<case>.<rank>.json``."""
    import torch.distributed as dist
    from dist_scripts.layouts import layout
    from megatron.core import parallel_state

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    rank = dist.get_rank()
    config = layout(GPT.with_overrides({"pipeline_dtype": "float32"}), pipeline=2)
    for case in ON_THE_LAST_STAGE:
        copy = out / "ckpt" / case
        if rank == 0:
            shutil.copytree(ckpt, copy)
            CASES[case][0](copy / "weights")
        dist.barrier()
        model = build(config, seed=1)
        try:
            load_weights_sharded_inplace_nemo2_to_mcore(model, copy, [], quiet=True)
            raised = None
        except CheckpointError as error:
            raised = error.to_list()
        (out / f"{case}.{rank}.json").write_text(json.dumps(raised))
        dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _each_rank(Path(sys.argv[1]), Path(sys.argv[2]))
