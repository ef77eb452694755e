"""The NAT rules without sockets: reachability verdicts, mapping type, relay limits, DCUtR."""

from __future__ import annotations

import pytest

from protocols.dcutr import HolePunchError, HolePunchInitiator, HolePunchResponder
from protocols.nat import (
    PRIVATE,
    PUBLIC,
    UNKNOWN,
    NatMessageError,
    Observations,
    Reachability,
    advice,
    parse_observed_line,
    parse_probe,
    parse_probe_result,
)
from protocols.relay import (
    RelayBook,
    RelayLimits,
    RelayMessageError,
    parse_peer_field,
    parse_status,
)

P1, P2, P3 = ("12D3KooW" + c * 44 for c in "abc")


# ---------------------------------------------------------------------- reachability


def test_reachability_is_unknown_until_enough_members_answered() -> None:
    r = Reachability(min_answers=2)
    assert r.verdict(0) == UNKNOWN
    r.record(P1, True, "connected", 0)
    assert r.verdict(0) == UNKNOWN
    r.record(P2, True, "connected", 0)
    assert r.verdict(0) == PUBLIC


def test_a_closed_or_filtered_port_is_never_public() -> None:
    r = Reachability(min_answers=2)
    r.record(P1, False, "connection refused", 0)
    r.record(P2, False, "no answer in 3 s", 0)
    assert r.verdict(0) == PRIVATE
    # One member claiming success does not outvote two that failed.
    r.record(P3, True, "connected", 0)
    assert r.verdict(0) == PRIVATE


def test_one_member_one_vote_and_old_answers_expire() -> None:
    r = Reachability(min_answers=2, max_age_s=60)
    for _ in range(5):
        r.record(P1, True, "connected", 0)
    assert r.verdict(0) == UNKNOWN  # five answers, one member
    r.record(P2, True, "connected", 0)
    assert r.verdict(30) == PUBLIC
    assert r.verdict(61) == UNKNOWN
    r.record(P1, False, "refused", 100)  # the network changed: the newest answer counts
    r.record(P2, False, "refused", 100)
    assert r.verdict(100) == PRIVATE


def test_mapping_varies_only_with_two_differing_observers() -> None:
    o = Observations()
    assert o.mapping_varies(0) is None
    o.record(P1, "203.0.113.1", 4001, 0)
    assert o.mapping_varies(0) is None
    o.record(P2, "203.0.113.1", 4001, 0)
    assert o.mapping_varies(0) is False
    assert o.public_addrs(0) == [("203.0.113.1", 4001)]
    o.record(P3, "203.0.113.1", 39211, 0)
    assert o.mapping_varies(0) is True


def test_nat_messages_are_checked() -> None:
    assert parse_probe({"t": "nat.probe", "nonce": 7, "port": 4001}) == (7, 4001)
    for bad in ({"nonce": 7, "port": 0}, {"nonce": -1, "port": 1}, {"nonce": 1, "port": "x"}):
        with pytest.raises(NatMessageError):
            parse_probe({"t": "nat.probe", **bad})
    good = {"nonce": 1, "ok": True, "reason": "ok", "seen_ip": "203.0.113.1", "probe_port": 5}
    assert parse_probe_result(good).seen_ip == "203.0.113.1"
    for key, value in (("ok", 1), ("seen_ip", "nope"), ("reason", "x" * 500), ("probe_port", -1)):
        with pytest.raises(NatMessageError):
            parse_probe_result({**good, key: value})
    assert parse_observed_line(b"203.0.113.1 4001\n") == ("203.0.113.1", 4001)
    for line in (b"", b"garbage", b"1.2.3.4 70000\n", b"\xff\xfe 1\n"):
        with pytest.raises(NatMessageError):
            parse_observed_line(line)


def test_advice_tells_an_unreachable_node_what_to_do() -> None:
    text = advice(PRIVATE, 4001, True, False, 1)
    assert "symmetric" in text and "forward TCP port 4001" in text and "1 relay" in text
    assert "cannot reach it" in advice(PRIVATE, 4001, False, False, 0)
    assert "port mapping" in advice(PUBLIC, 4001, False, True, 0)


# ---------------------------------------------------------------------- relay limits


def test_relay_reservations_are_limited_and_renewals_always_pass() -> None:
    book = RelayBook(RelayLimits(max_reservations=1, reservation_ttl_s=10))
    assert book.reserve(P1, 0).ok
    refused = book.reserve(P2, 1)
    assert not refused.ok and "full" in refused.reason
    assert book.reserve(P1, 5).ok  # renewal
    assert book.renewals == 1
    assert book.has_reservation(P1, 14) and not book.has_reservation(P1, 15.1)
    assert book.reserve(P2, 16).ok  # P1 expired: room again


