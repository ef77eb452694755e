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

from tests.daemons import Daemon, wait_until
from tests.netlab import PORT, NetLab, gateway_unavailable, netlab, router_public_ip

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


def start(
    lab: NetLab, natted: list[str], *public_args: str, **host_config: str
) -> tuple[Daemon, Daemon, list[Daemon]]:
    relay = lab.spawn("relay", *public_args).wait_ready()
    pub = lab.spawn("pub", *public_args, join=relay)
    flags = [x for k, v in host_config.items() for x in (f"--{k.replace('_', '-')}", v)]
    hosts = [lab.spawn(ns, *CHECK, *flags, join=relay) for ns in natted]
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
        elif daemon.proc is not None:
            print("exited with", daemon.proc.returncode, "; its last lines:")
            print("\n".join(daemon.lines[-40:]))
        wanted = ("shoal.net", "ERROR", "allreduce", "cannot")
        lines = [x for x in daemon.lines if any(w in x for w in wanted) and "skipped" not in x]
        print("\n".join(lines)[-6000:])
        print("----- its last lines, unfiltered:")
        print("\n".join(daemon.lines[-25:])[-4000:])


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


def test_hole_punch_waits_to_learn_the_public_address_it_must_advertise(tmp_path: Path) -> None:
    """The flake of the cone test, made to happen: hA cannot reach the members' probe servers
    (its router drops them), so when the relayed connection to hB comes up hA does not know
    its public address. DCUtR must wait for it (holepunch_addrs_wait_s) instead of sending an
    empty CONNECT, which left hB nothing to dial and the pair on the relay for good."""
    probe = ["--nat-probe-port", "4100"]
    block = ["FORWARD", "-i", "lan", "-p", "tcp", "--dport", "4100", "-j", "DROP"]
    quick = {"nat_probe_interval_s": "1", "holepunch_addrs_wait_s": "4"}
    with netlab(tmp_path, "A:cone B:cone") as lab:
        try:
            assert lab.sh("rA", "iptables", "-I", *block).returncode == 0
            _relay, _pub, (ha, hb) = start(lab, ["hA", "hB"], *probe, **quick)
            wait_until(
                lambda: peer_entry(ha, hb)["connection"] == "relayed", 60, "hA -> hB relayed"
            )
            assert ha.status()["nat"]["observed"] == []  # hA does not know its address yet
            assert lab.sh("rA", "iptables", "-D", *block).returncode == 0
            want = f"/ip4/{router_public_ip('hB')}/tcp/{PORT}"
            wait_until(
                lambda: (
                    peer_entry(ha, hb)["connection"] == "direct"
                    and all(a.startswith(want) for a in peer_entry(ha, hb)["remote_addrs"])
                ),
                30,
                "hA -> hB direct once hA learned its address",
            )
            assert any("waited" in line and "public address" in line for line in ha.lines)
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
                # A relay that refused a node while it did not yet know it was public is asked
                # again after relay_retry_s: wait for every slot, then for renewals on top.
                wait_until(
                    lambda n=node: n.status()["nat"]["relay_reserved"] == natted,
                    30,
                    f"a slot on {node.home.name} for every private node",
                )
                renewals = node.status()["nat"]["relay_renewals"]
                wait_until(
                    lambda n=node, r=renewals: (
                        n.status()["nat"]["relay_renewals"] >= r + 2 * len(natted)
                    ),
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


def mapped_and_public(lab: NetLab, relay: Daemon, ha: Daemon, method: str) -> dict[str, Any]:
    """hA's listen port mapped by ``method`` makes it public: members dialed it back at the
    router's address, it announced that address, and it needs no relay."""
    mapped = f"{router_public_ip('hA')}:{PORT}"
    wait_until(
        lambda: ha.status()["nat"]["port_mapping"].get("external") == mapped,
        60,
        f"the {method} mapping of hA's listen port",
    )
    wait_until(lambda: ha.status()["reachability"] == "public", 30, "hA public")
    check = json.loads(ha.cli("netcheck", "--json", check=True).stdout)
    assert check["port_mapping"]["ok"] and check["port_mapping"]["method"] == method
    assert check["port_mapping"]["internal"] == f"10.0.1.2:{PORT}"
    # Fresh connections from two members to the router's public address reached hA.
    assert all(d["ok"] for d in check["dialbacks"]) and len(check["dialbacks"]) >= 2
    assert "port mapping" in check["advice"]
    text = ha.cli("netcheck", check=True).stdout
    assert f"port mapping  {method}: mapped {mapped} -> 10.0.1.2:{PORT}" in text
    # Members learn the mapped address from hA's presence record.
    want = f"/ip4/{router_public_ip('hA')}/tcp/{PORT}"
    wait_until(lambda: want in peer_entry(relay, ha)["addrs"], 30, "the mapped address announced")
    wait_until(  # public: no relay needed
        lambda: ha.status()["nat"]["reservations"] == [], 30, "hA to drop its relays"
    )
    return check


def test_upnp_port_mapping_on_real_miniupnpd_makes_the_node_public(tmp_path: Path) -> None:
    """The router runs Debian's miniupnpd (UPnP IGD only); hA maps its port through
    miniupnpc. First the port is taken by another mapping (the gateway's conflict must be
    reported, not papered over), then it is freed and hA's next try maps it."""
    if (reason := gateway_unavailable()) is not None:
        pytest.skip(reason)
    with netlab(tmp_path, "A:cone") as lab:
        try:
            lab.start_gateway("rA", "upnp")
            taken = lab.sh("hA", sys.executable, "-c", UPNPC.format(op="add"))
            assert taken.returncode == 0, taken.stderr
            relay, _pub, (ha,) = start(lab, ["hA"])
            wait_until(
                lambda: (
                    "already mapped to 10.0.1.2:4002"
                    in ha.status()["nat"]["port_mapping"]["reason"]
                ),
                60,
                "the conflicting mapping reported",
            )
            failed = ha.status()["nat"]["port_mapping"]
            assert not failed["ok"] and failed["method"] == "upnp,natpmp"
            assert "natpmp: gateway 10.0.1.1 does not speak NAT-PMP" in failed["reason"]
            freed = lab.sh("hA", sys.executable, "-c", UPNPC.format(op="delete"))
            assert freed.returncode == 0, freed.stderr
            mapped_and_public(lab, relay, ha, "upnp")
        except AssertionError:
            explain(lab)
            raise


# Another mapping of hA's listen port (to port 4002), made and removed with miniupnpc.
UPNPC = """
import miniupnpc
u = miniupnpc.UPnP()
u.discoverdelay = 1000
assert u.discover() > 0, "no IGD"
u.selectigd()
if "{op}" == "add":
    u.addportmapping(4001, "TCP", u.lanaddr, 4002, "someone else", "", 3600)
else:
    u.deleteportmapping(4001, "TCP")
"""


def test_natpmp_port_mapping_on_real_miniupnpd_renews_and_survives_a_gateway_restart(
    tmp_path: Path,
) -> None:
    """The router's miniupnpd speaks NAT-PMP only (enable_upnp=no), so only the NAT-PMP
    client can map: the mapping makes hA public, is renewed at half its 4 s lifetime, and
    after the gateway restarts (its epoch goes back) hA notices and maps again."""
    if (reason := gateway_unavailable()) is not None:
        pytest.skip(reason)
    with netlab(tmp_path, "A:cone") as lab:
        try:
            gateway = lab.start_gateway("rA", "natpmp")
            relay, _pub, (ha,) = start(lab, ["hA"], port_mapping_lease_s="4")
            check = mapped_and_public(lab, relay, ha, "natpmp")
            assert check["port_mapping"]["lease_s"] == 4
            assert "upnp" not in json.dumps(check["port_mapping"])
            wait_until(
                lambda: ha.status()["nat"]["port_mapping"].get("renewals", 0) >= 2,
                20,
                "two renewals at half-life",
            )
            gateway.kill()
            lab.start_gateway("rA", "natpmp")
            wait_until(
                lambda: ha.status()["nat"]["port_mapping"].get("gateway_restarts", 0) >= 1,
                30,
                "hA to see the gateway's epoch go back",
            )
            mapping = ha.status()["nat"]["port_mapping"]
            assert mapping["ok"] and mapping["external"] == f"{router_public_ip('hA')}:{PORT}"
            wait_until(lambda: ha.status()["reachability"] == "public", 30, "hA still public")
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
