"""JobSpec validation and job files."""

from __future__ import annotations

import pytest

from lepton.config import JobSpec, job_from_mapping, load_job_file
from lepton.errors import ConfigError


def test_the_defaults_are_a_valid_job():
    spec = JobSpec()
    assert (spec.mode, spec.epochs, spec.parameter_servers) == ("async", 10, 2)


@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"dataset": ""}, "dataset"),
        ({"model": ""}, "model"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"mode": "eventual"}, "mode"),
        ({"shards_per_epoch": 0}, "shards_per_epoch"),
        ({"heartbeat_interval_s": 0.0}, "heartbeat_interval_s"),
        ({"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 2.0}, "heartbeat_timeout_s"),
        ({"parameter_servers": 0}, "parameter_servers"),
        ({"optimizer_kwargs": [1, 2]}, "optimizer_kwargs"),
        ({"staleness": -1}, "staleness"),
        ({"staleness": 1.5}, "staleness"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"lr_schedule": "step"}, "step_size"),
        ({"lr_schedule": "step", "lr_schedule_kwargs": {"step_size": 0}}, "step_size"),
        ({"lr_schedule": "step", "lr_schedule_kwargs": {"step_size": 2.5}}, "step_size"),
        ({"lr_schedule": "step", "lr_schedule_kwargs": {"step_size": 3, "gamma": 0}}, "gamma"),
        ({"lr_schedule": "step", "lr_schedule_kwargs": {"step_size": 3, "t_max": 9}}, "t_max"),
        ({"lr_schedule": "cosine", "lr_schedule_kwargs": {"eta_min": 0.0}}, "t_max"),
        ({"lr_schedule": "cosine", "lr_schedule_kwargs": {"t_max": 10, "eta_min": -0.1}}, "eta_min"),
        ({"lr_schedule": "cosine", "lr_schedule_kwargs": {"t_max": True}}, "t_max"),
        ({"lr_schedule_kwargs": {"gamma": 0.5}}, "gamma"),
        ({"lr_schedule_kwargs": [1]}, "lr_schedule_kwargs"),
    ],
)
def test_an_out_of_range_value_is_a_config_error(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        JobSpec(**changes)


@pytest.mark.parametrize(
    "schedule,kwargs",
    [
        ("constant", {}),
        ("step", {"step_size": 10}),
        ("step", {"step_size": 1, "gamma": 0.5}),
        ("cosine", {"t_max": 100}),
        ("cosine", {"t_max": 100, "eta_min": 0.001}),
    ],
)
def test_each_learning_rate_schedule_with_its_arguments_is_a_valid_job(schedule, kwargs):
    spec = JobSpec(lr_schedule=schedule, lr_schedule_kwargs=kwargs)
    assert (spec.lr_schedule, dict(spec.lr_schedule_kwargs)) == (schedule, kwargs)


def test_the_default_schedule_is_a_constant_learning_rate():
    assert (JobSpec().lr_schedule, dict(JobSpec().lr_schedule_kwargs)) == ("constant", {})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        JobSpec(epochs=0, batch_size=0, mode="x")
    message = str(info.value)
    assert "epochs" in message and "batch_size" in message and "mode" in message


def test_the_timeout_must_exceed_twice_the_interval_strictly():
    with pytest.raises(ConfigError):
        JobSpec(heartbeat_interval_s=1.0, heartbeat_timeout_s=2.0)
    assert JobSpec(heartbeat_interval_s=1.0, heartbeat_timeout_s=2.01).heartbeat_timeout_s == 2.01


def test_replace_validates_the_new_values():
    spec = JobSpec()
    assert spec.replace(mode="sync").mode == "sync"
    with pytest.raises(ConfigError):
        spec.replace(epochs=-1)


def test_a_mapping_overrides_the_base_job():
    base = JobSpec(epochs=3)
    spec = job_from_mapping({"lr": 0.5, "mode": "sync"}, base)
    assert (spec.epochs, spec.lr, spec.mode) == (3, 0.5, "sync")


def test_unknown_keys_in_a_mapping_are_a_config_error():
    with pytest.raises(ConfigError, match="epoch"):
        job_from_mapping({"epoch": 3, "learning_rate": 0.1})


def test_a_value_of_the_wrong_type_in_a_mapping_is_a_config_error():
    with pytest.raises(ConfigError):
        job_from_mapping({"epochs": "three"})


def test_a_job_file_with_top_level_keys_loads(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('epochs = 4\nmode = "sync"\nlr = 0.05\n')
    spec = load_job_file(path)
    assert (spec.epochs, spec.mode, spec.lr) == (4, "sync", 0.05)
    assert spec.batch_size == JobSpec().batch_size


def test_a_job_file_with_a_job_table_loads_including_nested_optimizer_kwargs(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        '[job]\nepochs = 2\noptimizer = "adam"\nparameter_servers = 3\n'
        "[job.optimizer_kwargs]\nbetas = [0.8, 0.9]\nweight_decay = 0.01\n"
    )
    spec = load_job_file(str(path))
    assert (spec.epochs, spec.optimizer, spec.parameter_servers) == (2, "adam", 3)
    assert dict(spec.optimizer_kwargs) == {"betas": [0.8, 0.9], "weight_decay": 0.01}


def test_a_job_file_names_a_learning_rate_schedule_with_a_table_of_arguments(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\nlr_schedule = "step"\nlr_schedule_kwargs = { step_size = 50, gamma = 0.5 }\n')
    spec = load_job_file(path)
    assert (spec.lr_schedule, dict(spec.lr_schedule_kwargs)) == ("step", {"step_size": 50, "gamma": 0.5})


def test_unknown_keys_in_a_job_file_are_a_config_error(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[job]\nepochs = 2\nwarp_speed = true\n")
    with pytest.raises(ConfigError, match="warp_speed"):
        load_job_file(path)


def test_an_invalid_value_in_a_job_file_is_a_config_error(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[job]\nepochs = 0\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_job_file(path)


def test_a_job_file_that_is_not_toml_is_a_config_error(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("epochs = = 2\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_file(path)


def test_a_missing_job_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_file(tmp_path / "absent.toml")


@pytest.mark.parametrize("field", ["epochs", "batch_size", "shards_per_epoch", "parameter_servers"])
def test_a_fractional_count_in_a_job_file_is_a_config_error(tmp_path, field):
    path = tmp_path / "job.toml"
    path.write_text(f"[job]\n{field} = 2.5\n")
    with pytest.raises(ConfigError, match=field):
        load_job_file(path)


# --- per-workload recommended settings --------------------------------------------------------


def test_a_job_on_synthetic_image_takes_its_recommended_settings():
    spec = job_from_mapping({"dataset": "synthetic-image"})
    assert (spec.model, spec.epochs, spec.batch_size, spec.optimizer, spec.lr) == ("mlp", 3, 128, "adam", 1e-3)


def test_a_job_on_synthetic_text_takes_the_embedding_bag_settings():
    spec = job_from_mapping({"dataset": "synthetic-text"})
    assert (spec.model, spec.epochs, spec.batch_size, spec.optimizer, spec.lr) == (
        "embedding-bag", 3, 128, "adam", 1e-2,
    )


def test_digits_and_other_data_sets_keep_the_job_defaults():
    defaults = JobSpec()
    for values in ({}, {"dataset": "digits"}, {"dataset": "mymodule:data"}):
        spec = job_from_mapping(values)
        assert (spec.model, spec.epochs, spec.batch_size, spec.lr) == (
            defaults.model, defaults.epochs, defaults.batch_size, defaults.lr,
        )


def test_explicit_values_win_over_the_recommended_settings():
    spec = job_from_mapping({"dataset": "synthetic-image", "lr": 0.01, "epochs": 1})
    assert (spec.lr, spec.epochs, spec.batch_size) == (0.01, 1, 128)


def test_a_job_file_on_a_synthetic_data_set_keeps_its_own_values_and_takes_the_rest(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\ndataset = "synthetic-text"\nbatch_size = 64\n')
    spec = load_job_file(path)
    assert (spec.model, spec.batch_size, spec.lr, spec.epochs) == ("embedding-bag", 64, 1e-2, 3)


def test_a_base_job_is_not_overridden_by_recommendations():
    spec = job_from_mapping({"dataset": "synthetic-image"}, JobSpec(epochs=7))
    assert (spec.epochs, spec.batch_size) == (7, JobSpec().batch_size)


def test_async_lr_scaling_defaults_to_staleness_and_rejects_unknown_names():
    assert JobSpec().async_lr_scaling == "staleness"
    assert JobSpec(async_lr_scaling="none").async_lr_scaling == "none"
    with pytest.raises(ConfigError, match="async_lr_scaling"):
        JobSpec(async_lr_scaling="zhang")
