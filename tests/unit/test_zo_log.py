"""The ZO record log machine, driven with no sockets: messages go through an in-memory queue
(msgpack-encoded as on the wire), time is a number, and the "trainer" folds every applied
record, in the order given, into a hash."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable

import msgpack
import pytest
import torch

from protocols.zo_log import (
    HASH_BYTES,
    Apply,
    ArchiveOffer,
    ArchiveRange,
    ClosedStep,
    Event,
    Produce,
    Rejected,
    Resync,
    Send,
    ServeArchive,
    SnapshotAgreed,
    ZOLog,
    ZOLogSettings,
    choose_join_path,
    decode_log,
    encode_log,
    genesis_digest,
    parse_offer,
)
from trainer.zo import SeedRecord, ZOSettings, apply_records_in_order, apply_step, state_hash

SETTINGS = ZOLogSettings(
    samples_per_step=2, step_timeout_s=5.0, close_timeout_s=5.0, hash_every_steps=4
)
GENESIS = genesis_digest("test", 0)


def fold(state: bytes, closed: ClosedStep) -> bytes:
    h = hashlib.blake2b(state, digest_size=HASH_BYTES)
    for peer, index, code in closed.records():
        h.update(f"{peer}/{index}/{code};".encode())
    return h.digest()


def codes_for(peer: str, step: int, samples: int) -> bytes:
    raw = hashlib.blake2b(f"{peer}/{step}".encode(), digest_size=samples).digest()
    return bytes(b if b != 0x80 else 0x7F for b in raw)


class Sim:
    """N machines, a FIFO wire, a clock; ``drop`` filters messages, ``dead`` peers are gone."""

    def __init__(self, names: list[str], settings: ZOLogSettings = SETTINGS) -> None:
        self.settings = settings
        self.now = 0.0
        self.nodes: dict[str, ZOLog] = {}
        self.state: dict[str, bytes] = {}
        self.wire: deque[tuple[str, str, bytes]] = deque()
        self.work: deque[tuple[str, Event]] = deque()
        self.dead: set[str] = set()
        self.rejected: dict[str, list[str]] = {}
        self.resyncs: dict[str, list[str]] = {}
        self.snapshots: dict[str, list[int]] = {}  # SnapshotAgreed steps, per node
        self.candidates: dict[str, dict[int, bytes]] = {}  # state before each snapshot step
        self.applies: dict[str, int] = {}  # Apply events handled, per node
        self.drop: Callable[[str, str, dict[str, object]], bool] = lambda s, t, m: False
        self.corrupt: Callable[[str, ClosedStep], ClosedStep] | None = None
        # Nodes that keep an archive (in memory here; node/zo_archive.py on disk in a daemon):
        # step -> (closed, chain digest before it, its digest), filled from the Apply events.
        self.archived: dict[str, dict[int, tuple[ClosedStep, bytes, bytes]]] = {}
        self.served: dict[str, int] = {}  # ServeArchive events answered, per node
        founder, *others = names
        self.add(founder, members=[founder])
        for name in others:  # joiners before step 0: the founder has no log to send yet
            self.add(name)
            self.handle(name, self.nodes[name].fetch_from(founder))

    def add(
        self,
        name: str,
        members: list[str] | None = None,
        base: tuple[int, bytes, bytes] = (0, GENESIS, b"theta0"),
    ) -> None:
        """``base``: (snapshot step, chain digest of the step before, state at the snapshot)."""
        step, digest, state = base
        self.nodes[name] = ZOLog(name, self.settings, digest, step, members, self.now)
        self.state[name] = state
        self.rejected[name] = []
        self.resyncs[name] = []
        self.snapshots[name] = []
        self.candidates[name] = {}
        self.applies[name] = 0
        self.handle(name, self.nodes[name].start(self.now))

    def handle(self, name: str, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Send):
                if not self.drop(name, event.peer, event.msg) and event.peer in self.nodes:
                    self.wire.append((name, event.peer, msgpack.packb(event.msg)))
            elif isinstance(event, Rejected):
                self.rejected[name].append(event.reason)
            elif isinstance(event, Resync):
                self.resyncs[name].append(event.reason)
            elif isinstance(event, SnapshotAgreed):
                # The node serves its candidate from now on (the Sim keeps them all).
                assert event.step in self.candidates[name]
                self.snapshots[name].append(event.step)
            elif isinstance(event, ServeArchive):
                kept = self.archived[name]
                steps = [kept[s][0] for s in range(event.start, event.stop)]
                reply = encode_log(steps, kept[event.start][1]) | {"h": event.head}
                self.served[name] = self.served.get(name, 0) + 1
                self.wire.append((name, event.peer, msgpack.packb(reply)))
            else:
                if isinstance(event, Apply) and name in self.archived:
                    kept = self.archived[name]
                    kept.setdefault(event.closed.step, (event.closed, event.previous, event.digest))
                    first = min(kept)
                    self.nodes[name].archive = ArchiveRange(first, max(kept) + 1, kept[first][1])
                self.work.append((name, event))

    def run(self, until: Callable[[], bool], max_time_s: float = 120.0) -> None:
        budget = 200_000
        while not until():
            budget -= 1
            if self.now > max_time_s or budget < 0:
                raise AssertionError(f"simulation did not reach its goal (t={self.now})")
            if self.wire:
                sender, to, raw = self.wire.popleft()
                if to not in self.dead and sender not in self.dead:
                    msg = msgpack.unpackb(raw, raw=False)
                    self.handle(to, self.nodes[to].on_message(sender, msg, self.now))
            elif self.work:
                name, event = self.work.popleft()
                if name in self.dead:
                    continue
                node = self.nodes[name]
                if isinstance(event, Produce):
                    codes = codes_for(name, event.step, self.settings.samples_per_step)
                    self.handle(name, node.on_records_ready(event.step, codes, self.now))
                elif isinstance(event, Apply):
                    self.state[name] = fold(self.state[name], event.closed)
                    self.applies[name] += 1
                    step = event.closed.step
                    if self.settings.is_snapshot_step(step + 1):
                        self.candidates[name][step + 1] = self.state[name]
                    check = (step + 1) % self.settings.hash_every_steps == 0
                    digest = self.state[name] if check else None
                    self.handle(name, node.on_applied(step, digest, self.now))
            else:
                self.now += 0.25
                for name, node in self.nodes.items():
                    if name not in self.dead:
                        self.handle(name, node.on_tick(self.now))

    def alive(self) -> list[str]:
        return [n for n in self.nodes if n not in self.dead]

    def all_at(self, step: int) -> Callable[[], bool]:
        return lambda: all(self.nodes[n].applied >= step for n in self.alive())

    def kill(self, name: str) -> None:
        self.dead.add(name)
        for other in self.alive():
            self.handle(other, self.nodes[other].on_peer_lost(name, self.now))


def assert_identical(sim: Sim, step: int) -> None:
    first = max(sim.nodes[n].log_start for n in sim.alive())  # what every log still holds
    logs = {n: [sim.nodes[n].chain[s] for s in range(first, step)] for n in sim.alive()}
    assert len({tuple(v) for v in logs.values()}) == 1, "logs differ"
    # Same state wherever the same number of steps was applied.
    by_applied: dict[int, set[bytes]] = {}
    for n in sim.alive():
        by_applied.setdefault(sim.nodes[n].applied, set()).add(sim.state[n])
    assert all(len(v) == 1 for v in by_applied.values()), "replicas differ"


def test_four_members_agree_on_every_step_and_hashes_match() -> None:
    sim = Sim(["a", "b", "c", "d"])
    sim.run(sim.all_at(40))
    assert_identical(sim, 40)
    a = sim.nodes["a"]
    assert a.members == ("a", "b", "c", "d")
    assert all(not r for r in sim.rejected.values()) and not any(sim.resyncs.values())
    assert a.parity_checks_passed >= 8  # every 4 steps, with all four hashes equal
    full = [s for s in range(10, 40) if len(a.log[s].included) == 4]
    assert full == list(range(10, 40))


def test_a_member_killed_mid_step_is_closed_out_and_the_others_go_on() -> None:
    sim = Sim(["a", "b", "c", "d"])
    sim.run(sim.all_at(10))
    # c dies after sending its records to a only.
    sim.drop = lambda s, t, m: s == "c" and t != "a"
    sim.run(lambda: "c" in sim.nodes["a"].open.records and sim.nodes["a"].open.step >= 11)
    sim.kill("c")
    sim.drop = lambda s, t, m: False
    sim.run(sim.all_at(30))
    assert_identical(sim, 30)
    assert "c" not in (sim.nodes["a"].members or ())


def test_the_coordinator_killed_mid_step_is_replaced_without_a_fork() -> None:
    sim = Sim(["a", "b", "c", "d"])
    sim.run(sim.all_at(10))
    # a (the coordinator) closes step 10 but only b hears it; then a dies.
    sim.drop = lambda s, t, m: s == "a" and m.get("t") == "zo.close" and t != "b"
    sim.run(lambda: sim.nodes["b"].next_close > 10 or sim.nodes["a"].next_close > 11)
    sim.kill("a")
    sim.drop = lambda s, t, m: False
    sim.run(sim.all_at(30))
    assert_identical(sim, 30)
    assert sim.nodes["b"].members == ("b", "c", "d")
    assert not any(sim.resyncs.values())


def test_a_lost_record_is_fetched_before_the_step_is_applied() -> None:
    sim = Sim(["a", "b", "c"])
    sim.run(sim.all_at(5))
    lost = {"done": False}

    def drop(sender: str, to: str, msg: dict[str, object]) -> bool:
        if not lost["done"] and sender == "b" and to == "c" and msg.get("t") == "zo.r":
            lost["done"] = True
            return True
        return False

    sim.drop = drop
    sim.run(sim.all_at(20))
    assert lost["done"] and sim.nodes["c"].fetches >= 1
    assert_identical(sim, 20)
    assert all(len(sim.nodes["a"].log[s].included) == 3 for s in range(5, 20))


def test_a_late_joiner_replays_the_log_and_reaches_the_same_state() -> None:
    sim = Sim(["a", "b"])
    sim.run(sim.all_at(25))
    sim.add("z")
    sim.handle("z", sim.nodes["z"].fetch_from("b"))
    sim.run(lambda: "z" in (sim.nodes["a"].members or ()) and sim.all_at(40)())
    assert_identical(sim, 40)
    assert sim.nodes["z"].parity_checks_passed >= 4  # checked its replay against the log too


def test_bad_records_are_rejected_with_a_reason_and_replicas_stay_identical() -> None:
    sim = Sim(["a", "b", "c"])
    sim.run(sim.all_at(5))
    b = sim.nodes["b"]
    step = b.open.step
    bad = [
        ("c", {"t": "zo.r", "s": step + 1000, "c": b"\x01\x02"}, "far-future step"),
        ("c", {"t": "zo.r", "s": step, "c": bytes(40)}, "flood"),
        ("mallory", {"t": "zo.r", "s": step, "c": b"\x01\x02"}, "not a member"),
        ("c", {"t": "zo.close", "s": step, "a": 0, "i": 7, "j": [], "d": bytes(16)}, "coordinator"),
    ]
    for sender, msg, reason in bad:
        events = b.on_message(sender, msg, sim.now)
        assert [e for e in events if isinstance(e, Rejected) and reason in e.reason], reason
    # A flood of repeated record sets from one member: all but the first rejected.
    first = b.on_message("c", {"t": "zo.r", "s": step, "c": b"\x05\x06"}, sim.now)
    assert not [e for e in first if isinstance(e, Rejected)]
    again = b.on_message("c", {"t": "zo.r", "s": step, "c": b"\x05\x07"}, sim.now)
    assert [e for e in again if isinstance(e, Rejected) and "flood" in e.reason]
    # A relayed (tampered) copy of a closed step is not authenticated by the chain.
    good = b.log[3]
    tampered = ClosedStep(
        3, good.members, good.included, {**good.codes, "a": b"\x7f\x7f"}, {}, good.joiners
    )
    events = b.on_message("c", encode_log([tampered], b.chain[2]), sim.now)
    assert [e for e in events if isinstance(e, Rejected) and "not authenticated" in e.reason]
    assert b.rejected_total == 6
    # c's forged second set is dropped: c's records from the queue reach the close only once.
    sim.run(sim.all_at(20))
    assert_identical(sim, 20)


def test_a_node_whose_state_differs_resyncs() -> None:
    sim = Sim(["a", "b", "c"])
    sim.run(sim.all_at(3))
    sim.state["c"] = b"bit flip"
    sim.run(lambda: bool(sim.resyncs["c"]))
    assert "state hash differs" in sim.resyncs["c"][0]
    assert not sim.resyncs["a"] and not sim.resyncs["b"]


def test_log_encoding_round_trips_and_costs_about_ten_bytes_a_step() -> None:
    sim = Sim(["a", "b", "c", "d"], ZOLogSettings(samples_per_step=1, hash_every_steps=1000))
    sim.run(sim.all_at(101))
    a = sim.nodes["a"]
    steps = [a.log[s] for s in range(1, 101)]
    msg = encode_log(steps, a.chain[0])
    previous, decoded = decode_log(msgpack.unpackb(msgpack.packb(msg), raw=False), 1)
    assert previous == a.chain[0] and decoded == steps
    per_step = (
        len(msgpack.packb(msg)) - len(msgpack.packb(encode_log(steps[:1], a.chain[0])))
    ) / 99
    assert per_step <= 12  # 4 one-byte records, a bitmap and row framing


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(P=["b", "a"]),
        lambda m: m.update(d0=b"short"),
        lambda m: m["S"][0].__setitem__(1, b"\x01"),
        lambda m: m["S"][0].__setitem__(0, 1 << 40),
        lambda m: m.update(S=[]),
        lambda m: m["S"].__setitem__(0, "row"),
    ],
)
def test_malformed_logs_are_rejected(mutate: Callable[[dict[str, object]], None]) -> None:
    sim = Sim(["a", "b"])
    sim.run(sim.all_at(3))
    a = sim.nodes["a"]
    msg = encode_log([a.log[1]], a.chain[0])
    mutate(msg)
    events = sim.nodes["b"].on_message("a", msg, sim.now)
    assert [e for e in events if isinstance(e, Rejected) and "malformed" in e.reason]


def test_control_another_apply_order_changes_the_hash_and_the_canonical_order_is_enforced() -> None:
    sim = Sim(["a", "b", "c"], ZOLogSettings(samples_per_step=3))
    sim.run(sim.all_at(2))
    closed = sim.nodes["a"].log[1]
    settings = ZOSettings(swarm="test", lr=0.05)
    records = [SeedRecord(1, p, i, c) for p, i, c in closed.records()]
    assert len(records) == 9
    base = {"w": torch.linspace(-1, 1, 4096), "v": torch.linspace(0.3, 7, 1000)}

    def fresh() -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in base.items()}

    canonical = fresh()
    apply_records_in_order(canonical, records, settings)
    shuffled_order = fresh()
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != records
    apply_records_in_order(shuffled_order, shuffled, settings)
    assert state_hash(shuffled_order) != state_hash(canonical)  # order changes fp32 bits
    enforced = fresh()
    apply_step(enforced, 1, shuffled, settings)  # apply_step sorts into the canonical order
    assert state_hash(enforced) == state_hash(canonical)


SNAPSHOTS = ZOLogSettings(
    samples_per_step=2,
    step_timeout_s=5.0,
    close_timeout_s=5.0,
    hash_every_steps=4,
    snapshot_every_steps=8,
)


def test_snapshot_steps_must_be_check_steps() -> None:
    with pytest.raises(ValueError, match="multiple of hash_every_steps"):
        ZOLogSettings(hash_every_steps=4, snapshot_every_steps=10)
    assert SNAPSHOTS.is_snapshot_step(16) and not SNAPSHOTS.is_snapshot_step(12)
    assert not SNAPSHOTS.is_snapshot_step(0)  # theta_0 is the base, not a new snapshot


def test_snapshots_are_agreed_at_check_steps_and_the_log_stays_bounded() -> None:
    sim = Sim(["a", "b", "c"], SNAPSHOTS)
    sizes = []
    for target in (100, 200, 300):
        sim.run(sim.all_at(target))
        sizes += [(len(n.log), len(n.chain)) for n in sim.nodes.values()]
    assert_identical(sim, 300)
    # Every node agreed every snapshot, in order, with the state it had at that step.
    for name, node in sim.nodes.items():
        agreed = sim.snapshots[name]
        assert agreed[:37] == list(range(8, 300, 8))[:37] and len(agreed) >= 36
        assert node.snapshot_step == agreed[-1] and node.log_start == agreed[-1] - 8
        assert min(node.log) == node.log_start and 0 not in node.log
    assert len({sim.candidates[n][288] for n in sim.nodes}) == 1
    # Bounded: at most two intervals, the open step and what is in flight; not 300 steps.
    assert max(log for log, _ in sizes) <= 2 * 8 + 2
    assert all(chain == log + 1 for log, chain in sizes)
    # Control: without snapshots the log keeps every step.
    plain = Sim(["a", "b", "c"], SETTINGS)
    plain.run(plain.all_at(100))
    assert len(plain.nodes["a"].log) >= 100 and not any(plain.snapshots.values())


def test_no_snapshot_is_agreed_where_a_hash_differs() -> None:
    sim = Sim(["a", "b", "c"], SNAPSHOTS)
    sim.run(sim.all_at(6))
    sim.state["c"] = b"bit flip"
    sim.run(lambda: bool(sim.resyncs["c"]))
    assert "state hash differs" in sim.resyncs["c"][0]
    assert sim.snapshots["c"] == [] and sim.nodes["c"].log_start == 0
    # a and b outvote c, but a snapshot needs every hash of the step equal: none is taken.
    assert sim.snapshots["a"] == sim.snapshots["b"] == [] and sim.nodes["a"].log_start == 0


def test_a_joiner_from_the_latest_snapshot_replays_only_the_steps_since() -> None:
    sim = Sim(["a", "b"], SNAPSHOTS)
    sim.run(sim.all_at(53))
    b = sim.nodes["b"]
    s = b.snapshot_step
    assert s == 48
    # What the shared-state sync gives the joiner: b's snapshot (revision s) and its chain
    # digest of step s - 1 (it rides with the snapshot, so the replay is authenticated).
    sim.add("z", base=(s, b.chain[s - 1], sim.candidates["b"][s]))
    sim.handle("z", sim.nodes["z"].fetch_from("b"))
    sim.run(lambda: "z" in (sim.nodes["a"].members or ()) and sim.all_at(80)())
    assert_identical(sim, 80)
    z = sim.nodes["z"]
    assert sim.applies["z"] == z.applied - s < 80 - 40  # replayed from step 48, not from 0
    assert z.parity_checks_passed >= 4 and sim.snapshots["z"][:2] == [56, 64]


def test_a_want_for_a_truncated_step_is_answered_pruned_and_the_asker_resyncs() -> None:
    sim = Sim(["a", "b"], SNAPSHOTS)
    sim.run(sim.all_at(40))
    b = sim.nodes["b"]
    assert b.log_start == 24
    sim.add("z")  # from theta_0: the steps it needs are gone
    sim.handle("z", sim.nodes["z"].fetch_from("b"))
    sim.run(lambda: bool(sim.resyncs["z"]))
    assert "no longer holds the log from step 0" in sim.resyncs["z"][0]
    assert "keeps steps from 24" in sim.resyncs["z"][0]
    # Asked from where the log still holds, b answers with the log.
    reply = b.on_message("z", {"t": "zo.want", "s": 24}, sim.now)
    assert [e for e in reply if isinstance(e, Send) and e.msg["t"] == "zo.log"]


def test_a_resync_that_replays_before_the_others_close_it_out_is_a_member_again() -> None:
    sim = Sim(["a", "b", "c"], SNAPSHOTS)
    sim.run(sim.all_at(10))
    a = sim.nodes["a"]
    # c re-syncs from the snapshot of step 8 at once (its hash differed, say): a fresh machine
    # that replays from there, quicker than a and b give up waiting for its records.
    sim.add("c", base=(8, a.chain[7], sim.candidates["c"][8]))
    sim.handle("c", sim.nodes["c"].fetch_from("a"))
    sim.run(sim.all_at(40))
    assert_identical(sim, 40)
    c = sim.nodes["c"]
    assert "c" in (a.members or ()) and c.is_member
    assert not c.joining  # it is a member; still "joining", it would never be admitted
    assert all(len(a.log[s].included) == 3 for s in range(30, 40))


def test_a_joiner_ignores_an_empty_member_list_and_reports_no_coordinator() -> None:
    """Seen in a fresh-clone run: a joiner took the member list of a peer that knew none yet
    (``m: []`` in its digest), and every ``shoal status`` then failed with a division by zero
    in ``coordinator``."""
    joiner = ZOLog("z", ZOLogSettings(), GENESIS, 0, None, 0.0)
    joiner.fetch_from("b")
    joiner.on_message("b", {"t": "zo.digest", "s": -1, "d": GENESIS, "m": []}, 0.0)
    assert joiner.members is None
    assert joiner.coordinator() is None


# ----------------------------------------------------------------------------- archive, joins


def test_a_joiner_on_theta_0_replays_the_whole_log_from_a_members_archive() -> None:
    sim = Sim(["a", "b"], SNAPSHOTS)
    sim.archived["b"] = {}  # b keeps an archive, a does not
    sim.run(sim.all_at(40))
    a, b = sim.nodes["a"], sim.nodes["b"]
    assert a.log_start == b.log_start == 24 and a.snapshot_step == 32
    sim.add("z")  # holds theta_0, nothing else
    offers = []
    for peer in ("a", "b"):
        (answer,) = sim.nodes[peer].on_message("z", {"t": "zo.ask"}, sim.now)
        assert isinstance(answer, Send) and answer.peer == "z"
        offers.append(parse_offer(peer, msgpack.unpackb(msgpack.packb(answer.msg))))
    assert offers[0].archive is None and offers[1].archive == ArchiveRange(0, 40, GENESIS)
    choice = choose_join_path(0, GENESIS, offers, max_replay_steps=1000)
    assert choice.path == "replay" and choice.donor == "b" and "reaches step 0" in choice.reason
    sim.handle("z", sim.nodes["z"].fetch_from("b"))
    sim.run(lambda: "z" in (a.members or ()) and sim.all_at(70)())
    assert_identical(sim, 70)
    z = sim.nodes["z"]
    assert sim.resyncs["z"] == [] and sim.rejected["z"] == []
    assert sim.applies["z"] == z.applied  # every step from 0: the steps a dropped, from b's disk
    assert sim.served["b"] >= 1 and b.archive_serves >= 1
    # It checked the hashes of the run as it replayed and agreed the same snapshots.
    assert sim.snapshots["z"][:3] == [8, 16, 24] and z.parity_checks_passed >= 15
    # Asked for a step before what b keeps on disk, b still says pruned (from its first step).
    b.archive = ArchiveRange(8, b.next_close, sim.archived["b"][8][1])
    reply = b.on_message("y", {"t": "zo.want", "s": 4}, sim.now)
    assert [e.msg for e in reply if isinstance(e, Send)] == [{"t": "zo.pruned", "s": 8}]


def test_archive_wants_over_a_peers_rate_are_refused_with_a_reason() -> None:
    # Each archive reply is a disk read of up to max_log_steps_per_reply steps: a peer that
    # asks far faster than anyone can replay gets its burst, then refusals, and others do not
    # pay for it.
    sim = Sim(["a", "b"], SNAPSHOTS)
    sim.archived["b"] = {}
    sim.run(sim.all_at(40))
    b = sim.nodes["b"]
    assert b.log_start == 24 and b.archive == ArchiveRange(0, 40, GENESIS)
    want = {"t": "zo.want", "s": 0}
    burst, rate = SNAPSHOTS.archive_reply_burst, SNAPSHOTS.archive_replies_per_s
    served = [b.on_message("flood", want, sim.now) for _ in range(burst)]
    assert all(isinstance(e, ServeArchive) for (e,) in served)
    [refused] = b.on_message("flood", want, sim.now)
    assert isinstance(refused, Rejected) and "archive replies per second" in refused.reason
    assert b.archive_refused == 1 and b.archive_serves == burst
    [other] = b.on_message("joiner", want, sim.now)  # another peer: its own bucket
    assert isinstance(other, ServeArchive)
    [again] = b.on_message("flood", want, sim.now + 1 / rate)  # one reply's worth refilled
    assert isinstance(again, ServeArchive)
    [refused] = b.on_message("flood", want, sim.now + 1 / rate)
    assert isinstance(refused, Rejected)


def _offer(peer: str, head: int, start: int | None, before: bytes = GENESIS) -> ArchiveOffer:
    archive = None if start is None else ArchiveRange(start, head + 1, before)
    return ArchiveOffer(peer, head, max(0, head - 150), archive)


@pytest.mark.parametrize(
    "snapshot_step, offers, max_steps, path, why",
    [
        (0, [_offer("a", 500, 0), _offer("b", 501, 0)], 1000, "replay", "b's archive reaches"),
        (0, [_offer("a", 500, 0)], 0, "snapshot", "replay is off"),
        (200, [_offer("a", 500, 0)], 1000, "snapshot", "holds the snapshot of step 200"),
        (0, [], 1000, "snapshot", "no member answered"),
        (0, [_offer("a", 500, None), _offer("b", 500, 100)], 1000, "snapshot", "reaches step 0"),
        (0, [_offer("a", 500, 0, b"x" * 16)], 1000, "snapshot", "theta_0 differs"),
        (0, [_offer("a", 5000, 0)], 1000, "snapshot", "more than zo_replay_join_max_steps"),
    ],
)
def test_the_joiner_replays_from_step_0_only_on_theta_0_and_a_full_archive(
    snapshot_step: int, offers: list[ArchiveOffer], max_steps: int, path: str, why: str
) -> None:
    choice = choose_join_path(snapshot_step, GENESIS, offers, max_steps)
    assert choice.path == path and why in choice.reason
    assert (choice.donor is not None) == (path == "replay")


def test_an_archive_that_does_not_meet_the_log_in_memory_is_no_replay_source() -> None:
    # The archive stops at step 100 (bounded, or stopped), the log in memory starts at 300.
    offer = ArchiveOffer("a", 400, 300, ArchiveRange(0, 100, GENESIS))
    assert not offer.replays_from_zero()
    assert choose_join_path(0, GENESIS, [offer], 1000).path == "snapshot"


def test_the_genesis_digest_covers_theta_0() -> None:
    assert genesis_digest("s", 0, b"1" * 16) != genesis_digest("s", 0, b"2" * 16)
    assert genesis_digest("s", 0, b"1" * 16) != genesis_digest("s", 0)


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "zo.offer", "h": "x", "l": 0, "a": None},
        {"t": "zo.offer", "h": 3, "l": 0, "a": [0, 4]},
        {"t": "zo.offer", "h": 3, "l": 0, "a": [5, 4, GENESIS]},
        {"t": "zo.offer", "h": 3, "l": 0, "a": [0, 4, b"short"]},
    ],
)
def test_malformed_offers_are_refused(msg: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_offer("a", msg)
