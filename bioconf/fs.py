"""File-system steps every reader and writer shares: reading with a clear error, and publishing a
file or a folder so that a crash never leaves half of it behind."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

from bioconf.errors import BioconfError, ConfigReadError, OutputExistsError

READ_LIMIT = 64 << 20
"""The most bytes ``read_bytes`` reads from one file unless told otherwise (64 MiB): a config or a
checkpoint's metadata is far smaller, and a file that is not must not fill the memory."""


def read_bytes(
    path: str | os.PathLike[str], error: type[BioconfError] = ConfigReadError, limit: int = READ_LIMIT
) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them. Anything else raises
    ``error`` naming the file, in bounded time: a folder, a FIFO (opened without blocking), a
    device such as ``/dev/zero``, a file larger than ``limit``, an unreadable one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as failure:
        raise error.one(f"cannot read file: {failure.strerror}", "read_error", source=path) from None
    try:
        return read_fd(fd, path, error, limit)
    finally:
        os.close(fd)


def read_fd(
    fd: int,
    source: str | os.PathLike[str],
    error: type[BioconfError] = ConfigReadError,
    limit: int = READ_LIMIT,
) -> bytes:
    """``read_bytes`` of a file already opened (``source`` names it in errors)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error.one("not a regular file", "not_a_file", source=source)
        if info.st_size > limit:
            raise error.one(
                f"larger than {limit:,} bytes ({info.st_size:,})", "file_too_large", source=source
            )
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 24, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # it grew while being read
                raise error.one(f"larger than {limit:,} bytes", "file_too_large", source=source)
        return b"".join(chunks)
    except OSError as failure:
        raise error.one(f"cannot read file: {failure.strerror}", "read_error", source=source) from None


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
    if os.path.lexists(target):
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file or a link was in the way
            old.unlink()
    else:
        os.rename(staging, target)
    fsync_path(target.parent)
