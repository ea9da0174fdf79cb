"""The main job end to end: `bioconf run` and `bioconf demo`, in-process, as a CLI, and under torchrun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import orjson
import pytest
import torch
from conftest import EXAMPLES, ROOT, run_cli

from bioconf import demo
from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.errors import CheckpointMismatchError
from bioconf.schema import OVERRIDE_BIONEMO_CONFIG_DEFAULTS, ModelConfig, load_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from bioconf.runtime.initialize import init_checkpoint
    from bioconf.runtime.run import run

# The demo's shape, smaller, with a vocabulary that splits over 2 tensor-parallel ranks.
PRETRAIN = {
    **demo.PRETRAIN,
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "vocab_size": 64,
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A small ESM-2-like checkpoint, as the demo makes it (fewer layers)."""
    path = tmp_path_factory.mktemp("ckpt") / "esm2"
    init_checkpoint(ModelConfig(**PRETRAIN), path)
    return str(path)


def finetune(checkpoint: str, **changes) -> ModelConfig:
    small = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    return ModelConfig(**{**demo.FINETUNE, **small, "initial_ckpt_path": checkpoint, **changes})


def test_examples_are_the_embedded_demo_configs():
    assert orjson.loads((EXAMPLES / "pretrain_esm2_small.json").read_bytes()) == demo.PRETRAIN
    assert orjson.loads((EXAMPLES / "finetune.json").read_bytes()) == demo.FINETUNE


def test_run_resolves_builds_and_loads(pretrained):
    config = finetune(pretrained)
    report = run(config, quiet=True)
    assert report.resolved.sources["hidden_dropout"] == "user"
    assert report.resolved.sources["vocab_size"] == "checkpoint"
    (model,) = report.models
    runtime_config = model.config
    assert runtime_config.hidden_dropout == 0.1 and runtime_config.vocab_size == 64
    assert runtime_config.params_dtype == torch.float32 and not runtime_config.bf16
    assert set(report.weights.skipped.values()) == {"lm_head."}
    assert report.weights.cast  # the bf16 checkpoint was cast into the fp32 model
    text = str(report)
    assert "skipped 4 tensors by prefix 'lm_head.'" in text and "policy       explicit" in text


def test_the_model_is_built_from_the_one_merge(pretrained):
    """One read and one merge: the built model's config is exactly the resolved config."""
    report = run(finetune(pretrained, attention_dropout=0.2), quiet=True)
    built = report.models[0].config
    assert built.to_schema() == report.resolved.config
    assert built.use_cpu_initialization  # this machine's setting, as an attribute only
    assert "use_cpu_initialization" not in built.get_hparams()


def test_a_config_that_keeps_use_cpu_initialization_runs(pretrained):
    keep = [*OVERRIDE_BIONEMO_CONFIG_DEFAULTS, "use_cpu_initialization"]
    report = run(finetune(pretrained, override_parent_fields=keep, use_cpu_initialization=True), quiet=True)
    assert report.weights.loaded


@pytest.mark.parametrize("part", ["", "context", "context/io.json", "weights"])
def test_any_part_of_the_checkpoint_names_it(pretrained, part):
    report = run(finetune(pretrained), checkpoint=os.path.join(pretrained, part), quiet=True)
    assert str(report.resolved.checkpoint.paths.root) == pretrained.rstrip("/")
    assert report.weights.checkpoint == os.path.join(pretrained, "weights")


def test_seed_policy_takes_the_checkpoint_dropout(pretrained):
    report = run(finetune(pretrained), policy="seed", quiet=True)
    assert report.models[0].config.hidden_dropout == 0.0


def test_run_saves_a_checkpoint_the_next_stage_starts_from(pretrained, tmp_path):
    report = run(finetune(pretrained), save=tmp_path / "stage1", quiet=True)
    assert report.saved == tmp_path / "stage1"
    saved = read_checkpoint_config(report.saved).config
    assert saved.hidden_dropout == 0.1 and saved.vocab_size == 64 and saved.params_dtype == "float32"
    again = run(ModelConfig(**SMALL_BERT, initial_ckpt_path=str(report.saved)), quiet=True)
    assert again.weights.skipped == {}


