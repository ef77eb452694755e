"""One bulk channel per member pair, set up on demand through the control links.

Who does what is fixed by the peer ids, so two members asking for a channel to each other at
the same moment still end with one: the member with the lower id is the *listener* (it makes
the one-time offer on its ``BulkListener``), the other the *dialer*.

    dialer    -> listener   bulk.want                     (only when the dialer asks first)
    listener  -> dialer     bulk.offer   {offer}
    dialer    -> listener   bulk.answer  {answer}
    dialer: opens the direct TCP connections of the offer (host = the address the dialer
            already reaches the listener's libp2p connection at), and if that fails within
            ``handshake_timeout_s``, opens a libp2p stream ``/shoal/<swarm>/bulk/1.0.0`` that
            starts with the offer's token: the same framing then runs over that stream.

The offer and answer travel over the Noise-secured control links, so the keys are bound to
the libp2p identities; nothing about the channel is trusted from the TCP connection itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from net.bulk import (
    BulkChannel,
    BulkListener,
    BulkSettings,
    dial_direct_channel,
    stream_channel,
)
from net.bulk_frames import (
    BulkAnswer,
    BulkError,
    BulkOffer,
    SessionKeys,
    derive_session_keys,
    make_answer,
)
from net.host import connection_info, exc_reason
from net.links import ControlLinks

log = logging.getLogger("shoal.net.bulk")

PATH_DIRECT = "direct"
PATH_LIBP2P = "libp2p"
TOKEN_BYTES = 32


class BulkUnavailable(Exception):
    """No bulk channel to the peer could be set up; the message says why."""


class Libp2pByteStream:
    """A libp2p stream seen as the byte stream ``net.bulk.stream_channel`` runs over."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream

    async def send_all(self, data: memoryview) -> None:
        try:
            await self.stream.write(bytes(data))
        except Exception as exc:  # reset, closed, or its connection gone: libp2p's own types
            reason = f"libp2p stream write failed: {exc_reason(exc)}"
            raise trio.BrokenResourceError(reason) from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return bytes(await self.stream.read(max_bytes or 65536))
        except Exception:  # EOF or reset: the bulk framing turns a short stream into an error
            return b""

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.reset()


@dataclass
class _Setup:
    """A channel being set up with one peer."""

    done: trio.Event = field(default_factory=trio.Event)
    channel: BulkChannel | None = None
    error: str = ""
    token: bytes = b""
    keys: SessionKeys | None = None


