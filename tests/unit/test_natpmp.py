"""NAT-PMP (RFC 6886) rules without sockets: encoding, validation, retries, renewal, epoch."""

from __future__ import annotations

import struct

import pytest

from net.portmap import default_gateway
from protocols.natpmp import (
    INITIAL_RETRY_S,
    MAX_SENDS,
    AddressResponse,
    Failed,
    Mapped,
    MappingResponse,
    NatPmpError,
    NatPmpMapping,
    decode_response,
    encode_address_request,
    encode_mapping_request,
)


def address_reply(epoch: int, ip: str = "203.0.113.1", result: int = 0) -> bytes:
    return struct.pack("!BBHI", 0, 128, result, epoch) + bytes(map(int, ip.split(".")))


def mapping_reply(epoch: int, internal: int, external: int, life: int, result: int = 0) -> bytes:
    return struct.pack("!BBHIHHI", 0, 130, result, epoch, internal, external, life)


def mapped(port: int = 4001, lifetime: int = 100) -> tuple[NatPmpMapping, float]:
    """A machine that holds a mapping granted at t=1."""
    m = NatPmpMapping(port, lifetime)
    m.start(0.0)
    m.on_datagram(address_reply(1000), 0.5)
    m.on_datagram(mapping_reply(1000, port, port, lifetime), 1.0)
    assert isinstance(m.outcome, Mapped)
    return m, 1.0


def test_requests_are_encoded_as_the_rfc_says() -> None:
    assert encode_address_request() == b"\x00\x00"
    # version 0, opcode 2 (TCP), reserved, internal port, suggested external port, lifetime
    assert encode_mapping_request(4001, 4001, 7200) == bytes.fromhex("0002 0000 0fa1 0fa1 00001c20")
    assert encode_mapping_request(4001, 0, 0)[-6:] == bytes.fromhex("0000 00000000")  # delete
    with pytest.raises(ValueError):
        encode_mapping_request(0, 1, 1)
    with pytest.raises(ValueError):
        encode_mapping_request(1, 1, 2**32)


def test_responses_decode_and_bad_ones_are_refused_with_a_reason() -> None:
    assert decode_response(address_reply(7)) == AddressResponse(0, 7, "203.0.113.1")
    assert decode_response(mapping_reply(9, 4001, 5000, 60)) == MappingResponse(
        2, 0, 9, 4001, 5000, 60
    )
    bad = {
        b"\x00": "shorter",
        b"\x02\x80" + bytes(10): "version 2",  # PCP answers with version 2
        b"\x00\x02" + bytes(14): "is a request",
        address_reply(1)[:10]: "not 12",
        mapping_reply(1, 1, 1, 1) + b"x": "not 16",
        b"\x00\x85" + bytes(6): "unknown response opcode",
    }
    for data, reason in bad.items():
        with pytest.raises(NatPmpError, match=reason):
            decode_response(data)


def test_address_then_mapping_then_renewal_at_half_life() -> None:
    m = NatPmpMapping(4001, 100)
    assert m.start(0.0) == [encode_address_request()]
    assert m.outcome is None
    out = m.on_datagram(address_reply(1000), 0.1)
    assert out == [encode_mapping_request(4001, 4001, 100)]
    assert m.on_datagram(mapping_reply(1000, 4001, 4100, 60), 0.2) == []
    assert m.outcome == Mapped("203.0.113.1", 4100, 60, at=0.2)  # the gateway's lifetime wins
    assert m.deadline() == pytest.approx(30.2)
    assert m.on_timer(30.0) == []  # not yet
    # Renewal asks for the port it holds, with the lifetime it wants.
    assert m.on_timer(30.2) == [encode_mapping_request(4001, 4100, 100)]
    m.on_datagram(mapping_reply(1030, 4001, 4100, 60), 30.3)
    assert m.renewals == 1 and isinstance(m.outcome, Mapped) and m.outcome.at == 30.3


