"""The bulk tensor channel: handshake, framing, striping, failure behaviour, fallback path.

Direct-path tests use real TCP sockets on 127.0.0.1 (allowed for this part). Failure cases
that need exact control over the bytes on the wire use the fallback path over a trio memory
stream, where the test writes frames by hand with the same keys; the reader code is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from net.bulk import (
    BulkChannel,
    BulkClosedError,
    BulkError,
    BulkHandshakeError,
    BulkListener,
    BulkOffer,
    BulkOverflowError,
    BulkProtocolError,
    BulkSettings,
    BulkTimeout,
    BulkTransferError,
    derive_session_keys,
    dial_direct_channel,
    make_answer,
    stream_channel,
)
from net.bulk_frames import (
    AEAD_TAG_BYTES,
    CIPHER_AES_GCM,
    CIPHER_CHACHA20,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    HELLO_BYTES,
    KIND_DATA,
    BulkAnswer,
    FrameCipher,
    FrameLimits,
    SessionKeys,
    encode_hello,
    make_offer,
    pack_header_into,
    parse_header,
    parse_hello,
)

KiB = 1024
MiB = 1024 * KiB
LOGGER = "shoal.net.bulk"


def small_settings(**kw: object) -> BulkSettings:
    base: dict[str, object] = {
        "connections_per_peer": 3,
        "chunk_bytes": 256 * KiB,
        "io_timeout_s": 5.0,
        "handshake_timeout_s": 5.0,
    }
    base.update(kw)
    return BulkSettings(**base)  # type: ignore[arg-type]


@asynccontextmanager
async def direct_pair(
    settings: BulkSettings,
) -> AsyncIterator[tuple[BulkChannel, BulkChannel, BulkListener, BulkOffer, SessionKeys]]:
    """A running listener, one answered offer, and both running ends of its direct channel."""
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        await nursery.start(listener.serve)
        offer_msg = listener.create_offer()
        offer = BulkOffer.from_wire(offer_msg)  # what the dialer got over the control stream
        answer = make_answer(offer, settings.connections_per_peer)
        dialer_keys = derive_session_keys(offer, answer)
        listener.accept_answer(answer.to_wire())
        ends: dict[str, BulkChannel] = {}

        async def listen_side() -> None:
            ends["l"] = await listener.wait_channel(offer.token)

        async def dial_side() -> None:
            ends["d"] = await dial_direct_channel(offer, dialer_keys, settings)

        async with trio.open_nursery() as both:
            both.start_soon(listen_side)
            both.start_soon(dial_side)
        async with ends["l"].running() as lch, ends["d"].running() as dch:
            yield lch, dch, listener, offer, dialer_keys
        nursery.cancel_scope.cancel()


def stream_keys(cipher: str = CIPHER_AES_GCM) -> SessionKeys:
    offer = make_offer("", (), 1, cipher)
    return derive_session_keys(offer, make_answer(offer, 1))


class RawSender:
    """Writes frames by hand, as the dialer of `keys`, to test what a receiver accepts."""

    def __init__(self, stream: trio.abc.Stream, keys: SessionKeys) -> None:
        self.stream = stream
        self.cipher = FrameCipher(keys.cipher, keys.send_key(0, is_listener=False))

    def frame(
        self,
        tag: int,
        total: int,
        offset: int,
        chunk_len: int,
        payload: bytes,
        kind: int = KIND_DATA,
        transfer: int | None = None,
    ) -> bytearray:
        """One sealed frame; `transfer` (the sender's transfer id) defaults to the tag."""
        header = bytearray(FRAME_HEADER_BYTES)
        xid = tag if transfer is None else transfer
        pack_header_into(header, kind, tag, xid, total, offset, chunk_len, len(payload))
        sealed = bytearray(len(payload) + AEAD_TAG_BYTES)
        self.cipher.seal_into(memoryview(header), memoryview(payload), memoryview(sealed))
        return header + sealed

    async def send(self, data: bytes | bytearray) -> None:
        await self.stream.send_all(bytes(data))


@asynccontextmanager
async def raw_to_channel(
    settings: BulkSettings, cipher: str = CIPHER_AES_GCM
) -> AsyncIterator[tuple[RawSender, BulkChannel]]:
    """A hand-driven sender on one end of a memory stream, a running channel on the other."""
    keys = stream_keys(cipher)
    raw_end, channel_end = trio.testing.memory_stream_pair()
    channel = stream_channel(channel_end, keys, is_listener=True, settings=settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        yield RawSender(raw_end, keys), channel
        await channel.aclose()


async def peer_saw_close(raw: RawSender) -> bool:
    """True when the channel closed its end: our sends break or our reads hit EOF."""
    try:
        await raw.send(b"x" * 64)
        return await raw.stream.receive_some(1024) == b""
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return True


# ---------------------------------------------------------------------------------------------
# Direct path over real TCP


async def test_several_megabytes_round_trip_byte_exact_over_three_connections() -> None:
    settings = small_settings()
    payload = os.urandom(6 * MiB + 12345)
    back = os.urandom(3 * MiB + 7)
    async with direct_pair(settings) as (lch, dch, *_):
        assert lch.path == dch.path == "direct"
        assert lch.connections == dch.connections == 3
        into = bytearray(len(payload))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dch.send, 11, payload)
            nursery.start_soon(lch.send, 12, back)
            got = await lch.receive(11, into=into)
            got_back = await dch.receive(12)
        assert bytes(got) == payload and got.obj is into
        assert bytes(got_back) == back
        assert lch.counters.bytes_copied == 0  # decrypted straight into `into`
        assert dch.bytes_sent == lch.bytes_received == len(payload)
        assert lch.bytes_sent == dch.bytes_received == len(back)


async def test_chacha20_cipher_round_trip() -> None:
    settings = small_settings(cipher=CIPHER_CHACHA20, connections_per_peer=2)
    payload = os.urandom(MiB + 3)
    async with direct_pair(settings) as (lch, dch, _, offer, _keys):
        assert offer.cipher == CIPHER_CHACHA20
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dch.send, 1, payload)
            assert await lch.receive(1) == payload


