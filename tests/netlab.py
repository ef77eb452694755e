"""The NAT lab (deploy/netlab) from the test suite: real routers in network namespaces.

``NetLab`` runs ``deploy/netlab hold`` (a private mount + network namespace with a tmpfs on
/run, so nothing outlives the test), then starts ``shoal`` daemons inside the lab's named
namespaces through ``nsenter`` + ``ip netns exec``. The daemons' homes and control sockets are
plain files, so the test talks to them as to any other daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import FAST, REPO, Daemon

LAB = REPO / "deploy" / "netlab"
PORT = 4001
PUBLIC_IPS = {"relay": "203.0.113.10", "pub": "203.0.113.11"}
ROUTER_INDEX = {"A": 1, "B": 2, "C": 3, "D": 4}
# Quick NAT settings for tests: probe often, give up on filtered ports fast.
NAT_FAST = [
    "--nat-probe-interval-s",
    "5",
    "--nat-dialback-timeout-s",
    "2",
    "--holepunch-attempt-timeout-s",
    "3",
    "--bulk-handshake-timeout-s",
    "2",
]


def lab_unavailable() -> str | None:
    """Why the lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs {tool} (deploy/netlab-deps.sh installs it)"
    probe = subprocess.run(["unshare", "-nm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    return None


def host_ip(ns: str) -> str:
    """The address of a lab host: public nodes on the bridge, hX behind router rX."""
    if ns in PUBLIC_IPS:
        return PUBLIC_IPS[ns]
    return f"10.0.{ROUTER_INDEX[ns[1:]]}.2"


def router_public_ip(ns: str) -> str:
    return f"203.0.113.{ROUTER_INDEX[ns[1:]]}"


class NetLab:
    def __init__(self, tmp: Path, routers: str) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [str(LAB), "hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NETLAB_ROUTERS": routers},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("netlab ready"):
            self.proc.kill()
            raise AssertionError(f"lab did not come up: {line!r} {self.proc.stderr.read()}")
        self.pid = int(line.split()[2])
        self.daemons: list[Daemon] = []
        self.processes: list[subprocess.Popen[str]] = []

    def prefix(self, ns: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "ip", "netns", "exec", ns]

    def sh(self, ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(ns), *cmd], capture_output=True, text=True, timeout=30, check=False
        )

    def start_process(self, ns: str, *cmd: str, ready: str) -> subprocess.Popen[str]:
        """A helper process inside ``ns`` (killed with the lab), once it printed ``ready``."""
        proc = subprocess.Popen(
            [*self.prefix(ns), *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if ready not in line:
            raise AssertionError(f"{cmd[0]} in {ns} did not start: {line}{proc.stdout.read()}")
        return proc

    def spawn(
        self, ns: str, *args: str, join: Daemon | None = None, port: int = PORT, home: str = ""
    ) -> Daemon:
        extra = ["--join", join.join_addr] if join is not None else []
        daemon = Daemon(
            self.tmp / (home or ns),
            ["--listen", f"/ip4/{host_ip(ns)}/tcp/{port}", *FAST, *NAT_FAST, *extra, *args],
            prefix=self.prefix(ns),
        )
        self.daemons.append(daemon)
        return daemon.start()

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        for proc in self.processes:
            proc.kill()
            proc.wait(10)
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the lab's holder exits; its namespaces go with it
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def netlab(tmp: Path, routers: str) -> Iterator[NetLab]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    lab = NetLab(tmp, routers)
    try:
        yield lab
    finally:
        lab.close()
