"""End-to-end all-reduce on simulated members in one process, with injected faults.

Each test runs on trio's autojump clock: timeouts fire as soon as everything waits, so a
stall costs no wall-clock time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import trio
import trio.testing

from protocols.allreduce import AllReduceSettings, Completed, Skipped, UsageError
from protocols.codec import Compression, tensor_bytes
from protocols.shared_state import SharedState
from protocols.simnet import (
    ControlRule,
    FaultPlan,
    RoundResult,
    RunnerSettings,
    SimSwarm,
    StateSyncSettings,
)

SETTINGS = AllReduceSettings(chunk_elems=16)
NAMES = ("bias", "weight")


def integer_inputs(peers: list[str], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Small integers: every float32 partial sum is exact, so any order gives one answer."""
    g = torch.Generator().manual_seed(seed)
    return {
        p: {
            "weight": torch.randint(-20, 20, (9, 13), generator=g).float(),
            "bias": torch.randint(-20, 20, (31,), generator=g).float(),
        }
        for p in peers
    }


def weighted_mean(
    inputs: dict[str, dict[str, torch.Tensor]], weights: dict[str, float], members: list[str]
) -> dict[str, torch.Tensor]:
    total = torch.tensor(math.fsum(weights[p] for p in members), dtype=torch.float32)
    out = {}
    for name in NAMES:
        numerator = sum(weights[p] * inputs[p][name].double() for p in members)
        out[name] = numerator.float() / total  # exact numerator, one float32 division
    return out


def clone(inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {p: {k: v.clone() for k, v in t.items()} for p, t in inputs.items()}


def as_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(tensor_bytes(tensors[n]) for n in NAMES)


@dataclass
class RoundRun:
    swarm: SimSwarm
    inputs: dict[str, dict[str, torch.Tensor]]
    weights: dict[str, float]
    buffers: dict[str, dict[str, torch.Tensor]]  # each member's tensors after the round
    results: dict[str, RoundResult]


async def run_round(
    peers: list[str],
    faults: FaultPlan | None = None,
    compression: Compression = Compression.NONE,
    inputs: dict[str, dict[str, torch.Tensor]] | None = None,
    runner_settings: RunnerSettings | None = None,
) -> RoundRun:
    inputs = inputs or integer_inputs(peers)
    weights = {p: float(i + 1) for i, p in enumerate(peers)}
    buffers = clone(inputs)
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, faults, SETTINGS, runner_settings)
        swarm.start(peers)
        results = await swarm.allreduce_all(buffers, weights, compression)
        nursery.cancel_scope.cancel()
    return RoundRun(swarm, inputs, weights, buffers, results)


async def test_round_without_faults_gives_every_member_the_same_exact_mean(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(5)]
    run = await run_round(peers)
    expected = weighted_mean(run.inputs, run.weights, peers)
    for p in peers:
        assert isinstance(run.results[p].outcome, Completed) and run.results[p].aborts == ()
        assert as_bytes(run.buffers[p]) == as_bytes(expected)


async def test_whole_buffer_work_in_worker_threads_gives_the_same_exact_mean() -> None:
    # The real clock: on the autojump clock, time would jump while the threads work.
    peers = [f"p{i}" for i in range(3)]
    with trio.fail_after(30):
        run = await run_round(peers, runner_settings=RunnerSettings(thread_min_elems=1))
    expected = weighted_mean(run.inputs, run.weights, peers)
    for p in peers:
        assert isinstance(run.results[p].outcome, Completed)
        assert as_bytes(run.buffers[p]) == as_bytes(expected)


