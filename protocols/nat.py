"""NAT rules without I/O: reachability from dial-backs, the NAT's mapping from observed ports.

Reachability (the AutoNAT idea, with py-libp2p's flaw removed): a node asks members it has a
direct connection to to dial it back at the IP they see its connection come from and at its
listen port, on a *fresh* TCP connection (py-libp2p's AutoNAT reused the existing connection,
so a closed port looked reachable). Each member answers ok or not, with a reason. The verdict:

- ``public``  at least ``min_answers`` distinct members reached us, more than failed to;
- ``private`` at least ``min_answers`` members failed to, at least as many as reached us;
- ``unknown`` otherwise (too few answers yet).

Only a completed TCP connect counts as reached, so a closed port (refused) or a filtered one
(no answer before the timeout) is never public. Answers older than ``max_age_s`` are dropped:
the network may change under a running node.

Mapping: members also tell a node which public ip:port a connection from its listen port
arrives from. Two members seeing two different ports for the same local port means the NAT
maps per destination (symmetric): hole punching cannot work there, the relay stays the path.

Time enters as ``now``; the caller moves the messages (``nat.probe``/``nat.probe_result`` on
the control links).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

PUBLIC = "public"
PRIVATE = "private"
UNKNOWN = "unknown"

MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class DialBack:
    """One member's answer: could it open a fresh TCP connection to us?"""

    peer_id: str
    ok: bool
    reason: str
    at: float


class Reachability:
    """The dial-back answers of distinct members and the verdict drawn from them."""

    def __init__(self, min_answers: int = 2, max_age_s: float = 600.0) -> None:
        if min_answers < 1:
            raise ValueError("min_answers must be at least 1")
        self.min_answers = min_answers
        self.max_age_s = max_age_s
        self._answers: dict[str, DialBack] = {}

    def record(self, peer_id: str, ok: bool, reason: str, now: float) -> None:
        """The newest answer of each member counts (one member, one vote)."""
        self._answers[peer_id] = DialBack(peer_id, ok, reason[:MAX_REASON_CHARS], now)

    def answers(self, now: float) -> list[DialBack]:
        fresh = [a for a in self._answers.values() if now - a.at <= self.max_age_s]
        return sorted(fresh, key=lambda a: a.peer_id)

    def verdict(self, now: float) -> str:
        answers = self.answers(now)
        reached = sum(a.ok for a in answers)
        failed = len(answers) - reached
        if reached >= self.min_answers and reached > failed:
            return PUBLIC
        if failed >= self.min_answers and failed >= reached:
            return PRIVATE
        return UNKNOWN


@dataclass(frozen=True)
class Observed:
    """The public address a member saw a connection from our listen port come from."""

    peer_id: str
    ip: str
    port: int
    at: float


class Observations:
    """What members observe of our listen port's NAT mapping."""

    def __init__(self, max_age_s: float = 600.0) -> None:
        self.max_age_s = max_age_s
        self._seen: dict[str, Observed] = {}

    def record(self, peer_id: str, ip: str, port: int, now: float) -> None:
        self._seen[peer_id] = Observed(peer_id, ip, port, now)

    def all(self, now: float) -> list[Observed]:
        fresh = [o for o in self._seen.values() if now - o.at <= self.max_age_s]
        return sorted(fresh, key=lambda o: o.peer_id)

    def public_addrs(self, now: float) -> list[tuple[str, int]]:
        """Distinct observed (ip, port), most often seen first."""
        counts: dict[tuple[str, int], int] = {}
        for seen in self.all(now):
            counts[(seen.ip, seen.port)] = counts.get((seen.ip, seen.port), 0) + 1
        return sorted(counts, key=lambda addr: (-counts[addr], addr))

    def mapping_varies(self, now: float) -> bool | None:
        """True if members saw different ports (symmetric NAT); None with under two observers."""
        seen = self.all(now)
        if len(seen) < 2:
            return None
        return len({(o.ip, o.port) for o in seen}) > 1


# ---------------------------------------------------------------------- messages


class NatMessageError(ValueError):
    """A malformed ``nat.*`` message; the text is the reason."""


def _int_in(message: dict[str, Any], key: str, low: int, high: int) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NatMessageError(f"field {key} must be an integer in [{low}, {high}]")
    return value


def parse_probe(message: dict[str, Any]) -> tuple[int, int]:
    """``nat.probe {nonce, port}``: dial me back at this port. Returns (nonce, port)."""
    return _int_in(message, "nonce", 0, 2**63), _int_in(message, "port", 1, 65535)


@dataclass(frozen=True)
class ProbeResult:
    nonce: int
    ok: bool
    reason: str
    seen_ip: str
    probe_port: int


def parse_probe_result(message: dict[str, Any]) -> ProbeResult:
    """``nat.probe_result {nonce, ok, reason, seen_ip, probe_port}``."""
    nonce = _int_in(message, "nonce", 0, 2**63)
    ok, reason, seen_ip = message.get("ok"), message.get("reason"), message.get("seen_ip")
    if not isinstance(ok, bool):
        raise NatMessageError("field ok must be a boolean")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise NatMessageError(f"field reason must be a string of at most {MAX_REASON_CHARS}")
    try:
        ip = str(ipaddress.ip_address(seen_ip if isinstance(seen_ip, str) else ""))
    except ValueError:
        raise NatMessageError("field seen_ip must be an IP address") from None
    return ProbeResult(nonce, ok, reason, ip, _int_in(message, "probe_port", 0, 65535))


def parse_observed_line(line: bytes) -> tuple[str, int]:
    """The probe server's answer ``b"<ip> <port>\\n"`` -> (ip, port), or NatMessageError."""
    try:
        ip_text, port_text = line.decode("ascii").strip().split(" ")
        ip, port = str(ipaddress.ip_address(ip_text)), int(port_text)
    except (UnicodeDecodeError, ValueError):
        raise NatMessageError(f"malformed observed-address line {line[:60]!r}") from None
    if not 1 <= port <= 65535:
        raise NatMessageError(f"observed port {port} out of range")
    return ip, port


# ---------------------------------------------------------------------- advice


def advice(
    reachability: str,
    listen_port: int,
    mapping_varies: bool | None,
    port_mapped: bool,
    relays: int,
) -> str:
    """What a user should do about this node's reachability, in one or two sentences."""
    if reachability == PUBLIC:
        how = " through the router's port mapping" if port_mapped else ""
        return f"reachable from the internet{how}; this node relays for members behind NATs"
    if reachability == UNKNOWN:
        return "not enough members answered dial-backs yet; run netcheck again in a minute"
    relay_text = (
        f"members reach this node through {relays} relay(s)"
        if relays
        else "no relay holds a slot for this node yet: members behind NATs cannot reach it"
    )
    fix = (
        f"forward TCP port {listen_port} on your router to this machine (or enable UPnP/NAT-PMP "
        f"there), or open it in the firewall, to become reachable"
    )
    if mapping_varies:
        return (
            f"not reachable: the NAT maps each destination to a new port (symmetric), so hole "
            f"punching fails; {relay_text}. To fix, {fix}"
        )
    return (
        f"not reachable: {relay_text}; hole punching upgrades to direct where it can. To fix, {fix}"
    )
