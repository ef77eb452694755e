"""A STUN binding responder (RFC 5389, with RFC 5780's CHANGE-REQUEST) for the NAT lab.

miniupnpd's ``ext_perform_stun=yes`` learns its external address from a STUN server and
checks that nothing in front of it filters: it sends four Binding requests from four local
ports, asking for answers from the server's address, another port, another IP, and both, and
enables port forwarding only if all four answers arrive and each maps to its own port unchanged.
So this responder listens on two IPs x two ports and answers each request from the socket the
CHANGE-REQUEST attribute names. It runs in the lab's public "stun" namespace and answers only
what it is sent (lab addresses only).

    python tests/stun_responder.py IP1 IP2 [PORT1 PORT2]      (prints "stun ready")
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import struct
import sys

MAGIC = 0x2112A442
BINDING_REQUEST, BINDING_RESPONSE = 0x0001, 0x0101
MAPPED_ADDRESS, CHANGE_REQUEST, XOR_MAPPED_ADDRESS = 0x0001, 0x0003, 0x0020
RESPONSE_ORIGIN, OTHER_ADDRESS = 0x802B, 0x802C
CHANGE_IP, CHANGE_PORT = 0x4, 0x2

Address = tuple[str, int]


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def _ipv4(addr: Address, xor: bool = False) -> bytes:
    port, ip = addr[1], int(ipaddress.IPv4Address(addr[0]))
    if xor:
        port, ip = port ^ (MAGIC >> 16), ip ^ MAGIC
    return struct.pack("!BBHI", 0, 1, port, ip)


def answer(request: bytes, source: Address) -> tuple[bytes, bool, bool] | None:
    """(response, change_ip, change_port) for a Binding request from ``source``, else None.

    RESPONSE-ORIGIN and OTHER-ADDRESS are filled in by ``finish`` once the replying socket is
    known."""
    if len(request) < 20:
        return None
    kind, length, cookie = struct.unpack("!HHI", request[:8])
    if kind != BINDING_REQUEST or cookie != MAGIC or 20 + length > len(request):
        return None
    change = 0
    at, end = 20, 20 + length
    while at + 4 <= end:
        attr, size = struct.unpack("!HH", request[at : at + 4])
        if attr == CHANGE_REQUEST and size == 4:
            (change,) = struct.unpack("!I", request[at + 4 : at + 8])
        at += 4 + size + (-size % 4)
    body = _attr(XOR_MAPPED_ADDRESS, _ipv4(source, xor=True)) + _attr(MAPPED_ADDRESS, _ipv4(source))
    header = struct.pack("!HHI", BINDING_RESPONSE, len(body), MAGIC) + request[8:20]
    return header + body, bool(change & CHANGE_IP), bool(change & CHANGE_PORT)


def finish(response: bytes, origin: Address, other: Address) -> bytes:
    extra = _attr(RESPONSE_ORIGIN, _ipv4(origin)) + _attr(OTHER_ADDRESS, _ipv4(other))
    length = struct.unpack("!H", response[2:4])[0] + len(extra)
    return response[:2] + struct.pack("!H", length) + response[4:] + extra


def serve(ips: tuple[str, str], ports: tuple[int, int]) -> None:
    sockets: dict[tuple[int, int], socket.socket] = {}
    for i, ip in enumerate(ips):
        for j, port in enumerate(ports):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ip, port))
            sockets[(i, j)] = sock
    selector = selectors.DefaultSelector()
    for key, sock in sockets.items():
        selector.register(sock, selectors.EVENT_READ, key)
    print("stun ready", flush=True)
    while True:
        for event, _ in selector.select():
            i, j = event.data
            data, source = sockets[(i, j)].recvfrom(2048)
            result = answer(data, source)
            if result is None:
                print("ignored a datagram that is not a STUN binding request", source, flush=True)
                continue
            response, change_ip, change_port = result
            reply_key = (1 - i if change_ip else i, 1 - j if change_port else j)
            origin = (ips[reply_key[0]], ports[reply_key[1]])
            other = (ips[1 - i], ports[1 - j])
            sockets[reply_key].sendto(finish(response, origin, other), source)
            print("binding", source, "answered from", origin, flush=True)


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (2, 4):
        raise SystemExit(__doc__)
    ports = (int(args[2]), int(args[3])) if len(args) == 4 else (3478, 3479)
    serve((args[0], args[1]), ports)


if __name__ == "__main__":
    main()
