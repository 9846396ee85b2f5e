"""Elastic worker count: the plan, the launcher's bookkeeping, and the request/acknowledge files."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from lepton.clock import FakeClock
from lepton.config import JobSpec
from lepton.errors import ConfigError, DeadlineExceeded
from lepton.ops.children import Child, Workers
from lepton.ops.cluster import Cluster
from lepton.ops.scale import (
    REQUEST_FILE,
    UP_FILE,
    ScaleControl,
    ScalePlan,
    default_max_workers,
    plan_scale,
    request_scale,
)
from lepton.ops.supervisor import apply_scale

NO_SUCH_PID = 2**31 - 1  # above any pid_max


# --- the plan ------------------------------------------------------------------------------------


def test_growing_starts_workers_under_names_never_used_before():
    plan = plan_scale(["worker-0", "worker-1"], next_index=5, target=4, max_workers=4)
    assert plan == ScalePlan(start=("worker-5", "worker-6"))


def test_shrinking_stops_the_newest_workers_first():
    plan = plan_scale(["worker-0", "worker-7", "worker-2", "worker-10"], next_index=11, target=1, max_workers=8)
    assert plan == ScalePlan(stop=("worker-10", "worker-7", "worker-2"))


def test_the_same_count_changes_nothing():
    assert plan_scale(["worker-0", "worker-1"], next_index=2, target=2, max_workers=2) == ScalePlan()


@pytest.mark.parametrize("target, match", [(0, ">= 1"), (-3, ">= 1"), (5, "exceeds --max-workers 4")])
def test_a_target_out_of_range_is_a_config_error(target, match):
    with pytest.raises(ConfigError, match=match):
        plan_scale(["worker-0"], next_index=1, target=target, max_workers=4)


def test_max_workers_defaults_to_eight_or_the_initial_count_if_larger():
    assert default_max_workers(3) == 8 and default_max_workers(12) == 12
    assert Cluster(spec=JobSpec(), workers=3).worker_cap == 8
    assert Cluster(spec=JobSpec(), workers=3, max_workers=3).worker_cap == 3


def test_max_workers_below_workers_is_a_config_error():
    with pytest.raises(ConfigError, match="--max-workers 2 is below --workers 3"):
        Cluster(spec=JobSpec(), workers=3, max_workers=2)


def test_lepton_up_with_max_workers_below_workers_exits_2_with_the_reason(capsys):
    from lepton.ops.cli import main

    assert main(["up", "--workers", "3", "--max-workers", "2"]) == 2
    assert "--max-workers 2 is below --workers 3" in capsys.readouterr().err


# --- the launcher's workers, with fake processes ----------------------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.returncode = -signal.SIGKILL

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class FakeChildren:
    def __init__(self) -> None:
        self.items: list[Child] = []

    def start(self, name: str, args: list[str]) -> Child:
        child = Child(name, FakeProcess(100 + len(self.items)), Path(f"{name}.log"), list(args))
        self.items.append(child)
        return child


def make_workers(count: int) -> tuple[Workers, FakeChildren]:
    children = FakeChildren()
    children.start("coordinator", [])
    workers = Workers(children, lambda name: ["worker", "--ready-file", f"{name}.ready.json"])
    workers.start([f"worker-{i}" for i in range(count)])
    return workers, children


def test_scaling_down_sends_sigterm_to_the_newest_and_retires_them():
    workers, children = make_workers(3)
    started, stopped = workers.scale(1, max_workers=4, now=0.0)
    assert (started, stopped) == ([], ["worker-2", "worker-1"])
    assert [c.name for c in workers.active()] == ["worker-0"]
    signalled = {c.name: c.process.signals for c in children.items}
    assert signalled == {"coordinator": [], "worker-0": [], "worker-1": [signal.SIGTERM], "worker-2": [signal.SIGTERM]}


def test_scaling_up_after_down_uses_fresh_names_with_the_same_flags():
    workers, children = make_workers(2)
    workers.scale(1, max_workers=4, now=0.0)
    started, _ = workers.scale(3, max_workers=4, now=1.0)
    assert started == ["worker-2", "worker-3"]
    assert children.items[-1].args == ["worker", "--ready-file", "worker-3.ready.json"]
    assert [c.name for c in workers.active()] == ["worker-0", "worker-2", "worker-3"]


def test_a_retired_worker_that_ignores_sigterm_is_killed_after_the_grace_period():
    workers, children = make_workers(2)
    workers.scale(1, max_workers=2, now=100.0)
    leaver = children.items[-1]
    workers.reap(now=101.0)
    assert leaver.process.signals == [signal.SIGTERM]
    workers.reap(now=200.0)
    assert leaver.process.signals == [signal.SIGTERM, signal.SIGKILL] and workers.retiring == {}


def test_a_retired_worker_that_exited_is_not_killed():
    workers, children = make_workers(2)
    workers.scale(1, max_workers=2, now=100.0)
    children.items[-1].process.returncode = 0
    workers.reap(now=200.0)
    assert children.items[-1].process.signals == [signal.SIGTERM] and workers.retiring == {}


def test_apply_scale_acknowledges_and_returns_the_event(tmp_path, capsys):
    workers, _ = make_workers(2)
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    event = apply_scale({"id": "r1", "workers": 4}, workers, control, max_workers=4, at_s=3.25)
    assert event == {"at_s": 3.25, "from": 2, "to": 4, "started": ["worker-2", "worker-3"], "stopped": []}
    up = json.loads((tmp_path / UP_FILE).read_text())
    assert up["workers"] == 4 and up["acknowledged"] == {"id": "r1", "from": 2, "to": 4, "error": None}
    assert "workers: 2 -> 4" in capsys.readouterr().out


def test_apply_scale_refuses_an_out_of_range_request_and_changes_nothing(tmp_path):
    workers, _ = make_workers(2)
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    assert apply_scale({"id": "r2", "workers": 9}, workers, control, max_workers=4, at_s=1.0) is None
    up = json.loads((tmp_path / UP_FILE).read_text())
    assert up["workers"] == 2 and "exceeds" in up["acknowledged"]["error"]
    assert len(workers.active()) == 2


# --- the files between lepton scale and lepton up ----------------------------------------------


class FakeLauncher:
    """Plays ``lepton up``'s poll inside ``request_scale``'s sleep: no threads, no real time."""

    def __init__(self, control: ScaleControl, clock: FakeClock, workers: int, answer: bool = True) -> None:
        self.control, self.clock, self.workers, self.answer = control, clock, workers, answer
        self.polls = 0

    def __call__(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.polls += 1
        if not self.answer:
            return
        request = self.control.take_request()
        if request is not None:
            before, self.workers = self.workers, request["workers"]
            self.control.acknowledge(request["id"], before, self.workers)


def test_a_request_is_taken_and_acknowledged(tmp_path):
    clock = FakeClock()
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    launcher = FakeLauncher(control, clock, workers=2)
    assert request_scale(tmp_path, 4, timeout_s=30, clock=clock, sleep=launcher) == (2, 4)
    assert launcher.workers == 4 and not (tmp_path / REQUEST_FILE).exists()
    assert json.loads((tmp_path / UP_FILE).read_text())["workers"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [UP_FILE]  # no temp files left


def test_a_second_request_waits_until_the_pending_one_is_taken(tmp_path):
    clock = FakeClock()
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    (tmp_path / REQUEST_FILE).write_text(json.dumps({"id": "earlier", "workers": 3}))
    launcher = FakeLauncher(control, clock, workers=2)
    assert request_scale(tmp_path, 1, timeout_s=30, clock=clock, sleep=launcher) == (3, 1)
    assert launcher.polls == 2


def test_an_unanswered_request_times_out_and_is_withdrawn(tmp_path):
    clock = FakeClock()
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    launcher = FakeLauncher(control, clock, workers=2, answer=False)
    with pytest.raises(DeadlineExceeded, match="request withdrawn"):
        request_scale(tmp_path, 3, timeout_s=5, clock=clock, sleep=launcher)
    assert control.take_request() is None  # the launcher will not apply it later
    assert 5 <= launcher.polls * 0.1 <= 5.3


def test_a_refusal_by_the_launcher_is_a_config_error(tmp_path):
    clock = FakeClock()
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)

    def refuse(seconds: float) -> None:
        clock.advance(seconds)
        request = control.take_request()
        if request is not None:
            control.acknowledge(request["id"], 2, 2, error="the job is over")

    with pytest.raises(ConfigError, match="refused: the job is over"):
        request_scale(tmp_path, 3, timeout_s=5, clock=clock, sleep=refuse)


def test_a_malformed_request_is_taken_with_no_worker_count(tmp_path):
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    (tmp_path / REQUEST_FILE).write_text('{"id": "x", "workers": "many"}')
    assert control.take_request() == {"id": "x", "workers": None}
    (tmp_path / REQUEST_FILE).write_text("not json")
    assert control.take_request() == {"id": "", "workers": None}


def test_closing_the_control_removes_its_files_and_a_new_one_drops_a_leftover_request(tmp_path):
    (tmp_path / REQUEST_FILE).write_text(json.dumps({"id": "old", "workers": 3}))
    control = ScaleControl(tmp_path, "127.0.0.1:1", workers=2, max_workers=4)
    assert control.take_request() is None
    control.close()
    assert list(tmp_path.iterdir()) == []


def test_no_up_file_means_no_running_lepton_up(tmp_path):
    with pytest.raises(ConfigError, match="no running lepton up at .*no up.json"):
        request_scale(tmp_path, 2, timeout_s=1)


def test_an_up_file_whose_process_is_gone_is_stale(tmp_path):
    (tmp_path / UP_FILE).write_text(
        json.dumps({"pid": NO_SUCH_PID, "coordinator": "x", "workers": 2, "max_workers": 4})
    )
    with pytest.raises(ConfigError, match=f"stale \\(pid {NO_SUCH_PID} is not running\\)"):
        request_scale(tmp_path, 2, timeout_s=1)
    assert not (tmp_path / REQUEST_FILE).exists()


@pytest.mark.parametrize(
    "workers, message", [(5, "--workers 5 exceeds --max-workers 4"), (0, "--workers must be >= 1")]
)
def test_lepton_scale_out_of_range_exits_2_and_sends_nothing(tmp_path, capsys, workers, message):
    from lepton.ops.cli import main

    (tmp_path / UP_FILE).write_text(
        json.dumps({"pid": os.getpid(), "coordinator": "x", "workers": 2, "max_workers": 4})
    )
    assert main(["scale", "--state-dir", str(tmp_path), "--workers", str(workers)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / REQUEST_FILE).exists()


def test_lepton_scale_without_a_running_up_exits_2(tmp_path, capsys):
    from lepton.ops.cli import main

    assert main(["scale", "--state-dir", str(tmp_path), "--workers", "2"]) == 2
    assert "lepton scale: no running lepton up at" in capsys.readouterr().err
