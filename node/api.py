"""A blocking Python API for torch training scripts: an in-process shoal node.

Compare PCCL's ``Communicator``: connect, see the topology, sync shared state, all-reduce with
retry. The node (libp2p host, membership, bulk channels, the all-reduce group) runs on a trio
event loop in a background thread; each call hands its work to that loop and blocks until it
is done, so the caller's training loop stays ordinary synchronous torch code::

    from node.api import Communicator

    comm = Communicator(home="/tmp/worker-1", join=["/ip4/10.0.0.5/tcp/4150/p2p/12D3KooW..."])
    comm.connect()                              # joins the swarm and its all-reduce group
    fetched = comm.sync_shared_state({"w": model_weights}, revision=step)  # in place
    info = comm.all_reduce({"grad": grads}, weight=tokens_seen)           # in place
    if info.completed: ...                      # weighted mean, bit-identical on every member
    comm.close()                                # graceful leave

Joiners are admitted between rounds automatically (there is no explicit update_topology:
``members()`` tells who is in the group now). A round whose attempts fail is retried with the
survivors inside ``all_reduce``; with fewer than two members it is skipped (``completed`` is
False and the tensors are unchanged).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio

from node.collective import AllReduceGroup
from node.config import load_config
from node.daemon import Node
from node.identity import load_or_create_seed
from protocols.allreduce import Completed
from protocols.codec import Compression

CONNECT_TIMEOUT_S = 120.0


class CommunicatorError(RuntimeError):
    """The communicator cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class RoundInfo:
    completed: bool
    round: int
    attempt: int
    members: tuple[str, ...]
    result_hash: str
    aborts: int
    reason: str = ""


class Communicator:
    """An in-process shoal node that a training script drives with blocking calls."""

    def __init__(self, home: str | Path, **config: Any) -> None:
        flags = {"allreduce_workload": "api", **config}
        self.config = load_config(Path(home), env={}, flags=flags)
        self._node: Node | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def peer_id(self) -> str:
        return self._require_node().peer_id

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Start the node, join the swarm and the group; return once this node is a member."""
        if self._thread is not None:
            raise CommunicatorError("already connected")
        self.config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = load_or_create_seed(self.config.key_path)
        self._node = Node(self.config, seed, on_ready=lambda _: None)
        self._thread = threading.Thread(target=self._run, name="shoal-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise CommunicatorError(f"node did not start within {timeout_s} s")
        if self._error is not None:
            raise CommunicatorError(f"node failed to start: {self._error}") from self._error
        self._call(self._wait_member, timeout_s)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            assert self._node is not None
            await self._node.run()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the caller of the next call
            self._error = exc
            self._ready.set()

    async def _wait_member(self, timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            while self._node is None or self._node.group is None:
                await trio.sleep(0.05)
            await self._node.group.wait_member()

    def members(self) -> list[str]:
        """The peer ids of the all-reduce group as this node sees it now."""
        group = self._group()
        runner = group.runner
        return [] if runner is None else sorted(runner.machine.view)

    def all_reduce(
        self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0, compression: str = "none"
    ) -> RoundInfo:
        """Weighted mean of ``tensors`` across the group, in place (see the module doc)."""
        for name, tensor in tensors.items():
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise CommunicatorError(f"tensor {name!r} must be a contiguous CPU tensor")
        group = self._group()
        result = self._call(group.allreduce, tensors, float(weight), Compression(compression))
        outcome = result.outcome
        if isinstance(outcome, Completed):
            return RoundInfo(
                True,
                outcome.round,
                outcome.attempt,
                outcome.members,
                outcome.result_hash,
                len(result.aborts),
            )
        return RoundInfo(False, outcome.round, 0, (), "", len(result.aborts), outcome.reason)

    def sync_shared_state(self, tensors: dict[str, torch.Tensor], revision: int) -> int:
        """Make ``tensors`` (in place) and ``revision`` the group's most popular shared state.

        A healthy member moves no tensor bytes; a member that differs fetches only the tensors
        that differ from a donor. Returns the bytes fetched.
        """
        group = self._group()
        fetched: int = self._call(group.sync_shared_state, tensors, revision)
        return fetched

    def status(self) -> dict[str, Any]:
        """The same object as ``shoal status --json``."""
        return self._require_node().status()

    def close(self) -> None:
        """Leave the swarm gracefully and stop the node's thread."""
        if self._node is None or self._token is None:
            return
        node = self._node
        trio.from_thread.run_sync(node.request_stop, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(node.config.leave_timeout_s + 10)
        self._node = self._token = self._thread = None

    def __enter__(self) -> Communicator:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _require_node(self) -> Node:
        if self._node is None or self._token is None:
            raise CommunicatorError("not connected: call connect() first")
        if self._error is not None:
            raise CommunicatorError(f"the node stopped: {self._error}") from self._error
        return self._node

    def _group(self) -> AllReduceGroup:
        group = self._require_node().group
        if group is None:
            raise CommunicatorError("this node runs no all-reduce group")
        return group

    def _call(self, fn: Any, *args: Any) -> Any:
        self._require_node()
        return trio.from_thread.run(fn, *args, trio_token=self._token)
