"""Shared-memory sessions of a parameter server: one per co-located worker, a segment each way
(gradients in, parameters out; ``lepton.shm``), and the push-pull that runs through them.

A step reads the worker's gradients in place (views of the mapping), runs the server's own
``push_pull`` (the same gate, request ids and outcomes as over gRPC) and writes the pull half
into the parameters segment under the gate's lock. Nothing is read from a segment before the
session, the member and the nonce check out. Sessions end with their member (fenced, gone from
the roster, another Open), on ``close`` and on ``close_all`` (server exit). Nothing here knows
about gRPC.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from lepton import shm
from lepton.errors import FailedPrecondition, Fenced, InvalidArgument, NotFound, ResourceExhausted
from ps_server.gate import PushResult
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry

log = structlog.get_logger("lepton.ps.shm")


@dataclass(frozen=True)
class SessionInfo:
    """What a worker needs to map a session: its id, the two segment names, their size and where
    each tensor lies (the same placement in both)."""

    session_id: str
    gradients_segment: str
    parameters_segment: str
    segment_bytes: int
    tensors: tuple[shm.Placement, ...]


class _Session:
    def __init__(
        self, session_id: str, member_id: str, incarnation: int, grads: shm.Segment, params: shm.Segment,
        placements: list[shm.Placement],
    ) -> None:
        self.session_id = session_id
        self.member_id = member_id
        self.incarnation = incarnation
        self.grads = grads
        self.params = params
        self.placements = placements
        self.nonce = grads.nonce + params.nonce
        self.grad_views = grads.views(placements)
        self.param_views = dict(zip((p.name for p in placements), params.views(placements), strict=True))
        self.confirmed = False
        self.busy = False

    def info(self) -> SessionInfo:
        return SessionInfo(self.session_id, self.grads.name, self.params.name, self.grads.size, tuple(self.placements))

    def end(self) -> None:
        for seg in (self.grads, self.params):
            seg.unlink()
            seg.close()


class SharedMemorySessions:
    """The shared-memory sessions of one ParameterServer. Thread-safe.

    Args:
        server: the server whose push-pull the sessions run (they end with its roster's members).
        enabled: False refuses every Open (FailedPrecondition), as ``--no-shm`` asks.
        directory: where segments are created (/dev/shm).

    Raises FailedPrecondition/NotFound/InvalidArgument/ResourceExhausted as OpenSharedMemory and
    PushPullShared document, and whatever the server's push_pull raises.
    """

    def __init__(self, server: ParameterServer, enabled: bool = True, directory: Path = shm.SHM_DIR) -> None:
        self._server = server
        self.enabled = enabled
        self._directory = directory
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        server.roster_listeners.append(self.retain)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, member_id: str, incarnation: int) -> SessionInfo:
        """A new session for the worker, ending its older one."""
        if not self.enabled:
            raise FailedPrecondition("shared memory: turned off on this parameter server (--no-shm)")
        self._server.authorise(member_id, incarnation)
        store = self._server.gate.store
        specs = store.specs
        if store.sparse:
            raise FailedPrecondition(
                f"shared memory: this server holds row-sparse tensors {sorted(store.sparse)[:3]}; use PushPull"
            )
        placements, size = shm.place((n, specs[n].dtype, specs[n].shape) for n in store.names if specs[n].pushed)
        segments: list[shm.Segment] = []
        try:
            for kind in ("g", "p"):
                segments.append(shm.Segment.create(shm.new_name(kind), size, self._directory))
        except shm.SegmentError as exc:
            for seg in segments:
                seg.unlink()
                seg.close()
            raise ResourceExhausted(f"shared memory: {exc.strerror or exc}; use PushPull") from None
        session = _Session(secrets.token_hex(16), member_id, incarnation, segments[0], segments[1], placements)
        with self._lock:
            older = [s for s in self._sessions.values() if s.member_id == member_id]
            for s in older:
                del self._sessions[s.session_id]
            self._sessions[session.session_id] = session
        for s in older:
            s.end()
        log.info("shm_session_opened", member=member_id, session=session.session_id, segment_bytes=size)
        return session.info()

    def push_pull(
        self,
        session_id: str,
        nonce: bytes,
        member_id: str,
        incarnation: int,
        base_version: int,
        sample_count: int,
        indices: Sequence[int],
        said: int,
        timeout_s: float,
        request_id: str = "",
    ) -> tuple[PushResult, int]:
        """The gradients at ``indices`` of the session's placements, pushed; every tensor of the
        session written to the parameters segment as of the returned version (the second item).
        ``said``: the header's tensor count (0: not said)."""
        session = self._claim(session_id, nonce, member_id, incarnation, indices, said)
        try:
            grads = {session.placements[i].name: session.grad_views[i] for i in indices}
            views = session.param_views

            def write(version: int, tensors: list[tuple[str, torch.Tensor]], result: PushResult | None) -> None:
                for name, t in tensors:
                    views[name].copy_(t)

            result, version, _ = self._server.push_pull(
                member_id, incarnation, base_version, sample_count, grads, timeout_s, request_id, pack=write
            )
            return result, version
        except Fenced:
            self.close(session_id)
            raise
        finally:
            session.busy = False

    def _claim(
        self, session_id: str, nonce: bytes, member_id: str, incarnation: int, indices: Sequence[int], said: int
    ) -> _Session:
        """The session, checked and marked busy; confirmed (names unlinked) at its first good nonce."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or (session.member_id, session.incarnation) != (member_id, incarnation):
                raise NotFound(
                    f"shared memory: no session {session_id!r} for {member_id}/{incarnation} (it ended); open another"
                )
            if not hmac.compare_digest(bytes(nonce), session.nonce):
                raise FailedPrecondition(
                    "shared memory: the nonce does not match the segments': this worker does not share the "
                    "server's /dev/shm; use PushPull"
                )
            n = len(session.placements)
            bad = [i for i in indices if not 0 <= i < n]
            if bad or len(set(indices)) != len(indices) or (said and said != len(indices)):
                self._server.note_rejected()
                raise InvalidArgument(
                    f"shared memory: tensor indices must be distinct, in [0, {n}) and as many as header.tensors "
                    f"({said}); got {list(indices)[:8]}"
                )
            if session.busy:
                raise FailedPrecondition("shared memory: a call is already in flight on this session")
            session.busy = True
            first = not session.confirmed
            session.confirmed = True
        if first:  # both processes hold their mappings: the names are no longer needed
            session.grads.unlink()
            session.params.unlink()
        return session

    def close(self, session_id: str) -> None:
        """Ends a session (unknown: nothing to do)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.end()
            log.info("shm_session_closed", member=session.member_id, session=session_id)

    def close_member(self, member_id: str, incarnation: int, session_id: str) -> None:
        """Ends ``session_id`` if it is ``member_id``'s (CloseSharedMemory). Raises NotFound/Fenced
        for a stranger or a fenced member (whose sessions ended with it)."""
        self._server.authorise(member_id, incarnation)
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.member_id != member_id:
                return
        self.close(session_id)

    def retain(self, entries: Iterable[WorkerEntry]) -> None:
        """Ends the sessions of members that are no longer live workers at their incarnation."""
        live = {(e.member_id, e.incarnation) for e in entries if e.alive}
        with self._lock:
            gone = [s.session_id for s in self._sessions.values() if (s.member_id, s.incarnation) not in live]
        for session_id in gone:
            self.close(session_id)

    def close_all(self) -> None:
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            self.close(session_id)
