"""The DiLoCo mode's settings and data assignment (no sockets, no daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_config
from node.diloco_mode import DiLoCoModeSettings, shard_of
from protocols.codec import Compression
from trainer.model import MODEL_SIZES


def test_diloco_keys_reach_the_trainer_settings(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'train = "diloco"\ndiloco_inner_steps = 50\ndiloco_overlapped = true\n'
        'diloco_data = ["a.txt", "docs"]\nallreduce_compression = "fp16"\n'
    )
    env = {"SHOAL_DILOCO_ROUND_TIME_S": "30", "SHOAL_DILOCO_OUTER_LR": "0.5"}
    config = load_config(tmp_path, env=env, flags={"diloco_outer_momentum": "0.8"})
    settings = DiLoCoModeSettings.from_config(config)
    assert config.train == "diloco"
    assert settings.inner.inner_steps == 50
    assert settings.inner.round_time_budget_s == 30.0
    assert (settings.inner.outer_lr, settings.inner.outer_momentum) == (0.5, 0.8)
    assert settings.inner.outer_nesterov
    assert settings.overlapped
    assert settings.corpus.sources == ("a.txt", "docs")
    assert settings.compression is Compression.FP16


def test_defaults_are_the_papers_outer_step_and_no_time_budget(tmp_path: Path) -> None:
    settings = DiLoCoModeSettings.from_config(load_config(tmp_path, env={}))
    assert (settings.inner.outer_lr, settings.inner.outer_momentum) == (0.7, 0.9)
    assert settings.inner.round_time_budget_s is None
    assert settings.corpus.sources == ()  # the standard library


def test_config_model_choices_are_the_trainers_sizes(tmp_path: Path) -> None:
    for name in MODEL_SIZES:
        assert load_config(tmp_path, env={}, flags={"diloco_model": name}).diloco_model == name


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"train": "gossip"}, "one of: none, diloco"),
        ({"diloco_model": "huge"}, "a model size"),
        ({"diloco_outer_momentum": "1"}, "[0, 1)"),
        ({"diloco_inner_steps": "0"}, "inner steps per round"),
        ({"diloco_round_time_s": "-3"}, "0 for no time budget"),
        ({"diloco_overlapped": "maybe"}, "true or false"),
        ({"diloco_inner_lr": "nan"}, "positive learning rate"),
    ],
)
def test_bad_diloco_values_name_the_key_and_the_form(
    tmp_path: Path, flags: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={}, flags=flags)
    assert needle in str(info.value)
    assert repr(next(iter(flags))) in str(info.value)


def test_a_nodes_shard_is_a_stable_function_of_its_peer_id() -> None:
    ids = [f"12D3KooWpeer{i}" for i in range(200)]
    first = [shard_of(p, 16) for p in ids]
    assert first == [shard_of(p, 16) for p in ids]
    assert all(0 <= s < 16 for s in first)
    assert len(set(first)) == 16  # 200 peers spread over every shard
