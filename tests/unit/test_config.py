"""Configuration sources, precedence and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import main
from node.config import ConfigError, load_config
from node.identity import load_or_create_seed, peer_id_of


def test_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'swarm = "from-file"\nheartbeat_s = 3\nrole = "observer"\n'
    )
    env = {"SHOAL_HEARTBEAT_S": "4", "SHOAL_SWARM": "from-env"}
    config = load_config(tmp_path, env=env, flags={"swarm": "from-flag", "listen": None})
    assert config.swarm == "from-flag"
    assert config.heartbeat_s == 4.0
    assert config.role == "observer"
    assert config.listen == ("/ip4/0.0.0.0/tcp/4150",)


def test_list_values_from_env_are_comma_separated(tmp_path: Path) -> None:
    env = {"SHOAL_LISTEN": "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/5000"}
    assert load_config(tmp_path, env=env).listen == (
        "/ip4/127.0.0.1/tcp/0",
        "/ip4/127.0.0.1/tcp/5000",
    )


@pytest.mark.parametrize(
    "toml, env, flags, needle",
    [
        ("colour = 3\n", {}, {}, "unknown config key 'colour'"),
        ("", {"SHOAL_NOPE": "1"}, {}, "SHOAL_NOPE"),
        ("heartbeat_s = -1\n", {}, {}, "'heartbeat_s' (in "),
        ("", {"SHOAL_RECORD_TTL_S": "soon"}, {}, "expected a positive number of seconds"),
        ("", {}, {"join": ["/ip4/1.2.3.4/tcp/4150"]}, "with a peer id"),
        ("", {}, {"listen": ["not-an-address"]}, "'listen'"),
        ("", {}, {"swarm": "has space"}, "swarm name"),
        ("swarm = [\n", {}, {}, "not valid TOML"),
        ("heartbeat_s = 5\nrecord_ttl_s = 6\n", {}, {}, "at least twice"),
    ],
)
def test_bad_configuration_names_the_key_and_the_form(
    tmp_path: Path, toml: str, env: dict[str, str], flags: dict[str, object], needle: str
) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path, env=env, flags=flags)
    assert needle in str(err.value)


def test_cli_exits_2_on_bad_config_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["start", "--home", str(tmp_path), "--heartbeat-s", "zero"]) == 2
    assert "heartbeat_s" in capsys.readouterr().err
    assert not (tmp_path / "identity.key").exists()  # nothing started, nothing written


def test_identity_is_created_0600_and_reused(tmp_path: Path) -> None:
    key = tmp_path / "home" / "identity.key"
    seed = load_or_create_seed(key)
    assert key.stat().st_mode & 0o777 == 0o600
    assert load_or_create_seed(key) == seed
    assert peer_id_of(seed).startswith("12D3KooW")


def test_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    load_or_create_seed(key)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_seed(key)


def test_damaged_identity_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    key.write_text("garbage")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="not a shoal identity"):
        load_or_create_seed(key)


def test_every_config_key_is_documented_in_the_readme_with_its_default() -> None:
    import dataclasses
    import re

    from node.config import KEYS, NodeConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for key in KEYS:
        row = next((r for r in rows if f"`{key}`" in r.split("|")[1]), None)
        assert row is not None, f"config key {key!r} has no row in README's table"
    # single-key rows state the code's default
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig)}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        if len(names) == 1 and isinstance(defaults.get(names[0]), int | float):
            stated = float(cells[1].replace("`", ""))
            assert stated == float(defaults[names[0]]), f"README default of {names[0]}: {cells[1]}"
