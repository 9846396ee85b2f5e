"""Contract tests: the descriptors, the servicers, the generated stubs and the import boundaries
agree with each other."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.events import EventKind
from coordinator.job import JobState
from coordinator.servicer import CoordinatorServicer
from lepton.v1 import coordinator_pb2, coordinator_pb2_grpc, parameter_server_pb2, parameter_server_pb2_grpc
from ps_server.servicer import ParameterServerServicer

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [
    (
        coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
        CoordinatorServicer,
        coordinator_pb2_grpc.CoordinatorServicer,
    ),
    (
        parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
        ParameterServerServicer,
        parameter_server_pb2_grpc.ParameterServerServicer,
    ),
]
DOMAIN_MODULES = [
    "coordinator.membership",
    "coordinator.ledger",
    "coordinator.layout",
    "coordinator.events",
    "coordinator.job",
    "coordinator.checkpoints",
    "ps_server.store",
    "ps_server.gate",
    "ps_server.roster",
    "ps_server.parameter_server",
    "ps_server.consistency",
    "ps_server.checkpoint_files",
    "worker.trainer",
    "lepton.tensors",
    "lepton.config",
    "lepton.retry",
    "lepton.workloads",
]


@pytest.mark.parametrize("descriptor, servicer, base", SERVICES, ids=lambda x: getattr(x, "name", ""))
def test_every_rpc_in_the_descriptor_is_implemented(descriptor, servicer, base):
    for method in descriptor.methods:
        implementation = getattr(servicer, method.name, None)
        assert implementation is not None, f"{descriptor.name}.{method.name} missing"
        assert implementation is not getattr(base, method.name), f"{descriptor.name}.{method.name} not overridden"


def test_generated_stubs_match_the_protos(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        cwd=ROOT, check=True,
    )
    generated = sorted(p.name for p in (tmp_path / "lepton" / "v1").iterdir())
    committed = sorted(
        p.name for p in (ROOT / "lepton" / "v1").iterdir() if p.name != "__init__.py" and p.suffix in (".py", ".pyi")
    )
    assert generated == committed
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "lepton" / "v1", ROOT / "lepton" / "v1", generated, shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch}{errors}: run `python -m lepton.protogen`"


def test_domain_modules_import_no_grpc_and_no_generated_code():
    probe = (
        "import importlib, sys\n"
        f"for name in {DOMAIN_MODULES!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] == 'grpc' or m.startswith(('lepton.v1', 'google.protobuf')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_domain_enums_share_the_wire_numbers():
    assert {s.name: s.value for s in JobState} == {
        n.removeprefix("JOB_STATE_"): v for n, v in coordinator_pb2.JobState.items() if v
    }
    assert {k.name: k.value for k in EventKind} == {
        n.removeprefix("EVENT_KIND_"): v for n, v in coordinator_pb2.EventKind.items() if v
    }
