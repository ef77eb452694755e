"""The node's all-reduce group: the sans-IO round machine driven over real links.

``NetTransport`` gives ``protocols.simnet.RoundRunner`` what it needs from the network:
control messages over the node's control links, tensor bytes over bulk channels (tags mapped
to the channel's u64 tags so that a whole aborted attempt can be discarded by prefix).
``AllReduceGroup`` owns the runner, the shared-state sync, the counters that ``shoal status``
shows, and (for ``allreduce_workload = "check"``) a loop of back-to-back rounds on
deterministic inputs whose exact weighted mean any test can recompute.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from net.bulk_frames import BulkError
from net.bulk_peers import BulkPeers, BulkUnavailable
from net.links import ControlLinks
from protocols.allreduce import (
    AllReduceMember,
    AllReduceSettings,
    Completed,
    JoinFailed,
    Skipped,
)
from protocols.codec import Compression
from protocols.shared_state import SharedState, SharedStateError
from protocols.simnet import RoundResult, RoundRunner, RunnerSettings, StateSync, TransportError

log = logging.getLogger("shoal.node.allreduce")

_ATTEMPT_TAG = re.compile(r"^(.*\.r\d+\.a\d+)\.(.+)$")
HISTORY_ROUNDS = 200


def _h32(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def bulk_tag(tag: str) -> int:
    """The u64 bulk tag of a string tag: high half names the attempt, low half the transfer."""
    match = _ATTEMPT_TAG.match(tag)
    prefix, rest = (match.group(1), match.group(2)) if match else ("", tag)
    return (_h32(prefix) << 32) | _h32(rest)


class NetTransport:
    """``protocols.simnet.Transport`` over control links and bulk channels.

    Control messages go through one queue and one sending task per peer: the round machine
    never waits on a slow or unreachable peer (a connection to a peer being dialed can take
    seconds), order per peer is kept, and a failed send is reported as that peer's loss.
    """

    def __init__(
        self,
        links: ControlLinks,
        bulk: BulkPeers,
        io_timeout_s: float,
        nursery: trio.Nursery,
        on_send_failure: Callable[[str, str], None],
    ) -> None:
        self.links = links
        self.bulk = bulk
        self.io_timeout_s = io_timeout_s
        self.nursery = nursery
        self.on_send_failure = on_send_failure
        self._queues: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}

    async def send_control(self, peer: str, msg: dict[str, Any]) -> None:
        queue = self._queues.get(peer)
        if queue is None:
            queue, outbox = trio.open_memory_channel[dict[str, Any]](math.inf)
            self._queues[peer] = queue
            self.nursery.start_soon(self._drain, peer, outbox)
        queue.send_nowait(msg)

    async def _drain(self, peer: str, outbox: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        async for msg in outbox:
            if not await self.links.send(peer, msg):
                if self._queues.get(peer) is not None:
                    del self._queues[peer]
                self.on_send_failure(peer, "control link down")
                return

    async def send_tensor(self, peer: str, tag: str, data: bytes | bytearray | memoryview) -> None:
        try:
            channel = await self.bulk.get(peer)
            await channel.send(bulk_tag(tag), data)
        except (BulkError, BulkUnavailable) as exc:
            raise TransportError(peer, f"bulk send: {exc}") from None

    async def recv_tensor(
        self, peer: str, tag: str, into: memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        try:
            channel = await self.bulk.get(peer)
            if into is None:
                # the channel's fresh bytearray, not a copy (the ring only reads it)
                return await channel.receive(bulk_tag(tag), timeout_s=self.io_timeout_s)
            # decrypted straight into `into` when the receive is posted before the transfer
            # arrives; a transfer of another length is the sender's error
            await channel.receive(bulk_tag(tag), into, timeout_s=self.io_timeout_s)
            return into
        except (BulkError, BulkUnavailable) as exc:
            raise TransportError(peer, f"bulk receive: {exc}") from None

    def discard_tensors(self, tag_prefix: str) -> None:
        high = _h32(tag_prefix)
        for channel in list(self.bulk.channels.values()):
            discard = getattr(channel, "discard", None)
            if discard is not None:
                discard(lambda tag: tag >> 32 == high)


def check_tensor(peer_id: str, round_index: int, elems: int) -> torch.Tensor:
    """A member's input of a check round: integers in [-1000, 1000] as float32.

    Integer inputs and integer weights keep every partial sum exact in float32, so the ring's
    result is the exact weighted mean, one rounding, whatever the ring order.
    """
    seed = int.from_bytes(
        hashlib.blake2b(f"{peer_id}/{round_index}".encode(), digest_size=8).digest()
    )
    gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randint(-1000, 1001, (elems,), generator=gen, dtype=torch.int32).to(torch.float32)


def check_weight(peer_id: str) -> float:
    """A member's weight in check rounds: 1 to 4, from its peer id."""
    return float(1 + _h32(peer_id) % 4)


