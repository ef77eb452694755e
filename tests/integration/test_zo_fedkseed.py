"""FedKSeed mode across two real daemons: K candidate seeds fixed per run, seeds picked by
accumulated scalar (weighted sampling), replicas and the K accumulated scalars identical,
also across the snapshots (every 30 steps here), where the scalars restart from zero."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.daemons import swarm_of, wait_until
from tests.integration.test_zo import ZO, assert_same_hash_at_every_common_check, training

K = 16


def test_fedkseed_replicas_and_their_k_scalars_stay_identical(tmp_path: Path) -> None:
    args = [*ZO, "--zo-min-members", "2", "--zo-fedkseed-k", str(K)]
    args += ["--zo-seed-sampling", "weighted", "--zo-snapshot-every-steps", "30"]
    with swarm_of(tmp_path) as spawn:
        a = spawn("a", *args).wait_ready()
        b = spawn("b", *args, join=a).wait_ready()
        wait_until(lambda: all(training(d)["step"] >= 70 for d in (a, b)), 120, "70 steps")
        assert assert_same_hash_at_every_common_check([a, b]) >= 6
        assert all(training(d)["snapshot_step"] >= 60 for d in (a, b))  # two rebases behind

        def same_step() -> tuple[dict[str, Any], dict[str, Any]] | None:
            ka, kb = training(a)["fedkseed"], training(b)["fedkseed"]  # lockstep: often equal
            return (ka, kb) if ka["step"] == kb["step"] else None

        ka, kb = wait_until(same_step, 30, "both nodes' scalars at the same step", poll_s=0.01)
        assert ka["k"] == kb["k"] == K and ka["seeds_used"] > 1
        assert ka["scalars_digest"] == kb["scalars_digest"]

        # A joiner starts from the latest snapshot with zero scalars, as the members restarted
        # theirs there: its weighted seed choices and its replicas match theirs. (Replay from
        # theta_0, which a joiner holding it takes by default, is tested in test_zo.py.)
        c = spawn("c", *args, "--zo-replay-join-max-steps", "0", join=a).wait_ready()
        wait_until(lambda: (training(c).get("join") or {}).get("done"), 90, "c to join")
        join = training(c)["join"]
        assert join["snapshot_step"] >= 60 and join["snapshot_bytes"] > 0
        step = training(c)["step"]
        wait_until(lambda: all(training(d)["step"] >= step + 15 for d in (a, b, c)), 60, "steps")
        assert assert_same_hash_at_every_common_check([a, b, c], since=join["snapshot_step"]) >= 2
