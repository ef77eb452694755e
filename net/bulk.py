"""The bulk tensor channel: AEAD-framed transfers striped over several direct TCP connections.

libp2p streams move ~150-250 MB/s in Python; tensors need more. A `BulkChannel` carries tagged
transfers between two swarm members over `connections_per_peer` direct TCP connections (the
"direct" path) or, where no direct path exists, over one byte stream such as an adapted libp2p
stream (the "libp2p" path). The framing, keys and checks are the same on both paths; they live
in `net/bulk_frames.py` (sans-IO). This module is the trio driver.

Setting up (the offer and answer travel as msgpack dicts over a Noise-secured control stream):

    # listener side                              # dialer side
    listener = BulkListener(settings)
    await nursery.start(listener.serve)
    offer = listener.create_offer()   ------>    offer = BulkOffer.from_wire(msg)
                                                 answer = make_answer(offer, n)
    keys = listener.accept_answer(msg) <-----    keys = derive_session_keys(offer, answer)
    ch = await listener.wait_channel(offer["token"])
                                                 ch = await dial_direct_channel(offer, keys, s)
    async with ch.running():                     async with ch.running():
        data = await ch.receive(7)                   await ch.send(7, tensor_bytes)

Rules the channel keeps:

- A transfer is complete only when every chunk of its declared total length has been
  authenticated. A peer that crashes, closes or stalls mid-transfer gives the receiver an
  exception (`BulkClosedError`, `BulkTimeout`), never a short result.
- Connections are drained continuously by one reader task each. Transfers nobody waits for yet
  are buffered up to `max_unclaimed_bytes`; past that the reader waits `io_timeout_s` for a
  receiver to claim something and then fails the channel with `BulkOverflowError`.
- Transfers nobody will ever receive (those of an aborted all-reduce attempt) are dropped with
  `discard(match)`: buffered ones at once, later ones as they arrive (still authenticated),
  so garbage never eats the unclaimed budget.
- Any protocol error, authentication failure, broken connection or stalled frame fails the
  whole channel: chunks are striped, so the loss of one connection loses part of every
  transfer in flight. Waiting receivers and senders get the reason; the owner re-offers.
- Copies: the sender seals straight from the caller's buffer into a per-connection frame
  buffer; the receiver reads each frame with `recv_into` into a per-connection scratch and
  decrypts straight into the destination. A receive(tag, into=buf) that is waiting when the
  transfer starts gets it in `buf` with no further copy; data that arrived before its
  receive costs one more copy (counted in `counters.bytes_copied`).
- Transfers of one tag are received in the order they were sent (see BulkChannel).

Why the AES work runs on the trio thread, not in `trio.to_thread.run_sync` (measured on the
2-core build machine, 2026-11): `cryptography` does release the GIL in AES-GCM (one thread
encrypts ~10 GB/s, two threads ~20 GB/s together), so offloading would let a second core work.
But a 1 MiB chunk seals in ~0.1 ms, the same order as one thread hand-off, and on two cores
the sending and receiving processes already keep both cores busy (the sender also pays the
kernel's loopback copy). A/B with tests/bench/bench_bulk.py, 2 connections, 768 MiB: inline
crypto cost 0.28-0.35 CPU-s in the sender against 0.42-0.49 with the offload, and moved
0.8-1.7 GB/s against 1.0-1.1 GB/s (wall clock on a machine shared with other jobs). Less CPU
per byte wins where CPU is the limit, and inline keeps frame order and buffer ownership
simple. Revisit on machines with spare cores and links faster than one core's copy rate.
"""

from __future__ import annotations

import logging
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

import trio

from net.bulk_frames import (
    ACK_BYTES,
    AEAD_TAG_BYTES,
    CIPHER_AES_GCM,
    CIPHERS,
    FRAME_HEADER_BYTES,
    HELLO_BYTES,
    KIND_CLOSE,
    KIND_DATA,
    BulkAnswer,
    BulkError,
    BulkHandshakeError,
    BulkOffer,
    BulkProtocolError,
    FrameCipher,
    FrameLimits,
    SessionKeys,
    derive_session_keys,
    encode_ack,
    encode_hello,
    make_answer,
    make_offer,
    pack_header_into,
    parse_header,
    parse_hello,
    verify_ack,
    verify_hello,
)

if TYPE_CHECKING:
    # The venv carries trio-stubs (via trio-typing, a libp2p dependency), which shadow trio's
    # own annotations; there TaskStatus lives in trio_typing.
    from trio_typing import TaskStatus

__all__ = [
    "BulkAnswer",
    "BulkChannel",
    "BulkClosedError",
    "BulkError",
    "BulkHandshakeError",
    "BulkListener",
    "BulkOffer",
    "BulkOverflowError",
    "BulkProtocolError",
    "BulkSettings",
    "BulkTimeout",
    "BulkTransferError",
    "ByteStream",
    "derive_session_keys",
    "dial_direct_channel",
    "make_answer",
    "stream_channel",
]

log = logging.getLogger("shoal.net.bulk")

PATH_DIRECT = "direct"
PATH_LIBP2P = "libp2p"

MiB = 1 << 20


class BulkTimeout(BulkError, TimeoutError):
    """A bounded wait ran out: no progress on a transfer or frame within the named timeout."""


class BulkClosedError(BulkError):
    """The channel or a connection closed before the transfer completed."""


class BulkTransferError(BulkError):
    """A local misuse of a transfer: wrong buffer size, tag already in use, too large."""


class BulkOverflowError(BulkError):
    """Unclaimed transfers exceeded max_unclaimed_bytes for longer than io_timeout_s."""


