"""The worker's data path: the layout's parameter servers, a client for each, and what moves
between them and the model replica (pull, push-pull, installing the answers), fanned out on one
thread per server. Knows nothing of leases, retries or the coordinator beyond a layout source."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from lepton.clients import LayoutInfo, MemberId, ParameterClient, PushReply, ServerInfo
from lepton.errors import InvalidArgument
from lepton.tensors import part, payload_bytes, rows_in, sparse_part
from worker.compression import Compressed, ErrorFeedback

T = TypeVar("T")


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ServerSet:
    """The parameter servers of the job's layout, as one worker reads and writes them.

    Args:
        tensors: the replica's live tensors by name (``lepton.workloads.model_tensors``); pulled
            values are written into them, whole, as row slices, or as selected rows.
        layouts: returns the current layout (the coordinator's GetLayout); called on first use
            and whenever ``announced()`` is above the version in hand.
        member: returns the worker's identity on the servers (it changes on re-registration).
        connect: builds a ParameterClient for an address.
        announced: the newest layout version the worker has heard of (its heartbeats').
        compression: compresses each server's share of a push, with error feedback
            (worker/compression.py); None: gradients travel raw.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        layouts: Callable[[], LayoutInfo],
        member: Callable[[], MemberId | None],
        *,
        connect: Callable[[str], ParameterClient] = ParameterClient,
        announced: Callable[[], int] = lambda: 0,
        compression: ErrorFeedback | None = None,
    ) -> None:
        self.tensors = tensors
        self._layouts = layouts
        self._member = member
        self._connect = connect
        self._announced = announced
        self._layout: LayoutInfo | None = None
        self._clients: dict[str, ParameterClient] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.versions: dict[str, int] = {}  # server id -> the version of its last answer
        self.fresh = False  # the replica's dense tensors are what the servers last answered
        self.bytes_pushed = 0  # data bytes of pushes as sent (encoded, with compression)
        self.bytes_pulled = 0
        self.compression = compression
        # the encoded shares of the request id in hand, by (layout version, server id): a retry
        # re-sends these bytes, and their residuals are committed when a server applies them
        self._compressed: tuple[str, dict[tuple[int, str], Compressed]] = ("", {})

    # --- the layout ------------------------------------------------------------------------------

    def ensure_layout(self) -> LayoutInfo:
        """The layout in hand, re-read when a newer one was announced (the replica is then stale)."""
        if self._layout is None or self._announced() > self._layout.version:
            layout = self._layouts()
            for server in layout.servers:
                if server.address not in self._clients:
                    self._clients[server.address] = self._connect(server.address)
            self._layout = layout
            self.fresh = False
            if self._pool is None:
                workers = max(1, len(layout.servers))
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ps")
        return self._layout

    def fan_out(self, fn: Callable[[ServerInfo, ParameterClient], T]) -> list[T]:
        """``fn(server, its client)`` for every server of the layout at once, in layout order; the
        first error raised is raised here once all calls have ended."""
        layout = self.ensure_layout()
        assert self._pool is not None
        futures = [self._pool.submit(fn, server, self._clients[server.address]) for server in layout.servers]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()

    # --- pull, push-pull -------------------------------------------------------------------------

    @property
    def member(self) -> MemberId | None:
        return self._member()

    def _identity(self) -> MemberId:
        member = self._member()
        assert member is not None, "not registered"
        return member

    def pull_all(self) -> None:
        """Every tensor of every server, whole, into the replica."""
        member = self._identity()

        def pull(server: ServerInfo, client: ParameterClient):
            return server.member_id, client.pull(member)

        for server_id, (version, tensors) in self.fan_out(pull):
            self._received(server_id, version, tensors)
        self.fresh = True

    def pull_rows(self, touched: Mapping[str, torch.Tensor]) -> None:
        """Before a batch of a model with sparse tensors: of each sparse tensor, the rows the batch
        reads (``touched``: whole tensor name -> sorted row indices) and, when the replica is not
        fresh, the dense tensors too; one Pull per server that holds any of them."""
        member = self._identity()
        fresh = self.fresh

        def pull(server: ServerInfo, client: ParameterClient):
            rows = {t.name: rows_in(t, touched[t.of]) for t in server.tensors if t.sparse}
            names = [] if fresh else [t.name for t in server.tensors if not t.sparse]
            if not names and not any(r.numel() for r in rows.values()):
                return server.member_id, None, {}, rows
            rows = {n: r for n, r in rows.items() if r.numel()}
            version, tensors = client.pull(member, names, rows)
            return server.member_id, version, tensors, rows

        for server_id, version, tensors, rows in self.fan_out(pull):
            if version is not None:
                self._received(server_id, version, tensors, rows)
        self.fresh = True

    def push_pull(
        self, samples: int, grads: Mapping[str, torch.Tensor], request_id: str, timeout_s: float | None = None
    ) -> dict[str, PushReply]:
        """Pushes each server its share of ``grads`` (by whole tensor name) as of the version it
        last answered, and installs what each answers; returns each server's reply, by id. Row
        slices are views; a row-sparse gradient travels as the rows its slice holds; a tensor
        without a gradient (or an unchanged buffer) is left out. With compression, each share is
        encoded once per ``request_id`` (a retry re-sends those bytes) and its residuals are
        committed when that server answers APPLIED."""
        layout = self.ensure_layout()
        futures = [self.push_to(server, samples, grads, request_id, timeout_s) for server in layout.servers]
        return self.settle(futures)

    def push_to(
        self,
        server: ServerInfo,
        samples: int,
        grads: Mapping[str, torch.Tensor],
        request_id: str,
        timeout_s: float | None = None,
    ) -> Future:
        """Starts the push-pull of ``server``'s share of ``grads`` on its thread; ``settle`` takes
        the returned future (worker/overlap.py starts each server's as backward finishes its share)."""
        member = self._identity()
        layout_version = self.ensure_layout().version
        client = self._clients[server.address]
        base_version = self.versions.get(server.member_id, 0)
        if self._compressed[0] != request_id:  # a new push: what an earlier one left is settled
            self._compressed = (request_id, {})
        encoded = self._compressed[1]

        def push():
            share = {
                t.name: (t, sparse_part(grads[t.of], t) if t.sparse else part(grads, t))
                for t in server.tensors
                if t.of in grads
            }
            rows = {n: g.indices()[0] for n, (_, g) in share.items() if g.is_sparse}  # what comes back
            sent: Compressed | None = None
            if self.compression is not None:
                key = (layout_version, server.member_id)
                sent = encoded.get(key)
                if sent is None:
                    sent = encoded[key] = self.compression.compress(share)
                wire = sent.tensors
            else:
                wire = {n: g for n, (_, g) in share.items()}
            size = sum(payload_bytes(g) if isinstance(g, torch.Tensor) else g.nbytes for g in wire.values())
            reply, version, tensors = client.push_pull(
                member, base_version, samples, wire, timeout_s=timeout_s, request_id=request_id,
            )
            return server.member_id, reply, version, tensors, rows, sent, size

        assert self._pool is not None, "no layout yet"
        return self._pool.submit(push)

    def settle(self, futures: list[Future]) -> dict[str, PushReply]:
        """Waits for every push-pull ``push_to`` started, then installs what each server answered
        and returns each reply, by id. If any failed, the first error (in the order given) is
        raised and nothing is installed: a retry with the same request id pushes again."""
        wait(futures)
        answers = [f.result() for f in futures]
        replies = {}
        for server_id, reply, version, tensors, rows, sent, size in answers:
            self.bytes_pushed += size
            self._received(server_id, version, tensors, rows)
            replies[server_id] = reply
            if sent is not None and reply.applied and self.compression is not None:
                self.compression.commit(sent)
                sent.residuals.clear()  # committed once, even if this request id is pushed again
        return replies

    def server_versions(self) -> dict[str, int]:
        """Each server's current version (GetServerStatus), by id."""
        return dict(self.fan_out(lambda server, client: (server.member_id, client.server_status().version)))

    # --- installing ------------------------------------------------------------------------------

    def _received(
        self,
        server_id: str,
        version: int,
        tensors: dict[str, torch.Tensor],
        rows: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.bytes_pulled += _nbytes(tensors)
        self.install(server_id, tensors, rows)
        self.versions[server_id] = version

    def install(
        self, server_id: str, tensors: dict[str, torch.Tensor], rows: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Puts what a server sent into the replica: whole tensors, slices into their rows, and
        selected rows of sparse tensors (``rows``: the indices within each tensor, as requested).
        Raises InvalidArgument, installing nothing, for a tensor the layout does not place there
        or a row count that is not the one asked for."""
        layout = self._layout
        assert layout is not None, "no layout yet"
        specs = {t.name: t for s in layout.servers if s.member_id == server_id for t in s.tensors}
        unexpected = sorted(set(tensors) - set(specs))
        if unexpected:
            raise InvalidArgument(
                f"parameter server {server_id} sent {unexpected[:4]}, which layout "
                f"{layout.version} does not place there"
            )
        rows = rows or {}
        for name in [n for n in tensors if n in rows]:
            if tensors[name].shape[0] != rows[name].numel():
                raise InvalidArgument(
                    f"parameter server {server_id} sent {tensors[name].shape[0]} rows of {name}, "
                    f"not {rows[name].numel()}"
                )
        with torch.no_grad():
            for name, values in tensors.items():
                spec = specs[name]
                if name in rows:
                    target = self.tensors[spec.of]  # on the worker's device: index and values go there
                    target.index_copy_(0, (rows[name] + spec.row_offset).to(target.device), values.to(target.device))
                else:
                    part(self.tensors, spec).copy_(values)
