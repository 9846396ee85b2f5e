"""docker/smoke.sh: build the image, run the compose cluster host-networked, train to the end.

Skipped unless a Docker engine answers ``docker info`` with the current DOCKER_HOST (CI starts none).
On this kind of machine: ``eval "$(../shared/docker/start-dockerd.sh)"`` and
``../shared/docker/make-python-base-image.sh`` first (see docker/README.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

SMOKE = Path(__file__).resolve().parents[2] / "docker" / "smoke.sh"
TIMEOUT_S = 1500  # a cold build (torch layer) plus the job's own 300 s budget and teardown
TEARDOWN_GRACE_S = 240  # after a timeout: SIGTERM lets the script's trap run `docker-compose down`


def _docker_unavailable() -> str | None:
    """Why the smoke cannot run here, or None."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if done.returncode != 0:
        return f"no Docker engine answers `docker info` (DOCKER_HOST={os.environ.get('DOCKER_HOST', '<unset>')})"
    return None


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "mutual-tls-and-tokens"])
def test_compose_cluster_trains_a_job_to_success_and_leaves_nothing_behind(secure):
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.Popen(
        ["bash", str(SMOKE)],
        env={**os.environ, "SECURE": "1" if secure else "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout can signal the script and its children
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap tears the cluster down
        try:
            output, _ = proc.communicate(timeout=TEARDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate(timeout=30)
        pytest.fail(f"docker/smoke.sh ran past {TIMEOUT_S} s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"docker/smoke.sh exited {proc.returncode}:\n{output[-8000:]}"
    assert "job succeeded" in output and "PASSED" in output, output[-4000:]
    assert "is left (containers, volumes, networks)" in output, output[-4000:]
    if secure:
        assert "no-token call refused (UNAUTHENTICATED), plaintext client refused" in output, output[-4000:]
