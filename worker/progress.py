"""Progress reporting off the training path: the worker trains on while the coordinator is slow or
down, and the newest offset is sent when it answers again (offsets are cumulative, so a report
that fails is superseded by the next one, not lost)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from lepton.errors import FailedPrecondition, Fenced, LeptonError, NotFound

log = structlog.get_logger("lepton.worker")


@dataclass
class _Pending:
    epoch: int
    shard: int
    offset: int
    loss_sum: float = 0.0
    samples: int = 0
    sent_offset: int = -1


class ProgressReporter:
    """Holds the progress of the shard in hand and reports it every ``interval_s`` on a thread.

    Args:
        send: ``send(epoch, shard, offset, mean_loss, samples)``, one attempt, raising lepton errors.
    After the coordinator refuses the lease (FailedPrecondition/NotFound) ``lost`` is set; after it
    fences the member ``fenced`` is set. The training loop checks both after every step.
    """

    def __init__(
        self, send: Callable[[int, int, int, float, int], None], interval_s: float | Callable[[], float]
    ) -> None:
        self._send = send
        # a callable is read before every wait: the worker slows reports when the coordinator
        # directs a longer heartbeat interval (many workers)
        self._interval = interval_s if callable(interval_s) else (lambda: interval_s)
        self._lock = threading.Lock()
        self._pending: _Pending | None = None
        self._stop = threading.Event()
        self.lost = threading.Event()
        self.fenced = threading.Event()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def begin(self, epoch: int, shard: int, offset: int) -> None:
        with self._lock:
            self._pending = _Pending(epoch, shard, offset, sent_offset=offset)
            self.lost.clear()
            self.fenced.clear()  # a new lease is held by the current incarnation

    def update(self, offset: int, loss: float, samples: int) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.offset = offset
                self._pending.loss_sum += loss * samples
                self._pending.samples += samples

    def end(self) -> tuple[float, int]:
        """Stops reporting this shard; returns (mean loss, samples) not yet reported."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None or p.samples == 0:
            return 0.0, 0
        return p.loss_sum / p.samples, p.samples

    def flush(self) -> bool:
        """Reports now (used before a graceful leave); True if the coordinator has the offset."""
        return self._report()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval()):
            self._report()

    def _report(self) -> bool:
        with self._lock:
            p = self._pending
            if p is None:
                return True
            if p.offset == p.sent_offset:
                return True
            epoch, shard, offset, loss_sum, samples = p.epoch, p.shard, p.offset, p.loss_sum, p.samples
        try:
            self._send(epoch, shard, offset, loss_sum / max(samples, 1), samples)
        except Fenced:
            self.fenced.set()
            return False
        except (FailedPrecondition, NotFound) as exc:
            log.warning("lease_lost", epoch=epoch, shard=shard, reason=str(exc))
            self.lost.set()
            return False
        except LeptonError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 25 == 0:
                log.warning("progress_report_failed", error=str(exc), failures=self.failures)
            return False
        with self._lock:
            if self._pending is not None and (self._pending.epoch, self._pending.shard) == (epoch, shard):
                self._pending.sent_offset = offset
                self._pending.loss_sum -= loss_sum
                self._pending.samples -= samples
        return True
