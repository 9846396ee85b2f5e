"""Lepton: distributed PyTorch training as separately deployable gRPC services.

This package holds what every role shares: generated contract stubs (``lepton.v1``), the tensor
codec, job configuration, logging, retry policy and gRPC plumbing. The ``lepton`` command line and
the operator tools are in ``lepton.ops``.
"""

__version__ = "0.1.0"
