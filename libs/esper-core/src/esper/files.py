"""Replacing a file so that a crash leaves the old one or the new one, never half of either.

Every file Esper keeps (checkpoints, kernel blobs, registry entries, job reports) is written the
same way: to a temp file in the target's directory (a rename is atomic only within one file
system), flushed to disk, renamed over the target, and then the directory itself flushed, since
until its entry is on disk the rename can still be lost in a power cut.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"

Writer = Callable[[BinaryIO], object]


def atomic_write(
    path: str | os.PathLike[str], data: bytes | Writer, *, temp_prefix: str | None = None
) -> None:
    """Write `data` to `path` durably. `data` may be a function that writes into the open file,
    so a large object (a checkpoint) is streamed, not first built in memory.

    The temp file is `<temp_prefix><random>.tmp` beside `path` (default prefix `.<name>.`), so a
    store can find and remove what a crashed write left behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = temp_prefix if temp_prefix is not None else f".{target.name}."
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename, a new file) to disk, where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a directory: there the rename is as durable as it gets
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
