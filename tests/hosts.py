"""Test hosts: Linux network namespaces of our own, each with its own address on a private bridge.

Each `Host` is a namespace with one interface on a bridge the test creates (a /24 in 10.231.0.0/16 picked
per process, so concurrent runs do not collide); the test process reaches every host through the bridge's
own address. Everything is removed at the end. Needs root and `ip netns`; `hosts_available()` says why
not where they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from celery_serve._runtime.launcher import ManagedProcess, ProcessGroup


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def hosts_available() -> str | None:
    """None when network namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"csprobe{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    group: ProcessGroup = field(default_factory=ProcessGroup)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        return self.group.start(f"{self.name}:{name}", ["ip", "netns", "exec", self.namespace, *cmd], env=env)

    def run(
        self, cmd: list[str], env: dict[str, str] | None = None, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *cmd], env=env, capture_output=True, text=True, timeout=timeout_s
        )


class Network:
    """A bridge and the hosts on it; `close()` stops every process and removes every namespace and link."""

    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.bridge = f"csbr{tag}"
        self.subnet = f"10.231.{os.getpid() % 250}"
        self.hosts: list[Host] = []
        self._check(_ip("link", "add", self.bridge, "type", "bridge"))
        self._check(_ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge))
        self._check(_ip("link", "set", self.bridge, "up"))

    @staticmethod
    def _check(done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(done.args)}: {done.stderr.strip()}")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        namespace = f"cs{os.getpid() % 100_000}{name}"
        outside = f"csv{os.getpid() % 10_000}{index}"
        address = f"{self.subnet}.{index}"
        self._check(_ip("netns", "add", namespace))
        self._check(_ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", namespace))
        self._check(_ip("link", "set", outside, "master", self.bridge))
        self._check(_ip("link", "set", outside, "up"))
        for args in (
            ("addr", "add", f"{address}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
        ):
            self._check(_ip("netns", "exec", namespace, "ip", *args))
        host = Host(name, namespace, address)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.group.stop()
        for host in self.hosts:
            _ip("netns", "del", host.namespace)
        _ip("link", "del", self.bridge)
