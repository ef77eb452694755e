"""NatService's bookkeeping when members come and go (no sockets: a stand-in host)."""

from __future__ import annotations

import time
from typing import Any

from net.nat import NatService, NatSettings
from protocols.nat import PRIVATE, PUBLIC


class _Host:
    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        pass


def service(members: list[str]) -> NatService:
    return NatService(
        _Host(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # no messages are sent here
        "self",
        lambda name: f"/shoal/test/{name}",
        NatSettings(min_answers=2),
        members=lambda: list(members),
        rtt_ms=lambda peer: None,
        on_path_change=lambda peer: None,
    )


def test_a_relay_stays_public_and_relaying_when_its_dial_back_members_leave() -> None:
    """The relay-failover lab test's failure: the two members that had dialed the relay back
    both left (one was the other relay, killed on purpose); the relay then said "unknown",
    refused every circuit with "this node is not a relay now", and the pair it was meant to
    carry stayed apart."""
    members = ["a", "b", "c"]
    nat = service(members)
    now = time.monotonic()
    nat.reachability.record("a", True, "", now)
    nat.reachability.record("b", True, "", now)
    nat.state.last_probe.update({"a": now, "b": now})
    assert nat.verdict() == PUBLIC and nat._relaying()
    for gone in ("a", "b"):
        members.remove(gone)
        nat.forget(gone)
    assert nat.verdict() == PUBLIC
    assert nat._relaying()
    assert "a" not in nat.state.last_probe  # a member that comes back is asked again at once


def test_a_private_verdict_also_outlives_the_members_that_gave_it() -> None:
    nat = service(["a", "b"])
    now = time.monotonic()
    nat.reachability.record("a", False, "connection refused", now)
    nat.reachability.record("b", False, "timed out", now)
    nat.forget("a")
    assert nat.verdict() == PRIVATE
    assert not nat._relaying()
