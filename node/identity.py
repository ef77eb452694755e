"""The node's Ed25519 identity: a 32-byte seed in ``<home>/identity.key``, mode 0600.

Created on first start, reused afterwards, so the peer id is stable across restarts. A key file
that others can read is refused (as ssh does): whoever reads it can impersonate the node.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from node.config import ConfigError
from protocols.presence import Signer

SEED_BYTES = 32
_HEADER = b"shoal-ed25519-seed-v1\n"


def load_or_create_seed(path: Path) -> bytes:
    """The identity seed at ``path``, created (atomically, mode 0600) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        seed = os.urandom(SEED_BYTES)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _HEADER + seed.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a crash mid-write never leaves a half key behind
        return seed
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"identity key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
        )
    data = path.read_bytes()
    if not data.startswith(_HEADER):
        raise ConfigError(f"{path} is not a shoal identity key; move it away to create a new one")
    try:
        seed = bytes.fromhex(data[len(_HEADER) :].decode().strip())
    except ValueError:
        seed = b""
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"{path} is damaged (expected {SEED_BYTES} hex-encoded bytes)")
    return seed


def peer_id_of(seed: bytes) -> str:
    return Signer(seed).peer_id
