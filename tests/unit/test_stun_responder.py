"""The lab's STUN responder (tests/stun_responder.py) answers as RFC 5389/5780 say."""

from __future__ import annotations

import struct

from tests.stun_responder import MAGIC, answer, finish


def request(change: int, txid: bytes = bytes(range(12))) -> bytes:
    # What miniupnpd sends: a Binding request with one CHANGE-REQUEST attribute.
    return struct.pack("!HHI", 1, 8, MAGIC) + txid + struct.pack("!HHI", 3, 4, change)


def attrs(message: bytes) -> dict[int, bytes]:
    out, at = {}, 20
    while at < len(message):
        kind, size = struct.unpack("!HH", message[at : at + 4])
        out[kind] = message[at + 4 : at + 4 + size]
        at += 4 + size
    return out


def test_binding_answer_maps_the_source_and_names_the_socket_to_answer_from() -> None:
    result = answer(request(0x6), ("203.0.113.1", 47038))
    assert result is not None
    response, change_ip, change_port = result
    assert (change_ip, change_port) == (True, True)
    assert response[:2] == b"\x01\x01" and response[8:20] == bytes(range(12))
    got = attrs(finish(response, ("203.0.113.21", 3479), ("203.0.113.21", 3479)))
    port = struct.unpack("!H", got[0x0020][2:4])[0] ^ (MAGIC >> 16)
    ip = struct.unpack("!I", got[0x0020][4:8])[0] ^ MAGIC
    assert (ip, port) == (0xCB007101, 47038)  # 203.0.113.1
    assert got[0x0001] == struct.pack("!BBHI", 0, 1, 47038, 0xCB007101)
    assert got[0x802B] == struct.pack("!BBHI", 0, 1, 3479, 0xCB007115)  # RESPONSE-ORIGIN
    assert answer(request(0x2), ("203.0.113.1", 1))[1:] == (False, True)  # type: ignore[index]


def test_anything_but_a_binding_request_is_ignored() -> None:
    assert answer(b"\x00\x01" + bytes(5), ("203.0.113.1", 1)) is None
    assert answer(struct.pack("!HHI", 0x0101, 0, MAGIC) + bytes(12), ("203.0.113.1", 1)) is None
    assert answer(struct.pack("!HHI", 1, 0, 0xDEADBEEF) + bytes(12), ("203.0.113.1", 1)) is None
    assert answer(struct.pack("!HHI", 1, 40, MAGIC) + bytes(12), ("203.0.113.1", 1)) is None