async def test_interleaved_tags_arrive_intact_in_any_receive_order() -> None:
    settings = small_settings(chunk_bytes=64 * KiB)
    payloads = {
        tag: os.urandom(size) for tag, size in [(1, 700_001), (2, 0), (3, 64 * KiB), (4, 1)]
    }
    async with direct_pair(settings) as (lch, dch, *_):
        async with trio.open_nursery() as nursery:
            for tag, data in payloads.items():
                nursery.start_soon(dch.send, tag, data)
        # all sent before anyone asked: they were buffered as unclaimed transfers
        for tag in (4, 3, 2, 1):
            assert await lch.receive(tag) == payloads[tag]


async def test_transfers_of_one_tag_are_received_in_send_order() -> None:
    settings = small_settings(chunk_bytes=32 * KiB, connections_per_peer=3)
    rounds = [os.urandom(100_000 + 7 * i) for i in range(6)]
    async with direct_pair(settings) as (lch, dch, *_):
        async with trio.open_nursery() as nursery:

            async def send_all_rounds() -> None:
                for data in rounds:  # back to back, not waiting for the receiver
                    await dch.send(5, data)

            nursery.start_soon(send_all_rounds)
            for data in rounds:
                assert await lch.receive(5) == data
        assert lch.unclaimed_bytes == 0


async def test_chunks_racing_ahead_of_chunk_zero_are_kept_in_order() -> None:
    async with raw_to_channel(small_settings()) as (raw, channel):
        first, second = b"A" * 300 + b"a" * 300, b"B" * 300 + b"b" * 300
        async with trio.open_nursery() as nursery:
            into = bytearray(600)
            results: list[bytes] = []

            async def receive_both() -> None:
                results.append(bytes(await channel.receive(5, into=into)))
                results.append(bytes(await channel.receive(5)))

            nursery.start_soon(receive_both)
            await trio.testing.wait_all_tasks_blocked()
            # tails of both transfers first (as if they came over faster connections)
            await raw.send(raw.frame(5, 600, 300, 300, second[300:], transfer=2))
            await raw.send(raw.frame(5, 600, 300, 300, first[300:], transfer=1))
            await raw.send(raw.frame(5, 600, 0, 300, first[:300], transfer=1))
            await raw.send(raw.frame(5, 600, 0, 300, second[:300], transfer=2))
        assert results == [first, second]
        assert into == first
        assert channel.unclaimed_bytes == 0


async def test_byte_flipped_on_the_tcp_path_fails_the_transfer_with_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    settings = small_settings(connections_per_peer=1)
    flip_at = HELLO_BYTES + FRAME_HEADER_BYTES + 1000  # inside the first frame's ciphertext
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        port = await nursery.start(listener.serve)

        async def flipping_proxy(client: trio.SocketStream) -> None:
            # forwards dialer -> listener with one bit flipped, listener -> dialer untouched
            upstream = await trio.open_tcp_stream("127.0.0.1", port)

            async def pipe(src: trio.SocketStream, dst: trio.SocketStream, flip: bool) -> None:
                seen = 0
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := bytearray(await src.receive_some(65536)):
                        if flip and seen <= flip_at < seen + len(data):
                            data[flip_at - seen] ^= 0x80
                        seen += len(data)
                        await dst.send_all(bytes(data))
                await trio.aclose_forcefully(dst)

            async with trio.open_nursery() as both:
                both.start_soon(pipe, client, upstream, True)
                both.start_soon(pipe, upstream, client, False)

        proxies = await nursery.start(trio.serve_tcp, flipping_proxy, 0)
        proxy_port = proxies[0].socket.getsockname()[1]
        offer = BulkOffer.from_wire(listener.create_offer())
        answer = make_answer(offer, 1)
        listener.accept_answer(answer.to_wire())
        via_proxy = dataclasses.replace(offer, ports=(proxy_port,))
        dch = await dial_direct_channel(via_proxy, derive_session_keys(offer, answer), settings)
        lch = await listener.wait_channel(offer.token)
        async with lch.running(), dch.running():
            await dch.send(1, os.urandom(10_000))
            with pytest.raises(BulkProtocolError, match="failed authentication"):
                await lch.receive(1)
            with pytest.raises(BulkClosedError):  # the listener closed the connection
                await dch.receive(2)
        nursery.cancel_scope.cancel()
    assert "failed authentication" in caplog.text


async def test_spent_token_is_refused_with_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    settings = small_settings(connections_per_peer=2)
    async with direct_pair(settings) as (_, _, _, offer, keys):
        with pytest.raises(BulkHandshakeError):
            await dial_direct_channel(offer, keys, settings)
    assert "token already spent" in caplog.text


