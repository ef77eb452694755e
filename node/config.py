"""Node configuration: defaults < ``config.toml`` in the home < ``SHOAL_*`` variables < flags.

Every key is declared once in :data:`KEYS` with its parser, default and the form it expects;
the TOML file, the environment and the command line all go through the same parser, so an
unknown key or a bad value gets the same clear error (naming the key, where it came from and
the expected form) whichever way it was given, before anything starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr

from protocols.zo_log import snapshot_interval_problem

DEFAULT_PORT = 4150
ENV_PREFIX = "SHOAL_"
CONFIG_FILE = "config.toml"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and how."""


@dataclass(frozen=True)
class NodeConfig:
    home: Path
    swarm: str = "default"
    listen: tuple[str, ...] = (f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}",)
    join: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    role: str = "worker"
    heartbeat_s: float = 2.0
    record_ttl_s: float = 20.0
    gossip_fanout: int = 2
    connect_timeout_s: float = 5.0
    send_timeout_s: float = 5.0
    link_idle_timeout_s: float = 30.0
    leave_timeout_s: float = 2.0
    join_retry_s: float = 3.0
    dht_republish_s: float = 60.0
    dht_record_max_age_s: float = 3600.0
    dht_replication: int = 3
    dht_query_timeout_s: float = 2.0
    max_clock_skew_s: float = 30.0
    max_frame_bytes: int = 1 << 20
    log_level: str = "info"
    bulk_connections: int = 2
    bulk_port: int = 0
    bulk_io_timeout_s: float = 10.0
    bulk_handshake_timeout_s: float = 5.0
    bulk_setup_timeout_s: float = 10.0
    allreduce_workload: str = "none"
    allreduce_check_elems: int = 1 << 16
    allreduce_compression: str = "none"
    allreduce_check_poison: str = "none"
    allreduce_join_wait_s: float = 5.0
    allreduce_ready_timeout_s: float = 10.0
    allreduce_accept_timeout_s: float = 5.0
    allreduce_coordinator_timeout_s: float = 5.0
    reachability_min_answers: int = 2
    nat_probe_interval_s: float = 60.0
    nat_dialback_timeout_s: float = 3.0
    nat_probe_port: int = 0
    nat_direct_dial_timeout_s: float = 1.5
    relay_service: str = "auto"
    relay_reservations: int = 2
    relay_max_reservations: int = 64
    relay_reservation_ttl_s: float = 120.0
    relay_max_circuits_per_peer: int = 8
    relay_circuit_max_s: float = 3600.0
    relay_circuit_max_bytes: int = 1 << 30
    relay_handshake_timeout_s: float = 5.0
    relay_retry_s: float = 10.0
    holepunch: str = "on"
    holepunch_attempt_timeout_s: float = 5.0
    holepunch_addrs_wait_s: float = 3.0
    port_mapping: str = "auto"
    port_mapping_timeout_s: float = 5.0
    port_mapping_lease_s: int = 3600
    allreduce_join_timeout_s: float = 5.0
    allreduce_join_requests: int = 3
    capacity: dict[str, Any] = field(default_factory=dict)
    # training (see node/diloco_mode.py for what each DiLoCo key does)
    train: str = "none"
    diloco_model: str = "tiny"
    diloco_seed: int = 0
    diloco_inner_steps: int = 100
    diloco_round_time_s: float = 0.0
    diloco_inner_lr: float = 1e-3
    diloco_outer_lr: float = 0.7
    diloco_outer_momentum: float = 0.9
    diloco_overlapped: bool = False
    diloco_batch_size: int = 8
    diloco_data: tuple[str, ...] = ()
    diloco_corpus_bytes: int = 16 * 2**20
    diloco_shards: int = 64
    diloco_eval_every: int = 1
    diloco_eval_batches: int = 8
    diloco_checkpoint_every: int = 5
    diloco_threads: int = 0
    # Shared-seed zeroth-order training (train = "zo"); see node/zo_mode.py and README.
    zo_model: str = "micro"
    zo_model_seed: int = 0
    zo_context_tokens: int = 32
    zo_batch_size: int = 8
    zo_corpus_bytes: int = 1 << 20
    zo_corpus_sources: tuple[str, ...] = ()
    zo_init_checkpoint: str = ""
    zo_lr: float = 1e-3
    zo_eps: float = 1e-3
    zo_samples_per_step: int = 1
    zo_hash_every_steps: int = 10
    zo_snapshot_every_steps: int = 1000
    zo_archive_max_steps: int = 100_000
    zo_replay_join_max_steps: int = 10_000
    zo_join_offer_timeout_s: float = 3.0
    zo_fedkseed_k: int = 0
    zo_seed_sampling: str = "uniform"
    zo_min_members: int = 1
    zo_join_wait_s: float = 3.0
    zo_step_timeout_s: float = 5.0
    zo_close_timeout_s: float = 10.0
    zo_anti_entropy_s: float = 1.0
    zo_repair_wait_s: float = 0.5
    zo_tick_s: float = 0.1
    zo_torch_threads: int = 1
    zo_fault: str = "none"

    @property
    def socket_path(self) -> Path:
        return self.home / "control.sock"

    @property
    def key_path(self) -> Path:
        return self.home / "identity.key"


