"""Checkpoints of the shared state: named tensors + small string metadata, written atomically.

File format: safetensors (8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range plus a `__metadata__` map of strings, then the raw
little-endian tensor bytes). It holds no code, so loading can never execute anything, and
other tools read it. It is written and read here with torch alone: the `safetensors`
package needs numpy to save, which shoal does not otherwise depend on.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the
final name (and the folder fsync'ed), so a crash leaves either the old or the new file,
never a torn one. Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_FILE_PATTERN = re.compile(r"^state-(\d{12})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint file that is malformed, truncated, oversized or not what was expected."""


@dataclass(frozen=True)
class CheckpointSettings:
    """`folder_name` is relative to the node's home folder."""

    folder_name: str = "checkpoints"
    keep_last: int = 3
    max_header_bytes: int = 16 * 2**20
    max_file_bytes: int = 64 * 2**30

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise CheckpointError(f"keep_last must be at least 1, got {self.keep_last}")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def tensor_raw_bytes(tensor: torch.Tensor) -> memoryview:
    """Zero-copy view of the raw bytes of a contiguous CPU tensor (native = little-endian).

    The view borrows the tensor's memory: keep the tensor alive while the view is used.
    """
    if sys.byteorder != "little":
        raise CheckpointError("shoal stores tensors little-endian; this machine is big-endian")
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise CheckpointError("raw bytes need a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    return memoryview(buffer).cast("B")


def encode_safetensors_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> bytes:
    """Length prefix + JSON header for `tensors` laid out in the mapping's order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if name == "__metadata__":
            raise CheckpointError("'__metadata__' is reserved and cannot name a tensor")
        if tensor.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # the format pads the header to 8-byte alignment
    return len(body).to_bytes(8, "little") + body


def _check_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str | int):
            raise CheckpointError(f"metadata must map str to str or int, got {key!r}: {value!r}")
        out[key] = str(value)
    return out


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file at `path` via temp file + fsync + rename."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = encode_safetensors_header(cpu, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for tensor in cpu.values():
                f.write(tensor_raw_bytes(tensor))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def read_safetensors(path: Path, settings: CheckpointSettings | None = None) -> Checkpoint:
    """Read and validate a safetensors file; every check failure is a `CheckpointError`."""
    settings = settings or CheckpointSettings()
    try:
        size = path.stat().st_size
        if size > settings.max_file_bytes:
            raise CheckpointError(f"{path} is {size} bytes, over max_file_bytes")
        with path.open("rb") as f:
            raw = bytearray(f.read())
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if len(raw) < 8:
        raise CheckpointError(f"{path} is truncated: no header length")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > settings.max_header_bytes or header_len > len(raw) - 8:
        raise CheckpointError(f"{path}: header length {header_len} is oversized or truncated")
    try:
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata_raw = header.pop("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data = memoryview(raw)[8 + header_len :]
    tensors: dict[str, torch.Tensor] = {}
    used = 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: entry {name!r} is malformed")
        dtype = _CODE_DTYPES.get(entry["dtype"])
        shape, offsets = entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
        start, stop = offsets
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= stop <= len(data) or stop - start != numel * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} byte range {offsets} does not match shape "
                f"{shape} x {itemsize} bytes within {len(data)} data bytes"
            )
        used += stop - start
        chunk = data[start:stop]
        tensor = torch.frombuffer(chunk, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        tensors[name] = tensor.reshape(shape).clone()
    if used != len(data):
        raise CheckpointError(f"{path}: tensors cover {used} of {len(data)} data bytes")
    return Checkpoint(path=path, tensors=tensors, metadata=dict(metadata_raw))


def checkpoint_folder(home: Path | str, settings: CheckpointSettings | None = None) -> Path:
    settings = settings or CheckpointSettings()
    return Path(home) / settings.folder_name


def list_checkpoints(home: Path | str, settings: CheckpointSettings | None = None) -> list[Path]:
    """Checkpoint files under `home`, oldest revision first (temp files are ignored)."""
    folder = checkpoint_folder(home, settings)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    home: Path | str,
    tensors: Mapping[str, torch.Tensor],
    *,
    revision: int,
    metadata: Mapping[str, str | int] | None = None,
    settings: CheckpointSettings | None = None,
) -> Path:
    """Save `tensors` as the checkpoint of `revision`, then drop all but the newest `keep_last`.

    `metadata` (e.g. round, model name) is stored as strings beside `revision`.
    """
    settings = settings or CheckpointSettings()
    if revision < 0 or revision >= 10**12:
        raise CheckpointError(f"revision must be in 0..10**12-1, got {revision}")
    meta = _check_metadata(dict(metadata or {}))
    meta["revision"] = str(revision)
    path = checkpoint_folder(home, settings) / f"state-{revision:012d}.safetensors"
    write_atomically(path, tensors, meta)
    for old in list_checkpoints(home, settings)[: -settings.keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path | str, settings: CheckpointSettings | None = None) -> Checkpoint:
    """Load one checkpoint file (see `read_safetensors`); it must carry a revision."""
    checkpoint = read_safetensors(Path(path), settings)
    revision = checkpoint.metadata.get("revision", "")
    if not revision.isdigit():
        raise CheckpointError(f"{path}: metadata has no valid revision")
    return checkpoint


def load_latest_checkpoint(
    home: Path | str, settings: CheckpointSettings | None = None
) -> Checkpoint | None:
    """The newest checkpoint under `home`, or None when there is none."""
    paths = list_checkpoints(home, settings)
    return load_checkpoint(paths[-1], settings) if paths else None
