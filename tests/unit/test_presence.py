"""Presence records and the member table, with no sockets and an explicit clock."""

from __future__ import annotations

import os

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from protocols.presence import (
    MemberTable,
    PresenceRecord,
    RecordError,
    Signer,
    decode_record,
    peer_id_from_public_key,
    public_key_from_peer_id,
)

NOW = 1_800_000_000.0


def signer() -> Signer:
    return Signer(os.urandom(32))


def record(
    s: Signer, seq: int = 1, issued_at: float = NOW, ttl_s: float = 10.0, **kw: object
) -> dict[str, bytes]:
    rec = PresenceRecord(
        swarm="lab",
        peer_id=s.peer_id,
        seq=seq,
        issued_at=issued_at,
        ttl_s=ttl_s,
        addrs=("/ip4/127.0.0.1/tcp/4150",),
        **kw,
    )  # type: ignore[arg-type]
    return rec.sign(s)


def test_peer_id_matches_libp2p_for_the_same_seed() -> None:
    seed = os.urandom(32)
    libp2p_id = ID.from_pubkey(create_new_key_pair(seed).public_key).to_base58()
    assert Signer(seed).peer_id == libp2p_id
    assert peer_id_from_public_key(public_key_from_peer_id(libp2p_id)) == libp2p_id


def test_signed_record_round_trips() -> None:
    s = signer()
    rec = decode_record(record(s, capacity={"cpus": 2}), "lab")
    assert rec.peer_id == s.peer_id and rec.capacity == {"cpus": 2} and rec.expires_at == NOW + 10


def test_tampered_body_is_rejected() -> None:
    s = signer()
    wire = record(s)
    fields = msgpack.unpackb(wire["body"])
    fields[5] = ["/ip4/6.6.6.6/tcp/4150"]  # redirect the peer's traffic elsewhere
    with pytest.raises(RecordError, match="bad signature"):
        decode_record({"body": msgpack.packb(fields), "sig": wire["sig"]}, "lab")


def test_record_signed_by_another_key_is_rejected() -> None:
    honest, forger = signer(), signer()
    wire = record(honest)
    forged = {"body": wire["body"], "sig": forger.sign(b"shoal/presence/v1\x00" + wire["body"])}
    with pytest.raises(RecordError, match="bad signature"):
        decode_record(forged, "lab")


def test_signer_cannot_sign_for_someone_else() -> None:
    a, b = signer(), signer()
    rec = PresenceRecord(swarm="lab", peer_id=b.peer_id, seq=1, issued_at=NOW, ttl_s=5)
    with pytest.raises(RecordError, match="cannot sign"):
        rec.sign(a)


@pytest.mark.parametrize(
    "wire, reason",
    [
        ({"body": b"x"}, "exactly"),
        ({"body": "text", "sig": b"s" * 64}, "bytes"),
        ({"body": b"\xc1", "sig": b"s" * 64}, "malformed"),
        ({"body": msgpack.packb([1, 2]), "sig": b"s" * 64}, "11 fields"),
        ({"body": b"a" * 20000, "sig": b"s" * 64}, "exceeds"),
        ({"body": b"abc", "sig": b"short"}, "64 bytes"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(wire: dict[str, object], reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        decode_record(wire, "lab")


def test_record_of_another_swarm_is_rejected() -> None:
    with pytest.raises(RecordError, match="swarm"):
        decode_record(record(signer()), "other-swarm")


def test_table_expires_members_at_issued_plus_ttl() -> None:
    s = signer()
    table = MemberTable("lab", "me")
    assert table.offer(record(s, ttl_s=10), NOW).kind == "joined"
    assert table.expire(NOW + 9.9) == []
    assert table.expire(NOW + 10.0) == [s.peer_id]
    assert table.peer_ids() == []


def test_expired_and_future_records_are_not_taken() -> None:
    s = signer()
    table = MemberTable("lab", "me", max_clock_skew_s=30)
    assert table.offer(record(s, issued_at=NOW - 20, ttl_s=10), NOW).kind == "expired"
    with pytest.raises(RecordError, match="future"):
        table.offer(record(s, issued_at=NOW + 60), NOW)
    assert table.peer_ids() == []


def test_older_sequence_never_replaces_newer() -> None:
    s = signer()
    table = MemberTable("lab", "me")
    table.offer(record(s, seq=5), NOW)
    assert table.offer(record(s, seq=4, issued_at=NOW + 1), NOW + 1).kind == "stale"
    assert table.get(s.peer_id).record.seq == 5  # type: ignore[union-attr]
    assert table.offer(record(s, seq=6, issued_at=NOW + 1), NOW + 1).kind == "updated"


def test_leave_removes_at_once_and_blocks_older_records() -> None:
    s = signer()
    table = MemberTable("lab", "me")
    table.offer(record(s, seq=1), NOW)
    assert table.offer(record(s, seq=2, leaving=True), NOW).kind == "left"
    assert table.peer_ids() == []
    assert table.offer(record(s, seq=1), NOW).kind == "stale"  # a delayed heartbeat
    assert table.offer(record(s, seq=3), NOW).kind == "joined"  # a restart comes back


def test_anti_entropy_converges_two_tables() -> None:
    a, b, c, d = signer(), signer(), signer(), signer()
    left = MemberTable("lab", a.peer_id)
    right = MemberTable("lab", b.peer_id)
    for s in (a, c):
        left.offer(record(s), NOW)
    for s in (b, d):
        right.offer(record(s), NOW)
    right.offer(record(c, seq=7), NOW)
    assert left.digest_hash() != right.digest_hash()
    # push-pull: left pulls with its digest, then pushes what right lacks
    for wire in right.newer_than(left.digest()):
        left.offer(wire, NOW)
    for wire in left.newer_than(right.digest()):
        right.offer(wire, NOW)
    assert left.digest() == right.digest()
    assert left.digest_hash() == right.digest_hash()
    assert left.get(c.peer_id).record.seq == 7  # type: ignore[union-attr]
