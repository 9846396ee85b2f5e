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
