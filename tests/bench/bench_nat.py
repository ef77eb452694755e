"""NAT traversal in the lab (deploy/netlab): hole punching rate, time to direct, bulk paths.

Run from the repository root as root:  python tests/bench/bench_nat.py [--trials 20]

One lab: relay + pub (public), rA, rB cone NATs, rC symmetric. A relay and a second public
node stay up; each trial starts two fresh `shoal start` processes behind two routers (fresh
homes, a fresh listen port per trial so no router keeps conntrack state of an earlier trial):

  cone_cone       hA + hB: does the pair end direct (hole punch), and how long from the first
                  relayed contact (the relayed connection up, from the daemons' logs) to the
                  direct connection (the upgrade done)?
  cone_symmetric  hA + hC: are they connected (relayed; control messages flow: an RTT measured
                  both ways) even though punching cannot work?

Then bulk throughput: two nodes run all-reduce check rounds of 16 MiB per member, once over a
hole-punched direct connection (hA + hB) and once through the relay (hA + hC); MB/s is the
bytes one member sent over the time inside those rounds (transfer plus the rounds' own
reduction and hashing work, so a lower bound on the path's speed).

Reference (arXiv 2510.27500, 4.4M attempts on the internet): DCUtR succeeds 70% +- 7%; in the
lab, where the NATs allow it, the target is 100%. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.daemons import Daemon, wait_until
from tests.netlab import NetLab, lab_unavailable

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
BULK_ELEMS = 1 << 22  # 16 MiB of float32 per member per round


def log_time(daemon: Daemon, needle: str) -> float | None:
    for line in daemon.lines:
        if needle in line:
            match = STAMP.match(line)
            if match:
                when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                return when.timestamp()
    return None


def connection(a: Daemon, b: Daemon) -> str:
    for peer in a.status()["peers"]:
        if peer["peer_id"] == b.peer_id:
            return str(peer["connection"])
    return "none"


def rtt_known(a: Daemon, b: Daemon) -> bool:
    return any(p["peer_id"] == b.peer_id and p["rtt_ms"] is not None for p in a.status()["peers"])


def pair(
    lab: NetLab, relay: Daemon, ns: tuple[str, str], tag: str, port: int, *extra: str
) -> list[Daemon]:
    nodes = [lab.spawn(n, *extra, join=relay, port=port, home=f"{tag}-{n}") for n in ns]
    for node in nodes:
        node.wait_ready()
    return nodes


def stop(nodes: list[Daemon]) -> None:
    for node in nodes:
        node.kill()


def trial_cone_cone(lab: NetLab, relay: Daemon, i: int) -> tuple[bool, float | None]:
    a, b = pair(lab, relay, ("hA", "hB"), f"cc{i}", 4100 + i)
    try:
        try:
            wait_until(lambda: connection(a, b) == "direct" == connection(b, a), 40, "direct")
        except AssertionError:
            return False, None

        # The log lines trail the status a little (the relayed connection is closed first).
        def stamps(needle: str) -> list[float]:
            return [t for t in (log_time(d, needle) for d in (a, b)) if t is not None]

        try:
            wait_until(lambda: len(stamps("is direct now")) == 2, 10, "both upgrades logged")
        except AssertionError:
            return True, None
        relayed = stamps("relayed connection")
        return True, (max(stamps("is direct now")) - min(relayed)) if relayed else None
    finally:
        stop([a, b])


def trial_cone_symmetric(lab: NetLab, relay: Daemon, i: int) -> bool:
    a, c = pair(lab, relay, ("hA", "hC"), f"cs{i}", 4200 + i)
    try:
        wait_until(
            lambda: connection(a, c) != "none" and rtt_known(a, c) and rtt_known(c, a),
            40,
            "a connection with control traffic both ways",
        )
        return True
    except AssertionError:
        return False
    finally:
        stop([a, c])


def bulk_mbps(lab: NetLab, relay: Daemon, ns: tuple[str, str], want: str, port: int) -> float:
    check = ["--allreduce-workload", "check", "--allreduce-check-elems", str(BULK_ELEMS)]
    check += ["--allreduce-join-wait-s", "2", "--bulk-io-timeout-s", "60"]
    a, b = pair(lab, relay, ns, f"bulk-{want}", port, *check)
    try:
        wait_until(lambda: connection(a, b) == want, 60, f"a {want} connection")
        ids = {a.peer_id, b.peer_id}

        def done() -> int:
            history = a.status()["allreduce"]["history"]
            return sum(e["outcome"] == "completed" and set(e["members"]) == ids for e in history)

        try:
            wait_until(lambda: done() >= 1, 180, "a first round of the pair")
        except AssertionError:
            for node in (a, b):
                print("=====", node.home.name, node.status()["allreduce"])
                print("\n".join(x for x in node.lines if "shoal" in x)[-5000:])
            raise
        assert connection(a, b) == want
        start_rounds, start_bytes = done(), a.status()["allreduce"]["bytes_sent"]
        seen = {e["round"] for e in a.status()["allreduce"]["history"]}
        wait_until(lambda: done() >= start_rounds + 3, 300, "three more rounds", poll_s=0.05)
        status = a.status()["allreduce"]
        moved = status["bytes_sent"] - start_bytes
        new = [e for e in status["history"] if e["round"] not in seen]
        # Time inside the rounds (transfer plus the reduction's own work), not between them.
        in_rounds = sum(e.get("duration_s", 0.0) for e in new if e["outcome"] == "completed")
        return moved / in_rounds / 1e6 if in_rounds > 0 else 0.0
    finally:
        stop([a, b])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    reason = lab_unavailable()
    if reason is not None:
        print(json.dumps({"skipped": reason}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        lab = NetLab(Path(tmp), "A:cone B:cone C:symmetric")
        try:
            # Two public nodes alone have one dial-back each: let one answer decide for them,
            # so every trial starts with working relays.
            relay = lab.spawn("relay", "--reachability-min-answers", "1").wait_ready()
            pub = lab.spawn("pub", "--reachability-min-answers", "1", join=relay).wait_ready()
            wait_until(lambda: relay.status()["reachability"] == "public", 30, "relay public")
            wait_until(lambda: pub.status()["reachability"] == "public", 30, "pub public")
            cc = [trial_cone_cone(lab, relay, i) for i in range(args.trials)]
            for i, (ok, t) in enumerate(cc):
                print(f"cone+cone trial {i}: {'direct' if ok else 'NOT direct'} {t}", flush=True)
            cs = [trial_cone_symmetric(lab, relay, i) for i in range(args.trials)]
            print(f"cone+symmetric connected in {sum(cs)}/{len(cs)} trials", flush=True)
            direct_mbps = bulk_mbps(lab, relay, ("hA", "hB"), "direct", 4300)
            relayed_mbps = bulk_mbps(lab, relay, ("hA", "hC"), "relayed", 4301)
        finally:
            lab.close()
    times = [t for ok, t in cc if ok and t is not None]
    result = {
        "trials": args.trials,
        "cone_cone_direct_rate": sum(ok for ok, _ in cc) / len(cc),
        "cone_symmetric_connected_rate": sum(cs) / len(cs),
        "time_to_direct_s_median": round(statistics.median(times), 3) if times else None,
        "time_to_direct_s_max": round(max(times), 3) if times else None,
        "bulk_direct_mbps": round(direct_mbps, 1),
        "bulk_relayed_mbps": round(relayed_mbps, 1),
        "reference_dcutr_success_internet": 0.70,
        "target_lab_direct_rate": 1.0,
    }
    print(
        f"cone+cone direct: {result['cone_cone_direct_rate']:.0%} (internet reference 70%, "
        f"lab target 100%); median {result['time_to_direct_s_median']} s from relayed contact "
        f"to direct; bulk {result['bulk_direct_mbps']} MB/s direct vs "
        f"{result['bulk_relayed_mbps']} MB/s relayed"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
