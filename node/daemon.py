"""The shoal daemon: one trio nursery owning the libp2p host, the DHT, membership and the API.

Membership rules live in :mod:`protocols.membership` (push-pull anti-entropy of signed presence
records, sans-IO); this module only moves its messages over control links, keeps a direct
connection to every live member, and answers the control API.

The DHT (``/shoal/<swarm>/kad/1.0.0``) holds each member's signed record under
``/shoal-presence/<peer_id>``, so a node can find any member's addresses by its id alone.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from net.bulk import BulkListener, BulkSettings
from net.bulk_peers import BulkPeers
from net.holepunch import HolePunchSettings
from net.host import (
    WIRE,
    allow_redial,
    announce_addrs,
    build_dht,
    build_host,
    connection_info,
    dht_validator,
    ensure_ports_free,
    install_wire_counters,
    presence_key,
    swarm_protocol,
)
from net.links import ControlLinks, LinkSettings
from net.nat import NatService, NatSettings
from net.relay import RelaySettings
from node.config import NodeConfig, port_mapping_methods
from node.control import ControlError, serve_control
from protocols.dht_direct import DirectDHT, DirectDHTSettings, Done, closest
from protocols.dht_direct import Reaction as DHTReaction
from protocols.membership import Membership, MembershipSettings
from protocols.presence import PresenceRecord, Signer, decode_record
from protocols.relay import RelayLimits

if TYPE_CHECKING:  # torch (~190 MB of RSS) is imported only by nodes that run a workload
    from node.collective import AllReduceGroup

log = logging.getLogger("shoal.node")

VERSION = "0.1.0"

# Training modes (config key ``train``): module and class, imported only when chosen (torch).
# A mode is built as ``cls(node)``, runs as ``await mode.run()`` in the node's nursery, and
# ``mode.status()`` is the ``training`` section of ``shoal status``; ``mode.request_stop()``
# (called when the node starts leaving) ends its torch work early.
TRAIN_MODES: dict[str, tuple[str, str]] = {
    "diloco": ("node.diloco_mode", "DiLoCoMode"),
    "zo": ("node.zo_mode", "ZOMode"),
}


class StartupError(RuntimeError):
    """The node cannot start (port in use, ...); the message says what to do."""


@dataclass
class PeerLiveness:
    rtt_ms: float | None = None
    last_dial: float = -math.inf
    dialing: bool = False


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
        self.membership = Membership(
            config.swarm,
            self.signer,
            MembershipSettings(
                heartbeat_s=config.heartbeat_s,
                record_ttl_s=config.record_ttl_s,
                fanout=config.gossip_fanout,
                max_clock_skew_s=config.max_clock_skew_s,
            ),
            self._describe_self,
        )
        self.liveness: dict[str, PeerLiveness] = {}
        self.started_at = time.monotonic()
        self.addrs: list[str] = []
        self.rejected_messages = 0
        self.training: dict[str, Any] | None = None
        self.group: AllReduceGroup | None = None
        self.train_mode: Any = None
        self._joined_swarm = False  # a --join address answered (not just: someone joined us)
        self._joining = False  # --join attempts under way
        self._alone_since: float | None = None  # when the table last became empty (monotonic)
        self.validator = dht_validator(config.swarm, config.dht_record_max_age_s)
        self.direct_dht = DirectDHT(
            self.peer_id,
            self.validator.validate,
            self.validator.select,
            DirectDHTSettings(
                replication=config.dht_replication, query_timeout_s=config.dht_query_timeout_s
            ),
        )
        self._dht_waiters: dict[int, tuple[trio.Event, list[Done]]] = {}
        self.rejected_dht = 0
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
        listening = False
        try:
            async with host.run(listen_addrs=listen):
                listening = True
                await self._run_services()
        except Exception as exc:
            if not listening and _mentions_bind_failure(exc):
                raise StartupError(self._listen_failure(exc)) from None
            if listening:
                log.exception("node stopped by an error it did not handle")
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
        self.dht = build_dht(self.host, self.config.swarm, self.validator)
        async with background_trio_service(self.dht), trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve_control, self.config.socket_path, self._control)
            await self._start_bulk(nursery)
            self.nat = NatService(
                self.host,
                self.links,
                self.peer_id,
                lambda name: swarm_protocol(self.config.swarm, name),
                _nat_settings(self.config),
                lambda: [m.record.peer_id for m in self.membership.table.others()],
                lambda pid: (self.liveness.get(pid) or PeerLiveness()).rtt_ms,
                self._on_path_change,
            )
            await nursery.start(self.nat.serve, _bind_host(self.config.listen))
            self.links.connect = self._ensure_connected
            self.membership.refresh(time.time())
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self._dht_loop)
            if self.config.join:
                self._start_joining()
            if self.config.train != "none":
                module, name = TRAIN_MODES[self.config.train]
                self.train_mode = getattr(importlib.import_module(module), name)(self)
                nursery.start_soon(self.train_mode.run)  # it starts the group it trains with
            elif self.config.allreduce_workload != "none":
                self.group = self._make_group()
                nursery.start_soon(self.group.run)
            log.info("node %s ready in swarm %r at %s", self.peer_id, self.config.swarm, self.addrs)
            if self.on_ready is not None:
                self.on_ready(self)
            await self._stop.wait()
            if self.train_mode is not None:
                self.train_mode.request_stop()
            await self._leave()
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ data plane

    async def _start_bulk(self, nursery: trio.Nursery) -> None:
        c = self.config
        settings = BulkSettings(
            connections_per_peer=c.bulk_connections,
            io_timeout_s=c.bulk_io_timeout_s,
            handshake_timeout_s=c.bulk_handshake_timeout_s,
        )
        bind = _bind_host(c.listen)
        listener = BulkListener(settings, bind_host=bind, bind_port=c.bulk_port)
        await nursery.start(listener.serve)
        self.bulk = BulkPeers(
            self.peer_id,
            self.host,
            self.links,
            listener,
            settings,
            swarm_protocol(c.swarm, "bulk"),
            nursery,
            c.bulk_setup_timeout_s,
        )

    def _make_group(self, workload: str | None = None) -> AllReduceGroup:
        from node.collective import AllReduceGroup, GroupSettings, NetTransport
        from protocols.allreduce import AllReduceSettings

        c = self.config
        assert self._nursery is not None
        transport = NetTransport(
            self.links,
            self.bulk,
            c.bulk_io_timeout_s,
            self._nursery,
            lambda peer, reason: self.group.on_peer_lost(peer) if self.group else None,
        )
        settings = GroupSettings(
            workload=workload or c.allreduce_workload,
            check_elems=c.allreduce_check_elems,
            check_poison=c.allreduce_check_poison,
            compression=c.allreduce_compression,
            io_timeout_s=c.bulk_io_timeout_s,
            join_wait_s=c.allreduce_join_wait_s,
            round_timeouts=AllReduceSettings(
                ready_timeout_s=c.allreduce_ready_timeout_s,
                accept_timeout_s=c.allreduce_accept_timeout_s,
                coordinator_timeout_s=c.allreduce_coordinator_timeout_s,
                join_timeout_s=c.allreduce_join_timeout_s,
                join_requests=c.allreduce_join_requests,
                proposal_timeout_s=c.allreduce_ready_timeout_s
                + max(2 * c.allreduce_join_wait_s, c.allreduce_join_timeout_s)
                + 5,
            ),
        )

        def peers() -> dict[str, str]:
            out = {}
            for member in self.membership.table.others():
                group = (member.record.training or {}).get("allreduce")
                if isinstance(group, dict) and group.get("group") == c.swarm:
                    out[member.record.peer_id] = str(group.get("phase"))
            return out

        def may_found() -> bool:
            # A node given --join founds nothing before one of those addresses answered: nodes
            # that joined *it* meanwhile do not make it part of the swarm it was sent to.
            return not c.join or self._joined_swarm

        return AllReduceGroup(
            self.peer_id, c.swarm, transport, settings, peers, self._link_costs, may_found
        )

    # ------------------------------------------------------------------ membership

    def _describe_self(self) -> dict[str, Any]:
        return {
            "addrs": self.addrs + (self.nat.extra_addrs() if hasattr(self, "nat") else []),
            "role": self.config.role,
            "version": VERSION,
            "capacity": {"cpus": os.cpu_count() or 1, **self.config.capacity},
            "training": {
                **(self.training or {}),
                **({"links": self._measured_rtts()} if self.group is not None else {}),
                **(
                    {"allreduce": {"group": self.config.swarm, "phase": self.group.phase}}
                    if self.group is not None
                    else {}
                ),
            }
            or None,
        }

    def _measured_rtts(self) -> dict[str, float]:
        """RTT in ms to each member measured so far: published so coordinators can order rings."""
        return {
            pid: round(live.rtt_ms, 3)
            for pid, live in self.liveness.items()
            if live.rtt_ms is not None
        }

    def _link_costs(self) -> dict[tuple[str, str], float]:
        """(a, b) -> seconds, from every member's published RTTs (ours included)."""
        costs: dict[tuple[str, str], float] = {}
        for member in self.membership.table.members():
            links = (member.record.training or {}).get("links")
            if isinstance(links, dict):
                for peer, rtt_ms in links.items():
                    if isinstance(peer, str) and isinstance(rtt_ms, int | float) and rtt_ms >= 0:
                        costs[(member.record.peer_id, peer)] = float(rtt_ms) / 1000
        return costs

    async def _heartbeat_loop(self) -> None:
        while True:
            tick = self.membership.tick(time.time())
            for peer_id in tick.expired:
                log.info(
                    "member %s expired (no fresh record for %.0f s)",
                    peer_id,
                    self.config.record_ttl_s,
                )
                self._forget(peer_id)
            for peer_id, message in tick.sends:
                self._send(peer_id, message)
            for member in self.membership.table.others():
                self._keep_connected(member.record.peer_id)
            self._rejoin_if_alone()
            await trio.sleep(self.config.heartbeat_s)

    def _rejoin_if_alone(self) -> None:
        """A node told to join whose table has held nobody else for ``join_retry_s`` (every
        member expired: a partition, its bootstrap restarted, its machine slept) goes back to
        its --join addresses: nobody else would ever tell it about the swarm again."""
        if not self.config.join or self._joining:
            return
        if self.membership.table.others():
            self._alone_since = None
            return
        now = time.monotonic()
        if self._alone_since is None:
            self._alone_since = now
        elif now - self._alone_since >= self.config.join_retry_s:
            log.warning(
                "no other member left for %.0f s; joining again through %s",
                now - self._alone_since,
                ", ".join(self.config.join),
            )
            self._start_joining()

    def _start_joining(self) -> None:
        assert self._nursery is not None
        self._joining = True
        self._nursery.start_soon(self._join_bootstraps)

    async def _join_bootstraps(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for addr in self.config.join:
                    nursery.start_soon(self._join, addr)
        finally:
            self._joining = False
            self._alone_since = None

    def _send(self, peer_id: str, message: dict[str, Any]) -> None:
        """Send from a task of its own, so no reader or loop ever waits on a slow peer."""
        if self._nursery is not None:
            self._nursery.start_soon(self._send_now, peer_id, message)

    async def _send_now(self, peer_id: str, message: dict[str, Any]) -> None:
        if await self._ensure_connected(peer_id):
            await self.links.send(peer_id, message)

    def _keep_connected(self, peer_id: str) -> None:
        live = self.liveness.setdefault(peer_id, PeerLiveness())
        if live.dialing or connection_info(self.host, peer_id)[0] != "none":
            return
        if time.monotonic() - live.last_dial < self.config.heartbeat_s or self._nursery is None:
            return
        self._nursery.start_soon(self._ensure_connected, peer_id)

    async def _ensure_connected(self, peer_id: str) -> bool:
        if connection_info(self.host, peer_id)[0] != "none":
            return True
        member = self.membership.table.get(peer_id)
        live = self.liveness.setdefault(peer_id, PeerLiveness())
        if member is None:
            return False
        if live.dialing:  # another task is dialing it: wait for that dial's outcome
            with trio.move_on_after(2 * self.config.connect_timeout_s):
                while live.dialing:
                    await trio.sleep(0.05)
            return connection_info(self.host, peer_id)[0] != "none"
        live.dialing, live.last_dial = True, time.monotonic()
        try:  # directly, else through a relay the member published (net/nat.py)
            with trio.fail_after(2 * self.config.connect_timeout_s):
                await self.nat.connect(peer_id, list(member.record.addrs))
        except Exception as exc:  # unreachable for now: the next heartbeat tries again
            log.debug("cannot connect to member %s: %s", peer_id, exc)
            return False
        finally:
            live.dialing = False
        await self._add_to_dht(peer_id)
        return True

    async def _add_to_dht(self, peer_id: str) -> None:
        try:
            await self.dht.routing_table.add_peer(ID.from_base58(peer_id))
        except Exception as exc:
            log.debug("DHT routing table refused %s: %s", peer_id, exc)

    def _on_path_change(self, peer_id: str) -> None:
        """A hole punch made the path to ``peer_id`` direct: move the links and bulk to it."""
        self.bulk.close(peer_id)
        if self._nursery is not None:
            self._nursery.start_soon(self.links.forget, peer_id)

    def _forget(self, peer_id: str) -> None:
        self.liveness.pop(peer_id, None)
        self.nat.forget(peer_id)
        self._dht_react(self.direct_dht.on_peer_lost(peer_id))
        if self.group is not None:
            self.group.on_peer_lost(peer_id)
        if self.config.train == "zo" and self.train_mode is not None:
            self.train_mode.on_peer_lost(peer_id)
        self.bulk.close(peer_id)
        if self._nursery is not None:
            self._nursery.start_soon(self.links.forget, peer_id)

    async def _join(self, addr: str) -> None:
        """Reach a bootstrap member and sync the member table with it; retry until in a swarm."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        while True:
            try:
                allow_redial(self.host, str(info.peer_id))
                with trio.fail_after(self.config.connect_timeout_s):
                    await self.host.connect(info)
                bootstrap = str(info.peer_id)
                await self._add_to_dht(bootstrap)
                if await self.links.send(bootstrap, self.membership.hello(time.time())):
                    log.info("joined swarm %r through %s", self.config.swarm, addr)
                    self._joined_swarm = True
                    return
                reason = "it did not accept a control stream (is it a shoal node of this swarm?)"
            except trio.TooSlowError:
                reason = f"no answer within {self.config.connect_timeout_s} s"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if self.membership.table.others():
                log.info("bootstrap %s unreachable (%s); in the swarm through others", addr, reason)
                return
            log.warning(
                "cannot join through %s: %s; retrying in %g s",
                addr,
                reason,
                self.config.join_retry_s,
            )
            await trio.sleep(self.config.join_retry_s)

    async def _on_message(self, sender: str, message: dict[str, Any]) -> None:
        kind = message["t"]
        # The all-reduce machine checks senders itself (a joiner is not a group member yet, and
        # its ar.join may outrun its presence record); every control link is Noise-authenticated.
        # ZO mode: its record log ("zo.") and its snapshot's shared-state sync ("ss.").
        if self.config.train == "zo" and kind.startswith(("zo.", "ss.")) and self.train_mode:
            await self.train_mode.on_control(sender, message)
            return
        if kind.startswith(("ar.", "ss.")):
            if self.group is not None:
                self.group.on_control(sender, message)
            else:
                log.warning("ignoring %s from %s: this node runs no all-reduce", kind[:40], sender)
            return
        if kind.startswith("bulk."):
            self.bulk.on_message(sender, message)
            return
        if kind.startswith("nat."):
            self.nat.on_message(sender, message)
            return
        if kind.startswith("dht."):
            self._dht_react(self.direct_dht.on_message(sender, message, time.monotonic()))
            return
        reaction = self.membership.on_message(sender, message, time.time())
        for reason in reaction.rejected:
            self.rejected_messages += 1
            log.warning(
                "rejected %s message from %s: %s", str(message.get("t"))[:40], sender, reason
            )
        for record in reaction.joined:
            log.info("member joined: %s %s", record.peer_id, list(record.addrs))
            self._keep_connected(record.peer_id)
        for peer_id in reaction.left:
            log.info("member left: %s", peer_id)
            self._forget(peer_id)
        if reaction.rtt_s is not None:
            self.liveness.setdefault(sender, PeerLiveness()).rtt_ms = reaction.rtt_s * 1000
        for peer_id, reply in reaction.sends:
            self._send(peer_id, reply)

    async def _leave(self) -> None:
        with trio.move_on_after(self.config.leave_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer_id, message in self.membership.leave(time.time()):
                    nursery.start_soon(self.links.send, peer_id, message)
                nursery.start_soon(self.nat.leave)
        log.info("left swarm %r", self.config.swarm)

    # ------------------------------------------------------------------ DHT

    async def _dht_loop(self) -> None:
        """Keep this node's record at the members closest to its key: whenever that set
        changes (members come and go) and every ``dht_republish_s``; Kademlia too."""
        key = presence_key(self.peer_id)
        stored_at: list[str] = []
        direct_at = kademlia_at = -math.inf
        while True:
            members = self.membership.table.peer_ids()
            now = time.monotonic()
            if len(members) > 1:
                targets = closest(key, members, self.config.dht_replication)
                if targets != stored_at or now - direct_at >= self.config.dht_republish_s:
                    stored_at, direct_at = targets, now
                    await self.publish_to_dht()
                if now - kademlia_at >= self.config.dht_republish_s:
                    kademlia_at = now
                    self._nursery_start(self._publish_to_kademlia_quietly)
            await trio.sleep(self.config.heartbeat_s)

    async def _publish_to_kademlia_quietly(self) -> None:
        try:
            with trio.fail_after(self.config.dht_republish_s):
                await self.publish_to_kademlia()
        except Exception as exc:
            log.debug("Kademlia publish of own record failed: %s", exc)

    def _nursery_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    def _own_wire_record(self) -> bytes | None:
        member = self.membership.table.get(self.peer_id)
        return None if member is None else bytes(msgpack.packb(member.wire))

    async def publish_to_dht(self) -> int:
        """Store this node's signed record at the members closest to its key (one hop, see
        :mod:`protocols.dht_direct`); return how many stored it."""
        value = self._own_wire_record()
        if value is None:
            return 0
        done = await self._direct_request(
            lambda now: self.direct_dht.put(
                presence_key(self.peer_id), value, self.membership.table.peer_ids(), now
            )
        )
        return done.stored

    async def publish_to_kademlia(self) -> None:
        """Store this node's record in the Kademlia DHT too (reaches peers outside the view)."""
        value = self._own_wire_record()
        if value is not None:
            await self.dht.put_value(presence_key(self.peer_id), value)

    async def lookup(self, peer_id: str, via: str = "any") -> tuple[PresenceRecord | None, str]:
        """A member's current record and where it came from (``local``, ``direct`` or
        ``kademlia``): the one-hop DHT first, then Kademlia's walk (``via`` picks one)."""
        key = presence_key(peer_id)
        value: bytes | None = None
        path = "kademlia"
        if via in ("any", "direct"):
            done = await self._direct_request(
                lambda now: self.direct_dht.get(key, self.membership.table.peer_ids(), now)
            )
            value = done.value
            path = "local" if done.answered_by == self.peer_id else "direct"
        if value is None and via in ("any", "kademlia"):
            # quorum=1: the first valid signed record ends the walk (py-libp2p otherwise queries
            # every candidate); records carry their own sequence number, so a stale one shows.
            value = await self.dht.get_value(key, quorum=1)
            path = "kademlia"
        if value is None:
            return None, path
        return decode_record(msgpack.unpackb(value, raw=False), self.config.swarm), path

    async def _direct_request(self, start: Callable[[float], tuple[int, DHTReaction]]) -> Done:
        """Run one one-hop DHT request to its end (answers or ``dht_query_timeout_s``)."""
        request_id, reaction = start(time.monotonic())
        event, box = trio.Event(), list[Done]()
        self._dht_waiters[request_id] = (event, box)
        try:
            self._dht_react(reaction)
            with trio.move_on_after(self.config.dht_query_timeout_s):
                await event.wait()
            if not box:
                reason = f"no answer within {self.config.dht_query_timeout_s} s"
                self._dht_react(self.direct_dht.give_up(request_id, reason))
            return box[0]
        finally:
            self._dht_waiters.pop(request_id, None)

    def _dht_react(self, reaction: DHTReaction) -> None:
        for reason in reaction.rejected:
            self.rejected_dht += 1
            log.warning("DHT: %s", reason)
        for peer_id, message in reaction.sends:
            self._send(peer_id, message)
        for done in reaction.done:
            waiter = self._dht_waiters.get(done.request_id)
            if waiter is not None:
                waiter[1].append(done)
                waiter[0].set()

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
            via = str(request.get("via", "any"))
            if via not in ("any", "direct", "kademlia"):
                raise ControlError("dht_get: via must be one of any, direct, kademlia")
            started = time.perf_counter()
            record, path = await self.lookup(str(request.get("peer_id", "")), via)
            elapsed_ms = (time.perf_counter() - started) * 1000
            found = (
                None if record is None else {"peer_id": record.peer_id, "addrs": list(record.addrs)}
            )
            return {"record": found, "elapsed_ms": elapsed_ms, "path": path}
        if cmd == "netcheck":
            return self.nat.netcheck()
        if cmd == "dht_put":
            started = time.perf_counter()
            stored = await self.publish_to_dht()
            direct_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            await self.publish_to_kademlia()
            kad_ms = (time.perf_counter() - started) * 1000
            return {"elapsed_ms": direct_ms, "stored": stored, "kademlia_elapsed_ms": kad_ms}
        raise ControlError(
            f"unknown command {cmd[:40]!r}; "
            "known: status, peers, id, stop, netcheck, dht_get, dht_put"
        )

    def p2p_addrs(self) -> list[str]:
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]

    def status(self) -> dict[str, Any]:
        now = time.time()
        peers = []
        for member in self.membership.table.others():
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
                    "bulk": self.bulk.path(pid),
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
            "reachability": self.nat.verdict(),
            "nat": self.nat.status(),
            "swarm_size": len(self.membership.table.peer_ids()),
            "peers": peers,
            "bytes_in": WIRE.bytes_in,
            "bytes_out": WIRE.bytes_out,
            "rejected": {
                "messages": self.rejected_messages,
                "frames": self.links.rejected_frames,
                "dht": self.rejected_dht,
            },
            "training": self.training if self.train_mode is None else self.train_mode.status(),
            "allreduce": None if self.group is None else self.group.status(),
        }


