"""One-hop DHT over the member table (sans-IO).

Every node of a swarm knows every live member (:mod:`protocols.membership`), so the ``k``
members closest to a key under Kademlia's XOR metric are known locally: a put or a get goes
straight to them over the kept-open control links, one round trip, instead of py-libp2p's
iterative walk (a FIND_NODE round, then value queries, each over a freshly negotiated stream:
300-500 ms per get at 30 nodes, see BENCHMARKS.md). This is the one-hop layout of full-membership
DHTs; the Kademlia DHT stays beside it for peers outside the member table.

    A -> closest  dht.put {id, key, value}     ->  dht.ack {id, ok, why}
    A -> closest  dht.get {id, key}            ->  dht.val {id, value | None}

A get ends at the first valid value (or when every target said it has none); a put ends when
every target answered. Values are checked by the caller's ``validate`` (the same validator the
Kademlia DHT uses, so a forged or stale record is refused at both) on put, on answer and again
before a stored value is served. Time enters as ``now``; requests that outlive
``query_timeout_s`` end in :meth:`on_timeout`. The caller moves the returned messages.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Send = tuple[str, Message]
Validate = Callable[[str, bytes], None]
Select = Callable[[str, list[bytes]], int]


@dataclass(frozen=True)
class DirectDHTSettings:
    replication: int = 3  # members that store each key (the k of this DHT)
    query_timeout_s: float = 2.0
    max_key_chars: int = 256
    max_value_bytes: int = 64 * 1024
    max_records: int = 10_000
    max_pending: int = 1024

    def __post_init__(self) -> None:
        if self.replication < 1 or self.max_records < 1 or self.max_pending < 1:
            raise ValueError("replication, max_records and max_pending must be at least 1")
        if not (math.isfinite(self.query_timeout_s) and self.query_timeout_s > 0):
            raise ValueError("query_timeout_s must be a positive number of seconds")


def distance(key: str, peer_id: str) -> int:
    """Kademlia's XOR distance between the SHA-256 of a key and of a peer id."""
    a = hashlib.sha256(key.encode()).digest()
    b = hashlib.sha256(peer_id.encode()).digest()
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def closest(key: str, peers: Iterable[str], count: int) -> list[str]:
    """The ``count`` peers closest to ``key``, nearest first (ties cannot happen: SHA-256)."""
    return sorted(set(peers), key=lambda p: distance(key, p))[:count]


@dataclass
class Done:
    """A finished request: ``value`` for a get (None: not found), ``stored`` for a put."""

    request_id: int
    kind: str
    key: str
    value: bytes | None = None
    stored: int = 0
    answered_by: str | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class Reaction:
    sends: list[Send] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    kind: str
    key: str
    waiting: set[str]
    deadline: float
    stored: int = 0
    reasons: list[str] = field(default_factory=list)


