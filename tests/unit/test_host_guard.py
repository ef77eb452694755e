"""A stream handler that raises ends its own stream, not the host (two real hosts on loopback)."""

from __future__ import annotations

import os
import socket

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.peer.peerinfo import PeerInfo

from net.host import build_host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_raising_handler_leaves_the_host_and_its_other_streams_running() -> None:
    """Without the guard py-libp2p cancels every handler on the connection and ends
    ``host.run`` with the handler's exception: a daemon would exit."""
    ports = free_port(), free_port()
    addrs = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{p}") for p in ports]
    a, b = (build_host(os.urandom(32), [str(addr)]) for addr in addrs)
    raised = trio.Event()

    async def broken(stream: INetStream) -> None:
        await stream.read(1)
        raised.set()
        raise ValueError("a handler bug")

    async def echo(stream: INetStream) -> None:
        while data := await stream.read(100):
            await stream.write(data)

    b.set_stream_handler("/test/broken/1", broken)
    b.set_stream_handler("/test/echo/1", echo)
    async with b.run([addrs[1]]), a.run([addrs[0]]):
        await a.connect(PeerInfo(b.get_id(), [addrs[1]]))
        good = await a.new_stream(b.get_id(), ["/test/echo/1"])
        bad = await a.new_stream(b.get_id(), ["/test/broken/1"])
        await bad.write(b"x")
        with trio.fail_after(10):
            await raised.wait()
            # A round trip through b after the raise: by then it has reached b's nursery.
            await good.write(b"still here")
            assert await good.read(100) == b"still here"
        # The broken handler's stream was reset: a read on it ends (it does not hang).
        with trio.fail_after(10):
            try:
                data = await bad.read(1)
            except Exception:  # the reset arrives as an exception, an EOF as b""
                data = b""
        assert data == b""