async def test_unknown_token_is_refused_with_logged_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    settings = small_settings(connections_per_peer=1)
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        port = await nursery.start(listener.serve)
        listener.create_offer()  # a real offer exists, but the dialer forges another one
        forged = make_offer("127.0.0.1", (port,), 1, CIPHER_AES_GCM)
        keys = derive_session_keys(forged, make_answer(forged, 1))
        with pytest.raises(BulkHandshakeError):
            await dial_direct_channel(forged, keys, settings)
        nursery.cancel_scope.cancel()
    assert "unknown token" in caplog.text


async def test_right_token_with_wrong_keys_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    settings = small_settings(connections_per_peer=1)
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        await nursery.start(listener.serve)
        offer = BulkOffer.from_wire(listener.create_offer())
        listener.accept_answer(make_answer(offer, 1).to_wire())
        # a sniffer saw the token but not the randoms: its own answer gives other keys
        thief_keys = derive_session_keys(offer, make_answer(offer, 1))
        with pytest.raises(BulkHandshakeError):
            await dial_direct_channel(offer, thief_keys, settings)
        nursery.cancel_scope.cancel()
    assert "hello MAC does not verify" in caplog.text


async def test_same_connection_index_twice_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    settings = small_settings(connections_per_peer=2)
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        port = await nursery.start(listener.serve)
        offer = BulkOffer.from_wire(listener.create_offer())
        answer = make_answer(offer, 2)
        keys = listener.accept_answer(answer.to_wire())
        first = await trio.open_tcp_stream("127.0.0.1", port)
        await first.send_all(encode_hello(keys, 0))
        assert len(await first.receive_some(64)) > 0  # acked
        second = await trio.open_tcp_stream("127.0.0.1", port)
        await second.send_all(encode_hello(keys, 0))
        assert await second.receive_some(64) == b""  # refused: closed without an ack
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()
    assert "connection index 0 of this token already used" in caplog.text


async def test_silent_connection_is_dropped_after_handshake_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    settings = small_settings(handshake_timeout_s=0.2)
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        port = await nursery.start(listener.serve)
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await silent.receive_some(64) == b""
        await silent.aclose()
        nursery.cancel_scope.cancel()
    assert "no valid hello within handshake_timeout_s" in caplog.text


async def test_dialing_before_the_answer_or_the_wait_still_connects() -> None:
    settings = small_settings(connections_per_peer=2)
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        await nursery.start(listener.serve)
        offer = BulkOffer.from_wire(listener.create_offer())
        answer = make_answer(offer, 2)
        keys = derive_session_keys(offer, answer)
        dialed: list[BulkChannel] = []

        async def dial() -> None:
            dialed.append(await dial_direct_channel(offer, keys, settings))

        nursery.start_soon(dial)
        with trio.fail_after(5):
            while listener.pending_handshakes < 2:  # both connections are in their handshake
                await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        assert not dialed  # no ack before the listener has the answer
        listener.accept_answer(answer.to_wire())
        with trio.fail_after(5):
            while not dialed:
                await trio.sleep(0.01)
        # every connection was acked before anyone asked for the channel
        listening = await listener.wait_channel(offer.token)
        async with listening.running() as lch, dialed[0].running() as dch:
            await dch.send(3, b"late but fine")
            assert await lch.receive(3) == b"late but fine"
        with pytest.raises(BulkHandshakeError):
            await listener.wait_channel(offer.token)
        nursery.cancel_scope.cancel()


async def test_answer_for_unknown_offer_is_rejected() -> None:
    settings = small_settings()
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        await nursery.start(listener.serve)
        listener.create_offer()
        stray = make_offer("127.0.0.1", (1,), 1, CIPHER_AES_GCM)
        with pytest.raises(BulkHandshakeError, match="unknown"):
            listener.accept_answer(make_answer(stray, 1).to_wire())
        nursery.cancel_scope.cancel()


async def test_peer_killed_mid_transfer_is_an_error_not_a_short_result() -> None:
    settings = small_settings(chunk_bytes=64 * KiB, connections_per_peer=2)
    size = 50 * MiB
    async with direct_pair(settings) as (lch, dch, *_), trio.open_nursery() as nursery:

        async def doomed_send() -> None:
            with contextlib.suppress(BulkError):
                await dch.send(9, bytes(size))

        nursery.start_soon(doomed_send)
        with trio.fail_after(5):
            while dch.bytes_sent == 0:
                await trio.sleep(0.001)
        # the sender "dies": its sockets close without a close frame
        for conn in dch._conns:
            conn.transport.stream.socket.close()  # type: ignore[attr-defined]
        with pytest.raises(BulkClosedError):
            await lch.receive(9)
        assert lch.bytes_received < size


# ---------------------------------------------------------------------------------------------
# Fallback path over a byte stream


async def test_fallback_over_memory_stream_round_trip() -> None:
    settings = small_settings(chunk_bytes=32 * KiB)
    offer = make_offer("", (), 1, CIPHER_AES_GCM)
    answer = make_answer(offer, 1)
    keys = derive_session_keys(BulkOffer.from_wire(offer.to_wire()), answer)
    a, b = trio.testing.memory_stream_pair()
    left = stream_channel(a, keys, is_listener=True, settings=settings)
    right = stream_channel(b, keys, is_listener=False, settings=settings)
    assert left.path == right.path == "libp2p"
    data = os.urandom(500_000)
    async with left.running(), right.running(), trio.open_nursery() as nursery:
        nursery.start_soon(right.send, 1, data)
        nursery.start_soon(left.send, 2, data[::-1])
        assert await left.receive(1) == data
        assert await right.receive(2) == data[::-1]
    assert left.bytes_received == right.bytes_sent == len(data)


