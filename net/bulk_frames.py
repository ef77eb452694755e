"""Sans-IO part of the bulk tensor channel: offers, keys, hello messages and AEAD frames.

Nothing here touches a socket or a clock. `net/bulk.py` moves these bytes over trio streams.

How a channel comes up (the libp2p control stream is already Noise-secured, so what travels on
it is secret and authenticated; what travels on the bulk TCP connections is not, until keyed):

1. The listener calls `make_offer` and sends the offer dict over the control stream. It holds a
   one-time `token` (names the offer on the TCP side, travels there in clear) and a secret
   `listener_random` (never leaves the control stream).
2. The dialer calls `make_answer(offer)` and sends the answer dict back. It adds its own secret
   `dialer_random` and says how many TCP connections it will open.
3. Both sides call `derive_session_keys(offer, answer)`: HKDF-SHA256 over both randoms, salted
   with the token, then one subkey per (connection index, direction) for the AEAD and one key for
   the hello MACs. Because every (connection, direction) pair has its own key, the AEAD nonce can
   be a plain 96-bit counter starting at 0 on each of them and is never reused under one key.
4. On each new TCP connection the dialer first sends a `hello` (token, connection index, count,
   HMAC under the hello key); the listener answers with an `ack` (HMAC over the hello). Only then
   do frames flow. A sniffer who sees the token cannot spend it: the MAC needs the session key.

Frame layout on the wire (little-endian), header passed to the AEAD as associated data:

    magic 4s | version u8 | kind u8 | flags u16 | tag u64 | transfer u64 | total u64 |
    offset u64 | chunk_len u32 | length u32 | ciphertext (length bytes) | AEAD tag (16 bytes)

`tag` is the caller's name for a transfer; `transfer` is the sender's own counter, unique per
channel direction, so two transfers of one tag in flight at once never mix. `total` is the
transfer's whole length, carried by every frame, so a transfer is complete only when all
`ceil(total / chunk_len)` chunks have been authenticated. The nonce is not sent: each
side counts frames per connection, so a dropped, replayed or reordered frame fails to decrypt.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

PROTOCOL_VERSION = 1
FRAME_MAGIC = b"SHBF"
HELLO_MAGIC = b"SHBH"
ACK_MAGIC = b"SHBA"

KIND_DATA = 1
KIND_CLOSE = 2
_KINDS = frozenset((KIND_DATA, KIND_CLOSE))

FRAME_HEADER = struct.Struct("<4sBBHQQQQII")
FRAME_HEADER_BYTES = FRAME_HEADER.size  # 48
AEAD_TAG_BYTES = 16

TOKEN_BYTES = 32
RANDOM_BYTES = 32
MAC_BYTES = 32
_HELLO_FIXED = struct.Struct("<4sBBHHH")  # magic, version, reserved, index, count, reserved
HELLO_BYTES = _HELLO_FIXED.size + TOKEN_BYTES + MAC_BYTES  # 76
_ACK_FIXED = struct.Struct("<4sBBH")  # magic, version, status, reserved
ACK_BYTES = _ACK_FIXED.size + MAC_BYTES  # 40
ACK_OK = 0

CIPHER_AES_GCM = "aes-256-gcm"
CIPHER_CHACHA20 = "chacha20-poly1305"
CIPHERS = (CIPHER_AES_GCM, CIPHER_CHACHA20)

# Wire-level caps on the offer itself; the receiver's own limits live in BulkSettings.
MAX_OFFER_CONNECTIONS = 64
MAX_OFFER_PORTS = 16
MAX_HOST_CHARS = 255


class BulkError(Exception):
    """Base class of everything the bulk channel raises."""


class BulkProtocolError(BulkError):
    """The peer sent something malformed, oversized or unauthenticated; the connection closes."""


class BulkHandshakeError(BulkProtocolError):
    """An offer, answer, hello or ack was malformed, unknown, spent, expired or failed its MAC."""


# ---------------------------------------------------------------------------------------------
# Offer / answer (carried as msgpack-ready dicts over the Noise-secured control stream)


@dataclass(frozen=True)
class BulkOffer:
    """What the listener proposes. `ports` empty means: no direct path, use the libp2p stream."""

    token: bytes
    listener_random: bytes
    host: str
    ports: tuple[int, ...]
    connections: int
    cipher: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "token": self.token,
            "random": self.listener_random,
            "host": self.host,
            "ports": list(self.ports),
            "connections": self.connections,
            "cipher": self.cipher,
        }

    @classmethod
    def from_wire(cls, msg: object) -> BulkOffer:
        """Validate an offer dict from the control stream; raise BulkHandshakeError if bad."""
        m = _wire_dict(msg, "offer", {"v", "token", "random", "host", "ports", "connections"})
        _check_version(m["v"], "offer")
        token = _wire_bytes(m["token"], TOKEN_BYTES, "offer token")
        rnd = _wire_bytes(m["random"], RANDOM_BYTES, "offer random")
        host = m["host"]
        if not isinstance(host, str) or len(host) > MAX_HOST_CHARS:
            raise BulkHandshakeError("offer host must be a string of at most 255 characters")
        ports = m["ports"]
        if not isinstance(ports, list | tuple) or len(ports) > MAX_OFFER_PORTS:
            raise BulkHandshakeError(f"offer ports must be a list of at most {MAX_OFFER_PORTS}")
        for p in ports:
            if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
                raise BulkHandshakeError(f"offer port {p!r} is not a TCP port number")
        conns = _wire_count(m["connections"], "offer connections")
        cipher = m.get("cipher", CIPHER_AES_GCM)
        if cipher not in CIPHERS:
            raise BulkHandshakeError(f"offer cipher {cipher!r} is not one of {CIPHERS}")
        return cls(token, rnd, host, tuple(ports), conns, cipher)


@dataclass(frozen=True)
class BulkAnswer:
    """The dialer's reply: its own random and how many connections it will open (<= offered)."""

    token: bytes
    dialer_random: bytes
    connections: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "token": self.token,
            "random": self.dialer_random,
            "connections": self.connections,
        }

    @classmethod
    def from_wire(cls, msg: object) -> BulkAnswer:
        """Validate an answer dict from the control stream; raise BulkHandshakeError if bad."""
        m = _wire_dict(msg, "answer", {"v", "token", "random", "connections"})
        _check_version(m["v"], "answer")
        token = _wire_bytes(m["token"], TOKEN_BYTES, "answer token")
        rnd = _wire_bytes(m["random"], RANDOM_BYTES, "answer random")
        return cls(token, rnd, _wire_count(m["connections"], "answer connections"))


