"""Port mapping on the home router: UPnP IGD through miniupnpc, or NAT-PMP (RFC 6886).

``map_port`` asks the UPnP gateway found by SSDP to forward ``external_port`` (the listen port,
so dial-backs and peers use the port the node listens on) to this machine, with a lease, and
returns what happened. miniupnpc (the maintained C library behind most UPnP clients; its Python
binding already comes with py-libp2p) blocks, so every call runs in a worker thread under
``timeout_s``.

``NatPmpClient`` is the thin trio driver of ``protocols.natpmp.NatPmpMapping``: one UDP socket
connected to the default gateway's port 5351, the machine's datagrams out, the gateway's in,
its deadlines as the only timer. It runs while the mapping lives and returns the failure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from protocols.natpmp import PORT as NATPMP_PORT
from protocols.natpmp import Failed, Mapped, NatPmpMapping

log = logging.getLogger("shoal.net.portmap")

DESCRIPTION = "shoal"


@dataclass(frozen=True)
class PortMapping:
    ok: bool
    method: str = "upnp"
    external_ip: str = ""
    external_port: int = 0
    internal: str = ""
    lease_s: int = 0
    reason: str = ""
    renewals: int = 0
    gateway_restarts: int = 0  # NAT-PMP: epochs that went back (the gateway lost its state)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "ok": self.ok, "reason": self.reason}
        if self.ok:
            out.update(
                external=f"{self.external_ip}:{self.external_port}",
                internal=self.internal,
                lease_s=self.lease_s,
                renewals=self.renewals,
                gateway_restarts=self.gateway_restarts,
            )
        return out


def _map_blocking(internal_port: int, lease_s: int, discover_ms: int) -> PortMapping:
    try:
        import miniupnpc
    except ImportError as exc:  # the binding is a py-libp2p dependency; report, don't crash
        return PortMapping(False, reason=f"miniupnpc unavailable: {exc}")
    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = discover_ms
    try:
        if upnp.discover() == 0:
            return PortMapping(False, reason="no UPnP IGD answered on the local network")
        upnp.selectigd()
        external_ip = str(upnp.externalipaddress())
        lan_ip = str(upnp.lanaddr)
        existing = upnp.getspecificportmapping(internal_port, "TCP")
        if existing is not None and tuple(existing[:2]) != (lan_ip, internal_port):
            return PortMapping(
                False,
                reason=f"port {internal_port} is already mapped to {existing[0]}:{existing[1]}",
            )
        upnp.addportmapping(internal_port, "TCP", lan_ip, internal_port, DESCRIPTION, "", lease_s)
    except Exception as exc:  # miniupnpc raises a bare Exception with the UPnP error text
        return PortMapping(False, reason=f"UPnP gateway refused: {exc}")
    return PortMapping(
        True,
        external_ip=external_ip,
        external_port=internal_port,
        internal=f"{lan_ip}:{internal_port}",
        lease_s=lease_s,
    )


async def map_port(internal_port: int, lease_s: int, timeout_s: float) -> PortMapping:
    """Map TCP ``internal_port`` on the UPnP gateway; never raises."""
    # miniupnpc waits this long per device type it searches for (several): a quarter of the
    # budget each, at most its own default of 2 s.
    discover_ms = max(200, min(2000, int(timeout_s * 1000) // 4))
    with trio.move_on_after(timeout_s):
        # trio-stubs (via trio_typing) still say "cancellable"; trio 0.35 says abandon_on_cancel.
        mapping = functools.partial(_map_blocking, internal_port, lease_s, discover_ms)
        result = await trio.to_thread.run_sync(mapping, abandon_on_cancel=True)  # type: ignore[call-arg]
        if result.ok:
            log.info(
                "port mapping: %s:%d -> %s (UPnP, lease %d s)",
                result.external_ip,
                result.external_port,
                result.internal,
                lease_s,
            )
        else:
            log.info("no port mapping: %s", result.reason)
        return result
    return PortMapping(False, reason=f"UPnP gateway did not answer within {timeout_s} s")


def _unmap_blocking(port: int) -> None:
    import miniupnpc

    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = 200
    if upnp.discover():
        upnp.selectigd()
        upnp.deleteportmapping(port, "TCP")


async def unmap_port(port: int, timeout_s: float) -> None:
    """Remove our mapping (best effort, on leave)."""
    with trio.move_on_after(timeout_s):
        try:
            unmap = functools.partial(_unmap_blocking, port)
            await trio.to_thread.run_sync(unmap, abandon_on_cancel=True)  # type: ignore[call-arg]
        except Exception as exc:
            log.debug("could not remove port mapping %d: %s", port, exc)


# ---------------------------------------------------------------------- NAT-PMP

ROUTE_TABLE = Path("/proc/net/route")
RTF_GATEWAY = 0x2


def default_gateway(route_table: str | None = None) -> str | None:
    """The IPv4 default route's gateway, from Linux's /proc/net/route (None if there is none)."""
    try:
        text = route_table if route_table is not None else ROUTE_TABLE.read_text()
    except OSError:
        return None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[1] != "00000000":
            continue
        try:
            gateway, flags = int(fields[2], 16), int(fields[3], 16)
        except ValueError:
            continue
        if flags & RTF_GATEWAY and gateway:
            return socket.inet_ntoa(struct.pack("<I", gateway))
    return None


class NatPmpClient:
    """Keeps one NAT-PMP mapping of TCP ``internal_port`` on the default gateway."""

    def __init__(
        self, internal_port: int, lease_s: int, timeout_s: float, gateway: str | None = None
    ) -> None:
        self.internal_port = internal_port
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.gateway = gateway  # None: the default gateway, looked up when ``run`` starts
        self.machine = NatPmpMapping(internal_port, lease_s)
        self._lan_ip = ""

    def _failure(self, reason: str) -> PortMapping:
        return PortMapping(False, method="natpmp", reason=reason)

    def _mapping(self, mapped: Mapped) -> PortMapping:
        return PortMapping(
            True,
            method="natpmp",
            external_ip=mapped.external_ip,
            external_port=mapped.external_port,
            internal=f"{self._lan_ip}:{self.internal_port}",
            lease_s=mapped.lifetime_s,
            renewals=self.machine.renewals,
            gateway_restarts=self.machine.gateway_restarts,
        )

    async def run(self, on_change: Callable[[PortMapping], None]) -> PortMapping:
        """Map, then renew at half-life until the gateway stops answering or refuses; returns
        why it ended (never raises). ``on_change`` gets every new or renewed mapping."""
        gateway = self.gateway = self.gateway or default_gateway()
        if gateway is None:
            return self._failure("no default gateway to ask for a NAT-PMP mapping")
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                await sock.connect((gateway, NATPMP_PORT))  # only the gateway's answers arrive
                self._lan_ip = sock.getsockname()[0]
                return await self._drive(sock, gateway, on_change)
            except OSError as exc:
                return self._failure(f"NAT-PMP gateway {gateway}: {exc.strerror or exc}")

    async def _drive(
        self, sock: trio.socket.SocketType, gateway: str, on_change: Callable[[PortMapping], None]
    ) -> PortMapping:
        machine = self.machine
        give_up_at = trio.current_time() + self.timeout_s  # for the first mapping only
        for datagram in machine.start(trio.current_time()):
            await sock.send(datagram)
        last: Mapped | None = None
        while True:
            deadline = machine.deadline()
            if machine.outcome is None:
                deadline = give_up_at if deadline is None else min(deadline, give_up_at)
            out: list[bytes] = []
            with trio.move_on_at(1e18 if deadline is None else deadline):
                try:
                    data = await sock.recv(1100)
                except ConnectionRefusedError:  # ICMP port unreachable: nothing listens there
                    if machine.outcome is None:
                        return self._failure(
                            f"gateway {gateway} does not speak NAT-PMP "
                            f"(UDP port {NATPMP_PORT} closed)"
                        )
                    data = b""  # a mapping is held: the gateway restarting? resend as planned
                dropped = machine.dropped
                out = machine.on_datagram(data, trio.current_time()) if data else []
                if machine.dropped > dropped:
                    reason = machine.rejected[-1]
                    log.debug("NAT-PMP: dropped a datagram from %s: %s", gateway, reason)
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                if machine.outcome is None and now >= give_up_at:
                    return self._failure(
                        f"NAT-PMP gateway {gateway} did not answer within {self.timeout_s} s"
                    )
                out += machine.on_timer(now)
            outcome = machine.outcome
            if isinstance(outcome, Failed):
                log.info("no NAT-PMP mapping: %s", outcome.reason)
                return self._failure(outcome.reason)
            if isinstance(outcome, Mapped) and outcome is not last:
                last = outcome
                mapping = self._mapping(outcome)
                log.info(
                    "port mapping: %s -> %s (NAT-PMP, lifetime %d s, renewal %d)",
                    mapping.to_wire()["external"],
                    mapping.internal,
                    outcome.lifetime_s,
                    machine.renewals,
                )
                on_change(mapping)
            for datagram in out:
                await sock.send(datagram)

    async def release(self) -> None:
        """Delete the mapping on the gateway (best effort, on leave; ``run`` may be over)."""
        datagrams = self.machine.release(trio.current_time())
        if not datagrams or self.gateway is None:
            return
        with (
            trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
            contextlib.suppress(OSError),
        ):
            await sock.connect((self.gateway, NATPMP_PORT))
            for datagram in datagrams:
                await sock.send(datagram)
