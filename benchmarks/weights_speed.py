"""Loading a checkpoint's weights: the seed's path vs bioconf's loader vs reading the shard files.

One checkpoint per model size (written by ``init_checkpoint`` for one process), loaded by one
process and by several (``--nproc``), the same model:

- seed: what BioNeMo's loader does: ``module.`` added to every key of ``model.sharded_state_dict()``,
  then megatron-core's ``dist_checkpointing.load`` with its default torch_dist strategy
  (``strict=LOG_UNEXPECTED``: unexpected checkpoint keys are logged and ignored);
- bioconf: ``load_weights_sharded_inplace_nemo2_to_mcore`` (checks first, then the direct reader);
- file read: the limit the issue set, every ``.distcp`` file read start to end in 8 MiB ``readinto``
  calls into one reused buffer (which stays in the CPU's cache);
- read into memory: the physical limit of a load, every file read once into one buffer as large as
  the files, by one thread per core (``memory_read``): the weights must land in memory.

The last column is what bioconf's reader counted for each rank: bytes asked of the kernel (zip
records and coalesced gaps included) and bytes of weights the rank keeps.

n processes (torchrun, gloo, one OpenMP thread each, launched by this script running
``_weights_worker.py``) each hold their part of the model at tensor_model_parallel_size=n and load
it from the same checkpoint; a call starts at a barrier and ends at the next, so it lasts until the
slowest rank is done. The file read stays one process reading every file once (rank 0; the others
wait), and so does the read into memory: the limits for any number of processes sharing one disk,
page cache and memory.

Warm: the files are in the page cache (one untimed round first). Cold: before each timed call the
files are dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``. Each cell is the
median of ``--repeats`` calls, rounds interleaved across the three methods.

    .venv/bin/python benchmarks/weights_speed.py [--repeats 5] [--sizes small,large] [--nproc 1,2]
        [--dir DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _table import print_table
from _targets import record

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
    from bioconf.runtime.config import materialize

WORKER = Path(__file__).with_name("_weights_worker.py")
CACHES = ("warm", "cold")

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


def bioconf_load(model, ckpt: Path):
    return load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [], quiet=True)


def shard_files(ckpt: Path) -> list[Path]:
    return sorted((ckpt / "weights").glob("*.distcp"))


def file_read(_model, ckpt: Path) -> None:
    buffer = memoryview(bytearray(8 << 20))
    for path in shard_files(ckpt):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


_MEMORY: dict[Path, torch.Tensor] = {}


def memory_read(_model, ckpt: Path) -> None:
    """Every file read once into one buffer the size of the files (allocated and written once, as a
    model's tensors are), by one thread per core, each reading a contiguous share in 16 MiB
    ``preadv`` calls: the weights must land in memory, so this is the least a load can cost. The
    8 MiB buffer of ``file_read`` stays in the CPU's cache and does not pay for that."""
    files = shard_files(ckpt)
    sizes = [path.stat().st_size for path in files]
    if ckpt not in _MEMORY:
        _MEMORY[ckpt] = torch.ones(sum(sizes), dtype=torch.uint8)
    memory = memoryview(_MEMORY[ckpt].numpy())
    pieces, offset = [], 0  # (file, offset in it, length, offset in memory), in file order
    for path, size in zip(files, sizes):
        pieces += [(path, at, min(16 << 20, size - at), offset + at) for at in range(0, size, 16 << 20)]
        offset += size
    threads = os.cpu_count() or 1
    fds = {path: os.open(path, os.O_RDONLY) for path in files}

    def share(k: int) -> None:
        for path, at, length, target in pieces[k * len(pieces) // threads : (k + 1) * len(pieces) // threads]:
            os.preadv(fds[path], [memory[target : target + length]], at)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(share, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)


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
    "read into memory": memory_read,
}


def measure(
    model,
    ckpt: Path,
    cold: bool,
    repeats: int,
    methods: dict[str, Callable[[object, Path], None]] = METHODS,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per method. ``sync`` (a barrier, with several processes) brackets every timed
    call, so that a call lasts from a common start until the slowest rank is done."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    if not cold:
        for fn in methods.values():
            fn(model, ckpt)
    for _ in range(repeats):
        for name, fn in methods.items():
            if cold:
                drop_cache(ckpt)
            sync()
            start = time.perf_counter()
            fn(model, ckpt)
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def same_weights(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values())
        if torch.is_tensor(x)
    )


def checkpoint_path(root: Path, size: str) -> Path:
    return root / f"weights-speed-{size}"


def one_process(config: ModelConfig, ckpt: Path, device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per page-cache state and method, after checking that the two loaders agree."""
    runtime = materialize(config)
    runtime.use_cpu_initialization = device == "cpu"
    model, check = build_model(runtime), build_model(runtime)
    seed_load(check, ckpt)
    report = bioconf_load(model, ckpt)
    assert same_weights(model, check), "the two loaders disagree"
    timings = {cache: measure(model, ckpt, cache == "cold", repeats) for cache in CACHES}
    return {**timings, "bytes": [[report.bytes_read, report.bytes_kept]]}


def several_processes(
    nproc: int, sizes: list[str], root: Path, out: Path, device: str, repeats: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per size, page-cache state and method for ``nproc`` torchrun workers (rank 0 writes
    them to ``out``); one launch for all sizes, since starting the workers takes longer than a load."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"),
        *(str(WORKER), "--sizes", ",".join(sizes), "--repeats", str(repeats), "--dir", str(root)),
        *("--device", device, "--out", str(out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(
            f"{nproc} workers failed ({done.returncode}):\n{done.stdout[-5000:]}{done.stderr[-5000:]}"
        )
    return json.loads(out.read_text())


SHARE_TARGETS = {("large", 1, "warm"): 0.90, ("large", 2, "warm"): 0.80}
SHARE_TARGETS |= {("large", 1, "cold"): 0.90, ("large", 2, "cold"): 0.85}


def record_targets(timings: dict[int, dict[str, dict[str, Any]]], nbytes: dict[str, int]) -> None:
    """The rows of the target table this run measured (``_targets``)."""
    for (size, nproc, cache), target in SHARE_TARGETS.items():
        if nproc in timings and size in timings[nproc]:
            t = timings[nproc][size][cache]
            share = t["file read"] / t["bioconf"]
            record(
                f"weight load, {nbytes[size] / 1e6:,.0f} MB, {nproc} process{'es' * (nproc > 1)}, "
                f"{cache} page cache: bioconf's speed as a share of the file read",
                f"{share:.0%} ({t['bioconf']:.3f} s vs {t['file read']:.3f} s; "
                f"{t['read into memory'] / t['bioconf']:.0%} of the read into memory)",
                f">= {target:.0%}",
                share >= target,
            )
    if 1 in timings and "small" in timings[1]:
        t = timings[1]["small"]["warm"]
        times = t["bioconf"] / t["file read"]
        record(
            f"weight load, {nbytes['small'] / 1e6:,.0f} MB, 1 process, warm: bioconf's time in file reads",
            f"{times:.1f}x ({t['bioconf'] * 1e3:.1f} ms vs {t['file read'] * 1e3:.1f} ms; "
            f"{t['bioconf'] / t['read into memory']:.1f}x the read into memory)",
            "<= 2x",
            times <= 2,
        )
    if 2 in timings and "large" in timings[2]:
        per_rank = timings[2]["large"]["bytes"]
        extra = max(read / kept for read, kept in per_rank) - 1
        record(
            "bytes read per rank, TP=1 checkpoint into TP=2",
            f"{extra:.0%} more than kept ("
            + ", ".join(f"{r / 1e6:,.0f} MB for {k / 1e6:,.0f}" for r, k in per_rank)
            + ")",
            "only the bytes kept, plus alignment",
            extra <= 0.01,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="small,large", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--dir", type=Path, help="keep the checkpoints here (reused when present)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model lives")
    parser.add_argument(
        "--nproc", default="1,2", help="comma-separated process counts; n > 1 loads at tensor parallel size n"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron's deprecation notices while building

    sizes, nprocs = args.sizes.split(","), [int(n) for n in args.nproc.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or Path(scratch)
        timings: dict[int, dict[str, dict[str, Any]]] = {}
        with ensure_parallel_state():
            for size in sizes:
                if not checkpoint_path(root, size).exists():
                    init_checkpoint(SIZES[size], checkpoint_path(root, size), seed=1)
            if 1 in nprocs:
                timings[1] = {
                    size: one_process(SIZES[size], checkpoint_path(root, size), args.device, args.repeats)
                    for size in sizes
                }
        for nproc in nprocs:
            if nproc > 1:
                out = Path(scratch) / f"timings-{nproc}.json"
                timings[nproc] = several_processes(nproc, sizes, root, out, args.device, args.repeats)
        files = {
            size: sum(p.stat().st_size for p in shard_files(checkpoint_path(root, size))) for size in sizes
        }
        rows = []
        for size in sizes:
            nbytes = files[size]
            for nproc in nprocs:
                for cache in CACHES:
                    t = timings[nproc][size][cache]
                    per_rank = timings[nproc][size]["bytes"]
                    rows.append(
                        [
                            f"{size} ({nbytes / 1e6:,.0f} MB)",
                            nproc,
                            cache,
                            *(f"{t[name]:.3f} s ({nbytes / t[name] / 1e9:.2f} GB/s)" for name in METHODS),
                            f"{t['seed'] / t['bioconf']:.2f}x",
                            f"{t['file read'] / t['bioconf']:.0%}",
                            f"{t['read into memory'] / t['bioconf']:.0%}",
                            " / ".join(f"{read / 1e6:,.1f} / {kept / 1e6:,.1f}" for read, kept in per_rank),
                        ]
                    )
        print_table(
            f"Weight loading into a model on {args.device}, {os.cpu_count()} CPUs, median of {args.repeats}; "
            "n processes load at tensor parallel size n, timed until the slowest rank is done",
            [
                "model",
                "processes",
                "page cache",
                "seed",
                "bioconf",
                "file read",
                "read into memory",
                "bioconf vs seed",
                "file read / bioconf",
                "read into memory / bioconf",
                "bioconf MB read / kept, per rank",
            ],
            rows,
        )
        record_targets(timings, files)


if __name__ == "__main__":
    main()