def make_offer(host: str, ports: tuple[int, ...], connections: int, cipher: str) -> BulkOffer:
    """A fresh offer with a new one-time token and listener random (both from os.urandom)."""
    if cipher not in CIPHERS:
        raise ValueError(f"cipher must be one of {CIPHERS}, not {cipher!r}")
    if not 1 <= connections <= MAX_OFFER_CONNECTIONS:
        raise ValueError(f"connections must be in 1..{MAX_OFFER_CONNECTIONS}")
    return BulkOffer(
        os.urandom(TOKEN_BYTES), os.urandom(RANDOM_BYTES), host, ports, connections, cipher
    )


def make_answer(offer: BulkOffer, connections: int) -> BulkAnswer:
    """The dialer's answer: at most as many connections as offered, at least one."""
    if connections < 1:
        raise ValueError("connections must be at least 1")
    return BulkAnswer(offer.token, os.urandom(RANDOM_BYTES), min(connections, offer.connections))


def _wire_dict(msg: object, what: str, required: set[str]) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise BulkHandshakeError(f"{what} must be a dict, got {type(msg).__name__}")
    missing = required - set(msg)
    if missing:
        raise BulkHandshakeError(f"{what} lacks fields {sorted(missing)}")
    return msg


def _check_version(v: object, what: str) -> None:
    if v != PROTOCOL_VERSION:
        raise BulkHandshakeError(f"{what} version {v!r} unsupported (this node speaks 1)")


def _wire_bytes(v: object, size: int, what: str) -> bytes:
    if not isinstance(v, bytes | bytearray) or len(v) != size:
        raise BulkHandshakeError(f"{what} must be {size} bytes")
    return bytes(v)


