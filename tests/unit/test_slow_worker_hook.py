"""The slow-worker test hook: ``lepton up --worker-delay`` slows worker-0 alone."""

from __future__ import annotations

import threading

import pytest

from lepton.config import JobSpec
from lepton.errors import ConfigError
from lepton.ops.cli import build_parser
from lepton.ops.cluster import Cluster
from worker.agent import WorkerAgent


def test_only_worker_0_gets_the_step_delay():
    cluster = Cluster(spec=JobSpec(), workers=3, worker_delay_s=0.02)
    assert cluster.worker_flags("worker-0") == ["--step-delay", "0.02"]
    assert cluster.worker_flags("worker-1") == []
    assert cluster.worker_flags("worker-10") == []


def test_no_worker_delay_adds_no_flags():
    assert Cluster(spec=JobSpec(), workers=3).worker_flags("worker-0") == []


def test_a_negative_delay_is_a_config_error():
    with pytest.raises(ConfigError, match="--worker-delay"):
        Cluster(spec=JobSpec(), workers=3, worker_delay_s=-1.0)
    with pytest.raises(ConfigError, match="step delay"):
        WorkerAgent(None, threading.Event(), step_delay_s=-0.5)  # type: ignore[arg-type]


def test_the_flags_parse_as_seconds():
    assert build_parser().parse_args(["up", "--worker-delay", "0.05"]).worker_delay == 0.05
    assert build_parser().parse_args(["up"]).worker_delay == 0.0
    worker = build_parser().parse_args(["worker", "--coordinator", "127.0.0.1:1", "--step-delay", "0.1"])
    assert worker.step_delay == 0.1
