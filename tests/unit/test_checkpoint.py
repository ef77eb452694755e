import json
import os
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import (
    CheckpointError,
    CheckpointSettings,
    checkpoint_folder,
    encode_safetensors_header,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    read_safetensors,
    save_checkpoint,
)
from trainer.diloco import DiLoCoSettings, DiLoCoWorker, shared_state_hash
from trainer.model import ModelConfig, build_model


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(5, 7, generator=g)
    weights[0, 0] = float("nan")  # bits are kept whatever they mean
    weights[0, 1] = -0.0
    return {
        "param/a.weight": weights,
        "param/b": torch.randn(3, generator=g).to(torch.bfloat16),
        "outer_momentum/a.weight": torch.randn(5, 7, generator=g, dtype=torch.float64),
        "step": torch.tensor(12345678901, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "bytes": torch.arange(256, dtype=torch.int32).to(torch.uint8),
    }


def bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return bytes(t.reshape(-1).view(torch.uint8).tolist())


def test_round_trip_is_bitwise_equal_with_metadata(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = save_checkpoint(tmp_path, tensors, revision=7, metadata={"round": 7, "model": "tiny"})
    assert path.parent == checkpoint_folder(tmp_path) and path.exists()
    loaded = load_checkpoint(path)
    assert list(loaded.tensors) == list(tensors)
    for name, original in tensors.items():
        got = loaded.tensors[name]
        assert got.dtype == original.dtype and got.shape == original.shape, name
        assert bits(got) == bits(original), name
    assert loaded.metadata == {"round": "7", "model": "tiny", "revision": "7"}


def test_worker_shared_state_survives_a_checkpoint_with_the_same_hash(tmp_path: Path) -> None:
    config = ModelConfig(context_tokens=8, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32)
    worker = DiLoCoWorker(build_model(config, seed=3), iter(()), DiLoCoSettings())
    worker.apply_outer(torch.full((worker.layout.numel,), 0.01), round_index=0)
    save_checkpoint(tmp_path, worker.shared_state(), revision=worker.revision)
    latest = load_latest_checkpoint(tmp_path)
    assert latest is not None and latest.metadata["revision"] == "1"
    assert shared_state_hash(latest.tensors) == worker.state_hash()
    fresh = DiLoCoWorker(build_model(config, seed=4), iter(()), DiLoCoSettings())
    fresh.load_shared_state(latest.tensors, revision=int(latest.metadata["revision"]))
    assert fresh.state_hash() == worker.state_hash()


def test_only_the_newest_keep_last_checkpoints_remain(tmp_path: Path) -> None:
    settings = CheckpointSettings(keep_last=2)
    for revision in (3, 1, 5, 4, 2):
        save_checkpoint(
            tmp_path, {"x": torch.full((2,), float(revision))}, revision=revision, settings=settings
        )
    names = [p.name for p in list_checkpoints(tmp_path, settings)]
    assert names == ["state-000000000004.safetensors", "state-000000000005.safetensors"]
    latest = load_latest_checkpoint(tmp_path, settings)
    assert latest is not None and latest.tensors["x"].tolist() == [5.0, 5.0]
    assert load_latest_checkpoint(tmp_path / "elsewhere") is None


def test_a_failed_write_leaves_the_old_checkpoint_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, {"x": torch.ones(4)}, revision=1)
    original = list_checkpoints(tmp_path)[0].read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, {"x": torch.zeros(4)}, revision=1)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, {"x": torch.zeros(4)}, revision=2)
    monkeypatch.undo()
    folder = checkpoint_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["state-000000000001.safetensors"]
    assert list_checkpoints(tmp_path)[0].read_bytes() == original
    # a temp file left by a killed writer is never taken for a checkpoint
    (folder / ".state-000000000009.safetensors.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["state-000000000001.safetensors"]


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_malformed_files_raise_checkpoint_error(tmp_path: Path) -> None:
    good = encode_safetensors_header({"x": torch.zeros(2)}, {"revision": "1"}) + bytes(8)
    write_raw(tmp_path / "ok.safetensors", good)
    assert read_safetensors(tmp_path / "ok.safetensors").tensors["x"].tolist() == [0.0, 0.0]

    def header(entries: dict[str, object]) -> bytes:
        body = json.dumps(entries).encode()
        return len(body).to_bytes(8, "little") + body

    cases = {
        "short": b"\x01\x00",
        "huge_header": (2**40).to_bytes(8, "little") + b"{}",
        "truncated_header": (100).to_bytes(8, "little") + b"{}",
        "not_json": (4).to_bytes(8, "little") + b"{{{{",
        "not_object": (2).to_bytes(8, "little") + b"[]",
        "bad_dtype": header({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}})
        + bytes(8),
        "size_mismatch": header({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})
        + bytes(8),
        "past_the_end": header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
        + bytes(8),
        "negative_shape": header({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})
        + bytes(8),
        "extra_bytes": header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
        + bytes(8),
        "bad_metadata": header({"__metadata__": {"a": 1}}),
        "extra_key": header(
            {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "code": "x"}}
        )
        + bytes(4),
    }
    for name, data in cases.items():
        with pytest.raises(CheckpointError):
            read_safetensors(write_raw(tmp_path / f"{name}.safetensors", data))
    with pytest.raises(CheckpointError, match="revision"):
        load_checkpoint(write_raw(tmp_path / "norev.safetensors", header({})))
    with pytest.raises(CheckpointError, match="cannot read"):
        read_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="metadata"):
        save_checkpoint(tmp_path, {"x": torch.zeros(1)}, revision=1, metadata={"a": 1.5})  # type: ignore[dict-item]


def test_files_are_readable_by_the_safetensors_library(tmp_path: Path) -> None:
    safetensors_format = pytest.importorskip("safetensors.torch")
    tensors = sample_tensors()
    path = save_checkpoint(tmp_path, tensors, revision=3)
    loaded = safetensors_format.load(path.read_bytes())
    assert set(loaded) == set(tensors)
    assert all(bits(loaded[n]) == bits(t) for n, t in tensors.items())