async def test_tampered_ciphertext_closes_connection_with_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    async with raw_to_channel(small_settings()) as (raw, channel):
        frame = raw.frame(1, 1000, 0, 1000, os.urandom(1000))
        frame[FRAME_HEADER_BYTES + 500] ^= 0x01
        await raw.send(frame)
        with pytest.raises(BulkProtocolError, match="failed authentication"):
            await channel.receive(1)
        assert await peer_saw_close(raw)
    assert "failed authentication" in caplog.text


async def test_tampered_header_fails_authentication() -> None:
    async with raw_to_channel(small_settings()) as (raw, channel):
        frame = raw.frame(1, 1000, 0, 1000, os.urandom(1000))
        frame[8] ^= 0x01  # tag 1 -> 0: still a valid header, but it is the AEAD's AAD
        await raw.send(frame)
        with pytest.raises(BulkProtocolError, match="failed authentication"):
            await channel.receive(0)


async def test_bad_magic_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    async with raw_to_channel(small_settings()) as (raw, channel):
        frame = raw.frame(1, 10, 0, 10, b"0123456789")
        frame[:4] = b"HTTP"
        await raw.send(frame)
        with pytest.raises(BulkProtocolError, match="bad frame magic"):
            await channel.receive(1)
        assert await peer_saw_close(raw)
    assert FRAME_MAGIC not in caplog.text.encode() and "bad frame magic" in caplog.text


async def test_length_above_max_chunk_is_rejected_before_reading_payload() -> None:
    settings = small_settings(max_chunk_bytes=1 * MiB, chunk_bytes=64 * KiB)
    async with raw_to_channel(settings) as (raw, channel):
        header = bytearray(FRAME_HEADER_BYTES)
        pack_header_into(header, KIND_DATA, 1, 1, 8 * MiB, 0, 8 * MiB, 8 * MiB)
        await raw.send(header)  # no payload follows: the header alone must be refused
        with pytest.raises(BulkProtocolError, match="above max_chunk_bytes"):
            await channel.receive(1)


async def test_transfer_above_max_transfer_bytes_is_rejected() -> None:
    settings = small_settings(max_transfer_bytes=10 * MiB)
    async with raw_to_channel(settings) as (raw, channel):
        await raw.send(raw.frame(1, 11 * MiB, 0, 1024, bytes(1024)))
        with pytest.raises(BulkProtocolError, match="above max_transfer_bytes"):
            await channel.receive(1)


async def test_chunk_sent_twice_is_rejected() -> None:
    async with raw_to_channel(small_settings()) as (raw, channel):
        await raw.send(raw.frame(1, 2000, 0, 1000, bytes(1000)))
        await raw.send(raw.frame(1, 2000, 0, 1000, bytes(1000)))
        with pytest.raises(BulkProtocolError, match="sent twice"):
            await channel.receive(1)


async def test_truncated_frame_is_an_error() -> None:
    async with raw_to_channel(small_settings()) as (raw, channel):
        frame = raw.frame(1, 1000, 0, 1000, bytes(1000))
        await raw.send(frame[:700])
        await raw.stream.aclose()
        with pytest.raises(BulkClosedError, match="mid-frame"):
            await channel.receive(1)


async def test_peer_closing_between_chunks_is_an_error_not_a_short_result() -> None:
    async with raw_to_channel(small_settings()) as (raw, channel):
        await raw.send(raw.frame(1, 3000, 0, 1000, bytes(1000)))
        await raw.send(raw.frame(1, 3000, 1000, 1000, bytes(1000)))
        await raw.stream.aclose()
        with pytest.raises(BulkClosedError, match="without a close frame"):
            await channel.receive(1)


async def test_close_frame_fails_waiters_but_keeps_completed_transfers() -> None:
    settings = small_settings()
    a, b = trio.testing.memory_stream_pair()
    keys = stream_keys()
    left = stream_channel(a, keys, is_listener=True, settings=settings)
    right = stream_channel(b, keys, is_listener=False, settings=settings)
    async with left.running(), trio.open_nursery() as nursery:
        await nursery.start(right.run)
        await right.send(1, b"done")
        await right.aclose()
        with pytest.raises(BulkClosedError, match="peer closed the channel"):
            await left.receive(2)
        assert await left.receive(1) == b"done"


async def test_stalled_transfer_raises_timeout(autojump_clock: trio.testing.MockClock) -> None:
    settings = small_settings(io_timeout_s=3.0)
    async with raw_to_channel(settings) as (raw, channel):
        await raw.send(raw.frame(1, 2000, 0, 1000, bytes(1000)))
        start = trio.current_time()
        with pytest.raises(BulkTimeout, match="1 of 2 chunks"):
            await channel.receive(1)
        assert trio.current_time() - start == pytest.approx(3.0)
        # the late chunk is authenticated and dropped; the tag then starts a new transfer
        await raw.send(raw.frame(1, 2000, 1000, 1000, bytes(1000)))
        await raw.send(raw.frame(1, 3, 0, 3, b"new", transfer=99))
        assert await channel.receive(1) == b"new"
        assert channel.failure is None


async def test_receive_of_a_transfer_that_never_starts_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_to_channel(small_settings(io_timeout_s=2.0)) as (_, channel):
        with pytest.raises(BulkTimeout, match="not started"):
            await channel.receive(1)
        with pytest.raises(BulkTimeout):
            await channel.receive(1, timeout_s=0.5)
        assert channel.failure is None  # waiting for nothing is not a channel fault


