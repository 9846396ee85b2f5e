"""Lepton: distributed PyTorch training as separately deployable gRPC services.

This package holds what every role shares: generated contract stubs (``lepton.v1``), the tensor
codec, job configuration, logging, retry policy, gRPC plumbing and the ``lepton`` command line.
"""

__version__ = "0.1.0"
