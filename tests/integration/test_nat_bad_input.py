"""Bad NAT traffic from a peer (dial-back requests, relay and hole-punch streams): each gets a
log line with the reason, and the daemon keeps running. Loopback only, no lab needed."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from net.host import build_host, swarm_protocol
from net.relay import read_frame, write_frame
from protocols.presence import Signer
from protocols.wire import encode_frame
from tests.daemons import swarm_of, wait_until

pytestmark = pytest.mark.slow


async def test_malformed_nat_relay_and_holepunch_traffic_is_refused_with_reasons(
    tmp_path: Path,
) -> None:
    with swarm_of(tmp_path) as spawn:
        node = spawn("n")
        await trio.to_thread.run_sync(node.wait_ready)
        seed = os.urandom(32)
        rogue = Signer(seed).peer_id
        host = build_host(seed, ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(node.join_addr))
            await host.connect(info)
            ctl = await host.new_stream(info.peer_id, [swarm_protocol("default", "ctl")])
            unsolicited = {"ok": True, "reason": "", "seen_ip": "1.2.3.4", "probe_port": 1}
            for message in (
                {"t": "nat.probe", "nonce": 1, "port": 70000},
                {"t": "nat.probe_result", "nonce": 5, **unsolicited},
                {"t": "nat.frobnicate"},
            ):
                await ctl.write(encode_frame(message))

            # Not a relay (a lone node is not known to be public): a reservation is refused.
            hop = await host.new_stream(info.peer_id, [swarm_protocol("default", "relay-hop")])
            await write_frame(hop, {"t": "relay.reserve"})
            answer = await read_frame(hop)
            assert answer["ok"] is False and "not a relay" in answer["reason"]
            await hop.reset()
            hop = await host.new_stream(info.peer_id, [swarm_protocol("default", "relay-hop")])
            await hop.write(struct.pack(">I", 1 << 20))  # a frame far over the relay's limit

            # A circuit "through" a relay the node holds no reservation with.
            stop = await host.new_stream(info.peer_id, [swarm_protocol("default", "relay-stop")])
            await write_frame(stop, {"t": "relay.stop", "peer": rogue})
            refused = await read_frame(stop)
            assert refused["ok"] is False and "no reservation" in refused["reason"]
            await stop.reset()

            punch = await host.new_stream(info.peer_id, [swarm_protocol("default", "dcutr")])
            await write_frame(punch, {"t": "dcutr.sync"})  # SYNC before CONNECT

            needles = (
                f"rejected nat.probe from {rogue}: field port must be an integer",
                f"rejected nat.probe_result from {rogue}: answer to a probe we did not send",
                f"rejected nat.frobnicate from {rogue}: unknown NAT message",
                f"relay: refused {rogue}: this node is not a relay now",
                f"relay: refused hop request from {rogue}: FrameError: relay frame of 1048576",
                f"relay: refused circuit through {rogue}: RelayError: circuit through {rogue}",
                f"hole punch from {rogue} refused: HolePunchError: dcutr.sync before dcutr.connect",
            )

            def logged() -> bool:
                return all(needle in node.output() for needle in needles)

            try:
                await trio.to_thread.run_sync(lambda: wait_until(logged, 20, "refusals logged"))
            except AssertionError:
                print(node.output())
                raise
            status = await trio.to_thread.run_sync(node.status)
            assert node.alive and status["nat"]["circuits_open"] == 0
            assert status["reachability"] == "unknown"
