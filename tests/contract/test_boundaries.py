"""Import boundaries of the typed clients: the agents outside servicers never import generated
messages, and the control plane's values import neither grpc nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.control_wire import ROLE_FROM_WIRE
from lepton.domain import JobState, LeaseOutcome, Role
from lepton.v1 import common_pb2, coordinator_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVICERS = {"ps_server/servicer.py"}  # a servicer decodes and encodes: it alone may hold messages
NO_MESSAGES = sorted(
    str(p.relative_to(ROOT))
    for package in ("worker", "ps_server")
    for p in (ROOT / package).glob("*.py")
    if str(p.relative_to(ROOT)) not in SERVICERS
)


def generated_imports(source: str) -> list[str]:
    """Generated modules (``*_pb2``, ``*_pb2_grpc``, anything from ``lepton.v1``) that ``source``
    imports, at any depth of the file (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if n.startswith("lepton.v1") or n.split(".")[-1].endswith(("_pb2", "_pb2_grpc"))]
    return found


def test_the_check_sees_every_form_of_import():
    source = (
        "import lepton.v1.common_pb2\n"
        "from lepton.v1 import coordinator_pb2 as cpb\n"
        "def f():\n    from grpc_health.v1 import health_pb2\n"
        "import json\nfrom lepton.domain import Role\n"
    )
    assert sorted(set(generated_imports(source))) == [
        "grpc_health.v1.health_pb2", "lepton.v1", "lepton.v1.common_pb2", "lepton.v1.coordinator_pb2",
    ]


def test_every_worker_module_is_checked():
    assert {"worker/agent.py", "worker/dataplane.py", "worker/heartbeat.py"} <= set(NO_MESSAGES)


def test_every_parameter_server_module_but_the_servicer_is_checked():
    assert {"ps_server/main.py", "ps_server/parameter_server.py", "ps_server/gate.py"} <= set(NO_MESSAGES)
    assert "ps_server/servicer.py" not in NO_MESSAGES


@pytest.mark.parametrize("path", NO_MESSAGES)
def test_agents_import_no_generated_messages(path):
    assert generated_imports((ROOT / path).read_text()) == []


def test_the_control_plane_values_import_neither_grpc_nor_torch():
    probe = (
        "import sys, lepton.domain\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch', 'google'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_coordinator_client_imports_no_torch():
    probe = (
        "import sys, lepton.coordinator_client\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_domain_enums_carry_the_contract_numbers():
    assert {s.name: s.value for s in LeaseOutcome} == {
        n.removeprefix("LEASE_OUTCOME_"): v for n, v in coordinator_pb2.LeaseOutcome.items() if v
    }
    assert {s.name: s.value for s in JobState} == {
        n.removeprefix("JOB_STATE_"): v for n, v in coordinator_pb2.JobState.items() if v
    }
    assert {ROLE_FROM_WIRE[v] for v in common_pb2.Role.values() if v} == set(Role)


def imported_modules(source: str) -> set[str]:
    """Every module ``source`` imports, at any depth of the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    return found


def reaches(source: str, package: str) -> set[str]:
    return {m for m in imported_modules(source) if m == package or m.startswith(package + ".")}


@pytest.mark.parametrize("module, above", [("lepton.metrics", "lepton.rpc"), ("lepton.tasks", "lepton.workloads")])
def test_a_lower_module_does_not_import_the_one_that_uses_it(module, above):
    """rpc uses metrics and workloads use tasks; neither lower module imports them back."""
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert imported_modules(source) and reaches(source, above) == set()


def test_the_runtime_imports_nothing_of_the_operator_tools():
    """lepton.ops sits above the shared runtime; only the entry points (``python -m lepton``,
    ``python -m lepton.healthcheck``) reach into it."""
    entry_points = {"__main__.py", "healthcheck.py"}
    runtime = [p for p in sorted((ROOT / "lepton").rglob("*.py")) if p.relative_to(ROOT / "lepton").parts[0] != "ops"]
    assert len(runtime) > 20
    offenders = [
        str(p.relative_to(ROOT)) for p in runtime if p.name not in entry_points and reaches(p.read_text(), "lepton.ops")
    ]
    assert offenders == []