def _wire_count(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_OFFER_CONNECTIONS:
        raise BulkHandshakeError(f"{what} must be an int in 1..{MAX_OFFER_CONNECTIONS}")
    return v


# ---------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class SessionKeys:
    """All key material of one channel. `is_listener` picks which direction is ours to send."""

    cipher: str
    connections: int
    token: bytes
    hello_key: bytes
    listener_to_dialer: tuple[bytes, ...]  # one AEAD key per connection index
    dialer_to_listener: tuple[bytes, ...]

    def send_key(self, index: int, is_listener: bool) -> bytes:
        keys = self.listener_to_dialer if is_listener else self.dialer_to_listener
        return keys[index]

    def receive_key(self, index: int, is_listener: bool) -> bytes:
        keys = self.dialer_to_listener if is_listener else self.listener_to_dialer
        return keys[index]


def derive_session_keys(offer: BulkOffer, answer: BulkAnswer) -> SessionKeys:
    """HKDF-SHA256(ikm = listener_random || dialer_random, salt = token), then one expand per key.

    The cipher name and connection count are bound into every `info`, so two sides that
    disagree on them end up with different keys and fail at the hello MAC, not later.
    """
    if answer.token != offer.token:
        raise BulkHandshakeError("answer token does not match the offer")
    if not 1 <= answer.connections <= offer.connections:
        raise BulkHandshakeError(
            f"answer asks for {answer.connections} connections, offer allows {offer.connections}"
        )
    ikm = offer.listener_random + answer.dialer_random
    context = f"shoal/bulk/v{PROTOCOL_VERSION}/{offer.cipher}/{answer.connections}".encode()
    master = HKDF(hashes.SHA256(), 32, salt=offer.token, info=context + b"/master").derive(ikm)

    def expand(label: bytes) -> bytes:
        return HKDFExpand(hashes.SHA256(), 32, info=context + label).derive(master)

    n = answer.connections
    return SessionKeys(
        cipher=offer.cipher,
        connections=n,
        token=offer.token,
        hello_key=expand(b"/hello"),
        listener_to_dialer=tuple(expand(b"/l2d/%d" % i) for i in range(n)),
        dialer_to_listener=tuple(expand(b"/d2l/%d" % i) for i in range(n)),
    )


# ---------------------------------------------------------------------------------------------
# Hello / ack on a fresh TCP connection


@dataclass(frozen=True)
class Hello:
    token: bytes
    index: int
    count: int
    mac: bytes
    signed: bytes  # the bytes the MAC covers


def encode_hello(keys: SessionKeys, index: int) -> bytes:
    fixed = _HELLO_FIXED.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, index, keys.connections, 0)
    signed = fixed + keys.token
    return signed + hmac.digest(keys.hello_key, b"hello" + signed, sha256)


