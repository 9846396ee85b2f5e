"""Overlapping a worker's communication with its computation (docs/training.md, "Overlap").

*During backward*: a post-accumulate-grad hook on every trainable parameter counts, per parameter
server of the layout, the parameters whose gradients that server still waits for; when the count
reaches zero the server's push-pull starts on its thread (``ServerSet.push_to``) while backward
goes on for the rest. One push per server per step, as without overlap: a server applies one push
as one contribution to a step (an optimizer step in async, one participant's share in sync), so
its share cannot be cut into several buckets without changing what it computes. What the servers
answer is installed only after backward has ended and every push-pull is done (``InFlight.finish``).

*While a push-pull is in flight*: the next batch is loaded and collated on a background thread
(``prefetched``).

``blocker`` says, once per worker, why overlap would not be exact for a job; the worker then
pushes after backward as before.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, wait
from contextlib import contextmanager

import structlog
import torch
from torch import nn

from lepton.clients import PushReply, ServerInfo
from lepton.tensors import TensorKind
from worker.dataplane import ServerSet

log = structlog.get_logger("lepton.worker")
HOOKS_SUPPORTED = hasattr(torch.Tensor, "register_post_accumulate_grad_hook")  # torch >= 2.1


def blocker(
    *, accumulate: int, clip_grad_norm: float, precision: str, sparse: set[str] | frozenset[str], device: torch.device
) -> str | None:
    """Why pushing during backward would not push what the worker pushes after it, or None.

    Each of these changes gradients after backward, or needs all of them first: clipping (the
    global norm), fp16 loss scaling (one overflow skips the whole step), accumulation (only the
    last micro-batch's backward gives final gradients), row-sparse tables (their rows are chosen
    after backward). On a CUDA device the hooks would also need the gradient copied to host
    memory in order with the stream; that path is not built (nor measured) yet."""
    if not HOOKS_SUPPORTED:
        return f"torch {torch.__version__} has no post-accumulate-grad hooks (2.1 or later)"
    if accumulate > 1:
        return f"accumulate={accumulate}: gradients are final only after the last micro-batch"
    if clip_grad_norm > 0:
        return "clip_grad_norm > 0: clipping needs every gradient's norm first"
    if precision == "fp16":
        return "fp16 loss scaling: whether a step is pushed at all is known only after backward"
    if sparse:
        return f"row-sparse parameters {sorted(sparse)}: their rows are sent as chosen after backward"
    if device.type != "cpu":
        return f"device {device}: the overlapped push copies gradients only from CPU memory"
    return None


class InFlight:
    """One step's pushes as backward produces them (``BackwardPush.start``)."""

    def __init__(
        self,
        servers: ServerSet,
        params: Mapping[str, nn.Parameter],
        buffers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        waiting: dict[str, set[str]],
        samples: int,
        request_id: str,
        timeout_s: float | None,
    ) -> None:
        self._servers = servers
        self._params = params
        self._buffers = buffers  # name -> (live tensor, its value before the step)
        self._waiting = waiting  # server id -> parameters whose gradient it still waits for
        layout = servers.ensure_layout()
        self._order = [s.member_id for s in layout.servers]  # the layout of the step, kept to its end
        self._by_id: dict[str, ServerInfo] = {s.member_id: s for s in layout.servers}
        self._samples, self._request_id, self._timeout_s = samples, request_id, timeout_s
        self._lock = threading.Lock()
        self._armed = True
        self._begun = False  # a hook has fired: forward has ended
        self._done: set[str] = set()  # parameters whose hook fired
        self.pushed: dict[str, dict[str, torch.Tensor]] = {}  # server id -> what its push carries
        self._futures: dict[str, Future] = {}
        self.during_backward: list[str] = []  # server ids started from a hook, in order

    def ready(self, name: str) -> None:
        """A hook: ``name``'s gradient is final; starts every server that waited only for it."""
        with self._lock:
            if not self._armed:
                return
            if name in self._done:
                raise RuntimeError(f"the gradient of {name} was accumulated twice in one backward pass")
            self._done.add(name)
            starting = [] if self._begun else [sid for sid, w in self._waiting.items() if not w]
            self._begun = True
            for server_id, names in self._waiting.items():
                if name in names:
                    names.discard(name)
                    if not names:
                        starting.append(server_id)
            for server_id in starting:
                self._start(server_id, self._share(server_id))
                self.during_backward.append(server_id)

    def _share(self, server_id: str) -> dict[str, torch.Tensor]:
        """What backward has made of ``server_id``'s tensors: their gradients and buffer changes."""
        share: dict[str, torch.Tensor] = {}
        for spec in self._by_id[server_id].tensors:
            if spec.of in share:
                continue
            if spec.kind is TensorKind.BUFFER and spec.of in self._buffers:
                live, old = self._buffers[spec.of]
                if old.dtype != torch.bool:  # a flag, not a statistic (as Trainer.gradients)
                    change = live.detach() - old
                    if bool(change.any()):
                        share[spec.of] = change
            elif spec.of in self._params and self._params[spec.of].grad is not None:
                share[spec.of] = self._params[spec.of].grad.detach()  # type: ignore[union-attr]
        return share

    def _start(self, server_id: str, share: Mapping[str, torch.Tensor]) -> None:
        self.pushed[server_id] = dict(share)
        server = self._by_id[server_id]
        self._futures[server_id] = self._servers.push_to(
            server, self._samples, share, self._request_id, self._timeout_s
        )

    def finish(self, grads: Mapping[str, torch.Tensor]) -> dict[str, PushReply]:
        """After backward: starts the servers still waiting (a parameter without a gradient never
        fires its hook) with their share of ``grads``, what the step pushes; waits for every
        push-pull, installs the answers and returns each server's reply (``ServerSet.settle``).

        Raises RuntimeError, after the pushes have ended, if a push started during backward
        carried anything other than its share of ``grads``: overlap would then have changed
        what is trained (it cannot, for the jobs ``blocker`` lets through)."""
        with self._lock:
            self._armed = False
            for server_id in self._order:
                if server_id not in self._futures:
                    self._start(server_id, grads)
        layout_order = [self._futures[server_id] for server_id in self._order]
        wait(layout_order)
        for server_id in self.during_backward:
            _check_share(server_id, self.pushed[server_id], grads, self._by_id[server_id])
        return self._servers.settle(layout_order)

    def abandon(self) -> None:
        """Backward failed: starts nothing more and waits for what was started (its answers are
        dropped; the replica is marked stale, so the next step pulls)."""
        with self._lock:
            self._armed = False
        wait(list(self._futures.values()))
        self._servers.fresh = False


