"""NAT-PMP (RFC 6886) port mapping as a sans-IO state machine: datagrams and time in and out.

No maintained NAT-PMP client is on PyPI (py-natpmp is a blocking client last released in 2023,
with no renewal or epoch check), so the rules are here, and ``net/portmap.py`` moves the
datagrams over UDP to the gateway's port 5351.

What the machine does (RFC 6886 sections in brackets):

- asks the external address (opcode 0) [3.2], then maps the TCP port (opcode 2) [3.3];
- retransmits an unanswered request after 250 ms, doubling, at most 9 times [3.1];
- accepts only a response of version 0 whose opcode is 128 + the request's, of the right size,
  for the port it asked about; anything else is counted and dropped with a reason [3.5];
- renews the mapping at half its granted lifetime [3.3];
- checks the gateway's epoch (seconds since start of epoch) on every response: less than 7/8 of
  the time elapsed since the last one, minus 2 s, means the gateway lost its state (a reboot),
  so the mapping is requested again at once [3.6];
- releases the mapping with a request of lifetime 0 [3.4].
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 128

# [3.1]: the first retransmission after 250 ms, then doubling, at most 9 sends (64 s in all).
INITIAL_RETRY_S = 0.25
MAX_SENDS = 9
# [3.6]: an epoch more than this far below the estimate means the gateway lost its mappings.
EPOCH_SLACK_S = 2.0

RESULT_CODES = {
    0: "success",
    1: "unsupported version",
    2: "not authorized / refused (NAT-PMP disabled on the gateway?)",
    3: "network failure (the gateway has no external address)",
    4: "out of resources (no ports left)",
    5: "unsupported opcode",
}


class NatPmpError(ValueError):
    """A datagram that is not a valid NAT-PMP response to us."""


@dataclass(frozen=True)
class AddressResponse:
    result: int
    epoch_s: int
    external_ip: str


@dataclass(frozen=True)
class MappingResponse:
    opcode: int
    result: int
    epoch_s: int
    internal_port: int
    external_port: int
    lifetime_s: int


def encode_address_request() -> bytes:
    return struct.pack("!BB", VERSION, OP_EXTERNAL_ADDRESS)


def encode_mapping_request(
    internal_port: int, external_port: int, lifetime_s: int, opcode: int = OP_MAP_TCP
) -> bytes:
    if not 0 < internal_port < 65536 or not 0 <= external_port < 65536:
        raise ValueError(f"ports out of range: {internal_port}, {external_port}")
    if not 0 <= lifetime_s < 2**32:
        raise ValueError(f"lifetime out of range: {lifetime_s}")
    return struct.pack("!BBHHHI", VERSION, opcode, 0, internal_port, external_port, lifetime_s)


def decode_response(data: bytes) -> AddressResponse | MappingResponse:
    """Parse a response datagram; raises NatPmpError with the reason."""
    if len(data) < 4:
        raise NatPmpError(f"{len(data)} bytes: shorter than any NAT-PMP response")
    version, opcode, result = struct.unpack("!BBH", data[:4])
    if version != VERSION:
        raise NatPmpError(f"version {version}, not NAT-PMP's 0 (a PCP gateway?)")
    if not opcode & RESPONSE_BIT:
        raise NatPmpError(f"opcode {opcode} is a request, not a response")
    op = opcode - RESPONSE_BIT
    if op == OP_EXTERNAL_ADDRESS:
        # A failed request may be answered with only the header and the epoch [3.5].
        if len(data) not in (8, 12):
            raise NatPmpError(f"external address response of {len(data)} bytes, not 12")
        epoch = struct.unpack("!I", data[4:8])[0]
        ip = str(ipaddress.IPv4Address(data[8:12])) if len(data) == 12 else "0.0.0.0"
        return AddressResponse(result, epoch, ip)
    if op in (OP_MAP_UDP, OP_MAP_TCP):
        if len(data) not in (8, 16):
            raise NatPmpError(f"mapping response of {len(data)} bytes, not 16")
        epoch = struct.unpack("!I", data[4:8])[0]
        if len(data) == 8:
            return MappingResponse(op, result, epoch, 0, 0, 0)
        internal, external, lifetime = struct.unpack("!HHI", data[8:16])
        return MappingResponse(op, result, epoch, internal, external, lifetime)
    raise NatPmpError(f"unknown response opcode {opcode}")


def result_text(code: int) -> str:
    return RESULT_CODES.get(code, f"result code {code}")


@dataclass(frozen=True)
class Mapped:
    external_ip: str
    external_port: int
    lifetime_s: int
    at: float  # when the gateway granted (or last renewed) it


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass
class _Request:
    payload: bytes
    sends: int
    next_send: float


class NatPmpMapping:
    """One TCP port mapping on one gateway, kept alive until ``release`` or failure.

    Drive it with ``start(now)``, ``on_datagram(data, now)`` and ``on_timer(now)`` (at or after
    ``deadline()``); each returns the datagrams to send to the gateway. ``outcome`` is None
    while the first mapping is pending, ``Mapped`` while held, ``Failed`` once it cannot be had.
    """

    def __init__(self, internal_port: int, lifetime_s: int) -> None:
        self.internal_port = internal_port
        self.lifetime_s = lifetime_s
        self.outcome: Mapped | Failed | None = None
        self.external_ip = ""
        self.renewals = 0
        self.gateway_restarts = 0
        self.dropped = 0
        self.rejected: list[str] = []  # reasons for the last dropped datagrams (newest last)
        self._request: _Request | None = None
        self._epoch: tuple[int, float] | None = None  # (gateway's epoch, our time) of last answer
        self._renew_at: float | None = None
        self._released = False

    # ---------------------------------------------------------------- inputs

    def start(self, now: float) -> list[bytes]:
        return self._send(encode_address_request(), now)

    def on_timer(self, now: float) -> list[bytes]:
        if self._released:
            return []
        request = self._request
        if request is not None and now >= request.next_send:
            if request.sends >= MAX_SENDS:
                self._request = None
                what = "renewal" if isinstance(self.outcome, Mapped) else "request"
                self.outcome = Failed(
                    f"NAT-PMP gateway did not answer the {what} ({MAX_SENDS} tries)"
                )
                return []
            request.sends += 1
            request.next_send = now + INITIAL_RETRY_S * 2 ** (request.sends - 1)
            return [request.payload]
        if self._renew_at is not None and now >= self._renew_at and request is None:
            self._renew_at = None
            return self._send(self._mapping_request(), now)
        return []

    def on_datagram(self, data: bytes, now: float) -> list[bytes]:
        if self._released or self._request is None:
            self._reject("an unexpected datagram (no request outstanding)")
            return []
        try:
            response = decode_response(data)
        except NatPmpError as exc:
            self._reject(str(exc))
            return []
        expected = self._request.payload[1]
        got = OP_EXTERNAL_ADDRESS if isinstance(response, AddressResponse) else response.opcode
        if got != expected:
            self._reject(f"a response to opcode {got} while waiting for {expected}")
            return []
        if (
            isinstance(response, MappingResponse)
            and response.result == 0
            and response.internal_port != self.internal_port
        ):
            self._reject(f"a mapping of port {response.internal_port}, not ours")
            return []
        restarted = self._check_epoch(response.epoch_s, now)
        self._request = None
        if response.result != 0:
            self.outcome = Failed(f"NAT-PMP gateway refused: {result_text(response.result)}")
            self._renew_at = None
            return []
        if isinstance(response, AddressResponse):
            self.external_ip = response.external_ip
            return self._send(self._mapping_request(), now)
        if response.lifetime_s == 0:
            self.outcome = Failed("NAT-PMP gateway granted a lifetime of 0 s")
            return []
        if isinstance(self.outcome, Mapped):
            self.renewals += 1
        self.outcome = Mapped(self.external_ip, response.external_port, response.lifetime_s, at=now)
        self._renew_at = now + response.lifetime_s / 2
        if restarted:
            # The gateway lost its state before this answer (which made the mapping anew):
            # its external address may have changed too, so ask again, then map again.
            return self._send(encode_address_request(), now)
        return []

    def release(self, now: float) -> list[bytes]:
        """The datagram that deletes our mapping [3.4]; the machine stops after it."""
        self._released = True
        self._request = None
        self._renew_at = None
        if not isinstance(self.outcome, Mapped):
            return []
        return [encode_mapping_request(self.internal_port, 0, 0)]

    # ---------------------------------------------------------------- state

    def deadline(self) -> float | None:
        """When ``on_timer`` next has something to do."""
        if self._released:
            return None
        if self._request is not None:
            return self._request.next_send
        return self._renew_at

    # ---------------------------------------------------------------- helpers

    def _mapping_request(self) -> bytes:
        held = self.outcome.external_port if isinstance(self.outcome, Mapped) else 0
        return encode_mapping_request(
            self.internal_port, held or self.internal_port, self.lifetime_s
        )

    def _send(self, payload: bytes, now: float) -> list[bytes]:
        self._request = _Request(payload, sends=1, next_send=now + INITIAL_RETRY_S)
        return [payload]

    def _check_epoch(self, epoch_s: int, now: float) -> bool:
        """True when the gateway's epoch went back: it restarted and lost our mapping."""
        last = self._epoch
        self._epoch = (epoch_s, now)
        if last is None:
            return False
        estimate = last[0] + (now - last[1]) * 7 / 8
        if epoch_s < estimate - EPOCH_SLACK_S:
            self.gateway_restarts += 1
            return True
        return False

    def _reject(self, reason: str) -> None:
        self.dropped += 1
        self.rejected = [*self.rejected[-9:], reason]
