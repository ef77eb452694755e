"""The libp2p host of a shoal node: TCP + Noise + Yamux, a swarm-scoped Kademlia DHT, counters.

py-libp2p's defaults are not what a training swarm wants, so this module pins them down:

- Security is Noise only. ``new_host`` also offers TLS, secio and *plaintext* by default; a
  peer that negotiated plaintext would talk to us unauthenticated.
- The muxer is Yamux only (Mplex moves 24-30 MB/s, see shared/notes/libp2p.md).
- The Kademlia protocol id is ``/shoal/<swarm>/kad/1.0.0``, so swarms never mix with each other
  or with the public IPFS DHT. py-libp2p 0.8.1 reads the protocol id from a module constant in
  five of its kad_dht modules (its ``protocol_prefix`` argument is stored and never used), so
  :func:`use_swarm_dht_protocol` rebinds that constant. The effect is per process: one process
  serves one swarm, which is how the daemon runs.
- Wire byte counters: every TCP connection of the host goes through ``TrioTCPStream``; the
  counters wrap its read/write once per process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.trio import TrioTCPStream
from libp2p.kad_dht import common as _kad_common
from libp2p.kad_dht import kad_dht as _kad_dht
from libp2p.kad_dht import peer_routing as _kad_routing
from libp2p.kad_dht import provider_store as _kad_providers
from libp2p.kad_dht import value_store as _kad_values
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils.address_validation import expand_wildcard_address

from protocols.presence import RecordError, decode_record

log = logging.getLogger("shoal.net.host")

PRESENCE_NAMESPACE = "shoal-presence"


def swarm_protocol(swarm: str, name: str, version: str = "1.0.0") -> str:
    """The libp2p protocol id of one of shoal's protocols in one swarm."""
    return f"/shoal/{swarm}/{name}/{version}"


def use_swarm_dht_protocol(swarm: str) -> str:
    """Make this process's Kademlia DHT speak ``/shoal/<swarm>/kad/1.0.0``; return the id."""
    protocol_id = swarm_protocol(swarm, "kad")
    for module in (_kad_common, _kad_dht, _kad_routing, _kad_values, _kad_providers):
        module.PROTOCOL_ID = protocol_id
    return protocol_id


@dataclass
class WireCounters:
    """Bytes this process moved over libp2p TCP connections (all of them, all protocols)."""

    bytes_in: int = 0
    bytes_out: int = 0


WIRE = WireCounters()
_counters_installed = False


def install_wire_counters() -> WireCounters:
    """Count the bytes of every libp2p TCP connection of this process (idempotent)."""
    global _counters_installed
    if _counters_installed:
        return WIRE
    read, write = TrioTCPStream.read, TrioTCPStream.write

    async def counted_read(self: TrioTCPStream, n: int | None = None) -> bytes:
        data = await read(self, n)
        WIRE.bytes_in += len(data)
        return data

    async def counted_write(self: TrioTCPStream, data: bytes) -> None:
        await write(self, data)
        WIRE.bytes_out += len(data)

    TrioTCPStream.read = counted_read
    TrioTCPStream.write = counted_write
    _counters_installed = True
    return WIRE


class PresenceValidator(Validator):
    """DHT validator for ``/shoal-presence/<peer_id>``: a valid signed record of that peer.

    The DHT answers "where is peer P?", and addresses outlive the short membership expiry, so
    a stored record is accepted until it is ``max_age_s`` old rather than until its own ttl.
    """

    def __init__(self, swarm: str, max_age_s: float) -> None:
        self.swarm = swarm
        self.max_age_s = max_age_s

    def validate(self, key: str, value: bytes) -> None:
        record = decode_record(msgpack.unpackb(value, raw=False), self.swarm)
        if key != presence_key(record.peer_id):
            raise RecordError(f"record of {record.peer_id} stored under foreign key {key}")
        if record.issued_at + self.max_age_s <= time.time():
            raise RecordError(f"record of {record.peer_id} older than {self.max_age_s} s")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for index, value in enumerate(values):
            try:
                seq = decode_record(msgpack.unpackb(value, raw=False), self.swarm).seq
            except (RecordError, ValueError):
                continue
            if seq > best_seq:
                best, best_seq = index, seq
        return best


def presence_key(peer_id: str) -> str:
    return f"/{PRESENCE_NAMESPACE}/{peer_id}"


