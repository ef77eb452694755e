"""The relay's circuit splice with in-memory streams: bytes pass, limits end the circuit."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from net.relay import RelayService, RelaySettings, circuit_addr, parse_circuit_addr
from protocols.relay import RelayLimits


class MemoryStream:
    """The two calls of a libp2p stream the splice uses, over a trio memory channel."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[bytes](100)
        self.written = bytearray()
        self.reset_called = False

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self.recv.receive()
        except trio.EndOfChannel:
            return b""

    async def write(self, data: bytes) -> None:
        self.written += data

    async def reset(self) -> None:
        self.reset_called = True


class NoHost:
    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        pass


def service(limits: RelayLimits) -> RelayService:
    return RelayService(
        NoHost(),  # type: ignore[arg-type]
        lambda name: f"/shoal/test/{name}/1.0.0",
        RelaySettings(limits=limits),
        enabled=lambda: True,
        serves=lambda peer: True,
        accept_from=lambda relay: True,
        on_inbound_circuit=lambda peer: None,
    )


async def test_splice_moves_bytes_both_ways_until_one_end_closes() -> None:
    relay = service(RelayLimits())
    a, b = MemoryStream(), MemoryStream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay._splice, a, b, 1)
        await a.send.send(b"hello ")
        await b.send.send(b"world")
        await a.send.send(b"again")
        await trio.testing.wait_all_tasks_blocked()  # both pumps moved what they had
        await a.send.aclose()  # EOF on one side ends the circuit
    assert bytes(b.written) == b"hello again" and bytes(a.written) == b"world"
    assert relay.counters.bytes_relayed == 16 and relay.counters.circuits_open == 0


async def test_splice_stops_at_the_byte_limit() -> None:
    relay = service(RelayLimits(circuit_max_bytes=10))
    a, b = MemoryStream(), MemoryStream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay._splice, a, b, 1)
        await a.send.send(b"x" * 8)
        await a.send.send(b"y" * 8)  # over the limit: not forwarded, circuit ends
    assert bytes(b.written) == b"x" * 8


async def test_splice_stops_at_the_duration_limit() -> None:
    relay = service(RelayLimits(circuit_max_s=0.05))
    a, b = MemoryStream(), MemoryStream()
    with trio.fail_after(5):
        await relay._splice(a, b, 1)  # nobody sends or closes: only the timer ends it
    assert relay.counters.circuits_open == 0


def test_circuit_addresses_round_trip() -> None:
    relay = "12D3KooW" + "r" * 44
    addr = circuit_addr("/ip4/203.0.113.10/tcp/4001", relay)
    assert addr == f"/ip4/203.0.113.10/tcp/4001/p2p/{relay}/p2p-circuit"
    assert parse_circuit_addr(addr) == ("/ip4/203.0.113.10/tcp/4001", relay)
    assert parse_circuit_addr("/ip4/203.0.113.10/tcp/4001") is None
    assert parse_circuit_addr("/p2p-circuit") is None