async def test_rounds_of_one_size_reuse_the_working_buffer_also_after_a_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(4)]
    weights = {p: 1.0 for p in peers}
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, FaultPlan(kill_after_frames={"p3": 6}), SETTINGS)
        swarm.start(peers)
        first = await swarm.allreduce_all(clone(integer_inputs(peers, 1)), weights)
        assert all(isinstance(r.outcome, Completed) for r in first.values())
        assert sorted(first) == peers[:3] and all(r.aborts for r in first.values())
        kept = {p: swarm.members[p].runner._workspace for p in peers[:3]}
        assert all(isinstance(w, bytearray) for w in kept.values())
        survivors = peers[:3]
        inputs = clone(integer_inputs(survivors, 2))
        second = await swarm.allreduce_all(inputs, {p: 1.0 for p in survivors})
        for p in survivors:
            assert isinstance(second[p].outcome, Completed) and second[p].aborts == ()
            assert swarm.members[p].runner._workspace is kept[p]  # same size: reused
        expected = weighted_mean(integer_inputs(survivors, 2), weights, survivors)
        assert as_bytes(inputs["p0"]) == as_bytes(expected)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("compression", list(Compression))
async def test_every_codec_gives_byte_identical_results(
    compression: Compression, autojump_clock: trio.testing.MockClock
) -> None:
    peers = [f"p{i}" for i in range(4)]
    g = torch.Generator().manual_seed(3)
    inputs = {p: {n: torch.randn(57, generator=g) for n in NAMES} for p in peers}
    run = await run_round(peers, None, compression, inputs)
    assert len({as_bytes(run.buffers[p]) for p in peers}) == 1
    assert len({r.outcome.result_hash for r in run.results.values()}) == 1
    w = run.weights
    exact = sum(w[p] * run.inputs[p]["bias"].double() for p in peers) / sum(w.values())
    assert float((run.buffers["p0"]["bias"].double() - exact).abs().max()) < 0.1


@pytest.mark.parametrize("n", [4, 5, 6])
async def test_member_killed_mid_transfer_survivors_get_the_mean_of_survivors(
    n: int, autojump_clock: trio.testing.MockClock
) -> None:
    peers = [f"p{i}" for i in range(n)]
    victim = "p2"
    faults = FaultPlan(kill_after_frames={victim: 4})  # dies sending its 4th tensor frame
    run = await run_round(peers, faults)
    survivors = [p for p in peers if p != victim]
    assert run.swarm.net.frames_sent[victim] == 4  # it did send: killed mid-transfer, not before
    assert sorted(run.results) == survivors
    expected = weighted_mean(run.inputs, run.weights, survivors)
    for p in survivors:
        outcome = run.results[p].outcome
        assert isinstance(outcome, Completed) and outcome.members == tuple(survivors)
        assert as_bytes(run.buffers[p]) == as_bytes(expected)
        assert len(run.results[p].aborts) == 1
    assert run.swarm.aborts_seen() == {p: 1 for p in survivors}


async def test_coordinator_killed_mid_transfer_survivors_finish_under_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(5)]
    faults = FaultPlan(kill_after_frames={"p0": 3})
    run = await run_round(peers, faults)
    survivors = peers[1:]
    expected = weighted_mean(run.inputs, run.weights, survivors)
    assert run.swarm.aborts_seen() == {p: 1 for p in survivors}
    for p in survivors:
        assert as_bytes(run.buffers[p]) == as_bytes(expected)
        assert run.results[p].outcome.attempt == 2
    # The retry was proposed by p1, the lowest surviving id.
    proposals = [(s, t) for s, t, kind in run.swarm.net.control_log if kind == "ar.propose"]
    assert {s for s, _ in proposals[-3:]} == {"p1"}


async def test_member_killed_while_reporting_done_does_not_undo_the_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Killed at the commit phase: its data is already in every survivor's result."""
    peers = [f"p{i}" for i in range(4)]
    faults = FaultPlan(
        control_rules=[ControlRule("kill_sender", sender="p2", kind="ar.done")],
        loss_notice_delay_s=1.0,  # loss detection takes a moment: others finish their ring
    )
    run = await run_round(peers, faults)
    survivors = ["p0", "p1", "p3"]
    assert sorted(run.results) == survivors
    expected = weighted_mean(run.inputs, run.weights, peers)  # p2's contribution included
    for p in survivors:
        assert run.results[p].outcome.members == tuple(peers)
        assert as_bytes(run.buffers[p]) == as_bytes(expected)
        assert run.results[p].aborts == ()


