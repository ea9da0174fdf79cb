"""Where the parts of a NeMo 2 checkpoint lie, and the one function that finds them.

```text
CKPT/
  context/io.json      the TrainerContext in fiddle's JSON serialization (the model config inside)
  context/model.yaml   the same model config, readable (written by bioconf)
  weights/.metadata    torch.distributed.checkpoint's index of the tensors (a pickle)
  weights/__R_I.distcp the tensor shards, keys prefixed "module."
  weights/common.pt, weights/metadata.json   megatron's common state and backend name
```

A user may name the checkpoint folder, its ``context/`` or ``weights/`` folder, or ``context/io.json``
itself: ``locate`` maps each to the same ``CheckpointPaths``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bioconf.errors import CheckpointError, CheckpointNotFoundError
from bioconf.fs import read_bytes
from bioconf.schema.files import loads_json

CONTEXT_DIR: Final = "context"
IO_JSON: Final = "io.json"
MODEL_YAML: Final = "model.yaml"
WEIGHTS_DIR: Final = "weights"
METADATA_FILE: Final = ".metadata"
BACKEND_FILE: Final = "metadata.json"

MODULE_PREFIX: Final = "module."
"""The prefix NeMo 2 gives every weight key (the Megatron model is the LightningModule's ``module``)."""

CONTENT_METADATA: Final[dict[str, Any]] = {
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
"""What NeMo 2's MegatronStrategy records as ``content_metadata`` for a run without a distributed
optimizer: how the sharded state dict was laid out, so a loader can ask for the same layout."""


@dataclass(frozen=True)
class CheckpointPaths:
    """The parts of one checkpoint (each may be missing: ``require_*`` says so)."""

    root: Path
    """The checkpoint folder."""
    io_json: Path
    weights: Path

    def require_context(self) -> Path:
        """``io_json``, or CheckpointNotFoundError saying what is there instead."""
        if self.io_json.is_file():
            return self.io_json
        why = "no such folder" if not self.root.exists() else f"no {CONTEXT_DIR}/{IO_JSON} in it"
        raise CheckpointNotFoundError.one(
            f"not a NeMo 2 checkpoint: expected its settings in {self.io_json} ({why})",
            "missing_context",
            source=self.root,
        )

    def require_weights(self) -> Path:
        """The weights folder, or CheckpointNotFoundError saying what is there instead."""
        if (self.weights / METADATA_FILE).is_file():
            return self.weights
        if not self.root.is_dir():
            why = "no such folder"
        elif not self.weights.is_dir():
            why = f"no {WEIGHTS_DIR}/ folder in it"
        else:
            why = f"no {METADATA_FILE} in {WEIGHTS_DIR}/"
            backend = read_backend(self.weights)
            if backend is not None and backend.get("sharded_backend") != "torch_dist":
                why += f"; its {BACKEND_FILE} names sharded_backend {backend.get('sharded_backend')!r}"
        raise CheckpointNotFoundError.one(
            f"not a torch_dist checkpoint: expected its weight index in "
            f"{self.weights / METADATA_FILE} ({why})",
            "missing_weights",
            source=self.root,
        )


def locate(path: str | os.PathLike[str]) -> CheckpointPaths:
    """The parts of the checkpoint ``path`` names: the checkpoint folder, its ``context/`` or
    ``weights/`` folder, or an ``io.json`` file. Nothing is read; missing parts are found by
    ``require_context`` / ``require_weights``."""
    given = Path(path)
    if given.is_file():  # an io.json (any name: a context file given directly)
        context = given.parent
        root = context.parent if context.name == CONTEXT_DIR else context
        return CheckpointPaths(root, given, root / WEIGHTS_DIR)
    if (given / IO_JSON).is_file() and not (given / CONTEXT_DIR).is_dir():  # a context folder
        root = given.parent if given.name == CONTEXT_DIR else given
        return CheckpointPaths(root, given / IO_JSON, root / WEIGHTS_DIR)
    if (given / METADATA_FILE).is_file():  # a weights folder
        return CheckpointPaths(given.parent, given.parent / CONTEXT_DIR / IO_JSON, given)
    return CheckpointPaths(given, given / CONTEXT_DIR / IO_JSON, given / WEIGHTS_DIR)


def read_backend(weights_dir: Path) -> dict[str, Any] | None:
    """megatron's ``metadata.json`` in ``weights_dir``, or None when there is none."""
    path = weights_dir / BACKEND_FILE
    if not path.exists():
        return None
    document = loads_json(read_bytes(path, CheckpointError), str(path), CheckpointError)
    if not isinstance(document, dict):
        raise CheckpointError.one(
            "expected a JSON object", "not_a_mapping", source=path, input=type(document).__name__
        )
    return document
