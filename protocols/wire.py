"""Length-prefixed msgpack frames: the one message encoding of shoal's control plane.

A frame is a 4-byte big-endian payload length followed by a msgpack map. The decoder is
sans-IO: feed it whatever bytes a stream returned and take whole messages out. Every limit is
checked before a byte is buffered past it, so a peer cannot make us allocate more than
``max_frame_bytes`` plus one read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

LENGTH = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES = 1 << 20


class FrameError(ValueError):
    """A frame that cannot be accepted: the reason says why."""


def encode_frame(message: dict[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Pack ``message`` into one frame; refuse to send what the peer would refuse to read."""
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > max_frame_bytes:
        raise FrameError(f"outgoing frame of {len(payload)} bytes exceeds {max_frame_bytes}")
    return LENGTH.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Unpack one frame's payload into a map with string keys, or raise FrameError."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=len(payload))
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise FrameError(f"malformed msgpack payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict):
        raise FrameError(f"frame payload is a {type(message).__name__}, expected a map")
    if not isinstance(message.get("t"), str):
        raise FrameError("frame has no string message type 't'")
    return message


class FrameDecoder:
    """Incremental frame decoder: ``feed(bytes)`` returns the complete messages so far.

    Messages that arrived before a bad frame are still returned; the error is raised by
    :meth:`check` (and by any later ``feed``), after the caller has handled them.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.check()
        self._buffer += data
        messages: list[dict[str, Any]] = []
        try:
            for message in self._drain():
                messages.append(message)
        except FrameError as exc:
            self._error = exc
            if not messages:
                raise
        return messages

    def check(self) -> None:
        """Raise the error of a bad frame met by an earlier ``feed``, if any."""
        if self._error is not None:
            raise self._error

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def _drain(self) -> Iterator[dict[str, Any]]:
        while len(self._buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                raise FrameError(f"declared frame length {length} exceeds {self.max_frame_bytes}")
            end = LENGTH.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[LENGTH.size : end])
            del self._buffer[:end]
            yield decode_payload(payload)
