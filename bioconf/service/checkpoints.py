"""Which checkpoint paths a request may name: only folders under the configured checkpoint roots.

A path is refused (403) when it has a ``..`` component, when it is absolute and lies outside every
root, or when a symlink anywhere on the way (the folder, a parent, ``context/io.json`` itself)
leads out of its root. A relative path is looked up under each root in order. Containment is
checked on real paths (``os.path.realpath``), and the real folder is what gets read, so a symlink
swapped in after the check can only point inside the root it was checked against (or the read
fails). Plain functions of paths: nothing here imports FastAPI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bioconf.errors import CheckpointForbiddenError, CheckpointNotFoundError, UsageError


def _forbidden(message: str, requested: str) -> CheckpointForbiddenError:
    return CheckpointForbiddenError.one(message, "forbidden_checkpoint", input=requested)


@dataclass(frozen=True)
class CheckpointRoot:
    """A configured root: as given (absolute) and its real path, both accepted as a prefix."""

    given: Path
    real: Path

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> CheckpointRoot:
        given = Path(os.path.abspath(path))
        real = Path(os.path.realpath(given))
        if not real.is_dir():
            raise UsageError.one("a checkpoint root must be a folder", "not_a_folder", source=os.fspath(path))
        return cls(given, real)


def locate_checkpoint(requested: str, roots: Sequence[CheckpointRoot]) -> Path:
    """The real folder of the checkpoint ``requested`` names, checked to lie under a root.

    Raises CheckpointForbiddenError for a path outside the roots (or no roots at all),
    CheckpointNotFoundError for a path inside a root where no checkpoint (``context/io.json``) is.
    """
    if not roots:
        raise _forbidden("this service reads no checkpoints (started without --checkpoint-root)", requested)
    if not requested or "\x00" in requested:
        raise _forbidden("a checkpoint path must be a non-empty path without NUL bytes", requested)
    pure = PurePosixPath(requested)
    if ".." in pure.parts:
        raise _forbidden("'..' is not allowed in a checkpoint path", requested)
    if pure.is_absolute():
        candidates = [(root, Path(pure)) for root in roots if _within(Path(pure), root.given, root.real)]
        if not candidates:
            raise _forbidden(f"{requested} is not under a checkpoint root of this service", requested)
        candidates = candidates[:1]
    else:
        candidates = [(root, root.real / pure) for root in roots]
    for root, candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not _within(real, root.real):
            raise _forbidden(f"{requested} leads out of its checkpoint root (a symlink)", requested)
        io_json = real / "context" / "io.json"
        if not io_json.is_file():
            continue
        if not _within(Path(os.path.realpath(io_json)), root.real):
            raise _forbidden(f"{requested}: context/io.json leads out of its checkpoint root", requested)
        return real
    raise CheckpointNotFoundError.one(
        "no checkpoint there (no folder with a context/io.json)", "missing_context", input=requested
    )


def _within(path: Path, *roots: Path) -> bool:
    return any(path.is_relative_to(root) for root in roots)
