"""Frame encoding and the incremental decoder."""

from __future__ import annotations

import struct

import msgpack
import pytest

from protocols.wire import FrameDecoder, FrameError, encode_frame


def test_frames_split_anywhere_decode_whole() -> None:
    frames = encode_frame({"t": "a", "n": 1}) + encode_frame({"t": "b", "x": b"\x00" * 1000})
    for cut in range(len(frames)):
        decoder = FrameDecoder()
        got = decoder.feed(frames[:cut]) + decoder.feed(frames[cut:])
        assert [m["t"] for m in got] == ["a", "b"]
        assert decoder.pending_bytes == 0


def test_oversized_declared_length_is_rejected_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(FrameError, match="exceeds 100"):
        decoder.feed(struct.pack(">I", 101))


def test_refuses_to_send_an_oversized_frame() -> None:
    with pytest.raises(FrameError, match="outgoing"):
        encode_frame({"t": "x", "blob": b"a" * 200}, max_frame_bytes=100)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xc1\xc1", "malformed"),
        (msgpack.packb([1, 2, 3]), "expected a map"),
        (msgpack.packb({"x": 1}), "message type"),
        (msgpack.packb({1: 2, "t": "a"}), "malformed"),
    ],
)
def test_malformed_payloads_are_rejected(payload: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def test_messages_before_a_bad_frame_are_delivered_then_the_error_raised() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    got = decoder.feed(encode_frame({"t": "ok"}) + struct.pack(">I", 1000))
    assert [m["t"] for m in got] == ["ok"]
    with pytest.raises(FrameError, match="exceeds 100"):
        decoder.check()
    with pytest.raises(FrameError):
        decoder.feed(b"")
