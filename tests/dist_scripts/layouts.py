"""Run by tests/test_weights.py under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU).

Saves checkpoints under one parallel layout and loads them under others; after each load the
tensors gathered from every rank must equal the source model's bit for bit. Prints ``ok <case>``
per case; any failure raises (non-zero exit).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from bioconf.errors import WeightsError
from bioconf.runtime.build import build_model
from bioconf.runtime.config import materialize
from bioconf.runtime.parallel import model_chunks
from bioconf.runtime.save import save_checkpoint
from bioconf.runtime.weights import load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema import ModelConfig

GPT = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    vocab_size=128,
    seq_length=32,
    gated_linear_unit=True,  # linear_fc1 goes through megatron's swiglu sharded-tensor factory
    pipeline_dtype="float32",
)
MOE = GPT.with_overrides({"num_moe_experts": 4, "moe_ffn_hidden_size": 32})


def layout(config: ModelConfig, **sizes: int) -> ModelConfig:
    """Re-initialize megatron's parallel state for ``sizes`` and return ``config`` laid out so."""
    parallel_state.destroy_model_parallel()
    vpp = sizes.pop("virtual", None)
    fields = {f"{name}_model_parallel_size": sizes.get(name, 1) for name in ("tensor", "pipeline", "expert")}
    fields["context_parallel_size"] = sizes.get("context", 1)
    fields["virtual_pipeline_model_parallel_size"] = vpp
    fields["expert_tensor_parallel_size"] = sizes.get("expert_tensor")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=fields["tensor_model_parallel_size"],
        pipeline_model_parallel_size=fields["pipeline_model_parallel_size"],
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=fields["context_parallel_size"],
        expert_model_parallel_size=fields["expert_model_parallel_size"],
        expert_tensor_parallel_size=fields["expert_tensor_parallel_size"],
    )
    return config.with_overrides(fields)


def build(config: ModelConfig, seed: int):
    runtime = materialize(config)
    runtime.use_cpu_initialization = True
    torch.manual_seed(seed)
    vpp = runtime.virtual_pipeline_model_parallel_size
    return [build_model(runtime, vp) for vp in range(vpp)] if vpp else build_model(runtime)


def sharded_tensors(value):
    for item in nested_values(value) if isinstance(value, dict) else [value]:
        if isinstance(item, ShardedTensorFactory):
            yield from sharded_tensors(item.build())
        elif isinstance(item, ShardedTensor):
            yield item


def gathered(model) -> dict[str, torch.Tensor]:
    """Every global tensor, assembled from all ranks' shards; overlapping replicas must agree and
    every element must be covered."""
    pieces = []
    for chunk in model_chunks(model):
        for key, value in chunk.sharded_state_dict().items():
            if "_extra_state" not in key:
                pieces += [
                    (
                        t.key,
                        t.global_shape,
                        t.global_offset,
                        t.prepend_axis_num,
                        t.data.detach().to("cpu", copy=True),
                    )
                    for t in sharded_tensors(value)
                ]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, pieces)
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for key, shape, offset, prepend, data in (p for rank in everyone for p in rank):
        if key not in full:
            full[key] = torch.zeros(shape, dtype=data.dtype)
            covered[key] = torch.zeros(shape, dtype=torch.bool)
        local = (1,) * prepend + tuple(data.shape)
        index = tuple(slice(o, o + n) for o, n in zip(offset, local))
        region = data.reshape(local)
        seen = covered[key][index]
        assert torch.equal(full[key][index][seen], region[seen]), f"replicas of {key} disagree"
        full[key][index] = region
        covered[key][index] = True
    assert all(bool(mask.all()) for mask in covered.values()), "some elements on no rank"
    return full


def done(case: str) -> None:
    if dist.get_rank() == 0:
        print(f"ok {case}", flush=True)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_load(case: str, ckpt: Path, config: ModelConfig, reference: dict[str, torch.Tensor], **sizes):
    model = build(layout(config, **sizes), seed=99)
    assert not same(gathered(model), reference), f"{case}: the fresh model already equals the source"
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [], quiet=True)
    assert same(gathered(model), reference), f"{case}: loaded tensors differ from the source"
    assert report.loaded and report.bytes_read > 0 and report.stock_reads == 0, report
    done(case)
    return model


def save_source(name: str, root: Path, config: ModelConfig, seed: int, **sizes):
    config = layout(config, **sizes)
    model = build(config, seed)
    reference = gathered(model)
    return save_checkpoint(model, config, root / name), reference


def main(root: Path) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel()

    plain, reference = save_source("tp1", root, GPT, seed=1)
    check_load("tp1->tp2", plain, GPT, reference, tensor=2)
    model = check_load("tp1->pp2", plain, GPT, reference, pipeline=2)
    check_load("tp1->pp2vpp2", plain, GPT, reference, pipeline=2, virtual=2)

    # A skip prefix that matches keys on the last pipeline stage only is used; one that matches
    # nothing anywhere fails on every rank alike.
    layout(GPT, pipeline=2)
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, plain, ["output_layer."], quiet=True)
    assert bool(report.skipped) == parallel_state.is_pipeline_last_stage(), report
    try:
        load_weights_sharded_inplace_nemo2_to_mcore(model, plain, ["output_layers."], quiet=True)
    except WeightsError as error:
        assert "nearest keys: output_layer." in str(error), error
    else:
        raise AssertionError("an unused skip prefix was accepted")
    done("pp2-skip-prefixes")

    tp2, reference = save_source("tp2", root, GPT, seed=3, tensor=2)
    check_load("tp2->tp1", tp2, GPT, reference)
    check_load("tp2->pp2", tp2, GPT, reference, pipeline=2)

    moe, reference = save_source("moe", root, MOE, seed=5)
    check_load("moe-ep1->ep2", moe, MOE, reference, expert=2)
    moe_ep2, reference = save_source("moe-ep2", root, MOE, seed=6, expert=2)
    check_load("moe-ep2->tp2etp1", moe_ep2, MOE, reference, tensor=2, expert_tensor=1)

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
