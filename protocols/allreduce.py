"""Master-free, fault-tolerant all-reduce rounds: one sans-IO state machine per group member.

A group reduces in numbered rounds; each round has attempts. The flow of one attempt:

    every member   begin(weight, spec)   -> Ready(round, weight) to every view member
    coordinator    all ready (or ready_timeout_s; joiners get join_timeout_s more)
                   -> Propose(round, attempt, ring-ordered members, weights, spec, codec)
    member         checks it (its own weight and spec) -> Accept   (or Refuse, then skips)
    coordinator    all accepted -> Go; everyone emits StartTransfer (the driver runs the ring)
    member         transfer_done(hash) -> Done(hash) to every attempt member
    member         Done from every live attempt member, one hash -> Completed

The coordinator is not a fixed master: it is the lowest peer id among the live members
(minus those suspected this round), so when it dies the next one takes over, and after an
abort the survivors' lowest id proposes the next attempt with the survivors only.

Abort rule (PCCL's, without its master): a loss, I/O error, refusal, stall or hash mismatch
inside an attempt aborts it; each member emits ``Aborted`` at most once per (round, attempt)
and relays the Abort once to the others, so every survivor sees exactly one, whichever way it
heard first (loss report, relayed Abort, or a proposal for a later attempt). A second report
or a late Abort is counted as a duplicate and produces nothing. Messages of an aborted attempt
or a past round are counted as stale and dropped. Below two members a round is ``Skipped``.

Commit. A member that finished its own transfer and then loses a peer that has not reported
Done completes with the others' Done alone: all of them hold the full result, and any member
that did not finish aborts and tells them before they can complete. A member whose Done from
someone is merely late or lost asks for it again every ``coordinator_timeout_s``; members answer
from their record of the last ``completed_memory`` completed attempts, so a lost message does
not make one member abort what the others completed. A member asked about an attempt it aborted
or left without completing answers with an Abort, never with its Done, so a lost Abort costs
the asker one ask period, not ``attempt_timeout_s``. (An asymmetric partition, where two
survivors disagree about who is alive, can still split that decision; a member that ends a
round ``Skipped`` must resync its shared state before the next round, which repairs it.)

Blame. A loss or a hard I/O error names the peer as a suspect, who sits out the rest of the
round; a stall (no data in time) names nobody, since in a ring everyone stalls behind the one
that hung; the retry's accept timeout then names the member that stays silent.

Joining. A joiner asks members for admission; each answers with the joiner's first round (the
current one while it is idle or still gathering Readies, the next one once an attempt is under
way) and its view. Any member in an attempt answers a Ready from a peer the attempt leaves out
(and tells those whose Ready it held when the proposal came) with ``Excluded``, so a joiner
that knows only its contact skips at once instead of waiting out its timeouts. ``Excluded``
carries the sender's own round: two or more rounds ahead means the group went on without the
receiver, which sets ``left_behind_at`` (its driver then joins again and resyncs). A join
request from a member of the attempt under way means that member restarted as a joiner: the
attempt aborts at once with it as the suspect, rather than wait for a Done that never comes.

Nothing here reads a clock or a socket: time arrives as ``now`` (seconds, any monotonic
origin) and the driver calls ``on_timeout(now)`` at ``next_deadline()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from protocols.codec import Compression
from protocols.ring import order_ring

PROTOCOL_VERSION = 2  # 2: Excluded carries the sender's own round ('at')


# -- settings and specs -------------------------------------------------------------------------


@dataclass(frozen=True)
class AllReduceSettings:
    """Timeouts (seconds, on the caller's ``now`` clock) and size caps of the all-reduce."""

    ready_timeout_s: float = 30.0  # coordinator waits this long for every member's Ready
    join_timeout_s: float = 5.0  # then this much more for admitted joiners; joiner resend period
    proposal_timeout_s: float = 60.0  # a ready member waits this long for a proposal
    accept_timeout_s: float = 10.0  # coordinator waits this long for every Accept
    coordinator_timeout_s: float = 10.0  # member waits for a retry proposal (Go: plus accept)
    attempt_timeout_s: float = 300.0  # data phase plus Done collection
    max_attempts: int = 8
    completed_memory: int = 16  # completed attempts remembered, to answer Done asks after them
    join_requests: int = 3  # a joiner gives up after this many unanswered requests
    # Sub-chunk of the ring pipeline: 4 MiB of float32. Each frame costs the runner and the
    # bulk channel a fixed share of Python; 1 MiB frames made 256 MiB calls 0.4 s slower
    # (2.66 -> 2.24 s, 4 ranks on 2 cores) and 8 MiB gained nothing more.
    chunk_elems: int = 1 << 20
    max_chunk_elems: int = 1 << 26
    max_group_size: int = 256
    max_peer_id_chars: int = 128
    max_reason_chars: int = 512
    max_spec_tensors: int = 4096
    max_name_chars: int = 256
    max_tensor_dims: int = 8
    max_hash_chars: int = 128

    def __post_init__(self) -> None:
        if self.proposal_timeout_s <= self.ready_timeout_s + self.join_timeout_s:
            raise ValueError(
                "proposal_timeout_s must exceed ready_timeout_s + join_timeout_s, or members "
                "give up on a coordinator that is still waiting for stragglers"
            )
        if self.max_attempts < 1 or not 1 <= self.chunk_elems <= self.max_chunk_elems:
            raise ValueError("max_attempts and chunk_elems must be at least 1")
        if self.completed_memory < 1:
            raise ValueError("completed_memory must be at least 1")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a round: every member must reduce the same list."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RoundSpec:
    """What a round reduces, and how it travels."""

    tensors: tuple[TensorSpec, ...]
    compression: Compression = Compression.NONE

    @property
    def total_elems(self) -> int:
        return sum(t.numel for t in self.tensors)

    def to_wire(self) -> list[list[Any]]:
        return [[t.name, list(t.shape), t.dtype] for t in self.tensors]


# -- messages -----------------------------------------------------------------------------------


class MessageError(ValueError):
    """An incoming control message that fails validation; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UsageError(RuntimeError):
    """The caller drove the machine out of order (a bug in the driver, not in a peer)."""


@dataclass(frozen=True)
class JoinRequest:
    pass


@dataclass(frozen=True)
class JoinAck:
    round: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Ready:
    round: int
    weight: float


@dataclass(frozen=True)
class Proposal:
    round: int
    attempt: int
    members: tuple[str, ...]  # ring order
    weights: tuple[float, ...]
    spec: RoundSpec
    chunk_elems: int
    # The coordinator that proposed: the lowest id of the round's existing members for a first
    # attempt (an admitted joiner may have a lower id and still not coordinate the round it
    # joins in), the survivors' lowest id for a retry.
    proposer: str

    def weight_of(self) -> dict[str, float]:
        return dict(zip(self.members, self.weights, strict=True))


@dataclass(frozen=True)
class Accept:
    round: int
    attempt: int


@dataclass(frozen=True)
class Refuse:
    round: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class Go:
    round: int
    attempt: int


@dataclass(frozen=True)
class Abort:
    round: int
    attempt: int
    reason: str
    suspects: tuple[str, ...]


@dataclass(frozen=True)
class Done:
    round: int
    attempt: int
    result_hash: str
    ask: bool = False  # "I lack yours": a member holding its own Done for it answers


@dataclass(frozen=True)
class Excluded:
    round: int
    reason: str
    at: int  # the sender's own round: two or more past ``round`` means the group went on


Message = JoinRequest | JoinAck | Ready | Proposal | Accept | Refuse | Go | Abort | Done | Excluded


def encode_message(group: str, message: Message) -> dict[str, Any]:
    """The msgpack-able wire map of a message."""
    base: dict[str, Any] = {"v": PROTOCOL_VERSION, "g": group}
    match message:
        case JoinRequest():
            return {"t": "ar.join", **base}
        case JoinAck(round=r, members=members):
            return {"t": "ar.join_ack", **base, "round": r, "members": list(members)}
        case Ready(round=r, weight=w):
            return {"t": "ar.ready", **base, "round": r, "weight": float(w)}
        case Proposal():
            m = message
            return {
                "t": "ar.propose",
                **base,
                "round": m.round,
                "attempt": m.attempt,
                "members": list(m.members),
                "weights": [float(w) for w in m.weights],
                "spec": m.spec.to_wire(),
                "codec": m.spec.compression.value,
                "chunk_elems": m.chunk_elems,
                "proposer": m.proposer,
            }
        case Accept(round=r, attempt=a):
            return {"t": "ar.accept", **base, "round": r, "attempt": a}
        case Refuse(round=r, attempt=a, reason=why):
            return {"t": "ar.refuse", **base, "round": r, "attempt": a, "reason": why}
        case Go(round=r, attempt=a):
            return {"t": "ar.go", **base, "round": r, "attempt": a}
        case Abort(round=r, attempt=a, reason=why, suspects=suspects):
            return {
                "t": "ar.abort",
                **base,
                "round": r,
                "attempt": a,
                "reason": why,
                "suspects": list(suspects),
            }
        case Done(round=r, attempt=a, result_hash=h, ask=ask):
            return {"t": "ar.done", **base, "round": r, "attempt": a, "hash": h, "ask": ask}
        case Excluded(round=r, reason=why, at=at):
            return {"t": "ar.excluded", **base, "round": r, "reason": why, "at": at}
    raise TypeError(f"not an all-reduce message: {message!r}")


class _Fields:
    """Typed, capped field access on an untrusted map; every failure is a MessageError."""

    def __init__(self, raw: Mapping[str, Any], settings: AllReduceSettings) -> None:
        self.raw = raw
        self.s = settings

    def get(self, key: str) -> Any:
        if key not in self.raw:
            raise MessageError(f"field {key!r} is missing")
        return self.raw[key]

    def count(self, key: str, low: int = 0, high: int = 1 << 62) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise MessageError(f"field {key!r} must be an integer in [{low}, {high}]")
        return value

    def text(self, key: str, max_chars: int) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise MessageError(f"field {key!r} must be a string")
        if len(value) > max_chars:
            raise MessageError(f"field {key!r} of {len(value)} chars exceeds {max_chars}")
        return value

    def weight(self, value: Any, label: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MessageError(f"{label} must be a number")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise MessageError(f"{label} is {value}; weights must be finite and >= 0")
        return value

    def peers(self, key: str, max_items: int) -> tuple[str, ...]:
        value = self.get(key)
        if not isinstance(value, list):
            raise MessageError(f"field {key!r} must be a list")
        if len(value) > max_items:
            raise MessageError(f"field {key!r} lists {len(value)} peers, more than {max_items}")
        out = []
        for item in value:
            if not isinstance(item, str) or not 0 < len(item) <= self.s.max_peer_id_chars:
                raise MessageError(f"field {key!r} holds a bad peer id")
            out.append(item)
        if len(set(out)) != len(out):
            raise MessageError(f"field {key!r} repeats a peer")
        return tuple(out)

    def spec(self) -> RoundSpec:
        raw = self.get("spec")
        if not isinstance(raw, list) or len(raw) > self.s.max_spec_tensors:
            raise MessageError(f"field 'spec' must be a list of at most {self.s.max_spec_tensors}")
        tensors = []
        for entry in raw:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise MessageError("spec entries must be [name, shape, dtype]")
            name, shape, dtype = entry
            if not isinstance(name, str) or len(name) > self.s.max_name_chars:
                raise MessageError("spec tensor name must be a string of bounded length")
            if not isinstance(dtype, str) or len(dtype) > 32:
                raise MessageError(f"spec dtype of {name!r} must be a short string")
            if (
                not isinstance(shape, list)
                or len(shape) > self.s.max_tensor_dims
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)
            ):
                raise MessageError(f"spec shape of {name!r} must be a short list of sizes")
            tensors.append(TensorSpec(name, tuple(shape), dtype))
        codec = self.get("codec")
        try:
            compression = Compression(codec)
        except ValueError:
            raise MessageError(f"unknown codec {codec!r}") from None
        return RoundSpec(tuple(tensors), compression)


def decode_message(raw: object, group: str, settings: AllReduceSettings) -> Message:
    """Validate an untrusted wire map into a message, or raise MessageError with the reason."""
    if not isinstance(raw, Mapping):
        raise MessageError(f"message is a {type(raw).__name__}, expected a map")
    kind = raw.get("t")
    if raw.get("v") != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {raw.get('v')!r}, expected {PROTOCOL_VERSION}")
    if raw.get("g") != group:
        raise MessageError(f"message for group {raw.get('g')!r}, this is {group!r}")
    f = _Fields(raw, settings)
    cap = settings.max_group_size
    if kind == "ar.join":
        return JoinRequest()
    if kind == "ar.join_ack":
        return JoinAck(f.count("round"), f.peers("members", cap))
    if kind == "ar.ready":
        return Ready(f.count("round"), f.weight(f.get("weight"), "weight"))
    if kind == "ar.propose":
        members = f.peers("members", cap)
        if len(members) < 2:
            raise MessageError("a proposal needs at least two members")
        raw_weights = f.get("weights")
        if not isinstance(raw_weights, list) or len(raw_weights) != len(members):
            raise MessageError("field 'weights' must be a list as long as 'members'")
        weights = tuple(f.weight(w, "a member weight") for w in raw_weights)
        if members and not math.fsum(weights) > 0:
            raise MessageError("proposed weights sum to zero")
        proposer = f.text("proposer", settings.max_peer_id_chars)
        if proposer not in members:
            raise MessageError("the proposer of a proposal must be one of its members")
        return Proposal(
            f.count("round"),
            f.count("attempt", 1),
            members,
            weights,
            f.spec(),
            f.count("chunk_elems", 1, settings.max_chunk_elems),
            proposer,
        )
    if kind in ("ar.accept", "ar.go"):
        cls = Accept if kind == "ar.accept" else Go
        return cls(f.count("round"), f.count("attempt", 1))
    if kind == "ar.refuse":
        return Refuse(
            f.count("round"), f.count("attempt", 1), f.text("reason", settings.max_reason_chars)
        )
    if kind == "ar.abort":
        return Abort(
            f.count("round"),
            f.count("attempt", 1),
            f.text("reason", settings.max_reason_chars),
            f.peers("suspects", cap),
        )
    if kind == "ar.done":
        result_hash = f.text("hash", settings.max_hash_chars)
        ask = raw.get("ask", False)
        if not isinstance(ask, bool):
            raise MessageError("field 'ask' must be a boolean")
        return Done(f.count("round"), f.count("attempt", 1), result_hash, ask)
    if kind == "ar.excluded":
        return Excluded(
            f.count("round"), f.text("reason", settings.max_reason_chars), f.count("at")
        )
    raise MessageError(f"unknown message type {kind!r}")


def transfer_tag_prefix(group: str, round: int, attempt: int) -> str:
    """Bulk-channel tags of one attempt start with this (then a '.')."""
    return f"ar.{group}.r{round}.a{attempt}"


# -- events (what the machine asks of its driver) ------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send ``msg`` (a msgpack-able map) to ``to`` on the control channel."""

    to: str
    msg: dict[str, Any]


@dataclass(frozen=True)
class StartTransfer:
    """Run the ring for this attempt; report ``transfer_done`` or ``on_io_error``."""

    round: int
    attempt: int
    ring: tuple[str, ...]
    weights: dict[str, float]
    spec: RoundSpec
    chunk_elems: int
    tag_prefix: str


@dataclass(frozen=True)
class Aborted:
    """This attempt is over: drop its transfer and restore the input buffers (once each)."""

    round: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class Completed:
    round: int
    attempt: int
    members: tuple[str, ...]
    result_hash: str


@dataclass(frozen=True)
class Skipped:
    """The round ended without a reduction for this member; buffers keep the input."""

    round: int
    reason: str


@dataclass(frozen=True)
class Rejected:
    """An incoming message that was refused; nothing else changed."""

    sender: str
    reason: str


@dataclass(frozen=True)
class ParityMismatch:
    """Members reported different result hashes: bit parity broke (the attempt aborts)."""

    round: int
    attempt: int
    hashes: dict[str, str]


@dataclass(frozen=True)
class JoinFailed:
    """No contact admitted this joiner (all lost, or silent): find the group again."""

    reason: str


@dataclass(frozen=True)
class Admitted:
    """A joiner was told its first round: sync the shared state, then ``begin(round)``."""

    round: int
    members: tuple[str, ...]


Event = (
    Send
    | StartTransfer
    | Aborted
    | Completed
    | Skipped
    | Rejected
    | ParityMismatch
    | Admitted
    | JoinFailed
)


class Phase(Enum):
    JOINING = "joining"  # a joiner waiting for its JoinAck
    IDLE = "idle"  # between rounds; ``round`` is the next one
    GATHERING = "gathering"  # begun; collecting Ready (coordinator) or waiting for a proposal
    ACCEPTED = "accepted"  # an attempt is proposed; collecting Accept or waiting for Go
    TRANSFER = "transfer"  # the data phase runs
    COMMIT = "commit"  # own transfer done; collecting Done
    RETRY = "retry"  # the attempt aborted; waiting for the survivors' next proposal


# -- the machine ---------------------------------------------------------------------------------


@dataclass
class _Counters:
    stale: int = 0
    duplicate: int = 0
    rejected: int = 0


class AllReduceMember:
    """One member's view of a group's all-reduce rounds."""

    def __init__(
        self,
        me: str,
        group: str,
        members: Iterable[str],
        settings: AllReduceSettings | None = None,
        first_round: int = 0,
    ) -> None:
        self.me = me
        self.group = group
        self.settings = settings or AllReduceSettings()
        self.view: set[str] = set(members) | {me}
        self.lost: set[str] = set()
        self.round = first_round
        self.phase = Phase.IDLE
        self.attempt = 0
        self.counters = _Counters()
        self.link_costs: dict[tuple[str, str], float] = {}
        self.pending_joins: dict[str, int] = {}  # joiner -> first round it may take part in
        self._joiners_waited_for: set[str] = set()  # pending joiners a round already waited for
        self._contacts: tuple[str, ...] = ()
        self._join_requests = 0
        self._weight = 0.0
        self._spec: RoundSpec | None = None
        self._deadlines: dict[str, float] = {}
        self._aborted: set[tuple[int, int]] = set()
        self._skip_round: tuple[int, str] | None = None
        # The highest round a member was seen beginning while this one was at least two rounds
        # behind: the group went on without it, so its driver should join again (and resync).
        self.left_behind_at: int | None = None
        self._completed: dict[tuple[int, int], Completed] = {}  # the latest completed_memory
        self._future_readies: dict[str, float] = {}
        self._proposal: Proposal | None = None
        self._accepts: set[str] = set()
        self._dones: dict[str, str] = {}
        self._excluded: set[str] = set()
        self._fired: set[str] = set()  # named deadlines of this round that already expired
        self._readies: dict[str, float] = {}
        self._reset_round()

    @classmethod
    def joiner(
        cls, me: str, group: str, contacts: Iterable[str], settings: AllReduceSettings | None = None
    ) -> AllReduceMember:
        """A peer that wants into an existing group; call ``request_join(now)`` next."""
        member = cls(me, group, (), settings)
        member.phase = Phase.JOINING
        member._contacts = tuple(sorted(set(contacts) - {me}))
        return member

    # -- queries -------------------------------------------------------------------------------

    @property
    def coordinator(self) -> str:
        """Who proposes next: the lowest id among the live candidates of this round."""
        return min(self._candidates())

    def next_deadline(self) -> float | None:
        """When the driver must call ``on_timeout`` next (None: no timer needed)."""
        return min(self._deadlines.values(), default=None)

    def left_out_by(self, group_members: Iterable[str]) -> bool:
        """Whether rounds this member keeps skipping mean the group goes on without it.

        ``group_members`` are the peers that say they are members of this group. Some of them
        that are not joiners this member admitted itself (and still waits for) form a group
        without it. A founder alone whose only fellow members are its own admitted joiners,
        still fetching the shared state, skips for want of members and is not left out: were
        it to leave and join again, those joiners would be left with a founder that is gone.
        """
        return bool(set(group_members) - set(self.pending_joins) - {self.me})

    def set_link_costs(self, costs: Mapping[tuple[str, str], float]) -> None:
        """Measured per-link cost (seconds per chunk) used to order the ring of proposals."""
        self.link_costs = dict(costs)

    # -- inputs from the caller ---------------------------------------------------------------

    def request_join(self, now: float) -> list[Event]:
        if self.phase is not Phase.JOINING:
            raise UsageError("request_join is for a joiner that has not been admitted")
        if self._join_requests >= self.settings.join_requests:
            self._deadlines = {}
            return [JoinFailed(f"no contact answered {self._join_requests} join requests")]
        self._join_requests += 1
        self._deadlines = {"join_request": now + self.settings.join_timeout_s}
        return [self._send(peer, JoinRequest()) for peer in self._contacts]

    def begin(self, now: float, weight: float, spec: RoundSpec) -> list[Event]:
        """Start round ``self.round`` with this member's weight and tensor spec."""
        if self.phase is not Phase.IDLE:
            raise UsageError(f"begin() in phase {self.phase.value}; wait for the round's end")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight {weight} must be finite and >= 0")
        self._weight = float(weight)
        self._spec = spec
        if self._skip_round is not None and self._skip_round[0] == self.round:
            return self._skip(self._skip_round[1])
        self.phase = Phase.GATHERING
        self._readies[self.me] = self._weight
        self._deadlines = {
            "ready": now + self.settings.ready_timeout_s,
            "proposal": now + self.settings.proposal_timeout_s,
        }
        events: list[Event] = [
            self._send(peer, Ready(self.round, self._weight))
            for peer in sorted(self.view - self.lost - {self.me})
        ]
        return events + self._maybe_propose(now)

    def transfer_done(self, round: int, attempt: int, result_hash: str, now: float) -> list[Event]:
        """The driver's ring for (round, attempt) finished with this result hash."""
        if (round, attempt) != (self.round, self.attempt) or self.phase is not Phase.TRANSFER:
            self.counters.stale += 1
            return []
        self.phase = Phase.COMMIT
        self._dones[self.me] = result_hash
        self._deadlines["done_ask"] = now + self.settings.coordinator_timeout_s
        assert self._proposal is not None
        events: list[Event] = [
            self._send(peer, Done(round, attempt, result_hash))
            for peer in self._proposal.members
            if peer != self.me and peer not in self.lost
        ]
        return events + self._check_commit(now)

    def on_peer_lost(self, peer: str, now: float) -> list[Event]:
        """The transport lost ``peer`` (closed, reset, heartbeat expired)."""
        if peer == self.me or peer in self.lost:
            self.counters.duplicate += 1
            return []
        self.lost.add(peer)
        self.view.discard(peer)
        self.pending_joins.pop(peer, None)
        if self.phase is Phase.JOINING and peer in self._contacts:
            self._contacts = tuple(c for c in self._contacts if c != peer)
            if not self._contacts:
                self._deadlines = {}
                return [JoinFailed("every contact of this joiner was lost")]
            return []
        self._readies.pop(peer, None)
        self._future_readies.pop(peer, None)
        in_attempt = self._proposal is not None and peer in self._proposal.members
        if self.phase in (Phase.ACCEPTED, Phase.TRANSFER) and in_attempt:
            return self._abort(f"peer {peer} lost", (peer,), now)
        if self.phase is Phase.COMMIT and in_attempt:
            return self._check_commit(now)
        if self.phase is Phase.GATHERING:
            return self._maybe_propose(now)
        if self.phase is Phase.RETRY:
            return self._repropose(now)
        return []

    def on_io_error(self, peer: str, reason: str, now: float, blame: bool = True) -> list[Event]:
        """The driver's transfer or send to ``peer`` failed inside the current attempt.

        ``blame=False`` for a stall (no data in time): in a ring every member stalls at about
        the same moment behind the one that hung, so the stalled neighbour is no evidence. The
        attempt aborts without a suspect; the hung member then fails to Accept the retry and
        the coordinator's accept timeout names it.
        """
        in_attempt = self._proposal is not None and peer in self._proposal.members
        if self.phase in (Phase.ACCEPTED, Phase.TRANSFER) and in_attempt:
            suspects = (peer,) if blame else ()
            return self._abort(f"I/O error with {peer}: {reason}", suspects, now)
        self.counters.stale += 1
        return []

    def on_timeout(self, now: float) -> list[Event]:
        """Fire every named deadline that is due."""
        events: list[Event] = []
        for name, at in sorted(self._deadlines.items(), key=lambda item: item[1]):
            if at <= now and self._deadlines.get(name) == at:
                del self._deadlines[name]
                self._fired.add(name)
                events += self._expire(name, now)
        return events

    def on_message(self, sender: str, raw: object, now: float) -> list[Event]:
        """Handle one control message; bad input yields ``Rejected``, never an exception."""
        try:
            message = decode_message(raw, self.group, self.settings)
        except MessageError as exc:
            return self._reject(sender, exc.reason)
        if isinstance(message, JoinRequest):
            return self._on_join_request(sender, now)
        if sender in self.lost:
            self.counters.stale += 1
            return []
        if self.phase is Phase.JOINING and not isinstance(message, JoinAck):
            # From before the admission (e.g. the Abort of an attempt this peer was in before
            # it restarted): nothing of it concerns a joiner.
            self.counters.stale += 1
            return []
        if not self._knows(sender):
            return self._reject(sender, "unknown sender: not a member, joiner or contact")
        if sender in self._excluded and getattr(message, "round", None) == self.round:
            self.counters.stale += 1  # suspected this round: its word no longer counts
            return []
        match message:
            case JoinAck():
                return self._on_join_ack(sender, message)
            case Ready():
                return self._on_ready(sender, message, now)
            case Proposal():
                return self._on_proposal(sender, message, now)
            case Accept():
                return self._on_accept(sender, message, now)
            case Refuse():
                return self._on_refuse(sender, message, now)
            case Go():
                return self._on_go(sender, message, now)
            case Abort():
                return self._on_abort(sender, message, now)
            case Done():
                return self._on_done(sender, message, now)
            case Excluded():
                return self._on_excluded(sender, message)
        raise AssertionError(f"unhandled message {message!r}")

    # -- message handlers ----------------------------------------------------------------------

    def _on_join_request(self, sender: str, now: float) -> list[Event]:
        if self.phase is Phase.JOINING:
            return self._reject(sender, "join request to a peer that is itself joining")
        if sender == self.me or len(sender) > self.settings.max_peer_id_chars:
            return self._reject(sender, "bad joiner id")
        known = self.view | set(self.pending_joins)
        if sender not in known and len(known) >= self.settings.max_group_size:
            return self._reject(sender, f"group is full ({self.settings.max_group_size})")
        # Admission only between rounds: once an attempt is under way, the joiner's first round
        # is the next one. Gathering Readies is still between rounds (no member is fixed yet),
        # so a member that began the round and the coordinator that has not give the same
        # answer: a joiner that heard "next round" first would fetch the state after this round
        # while the coordinator waited join_timeout_s for it in this one.
        between = self.phase in (Phase.IDLE, Phase.GATHERING)
        first = self.round if between else self.round + 1
        if self.pending_joins.get(sender, -1) >= first or sender in self.view - self.lost:
            self.counters.duplicate += 1
        else:
            self.pending_joins[sender] = first
            self._joiners_waited_for.discard(sender)  # a new admission: worth one wait again
        self.lost.discard(sender)
        events: list[Event] = []
        in_attempt = self._proposal is not None and sender in self._proposal.members
        if in_attempt and self.phase in (Phase.ACCEPTED, Phase.TRANSFER, Phase.COMMIT):
            # A member of this attempt asking to join has restarted as a joiner: it will send
            # no Done (and its Abort, if it sent one, may have died with its old connection).
            # Waiting for it would hold this member until attempt_timeout_s while the joiner
            # waits for the state after this round: abort now, without it.
            reason = f"{sender} asked to join again: it left this attempt"
            events += self._abort(reason, (sender,), now)
        elif in_attempt and self.phase is Phase.RETRY:
            self._suspect(sender)  # nor will it accept (or propose) the retry
            events += self._repropose(now)
        self._readies.pop(sender, None)  # a Ready from before the restart no longer holds
        members = tuple(sorted(self.view - self.lost))
        ack = JoinAck(self.pending_joins.get(sender, first), members)
        return [*events, self._send(sender, ack)]

    def _on_join_ack(self, sender: str, ack: JoinAck) -> list[Event]:
        if self.phase is not Phase.JOINING:
            self.counters.duplicate += 1
            return []
        if sender not in ack.members:
            return self._reject(sender, "join ack whose member list omits its sender")
        self.round = ack.round
        self.view = set(ack.members) | {self.me}
        self.phase = Phase.IDLE
        self._deadlines = {}
        # Only the coordinator's admissions decide a round's members, and a contact that is
        # not the coordinator does not pass its admission on: so tell every member this one
        # did not ask (their acks arrive as duplicates; each starts waiting for this joiner).
        unasked = sorted(set(ack.members) - set(self._contacts) - {self.me})
        events: list[Event] = [Admitted(ack.round, ack.members)]
        return events + [self._send(peer, JoinRequest()) for peer in unasked]

    def _on_ready(self, sender: str, ready: Ready, now: float) -> list[Event]:
        if ready.round == self.round + 1:
            self._future_readies[sender] = ready.weight
            return []
        if ready.round < self.round:
            # A member left behind: tell it that round is over so it moves on (and resyncs).
            self.counters.stale += 1
            over = Excluded(ready.round, "that round is already over", self.round)
            return [self._send(sender, over)]
        if ready.round > self.round:
            if sender not in self.view:
                return self._reject(sender, f"ready for round {ready.round}, this is {self.round}")
            # A member already two rounds on: those rounds ran without this member.
            self.left_behind_at = max(self.left_behind_at or 0, ready.round)
            reason = f"left behind: {sender} is at round {ready.round}, this is {self.round}"
            if self.phase is Phase.IDLE:
                self._skip_round = (self.round, reason)
                return []
            if self.phase in (Phase.GATHERING, Phase.RETRY):
                return self._skip(reason)
            self.counters.stale += 1
            return []
        if self._proposal is None:
            self._readies[sender] = ready.weight
            return self._maybe_propose(now) if self.phase is Phase.GATHERING else []
        if sender in self._proposal.members:
            self.counters.duplicate += 1
            return []
        # Any member of the attempt answers, not only its proposer: a joiner admitted by a
        # member that is not the coordinator may know no one else, and unanswered it would
        # wait out its ready timeout (it may even take itself for the coordinator).
        self.counters.stale += 1
        return self._left_out([sender])

    def _on_proposal(self, sender: str, p: Proposal, now: float) -> list[Event]:
        if p.round < self.round or (p.round, p.attempt) in self._aborted:
            self.counters.stale += 1
            return []
        if p.round > self.round:
            return self._reject(sender, f"proposal for round {p.round}, this is {self.round}")
        if sender != p.proposer:
            return self._reject(sender, "a proposal must come from its own proposer")
        if p.attempt < self.attempt or (p.attempt == self.attempt and self._proposal is not None):
            self.counters.stale += 1
            return []
        if self.phase is Phase.IDLE:
            if self.me in p.members:
                return self._reject(sender, f"proposal names me before I began {p.round}")
            self._skip_round = (p.round, f"round {p.round} started without this member")
            return []
        events: list[Event] = []
        if self._proposal is not None and (self.round, self.attempt) not in self._aborted:
            reason = f"superseded by attempt {p.attempt}"
            events += self._abort(reason, (), now, relay=False, repropose=False)
            if self.phase is not Phase.RETRY:  # the abort gave up on the round
                return events
        if self.me not in p.members:
            return events + self._skip(f"attempt {p.attempt} proposed without this member")
        problem = self._check_proposal(p)
        if problem is not None:
            events.append(self._send(sender, Refuse(p.round, p.attempt, problem)))
            return events + self._skip(f"refused the proposal: {problem}")
        held = sorted(set(self._readies) - set(p.members) - {self.me})
        self._enter_attempt(p)
        self.phase = Phase.ACCEPTED
        # Readies this member holds from peers the attempt leaves out: their senders may know
        # no other member (see _on_ready), so tell them now as the proposer does.
        events += self._left_out(held)
        # The coordinator gets its whole accept timeout to abort first (and name the silent
        # member), so members do not all blame the coordinator at the same instant.
        go_wait = self.settings.accept_timeout_s + self.settings.coordinator_timeout_s
        self._deadlines = {"go": now + go_wait}
        events.append(self._send(sender, Accept(p.round, p.attempt)))
        return events

    def _on_accept(self, sender: str, accept: Accept, now: float) -> list[Event]:
        if not self._current(accept.round, accept.attempt):
            return []
        p = self._proposal
        if self.phase is not Phase.ACCEPTED or p is None or p.proposer != self.me:
            self.counters.stale += 1
            return []
        if sender not in p.members or sender in self._accepts:
            self.counters.duplicate += 1
            return []
        self._accepts.add(sender)
        if self._accepts != set(p.members):
            return []
        events: list[Event] = [
            self._send(peer, Go(p.round, p.attempt)) for peer in p.members if peer != self.me
        ]
        return events + self._start_transfer(now)

    def _on_refuse(self, sender: str, refuse: Refuse, now: float) -> list[Event]:
        if not self._current(refuse.round, refuse.attempt):
            return []
        if self.phase is not Phase.ACCEPTED:
            self.counters.stale += 1
            return []
        return self._abort(f"{sender} refused: {refuse.reason}", (sender,), now)

    def _on_go(self, sender: str, go: Go, now: float) -> list[Event]:
        if not self._current(go.round, go.attempt):
            return []
        p = self._proposal
        if self.phase is not Phase.ACCEPTED or p is None or sender != p.proposer:
            self.counters.stale += 1
            return []
        return self._start_transfer(now)

    def _on_abort(self, sender: str, abort: Abort, now: float) -> list[Event]:
        key = (abort.round, abort.attempt)
        if key in self._aborted:
            self.counters.duplicate += 1
            return []
        if abort.round < self.round or (abort.round == self.round and abort.attempt < self.attempt):
            self.counters.stale += 1
            return []
        if abort.round > self.round:
            return self._reject(sender, f"abort for round {abort.round}, this is {self.round}")
        if abort.attempt > self.attempt or self._proposal is None:
            # An attempt this member never joined: remember it so its proposal is dropped.
            if abort.attempt <= self.settings.max_attempts:
                self._aborted.add(key)
            self.counters.stale += 1
            return []
        if self.phase not in (Phase.ACCEPTED, Phase.TRANSFER, Phase.COMMIT):
            self.counters.stale += 1
            return []
        if sender not in self._proposal.members:
            # Not part of this attempt (e.g. it proposed a rival attempt of the same number).
            self.counters.stale += 1
            return []
        return self._abort(f"aborted by {sender}: {abort.reason}", abort.suspects, now)

    def _on_done(self, sender: str, done: Done, now: float) -> list[Event]:
        events: list[Event] = []
        if done.ask:
            events += self._answer_done_ask(sender, done)
        if not self._current(done.round, done.attempt):
            return events
        return events + self._record_done(sender, done, now)

    def _answer_done_ask(self, sender: str, ask: Done) -> list[Event]:
        """A member lacks our Done (one was lost): answer from the current attempt or, if we
        completed that attempt and moved on, from the record of it. An attempt this member
        aborted, or left behind without completing it, gets an Abort instead: its own Abort
        may have been lost (with a connection, or a restart), and without it the asker would
        wait in COMMIT until attempt_timeout_s for a Done that never comes."""
        key = (ask.round, ask.attempt)
        past = self._completed.get(key)
        if past is not None:
            if sender not in past.members:
                return []
            return [self._send(sender, Done(ask.round, ask.attempt, past.result_hash))]
        current = (self.round, self.attempt)
        if key in self._aborted or key < current:
            gone = (self.me,) if ask.round < self.round else ()  # moved on: not in a retry
            why = "asked for a Done of an attempt this member did not complete"
            return [self._send(sender, Abort(ask.round, ask.attempt, why, gone))]
        mine = self._dones.get(self.me) if key == current else None
        return [] if mine is None else [self._send(sender, Done(ask.round, ask.attempt, mine))]

    def _record_done(self, sender: str, done: Done, now: float) -> list[Event]:
        p = self._proposal
        if p is None or sender not in p.members:
            return self._reject(sender, "done from a peer outside the attempt")
        previous = self._dones.get(sender)
        if previous is not None:
            if previous != done.result_hash:
                return self._reject(sender, "a second, different Done for the same attempt")
            self.counters.duplicate += 1
            return []
        self._dones[sender] = done.result_hash
        return self._check_commit(now)

    def _on_excluded(self, sender: str, excluded: Excluded) -> list[Event]:
        if excluded.at >= self.round + 2 and sender in self.view:
            # As for a Ready from two rounds on: rounds ran without this member.
            self.left_behind_at = max(self.left_behind_at or 0, excluded.at)
        if excluded.round != self.round:
            self.counters.stale += 1
            return []
        reason = f"excluded by {sender}: {excluded.reason}"
        if self.phase is Phase.IDLE:
            self._skip_round = (excluded.round, reason)
            return []
        if self.phase in (Phase.GATHERING, Phase.RETRY):
            return self._skip(reason)
        self.counters.stale += 1  # already in an attempt that includes this member
        return []

    # -- transitions ---------------------------------------------------------------------------

    def _maybe_propose(self, now: float) -> list[Event]:
        if self.phase is not Phase.GATHERING or self.coordinator != self.me:
            return []
        live = self._candidates()
        ready = {peer for peer in self._readies if peer in live}
        if ready != live and not self._expired("ready", now):
            return []
        joiners = {
            peer
            for peer, first in self.pending_joins.items()
            if first <= self.round and peer not in self.lost and peer not in self.view
        }
        waiting = joiners - set(self._readies) - self._joiners_waited_for
        if waiting and not self._expired("join", now):
            self._deadlines.setdefault("join", now + self.settings.join_timeout_s)
            return []
        # A joiner is waited for in one round only: one that is still not ready (fetching the
        # state, or gone without a word) would otherwise hold up every round by join_timeout_s.
        # It still takes part in any round whose Ready it sends in time.
        self._joiners_waited_for |= waiting
        members = ready | (joiners & set(self._readies))
        weights = {peer: self._readies[peer] for peer in members}
        # Late members and joiners admitted for a later round learn now that they sit this out.
        left_out = sorted((live | set(self._readies)) - members - self.lost - {self.me})
        events: list[Event] = self._propose(members, weights, 1, now)
        if self.phase is Phase.ACCEPTED:
            events += self._left_out(left_out)
        return events

    def _left_out(self, peers: Iterable[str]) -> list[Event]:
        """Tell ``peers`` that this round's attempt goes on without them."""
        reason = f"not part of round {self.round} (late, or admitted for a later round)"
        excluded = Excluded(self.round, reason, self.round)
        return [self._send(peer, excluded) for peer in peers]

    def _propose(
        self, members: set[str], weights: Mapping[str, float], attempt: int, now: float
    ) -> list[Event]:
        if len(members) < 2:
            return self._skip(f"fewer than two members for round {self.round}")
        if not math.fsum(weights[peer] for peer in members) > 0:
            return self._skip("the members' weights sum to zero")
        assert self._spec is not None
        ring = order_ring(sorted(members), self.link_costs)
        proposal = Proposal(
            self.round,
            attempt,
            ring,
            tuple(weights[peer] for peer in ring),
            self._spec,
            self.settings.chunk_elems,
            self.me,
        )
        self._enter_attempt(proposal)
        self._accepts = {self.me}
        self.phase = Phase.ACCEPTED
        self._deadlines = {"accept": now + self.settings.accept_timeout_s}
        return [self._send(peer, proposal) for peer in ring if peer != self.me]

    def _repropose(self, now: float) -> list[Event]:
        """After an abort: the survivors' lowest id proposes the next attempt."""
        if self.phase is not Phase.RETRY:
            return []
        assert self._proposal is not None
        survivors = self._candidates()
        if self.me not in survivors:
            return self._skip("suspected in this round's last attempt")
        if min(survivors) != self.me:
            return []
        return self._propose(survivors, self._proposal.weight_of(), self.attempt + 1, now)

    def _enter_attempt(self, proposal: Proposal) -> None:
        self._proposal = proposal
        self.attempt = proposal.attempt
        self._accepts = set()
        self._dones = {}
        self.view |= set(proposal.members)
        for peer in proposal.members:
            self.pending_joins.pop(peer, None)
        self._joiners_waited_for &= set(self.pending_joins)

    def _start_transfer(self, now: float) -> list[Event]:
        p = self._proposal
        assert p is not None
        self.phase = Phase.TRANSFER
        self._deadlines = {"attempt": now + self.settings.attempt_timeout_s}
        return [
            StartTransfer(
                p.round,
                p.attempt,
                p.members,
                p.weight_of(),
                p.spec,
                p.chunk_elems,
                transfer_tag_prefix(self.group, p.round, p.attempt),
            )
        ]

    def _check_commit(self, now: float) -> list[Event]:
        p = self._proposal
        if self.phase is not Phase.COMMIT or p is None:
            return []
        required = set(p.members) - self.lost
        if not required <= set(self._dones):
            return []
        hashes = set(self._dones.values())
        if len(hashes) != 1:
            mismatch = ParityMismatch(p.round, p.attempt, dict(self._dones))
            return [mismatch, *self._abort("result hashes differ", (), now)]
        (result_hash,) = hashes
        done = Completed(p.round, p.attempt, p.members, result_hash)
        self._completed[(p.round, p.attempt)] = done
        while len(self._completed) > self.settings.completed_memory:
            del self._completed[min(self._completed)]
        self._next_round()
        return [done]

    def _abort(
        self,
        reason: str,
        suspects: Iterable[str],
        now: float,
        relay: bool = True,
        repropose: bool = True,
    ) -> list[Event]:
        """Abort the current attempt: at most once per (round, attempt), relayed once."""
        key = (self.round, self.attempt)
        if key in self._aborted:
            self.counters.duplicate += 1
            return []
        self._aborted.add(key)
        p = self._proposal
        assert p is not None
        suspects = tuple(sorted(set(suspects)))
        events: list[Event] = [Aborted(self.round, self.attempt, reason)]
        if relay:
            why = reason[: self.settings.max_reason_chars]
            message = Abort(self.round, self.attempt, why, suspects)
            events += [
                self._send(peer, message)
                for peer in p.members
                if peer != self.me and peer not in self.lost
            ]
        self._excluded |= set(suspects)
        self.phase = Phase.RETRY
        self._deadlines = {"retry": now + self.settings.coordinator_timeout_s}
        if self.attempt >= self.settings.max_attempts:
            return events + self._skip(f"gave up after {self.attempt} attempts")
        return events + (self._repropose(now) if repropose else [])

    def _skip(self, reason: str) -> list[Event]:
        skipped = Skipped(self.round, reason)
        self._next_round()
        return [skipped]

    def _next_round(self) -> None:
        self.round += 1
        self.phase = Phase.IDLE
        self._deadlines = {}
        self._aborted = {key for key in self._aborted if key[0] >= self.round}
        self._reset_round()

    def _reset_round(self) -> None:
        self.attempt = 0
        self._proposal = None
        self._accepts = set()
        self._dones = {}
        self._excluded = set()
        self._fired = set()
        self._readies = {
            peer: w for peer, w in self._future_readies.items() if peer not in self.lost
        }
        self._future_readies = {}

    def _expire(self, name: str, now: float) -> list[Event]:
        if name in ("ready", "join"):
            return self._maybe_propose(now)
        if name == "proposal" and self.phase is Phase.GATHERING:
            # The coordinator never proposed: suspect it; the next lowest id takes over.
            self._suspect(self.coordinator)
            self._deadlines["proposal"] = now + self.settings.proposal_timeout_s
            return self._maybe_propose(now)
        if name == "accept" and self.phase is Phase.ACCEPTED and self._proposal is not None:
            missing = set(self._proposal.members) - self._accepts
            return self._abort(f"no accept from {sorted(missing)}", missing, now)
        if name == "go" and self.phase is Phase.ACCEPTED and self._proposal is not None:
            coordinator = self._proposal.proposer
            return self._abort(f"no go from coordinator {coordinator}", (coordinator,), now)
        if name == "done_ask" and self.phase is Phase.COMMIT and self._proposal is not None:
            # Some Done is late or lost: ask the missing members again (they answer from
            # memory even after moving on), well before the attempt timeout gives up.
            missing = set(self._proposal.members) - set(self._dones) - self.lost
            mine = Done(self.round, self.attempt, self._dones[self.me], ask=True)
            self._deadlines["done_ask"] = now + self.settings.coordinator_timeout_s
            return [self._send(peer, mine) for peer in sorted(missing)]
        if name == "attempt" and self._proposal is not None:
            if self.phase is Phase.TRANSFER:
                return self._abort("attempt timed out in the data phase", (), now)
            if self.phase is Phase.COMMIT:
                missing = set(self._proposal.members) - set(self._dones) - self.lost
                return self._abort(f"no Done from {sorted(missing)}", missing, now)
        if name == "retry" and self.phase is Phase.RETRY:
            self._suspect(self.coordinator)
            self._deadlines["retry"] = now + self.settings.coordinator_timeout_s
            return self._repropose(now)
        if name == "join_request" and self.phase is Phase.JOINING:
            return self.request_join(now)
        return []

    # -- small helpers -------------------------------------------------------------------------

    def _candidates(self) -> set[str]:
        pool = set(self._proposal.members) if self._proposal is not None else self.view
        live = pool - self.lost - self._excluded
        return live | ({self.me} if self.me not in self._excluded else set())

    def _suspect(self, peer: str) -> None:
        if peer != self.me:
            self._excluded.add(peer)
            self._readies.pop(peer, None)

    def _expired(self, name: str, now: float) -> bool:
        at = self._deadlines.get(name)
        return name in self._fired or (at is not None and at <= now)

    def _check_proposal(self, p: Proposal) -> str | None:
        mine = p.weight_of().get(self.me)
        if mine != self._weight:
            return f"proposal gives this member weight {mine}, it reported {self._weight}"
        if p.spec != self._spec:
            return "proposal's tensor spec or codec differs from this member's"
        return None

    def _current(self, round: int, attempt: int) -> bool:
        """True for the current attempt; counts and drops anything older or unknown."""
        if (round, attempt) == (self.round, self.attempt) and (round, attempt) not in self._aborted:
            return True
        self.counters.stale += 1
        return False

    def _knows(self, sender: str) -> bool:
        p = self._proposal
        return (
            sender in self.view
            or sender in self.pending_joins
            or sender in self._contacts
            or (p is not None and sender in p.members)
        )

    def _reject(self, sender: str, reason: str) -> list[Event]:
        self.counters.rejected += 1
        return [Rejected(sender[: self.settings.max_peer_id_chars], reason)]

    def _send(self, to: str, message: Message) -> Send:
        return Send(to, encode_message(self.group, message))
