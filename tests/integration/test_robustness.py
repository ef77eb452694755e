"""Bad input from users and from the network: clear errors, and the daemon keeps running."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from net.host import build_host, swarm_protocol
from node.control import call
from protocols.presence import PresenceRecord, Signer
from protocols.wire import encode_frame
from tests.daemons import Daemon, free_port, swarm_of, wait_until

pytestmark = pytest.mark.slow


def test_status_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    out = Daemon(tmp_path / "none", []).cli("status")
    assert out.returncode == 1
    assert "no node is running" in out.stderr and "shoal start" in out.stderr


def test_bad_join_address_is_a_config_error(tmp_path: Path) -> None:
    node = Daemon(
        tmp_path / "n", ["--listen", "/ip4/127.0.0.1/tcp/0", "--join", "/ip4/10.1.2.3/tcp/1"]
    )
    node.start()
    assert node.proc is not None and node.proc.wait(60) == 2
    assert "'join'" in node.output() and "peer id" in node.output()


def test_unreachable_bootstrap_is_retried_while_the_node_keeps_running(tmp_path: Path) -> None:
    dead = (
        f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/12D3KooWJKgqxnxSw6wmbTC4pPwLd9akm9EP4kqU1Kh23jJPRTTy"
    )
    with swarm_of(tmp_path) as spawn:
        node = spawn("n", "--join", dead).wait_ready()
        wait_until(lambda: sum("cannot join through" in x for x in node.lines) >= 2, 30, "retries")
        assert node.alive and node.status()["swarm_size"] == 1


def test_nodes_of_another_swarm_cannot_join(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        ours = spawn("ours", "--swarm", "ours").wait_ready()
        theirs = spawn("theirs", "--swarm", "theirs", join=ours).wait_ready()
        wait_until(
            lambda: any("did not accept a control stream" in x for x in theirs.lines), 30, "refusal"
        )
        assert ours.view() == {ours.peer_id} and theirs.view() == {theirs.peer_id}


def test_port_in_use_and_home_in_use_are_refused_clearly(tmp_path: Path) -> None:
    port = free_port()
    with swarm_of(tmp_path) as spawn:
        first = spawn("a", "--listen", f"/ip4/127.0.0.1/tcp/{port}").wait_ready()
        clash = Daemon(tmp_path / "b", ["--listen", f"/ip4/127.0.0.1/tcp/{port}"]).start()
        assert clash.proc is not None and clash.proc.wait(60) == 1
        assert "cannot listen" in clash.output() and "Address already in use" in clash.output()
        twin = Daemon(first.home, ["--listen", "/ip4/127.0.0.1/tcp/0"]).start()
        assert twin.proc is not None and twin.proc.wait(60) == 2
        assert "another shoal node is running" in twin.output()
        assert first.alive and first.status()["peer_id"] == first.peer_id


def test_garbage_on_the_control_socket_gets_an_error_and_the_daemon_answers_after(
    tmp_path: Path,
) -> None:
    with swarm_of(tmp_path) as spawn:
        node = spawn("n").wait_ready()
        path = str(node.home / "control.sock")
        assert os.stat(path).st_mode & 0o777 == 0o600
        for garbage in (
            b"\x00\xff garbage\n",
            b"[1,2,3]\n",
            b'{"cmd": "launch-missiles"}\n',
            b"x" * 70000,
        ):
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(path)
                client.sendall(garbage)
                reply = json.loads(client.recv(65536))
            assert reply["ok"] is False and reply["error"]
        assert call(node.home / "control.sock", "status")["peer_id"] == node.peer_id


def test_garbage_and_silent_connections_at_the_listen_port_do_not_stop_the_node(
    tmp_path: Path,
) -> None:
    with swarm_of(tmp_path) as spawn:
        boot = spawn("boot").wait_ready()
        host, port = "127.0.0.1", int(boot.join_addr.split("/tcp/")[1].split("/")[0])
        silent = []
        for _ in range(50):  # half-open: connect and never speak
            s = socket.create_connection((host, port), timeout=5)
            silent.append(s)
        for garbage in (
            os.urandom(4096),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"/multistream/1.0.0\n" * 50,
        ):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(garbage)
        joiner = spawn("j", join=boot).wait_ready()
        wait_until(
            lambda: boot.view() == joiner.view() == {boot.peer_id, joiner.peer_id}, 30, "join"
        )
        for s in silent:
            s.close()
        assert boot.alive


async def test_bad_frames_and_records_from_a_peer_are_rejected_with_reasons(tmp_path: Path) -> None:
    with swarm_of(tmp_path) as spawn:
        node = spawn("n", "--max-frame-bytes", "65536")
        await trio.to_thread.run_sync(node.wait_ready)
        rogue_seed = os.urandom(32)
        rogue = Signer(rogue_seed)
        honest = Signer(os.urandom(32))
        host = build_host(rogue_seed, ["/ip4/127.0.0.1/tcp/0"])
        protocol = swarm_protocol("default", "ctl")
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(node.join_addr))
            await host.connect(info)

            def record(signer: Signer) -> dict[str, bytes]:
                rec = PresenceRecord(
                    swarm="default",
                    peer_id=signer.peer_id,
                    seq=1,
                    issued_at=__import__("time").time(),
                    ttl_s=30,
                )
                return rec.sign(signer)

            tampered = record(rogue)
            tampered = {"body": tampered["body"][:-1] + b"\xc3", "sig": tampered["sig"]}
            forged = {"body": record(honest)["body"], "sig": rogue.sign(record(honest)["body"])}
            bad_messages = [
                {"t": "sync", "recs": [tampered], "digest": {}, "ts": 0.0},
                {"t": "recs", "recs": [forged]},  # someone else's record, signed by the rogue
                {"t": "recs", "recs": "not a list"},
                {"t": "frobnicate"},
            ]
            stream = await host.new_stream(info.peer_id, [protocol])
            for message in bad_messages:
                await stream.write(encode_frame(message))
            await stream.write(struct.pack(">I", 1 << 30))  # declared far over the limit
            stream2 = await host.new_stream(info.peer_id, [protocol])
            await stream2.write(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # not msgpack

            def logged() -> bool:
                text = node.output()
                return all(
                    needle in text
                    for needle in (
                        f"rejected sync message from {rogue.peer_id}: presence record refused: "
                        f"bad signature for peer {rogue.peer_id}",
                        f"rejected recs message from {rogue.peer_id}: presence record refused: "
                        f"bad signature for peer {honest.peer_id}",
                        f"rejected recs message from {rogue.peer_id}: malformed recs message",
                        f"from {rogue.peer_id}: unknown membership message type 'frobnicate'",
                        f"closing control stream from {rogue.peer_id}: declared frame length",
                        f"closing control stream from {rogue.peer_id}: malformed msgpack",
                    )
                )

            try:
                await trio.to_thread.run_sync(lambda: wait_until(logged, 20, "rejections logged"))
            except AssertionError:
                print(node.output())
                raise
            status = await trio.to_thread.run_sync(node.status)
            assert status["swarm_size"] == 1  # neither the rogue nor the forged peer got in
            assert status["rejected"]["frames"] == 2
            assert node.alive
            log_file = (node.home / "node.log").read_text()
            assert f"closing control stream from {rogue.peer_id}" in log_file
