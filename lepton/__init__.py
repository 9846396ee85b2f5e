"""Lepton: distributed PyTorch training as separately deployable gRPC services.

This package holds what every role shares: generated contract stubs (``lepton.v1``), the tensor
codec, job configuration, logging, retry policy and gRPC plumbing. The ``lepton`` command line and
the operator tools are in ``lepton.ops``.
"""

import os

__version__ = "0.1.0"

# The gRPC C core writes its own log lines (e.g. "Handshake failed" for a client without TLS) to
# stderr as plain text, between the JSON lines. grpcio reads GRPC_VERBOSITY once, when grpc is
# first imported, so it is set here, before any Lepton module imports grpc: NONE unless the
# operator set it (ERROR, INFO or DEBUG show them again; docs/observability.md).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# Read once, when grpc is first imported (see lepton/ops/cli.py): a process that imports lepton
# first can fork the children of `lepton up` or `lepton.run_local` while its own calls are in flight.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

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