async def test_receive_that_gives_up_early_leaves_the_transfer_for_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    data = os.urandom(3000)
    async with raw_to_channel(small_settings(io_timeout_s=2.0)) as (raw, channel):
        async with trio.open_nursery() as nursery:

            async def impatient() -> None:
                with pytest.raises(BulkTimeout):
                    await channel.receive(5, into=bytearray(3000), timeout_s=1.0)

            nursery.start_soon(impatient)
            await trio.testing.wait_all_tasks_blocked()
            # a middle chunk arrives (the receive takes it tentatively), then nothing for 1 s
            await raw.send(raw.frame(5, 3000, 1000, 1000, data[1000:2000]))
        await raw.send(raw.frame(5, 3000, 0, 1000, data[:1000]))
        await raw.send(raw.frame(5, 3000, 2000, 1000, data[2000:]))
        assert await channel.receive(5) == data
        assert channel.failure is None and channel.unclaimed_bytes == 0


def test_settings_refuse_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        BulkSettings(chunk_bytes=32 * MiB, max_chunk_bytes=16 * MiB)
    with pytest.raises(ValueError, match="cipher"):
        BulkSettings(cipher="des")
    with pytest.raises(ValueError, match="io_timeout_s"):
        BulkSettings(io_timeout_s=0)


async def test_frame_stalled_mid_way_fails_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_to_channel(small_settings(io_timeout_s=2.0)) as (raw, channel):
        frame = raw.frame(1, 1000, 0, 1000, bytes(1000))
        await raw.send(frame[:100])
        with pytest.raises(BulkTimeout, match="frame stalled"):
            await channel.receive(1, timeout_s=100.0)


async def test_sender_times_out_when_peer_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = small_settings(io_timeout_s=2.0, chunk_bytes=64 * KiB)
    a, _b = trio.testing.lockstep_stream_pair()  # nobody ever reads _b
    sender = stream_channel(a, stream_keys(), is_listener=False, settings=settings)
    async with sender.running():
        with pytest.raises(BulkTimeout, match="io_timeout_s"):
            await sender.send(1, bytes(MiB))
        with pytest.raises(BulkTimeout):
            await sender.send(2, b"after failure")


async def test_cancelled_send_fails_the_channel_only_once_a_frame_went_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = small_settings(io_timeout_s=10.0, connections_per_peer=1)
    a, _b = trio.testing.lockstep_stream_pair()  # nobody reads: the first frame never finishes
    sender = stream_channel(a, stream_keys(), is_listener=False, settings=settings)
    async with sender.running(), trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def send_first() -> None:
            with first:
                await sender.send(1, bytes(1000))

        nursery.start_soon(send_first)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1.0):
            await sender.send(2, b"waits for the connection")  # never gets the lock
        assert sender.failure is None
        first.cancel()  # this one was mid-frame
        await trio.testing.wait_all_tasks_blocked()
        assert isinstance(sender.failure, BulkClosedError)
        assert "send of tag 1 stopped after 0 of 1 chunks: cancelled" in str(sender.failure)


async def test_unclaimed_transfers_beyond_budget_fail_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = small_settings(max_unclaimed_bytes=3000, io_timeout_s=2.0)
    async with raw_to_channel(settings) as (raw, channel):
        await raw.send(raw.frame(1, 2000, 0, 2000, bytes(2000)))
        await raw.send(raw.frame(2, 2000, 0, 2000, bytes(2000)))  # 4000 > 3000 unclaimed
        await trio.sleep(5)
        assert isinstance(channel.failure, BulkOverflowError)
        assert await channel.receive(1) == bytes(2000)  # completed before the overflow


async def test_claiming_a_buffered_transfer_makes_room() -> None:
    settings = small_settings(max_unclaimed_bytes=3000)
    async with raw_to_channel(settings) as (raw, channel):
        await raw.send(raw.frame(1, 2000, 0, 2000, b"a" * 2000))
        await raw.send(raw.frame(2, 2000, 0, 2000, b"b" * 2000))
        assert await channel.receive(1) == b"a" * 2000
        into = bytearray(2000)
        assert await channel.receive(2, into=into) == b"b" * 2000
        assert into == b"b" * 2000
        assert channel.failure is None


async def test_into_of_wrong_size_is_refused_and_the_transfer_stays() -> None:
    data = os.urandom(20)
    async with raw_to_channel(small_settings()) as (raw, channel):
        async with trio.open_nursery() as nursery:

            async def wrong_size() -> None:
                with pytest.raises(BulkTransferError, match="into has 10"):
                    await channel.receive(1, into=bytearray(10))

            nursery.start_soon(wrong_size)  # waiting before the transfer starts
            await trio.testing.wait_all_tasks_blocked()
            await raw.send(raw.frame(1, 20, 0, 8, data[:8]))
        await raw.send(raw.frame(1, 20, 8, 8, data[8:16]))
        await raw.send(raw.frame(1, 20, 16, 8, data[16:]))
        await raw.send(raw.frame(2, 5, 0, 5, b"hello"))
        with pytest.raises(BulkTransferError, match="into has 4"):  # already buffered
            await channel.receive(2, into=bytearray(4))
        assert await channel.receive(2, into=bytearray(5)) == b"hello"
        assert await channel.receive(1, into=bytearray(20)) == data
        assert channel.unclaimed_bytes == 0
        with pytest.raises(BulkTransferError, match="writable"):
            await channel.receive(3, into=memoryview(b"read-only"))


async def test_second_receiver_of_same_tag_is_refused() -> None:
    async with raw_to_channel(small_settings()) as (raw, channel), trio.open_nursery() as nursery:
        nursery.start_soon(channel.receive, 1)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BulkTransferError, match="already being received"):
            await channel.receive(1)
        await raw.send(raw.frame(1, 3, 0, 3, b"abc"))


