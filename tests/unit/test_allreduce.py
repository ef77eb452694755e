"""Rules of the all-reduce round machine, driven by hand: no sockets, no clock, no sleeping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from protocols.allreduce import (
    PROTOCOL_VERSION,
    Aborted,
    Admitted,
    AllReduceMember,
    AllReduceSettings,
    Completed,
    Event,
    JoinFailed,
    ParityMismatch,
    Phase,
    Rejected,
    RoundSpec,
    Send,
    Skipped,
    StartTransfer,
    TensorSpec,
    UsageError,
)
from protocols.codec import Compression

SPEC = RoundSpec((TensorSpec("w", (4, 3), "torch.float32"),), Compression.NONE)
SETTINGS = AllReduceSettings(
    ready_timeout_s=10,
    join_timeout_s=2,
    proposal_timeout_s=20,
    accept_timeout_s=5,
    coordinator_timeout_s=5,
    attempt_timeout_s=100,
)


class Group:
    """Machines plus an in-memory control network the test steps by hand."""

    def __init__(self, peers: list[str], settings: AllReduceSettings = SETTINGS) -> None:
        self.machines = {p: AllReduceMember(p, "g", peers, settings) for p in peers}
        self.wire: list[tuple[str, str, dict[str, Any]]] = []  # (sender, to, msg)
        self.events: dict[str, list[Event]] = {p: [] for p in peers}
        self.dead: set[str] = set()
        self.now = 0.0

    def add(self, machine: AllReduceMember) -> None:
        self.machines[machine.me] = machine
        self.events[machine.me] = []

    def feed(self, peer: str, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Send):
                self.wire.append((peer, event.to, event.msg))
            else:
                self.events[peer].append(event)

    def deliver(self, keep: Callable[[str, str, dict[str, Any]], bool] = lambda *_: True) -> None:
        """Deliver until quiet; ``keep`` False drops a message."""
        while self.wire:
            sender, to, msg = self.wire.pop(0)
            if to in self.dead or sender in self.dead or not keep(sender, to, msg):
                continue
            self.feed(to, self.machines[to].on_message(sender, msg, self.now))

    def begin_all(self, peers: list[str] | None = None, weights: dict[str, float] | None = None):
        for p in peers or self.live():
            weight = (weights or {}).get(p, 1.0)
            self.feed(p, self.machines[p].begin(self.now, weight, SPEC))
        self.deliver()

    def live(self) -> list[str]:
        return sorted(p for p in self.machines if p not in self.dead)

    def kill(self, peer: str, reports: int = 1) -> None:
        self.dead.add(peer)
        for _ in range(reports):
            for p in self.live():
                self.feed(p, self.machines[p].on_peer_lost(peer, self.now))
        self.deliver()

    def finish_transfers(self, hashes: dict[str, str] | None = None) -> None:
        for p in self.live():
            starts = [e for e in self.events[p] if isinstance(e, StartTransfer)]
            m = self.machines[p]
            if starts and m.phase is Phase.TRANSFER:
                last = starts[-1]
                h = (hashes or {}).get(p, "h")
                self.feed(p, m.transfer_done(last.round, last.attempt, h, self.now))
        self.deliver()

    def tick(self, dt: float) -> None:
        self.now += dt
        for p in self.live():
            self.feed(p, self.machines[p].on_timeout(self.now))
        self.deliver()

    def of(self, peer: str, kind: type) -> list[Any]:
        return [e for e in self.events[peer] if isinstance(e, kind)]


def wire(kind: str, **fields: Any) -> dict[str, Any]:
    """A control message as it travels: ``wire("ready", round=0, weight=1.0)``."""
    return {"t": f"ar.{kind}", "v": PROTOCOL_VERSION, "g": "g", **fields}


def peers(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def test_round_completes_when_every_member_reports_the_same_hash() -> None:
    g = Group(peers(4))
    g.begin_all()
    for p in g.live():
        (start,) = g.of(p, StartTransfer)
        assert start.ring == ("p0", "p1", "p2", "p3") and start.attempt == 1
    g.finish_transfers()
    for p in g.live():
        assert g.of(p, Completed) == [Completed(0, 1, ("p0", "p1", "p2", "p3"), "h")]
        assert g.machines[p].round == 1 and g.machines[p].phase is Phase.IDLE


def test_transfer_waits_until_every_member_accepted() -> None:
    g = Group(peers(3))
    g.begin_all(["p0", "p1"])  # p2 has not begun: no proposal yet
    assert not any(g.of(p, StartTransfer) for p in g.live())
    g.begin_all(["p2"])
    assert all(len(g.of(p, StartTransfer)) == 1 for p in g.live())


def test_coordinator_is_the_lowest_live_peer_id() -> None:
    g = Group(["zeta", "alpha", "mid"])
    assert {m.coordinator for m in g.machines.values()} == {"alpha"}
    g.kill("alpha")
    assert {g.machines[p].coordinator for p in g.live()} == {"mid"}


def test_exactly_one_abort_per_attempt_despite_repeated_loss_reports_and_late_aborts() -> None:
    g = Group(peers(5))
    g.begin_all()
    g.kill("p3", reports=3)  # every survivor hears of the loss three times, plus relayed aborts
    for p in g.live():
        assert [(a.round, a.attempt) for a in g.of(p, Aborted)] == [(0, 1)]
    late = wire("abort", round=0, attempt=1, reason="late")
    late["suspects"] = ["p3"]
    for p in g.live():
        assert g.machines[p].on_message("p1" if p != "p1" else "p0", late, g.now) == []
        assert g.machines[p].counters.duplicate >= 2
    # The retry runs on the survivors and completes.
    for p in g.live():
        assert g.of(p, StartTransfer)[-1].ring == ("p0", "p1", "p2", "p4")
    g.finish_transfers()
    for p in g.live():
        assert g.of(p, Completed)[0].attempt == 2
        assert len(g.of(p, Aborted)) == 1


def test_io_error_aborts_once_and_retries_without_the_suspect() -> None:
    g = Group(peers(4))
    g.begin_all()
    g.feed("p1", g.machines["p1"].on_io_error("p2", "connection reset", g.now))
    g.feed("p1", g.machines["p1"].on_io_error("p2", "connection reset", g.now))
    g.deliver()
    for p in g.live():
        assert len(g.of(p, Aborted)) == 1
    # p2 was suspected: it sits this round out; the others retry without it.
    assert g.of("p2", Skipped)
    for p in ("p0", "p1", "p3"):
        assert g.of(p, StartTransfer)[-1].ring == ("p0", "p1", "p3")


def test_stale_messages_from_an_aborted_attempt_or_past_round_are_dropped_and_counted() -> None:
    g = Group(peers(3))
    g.begin_all()
    g.kill("p2")
    m = g.machines["p1"]
    assert m.attempt == 2
    base = {"v": PROTOCOL_VERSION, "g": "g", "round": 0, "attempt": 1}
    stale = [
        {"t": "ar.done", **base, "hash": "h"},
        {"t": "ar.go", **base},
        {"t": "ar.accept", **base},
        {"t": "ar.abort", **base, "reason": "x", "suspects": []},
    ]
    before = m.counters.stale + m.counters.duplicate
    for msg in stale:
        assert m.on_message("p0", msg, g.now) == []
    assert m.counters.stale + m.counters.duplicate == before + len(stale)
    g.finish_transfers()
    assert g.of("p1", Completed)
    before = m.counters.stale
    assert m.on_message("p0", {"t": "ar.done", **base, "attempt": 2, "hash": "h"}, g.now) == []
    assert m.counters.stale == before + 1
    assert m.on_message("p0", {"t": "ar.go", **base, "attempt": 2}, g.now) == []


def test_coordinator_lost_mid_attempt_hands_over_to_the_next_lowest_id() -> None:
    g = Group(peers(4))
    g.begin_all()
    g.kill("p0")
    for p in g.live():
        assert len(g.of(p, Aborted)) == 1
        start = g.of(p, StartTransfer)[-1]
        assert start.attempt == 2 and start.ring == ("p1", "p2", "p3")
    g.finish_transfers()
    assert all(g.of(p, Completed)[0].members == ("p1", "p2", "p3") for p in g.live())


def test_coordinator_lost_before_it_proposed_hands_over_without_an_abort() -> None:
    g = Group(peers(3))
    g.begin_all(["p1", "p2"])  # waiting for p0, the coordinator
    g.kill("p0")
    assert all(len(g.of(p, StartTransfer)) == 1 for p in ("p1", "p2"))
    assert not any(g.of(p, Aborted) for p in g.live())


def test_a_proposal_for_a_later_attempt_counts_as_the_one_abort() -> None:
    g = Group(peers(3))
    g.begin_all()
    # p1 misses both the loss report and the relayed aborts; it learns from p0's proposal.
    g.dead.add("p2")
    g.feed("p0", g.machines["p0"].on_peer_lost("p2", g.now))
    g.deliver(keep=lambda s, t, msg: msg["t"] != "ar.abort")
    assert [e.reason for e in g.of("p1", Aborted)] == ["superseded by attempt 2"]
    g.feed("p1", g.machines["p1"].on_peer_lost("p2", g.now))  # the loss report comes late
    abort = wire("abort", round=0, attempt=1, reason="x")
    g.feed("p1", g.machines["p1"].on_message("p0", {**abort, "suspects": ["p2"]}, g.now))
    assert len(g.of("p1", Aborted)) == 1
    g.deliver()
    g.finish_transfers()
    assert g.of("p0", Completed) and g.of("p1", Completed)


def test_join_request_during_a_round_is_admitted_at_the_next_round() -> None:
    g = Group(peers(3))
    g.begin_all()
    joiner = AllReduceMember.joiner("p9", "g", ["p0", "p1", "p2"], SETTINGS)
    g.add(joiner)
    g.feed("p9", joiner.request_join(g.now))
    g.deliver()
    (admitted,) = g.of("p9", Admitted)
    assert admitted.round == 1 and joiner.round == 1
    g.finish_transfers()  # round 0 finishes with the three old members only
    assert all(g.of(p, Completed)[0].members == ("p0", "p1", "p2") for p in peers(3))
    g.begin_all()
    for p in g.live():
        assert g.of(p, StartTransfer)[-1].ring == ("p0", "p1", "p2", "p9")
        assert g.of(p, StartTransfer)[-1].round == 1
    g.finish_transfers()
    assert g.of("p9", Completed)[0].members == ("p0", "p1", "p2", "p9")


@pytest.mark.parametrize("size", [2, 3])
def test_a_member_of_the_attempt_that_restarts_as_a_joiner_aborts_it_at_once(size: int) -> None:
    # Seen in CI (relay carrying a pair killed): the pair's other member gave up on the round
    # and joined again, its Abort lost with the dead connection. The member that had finished
    # its transfer waited in COMMIT for a Done that never came (attempt_timeout_s, 300 s),
    # while the joiner waited for the state after that round: neither moved for minutes.
    g = Group(peers(size))
    g.begin_all()
    survivors = g.live()[:-1]
    for p in survivors:
        start = g.of(p, StartTransfer)[-1]
        g.feed(p, g.machines[p].transfer_done(start.round, start.attempt, "h", g.now))
    g.deliver(keep=lambda sender, to, msg: "p" + str(size - 1) not in (sender, to))
    assert all(g.machines[p].phase is Phase.COMMIT for p in survivors)
    restarted = AllReduceMember.joiner(g.live()[-1], "g", ["p0"], SETTINGS)
    g.add(restarted)
    g.feed(restarted.me, restarted.request_join(g.now))
    g.deliver()
    for p in survivors:
        (abort,) = g.of(p, Aborted)
        assert abort.round == 0 and abort.attempt == 1
    (admitted,) = g.of(restarted.me, Admitted)
    assert admitted.round == 1
    assert restarted.counters.rejected == 0  # the Abort it was sent is stale to a joiner
    if size == 2:  # alone, the survivor skips the round and is at round 1 for the joiner
        assert g.machines["p0"].round == 1 and g.of("p0", Skipped)
    else:  # the survivors retry without it
        g.finish_transfers()
        assert all(g.of(p, Completed)[-1].members == ("p0", "p1") for p in survivors)
        assert all(g.machines[p].round == 1 for p in survivors)
    g.begin_all()
    assert g.of("p0", StartTransfer)[-1].ring == tuple(peers(size))


def test_survivors_waiting_for_a_retry_from_a_member_that_restarted_go_on_without_it() -> None:
    g = Group(peers(3))
    g.begin_all()
    # A stall aborts attempt 1 without a suspect; p0, who would propose the retry, never
    # hears of it: it has restarted, and asks p1 to be admitted again.
    g.feed("p1", g.machines["p1"].on_io_error("p2", "stalled", g.now, blame=False))
    g.deliver(keep=lambda sender, to, msg: to != "p0")
    assert all(g.machines[p].phase is Phase.RETRY for p in ("p1", "p2"))
    restarted = AllReduceMember.joiner("p0", "g", ["p1"], SETTINGS)
    g.add(restarted)
    g.feed("p0", restarted.request_join(g.now))
    g.deliver()  # no clock tick: p1 proposes the retry at once instead of after retry timeout
    for p in ("p1", "p2"):
        assert g.of(p, StartTransfer)[-1].attempt == 2
        assert g.of(p, StartTransfer)[-1].ring == ("p1", "p2")
    assert g.of("p0", Admitted)[0].round == 1


def test_a_joiner_admitted_by_a_non_coordinator_asks_the_other_members_too() -> None:
    # Seen with 5 daemons started together: a joiner whose only contact was p1 was admitted
    # by it, then the coordinator p0, which had not heard of it, refused its Ready as from an
    # unknown sender, and it sat out rounds until it gave up and joined again (~12 s).
    g = Group(peers(2))
    joiner = AllReduceMember.joiner("p5", "g", ["p1"], SETTINGS)
    g.add(joiner)
    g.feed("p5", joiner.request_join(g.now))
    g.deliver()
    assert g.of("p5", Admitted)[0].round == 0
    assert "p5" in g.machines["p0"].pending_joins
    g.begin_all()
    assert g.of("p0", StartTransfer)[0].ring == ("p0", "p1", "p5")
    assert not g.of("p0", Rejected)


def test_join_between_rounds_takes_part_in_the_coming_round() -> None:
    g = Group(peers(2))
    joiner = AllReduceMember.joiner("p5", "g", ["p0", "p1"], SETTINGS)
    g.add(joiner)
    g.feed("p5", joiner.request_join(g.now))
    g.deliver()
    assert g.of("p5", Admitted)[0].round == 0
    g.begin_all()
    assert g.of("p0", StartTransfer)[0].ring == ("p0", "p1", "p5")


def test_members_gathering_and_a_coordinator_not_yet_begun_admit_for_the_same_round() -> None:
    # Seen as a 5 s (join_timeout_s) newcomer sync: p1 had begun round 0 and admitted the
    # joiner for round 1, p0 had not begun and admitted it for round 0. The joiner took the
    # first ack, so it fetched the state after round 0 (members answer that query only once
    # round 0 is done) while p0 waited join_timeout_s in round 0 for it.
    g = Group(peers(2))
    g.feed("p1", g.machines["p1"].begin(g.now, 1.0, SPEC))
    joiner = AllReduceMember.joiner("p5", "g", ["p1", "p0"], SETTINGS)
    g.add(joiner)
    g.feed("p5", joiner.request_join(g.now))
    g.deliver(keep=lambda sender, to, msg: msg["t"] != "ar.join" or to != "p0")  # p1's first
    (admitted,) = g.of("p5", Admitted)
    g.machines["p0"].on_message("p5", wire("join"), g.now)
    assert admitted.round == g.machines["p0"].pending_joins["p5"] == 0
    g.begin_all(["p0", "p5"])
    assert g.of("p0", StartTransfer)[0].ring == ("p0", "p1", "p5")


def test_coordinator_waits_join_timeout_for_an_admitted_joiner_then_goes_without_it() -> None:
    g = Group(peers(2))
    joiner = AllReduceMember.joiner("p5", "g", ["p0", "p1"], SETTINGS)
    g.add(joiner)
    g.feed("p5", joiner.request_join(g.now))
    g.deliver()
    g.begin_all(["p0", "p1"])  # the joiner is still syncing its state
    assert not g.of("p0", StartTransfer)
    g.tick(SETTINGS.join_timeout_s)
    assert g.of("p0", StartTransfer)[0].ring == ("p0", "p1")
    g.feed("p5", joiner.begin(g.now, 1.0, SPEC))  # too late: told to sit this round out
    g.deliver()
    assert g.of("p5", Skipped)[0].round == 0 and joiner.round == 1


def test_round_with_fewer_than_two_members_is_skipped_not_hung() -> None:
    g = Group(["solo"])
    g.begin_all()
    assert g.of("solo", Skipped) == [Skipped(0, "fewer than two members for round 0")]
    assert g.machines["solo"].round == 1 and g.machines["solo"].next_deadline() is None


def test_losing_the_only_partner_mid_transfer_aborts_once_then_skips() -> None:
    g = Group(peers(2))
    g.begin_all()
    g.kill("p1")
    assert len(g.of("p0", Aborted)) == 1
    assert g.of("p0", Skipped)[0].round == 0
    assert g.machines["p0"].phase is Phase.IDLE


def test_straggler_is_left_out_after_ready_timeout_and_told_so() -> None:
    g = Group(peers(3))
    g.begin_all(["p0", "p1"])
    g.tick(SETTINGS.ready_timeout_s - 1)
    assert not g.of("p0", StartTransfer)
    g.tick(1)
    assert g.of("p0", StartTransfer)[0].ring == ("p0", "p1")
    g.feed("p2", g.machines["p2"].begin(g.now, 1.0, SPEC))
    assert g.of("p2", Skipped) and g.machines["p2"].round == 1


def test_silent_coordinator_is_suspected_after_proposal_timeout() -> None:
    g = Group(peers(3))
    g.dead.add("p0")  # hung: nobody reports it lost
    g.begin_all(["p1", "p2"])
    g.tick(SETTINGS.proposal_timeout_s)
    assert g.of("p1", StartTransfer)[0].ring == ("p1", "p2")


def test_data_phase_stall_is_aborted_by_attempt_timeout() -> None:
    g = Group(peers(3))
    g.begin_all()
    g.tick(SETTINGS.attempt_timeout_s - 1)
    assert not any(g.of(p, Aborted) for p in g.live())
    g.tick(1)
    assert all(len(g.of(p, Aborted)) == 1 for p in g.live())
    assert all(g.of(p, StartTransfer)[-1].attempt == 2 for p in g.live())


def test_missing_accept_aborts_and_excludes_the_silent_member() -> None:
    g = Group(peers(3))
    for p in g.live():
        g.feed(p, g.machines[p].begin(g.now, 1.0, SPEC))
    g.deliver(keep=lambda s, t, msg: not (s == "p2" and msg["t"] == "ar.accept"))
    g.tick(SETTINGS.accept_timeout_s)
    assert len(g.of("p0", Aborted)) == 1
    assert g.of("p0", StartTransfer)[-1].ring == ("p0", "p1")
    assert g.of("p2", Skipped)  # told via the relayed abort that it was suspected


def test_missing_go_aborts_after_coordinator_timeout() -> None:
    g = Group(peers(3))
    for p in g.live():
        g.feed(p, g.machines[p].begin(g.now, 1.0, SPEC))
    g.deliver(keep=lambda s, t, msg: not (t == "p2" and msg["t"] == "ar.go"))
    g.tick(SETTINGS.accept_timeout_s + SETTINGS.coordinator_timeout_s - 1)
    assert not any(g.of(p, Aborted) for p in g.live())  # the others are in the data phase
    g.tick(1)
    assert all(len(g.of(p, Aborted)) == 1 for p in g.live())
    # p2 blamed the coordinator: p0 sits the round out and p1 coordinates the retry.
    assert g.of("p0", Skipped)
    assert g.of("p2", StartTransfer)[-1].ring == ("p1", "p2")


def test_repeated_failures_give_up_after_max_attempts() -> None:
    settings = AllReduceSettings(max_attempts=2)
    g = Group(peers(3), settings)
    g.begin_all()
    for _ in range(2):
        g.tick(settings.attempt_timeout_s)
    assert all(g.of(p, Skipped) for p in g.live())
    assert all(len(g.of(p, Aborted)) == 2 for p in g.live())


def test_different_result_hashes_are_a_parity_error_and_abort_the_attempt() -> None:
    g = Group(peers(3))
    g.begin_all()
    g.finish_transfers({"p0": "h", "p1": "h", "p2": "other"})
    assert all(g.of(p, ParityMismatch) for p in g.live())
    assert all(len(g.of(p, Aborted)) == 1 for p in g.live())
    assert not any(g.of(p, Completed) for p in g.live())


def test_member_that_finished_completes_when_a_done_peer_dies_afterwards() -> None:
    g = Group(peers(3))
    g.begin_all()
    g.finish_transfers()
    assert all(g.of(p, Completed) for p in g.live())
    g.kill("p2")  # after the round: nothing to abort
    assert not any(g.of(p, Aborted) for p in g.live())


def test_spec_mismatch_is_refused_and_the_others_retry_without_it() -> None:
    g = Group(peers(3))
    other = RoundSpec(SPEC.tensors, Compression.UINT8)
    g.feed("p0", g.machines["p0"].begin(g.now, 1.0, SPEC))
    g.feed("p1", g.machines["p1"].begin(g.now, 1.0, SPEC))
    g.feed("p2", g.machines["p2"].begin(g.now, 1.0, other))
    g.deliver()
    assert "spec" in g.of("p2", Skipped)[0].reason
    assert g.of("p0", StartTransfer)[-1].ring == ("p0", "p1")


def test_begin_out_of_order_is_a_usage_error() -> None:
    g = Group(peers(2))
    g.begin_all()
    with pytest.raises(UsageError):
        g.machines["p0"].begin(g.now, 1.0, SPEC)
    with pytest.raises(ValueError):
        AllReduceMember("x", "g", ["y"]).begin(0.0, float("nan"), SPEC)


GOOD_PROPOSAL = wire(
    "propose",
    round=0,
    attempt=1,
    members=["p0", "p1"],
    weights=[1.0, 1.0],
    spec=[["w", [4, 3], "torch.float32"]],
    codec="none",
    chunk_elems=16,
    proposer="p0",
)


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (["not", "a", "map"], "expected a map"),
        ({**GOOD_PROPOSAL, "v": PROTOCOL_VERSION + 1}, "version"),
        ({**GOOD_PROPOSAL, "g": "other"}, "group"),
        ({**GOOD_PROPOSAL, "t": "ar.nope"}, "unknown message type"),
        ({k: v for k, v in GOOD_PROPOSAL.items() if k != "round"}, "missing"),
        ({**GOOD_PROPOSAL, "round": True}, "integer"),
        ({**GOOD_PROPOSAL, "round": -1}, "integer"),
        ({**GOOD_PROPOSAL, "attempt": "1"}, "integer"),
        ({**GOOD_PROPOSAL, "weights": [1.0, float("nan")]}, "finite"),
        ({**GOOD_PROPOSAL, "weights": [1.0]}, "as long as"),
        ({**GOOD_PROPOSAL, "members": ["p0", "p0"]}, "repeats"),
        ({**GOOD_PROPOSAL, "members": ["p0"], "weights": [1.0]}, "two members"),
        ({**GOOD_PROPOSAL, "members": [f"p{i}" for i in range(300)]}, "more than"),
        ({**GOOD_PROPOSAL, "members": ["p0", "x" * 500]}, "peer id"),
        ({**GOOD_PROPOSAL, "codec": "zip"}, "codec"),
        ({**GOOD_PROPOSAL, "spec": [["w", [4, -3], "f"]]}, "shape"),
        ({**GOOD_PROPOSAL, "spec": [["w", [1] * 20, "f"]]}, "shape"),
        ({**GOOD_PROPOSAL, "spec": "w"}, "spec"),
        ({**GOOD_PROPOSAL, "chunk_elems": 0}, "chunk_elems"),
        (
            wire("abort", round=0, attempt=1, reason="x" * 9999, suspects=[]),
            "exceeds",
        ),
        (
            wire("done", round=0, attempt=1, hash=7),
            "string",
        ),
        (wire("ready", round=0, weight=-1.0), ">= 0"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(msg: object, reason: str) -> None:
    m = AllReduceMember("p1", "g", ["p0", "p1"], SETTINGS)
    m.begin(0.0, 1.0, SPEC)
    events = m.on_message("p0", msg, 0.0)
    assert len(events) == 1 and isinstance(events[0], Rejected)
    assert reason in events[0].reason
    assert m.phase is Phase.GATHERING and m.counters.rejected == 1


def test_unknown_sender_is_rejected() -> None:
    m = AllReduceMember("p1", "g", ["p0", "p1"], SETTINGS)
    m.begin(0.0, 1.0, SPEC)
    (event,) = m.on_message("intruder", GOOD_PROPOSAL, 0.0)
    assert isinstance(event, Rejected) and "unknown sender" in event.reason
    assert m.phase is Phase.GATHERING


def test_proposal_sent_by_someone_else_than_its_proposer_is_rejected() -> None:
    m = AllReduceMember("p1", "g", ["p0", "p1", "p2"], SETTINGS)
    m.begin(0.0, 1.0, SPEC)
    (event,) = m.on_message("p2", {**GOOD_PROPOSAL, "members": ["p1", "p2"], "proposer": "p1"}, 0.0)
    assert isinstance(event, Rejected) and "its own proposer" in event.reason


def test_proposer_must_be_a_member_of_its_proposal() -> None:
    m = AllReduceMember("p1", "g", ["p0", "p1", "p2"], SETTINGS)
    m.begin(0.0, 1.0, SPEC)
    (event,) = m.on_message("p2", {**GOOD_PROPOSAL, "proposer": "p2"}, 0.0)
    assert isinstance(event, Rejected) and "one of its members" in event.reason


def test_an_existing_coordinator_proposes_a_round_with_a_lower_id_joiner() -> None:
    # p5 coordinates {p5, p7}; joiner p1 (lower id) is admitted for round 1 and readies.
    m = AllReduceMember("p7", "g", ["p5", "p7"], SETTINGS)
    m.begin(0.0, 1.0, SPEC)
    proposal = {
        **GOOD_PROPOSAL,
        "members": ["p1", "p5", "p7"],
        "weights": [1.0, 1.0, 1.0],
        "proposer": "p5",
    }
    (event,) = m.on_message("p5", proposal, 0.0)
    assert isinstance(event, Send) and event.msg["t"] == "ar.accept"


def test_a_good_proposal_is_accepted() -> None:
    m = AllReduceMember("p1", "g", ["p0", "p1"], SETTINGS)
    m.begin(0.0, 1.0, SPEC)
    (event,) = m.on_message("p0", GOOD_PROPOSAL, 0.0)
    assert isinstance(event, Send) and event.msg["t"] == "ar.accept"
    assert m.phase is Phase.ACCEPTED


def test_proposal_with_a_wrong_weight_is_refused() -> None:
    m = AllReduceMember("p1", "g", ["p0", "p1"], SETTINGS)
    m.begin(0.0, 2.0, SPEC)
    events = m.on_message("p0", GOOD_PROPOSAL, 0.0)
    assert isinstance(events[0], Send) and events[0].msg["t"] == "ar.refuse"
    assert isinstance(events[1], Skipped) and "weight" in events[1].reason


def test_a_lost_done_is_asked_for_again_so_nobody_aborts_what_others_completed() -> None:
    g = Group(peers(3))
    g.begin_all()
    for p in g.live():
        start = g.of(p, StartTransfer)[-1]
        g.feed(p, g.machines[p].transfer_done(start.round, start.attempt, "h", g.now))
    g.deliver(keep=lambda s, t, msg: not (s == "p1" and t == "p0" and msg["t"] == "ar.done"))
    assert g.of("p1", Completed) and g.of("p2", Completed)
    assert not g.of("p0", Completed) and g.machines["p0"].phase is Phase.COMMIT
    g.tick(SETTINGS.coordinator_timeout_s)  # p0 asks p1, which answers from its record
    assert g.of("p0", Completed) == g.of("p1", Completed)
    assert not any(g.of(p, Aborted) for p in g.live())


def test_a_member_that_left_the_attempt_answers_a_done_ask_with_an_abort() -> None:
    # p1's transfer fails and it aborts, but its Abort to p0 is lost; alone, it skips the
    # round. p0 finished its transfer and waits for p1's Done: asked for it, p1 says abort,
    # instead of leaving p0 in COMMIT until attempt_timeout_s.
    g = Group(peers(2))
    g.begin_all()
    g.feed("p1", g.machines["p1"].on_io_error("p0", "connection reset", g.now))
    g.deliver(keep=lambda sender, to, msg: msg["t"] != "ar.abort")
    assert g.of("p1", Skipped) and g.machines["p1"].round == 1
    start = g.of("p0", StartTransfer)[-1]
    g.feed("p0", g.machines["p0"].transfer_done(start.round, start.attempt, "h", g.now))
    g.deliver()
    assert g.machines["p0"].phase is Phase.COMMIT
    g.tick(SETTINGS.coordinator_timeout_s)  # p0 asks p1 for its Done
    (abort,) = g.of("p0", Aborted)
    assert "did not complete" in abort.reason
    assert g.of("p0", Skipped) and g.machines["p0"].round == 1
    assert not g.of("p0", Completed)


def test_an_aborted_attempt_is_never_vouched_for_with_a_done() -> None:
    # p1 finished its transfer, then heard p2's Abort; p0 heard neither (lost). Asked by p0,
    # p1 must not send its Done of the aborted attempt: p0 would complete what p1 retries.
    g = Group(peers(3))
    g.begin_all()
    for p in ("p0", "p1"):
        start = g.of(p, StartTransfer)[-1]
        g.feed(p, g.machines[p].transfer_done(start.round, start.attempt, "h", g.now))
    g.deliver(keep=lambda sender, to, msg: to != "p0" and sender != "p2")
    abort = wire("abort", round=0, attempt=1, reason="stalled", suspects=[])
    g.feed("p1", g.machines["p1"].on_message("p2", abort, g.now))
    g.feed("p2", g.machines["p2"].on_io_error("p1", "stalled", g.now, blame=False))
    g.wire.clear()  # the retry proposal and the Aborts never reach p0 either
    assert g.machines["p0"].phase is Phase.COMMIT
    ask = wire("done", round=0, attempt=1, hash="h", ask=True)
    (reply,) = g.machines["p1"].on_message("p0", ask, g.now)
    assert isinstance(reply, Send) and reply.msg["t"] == "ar.abort"
    (event,) = g.machines["p0"].on_message("p1", reply.msg, g.now)[:1]
    assert isinstance(event, Aborted) and not g.of("p0", Completed)
    assert g.machines["p0"].attempt == 2  # the lowest id proposes the retry at once


def test_done_asks_do_not_ping_pong_between_completed_members() -> None:
    g = Group(peers(2))
    g.begin_all()
    g.finish_transfers()
    ask = wire("done", round=0, attempt=1, hash="h", ask=True)
    (reply,) = g.machines["p1"].on_message("p0", ask, g.now)
    assert isinstance(reply, Send) and reply.msg["ask"] is False
    assert g.machines["p0"].on_message("p1", reply.msg, g.now) == []


def test_abort_from_a_peer_outside_the_attempt_is_ignored() -> None:
    g = Group(peers(3))
    g.begin_all(["p0", "p1"])
    g.tick(SETTINGS.ready_timeout_s)  # p2 never got ready: the attempt is p0 + p1
    assert g.of("p1", StartTransfer)[-1].ring == ("p0", "p1")
    abort = wire("abort", round=0, attempt=1, reason="rival")
    assert g.machines["p1"].on_message("p2", {**abort, "suspects": ["p0"]}, g.now) == []
    assert g.machines["p1"].phase is Phase.TRANSFER


def test_a_member_left_two_rounds_behind_skips_and_says_so() -> None:
    g = Group(peers(3))
    m = g.machines["p2"]
    ready = wire("ready", weight=1.0)
    # one round ahead is normal (a fast member begins the next round): kept, not a skip
    assert m.on_message("p0", {**ready, "round": 1}, g.now) == []
    assert m.left_behind_at is None
    # two rounds ahead: the group ran a round without p2, so p2's round is skipped
    g.feed("p2", m.begin(g.now, 1.0, SPEC))
    [skipped] = m.on_message("p0", {**ready, "round": 2}, g.now)
    assert isinstance(skipped, Skipped) and "left behind" in skipped.reason
    assert m.left_behind_at == 2 and m.round == 1
    # idle when the news comes: the next round is skipped at once when it begins
    assert m.on_message("p1", {**ready, "round": 4}, g.now) == []
    assert m.phase is Phase.IDLE
    [skipped] = [e for e in m.begin(g.now, 1.0, SPEC) if isinstance(e, Skipped)]
    assert "p1 is at round 4" in skipped.reason
    # a non-member's word is not evidence
    outsider = AllReduceMember("q", "g", ["q"], SETTINGS)
    [rejected] = outsider.on_message("p0", {**ready, "round": 9}, g.now)
    assert isinstance(rejected, Rejected) and outsider.left_behind_at is None


def joiner_known_only_to_p4(g: Group) -> AllReduceMember:
    """Joiner p3, admitted by p4 with an ack that names only p4 (sent while p2 was itself
    still a joiner there), so p3 takes itself for the coordinator."""
    joiner = AllReduceMember.joiner("p3", "g", ["p4"], SETTINGS)
    joiner.request_join(g.now)
    g.machines["p4"].on_message("p3", wire("join"), g.now)
    [admitted] = joiner.on_message("p4", wire("join_ack", round=0, members=["p4"]), g.now)
    assert isinstance(admitted, Admitted) and joiner.coordinator == "p3"
    return joiner


def test_a_member_of_an_attempt_answers_a_ready_from_outside_it_whoever_proposed() -> None:
    # Seen with 5 daemons started together: p4 admitted joiner p3 while p2 was still a joiner
    # there, so its ack named only p4. p3, the lowest id it knew, took itself for the
    # coordinator; its Ready reached only p4, in an attempt p2 had proposed, which said
    # nothing: p3 waited out ready_timeout_s (10 s) before it moved on.
    g = Group(["p2", "p4"])
    joiner = joiner_known_only_to_p4(g)
    g.begin_all()
    assert g.machines["p4"].phase is Phase.TRANSFER
    assert g.of("p4", StartTransfer)[-1].ring == ("p2", "p4")
    [ready] = joiner.begin(g.now, 1.0, SPEC)
    assert isinstance(ready, Send) and ready.to == "p4"
    [answer] = g.machines["p4"].on_message("p3", ready.msg, g.now)
    assert (
        isinstance(answer, Send)
        and answer.to == "p3"
        and "not part of round 0" in answer.msg["reason"]
    )
    [skipped] = joiner.on_message("p4", answer.msg, g.now)
    assert isinstance(skipped, Skipped) and "not part of round 0" in skipped.reason
    assert joiner.round == 1 and joiner.left_behind_at is None  # one round on: it may catch up


def test_a_member_tells_the_peers_whose_ready_it_holds_that_an_attempt_leaves_them_out() -> None:
    # The same joiner, its Ready early this time: p4 holds it while gathering, p2 (which never
    # heard of p3) proposes without it, and p4 has to say so when the proposal comes.
    g = Group(["p2", "p4"])
    joiner = joiner_known_only_to_p4(g)
    g.add(joiner)
    g.begin_all(["p4", "p3"])
    assert g.machines["p4"].phase is Phase.GATHERING and joiner.phase is Phase.GATHERING
    g.begin_all(["p2"])
    assert g.of("p4", StartTransfer)[-1].ring == ("p2", "p4")
    [skipped] = g.of("p3", Skipped)
    assert "excluded by p4: not part of round 0" in skipped.reason and joiner.round == 1


def test_an_excluded_from_two_rounds_on_says_the_member_was_left_behind() -> None:
    ready = wire("ready", round=0, weight=1.0)
    for ahead, left_behind in ((1, None), (2, 2), (7, 7)):
        member = AllReduceMember("p3", "g", ["p3", "p4"], SETTINGS)
        other = AllReduceMember("p4", "g", ["p3", "p4"], SETTINGS, first_round=ahead)
        [over] = other.on_message("p3", ready, 0.0)
        assert isinstance(over, Send) and over.msg["at"] == ahead
        member.begin(0.0, 1.0, SPEC)
        [skipped] = member.on_message("p4", over.msg, 0.0)
        assert isinstance(skipped, Skipped) and "already over" in skipped.reason
        assert member.left_behind_at == left_behind, ahead
    # a peer outside the view is no evidence
    outsider = AllReduceMember("q", "g", ["q", "p4"], SETTINGS)
    outsider.view.discard("p4")
    outsider.pending_joins["p4"] = 0
    outsider.on_message("p4", over.msg, 0.0)
    assert outsider.left_behind_at is None


def test_a_founder_alone_with_its_own_joiners_is_not_left_out() -> None:
    # A founder skipping rounds alone ("fewer than two members") while its just-admitted
    # joiners still fetch the shared state (longer than join_timeout_s on a loaded machine)
    # took their "member" presence for a group gone on without it, left, and joined again:
    # the joiners were left with a founder that was gone.
    founder = AllReduceMember("p0", "g", ["p0"], SETTINGS)
    for joiner in ("p1", "p2"):
        [ack] = founder.on_message(joiner, wire("join"), 0.0)
        assert isinstance(ack, Send) and ack.msg["t"] == "ar.join_ack"
    assert founder.begin(0.0, 1.0, SPEC) == []  # it waits join_timeout_s for its joiners
    [skipped] = founder.on_timeout(SETTINGS.join_timeout_s)
    assert isinstance(skipped, Skipped) and "fewer than two" in skipped.reason
    assert founder.left_out_by(["p1", "p2"]) is False
    # a member it never heard of is a group without it
    assert founder.left_out_by(["p1", "q"]) is True
    # so is a member it knows that does not wait to be taken in (it went on elsewhere)
    member = AllReduceMember("p3", "g", ["p3", "p4"], SETTINGS)
    assert member.left_out_by(["p4"]) is True
    assert member.left_out_by([]) is False


def test_a_joiner_whose_contacts_die_or_stay_silent_gives_up() -> None:
    # A newcomer whose contacts were killed before they admitted it used to wait forever.
    joiner = AllReduceMember.joiner("q", "g", ["p0", "p1"], SETTINGS)
    assert len(joiner.request_join(0.0)) == 2
    assert joiner.on_peer_lost("p0", 0.1) == []  # one contact left: keep asking it
    [failed] = joiner.on_peer_lost("p1", 0.2)
    assert isinstance(failed, JoinFailed) and "every contact" in failed.reason
    assert joiner.next_deadline() is None
    # contacts alive but silent (e.g. joining again themselves): give up after join_requests
    silent = AllReduceMember.joiner("q", "g", ["p0"], SETTINGS)
    events = silent.request_join(0.0)
    now = 0.0
    while not any(isinstance(e, JoinFailed) for e in events):
        deadline = silent.next_deadline()
        assert deadline is not None
        now = deadline
        events = silent.on_timeout(now)
    assert now == SETTINGS.join_requests * SETTINGS.join_timeout_s
    assert silent.next_deadline() is None


def test_a_joiner_that_is_not_ready_holds_up_one_round_only() -> None:
    # A newcomer whose state fetch failed stayed admitted and silent, and the coordinator
    # waited join_timeout_s for it in every round.
    g = Group(peers(2))
    joiner = AllReduceMember.joiner("p5", "g", ["p0", "p1"], SETTINGS)
    g.add(joiner)
    g.feed("p5", joiner.request_join(g.now))
    g.deliver()
    g.dead.add("p5")  # silent from now on (its messages are not delivered)
    g.begin_all(["p0", "p1"])
    assert not g.of("p0", StartTransfer)
    g.tick(SETTINGS.join_timeout_s)  # round 0 waited for it once
    g.finish_transfers()
    assert g.of("p0", Completed)[0].members == ("p0", "p1")
    g.begin_all(["p0", "p1"])  # round 1 goes at once, without waiting for it again
    assert [s.round for s in g.of("p0", StartTransfer)] == [0, 1]
    # the joiner is still admitted: a Ready in time makes it part of a round
    g.dead.discard("p5")
    g.finish_transfers()
    ready = wire("ready", round=2, weight=1.0)
    g.feed("p0", g.machines["p0"].on_message("p5", ready, g.now))
    proposed: list[list[str]] = []

    def watch(sender: str, to: str, msg: dict[str, Any]) -> bool:
        if msg["t"] == "ar.propose":
            proposed.append(msg["members"])
        return to != "p5"  # (p5's machine here stayed at round 0; only p0's rule is tested)

    for p in ("p0", "p1"):
        g.feed(p, g.machines[p].begin(g.now, 1.0, SPEC))
    g.deliver(keep=watch)
    assert sorted(proposed[0]) == ["p0", "p1", "p5"]