@dataclass(frozen=True)
class BulkSettings:
    """Every size and timeout of the bulk channel. Sizes in bytes, times in seconds."""

    connections_per_peer: int = 2
    # Chunk size this side sends in. 1 MiB: big enough that per-frame Python work is small
    # against the copy, small enough that a ciphertext scratch stays cache-warm.
    chunk_bytes: int = 1 * MiB
    # Largest chunk this side accepts from a peer (the frame header is checked against it).
    max_chunk_bytes: int = 16 * MiB
    max_transfer_bytes: int = 4 << 30
    max_unclaimed_bytes: int = 512 * MiB
    # No progress on a frame, a send or a transfer for this long is an error.
    io_timeout_s: float = 30.0
    # A new TCP connection must present its hello and be acked within this; also how long a
    # listener waits for all connections of an answered offer.
    handshake_timeout_s: float = 10.0
    offer_ttl_s: float = 60.0
    max_pending_handshakes: int = 64
    spent_tokens_remembered: int = 4096
    # 0 leaves the kernel's buffer autotuning alone (faster on loopback, measured).
    socket_buffer_bytes: int = 0
    listen_backlog: int = 128
    cipher: str = CIPHER_AES_GCM
    # discard() predicates a channel keeps applying to transfers that start later; past this
    # many the oldest is forgotten (its tags' late frames are then buffered as unclaimed).
    max_discard_rules: int = 64

    def __post_init__(self) -> None:
        if self.cipher not in CIPHERS:
            raise ValueError(f"cipher must be one of {CIPHERS}, not {self.cipher!r}")
        if not 1 <= self.chunk_bytes <= self.max_chunk_bytes:
            raise ValueError("chunk_bytes must be in 1..max_chunk_bytes")
        if self.max_chunk_bytes >= 1 << 32:
            raise ValueError("max_chunk_bytes must fit the 32-bit frame length")
        if self.connections_per_peer < 1:
            raise ValueError("connections_per_peer must be at least 1")
        if self.max_discard_rules < 1:
            raise ValueError("max_discard_rules must be at least 1")
        for name in ("io_timeout_s", "handshake_timeout_s", "offer_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def frame_limits(self) -> FrameLimits:
        return FrameLimits(self.max_chunk_bytes, self.max_transfer_bytes)


# ---------------------------------------------------------------------------------------------
# Transports: the two byte paths under the framing


class ByteStream(Protocol):
    """What the libp2p fallback needs of a stream (trio.abc.Stream fits).

    send_all is only ever given a memoryview of a whole frame, which the implementation may
    hold only until it returns (the buffer is reused for the next frame).
    """

    async def send_all(self, data: memoryview) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def aclose(self) -> None: ...


class _Transport(Protocol):
    async def send_all(self, data: memoryview) -> None: ...

    async def receive_into(self, view: memoryview) -> int: ...

    async def aclose(self) -> None: ...


class _SocketTransport:
    """Direct TCP: `recv_into` straight into the caller's buffer, no intermediate bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._sock = stream.socket

    async def send_all(self, data: memoryview) -> None:
        await self.stream.send_all(data)

    async def receive_into(self, view: memoryview) -> int:
        try:
            return await self._sock.recv_into(view)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket receive failed: {exc}") from exc

    async def aclose(self) -> None:
        await self.stream.aclose()


class _ByteStreamTransport:
    """Any send_all/receive_some stream; receive_some(len(view)) never leaves a remainder."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream

    async def send_all(self, data: memoryview) -> None:
        await self.stream.send_all(data)

    async def receive_into(self, view: memoryview) -> int:
        data = await self.stream.receive_some(len(view))
        n = len(data)
        if n > len(view):  # a stream that ignores max_bytes
            raise BulkProtocolError(f"stream returned {n} bytes when asked for {len(view)}")
        view[:n] = data
        return n

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _receive_exactly(transport: _Transport, view: memoryview) -> bool:
    """Fill `view`. False on a clean EOF before the first byte; EOF later is an error."""
    got = 0
    size = len(view)
    while got < size:
        n = await transport.receive_into(view[got:] if got else view)
        if n == 0:
            if got == 0:
                return False
            raise BulkClosedError(f"peer closed the connection mid-frame ({got} of {size} bytes)")
        got += n
    return True


def _tune_socket(sock: trio.socket.SocketType, settings: BulkSettings) -> None:
    if settings.socket_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.socket_buffer_bytes)


# ---------------------------------------------------------------------------------------------
# The channel


class _Connection:
    """One byte path of a channel with its per-direction ciphers and frame buffers."""

    def __init__(self, index: int, transport: _Transport, keys: SessionKeys, is_listener: bool):
        self.index = index
        self.transport = transport
        self.sealer = FrameCipher(keys.cipher, keys.send_key(index, is_listener))
        self.opener = FrameCipher(keys.cipher, keys.receive_key(index, is_listener))
        self.send_lock = trio.Lock()
        self.send_buf = bytearray(0)  # header + sealed chunk, grown to the largest frame sent
        self.recv_buf = bytearray(0)  # sealed chunk, grown to the largest frame received
        self.closed_by_peer = False

    def send_view(self, size: int) -> memoryview:
        if len(self.send_buf) < size:
            self.send_buf = bytearray(size)
        return memoryview(self.send_buf)[:size]

    def recv_view(self, size: int) -> memoryview:
        if len(self.recv_buf) < size:
            self.recv_buf = bytearray(size)
        return memoryview(self.recv_buf)[:size]


class _Inbound:
    """Receiver-side state of one transfer, or of one receive() still waiting for its transfer."""

    __slots__ = (
        "abandoned",
        "chunk_len",
        "chunks_left",
        "claimed",
        "discarded",
        "done",
        "error",
        "into",
        "last_progress",
        "mismatch",
        "ordered",
        "owned",
        "seen",
        "tag",
        "target",
        "total",
        "transfer",
        "unclaimed_charge",
    )

    def __init__(self, tag: int, now: float) -> None:
        self.tag = tag
        self.transfer: int | None = None  # the sender's transfer id, once a frame arrived
        self.total: int | None = None  # unknown until the first frame
        self.chunk_len = 0
        self.chunks_left = 0
        self.seen = bytearray(0)
        self.into: memoryview | None = None  # the receiver's buffer, if it gave one
        self.owned: bytearray | None = None  # our buffer, if the data did not go into `into`
        self.target: memoryview | None = None  # where frames are decrypted to
        self.claimed = False  # a receive() has (or had) it
        self.ordered = False  # its chunk 0 arrived, which fixes its place among its tag's
        self.abandoned = False  # receiver gave up: authenticate and drop what still comes
        self.discarded = False  # dropped by discard(): abandoned too, its bytes counted
        self.done = trio.Event()  # complete, or failed
        self.error: BulkError | None = None
        self.mismatch = False  # `into` had the wrong size for this transfer
        self.last_progress = now
        self.unclaimed_charge = 0

    @property
    def complete(self) -> bool:
        """Every chunk arrived and was authenticated."""
        return self.total is not None and self.chunks_left == 0

    def size(self, transfer: int, total: int, chunk_len: int) -> None:
        """Take the transfer id and shape from its first frame; no buffer yet."""
        self.transfer = transfer
        self.total = total
        self.chunk_len = chunk_len
        n_chunks = math.ceil(total / chunk_len) if total else 1
        self.chunks_left = n_chunks
        self.seen = bytearray(n_chunks)

    def arrived_bytes(self) -> int:
        """Payload bytes of the chunks that arrived so far."""
        if not self.total:
            return 0
        size = 0
        for i, seen in enumerate(self.seen):
            if seen:
                start = i * self.chunk_len
                size += min(start + self.chunk_len, self.total) - start
        return size

    def start(self, transfer: int, total: int, chunk_len: int) -> None:
        """Size the transfer from its first frame; decrypt into `into` when it fits exactly."""
        self.size(transfer, total, chunk_len)
        if self.into is not None and len(self.into) == total:
            self.target = self.into
        elif self.into is not None:
            # The waiting receive() raises this and gives the transfer back (see _abandon);
            # until then its chunks are kept here.
            self.error = BulkTransferError(
                f"transfer {self.tag} has {total} bytes, into has {len(self.into)}"
            )
            self.mismatch = True
            self.into = None
            self.owned = bytearray(total)
            self.target = memoryview(self.owned)
            self.done.set()
        else:
            self.owned = bytearray(total)
            self.target = memoryview(self.owned)


