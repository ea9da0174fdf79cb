"""Forward passes on CPU (``bioconf.runtime.forward``): the scope patches only what it says and puts
it back; GPT and BERT run, deterministically in eval mode; a saved and reloaded model gives the same
logits; and the same checkpoint gives the same logits at TP=1, TP=2, PP=2 and PP=2 with virtual
stages (two processes under torchrun, tests/dist_scripts/forward_parity.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT

from bioconf.errors import UsageError
from bioconf.schema import ModelConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.utils import GlobalMemoryBuffer

    from bioconf.runtime import forward
    from bioconf.runtime.build import build_chunks
    from bioconf.runtime.config import materialize
    from bioconf.runtime.forward import (
        cpu_forward,
        forward_checksum,
        forward_logits,
        logits_checksum,
        synthetic_batch,
    )
    from bioconf.runtime.initialize import init_checkpoint
    from bioconf.runtime.parallel import ensure_parallel_state
    from bioconf.runtime.run import run
    from bioconf.runtime.weights import load_weights_sharded_inplace_nemo2_to_mcore


def _dist_script(name: str):
    """A per-rank script of tests/dist_scripts as a module (the test reuses its loading code)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "dist_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checkpoint_logits = _dist_script("forward_parity").checkpoint_logits

SMALL = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}
MODELS = {
    "gpt-rope": ModelConfig(**SMALL, position_embedding_type="rope"),
    "gpt-learned": ModelConfig(**SMALL),
    "bert": ModelConfig(**SMALL, model_cls="bert"),
}
BATCH = synthetic_batch(vocab_size=128, batch_size=2, seq_length=16)
PARITY_TOLERANCE = 1e-5  # fp32
LAYOUTS = ("tp2", "pp2", "pp2vpp2")  # against an in-process TP=1 load


def build(config: ModelConfig, seed: int):
    runtime = materialize(config)
    runtime.use_cpu_initialization = True
    torch.manual_seed(seed)
    return build_chunks(runtime)


