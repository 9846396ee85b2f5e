"""Lepton: distributed PyTorch training as separately deployable gRPC services.

This package holds what every role shares: generated contract stubs (``lepton.v1``), the tensor
codec, job configuration, logging, retry policy and gRPC plumbing. The ``lepton`` command line and
the operator tools are in ``lepton.ops``.
"""

import os

# Read once, when grpc is first imported (see lepton/ops/cli.py): a process that imports lepton
# first can fork the children of `lepton up` or `lepton.run_local` while its own calls are in flight.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

# The Python API (README "From Python"), loaded on first use: importing lepton stays cheap and
# the runtime does not load the operator tools (lepton.ops) unless run_local is asked for.
_API = {
    "JobSpec": "lepton.config",
    "run_local": "lepton.ops.api",
    "LocalJob": "lepton.ops.api",
    "JobResult": "lepton.ops.api",
    "CoordinatorClient": "lepton.coordinator_client",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lepton' has no attribute {name!r}")
