"""The shared-seed ZO record log, sans-IO: who contributed what to step t, agreed by all.

Every node applies, for each step, the same records in the same canonical order, so the
replicas stay byte-identical (``trainer.zo``). This machine decides *which* records belong to
step t and keeps the log of those decisions; it never touches a socket, a clock or torch.

Records. A member publishes its records for step t as one message ``zo.r`` of a few bytes:
the step and one code byte per SPSA sample (sample index = position). Seeds derive from
(swarm, step, peer, index), so no seed travels.

Authentication: by the control link, not by signatures. An Ed25519 signature is 64 bytes, four
times the 16-byte budget of a peer-step; control links are Noise-authenticated libp2p streams,
so the peer a ``zo.r`` arrives from *is* its author (there is no author field to forge). Records
that travel through a third party (a log fetched for a join or a repair) are authenticated by a
hash chain instead: each closed step's digest covers the previous digest and the step's
content, the coordinator's close carries it, and a relayed step is accepted only if it
reproduces the digest the receiver already holds or extends the chain to a digest a
coordinator announced. A relayed step that does not is rejected ("not authenticated").
A member can still publish a bad gradient of its own; signatures would not prevent that either.

Agreement. The members of step t (``M_t``) are known to all. Step t is closed by a coordinator:
attempt a's coordinator is ``sorted(M_t)[a % |M_t|]``. It waits for every member's records
(or ``step_timeout_s``, or the member's loss) and sends ``zo.close`` (step, attempt, included
members as a bitmap, joiners admitted for t+1, chain digest). ``M_{t+1}`` = included + joiners:
a member whose records missed the close falls out and joins again by replay. A member that
waits longer than ``close_timeout_s`` for a close (or loses the coordinator) moves to the next
attempt; that coordinator first asks the others (``zo.query``); each promises to ignore older
attempts and reports a close it already took, which the new coordinator re-sends unchanged.
So one decision per step reaches every member that answered. A member cut off while that
happens can end up with a different step; the chain digest (checked against every close and
every anti-entropy digest) and the state hashes compared every ``hash_every_steps`` steps
catch it, and it re-syncs.

Repair. A member that lacks an included record, or sees a close for a later step, or an
anti-entropy digest ``zo.digest`` ahead of its own, fetches the closed steps (``zo.want`` ->
``zo.log``). Joiners follow the same path from the snapshot's step.

Snapshots and truncation. Every ``snapshot_every_steps`` steps (S, a multiple of K), at check
step s the node's state before s is its candidate snapshot; when every hash of step s equals
its own, the machine says :class:`SnapshotAgreed` and the node serves that state (revision s,
through the shared-state sync) instead of the previous one. The log then drops the steps before
s - S: one interval stays for a joiner that synced the previous snapshot a moment before, and
for a peer a little behind. A ``zo.want`` for a dropped step is answered ``zo.pruned`` (the
first step kept); the asker re-syncs from the latest snapshot. So the log holds at most about
2 S steps, whatever the run's length.

Archive. A node may also keep every closed step on disk (the node's ``zo-archive/``, bounded by
``zo_archive_max_steps``); it tells the machine the range (:class:`ArchiveRange`), and a
``zo.want`` for a step dropped from memory but archived is the archive's
(:class:`ServeArchive`: the node reads the steps and sends them as a ``zo.log``). A joiner asks
the members how far back they serve (``zo.ask`` -> ``zo.offer``) and, when it holds theta_0,
replays the whole log from step 0 instead of syncing the snapshot (:func:`choose_join_path`).

Rejections (each with a reason, nothing silently dropped): a record from a non-member of the
step, for a step more than ``max_future_steps`` ahead, more codes than ``samples_per_step``, a
second different record set for one step (a flood), a close from a peer that is not that
attempt's coordinator, a relayed step that is not authenticated by the chain.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

HASH_BYTES = 16  # state-hash prefix compared every hash_every_steps steps
DIGEST_BYTES = 16


def snapshot_interval_problem(
    snapshot_every_steps: int, hash_every_steps: int, prefix: str = ""
) -> str | None:
    """Why a snapshot interval does not fit the hash checks, or None when it does (``prefix``:
    how the caller's settings are named, e.g. ``zo_`` for the config keys)."""
    if snapshot_every_steps >= 0 and snapshot_every_steps % hash_every_steps == 0:
        return None
    return (
        f"{prefix}snapshot_every_steps ({snapshot_every_steps}) must be 0 or a multiple of "
        f"{prefix}hash_every_steps ({hash_every_steps}): a snapshot is taken where the state "
        f"hash is agreed"
    )


MAX_ARCHIVE_BUCKETS = 1024  # peers' archive buckets kept before the full ones are forgotten


@dataclass(frozen=True)
class ZOLogSettings:
    samples_per_step: int = 1
    step_timeout_s: float = 5.0  # coordinator: wait this long for a member's records
    close_timeout_s: float = 10.0  # member: wait this long for a close before the next attempt
    max_future_steps: int = 8  # records/closes further ahead than this are rejected
    hash_every_steps: int = 10  # K: state hashes ride on the records of steps t with t % K == 0
    anti_entropy_s: float = 1.0  # how often a member sends its log digest to the others
    repair_wait_s: float = 0.5  # wait this long for records a held close needs, then fetch
    max_log_steps_per_reply: int = 512
    # Archive replies (disk reads of up to max_log_steps_per_reply steps) one peer may get: a
    # token bucket of this rate and burst. A joiner asks once per position it reached, so only
    # a peer asking far faster than it can replay is refused (with a reason; it can ask again).
    archive_replies_per_s: float = 8.0
    archive_reply_burst: int = 16
    min_members: int = 1  # the founder waits for this many members before step 0
    max_rejections_kept: int = 100
    # Snapshots: every S steps (a multiple of hash_every_steps; 0 = off), once the state hash
    # of step s (the state before step s) is agreed, the node serves that state as the swarm's
    # snapshot and the log drops the steps before s - S (one interval back, for a joiner that
    # synced the previous snapshot and for a lagging peer).
    snapshot_every_steps: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.samples_per_step <= 255:
            raise ValueError("samples_per_step must be in 1..255")
        if self.hash_every_steps < 1 or self.max_future_steps < 1:
            raise ValueError("hash_every_steps and max_future_steps must be >= 1")
        if not self.archive_replies_per_s > 0 or self.archive_reply_burst < 1:
            raise ValueError("archive_replies_per_s must be > 0 and archive_reply_burst >= 1")
        problem = snapshot_interval_problem(self.snapshot_every_steps, self.hash_every_steps)
        if problem:
            raise ValueError(problem)

    def is_snapshot_step(self, step: int) -> bool:
        """Whether the state before ``step`` is a snapshot (taken after applying step - 1)."""
        s = self.snapshot_every_steps
        return bool(s and step > 0 and step % s == 0)


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Send:
    peer: str
    msg: dict[str, Any]


@dataclass(frozen=True)
class Produce:
    """The node must compute its records for ``step`` (on the state after step - 1)."""

    step: int


@dataclass(frozen=True)
class Apply:
    """Apply this closed step (in step order), then call :meth:`ZOLog.on_applied`.
    ``previous`` and ``digest``: the chain digests before and after it (what an archive of
    the closed steps keeps beside them)."""

    closed: ClosedStep
    previous: bytes = b""
    digest: bytes = b""


@dataclass(frozen=True)
class ServeArchive:
    """Answer ``peer``'s ``zo.want`` from the node's archive: closed steps [start, stop) as one
    ``zo.log`` (with ``"h": head``, the donor's last closed step). The archive lies outside
    the machine (on disk); the machine only decides that this request is the archive's."""

    peer: str
    start: int
    stop: int
    head: int


@dataclass(frozen=True)
class Rejected:
    peer: str
    reason: str


@dataclass(frozen=True)
class Resync:
    """This node's state or log differs from the swarm's: rebuild from the snapshot."""

    reason: str


@dataclass(frozen=True)
class SnapshotAgreed:
    """Every hash of check step ``step`` equals this node's: the state before ``step`` (the
    node's candidate, taken when it applied step - 1) is now the snapshot it serves; the log
    before ``log_start`` is dropped."""

    step: int
    log_start: int


Event = Send | Produce | Apply | Rejected | Resync | SnapshotAgreed | ServeArchive


# ----------------------------------------------------------------------------- closed steps


@dataclass(frozen=True)
class ClosedStep:
    """The agreed content of one step. ``codes[p]`` holds one signed byte per sample."""

    step: int
    members: tuple[str, ...]  # M_step, sorted
    included: tuple[str, ...]  # members whose records count, sorted
    codes: Mapping[str, bytes]
    hashes: Mapping[str, bytes]  # state hashes (check steps only) of included members
    joiners: tuple[str, ...]  # admitted from step + 1, sorted

    @property
    def next_members(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.included) | set(self.joiners)))

    def records(self) -> list[tuple[str, int, int]]:
        """(peer, sample_index, code) in canonical order (peer id bytes, then index)."""
        out = []
        for peer in sorted(self.included, key=str.encode):
            for index, byte in enumerate(self.codes[peer]):
                out.append((peer, index, byte - 256 if byte > 127 else byte))
        return out

    def digest(self, previous: bytes) -> bytes:
        h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"shoal-zo-chain")
        h.update(previous + struct.pack("<Q", self.step))
        for label, peers in (("m", self.members), ("i", self.included), ("j", self.joiners)):
            h.update(label.encode() + struct.pack("<I", len(peers)))
            for p in peers:
                raw = p.encode()
                h.update(struct.pack("<B", len(raw)) + raw)
        for p in self.included:
            code = self.codes[p]
            state = self.hashes.get(p, b"")
            h.update(struct.pack("<BB", len(code), len(state)) + code + state)
        return h.digest()


