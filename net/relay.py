"""Circuit relay v2 over libp2p streams: the relay's hop service, the target's stop service, dials.

py-libp2p 0.8.1 ships a circuit v2 transport, but ``host.connect()`` refuses ``/p2p-circuit``
addresses and its reservations need a manual dance (shared/notes/libp2p.md); this module does
the same protocol in ~300 lines the daemon controls: the rules live in
:mod:`protocols.relay`, the circuit is a libp2p stream to the relay spliced to the relay's
stream to the target, and each end turns the circuit into a normal libp2p connection (Noise +
Yamux on top, ``host.upgrade_*_connection``), registered in the swarm like any other. So
control links and the bulk channel's libp2p-stream fallback run over it unchanged, and
``connection_info`` reports it as ``relayed`` (its transport address has ``/p2p-circuit``).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream, IRawConnection
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID

from net.host import connection_info, exc_reason
from protocols.relay import (
    Decision,
    RelayBook,
    RelayLimits,
    RelayMessageError,
    parse_peer_field,
    parse_status,
    status_message,
)
from protocols.wire import FrameError, decode_payload, encode_frame

log = logging.getLogger("shoal.net.relay")

MAX_RELAY_FRAME_BYTES = 4096
_LENGTH = struct.Struct(">I")
SPLICE_CHUNK_BYTES = 64 * 1024


class RelayError(Exception):
    """A reservation or circuit that did not come about; the text says why."""


async def read_frame(stream: INetStream, max_bytes: int = MAX_RELAY_FRAME_BYTES) -> dict[str, Any]:
    """Read exactly one frame (and not a byte more: raw circuit bytes may follow it)."""
    header = await _read_exactly(stream, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    if length > max_bytes:
        raise FrameError(f"relay frame of {length} bytes exceeds {max_bytes}")
    return decode_payload(await _read_exactly(stream, length))


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.read(n - len(data))
        if not chunk:
            raise RelayError("stream closed mid-frame")
        data += chunk
    return data


async def write_frame(stream: INetStream, message: dict[str, Any]) -> None:
    await stream.write(encode_frame(message, MAX_RELAY_FRAME_BYTES))


class CircuitConnection(IRawConnection):
    """A relayed circuit (one libp2p stream through the relay) as a raw connection to upgrade."""

    def __init__(self, stream: INetStream, initiator: bool, circuit_addr: str) -> None:
        self.stream = stream
        self.is_initiator = initiator
        self.circuit_addr = multiaddr.Multiaddr(circuit_addr)

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except Exception as exc:  # reset/EOF of the circuit: the connection above is gone
            raise RawConnError(str(exc)) from exc

    async def read(self, n: int | None = None) -> bytes:
        try:
            return bytes(await self.stream.read(n))
        except Exception as exc:
            raise RawConnError(str(exc)) from exc

    async def close(self) -> None:
        with trio.move_on_after(1), contextlib.suppress(Exception):
            await self.stream.reset()

    def get_remote_address(self) -> tuple[str, int] | None:
        return None

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return [self.circuit_addr]

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.RELAYED


@dataclass(frozen=True)
class RelaySettings:
    handshake_timeout_s: float = 5.0
    limits: RelayLimits = field(default_factory=RelayLimits)


@dataclass
class RelayCounters:
    circuits_open: int = 0
    bytes_relayed: int = 0


class RelayService:
    """Both ends of the relay protocol for one host.

    ``enabled()`` says whether this node serves as a relay now (the daemon: when it is public),
    ``serves(peer)`` whether for that peer (the daemon: members of its swarm only);
    ``accept_from(relay)`` whether an incoming circuit through ``relay`` is wanted (we hold a
    reservation there). ``on_circuit(peer, conn)`` runs when a relayed connection is up.
    """

    def __init__(
        self,
        host: IHost,
        swarm_protocol: Callable[[str], str],
        settings: RelaySettings,
        enabled: Callable[[], bool],
        serves: Callable[[str], bool],
        accept_from: Callable[[str], bool],
        on_inbound_circuit: Callable[[str], None],
    ) -> None:
        self.host = host
        self.settings = settings
        self.hop_protocol = swarm_protocol("relay-hop")
        self.stop_protocol = swarm_protocol("relay-stop")
        self.book = RelayBook(settings.limits)
        self.counters = RelayCounters()
        self.enabled = enabled
        self.serves = serves
        self.accept_from = accept_from
        self.on_inbound_circuit = on_inbound_circuit
        host.set_stream_handler(self.hop_protocol, self._serve_hop)
        host.set_stream_handler(self.stop_protocol, self._serve_stop)

    # ------------------------------------------------------------------ relay side (hop)

    async def _serve_hop(self, stream: INetStream) -> None:
        client = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                request = await read_frame(stream)
            kind = request.get("t")
            if not self.enabled():
                await self._answer(stream, Decision(False, "this node is not a relay now"))
            elif not self.serves(client):
                await self._answer(stream, Decision(False, "this relay serves swarm members only"))
            elif kind == "relay.reserve":
                now = time.monotonic()
                decision = self.book.reserve(client, now)
                if decision.ok:
                    log.info("relay: reservation for %s", client)
                ttl = self.settings.limits.reservation_ttl_s if decision.ok else None
                await self._answer(stream, decision, ttl)
            elif kind == "relay.connect":
                await self._connect(stream, client, parse_peer_field(request, "relay.connect"))
                return  # _connect owned (and closed) the stream
            else:
                await self._answer(stream, Decision(False, f"unknown request {str(kind)[:40]!r}"))
            await self._linger(stream)
        except (FrameError, RelayMessageError, RelayError, trio.TooSlowError) as exc:
            log.warning("relay: refused hop request from %s: %s", client, exc_reason(exc))
        except Exception as exc:  # the client went away mid-request
            log.debug("relay: hop stream from %s ended: %s", client, exc_reason(exc))
        await _reset(stream)

    async def _linger(self, stream: INetStream) -> None:
        """Let the client read our answer and close first: a reset could overtake the answer."""
        with trio.move_on_after(self.settings.handshake_timeout_s), contextlib.suppress(Exception):
            while await stream.read(SPLICE_CHUNK_BYTES):  # EOF or a reset: the client is done
                pass

    async def _answer(
        self, stream: INetStream, decision: Decision, ttl: float | None = None
    ) -> None:
        if not decision.ok:
            log.info("relay: refused %s: %s", stream.muxed_conn.peer_id, decision.reason)
        limits = self.settings.limits if decision.ok else None
        with trio.fail_after(self.settings.handshake_timeout_s):
            await write_frame(stream, status_message(decision, ttl, limits))

    async def _connect(self, src_stream: INetStream, src: str, dst: str) -> None:
        decision, circuit_id = self.book.open_circuit(src, dst, time.monotonic())
        if not decision.ok:
            with contextlib.suppress(Exception):
                await self._answer(src_stream, decision)
                await self._linger(src_stream)
            await _reset(src_stream)
            return
        dst_stream: INetStream | None = None
        try:
            try:
                with trio.fail_after(self.settings.handshake_timeout_s):
                    dst_stream = await self.host.new_stream(
                        ID.from_base58(dst), [self.stop_protocol]
                    )
                    await write_frame(
                        dst_stream,
                        {"t": "relay.stop", "peer": src, "limits": self.settings.limits.to_wire()},
                    )
                    ok, reason, _ = parse_status(await read_frame(dst_stream))
            except Exception as exc:
                ok, reason = False, f"target unreachable: {exc_reason(exc)}"
            await self._answer(src_stream, Decision(ok, reason))
            if not ok:
                await self._linger(src_stream)
            elif dst_stream is not None:
                log.info("relay: circuit %d %s -> %s open", circuit_id, src, dst)
                await self._splice(src_stream, dst_stream, circuit_id)
        finally:
            self.book.close_circuit(circuit_id)
            await _reset(src_stream)
            if dst_stream is not None:
                await _reset(dst_stream)

    async def _splice(self, a: INetStream, b: INetStream, circuit_id: int) -> None:
        """Copy both ways until either side ends or a limit (duration, bytes) is reached."""
        limits = self.settings.limits
        moved = [0]
        self.counters.circuits_open += 1
        ended = "closed"
        try:
            with trio.move_on_after(limits.circuit_max_s) as timer:
                async with trio.open_nursery() as nursery:

                    async def pump(src: INetStream, dst: INetStream) -> None:
                        nonlocal ended
                        try:
                            while True:
                                data = await src.read(SPLICE_CHUNK_BYTES)
                                if not data:
                                    break
                                moved[0] += len(data)
                                self.counters.bytes_relayed += len(data)
                                if moved[0] > limits.circuit_max_bytes:
                                    ended = f"byte limit {limits.circuit_max_bytes} reached"
                                    break
                                await dst.write(data)
                        except Exception:  # either end reset: the circuit is over
                            pass
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(pump, a, b)
                    nursery.start_soon(pump, b, a)
            if timer.cancelled_caught:
                ended = f"duration limit {limits.circuit_max_s} s reached"
        finally:
            self.counters.circuits_open -= 1
        log.info("relay: circuit %d closed (%s) after %d bytes", circuit_id, ended, moved[0])

    # ------------------------------------------------------------------ target side (stop)

    async def _serve_stop(self, stream: INetStream) -> None:
        relay = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                src = parse_peer_field(await read_frame(stream), "relay.stop")
                accepted = self.accept_from(relay)
                reason = "" if accepted else "no reservation with this relay"
                await write_frame(stream, status_message(Decision(accepted, reason)))
            if not accepted:
                await self._linger(stream)
                raise RelayError(f"circuit through {relay}, where we hold no reservation")
            conn = CircuitConnection(stream, False, circuit_addr(self._relay_addr(relay), relay))
            muxed = await self.host.upgrade_inbound_connection(conn, conn.circuit_addr)
            if str(muxed.peer_id) != src:
                log.warning("relay: circuit from %s authenticated as %s", src, muxed.peer_id)
                await muxed.close()
                return
            log.info("relayed connection from %s through %s", src, relay)
            self.on_inbound_circuit(src)
            await _wait_closed(muxed)  # the handler owns the stream: keep it while in use
        except Exception as exc:
            log.info("relay: refused circuit through %s: %s", relay, exc_reason(exc))
        finally:
            await _reset(stream)

    def _relay_addr(self, relay: str) -> str:
        for addr in connection_info(self.host, relay)[1]:
            if "/p2p-circuit" not in addr:
                return addr.split("/p2p/")[0]
        return "/ip4/0.0.0.0/tcp/0"

    # ------------------------------------------------------------------ client side

    async def reserve(self, relay: str) -> float:
        """Reserve a slot on ``relay``; return the reservation's lifetime in seconds."""
        stream = await self._hop(relay)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                await write_frame(stream, {"t": "relay.reserve"})
                ok, reason, expires = parse_status(await read_frame(stream))
        finally:
            await _reset(stream)
        if not ok:
            raise RelayError(reason)
        return expires or self.settings.limits.reservation_ttl_s

    async def dial(self, relay: str, relay_addr: str, target: str) -> None:
        """Open a relayed libp2p connection to ``target`` through ``relay``."""
        stream = await self._hop(relay)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                await write_frame(stream, {"t": "relay.connect", "peer": target})
                ok, reason, _ = parse_status(await read_frame(stream))
            if not ok:
                raise RelayError(reason)
            conn = CircuitConnection(stream, True, circuit_addr(relay_addr, relay))
            await self.host.upgrade_outbound_connection(conn, ID.from_base58(target))
        except BaseException:
            await _reset(stream)
            raise
        log.info("relayed connection to %s through %s", target, relay)

    async def _hop(self, relay: str) -> INetStream:
        with trio.fail_after(self.settings.handshake_timeout_s):
            return await self.host.new_stream(ID.from_base58(relay), [self.hop_protocol])


def circuit_addr(relay_addr: str, relay: str) -> str:
    """``<relay address>/p2p/<relay>/p2p-circuit``: how a peer behind a relay is reached."""
    return f"{relay_addr.split('/p2p/')[0]}/p2p/{relay}/p2p-circuit"


def parse_circuit_addr(addr: str) -> tuple[str, str] | None:
    """(relay address, relay peer id) of a circuit address, else None."""
    if not addr.endswith("/p2p-circuit") or "/p2p/" not in addr:
        return None
    head = addr[: -len("/p2p-circuit")]
    relay_addr, _, relay = head.rpartition("/p2p/")
    return (relay_addr, relay) if relay_addr and relay else None


async def _wait_closed(muxed: Any) -> None:
    event = getattr(muxed, "event_closed", None)
    if event is not None:
        await event.wait()
        return
    while not getattr(muxed, "is_closed", False):
        await trio.sleep(1)


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1) as scope, contextlib.suppress(Exception):
        scope.shield = True
        await stream.reset()
