"""Membership by push-pull anti-entropy, driven by hand with an explicit clock (no sockets)."""

from __future__ import annotations

import os
import random

from protocols.membership import Membership, MembershipSettings
from protocols.presence import Signer

NOW = 1_800_000_000.0
SETTINGS = MembershipSettings(heartbeat_s=1.0, record_ttl_s=10.0, fanout=2)


def node(settings: MembershipSettings = SETTINGS) -> Membership:
    signer = Signer(os.urandom(32))
    return Membership("lab", signer, settings, lambda: {"addrs": ["/ip4/127.0.0.1/tcp/1"]})


class Net:
    """Delivers every message at once, in order; drops whatever is addressed to dead nodes."""

    def __init__(self, nodes: list[Membership]) -> None:
        self.nodes = {n.self_id: n for n in nodes}
        self.messages = 0

    def deliver(self, sends: list[tuple[str, dict]], sender: str, now: float) -> None:
        queue = [(sender, to, msg) for to, msg in sends]
        while queue:
            src, dst, msg = queue.pop(0)
            if dst not in self.nodes:
                continue
            self.messages += 1
            reaction = self.nodes[dst].on_message(src, msg, now)
            assert not reaction.rejected, reaction.rejected
            queue += [(dst, to, m) for to, m in reaction.sends]

    def tick(self, now: float) -> None:
        for n in list(self.nodes.values()):
            self.deliver(n.tick(now).sends, n.self_id, now)

    def views(self) -> dict[str, set[str]]:
        return {pid: set(n.table.peer_ids()) for pid, n in self.nodes.items()}


def join_all(nodes: list[Membership], net: Net, now: float) -> None:
    boot = nodes[0]
    boot.refresh(now)
    for n in nodes[1:]:
        n.refresh(now)
        net.deliver([(boot.self_id, n.hello(now))], n.self_id, now)


def test_everyone_learns_everyone_through_one_bootstrap() -> None:
    nodes = [node() for _ in range(12)]
    net = Net(nodes)
    join_all(nodes, net, NOW)
    everyone = set(net.nodes)
    for step in range(8):
        net.tick(NOW + step)
    assert all(view == everyone for view in net.views().values())


def test_messages_per_node_per_heartbeat_do_not_grow_with_the_swarm() -> None:
    per_node = {}
    for size in (8, 32):
        nodes = [node() for _ in range(size)]
        net = Net(nodes)
        join_all(nodes, net, NOW)
        for step in range(10):
            net.tick(NOW + step)
        net.messages = 0
        for step in range(10, 20):
            net.tick(NOW + step)
        per_node[size] = net.messages / size / 10
        assert all(len(v) == size for v in net.views().values())
    # each exchange is at most 3 messages and each node starts `fanout` of them per heartbeat
    assert per_node[32] <= 3 * SETTINGS.fanout
    assert per_node[32] < 1.3 * per_node[8]


def test_a_silent_member_expires_everywhere_within_the_ttl() -> None:
    nodes = [node() for _ in range(6)]
    net = Net(nodes)
    join_all(nodes, net, NOW)
    for step in range(5):
        net.tick(NOW + step)
    victim = nodes[2].self_id
    last_refresh = NOW + 4
    del net.nodes[victim]  # SIGKILL: no more ticks, messages to it are lost
    step = 5
    while any(victim in v for v in net.views().values()):
        net.tick(NOW + step)
        step += 1
    assert NOW + step - 1 <= last_refresh + SETTINGS.record_ttl_s + SETTINGS.heartbeat_s


def test_records_stay_fresh_with_gossip_alone() -> None:
    # With fanout 1 in a swarm of 16, a node talks to each member directly only every
    # 15 heartbeats, longer than the 10 s ttl: the views stay whole through relayed records.
    settings = MembershipSettings(heartbeat_s=1.0, record_ttl_s=10.0, fanout=1)
    nodes = [node(settings) for _ in range(16)]
    net = Net(nodes)
    join_all(nodes, net, NOW)
    for step in range(60):
        net.tick(NOW + step)
        if step >= 10:
            assert all(len(v) == 16 for v in net.views().values()), step


def test_graceful_leave_is_immediate() -> None:
    nodes = [node() for _ in range(5)]
    net = Net(nodes)
    join_all(nodes, net, NOW)
    for step in range(5):
        net.tick(NOW + step)
    leaver = nodes[1]
    net.deliver(leaver.leave(NOW + 5), leaver.self_id, NOW + 5)
    del net.nodes[leaver.self_id]
    assert all(leaver.self_id not in v for v in net.views().values())


def test_rtt_is_measured_from_the_echoed_timestamp() -> None:
    a, b = node(), node()
    a.refresh(NOW)
    b.refresh(NOW)
    sync = b.hello(NOW)
    ack = a.on_message(b.self_id, sync, NOW + 0.001).sends[0][1]
    reaction = b.on_message(a.self_id, ack, NOW + 0.004)
    assert reaction.rtt_s is not None and abs(reaction.rtt_s - 0.004) < 1e-6


def test_malformed_messages_are_rejected_with_reasons() -> None:
    a = node()
    a.refresh(NOW)
    rng = random.Random(1)
    bad = [
        {"t": "sync", "recs": [], "digest": "nope", "ts": NOW},
        {"t": "sync", "recs": [], "digest": {}, "ts": float("nan")},
        {"t": "sync_ack", "recs": "x", "digest": {}, "ts": NOW},
        {"t": "recs", "recs": [{"body": rng.randbytes(40), "sig": rng.randbytes(64)}]},
        {"t": "sync"},
        {"t": "launch"},
    ]
    for message in bad:
        reaction = a.on_message(
            "12D3KooWJKgqxnxSw6wmbTC4pPwLd9akm9EP4kqU1Kh23jJPRTTy", message, NOW
        )
        assert reaction.rejected, message
        assert not reaction.sends
    assert a.table.peer_ids() == [a.self_id]


def test_a_node_held_up_longer_than_the_ttl_never_expires_itself() -> None:
    # A start-up that blocks the loop (imports, corpus, model) longer than a record's life:
    # the first tick afterwards must renew our own record, not report us expired.
    solo = node()
    solo.refresh(NOW)
    tick = solo.tick(NOW + 3 * SETTINGS.record_ttl_s)
    assert solo.self_id not in tick.expired
    assert solo.table.get(solo.self_id) is not None
