"""Saving NeMo 2 checkpoints on CPU: the layout NeMo writes and reads, atomic, and the CLI verb."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, run_cli
from dist_scripts.layouts import build, gathered, same
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from nemo.lightning import io
from nemo.lightning.io.pl import MegatronCheckpointIO
from nemo.lightning.megatron_parallel import MegatronParallel

from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.checkpoint.layout import CONTENT_METADATA
from bioconf.runtime import GPTModelConfig, materialize, to_schema
from bioconf.runtime.initialize import init_checkpoint
from bioconf.runtime.save import CpuTorchDistSaveStrategy, nemo_sharded_state_dict, save_checkpoint
from bioconf.runtime.weights import load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema import ModelConfig

GPT = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)


class Holder(pl.LightningModule):
    """A LightningModule holding its Megatron model in ``module``, as NeMo 2's models do."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def configure_model(self):
        pass


def plain(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by key, read by megatron's stock loader."""
    loaded = dist_checkpointing.load_plain_tensors(str(ckpt / "weights"))
    return {key: value for key, value in loaded.items() if torch.is_tensor(value)}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_init_checkpoint_writes_a_nemo2_checkpoint(tmp_path):
    before = (dist.is_initialized(), parallel_state.model_parallel_is_initialized())
    out = init_checkpoint(GPT, tmp_path / "ckpt", seed=3)
    assert out == tmp_path / "ckpt"
    assert (dist.is_initialized(), parallel_state.model_parallel_is_initialized()) == before  # cleaned up
    assert siblings(out) == []
    assert sorted(os.listdir(out / "context")) == ["io.json", "model.yaml"]
    weights = out / "weights"
    assert {".metadata", "common.pt", "metadata.json"} <= set(os.listdir(weights))
    assert json.loads((weights / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    assert dist_checkpointing.load_content_metadata(str(weights)) == CONTENT_METADATA
    keys = dist_checkpointing.load_tensors_metadata(str(weights))
    assert "module.embedding.word_embeddings.weight" in keys
    assert all(key.startswith("module.") for key in keys)
    assert read_checkpoint_config(out).config == GPT
    loaded = io.load_context(out / "context", subpath="model.config")  # NeMo's own reader
    assert type(loaded) is GPTModelConfig and to_schema(loaded) == GPT


def test_the_same_seed_gives_the_same_weights(tmp_path, parallel):
    a = init_checkpoint(GPT, tmp_path / "a", seed=3)
    b = init_checkpoint(GPT, tmp_path / "b", seed=3)
    c = init_checkpoint(GPT, tmp_path / "c", seed=4)
    assert same(plain(a), plain(b)) and not same(plain(a), plain(c))


def test_a_parallel_config_is_built_for_one_process_and_recorded_as_given(tmp_path, parallel):
    config = GPT.with_overrides({"tensor_model_parallel_size": 2, "sequence_parallel": True})
    out = init_checkpoint(config, tmp_path / "ckpt")
    assert read_checkpoint_config(out).config == config
    assert dist_checkpointing.load_tensors_metadata(str(out / "weights"))[
        "module.output_layer.weight"
    ].global_shape == (128, 64)


def test_save_checkpoint_takes_a_runtime_config(parallel, tmp_path):
    runtime = materialize(GPT.with_overrides({"hidden_dropout": 0.2}))
    runtime.use_cpu_initialization = True
    model = build(GPT, seed=1)
    out = save_checkpoint(model, runtime, tmp_path / "ckpt")
    assert read_checkpoint_config(out).config == to_schema(runtime)
    fresh = build(GPT, seed=2)
    load_weights_sharded_inplace_nemo2_to_mcore(fresh, out, [])
    assert same(gathered(fresh), gathered(model))


# ---- NeMo 2's key layout ------------------------------------------------------------------------


def sharded_keys(state_dict: dict) -> dict:
    """The dict structure with each ShardedTensor replaced by its checkpoint key."""
    return {
        key: sharded_keys(value) if isinstance(value, dict) else value.key
        for key, value in state_dict.items()
        if isinstance(value, (dict, ShardedTensor))
    }


def test_keys_are_the_ones_nemo_megatron_parallel_writes(parallel):
    model = build(GPT, seed=1)
    nemo = MegatronParallel(Holder(model), cpu=True).sharded_state_dict(metadata=dict(CONTENT_METADATA))
    ours = nemo_sharded_state_dict(model)
    assert sharded_keys(ours) == sharded_keys(nemo)
    assert next(iter(sharded_keys(ours).values())).startswith("module.")

    # Virtual pipeline chunks: nested under model_<i>, the checkpoint keys still start with module.
    chunks = [build(GPT, seed=1), build(GPT, seed=2)]
    nemo = MegatronParallel([Holder(c) for c in chunks], vp_size=2, cpu=True).sharded_state_dict(
        metadata=dict(CONTENT_METADATA)
    )
    ours = nemo_sharded_state_dict(chunks)
    assert list(ours) == ["model_0", "model_1"]
    assert sharded_keys(ours) == sharded_keys(nemo)


def test_a_checkpoint_written_by_nemos_checkpoint_io_loads(parallel, tmp_path):
    """NeMo's own save path (MegatronParallel + MegatronCheckpointIO), given the CPU strategy."""
    model = build(GPT, seed=1)
    checkpoint_io = MegatronCheckpointIO()
    checkpoint_io._save_sharded_strategy = CpuTorchDistSaveStrategy()  # NeMo's default needs CUDA
    checkpoint = {
        "sharded_state_dict": MegatronParallel(Holder(model), cpu=True).sharded_state_dict(metadata={}),
        "global_step": 7,
    }
    checkpoint_io.save_checkpoint(checkpoint, tmp_path / "nemo")
    fresh = build(GPT, seed=2)
    report = load_weights_sharded_inplace_nemo2_to_mcore(fresh, tmp_path / "nemo", [])
    assert same(gathered(fresh), gathered(model)) and report.stock_reads == 0


# ---- atomicity ----------------------------------------------------------------------------------


def test_an_existing_checkpoint_is_kept_unless_overwrite(parallel, tmp_path):
    first = save_checkpoint(build(GPT, seed=1), GPT, tmp_path / "ckpt")
    before = plain(first)
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(build(GPT, seed=2), GPT, first)
    assert same(plain(first), before)
    model = build(GPT, seed=2)
    save_checkpoint(model, GPT, first, overwrite=True)
    fresh = build(GPT, seed=3)
    load_weights_sharded_inplace_nemo2_to_mcore(fresh, first, [])
    assert same(gathered(fresh), gathered(model))
    assert siblings(first) == []


class BrokenModel:
    """A model whose second tensor has no data: megatron's saving fails part way through."""

    def sharded_state_dict(self, prefix="", metadata=None):
        good = ShardedTensor.from_rank_offsets(f"{prefix}good", torch.ones(4))
        bad = ShardedTensor.from_rank_offsets(f"{prefix}bad", torch.ones(4)).without_data()
        return {f"{prefix}good": good, f"{prefix}bad": bad}


def test_a_failed_save_leaves_nothing_behind(parallel, tmp_path):
    with pytest.raises(Exception, match="`data` attr is None"):
        save_checkpoint(BrokenModel(), GPT, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


KILLED_SAVE = ROOT / "tests" / "dist_scripts" / "killed_save.py"
# What the staging folder holds when the save is killed at each point of killed_save.py.
STAGED_AT = {
    # the shards are written, the .metadata listing them and megatron's metadata.json are not
    "shards": {"context", "context/io.json", "context/model.yaml", "weights", "weights/common.pt"},
    # everything: the rename that publishes it is all that is left
    "publish": {
        "context",
        "context/io.json",
        "context/model.yaml",
        "weights",
        "weights/.metadata",
        "weights/common.pt",
        "weights/metadata.json",
    },
}


def killed_save(out: Path, point: str, *, overwrite: bool = False) -> Path:
    """Run a save of killed_save.CONFIG to ``out`` in a child process that SIGKILLs itself at
    ``point``; the staging folder it left behind."""
    args = [sys.executable, str(KILLED_SAVE), str(out), point, *(["--overwrite"] if overwrite else [])]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-3000:]
    assert result.stdout.decode().splitlines() == [f"killed at {point}"]  # our kill, at that point
    staging = siblings(out)
    assert len(staging) == 1 and staging[0].startswith(f".{out.name}.tmp-"), staging
    staged = out.parent / staging[0]
    files = {str(p.relative_to(staged)) for p in staged.rglob("*")}
    assert {f for f in files if not f.endswith(".distcp")} == STAGED_AT[point]
    assert any(f.startswith("weights/__") and f.endswith(".distcp") for f in files)
    return staged


@pytest.mark.parametrize("point", sorted(STAGED_AT))
def test_a_killed_save_leaves_no_checkpoint(tmp_path, point):
    out = tmp_path / "ckpt"
    killed_save(out, point)
    assert not out.exists()


@pytest.mark.parametrize("point", sorted(STAGED_AT))
def test_a_killed_overwrite_leaves_the_old_checkpoint(tmp_path, parallel, point):
    out = init_checkpoint(GPT, tmp_path / "ckpt", seed=1)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    before = plain(out)
    killed_save(out, point, overwrite=True)  # a 3-layer config from another seed
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == files
    assert read_checkpoint_config(out).config == GPT
    assert same(plain(out), before)


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_init_checkpoint(tmp_path, parallel):
    config = tmp_path / "gpt.json"
    config.write_text(GPT.to_json().decode())
    out = tmp_path / "ckpt"
    result = run_cli("init-checkpoint", str(config), str(out), "--seed", "5", "--set", "num_layers=3")
    assert result.returncode == 0, result.stderr.decode()
    assert f"{out}: initialized from seed 5" in result.stdout.decode()
    assert read_checkpoint_config(out).config == GPT.with_overrides({"num_layers": 3})
    model = build(GPT.with_overrides({"num_layers": 3}), seed=1)
    load_weights_sharded_inplace_nemo2_to_mcore(model, out, [])

    exists = run_cli("init-checkpoint", str(config), str(out))
    assert exists.returncode == 2 and b"already exists" in exists.stderr
    invalid = run_cli("init-checkpoint", str(config), str(tmp_path / "x"), "--set", "num_layers=2.5")
    assert invalid.returncode == 1 and b"num_layers" in invalid.stderr
    missing = run_cli("init-checkpoint", str(tmp_path / "nope.json"), str(tmp_path / "x"))
    assert missing.returncode == 2
    assert not (tmp_path / "x").exists()
