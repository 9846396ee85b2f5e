"""Operator tools: the ``lepton`` command line and what it runs for people (``lepton up`` and its
supervisor and report, status, scale, checkpoint, export, certs, healthcheck). The roles' shared
runtime (rpc, codec, wire, clients, config, security, metrics, tensors, ...) lives in ``lepton``
and imports nothing from here."""
