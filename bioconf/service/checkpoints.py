"""Which checkpoints a request may read, and reading them without ever leaving the roots.

A root is opened once, when the service starts (its worker processes inherit the descriptor); a
checkpoint is then reached from that descriptor one directory at a time, each step relative to the
descriptor of the step before, and its ``context/io.json`` is read through the descriptor that was
checked. Nothing is looked up by name after it was checked, so a folder swapped for a symlink
between a check and a read (the race a ``realpath`` check followed by an ``open`` by name loses)
cannot lead anywhere else: the request reads what it checked, or sees the symlink and is refused.

Symlinks inside a root are followed while they stay inside it: a relative one as the kernel's
``RESOLVE_BENEATH`` does (``..`` may not climb above the root), an absolute one when its target lies
under the root as configured or as its real path (it is then walked from the root's descriptor, not
by name). A symlink that leads anywhere else is refused (403), as is a ``..`` in the requested path.
Where the kernel has ``openat2`` (Linux 5.6+), one call with ``RESOLVE_BENEATH`` opens the file and
the kernel enforces the confinement; when it refuses (an absolute symlink, an escape, or no
``openat2`` at all) the same walk is done here, component by component with ``O_NOFOLLOW``, and
says why. Both read only what lay beneath the root at the moment of each step; a folder *moved*
out of the root (a rename, which needs write access to both places) while a lookup is inside it
is read on, as ``RESOLVE_BENEATH`` does: it was under the root when the lookup entered it.

Plain functions of paths and descriptors: nothing here imports FastAPI.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bioconf.checkpoint.layout import CONTEXT_DIR, IO_JSON, WEIGHTS_DIR, CheckpointPaths
from bioconf.errors import (
    CheckpointError,
    CheckpointForbiddenError,
    CheckpointNotFoundError,
    UsageError,
)
from bioconf.fs import read_fd

MAX_PATH_BYTES = 4096
"""Linux's PATH_MAX: a longer checkpoint path cannot name anything (400, not an OSError)."""
MAX_SYMLINKS = 40
"""Symlinks followed in one lookup, as the kernel's limit (a loop ends as 404)."""

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
# O_NONBLOCK: a FIFO named io.json does not hang the open; read_fd then refuses what is not a file.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC


def _forbidden(message: str, requested: str) -> CheckpointForbiddenError:
    return CheckpointForbiddenError.one(message, "forbidden_checkpoint", input=requested)


@dataclass(frozen=True)
class CheckpointRoot:
    """A configured root: as given (absolute) and its real path, both accepted as a prefix of an
    absolute checkpoint path, and the descriptor every lookup under it starts from (closed when the
    root is garbage-collected)."""

    given: Path
    real: Path
    fd: int = field(compare=False, repr=False)

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> CheckpointRoot:
        given = Path(os.path.abspath(path))
        real = Path(os.path.realpath(given))
        try:
            fd = os.open(real, _DIR_FLAGS)
        except OSError as error:
            raise UsageError.one(
                f"a checkpoint root must be a folder ({error.strerror})",
                "not_a_folder",
                source=os.fspath(path),
            ) from None
        root = cls(given, real, fd)
        weakref.finalize(root, os.close, fd)
        return root


def read_checkpoint_bytes(
    requested: str, roots: Sequence[CheckpointRoot], limit: int
) -> tuple[bytes, CheckpointPaths]:
    """The bytes of the ``context/io.json`` of the checkpoint folder ``requested`` names (at most
    ``limit`` of them), read beneath its root, and the paths that name it (under the root as
    configured, as requested: not where a symlink inside the root led).

    A relative path is looked up under each root in order; an absolute one under the root it lies
    in. Raises CheckpointForbiddenError (403) for a path outside the roots, a symlink out of one or a
    file the service may not read; CheckpointNotFoundError (404) where no checkpoint is; UsageError
    (400) for a path no file system can hold; CheckpointError (422) for an io.json that cannot be
    read. Never an OSError.
    """
    candidates = _candidates(requested, roots)
    for root, parts in candidates:
        fd = _open_io_json(root, parts, requested)
        if fd is None:
            continue
        named = root.given.joinpath(*parts)
        paths = CheckpointPaths(named, named / CONTEXT_DIR / IO_JSON, named / WEIGHTS_DIR)
        try:
            return read_fd(fd, paths.io_json, CheckpointError, limit), paths
        finally:
            os.close(fd)
    raise CheckpointNotFoundError.one(
        "no checkpoint there (no folder with a context/io.json)", "missing_context", input=requested
    )


def _candidates(
    requested: str, roots: Sequence[CheckpointRoot]
) -> list[tuple[CheckpointRoot, tuple[str, ...]]]:
    """Each root to look in, with the path's components below it; the refusals that need no lookup."""
    if not roots:
        raise _forbidden("this service reads no checkpoints (started without --checkpoint-root)", requested)
    if not requested or "\x00" in requested:
        raise _forbidden("a checkpoint path must be a non-empty path without NUL bytes", requested)
    try:
        size = len(requested.encode("utf-8"))
    except UnicodeError:  # a lone surrogate: no file name, and no JSON string either
        raise UsageError.one(
            "a checkpoint path must be valid Unicode text (no lone surrogates)",
            "invalid_checkpoint_path",
            input=requested.encode("utf-8", "backslashreplace").decode(),
        ) from None
    if size > MAX_PATH_BYTES:
        raise UsageError.one(
            f"a checkpoint path is at most {MAX_PATH_BYTES} bytes ({size})", "invalid_checkpoint_path"
        )
    pure = PurePosixPath(requested)
    if ".." in pure.parts:
        raise _forbidden("'..' is not allowed in a checkpoint path", requested)
    if not pure.is_absolute():
        return [(root, pure.parts) for root in roots]
    for root in roots:
        for prefix in (root.given, root.real):
            if pure.is_relative_to(prefix):
                return [(root, pure.relative_to(prefix).parts)]
    raise _forbidden(f"{requested} is not under a checkpoint root of this service", requested)