async def test_member_killed_at_accept_is_retried_around(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(4)]
    faults = FaultPlan(control_rules=[ControlRule("kill_sender", sender="p3", kind="ar.accept")])
    run = await run_round(peers, faults)
    survivors = ["p0", "p1", "p2"]
    expected = weighted_mean(run.inputs, run.weights, survivors)
    for p in survivors:
        assert as_bytes(run.buffers[p]) == as_bytes(expected)
        assert len(run.results[p].aborts) == 1


async def test_abort_leaves_no_trace_in_the_callers_buffers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two of three die: the last one skips the round and keeps its input untouched."""
    peers = ["p0", "p1", "p2"]
    faults = FaultPlan(kill_after_frames={"p1": 2, "p2": 2})
    run = await run_round(peers, faults)
    outcome = run.results["p0"].outcome
    assert isinstance(outcome, Skipped)
    assert as_bytes(run.buffers["p0"]) == as_bytes(run.inputs["p0"])
    attempts = [(a.round, a.attempt) for a in run.results["p0"].aborts]
    assert attempts and len(set(attempts)) == len(attempts)  # at most one abort per attempt


async def test_stalled_member_is_detected_by_timeouts_and_left_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(4)]
    faults = FaultPlan(stall_after_frames={"p3": 2})  # hangs; nobody is told
    start = trio.current_time()
    run = await run_round(peers, faults, runner_settings=RunnerSettings(io_timeout_s=5.0))
    survivors = peers[:3]
    assert sorted(run.results) == survivors
    assert trio.current_time() - start >= 5.0  # it took the io timeout to notice
    expected = weighted_mean(run.inputs, run.weights, survivors)
    for p in survivors:
        assert run.results[p].outcome.members == tuple(survivors)
        assert as_bytes(run.buffers[p]) == as_bytes(expected)
        # Attempt 1 stalls (nobody blamed); attempt 2 finds p3 silent; attempt 3 completes.
        assert [(a.round, a.attempt) for a in run.results[p].aborts] == [(0, 1), (0, 2)]


async def test_nan_contribution_is_left_out_and_others_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(4)]
    inputs = integer_inputs(peers)
    inputs["p1"]["bias"][5] = math.nan
    run = await run_round(peers, inputs=inputs)
    assert isinstance(run.results["p1"].outcome, Skipped)
    others = ["p0", "p2", "p3"]
    expected = weighted_mean(run.inputs, run.weights, others)
    for p in others:
        assert as_bytes(run.buffers[p]) == as_bytes(expected)


async def test_dropped_go_and_duplicated_messages_still_end_in_one_agreed_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = [f"p{i}" for i in range(4)]
    faults = FaultPlan(
        control_rules=[
            ControlRule("drop", to="p3", kind="ar.go"),
            ControlRule("duplicate", kind="ar.accept", times=10),
            ControlRule("duplicate", kind="ar.done", times=10),
            ControlRule("delay", kind="ar.ready", delay_s=1.0, times=2),
        ]
    )
    run = await run_round(peers, faults)
    finished = [p for p, r in run.results.items() if isinstance(r.outcome, Completed)]
    assert len(finished) >= 3
    assert len({as_bytes(run.buffers[p]) for p in finished}) == 1
    members = list(run.results[finished[0]].outcome.members)
    expected = weighted_mean(run.inputs, run.weights, members)
    assert as_bytes(run.buffers[finished[0]]) == as_bytes(expected)
    assert all(len(run.results[p].aborts) == 1 for p in peers)


async def test_joiner_during_a_round_is_admitted_next_round_with_the_shared_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = ["p0", "p1", "p2", "p3"]
    params = {"w": torch.arange(2000.0), "m": torch.ones(3, 3)}
    states = {p: SharedState({k: v.clone() for k, v in params.items()}, 0) for p in peers}
    weights = {p: 1.0 for p in [*peers, "p9"]}
    log: dict[str, object] = {}

    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, None, SETTINGS)
        swarm.start(peers, states)

        async def member_rounds(p: str) -> None:
            runner = swarm.members[p].runner
            state = swarm.members[p].state_sync.state
            for _ in range(2):
                grad = {"w": torch.full((2000,), float(runner.machine.round + 1))}
                result = await runner.allreduce(grad, weights[p])
                assert isinstance(result.outcome, Completed)
                log[f"{p}.r{result.outcome.round}"] = result.outcome.members
                new_w = state.tensors["w"] - grad["w"]
                state.update({"w": new_w}, state.revision + 1)
                swarm.members[p].state_sync.mark_round(runner.machine.round)

        async def joiner() -> None:
            # Ask to join once round 0 is in its data phase (checkpoints only: no time passes).
            while swarm.net.frames_sent.get("p0", 0) < 3:
                await trio.sleep(0)
            member = swarm.start_joiner("p9", peers)
            admitted = await member.runner.join()
            log["admitted"] = admitted.round
            fetched = await member.state_sync.sync(list(admitted.members), admitted.round, True)
            log["fetched"] = fetched
            state = member.state_sync.state
            log["joiner_state"] = state.summary()
            grad = {"w": torch.full((2000,), float(admitted.round + 1))}
            result = await member.runner.allreduce(grad, weights["p9"])
            log[f"p9.r{result.outcome.round}"] = result.outcome.members

        async with trio.open_nursery() as rounds:
            for p in peers:
                rounds.start_soon(member_rounds, p)
            rounds.start_soon(joiner)
        nursery.cancel_scope.cancel()

    assert log["admitted"] == 1
    assert all(log[f"{p}.r0"] == tuple(peers) for p in peers)  # round 0: old members only
    assert all(log[f"{p}.r1"] == (*peers, "p9") for p in peers)  # round 1: the joiner too
    assert log["p9.r1"] == (*peers, "p9")
    # The joiner fetched the state after round 0, all of it; the old members fetched nothing.
    after_round_0 = SharedState({"w": params["w"] - 1.0, "m": params["m"]}, 1).summary()
    assert log["joiner_state"] == after_round_0
    assert log["fetched"] == 2000 * 4 + 9 * 4
    assert all(swarm.members[p].state_sync.state.bytes_fetched == 0 for p in peers)


@pytest.mark.parametrize("round_index", [0, 5])
async def test_newcomers_syncing_together_abstain_instead_of_answering_for_each_other(
    autojump_clock: trio.testing.MockClock, round_index: int
) -> None:
    # Seen with 5 daemons started together: newcomers admitted at once asked each other for
    # a summary too. For a later round a newcomer answered only once its own sync was over,
    # so every sync waited out summary_timeout_s (and the rounds it was admitted for went
    # by); for round 0 it answered at once with its empty state, and 3 newcomers outvoted the
    # one member that held the state.
    held = SharedState({"w": torch.arange(100.0)}, 3)
    names = ("p7", "p8", "p9")
    took: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, None, SETTINGS)
        swarm.start(["p0"], {"p0": held})
        swarm.members["p0"].state_sync.mark_round(round_index)
        newcomers = {p: swarm.start_joiner(p, ["p0"]) for p in names}

        async def sync(p: str) -> None:
            t0 = trio.current_time()
            await newcomers[p].state_sync.sync(["p0", *names], round_index, True)
            took[p] = trio.current_time() - t0

        async with trio.open_nursery() as together:
            for p in names:
                together.start_soon(sync, p)
        nursery.cancel_scope.cancel()
    assert all(t < StateSyncSettings().summary_timeout_s / 2 for t in took.values()), took
    for m in newcomers.values():
        assert m.state_sync.state.summary() == held.summary()
        plan = m.state_sync.last_plan
        assert plan is not None and plan.holders == ("p0",)  # the newcomers did not vote


@pytest.mark.parametrize("seed", range(12))
async def test_random_faults_over_several_rounds_keep_every_invariant(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    """Random kills (mid-transfer or at Accept/Done), drops and duplicates, three rounds.

    Whatever happens: no member hangs, no member sees two aborts for one attempt, every
    member that completes a round holds exactly the weighted mean of that round's members,
    a member that does not complete keeps its input, and no survivor loses two rounds.
    """
    g = torch.Generator().manual_seed(seed)
    peers = [f"p{i}" for i in range(5)]

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    victims = [pick(peers), pick(peers)]
    faults = FaultPlan(
        kill_after_frames={victims[0]: int(torch.randint(1, 30, (1,), generator=g))},
        control_rules=[
            ControlRule("kill_sender", sender=victims[1], kind=pick(["ar.accept", "ar.done"])),
            ControlRule("drop", kind=pick(["ar.ready", "ar.accept", "ar.go", "ar.done"])),
            ControlRule("duplicate", kind=pick(["ar.propose", "ar.abort", "ar.done"]), times=3),
        ],
    )
    rounds = 3
    inputs = {
        (r, p): {
            "weight": torch.randint(-20, 20, (9, 13), generator=g).float(),
            "bias": torch.randint(-20, 20, (31,), generator=g).float(),
        }
        for r in range(rounds)
        for p in peers
    }
    weights = {p: float(torch.randint(1, 5, (1,), generator=g)) for p in peers}
    finished: dict[tuple[int, str], tuple[Completed, bytes]] = {}

    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, faults, SETTINGS)
        swarm.start(peers)

        async def member(p: str) -> None:
            runner = swarm.members[p].runner
            while runner.machine.round < rounds:
                r = runner.machine.round
                buffers = {k: v.clone() for k, v in inputs[(r, p)].items()}
                result = await runner.allreduce(buffers, weights[p])
                if isinstance(result.outcome, Completed):
                    finished[(r, p)] = (result.outcome, as_bytes(buffers))
                else:
                    assert as_bytes(buffers) == as_bytes(inputs[(r, p)])  # untouched

        async with trio.open_nursery() as members:
            for p in peers:
                members.start_soon(swarm.run_in_member, p, lambda p=p: member(p))
        nursery.cancel_scope.cancel()

    for p in peers:
        attempts = [(a.round, a.attempt) for a in swarm.members[p].runner.aborts]
        assert len(attempts) == len(set(attempts)), f"{p} saw an attempt aborted twice"
    for r in range(rounds):
        done = {p: v for (rr, p), v in finished.items() if rr == r}
        if not done:
            continue
        outcomes = {outcome for outcome, _ in done.values()}
        assert len(outcomes) == 1, f"round {r}: members disagree: {outcomes}"
        (outcome,) = outcomes
        members_inputs = {p: inputs[(r, p)] for p in outcome.members}
        expected = as_bytes(weighted_mean(members_inputs, weights, list(outcome.members)))
        assert all(data == expected for _, data in done.values())
    assert finished, "no round completed at all"
    # Liveness: a fault costs a surviving member at most one round.
    for p in peers:
        if swarm.net.alive(p):
            assert sum(1 for r, q in finished if q == p) >= rounds - 1, p


async def test_runner_refuses_bad_calls_before_they_reach_the_protocol(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        swarm = SimSwarm(nursery, None, SETTINGS)
        swarm.start(["p0", "p1"])
        joiner = swarm.start_joiner("p9", ["p0", "p1"])
        tensors = {"x": torch.zeros(3)}
        with pytest.raises(ValueError, match="weight"):
            await swarm.members["p0"].runner.allreduce(tensors, math.nan)
        with pytest.raises(UsageError, match="admission"):
            await joiner.runner.allreduce(tensors, 1.0)
        nursery.cancel_scope.cancel()
