"""In-process trio driver for the all-reduce and shared-state sync, with fault injection.

Two layers, kept apart so the real network driver can reuse the first:

- ``Transport`` (what a driver needs from the network) and ``RoundRunner``, the per-member
  driver written only against it: it feeds control messages, peer losses and timeouts into an
  ``AllReduceMember``, runs the ring for each ``StartTransfer`` on a working copy of the input
  (so an abort leaves the caller's tensors untouched: that copy is the "backup"), and hands the
  caller the outcome of a round. ``StateSync`` is the same for the shared-state fetch.
- ``SimNetwork`` / ``SimSwarm``: N members in one process, talking through in-memory
  mailboxes, with faults: kill a member when it sends its k-th tensor frame or a given control
  message, drop / duplicate / delay control messages, stall a member (it stops without its
  peers being told). Every control message is msgpack-encoded and decoded on the way, as on a
  real wire.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgpack
import torch
import trio

from protocols.allreduce import (
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
    transfer_tag_prefix,
)
from protocols.codec import CodecError, Compression
from protocols.ring import RingError, RingReduction, plan_ring, unflatten_into
from protocols.shared_state import (
    SharedState,
    SharedStateError,
    StateSummary,
    SyncPlan,
    plan_sync,
)

log = logging.getLogger("shoal.protocols.allreduce")
_T = TypeVar("_T")

# -- what a driver needs from the network ---------------------------------------------------------


class TransportError(Exception):
    """Sending to or receiving from ``peer`` failed."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class Transport(Protocol):
    """Control messages (msgpack-able maps) and tagged tensor frames between peers.

    Incoming control messages and peer losses are pushed into a runner with
    ``RoundRunner.deliver_control`` / ``deliver_peer_lost``; tensor frames are pulled by tag.
    """

    async def send_control(self, peer: str, msg: dict[str, Any]) -> None: ...

    async def send_tensor(self, peer: str, tag: str, data: bytes | bytearray | memoryview) -> None:
        """Send one frame; ``data`` may be a view of the sender's memory, read until return."""

    async def recv_tensor(
        self, peer: str, tag: str, into: memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        """The next frame of ``tag`` from ``peer``. With ``into`` (a writable byte view) the
        frame lands there and ``into`` itself is returned, or, when the frame's length
        differs, its bytes are returned instead or an error raised."""

    def discard_tensors(self, tag_prefix: str) -> None:
        """Drop frames tagged ``tag_prefix + '.'...`` now and on arrival (an aborted attempt)."""


@dataclass(frozen=True)
class RunnerSettings:
    io_timeout_s: float = 30.0  # longest wait for the next ring frame from the predecessor
    # Whole-buffer work (copies, the result hash) on at least this many elements runs in a
    # worker thread (torch and hashlib release the GIL): on the event loop a 256 MB buffer
    # holds up heartbeats long enough for peers to take this member for dead. Smaller work
    # stays on the loop, where it costs less than the hand-off.
    thread_min_elems: int = 1 << 20
    # Ring frames whose receive is posted before the frame is used, each into its landing
    # (see RingReduction.landing): a frame that arrives before its receive is posted costs the
    # bulk channel a buffer and one more copy. Each costs a sub-chunk of scratch at most.
    receive_ahead_frames: int = 4

    def __post_init__(self) -> None:
        if self.io_timeout_s <= 0 or self.receive_ahead_frames < 1:
            raise ValueError("io_timeout_s must be positive and receive_ahead_frames >= 1")


@dataclass(frozen=True)
class RoundResult:
    outcome: Completed | Skipped
    aborts: tuple[Aborted, ...]


@dataclass(frozen=True)
class _ControlIn:
    sender: str
    msg: object


@dataclass(frozen=True)
class _PeerLost:
    peer: str


@dataclass(frozen=True)
class _Begin:
    weight: float
    spec: RoundSpec


@dataclass(frozen=True)
class _TransferFinished:
    round: int
    attempt: int
    result_hash: str
    buffer: torch.Tensor
    workspace: bytearray | None  # the buffer's memory, for the next round to reuse


@dataclass(frozen=True)
class _TransferFailed:
    round: int
    attempt: int
    peer: str
    reason: str
    blame: bool = True  # False for a stall: the peer may only be waiting itself


ControlHandler = Callable[[str, dict[str, Any]], None]


class RoundRunner:
    """Drives one member's ``AllReduceMember`` over a ``Transport`` (run ``serve`` in a nursery)."""

    def __init__(
        self,
        machine: AllReduceMember,
        transport: Transport,
        settings: RunnerSettings | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.machine = machine
        self.transport = transport
        self.settings = settings or RunnerSettings()
        self.clock = clock
        self.handlers: dict[str, ControlHandler] = {}  # other protocols, by "t" prefix
        self.aborts: list[Aborted] = []
        self.rejected: list[Rejected] = []
        self.mismatches: list[ParityMismatch] = []
        self.outcomes: list[Completed | Skipped] = []
        self._inbox_send, self._inbox = trio.open_memory_channel[object](math.inf)
        self._nursery: trio.Nursery | None = None
        self._transfer: tuple[int, int, trio.CancelScope] | None = None
        self._finished: dict[tuple[int, int], tuple[torch.Tensor, bytearray | None]] = {}
        self._tensors: Sequence[torch.Tensor] = ()
        # The ring's working buffer, kept for the next attempt and round of the same size:
        # a fresh 256 MB buffer per round cost more in page faults than the ring's adds.
        self._workspace: bytearray | None = None
        self._outcome: trio.MemorySendChannel[Completed | Skipped] | None = None
        self._admitted = trio.Event()
        self.admission: Admitted | JoinFailed | None = None

    # -- what the transport calls ------------------------------------------------------------

    def deliver_control(self, sender: str, msg: object) -> None:
        self._inbox_send.send_nowait(_ControlIn(sender, msg))

    def deliver_peer_lost(self, peer: str) -> None:
        self._inbox_send.send_nowait(_PeerLost(peer))

    # -- what the caller calls ---------------------------------------------------------------

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                deadline = self.machine.next_deadline()
                item: object = None
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    item = await self._inbox.receive()
                now = self.clock()
                events = [] if item is None else self._dispatch(item, now)
                await self._handle(events + self.machine.on_timeout(now))

    async def join(self) -> Admitted | JoinFailed:
        """For a joiner machine: ask to be admitted; returns the round to begin, or JoinFailed
        when no contact admitted it (the caller finds the group again with a new machine)."""
        await self._handle(self.machine.request_join(self.clock()))
        await self._admitted.wait()
        assert self.admission is not None
        return self.admission

    async def allreduce(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        compression: Compression = Compression.NONE,
    ) -> RoundResult:
        """Run round ``machine.round``; on Completed the tensors hold the weighted mean.

        On Skipped (and after any abort) the tensors hold exactly what they held before.
        """
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight {weight} must be finite and >= 0")
        names = sorted(tensors)
        ordered = [tensors[name] for name in names]
        if self._outcome is not None or self.machine.phase is not Phase.IDLE:
            raise UsageError(
                f"allreduce() in phase {self.machine.phase.value}: wait for admission or for "
                "the running round to end"
            )
        self._tensors = ordered
        spec = RoundSpec(
            tuple(
                TensorSpec(name, tuple(tensors[name].shape), str(tensors[name].dtype))
                for name in names
            ),
            compression,
        )
        first_abort = len(self.aborts)
        send, receive = trio.open_memory_channel[Completed | Skipped](1)
        self._outcome = send
        self._inbox_send.send_nowait(_Begin(weight, spec))
        outcome = await receive.receive()
        return RoundResult(outcome, tuple(self.aborts[first_abort:]))

    async def _heavy(self, elems: int, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``: in a worker thread for at least ``thread_min_elems`` elements."""
        if elems >= self.settings.thread_min_elems:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    # -- the loop ----------------------------------------------------------------------------

    def _dispatch(self, item: object, now: float) -> list[Event]:
        m = self.machine
        match item:
            case _ControlIn(sender=sender, msg=msg):
                kind = msg.get("t") if isinstance(msg, dict) else None
                if isinstance(kind, str) and not kind.startswith("ar."):
                    handler = self.handlers.get(kind.split(".", 1)[0])
                    if handler is None:
                        return [Rejected(sender, f"no handler for message type {kind!r}")]
                    assert isinstance(msg, dict)
                    handler(sender, msg)
                    return []
                return m.on_message(sender, msg, now)
            case _PeerLost(peer=peer):
                return m.on_peer_lost(peer, now)
            case _Begin(weight=weight, spec=spec):
                return m.begin(now, weight, spec)
            case _TransferFinished():
                self._finished[(item.round, item.attempt)] = (item.buffer, item.workspace)
                return m.transfer_done(item.round, item.attempt, item.result_hash, now)
            case _TransferFailed():
                if (item.round, item.attempt) != (m.round, m.attempt):
                    return []
                return m.on_io_error(item.peer, item.reason, now, blame=item.blame)
        raise AssertionError(f"unknown inbox item {item!r}")

    async def _handle(self, events: list[Event]) -> None:
        queue = list(events)
        while queue:
            event = queue.pop(0)
            match event:
                case Send(to=to, msg=msg):
                    try:
                        await self.transport.send_control(to, msg)
                    except TransportError as exc:
                        queue += self.machine.on_io_error(exc.peer, exc.reason, self.clock())
                case StartTransfer():
                    self._start_transfer(event)
                case Aborted():
                    self.aborts.append(event)
                    self._stop_transfer()
                    group = self.machine.group
                    prefix = transfer_tag_prefix(group, event.round, event.attempt)
                    self.transport.discard_tensors(prefix)
                case Completed():
                    self._stop_transfer()
                    buffer, workspace = self._finished.pop((event.round, event.attempt))
                    await self._heavy(buffer.numel(), unflatten_into, buffer, self._tensors)
                    self._workspace = workspace
                    self._finish(event)
                case Skipped():
                    self._stop_transfer()
                    self._finish(event)
                case Rejected():
                    self.rejected.append(event)
                    log.warning(
                        "rejected all-reduce message from %s: %s", event.sender, event.reason
                    )
                case ParityMismatch():
                    self.mismatches.append(event)
                    log.error("all-reduce parity mismatch: %s", event)
                case Admitted() | JoinFailed():
                    self.admission = event
                    self._admitted.set()

    def _finish(self, outcome: Completed | Skipped) -> None:
        self._finished.clear()
        self.outcomes.append(outcome)
        if self._outcome is not None:
            self._outcome.send_nowait(outcome)
            self._outcome = None

    def _stop_transfer(self) -> None:
        if self._transfer is not None:
            self._transfer[2].cancel()
            self._transfer = None

    def _start_transfer(self, event: StartTransfer) -> None:
        self._stop_transfer()
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._transfer = (event.round, event.attempt, scope)
        self._nursery.start_soon(self._run_transfer, event, scope)

    async def _run_transfer(self, event: StartTransfer, scope: trio.CancelScope) -> None:
        """The ring for one attempt, on a weighted working copy of the input (the caller's
        tensors stay as they were for a retry); reports via the inbox."""
        me = self.machine.me
        report: object
        # An attempt that ends early may leave sends of the buffer in flight (see
        # _send_frames): it gets its own workspace unless the last one is free.
        workspace, self._workspace = self._workspace, None
        elems = event.spec.total_elems
        if workspace is not None and len(workspace) != 4 * elems:
            workspace = None
        with scope:
            peer = me
            try:
                plan = plan_ring(event.ring, elems, event.chunk_elems)
                ring = await self._heavy(
                    elems,
                    RingReduction,
                    plan,
                    me,
                    self._tensors,
                    event.weights,
                    event.spec.compression,
                    event.tag_prefix,
                    True,  # a weighted working copy: the input survives an abort for the retry
                    workspace,
                )
                peer = ring.predecessor
                outgoing, frames = trio.open_memory_channel[Any](math.inf)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_frames, frames)
                    for frame in ring.start():
                        outgoing.send_nowait(frame)
                    await self._receive_frames(ring, outgoing, nursery)
                    outgoing.close()
                result_hash = await self._heavy(elems, ring.result_hash)
                report = _TransferFinished(
                    event.round, event.attempt, result_hash, ring.buffer, ring.workspace
                )
            except* trio.TooSlowError:
                reason = f"no ring frame within io_timeout_s={self.settings.io_timeout_s}"
                report = _TransferFailed(event.round, event.attempt, peer, reason, blame=False)
            except* TransportError as group:
                exc = group.exceptions[0]
                assert isinstance(exc, TransportError)
                report = _TransferFailed(event.round, event.attempt, exc.peer, exc.reason)
            except* (RingError, CodecError) as group:
                bad = group.exceptions[0]
                assert isinstance(bad, RingError | CodecError)
                report = _TransferFailed(event.round, event.attempt, peer, bad.reason)
            self._inbox_send.send_nowait(report)

    async def _receive_frames(
        self,
        ring: RingReduction,
        outgoing: trio.MemorySendChannel[Any],
        nursery: trio.Nursery,
    ) -> None:
        """Every frame the ring expects, used in order, with up to ``receive_ahead_frames``
        receives posted ahead, each into the frame's landing."""
        expected = ring.expected()
        arrived: list[Any] = [None] * len(expected)
        ready = [trio.Event() for _ in expected]

        async def receive(i: int) -> None:
            sender, tag = expected[i]
            arrived[i] = await self.transport.recv_tensor(sender, tag, ring.landing(tag))
            ready[i].set()

        posted = 0
        for i, (_, tag) in enumerate(expected):
            while posted < min(len(expected), i + self.settings.receive_ahead_frames):
                nursery.start_soon(receive, posted)
                posted += 1
            with trio.fail_after(self.settings.io_timeout_s):
                await ready[i].wait()
            data, arrived[i] = arrived[i], None
            for frame in ring.on_frame(tag, data):
                outgoing.send_nowait(frame)

    async def _send_frames(self, frames: trio.MemoryReceiveChannel[Any]) -> None:
        """Send the ring's frames in order. A send that has begun is finished even when the
        attempt is aborted meanwhile: cut mid-transfer, it would break the bulk channel to a
        healthy peer (who discards the aborted attempt's frames anyway) and so fail the retry
        too. Only a send still unfinished after ``io_timeout_s`` is cut."""
        async for frame in frames:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self.settings.io_timeout_s) as limit,
            ):
                await self.transport.send_tensor(frame.to, frame.tag, frame.data)
            if limit.cancelled_caught:
                reason = (
                    f"send of {frame.tag} stalled for io_timeout_s={self.settings.io_timeout_s}"
                )
                raise TransportError(frame.to, reason)


# -- shared-state fetch over the same transport ----------------------------------------------------


@dataclass(frozen=True)
class StateSyncSettings:
    summary_timeout_s: float = 10.0  # wait for members' summaries
    fetch_timeout_s: float = 60.0  # wait for one fetched tensor


class StateSync:
    """Serves this member's shared state and fetches a differing one ("ss." messages).

    A summary request names the round the asker will join; the answer waits until this
    member's state reflects every round before it (``mark_round``), so a joiner admitted
    mid-round gets the state after that round.
    """

    def __init__(
        self,
        me: str,
        state: SharedState,
        transport: Transport,
        nursery: trio.Nursery,
        settings: StateSyncSettings | None = None,
    ) -> None:
        self.me = me
        self.state = state
        self.transport = transport
        self.nursery = nursery
        self.settings = settings or StateSyncSettings()
        self.state_round = 0  # the state reflects every round before this one
        self.served_bytes = 0
        self.rejected: list[str] = []
        self._waiting_queries: list[tuple[str, int]] = []
        self._summaries: dict[str, StateSummary | None] = {}  # None: the peer abstained
        self._summary_arrived = trio.Event()
        self._newcomer = False  # fetching a state it does not hold yet: no vote to give
        self._fetch_ids = itertools.count()
        self.last_plan: SyncPlan | None = None  # the vote of the latest sync()
        self.silent: set[str] = set()  # members whose summary the latest sync() waited out

    def on_control(self, sender: str, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "ss.query" and _is_count(msg.get("round")):
            if self._newcomer:  # abstain at once: the asker need not wait summary_timeout_s
                abstain = {"t": "ss.summary", "summary": None}
                self.nursery.start_soon(self._send_quietly, sender, abstain)
                return
            self._waiting_queries.append((sender, msg["round"]))
            self._answer_queries()
        elif kind == "ss.summary":
            raw = msg.get("summary")
            try:
                self._summaries[sender] = None if raw is None else StateSummary.from_wire(raw)
            except SharedStateError as exc:
                self.rejected.append(f"{sender}: {exc.reason}")
                return
            self._summary_arrived.set()
        elif kind == "ss.fetch" and isinstance(msg.get("names"), list) and _is_count(msg.get("id")):
            names = [n for n in msg["names"] if isinstance(n, str) and n in self.state.tensors]
            self.nursery.start_soon(self._serve_fetch, sender, msg["id"], names)
        else:
            self.rejected.append(f"{sender}: malformed shared-state message {kind!r}")

    def mark_round(self, next_round: int) -> None:
        """The state now reflects every round before ``next_round``."""
        self.state_round = next_round
        self._answer_queries()

    def _answer_queries(self) -> None:
        ready = [(peer, r) for peer, r in self._waiting_queries if r <= self.state_round]
        self._waiting_queries = [q for q in self._waiting_queries if q not in ready]
        for peer, _ in ready:
            msg = {"t": "ss.summary", "summary": self.state.summary().to_wire()}
            self.nursery.start_soon(self._send_quietly, peer, msg)

    async def _send_quietly(self, peer: str, msg: dict[str, Any]) -> None:
        try:
            await self.transport.send_control(peer, msg)
        except TransportError as exc:
            self.rejected.append(f"{peer}: {exc.reason}")

    async def _serve_fetch(self, peer: str, fetch_id: int, names: list[str]) -> None:
        state = self.state  # the owner may replace self.state meanwhile (a newer snapshot)
        for name in names:
            header, payload = state.export(name)
            frame = msgpack.packb(header, use_bin_type=True)
            data = len(frame).to_bytes(2, "big") + frame + payload
            self.served_bytes += len(payload)
            try:
                await self.transport.send_tensor(peer, f"ss.{peer}.{fetch_id}.{name}", data)
            except TransportError:
                return

    async def sync(self, members: Sequence[str], round: int, newcomer: bool) -> int:
        """Vote with ``members`` and fetch what differs; returns the bytes fetched.

        Summaries that do not arrive within ``summary_timeout_s`` do not vote. While a
        newcomer syncs, it answers others' queries with an abstention, so newcomers admitted
        together do not each wait out the timeout for the others. Raises SharedStateError
        (HashMismatchError for a bad tensor; nothing is installed then) or trio.TooSlowError
        when the donor does not deliver within ``fetch_timeout_s``.
        """
        self._newcomer = newcomer
        try:
            return await self._sync(members, round, newcomer)
        finally:
            self._newcomer = False

    async def _sync(self, members: Sequence[str], round: int, newcomer: bool) -> int:
        self._summaries = {}
        for peer in members:
            await self._send_quietly(peer, {"t": "ss.query", "round": round})
        with trio.move_on_after(self.settings.summary_timeout_s):
            while set(members) - set(self._summaries):
                self._summary_arrived = trio.Event()
                await self._summary_arrived.wait()
        self.silent = set(members) - set(self._summaries)  # no summary within the timeout
        summaries: dict[str, StateSummary | None] = dict(self._summaries)
        summaries[self.me] = None if newcomer else self.state.summary()
        self.last_plan = plan_sync(summaries)
        order = self.last_plan.for_member(self.me)
        if order is None:
            return 0
        fetch_id = next(self._fetch_ids)
        await self.transport.send_control(
            order.donor, {"t": "ss.fetch", "id": fetch_id, "names": list(order.names)}
        )
        fetched = {}
        for name in order.names:
            with trio.fail_after(self.settings.fetch_timeout_s):
                data = await self.transport.recv_tensor(
                    order.donor, f"ss.{self.me}.{fetch_id}.{name}"
                )
            length = int.from_bytes(data[:2], "big")
            header = msgpack.unpackb(data[2 : 2 + length], raw=False)
            fetched[name] = (header, bytes(memoryview(data)[2 + length :]))
        before = self.state.bytes_fetched
        self.state.install(order, fetched)
        return self.state.bytes_fetched - before


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


# -- the simulated network -----------------------------------------------------------------------


@dataclass
class ControlRule:
    """A fault on control messages: the first rule that matches (and has uses left) acts."""

    action: str  # "drop" | "duplicate" | "delay" | "kill_sender" | "stall_sender"
    sender: str | None = None
    to: str | None = None
    kind: str | None = None  # the message's "t"
    delay_s: float = 0.0
    times: int = 1

    def matches(self, sender: str, to: str, msg: dict[str, Any]) -> bool:
        return (
            self.times > 0
            and self.sender in (None, sender)
            and self.to in (None, to)
            and self.kind in (None, msg.get("t"))
        )


@dataclass
class FaultPlan:
    kill_after_frames: dict[str, int] = field(default_factory=dict)  # killed at its k-th frame
    stall_after_frames: dict[str, int] = field(default_factory=dict)
    control_rules: list[ControlRule] = field(default_factory=list)
    loss_notice_delay_s: float = 0.0


class _Mailbox:
    def __init__(self) -> None:
        self.frames: dict[tuple[str, str], bytes] = {}
        self.waiters: dict[tuple[str, str], trio.Event] = {}
        self.discarded: list[str] = []
        self.stale_frames = 0

    def put(self, sender: str, tag: str, data: bytes) -> None:
        if any(tag.startswith(prefix + ".") for prefix in self.discarded):
            self.stale_frames += 1
            return
        self.frames[(sender, tag)] = data
        waiter = self.waiters.pop((sender, tag), None)
        if waiter is not None:
            waiter.set()

    async def get(self, sender: str, tag: str) -> bytes:
        key = (sender, tag)
        while key not in self.frames:
            await self.waiters.setdefault(key, trio.Event()).wait()
        return self.frames.pop(key)

    def discard(self, prefix: str) -> None:
        self.discarded.append(prefix)
        for key in [k for k in self.frames if k[1].startswith(prefix + ".")]:
            del self.frames[key]
            self.stale_frames += 1


class SimNetwork:
    """Members' mailboxes, routing and faults. Create inside a nursery (for delayed sends)."""

    def __init__(self, nursery: trio.Nursery, faults: FaultPlan | None = None) -> None:
        self.nursery = nursery
        self.faults = faults or FaultPlan()
        self.runners: dict[str, RoundRunner] = {}
        self.scopes: dict[str, list[trio.CancelScope]] = {}
        self.mailboxes: dict[str, _Mailbox] = {}
        self.dead: set[str] = set()
        self.stalled: set[str] = set()
        self.frames_sent: dict[str, int] = {}
        self.control_log: list[tuple[str, str, str]] = []

    def transport(self, peer: str) -> SimTransport:
        self.mailboxes[peer] = _Mailbox()
        self.frames_sent[peer] = 0
        self.scopes[peer] = []
        return SimTransport(peer, self)

    def process_scope(self, peer: str) -> trio.CancelScope:
        """A cancel scope that belongs to the member's "process": it dies with the member."""
        scope = trio.CancelScope()
        self.scopes[peer].append(scope)
        if peer in self.dead or peer in self.stalled:
            scope.cancel()
        return scope

    def _stop(self, peer: str) -> None:
        for scope in self.scopes[peer]:
            scope.cancel()

    def alive(self, peer: str) -> bool:
        return peer in self.runners and peer not in self.dead and peer not in self.stalled

    def kill(self, peer: str) -> None:
        """The member's process dies: its tasks stop and every peer is told it is gone."""
        if peer in self.dead:
            return
        self.dead.add(peer)
        self._stop(peer)
        for other in list(self.runners):
            if other != peer and self.alive(other):
                self.nursery.start_soon(self._notify_loss, other, peer)

    def stall(self, peer: str) -> None:
        """The member hangs: it stops, and nobody is told (peers must time out)."""
        self.stalled.add(peer)
        self._stop(peer)

    async def _notify_loss(self, to: str, peer: str) -> None:
        if self.faults.loss_notice_delay_s:
            await trio.sleep(self.faults.loss_notice_delay_s)
        if self.alive(to):
            self.runners[to].deliver_peer_lost(peer)

    def _check_frame_faults(self, sender: str) -> None:
        self.frames_sent[sender] += 1
        count = self.frames_sent[sender]
        if self.faults.kill_after_frames.get(sender) == count:
            self.kill(sender)
        if self.faults.stall_after_frames.get(sender) == count:
            self.stall(sender)

    async def route_control(self, sender: str, to: str, msg: dict[str, Any]) -> None:
        if not self.alive(sender):
            return  # a dead or hung process sends nothing
        # A real wire: what cannot survive msgpack does not arrive.
        wire = msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False)
        rule = next((r for r in self.faults.control_rules if r.matches(sender, to, msg)), None)
        copies, delay = 1, 0.0
        if rule is not None:
            rule.times -= 1
            if rule.action == "drop":
                copies = 0
            elif rule.action == "duplicate":
                copies = 2
            elif rule.action == "delay":
                delay = rule.delay_s
            elif rule.action in ("kill_sender", "stall_sender"):
                (self.kill if rule.action == "kill_sender" else self.stall)(sender)
                await trio.lowlevel.checkpoint()  # the sender is cancelled: nothing goes out
        if to in self.dead:
            raise TransportError(to, "connection refused: peer is gone")
        self.control_log.append((sender, to, str(msg.get("t"))))
        for _ in range(copies):
            if delay:
                self.nursery.start_soon(self._deliver_later, sender, to, wire, delay)
            elif self.alive(to):
                self.runners[to].deliver_control(sender, wire)

    async def _deliver_later(self, sender: str, to: str, wire: object, delay: float) -> None:
        await trio.sleep(delay)
        if self.alive(to):
            self.runners[to].deliver_control(sender, wire)


class SimTransport:
    """One member's ``Transport`` on a ``SimNetwork``."""

    def __init__(self, me: str, net: SimNetwork) -> None:
        self.me = me
        self.net = net

    async def send_control(self, peer: str, msg: dict[str, Any]) -> None:
        await self.net.route_control(self.me, peer, msg)

    async def send_tensor(self, peer: str, tag: str, data: bytes | bytearray | memoryview) -> None:
        self.net._check_frame_faults(self.me)
        await trio.lowlevel.checkpoint()  # a killed sender stops here, the frame unsent
        if not self.net.alive(self.me):
            return
        if peer in self.net.dead:
            raise TransportError(peer, "connection reset: peer is gone")
        if self.net.alive(peer):
            self.net.mailboxes[peer].put(self.me, tag, bytes(data))

    async def recv_tensor(
        self, peer: str, tag: str, into: memoryview | None = None
    ) -> bytes | memoryview:
        data = await self.net.mailboxes[self.me].get(peer, tag)
        if into is None or len(data) != into.nbytes:
            return data
        into[:] = data
        return into

    def discard_tensors(self, tag_prefix: str) -> None:
        self.net.mailboxes[self.me].discard(tag_prefix)


# -- a swarm of simulated members ------------------------------------------------------------------


@dataclass
class SimMember:
    peer: str
    runner: RoundRunner
    state_sync: StateSync

    @property
    def machine(self) -> AllReduceMember:
        return self.runner.machine


class SimSwarm:
    """Start members, run rounds on all of them, inject faults, read what each saw."""

    def __init__(
        self,
        nursery: trio.Nursery,
        faults: FaultPlan | None = None,
        settings: AllReduceSettings | None = None,
        runner_settings: RunnerSettings | None = None,
        group: str = "g",
    ) -> None:
        self.nursery = nursery
        self.net = SimNetwork(nursery, faults)
        self.settings = settings or AllReduceSettings()
        self.runner_settings = runner_settings or RunnerSettings()
        self.group = group
        self.members: dict[str, SimMember] = {}

    def start(self, peers: Sequence[str], states: Mapping[str, SharedState] | None = None) -> None:
        for peer in peers:
            machine = AllReduceMember(peer, self.group, peers, self.settings)
            self._launch(machine, (states or {}).get(peer))

    def start_joiner(self, peer: str, contacts: Sequence[str]) -> SimMember:
        machine = AllReduceMember.joiner(peer, self.group, contacts, self.settings)
        return self._launch(machine, None)

    def _launch(self, machine: AllReduceMember, state: SharedState | None) -> SimMember:
        peer = machine.me
        transport = self.net.transport(peer)
        runner = RoundRunner(machine, transport, self.runner_settings)
        sync = StateSync(peer, state or SharedState(), transport, self.nursery)
        runner.handlers["ss"] = sync.on_control
        member = SimMember(peer, runner, sync)
        self.members[peer] = member
        self.net.runners[peer] = runner
        self.nursery.start_soon(self._serve, member)
        return member

    async def _serve(self, member: SimMember) -> None:
        with self.net.process_scope(member.peer):
            async with trio.open_nursery() as nursery:
                member.state_sync.nursery = nursery  # its tasks die with the member
                await member.runner.serve()

    def alive(self) -> list[str]:
        return sorted(p for p in self.members if self.net.alive(p))

    async def run_in_member(self, peer: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` as the member's own task: it dies with the member (None if so)."""
        result = None
        with self.net.process_scope(peer):
            result = await fn()
        return result

    async def allreduce_all(
        self,
        inputs: Mapping[str, Mapping[str, torch.Tensor]],
        weights: Mapping[str, float],
        compression: Compression = Compression.NONE,
    ) -> dict[str, RoundResult]:
        """One round on every listed member at once; members that die give no result."""
        results: dict[str, RoundResult] = {}

        async def one(peer: str) -> None:
            runner = self.members[peer].runner
            result = await self.run_in_member(
                peer, lambda: runner.allreduce(inputs[peer], weights[peer], compression)
            )
            if result is not None:
                results[peer] = result

        async with trio.open_nursery() as nursery:
            for peer in inputs:
                nursery.start_soon(one, peer)
        return results

    def aborts_seen(self) -> dict[str, int]:
        return {p: len(m.runner.aborts) for p, m in self.members.items() if self.net.alive(p)}
