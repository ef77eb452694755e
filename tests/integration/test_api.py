"""node.api.Communicator: what a torch training script uses, three nodes in one process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from node.api import Communicator, CommunicatorError

pytestmark = pytest.mark.slow

FAST = {
    "listen": ["/ip4/127.0.0.1/tcp/0"],
    "heartbeat_s": "0.3",
    "record_ttl_s": "4",
    "allreduce_join_wait_s": "1",
}


def on_every_node(fn: Callable[[int], None], n: int = 3) -> None:
    """Run ``fn(i)`` for every node at once, as each worker's training loop would."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_all_reduce_and_shared_state_through_the_python_api(tmp_path: Path) -> None:
    first = Communicator(tmp_path / "a", **FAST)
    first.connect()
    join = [first.status()["addrs"][0]]
    others = [Communicator(tmp_path / name, join=join, **FAST) for name in ("b", "c")]
    comms = [first, *others]
    try:
        for comm in others:
            comm.connect()
        ids = sorted(c.peer_id for c in comms)
        tensors = [
            {"g": torch.full((1000,), float(i + 1)), "h": torch.arange(10.0) * i} for i in range(3)
        ]
        weights = [1.0, 2.0, 5.0]

        infos: list = [None] * 3

        def call(i: int) -> None:
            infos[i] = comms[i].all_reduce(tensors[i], weight=weights[i])

        # every member of a round calls all_reduce; the first calls may be skipped while the
        # joiners are still being admitted: repeat until a round with all three completes
        for _ in range(20):
            on_every_node(call)
            if all(info.completed and sorted(info.members) == ids for info in infos):
                break
            tensors = [
                {"g": torch.full((1000,), float(i + 1)), "h": torch.arange(10.0) * i}
                for i in range(3)
            ]
        assert all(info.completed and sorted(info.members) == ids for info in infos)
        expected_g = (1 * 1.0 + 2 * 2.0 + 5 * 3.0) / 8.0
        for t in tensors:
            assert torch.equal(t["g"], torch.full((1000,), expected_g, dtype=torch.float32))
            assert t["h"].numpy().tobytes() == tensors[0]["h"].numpy().tobytes()  # bit parity
        assert len({info.result_hash for info in infos}) == 1

        states = [{"w": torch.ones(500)}, {"w": torch.zeros(500)}, {"w": torch.ones(500)}]
        fetched = [0, 0, 0]

        def sync(i: int) -> None:
            fetched[i] = comms[i].sync_shared_state(states[i], revision=5)

        on_every_node(sync)
        assert all(torch.equal(s["w"], torch.ones(500)) for s in states)  # the popular state won
        assert fetched[0] == fetched[2] == 0 and fetched[1] == 500 * 4
        assert first.status()["allreduce"]["rounds_done"] >= 1
    finally:
        for comm in comms:
            comm.close()
    with pytest.raises(CommunicatorError, match="not connected"):
        first.all_reduce({"g": torch.zeros(3)})
