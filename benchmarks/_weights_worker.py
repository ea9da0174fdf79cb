"""One rank of weights_speed.py's multi-process rows, run under torchrun; rank 0 writes the timings.

Every rank builds its part of each model at tensor_model_parallel_size = the world size, checks once
that the seed's path and bioconf's loader give it identical tensors, then times both (and rank 0's
plain file read) with weights_speed's ``measure``, a barrier around every call.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/_weights_worker.py \\
        --sizes small,large --repeats 5 --dir DIR --device cpu --out timings.json
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from weights_speed import (  # first: it imports megatron with its notices silenced
    CACHES,
    SIZES,
    bioconf_load,
    checkpoint_path,
    file_read,
    measure,
    memory_read,
    same_weights,
    seed_load,
)

from bioconf.runtime import ensure_parallel_state
from bioconf.runtime.build import build_model
from bioconf.runtime.config import materialize


def on_rank0(read: Callable[[object, Path], None]) -> Callable[[object, Path], None]:
    """A limit stays one process reading every file once; the other ranks wait at the barrier."""

    def rank0_read(model, ckpt: Path) -> None:
        if dist.get_rank() == 0:
            read(model, ckpt)

    return rank0_read


METHODS = {
    "seed": seed_load,
    "bioconf": bioconf_load,
    "file read": on_rank0(file_read),
    "read into memory": on_rank0(memory_read),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument(
        "--dir", type=Path, required=True, help="holds the checkpoints weights_speed.py wrote"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron's deprecation notices while building

    dist.init_process_group("gloo")  # gloo with CUDA too: the ranks may share one GPU, which NCCL refuses
    try:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        world, timings = dist.get_world_size(), {}
        for size in args.sizes.split(","):
            runtime = materialize(SIZES[size].with_overrides({"tensor_model_parallel_size": world}))
            runtime.use_cpu_initialization = args.device == "cpu"
            ckpt = checkpoint_path(args.dir, size)
            with ensure_parallel_state(runtime):
                model, check = build_model(runtime), build_model(runtime)
                seed_load(check, ckpt)
                report = bioconf_load(model, ckpt)
                agree, counted = [None] * world, [None] * world
                dist.all_gather_object(agree, same_weights(model, check))
                dist.all_gather_object(counted, [report.bytes_read, report.bytes_kept])
                if not all(agree):
                    raise SystemExit(f"{size}: the two loaders disagree (per rank: {agree})")
                timings[size] = {
                    cache: measure(model, ckpt, cache == "cold", args.repeats, METHODS, dist.barrier)
                    for cache in CACHES
                }
                timings[size]["bytes"] = counted
        if dist.get_rank() == 0:
            args.out.write_text(json.dumps(timings))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
