"""ZO mode's configuration keys and status line (the daemon side is tested across processes
in tests/integration/test_zo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import format_status
from node.config import ConfigError, load_config
from node.zo_mode import load_weights, zo_model_config


def test_zo_keys_parse_from_every_source(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('train = "zo"\nzo_lr = 0.002\nzo_fedkseed_k = 64\n')
    config = load_config(tmp_path, env={"SHOAL_ZO_SAMPLES_PER_STEP": "3"}, flags={})
    assert config.train == "zo" and config.zo_lr == 0.002 and config.zo_fedkseed_k == 64
    assert config.zo_samples_per_step == 3 and config.zo_hash_every_steps == 10


@pytest.mark.parametrize(
    "toml, needle",
    [
        ('train = "sgd"\n', "one of: none, diloco, zo"),
        ("zo_lr = -1\n", "'zo_lr'"),
        ("zo_fedkseed_k = -2\n", "'zo_fedkseed_k'"),
        ('zo_model = "huge"\n', "nano, micro, tiny, small"),
        ("zo_samples_per_step = 300\n", "zo_samples_per_step must be 1-255"),
        ("zo_step_timeout_s = 0\n", "'zo_step_timeout_s'"),
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
            "join": {
                "done": True,
                "steps_replayed": 100,
                "snapshot_bytes": 0,
                "log_bytes": 1200,
                "full_state_bytes": 395264,
            },
        },
    }
    line = next(x for x in format_status(status).splitlines() if x.startswith("training"))
    assert "zo member step 120, loss 3.2500, 4.0 records and 210.5 B sent per step" in line
    assert "parity checks 12 passed 0 failed, 3 rejected" in line
    assert "joined by replay of 100 steps" in line


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
