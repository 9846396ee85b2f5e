"""Admission per class and per peer, the limits' configuration, and the watchdog."""

from __future__ import annotations

import threading

import pytest

from lepton.errors import ConfigError
from lepton.limits import DEFAULT_LIMITS, LIVENESS, SPARE_THREADS, Admission, CallClass, Limits, Watchdog
from lepton.ops.cli import build_parser, service_options

WATCH = "/lepton.v1.Coordinator/WatchJob"
HEARTBEAT = "/lepton.v1.Coordinator/Heartbeat"
PUSH_PULL = "/lepton.v1.ParameterServer/PushPull"


def test_every_lepton_method_has_a_class_and_heartbeats_are_apart_from_watches():
    limits = DEFAULT_LIMITS
    assert limits.of(HEARTBEAT).name == "heartbeat"
    assert limits.of(WATCH).name == "watch" and limits.of(WATCH).lifetime_s == 300
    assert limits.of(PUSH_PULL).name == "data" and limits.of(PUSH_PULL).idle_s == 10
    assert limits.of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").name == "read"
    from lepton.auth import METHOD_ROLES

    assert set(METHOD_ROLES) <= set(limits.methods)


def test_the_thread_pool_exceeds_the_sum_of_the_class_limits():
    # The liveness class is sized by the coordinator, the only server of HeartbeatStream.
    shared = [c for c in DEFAULT_LIMITS.classes if c.name != LIVENESS]
    assert len(shared) == len(DEFAULT_LIMITS.classes) - 1
    assert DEFAULT_LIMITS.threads() == sum(c.limit for c in shared) + SPARE_THREADS
    assert SPARE_THREADS > 0


def test_heartbeat_streams_have_their_own_class_with_an_idle_time():
    liveness = DEFAULT_LIMITS.of("/lepton.v1.Coordinator/HeartbeatStream")
    assert liveness.name == LIVENESS and liveness.idle_s is not None and liveness.lifetime_s is None
    assert liveness.limit >= 1024 and liveness.per_peer >= 1000  # a thousand members, one connection or many


def test_a_full_class_refuses_naming_its_limit_while_another_class_admits():
    admission = Admission(DEFAULT_LIMITS.configured(["watch=2:2"]))
    admitted = [admission.enter(WATCH, f"peer-{i}") for i in range(2)]
    assert [why for _, why in admitted] == [None, None]
    c, why = admission.enter(WATCH, "peer-9")
    assert c.name == "watch" and "limit of 2 concurrent watch calls" in why and "--rpc-limit watch=2:2" in why
    assert admission.enter(HEARTBEAT, "peer-9")[1] is None
    assert admission.in_flight()["watch"] == 2 and admission.in_flight()["heartbeat"] == 1
    admission.leave(admitted[0][0], "peer-0")
    assert admission.enter(WATCH, "peer-9")[1] is None
    assert admission.counts()[0] == {(WATCH, "watch", "class_limit"): 1}


def test_one_peer_gets_only_its_share_and_its_slots_come_back():
    admission = Admission(DEFAULT_LIMITS.configured(["data=10:3"]))
    for _ in range(3):
        assert admission.enter(PUSH_PULL, "a")[1] is None
    c, why = admission.enter(PUSH_PULL, "a")
    assert "this connection already has 3 concurrent data calls" in why
    assert admission.enter(PUSH_PULL, "b")[1] is None
    assert admission.peers("data") == 2
    for _ in range(3):
        admission.leave(c, "a")
    assert admission.peers("data") == 1 and admission.in_flight()["data"] == 1
    assert admission.counts()[0] == {(PUSH_PULL, "data", "peer_share"): 1}


def test_overrides_idle_time_and_lifetime_are_applied_to_the_classes_that_have_them():
    limits = DEFAULT_LIMITS.configured(["watch=5", "data=7:2"], idle_s=3, lifetime_s=60)
    watch, data, heartbeat = limits.of(WATCH), limits.of(PUSH_PULL), limits.of(HEARTBEAT)
    assert (watch.limit, watch.per_peer, watch.lifetime_s, watch.idle_s) == (5, 5, 60, None)
    assert (data.limit, data.per_peer, data.idle_s, data.lifetime_s) == (7, 2, 3, None)
    assert (heartbeat.idle_s, heartbeat.lifetime_s) == (None, None)


@pytest.mark.parametrize(
    ("overrides", "idle_s", "needle"),
    [
        (["nosuch=3"], None, "CLASS one of heartbeat"),
        (["watch"], None, "expected CLASS=LIMIT"),
        (["watch=x"], None, "whole numbers"),
        (["watch=0"], None, "limit >= 1"),
        (["watch=4:5"], None, "per-peer share <= limit"),
        ([], 0.0, "idle time must be > 0"),
    ],
)
def test_bad_limits_are_config_errors_naming_the_value(overrides, idle_s, needle):
    with pytest.raises(ConfigError, match=needle):
        DEFAULT_LIMITS.configured(overrides, idle_s=idle_s)


def test_a_table_naming_an_unknown_class_is_refused():
    with pytest.raises(ConfigError, match="include"):
        Limits(classes=(CallClass("read", 1, 1),), methods={WATCH: "watch"})


def test_the_server_flags_reach_the_limits_and_a_bad_one_is_a_config_error():
    parser = build_parser()
    args = parser.parse_args(
        ["ps", "--coordinator", "127.0.0.1:1", "--rpc-limit", "data=9:3", "--stream-idle-timeout", "2",
         "--stream-lifetime", "7"]
    )
    limits = service_options(args).limits
    assert (limits.of(PUSH_PULL).limit, limits.of(PUSH_PULL).per_peer, limits.of(PUSH_PULL).idle_s) == (9, 3, 2)
    assert limits.of(WATCH).lifetime_s == 7
    assert service_options(parser.parse_args(["coordinator"])).limits == DEFAULT_LIMITS
    with pytest.raises(ConfigError, match="--rpc-limit 'watch=many'"):  # main() prints it and exits 2
        service_options(parser.parse_args(["coordinator", "--rpc-limit", "watch=many"]))


def test_the_watchdog_calls_what_is_armed_and_not_what_is_disarmed():
    watchdog = Watchdog()
    fired: list[str] = []
    done = threading.Event()
    kept = watchdog.arm(0.05, lambda: fired.append("kept"))
    dropped = watchdog.arm(0.01, lambda: fired.append("dropped"))
    Watchdog.disarm(dropped)
    watchdog.arm(0.1, done.set)  # armed after both: fires after them
    assert done.wait(10)
    assert fired == ["kept"] and kept[2] is None
    assert watchdog.armed() == 0


def test_a_failing_callback_does_not_stop_the_watchdog():
    watchdog = Watchdog()
    done = threading.Event()
    watchdog.arm(0.01, lambda: 1 / 0)
    watchdog.arm(0.02, done.set)
    assert done.wait(10)
