"""A private network for one chaos test, made of Linux network namespaces.

A hub namespace holds a bridge (``br0``, 10.213.0.1/24); every member gets its own namespace with
one interface (``eth0``, 10.213.0.<10+i>/24) joined to the bridge by a veth pair. Addresses exist
only inside these namespaces: nothing is added to the host's own network. ``partition(name)``
takes the member's port on the bridge down (a pulled cable: packets in either direction are lost
silently, no connection is reset); ``heal(name)`` brings it back. ``close`` deletes every
namespace (and with them the veth pairs).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; ``available()`` says whether this
machine can.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

SUBNET = "10.213.0"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"lpprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create network namespaces: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except OSError as exc:
        return f"cannot create a bridge: {exc}"
    finally:
        _ip("netns", "del", probe)
    return None


class Fabric:
    """Namespaces for ``names`` (coordinator, ps-0, worker-1, ...) around one bridge."""

    def __init__(self, names: list[str]) -> None:
        if len(names) > 200:
            raise ValueError("at most 200 members")
        tag = uuid.uuid4().hex[:6]
        self.hub = f"lp{tag}-hub"
        self.hub_host = f"{SUBNET}.1"
        self.members: dict[str, tuple[str, str, str]] = {}  # name -> (netns, host, hub port)
        self._made: list[str] = []
        try:
            self._add_ns(self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.hub_host}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, name in enumerate(names):
                ns, host, port = f"lp{tag}-{i}", f"{SUBNET}.{10 + i}", f"v{i}"
                self._add_ns(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", port, "master", "br0")
                _ip("-n", self.hub, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{host}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self.members[name] = (ns, host, port)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    def in_hub(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hub, *argv]

    def host(self, name: str) -> str:
        return self.members[name][1]

    def partition(self, name: str) -> None:
        _ip("-n", self.hub, "link", "set", self.members[name][2], "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.hub, "link", "set", self.members[name][2], "up")

    def placement_file(self, path: Path) -> Path:
        """The JSON ``lepton up`` reads from LEPTON_UP_PLACEMENT: each child's command prefix and
        bind address."""
        path.write_text(
            json.dumps(
                {
                    name: {"exec": ["ip", "netns", "exec", ns], "host": host}
                    for name, (ns, host, _) in self.members.items()
                }
            )
        )
        return path

    def close(self) -> None:
        for ns in reversed(self._made):
            try:
                _ip("netns", "del", ns)
            except OSError:
                pass
        self._made.clear()
