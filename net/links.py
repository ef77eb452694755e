"""Control links: one long-lived framed message stream per direction per peer.

Opening a libp2p stream costs ~2.75 ms and a connection ~250 ms (shared/notes/libp2p.md), so a
node keeps one outbound stream to each peer and sends every control message on it, framed by
:mod:`protocols.wire`. Replies travel on the peer's own outbound stream: no stream is ever
written by both ends, so there is no duplicate-stream race to settle.

Every inbound stream is drained continuously by its own reader task (Yamux resets a stream
whose reader pauses for ~5 s), and every read is bounded by ``idle_timeout_s``: heartbeats
arrive far more often than that, so a silent stream means a dead or hung peer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from net.host import exc_reason
from protocols.wire import FrameDecoder, FrameError, encode_frame

log = logging.getLogger("shoal.net.links")

MessageHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class LinkSettings:
    open_timeout_s: float = 5.0
    send_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    max_frame_bytes: int = 1 << 20
    read_chunk_bytes: int = 64 * 1024


class ControlLinks:
    """Sends framed messages to peers and feeds frames from peers to ``on_message``."""

    def __init__(
        self, host: IHost, protocol_id: str, on_message: MessageHandler, settings: LinkSettings
    ) -> None:
        self.host = host
        self.protocol_id = protocol_id
        self.on_message = on_message
        self.settings = settings
        self._out: dict[str, INetStream] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.rejected_frames = 0
        # Set by the daemon: reach a peer with no connection yet (e.g. through a relay), since
        # libp2p's own dial knows only the peer's direct addresses.
        self.connect: Callable[[str], Awaitable[bool]] | None = None
        host.set_stream_handler(protocol_id, self._serve_inbound)

    async def send(self, peer_id: str, message: dict[str, Any]) -> bool:
        """Send one message; False (with a debug log) if the peer cannot be reached now."""
        frame = encode_frame(message, self.settings.max_frame_bytes)
        lock = self._locks.setdefault(peer_id, trio.Lock())
        async with lock:
            try:
                stream = self._out.get(peer_id)
                if stream is None:
                    if self.connect is not None:
                        await self.connect(peer_id)
                    with trio.fail_after(self.settings.open_timeout_s):
                        stream = await self.host.new_stream(
                            ID.from_base58(peer_id), [self.protocol_id]
                        )
                    self._out[peer_id] = stream
                with trio.fail_after(self.settings.send_timeout_s):
                    await stream.write(frame)
                return True
            except Exception as exc:  # any transport failure: the peer is unreachable for now
                log.debug("send to %s failed: %s", peer_id, exc_reason(exc))
                await self._drop(peer_id)
                return False

    async def _drop(self, peer_id: str) -> None:
        stream = self._out.pop(peer_id, None)
        if stream is not None:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()

    async def forget(self, peer_id: str) -> None:
        """Close our outbound stream to a peer that left."""
        lock = self._locks.setdefault(peer_id, trio.Lock())
        async with lock:
            await self._drop(peer_id)
        self._locks.pop(peer_id, None)

    async def _serve_inbound(self, stream: INetStream) -> None:
        peer_id = str(stream.muxed_conn.peer_id)
        decoder = FrameDecoder(self.settings.max_frame_bytes)
        try:
            while True:
                with trio.fail_after(self.settings.idle_timeout_s):
                    data = await stream.read(self.settings.read_chunk_bytes)
                if not data:
                    return
                for message in decoder.feed(data):
                    await self.on_message(peer_id, message)
                decoder.check()
        except FrameError as exc:
            self.rejected_frames += 1
            log.warning("closing control stream from %s: %s", peer_id, exc)
        except trio.TooSlowError:
            log.info(
                "control stream from %s idle for %.0f s, closing",
                peer_id,
                self.settings.idle_timeout_s,
            )
        except Exception as exc:  # EOF/reset from a peer that went away
            log.debug("control stream from %s ended: %s", peer_id, exc_reason(exc))
        finally:
            with trio.move_on_after(1) as scope, contextlib.suppress(Exception):
                scope.shield = True
                await stream.reset()
