"""DCUtR over a relayed connection: moves the frames of :mod:`protocols.dcutr` and dials.

Differences from py-libp2p's own DCUtR (shared/notes/libp2p.md): B waits RTT/2 after SYNC
(py-libp2p waits 2xRTT + 1 s), both sides dial from their listen port so the NAT mapping is the
one the other side was told, the dials are TCP simultaneous opens with fixed security roles
(A initiator, B responder: py-libp2p's ``dial_addr_as_responder``), and there are three attempts
back to back (py-libp2p: five, 30 s apart).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from net.host import exc_reason
from net.relay import read_frame, write_frame
from protocols.dcutr import Dial, HolePunchError, HolePunchInitiator, HolePunchResponder
from protocols.wire import FrameError

log = logging.getLogger("shoal.net.holepunch")


@dataclass(frozen=True)
class HolePunchSettings:
    max_attempts: int = 3
    attempt_timeout_s: float = 5.0
    stream_timeout_s: float = 10.0
    # How long each side waits to learn its own public address (from members' probe servers)
    # before it sends DCUtR's CONNECT: a CONNECT without it gives the other side nothing to
    # dial, and all three attempts fail. Below ~5 s: A waits while B's first frame is unread,
    # and py-libp2p's Yamux resets a stream left unread for ~5 s.
    addrs_wait_s: float = 3.0


@dataclass
class HolePunchStats:
    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    last_rtt_ms: float | None = None
    last_error: str = ""


class HolePuncher:
    """Both DCUtR roles for one host; ``on_direct(peer)`` runs when a punch made a direct path."""

    def __init__(
        self,
        host: IHost,
        protocol_id: str,
        settings: HolePunchSettings,
        own_addrs: Callable[[], list[str]],
        wait_own_addrs: Callable[[], Awaitable[None]],
        source: Callable[[], tuple[str, int] | None],
        is_direct: Callable[[str], bool],
        on_direct: Callable[[str], None],
    ) -> None:
        self.host = host
        self.protocol_id = protocol_id
        self.settings = settings
        self.own_addrs = own_addrs
        self.wait_own_addrs = wait_own_addrs
        self.source = source
        self.is_direct = is_direct
        self.on_direct = on_direct
        self.stats = HolePunchStats()
        self.active: set[str] = set()
        host.set_stream_handler(protocol_id, self._serve)

    async def punch(self, peer: str) -> bool:
        """B's side, over our relayed connection to ``peer``: True if a direct one came up."""
        if peer in self.active:
            return False
        self.active.add(peer)
        stream: INetStream | None = None
        try:
            own = await self._addrs()
        except BaseException:
            self.active.discard(peer)
            raise
        machine = HolePunchInitiator(own, self.settings.max_attempts)
        try:
            with trio.fail_after(self.settings.stream_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer), [self.protocol_id])
            message: dict[str, Any] | None = machine.start(time.monotonic())
            while message is not None:
                with trio.fail_after(self.settings.stream_timeout_s):
                    await write_frame(stream, message)
                    reply = await read_frame(stream)
                sync, dial = machine.on_connect(reply, time.monotonic())
                self.stats.last_rtt_ms = round((machine.rtt_s or 0) * 1000, 3)
                with trio.fail_after(self.settings.stream_timeout_s):
                    await write_frame(stream, sync)
                await trio.sleep(dial.delay_s)
                ok = await self._dial(peer, dial)
                message = machine.on_dial_result(ok, time.monotonic())
        except (FrameError, HolePunchError, trio.TooSlowError) as exc:
            self.stats.last_error = exc_reason(exc)
            log.info("hole punch with %s stopped: %s", peer, self.stats.last_error)
        except Exception as exc:  # relayed connection gone, stream refused
            self.stats.last_error = exc_reason(exc)
            log.debug("hole punch with %s ended: %s", peer, self.stats.last_error)
        finally:
            self.active.discard(peer)
            if stream is not None:
                await _reset(stream)
        if machine.outcome == "direct":
            return True
        log.info(
            "no direct path to %s after %d attempt(s); staying on the relay", peer, machine.attempt
        )
        return False

    async def _serve(self, stream: INetStream) -> None:
        """A's side."""
        peer = str(stream.muxed_conn.peer_id)
        machine = HolePunchResponder(await self._addrs(), self.settings.max_attempts)
        try:
            while True:
                with trio.fail_after(self.settings.stream_timeout_s):
                    message = await read_frame(stream)
                reply, dial = machine.on_message(message)
                if reply is not None:
                    with trio.fail_after(self.settings.stream_timeout_s):
                        await write_frame(stream, reply)
                if dial is not None:
                    await self._dial(peer, dial)
        except (FrameError, HolePunchError) as exc:
            log.warning("hole punch from %s refused: %s", peer, exc_reason(exc))
        except Exception as exc:  # B closed the stream: done (or gave up)
            log.debug("hole punch stream from %s ended: %s", peer, exc_reason(exc))
        finally:
            await _reset(stream)

    async def _addrs(self) -> list[str]:
        """Our observed public addresses, waiting up to ``addrs_wait_s`` for the first one.

        Seen in the lab under load: the relayed connection came up (and B started DCUtR)
        before A's probes had told A its public address; A answered CONNECT with no address,
        B had nothing to dial, and all three attempts failed, leaving the pair on the relay."""
        if not self.own_addrs():
            started = trio.current_time()
            with trio.move_on_after(self.settings.addrs_wait_s):
                await self.wait_own_addrs()
            waited = trio.current_time() - started
            if self.own_addrs():
                log.info("hole punching: waited %.2f s to learn our public address", waited)
            else:
                log.info("hole punching without a public address of our own (%.1f s)", waited)
        return self.own_addrs()

    async def _dial(self, peer: str, dial: Dial) -> bool:
        """One simultaneous-open attempt to each of the peer's addresses (first success wins)."""
        self.stats.attempts += 1
        network = self.host.get_network()
        peer_id = ID.from_base58(peer)
        source = self.source()
        for addr in dial.addrs:
            if self.is_direct(peer):
                break
            target = multiaddr.Multiaddr(addr)
            try:
                with trio.fail_after(self.settings.attempt_timeout_s):
                    if dial.initiator:
                        single = getattr(network, "_dial_addr_single_attempt", None)
                        if single is not None:
                            await single(target, peer_id, source)
                        else:
                            await network.dial_addr(target, peer_id, source)
                    else:
                        await network.dial_addr_as_responder(target, peer_id, source)
            except Exception as exc:
                self.stats.last_error = f"{addr}: {exc_reason(exc)}"
                log.debug("hole punch attempt %d to %s failed: %s", dial.attempt, addr, exc)
                continue
            break
        if self.is_direct(peer):
            self.stats.succeeded += 1
            log.info("hole punch to %s succeeded on attempt %d", peer, dial.attempt)
            self.on_direct(peer)
            return True
        self.stats.failed += 1
        return False


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1) as scope, contextlib.suppress(Exception):  # already gone
        scope.shield = True
        await stream.reset()