def _open_io_json(root: CheckpointRoot, parts: tuple[str, ...], requested: str) -> int | None:
    """A descriptor of the regular file ``PARTS/context/io.json`` beneath ``root``, or None when
    there is none; every other outcome is a BioconfError."""
    names = (*parts, CONTEXT_DIR, IO_JSON)
    try:
        fd = _openat2_beneath(root.fd, "/".join(names))
        if fd is None:  # refused (or no openat2): walk, to follow what may be followed and say why
            fd = _walk(root, names)
    except _Escape as escape:
        raise _forbidden(f"{requested} leads out of its checkpoint root ({escape})", requested) from None
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        if error.errno in (errno.EACCES, errno.EPERM):
            raise _forbidden(
                f"{requested}: the service may not read it ({error.strerror})", requested
            ) from None
        if error.errno == errno.ENAMETOOLONG:
            raise UsageError.one(
                "a name in the checkpoint path is too long", "invalid_checkpoint_path", input=requested
            ) from None
        raise CheckpointError.one(
            f"cannot read the checkpoint: {error.strerror}", "read_error", input=requested
        ) from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:  # a folder or a FIFO named io.json is no checkpoint
        os.close(fd)
        return None
    return fd


class _Escape(Exception):
    """A symlink (or a ``..`` in one) that leads out of the root."""


def _walk(root: CheckpointRoot, names: Sequence[str]) -> int:
    """Open ``names`` beneath ``root`` one component at a time, each relative to the descriptor of
    the folder before it and with ``O_NOFOLLOW``, following symlinks here, by the rules of the module
    docstring. Raises _Escape for a way out of the root, OSError for anything else."""
    opened: list[int] = []  # the folders walked below the root, innermost last
    pending = list(reversed(names))  # what is left to walk, the next component last
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":  # only from a symlink's target: the folder the walk came from
                if not opened:
                    raise _Escape("a symlink climbs above the root")
                os.close(opened.pop())
                continue
            here = opened[-1] if opened else root.fd
            last = not pending
            try:
                fd = os.open(name, (_FILE_FLAGS if last else _DIR_FLAGS) | _NOFOLLOW, dir_fd=here)
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):  # EMLINK: BSD's ELOOP
                    raise
                failure = error.errno
            else:
                opened.append(fd)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = _link_target(name, here)
            if target is None:  # not a symlink: a file where a folder should be, or swapped back since
                if failure == errno.ENOTDIR and not _is_dir(name, here):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                pending.append(name)  # it changed since the open: look again (within MAX_SYMLINKS)
                continue
            if target.startswith("/"):
                parts = _below_root(target, root)
                for fd in opened:
                    os.close(fd)
                opened.clear()
            else:
                parts = PurePosixPath(target).parts
            pending.extend(reversed(parts))
        if not opened:  # the walk ended at the root itself: no file there
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return opened.pop()
    finally:
        for fd in opened:
            os.close(fd)


def _link_target(name: str, dir_fd: int) -> str | None:
    """What the symlink ``name`` in ``dir_fd`` points to, or None when it is not a symlink (now)."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return None
        raise


def _is_dir(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _below_root(target: str, root: CheckpointRoot) -> tuple[str, ...]:
    """The components of the absolute symlink target ``target`` below ``root``, as configured or
    real; _Escape when it lies under neither."""
    pure = PurePosixPath(target)
    for prefix in (root.given, root.real):
        if pure.is_relative_to(prefix):
            return pure.relative_to(prefix).parts
    raise _Escape(f"a symlink to {target}")


# ---- openat2 ------------------------------------------------------------------------------------------

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_OPENAT2_NUMBER = {"x86_64": 437, "aarch64": 437}.get(platform.machine()) if sys.platform == "linux" else None


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Openat2:
    """``openat2(dir_fd, path, {flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS})`` through libc's
    ``syscall``; switched off for good the first time the kernel (or a seccomp filter) does not know it."""

    def __init__(self) -> None:
        self.enabled = _OPENAT2_NUMBER is not None
        if self.enabled:
            self._syscall = ctypes.CDLL(None, use_errno=True).syscall
            self._syscall.restype = ctypes.c_long

    def __call__(self, dir_fd: int, path: str) -> int | None:
        """The descriptor, or None when the kernel refused (the walk then says why)."""
        if not self.enabled:
            return None
        how = _OpenHow(_FILE_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        fd = self._syscall(
            ctypes.c_long(_OPENAT2_NUMBER),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return fd
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # an old kernel, a seccomp filter
            self.enabled = False
        return None


_openat2_beneath = _Openat2()