def test_circuits_need_a_reservation_and_respect_the_per_peer_limit() -> None:
    book = RelayBook(RelayLimits(max_circuits_per_peer=1))
    decision, _ = book.open_circuit(P1, P2, 0)
    assert not decision.ok and "no reservation" in decision.reason
    book.reserve(P2, 0)
    decision, first = book.open_circuit(P1, P2, 0)
    assert decision.ok
    decision, _ = book.open_circuit(P3, P2, 0)
    assert not decision.ok and "circuits" in decision.reason
    book.close_circuit(first)
    assert book.open_circuit(P3, P2, 0)[0].ok
    assert not book.open_circuit(P2, P2, 0)[0].ok


def test_relay_messages_are_checked() -> None:
    assert parse_status({"t": "relay.status", "ok": True, "reason": ""}) == (True, "", None)
    for bad in (
        {"t": "relay.connect", "ok": True},
        {"t": "relay.status", "ok": "yes"},
        {"t": "relay.status", "ok": True, "expires_in_s": -1},
    ):
        with pytest.raises(RelayMessageError):
            parse_status(bad)
    assert parse_peer_field({"t": "relay.connect", "peer": P1}, "relay.connect") == P1
    with pytest.raises(RelayMessageError):
        parse_peer_field({"t": "relay.connect", "peer": "x"}, "relay.connect")


# ---------------------------------------------------------------------- DCUtR


def test_dcutr_exchange_measures_rtt_and_b_dials_after_half_of_it() -> None:
    b = HolePunchInitiator(["/ip4/203.0.113.2/tcp/4001"])
    a = HolePunchResponder(["/ip4/203.0.113.1/tcp/4001"])
    connect = b.start(now=10.0)
    reply, dial = a.on_message(connect)
    assert dial is None and reply == {"t": "dcutr.connect", "addrs": ["/ip4/203.0.113.1/tcp/4001"]}
    sync, b_dial = b.on_connect(reply, now=10.080)
    assert b.rtt_s == pytest.approx(0.080)
    assert b_dial.delay_s == pytest.approx(0.040) and not b_dial.initiator
    assert b_dial.addrs == ("/ip4/203.0.113.1/tcp/4001",)
    none, a_dial = a.on_message(sync)
    assert none is None and a_dial is not None
    assert a_dial.delay_s == 0 and a_dial.initiator  # A dials at once on SYNC
    assert a_dial.addrs == ("/ip4/203.0.113.2/tcp/4001",)
    assert b.on_dial_result(True, 11.0) is None and b.outcome == "direct"


def test_dcutr_gives_up_after_three_attempts() -> None:
    b = HolePunchInitiator(["/ip4/203.0.113.3/tcp/1"])
    a = HolePunchResponder(["/ip4/203.0.113.4/tcp/2"])
    message = b.start(0.0)
    attempts = 0
    while message is not None:
        reply, _ = a.on_message(message)
        assert reply is not None
        sync, _ = b.on_connect(reply, 0.01)
        a.on_message(sync)
        attempts += 1
        message = b.on_dial_result(False, 1.0)
    assert attempts == 3 and b.outcome == "failed"
    with pytest.raises(HolePunchError):  # a fourth CONNECT is refused
        a.on_message({"t": "dcutr.connect", "addrs": []})


def test_dcutr_rejects_malformed_frames() -> None:
    a = HolePunchResponder([])
    with pytest.raises(HolePunchError):
        a.on_message({"t": "dcutr.sync"})  # SYNC before CONNECT
    for bad in ({"t": "dcutr.connect", "addrs": "x"}, {"t": "dcutr.connect", "addrs": [1]}):
        with pytest.raises(HolePunchError):
            a.on_message(bad)
    with pytest.raises(HolePunchError):
        a.on_message({"t": "dcutr.nope"})
    b = HolePunchInitiator([])
    with pytest.raises(HolePunchError):
        b.on_connect({"t": "dcutr.connect", "addrs": []}, 0.0)  # before our CONNECT


# ---------------------------------------------------------------------- joining through a NAT


def test_a_joiner_whose_contact_was_unreachable_at_first_is_admitted_on_the_next_try() -> None:
    """Behind NATs the first JoinRequest can fail (the contact's relay circuit is not up yet):
    the transport reports the contact lost, the joiner gives up at once (JoinFailed), and the
    next join attempt (a fresh joiner, as the driver makes) is admitted."""
    from protocols.allreduce import Admitted, AllReduceMember, AllReduceSettings, JoinFailed, Send

    settings = AllReduceSettings()
    member = AllReduceMember("p0", "g", ["p0"], settings)
    joiner = AllReduceMember.joiner("p5", "g", ["p0"], settings)
    joiner.request_join(0.0)
    lost = joiner.on_peer_lost("p0", 0.1)  # the send failed: no path to p0 yet
    assert any(isinstance(e, JoinFailed) for e in lost)
    again = AllReduceMember.joiner("p5", "g", ["p0"], settings)
    (request,) = [e for e in again.request_join(1.0) if isinstance(e, Send)]
    replies = member.on_message("p5", request.msg, 1.1)
    (ack,) = [e for e in replies if isinstance(e, Send)]
    events = again.on_message("p0", ack.msg, 1.2)
    assert any(isinstance(e, Admitted) for e in events)