def test_unanswered_requests_are_resent_doubling_then_fail() -> None:
    m = NatPmpMapping(4001, 100)
    now = 0.0
    sends = m.start(now)
    waits = []
    while not isinstance(m.outcome, Failed):
        deadline = m.deadline()
        assert deadline is not None
        waits.append(round(deadline - now, 3))
        now = deadline
        sends += m.on_timer(now)
    assert len(sends) == MAX_SENDS
    assert waits == [INITIAL_RETRY_S * 2**i for i in range(MAX_SENDS)]  # 0.25 s ... 64 s
    assert "did not answer the request" in m.outcome.reason
    assert m.deadline() is None


def test_a_refusal_ends_with_the_result_code_in_words() -> None:
    m = NatPmpMapping(4001, 100)
    m.start(0.0)
    m.on_datagram(address_reply(5), 0.1)
    m.on_datagram(mapping_reply(5, 4001, 0, 0, result=2), 0.2)
    assert isinstance(m.outcome, Failed) and "not authorized" in m.outcome.reason
    m = NatPmpMapping(4001, 100)
    m.start(0.0)
    m.on_datagram(address_reply(5, result=3), 0.1)
    assert isinstance(m.outcome, Failed) and "network failure" in m.outcome.reason


def test_stray_and_mismatched_datagrams_are_dropped_not_obeyed() -> None:
    m = NatPmpMapping(4001, 100)
    m.start(0.0)
    # A mapping answer while the address was asked, garbage, then the real answer.
    assert m.on_datagram(mapping_reply(1, 4001, 4001, 100), 0.1) == []
    assert m.on_datagram(b"\xff" * 12, 0.1) == []
    assert m.on_datagram(address_reply(1), 0.2) == [encode_mapping_request(4001, 4001, 100)]
    assert m.on_datagram(mapping_reply(1, 5555, 5555, 100), 0.3) == []  # not our port
    assert m.outcome is None and m.dropped == 3
    assert "not ours" in m.rejected[-1]
    m.on_datagram(mapping_reply(1, 4001, 4001, 100), 0.4)
    assert isinstance(m.outcome, Mapped)
    assert m.on_datagram(mapping_reply(1, 4001, 4001, 100), 0.5) == []  # a late duplicate
    assert m.dropped == 4


def test_an_epoch_that_went_back_means_the_gateway_restarted_so_map_again() -> None:
    m, t = mapped(lifetime=100)
    # 50 s later the gateway says 1050: consistent (7/8 of 50 s is 43.75 s, minus 2 s slack).
    m.on_timer(t + 50)
    m.on_datagram(mapping_reply(1050, 4001, 4001, 100), t + 50)
    assert m.gateway_restarts == 0 and m.deadline() == pytest.approx(t + 100)
    # Next renewal: the gateway's epoch is 3 s; it rebooted, so the address is asked again
    # and the mapping requested anew.
    m.on_timer(t + 100)
    out = m.on_datagram(mapping_reply(3, 4001, 4001, 100), t + 100)
    assert m.gateway_restarts == 1 and out == [encode_address_request()]
    out = m.on_datagram(address_reply(3, ip="203.0.113.9"), t + 100.1)
    assert out == [encode_mapping_request(4001, 4001, 100)]
    m.on_datagram(mapping_reply(3, 4001, 4001, 100), t + 100.2)
    assert isinstance(m.outcome, Mapped) and m.outcome.external_ip == "203.0.113.9"


def test_a_renewal_nobody_answers_ends_the_mapping() -> None:
    m, t = mapped(lifetime=10)
    now = t + 5
    m.on_timer(now)
    while not isinstance(m.outcome, Failed):
        deadline = m.deadline()
        assert deadline is not None
        now = deadline
        m.on_timer(now)
    assert "did not answer the renewal" in m.outcome.reason


def test_release_sends_the_delete_request_once_and_stops() -> None:
    m, t = mapped()
    assert m.release(t + 1) == [encode_mapping_request(4001, 0, 0)]
    assert m.deadline() is None and m.on_timer(t + 1000) == []
    assert NatPmpMapping(4001, 100).release(0.0) == []  # nothing held, nothing to delete


def test_default_gateway_from_the_kernel_route_table() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\n"
    )
    assert default_gateway(table) == "10.0.1.1"
    assert default_gateway(table.splitlines()[0] + "\n" + table.splitlines()[1]) is None
    assert default_gateway("") is None