def ensure_ports_free(listen: Sequence[str]) -> None:
    """Raise OSError if a fixed listen port is taken.

    py-libp2p binds with SO_REUSEPORT (TCP hole punching needs it), so a second node on the
    same port would start without error and share the port's traffic with the first. A plain
    bind with SO_REUSEADDR only (tolerates TIME_WAIT, refuses a live listener) tells first.
    """
    for text in listen:
        addr = multiaddr.Multiaddr(text)
        names = [p.name for p in addr.protocols()]
        port = int(addr.value_for_protocol("tcp"))
        if port == 0 or not ({"ip4", "ip6"} & set(names)):
            continue
        family = socket.AF_INET6 if "ip6" in names else socket.AF_INET
        ip = addr.value_for_protocol("ip6" if "ip6" in names else "ip4")
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((ip, port))


def build_host(seed: bytes, listen: Sequence[str]) -> IHost:
    """A libp2p host for the identity ``seed`` speaking only TCP + Noise + Yamux."""
    key_pair = create_new_key_pair(seed)
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519

    noise = NoiseTransport(key_pair, noise_privkey=new_x25519().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
    )
    guard_stream_handlers(host)
    return host


def exc_reason(exc: BaseException) -> str:
    """An exception as a log line's reason: its type, and its text when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def guard_stream_handlers(host: IHost) -> None:
    """Contain what any inbound stream handler raises (ours, identify's, the DHT's, ...).

    In py-libp2p an exception that escapes a stream handler cancels every other handler on
    that connection and then ends ``host.run`` itself: one peer resetting a stream at the
    wrong moment (a relay killed mid-circuit) could stop the whole daemon. Here it ends only
    that stream, with a log line naming the protocol and the reason."""
    network = host.get_network()
    negotiate_and_handle = network.common_stream_handler

    async def guarded(stream: Any) -> None:
        try:
            await negotiate_and_handle(stream)
        except Exception as exc:
            protocol = getattr(stream, "protocol_id", None) or "?"
            peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", "?")
            log.warning("inbound %s stream from %s ended with %s", protocol, peer, exc_reason(exc))
            with contextlib.suppress(Exception), trio.move_on_after(1):
                await stream.reset()

    network.set_stream_handler(guarded)


def dht_validator(swarm: str, record_max_age_s: float) -> NamespacedValidator:
    """The DHT's validator: its only value namespace holds signed presence records."""
    return NamespacedValidator({PRESENCE_NAMESPACE: PresenceValidator(swarm, record_max_age_s)})


def build_dht(host: IHost, swarm: str, validator: NamespacedValidator) -> KadDHT:
    """A server-mode Kademlia DHT under the swarm's own protocol id."""
    use_swarm_dht_protocol(swarm)
    return KadDHT(
        host,
        DHTMode.SERVER,
        validator=validator,
        validator_changed=True,
        strict_validation=True,
        enable_providers=False,
    )


def announce_addrs(host: IHost) -> list[str]:
    """Concrete addresses others can dial: wildcard listen addresses expanded to interfaces."""
    out: list[str] = []
    for addr in host.get_transport_addrs():
        for concrete in expand_wildcard_address(addr):
            if str(concrete) not in out:
                out.append(str(concrete))
    return out


def allow_redial(host: IHost, peer_id: str) -> None:
    """Let the next dial of ``peer_id`` go out now.

    py-libp2p's swarm refuses every dial of a peer whose addresses all failed once, for 60 s
    (its "negative cache"). The daemon retries on schedules of its own (a bootstrap every
    ``join_retry_s``, a member every heartbeat): with the cache in the way, a bootstrap back
    after a restart stayed unreachable for a minute of "recently failed all addresses"."""
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        with contextlib.suppress(ValueError):
            unblock(ID.from_base58(peer_id))


def connection_info(host: IHost, peer_id: str) -> tuple[str, list[str]]:
    """("direct" | "relayed" | "none", remote addresses) of our connections to ``peer_id``."""
    try:
        conns = host.get_network().connections.get(ID.from_base58(peer_id), [])
    except ValueError:
        return "none", []
    remotes: list[str] = []
    relayed = direct = False
    for conn in conns:
        for addr in _transport_addresses(conn):
            remotes.append(addr)
            if "/p2p-circuit" in addr:
                relayed = True
            else:
                direct = True
    if direct:
        return "direct", remotes
    if relayed:
        return "relayed", remotes
    return ("direct" if conns else "none"), remotes


def _transport_addresses(conn: Any) -> list[str]:
    try:
        return [str(a) for a in conn.get_transport_addresses()]
    except Exception:  # a connection being torn down has no addresses left to report
        return []