def genesis_digest(swarm: str, base_step: int, theta_0: bytes = b"") -> bytes:
    """The chain digest "before" the run's first step. ``theta_0``: the hash of the run's base
    weights, so the chain from step 0 authenticates them too: a node whose theta_0 differs
    holds another genesis and cannot take the log from step 0 as its own (see
    :func:`choose_join_path`)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"shoal-zo-genesis")
    h.update(f"{swarm}\x00{base_step}".encode())
    if theta_0:
        h.update(b"\x00theta0" + theta_0)
    return h.digest()


def _bitmap(members: Sequence[str], chosen: Sequence[str]) -> int:
    index = {p: i for i, p in enumerate(members)}
    return sum(1 << index[p] for p in chosen)


def _from_bitmap(members: Sequence[str], bits: int) -> tuple[str, ...]:
    return tuple(p for i, p in enumerate(members) if bits >> i & 1)


class LogFormatError(ValueError):
    pass


def encode_log(steps: Sequence[ClosedStep], previous: bytes) -> dict[str, Any]:
    """Consecutive closed steps as one ``zo.log`` message (a peer table, then ~10 B a step)."""
    peers = sorted({p for s in steps for p in (*s.members, *s.joiners)})
    rows = []
    for s in steps:
        rows.append(
            [
                _bitmap(s.members, s.included),
                b"".join(s.codes[p] for p in s.included),
                b"".join(s.hashes.get(p, b"") for p in s.included),
                _bitmap(peers, s.joiners),
            ]
        )
    return {
        "t": "zo.log",
        "P": peers,
        "s0": steps[0].step,
        "m0": _bitmap(peers, steps[0].members),
        "d0": previous,
        "S": rows,
    }


def decode_log(msg: Mapping[str, Any], samples: int) -> tuple[bytes, list[ClosedStep]]:
    """(digest before the first step, steps); raises LogFormatError on anything malformed."""
    peers, s0, m0, d0, rows = (msg.get(k) for k in ("P", "s0", "m0", "d0", "S"))
    if not (isinstance(peers, list) and all(isinstance(p, str) and p for p in peers)):
        raise LogFormatError("zo.log peer table is malformed")
    if peers != sorted(set(peers)) or len(peers) > 4096:
        raise LogFormatError("zo.log peer table must be sorted, unique, at most 4096")
    if not _is_count(s0) or not _is_count(m0) or not isinstance(d0, bytes):
        raise LogFormatError("zo.log header (s0, m0, d0) is malformed")
    if len(d0) != DIGEST_BYTES or not isinstance(rows, list) or not rows:
        raise LogFormatError("zo.log needs a 16-byte d0 and at least one step")
    members = _from_bitmap(peers, m0)
    out = []
    for offset, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 4):
            raise LogFormatError(f"zo.log step {s0 + offset} is not a 4-item row")
        inc_bits, codes, hashes, join_bits = row
        if not (_is_count(inc_bits) and _is_count(join_bits)):
            raise LogFormatError(f"zo.log step {s0 + offset}: bad bitmaps")
        if not (isinstance(codes, bytes) and isinstance(hashes, bytes)):
            raise LogFormatError(f"zo.log step {s0 + offset}: codes/hashes must be bytes")
        if inc_bits >> len(members) or join_bits >> len(peers):
            raise LogFormatError(f"zo.log step {s0 + offset}: bitmap outside the peer table")
        included = _from_bitmap(members, inc_bits)
        if len(codes) != samples * len(included):
            raise LogFormatError(
                f"zo.log step {s0 + offset}: {len(codes)} code bytes for {len(included)} "
                f"peers of {samples} samples"
            )
        if len(hashes) not in (0, HASH_BYTES * len(included)):
            raise LogFormatError(f"zo.log step {s0 + offset}: bad state-hash block")
        step = ClosedStep(
            step=s0 + offset,
            members=members,
            included=included,
            codes={p: codes[i * samples : (i + 1) * samples] for i, p in enumerate(included)},
            hashes={
                p: hashes[i * HASH_BYTES : (i + 1) * HASH_BYTES] for i, p in enumerate(included)
            }
            if hashes
            else {},
            joiners=_from_bitmap(peers, join_bits),
        )
        out.append(step)
        members = step.next_members
        if not members:
            raise LogFormatError(f"zo.log step {step.step} leaves no member")
    return d0, out


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


# ----------------------------------------------------------------------------- archive and join


@dataclass(frozen=True)
class ArchiveRange:
    """The closed steps [start, end) a node keeps on disk (``zo-archive/``), beyond the log in
    memory; ``before``: the chain digest of step start - 1 (the genesis when start is 0)."""

    start: int
    end: int
    before: bytes


@dataclass(frozen=True)
class ArchiveOffer:
    """A member's answer to a joiner's ``zo.ask``: its head, where its log in memory starts,
    and the range of its archive (None: it keeps none)."""

    peer: str
    head: int
    log_start: int
    archive: ArchiveRange | None

    def replays_from_zero(self) -> bool:
        """Whether this member can serve every closed step from step 0 to its head: the
        archive reaches step 0 and meets the log in memory."""
        a = self.archive
        return a is not None and a.start == 0 and a.end >= self.log_start


def offer_message(machine: ZOLog) -> dict[str, Any]:
    a = machine.archive
    head, _ = machine.head()
    return {
        "t": "zo.offer",
        "h": head,
        "l": machine.log_start,
        "a": [a.start, a.end, a.before] if a is not None else None,
    }


def parse_offer(sender: str, msg: Mapping[str, Any]) -> ArchiveOffer:
    """A ``zo.offer``; raises LogFormatError on anything malformed."""
    head, log_start, raw = msg.get("h"), msg.get("l"), msg.get("a")
    if not (isinstance(head, int) and not isinstance(head, bool) and head >= -1):
        raise LogFormatError("zo.offer needs an integer head 'h' >= -1")
    if not _is_count(log_start):
        raise LogFormatError("zo.offer needs an integer log start 'l'")
    archive = None
    if raw is not None:
        if not (isinstance(raw, list) and len(raw) == 3):
            raise LogFormatError("zo.offer archive 'a' must be [start, end, digest] or nil")
        start, end, before = raw
        if not (_is_count(start) and _is_count(end) and start <= end):
            raise LogFormatError("zo.offer archive range is malformed")
        if not (isinstance(before, bytes) and len(before) == DIGEST_BYTES):
            raise LogFormatError(f"zo.offer archive digest must be {DIGEST_BYTES} bytes")
        archive = ArchiveRange(start, end, before)
    return ArchiveOffer(sender, head, log_start, archive)


@dataclass(frozen=True)
class JoinChoice:
    """How a joiner catches up: ``replay`` (the whole log from step 0, on the theta_0 it holds,
    from ``donor``; no tensor moves) or ``snapshot`` (sync the latest snapshot, replay the log
    since). ``reason`` says why, for the log and ``shoal status``."""

    path: str
    reason: str
    donor: str | None = None
    steps: int = 0  # replay: the steps up to the donor's head


def choose_join_path(
    snapshot_step: int,
    genesis: bytes,
    offers: Sequence[ArchiveOffer],
    max_replay_steps: int,
) -> JoinChoice:
    """The joiner's rule. It replays from step 0 when it holds theta_0 (its snapshot is of step
    0 and its genesis digest, which covers theta_0's hash, is the one the member's archive
    chains from), a member can serve every step from 0 to its head, and that head is within
    ``max_replay_steps`` (0: never). Otherwise it syncs the snapshot, as before."""
    if max_replay_steps <= 0:
        return JoinChoice("snapshot", "join by replay is off (zo_replay_join_max_steps = 0)")
    if snapshot_step != 0:
        return JoinChoice(
            "snapshot", f"this node holds the snapshot of step {snapshot_step}, not theta_0"
        )
    if not offers:
        return JoinChoice("snapshot", "no member answered with its archive")
    full = [o for o in offers if o.replays_from_zero()]
    if not full:
        return JoinChoice(
            "snapshot", "no member's archive reaches step 0 (kept off, bounded, or restarted)"
        )
    ours = [o for o in full if o.archive is not None and o.archive.before == genesis]
    if not ours:
        return JoinChoice(
            "snapshot",
            "this node's theta_0 differs from the run's (its genesis digest, which covers "
            "theta_0's hash, is not the one the members' archives chain from)",
        )
    best = max(ours, key=lambda o: (o.head, o.peer))
    steps = best.head + 1
    if steps > max_replay_steps:
        return JoinChoice(
            "snapshot",
            f"the run is at step {best.head}: replaying {steps} steps is more than "
            f"zo_replay_join_max_steps ({max_replay_steps})",
        )
    return JoinChoice(
        "replay",
        f"it holds theta_0 and {best.peer}'s archive reaches step 0: replaying {steps} steps "
        f"fetches no tensor",
        best.peer,
        steps,
    )


# ----------------------------------------------------------------------------- the machine


@dataclass
class _Open:
    """The step being decided (``ZOLog.next_close``)."""

    step: int
    opened_at: float
    attempt: int = 0
    promised: int = 0
    records: dict[str, bytes] = field(default_factory=dict)
    hashes: dict[str, bytes] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    sent_own: bool = False
    waiting_since: float | None = None  # member: when it began waiting for the close
    promises: dict[str, ClosedStep | None] | None = None  # coordinator taking over
    close: tuple[str, tuple[str, ...], tuple[str, ...], bytes] | None = None  # held close
    close_at: float = 0.0


class ZOLog:
    """One node's view of the ZO record log.

    A founder starts with ``members=(me,)``; a joiner with ``members=None`` (follower) and a
    base (step, digest) from its snapshot: it fetches the log with :meth:`fetch_from`, replays,
    and asks to join with :meth:`request_join`.
    """

    def __init__(
        self,
        me: str,
        settings: ZOLogSettings,
        genesis: bytes,
        base_step: int = 0,
        members: Sequence[str] | None = None,
        now: float = 0.0,
    ) -> None:
        self.me = me
        self.settings = settings
        self.base_step = base_step
        self.chain: dict[int, bytes] = {base_step - 1: genesis}
        self.log: dict[int, ClosedStep] = {}
        self.snapshot_step = base_step  # the latest agreed snapshot (the base is one)
        self.log_start = base_step  # the lowest step the log still holds (chain: one before)
        self.snapshots_agreed = 0
        self.next_close = base_step  # the lowest step not yet closed here
        self.applied = base_step  # the lowest step not yet applied here
        self.members: tuple[str, ...] | None = tuple(sorted(members)) if members else None
        self.open = _Open(base_step, now)
        self.pending_joiners: dict[str, int] = {}  # coordinator: joiner -> steps it applied
        self.followers: set[str] = set()  # peers that get full closes (joining)
        self.buffered: dict[int, dict[str, tuple[bytes, bytes]]] = {}  # future records
        self.held: dict[int, ClosedStep] = {}  # closed steps waiting for earlier ones
        self.own_hashes: dict[int, bytes] = {}  # step c -> hash of the state before step c
        self.announced: dict[int, bytes] = {}  # step -> digest a coordinator announced
        self.rejections: list[str] = []
        self.rejected_total = 0
        self.parity_checks_passed = 0
        self.parity_checks_failed = 0
        self.checks: list[tuple[int, str]] = []  # (step c, own hash hex) per check passed
        self.last_anti_entropy = now
        self.joining = members is None
        self.join_sent_at: float | None = None
        self.closes_sent = 0
        self.late_records = 0
        self.fetches = 0
        self._apply_pending = False
        self._now = now
        self._behind_at: int | None = None
        self._fetch: tuple[int, str] | None = None
        self._fetch_at = -1e9
        self._donor: str | None = None
        self._catch_up_steps = 0
        self.archive: ArchiveRange | None = None  # set by the node: what its disk archive holds
        self.archive_serves = 0
        self.archive_refused = 0
        self._archive_buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, at)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def is_member(self) -> bool:
        return self.members is not None and self.me in self.members

    def coordinator(self, attempt: int | None = None) -> str | None:
        if not self.members:
            return None
        a = self.open.attempt if attempt is None else attempt
        return self.members[a % len(self.members)]

    def _archive_token(self, peer: str, now: float) -> bool:
        """Take one archive reply from ``peer``'s bucket; False when it is empty."""
        rate, burst = self.settings.archive_replies_per_s, self.settings.archive_reply_burst
        tokens, at = self._archive_buckets.get(peer, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if len(self._archive_buckets) > MAX_ARCHIVE_BUCKETS:
            full = burst / rate  # a bucket idle this long is full again: forgetting it is exact
            self._archive_buckets = {
                p: (t, a) for p, (t, a) in self._archive_buckets.items() if now - a < full
            }
        if tokens < 1:
            self._archive_buckets[peer] = (tokens, now)
            return False
        self._archive_buckets[peer] = (tokens - 1, now)
        return True

    def _reject(self, peer: str, reason: str) -> list[Event]:
        self.rejected_total += 1
        self.rejections.append(f"{peer}: {reason}")
        del self.rejections[: -self.settings.max_rejections_kept]
        return [Rejected(peer, reason)]

    def _others(self) -> list[str]:
        return [p for p in (self.members or ()) if p != self.me]

    def head(self) -> tuple[int, bytes]:
        """(last closed step, its chain digest)."""
        return self.next_close - 1, self.chain[self.next_close - 1]

    # -- inputs from the node ----------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        """A founder's first events (Produce for its first step once enough members)."""
        return [Produce(self.open.step)] if self.is_member else []

    def on_records_ready(self, step: int, codes: bytes, now: float) -> list[Event]:
        """The node computed its own records for ``step``: publish them."""
        if step != self.open.step or not self.is_member or self.open.sent_own:
            return []
        if len(codes) != self.settings.samples_per_step:
            raise ValueError(f"expected {self.settings.samples_per_step} codes, got {len(codes)}")
        self.open.records[self.me] = codes
        msg: dict[str, Any] = {"t": "zo.r", "s": step, "c": codes}
        own_hash = self.own_hashes.get(step)
        if own_hash is not None:
            msg["h"] = own_hash
            self.open.hashes[self.me] = own_hash
        self.open.sent_own = True
        self.open.waiting_since = now
        events: list[Event] = [Send(p, msg) for p in self._others()]
        return events + self._maybe_close(now)

    def on_applied(self, step: int, state_hash: bytes | None, now: float) -> list[Event]:
        """The node applied closed step ``step``; ``state_hash`` (HASH_BYTES) is the hash of
        the state after it, given when step + 1 is a check step."""
        if step != self.applied:
            raise ValueError(f"applied step {step}, expected {self.applied}")
        self.applied = step + 1
        self._apply_pending = False
        self._now = now
        events: list[Event] = []
        if state_hash is not None:
            self.own_hashes[step + 1] = state_hash
            closed = self.log.get(step + 1)
            if closed is not None:  # replaying: the log already holds the swarm's hashes
                events += self._check_hashes(closed)
        for old in [s for s in self.own_hashes if s < step - 2 * self.settings.hash_every_steps]:
            del self.own_hashes[old]
        events += self._emit_applies()
        if (
            self.joining
            and self.is_member
            and self.applied == self.next_close
            and self._catch_up_steps <= self.settings.max_future_steps
        ):
            # Caught up, and the agreed log still counts us a member: a re-sync that replayed
            # faster than the others closed us out. We are a member, not a joiner (a joiner's
            # admission would never come: the coordinator ignores joins from members).
            self.joining = False
            self.join_sent_at = None
        if self.is_member and self.applied == self.open.step and not self.open.sent_own:
            events.append(Produce(self.open.step))
        if self.joining and self.applied == self.next_close:
            events += self._catch_up(now)
        return events

    def _catch_up(self, now: float) -> list[Event]:
        """A joiner that applied all it has: fetch again while far behind, else ask to join
        (it then follows the live closes until the coordinator admits it)."""
        if self.join_sent_at is not None or self._donor is None:
            return self.request_join(now)
        if self._catch_up_steps > self.settings.max_future_steps:
            self._catch_up_steps = 0
            return self.fetch_from(self._donor)
        return self.request_join(now)

    def on_peer_lost(self, peer: str, now: float) -> list[Event]:
        self.followers.discard(peer)
        self.pending_joiners.pop(peer, None)
        if self.members is None or peer not in self.members:
            return []
        self.open.lost.add(peer)
        events: list[Event] = []
        if self.coordinator() == peer:
            events += self._next_attempt(now)
        return events + self._maybe_close(now)

    def on_tick(self, now: float) -> list[Event]:
        events: list[Event] = []
        o = self.open
        if (
            self.is_member
            and o.sent_own
            and o.waiting_since is not None
            and self.coordinator() != self.me
            and now - o.waiting_since > self.settings.close_timeout_s
        ):
            events += self._next_attempt(now)
        events += self._maybe_close(now)
        if o.close is not None and now - o.close_at > self.settings.repair_wait_s:
            self.announced[o.step] = o.close[3]
            events += self.fetch_from(o.close[0])
        if self.is_member and now - self.last_anti_entropy >= self.settings.anti_entropy_s:
            self.last_anti_entropy = now
            last, digest = self.head()
            msg = {"t": "zo.digest", "s": last, "d": digest}
            events += [Send(p, msg) for p in self._others()]
        if (
            self.joining
            and self.join_sent_at is not None
            and now - self.join_sent_at > self.settings.close_timeout_s
        ):
            events += self.request_join(now)
        return events

    def fetch_from(self, peer: str) -> list[Event]:
        """Ask ``peer`` for every closed step from ours on (once per position and timeout)."""
        if self._fetch == (self.next_close, peer) and (
            self._now - self._fetch_at < self.settings.close_timeout_s
        ):
            return []
        self._fetch, self._fetch_at = (self.next_close, peer), self._now
        self.fetches += 1
        return [Send(peer, {"t": "zo.want", "s": self.next_close})]

    def request_join(self, now: float, to: Sequence[str] = ()) -> list[Event]:
        """Ask to be admitted (to ``to``, else to the current members)."""
        targets = list(to) or [p for p in (self.members or ()) if p != self.me]
        self.join_sent_at = now
        self.joining = True
        msg = {"t": "zo.join", "a": self.applied}
        return [Send(p, msg) for p in targets]

    # -- messages ----------------------------------------------------------------------------

    def on_message(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        kind = msg.get("t")
        handler = {
            "zo.r": self._on_records,
            "zo.close": self._on_close,
            "zo.query": self._on_query,
            "zo.promise": self._on_promise,
            "zo.want": self._on_want,
            "zo.log": self._on_log,
            "zo.digest": self._on_digest,
            "zo.join": self._on_join,
            "zo.pruned": self._on_pruned,
            "zo.ask": self._on_ask,
        }.get(kind)  # type: ignore[arg-type]
        if handler is None:
            return self._reject(sender, f"unknown ZO message type {str(kind)[:40]!r}")
        self._now = now
        try:
            return handler(sender, msg, now)
        except (LogFormatError, KeyError, TypeError, ValueError) as exc:
            return self._reject(sender, f"malformed {kind}: {exc}")

    def _on_records(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        step, codes, state_hash = msg.get("s"), msg.get("c"), msg.get("h")
        if not _is_count(step) or not isinstance(codes, bytes):
            return self._reject(sender, "zo.r needs an integer step 's' and bytes 'c'")
        if state_hash is not None and not (
            isinstance(state_hash, bytes) and len(state_hash) == HASH_BYTES
        ):
            return self._reject(sender, f"zo.r state hash must be {HASH_BYTES} bytes")
        samples = self.settings.samples_per_step
        if len(codes) > samples:
            return self._reject(
                sender,
                f"flood: {len(codes)} records for step {step}, at most {samples} per peer-step",
            )
        if len(codes) != samples or any(b == 0x80 for b in codes):
            return self._reject(sender, f"zo.r for step {step} needs {samples} codes in -127..127")
        known = set(self.members or ()) | set(self.pending_joiners) | self.followers
        if sender not in known:
            return self._reject(sender, f"{sender} is not a member of the ZO group (step {step})")
        if step < self.open.step:
            self.late_records += 1  # the close of that step did without them
            return []
        if step > self.open.step + self.settings.max_future_steps:
            return self._reject(
                sender,
                f"far-future step {step}: this node is at step {self.open.step} "
                f"(at most {self.settings.max_future_steps} ahead)",
            )
        if step == self.open.step and (self.members is None or sender not in self.members):
            return self._reject(sender, f"{sender} is not a member of step {step}")
        entry = (codes, state_hash or b"")
        if step == self.open.step:
            previous = self.open.records.get(sender)
            if previous is not None:
                return self._reject(sender, f"flood: a second record set for step {step}")
            self.open.records[sender] = codes
            if state_hash is not None:
                self.open.hashes[sender] = state_hash
            return self._maybe_close(now) + self._try_close_from_records()
        slot = self.buffered.setdefault(step, {})
        if sender in slot:
            return self._reject(sender, f"flood: a second record set for step {step}")
        slot[sender] = entry
        return []

    def _maybe_close(self, now: float) -> list[Event]:
        o = self.open
        if not self.is_member or self.coordinator() != self.me or self.applied < o.step:
            return []
        assert self.members is not None
        if o.promises is not None:  # taking over: wait for every live member's promise
            waiting = [p for p in self._others() if p not in o.promises and p not in o.lost]
            if waiting and now - o.opened_at < self.settings.step_timeout_s:
                return []
            taken = [c for c in o.promises.values() if c is not None]
            if taken:
                return self._decide(taken[0], o.attempt)
        if self.me not in o.records:
            return []
        if o.step == self.base_step and len(self.members) + len(self.pending_joiners) < max(
            1, self.settings.min_members
        ):
            return []
        missing = [p for p in self.members if p not in o.records and p not in o.lost]
        if missing and now - o.opened_at < self.settings.step_timeout_s:
            return []
        included = tuple(p for p in self.members if p in o.records)
        check = o.step % self.settings.hash_every_steps == 0 and o.step > self.base_step
        joiners = tuple(
            sorted(
                p
                for p, applied in self.pending_joiners.items()
                if applied >= o.step and p not in self.members
            )
        )
        closed = ClosedStep(
            step=o.step,
            members=self.members,
            included=included,
            codes={p: o.records[p] for p in included},
            hashes={p: o.hashes[p] for p in included if p in o.hashes} if check else {},
            joiners=joiners,
        )
        if check and set(closed.hashes) != set(included):
            # A member that sent no hash on a check step is left out of the hash block.
            closed = ClosedStep(
                closed.step, closed.members, closed.included, closed.codes, {}, closed.joiners
            )
        return self._decide(closed, o.attempt)

    def _decide(self, closed: ClosedStep, attempt: int) -> list[Event]:
        previous = self.chain[closed.step - 1]
        digest = closed.digest(previous)
        self.closes_sent += 1
        msg = {
            "t": "zo.close",
            "s": closed.step,
            "a": attempt,
            "i": _bitmap(closed.members, closed.included),
            "j": list(closed.joiners),
            "d": digest,
        }
        events: list[Event] = [Send(p, msg) for p in self._others()]
        full = encode_log([closed], previous) | {"a": attempt, "live": True}
        recipients = (self.followers | set(self.pending_joiners)) - set(closed.members)
        events += [Send(p, full) for p in sorted(recipients)]
        for p in closed.joiners:
            self.pending_joiners.pop(p, None)
        return events + self._accept(closed, digest)

    def _accept(self, closed: ClosedStep, digest: bytes) -> list[Event]:
        """Take closed step ``next_close`` into the log; open the next step."""
        assert closed.step == self.next_close
        self.log[closed.step] = closed
        self.chain[closed.step] = digest
        self.announced.pop(closed.step, None)
        self.next_close = closed.step + 1
        self.members = closed.next_members
        for p in closed.joiners:
            self.followers.discard(p)
        if self.me in closed.joiners:
            self.joining = False
        carried = self.buffered.pop(self.next_close, {})
        for old in [s for s in self.buffered if s < self.next_close]:
            del self.buffered[old]
        self.open = _Open(self.next_close, self._now)
        for peer, (codes, state_hash) in carried.items():
            if peer in self.members:
                self.open.records[peer] = codes
                if state_hash:
                    self.open.hashes[peer] = state_hash
        events: list[Event] = []
        if self.me in closed.members and self.me not in closed.included and not self.joining:
            # Our records missed the close: we are out of M_{t+1} and must join again.
            events += self.request_join(self._now, [p for p in closed.next_members if p != self.me])
        events += self._check_hashes(closed)
        events += self._emit_applies()
        held = self.held.pop(self.next_close, None)
        if held is not None:
            events += self._take_verified(held, None)
        return events

    def _emit_applies(self) -> list[Event]:
        # One Apply at a time: the node reports on_applied before the next is emitted.
        if self.applied < self.next_close and not self._apply_pending:
            self._apply_pending = True
            step = self.applied
            return [Apply(self.log[step], self.chain[step - 1], self.chain[step])]
        return []

    def _check_hashes(self, closed: ClosedStep) -> list[Event]:
        if not closed.hashes:
            return []
        own = self.own_hashes.get(closed.step)
        if own is None:
            return []
        values = list(closed.hashes.values())
        majority = max(set(values), key=values.count)
        if own != majority and values.count(majority) * 2 > len(values):
            self.parity_checks_failed += 1
            return [Resync(f"state hash differs from the swarm's at step {closed.step}")]
        if all(v == own for v in values):
            self.parity_checks_passed += 1
            self.checks.append((closed.step, own.hex()))
            del self.checks[:-1000]
            if self.settings.is_snapshot_step(closed.step) and closed.step > self.snapshot_step:
                return self._agree_snapshot(closed.step)
        return []

    def _agree_snapshot(self, step: int) -> list[Event]:
        """The state before ``step`` is agreed: it becomes the snapshot; truncate the log.

        The steps from one interval back stay (a joiner may have synced the previous snapshot
        just before this one replaced it; a peer a little behind may still fetch them), so the
        log holds at most two intervals plus the steps in flight.
        """
        self.snapshot_step = step
        self.snapshots_agreed += 1
        keep_from = max(self.log_start, step - self.settings.snapshot_every_steps)
        for old in range(self.log_start, keep_from):
            self.log.pop(old, None)
            self.chain.pop(old - 1, None)
        self.log_start = keep_from
        return [SnapshotAgreed(step, keep_from)]

    # -- closes and takeovers ----------------------------------------------------------------

    def _on_close(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        step, attempt, inc, joiners, digest = (msg.get(k) for k in ("s", "a", "i", "j", "d"))
        if not (_is_count(step) and _is_count(attempt) and _is_count(inc)):
            return self._reject(sender, "zo.close needs integer s, a, i")
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            return self._reject(sender, "zo.close digest must be 16 bytes")
        if not isinstance(joiners, list) or not all(isinstance(j, str) for j in joiners):
            return self._reject(sender, "zo.close joiners must be a list of peer ids")
        if step < self.next_close:
            mine = self.chain.get(step)
            if mine is not None and mine != digest:  # None: truncated, long agreed
                return [Resync(f"step {step} closed by {sender} differs from this node's log")]
            return []
        if step > self.next_close + self.settings.max_future_steps:
            return self._reject(sender, f"far-future close for step {step}")
        if step > self.next_close:
            self.announced[step] = digest
            return self.fetch_from(sender)
        assert self.members is not None or self.joining
        if self.members is None:
            return []
        if sender != self.coordinator(attempt):
            return self._reject(
                sender, f"close for step {step} attempt {attempt} from a peer not its coordinator"
            )
        if attempt < self.open.promised:
            return self._reject(
                sender, f"stale close attempt {attempt} (promised {self.open.promised})"
            )
        self._now = now
        members = self.members
        if inc >> len(members):
            return self._reject(sender, "zo.close bitmap outside the members of the step")
        self.open.close = (sender, _from_bitmap(members, inc), tuple(sorted(joiners)), digest)
        self.open.close_at = now
        return self._try_close_from_records()

    def _try_close_from_records(self) -> list[Event]:
        """Take the close we hold for the open step if our records reproduce its digest.

        Records travel on other links than the close, so they may still be on their way: the
        step is fetched only after ``repair_wait_s`` (see :meth:`on_tick`).
        """
        o = self.open
        if o.close is None or self.members is None:
            return []
        sender, included, joiners, digest = o.close
        if not all(p in o.records for p in included):
            return []
        check = o.step % self.settings.hash_every_steps == 0 and o.step > self.base_step
        hashes = {p: o.hashes[p] for p in included if p in o.hashes} if check else {}
        if check and set(hashes) != set(included):
            hashes = {}
        closed = ClosedStep(
            o.step, self.members, included, {p: o.records[p] for p in included}, hashes, joiners
        )
        if closed.digest(self.chain[o.step - 1]) == digest:
            return self._accept(closed, digest)
        # We hold different records: fetch the step as the coordinator closed it.
        self.announced[o.step] = digest
        return self.fetch_from(sender)

    def _next_attempt(self, now: float) -> list[Event]:
        o = self.open
        if self.members is None:
            return []
        for _ in range(len(self.members)):
            o.attempt += 1
            if self.coordinator() not in o.lost:
                break
        o.promised = max(o.promised, o.attempt)
        o.waiting_since = now
        if self.coordinator() != self.me:
            return []
        o.promises = {}
        o.opened_at = now
        msg = {"t": "zo.query", "s": o.step, "a": o.attempt}
        return [Send(p, msg) for p in self._others() if p not in o.lost] + self._maybe_close(now)

    def _on_query(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        step, attempt = msg.get("s"), msg.get("a")
        if not (_is_count(step) and _is_count(attempt)):
            return self._reject(sender, "zo.query needs integer s, a")
        if step < self.next_close:  # we took that step already: tell the new coordinator
            closed = self.log.get(step)
            if closed is None:
                return []
            reply = encode_log([closed], self.chain[step - 1])
            return [Send(sender, {"t": "zo.promise", "s": step, "a": attempt, "log": reply})]
        if step != self.open.step or self.members is None or sender != self.coordinator(attempt):
            return self._reject(sender, f"zo.query for step {step} attempt {attempt} not expected")
        o = self.open
        if attempt < o.promised and attempt != o.attempt:
            return []
        o.promised = o.attempt = attempt
        o.waiting_since = now
        return [Send(sender, {"t": "zo.promise", "s": step, "a": attempt})]

    def _on_promise(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        o = self.open
        if msg.get("s") != o.step or msg.get("a") != o.attempt or o.promises is None:
            return []
        taken: ClosedStep | None = None
        raw = msg.get("log")
        if raw is not None:
            previous, steps = decode_log(raw, self.settings.samples_per_step)
            if previous == self.chain[o.step - 1] and steps and steps[0].step == o.step:
                taken = steps[0]
        o.promises[sender] = taken
        return self._maybe_close(now)

    # -- log repair and joins ----------------------------------------------------------------

    def _on_want(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        start = msg.get("s")
        if not _is_count(start):
            return self._reject(sender, "zo.want needs an integer step 's'")
        if start < self.log_start:
            a = self.archive
            if a is not None and a.start <= start < a.end and a.end >= self.log_start:
                # Dropped from memory, kept on disk: the node answers from its archive.
                if not self._archive_token(sender, now):
                    self.archive_refused += 1
                    rate = self.settings.archive_replies_per_s
                    return self._reject(
                        sender, f"zo.want: over {rate:g} archive replies per second; not served"
                    )
                self.archive_serves += 1
                stop = min(a.end, start + self.settings.max_log_steps_per_reply)
                return [ServeArchive(sender, start, stop, self.next_close - 1)]
            # Truncated: the asker must start from a later snapshot.
            kept = a is not None and a.start < self.log_start <= a.end
            first = a.start if kept and a is not None else self.log_start
            return [Send(sender, {"t": "zo.pruned", "s": first})]
        if start >= self.next_close:  # nothing to send: say where the log ends, and who is in
            last, digest = self.head()
            members = list(self.members or ())
            return [Send(sender, {"t": "zo.digest", "s": last, "d": digest, "m": members})]
        stop = min(self.next_close, start + self.settings.max_log_steps_per_reply)
        steps = [self.log[s] for s in range(start, stop)]
        return [Send(sender, encode_log(steps, self.chain[start - 1]) | {"h": self.next_close - 1})]

    def _on_log(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        self._now = now
        previous, steps = decode_log(msg, self.settings.samples_per_step)
        if _is_count(msg.get("h")):  # a reply to zo.want: the donor's head
            self._donor = sender
            self._catch_up_steps = msg["h"] + 1 - self.next_close
        events: list[Event] = []
        prev = previous
        for closed in steps:
            before, prev = prev, closed.digest(prev)
            if closed.step < self.next_close:
                if self.chain.get(closed.step - 1) == before and self.chain[closed.step] != prev:
                    return events + self._reject(
                        sender,
                        f"step {closed.step} is not authenticated: it does not hash to the "
                        f"chain digest this node holds",
                    )
                continue
            if closed.step > self.next_close:
                if closed.step <= self.next_close + self.settings.max_future_steps:
                    self.held[closed.step] = closed
                    self.announced.setdefault(closed.step, prev)
                return events + self.fetch_from(sender)
            if before != self.chain[closed.step - 1]:
                return events + self._reject(
                    sender,
                    f"step {closed.step} is not authenticated: it does not chain to this node's "
                    f"digest of step {closed.step - 1}",
                )
            events += self._take_verified(closed, sender)
        if msg.get("live") and self.joining and self.applied == self.next_close:
            events += self.request_join(now, [sender])
        return events

    def _take_verified(self, closed: ClosedStep, sender: str | None) -> list[Event]:
        digest = closed.digest(self.chain[closed.step - 1])
        announced = self.announced.get(closed.step)
        if announced is not None and announced != digest:
            return self._reject(
                sender or "?",
                f"step {closed.step} is not authenticated: its digest differs from the close",
            )
        self.announced.pop(closed.step, None)
        if self.members is not None and not self.joining and closed.members != self.members:
            return [Resync(f"member set of step {closed.step} differs from this node's")]
        return self._accept(closed, digest)

    def _on_digest(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        step, digest = msg.get("s"), msg.get("d")
        if not isinstance(step, int) or not isinstance(digest, bytes):
            return self._reject(sender, "zo.digest needs an integer s and bytes d")
        if self.joining and self.join_sent_at is None and step < self.next_close:
            # The answer to a joiner's zo.want: nothing more to replay, ask to join.
            # (an empty list comes from a peer that knows no members yet: no member set)
            if self.members is None and isinstance(msg.get("m"), list) and msg["m"]:
                self.members = tuple(sorted(str(p) for p in msg["m"]))
            if self.applied == self.next_close:
                return self.request_join(now)
            return []
        if step < self.next_close:
            mine = self.chain.get(step)
            if mine is not None and mine != digest:
                return [Resync(f"log digest of step {step} differs from {sender}'s")]
            return []
        if step >= self.next_close:
            # One step ahead is normal (a close in flight); ahead twice at the same place is not.
            if self._behind_at == self.next_close or step > self.next_close:
                self._behind_at = None
                return self.fetch_from(sender)
            self._behind_at = self.next_close
        return []

    def _on_pruned(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        first = msg.get("s")
        if not _is_count(first):
            return self._reject(sender, "zo.pruned needs an integer step 's'")
        if first <= self.next_close:  # an answer to an older want: we are past that now
            return []
        return [
            Resync(
                f"{sender} no longer holds the log from step {self.next_close} (it keeps steps "
                f"from {first}): re-syncing from the latest snapshot"
            )
        ]

    def _on_ask(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        """A joiner asks how far back this node can serve the log (see choose_join_path)."""
        return [Send(sender, offer_message(self))]

    def _on_join(self, sender: str, msg: Mapping[str, Any], now: float) -> list[Event]:
        applied = msg.get("a")
        if not _is_count(applied):
            return self._reject(sender, "zo.join needs an integer 'a'")
        if self.members is not None and sender in self.members:
            return []
        self.followers.add(sender)
        if self.is_member and self.coordinator() == self.me:
            self.pending_joiners[sender] = applied
            return self._maybe_close(now)
        return []
