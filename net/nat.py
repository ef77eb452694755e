"""NAT traversal for one node: dial-back reachability, observed mappings, relays, hole punching.

Pieces (rules in protocols/nat.py, protocols/relay.py, protocols/dcutr.py; I/O here):

- *Probe server*: a small TCP listener that answers every connection with the ``ip port`` it
  came from and closes. A node connects to members' probe servers *from its own listen port*
  (SO_REUSEPORT), so what they see is the public mapping of that port: the address to give a
  peer for hole punching, and, compared across two members, whether the NAT maps per
  destination.
- *Dial-back*: on ``nat.probe {nonce, port}`` a member opens a fresh TCP connection to the IP
  it sees our connection come from, at ``port``, and answers ``nat.probe_result`` (ok or the
  reason) with its probe server's port. Only the observed IP is ever dialed, so a node cannot
  be used to make connections to third parties.
- *Relays*: a public node serves circuit relay v2 (:mod:`net.relay`); a private node keeps
  ``relay_reservations`` reservations on directly connected members and publishes
  ``<relay>/p2p/<relay id>/p2p-circuit`` addresses in its presence record.
- *Connect*: direct addresses first; then, for a member reachable only through a relay, the
  lower peer id of the pair dials through the relay (so two private members make one circuit,
  not two), and the member that accepted the circuit starts DCUtR (:mod:`net.holepunch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from net.holepunch import HolePuncher, HolePunchSettings
from net.host import allow_redial, connection_info
from net.links import ControlLinks
from net.portmap import NatPmpClient, PortMapping, map_port, unmap_port
from net.relay import RelayError, RelayService, RelaySettings, circuit_addr, parse_circuit_addr
from protocols.nat import (
    PUBLIC,
    NatMessageError,
    Observations,
    Reachability,
    advice,
    parse_observed_line,
    parse_probe,
    parse_probe_result,
)

log = logging.getLogger("shoal.net.nat")

PROBE_LINE_BYTES = 64


@dataclass(frozen=True)
class NatSettings:
    min_answers: int = 2
    probe_interval_s: float = 60.0
    dialback_timeout_s: float = 3.0
    probe_port: int = 0
    relay_service: str = "auto"  # auto: relay while public | off
    reservations: int = 2
    relay_retry_s: float = 10.0  # after a relay refused or failed a reservation
    direct_dial_timeout_s: float = 1.5
    wait_for_dialer_s: float = 5.0
    holepunch: bool = True
    relay: RelaySettings = field(default_factory=RelaySettings)
    punch: HolePunchSettings = field(default_factory=HolePunchSettings)
    max_probe_connections: int = 32
    # Tried in this order; the first that maps wins. Empty: no port mapping.
    port_mapping_methods: tuple[str, ...] = ("upnp", "natpmp")
    port_mapping_timeout_s: float = 5.0
    port_mapping_lease_s: int = 3600


@dataclass
class _Reservation:
    relay_addr: str
    expires_at: float


@dataclass
class _Probe:
    nonce: int
    sent_at: float


@dataclass
class NatState:
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    refused_relays: dict[str, float] = field(default_factory=dict)  # relay -> retry after
    probes: dict[str, _Probe] = field(default_factory=dict)
    last_probe: dict[str, float] = field(default_factory=dict)
    probe_ports: dict[str, int] = field(default_factory=dict)
    relay_rtt_ms: dict[str, float] = field(default_factory=dict)
    reserving: set[str] = field(default_factory=set)  # reservation requests in flight


class NatService:
    """The NAT side of one node; the daemon calls ``connect``, ``on_message``, ``extra_addrs``."""

    def __init__(
        self,
        host: IHost,
        links: ControlLinks,
        self_id: str,
        protocol: Callable[[str], str],
        settings: NatSettings,
        members: Callable[[], list[str]],
        rtt_ms: Callable[[str], float | None],
        on_path_change: Callable[[str], None],
    ) -> None:
        self.host = host
        self.links = links
        self.self_id = self_id
        self.settings = settings
        self.members = members
        self.rtt_ms = rtt_ms
        self.on_path_change = on_path_change
        self.reachability = Reachability(
            settings.min_answers, max(600.0, 3 * settings.probe_interval_s)
        )
        self.observations = Observations(max(600.0, 3 * settings.probe_interval_s))
        self.state = NatState()
        self.probe_port = 0
        self.port_mapping = PortMapping(False, method="none", reason="not tried")
        self._natpmp: NatPmpClient | None = None
        self._observed = trio.Event()  # set when a member's probe server told us our address
        self._nursery: trio.Nursery | None = None
        self._probe_slots = trio.Semaphore(settings.max_probe_connections)
        self._dialing_back: set[str] = set()
        self.relay = RelayService(
            host,
            protocol,
            settings.relay,
            enabled=self._relaying,
            serves=lambda peer: peer in set(self.members()),
            accept_from=lambda relay: relay in self.state.reservations,
            on_inbound_circuit=self._on_inbound_circuit,
        )
        self.puncher = HolePuncher(
            host,
            protocol("dcutr"),
            settings.punch,
            own_addrs=self.observed_addrs,
            wait_own_addrs=self.wait_for_observed_addrs,
            source=self.listen_source,
            is_direct=self._has_direct,
            on_direct=self._on_direct,
        )

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, bind_host: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.settings.probe_port, host=bind_host)
        self.probe_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(trio.serve_listeners, self._answer_probe, listeners)
            source = self.listen_source()
            # Behind a router (a private listen address, not loopback: SSDP would leave the
            # machine for nothing) ask the router for a port mapping.
            ip = None if source is None else ipaddress.ip_address(source[0])
            if (
                self.settings.port_mapping_methods
                and source is not None
                and ip is not None
                and (ip.is_unspecified or _is_private(f"/ip4/{ip}"))
                and not ip.is_loopback
            ):
                nursery.start_soon(self._keep_port_mapping, source[1])
            task_status.started()
            while True:
                self._tick()
                await trio.sleep(min(1.0, self.settings.probe_interval_s / 4))

    async def _keep_port_mapping(self, port: int) -> None:
        """Map the listen port with the first method that works (UPnP IGD, NAT-PMP, in the
        configured order) and keep it: UPnP is mapped again at half the lease, NAT-PMP renews
        itself at half the granted lifetime. When every method fails, retry rarely."""
        failures = 0
        lease_s = self.settings.port_mapping_lease_s
        timeout_s = self.settings.port_mapping_timeout_s
        while True:
            reasons = []
            for method in self.settings.port_mapping_methods:
                if method == "upnp":
                    result = await map_port(port, lease_s, timeout_s)
                    if result.ok:
                        held = self.port_mapping
                        renewals = held.renewals + 1 if held.ok and held.method == "upnp" else 0
                        self._set_port_mapping(dataclasses.replace(result, renewals=renewals))
                        failures = 0
                        await trio.sleep(lease_s / 2)
                        break
                else:
                    self._natpmp = NatPmpClient(port, lease_s, timeout_s)
                    result = await self._natpmp.run(self._set_port_mapping)
                    if self.port_mapping.ok and self.port_mapping.method == "natpmp":
                        failures = 0  # it was mapped, then lost: start over at once
                        self.port_mapping = result
                        break
                reasons.append(result)
            else:
                self.port_mapping = PortMapping(
                    False,
                    method=",".join(r.method for r in reasons),
                    reason="; ".join(f"{r.method}: {r.reason}" for r in reasons),
                )
                # once more soon (a gateway slow to answer), then rarely
                failures += 1
                await trio.sleep(self.settings.probe_interval_s * (1 if failures == 1 else 10))

    def _set_port_mapping(self, mapping: PortMapping) -> None:
        if not self.port_mapping.ok or (
            (self.port_mapping.external_ip, self.port_mapping.external_port)
            != (mapping.external_ip, mapping.external_port)
        ):
            self.state.last_probe.clear()  # reachability may have changed: ask again
        self.port_mapping = mapping

    def verdict(self) -> str:
        return self.reachability.verdict(time.monotonic())

    def _relaying(self) -> bool:
        return self.settings.relay_service == "auto" and self.verdict() == PUBLIC

    def listen_source(self) -> tuple[str, int] | None:
        """The (ip, port) our libp2p host listens on: hole punches and probes leave from it."""
        for addr in self.host.get_transport_addrs():
            text = str(addr).split("/")
            if len(text) > 4 and text[1] == "ip4" and text[3] == "tcp":
                return text[2], int(text[4])
        return None

    # ------------------------------------------------------------------ periodic work

    def _tick(self) -> None:
        now = time.monotonic()
        live = set(self.members())
        for peer in list(self.state.probes):
            if now - self.state.probes[peer].sent_at > 2 * self.settings.dialback_timeout_s + 5:
                del self.state.probes[peer]  # no answer: try again next interval
        for peer in [p for p in self.state.reservations if p not in live]:
            del self.state.reservations[peer]
        for peer in sorted(live):
            if not self._has_direct(peer) or peer in self.state.probes:
                continue
            if now - self.state.last_probe.get(peer, -1e9) >= self.settings.probe_interval_s:
                self._send_probe(peer, now)
        if self.verdict() != PUBLIC:  # unknown too: a circuit address early costs little
            self._keep_reservations(now, live)
        elif self.state.reservations:
            log.info("reachable: dropping relay reservations")
            self.state.reservations.clear()

    def _send_probe(self, peer: str, now: float) -> None:
        source = self.listen_source()
        if source is None or self._nursery is None:
            return
        probe = _Probe(random.getrandbits(62), now)
        self.state.probes[peer] = probe
        self.state.last_probe[peer] = now
        port = self.port_mapping.external_port if self.port_mapping.ok else source[1]
        self._nursery.start_soon(
            self.links.send, peer, {"t": "nat.probe", "nonce": probe.nonce, "port": port}
        )

    def _keep_reservations(self, now: float, live: set[str]) -> None:
        held = self.state.reservations
        renew_at = self.settings.relay.limits.reservation_ttl_s / 2
        for relay, reservation in list(held.items()):
            if reservation.expires_at - now < renew_at and relay not in self.state.reserving:
                self._start(self._reserve, relay)
        if len(held) >= self.settings.reservations:
            return
        candidates = [
            p
            for p in sorted(live, key=lambda p: self.rtt_ms(p) or 1e9)
            if p not in held and self._has_direct(p) and self.state.refused_relays.get(p, 0) <= now
        ]
        for relay in candidates[: self.settings.reservations - len(held)]:
            if relay in self.state.reserving:
                continue
            self.state.refused_relays[relay] = now + self.settings.relay_retry_s  # one try
            self._start(self._reserve, relay)

    async def _reserve(self, relay: str) -> None:
        self.state.reserving.add(relay)
        try:
            await self._reserve_once(relay)
        finally:
            self.state.reserving.discard(relay)

    async def _reserve_once(self, relay: str) -> None:
        addr = self._direct_addr(relay)
        if addr is None:
            return
        started = time.monotonic()
        try:
            ttl = await self.relay.reserve(relay)
        except Exception as exc:
            log.debug("no reservation on %s: %s", relay, exc)
            return
        now = time.monotonic()
        self.state.relay_rtt_ms[relay] = round((now - started) * 1000, 3)
        if relay not in self.state.reservations:
            log.info("reserved a relay slot on %s (%s)", relay, addr)
        self.state.reservations[relay] = _Reservation(addr, now + ttl)
        self.state.refused_relays.pop(relay, None)

    # ------------------------------------------------------------------ probes and dial-backs

    def on_message(self, sender: str, message: dict[str, Any]) -> None:
        kind = message.get("t")
        try:
            if kind == "nat.probe":
                nonce, port = parse_probe(message)
                if sender in self._dialing_back:  # one dial-back per member at a time
                    raise NatMessageError("a dial-back for this member is already running")
                self._dialing_back.add(sender)
                self._start(self._dial_back, sender, nonce, port)
            elif kind == "nat.probe_result":
                self._on_probe_result(sender, message)
            else:
                raise NatMessageError(f"unknown NAT message {str(kind)[:40]!r}")
        except NatMessageError as exc:
            log.warning("rejected %s from %s: %s", str(kind)[:40], sender, exc)

    async def _dial_back(self, peer: str, nonce: int, port: int) -> None:
        try:
            await self._dial_back_once(peer, nonce, port)
        finally:
            self._dialing_back.discard(peer)

    async def _dial_back_once(self, peer: str, nonce: int, port: int) -> None:
        seen = self._direct_addr(peer)
        if seen is None:
            log.debug("dial-back for %s skipped: no direct connection to observe", peer)
            return
        ip = seen.split("/")[2]
        try:
            async with self._probe_slots:
                with trio.fail_after(self.settings.dialback_timeout_s):
                    stream = await trio.open_tcp_stream(ip, port)
                await stream.aclose()
            ok, reason = True, f"connected to {ip}:{port}"
        except trio.TooSlowError:
            ok, reason = (
                False,
                f"no answer from {ip}:{port} in {self.settings.dialback_timeout_s} s",
            )
        except OSError as exc:
            ok, reason = False, f"{ip}:{port}: {exc.strerror or exc}"
        await self.links.send(
            peer,
            {
                "t": "nat.probe_result",
                "nonce": nonce,
                "ok": ok,
                "reason": reason,
                "seen_ip": ip,
                "probe_port": self.probe_port,
            },
        )

    def _on_probe_result(self, sender: str, message: dict[str, Any]) -> None:
        result = parse_probe_result(message)
        probe = self.state.probes.get(sender)
        if probe is None or probe.nonce != result.nonce:
            raise NatMessageError("answer to a probe we did not send")
        del self.state.probes[sender]
        before = self.verdict()
        self.reachability.record(sender, result.ok, result.reason, time.monotonic())
        after = self.verdict()
        if after != before:
            log.info("reachability %s (dial-backs: %s)", after, self._answers_text())
        self.state.probe_ports[sender] = result.probe_port
        if result.probe_port:
            self._start(self._observe, sender, result.probe_port)

    async def _observe(self, peer: str, probe_port: int) -> None:
        """Connect from our listen port to the member's probe server; record what it saw."""
        addr = self._direct_addr(peer)
        source = self.listen_source()
        if addr is None or source is None:
            return
        ip = addr.split("/")[2]
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(source)
            with trio.fail_after(self.settings.dialback_timeout_s):
                await sock.connect((ip, probe_port))
                line = b""
                while not line.endswith(b"\n") and len(line) < PROBE_LINE_BYTES:
                    chunk = await sock.recv(PROBE_LINE_BYTES)
                    if not chunk:
                        break
                    line += chunk
            seen_ip, seen_port = parse_observed_line(line)
        except (OSError, trio.TooSlowError, NatMessageError) as exc:
            log.debug("observing our mapping through %s failed: %s", peer, exc)
            return
        finally:
            sock.close()
        self.observations.record(peer, seen_ip, seen_port, time.monotonic())
        self._observed.set()

    async def _answer_probe(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                ip, port = stream.socket.getpeername()[:2]
                with trio.fail_after(self.settings.dialback_timeout_s):
                    await stream.send_all(f"{ip} {port}\n".encode())
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                pass

    async def wait_for_observed_addrs(self) -> None:
        """Return once a member has observed our public address (see ``observed_addrs``)."""
        while not self.observed_addrs():
            if self._observed.is_set():  # set before, but those observations have expired
                self._observed = trio.Event()
            await self._observed.wait()  # (several waiters share the one unset event)

    def observed_addrs(self) -> list[str]:
        return [
            f"/ip4/{ip}/tcp/{port}" for ip, port in self.observations.public_addrs(time.monotonic())
        ]

    # ------------------------------------------------------------------ connections

    def extra_addrs(self) -> list[str]:
        """Addresses to publish besides the listen ones: the router's mapped port, circuits
        through our relays."""
        mapped = self.port_mapping
        out = [f"/ip4/{mapped.external_ip}/tcp/{mapped.external_port}"] if mapped.ok else []
        return out + [
            circuit_addr(r.relay_addr, relay) for relay, r in self.state.reservations.items()
        ]

    async def connect(self, peer: str, addrs: list[str]) -> bool:
        """Reach a member: directly, else through a relay it published. True if connected."""
        peer_id = ID.from_base58(peer)
        direct = [a for a in addrs if parse_circuit_addr(a) is None]
        circuits = [c for c in (parse_circuit_addr(a) for a in addrs) if c is not None]
        error = "no direct address"
        if direct:
            try:
                info = PeerInfo(peer_id, [multiaddr.Multiaddr(a) for a in direct])
                # With a relay to fall back on (or coming: a peer with only private addresses
                # is behind a NAT), a direct address gets a short try only.
                short = circuits or all(_is_private(a) for a in direct)
                allow_redial(self.host, peer)  # our caller (a heartbeat) paces these dials
                with trio.fail_after(self.settings.direct_dial_timeout_s if short else 1e9):
                    await self.host.connect(info)
                return True
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if not circuits:
            raise ConnectionError(error)
        if self.verdict() == PUBLIC or self.self_id > peer:
            # It reaches us (we are public), or it is the pair's dialer: wait for it.
            with trio.move_on_after(self.settings.wait_for_dialer_s):
                while connection_info(self.host, peer)[0] == "none":
                    await trio.sleep(0.05)
                return True
            raise ConnectionError(f"{error}; {peer} did not reach us through its relay")
        for relay_addr, relay in circuits:
            if relay == self.self_id:
                continue
            try:
                if not self._has_direct(relay):
                    allow_redial(self.host, relay)
                    with trio.fail_after(self.settings.direct_dial_timeout_s):
                        await self.host.connect(
                            PeerInfo(ID.from_base58(relay), [multiaddr.Multiaddr(relay_addr)])
                        )
                await self.relay.dial(relay, relay_addr, peer)
                return True
            except (RelayError, Exception) as exc:
                error = f"{error}; relay {relay}: {type(exc).__name__}: {exc}"
        raise ConnectionError(error)

    def _on_inbound_circuit(self, peer: str) -> None:
        """We accepted a relayed connection: we are DCUtR's B, so we start the punch."""
        if self.settings.holepunch and not self._has_direct(peer):
            self._start(self._punch, peer)

    async def _punch(self, peer: str) -> None:
        await trio.sleep(0)  # let the upgraded connection register its streams first
        await self.puncher.punch(peer)

    def _on_direct(self, peer: str) -> None:
        self._start(self._close_relayed, peer)

    async def _close_relayed(self, peer: str) -> None:
        """The direct path is up: close the circuits so every stream moves to it."""
        with contextlib.suppress(ValueError):
            conns = self.host.get_network().connections.get(ID.from_base58(peer), [])
            for conn in list(conns):
                addrs = [str(a) for a in conn.get_transport_addresses()]
                if any("/p2p-circuit" in a for a in addrs):
                    with trio.move_on_after(2), contextlib.suppress(Exception):
                        await conn.close()
        log.info("connection to %s is direct now: %s", peer, connection_info(self.host, peer)[1])
        self.on_path_change(peer)

    def _has_direct(self, peer: str) -> bool:
        return self._direct_addr(peer) is not None

    def _direct_addr(self, peer: str) -> str | None:
        for addr in connection_info(self.host, peer)[1]:
            if "/p2p-circuit" not in addr and addr.startswith("/ip4/"):
                return addr.split("/p2p/")[0]
        return None

    async def leave(self) -> None:
        """On a graceful stop: give the router's port back."""
        if self.port_mapping.ok and self.port_mapping.method == "natpmp" and self._natpmp:
            await self._natpmp.release()
        elif self.port_mapping.ok:
            await unmap_port(self.port_mapping.external_port, self.settings.port_mapping_timeout_s)

    def forget(self, peer: str) -> None:
        """A member left: drop the probe bookkeeping kept for it. Its dial-back answer and what
        it observed of our NAT mapping stay until they age out: they are facts about our own
        port, which its leaving does not change. (Dropping them made a public relay whose
        dial-back members had all gone say "unknown" and stop relaying, in the middle of the
        failover it exists for.)"""
        self.state.probes.pop(peer, None)
        self.state.last_probe.pop(peer, None)
        self.state.probe_ports.pop(peer, None)
        self.state.relay_rtt_ms.pop(peer, None)
        self.state.reservations.pop(peer, None)

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ reporting

    def _answers_text(self) -> str:
        answers = self.reachability.answers(time.monotonic())
        return ", ".join(f"{a.peer_id[-6:]} {'ok' if a.ok else 'no'}" for a in answers) or "none"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "reachability": self.verdict(),
            "relay_service": self._relaying(),
            "reservations": sorted(self.state.reservations),
            "circuits_open": self.relay.counters.circuits_open,
            "bytes_relayed": self.relay.counters.bytes_relayed,
            "relay_circuits_total": self.relay.book.circuits_total,
            "circuits": sorted(list(ends) for ends in self.relay.book.circuits.values()),
            "relay_reserved": sorted(self.relay.book.reservations),
            "relay_renewals": self.relay.book.renewals,
            "holepunch": {
                "attempts": self.puncher.stats.attempts,
                "succeeded": self.puncher.stats.succeeded,
                "failed": self.puncher.stats.failed,
            },
            "observed": self.observed_addrs(),
            "port_mapping": self.port_mapping.to_wire(),
            "mapping_varies": self.observations.mapping_varies(now),
        }

    def netcheck(self) -> dict[str, Any]:
        now = time.monotonic()
        verdict = self.verdict()
        source = self.listen_source()
        varies = self.observations.mapping_varies(now)
        relays = [
            {
                "peer_id": relay,
                "addr": r.relay_addr,
                "rtt_ms": self.rtt_ms(relay) or self.state.relay_rtt_ms.get(relay),
                "reserved": True,
                "expires_in_s": round(r.expires_at - now, 1),
            }
            for relay, r in sorted(self.state.reservations.items())
        ]
        mapping = self.port_mapping.to_wire()
        return {
            "reachability": verdict,
            "listen": None if source is None else f"{source[0]}:{source[1]}",
            "dialbacks": [
                {
                    "peer_id": a.peer_id,
                    "ok": a.ok,
                    "reason": a.reason,
                    "age_s": round(now - a.at, 1),
                }
                for a in self.reachability.answers(now)
            ],
            "observed": [
                {"peer_id": o.peer_id, "addr": f"{o.ip}:{o.port}", "age_s": round(now - o.at, 1)}
                for o in self.observations.all(now)
            ],
            "mapping_varies_by_destination": varies,
            "port_mapping": mapping,
            "relays": relays,
            "relay_service": self._relaying(),
            "advice": advice(
                verdict, source[1] if source else 0, varies, bool(mapping.get("ok")), len(relays)
            ),
        }


# Addresses of hosts behind a NAT (RFC 1918, shared CGNAT space, link-local, IPv6 ULA). Not
# Python's ``is_private``, which also counts documentation ranges such as 203.0.113.0/24.
_LAN_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "127.0.0.0/8",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
]


def _is_private(addr: str) -> bool:
    """True for an /ip4 or /ip6 multiaddr of an address behind a NAT (or loopback)."""
    parts = addr.split("/")
    try:
        ip = ipaddress.ip_address(parts[2]) if len(parts) > 2 else None
    except ValueError:
        return False
    return ip is not None and any(ip in net for net in _LAN_NETWORKS)
