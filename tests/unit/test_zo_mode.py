"""ZO mode's configuration keys and status line (the daemon side is tested across processes
in tests/integration/test_zo.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node.cli import format_status
from node.config import ConfigError, load_config
from node.zo_mode import load_weights, zo_model_config


def test_zo_keys_parse_from_every_source(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('train = "zo"\nzo_lr = 0.002\nzo_fedkseed_k = 64\n')
    config = load_config(tmp_path, env={"SHOAL_ZO_SAMPLES_PER_STEP": "3"}, flags={})
    assert config.train == "zo" and config.zo_lr == 0.002 and config.zo_fedkseed_k == 64
    assert config.zo_samples_per_step == 3 and config.zo_hash_every_steps == 10
    assert config.zo_snapshot_every_steps == 1000


@pytest.mark.parametrize(
    "toml, needle",
    [
        ('train = "sgd"\n', "one of: none, diloco, zo"),
        ("zo_lr = -1\n", "'zo_lr'"),
        ("zo_fedkseed_k = -2\n", "'zo_fedkseed_k'"),
        ('zo_model = "huge"\n', "nano, micro, tiny, small"),
        ("zo_samples_per_step = 300\n", "zo_samples_per_step must be 1-255"),
        ("zo_step_timeout_s = 0\n", "'zo_step_timeout_s'"),
        ("zo_snapshot_every_steps = 25\n", "must be 0 or a multiple of zo_hash_every_steps"),
    ],
)
def test_bad_zo_values_are_refused_with_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(tmp_path, env={}, flags={})


def test_model_sizes() -> None:
    assert zo_model_config("nano", 16).d_model == 32
    assert zo_model_config("micro", 32).context_tokens == 32
    assert zo_model_config("tiny", 64).n_layers == 4


def test_status_shows_the_zo_training_line() -> None:
    status = {
        "peer_id": "12D3KooWx",
        "role": "worker",
        "version": "0.1.0",
        "uptime_s": 5.0,
        "swarm": "s",
        "swarm_size": 2,
        "reachability": "unknown",
        "bytes_in": 1,
        "bytes_out": 2,
        "addrs": [],
        "peers": [],
        "allreduce": None,
        "training": {
            "mode": "zo",
            "phase": "member",
            "step": 120,
            "loss": 3.25,
            "records_per_step": 4.0,
            "bytes_per_step": 210.5,
            "members": ["a", "b", "c", "d"],
            "parity_checks_passed": 12,
            "parity_checks_failed": 0,
            "rejected": 3,
            "snapshot_step": 100,
            "log_steps": 27,
            "join": {
                "done": True,
                "snapshot_step": 100,
                "steps_replayed": 20,
                "snapshot_bytes": 0,
                "log_bytes": 1200,
                "full_state_bytes": 395264,
            },
        },
    }
    line = next(x for x in format_status(status).splitlines() if x.startswith("training"))
    assert "zo member step 120, loss 3.2500, 4.0 records and 210.5 B sent per step" in line
    assert "parity checks 12 passed 0 failed, 3 rejected" in line
    assert "snapshot of step 100, log of 27 steps" in line
    assert "joined from the snapshot of step 100, replaying 20 steps in 1.2 KB" in line
    status["training"]["join"] |= {
        "path": "replay",
        "reason": "it holds theta_0 and a's archive reaches step 0",
        "snapshot_step": 0,
        "steps_replayed": 120,
        "replay_steps_per_s": 31.5,
    }
    line = next(x for x in format_status(status).splitlines() if x.startswith("training"))
    assert "joined by replay from step 0 (no tensor fetched), replaying 120 steps at 31.5" in line
    assert "a's archive reaches step 0" in line


def test_the_archive_and_replay_join_keys_parse_and_bad_values_are_refused(
    tmp_path: Path,
) -> None:
    config = load_config(tmp_path, env={}, flags={})
    assert config.zo_archive_max_steps == 100_000 and config.zo_replay_join_max_steps == 10_000
    config = load_config(
        tmp_path, env={"SHOAL_ZO_ARCHIVE_MAX_STEPS": "0"}, flags={"zo_replay_join_max_steps": "5"}
    )
    assert config.zo_archive_max_steps == 0 and config.zo_replay_join_max_steps == 5
    for key in ("zo_archive_max_steps", "zo_replay_join_max_steps"):
        with pytest.raises(ConfigError, match=key):
            load_config(tmp_path, env={}, flags={key: "-1"})
    with pytest.raises(ConfigError, match="zo_join_offer_timeout_s"):
        load_config(tmp_path, env={}, flags={"zo_join_offer_timeout_s": "0"})


def test_a_checkpoint_is_the_starting_point_and_a_mismatch_is_refused(tmp_path: Path) -> None:
    import torch

    from trainer.checkpoint import CheckpointError, save_checkpoint
    from trainer.model import ModelConfig, build_model

    trained = build_model(zo_model_config("nano", 16), seed=7)
    path = save_checkpoint(tmp_path, dict(trained.named_parameters()), revision=3)
    fresh = build_model(zo_model_config("nano", 16), seed=0)
    load_weights(fresh, path)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.parameters(), trained.parameters(), strict=True)
    )
    with pytest.raises(CheckpointError, match="shape"):
        narrow = ModelConfig(context_tokens=16, d_model=32, n_layers=1, n_heads=2, mlp_hidden=32)
        load_weights(build_model(narrow, seed=0), path)
    with pytest.raises(CheckpointError, match="lacks parameters"):
        load_weights(build_model(zo_model_config("micro", 16), seed=0), path)


def _zo_mode(home: Path, swarm: str = "s") -> Any:
    from node.zo_mode import ZOMode

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'train = "zo"\nswarm = "{swarm}"\nzo_model = "nano"\n')
    node = SimpleNamespace(config=load_config(home, env={}, flags={}), peer_id="12D3KooWme")
    mode = ZOMode(node)  # type: ignore[arg-type]
    mode._load()
    return mode


def test_a_restarted_node_resumes_from_the_snapshot_saved_in_its_home(tmp_path: Path) -> None:
    import msgpack
    import torch
    import trio

    from node.zo_mode import CHAIN_TENSOR, HOME_LOG_FILE
    from trainer.zo import clone_params, state_hash

    first = _zo_mode(tmp_path / "home")
    assert first.resumed_from is None and first.snapshot_step == 0
    theta_0 = state_hash(first.trainer.model)
    with torch.no_grad():  # "training": the weights move, a snapshot of step 300 is agreed
        for p in first.trainer.model.parameters():
            p.add_(0.01)
    first.snapshot, first.snapshot_step = clone_params(first.trainer.model), 300
    first.snapshot_chain = bytes(range(16))
    served = first._served_state()
    trio.run(first._save_snapshot, served)
    # The steps since, as the daemon writes them at every hash check (a zo.log message).
    saved_log = {"t": "zo.log", "P": ["p"], "s0": 300, "m0": 1, "d0": bytes(16), "S": []}
    (tmp_path / "home" / HOME_LOG_FILE).write_bytes(msgpack.packb(saved_log))

    again = _zo_mode(tmp_path / "home")
    assert again.resumed_from == 300 and again.trainer.step == 300
    assert again.snapshot_chain == bytes(range(16))
    assert again._home_log == saved_log  # replayed (and checked by the log machine) at the join
    assert state_hash(again.trainer.model) == state_hash(first.trainer.model) != theta_0
    # It serves (and votes with) the same snapshot: a swarm still at step 300 sends nothing.
    assert again._served_state().summary() == served.summary()
    assert CHAIN_TENSOR in served.tensors and served.revision == 300

    # A saved log that starts elsewhere (killed between the two saves) is not used.
    (tmp_path / "home" / HOME_LOG_FILE).write_bytes(msgpack.packb({**saved_log, "s0": 200}))
    assert _zo_mode(tmp_path / "home")._home_log is None
    # A snapshot of another swarm in the home is not used.
    other = _zo_mode(tmp_path / "home", swarm="other")
    assert other.resumed_from is None and state_hash(other.trainer.model) == theta_0


def test_an_offer_from_a_peer_not_asked_is_ignored(tmp_path: Path) -> None:
    mode = _zo_mode(tmp_path / "home")
    offer = {"t": "zo.offer", "h": 5, "l": 0, "a": [0, 6, mode.genesis]}
    mode._offers_wanted = {"asked"}
    mode._on_offer("intruder", offer)  # would otherwise become the replay donor
    assert "intruder" not in mode._offers and mode.ignored == 1
    assert not mode._offers_in.is_set()
    mode._on_offer("asked", offer)
    assert set(mode._offers) == {"asked"} and mode._offers_in.is_set()


def test_archive_wants_are_read_in_a_worker_thread_not_the_event_loop(tmp_path: Path) -> None:
    import trio

    from protocols.zo_log import ClosedStep, ServeArchive

    mode = _zo_mode(tmp_path / "home")
    seen: dict[str, Any] = {}

    class Archive:
        def read(self, start: int, stop: int) -> tuple[bytes, list[Any]]:
            try:
                trio.lowlevel.current_task()
                seen["in_loop"] = True
            except RuntimeError:
                seen["in_loop"] = False
            return bytes(16), [ClosedStep(0, ("p",), (), {}, {}, ())]

    async def send(peer: str, msg: dict[str, Any]) -> None:
        seen["sent"] = (peer, msg["t"])

    mode.archive = Archive()
    mode._send = send
    trio.run(mode._serve_archive, ServeArchive("p", 0, 1, 0))
    assert seen["in_loop"] is False and seen["sent"] == ("p", "zo.log")
