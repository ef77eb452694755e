"""The ``shoal`` command: start a node, and look at a running one through its control socket."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from node.config import KEYS, ConfigError, NodeConfig, default_home, describe, load_config
from node.control import ControlError, DaemonNotRunning, call

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
LOG_FILE = "node.log"
LOG_FILE_BYTES = 10 * 1024 * 1024


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, help="node home (default $XDG_DATA_HOME/shoal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="peer-to-peer training node")
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="run a node in the foreground")
    _add_home(start)
    for key, spec in KEYS.items():
        if key == "capacity":
            continue  # a table: set it in config.toml
        flag = "--" + key.replace("_", "-")
        if key in ("listen", "join", "announce"):
            start.add_argument(
                flag, action="append", dest=key, metavar="MULTIADDR", help=spec.expected
            )
        else:
            start.add_argument(flag, dest=key, metavar=key.upper(), help=spec.expected)

    for name, help_text in (
        ("id", "peer id and addresses"),
        ("status", "this node and the swarm"),
        ("peers", "one line per known peer"),
        ("netcheck", "reachability, NAT mapping, port mapping, relays, and what to do"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        _add_home(cmd)
        cmd.add_argument("--json", action="store_true", help="print the raw JSON object")
        if name == "status":
            cmd.add_argument(
                "--watch",
                nargs="?",
                const=2.0,
                type=float,
                metavar="SECONDS",
                help="refresh every SECONDS (default 2) until Ctrl-C",
            )
    stop = sub.add_parser("stop", help="leave the swarm gracefully and stop the node")
    _add_home(stop)
    config = sub.add_parser("config", help="print the effective configuration")
    _add_home(config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            return _start(args)
        home = (args.home or default_home(os.environ)).expanduser().resolve()
        if args.command == "config":
            print(json.dumps(describe(load_config(home)), indent=2))
            return 0
        return _client(args, home)
    except ConfigError as exc:
        print(f"shoal: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


# ---------------------------------------------------------------------- start


def _start(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, key, None) for key in KEYS if key != "capacity"}
    flags = {k: (list(v) if isinstance(v, list) else v) for k, v in flags.items()}
    config = load_config(args.home, flags=flags)
    config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _lock_home(config)
    from node.identity import load_or_create_seed

    seed = load_or_create_seed(config.key_path)
    _setup_logging(config)
    import trio

    from node.daemon import Node, StartupError

    node = Node(config, seed, on_ready=_announce_ready)

    async def on_signals(signals: Any) -> None:
        async for signum in signals:
            logging.getLogger("shoal.node").info("got %s, leaving", signal.Signals(signum).name)
            node.request_stop()

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(on_signals, signals)
                    await node.run()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                startup = group.subgroup(StartupError)
                if startup is None:
                    raise
                raise _leaves(startup)[0] from None

    try:
        trio.run(run)
    except StartupError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        lock.close()
    return 0


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _lock_home(config: NodeConfig) -> TextIO:
    lock = open(config.home / "node.lock", "w")  # noqa: SIM115  (held for the node's lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(
            f"another shoal node is running with home {config.home}; "
            f"stop it with 'shoal stop --home {config.home}' or pick another --home"
        ) from None
    return lock


def _setup_logging(config: NodeConfig) -> None:
    level = getattr(logging, config.log_level.upper())
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in (
        logging.StreamHandler(sys.stderr),
        logging.handlers.RotatingFileHandler(
            config.home / LOG_FILE, maxBytes=LOG_FILE_BYTES, backupCount=2
        ),
    ):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    # py-libp2p logs routine churn (closed streams, failed dials, DHT reads) as warnings and
    # errors; shoal logs what matters of it itself, naming the peer and the reason.
    logging.getLogger("libp2p").setLevel(
        logging.DEBUG if level == logging.DEBUG else logging.CRITICAL
    )


def _announce_ready(node: Any) -> None:
    addrs = node.p2p_addrs()
    print(f"peer id   {node.peer_id}")
    print(f"swarm     {node.config.swarm}")
    for addr in addrs:
        print(f"listening {addr}")
    public = [a for a in addrs if "/127." not in a and "/::1/" not in a] or addrs
    print(f"join with shoal start --join {public[0]}")
    print("ready", flush=True)


# ---------------------------------------------------------------------- client commands


def _client(args: argparse.Namespace, home: Path) -> int:
    socket_path = home / "control.sock"
    try:
        if args.command == "stop":
            call(socket_path, "stop")
            print("stopping")
            return 0
        if args.command == "id" and not (home / "control.sock").exists():
            return _offline_id(home, args.json)
        if args.command == "status" and args.watch:
            return _watch(socket_path, args.watch)
        result = call(socket_path, "status" if args.command == "status" else args.command)
    except DaemonNotRunning:
        home_flag = "" if args.home is None else f" --home {home}"
        print(
            f"shoal: no node is running with home {home}. Start one with "
            f"'shoal start{home_flag}' (or 'make demo' for a local swarm).",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    except ControlError as exc:
        print(f"shoal: the node answered with an error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "status":
        print(format_status(result))
    elif args.command == "peers":
        print(format_peers(result))
    elif args.command == "netcheck":
        print(format_netcheck(result))
    else:
        print(result["peer_id"])
        for addr in result["addrs"]:
            print(addr)
    return 0


def _offline_id(home: Path, as_json: bool) -> int:
    from node.identity import load_or_create_seed, peer_id_of

    key = home / "identity.key"
    if not key.exists():
        print(f"shoal: no identity in {home} yet; 'shoal start' creates one", file=sys.stderr)
        return EXIT_RUNTIME
    peer_id = peer_id_of(load_or_create_seed(key))
    print(json.dumps({"peer_id": peer_id, "addrs": [], "running": False}) if as_json else peer_id)
    return 0


def _watch(socket_path: Path, every_s: float) -> int:
    try:
        while True:
            text = format_status(call(socket_path, "status"))
            sys.stdout.write(
                "\x1b[2J\x1b[H" + text + f"\n\n(refreshing every {every_s:g} s, Ctrl-C to quit)\n"
            )
            sys.stdout.flush()
            time.sleep(every_s)
    except KeyboardInterrupt:
        return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_peers(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers"
    lines = []
    for peer in peers:
        remote = (peer.get("remote_addrs") or peer["addrs"] or ["-"])[0]
        rtt = "-" if peer["rtt_ms"] is None else f"{peer['rtt_ms']:.1f} ms"
        bulk = peer.get("bulk") or "-"
        lines.append(
            f"{peer['peer_id']}  {peer['connection']:<8} {remote:<28} rtt {rtt:<9} "
            f"seen {peer['last_seen_s']:.1f}s ago  bulk {bulk:<6} {peer.get('role', '')}"
        )
    return "\n".join(lines)


def format_netcheck(check: dict[str, Any]) -> str:
    varies = check["mapping_varies_by_destination"]
    mapping = check["port_mapping"]
    lines = [
        f"reachability  {check['reachability']}  (listening on {check['listen']})",
        "nat mapping   "
        + {True: "varies by destination (symmetric)", False: "same for every destination"}.get(
            varies, "unknown (fewer than two members observed it)"
        ),
        "port mapping  "
        + (
            f"{mapping['method']}: mapped {mapping['external']} -> {mapping['internal']} "
            f"(lease {mapping['lease_s']} s, renewed {mapping['renewals']}x)"
            if mapping.get("ok")
            else f"none: {mapping['reason']}"
        ),
        f"relay service {'on' if check['relay_service'] else 'off'}",
    ]
    lines += [
        f"dial-back     {d['peer_id']}  {'reached' if d['ok'] else 'failed'}: {d['reason']}"
        for d in check["dialbacks"]
    ]
    lines += [f"observed      {o['addr']}  by {o['peer_id']}" for o in check["observed"]]
    lines += [
        f"relay         {r['peer_id']}  {r['addr']}  rtt "
        + ("-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f} ms")
        for r in check["relays"]
    ]
    lines.append(f"advice        {check['advice']}")
    return "\n".join(lines)


def _allreduce_line(allreduce: dict[str, Any] | None) -> str:
    if not allreduce:
        return "-"
    last = allreduce.get("last") or {}
    text = (
        f"group {allreduce['group']} round {allreduce['round']}: {allreduce['rounds_done']} done, "
        f"{allreduce['aborted']} aborted, {allreduce['retried']} retried, "
        f"{allreduce['skipped']} skipped; sent {_bytes(allreduce['bytes_sent'])}"
    )
    if last.get("outcome") == "completed":
        text += (
            f"; last round {last['round']}: {len(last['members'])} members in "
            f"{last['duration_s']:.3f} s"
        )
    return text


def _zo_line(training: dict[str, Any]) -> str:
    loss = training.get("loss")
    join = training.get("join") or {}
    text = (
        f"zo {training['phase']} step {training['step']}, loss "
        f"{'-' if loss is None else f'{loss:.4f}'}, {training['records_per_step'] or 0} records "
        f"and {training['bytes_per_step'] or 0} B sent per step, {len(training['members'])} "
        f"members, parity checks {training['parity_checks_passed']} passed "
        f"{training['parity_checks_failed']} failed, {training['rejected']} rejected"
    )
    if training.get("snapshot_step"):
        text += (
            f", snapshot of step {training['snapshot_step']}, log of "
            f"{training.get('log_steps', 0)} steps"
        )
    if join.get("done"):
        how = (
            "by replay from step 0 (no tensor fetched)"
            if join.get("path") == "replay"
            else f"from the snapshot of step {join.get('snapshot_step', 0)}"
        )
        speed = join.get("replay_steps_per_s")
        text += (
            f"; joined {how}, replaying {join['steps_replayed']} steps"
            f"{f' at {speed} steps/s' if speed else ''} in "
            f"{_bytes(join['snapshot_bytes'] + join['log_bytes'])} "
            f"(full state {_bytes(join['full_state_bytes'])})"
        )
        if join.get("reason"):
            text += f": {join['reason']}"
    return text


def _number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _training_line(training: dict[str, Any] | None) -> str:
    if not training:
        return "-"
    if training.get("mode") == "zo":
        return _zo_line(training)
    if training.get("mode") != "diloco":
        return json.dumps(training)
    if training.get("error"):
        return f"diloco: {training['phase']}: {training['error']}"
    members = training.get("members") or []
    text = (
        f"diloco {training['model']} ({_number(training['params'], ',')} params), "
        f"{training['phase']}: round {training['round']}, revision {training['revision']}, "
        f"inner step {training['round_inner_step']}/{training['inner_steps_per_round']} "
        f"({training['inner_step']} total)"
    )
    text += (
        f"\n          train loss {_number(training['train_loss'], '.4f')}, "
        f"eval loss {_number(training['eval_loss'], '.4f')}, "
        f"{_number(training['tokens_per_s'], '.0f')} tokens/s; sent "
        f"{_bytes(training['bytes_last_round'])} last round, {_bytes(training['bytes_total'])} "
        f"in total; {training['rounds_completed']} rounds done, "
        f"{training['rounds_skipped']} skipped"
    )
    shown = " ".join(m[-8:] for m in members) or "-"
    text += f"\n          last round's members ({len(members)}): {shown}"
    return text


def format_status(status: dict[str, Any]) -> str:
    training = status.get("training")
    allreduce = status.get("allreduce")
    up = _duration(status["uptime_s"])
    lines = [
        f"node      {status['peer_id']}  ({status['role']}, v{status['version']}, up {up})",
        f"swarm     {status['swarm']}: {status['swarm_size']} members, "
        f"reachability {status['reachability']}",
        f"traffic   in {_bytes(status['bytes_in'])}, out {_bytes(status['bytes_out'])}",
        f"training  {_training_line(training)}",
        f"allreduce {_allreduce_line(allreduce)}",
    ]
    lines += [f"address   {a}" for a in status["addrs"]]
    lines.append(f"peers ({len(status['peers'])}):")
    lines += ["  " + line for line in format_peers(status["peers"]).splitlines()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
