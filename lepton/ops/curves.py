"""The training curves ``lepton up`` records while it watches a job: TensorBoard event files under
the state directory (lepton/tbevents.py) and, with ``--report``, a PNG next to the report.

Every poll adds: the coordinator's recent training loss; each validation row once (its metrics);
per worker, samples per second and mean push-pull latency since the last poll (from its
/metrics counters); per parameter server, the mean staleness of the async updates it applied
since the last poll. The x axis (TensorBoard's step) is the samples trained so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lepton.tbevents import EventFileWriter
from lepton.v1 import coordinator_pb2 as cpb

TENSORBOARD_DIR = "tensorboard"
COUNTERS = (
    "lepton_worker_samples_total",
    "lepton_worker_push_seconds_sum",
    "lepton_worker_push_seconds_count",
    "lepton_ps_staleness_updates_sum",
    "lepton_ps_staleness_updates_count",
)


def counters(text: str, names: tuple[str, ...] = COUNTERS) -> dict[str, float]:
    """The named series of a Prometheus text page, each summed over its labels."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name in names:
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


@dataclass
class Curves:
    """The curves seen so far (``series``: tag -> [(samples trained, value)]) and their event file."""

    logdir: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    _writer: EventFileWriter | None = None
    _last: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)  # child -> (time, counters)
    _validations: int = 0

    def _add(self, tag: str, step: int, value: float) -> None:
        if not math.isfinite(value):
            return
        if self._writer is None:
            self._writer = EventFileWriter(self.logdir)
        self._writer.scalar(tag, value, step)
        self.series.setdefault(tag, []).append((step, value))

    def observe(self, status: cpb.GetStatusResponse | None, pages: dict[str, str | None], now_s: float) -> None:
        """One poll: the coordinator's status and each child's /metrics page (None: unreachable)."""
        if status is None:
            return
        step = status.samples_trained
        if status.state == cpb.JOB_STATE_TRAINING:
            self._add("train/loss", step, status.recent_loss)
        for row in status.validation[self._validations :]:
            # Imported here: lepton.wire loads torch, which the up process avoids until it is needed.
            from lepton.wire import VALIDATION_METRICS, validation_row

            values = validation_row(row)
            for metric in VALIDATION_METRICS:
                if values[metric] is not None:
                    self._add(f"validation/{metric}", row.samples_trained, values[metric])
        self._validations = max(self._validations, len(status.validation))
        for name, page in sorted(pages.items()):
            if page is None:
                continue
            seen = counters(page)
            before = self._last.get(name)
            self._last[name] = (now_s, seen)
            if before is None:
                continue
            then, old = before
            delta = {k: seen.get(k, 0.0) - old.get(k, 0.0) for k in COUNTERS}
            if any(v < 0 for v in delta.values()):
                continue  # the process restarted: its counters began again
            if name.startswith("worker") and now_s > then:
                self._add(f"samples_per_second/{name}", step, delta["lepton_worker_samples_total"] / (now_s - then))
                if delta["lepton_worker_push_seconds_count"] > 0:
                    latency_ms = (
                        1000 * delta["lepton_worker_push_seconds_sum"] / delta["lepton_worker_push_seconds_count"]
                    )
                    self._add(f"push_latency_ms/{name}", step, latency_ms)
            if name.startswith("ps") and delta["lepton_ps_staleness_updates_count"] > 0:
                staleness = delta["lepton_ps_staleness_updates_sum"] / delta["lepton_ps_staleness_updates_count"]
                self._add(f"staleness/{name}", step, staleness)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


PANELS = (  # (title, tags): the training and validation losses share a panel
    ("loss (training, validation)", ("train/loss", "validation/loss")),
    ("validation metrics", ("validation/",)),
    ("samples/s per worker", ("samples_per_second/",)),
    ("push-pull latency (ms) per worker", ("push_latency_ms/",)),
    ("staleness (updates) per server", ("staleness/",)),
)


def _panel_tags(series: dict, prefixes: tuple[str, ...], taken: set[str]) -> list[str]:
    return sorted(t for t in series if t.startswith(prefixes) and t not in taken)


def write_png(series: dict[str, list[tuple[int, float]]], path: Path) -> str:
    """Draws the curves into a PNG at ``path``; returns what to tell the user (where it is, or why
    there is none: matplotlib, an optional extra, is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no curves PNG: matplotlib is not installed (pip install 'lepton[plots]')"
    taken: set[str] = set()
    panels = []
    for title, prefixes in PANELS:
        tags = _panel_tags(series, prefixes, taken)
        taken.update(tags)
        if tags:
            panels.append((title, tags))
    if not panels:
        return "no curves PNG: nothing was recorded"
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, (title, tags) in zip(axes[:, 0], panels, strict=True):
        for i, tag in enumerate(tags):
            xs, ys = zip(*series[tag], strict=True)
            validation = tag.startswith("validation/")
            ax.plot(xs, ys, marker="o" if validation else None, markersize=4, linestyle=("-", "--", ":")[i % 3],
                    label=tag.split("/", 1)[0] if title.startswith("loss") else tag.split("/", 1)[1])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("samples trained")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return f"curves written to {path}"
