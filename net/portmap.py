"""Port mapping on the home router through UPnP IGD, with miniupnpc (the maintained C library
behind most UPnP clients; its Python binding already comes with py-libp2p).

``map_port`` asks the gateway found by SSDP to forward ``external_port`` (the listen port, so
dial-backs and peers use the port the node listens on) to this machine, with a lease, and
returns what happened. miniupnpc blocks, so every call runs in a worker thread under
``timeout_s``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import trio

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

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "ok": self.ok, "reason": self.reason}
        if self.ok:
            out.update(
                external=f"{self.external_ip}:{self.external_port}",
                internal=self.internal,
                lease_s=self.lease_s,
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
