"""The one-hop DHT over the member table, with no sockets: signed presence records as values."""

from __future__ import annotations

import os
import time

import msgpack
import pytest

from net.host import dht_validator, presence_key
from protocols.dht_direct import DirectDHT, DirectDHTSettings, Done, Reaction, closest, distance
from protocols.presence import PresenceRecord, Signer


def signed_record(s: Signer, seq: int = 1, issued_at: float | None = None) -> bytes:
    rec = PresenceRecord(
        swarm="lab",
        peer_id=s.peer_id,
        seq=seq,
        issued_at=time.time() if issued_at is None else issued_at,
        ttl_s=10.0,
        addrs=(f"/ip4/127.0.0.1/tcp/{4000 + seq}",),
    )
    return bytes(msgpack.packb(rec.sign(s)))


class Net:
    """Machines keyed by peer id; ``run`` delivers messages until none are left."""

    def __init__(self, n: int, replication: int = 3, max_age_s: float = 3600.0) -> None:
        self.signers = [Signer(os.urandom(32)) for _ in range(n)]
        validator = dht_validator("lab", max_age_s)
        settings = DirectDHTSettings(replication=replication, query_timeout_s=2.0)
        self.nodes = {
            s.peer_id: DirectDHT(s.peer_id, validator.validate, validator.select, settings)
            for s in self.signers
        }
        self.ids = sorted(self.nodes)
        self.delivered: list[tuple[str, str, str]] = []  # (sender, receiver, type)
        self.rejected: list[str] = []
        self.down: set[str] = set()

    def run(self, origin: str, reaction: Reaction) -> list[Done]:
        done = list(reaction.done)
        queue = [(origin, peer, msg) for peer, msg in reaction.sends]
        self.rejected += reaction.rejected
        while queue:
            sender, receiver, msg = queue.pop(0)
            if receiver in self.down:
                continue
            self.delivered.append((sender, receiver, msg["t"]))
            answer = self.nodes[receiver].on_message(sender, msg, 0.0)
            self.rejected += answer.rejected
            if receiver == origin:
                done += answer.done
            queue += [(receiver, peer, m) for peer, m in answer.sends]
        return done


def test_closest_members_follow_the_xor_metric() -> None:
    peers = [Signer(os.urandom(32)).peer_id for _ in range(12)]
    key = "/shoal-presence/x"
    chosen = closest(key, peers, 3)
    assert len(chosen) == 3
    assert chosen == sorted(peers, key=lambda p: distance(key, p))[:3]
    assert max(distance(key, p) for p in chosen) < min(
        distance(key, p) for p in peers if p not in chosen
    )
    assert closest(key, reversed(peers), 3) == chosen  # order of the view does not matter


def test_put_stores_at_the_k_closest_and_any_member_gets_it_in_one_hop() -> None:
    net = Net(20)
    owner = net.signers[0]
    key = presence_key(owner.peer_id)
    value = signed_record(owner)
    _, reaction = net.nodes[owner.peer_id].put(key, value, net.ids, 0.0)
    [done] = net.run(owner.peer_id, reaction)
    holders = closest(key, net.ids, 3)
    assert done.kind == "put" and done.stored == 3 and done.reasons == []
    assert {p for p, node in net.nodes.items() if key in node.store} == set(holders)

    readers = [p for p in net.ids if p not in holders][:5]
    for reader in readers:
        net.delivered.clear()
        _, reaction = net.nodes[reader].get(key, net.ids, 0.0)
        [got] = net.run(reader, reaction)
        assert got.value == value and got.answered_by in holders
        asked = {r for s, r, t in net.delivered if t == "dht.get"}
        assert asked == set(holders)  # one hop: only the holders were asked, nobody forwarded
    # a holder answers from its own store without a message
    _, reaction = net.nodes[holders[1]].get(key, net.ids, 0.0)
    assert reaction.sends == [] and reaction.done[0].value == value
    assert reaction.done[0].answered_by == holders[1]


def test_forged_and_stale_records_are_refused_with_reasons() -> None:
    net = Net(6, max_age_s=60)
    victim, forger = net.signers[0], net.signers[1]
    key = presence_key(victim.peer_id)
    foreign = signed_record(forger)  # a valid record, but of another peer, under victim's key
    with pytest.raises(ValueError, match="foreign key"):
        net.nodes[forger.peer_id].put(key, foreign, net.ids, 0.0)
    # sent raw to a holder, it is refused and acknowledged as refused
    holder = closest(key, net.ids, 1)[0]
    answer = net.nodes[holder].on_message(
        forger.peer_id, {"t": "dht.put", "id": 1, "key": key, "value": foreign}, 0.0
    )
    assert key not in net.nodes[holder].store
    assert answer.sends[0][1]["ok"] is False and "foreign key" in answer.sends[0][1]["why"]
    assert any("foreign key" in r for r in answer.rejected)
    # a record older than the validator's max age is refused too
    with pytest.raises(ValueError, match="older than"):
        net.nodes[victim.peer_id].put(
            key, signed_record(victim, issued_at=time.time() - 120), net.ids, 0.0
        )


