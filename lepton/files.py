"""Durable files: write to a temporary file beside the target, fsync, rename over the target,
fsync the directory. A crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomically(final: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls ``write(f)`` on a binary file that becomes ``final`` only once complete and synced."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final
