"""The command line turns a job file and flags into one JobSpec; flags win."""

from pathlib import Path

import pytest

from lepton.errors import ConfigError
from lepton.ops.cli import build_parser, job_from_args, main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-sgd-sync.toml"


def test_job_file_values_are_used_and_flags_override_them():
    args = build_parser().parse_args(["up", "--job", str(EXAMPLE), "--epochs", "3", "--lr", "0.05"])
    spec = job_from_args(args, parameter_servers=args.ps)
    assert spec.mode == "sync" and spec.optimizer == "sgd"
    assert spec.optimizer_kwargs == {"momentum": 0.9, "nesterov": True}
    assert spec.epochs == 3 and spec.lr == 0.05
    assert spec.parameter_servers == 2


def test_optimizer_kwargs_flag_must_be_json():
    args = build_parser().parse_args(["coordinator", "--optimizer-kwargs", "{momentum: 1"])
    with pytest.raises(ConfigError, match="not JSON"):
        job_from_args(args)


def test_schedule_flags_set_the_learning_rate_schedule_and_its_json_arguments():
    args = build_parser().parse_args(
        ["coordinator", "--lr-schedule", "cosine", "--lr-schedule-kwargs", '{"t_max": 200, "eta_min": 0.001}']
    )
    spec = job_from_args(args)
    assert spec.lr_schedule == "cosine" and dict(spec.lr_schedule_kwargs) == {"t_max": 200, "eta_min": 0.001}


def test_mode_and_staleness_flags_make_an_ssp_job():
    spec = job_from_args(build_parser().parse_args(["coordinator", "--mode", "ssp", "--staleness", "2"]))
    assert (spec.mode, spec.staleness) == ("ssp", 2)


def test_lr_schedule_kwargs_flag_must_be_json():
    args = build_parser().parse_args(["coordinator", "--lr-schedule", "step", "--lr-schedule-kwargs", "{step_size"])
    with pytest.raises(ConfigError, match="--lr-schedule-kwargs is not JSON"):
        job_from_args(args)


def test_an_invalid_flag_value_is_a_config_error_naming_the_field():
    args = build_parser().parse_args(["coordinator", "--mode", "bulk"])
    with pytest.raises(ConfigError, match="mode"):
        job_from_args(args)


def test_configuration_errors_exit_with_the_documented_code(capsys):
    from lepton.ops.cli import main

    assert main(["up", "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err



@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--optimizer", "adam", "--optimizer-kwargs", '{"betas": [0.9]}'], "betas"),
        (["--optimizer", "sgd", "--optimizer-kwargs", '{"momentum": -1}'], "momentum"),
        (["--optimizer", "rmsprop", "--dataset", "synthetic-text", "--model", "embedding-bag"], "sparse"),
    ],
    ids=["short-betas", "negative-momentum", "no-sparse-form"],
)
def test_the_coordinator_refuses_an_optimizer_the_servers_could_not_build(tmp_path, flags, fragment):
    """Checked where the job is made, before any server loads it, and before the state directory
    is opened (`lepton coordinator` then exits 2, as for every ConfigError)."""
    from coordinator.main import build_job

    spec = job_from_args(build_parser().parse_args(["coordinator", *flags]))
    with pytest.raises(ConfigError, match=fragment):
        build_job(spec, str(tmp_path / "state"))
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("command", ["up", "coordinator"])
def test_a_dataset_flag_alone_gives_that_workloads_recommended_settings(command):
    spec = job_from_args(build_parser().parse_args([command, "--dataset", "synthetic-image"]))
    assert (spec.model, spec.epochs, spec.batch_size, spec.optimizer, spec.lr) == ("mlp", 3, 128, "adam", 1e-3)


def test_flags_and_job_file_values_win_over_a_workloads_recommended_settings(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('dataset = "synthetic-text"\nepochs = 1\n')
    args = build_parser().parse_args(["up", "--job", str(path), "--lr", "0.02"])
    spec = job_from_args(args)
    assert (spec.model, spec.epochs, spec.lr, spec.batch_size) == ("embedding-bag", 1, 0.02, 128)
    # a flag naming another data set takes that one's settings instead
    spec = job_from_args(build_parser().parse_args(["up", "--job", str(path), "--dataset", "digits"]))
    assert (spec.model, spec.epochs, spec.batch_size) == ("mlp", 1, 32)


def test_the_async_lr_scaling_flag_sets_the_policy():
    spec = job_from_args(build_parser().parse_args(["coordinator", "--async-lr-scaling", "none"]))
    assert spec.async_lr_scaling == "none"


def test_threads_come_from_the_flag_then_the_environment_then_the_cores(tmp_path):
    from lepton import threads

    assert threads.chosen(3, {"LEPTON_THREADS": "5"}) == 3
    assert threads.chosen(None, {"LEPTON_THREADS": "5"}) == 5
    assert threads.chosen(None, {}) == threads.available_cores()
    for bad in ({"LEPTON_THREADS": "two"}, {"LEPTON_THREADS": "0"}):
        with pytest.raises(ValueError, match="LEPTON_THREADS"):
            threads.chosen(None, bad)
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads.available_cores(quota) == min(2, threads.available_cores(tmp_path / "none"))
    quota.write_text("max 100000\n")
    assert threads.available_cores(quota) == threads.available_cores(tmp_path / "none")
    assert threads.share(5, cores=2) == 1 and threads.share(2, cores=16) == 8
    env = threads.child_environment(4, {})
    assert env["LEPTON_THREADS"] == str(threads.share(4)) and "mmap_threshold" in env["GLIBC_TUNABLES"]
    assert threads.child_environment(4, {"LEPTON_THREADS": "2", "GLIBC_TUNABLES": ""}) == {}


def test_a_bad_thread_count_is_a_configuration_error(capsys):
    assert main(["ps", "--coordinator", "127.0.0.1:1", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
