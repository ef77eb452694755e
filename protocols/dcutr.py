"""DCUtR (direct connection upgrade through relay) as the libp2p spec has it, without I/O.

Over a relayed connection from A (who dialed through the relay) to B (who accepted it):

    B -> A  CONNECT {addrs: B's observed public addresses}    B starts its RTT timer
    A -> B  CONNECT {addrs: A's observed public addresses}
    B       rtt = time since its CONNECT
    B -> A  SYNC                                            B waits rtt/2, then dials A
    A       dials B at once on SYNC
            both SYNs cross: TCP simultaneous open; on the one connection A is the security
            initiator and B the responder (fixed roles: both cannot be Noise initiators)

B retries the whole exchange up to ``max_attempts`` times (the spec's three). Each side dials
from its listen port, so a NAT that maps endpoint-independently (cone) sends the SYN out from
the very port the other side was told. Time enters as ``now``; the driver (net/holepunch.py)
moves the frames and runs the dials it is told to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_ADDRS = 8
MAX_ADDR_CHARS = 256


class HolePunchError(ValueError):
    """A malformed DCUtR frame; the text is the reason."""


@dataclass(frozen=True)
class Dial:
    """Dial ``addrs`` after ``delay_s``, upgrading as security ``initiator`` or responder."""

    addrs: tuple[str, ...]
    delay_s: float
    initiator: bool
    attempt: int


def connect_message(addrs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {"t": "dcutr.connect", "addrs": list(addrs)[:MAX_ADDRS]}


SYNC = {"t": "dcutr.sync"}


def parse_addrs(message: dict[str, Any]) -> tuple[str, ...]:
    addrs = message.get("addrs")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise HolePunchError(f"dcutr.connect needs a list of at most {MAX_ADDRS} addresses")
    for addr in addrs:
        if not isinstance(addr, str) or len(addr) > MAX_ADDR_CHARS or not addr.startswith("/"):
            raise HolePunchError("dcutr.connect addresses must be multiaddr strings")
    return tuple(addrs)


class HolePunchInitiator:
    """B's side: drives the attempts and measures the RTT."""

    def __init__(self, own_addrs: list[str], max_attempts: int = 3) -> None:
        self.own_addrs = list(own_addrs)
        self.max_attempts = max_attempts
        self.attempt = 0
        self.rtt_s: float | None = None
        self._sent_at: float | None = None
        self.outcome: str = "pending"  # pending | direct | failed

    def start(self, now: float) -> dict[str, Any]:
        """The CONNECT that opens the next attempt."""
        self.attempt += 1
        self._sent_at = now
        return connect_message(self.own_addrs)

    def on_connect(self, message: dict[str, Any], now: float) -> tuple[dict[str, Any], Dial]:
        """A's CONNECT: answer SYNC and dial A after rtt/2."""
        if self._sent_at is None:
            raise HolePunchError("dcutr.connect before ours was sent")
        addrs = parse_addrs(message)
        if message.get("t") != "dcutr.connect":
            raise HolePunchError(f"expected dcutr.connect, got {str(message.get('t'))[:40]!r}")
        self.rtt_s = max(0.0, now - self._sent_at)
        self._sent_at = None
        return dict(SYNC), Dial(addrs, self.rtt_s / 2, initiator=False, attempt=self.attempt)

    def on_dial_result(self, ok: bool, now: float) -> dict[str, Any] | None:
        """After a dial: None when done (direct, or out of attempts), else the next CONNECT."""
        if ok:
            self.outcome = "direct"
            return None
        if self.attempt >= self.max_attempts:
            self.outcome = "failed"
            return None
        return self.start(now)


class HolePunchResponder:
    """A's side: answers CONNECT with its addresses, dials at once on SYNC."""

    def __init__(self, own_addrs: list[str], max_attempts: int = 3) -> None:
        self.own_addrs = list(own_addrs)
        self.max_attempts = max_attempts
        self.attempt = 0
        self._peer_addrs: tuple[str, ...] | None = None

    def on_message(self, message: dict[str, Any]) -> tuple[dict[str, Any] | None, Dial | None]:
        kind = message.get("t")
        if kind == "dcutr.connect":
            if self.attempt >= self.max_attempts:
                raise HolePunchError(f"more than {self.max_attempts} hole punching attempts")
            self._peer_addrs = parse_addrs(message)
            self.attempt += 1
            return connect_message(self.own_addrs), None
        if kind == "dcutr.sync":
            if self._peer_addrs is None:
                raise HolePunchError("dcutr.sync before dcutr.connect")
            addrs, self._peer_addrs = self._peer_addrs, None
            return None, Dial(addrs, 0.0, initiator=True, attempt=self.attempt)
        raise HolePunchError(f"unknown DCUtR message {str(kind)[:40]!r}")
