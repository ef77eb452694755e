"""All-reduce bus bandwidth: shoal against torch.distributed gloo, plus the paths under it.

Run from the repository root:  python tests/bench/bench_allreduce.py [--sizes-mib 16,64,256]

In one run, on loopback:
  shoal     4 processes, each an in-process node (``node.api.Communicator``: libp2p control,
            bulk channels, the ring all-reduce), ``all_reduce`` of one fp32 tensor per size
  gloo      4 processes, ``torch.distributed`` gloo ``all_reduce`` of the same tensors
  bulk      the bulk channel's one-pair throughput beside raw TCP (``bench_bulk.run_mode``)
  libp2p    one libp2p stream (TCP + Noise + Yamux) between two processes
  recovery  4 ``shoal start`` daemons running check rounds; one is SIGKILLed mid-transfer;
            time from the kill to the survivors' completion of the retried round, minus the
            detection timeout (none when the loss is seen as a reset connection)

Both all-reduces are timed the same way: the parent releases all ranks at once, each times
its own call, a rep counts its slowest rank; per size the best of ``--reps`` is reported (and
the median). Bus bandwidth = 2(n-1)/n x bytes / time (nccl-tests' definition), MB = 10**6 B.
Each rank's CPU time per call (all its threads) is reported too: on a shared machine it varies
less with other load than wall-clock time. ``aead_cpu_s_per_rank`` is what sealing and opening
one rank's ring traffic at the largest size costs here (one thread, the bulk channel's cipher),
and ``ratio_cap_cpu_bound`` = gloo's CPU / (gloo's CPU + that): the best ratio a host with fewer
cores than ranks allows an all-reduce that encrypts. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "bench"))

from bench_bulk import run_mode  # noqa: E402  (the bulk channel vs raw TCP, one pair)

from net.bulk_frames import CIPHER_AES_GCM, FrameCipher  # noqa: E402

MiB = 1 << 20
WORLD = 4
# Quick joins; liveness at the defaults (record_ttl_s 20 s): this measures throughput, and
# the other jobs on a shared machine can starve a rank for seconds.
FAST = {
    "listen": ["/ip4/127.0.0.1/tcp/0"],
    "heartbeat_s": "0.5",
    "allreduce_join_wait_s": "1",
    "log_level": os.environ.get("BENCH_LOG_LEVEL", "warning"),
}


def busbw_mbps(nbytes: int, seconds: float, n: int = WORLD) -> float:
    return 2 * (n - 1) / n * nbytes / seconds / 1e6


def aead_cpu_s(nbytes: int, n: int = WORLD, chunk: int = MiB) -> float:
    """CPU-s one rank spends sealing and opening its ring traffic for an ``nbytes`` buffer
    (2(n-1)/n x nbytes each way) with the bulk channel's cipher, here, in one thread."""
    moved = 2 * (n - 1) * nbytes // n
    sealer, opener = (FrameCipher(CIPHER_AES_GCM, bytes(32)) for _ in range(2))
    plain, sealed = bytearray(chunk), bytearray(chunk + 16)
    header = memoryview(bytes(45))
    t0 = time.process_time()
    for _ in range(moved // chunk):
        sealer.seal_into(header, memoryview(plain), memoryview(sealed))
        opener.open_into(header, memoryview(sealed), memoryview(plain))
    return time.process_time() - t0


def _tensor(rank: int, mib: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1000 * rank + mib)
    return torch.randn(mib * MiB // 4, generator=gen, dtype=torch.float32)


# --- the two all-reduces, driven alike ------------------------------------------------------


def _timed_reps(conn: Connection, reduce_once: Any, sizes: list[int], reps: int) -> None:
    """Per size: one warm-up, then ``reps`` calls, each released by the parent ("go")."""
    for mib in sizes:
        for rep in range(reps + 1):
            x = _tensor(int(conn.recv()), mib)  # the parent's "go" carries this rank's id
            t0, cpu0 = time.perf_counter(), time.process_time()
            info = reduce_once(x)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            conn.send({"mib": mib, "rep": rep, "s": seconds, "cpu_s": cpu, "info": info})


def shoal_rank(rank: int, conn: Connection, p: dict[str, Any]) -> None:
    import logging

    from node.api import Communicator

    logging.basicConfig(
        level=FAST["log_level"].upper(), format=f"%(asctime)s r{rank} %(levelname)s %(message)s"
    )
    join = {} if rank == 0 else {"join": [p["join"]]}
    comm = Communicator(Path(p["home"]) / f"r{rank}", **FAST, **join)
    comm.connect()
    conn.send(comm.status()["addrs"][0] if rank == 0 else "up")
    # rounds of a small tensor until one completes with every rank (joiners are admitted
    # between rounds)
    while True:
        conn.recv()
        info = comm.all_reduce({"x": _tensor(rank, 1)})
        conn.send(len(info.members) if info.completed else 0)
        if conn.recv() == "warm":
            break

    def reduce_once(x: Any) -> Any:
        info = comm.all_reduce({"x": x})
        out = {"members": len(info.members) if info.completed else 0, "aborts": info.aborts}
        if info.aborts or not info.completed:
            last = comm.status()["allreduce"]["last"]
            out["why"] = [*last.get("abort_reasons", []), info.reason]
        return out

    _timed_reps(conn, reduce_once, p["sizes"], p["reps"])
    conn.send(comm.status()["allreduce"]["bytes_sent"])
    comm.close()


def gloo_rank(rank: int, conn: Connection, p: dict[str, Any]) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{p['port']}", rank=rank, world_size=WORLD
    )

    def reduce_once(x: Any) -> Any:
        dist.all_reduce(x)
        return {"members": WORLD, "aborts": 0}

    _timed_reps(conn, reduce_once, p["sizes"], p["reps"])
    conn.send(0)
    dist.destroy_process_group()


def run_world(target: Any, p: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Start WORLD ranks of ``target``, release them together per rep; per size: timings."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(WORLD)]
    procs = [
        ctx.Process(target=target, args=(r, pipes[r][1], p), daemon=True) for r in range(WORLD)
    ]
    parents = [pipe[0] for pipe in pipes]
    try:
        procs[0].start()
        if target is shoal_rank:
            p["join"] = parents[0].recv()
            for proc in procs[1:]:
                proc.start()
            for conn in parents[1:]:
                conn.recv()
            for _ in range(60):
                for conn in parents:
                    conn.send("go")
                full = all(conn.recv() == WORLD for conn in parents)
                for conn in parents:
                    conn.send("warm" if full else "again")
                if full:
                    break
            else:
                raise RuntimeError("shoal: no round with all four ranks in 60 tries")
        else:
            for proc in procs[1:]:
                proc.start()
        out: dict[int, dict[str, float]] = {}
        for mib in p["sizes"]:
            times, cpus = [], []
            for rep in range(p["reps"] + 1):
                for rank, conn in enumerate(parents):
                    conn.send(rank)
                results = [conn.recv() for conn in parents]
                bad = [r["info"] for r in results if r["info"]["members"] != WORLD]
                if bad:
                    raise RuntimeError(f"{target.__name__} {mib} MiB rep {rep}: {bad}")
                if rep > 0:  # rep 0 warms up (buffers, connections)
                    times.append(max(r["s"] for r in results))
                    cpus.append(statistics.mean(r["cpu_s"] for r in results))
                aborts = sum(r["info"]["aborts"] for r in results)
                if aborts:
                    print(f"  {target.__name__} {mib} MiB rep {rep}: {aborts} aborts", flush=True)
            nbytes = mib * MiB
            out[mib] = {
                "best_s": min(times),
                "median_s": statistics.median(times),
                "busbw_mbps": busbw_mbps(nbytes, min(times)),
                "busbw_median_mbps": busbw_mbps(nbytes, statistics.median(times)),
                # CPU seconds one rank spends on one call (all its threads): the machine is
                # shared, so this varies less with other load than the wall-clock time
                "cpu_s_per_rank": statistics.median(cpus),
            }
            print(
                f"{target.__name__:10s} {mib:4d} MiB  best {min(times):6.3f} s"
                f"  busbw {out[mib]['busbw_mbps']:6.0f} MB/s"
                f"  (median {out[mib]['busbw_median_mbps']:6.0f} MB/s)"
                f"  cpu/rank {out[mib]['cpu_s_per_rank']:.3f} s",
                flush=True,
            )
        for conn in parents:
            conn.recv()
        return out
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


# --- one libp2p stream ----------------------------------------------------------------------

STREAM_PROTOCOL = "/shoal/bench/stream/1.0.0"


def libp2p_receiver(conn: Connection, p: dict[str, Any]) -> None:
    import multiaddr
    import trio

    from net.host import announce_addrs, build_host

    async def main() -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        done = trio.Event()

        async def serve(stream: Any) -> None:
            got = 0
            while got < p["bytes"]:
                data = await stream.read(1 << 20)
                if not data:
                    break
                got += len(data)
            await stream.write(got.to_bytes(8, "big"))
            done.set()

        host.set_stream_handler(STREAM_PROTOCOL, serve)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            conn.send(f"{announce_addrs(host)[0]}/p2p/{host.get_id()}")
            await done.wait()
            await trio.to_thread.run_sync(conn.recv)  # the sender has read the ack

    trio.run(main)


def libp2p_sender(conn: Connection, p: dict[str, Any]) -> None:
    import multiaddr
    import trio
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from net.host import build_host

    async def main() -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        payload = memoryview(os.urandom(1 << 20))
        addr = await trio.to_thread.run_sync(conn.recv)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [STREAM_PROTOCOL])
            t0 = time.perf_counter()
            for _ in range(p["bytes"] // len(payload)):
                await stream.write(bytes(payload))
            ack = await stream.read(8)
            seconds = time.perf_counter() - t0
            conn.send({"s": seconds, "got": int.from_bytes(ack, "big")})

    trio.run(main)


def run_libp2p(nbytes: int) -> float:
    ctx = mp.get_context("spawn")
    r_parent, r_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    p = {"bytes": nbytes}
    receiver = ctx.Process(target=libp2p_receiver, args=(r_child, p), daemon=True)
    sender = ctx.Process(target=libp2p_sender, args=(s_child, p), daemon=True)
    receiver.start()
    sender.start()
    try:
        s_parent.send(r_parent.recv())
        result = s_parent.recv()
        r_parent.send("bye")
    finally:
        for proc in (sender, receiver):
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if result["got"] != nbytes:
        raise RuntimeError(f"libp2p stream: {result['got']} of {nbytes} bytes arrived")
    mbps: float = nbytes / result["s"] / 1e6
    print(f"libp2p stream  {nbytes // MiB} MiB  {mbps:6.0f} MB/s", flush=True)
    return mbps


# --- recovery after a SIGKILL -----------------------------------------------------------------


def run_recovery(tmp: Path) -> dict[str, Any]:
    """4 daemons with the check workload (8 MiB per member); SIGKILL one mid-transfer."""
    from tests.daemons import swarm_of, wait_until
    from tests.integration.test_allreduce import (
        CHECK,
        completed,
        kill_mid_transfer,
        start_group,
    )

    with swarm_of(tmp) as spawn:
        nodes = start_group(spawn, WORLD)
        victim = sorted(nodes, key=lambda d: d.peer_id)[2]  # not the coordinator
        survivors = [d for d in nodes if d is not victim]
        kill = victim.kill
        stamps: list[float] = []

        def timed_kill() -> None:  # the moment the SIGKILL goes out
            stamps.append(time.time())
            kill()

        victim.kill = timed_kill  # type: ignore[method-assign]
        interrupted = kill_mid_transfer(victim)
        killed_at = stamps[0]
        wait_until(
            lambda: all(interrupted in completed(d) for d in survivors),
            60,
            f"every survivor to complete round {interrupted}",
            poll_s=0.05,
        )
        entries = [completed(d)[interrupted] for d in survivors]
        done_at = max(e["ended_at"] for e in entries)
        reasons = sorted({r for e in entries for r in e["abort_reasons"]})
        if not reasons:  # the victim had finished the round: no recovery to time
            raise RuntimeError(f"round {interrupted} completed without an abort: the kill missed")
        # A loss seen as a reset bulk connection or control link is detected at once; only an
        # abort that came from a timeout waited for it.
        waited = [float(m) for r in reasons for m in re.findall(r"_timeout_s=([\d.]+)", r)]
        detection = max(waited, default=0.0)
        recovery = done_at - killed_at - detection
        print(
            f"recovery  round {interrupted}: {done_at - killed_at:.3f} s from SIGKILL to "
            f"completion, detection timeout {detection} s; aborts: {reasons}",
            flush=True,
        )
        return {
            "recovery_s": recovery,
            "kill_to_done_s": done_at - killed_at,
            "detection_timeout_s": detection,
            "abort_reasons": reasons,
            "check_args": CHECK,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mib", default="16,64,256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pair-mib", type=int, default=256, help="MiB per rep of the pair bench")
    ap.add_argument("--libp2p-mib", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma list of parts to skip (for profiling)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    skip = set(args.skip.split(","))
    print(f"{WORLD} ranks, sizes {sizes} MiB, {args.reps} reps, {os.cpu_count()} CPUs", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-ar-"))
    summary: dict[str, Any] = {"world": WORLD, "sizes_mib": sizes}
    try:
        if "shoal" not in skip:
            shoal = run_world(shoal_rank, {"home": str(tmp), "sizes": sizes, "reps": args.reps})
            summary["shoal"] = shoal
        if "gloo" not in skip:
            gloo = run_world(gloo_rank, {"port": free_port(), "sizes": sizes, "reps": args.reps})
            summary["gloo"] = gloo
        if "shoal" not in skip and "gloo" not in skip:
            top = max(sizes)
            summary["shoal_busbw_mbps"] = round(shoal[top]["busbw_mbps"])
            summary["gloo_busbw_mbps"] = round(gloo[top]["busbw_mbps"])
            summary["ratio_vs_gloo"] = round(shoal[top]["busbw_mbps"] / gloo[top]["busbw_mbps"], 3)
            summary["ratio_by_size"] = {
                m: round(shoal[m]["busbw_mbps"] / gloo[m]["busbw_mbps"], 3) for m in sizes
            }
            # On a host with fewer cores than ranks both all-reduces are CPU-bound, so shoal
            # is at best as fast as gloo's CPU plus the AEAD that gloo does not do.
            aead = aead_cpu_s(top * MiB)
            gloo_cpu = gloo[top]["cpu_s_per_rank"]
            summary["aead_cpu_s_per_rank"] = round(aead, 3)
            summary["ratio_cap_cpu_bound"] = round(gloo_cpu / (gloo_cpu + aead), 3)
            print(
                f"AES-GCM of one rank's traffic at {top} MiB: {aead:.3f} CPU-s; gloo's whole "
                f"call {gloo_cpu:.3f} CPU-s per rank",
                flush=True,
            )
        if "pair" not in skip:
            base = {
                "transfer_bytes": args.pair_mib * MiB // 4,
                "transfers": 4,
                "reps": 3,
                "chunk_bytes": MiB,
                "profile_dir": "",
                "socket_buffer_bytes": 0,
            }
            raw = run_mode("raw", base)
            bulk = {
                c: run_mode("bulk", {**base, "cipher": CIPHER_AES_GCM, "connections": c})
                for c in (2, 4)
            }
            for label, res in [("raw_tcp", raw), *((f"bulk_aes_c{c}", r) for c, r in bulk.items())]:
                print(f"{label:14s} {args.pair_mib} MiB  {res['mbps_best']:6.0f} MB/s", flush=True)
            summary["raw_tcp_mbps"] = round(raw["mbps_best"])
            summary["bulk_mbps"] = round(max(r["mbps_best"] for r in bulk.values()))
            summary["bulk_by_connections"] = {c: round(r["mbps_best"]) for c, r in bulk.items()}
        if "libp2p" not in skip:
            summary["libp2p_stream_mbps"] = round(run_libp2p(args.libp2p_mib * MiB))
        if "recovery" not in skip:
            rec = run_recovery(tmp / "recovery")
            summary["recovery_s"] = round(rec.pop("recovery_s"), 3)
            summary["recovery"] = {k: v for k, v in rec.items() if k != "check_args"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for part in ("shoal", "gloo"):
        if part in summary:
            summary[part] = {
                str(m): {k: round(v, 3) for k, v in r.items()} for m, r in summary[part].items()
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