def _check_share(
    server_id: str, pushed: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], server: ServerInfo
) -> None:
    expected = {t.of for t in server.tensors if t.of in grads}
    if set(pushed) != expected:
        raise RuntimeError(
            f"the push to {server_id} during backward carried {sorted(pushed)}, the step {sorted(expected)}"
        )
    for name, value in pushed.items():
        final = grads[name]
        same_memory = value.data_ptr() == final.data_ptr() and value.shape == final.shape
        if not same_memory and not torch.equal(value, final):
            raise RuntimeError(f"the push to {server_id} during backward carried another {name} than the step's")


class BackwardPush:
    """Hooks on a replica's trainable parameters that start each server's push-pull as soon as
    backward has made every gradient it takes (``start`` arms them for one step).

    Args:
        servers: the data path.
        params: the replica's parameters by name (``Trainer.params``).
        buffers: its persistent buffers by name (their changes travel with the gradients).
    """

    def __init__(
        self, servers: ServerSet, params: Mapping[str, nn.Parameter], buffers: Mapping[str, torch.Tensor]
    ) -> None:
        self._servers = servers
        self._params = {n: p for n, p in params.items() if p.requires_grad}
        self._buffers = dict(buffers)
        self._step: InFlight | None = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in self._params.items()
        ]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            step = self._step
            if step is not None:
                step.ready(name)

        return hook

    def start(self, samples: int, request_id: str, timeout_s: float | None = None) -> InFlight:
        """Arms the hooks for one step; call before the forward pass (buffers are read now)."""
        layout = self._servers.ensure_layout()
        waiting = {
            s.member_id: {t.of for t in s.tensors if t.kind is TensorKind.PARAMETER and t.of in self._params}
            for s in layout.servers
        }
        held = {t.of for s in layout.servers for t in s.tensors if t.kind is TensorKind.BUFFER}
        buffers = {n: (t, t.detach().clone()) for n, t in self._buffers.items() if n in held}
        self._step = InFlight(self._servers, self._params, buffers, waiting, samples, request_id, timeout_s)
        return self._step

    def gradients(
        self,
        compute: Callable[[], tuple[float, dict[str, torch.Tensor] | None]],
        samples: int,
        request_id: str,
        timeout_s: float | None = None,
    ) -> tuple[float, dict[str, torch.Tensor] | None, InFlight]:
        """``compute()`` (``Trainer.gradients`` of a batch) with the hooks armed: returns its loss
        and gradients and the step's pushes, some already under way (``InFlight.finish``)."""
        step = self.start(samples, request_id, timeout_s)
        try:
            loss, grads = compute()
        except BaseException:
            step.abandon()
            raise
        finally:
            self._step = None
        return loss, grads, step

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


_END = object()


@contextmanager
def prefetched(batches: Iterator, depth: int = 1):
    """``batches`` made on a background thread, up to ``depth`` ahead of the consumer, so that the
    next batch loads while the current one trains and pushes. An error there is raised here, at
    the batch it stopped; leaving the ``with`` early stops the thread (after the batch it is making)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer
            put((_END, exc))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def for_trainer(trainer, servers: ServerSet, enabled: bool = True) -> BackwardPush | None:
    """The worker's BackwardPush, or None (pushing after backward) when overlap is off or cannot
    be exact for this job (``blocker``); decided once, and logged."""
    if not enabled:
        log.info("overlap_off", reason="--no-overlap")
        return None
    spec = trainer.spec
    reason = blocker(
        accumulate=spec.accumulate, clip_grad_norm=spec.clip_grad_norm, precision=trainer.precision,
        sparse=trainer.sparse, device=trainer.device,
    )
    if reason is not None:
        log.info("overlap_off", reason=reason)
        return None
    log.info("overlap_on")
    return BackwardPush(servers, trainer.params, {n: trainer.tensors[n] for n in trainer.buffers})
