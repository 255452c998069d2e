"""Writing files that a kill never leaves half-written, and that leave the page cache once on
disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` the file to a temporary name beside ``path``, push it to disk, then rename it
    into place: ``path`` is either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    flush_out_of_cache(tmp)
    os.replace(tmp, path)


def flush_out_of_cache(path: Path) -> None:
    """fsync ``path``, then drop its pages from the page cache. Written pages stay cached, and
    a memory cgroup charges them to the writer: a lazy run writes its whole model out (offload
    and checkpoints), and under a memory limit smaller than the model the cached copy alone
    would get it killed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # not on macOS or Windows
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
