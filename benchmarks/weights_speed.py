"""Loading a checkpoint's weights: the seed's path vs bioconf's loader vs reading the shard files.

One process, one checkpoint per model size (written by ``init_checkpoint``), the same model:

- seed: what BioNeMo's loader does: ``module.`` added to every key of ``model.sharded_state_dict()``,
  then megatron-core's ``dist_checkpointing.load`` with its default torch_dist strategy
  (``strict=LOG_UNEXPECTED``: unexpected checkpoint keys are logged and ignored);
- bioconf: ``load_weights_sharded_inplace_nemo2_to_mcore`` (checks first, then the direct reader);
- file read: the physical limit, every ``.distcp`` file read start to end in 8 MiB ``readinto`` calls.

Warm: the files are in the page cache (one untimed round first). Cold: before each timed call the
files are dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``. Each cell is the
median of ``--repeats`` calls, rounds interleaved across the three methods.

    .venv/bin/python benchmarks/weights_speed.py [--repeats 5] [--sizes small,large] [--dir DIR]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _table import print_table

from bioconf.schema import ModelConfig

with warnings.catch_warnings():  # megatron's notices about Apex and Transformer Engine
    warnings.simplefilter("ignore")
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from bioconf.runtime import (
        ensure_parallel_state,
        init_checkpoint,
        load_weights_sharded_inplace_nemo2_to_mcore,
    )
    from bioconf.runtime.build import build_model
    from bioconf.runtime.materialize import materialize

SIZES = {
    # ~28 MB of fp32 weights
    "small": ModelConfig(
        num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=1024, seq_length=128
    ),
    # ~614 MB of fp32 weights: the model of FINDINGS.md's measurement of the seed
    "large": ModelConfig(
        num_layers=12, hidden_size=1024, num_attention_heads=16, vocab_size=1024, seq_length=128
    ),
}


def seed_load(model, ckpt: Path) -> None:
    """BioNeMo's load_weights_sharded_inplace_nemo2_to_mcore, no keys skipped."""
    sharded = {}
    for key, value in model.sharded_state_dict().items():
        if "_extra_state" in key:
            continue
        value.key = f"module.{value.key}"
        sharded[f"module.{key}"] = value
    weights = str(ckpt / "weights")
    dist_checkpointing.load(
        sharded,
        weights,
        sharded_strategy=dist_checkpointing.serialization.get_default_load_sharded_strategy(weights),
        strict=StrictHandling.LOG_UNEXPECTED,
    )


def bioconf_load(model, ckpt: Path) -> None:
    load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [], quiet=True)


def shard_files(ckpt: Path) -> list[Path]:
    return sorted((ckpt / "weights").glob("*.distcp"))


def file_read(_model, ckpt: Path) -> None:
    buffer = memoryview(bytearray(8 << 20))
    for path in shard_files(ckpt):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def drop_cache(ckpt: Path) -> None:
    for path in (ckpt / "weights").iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


METHODS: dict[str, Callable[[object, Path], None]] = {
    "seed": seed_load,
    "bioconf": bioconf_load,
    "file read": file_read,
}


def measure(model, ckpt: Path, cold: bool, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in METHODS}
    if not cold:
        for fn in METHODS.values():
            fn(model, ckpt)
    for _ in range(repeats):
        for name, fn in METHODS.items():
            if cold:
                drop_cache(ckpt)
            start = time.perf_counter()
            fn(model, ckpt)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def same_weights(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values())
        if torch.is_tensor(x)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="small,large", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--dir", type=Path, help="keep the checkpoints here (reused when present)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model lives")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron's deprecation notices while building

    with tempfile.TemporaryDirectory() as scratch, ensure_parallel_state():
        root = args.dir or Path(scratch)
        rows = []
        for size in args.sizes.split(","):
            config = SIZES[size]
            ckpt = root / f"weights-speed-{size}"
            if not ckpt.exists():
                init_checkpoint(config, ckpt, seed=1)
            nbytes = sum(path.stat().st_size for path in shard_files(ckpt))
            runtime = materialize(config)
            runtime.use_cpu_initialization = args.device == "cpu"
            model, check = build_model(runtime), build_model(runtime)
            seed_load(check, ckpt)
            bioconf_load(model, ckpt)
            assert same_weights(model, check), "the two loaders disagree"
            for cache in ("warm", "cold"):
                t = measure(model, ckpt, cache == "cold", args.repeats)
                rows.append(
                    [
                        f"{size} ({nbytes / 1e6:,.0f} MB)",
                        cache,
                        *(f"{t[name]:.3f} s ({nbytes / t[name] / 1e9:.2f} GB/s)" for name in METHODS),
                        f"{t['seed'] / t['bioconf']:.2f}x",
                        f"{t['file read'] / t['bioconf']:.0%}",
                    ]
                )
        print_table(
            f"Weight loading into a model on {args.device}, one process, {os.cpu_count()} CPUs, "
            f"median of {args.repeats}",
            ["model", "page cache", "seed", "bioconf", "file read", "bioconf vs seed", "bioconf / limit"],
            rows,
        )


if __name__ == "__main__":
    main()