@dataclass
class BulkCounters:
    """Payload bytes through the channel (what `shoal status` shows)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_sent: int = 0
    transfers_received: int = 0
    # Received bytes copied once more because they arrived before their receive() (or raced
    # ahead of an earlier transfer of their tag); zero when receivers wait in time.
    bytes_copied: int = 0
    # Transfers dropped by discard() (buffered ones and ones that started later), and their
    # payload bytes that arrived (authenticated, then thrown away); also in bytes_received.
    transfers_discarded: int = 0
    bytes_discarded: int = 0


class BulkChannel:
    """Tagged transfers between two peers over one or more framed connections.

    Run it (`async with channel.running():` or `await nursery.start(channel.run)`) for the
    reader tasks; then `send` and `receive` from any task. Tags are the caller's names for
    transfers: one send and one receive per tag at a time; sending a tag again queues another
    transfer of that tag, and receives of a tag get its transfers in the order they were sent.

    Ordering across striped connections: every frame names its transfer by the sender's own
    transfer id, and chunk 0 of all transfers of one tag goes over the same connection (index
    tag % connections), so the receiver learns of same-tag transfers in send order even when
    their other chunks race ahead on other connections.
    """

    def __init__(
        self,
        connections: Sequence[_Connection],
        settings: BulkSettings,
        path: str,
        peer: str = "",
    ) -> None:
        if not connections:
            raise ValueError("a channel needs at least one connection")
        self._conns = list(connections)
        self.settings = settings
        self.path = path
        self.peer = peer
        self.counters = BulkCounters()
        self._limits = settings.frame_limits
        self._transfers: dict[int, _Inbound] = {}  # by the sender's transfer id
        self._pending: dict[int, list[_Inbound]] = {}  # by tag: arrived, nobody receiving yet
        self._waiters: dict[int, _Inbound] = {}  # by tag: a receive() not yet sure of its transfer
        self._receiving: set[int] = set()
        self._sending: set[int] = set()
        self._next_transfer = 0
        self._unclaimed_bytes = 0
        self._unclaimed_changed = trio.Event()
        self._discard_rules: deque[Callable[[int], bool]] = deque(maxlen=settings.max_discard_rules)
        self._failure: BulkError | None = None
        self._closing = False
        self._reader_scope: trio.CancelScope | None = None

    # -- public state --------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def bytes_sent(self) -> int:
        return self.counters.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.counters.bytes_received

    @property
    def unclaimed_bytes(self) -> int:
        """Bytes held for transfers that arrived before anyone asked to receive them."""
        return self._unclaimed_bytes

    @property
    def failure(self) -> BulkError | None:
        """Why the channel stopped (None while healthy)."""
        return self._failure

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain every connection until the channel closes or fails; never raises BulkError."""
        if self._reader_scope is not None:
            raise RuntimeError("BulkChannel.run was already started")
        try:
            async with trio.open_nursery() as nursery:
                self._reader_scope = nursery.cancel_scope
                for conn in self._conns:
                    nursery.start_soon(self._read_loop, conn)
                task_status.started()
        finally:
            if self._failure is None:
                self._fail(BulkClosedError("channel stopped"), log_it=False)
            for conn in self._conns:
                await trio.aclose_forcefully(conn.transport)  # type: ignore[arg-type]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BulkChannel]:
        """Run the readers for the block; close the channel (with close frames) at its end."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                await self.aclose()

    async def aclose(self) -> None:
        """Send a close frame on every connection (bounded by io_timeout_s), then stop."""
        if self._closing:
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            if self._failure is None:
                with trio.move_on_after(self.settings.io_timeout_s):
                    for conn in self._conns:
                        try:
                            async with conn.send_lock:
                                await self._send_frame(conn, KIND_CLOSE, 0, 0, 0, 0, 0, None)
                        except (BulkError, trio.BrokenResourceError, trio.ClosedResourceError):
                            break
            self._fail(BulkClosedError("channel closed locally"), log_it=False)
            for conn in self._conns:
                await trio.aclose_forcefully(conn.transport)  # type: ignore[arg-type]

    def _fail(self, exc: BulkError, log_it: bool = True) -> None:
        """Stop the channel for good: fail waiting receivers, keep completed transfers."""
        if self._failure is not None:
            return
        self._failure = exc
        if log_it:
            log.warning("bulk channel to %s (%s) failed: %s", self.peer or "?", self.path, exc)
        for w in self._waiters.values():
            w.error = exc
            w.done.set()
        self._waiters.clear()
        for transfer, t in list(self._transfers.items()):
            if not t.done.is_set():
                t.error = exc
                t.done.set()
                if not t.claimed:
                    del self._transfers[transfer]
        for tag, queue in list(self._pending.items()):
            kept = [t for t in queue if t.complete]
            if kept:
                self._pending[tag] = kept
            else:
                del self._pending[tag]
        self._unclaimed_changed.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    def _raise_failure(self) -> None:
        exc = self._failure
        if exc is not None:
            raise type(exc)(*exc.args) from exc

    # -- sending -------------------------------------------------------------------------

    async def send(self, tag: int, payload: bytes | bytearray | memoryview) -> None:
        """Send one transfer, striped over all connections in chunks of `chunk_bytes`.

        Returns when every frame has been handed to the transport (not when the peer has
        consumed it). A failure or cancellation after the first frame was started fails the
        whole channel: the peer could never complete the transfer, and a half-written frame
        desynchronises the stream. Cancelled before any frame started, nothing happened.
        """
        self._raise_failure()
        if self._closing:
            raise BulkClosedError("channel is closing")
        if not 0 <= tag < 1 << 64:
            raise BulkTransferError(f"tag {tag} must fit in 64 bits")
        view = memoryview(payload)
        if not view.c_contiguous:
            raise BulkTransferError("payload must be a C-contiguous buffer")
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        total = len(view)
        if total > self.settings.max_transfer_bytes:
            raise BulkTransferError(
                f"payload of {total} bytes is above max_transfer_bytes "
                f"{self.settings.max_transfer_bytes}"
            )
        if tag in self._sending:
            raise BulkTransferError(f"tag {tag} is already being sent on this channel")
        transfer = self._next_transfer
        self._next_transfer += 1
        chunk = self.settings.chunk_bytes
        n_chunks = math.ceil(total / chunk) if total else 1
        next_chunk = 1  # chunk 0 goes first, on the tag's home connection (see class doc)
        frames_started = 0
        chunks_sent = 0
        home = tag % len(self._conns)
        conns = self._conns[home:] + self._conns[:home]

        async def send_chunk(conn: _Connection, i: int) -> None:
            nonlocal frames_started, chunks_sent
            offset = i * chunk
            part = view[offset : offset + chunk]
            frames_started += 1
            await self._send_frame(conn, KIND_DATA, tag, transfer, total, offset, chunk, part)
            chunks_sent += 1

        async def pump(conn: _Connection, first: bool) -> None:
            # Connections pull the next chunk when free, so a faster one carries more.
            nonlocal next_chunk
            if first:
                async with conn.send_lock:
                    await send_chunk(conn, 0)
            while True:
                async with conn.send_lock:
                    if next_chunk >= n_chunks:
                        return
                    i = next_chunk
                    next_chunk += 1
                    await send_chunk(conn, i)

        self._sending.add(tag)
        try:
            if n_chunks == 1 or len(conns) == 1:
                await pump(conns[0], first=True)
            else:
                async with trio.open_nursery() as nursery:
                    for k, conn in enumerate(conns[:n_chunks]):
                        nursery.start_soon(pump, conn, k == 0)
        except BaseException as exc:
            leaf = _leaf_exception(exc)
            if frames_started == 0 and isinstance(leaf, trio.Cancelled):
                raise  # cancelled while waiting for a connection: no byte went out
            reason = self._send_failure(leaf, tag, chunks_sent, n_chunks)
            self._fail(reason)
            if isinstance(leaf, BulkError | trio.BrokenResourceError | trio.ClosedResourceError):
                raise reason from exc
            raise
        finally:
            self._sending.discard(tag)
        self.counters.transfers_sent += 1

    def _send_failure(self, exc: BaseException, tag: int, sent: int, n: int) -> BulkError:
        if self._failure is not None:
            return type(self._failure)(*self._failure.args)
        where = f"send of tag {tag} stopped after {sent} of {n} chunks"
        if isinstance(exc, BulkError):
            return type(exc)(f"{where}: {exc}")
        if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
            return BulkClosedError(f"{where}: connection lost ({exc!r})")
        return BulkClosedError(f"{where}: cancelled")

    async def _send_frame(
        self,
        conn: _Connection,
        kind: int,
        tag: int,
        transfer: int,
        total: int,
        offset: int,
        chunk_len: int,
        part: memoryview | None,
    ) -> None:
        """Seal one frame into the connection's send buffer and write it (lock held)."""
        length = len(part) if part is not None else 0
        frame = conn.send_view(FRAME_HEADER_BYTES + length + AEAD_TAG_BYTES)
        header = frame[:FRAME_HEADER_BYTES]
        chunk_len = chunk_len if total else 0
        pack_header_into(header, kind, tag, transfer, total, offset, chunk_len, length)
        body = frame[FRAME_HEADER_BYTES:]
        conn.sealer.seal_into(header, part if part is not None else memoryview(b""), body)
        try:
            with trio.fail_after(self.settings.io_timeout_s):
                await conn.transport.send_all(frame)
        except trio.TooSlowError:
            raise BulkTimeout(
                f"connection {conn.index}: peer took no frame for io_timeout_s="
                f"{self.settings.io_timeout_s}"
            ) from None
        self.counters.bytes_sent += length

    # -- receiving -----------------------------------------------------------------------

    @overload
    async def receive(
        self, tag: int, into: None = None, *, timeout_s: float | None = None
    ) -> bytearray: ...

    @overload
    async def receive(
        self, tag: int, into: bytearray | memoryview, *, timeout_s: float | None = None
    ) -> memoryview: ...

    async def receive(
        self,
        tag: int,
        into: bytearray | memoryview | None = None,
        *,
        timeout_s: float | None = None,
    ) -> bytearray | memoryview:
        """Wait for the next transfer of `tag` to complete; return its bytes.

        With `into` (a writable buffer of exactly the transfer's length) the bytes land there
        (decrypted straight into it when this call came before the first frame) and a flat
        byte view of `into` is returned; without, a fresh bytearray of the declared length.
        Raises BulkTimeout when no frame of this transfer arrives for `timeout_s` (default
        io_timeout_s), BulkTransferError when `into` has the wrong size, and the channel's
        failure (BulkClosedError, BulkProtocolError, ...) if it stops first. A receive that
        gives up before its transfer started leaves that transfer for the next receive; one
        that gives up part-way drops the rest of it. After an error `into` is undefined.
        """
        timeout = self.settings.io_timeout_s if timeout_s is None else timeout_s
        dest: memoryview | None = None
        if into is not None:
            dest = memoryview(into)
            if dest.readonly or not dest.c_contiguous:
                raise BulkTransferError("into must be a writable C-contiguous buffer")
            if dest.ndim != 1 or dest.itemsize != 1:
                dest = dest.cast("B")
        if tag in self._receiving:
            raise BulkTransferError(f"tag {tag} is already being received")
        t_next = self._pending_first(tag)
        if t_next is not None and t_next.ordered:  # the next transfer of this tag is here
            if dest is not None and t_next.total != len(dest):
                raise BulkTransferError(
                    f"transfer {tag} has {t_next.total} bytes, into has {len(dest)}"
                )
            t = t_next
            self._pending_remove(t)
            t.claimed = True
            self._release_unclaimed(t)
            t.into = dest
            t.last_progress = max(t.last_progress, trio.current_time())
        else:
            self._raise_failure()
            t = _Inbound(tag, trio.current_time())
            t.claimed = True
            t.into = dest
            self._waiters[tag] = t
            self._poke_unclaimed()  # a reader waiting for room may now route to us
        self._receiving.add(tag)
        try:
            if dest is not None and t.total is not None and t.total != len(dest):
                raise BulkTransferError(f"transfer {tag} has {t.total} bytes, into has {len(dest)}")
            while not t.done.is_set():
                deadline = t.last_progress + timeout
                if trio.current_time() >= deadline:
                    raise BulkTimeout(
                        f"transfer {tag}: nothing arrived for {timeout} s "
                        f"({self._progress_text(t)})"
                    )
                with trio.move_on_at(deadline):
                    await t.done.wait()
            if t.error is not None:
                raise type(t.error)(*t.error.args) from t.error
        except BaseException:
            self._abandon(t)
            raise
        finally:
            self._receiving.discard(tag)
        if t.transfer is not None and self._transfers.get(t.transfer) is t:
            del self._transfers[t.transfer]
        self.counters.transfers_received += 1
        assert t.target is not None
        if dest is None:
            return t.owned if t.owned is not None else bytearray(t.target)
        if t.target is not dest:
            dest[:] = t.target  # it arrived before this receive: one copy
            self.counters.bytes_copied += len(dest)
        return dest

    # -- discarding ----------------------------------------------------------------------

    def discard(self, match: Callable[[int], bool]) -> int:
        """Drop every transfer whose tag satisfies `match` and that no receive() takes.

        Now: the transfers held unclaimed with a matching tag, complete or partly arrived,
        are dropped, and their share of max_unclaimed_bytes is released (a reader waiting for
        room wakes). Later: `match` is remembered (the newest max_discard_rules predicates;
        older ones are forgotten), and a transfer of a matching tag that starts arriving
        while no receive() waits for its tag is dropped as it comes, never buffered. Frames
        of dropped transfers are still authenticated (a tampered one fails the channel as
        always) and then thrown away; a partly arrived one's remaining frames too.

        A receive() waiting for or receiving a matching tag is not touched: it still gets its
        transfer (the caller cancels its own receive). If it gives up, what it held of a
        matching transfer is dropped instead of kept for a later receive.

        `match` runs on the trio thread for every new transfer, so it must be cheap. If it
        raises here, nothing is dropped or remembered; one that raises later is logged and
        forgotten. Returns the bytes released from the unclaimed budget now (the full
        declared size of each dropped transfer, which is what it was charged).
        """
        if not callable(match):
            raise TypeError(f"match must be a callable taking a tag, not {type(match).__name__}")
        tags = [tag for tag in self._pending if match(tag)]  # may raise: nothing changed yet
        released = 0
        for tag in tags:
            for t in self._pending.pop(tag):
                released += t.unclaimed_charge
                self._unclaimed_bytes -= t.unclaimed_charge
                t.unclaimed_charge = 0
                self._drop_unclaimed(t)
        self._discard_rules.append(match)
        self._poke_unclaimed()  # also wakes a reader waiting for room for a matching transfer
        return released

    def _drop_unclaimed(self, t: _Inbound) -> None:
        """discard() an unclaimed transfer: free what arrived, drop what still comes."""
        self.counters.transfers_discarded += 1
        self.counters.bytes_discarded += t.arrived_bytes()
        t.discarded = t.abandoned = True
        t.target = t.owned = None
        if t.transfer is not None and self._transfers.get(t.transfer) is t and t.complete:
            del self._transfers[t.transfer]  # nothing more of it will come
        # an incomplete one stays in the table; the reader forgets it after its last chunk

    def _is_discarded(self, tag: int) -> bool:
        """Whether a remembered discard() predicate matches `tag`."""
        for rule in list(self._discard_rules):
            try:
                if rule(tag):
                    return True
            except Exception:
                log.exception("discard predicate %r raised for tag %d; forgetting it", rule, tag)
                if rule in self._discard_rules:
                    self._discard_rules.remove(rule)
        return False

    def _new_discarded(self, tag: int, transfer: int, total: int, chunk_len: int) -> _Inbound:
        """State for a transfer of a discarded tag: its frames are authenticated and dropped."""
        t = _Inbound(tag, trio.current_time())
        t.size(transfer, total, chunk_len)
        t.discarded = t.abandoned = True
        self._transfers[transfer] = t
        self.counters.transfers_discarded += 1
        return t

    @staticmethod
    def _progress_text(t: _Inbound) -> str:
        if t.total is None:
            return "transfer not started"
        return f"{len(t.seen) - t.chunks_left} of {len(t.seen)} chunks of {t.total} bytes"

    def _abandon(self, t: _Inbound) -> None:
        """The receiver stopped waiting: never write to its buffer again.

        A receive that was not yet sure of its transfer gives a tentatively bound one back
        (unclaimed, for the next receive). A transfer under way stays in the table, marked
        abandoned, so its remaining frames are authenticated and dropped (the reader removes
        it after its last chunk).
        """
        if self._waiters.get(t.tag) is t:
            del self._waiters[t.tag]
            if t.transfer is not None and self._failure is None:
                self._unbind(t)
            t.into = None
            return
        if t.mismatch and self._failure is None and self._transfers.get(t.transfer or 0) is t:
            self._unbind(t)  # wrong size: the transfer stays for a receive that fits it
            return
        t.into = None
        if t.complete or t.transfer is None or self._failure is not None:
            if t.transfer is not None and self._transfers.get(t.transfer) is t:
                del self._transfers[t.transfer]
            return
        t.abandoned = True
        t.target = None

    def _poke_unclaimed(self) -> None:
        self._unclaimed_changed.set()
        self._unclaimed_changed = trio.Event()

    def _release_unclaimed(self, t: _Inbound) -> None:
        if t.unclaimed_charge:
            self._unclaimed_bytes -= t.unclaimed_charge
            t.unclaimed_charge = 0
            self._poke_unclaimed()

    # Matching transfers to receive() calls. The sender sends the transfers of one tag one
    # after another, so among one tag's transfers a lower transfer id was sent earlier; and
    # chunk 0 of each rides the tag's home connection, so once a transfer's chunk 0 is here,
    # every earlier transfer of its tag is known. A waiting receive() takes the lowest known
    # transfer of its tag at once (tentatively, so its chunks decrypt straight into the
    # receiver's buffer) and gives it back if an earlier one turns up before that chunk 0.

    def _pending_first(self, tag: int) -> _Inbound | None:
        queue = self._pending.get(tag)
        if not queue:
            return None
        return min(queue, key=lambda t: t.transfer or 0)

    def _pending_remove(self, t: _Inbound) -> None:
        queue = self._pending[t.tag]
        queue.remove(t)
        if not queue:
            del self._pending[t.tag]

    def _new_unclaimed(self, tag: int, transfer: int, total: int, chunk_len: int) -> _Inbound:
        t = _Inbound(tag, trio.current_time())
        t.start(transfer, total, chunk_len)
        t.unclaimed_charge = total
        self._unclaimed_bytes += total
        self._transfers[transfer] = t
        self._pending.setdefault(tag, []).append(t)
        return t

    def _copy_chunks(self, src: _Inbound, dst: memoryview) -> None:
        """Copy the chunks of `src` that arrived so far into `dst` (same layout)."""
        if src.target is None:
            return
        for i, seen in enumerate(src.seen):
            if seen:
                start = i * src.chunk_len
                end = min(start + src.chunk_len, src.total or 0)
                dst[start:end] = src.target[start:end]
                self.counters.bytes_copied += end - start

    def _unbind(self, w: _Inbound) -> None:
        """A waiting receive() gives back its tentative transfer, as an unclaimed one."""
        assert w.transfer is not None and w.total is not None
        if self._discard_rules and self._is_discarded(w.tag):
            # its tag was discarded meanwhile: nobody will receive it, so nothing is kept
            u = self._new_discarded(w.tag, w.transfer, w.total, w.chunk_len)
            self.counters.bytes_discarded += w.arrived_bytes()
        else:
            u = self._new_unclaimed(w.tag, w.transfer, w.total, w.chunk_len)
            assert u.target is not None
            self._copy_chunks(w, u.target)
        u.seen = w.seen
        u.chunks_left = w.chunks_left
        u.last_progress = w.last_progress
        u.ordered = w.ordered
        if u.complete:
            u.done.set()
            if u.discarded:
                del self._transfers[w.transfer]
        w.transfer = w.total = None
        w.target = w.owned = None
        w.seen = bytearray(0)
        w.chunks_left = 0
        w.ordered = False
        if w.mismatch:  # the size mismatch was with a transfer that turned out not its own
            w.mismatch = False
            w.error = None
            w.done = trio.Event()

    def _bind(self, w: _Inbound, t: _Inbound) -> None:
        """A waiting receive() takes unclaimed transfer `t`, with whatever arrived of it."""
        assert t.transfer is not None and t.total is not None and t.owned is not None
        self._pending_remove(t)
        self._release_unclaimed(t)
        w.start(t.transfer, t.total, t.chunk_len)
        if w.target is not None:
            self._copy_chunks(t, w.target)
        w.seen = t.seen
        w.chunks_left = t.chunks_left
        w.last_progress = t.last_progress
        w.ordered = t.ordered
        self._transfers[t.transfer] = w

    async def _open_transfer(self, tag: int, transfer: int, total: int, chunk_len: int) -> _Inbound:
        """State for a transfer id seen for the first time.

        A receive() waiting for the tag takes it if it is the earliest known of the tag;
        otherwise it is dropped if a discard() predicate matches its tag, else held as
        unclaimed, within max_unclaimed_bytes (waiting up to io_timeout_s for room).
        """
        limit = self.settings.max_unclaimed_bytes
        deadline = trio.current_time() + self.settings.io_timeout_s
        while True:
            known = self._transfers.get(transfer)  # another reader may have opened it meanwhile
            if known is not None:
                return known
            w = self._waiters.get(tag)
            if w is not None and (w.transfer is None or transfer < w.transfer):
                first = self._pending_first(tag)
                if first is None or transfer < (first.transfer or 0):
                    if w.transfer is not None:
                        self._unbind(w)
                    w.start(transfer, total, chunk_len)
                    self._transfers[transfer] = w
                    return w
            if self._discard_rules and self._is_discarded(tag):
                return self._new_discarded(tag, transfer, total, chunk_len)
            if self._unclaimed_bytes + total <= limit:
                return self._new_unclaimed(tag, transfer, total, chunk_len)
            changed = self._unclaimed_changed
            with trio.move_on_at(deadline):
                await changed.wait()
            if trio.current_time() >= deadline:
                raise BulkOverflowError(
                    f"transfer {tag} of {total} bytes does not fit max_unclaimed_bytes={limit} "
                    f"({self._unclaimed_bytes} held by transfers nobody received) within "
                    f"io_timeout_s={self.settings.io_timeout_s}"
                )

    def _order(self, t: _Inbound) -> _Inbound:
        """Chunk 0 of `t` arrived: every earlier transfer of its tag is known now."""
        t.ordered = True
        w = self._waiters.get(t.tag)
        if w is t:  # a tentative binding is now sure
            del self._waiters[t.tag]
            return t
        if w is None or self._pending_first(t.tag) is not t:
            return t  # nobody waits, or an earlier transfer of the tag goes first
        if w.transfer is not None:
            if w.transfer < (t.transfer or 0):
                return t
            self._unbind(w)
        self._bind(w, t)
        del self._waiters[t.tag]
        return w

    async def _read_loop(self, conn: _Connection) -> None:
        try:
            await self._read_frames(conn)
        except BulkError as exc:
            self._fail(type(exc)(f"connection {conn.index}: {exc}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if not self._closing:
                self._fail(BulkClosedError(f"connection {conn.index} lost: {exc!r}"))

    async def _read_frames(self, conn: _Connection) -> None:
        header = memoryview(bytearray(FRAME_HEADER_BYTES))
        limits = self._limits
        io_timeout = self.settings.io_timeout_s
        transport = conn.transport
        while True:
            # Idle between frames is fine; once a frame has started it must finish in time.
            if not await _receive_exactly(transport, header):
                if self._closing:
                    return
                raise BulkClosedError("peer closed the connection without a close frame")
            kind, tag, transfer, total, offset, chunk_len, length = parse_header(header, limits)
            sealed = conn.recv_view(length + AEAD_TAG_BYTES)
            if kind == KIND_CLOSE:
                await self._receive_rest(transport, sealed, io_timeout)
                conn.opener.open_into(header, sealed, memoryview(bytearray(0)))
                conn.closed_by_peer = True
                if all(c.closed_by_peer for c in self._conns):
                    self._fail(BulkClosedError("peer closed the channel"), log_it=False)
                return
            # The whole frame first: from the lookup below to the decrypt nothing awaits, so
            # no other reader can reshape this transfer's state in between.
            await self._receive_rest(transport, sealed, io_timeout)
            t = self._transfers.get(transfer)
            if t is None:
                t = await self._open_transfer(tag, transfer, total, chunk_len)
            if t.tag != tag or t.total != total or t.chunk_len != chunk_len:
                raise BulkProtocolError(
                    f"transfer {transfer} changed mid-way (tag {t.tag}->{tag}, "
                    f"total {t.total}->{total}, chunk {t.chunk_len}->{chunk_len})"
                )
            if offset == 0 and not t.ordered:
                t = self._order(t)
            index = offset // chunk_len if total else 0
            if t.seen[index]:
                raise BulkProtocolError(f"transfer {tag}: chunk at offset {offset} sent twice")
            target = t.target
            if target is None:  # abandoned or discarded: authenticate into scratch and drop
                conn.opener.open_into(header, sealed, memoryview(bytearray(length)))
                if t.discarded:
                    self.counters.bytes_discarded += length
            else:
                conn.opener.open_into(header, sealed, target[offset : offset + length])
            t.seen[index] = 1
            t.chunks_left -= 1
            t.last_progress = trio.current_time()
            self.counters.bytes_received += length
            if t.chunks_left == 0:
                t.done.set()
                if t.abandoned and self._transfers.get(transfer) is t:
                    del self._transfers[transfer]

    @staticmethod
    async def _receive_rest(transport: _Transport, view: memoryview, timeout_s: float) -> None:
        try:
            with trio.fail_after(timeout_s):
                if not await _receive_exactly(transport, view):
                    raise BulkClosedError("peer closed the connection mid-frame")
        except trio.TooSlowError:
            raise BulkTimeout(f"frame stalled for io_timeout_s={timeout_s}") from None


def stream_channel(
    stream: ByteStream,
    keys: SessionKeys,
    is_listener: bool,
    settings: BulkSettings,
    path: str = PATH_LIBP2P,
    peer: str = "",
) -> BulkChannel:
    """The fallback: the same framing over one byte stream (an adapted libp2p stream).

    Uses connection 0's keys of the offer/answer, so the offer must not be reused for a
    direct channel too. No hello: the stream is already authenticated by libp2p.
    """
    conn = _Connection(0, _ByteStreamTransport(stream), keys, is_listener)
    return BulkChannel([conn], settings, path, peer)


# ---------------------------------------------------------------------------------------------
# Direct path: listener and dialer


@dataclass
class _PendingOffer:
    offer: BulkOffer
    expires_at: float
    keys: SessionKeys | None = None
    answered: trio.Event = field(default_factory=trio.Event)
    complete: trio.Event = field(default_factory=trio.Event)
    streams: dict[int, trio.SocketStream] = field(default_factory=dict)
    acked: int = 0


class BulkListener:
    """Accepts bulk TCP connections for offers it issued; each (token, index) only once."""

    def __init__(
        self,
        settings: BulkSettings,
        bind_host: str = "127.0.0.1",
        bind_port: int = 0,
        advertise_host: str | None = None,
    ) -> None:
        self.settings = settings
        self._bind = (bind_host, bind_port)
        self.advertise_host = advertise_host or bind_host
        self.port = 0
        self._offers: dict[bytes, _PendingOffer] = {}
        self._spent: deque[bytes] = deque(maxlen=settings.spent_tokens_remembered)
        self._spent_set: set[bytes] = set()
        self._handshakes = 0

    @property
    def pending_handshakes(self) -> int:
        """Connections accepted but not yet admitted or refused."""
        return self._handshakes

    async def serve(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and run handshakes until cancelled. `nursery.start` returns the port."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune_socket(sock, self.settings)
        await sock.bind(self._bind)
        sock.listen(self.settings.listen_backlog)
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery, listener:
            task_status.started(self.port)
            while True:
                stream = await listener.accept()
                if self._handshakes >= self.settings.max_pending_handshakes:
                    log.warning(
                        "refused bulk connection from %s: %d handshakes already pending",
                        _peer_text(stream),
                        self._handshakes,
                    )
                    await trio.aclose_forcefully(stream)
                    continue
                self._handshakes += 1
                nursery.start_soon(self._handshake, stream)

    def create_offer(self, connections: int | None = None) -> dict[str, Any]:
        """A new one-time offer, as the dict to send over the control stream."""
        if self.port == 0:
            raise RuntimeError("BulkListener.serve must be running before create_offer")
        self._expire_offers()
        offer = make_offer(
            self.advertise_host,
            (self.port,),
            connections or self.settings.connections_per_peer,
            self.settings.cipher,
        )
        self._offers[offer.token] = _PendingOffer(
            offer, trio.current_time() + self.settings.offer_ttl_s
        )
        return offer.to_wire()

    def accept_answer(self, answer_msg: object) -> SessionKeys:
        """Take the dialer's answer (from the control stream); its connections may now come."""
        answer = BulkAnswer.from_wire(answer_msg)
        pending = self._offers.get(answer.token)
        if pending is None:
            raise BulkHandshakeError("answer for an unknown, expired or spent offer")
        if pending.keys is not None:
            raise BulkHandshakeError("offer was already answered")
        pending.keys = derive_session_keys(pending.offer, answer)
        pending.answered.set()
        return pending.keys

    def forget_offer(self, token: bytes) -> None:
        """Drop an offer (e.g. when the channel goes over the libp2p stream instead)."""
        pending = self._offers.pop(token, None)
        if pending is not None:
            self._mark_spent(token)
            for stream in pending.streams.values():
                stream.socket.close()

    async def wait_channel(self, token: bytes, peer: str = "") -> BulkChannel:
        """The channel of an answered offer, once all its connections arrived.

        Waits at most handshake_timeout_s; connections that came before this call are kept
        (until offer_ttl_s), so the order of dialing and calling this does not matter.
        """
        pending = self._offers.get(token)
        if pending is None:
            raise BulkHandshakeError("no pending offer with this token")
        with trio.move_on_after(self.settings.handshake_timeout_s):
            await pending.complete.wait()
        if not pending.complete.is_set():
            arrived = len(pending.streams)
            wanted = pending.keys.connections if pending.keys else "?"
            self.forget_offer(token)
            raise BulkTimeout(
                f"only {arrived} of {wanted} bulk connections arrived within "
                f"handshake_timeout_s={self.settings.handshake_timeout_s}"
            )
        if self._offers.pop(token, None) is not pending:
            raise BulkHandshakeError("this offer's channel was already taken")
        assert pending.keys is not None
        conns = [
            _Connection(i, _SocketTransport(pending.streams[i]), pending.keys, True)
            for i in range(pending.keys.connections)
        ]
        return BulkChannel(conns, self.settings, PATH_DIRECT, peer)

    def _mark_spent(self, token: bytes) -> None:
        if len(self._spent) == self._spent.maxlen:
            self._spent_set.discard(self._spent[0])
        self._spent.append(token)
        self._spent_set.add(token)

    def _expire_offers(self) -> None:
        now = trio.current_time()
        for token, pending in list(self._offers.items()):
            if pending.expires_at < now:
                log.info("bulk offer expired before its channel was taken")
                self.forget_offer(token)

    async def _handshake(self, stream: trio.SocketStream) -> None:
        who = _peer_text(stream)
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                reason = await self._admit(stream)
        except trio.TooSlowError:
            reason = (
                f"no valid hello within handshake_timeout_s={self.settings.handshake_timeout_s}"
            )
        except BulkError as exc:
            reason = str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"connection broke during handshake ({exc!r})"
        except Exception as exc:  # never let one bad connection stop the listener
            log.exception("bulk handshake failed unexpectedly")
            reason = f"internal error {exc!r}"
        finally:
            self._handshakes -= 1
        if reason:
            log.warning("rejected bulk connection from %s: %s", who, reason)
            await trio.aclose_forcefully(stream)

    async def _admit(self, stream: trio.SocketStream) -> str:
        """Run the listener's half of the handshake; '' when admitted, else the reason."""
        transport = _SocketTransport(stream)
        raw = bytearray(HELLO_BYTES)
        if not await _receive_exactly(transport, memoryview(raw)):
            return "closed before sending a hello"
        hello = parse_hello(raw)
        pending = self._offers.get(hello.token)
        if pending is None:
            if hello.token in self._spent_set:
                return "token already spent (reuse refused)"
            return "unknown token"
        if pending.complete.is_set():
            return "token already spent (reuse refused)"
        if trio.current_time() > pending.expires_at:
            self.forget_offer(hello.token)
            return "token expired"
        await pending.answered.wait()  # the answer may still be on its way
        keys = pending.keys
        assert keys is not None
        verify_hello(keys, hello)
        if pending.complete.is_set() or self._offers.get(hello.token) is not pending:
            return "token already spent (reuse refused)"
        if hello.index in pending.streams:
            return f"connection index {hello.index} of this token already used (reuse refused)"
        pending.streams[hello.index] = stream
        try:
            await stream.send_all(encode_ack(keys, bytes(raw)))
        except BaseException:
            pending.streams.pop(hello.index, None)
            raise
        pending.acked += 1
        if pending.acked == keys.connections:
            self._mark_spent(hello.token)  # stays in _offers until wait_channel takes it
            pending.complete.set()
        return ""


def _leaf_exception(exc: BaseException) -> BaseException:
    """The first non-Cancelled exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _peer_text(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def dial_direct_channel(
    offer: BulkOffer, keys: SessionKeys, settings: BulkSettings, peer: str = ""
) -> BulkChannel:
    """Open every connection of an answered offer, hello + ack each, within handshake_timeout_s."""
    if not offer.ports:
        raise BulkHandshakeError("offer has no direct TCP port; use the libp2p stream")
    streams: dict[int, trio.SocketStream] = {}

    async def open_one(index: int) -> None:
        port = offer.ports[index % len(offer.ports)]
        stream = await trio.open_tcp_stream(offer.host, port)
        streams[index] = stream
        _tune_socket(stream.socket, settings)
        hello = encode_hello(keys, index)
        await stream.send_all(hello)
        ack = bytearray(ACK_BYTES)
        if not await _receive_exactly(_SocketTransport(stream), memoryview(ack)):
            raise BulkHandshakeError(f"listener refused connection {index} (closed, no ack)")
        verify_ack(keys, hello, ack)

    try:
        with trio.fail_after(settings.handshake_timeout_s):
            async with trio.open_nursery() as nursery:
                for i in range(keys.connections):
                    nursery.start_soon(open_one, i)
    except BaseException as exc:
        for stream in streams.values():
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise BulkTimeout(
                f"bulk handshake with {offer.host} took over handshake_timeout_s="
                f"{settings.handshake_timeout_s}"
            ) from None
        if isinstance(exc, BaseExceptionGroup):
            bulk = exc.subgroup(BulkError)
            if bulk is not None:
                raise bulk.exceptions[0] from exc
            broken = exc.subgroup((OSError, trio.BrokenResourceError))
            if broken is not None:
                raise BulkHandshakeError(
                    f"bulk connection to {offer.host} failed: {broken.exceptions[0]!r}"
                ) from exc
        raise
    conns = [
        _Connection(i, _SocketTransport(streams[i]), keys, False) for i in range(keys.connections)
    ]
    return BulkChannel(conns, settings, PATH_DIRECT, peer)