def _nat_settings(c: NodeConfig) -> NatSettings:
    return NatSettings(
        min_answers=c.reachability_min_answers,
        probe_interval_s=c.nat_probe_interval_s,
        dialback_timeout_s=c.nat_dialback_timeout_s,
        probe_port=c.nat_probe_port,
        relay_service=c.relay_service,
        reservations=c.relay_reservations,
        relay_retry_s=c.relay_retry_s,
        direct_dial_timeout_s=c.nat_direct_dial_timeout_s,
        wait_for_dialer_s=c.connect_timeout_s,
        holepunch=c.holepunch == "on",
        relay=RelaySettings(
            handshake_timeout_s=c.relay_handshake_timeout_s,
            limits=RelayLimits(
                max_reservations=c.relay_max_reservations,
                reservation_ttl_s=c.relay_reservation_ttl_s,
                max_circuits_per_peer=c.relay_max_circuits_per_peer,
                circuit_max_s=c.relay_circuit_max_s,
                circuit_max_bytes=c.relay_circuit_max_bytes,
            ),
        ),
        punch=HolePunchSettings(
            attempt_timeout_s=c.holepunch_attempt_timeout_s, addrs_wait_s=c.holepunch_addrs_wait_s
        ),
        port_mapping_methods=port_mapping_methods(c.port_mapping),
        port_mapping_timeout_s=c.port_mapping_timeout_s,
        port_mapping_lease_s=c.port_mapping_lease_s,
    )


def _bind_host(listen: tuple[str, ...]) -> str:
    """The IPv4 address the bulk listener binds: the first listen address's, else all."""
    for addr in listen:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            return parts[2]
    return "0.0.0.0"


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