def test_an_invalid_answer_is_refused_and_the_get_goes_on_with_the_others() -> None:
    net = Net(8)
    owner = net.signers[0]
    key = presence_key(owner.peer_id)
    value = signed_record(owner)
    _, reaction = net.nodes[owner.peer_id].put(key, value, net.ids, 0.0)
    net.run(owner.peer_id, reaction)
    holders = closest(key, net.ids, 3)
    reader = next(p for p in net.ids if p not in holders)
    request_id, reaction = net.nodes[reader].get(key, net.ids, 0.0)
    liar = holders[0]
    forged = signed_record(net.signers[1])
    lie = net.nodes[reader].on_message(
        liar, {"t": "dht.val", "id": request_id, "value": forged}, 0.0
    )
    assert lie.done == [] and any("refused" in r for r in lie.rejected)
    honest = net.nodes[reader].on_message(
        holders[1], {"t": "dht.val", "id": request_id, "value": value}, 0.0
    )
    assert honest.done[0].value == value
    # a late answer for the finished request changes nothing
    late = net.nodes[reader].on_message(
        holders[2], {"t": "dht.val", "id": request_id, "value": value}, 0.0
    )
    assert late.done == [] and late.rejected == []


def test_newer_record_replaces_older_but_not_the_other_way() -> None:
    net = Net(5, replication=5)
    owner = net.signers[0]
    key = presence_key(owner.peer_id)
    old, new = signed_record(owner, seq=1), signed_record(owner, seq=2)
    for value in (new, old):
        _, reaction = net.nodes[owner.peer_id].put(key, value, net.ids, 0.0)
        net.run(owner.peer_id, reaction)
    assert {node.store[key] for node in net.nodes.values()} == {new}


def test_missing_key_unanswered_peers_and_lost_peers_end_the_get() -> None:
    net = Net(6)
    reader = net.ids[0]
    key = presence_key(net.signers[3].peer_id)
    _, reaction = net.nodes[reader].get(key, net.ids, 0.0)
    [done] = net.run(reader, reaction)
    assert done.value is None and done.reasons == []  # every holder said it has nothing

    node = net.nodes[reader]
    targets = [p for p in closest(key, net.ids, 3) if p != reader]
    request_id, reaction = node.get(key, net.ids, 10.0)
    assert {p for p, _ in reaction.sends} == set(targets)
    assert node.on_timeout(11.0).done == []  # not due yet
    lost = node.on_peer_lost(targets[0])
    assert lost.done == []
    [timed_out] = node.on_timeout(12.0).done
    assert timed_out.request_id == request_id and timed_out.value is None
    assert any("left" in r for r in timed_out.reasons)
    assert any("no answer" in r for r in timed_out.reasons)
    assert node.give_up(request_id, "again").done == []  # ended once only


def test_malformed_messages_are_rejected_with_reasons() -> None:
    net = Net(3)
    node = net.nodes[net.ids[0]]
    other = net.ids[1]
    bad = [
        {"t": "dht.get", "key": "k"},  # no id
        {"t": "dht.get", "id": True, "key": "k"},
        {"t": "dht.get", "id": 1, "key": 7},
        {"t": "dht.get", "id": 1, "key": "k" * 1000},
        {"t": "dht.put", "id": 1, "key": "k"},
        {"t": "dht.nope", "id": 1},
    ]
    for message in bad:
        reaction = node.on_message(other, message, 0.0)
        assert reaction.rejected, message
    oversized = {"t": "dht.put", "id": 2, "key": "/shoal-presence/x", "value": b"x" * 70_000}
    reaction = node.on_message(other, oversized, 0.0)
    assert reaction.sends[0][1]["ok"] is False and "at most" in reaction.sends[0][1]["why"]
    assert node.store == {}


def test_the_store_is_bounded() -> None:
    net = Net(4, replication=4)
    node = net.nodes[net.ids[0]]
    node.settings = DirectDHTSettings(replication=4, max_records=2)
    for s in net.signers[1:4]:
        key = presence_key(s.peer_id)
        node.on_message(
            s.peer_id, {"t": "dht.put", "id": 1, "key": key, "value": signed_record(s)}, 0
        )
    assert len(node.store) == 2


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        DirectDHTSettings(replication=0)
    with pytest.raises(ValueError):
        DirectDHTSettings(query_timeout_s=float("nan"))