class BulkPeers:
    """The bulk channels of one node; ``get(peer)`` returns a live one, setting it up if needed."""

    def __init__(
        self,
        self_id: str,
        host: IHost,
        links: ControlLinks,
        listener: BulkListener,
        settings: BulkSettings,
        stream_protocol: str,
        nursery: trio.Nursery,
        setup_timeout_s: float,
    ) -> None:
        self.self_id = self_id
        self.host = host
        self.links = links
        self.listener = listener
        self.settings = settings
        self.stream_protocol = stream_protocol
        self.nursery = nursery
        self.setup_timeout_s = setup_timeout_s
        self.channels: dict[str, BulkChannel] = {}
        self._setups: dict[str, _Setup] = {}
        self._by_token: dict[bytes, tuple[str, _Setup]] = {}
        self.on_channel: Callable[[str, BulkChannel], None] | None = None
        host.set_stream_handler(stream_protocol, self._serve_fallback_stream)

    def path(self, peer: str) -> str | None:
        channel = self.channels.get(peer)
        return channel.path if channel is not None and channel.failure is None else None

    async def get(self, peer: str) -> BulkChannel:
        """A live channel to ``peer``; raises BulkUnavailable after ``setup_timeout_s``."""
        channel = self.channels.get(peer)
        if channel is not None and channel.failure is None:
            return channel
        setup = self._setups.get(peer)
        if setup is None:
            setup = self._setups[peer] = _Setup()
            if self.self_id < peer:
                self.nursery.start_soon(self._offer, peer, setup)
            elif not await self.links.send(peer, {"t": "bulk.want"}):
                self._finish(peer, setup, error="control link down")
        with trio.move_on_after(self.setup_timeout_s):
            await setup.done.wait()
        if setup.channel is None:
            self._finish(
                peer, setup, error=setup.error or f"no channel within {self.setup_timeout_s} s"
            )
            raise BulkUnavailable(f"bulk channel to {peer}: {setup.error}")
        return setup.channel

    def close(self, peer: str) -> None:
        """Forget a peer that left: its channel's readers stop."""
        channel = self.channels.pop(peer, None)
        if channel is not None:
            self.nursery.start_soon(channel.aclose)

    # ------------------------------------------------------------------ control messages

    def on_message(self, sender: str, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "bulk.want":
            if self.self_id < sender and sender not in self._setups:
                setup = self._setups[sender] = _Setup()
                self.nursery.start_soon(self._offer, sender, setup)
        elif kind == "bulk.offer":
            self.nursery.start_soon(self._dial, sender, message.get("offer"))
        elif kind == "bulk.answer":
            self._on_answer(sender, message.get("answer"))
        else:
            log.warning("ignoring bulk message of unknown type %r from %s", str(kind)[:40], sender)

    # ------------------------------------------------------------------ listener side

    async def _offer(self, peer: str, setup: _Setup) -> None:
        offer = self.listener.create_offer()
        setup.token = offer["token"]
        self._by_token[setup.token] = (peer, setup)
        if not await self.links.send(peer, {"t": "bulk.offer", "offer": offer}):
            self._finish(peer, setup, error="control link down")

    def _on_answer(self, sender: str, answer_msg: Any) -> None:
        try:
            token = BulkAnswer.from_wire(answer_msg).token
            owner = self._by_token.get(token)
            if owner is None or owner[0] != sender:
                raise BulkError("answer for an offer made to someone else")
            setup = owner[1]
            setup.keys = self.listener.accept_answer(answer_msg)
        except BulkError as exc:
            log.warning("refused bulk answer from %s: %s", sender, exc)
            return
        self.nursery.start_soon(self._await_listener_channel, sender, setup)

    async def _await_listener_channel(self, peer: str, setup: _Setup) -> None:
        """Wait for the dialer's direct connections, or for its fallback stream to finish us."""
        with trio.move_on_after(self.setup_timeout_s):
            async with trio.open_nursery() as race:

                async def direct() -> None:
                    try:
                        channel = await self.listener.wait_channel(setup.token, peer=peer)
                    except BulkError as exc:
                        log.debug("no direct bulk connections from %s: %s", peer, exc)
                        return  # the fallback stream may still come
                    self._finish(peer, setup, channel=channel)

                race.start_soon(direct)
                await setup.done.wait()
                race.cancel_scope.cancel()
        if not setup.done.is_set():
            self._finish(peer, setup, error="the dialer never connected")

    async def _serve_fallback_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        adapted = Libp2pByteStream(stream)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                token = b""
                while len(token) < TOKEN_BYTES:
                    chunk = await stream.read(TOKEN_BYTES - len(token))
                    if not chunk:
                        raise BulkError("stream closed before the token")
                    token += chunk
            owner = self._by_token.get(token)
            if owner is None or owner[0] != peer or owner[1].keys is None:
                raise BulkError("unknown or unanswered bulk token")
            setup = owner[1]
            assert setup.keys is not None
        except (BulkError, trio.TooSlowError) as exc:
            log.warning("refused bulk stream from %s: %s", peer, exc)
            await adapted.aclose()
            return
        self.listener.forget_offer(token)
        channel = stream_channel(adapted, setup.keys, True, self.settings, PATH_LIBP2P, peer)
        self._finish(peer, setup, channel=channel, run=False)
        await channel.run()  # this handler owns the stream: the channel lives as long as it

    # ------------------------------------------------------------------ dialer side

    async def _dial(self, peer: str, offer_msg: Any) -> None:
        setup = self._setups.get(peer)
        if setup is None or setup.done.is_set():
            setup = self._setups[peer] = _Setup()
        try:
            offer = BulkOffer.from_wire(offer_msg)
        except BulkError as exc:
            log.warning("refused bulk offer from %s: %s", peer, exc)
            self._finish(peer, setup, error=f"bad offer: {exc}")
            return
        answer = make_answer(offer, offer.connections)
        keys = derive_session_keys(offer, answer)
        if not await self.links.send(peer, {"t": "bulk.answer", "answer": answer.to_wire()}):
            self._finish(peer, setup, error="control link down")
            return
        host = self._reachable_host(peer) or offer.host
        try:
            target = BulkOffer(
                offer.token,
                offer.listener_random,
                host,
                offer.ports,
                offer.connections,
                offer.cipher,
            )
            channel = await dial_direct_channel(target, keys, self.settings, peer=peer)
        except (BulkError, OSError) as exc:
            log.info("no direct bulk path to %s (%s); using a libp2p stream", peer, exc)
            try:
                channel = await self._dial_fallback(peer, offer.token, keys)
            except Exception as exc2:
                error = f"direct: {exc}; libp2p stream: {exc_reason(exc2)}"
                log.warning("no bulk channel to %s: %s", peer, error)
                self._finish(peer, setup, error=error)
                return
        self._finish(peer, setup, channel=channel)

    async def _dial_fallback(self, peer: str, token: bytes, keys: SessionKeys) -> BulkChannel:
        with trio.fail_after(self.settings.handshake_timeout_s):
            stream = await self.host.new_stream(ID.from_base58(peer), [self.stream_protocol])
            await stream.write(token)
        return stream_channel(
            Libp2pByteStream(stream), keys, False, self.settings, PATH_LIBP2P, peer
        )

    def _reachable_host(self, peer: str) -> str | None:
        """The IP our libp2p connection to ``peer`` goes to: the best guess at its address."""
        kind, remotes = connection_info(self.host, peer)
        for addr in remotes:
            parts = addr.split("/")
            if kind == "direct" and len(parts) > 2 and parts[1] == "ip4":
                return parts[2]
        return None

    # ------------------------------------------------------------------ both sides

    def _finish(
        self,
        peer: str,
        setup: _Setup,
        channel: BulkChannel | None = None,
        error: str = "",
        run: bool = True,
    ) -> None:
        if setup.done.is_set():
            if channel is not None and channel is not setup.channel:
                self.nursery.start_soon(channel.aclose)
            return
        if self._setups.get(peer) is setup:
            del self._setups[peer]
        self._by_token.pop(setup.token, None)
        setup.channel, setup.error = channel, error
        if channel is not None:
            old = self.channels.get(peer)
            if old is not None and old is not channel:
                self.nursery.start_soon(old.aclose)
            self.channels[peer] = channel
            if run:
                self.nursery.start_soon(channel.run)
            log.info(
                "bulk channel to %s up over %s (%d connections)",
                peer,
                channel.path,
                channel.connections,
            )
            if self.on_channel is not None:
                self.on_channel(peer, channel)
        setup.done.set()
