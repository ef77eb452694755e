"""The all-reduce across real `shoal start` processes: kills mid-round, joiners, parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.collective import expected_mean
from protocols.codec import parity_hash
from tests.daemons import Daemon, check_workload_args, swarm_of, wait_until

pytestmark = pytest.mark.slow

ELEMS = 1 << 21  # 8 MiB of float32 per member: a round spends most of its time in transfer
CHECK = check_workload_args(ELEMS)


def history(node: Daemon) -> list[dict[str, Any]]:
    return list(node.status()["allreduce"]["history"])


def completed(node: Daemon) -> dict[int, dict[str, Any]]:
    return {e["round"]: e for e in history(node) if e["outcome"] == "completed"}


def wait_for(nodes: list[Daemon], predicate: Any, timeout_s: float, what: str) -> Any:
    """wait_until, printing what every node's all-reduce did when it times out."""
    try:
        return wait_until(predicate, timeout_s, what)
    except AssertionError:
        for d in nodes:
            if d.alive:
                print("=====", d.peer_id, d.status()["allreduce"]["last"])
            print("\n".join(x for x in d.lines if "allreduce" in x or "WARN" in x)[-3000:])
        raise


def start_group(spawn: Any, n: int) -> list[Daemon]:
    boot = spawn("n0", *CHECK).wait_ready()
    nodes = [boot] + [spawn(f"n{i}", *CHECK, join=boot) for i in range(1, n)]
    for node in nodes:
        node.wait_ready()
    ids = {d.peer_id for d in nodes}

    def all_in() -> bool:
        return all(any(set(e["members"]) == ids for e in completed(d).values()) for d in nodes)

    wait_for(nodes, all_in, 90, f"a completed round with all {n} members")
    return nodes


def kill_mid_transfer(victim: Daemon) -> int:
    """SIGKILL ``victim`` just after its first ring bytes of a round arrive; return the round.

    Only a round whose start was seen counts: its bytes received at that moment are the
    baseline, so the kill lands within one status poll of the data phase's start, long before
    the victim can have reported Done. (Watching for bytes to move between two polls could
    catch the last frames of a round and kill a member that had already finished it.)
    """
    state: dict[str, int] = {}

    def data_began() -> bool:
        s = victim.status()["allreduce"]
        if s["round"] != state.get("round"):
            state["seen"] = state.get("seen", 0) + 1
            state["round"], state["base"] = s["round"], s["bytes_received"]
            return False
        return state["seen"] > 1 and s["bytes_received"] > state["base"]

    wait_until(data_began, 30, "the victim to start receiving a round's data", poll_s=0.0)
    victim.kill()
    return state["round"]


def check_survivors_finish_exactly(survivors: list[Daemon], interrupted: int) -> None:
    """The interrupted round completes with the survivors: exact mean, one abort each."""
    ids = sorted(d.peer_id for d in survivors)
    wait_for(
        survivors,
        lambda: all(
            any(e["round"] > interrupted for e in history(d)) or interrupted in completed(d)
            for d in survivors
        ),
        60,
        f"the survivors to complete round {interrupted}",
    )
    for d in survivors:  # shown when an assertion below fails
        print(
            d.peer_id[-6:],
            [
                (
                    e["round"],
                    e["outcome"],
                    [m[-6:] for m in e.get("members", [])],
                    e["aborts"],
                    e["abort_reasons"],
                )
                for e in history(d)[-4:]
            ],
        )
    missing = [d.peer_id for d in survivors if interrupted not in completed(d)]
    assert not missing, f"round {interrupted} not completed by {missing}"
    entries = [completed(d)[interrupted] for d in survivors]
    assert [sorted(e["members"]) for e in entries] == [ids] * len(survivors)
    # bit parity: one hash everywhere, and it is the exact weighted mean of the survivors
    assert len({e["hash"] for e in entries}) == 1
    assert entries[0]["hash"] == parity_hash(expected_mean(ids, interrupted, ELEMS))
    # every survivor saw exactly one abort in the round the kill interrupted
    assert [e["aborts"] for e in entries] == [1] * len(survivors), entries


@pytest.mark.parametrize("victim_rank", ["member", "coordinator"])
def test_sigkill_mid_round_survivors_finish_with_exact_mean(
    tmp_path: Path, victim_rank: str
) -> None:
    with swarm_of(tmp_path) as spawn:
        nodes = start_group(spawn, 5)
        by_id = sorted(nodes, key=lambda d: d.peer_id)
        victim = by_id[0] if victim_rank == "coordinator" else by_id[2]
        interrupted = kill_mid_transfer(victim)
        survivors = [d for d in nodes if d is not victim]
        check_survivors_finish_exactly(survivors, interrupted)


def test_joiner_is_admitted_between_rounds_and_receives_the_shared_state(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        nodes = start_group(spawn, 3)
        fetched_before = [d.status()["allreduce"]["state_fetched_bytes"] for d in nodes]
        late = spawn("late", *CHECK, join=nodes[1]).wait_ready()
        everyone = sorted(d.peer_id for d in [*nodes, late])

        def joint_round() -> int | None:
            rounds = [
                {r for r, e in completed(d).items() if sorted(e["members"]) == everyone}
                for d in [*nodes, late]
            ]
            common = set.intersection(*rounds)
            return min(common) if common else None

        first = wait_for([*nodes, late], joint_round, 60, "a round with the joiner")
        status = late.status()["allreduce"]
        assert status["state_fetched_bytes"] >= ELEMS * 4  # it received the full state
        # healthy members moved no state bytes for the newcomer's arrival
        assert [d.status()["allreduce"]["state_fetched_bytes"] for d in nodes] == fetched_before
        # it joined between rounds: its history starts with a complete round of everyone
        assert min(completed(late)) == first
        entries = [completed(d)[first] for d in [*nodes, late]]
        for d in [*nodes, late]:  # shown when an assertion below fails
            print(d.peer_id[-6:], d.status()["allreduce"]["state"], history(d)[-6:])
        assert len({e["hash"] for e in entries}) == 1
        assert len({e["state"] for e in entries}) == 1  # same shared state after the round
        assert entries[0]["hash"] == parity_hash(expected_mean(everyone, first, ELEMS))


def test_a_member_contributing_nan_is_left_out_and_nothing_hangs(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        nodes = start_group(spawn, 3)
        poisoned = spawn("nan", *CHECK, "--allreduce-check-poison", "nan", join=nodes[0])
        poisoned.wait_ready()
        # Its first round with the NaN comes after admission and the state sync, by which
        # time the honest rounds may already have gone on: wait for its reason, then for
        # rounds after it.
        wait_for(
            [*nodes, poisoned],
            lambda: any("NaN" in line for line in poisoned.lines),  # it says why, in its log
            120,
            "the poisoned member's NaN reason",
        )
        honest = sorted(d.peer_id for d in nodes)
        seen_rounds = {d.peer_id: max(completed(d), default=-1) for d in nodes}

        def honest_rounds_go_on() -> bool:
            fresh = [
                [e for r, e in completed(d).items() if r > seen_rounds[d.peer_id] + 3]
                for d in nodes
            ]
            return all(fresh) and all(sorted(e["members"]) == honest for f in fresh for e in f)

        wait_for([*nodes, poisoned], honest_rounds_go_on, 120, "rounds of the honest members")
        assert poisoned.alive
        assert completed(poisoned) == {}  # it never completed a round with its NaN
