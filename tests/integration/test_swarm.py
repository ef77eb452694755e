"""Membership across real ``shoal start`` processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemons import SHOAL, Daemon, free_port, swarm_of, wait_until

pytestmark = pytest.mark.slow

EXPIRY_S = 4.0  # --record-ttl-s in tests.daemons.FAST


def full_view(daemons: list[Daemon]) -> bool:
    want = {d.peer_id for d in daemons}
    return all(d.view() == want for d in daemons)


def test_six_nodes_through_one_bootstrap_see_each_other_directly(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        boot = spawn("boot").wait_ready()
        others = [spawn(f"n{i}", join=boot) for i in range(5)]
        nodes = [boot, *(d.wait_ready() for d in others)]
        wait_until(lambda: full_view(nodes), 60, "a full view of 6 members on every node")
        for node in nodes:
            out = node.cli("status", "--json", check=True)
            status = json.loads(out.stdout)
            assert status["swarm_size"] == 6
            assert len(status["peers"]) == 5
            assert {p["connection"] for p in status["peers"]} == {"direct"}
            for key in (
                "peer_id",
                "swarm",
                "addrs",
                "uptime_s",
                "reachability",
                "bytes_in",
                "bytes_out",
                "training",
                "allreduce",
            ):
                assert key in status
            assert status["training"] is None and status["allreduce"] is None
            assert status["bytes_in"] > 0 and status["bytes_out"] > 0
            for peer in status["peers"]:
                assert set(peer) >= {"peer_id", "addrs", "connection", "rtt_ms", "last_seen_s"}

        # The swarm's DHT finds any member's signed record by peer id alone: in one hop from
        # the members closest to its key, and through Kademlia's walk as well.
        for node in nodes:
            assert node.control("dht_put", timeout_s=30)["stored"] == 3  # dht_replication
        for reader, target in zip(nodes, nodes[3:] + nodes[:3], strict=True):
            for via, paths in (("any", {"local", "direct"}), ("kademlia", {"kademlia"})):
                answer = reader.control("dht_get", timeout_s=30, peer_id=target.peer_id, via=via)
                found = answer["record"]
                assert answer["path"] in paths
                assert found is not None and found["peer_id"] == target.peer_id
                assert target.join_addr.split("/p2p/")[0] in found["addrs"]


def test_killed_members_vanish_and_swarm_outlives_its_bootstrap(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        boot = spawn("boot").wait_ready()
        others = [spawn(f"n{i}", join=boot) for i in range(4)]
        nodes = [boot, *(d.wait_ready() for d in others)]
        wait_until(lambda: full_view(nodes), 60, "a full view of 5 members")

        victim = nodes.pop(3)
        killed_at = time.monotonic()
        victim.kill()
        wait_until(
            lambda: full_view(nodes), EXPIRY_S + 10, "the killed member to vanish everywhere"
        )
        # Gone within the record expiry (plus one heartbeat and the polling period).
        assert time.monotonic() - killed_at < EXPIRY_S + 2.5

        boot.kill()
        nodes.remove(boot)
        wait_until(lambda: full_view(nodes), EXPIRY_S + 10, "the survivors to drop the bootstrap")

        late = spawn("late", join=nodes[1]).wait_ready()
        nodes.append(late)
        wait_until(lambda: full_view(nodes), 30, "the late joiner to be seen by all")
        assert all(d.status()["swarm_size"] == 4 for d in nodes)


def test_graceful_stop_drops_the_node_at_once(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        slow_expiry = ["--record-ttl-s", "60"]
        boot = spawn("boot", *slow_expiry).wait_ready()
        a = spawn("a", *slow_expiry, join=boot).wait_ready()
        b = spawn("b", *slow_expiry, join=boot).wait_ready()
        wait_until(lambda: full_view([boot, a, b]), 30, "a full view of 3")
        stopped_at = time.monotonic()
        assert b.cli("stop").returncode == 0
        b.proc.wait(15)  # type: ignore[union-attr]
        assert b.proc.returncode == 0  # type: ignore[union-attr]
        wait_until(lambda: full_view([boot, a]), 10, "the others to drop the leaver")
        assert time.monotonic() - stopped_at < 10 < 60  # long before its record would expire
        assert any("left swarm" in line for line in b.lines)

        assert a.proc is not None
        a.proc.send_signal(signal.SIGINT)  # Ctrl-C is a graceful leave too
        assert a.proc.wait(15) == 0
        wait_until(lambda: boot.view() == {boot.peer_id}, 10, "the bootstrap to drop a")
        assert boot.terminate() == 0  # and so is SIGTERM
        assert any("left swarm" in line for line in boot.lines)


def test_restart_with_same_home_keeps_peer_id_and_rejoins(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        boot = spawn("boot").wait_ready()
        node = spawn("n", join=boot).wait_ready()
        first_id = node.peer_id
        wait_until(lambda: full_view([boot, node]), 30, "a full view of 2")
        key = node.home / "identity.key"
        assert key.stat().st_mode & 0o777 == 0o600
        node.kill()
        node.start().wait_ready()
        assert node.peer_id == first_id
        wait_until(lambda: full_view([boot, node]), 30, "the restarted node back in the view")
        assert node.status()["peer_id"] == first_id


def test_a_node_left_alone_goes_back_to_its_bootstrap(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        boot = spawn("boot", listen=f"/ip4/127.0.0.1/tcp/{free_port()}").wait_ready()
        node = spawn("n", join=boot).wait_ready()
        wait_until(lambda: full_view([boot, node]), 30, "a full view of 2")
        boot.kill()
        wait_until(lambda: node.view() == {node.peer_id}, EXPIRY_S + 10, "n to drop boot")
        # Back at the same address with the same key, boot knows nobody: only n's going back
        # to its --join address can make the swarm whole again.
        boot.start().wait_ready()
        wait_until(lambda: full_view([boot, node]), 30, "n back in the swarm through boot")
        assert any("joining again through" in line for line in node.lines)


def test_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        node = spawn("n").wait_ready()
        watch = subprocess.Popen(
            [*SHOAL, "status", "--home", str(node.home), "--watch", "0.2"],
            stdout=subprocess.PIPE,
            text=True,
            env=node.env,
        )
        assert watch.stdout is not None
        screens = 0
        for line in watch.stdout:
            screens += line.startswith("\x1b[2J")
            if screens == 3:
                break
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
        assert screens == 3
