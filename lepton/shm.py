"""Named shared-memory segments of the data plane's shared-memory path (ParameterServer's
OpenSharedMemory, see protos/lepton/v1/parameter_server.proto).

A segment is a file in ``/dev/shm`` (POSIX shared memory), created 0600 by a parameter server,
mapped by the server and by one worker on the same host. It starts with a 64-byte head (the magic
``LEPTSHM1`` and a random 16-byte nonce); tensors follow at 64-byte aligned offsets, read and
written in place through ``torch.frombuffer`` views of the mapping. Names carry the creating
process's pid, so a server that starts can remove what a killed one left (``sweep``).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
HEAD_BYTES = 64
MAGIC = b"LEPTSHM1"
NONCE_BYTES = 16
ALIGN_BYTES = 64
PREFIX = "lepton-ps-"
_NAME = re.compile(r"^lepton-ps-(\d+)-[0-9a-f]{16}-[gp]$")


class SegmentError(OSError):
    """A segment cannot be created or attached (no /dev/shm, no room, not the expected one)."""


@dataclass(frozen=True)
class Placement:
    """Where one tensor lies in a segment."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset_bytes: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def place(tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[Placement], int]:
    """Placements of ``tensors`` (name, dtype, shape) after the head, each 64-byte aligned, and the
    segment size that holds them all."""
    out = []
    offset = HEAD_BYTES
    for name, dtype, shape in tensors:
        p = Placement(name, dtype, tuple(shape), offset)
        out.append(p)
        offset += -(-p.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return out, offset


def new_name(kind: str, pid: int | None = None) -> str:
    """A fresh segment name of this process (``kind``: "g" gradients, "p" parameters)."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(8)}-{kind}"


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


class Segment:
    """One mapped segment. ``create`` makes it (0600, space reserved, nonce written), ``attach``
    maps an existing one after checking its size and head. Views stay valid after ``close``
    (the mapping lives until the last view is gone)."""

    def __init__(self, path: Path, mapping: mmap.mmap, size: int) -> None:
        self.path = path
        self.size = size
        self._map = mapping

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, name: str, size: int, directory: Path = SHM_DIR) -> Segment:
        """Raises SegmentError when the directory is missing or has no room for ``size`` bytes
        (the space is reserved now, so a later write cannot fault on a full /dev/shm)."""
        if not valid_name(name):
            raise SegmentError(errno.EINVAL, f"not a segment name: {name!r}")
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise SegmentError(exc.errno, f"cannot create {path}: {exc.strerror}") from None
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise SegmentError(exc.errno, f"no room for {size} bytes in {directory}: {exc.strerror}") from None
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        mapping[: len(MAGIC)] = MAGIC
        mapping[len(MAGIC) : len(MAGIC) + NONCE_BYTES] = secrets.token_bytes(NONCE_BYTES)
        return cls(path, mapping, size)

    @classmethod
    def attach(cls, name: str, size: int, directory: Path = SHM_DIR) -> Segment:
        """Raises SegmentError when there is no such segment here (another host or container),
        it is not a regular file of ``size`` bytes, or its head is not a segment's."""
        if not valid_name(name):
            raise SegmentError(errno.EINVAL, f"not a segment name: {name!r}")
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise SegmentError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000 and st.st_size == size):
                raise SegmentError(errno.EINVAL, f"{path} is not a {size}-byte segment")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if mapping[: len(MAGIC)] != MAGIC:
            mapping.close()
            raise SegmentError(errno.EINVAL, f"{path} does not start with a segment head")
        return cls(path, mapping, size)

    @property
    def nonce(self) -> bytes:
        return bytes(self._map[len(MAGIC) : len(MAGIC) + NONCE_BYTES])

    def views(self, placements: Sequence[Placement]) -> list[torch.Tensor]:
        """A tensor over each placement's bytes of the mapping (no copy; writes go to the segment)."""
        out = []
        for p in placements:
            if p.offset_bytes < HEAD_BYTES or p.offset_bytes + p.nbytes > self.size:
                raise SegmentError(errno.EINVAL, f"{p.name} does not fit in {self.name}")
            numel = p.nbytes // max(1, torch.empty((), dtype=p.dtype).element_size())
            if numel == 0:
                out.append(torch.empty(p.shape, dtype=p.dtype))
                continue
            flat = torch.frombuffer(self._map, dtype=p.dtype, count=numel, offset=p.offset_bytes)
            out.append(flat.view(p.shape))
        return out

    def unlink(self) -> None:
        """Removes the name; both mappings live on."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmaps, unless views are still alive (then the mapping goes with the last of them)."""
        try:
            self._map.close()
        except BufferError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(directory: Path = SHM_DIR) -> list[str]:
    """Removes the segments whose creating process is gone (a server that was killed); returns
    their names. Missing directory: nothing to do."""
    removed: list[str] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _NAME.match(entry.name)
        if m and not _alive(int(m.group(1))):
            try:
                entry.unlink()
            except OSError:
                continue
            removed.append(entry.name)
    return removed


def ours(directory: Path = SHM_DIR, pid: int | None = None) -> list[str]:
    """Names of segments a process (this one by default) created that still exist."""
    prefix = f"{PREFIX}{os.getpid() if pid is None else pid}-"
    try:
        return sorted(e.name for e in directory.iterdir() if e.name.startswith(prefix))
    except OSError:
        return []
