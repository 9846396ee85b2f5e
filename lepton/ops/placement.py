"""Where ``lepton up`` runs each child and which address it binds.

By default every child runs here and binds loopback (127.0.0.1). The chaos suite's network
partitions need each child in its own network namespace with its own address, so ``lepton up``
also reads a placement file named by the ``LEPTON_UP_PLACEMENT`` environment variable: a JSON
object mapping a child's name (``coordinator``, ``ps-0``, ``worker-2``, ...) to
``{"exec": [command prefix], "host": "bind address"}``, for example
``{"ps-0": {"exec": ["ip", "netns", "exec", "ns-ps0"], "host": "10.213.0.11"}}``. Children it
does not name run by default. It is a test hook: `lepton up` is a local cluster, and real
deployments place services with compose or Kubernetes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import ConfigError

ENV_VAR = "LEPTON_UP_PLACEMENT"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Placement:
    prefix: tuple[str, ...] = ()
    host: str = LOOPBACK


class Placements:
    def __init__(self, table: Mapping[str, Placement] | None = None) -> None:
        self._table = dict(table or {})

    def __call__(self, name: str) -> Placement:
        return self._table.get(name, Placement())

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Placements:
        path = env.get(ENV_VAR)
        if not path:
            return cls()
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{ENV_VAR}={path}: cannot read a JSON placement file: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{ENV_VAR}={path}: expected a JSON object of child name -> placement")
        table = {}
        for name, entry in raw.items():
            prefix, host = entry.get("exec", []), entry.get("host", LOOPBACK)
            if not (isinstance(prefix, list) and all(isinstance(p, str) for p in prefix) and isinstance(host, str)):
                raise ConfigError(f"{ENV_VAR}={path}: {name!r} needs exec (a list of strings) and host (a string)")
            table[name] = Placement(tuple(prefix), host)
        return cls(table)
