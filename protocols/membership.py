"""Swarm membership by push-pull anti-entropy of signed presence records (sans-IO).

Every heartbeat a node re-signs its own record and runs one exchange with each of ``fanout``
partners, taken round-robin from the live members (a newly seen member goes first):

    A -> B  sync      {digest: A's peer->seq map, recs: [A's own fresh record], ts}
    B -> A  sync_ack  {recs: records B has newer than A's digest, digest: B's map, ts echo}
    A -> B  recs      {recs: records A has newer than B's digest}        (only if any)

so fresh records spread epidemically (a swarm of N converges in O(log N) heartbeats) while each
node sends O(fanout) messages per heartbeat whatever N is. Liveness comes from expiry: a member
whose record is not refreshed within ``record_ttl_s`` leaves every view; a member that stops
gracefully broadcasts a signed leave and leaves every view at once.

Time enters as ``now`` (Unix seconds, the clock records are stamped with), so every rule here is
testable without sockets or sleeping. The caller moves the returned messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocols.presence import MemberTable, Offer, PresenceRecord, RecordError, Signer

Message = dict[str, Any]
Send = tuple[str, Message]


@dataclass(frozen=True)
class MembershipSettings:
    heartbeat_s: float = 2.0
    record_ttl_s: float = 12.0
    fanout: int = 2
    max_clock_skew_s: float = 30.0
    max_records_per_message: int = 1024


@dataclass
class Reaction:
    """What an incoming message changed, and what to send because of it."""

    sends: list[Send] = field(default_factory=list)
    joined: list[PresenceRecord] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    rtt_s: float | None = None


@dataclass
class Tick:
    expired: list[str]
    sends: list[Send]


class Membership:
    """One node's side of the membership protocol."""

    def __init__(
        self,
        swarm: str,
        signer: Signer,
        settings: MembershipSettings,
        describe_self: Callable[[], dict[str, Any]],
    ) -> None:
        self.swarm = swarm
        self.signer = signer
        self.self_id = signer.peer_id
        self.settings = settings
        self.describe_self = describe_self
        self.table = MemberTable(swarm, self.self_id, settings.max_clock_skew_s)
        self._seq = 0
        self._rotation: list[str] = []

    # ---------------------------------------------------------------- own record

    def _own_record(self, now: float, leaving: bool = False) -> dict[str, bytes]:
        # Nanoseconds of wall time keep the sequence rising across restarts of one identity.
        self._seq = max(self._seq + 1, int(now * 1e9))
        fields = self.describe_self()
        record = PresenceRecord(
            swarm=self.swarm,
            peer_id=self.self_id,
            seq=self._seq,
            issued_at=now,
            ttl_s=self.settings.record_ttl_s,
            addrs=tuple(fields.get("addrs", ())),
            role=fields.get("role", "worker"),
            version=fields.get("version", ""),
            capacity=fields.get("capacity", {}),
            training=fields.get("training"),
            leaving=leaving,
        )
        return record.sign(self.signer)

    def refresh(self, now: float) -> dict[str, bytes]:
        """Re-sign this node's record (call when its fields change, and every tick)."""
        wire = self._own_record(now)
        self.table.offer(wire, now)
        return wire

    # ---------------------------------------------------------------- heartbeat

    def tick(self, now: float) -> Tick:
        # Our own record first: if the loop was held longer than a record's life (a slow
        # start-up on a loaded machine), it must not be expired and forgotten as a peer.
        own = self.refresh(now)
        expired = self.table.expire(now)
        partners = self._next_partners()
        return Tick(expired, [(p, self._sync(own, now)) for p in partners])

    def _next_partners(self) -> list[str]:
        live = {m.record.peer_id for m in self.table.others()}
        self._rotation = [p for p in self._rotation if p in live]
        self._rotation += sorted(live - set(self._rotation))
        chosen = self._rotation[: self.settings.fanout]
        self._rotation = self._rotation[len(chosen) :] + chosen
        return chosen

    def _sync(self, own: dict[str, bytes], now: float) -> Message:
        return {"t": "sync", "recs": [own], "digest": self.table.digest(), "ts": now}

    def hello(self, now: float) -> Message:
        """The first message to a bootstrap member: our record, asking for the whole table."""
        member = self.table.get(self.self_id)
        own = member.wire if member is not None else self.refresh(now)
        return self._sync(own, now)

    def leave(self, now: float) -> list[Send]:
        """Signed leave messages for every live member."""
        wire = self._own_record(now, leaving=True)
        return [(m.record.peer_id, {"t": "recs", "recs": [wire]}) for m in self.table.others()]

    # ---------------------------------------------------------------- incoming

    def on_message(self, sender: str, message: Message, now: float) -> Reaction:
        """Handle one control message of the membership protocol from ``sender``."""
        reaction = Reaction()
        kind = message.get("t")
        try:
            records = self._records(message.get("recs", []))
            if kind == "sync":
                digest = _digest(message["digest"])
                self._offer_all(records, now, reaction)
                reaction.sends.append(
                    (
                        sender,
                        {
                            "t": "sync_ack",
                            "recs": self.table.newer_than(digest),
                            "digest": self.table.digest(),
                            "ts": _finite(message["ts"]),
                        },
                    )
                )
            elif kind == "sync_ack":
                self._offer_all(records, now, reaction)
                rtt = now - _finite(message["ts"])
                if 0 <= rtt < 600:
                    reaction.rtt_s = rtt
                missing = self.table.newer_than(_digest(message["digest"]))
                if missing:
                    reaction.sends.append((sender, {"t": "recs", "recs": missing}))
            elif kind == "recs":
                self._offer_all(records, now, reaction)
            else:
                reaction.rejected.append(f"unknown membership message type {str(kind)[:40]!r}")
        except (KeyError, TypeError, ValueError) as exc:
            reaction.rejected.append(f"malformed {str(kind)[:40]} message: {exc}")
        return reaction

    def _records(self, value: Any) -> list[Any]:
        if not isinstance(value, list) or len(value) > self.settings.max_records_per_message:
            raise ValueError(
                f"recs must be a list of at most {self.settings.max_records_per_message} records"
            )
        return value

    def _offer_all(self, records: list[Any], now: float, reaction: Reaction) -> None:
        for wire in records:
            try:
                offer: Offer = self.table.offer(wire, now)
            except RecordError as exc:
                reaction.rejected.append(f"presence record refused: {exc}")
                continue
            peer_id = offer.record.peer_id
            if peer_id == self.self_id:
                continue
            if offer.kind == "joined":
                reaction.joined.append(offer.record)
                self._rotation.insert(0, peer_id)  # exchange with a newcomer first
            elif offer.kind == "left":
                reaction.left.append(peer_id)


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _digest(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > 100_000:
        raise ValueError("digest must be a map of peer id to sequence number")
    for key, seq in value.items():
        if not isinstance(key, str) or isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError("digest must map peer ids to integers")
    return value
