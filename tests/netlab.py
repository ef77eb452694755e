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
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import FAST, REPO, Daemon

LAB = REPO / "deploy" / "netlab"
IGD = REPO / "deploy" / "netlab-igd"
STUN_RESPONDER = REPO / "tests" / "stun_responder.py"
PORT = 4001
PUBLIC_IPS = {"relay": "203.0.113.10", "pub": "203.0.113.11"}
STUN_IPS = ("203.0.113.20", "203.0.113.21")
HELPER_READY_S = 30.0  # a lab helper (STUN responder, miniupnpd) prints its ready line by then
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


def gateway_unavailable() -> str | None:
    """Why the real UPnP/NAT-PMP gateway (miniupnpd) cannot run in the lab, or None."""
    for tool in ("miniupnpd", "nft"):
        if shutil.which(tool) is None:
            return f"the lab's gateway needs {tool} (deploy/netlab-deps.sh installs miniupnpd)"
    return None


class LabProcess:
    """A helper process inside the lab whose output lines are collected as they come."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float = HELPER_READY_S, after: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines[after:]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.cmd[-3:]}: no {text!r} in:\n" + self.output())
            time.sleep(0.05)

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


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
        self.processes: list[LabProcess] = []
        self.stun: list[LabProcess] = []

    def prefix(self, ns: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "ip", "netns", "exec", ns]

    def sh(self, ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(ns), *cmd], capture_output=True, text=True, timeout=30, check=False
        )

    def start_process(self, ns: str, *cmd: str, ready: str) -> LabProcess:
        """A helper process inside ``ns`` (killed with the lab), once it printed ``ready``."""
        proc = LabProcess([*self.prefix(ns), *cmd])
        self.processes.append(proc)
        proc.wait_for(ready)
        return proc

    def start_gateway(self, router: str, mode: str) -> LabProcess:
        """The real miniupnpd on ``router`` (deploy/netlab-igd), speaking ``mode``: upnp,
        natpmp or both; it learns its public address from the lab's STUN responder."""
        if not self.stun:
            self.stun.append(
                self.start_process(
                    "stun", sys.executable, str(STUN_RESPONDER), *STUN_IPS, ready="stun ready"
                )
            )
        home = str(self.tmp / f"igd-{router}")
        gateway = self.start_process(
            router, str(IGD), home, mode, ready="Port forwarding is now enabled"
        )
        gateway.wait_for("Listening for NAT-PMP" if mode == "natpmp" else "HTTP listening")
        return gateway

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