SMALL_BERT = {"model_cls": "bert", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


def test_a_kept_shape_that_does_not_fit_fails_before_loading(pretrained):
    with pytest.raises(CheckpointMismatchError, match="vocab_size"):
        run(finetune(pretrained, vocab_size=32), quiet=True)


def test_cli_run_text_json_and_exit_codes(pretrained, tmp_path):
    config = tmp_path / "finetune.json"
    config.write_bytes(finetune(pretrained).to_json(exclude_unset=True))
    text = run_cli("run", str(config), "--quiet")
    assert text.returncode == 0, text.stderr
    assert "skipped 4 tensors by prefix 'lm_head.'" in text.stdout.decode()
    as_json = run_cli("run", str(config), "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    report = orjson.loads(as_json.stdout)
    assert report["weights"]["skipped"] and report["resolved"]["policy"] == "explicit"
    assert report["forward"] is None  # only when asked
    checked = orjson.loads(run_cli("run", str(config), "--check-forward", "--format", "json").stdout)
    assert checked["forward"]["shape"] == [2, 16, 64] and checked["forward"]["sha256"]
    validated = orjson.loads(run_cli("validate", str(config), "--format", "json").stdout)
    assert report["fingerprint"] == validated["files"][0]["fingerprint"]  # the same config, the same hash
    assert run_cli("run", str(config), "--set", "vocab_size=32").returncode == 3
    assert run_cli("run", str(config), "--set", "num_layers=2.5").returncode == 1
    assert run_cli("run", str(config), "--checkpoint", str(tmp_path / "missing")).returncode == 2


def test_run_under_torchrun_loads_each_rank_and_prints_once(pretrained, tmp_path):
    config = tmp_path / "tp2.json"
    config.write_bytes(finetune(pretrained, tensor_model_parallel_size=2).to_json(exclude_unset=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "bioconf", "run", str(config), "--format", "json",
        ],
        capture_output=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = orjson.loads(result.stdout)  # exactly one JSON document: only rank 0 printed
    assert report["world_size"] == 2 and report["rank"] == 0
    assert report["weights"]["skipped"]


def test_demo_makes_its_checkpoint_once(tmp_path):
    first = run_cli("demo", "--cache", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "created the demo checkpoint" in first.stdout.decode()
    assert "skipped 4 tensors by prefix 'lm_head.'" in first.stdout.decode()
    second = run_cli("demo", "--cache", str(tmp_path))
    assert "using the demo checkpoint" in second.stdout.decode()
    shutil.rmtree(tmp_path / "esm2-small")


def test_examples_finetune_runs_against_the_demo_checkpoint(tmp_path):
    init_checkpoint(ModelConfig(**demo.PRETRAIN), tmp_path / "esm2-small")
    config = load_config(EXAMPLES / "finetune.json", [f"initial_ckpt_path={tmp_path / 'esm2-small'}"])
    assert run(config, quiet=True).weights.loaded


def test_run_across_two_nodes_loads_and_saves_exactly(pretrained, tmp_path):
    """Two torchrun "nodes" on this machine (--nnodes 2 --nproc-per-node 1, a c10d rendezvous on the
    loopback address), TP=2 across them: the checkpoint saved there loads back at TP=1 equal to the
    source, tensor by tensor."""
    import socket

    config = tmp_path / "tp2.json"
    config.write_bytes(finetune(pretrained, tensor_model_parallel_size=2).to_json(exclude_unset=True))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = tmp_path / "saved"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bioconf-two-nodes",
        "-m", "bioconf", "run", str(config), "--save", str(saved), "--format", "json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    nodes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err.decode()[-3000:]
    report = orjson.loads(next(out for out, _ in outputs if out.strip()))  # the node holding rank 0
    assert report["world_size"] == 2

    skipped = tuple(finetune(pretrained).initial_ckpt_skip_keys_with_these_prefixes)  # freshly made
    source = run(finetune(pretrained), quiet=True).models[0].state_dict()
    back = run(finetune(str(saved)), quiet=True).models[0].state_dict()
    compared = [k for k, v in source.items() if isinstance(v, torch.Tensor) and not k.startswith(skipped)]
    assert len(compared) > 20
    for key in compared:
        assert torch.equal(source[key], back[key]), key
