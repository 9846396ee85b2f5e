"""Durable files: write to a temporary file beside the target, fsync, rename over the target,
fsync the directory. A crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from lepton.errors import ConfigError


def write_atomically(final: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
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


PROBE_NAME = ".lepton-write-probe"


def check_state_dir(directory: str | Path) -> Path:
    """Makes sure ``directory`` can hold durable state before a role registers or serves: creates
    it if missing, then writes, fsyncs and removes a probe file in it.

    Returns the directory. Raises ConfigError naming the path when it is a regular file (or lies
    under one), cannot be created, or refuses a write or an fsync (read-only, full, over a size
    limit): a role that cannot keep its state must not join a job it would later fail.
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"state directory {path} is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"state directory {path} cannot be created: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"state directory {path} is not a directory")
    probe = path / f"{PROBE_NAME}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"lepton")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the write already failed; this is the error worth reporting
        raise ConfigError(f"state directory {path} is not writable: {exc.strerror or exc}") from None
    try:
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"state directory {path} does not let files be removed: {exc.strerror or exc}") from None
    return path

