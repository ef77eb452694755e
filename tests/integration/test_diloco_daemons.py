"""DiLoCo across real `shoal start --train diloco` processes: loss, parity, kills, joiners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.daemons import Daemon, swarm_of, wait_until

pytestmark = pytest.mark.slow

TRAIN = [
    "--train",
    "diloco",
    "--diloco-inner-steps",
    "8",
    "--diloco-threads",
    "1",
    "--diloco-corpus-bytes",
    "1000000",
    "--diloco-eval-batches",
    "4",
    "--allreduce-join-wait-s",
    "2",
]


def training(node: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = node.status()["training"]
    return result


def completed(node: Daemon) -> dict[int, dict[str, Any]]:
    """Completed rounds by the revision they produced."""
    return {e["revision"]: e for e in training(node)["history"] if e["outcome"] == "completed"}


def wait_for(nodes: list[Daemon], predicate: Any, timeout_s: float, what: str) -> Any:
    try:
        return wait_until(predicate, timeout_s, what, poll_s=0.2)
    except AssertionError:
        for d in nodes:
            if d.alive:
                t = training(d)
                print("=====", d.peer_id, t["phase"], t["error"], t["history"][-3:])
            print("\n".join(x for x in d.lines if "diloco" in x or "WARN" in x)[-3000:])
        raise


def rounds_with(nodes: list[Daemon], count: int) -> bool:
    """Every node completed ``count`` rounds in which exactly ``nodes`` were the members."""
    ids = sorted(d.peer_id for d in nodes)
    return all(
        sum(sorted(e["members"]) == ids for e in completed(d).values()) >= count for d in nodes
    )


def assert_same_global_params(nodes: list[Daemon]) -> set[int]:
    """For every revision all ``nodes`` completed, one state hash; returns those revisions."""
    histories = [completed(d) for d in nodes]
    common = set.intersection(*(set(h) for h in histories))
    assert common, "no revision completed by every node"
    for revision in sorted(common):
        hashes = {h[revision]["hash"] for h in histories}
        assert len(hashes) == 1, f"revision {revision}: global params differ: {hashes}"
    return common


def start_swarm(spawn: Any, n: int, *extra: str) -> list[Daemon]:
    boot = spawn("n0", *TRAIN, *extra).wait_ready()
    nodes = [boot] + [spawn(f"n{i}", *TRAIN, *extra, join=boot) for i in range(1, n)]
    for node in nodes:
        node.wait_ready()
    return nodes


def test_three_daemons_train_eval_loss_falls_and_global_params_match_every_round(
    tmp_path: Path,
) -> None:
    with swarm_of(tmp_path) as spawn:
        nodes = start_swarm(spawn, 3)
        wait_for(nodes, lambda: rounds_with(nodes, 4), 150, "4 rounds of all three")
        # the node answers status within a second while its inner steps run in the thread
        wait_until(lambda: training(nodes[1])["phase"] == "inner", 30, "inner steps", poll_s=0)
        assert nodes[1].control("status", timeout_s=1.0)["training"]["phase"] == "inner"
        revisions = assert_same_global_params(nodes)
        assert len(revisions) >= 4
        shown = nodes[0].cli("status").stdout  # what a user reads
        assert "diloco tiny" in shown and "eval loss" in shown and "tokens/s" in shown
        for node in nodes:
            t = training(node)
            evals = [e["eval_loss"] for e in t["history"] if e["eval_loss"] is not None]
            assert t["initial_eval_loss"] is not None and evals
            assert evals[-1] < t["initial_eval_loss"] - 0.5, (t["initial_eval_loss"], evals)
            assert t["bytes_total"] > 0 and t["bytes_last_round"] > 0
            assert t["tokens_per_s"] > 0 and t["inner_step"] >= 4 * 8
            assert sorted(t["members"]) == sorted(d.peer_id for d in nodes)


def test_worker_killed_in_inner_steps_and_a_joiner_mid_run(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        nodes = start_swarm(spawn, 3)
        wait_for(nodes, lambda: rounds_with(nodes, 2), 150, "2 rounds of all three")
        victim = nodes[2]
        wait_until(
            lambda: (
                training(victim)["phase"] == "inner" and training(victim)["round_inner_step"] >= 1
            ),
            30,
            "the victim to be in its inner steps",
            poll_s=0,
        )
        interrupted = training(victim)["round"]
        victim.kill()
        survivors = nodes[:2]
        ids = sorted(d.peer_id for d in survivors)

        def survivors_completed() -> dict[int, dict[str, Any]] | None:
            rounds = [
                {e["round"]: e for e in completed(d).values() if sorted(e["members"]) == ids}
                for d in survivors
            ]
            return rounds[0] if interrupted in rounds[0] and interrupted in rounds[1] else None

        # the round the victim was training for completes with the other two, same params
        wait_for(survivors, survivors_completed, 90, f"round {interrupted} of the survivors")
        assert_same_global_params(survivors)

        late = spawn("late", *TRAIN, join=nodes[0]).wait_ready()
        everyone = [*survivors, late]
        wait_for(everyone, lambda: rounds_with(everyone, 1), 120, "a round with the joiner")
        first = min(
            r
            for r, e in completed(late).items()
            if sorted(e["members"]) == sorted(d.peer_id for d in everyone)
        )
        # after its first round the joiner holds the very global state the others hold
        hashes = {completed(d)[first]["hash"] for d in everyone}
        assert len(hashes) == 1, hashes
        assert late.status()["allreduce"]["state_fetched_bytes"] > 0


def test_a_restarted_node_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        alone = spawn("solo", *TRAIN, "--diloco-checkpoint-every", "2").wait_ready()
        wait_until(
            lambda: (
                training(alone)["last_checkpoint"] is not None and training(alone)["revision"] >= 4
            ),
            90,
            "a checkpoint after 4 outer steps",
        )
        alone.kill()  # SIGKILL: only what was written before survives
        saved = sorted((tmp_path / "solo" / "checkpoints").glob("state-*.safetensors"))
        newest = int(saved[-1].stem.split("-")[1])
        # second life: no periodic checkpoint comes due, so one written is the stop's own
        alone.args += ["--diloco-checkpoint-every", "1000"]
        alone.start().wait_ready()
        wait_until(lambda: training(alone)["history"], 60, "a round after the restart")
        t = training(alone)
        assert t["resumed_revision"] == newest
        assert t["history"][0]["revision"] == newest + 1
        seen = t["revision"]
        assert alone.terminate() == 0  # SIGTERM: graceful, without waiting for the round
        saved = sorted((tmp_path / "solo" / "checkpoints").glob("state-*.safetensors"))
        assert int(saved[-1].stem.split("-")[1]) >= seen > newest


def test_overlapped_rounds_keep_the_global_params_identical(tmp_path: Path) -> None:
    # one-round-delayed updates overshoot with outer momentum 0.9 (README): momentum 0 here
    overlapped = ["--diloco-overlapped", "true", "--diloco-outer-momentum", "0"]
    with swarm_of(tmp_path) as spawn:
        nodes = start_swarm(spawn, 2, *overlapped)
        wait_for(nodes, lambda: rounds_with(nodes, 4), 150, "4 overlapped rounds of both")
        assert len(assert_same_global_params(nodes)) >= 4
        for node in nodes:
            t = training(node)
            assert t["overlapped"]
            evals = [e["eval_loss"] for e in t["history"] if e["eval_loss"] is not None]
            assert evals[-1] < t["initial_eval_loss"] - 0.5, (t["initial_eval_loss"], evals)


def test_a_time_budget_ends_rounds_and_members_weigh_in_by_their_tokens(tmp_path: Path) -> None:
    # H far beyond what fits in 2 s: every round ends on the clock, after however many steps
    # each node managed; the all-reduce weighs each pseudo-gradient by its tokens
    budget = ["--diloco-inner-steps", "10000", "--diloco-round-time-s", "2"]
    with swarm_of(tmp_path) as spawn:
        nodes = start_swarm(spawn, 2, *budget)
        wait_for(nodes, lambda: rounds_with(nodes, 3), 150, "3 timed rounds of both")
        assert len(assert_same_global_params(nodes)) >= 3
        for node in nodes:
            steps = [e["inner_steps"] for e in completed(node).values()]
            assert all(1 <= s < 10000 for s in steps), steps


def test_a_missing_data_folder_is_reported_and_the_node_keeps_running(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        node = spawn("bad", *TRAIN, "--diloco-data", str(tmp_path / "no-such-folder"))
        node.wait_ready()
        wait_until(lambda: training(node)["phase"] == "error", 60, "the training error")
        assert "no-such-folder" in training(node)["error"]
        assert "is not a file or a folder" in node.cli("status").stdout
        assert node.alive and node.status()["allreduce"] is None
