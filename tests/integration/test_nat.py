"""NAT traversal through real NATs: real `shoal` daemons in the namespaces of deploy/netlab.

Two labs, each with a public relay/bootstrap node and a second public node (dial-backs need
two members): cone + cone (hole punching must make the pair direct and take the relay off the
bulk path), and cone + symmetric + symmetric (punching cannot work: the relay carries control
and bulk traffic, and training still includes every node).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import REPO, Daemon, wait_until
from tests.netlab import PORT, NetLab, netlab, router_public_ip

pytestmark = [pytest.mark.slow, pytest.mark.netlab]

CHECK = ["--allreduce-workload", "check", "--allreduce-join-wait-s", "2"]


def peer_entry(node: Daemon, other: Daemon) -> dict[str, Any]:
    for peer in node.status()["peers"]:
        if peer["peer_id"] == other.peer_id:
            return dict(peer)
    raise AssertionError(f"{other.peer_id} is not in {node.home.name}'s view")


def rounds_with(node: Daemon, members: set[str]) -> int:
    history = node.status()["allreduce"]["history"]
    return sum(1 for e in history if e["outcome"] == "completed" and set(e["members"]) == members)


def relayed_bytes(nodes: list[Daemon]) -> int:
    return sum(n.status()["nat"]["bytes_relayed"] for n in nodes)


def start(lab: NetLab, natted: list[str], *public_args: str) -> tuple[Daemon, Daemon, list[Daemon]]:
    relay = lab.spawn("relay", *public_args).wait_ready()
    pub = lab.spawn("pub", *public_args, join=relay)
    hosts = [lab.spawn(ns, *CHECK, join=relay) for ns in natted]
    for daemon in (pub, *hosts):
        daemon.wait_ready()
    everyone = [relay, pub, *hosts]
    ids = {d.peer_id for d in everyone}
    wait_until(lambda: all(d.view() == ids for d in everyone), 60, "one swarm view on every node")
    return relay, pub, hosts


def explain(lab: NetLab) -> None:
    for daemon in lab.daemons:
        print("=====", daemon.home.name)
        if daemon.alive:
            status = daemon.status()
            print(status["nat"], status["allreduce"] and status["allreduce"]["last"])
            for peer in status["peers"]:
                print("  ", peer["peer_id"][-6:], peer["connection"], peer["bulk"])
        wanted = ("shoal.net", "ERROR", "allreduce", "cannot")
        lines = [x for x in daemon.lines if any(w in x for w in wanted) and "skipped" not in x]
        print("\n".join(lines)[-6000:])


def test_cone_nat_pair_goes_direct_and_bulk_leaves_the_relay(tmp_path: Path) -> None:
    with netlab(tmp_path, "A:cone B:cone") as lab:
        try:
            relay, pub, (ha, hb) = start(lab, ["hA", "hB"])
            # Reachability from dial-backs: public nodes public, the NAT'ed ones private.
            verdicts = {"relay": "public", "pub": "public", "hA": "private", "hB": "private"}
            for node in (relay, pub, ha, hb):
                wait_until(
                    lambda n=node: n.status()["reachability"] == verdicts[n.home.name],
                    30,
                    f"{node.home.name} to say {verdicts[node.home.name]}",
                )
            # public + public: a plain direct connection.
            assert peer_entry(relay, pub)["connection"] == "direct"

            # cone + cone: the relayed connection is upgraded; each side's connection goes to
            # the other router's public address and listen port, not to the relay.
            for me, other, router in ((ha, hb, "hB"), (hb, ha, "hA")):
                want = f"/ip4/{router_public_ip(router)}/tcp/{PORT}"
                wait_until(
                    lambda me=me, other=other, want=want: (
                        peer_entry(me, other)["connection"] == "direct"
                        and all(a.startswith(want) for a in peer_entry(me, other)["remote_addrs"])
                    ),
                    60,
                    f"{me.home.name} -> {other.home.name} direct at {want}",
                )
            out = ha.cli("peers", check=True).stdout
            assert f"direct   /ip4/{router_public_ip('hB')}/tcp/{PORT}" in out

            # Bulk data flows on the direct path: all-reduce rounds between hA and hB complete
            # while the relays move no byte and hold no circuit between them.
            pair = {ha.peer_id, hb.peer_id}
            wait_until(lambda: rounds_with(ha, pair) >= 1, 90, "a round between hA and hB")
            before, done = relayed_bytes([relay, pub]), rounds_with(ha, pair)
            wait_until(lambda: rounds_with(ha, pair) >= done + 2, 60, "two more rounds")
            assert relayed_bytes([relay, pub]) == before
            assert peer_entry(ha, hb)["bulk"] is not None
            assert peer_entry(ha, hb)["connection"] == "direct"
            for node in (relay, pub):
                assert sorted(pair) not in node.status()["nat"]["circuits"]
            assert (
                ha.status()["nat"]["holepunch"]["succeeded"]
                + hb.status()["nat"]["holepunch"]["succeeded"]
                >= 1
            )

            check = json.loads(ha.cli("netcheck", "--json", check=True).stdout)
            assert check["reachability"] == "private"
            assert check["mapping_varies_by_destination"] is False
            assert {o["addr"] for o in check["observed"]} == {f"{router_public_ip('hA')}:{PORT}"}
            assert len(check["relays"]) >= 1
            assert f"forward TCP port {PORT}" in check["advice"]
            public = json.loads(relay.cli("netcheck", "--json", check=True).stdout)
            assert public["reachability"] == "public" and public["relay_service"] is True
        except AssertionError:
            explain(lab)
            raise


def test_symmetric_nats_stay_on_the_relay_and_training_includes_them(tmp_path: Path) -> None:
    with netlab(tmp_path, "A:cone C:symmetric D:symmetric") as lab:
        try:
            # Short reservations: they must be renewed (at half their life) to stay.
            relay, pub, (ha, hc, hd) = start(
                lab, ["hA", "hC", "hD"], "--relay-reservation-ttl-s", "3"
            )
            for node in (ha, hc, hd):
                wait_until(lambda n=node: n.status()["reachability"] == "private", 30, "private")
            # cone + symmetric and symmetric + symmetric: connected through a relay.
            for me, other in ((ha, hc), (hc, ha), (hc, hd), (hd, hc), (ha, hd)):
                wait_until(
                    lambda me=me, other=other: peer_entry(me, other)["connection"] == "relayed",
                    60,
                    f"{me.home.name} -> {other.home.name} relayed",
                )
                remote = peer_entry(me, other)["remote_addrs"]
                assert remote and all("/p2p-circuit" in a for a in remote)
            # A bulk transfer completes over the relay: rounds with all three members, and
            # the relays carried the bytes.
            trio_ids = {ha.peer_id, hc.peer_id, hd.peer_id}
            before = relayed_bytes([relay, pub])
            wait_until(lambda: rounds_with(hc, trio_ids) >= 2, 120, "rounds with all three")
            assert relayed_bytes([relay, pub]) > before
            assert peer_entry(hc, hd)["bulk"] == "libp2p"
            # Every private node still holds its slots, renewed several times over.
            natted = sorted(d.peer_id for d in (ha, hc, hd))
            for node in (relay, pub):
                wait_until(
                    lambda n=node: n.status()["nat"]["relay_renewals"] >= 2 * len(natted),
                    30,
                    "renewed reservations",
                )
                assert node.status()["nat"]["relay_reserved"] == natted
            # Punching was tried and failed, as it must behind symmetric NATs.
            stats = hd.status()["nat"]["holepunch"]
            assert stats["succeeded"] == 0

            check = json.loads(hc.cli("netcheck", "--json", check=True).stdout)
            assert check["mapping_varies_by_destination"] is True
            assert "symmetric" in check["advice"]
            text = hc.cli("netcheck", check=True).stdout
            assert "reachability  private" in text and "forward TCP port" in text
        except AssertionError:
            explain(lab)
            raise


def test_upnp_port_mapping_makes_the_node_behind_the_router_public(tmp_path: Path) -> None:
    """miniupnpd refuses to map while its external address is reserved (the lab's 203.0.113/24),
    so the router runs tests/fake_igd.py: the same UPnP IGD calls, and a real DNAT rule."""
    with netlab(tmp_path, "A:cone") as lab:
        try:
            igd = [sys.executable, str(REPO / "tests" / "fake_igd.py"), "10.0.1.1"]
            lab.start_process("rA", *igd, router_public_ip("hA"), "wan", ready="igd ready")
            relay, _pub, (ha,) = start(lab, ["hA"])
            mapped = f"{router_public_ip('hA')}:{PORT}"
            wait_until(
                lambda: ha.status()["nat"]["port_mapping"].get("external") == mapped,
                30,
                "the UPnP mapping of hA's listen port",
            )
            wait_until(lambda: ha.status()["reachability"] == "public", 30, "hA public")
            check = json.loads(ha.cli("netcheck", "--json", check=True).stdout)
            assert check["port_mapping"]["ok"] and check["port_mapping"]["method"] == "upnp"
            assert all(d["ok"] for d in check["dialbacks"]) and len(check["dialbacks"]) >= 2
            assert "port mapping" in check["advice"]
            # Members learn the mapped address from hA's presence record.
            want = f"/ip4/{router_public_ip('hA')}/tcp/{PORT}"
            assert want in peer_entry(relay, ha)["addrs"]
            wait_until(  # public: no relay needed
                lambda: ha.status()["nat"]["reservations"] == [], 10, "hA to drop its relays"
            )
        except AssertionError:
            explain(lab)
            raise


def test_killing_the_relay_in_use_moves_the_pair_to_the_other_relay(tmp_path: Path) -> None:
    with netlab(tmp_path, "C:symmetric D:symmetric") as lab:
        try:
            relay, pub, (hc, hd) = start(lab, ["hC", "hD"])
            pair_ids = {hc.peer_id, hd.peer_id}
            wait_until(lambda: rounds_with(hc, pair_ids) >= 1, 90, "a round over a relay")
            carrier = next(
                n for n in (relay, pub) if sorted(pair_ids) in n.status()["nat"]["circuits"]
            )
            survivor = pub if carrier is relay else relay
            carrier.kill()  # SIGKILL: the circuit and everything it carried are gone at once
            done = rounds_with(hc, pair_ids)
            wait_until(
                lambda: sorted(pair_ids) in survivor.status()["nat"]["circuits"],
                60,
                "the pair's circuit through the surviving relay",
            )
            wait_until(lambda: rounds_with(hc, pair_ids) >= done + 2, 90, "rounds again")
            assert peer_entry(hc, hd)["connection"] == "relayed"
            assert all(survivor.peer_id in a for a in peer_entry(hc, hd)["remote_addrs"])
        except AssertionError:
            explain(lab)
            raise