def parse_hello(data: bytes | bytearray | memoryview) -> Hello:
    """Parse the first HELLO_BYTES of a connection (MAC not checked: needs the offer's keys)."""
    if len(data) != HELLO_BYTES:
        raise BulkHandshakeError(f"hello must be {HELLO_BYTES} bytes, got {len(data)}")
    raw = bytes(data)
    magic, version, _, index, count, _ = _HELLO_FIXED.unpack_from(raw)
    if magic != HELLO_MAGIC:
        raise BulkHandshakeError(f"bad hello magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise BulkHandshakeError(f"hello version {version} unsupported")
    signed_len = _HELLO_FIXED.size + TOKEN_BYTES
    return Hello(
        token=raw[_HELLO_FIXED.size : signed_len],
        index=index,
        count=count,
        mac=raw[signed_len:],
        signed=raw[:signed_len],
    )


def verify_hello(keys: SessionKeys, hello: Hello) -> None:
    expected = hmac.digest(keys.hello_key, b"hello" + hello.signed, sha256)
    if not hmac.compare_digest(expected, hello.mac):
        raise BulkHandshakeError("hello MAC does not verify (wrong session keys)")
    if hello.count != keys.connections:
        raise BulkHandshakeError(
            f"hello says {hello.count} connections, the answer said {keys.connections}"
        )
    if not 0 <= hello.index < keys.connections:
        raise BulkHandshakeError(f"hello connection index {hello.index} out of range")


def encode_ack(keys: SessionKeys, hello_bytes: bytes) -> bytes:
    fixed = _ACK_FIXED.pack(ACK_MAGIC, PROTOCOL_VERSION, ACK_OK, 0)
    return fixed + hmac.digest(keys.hello_key, b"ack" + fixed + hello_bytes, sha256)


def verify_ack(keys: SessionKeys, hello_bytes: bytes, ack: bytes | bytearray) -> None:
    if len(ack) != ACK_BYTES:
        raise BulkHandshakeError(f"ack must be {ACK_BYTES} bytes")
    fixed = bytes(ack[: _ACK_FIXED.size])
    magic, version, status, _ = _ACK_FIXED.unpack(fixed)
    if magic != ACK_MAGIC or version != PROTOCOL_VERSION or status != ACK_OK:
        raise BulkHandshakeError(f"bad ack (magic {magic!r}, version {version}, status {status})")
    expected = hmac.digest(keys.hello_key, b"ack" + fixed + hello_bytes, sha256)
    if not hmac.compare_digest(expected, bytes(ack[_ACK_FIXED.size :])):
        raise BulkHandshakeError("ack MAC does not verify (listener has other keys)")


# ---------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class FrameLimits:
    """The receiver's caps, checked on every header before a byte of payload is read."""

    max_chunk_bytes: int
    max_transfer_bytes: int


def pack_header_into(
    buf: bytearray | memoryview,
    kind: int,
    tag: int,
    transfer: int,
    total: int,
    offset: int,
    chunk_len: int,
    length: int,
) -> None:
    FRAME_HEADER.pack_into(
        buf,
        0,
        FRAME_MAGIC,
        PROTOCOL_VERSION,
        kind,
        0,
        tag,
        transfer,
        total,
        offset,
        chunk_len,
        length,
    )


def parse_header(
    buf: bytearray | memoryview, limits: FrameLimits
) -> tuple[int, int, int, int, int, int, int]:
    """Check a frame header; return (kind, tag, transfer, total, offset, chunk_len, length).

    Checks everything a header alone can show: magic, version, kind, that the chunk and the
    transfer fit the receiver's caps, and that (offset, length) is exactly one chunk of the
    transfer. Duplicate chunks and totals that change mid-transfer are checked by the caller.
    """
    (magic, version, kind, flags, tag, transfer, total, offset, chunk_len, length) = (
        FRAME_HEADER.unpack_from(buf)
    )
    if magic != FRAME_MAGIC:
        raise BulkProtocolError(f"bad frame magic {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise BulkProtocolError(f"frame version {version} unsupported")
    if kind not in _KINDS:
        raise BulkProtocolError(f"unknown frame kind {kind}")
    if flags != 0:
        raise BulkProtocolError(f"unknown frame flags {flags:#x}")
    if kind == KIND_CLOSE:
        if tag or transfer or total or offset or chunk_len or length:
            raise BulkProtocolError("close frame with nonzero fields")
        return kind, tag, transfer, total, offset, chunk_len, length
    if total > limits.max_transfer_bytes:
        raise BulkProtocolError(
            f"transfer {tag} declares {total} bytes, above max_transfer_bytes "
            f"{limits.max_transfer_bytes}"
        )
    if chunk_len > limits.max_chunk_bytes or length > limits.max_chunk_bytes:
        raise BulkProtocolError(
            f"frame of transfer {tag} has chunk {chunk_len} / length {length} bytes, above "
            f"max_chunk_bytes {limits.max_chunk_bytes}"
        )
    if total == 0:
        if offset or length:
            raise BulkProtocolError(f"empty transfer {tag} with offset/length set")
    elif chunk_len == 0 or offset % chunk_len or offset >= total:
        raise BulkProtocolError(
            f"frame of transfer {tag}: offset {offset} is not a chunk start of {total} bytes "
            f"in chunks of {chunk_len}"
        )
    elif length != min(chunk_len, total - offset):
        raise BulkProtocolError(
            f"frame of transfer {tag} at offset {offset} carries {length} bytes, expected "
            f"{min(chunk_len, total - offset)}"
        )
    return kind, tag, transfer, total, offset, chunk_len, length


class FrameCipher:
    """One direction of one connection: an AEAD key and its 96-bit nonce counter.

    Sender and receiver keep matching counters; the nonce is the frame's sequence number on
    this connection, so it never repeats under this key (2**96 frames will not happen).
    """

    __slots__ = ("_aead", "_counter")

    def __init__(self, cipher: str, key: bytes) -> None:
        self._aead: AESGCM | ChaCha20Poly1305 = (
            AESGCM(key) if cipher == CIPHER_AES_GCM else ChaCha20Poly1305(key)
        )
        self._counter = 0

    def _next_nonce(self) -> bytes:
        nonce = self._counter.to_bytes(12, "little")
        self._counter += 1
        return nonce

    def seal_into(self, header: memoryview, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt `plaintext` into `out` (len(plaintext) + 16 bytes), header as AAD."""
        self._aead.encrypt_into(self._next_nonce(), plaintext, header, out)

    def open_into(self, header: memoryview, sealed: memoryview, out: memoryview) -> None:
        """Decrypt and authenticate into `out`. On failure `out` may hold unverified bytes."""
        try:
            self._aead.decrypt_into(self._next_nonce(), sealed, header, out)
        except InvalidTag:
            raise BulkProtocolError(
                "frame failed authentication (tampered, reordered or wrong key)"
            ) from None
