"""File-system steps every reader and writer shares: reading with a clear error, and publishing a
file or a folder so that a crash never leaves half of it behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from bioconf.errors import BioconfError, ConfigReadError, OutputExistsError


def read_bytes(path: str | os.PathLike[str], error: type[BioconfError] = ConfigReadError) -> bytes:
    """The file's bytes; a file that cannot be read raises ``error`` naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as failure:
        raise error.one(f"cannot read file: {failure.strerror}", "read_error", source=path) from None


def refuse_existing(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise OutputExistsError when ``path`` exists and replacing it was not asked for."""
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError.one(
            "already exists; pass overwrite=True (--overwrite) to replace it", "output_exists", source=path
        )


def write_synced(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` and fsync it: a later rename then publishes bytes that are on disk."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    crash never leaves a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write_synced(tmp, data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (a folder's entry list is what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file under ``path`` and the folders themselves."""
    for folder, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def replace_directory(staging: Path, target: Path) -> None:
    """Publish the fully written folder ``staging`` as ``target`` by renames. An old ``target`` is
    renamed aside first and deleted last (and put back if the second rename fails): a reader sees
    the old folder, for an instant none, or the new one, never a mix."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    fsync_path(target.parent)
