"""Signed, expiring presence records and the member table built from them (sans-IO).

A presence record says "peer P is in swarm S, reachable at these addresses, with this role,
capacity and training state, until time T". It is signed with the peer's Ed25519 identity key,
so any member may forward any other member's record (gossip, anti-entropy, the DHT) and every
receiver can check it came from that peer. A peer id is the libp2p identity multihash of the
public key, so the signer's key is recovered from the claimed peer id itself: no key travels
beside the record and no record can claim someone else's id.

A graceful leave is a record with ``leaving=True`` and a higher sequence number: it removes the
member at once everywhere it arrives, and it keeps an older record that is still in flight from
bringing the member back until the leave itself expires.

Time enters as ``now`` (Unix seconds): records travel between machines, so expiry is absolute
wall-clock time, checked with a tolerance for clock skew.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

RECORD_DOMAIN = b"shoal/presence/v1\x00"
MAX_RECORD_BYTES = 16 * 1024
MAX_ADDRS = 32
MAX_ADDR_CHARS = 256
MAX_SHORT_STR = 64

# libp2p peer id of an Ed25519 key: multihash(identity) of the protobuf PublicKey message.
# 0x00 = identity hash, 0x24 = 36 bytes; 0x08 0x01 = KeyType Ed25519; 0x12 0x20 = 32-byte data.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class RecordError(ValueError):
    """A presence record that must be rejected; the message is the reason."""


def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise RecordError(f"peer id has a non-base58 character {char!r}")
        number = number * 58 + digit
    pad = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise RecordError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return _b58encode(_ED25519_PEER_ID_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside an Ed25519 peer id, or RecordError."""
    if not isinstance(peer_id, str) or not 40 <= len(peer_id) <= 64:
        raise RecordError(f"malformed peer id {str(peer_id)[:80]!r}")
    raw = _b58decode(peer_id)
    if len(raw) != 38 or not raw.startswith(_ED25519_PEER_ID_PREFIX):
        raise RecordError(f"peer id {peer_id} is not an Ed25519 identity peer id")
    return raw[len(_ED25519_PEER_ID_PREFIX) :]


class Signer:
    """Signs records for one identity (a 32-byte Ed25519 seed)."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        public = self._key.public_key().public_bytes_raw()
        self.peer_id = peer_id_from_public_key(public)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def verify_signature(peer_id: str, data: bytes, signature: bytes) -> None:
    """Raise RecordError unless ``signature`` is ``peer_id``'s signature over ``data``."""
    key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise RecordError(f"bad signature for peer {peer_id}") from None