class DirectDHT:
    """One node's side of the one-hop DHT: its share of the records and its open requests."""

    def __init__(
        self, self_id: str, validate: Validate, select: Select, settings: DirectDHTSettings
    ) -> None:
        self.self_id = self_id
        self.validate = validate
        self.select = select
        self.settings = settings
        self.store: dict[str, bytes] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ local store

    def _check(self, key: Any, value: Any) -> tuple[str, bytes]:
        s = self.settings
        if not isinstance(key, str) or not 0 < len(key) <= s.max_key_chars:
            raise ValueError(f"key must be a string of 1 to {s.max_key_chars} characters")
        if not isinstance(value, bytes) or len(value) > s.max_value_bytes:
            raise ValueError(f"value must be at most {s.max_value_bytes} bytes")
        try:
            self.validate(key, value)
        except Exception as exc:  # the validator's own error types vary
            raise ValueError(f"invalid value for {key[:80]}: {exc}") from None
        return key, value

    def _keep(self, key: str, value: bytes) -> None:
        """Store ``value`` unless the record held already wins ``select``."""
        held = self.store.get(key)
        if held is not None and held != value and self.select(key, [held, value]) == 0:
            return
        if held is None and len(self.store) >= self.settings.max_records:
            self._evict()
            if len(self.store) >= self.settings.max_records:
                raise ValueError(f"store full ({self.settings.max_records} records)")
        self.store[key] = value

    def _evict(self) -> None:
        """Drop records that no longer validate (expired) to make room."""
        for key in list(self.store):
            self.local(key)

    def local(self, key: str) -> bytes | None:
        """The stored value of ``key`` if it still validates (a stale one is dropped)."""
        value = self.store.get(key)
        if value is None:
            return None
        try:
            self.validate(key, value)
        except Exception:
            del self.store[key]
            return None
        return value

    # ------------------------------------------------------------------ requests

    def put(
        self, key: str, value: bytes, members: Iterable[str], now: float
    ) -> tuple[int, Reaction]:
        """Store ``value`` at the ``replication`` members closest to ``key`` (this node too,
        if it is one of them). Raises ValueError for a value this DHT would refuse."""
        self._check(key, value)
        targets = closest(key, [*members, self.self_id], self.settings.replication)
        request_id, reaction = self._open("put", key, targets, now)
        pending = self._pending[request_id]
        if self.self_id in targets:
            self._keep(key, value)
            pending.stored += 1
            pending.waiting.discard(self.self_id)
        message = {"t": "dht.put", "id": request_id, "key": key, "value": value}
        reaction.sends = [(p, message) for p in sorted(pending.waiting)]
        self._finish_if_done(request_id, reaction)
        return request_id, reaction

    def get(self, key: str, members: Iterable[str], now: float) -> tuple[int, Reaction]:
        """Ask the members closest to ``key`` for its value; a local copy answers at once."""
        if not isinstance(key, str) or not 0 < len(key) <= self.settings.max_key_chars:
            raise ValueError(f"key must be a string of 1 to {self.settings.max_key_chars} chars")
        targets = closest(key, [*members, self.self_id], self.settings.replication)
        request_id, reaction = self._open("get", key, targets, now)
        held = self.local(key)
        if held is not None:
            del self._pending[request_id]
            reaction.done.append(Done(request_id, "get", key, held, answered_by=self.self_id))
            return request_id, reaction
        pending = self._pending[request_id]
        pending.waiting.discard(self.self_id)
        message = {"t": "dht.get", "id": request_id, "key": key}
        reaction.sends = [(p, message) for p in sorted(pending.waiting)]
        self._finish_if_done(request_id, reaction)
        return request_id, reaction

    def _open(self, kind: str, key: str, targets: list[str], now: float) -> tuple[int, Reaction]:
        reaction = Reaction()
        if len(self._pending) >= self.settings.max_pending:
            # the oldest request gives way: its caller sees it end unanswered
            oldest = min(self._pending)
            self._end(oldest, reaction, "too many requests in flight")
        request_id = next(self._ids)
        self._pending[request_id] = _Pending(
            kind, key, set(targets), now + self.settings.query_timeout_s
        )
        return request_id, reaction

    def on_peer_lost(self, peer_id: str) -> Reaction:
        """A member left: requests waiting on it stop waiting."""
        reaction = Reaction()
        for request_id, pending in list(self._pending.items()):
            if peer_id in pending.waiting:
                pending.waiting.discard(peer_id)
                pending.reasons.append(f"{peer_id} left")
                self._finish_if_done(request_id, reaction)
        return reaction

    def on_timeout(self, now: float) -> Reaction:
        """End the requests whose deadline has passed."""
        reaction = Reaction()
        for request_id, pending in list(self._pending.items()):
            if now >= pending.deadline:
                self._end(request_id, reaction, f"no answer from {sorted(pending.waiting)}")
        return reaction

    def give_up(self, request_id: int, reason: str) -> Reaction:
        """End one request now (its caller stopped waiting); a no-op if it already ended."""
        reaction = Reaction()
        if request_id in self._pending:
            self._end(request_id, reaction, reason)
        return reaction

    def _finish_if_done(self, request_id: int, reaction: Reaction) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and not pending.waiting:
            self._end(request_id, reaction, None)

    def _end(self, request_id: int, reaction: Reaction, reason: str | None) -> None:
        pending = self._pending.pop(request_id)
        reasons = [*pending.reasons, *([reason] if reason else [])]
        reaction.done.append(
            Done(request_id, pending.kind, pending.key, stored=pending.stored, reasons=reasons)
        )

    # ------------------------------------------------------------------ incoming

    def on_message(self, sender: str, message: Message, now: float) -> Reaction:
        reaction = Reaction()
        kind = message.get("t")
        try:
            request_id = message["id"]
            if isinstance(request_id, bool) or not isinstance(request_id, int):
                raise ValueError("id must be an integer")
            if kind == "dht.put":
                try:
                    key, value = self._check(message["key"], message["value"])
                    self._keep(key, value)
                    answer: Message = {"t": "dht.ack", "id": request_id, "ok": True, "why": ""}
                except ValueError as exc:
                    reaction.rejected.append(f"dht.put refused: {exc}")
                    answer = {"t": "dht.ack", "id": request_id, "ok": False, "why": str(exc)}
                reaction.sends.append((sender, answer))
            elif kind == "dht.get":
                key = message["key"]
                if not isinstance(key, str) or len(key) > self.settings.max_key_chars:
                    raise ValueError("key must be a short string")
                reaction.sends.append(
                    (sender, {"t": "dht.val", "id": request_id, "value": self.local(key)})
                )
            elif kind in ("dht.ack", "dht.val"):
                self._on_answer(sender, kind, request_id, message, reaction)
            else:
                reaction.rejected.append(f"unknown DHT message type {str(kind)[:40]!r}")
        except (KeyError, TypeError, ValueError) as exc:
            reaction.rejected.append(f"malformed {str(kind)[:40]} message: {exc}")
        return reaction

    def _on_answer(
        self, sender: str, kind: str, request_id: int, message: Message, reaction: Reaction
    ) -> None:
        pending = self._pending.get(request_id)
        if pending is None or sender not in pending.waiting:
            return  # late (the request ended) or unasked: nothing to do
        expected = "dht.ack" if pending.kind == "put" else "dht.val"
        if kind != expected:
            raise ValueError(f"{kind} answers a {pending.kind}")
        pending.waiting.discard(sender)
        if kind == "dht.ack":
            if message["ok"] is True:
                pending.stored += 1
            else:
                pending.reasons.append(f"{sender}: {str(message.get('why'))[:200]}")
        else:
            value = message["value"]
            if value is not None:
                try:
                    self._check(pending.key, value)
                except ValueError as exc:
                    pending.reasons.append(f"{sender} answered an invalid value")
                    reaction.rejected.append(f"dht.val from {sender} refused: {exc}")
                else:
                    del self._pending[request_id]
                    reaction.done.append(
                        Done(request_id, "get", pending.key, value, answered_by=sender)
                    )
                    return
        self._finish_if_done(request_id, reaction)