Parser = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _swarm_name(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise ValueError
    return text


def _positive_seconds(value: Any) -> float:
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not number > 0:
        raise ValueError
    if number != number or number == float("inf"):
        raise ValueError
    return float(number)


def _positive_int(value: Any) -> int:
    number = int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
        raise ValueError
    return number


def _non_negative_seconds(value: Any) -> float:
    number = float(value) if isinstance(value, str) else value
    if not isinstance(number, bool) and isinstance(number, int | float) and number == 0:
        return 0.0
    return _positive_seconds(value)


def _positive_number(value: Any) -> float:
    return _positive_seconds(value)


def _fraction(value: Any) -> float:
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not 0 <= number < 1:
        raise ValueError
    return float(number)


def _non_negative_int(value: Any) -> int:
    number = int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError
    return number


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError
    return text in ("true", "1", "yes", "on")


def _paths(value: Any) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise TypeError
    return tuple(_text(item) for item in items)


def _port(value: Any) -> int:
    number = int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 65535:
        raise ValueError
    return number


def _choice(*options: str) -> Parser:
    def parse(value: Any) -> str:
        if _text(value) not in options:
            raise ValueError
        return str(value)

    return parse


PORT_MAPPING_METHODS = ("upnp", "natpmp")


def port_mapping_methods(value: str) -> tuple[str, ...]:
    """The methods a ``port_mapping`` value names, in order ("auto": all, "off": none)."""
    if value == "auto":
        return PORT_MAPPING_METHODS
    if value == "off":
        return ()
    return tuple(m.strip() for m in value.split(","))


def _port_mapping(value: Any) -> str:
    text = _text(value).strip()
    if text in ("auto", "off"):
        return text
    methods = port_mapping_methods(text)
    known = set(methods) <= set(PORT_MAPPING_METHODS)
    if not methods or not known or len(set(methods)) != len(methods):  # or one named twice
        raise ValueError
    return ",".join(methods)


def _multiaddrs(require_peer_id: bool) -> Parser:
    def parse(value: Any) -> tuple[str, ...]:
        items = (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        )
        if not isinstance(items, list | tuple):
            raise TypeError
        out = []
        for item in items:
            addr = multiaddr.Multiaddr(_text(item))  # raises on a malformed address
            protocols = [p.name for p in addr.protocols()]
            if (
                not ({"ip4", "ip6", "dns", "dns4", "dns6"} & set(protocols))
                or "tcp" not in protocols
            ):
                raise ValueError
            if require_peer_id and "p2p" not in protocols:
                raise ValueError
            out.append(str(addr))
        return tuple(out)

    return parse


def _capacity(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError
    for key, item in value.items():
        if not isinstance(key, str) or isinstance(item, bool) or not isinstance(item, int | float):
            raise ValueError
    return dict(value)


@dataclass(frozen=True)
class Key:
    parse: Parser
    expected: str


KEYS: dict[str, Key] = {
    "swarm": Key(_swarm_name, "a swarm name of 1-64 letters, digits, '.', '_' or '-'"),
    "listen": Key(
        _multiaddrs(False), "TCP multiaddrs such as /ip4/0.0.0.0/tcp/4150 (port 0 = any)"
    ),
    "join": Key(
        _multiaddrs(True), "multiaddrs with a peer id, /ip4/1.2.3.4/tcp/4150/p2p/12D3Koo..."
    ),
    "announce": Key(_multiaddrs(False), "TCP multiaddrs to announce besides the listen addresses"),
    "role": Key(_choice("worker", "observer"), "one of: worker, observer"),
    "heartbeat_s": Key(_positive_seconds, "a positive number of seconds"),
    "record_ttl_s": Key(_positive_seconds, "a positive number of seconds"),
    "gossip_fanout": Key(_positive_int, "a positive number of members to sync with per heartbeat"),
    "connect_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "send_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "link_idle_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "leave_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "join_retry_s": Key(_positive_seconds, "a positive number of seconds"),
    "dht_republish_s": Key(_positive_seconds, "a positive number of seconds"),
    "dht_record_max_age_s": Key(_positive_seconds, "a positive number of seconds"),
    "dht_replication": Key(_positive_int, "a positive number of members storing each DHT key"),
    "dht_query_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "max_clock_skew_s": Key(_positive_seconds, "a positive number of seconds"),
    "max_frame_bytes": Key(_positive_int, "a positive integer number of bytes"),
    "log_level": Key(
        _choice("debug", "info", "warning", "error"), "one of: debug, info, warning, error"
    ),
    "bulk_connections": Key(_positive_int, "a positive number of TCP connections per peer"),
    "bulk_port": Key(_port, "a TCP port number, 0 for any free port"),
    "bulk_io_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "bulk_handshake_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "bulk_setup_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "allreduce_workload": Key(
        _choice("none", "check", "api"), "one of: none, check, api (node.api.Communicator)"
    ),
    "allreduce_check_elems": Key(_positive_int, "a positive number of float32 elements"),
    "allreduce_compression": Key(
        _choice("none", "fp16", "bf16", "uint8"), "one of: none, fp16, bf16, uint8"
    ),
    "allreduce_check_poison": Key(
        _choice("none", "nan"), "one of: none, nan (check workload fault injection)"
    ),
    "allreduce_join_wait_s": Key(_positive_seconds, "a positive number of seconds"),
    "allreduce_ready_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "allreduce_accept_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "allreduce_coordinator_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "reachability_min_answers": Key(
        _positive_int, "a positive number of members whose dial-backs decide reachability"
    ),
    "nat_probe_interval_s": Key(_positive_seconds, "a positive number of seconds"),
    "nat_dialback_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "nat_direct_dial_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "nat_probe_port": Key(_port, "a TCP port number, 0 for any free port"),
    "relay_service": Key(_choice("auto", "off"), "one of: auto (relay while public), off"),
    "relay_reservations": Key(_positive_int, "a positive number of relays to hold a slot on"),
    "relay_max_reservations": Key(_positive_int, "a positive number of reservations"),
    "relay_reservation_ttl_s": Key(_positive_seconds, "a positive number of seconds"),
    "relay_max_circuits_per_peer": Key(_positive_int, "a positive number of circuits"),
    "relay_circuit_max_s": Key(_positive_seconds, "a positive number of seconds"),
    "relay_circuit_max_bytes": Key(_positive_int, "a positive integer number of bytes"),
    "relay_handshake_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "relay_retry_s": Key(_positive_seconds, "a positive number of seconds"),
    "holepunch": Key(_choice("on", "off"), "one of: on, off"),
    "holepunch_attempt_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "holepunch_addrs_wait_s": Key(_positive_seconds, "a positive number of seconds"),
    "port_mapping": Key(
        _port_mapping,
        "auto (UPnP IGD, then NAT-PMP), off, or a comma list of upnp, natpmp in the order to try",
    ),
    "port_mapping_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "port_mapping_lease_s": Key(_positive_int, "a positive whole number of seconds"),
    "allreduce_join_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "allreduce_join_requests": Key(_positive_int, "a positive number of requests"),
    "capacity": Key(_capacity, "a table of name = number, e.g. {flops = 1e12}"),
    "train": Key(_choice("none", "diloco", "zo"), "one of: none, diloco, zo"),
    "diloco_model": Key(
        _choice("tiny", "small", "base", "350m"), "a model size: tiny, small, base, 350m"
    ),
    "diloco_seed": Key(_non_negative_int, "an integer >= 0 (the same on every worker)"),
    "diloco_inner_steps": Key(_positive_int, "a positive number of inner steps per round (H)"),
    "diloco_round_time_s": Key(
        _non_negative_seconds, "seconds of inner steps per round, 0 for no time budget"
    ),
    "diloco_inner_lr": Key(_positive_number, "a positive learning rate"),
    "diloco_outer_lr": Key(_positive_number, "a positive learning rate"),
    "diloco_outer_momentum": Key(_fraction, "a number in [0, 1)"),
    "diloco_overlapped": Key(_flag, "true or false"),
    "diloco_batch_size": Key(_positive_int, "a positive number of sequences per inner step"),
    "diloco_data": Key(_paths, "text files or folders (comma-separated); empty = Python's stdlib"),
    "diloco_corpus_bytes": Key(_positive_int, "a positive number of bytes of text to read"),
    "diloco_shards": Key(_positive_int, "a positive number of shards of the train text"),
    "diloco_eval_every": Key(_non_negative_int, "rounds between eval losses, 0 = never"),
    "diloco_eval_batches": Key(_positive_int, "a positive number of held-out batches"),
    "diloco_checkpoint_every": Key(_non_negative_int, "rounds between checkpoints, 0 = never"),
    "diloco_threads": Key(_non_negative_int, "torch threads, 0 = torch's default"),
    "zo_model": Key(_choice("nano", "micro", "tiny", "small"), "one of: nano, micro, tiny, small"),
    "zo_model_seed": Key(
        _non_negative_int, "an integer >= 0 (theta_0's seed; the same on every node)"
    ),
    "zo_context_tokens": Key(_positive_int, "a positive number of tokens"),
    "zo_batch_size": Key(_positive_int, "a positive number of sequences per SPSA sample"),
    "zo_corpus_bytes": Key(_positive_int, "a positive number of bytes of training text"),
    "zo_corpus_sources": Key(_paths, "text files or folders (comma list); empty = stdlib *.py"),
    "zo_init_checkpoint": Key(_text, "a safetensors checkpoint to start from (e.g. DiLoCo's)"),
    "zo_lr": Key(_positive_number, "a positive learning rate"),
    "zo_eps": Key(_positive_number, "a positive perturbation size"),
    "zo_samples_per_step": Key(_positive_int, "a number of SPSA samples per node-step, 1-255"),
    "zo_hash_every_steps": Key(_positive_int, "a positive number of steps between hash checks"),
    "zo_snapshot_every_steps": Key(
        _non_negative_int, "0 (theta_0 only) or a multiple of zo_hash_every_steps"
    ),
    "zo_archive_max_steps": Key(
        _non_negative_int,
        "0 (no archive) or the most closed steps each node keeps on disk for joins by replay",
    ),
    "zo_replay_join_max_steps": Key(
        _non_negative_int,
        "0 (always sync the snapshot) or the most steps a joiner holding theta_0 replays",
    ),
    "zo_join_offer_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_fedkseed_k": Key(_non_negative_int, "0 (off) or the number K of FedKSeed candidate seeds"),
    "zo_seed_sampling": Key(_choice("uniform", "weighted"), "one of: uniform, weighted"),
    "zo_min_members": Key(_positive_int, "a positive number of members before step 0"),
    "zo_join_wait_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_step_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_close_timeout_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_anti_entropy_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_repair_wait_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_tick_s": Key(_positive_seconds, "a positive number of seconds"),
    "zo_torch_threads": Key(_positive_int, "a positive number of torch CPU threads"),
    "zo_fault": Key(
        _choice("none", "bad_records", "outsider", "drift"),
        "one of: none, bad_records, outsider, drift (fault injection for tests)",
    ),
}


