"""Shared-seed ZO training across real ``shoal start`` processes.

One swarm for the whole module (starting torch daemons costs seconds each on 2 cores): four
members, two of them with ``ATEN_CPU_CAPABILITY=default`` and two with the machine's best, one
of them also sending bad records (``zo_fault = bad_records``), one whose weights drift once
(``zo_fault = drift``: the hash check must send it through a re-sync), plus an outsider that
is not a member and keeps sending records. The tests run in order on it: parity and loss over 500+
steps, the rejections, a member SIGKILLed mid-step, then a late joiner that holds theta_0 and
replays the whole log from step 0 (the early steps from the members' archives on disk), one
with another theta_0 that syncs the latest snapshot and replays the log since, and at last the
first late joiner SIGKILLed and restarted from its home.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from node.zo_mode import DRIFT_STEP, HOME_LOG_FILE
from tests.daemons import Daemon, swarm_of, wait_until

ZO = [
    "--train",
    "zo",
    "--zo-hash-every-steps",
    "10",
    "--zo-step-timeout-s",
    "2",
    "--zo-close-timeout-s",
    "3",
    "--zo-join-wait-s",
    "2",
    "--zo-min-members",
    "4",
    "--zo-batch-size",
    "4",
    "--zo-model",
    "nano",
    "--zo-snapshot-every-steps",
    "100",
]
STEPS = 505
SNAPSHOT_EVERY = 100  # zo_snapshot_every_steps here (default 1000): a few snapshots per test


def training(daemon: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = daemon.status()["training"]
    return result


def checks(daemon: Daemon) -> dict[int, str]:
    return {step: digest for step, digest in training(daemon)["hash_checks"]}


def assert_same_hash_at_every_common_check(daemons: list[Daemon], since: int = 0) -> int:
    tables = [checks(d) for d in daemons]
    common = sorted(set.intersection(*(set(t) for t in tables)))
    common = [s for s in common if s >= since]
    assert common, "no common hash checks"
    for step in common:
        assert len({t[step] for t in tables}) == 1, f"replicas differ at step {step}"
    return len(common)


def progress(daemons: list[Daemon]) -> str:
    rows = []
    for d in daemons:
        try:
            t = training(d)
            rows.append(
                f"{d.home.name}: {t['phase']} step {t['step']} members {len(t['members'])} "
                f"fetches {t['fetches']} resyncs {t['resyncs']} last {t['rejections'][-1:]}"
            )
        except Exception as exc:
            rows.append(f"{d.home.name}: {exc}")
    return "; ".join(rows)


def wait_for(predicate: Any, timeout_s: float, what: str, daemons: list[Daemon]) -> None:
    try:
        wait_until(predicate, timeout_s, what, poll_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {progress(daemons)}") from None


class Swarm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.members: list[Daemon] = []
        self.outsider: Daemon | None = None
        self.killed: Daemon | None = None
        self.late: Daemon | None = None


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swarm, Any]]:
    tmp = tmp_path_factory.mktemp("zo")
    with swarm_of(tmp) as spawn:
        s = Swarm(tmp)
        default = {"ATEN_CPU_CAPABILITY": "default"}
        a = spawn("a", *ZO, env=default).wait_ready()
        b = spawn("b", *ZO, join=a, env=default)
        c = spawn("c", *ZO, "--zo-fault", "drift", join=a)
        d = spawn("d", *ZO, "--zo-fault", "bad_records", join=a)
        o = spawn("o", *ZO, "--zo-fault", "outsider", join=a)
        for daemon in (b, c, d, o):
            daemon.wait_ready()
        s.members, s.outsider = [a, b, c, d], o
        yield s, spawn


def test_four_members_on_mixed_cpu_capabilities_stay_identical_and_the_loss_falls(
    swarm: tuple[Swarm, Any],
) -> None:
    s, _ = swarm
    capabilities = [training(d)["cpu_capability"] for d in s.members]
    assert capabilities[:2] == ["DEFAULT", "DEFAULT"] and "DEFAULT" not in capabilities[2:]
    wait_for(
        lambda: all(training(d)["step"] >= STEPS for d in s.members),
        240,
        f"{STEPS} steps on all four members",
        s.members,
    )
    assert assert_same_hash_at_every_common_check(s.members) >= STEPS // 10 - 2
    for daemon in s.members:
        t = training(daemon)
        assert t["parity_checks_failed"] == 0
        assert t["parity_checks_passed"] >= (STEPS - DRIFT_STEP) // 10 - 5
        assert len(t["members"]) == 4
        losses = [loss for _, loss in t["losses"]]
        assert statistics.mean(losses[-50:]) < statistics.mean(losses[:50]) - 0.3
    # c's weights were nudged after step 150: the next hash check sent it back to its snapshot,
    # it replayed the log, and its hashes (listed above, the replayed ones) match again.
    drifted = training(s.members[2])
    assert drifted["resyncs"] == 1 and "state hash differs" in drifted["resync_reasons"][0]
    assert all(training(d)["resyncs"] == 0 for d in s.members if d is not s.members[2])


def test_bad_records_are_rejected_with_a_reason_and_replicas_stay_identical(
    swarm: tuple[Swarm, Any],
) -> None:
    s, _ = swarm
    honest = s.members[:3]
    wanted = ("far-future step", "flood", "not authenticated", "is not a member")

    def seen(daemon: Daemon) -> bool:
        reasons = " | ".join(training(daemon)["rejections"])
        return all(w in reasons for w in wanted)

    # The rejections list keeps the last 50, so wait for one window that shows all four kinds.
    wait_until(lambda: all(seen(d) for d in honest), 60, "all four rejection reasons")
    assert_same_hash_at_every_common_check(s.members)
    assert all(d.alive for d in s.members)
    assert s.outsider is not None and training(s.outsider)["phase"] == "outsider"


def test_a_member_killed_mid_step_does_not_stall_the_others(swarm: tuple[Swarm, Any]) -> None:
    s, _ = swarm
    # Kill the coordinator of the open step (the hardest case: its close may be half sent).
    coordinator = training(s.members[0])["coordinator"]
    victim = next(d for d in s.members if d.peer_id == coordinator)
    survivors = [d for d in s.members if d is not victim]
    before = max(training(d)["step"] for d in survivors)
    victim.kill()
    s.killed = victim
    wait_for(
        lambda: all(training(d)["step"] >= before + 40 for d in survivors),
        90,
        "the survivors to go on after the kill",
        survivors,
    )
    for daemon in survivors:
        t = training(daemon)
        assert victim.peer_id not in t["members"] and len(t["members"]) == 3
        assert t["parity_checks_failed"] == 0
    assert assert_same_hash_at_every_common_check(survivors, since=before) >= 2
    s.members = survivors


def test_a_late_joiner_on_theta_0_replays_the_whole_log_from_the_archives(
    swarm: tuple[Swarm, Any],
) -> None:
    s, spawn = swarm
    joiner = spawn("late", *ZO, join=s.members[0]).wait_ready()
    s.late = joiner
    wait_for(
        lambda: (training(joiner).get("join") or {}).get("done"),
        90,
        "the late joiner to join",
        [*s.members, joiner],
    )
    step = training(joiner)["step"]
    wait_for(
        lambda: all(training(d)["step"] >= step + 25 for d in [*s.members, joiner]),
        60,
        "a few steps with the joiner",
        [*s.members, joiner],
    )
    assert assert_same_hash_at_every_common_check([*s.members, joiner], since=step) >= 2
    t = training(joiner)
    join = t["join"]
    # It arrived after several snapshots (every 100 steps), which the members' logs in memory
    # no longer reach back before; it holds theta_0 (same model and seed), so it replayed the
    # whole run from step 0, the early steps from a member's archive on disk: no tensor moved.
    assert join["path"] == "replay" and "reaches step 0" in join["reason"], join
    assert join["snapshot_step"] == 0 and join["snapshot_bytes"] == 0
    assert join["steps_replayed"] >= 5 * SNAPSHOT_EVERY
    # ~30 B a step (the log, catch-up rounds, live closes) against the nano model's 74 KB: the
    # 100x target is measured on the 3.3 MB tiny model in tests/bench/bench_zo.py.
    assert 0 < join["log_bytes"] < join["full_state_bytes"]
    assert join["replay_steps_per_s"] > 0 and join["replay_records_per_s"] > 0
    # Replaying, it agreed the run's snapshots itself, and its hashes since step 0 match.
    assert t["snapshots_agreed"] >= 5 and t["parity_checks_failed"] == 0
    assert assert_same_hash_at_every_common_check([*s.members, joiner]) >= 10
    donor = next(d for d in s.members if d.peer_id == join["donor"])
    assert training(donor)["archive"]["steps_served"] >= 2 * SNAPSHOT_EVERY
    assert training(joiner)["archive"]["start"] == 0
    assert len(training(s.members[0])["members"]) == 4
    # Every member's log in memory is still bounded: the steps since the snapshot before.
    for daemon in [*s.members, joiner]:
        t = training(daemon)
        assert t["log_start"] >= t["snapshot_step"] - SNAPSHOT_EVERY
        assert t["log_steps"] <= 2 * SNAPSHOT_EVERY + 10
    assert all(training(d)["snapshots_agreed"] >= 5 for d in s.members)


def test_a_joiner_with_another_theta_0_syncs_the_latest_snapshot(
    swarm: tuple[Swarm, Any],
) -> None:
    s, spawn = swarm
    # Another model seed: another theta_0, so its genesis digest is not the one the archives
    # chain from; it syncs the latest snapshot and replays only the steps since.
    other = spawn("other", *ZO, "--zo-model-seed", "1", join=s.members[0]).wait_ready()
    everyone = [*s.members, other]
    if s.late is not None:
        everyone.append(s.late)
    wait_for(
        lambda: (training(other).get("join") or {}).get("done"),
        90,
        "the joiner with another theta_0 to join",
        everyone,
    )
    step = training(other)["step"]
    wait_for(
        lambda: all(training(d)["step"] >= step + 15 for d in everyone),
        60,
        "a few steps with it",
        everyone,
    )
    assert assert_same_hash_at_every_common_check(everyone, since=step) >= 1
    join = training(other)["join"]
    assert join["path"] == "snapshot" and "theta_0 differs" in join["reason"], join
    assert join["snapshot_step"] >= 5 * SNAPSHOT_EVERY
    assert join["snapshot_bytes"] > join["full_state_bytes"] // 2
    assert 0 < join["steps_replayed"] <= 2 * SNAPSHOT_EVERY < step
    other.kill()  # the next test counts the members without it
    survivors = [d for d in everyone if d is not other]
    wait_for(
        lambda: all(other.peer_id not in training(d)["members"] for d in survivors),
        60,
        "the others to close it out",
        survivors,
    )


def test_a_member_restarted_from_its_home_resumes_from_its_saved_snapshot(
    swarm: tuple[Swarm, Any],
) -> None:
    s, _ = swarm
    node = s.late
    assert node is not None
    node.kill()  # SIGKILL: only what it wrote before survives
    saved = sorted((node.home / "zo-snapshots").glob("state-*.safetensors"))
    newest = int(saved[-1].stem.split("-")[1])
    home_log = msgpack.unpackb((node.home / HOME_LOG_FILE).read_bytes(), raw=False)
    node.start().wait_ready()
    everyone = [*s.members, node]
    wait_for(
        lambda: (training(node).get("join") or {}).get("done"),
        90,
        "the restarted node to join",
        everyone,
    )
    t = training(node)
    assert t["resumed_from"] == newest
    join = t["join"]
    if join["snapshot_step"] == newest:
        # The swarm still serves the snapshot it saved: the vote moves no tensor, and it
        # replays its own saved steps since before it fetches the rest.
        assert join["snapshot_bytes"] == 0
        if home_log["s0"] == newest:
            assert join["home_log_steps"] == len(home_log["S"]) > 0
    else:  # the swarm agreed a newer snapshot meanwhile: it fetched that one
        assert join["snapshot_step"] > newest and join["snapshot_bytes"] > 0
    step = t["step"]
    wait_for(
        lambda: all(training(d)["step"] >= step + 25 for d in everyone),
        60,
        "a few steps after the restart",
        everyone,
    )
    assert assert_same_hash_at_every_common_check(everyone, since=step) >= 2
    assert len(training(s.members[0])["members"]) == 4
