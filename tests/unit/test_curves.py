"""TensorBoard event files written by hand (lepton/tbevents.py) and the curves ``lepton up``
records from the coordinator's status and its children's /metrics pages (lepton/ops/curves.py)."""

from __future__ import annotations

import struct

import pytest

from lepton.ops.curves import Curves, write_png
from lepton.tbevents import EventFileWriter, crc32c, read_records, read_scalars
from lepton.v1 import coordinator_pb2 as cpb


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc32c(b"") == 0


def test_scalars_round_trip_through_an_event_file(tmp_path):
    writer = EventFileWriter(tmp_path / "tb")
    writer.scalar("train/loss", 0.25, 100, wall_time=1.5)
    writer.scalar("validation/accuracy", 0.875, 2**40, wall_time=2.5)
    writer.close()
    assert writer.path.name.startswith("events.out.tfevents.")
    first = next(read_records(writer.path))
    assert b"brain.Event:2" in first
    assert read_scalars(writer.path) == [("train/loss", 100, 0.25, 1.5), ("validation/accuracy", 2**40, 0.875, 2.5)]


def test_a_corrupt_record_is_refused(tmp_path):
    writer = EventFileWriter(tmp_path)
    writer.scalar("x", 1.0, 1)
    writer.close()
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0xFF  # a byte of the last record's body
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_scalars(writer.path)


def page(samples: float, push_sum: float, pushes: float) -> str:
    return (
        "# HELP lepton_worker_samples_total x\n"
        f"lepton_worker_samples_total {samples}\n"
        f"lepton_worker_push_seconds_count {pushes}\n"
        f"lepton_worker_push_seconds_sum {push_sum}\n"
    )


def ps_page(total: float, count: float) -> str:
    return (
        f'lepton_ps_staleness_updates_bucket{{le="1.0"}} {count}\n'
        f"lepton_ps_staleness_updates_sum {total}\nlepton_ps_staleness_updates_count {count}\n"
    )


def status(samples: int, loss: float, rows: int = 0) -> cpb.GetStatusResponse:
    msg = cpb.GetStatusResponse(state=cpb.JOB_STATE_TRAINING, samples_trained=samples, recent_loss=loss)
    for i in range(rows):
        msg.validation.add(
            epoch=i, samples_trained=10 * (i + 1), evaluation=cpb.EvaluationResult(accuracy=0.5 + i / 10, loss=1.0)
        )
    return msg


def test_curves_take_rates_and_means_between_polls_and_each_validation_once(tmp_path):
    curves = Curves(tmp_path / "tb")
    curves.observe(status(0, float("nan")), {"worker-0": page(0, 0, 0), "ps-0": ps_page(0, 0)}, 10.0)
    curves.observe(
        status(64, 2.0, rows=1), {"worker-0": page(64, 0.5, 10), "ps-0": ps_page(30, 10), "worker-1": None}, 12.0
    )
    curves.observe(status(128, 1.0, rows=2), {"worker-0": page(32, 0.6, 11), "ps-0": ps_page(30, 10)}, 13.0)
    curves.close()
    s = curves.series
    assert s["train/loss"] == [(64, 2.0), (128, 1.0)]  # NaN (no report yet) is left out
    assert s["samples_per_second/worker-0"] == [(64, 32.0)]  # the third poll: a restarted worker
    assert s["push_latency_ms/worker-0"] == [(64, 50.0)]
    assert s["staleness/ps-0"] == [(64, 3.0)]  # no update since: no point
    assert s["validation/accuracy"] == [(10, 0.5), (20, pytest.approx(0.6))]
    [events] = (tmp_path / "tb").glob("events.out.tfevents.*")
    written = [(tag, step) for tag, step, *_ in read_scalars(events)]
    assert written.count(("validation/accuracy", 10)) == 1 and ("staleness/ps-0", 64) in written


def test_the_png_shows_the_recorded_curves(tmp_path):
    pytest.importorskip("matplotlib")
    series = {"train/loss": [(0, 2.0), (10, 1.0)], "validation/accuracy": [(10, 0.5)]}
    note = write_png(series, tmp_path / "curves.png")
    assert note == f"curves written to {tmp_path / 'curves.png'}"
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300
    assert write_png({}, tmp_path / "none.png") == "no curves PNG: nothing was recorded"