def default_home(env: Mapping[str, str]) -> Path:
    if env.get("SHOAL_HOME"):
        return Path(env["SHOAL_HOME"]).expanduser()
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local/share")
    return Path(data) / "shoal"


def _parse(key: str, value: Any, origin: str) -> Any:
    spec = KEYS.get(key)
    if spec is None:
        known = ", ".join(sorted(KEYS))
        raise ConfigError(f"unknown config key {key!r} ({origin}); known keys: {known}")
    try:
        return spec.parse(value)
    except (TypeError, ValueError) as exc:
        shown = repr(value) if len(repr(value)) < 200 else repr(value)[:200] + "..."
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigError(
            f"bad value for config key {key!r} ({origin}): got {shown}{detail}; "
            f"expected {spec.expected}"
        ) from None


def load_config(
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Merge the three sources over the defaults; raise ConfigError on any bad key or value."""
    env = os.environ if env is None else env
    home = (home or default_home(env)).expanduser().resolve()
    values: dict[str, Any] = {}

    path = home / CONFIG_FILE
    if path.exists():
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for key, value in table.items():
            values[key] = _parse(key, value, f"in {path}")

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "SHOAL_HOME":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in KEYS:
            raise ConfigError(
                f"unknown config key {key!r} (from environment variable {name}); "
                f"known keys: {', '.join(sorted(KEYS))}"
            )
        values[key] = _parse(key, value, f"from environment variable {name}")

    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _parse(key, value, f"from flag --{key.replace('_', '-')}")

    config = NodeConfig(home=home, **values)
    if not 1 <= config.zo_samples_per_step <= 255:
        raise ConfigError(f"zo_samples_per_step must be 1-255, got {config.zo_samples_per_step}")
    problem = snapshot_interval_problem(
        config.zo_snapshot_every_steps, config.zo_hash_every_steps, prefix="zo_"
    )
    if problem:
        raise ConfigError(problem)
    if config.record_ttl_s < 2 * config.heartbeat_s:
        raise ConfigError(
            f"record_ttl_s ({config.record_ttl_s}) must be at least twice heartbeat_s "
            f"({config.heartbeat_s}), or members expire between two heartbeats"
        )
    return config


def describe(config: NodeConfig) -> dict[str, Any]:
    """The effective configuration as plain JSON-able values."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["home"] = str(config.home)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
