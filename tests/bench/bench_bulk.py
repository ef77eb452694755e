"""Throughput of the bulk channel between two OS processes on loopback.

Run from the repository root:  python tests/bench/bench_bulk.py [--mib 256] [--reps 3]

Modes, each in a fresh pair of processes (a receiver that listens, a sender that dials):
  raw_tcp        one trio TCP connection, no framing, no crypto: the reference
  bulk_aes_cN    BulkChannel, AES-256-GCM, N direct connections (N = 1, 2, 4)
  bulk_chacha_c2 BulkChannel, ChaCha20-Poly1305, 2 connections (for comparison)

Each rep moves `--mib` MiB as `--transfers` transfers; the receiver has called receive(tag,
into=buffer) before the first frame arrives (frames decrypt straight into its buffer) and
acks each transfer; the sender times from its first send to the last ack. The last rep's bytes
are checked with SHA-256 on both sides. The offer and answer travel between the processes
over a multiprocessing pipe as msgpack (standing in for the libp2p control stream).
Prints MB/s (1 MB = 10**6 bytes) per mode and CPU seconds per process; the last stdout line
is one JSON object with `bulk_mbps` (best of the AES modes), `raw_tcp_mbps` and the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import msgpack
import trio

from net.bulk import (
    BulkListener,
    BulkOffer,
    BulkSettings,
    derive_session_keys,
    dial_direct_channel,
    make_answer,
)
from net.bulk_frames import CIPHER_AES_GCM, CIPHER_CHACHA20

MiB = 1 << 20
ACK_TAG = 1 << 40


def _send_msg(conn: Connection, msg: dict[str, Any]) -> None:
    conn.send_bytes(msgpack.packb(msg, use_bin_type=True))


async def _recv_msg(conn: Connection) -> dict[str, Any]:
    raw = await trio.to_thread.run_sync(conn.recv_bytes)
    msg: dict[str, Any] = msgpack.unpackb(raw, raw=False)
    return msg


# --- raw TCP reference --------------------------------------------------------------------


async def raw_receiver(conn: Connection, p: dict[str, Any]) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    _send_msg(conn, {"port": listeners[0].socket.getsockname()[1]})
    size = p["transfer_bytes"]
    buf = bytearray(size)
    stream = await listeners[0].accept()
    view = memoryview(buf)
    cpu0 = time.process_time()
    for _ in range(p["reps"] * p["transfers"]):
        got = 0
        while got < size:
            n = await stream.socket.recv_into(view[got:])
            if n == 0:
                raise RuntimeError("sender closed early")
            got += n
        await stream.send_all(b"k")
    cpu = time.process_time() - cpu0
    _send_msg(conn, {"sha256": hashlib.sha256(buf).digest(), "cpu_s": cpu})
    await stream.aclose()


async def raw_sender(conn: Connection, p: dict[str, Any]) -> None:
    payload = memoryview(os.urandom(p["transfer_bytes"]))
    port = (await _recv_msg(conn))["port"]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    times = []
    cpu0 = time.process_time()
    for _ in range(p["reps"]):
        t0 = time.perf_counter()
        for _ in range(p["transfers"]):
            for off in range(0, len(payload), MiB):
                await stream.send_all(payload[off : off + MiB])
            if await stream.receive_some(1) != b"k":
                raise RuntimeError("bad ack")
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    _send_msg(conn, {"times": times, "sha256": hashlib.sha256(payload).digest(), "cpu_s": cpu})
    await stream.aclose()


# --- bulk channel ---------------------------------------------------------------------------


def _settings(p: dict[str, Any]) -> BulkSettings:
    return BulkSettings(
        connections_per_peer=p["connections"],
        chunk_bytes=p["chunk_bytes"],
        cipher=p["cipher"],
        max_transfer_bytes=max(p["transfer_bytes"], 1 << 20),
        socket_buffer_bytes=p["socket_buffer_bytes"],
    )


async def bulk_receiver(conn: Connection, p: dict[str, Any]) -> None:
    settings = _settings(p)
    size = p["transfer_bytes"]
    bufs = [bytearray(size), bytearray(size)]  # allocated (and zeroed) before any timing
    async with trio.open_nursery() as nursery:
        listener = BulkListener(settings)
        await nursery.start(listener.serve)
        offer = listener.create_offer()
        _send_msg(conn, offer)
        listener.accept_answer(await _recv_msg(conn))
        channel = await listener.wait_channel(offer["token"])
        total = p["reps"] * p["transfers"]
        async with channel.running():
            cpu0 = time.process_time()
            done: list[trio.Event] = [trio.Event() for _ in range(total)]

            async def receive_one(i: int) -> None:
                await channel.receive(i, into=bufs[i % 2])
                done[i].set()

            # Two receives outstanding: receive(i + 1) was started before transfer i ended and
            # has run (registered) by the time the ack of i lets the sender go on.
            async with trio.open_nursery() as receivers:
                for i in range(min(2, total)):
                    receivers.start_soon(receive_one, i)
                for i in range(total):
                    await done[i].wait()
                    if i + 2 < total:
                        receivers.start_soon(receive_one, i + 2)
                    await channel.send(ACK_TAG + i, b"k")
            cpu = time.process_time() - cpu0
            digest = hashlib.sha256(bufs[(total - 1) % 2]).digest()
            copied = channel.counters.bytes_copied
            _send_msg(conn, {"sha256": digest, "cpu_s": cpu, "bytes_copied": copied})
            await _recv_msg(conn)  # keep the channel up until the sender is done
        nursery.cancel_scope.cancel()


async def bulk_sender(conn: Connection, p: dict[str, Any]) -> None:
    settings = _settings(p)
    payload = memoryview(os.urandom(p["transfer_bytes"]))
    offer = BulkOffer.from_wire(await _recv_msg(conn))
    answer = make_answer(offer, settings.connections_per_peer)
    _send_msg(conn, answer.to_wire())
    keys = derive_session_keys(offer, answer)
    channel = await dial_direct_channel(offer, keys, settings)
    times = []
    async with channel.running():
        cpu0 = time.process_time()
        i = 0
        for _ in range(p["reps"]):
            t0 = time.perf_counter()
            for _ in range(p["transfers"]):
                await channel.send(i, payload)
                await channel.receive(ACK_TAG + i)
                i += 1
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
        _send_msg(conn, {"times": times, "sha256": hashlib.sha256(payload).digest(), "cpu_s": cpu})
        await _recv_msg(conn)


ROLES = {
    "raw_receiver": raw_receiver,
    "raw_sender": raw_sender,
    "bulk_receiver": bulk_receiver,
    "bulk_sender": bulk_sender,
}


def _child(role: str, conn: Connection, p: dict[str, Any]) -> None:
    if not p.get("profile_dir"):
        trio.run(ROLES[role], conn, p)
        return
    import cProfile  # only when asked: it slows the run

    prof = cProfile.Profile()
    prof.enable()
    try:
        trio.run(ROLES[role], conn, p)
    finally:
        prof.disable()
        prof.dump_stats(os.path.join(p["profile_dir"], f"{role}.prof"))


def run_mode(kind: str, p: dict[str, Any]) -> dict[str, Any]:
    """One receiver and one sender process; the parent relays their control messages."""
    ctx = mp.get_context("spawn")
    r_parent, r_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    receiver = ctx.Process(target=_child, args=(f"{kind}_receiver", r_child, p))
    sender = ctx.Process(target=_child, args=(f"{kind}_sender", s_child, p))
    receiver.start()
    sender.start()
    try:
        s_parent.send_bytes(r_parent.recv_bytes())  # offer (or port)
        if kind == "bulk":
            r_parent.send_bytes(s_parent.recv_bytes())  # answer
        recv_result = msgpack.unpackb(r_parent.recv_bytes())
        send_result = msgpack.unpackb(s_parent.recv_bytes())
        if kind == "bulk":
            r_parent.send_bytes(msgpack.packb({}))
            s_parent.send_bytes(msgpack.packb({}))
    finally:
        for proc in (sender, receiver):
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if recv_result["sha256"] != send_result["sha256"]:
        raise RuntimeError(f"{kind}: received bytes differ from what was sent")
    rep_bytes = p["transfer_bytes"] * p["transfers"]
    rates = [rep_bytes / t / 1e6 for t in send_result["times"]]
    busiest_cpu_s = max(send_result["cpu_s"], recv_result["cpu_s"])
    return {
        # What the pair would move if each process had a core to itself: the machine is
        # shared, so wall-clock rates swing with other load while CPU time per byte does not.
        "cpu_bound_mbps": rep_bytes * len(rates) / busiest_cpu_s / 1e6,
        "mbps_best": max(rates),
        "mbps_median": statistics.median(rates),
        "cpu_s_sender": send_result["cpu_s"],
        "cpu_s_receiver": recv_result["cpu_s"],
        "wall_s": sum(send_result["times"]),
        "receiver_bytes_copied": recv_result.get("bytes_copied", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB moved per rep")
    ap.add_argument("--transfers", type=int, default=4, help="transfers per rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-kib", type=int, default=1024)
    ap.add_argument("--modes", default="raw_tcp,bulk_aes_c1,bulk_aes_c2,bulk_aes_c4")
    ap.add_argument("--socket-buffer-kib", type=int, default=0, help="0: kernel autotuning")
    ap.add_argument("--profile-dir", default="", help="write cProfile stats per process here")
    args = ap.parse_args()
    base = {
        "transfer_bytes": args.mib * MiB // args.transfers,
        "transfers": args.transfers,
        "reps": args.reps,
        "chunk_bytes": args.chunk_kib * 1024,
        "profile_dir": args.profile_dir,
        "socket_buffer_bytes": args.socket_buffer_kib * 1024,
    }
    print(
        f"{args.reps} reps x {args.mib} MiB ({args.transfers} transfers), "
        f"chunk {args.chunk_kib} KiB, {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        if mode == "raw_tcp":
            res = run_mode("raw", base)
        else:
            _, cipher, conns = mode.split("_")
            p = {
                **base,
                "cipher": CIPHER_AES_GCM if cipher == "aes" else CIPHER_CHACHA20,
                "connections": int(conns.lstrip("c")),
            }
            res = run_mode("bulk", p)
        results[mode] = res
        print(
            f"{mode:16s} best {res['mbps_best']:7.0f} MB/s  median {res['mbps_median']:7.0f} MB/s"
            f"  cpu s/r {res['cpu_s_sender']:.2f}/{res['cpu_s_receiver']:.2f} s"
            f" in {res['wall_s']:.2f} s  cpu-bound {res['cpu_bound_mbps']:5.0f} MB/s"
            f"  extra copies {res['receiver_bytes_copied'] / 1e6:.0f} MB",
            flush=True,
        )
    summary: dict[str, Any] = {f"{m}_mbps": round(r["mbps_best"]) for m, r in results.items()}
    for m, r in results.items():
        summary[f"{m}_cpu_bound_mbps"] = round(r["cpu_bound_mbps"])
    aes = [r["mbps_best"] for m, r in results.items() if m.startswith("bulk_aes")]
    if aes:
        summary["bulk_mbps"] = round(max(aes))
    if "raw_tcp" in results:
        summary["raw_tcp_mbps"] = round(results["raw_tcp"]["mbps_best"])
    summary["mib_per_rep"] = args.mib
    summary["chunk_kib"] = args.chunk_kib
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