def expected_mean(members: list[str], round_index: int, elems: int) -> torch.Tensor:
    """The exact weighted mean of ``members``' check inputs (what every member must hold)."""
    acc = torch.zeros(elems, dtype=torch.float64)
    total = 0.0
    for peer in members:
        acc += check_weight(peer) * check_tensor(peer, round_index, elems).double()
        total += check_weight(peer)
    return acc.float() / torch.tensor(total, dtype=torch.float32)


@dataclass(frozen=True)
class GroupSettings:
    workload: str = "none"
    check_elems: int = 1 << 16
    compression: str = "none"
    io_timeout_s: float = 10.0
    join_wait_s: float = 10.0
    skip_backoff_s: float = 0.5
    group_poll_s: float = 0.1
    rejoin_after_skips: int = 3
    check_poison: str = "none"  # fault injection for tests: "nan" contributes a NaN
    round_timeouts: AllReduceSettings = field(default_factory=AllReduceSettings)


class AllReduceGroup:
    """This node's member of the swarm's all-reduce group."""

    def __init__(
        self,
        me: str,
        group: str,
        transport: NetTransport,
        settings: GroupSettings,
        peers: Callable[[], dict[str, str]],
        link_costs: Callable[[], dict[tuple[str, str], float]] = dict,
        may_found: Callable[[], bool] = lambda: True,
    ) -> None:
        self.me = me
        self.group = group
        self.transport = transport
        self.settings = settings
        self.peers = peers  # peer id -> "waiting" | "member", from the presence records
        self.link_costs = link_costs  # measured (a, b) -> seconds, to order the ring
        self.may_found = may_found  # False while a node told to join a swarm is not in it yet
        self.phase = "waiting"
        self.runner: RoundRunner | None = None
        self.sync: StateSync | None = None
        self.state = SharedState()
        self.rounds_done = 0
        self.aborted = 0
        self.retried = 0
        self.skipped = 0
        self.fetched_bytes = 0
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_ROUNDS)
        self.last: dict[str, Any] | None = None
        self._member = trio.Event()
        self._rejoin = trio.Event()

    # -- driver side -------------------------------------------------------------------------

    def on_control(self, sender: str, message: dict[str, Any]) -> None:
        if self.runner is not None:
            self.runner.deliver_control(sender, message)

    def on_peer_lost(self, peer: str) -> None:
        if self.runner is not None:
            self.runner.deliver_peer_lost(peer)

    async def run(self) -> None:
        """Join (or found) the group, serve it, and run the configured workload.

        A member that falls out of the group (its rounds keep being skipped because the
        others moved on, e.g. after a stall) joins again as a newcomer, which also brings its
        shared state back in line.
        """
        if self.settings.workload == "check":
            elems = self.settings.check_elems
            self.state = SharedState({"acc": torch.zeros(elems, dtype=torch.float32)}, 0)
        contacts = await self._find_group()
        while True:
            admitted = await self._membership(contacts)
            self.phase = "waiting"
            if self._member.is_set():  # request_rejoin() may have made a fresh one already
                self._member = trio.Event()
            if admitted:
                log.info("fell out of all-reduce group %r; joining again", self.group)
            else:  # the contacts' records may outlive them a while: do not spin on them
                await trio.sleep(self.settings.skip_backoff_s)
            contacts = await self._find_group()

    async def _membership(self, contacts: list[str]) -> bool:
        """One stay in the group: returns when this member has to join again (False: it was
        never admitted)."""
        log.info(
            "%s all-reduce group %r",
            f"joining {contacts} in" if contacts else "founding",
            self.group,
        )
        timeouts = self.settings.round_timeouts
        if contacts:
            machine = AllReduceMember.joiner(self.me, self.group, contacts, timeouts)
        else:
            machine = AllReduceMember(self.me, self.group, [self.me], timeouts)
        self.runner = RoundRunner(
            machine, self.transport, RunnerSettings(io_timeout_s=self.settings.io_timeout_s)
        )
        async with trio.open_nursery() as nursery:
            self.sync = StateSync(self.me, self.state, self.transport, nursery)
            self.runner.handlers["ss"] = self.sync.on_control
            nursery.start_soon(self.runner.serve)
            if contacts:
                admitted = await self.runner.join()
                if isinstance(admitted, JoinFailed):
                    log.info("not admitted to all-reduce group %r: %s", self.group, admitted.reason)
                    nursery.cancel_scope.cancel()
                    return False
                log.info("admitted to all-reduce group %r at round %d", self.group, admitted.round)
                if not await self._sync_state(list(admitted.members), admitted.round):
                    # Taking part with a state the group does not hold would make every round
                    # from now on diverge: join again (and fetch it again) instead.
                    log.info("newcomer without the shared state; joining %r again", self.group)
                    nursery.cancel_scope.cancel()
                    return False
            self.phase = "member"
            self._member.set()
            if self.settings.workload == "check":
                await self._check_rounds()
            else:  # a caller drives the rounds (node.api, a training mode) until it asks to rejoin
                await self._rejoin.wait()
                self._rejoin = trio.Event()
            nursery.cancel_scope.cancel()
        return True

    async def _find_group(self) -> list[str]:
        """Members already in the group; none means this node founds it.

        A node founds the group only after ``join_wait_s`` without seeing a member, and only if
        its peer id is the lowest of the nodes waiting to join, so nodes that start together
        found one group, not several. A node told to join a swarm founds nothing before it is
        in the swarm (``may_found``): one whose bootstrap died before it got in would otherwise
        found a second group of the same name, and the swarm would be split for good.
        """
        deadline = trio.current_time() + self.settings.join_wait_s
        said_why = False
        while True:
            peers = self.peers()
            members = sorted(p for p, phase in peers.items() if phase == "member")
            if members:
                return members
            waiting = [p for p, phase in peers.items() if phase == "waiting"]
            if trio.current_time() >= deadline and all(self.me < p for p in waiting):
                if self.may_found():
                    return []
                if not said_why:
                    log.info("not founding all-reduce group %r: not in the swarm yet", self.group)
                    said_why = True
            await trio.sleep(self.settings.group_poll_s)

    async def _sync_state(
        self, members: list[str], round_index: int, newcomer: bool = True
    ) -> bool:
        """Vote on the shared state with ``members`` and fetch what differs; False if that
        failed (a donor died mid-fetch, nobody answered): the state may then be stale."""
        assert self.sync is not None
        others = [m for m in members if m != self.me]
        started = trio.current_time()
        try:
            fetched = await self.sync.sync(others, round_index, newcomer=newcomer)
            self.fetched_bytes += fetched
            synced = True
        except (SharedStateError, trio.TooSlowError, TransportError) as exc:
            log.warning("shared-state sync failed: %s", exc)
            synced = False
        else:
            if newcomer or fetched or self.sync.silent:  # not the every-round check that passed
                log.info(
                    "shared state synced for round %d in %.2f s: %d bytes fetched; silent: %s",
                    round_index,
                    trio.current_time() - started,
                    fetched,
                    sorted(self.sync.silent) or "none",
                )
        self.sync.mark_round(round_index)
        return synced

    async def wait_member(self) -> None:
        """Return once this node is a member of the group (founded or admitted)."""
        await self._member.wait()

    def request_rejoin(self) -> None:
        """Leave the current membership and join the group again as a newcomer (for a caller
        whose rounds keep being skipped because the group went on without it). The newcomer's
        sync installs the group's state in ``self.state``; ``wait_member`` waits for it."""
        self.phase = "waiting"
        self._member = trio.Event()
        self._rejoin.set()

    def publish_state(self, tensors: Mapping[str, torch.Tensor], revision: int) -> None:
        """Serve ``tensors`` (copies the caller will not change) at ``revision`` as this
        member's shared state, reflecting every round so far: joiners waiting for the state
        after the last round are answered now. A caller that updates its state after a round
        passes ``mark_state=False`` to ``allreduce`` and calls this once the update is done."""
        self.state = SharedState(dict(tensors), revision)
        if self.sync is not None and self.runner is not None:
            self.sync.state = self.state
            self.sync.mark_round(self.runner.machine.round)

    async def allreduce(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        compression: Compression = Compression.NONE,
        mark_state: bool = True,
    ) -> RoundResult:
        """One round: on completion ``tensors`` hold the weighted mean (bit-identical on every
        member); after aborts it retried with the survivors; skipped leaves them unchanged.
        ``mark_state=False``: the shared state is not yet what joiners of the next round need
        (the caller applies the result first, then calls ``publish_state``)."""
        await self._member.wait()
        assert self.runner is not None and self.sync is not None
        result, _ = await self._round(tensors, weight, compression)
        if mark_state:
            self.sync.mark_round(self.runner.machine.round)
        return result

    async def sync_shared_state(self, tensors: dict[str, torch.Tensor], revision: int) -> int:
        """Vote on the shared state with the group; fetch (in place) what differs; bytes fetched."""
        await self._member.wait()
        assert self.runner is not None and self.sync is not None
        self.state = SharedState(dict(tensors), revision)
        self.sync.state = self.state
        others = sorted(self.runner.machine.view - {self.me})
        fetched = await self.sync.sync(others, self.runner.machine.round, newcomer=False)
        for name, tensor in self.state.tensors.items():
            if name in tensors and tensor is not tensors[name]:
                tensors[name].copy_(tensor)
        self.fetched_bytes += fetched
        return fetched

    async def _round(
        self, tensors: Mapping[str, torch.Tensor], weight: float, compression: Compression
    ) -> tuple[RoundResult, dict[str, Any]]:
        assert self.runner is not None
        self.runner.machine.set_link_costs(self.link_costs())
        started = time.monotonic()
        result = await self.runner.allreduce(tensors, weight, compression)
        outcome = result.outcome
        self.aborted += len(result.aborts)
        for abort in result.aborts:
            log.info("round %d attempt %d aborted: %s", abort.round, abort.attempt, abort.reason)
        entry: dict[str, Any] = {
            "round": outcome.round,
            "aborts": len(result.aborts),
            "abort_reasons": [a.reason for a in result.aborts],
            "duration_s": round(time.monotonic() - started, 4),
            "ended_at": round(time.time(), 4),  # wall clock: comparable across processes
        }
        if isinstance(outcome, Completed):
            self.rounds_done += 1
            self.retried += bool(result.aborts)
            entry |= {
                "outcome": "completed",
                "attempt": outcome.attempt,
                "members": list(outcome.members),
                "hash": outcome.result_hash,
            }
        else:
            self.skipped += 1
            log.info("round %d skipped: %s", outcome.round, outcome.reason)
            entry |= {"outcome": "skipped", "reason": outcome.reason}
        self.history.append(entry)
        self.last = entry
        return result, entry

    async def _check_rounds(self) -> None:
        """Back-to-back rounds until ``rejoin_after_skips`` rounds in a row are skipped while
        other members are around that this member did not admit itself (it fell behind the
        group; see ``AllReduceMember.left_out_by``)."""
        assert self.runner is not None and self.sync is not None
        compression = Compression(self.settings.compression)
        skipped_in_a_row = 0
        while True:
            x = check_tensor(self.me, self.runner.machine.round, self.settings.check_elems)
            if self.settings.check_poison == "nan":
                x[len(x) // 2] = math.nan
            result, entry = await self._round({"x": x}, check_weight(self.me), compression)
            if isinstance(result.outcome, Completed):
                acc = self.state.tensors["acc"] + x
                self.state.update({"acc": acc}, self.state.revision + 1)
                entry["state"] = self.state.summary().fingerprint()
            self.sync.mark_round(self.runner.machine.round)
            if isinstance(result.outcome, Skipped):
                skipped_in_a_row += 1
                if self.runner.machine.left_behind_at is not None:
                    return  # the group went on without this member: join it again
                members = [p for p, phase in self.peers().items() if phase == "member"]
                if skipped_in_a_row >= self.settings.rejoin_after_skips and (
                    self.runner.machine.left_out_by(members)
                ):
                    return
                # The others may have completed the round without this member (an admitted
                # joiner still fetching, a member excluded as late): vote again and fetch what
                # moved; a member whose state agrees moves no bytes.
                machine = self.runner.machine
                if not await self._sync_state(
                    sorted(machine.view - machine.lost), machine.round, newcomer=False
                ):
                    return  # it may have missed a round's update: join again, fetch it all
                await trio.sleep(self.settings.skip_backoff_s)
            else:
                skipped_in_a_row = 0

    def status(self) -> dict[str, Any]:
        bulk = self.transport.bulk
        return {
            "group": self.group,
            "workload": self.settings.workload,
            "phase": self.phase,
            "round": None if self.runner is None else self.runner.machine.round,
            "rounds_done": self.rounds_done,
            "aborted": self.aborted,
            "retried": self.retried,
            "skipped": self.skipped,
            "bytes_sent": sum(c.bytes_sent for c in bulk.channels.values()),
            "bytes_received": sum(c.bytes_received for c in bulk.channels.values()),
            "state_fetched_bytes": self.fetched_bytes,
            "state": {"revision": self.state.revision, "hash": self.state.summary().fingerprint()},
            "last": self.last,
            "history": list(self.history),
        }