def test_offer_from_wire_rejects_malformed_dicts() -> None:
    good = make_offer("10.0.0.1", (4000,), 2, CIPHER_AES_GCM).to_wire()
    assert BulkOffer.from_wire(good).ports == (4000,)
    bad_cases = [
        "not a dict",
        {k: v for k, v in good.items() if k != "token"},
        {**good, "token": b"short"},
        {**good, "v": 2},
        {**good, "ports": [70000]},
        {**good, "connections": 0},
        {**good, "connections": True},
        {**good, "cipher": "rot13"},
        {**good, "host": 5},
    ]
    for bad in bad_cases:
        with pytest.raises(BulkHandshakeError):
            BulkOffer.from_wire(bad)
    with pytest.raises(BulkHandshakeError):
        BulkAnswer.from_wire({"v": 1, "token": bytes(32), "random": bytes(31), "connections": 1})


def test_keys_differ_per_connection_and_direction_and_agree_between_sides() -> None:
    offer = make_offer("h", (1,), 4, CIPHER_AES_GCM)
    answer = make_answer(offer, 4)
    mine = derive_session_keys(offer, answer)
    theirs = derive_session_keys(BulkOffer.from_wire(offer.to_wire()), answer)
    assert mine == theirs
    all_keys = mine.listener_to_dialer + mine.dialer_to_listener + (mine.hello_key,)
    assert len(set(all_keys)) == 9
    assert mine.send_key(2, is_listener=True) == theirs.receive_key(2, is_listener=False)
    with pytest.raises(BulkHandshakeError):
        derive_session_keys(offer, BulkAnswer(offer.token, bytes(32), 5))


def test_random_and_mutated_headers_only_ever_raise_protocol_errors() -> None:
    rng = random.Random(1234)
    limits = FrameLimits(max_chunk_bytes=1 * MiB, max_transfer_bytes=64 * MiB)
    valid = bytearray(FRAME_HEADER_BYTES)
    pack_header_into(valid, KIND_DATA, 7, 3, 5 * MiB, 1 * MiB, 1 * MiB, 1 * MiB)
    parse_header(valid, limits)  # the unmutated one is fine
    accepted = 0
    for i in range(3000):
        if i % 2:
            buf = bytearray(rng.randbytes(FRAME_HEADER_BYTES))
        else:
            buf = bytearray(valid)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(FRAME_HEADER_BYTES)] = rng.randrange(256)
        try:
            kind, _tag, _xid, total, offset, _chunk, length = parse_header(buf, limits)
        except BulkProtocolError:
            continue
        accepted += 1
        # whatever passes is internally consistent with the caps
        assert total <= limits.max_transfer_bytes and length <= limits.max_chunk_bytes
        assert kind != KIND_DATA or total == 0 or offset + length <= total
    assert 0 < accepted < 3000
    for _ in range(500):
        with contextlib.suppress(BulkHandshakeError):
            parse_hello(rng.randbytes(HELLO_BYTES))


# ---------------------------------------------------------------------------------------------
# discard(): dropping transfers nobody will receive (an aborted attempt's)


def attempt_tag(prefix: int, index: int) -> int:
    """A tag of one attempt's family: the attempt in the high 32 bits, as the driver does."""
    return prefix << 32 | index