def logits_of(model) -> torch.Tensor:
    with cpu_forward():
        return forward_logits(model, BATCH["input_ids"], attention_mask=BATCH["attention_mask"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A freshly initialized checkpoint per model (``init_checkpoint``, seed 1234)."""
    root = tmp_path_factory.mktemp("forward")
    return {name: str(init_checkpoint(config, root / name, seed=1234)) for name, config in MODELS.items()}


# ---- the scope ----------------------------------------------------------------------------------------

OWNERS = (GlobalMemoryBuffer, RotaryEmbedding, fused_softmax, tp_random)


def snapshot() -> list[dict]:
    return [dict(vars(owner)) for owner in OWNERS]


def changed(before: list[dict], after: list[dict]) -> set[tuple[str, str]]:
    return {
        (getattr(owner, "__name__", ""), name)
        for owner, old, new in zip(OWNERS, before, after)
        for name in old.keys() | new.keys()
        if old.get(name, None) is not new.get(name, None)
    }


def test_the_scope_patches_what_it_lists_and_restores_every_identity():
    before = snapshot()
    listed = {(owner.__name__, name) for owner, name in forward.patched_attributes()}
    with cpu_forward() as tracker:
        inside = snapshot()
        assert tp_random.get_cuda_rng_tracker() is tracker
    assert changed(before, inside) == listed  # exactly the documented attributes, every one of them
    assert changed(before, snapshot()) == set()


def test_the_scope_restores_after_an_exception_and_unwinds_nested_scopes():
    before = snapshot()
    with pytest.raises(RuntimeError, match="inside"), cpu_forward():
        raise RuntimeError("inside")
    assert changed(before, snapshot()) == set()
    with cpu_forward(seed=1) as outer:
        outer_state = snapshot()
        with cpu_forward(seed=2) as inner:
            assert inner is not outer and tp_random.get_cuda_rng_tracker() is inner
        assert changed(outer_state, snapshot()) == set()
        assert tp_random.get_cuda_rng_tracker() is outer
    assert changed(before, snapshot()) == set()


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_equals_megatrons_own(monkeypatch, interleaved):
    """The patched ``get_emb`` against megatron's, run with CUDA's device lookup pointed at the CPU."""
    with ensure_parallel_state():
        rotary = RotaryEmbedding(kv_channels=16, rotary_percent=0.5, rotary_interleaved=interleaved,
                                 use_cpu_initialization=True)  # fmt: skip
    with cpu_forward():
        ours = rotary.get_emb(12, offset=3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    assert torch.equal(ours, rotary.get_emb(12, offset=3))


def test_cpu_masks_are_megatrons_masks():
    assert torch.equal(forward._causal_mask(5), torch.triu(torch.ones(5, 5), diagonal=1).bool())
    sq, skv, window = 4, 7, (2, 0)
    expected = torch.tensor(
        [[not (skv - sq - window[0] <= j - i <= skv - sq + window[1]) for j in range(skv)] for i in range(sq)]
    )
    assert torch.equal(forward._sliding_window_mask(sq, skv, window), expected)


def test_the_cpu_rng_tracker_forks_the_cpu_generator():
    with ensure_parallel_state(), cpu_forward(seed=7) as tracker:
        torch.manual_seed(0)
        outside = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), outside)  # the caller's generator is untouched
        with tracker.fork():
            second = torch.rand(3)  # the tracked state moved on
    assert not torch.equal(first, second)
    with ensure_parallel_state(), cpu_forward(seed=7) as again, again.fork():
        assert torch.equal(torch.rand(3), first)  # the same seed, the same draws


# ---- forward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_forward_runs_and_is_deterministic_in_eval_mode(name):
    with ensure_parallel_state():
        model = build(MODELS[name], seed=1)
        first, second = logits_of(model), logits_of(model)
        assert first.shape == (2, 16, 128) and torch.isfinite(first).all()
        assert torch.equal(first, second)
        assert all(module.training for module in model[0].modules())  # eval_mode put the modes back
        # Training mode: dropout (0.1 by default) draws from the CPU tracker and the CPU generator.
        draws = []
        for _ in range(3):
            torch.manual_seed(5)
            with cpu_forward(seed=5):
                draws.append(forward_logits(model, BATCH["input_ids"], eval_mode=len(draws) == 2))
    assert torch.equal(draws[0], draws[1])  # the same seeds, the same dropout
    assert not torch.equal(draws[0], draws[2])  # eval mode: no dropout


def test_only_gpt_and_bert_run():
    with pytest.raises(UsageError, match="GPTModel and BertModel, not Linear"):
        forward_logits(torch.nn.Linear(2, 2), BATCH["input_ids"])


def test_gpt_padding_at_the_end_leaves_the_earlier_positions_alone():
    with ensure_parallel_state():
        model = build(MODELS["gpt-rope"], seed=1)
        padded = logits_of(model)
        with cpu_forward():
            unpadded = forward_logits(model, BATCH["input_ids"])
    assert torch.equal(padded[0], unpadded[0])  # the first sequence has no padding
    assert torch.allclose(padded[1, :12], unpadded[1, :12], atol=1e-6)  # causal: padding is ahead
    assert not torch.allclose(padded[1, 12:], unpadded[1, 12:])


@pytest.mark.parametrize("name", MODELS)
def test_init_checkpoint_loads_back_to_the_same_logits(checkpoints, name):
    """``init_checkpoint`` builds from its seed (1234) on one process, as ``build`` does here."""
    with ensure_parallel_state():
        original = logits_of(build(MODELS[name], seed=1234))
        fresh = build(MODELS[name], seed=7)
        assert not torch.equal(logits_of(fresh), original)
        load_weights_sharded_inplace_nemo2_to_mcore(fresh, checkpoints[name], [], quiet=True)
        diff = (logits_of(fresh) - original).abs().max().item()
    print(f"init_checkpoint round trip {name}: max abs diff {diff:.3e}")
    assert diff == 0


def test_run_save_loads_back_to_the_same_logits(checkpoints, tmp_path):
    config = MODELS["bert"].with_overrides({"initial_ckpt_path": checkpoints["bert"]})
    with ensure_parallel_state():  # outlives each run, for the forward passes
        report = run(config, save=tmp_path / "stage1", quiet=True)
        before = logits_of(report.models)
        again = run(MODELS["bert"].with_overrides({"initial_ckpt_path": str(report.saved)}), quiet=True)
        diff = (logits_of(again.models) - before).abs().max().item()
    print(f"run(save=...) round trip: max abs diff {diff:.3e}")
    assert diff == 0


def test_logits_checksum():
    logits = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    checksum = logits_checksum(logits)
    assert checksum == logits_checksum(logits.clone())
    assert checksum.shape == (2, 4, 8) and checksum.total == pytest.approx(float(logits.double().sum()))
    assert checksum.sum_of_squares == pytest.approx(float((logits.double() ** 2).sum()))
    assert logits_checksum(logits + 1e-3).sha256 != checksum.sha256
    assert str(checksum).startswith("2x4x8 sum=") and checksum.to_dict()["sha256"] == checksum.sha256


def test_forward_checksum_is_the_checksum_of_the_synthetic_batch_logits():
    with ensure_parallel_state():
        model = build(MODELS["bert"], seed=1)
        checksum = forward_checksum(model)
        batch = synthetic_batch(128, batch_size=2, seq_length=16, seed=0)
        with cpu_forward():
            logits = forward_logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    assert checksum == logits_checksum(logits) and checksum.shape == (2, 16, 128)


# ---- parity across layouts ----------------------------------------------------------------------------


def test_same_logits_at_tp1_tp2_and_pp2(checkpoints, tmp_path):
    """One in-process TP=1 reference per checkpoint; then TP=2, PP=2 and PP=2 with two virtual
    stages per rank, in one torchrun of two processes."""
    cases = {}
    for name in ("gpt-rope", "bert"):
        logits = checkpoint_logits(checkpoints[name], "tp1", BATCH)
        cases[name] = {"checkpoint": checkpoints[name], "logits": logits}
    references = tmp_path / "references.pt"
    torch.save({"batch": BATCH, "cases": cases}, references)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "tests" / "dist_scripts" / "forward_parity.py"), str(references), *LAYOUTS,
        ],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    diffs = {
        (case, layout): float(diff)
        for line in result.stdout.splitlines()
        if line.startswith("parity ")
        for case, layout, diff in [line.split()[1:]]
    }
    print("\n".join(f"{case} {layout} vs tp1: max abs diff {d:.3e}" for (case, layout), d in diffs.items()))
    assert set(diffs) == {(case, layout) for case in cases for layout in LAYOUTS}
    assert all(diff <= PARITY_TOLERANCE for diff in diffs.values()), diffs
    assert torch.load(f"{references}.bert.pp2.pt", weights_only=True).shape == (2, 16, 128)
