"""The Python API: the README's example, taken from the README itself, runs a local cluster of
real processes to success; a refused configuration and ``stop()`` end as they should."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lepton
from lepton.errors import ConfigError
from support import wait_until

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_example() -> str:
    """The one ```python block under the README's "## From Python"."""
    text = README.read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def test_the_readme_python_example_runs_a_job_to_success(capsys):
    namespace: dict = {}
    exec(compile(readme_python_example(), str(README), "exec"), namespace)  # noqa: S102 - our own README
    result = namespace["result"]
    assert "test_accuracy" in result.report, result.report
    assert result.succeeded and result.outcome == "succeeded"
    assert result.report["status"] == "succeeded"
    assert result.report["test_accuracy"] > 0.85
    assert result.report["final_status"]["job"]["warmup_steps"] == 10
    out = capsys.readouterr().out
    assert "job state:" in out
    assert "epoch 0 started" in out and "epoch 1 started" in out  # the events were followed
    assert f"succeeded {result.report['test_accuracy']}" in out
    assert all(code in (0, None) for code in result.report["exit_codes"].values()), result.report["exit_codes"]


def test_a_refused_job_ends_refused_with_the_reason(tmp_path):
    spec = lepton.JobSpec(dataset="digits", epochs=1, parameter_servers=1, optimizer="lbfgs")
    job = lepton.run_local(spec, workers=1, state_dir=tmp_path, timeout_s=120)
    assert list(job.events()) == []
    result = job.wait(timeout_s=120)
    assert result.outcome == "refused" and not result.succeeded
    assert "optimizer LBFGS cannot be served by parameter servers" in result.report["failure"]
    with pytest.raises(ConfigError, match="the job has no coordinator"):
        job.client()


def test_stop_ends_a_running_job_interrupted_and_reaps_its_processes(tmp_path):
    spec = lepton.JobSpec(dataset="digits", epochs=50, parameter_servers=1)
    with lepton.run_local(spec, workers=1, state_dir=tmp_path, timeout_s=300) as job:
        assert job.wait_address() is not None
        client = job.client()
        try:
            wait_until(lambda: client.status().samples_trained > 0, 120, "training to begin")
        finally:
            client.close()
        result = job.stop()
    assert result.outcome == "interrupted"
    codes = result.report["exit_codes"]
    assert len(codes) == 3 and all(code is not None for code in codes.values()), codes  # every child has exited