def of_attempt(prefix: int) -> Callable[[int], bool]:
    return lambda tag: tag >> 32 == prefix


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a condition that real sockets make true at some point (polled)."""
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.001)


async def test_discard_releases_exactly_the_buffered_matching_transfers_over_tcp() -> None:
    settings = small_settings(chunk_bytes=64 * KiB)
    garbage = {attempt_tag(0xA5, i): os.urandom(n) for i, n in enumerate([300_001, 64 * KiB, 0, 1])}
    keep_tag = attempt_tag(0xB6, 0)
    keep = os.urandom(200_000)
    async with direct_pair(settings) as (lch, dch, *_):
        async with trio.open_nursery() as nursery:
            for tag, data in garbage.items():
                nursery.start_soon(dch.send, tag, data)
            nursery.start_soon(dch.send, keep_tag, keep)
        everything = sum(map(len, garbage.values())) + len(keep)
        # every transfer started (charged in full) and every byte arrived: all are buffered
        await wait_until(
            lambda: lch.unclaimed_bytes == everything and lch.bytes_received == everything
        )
        released = lch.discard(of_attempt(0xA5))
        assert released == sum(map(len, garbage.values()))
        assert lch.unclaimed_bytes == len(keep)
        assert lch.counters.transfers_discarded == len(garbage)
        assert lch.counters.bytes_discarded == released
        assert await lch.receive(keep_tag) == keep
        assert lch.unclaimed_bytes == 0
        with pytest.raises(BulkTimeout, match="not started"):
            await lch.receive(attempt_tag(0xA5, 0), timeout_s=0.2)

        # the same attempt's tags sent later are dropped as they arrive, striped or not
        late = os.urandom(500_000)
        await dch.send(attempt_tag(0xA5, 7), late)
        await dch.send(attempt_tag(0xB6, 1), b"after")
        assert await lch.receive(attempt_tag(0xB6, 1)) == b"after"
        await wait_until(lambda: lch.bytes_received == dch.bytes_sent)
        assert lch.unclaimed_bytes == 0
        assert lch.counters.transfers_discarded == len(garbage) + 1
        assert lch.counters.bytes_discarded == released + len(late)
        assert lch.failure is None and dch.failure is None


async def test_discard_drops_a_partly_arrived_transfer_and_its_late_frames() -> None:
    garbage = os.urandom(3000)
    fresh = os.urandom(2500)
    tag = attempt_tag(7, 1)
    async with raw_to_channel(small_settings()) as (raw, channel):
        await raw.send(raw.frame(tag, 3000, 1000, 1000, garbage[1000:2000], transfer=1))
        await raw.send(raw.frame(tag, 3000, 0, 1000, garbage[:1000], transfer=1))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 3000  # charged in full at the first frame
        assert channel.discard(of_attempt(7)) == 3000
        assert channel.unclaimed_bytes == 0
        assert channel.counters.bytes_discarded == 2000  # what had arrived
        await raw.send(raw.frame(tag, 3000, 2000, 1000, garbage[2000:], transfer=1))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 0
        assert channel.counters.bytes_discarded == 3000
        assert channel.counters.transfers_discarded == 1
        assert not channel._transfers  # its last chunk came: nothing of it is remembered
        # a new transfer of another tag, in several frames, goes through byte-exact
        for offset in range(0, 2500, 1000):
            part = fresh[offset : offset + 1000]
            await raw.send(raw.frame(9, 2500, offset, 1000, part, transfer=2))
        into = bytearray(2500)
        assert await channel.receive(9, into=into) == fresh
        assert into == fresh
        assert channel.failure is None and channel.unclaimed_bytes == 0


async def test_tampered_late_frame_of_a_discarded_transfer_still_fails_the_channel() -> None:
    tag = attempt_tag(7, 1)
    async with raw_to_channel(small_settings()) as (raw, channel):
        await raw.send(raw.frame(tag, 2000, 0, 1000, bytes(1000)))
        await trio.testing.wait_all_tasks_blocked()
        channel.discard(of_attempt(7))
        frame = raw.frame(tag, 2000, 1000, 1000, bytes(1000))
        frame[FRAME_HEADER_BYTES + 10] ^= 0x01
        await raw.send(frame)
        with pytest.raises(BulkProtocolError, match="failed authentication"):
            await channel.receive(9)
        assert await peer_saw_close(raw)


async def test_transfer_of_a_discarded_tag_sent_later_never_becomes_receivable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tag = attempt_tag(3, 5)
    data = os.urandom(1500)
    async with raw_to_channel(small_settings(io_timeout_s=2.0)) as (raw, channel):
        assert channel.discard(of_attempt(3)) == 0  # nothing buffered yet
        await raw.send(raw.frame(tag, 1500, 0, 1000, data[:1000]))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 0
        await raw.send(raw.frame(tag, 1500, 1000, 1000, data[1000:]))
        await raw.send(raw.frame(attempt_tag(4, 5), 2, 0, 2, b"ok", transfer=77))
        assert await channel.receive(attempt_tag(4, 5)) == b"ok"  # a non-matching tag
        assert channel.unclaimed_bytes == 0
        with pytest.raises(BulkTimeout, match="not started"):
            await channel.receive(tag, timeout_s=1.0)
        assert channel.counters.transfers_discarded == 1
        assert channel.counters.bytes_discarded == 1500
        assert channel.failure is None


async def test_discard_makes_room_under_the_unclaimed_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = small_settings(max_unclaimed_bytes=3000, io_timeout_s=2.0)
    async with raw_to_channel(settings) as (raw, channel):
        await raw.send(raw.frame(attempt_tag(1, 0), 2000, 0, 2000, bytes(2000), transfer=1))
        # 2000 + 2000 > 3000: the reader waits for room for this one
        await raw.send(raw.frame(attempt_tag(2, 0), 2000, 0, 2000, b"n" * 2000, transfer=2))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 2000
        assert channel.discard(of_attempt(1)) == 2000
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 2000  # the waiting transfer got in
        await trio.sleep(5)  # beyond io_timeout_s: without the discard this overflowed
        assert channel.failure is None
        # more garbage of the discarded attempt does not count against the limit either
        await raw.send(raw.frame(attempt_tag(1, 1), 2000, 0, 2000, bytes(2000), transfer=3))
        await trio.sleep(5)
        assert channel.failure is None and channel.unclaimed_bytes == 2000
        assert await channel.receive(attempt_tag(2, 0)) == b"n" * 2000
        await raw.send(raw.frame(5, 1500, 0, 1500, b"x" * 1500, transfer=4))
        await raw.send(raw.frame(6, 1500, 0, 1500, b"y" * 1500, transfer=5))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 3000
        assert await channel.receive(6) == b"y" * 1500
        assert await channel.receive(5) == b"x" * 1500
        assert channel.failure is None and channel.unclaimed_bytes == 0


async def test_discard_leaves_receives_in_progress_alone() -> None:
    mid, waiting, tentative = attempt_tag(8, 0), attempt_tag(8, 1), attempt_tag(8, 2)
    data = {tag: os.urandom(3000) for tag in (mid, waiting, tentative)}
    async with raw_to_channel(small_settings()) as (raw, channel):
        results: dict[int, bytes] = {}
        buffers = {tag: bytearray(3000) for tag in data}

        async def receive(tag: int) -> None:
            results[tag] = bytes(await channel.receive(tag, into=buffers[tag]))

        async with trio.open_nursery() as nursery:
            for tag in data:
                nursery.start_soon(receive, tag)
            await trio.testing.wait_all_tasks_blocked()
            # `mid` is sure of its transfer (chunk 0 came), `tentative` holds a middle chunk
            # (an earlier transfer of its tag could still turn up), `waiting` has nothing
            await raw.send(raw.frame(mid, 3000, 0, 1000, data[mid][:1000], transfer=1))
            await raw.send(
                raw.frame(tentative, 3000, 1000, 1000, data[tentative][1000:2000], transfer=3)
            )
            await trio.testing.wait_all_tasks_blocked()
            assert channel.discard(of_attempt(8)) == 0
            await raw.send(raw.frame(mid, 3000, 1000, 1000, data[mid][1000:2000], transfer=1))
            await raw.send(raw.frame(mid, 3000, 2000, 1000, data[mid][2000:], transfer=1))
            for offset in range(0, 3000, 1000):
                part = data[waiting][offset : offset + 1000]
                await raw.send(raw.frame(waiting, 3000, offset, 1000, part, transfer=2))
            await raw.send(raw.frame(tentative, 3000, 0, 1000, data[tentative][:1000], transfer=3))
            await raw.send(
                raw.frame(tentative, 3000, 2000, 1000, data[tentative][2000:], transfer=3)
            )
        assert results == data
        assert all(buffers[tag] == data[tag] for tag in data)
        assert channel.counters.bytes_copied == 0  # decrypted straight into the buffers
        assert channel.counters.transfers_discarded == 0
        assert channel.failure is None and channel.unclaimed_bytes == 0


async def test_receive_giving_up_on_a_discarded_tag_drops_rather_than_buffers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tag = attempt_tag(6, 0)
    data = os.urandom(3000)
    async with raw_to_channel(small_settings(io_timeout_s=2.0)) as (raw, channel):
        async with trio.open_nursery() as nursery:

            async def impatient() -> None:
                with pytest.raises(BulkTimeout):
                    await channel.receive(tag, into=bytearray(3000), timeout_s=1.0)

            nursery.start_soon(impatient)
            await trio.testing.wait_all_tasks_blocked()
            await raw.send(raw.frame(tag, 3000, 1000, 1000, data[1000:2000]))
            await trio.testing.wait_all_tasks_blocked()
            channel.discard(of_attempt(6))
        # the receive gave up holding a tentative transfer: it is dropped, not buffered
        assert channel.unclaimed_bytes == 0
        assert channel.counters.transfers_discarded == 1
        await raw.send(raw.frame(tag, 3000, 0, 1000, data[:1000]))
        await raw.send(raw.frame(tag, 3000, 2000, 1000, data[2000:]))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 0
        assert channel.counters.bytes_discarded == 3000
        with pytest.raises(BulkTimeout):
            await channel.receive(tag, timeout_s=1.0)
        assert channel.failure is None


async def test_only_the_newest_discard_rules_are_kept() -> None:
    async with raw_to_channel(small_settings(max_discard_rules=2)) as (raw, channel):
        for tag in (1, 2, 3):
            channel.discard(lambda t, tag=tag: t == tag)  # type: ignore[misc]
        for tag in (1, 2, 3):
            await raw.send(raw.frame(tag, 4, 0, 4, b"data", transfer=tag))
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 4  # the rule for tag 1 was forgotten, oldest first
        assert channel.counters.transfers_discarded == 2
        assert await channel.receive(1) == b"data"


async def test_a_discard_predicate_that_raises_is_refused_or_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, LOGGER)
    only_one = {1: True}
    async with raw_to_channel(small_settings()) as (raw, channel):
        channel.discard(lambda t: only_one[t])  # nothing buffered: not called yet
        await raw.send(raw.frame(2, 3, 0, 3, b"two", transfer=2))  # raises KeyError inside
        await trio.testing.wait_all_tasks_blocked()
        assert "discard predicate" in caplog.text and channel.failure is None
        await raw.send(raw.frame(1, 3, 0, 3, b"one", transfer=1))  # the rule is gone
        await trio.testing.wait_all_tasks_blocked()
        assert channel.unclaimed_bytes == 6
        with pytest.raises(KeyError):  # raising at once: nothing dropped, nothing remembered
            channel.discard(lambda t: only_one[t])
        assert channel.unclaimed_bytes == 6 and channel.counters.transfers_discarded == 0
        assert await channel.receive(2) == b"two"
        assert await channel.receive(1) == b"one"
        with pytest.raises(TypeError, match="callable"):
            channel.discard(5)  # type: ignore[arg-type]


def test_settings_refuse_zero_discard_rules() -> None:
    with pytest.raises(ValueError, match="max_discard_rules"):
        BulkSettings(max_discard_rules=0)


class _ResetLibp2pStream:
    """A libp2p stream whose peer went away: writes raise libp2p's own error type."""

    async def write(self, data: bytes) -> None:
        from libp2p.network.stream.exceptions import StreamError

        raise StreamError("Write operation failed: ")

    async def read(self, n: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def reset(self) -> None:
        pass


async def test_libp2p_stream_write_failure_fails_the_channel_with_a_bulk_error() -> None:
    # Before, libp2p's StreamError escaped bulk's send and ended the daemon (CI, stop 12).
    from net.bulk_peers import Libp2pByteStream

    stream = Libp2pByteStream(_ResetLibp2pStream())  # type: ignore[arg-type]
    sender = stream_channel(stream, stream_keys(), is_listener=False, settings=small_settings())
    async with sender.running():
        with pytest.raises(BulkClosedError, match="libp2p stream write failed: StreamError"):
            await sender.send(1, bytes(1000))
    assert isinstance(sender.failure, BulkClosedError)
