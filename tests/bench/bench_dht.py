"""DHT and membership at scale: N real `shoal start` processes on loopback.

Measures, in one run: time from `shoal start` to "ready" and to a full member view, DHT put/get
success and latency (timed inside the daemon, so the control socket is not counted) both for
the node's lookup (one hop to the members closest to the key, ``protocols.dht_direct``) and for
py-libp2p's Kademlia walk alone, idle CPU and RSS per node. The reference is hivemind's
published DHT benchmark (1024 peers on one machine: 100% success, mean get 6.6 ms, mean
store 14.9 ms); hivemind itself cannot be installed here (its p2pd binary is fetched at
install time), so its figures are quoted.

    python tests/bench/bench_dht.py            # 30 nodes
    BENCH_NODES=40 python tests/bench/bench_dht.py

Last stdout line: one JSON object.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.daemons import Daemon, wait_until

NODES = int(os.environ.get("BENCH_NODES", "30"))
GETS = int(os.environ.get("BENCH_GETS", "300"))
IDLE_WINDOW_S = float(os.environ.get("BENCH_IDLE_S", "20"))
HIVEMIND = {"peers": 1024, "get_success": 1.0, "get_ms_mean": 6.6, "store_ms_mean": 14.9}
ARGS = ["--listen", "/ip4/127.0.0.1/tcp/0", "--dht-republish-s", "3600"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-dht-"))
    nodes: list[Daemon] = []
    ready_s: list[float] = []
    view_s: list[float] = []
    try:
        for i in range(NODES):
            join = ["--join", rng.choice(nodes).join_addr] if nodes else []
            node = Daemon(tmp / f"n{i}", [*ARGS, *join])
            started = time.monotonic()
            node.start().wait_ready(120)
            ready_s.append(time.monotonic() - started)
            nodes.append(node)
            want = len(nodes)
            wait_until(lambda n=node, w=want: n.status()["swarm_size"] == w, 120, f"view of {want}")
            view_s.append(time.monotonic() - started)
            print(
                f"node {i:2d}: ready {ready_s[-1]:.2f} s, full view {view_s[-1]:.2f} s", flush=True
            )

        wait_until(lambda: all(n.status()["swarm_size"] == NODES for n in nodes), 120, "all views")
        print(f"all {NODES} nodes see {NODES} members", flush=True)

        puts = [n.control("dht_put", timeout_s=60) for n in nodes]
        put_ms = [p["elapsed_ms"] for p in puts]
        kad_put_ms = [p["kademlia_elapsed_ms"] for p in puts]
        get_ms: list[float] = []
        kad_get_ms: list[float] = []
        paths: dict[str, int] = {}
        ok = kad_ok = 0
        for _ in range(GETS):
            reader, target = rng.sample(nodes, 2)
            for via, times in (("any", get_ms), ("kademlia", kad_get_ms)):
                answer = reader.control("dht_get", timeout_s=60, peer_id=target.peer_id, via=via)
                times.append(answer["elapsed_ms"])
                record = answer["record"]
                found = bool(record and record["peer_id"] == target.peer_id)
                if via == "any":
                    ok += found
                    paths[answer["path"]] = paths.get(answer["path"], 0) + 1
                else:
                    kad_ok += found

        time.sleep(5)  # let the put/get traffic drain before the idle window
        before = {n.proc.pid: cpu_seconds(n.proc.pid) for n in nodes if n.proc}
        t0 = time.monotonic()
        time.sleep(IDLE_WINDOW_S)
        elapsed = time.monotonic() - t0
        idle = [(cpu_seconds(pid) - c) / elapsed * 100 for pid, c in before.items()]
        rss = [rss_mb(pid) for pid in before]
        sizes = {n.status()["swarm_size"] for n in nodes}
    finally:
        for node in nodes:
            node.kill()

    result = {
        "nodes": NODES,
        "get_success": ok / GETS,
        "get_ms_median": round(statistics.median(get_ms), 2),
        "get_ms_p95": round(percentile(get_ms, 0.95), 2),
        "get_ms_mean": round(statistics.fmean(get_ms), 2),
        "get_paths": paths,
        "put_ms_median": round(statistics.median(put_ms), 2),
        "put_ms_p95": round(percentile(put_ms, 0.95), 2),
        "put_ms_mean": round(statistics.fmean(put_ms), 2),
        "kademlia_get_success": kad_ok / GETS,
        "kademlia_get_ms_median": round(statistics.median(kad_get_ms), 2),
        "kademlia_get_ms_mean": round(statistics.fmean(kad_get_ms), 2),
        "kademlia_put_ms_median": round(statistics.median(kad_put_ms), 2),
        "ready_s_median": round(statistics.median(ready_s), 2),
        "join_s_median": round(statistics.median(view_s), 2),
        "join_s_p95": round(percentile(view_s, 0.95), 2),
        "idle_cpu_pct": round(statistics.fmean(idle), 3),
        "idle_cpu_pct_max": round(max(idle), 3),
        "rss_mb": round(statistics.fmean(rss), 1),
        "views_after_idle": sorted(sizes),
        "reference_hivemind": HIVEMIND,
    }
    print()
    print(f"{'':24}{'shoal':>12}{'hivemind (published)':>24}")
    print(f"{'peers':24}{NODES:>12}{HIVEMIND['peers']:>24}")
    print(f"{'get success':24}{result['get_success']:>12.3f}{HIVEMIND['get_success']:>24.3f}")
    print(f"{'get ms mean':24}{result['get_ms_mean']:>12}{HIVEMIND['get_ms_mean']:>24}")
    print(f"{'get ms median / p95':24}{result['get_ms_median']:>6} / {result['get_ms_p95']:<6}")
    print(f"{'put ms mean':24}{result['put_ms_mean']:>12}{HIVEMIND['store_ms_mean']:>24}")
    print(
        f"{'kademlia walk get/put ms':24}{result['kademlia_get_ms_mean']:>6} / "
        f"{result['kademlia_put_ms_median']:<6} (py-libp2p iterative lookup, same run)"
    )
    print(
        f"{'ready s / full view s':24}{result['ready_s_median']:>6} / {result['join_s_median']:<6}"
    )
    print(f"{'idle cpu % / rss MB':24}{result['idle_cpu_pct']:>6} / {result['rss_mb']:<6}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
