"""Circuit relay v2 rules without I/O: reservations and circuits with limits (the relay's book).

The relay protocol follows libp2p's circuit relay v2 (hop: RESERVE / CONNECT from clients,
stop: CONNECT from the relay to the reserved peer, then the relay splices the two streams),
carried as shoal's msgpack frames on ``/shoal/<swarm>/relay-hop|relay-stop/1.0.0``:

    client  -> relay   relay.reserve                    (renewed before ``expires_in_s``)
    relay   -> client  relay.status {ok, reason, expires_in_s, limits}
    dialer  -> relay   relay.connect {peer}
    relay   -> target  relay.stop {peer: dialer, limits}   (on a stream of the relay's own)
    target  -> relay   relay.status {ok}
    relay   -> dialer  relay.status {ok, limits}
    ... then raw bytes both ways: the peers run Noise + Yamux over the circuit.

Limits (go-libp2p's are 2 min and 128 KiB per circuit, for signalling only; shoal's bulk data
falls back to the relay when hole punching fails, so its defaults are larger): reservations
held, circuits per peer (as source or destination), duration and bytes per circuit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class RelayLimits:
    max_reservations: int = 64
    reservation_ttl_s: float = 120.0
    max_circuits_per_peer: int = 8
    circuit_max_s: float = 3600.0
    circuit_max_bytes: int = 1 << 30

    def to_wire(self) -> dict[str, Any]:
        return {
            "duration_s": self.circuit_max_s,
            "bytes": self.circuit_max_bytes,
            "circuits_per_peer": self.max_circuits_per_peer,
        }


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str = ""


@dataclass
class RelayBook:
    """Which peers hold a reservation, which circuits are open; every limit decided here."""

    limits: RelayLimits
    reservations: dict[str, float] = field(default_factory=dict)  # peer -> expires at
    circuits: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (src, dst)
    circuits_total: int = 0
    renewals: int = 0
    refused: int = 0
    _next_id: int = 0

    def expire(self, now: float) -> None:
        for peer in [p for p, until in self.reservations.items() if until <= now]:
            del self.reservations[peer]

    def reserve(self, peer: str, now: float) -> Decision:
        """A new reservation or a renewal; a renewal is never refused for the count limit."""
        self.expire(now)
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            self.refused += 1
            return Decision(False, f"relay full: {self.limits.max_reservations} reservations held")
        self.renewals += peer in self.reservations
        self.reservations[peer] = now + self.limits.reservation_ttl_s
        return Decision(True)

    def has_reservation(self, peer: str, now: float) -> bool:
        self.expire(now)
        return peer in self.reservations

    def circuits_of(self, peer: str) -> int:
        return sum(peer in ends for ends in self.circuits.values())

    def open_circuit(self, src: str, dst: str, now: float) -> tuple[Decision, int]:
        """Admit a circuit src -> dst, or say why not; returns (decision, circuit id)."""
        if src == dst:
            return self._refuse("a peer cannot relay to itself")
        if not self.has_reservation(dst, now):
            return self._refuse(f"{dst} holds no reservation on this relay")
        for peer in (src, dst):
            if self.circuits_of(peer) >= self.limits.max_circuits_per_peer:
                return self._refuse(
                    f"{peer} already has {self.limits.max_circuits_per_peer} circuits here"
                )
        self._next_id += 1
        self.circuits[self._next_id] = (src, dst)
        self.circuits_total += 1
        return Decision(True), self._next_id

    def _refuse(self, reason: str) -> tuple[Decision, int]:
        self.refused += 1
        return Decision(False, reason), 0

    def close_circuit(self, circuit_id: int) -> None:
        self.circuits.pop(circuit_id, None)


def status_message(
    decision: Decision, expires_in_s: float | None = None, limits: RelayLimits | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"t": "relay.status", "ok": decision.ok, "reason": decision.reason}
    if expires_in_s is not None:
        message["expires_in_s"] = expires_in_s
    if limits is not None:
        message["limits"] = limits.to_wire()
    return message


class RelayMessageError(ValueError):
    """A malformed relay message; the text is the reason."""


def parse_status(message: dict[str, Any]) -> tuple[bool, str, float | None]:
    """(ok, reason, expires_in_s) of a ``relay.status``."""
    if message.get("t") != "relay.status":
        raise RelayMessageError(f"expected relay.status, got {str(message.get('t'))[:40]!r}")
    ok, reason = message.get("ok"), message.get("reason", "")
    if not isinstance(ok, bool) or not isinstance(reason, str):
        raise RelayMessageError("relay.status needs a boolean ok and a string reason")
    expires = message.get("expires_in_s")
    if expires is not None and (
        isinstance(expires, bool) or not isinstance(expires, int | float) or not expires > 0
    ):
        raise RelayMessageError("relay.status expires_in_s must be a positive number")
    return ok, reason[:MAX_REASON_CHARS], None if expires is None else float(expires)


def parse_peer_field(message: dict[str, Any], kind: str) -> str:
    """The ``peer`` of a ``relay.connect`` / ``relay.stop``."""
    if message.get("t") != kind:
        raise RelayMessageError(f"expected {kind}, got {str(message.get('t'))[:40]!r}")
    peer = message.get("peer")
    if not isinstance(peer, str) or not 40 <= len(peer) <= 64:
        raise RelayMessageError(f"{kind} needs a peer id")
    return peer
