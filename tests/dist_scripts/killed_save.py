"""Run by tests/test_checkpoint_save.py: save a checkpoint with ``init_checkpoint`` (which calls
``bioconf.runtime.save.save_checkpoint``) and SIGKILL this very process at a named point of the
save, so the test sees exactly what a crash at that point leaves on disk.

    python killed_save.py OUT POINT [--overwrite]

POINT is one of

* ``shards``: in the middle of the weights write: the shard files (``__*.distcp``) are written,
  the ``.metadata`` that lists them is not (``FileSystemWriter.finish`` is where torch writes it);
* ``publish``: every file of the checkpoint is written and synced in the staging folder, and the
  rename that publishes it (``replace_directory``) is about to run.

Before killing itself it prints ``killed at POINT`` (flushed), so the caller can tell this kill from
any other death. Reaching the end without passing POINT exits with status 3.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.checkpoint import FileSystemWriter

import bioconf.runtime.save as save
from bioconf.runtime.initialize import init_checkpoint
from bioconf.schema import ModelConfig

CONFIG = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)


def die(point: str) -> None:
    print(f"killed at {point}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class KilledBeforeMetadata(FileSystemWriter):
    def finish(self, metadata, results):
        die("shards")


def killed_before_rename(staging, target):
    die("publish")


def main() -> None:
    out, point = sys.argv[1], sys.argv[2]
    if point == "shards":
        save.FileSystemWriter = KilledBeforeMetadata
    elif point == "publish":
        save.replace_directory = killed_before_rename
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    init_checkpoint(CONFIG, out, seed=2, overwrite="--overwrite" in sys.argv[3:])
    raise SystemExit(3)


if __name__ == "__main__":
    main()