@dataclass(frozen=True)
class PresenceRecord:
    """One peer's statement of presence; ``expires_at = issued_at + ttl_s``."""

    swarm: str
    peer_id: str
    seq: int
    issued_at: float
    ttl_s: float
    addrs: tuple[str, ...] = ()
    role: str = "worker"
    version: str = ""
    capacity: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    leaving: bool = False

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.ttl_s

    def body(self) -> bytes:
        fields = [
            self.swarm,
            self.peer_id,
            self.seq,
            self.issued_at,
            self.ttl_s,
            list(self.addrs),
            self.role,
            self.version,
            self.capacity,
            self.training,
            self.leaving,
        ]
        return msgpack.packb(fields, use_bin_type=True)

    def sign(self, signer: Signer) -> dict[str, bytes]:
        """The wire form ``{"body": ..., "sig": ...}`` of this record, signed by its peer."""
        if signer.peer_id != self.peer_id:
            raise RecordError(f"signer {signer.peer_id} cannot sign for {self.peer_id}")
        body = self.body()
        if len(body) > MAX_RECORD_BYTES:
            raise RecordError(f"record body of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
        return {"body": body, "sig": signer.sign(RECORD_DOMAIN + body)}


def _check_str(name: str, value: Any, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise RecordError(f"field {name} must be a string of at most {max_len} characters")
    return value


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordError(f"field {name} must be a finite number")
    return float(value)


def decode_record(wire: Any, swarm: str) -> PresenceRecord:
    """Check a wire record (size, schema, swarm, signature) and return it, or raise RecordError.

    Freshness is not checked here (see :meth:`MemberTable.offer`), so a record pulled from the
    DHT can be decoded and then judged against the caller's clock.
    """
    if not isinstance(wire, dict) or set(wire) != {"body", "sig"}:
        raise RecordError("record must be a map with exactly 'body' and 'sig'")
    body, sig = wire["body"], wire["sig"]
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise RecordError("record body and sig must be bytes")
    if len(body) > MAX_RECORD_BYTES:
        raise RecordError(f"record body of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    if len(sig) != 64:
        raise RecordError(f"signature must be 64 bytes, got {len(sig)}")
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise RecordError(f"malformed record body: {exc}") from None
    if not isinstance(fields, list) or len(fields) != 11:
        raise RecordError("record body must be a list of 11 fields")
    (r_swarm, peer_id, seq, issued_at, ttl_s, addrs, role, version, capacity, training, leaving) = (
        fields
    )
    _check_str("swarm", r_swarm, MAX_SHORT_STR)
    if r_swarm != swarm:
        raise RecordError(f"record is for swarm {r_swarm!r}, this is swarm {swarm!r}")
    _check_str("peer_id", peer_id, MAX_SHORT_STR)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise RecordError("field seq must be a non-negative integer")
    issued = _check_time("issued_at", issued_at)
    ttl = _check_time("ttl_s", ttl_s)
    if ttl <= 0:
        raise RecordError("field ttl_s must be positive")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise RecordError(f"field addrs must be a list of at most {MAX_ADDRS} addresses")
    for addr in addrs:
        _check_str("addrs[]", addr, MAX_ADDR_CHARS)
    _check_str("role", role, MAX_SHORT_STR)
    _check_str("version", version, MAX_SHORT_STR)
    if not isinstance(capacity, dict):
        raise RecordError("field capacity must be a map")
    if training is not None and not isinstance(training, dict):
        raise RecordError("field training must be a map or nil")
    if not isinstance(leaving, bool):
        raise RecordError("field leaving must be a boolean")
    verify_signature(peer_id, RECORD_DOMAIN + body, sig)
    return PresenceRecord(
        swarm=r_swarm,
        peer_id=peer_id,
        seq=seq,
        issued_at=issued,
        ttl_s=ttl,
        addrs=tuple(addrs),
        role=role,
        version=version,
        capacity=capacity,
        training=training,
        leaving=leaving,
    )


@dataclass
class Member:
    """A live member as this node sees it."""

    record: PresenceRecord
    wire: dict[str, bytes]
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class Offer:
    """What :meth:`MemberTable.offer` did with a record."""

    kind: str  # "joined" | "updated" | "left" | "stale" | "expired"
    record: PresenceRecord


class MemberTable:
    """The live membership of one swarm as seen by one node, fed by signed records."""

    def __init__(self, swarm: str, self_id: str, max_clock_skew_s: float = 30.0) -> None:
        self.swarm = swarm
        self.self_id = self_id
        self.max_clock_skew_s = max_clock_skew_s
        self._members: dict[str, Member] = {}
        # Leaves are kept until they expire, so a delayed older record cannot revive the peer.
        self._leaves: dict[str, tuple[PresenceRecord, dict[str, bytes]]] = {}

    def offer(self, wire: Any, now: float) -> Offer:
        """Take a wire record from anyone; raise RecordError if it is invalid."""
        record = decode_record(wire, self.swarm)
        if record.issued_at > now + self.max_clock_skew_s:
            raise RecordError(
                f"record from {record.peer_id} issued {record.issued_at - now:.1f} s in the future"
            )
        if record.expires_at <= now:
            return Offer("expired", record)
        known = self._known_seq(record.peer_id)
        if known is not None and record.seq <= known:
            return Offer("stale", record)
        if record.leaving:
            self._members.pop(record.peer_id, None)
            self._leaves[record.peer_id] = (record, wire)
            return Offer("left", record)
        self._leaves.pop(record.peer_id, None)
        current = self._members.get(record.peer_id)
        if current is None:
            self._members[record.peer_id] = Member(record, wire, first_seen=now, last_seen=now)
            return Offer("joined", record)
        current.record, current.wire, current.last_seen = record, wire, now
        return Offer("updated", record)

    def _known_seq(self, peer_id: str) -> int | None:
        if peer_id in self._members:
            return self._members[peer_id].record.seq
        if peer_id in self._leaves:
            return self._leaves[peer_id][0].seq
        return None

    def expire(self, now: float) -> list[str]:
        """Drop members whose record expired; return their peer ids."""
        gone = [pid for pid, m in self._members.items() if m.record.expires_at <= now]
        for pid in gone:
            del self._members[pid]
        for pid in [pid for pid, (rec, _) in self._leaves.items() if rec.expires_at <= now]:
            del self._leaves[pid]
        return gone

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def members(self) -> list[Member]:
        """Live members (this node included once it offered its own record), by peer id."""
        return [self._members[pid] for pid in sorted(self._members)]

    def peer_ids(self) -> list[str]:
        return sorted(self._members)

    def others(self) -> list[Member]:
        return [m for m in self.members() if m.record.peer_id != self.self_id]

    def digest(self) -> dict[str, int]:
        """Peer id -> newest sequence number known, leaves included: what anti-entropy compares."""
        out = {pid: m.record.seq for pid, m in self._members.items()}
        out.update({pid: rec.seq for pid, (rec, _) in self._leaves.items()})
        return out

    def digest_hash(self) -> bytes:
        """A short fingerprint of :meth:`digest`; equal fingerprints mean nothing to exchange."""
        text = ";".join(f"{pid}={seq}" for pid, seq in sorted(self.digest().items()))
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def newer_than(self, digest: dict[str, int]) -> list[dict[str, bytes]]:
        """Wire records this node holds that are newer than (or absent from) ``digest``."""
        out = []
        for pid, member in self._members.items():
            if digest.get(pid, -1) < member.record.seq:
                out.append(member.wire)
        for pid, (rec, wire) in self._leaves.items():
            if digest.get(pid, -1) < rec.seq:
                out.append(wire)
        return out
