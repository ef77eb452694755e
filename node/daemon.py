"""The shoal daemon: one trio nursery owning the libp2p host, the DHT, membership and the API.

Membership. Each node signs a presence record (see :mod:`protocols.presence`) every heartbeat
and sends it to every live member over its control link; the receiver answers with the echo of
the sender's timestamp (the RTT) and a fingerprint of its member table. When fingerprints
differ, the two run one round of push-pull anti-entropy (``pull`` with a digest, ``recs`` with
what the other lacks). So every node learns every live member through any member, not only the
bootstrap; a member killed outright stops refreshing and drops out of every view when its
record expires; a member that stops gracefully sends a signed leave and drops out at once.

The DHT (``/shoal/<swarm>/kad/1.0.0``) holds each member's signed record under
``/shoal-presence/<peer_id>``, so a node can find any member's addresses by its id alone.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from net.host import (
    WIRE,
    announce_addrs,
    build_dht,
    build_host,
    connection_info,
    ensure_ports_free,
    install_wire_counters,
    presence_key,
    swarm_protocol,
)
from net.links import ControlLinks, LinkSettings
from node.config import NodeConfig
from node.control import ControlError, serve_control
from protocols.presence import MemberTable, PresenceRecord, RecordError, Signer, decode_record
from protocols.wire import FrameError

log = logging.getLogger("shoal.node")

VERSION = "0.1.0"
MAX_RECORDS_PER_MESSAGE = 1024


class StartupError(RuntimeError):
    """The node cannot start (port in use, ...); the message says what to do."""


@dataclass
class PeerLiveness:
    rtt_ms: float | None = None
    last_pull: float = -math.inf
    last_dial: float = -math.inf
    busy: bool = False


class Node:
    """One shoal node. ``await node.run()`` until ``node.request_stop()``."""

    def __init__(
        self, config: NodeConfig, seed: bytes, on_ready: Callable[[Node], None] | None = None
    ) -> None:
        self.config = config
        self.signer = Signer(seed)
        self.peer_id = self.signer.peer_id
        self.seed = seed
        self.on_ready = on_ready
        self.table = MemberTable(config.swarm, self.peer_id, config.max_clock_skew_s)
        self.liveness: dict[str, PeerLiveness] = {}
        self.started_at = time.monotonic()
        self.addrs: list[str] = []
        self.rejected_records = 0
        self.training: dict[str, Any] | None = None
        self.allreduce: dict[str, Any] | None = None
        self._seq = 0
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        install_wire_counters()
        try:
            ensure_ports_free(self.config.listen)
        except OSError as exc:
            raise StartupError(self._listen_failure(exc)) from None
        host = build_host(self.seed, self.config.listen)
        self.host = host
        self.links = ControlLinks(
            host,
            swarm_protocol(self.config.swarm, "ctl"),
            self._on_message,
            LinkSettings(
                open_timeout_s=self.config.connect_timeout_s,
                send_timeout_s=self.config.send_timeout_s,
                idle_timeout_s=self.config.link_idle_timeout_s,
                max_frame_bytes=self.config.max_frame_bytes,
            ),
        )
        listen = [multiaddr.Multiaddr(a) for a in self.config.listen]
        try:
            async with host.run(listen_addrs=listen):
                await self._run_services()
        except OSError as exc:
            raise StartupError(self._listen_failure(exc)) from None
        except Exception as exc:
            if _mentions_bind_failure(exc):
                raise StartupError(self._listen_failure(exc)) from None
            raise

    def _listen_failure(self, exc: BaseException) -> str:
        listen = " ".join(self.config.listen)
        return (
            f"cannot listen on {listen}: {exc}. Another program (or another shoal node) may "
            f"hold the port: pick another with --listen /ip4/0.0.0.0/tcp/PORT (0 = any free port)"
        )

    async def _run_services(self) -> None:
        self.addrs = announce_addrs(self.host) + [
            a for a in self.config.announce if a not in announce_addrs(self.host)
        ]
        if not self.addrs:
            raise StartupError(f"not listening on any address ({self.config.listen})")
        self.dht = build_dht(self.host, self.config.swarm)
        async with background_trio_service(self.dht), trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve_control, self.config.socket_path, self._control)
            self._refresh_own_record()
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self._dht_loop)
            for addr in self.config.join:
                nursery.start_soon(self._join, addr)
            log.info("node %s ready in swarm %r at %s", self.peer_id, self.config.swarm, self.addrs)
            if self.on_ready is not None:
                self.on_ready(self)
            await self._stop.wait()
            await self._leave()
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ own record

    def _record(self, now: float, leaving: bool = False) -> PresenceRecord:
        # Wall-clock nanoseconds keep the sequence rising across restarts of the same identity.
        self._seq = max(self._seq + 1, time.time_ns())
        return PresenceRecord(
            swarm=self.config.swarm,
            peer_id=self.peer_id,
            seq=self._seq,
            issued_at=now,
            ttl_s=self.config.record_ttl_s,
            addrs=tuple(self.addrs),
            role=self.config.role,
            version=VERSION,
            capacity={"cpus": os.cpu_count() or 1, **self.config.capacity},
            training=self.training,
            leaving=leaving,
        )

    def _refresh_own_record(self) -> dict[str, bytes]:
        now = time.time()
        wire = self._record(now).sign(self.signer)
        self.table.offer(wire, now)
        return wire

    # ------------------------------------------------------------------ membership

    async def _heartbeat_loop(self) -> None:
        while True:
            now = time.time()
            for peer_id in self.table.expire(now):
                log.info(
                    "member %s expired (no heartbeat for %.0f s)", peer_id, self.config.record_ttl_s
                )
                self._forget(peer_id)
            wire = self._refresh_own_record()
            for member in self.table.others():
                self._spawn_heartbeat(member.record.peer_id, wire)
            await trio.sleep(self.config.heartbeat_s)

    def _spawn_heartbeat(self, peer_id: str, wire: dict[str, bytes]) -> None:
        live = self.liveness.setdefault(peer_id, PeerLiveness())
        if live.busy or self._nursery is None:
            return  # the last heartbeat to this peer is still on its way (bounded by timeouts)
        live.busy = True
        self._nursery.start_soon(self._heartbeat, peer_id, wire, live)

    async def _heartbeat(self, peer_id: str, wire: dict[str, bytes], live: PeerLiveness) -> None:
        try:
            if not await self._ensure_connected(peer_id, live):
                return
            message = {
                "t": "hb",
                "rec": wire,
                "ts": time.monotonic(),
                "dh": self.table.digest_hash(),
            }
            await self.links.send(peer_id, message)
        finally:
            live.busy = False

    async def _ensure_connected(self, peer_id: str, live: PeerLiveness) -> bool:
        if connection_info(self.host, peer_id)[0] != "none":
            return True
        member = self.table.get(peer_id)
        if member is None:
            return False
        now = time.monotonic()
        if now - live.last_dial < self.config.heartbeat_s:
            return False
        live.last_dial = now
        info = PeerInfo(
            ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in member.record.addrs]
        )
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                await self.host.connect(info)
        except Exception as exc:  # unreachable for now: the next heartbeat tries again
            log.debug("cannot connect to member %s: %s", peer_id, exc)
            return False
        await self._add_to_dht(peer_id)
        return True

    async def _add_to_dht(self, peer_id: str) -> None:
        try:
            await self.dht.routing_table.add_peer(ID.from_base58(peer_id))
        except Exception as exc:
            log.debug("DHT routing table refused %s: %s", peer_id, exc)

    def _forget(self, peer_id: str) -> None:
        self.liveness.pop(peer_id, None)
        if self._nursery is not None:
            self._nursery.start_soon(self.links.forget, peer_id)

    async def _join(self, addr: str) -> None:
        """Reach a bootstrap member and pull its member table; retry until in a swarm."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        while True:
            try:
                with trio.fail_after(self.config.connect_timeout_s):
                    await self.host.connect(info)
                bootstrap = str(info.peer_id)
                await self._add_to_dht(bootstrap)
                if await self.links.send(bootstrap, {"t": "pull", "digest": self.table.digest()}):
                    log.info("joined swarm %r through %s", self.config.swarm, addr)
                    return
                reason = "it did not accept a control stream (is it a shoal node of this swarm?)"
            except trio.TooSlowError:
                reason = f"no answer within {self.config.connect_timeout_s} s"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if self.table.others():
                log.info(
                    "bootstrap %s unreachable (%s); already in the swarm through others",
                    addr,
                    reason,
                )
                return
            log.warning(
                "cannot join through %s: %s; retrying in %.0f s",
                addr,
                reason,
                self.config.join_retry_s,
            )
            await trio.sleep(self.config.join_retry_s)

    async def _on_message(self, sender: str, message: dict[str, Any]) -> None:
        kind = message["t"]
        try:
            if kind == "hb":
                await self._on_heartbeat(sender, message)
            elif kind == "hb_ack":
                self._on_heartbeat_ack(sender, message)
            elif kind == "pull":
                self._on_pull(sender, message)
            elif kind == "recs":
                self._on_records(sender, message)
            else:
                log.warning("ignoring message of unknown type %r from %s", kind[:40], sender)
        except (RecordError, FrameError, KeyError, TypeError, ValueError) as exc:
            self.rejected_records += 1
            log.warning("rejected %s message from %s: %s", kind[:40], sender, exc)

    def _offer(self, sender: str, wire: Any, now: float) -> None:
        try:
            offer = self.table.offer(wire, now)
        except RecordError as exc:
            self.rejected_records += 1
            log.warning("rejected presence record from %s: %s", sender, exc)
            return
        pid = offer.record.peer_id
        if offer.kind == "joined" and pid != self.peer_id:
            log.info("member joined: %s %s", pid, list(offer.record.addrs))
            self._spawn_heartbeat(pid, self.table.get(self.peer_id).wire)  # type: ignore[union-attr]
        elif offer.kind == "left" and pid != self.peer_id:
            log.info("member left: %s", pid)
            self._forget(pid)

    async def _on_heartbeat(self, sender: str, message: dict[str, Any]) -> None:
        wire = message["rec"]
        record_peer = _record_peer(wire)
        if record_peer != sender:
            raise RecordError(f"heartbeat carries the record of {record_peer}, not the sender's")
        self._offer(sender, wire, time.time())
        if sender not in self.table.peer_ids():
            return  # a leave, or a record we refused: nothing to answer
        reply = {"t": "hb_ack", "ts": _number(message["ts"]), "dh": self.table.digest_hash()}
        self._reply(sender, reply)
        self._maybe_pull(sender, message.get("dh"))

    def _on_heartbeat_ack(self, sender: str, message: dict[str, Any]) -> None:
        sent = _number(message["ts"])
        rtt = time.monotonic() - sent
        if 0 <= rtt < 600:
            self.liveness.setdefault(sender, PeerLiveness()).rtt_ms = rtt * 1000
        self._maybe_pull(sender, message.get("dh"))

    def _maybe_pull(self, sender: str, digest_hash: Any) -> None:
        if digest_hash == self.table.digest_hash():
            return
        live = self.liveness.setdefault(sender, PeerLiveness())
        now = time.monotonic()
        if now - live.last_pull < self.config.heartbeat_s:
            return
        live.last_pull = now
        self._reply(sender, {"t": "pull", "digest": self.table.digest()})

    def _on_pull(self, sender: str, message: dict[str, Any]) -> None:
        digest = _digest(message["digest"])
        self._reply(
            sender,
            {"t": "recs", "recs": self.table.newer_than(digest), "digest": self.table.digest()},
        )

    def _on_records(self, sender: str, message: dict[str, Any]) -> None:
        records = message["recs"]
        if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_MESSAGE:
            raise ValueError(f"recs must be a list of at most {MAX_RECORDS_PER_MESSAGE} records")
        now = time.time()
        for wire in records:
            self._offer(sender, wire, now)
        if "digest" in message:
            missing = self.table.newer_than(_digest(message["digest"]))
            if missing:
                self._reply(sender, {"t": "recs", "recs": missing})

    def _reply(self, peer_id: str, message: dict[str, Any]) -> None:
        # Replies go out from their own task so the reader of the peer's stream never blocks.
        if self._nursery is not None:
            self._nursery.start_soon(self.links.send, peer_id, message)

    async def _leave(self) -> None:
        now = time.time()
        wire = self._record(now, leaving=True).sign(self.signer)
        message = {"t": "hb", "rec": wire, "ts": time.monotonic(), "dh": b""}
        with trio.move_on_after(self.config.leave_timeout_s):
            async with trio.open_nursery() as nursery:
                for member in self.table.others():
                    nursery.start_soon(self.links.send, member.record.peer_id, message)
        log.info("left swarm %r", self.config.swarm)

    # ------------------------------------------------------------------ DHT

    async def _dht_loop(self) -> None:
        while True:
            member = self.table.get(self.peer_id)
            if member is not None and self.table.others():
                try:
                    with trio.fail_after(self.config.dht_republish_s):
                        await self.dht.put_value(
                            presence_key(self.peer_id), msgpack.packb(member.wire)
                        )
                except Exception as exc:
                    log.debug("DHT publish of own record failed: %s", exc)
            await trio.sleep(self.config.dht_republish_s)

    async def lookup(self, peer_id: str) -> PresenceRecord | None:
        """A member's current record from the DHT (for a peer known only by its id)."""
        value = await self.dht.get_value(presence_key(peer_id))
        if value is None:
            return None
        return decode_record(msgpack.unpackb(value, raw=False), self.config.swarm)

    # ------------------------------------------------------------------ control API

    async def _control(self, request: dict[str, Any]) -> Any:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "peers":
            return self.status()["peers"]
        if cmd == "id":
            return {"peer_id": self.peer_id, "addrs": self.p2p_addrs(), "swarm": self.config.swarm}
        if cmd == "stop":
            self.request_stop()
            return {"stopping": True}
        if cmd == "dht_get":
            record = await self.lookup(str(request.get("peer_id", "")))
            return (
                None if record is None else {"peer_id": record.peer_id, "addrs": list(record.addrs)}
            )
        raise ControlError(f"unknown command {cmd[:40]!r}; known: status, peers, id, stop, dht_get")

    def p2p_addrs(self) -> list[str]:
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]

    def status(self) -> dict[str, Any]:
        now = time.time()
        peers = []
        for member in self.table.others():
            pid = member.record.peer_id
            kind, remotes = connection_info(self.host, pid)
            live = self.liveness.get(pid)
            peers.append(
                {
                    "peer_id": pid,
                    "addrs": list(member.record.addrs),
                    "connection": kind,
                    "remote_addrs": remotes,
                    "rtt_ms": None
                    if live is None or live.rtt_ms is None
                    else round(live.rtt_ms, 3),
                    "last_seen_s": round(max(0.0, now - member.last_seen), 3),
                    "role": member.record.role,
                    "version": member.record.version,
                }
            )
        return {
            "peer_id": self.peer_id,
            "swarm": self.config.swarm,
            "addrs": self.p2p_addrs(),
            "role": self.config.role,
            "version": VERSION,
            "home": str(self.config.home),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "reachability": "unknown",
            "swarm_size": len(self.table.peer_ids()),
            "peers": peers,
            "bytes_in": WIRE.bytes_in,
            "bytes_out": WIRE.bytes_out,
            "rejected": {"records": self.rejected_records, "frames": self.links.rejected_frames},
            "training": self.training,
            "allreduce": self.allreduce,
        }


def _record_peer(wire: Any) -> str:
    """The peer id a wire record claims (its signature is checked when it is offered)."""
    if not isinstance(wire, dict) or not isinstance(wire.get("body"), bytes):
        raise RecordError("heartbeat without a record")
    try:
        fields = msgpack.unpackb(wire["body"], raw=False)
        return str(fields[1])
    except Exception:
        raise RecordError("heartbeat record body is malformed") from None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _digest(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > 100_000:
        raise ValueError("digest must be a map of peer id to sequence number")
    for key, seq in value.items():
        if not isinstance(key, str) or isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError("digest must map peer ids to integers")
    return value


def _mentions_bind_failure(exc: BaseException) -> bool:
    seen: list[BaseException] = [exc]
    while seen:
        current = seen.pop()
        if isinstance(current, OSError) or "address already in use" in str(current).lower():
            return True
        if isinstance(current, BaseExceptionGroup):
            seen.extend(current.exceptions)
        if current.__cause__ is not None:
            seen.append(current.__cause__)
        if current.__context__ is not None:
            seen.append(current.__context__)
    return False
