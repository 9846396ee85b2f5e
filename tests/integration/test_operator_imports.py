"""`lepton status`, `lepton checkpoint`, `lepton scale` and `lepton healthcheck` import no torch:
each runs in a subprocess under ``python -X importtime``, against a real coordinator and against
an unreachable one, and its import log must name no torch module."""

from __future__ import annotations

import subprocess
import sys

import pytest

UNREACHABLE = "127.0.0.1:1"  # port 1 on loopback: nothing listens, the connection is refused


def imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[-1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def run_light(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -X importtime ARGS``: the finished process and the modules it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=60)
    modules = imported(done.stderr)
    assert "lepton" in modules, done.stderr[-2000:]
    return done, modules


def torch_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "torch" or m.startswith("torch."))


def test_the_import_log_is_read():
    # The parse must see torch where it is imported, or the assertions below prove nothing.
    _, modules = run_light("-c", "import lepton.clients")
    assert "torch" in torch_modules(modules)


@pytest.mark.parametrize(
    "argv",
    [
        ["lepton", "status", "--coordinator", UNREACHABLE],
        ["lepton", "status", "--coordinator", UNREACHABLE, "--json"],
        ["lepton", "checkpoint", "--coordinator", UNREACHABLE],
        ["lepton", "scale", "--state-dir", "{tmp}", "--workers", "2", "--timeout", "1"],
        ["lepton.healthcheck", UNREACHABLE, "--timeout", "1"],
        ["lepton", "healthcheck", UNREACHABLE, "--timeout", "1"],
    ],
    ids=lambda a: " ".join(a[:2]) + (" --json" if "--json" in a else ""),
)
def test_operator_commands_import_no_torch_when_nothing_answers(argv, tmp_path):
    done, modules = run_light("-m", *[a.format(tmp=tmp_path) for a in argv])
    assert done.returncode != 0, done.stdout  # it tried, and said it could not reach anything
    assert torch_modules(modules) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["lepton", "status", "--coordinator", "{address}"],
        ["lepton", "status", "--coordinator", "{address}", "--json"],
        ["lepton", "checkpoint", "--coordinator", "{address}"],
        ["lepton.healthcheck", "{address}", "--timeout", "5"],
        ["lepton", "healthcheck", "{address}", "--timeout", "5"],
    ],
    ids=lambda a: " ".join(a[:2]) + (" --json" if "--json" in a else ""),
)
def test_operator_commands_import_no_torch_against_a_real_coordinator(argv, idle_cluster):
    done, modules = run_light("-m", *[a.format(address=idle_cluster.coordinator) for a in argv])
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch_modules(modules) == []
